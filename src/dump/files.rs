//! Open file descriptors: what each one is, and the shared objects (pipes) behind them.
//!
//! Supported now: regular files, directories, a few character devices reopened by path,
//! pipes (with their buffered bytes, copied with `tee` so the target loses nothing) and
//! the external stdio. Anything else is refused by name.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use anyhow::{bail, Context, Result};
use warmstart_snapshots::model::{Fd, FileDesc, FileIdentity, PipeObject};

use crate::sys::pidfd;

/// Character devices that carry no state and are reopened by path.
const STATELESS_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/urandom",
    "/dev/random",
    "/dev/full",
];

/// Which fds are the launcher's stdio and become the caller's at restore.
#[derive(Debug, Clone)]
pub enum StdioPolicy {
    /// `record`: these (dev, ino) pairs are the pipes warmstart gave the app as fd 0, 1, 2.
    Given([(u64, u64); 3]),
    /// `dump -t`: fds 0-2 that are a terminal, pipe or socket are external (shell-job
    /// style): they belong to whoever started the process, not to its state.
    Detect,
}

pub fn identity(path: &str, meta: &std::fs::Metadata) -> FileIdentity {
    FileIdentity {
        path: path.to_owned(),
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.size(),
        mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        mode: meta.mode(),
    }
}

struct FdInfo {
    pos: i64,
    flags: i32,
}

fn fdinfo(pid: i32, fd: i32) -> Result<FdInfo> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
        .with_context(|| format!("reading /proc/{pid}/fdinfo/{fd}"))?;
    let mut info = FdInfo { pos: 0, flags: 0 };
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("pos:") {
            info.pos = v.trim().parse().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("flags:") {
            info.flags = i32::from_str_radix(v.trim(), 8).unwrap_or(0);
        }
    }
    Ok(info)
}

/// Copies the bytes buffered in a pipe without consuming them.
fn peek_pipe(pipe: &OwnedFd) -> Result<(u32, Vec<u8>)> {
    let cap = unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if cap < 0 {
        return Err(std::io::Error::last_os_error()).context("F_GETPIPE_SZ");
    }
    let mut avail: libc::c_int = 0;
    if unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut avail) } < 0 {
        return Err(std::io::Error::last_os_error()).context("FIONREAD on a pipe");
    }
    if avail == 0 {
        return Ok((cap as u32, Vec::new()));
    }
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, cap) };
    let n = unsafe {
        libc::tee(
            pipe.as_raw_fd(),
            w.as_raw_fd(),
            avail as usize,
            libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error()).context("tee of a pipe's buffered bytes");
    }
    let mut data = vec![0u8; n as usize];
    let mut got = 0;
    while got < data.len() {
        let k = unsafe {
            libc::read(
                r.as_raw_fd(),
                data[got..].as_mut_ptr().cast(),
                data.len() - got,
            )
        };
        if k <= 0 {
            bail!("short read while copying a pipe's buffered bytes");
        }
        got += k as usize;
    }
    Ok((cap as u32, data))
}

pub struct Collected {
    pub fds: Vec<Fd>,
    pub pipes: Vec<PipeObject>,
}

pub fn collect(pid: i32, comm: &str, policy: &StdioPolicy) -> Result<Collected> {
    let pidfd = pidfd::pidfd_open(pid, 0).with_context(|| format!("pidfd_open({pid})"))?;
    let mut fds = Vec::new();
    let mut pipes: HashMap<u64, PipeObject> = HashMap::new();
    let mut nums: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    nums.sort_unstable();
    // Open file descriptions seen so far: (dev, ino, pos, flags) is not enough to tell a
    // dup from a second open, so ask the kernel with kcmp.
    let mut ofds: Vec<(i32, u32)> = Vec::new();
    for fd in nums {
        let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .with_context(|| format!("reading /proc/{pid}/fd/{fd}"))?;
        let link = link.to_string_lossy().into_owned();
        let meta = std::fs::metadata(format!("/proc/{pid}/fd/{fd}"));
        let info = fdinfo(pid, fd)?;
        let cloexec = info.flags & libc::O_CLOEXEC != 0;
        let flags = info.flags & !libc::O_CLOEXEC;
        let ofd = match ofds
            .iter()
            .find(|(other, _)| matches!(crate::sys::kcmp_file(pid, fd, *other), Ok(true)))
        {
            Some(&(_, id)) => id,
            None => {
                let id = ofds.len() as u32;
                ofds.push((fd, id));
                id
            }
        };
        let refuse = |what: &str| -> anyhow::Error {
            anyhow::anyhow!(
                "process {pid} ({comm}): fd {fd} is {what} ({link}), which warmstart cannot checkpoint yet"
            )
        };
        let meta = match meta {
            Ok(m) => m,
            Err(_) => return Err(refuse("an object without a stat()able inode")),
        };
        let ft = meta.mode() & libc::S_IFMT;
        if let Some(stdio) = external_stdio(policy, fd, &meta, ft) {
            fds.push(Fd {
                fd,
                cloexec,
                ofd,
                file: FileDesc::External { stdio },
            });
            continue;
        }
        let file = match ft {
            libc::S_IFREG => {
                if link.ends_with(" (deleted)") {
                    return Err(refuse("a deleted file"));
                }
                if meta.nlink() == 0 || !link.starts_with('/') {
                    return Err(refuse("an unlinked or anonymous file"));
                }
                FileDesc::Regular {
                    file: identity(&link, &meta),
                    flags,
                    pos: info.pos,
                }
            }
            libc::S_IFDIR => FileDesc::Directory {
                path: link.clone(),
                flags,
            },
            libc::S_IFCHR if STATELESS_DEVICES.contains(&link.as_str()) => FileDesc::CharDev {
                path: link.clone(),
                rdev: meta.rdev(),
                flags,
                pos: info.pos,
            },
            libc::S_IFIFO if link.starts_with("pipe:") => {
                let ino = meta.ino();
                if let std::collections::hash_map::Entry::Vacant(slot) = pipes.entry(ino) {
                    let copy = pidfd::pidfd_getfd(&pidfd, fd)
                        .with_context(|| format!("pidfd_getfd of process {pid} fd {fd}"))?;
                    let (capacity, data) = peek_pipe(&copy)
                        .with_context(|| format!("process {pid} fd {fd} ({link})"))?;
                    slot.insert(PipeObject {
                        id: ino,
                        capacity,
                        data,
                    });
                }
                FileDesc::Pipe {
                    pipe: ino,
                    write: flags & libc::O_ACCMODE == libc::O_WRONLY,
                    flags,
                }
            }
            libc::S_IFIFO => return Err(refuse("a named FIFO")),
            libc::S_IFCHR => return Err(refuse("a character device")),
            libc::S_IFBLK => return Err(refuse("a block device")),
            libc::S_IFSOCK => return Err(refuse("a socket")),
            _ => return Err(refuse(&describe_anon(&link))),
        };
        fds.push(Fd {
            fd,
            cloexec,
            ofd,
            file,
        });
    }
    let mut pipes: Vec<PipeObject> = pipes.into_values().collect();
    pipes.sort_by_key(|p| p.id);
    Ok(Collected { fds, pipes })
}

fn describe_anon(link: &str) -> String {
    match link.strip_prefix("anon_inode:") {
        Some(kind) => format!(
            "an anonymous inode of type {}",
            kind.trim_matches(['[', ']'])
        ),
        None => "an unsupported kind of file".to_owned(),
    }
}

fn external_stdio(policy: &StdioPolicy, fd: i32, meta: &std::fs::Metadata, ft: u32) -> Option<u8> {
    match policy {
        StdioPolicy::Given(given) => given
            .iter()
            .position(|&(dev, ino)| dev == meta.dev() && ino == meta.ino())
            .map(|i| i as u8),
        StdioPolicy::Detect => {
            let stdio_like = matches!(ft, libc::S_IFIFO | libc::S_IFSOCK)
                || (ft == libc::S_IFCHR && !is_stateless_device(meta));
            ((0..3).contains(&fd) && stdio_like).then_some(fd as u8)
        }
    }
}

fn is_stateless_device(meta: &std::fs::Metadata) -> bool {
    STATELESS_DEVICES.iter().any(|p| {
        std::fs::metadata(p)
            .map(|m| m.rdev() == meta.rdev())
            .unwrap_or(false)
    })
}
