//! The monitor's side of a lazy restore: take the userfaultfd the restorer created,
//! prefetch the learned working set while the app is still stopped, then serve faults
//! and stream the rest on a thread of its own while the app runs.
//!
//! A page server that fails (a corrupt page, a store gone missing) kills the whole
//! sandbox before anything reads a page it could not serve: an instance never goes on
//! running with missing memory.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use warmstart_snapshots::store::{Hot, Snapshot, StoreError};

use super::child::BlobInfo;
use super::keeper::Keeper;
use super::RestoreOptions;
use crate::lazy::{LazyOptions, LazyPlan, LazyServer, PrefetchStats, RecordHandle, ServeStats};
use crate::sys::pidfd;
use crate::sys::uffd::Uffd;

/// Recording a working set stops at the first answer, or after this long at most.
const LEARN_AT_MOST: Duration = Duration::from_secs(30);

/// A page server that has its userfaultfd and has prefetched, not yet serving.
pub struct Starting {
    server: LazyServer,
    prefetch: PrefetchStats,
    /// A copy of the userfaultfd for the [`Keeper`].
    keep: OwnedFd,
}

/// A page server serving a running instance.
pub struct Running {
    server: JoinHandle<Result<ServeStats>>,
    tap: Option<JoinHandle<()>>,
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

/// At the restorer's first trap: takes its userfaultfd and prefetches.
pub fn start(
    snap: &Arc<Snapshot>,
    hot: Option<Arc<Hot>>,
    table_check: Option<JoinHandle<Result<(), StoreError>>>,
    plan: LazyPlan,
    pid: i32,
    info: &BlobInfo,
    opts: &RestoreOptions,
) -> Result<Starting> {
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
            prefetch: opts.prefetch.clone(),
            record_working_set: opts.learn,
            record_for: opts.learn.then_some(LEARN_AT_MOST),
            hot,
            background: true,
        },
    )?;
    server.watch_exit(target);
    if let Some(job) = table_check {
        server.check_table(job);
    }
    let prefetch = server.prefetch()?;
    Ok(Starting {
        server,
        prefetch,
        keep,
    })
}

impl Starting {
    /// Once the app runs: serves on a thread; `tap` is the read end of the app's stdout
    /// when learning (copied to our stdout; the first byte ends the recording).
    pub fn run(self, init: BorrowedFd<'_>, tap: Option<OwnedFd>) -> Result<Running> {
        let killer = init
            .try_clone_to_owned()
            .context("duplicating the sandbox's pidfd")?;
        let record = self.server.record_handle();
        let mut keeper = Keeper::spawn(self.keep.as_fd(), init)?;
        drop(self.keep);
        let mut server = self.server;
        server.on_fork(keeper.holder()?);
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
        let tap = tap.map(|t| copy_stdout(t, record)).transpose()?;
        Ok(Running {
            server,
            tap,
            prefetch: self.prefetch,
        })
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
            .map_err(|_| anyhow!("the page server thread panicked"))??;
        Ok(Outcome {
            prefetch: self.prefetch,
            serve,
        })
    }
}
