//! Thin kernel wrappers that no crate provides.

pub mod cgroup;
pub mod ipc;
pub mod maps;
pub mod nft;
pub mod ns;
pub mod pidfd;
pub mod ptrace;
pub mod remote;
pub mod rtnl;
pub mod scm;
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
