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

/// One keeper serves every page server of an instance (each process of a tree has its
/// own): forking one per process cost milliseconds each.
pub struct Keeper {
    /// Messages of [`MSG_LEN`] bytes, op then space id: [`DONE`]: a page server is done
    /// (after as many as the keeper was started for, it lets go); [`HOLD`] with an fd
    /// attached: keep this space's; [`DROP`]: that space is finished (all its memory in),
    /// close its copy — a registration kept alive past that would block the process's
    /// next munmap, mremap, fork or MADV_DONTNEED on an event nobody reads. Closed
    /// without every `DONE` (the monitor died or gave up): it holds on until the instance
    /// is gone.
    sock: OwnedFd,
}

/// One page server's share of the [`Keeper`]: its spaces are `server << 32 | n`.
pub struct Share {
    sock: Option<OwnedFd>,
    prefix: u64,
}

const HOLD: u8 = 0;
const DONE: u8 = 1;
const DROP: u8 = 2;
const MSG_LEN: usize = 9;
/// Space ids the keeper tracks for [`DROP`]; fds beyond are held until the end.
const TRACKED: usize = 1024;

fn message(op: u8, space: u64) -> [u8; MSG_LEN] {
    let mut m = [0u8; MSG_LEN];
    m[0] = op;
    m[1..].copy_from_slice(&space.to_le_bytes());
    m
}

/// The monitor's side of the keeper's socket, for the page server: hands over and
/// retires the userfaultfds of forked children.
pub struct Link {
    sock: OwnedFd,
    prefix: u64,
}

impl crate::lazy::SpaceKeeper for Link {
    fn hold(&mut self, space: u64, uffd: BorrowedFd<'_>) -> std::io::Result<()> {
        crate::sys::scm::send(
            self.sock.as_fd(),
            &message(HOLD, self.prefix | space),
            &[uffd.as_raw_fd()],
        )
    }
    fn retire(&mut self, space: u64) {
        // A keeper gone already needs nothing.
        let _ = crate::sys::scm::send(self.sock.as_fd(), &message(DROP, self.prefix | space), &[]);
    }
}

impl Keeper {
    /// Forks the keeper for `servers` page servers, giving it the pidfd of the sandbox's
    /// `init`; each server then joins with its userfaultfd ([`Keeper::share`]).
    pub fn spawn(init: BorrowedFd<'_>, servers: u32) -> Result<Keeper> {
        // A socket, not a pipe: writing after the keeper is gone must not raise SIGPIPE;
        // SEQPACKET keeps each message (and its fd) whole.
        let (done_r, done_w) =
            crate::sys::scm::seqpacket_pair().context("socketpair for the uffd keeper")?;
        let keep = [init.as_raw_fd(), done_r.as_raw_fd()];
        // SAFETY: `keeper_main` keeps to raw system calls on stack buffers and never
        // returns; `keep` and `servers` are plain values copied into it.
        unsafe { crate::sys::orphan::spawn(keep, || keeper_main(keep, servers)) }
            .context("starting the uffd keeper")?;
        Ok(Keeper { sock: done_w })
    }

    /// Page server number `server` joins: the keeper holds `uffd` (its process's own
    /// space) from now on.
    pub fn share(&self, server: u32, uffd: BorrowedFd<'_>) -> Result<Share> {
        let sock = self
            .sock
            .try_clone()
            .context("duplicating the uffd keeper's socket")?;
        let prefix = u64::from(server) << 32;
        crate::sys::scm::send(sock.as_fd(), &message(HOLD, prefix), &[uffd.as_raw_fd()])
            .context("handing the userfaultfd to the uffd keeper")?;
        Ok(Share {
            sock: Some(sock),
            prefix,
        })
    }
}

impl Share {
    /// The page server's way to hand the keeper the userfaultfds of forked children.
    pub fn link(&self) -> Result<Link> {
        let sock = self
            .sock
            .as_ref()
            .context("the uffd keeper was released")?
            .try_clone()
            .context("duplicating the uffd keeper's socket")?;
        Ok(Link {
            sock,
            prefix: self.prefix,
        })
    }

    /// The page server has finished: once every server has, the keeper closes its
    /// copies and exits.
    pub fn release(&mut self) {
        if let Some(d) = self.sock.take() {
            let _ = crate::sys::scm::send(d.as_fd(), &message(DONE, self.prefix), &[]);
        }
    }
}

/// The keeper's body (see [`crate::sys::orphan::spawn`]): only `keep` is open; waits for `servers` [`DONE`]s on the socket
/// or for init's exit, holding the fds [`HOLD`]s bring until their [`DROP`]. No
/// allocation: the monitor that forked it is multi-threaded.
unsafe fn keeper_main(keep: [RawFd; 2], servers: u32) -> ! {
    let [init, done] = keep;
    let mut finished = 0u32;
    // Room for as many held fds as the limit allows.
    let mut lim: libc::rlimit = std::mem::zeroed();
    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let mut held = [(0u64, -1 as RawFd); TRACKED];
    let mut count = 0usize;
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
            let mut m = [0u8; MSG_LEN];
            let mut iov = libc::iovec {
                iov_base: m.as_mut_ptr().cast(),
                iov_len: MSG_LEN,
            };
            let mut control = [0u64; 16];
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control);
            let r = libc::recvmsg(done, &mut msg, 0);
            if r < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            if r != MSG_LEN as isize {
                // EOF: the monitor is gone without finishing; hold on.
                n = 1;
                continue;
            }
            let space = u64::from_le_bytes(m[1..].try_into().unwrap_or([0; 8]));
            match m[0] {
                DONE => {
                    finished += 1;
                    if finished >= servers {
                        libc::_exit(0)
                    }
                }
                HOLD => {
                    let c = libc::CMSG_FIRSTHDR(&msg);
                    if !c.is_null()
                        && (*c).cmsg_level == libc::SOL_SOCKET
                        && (*c).cmsg_type == libc::SCM_RIGHTS
                    {
                        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<RawFd>());
                        // Untracked past TRACKED: held to the end.
                        if count < TRACKED {
                            held[count] = (space, fd);
                            count += 1;
                        }
                    }
                }
                DROP => {
                    if let Some(i) = held[..count].iter().position(|&(s, _)| s == space) {
                        libc::close(held[i].1);
                        held[i] = held[count - 1];
                        count -= 1;
                    }
                }
                _ => {}
            }
        }
    }
}
