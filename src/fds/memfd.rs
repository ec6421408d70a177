//! memfd (an fd whose link is `/memfd:NAME (deleted)`): name, whole contents (read with
//! `pread` through a copy of the fd), seals (`F_GET_SEALS`) and file offset. Restored with
//! `memfd_create(MFD_ALLOW_SEALING)` + write + `F_ADD_SEALS` + `lseek`; a memfd created
//! without `MFD_ALLOW_SEALING` reports `F_SEAL_SEAL`, which is re-applied as such.
//!
//! The contents are kept in the manifest, up to [`super::MAX_INLINE_CONTENTS`]; big memfds
//! should go through the page store. A memfd that is also *mapped* is one object with its
//! mappings (`Manifest::shared_files`, see `dump::shared_files`): its fds become
//! `FileDesc::SharedFile` and its contents go through the page store.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

use anyhow::Result;
use warmstart_snapshots::model::FileDesc;

use super::{cstr, errno_err, read_contents, Installer, Target};

pub fn dump(t: &Target) -> Result<FileDesc> {
    let name = t
        .link
        .trim_start_matches("/memfd:")
        .trim_end_matches(" (deleted)")
        .to_owned();
    let copy = t.copy()?;
    let size = t.meta.map(|m| m.size()).unwrap_or(0);
    // Also mapped: its contents are the mapping's object's (see `super::mapped_by`).
    let data = match t.meta {
        Some(meta) if super::mapped_by(t.pid, meta) => Vec::new(),
        _ => read_contents(&copy, size, &t.context())?,
    };
    // SAFETY: F_GET_SEALS takes no pointer; `copy` is ours.
    let seals = unsafe { libc::fcntl(copy.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(errno_err(format!("F_GET_SEALS of {}", t.context())));
    }
    let owner = t
        .meta
        .map(super::owner_of)
        .ok_or_else(|| anyhow::anyhow!("{}: cannot stat the memfd", t.context()))?;
    Ok(FileDesc::Memfd {
        name,
        data,
        owner,
        seals,
        flags: t.flags(),
        pos: t.info.pos,
    })
}

pub fn restore(ins: &mut Installer, file: &FileDesc) -> Result<RawFd> {
    let FileDesc::Memfd {
        name,
        data,
        owner,
        seals,
        flags,
        pos,
    } = file
    else {
        unreachable!("memfd::restore called for {file:?}")
    };
    let c = cstr(name)?;
    // SAFETY: `c` is a NUL-terminated name that lives across the call; the fd returned
    // is owned right below.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(errno_err(format!("memfd_create({name})")));
    }
    // SAFETY: the call above succeeded: a new descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    super::write_all(fd.as_fd(), data, &format!("the contents of memfd {name}"))?;
    // Before the seals: F_SEAL_EXEC forbids changing the exec bits.
    super::set_owner(fd.as_fd(), owner, &format!("memfd {name}"))?;
    // SAFETY: F_ADD_SEALS takes an integer argument; `fd` is ours.
    if *seals != 0 && unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, *seals) } < 0 {
        return Err(errno_err(format!("sealing memfd {name} with {seals:#x}")));
    }
    let fd = ins.keep_high(fd)?;
    let fd = super::regular::reopen(ins, fd, *flags)?;
    // SAFETY: integer arguments only, on a temporary of this installer.
    if unsafe { libc::lseek(ins.fd(fd)?.as_raw_fd(), *pos, libc::SEEK_SET) } < 0 {
        return Err(errno_err(format!("seeking memfd {name} to {pos}")));
    }
    Ok(fd)
}
