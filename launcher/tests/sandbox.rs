//! Sandbox tests. Each sandbox is owned by a `Sandbox` (killed and reaped on drop) or
//! by a forked helper (`common::Child`, killed and reaped on drop), so nothing leaks
//! even when an assertion fails.

mod common;

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::time::Duration;

use common::*;
use warmstart_launcher::sys::now_ns;
use warmstart_launcher::{spawn, LaunchError, SpawnOptions};

fn fd_set(pid: i32) -> BTreeSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

/// Wait (bounded) until `pid` blocks in `read(fd, ..)`; returns fd.
fn blocked_read_fd(pid: i32) -> i32 {
    let deadline = std::time::Instant::now() + LONG;
    loop {
        let s = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap();
        let f: Vec<&str> = s.split_whitespace().collect();
        if f.first() == Some(&"0") {
            return i32::from_str_radix(f[1].trim_start_matches("0x"), 16).unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "app never blocked: {s}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn app_is_pid_2_child_of_init_with_private_proc() {
    let (r, w) = pipe();
    let cmd = ShCmd::new(
        "echo $$; echo ppid=$PPID; grep NSpid /proc/self/status; \
         ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' '; echo",
    );
    let opts = SpawnOptions {
        stdio: Some([-1, w.as_raw_fd(), -1]),
        ..Default::default()
    };
    let sb = spawn(&opts, || cmd.exec()).unwrap();
    drop(w);
    assert_eq!(sb.app_ns_pid, 2);
    assert!(sb.app_pid > 0 && sb.init_pid > 0);
    assert_eq!(sb.wait().unwrap(), 0);
    let out = read_available(&r);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(lines[0], "2");
    assert_eq!(lines[1], "ppid=1");
    // The fresh /proc belongs to the sandbox's namespace: one level of NSpid.
    assert_eq!(lines[2].split_whitespace().count(), 2, "{out}");
    let pids: Vec<i32> = lines[3]
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(pids.contains(&1) && pids.contains(&2), "{out}");
    assert!(pids.iter().all(|p| *p < 64), "host pids visible: {out}");
    assert!(!pids.contains(&(std::process::id() as i32)) || std::process::id() < 64);
}

#[test]
fn exact_pid_and_getppid() {
    let (r, w) = pipe();
    let wfd = w.as_raw_fd();
    let opts = SpawnOptions {
        pid: Some(4321),
        gate: true,
        ..Default::default()
    };
    let sb = spawn(&opts, || {
        write_i32(wfd, std::process::id() as i32);
        write_i32(wfd, nix::unistd::getppid().as_raw());
        0
    })
    .unwrap();
    drop(w);
    assert_eq!(sb.app_ns_pid, 4321);
    // Held at the gate: the monitor sees both pids of the app.
    let status = std::fs::read_to_string(format!("/proc/{}/status", sb.app_pid)).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    let nspid: Vec<&str> = nspid.split_whitespace().skip(1).collect();
    assert_eq!(nspid, vec![sb.app_pid.to_string(), "4321".to_string()]);
    sb.release().unwrap();
    assert_eq!(read_i32s(r.as_raw_fd(), 2), vec![4321, 1]);
    assert_eq!(sb.wait().unwrap(), 0);
}

#[test]
fn exit_code_propagates() {
    let sb = spawn(&SpawnOptions::default(), || 7).unwrap();
    assert_eq!(sb.wait().unwrap(), 7);
    assert_eq!(sb.wait().unwrap(), 7, "cached");
}

#[test]
fn killed_by_signal_is_128_plus_n() {
    let sb = spawn(&SpawnOptions::default(), || {
        // SAFETY: getpid and kill take and return integers only; the app signals itself.
        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
        0
    })
    .unwrap();
    assert_eq!(sb.wait().unwrap(), 143);
}

#[test]
fn init_forwards_signals_to_app() {
    for (sig, code) in [(libc::SIGTERM, 143), (libc::SIGUSR1, 128 + libc::SIGUSR1)] {
        let sb = spawn(&SpawnOptions::default(), || loop {
            nix::unistd::pause();
        })
        .unwrap();
        sb.signal(sig).unwrap();
        assert_eq!(sb.wait_timeout(LONG).unwrap(), Some(code));
    }
}

#[test]
fn kill_and_drop_kill_everything() {
    let sb = spawn(&SpawnOptions::default(), || loop {
        nix::unistd::pause();
    })
    .unwrap();
    assert_eq!(sb.try_wait().unwrap(), None);
    let app = pidfd_open(sb.app_pid);
    sb.kill().unwrap();
    assert_eq!(sb.wait().unwrap(), 128 + libc::SIGKILL);
    assert!(wait_readable(app.as_raw_fd(), LONG));

    let sb = spawn(
        &SpawnOptions {
            gate: true,
            ..Default::default()
        },
        || 0,
    )
    .unwrap();
    let app = pidfd_open(sb.app_pid);
    let init = pidfd_open(sb.init_pid);
    drop(sb);
    assert!(wait_readable(app.as_raw_fd(), LONG));
    assert!(wait_readable(init.as_raw_fd(), LONG));
}

#[test]
fn gate_holds_app_until_release_and_is_closed_after() {
    let (r, w) = pipe();
    let wfd = w.as_raw_fd();
    let sb = spawn(
        &SpawnOptions {
            gate: true,
            ..Default::default()
        },
        || {
            // SAFETY: the source is a 1-byte static literal, only read; `wfd` stays open in
            // this child (its copy of the pipe's write end).
            unsafe { libc::write(wfd, b"X".as_ptr() as *const _, 1) };
            loop {
                nix::unistd::pause();
            }
        },
    )
    .unwrap();
    drop(w);
    let gate_fd = blocked_read_fd(sb.app_pid);
    assert!(fd_set(sb.app_pid).contains(&gate_fd.to_string()));
    // Negative check: nothing may arrive while the gate is closed.
    assert!(!wait_readable(r.as_raw_fd(), Duration::from_millis(300)));
    sb.release().unwrap();
    sb.release().unwrap(); // idempotent
    assert_eq!(read_exact(r.as_raw_fd(), 1, LONG), b"X");
    let after = fd_set(sb.app_pid);
    assert!(!after.contains(&gate_fd.to_string()), "{gate_fd} {after:?}");
    sb.kill().unwrap();
    assert_eq!(sb.wait().unwrap(), 137);
}

#[test]
fn bad_pid_is_an_error_and_leaks_nothing() {
    assert!(matches!(
        spawn(
            &SpawnOptions {
                pid: Some(1),
                ..Default::default()
            },
            || 0
        ),
        Err(LaunchError::Invalid(_))
    ));
    // Beyond PID_MAX_LIMIT: init reports clone3's EINVAL.
    match spawn(
        &SpawnOptions {
            pid: Some(i32::MAX),
            ..Default::default()
        },
        || 0,
    ) {
        Err(LaunchError::Init { stage, errno }) => {
            assert_eq!(stage, "clone3(app)");
            assert_eq!(errno, nix::errno::Errno::EINVAL);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn monitor_death_kills_init_and_app() {
    let (r, w) = pipe();
    let wfd = w.as_raw_fd();
    let mut monitor = Child::fork(|| {
        let sb = match spawn(
            &SpawnOptions {
                gate: true,
                ..Default::default()
            },
            || 0,
        ) {
            Ok(sb) => sb,
            Err(_) => return 1,
        };
        write_i32(wfd, sb.init_pid);
        write_i32(wfd, sb.app_pid);
        loop {
            nix::unistd::pause();
        }
    });
    drop(w);
    let pids = read_i32s(r.as_raw_fd(), 2);
    let init = pidfd_open(pids[0]);
    let app = pidfd_open(pids[1]);
    assert!(!wait_readable(app.as_raw_fd(), Duration::ZERO));
    // SAFETY: kill takes integer arguments only; `monitor` is our unreaped child, so its
    // pid cannot have been reused.
    unsafe { libc::kill(monitor.pid, libc::SIGKILL) };
    let st = monitor.wait_status();
    assert!(libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL);
    assert!(wait_readable(init.as_raw_fd(), LONG), "init survived");
    assert!(wait_readable(app.as_raw_fd(), LONG), "app survived");
}

#[test]
fn monitor_forwards_its_signals() {
    // Signal masks are per thread and SIGTERM to the test process would kill it: run the
    // monitor in a forked helper.
    let mut monitor = Child::fork(|| {
        let sb = match spawn(&SpawnOptions::default(), || loop {
            nix::unistd::pause();
        }) {
            Ok(sb) => sb,
            Err(_) => return 1,
        };
        // The forked helper is single-threaded: blocking SIGTERM covers the whole process.
        // SAFETY: an all-zero sigset_t is valid before sigemptyset; `set` is a live local
        // only read by pthread_sigmask (null old set allowed); getpid and kill take ints.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), libc::SIGTERM);
        }
        sb.forward_signals().unwrap_or(2)
    });
    assert_eq!(monitor.wait_code(), 143);
}

/// `app_is_init`: init runs the app itself (pid 1, no app child), in the time namespace
/// it made and joined; the app's pid is init's and its exit code is the sandbox's.
#[test]
fn app_is_init_runs_as_pid_1_in_its_time_namespace() {
    let (r, w) = pipe();
    let cmd = ShCmd::new("echo $$; echo ppid=$PPID; read x; exit 7");
    let (in_r, in_w) = pipe();
    let hour = 3600 * 1_000_000_000i64;
    let opts = SpawnOptions {
        stdio: Some([in_r.as_raw_fd(), w.as_raw_fd(), -1]),
        gate: true,
        clocks: Some([
            now_ns(libc::CLOCK_MONOTONIC) + hour,
            now_ns(libc::CLOCK_BOOTTIME) + hour,
        ]),
        app_is_init: true,
        ..Default::default()
    };
    let sb = spawn(&opts, || cmd.exec()).unwrap();
    drop(w);
    drop(in_r);
    assert_eq!(sb.app_ns_pid, 1);
    assert_eq!(sb.app_pid, sb.init_pid);
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/time")).unwrap();
    assert_ne!(ns(&sb.init_pid.to_string()), ns("self"));
    let offsets = std::fs::read_to_string(format!("/proc/{}/timens_offsets", sb.init_pid)).unwrap();
    let mono: i64 = offsets
        .lines()
        .find_map(|l| l.strip_prefix("monotonic"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{offsets}"));
    // An hour ahead, less the moments spawning took.
    assert!((3590..=3600).contains(&mono), "{offsets}");
    sb.release().unwrap();
    let out = read_exact(r.as_raw_fd(), 2 + 7, LONG);
    assert_eq!(String::from_utf8_lossy(&out), "1\nppid=0\n");
    drop(in_w);
    assert_eq!(sb.wait().unwrap(), 7);
    assert!(matches!(
        spawn(
            &SpawnOptions {
                pid: Some(5),
                app_is_init: true,
                ..Default::default()
            },
            || 0
        ),
        Err(LaunchError::Invalid(_))
    ));
}
