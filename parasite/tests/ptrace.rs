//! Injection as dump does it: a ptrace-stopped child, one syscall run at the
//! executor's `syscall; int3`, the blob written with process_vm_writev, run
//! to its trap, results read with process_vm_readv, registers restored.

use std::mem::zeroed;
use std::ptr;
use warmstart_parasite::*;

extern "C" fn usr1_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn waitstop(pid: libc::pid_t) -> i32 {
    let mut ws = 0;
    // SAFETY: `ws` is a live c_int the kernel writes the child's status into.
    assert_eq!(unsafe { libc::waitpid(pid, &mut ws, 0) }, pid);
    assert!(libc::WIFSTOPPED(ws), "not stopped: {ws:#x}");
    libc::WSTOPSIG(ws)
}

fn getregs(pid: libc::pid_t) -> libc::user_regs_struct {
    // SAFETY: user_regs_struct is plain integers, so all-zero is a valid value; GETREGS
    // writes exactly one user_regs_struct at `data`, which points at the live local `r`.
    unsafe {
        let mut r: libc::user_regs_struct = zeroed();
        assert_eq!(libc::ptrace(libc::PTRACE_GETREGS, pid, 0, &mut r), 0);
        r
    }
}

fn setregs(pid: libc::pid_t, r: &libc::user_regs_struct) {
    // SAFETY: SETREGS only reads one user_regs_struct at `data`, which is `r`, a live
    // reference for the call.
    assert_eq!(unsafe { libc::ptrace(libc::PTRACE_SETREGS, pid, 0, r) }, 0);
}

fn cont_until_trap(pid: libc::pid_t) {
    // SAFETY: PTRACE_CONT takes integer arguments only; no memory of ours is touched.
    assert_eq!(unsafe { libc::ptrace(libc::PTRACE_CONT, pid, 0, 0) }, 0);
    assert_eq!(waitstop(pid), libc::SIGTRAP);
}

/// Runs one syscall in the tracee at `at` (`syscall; int3`).
fn inject_syscall(
    pid: libc::pid_t,
    saved: &libc::user_regs_struct,
    at: u64,
    nr: i64,
    a: [u64; 6],
) -> u64 {
    let mut r = *saved;
    r.rip = at;
    r.rax = nr as u64;
    r.orig_rax = u64::MAX;
    (r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9) = (a[0], a[1], a[2], a[3], a[4], a[5]);
    setregs(pid, &r);
    cont_until_trap(pid);
    getregs(pid).rax
}

fn remote_write(pid: libc::pid_t, addr: u64, bytes: &[u8]) {
    let local = libc::iovec {
        iov_base: bytes.as_ptr() as *mut _,
        iov_len: bytes.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut _,
        iov_len: bytes.len(),
    };
    // SAFETY: `local` covers `bytes`, readable for its length and only read; `remote` is
    // in the tracee's address space (a different process), checked by the kernel.
    let n = unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) };
    assert_eq!(n, bytes.len() as isize);
}

fn remote_read(pid: libc::pid_t, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut _,
        iov_len: len,
    };
    // SAFETY: `local` covers `buf`, our Vec, writable for `len` bytes, which the kernel
    // does not exceed; `remote` is in the tracee's address space, checked by the kernel.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    assert_eq!(n, len as isize);
    buf
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

#[test]
fn inject_into_ptrace_stopped_child() {
    let altstack = vec![0u8; 64 * 1024];
    let alt_ptr = altstack.as_ptr() as u64;
    // SAFETY: the test harness has other threads; the child only makes async-signal-safe
    // libc calls (ptrace, sigaction, sigaltstack, kill, _exit) and never returns into the
    // harness, so no lock another thread held is ever taken.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: sigaction is plain data, so all-zero is a valid start; `sa` and `ss` are
        // live locals only read by the kernel; the handler is an extern "C" fn that does
        // nothing; `alt_ptr` is `altstack`, a 64 KiB Vec of the parent's frame, still
        // allocated in this child's copy of the heap and never freed before _exit.
        unsafe {
            libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
            let mut sa: libc::sigaction = zeroed();
            sa.sa_sigaction = usr1_handler as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaddset(&mut sa.sa_mask, libc::SIGUSR2);
            if libc::sigaction(libc::SIGUSR1, &sa, ptr::null_mut()) != 0 {
                libc::_exit(1);
            }
            let ss = libc::stack_t {
                ss_sp: alt_ptr as *mut _,
                ss_flags: 0,
                ss_size: 64 * 1024,
            };
            if libc::sigaltstack(&ss, ptr::null_mut()) != 0 {
                libc::_exit(2);
            }
            libc::kill(libc::getpid(), libc::SIGSTOP);
            libc::_exit(33);
        }
    }
    assert_eq!(waitstop(pid), libc::SIGSTOP);
    let saved = getregs(pid);

    // The executor is in the child's text too (fork): run mmap there.
    let exec_in_child = executor_bytes().as_ptr() as u64 + SYSCALL_TRAP_OFFSET as u64;

    let mut b = ProgramBuilder::new();
    let act = b.data_zeroed(32);
    let ss = b.data_zeroed(24);
    b.syscall(
        libc::SYS_rt_sigaction,
        &[libc::SIGUSR1.into(), 0.into(), act.arg(), 8.into()],
        "rt_sigaction SIGUSR1",
    );
    b.syscall(libc::SYS_sigaltstack, &[0.into(), ss.arg()], "sigaltstack");
    let dumpable = b.syscall_saved(
        libc::SYS_prctl,
        &[libc::PR_GET_DUMPABLE.into()],
        "prctl get dumpable",
    );
    let me = b.syscall_saved(libc::SYS_getpid, &[], "getpid");
    b.trap();
    let bad = b.syscall(libc::SYS_close, &[(-1).into()], "close -1 after trap");
    b.trap();

    let len = b.build(0).map_len();
    let area = inject_syscall(
        pid,
        &saved,
        exec_in_child,
        libc::SYS_mmap,
        [
            0,
            len as u64,
            (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
            u64::MAX,
            0,
        ],
    );
    assert!(
        area < (-4095i64) as u64 && area.is_multiple_of(4096),
        "mmap in child: {area:#x}"
    );

    let blob = b.build(area);
    remote_write(pid, blob.base, &blob.bytes);
    let mut r = saved;
    r.rip = blob.entry;
    r.rdi = blob.program;
    r.rsp = blob.stack_top;
    r.orig_rax = u64::MAX;
    setregs(pid, &r);
    cont_until_trap(pid);

    let status = Status::decode(&remote_read(pid, blob.status_addr, blob.status_len()));
    blob.check(status).unwrap();
    let slots = remote_read(pid, blob.slots_addr, blob.slots_len());
    assert_eq!(blob.read_slot(&slots, me), Some(pid as u64));
    assert_eq!(blob.read_slot(&slots, dumpable), Some(1));
    let a = remote_read(pid, blob.addr_of(act), 32);
    assert_eq!(
        u64_at(&a, 0),
        usr1_handler as *const () as usize as u64,
        "handler"
    );
    let flags = u64_at(&a, 8);
    let want = (libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART) as u64;
    assert_eq!(flags & want, want, "flags {flags:#x}");
    assert_ne!(flags & 0x0400_0000u64 /* SA_RESTORER */, 0);
    assert_ne!(u64_at(&a, 16), 0, "restorer");
    assert_eq!(u64_at(&a, 24), 1 << (libc::SIGUSR2 - 1), "mask");
    let s = remote_read(pid, blob.addr_of(ss), 24);
    assert_eq!(u64_at(&s, 0), alt_ptr);
    assert_eq!(u64_at(&s, 16), 64 * 1024);

    // Continue after the trap: the next step fails and traps again.
    cont_until_trap(pid);
    let status = Status::decode(&remote_read(pid, blob.status_addr, blob.status_len()));
    assert_eq!(
        status,
        Status::Failed {
            step: bad.0 as u64,
            errno: libc::EBADF
        }
    );
    assert_eq!(
        blob.check(status).unwrap_err().to_string(),
        "step 5 (close -1 after trap): EBADF (errno 9)"
    );

    // A single syscall at the blob's own `syscall; int3`.
    let rc = inject_syscall(pid, &saved, blob.syscall_trap, libc::SYS_getpid, [0; 6]);
    assert_eq!(rc, pid as u64);
    // Clean up: unmap the area (from outside it: the int3 must survive the
    // munmap), restore registers, detach; the child carries on normally.
    let rc = inject_syscall(
        pid,
        &saved,
        exec_in_child,
        libc::SYS_munmap,
        [area, len as u64, 0, 0, 0, 0],
    );
    assert_eq!(rc, 0);
    setregs(pid, &saved);
    // SAFETY: PTRACE_DETACH takes integer arguments only; no memory of ours is touched.
    assert_eq!(unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0) }, 0);
    let mut ws = 0;
    // SAFETY: `ws` is a live c_int the kernel writes the child's status into.
    assert_eq!(unsafe { libc::waitpid(pid, &mut ws, 0) }, pid);
    assert!(
        libc::WIFEXITED(ws) && libc::WEXITSTATUS(ws) == 33,
        "{ws:#x}"
    );
    drop(altstack);
}
