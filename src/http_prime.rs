//! `record --ready listen --prime PATH`: warming a server up with HTTP requests before
//! its snapshot. At its first wait for a connection, each `GET PATH` is sent in turn to
//! the port it listens on (the sandbox shares the host's network); once every response
//! has been read to its end and the app has closed those connections, the monitor is
//! told (a socket) and interrupts the app: that stop is the warm point. What the requests
//! loaded, compiled and cached (a JVM's request path, say) is then in the snapshot.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::fds::sock_diag::TcpPortWatch;
use crate::sys::pidfd;

/// Checks a priming path: it goes into a request line as it is.
pub fn check_path(path: &str) -> Result<()> {
    if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        bail!(
            "--prime {path:?}: with --ready listen each --prime is the path of an HTTP GET \
             (starting with /, no spaces or control characters)"
        );
    }
    Ok(())
}

/// The priming requests under way.
pub struct Priming {
    done: Arc<AtomicBool>,
    job: Option<JoinHandle<Result<()>>>,
}

impl Priming {
    /// Starts sending `paths` to the socket listening at fd `listen_fd` of process `pid`.
    /// Returns the pipe end that becomes readable when it is over (done or failed).
    pub fn start(
        pid: i32,
        listen_fd: i32,
        paths: Vec<String>,
        timeout: Duration,
    ) -> Result<(Priming, OwnedFd)> {
        let addr = listening_addr(pid, listen_fd)?;
        // A socket, not a pipe: a monitor gone already must not SIGPIPE the process.
        let (wake_r, wake_w) = crate::sys::scm::unix_pair(libc::SOCK_STREAM)
            .context("socketpair for the priming requests")?;
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let job = std::thread::Builder::new()
            .name("prime-http".into())
            .spawn(move || {
                let r = prime(addr, &paths, Instant::now() + timeout);
                flag.store(true, Ordering::Release);
                // The monitor interrupts the app when this arrives.
                let _ = crate::sys::scm::send(wake_w.as_fd(), b"x", &[]);
                r
            })
            .context("starting the priming thread")?;
        Ok((
            Priming {
                done,
                job: Some(job),
            },
            wake_r,
        ))
    }

    /// Is it over (the next stop of the app is its warm point)?
    pub fn done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Its outcome, once [`done`](Self::done).
    pub fn finish(mut self) -> Result<()> {
        match self.job.take().map(|j| j.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => bail!("the priming thread panicked"),
            None => Ok(()),
        }
    }
}

/// Where to connect to reach the socket at fd `fd` of `pid`: its address, loopback for
/// a wildcard one.
fn listening_addr(pid: i32, fd: i32) -> Result<SocketAddr> {
    let target = pidfd::pidfd_open(pid, 0).context("pidfd_open of the app")?;
    let copy = pidfd::pidfd_getfd(&target, fd)
        .with_context(|| format!("taking a copy of the app's listening socket (fd {fd})"))?;
    let mut addr = TcpListener::from(copy)
        .local_addr()
        .with_context(|| format!("the address of the app's listening socket (fd {fd})"))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Ok(addr)
}

fn prime(addr: SocketAddr, paths: &[String], until: Instant) -> Result<()> {
    let left = || {
        until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .context("--timeout passed while priming")
    };
    // Our ends stay open until the app has closed its own: an end of the app's that we
    // closed could go to state CLOSE while the app still has it, where sock_diag no
    // longer lists it.
    let mut clients = Vec::new();
    for path in paths {
        let ctx = || format!("priming request GET {path} to {addr}");
        let s = TcpStream::connect_timeout(&addr, left()?).with_context(ctx)?;
        clients.push(s);
        let s = clients.last_mut().unwrap();
        s.set_read_timeout(Some(left()?)).with_context(ctx)?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: warmstart-prime\r\n\
             Connection: close\r\n\r\n"
        )
        .with_context(ctx)?;
        // To the end: the app closes the connection once it has answered.
        let mut answer = Vec::new();
        if let Err(e) = s.read_to_end(&mut answer) {
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                bail!(
                    "{}: no complete answer within --timeout ({} bytes so far; does the app \
                     keep the connection open despite `Connection: close`?)",
                    ctx(),
                    answer.len()
                );
            }
            return Err(e).with_context(ctx);
        }
        let status = answer
            .split(|&b| b == b'\r' || b == b'\n')
            .next()
            .unwrap_or(&[]);
        let status = String::from_utf8_lossy(status);
        if !status.starts_with("HTTP/") {
            bail!(
                "{}: no HTTP answer ({} bytes: {status:?})",
                ctx(),
                answer.len()
            );
        }
        eprintln!("warmstart: primed: GET {path}: {status}");
    }
    // The snapshot must not hold those connections: wait until the app has closed them.
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let mut w = TcpPortWatch::new().context("sock_diag, to see the app close its connections")?;
    let answered = Instant::now();
    let mut seen = std::collections::HashSet::new();
    loop {
        let open: Vec<u32> = w
            .conns(family, addr.port())?
            .into_iter()
            .map(|c| c.inode)
            .filter(|&i| i != 0)
            .collect();
        if !clients.is_empty() {
            // The app's ends it still has; once it has closed them all (or waits for our
            // FIN, as a server with a lingering close does), ours are closed.
            seen.extend(open.iter().copied());
            if open.is_empty() || answered.elapsed() > Duration::from_millis(100) {
                clients.clear();
            }
        } else {
            let inodes: Vec<u32> = seen.iter().copied().collect();
            if open.is_empty() && crate::fds::sock_diag::socket_holders(&inodes).is_empty() {
                return Ok(());
            }
        }
        if left().is_err() {
            bail!(
                "the app still has {} connection(s) on port {} open after its priming \
                 requests were answered (--timeout)",
                open.len().max(1),
                addr.port()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        check_path("/hit").unwrap();
        check_path("/a?b=c&d=%20").unwrap();
        for bad in ["hit", "/a b", "/a\r\nX: y", ""] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
    }
}
