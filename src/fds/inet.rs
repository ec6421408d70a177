//! TCP and UDP sockets, IPv4 and IPv6.
//!
//! * **Listening or bound** sockets (and unbound ones, and connected UDP sockets): family,
//!   type, local address (`getsockname` on a copy), the options `SO_REUSEADDR`,
//!   `SO_REUSEPORT`, `SO_KEEPALIVE`, `TCP_NODELAY`, `IPV6_V6ONLY`, the buffer sizes when
//!   they differ from a fresh socket's (set with half the reported value: the kernel
//!   doubles what it is given; setting them also turns off autotuning, which is why
//!   defaults are left alone), `O_NONBLOCK`, and a listener's backlog (from `sock_diag`:
//!   `idiag_wqueue` is the backlog of a listener; `SOMAXCONN` if not found). Connections
//!   waiting in a listener's accept queue are refused. At restore a port that is taken is
//!   "127.0.0.1:8731 is in use".
//! * **Established TCP connections** are refused, naming the fd and the peer, unless the
//!   dump was made with `tcp_close`: then each is restored as a TCP socket whose peer has
//!   reset the connection. The app's next `read`/`recv` fails with `ECONNRESET`, later
//!   ones return 0 (EOF), and writes fail with `EPIPE` (SIGPIPE unless ignored), exactly
//!   as when a remote peer resets; `getpeername` then fails with `ENOTCONN`. To make it,
//!   the child connects a socket to a loopback listener of its own, and closes the
//!   accepted end with `SO_LINGER` 0, which sends the RST.
//! * **Connections that are over** but still open in the app (state CLOSE, e.g. a server
//!   between its `shutdown` and its `close`) are restored as such, never as a socket bound
//!   to their old address (which is a listener's port): if an error is pending (`POLLERR`,
//!   read without clearing it) as a connection reset by its peer (the app's next read
//!   fails with ECONNRESET; the pending error was ECONNRESET or, rarely, ETIMEDOUT), else
//!   as one closed with FINs both ways (reads give EOF). Writes fail with EPIPE either
//!   way. A connection attempt that failed with an error the app has not read is refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

use anyhow::{anyhow, bail, Context, Result};
use warmstart_snapshots::model::{FileDesc, SockOptions};

use super::sock_diag::{self, InetDiag};
use super::{errno_err, getsockopt_int, setsockopt_int, Installer, Target};

const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE: u8 = 7;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LISTEN: u8 = 10;
pub(super) const TCP_STATES: [&str; 13] = [
    "?",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
    "NEW_SYN_RECV",
];

/// TCP listeners by inode, per family, fetched once per dump.
#[derive(Default)]
pub struct Collector {
    listeners: Vec<(i32, std::collections::HashMap<u32, InetDiag>)>,
    /// Established connections held in repair mode (`--tcp-established`).
    pub held: super::tcp::Held,
}

impl Collector {
    fn listener(&mut self, family: i32, ino: u32) -> Result<Option<InetDiag>> {
        if !self.listeners.iter().any(|(f, _)| *f == family) {
            self.listeners
                .push((family, sock_diag::tcp_listeners(family)?));
        }
        Ok(self
            .listeners
            .iter()
            .find(|(f, _)| *f == family)
            .and_then(|(_, m)| m.get(&ino).copied()))
    }
}

pub fn dump(
    t: &Target,
    meta: &std::fs::Metadata,
    copy: &OwnedFd,
    family: i32,
    c: &mut Collector,
) -> Result<FileDesc> {
    let sock_type = getsockopt_int(copy, libc::SOL_SOCKET, libc::SO_TYPE)?;
    let protocol = getsockopt_int(copy, libc::SOL_SOCKET, libc::SO_PROTOCOL)?;
    let kind = match (sock_type, protocol) {
        (libc::SOCK_STREAM, libc::IPPROTO_TCP) => "tcp",
        (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => "udp",
        (libc::SOCK_RAW, _) => return Err(t.refuse("a raw IP socket")),
        _ => {
            return Err(t.refuse(format_args!(
                "an IP socket of type {sock_type}, protocol {protocol}"
            )))
        }
    };
    let local = sockname(copy, false)?.unwrap_or_else(|| unspecified(family));
    let peer = sockname(copy, true)?;
    let flags = t.flags();
    let mut listen = None;
    if kind == "tcp" {
        let info = tcp_info(copy)?;
        let state = info.state;
        match state {
            TCP_LISTEN => {
                let d = c.listener(family, meta.ino() as u32)?;
                if let Some(d) = d.filter(|d| d.rqueue > 0) {
                    return Err(t.refuse(format_args!(
                        "a TCP socket listening on {local} with {} connections not accepted yet",
                        d.rqueue
                    )));
                }
                listen = Some(
                    d.map(|d| d.wqueue)
                        .filter(|&b| b > 0)
                        .unwrap_or(libc::SOMAXCONN as u32),
                );
            }
            // Its connection is over, but the app still has it open: not a bound socket
            // (binding its address again would take a listener's port).
            TCP_CLOSE if info.rcv_mss > 0 => {
                return Ok(FileDesc::TcpEnded {
                    family,
                    reset: pending_error(copy)?,
                    flags,
                });
            }
            // A connection attempt that failed with an error the app has not read yet.
            TCP_CLOSE if info.segs_out > 0 && pending_error(copy)? => {
                return Err(t.refuse(format_args!(
                    "a TCP socket whose connection attempt from {local} failed with an error \
                     the app has not read yet"
                )));
            }
            TCP_CLOSE => {}
            _ => {
                let peer = peer
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "an unknown peer".into());
                let name = TCP_STATES.get(state as usize).unwrap_or(&"?");
                if t.opts.tcp_established && super::tcp::supported(state) {
                    if let Some(p) = sockname(copy, true)? {
                        return super::tcp::dump(
                            t,
                            copy,
                            family,
                            (local, p),
                            state,
                            &mut c.held,
                            t.opts.take_queued,
                        );
                    }
                }
                if t.opts.tcp_established && state != 2 && !t.opts.tcp_close {
                    return Err(anyhow!(
                        "{} (--tcp-established restores connections in states ESTABLISHED, \
                         FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK and CLOSING only; \
                         --tcp-close restores it as reset by its peer)",
                        t.refuse(format_args!(
                            "a TCP connection from {local} to {peer} in state {name}"
                        ))
                    ));
                }
                if t.opts.tcp_close && state != 2 {
                    return Ok(FileDesc::TcpClosed {
                        family,
                        local: local.to_string(),
                        peer,
                        flags,
                    });
                }
                let what = if state == TCP_ESTABLISHED {
                    format!("an established TCP connection from {local} to {peer}")
                } else {
                    format!("a TCP connection from {local} to {peer} in state {name}")
                };
                let hint = if state == 2 {
                    ""
                } else {
                    " (record or dump with --tcp-established to checkpoint it, or --tcp-close to \
                     restore it as a connection reset by its peer)"
                };
                return Err(anyhow!("{}{hint}", t.refuse(what)));
            }
        }
    }
    if let Some(n) = attached_filter(copy) {
        return Err(t.refuse(format_args!(
            "a socket with a filter attached (SO_ATTACH_FILTER or SO_ATTACH_BPF, {n} \
             instructions)"
        )));
    }
    if kind == "udp" {
        if let Some(len) = queued_datagram(copy)? {
            return Err(anyhow!(
                "{} (they cannot be queued again with their senders' addresses, and a \
                 restore must not drop them); dump it once they are read",
                t.refuse(format_args!(
                    "a UDP socket bound to {local} with datagrams not read yet (the first \
                     {len} bytes long)"
                ))
            ));
        }
    }
    Ok(FileDesc::Inet {
        family,
        sock_type,
        protocol,
        local: local.to_string(),
        peer: if kind == "udp" {
            peer.map(|p| p.to_string())
        } else {
            None
        },
        listen,
        options: options(copy, family, sock_type, protocol)?,
        flags,
    })
}

/// The length of the first datagram queued on `sock`, or `None` when none is
/// (`SIOCINQ`: it leaves the queue and a pending socket error alone, where a peeking
/// `recv` would consume the error; a queued datagram of length 0 goes unseen).
fn queued_datagram(sock: &OwnedFd) -> Result<Option<usize>> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCINQ (FIONREAD) writes one int through the pointer, to the live local `n`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
        return Err(errno_err("ioctl(SIOCINQ) of a UDP socket"));
    }
    Ok((n > 0).then_some(n as usize))
}

fn unspecified(family: i32) -> SocketAddr {
    if family == libc::AF_INET6 {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0)
    } else {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
    }
}

/// What the dump reads of `struct tcp_info`.
struct TcpInfo {
    state: u8,
    /// `tcpi_rcv_mss`: set when the connection was established, 0 before.
    rcv_mss: u32,
    /// `tcpi_segs_out`: segments sent, SYNs included.
    segs_out: u32,
}

/// Is an error pending on the socket (`sk_err`, what `SO_ERROR` would return and clear)?
/// `poll` reports it as `POLLERR` without clearing it.
fn pending_error(fd: &OwnedFd) -> Result<bool> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the duration of the call; timeout 0.
    if unsafe { libc::poll(&mut p, 1, 0) } < 0 {
        return Err(errno_err("poll of a TCP socket"));
    }
    Ok(p.revents & libc::POLLERR != 0)
}

fn tcp_info(fd: &OwnedFd) -> Result<TcpInfo> {
    let info = tcp_info_raw(fd.as_fd())?;
    let word = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().unwrap());
    Ok(TcpInfo {
        state: info[0],
        rcv_mss: word(20),
        segs_out: word(136),
    })
}

/// `struct tcp_info` as the kernel gives it (fields it does not fill are zero).
pub(super) fn tcp_info_raw(fd: BorrowedFd) -> Result<[u8; 256]> {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `info` is a live 256-byte buffer and `len` says so; the kernel writes at most
    // `len` bytes (and lowers `len`), and fields are read from the buffer only within its
    // 256 bytes.
    if unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    } < 0
    {
        return Err(errno_err("getsockopt(TCP_INFO)"));
    }
    Ok(info)
}

/// `getsockname` (or `getpeername`); `None` when not connected.
fn sockname(fd: &OwnedFd, peer: bool) -> Result<Option<SocketAddr>> {
    // SAFETY: `sockaddr_storage` is a plain C struct; all-zero bytes are valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let p = (&mut ss as *mut libc::sockaddr_storage).cast();
    // SAFETY: `p` points at `ss`, a live `sockaddr_storage`, and `len` is its size, so the
    // kernel writes at most that many bytes.
    let r = unsafe {
        if peer {
            libc::getpeername(fd.as_raw_fd(), p, &mut len)
        } else {
            libc::getsockname(fd.as_raw_fd(), p, &mut len)
        }
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if peer && e.raw_os_error() == Some(libc::ENOTCONN) {
            return Ok(None);
        }
        return Err(anyhow!("getsockname: {e}"));
    }
    Ok(from_storage(&ss))
}

fn from_storage(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: `ss_family` is AF_INET, so the storage holds a `sockaddr_in`;
            // `sockaddr_storage` is larger than and aligned for every sockaddr type, and
            // the reference borrows `ss`.
            let a: &libc::sockaddr_in = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: `ss_family` is AF_INET6, so the storage holds a `sockaddr_in6`;
            // `sockaddr_storage` is larger than and aligned for every sockaddr type, and
            // the reference borrows `ss`.
            let a: &libc::sockaddr_in6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

pub(super) fn to_storage(a: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: `sockaddr_storage` is a plain C struct; all-zero bytes are valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let s: &mut libc::sockaddr_in =
                // SAFETY: `sockaddr_storage` is larger than and aligned for `sockaddr_in`,
                // a plain C struct valid for any bytes; the reference is the only access to
                // `ss` while it lives.
                unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            s.sin_family = libc::AF_INET as libc::sa_family_t;
            s.sin_port = v4.port().to_be();
            s.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let s: &mut libc::sockaddr_in6 =
                // SAFETY: `sockaddr_storage` is larger than and aligned for `sockaddr_in6`,
                // a plain C struct valid for any bytes; the reference is the only access to
                // `ss` while it lives.
                unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            s.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            s.sin6_port = v6.port().to_be();
            s.sin6_addr.s6_addr = v6.ip().octets();
            s.sin6_flowinfo = v6.flowinfo();
            s.sin6_scope_id = v6.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// A new close-on-exec socket.
pub(super) fn new_socket(family: i32, sock_type: i32, protocol: i32) -> Result<OwnedFd> {
    // SAFETY: integer arguments only; the fd returned is owned right below.
    let fd = unsafe { libc::socket(family, sock_type | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(errno_err("socket"));
    }
    // SAFETY: `socket` succeeded: a new descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Binds `fd` to `addr`; an address in use is said so, naming what holds the port.
pub(super) fn bind_addr(fd: BorrowedFd, family: i32, addr: &SocketAddr) -> Result<()> {
    let (ss, len) = to_storage(addr);
    // SAFETY: `ss` is a sockaddr of `len` bytes (`to_storage`) that lives across the call.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    } < 0
    {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EADDRINUSE) {
            bail!("{addr} is in use{}", port_users(family, addr.port()));
        }
        bail!("binding to {addr}: {e}");
    }
    Ok(())
}

/// Connects `fd` to `addr` (`what` names the connection in the error).
pub(super) fn connect_addr(
    fd: BorrowedFd,
    addr: &SocketAddr,
    what: impl std::fmt::Display,
) -> Result<()> {
    let (ss, len) = to_storage(addr);
    // SAFETY: `ss` is a sockaddr of `len` bytes (`to_storage`) that lives across the call.
    if unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&ss as *const libc::sockaddr_storage).cast(),
            len,
        )
    } < 0
    {
        return Err(errno_err(what));
    }
    Ok(())
}

fn options(fd: &OwnedFd, family: i32, sock_type: i32, protocol: i32) -> Result<SockOptions> {
    let get = |level, opt| getsockopt_int(fd, level, opt).map(|v| v != 0);
    let fresh = new_socket(family, sock_type, protocol)
        .context("creating a socket to compare the options with")?;
    let buf = |opt| -> Result<Option<u32>> {
        let v = getsockopt_int(fd, libc::SOL_SOCKET, opt)?;
        let d = getsockopt_int(&fresh, libc::SOL_SOCKET, opt)?;
        Ok((v != d).then_some(v as u32))
    };
    let mut more = Vec::new();
    for &(level, name, label) in MORE_OPTIONS {
        let (Some(v), fresh) = (
            getsockopt_bytes(fd, level, name),
            getsockopt_bytes(&fresh, level, name),
        ) else {
            continue; // not an option of this kind of socket
        };
        if fresh.as_ref() != Some(&v) {
            tracing::debug!("socket option {label} differs from a new socket's");
            more.push((level, name, v));
        }
    }
    Ok(SockOptions {
        reuseaddr: get(libc::SOL_SOCKET, libc::SO_REUSEADDR)?,
        reuseport: get(libc::SOL_SOCKET, libc::SO_REUSEPORT)?,
        keepalive: get(libc::SOL_SOCKET, libc::SO_KEEPALIVE)?,
        nodelay: protocol == libc::IPPROTO_TCP && get(libc::IPPROTO_TCP, libc::TCP_NODELAY)?,
        v6only: family == libc::AF_INET6 && get(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)?,
        rcvbuf: buf(libc::SO_RCVBUF)?,
        sndbuf: buf(libc::SO_SNDBUF)?,
        more,
    })
}

/// `SO_TXREHASH` (Linux 5.19; not in the libc crate).
const SO_TXREHASH: i32 = 74;

/// Options a socket keeps that a new socket of its kind may not have: compared with a
/// new socket's at dump, restored byte for byte (in this order, before the bind) where
/// they differ. Those a kind of socket does not have (`ENOPROTOOPT`) are passed over.
const MORE_OPTIONS: &[(i32, i32, &str)] = &[
    // First: setting the type of service also sets SO_PRIORITY, which follows.
    (libc::IPPROTO_IP, libc::IP_TOS, "IP_TOS"),
    (libc::IPPROTO_IPV6, libc::IPV6_TCLASS, "IPV6_TCLASS"),
    (libc::SOL_SOCKET, libc::SO_BINDTODEVICE, "SO_BINDTODEVICE"),
    (libc::SOL_SOCKET, libc::SO_PRIORITY, "SO_PRIORITY"),
    (libc::SOL_SOCKET, libc::SO_MARK, "SO_MARK"),
    (libc::SOL_SOCKET, libc::SO_OOBINLINE, "SO_OOBINLINE"),
    (libc::SOL_SOCKET, libc::SO_TIMESTAMP, "SO_TIMESTAMP"),
    (libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, "SO_TIMESTAMPNS"),
    (libc::SOL_SOCKET, libc::SO_RCVLOWAT, "SO_RCVLOWAT"),
    (libc::SOL_SOCKET, libc::SO_DONTROUTE, "SO_DONTROUTE"),
    (libc::SOL_SOCKET, libc::SO_BROADCAST, "SO_BROADCAST"),
    (libc::SOL_SOCKET, libc::SO_LINGER, "SO_LINGER"),
    (libc::SOL_SOCKET, libc::SO_RCVTIMEO, "SO_RCVTIMEO"),
    (libc::SOL_SOCKET, libc::SO_SNDTIMEO, "SO_SNDTIMEO"),
    (libc::SOL_SOCKET, libc::SO_BUSY_POLL, "SO_BUSY_POLL"),
    (libc::SOL_SOCKET, libc::SO_ZEROCOPY, "SO_ZEROCOPY"),
    (libc::SOL_SOCKET, libc::SO_PASSCRED, "SO_PASSCRED"),
    (libc::SOL_SOCKET, libc::SO_PEEK_OFF, "SO_PEEK_OFF"),
    (libc::SOL_SOCKET, libc::SO_RXQ_OVFL, "SO_RXQ_OVFL"),
    (libc::SOL_SOCKET, SO_TXREHASH, "SO_TXREHASH"),
    (libc::IPPROTO_TCP, libc::TCP_CONGESTION, "TCP_CONGESTION"),
    (libc::IPPROTO_TCP, libc::TCP_MAXSEG, "TCP_MAXSEG"),
    (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, "TCP_KEEPIDLE"),
    (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, "TCP_KEEPINTVL"),
    (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, "TCP_KEEPCNT"),
    (libc::IPPROTO_TCP, libc::TCP_SYNCNT, "TCP_SYNCNT"),
    (libc::IPPROTO_TCP, libc::TCP_LINGER2, "TCP_LINGER2"),
    (
        libc::IPPROTO_TCP,
        libc::TCP_DEFER_ACCEPT,
        "TCP_DEFER_ACCEPT",
    ),
    (
        libc::IPPROTO_TCP,
        libc::TCP_WINDOW_CLAMP,
        "TCP_WINDOW_CLAMP",
    ),
    (
        libc::IPPROTO_TCP,
        libc::TCP_USER_TIMEOUT,
        "TCP_USER_TIMEOUT",
    ),
    (
        libc::IPPROTO_TCP,
        libc::TCP_NOTSENT_LOWAT,
        "TCP_NOTSENT_LOWAT",
    ),
    (libc::IPPROTO_TCP, libc::TCP_FASTOPEN, "TCP_FASTOPEN"),
    (libc::IPPROTO_IP, libc::IP_TTL, "IP_TTL"),
    (libc::IPPROTO_IP, libc::IP_FREEBIND, "IP_FREEBIND"),
    (libc::IPPROTO_IP, libc::IP_RECVERR, "IP_RECVERR"),
    (libc::IPPROTO_IP, libc::IP_PKTINFO, "IP_PKTINFO"),
    (libc::IPPROTO_IP, libc::IP_MULTICAST_TTL, "IP_MULTICAST_TTL"),
    (
        libc::IPPROTO_IP,
        libc::IP_MULTICAST_LOOP,
        "IP_MULTICAST_LOOP",
    ),
    (
        libc::IPPROTO_IPV6,
        libc::IPV6_UNICAST_HOPS,
        "IPV6_UNICAST_HOPS",
    ),
    (
        libc::IPPROTO_IPV6,
        libc::IPV6_RECVPKTINFO,
        "IPV6_RECVPKTINFO",
    ),
    (
        libc::IPPROTO_IPV6,
        libc::IPV6_MULTICAST_HOPS,
        "IPV6_MULTICAST_HOPS",
    ),
    (
        libc::IPPROTO_IPV6,
        libc::IPV6_MULTICAST_LOOP,
        "IPV6_MULTICAST_LOOP",
    ),
];

/// The number of instructions of the socket filter attached to `fd` (`SO_ATTACH_FILTER`
/// or `SO_ATTACH_BPF`), if one is.
fn attached_filter(fd: &impl AsRawFd) -> Option<u32> {
    let mut n: libc::socklen_t = 0;
    let mut none = 0u8;
    // SAFETY: with a zero length SO_GET_FILTER only reports the filter's instruction
    // count in `n`; nothing is written through the (valid, one-byte) buffer.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            (&mut none as *mut u8).cast(),
            &mut n,
        )
    };
    (r == 0 && n > 0).then_some(n)
}

/// The label of option (`level`, `name`) in [`MORE_OPTIONS`], for messages.
fn option_label(level: i32, name: i32) -> String {
    MORE_OPTIONS
        .iter()
        .find(|o| o.0 == level && o.1 == name)
        .map_or_else(|| format!("option {level}/{name}"), |o| o.2.to_owned())
}

/// `getsockopt` into a buffer of up to 64 bytes: the bytes the kernel gave, `None` when
/// the socket has no such option.
fn getsockopt_bytes(fd: &impl AsRawFd, level: i32, name: i32) -> Option<Vec<u8>> {
    let mut buf = [0u8; 64];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` is a live 64-byte buffer and `len` says so: the kernel writes at
    // most that much and puts the length it wrote in `len`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    (r == 0).then(|| buf[..(len as usize).min(buf.len())].to_vec())
}

/// What holds TCP port `port` (for the "in use" message): each socket on it with its
/// state and the processes that have it open, or that it is an orphan no process holds.
fn port_users(family: i32, port: u16) -> String {
    let Ok(socks) = sock_diag::TcpPortWatch::new().and_then(|mut w| w.all_on_port(family, port))
    else {
        return String::new();
    };
    if socks.is_empty() {
        return String::new();
    }
    let inodes: Vec<u32> = socks.iter().map(|s| s.inode).filter(|&i| i != 0).collect();
    let holders = sock_diag::socket_holders(&inodes);
    let shown: Vec<String> = socks
        .iter()
        .take(6)
        .map(|s| {
            let state = TCP_STATES.get(s.state as usize).unwrap_or(&"?");
            match holders.get(&s.inode) {
                Some(who) if s.inode != 0 => {
                    let who: Vec<String> = who
                        .iter()
                        .map(|(pid, comm)| format!("pid {pid} ({comm})"))
                        .collect();
                    format!("{state} socket of {}", who.join(", "))
                }
                _ if s.inode == 0 => format!("{state} socket no process holds"),
                _ => format!("{state} socket (inode {})", s.inode),
            }
        })
        .collect();
    let more = socks.len().saturating_sub(shown.len());
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!(
        " (by a {}{more}); stop what holds it and run again",
        shown.join(", a ")
    )
}

/// A TCP listener of a snapshot (once per open file description). A `serve` daemon sends
/// them to a `run --listen` client, which binds its replacements without reading the
/// snapshot itself.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RecordedListener {
    pub ofd: u32,
    pub pid: i32,
    pub fd: i32,
    pub local: SocketAddr,
    pub backlog: u32,
    options: SockOptions,
    flags: i32,
}

/// The snapshot's TCP listeners, in process and fd order, each shared one once.
pub fn recorded_listeners(m: &warmstart_snapshots::model::Manifest) -> Vec<RecordedListener> {
    let mut out: Vec<RecordedListener> = Vec::new();
    for p in m.processes.iter().filter(|p| p.zombie.is_none()) {
        for f in &p.fds {
            if let FileDesc::Inet {
                sock_type: libc::SOCK_STREAM,
                local,
                listen: Some(backlog),
                options,
                flags,
                ..
            } = &f.file
            {
                if out.iter().any(|l| l.ofd == f.ofd) {
                    continue;
                }
                let Ok(local) = parse_addr(local) else {
                    continue;
                };
                out.push(RecordedListener {
                    ofd: f.ofd,
                    pid: p.pid,
                    fd: f.fd,
                    local,
                    backlog: *backlog,
                    options: options.clone(),
                    flags: *flags,
                });
            }
        }
    }
    out
}

/// The listening sockets an instance gets in place of the ones it recorded, by
/// `Fd::ofd`: from `--listen [PORT=]ADDR` specs (a new socket bound to ADDR with the
/// recorded options and backlog; a bare ADDR when the snapshot has one listener, a bare
/// port keeps the recorded IP), or, with `systemd`, the caller's `LISTEN_FDS` sockets
/// (fds 3.., in the order of the recorded listeners). Every error names the spec and
/// is raised before anything is restored.
pub fn replacements(
    recorded: &[RecordedListener],
    specs: &[String],
    systemd: Option<Vec<OwnedFd>>,
) -> Result<Vec<(u32, std::sync::Arc<OwnedFd>)>> {
    let ports = || {
        let p: Vec<String> = recorded.iter().map(|l| l.local.to_string()).collect();
        if p.is_empty() {
            "it listens on no TCP port".to_owned()
        } else {
            format!("it listens on {}", p.join(", "))
        }
    };
    if let Some(given) = systemd {
        if !specs.is_empty() {
            bail!("--listen and LISTEN_FDS both give listening sockets: use one of them");
        }
        if given.len() > recorded.len() {
            bail!(
                "LISTEN_FDS passes {} listening sockets, but the snapshot has {} ({})",
                given.len(),
                recorded.len(),
                ports()
            );
        }
        return Ok(recorded
            .iter()
            .zip(given)
            .map(|(l, fd)| (l.ofd, std::sync::Arc::new(fd)))
            .collect());
    }
    let mut out: Vec<(u32, std::sync::Arc<OwnedFd>)> = Vec::new();
    for spec in specs {
        let (port, addr) = match spec.split_once('=') {
            Some((p, a)) => {
                let p: u16 = p.parse().map_err(|_| {
                    anyhow!("--listen {spec:?}: {p:?} is not a port (use PORT=ADDR)")
                })?;
                (Some(p), a)
            }
            None => (None, spec.as_str()),
        };
        let l = match port {
            Some(p) => recorded
                .iter()
                .find(|l| l.local.port() == p)
                .ok_or_else(|| {
                    anyhow!(
                        "--listen {spec}: the snapshot does not listen on port {p} ({})",
                        ports()
                    )
                })?,
            None => match recorded {
                [one] => one,
                [] => bail!("--listen {spec}: the snapshot has no TCP listener to replace"),
                _ => bail!(
                    "--listen {spec}: the snapshot has {} listeners ({}); say which one with \
                     --listen PORT={addr}",
                    recorded.len(),
                    ports()
                ),
            },
        };
        if out.iter().any(|(ofd, _)| *ofd == l.ofd) {
            bail!(
                "--listen {spec}: the listener on {} is given twice",
                l.local
            );
        }
        let to: SocketAddr = match addr.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => match addr.parse::<u16>() {
                Ok(p) => SocketAddr::new(l.local.ip(), p),
                Err(_) => bail!(
                    "--listen {spec}: {addr:?} is not an address (IP:PORT, [IPV6]:PORT or PORT)"
                ),
            },
        };
        let fd = new_listener(l, to).with_context(|| format!("--listen {spec}"))?;
        out.push((l.ofd, std::sync::Arc::new(fd)));
    }
    Ok(out)
}

/// A new socket for each of the snapshot's TCP listeners, bound at its recorded address
/// (what `serve` hands a parked instance of a server), by `Fd::ofd`.
pub fn at_recorded_addresses(
    m: &warmstart_snapshots::model::Manifest,
) -> Result<Vec<(u32, std::sync::Arc<OwnedFd>)>> {
    complete(&recorded_listeners(m), &[])
}

/// One listening socket for each of the snapshot's TCP listeners, in
/// [`recorded_listeners`] order, by `Fd::ofd`: the one `given` has for it (from
/// [`replacements`]), else a new one bound at its recorded address.
pub fn complete(
    recorded: &[RecordedListener],
    given: &[(u32, std::sync::Arc<OwnedFd>)],
) -> Result<Vec<(u32, std::sync::Arc<OwnedFd>)>> {
    recorded
        .iter()
        .map(|l| {
            if let Some((ofd, fd)) = given.iter().find(|(ofd, _)| *ofd == l.ofd) {
                return Ok((*ofd, fd.clone()));
            }
            let fd = new_listener(l, l.local)
                .with_context(|| format!("listening again on {} for the instance", l.local))?;
            Ok((l.ofd, std::sync::Arc::new(fd)))
        })
        .collect()
}

/// A listening socket at `to` with the options, backlog and status flags of the recorded
/// `l`.
fn new_listener(l: &RecordedListener, to: SocketAddr) -> Result<OwnedFd> {
    let family = if to.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = new_socket(family, libc::SOCK_STREAM, 0)?;
    let mut o = l.options.clone();
    o.v6only &= family == libc::AF_INET6;
    set_options(fd.as_fd(), &o)?;
    bind_addr(fd.as_fd(), family, &to)?;
    // SAFETY: a plain syscall on a socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), l.backlog as i32) } < 0 {
        return Err(errno_err(format!("listen on {to}")));
    }
    // The app's own status flags (O_NONBLOCK), on the open file description it gets.
    super::set_status_flags(fd.as_fd(), l.flags)?;
    Ok(fd)
}

/// The caller's systemd-style sockets: `LISTEN_FDS` fds from 3 when `LISTEN_PID` is this
/// process (`None` otherwise). Each must be a listening TCP socket. Made close-on-exec,
/// and the variables are removed (as `sd_listen_fds(1)` does).
pub fn systemd_listeners() -> Result<Option<Vec<OwnedFd>>> {
    let (Ok(pid), Ok(n)) = (std::env::var("LISTEN_PID"), std::env::var("LISTEN_FDS")) else {
        return Ok(None);
    };
    if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    let n: i32 = n
        .trim()
        .parse()
        .map_err(|_| anyhow!("LISTEN_FDS={n:?} is not a number"))?;
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    let mut out = Vec::new();
    for fd in 3..3 + n.max(0) {
        // SAFETY: fcntl on an integer fd; an fd that is not open fails with EBADF.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            bail!("LISTEN_FDS={n}, but fd {fd} is not open");
        }
        // SAFETY: LISTEN_FDS hands fds 3.. to this process: they are ours to own now.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let listening = getsockopt_int(&owned, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)
            .is_ok_and(|v| v == 1)
            && getsockopt_int(&owned, libc::SOL_SOCKET, libc::SO_TYPE)
                .is_ok_and(|t| t == libc::SOCK_STREAM)
            && getsockopt_int(&owned, libc::SOL_SOCKET, libc::SO_PROTOCOL)
                .is_ok_and(|p| p == libc::IPPROTO_TCP);
        if !listening {
            bail!("LISTEN_FDS={n}: fd {fd} is not a listening TCP socket");
        }
        // SAFETY: plain fcntl on an fd we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        out.push(owned);
    }
    Ok(Some(out))
}

fn parse_addr(s: &str) -> Result<SocketAddr> {
    s.parse()
        .map_err(|e| anyhow!("bad socket address {s:?} in the snapshot: {e}"))
}

pub fn restore(ins: &mut Installer, file: &FileDesc) -> Result<RawFd> {
    match file {
        FileDesc::Inet {
            family,
            sock_type,
            protocol,
            local,
            peer,
            listen,
            options,
            flags,
        } => {
            let fd = new_socket(*family, *sock_type, *protocol)?;
            if ins.parked && listen.is_some() && *sock_type == libc::SOCK_STREAM {
                // A parked instance holds an unbound placeholder: the listener (bound at
                // the recorded address or the run's --listen) arrives when it is handed
                // out (`crate::fds::late_places`), and the port stays free meanwhile.
                super::set_status_flags(fd.as_fd(), *flags)?;
                return ins.keep_high(fd);
            }
            set_options(fd.as_fd(), options)?;
            let local_addr = parse_addr(local)?;
            if local_addr.port() != 0 || !local_addr.ip().is_unspecified() {
                bind_addr(fd.as_fd(), *family, &local_addr)?;
            }
            if let Some(backlog) = listen {
                // SAFETY: integer arguments only, on the socket `fd` we own.
                if unsafe { libc::listen(fd.as_raw_fd(), *backlog as i32) } < 0 {
                    return Err(errno_err(format!("listen on {local}")));
                }
            }
            if let Some(peer) = peer {
                connect_addr(
                    fd.as_fd(),
                    &parse_addr(peer)?,
                    format!("connecting UDP socket {local} to {peer}"),
                )?;
            }
            super::set_status_flags(fd.as_fd(), *flags)?;
            ins.keep_high(fd)
        }
        FileDesc::TcpEnded {
            family,
            reset,
            flags,
        } => {
            let fd = ended_connection(*family, *reset).context("making an ended TCP connection")?;
            super::set_status_flags(fd.as_fd(), *flags)?;
            ins.keep_high(fd)
        }
        FileDesc::TcpClosed { family, flags, .. } => {
            let fd = ended_connection(*family, true).context("making a reset TCP connection")?;
            super::set_status_flags(fd.as_fd(), *flags)?;
            ins.keep_high(fd)
        }
        _ => unreachable!("inet::restore called for {file:?}"),
    }
}

fn set_options(fd: BorrowedFd<'_>, o: &SockOptions) -> Result<()> {
    set_flags(fd, o)?;
    for (level, name, v) in &o.more {
        // SAFETY: `v` is a live buffer of the length passed; the kernel only reads it.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                *level,
                *name,
                v.as_ptr().cast(),
                v.len() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(errno_err(format!(
                "setting socket option {} back",
                option_label(*level, *name)
            )));
        }
    }
    if o.v6only {
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1, "IPV6_V6ONLY")?;
    }
    if let Some(v) = o.rcvbuf {
        setsockopt_int(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (v / 2) as i32,
            "SO_RCVBUF",
        )?;
    }
    if let Some(v) = o.sndbuf {
        setsockopt_int(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (v / 2) as i32,
            "SO_SNDBUF",
        )?;
    }
    Ok(())
}

/// The on/off options a restored socket gets back (by [`set_options`], and by an
/// established TCP connection after its repair): `SO_REUSEADDR`, `SO_REUSEPORT`,
/// `SO_KEEPALIVE`, `TCP_NODELAY`.
pub(super) fn set_flags(fd: BorrowedFd<'_>, o: &SockOptions) -> Result<()> {
    let flag = |level, opt, on: bool, name| {
        if on {
            setsockopt_int(fd, level, opt, 1, name)
        } else {
            Ok(())
        }
    };
    flag(
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        o.reuseaddr,
        "SO_REUSEADDR",
    )?;
    flag(
        libc::SOL_SOCKET,
        libc::SO_REUSEPORT,
        o.reuseport,
        "SO_REUSEPORT",
    )?;
    flag(
        libc::SOL_SOCKET,
        libc::SO_KEEPALIVE,
        o.keepalive,
        "SO_KEEPALIVE",
    )?;
    flag(
        libc::IPPROTO_TCP,
        libc::TCP_NODELAY,
        o.nodelay,
        "TCP_NODELAY",
    )?;
    Ok(())
}

/// A TCP socket whose connection to a loopback listener of our own has ended: reset by
/// the peer (`reset`), or closed with FINs both ways, the socket left in state CLOSE.
fn ended_connection(family: i32, reset: bool) -> Result<OwnedFd> {
    let sock = || new_socket(family, libc::SOCK_STREAM, 0);
    let loopback = if family == libc::AF_INET6 {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0)
    } else {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)
    };
    let listener = sock()?;
    bind_addr(listener.as_fd(), family, &loopback)?;
    // SAFETY: integer arguments only, on the socket `listener` we own.
    if unsafe { libc::listen(listener.as_raw_fd(), 1) } < 0 {
        return Err(errno_err(format!("listening on {loopback}")));
    }
    let addr = sockname(&listener, false)?.ok_or_else(|| anyhow!("listener has no address"))?;
    let client = sock()?;
    connect_addr(client.as_fd(), &addr, format!("connecting to {addr}"))?;
    // SAFETY: null address pointers are allowed (the peer's address is not wanted).
    let accepted = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if accepted < 0 {
        return Err(errno_err("accept"));
    }
    // SAFETY: `accept4` succeeded: a new descriptor owned by nothing else.
    let accepted = unsafe { OwnedFd::from_raw_fd(accepted) };
    drop(listener);
    if !reset {
        // The peer closes (our end: CLOSE_WAIT), then our FIN (LAST_ACK); its ACK comes
        // over loopback at once and leaves our end in CLOSE, with no error pending.
        drop(accepted);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut shut = false;
        loop {
            let state = tcp_info(&client)?.state;
            if state == TCP_CLOSE {
                return Ok(client);
            }
            if !shut && state == TCP_CLOSE_WAIT {
                // SAFETY: a plain syscall on a socket we own.
                if unsafe { libc::shutdown(client.as_raw_fd(), libc::SHUT_WR) } < 0 {
                    return Err(errno_err("shutdown(SHUT_WR)"));
                }
                shut = true;
            }
            if std::time::Instant::now() > deadline {
                bail!("a loopback TCP connection did not close within 5 s (state {state})");
            }
            std::thread::yield_now();
        }
    }
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the option value points at `linger`, a live `libc::linger`, and the length
    // given is its size.
    if unsafe {
        libc::setsockopt(
            accepted.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    } < 0
    {
        return Err(errno_err("SO_LINGER"));
    }
    drop(accepted); // sends the RST
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_sockaddr() {
        for s in ["127.0.0.1:8731", "[::1]:80", "0.0.0.0:0", "[::]:443"] {
            let a: SocketAddr = s.parse().unwrap();
            let (ss, _) = to_storage(&a);
            assert_eq!(from_storage(&ss), Some(a));
        }
    }

    #[test]
    fn reset_connection_reads_econnreset() {
        let fd = ended_connection(libc::AF_INET, true).unwrap();
        let mut b = [0u8; 4];
        // SAFETY: `b` is a live 4-byte buffer and the length is 4.
        let n = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 4) };
        let e = std::io::Error::last_os_error();
        assert!(
            n == -1 && e.raw_os_error() == Some(libc::ECONNRESET),
            "read gave {n} ({e})"
        );
    }

    #[test]
    fn closed_connection_reads_eof_and_is_ended() {
        let fd = ended_connection(libc::AF_INET, false).unwrap();
        let info = tcp_info(&fd).unwrap();
        assert_eq!(info.state, TCP_CLOSE);
        assert!(info.rcv_mss > 0, "it counts as once established");
        assert!(!pending_error(&fd).unwrap());
        let mut b = [0u8; 4];
        // SAFETY: `b` is a live 4-byte buffer and the length is 4.
        let n = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 4) };
        assert_eq!(n, 0, "EOF: {}", std::io::Error::last_os_error());
        // SAFETY: `b` is a live buffer of at least 1 byte, which `send` only reads.
        let n = unsafe { libc::send(fd.as_raw_fd(), b.as_ptr().cast(), 1, libc::MSG_NOSIGNAL) };
        assert_eq!(
            (n, std::io::Error::last_os_error().raw_os_error()),
            (-1, Some(libc::EPIPE))
        );
        let reset = ended_connection(libc::AF_INET, true).unwrap();
        assert_eq!(tcp_info(&reset).unwrap().state, TCP_CLOSE);
        assert!(pending_error(&reset).unwrap());
    }
}
