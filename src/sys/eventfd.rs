//! An eventfd used to wake a thread that polls (non-blocking, close-on-exec).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> std::io::Result<EventFd> {
        // SAFETY: eventfd takes integer arguments only; the fd it returns is checked and
        // wrapped below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: eventfd succeeded, so `fd` is a fresh descriptor nothing else owns; it
        // is wrapped exactly once.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Adds one to the count: the fd polls readable. (It can only fail when the count is
    /// about to overflow, which leaves it readable anyway.)
    pub fn signal(&self) {
        let one = 1u64;
        // SAFETY: the source is `one`, a live u64 (8 bytes, only read); the fd is borrowed
        // from the OwnedFd self holds.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the count to zero: the fd no longer polls readable.
    pub fn reset(&self) {
        let mut n = 0u64;
        // SAFETY: `n` is a live u64 the 8-byte read writes; the fd is borrowed from the
        // OwnedFd self holds.
        unsafe { libc::read(self.0.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_makes_it_readable_and_reset_clears_it() {
        let e = EventFd::new().unwrap();
        let readable = || {
            let mut p = libc::pollfd {
                fd: e.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live, initialised pollfd; zero timeout.
            unsafe { libc::poll(&mut p, 1, 0) == 1 }
        };
        assert!(!readable());
        e.signal();
        e.signal();
        assert!(readable());
        e.reset();
        assert!(!readable());
    }
}
