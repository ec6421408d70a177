//! A process that holds a copy of an instance's userfaultfd until the instance is gone.
//!
//! When the last copy of a userfaultfd is closed, the kernel unregisters its ranges and
//! wakes the faulting threads, which then map zero pages where the snapshot's memory was
//! to come. If the monitor dies (SIGKILL, OOM), its copy goes in its `exit_files`, before
//! the sandbox's init gets its PDEATHSIG and takes the instance down: a window in which
//! the app could run on zeros. The keeper closes that window: it lives outside the
//! sandbox (in a process group of its own, so signals to the monitor's group miss it)
//! and lets go of its copy only when the monitor says it has finished serving, or when
//! the sandbox's init has exited (which happens only after every process in the
//! sandbox is gone). Meanwhile faults simply stay blocked.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use anyhow::{Context, Result};

pub struct Keeper {
    /// [`DONE`]: the monitor is done and the keeper may let go; [`HOLD`] with fds
    /// attached: keep these too. Closed without `DONE` (the monitor died or gave up): it
    /// holds on until the instance is gone.
    done: Option<OwnedFd>,
}

const HOLD: u8 = 0;
const DONE: u8 = 1;

impl Keeper {
    /// Forks the keeper, giving it `uffd` and the pidfd of the sandbox's `init`.
    pub fn spawn(uffd: BorrowedFd<'_>, init: BorrowedFd<'_>) -> Result<Keeper> {
        // A socket, not a pipe: writing after the keeper is gone must not raise SIGPIPE.
        let (done_r, done_w) =
            crate::sys::remote::socketpair().context("socketpair for the uffd keeper")?;
        let keep = [uffd.as_raw_fd(), init.as_raw_fd(), done_r.as_raw_fd()];
        // Forked twice, so that it is nobody's child here (the monitor's only child stays
        // the sandbox's init, and nothing needs to reap the keeper). The monitor is
        // multi-threaded: the children only make raw syscalls.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error()).context("forking the uffd keeper");
        }
        if pid == 0 {
            unsafe {
                if libc::fork() == 0 {
                    keeper_main(keep)
                }
                libc::_exit(0)
            }
        }
        let mut status = 0;
        unsafe { libc::waitpid(pid, &mut status, 0) };
        if !libc::WIFEXITED(status) {
            anyhow::bail!("the uffd keeper's parent died: status {status:#x}");
        }
        Ok(Keeper { done: Some(done_w) })
    }

    /// A way to hand the keeper more userfaultfds (of forked children) to hold.
    pub fn holder(&self) -> Result<impl FnMut(BorrowedFd<'_>) -> std::io::Result<()> + Send> {
        let link = self
            .done
            .as_ref()
            .context("the uffd keeper was released")?
            .try_clone()
            .context("duplicating the uffd keeper's socket")?;
        Ok(move |fd: BorrowedFd<'_>| {
            crate::sys::scm::send(link.as_fd(), &[HOLD], &[fd.as_raw_fd()])
        })
    }

    /// The page server has finished: the keeper closes its copies and exits.
    pub fn release(&mut self) {
        if let Some(d) = self.done.take() {
            unsafe { libc::send(d.as_raw_fd(), [DONE].as_ptr().cast(), 1, libc::MSG_NOSIGNAL) };
        }
    }
}

/// The keeper's body: only `keep` stays open; waits for [`DONE`] on the socket or for
/// init's exit, keeping whatever fds come with [`HOLD`]s. No allocation: the monitor that
/// forked it is multi-threaded.
unsafe fn keeper_main(keep: [RawFd; 3]) -> ! {
    let [_uffd, init, done] = keep;
    libc::setpgid(0, 0);
    let mut sorted = keep;
    sorted.sort_unstable();
    let mut from = 0u32;
    for fd in sorted {
        if fd as u32 > from {
            libc::syscall(libc::SYS_close_range, from, fd as u32 - 1, 0u32);
        }
        from = fd as u32 + 1;
    }
    libc::syscall(libc::SYS_close_range, from, u32::MAX, 0u32);
    let mut fds = [
        libc::pollfd {
            fd: init,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: done,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let mut n = 2;
    loop {
        if libc::poll(fds.as_mut_ptr(), n, -1) < 0 {
            continue;
        }
        if fds[0].revents != 0 {
            libc::_exit(0);
        }
        if n == 2 && fds[1].revents != 0 {
            // One byte per message, so a HOLD's fds are never read along with a DONE.
            let mut b = 0u8;
            let mut iov = libc::iovec {
                iov_base: (&mut b as *mut u8).cast(),
                iov_len: 1,
            };
            let mut control = [0u64; 16];
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control);
            // The fds a HOLD carries are now ours, and stay open until we exit.
            match libc::recvmsg(done, &mut msg, 0) {
                1 if b == DONE => libc::_exit(0),
                1 => {}
                r if r < 0 && *libc::__errno_location() == libc::EINTR => {}
                // EOF: the monitor is gone without finishing; hold on.
                _ => n = 1,
            }
        }
    }
}
