//! Eager memory restore: every stored page written into the restored process.
//!
//! Writes go through `/proc/PID/mem`, which may write read-only private mappings
//! (`FOLL_FORCE`, a copy-on-write like a debugger's breakpoint), so every VMA was mapped
//! with its final protection and nothing needs an `mprotect` afterwards. Decompressing
//! and verifying pages is the bulk of the cost, so batches are spread over all cores.
//!
//! A tree ([`fill_tree`]) is filled in two stages: first every content that more than one
//! of its writes needs (the pages a pre-fork server's workers all changed the same way
//! after their fork) is decompressed and verified once, on all cores ([`Decoded`]); then
//! the processes are filled side by side, each mostly by a few `process_vm_writev`
//! calls from those pages, the hot pages and zeros. The cost of a tree then grows with
//! its distinct memory, not with the number of its processes.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

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

/// Page-table indexes of the pages [`fill_tree`] writes when `lazy` (sorted `(start, len)`)
/// are the lazily served VMAs: what a restore copies before the app resumes besides
/// the working set, so worth keeping decompressed (`Store::save_hot`).
pub fn eager_indexes(p: &Process, lazy: &[(u64, u64)]) -> Vec<u64> {
    batches(p, lazy, &[])
        .iter()
        .filter_map(|b| b.first.map(|f| f..f + b.count))
        .flatten()
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn write(
    snap: &Snapshot,
    hot: Option<&Hot>,
    decoded: &Decoded,
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
                if !decoded.copy(first, b.count, bytes) {
                    snap.read_pages(first, b.count, bytes)?;
                }
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

/// Where the bytes of batch `b` are without reading the store: in `hot` (one piece), in
/// `decoded` (a piece per page) or zeros; `None` if some page is in neither.
fn ready_pieces<'a>(
    hot: Option<&'a Hot>,
    decoded: &'a Decoded,
    b: &Batch,
) -> Option<Vec<(u64, &'a [u8])>> {
    static ZEROS: [u8; BATCH as usize * PAGE_SIZE] = [0; BATCH as usize * PAGE_SIZE];
    let len = b.count as usize * PAGE_SIZE;
    let Some(first) = b.first else {
        return Some(vec![(b.addr, &ZEROS[..len])]);
    };
    if let Some(pages) = hot.and_then(|h| h.pages(first, b.count)) {
        return Some(vec![(b.addr, pages)]);
    }
    (0..b.count)
        .map(|k| {
            decoded
                .page(first + k)
                .map(|bytes| (b.addr + k * PAGE_SIZE as u64, bytes))
        })
        .collect()
}

/// Writes `pieces` (an address in process `pid` and the bytes that go there, in areas
/// writable now) with as few `process_vm_writev` calls as `IOV_MAX` allows.
fn write_vectored(pid: i32, pieces: &[(u64, &[u8])]) -> Result<()> {
    for part in pieces.chunks(IOV_MAX) {
        let local: Vec<libc::iovec> = part
            .iter()
            .map(|(_, bytes)| libc::iovec {
                iov_base: bytes.as_ptr() as *mut libc::c_void,
                iov_len: bytes.len(),
            })
            .collect();
        let remote: Vec<libc::iovec> = part
            .iter()
            .map(|&(addr, bytes)| libc::iovec {
                iov_base: addr as *mut libc::c_void,
                iov_len: bytes.len(),
            })
            .collect();
        let total: usize = part.iter().map(|(_, b)| b.len()).sum();
        // Each `local` entry is exactly one of the slices of `part` (borrowed from the
        // hot pages, the decoded pages or a static, all alive across the call); `remote`
        // holds addresses in the stopped tracee `pid`, which the kernel writes through its
        // page tables (a bad address is EFAULT, never a write to our memory). The lengths
        // passed are the vectors' own.
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
                part[0].0
            );
        }
    }
    Ok(())
}

/// Pages of a tree decoded once for all its processes: every content more than one of
/// its writes needs that is not among the hot pages, decompressed and verified on all
/// cores, found by page-table index (each index of the same content finds the same
/// bytes).
#[derive(Default)]
pub struct Decoded {
    slot: HashMap<u64, usize>,
    bytes: Vec<u8>,
}

/// Most pages [`Decoded`] holds (256 MiB): a tree whose processes share more than that
/// besides the hot pages has the rest read per process.
const MAX_DECODED_PAGES: usize = 65536;

impl Decoded {
    /// The bytes of page-table record `index`, if decoded.
    fn page(&self, index: u64) -> Option<&[u8]> {
        let k = *self.slot.get(&index)?;
        Some(&self.bytes[k * PAGE_SIZE..(k + 1) * PAGE_SIZE])
    }

    /// Copies records `first..first + count` into `out` if every one is decoded.
    fn copy(&self, first: u64, count: u64, out: &mut [u8]) -> bool {
        if self.slot.is_empty() || (0..count).any(|k| !self.slot.contains_key(&(first + k))) {
            return false;
        }
        for (k, dst) in out.chunks_mut(PAGE_SIZE).enumerate() {
            dst.copy_from_slice(self.page(first + k as u64).expect("checked above"));
        }
        true
    }

    /// Decodes the contents `work` (every process's batches) needs more than once and
    /// `hot` lacks, on `threads` threads.
    fn build(
        snap: &Snapshot,
        hot: Option<&Hot>,
        work: &[Vec<Batch>],
        threads: usize,
    ) -> Result<Decoded> {
        // The pages whose bytes are not at hand, each with its content hash.
        let indexes: Vec<u64> = work
            .iter()
            .flatten()
            .filter_map(|b| {
                let first = b.first?;
                hot.is_none_or(|h| h.pages(first, b.count).is_none())
                    .then_some(first..first + b.count)
            })
            .flatten()
            .collect();
        snap.ensure_records(&indexes)?;
        let wanted: Vec<(u64, [u8; 32])> = indexes
            .into_iter()
            .map(|i| (i, snap.record(i).hash))
            .collect();
        // Content hash -> (first index seen, how often needed).
        let mut by_hash: HashMap<[u8; 32], (u64, usize)> = HashMap::new();
        for &(i, hash) in &wanted {
            by_hash.entry(hash).or_insert((i, 0)).1 += 1;
        }
        let mut reps: Vec<([u8; 32], u64)> = by_hash
            .into_iter()
            .filter(|&(_, (_, n))| n > 1)
            .map(|(hash, (rep, _))| (hash, rep))
            .collect();
        reps.truncate(MAX_DECODED_PAGES);
        // In store order: each block is decompressed once.
        reps.sort_by_key(|&(_, rep)| {
            let loc = snap.record(rep).loc;
            (loc.pack, loc.offset, loc.slot)
        });
        let mut bytes = vec![0u8; reps.len() * PAGE_SIZE];
        let indexes: Vec<u64> = reps.iter().map(|&(_, rep)| rep).collect();
        snap.read_page_list_parallel(&indexes, &mut bytes, threads)?;
        let at: HashMap<[u8; 32], usize> = reps
            .iter()
            .enumerate()
            .map(|(k, &(hash, _))| (hash, k))
            .collect();
        let slot = wanted
            .iter()
            .filter_map(|(i, hash)| Some((*i, *at.get(hash)?)))
            .collect();
        Ok(Decoded { slot, bytes })
    }
}

/// One process of a tree for [`fill_tree`]: its pages are every stored page except
/// those of the VMAs in `lazy` (sorted `(start, len)`), which the page server provides;
/// in its `shared` areas ([`super::cow`]) pages the area holds with the process's content
/// already are left alone.
pub struct FillJob<'a> {
    pub p: &'a Process,
    pub pid: i32,
    pub lazy: &'a [(u64, u64)],
    pub shared: &'a [Area],
}

/// Pages (in all) below which a tree's memory is written by the calling thread alone
/// (~4 µs a page to decode: at most ~2 ms).
const SMALL_FILL: u64 = 512;

/// Writes the memory of every process of a tree (see [`FillJob`]): the contents several
/// of them need decoded once ([`Decoded`]), then the processes filled side by side on
/// all cores; pages in `hot` are taken from there (verified already) instead of being
/// decompressed. One result per
/// job; after a failure the processes not started yet are left alone (`Ok`): the
/// instance is killed anyway, and the first failure in tree order is the one to report.
pub fn fill_tree(
    snap: &Snapshot,
    hot: Option<&Hot>,
    jobs: &[FillJob],
    progress: &crate::progress::Bytes,
) -> Vec<Result<()>> {
    let work: Vec<Vec<Batch>> = jobs
        .iter()
        .map(|j| batches(j.p, j.lazy, j.shared))
        .collect();
    // A small fill is done on this thread: starting threads and waiting for them (a
    // scheduling round each on a busy machine) costs more than the work.
    let pages: u64 = work.iter().flatten().map(|b| b.count).sum();
    let cores = if pages < SMALL_FILL {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    };
    let decoded = if jobs.len() > 1 {
        match Decoded::build(snap, hot, &work, cores) {
            Ok(d) => d,
            Err(e) => {
                let mut out = vec![Err(e)];
                out.resize_with(jobs.len(), || Ok(()));
                return out;
            }
        }
    } else {
        Decoded::default()
    };
    let workers = cores.min(jobs.len());
    let slots: Vec<Mutex<Option<Vec<Batch>>>> =
        work.into_iter().map(|w| Mutex::new(Some(w))).collect();
    let results: Vec<Mutex<Option<Result<()>>>> = jobs.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let run = || loop {
        let k = next.fetch_add(1, Ordering::Relaxed);
        let Some(job) = jobs.get(k) else { break };
        let w = slots[k]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_default();
        let r = write_batches(snap, hot, &decoded, job.pid, w, progress, cores);
        let failed = r.is_err();
        *results[k].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
        if failed {
            // The others stop taking work: the instance is killed anyway.
            next.store(jobs.len(), Ordering::Relaxed);
        }
    };
    if workers <= 1 {
        run();
    } else {
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(run);
            }
        });
    }
    results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .unwrap_or(Ok(()))
        })
        .collect()
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
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    write_batches(snap, None, &Decoded::default(), pid, work, &progress, cores)
}

/// Writes `work` into process `pid`: what is in the hot pages (or zeros) and writable in a
/// few vectored writes, the rest decompressed on up to `cores` cores and written through
/// `/proc/PID/mem`.
fn write_batches(
    snap: &Snapshot,
    hot: Option<&Hot>,
    decoded: &Decoded,
    pid: i32,
    work: Vec<Batch>,
    progress: &crate::progress::Bytes,
    cores: usize,
) -> Result<()> {
    let open = || {
        OpenOptions::new()
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .with_context(|| format!("opening /proc/{pid}/mem"))
    };
    // What is in the hot or decoded pages (or zeros) and writable goes in a few vectored
    // writes.
    let mut quick = Vec::new();
    let mut rest = Vec::new();
    for b in work {
        match b.writable.then(|| ready_pieces(hot, decoded, &b)).flatten() {
            Some(pieces) => quick.extend(pieces),
            None => rest.push(b),
        }
    }
    write_vectored(pid, &quick)?;
    progress.inc(quick.iter().map(|(_, b)| b.len() as u64).sum());
    let work = rest;
    if work.is_empty() {
        return Ok(());
    }
    let threads = cores.min(8);
    // Pages to decompress are worth other cores; pages already in `hot` only need the
    // write, which one thread does without waiting for others to be scheduled.
    let to_decode = work
        .iter()
        .filter(|b| ready_pieces(hot, decoded, b).is_none())
        .count();
    if threads == 1 || to_decode < 8 {
        return write(
            snap,
            hot,
            decoded,
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
                        decoded,
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
