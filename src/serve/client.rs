//! `warmstart run` through a running `warmstart serve`: the daemon restores the instance
//! with our stdio; we relay the signals we get to it (every one `docker run` relays:
//! `warmstart_launcher::relayed_signals`) and exit with its code.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use warmstart_launcher::SignalForwarder;

use super::protocol::{self, Reply, Request};

/// Runs `snapshot` through the daemon listening on `socket`. `Ok(None)`: not served (no
/// daemon there, or it declined, e.g. no working set learned yet): restore it yourself.
pub fn run(
    socket: &Path,
    snapshot: &str,
    display_stats: bool,
    tool: Option<Vec<u8>>,
) -> Result<Option<i32>> {
    run_with_listeners(socket, snapshot, display_stats, tool, &[])
}

/// [`run`], the instance given `listeners` (`run --listen`): one listening socket per TCP
/// listener of the snapshot, in [`crate::fds::inet::recorded_listeners`] order (empty:
/// the daemon binds the recorded addresses).
pub fn run_with_listeners(
    socket: &Path,
    snapshot: &str,
    display_stats: bool,
    tool: Option<Vec<u8>>,
    listeners: &[std::os::fd::BorrowedFd],
) -> Result<Option<i32>> {
    let Some(conn) = open(socket)? else {
        return Ok(None);
    };
    let req = Request::Run {
        snapshot: snapshot.to_owned(),
        display_stats,
        tool,
    };
    run_on(conn, socket, req, listeners)
}

/// A `run --listen` through the daemon at `socket`, asked before anything is bound: the
/// snapshot's TCP listeners as the daemon has them, and the connection to send the run
/// on ([`Listening::run`]) once their replacements are bound. `Ok(None)`: not served (no
/// daemon, or it declined): restore it yourself.
pub fn listeners(socket: &Path, snapshot: &str) -> Result<Option<Listening>> {
    let Some(conn) = open(socket)? else {
        return Ok(None);
    };
    let req = Request::Listeners {
        snapshot: snapshot.to_owned(),
    };
    protocol::send(conn.as_fd(), &req, &[])?;
    let lost = || anyhow!("the serve daemon at {} went away", socket.display());
    match protocol::recv::<Reply>(conn.as_fd())?.ok_or_else(lost)?.0 {
        Reply::Listeners { id, listeners } => Ok(Some(Listening {
            conn,
            socket: socket.to_owned(),
            id,
            listeners,
        })),
        Reply::Refused(why) => {
            tracing::info!("not served by {}: {why}", socket.display());
            Ok(None)
        }
        Reply::Error(e) => bail!("serve daemon at {}: {e}", socket.display()),
        other => bail!("unexpected answer from the serve daemon: {other:?}"),
    }
}

/// A daemon's answer to [`listeners`], waiting for the run request.
pub struct Listening {
    conn: OwnedFd,
    socket: std::path::PathBuf,
    /// The snapshot's id (the run names it, not the name asked for).
    id: String,
    pub listeners: Vec<crate::fds::inet::RecordedListener>,
}

impl Listening {
    /// [`run_with_listeners`] on this connection, `fds` bound for [`Self::listeners`].
    pub fn run(self, display_stats: bool, fds: &[std::os::fd::BorrowedFd]) -> Result<Option<i32>> {
        let req = Request::Run {
            snapshot: self.id,
            display_stats,
            tool: None,
        };
        run_on(self.conn, &self.socket, req, fds)
    }
}

/// A connection to the daemon at `socket` if one of root or of our own user listens
/// there (our stdio goes only to such a daemon).
fn open(socket: &Path) -> Result<Option<OwnedFd>> {
    let Some(conn) = connect(socket)? else {
        return Ok(None);
    };
    let me = nix::unistd::geteuid().as_raw();
    match super::peer_cred(&conn) {
        Ok(c) if c.uid == 0 || c.uid == me => Ok(Some(conn)),
        Ok(c) => {
            tracing::warn!(
                "ignoring {}: its daemon runs as uid {}, not root or uid {me}",
                socket.display(),
                c.uid
            );
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// A tool's run (`run SNAP -- ARGS`) through the daemon at `socket`, `request` from
/// [`crate::tool::request`], before anything of the snapshot was looked at here: the
/// daemon checks the tool's files and start-up environment. `Ok(None)`: not served (no
/// daemon, or it declined: the snapshot is unknown to it, stale, or cannot run warm with
/// this environment): run it yourself, with your own checks.
pub fn run_tool(
    socket: &Path,
    snapshot: &str,
    display_stats: bool,
    request: Vec<u8>,
) -> Result<Option<i32>> {
    let Some(conn) = open(socket)? else {
        return Ok(None);
    };
    let req = Request::Tool {
        snapshot: snapshot.to_owned(),
        display_stats,
        request,
    };
    run_on(conn, socket, req, &[])
}

fn run_on(
    conn: OwnedFd,
    socket: &Path,
    req: Request,
    listeners: &[std::os::fd::BorrowedFd],
) -> Result<Option<i32>> {
    // Signals that arrive while the daemon starts the instance are forwarded once it runs.
    let fwd = SignalForwarder::relayed().map_err(|e| anyhow!("{e}"))?;
    let fds: Vec<i32> = [0, 1, 2]
        .into_iter()
        .chain(listeners.iter().map(|l| l.as_raw_fd()))
        .collect();
    protocol::send(conn.as_fd(), &req, &fds)?;
    let lost = || anyhow!("the serve daemon at {} went away", socket.display());
    match protocol::recv::<Reply>(conn.as_fd())?.ok_or_else(lost)?.0 {
        Reply::Started {
            id,
            pid,
            parked,
            stats,
        } => {
            tracing::debug!(id, pid, parked, "served by {}", socket.display());
            if let Some(s) = stats {
                let how = if parked {
                    "parked instance"
                } else {
                    "restored"
                };
                eprintln!("restore of {id} by serve ({how}):\n{s}");
            }
        }
        Reply::Refused(why) => {
            tracing::info!("not served by {}: {why}", socket.display());
            // A signal that came meanwhile (Ctrl-C) is not lost: it gets its usual effect
            // once the forwarder is gone, before the caller restores anything itself.
            let pending: Vec<i32> = std::iter::from_fn(|| fwd.next().ok().flatten()).collect();
            drop(fwd);
            for sig in pending {
                // SAFETY: `raise` takes an integer; the forwarder is dropped, so the signal
                // gets the disposition it had before, as if it had arrived now.
                unsafe { libc::raise(sig) };
            }
            return Ok(None);
        }
        Reply::Error(e) => bail!("serve daemon at {}: {e}", socket.display()),
        Reply::Exited(_) | Reply::Listeners { .. } => {
            bail!("the serve daemon answered out of turn")
        }
    }
    loop {
        let ready =
            crate::sys::wait_readable([conn.as_raw_fd(), fwd.fd().as_raw_fd()]).context("poll")?;
        if ready[1] {
            while let Some(sig) = fwd.next().map_err(|e| anyhow!("{e}"))? {
                protocol::send(conn.as_fd(), &Request::Signal(sig), &[])?;
            }
        }
        if ready[0] {
            match protocol::recv::<Reply>(conn.as_fd())?.ok_or_else(lost)?.0 {
                Reply::Exited(code) => return Ok(Some(code)),
                Reply::Error(e) => bail!("{e}"),
                other => bail!("unexpected answer from the serve daemon: {other:?}"),
            }
        }
    }
}

/// A connection to the daemon at `socket`, or `None` when none listens there.
pub(crate) fn connect(socket: &Path) -> Result<Option<OwnedFd>> {
    let (fd, addr) = unix_socket(socket)?;
    // SAFETY: `addr` is a live `sockaddr_un` and the length given is its size.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as u32,
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOENT | libc::ECONNREFUSED) => Ok(None),
            // A socket we may not use is no daemon of ours.
            Some(libc::EACCES | libc::EPERM) => {
                tracing::info!("not using {}: {e}", socket.display());
                Ok(None)
            }
            _ => Err(e).with_context(|| format!("connecting to {}", socket.display())),
        };
    }
    Ok(Some(fd))
}

/// A fresh `SOCK_SEQPACKET` unix socket and the address of `path`.
pub(crate) fn unix_socket(path: &Path) -> Result<(OwnedFd, libc::sockaddr_un)> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: `sockaddr_un` is a plain C struct; all-zero bytes are valid (and leave
    // `sun_path` NUL-terminated).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if bytes.len() >= addr.sun_path.len() {
        bail!("serve socket path too long: {}", path.display());
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: integer arguments only; the fd returned is owned right below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket");
    }
    // SAFETY: `socket` succeeded: a new descriptor owned by nothing else.
    Ok((unsafe { OwnedFd::from_raw_fd(fd) }, addr))
}
