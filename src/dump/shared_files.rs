//! Mapped files without a name: deleted files (POSIX semaphores and shared memory in
//! `/dev/shm` after `sem_unlink` / `shm_unlink`, unlinked scratch files) and memfds.
//!
//! Each such file is one object of the tree ([`SharedFile`]), keyed at dump by its
//! (device, inode): every mapping of it in any process becomes a
//! `VmaKind::SharedFile` and every fd on it a `FileDesc::SharedFile` naming the same
//! object, so that a restore creates the file once and shares it again. Its contents
//! are read once, through `/proc/PID/map_files` (the file itself, not one process's
//! view of it), skipping holes with `SEEK_DATA`, and go into the page store like
//! memory: deduplicated, zero pages not stored.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};

use anyhow::{Context, Result};
use warmstart_snapshots::model::{FileDesc, Process, SharedFile, PAGE_SIZE};
use warmstart_snapshots::PageWriter;

/// Largest piece of a file read at once.
const CHUNK: u64 = 8 << 20;

/// The objects met so far in the tree.
#[derive(Default)]
pub struct SharedFiles {
    files: Vec<SharedFile>,
    by_inode: HashMap<(u64, u64), u64>,
}

impl SharedFiles {
    /// The id of the file mapped at `path` (a `/proc/PID/map_files` link) whose last
    /// name was `name` (` (deleted)` removed); its contents are stored the first time.
    pub fn add(
        &mut self,
        path: &str,
        name: &str,
        memfd: bool,
        writer: &mut PageWriter<'_>,
    ) -> Result<u64> {
        let f = File::open(path).with_context(|| format!("opening {path}"))?;
        let meta = f.metadata().with_context(|| format!("stat of {path}"))?;
        if let Some(&id) = self.by_inode.get(&(meta.dev(), meta.ino())) {
            return Ok(id);
        }
        let seals = if memfd {
            // SAFETY: F_GET_SEALS takes no argument and reads no memory of ours; `f` keeps
            // the fd open for the call.
            let s = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GET_SEALS) };
            if s < 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("F_GET_SEALS of memfd {name}"));
            }
            s
        } else {
            0
        };
        let id = self.files.len() as u64;
        let mut obj = SharedFile {
            id,
            path: name.to_owned(),
            memfd,
            seals,
            owner: crate::fds::owner_of(&meta),
            size: meta.size(),
            pages: Vec::new(),
        };
        read_contents(&f, obj.size, &mut obj, writer)
            .with_context(|| format!("reading the contents of {name} ({path})"))?;
        self.files.push(obj);
        self.by_inode.insert((meta.dev(), meta.ino()), id);
        Ok(id)
    }

    /// Turns every fd of the tree that is an open of one of the objects (dumped as a
    /// deleted file or a memfd on its own) into an open of the object. `hosts[i]` is the
    /// pid of `processes[i]` as seen here.
    pub fn link_fds(&self, hosts: &[i32], processes: &mut [Process]) -> Result<()> {
        for (&host, p) in hosts.iter().zip(processes.iter_mut()) {
            for f in &mut p.fds {
                let (flags, pos) = match f.file {
                    FileDesc::Ghost { flags, pos, .. } | FileDesc::Memfd { flags, pos, .. } => {
                        (flags, pos)
                    }
                    _ => continue,
                };
                let link = format!("/proc/{host}/fd/{}", f.fd);
                let meta = std::fs::metadata(&link).with_context(|| format!("stat of {link}"))?;
                if let Some(&id) = self.by_inode.get(&(meta.dev(), meta.ino())) {
                    f.file = FileDesc::SharedFile { id, flags, pos };
                } else if crate::fds::mapped_by(host, &meta) {
                    // Its dump left the contents to the mapping, which must have met it.
                    anyhow::bail!(
                        "process {host} ({}): fd {} ({link}) is mapped, but no mapping of it \
                         was recorded",
                        p.comm,
                        f.fd
                    );
                }
            }
        }
        Ok(())
    }

    pub fn finish(self) -> Vec<SharedFile> {
        self.files
    }
}

/// Stores the data ranges of `f` (`size` bytes) as `obj.pages`.
fn read_contents(
    f: &File,
    size: u64,
    obj: &mut SharedFile,
    writer: &mut PageWriter<'_>,
) -> Result<()> {
    let page = PAGE_SIZE as u64;
    let mut buf = Vec::new();
    let mut at = 0u64;
    while at < size {
        let Some((start, end)) = next_data(f, at, size)? else {
            break;
        };
        // Whole pages: a data range starts and ends on page boundaries but for the tail.
        let mut pos = start / page * page;
        let end = end.div_ceil(page) * page;
        while pos < end {
            let n = (end - pos).min(CHUNK);
            buf.clear();
            buf.resize(n as usize, 0);
            let mut got = 0usize;
            while got < buf.len() {
                let k = f.read_at(&mut buf[got..], pos + got as u64)?;
                if k == 0 {
                    break; // the end of the file: the rest of the page reads as zero
                }
                got += k;
            }
            writer.add_pages(pos / page, &buf, &mut obj.pages)?;
            pos += n;
        }
        at = end;
    }
    Ok(())
}

/// The next range `[start, end)` holding data at or after `at`, by `SEEK_DATA` /
/// `SEEK_HOLE`; where those are not supported, everything from `at` is data.
fn next_data(f: &File, at: u64, size: u64) -> Result<Option<(u64, u64)>> {
    let fd = f.as_raw_fd();
    // SAFETY: lseek takes integer arguments only; `f` keeps the fd open for the call.
    let start = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        return match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            Some(libc::EINVAL) => Ok(Some((at, size))),
            _ => Err(std::io::Error::last_os_error()).context("lseek(SEEK_DATA)"),
        };
    }
    // SAFETY: as above: lseek takes integer arguments only, on an fd `f` keeps open.
    let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    if end < 0 {
        return Err(std::io::Error::last_os_error()).context("lseek(SEEK_HOLE)");
    }
    Ok(Some((start as u64, (end as u64).min(size))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    #[test]
    fn data_ranges_of_a_sparse_memfd() {
        // SAFETY: a NUL-terminated name; the new fd is owned by the File below.
        let fd = unsafe { libc::memfd_create(c"ws-sparse".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: memfd_create succeeded (checked above), so `fd` is fresh and owned by
        // nobody else; it is wrapped exactly once.
        let f = unsafe { File::from_raw_fd(fd) };
        let page = PAGE_SIZE as u64;
        f.set_len(16 * page).unwrap();
        f.write_all_at(b"x", 3 * page + 5).unwrap();
        f.write_all_at(&vec![7u8; 2 * PAGE_SIZE], 9 * page).unwrap();
        let mut ranges = Vec::new();
        let mut at = 0;
        while let Some((s, e)) = next_data(&f, at, 16 * page).unwrap() {
            ranges.push((s / page, e.div_ceil(page)));
            at = e;
            if at >= 16 * page {
                break;
            }
        }
        assert_eq!(ranges, vec![(3, 4), (9, 11)]);
    }
}
