//! Raw kernel wrappers (async-signal-safe: no allocation, no locks).

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// `struct clone_args` (CLONE_ARGS_SIZE_VER2).
#[repr(C)]
#[derive(Default)]
pub struct CloneArgs {
    pub flags: u64,
    pub pidfd: u64,
    pub child_tid: u64,
    pub parent_tid: u64,
    pub exit_signal: u64,
    pub stack: u64,
    pub stack_size: u64,
    pub tls: u64,
    pub set_tid: u64,
    pub set_tid_size: u64,
    pub cgroup: u64,
}

/// Raw `clone3` with fork semantics (no CLONE_VM, no new stack): returns 0 in the child,
/// the child's pid in the parent, -1 with errno on failure.
///
/// # Safety
/// The child is a copy of the calling thread only; it must call
/// [`crate::forksafe::enter_child`] before anything allocates, and take no lock another
/// thread could hold.
pub unsafe fn clone3(args: &CloneArgs) -> libc::c_long {
    libc::syscall(
        libc::SYS_clone3,
        args as *const CloneArgs,
        std::mem::size_of::<CloneArgs>(),
    )
}

const _: () = assert!(std::mem::size_of::<CloneArgs>() == 88);

/// The calling thread's `errno` (async-signal-safe: a thread-local read).
pub(crate) fn errno() -> i32 {
    nix::errno::Errno::last_raw()
}

/// Set the calling thread's `errno` (async-signal-safe: a thread-local write).
pub(crate) fn set_errno(e: i32) {
    nix::errno::Errno::set_raw(e)
}

/// `pidfd_open(pid, flags)` (`flags`: 0 or `PIDFD_NONBLOCK`); the descriptor is
/// close-on-exec. The one wrapper of it in warmstart.
pub fn pidfd_open(pid: libc::pid_t, flags: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: integer arguments only.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `pidfd_send_signal(fd, sig, NULL, 0)`; returns the raw result (-1 + errno on failure).
pub(crate) fn pidfd_send_signal(fd: RawFd, sig: i32) -> libc::c_long {
    // SAFETY: integer arguments and a null `siginfo` pointer, which the kernel accepts;
    // an invalid `fd` is reported as EBADF, not undefined behaviour.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd,
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    }
}

/// Close a raw fd if it is valid, preserving errno (async-signal-safe).
///
/// # Safety
/// `fd` is owned by the caller and never used again: no `OwnedFd` or other owner of it
/// may exist (init and the app child close the monitor's descriptors they inherited).
pub(crate) unsafe fn close_raw(fd: RawFd) {
    if fd >= 0 {
        let e = errno();
        // SAFETY: the caller owns `fd` and gives it up (this function's contract).
        unsafe { libc::close(fd) };
        set_errno(e);
    }
}

/// Reset every catchable signal's disposition to `SIG_DFL` (errors ignored: 32/33 are
/// reserved by glibc).
pub(crate) fn reset_signal_dispositions() {
    // SAFETY: `sigaction` is a plain C struct (valid zeroed); SIG_DFL installs no handler,
    // so no Rust code is made to run in signal context; pointers are to live locals.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        libc::sigemptyset(&mut sa.sa_mask);
        for sig in 1..=64 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Set the calling thread's signal mask to `how` with a full or empty set.
pub(crate) fn set_sigmask_all(block: bool) {
    // SAFETY: `sigset_t` is a plain C bit array (valid zeroed); pointers are to a live
    // local or null (the old mask is not wanted).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        if block {
            libc::sigfillset(&mut set);
        } else {
            libc::sigemptyset(&mut set);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// `clock_gettime(clock)` in nanoseconds, in this process's time namespace.
pub fn now_ns(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clocks asked for always exist.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}
