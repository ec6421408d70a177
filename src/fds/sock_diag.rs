//! `NETLINK_SOCK_DIAG` queries: what `ss` knows about sockets and a process cannot ask its
//! own socket for — a unix socket's peer (by inode), a listener's backlog and the number of
//! connections waiting in its accept queue.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{bail, Result};

use super::errno_err;

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_HDR: usize = 16;

/// What the kernel reports about one unix socket.
#[derive(Debug, Clone, Default)]
pub struct UnixDiag {
    pub state: u8,
    /// Inode of the peer, 0 if none.
    pub peer: u32,
    /// Listening: connections waiting to be accepted; otherwise bytes queued to read.
    pub rqueue: u32,
    /// Listening: the backlog; otherwise bytes queued to send.
    pub wqueue: u32,
    /// `sk_shutdown`: 3 (both ways) once a connected stream socket's peer has closed.
    pub shutdown: u8,
    /// Listening: the inodes of the client ends of the connections waiting to be
    /// accepted, in accept order (`UNIX_DIAG_ICONS`); 0 for a client that has closed.
    pub icons: Vec<u32>,
}

/// What the kernel reports about one TCP listener.
#[derive(Debug, Clone, Copy, Default)]
pub struct InetDiag {
    /// Connections waiting to be accepted.
    pub rqueue: u32,
    /// The backlog given to `listen`.
    pub wqueue: u32,
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn diag_socket() -> Result<OwnedFd> {
    // SAFETY: integer arguments only; the fd returned is owned right below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(errno_err("socket(NETLINK_SOCK_DIAG)"));
    }
    // SAFETY: `socket` succeeded: a new descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends one dump request (`body` after the netlink header) and calls `each` with the
/// payload of every answer until `NLMSG_DONE`.
fn dump(body: &[u8], each: impl FnMut(&[u8])) -> Result<()> {
    dump_on(&diag_socket()?, &mut vec![0u8; 64 << 10], body, each)
}

/// [`dump`] on an open `NETLINK_SOCK_DIAG` socket, reading into `buf`.
fn dump_on(fd: &OwnedFd, buf: &mut [u8], body: &[u8], mut each: impl FnMut(&[u8])) -> Result<()> {
    let mut req = Vec::with_capacity(NLMSG_HDR + body.len());
    req.extend_from_slice(&((NLMSG_HDR + body.len()) as u32).to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // port
    req.extend_from_slice(body);
    // SAFETY: the pointer and length describe `req`, a live buffer that `send` only reads.
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(errno_err("sending a sock_diag request"));
    }
    loop {
        // SAFETY: the pointer and length describe `buf`, a live writable buffer; `recv`
        // writes at most `buf.len()` bytes.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(errno_err("reading sock_diag answers"));
        }
        let mut msgs = &buf[..n as usize];
        while msgs.len() >= NLMSG_HDR {
            let len = u32::from_ne_bytes(msgs[0..4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes(msgs[4..6].try_into().unwrap());
            if len < NLMSG_HDR || len > msgs.len() {
                bail!("malformed sock_diag answer");
            }
            match ty as i32 {
                libc::NLMSG_DONE => return Ok(()),
                libc::NLMSG_ERROR => {
                    let err = i32::from_ne_bytes(msgs[16..20].try_into().unwrap());
                    bail!("sock_diag: {}", std::io::Error::from_raw_os_error(-err));
                }
                _ => each(&msgs[NLMSG_HDR..len]),
            }
            msgs = &msgs[align4(len).min(msgs.len())..];
        }
    }
}

/// Walks the `rtattr`s after `fixed` bytes: (type, payload).
fn attrs(payload: &[u8], fixed: usize) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = payload.get(fixed..).unwrap_or(&[]);
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes(rest[0..2].try_into().unwrap()) as usize;
        let ty = u16::from_ne_bytes(rest[2..4].try_into().unwrap());
        if len < 4 || len > rest.len() {
            return None;
        }
        let data = &rest[4..len];
        rest = &rest[align4(len).min(rest.len())..];
        Some((ty, data))
    })
}

/// Every unix socket of this network namespace, by inode.
pub fn unix_sockets() -> Result<HashMap<u32, UnixDiag>> {
    const UDIAG_SHOW_PEER: u32 = 4;
    const UDIAG_SHOW_ICONS: u32 = 8;
    const UDIAG_SHOW_RQLEN: u32 = 0x10;
    const UNIX_DIAG_PEER: u16 = 2;
    const UNIX_DIAG_ICONS: u16 = 3;
    const UNIX_DIAG_RQLEN: u16 = 4;
    const UNIX_DIAG_SHUTDOWN: u16 = 6;
    // struct unix_diag_req
    let mut body = vec![libc::AF_UNIX as u8, 0, 0, 0];
    body.extend_from_slice(&u32::MAX.to_ne_bytes()); // all states
    body.extend_from_slice(&0u32.to_ne_bytes()); // ino
    body.extend_from_slice(&(UDIAG_SHOW_PEER | UDIAG_SHOW_ICONS | UDIAG_SHOW_RQLEN).to_ne_bytes());
    body.extend_from_slice(&[0xff; 8]); // cookie: none
    let mut out = HashMap::new();
    dump(&body, |p| {
        // struct unix_diag_msg: family, type, state, pad, ino, cookie[2]
        if p.len() < 16 {
            return;
        }
        let ino = u32::from_ne_bytes(p[4..8].try_into().unwrap());
        let mut d = UnixDiag {
            state: p[2],
            ..Default::default()
        };
        for (ty, data) in attrs(p, 16) {
            match ty {
                UNIX_DIAG_PEER if data.len() >= 4 => {
                    d.peer = u32::from_ne_bytes(data[0..4].try_into().unwrap())
                }
                UNIX_DIAG_RQLEN if data.len() >= 8 => {
                    d.rqueue = u32::from_ne_bytes(data[0..4].try_into().unwrap());
                    d.wqueue = u32::from_ne_bytes(data[4..8].try_into().unwrap());
                }
                UNIX_DIAG_SHUTDOWN if !data.is_empty() => d.shutdown = data[0],
                UNIX_DIAG_ICONS => {
                    d.icons = data
                        .chunks_exact(4)
                        .map(|w| u32::from_ne_bytes(w.try_into().unwrap()))
                        .collect()
                }
                _ => {}
            }
        }
        out.insert(ino, d);
    })?;
    Ok(out)
}

/// TCP listeners of `family` in this network namespace, by inode.
pub fn tcp_listeners(family: i32) -> Result<HashMap<u32, InetDiag>> {
    const TCP_LISTEN: u32 = 10;
    // struct inet_diag_req_v2: family, protocol, ext, pad, states, inet_diag_sockid (48)
    let mut body = vec![family as u8, libc::IPPROTO_TCP as u8, 0, 0];
    body.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    body.extend_from_slice(&[0u8; 48]);
    let mut out = HashMap::new();
    dump(&body, |p| {
        // struct inet_diag_msg: 4 bytes, sockid (48), expires, rqueue, wqueue, uid, inode
        if p.len() < 72 {
            return;
        }
        let word = |o: usize| u32::from_ne_bytes(p[o..o + 4].try_into().unwrap());
        out.insert(
            word(68),
            InetDiag {
                rqueue: word(56),
                wqueue: word(60),
            },
        );
    })?;
    Ok(out)
}

/// The processes (pid, comm) that have the sockets `inodes` open, from a scan of
/// `/proc/*/fd` (sockets no process holds are left out).
pub fn socket_holders(inodes: &[u32]) -> HashMap<u32, Vec<(u32, String)>> {
    let mut out: HashMap<u32, Vec<(u32, String)>> = HashMap::new();
    if inodes.is_empty() {
        return out;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(ino) = link
                .to_str()
                .and_then(|l| l.strip_prefix("socket:["))
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|i| inodes.contains(i))
            else {
                continue;
            };
            let list = out.entry(ino).or_default();
            if !list.iter().any(|(p, _)| *p == pid) {
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                list.push((pid, comm.trim().to_owned()));
            }
        }
    }
    out
}

/// One TCP connection as `sock_diag` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpConn {
    /// The kernel's socket cookie (kept when the socket turns into a timewait one).
    pub cookie: u64,
    pub state: u8,
    /// Inode of the socket's file: 0 once no process has it open (orphaned, closing).
    pub inode: u32,
    /// Data segments received and sent (`tcp_info`; `None` for a timewait socket).
    pub segs_in: Option<u32>,
    pub segs_out: Option<u32>,
}

impl TcpConn {
    /// Has this connection of a server answered: sent data, or been closed by the
    /// server first (a timewait socket)?
    pub fn answered(&self) -> bool {
        const FIN_WAIT2: u8 = 5;
        const TIME_WAIT: u8 = 6;
        match self.segs_out {
            Some(n) => n > 0,
            None => matches!(self.state, FIN_WAIT2 | TIME_WAIT),
        }
    }
}

/// Watches the TCP connections on local ports (the ones listeners on them accepted),
/// with one netlink socket and buffer for every query.
pub struct TcpPortWatch {
    sock: OwnedFd,
    buf: Vec<u8>,
}

impl TcpPortWatch {
    pub fn new() -> Result<TcpPortWatch> {
        Ok(TcpPortWatch {
            sock: diag_socket()?,
            buf: vec![0u8; 64 << 10],
        })
    }

    /// The connections of `family` whose local port is `port`, but half-open ones.
    pub fn conns(&mut self, family: i32, port: u16) -> Result<Vec<TcpConn>> {
        // Every state but SYN_SENT (2), SYN_RECV (3) and LISTEN (10).
        self.sockets(family, port, 0xfff & !(1 << 2 | 1 << 3 | 1 << 10))
    }

    /// Every TCP socket of `family` on local port `port`, listeners included.
    pub fn all_on_port(&mut self, family: i32, port: u16) -> Result<Vec<TcpConn>> {
        self.sockets(family, port, 0xfff)
    }

    fn sockets(&mut self, family: i32, port: u16, states: u32) -> Result<Vec<TcpConn>> {
        const INET_DIAG_INFO: u16 = 2;
        const INET_DIAG_REQ_BYTECODE: u16 = 1;
        const INET_DIAG_BC_S_EQ: u8 = 11;
        // struct inet_diag_req_v2 asking for tcp_info
        let mut body = vec![
            family as u8,
            libc::IPPROTO_TCP as u8,
            1 << (INET_DIAG_INFO - 1),
            0,
        ];
        body.extend_from_slice(&states.to_ne_bytes());
        body.extend_from_slice(&[0u8; 48]);
        // Bytecode, one op: sport == port → accept (run off the end), else reject (jump
        // past it); the port is the `no` field of the op's second half.
        body.extend_from_slice(&12u16.to_ne_bytes());
        body.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
        body.extend_from_slice(&[INET_DIAG_BC_S_EQ, 8]);
        body.extend_from_slice(&12u16.to_ne_bytes());
        body.extend_from_slice(&[0, 0]);
        body.extend_from_slice(&port.to_ne_bytes());
        let mut out = Vec::new();
        dump_on(&self.sock, &mut self.buf, &body, |p| {
            // struct inet_diag_msg: family, state, timer, retrans, sockid (cookie at 44)
            if p.len() < 72 {
                return;
            }
            let mut c = TcpConn {
                cookie: u64::from_ne_bytes(p[44..52].try_into().unwrap()),
                state: p[1],
                inode: u32::from_ne_bytes(p[68..72].try_into().unwrap()),
                segs_in: None,
                segs_out: None,
            };
            for (ty, info) in attrs(p, 72) {
                // struct tcp_info: tcpi_data_segs_in at 152, _out at 156 (Linux 4.6+)
                if ty == INET_DIAG_INFO && info.len() >= 160 {
                    let word = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().unwrap());
                    c.segs_in = Some(word(152));
                    c.segs_out = Some(word(156));
                }
            }
            out.push(c);
        })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn ino(fd: &impl AsRawFd) -> u32 {
        std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap()
            .ino() as u32
    }

    #[test]
    fn finds_a_socketpair_peer_and_a_listener_backlog() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let socks = unix_sockets().unwrap();
        assert_eq!(socks[&ino(&a)].peer, ino(&b));
        assert_eq!(socks[&ino(&b)].peer, ino(&a));
        assert_eq!(socks[&ino(&a)].shutdown, 0);
        let a_ino = ino(&a);
        drop(b);
        let socks = unix_sockets().unwrap();
        assert_eq!((socks[&a_ino].peer, socks[&a_ino].shutdown), (0, 3));

        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        // listen() again only changes the backlog
        // SAFETY: integer arguments only, on the listener `l` we own.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 77) }, 0);
        let found = tcp_listeners(libc::AF_INET).unwrap();
        assert_eq!(found[&ino(&l)].wqueue, 77);
    }

    #[test]
    fn sees_the_answers_from_a_listening_port() {
        use std::io::{Read, Write};
        let mut w = TcpPortWatch::new().unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (mut a, _) = l.accept().unwrap();
        // Connected, the client even sent something: no answer yet.
        c.write_all(b"GET").unwrap();
        let mut b = [0u8; 3];
        a.read_exact(&mut b).unwrap();
        let conns = w.conns(libc::AF_INET, port).unwrap();
        assert_eq!(conns.len(), 1, "{conns:?}");
        assert_eq!(conns[0].segs_in, Some(1));
        assert!(!conns[0].answered());
        a.write_all(b"200").unwrap();
        c.read_exact(&mut b).unwrap();
        let conns = w.conns(libc::AF_INET, port).unwrap();
        assert!(conns[0].answered(), "{conns:?}");
        // The server closes first: its side goes to TIME_WAIT (no tcp_info), same cookie,
        // still an answer.
        let cookie = conns[0].cookie;
        drop(a);
        assert_eq!(c.read(&mut b).unwrap(), 0);
        drop(c);
        let conns = w.conns(libc::AF_INET, port).unwrap();
        assert_eq!(conns.len(), 1, "{conns:?}");
        assert_eq!(conns[0].cookie, cookie, "{conns:?}");
        assert!(conns[0].answered(), "{conns:?}");
        let other = other.local_addr().unwrap().port();
        assert!(w.conns(libc::AF_INET, other).unwrap().is_empty());
    }

    #[test]
    fn lists_the_clients_waiting_in_a_unix_listener_s_queue_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let a = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let b = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let socks = unix_sockets().unwrap();
        let d = &socks[&ino(&l)];
        assert_eq!((d.state, d.rqueue), (10, 2));
        assert_eq!(d.icons, vec![ino(&a), ino(&b)]);
        // A client's peer is the server side not accepted yet: no inode.
        assert_eq!(socks[&ino(&a)].peer, 0);
        drop(a);
        assert_eq!(unix_sockets().unwrap()[&ino(&l)].icons, vec![0, ino(&b)]);
    }
}
