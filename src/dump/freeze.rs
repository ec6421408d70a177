//! Freezing a process: seize every thread, interrupt it, and wait until it is stopped,
//! looping until no new threads appear (a thread may clone while we seize its siblings).
//!
//! A thread that had a signal dequeued for delivery while we stopped it reports a
//! signal-delivery stop first; that signal is kept so it is not lost: it goes into the
//! snapshot as pending, and is re-injected when the process is left running.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context, Result};

use crate::sys::ptrace::{self, Stop};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    /// Stopped by our `PTRACE_INTERRUPT`.
    Interrupted,
    /// Stopped at a syscall entry by the warm-point seccomp trap (`record`).
    SyscallEntry,
}

#[derive(Debug)]
pub struct FrozenThread {
    pub tid: i32,
    pub kind: StopKind,
    /// Signals dequeued while freezing, to be re-queued (siginfo bytes).
    pub caught: Vec<[u8; 128]>,
}

#[derive(Debug, Default)]
pub struct Frozen {
    pub pid: i32,
    pub threads: BTreeMap<i32, FrozenThread>,
    /// Threads the caller already traces (auto-attached with `PTRACE_O_TRACECLONE`)
    /// that may still be running: interrupted, never seized again.
    pub attached: BTreeSet<i32>,
    /// What the caller already holds of descendant processes, by pid (`record`'s warm
    /// point in a worker of the app's tree): used by [`freeze_tree`] for those children.
    pub descendants: BTreeMap<i32, Frozen>,
}

impl Frozen {
    /// A process whose thread `tid` the caller already traces and holds stopped.
    pub fn at_stop(pid: i32, tid: i32, kind: StopKind) -> Frozen {
        let mut f = Frozen {
            pid,
            ..Default::default()
        };
        f.threads.insert(
            tid,
            FrozenThread {
                tid,
                kind,
                caught: Vec::new(),
            },
        );
        f
    }

    pub fn tids(&self) -> Vec<i32> {
        self.threads.keys().copied().collect()
    }
}

/// How long a thread may take to stop after `PTRACE_INTERRUPT` (a thread in
/// uninterruptible sleep, on a dead NFS server say, never does: the dump then fails
/// naming it instead of hanging).
const STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Seizes and stops every thread of `pid` not yet in `frozen`.
pub fn freeze(pid: i32, frozen: &mut Frozen) -> Result<()> {
    frozen.pid = pid;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let comm = comm.trim();
    // Threads that exited but are still listed (a dead thread lingers until reaped).
    let mut gone = std::collections::HashSet::new();
    loop {
        let all = crate::sys::tasks::tasks(pid).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) => anyhow::anyhow!("process {pid} exited while being frozen"),
            _ => anyhow::Error::new(e).context(format!("listing /proc/{pid}/task")),
        })?;
        let new: Vec<i32> = all
            .into_iter()
            .filter(|t| !frozen.threads.contains_key(t) && !gone.contains(t))
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        for tid in new {
            let seized = if frozen.attached.contains(&tid) {
                Ok(())
            } else {
                ptrace::seize(tid, ptrace::O_TRACESYSGOOD | ptrace::O_SUSPEND_SECCOMP)
            };
            match seized {
                Ok(()) => {}
                // The thread exited between listing and seizing.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => continue,
                // Auto-attached by our own PTRACE_O_TRACECLONE: already ours.
                Err(e) if e.raw_os_error() == Some(libc::EPERM) && traced_by_us(tid) => {}
                // A thread that is exiting gives EPERM, not ESRCH: gone all the same.
                Err(e) if e.raw_os_error() == Some(libc::EPERM) && thread_gone(pid, tid) => {
                    if tid == pid {
                        bail!("process {pid} ({comm}) exited while being frozen");
                    }
                    gone.insert(tid);
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => bail!(
                    "cannot trace process {pid} ({comm}) thread {tid}: permission denied \
                     (is it already traced, e.g. by a debugger, or a kernel thread? \
                     warmstart needs root or CAP_SYS_PTRACE + CAP_CHECKPOINT_RESTORE)"
                ),
                Err(e) => {
                    return Err(e).with_context(|| format!("PTRACE_SEIZE of {pid} thread {tid}"))
                }
            }
            ptrace::interrupt(tid).with_context(|| format!("PTRACE_INTERRUPT of thread {tid}"))?;
            let mut caught = Vec::new();
            let mut kind = StopKind::Interrupted;
            let alive = loop {
                match ptrace::wait_timeout(tid, STOP_TIMEOUT).with_context(|| {
                    format!("waiting for thread {tid} of {pid} ({comm}) to stop")
                })? {
                    Stop::EventStop(_) => break true,
                    // It reached the warm-point trap itself while we were freezing.
                    Stop::Event(libc::PTRACE_EVENT_SECCOMP) => {
                        kind = StopKind::SyscallEntry;
                        break true;
                    }
                    Stop::Event(libc::PTRACE_EVENT_CLONE) => {
                        let new = ptrace::get_event_msg(tid)? as i32;
                        frozen.attached.insert(new);
                        ptrace::cont(tid, 0)?;
                    }
                    Stop::Signal(sig) => {
                        caught.push(
                            crate::sys::ptrace::get_siginfo(tid)
                                .with_context(|| format!("GETSIGINFO {tid}"))?,
                        );
                        tracing::debug!(tid, sig, "signal dequeued while freezing; kept");
                        ptrace::cont(tid, 0)?;
                    }
                    Stop::Exited(_) | Stop::Killed(_) => {
                        if tid == pid {
                            bail!("process {pid} ({comm}) exited while being frozen");
                        }
                        break false;
                    }
                    other => {
                        tracing::debug!(tid, ?other, "unexpected stop while freezing");
                        ptrace::cont(tid, 0)?;
                    }
                }
            };
            if !alive {
                continue;
            }
            frozen
                .threads
                .insert(tid, FrozenThread { tid, kind, caught });
        }
    }
}

/// The state letter of a `/proc/.../stat` file (after the comm, which may hold ')'),
/// or `None` if it cannot be read (the task is gone).
pub fn stat_state(path: &str) -> Option<char> {
    let stat = std::fs::read_to_string(path).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

/// Waits (up to `limit`) until process `pid` is stopped (`T`) or gone: a SIGSTOP takes
/// effect when the process next runs, not when it is sent.
pub fn wait_stopped(pid: i32, limit: std::time::Duration) -> bool {
    let until = std::time::Instant::now() + limit;
    loop {
        match stat_state(&format!("/proc/{pid}/stat")) {
            Some('T') | None | Some('Z' | 'X') => return true,
            _ if std::time::Instant::now() >= until => return false,
            _ => std::thread::sleep(std::time::Duration::from_micros(100)),
        }
    }
}

/// Whether thread `tid` of `pid` has exited (dead, or already released).
fn thread_gone(pid: i32, tid: i32) -> bool {
    matches!(
        stat_state(&format!("/proc/{pid}/task/{tid}/stat")),
        None | Some('Z' | 'X')
    )
}

/// TracerPid names the tracing *thread*: ours is the calling one.
fn traced_by_us(tid: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse::<u32>().ok())
        == Some(nix::unistd::gettid().as_raw() as u32)
}

/// A frozen process tree: every live process held as a [`Frozen`], zombies noted.
#[derive(Debug, Default)]
pub struct Tree {
    /// Pids (as seen from here), parents before children; the first is the root.
    pub order: Vec<i32>,
    pub frozen: BTreeMap<i32, Frozen>,
    /// Zombie children: nothing to freeze, only their ids and exit status.
    pub zombies: BTreeSet<i32>,
}

impl Tree {
    /// Every thread of every process, for releasing or killing.
    pub fn processes(&self) -> impl Iterator<Item = &Frozen> {
        self.order.iter().filter_map(|p| self.frozen.get(p))
    }
}

/// Whether `pid` is a zombie (state `Z` in `/proc/PID/stat`).
pub fn is_zombie(pid: i32) -> bool {
    stat_state(&format!("/proc/{pid}/stat")) == Some('Z')
}

/// Freezes the tree rooted at `root` (`first`: what the caller already holds of it):
/// every thread of every descendant, walking `/proc/PID/task/*/children` again after
/// each round until a round finds nothing new (a process not yet frozen may fork).
/// On failure everything frozen so far stays in `tree` for the caller to release.
pub fn freeze_tree(root: i32, mut first: Frozen, tree: &mut Tree) -> Result<()> {
    let mut held = std::mem::take(&mut first.descendants);
    tree.order = vec![root];
    tree.frozen.insert(root, first);
    freeze(root, tree.frozen.get_mut(&root).expect("just inserted"))?;
    loop {
        let mut changed = false;
        let mut i = 0;
        while i < tree.order.len() {
            let pid = tree.order[i];
            i += 1;
            if tree.zombies.contains(&pid) {
                continue;
            }
            if let Some(f) = tree.frozen.get_mut(&pid) {
                let before = f.threads.len();
                freeze(pid, f)?;
                changed |= f.threads.len() != before;
            }
            for child in crate::sys::tasks::children(pid) {
                if tree.order.contains(&child) {
                    continue;
                }
                changed = true;
                tree.order.push(child);
                if is_zombie(child) {
                    tree.zombies.insert(child);
                    continue;
                }
                let mut f = held.remove(&child).unwrap_or_default();
                let r = freeze(child, &mut f);
                tree.frozen.insert(child, f);
                if let Err(e) = r {
                    if is_zombie(child) {
                        // It exited while we froze it: dumped as the zombie it is now.
                        tree.frozen.remove(&child);
                        tree.zombies.insert(child);
                        continue;
                    }
                    if !std::path::Path::new(&format!("/proc/{child}")).exists() {
                        // Exited and reaped meanwhile: no longer part of the tree.
                        tree.frozen.remove(&child);
                        tree.order.retain(|&p| p != child);
                        continue;
                    }
                    return Err(e.context(format!("freezing child process {child} of {pid}")));
                }
            }
        }
        if !changed {
            return Ok(());
        }
    }
}
