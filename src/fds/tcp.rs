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
//! Half-closed connections (FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING) are
//! checkpointed as CRIU's `soccr` does. A FIN takes one sequence number and `SIOCOUTQ`,
//! `SIOCOUTQNSD` count ours while it is unacknowledged, unsent: the dump records the
//! queues and sequence numbers of the data alone ([`fin_sent`], [`fin_received`]). The
//! restore makes the connection ESTABLISHED in repair mode at those numbers, with the
//! unsent bytes written out of repair mode for a moment (they go ahead of our FIN), and
//! the receive window's left edge moved back by the peer's FIN; then, still in repair
//! mode, drives it to its state ([`half_closed`]):
//! * our FIN by `shutdown(SHUT_WR)`: FIN_WAIT1 and CLOSING (sent as the window allows;
//!   the lock drops it, it is retransmitted after), FIN_WAIT2 (queued as sent, with
//!   `TCP_REPAIR_QUEUE` on the send queue, so nothing goes out), LAST_ACK (after the
//!   peer's FIN);
//! * the peer's FIN (CLOSE_WAIT, LAST_ACK, CLOSING) by a FIN segment forged from the
//!   peer's address at the recorded `rcv_nxt`, sent on a raw socket with the mark the
//!   lock lets in ([`crate::sys::nft::FORGED_MARK`]): the socket queues it after the
//!   unread bytes, so the app reads them and then EOF;
//! * the peer's ACK of our FIN (FIN_WAIT2), forged the same way.
//!
//! The state reached is checked against the recorded one before repair mode goes off; a
//! connection that does not get there is an error naming it, never a socket in another
//! state. SYN_SENT, SYN_RECV and the states after `close` (an app has no fd of those)
//! are refused by name at the dump.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use anyhow::{anyhow, Context, Result};
use warmstart_snapshots::model::{FileDesc, Manifest, TcpConnection};

use super::{getsockopt_int, setsockopt_int, Installer, Target};
use crate::sys::nft::NetLock;
use crate::sys::tcp_repair as repair;

pub const ESTABLISHED: u8 = 1;
pub const FIN_WAIT1: u8 = 4;
pub const FIN_WAIT2: u8 = 5;
pub const CLOSE_WAIT: u8 = 8;
pub const LAST_ACK: u8 = 9;
pub const CLOSING: u8 = 11;

/// The states `--tcp-established` checkpoints.
pub fn supported(state: u8) -> bool {
    matches!(
        state,
        ESTABLISHED | FIN_WAIT1 | FIN_WAIT2 | CLOSE_WAIT | LAST_ACK | CLOSING
    )
}

/// Our FIN is queued, sent or acknowledged: the app did `shutdown(SHUT_WR)`.
pub fn fin_sent(state: u8) -> bool {
    matches!(state, FIN_WAIT1 | FIN_WAIT2 | LAST_ACK | CLOSING)
}

/// The peer's FIN has been received: reads give EOF once the queue is read.
pub fn fin_received(state: u8) -> bool {
    matches!(state, CLOSE_WAIT | LAST_ACK | CLOSING)
}

/// `ESTABLISHED`, `FIN_WAIT2`, ...
pub fn state_name(state: u8) -> &'static str {
    super::inet::TCP_STATES
        .get(state as usize)
        .copied()
        .unwrap_or("?")
}

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

/// Reads the connection `copy` (the app's socket, in the [`supported`] `state`) in
/// repair mode; it stays in repair mode in `held`. `killed`: the tree is killed after
/// the dump (the lock stays for the restore and is named in the snapshot).
pub fn dump(
    t: &Target,
    copy: &OwnedFd,
    family: i32,
    (local, peer): (SocketAddr, SocketAddr),
    state: u8,
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
    // The state again, now that the lock holds the peer's segments (one that came
    // before, a FIN, may have moved it since the caller looked).
    let now = super::inet::tcp_info_raw(fd).with_context(what)?[0];
    let state = if supported(now) { now } else { state };
    if now != state {
        let name = state_name(now);
        return Err(anyhow!(
            "{}: its state went from {} to {name} while it was being locked, and {name} is \
             not checkpointed; dump again",
            what(),
            state_name(state),
        ));
    }
    read_state(
        fd,
        family,
        (local, peer),
        state,
        t.flags(),
        killed.then_some(table),
    )
    .with_context(what)
}

fn read_state(
    fd: BorrowedFd,
    family: i32,
    (local, peer): (SocketAddr, SocketAddr),
    state: u8,
    flags: i32,
    lock: Option<String>,
) -> Result<FileDesc> {
    let mut outq = repair::outq(fd)? as usize;
    let mut unsent = repair::outq_unsent(fd)?;
    if fin_sent(state) {
        // Our FIN is counted in the send queue while unacknowledged, and among its
        // unsent bytes while unsent (it is last); it holds no data.
        outq = outq.saturating_sub(1);
        unsent = unsent.saturating_sub(1);
    }
    // (`SIOCINQ` leaves out a received FIN already.)
    let inq = repair::inq(fd)? as usize;
    repair::set_queue(fd, repair::TCP_SEND_QUEUE)?;
    // `write_seq` and `rcv_nxt` count the FINs: the ends of the data are one before.
    let send_seq = repair::queue_seq(fd)?.wrapping_sub(fin_sent(state) as u32);
    let send_queue = repair::peek(fd, outq)?;
    repair::set_queue(fd, repair::TCP_RECV_QUEUE)?;
    let recv_seq = repair::queue_seq(fd)?.wrapping_sub(fin_received(state) as u32);
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
        more: Vec::new(),
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
        state,
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
        let kind = if c.state == ESTABLISHED {
            "established".to_owned()
        } else {
            format!("half-closed ({})", state_name(c.state))
        };
        return Err(anyhow!(
            "process {pid} ({comm}): fd {fd} is the {kind} TCP connection {} -> {}, \
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
            "restoring the TCP connection {} -> {} (state {})",
            c.local,
            c.peer,
            state_name(c.state)
        )
    })?;
    super::set_status_flags(fd.as_fd(), c.flags)?;
    ins.keep_high(fd)
}

fn rebuild(c: &TcpConnection) -> Result<OwnedFd> {
    if !supported(c.state) {
        return Err(anyhow!(
            "the snapshot records TCP state {} ({}), which this warmstart cannot restore",
            c.state,
            state_name(c.state)
        ));
    }
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
    if c.state == ESTABLISHED {
        repair::set_window(fd, &c.window)?;
        repair::set_repair(fd, false)?;
        // Never sent: written as the app would have.
        repair::fill(fd, &c.send_queue[sent..])?;
    } else {
        half_closed(fd, c, sent, local, peer)?;
    }
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

/// The rest of [`rebuild`] for a half-closed connection (see the module doc): the
/// socket is ESTABLISHED in repair mode, with its queues but the unsent bytes; it leaves
/// repair mode in state `c.state`.
fn half_closed(
    fd: BorrowedFd,
    c: &TcpConnection,
    sent: usize,
    local: SocketAddr,
    peer: SocketAddr,
) -> Result<()> {
    if sent < c.send_queue.len() {
        // Never sent, and ahead of our FIN: written as the app would have (the lock
        // holds them).
        repair::set_repair(fd, false)?;
        repair::fill(fd, &c.send_queue[sent..])?;
        repair::set_repair(fd, true)?;
    }
    let mut window = c.window;
    if fin_received(c.state) {
        // rcv_nxt is one before the peer's FIN until it comes: the window's left edge
        // (rcv_wup) moves back with it, its right edge stays.
        window[4] = window[4].wrapping_sub(1);
        window[3] = window[3].wrapping_add(1);
    }
    repair::set_window(fd, &window)?;
    let snd_una = c.send_seq.wrapping_sub(c.send_queue.len() as u32);
    // The window the peer advertises (snd_wnd), as its segments carry it.
    let scale = if c.snd_wscale == 0xff {
        0
    } else {
        c.snd_wscale
    };
    let wnd = (c.window[1] >> scale).min(0xffff) as u16;
    let forge = |seq, ack, flags| {
        Forged {
            from: peer,
            to: local,
            seq,
            ack,
            flags,
            window: wnd,
        }
        .send()
    };
    if matches!(c.state, FIN_WAIT1 | FIN_WAIT2 | CLOSING) {
        our_fin(fd, c.state == FIN_WAIT2)?;
    }
    if fin_received(c.state) {
        forge(c.recv_seq, snd_una, TH_FIN | TH_ACK)?;
        let want = if c.state == CLOSING {
            CLOSING
        } else {
            CLOSE_WAIT
        };
        wait_state(fd, want, "the peer's FIN")?;
    }
    if c.state == LAST_ACK {
        our_fin(fd, false)?;
    }
    if c.state == FIN_WAIT2 {
        forge(c.recv_seq, c.send_seq.wrapping_add(1), TH_ACK)?;
        wait_state(fd, FIN_WAIT2, "the peer's ACK of our FIN")?;
    }
    let now = super::inet::tcp_info_raw(fd)?[0];
    if now != c.state {
        return Err(anyhow!(
            "the connection came back in state {} instead of {}",
            state_name(now),
            state_name(c.state)
        ));
    }
    repair::set_repair(fd, false)?;
    Ok(())
}

/// Our FIN, by `shutdown(SHUT_WR)` in repair mode: sent as the window allows, or, when
/// `acked` (the peer's ACK is forged next), queued as sent without going out.
fn our_fin(fd: BorrowedFd, acked: bool) -> Result<()> {
    repair::set_queue(
        fd,
        if acked {
            repair::TCP_SEND_QUEUE
        } else {
            repair::TCP_NO_QUEUE
        },
    )?;
    // SAFETY: a plain syscall on a socket the caller holds open.
    if unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) } < 0 {
        return Err(super::errno_err("shutdown(SHUT_WR) in repair mode"));
    }
    repair::set_queue(fd, repair::TCP_NO_QUEUE)?;
    Ok(())
}

/// Waits (2 s at most) for a forged segment, `what`, to bring the socket to `state`:
/// delivered over loopback, it is usually processed before `sendto` returns.
fn wait_state(fd: BorrowedFd, state: u8, what: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let now = super::inet::tcp_info_raw(fd)?[0];
        if now == state {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(anyhow!(
                "{what}, forged to bring the connection to {}, left it in {} (is a firewall \
                 dropping packets marked {:#x} on their way in?)",
                state_name(state),
                state_name(now),
                crate::sys::nft::FORGED_MARK
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

const TH_FIN: u8 = 0x01;
const TH_ACK: u8 = 0x10;

/// A TCP segment without data or options, as if from `from` to `to` (CRIU's `send_fin`):
/// IP header included, sent on a raw socket with the mark the network lock lets in.
struct Forged {
    from: SocketAddr,
    to: SocketAddr,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
}

impl Forged {
    /// The packet, IPv4 or IPv6 (IPv4 for IPv4-mapped addresses: that is what goes on
    /// the wire); its family.
    fn packet(&self) -> (Vec<u8>, SocketAddr) {
        let v4 = |a: &SocketAddr| match a {
            SocketAddr::V4(a) => Some(*a.ip()),
            SocketAddr::V6(a) => a.ip().to_ipv4_mapped(),
        };
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&self.from.port().to_be_bytes());
        tcp[2..4].copy_from_slice(&self.to.port().to_be_bytes());
        tcp[4..8].copy_from_slice(&self.seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&self.ack.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = self.flags;
        tcp[14..16].copy_from_slice(&self.window.to_be_bytes());
        let mut pkt = Vec::with_capacity(60);
        let dst;
        if let (Some(s), Some(d)) = (v4(&self.from), v4(&self.to)) {
            let mut pseudo = Vec::with_capacity(12);
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, libc::IPPROTO_TCP as u8, 0, 20]);
            let sum = checksum(&[&pseudo, &tcp]);
            tcp[16..18].copy_from_slice(&sum.to_be_bytes());
            // Version 4, 5 words; total length 40; DF; TTL 64; the kernel fills in the
            // id and the header checksum.
            pkt.extend_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64]);
            pkt.extend_from_slice(&[libc::IPPROTO_TCP as u8, 0, 0]);
            pkt.extend_from_slice(&s.octets());
            pkt.extend_from_slice(&d.octets());
            dst = SocketAddr::new(d.into(), 0);
        } else {
            let ip6 = |a: &SocketAddr| match a {
                SocketAddr::V6(a) => *a.ip(),
                SocketAddr::V4(a) => a.ip().to_ipv6_mapped(),
            };
            let (s, d) = (ip6(&self.from), ip6(&self.to));
            let mut pseudo = Vec::with_capacity(40);
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 0, 0, 20, 0, 0, 0, libc::IPPROTO_TCP as u8]);
            let sum = checksum(&[&pseudo, &tcp]);
            tcp[16..18].copy_from_slice(&sum.to_be_bytes());
            // Version 6; payload length 20; next header TCP; hop limit 64.
            pkt.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, libc::IPPROTO_TCP as u8, 64]);
            pkt.extend_from_slice(&s.octets());
            pkt.extend_from_slice(&d.octets());
            let scope = match self.to {
                SocketAddr::V6(a) => a.scope_id(),
                SocketAddr::V4(_) => 0,
            };
            dst = SocketAddr::V6(std::net::SocketAddrV6::new(d, 0, 0, scope));
        }
        pkt.extend_from_slice(&tcp);
        (pkt, dst)
    }

    fn send(&self) -> Result<()> {
        let (pkt, dst) = self.packet();
        let family = if dst.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        // IPPROTO_RAW: the packet carries its own IP header (IPv4 and IPv6 alike).
        let raw = super::inet::new_socket(family, libc::SOCK_RAW, libc::IPPROTO_RAW)
            .context("a raw socket to forge a segment of the peer (needs CAP_NET_RAW)")?;
        setsockopt_int(
            raw.as_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            crate::sys::nft::FORGED_MARK as i32,
            "SO_MARK",
        )?;
        let (ss, len) = super::inet::to_storage(&dst);
        // SAFETY: `pkt` is a live buffer `sendto` only reads; `ss` holds a sockaddr of
        // `len` bytes and lives across the call.
        let n = unsafe {
            libc::sendto(
                raw.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&ss as *const libc::sockaddr_storage).cast(),
                len,
            )
        };
        if n < 0 {
            return Err(super::errno_err(format!(
                "sending a segment forged from {} to {}",
                self.from, self.to
            )));
        }
        Ok(())
    }
}

/// The Internet checksum of the concatenation of `parts` (each of even length but the
/// last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for p in parts {
        for w in p.chunks(2) {
            let hi = w[0] as u32;
            let lo = w.get(1).copied().unwrap_or(0) as u32;
            sum += hi << 8 | lo;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
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
        let FileDesc::TcpEstablished(c) = read_state(
            sfd.as_fd(),
            libc::AF_INET,
            (local, peer),
            ESTABLISHED,
            0,
            None,
        )
        .unwrap() else {
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

    fn state_of(fd: BorrowedFd) -> u8 {
        super::super::inet::tcp_info_raw(fd).unwrap()[0]
    }

    fn wait_for(fd: BorrowedFd, state: u8) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while state_of(fd) != state {
            assert!(
                std::time::Instant::now() < deadline,
                "state {}",
                state_of(fd)
            );
            std::thread::yield_now();
        }
    }

    /// `server`, in `state`, checkpointed (locked, read in repair mode, closed silently)
    /// and rebuilt; the rebuilt socket in the same state, still locked.
    fn round_trip(
        l: &std::net::TcpListener,
        server: std::net::TcpStream,
        client: &std::net::TcpStream,
        state: u8,
        tag: &str,
    ) -> (OwnedFd, NetLock) {
        let sfd = OwnedFd::from(server);
        wait_for(sfd.as_fd(), state);
        let local = l.local_addr().unwrap();
        let peer = client.local_addr().unwrap();
        let mut lock =
            NetLock::new(&format!("warmstart-unit-{tag}-{}", std::process::id())).unwrap();
        lock.add(local, peer).unwrap();
        repair::set_repair(sfd.as_fd(), true).unwrap();
        let FileDesc::TcpEstablished(c) =
            read_state(sfd.as_fd(), libc::AF_INET, (local, peer), state, 0, None).unwrap()
        else {
            panic!()
        };
        drop(sfd);
        let rebuilt = rebuild(&c).unwrap();
        assert_eq!(state_of(rebuilt.as_fd()), state);
        repair::set_repair(rebuilt.as_fd(), true).unwrap();
        repair::set_queue(rebuilt.as_fd(), repair::TCP_RECV_QUEUE).unwrap();
        assert_eq!(
            repair::queue_seq(rebuilt.as_fd()).unwrap(),
            c.recv_seq.wrapping_add(fin_received(state) as u32),
            "rcv_nxt"
        );
        repair::set_queue(rebuilt.as_fd(), repair::TCP_SEND_QUEUE).unwrap();
        assert_eq!(
            repair::queue_seq(rebuilt.as_fd()).unwrap(),
            c.send_seq.wrapping_add(fin_sent(state) as u32),
            "write_seq"
        );
        repair::set_repair(rebuilt.as_fd(), false).unwrap();
        (rebuilt, lock)
    }

    /// CLOSE_WAIT: the peer's FIN comes back after the unread bytes.
    #[test]
    fn a_close_wait_connection_reads_its_bytes_then_eof() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        client.write_all(b"unread").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let (rebuilt, lock) = round_trip(&l, server, &client, CLOSE_WAIT, "cw");
        drop(lock);
        let mut s = std::net::TcpStream::from(rebuilt);
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"unread");
        s.write_all(b"answer").unwrap();
        let mut a = [0u8; 6];
        client.read_exact(&mut a).unwrap();
        assert_eq!(&a, b"answer");
        drop(s);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    /// FIN_WAIT2: nothing goes out again; the peer's bytes still come in.
    #[test]
    fn a_fin_wait2_connection_still_receives() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server, _) = l.accept().unwrap();
        server.shutdown(std::net::Shutdown::Write).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(client.read(&mut b).unwrap(), 0);
        let (rebuilt, lock) = round_trip(&l, server, &client, FIN_WAIT2, "fw2");
        drop(lock);
        client.write_all(b"more").unwrap();
        let mut s = std::net::TcpStream::from(rebuilt);
        let mut m = [0u8; 4];
        s.read_exact(&mut m).unwrap();
        assert_eq!(&m, b"more");
        assert_eq!(state_of(s.as_fd()), FIN_WAIT2);
        client.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(s.read(&mut m).unwrap(), 0);
        assert_eq!(client.read(&mut b).unwrap(), 0, "EOF, no reset");
    }

    /// LAST_ACK and FIN_WAIT1 (the peer's ACKs held by the lock): our FIN goes again
    /// once the lock is gone.
    #[test]
    fn last_ack_and_fin_wait1_connections_finish() {
        for (state, tag) in [(LAST_ACK, "la"), (FIN_WAIT1, "fw1")] {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let mut client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (server, _) = l.accept().unwrap();
            let local = l.local_addr().unwrap();
            let peer = client.local_addr().unwrap();
            if state == LAST_ACK {
                client.shutdown(std::net::Shutdown::Write).unwrap();
                wait_for(server.as_fd(), CLOSE_WAIT);
            }
            // The client's answer to our FIN is held: we stay in FIN_WAIT1 / LAST_ACK.
            let mut hold =
                NetLock::new(&format!("warmstart-unit-h{tag}-{}", std::process::id())).unwrap();
            hold.add(local, peer).unwrap();
            server.shutdown(std::net::Shutdown::Write).unwrap();
            let (rebuilt, lock) = round_trip(&l, server, &client, state, tag);
            drop(hold);
            drop(lock);
            let mut b = [0u8; 1];
            assert_eq!(client.read(&mut b).unwrap(), 0, "our FIN arrives");
            let end = if state == LAST_ACK { 7 } else { FIN_WAIT2 };
            wait_for(rebuilt.as_fd(), end);
        }
    }

    /// CLOSING with bytes never sent ahead of our FIN (the client's window is shut):
    /// they go out once the lock is gone, then our FIN; the state went FIN_WAIT1 ->
    /// CLOSING on the way back.
    #[test]
    fn a_closing_connection_with_unsent_bytes_sends_them_then_its_fin() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = super::super::inet::new_socket(libc::AF_INET, libc::SOCK_STREAM, 0).unwrap();
        setsockopt_int(c.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, 4096, "").unwrap();
        super::super::inet::connect_addr(c.as_fd(), &l.local_addr().unwrap(), "").unwrap();
        let mut client = std::net::TcpStream::from(c);
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let (mut server, _) = l.accept().unwrap();
        setsockopt_int(server.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, 65536, "").unwrap();
        server.set_nonblocking(true).unwrap();
        let pattern = |i: usize| b'a' + (i % 26) as u8;
        let mut n = 0;
        loop {
            let chunk: Vec<u8> = (n..n + 1024).map(pattern).collect();
            match server.write(&chunk) {
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        server.set_nonblocking(false).unwrap();
        assert!(repair::outq_unsent(server.as_fd()).unwrap() > 0);
        server.shutdown(std::net::Shutdown::Write).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let (rebuilt, lock) = round_trip(&l, server, &client, CLOSING, "cl");
        assert!(
            repair::outq_unsent(rebuilt.as_fd()).unwrap() > 0,
            "still unsent"
        );
        drop(lock);
        let mut got = Vec::new();
        client.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), n);
        assert!(got.iter().enumerate().all(|(i, b)| *b == pattern(i)));
        wait_for(rebuilt.as_fd(), 7);
    }
}
