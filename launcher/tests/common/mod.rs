#![allow(dead_code)]
//! Test helpers: pipes, bounded event waits, forked helpers that never leak.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

pub const LONG: Duration = Duration::from_secs(30);

pub fn pipe() -> (OwnedFd, OwnedFd) {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe2")
}

/// Wait until `fd` is readable (POLLIN/POLLHUP) or `timeout` passes.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is one live, initialised pollfd; the kernel writes only its revents.
        let n = unsafe { libc::poll(&mut p, 1, left.as_millis() as i32) };
        if n > 0 {
            return true;
        }
        if n == 0 {
            return false;
        }
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EINTR)
        );
    }
}

/// Read exactly `n` bytes, waiting at most `timeout` overall.
pub fn read_exact(fd: RawFd, n: usize, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut out = vec![0u8; n];
    let mut got = 0;
    while got < n {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(wait_readable(fd, left), "timed out after {got}/{n} bytes");
        // SAFETY: out[got..] is n - got bytes of our own Vec, writable, and the kernel
        // writes at most that many.
        let r = unsafe { libc::read(fd, out[got..].as_mut_ptr() as *mut _, n - got) };
        assert!(r > 0, "read: {r} {}", std::io::Error::last_os_error());
        got += r as usize;
    }
    out
}

/// Read whatever is buffered now (the writers have exited), without waiting for EOF
/// (other tests' children may hold copies of the write end).
pub fn read_available(fd: &OwnedFd) -> String {
    // SAFETY: F_SETFL takes an integer flag argument; `fd` is borrowed open.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: `buf` is a live local writable for buf.len() bytes, the count passed.
        let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr() as *mut _, buf.len()) };
        if r <= 0 {
            break;
        }
        out.extend_from_slice(&buf[..r as usize]);
    }
    String::from_utf8(out).unwrap()
}

/// argv for `/bin/sh -c script`, built before any fork.
pub struct ShCmd {
    path: CString,
    _args: Vec<CString>,
    argv: Vec<*const libc::c_char>,
}

impl ShCmd {
    pub fn new(script: &str) -> Self {
        let path = CString::new("/bin/sh").unwrap();
        let args = vec![
            CString::new("sh").unwrap(),
            CString::new("-c").unwrap(),
            CString::new(script).unwrap(),
        ];
        let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        ShCmd {
            path,
            _args: args,
            argv,
        }
    }

    /// exec it (async-signal-safe); returns 127 if exec failed.
    pub fn exec(&self) -> i32 {
        // SAFETY: `path` and the `_args` that `argv` points into are CStrings owned by
        // self, alive for the call; `argv` ends with a null pointer as execv requires.
        unsafe { libc::execv(self.path.as_ptr(), self.argv.as_ptr()) };
        127
    }
}

/// Write an i32 with a raw write (async-signal-safe).
pub fn write_i32(fd: RawFd, v: i32) {
    let b = v.to_ne_bytes();
    // SAFETY: `b` is a live 4-byte local, only read by the kernel.
    unsafe { libc::write(fd, b.as_ptr() as *const _, 4) };
}

pub fn read_i32s(fd: RawFd, n: usize) -> Vec<i32> {
    read_exact(fd, 4 * n, LONG)
        .chunks(4)
        .map(|c| i32::from_ne_bytes(c.try_into().unwrap()))
        .collect()
}

/// A forked helper process, SIGKILLed and reaped on drop unless waited.
pub struct Child {
    pub pid: i32,
    done: bool,
}

impl Child {
    /// Fork; the child runs `f` and `_exit`s with its result (101 on panic). Uses glibc's
    /// fork, so the child may allocate; it must not touch locks held by other threads.
    pub fn fork(f: impl FnOnce() -> i32) -> Child {
        // SAFETY: the child never returns into the caller: it runs `f` and `_exit`s, so no
        // state duplicated by fork is dropped or flushed twice. glibc's fork re-initialises
        // malloc's locks in the child, so `f` may allocate; other locks held by the test
        // harness's threads are the caller's to avoid, as documented above.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
            // SAFETY: _exit takes an integer and does not return; skipping destructors and
            // atexit handlers is the point in a forked child.
            unsafe { libc::_exit(code) };
        }
        Child { pid, done: false }
    }

    /// Raw wait status.
    pub fn wait_status(&mut self) -> i32 {
        let mut st = 0;
        loop {
            // SAFETY: `st` is a live c_int the kernel writes the status into.
            let r = unsafe { libc::waitpid(self.pid, &mut st, 0) };
            if r == self.pid {
                break;
            }
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EINTR)
            );
        }
        self.done = true;
        st
    }

    /// It was reaped elsewhere (e.g. by a ptrace loop).
    pub fn reaped(&mut self) {
        self.done = true;
    }

    /// Exit code (panics if killed by a signal).
    pub fn wait_code(&mut self) -> i32 {
        let st = self.wait_status();
        assert!(
            libc::WIFEXITED(st),
            "helper killed by signal {}",
            libc::WTERMSIG(st)
        );
        libc::WEXITSTATUS(st)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.done {
            // SAFETY: kill takes integer arguments only; `pid` is our unreaped child, so the
            // pid cannot have been reused by another process.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let mut st = 0;
            // SAFETY: `st` is a live c_int the kernel writes the status into.
            while unsafe { libc::waitpid(self.pid, &mut st, libc::__WALL) } < 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
            {}
        }
    }
}

pub fn pidfd_open(pid: i32) -> OwnedFd {
    warmstart_launcher::sys::pidfd_open(pid, 0).unwrap_or_else(|e| panic!("pidfd_open({pid}): {e}"))
}
