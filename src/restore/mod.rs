//! Restore: rebuild a snapshot's process in a fresh sandbox and hand it back its CPU.
//!
//! The monitor (this process) checks the host and files, spawns the sandbox with the
//! restoring child ([`child`]) at the recorded pid, seizes it, and then drives the
//! restorer program ([`program`]) through its two traps:
//!
//! 1. layout built → the monitor writes memory ([`memory`]) and continues;
//! 2. per-thread state set → the monitor unmaps the restorer by running one `munmap`
//!    at the blob's `syscall` instruction, loads the saved registers (incl. `fs_base`),
//!    xsave state and signal mask, and detaches: the app resumes where it was frozen.
//!
//! Ending with ptrace rather than an in-process `rt_sigreturn` lets the restorer be
//! unmapped completely (nothing of it remains in `/proc/PID/maps`) and restores the
//! full xsave state through the kernel's own validation.

pub mod checks;
pub mod child;
pub mod lazy;
pub mod memory;
pub mod program;

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use warmstart_launcher::{Sandbox, SpawnOptions};
use warmstart_parasite::Status;
use warmstart_snapshots::model::{reg, FileDesc};
use warmstart_snapshots::store::Snapshot;

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
    /// The page server of a lazy restore, running.
    pub lazy: Option<lazy::Running>,
    /// Our end of the app's notify channel, kept open while it runs.
    _notify: Option<OwnedFd>,
}

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Serve private anonymous memory on demand with userfaultfd (else copy it all).
    pub lazy: bool,
    /// Pages to copy before the app resumes (the learned working set).
    pub prefetch: Option<Vec<u64>>,
    /// Learn the working set: record faults until the app first writes to stdout.
    pub learn: bool,
    /// The snapshot was opened with `Store::load_deferred`: check its page table while
    /// restoring (before the app resumes when eager; alongside the page server when lazy).
    pub verify_table: bool,
}

impl Restored {
    /// Waits for the instance, forwarding SIGINT/SIGTERM/SIGHUP; returns its exit code
    /// and, for a lazy restore, what the page server did. A page server that failed
    /// has killed the instance: that is an error, never a silent exit code.
    pub fn wait(self) -> Result<(i32, Option<lazy::Outcome>)> {
        let code = self.sandbox.forward_signals()?;
        match self.lazy {
            None => Ok((code, None)),
            Some(run) => {
                let outcome = run.finish()?;
                Ok((code, Some(outcome)))
            }
        }
    }
}

/// The signals a monitor forwards to its instance. They are blocked before any helper
/// thread starts (threads inherit the mask), so none of them can take such a signal and
/// die of it: the signalfd of `forward_signals` receives them all.
pub fn block_forwarded_signals() {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

pub fn restore(snap: &Arc<Snapshot>, opts: &RestoreOptions) -> Result<Restored> {
    let m = &snap.manifest;
    let mut phases = Phases::default();
    let t = Instant::now();
    let [p] = m.processes.as_slice() else {
        bail!(
            "snapshot {} holds {} processes: restoring process trees is not supported yet",
            snap.id.short(),
            m.processes.len()
        );
    };
    checks::host(&m.host)?;
    checks::unchanged_files(m)?;
    phases.add("checks", t.elapsed());

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
                    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
                    snap.verify_table()
                })
                .context("starting the page-table check")
        })
        .transpose()?;
    let t = Instant::now();
    let plan = opts.lazy.then(|| crate::lazy::plan(p));
    let ranges: Vec<(u64, u64)> = plan.as_ref().map(|p| p.ranges.clone()).unwrap_or_default();
    let ranges = ranges.as_slice();
    // Learning the working set ends at the app's first output: its stdout goes through
    // a pipe we copy from, for this run only.
    let stdout_tap = if opts.learn {
        Some(remote::pipe().context("pipe2")?)
    } else {
        None
    };
    let stdio = stdout_tap.as_ref().map(|(_, w)| [0, w.as_raw_fd(), 2]);
    // A `--ready notify` app is waiting in a read of its notify channel: it gets a new
    // one whose first bytes say it was restored.
    let notify = if p
        .fds
        .iter()
        .any(|f| f.file == FileDesc::External { stdio: 3 })
    {
        let (ours, app) = socketpair()?;
        let mut w = std::fs::File::from(ours.try_clone()?);
        std::io::Write::write_all(&mut w, warmstart_launcher::warmpoint::RESTORED_MSG)
            .context("writing RESTORED=1 to the notify channel")?;
        Some((ours, app))
    } else {
        None
    };
    let (status_r, status_w) = remote::pipe().context("pipe2")?;
    let status_w_raw = status_w.as_raw_fd();
    let spawn_t = Instant::now();
    let sandbox = warmstart_launcher::spawn(
        &SpawnOptions {
            pid: Some(p.pid),
            gate: true,
            stdio,
        },
        || {
            child::run(
                m,
                p,
                ranges,
                notify.as_ref().map(|(_, app)| app.as_raw_fd()),
                status_w_raw,
            )
        },
    )
    .context("starting the sandbox")?;
    drop(status_w);
    // The app has its end; ours stays open while the instance runs (in `Restored`).
    let notify = notify.map(|(ours, _app)| ours);
    tracing::debug!("sandbox spawned in {:?}", spawn_t.elapsed());
    let stdout_tap = stdout_tap.map(|(r, _w)| r);
    let pid = sandbox.app_pid;
    ptrace::seize(
        pid,
        ptrace::O_EXITKILL
            | ptrace::O_TRACESYSGOOD
            | ptrace::O_TRACECLONE
            | ptrace::O_SUSPEND_SECCOMP,
    )
    .with_context(|| format!("seizing the restoring process {pid}"))?;
    sandbox
        .release()
        .context("releasing the restoring process")?;
    let info = read_report(status_r).with_context(|| {
        format!(
            "restoring process {} of snapshot {}",
            p.pid,
            snap.id.short()
        )
    })?;
    phases.add("child", t.elapsed());

    let fail = |e: anyhow::Error| {
        e.context(format!(
            "restoring process {} of snapshot {}",
            p.pid,
            snap.id.short()
        ))
    };
    let t = Instant::now();
    wait_trap(pid, &info, &mut Vec::new()).map_err(fail)?;
    phases.add("layout", t.elapsed());
    let t = Instant::now();
    let hot = hot_job.join().unwrap_or(None);
    phases.add("hot-pages", t.elapsed());
    // The eager pages go in through /proc/PID/mem on one thread while the page server
    // takes the userfaultfd and prefetches on this one: neither needs the other.
    let t = Instant::now();
    let (server, filled) = std::thread::scope(|scope| {
        let fill = scope.spawn(|| memory::fill(snap, hot.as_deref(), p, pid, ranges));
        let server = plan
            .map(|plan| {
                lazy::start(
                    snap,
                    hot.clone(),
                    table_check.take(),
                    plan,
                    pid,
                    &info,
                    opts,
                )
            })
            .transpose();
        let filled = fill
            .join()
            .unwrap_or_else(|_| Err(anyhow!("the memory writer panicked")));
        (server, filled)
    });
    let server = server.map_err(fail)?;
    filled.map_err(fail)?;
    if let Some(job) = table_check.take() {
        job.join()
            .map_err(|_| anyhow!("the page-table check panicked"))?
            .map_err(|e| fail(e.into()))?;
    }
    phases.add("memory", t.elapsed());
    let t = Instant::now();
    // Serving starts now: the rest of the restorer (rseq registration reads its area)
    // already faults on lazily served memory.
    let lazy = server
        .map(|s| s.run(sandbox.init_pidfd(), stdout_tap))
        .transpose()?;
    phases.add("serve-start", t.elapsed());
    let t = Instant::now();
    let resumed = (|| -> Result<()> {
        ptrace::cont(pid, 0).context("continuing the restorer")?;
        // The leader reports each thread it creates (in creation order, which is the
        // snapshot's thread order), then its own trap; then each thread traps.
        let mut tids = vec![pid];
        wait_trap(pid, &info, &mut tids)?;
        if tids.len() != p.threads.len() {
            bail!(
                "created {} threads, the snapshot has {}",
                tids.len(),
                p.threads.len()
            );
        }
        for &tid in &tids[1..] {
            wait_trap(tid, &info, &mut Vec::new())?;
        }
        finish(&tids, &info, &p.threads)
    })();
    if let Err(e) = resumed {
        // A page server that failed has killed the instance, which is what this error
        // saw: its reason is the one to report.
        let _ = sandbox.kill();
        if let Some(Err(server)) = lazy.map(|l| l.finish()) {
            return Err(fail(server));
        }
        return Err(fail(e));
    }
    phases.add("resume", t.elapsed());
    Ok(Restored {
        sandbox,
        pid,
        phases,
        lazy,
        _notify: notify,
    })
}

fn socketpair() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error()).context("socketpair");
    }
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
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

/// Unmaps the restorer (every thread is stopped at its last trap) and gives each
/// thread its saved CPU state.
fn finish(
    tids: &[i32],
    info: &BlobInfo,
    threads: &[warmstart_snapshots::model::Thread],
) -> Result<()> {
    let pid = tids[0];
    let mut regs = ptrace::get_regs(pid)?;
    regs[reg::RIP] = info.syscall_trap;
    regs[reg::RAX] = libc::SYS_munmap as u64;
    regs[reg::RDI] = info.base;
    regs[reg::RSI] = info.map_len;
    regs[reg::ORIG_RAX] = u64::MAX;
    ptrace::set_regs(pid, &regs)?;
    for _ in 0..2 {
        ptrace::syscall(pid, 0)?;
        match ptrace::wait(pid)? {
            Stop::Syscall => {}
            other => bail!("unexpected stop while unmapping the restorer: {other:?}"),
        }
    }
    let after = ptrace::get_regs(pid)?;
    if after[reg::RAX] != 0 {
        bail!(
            "unmapping the restorer failed: {}",
            std::io::Error::from_raw_os_error(-(after[reg::RAX] as i64) as i32)
        );
    }
    for (&tid, t) in tids.iter().zip(threads) {
        load_cpu_state(tid, t)?;
    }
    for &tid in tids {
        ptrace::detach(tid, 0).context("detaching from the restored process")?;
    }
    Ok(())
}

fn load_cpu_state(pid: i32, t: &warmstart_snapshots::model::Thread) -> Result<()> {
    let saved: ptrace::Regs = t
        .regs
        .as_slice()
        .try_into()
        .context("snapshot thread registers have the wrong size")?;
    ptrace::set_regs(pid, &saved).context("loading the saved registers")?;
    ptrace::set_xstate(pid, &t.xsave).context("loading the saved xsave state")?;
    ptrace::set_sigmask(pid, t.sigmask).context("loading the saved signal mask")?;
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
    register: &dyn Fn(&Restored) -> R,
) -> Result<i32> {
    let (r, w) = remote::pipe().context("pipe2")?;
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).context("fork");
    }
    if pid == 0 {
        drop(r);
        unsafe { libc::setsid() };
        let mut w = std::fs::File::from(w);
        let code = match restore(snap, opts) {
            Ok(restored) => {
                if display_stats {
                    eprintln!("restore of {}:\n{}", snap.id.short(), restored.phases);
                }
                let _listed = register(&restored);
                let _ = std::io::Write::write_all(&mut w, format!("P{}", restored.pid).as_bytes());
                drop(w);
                // The instance has the caller's stdio now; the daemon lets go of it so a
                // caller reading our output to its end is not held up by us.
                let null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
                for fd in 0..3 {
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
                let _ = std::io::Write::write_all(&mut w, format!("E{e:#}").as_bytes());
                1
            }
        };
        unsafe { libc::_exit(code) };
    }
    drop(w);
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
            unsafe { libc::waitpid(pid, &mut status, 0) };
            bail!("{err}")
        }
        _ => bail!("the restore monitor died before reporting"),
    }
}

/// Stores the hot pages of `snap` (see `warmstart_snapshots::store::Hot`): the learned
/// `working_set` and the pages every restore writes eagerly. Advice only: a failure is
/// a warning.
pub fn save_hot(store: &warmstart_snapshots::store::Store, snap: &Snapshot, working_set: &[u64]) {
    if let Err(e) = snap.verify_table() {
        tracing::warn!("hot pages of snapshot {} not stored: {e}", snap.id.short());
        return;
    }
    let mut pages = working_set.to_vec();
    for p in &snap.manifest.processes {
        let lazy = crate::lazy::plan(p).ranges;
        pages.extend(memory::eager_indexes(p, &lazy));
    }
    if let Err(e) = store.save_hot(snap, &pages) {
        tracing::warn!("hot pages of snapshot {} not stored: {e}", snap.id.short());
    }
}
