//! inotify: each watch is a line of fdinfo,
//!
//! ```text
//! inotify wd:1 ino:4a2 sdev:800001 mask:100 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:a2040000b1a2c3d4
//! ```
//!
//! which names the watched inode but not its path. The path comes from the file handle:
//! `open_by_handle_at` (needs CAP_DAC_READ_SEARCH) on a mount of the device `sdev` (the
//! kernel's internal dev_t: major << 20 | minor) opens the inode, and its
//! `/proc/self/fd` link is the path. A watch on a deleted inode (a file deleted while
//! still open: the kernel keeps the watch until the last reference goes) is recorded with
//! an fd of the same process open on that inode (found by device and inode number); at
//! restore the watch is added through `/proc/self/fd/N` of that fd, on the restored
//! deleted file. With no such fd (only a mapping or another process holds the inode) it
//! is refused.
//!
//! Restore adds the watches in wd order; wds are handed out cyclically, so a gap (a
//! removed watch) is reproduced by adding and removing a throwaway watch. Unread events
//! would be lost: an inotify with events queued is refused. Inotify fds are restored
//! after the process's other fds are in place (watches through them need them).

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{anyhow, bail, Context, Result};
use warmstart_snapshots::model::{FileDesc, InotifyWatch};

use super::{cstr, errno_err, FdInfo, Installer, Target};

#[derive(Debug, PartialEq, Eq)]
struct RawWatch {
    wd: i32,
    ino: u64,
    sdev: u32,
    mask: u32,
    handle_type: i32,
    handle: Vec<u8>,
}

fn parse(info: &FdInfo) -> Result<Vec<RawWatch>> {
    info.lines_with("inotify ")
        .map(|line| {
            let mut w = RawWatch {
                wd: -1,
                ino: 0,
                sdev: 0,
                mask: 0,
                handle_type: 0,
                handle: Vec::new(),
            };
            for kv in line.split_whitespace() {
                let Some((k, v)) = kv.split_once(':') else {
                    continue;
                };
                let hex = || u32::from_str_radix(v, 16);
                match k {
                    "wd" => w.wd = hex()? as i32,
                    "ino" => w.ino = u64::from_str_radix(v, 16)?,
                    "sdev" => w.sdev = hex()?,
                    "mask" => w.mask = hex()?,
                    "fhandle-type" => w.handle_type = hex()? as i32,
                    "f_handle" => {
                        w.handle = (0..v.len() / 2)
                            .map(|i| u8::from_str_radix(&v[2 * i..2 * i + 2], 16))
                            .collect::<Result<_, _>>()?
                    }
                    _ => {}
                }
            }
            if w.wd < 0 || w.handle.is_empty() {
                bail!("inotify watch line without wd or file handle: {line:?}");
            }
            Ok(w)
        })
        .collect()
}

pub fn dump(t: &Target) -> Result<FileDesc> {
    let copy = t.copy()?;
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one `c_int` to the pointer given, the live local `queued`;
    // `copy` is ours.
    if unsafe { libc::ioctl(copy.as_raw_fd(), libc::FIONREAD, &mut queued) } == 0 && queued > 0 {
        return Err(t.refuse(format_args!(
            "an inotify instance with {queued} bytes of unread events"
        )));
    }
    let mut watches = Vec::new();
    for w in parse(t.info).with_context(|| t.context())? {
        let resolved = resolve(&w).map_err(|e| {
            t.refuse(format_args!(
                "an inotify instance whose watch {} cannot be resolved to a path ({e:#})",
                w.wd
            ))
        })?;
        let (path, via_fd) = match resolved {
            Resolved::Path(p) => (p, None),
            Resolved::Deleted(p) => {
                let fd = fd_on(t, &w).ok_or_else(|| {
                    t.refuse(format_args!(
                        "an inotify instance whose watch {} is on the deleted file {p}, which \
                         this process has no fd open on (only such a watch can be restored)",
                        w.wd
                    ))
                })?;
                (p, Some(fd))
            }
        };
        watches.push(InotifyWatch {
            wd: w.wd,
            mask: w.mask,
            path,
            via_fd,
        });
    }
    watches.sort_by_key(|w| w.wd);
    Ok(FileDesc::Inotify {
        flags: t.flags(),
        watches,
    })
}

/// An fd of the target's process open on the inode of watch `w` (device and inode).
fn fd_on(t: &Target, w: &RawWatch) -> Option<i32> {
    use std::os::unix::fs::MetadataExt;
    // The kernel's dev_t (major << 20 | minor) as userspace encodes it.
    let dev = libc::makedev(w.sdev >> 20, w.sdev & 0xf_ffff);
    t.all_fds.iter().copied().find(|&fd| {
        fd != t.fd
            && std::fs::metadata(format!("/proc/{}/fd/{fd}", t.pid))
                .is_ok_and(|m| m.dev() == dev && m.ino() == w.ino)
    })
}

enum Resolved {
    Path(String),
    /// The inode is deleted; the path it had.
    Deleted(String),
}

/// The path of the inode a watch is on, through its file handle.
fn resolve(w: &RawWatch) -> Result<Resolved> {
    let (major, minor) = (w.sdev >> 20, w.sdev & 0xf_ffff);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    // Fields: id parent major:minor root mount-point ...; prefer a mount of the whole fs.
    let mut mounts: Vec<(&str, &str)> = mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&format!("{major}:{minor}").as_str())).then(|| (f[3], f[4]))
        })
        .collect();
    mounts.sort_by_key(|(root, _)| *root != "/");
    let (_, mount_point) = mounts
        .first()
        .ok_or_else(|| anyhow!("no mount of device {major}:{minor}"))?;
    // SAFETY: the path is a NUL-terminated temporary that lives until the end of the
    // statement, i.e. across the call; the fd returned is owned right below.
    let mfd = unsafe {
        libc::open(
            cstr(mount_point)?.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if mfd < 0 {
        return Err(errno_err(format!("opening mount point {mount_point}")));
    }
    // SAFETY: `open` succeeded: a new descriptor owned by nothing else.
    let mfd = unsafe { OwnedFd::from_raw_fd(mfd) };
    // struct file_handle { u32 handle_bytes; int handle_type; unsigned char f_handle[]; }
    let mut fh = Vec::with_capacity(8 + w.handle.len());
    fh.extend_from_slice(&(w.handle.len() as u32).to_ne_bytes());
    fh.extend_from_slice(&w.handle_type.to_ne_bytes());
    fh.extend_from_slice(&w.handle);
    // SAFETY: `fh` is a `struct file_handle` laid out by hand (u32 `handle_bytes`, int
    // `handle_type`, then exactly `handle_bytes` bytes), live across the call; the kernel
    // reads `handle_bytes` first and no more than that after the header.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mfd.as_raw_fd(),
            fh.as_ptr(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(errno_err("open_by_handle_at (needs CAP_DAC_READ_SEARCH)"));
    }
    // SAFETY: `open_by_handle_at` succeeded: a new descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    let path = path.to_string_lossy().into_owned();
    if !path.starts_with('/') {
        bail!("the watched inode is {path}");
    }
    Ok(match path.strip_suffix(" (deleted)") {
        Some(p) => Resolved::Deleted(p.to_owned()),
        None => Resolved::Path(path),
    })
}

pub fn restore(ins: &mut Installer, flags: i32, watches: &[InotifyWatch]) -> Result<RawFd> {
    let fd = create(ins)?;
    add_watches(ins.fd(fd)?, flags, watches)?;
    Ok(fd)
}

/// A new inotify instance without watches, non-blocking until [`add_watches`].
pub fn create(ins: &mut Installer) -> Result<RawFd> {
    // SAFETY: a plain syscall; the fd returned is owned right below.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if fd < 0 {
        return Err(errno_err("inotify_init1"));
    }
    // SAFETY: the call above succeeded: a new descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    ins.keep_high(fd)
}

/// Adds `watches` in wd order to the instance at `fd` (from [`create`]), then sets its
/// status `flags`. A watch on a deleted file is added through the fd open on it: only
/// once the restore's other opens of that inode are closed, since closing the last
/// reference to one of its names (an `O_TMPFILE` one, say) drops every watch of a deleted
/// inode.
pub fn add_watches(fd: BorrowedFd<'_>, flags: i32, watches: &[InotifyWatch]) -> Result<()> {
    let raw = fd.as_raw_fd();
    let mut next = 1;
    for w in watches {
        // Skip the wds of watches removed before the dump.
        while next < w.wd {
            // SAFETY: a static NUL-terminated path; `fd` is the inotify instance being
            // restored. The watch made is removed at once.
            let burn = unsafe {
                libc::inotify_add_watch(
                    raw,
                    c"/".as_ptr(),
                    libc::IN_DELETE_SELF | libc::IN_MASK_CREATE,
                )
            };
            // SAFETY: integer arguments only.
            if burn < 0 || unsafe { libc::inotify_rm_watch(raw, burn) } < 0 {
                return Err(errno_err(format!("skipping inotify wd {next}")));
            }
            // Removing a watch queues an IN_IGNORED event for it: read it (one event
            // without a name fits the buffer exactly) so the app never sees it.
            let mut ev = [0u8; std::mem::size_of::<libc::inotify_event>()];
            // SAFETY: `ev` is a live buffer of `ev.len()` bytes; a failed read (no event)
            // is harmless.
            unsafe { libc::read(raw, ev.as_mut_ptr().cast(), ev.len()) };
            next = burn + 1;
        }
        let (path, mask) = match w.via_fd {
            // The fd is in place: inotify fds are restored after the others.
            Some(n) => (
                cstr(&format!("/proc/self/fd/{n}"))?,
                w.mask & !libc::IN_DONT_FOLLOW,
            ),
            None => (cstr(&w.path)?, w.mask),
        };
        // SAFETY: `path` is a NUL-terminated string that outlives the call.
        let wd = unsafe { libc::inotify_add_watch(raw, path.as_ptr(), mask) };
        if wd < 0 {
            let how = match w.via_fd {
                Some(n) => format!(" (deleted; through fd {n})"),
                None => String::new(),
            };
            return Err(errno_err(format!("inotify watch on {}{how}", w.path)));
        }
        if wd != w.wd {
            bail!(
                "inotify watch on {} got wd {wd} instead of {} (two watches on one inode?)",
                w.path,
                w.wd
            );
        }
        next = wd + 1;
    }
    super::set_status_flags(fd, flags)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_watches() {
        let i = FdInfo::parse(
            "pos:\t0\nflags:\t00\nmnt_id:\t16\nino:\t1\n\
             inotify wd:3 ino:4a2 sdev:800001 mask:100 ignored_mask:0 fhandle-bytes:8 fhandle-type:1 f_handle:a2040000b1a2c3d4\n"
                .into(),
        );
        assert_eq!(
            parse(&i).unwrap(),
            vec![RawWatch {
                wd: 3,
                ino: 0x4a2,
                sdev: 0x800001,
                mask: 0x100,
                handle_type: 1,
                handle: vec![0xa2, 0x04, 0, 0, 0xb1, 0xa2, 0xc3, 0xd4],
            }]
        );
    }

    #[test]
    fn resolves_a_watch_of_our_own() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: integer arguments only; the fd returned is owned right below.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `inotify_init1` succeeded (asserted): a new descriptor owned by nothing
        // else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let p = cstr(dir.path().to_str().unwrap()).unwrap();
        // SAFETY: `p` is a NUL-terminated path that lives across the call; `fd` is ours.
        let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), p.as_ptr(), libc::IN_CREATE) };
        assert_eq!(wd, 1);
        let text =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap();
        let w = parse(&FdInfo::parse(text)).unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].mask, libc::IN_CREATE);
        let Resolved::Path(path) = resolve(&w[0]).unwrap() else {
            panic!("a live directory resolves to a path")
        };
        assert_eq!(
            std::fs::canonicalize(&path).unwrap(),
            std::fs::canonicalize(dir.path()).unwrap()
        );
    }
}
