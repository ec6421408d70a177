//! The restoring child: a copy of warmstart running with the snapshot's pid inside the
//! sandbox. It does with ordinary code everything a process can do to itself while its
//! memory is still warmstart's (session, fds, cwd, limits), then maps the restorer
//! program and jumps into it. It reports failures before the jump over the status
//! pipe; after the jump the program's status word tells the monitor.

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use warmstart_snapshots::model::{Manifest, Process, VmaKind};

use super::program::{self, ProgramFds};
use crate::dump::maps::{self, MapEntry};

/// What the child tells the monitor just before it jumps into the program.
#[derive(Debug, Serialize, Deserialize)]
pub struct BlobInfo {
    pub base: u64,
    pub map_len: u64,
    pub status_addr: u64,
    pub syscall_trap: u64,
    /// Where the program leaves its userfaultfd's number (lazy restore).
    pub uffd_slot: Option<u64>,
    /// Step labels, for naming a failed step.
    pub labels: Vec<String>,
}

/// Message tags on the status pipe.
pub const MSG_ERROR: u8 = b'E';
pub const MSG_BLOB: u8 = b'B';

fn errno_err(what: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{what}: {}", std::io::Error::last_os_error())
}

fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| anyhow!("path contains a NUL byte: {s:?}"))
}

/// Entry point of the child; returns only on failure (with the exit code to use).
/// `lazy`: the ranges the restorer registers with a userfaultfd (empty: eager);
/// `notify`: the app end of a fresh notify channel (`--ready notify` snapshots).
pub fn run(
    m: &Manifest,
    p: &Process,
    lazy: &[(u64, u64)],
    notify: Option<RawFd>,
    status_fd: RawFd,
) -> i32 {
    let mut report = status_fd;
    match prepare_and_jump(m, p, lazy, notify, &mut report) {
        Ok(never) => match never {},
        Err(e) => {
            let mut msg = vec![MSG_ERROR];
            msg.extend_from_slice(format!("{e:#}").as_bytes());
            let mut f = unsafe { std::fs::File::from_raw_fd(report) };
            let _ = f.write_all(&msg);
            1
        }
    }
}

/// `report` is the status pipe's fd, updated when it moves.
fn prepare_and_jump(
    m: &Manifest,
    p: &Process,
    lazy: &[(u64, u64)],
    notify: Option<RawFd>,
    report: &mut RawFd,
) -> Result<std::convert::Infallible> {
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    unsafe {
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
    }
    if p.sid == p.pid {
        if unsafe { libc::setsid() } < 0 {
            return Err(errno_err("setsid"));
        }
    } else if p.pgid == p.pid && unsafe { libc::setpgid(0, 0) } < 0 {
        return Err(errno_err("setpgid"));
    }
    let max_fd = p.fds.iter().map(|f| f.fd).max().unwrap_or(2).max(2);
    // Everything we still need lives above the app's highest fd while its table is built.
    let high = max_fd + 1;
    *report = dup_high(*report, high)?;
    let mut stdio = vec![
        dup_high_or_null(0, high)?,
        dup_high_or_null(1, high)?,
        dup_high_or_null(2, high)?,
    ];
    if let Some(fd) = notify {
        stdio.push(dup_high(fd, high)?);
    }
    let mut keep = stdio.clone();
    keep.push(*report);
    close_all_except(&keep)?;
    crate::fds::install(m, p, &stdio, high)?;
    for fd in stdio {
        unsafe { libc::close(fd) };
    }
    if p.root != "/" {
        bail!(
            "process {} ran chrooted in {}: restoring a changed root is not supported yet",
            p.pid,
            p.root
        );
    }
    let cwd = cstr(&p.cwd)?;
    if unsafe { libc::chdir(cwd.as_ptr()) } < 0 {
        return Err(errno_err(format!("chdir({})", p.cwd)));
    }
    unsafe { libc::umask(p.umask as libc::mode_t) };
    if unsafe { libc::personality(p.personality as libc::c_ulong) } < 0 {
        return Err(errno_err(format!("personality({:#x})", p.personality)));
    }
    recreate_private_files(p)?;
    let fds = open_mapping_fds(p, high)?;
    set_rlimits(p)?;

    let own = maps::parse(
        &std::fs::read_to_string("/proc/self/maps").context("reading /proc/self/maps")?,
    )?;
    let len = program::build(p, &own, &fds, 0, 0, lazy)?.0.map_len() as u64;
    let base = find_gap(&own, p, len)?;
    let (blob, uffd_slot) = program::build(p, &own, &fds, base, len, lazy)?;
    let addr = unsafe {
        libc::mmap(
            base as *mut libc::c_void,
            blob.map_len(),
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if addr as u64 != base {
        return Err(errno_err(format!("mapping the restorer at {base:#x}")));
    }
    unsafe {
        std::ptr::copy_nonoverlapping(blob.bytes.as_ptr(), base as *mut u8, blob.bytes.len())
    };
    let info = BlobInfo {
        base,
        map_len: blob.map_len() as u64,
        status_addr: blob.status_addr,
        syscall_trap: blob.syscall_trap,
        uffd_slot: uffd_slot.and_then(|s| blob.slot_addr(s)),
        labels: (0..)
            .map(|i| blob.describe(i).to_owned())
            .take_while(|l| !l.is_empty())
            .collect(),
    };
    let mut msg = vec![MSG_BLOB];
    msg.extend_from_slice(&serde_json::to_vec(&info)?);
    let mut pipe = unsafe { std::fs::File::from_raw_fd(*report) };
    pipe.write_all(&msg)?;
    drop(pipe);
    unregister_rseq();
    // SAFETY: the blob is mapped at `base` and built for it; it never returns here.
    unsafe { warmstart_parasite::jump(blob.entry, blob.program, blob.stack_top) }
}

fn dup_high(fd: RawFd, min: RawFd) -> Result<RawFd> {
    let r = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) };
    if r < 0 {
        return Err(errno_err(format!("duplicating fd {fd}")));
    }
    Ok(r)
}

/// A copy of the caller's stdio fd `fd` (or of /dev/null where the caller has none).
fn dup_high_or_null(fd: RawFd, min: RawFd) -> Result<RawFd> {
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
        return dup_high(fd, min);
    }
    let null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if null < 0 {
        return Err(errno_err("opening /dev/null"));
    }
    let r = dup_high(null, min);
    unsafe { libc::close(null) };
    r
}

fn close_all_except(keep: &[RawFd]) -> Result<()> {
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .context("listing /proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in fds {
        if !keep.contains(&fd) {
            unsafe { libc::close(fd) };
        }
    }
    Ok(())
}

fn open_path(path: &str, flags: i32) -> Result<RawFd> {
    let c = cstr(path)?;
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, 0) };
    if fd < 0 {
        return Err(errno_err(format!("opening {path}")));
    }
    Ok(fd)
}

/// One fd per mapped file (and the executable), above the app's fds; the program closes them.
fn open_mapping_fds(p: &Process, high: RawFd) -> Result<ProgramFds> {
    let mut by_path: std::collections::HashMap<(String, bool), RawFd> =
        std::collections::HashMap::new();
    let mut vma_fds = Vec::with_capacity(p.vmas.len());
    for v in &p.vmas {
        let VmaKind::File { file } = &v.kind else {
            vma_fds.push(None);
            continue;
        };
        let rw = v.shared && v.prot & warmstart_snapshots::model::PROT_WRITE != 0;
        let fd = match by_path.get(&(file.path.clone(), rw)) {
            Some(&fd) => fd,
            None => {
                let fd = open_path(&file.path, if rw { libc::O_RDWR } else { libc::O_RDONLY })?;
                let fd = if fd < high {
                    let h = dup_high(fd, high)?;
                    unsafe { libc::close(fd) };
                    h
                } else {
                    fd
                };
                by_path.insert((file.path.clone(), rw), fd);
                fd
            }
        };
        vma_fds.push(Some(fd));
    }
    let exe = open_path(&p.exe.path, libc::O_RDONLY)?;
    let exe_fd = if exe < high {
        let h = dup_high(exe, high)?;
        unsafe { libc::close(exe) };
        h
    } else {
        exe
    };
    Ok(ProgramFds { vma_fds, exe_fd })
}

fn set_rlimits(p: &Process) -> Result<()> {
    for r in &p.rlimits {
        let lim = libc::rlimit64 {
            rlim_cur: r.cur,
            rlim_max: r.max,
        };
        if unsafe { libc::prlimit64(0, r.resource as _, &lim, std::ptr::null_mut()) } < 0 {
            let e = std::io::Error::last_os_error();
            bail!(
                "cannot restore resource limit {} to {}/{}: {e} (raising a hard limit needs CAP_SYS_RESOURCE)",
                r.resource,
                r.cur,
                r.max
            );
        }
    }
    Ok(())
}

/// An address range of `len` bytes free in both our layout and the snapshot's.
fn find_gap(own: &[MapEntry], p: &Process, len: u64) -> Result<u64> {
    const GUARD: u64 = 1 << 20;
    let mut used: Vec<(u64, u64)> = own.iter().map(|m| (m.start, m.end)).collect();
    used.extend(p.vmas.iter().map(|v| (v.start, v.end)));
    used.sort_unstable();
    // Search downward from below the usual mmap base, away from stacks.
    let mut candidate = 0x7e00_0000_0000u64;
    loop {
        let end = candidate + len;
        match used
            .iter()
            .find(|&&(s, e)| s < end + GUARD && e + GUARD > candidate)
        {
            None => return Ok(candidate),
            Some(&(s, _)) => {
                if s < len + 2 * GUARD + 0x1000_0000 {
                    bail!("no free address range of {len} bytes for the restorer");
                }
                candidate = (s - len - GUARD) & !0xfff;
            }
        }
    }
}

/// glibc registered an rseq area for this thread inside memory the restorer unmaps; the
/// kernel would fault writing to it (SIGSEGV, SI_KERNEL) at the next preemption.
fn unregister_rseq() {
    extern "C" {
        static __rseq_offset: isize;
        static __rseq_size: u32;
    }
    const RSEQ_FLAG_UNREGISTER: i32 = 1;
    const RSEQ_SIG: u32 = 0x5305_3053;
    // SAFETY: glibc >= 2.35 exports both; the thread pointer is fs:0 on x86_64.
    let (offset, size) = unsafe { (__rseq_offset, __rseq_size) };
    if size == 0 {
        return;
    }
    let tp: u64;
    unsafe { std::arch::asm!("mov {}, fs:0", out(reg) tp) };
    let area = (tp as i64 + offset as i64) as u64;
    // The registered length is glibc's area size (32 bytes), which may exceed the
    // advertised feature size.
    for len in [size.max(32), size] {
        if unsafe { libc::syscall(libc::SYS_rseq, area, len, RSEQ_FLAG_UNREGISTER, RSEQ_SIG) } == 0
        {
            return;
        }
    }
}

/// The instance's own instance-private directories (a fresh tmpfs each), refilled with
/// the files the process had there.
fn recreate_private_files(p: &Process) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    crate::private_dirs::Mounts::prepare().mount();
    for f in &p.private_files {
        std::fs::write(&f.path, &f.data).with_context(|| format!("recreating {}", f.path))?;
        std::fs::set_permissions(&f.path, std::fs::Permissions::from_mode(f.mode & 0o7777))
            .with_context(|| format!("chmod of {}", f.path))?;
    }
    Ok(())
}
