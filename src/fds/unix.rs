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
//! * A **listening** stream or seqpacket socket **with connections not accepted yet**:
//!   `sock_diag` lists the client end of each (`UNIX_DIAG_ICONS`, in accept order). Each
//!   connection is recorded (`Manifest::unix_queues`) with its client end, which must be
//!   a socket of the tree (`FileDesc::UnixQueued`) or closed, the client's shutdown state,
//!   and what the client sent that the server side has not read. That data sits in the
//!   server-side socket, which no fd reaches until `accept`: when a client has sent any
//!   (`sock_diag` shows its send queue) or has closed, the dump accepts the listener's
//!   queued connections from its copy of the listener and peeks them. That takes them
//!   from the app, so it is done only when the tree is killed after the dump (as the last
//!   step of the fd collection); with `--leave-running`/`--leave-stopped` such a queue is
//!   refused by name. Queues without data are read without touching them. What can only
//!   be seen once taken (passed fds in the data) is refused then, and a dump that fails
//!   after this step (the final checks, the commit) leaves the tree without those
//!   connections: the refusal says so. The restore
//!   (in the root, before it forks) creates the listener, then for each connection in
//!   order a client socket that connects to it, sends the data and shuts down as the
//!   client had; a client that had closed is closed again. Known gap: `SO_PEERCRED` of
//!   such a connection names the restoring root process, not the client.
//! * A socket **connected to a peer outside the process** is refused, naming the fd.
//!
//! The peer of a socket (by inode) is only known to `sock_diag` ([`super::sock_diag`]).

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

use anyhow::{anyhow, bail, Context, Result};
use warmstart_snapshots::model::{FileDesc, UnixAddr, UnixPairObject, UnixQueue, UnixQueuedConn};

use super::sock_diag::{self, UnixDiag};
use super::{errno_err, getsockopt_int, setsockopt_int, Installer, Target};

const TCP_ESTABLISHED: u8 = 1;
const TCP_LISTEN: u8 = 10;
/// `sk_shutdown` of a stream socket whose peer has closed.
const SHUTDOWN_BOTH: u8 = 3;
/// `SO_PASSPIDFD` (Linux 6.5), not in every libc.
const SO_PASSPIDFD: i32 = 76;

/// One end of a connected pair seen so far.
struct End {
    fd: i32,
    peer: u32,
    sock_type: i32,
    queued: Vec<Vec<u8>>,
    shutdown: u8,
}

/// A listening socket with connections waiting to be accepted.
struct Listener {
    pid: i32,
    /// `pid` in the tree's pid namespace, as the manifest names the process.
    pid_in_ns: i32,
    comm: String,
    fd: i32,
    ino: u32,
    sock_type: i32,
    /// Client ends of the waiting connections, in accept order (0: closed).
    icons: Vec<u32>,
    /// A copy of the listener (the same socket as the app's).
    copy: OwnedFd,
    /// The tree is killed after the dump: the connections may be accepted to read them.
    take: bool,
}

/// The client end of a connection waiting in a listener's queue, held by the tree.
struct QueuedClient {
    pid: i32,
    comm: String,
    fd: i32,
    addr: UnixAddr,
    shutdown: u8,
    /// Bytes (`sk_wmem_alloc`) it sent that the server side has not read.
    unsent: u32,
}

/// Connected ends met while collecting; paired up by [`Collector::finish`].
#[derive(Default)]
pub struct Collector {
    diag: Option<HashMap<u32, UnixDiag>>,
    ends: HashMap<u32, End>,
    /// Sockets whose peer has closed: pairs of which only end 0 is used.
    lone: Vec<UnixPairObject>,
    listeners: Vec<Listener>,
    clients: HashMap<u32, QueuedClient>,
}

impl Collector {
    fn diags(&mut self) -> Result<&HashMap<u32, UnixDiag>> {
        if self.diag.is_none() {
            self.diag = Some(sock_diag::unix_sockets()?);
        }
        Ok(self.diag.as_ref().expect("filled above"))
    }

    fn diag(&mut self, ino: u32) -> Result<UnixDiag> {
        Ok(self.diags()?.get(&ino).cloned().unwrap_or_default())
    }

    /// The listener whose accept queue holds the connection of client end `ino`.
    fn listener_of(&mut self, ino: u32) -> Result<Option<u32>> {
        Ok(self
            .diags()?
            .iter()
            .find(|(_, d)| d.state == TCP_LISTEN && d.icons.contains(&ino))
            .map(|(&l, _)| l))
    }

    /// The pair objects and the listeners' queues; refuses an end whose peer is not in
    /// the process, a queued connection from outside the tree.
    pub fn finish(mut self, pid: i32, comm: &str) -> Result<(Vec<UnixPairObject>, Vec<UnixQueue>)> {
        let pairs = self.pairs(pid, comm)?;
        let mut listeners = std::mem::take(&mut self.listeners);
        listeners.sort_by_key(|l| l.ino);
        let mut outside: Vec<(&u32, &QueuedClient)> = self
            .clients
            .iter()
            .filter(|(ino, _)| !listeners.iter().any(|l| l.icons.contains(ino)))
            .collect();
        outside.sort_by_key(|(ino, _)| **ino);
        if let Some((ino, c)) = outside.first() {
            let listener = self
                .diag
                .as_ref()
                .and_then(|d| {
                    d.iter()
                        .find(|(_, d)| d.icons.contains(ino))
                        .map(|(&l, _)| l)
                })
                .unwrap_or(0);
            bail!(
                "process {} ({}): fd {} is a unix socket connected to a peer outside the \
                 process tree: a listener (socket inode {listener}{}) that has not accepted \
                 the connection yet, which warmstart cannot checkpoint yet",
                c.pid,
                c.comm,
                c.fd,
                held_by(listener)
            );
        }
        // Every refusal first: taking connections is the last thing done.
        let mut plans = Vec::new();
        for l in &listeners {
            plans.push(self.plan(l)?);
        }
        let mut queues = Vec::new();
        for (l, (mut conns, read)) in listeners.iter().zip(plans) {
            if read {
                take_queue(l, &self.clients, &mut conns).map_err(|e| {
                    anyhow!(
                        "{e:#} (to read them, the dump has accepted the connections that \
                         waited on fd {} of process {} ({}): the process no longer has them)",
                        l.fd,
                        l.pid,
                        l.comm
                    )
                })?;
            }
            queues.push(UnixQueue {
                pid: l.pid_in_ns,
                fd: l.fd,
                conns,
            });
        }
        Ok((pairs, queues))
    }

    /// The connections waiting on `l` (without their data), and whether their data must
    /// be read (by accepting them); refuses what cannot be restored exactly.
    fn plan(&self, l: &Listener) -> Result<(Vec<UnixQueuedConn>, bool)> {
        let what = format!(
            "process {} ({}): fd {} is a listening unix socket",
            l.pid, l.comm, l.fd
        );
        let mut conns = Vec::new();
        let mut read = None;
        for (i, &icon) in l.icons.iter().enumerate() {
            let n = i + 1;
            if icon == 0 {
                read.get_or_insert_with(|| {
                    format!(
                        "connection {n} (whose client has closed its end: what it sent is unknown)"
                    )
                });
                conns.push(UnixQueuedConn {
                    id: 0,
                    addr: UnixAddr::Unnamed,
                    queued: Vec::new(),
                    shutdown: 0,
                });
                continue;
            }
            let Some(c) = self.clients.get(&icon) else {
                let by = held_by(icon);
                bail!(
                    "{what} whose connection {n} not accepted yet comes from a socket outside \
                     the process tree (socket inode {icon}{by}), which warmstart cannot \
                     checkpoint yet"
                );
            };
            if c.unsent > 0 {
                read.get_or_insert_with(|| {
                    format!(
                        "connection {n} (from fd {} of process {} ({}), which sent data that \
                         is not read yet)",
                        c.fd, c.pid, c.comm
                    )
                });
            }
            conns.push(UnixQueuedConn {
                id: icon as u64,
                addr: c.addr.clone(),
                queued: Vec::new(),
                shutdown: c.shutdown,
            });
        }
        if let (Some(why), false) = (&read, l.take) {
            bail!(
                "{what} with {} connections not accepted yet, among them {why}: that data can \
                 only be read by accepting the connections, which takes them from the app, so \
                 it cannot be checkpointed with --leave-running or --leave-stopped",
                l.icons.len()
            );
        }
        Ok((conns, read.is_some()))
    }

    fn pairs(&self, pid: i32, comm: &str) -> Result<Vec<UnixPairObject>> {
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
        pairs.extend(self.lone.iter().cloned());
        pairs.sort_by_key(|p| p.id);
        Ok(pairs)
    }
}

/// ", held by process P (comm), ..." for the socket `ino`, or nothing if no process
/// holds it.
fn held_by(ino: u32) -> String {
    match sock_diag::socket_holders(&[ino]).get(&ino) {
        Some(h) => {
            let h: Vec<String> = h
                .iter()
                .map(|(p, c)| format!("process {p} ({c})"))
                .collect();
            format!(", held by {}", h.join(", "))
        }
        None => String::new(),
    }
}

/// Accepts every connection waiting on `l` from the dump's copy of the listener and
/// peeks what each client sent into `conns` (in the same order). Only for a tree that is
/// killed after the dump: the connections are gone from the app's queue.
fn take_queue(
    l: &Listener,
    clients: &HashMap<u32, QueuedClient>,
    conns: &mut [UnixQueuedConn],
) -> Result<()> {
    let what = format!(
        "process {} ({}) fd {} (a listening unix socket)",
        l.pid, l.comm, l.fd
    );
    let mut accepted = Vec::new();
    for n in 1..=conns.len() {
        let mut p = libc::pollfd {
            fd: l.copy.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no timeout.
        if unsafe { libc::poll(&mut p, 1, 0) } != 1 {
            bail!(
                "{what}: connection {n} of {} is no longer waiting to be accepted",
                conns.len()
            );
        }
        // SAFETY: no address is asked for; the fd is our copy of the listener.
        let fd = unsafe {
            libc::accept4(
                l.copy.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        };
        if fd < 0 {
            return Err(errno_err(format!(
                "{what}: accepting connection {n} to read it"
            )));
        }
        // SAFETY: accept4 just returned this fd, owned by nobody else.
        accepted.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    // Each accepted socket must be the server side of the expected client's connection.
    let diag = sock_diag::unix_sockets()?;
    for (i, (s, c)) in accepted.iter().zip(conns.iter_mut()).enumerate() {
        let n = i + 1;
        let ino = std::fs::metadata(format!("/proc/self/fd/{}", s.as_raw_fd()))
            .with_context(|| format!("{what}: connection {n}"))?
            .ino() as u32;
        let peer = diag.get(&ino).map(|d| d.peer).unwrap_or(0);
        if peer != c.id as u32 {
            bail!(
                "{what}: connection {n} accepted is not the one sock_diag listed (client \
                 socket inode {peer}, expected {}): the queue changed during the dump",
                c.id
            );
        }
        if c.id == 0 {
            c.addr = peer_addr(s)?;
            if c.addr != UnixAddr::Unnamed {
                bail!(
                    "{what}: connection {n} not accepted yet comes from a client bound to \
                     {:?} that has closed its end, which warmstart cannot checkpoint yet",
                    c.addr
                );
            }
        }
        // Credentials the listener asks for (inherited by the accepted socket) come with
        // every message: not the queue's own control messages.
        for opt in [libc::SO_PASSCRED, SO_PASSPIDFD] {
            let _ = setsockopt_int(s.as_fd(), libc::SOL_SOCKET, opt, 0, "SO_PASSCRED");
        }
        c.queued = peek_queue(s, l.sock_type).map_err(|e| match e {
            PeekError::Control => {
                let from = match clients.get(&(c.id as u32)) {
                    Some(cl) => format!("fd {} of process {} ({})", cl.fd, cl.pid, cl.comm),
                    None => "a client that has closed its end".to_owned(),
                };
                anyhow!(
                    "{what}: connection {n} not accepted yet, from {from}, has file \
                     descriptors or credentials queued (SCM_RIGHTS / SCM_CREDENTIALS), which \
                     warmstart cannot checkpoint yet"
                )
            }
            PeekError::Io(e) => e.context(format!("{what}: connection {n}")),
        })?;
    }
    Ok(())
}

fn peer_addr(fd: &OwnedFd) -> Result<UnixAddr> {
    name_of(fd, libc::getpeername, "getpeername")
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
    if d.peer == 0 && d.state == TCP_ESTABLISHED && stream && c.listener_of(ino)?.is_some() {
        // The client end of a connection not accepted yet (the server side has no inode).
        if c.clients.contains_key(&ino) {
            bail!("{}: a second open of a unix socket", t.context());
        }
        c.clients.insert(
            ino,
            QueuedClient {
                pid: t.pid,
                comm: t.comm.to_owned(),
                fd: t.fd,
                addr: addr_of(t, copy)?,
                shutdown: d.shutdown,
                unsent: d.wqueue,
            },
        );
        return Ok(FileDesc::UnixQueued {
            conn: ino as u64,
            flags,
        });
    }
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
        if !d.icons.is_empty() {
            c.listeners.push(Listener {
                pid: t.pid,
                pid_in_ns: t.pid_in_ns,
                comm: t.comm.to_owned(),
                fd: t.fd,
                ino,
                sock_type,
                icons: d.icons.clone(),
                copy: copy
                    .try_clone()
                    .with_context(|| format!("duplicating {}", t.context()))?,
                take: t.opts.take_queued,
            });
        }
        Some(if d.wqueue > 0 {
            d.wqueue
        } else {
            libc::SOMAXCONN as u32
        })
    } else {
        None
    };
    Ok(FileDesc::Unix {
        sock_type,
        addr: addr_of(t, copy)?,
        listen,
        flags,
    })
}

/// The socket's own name, a relative path made absolute with the process's cwd.
fn addr_of(t: &Target, copy: &OwnedFd) -> Result<UnixAddr> {
    let mut addr = local_addr(copy)?;
    if let UnixAddr::Path(p) = &addr {
        if !p.starts_with('/') {
            let cwd = std::fs::read_link(format!("/proc/{}/cwd", t.pid))?;
            addr = UnixAddr::Path(cwd.join(p).to_string_lossy().into_owned());
        }
    }
    Ok(addr)
}

/// What the socket has queued to read, or a refusal naming the fd.
fn queue_of(t: &Target, copy: &OwnedFd, sock_type: i32) -> Result<Vec<Vec<u8>>> {
    peek_queue(copy, sock_type).map_err(|e| match e {
        PeekError::Control => t.refuse("a unix socket with queued file descriptors or credentials"),
        PeekError::Io(e) => e.context(t.context()),
    })
}

fn local_addr(fd: &OwnedFd) -> Result<UnixAddr> {
    name_of(fd, libc::getsockname, "getsockname")
}

type NameCall = unsafe extern "C" fn(i32, *mut libc::sockaddr, *mut libc::socklen_t) -> i32;

/// The socket's own name (`getsockname`) or its peer's (`getpeername`).
fn name_of(fd: &OwnedFd, call: NameCall, what: &str) -> Result<UnixAddr> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `sa` and `len` are valid for writes and `len` is the size of `sa`.
    if unsafe {
        call(
            fd.as_raw_fd(),
            (&mut sa as *mut libc::sockaddr_un).cast(),
            &mut len,
        )
    } < 0
    {
        return Err(errno_err(format!("{what} of a unix socket")));
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

/// The first unix socket of the tree under `root` that has file descriptors or
/// credentials queued to read, as `(pid, fd)`: a tree caught while one of its processes
/// passes fds to another (nginx's master to a worker that has not read them yet) is not
/// at rest. Processes or fds that go away meanwhile are skipped.
pub fn queued_control(root: i32) -> Option<(i32, i32)> {
    let procs = std::iter::once(root).chain(crate::sys::tasks::descendants(root));
    for pid in procs {
        let Ok(pidfd) = warmstart_launcher::sys::pidfd_open(pid, 0) else {
            continue;
        };
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in dir.flatten() {
            let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            let is_socket = std::fs::read_link(e.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
            if !is_socket {
                continue;
            }
            let Ok(copy) = crate::sys::pidfd::pidfd_getfd(&pidfd, fd) else {
                continue;
            };
            let unix = getsockopt_int(&copy, libc::SOL_SOCKET, libc::SO_DOMAIN)
                .is_ok_and(|d| d == libc::AF_UNIX);
            let Ok(ty) = getsockopt_int(&copy, libc::SOL_SOCKET, libc::SO_TYPE) else {
                continue;
            };
            if unix && matches!(peek_queue(&copy, ty), Err(PeekError::Control)) {
                return Some((pid, fd));
            }
        }
    }
    None
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
    setsockopt_int(
        fd.as_fd(),
        libc::SOL_SOCKET,
        libc::SO_PEEK_OFF,
        0,
        "SO_PEEK_OFF",
    )
    .map_err(io)?;
    let res = (|| {
        let mut msgs: Vec<Vec<u8>> = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: `msghdr` is a plain C struct: zeroed means null pointers and zero
            // lengths, which is valid.
            let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
            mh.msg_iov = &mut iov;
            mh.msg_iovlen = 1;
            // SAFETY: `mh` points only at `iov`, which describes `buf`, a live writable
            // buffer of `buf.len()` bytes; no control buffer is given.
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
        fd.as_fd(),
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
            // SAFETY: `fds` has room for the two descriptors `socketpair` writes.
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
            // SAFETY: `socketpair` succeeded: two new descriptors owned by nothing else.
            let pair = unsafe { [OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])] };
            // What end 0 had to read is sent from end 1, and the other way round.
            for (reader, writer) in [(0, &pair[1]), (1, &pair[0])] {
                for msg in &obj.queued[reader] {
                    refill(writer.as_fd(), msg)?;
                }
            }
            // Then each end's own shutdown state (a stream end's shutdown also marks its
            // peer, which was marked the same at dump).
            for (i, fd) in pair.iter().enumerate() {
                let how = match obj.shutdown[i] & 3 {
                    0 => continue,
                    1 => libc::SHUT_RD,
                    2 => libc::SHUT_WR,
                    _ => libc::SHUT_RDWR,
                };
                // SAFETY: integer arguments only; `fd` is an end of the pair made here.
                if unsafe { libc::shutdown(fd.as_raw_fd(), how) } < 0 {
                    return Err(errno_err(format!(
                        "shutdown of end {i} of unix socket pair {id}"
                    )));
                }
            }
            let [a, b] = pair;
            let ends = (ins.keep_high(a)?, ins.keep_high(b)?);
            ins.unix_pairs.insert(id, ends);
            ends
        }
    };
    let fd = if end == 0 { ends.0 } else { ends.1 };
    super::set_status_flags(ins.fd(fd)?, flags)?;
    Ok(fd)
}

fn refill(fd: BorrowedFd<'_>, msg: &[u8]) -> Result<()> {
    let fd = fd.as_raw_fd();
    let mut done = 0;
    while done < msg.len() || msg.is_empty() {
        // SAFETY: the pointer and length describe `msg[done..]`, a live slice that `send`
        // only reads.
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
    // SAFETY: socket takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_UNIX, sock_type | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(errno_err("socket(AF_UNIX)"));
    }
    // SAFETY: the call above succeeded: a new descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if let UnixAddr::Path(p) = addr {
        if let Ok(m) = std::fs::symlink_metadata(p) {
            if m.file_type().is_socket() {
                // A stale socket file (the dumped process's): binding needs the name.
                let _ = std::fs::remove_file(p);
            }
        }
    }
    let shown = bind_to(fd.as_fd(), addr)?;
    if let Some(backlog) = listen {
        // SAFETY: listen takes no pointers.
        if unsafe { libc::listen(fd.as_raw_fd(), *backlog as i32) } < 0 {
            return Err(errno_err(format!("listen on unix socket {shown}")));
        }
    }
    super::set_status_flags(fd.as_fd(), *flags)?;
    ins.keep_high(fd)
}

/// `addr` as a `sockaddr_un` and its length, and as shown in messages (`None`: unnamed).
fn sockaddr(addr: &UnixAddr) -> Result<Option<(libc::sockaddr_un, libc::socklen_t, String)>> {
    let (bytes, shown): (Vec<u8>, String) = match addr {
        UnixAddr::Unnamed => return Ok(None),
        UnixAddr::Path(p) => (p.as_bytes().to_vec(), p.clone()),
        UnixAddr::Abstract(name) => {
            let mut b = vec![0u8];
            b.extend_from_slice(name);
            (b, format!("@{}", String::from_utf8_lossy(name)))
        }
    };
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if bytes.len() > sa.sun_path.len() {
        bail!("unix socket name {shown} is too long");
    }
    for (d, s) in sa.sun_path.iter_mut().zip(&bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len();
    Ok(Some((sa, len as libc::socklen_t, shown)))
}

/// Binds `fd` to `addr` (nothing for an unnamed socket); returns the name as shown.
fn bind_to(fd: BorrowedFd<'_>, addr: &UnixAddr) -> Result<String> {
    let fd = fd.as_raw_fd();
    let Some((sa, len, shown)) = sockaddr(addr)? else {
        return Ok(String::new());
    };
    // SAFETY: `sa` is a valid sockaddr_un of at least `len` bytes.
    if unsafe { libc::bind(fd, (&sa as *const libc::sockaddr_un).cast(), len) } < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EADDRINUSE) {
            bail!("unix socket {shown} is in use");
        }
        bail!("binding a unix socket to {shown}: {e}");
    }
    Ok(shown)
}

/// In the root, before it forks: every listener with connections waiting to be
/// accepted (`Manifest::unix_queues`), and the client end of each connection, connected
/// in accept order with what it had sent queued on the server side. Returns the fds by
/// `Fd::ofd` (the listeners' and the clients' held by the tree), inherited by every
/// process like the other shared descriptions.
pub fn restore_queues(ins: &mut Installer) -> Result<HashMap<u32, RawFd>> {
    let m = ins.m;
    let mut out = HashMap::new();
    for q in &m.unix_queues {
        let f = m
            .processes
            .iter()
            .find(|p| p.pid == q.pid)
            .and_then(|p| p.fds.iter().find(|f| f.fd == q.fd))
            .ok_or_else(|| {
                anyhow!(
                    "snapshot names a unix listener at fd {} of process {} that it does not \
                     contain (corrupt manifest?)",
                    q.fd,
                    q.pid
                )
            })?;
        let FileDesc::Unix {
            sock_type,
            addr,
            listen: Some(_),
            ..
        } = &f.file
        else {
            bail!(
                "fd {} of process {} has a queue of connections but is not a listening unix \
                 socket (corrupt manifest?)",
                q.fd,
                q.pid
            );
        };
        let what = format!(
            "listening unix socket {addr:?} (fd {} of process {})",
            q.fd, q.pid
        );
        if let std::collections::hash_map::Entry::Vacant(e) = out.entry(f.ofd) {
            e.insert(restore(ins, &f.file).with_context(|| format!("restoring {what}"))?);
        }
        let (sa, len, _) = sockaddr(addr)?.ok_or_else(|| anyhow!("{what} has no name"))?;
        for (i, c) in q.conns.iter().enumerate() {
            let n = i + 1;
            let fd = connect_queued(*sock_type, c, &sa, len)
                .with_context(|| format!("{what}: connection {n} not accepted yet"))?;
            if c.id == 0 {
                // Its client had closed its end: so does this one (EOF after the data).
                drop(fd);
                continue;
            }
            let client = m
                .processes
                .iter()
                .flat_map(|p| &p.fds)
                .find_map(|f| match f.file {
                    FileDesc::UnixQueued { conn, flags } if conn == c.id => Some((f.ofd, flags)),
                    _ => None,
                });
            let Some((ofd, flags)) = client else {
                bail!("{what}: no fd holds the client end of connection {n} (corrupt manifest?)");
            };
            super::set_status_flags(fd.as_fd(), flags)?;
            let fd = ins.keep_high(fd)?;
            out.insert(ofd, fd);
        }
    }
    Ok(out)
}

/// A client socket connected to the listener at `sa`, with `c`'s data sent and its
/// shutdown state applied.
fn connect_queued(
    sock_type: i32,
    c: &UnixQueuedConn,
    sa: &libc::sockaddr_un,
    len: libc::socklen_t,
) -> Result<OwnedFd> {
    // SAFETY: socket takes no pointers.
    let raw = unsafe {
        libc::socket(
            libc::AF_UNIX,
            sock_type | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if raw < 0 {
        return Err(errno_err("socket(AF_UNIX)"));
    }
    // SAFETY: socket just returned this fd, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    bind_to(fd.as_fd(), &c.addr)?;
    // SAFETY: `sa` is a valid sockaddr_un of at least `len` bytes.
    if unsafe { libc::connect(fd.as_raw_fd(), (sa as *const libc::sockaddr_un).cast(), len) } < 0 {
        return Err(errno_err("connecting to it"));
    }
    for msg in &c.queued {
        refill(fd.as_fd(), msg)?;
    }
    let how = match c.shutdown & 3 {
        0 => return Ok(fd),
        1 => libc::SHUT_RD,
        2 => libc::SHUT_WR,
        _ => libc::SHUT_RDWR,
    };
    // SAFETY: shutdown takes no pointers.
    if unsafe { libc::shutdown(fd.as_raw_fd(), how) } < 0 {
        return Err(errno_err("shutting down its client end"));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};

    fn ino(fd: &impl AsRawFd) -> u32 {
        std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap()
            .ino() as u32
    }

    fn client(c: &UnixStream, fd: i32) -> QueuedClient {
        let d = sock_diag::unix_sockets().unwrap()[&ino(c)].clone();
        QueuedClient {
            pid: 1,
            comm: "t".into(),
            fd,
            addr: UnixAddr::Unnamed,
            shutdown: d.shutdown,
            unsent: d.wqueue,
        }
    }

    /// A listener with three connections waiting: "hello", then "world" and SHUT_WR,
    /// then one whose client closed after "bye"; the collector knows the first two.
    fn setup(dir: &std::path::Path, take: bool) -> (Collector, UnixListener, Vec<UnixStream>) {
        let l = UnixListener::bind(dir.join("l.sock")).unwrap();
        let mut a = UnixStream::connect(dir.join("l.sock")).unwrap();
        a.write_all(b"hello").unwrap();
        let mut b = UnixStream::connect(dir.join("l.sock")).unwrap();
        b.write_all(b"world").unwrap();
        b.shutdown(std::net::Shutdown::Write).unwrap();
        let mut gone = UnixStream::connect(dir.join("l.sock")).unwrap();
        gone.write_all(b"bye").unwrap();
        drop(gone);
        let mut c = Collector::default();
        c.clients.insert(ino(&a), client(&a, 10));
        c.clients.insert(ino(&b), client(&b, 11));
        c.listeners.push(Listener {
            pid: 1,
            pid_in_ns: 1,
            comm: "t".into(),
            fd: 3,
            ino: ino(&l),
            sock_type: libc::SOCK_STREAM,
            icons: vec![ino(&a), ino(&b), 0],
            copy: OwnedFd::from(l.try_clone().unwrap()),
            take,
        });
        (c, l, vec![a, b])
    }

    #[test]
    fn a_queue_with_data_is_read_by_accepting_it_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (c, l, mut clients) = setup(dir.path(), true);
        let ids = [ino(&clients[0]) as u64, ino(&clients[1]) as u64, 0];
        let (_, queues) = c.finish(1, "t").unwrap();
        assert_eq!(queues.len(), 1);
        let q = &queues[0];
        assert_eq!((q.pid, q.fd), (1, 3));
        let got: Vec<(u64, Vec<Vec<u8>>, u8)> = q
            .conns
            .iter()
            .map(|c| (c.id, c.queued.clone(), c.shutdown))
            .collect();
        assert_eq!(
            got,
            vec![
                (ids[0], vec![b"hello".to_vec()], 0),
                (ids[1], vec![b"world".to_vec()], 2),
                (0, vec![b"bye".to_vec()], 0),
            ]
        );
        // Taken: nothing waits any more, the clients' peers are gone.
        l.set_nonblocking(true).unwrap();
        assert!(l.accept().is_err());
        let mut buf = [0u8; 4];
        assert!(
            !matches!(clients[0].read(&mut buf), Ok(n) if n > 0),
            "the server side was closed"
        );
    }

    #[test]
    fn a_queue_with_data_is_refused_when_the_tree_runs_on() {
        let dir = tempfile::tempdir().unwrap();
        let (c, l, _clients) = setup(dir.path(), false);
        let e = c.finish(1, "t").unwrap_err().to_string();
        assert!(
            e.contains("process 1 (t): fd 3 is a listening unix socket with 3 connections")
                && e.contains("connection 1 (from fd 10 of process 1 (t)")
                && e.contains("--leave-running"),
            "{e}"
        );
        // Nothing was taken.
        l.set_nonblocking(true).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
    }

    #[test]
    fn a_queue_without_data_is_dumped_without_touching_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        let l = UnixListener::bind(&path).unwrap();
        let a = UnixStream::connect(&path).unwrap();
        let b = UnixStream::connect(&path).unwrap();
        b.shutdown(std::net::Shutdown::Write).unwrap();
        let mut c = Collector::default();
        c.clients.insert(ino(&a), client(&a, 10));
        c.clients.insert(ino(&b), client(&b, 11));
        c.listeners.push(Listener {
            pid: 1,
            pid_in_ns: 1,
            comm: "t".into(),
            fd: 3,
            ino: ino(&l),
            sock_type: libc::SOCK_STREAM,
            icons: vec![ino(&a), ino(&b)],
            copy: OwnedFd::from(l.try_clone().unwrap()),
            take: false,
        });
        let (_, queues) = c.finish(1, "t").unwrap();
        let got: Vec<(u64, usize, u8)> = queues[0]
            .conns
            .iter()
            .map(|c| (c.id, c.queued.len(), c.shutdown))
            .collect();
        assert_eq!(got, vec![(ino(&a) as u64, 0, 0), (ino(&b) as u64, 0, 2)]);
        // Both still wait, in order.
        assert_eq!(
            sock_diag::unix_sockets().unwrap()[&ino(&l)].icons,
            vec![ino(&a), ino(&b)]
        );
    }

    /// One connection waiting on a fresh listener (`passcred`: with SO_PASSCRED), whose
    /// client sent "data" (with its own stdin fd attached when `rights`).
    fn one_waiting(
        dir: &std::path::Path,
        passcred: bool,
        rights: bool,
    ) -> (Collector, UnixListener, UnixStream) {
        let l = UnixListener::bind(dir.join("l.sock")).unwrap();
        if passcred {
            setsockopt_int(l.as_fd(), libc::SOL_SOCKET, libc::SO_PASSCRED, 1, "t").unwrap();
        }
        let a = UnixStream::connect(dir.join("l.sock")).unwrap();
        let mut data = *b"data";
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        let mut cmsg = [0u64; 4];
        // SAFETY: msghdr is plain data; all zeroes is a valid value.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        if rights {
            mh.msg_control = cmsg.as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE only computes a size.
            mh.msg_controllen = unsafe { libc::CMSG_SPACE(4) } as usize;
            // SAFETY: the control buffer holds one cmsg with a 4-byte payload.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&mh);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
                *(libc::CMSG_DATA(c) as *mut i32) = 0;
            }
        }
        // SAFETY: `mh` points at live buffers.
        assert_eq!(unsafe { libc::sendmsg(a.as_raw_fd(), &mh, 0) }, 4);
        let mut c = Collector::default();
        c.clients.insert(ino(&a), client(&a, 10));
        c.listeners.push(Listener {
            pid: 1,
            pid_in_ns: 1,
            comm: "t".into(),
            fd: 3,
            ino: ino(&l),
            sock_type: libc::SOCK_STREAM,
            icons: vec![ino(&a)],
            copy: OwnedFd::from(l.try_clone().unwrap()),
            take: true,
        });
        (c, l, a)
    }

    #[test]
    fn a_listener_asking_for_credentials_is_no_obstacle() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _l, _a) = one_waiting(dir.path(), true, false);
        let (_, queues) = c.finish(1, "t").unwrap();
        assert_eq!(queues[0].conns[0].queued, vec![b"data".to_vec()]);
    }

    #[test]
    fn passed_fds_in_a_waiting_connection_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (c, _l, _a) = one_waiting(dir.path(), false, true);
        let e = c.finish(1, "t").unwrap_err().to_string();
        assert!(
            e.contains(
                "connection 1 not accepted yet, from fd 10 of process 1 (t), has file descriptors"
            ) && e.contains("SCM_RIGHTS")
                && e.contains("the process no longer has them"),
            "{e}"
        );
    }

    #[test]
    fn a_connection_from_outside_the_tree_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, _l, clients) = setup(dir.path(), true);
        c.clients.remove(&ino(&clients[1]));
        let e = c.finish(1, "t").unwrap_err().to_string();
        assert!(
            e.contains(
                "connection 2 not accepted yet comes from a socket outside the process tree"
            ) && e.contains(&format!("held by process {}", std::process::id())),
            "{e}"
        );
    }

    #[test]
    fn a_queued_connection_is_made_again_with_its_data_and_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.sock");
        let l = UnixListener::bind(&path).unwrap();
        let addr = UnixAddr::Path(path.to_str().unwrap().into());
        let (sa, len, _) = sockaddr(&addr).unwrap().unwrap();
        let conn = |data: &[u8], shutdown| UnixQueuedConn {
            id: 1,
            addr: UnixAddr::Unnamed,
            queued: vec![data.to_vec()],
            shutdown,
        };
        let a = connect_queued(libc::SOCK_STREAM, &conn(b"one", 0), &sa, len).unwrap();
        let b = connect_queued(libc::SOCK_STREAM, &conn(b"two", 2), &sa, len).unwrap();
        let mut buf = [0u8; 8];
        // Accepted in the order they connected, each with its data; the second's client
        // shut down for writing: EOF after the data.
        let (mut s1, _) = l.accept().unwrap();
        s1.set_nonblocking(true).unwrap();
        assert_eq!(s1.read(&mut buf).unwrap(), 3);
        assert_eq!(&buf[..3], b"one");
        assert!(
            s1.read(&mut buf).is_err(),
            "no EOF: the first client did not shut down"
        );
        let (mut s2, _) = l.accept().unwrap();
        let mut got = Vec::new();
        s2.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"two");
        // Each accepted socket is connected to its own client.
        s1.write_all(b"x").unwrap();
        let mut a = UnixStream::from(a);
        a.set_nonblocking(true).unwrap();
        assert_eq!(a.read(&mut buf).unwrap(), 1);
        let mut b = UnixStream::from(b);
        assert!(
            b.write_all(b"y").is_err(),
            "the second client shut down for writing"
        );
    }
}
