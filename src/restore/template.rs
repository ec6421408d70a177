//! Restore templates (issue 15): the memory of a snapshot restored once, shared
//! copy-on-write by every instance started from it.
//!
//! A template is a process forked from the monitor (`warmstart serve`) that holds the
//! private anonymous memory of the snapshot's (root) process — every area
//! [`super::cow::candidate`] accepts, all of its stored pages written — mapped where the
//! app had it when that address is free in the template, elsewhere otherwise. In a tree,
//! the root adopts all of it and its children share with the root as in any restored
//! tree ([`super::cow::plan`] with `template`). It never runs the app. For each instance
//! the monitor sends it the instance's fds (stdio, status pipe, notify and parking
//! channels, listeners, private /tmp) and the template spawns the instance's sandbox as
//! the monitor would (`warmstart_launcher::spawn`, with `CLONE_PARENT`, so the sandbox is
//! the monitor's child as usual and outlives the template): the restoring process is then
//! a fork of the template, holds its areas without a copy, and its restorer program moves
//! them into place ([`super::cow`], the same way a child of a tree adopts its parent's).
//! Everything else — fds, open file descriptions, sockets, pipes, shared mappings, timers,
//! signals, threads, credentials — is restored by each instance for itself, exactly as
//! without a template, so nothing but the snapshot's pages is shared, and those only
//! until written.
//!
//! The template is a fork of a multi-threaded process by glibc's `fork` (whose handlers
//! make `malloc` usable in the child): it logs nothing and takes no lock of the Rust
//! runtime or of a crate (see `warmstart_launcher::forksafe`).

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use warmstart_launcher::{Sandbox, SandboxParts, SpawnOptions};
use warmstart_snapshots::model::{Manifest, RunContent, PAGE_SIZE};
use warmstart_snapshots::store::Snapshot;

use super::child::{self, Placed, TreeChannels};
use super::cow::{self, CowPlan};
use crate::sys::scm;

/// The template process's name (`comm`).
pub const TEMPLATE_COMM: &std::ffi::CStr = c"ws-template";

/// How long the template may take to answer a request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// A template process and what an instance spawned from it needs to know.
pub struct Template {
    pub snap: Arc<Snapshot>,
    /// The template's pid (the monitor's child).
    pub pid: i32,
    ctl: Mutex<OwnedFd>,
    /// The areas the template holds, as every instance adopts them.
    pub plan: CowPlan,
    /// Bytes of stored pages it holds.
    pub bytes: u64,
    /// Listed by `warmstart ps` while it lives.
    _listed: Option<crate::instances::Registration>,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Template")
            .field("snapshot", &self.snap.id.short())
            .field("pid", &self.pid)
            .field("bytes", &self.bytes)
            .finish_non_exhaustive()
    }
}

/// Why instances of `m` cannot come from a template, if they cannot.
pub fn why_not(m: &Manifest) -> Option<String> {
    if m.tool.is_some() {
        // A tool's run is one short instance per invocation, where time is what counts:
        // its first writes to every page it shares with a template (a Python tool writes
        // reference counts all over its heap) cost more than a private copy made while
        // it is parked (measured: warm `black --check` 28 ms from a template, 18 ms
        // parked on its own).
        return Some(
            "it is a command-line tool (record --tool): parked instances run it \
                     sooner with memory of their own"
                .into(),
        );
    }
    if super::root_is_init(m) {
        return Some(
            "its root process was the init (pid 1) of its pid namespace, and is restored \
             as the sandbox's init: an instance forked from a template would not be"
                .into(),
        );
    }
    if m.namespaces.any() {
        return Some(
            "it runs in uts, ipc or network namespaces of its own, which instances forked \
             from a template do not get yet"
                .into(),
        );
    }
    let root = m.processes.first()?;
    let any = root.vmas.iter().any(|v| {
        cow::candidate(v)
            && v.pages
                .iter()
                .any(|r| matches!(r.content, RunContent::Data { .. }))
    });
    if !any {
        return Some("its process has no private memory to share".into());
    }
    // Each instance's fds travel to the template in one message.
    let fds = 3 + 2 * m.processes.len() + 3 + crate::fds::inet::recorded_listeners(m).len();
    (fds > scm::MAX_FDS).then(|| {
        format!(
            "its tree of {} processes needs more fds than one message to the template carries",
            m.processes.len()
        )
    })
}

/// What the monitor sends with an instance's fds.
#[derive(Debug, Serialize, Deserialize)]
struct Request {
    clocks: Option<[i64; 2]>,
    /// Processes in the tree (one status pipe each, one gate each but the root).
    procs: usize,
    stdio: bool,
    notify: bool,
    late: bool,
    /// `Fd::ofd` of each listener given in place of a recorded one.
    listeners: Vec<u32>,
    private_tmp: bool,
    /// The lazily served ranges, per process.
    lazy: Vec<Vec<(u64, u64)>>,
}

/// The template's answer: the sandbox's pids (its fds come along), or why not.
#[derive(Debug, Serialize, Deserialize)]
enum Answer {
    Spawned {
        init_pid: i32,
        app_pid: i32,
        app_ns_pid: i32,
        gate: bool,
    },
    Failed(String),
}

/// The fds of one instance, as the restore prepared them.
pub struct InstanceFds<'a> {
    pub stdio: Option<[RawFd; 3]>,
    /// Per process, the write end of its status pipe.
    pub reports: &'a [RawFd],
    /// Per process but the root, the read end of its gate.
    pub gates: &'a [RawFd],
    pub notify: Option<RawFd>,
    pub late: Option<RawFd>,
    pub listeners: &'a [(u32, RawFd)],
    pub private_tmp: Option<RawFd>,
}

impl Template {
    /// Forks the template of `snap` and writes its memory.
    pub fn build(snap: &Arc<Snapshot>) -> Result<Template> {
        let m = &snap.manifest;
        if let Some(why) = why_not(m) {
            bail!("no template for snapshot {}: {why}", snap.id.short());
        }
        let plan = cow::plan(snap, m, true)?
            .ok_or_else(|| anyhow!("no template for snapshot {}", snap.id.short()))?;
        let theirs_plan = plan.try_clone()?;
        // Statics the restoring child reads, set before the fork (see `child`).
        super::program::last_cap();
        let forked_snap = snap.clone();
        let (pid, ours) = on_forker(move || -> Result<(i32, OwnedFd)> {
            let (ours, theirs) = scm::seqpacket_pair().context("socketpair for a template")?;
            // SAFETY: getpid takes no arguments and cannot fail.
            let me = unsafe { libc::getpid() };
            let monitor = warmstart_launcher::sys::pidfd_open(me, 0).context("pidfd_open")?;
            let plan = theirs_plan;
            // Glibc's fork runs its fork handlers, so the child may allocate; it
            // takes no other lock another thread may hold (no logging, printing, or shared
            // state: `template_main` reads plain data and makes system calls) and ends in
            // `_exit`.
            // SAFETY: glibc's fork; the child takes no lock another thread may hold.
            let pid = unsafe { libc::fork() };
            if pid < 0 {
                return Err(std::io::Error::last_os_error()).context("forking a template");
            }
            if pid == 0 {
                template_main(
                    &plan,
                    &forked_snap.manifest,
                    theirs.as_raw_fd(),
                    monitor.as_raw_fd(),
                    me,
                );
            }
            Ok((pid, ours))
        })??;
        let t = Template {
            snap: snap.clone(),
            pid,
            ctl: Mutex::new(ours),
            bytes: plan.procs[0]
                .iter()
                .map(|a| a.own.len() as u64 * PAGE_SIZE as u64)
                .sum(),
            plan,
            _listed: crate::instances::register(&crate::instances::Instance {
                monitor: std::process::id() as i32,
                pid,
                snapshot: snap.id.to_string(),
                names: Vec::new(),
                command: m.command.clone(),
                started_unix: crate::instances::unix_now(),
                client: None,
                template: true,
                cgroups: Vec::new(),
            })
            .map_err(|e| tracing::warn!("template not listed by `warmstart ps`: {e:#}"))
            .ok(),
        };
        // Where it mapped each area; then every stored page goes in.
        let placed: Vec<(u64, u64, u64)> = {
            let ctl = t.ctl.lock().unwrap_or_else(|e| e.into_inner());
            let bytes = recv_bytes(&ctl, ANSWER_TIMEOUT)
                .context("waiting for the template to map its memory")?;
            let placed: std::result::Result<Vec<(u64, u64, u64)>, String> =
                postcard::from_bytes(&bytes).context("decoding the template's areas")?;
            placed.map_err(|e| anyhow!("the template could not map its memory: {e}"))?
        };
        super::memory::fill_template(snap, &m.processes[0], pid, &placed)
            .context("writing the template's memory")?;
        {
            let ctl = t.ctl.lock().unwrap_or_else(|e| e.into_inner());
            scm::send(ctl.as_fd(), b"F", &[]).context("starting the template")?;
        }
        Ok(t)
    }

    /// Spawns an instance's sandbox from the template (see [`SpawnOptions::owner`]).
    pub(super) fn spawn(
        &self,
        clocks: Option<[i64; 2]>,
        lazy: &[Vec<(u64, u64)>],
        fds: &InstanceFds,
    ) -> Result<Sandbox> {
        if fds.stdio.is_none() {
            bail!("an instance from a template needs its stdio given");
        }
        let req = Request {
            clocks,
            procs: fds.reports.len(),
            stdio: fds.stdio.is_some(),
            notify: fds.notify.is_some(),
            late: fds.late.is_some(),
            listeners: fds.listeners.iter().map(|l| l.0).collect(),
            private_tmp: fds.private_tmp.is_some(),
            lazy: lazy.to_vec(),
        };
        if fds.gates.len() + 1 != fds.reports.len() || lazy.len() != fds.reports.len() {
            bail!("a template request needs a status pipe per process and a gate per child");
        }
        let mut send: Vec<RawFd> = Vec::new();
        send.extend(fds.stdio.iter().flatten());
        send.extend(fds.reports);
        send.extend(fds.gates);
        send.extend(fds.notify);
        send.extend(fds.late);
        send.extend(fds.listeners.iter().map(|l| l.1));
        send.extend(fds.private_tmp);
        if send.len() > scm::MAX_FDS {
            bail!(
                "{} fds are too many for one request to the template",
                send.len()
            );
        }
        let bytes = postcard::to_stdvec(&req).context("encoding a template request")?;
        let ctl = self.ctl.lock().unwrap_or_else(|e| e.into_inner());
        scm::send(ctl.as_fd(), &bytes, &send).context("sending a request to the template")?;
        let (answer, mut got) =
            recv_with_fds(&ctl, ANSWER_TIMEOUT).context("waiting for the template's answer")?;
        let answer: Answer =
            postcard::from_bytes(&answer).context("decoding the template's answer")?;
        match answer {
            Answer::Failed(why) => bail!("{why}"),
            Answer::Spawned {
                init_pid,
                app_pid,
                app_ns_pid,
                gate,
            } => {
                if got.len() != 2 + usize::from(gate) {
                    bail!("the template sent {} fds with its sandbox", got.len());
                }
                let gate = gate.then(|| got.pop().expect("counted"));
                let app_pidfd = got.pop().expect("counted");
                let init_pidfd = got.pop().expect("counted");
                Ok(Sandbox::from_parts(SandboxParts {
                    init_pid,
                    app_pid,
                    app_ns_pid,
                    init_pidfd,
                    app_pidfd,
                    gate,
                }))
            }
        }
    }
}

impl Drop for Template {
    fn drop(&mut self) {
        // The template exits at EOF on its socket; a kill in case it is stuck.
        // SAFETY: kill and waitpid take integers; the template is our child, unreaped.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

fn wait_readable(fd: &OwnedFd, timeout: Duration) -> Result<()> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one pollfd that lives across the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        match n {
            1 => return Ok(()),
            0 => bail!("no answer within {} s", timeout.as_secs()),
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return Err(std::io::Error::last_os_error()).context("poll"),
        }
    }
}

fn recv_with_fds(fd: &OwnedFd, timeout: Duration) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
    wait_readable(fd, timeout)?;
    let mut buf = vec![0u8; 64 << 10];
    let (n, fds) = scm::recv(fd.as_fd(), &mut buf).context("recvmsg")?;
    if n == 0 {
        bail!("the template has exited");
    }
    buf.truncate(n);
    Ok((buf, fds))
}

fn recv_bytes(fd: &OwnedFd, timeout: Duration) -> Result<Vec<u8>> {
    recv_with_fds(fd, timeout).map(|(b, _)| b)
}

/// Runs `f` on the thread that forks every template, which lives as long as the process:
/// a template, and the sandbox of every instance it spawns (`CLONE_PARENT`), are children
/// of that thread, and `PR_SET_PDEATHSIG` fires when the *thread* that created a process
/// ends, not the process.
fn on_forker<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Result<R> {
    type Job = Box<dyn FnOnce() + Send>;
    static FORKER: std::sync::OnceLock<Mutex<std::sync::mpsc::Sender<Job>>> =
        std::sync::OnceLock::new();
    let tx = FORKER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name("template-forker".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("no thread to fork templates from: {e}");
        }
        Mutex::new(tx)
    });
    let (back, result) = std::sync::mpsc::channel();
    tx.lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(Box::new(move || {
            let _ = back.send(f());
        }))
        .map_err(|_| anyhow!("the template forker thread is gone"))?;
    result
        .recv()
        .map_err(|_| anyhow!("the template forker thread is gone"))
}

// ---------------------------------------------------------------------------------------
// The template process

fn template_main(plan: &CowPlan, m: &Manifest, ctl: RawFd, monitor: RawFd, parent: i32) -> ! {
    // SAFETY: prctl and getppid take integers; the template dies with the monitor.
    unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
        if libc::getppid() != parent {
            libc::_exit(0);
        }
    }
    // Told apart from the monitor and its sandboxes in `ps` and /proc.
    // SAFETY: prctl reads a NUL-terminated static name.
    unsafe { libc::prctl(libc::PR_SET_NAME, TEMPLATE_COMM.as_ptr(), 0, 0, 0) };
    let mut keep = vec![ctl, monitor];
    keep.extend(plan.memfd.as_ref().map(|f| f.as_raw_fd()));
    close_all_but(&keep);
    let code = match serve(plan, m, ctl, monitor) {
        Ok(()) => 0,
        Err(_) => 1,
    };
    // SAFETY: ends the template without running the monitor's exit handlers.
    unsafe { libc::_exit(code) }
}

/// Closes every fd of the template but `keep`.
fn close_all_but(keep: &[RawFd]) {
    let mut keep = keep.to_vec();
    keep.sort_unstable();
    let mut from = 0u32;
    for &k in &keep {
        if k as u32 > from {
            // SAFETY: close_range takes integers; nothing here uses the fds it closes.
            unsafe { libc::syscall(libc::SYS_close_range, from, k as u32 - 1, 0u32) };
        }
        from = k as u32 + 1;
    }
    // SAFETY: as above.
    unsafe { libc::syscall(libc::SYS_close_range, from, u32::MAX, 0u32) };
}

fn serve(plan: &CowPlan, m: &Manifest, ctl: RawFd, monitor: RawFd) -> Result<()> {
    // SAFETY: `ctl` is open for the template's whole life; borrowed, never closed here.
    let ctl = unsafe { std::os::fd::BorrowedFd::borrow_raw(ctl) };
    let mut own = None;
    let placed: std::result::Result<Vec<Placed>, String> = plan.procs[0]
        .iter()
        .map(|a| {
            child::map_area(a.start, a.end - a.start, &a.backing, plan, &mut own)
                .map(|at| Placed {
                    start: a.start,
                    end: a.end,
                    at,
                })
                .map_err(|e| format!("{e:#}"))
        })
        .collect();
    let msg: std::result::Result<Vec<(u64, u64, u64)>, String> = placed
        .as_ref()
        .map(|v| v.iter().map(|p| (p.start, p.end, p.at)).collect())
        .map_err(Clone::clone);
    scm::send(ctl, &postcard::to_stdvec(&msg)?, &[])?;
    let placed = placed.map_err(|e| anyhow!(e))?;
    let mut buf = vec![0u8; 64 << 10];
    // The monitor writes the memory, then says go.
    let (n, _) = scm::recv(ctl, &mut buf)?;
    if n == 0 {
        return Ok(());
    }
    loop {
        let (n, fds) = scm::recv(ctl, &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        let answer = match postcard::from_bytes::<Request>(&buf[..n]) {
            Ok(req) => spawn_one(plan, m, &placed, monitor, &req, fds),
            Err(e) => Err(format!("undecodable request: {e}")),
        };
        let (answer, parts) = match answer {
            Ok(parts) => (
                Answer::Spawned {
                    init_pid: parts.init_pid,
                    app_pid: parts.app_pid,
                    app_ns_pid: parts.app_ns_pid,
                    gate: parts.gate.is_some(),
                },
                Some(parts),
            ),
            Err(why) => (Answer::Failed(why), None),
        };
        let mut send = Vec::new();
        if let Some(p) = &parts {
            send.push(p.init_pidfd.as_raw_fd());
            send.push(p.app_pidfd.as_raw_fd());
            send.extend(p.gate.as_ref().map(|g| g.as_raw_fd()));
        }
        scm::send(ctl, &postcard::to_stdvec(&answer)?, &send)?;
        // Our copies go; the monitor owns the sandbox now.
        drop(parts);
    }
}

fn spawn_one(
    plan: &CowPlan,
    m: &Manifest,
    placed: &[Placed],
    monitor: RawFd,
    req: &Request,
    fds: Vec<OwnedFd>,
) -> std::result::Result<SandboxParts, String> {
    let n = req.procs;
    if n != m.processes.len() || req.lazy.len() != n {
        return Err(format!(
            "a request for {n} processes, the snapshot has {}",
            m.processes.len()
        ));
    }
    let want = if req.stdio { 3 } else { 0 } + 2 * n - 1
        + usize::from(req.notify)
        + usize::from(req.late)
        + req.listeners.len()
        + usize::from(req.private_tmp);
    if fds.len() != want {
        return Err(format!(
            "{} fds came with the request, {want} expected",
            fds.len()
        ));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut it = raw.iter().copied();
    let mut next = || it.next().expect("counted above");
    let stdio = req.stdio.then(|| [next(), next(), next()]);
    let reports: Vec<RawFd> = (0..n).map(|_| next()).collect();
    let mut gates = vec![-1];
    gates.extend((1..n).map(|_| next()));
    let notify = req.notify.then(&mut next);
    let late = req.late.then(&mut next);
    let listeners: Vec<(u32, RawFd)> = req.listeners.iter().map(|&o| (o, next())).collect();
    let private_tmp = req.private_tmp.then(&mut next);
    let chans = TreeChannels { reports, gates };
    let args = child::ChildArgs {
        m,
        lazy: &req.lazy,
        notify,
        late_sock: late,
        listeners: &listeners,
        chans: &chans,
        cow: Some(plan),
        inherited: placed,
        private_tmp,
    };
    // The sandbox's init and the instance are forks of the template: named as any
    // other sandbox's meanwhile.
    // SAFETY: prctl reads NUL-terminated static names.
    unsafe { libc::prctl(libc::PR_SET_NAME, c"warmstart".as_ptr(), 0, 0, 0) };
    let sandbox = warmstart_launcher::spawn(
        &SpawnOptions {
            pid: Some(m.processes[0].pid),
            gate: true,
            stdio,
            clocks: req.clocks,
            owner: Some(monitor),
            namespaces: 0,
            app_is_init: false,
        },
        || child::run(&args),
    )
    .map_err(|e| format!("starting the sandbox from the template: {e}"));
    // SAFETY: as above.
    unsafe { libc::prctl(libc::PR_SET_NAME, TEMPLATE_COMM.as_ptr(), 0, 0, 0) };
    let sandbox = sandbox?;
    drop(fds);
    Ok(sandbox.into_parts())
}
