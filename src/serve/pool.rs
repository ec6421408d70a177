//! Parked instances, per snapshot. A *parker* thread restores one instance up to its
//! last step ([`crate::restore::park`]), offers it, and when a request takes it, hands
//! it the caller's stdio, lets it go and serves the caller until it exits. Each instance
//! taken starts a parker for its replacement; parkers run in parallel.
//!
//! The pool follows demand: a request that finds no instance ready (it is restored on
//! the spot meanwhile, never queued behind a parker) grows the snapshot's pool by one, up
//! to the limit (`--pool-max`); an instance beyond the base size (`--pool`) that waits
//! unused for [`IDLE_SHRINK`] is let go, and the pool shrinks back.
//!
//! A replacement is parked once the instance just started has gone quiet (its first
//! work done: [`wait_quiet`]), not beside it: a restore takes a core for 10–20 ms, and
//! on a small host that would be the core the instance's first answer needs.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::OnceLock;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::restore::template::{self, Template};

use warmstart_snapshots::model::{FileDesc, Manifest, UnixAddr};
use warmstart_snapshots::store::{Snapshot, SnapshotId};

use super::Handoff;

/// Parking failures in a row after which a snapshot's instances are no longer parked.
const MAX_FAILURES: u32 = 3;
/// How often a parker checks that its instance is still alive.
const ALIVE_CHECK: Duration = Duration::from_secs(1);
/// An instance parked beyond the base pool size that waits this long unused is let go.
const IDLE_SHRINK: Duration = Duration::from_secs(60);
/// How often a replacement's parker looks at the CPU time of the instance just started.
const QUIET_POLL: Duration = Duration::from_millis(1);
/// The instance is quiet once it used less than this share of a core over one
/// [`QUIET_POLL`] (after some work at all).
const QUIET_SHARE: u64 = 10;
/// ... over this many polls in a row.
const QUIET_POLLS: u32 = 3;
/// The instances from a template whose written pages are learned (the most pages one
/// wrote by its first quiet spell is kept).
const LEARN_FROM: u32 = 3;
/// Its first work: at least this much CPU time since it started.
const FIRST_WORK: Duration = Duration::from_micros(500);
/// The most a replacement waits for that (an instance that gets no request, or one
/// that keeps busy).
const QUIET_MAX: Duration = Duration::from_millis(250);

#[derive(Default)]
struct Pool {
    /// Parked instances, oldest first: (parker id, where to send a request).
    ready: VecDeque<(u64, Sender<Handoff>)>,
    /// Parkers still restoring.
    parking: usize,
    /// Parking failures in a row.
    failures: u32,
    /// How many instances to keep parked or parking (the base size, grown by demand).
    target: usize,
    /// Requests being restored on the spot: parking waits until they are started, so
    /// as not to slow them down (a burst first, then the pool refills).
    on_the_spot: usize,
    /// Why this snapshot's instances are not parked.
    disabled: Option<String>,
    /// The template instances are forked from ([`crate::restore::template`]), once
    /// built (`None` inside: it cannot have one, as the log said).
    template: Arc<OnceLock<Option<Arc<Template>>>>,
    /// When an instance was last parked from the template.
    template_used: Option<Instant>,
    /// The pages an instance from the template wrote by the time its first work was
    /// done: each instance parked from the template gets its own copy of them
    /// ([`super::prefault`]).
    written: Option<Arc<super::prefault::Ranges>>,
    /// The pages of read-only file mappings (code) such an instance had mapped by then:
    /// each instance parked after has its kernel map them too.
    mapped: Option<Arc<super::prefault::Ranges>>,
    /// Instances the written pages were read from (at a quiet spell of theirs).
    learned_from: u32,
    /// A parker is reading them now.
    learning: bool,
}

#[derive(Clone)]
pub(super) struct Pools {
    size: usize,
    /// Instances come from a template of their snapshot where it can have one; it is
    /// dropped after this long without parking one (`None`: no templates).
    template_idle: Option<Duration>,
    /// The most a pool grows to with demand.
    max: usize,
    by_snap: Arc<Mutex<HashMap<SnapshotId, Pool>>>,
    next_id: Arc<AtomicU64>,
    /// Parkers waiting for the instance before theirs to go quiet ([`wait_quiet`]).
    quiet_waiters: Arc<AtomicUsize>,
}

impl Pools {
    pub fn new(size: usize, max: usize, template_idle: Option<Duration>) -> Self {
        Pools {
            size,
            template_idle,
            max: max.max(size),
            by_snap: Arc::default(),
            next_id: Arc::default(),
            quiet_waiters: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SnapshotId, Pool>> {
        self.by_snap.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parks instances of `snap` until `size` are parked or parking; why not, when its
    /// instances are not parked.
    pub fn start(&self, snap: &Arc<Snapshot>) -> Option<String> {
        self.start_after(snap, None)
    }

    /// [`Pools::start`], the new parkers first waiting for the instance whose app is
    /// `after` to go quiet ([`wait_quiet`]).
    /// What it has mapped of its code by then and, one from a template, what it wrote,
    /// is learned ([`Pools::learn_first_work`]) as `after` says.
    fn start_after(&self, snap: &Arc<Snapshot>, after: Option<After>) -> Option<String> {
        if self.size == 0 {
            return Some("the pool size is 0".into());
        }
        let mut pools = self.lock();
        let pool = pools.entry(snap.id).or_default();
        pool.target = pool.target.max(self.size);
        if pool.disabled.is_none() {
            pool.disabled = parkable(&snap.manifest).err();
        }
        if let Some(why) = &pool.disabled {
            return Some(why.clone());
        }
        let missing = pool.target.saturating_sub(pool.ready.len() + pool.parking);
        pool.parking += missing;
        drop(pools);
        for _ in 0..missing {
            self.spawn_parker(snap.clone(), after);
        }
        None
    }

    /// Drops the pools (and parked instances) of the snapshots `keep` says no to.
    pub fn retain(&self, keep: impl Fn(&SnapshotId) -> bool) {
        self.lock().retain(|id, _| keep(id));
    }

    /// Gives `req` to a parked instance of `snap` (`None`: taken) or returns it, for a
    /// restore on the spot. Without an instance ready, the pool grows (up to the limit):
    /// the caller starts its parkers ([`Pools::start`]) once the request's instance runs.
    pub fn take(&self, snap: &Arc<Snapshot>, mut req: Handoff) -> Option<Handoff> {
        loop {
            let tx = {
                let mut pools = self.lock();
                match pools.get_mut(&snap.id) {
                    None => {
                        if self.size > 0 {
                            tracing::info!(
                                "no parked instance of {} yet: restoring this request on the \
                                 spot",
                                snap.id.short()
                            );
                        }
                        None
                    }
                    Some(p) => match p.ready.pop_front() {
                        Some(r) => Some(r),
                        None => {
                            self.missed(snap, p);
                            None
                        }
                    },
                }
            };
            let Some((_, tx)) = tx else {
                return Some(req);
            };
            match tx.send(req) {
                // Its parker parks a replacement once it has handed it out.
                Ok(()) => return None,
                // That parker is gone (its instance died while parked): try the next.
                Err(back) => req = back.0,
            }
        }
    }

    /// A request restored on the spot has its instance running (app `app`; `None`:
    /// failed): once no other is being restored, park instances for the next ones.
    pub fn spot_done(&self, snap: &Arc<Snapshot>, app: Option<i32>) {
        let idle = match self.lock().get_mut(&snap.id) {
            Some(p) => {
                p.on_the_spot = p.on_the_spot.saturating_sub(1);
                p.on_the_spot == 0
            }
            None => true,
        };
        if idle {
            let _ = self.start_after(
                snap,
                app.map(|app| After {
                    app,
                    learn: None,
                    cpu_at_start: None,
                }),
            );
        }
    }

    /// A request for `snap` found no instance of `pool` ready.
    fn missed(&self, snap: &Snapshot, pool: &mut Pool) {
        pool.on_the_spot += 1;
        if pool.disabled.is_some() {
            return;
        }
        tracing::info!(
            "no parked instance of {} ready ({} parking): restoring this request on the spot",
            snap.id.short(),
            pool.parking
        );
        if pool.target < self.max {
            pool.target += 1;
            tracing::info!(
                "the pool of {} grows to {} with demand (at most {})",
                snap.id.short(),
                pool.target,
                self.max
            );
        }
    }

    fn spawn_parker(&self, snap: Arc<Snapshot>, after: Option<After>) {
        let pools = self.clone();
        let id = snap.id;
        let spawned = std::thread::Builder::new()
            .name("serve-parker".into())
            .spawn(move || {
                if let Some(After {
                    app,
                    learn,
                    cpu_at_start,
                }) = after
                {
                    let mut read = false;
                    pools.quiet_waiters.fetch_add(1, Ordering::Relaxed);
                    wait_quiet(app, cpu_at_start, &pools.quiet_waiters, || {
                        if let Some(written) = learn {
                            read |= pools.learn_first_work(&snap, app, written);
                        }
                    });
                    pools.quiet_waiters.fetch_sub(1, Ordering::Relaxed);
                    if read {
                        if let Some(p) = pools.lock().get_mut(&snap.id) {
                            p.learned_from += 1;
                        }
                    }
                }
                pools.parker(snap)
            });
        if let Err(e) = spawned {
            tracing::warn!("no thread to park an instance: {e}");
            if let Some(p) = self.lock().get_mut(&id) {
                p.parking -= 1;
            }
        }
    }

    /// The template of `snap`, built at its first use (by the first parker to ask; the
    /// others wait for it).
    fn template(&self, snap: &Arc<Snapshot>) -> Option<Arc<Template>> {
        self.template_idle?;
        let cell = {
            let mut pools = self.lock();
            let pool = pools.get_mut(&snap.id)?;
            pool.template_used = Some(Instant::now());
            pool.template.clone()
        };
        cell.get_or_init(|| {
            if let Some(why) = template::why_not(&snap.manifest) {
                tracing::info!(
                    "instances of {} are restored each on its own, without a template: {why}",
                    snap.id.short()
                );
                return None;
            }
            let t = Instant::now();
            match Template::build(snap) {
                Ok(tpl) => {
                    tracing::info!(
                        "template of {} ready in {:?} (pid {}, {} MiB its instances share)",
                        snap.id.short(),
                        t.elapsed(),
                        tpl.pid,
                        tpl.bytes >> 20
                    );
                    Some(Arc::new(tpl))
                }
                Err(e) => {
                    tracing::warn!(
                        "no template for {}: {e:#}; its instances are restored each on its own",
                        snap.id.short()
                    );
                    None
                }
            }
        })
        .clone()
    }

    /// Drops the template of `snap` (instances already started keep their memory) if it
    /// went unused for the idle time, or `now`, saying why.
    fn drop_template(&self, snap: &Snapshot, now: Option<&str>) {
        let Some(idle) = self.template_idle else {
            return;
        };
        let mut pools = self.lock();
        let Some(pool) = pools.get_mut(&snap.id) else {
            return;
        };
        if pool.template.get().is_none_or(|t| t.is_none()) {
            return;
        }
        let why = match now {
            Some(why) => why.to_owned(),
            None if pool.template_used.is_some_and(|t| t.elapsed() >= idle) => {
                format!("unused for {} s", idle.as_secs())
            }
            None => return,
        };
        pool.template = Arc::default();
        tracing::info!("template of {} dropped: {why}", snap.id.short());
    }

    /// Learns which pages of code instance `app` of `snap` (its first work done) has
    /// mapped and, `written` (it came from the template), which pages it wrote, each if
    /// more than known so far; whether they could be read. Learned until read from
    /// [`LEARN_FROM`] instances (one stopped right after its answer may be gone first),
    /// by one parker at a time.
    fn learn_first_work(&self, snap: &Snapshot, app: i32, written: bool) -> bool {
        {
            let mut pools = self.lock();
            let Some(p) = pools.get_mut(&snap.id) else {
                return false;
            };
            if p.learning || p.learned_from >= LEARN_FROM {
                return false;
            }
            p.learning = true;
        }
        let t = Instant::now();
        let read = if written {
            super::prefault::written(app).map(Some)
        } else {
            Ok(None)
        }
        .and_then(|w| Ok((w, super::prefault::mapped(app)?)));
        let mut pools = self.lock();
        let Some(p) = pools.get_mut(&snap.id) else {
            return false;
        };
        p.learning = false;
        let (pages, mapped) = match read {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!("the pages instance {app} wrote and mapped: {e}");
                return false;
            }
        };
        let count = |r: &super::prefault::Ranges| r.iter().map(|(s, e)| (e - s) / 4096).sum();
        // The most seen of each is kept.
        let (n, m): (u64, u64) = (pages.as_ref().map_or(0, count), count(&mapped));
        let more_written = p.written.as_deref().is_none_or(|w| count(w) < n);
        let more_mapped = p.mapped.as_deref().is_none_or(|w| count(w) < m);
        if more_mapped {
            p.mapped = Some(Arc::new(mapped));
        }
        let Some(pages) = pages.filter(|_| more_written) else {
            drop(pools);
            if more_mapped {
                tracing::debug!(
                    "instances of {} had {m} pages of code mapped by their first answer \
                     (read in {:?}): those parked from now on have them mapped",
                    snap.id.short(),
                    t.elapsed()
                );
            }
            return true;
        };
        p.written = Some(Arc::new(pages));
        drop(pools);
        tracing::info!(
            "instances of {} wrote {n} pages by their first answer (read in {:?}): those \
             parked from now on get their own copy of them (and {m} pages of code mapped)",
            snap.id.short(),
            t.elapsed()
        );
        true
    }

    /// Has parked instance `parked` map the code instances of `snap` run first and, one
    /// `from_template`, gives it its own copy of the pages they write first
    /// ([`super::prefault`]), once known.
    fn prefault(&self, snap: &Snapshot, parked: &crate::restore::Parked, from_template: bool) {
        let (pages, mapped) = match self.lock().get(&snap.id) {
            Some(p) => (p.written.clone(), p.mapped.clone()),
            None => return,
        };
        let pid = parked.pid();
        if let Some(mapped) = mapped {
            // The instance is as parked if this fails: it faults them in itself.
            step(
                snap,
                || super::prefault::map_files(pid, &mapped),
                [
                    "mapped",
                    "pages of code the first request runs",
                    "mapping the code the first request runs",
                ],
            );
        }
        if let Some(pages) = pages.filter(|_| from_template) {
            // Or it copies them at its first writes instead.
            step(
                snap,
                || super::prefault::copy_shared(pid, &pages),
                [
                    "copied",
                    "pages the first request writes",
                    "copying the pages the first request writes",
                ],
            );
        }
    }

    fn parker(&self, snap: Arc<Snapshot>) {
        let mut opts = super::restore_options(&snap, None);
        opts.template = self.template(&snap);
        let mut parked = crate::restore::park(&snap, &opts);
        if let (Err(e), Some(_)) = (&parked, &opts.template) {
            // Tried again without it: if that works, the template was the cause and the
            // next instances do without it.
            let first = format!("{e:#}");
            opts.template = None;
            parked = crate::restore::park(&snap, &opts);
            if parked.is_ok() {
                tracing::warn!(
                    "parking an instance of {} from its template failed ({first}); \
                     restored on its own, it worked",
                    snap.id.short()
                );
                self.drop_template(&snap, Some("an instance from it failed"));
            }
        }
        if let Ok(p) = &parked {
            self.prefault(&snap, p, opts.template.is_some());
        }
        let (tx, rx) = channel::<Handoff>();
        let me = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut pools = self.lock();
            // Gone: the snapshot was removed meanwhile (its instance goes with `parked`).
            let Some(pool) = pools.get_mut(&snap.id) else {
                return;
            };
            pool.parking -= 1;
            match &parked {
                Ok(_) => {
                    pool.failures = 0;
                    pool.ready.push_back((me, tx));
                }
                Err(e) => {
                    // Requests are restored one by one meanwhile; a cause that goes away
                    // (a file being rewritten) lets the next request park again.
                    tracing::warn!("parking an instance of {}: {e:#}", snap.id.short());
                    pool.failures += 1;
                    if pool.failures >= MAX_FAILURES {
                        pool.disabled = Some(format!("parking failed {MAX_FAILURES} times: {e:#}"));
                    }
                    return;
                }
            }
        }
        let Ok(parked) = parked else { return };
        tracing::info!("parked an instance of {}", snap.id.short());
        let parked_at = std::time::Instant::now();
        let req = loop {
            match rx.recv_timeout(ALIVE_CHECK) {
                Ok(req) => break req,
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout)
                    if parked_at.elapsed() >= IDLE_SHRINK && self.shrink(&snap, me) =>
                {
                    tracing::info!(
                        "an instance of {} parked beyond the pool's base size went unused \
                         for {} s: the pool shrinks",
                        snap.id.short(),
                        IDLE_SHRINK.as_secs()
                    );
                    return;
                }
                Err(RecvTimeoutError::Timeout) if !parked.alive() => {
                    tracing::warn!(
                        "a parked instance of {} died; parking another",
                        snap.id.short()
                    );
                    if let Some(p) = self.lock().get_mut(&snap.id) {
                        p.ready.retain(|(id, _)| *id != me);
                    }
                    self.start(&snap);
                    return;
                }
                Err(RecvTimeoutError::Timeout) => self.drop_template(&snap, None),
            }
        };
        let from_template = opts.template.is_some();
        // What it mapped (and, from the template, wrote) by its first work is learned from
        // the CPU time it had once it runs on (its parker may start looking only once
        // that work is done).
        let learning = self
            .lock()
            .get(&snap.id)
            .is_some_and(|p| p.learned_from < LEARN_FROM);
        let refill = |app: Option<i32>| {
            self.start_after(
                &snap,
                app.map(|app| After {
                    app,
                    learn: Some(from_template),
                    cpu_at_start: learning.then(|| cpu_ns(app)).flatten(),
                }),
            );
        };
        if let Err(e) = super::serve_instance(&snap, Some(parked), req, refill) {
            tracing::warn!("serving a parked instance of {}: {e:#}", snap.id.short());
        }
    }
}

/// Does `work` to a parked instance of `snap` and logs how it went: `"{done} N {what}
/// into a parked instance ..."`, or `doing` with the error.
fn step(
    snap: &Snapshot,
    work: impl FnOnce() -> std::io::Result<u64>,
    [done, what, doing]: [&str; 3],
) {
    let t = Instant::now();
    match work() {
        Ok(n) => tracing::debug!(
            "{done} {n} {what} into a parked instance of {} in {:?}",
            snap.id.short(),
            t.elapsed()
        ),
        Err(e) => tracing::debug!("{doing} into a parked instance of {}: {e}", snap.id.short()),
    }
}

/// The instance whose app a new parker waits for to go quiet before it parks.
#[derive(Clone, Copy)]
struct After {
    app: i32,
    /// What it has mapped of its code by then is learned (`Some`) and, `Some(true)` (it
    /// came from the template), what it wrote.
    learn: Option<bool>,
    /// Its CPU time (`cpu_ns`) as it went on from its hand-out, for its first work.
    cpu_at_start: Option<u64>,
}

/// Waits until the instance whose app is `app` has done its first work (since
/// `cpu_at_start`, else since now) and gone quiet:
/// it used at least [`FIRST_WORK`] of CPU time, then, over [`QUIET_POLLS`] polls in a
/// row, less than 1/[`QUIET_SHARE`] of a core and as little time waiting for one (an
/// app waiting for a page looks quiet for a moment too; one waiting for a core does
/// not); or it ended; at most [`QUIET_MAX`]. `lull` is called at the first poll of each
/// quiet spell after its first work (the instance may end before the spell counts as
/// quiet: a caller that stops it right after its answer); one still busy at the end is
/// not learned from (what it did by then may be a part of its first request only).
/// `waiters`: the parkers waiting so (this one included); the more, the less often each
/// polls.
fn wait_quiet(app: i32, cpu_at_start: Option<u64>, waiters: &AtomicUsize, mut lull: impl FnMut()) {
    let t = Instant::now();
    let Some(now) = cpu_ns(app) else {
        return;
    };
    let first = cpu_at_start.unwrap_or(now);
    let busy = |cpu: u64| cpu + wait_ns(app).unwrap_or(0);
    let (mut last, mut last_t, mut quiet) = (busy(now), Instant::now(), 0);
    while t.elapsed() < QUIET_MAX {
        let n = waiters.load(Ordering::Relaxed).clamp(1, 8) as u32;
        std::thread::sleep(QUIET_POLL * n);
        let Some(cpu) = cpu_ns(app) else {
            return;
        };
        let now = busy(cpu);
        let worked = cpu.saturating_sub(first) >= FIRST_WORK.as_nanos() as u64;
        let window = last_t.elapsed().as_nanos() as u64;
        if worked && now.saturating_sub(last) < window / QUIET_SHARE {
            quiet += 1;
            if quiet == 1 {
                lull();
            }
            if quiet >= QUIET_POLLS {
                return;
            }
        } else {
            quiet = 0;
        }
        (last, last_t) = (now, Instant::now());
    }
}

/// How long (ns) the main thread of process `pid` has waited for a core while runnable
/// (`/proc/PID/schedstat`, its second field).
fn wait_ns(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).ok()?;
    s.split_whitespace().nth(1)?.parse().ok()
}

/// The CPU time (ns) of process `pid` (all its threads) and of the children its main
/// thread started (a pre-fork server's workers); `None` once it is gone. Cheap enough to
/// ask every millisecond beside an instance's first request: a clock read per process
/// and one `/proc` file.
fn cpu_ns(pid: i32) -> Option<u64> {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let mut total = process_cpu_ns(pid)?;
    for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
        total += process_cpu_ns(c).unwrap_or(0);
    }
    Some(total)
}

/// The CPU time (ns) of every thread of process `pid` (its `CLOCK_PROCESS_CPUTIME_ID`
/// read from outside); `None` once it is gone.
fn process_cpu_ns(pid: i32) -> Option<u64> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a live local the call writes.
    if unsafe { libc::clock_getcpuclockid(pid, &mut clock) } != 0 {
        return None;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live local the call writes.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

impl Pools {
    /// Takes parked instance `me` of `snap` out of its pool if the pool is above its
    /// base size (demand grew it); whether it did.
    fn shrink(&self, snap: &Snapshot, me: u64) -> bool {
        let mut pools = self.lock();
        let Some(p) = pools.get_mut(&snap.id) else {
            return false;
        };
        if p.target <= self.size || !p.ready.iter().any(|(id, _)| *id == me) {
            return false;
        }
        p.ready.retain(|(id, _)| *id != me);
        p.target -= 1;
        true
    }
}

/// Whether instances of `m` may wait parked: nothing they hold may be something another
/// instance (or anyone else) needs meanwhile: no bound or listening sockets (their
/// addresses and ports; but unix sockets bound in the instance's own private `/tmp`),
/// no file locks (but on files of the instance's own private
/// `/tmp`, which nobody else sees: SQLite's, for one). An epoll watching the stdio gets it added when
/// the stdio arrives, and timerfds are armed then, which needs each to be the process's
/// own.
fn parkable(m: &Manifest) -> Result<(), String> {
    if crate::restore::root_is_init(m) {
        return Err(
            "its root process was the init (pid 1) of its pid namespace: its instances \
             are restored when asked for"
                .into(),
        );
    }
    let in_private_tmp = |l: &warmstart_snapshots::model::FileLock| {
        m.private_tmp.is_some()
            && m.processes
                .iter()
                .filter(|p| p.pid == l.pid)
                .flat_map(|p| &p.fds)
                .find(|f| f.fd == l.fd)
                .is_some_and(|f| match &f.file {
                    FileDesc::Regular { file, .. } => file.path.starts_with("/tmp/"),
                    FileDesc::Ghost { path, .. } => path.starts_with("/tmp/"),
                    _ => false,
                })
    };
    if !m.file_locks.iter().all(in_private_tmp) {
        return Err("it holds file locks".into());
    }
    // A unix socket bound in the instance's own private `/tmp` holds a name nobody else
    // sees.
    let own_name = |addr: &UnixAddr| match addr {
        UnixAddr::Unnamed => true,
        UnixAddr::Path(p) => m.private_tmp.is_some() && p.starts_with("/tmp/"),
        UnixAddr::Abstract(_) => false,
    };
    for q in &m.unix_queues {
        if let Some(c) = q.conns.iter().find(|c| !own_name(&c.addr)) {
            return Err(format!(
                "process {} (fd {}): a connection waiting on its unix listener comes from a \
                 client bound to {:?}",
                q.pid, q.fd, c.addr
            ));
        }
    }
    for p in &m.processes {
        for (epfd, _) in crate::fds::late_epoll_targets(m, p) {
            let ofd = p.fds.iter().find(|f| f.fd == epfd).map(|f| f.ofd);
            if shared_ofd(m, ofd) {
                return Err(format!(
                    "process {} (fd {epfd}): an epoll shared by several processes watches the stdio",
                    p.pid
                ));
            }
        }
        for crate::fds::LateTimerFd { fd, .. } in crate::fds::late_timerfds(m, p) {
            let ofd = p.fds.iter().find(|f| f.fd == fd).map(|f| f.ofd);
            if shared_ofd(m, ofd) {
                return Err(format!(
                    "process {} (fd {fd}): an armed timerfd shared by several processes",
                    p.pid
                ));
            }
        }
        for f in &p.fds {
            let why = match &f.file {
                // A TCP listener is a placeholder while parked; the daemon binds its
                // address at hand-out (the recorded one, or the run's --listen).
                FileDesc::Inet {
                    sock_type: libc::SOCK_STREAM,
                    listen: Some(_),
                    ..
                } => continue,
                FileDesc::Inet { .. } | FileDesc::Netlink { .. } => "it has network sockets",
                FileDesc::Unix { addr, .. } if !own_name(addr) => "it has bound unix sockets",
                _ => continue,
            };
            return Err(format!("process {} (fd {}): {why}", p.pid, f.fd));
        }
    }
    Ok(())
}

/// Whether open file description `ofd` is in the fd tables of several processes.
fn shared_ofd(m: &Manifest, ofd: Option<u32>) -> bool {
    m.processes
        .iter()
        .filter(|q| q.fds.iter().any(|f| Some(f.ofd) == ofd))
        .count()
        > 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use warmstart_snapshots::model::Fd;

    fn manifest_with(file: FileDesc) -> Manifest {
        let mut m = Manifest::default();
        let mut p = warmstart_snapshots::model::Process::default();
        p.fds.push(Fd {
            fd: 5,
            ofd: 1,
            cloexec: false,
            file,
        });
        m.processes.push(p);
        m
    }

    #[test]
    fn instances_holding_names_are_not_parked() {
        let bound = FileDesc::Unix {
            sock_type: libc::SOCK_STREAM,
            addr: UnixAddr::Path("/tmp/x.sock".into()),
            listen: Some(5),
            flags: 0,
        };
        assert!(parkable(&manifest_with(bound.clone())).is_err());
        // ... but in the instance's own private /tmp, nobody else sees the name.
        let mut own = manifest_with(bound);
        own.private_tmp = Some(Vec::new());
        assert!(parkable(&own).is_ok());
        let FileDesc::Unix { addr, .. } = &mut own.processes[0].fds[0].file else {
            unreachable!()
        };
        *addr = UnixAddr::Path("/run/x.sock".into());
        assert!(parkable(&own).is_err());
        let pipe = FileDesc::Pipe {
            pipe: 1,
            write: false,
            flags: 0,
        };
        assert!(parkable(&manifest_with(pipe)).is_ok());
    }
}
