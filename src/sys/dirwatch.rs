//! Whether a few directories changed since last asked (inotify): what lets a `serve`
//! daemon keep the store's names and ids between requests instead of listing the store
//! (and reading every name) for each one.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Every change to a directory's entries, to an entry written in place, or to the
/// directory itself.
const MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_CLOSE_WRITE
    | libc::IN_MODIFY
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

/// A non-blocking inotify instance.
pub struct DirWatch {
    fd: OwnedFd,
}

impl DirWatch {
    pub fn new() -> io::Result<DirWatch> {
        // SAFETY: a plain syscall; the fd returned is owned right below.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the call above succeeded: a new descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(DirWatch { fd })
    }

    /// Watches `dir` (again: watching a directory already watched is a no-op). Changes
    /// made after this returns are seen by [`Self::changed`].
    pub fn watch(&self, dir: &Path) -> io::Result<()> {
        let c = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `c` is a live NUL-terminated path; the fd is our inotify instance.
        if unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), MASK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether anything happened in the watched directories since the last call (or
    /// since they were watched): every queued event is read and dropped. A queue
    /// overflow, a watch the kernel dropped (directory deleted) and a failed read all
    /// count as changes.
    pub fn changed(&self) -> bool {
        let mut buf = [0u8; 4096];
        let mut any = false;
        loop {
            // SAFETY: `buf` is a live buffer of the length given; the kernel writes whole
            // events into it.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                any = true;
                continue;
            }
            if n == 0 {
                return any;
            }
            match io::Error::last_os_error().kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return any,
                _ => return true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_entries_made_renamed_and_removed() {
        let d = tempfile::tempdir().unwrap();
        let w = DirWatch::new().unwrap();
        w.watch(d.path()).unwrap();
        assert!(!w.changed(), "nothing happened yet");
        std::fs::write(d.path().join("a.tmp"), b"x").unwrap();
        assert!(w.changed());
        assert!(!w.changed(), "events are read once");
        std::fs::rename(d.path().join("a.tmp"), d.path().join("a")).unwrap();
        assert!(w.changed());
        std::fs::remove_file(d.path().join("a")).unwrap();
        assert!(w.changed());
        assert!(!w.changed());
        // A second watch of the same directory changes nothing.
        w.watch(d.path()).unwrap();
        assert!(!w.changed());
    }
}
