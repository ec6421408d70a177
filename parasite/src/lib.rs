//! Code that runs inside another process: the syscall-program executor and its builder.
//!
//! A *syscall program* is plain data interpreted by a tiny position-independent
//! executor ([`executor_bytes`]) that is copied as raw bytes into a target
//! process (dump: injected under ptrace; restore: mapped by the restoring
//! child at an address free in both layouts, then [`jump`]ed to).
//!
//! # Blob layout (built by [`ProgramBuilder::build`] for address `base`)
//!
//! ```text
//! base ──► +--------------------------------+ 0
//!          | executor (position independent)|   +0 syscall; int3   (SYSCALL_TRAP_OFFSET)
//!          |                                |   +4 u32 executor length
//!          |                                |   +8 entry           (ENTRY_OFFSET), rdi = header
//! program ►+--------------------------------+ align 64
//!          | Header (80 bytes)              |   magic "WSPARAS1", n_steps, steps_off,
//!          |                                |   slots_off, n_slots, status_off, data_off,
//!          |                                |   data_len, fail_mode, fail_code
//!          +--------------------------------+ header + steps_off (align 64)
//!          | RawStep[n_steps] (128 B each)  |   kind u32 | flags u32 | a u64 | b u64 | rsvd u64
//!          |                                |   | RawArg[6] (kind u32 | slot u32 | value u64)
//!          +--------------------------------+ header + slots_off
//!          | u64 slots[n_slots]             |   saved results
//!          +--------------------------------+ header + status_off (align 64)
//!          | RawStatus (32 bytes)           |   state (0 running/1 done/2 failed) | step | errno | 0
//!          +--------------------------------+ header + data_off (align 64)
//!          | data (8/16-aligned items)      |   buffers, structs, clone3 child stacks
//!          +--------------------------------+ align 64
//!          | stack (stack_size)             |
//! stack_top+--------------------------------+
//! ```
//!
//! All offsets in the header are relative to the header, and [`Arg::Data`]
//! addresses are computed at run time, so a program whose data holds no
//! absolute pointers ([`ProgramBuilder::data_pointer`]) runs at any address.
//!
//! # Execution
//! For each step, the executor evaluates its six [`Arg`]s into rdi, rsi, rdx,
//! r10, r8, r9, then: `Syscall` (result → [`Slot::LAST`] register and
//! optional slot; -4095..=-1 fails unless `may_fail`), `Jump`,
//! `JumpIfZero`/`JumpIfNonZero` (on `args[0]`), `Load`/`Store` (u32/u64
//! memory access), `Trap` (status done, `int3`, on continue status running
//! and next step), `Exit` (status done, `exit_group`), `ExitThread` (`exit`).
//! A failure writes `step`, `errno` and state failed to the status, then
//! `int3`s (repeatedly) or `exit_group(fail_code)` ([`FailMode`]).
//!
//! All interpreter state lives in r12–r15 and rbx, nothing on the stack, so
//! after a `clone3(CLONE_VM|CLONE_THREAD, new stack)` step the child thread
//! continues with the next step; it sees `Slot::LAST == 0` (use that, not a
//! memory slot, which both threads share).
//!
//! # Injection by a tracer
//! Write `blob.bytes` at `blob.base` (executable), set `rip = blob.entry`,
//! `rdi = blob.program`, `rsp = blob.stack_top`, `orig_rax = -1`, continue,
//! wait for `SIGTRAP`, read `blob.status_addr` ([`Status::decode`],
//! [`Blob::check`]), `blob.slots_addr` and `blob.data_addr`. A single syscall
//! can be run at `executor + SYSCALL_TRAP_OFFSET` with `rax`/args set.

mod builder;
mod executor;
pub mod layout;
mod status;

pub use builder::{
    Arg, Blob, DataRef, FailMode, Label, ProgramBuilder, Slot, Step, StepId, Width,
    DEFAULT_STACK_SIZE,
};
pub use executor::{executor_bytes, jump, ENTRY_OFFSET, SYSCALL_TRAP_OFFSET};
pub use status::{errno_name, Errno, ParasiteError, Status};
