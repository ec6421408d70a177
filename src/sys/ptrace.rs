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
pub const O_TRACEEXEC: libc::c_int = libc::PTRACE_O_TRACEEXEC;
pub const O_SUSPEND_SECCOMP: libc::c_int = libc::PTRACE_O_SUSPEND_SECCOMP;

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `ptrace(req, pid, addr, data)`, with -1 turned into the errno.
///
/// # Safety
///
/// For requests that read or write through `addr` or `data` in *this* process, that
/// argument must be the address of memory of the size and layout the request expects
/// (an `iovec` whose buffer is writable for `iov_len` bytes, a `u64` mask, ...), valid for
/// the duration of the call. Requests that take integers only are always sound: the
/// kernel then touches nothing but the tracee.
unsafe fn raw(req: libc::c_uint, pid: i32, addr: usize, data: usize) -> io::Result<libc::c_long> {
    check(libc::ptrace(req, pid, addr, data))
}

pub fn seize(pid: i32, options: libc::c_int) -> io::Result<()> {
    // SAFETY: PTRACE_SEIZE takes integer arguments only; no memory of ours is read or written.
    unsafe { raw(libc::PTRACE_SEIZE, pid, 0, options as usize) }.map(drop)
}

pub fn interrupt(pid: i32) -> io::Result<()> {
    // SAFETY: PTRACE_INTERRUPT takes integer arguments only; no memory of ours is read or written.
    unsafe { raw(libc::PTRACE_INTERRUPT, pid, 0, 0) }.map(drop)
}

pub fn cont(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: PTRACE_CONT takes integer arguments only; no memory of ours is read or written.
    unsafe { raw(libc::PTRACE_CONT, pid, 0, sig as usize) }.map(drop)
}

pub fn syscall(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: PTRACE_SYSCALL takes integer arguments only; no memory of ours is read or written.
    unsafe { raw(libc::PTRACE_SYSCALL, pid, 0, sig as usize) }.map(drop)
}

pub fn detach(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: PTRACE_DETACH takes integer arguments only; no memory of ours is read or written.
    unsafe { raw(libc::PTRACE_DETACH, pid, 0, sig as usize) }.map(drop)
}

pub fn get_event_msg(pid: i32) -> io::Result<u64> {
    let mut msg: libc::c_ulong = 0;
    // SAFETY: GETEVENTMSG stores one c_ulong at `data`, which points at `msg`, a live local.
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
    // SAFETY: `iov` is a live iovec describing `regs`, writable for exactly
    // size_of::<Regs>() bytes; the kernel writes at most iov_len bytes of NT_PRSTATUS
    // (user_regs_struct, the same 27 u64s) and shrinks iov_len. Both outlive the call.
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
    // SAFETY: `iov` is a live iovec over `regs`, readable for size_of::<Regs>() bytes.
    // SETREGSET only reads the buffer (the *mut cast is what iovec's type demands) and
    // writes only `iov` itself.
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
    // SAFETY: `iov` is a live iovec over `buf`, writable for buf.len() bytes; the kernel
    // writes at most that many bytes of xstate and shrinks iov_len to what it wrote.
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
    // SAFETY: `iov` is a live iovec over `xsave`, readable for xsave.len() bytes; SETREGSET
    // only reads the buffer (the *mut cast is what iovec's type demands).
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
    // SAFETY: `addr` is the size (8) of the mask and `data` points at `mask`, a live u64
    // the kernel writes exactly 8 bytes into.
    unsafe { raw(PTRACE_GETSIGMASK, pid, 8, &mut mask as *mut _ as usize) }?;
    Ok(mask)
}

pub fn set_sigmask(pid: i32, mask: u64) -> io::Result<()> {
    // SAFETY: `addr` is the size (8) of the mask and `data` points at `mask`, a live u64
    // the kernel only reads.
    unsafe { raw(PTRACE_SETSIGMASK, pid, 8, &mask as *const _ as usize) }.map(drop)
}

/// The siginfo of the signal `tid` is stopped for (`PTRACE_GETSIGINFO`), raw.
pub fn get_siginfo(tid: i32) -> io::Result<[u8; 128]> {
    let mut buf = [0u8; 128];
    // SAFETY: GETSIGINFO writes one siginfo_t (128 bytes) at `data`, which points at
    // `buf`, a live 128-byte local.
    let r = unsafe { libc::ptrace(libc::PTRACE_GETSIGINFO, tid, 0, buf.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(buf)
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
        // SAFETY: `addr` points at `args`, a live repr(C) ptrace_peeksiginfo_args the kernel
        // only reads; `data` points at `buf`, room for `args.nr` (32) siginfos of 128 bytes
        // each, and the kernel copies at most `nr` of them.
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
    // SAFETY: `data` points at `c`, a live repr(C) struct laid out as the kernel's
    // ptrace_rseq_configuration, and `addr` is its size, so the kernel writes within it.
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
        // SAFETY: `status` is a live c_int the kernel writes the wait status into.
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

/// [`wait`] for at most `timeout`: a thread that does not stop in time is an error
/// naming it (a wait on a thread that will never report must not hang its caller). Polls
/// with `WNOHANG`, sleeping 20 µs at first, then longer, up to 2 ms.
pub fn wait_timeout(pid: i32, timeout: std::time::Duration) -> io::Result<Stop> {
    let deadline = std::time::Instant::now() + timeout;
    let mut pause = std::time::Duration::from_micros(20);
    loop {
        let mut status = 0;
        // SAFETY: `status` is a live c_int the kernel writes the wait status into.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL | libc::WNOHANG) };
        match r {
            -1 => {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(e);
                }
            }
            0 => {
                if std::time::Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("thread {pid} did not stop within {} s", timeout.as_secs()),
                    ));
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(2));
            }
            _ => return Ok(decode_status(status)),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A child that never changes state times the wait out, naming it; once killed, the
    /// wait reports it.
    #[test]
    fn wait_timeout_is_bounded() {
        // SAFETY: the child only calls pause (async-signal-safe) until it is killed.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            loop {
                // SAFETY: pause takes no arguments.
                unsafe { libc::pause() };
            }
        }
        let e = wait_timeout(pid, std::time::Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains(&format!("thread {pid}")), "{e}");
        // SAFETY: kill takes integers; `pid` is our unreaped child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(
            wait_timeout(pid, std::time::Duration::from_secs(10)).unwrap(),
            Stop::Killed(libc::SIGKILL)
        );
    }
}
