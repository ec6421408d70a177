//! The position-independent executor (`naked_asm!`) and [`jump`].
//!
//! Register use (all interpreter state lives in registers the `syscall`
//! instruction preserves, nothing on the stack, so a `clone3` child thread
//! continues interpreting with its own copy):
//!
//! | reg   | meaning                                              |
//! |-------|------------------------------------------------------|
//! | r12   | program header address (from `rdi` at entry)         |
//! | r13   | current step index                                   |
//! | r14   | current step address                                 |
//! | r15   | slot array address                                   |
//! | rbx   | last result of this thread ([`crate::Slot::LAST`])   |
//! | rdi, rsi, rdx, r10, r8, r9 | the step's six evaluated args   |
//! | rax, rcx, r11 | scratch (clobbered by `syscall` anyway)      |
//!
//! Byte layout of the executor: offset 0 = `syscall; int3` (for tracers that
//! want to run one syscall: [`SYSCALL_TRAP_OFFSET`]), offset 4 = `u32` total
//! length of the executor, offset [`ENTRY_OFFSET`] = entry point.

use crate::layout::*;
use core::mem::offset_of;

/// Offset within [`executor_bytes`] of a bare `syscall` followed by `int3`.
pub const SYSCALL_TRAP_OFFSET: usize = 0;
/// Offset within [`executor_bytes`] of the entry point (`rdi` = program header).
pub const ENTRY_OFFSET: usize = 8;
/// Offset of the `u32` executor length embedded in the bytes.
const LEN_OFFSET: usize = 4;

/// Evaluates `args[$idx]` (16 bytes each from `{args}`) into `$dst`, using rax,
/// rcx, r11 as scratch.
macro_rules! eval_arg {
    ($off:literal, $dst:literal) => {
        concat!(
            "mov eax, dword ptr [r14 + {args} + ",
            $off,
            "]\n",
            "mov rcx, qword ptr [r14 + {args} + ",
            $off,
            " + 8]\n",
            "cmp eax, {arg_data}\n",
            "jne 2f\n",
            "add rcx, qword ptr [r12 + {h_data}]\n",
            "add rcx, r12\n",
            "jmp 4f\n",
            "2:\n",
            "cmp eax, {arg_slot}\n",
            "jne 4f\n",
            "mov r11d, dword ptr [r14 + {args} + ",
            $off,
            " + 4]\n",
            "cmp r11d, -1\n",
            "jne 3f\n",
            "add rcx, rbx\n",
            "jmp 4f\n",
            "3:\n",
            "add rcx, qword ptr [r15 + r11*8]\n",
            "4:\n",
            "mov ",
            $dst,
            ", rcx\n",
        )
    };
}

/// The executor. Never called as a Rust function: its bytes are copied and
/// jumped to (see [`executor_bytes`]).
#[unsafe(naked)]
unsafe extern "C" fn warmstart_parasite_executor() {
    core::arch::naked_asm!(
        "91:",
        // offset 0: syscall; int3 for single injected syscalls.
        "syscall",
        "int3",
        "int3",
        // offset 4: total length.
        ".long 90f - 91b",
        // offset 8: entry, rdi = header.
        "mov r12, rdi",
        "mov r15, qword ptr [r12 + {h_slots}]",
        "add r15, r12",
        "xor r13d, r13d",
        "xor ebx, ebx",
        // ---- main loop
        "20:",
        "cmp r13, qword ptr [r12 + {h_nsteps}]",
        "jae 32f",
        "mov r14, r13",
        "shl r14, {step_shift}",
        "add r14, qword ptr [r12 + {h_steps}]",
        "add r14, r12",
        eval_arg!("0", "rdi"),
        eval_arg!("16", "rsi"),
        eval_arg!("32", "rdx"),
        eval_arg!("48", "r10"),
        eval_arg!("64", "r8"),
        eval_arg!("80", "r9"),
        "mov eax, dword ptr [r14 + {s_kind}]",
        "cmp eax, {k_syscall}",
        "je 21f",
        "cmp eax, {k_jump}",
        "je 22f",
        "cmp eax, {k_jz}",
        "je 23f",
        "cmp eax, {k_jnz}",
        "je 24f",
        "cmp eax, {k_trap}",
        "je 25f",
        "cmp eax, {k_exit}",
        "je 26f",
        "cmp eax, {k_exit_thread}",
        "je 27f",
        "cmp eax, {k_load}",
        "je 28f",
        "cmp eax, {k_store}",
        "je 29f",
        // unknown kind: fail with errno 0
        "xor eax, eax",
        "jmp 31f",
        // ---- syscall
        "21:",
        "mov rax, qword ptr [r14 + {s_a}]",
        "syscall",
        "mov rbx, rax",
        "test dword ptr [r14 + {s_flags}], {f_save}",
        "jz 35f",
        "mov rcx, qword ptr [r14 + {s_b}]",
        "mov qword ptr [r15 + rcx*8], rax",
        "35:",
        "cmp rax, -4095",
        "jb 30f",
        "test dword ptr [r14 + {s_flags}], {f_may_fail}",
        "jnz 30f",
        "neg rax",
        "jmp 31f",
        // ---- jump
        "22:",
        "mov r13, qword ptr [r14 + {s_a}]",
        "jmp 20b",
        // ---- jump if zero
        "23:",
        "test rdi, rdi",
        "jnz 30f",
        "mov r13, qword ptr [r14 + {s_a}]",
        "jmp 20b",
        // ---- jump if non-zero
        "24:",
        "test rdi, rdi",
        "jz 30f",
        "mov r13, qword ptr [r14 + {s_a}]",
        "jmp 20b",
        // ---- trap: done, int3, running again, next step
        "25:",
        "mov rax, qword ptr [r12 + {h_status}]",
        "add rax, r12",
        "mov qword ptr [rax + {st_state}], {state_done}",
        "int3",
        "mov rax, qword ptr [r12 + {h_status}]",
        "add rax, r12",
        "mov qword ptr [rax + {st_state}], {state_running}",
        "jmp 30f",
        // ---- exit_group(args[0])
        "26:",
        "mov rax, qword ptr [r12 + {h_status}]",
        "add rax, r12",
        "mov qword ptr [rax + {st_state}], {state_done}",
        "mov eax, {nr_exit_group}",
        "syscall",
        "int3",
        // ---- exit(args[0])
        "27:",
        "mov eax, {nr_exit}",
        "syscall",
        "int3",
        // ---- load
        "28:",
        "cmp qword ptr [r14 + {s_a}], 4",
        "jne 36f",
        "mov eax, dword ptr [rdi]",
        "jmp 37f",
        "36:",
        "mov rax, qword ptr [rdi]",
        "37:",
        "mov rbx, rax",
        "test dword ptr [r14 + {s_flags}], {f_save}",
        "jz 30f",
        "mov rcx, qword ptr [r14 + {s_b}]",
        "mov qword ptr [r15 + rcx*8], rax",
        "jmp 30f",
        // ---- store
        "29:",
        "cmp qword ptr [r14 + {s_a}], 4",
        "jne 38f",
        "mov dword ptr [rdi], esi",
        "jmp 30f",
        "38:",
        "mov qword ptr [rdi], rsi",
        // ---- next step
        "30:",
        "inc r13",
        "jmp 20b",
        // ---- ran past the end: fail with errno 0
        "32:",
        "xor eax, eax",
        // ---- fail: rax = errno, r13 = step
        "31:",
        "mov rcx, qword ptr [r12 + {h_status}]",
        "add rcx, r12",
        "mov qword ptr [rcx + {st_step}], r13",
        "mov qword ptr [rcx + {st_errno}], rax",
        "mov qword ptr [rcx + {st_state}], {state_failed}",
        "33:",
        "cmp qword ptr [r12 + {h_fail_mode}], {fail_trap}",
        "jne 39f",
        "int3",
        "jmp 33b",
        "39:",
        "mov rdi, qword ptr [r12 + {h_fail_code}]",
        "mov eax, {nr_exit_group}",
        "syscall",
        "int3",
        "90:",
        h_nsteps = const offset_of!(Header, n_steps),
        h_steps = const offset_of!(Header, steps_off),
        h_slots = const offset_of!(Header, slots_off),
        h_status = const offset_of!(Header, status_off),
        h_data = const offset_of!(Header, data_off),
        h_fail_mode = const offset_of!(Header, fail_mode),
        h_fail_code = const offset_of!(Header, fail_code),
        step_shift = const STEP_SHIFT,
        s_kind = const offset_of!(RawStep, kind),
        s_flags = const offset_of!(RawStep, flags),
        s_a = const offset_of!(RawStep, a),
        s_b = const offset_of!(RawStep, b),
        args = const offset_of!(RawStep, args),
        arg_data = const ARG_DATA,
        arg_slot = const ARG_SLOT,
        k_syscall = const STEP_SYSCALL,
        k_jump = const STEP_JUMP,
        k_jz = const STEP_JUMP_IF_ZERO,
        k_jnz = const STEP_JUMP_IF_NONZERO,
        k_trap = const STEP_TRAP,
        k_exit = const STEP_EXIT,
        k_exit_thread = const STEP_EXIT_THREAD,
        k_load = const STEP_LOAD,
        k_store = const STEP_STORE,
        f_save = const FLAG_SAVE,
        f_may_fail = const FLAG_MAY_FAIL,
        st_state = const offset_of!(RawStatus, state),
        st_step = const offset_of!(RawStatus, step),
        st_errno = const offset_of!(RawStatus, errno),
        state_running = const STATE_RUNNING,
        state_done = const STATE_DONE,
        state_failed = const STATE_FAILED,
        fail_trap = const FAIL_TRAP,
        nr_exit = const libc::SYS_exit,
        nr_exit_group = const libc::SYS_exit_group,
    )
}

/// The executor's machine code: copy it anywhere (executable) and enter it at
/// [`ENTRY_OFFSET`] with `rdi` = program header address.
pub fn executor_bytes() -> &'static [u8] {
    let start = warmstart_parasite_executor as *const u8;
    // SAFETY: the function's code is mapped readable; bytes 4..8 hold its
    // total length, emitted by the assembler (`90f - 91b`), and the whole
    // range lies within the function.
    unsafe {
        let mut len = [0u8; 4];
        core::ptr::copy_nonoverlapping(start.add(LEN_OFFSET), len.as_mut_ptr(), 4);
        core::slice::from_raw_parts(start, u32::from_le_bytes(len) as usize)
    }
}

/// Sets `rsp = stack_top`, `rdi = program` and jumps to `entry`, in the
/// current thread. Used by the restoring child after mapping a
/// [`crate::Blob`] at its base.
///
/// # Safety
/// `entry`/`program`/`stack_top` must come from a [`crate::Blob`] whose bytes
/// are mapped (executable) at its base in this process. Nothing of the
/// current Rust stack is used afterwards; the program decides the fate of
/// the process (it should end in `Exit`, `ExitThread` or a `Trap` to a tracer).
pub unsafe fn jump(entry: u64, program: u64, stack_top: u64) -> ! {
    // SAFETY: the caller guarantees (see # Safety) that `entry` is the executor's entry in
    // a Blob mapped executable here, with `program` and `stack_top` from the same Blob;
    // the asm never returns (noreturn), so no Rust frame observes the replaced rsp.
    unsafe {
        core::arch::asm!(
            "mov rsp, {st}",
            "jmp {e}",
            st = in(reg) stack_top,
            e = in(reg) entry,
            in("rdi") program,
            options(noreturn)
        )
    }
}
