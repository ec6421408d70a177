//! Pipes: each pipe is one shared object (`Manifest::pipes`) holding its capacity and the
//! bytes buffered in it, copied with `tee` so the target loses nothing. At restore the
//! pipe is created once and refilled; both ends are handed out as fds refer to them.
//!
//! Named FIFOs are pipes reached through a path: the same object, refilled through one
//! `O_RDWR | O_NONBLOCK` open of the path (which never blocks waiting for a peer), and
//! each open file description of the app is a new open of that one through
//! `/proc/self/fd` with its own access mode and flags. A FIFO that already holds bytes
//! at restore (someone else has it open) is refused: its contents would not be the
//! snapshot's.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

use anyhow::{anyhow, bail, Context, Result};
use warmstart_snapshots::model::{FileDesc, Manifest, PipeObject};

use super::{errno_err, Installer, Target};

pub fn dump(
    t: &Target,
    meta: &std::fs::Metadata,
    pipes: &mut HashMap<u64, PipeObject>,
) -> Result<FileDesc> {
    let ino = meta.ino();
    let flags = t.flags();
    if let std::collections::hash_map::Entry::Vacant(slot) = pipes.entry(ino) {
        // `tee` reads from a read end: for a write end (whose reader may be another
        // process of the tree, or gone), open one of our own through /proc.
        let copy = if flags & libc::O_ACCMODE == libc::O_WRONLY {
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(format!("/proc/{}/fd/{}", t.pid, t.fd))
                .map(OwnedFd::from)
                .with_context(|| format!("opening a read end of {}", t.context()))?
        } else {
            t.copy()?
        };
        let (capacity, data) = peek(&copy).with_context(|| t.context())?;
        slot.insert(PipeObject {
            id: ino,
            capacity,
            data,
        });
    }
    // Packet mode (`pipe2(O_DIRECT)`): each write is a message of its own, read whole.
    // The bytes peeked out of the pipe do not show where its messages end, so bytes put
    // back in one write would be read as one message.
    let held = pipes.get(&ino).map_or(0, |p| p.data.len());
    if flags & libc::O_DIRECT != 0 && held > 0 {
        return Err(anyhow::anyhow!(
            "{} (the bytes do not show where its messages end); dump it once they are read",
            t.refuse(format_args!(
                "a pipe in packet mode (O_DIRECT) holding {held} bytes not read yet"
            ))
        ));
    }
    Ok(FileDesc::Pipe {
        pipe: ino,
        write: flags & libc::O_ACCMODE == libc::O_WRONLY,
        flags,
    })
}

/// An open of a named FIFO: its pipe's bytes and capacity are kept like a pipe's.
pub fn dump_fifo(
    t: &Target,
    meta: &std::fs::Metadata,
    pipes: &mut HashMap<u64, PipeObject>,
) -> Result<FileDesc> {
    if !t.link.starts_with('/') || t.link.ends_with(" (deleted)") {
        return Err(t.refuse(format_args!(
            "a FIFO that has no path any more ({})",
            t.link
        )));
    }
    let ino = meta.ino();
    if let std::collections::hash_map::Entry::Vacant(slot) = pipes.entry(ino) {
        // A read end of our own, whatever the app's access mode (see `dump`).
        let copy = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(format!("/proc/{}/fd/{}", t.pid, t.fd))
            .map(OwnedFd::from)
            .with_context(|| format!("opening a read end of {}", t.context()))?;
        let (capacity, data) = peek(&copy).with_context(|| t.context())?;
        slot.insert(PipeObject {
            id: ino,
            capacity,
            data,
        });
    }
    Ok(FileDesc::Fifo {
        path: t.link.to_owned(),
        fifo: ino,
        flags: t.flags(),
    })
}

/// Copies the bytes buffered in a pipe without consuming them.
fn peek(pipe: &OwnedFd) -> Result<(u32, Vec<u8>)> {
    // SAFETY: F_GETPIPE_SZ takes no pointer; `pipe` is a descriptor we own.
    let cap = unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if cap < 0 {
        return Err(std::io::Error::last_os_error()).context("F_GETPIPE_SZ");
    }
    let mut avail: libc::c_int = 0;
    // SAFETY: FIONREAD writes one `c_int` to the pointer given, the live local `avail`.
    if unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut avail) } < 0 {
        return Err(std::io::Error::last_os_error()).context("FIONREAD on a pipe");
    }
    if avail == 0 {
        return Ok((cap as u32, Vec::new()));
    }
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors `pipe2` writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: `pipe2` succeeded: both are new descriptors owned by nothing else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ takes an integer argument; `w` is ours.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, cap) };
    // SAFETY: integer arguments only: `tee` copies between two pipes we hold without
    // touching our memory.
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
        // SAFETY: the pointer and length describe `data[got..]`, a live writable slice of
        // our buffer.
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

/// The fd of open file description `ofd`, one end of pipe `id`. The pipe is created
/// once; the first description of each end (the lowest `ofd` in the snapshot that opens
/// it read-only or write-only) is that end itself, and every other one (a second open
/// through `/proc/PID/fd/N`, or an `O_RDWR` open) is a new open of it, so descriptions
/// that were separate stay separate: `O_NONBLOCK` set on one is not set on the other.
pub fn restore(ins: &mut Installer, id: u64, ofd: u32, write: bool, flags: i32) -> Result<RawFd> {
    let (r, w) = ensure(ins, id)?;
    let end = if write { w } else { r };
    let accmode = flags & libc::O_ACCMODE;
    // Pipe ends created here share one description per end: setting O_NONBLOCK on one
    // fd sets it for its dups too, as it was.
    // O_DIRECT is a pipe's packet mode, which fcntl may set on a pipe end.
    let status_flags = flags & (libc::O_NONBLOCK | libc::O_APPEND | libc::O_DIRECT | libc::O_ASYNC);
    let fd = if accmode != libc::O_RDWR && primary_ofd(ins.m, id, write) == Some(ofd) {
        end
    } else {
        // Opening a pipe through /proc never blocks, whatever the access mode.
        let path = super::cstr(&format!("/proc/self/fd/{end}"))?;
        // SAFETY: `path` is a NUL-terminated string that lives across the call; the new fd
        // is owned right below.
        let fd = unsafe { libc::open(path.as_ptr(), accmode | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(errno_err(format!(
                "reopening pipe {id} through /proc/self/fd"
            )));
        }
        // SAFETY: the call above succeeded: a new descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        ins.keep_high(fd)?
    };
    // SAFETY: F_SETFL takes an integer argument; `fd` is a temporary of this installer.
    if unsafe { libc::fcntl(ins.fd(fd)?.as_raw_fd(), libc::F_SETFL, status_flags) } < 0 {
        return Err(errno_err("fcntl(F_SETFL) on a pipe"));
    }
    Ok(fd)
}

/// Pipe `id`'s two ends, created (and refilled) if this is its first use.
pub fn ensure(ins: &mut Installer, id: u64) -> Result<(RawFd, RawFd)> {
    if let Some(&ends) = ins.pipes.get(&id) {
        return Ok(ends);
    }
    let ends = make(ins, id)?;
    ins.pipes.insert(id, ends);
    Ok(ends)
}

/// The open file description that gets end `write` of pipe `id` itself: the lowest
/// `ofd` of the tree that opens that end read-only or write-only.
fn primary_ofd(m: &Manifest, id: u64, write: bool) -> Option<u32> {
    m.processes
        .iter()
        .flat_map(|p| &p.fds)
        .filter(|f| match f.file {
            FileDesc::Pipe {
                pipe,
                write: w,
                flags,
            } => pipe == id && w == write && flags & libc::O_ACCMODE != libc::O_RDWR,
            _ => false,
        })
        .map(|f| f.ofd)
        .min()
}

fn make(ins: &mut Installer, id: u64) -> Result<(RawFd, RawFd)> {
    let obj = ins.m.pipes.iter().find(|o| o.id == id).ok_or_else(|| {
        anyhow!("snapshot names pipe {id} but does not contain it (corrupt manifest?)")
    })?;
    let (r, w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|_| errno_err("pipe2"))?;
    if obj.capacity > 0
        // SAFETY: F_SETPIPE_SZ takes an integer argument; `w` is ours.
        && unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, obj.capacity as libc::c_int) } < 0
    {
        return Err(errno_err(format!(
            "setting pipe capacity to {}",
            obj.capacity
        )));
    }
    super::write_all(w.as_fd(), &obj.data, "a pipe's buffered bytes")?;
    Ok((ins.keep_high(r)?, ins.keep_high(w)?))
}

/// The `O_RDWR` open of FIFO `path` (pipe object `id`) that the others are opened from,
/// refilled on its first use.
pub fn ensure_fifo(ins: &mut Installer, path: &str, id: u64) -> Result<RawFd> {
    if let Some(&(fd, _)) = ins.pipes.get(&id) {
        return Ok(fd);
    }
    let obj = ins.m.pipes.iter().find(|o| o.id == id).ok_or_else(|| {
        anyhow!("snapshot names FIFO {path} but does not contain its pipe (corrupt manifest?)")
    })?;
    let fd = super::open_path(path, libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC, 0)?;
    // SAFETY: `stat` is a plain C struct; all-zero bytes are valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a live, writable `stat`; `fd` is ours.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(errno_err(format!("fstat of FIFO {path}")));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFIFO {
        bail!("{path} is no longer a FIFO: restore it with mkfifo");
    }
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one `c_int` to the pointer given, the live local `queued`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut queued) } < 0 {
        return Err(errno_err(format!("FIONREAD on FIFO {path}")));
    }
    if queued > 0 {
        bail!(
            "FIFO {path} already holds {queued} bytes (another process has it open): the \
             restored app would not read what it had buffered; close it there first"
        );
    }
    if obj.capacity > 0
        // SAFETY: F_SETPIPE_SZ takes an integer argument; `fd` is ours.
        && unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, obj.capacity as libc::c_int) } < 0
    {
        return Err(errno_err(format!(
            "setting the capacity of FIFO {path} to {}",
            obj.capacity
        )));
    }
    super::write_all(
        fd.as_fd(),
        &obj.data,
        &format!("the buffered bytes of FIFO {path}"),
    )?;
    let fd = ins.keep_high(fd)?;
    ins.pipes.insert(id, (fd, fd));
    Ok(fd)
}

/// One open file description of FIFO `path`: a new open of it with `flags`.
pub fn restore_fifo(ins: &mut Installer, path: &str, id: u64, flags: i32) -> Result<RawFd> {
    let base = ensure_fifo(ins, path, id)?;
    let proc_path = super::cstr(&format!("/proc/self/fd/{base}"))?;
    // Through /proc, an O_RDONLY or O_WRONLY open of a FIFO does not wait for a peer
    // either: `base` is both.
    // SAFETY: `proc_path` is a NUL-terminated string that lives across the call; the new fd
    // is owned right below.
    let fd = unsafe {
        libc::open(
            proc_path.as_ptr(),
            (flags & libc::O_ACCMODE) | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(errno_err(format!("opening FIFO {path} again")));
    }
    // SAFETY: the call above succeeded: a new descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    super::set_status_flags(fd.as_fd(), flags)?;
    ins.keep_high(fd)
}
