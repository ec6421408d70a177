//! `TCP_REPAIR`: reading and writing the state of a TCP connection without the network
//! seeing it (Linux 3.5+, CAP_NET_ADMIN).
//!
//! In repair mode a socket sends nothing: data written goes to the queue chosen with
//! `TCP_REPAIR_QUEUE` as if it had been sent (send queue) or received (receive queue),
//! `recv(MSG_PEEK)` reads the chosen queue without consuming it, `connect` makes the
//! connection established at once (no SYN), `close` disconnects silently (no FIN, no
//! RST), and `TCP_QUEUE_SEQ` gets or (before `connect`) sets the sequence number at the
//! end of a queue. Turning repair mode on also sets `SK_FORCE_REUSE`, so the socket binds
//! to a port a listener holds. Segments that arrive meanwhile are still processed by the
//! kernel (queued and acknowledged): that is what the network lock ([`super::nft`]) is for.

use std::os::fd::{AsRawFd, BorrowedFd};

pub const TCP_REPAIR: i32 = 19;
pub const TCP_REPAIR_QUEUE: i32 = 20;
pub const TCP_QUEUE_SEQ: i32 = 21;
pub const TCP_REPAIR_OPTIONS: i32 = 22;
pub const TCP_TIMESTAMP: i32 = 24;
pub const TCP_REPAIR_WINDOW: i32 = 29;
pub const TCP_NO_QUEUE: i32 = 0;
pub const TCP_RECV_QUEUE: i32 = 1;
pub const TCP_SEND_QUEUE: i32 = 2;
/// Option codes of `TCP_REPAIR_OPTIONS` (the TCP header's option kinds).
pub const TCPOPT_MSS: u32 = 2;
pub const TCPOPT_WINDOW: u32 = 3;
pub const TCPOPT_SACK_PERM: u32 = 4;
pub const TCPOPT_TIMESTAMP: u32 = 8;
const SIOCINQ: libc::c_ulong = 0x541B;
const SIOCOUTQ: libc::c_ulong = 0x5411;
const SIOCOUTQNSD: libc::c_ulong = 0x894B;

fn err(what: &str) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn set_raw(fd: BorrowedFd, opt: i32, val: &[u8], what: &str) -> std::io::Result<()> {
    // SAFETY: the value pointer and length describe `val`, a live buffer the kernel only
    // reads.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            opt,
            val.as_ptr().cast(),
            val.len() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(err(what));
    }
    Ok(())
}

fn get_raw<const N: usize>(fd: BorrowedFd, opt: i32, what: &str) -> std::io::Result<[u8; N]> {
    let mut v = [0u8; N];
    let mut len = N as libc::socklen_t;
    // SAFETY: `v` is a live N-byte buffer and `len` says so; the kernel writes at most
    // `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            opt,
            v.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(err(what));
    }
    Ok(v)
}

fn set_int(fd: BorrowedFd, opt: i32, v: i32, what: &str) -> std::io::Result<()> {
    set_raw(fd, opt, &v.to_ne_bytes(), what)
}

fn get_u32(fd: BorrowedFd, opt: i32, what: &str) -> std::io::Result<u32> {
    get_raw::<4>(fd, opt, what).map(u32::from_ne_bytes)
}

/// Turns repair mode on or off.
pub fn set_repair(fd: BorrowedFd, on: bool) -> std::io::Result<()> {
    set_int(fd, TCP_REPAIR, on as i32, "setsockopt(TCP_REPAIR)")
}

/// Chooses the queue (`TCP_RECV_QUEUE`, `TCP_SEND_QUEUE`) that reads, writes and
/// `TCP_QUEUE_SEQ` act on.
pub fn set_queue(fd: BorrowedFd, queue: i32) -> std::io::Result<()> {
    set_int(fd, TCP_REPAIR_QUEUE, queue, "setsockopt(TCP_REPAIR_QUEUE)")
}

/// The sequence number at the end of the chosen queue (`rcv_nxt` or `write_seq`).
pub fn queue_seq(fd: BorrowedFd) -> std::io::Result<u32> {
    get_u32(fd, TCP_QUEUE_SEQ, "getsockopt(TCP_QUEUE_SEQ)")
}

/// Sets the sequence number where the chosen queue starts (socket not connected yet).
pub fn set_queue_seq(fd: BorrowedFd, seq: u32) -> std::io::Result<()> {
    set_int(fd, TCP_QUEUE_SEQ, seq as i32, "setsockopt(TCP_QUEUE_SEQ)")
}

/// `struct tcp_repair_window`: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup.
pub fn window(fd: BorrowedFd) -> std::io::Result<[u32; 5]> {
    let b = get_raw::<20>(fd, TCP_REPAIR_WINDOW, "getsockopt(TCP_REPAIR_WINDOW)")?;
    Ok(std::array::from_fn(|i| {
        u32::from_ne_bytes(b[i * 4..i * 4 + 4].try_into().unwrap())
    }))
}

pub fn set_window(fd: BorrowedFd, w: &[u32; 5]) -> std::io::Result<()> {
    let b: Vec<u8> = w.iter().flat_map(|v| v.to_ne_bytes()).collect();
    set_raw(fd, TCP_REPAIR_WINDOW, &b, "setsockopt(TCP_REPAIR_WINDOW)")
}

/// Sets the negotiated options: (`TCPOPT_*` code, value) pairs.
pub fn set_options(fd: BorrowedFd, opts: &[(u32, u32)]) -> std::io::Result<()> {
    let b: Vec<u8> = opts
        .iter()
        .flat_map(|(c, v)| c.to_ne_bytes().into_iter().chain(v.to_ne_bytes()))
        .collect();
    set_raw(fd, TCP_REPAIR_OPTIONS, &b, "setsockopt(TCP_REPAIR_OPTIONS)")
}

/// The connection's current timestamp clock (`TCP_TIMESTAMP`: now plus its offset).
pub fn timestamp(fd: BorrowedFd) -> std::io::Result<u32> {
    get_u32(fd, TCP_TIMESTAMP, "getsockopt(TCP_TIMESTAMP)")
}

/// Makes the timestamp clock read `ts` now (sets the offset).
pub fn set_timestamp(fd: BorrowedFd, ts: u32) -> std::io::Result<()> {
    set_int(fd, TCP_TIMESTAMP, ts as i32, "setsockopt(TCP_TIMESTAMP)")
}

/// `TCP_MAXSEG`: the MSS clamp.
pub fn maxseg(fd: BorrowedFd) -> std::io::Result<u32> {
    get_u32(fd, libc::TCP_MAXSEG, "getsockopt(TCP_MAXSEG)")
}

fn ioctl_int(fd: BorrowedFd, req: libc::c_ulong, what: &str) -> std::io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: these socket ioctls write one `int` through the pointer, to `v`, a live local.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut v) } < 0 {
        return Err(err(what));
    }
    Ok(v as u32)
}

/// Bytes in the receive queue (`SIOCINQ`).
pub fn inq(fd: BorrowedFd) -> std::io::Result<u32> {
    ioctl_int(fd, SIOCINQ, "ioctl(SIOCINQ)")
}

/// Bytes in the send queue, sent or not (`SIOCOUTQ`).
pub fn outq(fd: BorrowedFd) -> std::io::Result<u32> {
    ioctl_int(fd, SIOCOUTQ, "ioctl(SIOCOUTQ)")
}

/// Bytes in the send queue not sent yet (`SIOCOUTQNSD`).
pub fn outq_unsent(fd: BorrowedFd) -> std::io::Result<u32> {
    ioctl_int(fd, SIOCOUTQNSD, "ioctl(SIOCOUTQNSD)")
}

/// Reads `len` bytes of the chosen queue without consuming them (repair mode).
pub fn peek(fd: BorrowedFd, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    if len == 0 {
        return Ok(buf);
    }
    // SAFETY: the pointer and length describe `buf`, a live writable buffer; `recv`
    // writes at most `len` bytes.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            len,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(err("recv(MSG_PEEK) of a repair queue"));
    }
    if n as usize != len {
        return Err(std::io::Error::other(format!(
            "recv(MSG_PEEK) of a repair queue gave {n} of its {len} bytes"
        )));
    }
    Ok(buf)
}

/// Writes all of `data` into the chosen queue (repair mode) or, out of repair mode, as
/// ordinary data; a chunk too big for one buffer is halved and tried again. Never
/// blocks: a queue that does not fit the socket's buffer is an error.
pub fn fill(fd: BorrowedFd, data: &[u8]) -> std::io::Result<()> {
    let mut off = 0;
    let mut chunk = data.len().max(1);
    while off < data.len() {
        let n = chunk.min(data.len() - off);
        // SAFETY: the pointer and length describe a live part of `data`, which `send`
        // only reads.
        let r = unsafe {
            libc::send(
                fd.as_raw_fd(),
                data[off..].as_ptr().cast(),
                n,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            let full = matches!(e.raw_os_error(), Some(libc::ENOMEM) | Some(libc::EAGAIN));
            if full && chunk > 1024 {
                chunk /= 2;
                continue;
            }
            return Err(std::io::Error::new(
                e.kind(),
                format!("writing {} bytes into a TCP queue: {e}", data.len()),
            ));
        }
        off += r as usize;
    }
    Ok(())
}
