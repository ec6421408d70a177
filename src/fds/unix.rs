//! Unix sockets.
//!
//! * **Connected pairs** with both ends in the process (`socketpair`, or a connection the
//!   process made to itself): one shared object (`Manifest::unix_pairs`) with the messages
//!   queued for each end. The queue is read without consuming it: `SO_PEEK_OFF` set to 0
//!   on a copy of the fd makes each `recv(MSG_PEEK)` return the *next* message (or bytes)
//!   instead of the first again; the socket's own peek offset is put back afterwards.
//!   Restored with `socketpair` and refilled by sending each end's queue from the other.
//!   Queued control messages (passed fds, credentials) are refused. Each end's shutdown
//!   state (`SHUT_RD`/`SHUT_WR`, from `sock_diag`) is applied once the queues are in.
//! * **Unconnected** sockets: listening (with the backlog, which `sock_diag` reports for
//!   listeners), bound to a path or an abstract name, or unnamed. At restore a stale
//!   socket file at the path is unlinked (only if it is a socket), then bind and listen.
//!   A relative path is made absolute with the process's cwd at dump.
//! * A stream socket **whose peer has closed** (the JVM keeps one to `dup2` over fds it
//!   closes asynchronously): a pair object with only end 0 in use, restored by closing
//!   end 1 once what end 0 still has to read is in.
//! * A socket **connected to a peer outside the process** is refused, naming the fd.
//!
//! The peer of a socket (by inode) is only known to `sock_diag` ([`super::sock_diag`]).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use anyhow::{anyhow, bail, Result};
use warmstart_snapshots::model::{FileDesc, UnixAddr, UnixPairObject};

use super::sock_diag::{self, UnixDiag};
use super::{errno_err, getsockopt_int, setsockopt_int, Installer, Target};

const TCP_ESTABLISHED: u8 = 1;
const TCP_LISTEN: u8 = 10;
/// `sk_shutdown` of a stream socket whose peer has closed.
const SHUTDOWN_BOTH: u8 = 3;

/// One end of a connected pair seen so far.
struct End {
    fd: i32,
    peer: u32,
    sock_type: i32,
    queued: Vec<Vec<u8>>,
    shutdown: u8,
}

/// Connected ends met while collecting; paired up by [`Collector::finish`].
#[derive(Default)]
pub struct Collector {
    diag: Option<HashMap<u32, UnixDiag>>,
    ends: HashMap<u32, End>,
    /// Sockets whose peer has closed: pairs of which only end 0 is used.
    lone: Vec<UnixPairObject>,
}

impl Collector {
    fn diag(&mut self, ino: u32) -> Result<UnixDiag> {
        if self.diag.is_none() {
            self.diag = Some(sock_diag::unix_sockets()?);
        }
        Ok(self
            .diag
            .as_ref()
            .and_then(|d| d.get(&ino).copied())
            .unwrap_or_default())
    }

    /// The pair objects; refuses an end whose peer is not in the process.
    pub fn finish(self, pid: i32, comm: &str) -> Result<Vec<UnixPairObject>> {
        let mut pairs = Vec::new();
        for (&ino, end) in &self.ends {
            let Some(peer) = self.ends.get(&end.peer) else {
                bail!(
                    "process {pid} ({comm}): fd {} is a unix socket connected to a peer \
                     outside the process (socket inode {}), which warmstart cannot \
                     checkpoint yet",
                    end.fd,
                    end.peer
                );
            };
            if peer.peer != ino {
                bail!(
                    "process {pid} ({comm}): fd {} is a unix socket connected to fd {}, \
                     which is connected elsewhere (a datagram socket connect()ed one way), \
                     which warmstart cannot checkpoint yet",
                    end.fd,
                    peer.fd
                );
            }
            if ino < end.peer {
                pairs.push(UnixPairObject {
                    id: ino as u64,
                    sock_type: end.sock_type,
                    queued: [end.queued.clone(), peer.queued.clone()],
                    shutdown: [end.shutdown, peer.shutdown],
                });
            }
        }
        pairs.extend(self.lone);
        pairs.sort_by_key(|p| p.id);
        Ok(pairs)
    }
}

pub fn dump(
    t: &Target,
    meta: &std::fs::Metadata,
    copy: &OwnedFd,
    c: &mut Collector,
) -> Result<FileDesc> {
    let ino = meta.ino() as u32;
    let sock_type = getsockopt_int(copy, libc::SOL_SOCKET, libc::SO_TYPE)?;
    let d = c.diag(ino)?;
    let flags = t.flags();
    let stream = sock_type == libc::SOCK_STREAM || sock_type == libc::SOCK_SEQPACKET;
    if d.peer == 0 && d.state == TCP_ESTABLISHED && stream && d.shutdown == SHUTDOWN_BOTH {
        if c.lone.iter().any(|o| o.id == ino as u64) || c.ends.contains_key(&ino) {
            bail!("{}: a second open of a unix socket", t.context());
        }
        let queued = queue_of(t, copy, sock_type)?;
        c.lone.push(UnixPairObject {
            id: ino as u64,
            sock_type,
            queued: [queued, Vec::new()],
            shutdown: [d.shutdown, 0],
        });
        return Ok(FileDesc::UnixPair {
            pair: ino as u64,
            end: 0,
            flags,
        });
    }
    if d.peer == 0 && d.state == TCP_ESTABLISHED {
        // Connected, but the peer has no inode: a connection not accepted yet on a
        // listener (of another process: ours would be refused for it) or a peer closed.
        return Err(t.refuse(
            "a unix socket connected to a peer outside the process (or to one that has \
             closed, or that was not accepted yet)",
        ));
    }
    if d.peer != 0 {
        if c.ends.contains_key(&ino) {
            // Another fd of the same socket is a dup; its ofd makes it share.
            bail!("{}: a second open of a unix socket", t.context());
        }
        let queued = queue_of(t, copy, sock_type)?;
        c.ends.insert(
            ino,
            End {
                fd: t.fd,
                peer: d.peer,
                sock_type,
                queued,
                shutdown: d.shutdown,
            },
        );
        let id = ino.min(d.peer) as u64;
        return Ok(FileDesc::UnixPair {
            pair: id,
            end: (ino > d.peer) as u8,
            flags,
        });
    }
    let listen = if d.state == TCP_LISTEN {
        if d.rqueue > 0 {
            return Err(t.refuse(format_args!(
                "a listening unix socket with {} connections not accepted yet",
                d.rqueue
            )));
        }
        Some(if d.wqueue > 0 {
            d.wqueue
        } else {
            libc::SOMAXCONN as u32
        })
    } else {
        None
    };
    let mut addr = local_addr(copy)?;
    if let UnixAddr::Path(p) = &addr {
        if !p.starts_with('/') {
            let cwd = std::fs::read_link(format!("/proc/{}/cwd", t.pid))?;
            addr = UnixAddr::Path(cwd.join(p).to_string_lossy().into_owned());
        }
    }
    Ok(FileDesc::Unix {
        sock_type,
        addr,
        listen,
        flags,
    })
}

/// What the socket has queued to read, or a refusal naming the fd.
fn queue_of(t: &Target, copy: &OwnedFd, sock_type: i32) -> Result<Vec<Vec<u8>>> {
    peek_queue(copy, sock_type).map_err(|e| match e {
        PeekError::Control => t.refuse("a unix socket with queued file descriptors or credentials"),
        PeekError::Io(e) => e.context(t.context()),
    })
}

fn local_addr(fd: &OwnedFd) -> Result<UnixAddr> {
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    if unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&mut sa as *mut libc::sockaddr_un).cast(),
            &mut len,
        )
    } < 0
    {
        return Err(errno_err("getsockname of a unix socket"));
    }
    let n = (len as usize).saturating_sub(std::mem::size_of::<libc::sa_family_t>());
    let path: Vec<u8> = sa.sun_path[..n.min(sa.sun_path.len())]
        .iter()
        .map(|&c| c as u8)
        .collect();
    Ok(match path.first() {
        None => UnixAddr::Unnamed,
        Some(0) => UnixAddr::Abstract(path[1..].to_vec()),
        Some(_) => {
            let end = path.iter().position(|&c| c == 0).unwrap_or(path.len());
            UnixAddr::Path(String::from_utf8_lossy(&path[..end]).into_owned())
        }
    })
}

enum PeekError {
    Control,
    Io(anyhow::Error),
}

/// The messages queued for `fd` to read (stream: one element with all the bytes).
fn peek_queue(fd: &OwnedFd, sock_type: i32) -> Result<Vec<Vec<u8>>, PeekError> {
    let io = |e: anyhow::Error| PeekError::Io(e);
    let raw = fd.as_raw_fd();
    let orig = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF)
        .map_err(|e| io(anyhow!("SO_PEEK_OFF: {e}")))?;
    setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_PEEK_OFF, 0, "SO_PEEK_OFF").map_err(io)?;
    let res = (|| {
        let mut msgs: Vec<Vec<u8>> = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
            mh.msg_iov = &mut iov;
            mh.msg_iovlen = 1;
            let n = unsafe { libc::recvmsg(raw, &mut mh, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EAGAIN) {
                    break;
                }
                return Err(io(anyhow!("peeking a unix socket's queue: {e}")));
            }
            if mh.msg_flags & libc::MSG_CTRUNC != 0 {
                return Err(PeekError::Control);
            }
            if mh.msg_flags & libc::MSG_TRUNC != 0 {
                return Err(io(anyhow!("a queued datagram is larger than 1 MiB")));
            }
            if n == 0 {
                // End of stream (the peer shut down); empty datagrams are not kept.
                break;
            }
            let data = &buf[..n as usize];
            match (sock_type, msgs.last_mut()) {
                (libc::SOCK_STREAM, Some(all)) => all.extend_from_slice(data),
                _ => msgs.push(data.to_vec()),
            }
        }
        Ok(msgs)
    })();
    let _ = setsockopt_int(
        raw,
        libc::SOL_SOCKET,
        libc::SO_PEEK_OFF,
        orig,
        "SO_PEEK_OFF",
    );
    res
}

pub fn restore_pair(ins: &mut Installer, id: u64, end: u8, flags: i32) -> Result<RawFd> {
    let ends = match ins.unix_pairs.get(&id) {
        Some(&ends) => ends,
        None => {
            let obj = ins.m.unix_pairs.iter().find(|o| o.id == id).ok_or_else(|| {
                anyhow!("snapshot names unix socket pair {id} but does not contain it (corrupt manifest?)")
            })?;
            let mut fds = [0; 2];
            if unsafe {
                libc::socketpair(
                    libc::AF_UNIX,
                    obj.sock_type | libc::SOCK_CLOEXEC,
                    0,
                    fds.as_mut_ptr(),
                )
            } < 0
            {
                return Err(errno_err("socketpair"));
            }
            let ends = (ins.keep_high(fds[0])?, ins.keep_high(fds[1])?);
            // What end 0 had to read is sent from end 1, and the other way round.
            for (reader, writer) in [(0, ends.1), (1, ends.0)] {
                for msg in &obj.queued[reader] {
                    refill(writer, msg)?;
                }
            }
            // Then each end's own shutdown state (a stream end's shutdown also marks its
            // peer, which was marked the same at dump).
            for (i, fd) in [ends.0, ends.1].into_iter().enumerate() {
                let how = match obj.shutdown[i] & 3 {
                    0 => continue,
                    1 => libc::SHUT_RD,
                    2 => libc::SHUT_WR,
                    _ => libc::SHUT_RDWR,
                };
                if unsafe { libc::shutdown(fd, how) } < 0 {
                    return Err(errno_err(format!(
                        "shutdown of end {i} of unix socket pair {id}"
                    )));
                }
            }
            ins.unix_pairs.insert(id, ends);
            ends
        }
    };
    let fd = if end == 0 { ends.0 } else { ends.1 };
    super::set_status_flags(fd, flags)?;
    Ok(fd)
}

fn refill(fd: RawFd, msg: &[u8]) -> Result<()> {
    let mut done = 0;
    while done < msg.len() || msg.is_empty() {
        let n = unsafe {
            libc::send(
                fd,
                msg[done..].as_ptr().cast(),
                msg.len() - done,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(errno_err(format!(
                "refilling {} queued bytes into a unix socket pair (more than its buffer holds?)",
                msg.len()
            )));
        }
        done += n as usize;
        if msg.is_empty() {
            break;
        }
    }
    Ok(())
}

pub fn restore(ins: &mut Installer, file: &FileDesc) -> Result<RawFd> {
    let FileDesc::Unix {
        sock_type,
        addr,
        listen,
        flags,
    } = file
    else {
        unreachable!("unix::restore called for {file:?}")
    };
    let fd = unsafe { libc::socket(libc::AF_UNIX, sock_type | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(errno_err("socket(AF_UNIX)"));
    }
    let fd = ins.keep_high(fd)?;
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let (bytes, shown): (Vec<u8>, String) = match addr {
        UnixAddr::Unnamed => (Vec::new(), String::new()),
        UnixAddr::Path(p) => {
            if let Ok(m) = std::fs::symlink_metadata(p) {
                if m.file_type().is_socket() {
                    // A stale socket file (the dumped process's): binding needs the name.
                    let _ = std::fs::remove_file(p);
                }
            }
            (p.as_bytes().to_vec(), p.clone())
        }
        UnixAddr::Abstract(name) => {
            let mut b = vec![0u8];
            b.extend_from_slice(name);
            (b, format!("@{}", String::from_utf8_lossy(name)))
        }
    };
    if !bytes.is_empty() {
        if bytes.len() > sa.sun_path.len() {
            bail!("unix socket name {shown} is too long");
        }
        for (d, s) in sa.sun_path.iter_mut().zip(&bytes) {
            *d = *s as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len();
        if unsafe {
            libc::bind(
                fd,
                (&sa as *const libc::sockaddr_un).cast(),
                len as libc::socklen_t,
            )
        } < 0
        {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EADDRINUSE) {
                bail!("unix socket {shown} is in use");
            }
            bail!("binding a unix socket to {shown}: {e}");
        }
    }
    if let Some(backlog) = listen {
        if unsafe { libc::listen(fd, *backlog as i32) } < 0 {
            return Err(errno_err(format!("listen on unix socket {shown}")));
        }
    }
    super::set_status_flags(fd, *flags)?;
    Ok(fd)
}
