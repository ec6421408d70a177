//! Regular files (reopened by path at their offset), directories, stateless character
//! devices, and ghost files: regular files deleted while open, whose contents are stored
//! and recreated with `O_TMPFILE` in the original directory (or `/tmp` when it is gone).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

use anyhow::Result;
use warmstart_snapshots::model::FileDesc;

use super::{errno_err, identity, open_path, read_contents, Installer, Target};

/// Character devices that carry no state and are reopened by path.
pub const STATELESS_DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/urandom",
    "/dev/random",
    "/dev/full",
];

const DELETED: &str = " (deleted)";

pub fn dump(t: &Target, meta: &std::fs::Metadata) -> Result<FileDesc> {
    let flags = t.flags();
    match meta.mode() & libc::S_IFMT {
        libc::S_IFREG if t.link.ends_with(DELETED) && meta.nlink() == 0 => {
            // Also mapped: its contents are the mapping's object's (see `mapped_by`).
            let data = if super::mapped_by(t.pid, meta) {
                Vec::new()
            } else {
                read_contents(&t.copy()?, meta.size(), &t.context())?
            };
            Ok(FileDesc::Ghost {
                path: t.link.trim_end_matches(DELETED).to_owned(),
                owner: super::owner_of(meta),
                data,
                flags,
                pos: t.info.pos,
            })
        }
        libc::S_IFREG => {
            if meta.nlink() == 0 || !t.link.starts_with('/') {
                return Err(t.refuse(format_args!("an unlinked or anonymous file ({})", t.link)));
            }
            Ok(FileDesc::Regular {
                file: identity(t.link, meta),
                flags,
                pos: t.info.pos,
            })
        }
        libc::S_IFDIR => Ok(FileDesc::Directory {
            path: t.link.to_owned(),
            flags,
            pos: t.info.pos,
        }),
        _ if STATELESS_DEVICES.contains(&t.link) => Ok(FileDesc::CharDev {
            path: t.link.to_owned(),
            rdev: meta.rdev(),
            flags,
            pos: t.info.pos,
        }),
        _ => Err(t.refuse(format_args!("a character device ({})", t.link))),
    }
}

pub fn is_stateless_device(meta: &std::fs::Metadata) -> bool {
    STATELESS_DEVICES.iter().any(|p| {
        std::fs::metadata(p)
            .map(|m| m.rdev() == meta.rdev())
            .unwrap_or(false)
    })
}

pub fn restore(ins: &mut Installer, file: &FileDesc) -> Result<RawFd> {
    let no_create = !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL);
    match file {
        FileDesc::Regular { file, flags, pos } => {
            let fd = open_path(&file.path, flags & no_create, 0)?;
            // An append-only fd to a file that grew since the dump (another instance's
            // log lines) goes on at its end, where its next write lands anyway.
            let grown = flags & libc::O_APPEND != 0
                && std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                    .is_ok_and(|m| m.size() > file.size);
            if grown {
                // SAFETY: lseek takes no pointers; `fd` is ours.
                if unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_END) } < 0 {
                    return Err(errno_err(format!("seeking {} to its end", file.path)));
                }
            } else {
                seek(fd.as_fd(), *pos, &file.path)?;
            }
            ins.keep_high(fd)
        }
        FileDesc::Directory { path, flags, pos } => {
            let fd = open_path(path, flags | libc::O_DIRECTORY, 0)?;
            if *pos != 0 {
                seek(fd.as_fd(), *pos, &format!("directory {path}"))?;
            }
            ins.keep_high(fd)
        }
        FileDesc::CharDev { path, flags, .. } => ins.keep_high(open_path(path, *flags, 0)?),
        FileDesc::Ghost {
            path,
            owner,
            data,
            flags,
            pos,
        } => {
            let dir = std::path::Path::new(path)
                .parent()
                .filter(|d| d.is_dir())
                .and_then(|d| d.to_str())
                .unwrap_or("/tmp");
            let tmp = open_path(dir, libc::O_TMPFILE | libc::O_RDWR, 0o600)?;
            super::set_owner(tmp.as_fd(), owner, &format!("deleted file {path}"))?;
            super::write_all(
                tmp.as_fd(),
                data,
                &format!("the contents of deleted file {path}"),
            )?;
            let fd = reopen_ghost(tmp.as_fd(), path, *flags & no_create)?;
            seek(fd.as_fd(), *pos, path)?;
            // `tmp` is held to the end like every temporary (the inode's last name).
            ins.keep_high(tmp)?;
            ins.keep_high(fd)
        }
        _ => unreachable!("regular::restore called for {file:?}"),
    }
}

/// A new open file description of the file behind `fd` with `flags` (its access mode
/// among them), through `/proc/self/fd`; `fd` itself when it already is `O_RDWR`.
pub fn reopen(ins: &mut Installer, fd: RawFd, flags: i32) -> Result<RawFd> {
    if flags & libc::O_ACCMODE == libc::O_RDWR {
        super::set_status_flags(ins.fd(fd)?, flags)?;
        return Ok(fd);
    }
    let again = open_path(&format!("/proc/self/fd/{fd}"), flags, 0)?;
    ins.keep_high(again)
}

/// The app's open of a deleted file recreated as `tmp` (an `O_TMPFILE`): linked under
/// its old name for a moment and opened there, so `/proc/PID/fd` shows `PATH (deleted)`
/// as at the dump, then unlinked. When the name is taken (or the directory is gone) it
/// is opened through `/proc/self/fd` and shows the kernel's `#INODE` name instead. Never
/// `tmp` itself, whose flags include `O_TMPFILE`.
fn reopen_ghost(tmp: BorrowedFd<'_>, path: &str, flags: i32) -> Result<OwnedFd> {
    if let Some(to) = super::shared_file::link_tmpfile(tmp, path) {
        let opened = open_path(path, flags, 0);
        // SAFETY: a NUL-terminated name that lives across the call.
        unsafe { libc::unlink(to.as_ptr()) };
        return opened;
    }
    open_path(&format!("/proc/self/fd/{}", tmp.as_raw_fd()), flags, 0)
}

fn seek(fd: BorrowedFd<'_>, pos: i64, what: &str) -> Result<()> {
    nix::unistd::lseek(fd.as_raw_fd(), pos, nix::unistd::Whence::SeekSet)
        .map_err(|_| errno_err(format!("seeking {what} to {pos}")))?;
    Ok(())
}
