//! Pseudo-terminals the app opened itself: a pty master (`/dev/ptmx` or `/dev/pts/ptmx`)
//! held by a process of the tree, its slaves (`/dev/pts/N`), and the session whose
//! controlling terminal the slave is, as CRIU's `criu/tty.c` does it.
//!
//! A pty is the app's own when its master is held by a process of the tree: its index
//! is then private to the app. A slave (or a controlling terminal) whose master is not
//! in the tree is a terminal from outside (a shell's): refused unless `--shell-job`, as
//! before (see [`super::StdioPolicy`]).
//!
//! Dump ([`scan`], [`dump_master`], [`dump_slave`]) records per pty its index
//! (`TIOCGPTN`), line settings (`TCGETS2`) and their lock mask (`TIOCGLCKTRMIOS`), window
//! size, packet mode, lock state (`TIOCGPTLCK`), exclusive mode of both sides
//! (`TIOCGEXCL`), the owner and mode of `/dev/pts/N`, and the session and foreground
//! group whose controlling terminal it is (`TIOCGSID`, `TIOCGPGRP` on the master, mapped
//! to the app's pid namespace); per open file description its flags. Bytes queued in
//! either direction cannot be read without consuming them (CRIU reads them and writes
//! them back into the peer, where the line discipline processes them a second time:
//! echo, `\n` → `\r\n`), so a pty with queued bytes (`FIONREAD` on the master, and on a
//! slave fd of the tree, each after a zero-timeout `poll` that hands bytes still in the
//! tty's flip buffer to the line discipline) is refused, naming the process, fd and
//! direction. With no slave fd in the tree, the slave's side is not checked (opening one
//! to look would change the pty's state) and bytes queued there are lost. In canonical
//! mode `FIONREAD` counts complete lines only: a partial line being typed is not seen,
//! and is lost; so is the line discipline's column (tab expansion).
//!
//! Restore: the restoring root mounts a private devpts instance on `/dev/pts` in the
//! sandbox ([`mount_devpts`], with the options of the `/dev/pts` it replaces), so the
//! index is the snapshot's: a fresh instance numbers from 0, and `/dev/ptmx` is opened
//! until it hands out that index (CRIU's `__pty_open_ptmx_index`; the lower ones are
//! closed again). `/dev/pts/N` and `tty_nr` are then what they were. Every pty and every
//! open of its slaves is created by the root before it forks ([`create_all`]): unlocked,
//! slaves opened (`O_NOCTTY`; by path, or with `TIOCGPTPEER` when the app's open had no
//! `O_LARGEFILE`, as glibc's `openpty` does), settings applied through the master, owner
//! and mode of the slave set, locked again if it was. The session leader makes it its
//! controlling terminal (`TIOCSCTTY` on the master, right after `setsid` and before it
//! forks, so the members of its session inherit it: [`take_ctty`]); once every process
//! group exists, the foreground group is set (`TIOCSPGRP`) and a process that had no
//! controlling terminal at the dump drops the one it inherited (`TIOCNOTTY`:
//! [`after_groups`]).

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

use anyhow::{anyhow, bail, Context, Result};
use warmstart_snapshots::model::{FileDesc, Manifest, Process, Pty, Termios};

use super::{errno_err, open_path, Installer, Target};
use crate::sys::pidfd;

const TCGETS2: libc::c_ulong = 0x802C_542A;
const TCSETS2: libc::c_ulong = 0x402C_542B;
const TIOCGLCKTRMIOS: libc::c_ulong = 0x5456;
const TIOCSLCKTRMIOS: libc::c_ulong = 0x5457;
const TIOCGPTN: libc::c_ulong = 0x8004_5430;
const TIOCSPTLCK: libc::c_ulong = 0x4004_5431;
const TIOCGPKT: libc::c_ulong = 0x8004_5438;
const TIOCGPTLCK: libc::c_ulong = 0x8004_5439;
const TIOCGEXCL: libc::c_ulong = 0x8004_5440;
const TIOCGPTPEER: libc::c_ulong = 0x5441;
const NCCS: usize = 19;

/// `struct termios2` (the kernel's).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Termios2 {
    iflag: u32,
    oflag: u32,
    cflag: u32,
    lflag: u32,
    line: u8,
    cc: [u8; NCCS],
    ispeed: u32,
    ospeed: u32,
}

/// The kernel's `struct termios` (no speeds), what `TIOC[GS]LCKTRMIOS` take.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Termios1 {
    iflag: u32,
    oflag: u32,
    cflag: u32,
    lflag: u32,
    line: u8,
    cc: [u8; NCCS],
}

/// Whether `meta` is a pty master: `/dev/ptmx` or a devpts `ptmx` (5:2).
pub fn is_master(meta: &std::fs::Metadata) -> bool {
    meta.mode() & libc::S_IFMT == libc::S_IFCHR && meta.rdev() == libc::makedev(5, 2)
}

/// The index N of a pty slave `/dev/pts/N` (majors 136-143).
pub fn slave_index(meta: &std::fs::Metadata) -> Option<u32> {
    let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
    (meta.mode() & libc::S_IFMT == libc::S_IFCHR && (136..=143).contains(&major))
        .then(|| (major - 136) * 256 + minor)
}

/// The index of the pty a `/proc/PID/stat` `tty_nr` names, if it is a pty slave.
pub fn tty_nr_index(tty_nr: u64) -> Option<u32> {
    let major = ((tty_nr >> 8) & 0xfff) as u32;
    let minor = ((tty_nr & 0xff) | ((tty_nr >> 12) & 0xfff00)) as u32;
    (tty_nr != 0 && (136..=143).contains(&major)).then(|| (major - 136) * 256 + minor)
}

/// The controlling terminal of `pid` (`/proc/PID/stat` field 7, `tty_nr`) when it is a
/// pty of the app's own: its index.
pub fn ctty_of(pid: i32, own: &Own) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    // Fields start at 3 after the comm: tty_nr is the fifth.
    let tty_nr: u64 = rest.split(' ').nth(4)?.parse().ok()?;
    tty_nr_index(tty_nr).filter(|&i| own.owns(i))
}

/// An fd of a process of the tree: (pid as seen here, fd).
type Where = (i32, i32);

/// The ptys of a tree, found before its fds are collected.
#[derive(Default)]
pub struct Own {
    /// Index → the first master fd seen, and the device of its devpts instance.
    masters: HashMap<u32, (Where, u64)>,
    /// Index → the first slave fd seen on that devpts instance (for the slave side's
    /// state: exclusive mode, queued bytes).
    slaves: HashMap<u32, Where>,
}

impl Own {
    /// Whether pty `index` is the app's own (its master is in the tree) and `meta` (a
    /// slave) lives on the devpts instance of that master.
    pub fn owns_slave(&self, index: u32, meta: &std::fs::Metadata) -> bool {
        self.masters
            .get(&index)
            .is_some_and(|&(_, dev)| dev == meta.dev())
    }

    pub fn owns(&self, index: u32) -> bool {
        self.masters.contains_key(&index)
    }
}

/// The device of the devpts instance a master at `link` of process `pid` belongs to:
/// `/dev/pts/ptmx` is on it; `/dev/ptmx` reaches the `pts` beside it.
fn devpts_of(pid: i32, link: &str, meta: &std::fs::Metadata) -> u64 {
    if link.ends_with("/pts/ptmx") {
        return meta.dev();
    }
    let dir = link.strip_suffix("ptmx").unwrap_or("/dev/");
    std::fs::metadata(format!("/proc/{pid}/root{dir}pts"))
        .map(|m| m.dev())
        .unwrap_or(0)
}

fn ioctl_int(fd: &OwnedFd, req: libc::c_ulong) -> std::io::Result<i32> {
    let mut v: libc::c_int = 0;
    // SAFETY: the request writes one int into `v`, which lives across the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req, &mut v as *mut libc::c_int) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

/// Finds the pty masters held by the processes `pids` (and slave fds on them).
pub fn scan(pids: &[i32]) -> Result<Own> {
    let mut own = Own::default();
    let mut slaves: Vec<(u32, Where, u64)> = Vec::new();
    for &pid in pids {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue; // a zombie
        };
        let mut nums: Vec<i32> = dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        nums.sort_unstable();
        let mut pidfd = None;
        for fd in nums {
            let path = format!("/proc/{pid}/fd/{fd}");
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if let Some(index) = slave_index(&meta) {
                slaves.push((index, (pid, fd), meta.dev()));
                continue;
            }
            if !is_master(&meta) {
                continue;
            }
            let link = std::fs::read_link(&path)
                .map(|l| l.to_string_lossy().into_owned())
                .unwrap_or_default();
            if pidfd.is_none() {
                pidfd =
                    Some(pidfd::pidfd_open(pid, 0).with_context(|| format!("pidfd_open({pid})"))?);
            }
            let copy = pidfd::pidfd_getfd(pidfd.as_ref().expect("opened above"), fd)
                .with_context(|| format!("pidfd_getfd of process {pid} fd {fd} ({link})"))?;
            let index = ioctl_int(&copy, TIOCGPTN)
                .with_context(|| format!("TIOCGPTN of process {pid} fd {fd} ({link})"))?;
            own.masters
                .entry(index as u32)
                .or_insert(((pid, fd), devpts_of(pid, &link, &meta)));
        }
    }
    for (index, at, dev) in slaves {
        if own.masters.get(&index).is_some_and(|&(_, d)| d == dev) {
            own.slaves.entry(index).or_insert(at);
        }
    }
    Ok(own)
}

fn copy_of(at: Where) -> Result<OwnedFd> {
    let pidfd = pidfd::pidfd_open(at.0, 0).with_context(|| format!("pidfd_open({})", at.0))?;
    pidfd::pidfd_getfd(&pidfd, at.1)
        .with_context(|| format!("pidfd_getfd of process {} fd {}", at.0, at.1))
}

/// The pid `host_pid` (as seen here) has in the app's own pid namespace.
fn pid_in_ns(host_pid: i32) -> i32 {
    crate::dump::process::pid_in_own_ns(host_pid).unwrap_or(host_pid)
}

/// `FIONREAD` of `fd`, refused with the reason when bytes are queued there.
fn refuse_queued(t: &Target, fd: &OwnedFd, index: u32, what: &str, whose: &str) -> Result<()> {
    // Bytes just written wait in the tty's flip buffer until a worker hands them to the
    // line discipline, and FIONREAD counts only the latter; a poll (which reads nothing)
    // flushes that work first.
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd that lives across the call; zero timeout.
    unsafe { libc::poll(&mut p, 1, 0) };
    let n = ioctl_int(fd, libc::FIONREAD).with_context(|| format!("FIONREAD of {whose}"))?;
    if n > 0 {
        bail!(
            "process {} ({}): fd {} is {what} of the pty /dev/pts/{index}, and {n} bytes \
             are queued {}: a terminal's queued bytes cannot be read without consuming \
             them, so warmstart cannot checkpoint it now (read them first, or dump when \
             the terminal is drained)",
            t.pid,
            t.comm,
            t.fd,
            whose
        );
    }
    Ok(())
}

/// A pty master of the app's own (its index is in `own`).
pub fn dump_master(t: &Target, own: &Own) -> Result<FileDesc> {
    let copy = t.copy()?;
    let ctx = |what: &str| format!("{what} of {}", t.context());
    let index = ioctl_int(&copy, TIOCGPTN).with_context(|| ctx("TIOCGPTN"))? as u32;
    refuse_queued(
        t,
        &copy,
        index,
        "the master",
        "for the master to read (written by the slave side)",
    )?;
    let mut t2 = Termios2::default();
    // SAFETY: TCGETS2 writes a struct termios2 into `t2`, which lives across the call.
    if unsafe { libc::ioctl(copy.as_raw_fd(), TCGETS2, &mut t2 as *mut Termios2) } < 0 {
        return Err(errno_err(ctx("TCGETS2")));
    }
    let mut locked = Termios1::default();
    // SAFETY: TIOCGLCKTRMIOS writes the kernel's struct termios into `locked`.
    if unsafe {
        libc::ioctl(
            copy.as_raw_fd(),
            TIOCGLCKTRMIOS,
            &mut locked as *mut Termios1,
        )
    } < 0
    {
        return Err(errno_err(ctx("TIOCGLCKTRMIOS")));
    }
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a struct winsize into `ws`.
    if unsafe {
        libc::ioctl(
            copy.as_raw_fd(),
            libc::TIOCGWINSZ,
            &mut ws as *mut libc::winsize,
        )
    } < 0
    {
        return Err(errno_err(ctx("TIOCGWINSZ")));
    }
    let packet_mode = ioctl_int(&copy, TIOCGPKT).with_context(|| ctx("TIOCGPKT"))? != 0;
    let is_locked = ioctl_int(&copy, TIOCGPTLCK).with_context(|| ctx("TIOCGPTLCK"))? != 0;
    let master_exclusive = ioctl_int(&copy, TIOCGEXCL).with_context(|| ctx("TIOCGEXCL"))? != 0;
    // No session: ENOTTY. Pids as seen here, mapped to the app's namespace.
    let sid = ioctl_int(&copy, libc::TIOCGSID).unwrap_or(0);
    let pgrp = if sid > 0 {
        ioctl_int(&copy, libc::TIOCGPGRP).unwrap_or(0)
    } else {
        0
    };
    let (sid, pgrp) = (
        if sid > 0 { pid_in_ns(sid) } else { 0 },
        if pgrp > 0 { pid_in_ns(pgrp) } else { 0 },
    );
    let mut slave_exclusive = false;
    let mut slave_owner = None;
    if let Some(&at) = own.slaves.get(&index) {
        let slave = copy_of(at)?;
        slave_exclusive = ioctl_int(&slave, TIOCGEXCL)
            .with_context(|| format!("TIOCGEXCL of process {} fd {}", at.0, at.1))?
            != 0;
        refuse_queued(
            t,
            &slave,
            index,
            "the master",
            &format!(
                "for the slave to read (written by the master; seen through fd {} of \
                 process {})",
                at.1, at.0
            ),
        )?;
        if let Ok(m) = std::fs::metadata(format!("/proc/{}/fd/{}", at.0, at.1)) {
            slave_owner = Some(super::owner_of(&m));
        }
    }
    let slave_owner = match slave_owner {
        Some(o) => o,
        None => {
            let dir = t.link.strip_suffix("ptmx").unwrap_or("/dev/");
            let dir = if dir.ends_with("/pts/") {
                dir.to_owned()
            } else {
                format!("{dir}pts/")
            };
            let m = std::fs::metadata(format!("/proc/{}/root{dir}{index}", t.pid))
                .with_context(|| ctx(&format!("stat of the slave {dir}{index}")))?;
            super::owner_of(&m)
        }
    };
    Ok(FileDesc::PtyMaster {
        path: t.link.to_owned(),
        flags: t.flags(),
        pty: Box::new(Pty {
            index,
            termios: Termios {
                iflag: t2.iflag,
                oflag: t2.oflag,
                cflag: t2.cflag,
                lflag: t2.lflag,
                line: t2.line,
                cc: t2.cc.to_vec(),
                ispeed: t2.ispeed,
                ospeed: t2.ospeed,
            },
            termios_locked: Termios {
                iflag: locked.iflag,
                oflag: locked.oflag,
                cflag: locked.cflag,
                lflag: locked.lflag,
                line: locked.line,
                cc: locked.cc.to_vec(),
                ispeed: 0,
                ospeed: 0,
            },
            winsize: [ws.ws_row, ws.ws_col, ws.ws_xpixel, ws.ws_ypixel],
            packet_mode,
            locked: is_locked,
            master_exclusive,
            slave_exclusive,
            sid,
            pgrp,
            slave_owner,
        }),
    })
}

/// An open of the slave of a pty of the app's own.
pub fn dump_slave(t: &Target, index: u32) -> Result<FileDesc> {
    let copy = t.copy()?;
    refuse_queued(
        t,
        &copy,
        index,
        "the slave",
        "for the slave to read (written by the master)",
    )?;
    Ok(FileDesc::PtySlave {
        index,
        flags: t.flags(),
    })
}

// ---------------------------------------------------------------------------------------
// Restore

/// Whether the snapshot has a pty of the app's own.
pub fn any(m: &Manifest) -> bool {
    m.processes
        .iter()
        .flat_map(|p| &p.fds)
        .any(|f| matches!(f.file, FileDesc::PtyMaster { .. }))
}

/// In the restoring root (the sandbox's own mount namespace), when the snapshot has a
/// pty: a new devpts instance on `/dev/pts`, with the options of the one it covers
/// (`gid=5,mode=620,ptmxmode=000` on most hosts), so that indices are free to choose and
/// the slaves' owner and mode are the same.
pub fn mount_devpts(m: &Manifest) -> Result<()> {
    if !any(m) {
        return Ok(());
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS ... - FSTYPE SOURCE SUPEROPTS"
    let opts = info
        .lines()
        .rev()
        .find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let sep = w.iter().position(|x| *x == "-")?;
            (w.get(4) == Some(&"/dev/pts") && w.get(sep + 1) == Some(&"devpts"))
                .then(|| w.get(sep + 3).copied().unwrap_or("").to_owned())
        })
        .unwrap_or_default();
    let keep: Vec<&str> = opts
        .split(',')
        .filter(|o| {
            o.starts_with("gid=")
                || o.starts_with("mode=")
                || o.starts_with("ptmxmode=")
                || o.starts_with("uid=")
                || o.starts_with("max=")
        })
        .collect();
    let data = super::cstr(&format!("newinstance,{}", keep.join(",")))?;
    // SAFETY: NUL-terminated strings that live across the call.
    let r = unsafe {
        libc::mkdir(c"/dev/pts".as_ptr(), 0o755);
        libc::mount(
            c"devpts".as_ptr(),
            c"/dev/pts".as_ptr(),
            c"devpts".as_ptr(),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            data.as_ptr().cast(),
        )
    };
    if r < 0 {
        return Err(errno_err(format!(
            "mounting a devpts instance of the instance's own on /dev/pts ({})",
            data.to_string_lossy()
        )));
    }
    Ok(())
}

fn ioctl_set(fd: RawFd, req: libc::c_ulong, v: libc::c_int, what: &str) -> Result<()> {
    // SAFETY: the request reads one int from `v`, which lives across the call.
    if unsafe { libc::ioctl(fd, req, &v as *const libc::c_int) } < 0 {
        return Err(errno_err(what));
    }
    Ok(())
}

/// Opens `path` (a ptmx) until it hands out pty `index`; the other ptys opened on the
/// way are pushed to `fillers` (closed once every pty exists). A fresh devpts instance
/// hands out the lowest free index, so in index order each pty takes a bounded number
/// of opens.
fn open_index(path: &str, index: u32, flags: i32, fillers: &mut Vec<OwnedFd>) -> Result<OwnedFd> {
    loop {
        let fd = open_path(path, flags | libc::O_NOCTTY, 0)?;
        let got = ioctl_int(&fd, TIOCGPTN).with_context(|| format!("TIOCGPTN of {path}"))?;
        if got as u32 == index {
            return Ok(fd);
        }
        fillers.push(fd);
        if got as u32 > index {
            bail!(
                "{path} handed out pty {got} before {index}: /dev/pts/{index} is taken in \
                 this devpts instance"
            );
        }
    }
}

fn set_termios(fd: RawFd, p: &Pty) -> Result<()> {
    let mut cc = [0u8; NCCS];
    for (d, s) in cc.iter_mut().zip(&p.termios.cc) {
        *d = *s;
    }
    let t = Termios2 {
        iflag: p.termios.iflag,
        oflag: p.termios.oflag,
        cflag: p.termios.cflag,
        lflag: p.termios.lflag,
        line: p.termios.line,
        cc,
        ispeed: p.termios.ispeed,
        ospeed: p.termios.ospeed,
    };
    // SAFETY: TCSETS2 reads a struct termios2 from `t`, which lives across the call.
    if unsafe { libc::ioctl(fd, TCSETS2, &t as *const Termios2) } < 0 {
        return Err(errno_err("TCSETS2"));
    }
    let l = &p.termios_locked;
    if l.iflag | l.oflag | l.cflag | l.lflag != 0 || l.line != 0 || l.cc.iter().any(|&c| c != 0) {
        let mut cc = [0u8; NCCS];
        for (d, s) in cc.iter_mut().zip(&l.cc) {
            *d = *s;
        }
        let t1 = Termios1 {
            iflag: l.iflag,
            oflag: l.oflag,
            cflag: l.cflag,
            lflag: l.lflag,
            line: l.line,
            cc,
        };
        // SAFETY: TIOCSLCKTRMIOS reads the kernel's struct termios from `t1`.
        if unsafe { libc::ioctl(fd, TIOCSLCKTRMIOS, &t1 as *const Termios1) } < 0 {
            return Err(errno_err("TIOCSLCKTRMIOS"));
        }
    }
    let ws = libc::winsize {
        ws_row: p.winsize[0],
        ws_col: p.winsize[1],
        ws_xpixel: p.winsize[2],
        ws_ypixel: p.winsize[3],
    };
    // SAFETY: TIOCSWINSZ reads a struct winsize from `ws`.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws as *const libc::winsize) } < 0 {
        return Err(errno_err("TIOCSWINSZ"));
    }
    Ok(())
}

/// Opens the slave of `master` (pty `index`) with `flags`: by path when the app's open
/// had `O_LARGEFILE` (an `open(2)`), else with `TIOCGPTPEER` (glibc's `openpty`), whose
/// open file description has no `O_LARGEFILE`; never as a controlling terminal.
fn open_slave(master: RawFd, index: u32, flags: i32) -> Result<OwnedFd> {
    const O_LARGEFILE: i32 = 0o100000;
    let base = flags & (libc::O_ACCMODE | libc::O_NONBLOCK) | libc::O_NOCTTY | libc::O_CLOEXEC;
    let fd = if flags & O_LARGEFILE != 0 {
        open_path(&format!("/dev/pts/{index}"), base, 0)?
    } else {
        // Without O_CLOEXEC: given to TIOCGPTPEER, it stays in the file's own flags (what
        // fdinfo shows), unlike open(2)'s; the fd is made close-on-exec afterwards.
        let flags = (base & !libc::O_CLOEXEC) as libc::c_ulong;
        // SAFETY: TIOCGPTPEER takes its flags by value and returns a new fd.
        let fd = unsafe { libc::ioctl(master, TIOCGPTPEER, flags) };
        if fd < 0 {
            return Err(errno_err(format!("TIOCGPTPEER of pty {index}")));
        }
        // SAFETY: `ioctl(TIOCGPTPEER)` succeeded: a new descriptor owned by nothing else.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: F_SETFD takes an integer argument; `fd` is the descriptor just made.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        fd
    };
    super::set_status_flags(fd.as_fd(), flags)?;
    Ok(fd)
}

/// In the root before it forks: every pty of the snapshot with its settings, and every
/// open file description of its master and slaves, by `Fd::ofd` (all above `ins.high`).
/// `ins.ptys` gets each pty's master by index.
pub fn create_all(ins: &mut Installer, live: &[&Process]) -> Result<HashMap<u32, RawFd>> {
    let mut masters: BTreeMap<u32, (u32, &str, i32, &Pty)> = BTreeMap::new();
    let mut slaves: BTreeMap<u32, (u32, i32)> = BTreeMap::new();
    for p in live {
        for f in &p.fds {
            match &f.file {
                FileDesc::PtyMaster { path, flags, pty } => {
                    masters
                        .entry(pty.index)
                        .or_insert((f.ofd, path.as_str(), *flags, pty));
                }
                FileDesc::PtySlave { index, flags } => {
                    slaves.entry(f.ofd).or_insert((*index, *flags));
                }
                _ => {}
            }
        }
    }
    let mut ofds = HashMap::new();
    if masters.is_empty() {
        return Ok(ofds);
    }
    let mut fillers = Vec::new();
    let made = (|| -> Result<()> {
        for (&index, &(ofd, path, flags, _)) in &masters {
            let no_create = !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL);
            let fd = open_index(path, index, flags & no_create, &mut fillers)
                .with_context(|| format!("opening pty {index} ({path})"))?;
            super::set_status_flags(fd.as_fd(), flags)?;
            let fd = ins.keep_high(fd)?;
            ins.ptys.insert(index, fd);
            ofds.insert(ofd, fd);
        }
        Ok(())
    })();
    // The ptys opened on the way to an index are closed; their indices are free again.
    drop(fillers);
    made?;
    for (&index, &(_, _, _, pty)) in &masters {
        let master = ins.ptys[&index];
        let what = |s: &str| format!("{s} of pty {index}");
        ioctl_set(master, TIOCSPTLCK, 0, &what("unlocking (TIOCSPTLCK)"))?;
        let mut first_slave = None;
        for (&ofd, &(i, flags)) in slaves.iter().filter(|(_, s)| s.0 == index) {
            let fd = open_slave(master, i, flags)
                .with_context(|| what("opening an open file description of the slave"))?;
            let fd = ins.keep_high(fd)?;
            first_slave.get_or_insert(fd);
            ofds.insert(ofd, fd);
        }
        set_termios(master, pty).with_context(|| what("line settings"))?;
        if pty.packet_mode {
            ioctl_set(master, libc::TIOCPKT, 1, &what("packet mode (TIOCPKT)"))?;
        }
        if pty.master_exclusive {
            // SAFETY: TIOCEXCL takes no argument.
            if unsafe { libc::ioctl(master, libc::TIOCEXCL) } < 0 {
                return Err(errno_err(what("TIOCEXCL of the master")));
            }
        }
        if let (true, Some(s)) = (pty.slave_exclusive, first_slave) {
            // SAFETY: TIOCEXCL takes no argument.
            if unsafe { libc::ioctl(s, libc::TIOCEXCL) } < 0 {
                return Err(errno_err(what("TIOCEXCL of the slave")));
            }
        }
        let path = super::cstr(&format!("/dev/pts/{index}"))?;
        let o = &pty.slave_owner;
        // SAFETY: a NUL-terminated path that lives across both calls.
        unsafe {
            if libc::chown(path.as_ptr(), o.uid, o.gid) < 0 {
                return Err(errno_err(what("giving the slave its owner")));
            }
            if libc::chmod(path.as_ptr(), (o.mode & 0o7777) as libc::mode_t) < 0 {
                return Err(errno_err(what("giving the slave its mode")));
            }
        }
        if pty.locked {
            ioctl_set(master, TIOCSPTLCK, 1, &what("locking (TIOCSPTLCK)"))?;
        }
    }
    Ok(ofds)
}

/// The pty of `m` with index `index`.
fn pty_of(m: &Manifest, index: u32) -> Option<&Pty> {
    m.processes
        .iter()
        .flat_map(|p| &p.fds)
        .find_map(|f| match &f.file {
            FileDesc::PtyMaster { pty, .. } if pty.index == index => Some(&**pty),
            _ => None,
        })
}

/// Right after `setsid` and before forking: a session leader whose controlling terminal
/// was a pty of the app's own takes it again (`TIOCSCTTY` on the master acts on the
/// slave), so the processes it forks inherit it.
pub fn take_ctty(p: &Process, ptys: &HashMap<u32, RawFd>) -> Result<()> {
    let Some(index) = p.ctty else {
        return Ok(());
    };
    if p.sid != p.pid {
        return Ok(());
    }
    let master = *ptys.get(&index).ok_or_else(|| {
        anyhow!(
            "process {}: its controlling terminal, pty {index}, is not in the snapshot",
            p.pid
        )
    })?;
    // SAFETY: TIOCSCTTY takes an int by value (0: do not steal it from another session).
    if unsafe { libc::ioctl(master, libc::TIOCSCTTY, 0) } < 0 {
        return Err(errno_err(format!(
            "making /dev/pts/{index} the controlling terminal of session {}",
            p.pid
        )));
    }
    Ok(())
}

/// Once every process group exists: the session leader gives its terminal its
/// foreground group; a process that had no controlling terminal at the dump but
/// inherited one here (it was forked before its leader took it, or dropped it since)
/// lets it go.
pub fn after_groups(m: &Manifest, p: &Process, ptys: &HashMap<u32, RawFd>) -> Result<()> {
    match p.ctty {
        Some(index) if p.sid == p.pid => {
            let pgrp = pty_of(m, index).map(|t| t.pgrp).unwrap_or(0);
            if pgrp > 0 {
                let master = ptys[&index];
                ioctl_set(
                    master,
                    libc::TIOCSPGRP,
                    pgrp,
                    &format!("making process group {pgrp} the foreground of /dev/pts/{index}"),
                )?;
            }
        }
        Some(_) => {}
        None => {
            let leader_has_one = m
                .processes
                .iter()
                .any(|q| q.pid == p.sid && q.ctty.is_some());
            if leader_has_one {
                // SAFETY: a static path; the fd is closed right after.
                let fd = unsafe {
                    libc::open(
                        c"/dev/tty".as_ptr(),
                        libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
                    )
                };
                if fd >= 0 {
                    // SAFETY: a fresh fd that nothing else owns.
                    let tty = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
                    // SAFETY: TIOCNOTTY takes no argument.
                    if unsafe { libc::ioctl(tty.as_raw_fd(), libc::TIOCNOTTY) } < 0 {
                        return Err(errno_err(format!("process {}: TIOCNOTTY", p.pid)));
                    }
                }
            }
        }
    }
    Ok(())
}

/// What the restore needs of a tree with ptys, checked at dump and before a restore:
/// a pty that is a session's controlling terminal has that session's leader in the
/// tree, with it as its controlling terminal.
pub fn check(m: &Manifest) -> Result<()> {
    for p in m.processes.iter().filter(|p| p.zombie.is_none()) {
        // Members inherit the terminal their leader takes before forking them.
        let Some(index) = p.ctty else { continue };
        let leader = m.processes.iter().find(|q| q.pid == p.sid);
        if !leader.is_some_and(|q| q.ctty == Some(index) && q.zombie.is_none()) {
            bail!(
                "process {} ({}) has the pty /dev/pts/{index} of the app as its controlling \
                 terminal, but the leader of its session {} is not in the tree with it: the \
                 session could not take it again",
                p.pid,
                p.comm,
                p.sid
            );
        }
    }
    for p in &m.processes {
        for f in &p.fds {
            let FileDesc::PtyMaster { pty, .. } = &f.file else {
                continue;
            };
            if pty.sid == 0 {
                continue;
            }
            let leader = m
                .processes
                .iter()
                .find(|q| q.pid == pty.sid && q.zombie.is_none());
            if !leader.is_some_and(|q| q.sid == q.pid && q.ctty == Some(pty.index)) {
                bail!(
                    "process {} ({}): fd {} is the master of the pty /dev/pts/{}, the \
                     controlling terminal of session {}, whose leader is not in the tree: \
                     the session could not take it again",
                    p.pid,
                    p.comm,
                    f.fd,
                    pty.index,
                    pty.sid
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tty_nr_names_pty_slaves_only() {
        // /dev/pts/3 (136:3), /dev/pts/300 (137:44), /dev/tty1 (4:1), none.
        assert_eq!(tty_nr_index((136 << 8) | 3), Some(3));
        let minor = 300u64 % 256;
        assert_eq!(tty_nr_index((137 << 8) | minor), Some(300));
        // A minor above 255 is split: its high bits go above the major.
        let (major, minor) = (136u64, 0x1_05u64);
        let nr = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
        assert_eq!(tty_nr_index(nr), Some(0x105));
        assert_eq!(tty_nr_index((4 << 8) | 1), None);
        assert_eq!(tty_nr_index(0), None);
    }

    #[test]
    fn a_terminal_needs_its_session_leader() {
        let proc_ = |pid, sid, ctty| Process {
            pid,
            sid,
            pgid: pid,
            ctty,
            ..Default::default()
        };
        let master = |sid| warmstart_snapshots::model::Fd {
            fd: 3,
            cloexec: false,
            ofd: 0,
            file: FileDesc::PtyMaster {
                path: "/dev/ptmx".into(),
                flags: libc::O_RDWR,
                pty: Box::new(Pty {
                    index: 4,
                    sid,
                    ..Default::default()
                }),
            },
        };
        let mut root = proc_(1, 1, None);
        root.fds.push(master(2));
        let ok = Manifest {
            processes: vec![root.clone(), proc_(2, 2, Some(4)), proc_(3, 2, Some(4))],
            ..Default::default()
        };
        check(&ok).unwrap();
        // The session's leader is not in the tree.
        let m = Manifest {
            processes: vec![root.clone(), proc_(3, 2, Some(4))],
            ..Default::default()
        };
        assert!(format!("{:#}", check(&m).unwrap_err()).contains("leader of its session 2"));
        // The terminal names a session whose leader does not have it.
        let m = Manifest {
            processes: vec![root, proc_(2, 2, None)],
            ..Default::default()
        };
        assert!(format!("{:#}", check(&m).unwrap_err()).contains("session 2, whose leader"));
    }

    #[test]
    fn master_and_slave_of_a_real_pty() {
        let Ok(m) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/ptmx")
        else {
            return; // no ptys here
        };
        let meta = m.metadata().unwrap();
        assert!(is_master(&meta));
        assert_eq!(slave_index(&meta), None);
        let m = OwnedFd::from(m);
        let index = ioctl_int(&m, TIOCGPTN).unwrap() as u32;
        ioctl_set(m.as_raw_fd(), TIOCSPTLCK, 0, "unlock").unwrap();
        let s = std::fs::metadata(format!("/dev/pts/{index}")).unwrap();
        assert_eq!(slave_index(&s), Some(index));
        assert!(!is_master(&s));
    }
}
