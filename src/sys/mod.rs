//! Thin kernel wrappers that no crate provides.

pub mod cgroup;
pub mod cpuid;
pub mod dirwatch;
pub mod eventfd;
pub mod ipc;
pub mod maps;
pub mod nft;
pub mod ns;
pub mod orphan;
pub mod pagemap_scan;
pub mod pidfd;
pub mod ptrace;
pub mod remote;
pub mod rtnl;
pub mod sched;
pub mod scm;
pub mod sysctl;
pub mod tasks;
pub mod tcp_repair;
pub mod timens;
pub mod uffd;
pub mod vdso;

/// Waits (without a timeout, across EINTR) until one of `fds` is readable or hung up;
/// which ones are.
pub fn wait_readable<const N: usize>(fds: [std::os::fd::RawFd; N]) -> std::io::Result<[bool; N]> {
    let mut p = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `p` is an owned array of exactly N initialised pollfds that outlives the
        // call; the kernel only writes their `revents` fields.
        if unsafe { libc::poll(p.as_mut_ptr(), N as libc::nfds_t, -1) } >= 0 {
            return Ok(p.map(|x| x.revents != 0));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether fd `a` of process `pid` and fd `b` of the same process share one open file
/// description (`kcmp(KCMP_FILE)`).
pub fn kcmp_file(pid: i32, a: i32, b: i32) -> std::io::Result<bool> {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: kcmp takes integer arguments only (pids, a type and two fd numbers); no memory
    // is passed and nothing is taken ownership of.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, a, b) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r == 0)
}

/// Whether fd `a` of process `pa` and fd `b` of process `pb` share one open file
/// description (`kcmp(KCMP_FILE)`): an fd inherited over fork, or passed.
pub fn kcmp_files(pa: i32, a: i32, pb: i32, b: i32) -> std::io::Result<bool> {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: kcmp takes integer arguments only (pids, a type and two fd numbers); no memory
    // is passed and nothing is taken ownership of.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pa, pb, KCMP_FILE, a, b) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r == 0)
}

/// Makes room in this process's fd table for at least `count` fds (above the first 64):
/// the table grows once, to its final size, instead of doubling while they are opened.
/// While other threads share the table each growth waits for an RCU grace period
/// (`expand_fdtable`: several milliseconds), so this is best done while the process is
/// still single-threaded. The kernel never shrinks the table.
pub fn reserve_fds(count: usize) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let top = libc::c_int::try_from(count.saturating_add(64)).unwrap_or(libc::c_int::MAX);
    // SAFETY: integer arguments only; the duplicate is closed right away.
    let fd = unsafe { libc::fcntl(0, libc::F_DUPFD_CLOEXEC, top) };
    let fd = if fd < 0 {
        // No fd 0 to duplicate: any fd will do.
        let null = std::fs::File::open("/dev/null")?;
        // SAFETY: as above; `null` stays open across the call.
        unsafe { libc::fcntl(null.as_raw_fd(), libc::F_DUPFD_CLOEXEC, top) }
    } else {
        fd
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is the duplicate made above, which nothing else refers to.
    drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
    Ok(())
}
