//! pidfd helpers: `pidfd_open`, `pidfd_getfd`, `pidfd_send_signal`, and the pid a pidfd
//! refers to (from `/proc/self/fdinfo`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `PIDFD_NONBLOCK` (= `O_NONBLOCK`).
pub const PIDFD_NONBLOCK: u32 = libc::O_NONBLOCK as u32;

fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub use warmstart_launcher::sys::pidfd_open;

/// `pidfd_getfd(pidfd, targetfd, 0)`: duplicates descriptor `targetfd` of the process
/// into this one (close-on-exec). Needs ptrace-attach permission over the process.
pub fn pidfd_getfd(pidfd: impl AsFd, targetfd: RawFd) -> io::Result<OwnedFd> {
    let pidfd = pidfd.as_fd().as_raw_fd();
    // SAFETY: pidfd_getfd takes integer arguments only (two fds and flags); no memory.
    let r = check(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, targetfd, 0u32) })?;
    // SAFETY: pidfd_getfd succeeded, so `r` is a fresh duplicate installed in our table
    // that nothing else owns; it is wrapped exactly once.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

/// `pidfd_send_signal(pidfd, sig, NULL, 0)`.
pub fn pidfd_send_signal(pidfd: impl AsFd, sig: libc::c_int) -> io::Result<()> {
    let pidfd = pidfd.as_fd().as_raw_fd();
    // SAFETY: the other arguments are integers, and a NULL siginfo is allowed (the kernel
    // then fills in one as kill(2) would), so no memory of ours is read.
    check(unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd,
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    })?;
    Ok(())
}

/// The pid (in this process's pid namespace) of the process `pidfd` refers to, from the
/// `Pid:` line of `/proc/self/fdinfo/N`. `None` when the process has exited (-1) or is
/// not visible in this namespace (0).
pub fn global_pid_of(pidfd: impl AsFd) -> io::Result<Option<libc::pid_t>> {
    let fd = pidfd.as_fd().as_raw_fd();
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    parse_fdinfo_pid(&text)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "fdinfo has no Pid: line"))
        .map(|p| (p > 0).then_some(p))
}

fn parse_fdinfo_pid(text: &str) -> Option<libc::pid_t> {
    text.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn parse_fdinfo() {
        let t = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1\nPid:\t4242\nNSpid:\t4242\n";
        assert_eq!(parse_fdinfo_pid(t), Some(4242));
        assert_eq!(parse_fdinfo_pid("Pid:\t-1\n"), Some(-1));
        assert_eq!(parse_fdinfo_pid("x"), None);
    }

    #[test]
    fn open_self_and_pid() {
        let fd = pidfd_open(std::process::id() as i32, 0).unwrap();
        assert_eq!(global_pid_of(&fd).unwrap(), Some(std::process::id() as i32));
        // Signal 0 probes deliverability.
        pidfd_send_signal(&fd, 0).unwrap();
    }

    #[test]
    fn getfd_and_signal_child() {
        // The child holds a pipe's write end; we take it with pidfd_getfd and write.
        let (mut r, w) = std::io::pipe().unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdout(w)
            .spawn()
            .unwrap();
        let pfd = pidfd_open(child.id() as i32, 0).unwrap();
        assert_eq!(global_pid_of(&pfd).unwrap(), Some(child.id() as i32));
        let taken = pidfd_getfd(&pfd, 1).unwrap();
        let mut f = std::fs::File::from(taken);
        f.write_all(b"hi").unwrap();
        drop(f);
        let mut buf = [0u8; 2];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        pidfd_send_signal(&pfd, libc::SIGKILL).unwrap();
        let st = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL));
        assert_eq!(global_pid_of(&pfd).unwrap(), None);
    }
}
