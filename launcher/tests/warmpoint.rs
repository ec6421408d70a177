//! `--ready TRIGGER` end to end: real Python apps in a sandbox, seized like `warmstart
//! record` does, driven by the `WarmPointTracker` until their warm point. Every sandbox
//! is killed and reaped on drop (and the apps die with us: `PTRACE_O_EXITKILL`).

mod common;

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::ptrace;
use nix::unistd::Pid;
use warmstart_launcher::trigger::{Filter, Trap, Trigger};
use warmstart_launcher::warmpoint::{
    self, notify_reply, ExitStatus, NotifyChannel, NotifyParser, Ready, SdNotifySocket, StopKind,
    Verdict, WarmPointError, WarmPointTracker, WarmStop, NOTIFY_FD,
};
use warmstart_launcher::{spawn, Sandbox, SpawnOptions};

const OPTS: ptrace::Options = ptrace::Options::PTRACE_O_TRACESECCOMP
    .union(ptrace::Options::PTRACE_O_EXITKILL)
    .union(ptrace::Options::PTRACE_O_TRACESYSGOOD)
    .union(ptrace::Options::PTRACE_O_TRACECLONE)
    .union(ptrace::Options::PTRACE_O_TRACEFORK);

fn python() -> CString {
    if std::path::Path::new("/usr/bin/python3").exists() {
        return CString::new("/usr/bin/python3").unwrap();
    }
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3");
    CString::new(String::from_utf8(out.stdout).unwrap().trim()).unwrap()
}

/// A traced Python app in a sandbox.
struct App {
    sb: Sandbox,
    tracker: WarmPointTracker,
    _stdin_w: OwnedFd,
    out_r: OwnedFd,
}

impl App {
    /// Spawn `python3 -c script` gated, with the filter of `ready`, extra env entries and
    /// the notify channel's app end; seize, release, make the tracker.
    fn start(
        ready: Ready,
        script: &str,
        notify: Option<NotifyChannel>,
        sd: Option<SdNotifySocket>,
    ) -> App {
        let py = python();
        let args = [
            py.clone(),
            CString::new("-c").unwrap(),
            CString::new(script).unwrap(),
        ];
        let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut env: Vec<CString> = vec![CString::new("PYTHONUNBUFFERED=1").unwrap()];
        if let Ok(p) = std::env::var("PATH") {
            env.push(CString::new(format!("PATH={p}")).unwrap());
        }
        if let Some(n) = &notify {
            env.push(n.env_entry().clone());
        }
        if let Some(s) = &sd {
            env.push(s.env_entry().clone());
        }
        let mut envp: Vec<*const libc::c_char> = env.iter().map(|a| a.as_ptr()).collect();
        envp.push(std::ptr::null());
        let filter: Option<Filter> = ready.filter().unwrap();

        let (in_r, stdin_w) = pipe();
        let (out_r, out_w) = pipe();
        let opts = SpawnOptions {
            gate: true,
            stdio: Some([in_r.as_raw_fd(), out_w.as_raw_fd(), -1]),
            ..Default::default()
        };
        let sb = spawn(&opts, || {
            if let Some(n) = &notify {
                if !n.install_in_child() {
                    return 124;
                }
            }
            if let Some(f) = &filter {
                if f.install().is_err() {
                    return 126;
                }
            }
            // SAFETY: `py`, `args` and `env` are CStrings of the enclosing frame, alive
            // (and mapped in this child) for the call; argv and envp point into them and
            // end with a null pointer, as execve requires.
            unsafe { libc::execve(py.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
            127
        })
        .unwrap();
        drop((in_r, out_w));
        ptrace::seize(Pid::from_raw(sb.app_pid), OPTS).unwrap();
        sb.release().unwrap();
        let mut tracker = WarmPointTracker::new(ready, sb.app_pid).unwrap();
        if let Some(n) = notify {
            tracker = tracker.with_notify(n);
        }
        if let Some(s) = sd {
            tracker = tracker.with_sd_notify(s);
        }
        App {
            sb,
            tracker,
            _stdin_w: stdin_w,
            out_r,
        }
    }

    fn run(&mut self) -> Result<WarmStop, WarmPointError> {
        self.tracker.run(self.sb.init_pid, Some(LONG))
    }

    fn warm(&mut self) -> WarmStop {
        match self.run() {
            Ok(w) => w,
            Err(e) => panic!(
                "no warm point: {e}; app stdout: {:?}",
                read_available(&self.out_r)
            ),
        }
    }

    fn regs(&self, tid: i32) -> libc::user_regs_struct {
        ptrace::getregs(Pid::from_raw(tid)).unwrap()
    }

    /// One line of the app's stdout.
    fn line(&self) -> String {
        let mut out = Vec::new();
        loop {
            let b = read_exact(self.out_r.as_raw_fd(), 1, LONG)[0];
            if b == b'\n' {
                return String::from_utf8(out).unwrap();
            }
            out.push(b);
        }
    }

    /// Resume the warm thread and drive the app to its exit (continuing everything).
    fn resume_to_exit(mut self, w: WarmStop) -> i32 {
        ptrace::cont(Pid::from_raw(w.tid), nix_sig(w.resume_signal)).unwrap();
        loop {
            let (tid, status) = match warmpoint::wait_event(self.sb.init_pid, None, None).unwrap() {
                warmpoint::WaitEvent::Stop { tid, status } => (tid, status),
                other => panic!("unexpected {other:?}"),
            };
            // A fresh tracker-like policy: continue everything.
            let v = match self.tracker.on_stop(tid, status).unwrap() {
                Verdict::WarmPoint(_) => Verdict::Continue { inject_signal: 0 },
                v => v,
            };
            if let Verdict::Exited(s) = v {
                let code = match s {
                    ExitStatus::Code(c) => c,
                    ExitStatus::Signal(s) => 128 + s,
                };
                assert_eq!(self.sb.wait().unwrap(), code);
                return code;
            }
            v.resume(tid).unwrap();
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        // Every traced thread must be reaped (see kill_and_reap).
        let _ = warmpoint::kill_and_reap(&self.sb);
    }
}

fn nix_sig(s: i32) -> Option<nix::sys::signal::Signal> {
    if s == 0 {
        None
    } else {
        Some(nix::sys::signal::Signal::try_from(s).unwrap())
    }
}

fn syscall_of(w: &WarmStop) -> (i64, Option<Trap>) {
    match w.kind {
        StopKind::SyscallEntry { nr, trap } => (nr, trap),
        other => panic!("expected a syscall-entry warm point, got {other:?}"),
    }
}

#[test]
fn ready_parses_every_form() {
    assert_eq!("stdin".parse::<Ready>().unwrap(), Ready::Stdin);
    assert_eq!("listen".parse::<Ready>().unwrap(), Ready::Listen);
    assert_eq!("notify".parse::<Ready>().unwrap(), Ready::Notify);
    assert_eq!("signal".parse::<Ready>().unwrap(), Ready::Signal);
    assert_eq!(
        "after=500ms".parse::<Ready>().unwrap(),
        Ready::After(Duration::from_millis(500))
    );
    assert_eq!(
        "after=2s".parse::<Ready>().unwrap(),
        Ready::After(Duration::from_secs(2))
    );
    assert_eq!(
        "after=1m".parse::<Ready>().unwrap(),
        Ready::After(Duration::from_secs(60))
    );
    for bad in [
        "",
        "stdinx",
        "after=",
        "after=5",
        "after=1h",
        "after=-1s",
        "after=ms",
    ] {
        let e = bad.parse::<Ready>().unwrap_err();
        assert!(
            e.contains("valid forms: stdin, listen, notify, after=DURATION"),
            "{e}"
        );
    }
    for r in [
        "stdin",
        "listen",
        "notify",
        "signal",
        "after=2s",
        "after=500ms",
    ] {
        assert_eq!(r.parse::<Ready>().unwrap().to_string(), r);
    }
}

#[test]
fn filter_rules_have_distinct_data() {
    let f = Filter::build(&[Trigger::Listen]).unwrap();
    // arch(2) + ld nr + (1+2+2+2+3 jeq) + 5 ja + 5 ret trace + ret allow
    assert_eq!(f.instructions().len(), 2 + 1 + 10 + 5 + 5 + 1);
    let mut data: Vec<u32> = f
        .instructions()
        .iter()
        .filter(|i| i.code == 0x06 && i.k != libc::SECCOMP_RET_ALLOW)
        .map(|i| i.k & libc::SECCOMP_RET_DATA)
        .collect();
    data.sort();
    data.dedup();
    assert_eq!(data.len(), 5);
    for d in data {
        assert_eq!(Trigger::from_trace_data(d as u64), Some(Trigger::Listen));
    }
    let n = Filter::build(&[Trigger::Stdin, Trigger::Notify(Some(100))]).unwrap();
    // stdin (27, including its poll/select/epoll rules) + notify's read rule
    assert!(n.instructions().len() <= 36);
    assert_eq!(
        Trap::from_data(Trap::NotifyRead.data() as u64),
        Some(Trap::NotifyRead)
    );
    assert!(Ready::After(Duration::ZERO).filter().unwrap().is_none());
    assert!(Ready::Signal.filter().unwrap().is_none());
}

#[test]
fn notify_parser_accepts_assignments_rejects_garbage() {
    let mut p = NotifyParser::default();
    p.feed_stream(b"STATUS=warming up\nREA", "fd").unwrap();
    assert!(!p.ready());
    p.feed_stream(b"DY=1\n", "fd").unwrap();
    assert!(p.ready());
    let mut p = NotifyParser::default();
    p.feed_datagram(b"STATUS=x\nREADY=1", "socket").unwrap();
    assert!(p.ready());
    let e = NotifyParser::default()
        .feed_stream(b"hello\n", "fd")
        .unwrap_err();
    assert!(e.to_string().contains("expected \"READY=1\\n\""), "{e}");
    assert!(NotifyParser::default()
        .feed_datagram(b"ready=1", "socket")
        .is_err());
}

#[test]
fn stdin_first_read_of_fd0() {
    let mut app = App::start(
        Ready::Stdin,
        "import sys\nprint('warming')\nsys.stdin.readline()",
        None,
        None,
    );
    let w = app.warm();
    assert_eq!(w.tid, app.sb.app_pid);
    let (nr, trap) = syscall_of(&w);
    assert_eq!((nr, trap), (libc::SYS_read, Some(Trap::StdinRead)));
    assert_eq!(app.regs(w.tid).rdi, 0);
    assert_eq!(app.line(), "warming");
}

#[test]
fn listen_poll_on_pipe_first_is_not_the_warm_point() {
    let script = r#"
import os, select, socket
r, w = os.pipe()
p = select.poll(); p.register(r, select.POLLIN); p.poll(0)
print("polled pipe")
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
p = select.poll(); p.register(r, select.POLLIN); p.register(s.fileno(), select.POLLIN)
print(s.fileno())
p.poll()
"#;
    let mut app = App::start(Ready::Listen, script, None, None);
    let w = app.warm();
    let (nr, trap) = syscall_of(&w);
    assert_eq!(trap, Some(Trap::Poll));
    assert!(nr == libc::SYS_poll || nr == libc::SYS_ppoll, "{nr}");
    assert_eq!(app.line(), "polled pipe");
    let lfd: i32 = app.line().parse().unwrap();
    assert!(app.tracker.listen_fds().contains(&lfd));
    // The pipe poll came first, was trapped and let through.
    let seen = app.tracker.traps_seen();
    let first_poll = seen.iter().position(|t| t.0 == Some(Trap::Poll)).unwrap();
    let listen = seen.iter().position(|t| t.0 == Some(Trap::Listen)).unwrap();
    assert!(first_poll < listen, "{seen:?}");
    assert_eq!(seen.last().unwrap().0, Some(Trap::Poll));
}

#[test]
fn listen_accept4_on_listening_socket() {
    let script = r#"
import socket
c = socket.socket()
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(16)
print(s.fileno())
s.accept()
"#;
    let mut app = App::start(Ready::Listen, script, None, None);
    let w = app.warm();
    let (nr, trap) = syscall_of(&w);
    assert_eq!(trap, Some(Trap::Accept));
    assert!(nr == libc::SYS_accept4 || nr == libc::SYS_accept, "{nr}");
    let lfd: i32 = app.line().parse().unwrap();
    assert_eq!(app.regs(w.tid).rdi as i32, lfd);
}

#[test]
fn listen_accept_in_a_thread() {
    let script = r#"
import socket, threading, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
t = threading.Thread(target=s.accept); t.start()
t.join()
"#;
    let mut app = App::start(Ready::Listen, script, None, None);
    let w = app.warm();
    assert_ne!(
        w.tid, app.sb.app_pid,
        "the accept runs in the second thread"
    );
    assert_eq!(syscall_of(&w).1, Some(Trap::Accept));
}

#[test]
fn listen_epoll_wait_on_set_with_listener() {
    let script = r#"
import os, select, socket
r, w = os.pipe()
e = select.epoll(); e.register(r, select.EPOLLIN); e.poll(0)
print("epolled pipe")
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
e.register(s.fileno(), select.EPOLLIN)
print(e.fileno())
e.poll()
"#;
    let mut app = App::start(Ready::Listen, script, None, None);
    let w = app.warm();
    let (nr, trap) = syscall_of(&w);
    assert_eq!(trap, Some(Trap::EpollWait));
    assert!(
        [
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_pwait2
        ]
        .contains(&nr),
        "{nr}"
    );
    assert_eq!(app.line(), "epolled pipe");
    let epfd: i32 = app.line().parse().unwrap();
    assert_eq!(app.regs(w.tid).rdi as i32, epfd);
    let epolls = app
        .tracker
        .traps_seen()
        .iter()
        .filter(|t| t.0 == Some(Trap::EpollWait))
        .count();
    assert_eq!(
        epolls, 2,
        "the pipe-only epoll_wait was trapped and let through"
    );
}

/// Waits that return at once are not the warm point: zero timeouts (epoll, poll,
/// select), an epoll with a connection queued, an accept that finds one, a non-blocking
/// accept. The first wait that blocks is.
#[test]
fn listen_only_a_blocking_wait_is_the_warm_point() {
    let script = r#"
import select, socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
e = select.epoll(); e.register(s.fileno(), select.EPOLLIN)
e.poll(0)
p = select.poll(); p.register(s.fileno(), select.POLLIN); p.poll(0)
select.select([s], [], [], 0)
c = socket.create_connection(s.getsockname())
e.poll(30)
conn, _ = s.accept()
s.setblocking(False)
try:
    s.accept()
except BlockingIOError:
    pass
print("busy done")
e.poll()
"#;
    let mut app = App::start(Ready::Listen, script, None, None);
    let w = app.warm();
    let (nr, trap) = syscall_of(&w);
    assert_eq!(
        trap,
        Some(Trap::EpollWait),
        "{:?}",
        app.tracker.traps_seen()
    );
    assert_eq!(app.line(), "busy done");
    let r = app.regs(w.tid);
    assert_eq!(nr, r.orig_rax as i64);
    // epoll_wait's timeout (or epoll_pwait2's pointer): not zero, it blocks.
    assert_ne!(
        r.r10 as i32, 0,
        "the warm point must not be a zero-timeout wait"
    );
    let seen = app.tracker.traps_seen();
    let count = |t| seen.iter().filter(|s| s.0 == Some(t)).count();
    assert_eq!(count(Trap::EpollWait), 3, "{seen:?}");
    assert_eq!(count(Trap::Accept), 2, "{seen:?}");
    assert!(app.tracker.take_held().is_empty());
}

/// `listen` fires in any process of the tree: here the app's child waits for a
/// connection while the app itself waits for the child.
#[test]
fn listen_in_a_child_process() {
    let script = r#"
import os, socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
pid = os.fork()
if pid == 0:
    s.accept()
    os._exit(0)
os.waitpid(pid, 0)
"#;
    let mut app = App::start(Ready::Listen, script, None, None);
    let w = app.warm();
    assert_eq!(syscall_of(&w).1, Some(Trap::Accept));
    assert_ne!(w.tid, app.sb.app_pid, "the accept runs in the child");
    let status = std::fs::read_to_string(format!("/proc/{}/status", w.tid)).unwrap();
    let ppid = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .map(|v| v.trim().parse::<i32>().unwrap());
    assert_eq!(ppid, Some(app.sb.app_pid));
}

/// With several workers, the warm point waits until each blocks waiting for a
/// connection (the tree is settled): the others are held too, for the dump.
#[test]
fn listen_tree_settles_with_every_worker_waiting() {
    let script = r#"
import os, socket, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
kids = []
for i in range(2):
    pid = os.fork()
    if pid == 0:
        if i == 1:
            sum(range(3000000))
        s.accept()
        os._exit(0)
    kids.append(pid)
    time.sleep(0.05)
for k in kids:
    os.waitpid(k, 0)
"#;
    let mut app = App::start(Ready::Listen, script, None, None);
    let w = app.warm();
    assert_eq!(syscall_of(&w).1, Some(Trap::Accept));
    let held = app.tracker.take_held();
    assert_eq!(held.len(), 1, "the other worker is held too: {held:?}");
    assert_eq!(syscall_of(&held[0]).1, Some(Trap::Accept));
    assert_ne!(held[0].tid, w.tid);
}

/// `stdin`: a zero-timeout poll of fd 0 is not the warm point; the blocking one is.
#[test]
fn stdin_zero_timeout_poll_is_not_the_warm_point() {
    let script = r#"
import select
p = select.poll(); p.register(0, select.POLLIN); p.poll(0)
print("polled")
p.poll()
"#;
    let mut app = App::start(Ready::Stdin, script, None, None);
    let w = app.warm();
    assert_eq!(syscall_of(&w).1, Some(Trap::Poll));
    assert_eq!(app.line(), "polled");
    let polls = app
        .tracker
        .traps_seen()
        .iter()
        .filter(|t| t.0 == Some(Trap::Poll))
        .count();
    assert_eq!(polls, 2);
}

/// Once the tracker interrupts the app (priming done, `READY=1`), a zero-timeout poll it
/// is trapped in is still not the warm point: the snapshot is never taken there.
#[test]
fn interrupted_warm_point_is_never_a_zero_timeout_poll() {
    let script = r#"
import os, select, socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
r, w = os.pipe()
p = select.poll(); p.register(r, select.POLLIN)
for i in range(1000):
    p.poll(0)
print("looping")
while True:
    p.poll(0)
"#;
    let mut app = App::start(Ready::Listen, script, None, None);
    // Once the app loops, the wake-up fd becomes readable (the tracker runs meanwhile).
    let (wake_r, wake_w) = pipe();
    let out = app.out_r.try_clone().unwrap();
    let waker = std::thread::spawn(move || {
        let line = read_exact(out.as_raw_fd(), 8, LONG);
        assert_eq!(line, b"looping\n");
        // SAFETY: one byte from a static literal, only read, to the pipe end owned by
        // `wake_w`, which this closure holds open.
        unsafe { libc::write(wake_w.as_raw_fd(), b"x".as_ptr().cast(), 1) };
    });
    app.tracker.interrupt_when_readable(wake_r);
    let w = app.warm();
    waker.join().unwrap();
    let seen = app.tracker.traps_seen();
    assert!(
        seen.iter().filter(|t| t.0 == Some(Trap::Poll)).count() > 0,
        "the loop ran: {seen:?}"
    );
    if let StopKind::SyscallEntry { nr, .. } = w.kind {
        let r = app.regs(w.tid);
        assert!(
            !(nr == libc::SYS_poll && r.rdx as i32 == 0),
            "the warm point is a zero-timeout poll: {w:?}"
        );
    }
}

#[test]
fn listen_select_on_listener() {
    let script = r#"
import os, select, socket
r, w = os.pipe()
select.select([r], [], [], 0)
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
select.select([r, s], [], [])
"#;
    let mut app = App::start(Ready::Listen, script, None, None);
    let w = app.warm();
    let (nr, trap) = syscall_of(&w);
    assert_eq!(trap, Some(Trap::Select));
    assert!(nr == libc::SYS_select || nr == libc::SYS_pselect6, "{nr}");
    let selects = app
        .tracker
        .traps_seen()
        .iter()
        .filter(|t| t.0 == Some(Trap::Select))
        .count();
    assert_eq!(selects, 2);
}

#[test]
fn notify_fd_read_after_ready_then_restored_reply() {
    let script = r#"
import os
fd = int(os.environ["WARMSTART_NOTIFY_FD"])
os.write(fd, b"STATUS=warming\n")
os.write(fd, b"READY=1\n")
print(os.read(fd, 100).decode().strip())
"#;
    let ch = NotifyChannel::new().unwrap();
    let mut app = App::start(Ready::Notify, script, Some(ch), None);
    let w = app.warm();
    let (nr, trap) = syscall_of(&w);
    assert_eq!((nr, trap), (libc::SYS_read, Some(Trap::NotifyRead)));
    assert_eq!(app.regs(w.tid).rdi as i32, NOTIFY_FD);
    // What restore does: RESTORED=1 before the app resumes.
    let ch = app.tracker.notify_channel().unwrap();
    notify_reply(ch.launcher_fd(), warmpoint::RESTORED_MSG).unwrap();
    let line_app = app.line_after_resume(w);
    assert_eq!(line_app, "RESTORED=1");
}

impl App {
    fn line_after_resume(self, w: WarmStop) -> String {
        let out = self.out_r.try_clone().unwrap();
        let code = self.resume_to_exit(w);
        assert_eq!(code, 0);
        read_available(&out).trim().to_owned()
    }
}

#[test]
fn notify_garbage_is_a_clear_error() {
    let script = r#"
import os
fd = int(os.environ["WARMSTART_NOTIFY_FD"])
os.write(fd, b"hello there\n")
os.read(fd, 100)
"#;
    let mut app = App::start(
        Ready::Notify,
        script,
        Some(NotifyChannel::new().unwrap()),
        None,
    );
    match app.run() {
        Err(WarmPointError::NotifyGarbage { got, .. }) => assert_eq!(got, "hello there"),
        other => panic!("expected garbage error, got {other:?}"),
    }
}

fn sd_notify_case(sock: SdNotifySocket) {
    let script = r#"
import os, socket, sys
a = os.environ["NOTIFY_SOCKET"]
if a.startswith("@"): a = "\0" + a[1:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1", a)
print("sent")
sys.stdin.read()
"#;
    let mut app = App::start(
        Ready::Notify,
        script,
        Some(NotifyChannel::new().unwrap()),
        Some(sock),
    );
    let w = app.warm();
    assert_eq!(w.kind, StopKind::Interrupt);
    assert_eq!(w.resume_signal, 0);
}

#[test]
fn sd_notify_socket_path() {
    let s = SdNotifySocket::bind().unwrap();
    let env = s.env_entry().to_str().unwrap().to_owned();
    let path = env.strip_prefix("NOTIFY_SOCKET=").unwrap().to_owned();
    assert!(std::path::Path::new(&path).exists());
    sd_notify_case(s);
    assert!(!std::path::Path::new(&path).exists(), "removed on drop");
}

#[test]
fn sd_notify_socket_abstract() {
    let s = SdNotifySocket::bind_abstract().unwrap();
    assert!(s
        .env_entry()
        .to_str()
        .unwrap()
        .starts_with("NOTIFY_SOCKET=@"));
    sd_notify_case(s);
}

#[test]
fn after_deadline_interrupts() {
    let t0 = Instant::now();
    let mut app = App::start(
        Ready::After(Duration::from_millis(300)),
        "import time\nprint('up')\ntime.sleep(100)",
        None,
        None,
    );
    assert!(app.tracker.next_deadline().is_some());
    let w = app.warm();
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!(w.kind, StopKind::Interrupt);
    assert_eq!(app.tracker.next_deadline(), None);
}

#[test]
fn signal_self_sigstop_is_suppressed() {
    let script = r#"
import os, signal
print("stopping")
os.kill(os.getpid(), signal.SIGSTOP)
print("resumed")
"#;
    let mut app = App::start(Ready::Signal, script, None, None);
    let w = app.warm();
    assert_eq!(w.tid, app.sb.app_pid);
    assert_eq!(w.kind, StopKind::SignalDelivery(libc::SIGSTOP));
    assert_eq!(w.resume_signal, 0);
    assert_eq!(app.line(), "stopping");
    // Resumed without the SIGSTOP: no group stop, it just goes on.
    assert_eq!(app.line_after_resume(w), "resumed");
}

/// Feeding the tracker by hand: a handled signal is re-injected, a group stop is
/// listened (and stays stopped until SIGCONT), then the warm point.
#[test]
fn manual_feed_signals_and_group_stop() {
    let script = r#"
import os, signal, sys
signal.signal(signal.SIGUSR1, lambda *a: print("usr1"))
os.kill(os.getpid(), signal.SIGUSR1)
print("tstp")
os.kill(os.getpid(), signal.SIGSTOP)
print("continued")
sys.stdin.readline()
"#;
    let mut app = App::start(Ready::Stdin, script, None, None);
    let mut verdicts = Vec::new();
    let warm =
        loop {
            let (tid, status) =
                match warmpoint::wait_event(app.sb.init_pid, Some(Instant::now() + LONG), None)
                    .unwrap()
                {
                    warmpoint::WaitEvent::Stop { tid, status } => (tid, status),
                    other => panic!("unexpected {other:?}"),
                };
            let v = app.tracker.on_stop(tid, status).unwrap();
            verdicts.push(v);
            match v {
                Verdict::WarmPoint(w) => break w,
                Verdict::Exited(s) => panic!("exited {s:?}"),
                Verdict::Listen => {
                    v.resume(tid).unwrap();
                    assert_eq!(app.line(), "usr1");
                    assert_eq!(app.line(), "tstp");
                    // Still stopped: nothing more comes until SIGCONT.
                    // SAFETY: kill takes integer arguments only; the app is held (unreaped)
                    // by its sandbox, so its pid is still its own.
                    unsafe { libc::kill(app.sb.app_pid, libc::SIGCONT) };
                }
                v => v.resume(tid).unwrap(),
            }
        };
    assert!(verdicts.contains(&Verdict::Continue {
        inject_signal: libc::SIGUSR1
    }));
    assert!(verdicts.contains(&Verdict::Continue {
        inject_signal: libc::SIGSTOP
    }));
    assert!(verdicts.contains(&Verdict::Listen));
    assert_eq!(syscall_of(&warm).1, Some(Trap::StdinRead));
    assert_eq!(app.line(), "continued");
}

#[test]
fn early_exit_is_reported() {
    let mut app = App::start(Ready::Listen, "import sys\nsys.exit(7)", None, None);
    match app.run() {
        Err(WarmPointError::Exited(ExitStatus::Code(7))) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(app.sb.wait().unwrap(), 7);
}

/// Filter overhead (printed, not asserted): `getpid` (never trapped whatever its
/// arguments: the kernel's seccomp action cache skips the filter) and `read(-1)` (the
/// notify rule checks args[0], so the filter runs in full).
#[test]
fn filter_overhead_getpid() {
    const N: u32 = 500_000;
    let filter = Filter::build(&[Trigger::Listen, Trigger::Notify(Some(100))]).unwrap();
    let measure = |filter: Option<&Filter>, nr: libc::c_long| -> i32 {
        let (r, w) = pipe();
        let wfd = w.as_raw_fd();
        let mut child = Child::fork(|| {
            if let Some(f) = filter {
                if f.install().is_err() {
                    return 2;
                }
            }
            let mut b = [0u8; 1];
            let t = Instant::now();
            for _ in 0..N {
                // SAFETY: `nr` is getpid (ignores its arguments) or read on fd -1, which
                // fails with EBADF; either way at most 1 byte of `b`, a live local, could be
                // written.
                unsafe { libc::syscall(nr, -1, b.as_mut_ptr(), 1) };
            }
            write_i32(wfd, (t.elapsed().as_nanos() / N as u128) as i32);
            0
        });
        drop(w);
        let ns = read_i32s(r.as_raw_fd(), 1)[0];
        assert_eq!(child.wait_code(), 0);
        ns
    };
    for (name, nr) in [("getpid", libc::SYS_getpid), ("read(-1)", libc::SYS_read)] {
        println!(
            "{name}: {} ns/call without filter, {} ns/call with the listen+notify filter ({} insns)",
            measure(None, nr),
            measure(Some(&filter), nr),
            filter.instructions().len()
        );
    }
}
