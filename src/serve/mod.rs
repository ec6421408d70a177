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
mod prefault;
pub mod protocol;

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use warmstart_launcher::{LaunchError, SignalForwarder};
use warmstart_snapshots::store::{Snapshot, SnapshotId, Store};

use crate::restore::{Parked, RestoreOptions, Restored};
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
    /// The most parked instances per snapshot when demand grows the pool.
    pub pool_max: usize,
    /// Snapshots to park instances of right away (else on their first request).
    pub warm: Vec<String>,
    /// Instances come from templates, each dropped after this long unused (`None`:
    /// every instance is restored on its own).
    pub template_idle: Option<std::time::Duration>,
}

/// What the connection threads share.
struct Daemon {
    store: Store,
    snaps: Mutex<HashMap<SnapshotId, Arc<Snapshot>>>,
    pools: pool::Pools,
    index: Mutex<StoreIndex>,
}

/// The store's names and ids as of the last change to its directories: a request lists
/// the store (and reads every name) only after something changed there, not each time.
struct StoreIndex {
    /// `None`: inotify is not available; the store is listed for every request.
    watch: Option<crate::sys::dirwatch::DirWatch>,
    listed: Option<Arc<Listing>>,
}

/// The store's names and ids at one moment.
struct Listing {
    names: Vec<(String, SnapshotId)>,
    ids: Vec<SnapshotId>,
}

impl StoreIndex {
    fn new() -> StoreIndex {
        let watch = match crate::sys::dirwatch::DirWatch::new() {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!("no inotify ({e}): the store is listed for every request");
                None
            }
        };
        StoreIndex {
            watch,
            listed: None,
        }
    }

    /// The store's names and ids now.
    fn current(&mut self, store: &Store) -> Result<Arc<Listing>> {
        if let (Some(w), Some(listed)) = (&self.watch, &self.listed) {
            if !w.changed() {
                return Ok(listed.clone());
            }
        }
        self.listed = None;
        // Watched before listing: a change made meanwhile is seen at the next request.
        let watched = match &self.watch {
            Some(w) => {
                let ok = store.index_dirs().iter().all(|d| w.watch(d).is_ok());
                // What is queued so far, the listing below covers.
                w.changed();
                ok
            }
            None => false,
        };
        let now = Arc::new(Listing {
            names: store.names()?,
            ids: store.ids()?,
        });
        if watched {
            self.listed = Some(now.clone());
        }
        Ok(now)
    }
}

/// Runs the daemon until SIGINT, SIGTERM or SIGHUP; instances it runs end with it.
pub fn serve(store: Store, opts: &ServeOptions) -> Result<i32> {
    // A log line to a closed pipe must not take the daemon and its instances down
    // (restored apps get their own dispositions back).
    // SAFETY: SIG_IGN installs no handler, so no code runs in signal context; this is done
    // before the daemon starts any thread, and restored apps reset their dispositions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    // Before any thread exists, so that every thread inherits the mask.
    let stop = SignalForwarder::new(&[libc::SIGINT, libc::SIGTERM, libc::SIGHUP])
        .map_err(|e| anyhow!("{e}"))?;
    let listener = listen(&opts.socket)?;
    let daemon = Arc::new(Daemon {
        store,
        snaps: Mutex::new(HashMap::new()),
        pools: pool::Pools::new(opts.pool, opts.pool_max, opts.template_idle),
        index: Mutex::new(StoreIndex::new()),
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
        // SAFETY: null address pointers are allowed (the peer's address is not wanted);
        // `listener` is ours.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!("accept: {e}");
            if matches!(
                e.raw_os_error(),
                Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM)
            ) {
                // Out of fds or memory: let running instances end before trying again.
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            continue;
        }
        // SAFETY: `accept4` succeeded: a new descriptor owned by nothing else.
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
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    // SAFETY: `addr` is a live `sockaddr_un` and the length given is its size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as u32,
        )
    };
    nix::sys::stat::umask(old);
    if r < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("binding {}", path.display()));
    }
    // SAFETY: integer arguments only, on the socket `fd` we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
        return Err(std::io::Error::last_os_error()).context("listen");
    }
    Ok(fd)
}

/// How long a client has to send its request once connected.
const FIRST_MESSAGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn set_recv_timeout(conn: &OwnedFd, t: Option<std::time::Duration>) -> Result<()> {
    let t = t.unwrap_or_default();
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: the option value points at `tv`, a live `timeval`, and the length given is
    // its size.
    let r = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("SO_RCVTIMEO");
    }
    Ok(())
}

/// Only root and the daemon's own user may start instances (which run as the snapshot's
/// user, possibly root).
fn check_peer(conn: &OwnedFd) -> Result<libc::ucred> {
    let cred = peer_cred(conn)?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid != 0 && cred.uid != me {
        let (only, run_as) = if me == 0 {
            ("root".to_string(), "root".to_string())
        } else {
            (
                format!("root and uid {me} (its own user)"),
                format!("root or uid {me}"),
            )
        };
        bail!(
            "uid {} (pid {}) is not allowed to start instances here: the daemon serves only \
             {only}; run `warmstart run` as {run_as}",
            cred.uid,
            cred.pid
        );
    }
    Ok(cred)
}

/// The credentials of the other end of a unix socket.
pub(crate) fn peer_cred(conn: &OwnedFd) -> Result<libc::ucred> {
    // SAFETY: `ucred` is plain integers; all-zero bytes are valid.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are live locals and `len` is `cred`'s size, so the kernel
    // writes at most one `ucred`.
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
    Ok(cred)
}

fn handle(daemon: &Arc<Daemon>, conn: OwnedFd) -> Result<()> {
    let peer = match check_peer(&conn) {
        Ok(c) => c,
        Err(e) => {
            // Read its request first: a socket closed with a message unread resets the
            // connection, and the client would see that instead of the reason.
            if set_recv_timeout(&conn, Some(FIRST_MESSAGE_TIMEOUT)).is_ok() {
                let _ = protocol::recv::<Request>(conn.as_fd());
            }
            let _ = protocol::send(
                conn.as_fd(),
                &Reply::Error(crate::report::error_line(&e)),
                &[],
            );
            return Err(e);
        }
    };
    // A client that connects and says nothing does not hold a thread for long.
    set_recv_timeout(&conn, Some(FIRST_MESSAGE_TIMEOUT))?;
    let next = || match protocol::recv::<Request>(conn.as_fd()) {
        Ok(m) => Ok(m),
        Err(e) => {
            let _ = protocol::send(
                conn.as_fd(),
                &Reply::Error(crate::report::error_line(&e)),
                &[],
            );
            Err(e)
        }
    };
    let Some((mut req, mut fds)) = next()? else {
        return Ok(());
    };
    // A `run --listen` asks for the snapshot's listeners first, then binds their
    // replacements and sends its run request.
    if let Request::Listeners { snapshot } = &req {
        let reply = match daemon.snapshot(snapshot) {
            Ok((snap, _)) => match refusal(&snap, false) {
                Some(why) => Err(Reply::Refused(why)),
                None => Ok(Reply::Listeners {
                    id: snap.id.to_string(),
                    listeners: crate::fds::inet::recorded_listeners(&snap.manifest),
                }),
            },
            Err(e) => Err(Reply::Error(crate::report::error_line(&e))),
        };
        match reply {
            Ok(r) => protocol::send(conn.as_fd(), &r, &[])?,
            Err(r) => return protocol::send(conn.as_fd(), &r, &[]),
        }
        let Some(m) = next()? else {
            return Ok(());
        };
        (req, fds) = m;
    }
    set_recv_timeout(&conn, None)?;
    // `unchecked`: a tool's run whose caller has not looked at the snapshot (a run
    // request's tool was checked by its caller before it was sent).
    let (snapshot, display_stats, tool, unchecked) = match req {
        Request::Run {
            snapshot,
            display_stats,
            tool,
        } => (snapshot, display_stats, tool, false),
        Request::Tool {
            snapshot,
            display_stats,
            request,
        } => (snapshot, display_stats, Some(request), true),
        _ => bail!("expected a run request, got {req:?}"),
    };
    // The stdio, then the instance's listening sockets if the caller gave them.
    let mut fds = fds;
    let given = fds.split_off(fds.len().min(3));
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
        // The caller's own lookup says why (or runs the tool cold, for a shim).
        Err(e) if unchecked => {
            return protocol::send(
                conn.as_fd(),
                &Reply::Refused(crate::report::error_line(&e)),
                &[],
            )
        }
        Err(e) => {
            protocol::send(
                conn.as_fd(),
                &Reply::Error(crate::report::error_line(&e)),
                &[],
            )?;
            return Ok(());
        }
    };
    if let Some(why) = refusal(&snap, tool.is_some()) {
        return protocol::send(conn.as_fd(), &Reply::Refused(why), &[]);
    }
    // A stale tool snapshot, or a run whose start-up environment differs from the
    // record's, is the caller's to handle (it runs the tool cold and says why).
    if let (Some(info), Some(req), true) = (&snap.manifest.tool, &tool, unchecked) {
        if let Some(why) = crate::tool::not_warm(info, req) {
            return protocol::send(conn.as_fd(), &Reply::Refused(why), &[]);
        }
    }
    let recorded = crate::fds::inet::recorded_listeners(&snap.manifest);
    if !given.is_empty() && given.len() != recorded.len() {
        let msg = format!(
            "a run request gives {} listening sockets, snapshot {} has {} TCP listeners",
            given.len(),
            snap.id.short(),
            recorded.len()
        );
        return protocol::send(conn.as_fd(), &Reply::Error(msg), &[]);
    }
    let req = Handoff {
        conn,
        stdio,
        listeners: recorded
            .iter()
            .zip(given)
            .map(|(l, fd)| (l.ofd, Arc::new(fd)))
            .collect(),
        names,
        display_stats,
        client: peer.pid,
        tool,
    };
    let req = match daemon.pools.take(&snap, req) {
        None => return Ok(()),
        Some(req) => req,
    };
    // Nothing parked (yet): restore it here, then park more for the next requests (not
    // before, nor while other requests are restored on the spot: parking would slow
    // them down).
    serve_instance(&snap, None, req, |app| daemon.pools.spot_done(&snap, app))
}

/// Why this daemon leaves a run of `snap` (a tool's run when `tool`) to its caller, if it
/// does.
fn refusal(snap: &Snapshot, tool: bool) -> Option<String> {
    if snap.manifest.tool.is_some() != tool {
        return Some(match tool {
            false => format!(
                "snapshot {} holds a tool: its run sends the tool's arguments",
                snap.id.short()
            ),
            true => format!("snapshot {} holds no tool (record --tool)", snap.id.short()),
        });
    }
    if snap.working_set().is_none() {
        // The first lazy run learns it by watching the caller's stdout: the caller's job.
        return Some(format!(
            "snapshot {} has no working set yet: its first run learns one",
            snap.id.short()
        ));
    }
    None
}

/// A request on its way to the thread that runs its instance.
pub(crate) struct Handoff {
    conn: OwnedFd,
    stdio: [OwnedFd; 3],
    /// The caller's listening sockets for the instance (`run --listen`), by `Fd::ofd`,
    /// one per TCP listener of the snapshot; empty: bound at the recorded addresses.
    listeners: Vec<(u32, Arc<OwnedFd>)>,
    names: Vec<String>,
    display_stats: bool,
    /// The caller's pid.
    client: i32,
    /// A tool snapshot's request ([`Request::Run`]).
    tool: Option<Vec<u8>>,
}

/// How the daemon restores `snap`: lazily, with the working set, stdio given.
fn restore_options(snap: &Snapshot, stdio: Option<[RawFd; 3]>) -> RestoreOptions {
    RestoreOptions {
        lazy: true,
        prefetch: snap.working_sets(),
        learn: false,
        verify_table: true,
        stdio,
        interrupt: None,
        listeners: Vec::new(),
        tool_request: None,
        template: None,
        cgroups: None,
        tcp_established: false,
        veths: Vec::new(),
    }
}

impl Daemon {
    /// The snapshot `which` names now (names can move), loaded once per id.
    fn snapshot(&self, which: &str) -> Result<(Arc<Snapshot>, Vec<String>)> {
        let id = self.store.resolve(which)?;
        let listing = self
            .index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .current(&self.store)?;
        let names = listing
            .names
            .iter()
            .filter(|(_, i)| *i == id)
            .map(|(n, _)| n.clone())
            .collect();
        let mut snaps = self.snaps.lock().unwrap_or_else(|e| e.into_inner());
        // Snapshots removed since (`warmstart rm`) go, with their parked instances.
        snaps.retain(|k, _| listing.ids.contains(k));
        self.pools.retain(|k| listing.ids.contains(k));
        if let Some(s) = snaps.get(&id) {
            return Ok((s.clone(), names));
        }
        let s = Arc::new(self.store.load_deferred(&id)?);
        snaps.insert(id, s.clone());
        Ok((s, names))
    }
}

/// Starts the instance for a request: hands out `parked` (checking the snapshot's files
/// again, as a restore would) or, without one or when it cannot be handed out, restores
/// one. Listed for `ps` before it runs. Also says whether it was parked.
fn start_instance(
    snap: &Arc<Snapshot>,
    parked: Option<Parked>,
    req: &Handoff,
) -> Result<(Restored, Option<crate::instances::Registration>, bool)> {
    let stdio = req.stdio.each_ref().map(|f| f.as_fd());
    // A server's listeners, the caller's (`run --listen`) or bound at their recorded
    // addresses now: a parked instance holds placeholders (its port stayed free), a
    // restored one gets them instead of binding its own.
    let listeners = if req.listeners.is_empty() {
        crate::fds::inet::at_recorded_addresses(&snap.manifest)?
    } else {
        req.listeners.clone()
    };
    let given: Vec<BorrowedFd> = listeners.iter().map(|(_, fd)| fd.as_fd()).collect();
    let go = |p: Parked, stdio: Option<[BorrowedFd; 3]>| {
        let listed = crate::instances::register(&crate::instances::Instance {
            monitor: std::process::id() as i32,
            pid: p.pid(),
            snapshot: snap.id.to_string(),
            names: req.names.clone(),
            command: crate::run::command_of(&snap.manifest),
            started_unix: crate::instances::unix_now(),
            client: Some(req.client),
            template: false,
            cgroups: Vec::new(),
        })
        .map_err(|e| tracing::warn!("instance not listed by `warmstart ps`: {e:#}"))
        .ok();
        let given: &[BorrowedFd] = if stdio.is_some() { &given } else { &[] };
        let tool = if stdio.is_some() {
            req.tool.as_deref()
        } else {
            None
        };
        p.resume(stdio, given, tool).map(|r| (r, listed))
    };
    if let Some(p) = parked {
        crate::restore::checks::unchanged_files(&snap.manifest)?;
        match go(p, Some(stdio)) {
            Ok((r, listed)) => return Ok((r, listed, true)),
            Err(e) => tracing::warn!(
                "a parked instance of {} could not be handed out ({e:#}); restoring one",
                snap.id.short()
            ),
        }
    }
    let mut opts = restore_options(snap, Some(stdio.map(|f| f.as_raw_fd())));
    opts.listeners = listeners.clone();
    opts.tool_request = req.tool.clone();
    let (r, listed) = go(crate::restore::prepare(snap, &opts, false)?, None)?;
    Ok((r, listed, false))
}

/// Starts the instance for `req` ([`start_instance`]), tells the caller it runs, relays
/// its signals, and tells it how the instance ended.
/// `started` is called once the instance runs, with its app's pid (or could not be
/// started: `None`).
fn serve_instance(
    snap: &Arc<Snapshot>,
    parked: Option<Parked>,
    req: Handoff,
    started: impl FnOnce(Option<i32>),
) -> Result<()> {
    let started_instance = start_instance(snap, parked, &req);
    started(started_instance.as_ref().ok().map(|(r, ..)| r.pid));
    let (r, _listed, parked) = match started_instance {
        Ok(x) => x,
        Err(e) => {
            protocol::send(
                req.conn.as_fd(),
                &Reply::Error(crate::report::error_line(&e)),
                &[],
            )?;
            return Ok(());
        }
    };
    let conn = req.conn;
    // The caller's stdio and listeners are the instance's now; the daemon keeps no copy.
    drop(req.stdio);
    drop(req.listeners);
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
            Ok(Some((Request::Signal(sig), _))) => {
                if let Err(e) = sb.signal(sig) {
                    tracing::warn!("signal {sig} from a client: {e}");
                }
                Ok(())
            }
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
        Err(e) => Reply::Error(crate::report::error_line(&e)),
    };
    // The caller may have gone; nothing to tell then.
    let _ = protocol::send(conn.as_fd(), &reply, &[]);
    Ok(())
}
