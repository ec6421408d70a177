//! Running the parasite inside a frozen target to read what only the process itself can
//! see: signal handlers, sigaltstack, the tid address, `brk`, the dumpable flag.
//!
//! No byte of the target's code is changed: single syscalls (the `mmap` of the parasite
//! area and its `munmap`) run at an existing `syscall` instruction of the target's vdso
//! under `PTRACE_SYSCALL`, which stops at the syscall's exit before the next instruction;
//! the parasite program itself runs in the area it was copied to and ends with `int3`.
//! Afterwards the thread's registers are its resume registers (syscall restart applied),
//! exactly what a restore would give it.

use anyhow::{bail, Context, Result};
use warmstart_parasite::{Arg, ProgramBuilder, Status};
use warmstart_snapshots::model::{reg, AltStack, Itimer, SigAction};

use super::freeze::StopKind;
use super::threads::resume_regs;
use crate::sys::maps::MapEntry;
use crate::sys::ptrace::{self, Regs, Stop};
use crate::sys::remote;

pub struct Inside {
    pub sigactions: Vec<SigAction>,
    pub sigaltstack: AltStack,
    pub tid_address: u64,
    pub brk: u64,
    pub dumpable: i32,
    pub securebits: u32,
    /// `PR_GET_PDEATHSIG` of the thread the parasite ran in.
    pub pdeathsig: i32,
    pub child_subreaper: bool,
    pub thp_disable: bool,
    pub itimers: [Itimer; 3],
    /// (interval, value) in ns of each POSIX timer asked for, in order.
    pub posix_timers: Vec<(u64, u64)>,
}

const PTRACE_GET_SYSCALL_INFO: libc::c_uint = 0x420e;
const SYSCALL_INFO_ENTRY: u8 = 1;
pub(crate) const SYSCALL_INFO_EXIT: u8 = 2;

pub(crate) fn syscall_info_op(tid: i32) -> Result<u8> {
    let mut buf = [0u8; 88];
    // SAFETY: GET_SYSCALL_INFO writes at most `addr` (= buf.len(), 88) bytes of
    // ptrace_syscall_info at `data`, which points at `buf`, a live local of that size.
    let r = unsafe { libc::ptrace(PTRACE_GET_SYSCALL_INFO, tid, buf.len(), buf.as_mut_ptr()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("PTRACE_GET_SYSCALL_INFO");
    }
    Ok(buf[0])
}

/// Runs one syscall in the stopped thread at `insn` (a `syscall` instruction) and returns
/// its result, leaving the thread at the syscall's exit stop.
fn remote_syscall(tid: i32, base: &Regs, insn: u64, nr: i64, args: [u64; 6]) -> Result<i64> {
    remote_syscall_with(tid, base, insn, nr, args, ptrace::wait)
}

/// How long [`syscall_in`] waits for each stop of the thread.
const SYSCALL_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs syscall `nr` in thread `tid` of process `pid`, held at a ptrace stop, at the
/// `syscall` instruction of its vdso, with every signal blocked meanwhile (they stay
/// pending), each wait for its stops bounded. The thread is left at the syscall's exit
/// stop with the registers `resume` (those it goes on from: see
/// [`super::threads::resume_regs`]) and its own signal mask. Returns the result.
pub fn syscall_in(pid: i32, tid: i32, resume: &Regs, nr: i64, args: [u64; 6]) -> Result<i64> {
    let maps =
        crate::sys::maps::read_maps(pid).with_context(|| format!("reading /proc/{pid}/maps"))?;
    let insn = vdso_syscall(pid, &maps)?;
    let mask = ptrace::get_sigmask(tid).context("PTRACE_GETSIGMASK")?;
    ptrace::set_sigmask(tid, !0).context("PTRACE_SETSIGMASK")?;
    let res = remote_syscall_with(tid, resume, insn, nr, args, |t| {
        ptrace::wait_timeout(t, SYSCALL_STOP_TIMEOUT)
    });
    let regs = ptrace::set_regs(tid, resume).context("restoring the thread's registers");
    let restored = ptrace::set_sigmask(tid, mask).context("restoring the thread's signal mask");
    let ret = res?;
    regs?;
    restored?;
    Ok(ret)
}

fn remote_syscall_with(
    tid: i32,
    base: &Regs,
    insn: u64,
    nr: i64,
    args: [u64; 6],
    wait: impl Fn(i32) -> std::io::Result<Stop>,
) -> Result<i64> {
    let mut r = *base;
    r[reg::RIP] = insn;
    r[reg::RAX] = nr as u64;
    r[reg::ORIG_RAX] = u64::MAX;
    r[reg::RDI] = args[0];
    r[reg::RSI] = args[1];
    r[reg::RDX] = args[2];
    r[reg::R10] = args[3];
    r[reg::R8] = args[4];
    r[reg::R9] = args[5];
    ptrace::set_regs(tid, &r)?;
    let mut entered = false;
    loop {
        ptrace::syscall(tid, 0)?;
        match wait(tid)? {
            Stop::Syscall => match syscall_info_op(tid)? {
                SYSCALL_INFO_ENTRY => entered = true,
                // A thread held at a seccomp stop first reports the exit of the call it
                // was trapped in (skipped: orig_rax is -1); ours comes after its entry.
                SYSCALL_INFO_EXIT if entered => return Ok(ptrace::get_regs(tid)?[reg::RAX] as i64),
                _ => {}
            },
            // The freeze's PTRACE_INTERRUPT, still pending when the thread reached its
            // warm-point trap at the same moment, stops it at its first resume: go on.
            Stop::EventStop(libc::SIGTRAP) => {}
            Stop::Exited(_) | Stop::Killed(_) => {
                bail!("the process died while a syscall was injected")
            }
            other => bail!("unexpected stop while injecting syscall {nr}: {other:?}"),
        }
    }
}

/// Address of a `syscall` instruction (0f 05) in the target's vdso.
fn vdso_syscall(pid: i32, maps: &[MapEntry]) -> Result<u64> {
    let v = maps
        .iter()
        .find(|m| m.name == "[vdso]")
        .context("the process has no [vdso]")?;
    let mut bytes = vec![0u8; (v.end - v.start) as usize];
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    std::os::unix::fs::FileExt::read_exact_at(&mem, &mut bytes, v.start)
        .context("reading the target's vdso")?;
    let off = bytes
        .windows(2)
        .position(|w| w == [0x0f, 0x05])
        .context("no syscall instruction in the target's vdso")?;
    Ok(v.start + off as u64)
}

fn read_remote(pid: i32, addr: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    remote::read(pid, addr, &mut buf).context("reading parasite results")?;
    Ok(buf)
}

pub fn collect_inside(
    pid: i32,
    tid: i32,
    raw: &Regs,
    kind: StopKind,
    maps: &[MapEntry],
    timer_ids: &[i32],
) -> Result<Inside> {
    // A signal pending for the thread (a child's SIGCHLD, say) would be delivered as
    // soon as it runs our syscalls: block them all meanwhile, so they stay pending.
    let mask = ptrace::get_sigmask(tid).context("PTRACE_GETSIGMASK")?;
    ptrace::set_sigmask(tid, !0).context("PTRACE_SETSIGMASK")?;
    let res = collect_masked(pid, tid, raw, kind, maps, timer_ids);
    let restored = ptrace::set_sigmask(tid, mask).context("restoring the target's signal mask");
    let inside = res?;
    restored?;
    Ok(inside)
}

fn collect_masked(
    pid: i32,
    tid: i32,
    raw: &Regs,
    kind: StopKind,
    maps: &[MapEntry],
    timer_ids: &[i32],
) -> Result<Inside> {
    let insn = vdso_syscall(pid, maps)?;
    let mut b = ProgramBuilder::new();
    let sigactions = b.data_zeroed(64 * 32);
    for sig in 1..=64u64 {
        b.syscall(
            libc::SYS_rt_sigaction,
            &[
                Arg::Imm(sig),
                Arg::Imm(0),
                sigactions.at((sig - 1) * 32),
                Arg::Imm(8),
            ],
            format!("rt_sigaction({sig})"),
        );
    }
    let ss = b.data_zeroed(24);
    b.syscall(
        libc::SYS_sigaltstack,
        &[Arg::Imm(0), ss.arg()],
        "sigaltstack",
    );
    let tid_addr = b.data_zeroed(8);
    b.syscall(
        libc::SYS_prctl,
        &[Arg::Imm(libc::PR_GET_TID_ADDRESS as u64), tid_addr.arg()],
        "prctl(PR_GET_TID_ADDRESS)",
    );
    let brk = b.syscall_saved(libc::SYS_brk, &[Arg::Imm(0)], "brk(0)");
    let dumpable = b.syscall_saved(
        libc::SYS_prctl,
        &[Arg::Imm(libc::PR_GET_DUMPABLE as u64)],
        "prctl(PR_GET_DUMPABLE)",
    );
    let securebits = b.syscall_saved(
        libc::SYS_prctl,
        &[Arg::Imm(libc::PR_GET_SECUREBITS as u64)],
        "prctl(PR_GET_SECUREBITS)",
    );
    let pdeathsig = b.data_zeroed(8);
    b.syscall(
        libc::SYS_prctl,
        &[Arg::Imm(libc::PR_GET_PDEATHSIG as u64), pdeathsig.arg()],
        "prctl(PR_GET_PDEATHSIG)",
    );
    let subreaper = b.data_zeroed(8);
    b.syscall(
        libc::SYS_prctl,
        &[
            Arg::Imm(libc::PR_GET_CHILD_SUBREAPER as u64),
            subreaper.arg(),
        ],
        "prctl(PR_GET_CHILD_SUBREAPER)",
    );
    let thp = b.syscall_saved(
        libc::SYS_prctl,
        &[
            Arg::Imm(libc::PR_GET_THP_DISABLE as u64),
            Arg::Imm(0),
            Arg::Imm(0),
            Arg::Imm(0),
            Arg::Imm(0),
        ],
        "prctl(PR_GET_THP_DISABLE)",
    );
    let itimers = b.data_zeroed(3 * 32);
    for which in 0..3u64 {
        b.syscall(
            libc::SYS_getitimer,
            &[Arg::Imm(which), itimers.at(which * 32)],
            format!("getitimer({which})"),
        );
    }
    let timers = b.data_zeroed(timer_ids.len().max(1) * 32);
    for (i, id) in timer_ids.iter().enumerate() {
        b.syscall(
            libc::SYS_timer_gettime,
            &[Arg::Imm(*id as u64), timers.at(i as u64 * 32)],
            format!("timer_gettime({id})"),
        );
    }
    b.trap();
    let len = b.build(0).map_len() as u64;

    let prot = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    let base = remote_syscall(
        tid,
        raw,
        insn,
        libc::SYS_mmap,
        [0, len, prot, flags, u64::MAX, 0],
    )?;
    if (-4095..0).contains(&base) {
        bail!(
            "mmap of the parasite area in the target failed: {}",
            std::io::Error::from_raw_os_error(-base as i32)
        );
    }
    let base = base as u64;
    let result = (|| -> Result<Inside> {
        let blob = b.build(base);
        remote::write(pid, base, &blob.bytes).context("copying the parasite into the target")?;
        let mut r = *raw;
        r[reg::RIP] = blob.entry;
        r[reg::RDI] = blob.program;
        r[reg::RSP] = blob.stack_top;
        r[reg::ORIG_RAX] = u64::MAX;
        ptrace::set_regs(tid, &r)?;
        ptrace::cont(tid, 0)?;
        loop {
            match ptrace::wait(tid)? {
                Stop::Signal(libc::SIGTRAP) => break,
                Stop::Signal(sig) => bail!("the parasite was hit by signal {sig}"),
                Stop::Exited(_) | Stop::Killed(_) => {
                    bail!("the process died while running the parasite")
                }
                _ => ptrace::cont(tid, 0)?,
            }
        }
        let status = Status::decode(&read_remote(pid, blob.status_addr, Status::SIZE)?);
        blob.check(status)?;
        let acts = read_remote(pid, blob.addr_of(sigactions), 64 * 32)?;
        let ss = read_remote(pid, blob.addr_of(ss), 24)?;
        let tid_addr = read_remote(pid, blob.addr_of(tid_addr), 8)?;
        let slots = read_remote(pid, blob.slots_addr, blob.slots_len())?;
        let it = read_remote(pid, blob.addr_of(itimers), 3 * 32)?;
        let tm = read_remote(pid, blob.addr_of(timers), timer_ids.len().max(1) * 32)?;
        let pdeath = read_remote(pid, blob.addr_of(pdeathsig), 8)?;
        let reaper = read_remote(pid, blob.addr_of(subreaper), 8)?;
        let word = |b: &[u8], i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap());
        let usec = |b: &[u8], i: usize| word(b, i) * 1_000_000 + word(b, i + 1);
        let nsec = |b: &[u8], i: usize| word(b, i) * 1_000_000_000 + word(b, i + 1);
        Ok(Inside {
            sigactions: acts
                .chunks_exact(32)
                .map(|c| SigAction {
                    handler: word(c, 0),
                    flags: word(c, 1),
                    restorer: word(c, 2),
                    mask: word(c, 3),
                })
                .collect(),
            sigaltstack: AltStack {
                sp: word(&ss, 0),
                flags: word(&ss, 1) as i32,
                size: word(&ss, 2),
            },
            tid_address: word(&tid_addr, 0),
            brk: blob.read_slot(&slots, brk).unwrap_or(0),
            dumpable: blob.read_slot(&slots, dumpable).unwrap_or(1) as i32,
            securebits: blob.read_slot(&slots, securebits).unwrap_or(0) as u32,
            pdeathsig: i32::from_le_bytes(pdeath[..4].try_into().unwrap()),
            child_subreaper: reaper[..4] != [0; 4],
            thp_disable: blob.read_slot(&slots, thp).unwrap_or(0) != 0,
            itimers: [0, 1, 2].map(|w| Itimer {
                interval_us: usec(&it[w * 32..], 0),
                value_us: usec(&it[w * 32..], 2),
            }),
            posix_timers: (0..timer_ids.len())
                .map(|i| (nsec(&tm[i * 32..], 0), nsec(&tm[i * 32..], 2)))
                .collect(),
        })
    })();
    let unmapped = remote_syscall(tid, raw, insn, libc::SYS_munmap, [base, len, 0, 0, 0, 0]);
    ptrace::set_regs(tid, &resume_regs(*raw, kind)).context("restoring the target's registers")?;
    match unmapped? {
        0 => result,
        e => bail!(
            "munmap of the parasite area failed: {}",
            std::io::Error::from_raw_os_error(-e as i32)
        ),
    }
}

/// Creates a userfaultfd for the address space of the frozen process `pid` (the
/// `userfaultfd` syscall binds it to the caller's mm, so thread `tid` makes the call),
/// takes a copy with `pidfd_getfd` and closes the target's own descriptor again: the
/// process's fd table is left exactly as it was. Used by `dump --pre-dump` to track
/// writes (`WP_ASYNC`).
pub fn open_uffd(
    pid: i32,
    tid: i32,
    raw: &Regs,
    kind: StopKind,
    maps: &[MapEntry],
) -> Result<std::os::fd::OwnedFd> {
    let mask = ptrace::get_sigmask(tid).context("PTRACE_GETSIGMASK")?;
    ptrace::set_sigmask(tid, !0).context("PTRACE_SETSIGMASK")?;
    let res = (|| -> Result<std::os::fd::OwnedFd> {
        let insn = vdso_syscall(pid, maps)?;
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
        let fd = remote_syscall(
            tid,
            raw,
            insn,
            libc::SYS_userfaultfd,
            [flags, 0, 0, 0, 0, 0],
        )?;
        if (-4095..0).contains(&fd) {
            bail!(
                "userfaultfd() in the process failed: {}",
                std::io::Error::from_raw_os_error(-fd as i32)
            );
        }
        let got = crate::sys::pidfd::pidfd_open(pid, 0)
            .and_then(|p| crate::sys::pidfd::pidfd_getfd(&p, fd as i32))
            .context("taking the process's userfaultfd (pidfd_getfd)");
        let closed = remote_syscall(tid, raw, insn, libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0]);
        match closed? {
            0 => got,
            e => bail!(
                "closing the userfaultfd in the process failed: {}",
                std::io::Error::from_raw_os_error(-e as i32)
            ),
        }
    })();
    let regs = ptrace::set_regs(tid, &resume_regs(*raw, kind));
    let restored = ptrace::set_sigmask(tid, mask).context("restoring the target's signal mask");
    let fd = res?;
    regs.context("restoring the target's registers")?;
    restored?;
    Ok(fd)
}
