//! Warm-point traps: classic-BPF seccomp filters that return `SECCOMP_RET_TRACE` for the
//! few syscalls that mark an app's warm point, and `SECCOMP_RET_ALLOW` for everything
//! else.
//!
//! `SECCOMP_RET_TRACE` stops the app with a `PTRACE_EVENT_SECCOMP` stop *before* the
//! syscall runs (`PTRACE_GETEVENTMSG` yields the rule's [`Trap`] data; one distinct value
//! per rule of a combined filter). With no tracer attached (or one without
//! `PTRACE_O_TRACESECCOMP`) the syscall fails with `ENOSYS` instead: the monitor must have
//! seized the app with `PTRACE_O_TRACESECCOMP` before it releases the app's gate, and with
//! `PTRACE_O_TRACECLONE` if the app may trap in other threads (they inherit the filter).
//! Deciding which trapped stop is the warm point is [`crate::warmpoint`]'s job.
//!
//! The filter is installed without `no_new_privs` (that flag would become part of the
//! app's recorded state; root has `CAP_SYS_ADMIN`, which is enough). It is warmstart's,
//! never part of a snapshot: dump must not record it. Non-x86_64 syscalls (another audit
//! arch) and x32 syscalls are allowed, never trapped.
//!
//! Everything here is async-signal-safe (the filter is built on the stack), so it can be
//! called in the app child between `clone3` and `exec`.

use crate::LaunchError;

/// `AUDIT_ARCH_X86_64` (`EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE`).
pub const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;

/// Maximum number of BPF instructions of a filter built here.
pub const MAX_INSNS: usize = 128;

// Classic BPF opcodes.
const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const BPF_JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_JA: u16 = 0x05; // BPF_JMP | BPF_JA
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K

// Offsets in `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
/// Low 32 bits of args[i] (little endian).
const fn off_arg_lo(i: u32) -> u32 {
    16 + 8 * i
}

/// A warm-point trigger that a seccomp trap can detect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Trigger {
    /// The app's first read of fd 0: `read`, `readv`, `pread64`, `preadv`, `preadv2`
    /// with args[0] == 0 (`--ready stdin`).
    Stdin,
    /// `--ready listen`: `listen`, `accept`/`accept4`, `poll`/`ppoll`, `select`/
    /// `pselect6` and `epoll_wait`/`epoll_pwait`/`epoll_pwait2`, each with its own
    /// [`Trap`] data. Which of these stops is the warm point is decided by the tracker
    /// ([`crate::warmpoint::WarmPointTracker`]).
    Listen,
    /// `--ready notify`: `read`, `readv`, `recvfrom`, `recvmsg` of the notify fd
    /// (`Some(n)`: only args[0] == n, the cheap form; `None`: of any fd, the tracker
    /// compares the file itself).
    Notify(Option<u32>),
}

/// Which rule of a combined filter fired: the `SECCOMP_RET_DATA` of each trap, returned
/// by `PTRACE_GETEVENTMSG` at its `PTRACE_EVENT_SECCOMP` stop. Never 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Trap {
    /// `read`/`readv`/`pread64`/`preadv`/`preadv2` of fd 0.
    StdinRead = 1,
    /// `listen`.
    Listen = 2,
    /// `accept`, `accept4`.
    Accept = 3,
    /// `poll`, `ppoll`.
    Poll = 4,
    /// `select`, `pselect6`.
    Select = 5,
    /// `epoll_wait`, `epoll_pwait`, `epoll_pwait2`.
    EpollWait = 6,
    /// `read`, `readv`, `recvfrom`, `recvmsg` (of the notify fd).
    NotifyRead = 7,
}

impl Trap {
    /// The trap of a `PTRACE_GETEVENTMSG` value.
    pub fn from_data(msg: u64) -> Option<Trap> {
        Some(match msg {
            1 => Trap::StdinRead,
            2 => Trap::Listen,
            3 => Trap::Accept,
            4 => Trap::Poll,
            5 => Trap::Select,
            6 => Trap::EpollWait,
            7 => Trap::NotifyRead,
            _ => return None,
        })
    }

    /// Its `SECCOMP_RET_DATA`.
    pub const fn data(self) -> u16 {
        self as u16
    }
}

/// One trap rule: these syscalls, optionally only when the low 32 bits of args[0] equal
/// a value, stop with `SECCOMP_RET_TRACE | data`.
#[derive(Clone, Copy)]
struct Rule {
    syscalls: &'static [u32],
    arg0: Option<u32>,
    data: u16,
}

const STDIN_SYSCALLS: [u32; 5] = [
    libc::SYS_read as u32,
    libc::SYS_readv as u32,
    libc::SYS_pread64 as u32,
    libc::SYS_preadv as u32,
    libc::SYS_preadv2 as u32,
];
const LISTEN_SYSCALLS: [u32; 1] = [libc::SYS_listen as u32];
const ACCEPT_SYSCALLS: [u32; 2] = [libc::SYS_accept as u32, libc::SYS_accept4 as u32];
const POLL_SYSCALLS: [u32; 2] = [libc::SYS_poll as u32, libc::SYS_ppoll as u32];
const SELECT_SYSCALLS: [u32; 2] = [libc::SYS_select as u32, libc::SYS_pselect6 as u32];
const EPOLL_SYSCALLS: [u32; 3] = [
    libc::SYS_epoll_wait as u32,
    libc::SYS_epoll_pwait as u32,
    libc::SYS_epoll_pwait2 as u32,
];
const NOTIFY_SYSCALLS: [u32; 4] = [
    libc::SYS_read as u32,
    libc::SYS_readv as u32,
    libc::SYS_recvfrom as u32,
    libc::SYS_recvmsg as u32,
];

/// Most rules of one trigger.
const MAX_RULES: usize = 5;

impl Trigger {
    /// The `SECCOMP_RET_DATA` of this trigger's (first) trap, returned by
    /// `PTRACE_GETEVENTMSG` at its `PTRACE_EVENT_SECCOMP` stop. Never 0. A trigger with
    /// several rules has one [`Trap`] per rule: see [`Trap::from_data`].
    pub const fn trace_data(self) -> u16 {
        match self {
            Trigger::Stdin => Trap::StdinRead.data(),
            Trigger::Listen => Trap::Listen.data(),
            Trigger::Notify(_) => Trap::NotifyRead.data(),
        }
    }

    /// The trigger whose trap produced a `PTRACE_GETEVENTMSG` value (`Notify(None)` for
    /// a notify read: the fd is not part of the data).
    pub fn from_trace_data(msg: u64) -> Option<Trigger> {
        Some(match Trap::from_data(msg)? {
            Trap::StdinRead => Trigger::Stdin,
            Trap::Listen | Trap::Accept | Trap::Poll | Trap::Select | Trap::EpollWait => {
                Trigger::Listen
            }
            Trap::NotifyRead => Trigger::Notify(None),
        })
    }

    fn rules(self) -> ([Rule; MAX_RULES], usize) {
        let r = |syscalls: &'static [u32], arg0, trap: Trap| Rule {
            syscalls,
            arg0,
            data: trap.data(),
        };
        let none = r(&[], None, Trap::StdinRead);
        match self {
            // Event-loop runtimes (libuv, Node) never read stdin before it is readable:
            // their first wait on it is the warm point too (the tracker checks the set).
            Trigger::Stdin => (
                [
                    r(&STDIN_SYSCALLS, Some(0), Trap::StdinRead),
                    r(&POLL_SYSCALLS, None, Trap::Poll),
                    r(&SELECT_SYSCALLS, None, Trap::Select),
                    r(&EPOLL_SYSCALLS, None, Trap::EpollWait),
                    none,
                ],
                4,
            ),
            Trigger::Listen => (
                [
                    r(&LISTEN_SYSCALLS, None, Trap::Listen),
                    r(&ACCEPT_SYSCALLS, None, Trap::Accept),
                    r(&POLL_SYSCALLS, None, Trap::Poll),
                    r(&SELECT_SYSCALLS, None, Trap::Select),
                    r(&EPOLL_SYSCALLS, None, Trap::EpollWait),
                ],
                5,
            ),
            Trigger::Notify(fd) => (
                [
                    r(&NOTIFY_SYSCALLS, fd, Trap::NotifyRead),
                    none,
                    none,
                    none,
                    none,
                ],
                1,
            ),
        }
    }
}

/// A seccomp filter program in a fixed-size buffer (no allocation).
#[derive(Clone)]
pub struct Filter {
    insns: [libc::sock_filter; MAX_INSNS],
    len: usize,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter").field("len", &self.len).finish()
    }
}

const fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

impl Filter {
    fn push(&mut self, i: libc::sock_filter) -> Result<(), LaunchError> {
        if self.len == MAX_INSNS {
            return Err(LaunchError::FilterTooLong);
        }
        self.insns[self.len] = i;
        self.len += 1;
        Ok(())
    }

    /// Build the filter trapping `triggers` (in order; the first matching rule wins).
    ///
    /// ```text
    ///   ld arch; jeq X86_64 ? next : ALLOW_END
    /// per rule:
    ///   [ld nr, unless A still holds it]
    ///   jeq s1 ? match : next; ...; jeq sn ? match : next; ja next_rule
    ///   match: [ld args[0].lo; jeq v ? ret : next_rule] ret TRACE|data
    /// ALLOW_END: ret ALLOW
    /// ```
    pub fn build(triggers: &[Trigger]) -> Result<Filter, LaunchError> {
        let mut f = Filter {
            insns: [stmt(0, 0); MAX_INSNS],
            len: 0,
        };
        f.push(stmt(BPF_LD_W_ABS, OFF_ARCH))?;
        let arch_check = f.len;
        f.push(jump(BPF_JEQ_K, AUDIT_ARCH_X86_64, 0, 0))?; // jf patched below
                                                           // A holds the syscall number unless the previous rule loaded an argument.
        let mut a_is_nr = false;
        for t in triggers {
            let (rules, count) = t.rules();
            for r in &rules[..count] {
                let n = r.syscalls.len();
                if n == 0 || n > 200 {
                    return Err(LaunchError::FilterTooLong);
                }
                if !a_is_nr {
                    f.push(stmt(BPF_LD_W_ABS, OFF_NR))?;
                }
                for (k, nr) in r.syscalls.iter().enumerate() {
                    // jt: skip the remaining jeqs and the `ja` to reach `match`.
                    f.push(jump(BPF_JEQ_K, *nr, (n - k) as u8, 0))?;
                }
                let match_len: u32 = if r.arg0.is_some() { 3 } else { 1 };
                f.push(stmt(BPF_JA, match_len))?;
                if let Some(v) = r.arg0 {
                    f.push(stmt(BPF_LD_W_ABS, off_arg_lo(0)))?;
                    f.push(jump(BPF_JEQ_K, v, 0, 1))?;
                }
                f.push(stmt(BPF_RET_K, libc::SECCOMP_RET_TRACE | r.data as u32))?;
                a_is_nr = r.arg0.is_none();
            }
        }
        f.push(stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW))?;
        let to_allow = f.len - 1 - (arch_check + 1);
        if to_allow > u8::MAX as usize {
            return Err(LaunchError::FilterTooLong);
        }
        f.insns[arch_check].jf = to_allow as u8;
        Ok(f)
    }

    /// The BPF instructions.
    pub fn instructions(&self) -> &[libc::sock_filter] {
        &self.insns[..self.len]
    }

    /// Install the filter in the calling thread with
    /// `seccomp(SECCOMP_SET_MODE_FILTER, 0, &prog)` (no `no_new_privs`: needs
    /// `CAP_SYS_ADMIN`).
    pub fn install(&self) -> Result<(), LaunchError> {
        let prog = libc::sock_fprog {
            len: self.len as u16,
            filter: self.insns.as_ptr() as *mut libc::sock_filter,
        };
        // `prog` is a live local pointing at `self.insns`, of which the first
        // `self.len` entries are initialised instructions (`len` never exceeds the array's
        // size: `push` refuses more). The kernel copies and verifies the program during the
        // call; a bad program is EINVAL, not undefined behaviour.
        // SAFETY: `prog` points at `self.len` initialised instructions; the kernel copies them.
        let r = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0u32,
                &prog as *const libc::sock_fprog,
            )
        };
        if r != 0 {
            return Err(LaunchError::sys("seccomp(SECCOMP_SET_MODE_FILTER)"));
        }
        Ok(())
    }
}

/// Install a trap for `triggers` in the calling process (see the module docs).
pub fn install_traps(triggers: &[Trigger]) -> Result<(), LaunchError> {
    Filter::build(triggers)?.install()
}

/// Install the `--ready stdin` trap: the first `read`/`readv`/`pread64`/`preadv`/
/// `preadv2` of fd 0 stops with `PTRACE_EVENT_SECCOMP` (event msg
/// `Trigger::Stdin.trace_data()`). The tracer must use `PTRACE_O_TRACESECCOMP`, or the
/// read fails with `ENOSYS`.
pub fn install_stdin_trap() -> Result<(), LaunchError> {
    install_traps(&[Trigger::Stdin])
}
