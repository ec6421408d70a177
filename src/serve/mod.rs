//! `warmstart serve`: a daemon that restores instances on request over a unix socket
//! (DESIGN §9). It keeps snapshots loaded and, for each snapshot asked for, a pool of
//! *parked* instances: restored up to their last step (memory in place, threads created,
//! every thread stopped at its last trap), so that handing one out costs three fds and
//! a `PTRACE_DETACH` per thread. `warmstart run` uses the daemon when one listens on the
//! store's `serve.sock` ([`client`]).
//!
//! Each instance, parked or not, belongs to one daemon thread from its restore to its
//! exit: ptrace binds a tracee to one thread, and init's `PR_SET_PDEATHSIG` fires when
//! the thread that spawned it ends.

pub mod client;
mod pool;
mod protocol;

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use warmstart_launcher::{LaunchError, SignalForwarder};
use warmstart_snapshots::store::{Snapshot, SnapshotId, Store};

use crate::restore::{RestoreOptions, Restored};
use protocol::{Reply, Request};

/// Where the daemon of the store in `dir` listens.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join("serve.sock")
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub socket: PathBuf,
    /// Parked instances kept per snapshot (0: none, every request restores).
    pub pool: usize,
    /// Snapshots to park instances of right away (else on their first request).
    pub warm: Vec<String>,
}

/// What the connection threads share.
struct Daemon {
    store: Store,
    snaps: Mutex<HashMap<SnapshotId, Arc<Snapshot>>>,
    pools: pool::Pools,
}

/// Runs the daemon until SIGINT, SIGTERM or SIGHUP; instances it runs end with it.
pub fn serve(store: Store, opts: &ServeOptions) -> Result<i32> {
    // Before any thread exists, so that every thread inherits the mask.
    let stop = SignalForwarder::new(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP])
        .map_err(|e| anyhow!("{e}"))?;
    let listener = listen(&opts.socket)?;
    let daemon = Arc::new(Daemon {
        store,
        snaps: Mutex::new(HashMap::new()),
        pools: pool::Pools::new(opts.pool),
    });
    for name in &opts.warm {
        let (snap, _) = daemon
            .snapshot(name)
            .with_context(|| format!("--warm {name}"))?;
        if let Some(why) = daemon.pools.start(&snap) {
            eprintln!("warmstart serve: instances of {name} are not parked: {why}");
        }
    }
    println!(
        "serving {} on {}",
        daemon.store.dir().display(),
        opts.socket.display()
    );
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let result = accept_loop(&daemon, &listener, &stop);
    let _ = std::fs::remove_file(&opts.socket);
    result.map(|()| 0)
}

fn accept_loop(daemon: &Arc<Daemon>, listener: &OwnedFd, stop: &SignalForwarder) -> Result<()> {
    loop {
        let ready = crate::sys::wait_readable([listener.as_raw_fd(), stop.fd().as_raw_fd()])
            .context("poll")?;
        if ready[1] {
            if let Ok(Some(sig)) = stop.next() {
                tracing::info!("signal {sig}: stopping");
            }
            return Ok(());
        }
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            tracing::warn!("accept: {}", std::io::Error::last_os_error());
            continue;
        }
        let conn = unsafe { OwnedFd::from_raw_fd(fd) };
        let daemon = daemon.clone();
        let spawned = std::thread::Builder::new()
            .name("serve-conn".into())
            .spawn(move || {
                if let Err(e) = handle(&daemon, conn) {
                    tracing::warn!("serving a request: {e:#}");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("no thread for a request: {e}");
        }
    }
}

/// Binds the listening socket, owner-only; a stale socket file (nobody listening) is
/// replaced, a live one is an error.
fn listen(path: &Path) -> Result<OwnedFd> {
    if client::connect(path)?.is_some() {
        bail!(
            "a serve daemon already listens on {}: stop it first, or pass another --socket",
            path.display()
        );
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing the stale {}", path.display()))
        }
        _ => {}
    }
    let (fd, addr) = client::unix_socket(path)?;
    let old = unsafe { libc::umask(0o177) };
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as u32,
        )
    };
    unsafe { libc::umask(old) };
    if r < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("binding {}", path.display()));
    }
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
        return Err(std::io::Error::last_os_error()).context("listen");
    }
    Ok(fd)
}

/// Only root and the daemon's own user may start instances (which run as the snapshot's
/// user, possibly root).
fn check_peer(conn: &OwnedFd) -> Result<libc::ucred> {
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("SO_PEERCRED");
    }
    let me = unsafe { libc::geteuid() };
    if cred.uid != 0 && cred.uid != me {
        bail!(
            "uid {} (pid {}) may not start instances: only root and uid {me} may",
            cred.uid,
            cred.pid
        );
    }
    Ok(cred)
}

fn handle(daemon: &Arc<Daemon>, conn: OwnedFd) -> Result<()> {
    let peer = match check_peer(&conn) {
        Ok(c) => c,
        Err(e) => {
            let _ = protocol::send(conn.as_fd(), &Reply::Error(format!("{e:#}")), &[]);
            return Err(e);
        }
    };
    let Some((req, fds)) = protocol::recv::<Request>(conn.as_fd())? else {
        return Ok(());
    };
    let Request::Run {
        snapshot,
        display_stats,
    } = req
    else {
        bail!("expected a run request, got {req:?}");
    };
    let stdio: [OwnedFd; 3] = match fds.try_into() {
        Ok(s) => s,
        Err(fds) => {
            let msg = format!(
                "a run request carries 3 fds (stdio), this one {}",
                fds.len()
            );
            protocol::send(conn.as_fd(), &Reply::Error(msg.clone()), &[])?;
            bail!(msg)
        }
    };
    let (snap, names) = match daemon.snapshot(&snapshot) {
        Ok(s) => s,
        Err(e) => {
            protocol::send(conn.as_fd(), &Reply::Error(format!("{e:#}")), &[])?;
            return Ok(());
        }
    };
    if snap.working_set().is_none() {
        // The first lazy run learns it by watching the caller's stdout: the caller's job.
        let why = format!(
            "snapshot {} has no working set yet: its first run learns one",
            snap.id.short()
        );
        return protocol::send(conn.as_fd(), &Reply::Refused(why), &[]);
    }
    let req = Handoff {
        conn,
        stdio,
        names,
        display_stats,
        client: peer.pid,
    };
    let req = match daemon.pools.take(&snap, req) {
        None => return Ok(()),
        Some(req) => req,
    };
    // Nothing parked (yet): restore it here, and park some for the next requests.
    let _ = daemon.pools.start(&snap);
    let opts = restore_options(&snap, Some(req.stdio.each_ref().map(|f| f.as_raw_fd())));
    let restored = crate::restore::restore(&snap, &opts);
    serve_instance(&snap, restored, false, req)
}

/// A request on its way to the thread that runs its instance.
pub(crate) struct Handoff {
    conn: OwnedFd,
    stdio: [OwnedFd; 3],
    names: Vec<String>,
    display_stats: bool,
    /// The caller's pid.
    client: i32,
}

/// How the daemon restores `snap`: lazily, with the working set, stdio given.
fn restore_options(snap: &Snapshot, stdio: Option<[RawFd; 3]>) -> RestoreOptions {
    RestoreOptions {
        lazy: true,
        prefetch: snap.working_set(),
        learn: false,
        verify_table: true,
        stdio,
    }
}

impl Daemon {
    /// The snapshot `which` names now (names can move), loaded once per id.
    fn snapshot(&self, which: &str) -> Result<(Arc<Snapshot>, Vec<String>)> {
        let id = self.store.resolve(which)?;
        let names = self
            .store
            .names()?
            .into_iter()
            .filter(|(_, i)| *i == id)
            .map(|(n, _)| n)
            .collect();
        let mut snaps = self.snaps.lock().unwrap_or_else(|e| e.into_inner());
        // Snapshots removed since (`warmstart rm`) go, with their parked instances.
        if let Ok(ids) = self.store.ids() {
            snaps.retain(|k, _| ids.contains(k));
            self.pools.retain(|k| ids.contains(k));
        }
        if let Some(s) = snaps.get(&id) {
            return Ok((s.clone(), names));
        }
        let s = Arc::new(self.store.load_deferred(&id)?);
        snaps.insert(id, s.clone());
        Ok((s, names))
    }
}

/// Tells the caller its instance runs, relays its signals, and tells it how the
/// instance ended. `restored`: the instance, or why it could not be started.
fn serve_instance(
    snap: &Arc<Snapshot>,
    restored: Result<Restored>,
    parked: bool,
    req: Handoff,
) -> Result<()> {
    let conn = req.conn;
    let r = match restored {
        Ok(r) => r,
        Err(e) => {
            protocol::send(conn.as_fd(), &Reply::Error(format!("{e:#}")), &[])?;
            return Ok(());
        }
    };
    // The caller's stdio is the instance's now; the daemon keeps no copy.
    drop(req.stdio);
    let _listed = crate::instances::register(&crate::instances::Instance {
        monitor: std::process::id() as i32,
        pid: r.pid,
        snapshot: snap.id.to_string(),
        names: req.names,
        command: snap.manifest.command.clone(),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        client: Some(req.client),
    })
    .map_err(|e| tracing::warn!("instance not listed by `warmstart ps`: {e:#}"))
    .ok();
    protocol::send(
        conn.as_fd(),
        &Reply::Started {
            id: snap.id.short(),
            pid: r.pid,
            parked,
            stats: req.display_stats.then(|| r.phases.to_string()),
        },
        &[],
    )?;
    let code = r.sandbox.wait_polling(conn.as_fd(), |sb| {
        match protocol::recv::<Request>(conn.as_fd()) {
            Ok(Some((Request::Signal(sig), _))) => sb.signal(sig),
            Ok(Some((other, _))) => {
                tracing::warn!("ignoring {other:?} from a client whose instance runs");
                Ok(())
            }
            // The caller is gone: so is its instance (as when a `run` monitor dies).
            Ok(None) | Err(_) => {
                sb.kill()?;
                sb.wait().map(|_| ())
            }
        }
    });
    let reply = match code
        .map_err(|e: LaunchError| anyhow!("{e}"))
        .and_then(|code| r.finish(code))
    {
        Ok((code, _)) => Reply::Exited(code),
        Err(e) => Reply::Error(format!("{e:#}")),
    };
    // The caller may have gone; nothing to tell then.
    let _ = protocol::send(conn.as_fd(), &reply, &[]);
    Ok(())
}
