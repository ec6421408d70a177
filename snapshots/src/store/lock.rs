//! The writer lock: `flock(LOCK_EX)` on `DIR/lock`, released when the guard drops.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use super::fsutil::io_err;
use super::StoreError;

#[derive(Debug)]
pub(crate) struct WriteLock {
    _file: File,
}

impl WriteLock {
    /// Blocks until no other writer (or gc) holds the store.
    pub(crate) fn acquire(path: &Path) -> Result<WriteLock, StoreError> {
        Self::acquire_waiting(path, &mut |_| {})
    }

    /// [`acquire`](Self::acquire); when the lock is held by another, `waiting(true)` is
    /// called before blocking for it and `waiting(false)` once it is ours.
    pub(crate) fn acquire_waiting(
        path: &Path,
        waiting: &mut dyn FnMut(bool),
    ) -> Result<WriteLock, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io_err("open lock file", path))?;
        let mut flags = libc::LOCK_EX | libc::LOCK_NB;
        loop {
            // SAFETY: flock takes integer arguments only; `file` keeps the fd open.
            if unsafe { libc::flock(file.as_raw_fd(), flags) } == 0 {
                if flags & libc::LOCK_NB == 0 {
                    waiting(false);
                }
                return Ok(WriteLock { _file: file });
            }
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock && flags & libc::LOCK_NB != 0 {
                waiting(true);
                flags = libc::LOCK_EX;
                continue;
            }
            if e.kind() != io::ErrorKind::Interrupted {
                if flags & libc::LOCK_NB == 0 {
                    waiting(false);
                }
                return Err(io_err("lock", path)(e));
            }
        }
    }
}
