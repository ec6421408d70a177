//! `#[repr(C)]` structures shared by the builder (which serialises them) and the
//! executor (which reads them through `offset_of!` constants baked into its asm).
//!
//! All fields are little-endian `u32`/`u64`. Offsets stored in the [`Header`] are
//! relative to the header's own address, so a program (without absolute pointers
//! inside its data) can be copied anywhere.

use core::mem::{offset_of, size_of};

/// `"WSPARAS1"` little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"WSPARAS1");

/// Program header; `rdi` points here when the executor is entered.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// [`MAGIC`] (not checked by the executor; for tracers/debuggers).
    pub magic: u64,
    /// Number of [`RawStep`]s.
    pub n_steps: u64,
    /// Offset of the step array from the header.
    pub steps_off: u64,
    /// Offset of the result slots (`u64` each) from the header.
    pub slots_off: u64,
    /// Number of result slots.
    pub n_slots: u64,
    /// Offset of the [`RawStatus`] from the header.
    pub status_off: u64,
    /// Offset of the data area from the header.
    pub data_off: u64,
    /// Length of the data area.
    pub data_len: u64,
    /// [`FAIL_TRAP`] or [`FAIL_EXIT_GROUP`].
    pub fail_mode: u64,
    /// Exit code for [`FAIL_EXIT_GROUP`].
    pub fail_code: u64,
}

/// On failure: `int3` (again on every continue).
pub const FAIL_TRAP: u64 = 0;
/// On failure: `exit_group(fail_code)`.
pub const FAIL_EXIT_GROUP: u64 = 1;

/// One argument: 16 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawArg {
    /// [`ARG_IMM`], [`ARG_DATA`] or [`ARG_SLOT`].
    pub kind: u32,
    /// Slot index for [`ARG_SLOT`]; [`SLOT_LAST`] = the thread's last result register.
    pub slot: u32,
    /// Immediate; data-area offset; or addend for a slot.
    pub value: u64,
}

/// `value` is used as is.
pub const ARG_IMM: u32 = 0;
/// `header + data_off + value`.
pub const ARG_DATA: u32 = 1;
/// `slots[slot] + value` (wrapping), or `last + value` if `slot == SLOT_LAST`.
pub const ARG_SLOT: u32 = 2;
/// Pseudo slot index: the most recent result of *this thread* (kept in `rbx`).
pub const SLOT_LAST: u32 = u32::MAX;

/// One step: 128 bytes (the executor indexes with `shl 7`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawStep {
    /// `STEP_*`.
    pub kind: u32,
    /// `FLAG_*`.
    pub flags: u32,
    /// Syscall number; jump target step index; load/store width (4 or 8).
    pub a: u64,
    /// Slot index to save the result to (if [`FLAG_SAVE`]).
    pub b: u64,
    /// Reserved, zero.
    pub reserved: u64,
    /// Arguments, evaluated into rdi, rsi, rdx, r10, r8, r9 before every step.
    pub args: [RawArg; 6],
}

/// `rax = a; syscall` with the six args.
pub const STEP_SYSCALL: u32 = 0;
/// Go to step `a`.
pub const STEP_JUMP: u32 = 1;
/// Go to step `a` if `args[0] == 0`.
pub const STEP_JUMP_IF_ZERO: u32 = 2;
/// Go to step `a` if `args[0] != 0`.
pub const STEP_JUMP_IF_NONZERO: u32 = 3;
/// Status = done; `int3`; on continue status = running and go on.
pub const STEP_TRAP: u32 = 4;
/// Status = done; `exit_group(args[0])`.
pub const STEP_EXIT: u32 = 5;
/// `exit(args[0])` (this thread only; status untouched).
pub const STEP_EXIT_THREAD: u32 = 6;
/// Result = `*(width*)args[0]` (zero-extended).
pub const STEP_LOAD: u32 = 7;
/// `*(width*)args[0] = args[1]`.
pub const STEP_STORE: u32 = 8;

/// Save the result to slot `b`.
pub const FLAG_SAVE: u32 = 1;
/// A result in -4095..=-1 is not a failure.
pub const FLAG_MAY_FAIL: u32 = 2;

/// Status area: 32 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawStatus {
    /// [`STATE_RUNNING`], [`STATE_DONE`] or [`STATE_FAILED`].
    pub state: u64,
    /// Failing step index.
    pub step: u64,
    /// Positive errno (0: ran past the last step or invalid step kind).
    pub errno: u64,
    /// Reserved, zero.
    pub reserved: u64,
}

/// Initial state.
pub const STATE_RUNNING: u64 = 0;
/// A `Trap`/`Exit` step was reached.
pub const STATE_DONE: u64 = 1;
/// A step failed; `step` and `errno` are valid.
pub const STATE_FAILED: u64 = 2;

const _: () = assert!(size_of::<Header>() == 80);
const _: () = assert!(size_of::<RawArg>() == 16);
const _: () = assert!(size_of::<RawStep>() == 128);
const _: () = assert!(offset_of!(RawStep, args) == 32);
const _: () = assert!(size_of::<RawStatus>() == 32);

/// log2 of `size_of::<RawStep>()`.
pub const STEP_SHIFT: u32 = 7;

fn put(out: &mut [u8], at: usize, v: u64) {
    out[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn put32(out: &mut [u8], at: usize, v: u32) {
    out[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

impl Header {
    /// Serialise into `out[..80]`.
    pub fn write(&self, out: &mut [u8]) {
        put(out, offset_of!(Header, magic), self.magic);
        put(out, offset_of!(Header, n_steps), self.n_steps);
        put(out, offset_of!(Header, steps_off), self.steps_off);
        put(out, offset_of!(Header, slots_off), self.slots_off);
        put(out, offset_of!(Header, n_slots), self.n_slots);
        put(out, offset_of!(Header, status_off), self.status_off);
        put(out, offset_of!(Header, data_off), self.data_off);
        put(out, offset_of!(Header, data_len), self.data_len);
        put(out, offset_of!(Header, fail_mode), self.fail_mode);
        put(out, offset_of!(Header, fail_code), self.fail_code);
    }
}

impl RawStep {
    /// Serialise into `out[..128]`.
    pub fn write(&self, out: &mut [u8]) {
        put32(out, offset_of!(RawStep, kind), self.kind);
        put32(out, offset_of!(RawStep, flags), self.flags);
        put(out, offset_of!(RawStep, a), self.a);
        put(out, offset_of!(RawStep, b), self.b);
        put(out, offset_of!(RawStep, reserved), self.reserved);
        for (i, arg) in self.args.iter().enumerate() {
            let at = offset_of!(RawStep, args) + i * size_of::<RawArg>();
            put32(out, at + offset_of!(RawArg, kind), arg.kind);
            put32(out, at + offset_of!(RawArg, slot), arg.slot);
            put(out, at + offset_of!(RawArg, value), arg.value);
        }
    }
}
