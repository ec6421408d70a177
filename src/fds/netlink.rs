//! Netlink sockets without multicast groups: the protocol and the bound port id
//! (`getsockname` on a copy; 0 when never bound). At restore the same port id is asked
//! for; when it is taken (another instance of the snapshot: an autobound port id is the
//! pid, and every instance has the same pid in its own namespace) the kernel picks one,
//! which is what an autobind does anyway. Messages queued on the socket are not kept:
//! the answer to a request in flight at dump time is lost.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::Result;
use warmstart_snapshots::model::FileDesc;

use super::{errno_err, getsockopt_int, Installer, Target};

pub fn dump(t: &Target, copy: &OwnedFd) -> Result<FileDesc> {
    let protocol = getsockopt_int(copy, libc::SOL_SOCKET, libc::SO_PROTOCOL)?;
    // SAFETY: `sockaddr_nl` is a plain C struct; all-zero bytes are valid.
    let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    // SAFETY: the address pointer is `sa`, a live `sockaddr_nl`, and `len` is its size, so
    // the kernel writes at most that many bytes.
    if unsafe {
        libc::getsockname(
            copy.as_raw_fd(),
            (&mut sa as *mut libc::sockaddr_nl).cast(),
            &mut len,
        )
    } < 0
    {
        return Err(errno_err(format!("getsockname of {}", t.context())));
    }
    if sa.nl_groups != 0 {
        return Err(t.refuse(format_args!(
            "a netlink socket (protocol {protocol}) subscribed to multicast groups {:#x}",
            sa.nl_groups
        )));
    }
    Ok(FileDesc::Netlink {
        protocol,
        port: sa.nl_pid,
        flags: t.flags(),
    })
}

pub fn restore(ins: &mut Installer, protocol: i32, port: u32, flags: i32) -> Result<RawFd> {
    // SAFETY: integer arguments only; the fd returned is owned
    // right below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(errno_err(format!(
            "socket(AF_NETLINK, protocol {protocol})"
        )));
    }
    // SAFETY: the call above succeeded: a new descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if port != 0 {
        let bind = |pid: u32| {
            // SAFETY: `sockaddr_nl` is a plain C struct; all-zero bytes are valid.
            let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            sa.nl_pid = pid;
            // SAFETY: the address is `sa`, a live `sockaddr_nl`, with its exact size; `fd`
            // is ours.
            unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sa as *const libc::sockaddr_nl).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            }
        };
        if bind(port) < 0 && bind(0) < 0 {
            return Err(errno_err(format!("binding a netlink socket (port {port})")));
        }
    }
    super::set_status_flags(fd.as_fd(), flags)?;
    ins.keep_high(fd)
}
