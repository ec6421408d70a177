//! ptrace requests used by dump and restore, over raw `libc::ptrace`.
//!
//! Registers travel as `[u64; 27]` in `struct user_regs_struct` order (see
//! `warmstart_snapshots::model::reg`), the same shape the snapshot stores.

use std::io;

use warmstart_snapshots::model::reg;

pub type Regs = [u64; reg::COUNT];

const NT_PRSTATUS: usize = 1;
const NT_X86_XSTATE: usize = 0x202;
const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;
const PTRACE_PEEKSIGINFO: libc::c_uint = 0x4209;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
const PTRACE_PEEKSIGINFO_SHARED: u32 = 1;
/// Largest xsave area the kernel can report (AMX tiles included); the real size is
/// whatever `GETREGSET` returns.
const XSAVE_MAX: usize = 16 * 1024;

pub const O_TRACESYSGOOD: libc::c_int = libc::PTRACE_O_TRACESYSGOOD;
pub const O_TRACESECCOMP: libc::c_int = libc::PTRACE_O_TRACESECCOMP;
pub const O_EXITKILL: libc::c_int = libc::PTRACE_O_EXITKILL;
pub const O_TRACECLONE: libc::c_int = libc::PTRACE_O_TRACECLONE;
pub const O_TRACEFORK: libc::c_int = libc::PTRACE_O_TRACEFORK;
pub const O_TRACEVFORK: libc::c_int = libc::PTRACE_O_TRACEVFORK;
pub const O_SUSPEND_SECCOMP: libc::c_int = libc::PTRACE_O_SUSPEND_SECCOMP;

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

unsafe fn raw(req: libc::c_uint, pid: i32, addr: usize, data: usize) -> io::Result<libc::c_long> {
    check(libc::ptrace(req, pid, addr, data))
}

pub fn seize(pid: i32, options: libc::c_int) -> io::Result<()> {
    unsafe { raw(libc::PTRACE_SEIZE, pid, 0, options as usize) }.map(drop)
}

pub fn interrupt(pid: i32) -> io::Result<()> {
    unsafe { raw(libc::PTRACE_INTERRUPT, pid, 0, 0) }.map(drop)
}

pub fn cont(pid: i32, sig: i32) -> io::Result<()> {
    unsafe { raw(libc::PTRACE_CONT, pid, 0, sig as usize) }.map(drop)
}

pub fn syscall(pid: i32, sig: i32) -> io::Result<()> {
    unsafe { raw(libc::PTRACE_SYSCALL, pid, 0, sig as usize) }.map(drop)
}

pub fn detach(pid: i32, sig: i32) -> io::Result<()> {
    unsafe { raw(libc::PTRACE_DETACH, pid, 0, sig as usize) }.map(drop)
}

pub fn get_event_msg(pid: i32) -> io::Result<u64> {
    let mut msg: libc::c_ulong = 0;
    unsafe {
        raw(
            libc::PTRACE_GETEVENTMSG,
            pid,
            0,
            &mut msg as *mut _ as usize,
        )
    }?;
    Ok(msg)
}

pub fn get_regs(pid: i32) -> io::Result<Regs> {
    let mut regs: Regs = [0; reg::COUNT];
    let mut iov = libc::iovec {
        iov_base: regs.as_mut_ptr().cast(),
        iov_len: std::mem::size_of::<Regs>(),
    };
    unsafe {
        raw(
            libc::PTRACE_GETREGSET,
            pid,
            NT_PRSTATUS,
            &mut iov as *mut _ as usize,
        )
    }?;
    Ok(regs)
}

pub fn set_regs(pid: i32, regs: &Regs) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: regs.as_ptr() as *mut libc::c_void,
        iov_len: std::mem::size_of::<Regs>(),
    };
    unsafe {
        raw(
            libc::PTRACE_SETREGSET,
            pid,
            NT_PRSTATUS,
            &mut iov as *mut _ as usize,
        )
    }
    .map(drop)
}

pub fn get_xstate(pid: i32) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; XSAVE_MAX];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    unsafe {
        raw(
            libc::PTRACE_GETREGSET,
            pid,
            NT_X86_XSTATE,
            &mut iov as *mut _ as usize,
        )
    }?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

pub fn set_xstate(pid: i32, xsave: &[u8]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: xsave.as_ptr() as *mut libc::c_void,
        iov_len: xsave.len(),
    };
    unsafe {
        raw(
            libc::PTRACE_SETREGSET,
            pid,
            NT_X86_XSTATE,
            &mut iov as *mut _ as usize,
        )
    }
    .map(drop)
}

pub fn get_sigmask(pid: i32) -> io::Result<u64> {
    let mut mask: u64 = 0;
    unsafe { raw(PTRACE_GETSIGMASK, pid, 8, &mut mask as *mut _ as usize) }?;
    Ok(mask)
}

pub fn set_sigmask(pid: i32, mask: u64) -> io::Result<()> {
    unsafe { raw(PTRACE_SETSIGMASK, pid, 8, &mask as *const _ as usize) }.map(drop)
}

/// Queued signals, without dequeuing them: the thread's own queue, or the process's
/// shared queue when `shared`.
pub fn peek_siginfo(pid: i32, shared: bool) -> io::Result<Vec<[u8; 128]>> {
    #[repr(C)]
    struct Args {
        off: u64,
        flags: u32,
        nr: i32,
    }
    let mut out = Vec::new();
    loop {
        let mut buf = [[0u8; 128]; 32];
        let args = Args {
            off: out.len() as u64,
            flags: if shared { PTRACE_PEEKSIGINFO_SHARED } else { 0 },
            nr: buf.len() as i32,
        };
        let n = unsafe {
            raw(
                PTRACE_PEEKSIGINFO,
                pid,
                &args as *const _ as usize,
                buf.as_mut_ptr() as usize,
            )
        }? as usize;
        out.extend_from_slice(&buf[..n]);
        if n < buf.len() {
            return Ok(out);
        }
    }
}

/// `PTRACE_GET_RSEQ_CONFIGURATION`: (address, length, signature), or None if unregistered.
pub fn get_rseq(pid: i32) -> io::Result<Option<(u64, u32, u32)>> {
    #[repr(C)]
    #[derive(Default)]
    struct Conf {
        rseq_abi_pointer: u64,
        rseq_abi_size: u32,
        signature: u32,
        flags: u32,
        pad: u32,
    }
    let mut c = Conf::default();
    unsafe {
        raw(
            PTRACE_GET_RSEQ_CONFIGURATION,
            pid,
            std::mem::size_of::<Conf>(),
            &mut c as *mut _ as usize,
        )
    }?;
    Ok((c.rseq_abi_pointer != 0).then_some((c.rseq_abi_pointer, c.rseq_abi_size, c.signature)))
}

/// What `waitpid` reported for a traced thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Exited(i32),
    Killed(i32),
    /// Signal-delivery stop.
    Signal(i32),
    /// `PTRACE_EVENT_STOP`: the interrupt or group stop of a seized thread.
    EventStop(i32),
    /// `PTRACE_EVENT_*` other than STOP (seccomp, clone, exec, exit...).
    Event(i32),
    /// Syscall entry or exit (with `PTRACE_O_TRACESYSGOOD`).
    Syscall,
}

pub fn wait(pid: i32) -> io::Result<Stop> {
    let mut status = 0;
    loop {
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if r == -1 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        break;
    }
    Ok(decode_status(status))
}

pub fn decode_status(status: i32) -> Stop {
    if libc::WIFEXITED(status) {
        return Stop::Exited(libc::WEXITSTATUS(status));
    }
    if libc::WIFSIGNALED(status) {
        return Stop::Killed(libc::WTERMSIG(status));
    }
    let sig = libc::WSTOPSIG(status);
    let event = status >> 16;
    if sig == libc::SIGTRAP | 0x80 {
        Stop::Syscall
    } else if event == libc::PTRACE_EVENT_STOP {
        Stop::EventStop(sig)
    } else if event != 0 {
        Stop::Event(event)
    } else {
        Stop::Signal(sig)
    }
}
