//! [`ProgramBuilder`]: pure-Rust construction of syscall programs, and [`Blob`].

use crate::executor::{executor_bytes, ENTRY_OFFSET, SYSCALL_TRAP_OFFSET};
use crate::layout::*;
use crate::status::{ParasiteError, Status};
use core::fmt;
use core::mem::size_of;

/// A result slot (a `u64` in the blob's slot area), or [`Slot::LAST`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot(u32);

impl Slot {
    /// Pseudo slot: the most recent syscall/load result of the *current
    /// thread* (held in a register, not in memory). Use it for the
    /// `JumpIfZero` after `clone3`: a memory slot is shared by both threads
    /// and would race.
    pub const LAST: Slot = Slot(SLOT_LAST);

    /// Index in the slot area (`None` for [`Slot::LAST`]).
    pub fn index(self) -> Option<usize> {
        (self.0 != SLOT_LAST).then_some(self.0 as usize)
    }

    /// Argument: the slot's value plus `add` (wrapping).
    pub fn plus(self, add: i64) -> Arg {
        Arg::Slot {
            slot: self,
            add: add as u64,
        }
    }
}

/// A region of the program's data area (offset relative to the data area).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DataRef {
    offset: u64,
    len: u64,
}

impl DataRef {
    /// Offset within the data area.
    pub fn offset(self) -> u64 {
        self.offset
    }
    /// Length in bytes.
    pub fn len(self) -> u64 {
        self.len
    }
    /// Whether the region is empty.
    pub fn is_empty(self) -> bool {
        self.len == 0
    }
    /// Argument: absolute address of byte `off` of this region.
    pub fn at(self, off: u64) -> Arg {
        Arg::Data {
            offset: self.offset + off,
        }
    }
    /// Argument: absolute address of this region.
    pub fn arg(self) -> Arg {
        self.at(0)
    }
    /// Argument: absolute address of the end of this region (a stack top).
    pub fn end(self) -> Arg {
        self.at(self.len)
    }
}

/// A step argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Arg {
    /// The value itself.
    Imm(u64),
    /// Absolute address of `offset` in the data area (computed at run time
    /// from the header address, so position independent).
    Data {
        /// Offset within the data area.
        offset: u64,
    },
    /// Value of a result slot plus `add` (wrapping).
    Slot {
        /// The slot.
        slot: Slot,
        /// Addend.
        add: u64,
    },
}

impl Default for Arg {
    fn default() -> Self {
        Arg::Imm(0)
    }
}

macro_rules! arg_from_int {
    ($($t:ty),*) => {$(
        impl From<$t> for Arg {
            fn from(v: $t) -> Arg {
                Arg::Imm(v as i64 as u64)
            }
        }
    )*};
}
arg_from_int!(i8, i16, i32, i64, isize, u8, u16, u32, usize);

impl From<u64> for Arg {
    fn from(v: u64) -> Arg {
        Arg::Imm(v)
    }
}
impl From<DataRef> for Arg {
    fn from(d: DataRef) -> Arg {
        d.arg()
    }
}
impl From<Slot> for Arg {
    fn from(s: Slot) -> Arg {
        s.plus(0)
    }
}

impl Arg {
    fn raw(self) -> RawArg {
        match self {
            Arg::Imm(v) => RawArg {
                kind: ARG_IMM,
                slot: 0,
                value: v,
            },
            Arg::Data { offset } => RawArg {
                kind: ARG_DATA,
                slot: 0,
                value: offset,
            },
            Arg::Slot { slot, add } => RawArg {
                kind: ARG_SLOT,
                slot: slot.0,
                value: add,
            },
        }
    }
}

impl fmt::Display for Arg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Arg::Imm(v) if (v as i64) < 0 && (v as i64) > -65536 => write!(f, "{}", v as i64),
            Arg::Imm(v) => write!(f, "{v:#x}"),
            Arg::Data { offset } => write!(f, "data+{offset:#x}"),
            Arg::Slot { slot, add } => {
                match slot.index() {
                    Some(i) => write!(f, "${i}")?,
                    None => write!(f, "$last")?,
                }
                match add as i64 {
                    0 => Ok(()),
                    a if a < 0 => write!(f, "-{:#x}", a.unsigned_abs()),
                    a => write!(f, "+{a:#x}"),
                }
            }
        }
    }
}

/// A jump target; bind it with [`ProgramBuilder::bind`] (before or after
/// the jumps that use it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Label(u32);

/// Index of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StepId(pub u32);

/// Memory access width for [`Step::Load`]/[`Step::Store`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Width {
    /// 4 bytes (zero-extended on load).
    U32,
    /// 8 bytes.
    U64,
}

impl Width {
    fn bytes(self) -> u64 {
        match self {
            Width::U32 => 4,
            Width::U64 => 8,
        }
    }
}

/// What to do when a step fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailMode {
    /// `int3` (repeated on every continue): for programs run under a tracer.
    #[default]
    Trap,
    /// `exit_group(code)`: for programs run without a tracer.
    ExitGroup(i32),
}

/// One step of a program (builder-side form).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `syscall(nr, args...)`; result into [`Slot::LAST`] and `save_to`.
    Syscall {
        /// Syscall number.
        nr: u64,
        /// Arguments.
        args: [Arg; 6],
        /// Slot to save the result to.
        save_to: Option<Slot>,
        /// Whether -4095..=-1 is acceptable.
        may_fail: bool,
    },
    /// Unconditional jump.
    Jump {
        /// Target.
        to: Label,
    },
    /// Jump if `value == 0`.
    JumpIfZero {
        /// Tested value.
        value: Arg,
        /// Target.
        to: Label,
    },
    /// Jump if `value != 0`.
    JumpIfNonZero {
        /// Tested value.
        value: Arg,
        /// Target.
        to: Label,
    },
    /// Read memory; result into [`Slot::LAST`] and `save_to`.
    Load {
        /// Address.
        from: Arg,
        /// Width.
        width: Width,
        /// Slot to save the value to.
        save_to: Option<Slot>,
    },
    /// Write memory.
    Store {
        /// Address.
        to: Arg,
        /// Value.
        value: Arg,
        /// Width.
        width: Width,
    },
    /// Status = done, `int3`; when continued: status = running, next step.
    Trap,
    /// Status = done, `exit_group(code)`.
    Exit {
        /// Exit code.
        code: Arg,
    },
    /// `exit(code)` of the current thread (status untouched).
    ExitThread {
        /// Exit code.
        code: Arg,
    },
}

/// The name of syscall `nr` for a program listing (the ones warmstart's programs make;
/// others show as `syscall_NR`).
pub fn syscall_name(nr: u64) -> Option<&'static str> {
    Some(match nr as i64 {
        libc::SYS_capset => "capset",
        libc::SYS_clone3 => "clone3",
        libc::SYS_close => "close",
        libc::SYS_dup3 => "dup3",
        libc::SYS_epoll_ctl => "epoll_ctl",
        libc::SYS_ioctl => "ioctl",
        libc::SYS_madvise => "madvise",
        libc::SYS_mlock2 => "mlock2",
        libc::SYS_mmap => "mmap",
        libc::SYS_mprotect => "mprotect",
        libc::SYS_mremap => "mremap",
        libc::SYS_munmap => "munmap",
        libc::SYS_openat => "openat",
        libc::SYS_prctl => "prctl",
        libc::SYS_recvmsg => "recvmsg",
        libc::SYS_rseq => "rseq",
        libc::SYS_rt_sigaction => "rt_sigaction",
        libc::SYS_rt_sigqueueinfo => "rt_sigqueueinfo",
        libc::SYS_rt_tgsigqueueinfo => "rt_tgsigqueueinfo",
        libc::SYS_seccomp => "seccomp",
        libc::SYS_set_robust_list => "set_robust_list",
        libc::SYS_set_tid_address => "set_tid_address",
        libc::SYS_setfsgid => "setfsgid",
        libc::SYS_setfsuid => "setfsuid",
        libc::SYS_setgroups => "setgroups",
        libc::SYS_setitimer => "setitimer",
        libc::SYS_setns => "setns",
        libc::SYS_setresgid => "setresgid",
        libc::SYS_setresuid => "setresuid",
        libc::SYS_sigaltstack => "sigaltstack",
        libc::SYS_timer_create => "timer_create",
        libc::SYS_timer_settime => "timer_settime",
        libc::SYS_timerfd_settime => "timerfd_settime",
        libc::SYS_unshare => "unshare",
        libc::SYS_userfaultfd => "userfaultfd",
        libc::SYS_write => "write",
        libc::SYS_read => "read",
        libc::SYS_exit => "exit",
        libc::SYS_exit_group => "exit_group",
        libc::SYS_getpid => "getpid",
        libc::SYS_gettid => "gettid",
        libc::SYS_kill => "kill",
        libc::SYS_tgkill => "tgkill",
        libc::SYS_rt_sigprocmask => "rt_sigprocmask",
        libc::SYS_brk => "brk",
        libc::SYS_arch_prctl => "arch_prctl",
        libc::SYS_mbind => "mbind",
        libc::SYS_set_mempolicy => "set_mempolicy",
        _ => return None,
    })
}

struct DataFixup {
    at: u64,
    target: u64,
}

/// Builds a syscall program; see the crate docs for the layout.
pub struct ProgramBuilder {
    steps: Vec<Step>,
    labels: Vec<String>,
    targets: Vec<Option<u32>>,
    n_slots: u32,
    data: Vec<u8>,
    fixups: Vec<DataFixup>,
    fail_mode: FailMode,
    stack_size: u64,
}

impl Default for ProgramBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// Default size of the program's own stack (the area after the data).
pub const DEFAULT_STACK_SIZE: u64 = 16 * 1024;

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl ProgramBuilder {
    /// An empty program; fail mode [`FailMode::Trap`].
    pub fn new() -> Self {
        ProgramBuilder {
            steps: Vec::new(),
            labels: Vec::new(),
            targets: Vec::new(),
            n_slots: 0,
            data: Vec::new(),
            fixups: Vec::new(),
            fail_mode: FailMode::Trap,
            stack_size: DEFAULT_STACK_SIZE,
        }
    }

    /// Sets the action on a failing step.
    pub fn fail_mode(&mut self, mode: FailMode) -> &mut Self {
        self.fail_mode = mode;
        self
    }

    /// Sets the size of the stack area placed after the data (default
    /// [`DEFAULT_STACK_SIZE`], rounded up to 16).
    pub fn stack_size(&mut self, len: u64) -> &mut Self {
        self.stack_size = align_up(len, 16);
        self
    }

    /// Copies `bytes` into the data area (8-byte aligned).
    pub fn data(&mut self, bytes: &[u8]) -> DataRef {
        self.alloc(bytes, 8)
    }

    /// `len` zero bytes in the data area (8-byte aligned).
    pub fn data_zeroed(&mut self, len: usize) -> DataRef {
        self.alloc(&vec![0; len], 8)
    }

    /// A 16-byte aligned zeroed area, e.g. a stack for a `clone3` child
    /// (`DataRef::end()` is its top; `clone_args.stack` = its start).
    pub fn stack(&mut self, len: usize) -> DataRef {
        self.alloc(&vec![0; align_up(len as u64, 16) as usize], 16)
    }

    fn alloc(&mut self, bytes: &[u8], align: u64) -> DataRef {
        let offset = align_up(self.data.len() as u64, align);
        self.data.resize(offset as usize, 0);
        self.data.extend_from_slice(bytes);
        DataRef {
            offset,
            len: bytes.len() as u64,
        }
    }

    /// At build time, writes the absolute address of `target` (+`target_off`)
    /// as a `u64` at byte `at_off` of `at` (for pointers inside data, e.g.
    /// `clone_args.stack`, iovecs, `prctl_mm_map.auxv`).
    ///
    /// # Panics
    /// If the `u64` does not fit in `at`.
    pub fn data_pointer(&mut self, at: DataRef, at_off: u64, target: DataRef, target_off: u64) {
        assert!(at_off + 8 <= at.len, "data_pointer outside its region");
        self.fixups.push(DataFixup {
            at: at.offset + at_off,
            target: target.offset + target_off,
        });
    }

    /// Overwrites bytes of the data area (e.g. to fill in a struct later).
    ///
    /// # Panics
    /// If the bytes do not fit in `at`.
    pub fn write_data(&mut self, at: DataRef, off: u64, bytes: &[u8]) {
        assert!(
            off + bytes.len() as u64 <= at.len,
            "write_data outside its region"
        );
        let start = (at.offset + off) as usize;
        self.data[start..start + bytes.len()].copy_from_slice(bytes);
    }

    /// A new result slot (initially 0).
    pub fn slot(&mut self) -> Slot {
        let s = Slot(self.n_slots);
        self.n_slots += 1;
        s
    }

    /// A new, unbound label.
    pub fn label(&mut self) -> Label {
        self.targets.push(None);
        Label(self.targets.len() as u32 - 1)
    }

    /// Binds `label` to the next step to be added.
    ///
    /// # Panics
    /// If the label is already bound.
    pub fn bind(&mut self, label: Label) -> &mut Self {
        let t = &mut self.targets[label.0 as usize];
        assert!(t.is_none(), "label bound twice");
        *t = Some(self.steps.len() as u32);
        self
    }

    /// A new label bound to the next step.
    pub fn here(&mut self) -> Label {
        let l = self.label();
        self.bind(l);
        l
    }

    /// Appends any step.
    pub fn push(&mut self, step: Step, label: impl Into<String>) -> StepId {
        self.steps.push(step);
        self.labels.push(label.into());
        StepId(self.steps.len() as u32 - 1)
    }

    fn args6(args: &[Arg]) -> [Arg; 6] {
        assert!(args.len() <= 6, "a syscall takes at most 6 arguments");
        let mut a = [Arg::Imm(0); 6];
        a[..args.len()].copy_from_slice(args);
        a
    }

    /// Syscall step; a -errno result fails the program.
    pub fn syscall(&mut self, nr: i64, args: &[Arg], label: impl Into<String>) -> StepId {
        self.syscall_with(nr, args, None, false, label)
    }

    /// Syscall step whose result is saved to a new slot.
    pub fn syscall_saved(&mut self, nr: i64, args: &[Arg], label: impl Into<String>) -> Slot {
        let slot = self.slot();
        self.syscall_with(nr, args, Some(slot), false, label);
        slot
    }

    /// Syscall step whose -errno result is acceptable (see [`Slot::LAST`]).
    pub fn syscall_may_fail(&mut self, nr: i64, args: &[Arg], label: impl Into<String>) -> StepId {
        self.syscall_with(nr, args, None, true, label)
    }

    /// Syscall step, general form.
    pub fn syscall_with(
        &mut self,
        nr: i64,
        args: &[Arg],
        save_to: Option<Slot>,
        may_fail: bool,
        label: impl Into<String>,
    ) -> StepId {
        let step = Step::Syscall {
            nr: nr as u64,
            args: Self::args6(args),
            save_to,
            may_fail,
        };
        self.push(step, label)
    }

    /// Loads `width` bytes from `from` into [`Slot::LAST`] (and `save_to`).
    pub fn load(&mut self, from: impl Into<Arg>, width: Width, save_to: Option<Slot>) -> StepId {
        let from = from.into();
        self.push(
            Step::Load {
                from,
                width,
                save_to,
            },
            format!("load {from}"),
        )
    }

    /// Stores `value` (`width` bytes) at `to`.
    pub fn store(&mut self, to: impl Into<Arg>, value: impl Into<Arg>, width: Width) -> StepId {
        let (to, value) = (to.into(), value.into());
        self.push(
            Step::Store { to, value, width },
            format!("store {to} = {value}"),
        )
    }

    /// Unconditional jump.
    pub fn jump(&mut self, to: Label) -> StepId {
        self.push(Step::Jump { to }, "jump")
    }

    /// Jumps if `value` is zero.
    pub fn jump_if_zero(&mut self, value: impl Into<Arg>, to: Label) -> StepId {
        let value = value.into();
        self.push(Step::JumpIfZero { value, to }, format!("if {value} == 0"))
    }

    /// Jumps if `value` is non-zero.
    pub fn jump_if_nonzero(&mut self, value: impl Into<Arg>, to: Label) -> StepId {
        let value = value.into();
        self.push(
            Step::JumpIfNonZero { value, to },
            format!("if {value} != 0"),
        )
    }

    /// `int3` to the tracer (status = done while stopped).
    pub fn trap(&mut self) -> StepId {
        self.push(Step::Trap, "trap")
    }

    /// `exit_group(code)` (status = done first).
    pub fn exit(&mut self, code: impl Into<Arg>) -> StepId {
        let code = code.into();
        self.push(Step::Exit { code }, format!("exit_group {code}"))
    }

    /// `exit(code)` of the current thread.
    pub fn exit_thread(&mut self, code: impl Into<Arg>) -> StepId {
        let code = code.into();
        self.push(Step::ExitThread { code }, format!("exit thread {code}"))
    }

    /// Number of steps so far.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Whether no step was added.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The steps.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// The label of a step (`""` if out of range).
    pub fn describe(&self, step: StepId) -> &str {
        self.labels.get(step.0 as usize).map_or("", |s| s)
    }

    fn target(&self, l: Label) -> u64 {
        match self.targets[l.0 as usize] {
            Some(t) => t as u64,
            None => panic!("label {} used but never bound", l.0),
        }
    }

    fn raw_step(&self, step: &Step) -> RawStep {
        let mut r = RawStep::default();
        let save = |r: &mut RawStep, s: Option<Slot>| {
            if let Some(s) = s {
                let i = s.index().expect("Slot::LAST is not a save target");
                r.flags |= FLAG_SAVE;
                r.b = i as u64;
            }
        };
        match *step {
            Step::Syscall {
                nr,
                args,
                save_to,
                may_fail,
            } => {
                r.kind = STEP_SYSCALL;
                r.a = nr;
                for (d, s) in r.args.iter_mut().zip(args) {
                    *d = s.raw();
                }
                save(&mut r, save_to);
                if may_fail {
                    r.flags |= FLAG_MAY_FAIL;
                }
            }
            Step::Jump { to } => {
                r.kind = STEP_JUMP;
                r.a = self.target(to);
            }
            Step::JumpIfZero { value, to } => {
                r.kind = STEP_JUMP_IF_ZERO;
                r.a = self.target(to);
                r.args[0] = value.raw();
            }
            Step::JumpIfNonZero { value, to } => {
                r.kind = STEP_JUMP_IF_NONZERO;
                r.a = self.target(to);
                r.args[0] = value.raw();
            }
            Step::Load {
                from,
                width,
                save_to,
            } => {
                r.kind = STEP_LOAD;
                r.a = width.bytes();
                r.args[0] = from.raw();
                save(&mut r, save_to);
            }
            Step::Store { to, value, width } => {
                r.kind = STEP_STORE;
                r.a = width.bytes();
                r.args[0] = to.raw();
                r.args[1] = value.raw();
            }
            Step::Trap => r.kind = STEP_TRAP,
            Step::Exit { code } => {
                r.kind = STEP_EXIT;
                r.args[0] = code.raw();
            }
            Step::ExitThread { code } => {
                r.kind = STEP_EXIT_THREAD;
                r.args[0] = code.raw();
            }
        }
        r
    }

    /// Lays out `[executor][header][steps][slots][status][data][stack]` for
    /// copying to address `base` (which must be 16-byte aligned; page
    /// aligned when mmapped).
    ///
    /// # Panics
    /// If a used label was never bound, `base` is misaligned, or a slot
    /// index is invalid.
    pub fn build(&self, base: u64) -> Blob {
        assert!(base.is_multiple_of(16), "blob base must be 16-byte aligned");
        let exec = executor_bytes();
        let header_off = align_up(exec.len() as u64, 64);
        let steps_off = align_up(size_of::<Header>() as u64, 64); // from header
        let slots_off = steps_off + (self.steps.len() * size_of::<RawStep>()) as u64;
        let status_off = align_up(slots_off + 8 * self.n_slots as u64, 64);
        let data_off = align_up(status_off + Status::SIZE as u64, 64);
        let stack_off = align_up(data_off + self.data.len() as u64, 64);
        let total = header_off + stack_off + self.stack_size;

        let mut bytes = vec![0u8; total as usize];
        bytes[..exec.len()].copy_from_slice(exec);
        let h = header_off as usize;
        let (fail_mode, fail_code) = match self.fail_mode {
            FailMode::Trap => (FAIL_TRAP, 0),
            FailMode::ExitGroup(c) => (FAIL_EXIT_GROUP, c as i64 as u64),
        };
        Header {
            magic: MAGIC,
            n_steps: self.steps.len() as u64,
            steps_off,
            slots_off,
            n_slots: self.n_slots as u64,
            status_off,
            data_off,
            data_len: self.data.len() as u64,
            fail_mode,
            fail_code,
        }
        .write(&mut bytes[h..]);
        for (i, step) in self.steps.iter().enumerate() {
            let at = h + steps_off as usize + i * size_of::<RawStep>();
            self.raw_step(step).write(&mut bytes[at..]);
        }
        let d = h + data_off as usize;
        bytes[d..d + self.data.len()].copy_from_slice(&self.data);
        let data_addr = base + header_off + data_off;
        for fx in &self.fixups {
            let at = d + fx.at as usize;
            bytes[at..at + 8].copy_from_slice(&(data_addr + fx.target).to_le_bytes());
        }

        Blob {
            bytes,
            base,
            entry: base + ENTRY_OFFSET as u64,
            syscall_trap: base + SYSCALL_TRAP_OFFSET as u64,
            program: base + header_off,
            stack_top: base + total,
            slots_addr: base + header_off + slots_off,
            n_slots: self.n_slots as usize,
            status_addr: base + header_off + status_off,
            data_addr,
            data_len: self.data.len(),
            labels: self.labels.clone(),
        }
    }
}

impl fmt::Display for ProgramBuilder {
    /// One line per step: `  12  7f00-7f02 anon  | mmap(0x7f.., ...) -> $3` (the label,
    /// then the step; syscalls by name where [`syscall_name`] knows it).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let target = |l: Label| match self.targets[l.0 as usize] {
            Some(t) => t.to_string(),
            None => "?".to_string(),
        };
        for (i, (step, label)) in self.steps.iter().zip(&self.labels).enumerate() {
            write!(f, "{i:>4}  {label}  | ")?;
            match step {
                Step::Syscall {
                    nr,
                    args,
                    save_to,
                    may_fail,
                } => {
                    match syscall_name(*nr) {
                        Some(name) => write!(f, "{name}(")?,
                        None => write!(f, "syscall {nr}(")?,
                    }
                    let n = args
                        .iter()
                        .rposition(|a| *a != Arg::Imm(0))
                        .map_or(0, |p| p + 1);
                    for (j, a) in args[..n].iter().enumerate() {
                        if j > 0 {
                            f.write_str(", ")?;
                        }
                        write!(f, "{a}")?;
                    }
                    f.write_str(")")?;
                    if let Some(s) = save_to {
                        write!(f, " -> {}", Arg::from(*s))?;
                    }
                    if *may_fail {
                        f.write_str(" may-fail")?;
                    }
                }
                Step::Jump { to } => write!(f, "jump {}", target(*to))?,
                Step::JumpIfZero { value, to } => {
                    write!(f, "if {value} == 0 jump {}", target(*to))?
                }
                Step::JumpIfNonZero { value, to } => {
                    write!(f, "if {value} != 0 jump {}", target(*to))?
                }
                Step::Load {
                    from,
                    width,
                    save_to,
                } => {
                    write!(f, "load{} [{from}]", width.bytes() * 8)?;
                    if let Some(s) = save_to {
                        write!(f, " -> {}", Arg::from(*s))?;
                    }
                }
                Step::Store { to, value, width } => {
                    write!(f, "store{} [{to}] = {value}", width.bytes() * 8)?
                }
                Step::Trap => f.write_str("int3")?,
                Step::Exit { code } => write!(f, "exit_group({code})")?,
                Step::ExitThread { code } => write!(f, "exit({code})")?,
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

/// A built program, ready to be copied to `base`.
#[derive(Debug, Clone)]
pub struct Blob {
    /// The bytes to copy to `base` (map them RWX, or RW + X for the executor).
    pub bytes: Vec<u8>,
    /// Address the blob was built for.
    pub base: u64,
    /// Absolute executor entry (`rip`).
    pub entry: u64,
    /// Absolute address of `syscall; int3` (single injected syscalls).
    pub syscall_trap: u64,
    /// Absolute program header address (`rdi`).
    pub program: u64,
    /// Top of the program's stack (`rsp`; 16-byte aligned).
    pub stack_top: u64,
    /// Absolute address of the slot area (`n_slots` little-endian `u64`s).
    pub slots_addr: u64,
    /// Number of slots.
    pub n_slots: usize,
    /// Absolute address of the status area ([`Status::SIZE`] bytes).
    pub status_addr: u64,
    /// Absolute address of the data area.
    pub data_addr: u64,
    /// Length of the data area.
    pub data_len: usize,
    labels: Vec<String>,
}

impl Blob {
    /// Length of `bytes`.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether `bytes` is empty (never).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Length rounded up to the page size (4 KiB), for mmap.
    pub fn map_len(&self) -> usize {
        align_up(self.bytes.len() as u64, 4096) as usize
    }

    /// Size of the status area.
    pub fn status_len(&self) -> usize {
        Status::SIZE
    }

    /// Size of the slot area in bytes.
    pub fn slots_len(&self) -> usize {
        self.n_slots * 8
    }

    /// Offset of an absolute address within `bytes`.
    pub fn offset_of(&self, addr: u64) -> usize {
        (addr - self.base) as usize
    }

    /// Absolute address of a data region.
    pub fn addr_of(&self, d: DataRef) -> u64 {
        self.data_addr + d.offset
    }

    /// Absolute address of a slot (`None` for [`Slot::LAST`]).
    pub fn slot_addr(&self, s: Slot) -> Option<u64> {
        s.index().map(|i| self.slots_addr + 8 * i as u64)
    }

    /// Reads a slot out of a copy of the slot area (as read from the target).
    pub fn read_slot(&self, slots: &[u8], s: Slot) -> Option<u64> {
        let i = s.index()?;
        let b = slots.get(i * 8..i * 8 + 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    /// The label of a step (`""` if out of range).
    pub fn describe(&self, step: u64) -> &str {
        self.labels.get(step as usize).map_or("", |s| s)
    }

    /// Turns a status into `Ok` (done) or an error naming the failed step.
    pub fn check(&self, status: Status) -> Result<(), ParasiteError> {
        match status {
            Status::Done => Ok(()),
            Status::Running => Err(ParasiteError::NotFinished),
            Status::Invalid(w) => Err(ParasiteError::InvalidStatus(w)),
            Status::Failed { step, errno: 0 } if step >= self.labels.len() as u64 => {
                Err(ParasiteError::RanPastEnd { step })
            }
            Status::Failed { step, errno: 0 } => Err(ParasiteError::InvalidStep {
                step,
                label: self.describe(step).to_string(),
            }),
            Status::Failed { step, errno } => Err(ParasiteError::StepFailed {
                step,
                label: self.describe(step).to_string(),
                errno,
            }),
        }
    }
}
