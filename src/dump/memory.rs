//! Which pages of a VMA belong in the snapshot, and reading them out of the target.
//!
//! `/proc/PID/pagemap` gives one word per page: bit 63 present, 62 swapped, 61 file-page
//! or shared-anon, 56 exclusively mapped. Private anonymous memory needs every present or
//! swapped page; a private file mapping only the pages that are no longer the file's
//! (present with bit 61 clear, i.e. copied on write, or swapped).
//!
//! Exclusive pages are read with `process_vm_readv` in large iovecs; pages that are not
//! exclusive (shared copy-on-write with a parent or child) through `/proc/PID/mem`,
//! because `process_vm_readv` would break the sharing in the target.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use warmstart_snapshots::model::PAGE_SIZE;

use crate::sys::pagemap_scan as pms;

/// VMAs of at least this many pages are scanned with `PAGEMAP_SCAN` first.
const SCAN_FIRST_PAGES: u64 = 4096;

const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;
const PM_EXCLUSIVE: u64 = 1 << 56;
/// A guard region's page (`MADV_GUARD_INSTALL`, Linux 6.13): no page, a marker that
/// makes every access fault. Nothing records it but the page table.
const PM_GUARD_REGION: u64 = 1 << 58;

/// Pages of one VMA that must be saved, as runs of (first page index, count, exclusive).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub runs: Vec<(u64, u64, bool)>,
}

impl Wanted {
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|r| r.1).sum()
    }
}

pub struct Target {
    pid: i32,
    pagemap: File,
    mem: File,
}

impl Target {
    pub fn open(pid: i32) -> io::Result<Target> {
        Ok(Target {
            pid,
            pagemap: File::open(format!("/proc/{pid}/pagemap"))?,
            mem: File::open(format!("/proc/{pid}/mem"))?,
        })
    }

    /// Scans pagemap for `[start, end)` and returns the pages to save. A large VMA is
    /// first scanned for its populated ranges with `PAGEMAP_SCAN` (the kernel skips
    /// holes by whole page tables: a runtime's heap reservation is gigabytes, mostly
    /// never touched), and only those read from pagemap.
    pub fn wanted(&self, start: u64, end: u64, file_backed: bool) -> io::Result<Wanted> {
        let mut out = Wanted::default();
        if (end - start) / PAGE_SIZE as u64 >= SCAN_FIRST_PAGES {
            let q = pms::Query {
                flags: 0,
                mask: 0,
                anyof: pms::PAGE_IS_PRESENT | pms::PAGE_IS_SWAPPED | pms::PAGE_IS_GUARD,
                ret: pms::PAGE_IS_PRESENT | pms::PAGE_IS_SWAPPED | pms::PAGE_IS_GUARD,
            };
            // Without PAGEMAP_SCAN (before Linux 6.7), or without its guard category
            // (before 6.14: EINVAL), the whole VMA is read below.
            if let Ok(regions) = pms::scan(&self.pagemap, start, end, q) {
                for r in regions {
                    self.wanted_in(start, r.start, r.end, file_backed, &mut out)?;
                }
                return Ok(out);
            }
        }
        self.wanted_in(start, start, end, file_backed, &mut out)?;
        Ok(out)
    }

    /// Adds to `out` the pages to save of `[from, to)`, inside the VMA at `vma_start`
    /// (page indexes are the VMA's).
    fn wanted_in(
        &self,
        vma_start: u64,
        from: u64,
        to: u64,
        file_backed: bool,
        out: &mut Wanted,
    ) -> io::Result<()> {
        let pages = (to - from) / PAGE_SIZE as u64;
        let skip = (from - vma_start) / PAGE_SIZE as u64;
        let mut buf = vec![0u8; 8 * 4096.min(pages as usize)];
        let mut done = 0u64;
        while done < pages {
            let n = (pages - done).min(4096);
            let bytes = &mut buf[..(n * 8) as usize];
            let off = (from / PAGE_SIZE as u64 + done) * 8;
            self.pagemap.read_exact_at(bytes, off)?;
            for (i, w) in bytes.chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(w.try_into().unwrap());
                if e & PM_GUARD_REGION != 0 {
                    let at = vma_start + (skip + done + i as u64) * PAGE_SIZE as u64;
                    return Err(io::Error::other(format!(
                        "the page at {at:x} is a guard region (madvise MADV_GUARD_INSTALL), \
                         which warmstart cannot checkpoint yet (a restore would make it \
                         ordinary memory)"
                    )));
                }
                let keep = if file_backed {
                    (e & PM_PRESENT != 0 && e & PM_FILE == 0) || e & PM_SWAPPED != 0
                } else {
                    e & (PM_PRESENT | PM_SWAPPED) != 0
                };
                if !keep {
                    continue;
                }
                let excl = e & PM_EXCLUSIVE != 0 && e & PM_PRESENT != 0;
                let idx = skip + done + i as u64;
                match out.runs.last_mut() {
                    Some(r) if r.0 + r.1 == idx && r.2 == excl => r.1 += 1,
                    _ => out.runs.push((idx, 1, excl)),
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `addr` of the target.
    pub fn read(&self, addr: u64, buf: &mut [u8], exclusive: bool) -> io::Result<()> {
        if exclusive {
            let mut done = 0usize;
            while done < buf.len() {
                let local = libc::iovec {
                    iov_base: buf[done..].as_mut_ptr().cast(),
                    iov_len: buf.len() - done,
                };
                let remote = libc::iovec {
                    iov_base: (addr as usize + done) as *mut libc::c_void,
                    iov_len: buf.len() - done,
                };
                // SAFETY: `local` is buf[done..], exclusively borrowed and writable, never
                // overrun; `remote` is in the target's address space, checked by the kernel
                // (when the target is this process, the test, it is only read).
                let n = unsafe { libc::process_vm_readv(self.pid, &local, 1, &remote, 1, 0) };
                if n <= 0 {
                    // Partial reads stop at a page the kernel could not fault in; finish
                    // through /proc/PID/mem which reports the precise error.
                    break;
                }
                done += n as usize;
            }
            if done == buf.len() {
                return Ok(());
            }
            return self.mem.read_exact_at(&mut buf[done..], addr + done as u64);
        }
        self.mem.read_exact_at(buf, addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_anonymous_pages_are_found_and_read() {
        let len = 16 * PAGE_SIZE;
        // SAFETY: a fresh private anonymous mapping at an address the kernel picks; it
        // replaces nothing and is ours alone.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as *mut u8;
        assert_ne!(p as isize, -1);
        // SAFETY: mmap succeeded (checked above); offsets 2, 3 and 9 pages are inside the
        // 16-page read-write mapping, which nothing else references.
        unsafe {
            *p.add(2 * PAGE_SIZE) = 7;
            *p.add(3 * PAGE_SIZE) = 8;
            *p.add(9 * PAGE_SIZE) = 9;
        }
        let t = Target::open(std::process::id() as i32).unwrap();
        let start = p as u64;
        let w = t.wanted(start, start + len as u64, false).unwrap();
        // Page by page: runs are split where the pages' exclusive bit differs, which
        // another test's fork (tests are threads of one process) can change mid-read.
        assert_eq!(
            w.runs
                .iter()
                .flat_map(|r| r.0..r.0 + r.1)
                .collect::<Vec<_>>(),
            vec![2, 3, 9]
        );
        let mut buf = vec![0u8; 2 * PAGE_SIZE];
        t.read(start + 2 * PAGE_SIZE as u64, &mut buf, true)
            .unwrap();
        assert_eq!((buf[0], buf[PAGE_SIZE]), (7, 8));
        t.read(start + 9 * PAGE_SIZE as u64, &mut buf[..PAGE_SIZE], false)
            .unwrap();
        assert_eq!(buf[0], 9);
        // SAFETY: exactly the mapping made above; `buf` holds copies, so nothing refers
        // to it any more.
        unsafe { libc::munmap(p.cast(), len) };
    }

    #[test]
    fn a_large_sparse_vma_gives_the_pages_a_whole_pagemap_read_gives() {
        let pages = 3 * SCAN_FIRST_PAGES as usize;
        let len = pages * PAGE_SIZE;
        // SAFETY: a fresh private anonymous mapping at an address the kernel picks; it
        // replaces nothing and is ours alone.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        } as *mut u8;
        assert_ne!(p as isize, -1);
        // SAFETY: advice on the mapping made above; one page touched is one page present.
        unsafe { libc::madvise(p.cast(), len, libc::MADV_NOHUGEPAGE) };
        let touched = [0, 5, 6, 4095, 4096, 5000, 12287];
        for &i in &touched {
            // SAFETY: mmap succeeded (checked above); every index is below `pages`.
            unsafe { p.add(i * PAGE_SIZE).write_volatile(1) };
        }
        let t = Target::open(std::process::id() as i32).unwrap();
        let start = p as u64;
        let end = start + len as u64;
        let scanned = t.wanted(start, end, false).unwrap();
        let mut whole = Wanted::default();
        t.wanted_in(start, start, end, false, &mut whole).unwrap();
        // The same pages. Not compared: whether each is mapped by this process alone
        // (which also splits runs), as another test's fork (tests are threads of one
        // process) changes that between the reads, or during one.
        let pages =
            |w: &Wanted| -> Vec<u64> { w.runs.iter().flat_map(|r| r.0..r.0 + r.1).collect() };
        assert_eq!(pages(&scanned), pages(&whole));
        assert_eq!(pages(&scanned), touched.map(|i| i as u64));
        // SAFETY: exactly the mapping made above, referenced nowhere else.
        unsafe { libc::munmap(p.cast(), len) };
    }
}
