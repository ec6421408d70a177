//! A restored instance's private `/tmp`: a fresh tmpfs, filled here (in the monitor,
//! before the sandbox starts) with what the snapshot's `/tmp` held at the warm point,
//! then attached over `/tmp` in the instance's own mount namespace. Every instance gets
//! its own copy, so what one writes there no other one sees.
//!
//! The tmpfs is made with the new mount API (`fsopen`, `fsmount`): a detached mount we
//! reach through its fd while filling it, which the sandboxed child moves onto `/tmp`
//! with one `move_mount` (no allocation, as the child may run right after `clone3`).

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use warmstart_snapshots::model::{FileOwner, Manifest, RunContent, TmpEntry, TmpKind, PAGE_SIZE};
use warmstart_snapshots::store::Snapshot;

const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

/// The instance's `/tmp`, filled, as a detached mount; `None` when the snapshot shares
/// the host's `/tmp`.
pub fn prepare(m: &Manifest, snap: &Snapshot) -> Result<Option<OwnedFd>> {
    let Some(entries) = &m.private_tmp else {
        return Ok(None);
    };
    let mnt = new_tmpfs().context("creating the instance's private /tmp (a tmpfs)")?;
    let root = PathBuf::from(format!("/proc/self/fd/{}", mnt.as_raw_fd()));
    fill(&root, entries, snap)?;
    Ok(Some(mnt))
}

/// In the sandboxed child (its own mount namespace): the prepared tmpfs over `/tmp`.
/// Returns false on failure (then the child must not go on with the host's `/tmp`).
pub fn attach(mnt: RawFd) -> bool {
    // SAFETY: two NUL-terminated static strings; move_mount reads nothing else.
    unsafe {
        libc::mkdir(c"/tmp".as_ptr(), 0o1777);
        libc::syscall(
            libc::SYS_move_mount,
            mnt,
            c"".as_ptr(),
            libc::AT_FDCWD,
            c"/tmp".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        ) == 0
    }
}

fn new_tmpfs() -> Result<OwnedFd> {
    let fs = sys_fd(
        // SAFETY: a NUL-terminated static string.
        unsafe { libc::syscall(libc::SYS_fsopen, c"tmpfs".as_ptr(), FSOPEN_CLOEXEC) },
        "fsopen(tmpfs)",
    )?;
    set_string(&fs, c"mode", c"1777")?;
    // SAFETY: no pointers.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    };
    sys_ok(r, "fsconfig(FSCONFIG_CMD_CREATE)")?;
    sys_fd(
        // SAFETY: no pointers.
        unsafe {
            libc::syscall(
                libc::SYS_fsmount,
                fs.as_raw_fd(),
                FSMOUNT_CLOEXEC,
                MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
            )
        },
        "fsmount(tmpfs)",
    )
}

fn set_string(fs: &OwnedFd, key: &CStr, value: &CStr) -> Result<()> {
    // SAFETY: two NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_SET_STRING,
            key.as_ptr(),
            value.as_ptr(),
            0,
        )
    };
    sys_ok(r, format!("fsconfig({key:?}={value:?})"))
}

fn sys_ok(r: libc::c_long, what: impl std::fmt::Display) -> Result<()> {
    if r < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn sys_fd(r: libc::c_long, what: &str) -> Result<OwnedFd> {
    sys_ok(r, what)?;
    // SAFETY: a new fd the syscall returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// Recreates `entries` under `root`: owners, modes and mtimes as at the dump
/// (directories' mtimes once their contents are in).
fn fill(root: &std::path::Path, entries: &[TmpEntry], snap: &Snapshot) -> Result<()> {
    for e in entries {
        let path = root.join(&e.path);
        let what = || format!("recreating /tmp/{} of the snapshot", e.path);
        match &e.kind {
            TmpKind::Dir => std::fs::create_dir(&path).with_context(what)?,
            TmpKind::Symlink { target } => {
                std::os::unix::fs::symlink(target, &path).with_context(what)?
            }
            TmpKind::File {
                size,
                inline,
                pages,
            } => {
                let f = std::fs::File::create(&path).with_context(what)?;
                write_file(&f, *size, inline, pages, snap).with_context(what)?;
            }
            TmpKind::Fifo => {
                nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .with_context(what)?
            }
        }
        set_owner(&path, &e.owner, matches!(e.kind, TmpKind::Symlink { .. })).with_context(what)?;
        if !matches!(e.kind, TmpKind::Dir) {
            set_mtime(&path, e.mtime_ns).with_context(what)?;
        }
    }
    for e in entries.iter().rev().filter(|e| e.kind == TmpKind::Dir) {
        set_mtime(&root.join(&e.path), e.mtime_ns)
            .with_context(|| format!("setting the mtime of /tmp/{}", e.path))?;
    }
    Ok(())
}

fn write_file(
    f: &std::fs::File,
    size: u64,
    inline: &[u8],
    pages: &[warmstart_snapshots::model::PageRun],
    snap: &Snapshot,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    f.write_all_at(inline, 0)?;
    let mut buf = Vec::new();
    for run in pages {
        let RunContent::Data { first } = run.content else {
            continue; // zeros: a hole
        };
        // At most 4 MiB at a time.
        let mut done = 0;
        while done < run.count {
            let n = (run.count - done).min(1024);
            buf.resize(n as usize * PAGE_SIZE, 0);
            snap.read_pages(first + done, n, &mut buf)?;
            f.write_all_at(&buf, (run.page + done) * PAGE_SIZE as u64)?;
            done += n;
        }
    }
    f.set_len(size)?;
    Ok(())
}

fn set_owner(path: &std::path::Path, o: &FileOwner, link: bool) -> Result<()> {
    if link {
        std::os::unix::fs::lchown(path, Some(o.uid), Some(o.gid))?;
        return Ok(());
    }
    std::os::unix::fs::chown(path, Some(o.uid), Some(o.gid))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(o.mode))?;
    Ok(())
}

fn set_mtime(path: &std::path::Path, mtime_ns: i128) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let ts = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: (mtime_ns.div_euclid(1_000_000_000)) as libc::time_t,
            tv_nsec: (mtime_ns.rem_euclid(1_000_000_000)) as libc::c_long,
        },
    ];
    // SAFETY: a NUL-terminated path and two timespecs that outlive the call.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r < 0 {
        bail!("utimensat: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
