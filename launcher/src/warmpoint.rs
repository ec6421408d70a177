//! `--ready TRIGGER`: the tracer-side state machine that finds an app's warm point.
//!
//! The monitor spawns the app in the sandbox with the trigger's seccomp filter
//! ([`Ready::filter`], installed in the app child before `exec`), seizes it with
//! `PTRACE_O_TRACESECCOMP | PTRACE_O_TRACECLONE | PTRACE_O_EXITKILL |
//! PTRACE_O_TRACESYSGOOD`, releases it, creates a [`WarmPointTracker`] and feeds it every
//! `waitpid` status of every traced thread ([`WarmPointTracker::on_stop`]), plus the
//! timeouts ([`WarmPointTracker::on_timeout`]) and readiness of its sd_notify socket
//! ([`WarmPointTracker::on_readable`]). [`WarmPointTracker::run`] is that whole loop.
//!
//! `PTRACE_O_TRACECLONE` matters: threads inherit the filter, and a trapped syscall in a
//! thread nobody traces fails with `ENOSYS`.
//!
//! | trigger | filter traps | warm point |
//! |---|---|---|
//! | `stdin` | reads of fd 0 | the first one (syscall-entry stop) |
//! | `listen` | listen, accept(4), (p)poll, (p)select, epoll_(p)wait(2) | the first accept / poll / select / epoll wait whose set holds a listening socket (`SO_ACCEPTCONN`, checked on a `pidfd_getfd` copy) and that blocks (no zero timeout, nothing ready now, a blocking socket for accept), in any process of the app's tree; held until the rest of the tree settles (see [`WarmPointTracker::run`]) |
//! | `notify` | read/readv/recvfrom/recvmsg of [`NOTIFY_FD`] | the first read of the notify fd after the app wrote `READY=1`; or, sd_notify, the `PTRACE_INTERRUPT` stop right after `READY=1` arrived on `$NOTIFY_SOCKET` |
//! | `after=D` | nothing | the `PTRACE_INTERRUPT` stop after D |
//! | `signal` | nothing | the app's own SIGSTOP (signal-delivery stop; the SIGSTOP is suppressed) |
//!
//! # Restoring a `notify` app
//!
//! At its warm point a `notify` app is blocked in `read(NOTIFY_FD)` (restartable syscall
//! entry). The snapshot records [`NOTIFY_FD`] as one end of an `AF_UNIX` `SOCK_STREAM`
//! socketpair whose peer is outside the app. At restore warmstart creates a fresh
//! [`NotifyChannel`], installs its app end at [`NOTIFY_FD`] in place of the recorded one,
//! and, *before* the app resumes, calls [`notify_reply`] with [`RESTORED_MSG`] on the launcher end:
//! the restarted `read` returns `RESTORED=1\n` at once. Keep the launcher end open while
//! the app runs (the app may write again, e.g. `STATUS=...`, and must not get `EPIPE`);
//! `$WARMSTART_NOTIFY_FD` is in the recorded environment already. sd_notify apps do not
//! block on their socket: nothing to do at restore (the recorded socket is
//! unconnected; a datagram to the old path fails harmlessly or reaches the new
//! supervisor's socket if one is bound there).

use std::collections::HashSet;
use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::trigger::{Filter, Trap, Trigger};
use crate::LaunchError;

/// The app's fd number of its end of the notify channel (`$WARMSTART_NOTIFY_FD`). High
/// enough not to collide with socket activation (3..) or shell redirections.
pub const NOTIFY_FD: i32 = 100;
/// Environment variable naming the notify fd.
pub const NOTIFY_FD_ENV: &str = "WARMSTART_NOTIFY_FD";
/// Environment variable of the sd_notify protocol.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";
/// What the app writes when it is warm.
pub const READY_MSG: &[u8] = b"READY=1\n";
/// What the app reads after a restore.
pub const RESTORED_MSG: &[u8] = b"RESTORED=1\n";
/// What the recorded app reads when `record --leave-running` lets it go on after the dump.
pub const LEFT_RUNNING_MSG: &[u8] = b"RESTORED=0\n";

/// `--ready TRIGGER`: when the snapshot is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ready {
    /// The app's first read of fd 0.
    Stdin,
    /// The app's first wait for a connection on a listening socket.
    Listen,
    /// `READY=1` on `$WARMSTART_NOTIFY_FD` (then the app's read of it) or
    /// `$NOTIFY_SOCKET`.
    Notify,
    /// A fixed time after the app was released.
    After(Duration),
    /// The app stops itself with SIGSTOP.
    Signal,
}

/// The valid forms, for error messages.
pub const READY_FORMS: &str =
    "stdin, listen, notify, after=DURATION (e.g. after=500ms, after=2s, after=1m), signal";

impl FromStr for Ready {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| format!("invalid --ready {s:?}: {why}; valid forms: {READY_FORMS}");
        match s.trim() {
            "stdin" => Ok(Ready::Stdin),
            "listen" => Ok(Ready::Listen),
            "notify" => Ok(Ready::Notify),
            "signal" => Ok(Ready::Signal),
            t => {
                let Some(d) = t.strip_prefix("after=") else {
                    return Err(bad("unknown trigger"));
                };
                parse_duration(d)
                    .map(Ready::After)
                    .ok_or_else(|| bad("bad duration (a whole number with ms, s or m)"))
            }
        }
    }
}

fn parse_duration(d: &str) -> Option<Duration> {
    let (num, unit) = d.split_at(d.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        _ => None,
    }
}

impl fmt::Display for Ready {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ready::Stdin => f.write_str("stdin"),
            Ready::Listen => f.write_str("listen"),
            Ready::Notify => f.write_str("notify"),
            Ready::Signal => f.write_str("signal"),
            Ready::After(d) if d.subsec_millis() == 0 => write!(f, "after={}s", d.as_secs()),
            Ready::After(d) => write!(f, "after={}ms", d.as_millis()),
        }
    }
}

impl Ready {
    /// The seccomp traps of this trigger (empty for `after=` and `signal`).
    pub fn triggers(&self) -> &'static [Trigger] {
        match self {
            Ready::Stdin => &[Trigger::Stdin],
            Ready::Listen => &[Trigger::Listen],
            Ready::Notify => &[Trigger::Notify(Some(NOTIFY_FD as u32))],
            Ready::After(_) | Ready::Signal => &[],
        }
    }

    /// The filter to install in the app child (`None`: install nothing). Build it before
    /// `spawn`; [`Filter::install`] is async-signal-safe.
    pub fn filter(&self) -> Result<Option<Filter>, LaunchError> {
        let t = self.triggers();
        if t.is_empty() {
            return Ok(None);
        }
        Filter::build(t).map(Some)
    }
}

/// How the app (its thread-group leader) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// `exit(code)`.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

/// What kind of ptrace stop the warm point is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopKind {
    /// `PTRACE_EVENT_SECCOMP` at the entry of syscall `nr` (dump "at syscall entry": the
    /// syscall is restarted at resume).
    SyscallEntry { nr: i64, trap: Option<Trap> },
    /// Signal-delivery stop of this signal.
    SignalDelivery(i32),
    /// `PTRACE_EVENT_STOP` (after [`interrupt_all`]).
    Interrupt,
}

/// The stop at which the app is warm: the thread `tid` is in a ptrace stop of `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WarmStop {
    pub tid: i32,
    pub kind: StopKind,
    /// The signal to pass to `PTRACE_CONT` if the app is resumed from this stop (0 for
    /// the `signal` trigger: its SIGSTOP is suppressed, not part of the snapshot).
    pub resume_signal: i32,
}

/// What the monitor learns from one ptrace stop of a traced app thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The app is warm: leave `tid` stopped and dump.
    WarmPoint(WarmStop),
    /// `PTRACE_CONT` the thread with this signal (0: none).
    Continue { inject_signal: i32 },
    /// A group stop of a seized tracee: `PTRACE_LISTEN` (stays stopped like an untraced
    /// process would, until SIGCONT; no warm point while it is).
    Listen,
    /// A thread other than the leader is gone (reaped by that `waitpid`): nothing to do.
    ThreadExited,
    /// The app (its leader) is gone before its warm point.
    Exited(ExitStatus),
}

impl Verdict {
    /// Apply a `Continue` / `Listen` verdict to `tid` (nothing for the others). A thread
    /// that vanished meanwhile (`ESRCH`, e.g. SIGKILLed) is not an error.
    pub fn resume(&self, tid: i32) -> io::Result<()> {
        let (req, sig) = match *self {
            Verdict::Continue { inject_signal } => (libc::PTRACE_CONT, inject_signal),
            Verdict::Listen => (libc::PTRACE_LISTEN, 0),
            _ => return Ok(()),
        };
        // SAFETY: PTRACE_CONT/PTRACE_LISTEN take no pointer (`data` is a signal number);
        // the kernel checks that `tid` is our stopped tracee and fails with ESRCH
        // otherwise.
        let r = unsafe { libc::ptrace(req, tid, 0usize, sig as usize) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Errors of warm-point detection.
#[derive(Debug, thiserror::Error)]
pub enum WarmPointError {
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The notify fd / socket carried something that is not `KEY=VALUE` lines.
    #[error("the app wrote garbage to its notify {channel} (expected \"READY=1\\n\"): {got:?}")]
    NotifyGarbage { channel: &'static str, got: String },
    /// The app exited before its warm point.
    #[error("the app {} before its warm point", match .0 { ExitStatus::Code(c) => format!("exited with status {c}"), ExitStatus::Signal(s) => format!("was killed by signal {s}") })]
    Exited(ExitStatus),
    /// The sandbox's init exited (the app is gone).
    #[error("the sandbox exited before the app's warm point")]
    SandboxExited,
    /// [`WarmPointTracker::run`]'s timeout passed.
    #[error("the app did not reach its warm point ({0}) before the timeout")]
    Timeout(Ready),
}

fn io_err(op: &'static str) -> impl FnOnce(io::Error) -> WarmPointError {
    move |source| WarmPointError::Io { op, source }
}

fn last_err(op: &'static str) -> WarmPointError {
    WarmPointError::Io {
        op,
        source: io::Error::last_os_error(),
    }
}

// ---------------------------------------------------------------------------------------
// Notify: the fd protocol and sd_notify.

/// Parses notify messages: newline-separated `KEY=VALUE` assignments (`READY=1`,
/// `STATUS=...`, ...; sd_notify's syntax). Stream input may arrive in pieces.
#[derive(Debug, Default)]
pub struct NotifyParser {
    partial: Vec<u8>,
    ready: bool,
    files: Vec<String>,
}

/// A line a warmstart launcher sends before `READY=1`: one file the app loaded while it
/// warmed up (`record --tool`).
pub const FILE_KEY: &str = "WARMSTART_FILE";

impl NotifyParser {
    /// Has a `READY=1` line been seen?
    pub fn ready(&self) -> bool {
        self.ready
    }

    /// The values of the [`FILE_KEY`] lines seen, in order.
    pub fn files(&self) -> &[String] {
        &self.files
    }

    /// Feed stream bytes (`channel` names the source in errors); only complete lines are
    /// parsed.
    pub fn feed_stream(
        &mut self,
        bytes: &[u8],
        channel: &'static str,
    ) -> Result<(), WarmPointError> {
        self.partial.extend_from_slice(bytes);
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            self.line(&line[..line.len() - 1], channel)?;
        }
        if self.partial.len() > 4096 {
            let got = String::from_utf8_lossy(&self.partial[..64]).into_owned();
            return Err(WarmPointError::NotifyGarbage { channel, got });
        }
        Ok(())
    }

    /// Feed one datagram (complete: its last line needs no newline).
    pub fn feed_datagram(
        &mut self,
        msg: &[u8],
        channel: &'static str,
    ) -> Result<(), WarmPointError> {
        for line in msg.split(|&b| b == b'\n') {
            if !line.is_empty() {
                self.line(line, channel)?;
            }
        }
        Ok(())
    }

    fn line(&mut self, line: &[u8], channel: &'static str) -> Result<(), WarmPointError> {
        let garbage = || WarmPointError::NotifyGarbage {
            channel,
            got: String::from_utf8_lossy(line).chars().take(80).collect(),
        };
        let eq = line.iter().position(|&b| b == b'=').ok_or_else(garbage)?;
        let key = &line[..eq];
        let key_ok = !key.is_empty()
            && key
                .iter()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'_');
        if !key_ok || std::str::from_utf8(line).is_err() {
            return Err(garbage());
        }
        if line == b"READY=1" {
            self.ready = true;
        }
        if key == FILE_KEY.as_bytes() && !self.ready {
            // UTF-8 checked above.
            self.files
                .push(String::from_utf8_lossy(&line[eq + 1..]).into_owned());
        }
        Ok(())
    }
}

/// Write the handshake's answer ([`RESTORED_MSG`] after a restore, [`LEFT_RUNNING_MSG`]
/// to a recorded app that goes on running) to the launcher end of a notify channel, before
/// the app resumes, so its pending read of [`NOTIFY_FD`] returns it.
pub fn notify_reply(fd: BorrowedFd<'_>, msg: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while done < msg.len() {
        // SAFETY: the pointer and length describe `msg[done..]`, a live initialised slice
        // that `send` only reads.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                msg[done..].as_ptr() as *const libc::c_void,
                msg.len() - done,
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// The `$WARMSTART_NOTIFY_FD` channel: an `AF_UNIX` `SOCK_STREAM` socketpair. The app's
/// end goes to [`NOTIFY_FD`] in the app ([`NotifyChannel::install_in_child`]); the
/// launcher keeps the other (non-blocking).
#[derive(Debug)]
pub struct NotifyChannel {
    launcher: OwnedFd,
    app: Option<OwnedFd>,
    app_id: (u64, u64),
    parser: NotifyParser,
    env: CString,
}

fn fstat_id(fd: RawFd) -> io::Result<(u64, u64)> {
    let st = nix::sys::stat::fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

impl NotifyChannel {
    /// What the app said on the channel so far.
    pub fn parser(&self) -> &NotifyParser {
        &self.parser
    }

    /// Create the socketpair (both ends close-on-exec in the monitor).
    pub fn new() -> io::Result<Self> {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType};
        let (launcher, app) = nix::sys::socket::socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        nix::fcntl::fcntl(
            launcher.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        let app_id = fstat_id(app.as_raw_fd())?;
        Ok(NotifyChannel {
            launcher,
            app: Some(app),
            app_id,
            parser: NotifyParser::default(),
            env: CString::new(format!("{NOTIFY_FD_ENV}={NOTIFY_FD}")).unwrap(),
        })
    }

    /// `WARMSTART_NOTIFY_FD=100`, for the app's environment.
    pub fn env_entry(&self) -> &CString {
        &self.env
    }

    /// In the app child (async-signal-safe): put the app end at [`NOTIFY_FD`], not
    /// close-on-exec. Returns false on failure.
    pub fn install_in_child(&self) -> bool {
        let Some(app) = &self.app else { return false };
        let fd = app.as_raw_fd();
        // SAFETY: `fcntl(F_SETFD)` and `dup2` take integers only and are async-signal-safe
        // (this runs in the app child); `fd` is our open app end, borrowed from `self`, and
        // NOTIFY_FD is reserved for it in the app.
        unsafe {
            if fd == NOTIFY_FD {
                return libc::fcntl(fd, libc::F_SETFD, 0) == 0;
            }
            libc::dup2(fd, NOTIFY_FD) == NOTIFY_FD
        }
    }

    /// (dev, ino) of the app's end, to recognise it in the app's fd table.
    pub fn app_id(&self) -> (u64, u64) {
        self.app_id
    }

    /// Close the monitor's copy of the app end (after `spawn`).
    pub fn close_app_end(&mut self) {
        self.app = None;
    }

    /// The launcher's end.
    pub fn launcher_fd(&self) -> BorrowedFd<'_> {
        self.launcher.as_fd()
    }

    /// Read what the app wrote so far; true once `READY=1` arrived.
    pub fn poll_ready(&mut self) -> Result<bool, WarmPointError> {
        let parser = &mut self.parser;
        drain(
            self.launcher.as_fd(),
            "recv(notify fd)",
            &mut [0u8; 512],
            |b| {
                // End of stream: the app closed its end; nothing more will come.
                if b.is_empty() {
                    return Ok(false);
                }
                parser.feed_stream(b, "fd").map(|()| true)
            },
        )?;
        Ok(self.parser.ready())
    }

    /// Is `fd` of process `pid` the app end of this channel?
    pub fn is_app_end(&self, pid: i32, fd: i32) -> bool {
        nix::sys::stat::stat(format!("/proc/{pid}/fd/{fd}").as_str())
            .is_ok_and(|st| (st.st_dev, st.st_ino) == self.app_id)
    }
}

/// The sd_notify `$NOTIFY_SOCKET`: a bound, non-blocking `AF_UNIX` datagram socket, in a
/// fresh temporary directory or with an abstract name. The app does not block on it: the
/// warm point is the [`interrupt_all`] right after `READY=1` arrives.
#[derive(Debug)]
pub struct SdNotifySocket {
    fd: OwnedFd,
    dir: Option<PathBuf>,
    env: CString,
    parser: NotifyParser,
}

fn unix_addr(path: &[u8]) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: `sockaddr_un` is a plain C struct; all-zero bytes are valid (and leave
    // `sun_path` NUL-filled).
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if path.len() >= a.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (d, s) in a.sun_path.iter_mut().zip(path) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + path.len();
    Ok((a, len as libc::socklen_t))
}

impl SdNotifySocket {
    fn bind_raw(name: &[u8]) -> io::Result<OwnedFd> {
        // SAFETY: integer arguments only.
        let fd = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `socket` succeeded: a new descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let (a, len) = unix_addr(name)?;
        // SAFETY: `a` is a live `sockaddr_un` and `len` (family + path, checked shorter
        // than `sun_path`) does not exceed its size.
        if unsafe { libc::bind(fd.as_raw_fd(), &a as *const _ as *const libc::sockaddr, len) } != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }

    /// Bind `notify` in a fresh `mkdtemp` directory under `$TMPDIR` (removed on drop).
    pub fn bind() -> io::Result<Self> {
        let tmpl = std::env::temp_dir().join("warmstart-notify-XXXXXX");
        let mut t = CString::new(tmpl.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in TMPDIR"))?
            .into_bytes_with_nul();
        // SAFETY: `t` is a writable, NUL-terminated buffer ending in `XXXXXX`, which
        // `mkdtemp` rewrites in place without changing its length.
        if unsafe { libc::mkdtemp(t.as_mut_ptr() as *mut libc::c_char) }.is_null() {
            return Err(io::Error::last_os_error());
        }
        t.pop();
        let dir = PathBuf::from(String::from_utf8_lossy(&t).into_owned());
        let path = dir.join("notify");
        let bytes = path.as_os_str().as_encoded_bytes().to_vec();
        match Self::bind_raw(&bytes) {
            Ok(fd) => Ok(SdNotifySocket {
                fd,
                env: CString::new([NOTIFY_SOCKET_ENV.as_bytes(), b"=", &bytes].concat()).unwrap(),
                dir: Some(dir),
                parser: NotifyParser::default(),
            }),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                Err(e)
            }
        }
    }

    /// Bind an abstract name `@warmstart-notify-PID-N` (`$NOTIFY_SOCKET` starts with `@`;
    /// abstract names live in the network namespace, which the sandbox shares).
    pub fn bind_abstract() -> io::Result<Self> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("warmstart-notify-{}-{n}", std::process::id());
        let mut raw = vec![0u8];
        raw.extend_from_slice(name.as_bytes());
        let fd = Self::bind_raw(&raw)?;
        Ok(SdNotifySocket {
            fd,
            dir: None,
            env: CString::new(format!("{NOTIFY_SOCKET_ENV}=@{name}")).unwrap(),
            parser: NotifyParser::default(),
        })
    }

    /// `NOTIFY_SOCKET=...`, for the app's environment.
    pub fn env_entry(&self) -> &CString {
        &self.env
    }

    /// The socket (poll it for `POLLIN`).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Receive every queued datagram; true once one carried `READY=1`.
    pub fn recv_ready(&mut self) -> Result<bool, WarmPointError> {
        let parser = &mut self.parser;
        drain(
            self.fd.as_fd(),
            "recv(NOTIFY_SOCKET)",
            &mut [0u8; 4096],
            |b| parser.feed_datagram(b, "socket").map(|()| true),
        )?;
        Ok(self.parser.ready())
    }
}

/// Receives from non-blocking `fd` until nothing is queued, handing each read to `feed`
/// (which returns false to stop, e.g. at the end of a stream).
fn drain(
    fd: BorrowedFd<'_>,
    op: &'static str,
    buf: &mut [u8],
    mut feed: impl FnMut(&[u8]) -> Result<bool, WarmPointError>,
) -> Result<(), WarmPointError> {
    loop {
        // SAFETY: the pointer and length describe `buf`, a live writable slice; `recv`
        // writes at most `buf.len()` bytes.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EAGAIN) => return Ok(()),
                Some(libc::EINTR) => continue,
                _ => return Err(last_err(op)),
            }
        }
        if !feed(&buf[..n as usize])? {
            return Ok(());
        }
    }
}

impl Drop for SdNotifySocket {
    fn drop(&mut self) {
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_file(d.join("notify"));
            let _ = std::fs::remove_dir(d);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Tracee inspection.

/// `PTRACE_INTERRUPT` every thread of `pid` (from `/proc/PID/task`); each reports a
/// `PTRACE_EVENT_STOP`. Threads that vanish meanwhile are skipped.
pub fn interrupt_all(pid: i32) -> io::Result<()> {
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Some(tid) = e?.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        interrupt(tid)?;
    }
    Ok(())
}

/// `PTRACE_INTERRUPT` one thread (`ESRCH`: gone, ignored).
pub fn interrupt(tid: i32) -> io::Result<()> {
    // SAFETY: PTRACE_INTERRUPT takes no pointer; the kernel checks that `tid` is our
    // tracee.
    let r = unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0usize, 0usize) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e);
        }
    }
    Ok(())
}

fn getregs(tid: i32) -> io::Result<libc::user_regs_struct> {
    // SAFETY: `user_regs_struct` is plain integers; all-zero bytes are valid.
    let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
    // SAFETY: PTRACE_GETREGS writes one `user_regs_struct` to `data`, which points at the
    // live local `regs` of that type.
    let r = unsafe { libc::ptrace(libc::PTRACE_GETREGS, tid, 0usize, &mut regs as *mut _) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(regs)
}

fn geteventmsg(tid: i32) -> io::Result<u64> {
    let mut msg: libc::c_ulong = 0;
    // SAFETY: PTRACE_GETEVENTMSG writes one `c_ulong` to `data`, which points at the live
    // local `msg`.
    let r = unsafe { libc::ptrace(libc::PTRACE_GETEVENTMSG, tid, 0usize, &mut msg as *mut _) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(msg as u64)
}

/// Read `len` bytes at `addr` of `tid` (`process_vm_readv`).
fn read_mem(tid: i32, addr: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut out = vec![0u8; len];
    let local = libc::iovec {
        iov_base: out.as_mut_ptr() as *mut libc::c_void,
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: `local` describes `out`, a live buffer of `len` bytes we own; `remote` is an
    // address in the tracee, which the kernel reads through its page tables (a bad address
    // is EFAULT, never a read of our memory).
    let n = unsafe { libc::process_vm_readv(tid, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    out.truncate(n as usize);
    Ok(out)
}

/// Is fd `fd` of the process behind `pidfd` a listening socket? (A `pidfd_getfd` copy,
/// `getsockopt(SO_ACCEPTCONN)`; any failure: no.)
pub fn is_listening_socket(pidfd: BorrowedFd<'_>, fd: i32) -> bool {
    if fd < 0 {
        return false;
    }
    // SAFETY: integer arguments only; on success the result is a new descriptor in our
    // table.
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if copy < 0 {
        return false;
    }
    // SAFETY: `pidfd_getfd` succeeded, so `copy` is a new descriptor owned by nothing else.
    let copy = unsafe { OwnedFd::from_raw_fd(copy as RawFd) };
    nix::sys::socket::getsockopt(&copy, nix::sys::socket::sockopt::AcceptConn).unwrap_or(false)
}

/// The fds watched by epoll fd `epfd` of `pid` (`tfd:` lines of its fdinfo).
pub fn epoll_fds(pid: i32, epfd: i32) -> io::Result<Vec<i32>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{epfd}"))?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("tfd:"))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect())
}

/// A field of `/proc/TID/status` (e.g. `Tgid:`, `PPid:`) as a number.
fn status_field(tid: i32, key: &str) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().parse().ok())
}

/// Whether process `pid` is `root` or one of its descendants (parent links in `/proc`).
fn descends_from(mut pid: i32, root: i32) -> bool {
    for _ in 0..64 {
        if pid == root {
            return true;
        }
        match status_field(pid, "PPid:") {
            Some(p) if p > 1 => pid = p,
            _ => return false,
        }
    }
    false
}

/// A thread stopped at the entry of a trapped syscall, and what that syscall waits for.
struct Waiter<'a> {
    tid: i32,
    tgid: i32,
    /// A pidfd of its process (`tgid`), to copy its fds.
    pidfd: BorrowedFd<'a>,
    nr: i64,
    regs: &'a libc::user_regs_struct,
}

/// What a wait's timeout argument says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timeout {
    /// Returns at once (0, or a zero `timespec` / `timeval`).
    Zero,
    /// Waits (for some time, or for ever).
    Waits,
}

impl Waiter<'_> {
    /// Whether the syscall is one of the waits (poll, select, epoll, accept).
    fn is_wait(&self) -> bool {
        [
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_select,
            libc::SYS_pselect6,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_epoll_pwait2,
            libc::SYS_accept,
            libc::SYS_accept4,
        ]
        .contains(&self.nr)
    }

    /// A `timespec` (or `timeval`: same layout of two longs) at `addr`: `None` pointer
    /// means for ever.
    fn time_arg(&self, addr: u64) -> Timeout {
        if addr == 0 {
            return Timeout::Waits;
        }
        match read_mem(self.tid, addr, 16) {
            Ok(b) if b.len() == 16 => {
                if b.iter().all(|&x| x == 0) {
                    Timeout::Zero
                } else {
                    Timeout::Waits
                }
            }
            // Unreadable: the call fails with EFAULT at once.
            _ => Timeout::Zero,
        }
    }

    fn timeout(&self) -> Timeout {
        let r = self.regs;
        let int = |v: u64| {
            if v as i32 == 0 {
                Timeout::Zero
            } else {
                Timeout::Waits
            }
        };
        match self.nr {
            libc::SYS_poll => int(r.rdx),
            libc::SYS_ppoll => self.time_arg(r.rdx),
            libc::SYS_select | libc::SYS_pselect6 => self.time_arg(r.r8),
            libc::SYS_epoll_wait | libc::SYS_epoll_pwait => int(r.r10),
            libc::SYS_epoll_pwait2 => self.time_arg(r.r10),
            _ => Timeout::Waits,
        }
    }

    /// The pollfds of a `poll`/`ppoll` (fd, events).
    fn poll_set(&self) -> Vec<(i32, i16)> {
        let (addr, nfds) = (self.regs.rdi, self.regs.rsi);
        let n = nfds.min(MAX_FDS) as usize;
        if addr == 0 || n == 0 {
            return Vec::new();
        }
        let sz = std::mem::size_of::<libc::pollfd>();
        let Ok(bytes) = read_mem(self.tid, addr, n * sz) else {
            return Vec::new();
        };
        bytes
            .chunks_exact(sz)
            .map(|c| {
                (
                    i32::from_ne_bytes(c[0..4].try_into().unwrap()),
                    i16::from_ne_bytes(c[4..6].try_into().unwrap()),
                )
            })
            .collect()
    }

    /// The fds of one `select` set (at `addr`, `nfds` bits).
    fn select_set(&self, addr: u64) -> Vec<i32> {
        let n = (self.regs.rdi as i32).clamp(0, MAX_FDS as i32) as usize;
        if addr == 0 || n == 0 {
            return Vec::new();
        }
        let Ok(bytes) = read_mem(self.tid, addr, n.div_ceil(64) * 8) else {
            return Vec::new();
        };
        (0..n)
            .filter(|fd| bytes.get(fd / 8).is_some_and(|b| b & (1 << (fd % 8)) != 0))
            .map(|fd| fd as i32)
            .collect()
    }

    /// Whether a `poll` set waits for input on an fd that `pick`s.
    fn poll_has(&self, pick: impl Fn(i32) -> bool) -> bool {
        self.poll_set()
            .into_iter()
            .any(|(fd, events)| events & libc::POLLIN != 0 && pick(fd))
    }

    /// Whether a `select` read set includes an fd that `pick`s.
    fn select_has(&self, pick: impl Fn(i32) -> bool) -> bool {
        self.select_set(self.regs.rsi).into_iter().any(pick)
    }

    /// Whether the epoll instance waited on watches an fd that `pick`s.
    fn epoll_has(&self, pick: impl Fn(i32) -> bool) -> bool {
        epoll_fds(self.tgid, self.regs.rdi as i32)
            .unwrap_or_default()
            .into_iter()
            .any(pick)
    }

    /// Whether the wait would block: its timeout is not zero and none of what it waits
    /// for is ready now (checked with a zero-timeout `poll` of copies of the fds, which
    /// consumes nothing: for an epoll, its fd is readable when events are ready). For
    /// `accept`, a blocking socket with no connection queued.
    fn blocks(&self) -> bool {
        if self.timeout() == Timeout::Zero {
            return false;
        }
        let r = self.regs;
        let set: Vec<(i32, i16)> = match self.nr {
            libc::SYS_poll | libc::SYS_ppoll => self.poll_set(),
            libc::SYS_select | libc::SYS_pselect6 => {
                let mut v: Vec<(i32, i16)> = Vec::new();
                for (addr, ev) in [
                    (r.rsi, libc::POLLIN),
                    (r.rdx, libc::POLLOUT),
                    (r.r10, libc::POLLPRI),
                ] {
                    v.extend(self.select_set(addr).into_iter().map(|fd| (fd, ev)));
                }
                v
            }
            libc::SYS_epoll_wait | libc::SYS_epoll_pwait | libc::SYS_epoll_pwait2 => {
                vec![(r.rdi as i32, libc::POLLIN)]
            }
            libc::SYS_accept | libc::SYS_accept4 => {
                let fd = r.rdi as i32;
                // Not an fd: EBADF at once.
                let Some(c) = copy_fd(self.pidfd, fd) else {
                    return false;
                };
                // SAFETY: F_GETFL on an fd we own.
                let flags = unsafe { libc::fcntl(c.as_raw_fd(), libc::F_GETFL) };
                // Non-blocking: a connection or EAGAIN at once.
                if flags < 0 || flags & libc::O_NONBLOCK != 0 {
                    return false;
                }
                vec![(fd, libc::POLLIN)]
            }
            _ => return true,
        };
        !any_ready(self.pidfd, &set)
    }
}

/// A copy of fd `fd` of the process behind `pidfd` (`pidfd_getfd`).
fn copy_fd(pidfd: BorrowedFd<'_>, fd: i32) -> Option<OwnedFd> {
    if fd < 0 {
        return None;
    }
    // SAFETY: plain syscall; the result is a new fd we own.
    let c = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    // SAFETY: `c` is a fresh fd owned by nobody else.
    (c >= 0).then(|| unsafe { OwnedFd::from_raw_fd(c as RawFd) })
}

/// Whether any of `set` (fds of the process behind `pidfd`, with poll events) is ready:
/// a wait on them would return at once. Negative fds are ignored (as `poll` does); an
/// fd that cannot be copied (closed) counts as ready (`POLLNVAL` / `EBADF` at once).
fn any_ready(pidfd: BorrowedFd<'_>, set: &[(i32, i16)]) -> bool {
    let mut copies = Vec::with_capacity(set.len());
    let mut pfds = Vec::with_capacity(set.len());
    for &(fd, events) in set {
        if fd < 0 {
            continue;
        }
        let Some(c) = copy_fd(pidfd, fd) else {
            return true;
        };
        pfds.push(libc::pollfd {
            fd: c.as_raw_fd(),
            events,
            revents: 0,
        });
        copies.push(c);
    }
    if pfds.is_empty() {
        return false;
    }
    // SAFETY: `pfds` is a valid array of pollfds whose fds stay open (`copies`).
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 0) };
    n != 0
}

/// Syscalls in which a sleeping task waits for an event (a task asleep elsewhere, e.g.
/// reading a file, is still busy). `nanosleep` and `clock_nanosleep` are not among them:
/// a task that sleeps for a set time is pacing work it has not finished (gunicorn's
/// master sleeps between starting one worker and the next).
const WAITS: [i64; 23] = [
    libc::SYS_read,
    libc::SYS_poll,
    libc::SYS_select,
    libc::SYS_pause,
    libc::SYS_accept,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_wait4,
    libc::SYS_semop,
    libc::SYS_msgrcv,
    libc::SYS_fcntl,
    libc::SYS_flock,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_sigsuspend,
    libc::SYS_futex,
    libc::SYS_semtimedop,
    libc::SYS_epoll_wait,
    libc::SYS_waitid,
    libc::SYS_pselect6,
    libc::SYS_ppoll,
    libc::SYS_epoll_pwait,
    libc::SYS_accept4,
    libc::SYS_epoll_pwait2,
];

/// Every task of the tree of `root` (sorted), and whether all but `held` are settled:
/// asleep (`S`) in one of [`WAITS`], stopped (`T`, `t`) or dead.
fn tree_tasks(root: i32, held: &[i32]) -> (Vec<i32>, bool) {
    let mut procs = vec![root];
    let mut tasks = Vec::new();
    let mut quiet = true;
    let mut i = 0;
    while i < procs.len() && i < 4096 {
        let pid = procs[i];
        i += 1;
        let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for e in rd.flatten() {
            let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            tasks.push(tid);
            let base = format!("/proc/{pid}/task/{tid}");
            if let Ok(c) = std::fs::read_to_string(format!("{base}/children")) {
                procs.extend(c.split_whitespace().filter_map(|c| c.parse::<i32>().ok()));
            }
            if held.contains(&tid) || !quiet {
                continue;
            }
            let state = std::fs::read_to_string(format!("{base}/stat"))
                .ok()
                .and_then(|s| {
                    let r = s.rfind(')')?;
                    s[r + 1..].trim_start().chars().next()
                });
            quiet = match state {
                None | Some('Z' | 'X' | 'T' | 't') => true,
                Some('S') => std::fs::read_to_string(format!("{base}/syscall"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse::<i64>().ok())
                    .is_some_and(|nr| WAITS.contains(&nr)),
                _ => false,
            };
        }
    }
    tasks.sort_unstable();
    (tasks, quiet)
}

/// Most pollfds / select bits inspected at one stop.
const MAX_FDS: u64 = 1 << 16;

// ---------------------------------------------------------------------------------------
// Waiting.

/// What [`wait_event`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitEvent {
    /// A `waitpid` status of a traced thread (consumed).
    Stop { tid: i32, status: i32 },
    /// `fd` is readable.
    Readable,
    /// `deadline` passed.
    Timeout,
    /// The sandbox's init changed state (it exited: not consumed, for `Sandbox::wait`).
    SandboxExited,
}

/// Wait for the next stop of a tracee of the *calling thread* (`__WNOTHREAD`: call it
/// from the thread that seized the app, which should have no children but the sandbox's
/// init), readability of `fd`, or `deadline`. Without `fd` and `deadline` it blocks in
/// `waitid`; with them it polls with a 1..16 ms backoff. `EINTR` comes back as an error
/// of kind `Interrupted` (e.g. for an `alarm`-based timeout).
pub fn wait_event(
    init_pid: i32,
    deadline: Option<Instant>,
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<WaitEvent> {
    wait_event_from(init_pid, deadline, fd, Duration::from_millis(1))
}

/// [`wait_event`] whose polling starts at `first_tick` (doubling up to 16 ms): a
/// shorter one when the next stop is expected within microseconds (a thread resumed
/// after a CPUID it executed was emulated).
pub fn wait_event_from(
    init_pid: i32,
    deadline: Option<Instant>,
    fd: Option<BorrowedFd<'_>>,
    first_tick: Duration,
) -> io::Result<WaitEvent> {
    let mut tick = first_tick;
    loop {
        let blocking = deadline.is_none() && fd.is_none();
        // SAFETY: `siginfo_t` is a plain C struct; all-zero bytes are valid (and `si_pid` 0
        // means "nothing" after a WNOHANG `waitid`).
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let mut flags =
            libc::WEXITED | libc::WSTOPPED | libc::WNOWAIT | libc::__WALL | libc::__WNOTHREAD;
        if !blocking {
            flags |= libc::WNOHANG;
        }
        // SAFETY: `info` is a live, writable `siginfo_t`.
        if unsafe { libc::waitid(libc::P_ALL, 0, &mut info, flags) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `waitid` succeeded, so `info` is either still zeroed (WNOHANG, nothing to
        // report) or a SIGCHLD `siginfo_t`, whose `si_pid` field is the one the kernel
        // filled.
        let who = unsafe { info.si_pid() };
        if who == init_pid {
            return Ok(WaitEvent::SandboxExited);
        }
        if who > 0 {
            let mut status = 0;
            // SAFETY: `status` is a live local. `who` is our child or tracee, just reported
            // by `waitid` with WNOWAIT, so it has not been reaped and its pid cannot have
            // been reused.
            let r = unsafe {
                libc::waitpid(
                    who,
                    &mut status,
                    libc::WNOHANG | libc::__WALL | libc::__WNOTHREAD,
                )
            };
            if r == who {
                return Ok(WaitEvent::Stop { tid: who, status });
            }
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            continue;
        }
        let mut wait = tick;
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(WaitEvent::Timeout);
            }
            wait = wait.min(left);
        }
        let mut p = libc::pollfd {
            fd: fd.map_or(-1, |f| f.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        };
        let n = if wait < Duration::from_millis(1) {
            let ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: wait.as_nanos() as libc::c_long,
            };
            // SAFETY: `p` is one live `pollfd` (a negative fd is ignored by the kernel),
            // `ts` a live timespec; a null signal mask leaves ours as it is.
            unsafe { libc::ppoll(&mut p, 1, &ts, std::ptr::null()) }
        } else {
            // SAFETY: `p` is one live `pollfd` (a negative fd is ignored by the kernel).
            unsafe { libc::poll(&mut p, 1, wait.as_millis().max(1) as i32) }
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n > 0 && p.revents != 0 {
            return Ok(WaitEvent::Readable);
        }
        tick = (tick * 2).min(Duration::from_millis(16));
    }
}

pub fn kill_and_reap(sb: &crate::Sandbox) -> Result<i32, LaunchError> {
    sb.kill()?;
    loop {
        if let Some(code) = sb.try_wait()? {
            return Ok(code);
        }
        // SAFETY: `siginfo_t` is a plain C struct; all-zero bytes are valid (and `si_pid` 0
        // means "nothing").
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags =
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT | libc::__WALL | libc::__WNOTHREAD;
        // SAFETY: `info` is a live, writable `siginfo_t`.
        let who = if unsafe { libc::waitid(libc::P_ALL, 0, &mut info, flags) } == 0 {
            // SAFETY: `waitid` succeeded, so `info` is zeroed or a SIGCHLD `siginfo_t`,
            // whose `si_pid` the kernel filled.
            unsafe { info.si_pid() }
        } else {
            0
        };
        if who > 0 && who != sb.init_pid {
            let mut st = 0;
            // SAFETY: `st` is a live local; `who` was just reported (WNOWAIT) and not
            // reaped, so the pid is still our tracee's.
            unsafe {
                libc::waitpid(
                    who,
                    &mut st,
                    libc::WNOHANG | libc::__WALL | libc::__WNOTHREAD,
                )
            };
            continue;
        }
        // Nothing to reap yet: give init a moment.
        let _ = sb.wait_timeout(Duration::from_millis(2))?;
    }
}

// ---------------------------------------------------------------------------------------
// The tracker.

/// Finds the warm point of one recording. Create it right after releasing the app (the
/// `after=` deadline counts from then); feed it every `waitpid` status of every traced
/// thread ([`on_stop`](Self::on_stop)), apply each non-warm [`Verdict`] with
/// [`Verdict::resume`], call [`on_timeout`](Self::on_timeout) when
/// [`next_deadline`](Self::next_deadline) passes and [`on_readable`](Self::on_readable)
/// when [`poll_fd`](Self::poll_fd) is readable. [`run`](Self::run) does all that.
#[derive(Debug)]
pub struct WarmPointTracker {
    ready: Ready,
    pid: i32,
    pidfd: OwnedFd,
    deadline: Option<Instant>,
    /// [`interrupt_all`] was called: the next stop is the warm point.
    interrupted: bool,
    listen_fds: HashSet<i32>,
    notify: Option<NotifyChannel>,
    sd_notify: Option<SdNotifySocket>,
    /// Traps seen (for diagnostics / tests): (trap, syscall nr, args[0]).
    seen: Vec<(Option<Trap>, i64, u64)>,
    /// Past the warm point ([`follow`](Self::follow)): every stop is passed through.
    following: bool,
    /// Thread-group id of each traced thread seen (the app's children are traced too:
    /// they inherit the trap, which fails with `ENOSYS` without a tracer).
    tgids: std::collections::HashMap<i32, i32>,
    /// Readable: interrupt every thread, the next stop is the warm point (see
    /// [`interrupt_when_readable`](Self::interrupt_when_readable)).
    wake: Option<OwnedFd>,
    /// `listen`: threads held at a blocking wait for a connection (the first is the warm
    /// point) while the rest of the tree settles (see [`run`](Self::run)).
    held: Vec<Held>,
    /// When the first of `held` was found: the tree gets [`SETTLE_AT_MOST`] to settle.
    held_since: Option<Instant>,
    /// The tree's tasks at the last settle check (settled means: the same twice).
    last_tasks: Vec<i32>,
}

/// A thread held at its warm-point candidate stop, and what to re-check of its wait.
#[derive(Debug, Clone, Copy)]
struct Held {
    stop: WarmStop,
    tgid: i32,
    regs: libc::user_regs_struct,
}

/// How long `listen` waits for the rest of the tree to settle after the first process
/// blocked waiting for a connection, before taking the snapshot anyway.
pub const SETTLE_AT_MOST: Duration = Duration::from_secs(2);
/// How often the tree is looked at while it settles.
const SETTLE_TICK: Duration = Duration::from_millis(2);

impl WarmPointTracker {
    /// A tracker for the app whose thread-group leader is `pid` (monitor's namespace).
    pub fn new(ready: Ready, pid: i32) -> Result<Self, WarmPointError> {
        let pidfd = crate::sys::pidfd_open(pid, 0).map_err(io_err("pidfd_open(app)"))?;
        Ok(WarmPointTracker {
            ready,
            pid,
            pidfd,
            deadline: match ready {
                Ready::After(d) => Some(Instant::now() + d),
                _ => None,
            },
            interrupted: false,
            listen_fds: HashSet::new(),
            notify: None,
            sd_notify: None,
            seen: Vec::new(),
            following: false,
            tgids: std::collections::HashMap::new(),
            wake: None,
            held: Vec::new(),
            held_since: None,
            last_tasks: Vec::new(),
        })
    }

    /// Once `fd` is readable (whoever warms the app up from outside says it is done),
    /// interrupt every thread: the next stop is the warm point, as for `after=`.
    pub fn interrupt_when_readable(&mut self, fd: OwnedFd) {
        self.wake = Some(fd);
    }

    /// Use this `$WARMSTART_NOTIFY_FD` channel (`notify`).
    pub fn with_notify(mut self, mut ch: NotifyChannel) -> Self {
        ch.close_app_end();
        self.notify = Some(ch);
        self
    }

    /// Use this `$NOTIFY_SOCKET` (`notify`, sd_notify protocol).
    pub fn with_sd_notify(mut self, s: SdNotifySocket) -> Self {
        self.sd_notify = Some(s);
        self
    }

    /// The trigger.
    pub fn ready(&self) -> Ready {
        self.ready
    }

    /// The notify channel, e.g. to keep its launcher end.
    pub fn notify_channel(&self) -> Option<&NotifyChannel> {
        self.notify.as_ref()
    }

    /// The traps seen so far, in order: (trap, syscall nr, args[0]).
    pub fn traps_seen(&self) -> &[(Option<Trap>, i64, u64)] {
        &self.seen
    }

    /// Fds of `listen` calls seen so far.
    pub fn listen_fds(&self) -> &HashSet<i32> {
        &self.listen_fds
    }

    /// When the monitor must call [`on_timeout`](Self::on_timeout) (`after=`), if ever.
    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.held.is_empty() {
            return Some(Instant::now() + SETTLE_TICK);
        }
        if self.interrupted || self.following {
            None
        } else {
            self.deadline
        }
    }

    /// An fd the monitor must poll for `POLLIN` and then call
    /// [`on_readable`](Self::on_readable) (the sd_notify socket).
    pub fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        if self.interrupted || self.following {
            return None;
        }
        if let Some(w) = &self.wake {
            return Some(w.as_fd());
        }
        self.sd_notify.as_ref().map(|s| s.fd())
    }

    fn interrupt_now(&mut self) -> Result<(), WarmPointError> {
        interrupt_all(self.pid).map_err(io_err("PTRACE_INTERRUPT"))?;
        self.interrupted = true;
        Ok(())
    }

    /// The deadline may have passed: if so, interrupt every thread; the next stop is
    /// the warm point.
    pub fn on_timeout(&mut self) -> Result<(), WarmPointError> {
        match self.next_deadline() {
            Some(d) if Instant::now() >= d => self.interrupt_now(),
            _ => Ok(()),
        }
    }

    /// [`poll_fd`](Self::poll_fd) is readable: read the datagrams; on `READY=1`,
    /// interrupt every thread (the next stop is the warm point).
    pub fn on_readable(&mut self) -> Result<(), WarmPointError> {
        if self.wake.take().is_some() {
            return if self.interrupted {
                Ok(())
            } else {
                self.interrupt_now()
            };
        }
        let ready = match &mut self.sd_notify {
            Some(s) => s.recv_ready()?,
            None => false,
        };
        if ready && !self.interrupted {
            self.interrupt_now()?;
        }
        Ok(())
    }

    /// Decide about one `waitpid` status of traced thread `tid` (already consumed).
    pub fn on_stop(&mut self, tid: i32, status: i32) -> Result<Verdict, WarmPointError> {
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            self.tgids.remove(&tid);
            if tid != self.pid {
                return Ok(Verdict::ThreadExited);
            }
            return Ok(Verdict::Exited(if libc::WIFEXITED(status) {
                ExitStatus::Code(libc::WEXITSTATUS(status))
            } else {
                ExitStatus::Signal(libc::WTERMSIG(status))
            }));
        }
        if !libc::WIFSTOPPED(status) {
            // WIFCONTINUED (not asked for): nothing stopped.
            return Ok(Verdict::ThreadExited);
        }
        let sig = libc::WSTOPSIG(status);
        let event = (status >> 16) & 0xff;
        // Only the app's own threads make a warm point (for `listen`: any process of its
        // tree); other processes just run.
        if self.following || !self.may_warm(tid) {
            return Ok(Self::pass_through(event, sig));
        }
        let warm = |kind, resume_signal| {
            Ok(Verdict::WarmPoint(WarmStop {
                tid,
                kind,
                resume_signal,
            }))
        };
        match event {
            libc::PTRACE_EVENT_SECCOMP => self.on_seccomp(tid),
            libc::PTRACE_EVENT_STOP => {
                if self.interrupted {
                    return warm(StopKind::Interrupt, 0);
                }
                if matches!(
                    sig,
                    libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
                ) {
                    Ok(Verdict::Listen)
                } else {
                    // A new thread's first stop, or a stale interrupt.
                    Ok(Verdict::Continue { inject_signal: 0 })
                }
            }
            0 if sig == (libc::SIGTRAP | 0x80) => Ok(Verdict::Continue { inject_signal: 0 }),
            0 => {
                if self.ready == Ready::Signal && sig == libc::SIGSTOP {
                    return warm(StopKind::SignalDelivery(sig), 0);
                }
                if self.interrupted {
                    return warm(StopKind::SignalDelivery(sig), sig);
                }
                Ok(Verdict::Continue { inject_signal: sig })
            }
            // clone/fork/exec/exit events.
            _ => Ok(Verdict::Continue { inject_signal: 0 }),
        }
    }

    /// The thread-group id (process) of traced thread `tid` (0: unknown, gone).
    fn tgid(&mut self, tid: i32) -> i32 {
        if tid == self.pid {
            return tid;
        }
        *self
            .tgids
            .entry(tid)
            .or_insert_with(|| status_field(tid, "Tgid:").unwrap_or(0))
    }

    /// Whether traced thread `tid` may make the warm point: a thread of the app itself,
    /// or for `listen` a thread of any process of its tree (nginx's and gunicorn's
    /// workers wait for connections, their master does not). `stdin` and `notify` are
    /// the app's own: a child reading its own stdin is not the app's warm point.
    fn may_warm(&mut self, tid: i32) -> bool {
        let tgid = self.tgid(tid);
        if tgid == self.pid {
            return true;
        }
        self.ready == Ready::Listen && tgid > 0 && descends_from(tgid, self.pid)
    }

    /// The verdict for a stop (after the warm point, or of a child process): the app runs as if untraced (its
    /// trapped syscalls proceed, signals are delivered, group stops stay stopped).
    fn pass_through(event: i32, sig: i32) -> Verdict {
        let stop_sig = matches!(
            sig,
            libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
        );
        match event {
            libc::PTRACE_EVENT_STOP if stop_sig => Verdict::Listen,
            0 if sig != (libc::SIGTRAP | 0x80) => Verdict::Continue { inject_signal: sig },
            _ => Verdict::Continue { inject_signal: 0 },
        }
    }

    fn on_seccomp(&mut self, tid: i32) -> Result<Verdict, WarmPointError> {
        let regs = getregs(tid).map_err(io_err("PTRACE_GETREGS"))?;
        let msg = geteventmsg(tid).map_err(io_err("PTRACE_GETEVENTMSG"))?;
        let trap = Trap::from_data(msg);
        let nr = regs.orig_rax as i64;
        self.seen.push((trap, nr, regs.rdi));
        let warm = Verdict::WarmPoint(WarmStop {
            tid,
            kind: StopKind::SyscallEntry { nr, trap },
            resume_signal: 0,
        });
        let go = Verdict::Continue { inject_signal: 0 };
        // The thread's process, for its fds (the app, or a worker of a `listen` tree).
        let tgid = self.tgid(tid);
        let other;
        let pidfd = if tgid == self.pid {
            self.pidfd.as_fd()
        } else {
            match crate::sys::pidfd_open(tgid, 0) {
                Ok(fd) => {
                    other = fd;
                    other.as_fd()
                }
                // Gone meanwhile: nothing of it can be the warm point.
                Err(_) => return Ok(go),
            }
        };
        let w = Waiter {
            tid,
            tgid,
            pidfd,
            nr,
            regs: &regs,
        };
        if self.interrupted {
            // Interrupted (after=, READY=1 on the sd_notify socket, priming done): this
            // stop is the warm point, unless it is a wait that would return at once (a
            // zero timeout, or events ready): the snapshot is never taken there. That
            // wait goes on, and the thread is interrupted again.
            if w.is_wait() && !w.blocks() {
                interrupt(tid).map_err(io_err("PTRACE_INTERRUPT"))?;
                return Ok(go);
            }
            return Ok(warm);
        }
        let listening = |fd| is_listening_socket(pidfd, fd);
        // Only a wait that blocks is the warm point: a zero-timeout poll, or one that
        // returns at once because events are ready (the app is still busy), is not.
        let is_warm = match (self.ready, trap) {
            (Ready::Stdin, Some(Trap::StdinRead)) => true,
            (Ready::Stdin, Some(Trap::Poll)) => w.poll_has(|fd| fd == 0) && w.blocks(),
            (Ready::Stdin, Some(Trap::Select)) => w.select_has(|fd| fd == 0) && w.blocks(),
            (Ready::Stdin, Some(Trap::EpollWait)) => w.epoll_has(|fd| fd == 0) && w.blocks(),
            (Ready::Listen, Some(Trap::Listen)) => {
                if tgid == self.pid {
                    self.listen_fds.insert(regs.rdi as i32);
                }
                false
            }
            (Ready::Listen, Some(Trap::Accept)) => listening(regs.rdi as i32) && w.blocks(),
            (Ready::Listen, Some(Trap::Poll)) => w.poll_has(listening) && w.blocks(),
            (Ready::Listen, Some(Trap::Select)) => w.select_has(listening) && w.blocks(),
            (Ready::Listen, Some(Trap::EpollWait)) => w.epoll_has(listening) && w.blocks(),
            (Ready::Notify, Some(Trap::NotifyRead)) => {
                let fd = regs.rdi as i32;
                match &mut self.notify {
                    Some(ch) if ch.is_app_end(self.pid, fd) => ch.poll_ready()?,
                    _ => false,
                }
            }
            _ => false,
        };
        Ok(if is_warm { warm } else { go })
    }

    /// The whole monitor loop: wait (see [`wait_event`]; `init_pid` is the sandbox's
    /// init), feed, resume, until the warm point (returned with that thread stopped), the
    /// app's end, or `timeout`. Must run on the thread that seized the app.
    ///
    /// `listen`: a blocking wait for a connection is held (stopped at its syscall entry)
    /// until the rest of the tree is settled: every other task asleep in a wait for an
    /// event or stopped, and no task came or went since the last look (a server's master
    /// may still be starting workers, or handing them fds). Held waits that would no
    /// longer block are let go meanwhile. After [`SETTLE_AT_MOST`] the snapshot is taken
    /// anyway. The other held threads are in [`take_held`](Self::take_held).
    pub fn run(
        &mut self,
        init_pid: i32,
        timeout: Option<Duration>,
    ) -> Result<WarmStop, WarmPointError> {
        self.run_filtered(init_pid, timeout, &mut |_, _| Ok(false))
    }

    /// [`run`](Self::run), where `filter` sees every stop of a traced thread first (not
    /// exits): when it returns true it took care of the stop (and resumed the thread),
    /// which the tracker then never sees (`record --cpu-baseline` emulates CPUID there).
    pub fn run_filtered(
        &mut self,
        init_pid: i32,
        timeout: Option<Duration>,
        filter: &mut dyn FnMut(i32, i32) -> io::Result<bool>,
    ) -> Result<WarmStop, WarmPointError> {
        let overall = timeout.map(|t| Instant::now() + t);
        // A stop the filter took: the thread's next comes soon (CPUIDs come in runs).
        let mut eager = false;
        loop {
            let own = self.next_deadline();
            let deadline = match (own, overall) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let first = if eager {
                Duration::from_micros(20)
            } else {
                Duration::from_millis(1)
            };
            eager = false;
            let ev = wait_event_from(init_pid, deadline, self.poll_fd(), first);
            match ev {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(WarmPointError::Io {
                        op: "waitid",
                        source: e,
                    })
                }
                Ok(WaitEvent::Stop { tid, status }) => {
                    let ended = libc::WIFEXITED(status) || libc::WIFSIGNALED(status);
                    if ended {
                        self.held.retain(|h| h.stop.tid != tid);
                    }
                    let taken = if ended || !libc::WIFSTOPPED(status) {
                        false
                    } else {
                        filter(tid, status).map_err(io_err("handling a stop of the app"))?
                    };
                    if taken {
                        // Handled (and resumed) by the filter. An app that keeps the
                        // filter busy (CPUID in a loop) never lets the wait time out:
                        // its deadlines are looked at here too.
                        eager = true;
                        if self.held.is_empty() && overall.is_some_and(|o| Instant::now() >= o) {
                            return Err(WarmPointError::Timeout(self.ready));
                        }
                        self.on_timeout()?;
                    } else {
                        match self.on_stop(tid, status)? {
                            Verdict::WarmPoint(w) if self.holds(&w) => {
                                let tgid = self.tgid(tid);
                                let regs = getregs(tid).map_err(io_err("PTRACE_GETREGS"))?;
                                self.held.push(Held {
                                    stop: w,
                                    tgid,
                                    regs,
                                });
                                self.held_since.get_or_insert_with(Instant::now);
                            }
                            Verdict::WarmPoint(w) => return Ok(w),
                            Verdict::Exited(s) => return Err(WarmPointError::Exited(s)),
                            v => v.resume(tid).map_err(io_err("PTRACE_CONT"))?,
                        }
                    }
                }
                Ok(WaitEvent::Readable) => self.on_readable()?,
                Ok(WaitEvent::Timeout) => {
                    if self.held.is_empty() && overall.is_some_and(|o| Instant::now() >= o) {
                        return Err(WarmPointError::Timeout(self.ready));
                    }
                    self.on_timeout()?;
                }
                Ok(WaitEvent::SandboxExited) => return Err(WarmPointError::SandboxExited),
            }
            if let Some(w) = self.settled()? {
                return Ok(w);
            }
        }
    }

    /// Whether the candidate `w` is held while the tree settles rather than taken at once:
    /// a `listen` wait (a server's workers start one after another, and its master may
    /// still be handing them things, e.g. nginx's channel fds).
    fn holds(&self, w: &WarmStop) -> bool {
        self.ready == Ready::Listen
            && !self.interrupted
            && !self.following
            && matches!(w.kind, StopKind::SyscallEntry { .. })
    }

    /// With threads held: let go of those whose wait would no longer block (events
    /// arrived meanwhile: they go on, and come back at their next wait), then, once the
    /// rest of the tree is settled (every other task asleep in a wait, or stopped, and
    /// no task came or went since the last look) or [`SETTLE_AT_MOST`] passed, the warm
    /// point: the first held thread ([`take_held`](Self::take_held) has the others).
    fn settled(&mut self) -> Result<Option<WarmStop>, WarmPointError> {
        if self.held.is_empty() {
            self.held_since = None;
            return Ok(None);
        }
        let mut i = 0;
        while i < self.held.len() {
            let h = self.held[i];
            let still = crate::sys::pidfd_open(h.tgid, 0).ok().is_some_and(|fd| {
                let nr = h.regs.orig_rax as i64;
                Waiter {
                    tid: h.stop.tid,
                    tgid: h.tgid,
                    pidfd: fd.as_fd(),
                    nr,
                    regs: &h.regs,
                }
                .blocks()
            });
            if still {
                i += 1;
            } else {
                self.held.remove(i);
                Verdict::Continue { inject_signal: 0 }
                    .resume(h.stop.tid)
                    .map_err(io_err("PTRACE_CONT"))?;
            }
        }
        if self.held.is_empty() {
            self.held_since = None;
            return Ok(None);
        }
        let held: Vec<i32> = self.held.iter().map(|h| h.stop.tid).collect();
        let (tasks, quiet) = tree_tasks(self.pid, &held);
        let same = tasks == self.last_tasks;
        self.last_tasks = tasks;
        let late = self
            .held_since
            .is_some_and(|t| t.elapsed() >= SETTLE_AT_MOST);
        if (quiet && same) || late {
            self.held_since = None;
            return Ok(Some(self.held.remove(0).stop));
        }
        Ok(None)
    }

    /// The other threads held stopped at a blocking wait when [`run`](Self::run)
    /// returned its warm point (`listen`): they are in syscall-entry stops too, part of
    /// the snapshot like the warm point's own thread. The caller owns them from now on
    /// (resume them, or dump them).
    pub fn take_held(&mut self) -> Vec<WarmStop> {
        self.held.drain(..).map(|h| h.stop).collect()
    }

    /// After the warm point, when the recorded app goes on running (`record
    /// --leave-running`): stay its tracer (the seccomp trap makes trapped syscalls fail
    /// with `ENOSYS` without one) and pass every stop through until the app ends. The
    /// threads must have been resumed already. Returns how the app ended.
    pub fn follow(&mut self, init_pid: i32) -> Result<ExitStatus, WarmPointError> {
        self.following = true;
        match self.run(init_pid, None) {
            Err(WarmPointError::Exited(s)) => Ok(s),
            Err(e) => Err(e),
            Ok(_) => unreachable!("no warm point while following"),
        }
    }
}
