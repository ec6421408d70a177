//! The sandbox's pid 1 and the app child it creates.
//!
//! Everything here runs in children created with raw `clone3` from a possibly
//! multi-threaded monitor: only async-signal-safe calls, no allocation, no locks (the
//! app closure itself is the caller's responsibility).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::sys::{self, close_raw, errno, CloneArgs};

/// The standard signals init forwards to the app, and a monitor relays to its instance
/// (as `docker run` does): every one a caller can send that is not about the monitor
/// itself (`SIGCHLD`, `SIGPIPE`, the synchronous faults) and can be caught (not
/// `SIGKILL`/`SIGSTOP`). The realtime signals ([`RELAYED_RT`]) too.
pub const RELAYED: [libc::c_int; 16] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGTERM,
    libc::SIGCONT,
    libc::SIGTSTP,
    libc::SIGTTIN,
    libc::SIGTTOU,
    libc::SIGWINCH,
    libc::SIGVTALRM,
    libc::SIGPROF,
    libc::SIGIO,
    libc::SIGPWR,
];

/// The realtime signals relayed: glibc's `SIGRTMIN` (34) to `SIGRTMAX` (64); 32 and 33
/// are glibc's own (thread cancellation, `setxid`) and must never be blocked.
pub const RELAYED_RT: std::ops::RangeInclusive<libc::c_int> = 34..=64;

/// Every relayed signal ([`RELAYED`], then [`RELAYED_RT`]). Allocates nothing.
pub fn relayed_signals() -> impl Iterator<Item = libc::c_int> {
    RELAYED.into_iter().chain(RELAYED_RT)
}

/// Exit code of init when its setup fails (the precise error goes over the socket).
pub(crate) const INIT_SETUP_FAILED: i32 = 125;
/// Exit code of the app child when the gate was closed without release.
pub(crate) const GATE_ABANDONED: i32 = 125;
/// Exit code of the app child when the app closure panicked.
pub(crate) const APP_PANICKED: i32 = 101;

/// Stages reported by init in its one message to the monitor.
pub(crate) const STAGE_OK: i32 = 0;
pub(crate) const STAGE_NAMES: [&str; 10] = [
    "ok",
    "prctl(PR_SET_PDEATHSIG)",
    "monitor exited",
    "mount(/, MS_REC|MS_PRIVATE)",
    "mount(proc, /proc)",
    "sigaction",
    "clone3(app)",
    "unshare(CLONE_NEWTIME)",
    "writing /proc/self/timens_offsets",
    "setns(/proc/self/ns/time_for_children)",
];
const STAGE_PDEATHSIG: i32 = 1;
const STAGE_MONITOR_GONE: i32 = 2;
const STAGE_PRIVATE: i32 = 3;
const STAGE_PROC: i32 = 4;
const STAGE_SIGACTION: i32 = 5;
const STAGE_CLONE_APP: i32 = 6;
const STAGE_TIMENS_UNSHARE: i32 = 7;
const STAGE_TIMENS_OFFSETS: i32 = 8;
const STAGE_TIMENS_SETNS: i32 = 9;

/// Size of init's message: `[stage, errno, app_ns_pid]`.
pub(crate) const MSG_LEN: usize = 12;

/// Raw fds and settings prepared by the monitor before `clone3`.
pub(crate) struct InitArgs {
    /// pidfd of the monitor (for the PDEATHSIG race check).
    pub monitor_pidfd: RawFd,
    /// init's end of the report socket.
    pub sock: RawFd,
    /// the monitor's end (closed in init).
    pub mon_sock: RawFd,
    /// gate pipe, -1 if no gate.
    pub gate_r: RawFd,
    pub gate_w: RawFd,
    /// exact pid for the app (0 = any).
    pub app_pid: i32,
    /// fds to install as the app's 0, 1, 2 (-1 = leave).
    pub stdio: [RawFd; 3],
    /// Clocks for the app's new time namespace ([`crate::timens`]), if any.
    pub clocks: Option<[i64; 2]>,
    /// init is the app: it runs the closure itself (after the gate) instead of creating
    /// an app child ([`crate::SpawnOptions::app_is_init`]).
    pub app_is_init: bool,
}

/// The app's pid in the sandbox, for the forwarding handler (init is single-threaded).
static APP_PID: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let saved = errno();
    let pid = APP_PID.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: `kill` is async-signal-safe and takes integer arguments only; `pid` is
        // the app, init's own unreaped child, so it cannot name another process.
        unsafe { libc::kill(pid, sig) };
    }
    sys::set_errno(saved);
}

fn fail(a: &InitArgs, stage: i32) -> ! {
    let e = errno();
    report(a.sock, stage, e, 0, -1);
    // SAFETY: `_exit` is async-signal-safe and ends the process without running atexit
    // handlers or touching locks.
    unsafe { libc::_exit(INIT_SETUP_FAILED) }
}

/// Send `[stage, errno, ns_pid]` and, if `pidfd >= 0`, the pidfd with SCM_RIGHTS.
fn report(sock: RawFd, stage: i32, err: i32, ns_pid: i32, pidfd: RawFd) -> bool {
    #[repr(C, align(8))]
    struct Cmsg([u8; 64]);
    let payload: [i32; 3] = [stage, err, ns_pid];
    let mut cbuf = Cmsg([0; 64]);
    // `payload` (12 bytes, `MSG_LEN`) and `cbuf` (64 bytes, 8-aligned) are live
    // locals, and `msg` points only at them and at `iov`; `msghdr` is valid zeroed. With a
    // pidfd, `msg_controllen` is `CMSG_SPACE(4)` <= 64, so `CMSG_FIRSTHDR` is non-null and
    // the header and its 4-byte payload lie inside `cbuf` (written unaligned as `CMSG_DATA`
    // need not be 4-aligned). `sendmsg` only reads these buffers and is async-signal-safe.
    // SAFETY: only reads live locals and makes the async-signal-safe `sendmsg`, as stated.
    unsafe {
        let mut iov = libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: MSG_LEN,
        };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if pidfd >= 0 {
            msg.msg_control = cbuf.0.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut i32, pidfd);
        }
        loop {
            let r = libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL);
            if r >= 0 {
                return true;
            }
            if errno() != libc::EINTR {
                return false;
            }
        }
    }
}

/// Body of init (pid 1). Starts with every signal blocked (the monitor blocked them
/// around `clone3`).
pub(crate) fn init_main<F: FnOnce() -> i32>(a: &InitArgs, app: F) -> ! {
    // This runs in init, a raw-`clone3` child, and makes only async-signal-safe
    // calls: `prctl`, `poll`, `close`, `mount`, `sigaction`, `clone3`, `sendmsg`,
    // `close_range`, `waitpid`, `_exit` (`timens::enter` keeps to the same rules). Every
    // pointer passed is to a live local or a static C string; `sigaction` is valid zeroed
    // and its handler, `forward`, is itself async-signal-safe. The fds closed here were
    // inherited from the monitor and are owned by init's copy of the table alone. `clone3`
    // gets a valid `clone_args` whose `pidfd` and `set_tid` point to live locals; its child
    // runs `app_main`, which never returns. The function never returns either: the loop
    // ends only in `_exit`.
    // SAFETY: only the async-signal-safe calls listed, on live locals; never returns.
    unsafe {
        // Die with the monitor, then close the race where it died before the prctl.
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            fail(a, STAGE_PDEATHSIG);
        }
        let mut pfd = libc::pollfd {
            fd: a.monitor_pidfd,
            events: libc::POLLIN,
            revents: 0,
        };
        if libc::poll(&mut pfd, 1, 0) != 0 {
            sys::set_errno(libc::ESRCH);
            fail(a, STAGE_MONITOR_GONE);
        }
        close_raw(a.monitor_pidfd);
        close_raw(a.mon_sock);
        close_raw(a.gate_w);

        // Our own mount world: nothing propagates back to the host, fresh /proc.
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            fail(a, STAGE_PRIVATE);
        }
        if libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        ) != 0
        {
            fail(a, STAGE_PROC);
        }

        if a.app_is_init {
            init_as_app(a, app);
        }

        // Default dispositions (a SIG_IGN'd SIGCHLD would break reaping), then
        // forwarding handlers. Signals stay blocked until the app exists.
        sys::reset_signal_dispositions();
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = forward as extern "C" fn(libc::c_int) as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigfillset(&mut sa.sa_mask);
        for sig in relayed_signals() {
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                fail(a, STAGE_SIGACTION);
            }
        }

        // Last before the app, so its clocks go on from the dump with the least delay.
        if let Some(targets) = a.clocks {
            match crate::timens::enter(targets) {
                Ok(()) => {}
                Err(crate::timens::Step::Unshare) => fail(a, STAGE_TIMENS_UNSHARE),
                Err(crate::timens::Step::Offsets) => fail(a, STAGE_TIMENS_OFFSETS),
            }
        }

        // The app.
        let mut app_pidfd: libc::c_int = -1;
        let set_tid: [libc::pid_t; 1] = [a.app_pid];
        let mut args = CloneArgs {
            flags: libc::CLONE_PIDFD as u64,
            pidfd: &mut app_pidfd as *mut libc::c_int as u64,
            exit_signal: libc::SIGCHLD as u64,
            ..Default::default()
        };
        if a.app_pid > 0 {
            args.set_tid = set_tid.as_ptr() as u64;
            args.set_tid_size = 1;
        }
        let pid = sys::clone3(&args);
        if pid == 0 {
            app_main(a, app);
        }
        if pid < 0 {
            fail(a, STAGE_CLONE_APP);
        }
        let pid = pid as i32;
        APP_PID.store(pid, Ordering::Relaxed);
        report(a.sock, STAGE_OK, 0, pid, app_pidfd);
        // init holds nothing: no pipe stays open because of it.
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
        sys::set_sigmask_all(false);

        loop {
            let mut status: libc::c_int = 0;
            let r = libc::waitpid(-1, &mut status, libc::__WALL);
            if r < 0 {
                if errno() == libc::EINTR {
                    continue;
                }
                // ECHILD cannot happen before the app is reaped; be safe anyway.
                libc::_exit(INIT_SETUP_FAILED);
            }
            if r == pid {
                let code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else if libc::WIFSIGNALED(status) {
                    128 + libc::WTERMSIG(status)
                } else {
                    continue;
                };
                libc::_exit(code);
            }
        }
    }
}

/// init as the app itself (pid 1 of the namespace: a restored tree whose root was the
/// init of its own pid namespace). After init's mounts: the time namespace, entered by
/// init itself (`setns` on `time_for_children` once the offsets are written, since
/// `unshare(CLONE_NEWTIME)` moves only children), the report (init's own pid, no app
/// pidfd: the monitor has init's), then what the app child does ([`app_main`]). No
/// forwarding handlers: the app's own dispositions are its own, and so are init's
/// duties (reaping orphans, the signals it takes), as with a container's entrypoint.
fn init_as_app<F: FnOnce() -> i32>(a: &InitArgs, app: F) -> ! {
    if let Some(targets) = a.clocks {
        match crate::timens::enter(targets) {
            Ok(()) => {}
            Err(crate::timens::Step::Unshare) => fail(a, STAGE_TIMENS_UNSHARE),
            Err(crate::timens::Step::Offsets) => fail(a, STAGE_TIMENS_OFFSETS),
        }
        if crate::timens::join_own().is_err() {
            fail(a, STAGE_TIMENS_SETNS);
        }
    }
    report(a.sock, STAGE_OK, 0, 1, -1);
    app_main(a, app)
}

/// Install `fds` as 0, 1, 2 (entries < 0 are left alone). Handles overlaps.
fn install_stdio(fds: [RawFd; 3]) -> bool {
    // SAFETY: `fcntl(F_DUPFD_CLOEXEC)`, `dup2` and `close` take integers only and are
    // async-signal-safe; the fds duplicated were handed to the app child by the monitor for
    // this purpose, and only the temporary duplicates made here are closed.
    unsafe {
        let mut tmp = [-1; 3];
        for i in 0..3 {
            if fds[i] >= 0 {
                tmp[i] = libc::fcntl(fds[i], libc::F_DUPFD_CLOEXEC, 3);
                if tmp[i] < 0 {
                    return false;
                }
            }
        }
        for (i, t) in tmp.iter().enumerate() {
            if *t >= 0 {
                if libc::dup2(*t, i as RawFd) < 0 {
                    return false;
                }
                close_raw(*t);
            }
        }
    }
    true
}

/// Body of the app child (pid 2, or the exact pid; or init itself, see [`init_as_app`]).
/// Starts with every signal blocked.
fn app_main<F: FnOnce() -> i32>(a: &InitArgs, app: F) -> ! {
    // It runs in the app child of a raw `clone3`: the calls before `app` (`close`,
    // `sigaction`, `dup2`, `sigprocmask`, `read`, `_exit`) are async-signal-safe; `read`
    // writes one byte into a live local; the fds closed (`sock`, `gate_r`) are the child's
    // own copies, never used again. The closure's obligations are documented on
    // `sandbox::spawn`. `_exit` ends the child without returning.
    // SAFETY: the app child makes only the async-signal-safe calls listed before `app`.
    unsafe {
        close_raw(a.sock);
        sys::reset_signal_dispositions();
        if a.stdio.iter().any(|fd| *fd >= 0) && !install_stdio(a.stdio) {
            libc::_exit(INIT_SETUP_FAILED);
        }
        sys::set_sigmask_all(false);
        if a.gate_r >= 0 {
            let mut b = 0u8;
            let n = loop {
                let n = libc::read(a.gate_r, &mut b as *mut u8 as *mut libc::c_void, 1);
                if n < 0 && errno() == libc::EINTR {
                    continue;
                }
                break n;
            };
            close_raw(a.gate_r);
            if n != 1 {
                libc::_exit(GATE_ABANDONED);
            }
        }
        let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(app)) {
            Ok(c) => c,
            Err(_) => APP_PANICKED,
        };
        libc::_exit(code)
    }
}
