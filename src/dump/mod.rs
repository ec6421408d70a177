//! Dump: freeze a process, collect its state from outside (`/proc`, ptrace) and inside
//! (the parasite), write its memory into the page store and commit a manifest.
//!
//! The steps, in order: [`freeze`], [`process::collect`], [`threads::collect`],
//! [`inject`] (state only the process can read about itself), VMAs and memory
//! ([`vmas`], [`memory`]), fds ([`files`]); then commit, then kill or release the target.

pub mod files;
pub mod freeze;
pub mod hashes;
pub mod inject;
pub mod memory;
pub mod namespaces;
pub mod predump;
pub mod process;
pub mod seccomp;
pub mod shared_files;
pub mod threads;
pub mod timers;
pub mod tmp;
pub mod track;
pub mod vmas;

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use warmstart_snapshots::model::{Creds, Manifest, PosixTimer, Process, SigInfo};
use warmstart_snapshots::store::{SnapshotId, Store};
use warmstart_snapshots::{PageWriter, RemoteWriter};

pub use files::StdioPolicy;
pub use freeze::Frozen;

use crate::stats::Phases;
use crate::sys::ptrace;

pub struct DumpOptions {
    pub leave_running: bool,
    /// With `leave_running`: resume the threads but stay their tracer (the caller goes on
    /// tracing, e.g. `record`, whose seccomp trap needs a tracer).
    pub keep_traced: bool,
    /// After the dump, leave the process stopped (SIGSTOP) rather than running or killed.
    pub leave_stopped: bool,
    pub stdio: StdioPolicy,
    /// Dump established TCP connections as reset connections instead of refusing them.
    pub tcp_close: bool,
    /// Dump established TCP connections with `TCP_REPAIR` ([`crate::fds::tcp`]).
    pub tcp_established: bool,
    pub trigger: String,
    pub command: Vec<String>,
    pub name: Option<String>,
    /// Seccomp filters at the bottom of the stack that are warmstart's own (the
    /// warm-point trap of `record`), left out of the snapshot.
    pub own_seccomp_filters: usize,
    /// The tree runs with a private `/tmp` (`record`): its files go into the snapshot.
    pub private_tmp: bool,
    /// `record --tool`: the tool the snapshot holds at its entry point.
    pub tool: Option<warmstart_snapshots::model::ToolInfo>,
    /// `--manage-cgroups`: record the tree's cgroups ([`crate::cgroup::collect`]).
    pub manage_cgroups: bool,
    /// `record --cpu-baseline`: the level CPUID showed the tree; the snapshot's CPU
    /// features are those it let the tree see.
    pub cpu_baseline: Option<crate::sys::cpuid::Baseline>,
}

pub struct DumpResult {
    pub id: SnapshotId,
    pub manifest: Manifest,
    pub phases: Phases,
    /// How long the tree was frozen (from the freeze until it was killed or released).
    pub frozen: std::time::Duration,
    /// Pages read from the tree, and taken from the previous image (`--prev`).
    pub counts: track::Counts,
}

/// The previous image of `dump --prev` and `pre-dump --prev`.
#[derive(Clone, Copy, Debug)]
pub struct Prev<'a> {
    pub id: &'a SnapshotId,
    /// CRIU's `--prev-images-dir`: the image directory holding it, whose packs the
    /// destination has adopted ([`Store::adopt_packs`]); else it is in the destination.
    pub dir: Option<&'a Store>,
}

/// Where a dump's memory and manifest go.
#[derive(Clone, Copy)]
pub enum Destination<'a> {
    Store(&'a Store),
    /// A page server's store (`HOST:PORT`), e.g. on the machine that restores; over TLS
    /// when given.
    PageServer(
        &'a str,
        Option<&'a warmstart_snapshots::remote::tls::ClientTls>,
    ),
}

/// Dumps process `pid` and all its descendants (seizing them, except what `frozen` says
/// the caller already holds of `pid`). On success the tree is killed unless
/// `leave_running`/`leave_stopped`; on failure it is released untouched (running as
/// before), unless `keep_traced` (`record`'s own app, which is killed).
pub fn dump(
    pid: i32,
    frozen: Option<Frozen>,
    store: &Store,
    opts: &DumpOptions,
) -> Result<DumpResult> {
    dump_to(pid, frozen, Destination::Store(store), opts)
}

/// [`dump`] to a store or to a page server.
pub fn dump_to(
    pid: i32,
    frozen: Option<Frozen>,
    dest: Destination<'_>,
    opts: &DumpOptions,
) -> Result<DumpResult> {
    dump_after(pid, frozen, dest, opts, None)
}

/// [`dump_to`]; with `prev`, the pages not written since pre-dump `prev` are taken from
/// it (`dump --prev`, see [`track`]). The write tracking ends with this dump.
pub fn dump_after(
    pid: i32,
    frozen: Option<Frozen>,
    dest: Destination<'_>,
    opts: &DumpOptions,
    prev: Option<Prev<'_>>,
) -> Result<DumpResult> {
    process::check_target(pid)?;
    let mut tracking = match prev {
        Some(p) => predump::previous(pid, Some(p.id))?,
        None => None,
    };
    let mut tree = freeze::Tree::default();
    let mut phases = Phases::default();
    let mut counts = track::Counts::default();
    // Before the freeze: loading the store's index or connecting to the page server is
    // no time the app has to stand still for.
    let t = Instant::now();
    let mut writer = match dest {
        Destination::Store(store) => PageWriter::Local(store.writer()?),
        Destination::PageServer(addr, tls) => {
            PageWriter::Remote(RemoteWriter::begin_tls(addr, tls)?)
        }
    };
    if let Some(t) = tracking.as_mut() {
        let dir = prev.and_then(|p| p.dir);
        if !predump::use_base(&mut writer, &SnapshotId(t.state.snapshot), dir) {
            for p in &mut t.state.procs {
                p.slots.clear();
            }
        }
    }
    phases.add("open the destination", t.elapsed());
    let t = Instant::now();
    let res = freeze::freeze_tree(pid, frozen.unwrap_or_default(), &mut tree).and_then(|()| {
        phases.add("freeze", t.elapsed());
        collect_and_store(
            &tree,
            writer,
            opts,
            &mut phases,
            tracking.as_ref(),
            &mut counts,
        )
    });
    match res {
        Ok((id, manifest, held)) => {
            // Until the tree is let go, or killed (set below).
            let mut frozen = None;
            let killed = !opts.leave_stopped && !opts.leave_running;
            // Established connections: with the tree going on, repair mode goes off and
            // the lock goes (the peer retransmits what was dropped, to the same socket).
            let held = if killed {
                Some(held)
            } else {
                held.resume();
                None
            };
            if opts.leave_stopped {
                for f in tree.processes() {
                    release(f);
                    // SAFETY: kill takes integer arguments only; no memory is passed.
                    unsafe { libc::kill(f.pid, libc::SIGSTOP) };
                }
                // Stopped when we return, as `-s` promises, not a moment later.
                for f in tree.processes() {
                    if !freeze::wait_stopped(f.pid, std::time::Duration::from_secs(5)) {
                        tracing::warn!("process {} did not stop after SIGSTOP", f.pid);
                    }
                }
            } else if opts.leave_running && opts.keep_traced {
                for f in tree.processes() {
                    resume(f, ptrace::cont);
                }
            } else if opts.leave_running {
                for f in tree.processes() {
                    release(f);
                }
            } else {
                // Frozen until killed (CRIU's "frozen time"); the exits (the kernel
                // freeing the memory) are waited for, and shown, apart.
                send_kill(&tree);
                frozen = Some(t.elapsed());
                let t = Instant::now();
                reap_killed(&tree);
                phases.add("exit of the killed tree", t.elapsed());
                // Closed in repair mode: no FIN or RST; the lock stays for the restore.
                if let Some(h) = held {
                    h.close_killed();
                }
            }
            Ok(DumpResult {
                id,
                manifest,
                phases,
                frozen: frozen.unwrap_or_else(|| t.elapsed()),
                counts,
            })
        }
        Err(e) if opts.keep_traced => {
            // `record`'s own app: released, it would run into its warm-point trap with
            // no tracer (ENOSYS from the filter) before `record` could stop it.
            kill_tree(&tree);
            Err(e)
        }
        Err(e) => {
            for f in tree.processes() {
                release(f);
            }
            Err(e)
        }
    }
}

/// Kills every process of the tree and collects the exits of our traced threads, so the
/// kill is complete before we return (a leader's exit is reported only after all the
/// others').
fn kill_tree(tree: &freeze::Tree) {
    send_kill(tree);
    reap_killed(tree);
}

fn send_kill(tree: &freeze::Tree) {
    for f in tree.processes() {
        // SAFETY: kill takes integer arguments only; no memory is passed.
        unsafe { libc::kill(f.pid, libc::SIGKILL) };
    }
}

/// Collects the exits of a killed tree's traced threads, the root's last: a root that is
/// the init of its pid namespace exits only once every other task of the namespace is
/// reaped, and the traced ones only by us.
fn reap_killed(tree: &freeze::Tree) {
    let all: Vec<&Frozen> = tree.processes().collect();
    for f in all.into_iter().rev() {
        for tid in f.tids().into_iter().filter(|&t| t != f.pid) {
            let _ = ptrace::wait(tid);
        }
        let _ = ptrace::wait(f.pid);
    }
}

/// Detaches from every thread, re-delivering signals that freezing dequeued.
pub fn release(frozen: &Frozen) {
    resume(frozen, ptrace::detach)
}

/// Lets every thread go on (`detach` or `cont`), re-delivering signals that freezing
/// dequeued.
fn resume(frozen: &Frozen, go: fn(i32, i32) -> std::io::Result<()>) {
    for t in frozen.threads.values() {
        let sig = t
            .caught
            .first()
            .map(|s| i32::from_ne_bytes(s[0..4].try_into().unwrap()))
            .unwrap_or(0);
        let _ = go(t.tid, sig);
        for s in t.caught.iter().skip(1) {
            let sig = i32::from_ne_bytes(s[0..4].try_into().unwrap());
            // SAFETY: tgkill takes integer arguments only (tgid, tid, signal number).
            unsafe { libc::syscall(libc::SYS_tgkill, frozen.pid, t.tid, sig) };
        }
    }
}

/// Time spent per phase, summed over the processes of a tree, the progress of the
/// memory written (shown on a terminal) and its page counts; the write tracking a
/// `--prev` dump takes unwritten pages by.
#[derive(Default)]
struct PhaseTimes<'t> {
    collect: std::time::Duration,
    parasite: std::time::Duration,
    memory: std::time::Duration,
    memory_progress: Option<crate::progress::Bytes>,
    counts: track::Counts,
    tracking: Option<&'t track::Tracking>,
}

fn collect_and_store(
    tree: &freeze::Tree,
    mut writer: PageWriter<'_>,
    opts: &DumpOptions,
    phases: &mut Phases,
    tracking: Option<&track::Tracking>,
    counts: &mut track::Counts,
) -> Result<(SnapshotId, Manifest, crate::fds::tcp::Held)> {
    let root = tree.order[0];
    // Read first, as close to the freeze as possible: a restore's clocks go on from here.
    let clocks = crate::sys::timens::clocks_of(root)?;
    let mut files = files::TreeFiles::default();
    files.scan_ptys(&tree.order)?;
    let mut objects = shared_files::SharedFiles::default();
    let mut times = PhaseTimes {
        memory_progress: Some(crate::progress::Bytes::new(
            "writing the memory of the snapshot",
            None,
        )),
        tracking,
        ..Default::default()
    };
    let mut processes = Vec::with_capacity(tree.order.len());
    let mut file_locks = Vec::new();
    let mut xsave_size = 0;
    let depth = process::pid_ns_depth(root);
    let mut private = crate::private_dirs::dirs();
    if opts.private_tmp {
        private.push("/tmp".to_owned());
    }
    let t = Instant::now();
    // Zombies have no namespaces left to show.
    let live: Vec<i32> = (tree.order.iter().copied())
        .filter(|p| *p == root || tree.frozen.contains_key(p))
        .collect();
    let namespaces = namespaces::collect(&live, &private, &mut writer)?;
    phases.add("namespaces", t.elapsed());
    let hashing = hashes::start(tree.order.clone(), private.clone());
    // Sockets are looked up with sock_diag in the tree's network namespace (each
    // namespace has its own); the threads started before (hashing) stay in ours.
    let _netns = match namespaces.net {
        Some(_) => Some(crate::sys::ns::NetnsGuard::enter(root)?),
        None => None,
    };
    for &pid in &tree.order {
        if process::pid_ns_depth(pid) != depth {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            bail!(
                "process {pid} ({}) lives in a pid namespace of its own, nested in its \
                 parent's: nested namespaces inside the app are not supported yet",
                comm.trim()
            );
        }
        let Some(frozen) = tree.frozen.get(&pid) else {
            processes.push(process::zombie(pid)?);
            continue;
        };
        let (p, locks) = collect_process(
            pid,
            frozen,
            opts,
            &mut files,
            &mut objects,
            &mut writer,
            &mut times,
        )?;
        if xsave_size == 0 {
            xsave_size = p.threads[0].xsave.len() as u32;
        }
        file_locks.extend(locks);
        processes.push(p);
    }
    objects.link_fds(&tree.order, &mut processes)?;
    let t = Instant::now();
    let pre = hashing.join().unwrap_or_default();
    hashes::fill(&mut processes, &private, &pre);
    phases.add("hash files (rest)", t.elapsed());
    let private_tmp = if opts.private_tmp {
        let t = Instant::now();
        let entries = tmp::collect(root, &mut writer)?;
        phases.add("private tmp", t.elapsed());
        Some(entries)
    } else {
        None
    };
    let cgroups = if opts.manage_cgroups {
        Some(crate::cgroup::collect(&tree.order)?)
    } else {
        None
    };
    let root_comm = processes[0].comm.clone();
    // Held in repair mode until the tree is killed or released; on an error below,
    // dropped: repair mode off, lock released.
    let held = files.take_tcp();
    let shared = files.finish(root, &root_comm)?;
    phases.add("collect", times.collect);
    phases.add("parasite", times.parasite);
    phases.add("memory", times.memory);
    *counts = times.counts;
    times.memory_progress = None; // cleared from the terminal
    let manifest = Manifest {
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        command: opts.command.clone(),
        trigger: opts.trigger.clone(),
        host: {
            let mut h = crate::sys::vdso::host_facts(xsave_size)?;
            if let Some(b) = opts.cpu_baseline {
                h.cpu_features = crate::sys::cpuid::features_seen(Some(b));
                h.cpu_baseline = Some(b.name().to_owned());
            }
            h
        },
        clocks,
        processes,
        pipes: shared.pipes,
        unix_pairs: shared.unix_pairs,
        file_locks,
        page_count: 0,
        pages_hash: [0; 32],
        shared_files: objects.finish(),
        private_tmp,
        tool: opts.tool.clone(),
        unix_queues: shared.unix_queues,
        cgroups,
        namespaces,
    };
    // Refuse now, while the tree is still there to run, what a restore could not rebuild.
    crate::tree_check::tree(&manifest)?;
    let t = Instant::now();
    let (id, flush) = writer.commit_timed(manifest.clone(), opts.name.as_deref())?;
    phases.add("commit", t.elapsed().saturating_sub(flush));
    phases.add("flush to disk", flush);
    Ok((id, manifest, held))
}

/// Everything of one frozen process; its memory goes to `writer`, shared objects to
/// `files`.
fn collect_process(
    pid: i32,
    frozen: &Frozen,
    opts: &DumpOptions,
    files: &mut files::TreeFiles,
    objects: &mut shared_files::SharedFiles,
    writer: &mut PageWriter<'_>,
    times: &mut PhaseTimes<'_>,
) -> Result<(Process, Vec<warmstart_snapshots::model::FileLock>)> {
    let t = Instant::now();
    let info = process::collect(pid)?;
    if !frozen.threads.contains_key(&pid) {
        bail!(
            "process {pid} ({}): its main thread has exited while other threads run; \
             such a process cannot be checkpointed",
            info.comm
        );
    }
    // The leader first: restore creates the other threads from it.
    let order: Vec<&freeze::FrozenThread> = std::iter::once(&frozen.threads[&pid])
        .chain(frozen.threads.values().filter(|t| t.tid != pid))
        .collect();
    let mut threads = Vec::new();
    let mut raw_regs = Vec::new();
    for ft in &order {
        let (th, raw) = threads::collect(pid, ft)?;
        threads.push(th);
        raw_regs.push((ft.tid, raw, ft.kind));
    }
    let (fds, file_locks) = files::collect_in_tree(
        pid,
        &info.comm,
        &files::CollectOptions {
            stdio: opts.stdio.clone(),
            tcp_close: opts.tcp_close,
            tcp_established: opts.tcp_established,
            take_queued: !opts.leave_running && !opts.leave_stopped,
        },
        files,
    )?;
    let smaps =
        crate::sys::maps::read_smaps(pid).with_context(|| format!("reading /proc/{pid}/smaps"))?;
    let proc_timers = timers::read(pid)?;
    let timer_ids: Vec<i32> = proc_timers.iter().map(|t| t.id).collect();
    let seccomp_filters = seccomp::filters(pid, info.seccomp_mode, opts.own_seccomp_filters)
        .with_context(|| format!("process {pid} ({})", info.comm))?;
    // What a restore gives the whole process, every other thread must have as the
    // main thread has it: the seccomp filters and the filesystem context.
    if raw_regs.len() > 1 {
        let leader_fs = process::fs_context(pid, pid, &process::thread_status(pid, pid)?)?;
        for &(tid, _, _) in raw_regs.iter().filter(|r| r.0 != pid) {
            let status = process::thread_status(pid, tid)?;
            seccomp::check_thread(tid, &status, &seccomp_filters, opts.own_seccomp_filters)
                .and_then(|()| {
                    let theirs = process::fs_context(pid, tid, &status)?;
                    process::check_shared_fs(tid, &theirs, &leader_fs)
                })
                .with_context(|| format!("process {pid} ({})", info.comm))?;
        }
    }
    times.collect += t.elapsed();

    // Per-thread state only the thread can read about itself; the process-wide part
    // (handlers, brk, dumpable) is taken from the leader's run.
    let t = Instant::now();
    let mut leader = None;
    for (th, &(tid, raw, kind)) in threads.iter_mut().zip(&raw_regs) {
        let ids: &[i32] = if tid == pid { &timer_ids } else { &[] };
        let inside =
            inject::collect_inside(pid, tid, &raw, kind, &smaps, ids).with_context(|| {
                format!(
                    "running the parasite in process {pid} ({}) thread {tid}",
                    info.comm
                )
            })?;
        th.sigaltstack = inside.sigaltstack;
        th.tid_address = inside.tid_address;
        th.attrs.pdeathsig = inside.pdeathsig;
        leader.get_or_insert(inside);
    }
    let inside = leader.expect("the leader thread is always present");
    let main_tid = pid;
    times.parasite += t.elapsed();

    let t = Instant::now();
    let vmas = vmas::collect(pid, &info.comm, &smaps, objects, writer, times)?;
    times.memory += t.elapsed();

    let ns_tids: Vec<i32> = threads.iter().map(|t| t.tid).collect();
    let mut mm = info.mm;
    mm.brk = inside.brk;
    let private_files = private_files(pid, &vmas, &fds)?;
    let process = Process {
        pid: info.pid_in_ns,
        ppid: info.ppid,
        pgid: info.pgid,
        sid: info.sid,
        comm: info.comm,
        exe: info.exe,
        creds: Creds {
            securebits: inside.securebits,
            ..info.creds
        },
        rlimits: info.rlimits,
        cwd: info.cwd,
        root: info.root,
        umask: info.umask,
        personality: info.personality,
        no_new_privs: info.no_new_privs,
        dumpable: inside.dumpable,
        mm,
        auxv: info.auxv,
        vmas,
        fds,
        sigactions: inside.sigactions,
        shared_pending: ptrace::peek_siginfo(main_tid, true)?
            .into_iter()
            .map(|s| SigInfo(s.to_vec()))
            .collect(),
        threads,
        itimers: inside.itimers,
        posix_timers: proc_timers
            .iter()
            .zip(&inside.posix_timers)
            .map(|(t, &(interval_ns, value_ns))| PosixTimer {
                id: t.id,
                clock: t.clock,
                signo: t.signo,
                sigval: t.sigval,
                notify: t.notify,
                // /proc shows the target as seen from here: map it to the app's own tid.
                notify_tid: raw_regs
                    .iter()
                    .position(|r| r.0 == t.target)
                    .map(|i| ns_tids[i])
                    .unwrap_or(info.pid_in_ns),
                interval_ns,
                value_ns,
            })
            .collect(),
        seccomp_filters,
        private_files,
        zombie: None,
        zombie_sigmask: 0,
        fd_table_size: info.fd_table_size,
        ctty: files.ctty(pid),
        child_subreaper: inside.child_subreaper,
        thp_disable: inside.thp_disable,
        oom_score_adj: std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj"))
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("reading /proc/{pid}/oom_score_adj"))?,
    };
    Ok((process, file_locks))
}

/// Contents of the files in instance-private directories that the process maps or holds
/// open, read through `/proc/PID/map_files` and `/proc/PID/fd` (the directory is the
/// sandbox's own tmpfs, invisible from here by path).
fn private_files(
    pid: i32,
    vmas: &[warmstart_snapshots::model::Vma],
    fds: &[warmstart_snapshots::model::Fd],
) -> Result<Vec<warmstart_snapshots::model::PrivateFile>> {
    use std::os::unix::fs::MetadataExt;
    use warmstart_snapshots::model::{FileDesc, PrivateFile, VmaKind};
    let dirs = crate::private_dirs::dirs();
    let mut out: Vec<PrivateFile> = Vec::new();
    let mut add = |path: &str, via: String| -> Result<()> {
        if !crate::private_dirs::is_private(&dirs, path) || out.iter().any(|f| f.path == path) {
            return Ok(());
        }
        let meta = std::fs::metadata(&via).with_context(|| format!("stat of {path} ({via})"))?;
        let data = std::fs::read(&via).with_context(|| format!("reading {path} ({via})"))?;
        out.push(PrivateFile {
            path: path.to_owned(),
            mode: meta.mode(),
            data,
        });
        Ok(())
    };
    for v in vmas {
        if let VmaKind::File { file } = &v.kind {
            add(
                &file.path,
                format!("/proc/{pid}/map_files/{:x}-{:x}", v.start, v.end),
            )?;
        }
    }
    for f in fds {
        if let FileDesc::Regular { file, .. } = &f.file {
            add(&file.path, format!("/proc/{pid}/fd/{}", f.fd))?;
        }
    }
    Ok(out)
}
