//! What `warmstart run` and `warmstart serve` say to each other: one postcard-encoded
//! message per `SOCK_SEQPACKET` packet; the request carries the caller's stdio fds.

use std::os::fd::{BorrowedFd, OwnedFd, RawFd};

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::sys::scm;

/// Largest message either side sends.
const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Start an instance of a snapshot (id, prefix or name) with the stdin, stdout and
    /// stderr attached to this message, then (`run --listen`) one listening socket per
    /// TCP listener of the snapshot, in `fds::inet::recorded_listeners` order.
    Run {
        snapshot: String,
        display_stats: bool,
        /// A tool snapshot's run: its request (`crate::tool::request`: arguments, cwd,
        /// environment, umask), handed to the instance on its notify channel.
        tool: Option<Vec<u8>>,
    },
    /// Deliver this signal to the instance (the caller got it).
    Signal(i32),
    /// Before a `run --listen`'s [`Request::Run`] on the same connection: the snapshot's
    /// TCP listeners, so that the caller binds their replacements without reading the
    /// snapshot itself. Answered with [`Reply::Listeners`] (or `Refused`, `Error`).
    Listeners { snapshot: String },
    /// A tool's run ([`Request::Run`] with its request) from a caller that has not
    /// checked the snapshot: the daemon checks the tool's files and start-up environment
    /// and answers `Refused` when it cannot run warm. (A variant of its own, so that a
    /// daemon too old to check refuses it as a message it does not know, never running
    /// a stale tool.)
    Tool {
        snapshot: String,
        display_stats: bool,
        request: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// The instance runs. `parked`: it came from the pool.
    Started {
        id: String,
        pid: i32,
        parked: bool,
        stats: Option<String>,
    },
    /// Not served here (the caller restores it itself), and why.
    Refused(String),
    /// The instance ended with this exit code.
    Exited(i32),
    /// Failed; nothing of the instance is left running.
    Error(String),
    /// The answer to [`Request::Listeners`]: the snapshot's id (the run request that
    /// follows names it, so both are about the same snapshot even if its name moves
    /// meanwhile) and its TCP listeners in `fds::inet::recorded_listeners` order.
    Listeners {
        id: String,
        listeners: Vec<crate::fds::inet::RecordedListener>,
    },
}

pub fn send<T: Serialize>(sock: BorrowedFd, msg: &T, fds: &[RawFd]) -> Result<()> {
    let bytes = postcard::to_allocvec(msg).context("encoding a serve message")?;
    scm::send(sock, &bytes, fds).context("sending to the serve socket")
}

/// The next message and its fds; `None` at end of stream.
pub fn recv<T: DeserializeOwned>(sock: BorrowedFd) -> Result<Option<(T, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let (n, fds) = scm::recv(sock, &mut buf).context("reading from the serve socket")?;
    if n == 0 {
        return Ok(None);
    }
    Ok(Some((decode(&buf[..n])?, fds)))
}

/// Decodes the bytes of one message (of at most [`MAX_MESSAGE`] bytes: `recv`'s buffer).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    match postcard::from_bytes(bytes) {
        Ok(m) => Ok(m),
        Err(e) => bail!("malformed message on the serve socket ({e}): client and daemon of different warmstart versions?"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn messages_round_trip_with_fds() {
        let (a, b) = scm::seqpacket_pair().unwrap();
        let req = Request::Run {
            snapshot: "echo".into(),
            display_stats: true,
            tool: Some(b"TOOL 2\n{}".to_vec()),
        };
        send(a.as_fd(), &req, &[0, 1, 2]).unwrap();
        let (got, fds) = recv::<Request>(b.as_fd()).unwrap().unwrap();
        assert_eq!(got, req);
        assert_eq!(fds.len(), 3);
        send(b.as_fd(), &Reply::Exited(3), &[]).unwrap();
        let (got, fds) = recv::<Reply>(a.as_fd()).unwrap().unwrap();
        assert_eq!(got, Reply::Exited(3));
        assert!(fds.is_empty());
        drop(b);
        assert!(recv::<Reply>(a.as_fd()).unwrap().is_none());
    }

    #[test]
    fn listeners_and_tool_runs_round_trip() {
        let (a, b) = scm::seqpacket_pair().unwrap();
        let ask = Request::Listeners {
            snapshot: "http".into(),
        };
        send(a.as_fd(), &ask, &[]).unwrap();
        assert_eq!(recv::<Request>(b.as_fd()).unwrap().unwrap().0, ask);
        let answer = Reply::Listeners {
            id: "ab".repeat(32),
            listeners: Vec::new(),
        };
        send(b.as_fd(), &answer, &[]).unwrap();
        assert_eq!(recv::<Reply>(a.as_fd()).unwrap().unwrap().0, answer);
        let tool = Request::Tool {
            snapshot: "black".into(),
            display_stats: false,
            request: b"TOOL 2\n{}".to_vec(),
        };
        send(a.as_fd(), &tool, &[0, 1, 2]).unwrap();
        let (got, fds) = recv::<Request>(b.as_fd()).unwrap().unwrap();
        assert_eq!((got, fds.len()), (tool, 3));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let (a, b) = scm::seqpacket_pair().unwrap();
        scm::send(a.as_fd(), &[0xff; 9], &[]).unwrap();
        assert!(recv::<Request>(b.as_fd()).is_err());
    }
}
