//! Messages with fds attached (`SCM_RIGHTS`) on unix sockets.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Most fds one message carries here (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

/// Room for one `SCM_RIGHTS` header with [`MAX_FDS`] fds (`CMSG_SPACE`), in u64s for the
/// alignment a `cmsghdr` needs.
const CONTROL_WORDS: usize = (16 + 4 * MAX_FDS).div_ceil(8);

/// A connected pair of `SOCK_SEQPACKET` sockets (messages kept whole, close-on-exec).
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    unix_pair(libc::SOCK_SEQPACKET)
}

/// A connected pair of close-on-exec unix sockets of type `ty`.
pub fn unix_pair(ty: i32) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut sv = [0; 2];
    // SAFETY: `sv` is a live [c_int; 2], exactly the two fds socketpair writes.
    if unsafe { libc::socketpair(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC, 0, sv.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded, so sv holds two fresh descriptors that nothing else
    // owns; each is wrapped exactly once.
    Ok(unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) })
}

/// Sends `bytes` (at least one) with `fds` attached, as one message.
pub fn send(sock: BorrowedFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    assert!(!bytes.is_empty() && fds.len() <= MAX_FDS);
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let mut control = [0u64; CONTROL_WORDS];
    // SAFETY: msghdr is a plain C struct of pointers and integers; all-zero (null
    // pointers, zero lengths) is a valid value, and the fields used are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let data_len = std::mem::size_of_val(fds) as u32;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is arithmetic on its integer argument.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(data_len) } as usize;
        // `msg_control` points at `control`, 8 * CONTROL_WORDS bytes aligned for u64
        // (enough for cmsghdr), and msg_controllen = CMSG_SPACE(4 * fds.len()) fits in it
        // since fds.len() <= MAX_FDS (asserted above), so CMSG_FIRSTHDR returns a non-null
        // header inside `control` whose data area has room for all of `fds`. `fds` and
        // `control` do not overlap.
        // SAFETY: the header and its data lie inside `control`, which has room for `fds`.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(data_len) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
        }
    }
    loop {
        // SAFETY: `msg` points at `iov` (over `bytes`, only read) and, when fds are sent,
        // at `control`, all live locals that outlive the call; sendmsg only reads them.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives one message into `buf`: its length (0 at end of stream) and the fds it
/// carried (close-on-exec).
pub fn recv(sock: BorrowedFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; CONTROL_WORDS];
    // SAFETY: msghdr is a plain C struct of pointers and integers; all-zero (null
    // pointers, zero lengths) is a valid value, and the fields used are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    let n = loop {
        // SAFETY: `msg` points at `iov` (over `buf`, exclusively borrowed, writable for
        // buf.len() bytes) and at `control` (writable for msg_controllen bytes); all are
        // live locals, and the kernel writes within those lengths and into `msg` itself.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // `recvmsg` set msg_controllen to the bytes of `control` it filled, so
    // CMSG_FIRSTHDR/CMSG_NXTHDR yield only headers inside `control` (or null). For an
    // SCM_RIGHTS header, cmsg_len covers (cmsg_len - CMSG_LEN(0)) / 4 fds after the header
    // (read unaligned to be safe); the kernel installed each of them in our fd table just
    // now, so each is a fresh descriptor owned by nobody else and wrapped exactly once.
    // SAFETY: only headers inside the filled `control`; each fd is fresh and wrapped once.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let count = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "message or its fds truncated",
        ));
    }
    Ok((n, fds))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    #[test]
    fn passes_fds_with_a_message() {
        let (a, b) = super::seqpacket_pair().unwrap();
        let (r, w) = crate::sys::remote::pipe().unwrap();
        super::send(a.as_fd(), b"hi", &[r.as_raw_fd(), w.as_raw_fd()]).unwrap();
        let mut buf = [0u8; 16];
        let (n, fds) = super::recv(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hi");
        assert_eq!(fds.len(), 2);
        let mut f = std::fs::File::from(fds.into_iter().nth(1).unwrap());
        std::io::Write::write_all(&mut f, b"x").unwrap();
        let mut got = [0u8; 1];
        std::io::Read::read_exact(&mut std::fs::File::from(r), &mut got).unwrap();
        assert_eq!(&got, b"x");
        drop(a);
        assert_eq!(super::recv(b.as_fd(), &mut buf).unwrap().0, 0);
    }
    use std::os::fd::AsRawFd;
}
