//! Holds an instance whose root is pid 1 of its namespace to the life of its monitor.
//!
//! The sandbox's init dies with the monitor (`PR_SET_PDEATHSIG` SIGKILL, see
//! `warmstart_launcher::sandbox`), and the kernel then kills the whole namespace: that is
//! what keeps an instance from outliving a monitor killed by SIGKILL or the OOM killer.
//! When the restored root is that init itself ([`super::root_is_init`]), its
//! parent-death signal is the app's, visible to it (`PR_GET_PDEATHSIG`), and the restore
//! gives it back its recorded value (normally 0) as the app's last step. From before that
//! step the warden does init's part: a process outside the sandbox (in a process group of
//! its own, so signals to the monitor's group miss it) holding a pidfd of init and the
//! read end of a pipe whose only write end the monitor holds (close-on-exec). When the
//! write end goes (the monitor exited, whatever killed it, or dropped the instance) the
//! warden kills init (SIGKILL through the pidfd: no pid reuse can misdirect it); when
//! init exits first, the warden just exits.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use anyhow::{Context, Result};

/// The monitor's side: dropping it (or the monitor's death) has the warden kill the
/// instance, unless the instance is over already.
pub struct Warden {
    _tie: OwnedFd,
}

impl Warden {
    /// Forks the warden of the sandbox whose init's pidfd is `init`.
    pub fn spawn(init: BorrowedFd<'_>) -> Result<Warden> {
        let (r, w) = crate::sys::remote::pipe().context("pipe2 for the instance's warden")?;
        let keep = [init.as_raw_fd(), r.as_raw_fd()];
        // SAFETY: `warden_main` keeps to raw system calls on locals and never returns;
        // `keep` is a plain array copied into it.
        unsafe { crate::sys::orphan::spawn(keep, || warden_main(keep)) }
            .context("starting the instance's warden")?;
        drop(r);
        Ok(Warden { _tie: w })
    }
}

/// The warden's body (see [`crate::sys::orphan::spawn`]): only `init` (a pidfd) and
/// `tie` (the pipe's read end) are open; it waits for either to become readable (init exited; the monitor's end closed) and
/// kills init in the second case. No allocation: the monitor that forked it is
/// multi-threaded.
unsafe fn warden_main(keep: [RawFd; 2]) -> ! {
    let [init, tie] = keep;
    let mut fds = [
        libc::pollfd {
            fd: init,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: tie,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        if libc::poll(fds.as_mut_ptr(), 2, -1) < 0 {
            continue;
        }
        if fds[0].revents != 0 {
            libc::_exit(0);
        }
        if fds[1].revents != 0 {
            // Nothing is ever written: readable means every write end is closed.
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                init,
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0u32,
            );
            libc::_exit(0);
        }
    }
}
