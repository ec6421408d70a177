//! Eager memory restore: every stored page written into the restored process.
//!
//! Writes go through `/proc/PID/mem`, which may write read-only private mappings
//! (`FOLL_FORCE`, a copy-on-write like a debugger's breakpoint), so every VMA was mapped
//! with its final protection and nothing needs an `mprotect` afterwards. Decompressing
//! and verifying pages is the bulk of the cost, so batches are spread over all cores.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

use anyhow::{Context, Result};
use warmstart_snapshots::model::{Process, RunContent, Vma, VmaKind, PAGE_SIZE};

use super::cow::Area;
use warmstart_snapshots::store::{Hot, Snapshot};

/// Pages decompressed and written per batch.
const BATCH: u64 = 256;

/// A piece of work: `count` pages at `addr`, from the page table at `first` or zeros.
struct Batch {
    addr: u64,
    count: u64,
    first: Option<u64>,
    /// The area is writable while memory is written ([`program::writable_at_first_trap`]).
    writable: bool,
}

fn batches(p: &Process, lazy: &[(u64, u64)], shared: &[Area]) -> Vec<Batch> {
    let mut out = Vec::new();
    for v in &p.vmas {
        if lazy.binary_search(&(v.start, v.len())).is_ok() {
            continue;
        }
        if let Some(a) = shared.iter().find(|a| a.start == v.start && a.end == v.end) {
            shared_area_batches(v, a, &mut out);
            continue;
        }
        for run in &v.pages {
            let first = match run.content {
                RunContent::Data { first } => Some(first),
                // Anonymous memory already reads as zero; a file page does not.
                RunContent::Zero
                    if matches!(v.kind, VmaKind::Anon { .. } | VmaKind::Shmem { .. }) =>
                {
                    continue
                }
                RunContent::Zero => None,
            };
            let mut done = 0;
            while done < run.count {
                let n = (run.count - done).min(BATCH);
                out.push(Batch {
                    addr: v.start + (run.page + done) * PAGE_SIZE as u64,
                    count: n,
                    first: first.map(|f| f + done),
                    writable: super::program::writable_at_first_trap(v),
                });
                done += n;
            }
        }
    }
    out
}

/// The writes into a shared area ([`super::cow`]) that already holds pages before the
/// fill: every stored page of the process except those the area holds with its content
/// already (a write would give it a copy of a page it shares), and zeros where the area
/// holds a page the process has none of.
fn shared_area_batches(v: &Vma, a: &Area, out: &mut Vec<Batch>) {
    let mut pages: Vec<(u64, Option<u64>)> = Vec::new();
    for run in &v.pages {
        let RunContent::Data { first } = run.content else {
            // A zero page: anonymous memory reads as zero (but where the area holds
            // something, then in `a.zero`); a file page does not.
            if a.backing.file.is_some() {
                let n = run.count.min(v.page_count().saturating_sub(run.page));
                pages.extend((0..n).map(|i| (v.start + (run.page + i) * PAGE_SIZE as u64, None)));
            }
            continue;
        };
        let n = run.count.min(v.page_count().saturating_sub(run.page));
        for i in 0..n {
            let addr = v.start + (run.page + i) * PAGE_SIZE as u64;
            if a.own.binary_search(&addr).is_err() {
                pages.push((addr, Some(first + i)));
            }
        }
    }
    pages.extend(a.zero.iter().map(|&addr| (addr, None)));
    pages.sort_unstable();
    let writable = super::program::writable_at_first_trap(v);
    for (addr, first) in pages {
        if let Some(b) = out.last_mut() {
            let next = b.addr + b.count * PAGE_SIZE as u64 == addr && b.count < BATCH;
            let same = match (b.first, first) {
                (Some(f), Some(g)) => f + b.count == g,
                (None, None) => true,
                _ => false,
            };
            if next && same && b.writable == writable {
                b.count += 1;
                continue;
            }
        }
        out.push(Batch {
            addr,
            count: 1,
            first,
            writable,
        });
    }
}

/// Page-table indexes of the pages [`fill`] writes when `lazy` (sorted `(start, len)`)
/// are the lazily served VMAs: what a restore copies before the app resumes besides
/// the working set, so worth keeping decompressed (`Store::save_hot`).
pub fn eager_indexes(p: &Process, lazy: &[(u64, u64)]) -> Vec<u64> {
    batches(p, lazy, &[])
        .iter()
        .filter_map(|b| b.first.map(|f| f..f + b.count))
        .flatten()
        .collect()
}

fn write(
    snap: &Snapshot,
    hot: Option<&Hot>,
    mem: &File,
    pid: i32,
    work: &[Batch],
    buf: &mut [u8],
    progress: &crate::progress::Bytes,
) -> Result<()> {
    for b in work {
        let from_hot = b.first.and_then(|f| hot.and_then(|h| h.pages(f, b.count)));
        let bytes: &[u8] = match (from_hot, b.first) {
            (Some(pages), _) => pages,
            (None, Some(first)) => {
                let bytes = &mut buf[..b.count as usize * PAGE_SIZE];
                snap.read_pages(first, b.count, bytes)?;
                bytes
            }
            (None, None) => {
                let bytes = &mut buf[..b.count as usize * PAGE_SIZE];
                bytes.fill(0);
                bytes
            }
        };
        mem.write_all_at(bytes, b.addr).with_context(|| {
            format!(
                "writing {} pages at {:#x} of process {pid}",
                b.count, b.addr
            )
        })?;
        progress.inc(bytes.len() as u64);
    }
    Ok(())
}

/// Most iovecs per `process_vm_writev` (`IOV_MAX`).
const IOV_MAX: usize = 1024;

/// Writes batches whose bytes are in `hot` (or zeros) into areas writable now, with as
/// few `process_vm_writev` calls as `IOV_MAX` allows.
fn write_vectored(hot: Option<&Hot>, pid: i32, work: &[Batch]) -> Result<()> {
    static ZEROS: [u8; BATCH as usize * PAGE_SIZE] = [0; BATCH as usize * PAGE_SIZE];
    for part in work.chunks(IOV_MAX) {
        let mut local = Vec::with_capacity(part.len());
        let mut remote = Vec::with_capacity(part.len());
        let mut total = 0usize;
        for b in part {
            let len = b.count as usize * PAGE_SIZE;
            let bytes: &[u8] = match b.first {
                Some(f) => hot
                    .and_then(|h| h.pages(f, b.count))
                    .expect("partitioned on the hot pages"),
                None => &ZEROS[..len],
            };
            local.push(libc::iovec {
                iov_base: bytes.as_ptr() as *mut libc::c_void,
                iov_len: len,
            });
            remote.push(libc::iovec {
                iov_base: b.addr as *mut libc::c_void,
                iov_len: len,
            });
            total += len;
        }
        // Each `local` entry is a slice of exactly `len` bytes (`HotPages::pages`
        // returns `count` whole pages, `ZEROS[..len]` is bounds-checked) borrowed from `hot`
        // or a static, both alive across the call; `remote` holds addresses in the stopped
        // tracee `pid`, which the kernel writes through its page tables (a bad address is
        // EFAULT, never a write to our memory). The lengths passed are the vectors' own.
        // SAFETY: live buffers of the lengths given; `remote` is in the tracee.
        let n = unsafe {
            libc::process_vm_writev(
                pid,
                local.as_ptr(),
                local.len() as libc::c_ulong,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        };
        if n != total as isize {
            let why = if n < 0 {
                std::io::Error::last_os_error().to_string()
            } else {
                format!("{n} of {total} bytes written")
            };
            anyhow::bail!(
                "writing {} pages from {:#x} into process {pid}: {why}",
                total / PAGE_SIZE,
                part[0].addr
            );
        }
    }
    Ok(())
}

/// Writes every stored page except those of the VMAs in `lazy` (sorted `(start, len)`),
/// which the page server provides; pages in `hot` are taken from there (verified
/// already) instead of being decompressed. In the `shared` areas ([`super::cow`]) pages
/// the area holds with the process's content already are left alone.
pub fn fill(
    snap: &Snapshot,
    hot: Option<&Hot>,
    p: &Process,
    pid: i32,
    lazy: &[(u64, u64)],
    shared: &[Area],
    progress: &crate::progress::Bytes,
) -> Result<()> {
    write_batches(snap, hot, pid, batches(p, lazy, shared), progress)
}

/// Writes the stored pages of `p`'s VMAs that a template holds (`placed`: each VMA's
/// `(start, end)` and where the template mapped it) into the template `pid`.
pub fn fill_template(
    snap: &Snapshot,
    p: &Process,
    pid: i32,
    placed: &[(u64, u64, u64)],
) -> Result<()> {
    let mut work = Vec::new();
    for &(start, end, at) in placed {
        let Some(v) = p.vmas.iter().find(|v| v.start == start && v.end == end) else {
            anyhow::bail!("the template holds {start:#x}-{end:#x}, which is no VMA of the process");
        };
        let mut mine = Vec::new();
        shared_area_batches(
            v,
            &Area {
                start,
                end,
                backing: super::cow::backing_of(p, start, end),
                adopt: None,
                writes: Vec::new(),
                own: Vec::new(),
                zero: Vec::new(),
            },
            &mut mine,
        );
        for mut b in mine {
            b.addr = at + (b.addr - start);
            b.writable = true;
            work.push(b);
        }
    }
    let progress = crate::progress::Bytes::new("writing a template's memory", None);
    write_batches(snap, None, pid, work, &progress)
}

/// Writes `work` into process `pid`: what is in the hot pages (or zeros) and writable in a
/// few vectored writes, the rest decompressed on several cores and written through
/// `/proc/PID/mem`.
fn write_batches(
    snap: &Snapshot,
    hot: Option<&Hot>,
    pid: i32,
    mut work: Vec<Batch>,
    progress: &crate::progress::Bytes,
) -> Result<()> {
    let open = || {
        OpenOptions::new()
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .with_context(|| format!("opening /proc/{pid}/mem"))
    };
    // What is in the hot pages (or zeros) and writable goes in a few vectored writes.
    let (quick, rest): (Vec<Batch>, Vec<Batch>) = work.drain(..).partition(|b| {
        b.writable
            && b.first
                .is_none_or(|f| hot.is_some_and(|h| h.pages(f, b.count).is_some()))
    });
    write_vectored(hot, pid, &quick)?;
    progress.inc(quick.iter().map(|b| b.count * PAGE_SIZE as u64).sum());
    let work = rest;
    if work.is_empty() {
        return Ok(());
    }
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8);
    // Pages to decompress are worth other cores; pages already in `hot` only need the
    // write, which one thread does without waiting for others to be scheduled.
    let to_decode = work
        .iter()
        .filter(|b| {
            b.first
                .is_some_and(|f| hot.is_none_or(|h| h.pages(f, b.count).is_none()))
        })
        .count();
    if threads == 1 || to_decode < 8 {
        return write(
            snap,
            hot,
            &open()?,
            pid,
            &work,
            &mut vec![0u8; BATCH as usize * PAGE_SIZE],
            progress,
        );
    }
    // Contiguous shares keep each thread's writes sequential in the target.
    let share = work.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = work
            .chunks(share)
            .map(|part| {
                s.spawn(move || -> Result<()> {
                    write(
                        snap,
                        hot,
                        &open()?,
                        pid,
                        part,
                        &mut vec![0u8; BATCH as usize * PAGE_SIZE],
                        progress,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("memory writer panicked"))
    })
}

/// Writes the contents of the tree's deleted files and memfds (`Manifest::shared_files`)
/// straight into the files the root created, once each, then adds a memfd's seals.
/// `tree` holds each restored process with its pid as seen here, stopped at its first
/// trap: a file is reached through a mapping of it (`/proc/PID/map_files`) or an fd.
pub fn fill_shared_files(snap: &Snapshot, tree: &[(&Process, i32)]) -> Result<()> {
    use std::os::fd::AsRawFd;
    for obj in &snap.manifest.shared_files {
        let id = obj.id;
        let by_map = tree.iter().find_map(|&(p, pid)| {
            p.vmas
                .iter()
                .find(|v| v.kind == VmaKind::SharedFile { id })
                .map(|v| format!("/proc/{pid}/map_files/{:x}-{:x}", v.start, v.end))
        });
        let by_fd = || {
            tree.iter().find_map(|&(p, pid)| {
                p.fds
                    .iter()
                    .find(|f| {
                        matches!(f.file, warmstart_snapshots::model::FileDesc::SharedFile { id: i, .. } if i == id)
                    })
                    .map(|f| format!("/proc/{pid}/fd/{}", f.fd))
            })
        };
        let Some(path) = by_map.or_else(by_fd) else {
            continue; // held by no live process: not recreated
        };
        let what = || format!("{} ({path})", obj.path);
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", what()))?;
        let mut buf = vec![0u8; BATCH as usize * PAGE_SIZE];
        for run in &obj.pages {
            let RunContent::Data { first } = run.content else {
                continue; // the new file reads as zeros already
            };
            let mut done = 0;
            while done < run.count {
                let n = (run.count - done).min(BATCH);
                let bytes = &mut buf[..n as usize * PAGE_SIZE];
                snap.read_pages(first + done, n, bytes)?;
                let at = (run.page + done) * PAGE_SIZE as u64;
                // Not past the end: the file keeps its size.
                let len = obj.size.saturating_sub(at).min(bytes.len() as u64) as usize;
                file.write_all_at(&bytes[..len], at)
                    .with_context(|| format!("writing the contents of {}", what()))?;
                done += n;
            }
        }
        if obj.memfd && obj.seals != 0 {
            // SAFETY: fcntl on an fd we own; no pointers.
            if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, obj.seals) } < 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("sealing {} with {:#x}", what(), obj.seals));
            }
        }
    }
    Ok(())
}
