//! The restoring child: a copy of warmstart running with the snapshot's pid inside the
//! sandbox. It does with ordinary code everything a process can do to itself while its
//! memory is still warmstart's (session, fds, cwd, limits), then maps the restorer
//! program and jumps into it. It reports failures before the jump over the status
//! pipe; after the jump the program's status word tells the monitor.
//!
//! A tree is rebuilt from its root, in this order:
//!
//! 1. the root creates every object more than one process holds (open file
//!    descriptions, pipes, socket pairs, shared anonymous memory: [`crate::fds::Inherited`])
//!    above the apps' fd numbers, so that forking hands them down: shared once, as they
//!    were;
//! 2. each process sets its own session (`setsid`) or makes its own group — a session
//!    leader whose controlling terminal was a pty of the app's own takes it again
//!    (`TIOCSCTTY`, [`crate::fds::pty`]) —, then forks its children at their pids
//!    (`clone3` `set_tid`), which do the same: a session leader and its terminal exist
//!    before its members are born into it and inherit the terminal;
//! 3. every process waits until the whole tree exists (a barrier pipe), then joins the
//!    group it was in (its leader may be a later sibling); then a terminal's foreground
//!    group is set, and a process that had no terminal drops the one it inherited;
//! 4. a zombie exits with its recorded status; a parent waits (without reaping) for its
//!    zombies to be dead and drops the SIGCHLD their exits queued;
//! 5. each process builds its fd table and the rest, reports, and jumps.
//!
//! All of it runs in children of a raw `clone3` from a monitor whose other threads
//! allocate meanwhile (a `serve` daemon, the hot-pages and table-check threads). They
//! allocate from a private arena (`warmstart_launcher::forksafe`, which explains why)
//! and keep to its rules: no logging or printing, no libc call that allocates by itself
//! (so fds are closed with `close_range`, not by listing `/proc/self/fd`), statics
//! initialised by the monitor before the clone (`program::last_cap`).

use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use warmstart_snapshots::model::{Manifest, Process, VmaKind};

use super::cow::CowPlan;
use super::program::{self, ProgramFds};
use crate::sys::maps::{self, MapEntry};

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
    /// Parked: the leader has a late phase ([`program::Late`]) and traps once more.
    pub late: bool,
    /// Its late phase receives the caller's stdio first.
    pub wants_stdio: bool,
    /// Where its late phase reads the clock offsets of the hand-out
    /// (`program::timens_text`), for the root of a parked tree.
    pub timens_text: Option<u64>,
    /// The program, one step per line ([`program::LISTING`], `-vv`).
    pub listing: Option<String>,
}

/// Message tags on the status pipe.
pub const MSG_ERROR: u8 = b'E';
pub const MSG_BLOB: u8 = b'B';
/// A zombie's report: it is about to exit with its recorded status.
pub const MSG_ZOMBIE: u8 = b'Z';

fn errno_err(what: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{what}: {}", std::io::Error::last_os_error())
}

fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| anyhow!("path contains a NUL byte: {s:?}"))
}

/// The fds the monitor gives a restored tree: per process (manifest order) the write end
/// of its status pipe and the read end of its gate (`-1` for the root, which the
/// sandbox's own gate holds until it is seized).
#[derive(Debug, Clone)]
pub struct TreeChannels {
    pub reports: Vec<RawFd>,
    pub gates: Vec<RawFd>,
}

/// What every process of the tree inherits from the root, all above `high`.
///
/// Each forked process holds a copy of the context and owns its copies of the fds in it
/// ([`TreeFd`]): it takes each at a chosen moment, to close what is not its own (the
/// barrier's write end before it waits, other processes' channels) or to use it last
/// (its status pipe, its gate). A process that fails writes its error on its status pipe
/// by number as long as it holds it. The shared objects of [`crate::fds::Inherited`] stay
/// numbers (the fds module's installer places them). Temporary fds (pipes, opens for
/// mappings) are `OwnedFd` until their number is handed over.
struct Ctx<'a> {
    m: &'a Manifest,
    lazy: &'a [Vec<(u64, u64)>],
    high: RawFd,
    stdio: Vec<TreeFd>,
    /// Per process (manifest order): the write end of its status pipe, and the read end
    /// of its gate (none for the root).
    reports: Vec<TreeFd>,
    gates: Vec<TreeFd>,
    inherited: crate::fds::Inherited,
    /// The "every process exists" barrier: each process closes its copy of the write
    /// end once its children are forked; EOF on the read end means the whole tree exists.
    barrier: (TreeFd, TreeFd),
    /// Parked restore: where each process with stdio fds receives them when handed out.
    late_sock: TreeFd,
    /// The pages the tree's processes share ([`super::cow`]), and the memfd with the
    /// bytes each writes before it forks.
    cow: Option<&'a CowPlan>,
    cow_fd: TreeFd,
}

/// An fd of the tree's shared context ([`Ctx`]). Every process forked after it was made
/// holds a copy of its own, which that process owns: it takes it at most once, to use or
/// to close (an `OwnedFd`), and the number reads -1 after, so no copy is closed twice or
/// used once closed.
struct TreeFd(std::cell::Cell<RawFd>);

impl TreeFd {
    fn new(fd: RawFd) -> TreeFd {
        TreeFd(std::cell::Cell::new(fd))
    }

    fn none() -> TreeFd {
        TreeFd::new(-1)
    }

    /// Its number while this process holds it (-1 once taken).
    fn raw(&self) -> RawFd {
        self.0.get()
    }

    fn take(&self) -> Option<OwnedFd> {
        let fd = self.0.replace(-1);
        // SAFETY: this process's own copy (see above), handed out once: -1 is left in its
        // place.
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// Where one of a process's shared areas ([`super::cow::Area`]) is mapped now, with the
/// pages its children inherit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub start: u64,
    pub end: u64,
    pub at: u64,
}

/// What the root of a tree starts from: the snapshot and, as fd numbers it holds, what
/// the monitor gives this instance.
pub struct ChildArgs<'a> {
    pub m: &'a Manifest,
    /// Per process (manifest order), the ranges its restorer registers with a
    /// userfaultfd of its own (empty: eager).
    pub lazy: &'a [Vec<(u64, u64)>],
    /// The app end of a fresh notify channel (`--ready notify` snapshots).
    pub notify: Option<RawFd>,
    /// A parked restore's stdio socket ([`program::Late`]).
    pub late_sock: Option<RawFd>,
    /// Listening sockets given in place of recorded ones, by `Fd::ofd`.
    pub listeners: &'a [(u32, RawFd)],
    pub chans: &'a TreeChannels,
    /// Pages shared between the tree's processes or with a template ([`super::cow`]).
    pub cow: Option<&'a CowPlan>,
    /// The areas the root inherits already mapped (from a template), by
    /// [`super::cow::Area::adopt`].
    pub inherited: &'a [Placed],
    /// The instance's private /tmp (a detached tmpfs mount) to put in place.
    pub private_tmp: Option<RawFd>,
}

/// Entry point of the root of the tree (the sandbox's app); returns only on failure
/// (with the exit code to use).
pub fn run(a: &ChildArgs) -> i32 {
    let chans = a.chans;
    if let Some(mnt) = a.private_tmp {
        if !super::tmp::attach(mnt) {
            const MSG: &[u8] = b"Eputting the instance's private /tmp in place \
                (move_mount of its tmpfs onto /tmp) failed";
            const _: () = assert!(MSG[0] == MSG_ERROR);
            // SAFETY: a static buffer; the status pipe's fd is open in the child.
            unsafe { libc::write(chans.reports[0], MSG.as_ptr().cast(), MSG.len()) };
            return super::TMP_ATTACH_FAILED;
        }
    }
    let mut report = chans.reports[0];
    let given = Given {
        notify: a.notify,
        late_sock: a.late_sock,
        listeners: a.listeners,
        cow: a.cow,
        inherited: a.inherited,
    };
    match prepare_root(a.m, a.lazy, &given, chans, &mut report) {
        Ok(never) => match never {},
        Err(e) => fail(report, e),
    }
}

/// Reports `e` on the status pipe `report`; the exit code to use.
fn fail(report: RawFd, e: anyhow::Error) -> i32 {
    let mut msg = vec![MSG_ERROR];
    msg.extend_from_slice(crate::report::error_line(&e).as_bytes());
    // SAFETY: `report` is this process's status pipe write end, which it owns (its `Ctx`
    // copy) and which nothing else uses on the failure path: the `File` takes it over and
    // closes it when dropped, just before the process exits.
    let mut f = unsafe { std::fs::File::from_raw_fd(report) };
    let _ = f.write_all(&msg);
    1
}

/// `report` is the status pipe's fd, updated when it moves.
/// What the monitor hands the root besides its channels.
struct Given<'a> {
    notify: Option<RawFd>,
    late_sock: Option<RawFd>,
    listeners: &'a [(u32, RawFd)],
    cow: Option<&'a CowPlan>,
    inherited: &'a [Placed],
}

fn prepare_root(
    m: &Manifest,
    lazy: &[Vec<(u64, u64)>],
    given: &Given,
    chans: &TreeChannels,
    report: &mut RawFd,
) -> Result<std::convert::Infallible> {
    let Given {
        notify,
        late_sock,
        listeners,
        cow,
        inherited: from_template,
    } = *given;
    // Every signal blocked until the monitor loads the app's mask at the very end, so
    // whatever the app's timers or anyone sends meanwhile stays pending instead of
    // stopping the restorer. A raw rt_sigprocmask: glibc's sigfillset leaves out the
    // signals it keeps for itself (32, 33), and a SIGEV_THREAD timer fires signal 32.
    let all: u64 = !0;
    // SAFETY: rt_sigprocmask reads 8 bytes of mask from a live u64 and writes nothing.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &all as *const u64,
            std::ptr::null_mut::<u64>(),
            8usize,
        );
    }
    let p = &m.processes[0];
    own_ids(p)?;
    let max_fd = m
        .processes
        .iter()
        .flat_map(|p| p.fds.iter().map(|f| f.fd))
        .max()
        .unwrap_or(2)
        .max(2);
    // Everything we still need lives above the apps' highest fd while tables are built:
    // warmstart's other fds closed first, so the copies get the lowest numbers there
    // (and the fd table can shrink, see `shrink_fd_table`).
    let high = max_fd + 1;
    let mut originals = vec![0, 1, 2];
    originals.extend(&chans.reports);
    originals.extend(chans.gates.iter().filter(|&&g| g >= 0));
    originals.extend(notify);
    originals.extend(late_sock);
    originals.extend(listeners.iter().map(|l| l.1));
    let cow_fd = cow.and_then(|c| c.memfd.as_ref()).map(|f| f.as_raw_fd());
    originals.extend(cow_fd);
    close_all_except(&originals)?;
    let mut moved = TreeChannels {
        reports: Vec::new(),
        gates: Vec::new(),
    };
    for &fd in &chans.reports {
        moved.reports.push(dup_high(fd, high)?);
    }
    *report = moved.reports[0];
    for &fd in &chans.gates {
        moved
            .gates
            .push(if fd < 0 { -1 } else { dup_high(fd, high)? });
    }
    let mut stdio = vec![
        dup_high_or_null(0, high)?,
        dup_high_or_null(1, high)?,
        dup_high_or_null(2, high)?,
    ];
    if let Some(fd) = notify {
        stdio.push(dup_high(fd, high)?);
    }
    let late_sock = late_sock.map(|fd| dup_high(fd, high)).transpose()?;
    let mut given = std::collections::HashMap::new();
    for &(ofd, fd) in listeners {
        given.insert(ofd, dup_high(fd, high)?);
    }
    let cow_fd = cow_fd.map(|fd| dup_high(fd, high)).transpose()?;
    let mut keep = stdio.clone();
    keep.extend(cow_fd);
    keep.extend(late_sock);
    keep.extend(given.values().copied());
    keep.extend(&moved.reports);
    keep.extend(moved.gates.iter().filter(|&&g| g >= 0));
    close_all_except(&keep)?;
    // Only when warmstart's table is larger than the app's was (a fork's worth of work).
    if own_fd_table_size() > p.fd_table_size.max(64) {
        shrink_fd_table()?;
    }
    recreate_private_files(m)?;
    crate::fds::pty::mount_devpts(m)?;
    let inherited = crate::fds::prepare_shared(m, &stdio, high, &given)?;
    // The root's own terminal, now that its pty exists (its `setsid` came first).
    crate::fds::pty::take_ctty(p, &inherited.ptys)?;
    let barrier = {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| anyhow!("pipe2 for the tree's barrier: {e}"))?;
        // The pipe's own fds (low numbers) are closed at the end of this block: a write
        // end left open anywhere would keep the barrier from ever reading EOF.
        (
            dup_high(r.as_raw_fd(), high)?,
            dup_high(w.as_raw_fd(), high)?,
        )
    };
    let tree_fds = |v: Vec<RawFd>| v.into_iter().map(TreeFd::new).collect::<Vec<_>>();
    let ctx = Ctx {
        m,
        lazy,
        high,
        stdio: tree_fds(stdio),
        reports: tree_fds(moved.reports),
        gates: tree_fds(moved.gates),
        inherited,
        barrier: (TreeFd::new(barrier.0), TreeFd::new(barrier.1)),
        late_sock: late_sock.map_or_else(TreeFd::none, TreeFd::new),
        cow,
        cow_fd: cow_fd.map_or_else(TreeFd::none, TreeFd::new),
    };
    let placed = place_shared(&ctx, 0, from_template)?;
    fork_children(&ctx, 0, &placed)?;
    finish(&ctx, 0, &placed)
}

/// Maps process `idx`'s shared areas ([`super::cow`]) before it forks: its part of each
/// area of its parent's it adopts (`inherited`, the parent's placed areas; the rest of
/// them is unmapped), new ones at their own address when that is free (elsewhere
/// otherwise, outside every VMA of the tree), then writes the pages its children inherit.
fn place_shared(ctx: &Ctx, idx: usize, inherited: &[Placed]) -> Result<Vec<Placed>> {
    let Some(plan) = ctx.cow else {
        return Ok(Vec::new());
    };
    let areas = &plan.procs[idx];
    let adopted: Vec<(u64, u64)> = areas
        .iter()
        .filter_map(|a| {
            let from = inherited.get(a.adopt?)?;
            let at = from.at + (a.start - from.start);
            Some((at, at + (a.end - a.start)))
        })
        .collect();
    for from in inherited {
        let mut pos = from.at;
        let end = from.at + (from.end - from.start);
        let mut kept: Vec<(u64, u64)> = adopted
            .iter()
            .copied()
            .filter(|&(s, e)| s >= from.at && e <= end)
            .collect();
        kept.sort_unstable();
        for (s, e) in kept.into_iter().chain(std::iter::once((end, end))) {
            if s > pos {
                // SAFETY: the range is a part of an inherited area no code here uses.
                if unsafe { libc::munmap(pos as *mut libc::c_void, (s - pos) as usize) } < 0 {
                    return Err(errno_err(format!(
                        "unmapping {pos:#x}-{s:#x}, a shared area this process does not keep"
                    )));
                }
            }
            pos = pos.max(e);
        }
    }
    let mut own: Option<Vec<(u64, u64)>> = None;
    let mut out = Vec::with_capacity(areas.len());
    for a in areas {
        let len = a.end - a.start;
        let at = match a.adopt.and_then(|k| inherited.get(k)) {
            Some(from) => from.at + (a.start - from.start),
            None => map_area(a.start, len, &a.backing, plan, &mut own)?,
        };
        for &(addr, pages, off) in &a.writes {
            let dst = at + (addr - a.start);
            let mut done = 0u64;
            let total = pages * 4096;
            while done < total {
                // SAFETY: [dst, dst + total) lies inside the area mapped read-write above;
                // pread writes at most `total - done` bytes there.
                let n = unsafe {
                    libc::pread(
                        ctx.cow_fd.raw(),
                        (dst + done) as *mut libc::c_void,
                        (total - done) as usize,
                        (off + done) as libc::off_t,
                    )
                };
                if n <= 0 {
                    if n < 0
                        && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                    {
                        continue;
                    }
                    return Err(errno_err(format!(
                        "reading the pages shared at {addr:#x} into place"
                    )));
                }
                done += n as u64;
            }
        }
        out.push(Placed {
            start: a.start,
            end: a.end,
            at,
        });
    }
    Ok(out)
}

/// Maps `len` bytes of read-write private anonymous memory at `start`, or where nothing
/// of this process or of the tree's recorded layout (`plan.avoid`) is, and returns where.
pub(crate) fn map_area(
    start: u64,
    len: u64,
    backing: &super::cow::Backing,
    plan: &CowPlan,
    own: &mut Option<Vec<(u64, u64)>>,
) -> Result<u64> {
    let file = match &backing.file {
        Some((path, offset)) => Some((open_path(path, libc::O_RDONLY)?, *offset)),
        None => None,
    };
    let (fd, offset, anon) = match &file {
        Some((f, o)) => (f.as_raw_fd(), *o as libc::off_t, 0),
        None => (-1, 0, libc::MAP_ANONYMOUS),
    };
    let noreserve = backing.noreserve;
    let map = |at: u64| {
        // SAFETY: MAP_FIXED_NOREPLACE never replaces a mapping; the fd (if any) is open
        // across the call.
        unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE
                    | anon
                    | libc::MAP_FIXED_NOREPLACE
                    | if noreserve { libc::MAP_NORESERVE } else { 0 },
                fd,
                offset,
            )
        }
    };
    if map(start) as u64 == start {
        return Ok(start);
    }
    let used = match own {
        Some(u) => u,
        None => {
            let maps = maps::parse(
                &std::fs::read_to_string("/proc/self/maps").context("reading /proc/self/maps")?,
            )?;
            own.insert(maps.iter().map(|m| (m.start, m.end)).collect())
        }
    };
    let mut all: Vec<(u64, u64)> = used.iter().chain(&plan.avoid).copied().collect();
    all.sort_unstable();
    let at = gap_below(&all, len, 0x7e00_0000_0000)
        .ok_or_else(|| anyhow!("no free address range of {len} bytes for a shared area"))?;
    if map(at) as u64 != at {
        return Err(errno_err(format!("mapping a shared area at {at:#x}")));
    }
    used.push((at, at + len));
    Ok(at)
}

/// Where free ranges for the restorer are looked for, downward: below the usual mmap
/// base, away from stacks.
pub(super) const GAP_TOP: u64 = 0x7e00_0000_0000;

/// The highest start below `top` of a free range of `len` bytes, a guard megabyte from
/// every range in `used` (sorted).
pub(super) fn gap_below(used: &[(u64, u64)], len: u64, top: u64) -> Option<u64> {
    const GUARD: u64 = 1 << 20;
    let mut candidate = top.checked_sub(len)? & !0xfff;
    loop {
        let end = candidate + len;
        match used
            .iter()
            .find(|&&(s, e)| s < end + GUARD && e + GUARD > candidate)
        {
            None => return Some(candidate),
            Some(&(s, _)) => {
                if s < len + 2 * GUARD + 0x1000_0000 {
                    return None;
                }
                candidate = (s - len - GUARD) & !0xfff;
            }
        }
    }
}

/// Forks the children of process `idx` at their pids, each running [`child_main`];
/// they inherit its shared areas (`placed`).
fn fork_children(ctx: &Ctx, idx: usize, placed: &[Placed]) -> Result<()> {
    let me = &ctx.m.processes[idx];
    for (i, c) in ctx.m.processes.iter().enumerate().skip(1) {
        if c.ppid != me.pid || i == idx {
            continue;
        }
        // SAFETY: a restoring process is single-threaded.
        match unsafe { warmstart_launcher::fork_with_pid(c.pid) } {
            Ok(0) => {
                let code = match child_main(ctx, i, placed) {
                    Ok(never) => match never {},
                    Err(e) => fail(ctx.reports[i].raw(), e),
                };
                // SAFETY: `_exit` ends the forked child without unwinding into the parent's
                // stack frames or running atexit handlers.
                unsafe { libc::_exit(code) }
            }
            Ok(_) => {}
            Err(e) => {
                let taken = matches!(&e, warmstart_launcher::LaunchError::Sys { errno, .. }
                    if *errno == nix::errno::Errno::EEXIST);
                bail!(
                    "creating process {} ({}), child of {}: {e}{}",
                    c.pid,
                    c.comm,
                    me.pid,
                    if taken { " (the pid is taken)" } else { "" }
                );
            }
        }
    }
    Ok(())
}

/// A process of the tree other than the root, just forked at its pid.
fn child_main(ctx: &Ctx, idx: usize, inherited: &[Placed]) -> Result<std::convert::Infallible> {
    let p = &ctx.m.processes[idx];
    own_ids(p)?;
    // A session leader takes its terminal before it forks: its children inherit it.
    crate::fds::pty::take_ctty(p, &ctx.inherited.ptys)?;
    let placed = place_shared(ctx, idx, inherited)?;
    fork_children(ctx, idx, &placed)?;
    finish(ctx, idx, &placed)
}

/// Session and group of `p` as far as it can set them alone, before it forks (its
/// children inherit them): a session leader calls `setsid`, a group leader makes its
/// group. Joining another process's group waits until every process exists
/// ([`join_group`]).
fn own_ids(p: &Process) -> Result<()> {
    if p.sid == p.pid {
        // SAFETY: no arguments; acts on this process only.
        if unsafe { libc::setsid() } < 0 {
            return Err(errno_err(format!("setsid of process {}", p.pid)));
        }
    // SAFETY: integer arguments only; acts on this process only.
    } else if p.pgid == p.pid && unsafe { libc::setpgid(0, 0) } < 0 {
        return Err(errno_err(format!("setpgid of process {}", p.pid)));
    }
    Ok(())
}

/// Joins the process group `p` was in, once its leader exists. A group whose leader is
/// not in the snapshot is the root's (checked by the monitor beforehand).
fn join_group(m: &Manifest, p: &Process) -> Result<()> {
    if p.pgid == p.pid {
        return Ok(());
    }
    let target = if m.processes.iter().any(|q| q.pid == p.pgid) {
        p.pgid
    } else {
        // SAFETY: integer argument only.
        unsafe { libc::getpgid(m.processes[0].pid) }
    };
    // SAFETY: integer arguments only; acts on this process only.
    if unsafe { libc::getpgid(0) } != target && unsafe { libc::setpgid(0, target) } < 0 {
        return Err(errno_err(format!(
            "joining process {} to process group {}",
            p.pid, p.pgid
        )));
    }
    Ok(())
}

/// The rest of process `idx`'s restore once its children exist: wait for the whole
/// tree, join its group, then fds, cwd, limits, and the jump into its restorer (a zombie
/// exits instead).
fn finish(ctx: &Ctx, idx: usize, placed: &[Placed]) -> Result<std::convert::Infallible> {
    let m = ctx.m;
    // Every shared area is written.
    drop(ctx.cow_fd.take());
    let lazy = ctx.lazy.get(idx).map(Vec::as_slice).unwrap_or_default();
    let p = &m.processes[idx];
    let report = ctx.reports[idx].raw();
    drop(ctx.barrier.1.take());
    // Other processes' status pipes and gates, inherited by fork, are not ours to use.
    for (i, (r, g)) in ctx.reports.iter().zip(&ctx.gates).enumerate() {
        if i != idx {
            drop(r.take());
            drop(g.take());
        }
    }
    if let Some(barrier) = ctx.barrier.0.take() {
        let mut b = 0u8;
        // SAFETY: `b` is one live local byte and the length is 1; `barrier` is our copy of
        // the barrier's read end, open until the end of this block.
        while unsafe { libc::read(barrier.as_raw_fd(), (&mut b as *mut u8).cast(), 1) } != 0 {
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
    }
    join_group(m, p)?;
    // Every group exists now: a terminal's foreground group can be set.
    crate::fds::pty::after_groups(m, p, &ctx.inherited.ptys)?;
    if let Some(status) = p.zombie {
        let Some(f) = ctx.reports[idx].take() else {
            bail!("the status pipe of process {} is gone", p.pid);
        };
        let mut f = std::fs::File::from(f);
        if f.write_all(&[MSG_ZOMBIE]).is_err() {
            // The pipe is closed with `f`: nothing left to report on; the monitor sees
            // the exit without a report.
            // SAFETY: `_exit` ends the process at once, without unwinding.
            unsafe { libc::_exit(1) };
        }
        drop(f);
        become_zombie(p, status);
    }
    settle_zombie_children(m, p)?;
    let places = crate::fds::late_places(m, p);
    let parked = ctx.late_sock.raw() >= 0;
    let stdio: Vec<RawFd> = ctx.stdio.iter().map(TreeFd::raw).collect();
    crate::fds::install(m, p, &stdio, ctx.high, &ctx.inherited, parked)?;
    grow_fd_table(p.fd_table_size, report)?;
    // Our copies of the caller's stdio (`dup_high_or_null`): `install` has placed them
    // where they go.
    for fd in &ctx.stdio {
        drop(fd.take());
    }
    if p.root != "/" && !std::path::Path::new(&p.root).is_dir() {
        bail!(
            "process {} ran chrooted in {}, which is no longer a directory: restore it there",
            p.pid,
            p.root
        );
    }
    let cwd = cstr(&p.cwd)?;
    // SAFETY: `cwd` is a NUL-terminated path that lives across the call.
    if unsafe { libc::chdir(cwd.as_ptr()) } < 0 {
        return Err(errno_err(format!("chdir({})", p.cwd)));
    }
    // SAFETY: integer argument only.
    unsafe { libc::umask(p.umask as libc::mode_t) };
    // SAFETY: integer argument only; acts on this process only.
    if unsafe { libc::personality(p.personality as libc::c_ulong) } < 0 {
        return Err(errno_err(format!("personality({:#x})", p.personality)));
    }
    let mut fds = open_mapping_fds(p, ctx.high, &ctx.inherited)?;
    // SHM_DEST: the mode bit of a segment removed while attached.
    const SHM_DEST: u32 = 0o1000;
    fds.sysv_rmid = m
        .namespaces
        .ipc
        .iter()
        .flat_map(|i| &i.shm)
        .filter(|s| s.perm.mode & SHM_DEST != 0)
        .map(|s| s.perm.id)
        .collect();
    fds.premapped = p
        .vmas
        .iter()
        .map(|v| {
            placed
                .iter()
                .find(|a| a.start == v.start && a.end == v.end)
                .map(|a| a.at)
        })
        .collect();
    // Shared memory objects and files this process does not map are not its to keep.
    for (&id, &fd) in &ctx.inherited.shmem {
        if !p.vmas.iter().any(|v| v.kind == VmaKind::Shmem { id }) {
            // SAFETY: `fd` is an inherited shared memory object this process does not map:
            // nothing here refers to it after this.
            unsafe { libc::close(fd) };
        }
    }
    for (&id, &fd) in &ctx.inherited.files {
        if !p.vmas.iter().any(|v| v.kind == VmaKind::SharedFile { id }) {
            // SAFETY: an fd inherited from the root that nothing else here uses.
            unsafe { libc::close(fd) };
        }
    }
    set_rlimits(p)?;

    let own = maps::parse(
        &std::fs::read_to_string("/proc/self/maps").context("reading /proc/self/maps")?,
    )?;
    // A parked process's way to its time namespace files (see program::Late::proc_dir),
    // opened while /proc is still reachable (before a chroot).
    let late_timens = match ctx.late_sock.raw() {
        -1 => None,
        _ => {
            let (timens, dir) = match m.processes.first() {
                Some(root) if root.pid != p.pid => (
                    program::LateTimeNs::Join(root.pid),
                    format!("/proc/{}", root.pid),
                ),
                _ => (program::LateTimeNs::Create, "/proc/self".to_owned()),
            };
            let fd = open_path(&dir, libc::O_PATH | libc::O_DIRECTORY)?;
            Some((timens, above(fd, ctx.high)?))
        }
    };
    let late = (ctx.late_sock.raw() >= 0).then(|| {
        let (timens, proc_dir) = late_timens.expect("opened for every parked process");
        let wants_stdio = !places.is_empty();
        // Not needed when it has no stdio to receive; else its number goes to the program.
        let sock = if wants_stdio {
            ctx.late_sock.raw()
        } else {
            drop(ctx.late_sock.take());
            -1
        };
        program::Late {
            sock: wants_stdio.then_some(sock),
            places,
            epoll_adds: crate::fds::late_epoll_targets(m, p),
            n_given: 3 + crate::fds::inet::recorded_listeners(m).len(),
            timerfds: crate::fds::late_timerfds(m, p),
            timens,
            proc_dir,
        }
    });
    let late = late.as_ref();
    // A vdso that is not the snapshot's: the snapshot's calls go to it through a proxy.
    let mut host_vdso = None;
    if let Some(proxy) = super::vdso_proxy::prepare(m, p, &own)? {
        let i = p
            .vmas
            .iter()
            .position(|v| v.kind == VmaKind::Vdso)
            .expect("the proxy is made for a [vdso] mapping");
        fds.vma_fds[i] = Some(above(proxy.fd, ctx.high)?);
        fds.host_vdso_at = Some(proxy.host_at);
        host_vdso = Some((proxy.host_at, proxy.host_at + proxy.len));
    }
    let len = program::build(p, &own, &fds, 0, 0, lazy, late)?.0.map_len() as u64;
    let base = find_gap(&own, p, host_vdso, len)?;
    let (b, uffd_slot, timens_text) = program::program(p, &own, &fds, base, len, lazy, late)?;
    let listing = program::LISTING
        .load(std::sync::atomic::Ordering::Relaxed)
        .then(|| b.to_string());
    let blob = b.build(base);
    drop(b);
    // SAFETY: a new private anonymous mapping at `base`, which `find_gap` chose free in our
    // layout; MAP_FIXED_NOREPLACE fails rather than replace anything that is there.
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
    // SAFETY: the mapping at `base` is writable and `blob.map_len()` bytes long, which is
    // `blob.bytes.len()` rounded up to a page; the source is a different (heap) allocation.
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
        late: late.is_some(),
        wants_stdio: late.is_some_and(|l| l.sock.is_some()),
        timens_text: timens_text.map(|d| blob.addr_of(d)),
        listing,
    };
    // Last of the paths: every file above was opened by its path as seen from the host's
    // root (how /proc showed it at the dump); the cwd, entered above, lies inside. After
    // the last read of /proc (the new root may have none), before the last message on
    // the status pipe (a failure after it could no longer be reported there).
    if p.root != "/" {
        let root = cstr(&p.root)?;
        // SAFETY: a NUL-terminated path that lives across the call.
        if unsafe { libc::chroot(root.as_ptr()) } < 0 {
            return Err(errno_err(format!("chroot({})", p.root)));
        }
    }
    let mut msg = vec![MSG_BLOB];
    msg.extend_from_slice(&serde_json::to_vec(&info)?);
    // The last message: the pipe is closed after it.
    let Some(pipe) = ctx.reports[idx].take() else {
        bail!("the status pipe of process {} is gone", p.pid);
    };
    if std::fs::File::from(pipe).write_all(&msg).is_err() {
        // The monitor is gone or stopped reading: nothing to report on.
        // SAFETY: `_exit` ends the process at once, without unwinding.
        unsafe { libc::_exit(1) };
    }
    if let Some(gate) = ctx.gates[idx].take() {
        // Held until the monitor has seized us: the restorer's traps need a tracer.
        let mut b = 0u8;
        // SAFETY: `b` is one live local byte and the length is 1; `gate` is this process's
        // gate read end, open until the end of this block.
        let n = unsafe { libc::read(gate.as_raw_fd(), (&mut b as *mut u8).cast(), 1) };
        drop(gate);
        if n != 1 {
            // SAFETY: `_exit` ends the process at once, without unwinding or atexit
            // handlers.
            unsafe { libc::_exit(125) };
        }
    }
    unregister_rseq();
    // SAFETY: the blob is mapped at `base` and built for it; it never returns here.
    unsafe { warmstart_parasite::jump(blob.entry, blob.program, blob.stack_top) }
}

/// Exits with `status`, a raw wait status as the parent's `wait` will report it, showing
/// in `/proc` what the zombie `p` showed: its name, which signals it ignored or caught,
/// its blocked mask, nothing pending.
fn become_zombie(p: &Process, status: i32) -> ! {
    let sig = libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status));
    let mut comm = p.comm.as_bytes().to_vec();
    comm.truncate(15);
    comm.push(0);
    // SAFETY: raw syscalls on this single-threaded process with buffers that live across
    // each call; nothing here allocates after the name is built.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, comm.as_ptr());
        for (i, sa) in p.sigactions.iter().enumerate() {
            let s = i as i32 + 1;
            if s == libc::SIGKILL || s == libc::SIGSTOP || Some(s) == sig {
                continue;
            }
            let raw: [u64; 4] = [sa.handler, 0, 0, 0];
            libc::syscall(libc::SYS_rt_sigaction, s, raw.as_ptr(), 0usize, 8usize);
        }
        // Signals this restoring process got meanwhile are not the zombie's: drained
        // with everything blocked, then the recorded mask.
        let all: u64 = !0;
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &all,
            0usize,
            8usize,
        );
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        while libc::syscall(libc::SYS_rt_sigtimedwait, &all, 0usize, &zero, 8usize) > 0 {}
        let mut mask = p.zombie_sigmask;
        if let Some(s) = sig {
            mask &= !(1u64 << (s - 1));
        }
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &mask,
            0usize,
            8usize,
        );
        if let Some(sig) = sig {
            // No core file: its flag in the status is not reproduced. The hard limit
            // stays (it cannot be raised again without CAP_SYS_RESOURCE).
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_CORE, &mut lim);
            lim.rlim_cur = 0;
            libc::setrlimit(libc::RLIMIT_CORE, &lim);
            let dfl: [u64; 4] = [0; 4];
            libc::syscall(libc::SYS_rt_sigaction, sig, dfl.as_ptr(), 0usize, 8usize);
            // Sent while blocked and then unblocked, the signal is dequeued on the way
            // out as it is for a process killed by another; sent unblocked to itself it
            // would take the kernel's short cut and stay pending in the zombie (ShdPnd).
            let unblock: u64 = 1 << (sig - 1);
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_BLOCK,
                &unblock,
                0usize,
                8usize,
            );
            libc::kill(libc::getpid(), sig);
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_UNBLOCK,
                &unblock,
                0usize,
                8usize,
            );
        }
        libc::_exit(libc::WEXITSTATUS(status))
    }
}

/// Waits (without reaping) until every zombie child of `p` has exited, then drops the
/// SIGCHLD their exits queued: the app saw those long ago (its own pending signals are
/// restored from the snapshot).
fn settle_zombie_children(m: &Manifest, p: &Process) -> Result<()> {
    let zombies: Vec<i32> = m
        .processes
        .iter()
        .filter(|c| c.ppid == p.pid && c.zombie.is_some() && c.pid != p.pid)
        .map(|c| c.pid)
        .collect();
    if zombies.is_empty() {
        return Ok(());
    }
    for z in zombies {
        // SAFETY: `siginfo_t` is a plain C struct; all-zero bytes are valid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a live, writable `siginfo_t`; WNOWAIT leaves the zombie child
        // unreaped.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                z as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r < 0 {
            return Err(errno_err(format!("waiting for zombie child {z} to exit")));
        }
    }
    // SAFETY: `sigset_t` is a plain C bit array; all-zero bytes are valid.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live, writable `sigset_t`.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
    }
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `set` and `zero` are live locals the kernel only reads; the siginfo is not
    // wanted (null).
    while unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) } > 0 {}
    Ok(())
}

fn dup_high(fd: RawFd, min: RawFd) -> Result<RawFd> {
    // SAFETY: integer arguments only; the duplicate is returned to the caller, who owns it.
    let r = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) };
    if r < 0 {
        return Err(errno_err(format!("duplicating fd {fd}")));
    }
    Ok(r)
}

/// A copy of the caller's stdio fd `fd` (or of /dev/null where the caller has none).
fn dup_high_or_null(fd: RawFd, min: RawFd) -> Result<RawFd> {
    // SAFETY: F_GETFD only asks whether the number is an open fd.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
        return dup_high(fd, min);
    }
    let null = open_path("/dev/null", libc::O_RDWR)?;
    dup_high(null.as_raw_fd(), min)
}

/// Closes every fd but `keep` (`close_range` over the gaps: listing `/proc/self/fd`
/// would `opendir`, which calls glibc's malloc).
fn close_all_except(keep: &[RawFd]) -> Result<()> {
    let mut keep: Vec<u32> = keep.iter().map(|&fd| fd as u32).collect();
    keep.sort_unstable();
    let mut from = 0u32;
    for fd in keep.into_iter().chain(std::iter::once(u32::MAX)) {
        if fd > from {
            // SAFETY: closes fds only; none of them is used by Rust code in this process.
            let r = unsafe { libc::syscall(libc::SYS_close_range, from, fd - 1, 0u32) };
            if r < 0 {
                return Err(errno_err(format!("close_range({from}, {})", fd - 1)));
            }
        }
        from = fd.saturating_add(1);
    }
    Ok(())
}

/// Gives this restoring process an fd table no larger than the fds it holds need.
///
/// It started with a copy of warmstart's, which is as large as the highest fd warmstart
/// ever had (one fd >= 64 inherited from warmstart's caller makes it 256 slots), and the
/// kernel never shrinks a table: the app would show that `FDSize`. `unshare(CLONE_FILES)`
/// copies the table, sized by the open fds, but only while another task shares it; so a
/// helper is forked sharing it (`CLONE_FILES`, a plain fork otherwise: no ptrace event,
/// and its pid is gone before the tree's pids are taken), the table is unshared, the
/// helper killed and reaped, and its SIGCHLD dropped (it is not the app's).
fn shrink_fd_table() -> Result<()> {
    // SAFETY: a raw clone without CLONE_VM and with a null stack is a fork whose child
    // only loops in pause(2) until it is killed; it runs no Rust code that could take a
    // lock (this process is single-threaded).
    let child = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_FILES | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if child == 0 {
        loop {
            // SAFETY: pause takes no arguments.
            unsafe { libc::syscall(libc::SYS_pause) };
        }
    }
    if child < 0 {
        return Err(errno_err("forking a helper that shares the fd table"));
    }
    let child = child as libc::pid_t;
    // SAFETY: plain syscalls on our own child; `status` outlives waitpid.
    let unshared = unsafe { libc::unshare(libc::CLONE_FILES) };
    let err = std::io::Error::last_os_error();
    // SAFETY: `child` is our own child (the helper forked above), not yet reaped, so the
    // pid cannot name another process; `status` is a live local.
    unsafe {
        libc::kill(child, libc::SIGKILL);
        let mut status = 0;
        while libc::waitpid(child, &mut status, 0) < 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
        {}
    }
    drop_sigchld();
    if unshared < 0 {
        return Err(anyhow::anyhow!("unshare(CLONE_FILES): {err}"));
    }
    Ok(())
}

/// This process's fd table size (`FDSize`), 0 if unreadable.
fn own_fd_table_size() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("FDSize:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Grows the fd table to `size` slots, as the app's was (see [`shrink_fd_table`]): an
/// fd at `size / 2`, duplicated from `any` and closed again. (Beyond its 64 embedded
/// slots the kernel sizes a table for `n` slots as 128 × the power of two above
/// `n / 128`; a table of 128 × 2^k slots is what holding fd 64 × 2^k asks for.)
fn grow_fd_table(size: u32, any: RawFd) -> Result<()> {
    if size <= 64 {
        return Ok(());
    }
    // SAFETY: F_DUPFD_CLOEXEC of an fd of ours; the copy is owned right below.
    let fd = unsafe { libc::fcntl(any, libc::F_DUPFD_CLOEXEC, (size / 2) as i32) };
    if fd < 0 {
        // Above RLIMIT_NOFILE (the app lowered it after the table grew): the table
        // cannot be grown now; what /proc shows of it is all that differs.
        let e = std::io::Error::last_os_error();
        if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EMFILE)) {
            return Ok(());
        }
        return Err(anyhow::anyhow!("growing the fd table to {size} slots: {e}"));
    }
    // SAFETY: a fresh fd nothing else owns; dropping it closes it (the table stays grown).
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}

/// Consumes a pending SIGCHLD (every signal is blocked in a restoring process).
fn drop_sigchld() {
    // SAFETY: sigset operations on a local set; a zero timeout never blocks.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        while libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) > 0 {}
    }
}

fn open_path(path: &str, flags: i32) -> Result<OwnedFd> {
    let c = cstr(path)?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, 0) };
    if fd < 0 {
        return Err(errno_err(format!("opening {path}")));
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fd` moved above `high` (when it is below): the number the restorer program uses,
/// which the program closes (the raw integer is the program's from here).
fn above(fd: OwnedFd, high: RawFd) -> Result<RawFd> {
    if fd.as_raw_fd() >= high {
        return Ok(fd.into_raw_fd());
    }
    dup_high(fd.as_raw_fd(), high)
}

/// One fd per mapped file (and the executable), above the app's fds; the program closes them.
fn open_mapping_fds(
    p: &Process,
    high: RawFd,
    inherited: &crate::fds::Inherited,
) -> Result<ProgramFds> {
    let mut by_path: std::collections::HashMap<(String, bool), RawFd> =
        std::collections::HashMap::new();
    let mut vma_fds = Vec::with_capacity(p.vmas.len());
    for v in &p.vmas {
        if let VmaKind::Shmem { id } = v.kind {
            vma_fds.push(inherited.shmem.get(&id).copied());
            continue;
        }
        if let VmaKind::SharedFile { id } = v.kind {
            vma_fds.push(inherited.files.get(&id).copied());
            continue;
        }
        let VmaKind::File { file } = &v.kind else {
            vma_fds.push(None);
            continue;
        };
        let rw = v.shared && v.prot & warmstart_snapshots::model::PROT_WRITE != 0;
        let fd = match by_path.get(&(file.path.clone(), rw)) {
            Some(&fd) => fd,
            None => {
                let fd = open_path(&file.path, if rw { libc::O_RDWR } else { libc::O_RDONLY })?;
                let fd = above(fd, high)?;
                by_path.insert((file.path.clone(), rw), fd);
                fd
            }
        };
        vma_fds.push(Some(fd));
    }
    let exe_fd = above(open_path(&p.exe.path, libc::O_RDONLY)?, high)?;
    Ok(ProgramFds {
        vma_fds,
        host_vdso_at: None,
        exe_fd,
        premapped: Vec::new(),
        sysv_rmid: Vec::new(),
    })
}

fn set_rlimits(p: &Process) -> Result<()> {
    for r in &p.rlimits {
        let lim = libc::rlimit64 {
            rlim_cur: r.cur,
            rlim_max: r.max,
        };
        // SAFETY: `lim` is a live `rlimit64` the kernel only reads; the old limit is not
        // wanted (null).
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

/// An address range of `len` bytes free in both our layout and the snapshot's (and
/// apart from `also`, where this host's vdso goes).
fn find_gap(own: &[MapEntry], p: &Process, also: Option<(u64, u64)>, len: u64) -> Result<u64> {
    let mut used: Vec<(u64, u64)> = own.iter().map(|m| (m.start, m.end)).collect();
    used.extend(p.vmas.iter().map(|v| (v.start, v.end)));
    used.extend(also);
    used.sort_unstable();
    gap_below(&used, len, GAP_TOP)
        .ok_or_else(|| anyhow!("no free address range of {len} bytes for the restorer"))
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
    // SAFETY: reads the thread pointer at fs:0 (x86_64 TLS ABI: the TCB's first word points
    // to itself); touches no memory of ours and no stack.
    unsafe { std::arch::asm!("mov {}, fs:0", out(reg) tp) };
    let area = (tp as i64 + offset as i64) as u64;
    // The registered length is glibc's area size (32 bytes), which may exceed the
    // advertised feature size.
    for len in [size.max(32), size] {
        // SAFETY: integer arguments only: unregistering names the area glibc registered
        // (`area`, `len`, `RSEQ_SIG` must match), which the kernel only compares.
        if unsafe { libc::syscall(libc::SYS_rseq, area, len, RSEQ_FLAG_UNREGISTER, RSEQ_SIG) } == 0
        {
            return;
        }
    }
}

/// The instance's own instance-private directories (a fresh tmpfs each), refilled with
/// the files the process had there.
fn recreate_private_files(m: &Manifest) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    crate::private_dirs::Mounts::prepare().mount();
    for f in m.processes.iter().flat_map(|p| &p.private_files) {
        std::fs::write(&f.path, &f.data).with_context(|| format!("recreating {}", f.path))?;
        std::fs::set_permissions(&f.path, std::fs::Permissions::from_mode(f.mode & 0o7777))
            .with_context(|| format!("chmod of {}", f.path))?;
    }
    Ok(())
}
