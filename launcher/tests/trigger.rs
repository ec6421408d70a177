//! Warm-point trap tests. The trapped processes are forked helpers (`common::Child`,
//! killed and reaped on drop) or sandboxes (killed and reaped on drop).

mod common;

use std::os::fd::AsRawFd;

use common::*;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use warmstart_launcher::trigger::{Filter, Trigger};
use warmstart_launcher::{install_stdin_trap, spawn, SpawnOptions};

const SECCOMP_OPTS: ptrace::Options =
    ptrace::Options::PTRACE_O_TRACESECCOMP.union(ptrace::Options::PTRACE_O_EXITKILL);

/// A seccomp stop: (syscall nr, rdi, event msg).
type Stop = (i64, u64, u64);

/// Drive a seized tracee until it exits, continuing every seccomp stop. Returns the stops
/// and the exit code.
fn trace_to_exit(pid: i32) -> (Vec<Stop>, i32) {
    let pid = Pid::from_raw(pid);
    let mut stops = Vec::new();
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL)).unwrap() {
            WaitStatus::PtraceEvent(_, _, ev) if ev == libc::PTRACE_EVENT_SECCOMP => {
                let regs = ptrace::getregs(pid).unwrap();
                let msg = ptrace::getevent(pid).unwrap() as u64;
                stops.push((regs.orig_rax as i64, regs.rdi, msg));
                ptrace::cont(pid, None).unwrap();
            }
            WaitStatus::Stopped(_, sig) => {
                let inject = if sig == Signal::SIGSTOP {
                    None
                } else {
                    Some(sig)
                };
                ptrace::cont(pid, inject).unwrap();
            }
            WaitStatus::PtraceEvent(..) => ptrace::cont(pid, None).unwrap(),
            WaitStatus::Exited(_, code) => return (stops, code),
            WaitStatus::Signaled(_, sig, _) => return (stops, 128 + sig as i32),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn filter_shape() {
    let f = Filter::build(&[Trigger::Stdin]).unwrap();
    // arch(2) + ld nr + read rule (5 jeq + ja + ld arg + jeq + ret trace = 9) + reload nr
    // + poll (2 jeq + ja + ret) + select (2 + ja + ret) + epoll (3 + ja + ret) + ret allow
    assert_eq!(f.instructions().len(), 27);
    assert_eq!(f.instructions().last().unwrap().k, libc::SECCOMP_RET_ALLOW);
    assert_eq!(
        Trigger::from_trace_data(Trigger::Stdin.trace_data() as u64),
        Some(Trigger::Stdin)
    );
    assert_eq!(Filter::build(&[]).unwrap().instructions().len(), 3);
}

#[test]
fn stdin_reads_are_trapped_other_fds_are_not() {
    let (in_r, in_w) = pipe();
    let (go_r, go_w) = pipe();
    let (in_rfd, go_rfd) = (in_r.as_raw_fd(), go_r.as_raw_fd());
    // SAFETY: every pointer handed to read/readv/pread is to `b` (or `iov` over it), a
    // live 1-byte local, with a length of 1; dup2 takes integers; go_rfd and in_rfd stay
    // open in the forked child, which owns its copies.
    let mut child = Child::fork(|| unsafe {
        let mut b = [0u8; 1];
        if libc::read(go_rfd, b.as_mut_ptr() as *mut _, 1) != 1 {
            return 10;
        }
        if libc::dup2(in_rfd, 0) != 0 || install_stdin_trap().is_err() {
            return 11;
        }
        // Not fd 0: not trapped.
        if libc::read(in_rfd, b.as_mut_ptr() as *mut _, 1) != 1 || b[0] != b'a' {
            return 12;
        }
        // fd 0: trapped, then runs normally after PTRACE_CONT.
        if libc::read(0, b.as_mut_ptr() as *mut _, 1) != 1 || b[0] != b'b' {
            return 13;
        }
        let iov = libc::iovec {
            iov_base: b.as_mut_ptr() as *mut _,
            iov_len: 1,
        };
        if libc::readv(0, &iov, 1) != 1 || b[0] != b'c' {
            return 14;
        }
        // A pipe cannot pread: ESPIPE, but only after the trap.
        if libc::pread(0, b.as_mut_ptr() as *mut _, 1, 0) != -1 {
            return 15;
        }
        0
    });
    ptrace::seize(Pid::from_raw(child.pid), SECCOMP_OPTS).unwrap();
    assert_eq!(
        // SAFETY: the source is a 3-byte static literal, only read; the fd is borrowed
        // from a live OwnedFd.
        unsafe { libc::write(in_w.as_raw_fd(), b"abc".as_ptr() as *const _, 3) },
        3
    );
    assert_eq!(
        // SAFETY: the source is a 1-byte static literal, only read; the fd is borrowed
        // from a live OwnedFd.
        unsafe { libc::write(go_w.as_raw_fd(), b"g".as_ptr() as *const _, 1) },
        1
    );
    let (stops, code) = trace_to_exit(child.pid);
    let data = Trigger::Stdin.trace_data() as u64;
    assert_eq!(
        stops,
        vec![
            (libc::SYS_read, 0, data),
            (libc::SYS_readv, 0, data),
            (libc::SYS_pread64, 0, data)
        ]
    );
    assert_eq!(code, 0);
    child.reaped(); // trace_to_exit reaped it
}

#[test]
fn without_tracer_the_trapped_read_fails_with_enosys() {
    let (in_r, in_w) = pipe();
    let in_rfd = in_r.as_raw_fd();
    assert_eq!(
        // SAFETY: the source is a 2-byte static literal, only read; the fd is borrowed
        // from a live OwnedFd.
        unsafe { libc::write(in_w.as_raw_fd(), b"ab".as_ptr() as *const _, 2) },
        2
    );
    // SAFETY: both reads are into `b`, a live 1-byte local, with a length of 1; dup2
    // takes integers; __errno_location returns this thread's errno slot, always valid.
    let mut child = Child::fork(|| unsafe {
        let mut b = [0u8; 1];
        if libc::dup2(in_rfd, 0) != 0 || install_stdin_trap().is_err() {
            return 11;
        }
        if libc::read(in_rfd, b.as_mut_ptr() as *mut _, 1) != 1 {
            return 12;
        }
        if libc::read(0, b.as_mut_ptr() as *mut _, 1) != -1
            || *libc::__errno_location() != libc::ENOSYS
        {
            return 13;
        }
        0
    });
    assert_eq!(child.wait_code(), 0);
}

/// The record flow: spawn gated with stdio pipes, seize with TRACESECCOMP, release, run
/// to the seccomp stop of the first stdin read, then let it go on.
#[test]
fn record_flow_in_sandbox() {
    let (in_r, in_w) = pipe();
    let (out_r, out_w) = pipe();
    let cmd = ShCmd::new("echo warming; read x; echo got $x; exit 3");
    let opts = SpawnOptions {
        gate: true,
        stdio: Some([in_r.as_raw_fd(), out_w.as_raw_fd(), -1]),
        ..Default::default()
    };
    let sb = spawn(&opts, || {
        if install_stdin_trap().is_err() {
            return 126;
        }
        cmd.exec()
    })
    .unwrap();
    drop(in_r);
    drop(out_w);
    let pid = Pid::from_raw(sb.app_pid);
    ptrace::seize(pid, SECCOMP_OPTS).unwrap();
    sb.release().unwrap();
    // Run to the warm point.
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL)).unwrap() {
            WaitStatus::PtraceEvent(_, _, ev) if ev == libc::PTRACE_EVENT_SECCOMP => break,
            WaitStatus::Stopped(_, sig) => ptrace::cont(pid, Some(sig)).unwrap(),
            WaitStatus::PtraceEvent(..) => ptrace::cont(pid, None).unwrap(),
            other => panic!("app ended before its warm point: {other:?}"),
        }
    }
    let regs = ptrace::getregs(pid).unwrap();
    assert_eq!(regs.orig_rax as i64, libc::SYS_read);
    assert_eq!(regs.rdi, 0);
    assert_eq!(
        Trigger::from_trace_data(ptrace::getevent(pid).unwrap() as u64),
        Some(Trigger::Stdin)
    );
    assert_eq!(read_exact(out_r.as_raw_fd(), 8, LONG), b"warming\n");
    // (A real record would dump here.) Resume: the app reads its input and exits.
    assert_eq!(
        // SAFETY: the source is a 6-byte static literal, only read; the fd is borrowed
        // from a live OwnedFd.
        unsafe { libc::write(in_w.as_raw_fd(), b"hello\n".as_ptr() as *const _, 6) },
        6
    );
    ptrace::cont(pid, None).unwrap();
    let (_, code) = trace_to_exit(sb.app_pid);
    assert_eq!(code, 3);
    assert_eq!(sb.wait().unwrap(), 3);
    assert_eq!(read_available(&out_r), "got hello\n");
}

/// Dropping a sandbox whose app is traced (and stopped) by the monitor must not hang:
/// init can only finish once the tracer reaps the app's exit.
#[test]
fn drop_with_traced_stopped_app_does_not_hang() {
    let (in_r, _in_w) = pipe();
    let opts = SpawnOptions {
        gate: true,
        stdio: Some([in_r.as_raw_fd(), -1, -1]),
        ..Default::default()
    };
    // SAFETY: the read is into `b`, a live 1-byte local, with a length of 1.
    let sb = spawn(&opts, || unsafe {
        if install_stdin_trap().is_err() {
            return 126;
        }
        let mut b = [0u8; 1];
        libc::read(0, b.as_mut_ptr() as *mut _, 1);
        0
    })
    .unwrap();
    let pid = Pid::from_raw(sb.app_pid);
    ptrace::seize(pid, SECCOMP_OPTS).unwrap();
    sb.release().unwrap();
    match waitpid(pid, Some(WaitPidFlag::__WALL)).unwrap() {
        WaitStatus::PtraceEvent(_, _, ev) if ev == libc::PTRACE_EVENT_SECCOMP => {}
        other => panic!("unexpected {other:?}"),
    }
    sb.kill().unwrap();
    assert_eq!(sb.wait().unwrap(), 137);
}
