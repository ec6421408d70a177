//! Established TCP connections (`--tcp-established`), checkpointed with `TCP_REPAIR`
//! ([`crate::sys::tcp_repair`]) as CRIU does (`criu/sk-tcp.c`, `soccr/`).
//!
//! Dump, per connection ([`dump`]):
//! 1. lock it: the dump's nftables table ([`crate::sys::nft::NetLock`]) gets rules that
//!    drop its packets both ways, so nothing arrives after its queues are read;
//! 2. repair mode on (on the dump's copy of the fd: it is the app's socket);
//! 3. read `TCP_QUEUE_SEQ` of each queue, the queues themselves with `MSG_PEEK` (the
//!    send queue holds unacknowledged and unsent bytes, `SIOCOUTQNSD` says how many are
//!    unsent), `TCP_REPAIR_WINDOW`, the negotiated options (`TCP_INFO`, `TCP_MAXSEG`),
//!    the timestamp clock, and the socket options.
//!
//! The socket stays in repair mode ([`Held`]) until the dump is over. Then, with the tree
//! left running or stopped, repair mode goes off (the kernel sends a window probe, the
//! connection goes on) and the lock is released: the peer retransmits what was dropped.
//! With the tree killed, the sockets are closed while still in repair mode (a silent
//! disconnect: no FIN, no RST) and the lock is *kept* (its table named in the snapshot),
//! so whatever the peer sends before the restore is dropped rather than answered with a
//! RST. On any failure the sockets leave repair mode and the lock goes, before the tree
//! is released.
//!
//! Restore ([`restore`]): a socket in repair mode, the queues' start sequence numbers,
//! bound to the recorded local address (repair mode forces the reuse of a listener's
//! port), `connect` (established at once, no SYN), the options, the receive queue and the
//! sent part of the send queue filled in repair mode, the window, repair mode off, then
//! the unsent part written normally and the socket options set. The restore holds its own
//! lock on every connection of the snapshot from before the first process runs until the
//! tree has resumed, so two ends of one connection in the tree never see each other half
//! made; the dump's lock is removed at the same time.
//!
//! Only state ESTABLISHED is supported; half-closed connections (FIN_WAIT1/2, CLOSE_WAIT,
//! LAST_ACK, CLOSING) are refused by name (recreating them needs a FIN injected from the
//! peer's side, which `TCP_REPAIR` cannot do).

use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};

use anyhow::{anyhow, Context, Result};
use warmstart_snapshots::model::{FileDesc, Manifest, TcpConnection};

use super::{getsockopt_int, setsockopt_int, Installer, Target};
use crate::sys::nft::NetLock;
use crate::sys::tcp_repair as repair;

/// The connections of a dump held in repair mode, and the lock on them.
#[derive(Default)]
pub struct Held {
    socks: Vec<OwnedFd>,
    lock: Option<NetLock>,
}

impl Held {
    /// Whether the dump met established connections.
    pub fn is_empty(&self) -> bool {
        self.socks.is_empty()
    }

    /// The tree goes on (left running or stopped): repair mode off, lock released.
    pub fn resume(mut self) {
        self.repair_off();
        self.lock = None;
    }

    /// The tree has been killed: our copies are the last references to the sockets;
    /// closed in repair mode they disconnect silently. The lock stays for the restore.
    pub fn close_killed(mut self) {
        self.socks.clear();
        if let Some(lock) = self.lock.take() {
            lock.keep();
        }
    }

    fn repair_off(&mut self) {
        for s in self.socks.drain(..) {
            if let Err(e) = repair::set_repair(s.as_fd(), false) {
                tracing::warn!("turning TCP repair mode off: {e}");
            }
        }
    }

    fn lock(&mut self) -> Result<&mut NetLock> {
        if self.lock.is_none() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            let name = format!("warmstart-{}-{:x}", std::process::id(), now);
            self.lock = Some(NetLock::new(&name)?);
        }
        Ok(self.lock.as_mut().expect("set above"))
    }
}

impl Drop for Held {
    /// A dump that failed: the connections go on as they were.
    fn drop(&mut self) {
        self.repair_off();
    }
}

/// Reads the established connection `copy` (the app's socket) in repair mode; it stays
/// in repair mode in `held`. `killed`: the tree is killed after the dump (the lock stays
/// for the restore and is named in the snapshot).
pub fn dump(
    t: &Target,
    copy: &OwnedFd,
    family: i32,
    local: SocketAddr,
    peer: SocketAddr,
    held: &mut Held,
    killed: bool,
) -> Result<FileDesc> {
    let what = || format!("the TCP connection {local} -> {peer} ({})", t.context());
    let lock = held.lock().with_context(what)?;
    lock.add(local, peer).with_context(what)?;
    let table = lock.table().to_owned();
    let fd = copy.as_fd();
    repair::set_repair(fd, true)
        .map_err(|e| anyhow!("{}: {e} (TCP_REPAIR needs CAP_NET_ADMIN)", what()))?;
    held.socks
        .push(copy.try_clone().context("dup of a socket")?);
    read_state(fd, family, local, peer, t.flags(), killed.then_some(table)).with_context(what)
}

fn read_state(
    fd: BorrowedFd,
    family: i32,
    local: SocketAddr,
    peer: SocketAddr,
    flags: i32,
    lock: Option<String>,
) -> Result<FileDesc> {
    let outq = repair::outq(fd)? as usize;
    let unsent = repair::outq_unsent(fd)?;
    let inq = repair::inq(fd)? as usize;
    repair::set_queue(fd, repair::TCP_SEND_QUEUE)?;
    let send_seq = repair::queue_seq(fd)?;
    let send_queue = repair::peek(fd, outq)?;
    repair::set_queue(fd, repair::TCP_RECV_QUEUE)?;
    let recv_seq = repair::queue_seq(fd)?;
    let recv_queue = repair::peek(fd, inq)?;
    let info = super::inet::tcp_info_raw(fd)?;
    // tcpi_options at 5 (TCPI_OPT_TIMESTAMPS 1, _SACK 2, _WSCALE 4); the scales at 6.
    let opts = info[5];
    let (snd_wscale, rcv_wscale) = if opts & 4 != 0 {
        (info[6] & 0xf, info[6] >> 4)
    } else {
        (0xff, 0xff)
    };
    let timestamps = opts & 1 != 0;
    let get = |level, opt| getsockopt_int(&fd, level, opt).map(|v| v != 0);
    let options = warmstart_snapshots::model::SockOptions {
        reuseaddr: get(libc::SOL_SOCKET, libc::SO_REUSEADDR)?,
        reuseport: get(libc::SOL_SOCKET, libc::SO_REUSEPORT)?,
        keepalive: get(libc::SOL_SOCKET, libc::SO_KEEPALIVE)?,
        nodelay: get(libc::IPPROTO_TCP, libc::TCP_NODELAY)?,
        v6only: family == libc::AF_INET6 && get(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)?,
        // The sizes the buffers have grown to (autotuned): the restore needs room for
        // the queues, and sets them (which fixes them at these sizes).
        rcvbuf: Some(getsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF)? as u32),
        sndbuf: Some(getsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_SNDBUF)? as u32),
    };
    let int = |opt| getsockopt_int(&fd, libc::IPPROTO_TCP, opt);
    Ok(FileDesc::TcpEstablished(Box::new(TcpConnection {
        family,
        local: local.to_string(),
        peer: peer.to_string(),
        send_seq,
        recv_seq,
        send_queue,
        unsent,
        recv_queue,
        mss: repair::maxseg(fd)?,
        snd_wscale,
        rcv_wscale,
        sack: opts & 2 != 0,
        timestamps,
        timestamp: if timestamps {
            repair::timestamp(fd)?
        } else {
            0
        },
        window: repair::window(fd)?,
        options,
        keepalive: [
            int(libc::TCP_KEEPIDLE)?,
            int(libc::TCP_KEEPINTVL)?,
            int(libc::TCP_KEEPCNT)?,
        ],
        user_timeout: int(libc::TCP_USER_TIMEOUT)? as u32,
        flags,
        lock,
    })))
}

/// The snapshot's established connections: (pid, fd, connection), each open file
/// description once.
pub fn recorded(m: &Manifest) -> Vec<(i32, i32, &TcpConnection)> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for p in &m.processes {
        for f in &p.fds {
            if let FileDesc::TcpEstablished(c) = &f.file {
                if seen.insert(f.ofd) {
                    out.push((p.pid, f.fd, &**c));
                }
            }
        }
    }
    out
}

/// Before a restore: without `allowed` (`--tcp-established`), a snapshot holding
/// established connections is refused, naming the first.
pub fn check_allowed(m: &Manifest, allowed: bool) -> Result<()> {
    if allowed {
        return Ok(());
    }
    if let Some((pid, fd, c)) = recorded(m).first() {
        let comm = m
            .processes
            .iter()
            .find(|p| p.pid == *pid)
            .map(|p| p.comm.as_str())
            .unwrap_or("?");
        return Err(anyhow!(
            "process {pid} ({comm}): fd {fd} is the established TCP connection {} -> {}, \
             dumped with --tcp-established: restore with --tcp-established to bring it back",
            c.local,
            c.peer
        ));
    }
    Ok(())
}

/// The lock a restore holds on every connection of the snapshot until the tree runs
/// (taken in the calling thread's network namespace); the dump's locks are removed
/// once it is in place.
pub fn restore_lock(m: &Manifest) -> Result<Option<NetLock>> {
    let conns = recorded(m);
    if conns.is_empty() {
        return Ok(None);
    }
    let name = format!("warmstart-restore-{}", std::process::id());
    let mut lock = NetLock::new(&name)?;
    for (_, _, c) in &conns {
        lock.add(parse(&c.local)?, parse(&c.peer)?)?;
    }
    let mut dumped: Vec<&str> = conns.iter().filter_map(|c| c.2.lock.as_deref()).collect();
    dumped.sort_unstable();
    dumped.dedup();
    for t in dumped {
        crate::sys::nft::unlock(t)?;
    }
    Ok(Some(lock))
}

fn parse(s: &str) -> Result<SocketAddr> {
    s.parse()
        .map_err(|e| anyhow!("bad socket address {s:?} in the snapshot: {e}"))
}

/// Recreates the connection `c` (see the module doc for the order); a temp fd.
pub fn restore(ins: &mut Installer, c: &TcpConnection) -> Result<RawFd> {
    let fd = rebuild(c).with_context(|| {
        format!(
            "restoring the established TCP connection {} -> {}",
            c.local, c.peer
        )
    })?;
    super::set_status_flags(fd.as_fd(), c.flags)?;
    ins.keep_high(fd)
}

fn rebuild(c: &TcpConnection) -> Result<OwnedFd> {
    let local = parse(&c.local)?;
    let peer = parse(&c.peer)?;
    let sock = super::inet::new_socket(c.family, libc::SOCK_STREAM, libc::IPPROTO_TCP)?;
    let fd = sock.as_fd();
    repair::set_repair(fd, true)?;
    // Room for the queues (a fresh socket's buffers are smaller than a connection's that
    // has grown): the recorded sizes, at least twice the queue (the kernel counts its
    // overhead); `setsockopt` doubles what it is given.
    let room = |recorded: Option<u32>, queue: usize| {
        (recorded.unwrap_or(0).max(2 * queue as u32 + 65536) / 2) as i32
    };
    setsockopt_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_SNDBUF,
        room(c.options.sndbuf, c.send_queue.len()),
        "SO_SNDBUF",
    )?;
    setsockopt_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_RCVBUF,
        room(c.options.rcvbuf, c.recv_queue.len()),
        "SO_RCVBUF",
    )?;
    if c.options.v6only {
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1, "IPV6_V6ONLY")?;
    }
    let sent = c.send_queue.len() - (c.unsent as usize).min(c.send_queue.len());
    repair::set_queue(fd, repair::TCP_RECV_QUEUE)?;
    repair::set_queue_seq(fd, c.recv_seq.wrapping_sub(c.recv_queue.len() as u32))?;
    repair::set_queue(fd, repair::TCP_SEND_QUEUE)?;
    repair::set_queue_seq(fd, c.send_seq.wrapping_sub(c.send_queue.len() as u32))?;
    super::inet::bind_addr(fd, c.family, &local)?;
    super::inet::connect_addr(fd, &peer, format!("connect in repair mode to {peer}"))?;
    let mut opts = vec![(repair::TCPOPT_MSS, c.mss)];
    if c.snd_wscale != 0xff {
        opts.push((
            repair::TCPOPT_WINDOW,
            c.snd_wscale as u32 | (c.rcv_wscale as u32) << 16,
        ));
    }
    if c.sack {
        opts.push((repair::TCPOPT_SACK_PERM, 0));
    }
    if c.timestamps {
        opts.push((repair::TCPOPT_TIMESTAMP, 0));
    }
    repair::set_options(fd, &opts)?;
    if c.timestamps {
        repair::set_timestamp(fd, c.timestamp)?;
    }
    repair::set_queue(fd, repair::TCP_RECV_QUEUE)?;
    repair::fill(fd, &c.recv_queue)?;
    repair::set_queue(fd, repair::TCP_SEND_QUEUE)?;
    repair::fill(fd, &c.send_queue[..sent])?;
    repair::set_window(fd, &c.window)?;
    repair::set_repair(fd, false)?;
    // Never sent: written as the app would have.
    repair::fill(fd, &c.send_queue[sent..])?;
    super::inet::set_flags(fd, &c.options)?;
    let [idle, intvl, cnt] = c.keepalive;
    setsockopt_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPIDLE,
        idle,
        "TCP_KEEPIDLE",
    )?;
    setsockopt_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        intvl,
        "TCP_KEEPINTVL",
    )?;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, cnt, "TCP_KEEPCNT")?;
    if c.user_timeout != 0 {
        setsockopt_int(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            c.user_timeout as i32,
            "TCP_USER_TIMEOUT",
        )?;
    }
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A connection read in repair mode and rebuilt from what was read carries on: the
    /// bytes queued both ways arrive once, the sequence numbers match.
    #[test]
    fn a_rebuilt_connection_continues_the_old_one() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        server.set_nodelay(true).unwrap();
        client.write_all(b"unread by the server").unwrap();
        // Queued in the server's receive queue.
        let sfd = OwnedFd::from(server);
        while repair::inq(sfd.as_fd()).unwrap() < 20 {
            std::thread::yield_now();
        }
        let local = l.local_addr().unwrap();
        let peer = client.local_addr().unwrap();
        let mut lock = NetLock::new(&format!("warmstart-unit-{}", std::process::id())).unwrap();
        lock.add(local, peer).unwrap();
        repair::set_repair(sfd.as_fd(), true).unwrap();
        let FileDesc::TcpEstablished(c) =
            read_state(sfd.as_fd(), libc::AF_INET, local, peer, 0, None).unwrap()
        else {
            panic!()
        };
        assert_eq!(c.recv_queue, b"unread by the server");
        assert!(c.options.nodelay);
        // The old socket goes silently; the new one takes its place.
        drop(sfd);
        drop(l);
        let rebuilt = rebuild(&c).unwrap();
        repair::set_repair(rebuilt.as_fd(), true).unwrap();
        repair::set_queue(rebuilt.as_fd(), repair::TCP_RECV_QUEUE).unwrap();
        assert_eq!(repair::queue_seq(rebuilt.as_fd()).unwrap(), c.recv_seq);
        repair::set_queue(rebuilt.as_fd(), repair::TCP_SEND_QUEUE).unwrap();
        assert_eq!(repair::queue_seq(rebuilt.as_fd()).unwrap(), c.send_seq);
        repair::set_repair(rebuilt.as_fd(), false).unwrap();
        drop(lock);
        let mut s = std::net::TcpStream::from(rebuilt);
        let mut b = [0u8; 20];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"unread by the server");
        s.write_all(b"answer").unwrap();
        let mut a = [0u8; 6];
        client.read_exact(&mut a).unwrap();
        assert_eq!(&a, b"answer");
    }
}
