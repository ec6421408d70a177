//! The page server: prefetch, fault handling, events, background streaming.

use std::collections::VecDeque;
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::errno::Errno;
use warmstart_snapshots::store::{Hot, Snapshot, StoreError};

use super::plan::{find, Extent, LazyPlan, PAGE};
use crate::sys::eventfd::EventFd;
use crate::sys::uffd::ZeropageMode;
use crate::sys::uffd::{CopyMode, Error as UffdError, Event, Features, Range, Uffd, UffdMsg};

/// Largest single `UFFDIO_COPY` (prefetch and streaming): 2 MiB.
pub const BATCH_PAGES: u64 = 512;
/// Reads of at least this many pages are split over two threads.
const PARALLEL_READ_PAGES: u64 = 128;
/// Streaming batches being read (decompressed and verified on the reader thread) ahead
/// of the one being copied.
const STREAM_AHEAD: usize = 2;
/// Read-ahead window of a fault: the aligned block of this many pages around it.
pub const READAHEAD_PAGES: u64 = 16;
/// A fault on a page without stored data maps zero pages up to this many pages ahead
/// (never over a stored page): a zero page costs a page-table entry, a fault 40–70 µs.
pub const ZERO_AHEAD_PAGES: u64 = 128;
/// While idle without a way to see the target exit (forked children, or no
/// [`LazyServer::watch_exit`]), the server checks liveness this often.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// Background streaming waits for this long without a fault: while the app is busy
/// faulting (resuming, answering its first request) a 2 MiB batch in the way of its next
/// fault would cost more than it saves.
const STREAM_QUIET: Duration = Duration::from_millis(20);
/// A fault that keeps getting `EAGAIN` this long is an error.
const RETRY_LIMIT: Duration = Duration::from_secs(10);
/// Gaps of up to this many pages between working-set pages are copied too (one ioctl
/// instead of two).
const PREFETCH_GAP: u64 = 8;

/// Features the restored process must negotiate on the userfaultfd it registers.
pub const REQUIRED_FEATURES: Features = Features::EVENT_FORK
    .union(Features::EVENT_REMAP)
    .union(Features::EVENT_REMOVE)
    .union(Features::EVENT_UNMAP);

/// Options of a lazy restore.
#[derive(Debug, Clone)]
pub struct LazyOptions {
    /// Working set to copy before the app resumes: page-table indexes (as recorded in
    /// [`ServeStats::working_set`]). Indexes outside the plan are ignored.
    pub prefetch: Option<Vec<u64>>,
    /// Record the order of faulted pages until [`RecordHandle::stop_recording`] or
    /// `record_for` elapses. Background streaming waits until recording stops (it
    /// would hide the faults being recorded).
    pub record_working_set: bool,
    /// Stop recording after this long (from the start of `serve`).
    pub record_for: Option<Duration>,
    /// The snapshot's hot pages (verified, decompressed): prefetch copies from there.
    pub hot: Option<Arc<Hot>>,
    /// Stream the remaining pages while no fault is pending, and finish (closing the
    /// userfaultfd) once every stored page is in.
    pub background: bool,
}

impl Default for LazyOptions {
    fn default() -> Self {
        Self {
            prefetch: None,
            record_working_set: false,
            record_for: None,
            hot: None,
            background: true,
        }
    }
}

/// Stops working-set recording from another thread.
#[derive(Debug, Clone)]
pub struct RecordHandle(Arc<Stop>);

/// The recording's stop flag, and an eventfd that wakes a server waiting for faults (so
/// that it hands the working set over at once).
#[derive(Debug)]
struct Stop {
    flag: AtomicBool,
    wake: Option<EventFd>,
}

impl Stop {
    fn new() -> Stop {
        Stop {
            flag: AtomicBool::new(false),
            // Without one, the server notices at its next wake-up (≤ PROBE_INTERVAL).
            wake: EventFd::new().ok(),
        }
    }
    fn set(&self) {
        self.flag.store(true, Ordering::Release);
        if let Some(w) = &self.wake {
            w.signal();
        }
    }
    fn get(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }
}

impl RecordHandle {
    pub fn stop_recording(&self) {
        self.0.set();
    }
    pub fn stopped(&self) -> bool {
        self.0.get()
    }
}

/// What [`LazyServer::prefetch`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefetchStats {
    /// Distinct working-set pages asked for that the plan serves.
    pub requested: u64,
    /// Working-set entries that are not stored pages of this process (ignored).
    pub ignored: u64,
    /// Pages copied (working set plus small gaps between its pages).
    pub pages: u64,
    /// `UFFDIO_COPY` batches.
    pub batches: u64,
    /// Pages copied from the hot pages (no decompression).
    pub hot_pages: u64,
    pub elapsed: Duration,
}

/// What [`LazyServer::serve`] did.
#[derive(Debug, Clone, Default)]
pub struct ServeStats {
    /// Page-fault messages handled (every address space).
    pub faults: u64,
    /// Faults answered with snapshot data (`UFFDIO_COPY`).
    pub faults_data: u64,
    /// Faults at pages without stored data, answered with `UFFDIO_ZEROPAGE`.
    pub faults_zero: u64,
    /// Faults at pages already present (a race with a copy): only woken.
    pub faults_raced: u64,
    /// Pages copied to answer faults, read-ahead included.
    pub pages_on_fault: u64,
    /// Pages copied by background streaming (and liveness probes).
    pub pages_streamed: u64,
    pub bytes_streamed: u64,
    /// Every page copied by `serve` (fault + stream).
    pub pages_copied: u64,
    /// Stored pages never copied because the app dropped them first (`MADV_DONTNEED`,
    /// `munmap`, ...).
    pub pages_dropped: u64,
    /// `EAGAIN` answers (address space changing) that made an operation retry.
    pub retries: u64,
    pub forks: u64,
    pub remaps: u64,
    pub removes: u64,
    pub unmaps: u64,
    /// Sum and maximum of the time from reading a fault to answering it.
    pub fault_latency_total: Duration,
    pub fault_latency_max: Duration,
    /// When the first fault arrived, from the start of `serve`.
    pub first_fault: Option<Duration>,
    /// When background streaming began (its first bulk batch), from the start of
    /// `serve`: with `complete_after`, the streaming rate.
    pub stream_started: Option<Duration>,
    /// When every stored page of every address space was in, from the start of `serve`
    /// (`None` if the target exited before).
    pub complete_after: Option<Duration>,
    /// The target (or every forked child) exited before all pages were in.
    pub target_exited: bool,
    pub elapsed: Duration,
    /// Page-table indexes in first-fault order (empty unless recording).
    pub working_set: Vec<u64>,
}

/// `serve` failed: the instance must not continue (its missing memory would read as
/// zeros once the userfaultfds close). The error keeps the userfaultfds open, so faulting
/// threads stay blocked: kill the instance first, then drop the error (or call
/// [`LazyError::into_error`]).
pub struct LazyError {
    error: anyhow::Error,
    hold: Vec<Uffd>,
}

impl LazyError {
    pub fn error(&self) -> &anyhow::Error {
        &self.error
    }
    /// Closes the held userfaultfds: only after the instance was killed.
    pub fn into_error(self) -> anyhow::Error {
        drop(self.hold);
        self.error
    }
}

impl fmt::Display for LazyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lazy page server failed: {:#}", self.error)
    }
}
impl fmt::Debug for LazyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "LazyError({:#}, {} uffds held)",
            self.error,
            self.hold.len()
        )
    }
}
impl std::error::Error for LazyError {}

/// A bitmap over page-table indexes: set = nothing more to copy there.
#[derive(Clone)]
struct Bitmap(Vec<u64>);

/// The words of `first..first + n` and, per word, the mask of its bits in the range.
fn word_masks(first: u64, n: u64) -> impl Iterator<Item = (usize, u64)> {
    let end = first + n;
    let (w0, w1) = (first / 64, end.div_ceil(64));
    (w0..w1).map(move |w| {
        let lo = first.max(w * 64) - w * 64;
        let hi = end.min(w * 64 + 64) - w * 64;
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        (w as usize, mask)
    })
}

impl Bitmap {
    fn new_full(bits: u64) -> Self {
        Bitmap(vec![u64::MAX; bits.div_ceil(64) as usize])
    }
    fn get(&self, i: u64) -> bool {
        self.0[(i / 64) as usize] & (1 << (i % 64)) != 0
    }
    /// Sets bit `i`; true if it was clear.
    fn set(&mut self, i: u64) -> bool {
        let w = &mut self.0[(i / 64) as usize];
        let m = 1 << (i % 64);
        let was = *w & m == 0;
        *w |= m;
        was
    }
    /// Clears `first..first+n`, a word at a time (snapshots of GiBs have millions).
    fn clear_range(&mut self, first: u64, n: u64) {
        for (w, m) in word_masks(first, n) {
            self.0[w] &= !m;
        }
    }
    /// Sets `first..first+n`; returns how many were clear.
    fn set_range(&mut self, first: u64, n: u64) -> u64 {
        let mut newly = 0;
        for (w, m) in word_masks(first, n) {
            newly += u64::from((!self.0[w] & m).count_ones());
            self.0[w] |= m;
        }
        newly
    }
}

/// One address space served through one userfaultfd: the restored process, or a child
/// it forked.
struct Space {
    id: u64,
    uffd: Uffd,
    /// Stored pages still ours, by address. Dropped ranges are cut out.
    extents: Vec<Extent>,
    /// Per page-table index: set when copied, dropped, or not a page of this space.
    done: Bitmap,
    /// Clear bits of `done` (stored pages still to copy).
    remaining: u64,
    /// Positions in `extents` sorted by `first`; stale when `dirty`.
    by_first: Vec<usize>,
    dirty: bool,
    /// Streaming order: index ranges, largest first, and a cursor (past the batches
    /// handed to the reader).
    jobs: Vec<(u64, u64)>,
    job_pos: (usize, u64),
    jobs_built: bool,
    /// Streaming batches of this space with the reader (not yet copied).
    in_flight: usize,
    /// The streaming order was rebuilt since the last batch was handed out (pages an
    /// interrupted copy left behind are found by starting over once).
    rescanned: bool,
    /// A pidfd of the process, readable once it exited.
    exit_fd: Option<OwnedFd>,
    alive: bool,
    last_probe: Instant,
}

impl Space {
    fn new(id: u64, uffd: Uffd, extents: Vec<Extent>, page_count: u64) -> Self {
        let mut done = Bitmap::new_full(page_count);
        let mut remaining = 0;
        for e in &extents {
            done.clear_range(e.first, e.pages);
            remaining += e.pages;
        }
        Space {
            id,
            uffd,
            extents,
            done,
            remaining,
            by_first: Vec::new(),
            dirty: true,
            jobs: Vec::new(),
            job_pos: (0, 0),
            jobs_built: false,
            in_flight: 0,
            rescanned: false,
            exit_fd: None,
            alive: true,
            last_probe: Instant::now(),
        }
    }

    /// The extent position holding page-table index `idx`.
    fn extent_of_index(&mut self, idx: u64) -> Option<usize> {
        if self.dirty {
            self.by_first.clear();
            self.by_first.extend(0..self.extents.len());
            let ex = &self.extents;
            self.by_first.sort_unstable_by_key(|&p| ex[p].first);
            self.dirty = false;
        }
        let ex = &self.extents;
        let k = self
            .by_first
            .partition_point(|&p| ex[p].first + ex[p].pages <= idx);
        let p = *self.by_first.get(k)?;
        (ex[p].first <= idx).then_some(p)
    }

    fn mark(&mut self, first: u64, n: u64) -> u64 {
        let newly = self.done.set_range(first, n);
        self.remaining -= newly;
        newly
    }

    /// Removes `[start, end)` from the bookkeeping and returns the pieces that were in
    /// it (addresses unchanged). With `drop`, their pages count as done (dropped).
    fn cut(&mut self, start: u64, end: u64, drop: bool) -> (Vec<Extent>, u64) {
        let start = start & !(PAGE - 1);
        let end = end.div_ceil(PAGE) * PAGE;
        let i0 = self.extents.partition_point(|e| e.end() <= start);
        let mut i1 = i0;
        while i1 < self.extents.len() && self.extents[i1].addr < end {
            i1 += 1;
        }
        if i0 == i1 {
            return (Vec::new(), 0);
        }
        let mut keep = Vec::new();
        let mut taken = Vec::new();
        let mut dropped = 0;
        for e in self.extents[i0..i1].iter().copied() {
            let lo = e.addr.max(start);
            let hi = e.end().min(end);
            if e.addr < lo {
                keep.push(Extent {
                    pages: (lo - e.addr) / PAGE,
                    ..e
                });
            }
            let mid = Extent {
                addr: lo,
                pages: (hi - lo) / PAGE,
                first: e.first + (lo - e.addr) / PAGE,
                ..e
            };
            if drop {
                dropped += self.done.set_range(mid.first, mid.pages);
            }
            taken.push(mid);
            if hi < e.end() {
                keep.push(Extent {
                    addr: hi,
                    pages: (e.end() - hi) / PAGE,
                    first: e.first + (hi - e.addr) / PAGE,
                    ..e
                });
            }
        }
        self.remaining -= dropped;
        self.extents.splice(i0..i1, keep);
        self.dirty = true;
        (taken, dropped)
    }

    fn remap(&mut self, from: u64, to: u64, len: u64) -> u64 {
        let (moved, _) = self.cut(from, from + len, false);
        let (_, dropped) = self.cut(to, to + len, true);
        for e in moved {
            self.extents.push(Extent {
                addr: e.addr - from + to,
                ..e
            });
        }
        self.extents.sort_unstable_by_key(|e| e.addr);
        self.dirty = true;
        dropped
    }

    /// A forked child's view: same pages, minus `DONTFORK`/`WIPEONFORK` areas.
    fn fork(&self, id: u64, uffd: Uffd) -> Space {
        let mut child = Space {
            id,
            uffd,
            extents: self.extents.clone(),
            done: self.done.clone(),
            remaining: self.remaining,
            by_first: Vec::new(),
            dirty: true,
            jobs: Vec::new(),
            job_pos: (0, 0),
            jobs_built: false,
            in_flight: 0,
            rescanned: false,
            exit_fd: None,
            alive: true,
            last_probe: Instant::now(),
        };
        let gone: Vec<Extent> = child
            .extents
            .iter()
            .filter(|e| e.drop_on_fork)
            .copied()
            .collect();
        for e in gone {
            child.cut(e.addr, e.end(), true);
        }
        child
    }

    fn build_jobs(&mut self) {
        self.jobs = self.extents.iter().map(|e| (e.first, e.pages)).collect();
        self.jobs
            .sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        self.job_pos = (0, self.jobs.first().map_or(0, |j| j.0));
        self.jobs_built = true;
    }

    /// The next page-table index to stream, largest runs first.
    fn next_stream_index(&mut self) -> Option<(u64, u64)> {
        if !self.jobs_built {
            self.build_jobs();
        }
        while let Some(&(f, n)) = self.jobs.get(self.job_pos.0) {
            let mut k = self.job_pos.1.max(f);
            while k < f + n && self.done.get(k) {
                k += 1;
            }
            if k < f + n {
                self.job_pos.1 = k;
                return Some((k, f + n));
            }
            self.job_pos.0 += 1;
            self.job_pos.1 = 0;
        }
        None
    }
}

/// How a copy or zeropage ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Done; `raced` if some page was already present.
    Done { copied: u64, raced: bool },
    /// `EAGAIN` (address space changing): read events, then redo from the bookkeeping.
    Retry { copied: u64 },
    /// The address space is gone (`ESRCH`): the process exited.
    Dead { copied: u64 },
}

struct Fault {
    space: u64,
    addr: u64,
    read_at: Instant,
    first_try: Instant,
}

/// A streaming batch: page-table indexes `first..first + n` for space `space`, read and
/// verified by the reader thread into `buf` (whatever their address is by then: the
/// server maps indexes to addresses when it copies).
struct Batch {
    space: u64,
    first: u64,
    n: u64,
    buf: Vec<u8>,
}

/// The streaming reader: a thread that reads, decompresses and verifies the next batches
/// (on the other core) while the server copies the current one and serves faults. Only
/// the server's thread copies into the process and keeps the bookkeeping, so every copy
/// still follows the events read before it (`EAGAIN` for those not read yet).
struct Reader {
    jobs: Option<mpsc::Sender<Batch>>,
    done: mpsc::Receiver<(Batch, Result<(), StoreError>)>,
    /// An eventfd the thread counts finished batches on (the server polls it).
    wake: Arc<EventFd>,
    /// Batches handed to the thread and not received back.
    in_flight: usize,
    /// Buffers of received batches, for the next ones.
    free: Vec<Vec<u8>>,
}

impl Reader {
    fn start(snap: Arc<Snapshot>) -> Result<Reader> {
        let wake =
            Arc::new(EventFd::new().map_err(|e| anyhow!("eventfd for the streaming reader: {e}"))?);
        let (jobs, rx) = mpsc::channel::<Batch>();
        let (tx, done) = mpsc::channel();
        let w = wake.clone();
        // A registry's pages come by range requests: two at once, as before the reader.
        let threads = if snap.registry().is_some() { 2 } else { 1 };
        // Not joined: a remote snapshot's read may take a while to fail once the instance
        // is over; the thread ends after its current batch once `jobs` is dropped.
        std::thread::Builder::new()
            .name("page-reader".into())
            .spawn(move || {
                while let Ok(mut b) = rx.recv() {
                    let bytes = &mut b.buf[..(b.n * PAGE) as usize];
                    let r = snap.read_pages_parallel(b.first, b.n, bytes, threads);
                    if tx.send((b, r)).is_err() {
                        return;
                    }
                    w.signal();
                }
            })
            .context("starting the streaming reader thread")?;
        Ok(Reader {
            jobs: Some(jobs),
            done,
            wake,
            in_flight: 0,
            free: Vec::new(),
        })
    }

    fn send(&mut self, space: u64, first: u64, n: u64) -> Result<()> {
        let buf = self
            .free
            .pop()
            .unwrap_or_else(|| vec![0; (BATCH_PAGES * PAGE) as usize]);
        let b = Batch {
            space,
            first,
            n,
            buf,
        };
        self.jobs
            .as_ref()
            .and_then(|j| j.send(b).ok())
            .ok_or_else(|| anyhow!("the streaming reader thread is gone"))?;
        self.in_flight += 1;
        Ok(())
    }

    /// A finished batch, if one is ready.
    fn ready(&mut self) -> Option<(Batch, Result<(), StoreError>)> {
        let r = self.done.try_recv().ok()?;
        self.in_flight -= 1;
        Some(r)
    }

    /// Resets the eventfd after it woke the server (the batches it counted are in
    /// `done` already: the thread counts each after sending it).
    fn reset_wake(&self) {
        self.wake.reset();
    }
}

/// Serves a restored process's private anonymous memory from a snapshot.
///
/// See the [module docs](super) for the caller's contract.
pub struct LazyServer {
    snap: Arc<Snapshot>,
    opts: LazyOptions,
    spaces: Vec<Space>,
    next_id: u64,
    pending: VecDeque<Fault>,
    /// Page buffer for one batch (2 MiB), reused.
    buf: Vec<u8>,
    msgs: Vec<UffdMsg>,
    stats: ServeStats,
    stop: Arc<Stop>,
    /// When the last fault was served (or serving began).
    last_fault: Instant,
    /// When `serve` began.
    started: Instant,
    recorded: Option<Bitmap>,
    page_count: u64,
    /// The whole-table checksum of a snapshot opened with `Store::load_deferred`,
    /// being computed on another thread.
    table_check: Option<std::thread::JoinHandle<Result<(), StoreError>>>,
    /// Holds a copy of each forked child's userfaultfd while it is served.
    keeper: Option<Box<dyn SpaceKeeper>>,
    /// Given the working set as soon as recording ends.
    on_learned: Option<Box<dyn FnOnce(Vec<u64>) + Send>>,
    /// Reads streaming batches ahead (started with the first one).
    reader: Option<Reader>,
}

/// Something outside the monitor that holds the userfaultfds being served, so that a
/// monitor that dies leaves faults blocked rather than zero-filled (see
/// `restore::keeper`). Space 0 is the process's own; forked children get theirs here.
pub trait SpaceKeeper: Send {
    /// Keep a copy of space `space`'s userfaultfd.
    fn hold(&mut self, space: u64, uffd: BorrowedFd<'_>) -> std::io::Result<()>;
    /// Space `space` is served (or its process gone): let its copy go.
    fn retire(&mut self, space: u64);
}

fn uffd_features(u: &Uffd) -> Option<Features> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", u.as_raw_fd())).ok()?;
    let api = text.lines().find_map(|l| l.strip_prefix("API:"))?;
    let f = api.trim().split(':').nth(1)?;
    u64::from_str_radix(f, 16)
        .ok()
        .map(Features::from_bits_retain)
}

impl LazyServer {
    /// A server for the process whose memory `uffd` (registered by that process, taken
    /// with `pidfd_getfd`) covers as `plan` says. Fails if the userfaultfd lacks
    /// [`REQUIRED_FEATURES`] or the plan does not fit the snapshot.
    pub fn new(
        snap: Arc<Snapshot>,
        mut plan: LazyPlan,
        uffd: Uffd,
        opts: LazyOptions,
    ) -> Result<Self> {
        let ctx = || format!("lazy restore from snapshot {}", snap.id.short());
        plan.page_count = snap.page_count();
        plan.validate(plan.page_count)
            .map_err(|e| anyhow!("{}: bad plan: {e}", ctx()))?;
        if let Some(f) = uffd_features(&uffd) {
            let missing = REQUIRED_FEATURES - f;
            if !missing.is_empty() {
                bail!(
                    "{}: the userfaultfd lacks {missing:?}: forks, mremap, munmap or \
                     MADV_DONTNEED would corrupt memory",
                    ctx()
                );
            }
            if f.contains(Features::SIGBUS) {
                bail!("{}: the userfaultfd uses SIGBUS mode", ctx());
            }
        }
        uffd.set_nonblocking(true)
            .with_context(|| format!("{}: setting O_NONBLOCK on the userfaultfd", ctx()))?;
        let page_count = plan.page_count;
        let space = Space::new(0, uffd, plan.extents, page_count);
        let mut msgs = Vec::with_capacity(64);
        msgs.resize_with(64, UffdMsg::default);
        Ok(LazyServer {
            snap,
            recorded: opts
                .record_working_set
                .then(|| Bitmap(vec![0; page_count.div_ceil(64) as usize])),
            opts,
            spaces: vec![space],
            next_id: 1,
            pending: VecDeque::new(),
            buf: vec![0; (BATCH_PAGES * PAGE) as usize],
            msgs,
            stats: ServeStats::default(),
            stop: Arc::new(Stop::new()),
            last_fault: Instant::now(),
            started: Instant::now(),
            page_count,
            table_check: None,
            keeper: None,
            on_learned: None,
            reader: None,
        })
    }

    /// Takes the page-table check of a snapshot opened with `Store::load_deferred`:
    /// `serve` fails (and the instance is killed) if it fails, and does not finish
    /// before it is done. Every page is verified against its record's hash anyway; this
    /// catches what only the whole-table checksum can (a record replaced by another
    /// well-formed one).
    pub fn check_table(&mut self, job: std::thread::JoinHandle<Result<(), StoreError>>) {
        self.table_check = Some(job);
    }

    /// Waits for the page-table check, if one is running.
    fn finish_table_check(&mut self) -> Result<()> {
        if let Some(job) = self.table_check.take() {
            job.join()
                .map_err(|_| anyhow!("the page-table check panicked"))?
                .with_context(|| {
                    format!(
                        "lazy restore from snapshot {}: its page table is damaged",
                        self.snap.id.short()
                    )
                })?;
        }
        Ok(())
    }

    /// Hands the userfaultfd of every child the process forks to `keeper` before serving
    /// it (a failure fails `serve`), and retires each space when it is done.
    pub fn keep_spaces_with(&mut self, keeper: impl SpaceKeeper + 'static) {
        self.keeper = Some(Box::new(keeper));
    }

    /// Calls `done` with the working set as soon as recording ends (the first answer,
    /// `record_for`, or the process exiting while still recording), so that it can be
    /// kept while the instance runs on. [`ServeStats::working_set`] has it too.
    pub fn on_learned(&mut self, done: impl FnOnce(Vec<u64>) + Send + 'static) {
        self.on_learned = Some(Box::new(done));
    }

    fn hand_over_working_set(&mut self) {
        if let Some(done) = self.on_learned.take() {
            // Empty too: the other processes of a tree wait for every one's.
            done(self.stats.working_set.clone());
        }
    }

    /// Lets the server notice at once that the process exited (`pidfd_open` of it), and
    /// kill it (`SIGKILL`) if serving fails.
    pub fn watch_exit(&mut self, pidfd: OwnedFd) {
        if let Some(s) = self.spaces.first_mut() {
            s.exit_fd = Some(pidfd);
        }
    }

    /// Records until `h` (another server's [`record_handle`](Self::record_handle)) says
    /// stop: the servers of a tree's processes learn until the root's first answer.
    pub fn share_recording_stop(&mut self, h: &RecordHandle) {
        self.stop = h.0.clone();
    }

    /// A handle that stops working-set recording (usable from any thread).
    pub fn record_handle(&self) -> RecordHandle {
        RecordHandle(self.stop.clone())
    }

    /// Stops working-set recording.
    pub fn stop_recording(&self) {
        self.stop.set();
    }

    /// What `serve` did so far (tests drive it with [`Self::step`]).
    #[cfg(test)]
    pub(super) fn stats(&self) -> &ServeStats {
        &self.stats
    }

    /// Stored pages not yet copied into the restored process.
    pub fn remaining_pages(&self) -> u64 {
        self.spaces.iter().map(|s| s.remaining).sum()
    }

    /// Copies the working set (`LazyOptions::prefetch`) in contiguous batches of up to
    /// 2 MiB, from [`LazyOptions::hot`] where it has the pages. Call it before the app
    /// resumes. An error (e.g. a corrupt page) means the restore must be abandoned: kill
    /// the process, then drop the server.
    pub fn prefetch(&mut self) -> Result<PrefetchStats> {
        let t = Instant::now();
        let mut st = PrefetchStats::default();
        let Some(mut ws) = self.opts.prefetch.take() else {
            return Ok(st);
        };
        ws.sort_unstable();
        ws.dedup();
        // The batches: runs of working-set pages of one extent (small gaps filled, unless
        // the pages come from the hot pages: decoding a gap costs more than an ioctl).
        let gap = if self.opts.hot.is_some() {
            0
        } else {
            PREFETCH_GAP
        };
        let mut batches: Vec<(usize, u64, u64)> = Vec::new();
        let mut i = 0;
        while i < ws.len() {
            let idx = ws[i];
            let sp = &mut self.spaces[0];
            let Some(pos) = (idx < self.page_count)
                .then(|| sp.extent_of_index(idx))
                .flatten()
            else {
                st.ignored += 1;
                i += 1;
                continue;
            };
            let e = sp.extents[pos];
            let limit = (e.first + e.pages).min(idx + BATCH_PAGES);
            // Coalesce following working-set pages of the same extent (small gaps too).
            let mut end = idx + 1;
            i += 1;
            st.requested += 1;
            while i < ws.len() && ws[i] < limit && ws[i] <= end + gap {
                end = ws[i] + 1;
                st.requested += 1;
                i += 1;
            }
            batches.push((pos, idx - e.first, end - idx));
        }
        let hot = self.opts.hot.clone();
        for &(pos, off, n) in &batches {
            // Stretches held by the hot pages are copied straight from there (verified
            // already); the rest is read from the packs.
            let first = self.spaces[0].extents[pos].first;
            let mut o = off;
            while o < off + n {
                let idx = first + o;
                let h = hot.as_ref().map_or(0, |h| h.run_from(idx, off + n - o));
                if h > 0 {
                    let bytes = hot.as_ref().and_then(|x| x.pages(idx, h));
                    self.prefetch_batch(&mut st, pos, o, h, bytes)?;
                    st.hot_pages += h;
                    o += h;
                } else {
                    let mut m = 1;
                    while o + m < off + n
                        && hot.as_ref().is_none_or(|x| x.run_from(idx + m, 1) == 0)
                    {
                        m += 1;
                    }
                    self.prefetch_batch(&mut st, pos, o, m, None)?;
                    o += m;
                }
            }
        }
        st.elapsed = t.elapsed();
        Ok(st)
    }

    /// Copies pages `off..off+n` of extent `pos` of the first space, from `bytes` when
    /// given (already read and verified) or from the snapshot.
    fn prefetch_batch(
        &mut self,
        st: &mut PrefetchStats,
        pos: usize,
        off: u64,
        n: u64,
        bytes: Option<&[u8]>,
    ) -> Result<()> {
        let mut tries = 0;
        loop {
            let outcome = match bytes {
                Some(b) => self.copy_bytes(0, pos, off, n, b)?,
                None => self.copy_range(0, pos, off, n)?,
            };
            match outcome {
                Outcome::Done { copied, .. } => {
                    st.pages += copied;
                    st.batches += 1;
                    return Ok(());
                }
                Outcome::Retry { copied } => {
                    // The process is stopped before resuming: only a racing exit
                    // or a debugger could change it. Retry a few times.
                    st.pages += copied;
                    tries += 1;
                    if tries > 1000 {
                        bail!(
                            "prefetch from snapshot {}: the address space keeps changing",
                            self.snap.id.short()
                        );
                    }
                    self.drain(0)?;
                    std::thread::yield_now();
                }
                Outcome::Dead { .. } => bail!(
                    "prefetch from snapshot {}: the restored process is gone",
                    self.snap.id.short()
                ),
            }
        }
    }

    /// Serves faults and events until every stored page is in (then closes the
    /// userfaultfds) or the process and every child it forked exited. Needs no ptrace:
    /// run it on its own thread. On error the instance must be killed: see
    /// [`LazyError`].
    pub fn serve(mut self) -> std::result::Result<ServeStats, LazyError> {
        let start = Instant::now();
        self.last_fault = start;
        self.started = start;
        match self.run(start) {
            Ok(()) => {
                // The process exited while still recording: what it faulted is all there is.
                self.hand_over_working_set();
                self.stats.elapsed = start.elapsed();
                Ok(std::mem::take(&mut self.stats))
            }
            Err(error) => {
                // Never let the instance run on: kill it while its faults are still
                // blocked on our descriptors.
                for s in &self.spaces {
                    if let Some(fd) = &s.exit_fd {
                        let _ = crate::sys::pidfd::pidfd_send_signal(fd, libc::SIGKILL);
                    }
                }
                Err(LazyError {
                    error,
                    hold: self.spaces.drain(..).map(|s| s.uffd).collect(),
                })
            }
        }
    }

    fn recording(&self, start: Instant) -> bool {
        self.recorded.is_some()
            && !self.stop.get()
            && self.opts.record_for.is_none_or(|d| start.elapsed() < d)
    }

    fn run(&mut self, start: Instant) -> Result<()> {
        while !self.step(start)? {}
        Ok(())
    }

    /// One round of serving: read the pending messages, then answer one fault, or else
    /// copy one streaming batch, or else wait. True once there is nothing left to serve.
    /// A fault read is always answered before the next streaming batch is copied.
    pub(super) fn step(&mut self, start: Instant) -> Result<bool> {
        if self.table_check.as_ref().is_some_and(|j| j.is_finished()) {
            self.finish_table_check()?;
        }
        for i in 0..self.spaces.len() {
            self.drain(i)?;
        }
        if self.on_learned.is_some() && !self.recording(start) {
            self.hand_over_working_set();
        }
        if let Some(f) = self.pending.pop_front() {
            self.handle_fault(f, start)?;
            return Ok(false);
        }
        // Close finished or dead address spaces (with the keeper's copies: their
        // pending faults, if any, are woken by the kernel on the last close).
        let keeper = &mut self.keeper;
        self.spaces.retain(|s| {
            let keep = s.alive && s.remaining > 0;
            if !keep {
                if let Some(k) = keeper.as_mut() {
                    k.retire(s.id);
                }
            }
            keep
        });
        if self.spaces.is_empty() {
            self.finish_table_check()?;
            if !self.stats.target_exited {
                self.stats.complete_after = Some(start.elapsed());
            }
            // The reader thread ends after its current batch.
            self.reader = None;
            return Ok(true);
        }
        let streaming = self.streaming(start);
        if streaming {
            // Hand the reader the next batches first, so that it reads them while this
            // thread copies.
            self.issue_batches()?;
            if let Some((b, read)) = self.reader.as_mut().and_then(Reader::ready) {
                let out = self.copy_batch(&b, read);
                if let Some(r) = self.reader.as_mut() {
                    r.free.push(b.buf);
                }
                out?;
                return Ok(false);
            }
        }
        self.wait_idle(start, streaming)?;
        Ok(false)
    }

    /// Background streaming goes on now: on, not recording, and no fault for a while.
    fn streaming(&self, start: Instant) -> bool {
        self.opts.background && !self.recording(start) && self.last_fault.elapsed() >= STREAM_QUIET
    }

    /// Reads every pending message of space `i`; faults are queued, events applied.
    fn drain(&mut self, i: usize) -> Result<()> {
        loop {
            let n = {
                let s = &self.spaces[i];
                if !s.alive {
                    return Ok(());
                }
                s.uffd
                    .read_events(&mut self.msgs)
                    .with_context(|| "reading userfaultfd events")?
            };
            if n == 0 {
                return Ok(());
            }
            for k in 0..n {
                let Some(ev) = self.msgs[k].take() else {
                    continue;
                };
                let s = &mut self.spaces[i];
                match ev {
                    Event::Pagefault { addr, .. } => {
                        let now = Instant::now();
                        self.pending.push_back(Fault {
                            space: s.id,
                            addr,
                            read_at: now,
                            first_try: now,
                        });
                    }
                    Event::Remove { start, end } => {
                        self.stats.removes += 1;
                        self.stats.pages_dropped += s.cut(start, end, true).1;
                    }
                    Event::Unmap { start, end } => {
                        self.stats.unmaps += 1;
                        self.stats.pages_dropped += s.cut(start, end, true).1;
                    }
                    Event::Remap { from, to, len } => {
                        self.stats.remaps += 1;
                        self.stats.pages_dropped += s.remap(from, to, len);
                    }
                    Event::Fork { uffd } => {
                        self.stats.forks += 1;
                        let uffd = Uffd::from_owned(uffd);
                        let id = self.next_id;
                        self.next_id += 1;
                        // In `spaces` before anything can fail: an error keeps it (and so
                        // the child's faults blocked) until the instance is killed.
                        let child = s.fork(id, uffd);
                        self.spaces.push(child);
                        let child = self.spaces.last().unwrap();
                        child
                            .uffd
                            .set_nonblocking(true)
                            .context("setting O_NONBLOCK on a forked child's userfaultfd")?;
                        if let Some(k) = self.keeper.as_mut() {
                            k.hold(id, child.uffd.as_fd())
                                .context("handing a forked child's userfaultfd to the keeper")?;
                            tracing::debug!("lazy restore: a forked child's userfaultfd is held");
                        }
                    }
                    Event::Unknown { event } => {
                        tracing::warn!("lazy restore: unknown userfaultfd event {event:#x}")
                    }
                }
            }
            if n < self.msgs.len() {
                return Ok(());
            }
        }
    }

    fn space_pos(&self, id: u64) -> Option<usize> {
        self.spaces.iter().position(|s| s.id == id)
    }

    fn handle_fault(&mut self, f: Fault, start: Instant) -> Result<()> {
        self.last_fault = Instant::now();
        let Some(si) = self.space_pos(f.space) else {
            return Ok(());
        };
        if f.first_try == f.read_at {
            self.stats.faults += 1;
            if self.stats.first_fault.is_none() {
                self.stats.first_fault = Some(start.elapsed());
            }
        }
        let page = f.addr & !(PAGE - 1);
        let recording = self.recording(start);
        let s = &mut self.spaces[si];
        let outcome = match find(&s.extents, page) {
            None => {
                // No stored page here: map zeros over the following stretch without
                // stored pages too (a scan of a zeroed buffer faults once, not per page).
                let next = s.extents.partition_point(|e| e.end() <= page);
                let end = s
                    .extents
                    .get(next)
                    .map_or(u64::MAX, |e| e.addr)
                    .min(page.saturating_add(ZERO_AHEAD_PAGES * PAGE));
                let o = zeropage(&s.uffd, page, end - page)?;
                if o == (Outcome::Done {
                    copied: 0,
                    raced: false,
                }) {
                    self.stats.faults_zero += 1;
                } else if let Outcome::Done { raced: true, .. } = o {
                    self.stats.faults_raced += 1;
                }
                o
            }
            Some((pos, off)) => {
                let e = s.extents[pos];
                let idx = e.first + off;
                let (lo, n) = if s.done.get(idx) {
                    (off, 1)
                } else {
                    let w0 = off / READAHEAD_PAGES * READAHEAD_PAGES;
                    let w1 = (w0 + READAHEAD_PAGES).min(e.pages);
                    let mut lo = off;
                    while lo > w0 && !s.done.get(e.first + lo - 1) {
                        lo -= 1;
                    }
                    let mut hi = off + 1;
                    while hi < w1 && !s.done.get(e.first + hi) {
                        hi += 1;
                    }
                    if recording {
                        // The whole read-ahead window: the app goes on to use those
                        // pages without faulting, so a working set of faulting pages
                        // alone would leave them to faults on the next run. The faulting
                        // page comes first.
                        if let Some(r) = &mut self.recorded {
                            let window = std::iter::once(idx)
                                .chain((e.first + lo..e.first + hi).filter(|&i| i != idx));
                            for i in window {
                                if r.set(i) {
                                    self.stats.working_set.push(i);
                                }
                            }
                        }
                    }
                    (lo, hi - lo)
                };
                let o = self
                    .copy_range(si, pos, lo, n)
                    .with_context(|| format!("serving a fault at {:#x}", f.addr))?;
                match o {
                    Outcome::Done { copied, raced } => {
                        self.stats.pages_on_fault += copied;
                        if copied > 0 {
                            self.stats.faults_data += 1;
                        } else if raced {
                            self.stats.faults_raced += 1;
                        }
                    }
                    Outcome::Retry { copied } | Outcome::Dead { copied } => {
                        self.stats.pages_on_fault += copied
                    }
                }
                o
            }
        };
        match outcome {
            Outcome::Done { .. } => {
                let lat = f.read_at.elapsed();
                self.stats.fault_latency_total += lat;
                self.stats.fault_latency_max = self.stats.fault_latency_max.max(lat);
            }
            Outcome::Retry { .. } => {
                self.stats.retries += 1;
                if f.first_try.elapsed() > RETRY_LIMIT {
                    bail!(
                        "fault at {:#x}: the address space kept changing for {:?}",
                        f.addr,
                        RETRY_LIMIT
                    );
                }
                let before = self.pending.len();
                self.drain(si)?;
                if self.pending.len() == before {
                    std::thread::yield_now();
                }
                self.pending.push_back(Fault {
                    read_at: Instant::now(),
                    ..f
                });
            }
            Outcome::Dead { .. } => self.space_died(si),
        }
        Ok(())
    }

    fn space_died(&mut self, si: usize) {
        let s = &mut self.spaces[si];
        s.alive = false;
        if s.remaining > 0 {
            self.stats.target_exited = true;
        }
    }

    /// Copies pages `off..off+n` of extent `pos` of space `si` (from the snapshot,
    /// verified). Pages already present are marked and skipped.
    fn copy_range(&mut self, si: usize, pos: usize, off: u64, n: u64) -> Result<Outcome> {
        let e = self.spaces[si].extents[pos];
        let idx = e.first + off;
        let addr = e.addr + off * PAGE;
        let mut buf = std::mem::take(&mut self.buf);
        let bytes = &mut buf[..(n * PAGE) as usize];
        // A large read (prefetch, streaming) is worth the other core.
        let threads = if n >= PARALLEL_READ_PAGES { 2 } else { 1 };
        let read = self
            .snap
            .read_pages_parallel(idx, n, bytes, threads)
            .with_context(|| {
                format!(
                    "lazy restore: reading pages {idx}..+{n} for {addr:#x} from snapshot {}",
                    self.snap.id.short()
                )
            });
        let out = read.and_then(|()| self.copy_bytes(si, pos, off, n, bytes));
        self.buf = buf;
        out
    }

    /// Copies `bytes` (pages `off..off+n` of extent `pos` of space `si`, read and
    /// verified) into the process. Pages already present are marked and skipped.
    fn copy_bytes(
        &mut self,
        si: usize,
        pos: usize,
        off: u64,
        n: u64,
        bytes: &[u8],
    ) -> Result<Outcome> {
        let s = &mut self.spaces[si];
        let e = s.extents[pos];
        let idx = e.first + off;
        let addr = e.addr + off * PAGE;
        let mut done = 0u64;
        let mut copied = 0u64;
        let mut raced = false;
        let mut limit = n;
        while done < n {
            let chunk = (n - done).min(limit);
            let src = &bytes[(done * PAGE) as usize..((done + chunk) * PAGE) as usize];
            match s.uffd.copy(addr + done * PAGE, src, CopyMode::empty()) {
                Ok(b) => {
                    let p = b as u64 / PAGE;
                    s.mark(idx + done, p);
                    copied += p;
                    done += p;
                    self.stats.pages_copied += p;
                    if p == 0 {
                        return Ok(Outcome::Retry { copied });
                    }
                }
                Err(UffdError::Exists { .. }) => {
                    s.mark(idx + done, 1);
                    raced = true;
                    done += 1;
                }
                Err(err) => match err.errno() {
                    // Crosses a VMA boundary the app created (mprotect split): smaller.
                    Errno::ENOENT if chunk > 1 => limit = chunk / 2,
                    // Not mapped or registered anymore: nothing to serve there.
                    Errno::ENOENT => {
                        s.mark(idx + done, 1);
                        done += 1;
                    }
                    Errno::ESRCH => return Ok(Outcome::Dead { copied }),
                    _ => {
                        return Err(anyhow::Error::new(err).context(format!(
                            "UFFDIO_COPY of {chunk} pages at {:#x}",
                            addr + done * PAGE
                        )))
                    }
                },
            }
        }
        if raced {
            // Whoever populated those pages may not have woken our faulting thread.
            let _ = s.uffd.wake(Range {
                start: addr,
                len: n * PAGE,
            });
        }
        Ok(Outcome::Done { copied, raced })
    }

    /// Copies one page of space `si`'s remaining ones (a liveness check of a process
    /// without an exit notification: `ESRCH` tells it is gone).
    fn probe(&mut self, si: usize) -> Result<()> {
        if !self.streamable(si) {
            return Ok(());
        }
        let s = &mut self.spaces[si];
        s.last_probe = Instant::now();
        // Any page still to copy (the streaming cursor may be past the ones left).
        let found = s.extents.iter().enumerate().find_map(|(pos, e)| {
            (e.first..e.first + e.pages)
                .find(|&i| !s.done.get(i))
                .map(|i| (pos, i))
        });
        let Some((pos, idx)) = found else {
            return Ok(());
        };
        let e = s.extents[pos];
        match self.copy_range(si, pos, idx - e.first, 1)? {
            Outcome::Done { copied, .. } => self.count_streamed(copied),
            Outcome::Retry { copied } => {
                self.count_streamed(copied);
                self.stats.retries += 1;
                self.drain(si)?;
            }
            Outcome::Dead { copied } => {
                self.count_streamed(copied);
                self.space_died(si);
            }
        }
        Ok(())
    }

    /// Hands the reader thread the next streaming batches (largest runs first, up to
    /// [`BATCH_PAGES`] each) until [`STREAM_AHEAD`] are with it.
    fn issue_batches(&mut self) -> Result<()> {
        if self.reader.is_none() {
            self.reader = Some(Reader::start(self.snap.clone())?);
        }
        let mut si = 0;
        while si < self.spaces.len() && self.reader.as_ref().unwrap().in_flight < STREAM_AHEAD {
            if !self.streamable(si) {
                si += 1;
                continue;
            }
            let s = &mut self.spaces[si];
            let Some((idx, job_end)) = s.next_stream_index() else {
                if s.in_flight == 0 {
                    if s.rescanned {
                        // Nothing left to copy after all.
                        s.remaining = 0;
                    } else {
                        // Pages an interrupted copy left behind the cursor.
                        s.build_jobs();
                        s.rescanned = true;
                        continue;
                    }
                }
                si += 1;
                continue;
            };
            let Some(pos) = s.extent_of_index(idx) else {
                tracing::warn!("lazy restore: page-table record {idx} lost its address");
                s.mark(idx, 1);
                continue;
            };
            let e = s.extents[pos];
            let end = (e.first + e.pages).min(job_end).min(idx + BATCH_PAGES);
            let mut hi = idx + 1;
            while hi < end && !s.done.get(hi) {
                hi += 1;
            }
            s.job_pos.1 = hi;
            s.in_flight += 1;
            s.rescanned = false;
            s.last_probe = Instant::now();
            let id = s.id;
            if self.stats.stream_started.is_none() {
                self.stats.stream_started = Some(self.started.elapsed());
            }
            self.reader.as_mut().unwrap().send(id, idx, hi - idx)?;
        }
        Ok(())
    }

    /// Copies a batch the reader read (`read`: how that went) into its space: the pages
    /// not in yet, at the addresses their indexes have now.
    fn copy_batch(&mut self, b: &Batch, read: Result<(), StoreError>) -> Result<()> {
        let Some(si) = self.space_pos(b.space) else {
            return Ok(());
        };
        self.spaces[si].in_flight -= 1;
        let end = b.first + b.n;
        let wanted = |s: &Space| (b.first..end).any(|i| !s.done.get(i));
        if !self.spaces[si].alive || !wanted(&self.spaces[si]) {
            // Gone, or every page in or dropped meanwhile: whatever the read gave.
            return Ok(());
        }
        read.with_context(|| {
            format!(
                "lazy restore: streaming pages {}..+{} from snapshot {}",
                b.first,
                b.n,
                self.snap.id.short()
            )
        })?;
        let mut k = b.first;
        while k < end {
            let s = &mut self.spaces[si];
            if s.done.get(k) {
                k += 1;
                continue;
            }
            let Some(pos) = s.extent_of_index(k) else {
                tracing::warn!("lazy restore: page-table record {k} lost its address");
                s.mark(k, 1);
                k += 1;
                continue;
            };
            let e = s.extents[pos];
            let stop = (e.first + e.pages).min(end);
            let mut hi = k + 1;
            while hi < stop && !s.done.get(hi) {
                hi += 1;
            }
            let at = ((k - b.first) * PAGE) as usize;
            let bytes = &b.buf[at..at + ((hi - k) * PAGE) as usize];
            match self.copy_bytes(si, pos, k - e.first, hi - k, bytes)? {
                Outcome::Done { copied, .. } => {
                    self.count_streamed(copied);
                    k = hi;
                }
                Outcome::Retry { copied } => {
                    // The address space is changing: read the events; the pages left
                    // are found again once the streaming order is rebuilt.
                    self.count_streamed(copied);
                    self.stats.retries += 1;
                    self.drain(si)?;
                    return Ok(());
                }
                Outcome::Dead { copied } => {
                    self.count_streamed(copied);
                    self.space_died(si);
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn streamable(&self, si: usize) -> bool {
        let s = &self.spaces[si];
        s.alive && s.remaining > 0
    }

    fn count_streamed(&mut self, pages: u64) {
        self.stats.pages_streamed += pages;
        self.stats.bytes_streamed += pages * PAGE;
    }

    /// Blocks until a message arrives, a process exits, a streaming batch is read (while
    /// `streaming`), or it is time to check liveness or the recording deadline.
    fn wait_idle(&mut self, start: Instant, streaming: bool) -> Result<()> {
        let recording = self.recording(start);
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(self.spaces.len() * 2 + 2);
        for s in &self.spaces {
            fds.push(libc::pollfd {
                fd: s.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            fds.push(libc::pollfd {
                fd: s.exit_fd.as_ref().map_or(-1, |f| f.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let mut timeout = PROBE_INTERVAL;
        if self.opts.background && !recording {
            let since = self.last_fault.elapsed();
            if since < STREAM_QUIET {
                timeout = timeout.min(STREAM_QUIET - since + Duration::from_millis(1));
            }
        }
        let reader = match &self.reader {
            Some(r) if streaming && r.in_flight > 0 => {
                fds.push(libc::pollfd {
                    fd: r.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                Some(fds.len() - 1)
            }
            _ => None,
        };
        if recording {
            if let Some(d) = self.opts.record_for {
                timeout = timeout.min(d.saturating_sub(start.elapsed()));
            }
            if let Some(w) = &self.stop.wake {
                fds.push(libc::pollfd {
                    fd: w.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
        }
        // SAFETY: `fds` is a live Vec of initialised pollfds and fds.len() is passed as
        // its count; the kernel writes only their revents fields.
        let r = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                timeout.as_millis() as i32,
            )
        };
        if r < 0 {
            let e = Errno::last();
            if e == Errno::EINTR {
                return Ok(());
            }
            bail!("poll on the userfaultfds: {e}");
        }
        if let (Some(k), Some(r)) = (reader, &self.reader) {
            if fds[k].revents != 0 {
                r.reset_wake();
            }
        }
        let spaces = self.spaces.len();
        for (k, p) in fds[..spaces * 2].chunks_exact(2).enumerate() {
            if p[0].revents & libc::POLLERR != 0 {
                bail!("userfaultfd reports POLLERR (is O_NONBLOCK cleared?)");
            }
            if p[1].revents != 0 {
                self.space_died(k);
            }
        }
        // Spaces with no exit notification: probe them with one page of real data
        // (always correct to copy; ESRCH tells the process is gone).
        let now = Instant::now();
        for si in 0..self.spaces.len() {
            let s = &self.spaces[si];
            if s.alive
                && s.exit_fd.is_none()
                && s.remaining > 0
                && now.duration_since(s.last_probe) >= PROBE_INTERVAL
            {
                self.probe(si)?;
            }
        }
        Ok(())
    }
}

/// Maps zero pages at `page` and, as far as it can in one call, the rest of
/// `page..page + len` (a range crossing the end of the VMA is halved until it fits).
fn zeropage(u: &Uffd, page: u64, mut len: u64) -> Result<Outcome> {
    loop {
        let range = Range { start: page, len };
        let raced = || {
            let _ = u.wake(Range {
                start: page,
                len: PAGE,
            });
            Ok(Outcome::Done {
                copied: 0,
                raced: true,
            })
        };
        return match u.zeropage(range, ZeropageMode::empty()) {
            Ok(0) => Ok(Outcome::Retry { copied: 0 }),
            // The faulting page (the first) is mapped; a partial range is fine.
            Ok(_) => Ok(Outcome::Done {
                copied: 0,
                raced: false,
            }),
            Err(UffdError::Exists { .. }) => raced(),
            Err(e) => match e.errno() {
                Errno::ESRCH => Ok(Outcome::Dead { copied: 0 }),
                Errno::ENOENT if len > PAGE => {
                    len = (len / 2).div_ceil(PAGE) * PAGE;
                    continue;
                }
                Errno::ENOENT => raced(),
                _ => Err(anyhow::Error::new(e).context(format!("UFFDIO_ZEROPAGE at {page:#x}"))),
            },
        };
    }
}

#[cfg(test)]
mod bitmap_tests {
    use super::Bitmap;

    #[test]
    fn ranges_match_bit_by_bit() {
        for (first, n) in [
            (0, 0),
            (0, 1),
            (3, 61),
            (5, 64),
            (63, 2),
            (64, 64),
            (10, 200),
        ] {
            let mut b = Bitmap::new_full(300);
            b.clear_range(first, n);
            for i in 0..300 {
                assert_eq!(
                    b.get(i),
                    !(first..first + n).contains(&i),
                    "{first}+{n}: {i}"
                );
            }
            assert_eq!(
                b.set_range(first.saturating_sub(2), n + 4),
                n,
                "{first}+{n}"
            );
            assert!((0..300).all(|i| b.get(i)));
        }
    }
}
