//! Copy-on-write breaks done at parking, not in an instance's first request.
//!
//! An instance forked from a template shares the snapshot's pages with it until it
//! writes them; its first request writes some hundreds of them (a Python server's
//! ~900, 2–3 ms of copy-on-write faults on a small host, all in its time to first
//! response). Once an instance of a snapshot has answered its first request and gone
//! quiet, [`written`] lists the pages of its app that are its own now (present, mapped
//! only by it) in its private writable areas; each instance parked after that gets its
//! own copy of those of them it still shares ([`copy_shared`]): their bytes read and
//! written back by the daemon while the instance is stopped, before it is offered. The
//! instance's memory holds exactly the same bytes, at the same addresses with the same
//! protections; only where the kernel keeps them changes (a page of its own, as after
//! its first request), and that was paid while no request waited.
//!
//! Its code is the same story for reads: a fork copies no page-table entry of a
//! read-only file mapping (the program's and its libraries' code and constants), so
//! each instance takes a fault for every 64 KiB of code its first request runs (Node's
//! HTTP path: ~100-180 faults, ~2 ms). [`mapped`] lists the pages of those mappings an
//! instance has in its page tables after its first request; [`map_files`] has each
//! parked instance's kernel map them (read through, a byte a page) before it is
//! offered. Nothing of its memory changes: a read-only file page mapped is the file's
//! page it would have faulted in.

use std::io;
use std::os::unix::fs::FileExt;

use crate::sys::maps::MapEntry;

const PAGE: u64 = 4096;
/// `/proc/PID/pagemap` entry bits: the page is present, and mapped by this process only.
const PM_PRESENT: u64 = 1 << 63;
const PM_EXCLUSIVE: u64 = 1 << 56;
/// The most bytes copied in one read and write.
const CHUNK: u64 = 256 * PAGE;

/// Page ranges `[start, end)` of one process, sorted, not overlapping.
pub type Ranges = Vec<(u64, u64)>;

/// The areas whose pages may be copied: private and writable, not the kernel's
/// (`[vvar]`, `[vdso]`, `[vsyscall]`).
fn copyable(m: &MapEntry) -> bool {
    m.write && m.read && !m.shared && !m.name.starts_with("[v")
}

/// The areas whose pages are mapped ahead: read-only private mappings of a file (code
/// and constants; a writable one's pages the instance wrote are [`written`]'s, and
/// those it only read keep their entries across a fork once any page of it is its own).
/// Only a regular file's: not a memfd's, a device's or a deleted file's (shared memory
/// may be served by the instance's page server; reading it ahead would only wait on it).
fn file_read_only(m: &MapEntry) -> bool {
    !m.write
        && !m.shared
        && (m.read || m.exec)
        && m.name.starts_with('/')
        && !m.name.starts_with("/memfd:")
        && !m.name.starts_with("/dev/")
        && !m.name.ends_with(" (deleted)")
}

/// The pagemap entries of `pid` for `[start, end)`, one per page.
fn pagemap(file: &std::fs::File, start: u64, end: u64) -> io::Result<Vec<u64>> {
    let mut raw = vec![0u8; ((end - start) / PAGE * 8) as usize];
    file.read_exact_at(&mut raw, start / PAGE * 8)?;
    Ok(raw
        .chunks_exact(8)
        .map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
        .collect())
}

/// Runs of consecutive pages of `[start, end)` whose pagemap entry `keep` accepts.
fn runs(
    file: &std::fs::File,
    start: u64,
    end: u64,
    keep: impl Fn(u64) -> bool,
    out: &mut Ranges,
) -> io::Result<()> {
    for (i, e) in pagemap(file, start, end)?.into_iter().enumerate() {
        if !keep(e) {
            continue;
        }
        let addr = start + i as u64 * PAGE;
        match out.last_mut() {
            Some((_, end)) if *end == addr => *end += PAGE,
            _ => out.push((addr, addr + PAGE)),
        }
    }
    Ok(())
}

/// The pages of process `pid`'s private writable areas that are present and its own
/// (mapped by no other process): after an instance's first request, what it wrote of
/// what it shared with its template, and what it has on its own anyway.
pub fn written(pid: i32) -> io::Result<Ranges> {
    pages_in(pid, &everywhere(), copyable, |e| {
        e & PM_PRESENT != 0 && e & PM_EXCLUSIVE != 0
    })
}

/// The whole address space, as [`Ranges`].
fn everywhere() -> Ranges {
    vec![(0, u64::MAX)]
}

/// The runs of the pages of `pages` in process `pid`'s areas that `area` accepts whose
/// pagemap entry `keep` accepts.
fn pages_in(
    pid: i32,
    pages: &Ranges,
    area: impl Fn(&MapEntry) -> bool,
    keep: impl Fn(u64) -> bool,
) -> io::Result<Ranges> {
    let maps = crate::sys::maps::read_maps(pid)?;
    let file = std::fs::File::open(format!("/proc/{pid}/pagemap"))?;
    let mut out = Ranges::new();
    for &(start, end) in pages {
        for m in maps
            .iter()
            .filter(|m| area(m) && m.start < end && start < m.end)
        {
            runs(&file, start.max(m.start), end.min(m.end), &keep, &mut out)?;
        }
    }
    Ok(out)
}

/// The pages of process `pid`'s read-only file mappings that are in its page tables:
/// after an instance's first request, the code and constants it ran and read.
pub fn mapped(pid: i32) -> io::Result<Ranges> {
    pages_in(pid, &everywhere(), file_read_only, |e| e & PM_PRESENT != 0)
}

/// Has the kernel map into stopped process `pid` each page of `pages` in a read-only
/// file mapping that is not in its page tables yet, by reading a byte of it
/// (`process_vm_readv` faults it in for `pid`, and its neighbours with it, as a fault
/// of `pid`'s own would). Its memory is unchanged. The pages it had not mapped.
pub fn map_files(pid: i32, pages: &Ranges) -> io::Result<u64> {
    let missing = pages_in(pid, pages, file_read_only, |e| e & PM_PRESENT == 0)?;
    let addrs: Vec<u64> = missing
        .iter()
        .flat_map(|&(s, e)| (s..e).step_by(PAGE as usize))
        .collect();
    crate::sys::remote::touch(pid, &addrs)?;
    Ok(addrs.len() as u64)
}

/// Gives stopped process `pid` its own copy of each page of `pages` that it still
/// shares (present, mapped by others too) in a private writable area: the bytes read
/// and written back as they are. `pid` must not run meanwhile (a parked instance, every
/// thread stopped) and no other process may write those pages (a template never runs).
/// The pages copied.
pub fn copy_shared(pid: i32, pages: &Ranges) -> io::Result<u64> {
    let shared = pages_in(pid, pages, copyable, |e| {
        e & PM_PRESENT != 0 && e & PM_EXCLUSIVE == 0
    })?;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut copied = 0;
    for (start, end) in shared {
        let mut at = start;
        while at < end {
            let len = (end - at).min(CHUNK);
            let b = &mut buf[..len as usize];
            crate::sys::remote::read(pid, at, b)?;
            crate::sys::remote::write(pid, at, b)?;
            copied += len / PAGE;
            at += len;
        }
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// A page shared with a forked child is not the parent's own; once the parent
    /// writes it back as it is (what `copy_shared` does to a stopped instance), it is,
    /// with the same bytes.
    #[test]
    fn a_shared_page_copied_keeps_its_bytes_and_becomes_own() {
        in_child(shared_page_copied);
    }

    /// Runs `f` in a forked child of the test process and fails if it did: in the child
    /// no other test's fork (tests are threads of one process) shares its pages with a
    /// process of its own while it looks at which pages are its own.
    fn in_child(f: fn()) {
        // SAFETY: the child runs `f` and leaves with `_exit`; glibc's fork resets its
        // allocator's locks in the child, so `f` may allocate (and panic).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let ok = std::panic::catch_unwind(f).is_ok();
            // SAFETY: ends the child without running the harness's code or destructors.
            unsafe { libc::_exit(i32::from(!ok)) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child; `status` is a live local.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the test failed in its child (status {status:#x}; its panic is above)"
        );
    }

    fn shared_page_copied() {
        let len = 4 * PAGE as usize;
        // SAFETY: a new private anonymous mapping; nothing else refers to it.
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
        let addr = p as u64;
        // SAFETY: `p` is our mapping of `len` bytes.
        let mem = unsafe { std::slice::from_raw_parts_mut(p.cast::<u8>(), len) };
        for (i, b) in mem.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let me = std::process::id() as i32;
        let own = |pages: &Ranges| {
            pages
                .iter()
                .filter(|(s, e)| *s < addr + len as u64 && addr < *e)
                .map(|(s, e)| (e.min(&(addr + len as u64)) - s.max(&addr)) / PAGE)
                .sum::<u64>()
        };
        assert_eq!(own(&written(me).unwrap()), 4, "all 4 pages are ours alone");
        // A child shares them (copy-on-write) while it waits.
        let (rd, wr) = crate::sys::remote::pipe().unwrap();
        let (rd_fd, wr_fd) = (rd.as_raw_fd(), wr.as_raw_fd());
        // SAFETY: the child only closes, blocks in read(2) and exits: async-signal-safe
        // calls, no allocation or lock.
        let child = unsafe { libc::fork() };
        if child == 0 {
            let mut b = [0u8; 1];
            // SAFETY: closing our copy of the write end (so that the parent's close ends
            // the read), reading one byte into a local buffer, then exiting.
            unsafe {
                libc::close(wr_fd);
                libc::read(rd_fd, b.as_mut_ptr().cast(), 1);
                libc::_exit(0);
            }
        }
        assert!(child > 0);
        assert_eq!(own(&written(me).unwrap()), 0, "shared with the child");
        let copied = copy_shared(me, &vec![(addr, addr + 2 * PAGE)]).unwrap();
        assert_eq!(copied, 2);
        assert_eq!(own(&written(me).unwrap()), 2, "the 2 copied pages are ours");
        for (i, b) in mem.iter().enumerate() {
            assert_eq!(*b, (i % 251) as u8, "byte {i}");
        }
        drop(wr);
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(child, &mut status, 0) };
        // SAFETY: our mapping, no longer borrowed.
        unsafe { libc::munmap(p, len) };
    }

    /// A new private read-only mapping of the first `len` bytes of `f`.
    fn map_read_only(f: &std::fs::File, len: usize) -> *mut libc::c_void {
        // SAFETY: a new mapping the kernel places; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p
    }

    /// Pages of a read-only file mapping not yet touched are not mapped; `map_files` has
    /// the kernel map them (every page asked for, with the file's bytes), and `mapped`
    /// lists them after.
    #[test]
    fn untouched_code_pages_are_mapped_ahead_with_the_file_s_bytes() {
        use std::io::Write;
        let pages = 64usize;
        let len = pages * PAGE as usize;
        // Named (a deleted file's mapping is not mapped ahead), kept to the end.
        let mut named = tempfile::NamedTempFile::new().unwrap();
        let f = named.as_file_mut();
        let content: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        f.write_all(&content).unwrap();
        let p = map_read_only(f, len);
        let addr = p as u64;
        let me = std::process::id() as i32;
        let ours = |r: &Ranges| {
            r.iter()
                .filter(|(s, e)| *s < addr + len as u64 && addr < *e)
                .map(|(s, e)| (e.min(&(addr + len as u64)) - s.max(&addr)) / PAGE)
                .sum::<u64>()
        };
        assert_eq!(
            ours(&mapped(me).unwrap()),
            0,
            "nothing touched, nothing mapped"
        );
        let want = vec![(addr + 8 * PAGE, addr + 40 * PAGE)];
        let missing = map_files(me, &want).unwrap();
        assert_eq!(missing, 32, "the 32 pages asked for were not mapped");
        let now = mapped(me).unwrap();
        assert!(ours(&now) >= 32, "{now:x?}");
        let covered = |a: u64| now.iter().any(|&(s, e)| s <= a && a < e);
        assert!((8..40).all(|i| covered(addr + i * PAGE)), "{now:x?}");
        // Asked again: nothing left to map.
        assert_eq!(map_files(me, &want).unwrap(), 0);
        // SAFETY: our mapping of `len` bytes, read only.
        let mem = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) };
        assert_eq!(mem, &content[..]);
        // SAFETY: our mapping, no longer borrowed.
        unsafe { libc::munmap(p, len) };
    }

    /// A deleted file's (or an unnamed one's) mapping is left alone: it may be memory a
    /// page server serves.
    #[test]
    fn a_deleted_file_s_pages_are_not_mapped_ahead() {
        use std::io::Write;
        let len = 8 * PAGE as usize;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![7u8; len]).unwrap();
        let p = map_read_only(&f, len);
        let addr = p as u64;
        let me = std::process::id() as i32;
        let want = vec![(addr, addr + len as u64)];
        assert_eq!(map_files(me, &want).unwrap(), 0);
        // SAFETY: our mapping, not borrowed.
        unsafe { libc::munmap(p, len) };
    }
}
