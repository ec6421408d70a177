//! Runs syscall programs in forked children (never in the harness threads).

use std::ptr;
use warmstart_parasite::*;

/// A MAP_SHARED|MAP_ANONYMOUS RWX mapping, created before fork so the parent
/// sees what the program wrote.
struct Shared {
    ptr: *mut u8,
    len: usize,
}

impl Shared {
    fn new(len: usize) -> Shared {
        // SAFETY: a fresh shared anonymous mapping at an address the kernel picks, so it
        // replaces nothing; the Shared owns it until drop.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Shared { ptr: p.cast(), len }
    }
    fn addr(&self) -> u64 {
        self.ptr as u64
    }
    fn bytes(&self) -> Vec<u8> {
        // SAFETY: `ptr` is mapped readable for `len` bytes until drop, and the only other
        // writer, the forked child, has been reaped (wait_code runs before this), so the
        // bytes do not change while the slice is copied out.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len).to_vec() }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping Shared::new made; no slice into it outlives
        // bytes(), and it is unmapped only here, once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

struct Run {
    blob: Blob,
    /// Exit code, or -signal.
    code: i32,
    mem: Vec<u8>,
}

impl Run {
    fn status(&self) -> Status {
        let off = self.blob.offset_of(self.blob.status_addr);
        Status::decode(&self.mem[off..off + Status::SIZE])
    }
    fn data(&self, d: DataRef) -> &[u8] {
        let off = self.blob.offset_of(self.blob.addr_of(d));
        &self.mem[off..off + d.len() as usize]
    }
    fn slot(&self, s: Slot) -> u64 {
        let off = self.blob.offset_of(self.blob.slots_addr);
        self.blob
            .read_slot(&self.mem[off..off + self.blob.slots_len()], s)
            .unwrap()
    }
}

fn wait_code(pid: libc::pid_t) -> i32 {
    let mut ws = 0;
    // SAFETY: `ws` is a live c_int the kernel writes the child's status into.
    let r = unsafe { libc::waitpid(pid, &mut ws, 0) };
    assert_eq!(r, pid);
    if libc::WIFEXITED(ws) {
        libc::WEXITSTATUS(ws)
    } else {
        assert!(libc::WIFSIGNALED(ws), "unexpected wait status {ws:#x}");
        -libc::WTERMSIG(ws)
    }
}

/// Builds `b` for a fresh shared mapping, forks, and jumps to it in the child.
fn run_forked(b: &ProgramBuilder) -> Run {
    let len = b.build(0).map_len();
    let shared = Shared::new(len);
    run_forked_at(b, &shared)
}

fn run_forked_at(b: &ProgramBuilder, shared: &Shared) -> Run {
    let blob = b.build(shared.addr());
    assert!(blob.map_len() <= shared.len);
    // SAFETY: the destination is the Shared mapping, writable for shared.len bytes, and
    // blob.len() <= blob.map_len() <= shared.len (asserted above); the blob's own Vec
    // cannot overlap a fresh mmap.
    unsafe { ptr::copy_nonoverlapping(blob.bytes.as_ptr(), shared.ptr, blob.len()) };
    // SAFETY: the test harness has other threads, so the child must take no lock they
    // might hold: it does nothing but jump into the blob, whose syscall program runs
    // without libc, allocation or locks and ends the process itself.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: jump's contract: the blob was built for shared.addr() and copied
        // there, and the mapping is RWX and inherited by this child; nothing of the Rust
        // stack is needed after the jump, since the program ends the process.
        unsafe { jump(blob.entry, blob.program, blob.stack_top) }
    }
    let code = wait_code(pid);
    Run {
        mem: shared.bytes(),
        blob,
        code,
    }
}

#[test]
fn executor_shape() {
    let e = executor_bytes();
    assert_eq!(
        &e[SYSCALL_TRAP_OFFSET..SYSCALL_TRAP_OFFSET + 3],
        &[0x0f, 0x05, 0xcc]
    );
    assert!(
        e.len() > ENTRY_OFFSET + 16 && e.len() < 4096,
        "len {}",
        e.len()
    );
    assert_eq!(
        u32::from_le_bytes(e[4..8].try_into().unwrap()) as usize,
        e.len()
    );
}

/// No 8-byte window of the executor equals an address inside any mapping of
/// this process (text, data, heap, stacks, libraries): it embeds no absolute
/// addresses.
#[test]
fn executor_has_no_absolute_addresses() {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let ranges: Vec<(u64, u64)> = maps
        .lines()
        .map(|l| {
            let r = l.split_whitespace().next().unwrap();
            let (a, b) = r.split_once('-').unwrap();
            (
                u64::from_str_radix(a, 16).unwrap(),
                u64::from_str_radix(b, 16).unwrap(),
            )
        })
        .collect();
    let exe = std::env::current_exe().unwrap();
    assert!(maps.contains(exe.to_str().unwrap()));
    let e = executor_bytes();
    for w in e.windows(8) {
        let v = u64::from_le_bytes(w.try_into().unwrap());
        for &(a, b) in &ranges {
            assert!(!(a..b).contains(&v), "absolute address {v:#x} in executor");
        }
    }
}

/// pipe2, mmap a page, write a message through the pipe into the page and
/// back out into shared data, munmap, exit(7).
fn pipe_program() -> (ProgramBuilder, DataRef, DataRef, Slot) {
    let msg = b"hello from the parasite";
    let mut b = ProgramBuilder::new();
    b.fail_mode(FailMode::ExitGroup(99));
    let fds = b.data_zeroed(8);
    let text = b.data(msg);
    let out = b.data_zeroed(msg.len());
    let n = msg.len() as u64;
    b.syscall(libc::SYS_pipe2, &[fds.arg(), 0.into()], "pipe2");
    let rfd = b.slot();
    let wfd = b.slot();
    b.load(fds.at(0), Width::U32, Some(rfd));
    b.load(fds.at(4), Width::U32, Some(wfd));
    let page = b.syscall_saved(
        libc::SYS_mmap,
        &[
            0.into(),
            4096.into(),
            (libc::PROT_READ | libc::PROT_WRITE).into(),
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS).into(),
            (-1).into(),
            0.into(),
        ],
        "mmap scratch page",
    );
    b.syscall(
        libc::SYS_write,
        &[wfd.into(), text.arg(), n.into()],
        "write msg",
    );
    b.syscall(
        libc::SYS_read,
        &[rfd.into(), page.plus(100), n.into()],
        "read into page",
    );
    b.syscall(
        libc::SYS_write,
        &[wfd.into(), page.plus(100), n.into()],
        "write page",
    );
    b.syscall(
        libc::SYS_read,
        &[rfd.into(), out.arg(), n.into()],
        "read into out",
    );
    b.syscall(
        libc::SYS_munmap,
        &[page.into(), 4096.into()],
        "munmap scratch page",
    );
    b.exit(7);
    (b, text, out, page)
}

#[test]
fn pipe_roundtrip_same_result_at_two_addresses() {
    let (b, text, out, page) = pipe_program();
    let len = b.build(0).map_len();
    let m1 = Shared::new(len);
    let m2 = Shared::new(len + 8192); // different address
    let r1 = run_forked_at(&b, &m1);
    let r2 = run_forked_at(&b, &m2);
    assert_ne!(r1.blob.base, r2.blob.base);
    // Identical program bytes: nothing depends on the address.
    assert_eq!(r1.blob.bytes, r2.blob.bytes);
    for r in [&r1, &r2] {
        assert_eq!(r.code, 7, "{:?}", r.blob.check(r.status()));
        assert_eq!(r.status(), Status::Done);
        r.blob.check(r.status()).unwrap();
        assert_eq!(r.data(out), r.data(text));
        let p = r.slot(page);
        assert!(p != 0 && p % 4096 == 0, "page {p:#x}");
    }
}

#[test]
fn failing_step_reports_index_and_errno() {
    let mut b = ProgramBuilder::new();
    b.fail_mode(FailMode::ExitGroup(42));
    b.syscall(libc::SYS_getpid, &[], "getpid");
    b.syscall_may_fail(libc::SYS_close, &[(-1).into()], "close -1 (allowed)");
    let bad = b.syscall(libc::SYS_close, &[(-1).into()], "close fd -1");
    b.exit(0);
    assert_eq!(b.describe(bad), "close fd -1");
    let r = run_forked(&b);
    assert_eq!(r.code, 42);
    assert_eq!(
        r.status(),
        Status::Failed {
            step: 2,
            errno: libc::EBADF
        }
    );
    let err = r.blob.check(r.status()).unwrap_err();
    assert_eq!(err.to_string(), "step 2 (close fd -1): EBADF (errno 9)");
}

#[test]
fn may_fail_result_is_usable() {
    let mut b = ProgramBuilder::new();
    b.syscall_may_fail(libc::SYS_close, &[(-1).into()], "close -1");
    b.exit(Slot::LAST.plus(100)); // -EBADF + 100
    let r = run_forked(&b);
    assert_eq!(r.code, 100 - libc::EBADF);
    assert_eq!(r.status(), Status::Done);
}

#[test]
fn running_past_the_end_is_reported() {
    let mut b = ProgramBuilder::new();
    b.fail_mode(FailMode::ExitGroup(3));
    b.syscall(libc::SYS_getpid, &[], "getpid");
    let r = run_forked(&b);
    assert_eq!(r.code, 3);
    assert_eq!(r.status(), Status::Failed { step: 1, errno: 0 });
    assert_eq!(
        r.blob.check(r.status()).unwrap_err(),
        ParasiteError::RanPastEnd { step: 1 }
    );
}

/// counter = 5; acc = 0; while counter != 0 { counter -= 1; acc += 3 };
/// skip a failing close via Jump; exit(acc).
#[test]
fn jumps_and_loops() {
    let mut b = ProgramBuilder::new();
    b.fail_mode(FailMode::ExitGroup(99));
    let counter = b.data(&5u64.to_le_bytes());
    let acc = b.data(&0u64.to_le_bytes());
    let top = b.here();
    let done = b.label();
    b.load(counter.arg(), Width::U64, None);
    b.jump_if_zero(Slot::LAST, done);
    b.store(counter.arg(), Slot::LAST.plus(-1), Width::U64);
    b.load(acc.arg(), Width::U64, None);
    b.store(acc.arg(), Slot::LAST.plus(3), Width::U64);
    b.jump(top);
    b.bind(done);
    let skip = b.label();
    b.jump(skip);
    b.syscall(libc::SYS_close, &[(-1).into()], "must be skipped");
    b.bind(skip);
    let v = b.slot();
    b.load(acc.arg(), Width::U32, Some(v));
    let ok = b.label();
    b.jump_if_nonzero(v, ok);
    b.exit(1);
    b.bind(ok);
    b.exit(v);
    let text = b.to_string();
    assert!(text.contains("if $last == 0 jump"), "{text}");
    assert!(text.contains("must be skipped  | close(-1)"), "{text}");
    let r = run_forked(&b);
    assert_eq!(r.code, 15, "{:?}", r.blob.check(r.status()));
    assert_eq!(r.data(counter), 0u64.to_le_bytes());
}

/// clone3 a thread on its own stack; the thread branches with JumpIfZero on
/// its (register) result, stores a marker and exits; the main thread waits
/// on the CLONE_CHILD_CLEARTID futex word in a loop, then exits with the
/// marker: interpreter state survives clone3 in both threads.
#[test]
fn clone3_thread_continues_interpreting() {
    let mut b = ProgramBuilder::new();
    b.fail_mode(FailMode::ExitGroup(99));
    let tid = b.data_zeroed(8);
    let marker = b.data_zeroed(8);
    let waits = b.data_zeroed(8);
    let stack = b.stack(16 * 1024);
    let args = b.data_zeroed(88);
    let flags = (libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM
        | libc::CLONE_PARENT_SETTID
        | libc::CLONE_CHILD_CLEARTID) as u64;
    b.write_data(args, 0, &flags.to_le_bytes());
    b.data_pointer(args, 16, tid, 0); // child_tid
    b.data_pointer(args, 24, tid, 0); // parent_tid
    b.data_pointer(args, 40, stack, 0); // stack
    b.write_data(args, 48, &stack.len().to_le_bytes()); // stack_size

    let child = b.label();
    b.syscall(libc::SYS_clone3, &[args.arg(), 88.into()], "clone3 thread");
    b.jump_if_zero(Slot::LAST, child);
    // main thread
    let wait = b.here();
    let done = b.label();
    b.load(tid.arg(), Width::U32, None);
    b.jump_if_zero(Slot::LAST, done);
    b.syscall_may_fail(
        libc::SYS_futex,
        &[
            tid.arg(),
            libc::FUTEX_WAIT.into(),
            Slot::LAST.into(),
            0.into(),
        ],
        "futex wait for thread exit",
    );
    b.load(waits.arg(), Width::U64, None);
    b.store(waits.arg(), Slot::LAST.plus(1), Width::U64);
    b.jump(wait);
    b.bind(done);
    b.load(marker.arg(), Width::U64, None);
    b.exit(Slot::LAST);
    // thread: slow down a little so the main thread really waits
    b.bind(child);
    let ts = b.data(&[0u64.to_le_bytes(), 20_000_000u64.to_le_bytes()].concat());
    b.syscall(libc::SYS_nanosleep, &[ts.arg(), 0.into()], "nanosleep");
    b.syscall_saved(libc::SYS_gettid, &[], "gettid");
    b.store(marker.arg(), 0x5a, Width::U64);
    b.exit_thread(0);

    let r = run_forked(&b);
    assert_eq!(r.code, 0x5a, "{:?}", r.blob.check(r.status()));
    assert_eq!(r.status(), Status::Done);
    assert_eq!(r.data(tid), 0u64.to_le_bytes());
}

#[test]
fn display_and_describe() {
    let mut b = ProgramBuilder::new();
    let d = b.data(b"/usr/lib/libc.so.6\0");
    let s = b.syscall_saved(
        libc::SYS_openat,
        &[libc::AT_FDCWD.into(), d.arg(), libc::O_RDONLY.into()],
        "open /usr/lib/libc.so.6",
    );
    b.syscall(
        libc::SYS_mmap,
        &[
            0x7f00_0000_0000u64.into(),
            4096.into(),
            1.into(),
            0x12.into(),
            s.into(),
        ],
        "mmap 0x7f0000000000-0x7f0000001000 r--p /usr/lib/libc.so.6",
    );
    b.trap();
    let text = b.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(
        lines[0],
        "   0  open /usr/lib/libc.so.6  | openat(-100, data+0x0) -> $0"
    );
    assert_eq!(
        lines[1],
        "   1  mmap 0x7f0000000000-0x7f0000001000 r--p /usr/lib/libc.so.6  | mmap(0x7f0000000000, 0x1000, 0x1, 0x12, $0)"
    );
    assert_eq!(lines[2], "   2  trap  | int3");
    let blob = b.build(0x7000_0000_0000);
    let err = blob
        .check(Status::Failed {
            step: 1,
            errno: libc::EINVAL,
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "step 1 (mmap 0x7f0000000000-0x7f0000001000 r--p /usr/lib/libc.so.6): EINVAL (errno 22)"
    );
    assert_eq!(blob.entry, 0x7000_0000_0000 + ENTRY_OFFSET as u64);
    assert_eq!(blob.stack_top % 16, 0);
    assert_eq!(blob.stack_top, blob.base + blob.len() as u64);
    assert!(blob.program > blob.base && blob.status_addr > blob.slots_addr);
    assert!(Errno(4095).to_string().ends_with("(errno 4095)"));
}

#[test]
fn status_decode() {
    assert_eq!(Status::decode(&[]), Status::Running);
    let mut b = [0u8; 32];
    b[0] = 1;
    assert_eq!(Status::decode(&b), Status::Done);
    b[0] = 2;
    b[8] = 12;
    b[16] = 22;
    assert_eq!(
        Status::decode(&b),
        Status::Failed {
            step: 12,
            errno: 22
        }
    );
    b[0] = 9;
    assert_eq!(Status::decode(&b), Status::Invalid(9));
}
