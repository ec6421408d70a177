//! Deleted files and memfds that are mapped (`Manifest::shared_files`): created once per
//! restore by the root of the tree before it forks ([`super::prepare_shared`]), so that
//! every process maps and opens the same file again, as at dump. Each restore creates
//! its own: two instances of one snapshot never share a semaphore.
//!
//! A deleted file is created empty in its original directory (`O_TMPFILE`), given its
//! size, owner and mode, then linked under its original name just long enough to be
//! opened there and unlinked, so that `/proc/PID/maps` and `/proc/PID/fd` show `PATH
//! (deleted)` as at dump. When the name is taken (by another file; another instance
//! restoring at the same moment is waited for over a few yields) or the directory is
//! gone (then the file is made in `/tmp`), it shows the kernel's name for an
//! `O_TMPFILE`, `DIR/#INODE (deleted)`.
//! A memfd is made with `memfd_create` under its name.
//!
//! The contents are written afterwards by the monitor (`restore::memory::fill_shared_files`)
//! straight into the file, through `/proc/PID/map_files` or `/proc/PID/fd`, then a memfd's
//! seals are added: writing needs no writable mapping of it, and no seal is in the way.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result};
use warmstart_snapshots::model::{Fd, SharedFile};

use super::{cstr, errno_err, open_path, set_owner, Installer};

/// Creates the file of `obj`, empty but for its size, open read-write; and for a deleted
/// file, one open file description per `(ofd, flags)` of `opens` made by its name (see
/// [`restore`]).
pub fn create(obj: &SharedFile, opens: &[(u32, i32)]) -> Result<(OwnedFd, Vec<(u32, OwnedFd)>)> {
    if let Some(name) = obj.path.strip_prefix("/memfd:") {
        let c = cstr(name)?;
        // SAFETY: a NUL-terminated name that lives across the call.
        let fd =
            unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if fd < 0 {
            return Err(errno_err(format!("memfd_create({name})")));
        }
        // SAFETY: a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        set_up(&fd, obj)?;
        return Ok((fd, Vec::new()));
    }
    let dir = std::path::Path::new(&obj.path)
        .parent()
        .filter(|d| d.is_dir())
        .and_then(|d| d.to_str())
        .unwrap_or("/tmp");
    let tmp = open_path(dir, libc::O_TMPFILE | libc::O_RDWR, 0o600)?;
    set_up(&tmp, obj)?;
    // An O_TMPFILE can be linked once only: every open by name is made now.
    let Some(mut all) = by_name(&tmp, &obj.path, opens) else {
        return Ok((tmp, Vec::new()));
    };
    let main = all.remove(0).1;
    Ok((main, all))
}

/// Size, owner and mode (`fchown` before `fchmod`, which may set set-id bits).
fn set_up(fd: &OwnedFd, obj: &SharedFile) -> Result<()> {
    // SAFETY: ftruncate on an fd we own; no pointers.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), obj.size as libc::off_t) } < 0 {
        return Err(errno_err(format!(
            "giving {} its size {}",
            obj.path, obj.size
        )));
    }
    set_owner(fd.as_fd(), &obj.owner, &obj.path)
}

/// Links the file of `tmp` (an `O_TMPFILE`) at `path`, for the caller to open there and
/// unlink (the returned name): so its opens show `PATH (deleted)` as at the dump. `None`
/// when the name is taken or cannot be made. Another instance of the snapshot restoring
/// at this moment holds the name for a few microseconds: a few tries with a yield
/// between; a file that really has the name keeps it.
pub(crate) fn link_tmpfile(tmp: BorrowedFd<'_>, path: &str) -> Option<std::ffi::CString> {
    let from = cstr(&format!("/proc/self/fd/{}", tmp.as_raw_fd())).ok()?;
    let to = cstr(path).ok()?;
    let mut tries = 0;
    loop {
        // SAFETY: two NUL-terminated paths that live across the call.
        let r = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if r == 0 {
            return Some(to);
        }
        tries += 1;
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) || tries == 20 {
            return None;
        }
        std::thread::yield_now();
    }
}

/// The file of `tmp` (an `O_TMPFILE`) linked at `path` for a moment, opened there
/// read-write and with each of `opens`' flags, then unlinked: opens whose
/// `/proc/PID/fd` link is `PATH (deleted)` and which may keep `O_NOFOLLOW` (shm_open
/// sets it). The read-write open first, as ofd `u32::MAX`. `None` when the name is
/// taken or cannot be made.
fn by_name(tmp: &OwnedFd, path: &str, opens: &[(u32, i32)]) -> Option<Vec<(u32, OwnedFd)>> {
    let to = link_tmpfile(tmp.as_fd(), path)?;
    let mut out = Vec::with_capacity(opens.len() + 1);
    let mut ok = true;
    let no_create = !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL);
    for &(ofd, flags) in std::iter::once(&(u32::MAX, libc::O_RDWR)).chain(opens) {
        match open_path(path, flags & no_create, 0) {
            Ok(fd) => out.push((ofd, fd)),
            Err(_) => {
                ok = false;
                break;
            }
        }
    }
    // SAFETY: a NUL-terminated path.
    unsafe { libc::unlink(to.as_ptr()) };
    // On failure the opens made are closed as `out` is dropped.
    ok.then_some(out)
}

/// An open of object `id` (fd `f`): the open file description made by name when the
/// object was created, else a new one through the magic link (without `O_NOFOLLOW`,
/// which it would refuse).
pub fn restore(ins: &mut Installer, f: &Fd, id: u64, flags: i32, pos: i64) -> Result<RawFd> {
    let fd = match ins.file_opens.get(&f.ofd) {
        // Made high by the root; closed with the rest of what it made.
        Some(&fd) => fd,
        None => {
            let obj = *ins.files.get(&id).with_context(|| {
                format!("the snapshot's deleted file / memfd #{id} was not created by the root")
            })?;
            let flags = flags & !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL | libc::O_NOFOLLOW);
            ins.keep_high(open_path(&format!("/proc/self/fd/{obj}"), flags, 0)?)?
        }
    };
    // SAFETY: integer arguments only, on an fd the installer holds.
    if unsafe { libc::lseek(ins.fd(fd)?.as_raw_fd(), pos, libc::SEEK_SET) } < 0 {
        return Err(errno_err(format!(
            "seeking deleted file / memfd #{id} to {pos}"
        )));
    }
    Ok(fd)
}
