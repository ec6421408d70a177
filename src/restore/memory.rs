//! Eager memory restore: every stored page written into the restored process.
//!
//! Writes go through `/proc/PID/mem`, which may write read-only private mappings
//! (`FOLL_FORCE`, a copy-on-write like a debugger's breakpoint), so every VMA was mapped
//! with its final protection and nothing needs an `mprotect` afterwards.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use anyhow::{Context, Result};
use warmstart_snapshots::model::{Process, RunContent, VmaKind, PAGE_SIZE};
use warmstart_snapshots::store::Snapshot;

/// Pages decompressed and written per step.
const BATCH: u64 = 512;

pub fn fill(snap: &Snapshot, p: &Process, pid: i32) -> Result<()> {
    let mem = OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .with_context(|| format!("opening /proc/{pid}/mem"))?;
    let mut buf = vec![0u8; BATCH as usize * PAGE_SIZE];
    for v in &p.vmas {
        for run in &v.pages {
            let mut done = 0;
            while done < run.count {
                let n = (run.count - done).min(BATCH);
                let bytes = &mut buf[..n as usize * PAGE_SIZE];
                match run.content {
                    RunContent::Data { first } => snap.read_pages(first + done, n, bytes)?,
                    // Anonymous memory already reads as zero; a file page does not.
                    RunContent::Zero if matches!(v.kind, VmaKind::Anon { .. }) => break,
                    RunContent::Zero => bytes.fill(0),
                }
                let addr = v.start + (run.page + done) * PAGE_SIZE as u64;
                mem.write_all_at(bytes, addr)
                    .with_context(|| format!("writing {n} pages at {addr:#x} of process {pid}"))?;
                done += n;
            }
        }
    }
    Ok(())
}
