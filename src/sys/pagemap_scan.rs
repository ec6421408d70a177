//! `PAGEMAP_SCAN` (`ioctl` on `/proc/PID/pagemap`, Linux 6.7+): page categories of a
//! range of another process in one call per batch of regions, optionally
//! write-protecting the matching pages (userfaultfd `WP_ASYNC` write tracking).

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`: `[start, end)` whose pages all have `categories`.
#[repr(C)]
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

const _: () = assert!(size_of::<PmScanArg>() == 96 && size_of::<Region>() == 24);

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 = (3 << 30) | (96 << 16) | (0x66 << 8) | 16;

/// Write-protect the pages that match (userfaultfd `WP_ASYNC` ranges).
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail (`EPERM`) unless every VMA of the range is registered with a `WP_ASYNC` uffd.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
/// Not write-protected by userfaultfd (written since the last write-protect).
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// A guard region's page (`MADV_GUARD_INSTALL`; the category exists since Linux 6.14).
pub const PAGE_IS_GUARD: u64 = 1 << 8;

/// What to ask: pages having all of `mask` and at least one of `anyof` (when non-zero)
/// match; each region reports the categories of `ret`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Query {
    pub flags: u64,
    pub mask: u64,
    pub anyof: u64,
    pub ret: u64,
}

/// Scans `[start, end)` of the process whose `pagemap` is `pagemap` and returns the
/// matching regions in address order (adjacent ones with equal categories merged).
pub fn scan(pagemap: impl AsFd, start: u64, end: u64, q: Query) -> io::Result<Vec<Region>> {
    let fd = pagemap.as_fd().as_raw_fd();
    let mut out: Vec<Region> = Vec::new();
    let mut buf = vec![Region::default(); 512];
    let mut at = start;
    while at < end {
        let mut a = PmScanArg {
            size: size_of::<PmScanArg>() as u64,
            flags: q.flags,
            start: at,
            end,
            vec: buf.as_mut_ptr() as u64,
            vec_len: buf.len() as u64,
            category_mask: q.mask,
            category_anyof_mask: q.anyof,
            return_mask: q.ret,
            ..Default::default()
        };
        // SAFETY: `a` is a live pm_scan_arg of the size it declares; its `vec` points at
        // `buf`, a live vector of `vec_len` page_regions the kernel fills (and nothing
        // else), exclusively borrowed for the call.
        let n = unsafe { libc::ioctl(fd, PAGEMAP_SCAN as libc::Ioctl, &mut a) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for r in &buf[..n as usize] {
            match out.last_mut() {
                Some(l) if l.end == r.start && l.categories == r.categories => l.end = r.end,
                _ => out.push(*r),
            }
        }
        if a.walk_end <= at {
            return Err(io::Error::other("PAGEMAP_SCAN made no progress"));
        }
        at = a.walk_end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_own_present_pages() {
        let len = 8 * 4096;
        // SAFETY: a fresh private anonymous mapping the kernel places; unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: offsets 1 and 5 pages are inside the 8-page read-write mapping above.
        unsafe {
            (p as *mut u8).add(4096).write_volatile(1);
            (p as *mut u8).add(5 * 4096).write_volatile(1);
        }
        let f = std::fs::File::open("/proc/self/pagemap").unwrap();
        let base = p as u64;
        let q = Query {
            mask: PAGE_IS_PRESENT,
            ret: PAGE_IS_PRESENT,
            ..Default::default()
        };
        let r = scan(&f, base, base + len as u64, q).unwrap();
        let got: Vec<(u64, u64)> = r
            .iter()
            .map(|r| ((r.start - base) / 4096, (r.end - base) / 4096))
            .collect();
        assert_eq!(got, [(1, 2), (5, 6)]);
        // SAFETY: exactly the mapping made above; nothing refers into it any more.
        unsafe { libc::munmap(p, len) };
    }
}
