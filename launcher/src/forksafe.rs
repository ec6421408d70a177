//! Allocation in the children of a raw `clone3`.
//!
//! **The subtlety.** glibc's `fork()` runs fork handlers: before the fork it takes every
//! malloc arena lock (and its other internal locks), and in the child it re-initialises
//! them, so the child of a multi-threaded process can allocate. The sandbox cannot use
//! `fork()`: it needs `clone3` flags glibc does not offer (`CLONE_NEWPID`, `CLONE_PIDFD`,
//! `set_tid`), so it makes the raw system call, which copies memory as it is at that
//! instant. A lock another thread of the parent held then stays held in the child, by a
//! thread that does not exist there, forever. The child's first `malloc` that needs that
//! arena sleeps in `futex_wait` until it is killed: `serve` under a burst of requests lost
//! a third of its restores that way (issue 14).
//!
//! **What is done about it.** Every binary that links this crate allocates through
//! [`ForkSafeAlloc`] (the `#[global_allocator]` below): glibc's malloc ([`System`])
//! until the process calls [`enter_child`], which the sandbox does first thing after each
//! raw `clone3`, in the child. From then on the process allocates from a private arena:
//! one address range reserved with `mmap` in that call (so it is already in
//! `/proc/self/maps` when anything reads it), handed out by bumping a pointer with atomic
//! operations, made writable in steps with `mprotect`. No lock, no state shared with a
//! thread that is missing. `free` is a no-op there (a child lives for milliseconds and
//! ends in `execve`, in the restorer that unmaps everything, or in `_exit`), also for
//! blocks allocated by the parent before the `clone3`: glibc must not see them again.
//! The children of such a child (a restored tree forks with `clone3` too) inherit the
//! arena as it is and go on bumping in their own copy.
//!
//! **What it does not cover**, and the child code must therefore avoid (the launcher's
//! own child code is async-signal-safe; the restore's child follows these rules):
//!
//! * libc functions that call `malloc` themselves (`opendir`, hence `std::fs::read_dir`;
//!   `getpwnam`; `fopen`; `realpath` without a buffer, hence `std::fs::canonicalize`);
//! * locks of the Rust runtime and of crates: `stdout`/`stderr` (`println!`,
//!   `eprintln!`), `tracing` (its subscriber writes to stderr), a `OnceLock` or
//!   `Mutex` another thread might hold (initialise such statics before `clone3`);
//!   `std::env::set_var` (readers are fine: nothing in warmstart writes the environment);
//! * panics (the panic hook takes std's backtrace lock) and, with `RUST_BACKTRACE` or
//!   `RUST_LIB_BACKTRACE` set, errors that capture a backtrace (same lock, and the dynamic
//!   loader's): a debugging aid, never on a production path.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Address space reserved for a child's arena (`PROT_NONE` until used: it costs no
/// memory); a smaller reservation is tried if this one fails.
const RESERVE: [usize; 2] = [1 << 30, 64 << 20];
/// The arena is made writable in steps of this many bytes.
const COMMIT_STEP: usize = 1 << 20;

/// Set in a child right after `clone3`; never in the process that called it.
static CHILD: AtomicBool = AtomicBool::new(false);
/// The arena: its start, next free byte, end of the writable part, end of the
/// reservation.
static START: AtomicUsize = AtomicUsize::new(0);
static NEXT: AtomicUsize = AtomicUsize::new(0);
static COMMITTED: AtomicUsize = AtomicUsize::new(0);
static END: AtomicUsize = AtomicUsize::new(0);

/// The global allocator of every binary that links the launcher: glibc's malloc, or a
/// lock-free arena in a child of a raw `clone3` (see the module docs).
pub struct ForkSafeAlloc;

#[global_allocator]
static GLOBAL: ForkSafeAlloc = ForkSafeAlloc;

/// Switches the calling process to its private arena. Call it first thing in the child of
/// a raw `clone3` (before anything allocates); a no-op in a process that already did
/// (a child's child keeps its parent's arena).
///
/// Async-signal-safe: one `mmap`.
pub fn enter_child() {
    if CHILD.load(Ordering::Relaxed) {
        return;
    }
    for size in RESERVE {
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing
        // touches no existing memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            let start = p as usize;
            START.store(start, Ordering::Relaxed);
            NEXT.store(start, Ordering::Relaxed);
            COMMITTED.store(start, Ordering::Relaxed);
            END.store(start + size, Ordering::Relaxed);
            break;
        }
    }
    // With no arena (END = 0) every allocation fails: the child aborts, reported by
    // its exit status, rather than risking glibc's locks.
    CHILD.store(true, Ordering::Release);
}

/// Whether the calling process allocates from a child's arena.
pub fn in_child() -> bool {
    CHILD.load(Ordering::Relaxed)
}

/// `size` bytes aligned to `align` from the arena; null when it is exhausted.
fn arena_alloc(size: usize, align: usize) -> *mut u8 {
    let end = END.load(Ordering::Relaxed);
    let mut cur = NEXT.load(Ordering::Relaxed);
    let (start, stop) = loop {
        let Some(start) = cur.checked_add(align - 1).map(|a| a & !(align - 1)) else {
            return std::ptr::null_mut();
        };
        let stop = match start.checked_add(size) {
            Some(s) if s <= end => s,
            _ => return std::ptr::null_mut(),
        };
        match NEXT.compare_exchange_weak(cur, stop, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => break (start, stop),
            Err(now) => cur = now,
        }
    };
    if commit(stop) {
        start as *mut u8
    } else {
        std::ptr::null_mut()
    }
}

/// Makes the arena writable up to at least `upto`.
fn commit(upto: usize) -> bool {
    let done = COMMITTED.load(Ordering::Acquire);
    if upto <= done {
        return true;
    }
    let end = END.load(Ordering::Relaxed);
    let to = upto
        .checked_next_multiple_of(COMMIT_STEP)
        .map_or(end, |t| t.min(end));
    // Concurrent callers may change overlapping ranges: the same protection, harmless.
    // SAFETY: [done, to) lies in the arena's reservation, which nothing else uses.
    let r = unsafe {
        libc::mprotect(
            done as *mut libc::c_void,
            to - done,
            libc::PROT_READ | libc::PROT_WRITE,
        )
    };
    if r != 0 {
        return false;
    }
    COMMITTED.fetch_max(to, Ordering::Release);
    true
}

// SAFETY: in the parent every call goes to `System` unchanged. In a child, blocks come
// from the arena: each is `layout.size()` bytes at `layout.align()`, never handed out
// twice (the bump pointer only grows), and zero when handed out (fresh anonymous memory
// never written before), which `alloc_zeroed` relies on.
unsafe impl GlobalAlloc for ForkSafeAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if CHILD.load(Ordering::Relaxed) {
            return arena_alloc(layout.size(), layout.align());
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if CHILD.load(Ordering::Relaxed) {
            return arena_alloc(layout.size(), layout.align());
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // In a child: nothing, whoever allocated it (see the module docs).
        if !CHILD.load(Ordering::Relaxed) {
            System.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !CHILD.load(Ordering::Relaxed) {
            return System.realloc(ptr, layout, new_size);
        }
        // The last block of the arena grows in place (a Vec being filled).
        let old_end = ptr as usize + layout.size();
        if new_size >= layout.size()
            && ptr as usize >= START.load(Ordering::Relaxed)
            && old_end == NEXT.load(Ordering::Relaxed)
        {
            let end = END.load(Ordering::Relaxed);
            if let Some(stop) = (ptr as usize).checked_add(new_size).filter(|&s| s <= end) {
                if NEXT
                    .compare_exchange(old_end, stop, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    return if commit(stop) {
                        ptr
                    } else {
                        std::ptr::null_mut()
                    };
                }
            }
        }
        let new = arena_alloc(new_size, layout.align());
        if !new.is_null() {
            // SAFETY: both blocks are valid for the smaller size and do not overlap
            // (the new one lies beyond every block handed out before).
            std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
        }
        new
    }
}
