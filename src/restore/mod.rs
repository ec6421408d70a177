//! Restore: rebuild a snapshot's process tree in a fresh sandbox and hand it back its CPU.
//!
//! The monitor (this process) checks the host, the files and the tree's shape
//! ([`checks`]), spawns the sandbox with the root's restoring child ([`child`]) at its
//! recorded pid and seizes it (or has a [`template`] of the snapshot spawn it, so that it
//! starts with the snapshot's memory shared). A root that was the init (pid 1) of its pid
//! namespace is restored by the sandbox's init itself ([`root_is_init`]), so it is pid 1
//! again and the instance's exit is its own (and its parent-death signal its own: a
//! [`warden`] ties it to the monitor instead). The root creates what several processes
//! share, maps the private memory its children share with it ([`cow`]), then forks the
//! rest of the tree at the recorded pids (see [`child`]); each process reports on a
//! status pipe of its own and (all but the root) waits on a gate until the monitor has
//! seized it. The monitor then drives every process's restorer program ([`program`])
//! through its two traps:
//!
//! 1. layout built → the monitor writes memory ([`memory`]: all of it but the pages a
//!    process holds already in its shared areas; in a lazy restore a page server per
//!    process takes its userfaultfd for its private anonymous memory outside them,
//!    [`lazy`]) and continues;
//! 2. per-thread state set → the monitor unmaps the restorer by running one `munmap`
//!    at the blob's `syscall` instruction, loads the saved registers (incl. `fs_base`),
//!    xsave state and signal mask. Once every process is there, it detaches from all of
//!    them: the tree resumes together where it was frozen.
//!
//! Any failure, in any process, drops the sandbox, which kills the whole tree: no
//! process is left half restored.
//!
//! Ending with ptrace rather than an in-process `rt_sigreturn` lets the restorer be
//! unmapped completely (nothing of it remains in `/proc/PID/maps`) and restores the
//! full xsave state through the kernel's own validation.

pub mod checks;
pub mod child;
pub mod cow;
pub mod interrupt;
pub mod keeper;
pub mod lazy;
pub mod memory;
pub mod namespaces;
pub mod program;
pub mod reaper;
pub mod template;
pub mod tmp;
pub mod vdso_proxy;
pub mod warden;

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use warmstart_launcher::{Sandbox, SpawnOptions};
use warmstart_parasite::Status;
use warmstart_snapshots::model::{reg, FileDesc, Process};
use warmstart_snapshots::store::{Snapshot, WorkingSets};

use crate::stats::Phases;
use crate::sys::ptrace::{self, Stop};
use crate::sys::remote;
use child::{BlobInfo, MSG_BLOB, MSG_ERROR};

/// Threads hashing the hot pages (a restore's other work is mostly in other processes).
const HOT_VERIFY_THREADS: usize = 2;

/// A restored instance, running.
pub struct Restored {
    pub sandbox: Sandbox,
    /// The app's pid as seen from here.
    pub pid: i32,
    pub phases: Phases,
    /// The page server of a lazy restore, running (the root's).
    pub lazy: Option<lazy::Running>,
    /// The page servers of the other processes of a tree: (pid in the sandbox, server).
    pub tree_lazy: Vec<(i32, lazy::Running)>,
    /// Our end of the app's notify channel, kept open while it runs.
    _notify: Option<OwnedFd>,
    /// Holds a root that is pid 1 again to our life ([`warden`]).
    _warden: Option<warden::Warden>,
}

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Serve private anonymous memory on demand with userfaultfd (else copy it all).
    pub lazy: bool,
    /// Pages to copy before the app resumes (the learned working sets: each process of
    /// the tree prefetches its own).
    pub prefetch: Option<WorkingSets>,
    /// Learn the working sets (every process of the tree its own): record faults until
    /// the app first writes to stdout or answers on a TCP connection.
    pub learn: bool,
    /// The snapshot was opened with `Store::load_deferred`: check its page table while
    /// restoring (before the app resumes when eager; alongside the page server when lazy).
    pub verify_table: bool,
    /// The instance's stdin, stdout, stderr (default: ours).
    pub stdio: Option<[RawFd; 3]>,
    /// Kill the sandbox being built when a signal asks the restore to stop.
    pub interrupt: Option<Arc<interrupt::Interrupt>>,
    /// Listening sockets the instance gets in place of the ones it recorded, by
    /// `Fd::ofd` (`run --listen`, `LISTEN_FDS`: [`crate::fds::inet::replacements`]).
    pub listeners: Vec<(u32, Arc<OwnedFd>)>,
    /// A tool snapshot's run: what its launcher reads after `RESTORED=1`
    /// ([`crate::tool::request`]).
    pub tool_request: Option<Vec<u8>>,
    /// Start the instance from this template of the snapshot ([`template`]).
    pub template: Option<Arc<template::Template>>,
    /// Put the instance's processes in these cgroups before they run
    /// (`--manage-cgroups`, `run --memory`...: [`crate::cgroup::Placement`]).
    pub cgroups: Option<Arc<crate::cgroup::Placement>>,
    /// Restore established TCP connections (`restore --tcp-established`); a snapshot
    /// holding some is refused without it.
    pub tcp_established: bool,
    /// Where the new peers of the snapshot's veth interfaces go (`restore --veth`).
    pub veths: Vec<namespaces::VethMap>,
}

impl Restored {
    /// Waits for the instance, relaying the signals we get to it (SIGINT, SIGTERM,
    /// SIGHUP, SIGQUIT, SIGUSR1, ...: `warmstart_launcher::relayed_signals`); returns its exit code
    /// and, for a lazy restore, what the page server did. A page server that failed
    /// has killed the instance: that is an error, never a silent exit code.
    pub fn wait(self) -> Result<(i32, Option<lazy::Outcome>)> {
        self.wait_then(|| ())
    }

    /// [`wait`](Self::wait), calling `over` once the sandbox has exited, before the page
    /// servers are waited for.
    pub fn wait_then(self, over: impl FnOnce()) -> Result<(i32, Option<lazy::Outcome>)> {
        let code = self.sandbox.forward_signals()?;
        over();
        self.finish(code)
    }

    /// What [`wait`](Self::wait) returns, once the sandbox has exited with `code`.
    pub fn finish(self, code: i32) -> Result<(i32, Option<lazy::Outcome>)> {
        // Every server is waited for (the root's may be keeping a working set) before
        // the first error is reported.
        let mut first_err = None;
        for (pid, l) in self.tree_lazy {
            if let Err(e) = l.finish() {
                first_err.get_or_insert(e.context(format!("the page server of process {pid}")));
            }
        }
        let outcome = self.lazy.map(|run| run.finish()).transpose();
        match (first_err, outcome) {
            (Some(e), _) | (None, Err(e)) => Err(e),
            (None, Ok(outcome)) => Ok((code, outcome)),
        }
    }
}

/// The signals a monitor forwards to its instance. They are blocked before any helper
/// thread starts (threads inherit the mask), so none of them can take such a signal and
/// die of it: the signalfd of `forward_signals` receives them all.
pub fn block_forwarded_signals() {
    // SAFETY: `sigset_t` is a plain C bit array, valid zeroed; every pointer is to the live
    // local `set` or null (the old mask is not wanted).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in warmstart_launcher::relayed_signals() {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Exit code of a restoring child that could not put its private `/tmp` in place.
pub const TMP_ATTACH_FAILED: i32 = 125;

/// One process of the tree being restored, as the monitor drives it.
struct Driven<'a> {
    /// Index in the manifest's processes.
    idx: usize,
    p: &'a Process,
    /// Its pid as seen from here.
    pid: i32,
    info: BlobInfo,
    /// Its threads (the leader first) once created.
    tids: Vec<i32>,
}

/// A process of a parked instance: every thread stopped at its last trap.
struct Ready {
    idx: usize,
    pid: i32,
    info: BlobInfo,
    tids: Vec<i32>,
}

/// An instance restored up to its last step and held there (`warmstart serve`'s pool):
/// memory in place or being served, threads created, every thread stopped at its last
/// trap, its stdio still placeholders and its timers not armed. [`Parked::resume`] gives
/// it its stdio and lets it go. Dropping it kills it.
pub struct Parked {
    /// First, so it is dropped before the sandbox (see [`reaper`]).
    reaper: reaper::Reaper,
    snap: Arc<Snapshot>,
    sandbox: Sandbox,
    pid: i32,
    phases: Phases,
    lazy: Option<lazy::Running>,
    tree_lazy: Vec<(i32, lazy::Running)>,
    notify: Option<OwnedFd>,
    tree: Vec<Ready>,
    /// Our end of the stdio socket (parked restores only).
    late_sock: Option<OwnedFd>,
    /// Told when the instance resumes: a signal from then on is the instance's, not the
    /// end of its restore.
    interrupt: Option<Arc<interrupt::Interrupt>>,
    /// The lock on the snapshot's established TCP connections, released once the
    /// instance has resumed ([`crate::fds::tcp`]).
    tcp_lock: Option<crate::sys::nft::NetLock>,
    /// See [`Restored`].
    warden: Option<warden::Warden>,
}

/// Sizes our fd table for a restore of `m`, which opens a few fds per process (status
/// pipes, gates): see [`crate::sys::reserve_fds`]. `run` calls it before its first
/// helper thread starts; [`prepare`] again, for every other caller.
pub fn reserve_fds(m: &warmstart_snapshots::model::Manifest) {
    if let Err(e) = crate::sys::reserve_fds(4 * m.processes.len()) {
        tracing::debug!("fd table not grown ahead: {e}");
    }
}

/// Whether the snapshot's root process was the init (pid 1) of its pid namespace: it is
/// restored as the sandbox's init itself (`SpawnOptions::app_is_init`).
pub fn root_is_init(m: &warmstart_snapshots::model::Manifest) -> bool {
    m.processes.first().is_some_and(|p| p.pid == 1)
}

/// Restores an instance of `snap` and lets it run.
pub fn restore(snap: &Arc<Snapshot>, opts: &RestoreOptions) -> Result<Restored> {
    prepare(snap, opts, false)?.resume(None, &[], None)
}

/// [`restore`], calling `list` with the instance's pid before it runs (so that what
/// `list` records, e.g. the `warmstart ps` entry, is there before the instance can answer
/// anyone); what it returns is kept with the instance.
pub fn restore_listed<R>(
    snap: &Arc<Snapshot>,
    opts: &RestoreOptions,
    list: &dyn Fn(i32) -> R,
) -> Result<(Restored, R)> {
    let parked = prepare(snap, opts, false)?;
    let listed = list(parked.pid());
    Ok((parked.resume(None, &[], None)?, listed))
}

/// Restores an instance of `snap` up to its last step and holds it there.
pub fn park(snap: &Arc<Snapshot>, opts: &RestoreOptions) -> Result<Parked> {
    if opts.learn {
        bail!("a parked instance cannot learn the working set");
    }
    if root_is_init(&snap.manifest) {
        bail!(
            "snapshot {}: its root process was the init (pid 1) of its pid namespace, and \
             an instance of it is not parked ahead (its clocks are set when its init \
             starts); it is restored when asked for (warmstart run / restore)",
            snap.id.short()
        );
    }
    prepare(snap, opts, true)
}

/// Restores an instance of `snap` up to its last step; `park`: with its stdio and timers
/// left for [`Parked::resume`] (else it has them already).
pub fn prepare(snap: &Arc<Snapshot>, opts: &RestoreOptions, park: bool) -> Result<Parked> {
    let m = &snap.manifest;
    let mut phases = Phases::default();
    let t = Instant::now();
    reserve_fds(m);
    crate::tree_check::tree(m)?;
    crate::fds::tcp::check_allowed(m, opts.tcp_established)?;
    let p = &m.processes[0];
    checks::host(&m.host)?;
    checks::unchanged_files(m)?;
    phases.add("checks", t.elapsed());
    let t = Instant::now();
    let private_tmp = tmp::prepare(m, snap)?;
    let listeners: Vec<(u32, RawFd)> = opts
        .listeners
        .iter()
        .map(|(ofd, fd)| (*ofd, fd.as_raw_fd()))
        .collect();
    if private_tmp.is_some() {
        phases.add("private tmp", t.elapsed());
    }

    // The hot pages (verified, decompressed) are checked on other cores while the
    // sandbox and the layout are built; they are needed only once the layout is there.
    let hot_job = {
        let snap = snap.clone();
        std::thread::Builder::new()
            .name("hot-pages".into())
            .spawn(move || snap.hot(HOT_VERIFY_THREADS).map(Arc::new))
            .context("starting the hot-pages thread")?
    };
    let mut table_check = opts
        .verify_table
        .then(|| {
            let snap = snap.clone();
            std::thread::Builder::new()
                .name("table-check".into())
                .spawn(move || {
                    // Off the critical path: it only has to be done before the page
                    // server finishes, so it runs when a core would idle otherwise.
                    let param = libc::sched_param { sched_priority: 0 };
                    // SAFETY: `param` is a live `sched_param` the kernel only reads; pid 0
                    // is the calling thread.
                    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
                    snap.verify_table()
                })
                .context("starting the page-table check")
        })
        .transpose()?;
    // Pages the processes of a tree share are shared again: planned here, mapped by the
    // processes before they fork (see `cow`).
    let t = Instant::now();
    let own_plan;
    let shared: Option<&cow::CowPlan> = match &opts.template {
        Some(tpl) if tpl.snap.id == snap.id => Some(&tpl.plan),
        Some(tpl) => bail!(
            "the template of snapshot {} cannot start snapshot {}",
            tpl.snap.id.short(),
            snap.id.short()
        ),
        None => {
            own_plan = cow::plan(snap, m, false)?;
            if own_plan.is_some() {
                phases.add("shared pages", t.elapsed());
            }
            own_plan.as_ref()
        }
    };
    let t = Instant::now();
    // Each process has a userfaultfd and a page server of its own, which learns or
    // prefetches its own working set; a process with nothing to serve lazily is
    // restored eagerly, as are its shared areas.
    let mut plans: Vec<Option<crate::lazy::LazyPlan>> = m
        .processes
        .iter()
        .enumerate()
        .map(|(i, q)| {
            (opts.lazy && q.zombie.is_none())
                .then(|| {
                    let mut plan = crate::lazy::plan(q);
                    if let Some(c) = shared {
                        plan.leave_out(&c.eager_ranges(i));
                    }
                    plan
                })
                .filter(|plan| !plan.ranges.is_empty())
        })
        .collect();
    let ranges: Vec<Vec<(u64, u64)>> = plans
        .iter()
        .map(|plan| plan.as_ref().map(|p| p.ranges.clone()).unwrap_or_default())
        .collect();
    let ranges = ranges.as_slice();
    // Learning the working set ends at the app's first output: its stdout goes through
    // a pipe we copy from, for this run only.
    let stdout_tap = if opts.learn {
        Some(remote::pipe().context("pipe2")?)
    } else {
        None
    };
    // A parked instance has /dev/null where its stdio goes until it is handed out.
    let null = if park {
        Some(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .context("opening /dev/null")?,
        )
    } else {
        None
    };
    let late = if park {
        Some(crate::sys::scm::seqpacket_pair().context("socketpair")?)
    } else {
        None
    };
    let stdio = match (&null, stdout_tap.as_ref()) {
        (Some(n), _) => Some([n.as_raw_fd(); 3]),
        (None, Some((_, w))) => {
            let s = opts.stdio.unwrap_or([0, 1, 2]);
            Some([s[0], w.as_raw_fd(), s[2]])
        }
        (None, None) => opts.stdio,
    };
    // A `--ready notify` app is waiting in a read of its notify channel: it gets a new
    // one whose first bytes say it was restored.
    let notify = if p
        .fds
        .iter()
        .any(|f| f.file == FileDesc::External { stdio: 3 })
    {
        let (ours, app) = remote::socketpair().context("socketpair")?;
        let mut w = std::fs::File::from(ours.try_clone()?);
        std::io::Write::write_all(&mut w, warmstart_launcher::warmpoint::RESTORED_MSG)
            .context("writing RESTORED=1 to the notify channel")?;
        match (&m.tool, &opts.tool_request) {
            (Some(_), Some(req)) => std::io::Write::write_all(&mut w, req)
                .context("writing the tool's request to the notify channel")?,
            // Parked: its request comes at hand-out ([`Parked::resume`]).
            (Some(_), None) if park => {}
            (Some(_), None) => bail!(
                "snapshot {} holds a tool (record --tool), which only `warmstart run {} -- \
                 ARGS` runs (not served by a daemon yet)",
                snap.id.short(),
                snap.id.short()
            ),
            _ => {}
        }
        Some((ours, app))
    } else {
        None
    };
    // Per process: a status pipe (its report or error) and, except for the root, a gate
    // it waits on until we have seized it.
    let mut reports = Vec::new();
    let mut gates = Vec::new();
    for i in 0..m.processes.len() {
        reports.push(remote::pipe().context("pipe2")?);
        gates.push(if i == 0 {
            None
        } else {
            Some(remote::pipe().context("pipe2")?)
        });
    }
    let chans = child::TreeChannels {
        reports: reports.iter().map(|(_, w)| w.as_raw_fd()).collect(),
        gates: gates
            .iter()
            .map(|g| g.as_ref().map_or(-1, |(r, _)| r.as_raw_fd()))
            .collect(),
    };
    // The child may find a lazily initialised static half-initialised for good by a
    // thread it does not have (see `warmstart_launcher::forksafe`): set them here.
    program::last_cap();
    program::LISTING.store(
        tracing::enabled!(tracing::Level::DEBUG),
        std::sync::atomic::Ordering::Relaxed,
    );
    let spawn_t = Instant::now();
    // A root that was the init of its pid namespace (a container's entrypoint) is init
    // again: the sandbox's pid 1 restores it itself.
    let app_is_init = root_is_init(m);
    let spawn_opts = SpawnOptions {
        pid: (!app_is_init).then_some(p.pid),
        gate: true,
        stdio,
        clocks: Some(crate::sys::timens::adjusted_targets(&m.clocks)?),
        owner: None,
        namespaces: m.namespaces.clone_flags(),
        app_is_init,
    };
    if opts.cgroups.is_some() && opts.template.is_some() {
        bail!("an instance started from a template cannot be placed in cgroups of its own");
    }
    let sandbox = match &opts.template {
        Some(tpl) => tpl.spawn(
            spawn_opts.clocks,
            ranges,
            &template::InstanceFds {
                stdio,
                reports: &chans.reports,
                gates: &chans.gates[1..],
                notify: notify.as_ref().map(|(_, app)| app.as_raw_fd()),
                late: late.as_ref().map(|(_, app)| app.as_raw_fd()),
                listeners: &listeners,
                private_tmp: private_tmp.as_ref().map(|f| f.as_raw_fd()),
            },
        ),
        None => warmstart_launcher::spawn(&spawn_opts, || {
            child::run(&child::ChildArgs {
                m,
                lazy: ranges,
                notify: notify.as_ref().map(|(_, app)| app.as_raw_fd()),
                late_sock: late.as_ref().map(|(_, app)| app.as_raw_fd()),
                listeners: &listeners,
                chans: &chans,
                cow: shared,
                inherited: &[],
                private_tmp: private_tmp.as_ref().map(|f| f.as_raw_fd()),
            })
        })
        .map_err(anyhow::Error::from),
    }
    .context("starting the sandbox")?;
    let reports: Vec<OwnedFd> = reports.into_iter().map(|(r, _w)| r).collect();
    let gates: Vec<Option<OwnedFd>> = gates.into_iter().map(|g| g.map(|(_r, w)| w)).collect();
    // The app has its end; ours stays open while the instance runs (in `Restored`).
    let notify = notify.map(|(ours, _app)| ours);
    let late_sock = late.map(|(ours, _app)| ours);
    drop(null);
    tracing::debug!("sandbox spawned in {:?}", spawn_t.elapsed());
    let stdout_tap = stdout_tap.map(|(r, _w)| r);
    let pid = sandbox.app_pid;
    // Before the root gets its own parent-death signal back (the restorer's last step),
    // which unties it from us.
    let warden_t = Instant::now();
    let warden = app_is_init
        .then(|| warden::Warden::spawn(sandbox.init_pidfd()))
        .transpose()?;
    if warden.is_some() {
        tracing::debug!("warden started in {:?}", warden_t.elapsed());
    }
    if m.namespaces.any() {
        let t = Instant::now();
        namespaces::fill(sandbox.init_pidfd(), &m.namespaces, snap, &opts.veths)?;
        phases.add("namespaces", t.elapsed());
    }
    // Held from before any process of the tree runs until it has resumed, in the
    // instance's network namespace.
    let tcp_lock = if m.namespaces.net.is_some() {
        crate::sys::ns::run_in(
            sandbox.init_pidfd(),
            libc::CLONE_NEWNET,
            "the instance's network namespace",
            || crate::fds::tcp::restore_lock(m),
        )?
    } else {
        crate::fds::tcp::restore_lock(m)?
    };
    const SEIZE: libc::c_int = ptrace::O_EXITKILL
        | ptrace::O_TRACESYSGOOD
        | ptrace::O_TRACECLONE
        | ptrace::O_SUSPEND_SECCOMP;
    // Declared after the sandbox: on any failure it is dropped first, and kills and
    // reaps every traced task so that dropping the sandbox cannot hang.
    let mut reaper = reaper::Reaper::new(sandbox.init_pidfd(), pid);
    if let Some(i) = &opts.interrupt {
        i.arm(sandbox.init_pidfd());
    }
    ptrace::seize(pid, SEIZE).with_context(|| format!("seizing the restoring process {pid}"))?;
    // Into its cgroups while it still waits on its gate: it has not run (nor allocated
    // anything of the app) yet; the processes it forks inherit them.
    if let Some(c) = &opts.cgroups {
        c.join_init(sandbox.init_pid)?;
        c.join(0, pid)?;
    }
    sandbox
        .release()
        .context("releasing the restoring process")?;
    let fail_in = |q: &Process, e: anyhow::Error| {
        e.context(format!(
            "restoring process {} ({}) of snapshot {}",
            q.pid,
            q.comm,
            snap.id.short()
        ))
    };
    // Any error from here on drops the sandbox, which kills every process of the tree.
    let mut reports = reports.into_iter();
    let info =
        read_report(reports.next().expect("one pipe per process")).map_err(|e| fail_in(p, e))?;
    show_listing(p, &info);
    let mut tree = vec![Driven {
        idx: 0,
        p,
        pid,
        info,
        tids: vec![pid],
    }];
    let mut host_pids = HostPids::new(pid);
    let rest = m.processes[1..]
        .iter()
        .zip(reports)
        .zip(gates.into_iter().skip(1));
    for (i, ((q, r), gate)) in (1..).zip(rest) {
        if q.zombie.is_some() {
            read_zombie_report(r).map_err(|e| fail_in(q, e))?;
            continue;
        }
        let info = read_report(r).map_err(|e| fail_in(q, e))?;
        show_listing(q, &info);
        let qpid = host_pids.get(q.pid).map_err(|e| fail_in(q, e))?;
        ptrace::seize(qpid, SEIZE)
            .with_context(|| format!("seizing the restoring process {qpid}"))
            .map_err(|e| fail_in(q, e))?;
        if let Some(c) = &opts.cgroups {
            // Before its gate opens: its memory is mapped and filled after.
            c.join(i, qpid).map_err(|e| fail_in(q, e))?;
        }
        let gate = gate.expect("every process but the root has a gate");
        std::fs::File::from(gate)
            .write_all(&[1])
            .context("releasing a restoring process")
            .map_err(|e| fail_in(q, e))?;
        tree.push(Driven {
            idx: i,
            p: q,
            pid: qpid,
            info,
            tids: vec![qpid],
        });
    }
    phases.add("child", t.elapsed());

    let t = Instant::now();
    for d in &tree {
        wait_trap(d.pid, &d.info, &mut Vec::new()).map_err(|e| fail_in(d.p, e))?;
    }
    phases.add("layout", t.elapsed());
    let t = Instant::now();
    let hot = hot_job.join().unwrap_or(None);
    phases.add("hot-pages", t.elapsed());
    let t = Instant::now();
    // Every process with a page server learns (or prefetches) its own working set; the
    // root's first answer ends the learning of all.
    let learning = opts.learn.then(|| {
        let learners = tree.iter().filter(|d| plans[d.idx].is_some()).count();
        lazy::Learning::new(snap.clone(), learners)
    });
    let mut stop: Option<crate::lazy::RecordHandle> = None;
    let mut servers = Vec::new();
    for d in &tree {
        let server = match plans[d.idx].take() {
            Some(plan) => {
                // The root's server checks the page table.
                let check = if d.idx == 0 { table_check.take() } else { None };
                let how = lazy::ProcessLazy {
                    pid: d.p.pid,
                    root: d.idx == 0,
                    prefetch: opts.prefetch.as_ref().and_then(|w| w.for_process(d.p.pid)),
                    learning: learning.clone(),
                    stop: stop.clone(),
                };
                let s = lazy::start(snap, hot.clone(), check, plan, d.pid, &d.info, how)
                    .map_err(|e| fail_in(d.p, e))?;
                stop.get_or_insert_with(|| s.record_handle());
                Some(s)
            }
            None => None,
        };
        servers.push(server);
    }
    if let Some(job) = table_check.take() {
        job.join()
            .map_err(|_| anyhow!("the page-table check panicked"))?
            .map_err(|e| fail_in(p, e.into()))?;
    }
    phases.add("lazy-setup", t.elapsed());
    let t = Instant::now();
    let procs: Vec<(&Process, i32)> = tree.iter().map(|d| (d.p, d.pid)).collect();
    memory::fill_shared_files(snap, &procs).map_err(|e| fail_in(p, e))?;
    let progress = crate::progress::Bytes::new("copying memory into the instance", None);
    // The contents several processes write are decoded once, then the processes are
    // filled side by side (one alone uses the cores for its own large fills); the first
    // failure in tree order is the one reported.
    let jobs: Vec<memory::FillJob> = tree
        .iter()
        .map(|d| memory::FillJob {
            p: d.p,
            pid: d.pid,
            lazy: &ranges[d.idx],
            shared: shared.map_or(&[][..], |c| &c.procs[d.idx][..]),
        })
        .collect();
    let filled = memory::fill_tree(snap, hot.as_deref(), &jobs, &progress);
    for (d, r) in tree.iter().zip(filled) {
        r.map_err(|e| fail_in(d.p, e))?;
    }
    drop(progress);
    phases.add("eager-pages", t.elapsed());
    let t = Instant::now();
    // Serving starts now: the rest of the restorer (rseq registration reads its area)
    // already faults on lazily served memory.
    // One keeper holds the userfaultfds of all of them.
    let count = servers.iter().flatten().count() as u32;
    let keeper = (count > 0)
        .then(|| keeper::Keeper::spawn(sandbox.init_pidfd(), count))
        .transpose()?;
    let mut n = 0u32;
    let mut run = |s: lazy::Starting, tap| {
        n += 1;
        let keeper = keeper.as_ref().expect("a keeper for every page server");
        s.run(sandbox.init_pidfd(), keeper, n - 1, tap)
    };
    let mut servers = servers.into_iter();
    let lazy = servers
        .next()
        .flatten()
        .map(|s| run(s, stdout_tap))
        .transpose()?;
    let mut tree_lazy = Vec::new();
    for (d, s) in tree.iter().skip(1).zip(servers) {
        if let Some(s) = s {
            tree_lazy.push((d.p.pid, run(s, None)?));
        }
    }
    phases.add("serving", t.elapsed());
    let t = Instant::now();
    let mut parked = Parked {
        tcp_lock,
        warden,
        reaper: std::mem::replace(&mut reaper, reaper::Reaper::disarmed()),
        snap: snap.clone(),
        pid,
        phases,
        lazy,
        tree_lazy,
        notify,
        tree: tree
            .into_iter()
            .map(|d| Ready {
                idx: d.idx,
                pid: d.pid,
                info: d.info,
                tids: d.tids,
            })
            .collect(),
        late_sock,
        sandbox,
        interrupt: opts.interrupt.clone(),
    };
    let mut failed_in = 0;
    let threads = (|| -> Result<()> {
        // Every process goes on at once (they set their threads up side by side); then
        // each is waited for in turn.
        for (i, d) in parked.tree.iter().enumerate() {
            failed_in = i;
            ptrace::cont(d.pid, 0).context("continuing the restorer")?;
        }
        for (i, d) in parked.tree.iter_mut().enumerate() {
            failed_in = i;
            // The leader reports each thread it creates (in creation order, which is the
            // snapshot's thread order), then its own trap; then each thread traps.
            wait_trap(d.pid, &d.info, &mut d.tids)?;
            // A parked process creates its threads when handed out.
            let want = if d.info.late {
                1
            } else {
                m.processes[d.idx].threads.len()
            };
            if d.tids.len() != want {
                bail!("created {} threads, the snapshot has {want}", d.tids.len());
            }
            for &tid in &d.tids[1..] {
                wait_trap(tid, &d.info, &mut Vec::new())?;
            }
        }
        Ok(())
    })();
    if let Err(e) = threads {
        return Err(parked.fail(failed_in, e));
    }
    parked.phases.add("threads", t.elapsed());
    Ok(parked)
}

impl Parked {
    /// The app's pid as seen from here.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether the instance is still there (nothing kills a parked one but others).
    pub fn alive(&self) -> bool {
        matches!(self.sandbox.try_wait(), Ok(None))
    }

    /// Hands the instance its stdio (a parked one: `stdio`; else it has it already) and
    /// lets every process of it go on together.
    /// `listeners`: one listening socket per TCP listener of the snapshot
    /// ([`crate::fds::inet::recorded_listeners`] order), put in place of the parked
    /// instance's placeholders.
    pub fn resume(
        mut self,
        stdio: Option<[BorrowedFd; 3]>,
        listeners: &[BorrowedFd],
        tool: Option<&[u8]>,
    ) -> Result<Restored> {
        let t = Instant::now();
        let mut failed_in = 0;
        let resumed = (|| -> Result<()> {
            let m = &self.snap.manifest;
            if let Some(req) = tool {
                // A parked tool waits on its notify channel for what to run.
                let ours = self
                    .notify
                    .as_ref()
                    .context("a tool's parked instance has no notify channel")?;
                std::io::Write::write_all(&mut std::fs::File::from(ours.try_clone()?), req)
                    .context("writing the tool's request to the notify channel")?;
            }
            if let Some(sock) = &self.late_sock {
                let stdio = stdio.context("a parked instance needs its stdio")?;
                let want = crate::fds::inet::recorded_listeners(m).len();
                if listeners.len() != want {
                    bail!(
                        "a parked instance needs {want} listening sockets, {} given",
                        listeners.len()
                    );
                }
                let fds: Vec<RawFd> = stdio
                    .iter()
                    .chain(listeners)
                    .map(|f| f.as_raw_fd())
                    .collect();
                // The clocks go on from the dump as of now (see program::LateTimeNs): the
                // root's late phase creates the namespace, in tree order before the rest.
                let [mono, boot] = crate::sys::timens::adjusted_targets(&m.clocks)?;
                let text = program::timens_text(
                    mono - crate::sys::timens::now_ns(libc::CLOCK_MONOTONIC),
                    boot - crate::sys::timens::now_ns(libc::CLOCK_BOOTTIME),
                );
                for d in self.tree.iter_mut().filter(|d| d.info.late) {
                    failed_in = d.idx;
                    if let Some(addr) = d.info.timens_text {
                        remote::write(d.pid, addr, &text)
                            .context("writing the clock offsets into the restorer")?;
                    }
                    if d.info.wants_stdio {
                        crate::sys::scm::send(sock.as_fd(), &[1], &fds)
                            .context("sending the stdio")?;
                    }
                    ptrace::cont(d.pid, 0).context("continuing the restorer")?;
                    // A parked process creates its threads now.
                    wait_trap(d.pid, &d.info, &mut d.tids)?;
                    let want = m.processes[d.idx].threads.len();
                    if d.tids.len() != want {
                        bail!("created {} threads, the snapshot has {want}", d.tids.len());
                    }
                    for &tid in &d.tids[1..] {
                        wait_trap(tid, &d.info, &mut Vec::new())?;
                    }
                }
            }
            // The restorers are unmapped in every process at once, then each gets its
            // CPU state.
            for d in &self.tree {
                failed_in = d.idx;
                unmap_restorer(d.pid, &d.info, Unmap::Start)?;
            }
            for d in &self.tree {
                failed_in = d.idx;
                unmap_restorer(d.pid, &d.info, Unmap::Entered)?;
            }
            for d in &self.tree {
                failed_in = d.idx;
                unmap_restorer(d.pid, &d.info, Unmap::Done)?;
                for (&tid, t) in d.tids.iter().zip(&m.processes[d.idx].threads) {
                    load_cpu_state(tid, t, &m.host)?;
                }
                set_oom_score_adj(d.pid, m.processes[d.idx].oom_score_adj)?;
            }
            // Every process is ready: all resume together.
            if let Some(i) = &self.interrupt {
                i.resuming();
            }
            // The root last: one that is the init of its pid namespace may exit at once,
            // ending every process of the namespace, which a detach must not meet.
            for d in self.tree.iter().rev() {
                failed_in = d.idx;
                for &tid in &d.tids {
                    ptrace::detach(tid, 0).context("detaching from the restored process")?;
                }
            }
            Ok(())
        })();
        if let Err(e) = resumed {
            return Err(self.fail(failed_in, e));
        }
        self.phases.add("resume", t.elapsed());
        // Every connection is back: the peers' retransmissions may reach them.
        self.tcp_lock = None;
        self.reaper.disarm();
        Ok(Restored {
            sandbox: self.sandbox,
            pid: self.pid,
            phases: self.phases,
            lazy: self.lazy,
            tree_lazy: self.tree_lazy,
            _notify: self.notify,
            _warden: self.warden,
        })
    }

    /// Kills the instance after `e` in process `idx` (manifest order); the error to
    /// report. A page server that failed has killed the instance, which is what `e`
    /// saw: its reason is the one to report.
    fn fail(self, idx: usize, e: anyhow::Error) -> anyhow::Error {
        let _ = self.sandbox.kill();
        let m = &self.snap.manifest;
        let fail_in = |q: &Process, e: anyhow::Error| {
            e.context(format!(
                "restoring process {} ({}) of snapshot {}",
                q.pid,
                q.comm,
                self.snap.id.short()
            ))
        };
        if let Some(Err(server)) = self.lazy.map(|l| l.finish()) {
            return fail_in(&m.processes[0], server);
        }
        for (q, l) in self.tree_lazy {
            if let Err(server) = l.finish() {
                return server.context(format!(
                    "restoring process {q} of snapshot {}",
                    self.snap.id.short()
                ));
            }
        }
        fail_in(&m.processes[idx], e)
    }
}

/// The host pids of the sandbox's processes, by their pid inside it: the tree under
/// `root` is walked again (once) when a pid is not known yet, not once per process.
struct HostPids {
    root: i32,
    known: std::collections::HashMap<i32, i32>,
}

impl HostPids {
    fn new(root: i32) -> HostPids {
        HostPids {
            root,
            known: Default::default(),
        }
    }

    fn get(&mut self, ns_pid: i32) -> Result<i32> {
        if let Some(&p) = self.known.get(&ns_pid) {
            return Ok(p);
        }
        let mut todo = vec![self.root];
        while let Some(pid) = todo.pop() {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let inner = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|v| v.split_whitespace().last()?.parse::<i32>().ok());
            if let Some(inner) = inner {
                self.known.insert(inner, pid);
            }
            todo.extend(crate::sys::tasks::children(pid));
        }
        self.known.get(&ns_pid).copied().ok_or_else(|| {
            anyhow!("the restoring process {ns_pid} is not among the sandbox's processes")
        })
    }
}

/// A zombie's report: it is about to exit with its status (or why it could not).
fn read_zombie_report(r: OwnedFd) -> Result<()> {
    let mut buf = Vec::new();
    std::fs::File::from(r)
        .read_to_end(&mut buf)
        .context("reading the restoring child's report")?;
    match buf.split_first() {
        Some((&child::MSG_ZOMBIE, _)) => Ok(()),
        Some((&MSG_ERROR, rest)) => Err(anyhow!("{}", String::from_utf8_lossy(rest))),
        _ => Err(anyhow!(
            "the restoring child died before reporting (see its exit status)"
        )),
    }
}

/// `-vv`: the restorer program process `p` is about to run.
fn show_listing(p: &Process, info: &BlobInfo) {
    if let Some(l) = &info.listing {
        tracing::debug!(
            "restorer program of process {} ({}), {} steps, at {:#x}:\n{l}",
            p.pid,
            p.comm,
            l.lines().count(),
            info.base
        );
    }
}

/// Reads the child's report: its error, or the blob it is about to jump into.
fn read_report(r: OwnedFd) -> Result<BlobInfo> {
    let mut buf = Vec::new();
    std::fs::File::from(r)
        .read_to_end(&mut buf)
        .context("reading the restoring child's report")?;
    match buf.split_first() {
        Some((&MSG_BLOB, rest)) => {
            serde_json::from_slice(rest).context("malformed report from the restoring child")
        }
        Some((&MSG_ERROR, rest)) => Err(anyhow!("{}", String::from_utf8_lossy(rest))),
        _ => Err(anyhow!(
            "the restoring child died before reporting (see its exit status)"
        )),
    }
}

fn read_status(pid: i32, info: &BlobInfo) -> Result<Status> {
    let mut buf = vec![0u8; Status::SIZE];
    remote::read(pid, info.status_addr, &mut buf).context("reading the restorer's status")?;
    Ok(Status::decode(&buf))
}

/// Waits for the program's next trap in thread `pid` and checks it reports success;
/// threads it clones on the way are appended to `created`.
fn wait_trap(pid: i32, info: &BlobInfo, created: &mut Vec<i32>) -> Result<()> {
    loop {
        match ptrace::wait(pid)? {
            Stop::Signal(libc::SIGTRAP) => break,
            Stop::Event(libc::PTRACE_EVENT_CLONE) => {
                created.push(ptrace::get_event_msg(pid)? as i32);
                ptrace::cont(pid, 0)?;
            }
            Stop::Signal(sig) => {
                // The executor keeps its step index in r13 (see warmstart_parasite).
                let regs = ptrace::get_regs(pid).unwrap_or([0; reg::COUNT]);
                let step = regs[reg::R13];
                let label = info
                    .labels
                    .get(step as usize)
                    .map(String::as_str)
                    .unwrap_or("?");
                let mut si = [0u8; 128];
                // SAFETY: PTRACE_GETSIGINFO writes one `siginfo_t` (128 bytes) to `data`,
                // which is the live 128-byte buffer `si`; `pid` is our stopped tracee.
                unsafe { libc::ptrace(libc::PTRACE_GETSIGINFO, pid, 0, si.as_mut_ptr()) };
                tracing::debug!(
                    "siginfo code {} addr {:#x}\nmaps:\n{}",
                    i32::from_ne_bytes(si[8..12].try_into().unwrap()),
                    u64::from_ne_bytes(si[16..24].try_into().unwrap()),
                    std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default()
                );
                bail!(
                    "the restorer was hit by signal {sig} ({}) at step {step} ({label}), rip {:#x} r12 {:#x} rsp {:#x}",
                    signal_name(sig),
                    regs[reg::RIP], regs[reg::R12], regs[reg::RSP]
                )
            }
            Stop::Exited(code) => bail!("the restoring process exited with status {code}"),
            Stop::Killed(sig) => bail!(
                "the restoring process was killed by signal {sig} ({})",
                signal_name(sig)
            ),
            other => {
                tracing::debug!(?other, "unexpected stop of the restorer");
                ptrace::cont(pid, 0)?;
            }
        }
    }
    match read_status(pid, info)? {
        Status::Done => Ok(()),
        Status::Failed { step, errno } => {
            let label = info
                .labels
                .get(step as usize)
                .map(String::as_str)
                .unwrap_or("?");
            bail!(
                "restorer step {step} ({label}): {} (errno {errno})",
                std::io::Error::from_raw_os_error(errno)
            )
        }
        other => bail!("the restorer stopped in an unexpected state: {other:?}"),
    }
}

/// The steps of [`unmap_restorer`], each taken for every process of a tree before the
/// next, so that the processes unmap their restorers side by side.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Unmap {
    /// Point the leader (stopped at its last trap, as every thread is) at a `munmap` of
    /// the restorer, run at the blob's `syscall` instruction, and let it enter the call.
    Start,
    /// Wait for the syscall-entry stop; let the call run.
    Entered,
    /// Wait for the syscall-exit stop and check the result. The caller then gives each
    /// thread its saved CPU state and detaches once every process is ready.
    Done,
}

/// One step of unmapping the restorer of the process whose leader is `pid`.
fn unmap_restorer(pid: i32, info: &BlobInfo, step: Unmap) -> Result<()> {
    match step {
        Unmap::Start => {
            let mut regs = ptrace::get_regs(pid)?;
            regs[reg::RIP] = info.syscall_trap;
            regs[reg::RAX] = libc::SYS_munmap as u64;
            regs[reg::RDI] = info.base;
            regs[reg::RSI] = info.map_len;
            regs[reg::ORIG_RAX] = u64::MAX;
            ptrace::set_regs(pid, &regs)?;
            ptrace::syscall(pid, 0)?;
        }
        Unmap::Entered | Unmap::Done => {
            match ptrace::wait(pid)? {
                Stop::Syscall => {}
                other => bail!("unexpected stop while unmapping the restorer: {other:?}"),
            }
            if step == Unmap::Entered {
                ptrace::syscall(pid, 0)?;
                return Ok(());
            }
            let after = ptrace::get_regs(pid)?;
            if after[reg::RAX] != 0 {
                bail!(
                    "unmapping the restorer failed: {}",
                    std::io::Error::from_raw_os_error(-(after[reg::RAX] as i64) as i32)
                );
            }
        }
    }
    Ok(())
}

/// Gives process `pid` the `oom_score_adj` it had (unless it has it already). Lowering
/// it below what it inherited takes `CAP_SYS_RESOURCE`: without it the restore fails,
/// naming the value, rather than leaving the process easier to kill than it was.
fn set_oom_score_adj(pid: i32, want: i32) -> Result<()> {
    let path = format!("/proc/{pid}/oom_score_adj");
    let now = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    if now.trim().parse::<i32>().ok() == Some(want) {
        return Ok(());
    }
    std::fs::write(&path, want.to_string()).map_err(|e| {
        let hint = if e.raw_os_error() == Some(libc::EACCES) {
            " (lowering it takes CAP_SYS_RESOURCE, which warmstart lacks here: restore as \
             a user that has it, or with a restorer whose own oom_score_adj is at most \
             this)"
        } else {
            ""
        };
        anyhow::anyhow!("setting the process's oom_score_adj to {want}: {e}{hint}")
    })
}

fn load_cpu_state(
    pid: i32,
    t: &warmstart_snapshots::model::Thread,
    host: &warmstart_snapshots::model::HostFacts,
) -> Result<()> {
    let saved: ptrace::Regs = t
        .regs
        .as_slice()
        .try_into()
        .context("snapshot thread registers have the wrong size")?;
    ptrace::set_regs(pid, &saved).context("loading the saved registers")?;
    let xsave = checks::xsave_for_here(host, &t.xsave, pid)?;
    ptrace::set_xstate(pid, &xsave).context("loading the saved xsave state")?;
    ptrace::set_sigmask(pid, t.sigmask).context("loading the saved signal mask")?;
    crate::sys::sched::set(pid, &t.attrs).map_err(|e| anyhow::anyhow!("thread {}: {e}", t.tid))?;
    Ok(())
}

pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGABRT => "SIGABRT",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGFPE => "SIGFPE",
        libc::SIGHUP => "SIGHUP",
        libc::SIGPIPE => "SIGPIPE",
        _ => "signal",
    }
}

/// `restore -d`: the monitor becomes a daemon that restores and waits; the caller gets
/// the restored pid (or the error) and returns at once.
pub fn detached<R>(
    snap: &Arc<Snapshot>,
    opts: &RestoreOptions,
    display_stats: bool,
    register: &dyn Fn(i32) -> R,
) -> Result<i32> {
    let (r, w) = remote::pipe().context("pipe2")?;
    // SAFETY: `restore -d` runs this from the CLI's main thread before any thread of
    // warmstart is started, so the child is a full copy of a single-threaded process (and
    // glibc's `fork` resets its own locks in the child anyway).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("fork");
    }
    if pid == 0 {
        drop(r);
        // SAFETY: no arguments; acts on this process only.
        unsafe { libc::setsid() };
        let mut w = std::fs::File::from(w);
        let code = match restore_listed(snap, opts, register) {
            Ok((restored, _listed)) => {
                if let Some(c) = &opts.cgroups {
                    c.keep();
                }
                if display_stats {
                    eprintln!("restore of {}:\n{}", snap.id.short(), restored.phases);
                }
                let _ = std::io::Write::write_all(&mut w, format!("P{}", restored.pid).as_bytes());
                drop(w);
                // The instance has the caller's stdio now; the daemon lets go of it so a
                // caller reading our output to its end is not held up by us.
                // SAFETY: a static NUL-terminated path; the fd is kept open to the end of
                // this process.
                let null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
                for fd in 0..3 {
                    // SAFETY: integer arguments only: fds 0-2 of this process are replaced
                    // by /dev/null; the `std` handles on them refer to numbers, not to what
                    // they held.
                    unsafe { libc::dup2(null, fd) };
                }
                match restored.wait() {
                    Ok((code, _)) => code,
                    Err(e) => {
                        tracing::error!("{e:#}");
                        1
                    }
                }
            }
            Err(e) => {
                // `_exit` below runs no destructor: what was created goes now.
                if let Some(c) = &opts.cgroups {
                    c.remove_created();
                }
                let _ = std::io::Write::write_all(
                    &mut w,
                    format!("E{}", crate::report::error_line(&e)).as_bytes(),
                );
                1
            }
        };
        // SAFETY: `_exit` ends the forked daemon without returning into the caller's frames
        // or running atexit handlers.
        unsafe { libc::_exit(code) };
    }
    drop(w);
    // The restoring child owns the cgroups it created (and removes them if it fails).
    if let Some(c) = &opts.cgroups {
        c.keep();
    }
    let mut msg = String::new();
    std::fs::File::from(r)
        .read_to_string(&mut msg)
        .context("reading the detached monitor's report")?;
    // Reap the daemon only if it already gave up; otherwise it lives on by itself.
    match msg.split_at_checked(1) {
        Some(("P", pid)) => {
            println!("{pid}");
            Ok(0)
        }
        Some(("E", err)) => {
            let mut status = 0;
            // SAFETY: `status` is a live local; `pid` is our own child, not yet reaped, so
            // it cannot name another process.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            bail!("{err}")
        }
        _ => bail!("the restore monitor died before reporting"),
    }
}

/// Keeps the working sets a lazy run learned (per process, by pid in the snapshot): in
/// the snapshot, and their hot pages.
pub fn keep_working_sets(snap: &Snapshot, sets: &std::collections::BTreeMap<i32, Vec<u64>>) {
    if let Err(e) = snap.save_working_sets(sets) {
        tracing::warn!(
            "working set of snapshot {} not kept: {e:#}",
            snap.id.short()
        );
        return;
    }
    let all: Vec<u64> = sets.values().flatten().copied().collect();
    save_hot(snap, &all);
}

/// Page-table indexes of the pages a lazy restore of `m` writes before the app resumes
/// (those userfaultfd cannot serve: see [`memory::eager_indexes`]), every process's.
pub fn eager_pages(m: &warmstart_snapshots::model::Manifest) -> Vec<u64> {
    (m.processes.iter())
        .flat_map(|p| memory::eager_indexes(p, &crate::lazy::plan(p).ranges))
        .collect()
}

/// Stores the hot pages of `snap` (see `warmstart_snapshots::store::Hot`): the learned
/// `working_set` and the pages every restore writes eagerly. Advice only: a failure is
/// a warning.
fn save_hot(snap: &Snapshot, working_set: &[u64]) {
    if let Err(e) = snap.verify_table() {
        tracing::warn!("hot pages of snapshot {} not stored: {e}", snap.id.short());
        return;
    }
    let mut pages = working_set.to_vec();
    pages.extend(eager_pages(&snap.manifest));
    if let Err(e) = snap.save_hot(&pages) {
        tracing::warn!("hot pages of snapshot {} not stored: {e}", snap.id.short());
    }
}
