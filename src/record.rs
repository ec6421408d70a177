//! `warmstart record`: launch an app in the sandbox, hold it at its warm point, dump it.
//!
//! The app gets three fresh pipes as stdio so the dump can tell them apart from anything
//! else it opens: at `run` they become the caller's stdin, stdout and stderr. While it
//! warms up, its output is copied to our stderr, and the tail of its stderr is kept for
//! the error message if it exits before its warm point.

use std::collections::VecDeque;
use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use warmstart_launcher::warmpoint::StopKind as WarmKind;
use warmstart_launcher::warmpoint::{
    notify_reply, ExitStatus, NotifyChannel, SdNotifySocket, LEFT_RUNNING_MSG, NOTIFY_FD_ENV,
    NOTIFY_SOCKET_ENV,
};
use warmstart_launcher::{Ready, SpawnOptions, WarmPointTracker};
use warmstart_snapshots::store::Store;

use crate::dump::freeze::StopKind;
use crate::dump::{self, DumpOptions, DumpResult, Frozen, StdioPolicy};
use crate::sys::ptrace;

/// Lines of the app's stderr kept for error messages.
const TAIL_LINES: usize = 20;

pub struct RecordOptions {
    pub command: Vec<String>,
    pub name: Option<String>,
    pub ready: Ready,
    pub timeout: Duration,
    pub tcp_close: bool,
    /// Dump established TCP connections with `TCP_REPAIR`.
    pub tcp_established: bool,
    /// After the dump the app goes on running (its notify read returns `RESTORED=0`),
    /// with our stdin, stdout and stderr, until it exits.
    pub leave_running: bool,
    /// Input written to the app's stdin at its first read (`Ready::Stdin`); the warm point
    /// is then the first read that finds all of it consumed.
    pub prime: Vec<u8>,
    /// Paths of HTTP GETs sent to the app at its first wait for a connection
    /// (`Ready::Listen`); the warm point is then right after they were answered and their
    /// connections closed ([`crate::http_prime`]).
    pub prime_http: Vec<String>,
    /// The app uses the host's `/tmp` instead of a private tmpfs of its own.
    pub share_tmp: bool,
    /// The app runs with address-space layout randomization off (`ADDR_NO_RANDOMIZE`).
    pub reproducible: bool,
    /// `CLONE_NEWUTS`, `CLONE_NEWIPC`, `CLONE_NEWNET`: namespaces of the app's own (a
    /// new network namespace gets its loopback up before the app runs).
    pub namespaces: u64,
    /// `record --tool`: the tool `command` (its launcher's command line) holds; the files
    /// it loaded are added at the warm point.
    pub tool: Option<warmstart_snapshots::model::ToolInfo>,
    /// `--cpu-baseline`: CPUID shows the app tree only this level ([`crate::cpu_baseline`]).
    pub cpu_baseline: Option<crate::sys::cpuid::Baseline>,
}

/// Adds `ADDR_NO_RANDOMIZE` to this process's personality (its next exec lays out
/// the address space without randomization). Async-signal-safe: two syscalls.
fn no_randomize() -> bool {
    // SAFETY: personality(0xffffffff) only reads the calling process's persona.
    let cur = unsafe { libc::personality(0xffff_ffff) };
    if cur < 0 {
        return false;
    }
    let want = cur as libc::c_ulong | libc::ADDR_NO_RANDOMIZE as libc::c_ulong;
    // SAFETY: sets the calling process's persona flags; no memory is involved.
    unsafe { libc::personality(want) >= 0 }
}

/// What `record` did: the snapshot, and with `leave_running` how the app ended.
pub struct Recorded {
    pub dump: DumpResult,
    pub exit: Option<ExitStatus>,
}

fn dev_ino(fd: &OwnedFd) -> Result<(u64, u64)> {
    let f = std::fs::File::from(fd.try_clone()?);
    let m = f.metadata()?;
    Ok((m.dev(), m.ino()))
}

/// Bytes waiting in the pipe whose read end is `fd`.
fn unread(fd: &OwnedFd) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD stores one c_int at its argument, which points at `n`, a live
    // local; `fd` is borrowed open for the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
        return 0;
    }
    n
}

/// Copies our stdin to the app's in a thread of its own (never joined: it may block on a
/// terminal after the app is gone); the app sees EOF when our stdin ends.
fn pump_stdin(w: OwnedFd) {
    std::thread::spawn(move || {
        // A write after the app is gone must fail with EPIPE, not kill warmstart: the
        // SIGPIPE of a write goes to the writing thread, which blocks it.
        // SAFETY: sigset_t is a plain bit array, for which all-zero is a valid (empty)
        // value before sigemptyset; `set` is a live local only read by pthread_sigmask,
        // and a null old-set pointer is allowed. Only this thread's mask changes.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGPIPE);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        let mut w = std::fs::File::from(w);
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut w);
    });
}

/// Finds `cmd` on PATH the way a shell would, so a missing command is a clear error
/// here rather than an exit status from inside the sandbox.
/// The app sees a private, empty `/tmp`: a program or a working directory under the
/// host's `/tmp` would be gone for it (the exec fails, or the restore cannot enter the
/// directory). Said before anything starts.
fn refuse_hidden_by_private_tmp(program: &CString) -> Result<()> {
    let under_tmp = |p: &std::path::Path| p.starts_with("/tmp");
    let program = std::path::Path::new(std::ffi::OsStr::from_bytes(program.as_bytes()));
    let program = std::fs::canonicalize(program).unwrap_or_else(|_| program.to_owned());
    if under_tmp(&program) {
        bail!(
            "{} is under /tmp, which `record` replaces with a private /tmp for the app: \
             move it elsewhere, or pass --share-tmp to keep the host's /tmp",
            program.display()
        );
    }
    if let Ok(cwd) = std::env::current_dir() {
        if under_tmp(&cwd) {
            bail!(
                "the working directory {} is under /tmp, which `record` replaces with a \
                 private /tmp for the app: run from another directory (-W DIR), or pass \
                 --share-tmp to keep the host's /tmp",
                cwd.display()
            );
        }
    }
    Ok(())
}

pub fn resolve(cmd: &str) -> Result<CString> {
    use std::os::unix::fs::PermissionsExt;
    let candidates: Vec<std::path::PathBuf> = if cmd.contains('/') {
        vec![cmd.into()]
    } else {
        std::env::var_os("PATH")
            .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into())
            .to_string_lossy()
            .split(':')
            .map(|d| std::path::Path::new(d).join(cmd))
            .collect()
    };
    for c in candidates {
        if let Ok(m) = std::fs::metadata(&c) {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return CString::new(c.as_os_str().as_encoded_bytes())
                    .map_err(|_| anyhow!("bad command path"));
            }
        }
    }
    bail!(
        "command not found: {cmd} (not an executable file{})",
        if cmd.contains('/') { "" } else { " on PATH" }
    )
}

/// Copies an app's output pipe to our stderr (to our stdout once `to_stdout` is set),
/// keeping the last lines.
fn forward(
    r: OwnedFd,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
    to_stdout: Option<Arc<AtomicBool>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut f = std::fs::File::from(r);
        let mut buf = [0u8; 8192];
        let mut partial = Vec::new();
        loop {
            let n = match f.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if to_stdout
                .as_ref()
                .is_some_and(|s| s.load(Ordering::Acquire))
            {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&buf[..n]).and_then(|()| out.flush());
            } else {
                let _ = std::io::stderr().write_all(&buf[..n]);
            }
            if let Some(t) = &tail {
                partial.extend_from_slice(&buf[..n]);
                while let Some(i) = partial.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = partial.drain(..=i).collect();
                    let mut t = t.lock().unwrap();
                    if t.len() == TAIL_LINES {
                        t.pop_front();
                    }
                    t.push_back(String::from_utf8_lossy(&line).trim_end().to_owned());
                }
            }
        }
    })
}

/// Records `opts.command`; `on_dumped` is called with the snapshot as soon as it is
/// stored (with `leave_running`, before the app goes on).
pub fn record(
    store: &Store,
    opts: &RecordOptions,
    on_dumped: impl FnOnce(&DumpResult) + Send,
) -> Result<Recorded> {
    let Some(cmd) = opts.command.first() else {
        bail!("no command given: usage is `warmstart record -- CMD ARGS...`");
    };
    // Written while the app is stopped: it must fit in the pipe.
    if opts.prime.len() > 60 * 1024 {
        bail!(
            "--prime input is {} bytes; at most 60 KiB",
            opts.prime.len()
        );
    }
    if !opts.prime.is_empty() && opts.ready != Ready::Stdin {
        bail!(
            "--prime needs --ready stdin (lines for the app's stdin) or --ready listen \
             (paths of HTTP GETs), not --ready {}",
            opts.ready
        );
    }
    if !opts.prime_http.is_empty() && opts.ready != Ready::Listen {
        bail!(
            "HTTP priming requests need --ready listen (not --ready {})",
            opts.ready
        );
    }
    for p in &opts.prime_http {
        crate::http_prime::check_path(p)?;
    }
    if let Some(b) = opts.cpu_baseline {
        crate::cpu_baseline::check_host(b)?;
    }
    let path = resolve(cmd)?;
    if !opts.share_tmp {
        refuse_hidden_by_private_tmp(&path)?;
    }
    let argv: Vec<CString> = opts
        .command
        .iter()
        .map(|a| {
            CString::new(a.as_bytes()).map_err(|_| anyhow!("argument contains a NUL byte: {a:?}"))
        })
        .collect::<Result<_>>()?;
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());

    let (in_r, in_w) = crate::sys::remote::pipe().context("pipe2")?;
    let (out_r, out_w) = crate::sys::remote::pipe().context("pipe2")?;
    let (err_r, err_w) = crate::sys::remote::pipe().context("pipe2")?;
    let mut given = vec![dev_ino(&in_r)?, dev_ino(&out_r)?, dev_ino(&err_r)?];
    // `--ready notify`: the handshake channel (external fd #3 of the snapshot) and an
    // sd_notify socket, announced in the app's environment.
    let notify = if opts.ready == Ready::Notify {
        let ch = NotifyChannel::new().context("creating the notify channel")?;
        let sd = SdNotifySocket::bind().context("binding the sd_notify socket")?;
        given.push(ch.app_id());
        Some((ch, sd))
    } else {
        None
    };
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != NOTIFY_FD_ENV && k != NOTIFY_SOCKET_ENV)
        .filter_map(|(k, v)| {
            let mut kv = k.into_encoded_bytes();
            kv.push(b'=');
            kv.extend(v.into_encoded_bytes());
            CString::new(kv).ok()
        })
        .collect();
    if let Some((ch, sd)) = &notify {
        env.push(ch.env_entry().clone());
        env.push(sd.env_entry().clone());
    }
    let mut env_ptrs: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());
    let child_stdio: [RawFd; 3] = [in_r.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];

    let filter = opts
        .ready
        .filter()
        .context("building the warm-point trap")?;
    let private = crate::private_dirs::Mounts::prepare();
    // The closure runs right after clone3: nothing in it may allocate.
    let sandbox = warmstart_launcher::spawn(
        &SpawnOptions {
            pid: None,
            gate: true,
            stdio: Some(child_stdio),
            clocks: None,
            owner: None,
            namespaces: opts.namespaces,
            app_is_init: false,
        },
        || {
            if !opts.share_tmp && !crate::private_dirs::mount_private_tmp() {
                const MSG: &[u8] =
                    b"warmstart: cannot mount a private /tmp (tmpfs) for the app; --share-tmp \
                      gives it the host's\n";
                // SAFETY: a static buffer; fd 2 is the app's stderr pipe.
                unsafe { libc::write(2, MSG.as_ptr().cast(), MSG.len()) };
                return 126;
            }
            private.mount();
            if opts.reproducible && !no_randomize() {
                const MSG: &[u8] = b"warmstart: cannot turn address-space randomization off \
                      for the app (personality ADDR_NO_RANDOMIZE) for --reproducible\n";
                // SAFETY: a static buffer; fd 2 is the app's stderr pipe.
                unsafe { libc::write(2, MSG.as_ptr().cast(), MSG.len()) };
                return 126;
            }
            // The app gets stdin, stdout, stderr (and the notify fd) and nothing else
            // warmstart was handed: an fd of warmstart's caller is not the app's state.
            // SAFETY: close_range only flags fds close-on-exec; no memory is touched.
            unsafe {
                libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                )
            };
            if let Some((ch, _)) = &notify {
                if !ch.install_in_child() {
                    return 126;
                }
            }
            if let Some(f) = &filter {
                if f.install().is_err() {
                    return 126;
                }
            }
            // `path`, `argv` and `env` are CStrings owned by the parent's frame,
            // which this child (a copy of it) still has mapped; argv_ptrs and env_ptrs
            // point into them and end with a null pointer, as execve requires. Nothing is
            // allocated here, as after clone3 must be the case.
            // SAFETY: NUL-terminated arrays of live CStrings; nothing allocates here.
            unsafe { libc::execve(path.as_ptr(), argv_ptrs.as_ptr(), env_ptrs.as_ptr()) };
            127
        },
    )
    .context("starting the sandbox")?;
    if opts.namespaces & libc::CLONE_NEWNET as u64 != 0 {
        crate::sys::ns::run_in(
            sandbox.init_pidfd(),
            libc::CLONE_NEWNET,
            "the app's network namespace",
            crate::sys::rtnl::loopback_up,
        )?;
    }
    // A read end of the app's stdin kept to see how much of the priming input is unread.
    let stdin_peek = in_r.try_clone().context("dup of the app's stdin")?;
    drop((in_r, out_w, err_w));
    let notify = notify.map(|(mut ch, sd)| {
        ch.close_app_end();
        (ch, sd)
    });
    let pid = sandbox.app_pid;
    let init_pid = sandbox.init_pid;
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let live = Arc::new(AtomicBool::new(false));
    let readers = [
        forward(out_r, None, Some(live.clone())),
        forward(err_r, Some(tail.clone()), None),
    ];
    let mut in_w = Some(in_w);
    let in_w_slot = &mut in_w;

    // The tracer is a thread of its own: with `__WNOTHREAD` its waitpid(-1) sees its
    // tracees (every thread of the app, auto-attached) but never the sandbox's init,
    // which the calling thread forked and must outlive (init's PDEATHSIG).
    let (seized_tx, seized_rx) = std::sync::mpsc::channel();
    let result = std::thread::scope(|s| {
        let tracer = s.spawn(move || -> Result<Recorded> {
            let mut opts_seize = ptrace::O_EXITKILL
                | ptrace::O_TRACESECCOMP
                | ptrace::O_TRACESYSGOOD
                | ptrace::O_TRACECLONE
                | ptrace::O_TRACEFORK
                | ptrace::O_TRACEVFORK;
            // Seized before its exec: every exec of the tree stops, and CPUID faulting is
            // turned on in the new image there.
            let mut cpu = opts.cpu_baseline.map(crate::cpu_baseline::Emulator::new);
            if cpu.is_some() {
                opts_seize |= ptrace::O_TRACEEXEC;
            }
            let seized = ptrace::seize(pid, opts_seize)
                .with_context(|| format!("seizing the app (pid {pid})"));
            let _ = seized_tx.send(());
            seized?;
            let mut tracker = WarmPointTracker::new(opts.ready, pid).map_err(|e| anyhow!("{e}"))?;
            if let Some((ch, sd)) = notify {
                tracker = tracker.with_notify(ch).with_sd_notify(sd);
            }
            let mut primed = opts.prime.is_empty();
            let mut unsettled = 0u32;
            let mut unsettled_at: Option<(i32, i32)> = None;
            let mut http: Option<crate::http_prime::Priming> = None;
            let warm = loop {
                // Once fds were seen in flight, the next stop comes soon or never.
                let timeout = match unsettled_at {
                    Some(_) => opts.timeout.min(SETTLE_TIMEOUT),
                    None => opts.timeout,
                };
                let ran = match cpu.as_mut() {
                    Some(c) => tracker.run_filtered(init_pid, Some(timeout), &mut |t, st| {
                        c.on_stop(t, st)
                    }),
                    None => tracker.run(init_pid, Some(timeout)),
                };
                let warm = ran.map_err(|e| {
                    if let Some((p, fd)) = unsettled_at {
                        return anyhow!(
                            "the app never came to rest: fd {fd} of process {p} has file \
                             descriptors or credentials queued to read, which warmstart cannot \
                             checkpoint yet, and no process of the app read them within {} s \
                             ({e}); it was stopped and nothing was stored",
                            timeout.as_secs()
                        );
                    }
                    let priming = if http.as_ref().is_some_and(|p| !p.done()) {
                        " while its priming requests were under way (not all answered and \
                         closed: does it keep connections open despite `Connection: close`?)"
                    } else {
                        ""
                    };
                    anyhow!("{e}{priming}; it was stopped and nothing was stored")
                })?;
                // This stop is the warm point, or warming the app up goes on.
                let at_warm_point = if !opts.prime_http.is_empty() {
                    match http.take() {
                        // Its first wait for a connection: the requests go out now.
                        None => {
                            let fd = tracker.listen_fds().iter().min().copied().context(
                                "the app waits for connections but never called listen()",
                            )?;
                            let (p, wake) = crate::http_prime::Priming::start(
                                pid,
                                fd,
                                opts.prime_http.clone(),
                                opts.timeout,
                            )?;
                            tracker.interrupt_when_readable(wake);
                            http = Some(p);
                            false
                        }
                        Some(p) if p.done() => {
                            p.finish().map_err(|e| {
                                e.context("the app was stopped and nothing was stored")
                            })?;
                            true
                        }
                        Some(p) => {
                            http = Some(p);
                            false
                        }
                    }
                } else if !primed {
                    let w = in_w_slot
                        .as_ref()
                        .expect("the app's stdin is ours until the dump");
                    std::io::Write::write_all(
                        &mut std::fs::File::from(w.try_clone()?),
                        &opts.prime,
                    )
                    .context("writing the priming input to the app's stdin")?;
                    primed = true;
                    false
                } else {
                    // A read with priming input still to consume is not it.
                    unread(&stdin_peek) == 0
                };
                // A tree with fds in flight between its processes is not at rest: its
                // processes go on until they have read them (or, after many stops, the
                // dump refuses, naming the socket).
                let at_warm_point = at_warm_point
                    && match crate::fds::unix::queued_control(pid) {
                        Some((p, fd)) if unsettled < MAX_UNSETTLED_STOPS => {
                            unsettled += 1;
                            unsettled_at = Some((p, fd));
                            tracing::debug!(
                                "fd {fd} of process {p} has file descriptors queued: not at rest yet"
                            );
                            false
                        }
                        _ => true,
                    };
                if at_warm_point {
                    break warm;
                }
                for w in std::iter::once(warm).chain(tracker.take_held()) {
                    warmstart_launcher::warmpoint::Verdict::Continue { inject_signal: 0 }
                        .resume(w.tid)
                        .context("resuming the app while it warms up")?;
                }
            };
            // The warm point may be in a worker of the app's tree (`listen`), and other
            // workers may be held at their own blocking wait: the dump takes each of these
            // stopped threads as it is.
            let tool = opts.tool.clone().map(|mut t| {
                let files = tracker
                    .notify_channel()
                    .map(|c| c.parser().files().to_vec())
                    .unwrap_or_default();
                t.files = crate::tool::identities(&files);
                t
            });
            let stops = std::iter::once(warm)
                .chain(tracker.take_held())
                .map(|w| {
                    let kind = match w.kind {
                        WarmKind::SyscallEntry { .. } => StopKind::SyscallEntry,
                        _ => StopKind::Interrupted,
                    };
                    (w.tid, kind)
                })
                .collect();
            // With the CPUID emulation: the whole tree is stopped here and executes CPUID
            // natively again, before the dump freezes it.
            let stops = match cpu.as_mut() {
                Some(c) => {
                    let all = c.stop_tree(pid, init_pid, stops).context(
                        "stopping the app at its warm point to end the CPUID emulation",
                    )?;
                    tracing::debug!(
                        "CPUID emulated {} times, {} execs, {} threads at the warm point",
                        c.emulated,
                        c.execs,
                        all.len()
                    );
                    all
                }
                None => stops,
            };
            let frozen = held_frozen(pid, stops);
            let dumped = dump::dump(
                pid,
                Some(frozen),
                store,
                &DumpOptions {
                    leave_running: opts.leave_running,
                    keep_traced: true,
                    leave_stopped: false,
                    stdio: StdioPolicy::Given(given),
                    tcp_close: opts.tcp_close,
                    tcp_established: opts.tcp_established,
                    trigger: opts.ready.to_string(),
                    command: opts.command.clone(),
                    name: opts.name.clone(),
                    own_seccomp_filters: usize::from(filter.is_some()),
                    private_tmp: !opts.share_tmp,
                    tool,
                    manage_cgroups: false,
                    cpu_baseline: opts.cpu_baseline,
                },
            )?;
            on_dumped(&dumped);
            if !opts.leave_running {
                return Ok(Recorded {
                    dump: dumped,
                    exit: None,
                });
            }
            // The app's pending read of its notify channel (if any) gets its answer now
            // rather than before the dump, which must not see it queued.
            if let Some(ch) = tracker.notify_channel() {
                notify_reply(ch.launcher_fd(), LEFT_RUNNING_MSG)
                    .context("answering RESTORED=0 on the notify channel")?;
            }
            live.store(true, Ordering::Release);
            if let Some(w) = in_w_slot.take() {
                pump_stdin(w);
            }
            let exit = tracker
                .follow(init_pid)
                .map_err(|e| anyhow!("following the app after the dump: {e}"))?;
            Ok(Recorded {
                dump: dumped,
                exit: Some(exit),
            })
        });
        let _ = seized_rx.recv();
        sandbox.release()?;
        tracer.join().expect("tracer thread panicked")
    });
    let _ = sandbox.kill();
    let _ = sandbox.wait();
    drop(in_w);
    for r in readers {
        let _ = r.join();
    }
    result.map_err(|e| {
        let tail = tail.lock().unwrap();
        if tail.is_empty() {
            e
        } else {
            anyhow!(
                "{}\nlast lines of its stderr:\n  {}",
                crate::report::error_line(&e),
                tail.iter().cloned().collect::<Vec<_>>().join("\n  ")
            )
        }
    })
}

/// The `Frozen` of the app `pid` holding the threads stopped at `stops` (in the app or in
/// processes of its tree).
/// Warm-point stops passed over while fds are in flight in the tree (see
/// [`crate::fds::unix::queued_control`]) before the dump goes ahead and refuses.
const MAX_UNSETTLED_STOPS: u32 = 100;

/// How long the next stop may take once fds were seen in flight.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

fn held_frozen(pid: i32, stops: Vec<(i32, StopKind)>) -> Frozen {
    let mut root = Frozen {
        pid,
        ..Default::default()
    };
    for (tid, kind) in stops {
        let owner = std::fs::read_to_string(format!("/proc/{tid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Tgid:"))
                    .and_then(|v| v.trim().parse::<i32>().ok())
            })
            .unwrap_or(pid);
        let f = if owner == pid {
            &mut root
        } else {
            root.descendants.entry(owner).or_insert_with(|| Frozen {
                pid: owner,
                ..Default::default()
            })
        };
        f.threads.insert(
            tid,
            dump::freeze::FrozenThread {
                tid,
                kind,
                caught: Vec::new(),
            },
        );
    }
    root
}
