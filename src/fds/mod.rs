//! Open file descriptors, one module per kind, each holding both its dump and its restore.
//!
//! | kind                                  | module       |
//! |---------------------------------------|--------------|
//! | files, directories, devices, ghosts   | [`regular`]  |
//! | pipes                                 | [`pipe`]     |
//! | eventfd                               | [`eventfd`]  |
//! | epoll                                 | [`epoll`]    |
//! | timerfd                               | [`timerfd`]  |
//! | signalfd                              | [`signalfd`] |
//! | memfd                                 | [`memfd`]    |
//! | unix sockets                          | [`unix`]     |
//! | TCP / UDP sockets                     | [`inet`]     |
//! | established TCP connections           | [`tcp`]      |
//! | netlink sockets                       | [`netlink`]  |
//! | inotify                               | [`inotify`]  |
//! | flock / POSIX / OFD locks             | [`locks`]    |
//!
//! Dump ([`collect`]) reads `/proc/PID/fd` and `/proc/PID/fdinfo/N`, and takes a copy of an
//! fd with `pidfd_getfd` where the state is only reachable through the file itself (a
//! pipe's bytes, a socket's name and options). Anything not listed above is refused by
//! name: "process 2 (java): fd 7 is an anonymous inode of type io_uring, which warmstart
//! cannot checkpoint yet".
//!
//! Dump of a tree ([`collect_in_tree`]) numbers open file descriptions across all its
//! processes: an fd inherited over fork has its parent's `ofd` id (`kcmp` across pids).
//!
//! Restore ([`install`]) runs in the restoring child: every open file description is
//! created once, above the app's highest fd, then `dup3`'d to each number sharing it;
//! one that several processes share was created once by the root before it forked
//! ([`prepare_shared`]) and is inherited.
//! Epolls come last (their targets must exist at their final numbers; an epoll inside an
//! epoll after the inner one), then locks (closing any fd of a file drops the process's
//! POSIX locks on it, so they are taken once the temporary fds are gone).

pub mod epoll;
pub mod eventfd;
pub mod inet;
pub mod inotify;
pub mod locks;
pub mod memfd;
pub mod netlink;
pub mod pipe;
pub mod pty;
pub mod regular;
pub mod shared_file;
pub mod signalfd;
pub mod sock_diag;
pub mod tcp;
pub mod timerfd;
pub mod unix;

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

use anyhow::{anyhow, bail, Context, Result};
use warmstart_snapshots::model::{
    EpollTarget, Fd, FileDesc, FileIdentity, FileLock, FileOwner, Manifest, PipeObject, Process,
    UnixPairObject, UnixQueue,
};

use crate::sys::pidfd;

/// Which fds are the launcher's stdio and become the caller's at restore.
#[derive(Debug, Clone)]
pub enum StdioPolicy {
    /// `record`: these (dev, ino) pairs are the pipes warmstart gave the app as fd 0, 1,
    /// 2, and, with `--ready notify`, the app's end of the notify channel (external 3).
    Given(Vec<(u64, u64)>),
    /// `dump -t`: fds 0-2 that are a pipe or socket are external: they belong to whoever
    /// started the process, not to its state. Terminals are refused unless `shell_job`
    /// (a job of an interactive shell): then every fd on a terminal is external and the
    /// restorer's terminal takes its place.
    Detect { shell_job: bool },
}

/// What the fd collection may do beyond the default.
#[derive(Debug, Clone)]
pub struct CollectOptions {
    pub stdio: StdioPolicy,
    /// Dump established TCP connections as connections the peer has reset (see
    /// [`inet`]) instead of refusing them.
    pub tcp_close: bool,
    /// Dump established TCP connections with `TCP_REPAIR` (see [`tcp`]).
    pub tcp_established: bool,
    /// The tree is killed after the dump: connections waiting in a unix listener's queue
    /// may be accepted to read what their clients sent (see [`unix`]).
    pub take_queued: bool,
}

pub fn identity(path: &str, meta: &std::fs::Metadata) -> FileIdentity {
    FileIdentity {
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        mode: meta.mode(),
        hash: None,
        btime_ns: btime_ns(meta),
    }
}

/// A file's birth time in ns since the epoch, where the filesystem records one.
pub fn btime_ns(meta: &std::fs::Metadata) -> Option<i128> {
    let t = meta.created().ok()?;
    Some(match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    })
}

/// Contents of a file kept in the manifest (memfds, deleted files) are limited to this;
/// bigger ones belong in the page store, which this does not use yet.
pub const MAX_INLINE_CONTENTS: u64 = 64 << 20;

/// Whether process `pid` maps the file `meta` describes (`/proc/PID/maps`: device and
/// inode). An fd on a deleted file or memfd that is also mapped is an open of a
/// `SharedFile` object (`dump::shared_files`), whose contents are stored once through
/// the page store: the fd's dump does not read them.
pub fn mapped_by(pid: i32, meta: &std::fs::Metadata) -> bool {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return false;
    };
    let dev = format!(
        "{:02x}:{:02x}",
        libc::major(meta.dev()),
        libc::minor(meta.dev())
    );
    let ino = meta.ino().to_string();
    maps.lines().any(|l| {
        let mut f = l.split_ascii_whitespace().skip(3);
        f.next() == Some(dev.as_str()) && f.next() == Some(ino.as_str())
    })
}

/// `/proc/PID/fdinfo/N`.
pub struct FdInfo {
    pub pos: i64,
    pub flags: i32,
    pub text: String,
}

impl FdInfo {
    pub fn parse(text: String) -> FdInfo {
        let mut info = FdInfo {
            pos: 0,
            flags: 0,
            text,
        };
        info.pos = info.field("pos").and_then(|v| v.parse().ok()).unwrap_or(0);
        info.flags = info
            .field("flags")
            .and_then(|v| i32::from_str_radix(v, 8).ok())
            .unwrap_or(0);
        info
    }

    /// The trimmed value of the first `NAME:` line.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.text.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|r| r.strip_prefix(':'))
                .map(str::trim)
        })
    }

    /// Lines starting with `prefix`, without it.
    pub fn lines_with<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.text
            .lines()
            .filter_map(move |l| l.strip_prefix(prefix))
    }
}

/// Everything a kind's dump code may need about one fd of the target.
pub struct Target<'a> {
    pub pid: i32,
    /// The pid in the tree's own pid namespace (the manifest's `Process::pid`).
    pub pid_in_ns: i32,
    pub comm: &'a str,
    pub fd: i32,
    pub link: &'a str,
    pub meta: Option<&'a std::fs::Metadata>,
    pub info: &'a FdInfo,
    pub opts: &'a CollectOptions,
    pidfd: &'a OwnedFd,
    /// Every fd number of the process (for epoll targets).
    pub all_fds: &'a [i32],
}

impl Target<'_> {
    /// A refusal in the house style: "process 2 (java): fd 7 is WHAT, which warmstart
    /// cannot checkpoint yet".
    pub fn refuse(&self, what: impl std::fmt::Display) -> anyhow::Error {
        anyhow!(
            "process {} ({}): fd {} is {what}, which warmstart cannot checkpoint yet",
            self.pid,
            self.comm,
            self.fd
        )
    }

    /// A copy of the fd in this process (`pidfd_getfd`); the target keeps its own.
    pub fn copy(&self) -> Result<OwnedFd> {
        pidfd::pidfd_getfd(self.pidfd, self.fd).with_context(|| {
            format!(
                "pidfd_getfd of process {} fd {} ({})",
                self.pid, self.fd, self.link
            )
        })
    }

    /// Status flags worth restoring (`O_NONBLOCK`, `O_APPEND`, access mode, ...).
    pub fn flags(&self) -> i32 {
        self.info.flags & !libc::O_CLOEXEC
    }

    pub fn context(&self) -> String {
        format!(
            "process {} ({}) fd {} ({})",
            self.pid, self.comm, self.fd, self.link
        )
    }
}

pub struct Collected {
    pub fds: Vec<Fd>,
    pub pipes: Vec<PipeObject>,
    pub unix_pairs: Vec<UnixPairObject>,
    pub file_locks: Vec<FileLock>,
    pub unix_queues: Vec<UnixQueue>,
}

/// Shared objects met while collecting one process's fds.
#[derive(Default)]
pub struct Shared {
    pub pipes: HashMap<u64, PipeObject>,
    pub unix: unix::Collector,
    pub inet: inet::Collector,
    /// The ptys whose master the tree holds ([`pty::scan`]).
    pub ptys: pty::Own,
}

/// What the fd collection of a whole tree has met so far: shared objects (pipes, socket
/// pairs) and every open file description, so that an fd inherited over fork gets the
/// same `ofd` id in parent and child.
#[derive(Default)]
pub struct TreeFiles {
    shared: Shared,
    /// Every fd seen: (pid, fd, ofd id, link). Only fds with the same link can share a
    /// description, so kcmp is asked about those only.
    fds: Vec<(i32, i32, u32, String)>,
    /// The state read for each description, from its first fd.
    seen: HashMap<u32, FileDesc>,
}

impl TreeFiles {
    /// Finds the ptys of the tree `pids` before its fds are collected: whether a slave
    /// is the app's own depends on a master that a later process may hold.
    pub fn scan_ptys(&mut self, pids: &[i32]) -> Result<()> {
        self.shared.ptys = pty::scan(pids)?;
        Ok(())
    }

    /// The controlling terminal of `pid` when it is a pty of the app's own (its index).
    pub fn ctty(&self, pid: i32) -> Option<u32> {
        pty::ctty_of(pid, &self.shared.ptys)
    }

    /// The shared objects of every process collected: pipes, unix socket pairs and the
    /// queues of unix listeners (the last step of a dump's fd collection: reading a
    /// queue may take its connections from the app, see [`unix`]).
    pub fn finish(self, pid: i32, comm: &str) -> Result<SharedObjects> {
        let mut pipes: Vec<PipeObject> = self.shared.pipes.into_values().collect();
        pipes.sort_by_key(|p| p.id);
        let (unix_pairs, unix_queues) = self.shared.unix.finish(pid, comm)?;
        // Any established connection still held goes back to normal here (a dump that
        // wants them held took them with `take_tcp`).
        drop(self.shared.inet.held);
        Ok(SharedObjects {
            pipes,
            unix_pairs,
            unix_queues,
        })
    }

    /// The established TCP connections held in repair mode (and their lock), for the
    /// dump to finish after the tree is killed or released ([`tcp::Held`]).
    pub fn take_tcp(&mut self) -> tcp::Held {
        std::mem::take(&mut self.shared.inet.held)
    }

    /// The id of the open file description of `pid`'s fd `fd`: the id of an fd seen
    /// before that shares it (`kcmp(KCMP_FILE)`), else a new one.
    fn ofd(&mut self, pid: i32, fd: i32, link: &str) -> u32 {
        let found = self.fds.iter().find(|(p, f, _, l)| {
            l == link && matches!(crate::sys::kcmp_files(pid, fd, *p, *f), Ok(true))
        });
        let id = match found {
            Some(&(_, _, id, _)) => id,
            None => self.fds.iter().map(|e| e.2 + 1).max().unwrap_or(0),
        };
        self.fds.push((pid, fd, id, link.to_owned()));
        id
    }
}

/// What [`TreeFiles::finish`] returns.
pub struct SharedObjects {
    pub pipes: Vec<PipeObject>,
    pub unix_pairs: Vec<UnixPairObject>,
    pub unix_queues: Vec<UnixQueue>,
}

/// The fds of one process alone (a tree of one).
pub fn collect(pid: i32, comm: &str, opts: &CollectOptions) -> Result<Collected> {
    let mut tree = TreeFiles::default();
    tree.scan_ptys(&[pid])?;
    let (fds, file_locks) = collect_in_tree(pid, comm, opts, &mut tree)?;
    let shared = tree.finish(pid, comm)?;
    Ok(Collected {
        fds,
        pipes: shared.pipes,
        unix_pairs: shared.unix_pairs,
        file_locks,
        unix_queues: shared.unix_queues,
    })
}

/// The fds and locks of `pid`, one process of a tree; shared objects go into `tree`.
pub fn collect_in_tree(
    pid: i32,
    comm: &str,
    opts: &CollectOptions,
    tree: &mut TreeFiles,
) -> Result<(Vec<Fd>, Vec<FileLock>)> {
    let pidfd = pidfd::pidfd_open(pid, 0).with_context(|| format!("pidfd_open({pid})"))?;
    let mut fds = Vec::new();
    let mut file_locks = Vec::new();
    let pid_in_ns = pid_in_own_ns(pid)?;
    let mut nums: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    nums.sort_unstable();
    for &fd in &nums {
        let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .with_context(|| format!("reading /proc/{pid}/fd/{fd}"))?;
        let link = link.to_string_lossy().into_owned();
        let meta = std::fs::metadata(format!("/proc/{pid}/fd/{fd}")).ok();
        let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
            .with_context(|| format!("reading /proc/{pid}/fdinfo/{fd}"))?;
        let info = FdInfo::parse(text);
        let cloexec = info.flags & libc::O_CLOEXEC != 0;
        // (dev, ino, pos, flags) is not enough to tell a dup (or an fd inherited over
        // fork) from a second open: ask the kernel with kcmp.
        let ofd = tree.ofd(pid, fd, &link);
        let t = Target {
            pid,
            pid_in_ns,
            comm,
            fd,
            link: &link,
            meta: meta.as_ref(),
            info: &info,
            opts,
            pidfd: &pidfd,
            all_fds: &nums,
        };
        // A dup shares the state read for its first fd.
        let file = match tree.seen.get(&ofd) {
            Some(file) => file.clone(),
            None => classify(&t, &mut tree.shared)?,
        };
        tree.seen.entry(ofd).or_insert_with(|| file.clone());
        if !matches!(file, FileDesc::External { .. }) {
            file_locks.extend(locks::dump(&t, pid_in_ns)?);
        }
        fds.push(Fd {
            fd,
            cloexec,
            ofd,
            file,
        });
    }
    Ok((fds, file_locks))
}

/// The pid of `pid` in its own (innermost) pid namespace: the last `NSpid:` field.
fn pid_in_own_ns(pid: i32) -> Result<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    Ok(crate::dump::process::own_ns_pid(&status).unwrap_or(pid))
}

/// Which kind of fd `t` is, and its state.
fn classify(t: &Target, shared: &mut Shared) -> Result<FileDesc> {
    if let Some(kind) = t.link.strip_prefix("anon_inode:") {
        return match kind {
            "[eventfd]" => eventfd::dump(t),
            "[eventpoll]" => epoll::dump(t),
            "[timerfd]" => timerfd::dump(t),
            "[signalfd]" => signalfd::dump(t),
            "inotify" => inotify::dump(t),
            other => Err(t.refuse(format_args!(
                "an anonymous inode of type {}",
                other.trim_matches(['[', ']'])
            ))),
        };
    }
    let Some(meta) = t.meta else {
        return Err(t.refuse(format_args!(
            "an object without a stat()able inode ({})",
            t.link
        )));
    };
    let ft = meta.mode() & libc::S_IFMT;
    // A pty of the app's own (its master is in the tree); any other terminal is from
    // outside (a shell's).
    if pty::is_master(meta) {
        return pty::dump_master(t, &shared.ptys);
    }
    if let Some(index) = pty::slave_index(meta).filter(|&i| shared.ptys.owns_slave(i, meta)) {
        return pty::dump_slave(t, index);
    }
    if ft == libc::S_IFCHR && meta.rdev() == libc::makedev(5, 0) {
        if let Some(index) = pty::ctty_of(t.pid, &shared.ptys) {
            return Err(t.refuse(format_args!(
                "/dev/tty, the process's controlling terminal, a pty of the app's own \
                 (/dev/pts/{index}): its ptys are restored, opens of /dev/tty not yet"
            )));
        }
    }
    if let StdioPolicy::Detect { shell_job } = t.opts.stdio {
        if is_terminal(meta) {
            if !shell_job {
                bail!(
                    "process {} ({}): fd {} is the terminal {}: a job of an interactive shell is \
                     dumped with --shell-job (its terminal is then replaced by the restorer's)",
                    t.pid,
                    t.comm,
                    t.fd,
                    t.link
                );
            }
            // Another fd on the job's terminal becomes the restorer's stdin.
            let stdio = if (0..3).contains(&t.fd) {
                t.fd as u8
            } else {
                0
            };
            return Ok(FileDesc::External { stdio });
        }
    }
    if let Some(stdio) = external_stdio(&t.opts.stdio, t.fd, meta, ft, t.link) {
        return Ok(FileDesc::External { stdio });
    }
    match ft {
        libc::S_IFREG if t.link.starts_with("/memfd:") => memfd::dump(t),
        libc::S_IFREG | libc::S_IFDIR | libc::S_IFCHR => regular::dump(t, meta),
        libc::S_IFIFO if t.link.starts_with("pipe:") => pipe::dump(t, meta, &mut shared.pipes),
        libc::S_IFIFO => pipe::dump_fifo(t, meta, &mut shared.pipes),
        libc::S_IFBLK => Err(t.refuse(format_args!("a block device ({})", t.link))),
        libc::S_IFSOCK => socket(t, meta, shared),
        _ => Err(t.refuse(format_args!("an unsupported kind of file ({})", t.link))),
    }
}

fn socket(t: &Target, meta: &std::fs::Metadata, shared: &mut Shared) -> Result<FileDesc> {
    let copy = t.copy()?;
    let domain = getsockopt_int(&copy, libc::SOL_SOCKET, libc::SO_DOMAIN)
        .with_context(|| format!("SO_DOMAIN of {}", t.context()))?;
    match domain {
        libc::AF_UNIX => unix::dump(t, meta, &copy, &mut shared.unix),
        libc::AF_INET | libc::AF_INET6 => inet::dump(t, meta, &copy, domain, &mut shared.inet),
        libc::AF_NETLINK => netlink::dump(t, &copy),
        libc::AF_PACKET => Err(t.refuse("a packet socket")),
        d => Err(t.refuse(format_args!("a socket of address family {d}"))),
    }
}

/// A terminal from outside: a pty slave whose master is not in the tree, a virtual
/// console or serial tty, or `/dev/tty` (the controlling terminal). Pty masters and the
/// slaves of the app's own ptys are handled before ([`pty`]).
fn is_terminal(meta: &std::fs::Metadata) -> bool {
    let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
    meta.mode() & libc::S_IFMT == libc::S_IFCHR
        && ((136..=143).contains(&major) || major == 4 || (major == 5 && minor == 0))
}

/// Which of the restorer's stdio fds `fd` becomes, if it is one of the caller's: under
/// `Detect`, fds 0-2 on an anonymous pipe, a socket or a terminal-like device. A named
/// FIFO has a path the restore reopens (as CRIU does), so it is the app's own.
fn external_stdio(
    policy: &StdioPolicy,
    fd: i32,
    meta: &std::fs::Metadata,
    ft: u32,
    link: &str,
) -> Option<u8> {
    match policy {
        StdioPolicy::Given(given) => given
            .iter()
            .position(|&(dev, ino)| dev == meta.dev() && ino == meta.ino())
            .map(|i| i as u8),
        StdioPolicy::Detect { .. } => {
            let stdio_like = (ft == libc::S_IFIFO && link.starts_with("pipe:"))
                || ft == libc::S_IFSOCK
                || (ft == libc::S_IFCHR && !regular::is_stateless_device(meta));
            ((0..3).contains(&fd) && stdio_like).then_some(fd as u8)
        }
    }
}

/// One line for `inspect`.
pub fn describe(f: &FileDesc) -> String {
    match f {
        FileDesc::Regular { file, pos, .. } => format!("file {} @{pos}", file.path),
        FileDesc::Directory { path, .. } => format!("dir {path}"),
        FileDesc::CharDev { path, .. } => format!("chr {path}"),
        FileDesc::Pipe { pipe, write, .. } => {
            format!("pipe:[{pipe}] {}", if *write { "w" } else { "r" })
        }
        FileDesc::Fifo { path, flags, .. } => format!(
            "fifo {path} {}",
            ["r", "w", "rw"][(flags & libc::O_ACCMODE).clamp(0, 2) as usize]
        ),
        FileDesc::External { stdio } => format!("external stdio {stdio}"),
        FileDesc::EventFd {
            count, semaphore, ..
        } => format!(
            "eventfd count {count}{}",
            if *semaphore { " (semaphore)" } else { "" }
        ),
        FileDesc::Epoll { targets, .. } => {
            let t: Vec<String> = targets.iter().map(|t| t.fd.to_string()).collect();
            format!("epoll on fds [{}]", t.join(", "))
        }
        FileDesc::TimerFd {
            clockid,
            value_ns,
            interval_ns,
            ..
        } => format!("timerfd clock {clockid} in {value_ns} ns every {interval_ns} ns"),
        FileDesc::SignalFd { mask, .. } => format!("signalfd mask {mask:#x}"),
        FileDesc::Memfd { name, data, .. } => format!("memfd {name} ({} bytes)", data.len()),
        FileDesc::Ghost { path, data, .. } => {
            format!("deleted file {path} ({} bytes)", data.len())
        }
        FileDesc::UnixPair { pair, end, .. } => format!("unix pair {pair} end {end}"),
        FileDesc::UnixQueued { conn, .. } => {
            format!("unix connection {conn} not accepted yet (client end)")
        }
        FileDesc::Unix { addr, listen, .. } => format!(
            "unix {addr:?}{}",
            listen
                .map(|b| format!(" listening ({b})"))
                .unwrap_or_default()
        ),
        FileDesc::Inet {
            protocol,
            local,
            listen,
            peer,
            ..
        } => format!(
            "{} {local}{}{}",
            if *protocol == libc::IPPROTO_TCP {
                "tcp"
            } else {
                "udp"
            },
            listen
                .map(|b| format!(" listening ({b})"))
                .unwrap_or_default(),
            peer.as_ref()
                .map(|p| format!(" -> {p}"))
                .unwrap_or_default()
        ),
        FileDesc::TcpClosed { local, peer, .. } => format!("tcp {local} -> {peer} (reset)"),
        FileDesc::TcpEnded { reset, .. } => {
            format!(
                "tcp connection ended ({})",
                if *reset { "reset" } else { "closed" }
            )
        }
        FileDesc::Netlink { protocol, port, .. } => format!("netlink {protocol} port {port}"),
        FileDesc::Inotify { watches, .. } => format!("inotify ({} watches)", watches.len()),
        FileDesc::SharedFile { id, pos, .. } => format!("deleted file / memfd #{id} @{pos}"),
        FileDesc::PtyMaster { path, pty, .. } => {
            format!("pty master {path} (/dev/pts/{})", pty.index)
        }
        FileDesc::PtySlave { index, .. } => format!("pty slave /dev/pts/{index}"),
        FileDesc::TcpEstablished(c) => format!(
            "tcp {} -> {} {} (snd_una {} write_seq {} rcv_nxt {}; {} bytes to send, \
             {} of them unsent; {} to read{})",
            c.local,
            c.peer,
            tcp::state_name(c.state).to_ascii_lowercase(),
            c.send_seq.wrapping_sub(c.send_queue.len() as u32),
            c.send_seq,
            c.recv_seq,
            c.send_queue.len(),
            c.unsent,
            c.recv_queue.len(),
            if c.options.nodelay { "; nodelay" } else { "" }
        ),
    }
}

// ---------------------------------------------------------------------------------------
// Restore

/// The state of the fd table while it is being built in the restoring child.
pub struct Installer<'a> {
    pub m: &'a Manifest,
    pub p: &'a Process,
    pub high: RawFd,
    /// Fds created here (all >= `high`), closed once the table is built (or when the
    /// installer is dropped on an error). The maps below hold the numbers of these, or of
    /// `borrowed` ones; [`Installer::fd`] lends either by number.
    temps: HashMap<RawFd, OwnedFd>,
    /// Fds the installer uses but does not own: the caller's stdio copies, the listeners
    /// given, and what the root made for the tree ([`Inherited`]), all open for as long as
    /// the installer lives.
    borrowed: HashMap<RawFd, BorrowedFd<'a>>,
    pub pipes: HashMap<u64, (RawFd, RawFd)>,
    pub unix_pairs: HashMap<u64, (RawFd, RawFd)>,
    /// Parked restore: epolls do not watch the stdio placeholders yet
    /// ([`late_epoll_targets`] are added once the real stdio is in place) and timerfds
    /// are not armed ([`late_timerfds`]).
    pub parked: bool,
    /// The tree's deleted files and memfds that are mapped (`Manifest::shared_files`
    /// ids), created by the root ([`Inherited::files`]).
    pub files: HashMap<u64, RawFd>,
    /// Opens of those files made by name by the root, by `Fd::ofd`.
    pub file_opens: HashMap<u32, RawFd>,
    /// Listening sockets given in place of recorded ones ([`Inherited::listeners`]).
    pub listeners: HashMap<u32, RawFd>,
    /// The masters of the app's own ptys, by index, created by the root.
    pub ptys: HashMap<u32, RawFd>,
}

impl<'a> Installer<'a> {
    /// An installer for `p` with nothing made yet, borrowing `borrowed`.
    ///
    /// # Safety
    /// Every number in `borrowed` is an open fd of this process that stays open, and is
    /// not closed by anyone else, for as long as the installer lives.
    unsafe fn new(
        m: &'a Manifest,
        p: &'a Process,
        high: RawFd,
        parked: bool,
        borrowed: impl IntoIterator<Item = RawFd>,
    ) -> Self {
        Installer {
            m,
            p,
            high,
            temps: HashMap::new(),
            borrowed: borrowed
                .into_iter()
                .filter(|&fd| fd >= 0)
                // SAFETY: open for the installer's life, as the caller guarantees.
                .map(|fd| (fd, unsafe { BorrowedFd::borrow_raw(fd) }))
                .collect(),
            pipes: HashMap::new(),
            unix_pairs: HashMap::new(),
            parked,
            files: HashMap::new(),
            file_opens: HashMap::new(),
            listeners: HashMap::new(),
            ptys: HashMap::new(),
        }
    }

    /// The fd numbered `n`, one the installer made ([`Installer::keep_high`]) or borrows:
    /// the only way from a number in its maps to an fd to act on.
    pub fn fd(&self, n: RawFd) -> Result<BorrowedFd<'_>> {
        match (self.temps.get(&n), self.borrowed.get(&n)) {
            (Some(t), _) => Ok(t.as_fd()),
            (None, Some(&b)) => Ok(b),
            (None, None) => Err(anyhow!(
                "fd {n} is none the restore made or was given (a bug)"
            )),
        }
    }

    /// Takes over a freshly created fd, moved above the app's highest fd (creation may
    /// not reuse a number before it is placed; a low original is closed once duplicated),
    /// and returns its number, which stays open as long as the installer holds it: until
    /// the table is built.
    pub fn keep_high(&mut self, fd: OwnedFd) -> Result<RawFd> {
        let fd = if fd.as_raw_fd() >= self.high {
            fd
        } else {
            dup_high(fd.as_raw_fd(), self.high)?
        };
        let raw = fd.as_raw_fd();
        self.temps.insert(raw, fd);
        Ok(raw)
    }
}

/// What a restored process inherits from the root of its tree (created there before
/// any fork): the open file descriptions, pipes and socket pairs that more than one
/// process holds, and every shared anonymous memory object. Created once, they are
/// shared exactly as at dump: a file offset moves for all, a pipe's bytes are there once.
#[derive(Debug, Default, Clone)]
pub struct Inherited {
    pub ofds: HashMap<u32, RawFd>,
    pub pipes: HashMap<u64, (RawFd, RawFd)>,
    pub unix_pairs: HashMap<u64, (RawFd, RawFd)>,
    /// Shared anonymous memory objects (`VmaKind::Shmem` ids), mapped by the restorer.
    pub shmem: HashMap<u64, RawFd>,
    /// Deleted files and memfds that are mapped (`SharedFile` ids): opened by
    /// `FileDesc::SharedFile` fds, mapped by the restorer.
    pub files: HashMap<u64, RawFd>,
    /// Opens of those files made when they were created (by `Fd::ofd`), see
    /// [`shared_file::restore`]; among `fds`.
    pub file_opens: HashMap<u32, RawFd>,
    /// Every fd above except the shmem and file ones, closed once the fd table is built.
    pub fds: Vec<RawFd>,
    /// Listening sockets the caller gives the instance in place of the ones it recorded
    /// (`run --listen`, `LISTEN_FDS`), by `Fd::ofd`; among `fds`.
    pub listeners: HashMap<u32, RawFd>,
    /// The masters of the app's own ptys by index (also among `ofds` and `fds`): a
    /// session leader makes one its controlling terminal before the fd table is built.
    pub ptys: HashMap<u32, RawFd>,
}

/// Whether an fd of this kind is created once for all the processes sharing it. The
/// caller's stdio is inherited anyway; an epoll's targets are fds of one process, so
/// each process gets its own (an epoll shared across processes is not shared again).
/// Ptys are created by the root in any case ([`pty::create_all`]).
fn shareable(f: &FileDesc) -> bool {
    !matches!(
        f,
        FileDesc::External { .. }
            | FileDesc::Epoll { .. }
            | FileDesc::PtyMaster { .. }
            | FileDesc::PtySlave { .. }
    )
}

/// In the root of the tree, before it forks: creates what [`Inherited`] lists.
pub fn prepare_shared(
    m: &Manifest,
    stdio: &[RawFd],
    high: RawFd,
    listeners: &HashMap<u32, RawFd>,
) -> Result<Inherited> {
    use std::collections::{BTreeMap, BTreeSet};
    let live: Vec<&Process> = m.processes.iter().filter(|p| p.zombie.is_none()).collect();
    let Some(&root) = live.first() else {
        return Ok(Inherited::default());
    };
    // SAFETY: the caller's stdio copies and the listeners given are open fds of this
    // process (`restore::child` made them) that it closes only after the tree exists.
    let mut ins = unsafe {
        Installer::new(
            m,
            root,
            high,
            false,
            stdio.iter().chain(listeners.values()).copied(),
        )
    };
    ins.listeners = listeners.clone();
    // Deleted files and memfds first (with every open of them): a shared open of one is
    // made from it below.
    let mut objects: BTreeMap<u64, BTreeMap<u32, i32>> = BTreeMap::new();
    for p in &live {
        for v in &p.vmas {
            if let warmstart_snapshots::model::VmaKind::SharedFile { id } = v.kind {
                objects.entry(id).or_default();
            }
        }
        for f in &p.fds {
            if let FileDesc::SharedFile { id, flags, .. } = f.file {
                objects.entry(id).or_default().insert(f.ofd, flags);
            }
        }
    }
    for (id, opens) in objects {
        let obj = m
            .shared_files
            .iter()
            .find(|o| o.id == id)
            .with_context(|| format!("the snapshot has no deleted file / memfd #{id}"))?;
        let opens: Vec<(u32, i32)> = opens.into_iter().collect();
        let (fd, made) = shared_file::create(obj, &opens)
            .with_context(|| format!("recreating {} ({} bytes)", obj.path, obj.size))?;
        let fd = ins.keep_high(fd)?;
        ins.files.insert(id, fd);
        for (ofd, fd) in made {
            let fd = ins.keep_high(fd)?;
            ins.file_opens.insert(ofd, fd);
        }
    }
    let mut ofds: BTreeMap<u32, (BTreeSet<i32>, &Fd)> = BTreeMap::new();
    let mut pipes: BTreeMap<u64, BTreeSet<i32>> = BTreeMap::new();
    let mut fifos: BTreeMap<(u64, &String), BTreeSet<i32>> = BTreeMap::new();
    let mut pairs: BTreeMap<u64, BTreeSet<i32>> = BTreeMap::new();
    for p in &live {
        for f in &p.fds {
            ofds.entry(f.ofd)
                .or_insert((BTreeSet::new(), f))
                .0
                .insert(p.pid);
            match &f.file {
                FileDesc::Pipe { pipe, .. } => {
                    pipes.entry(*pipe).or_default().insert(p.pid);
                }
                FileDesc::Fifo { path, fifo, .. } => {
                    fifos.entry((*fifo, path)).or_default().insert(p.pid);
                }
                FileDesc::UnixPair { pair, .. } => {
                    pairs.entry(*pair).or_default().insert(p.pid);
                }
                _ => {}
            }
        }
    }
    for (&id, procs) in &pipes {
        if procs.len() > 1 {
            pipe::ensure(&mut ins, id)
                .with_context(|| format!("restoring pipe {id} shared by processes {procs:?}"))?;
        }
    }
    for (&(id, path), procs) in &fifos {
        if procs.len() > 1 {
            pipe::ensure_fifo(&mut ins, path, id)
                .with_context(|| format!("restoring FIFO {path} shared by processes {procs:?}"))?;
        }
    }
    for (&id, procs) in &pairs {
        if procs.len() > 1 {
            unix::restore_pair(&mut ins, id, 0, 0).with_context(|| {
                format!("restoring unix socket pair {id} shared by processes {procs:?}")
            })?;
        }
    }
    // Listeners with connections waiting, and those connections' client ends: created
    // here whoever holds them, so that every connection is made in accept order.
    let mut shared = unix::restore_queues(&mut ins).context("restoring unix listeners' queues")?;
    shared.extend(pty::create_all(&mut ins, &live).context("restoring the app's ptys")?);
    for (&id, (procs, f)) in &ofds {
        if let FileDesc::Inotify { watches, .. } = &f.file {
            if procs.len() > 1 && watches.iter().any(|w| w.via_fd.is_some()) {
                bail!(
                    "processes {procs:?} share an inotify instance (fd {}) with a watch on a \
                     deleted file, which warmstart cannot restore shared",
                    f.fd
                );
            }
        }
        if procs.len() > 1 && shareable(&f.file) && !shared.contains_key(&id) {
            let fd = create(&mut ins, f, stdio).with_context(|| {
                format!(
                    "restoring {} shared by processes {procs:?}",
                    describe(&f.file)
                )
            })?;
            shared.insert(id, fd);
        }
    }
    let mut sizes: BTreeMap<u64, u64> = BTreeMap::new();
    for p in &live {
        for v in &p.vmas {
            if let warmstart_snapshots::model::VmaKind::Shmem { id } = v.kind {
                let end = sizes.entry(id).or_default();
                *end = (*end).max(v.offset + v.len());
            }
        }
    }
    let mut shmem = HashMap::new();
    for (&id, &size) in &sizes {
        let fd = shmem_object(size)
            .with_context(|| format!("creating shared anonymous memory {id} ({size} bytes)"))?;
        shmem.insert(id, ins.keep_high(fd)?);
    }
    let kept: Vec<RawFd> = shmem.values().chain(ins.files.values()).copied().collect();
    Ok(Inherited {
        ofds: shared,
        pipes: ins.pipes,
        unix_pairs: ins.unix_pairs,
        shmem,
        files: ins.files,
        file_opens: ins.file_opens,
        ptys: ins.ptys,
        // Handed over as numbers: every process of the tree has a copy and closes its own
        // (`install`, or `restore::child` for the shmem and file objects).
        fds: ins
            .temps
            .into_values()
            .map(std::os::fd::IntoRawFd::into_raw_fd)
            .filter(|fd| !kept.contains(fd))
            .chain(listeners.values().copied())
            .collect(),
        listeners: listeners.clone(),
    })
}

/// A new shared anonymous memory object of `size` bytes, as an fd: mapped
/// `MAP_SHARED | MAP_ANONYMOUS` once, then opened through `/proc/self/map_files`, so each
/// process that maps the fd shows the same `/dev/zero (deleted)` mapping as at dump
/// (a memfd would show as `/memfd:...`).
fn shmem_object(size: u64) -> Result<OwnedFd> {
    // SAFETY: a new anonymous mapping at an address of the kernel's choosing: no existing
    // memory is touched.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(errno_err("mmap(MAP_SHARED | MAP_ANONYMOUS)"));
    }
    let start = addr as u64;
    let fd = open_path(
        &format!("/proc/self/map_files/{:x}-{:x}", start, start + size),
        libc::O_RDWR,
        0,
    );
    // SAFETY: `addr`/`size` are exactly the mapping made above, which nothing else refers
    // to (the fd opened through `map_files` keeps the object alive on its own).
    unsafe { libc::munmap(addr, size as usize) };
    fd
}

/// The fds of `p` that are the caller's stdin, stdout or stderr: (fd, which, cloexec).
pub fn stdio_fds(p: &Process) -> Vec<(i32, u8, bool)> {
    p.fds
        .iter()
        .filter_map(|f| match f.file {
            FileDesc::External { stdio } if stdio < 3 => Some((f.fd, stdio, f.cloexec)),
            _ => None,
        })
        .collect()
}

/// What a parked process receives when it is handed out, where it goes: (app fd, index
/// in what arrives, close-on-exec). Indices 0-2 are the caller's stdio, 3 on the
/// snapshot's TCP listeners in [`inet::recorded_listeners`] order (a parked instance holds
/// a placeholder for each: its port stays free for the next instance).
pub fn late_places(m: &Manifest, p: &Process) -> Vec<(i32, u8, bool)> {
    let listeners = inet::recorded_listeners(m);
    let mut out = stdio_fds(p);
    for f in &p.fds {
        if let Some(i) = listeners.iter().position(|l| l.ofd == f.ofd) {
            out.push((f.fd, 3 + i as u8, f.cloexec));
        }
    }
    out
}

/// Registrations of `p`'s epolls on the fds it receives when handed out ([`late_places`]),
/// as (epoll fd, target): a parked restore adds them once those are in place (an epoll
/// cannot watch `/dev/null`, and a placeholder is not the socket to watch).
pub fn late_epoll_targets(m: &Manifest, p: &Process) -> Vec<(i32, EpollTarget)> {
    let stdio: Vec<i32> = late_places(m, p).iter().map(|s| s.0).collect();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for f in &p.fds {
        if let FileDesc::Epoll { targets, .. } = &f.file {
            if !seen.insert(f.ofd) {
                continue;
            }
            for t in targets.iter().filter(|t| stdio.contains(&t.fd)) {
                out.push((f.fd, *t));
            }
        }
    }
    out
}

/// A timerfd a parked restore arms when handed out ([`late_timerfds`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LateTimerFd {
    pub fd: i32,
    pub interval_ns: u64,
    /// `it_value`: relative, or the wall-clock deadline with `TFD_TIMER_ABSTIME`.
    pub value_ns: u64,
    /// Unread expirations.
    pub ticks: u64,
    /// `timerfd_settime` flags.
    pub settime_flags: i32,
}

/// The armed timerfds of `p`, once per open file description. An absolute timer on a
/// realtime clock is armed at its deadline; one on another clock absolute on the clocks
/// of the hand-out, which go on from the dump's (`m.clocks`): its deadline is the
/// dump's time plus what it had left.
pub fn late_timerfds(m: &Manifest, p: &Process) -> Vec<LateTimerFd> {
    let mut seen = HashSet::new();
    p.fds
        .iter()
        .filter_map(|f| match f.file {
            FileDesc::TimerFd {
                clockid,
                value_ns,
                interval_ns,
                ticks,
                settime_flags,
                realtime_deadline_ns,
                ..
            } if seen.insert(f.ofd) => {
                let value = timerfd::value_to_arm(value_ns, interval_ns);
                // The clocks of the hand-out start again from the dump's.
                let at_dump = |clock| match clock {
                    libc::CLOCK_MONOTONIC => u64::try_from(m.clocks.monotonic_ns).ok(),
                    libc::CLOCK_BOOTTIME | libc::CLOCK_BOOTTIME_ALARM => {
                        u64::try_from(m.clocks.boottime_ns).ok()
                    }
                    _ => None,
                };
                let (settime_flags, value_ns) = timerfd::how_to_arm(
                    clockid,
                    value,
                    settime_flags,
                    realtime_deadline_ns,
                    at_dump,
                );
                (value != 0 || ticks != 0).then_some(LateTimerFd {
                    fd: f.fd,
                    interval_ns,
                    value_ns,
                    ticks,
                    settime_flags,
                })
            }
            _ => None,
        })
        .collect()
}

/// Builds the app's fd table: each open file description once, then dup'ed to every
/// fd number that shares it. `stdio` are the caller's fds 0-2 (moved above `high`) and
/// the notify channel's app end when the snapshot has one; `inherited` what the root of
/// the tree created for several processes ([`prepare_shared`]).
pub fn install(
    m: &Manifest,
    p: &Process,
    stdio: &[RawFd],
    high: RawFd,
    inherited: &Inherited,
    parked: bool,
) -> Result<()> {
    let i = inherited;
    let numbers = (i.ofds.values().copied())
        .chain(i.pipes.values().flat_map(|&(r, w)| [r, w]))
        .chain(i.unix_pairs.values().flat_map(|&(a, b)| [a, b]))
        .chain(i.files.values().copied())
        .chain(i.file_opens.values().copied())
        .chain(i.listeners.values().copied())
        .chain(i.ptys.values().copied())
        .chain(stdio.iter().copied());
    // SAFETY: `stdio` and everything `inherited` lists are open fds of this process
    // (copies of what the root made before forking) that are closed only below, once the
    // installer is gone, or by `restore::child` after `install` returns.
    let mut ins = unsafe { Installer::new(m, p, high, parked, numbers) };
    ins.pipes = i.pipes.clone();
    ins.unix_pairs = i.unix_pairs.clone();
    ins.files = i.files.clone();
    ins.file_opens = i.file_opens.clone();
    ins.listeners = i.listeners.clone();
    ins.ptys = i.ptys.clone();
    let mut ofds: HashMap<u32, RawFd> = inherited.ofds.clone();
    let is_epoll = |f: &Fd| matches!(f.file, FileDesc::Epoll { .. });
    let is_inotify = |f: &Fd| matches!(f.file, FileDesc::Inotify { .. });
    // Inotify fds after the others (a watch on a deleted file is added through the fd
    // open on it), epolls last (they name fds of any kind, inotify included).
    let order = p
        .fds
        .iter()
        .filter(|f| !is_epoll(f) && !is_inotify(f))
        .chain(p.fds.iter().filter(|f| is_inotify(f)));
    // Inotify instances made here get their watches at the end.
    let mut watches = Vec::new();
    for f in order {
        let src = match (ofds.get(&f.ofd), &f.file) {
            (Some(&fd), _) => fd,
            (None, FileDesc::Inotify { flags, watches: w }) => {
                let fd = inotify::create(&mut ins)
                    .with_context(|| format!("restoring fd {} ({})", f.fd, describe(&f.file)))?;
                ofds.insert(f.ofd, fd);
                watches.push((f, *flags, w));
                fd
            }
            (None, _) => {
                let fd = create(&mut ins, f, stdio)
                    .with_context(|| format!("restoring fd {} ({})", f.fd, describe(&f.file)))?;
                ofds.insert(f.ofd, fd);
                fd
            }
        };
        place(ins.fd(src)?, f)?;
    }
    for f in epoll::install_order(p)? {
        let src = match ofds.get(&f.ofd) {
            Some(&fd) => fd,
            None => {
                let FileDesc::Epoll { flags, targets } = &f.file else {
                    unreachable!("install_order returns epolls only")
                };
                let fd = epoll::restore(&mut ins, *flags, targets)
                    .with_context(|| format!("restoring fd {} ({})", f.fd, describe(&f.file)))?;
                ofds.insert(f.ofd, fd);
                fd
            }
        };
        place(ins.fd(src)?, f)?;
    }
    // This process's temporaries: every `dup3` that needed them is done.
    drop(ins);
    for &fd in &inherited.fds {
        // SAFETY: `inherited.fds` are temporaries the root created for the tree before
        // forking (see `prepare_shared`); this process's copies are not referenced once its
        // table is built.
        unsafe { libc::close(fd) };
    }
    for (f, flags, w) in watches {
        // SAFETY: `f.fd` was placed above (`place`) and stays open: it is the app's.
        let fd = unsafe { BorrowedFd::borrow_raw(f.fd) };
        inotify::add_watches(fd, flags, w)
            .with_context(|| format!("restoring fd {} ({})", f.fd, describe(&f.file)))?;
    }
    locks::restore(m, p)
}

fn place(src: BorrowedFd<'_>, f: &Fd) -> Result<()> {
    use nix::fcntl::OFlag;
    let flags = if f.cloexec {
        OFlag::O_CLOEXEC
    } else {
        OFlag::empty()
    };
    // `dup3` replaces whatever was at `f.fd`, a number the snapshot assigns to this fd and
    // that nothing of ours uses (temporaries live above `high`).
    nix::unistd::dup3(src.as_raw_fd(), f.fd, flags)
        .map_err(|_| errno_err(format!("placing fd {}", f.fd)))?;
    Ok(())
}

/// Creates the open file description of `f` (any kind but epoll); returns a temp fd.
fn create(ins: &mut Installer, f: &Fd, stdio: &[RawFd]) -> Result<RawFd> {
    if let (Some(&given), FileDesc::Inet { flags, .. }) = (ins.listeners.get(&f.ofd), &f.file) {
        // The caller's listening socket, in place of the recorded one; the app's own
        // status flags (O_NONBLOCK) on it.
        let fd = dup_high(given, ins.high)?;
        set_status_flags(fd.as_fd(), *flags)?;
        return ins.keep_high(fd);
    }
    match &f.file {
        FileDesc::External { stdio: k } => stdio.get(*k as usize).copied().ok_or_else(|| {
            anyhow::anyhow!(
                "the snapshot expects external fd #{k}, which this restore does not provide"
            )
        }),
        FileDesc::Regular { .. }
        | FileDesc::Directory { .. }
        | FileDesc::CharDev { .. }
        | FileDesc::Ghost { .. } => regular::restore(ins, &f.file),
        FileDesc::Pipe { pipe, write, flags } => pipe::restore(ins, *pipe, f.ofd, *write, *flags),
        FileDesc::Fifo { path, fifo, flags } => pipe::restore_fifo(ins, path, *fifo, *flags),
        FileDesc::EventFd {
            count,
            semaphore,
            flags,
        } => eventfd::restore(ins, *count, *semaphore, *flags),
        FileDesc::TimerFd { .. } => timerfd::restore(ins, &f.file),
        FileDesc::SignalFd { mask, flags } => signalfd::restore(ins, *mask, *flags),
        FileDesc::Memfd { .. } => memfd::restore(ins, &f.file),
        FileDesc::UnixPair { pair, end, flags } => unix::restore_pair(ins, *pair, *end, *flags),
        FileDesc::Unix { .. } => unix::restore(ins, &f.file),
        FileDesc::UnixQueued { conn, .. } => Err(anyhow!(
            "the client end of unix connection {conn} was not created with its listener's \
             queue (corrupt manifest?)"
        )),
        FileDesc::Inet { .. } | FileDesc::TcpClosed { .. } | FileDesc::TcpEnded { .. } => {
            inet::restore(ins, &f.file)
        }
        FileDesc::Netlink {
            protocol,
            port,
            flags,
        } => netlink::restore(ins, *protocol, *port, *flags),
        FileDesc::Inotify { flags, watches } => inotify::restore(ins, *flags, watches),
        FileDesc::SharedFile { id, flags, pos } => shared_file::restore(ins, f, *id, *flags, *pos),
        FileDesc::Epoll { .. } => unreachable!("epolls are created after everything else"),
        FileDesc::TcpEstablished(c) => tcp::restore(ins, c),
        FileDesc::PtyMaster { .. } | FileDesc::PtySlave { .. } => Err(anyhow!(
            "a pty is created by the root of the tree, which did not create this one"
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Small helpers shared by the kinds

pub fn errno_err(what: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{what}: {}", std::io::Error::last_os_error())
}

/// `r < 0` → the errno as an error naming `what`.
pub fn check(r: libc::c_long, what: impl std::fmt::Display) -> Result<libc::c_long> {
    if r < 0 {
        Err(errno_err(what))
    } else {
        Ok(r)
    }
}

pub fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| anyhow!("path contains a NUL byte: {s:?}"))
}

/// The owner and permission bits of the file `meta` describes.
pub fn owner_of(meta: &std::fs::Metadata) -> FileOwner {
    use std::os::unix::fs::MetadataExt;
    FileOwner {
        uid: meta.uid(),
        gid: meta.gid(),
        mode: meta.mode() & 0o7777,
    }
}

/// Gives a file the restore created (as root, under its umask) the owner and mode it
/// had: `fchown` first, since it clears set-id bits that `fchmod` then sets.
pub fn set_owner(fd: BorrowedFd<'_>, o: &FileOwner, what: &str) -> Result<()> {
    use nix::unistd::{Gid, Uid};
    nix::unistd::fchown(
        fd.as_raw_fd(),
        Some(Uid::from_raw(o.uid)),
        Some(Gid::from_raw(o.gid)),
    )
    .map_err(|_| errno_err(format!("giving {what} its owner {}:{}", o.uid, o.gid)))?;
    let mode = nix::sys::stat::Mode::from_bits_retain(o.mode as libc::mode_t);
    nix::sys::stat::fchmod(fd.as_raw_fd(), mode)
        .map_err(|_| errno_err(format!("giving {what} its mode {:o}", o.mode)))?;
    Ok(())
}

/// A close-on-exec duplicate of `fd` numbered `min` or above.
pub fn dup_high(fd: RawFd, min: RawFd) -> Result<OwnedFd> {
    // SAFETY: integer arguments only (a bad `fd` is EBADF).
    let r = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) };
    if r < 0 {
        return Err(errno_err(format!("duplicating fd {fd}")));
    }
    // SAFETY: `fcntl(F_DUPFD_CLOEXEC)` succeeded: a new descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

/// `open(path, flags | O_CLOEXEC, mode)`.
pub fn open_path(path: &str, flags: i32, mode: u32) -> Result<OwnedFd> {
    let c = cstr(path)?;
    // SAFETY: `c` is a NUL-terminated path that lives across the call.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(errno_err(format!("opening {path}")));
    }
    // SAFETY: `open` succeeded: a new descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets the status flags that `F_SETFL` can change (`O_NONBLOCK`, `O_APPEND`, ...).
pub fn set_status_flags(fd: BorrowedFd<'_>, flags: i32) -> Result<()> {
    let fd = fd.as_raw_fd();
    const SETTABLE: i32 = libc::O_APPEND | libc::O_NONBLOCK | libc::O_ASYNC | libc::O_DIRECT;
    // SAFETY: F_GETFL takes no pointer.
    let cur = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if cur < 0 {
        return Err(errno_err("fcntl(F_GETFL)"));
    }
    let want = (cur & !SETTABLE) | (flags & SETTABLE);
    // SAFETY: F_SETFL takes an integer argument.
    if want != cur && unsafe { libc::fcntl(fd, libc::F_SETFL, want) } < 0 {
        return Err(errno_err(format!("fcntl(F_SETFL, {want:#o})")));
    }
    Ok(())
}

pub fn write_all(fd: BorrowedFd<'_>, data: &[u8], what: &str) -> Result<()> {
    let mut done = 0;
    while done < data.len() {
        match nix::unistd::write(fd, &data[done..]) {
            Ok(n) if n > 0 => done += n,
            _ => return Err(errno_err(format!("writing {what}"))),
        }
    }
    Ok(())
}

/// The whole contents of a file read with `pread` (the file offset stays where it is).
pub fn read_contents(fd: &OwnedFd, size: u64, what: &str) -> Result<Vec<u8>> {
    if size > MAX_INLINE_CONTENTS {
        anyhow::bail!(
            "{what} holds {size} bytes; files kept in the manifest are limited to {} MiB",
            MAX_INLINE_CONTENTS >> 20
        );
    }
    let mut data = vec![0u8; size as usize];
    let mut got = 0;
    while got < data.len() {
        // SAFETY: the pointer and length describe `data[got..]`, a live writable slice of
        // the buffer we own; `pread` writes at most that many bytes.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                data[got..].as_mut_ptr().cast(),
                data.len() - got,
                got as libc::off_t,
            )
        };
        if n < 0 {
            return Err(errno_err(format!("reading {what}")));
        }
        if n == 0 {
            data.truncate(got);
            break;
        }
        got += n as usize;
    }
    Ok(data)
}

pub fn getsockopt_int(fd: &impl AsRawFd, level: i32, opt: i32) -> std::io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are live locals and `len` is `v`'s size, so the kernel writes
    // at most one `c_int`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

pub fn setsockopt_int(fd: BorrowedFd<'_>, level: i32, opt: i32, v: i32, what: &str) -> Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: the option value points at `v`, a live `c_int`, and the length given is its
    // size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(errno_err(format!("setsockopt({what}, {v})")));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests_support {
    use warmstart_snapshots::model::Process;

    /// A process with nothing in it, for tests that need one.
    pub fn process() -> Process {
        Process {
            pid: 1,
            pgid: 1,
            sid: 1,
            comm: "t".into(),
            cwd: "/".into(),
            root: "/".into(),
            umask: 0o22,
            dumpable: 1,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_fields() {
        let i = FdInfo::parse(
            "pos:\t12\nflags:\t02004002\nmnt_id:\t16\nino:\t1057\neventfd-count:                5\n"
                .into(),
        );
        assert_eq!(i.pos, 12);
        assert_eq!(i.flags, 0o2004002);
        assert_eq!(i.field("eventfd-count"), Some("5"));
        assert_eq!(i.field("mnt"), None);
        assert_eq!(i.lines_with("ino:").count(), 1);
    }
}
