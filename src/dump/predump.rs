//! `dump --pre-dump`: the tree's private anonymous memory copied while the app runs,
//! with write tracking started (or renewed) for the next dump ([`super::track`]).
//!
//! The tree is frozen only to create the userfaultfds, register new VMAs, and scan and
//! write-protect what was written since the last pre-dump; it then runs on while the
//! written pages are read. The image is a snapshot of the store holding those pages
//! (trigger `pre-dump`, not restorable); the final `dump --prev ID` takes the pages not
//! written since from it.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use warmstart_snapshots::model::{
    Manifest, Process, Vma, VmaFlags, VmaKind, PROT_READ, PROT_WRITE,
};
use warmstart_snapshots::store::SnapshotId;
use warmstart_snapshots::{PageWriter, RemoteWriter};

use super::memory::Target;
use super::track::{self, Counts, ProcState, Slot, State, Tracking};
use super::{freeze, Destination};
use crate::stats::Phases;

/// The trigger a pre-dump's snapshot carries; `restore` refuses such snapshots.
pub const TRIGGER: &str = "pre-dump";

pub struct PreDumpResult {
    pub id: SnapshotId,
    pub phases: Phases,
    pub frozen: Duration,
    pub counts: Counts,
}

/// One tracked VMA of a process, as found while frozen.
struct TrackedVma {
    start: u64,
    end: u64,
    /// Populated pages not written since the previous pre-dump (empty when the
    /// previous image cannot be used for this VMA).
    unwritten: Vec<(u64, u64)>,
}

struct ProcPlan {
    pid: i32,
    start_time: u64,
    uffd: std::os::fd::OwnedFd,
    /// The previous image's slots (address order), moved in after the freeze.
    prev: Vec<(u64, Slot)>,
    vmas: Vec<TrackedVma>,
}

/// Takes over the tree's tracking (if any) and checks it against `prev`.
pub fn previous(pid: i32, prev: Option<&SnapshotId>) -> Result<Option<Tracking>> {
    let t = track::take_over(pid)?;
    match (prev, &t) {
        (Some(want), Some(t)) if t.state.snapshot != want.0 => bail!(
            "--prev {}: the write tracking of process {pid} was last renewed by pre-dump {}, \
             so only that image can be used; pass --prev {} (the tracking is now ended: \
             run a new --pre-dump first)",
            want.short(),
            SnapshotId(t.state.snapshot).short(),
            SnapshotId(t.state.snapshot).short()
        ),
        (Some(want), None) => bail!(
            "--prev {}: process {pid} has no write tracking (no pre-dump of it is alive: \
             it was never pre-dumped, the tracking was taken by another dump, or it \
             expired); run `warmstart dump --pre-dump -t {pid}` first, or dump without --prev",
            want.short()
        ),
        _ => Ok(t),
    }
}

pub fn pre_dump(
    pid: i32,
    dest: Destination<'_>,
    prev: Option<super::Prev<'_>>,
    name: Option<&str>,
) -> Result<PreDumpResult> {
    super::process::check_target(pid)?;
    let mut phases = Phases::default();
    let mut old = previous(pid, prev.map(|p| p.id))?;
    let use_prev = prev.is_some();
    let mut tree = freeze::Tree::default();
    let t0 = Instant::now();
    let planned = freeze::freeze_tree(pid, Default::default(), &mut tree)
        .and_then(|()| plan(&tree, old.as_ref(), use_prev));
    for f in tree.processes() {
        super::release(f);
    }
    let frozen = t0.elapsed();
    phases.add("frozen", frozen);
    let mut plans = planned?;
    let base = old.as_ref().map(|t| SnapshotId(t.state.snapshot));
    // The previous slots, moved (not copied while frozen) into each process's plan.
    if let (Some(old), true) = (old.as_mut(), use_prev) {
        for p in &mut plans {
            if let Some(st) = (old.state.procs.iter_mut())
                .find(|st| st.pid == p.pid && st.start_time == p.start_time)
            {
                p.prev = std::mem::take(&mut st.slots);
            }
        }
    }
    drop(old); // our own copies of the descriptors are in the plans

    let t = Instant::now();
    let mut writer = match dest {
        Destination::Store(store) => PageWriter::Local(store.writer()?),
        Destination::PageServer(addr, tls) => {
            PageWriter::Remote(RemoteWriter::begin_tls(addr, tls)?)
        }
    };
    if let (Some(base), true) = (base, use_prev) {
        if !use_base(&mut writer, &base, prev.and_then(|p| p.dir)) {
            for p in &mut plans {
                p.prev.clear();
            }
        }
    }
    let mut counts = Counts::default();
    let mut processes = Vec::new();
    let mut states = Vec::new();
    for p in &plans {
        let target =
            Target::open(p.pid).with_context(|| format!("opening memory of process {}", p.pid))?;
        let mut slots = Vec::new();
        let mut vmas = Vec::new();
        for v in &p.vmas {
            let wanted = target
                .wanted(v.start, v.end, false)
                .with_context(|| format!("reading the page map of process {}", p.pid))?;
            let mut vma = Vma {
                start: v.start,
                end: v.end,
                prot: PROT_READ | PROT_WRITE,
                shared: false,
                flags: VmaFlags::default(),
                kind: VmaKind::Anon {
                    name: String::new(),
                },
                offset: 0,
                pages: Vec::new(),
            };
            track::write_pages(
                &target,
                v.start,
                &wanted.runs,
                &v.unwritten,
                &p.prev,
                &mut writer,
                &mut vma.pages,
                Some(&mut slots),
                true,
                &mut counts,
            )
            .with_context(|| format!("process {}", p.pid))?;
            vmas.push(vma);
        }
        slots.sort_by_key(|s| s.0);
        slots.dedup_by_key(|s| s.0);
        processes.push(Process {
            pid: p.pid,
            comm: std::fs::read_to_string(format!("/proc/{}/comm", p.pid))
                .unwrap_or_default()
                .trim()
                .to_owned(),
            vmas,
            ..Default::default()
        });
        states.push(ProcState {
            pid: p.pid,
            start_time: p.start_time,
            slots,
        });
    }
    phases.add("memory", t.elapsed());
    let manifest = Manifest {
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        trigger: TRIGGER.into(),
        processes,
        ..Default::default()
    };
    let t = Instant::now();
    let id = writer.commit(manifest, name)?;
    phases.add("commit", t.elapsed());
    let tracking = Tracking {
        state: State {
            snapshot: id.0,
            root: pid,
            root_start: track::start_time(pid)?,
            procs: states,
        },
        uffds: plans.into_iter().map(|p| p.uffd).collect(),
    };
    track::spawn_holder(&tracking)?;
    Ok(PreDumpResult {
        id,
        phases,
        frozen,
        counts,
    })
}

/// Makes pre-dump `base` (in image directory `dir`, else in the writer's store) the base
/// of `writer`, so that pages not written since are taken from it; false (with a
/// warning: they are read again) when it cannot be.
pub fn use_base(
    writer: &mut PageWriter<'_>,
    base: &SnapshotId,
    dir: Option<&warmstart_snapshots::store::Store>,
) -> bool {
    match writer.set_base(base, dir) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(
                "pre-dump {} cannot be used: {e}; the pages it holds are read again",
                base.short()
            );
            false
        }
    }
}

/// While frozen: a userfaultfd per process (the previous one, or a new one), every
/// private anonymous VMA registered, written pages found and write-protected again.
fn plan(tree: &freeze::Tree, old: Option<&Tracking>, use_prev: bool) -> Result<Vec<ProcPlan>> {
    let mut out = Vec::new();
    for f in tree.processes() {
        let pid = f.pid;
        let smaps = crate::sys::maps::read_smaps(pid)
            .with_context(|| format!("reading /proc/{pid}/smaps"))?;
        let start_time = track::start_time(pid)?;
        let (uffd, prev, trusted) = match old.and_then(|t| t.proc(pid)) {
            Some((fd, _)) => (fd.try_clone()?, Vec::new(), use_prev),
            None => {
                let Some(ft) = f.threads.get(&pid) else {
                    tracing::warn!("process {pid}: main thread gone, its memory is not tracked");
                    continue;
                };
                let regs = crate::sys::ptrace::get_regs(pid)?;
                let fd = super::inject::open_uffd(pid, pid, &regs, ft.kind, &smaps)
                    .with_context(|| format!("process {pid}: starting write tracking"))?;
                track::init_uffd(&fd)?;
                (fd, Vec::new(), false)
            }
        };
        let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))?;
        let mut vmas = Vec::new();
        for m in smaps.iter().filter(|m| track::trackable(m)) {
            let was_ours = trusted && m.has_flag("uw");
            if !track::register(&uffd, m) {
                continue;
            }
            let unwritten = track::unwritten(&pagemap, m.start, m.end, true)
                .with_context(|| format!("process {pid}"))?;
            vmas.push(TrackedVma {
                start: m.start,
                end: m.end,
                unwritten: if was_ours { unwritten } else { Vec::new() },
            });
        }
        out.push(ProcPlan {
            pid,
            start_time,
            uffd,
            prev,
            vmas,
        });
    }
    Ok(out)
}
