//! Parked instances, per snapshot. A *parker* thread restores one instance up to its
//! last step ([`crate::restore::park`]), offers it, and when a request takes it, hands
//! it the caller's stdio, lets it go and serves the caller until it exits. Each instance
//! taken starts a parker for its replacement.

use std::collections::{HashMap, VecDeque};
use std::os::fd::AsFd;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

use warmstart_snapshots::model::{FileDesc, Manifest, UnixAddr};
use warmstart_snapshots::store::{Snapshot, SnapshotId};

use super::Handoff;

#[derive(Default)]
struct Pool {
    /// Parked instances, oldest first: where to send a request.
    ready: VecDeque<Sender<Handoff>>,
    /// Why this snapshot's instances cannot be parked, once known.
    disabled: Option<String>,
    /// Parkers run (or parked instances wait) for this snapshot.
    started: bool,
}

pub(super) struct Pools {
    size: usize,
    by_snap: Arc<Mutex<HashMap<SnapshotId, Pool>>>,
}

impl Pools {
    pub fn new(size: usize) -> Self {
        Pools {
            size,
            by_snap: Arc::default(),
        }
    }

    /// Starts parking instances of `snap` unless that is under way already; why not,
    /// when its instances cannot be parked.
    pub fn start(&self, snap: &Arc<Snapshot>) -> Option<String> {
        if self.size == 0 {
            return Some("the pool size is 0".into());
        }
        let mut pools = self.by_snap.lock().unwrap_or_else(|e| e.into_inner());
        let pool = pools.entry(snap.id).or_default();
        if let Some(why) = &pool.disabled {
            return Some(why.clone());
        }
        if pool.started {
            return None;
        }
        if let Err(why) = parkable(&snap.manifest) {
            pool.disabled = Some(why.clone());
            return Some(why);
        }
        pool.started = true;
        drop(pools);
        for _ in 0..self.size {
            self.spawn_parker(snap.clone());
        }
        None
    }

    /// Drops the pools (and parked instances) of the snapshots `keep` says no to.
    pub fn retain(&self, keep: impl Fn(&SnapshotId) -> bool) {
        let mut pools = self.by_snap.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|id, _| keep(id));
    }

    /// Gives `req` to a parked instance of `snap` (`None`: taken) or returns it.
    pub fn take(&self, snap: &Arc<Snapshot>, mut req: Handoff) -> Option<Handoff> {
        loop {
            let tx = {
                let mut pools = self.by_snap.lock().unwrap_or_else(|e| e.into_inner());
                pools.get_mut(&snap.id).and_then(|p| p.ready.pop_front())
            };
            let Some(tx) = tx else {
                return Some(req);
            };
            match tx.send(req) {
                Ok(()) => {
                    self.spawn_parker(snap.clone());
                    return None;
                }
                // That parker is gone (its instance died while parked): try the next.
                Err(back) => req = back.0,
            }
        }
    }

    fn spawn_parker(&self, snap: Arc<Snapshot>) {
        let pools = self.by_snap.clone();
        let spawned = std::thread::Builder::new()
            .name("serve-parker".into())
            .spawn(move || parker(&pools, snap));
        if let Err(e) = spawned {
            tracing::warn!("no thread to park an instance: {e}");
        }
    }
}

fn parker(pools: &Mutex<HashMap<SnapshotId, Pool>>, snap: Arc<Snapshot>) {
    let opts = super::restore_options(&snap, None);
    let parked = match crate::restore::park(&snap, &opts) {
        Ok(p) => p,
        Err(e) => {
            // Requests are restored one by one meanwhile; the next one tries parking
            // again (the cause, e.g. a file being rewritten, may pass).
            tracing::warn!("parking an instance of {}: {e:#}", snap.id.short());
            let mut pools = pools.lock().unwrap_or_else(|e| e.into_inner());
            pools.entry(snap.id).or_default().started = false;
            return;
        }
    };
    let (tx, rx) = channel::<Handoff>();
    pools
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(snap.id)
        .or_default()
        .ready
        .push_back(tx);
    tracing::info!("parked an instance of {}", snap.id.short());
    let Ok(req) = rx.recv() else {
        return;
    };
    let stdio = req.stdio.each_ref().map(|f| f.as_fd());
    // Files may have changed since the instance was parked: checked again, as a restore
    // would.
    let restored = crate::restore::checks::unchanged_files(&snap.manifest)
        .and_then(|()| parked.resume(Some(stdio)));
    if let Err(e) = super::serve_instance(&snap, restored, true, req) {
        tracing::warn!("serving a parked instance of {}: {e:#}", snap.id.short());
    }
}

/// Whether instances of `m` may wait parked: nothing they hold may be something another
/// instance (or anyone else) needs meanwhile: no bound or listening sockets (their
/// addresses and ports), no file locks. An epoll watching the stdio gets it added when
/// the stdio arrives, which needs the epoll to be the process's own.
fn parkable(m: &Manifest) -> Result<(), String> {
    if !m.file_locks.is_empty() {
        return Err("it holds file locks".into());
    }
    for p in &m.processes {
        for (epfd, _) in crate::fds::late_epoll_targets(p) {
            let ofd = p.fds.iter().find(|f| f.fd == epfd).map(|f| f.ofd);
            let shared = m
                .processes
                .iter()
                .filter(|q| q.fds.iter().any(|f| Some(f.ofd) == ofd))
                .count()
                > 1;
            if shared {
                return Err(format!(
                    "process {} (fd {epfd}): an epoll shared by several processes watches the stdio",
                    p.pid
                ));
            }
        }
        for f in &p.fds {
            let why = match &f.file {
                FileDesc::Inet { .. } | FileDesc::Netlink { .. } => "it has network sockets",
                FileDesc::Unix { addr, .. } if *addr != UnixAddr::Unnamed => {
                    "it has bound unix sockets"
                }
                _ => continue,
            };
            return Err(format!("process {} (fd {}): {why}", p.pid, f.fd));
        }
    }
    Ok(())
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
        assert!(parkable(&manifest_with(bound)).is_err());
        let pipe = FileDesc::Pipe {
            pipe: 1,
            write: false,
            flags: 0,
        };
        assert!(parkable(&manifest_with(pipe)).is_ok());
    }
}
