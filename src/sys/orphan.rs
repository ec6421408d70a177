//! A helper process that is nobody's child: forked twice from a (multi-threaded)
//! monitor, so that the monitor's only child stays its sandbox's init and nothing needs
//! to reap the helper.

use std::io;
use std::os::fd::RawFd;

/// Starts `body` in a process forked twice (the intermediate one is reaped before this
/// returns), in a process group of its own (so signals to the monitor's group miss it),
/// with every fd but `keep` closed.
///
/// # Safety
/// The caller is multi-threaded: `body` may only make async-signal-safe raw system
/// calls on what it captured by value (no allocation, no lock); it should not return
/// (if it does, the process exits with status 127).
pub unsafe fn spawn(keep: [RawFd; 2], body: impl FnOnce()) -> io::Result<()> {
    // SAFETY: the child only forks again and `_exit`s; the grandchild keeps to raw
    // system calls on locals (below) and then runs `body`, whose contract the caller
    // keeps.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            match libc::fork() {
                0 => {
                    libc::setpgid(0, 0);
                    close_all_but(keep);
                    body();
                    libc::_exit(127)
                }
                p => libc::_exit(i32::from(p < 0)),
            }
        }
    }
    let mut status = 0;
    // SAFETY: `status` is a live local; `pid` is our own child, reaped only here.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(io::Error::other(format!(
            "its intermediate process ended with status {status:#x}"
        )));
    }
    Ok(())
}

/// Closes every fd but `keep` (raw `close_range` calls only).
unsafe fn close_all_but(keep: [RawFd; 2]) {
    let mut sorted = keep;
    sorted.sort_unstable();
    let mut from = 0u32;
    for fd in sorted {
        if fd as u32 > from {
            // SAFETY: closing a range of this process's own fds; nothing here uses them.
            unsafe { libc::syscall(libc::SYS_close_range, from, fd as u32 - 1, 0u32) };
        }
        from = fd as u32 + 1;
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0u32) };
}
