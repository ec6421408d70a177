//! `record --cpu-baseline LEVEL`: the recorded app sees, through CPUID, only what an
//! x86-64 psABI level (and the system bits, see [`Baseline::mask`]) promises, so the
//! code it picks at start-up (glibc's string functions, JITs, multi-versioned code)
//! runs on every CPU of that level, and the snapshot needs only that.
//!
//! The kernel's one way to intercept CPUID is CPUID faulting: `arch_prctl(ARCH_SET_CPUID,
//! 0)` makes a thread's CPUID raise SIGSEGV; it is inherited across fork and clone and
//! reset by execve. So `record` traces the app from its first exec
//! (`PTRACE_O_TRACEEXEC`), turns faulting on in the new image at every exec stop (a
//! syscall injected with [`crate::dump::inject::syscall_in`]), and at each SIGSEGV whose
//! instruction is `cpuid` (`0f a2`, `si_code` `SI_KERNEL`) runs CPUID here with the
//! thread's eax/ecx, masks it, sets rax..rdx, steps over it and suppresses the signal
//! ([`Emulator::on_stop`]). Every other signal goes on unchanged. At the warm point
//! every thread of the tree is stopped and faulting turned off again
//! ([`Emulator::stop_tree`]) before the dump: a restored app (and one `record
//! --leave-running` lets go on) executes CPUID natively and sees the real host.

use std::collections::BTreeMap;
use std::io;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use warmstart_snapshots::model::reg;

use crate::dump::freeze::StopKind;
use crate::sys::cpuid::Baseline;
use crate::sys::ptrace::{self, Stop};

const ARCH_GET_CPUID: u64 = 0x1011;
const ARCH_SET_CPUID: u64 = 0x1012;
const SI_KERNEL: i32 = 0x80;

/// How long the tree may take to stop at the warm point.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Whether this kernel and CPU fault CPUID on request (`cpuid_fault` in /proc/cpuinfo).
pub fn cpuid_faulting() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
        c.lines()
            .find(|l| l.starts_with("flags"))
            .is_some_and(|l| l.split_whitespace().any(|f| f == "cpuid_fault"))
    })
}

/// Refuses a baseline this host cannot show: one it does not meet, or no CPUID faulting.
pub fn check_host(b: Baseline) -> Result<()> {
    b.check_host().map_err(anyhow::Error::msg)?;
    if !cpuid_faulting() {
        bail!(
            "--cpu-baseline {} needs CPUID faulting, which this CPU or kernel does not offer \
             (no cpuid_fault in /proc/cpuinfo; virtual machines often lack it): record \
             without --cpu-baseline, or on a host that has it",
            b.name()
        );
    }
    Ok(())
}

/// The CPUID emulation of one recording.
pub struct Emulator {
    pub baseline: Baseline,
    /// CPUID instructions emulated, execs seen.
    pub emulated: u64,
    pub execs: u64,
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn tgid_of(tid: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

impl Emulator {
    pub fn new(baseline: Baseline) -> Emulator {
        Emulator {
            baseline,
            emulated: 0,
            execs: 0,
        }
    }

    /// Sees a stop of a traced thread of the app first (`waitpid` `status`): an exec
    /// (CPUID faulting turned on in the new image) or a faulted CPUID (emulated) is taken
    /// care of and the thread resumed (true); anything else is left to the caller.
    pub fn on_stop(&mut self, tid: i32, status: i32) -> io::Result<bool> {
        if !libc::WIFSTOPPED(status) {
            return Ok(false);
        }
        let event = (status >> 16) & 0xff;
        let sig = libc::WSTOPSIG(status);
        if event == libc::PTRACE_EVENT_EXEC {
            self.after_exec(tid).map_err(|e| {
                other(format!(
                    "hiding CPU features beyond {} from process {tid} after its exec: {e:#}",
                    self.baseline.name()
                ))
            })?;
            ptrace::cont(tid, 0)?;
            return Ok(true);
        }
        if event == 0 && sig == libc::SIGSEGV && self.emulate(tid)? {
            ptrace::cont(tid, 0)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// At an exec stop: the execve returns (its syscall-exit stop), then the new image
    /// runs `arch_prctl(ARCH_SET_CPUID, 0)` before its first instruction.
    fn after_exec(&mut self, tid: i32) -> Result<()> {
        self.execs += 1;
        ptrace::syscall(tid, 0).context("PTRACE_SYSCALL")?;
        loop {
            match ptrace::wait_timeout(tid, STOP_TIMEOUT)? {
                Stop::Syscall
                    if crate::dump::inject::syscall_info_op(tid)?
                        == crate::dump::inject::SYSCALL_INFO_EXIT =>
                {
                    break
                }
                Stop::Exited(_) | Stop::Killed(_) => bail!("it died"),
                // A stale interrupt: on to the exit of the execve.
                Stop::EventStop(_) | Stop::Syscall => {
                    ptrace::syscall(tid, 0).context("PTRACE_SYSCALL")?
                }
                other => bail!("unexpected stop {other:?} on the way out of execve"),
            }
        }
        let resume = ptrace::get_regs(tid)?;
        let pid = tgid_of(tid).unwrap_or(tid);
        set_cpuid(pid, tid, &resume, false)
    }

    /// A SIGSEGV of `tid`: when it is a faulted `cpuid` (kernel-sent, `0f a2` at rip),
    /// the instruction's result as the baseline shows it, and rip past it. False: some
    /// other SIGSEGV, to be delivered as it is.
    fn emulate(&mut self, tid: i32) -> io::Result<bool> {
        let info = crate::sys::ptrace::get_siginfo(tid)?;
        let code = i32::from_ne_bytes(info[8..12].try_into().unwrap());
        if code != SI_KERNEL {
            return Ok(false);
        }
        let mut regs = ptrace::get_regs(tid)?;
        let mut insn = [0u8; 2];
        if crate::sys::remote::read(tid, regs[reg::RIP], &mut insn).is_err() || insn != [0x0f, 0xa2]
        {
            return Ok(false);
        }
        let (leaf, sub) = (regs[reg::RAX] as u32, regs[reg::RCX] as u32);
        let out = self
            .baseline
            .mask(leaf, sub, crate::sys::cpuid::cpuid_raw(leaf, sub));
        regs[reg::RAX] = u64::from(out[0]);
        regs[reg::RBX] = u64::from(out[1]);
        regs[reg::RCX] = u64::from(out[2]);
        regs[reg::RDX] = u64::from(out[3]);
        regs[reg::RIP] += 2;
        ptrace::set_regs(tid, &regs)?;
        self.emulated += 1;
        Ok(true)
    }

    /// At the warm point: stops every other thread of the tree of `pid` (`held` are
    /// stopped already: tid and kind), emulating CPUID while they come to a stop and
    /// delivering other signals, then turns CPUID faulting off in every thread. Returns
    /// every thread, stopped, with its kind, for the dump. `init_pid`: the sandbox's init
    /// (its exit means the app is gone).
    pub fn stop_tree(
        &mut self,
        pid: i32,
        init_pid: i32,
        held: Vec<(i32, StopKind)>,
    ) -> Result<Vec<(i32, StopKind)>> {
        let mut stopped: BTreeMap<i32, StopKind> = held.into_iter().collect();
        let mut asked: std::collections::BTreeSet<i32> = Default::default();
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            for p in std::iter::once(pid).chain(crate::sys::tasks::descendants(pid)) {
                for tid in crate::sys::tasks::tasks(p).unwrap_or_default() {
                    if stopped.contains_key(&tid) || asked.contains(&tid) {
                        continue;
                    }
                    let state =
                        crate::dump::freeze::stat_state(&format!("/proc/{p}/task/{tid}/stat"));
                    if matches!(state, None | Some('Z' | 'X')) {
                        continue;
                    }
                    warmstart_launcher::warmpoint::interrupt(tid)
                        .with_context(|| format!("PTRACE_INTERRUPT of thread {tid}"))?;
                    asked.insert(tid);
                }
            }
            if asked.is_empty() {
                break;
            }
            let ev = warmstart_launcher::warmpoint::wait_event(init_pid, Some(deadline), None);
            use warmstart_launcher::warmpoint::WaitEvent;
            let (tid, status) = match ev {
                Ok(WaitEvent::Stop { tid, status }) => (tid, status),
                Ok(WaitEvent::Timeout) => bail!(
                    "threads {asked:?} of the app did not stop within {} s at its warm point",
                    STOP_TIMEOUT.as_secs()
                ),
                Ok(WaitEvent::SandboxExited) => bail!("the app exited at its warm point"),
                Ok(WaitEvent::Readable) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("waiting for the app's threads to stop"),
            };
            if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                asked.remove(&tid);
                stopped.remove(&tid);
                if tid == pid {
                    bail!("the app exited at its warm point");
                }
                continue;
            }
            if !libc::WIFSTOPPED(status) {
                continue;
            }
            let event = (status >> 16) & 0xff;
            if event == libc::PTRACE_EVENT_EXEC {
                // Its interrupt may have gone with the old image: asked again.
                self.on_stop(tid, status)?;
                warmstart_launcher::warmpoint::interrupt(tid)?;
                asked.insert(tid);
                continue;
            }
            if self.on_stop(tid, status)? {
                continue;
            }
            let sig = libc::WSTOPSIG(status);
            match event {
                libc::PTRACE_EVENT_STOP => {
                    asked.remove(&tid);
                    stopped.insert(tid, StopKind::Interrupted);
                }
                libc::PTRACE_EVENT_SECCOMP => {
                    asked.remove(&tid);
                    stopped.insert(tid, StopKind::SyscallEntry);
                }
                // A signal: delivered (the stop asked for comes after it).
                0 if sig != (libc::SIGTRAP | 0x80) => ptrace::cont(tid, sig)?,
                // Clone, fork, syscall stops: on (a new task is found by the next look).
                _ => ptrace::cont(tid, 0)?,
            }
        }
        for &tid in stopped.keys() {
            self.settle_pending_fault(tid)
                .with_context(|| format!("emulating the CPUID thread {tid} was stopped at"))?;
        }
        for (&tid, &kind) in &stopped {
            let pid = tgid_of(tid).unwrap_or(tid);
            let raw =
                ptrace::get_regs(tid).with_context(|| format!("registers of thread {tid}"))?;
            let resume = crate::dump::threads::resume_regs(raw, kind);
            set_cpuid(pid, tid, &resume, true).with_context(|| {
                format!("turning CPUID faulting off in thread {tid} of process {pid}")
            })?;
        }
        Ok(stopped.into_iter().collect())
    }
}

impl Emulator {
    /// A thread interrupted right as its CPUID faulted stops with the SIGSEGV still
    /// queued (the interrupt is taken before signals are dequeued): the snapshot would
    /// hold it pending and the restored thread would die of it. Such a thread is let go
    /// to the signal's delivery stop, where its CPUID is emulated; it stays stopped
    /// there, the signal suppressed by the next resume (which passes no signal).
    fn settle_pending_fault(&mut self, tid: i32) -> Result<()> {
        let queued = ptrace::peek_siginfo(tid, false)?.iter().any(|s| {
            i32::from_ne_bytes(s[0..4].try_into().unwrap()) == libc::SIGSEGV
                && i32::from_ne_bytes(s[8..12].try_into().unwrap()) == SI_KERNEL
        });
        if !queued {
            return Ok(());
        }
        let rip = ptrace::get_regs(tid)?[reg::RIP];
        let mut insn = [0u8; 2];
        if crate::sys::remote::read(tid, rip, &mut insn).is_err() || insn != [0x0f, 0xa2] {
            return Ok(());
        }
        tracing::debug!(tid, "a faulted CPUID was queued when the thread stopped");
        ptrace::cont(tid, 0)?;
        loop {
            match ptrace::wait_timeout(tid, STOP_TIMEOUT)? {
                Stop::Signal(libc::SIGSEGV) if self.emulate(tid)? => return Ok(()),
                // A stale interrupt of ours.
                Stop::EventStop(_) => ptrace::cont(tid, 0)?,
                Stop::Exited(_) | Stop::Killed(_) => bail!("the thread died"),
                other => bail!("unexpected stop {other:?} instead of its queued SIGSEGV"),
            }
        }
    }
}

/// `arch_prctl(ARCH_SET_CPUID, on)` in thread `tid` of `pid`, stopped, which goes on
/// from `resume` afterwards; checked with `ARCH_GET_CPUID`.
fn set_cpuid(pid: i32, tid: i32, resume: &ptrace::Regs, on: bool) -> Result<()> {
    use crate::dump::inject::syscall_in;
    let r = syscall_in(
        pid,
        tid,
        resume,
        libc::SYS_arch_prctl,
        [ARCH_SET_CPUID, u64::from(on), 0, 0, 0, 0],
    )?;
    if r != 0 {
        bail!(
            "arch_prctl(ARCH_SET_CPUID, {}) failed: {}",
            u8::from(on),
            io::Error::from_raw_os_error(-r as i32)
        );
    }
    let now = syscall_in(
        pid,
        tid,
        resume,
        libc::SYS_arch_prctl,
        [ARCH_GET_CPUID, 0, 0, 0, 0, 0],
    )?;
    if now != i64::from(on) {
        bail!(
            "arch_prctl(ARCH_GET_CPUID) says {now} after setting it to {}",
            u8::from(on)
        );
    }
    Ok(())
}
