//! The monitor's side of a lazy restore: take the userfaultfd the restorer created,
//! prefetch the learned working set while the app is still stopped (on a thread of its
//! own, beside the monitor's eager writes: they fill other ranges), then serve faults
//! and stream the rest on a thread of its own while the app runs.
//!
//! A page server that fails (a corrupt page, a store gone missing) kills the whole
//! sandbox before anything reads a page it could not serve: an instance never goes on
//! running with missing memory.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use warmstart_snapshots::model::{FileDesc, Manifest};
use warmstart_snapshots::store::{Hot, Snapshot, StoreError};

use super::child::BlobInfo;
use super::keeper::Keeper;
use crate::lazy::{LazyOptions, LazyPlan, LazyServer, PrefetchStats, RecordHandle, ServeStats};
use crate::sys::pidfd;
use crate::sys::uffd::Uffd;

/// Recording a working set stops at the first answer, or after this long at most.
const LEARN_AT_MOST: Duration = Duration::from_secs(30);

/// While learning, how often the instance's TCP connections are checked for a first
/// response (a `sock_diag` query per listening port).
const ANSWER_POLL: Duration = Duration::from_millis(2);

/// The thread that keeps a learned working set in the store (joined before the monitor
/// exits, so that nothing is left half-written).
type Keeping = Arc<Mutex<Option<JoinHandle<()>>>>;

/// How one process of the tree is served: what it prefetches, whether it learns.
pub struct ProcessLazy {
    /// Its pid in the snapshot (the key of its working set).
    pub pid: i32,
    /// The root: its first answer (stdout, a TCP response) ends the learning of all.
    pub root: bool,
    /// Its working set, copied before it resumes.
    pub prefetch: Option<Vec<u64>>,
    /// Learning: where its working set goes (with the others').
    pub learning: Option<Arc<Learning>>,
    /// Learning ends when this (the root's server's handle) says so.
    pub stop: Option<RecordHandle>,
}

/// The working sets one lazy run learns, one per process of the tree: kept together
/// (in the store, and their hot pages) once every process's server handed its own over.
pub struct Learning {
    snap: Arc<Snapshot>,
    expected: usize,
    got: Mutex<(std::collections::BTreeMap<i32, Vec<u64>>, usize)>,
    keeping: Keeping,
}

impl Learning {
    /// Learning for `expected` page servers.
    pub fn new(snap: Arc<Snapshot>, expected: usize) -> Arc<Learning> {
        Arc::new(Learning {
            snap,
            expected,
            got: Mutex::new(Default::default()),
            keeping: Keeping::default(),
        })
    }

    /// Process `pid` learned `ws`; once all have, they are kept on a thread of their own
    /// (the instance runs on meanwhile).
    fn add(&self, pid: i32, ws: Vec<u64>) {
        let mut g = self.got.lock().unwrap_or_else(|p| p.into_inner());
        if !ws.is_empty() {
            g.0.insert(pid, ws);
        }
        g.1 += 1;
        if g.1 != self.expected || g.0.is_empty() {
            return;
        }
        let sets = std::mem::take(&mut g.0);
        let snap = self.snap.clone();
        match std::thread::Builder::new()
            .name("keep-working-set".into())
            .spawn(move || super::keep_working_sets(&snap, &sets))
        {
            Ok(job) => *self.keeping.lock().unwrap_or_else(|p| p.into_inner()) = Some(job),
            Err(e) => tracing::warn!("working set not kept: {e}"),
        }
    }
}

/// A page server that has its userfaultfd and is prefetching, not yet serving.
pub struct Starting {
    /// The prefetch under way; it hands the server back.
    prefetching: JoinHandle<(LazyServer, Result<PrefetchStats>)>,
    record: RecordHandle,
    /// A copy of the userfaultfd for the [`Keeper`].
    keep: OwnedFd,
    /// Learning: the TCP ports (family, port) the instance listens on; its first
    /// response on one of them ends the recording.
    answer_ports: Vec<(i32, u16)>,
    keeping: Keeping,
}

/// A page server serving a running instance.
pub struct Running {
    server: JoinHandle<Result<ServeStats>>,
    tap: Option<JoinHandle<()>>,
    watch: Option<JoinHandle<()>>,
    keeping: Keeping,
    prefetch: PrefetchStats,
}

/// What the page server did, for `--display-stats` and for storing the working set.
#[derive(Debug)]
pub struct Outcome {
    pub prefetch: PrefetchStats,
    pub serve: ServeStats,
}

fn read_word(pid: i32, addr: u64) -> Result<u64> {
    let mut w = [0u8; 8];
    crate::sys::remote::read(pid, addr, &mut w)
        .context("reading the restorer's userfaultfd number")?;
    Ok(u64::from_le_bytes(w))
}

/// At the restorer's first trap: takes its userfaultfd and starts the prefetch (joined
/// by [`Starting::run`], before the app can run).
pub fn start(
    snap: &Arc<Snapshot>,
    hot: Option<Arc<Hot>>,
    table_check: Option<JoinHandle<Result<(), StoreError>>>,
    plan: LazyPlan,
    pid: i32,
    info: &BlobInfo,
    how: ProcessLazy,
) -> Result<Starting> {
    let learn = how.learning.is_some();
    let slot = info
        .uffd_slot
        .context("the restorer did not create a userfaultfd")?;
    let fd = read_word(pid, slot)? as i32;
    let target = pidfd::pidfd_open(pid, 0).context("pidfd_open of the restored process")?;
    let taken = pidfd::pidfd_getfd(&target, fd).context("taking the restorer's userfaultfd")?;
    let keep = taken.try_clone().context("duplicating the userfaultfd")?;
    let uffd = Uffd::from_owned(taken);
    uffd.set_nonblocking(true).map_err(|e| anyhow!("{e}"))?;
    let mut server = LazyServer::new(
        snap.clone(),
        plan,
        uffd,
        LazyOptions {
            prefetch: how.prefetch,
            record_working_set: learn,
            record_for: learn.then_some(LEARN_AT_MOST),
            hot,
            background: true,
        },
    )?;
    server.watch_exit(target);
    if let Some(job) = table_check {
        server.check_table(job);
    }
    if let Some(h) = &how.stop {
        server.share_recording_stop(h);
    }
    let keeping = match &how.learning {
        Some(l) => {
            // Kept as soon as the first answer ends the recording, while the instance
            // runs on (it may never exit, or be killed): not to hold up faults.
            let (l2, pid) = (l.clone(), how.pid);
            server.on_learned(move |ws| l2.add(pid, ws));
            l.keeping.clone()
        }
        None => Keeping::default(),
    };
    let record = server.record_handle();
    // The process stays stopped until `run` has joined this: no page of it is read
    // before its working set is in.
    let prefetching = std::thread::Builder::new()
        .name("prefetch".into())
        .spawn(move || {
            let st = server.prefetch();
            (server, st)
        })
        .context("starting the prefetch thread")?;
    Ok(Starting {
        prefetching,
        record,
        keep,
        answer_ports: if learn && how.root {
            tcp_listen_ports(&snap.manifest)
        } else {
            Vec::new()
        },
        keeping,
    })
}

/// The TCP ports the snapshot's processes listen on, as (family, port).
fn tcp_listen_ports(m: &Manifest) -> Vec<(i32, u16)> {
    let mut ports: Vec<(i32, u16)> = m
        .processes
        .iter()
        .flat_map(|p| &p.fds)
        .filter_map(|f| match &f.file {
            FileDesc::Inet {
                family,
                sock_type,
                local,
                listen: Some(_),
                ..
            } if *sock_type == libc::SOCK_STREAM => local
                .parse::<std::net::SocketAddr>()
                .ok()
                .map(|a| (*family, a.port())),
            _ => None,
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

impl Starting {
    /// Its handle to end the recording of its working set.
    pub fn record_handle(&self) -> RecordHandle {
        self.record.clone()
    }

    /// Once the app runs: serves on a thread; `tap` is the read end of the app's stdout
    /// when learning (copied to our stdout; the first byte ends the recording).
    /// `keeper` holds the userfaultfds of the instance's page servers (this is
    /// `number` of them). Waits for the prefetch first.
    pub fn run(
        self,
        init: BorrowedFd<'_>,
        keeper: &Keeper,
        number: u32,
        tap: Option<OwnedFd>,
    ) -> Result<Running> {
        let (mut server, prefetch) = self
            .prefetching
            .join()
            .map_err(|_| anyhow!("the prefetch thread panicked"))?;
        let prefetch = prefetch.context("prefetching the working set")?;
        let killer = init
            .try_clone_to_owned()
            .context("duplicating the sandbox's pidfd")?;
        let record = self.record;
        let mut keeper = keeper.share(number, self.keep.as_fd())?;
        drop(self.keep);
        server.keep_spaces_with(keeper.link()?);
        let server = std::thread::Builder::new()
            .name("page-server".into())
            .spawn(move || match server.serve() {
                Ok(stats) => {
                    keeper.release();
                    Ok(stats)
                }
                Err(e) => {
                    // Kill before the error (and with it the uffd) is dropped, so no
                    // thread of the app reads a page we could not serve.
                    let _ = pidfd::pidfd_send_signal(killer.as_fd(), libc::SIGKILL);
                    Err(e
                        .into_error()
                        .context("the page server failed; the instance was killed"))
                }
            })
            .context("starting the page server thread")?;
        let watch = if self.answer_ports.is_empty() {
            None
        } else {
            let init = init
                .try_clone_to_owned()
                .context("duplicating the sandbox's pidfd")?;
            watch_answers(self.answer_ports, init, record.clone())
        };
        let tap = tap.map(|t| copy_stdout(t, record)).transpose()?;
        Ok(Running {
            server,
            tap,
            watch,
            keeping: self.keeping,
            prefetch,
        })
    }
}

/// Ends the working-set recording at the instance's first response on a TCP connection
/// to one of `ports` (seen with `sock_diag`: a connection that sent data, that the server
/// closed, or that went away after it brought a request: a client may reset it right
/// after reading the answer), or stops looking when recording ended otherwise or the
/// sandbox (`init`) is gone. Connections that had answered before the instance ran are
/// another process's. Without `sock_diag` it says so and leaves the recording to the
/// other ends (first output, exit, time limit).
fn watch_answers(
    ports: Vec<(i32, u16)>,
    init: OwnedFd,
    record: RecordHandle,
) -> Option<JoinHandle<()>> {
    use crate::fds::sock_diag::{TcpConn, TcpPortWatch};
    use std::collections::HashSet;
    fn conns(w: &mut TcpPortWatch, ports: &[(i32, u16)]) -> Result<Vec<TcpConn>> {
        let mut all = Vec::new();
        for &(family, port) in ports {
            all.extend(w.conns(family, port)?);
        }
        Ok(all)
    }
    let started = TcpPortWatch::new().and_then(|mut w| {
        let now = conns(&mut w, &ports)?;
        Ok((w, now))
    });
    let (mut w, now) = match started {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(
                "cannot watch TCP ports {ports:?} ({e:#}): the working set is learned \
                 until the app's first output or exit, or for {} s",
                LEARN_AT_MOST.as_secs()
            );
            return None;
        }
    };
    let before: HashSet<u64> = now
        .iter()
        .filter(|c| c.answered())
        .map(|c| c.cookie)
        .collect();
    let job = std::thread::Builder::new()
        .name("answer-watch".into())
        .spawn(move || {
            tracing::debug!("learning ends at the first response on TCP ports {ports:?}");
            let until = std::time::Instant::now() + LEARN_AT_MOST;
            let mut requested: HashSet<u64> = HashSet::new();
            while !record.stopped() && std::time::Instant::now() < until {
                let now = match conns(&mut w, &ports) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("watching TCP ports {ports:?}: {e:#}");
                        return;
                    }
                };
                let gone = requested
                    .iter()
                    .any(|k| !now.iter().any(|c| c.cookie == *k));
                if gone
                    || now
                        .iter()
                        .any(|c| c.answered() && !before.contains(&c.cookie))
                {
                    tracing::debug!("first response on a TCP connection: learning ends");
                    record.stop_recording();
                    return;
                }
                requested.extend(
                    now.iter()
                        .filter(|c| c.segs_in.is_some_and(|n| n > 0))
                        .map(|c| c.cookie),
                );
                let mut p = libc::pollfd {
                    fd: init.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut p, 1, ANSWER_POLL.as_millis() as i32) } > 0 {
                    return;
                }
            }
        });
    match job {
        Ok(j) => Some(j),
        Err(e) => {
            tracing::warn!("cannot start the answer-watch thread: {e}");
            None
        }
    }
}

/// Copies the app's stdout to ours, ending the working-set recording at its first byte.
fn copy_stdout(tap: OwnedFd, record: RecordHandle) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("stdout-tap".into())
        .spawn(move || {
            let mut from = std::fs::File::from(tap);
            let mut buf = vec![0u8; 64 * 1024];
            let mut first = true;
            let mut out = std::io::stdout().lock();
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if first {
                    record.stop_recording();
                    first = false;
                }
                if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
                    break;
                }
            }
        })
        .context("starting the stdout tap thread")
}

impl Running {
    /// Waits for the page server (after the instance has exited or all pages are in).
    pub fn finish(self) -> Result<Outcome> {
        if let Some(t) = self.tap {
            let _ = t.join();
        }
        let serve = self
            .server
            .join()
            .map_err(|_| anyhow!("the page server thread panicked"));
        // Before any error goes up: a working set being kept is not left half-written.
        if let Some(w) = self.watch {
            let _ = w.join();
        }
        let keeping = self
            .keeping
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(k) = keeping {
            let _ = k.join();
        }
        let serve = match serve? {
            Ok(s) => s,
            // Reads given up once the instance was over: nothing went wrong for it.
            Err(e) if abandoned(&e) => {
                tracing::debug!("{e:#}");
                ServeStats {
                    target_exited: true,
                    ..Default::default()
                }
            }
            Err(e) => return Err(e),
        };
        Ok(Outcome {
            prefetch: self.prefetch,
            serve,
        })
    }
}

/// Whether `e` comes of page reads given up (`Snapshot::abandon_page_reads`).
fn abandoned(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<StoreError>(),
            Some(StoreError::PageReadsAbandoned { .. })
        )
    })
}
