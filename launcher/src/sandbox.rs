//! The sandbox: a monitor (the caller) → init (pid 1 of a new pid + mount namespace,
//! fresh `/proc`) → the app.
//!
//! ```text
//! monitor (root pid ns)  ──clone3(NEWPID|NEWNS|PIDFD)──▶ init (pid 1)
//!                                                     └──clone3([set_tid])──▶ app (pid 2 / exact)
//! ```
//!
//! * With [`SpawnOptions::app_is_init`] there is no app child: init runs the app itself
//!   after its setup (a restored tree whose root was the init of its own pid namespace).
//! * init dies with the monitor (`PR_SET_PDEATHSIG`, SIGKILL), and the kernel kills the
//!   whole namespace when init dies. PDEATHSIG fires when the *thread* that called
//!   [`spawn`] exits: call it from a thread that outlives the sandbox.
//! * The monitor never calls `waitpid(-1)`: it waits for init by pid and only reaps the
//!   app's *exit* (never a stop) when it is the app's ptrace tracer, which is required
//!   for init to see the exit (a zombie tracee is visible only to its tracer).

use std::cell::Cell;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;

use crate::init::{self, InitArgs};
use crate::sys::{self, CloneArgs};
use crate::LaunchError;

/// The namespaces [`SpawnOptions::namespaces`] may add.
const NAMESPACES: u64 = (libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | libc::CLONE_NEWNET) as u64;

/// How long [`spawn`] waits for init's report.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of [`spawn`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpawnOptions {
    /// Exact pid of the app inside the sandbox (`clone3` `set_tid`), for restore.
    /// `None`: the next free pid, i.e. 2.
    pub pid: Option<i32>,
    /// Hold the app before it calls the closure until [`Sandbox::release`] (so the monitor
    /// can `PTRACE_SEIZE` it first). If the `Sandbox` is dropped unreleased, the app exits
    /// with code 125 without running the closure.
    pub gate: bool,
    /// Fds of the caller to become the app's stdin, stdout, stderr (`dup2`, so they are
    /// not close-on-exec in the app). `None` / `-1` entries: inherited as they are.
    pub stdio: Option<[RawFd; 3]>,
    /// Run the app in a new time namespace whose `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME`
    /// read these values (nanoseconds, in the caller's view of the clocks) when the app
    /// is created (see `timens`).
    pub clocks: Option<[i64; 2]>,
    /// Spawn on behalf of the caller's parent, whose pidfd this is (a restore template,
    /// see `warmstart::restore::template`): init is created as that process's child
    /// (`CLONE_PARENT`), dies with it, and is its to wait for; the caller hands the
    /// sandbox over with [`Sandbox::into_parts`]. Nothing is logged (the caller is a
    /// fork of a multi-threaded process).
    pub owner: Option<RawFd>,
    /// More namespaces for init to create, besides its pid and mount namespaces:
    /// `CLONE_NEWUTS`, `CLONE_NEWIPC`, `CLONE_NEWNET` (a restore of a tree that had
    /// them of its own fills them in before releasing the gate).
    pub namespaces: u64,
    /// The app is init itself, pid 1 of the new pid namespace (a restore of a tree whose
    /// root was the init of a pid namespace of its own, a container's entrypoint): init
    /// does its setup (mounts, time namespace, entered itself) and then runs the closure
    /// (after the gate) instead of creating an app child. The app then has init's duties
    /// (it reaps orphans; signals are its own: none is forwarded) and [`Sandbox::app_pid`]
    /// is [`Sandbox::init_pid`]. Excludes `pid`.
    pub app_is_init: bool,
}

/// A [`Sandbox`] taken apart to pass between processes.
#[derive(Debug)]
pub struct SandboxParts {
    pub init_pid: i32,
    pub app_pid: i32,
    pub app_ns_pid: i32,
    pub init_pidfd: OwnedFd,
    pub app_pidfd: OwnedFd,
    /// The gate's write end, while the app is held.
    pub gate: Option<OwnedFd>,
}

/// A running sandbox. Dropping it kills and reaps it unless it was waited.
///
/// Not `Sync`: wait/kill it from the thread that owns it.
pub struct Sandbox {
    /// init's pid in the monitor's pid namespace.
    pub init_pid: i32,
    /// The app's pid in the monitor's pid namespace (for ptrace, `/proc/<pid>`); -1 if
    /// the app had already exited and been reaped when `spawn` returned (only possible
    /// without a gate).
    pub app_pid: i32,
    /// The app's pid inside the sandbox (2, or `SpawnOptions::pid`; 1 when
    /// `SpawnOptions::app_is_init`).
    pub app_ns_pid: i32,
    init_pidfd: OwnedFd,
    app_pidfd: OwnedFd,
    gate: Cell<Option<OwnedFd>>,
    status: Cell<Option<i32>>,
    /// The app's exit is no longer ours to reap (reaped, or we are not its tracer).
    app_done: Cell<bool>,
}

/// Spawn `app` in a new sandbox (see the module docs). `app` runs in the app child (after
/// the gate, if any) and its return value is the app's exit code; it normally execs.
///
/// `app` runs in a child created with raw `clone3` from a possibly multi-threaded
/// process, where a lock another thread held at that instant is held forever. It may
/// allocate (from the child's private arena, see [`crate::forksafe`]) but must take no
/// other lock: no printing or logging, no libc function that allocates by itself
/// (`opendir`, `getpwnam`, ...), no lazily initialised static (initialise it before
/// calling `spawn`). Prefer preparing what it needs (`CString`s, fds) beforehand.
pub fn spawn(opts: &SpawnOptions, app: impl FnOnce() -> i32) -> Result<Sandbox, LaunchError> {
    if let Some(pid) = opts.pid {
        if pid < 2 {
            return Err(LaunchError::Invalid("app pid must be >= 2 (1 is init)"));
        }
        if opts.app_is_init {
            return Err(LaunchError::Invalid(
                "an app that is init has pid 1: no other pid can be asked for",
            ));
        }
    }
    let (mon_sock, init_sock) = socketpair()?;
    let (gate_r, gate_w) = if opts.gate {
        let (r, w) = pipe()?;
        (Some(r), Some(w))
    } else {
        (None, None)
    };
    let monitor_pidfd = match opts.owner {
        // SAFETY: fcntl duplicates an fd the caller keeps open across this call.
        Some(fd) => match unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) } {
            -1 => return Err(LaunchError::sys("dup of the owner's pidfd")),
            // SAFETY: a fresh fd from F_DUPFD_CLOEXEC, owned by nobody else.
            fd => unsafe { OwnedFd::from_raw_fd(fd) },
        },
        None => sys::pidfd_open(std::process::id() as libc::pid_t, 0)
            .map_err(|_| LaunchError::sys("pidfd_open"))?,
    };
    let raw = |fd: &Option<OwnedFd>| fd.as_ref().map_or(-1, |f| f.as_raw_fd());
    let init_args = InitArgs {
        monitor_pidfd: monitor_pidfd.as_raw_fd(),
        sock: init_sock.as_raw_fd(),
        mon_sock: mon_sock.as_raw_fd(),
        gate_r: raw(&gate_r),
        gate_w: raw(&gate_w),
        app_pid: opts.pid.unwrap_or(0),
        stdio: opts.stdio.unwrap_or([-1; 3]),
        clocks: opts.clocks,
        app_is_init: opts.app_is_init,
    };
    let mut init_pidfd: libc::c_int = -1;
    let args = CloneArgs {
        flags: opts.namespaces & NAMESPACES
            | (libc::CLONE_NEWPID
                | libc::CLONE_NEWNS
                | libc::CLONE_PIDFD
                | if opts.owner.is_some() {
                    libc::CLONE_PARENT
                } else {
                    0
                }) as u64,
        pidfd: &mut init_pidfd as *mut libc::c_int as u64,
        // With CLONE_PARENT the kernel takes the caller's own exit signal (and refuses
        // another).
        exit_signal: if opts.owner.is_some() {
            0
        } else {
            libc::SIGCHLD as u64
        },
        ..Default::default()
    };

    // Block every signal across clone3 so no handler of the monitor ever runs in init.
    // SAFETY: `sigset_t` is a plain C bit array; all-zero bytes are a valid (empty) set.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above: a plain C bit array, valid when zeroed.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live local `sigset_t`s for the duration of the calls.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // `args` is a valid `clone_args` of the size `clone3` is told, and its `pidfd`
    // field points to `init_pidfd`, a live local the kernel writes before returning.
    // Without CLONE_VM the child gets a copy of this thread only: it switches to the
    // private arena first (`enter_child`), runs `init_main`, which makes only
    // async-signal-safe calls and never returns (it ends in `_exit`), and the caller's
    // closure is bound by this function's documented rules. Every signal is blocked, so no
    // handler of the monitor runs in the child.
    // SAFETY: a valid `clone_args`; the child keeps to the rules above.
    let r = unsafe { sys::clone3(&args) };
    if r == 0 {
        // Before anything can allocate: glibc's malloc may be locked for good here.
        crate::forksafe::enter_child();
        init::init_main(&init_args, app);
    }
    let err = Errno::last();
    // SAFETY: `old` was filled by the `pthread_sigmask` above; the out-pointer may be null.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    drop(init_sock);
    drop(gate_r);
    drop(monitor_pidfd);
    if r < 0 {
        return Err(LaunchError::Sys {
            op: "clone3(init)",
            errno: err,
        });
    }
    let init_pid = r as i32;
    // SAFETY: `clone3` succeeded with CLONE_PIDFD, so the kernel stored a new pidfd in
    // `init_pidfd`; nothing else owns it.
    let init_pidfd = unsafe { OwnedFd::from_raw_fd(init_pidfd) };
    match handshake(&mon_sock, &init_pidfd, init_pid, opts.app_is_init) {
        Ok((app_pidfd, app_ns_pid)) => {
            // init is the app: the app's pidfd is a copy of init's.
            let app_pidfd = match app_pidfd {
                Some(fd) => fd,
                None => match init_pidfd.try_clone() {
                    Ok(fd) => fd,
                    Err(e) => {
                        abort_init(&init_pidfd, init_pid);
                        return Err(LaunchError::Sys {
                            op: "dup of init's pidfd",
                            errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                        });
                    }
                },
            };
            let app_pid = match read_pidfd_fdinfo(&app_pidfd) {
                Ok((pid, nspid_last)) => {
                    if pid > 0 && nspid_last != Some(app_ns_pid) {
                        abort_init(&init_pidfd, init_pid);
                        return Err(LaunchError::Parse {
                            what: "pidfd fdinfo NSpid",
                            detail: format!("expected last NSpid {app_ns_pid}, got {nspid_last:?}"),
                        });
                    }
                    pid
                }
                Err(e) => {
                    abort_init(&init_pidfd, init_pid);
                    return Err(e);
                }
            };
            if opts.owner.is_none() {
                tracing::debug!(init_pid, app_pid, app_ns_pid, "sandbox spawned");
            }
            Ok(Sandbox {
                init_pid,
                app_pid: if app_pid > 0 { app_pid } else { -1 },
                app_ns_pid,
                init_pidfd,
                app_pidfd,
                gate: Cell::new(gate_w),
                status: Cell::new(None),
                // An app that is init is waited for as init, never apart.
                app_done: Cell::new(opts.app_is_init),
            })
        }
        Err(e) => {
            abort_init(&init_pidfd, init_pid);
            Err(e)
        }
    }
}

fn socketpair() -> Result<(OwnedFd, OwnedFd), LaunchError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType};
    nix::sys::socket::socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|errno| LaunchError::Sys {
        op: "socketpair",
        errno,
    })
}

fn pipe() -> Result<(OwnedFd, OwnedFd), LaunchError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|errno| LaunchError::Sys { op: "pipe2", errno })
}

/// Decode a `waitpid` status into an exit code (128+N for signal N).
fn exit_code(status: libc::c_int) -> Option<i32> {
    if libc::WIFEXITED(status) {
        Some(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Some(128 + libc::WTERMSIG(status))
    } else {
        None
    }
}

/// Kill and reap init after a failed handshake (the app is not traced yet).
fn abort_init(init_pidfd: &OwnedFd, init_pid: i32) {
    sys::pidfd_send_signal(init_pidfd.as_raw_fd(), libc::SIGKILL);
    let mut st = 0;
    // SAFETY: `st` is a live local. `init_pid` is our unreaped child, so the pid cannot
    // have been reused by another process.
    while unsafe { libc::waitpid(init_pid, &mut st, 0) } < 0 && Errno::last() == Errno::EINTR {}
}

/// Wait for init's report: the app's pidfd and its pid in the sandbox (no pidfd when
/// `app_is_init`: the app is init, pid 1).
fn handshake(
    sock: &OwnedFd,
    init_pidfd: &OwnedFd,
    init_pid: i32,
    app_is_init: bool,
) -> Result<(Option<OwnedFd>, i32), LaunchError> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    loop {
        match recv_report(sock)? {
            Some((payload, fd)) => {
                let [stage, err, ns_pid] = payload;
                if stage != init::STAGE_OK {
                    return Err(LaunchError::Init {
                        stage: init::STAGE_NAMES
                            .get(stage as usize)
                            .copied()
                            .unwrap_or("unknown"),
                        errno: Errno::from_raw(err),
                    });
                }
                return match fd {
                    Some(_) if app_is_init => Err(LaunchError::Parse {
                        what: "init report",
                        detail: "a pidfd from an init that is the app".into(),
                    }),
                    None if app_is_init && ns_pid == 1 => Ok((None, 1)),
                    Some(fd) => Ok((Some(fd), ns_pid)),
                    None => Err(LaunchError::Parse {
                        what: "init report",
                        detail: "no pidfd attached".into(),
                    }),
                };
            }
            None => {
                // Did init die without a word?
                let mut st = 0;
                // SAFETY: `st` is a live local; `init_pid` is our child and is reaped only
                // here or in `abort_init`.
                let r = unsafe { libc::waitpid(init_pid, &mut st, libc::WNOHANG) };
                if r == init_pid {
                    // Reaped: make abort_init's waitpid a no-op by reporting now.
                    return Err(LaunchError::InitDied(exit_code(st).unwrap_or(-1)));
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(LaunchError::Timeout);
        }
        let mut fds = [
            libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: init_pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `fds` holds exactly the 2 `pollfd`s `poll` is told about.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) } < 0 && Errno::last() != Errno::EINTR {
            return Err(LaunchError::sys("poll"));
        }
    }
}

/// Non-blocking receive of init's message. `Ok(None)`: nothing yet.
#[allow(clippy::type_complexity)]
fn recv_report(sock: &OwnedFd) -> Result<Option<([i32; 3], Option<OwnedFd>)>, LaunchError> {
    #[repr(C, align(8))]
    struct Cmsg([u8; 64]);
    let mut payload = [0i32; 3];
    let mut cbuf = Cmsg([0; 64]);
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr() as *mut libc::c_void,
        iov_len: init::MSG_LEN,
    };
    // SAFETY: `msghdr` is a plain C struct: zeroed means null pointers and zero lengths,
    // which is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = cbuf.0.len();
    // SAFETY: `msg` points at `iov` (the 12-byte `payload`, `MSG_LEN` == 12) and at `cbuf`
    // (64 bytes, 8-aligned as `cmsghdr` needs); all three are live locals for the call.
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        return match Errno::last() {
            Errno::EAGAIN | Errno::EINTR => Ok(None),
            errno => Err(LaunchError::Sys {
                op: "recvmsg",
                errno,
            }),
        };
    }
    let mut fd = None;
    // `recvmsg` succeeded, so `msg.msg_control`/`msg_controllen` describe the part
    // of `cbuf` the kernel filled; `CMSG_FIRSTHDR`/`CMSG_NXTHDR` stay within it and return
    // null at its end. The payload of an SCM_RIGHTS header holds `(cmsg_len - CMSG_LEN(0))
    // / 4` ints, read unaligned because `CMSG_DATA` need not be 4-aligned. Each is a
    // descriptor the kernel just installed in our table (MSG_CMSG_CLOEXEC): nothing else
    // owns it, and each is wrapped in exactly one `OwnedFd` (extras are closed on drop).
    // SAFETY: walks only the control data `recvmsg` filled; each fd is wrapped once.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let nfds = ((*c).cmsg_len - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..nfds {
                    let raw = std::ptr::read_unaligned((libc::CMSG_DATA(c) as *const i32).add(i));
                    let owned = OwnedFd::from_raw_fd(raw);
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if n == 0 {
        // EOF: init is gone (or exiting) without a report.
        return Ok(None);
    }
    if n as usize != init::MSG_LEN {
        return Err(LaunchError::Parse {
            what: "init report",
            detail: format!("{n} bytes"),
        });
    }
    Ok(Some((payload, fd)))
}

/// `Pid:` and the last `NSpid:` entry of a pidfd's fdinfo.
fn read_pidfd_fdinfo(fd: &OwnedFd) -> Result<(i32, Option<i32>), LaunchError> {
    let path = format!("/proc/self/fdinfo/{}", fd.as_raw_fd());
    let text = std::fs::read_to_string(&path).map_err(|e| LaunchError::Sys {
        op: "read /proc/self/fdinfo",
        errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    })?;
    let mut pid = None;
    let mut nspid = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("Pid:") {
            pid = v.trim().parse::<i32>().ok();
        } else if let Some(v) = line.strip_prefix("NSpid:") {
            nspid = v.split_whitespace().last().and_then(|s| s.parse().ok());
        }
    }
    match pid {
        Some(p) => Ok((p, nspid)),
        None => Err(LaunchError::Parse {
            what: "pidfd fdinfo",
            detail: text,
        }),
    }
}

impl Sandbox {
    /// pidfd of init (readable when init exits).
    /// Takes the sandbox apart to hand it to another process (see
    /// [`SpawnOptions::owner`]): nothing is killed or waited for.
    pub fn into_parts(self) -> SandboxParts {
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: `me` is never used or dropped again, so each field is moved out once.
        unsafe {
            SandboxParts {
                init_pid: me.init_pid,
                app_pid: me.app_pid,
                app_ns_pid: me.app_ns_pid,
                init_pidfd: std::ptr::read(&me.init_pidfd),
                app_pidfd: std::ptr::read(&me.app_pidfd),
                gate: std::ptr::read(&me.gate).into_inner(),
            }
        }
    }

    /// The sandbox [`into_parts`](Sandbox::into_parts) took apart, in the process whose
    /// child its init is.
    pub fn from_parts(p: SandboxParts) -> Sandbox {
        Sandbox {
            init_pid: p.init_pid,
            app_pid: p.app_pid,
            app_ns_pid: p.app_ns_pid,
            init_pidfd: p.init_pidfd,
            app_pidfd: p.app_pidfd,
            gate: Cell::new(p.gate),
            status: Cell::new(None),
            app_done: Cell::new(p.app_pid == p.init_pid),
        }
    }

    pub fn init_pidfd(&self) -> BorrowedFd<'_> {
        self.init_pidfd.as_fd()
    }

    /// pidfd of the app (readable when the app exits; usable with `pidfd_getfd`).
    pub fn app_pidfd(&self) -> BorrowedFd<'_> {
        self.app_pidfd.as_fd()
    }

    /// Let the gated app run (idempotent; a no-op without a gate). Seize it first.
    pub fn release(&self) -> Result<(), LaunchError> {
        if let Some(w) = self.gate.take() {
            let b = 1u8;
            loop {
                // SAFETY: the buffer is one live local byte and the length is 1; `w` is the
                // gate pipe's write end, which we own.
                let n = unsafe { libc::write(w.as_raw_fd(), &b as *const u8 as *const _, 1) };
                if n == 1 {
                    break;
                }
                if n < 0 && Errno::last() == Errno::EINTR {
                    continue;
                }
                return Err(LaunchError::sys("write(gate)"));
            }
        }
        Ok(())
    }

    /// Send `sig` to init, which forwards the [`crate::relayed_signals`] to the app (other
    /// signals are ignored by a pid 1, except SIGKILL/SIGSTOP). An app that is init
    /// ([`SpawnOptions::app_is_init`]) gets it itself, and only if it handles it.
    pub fn signal(&self, sig: i32) -> Result<(), LaunchError> {
        if self.status.get().is_some() {
            return Ok(());
        }
        if sys::pidfd_send_signal(self.init_pidfd.as_raw_fd(), sig) < 0 {
            let e = Errno::last();
            if e != Errno::ESRCH {
                return Err(LaunchError::Sys {
                    op: "pidfd_send_signal",
                    errno: e,
                });
            }
        }
        Ok(())
    }

    /// SIGKILL init, hence everything in the sandbox. Does not wait.
    pub fn kill(&self) -> Result<(), LaunchError> {
        self.signal(libc::SIGKILL)
    }

    /// Wait for init to exit; returns its exit code (the app's code, 128+N if the app was
    /// killed by signal N; 128+N too if init itself was killed by N). Cached: calling it
    /// again returns the same code.
    ///
    /// If the monitor traces the app, this reaps the app's *exit* (with `__WALL`, on its
    /// pidfd; stops are never consumed) so that init can see it: finish your own ptrace
    /// loop (or detach) before calling `wait`, and do not call it concurrently with a
    /// `waitpid(app_pid)` in another thread.
    pub fn wait(&self) -> Result<i32, LaunchError> {
        self.wait_inner(None, None)
            .map(|c| c.expect("no timeout given"))
    }

    /// Like [`wait`](Self::wait) with a timeout: `Ok(None)` if init is still running.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<i32>, LaunchError> {
        self.wait_inner(Some(timeout), None)
    }

    /// Non-blocking [`wait`](Self::wait).
    pub fn try_wait(&self) -> Result<Option<i32>, LaunchError> {
        self.wait_inner(Some(Duration::ZERO), None)
    }

    /// Wait for init like [`wait`](Self::wait) while forwarding every signal the monitor
    /// receives that is relayed ([`crate::relayed_signals`]: SIGINT, SIGTERM, SIGHUP,
    /// SIGQUIT, SIGUSR1, ...) to init (and so to the app). Uses a [`SignalForwarder`]
    /// (blocks the signals in the calling thread; in a multi-threaded monitor block them
    /// in every thread too, or they may be delivered elsewhere).
    pub fn forward_signals(&self) -> Result<i32, LaunchError> {
        let fwd = SignalForwarder::relayed()?;
        self.wait_polling(fwd.fd(), |sb| fwd.forward_to(sb))
    }

    /// Wait for init like [`wait`](Self::wait), calling `on_ready` whenever `fd` is
    /// readable (e.g. a client asking to signal the instance).
    pub fn wait_polling(
        &self,
        fd: BorrowedFd,
        mut on_ready: impl FnMut(&Sandbox) -> Result<(), LaunchError>,
    ) -> Result<i32, LaunchError> {
        self.wait_inner(None, Some((fd.as_raw_fd(), &mut on_ready)))
            .map(|c| c.expect("no timeout given"))
    }

    fn try_reap_init(&self) -> Result<Option<i32>, LaunchError> {
        if let Some(c) = self.status.get() {
            return Ok(Some(c));
        }
        let mut st = 0;
        // SAFETY: `st` is a live local; `init_pid` is our child, reaped only here (the
        // status is cached after), so the pid cannot have been reused.
        let r = unsafe { libc::waitpid(self.init_pid, &mut st, libc::WNOHANG) };
        if r < 0 {
            return match Errno::last() {
                Errno::EINTR => Ok(None),
                Errno::ECHILD => Err(LaunchError::Lost),
                errno => Err(LaunchError::Sys {
                    op: "waitpid(init)",
                    errno,
                }),
            };
        }
        if r == self.init_pid {
            if let Some(c) = exit_code(st) {
                self.status.set(Some(c));
                // The app's pid may now be reused by anyone: never touch it again.
                self.app_done.set(true);
                return Ok(Some(c));
            }
        }
        Ok(None)
    }

    /// Reap the app's exit if we are its tracer (see `wait`).
    fn try_reap_app(&self) {
        // SAFETY: `siginfo_t` is a plain C struct for which all-zero bytes are valid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a live, writable `siginfo_t`; the pidfd is owned by `self` and
        // open.
        let r = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                self.app_pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::__WALL,
            )
        };
        if r < 0 && Errno::last() == Errno::EINTR {
            return;
        }
        // Reaped, not ours (ECHILD), or nothing to reap although the app exited: in every
        // case only init is left to watch.
        self.app_done.set(true);
    }

    #[allow(clippy::type_complexity)]
    fn wait_inner(
        &self,
        timeout: Option<Duration>,
        mut extra: Option<(RawFd, &mut dyn FnMut(&Sandbox) -> Result<(), LaunchError>)>,
    ) -> Result<Option<i32>, LaunchError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(c) = self.try_reap_init()? {
                return Ok(Some(c));
            }
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() && timeout != Some(Duration::ZERO) {
                        return Ok(None);
                    }
                    left.as_millis().min(i32::MAX as u128) as i32
                }
            };
            let pfd = |fd: RawFd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let mut fds = [
                pfd(self.init_pidfd.as_raw_fd()),
                pfd(if self.app_done.get() {
                    -1
                } else {
                    self.app_pidfd.as_raw_fd()
                }),
                pfd(extra.as_ref().map_or(-1, |e| e.0)),
            ];
            // SAFETY: `fds` holds exactly the 3 `pollfd`s `poll` is told about (negative
            // fds are ignored by the kernel).
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, ms) };
            if n < 0 {
                if Errno::last() == Errno::EINTR {
                    continue;
                }
                return Err(LaunchError::sys("poll"));
            }
            if fds[1].revents != 0 {
                self.try_reap_app();
            }
            if fds[2].revents != 0 {
                if let Some((_, f)) = extra.as_mut() {
                    f(self)?;
                }
            }
            if n == 0 {
                // Timed out; one last look at init.
                return self.try_reap_init();
            }
        }
    }
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("init_pid", &self.init_pid)
            .field("app_pid", &self.app_pid)
            .field("app_ns_pid", &self.app_ns_pid)
            .field("status", &self.status.get())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for SignalForwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignalForwarder")
            .field("fd", &self.fd)
            .finish_non_exhaustive()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.status.get().is_none() {
            let _ = self.kill();
            let _ = self.wait();
        }
    }
}

/// Blocks a set of signals in the calling thread and receives them on a `signalfd`, to be
/// forwarded to a sandbox from a poll loop (no threads, no handlers). Dropping it discards
/// pending instances and restores the previous mask.
pub struct SignalForwarder {
    fd: OwnedFd,
    old_mask: libc::sigset_t,
}

impl SignalForwarder {
    /// Start catching `signals`.
    pub fn new(signals: &[i32]) -> Result<Self, LaunchError> {
        // SAFETY: the `sigset_t`s are plain C bit arrays (valid zeroed) and every pointer
        // passed is to a live local. `signalfd(-1, ...)` returns a new descriptor on
        // success, wrapped once in an `OwnedFd`.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in signals {
                libc::sigaddset(&mut set, *s);
            }
            let mut old_mask: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old_mask);
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                let e = LaunchError::sys("signalfd");
                libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut());
                return Err(e);
            }
            Ok(SignalForwarder {
                fd: OwnedFd::from_raw_fd(fd),
                old_mask,
            })
        }
    }

    /// Start catching every relayed signal ([`crate::relayed_signals`]).
    pub fn relayed() -> Result<Self, LaunchError> {
        let all: Vec<i32> = crate::relayed_signals().collect();
        Self::new(&all)
    }

    /// The signalfd, readable when a signal is pending.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Read every pending signal and send it to `sandbox`'s init.
    pub fn forward_to(&self, sandbox: &Sandbox) -> Result<(), LaunchError> {
        while let Some(sig) = self.next()? {
            sandbox.signal(sig)?;
        }
        Ok(())
    }

    /// The next pending signal, if any (non-blocking).
    pub fn next(&self) -> Result<Option<i32>, LaunchError> {
        // SAFETY: `signalfd_siginfo` is a plain C struct for which all-zero bytes are
        // valid.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let sz = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: `info` is a live, writable `signalfd_siginfo` of exactly `sz` bytes; the
        // signalfd is owned by `self`.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                &mut info as *mut _ as *mut libc::c_void,
                sz,
            )
        };
        if n < 0 {
            return match Errno::last() {
                Errno::EAGAIN | Errno::EINTR => Ok(None),
                errno => Err(LaunchError::Sys {
                    op: "read(signalfd)",
                    errno,
                }),
            };
        }
        if n as usize != sz {
            return Ok(None);
        }
        Ok(Some(info.ssi_signo as i32))
    }
}

impl Drop for SignalForwarder {
    fn drop(&mut self) {
        while let Ok(Some(_)) = self.next() {}
        // SAFETY: `old_mask` was filled by `pthread_sigmask` in `new`; the out-pointer may
        // be null.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut()) };
    }
}

/// `fork` at an exact pid (`clone3` with `set_tid`, in the caller's pid namespace): how a
/// restored tree rebuilds its children inside the sandbox. Returns 0 in the child, the
/// child's pid in the parent; fails with `EEXIST` when the pid is taken.
///
/// The child allocates from a private arena ([`crate::forksafe`]; inherited when the
/// caller is itself such a child).
///
/// # Safety
/// As with [`spawn`]'s closure: the child is a copy of the calling thread only, so the
/// caller must be single-threaded (as a restoring process is) or the child must keep to
/// the rules of [`spawn`]'s closure.
pub unsafe fn fork_with_pid(pid: i32) -> Result<i32, LaunchError> {
    let tid: libc::pid_t = pid;
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: &tid as *const libc::pid_t as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    let r = sys::clone3(&args);
    if r == 0 {
        crate::forksafe::enter_child();
    }
    if r < 0 {
        return Err(LaunchError::sys("clone3(set_tid)"));
    }
    Ok(r as i32)
}
