//! Per-thread state read from outside with ptrace, and the syscall-restart rewind.

use anyhow::{Context, Result};
use warmstart_snapshots::model::{reg, AltStack, Rseq, SigInfo, Thread};

use super::freeze::{FrozenThread, StopKind};
use crate::sys::ptrace::{self, Regs};

const ERESTARTSYS: i64 = -512;
const ERESTARTNOINTR: i64 = -513;
const ERESTARTNOHAND: i64 = -514;
const ERESTART_RESTARTBLOCK: i64 = -516;
const ENOSYS: i64 = -(libc::ENOSYS as i64);

/// Registers as they must be on resume. A thread interrupted inside a blocking syscall
/// shows one of the kernel's internal restart codes in rax: for the first three the call
/// is re-issued after restore (`rax = orig_rax`, `rip` back over the 2-byte `syscall`);
/// `ERESTART_RESTARTBLOCK`'s continuation lives in kernel state we cannot carry over, so
/// the call returns `EINTR`, which callers of `nanosleep`/`clock_nanosleep` handle. A
/// thread held at a syscall-entry stop (the warm-point trap) has not run its call yet:
/// same rewind.
pub fn resume_regs(mut r: Regs, kind: StopKind) -> Regs {
    let rax = r[reg::RAX] as i64;
    let orig = r[reg::ORIG_RAX] as i64;
    let in_syscall = orig >= 0;
    if kind == StopKind::SyscallEntry && in_syscall && rax == ENOSYS {
        r[reg::RAX] = orig as u64;
        r[reg::RIP] -= 2;
    } else if in_syscall {
        match rax {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
                r[reg::RAX] = orig as u64;
                r[reg::RIP] -= 2;
            }
            ERESTART_RESTARTBLOCK => r[reg::RAX] = -(libc::EINTR as i64) as u64,
            _ => {}
        }
    }
    // The restored thread is not inside a syscall: without this the kernel's own
    // restart logic would act on the values above a second time.
    r[reg::ORIG_RAX] = u64::MAX;
    r
}

fn robust_list(tid: i32) -> Result<(u64, u64)> {
    let mut head: u64 = 0;
    let mut len: usize = 0;
    // SAFETY: get_robust_list writes one pointer-sized head address into `head` (a u64,
    // pointer-sized on x86_64) and one size_t into `len`; both are live locals.
    let r = unsafe { libc::syscall(libc::SYS_get_robust_list, tid, &mut head, &mut len) };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("get_robust_list");
    }
    Ok((head, len as u64))
}

/// Thread state readable from outside; sigaltstack and the tid address come from the
/// parasite and are filled in by the caller.
pub fn collect(pid: i32, t: &FrozenThread) -> Result<(Thread, Regs)> {
    let tid = t.tid;
    let ctx = || format!("reading thread {tid} of process {pid}");
    let raw = ptrace::get_regs(tid).with_context(ctx)?;
    let xsave = ptrace::get_xstate(tid).with_context(ctx)?;
    let sigmask = ptrace::get_sigmask(tid).with_context(ctx)?;
    let mut pending: Vec<SigInfo> = ptrace::peek_siginfo(tid, false)
        .with_context(ctx)?
        .into_iter()
        .map(|s| SigInfo(s.to_vec()))
        .collect();
    pending.extend(t.caught.iter().map(|s| SigInfo(s.to_vec())));
    let rseq = ptrace::get_rseq(tid)
        .with_context(ctx)?
        .map(|(addr, len, sig)| Rseq { addr, len, sig });
    let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
        .with_context(ctx)?
        .trim_end_matches('\n')
        .to_owned();
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).with_context(ctx)?;
    // The tid inside the process's own pid namespace (the last NSpid column).
    let ns_tid = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|v| v.split_whitespace().last()?.parse().ok())
        .unwrap_or(tid);
    let thread = Thread {
        tid: ns_tid,
        comm,
        regs: resume_regs(raw, t.kind).to_vec(),
        xsave,
        sigmask,
        pending,
        sigaltstack: AltStack::default(),
        rseq,
        robust_list: robust_list(tid).with_context(ctx)?,
        tid_address: 0,
        // The parent-death signal comes from the parasite (only the thread can read it).
        attrs: crate::sys::sched::get(tid).with_context(|| {
            format!("reading the scheduling attributes of thread {tid} of process {pid}")
        })?,
    };
    Ok((thread, raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(rax: i64, orig: i64, rip: u64) -> Regs {
        let mut r = [0u64; reg::COUNT];
        r[reg::RAX] = rax as u64;
        r[reg::ORIG_RAX] = orig as u64;
        r[reg::RIP] = rip;
        r
    }

    #[test]
    fn restart_rules() {
        for code in [ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND] {
            let r = resume_regs(regs(code, 0, 0x1002), StopKind::Interrupted);
            assert_eq!((r[reg::RAX], r[reg::RIP]), (0, 0x1000));
        }
        let r = resume_regs(
            regs(ERESTART_RESTARTBLOCK, 35, 0x1002),
            StopKind::Interrupted,
        );
        assert_eq!(
            (r[reg::RAX] as i64, r[reg::RIP]),
            (-(libc::EINTR as i64), 0x1002)
        );
        // A completed syscall result stays.
        let r = resume_regs(regs(5, 0, 0x1002), StopKind::Interrupted);
        assert_eq!((r[reg::RAX], r[reg::RIP]), (5, 0x1002));
        // Not in a syscall at all.
        let r = resume_regs(regs(ERESTARTSYS, -1, 0x1002), StopKind::Interrupted);
        assert_eq!((r[reg::RAX] as i64, r[reg::RIP]), (ERESTARTSYS, 0x1002));
        // At the warm-point trap: the read has not happened yet.
        let r = resume_regs(regs(ENOSYS, 0, 0x1002), StopKind::SyscallEntry);
        assert_eq!(
            (r[reg::RAX], r[reg::RIP], r[reg::ORIG_RAX]),
            (0, 0x1000, u64::MAX)
        );
    }
}
