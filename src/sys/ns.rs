//! Namespaces: which one a process is in, and running code inside another process's.
//!
//! The uts, ipc and net namespaces are per *thread* (`setns` of a thread of a
//! multi-threaded process is allowed for them, unlike for mount, user and time
//! namespaces), so warmstart enters one on a short-lived thread of its own: the rest of
//! the process never leaves the host's, and nothing has to be undone afterwards.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use anyhow::{anyhow, Context, Result};

/// The kinds a process can have of its own, as named in `/proc/PID/ns`.
pub const KINDS: [&str; 8] = ["pid", "mnt", "uts", "ipc", "net", "user", "cgroup", "time"];

/// The identity of namespace `kind` of process `pid` (`self` for ours): the device and
/// inode of `/proc/PID/ns/KIND`.
pub fn id(pid: &str, kind: &str) -> std::io::Result<(u64, u64)> {
    let m = std::fs::metadata(format!("/proc/{pid}/ns/{kind}"))?;
    Ok((m.dev(), m.ino()))
}

/// `/proc/PID/ns/KIND` opened, for [`run_in`].
pub fn open(pid: i32, kind: &str) -> Result<OwnedFd> {
    let f = std::fs::File::open(format!("/proc/{pid}/ns/{kind}"))
        .with_context(|| format!("opening the {kind} namespace of process {pid}"))?;
    Ok(OwnedFd::from(f))
}

/// Runs `f` on a new thread that first joins, with `setns(fd, flags)`, the namespaces
/// `fd` names: a namespace fd (`flags` its one `CLONE_NEW*` or 0), or a pidfd with the
/// `CLONE_NEW*` flags of the namespaces to join (uts, ipc and net only). The calling
/// thread stays where it is.
pub fn run_in<T: Send>(
    fd: BorrowedFd<'_>,
    flags: i32,
    what: &str,
    f: impl FnOnce() -> Result<T> + Send,
) -> Result<T> {
    let raw = fd.as_raw_fd();
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("ns".into())
            .spawn_scoped(s, move || {
                // SAFETY: setns takes an fd the caller keeps open for the call and an
                // integer; it changes only this thread's namespaces, and this thread ends
                // with `f`.
                if unsafe { libc::setns(raw, flags) } != 0 {
                    return Err(anyhow!(
                        "entering {what}: {}",
                        std::io::Error::last_os_error()
                    ));
                }
                f()
            })
            .context("starting a thread to enter a namespace")?
            .join()
            .map_err(|_| anyhow!("the thread in {what} panicked"))?
    })
}

/// Runs `f` on a new thread that has unshared the namespaces in `flags` (new, empty
/// ones, gone once the thread is): for tests and for learning what a fresh namespace
/// holds.
pub fn run_unshared<T: Send>(flags: i32, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: unshare takes an integer; uts, ipc and net are per thread, so only
            // this thread, which ends with `f`, changes namespaces.
            if unsafe { libc::unshare(flags) } != 0 {
                return Err(anyhow!("unshare: {}", std::io::Error::last_os_error()));
            }
            f()
        })
        .join()
        .map_err(|_| anyhow!("the thread in a new namespace panicked"))?
    })
}

/// The calling thread in another network namespace until dropped (then back in the one
/// it was in). Sockets it creates meanwhile (`sock_diag` queries) belong to that
/// namespace; sockets it had keep theirs.
pub struct NetnsGuard {
    back: OwnedFd,
}

impl NetnsGuard {
    /// Moves the calling thread into the network namespace of process `pid`.
    pub fn enter(pid: i32) -> Result<NetnsGuard> {
        Self::enter_file(&format!("/proc/{pid}/ns/net"))
    }

    /// Moves the calling thread into the network namespace `path` names.
    pub fn enter_file(path: &str) -> Result<NetnsGuard> {
        let back = OwnedFd::from(
            std::fs::File::open(format!("/proc/self/task/{}/ns/net", nix::unistd::gettid()))
                .context("opening our network namespace")?,
        );
        let target =
            OwnedFd::from(std::fs::File::open(path).with_context(|| format!("opening {path}"))?);
        // SAFETY: setns takes an fd we hold open for the call and an integer; the network
        // namespace is per thread, and the guard puts this thread back.
        if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(anyhow!(
                "entering the network namespace {path}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(NetnsGuard { back })
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        // SAFETY: as in `enter`: back into the namespace this thread came from.
        if unsafe { libc::setns(self.back.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            // A thread left in another namespace would talk to the wrong network.
            panic!(
                "returning to our network namespace: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// A pidfd of `pid` (`pidfd_open`).
pub fn pidfd(pid: i32) -> Result<OwnedFd> {
    // SAFETY: integer arguments only; the fd returned is owned right below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(anyhow!(
            "pidfd_open({pid}): {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a new descriptor from pidfd_open, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// This thread's uts namespace's host name and NIS domain name (`uname`).
pub fn uts_names() -> Result<(String, String)> {
    // SAFETY: `utsname` is plain C character arrays: valid when zeroed.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a live `utsname` the kernel fills.
    if unsafe { libc::uname(&mut u) } != 0 {
        return Err(anyhow!("uname: {}", std::io::Error::last_os_error()));
    }
    let s = |a: &[libc::c_char]| {
        let bytes: Vec<u8> = a
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    Ok((s(&u.nodename), s(&u.domainname)))
}

/// Sets this thread's uts namespace's host name and NIS domain name.
pub fn set_uts_names(hostname: &str, domainname: &str) -> Result<()> {
    // SAFETY: each pointer and length describe a live byte string the kernel only reads.
    if unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) } != 0 {
        return Err(anyhow!(
            "setting the host name {hostname:?}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: as above.
    if unsafe { libc::setdomainname(domainname.as_ptr().cast(), domainname.len()) } != 0 {
        return Err(anyhow!(
            "setting the domain name {domainname:?}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_in_a_new_uts_namespace_leaves_ours_alone() {
        let ours = id("self", "uts").unwrap();
        let (inner, name) = run_unshared(libc::CLONE_NEWUTS, || {
            set_uts_names("ns-test", "dom")?;
            let tid = nix::unistd::gettid();
            Ok((id(&format!("self/task/{tid}"), "uts")?, uts_names()?))
        })
        .unwrap();
        assert_ne!(inner, ours);
        assert_eq!(name, ("ns-test".to_owned(), "dom".to_owned()));
        assert_ne!(uts_names().unwrap().0, "ns-test");
        assert_eq!(id("self", "uts").unwrap(), ours);
    }

    #[test]
    fn netns_guard_goes_back() {
        // A thread holds a new network namespace until told to end.
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            run_unshared(libc::CLONE_NEWNET, move || {
                tx.send(nix::unistd::gettid().as_raw()).unwrap();
                let _ = done_rx.recv();
                Ok(())
            })
        });
        let tid = rx.recv().unwrap();
        let me = format!("self/task/{}", nix::unistd::gettid());
        let theirs = id(&format!("self/task/{tid}"), "net").unwrap();
        let before = id(&me, "net").unwrap();
        let inside = {
            let _g = NetnsGuard::enter_file(&format!("/proc/self/task/{tid}/ns/net")).unwrap();
            id(&me, "net").unwrap()
        };
        let after = id(&me, "net").unwrap();
        done_tx.send(()).unwrap();
        holder.join().unwrap().unwrap();
        assert_eq!(inside, theirs);
        assert_ne!(before, inside);
        assert_eq!(before, after);
    }
}
