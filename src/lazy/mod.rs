//! Lazy paging: serve a restored process's private anonymous memory from a snapshot
//! through userfaultfd, so the app resumes before its memory is loaded (DESIGN §8).
//!
//! # What is served
//!
//! Only private anonymous VMAs ([`plan::is_lazy_vma`]) holding at least one stored
//! (`Data`) page. File-backed VMAs (private or shared) and shared anonymous memory keep
//! the eager path (`restore::memory`). `Zero` runs and never-populated pages are never
//! copied: a fault there is answered with `UFFDIO_ZEROPAGE`.
//!
//! Bookkeeping is per address space (one userfaultfd): the stored pages still to serve
//! as address-sorted extents (binary search on a fault), and one bit per page-table
//! record ("nothing more to copy there"). Every record of a snapshot belongs to exactly
//! one page of one VMA, so the bitmap is keyed by record and survives `mremap`.
//!
//! * fault on a stored page not yet in → decompress + verify (blake3) its aligned
//!   16-page block of not-yet-copied neighbours, one `UFFDIO_COPY`;
//! * fault elsewhere (zero page, never populated, dropped by the app, grown by
//!   `mremap`) → `UFFDIO_ZEROPAGE`;
//! * `EEXIST` → the page is in: mark it, wake, continue; `Ok(0)`/`EAGAIN` → read the
//!   pending events first, then redo the fault from the updated bookkeeping;
//! * `REMOVE` (`MADV_DONTNEED`/`MADV_FREE`/`MADV_REMOVE`) and `UNMAP` → the range is no
//!   longer ours: its pages are never copied again (later faults get zero pages);
//! * `REMAP` → the bookkeeping of `[from, from+len)` moves to `to`;
//! * `FORK` → the child's userfaultfd (from the event) is served from the same snapshot
//!   with a copy of the parent's bitmap at fork time (minus `DONTFORK`/`WIPEONFORK`
//!   areas, which the child does not inherit);
//! * no fault pending → background streaming of the remaining pages, largest
//!   contiguous runs first, 2 MiB per `UFFDIO_COPY`; a reader thread reads and verifies
//!   the next batches while the server thread copies the current one (only the server
//!   thread copies and keeps the bookkeeping, and it answers every fault it has read
//!   before copying another batch); once every stored page of an address space is in,
//!   its userfaultfd is closed.
//!
//! # Contract for the caller (the restore monitor)
//!
//! 1. Build the plan with [`plan`] from the snapshot's `Process`.
//! 2. In the restored process, after mapping every VMA and *before* anything touches
//!    the lazily served memory: create a userfaultfd (`O_CLOEXEC`; blocking or not),
//!    `UFFDIO_API` with at least [`REQUIRED_FEATURES`] (`EVENT_FORK | EVENT_REMAP |
//!    EVENT_REMOVE | EVENT_UNMAP`; `THREAD_ID` is welcome, never `SIGBUS`), and
//!    `UFFDIO_REGISTER` every `(start, len)` of [`LazyPlan::ranges`] with
//!    `UFFDIO_REGISTER_MODE_MISSING`. Skip `restore::memory::fill_tree` for those VMAs
//!    (file-backed and shared VMAs are still filled eagerly).
//! 3. The monitor takes the descriptor with `pidfd_getfd` (the restorer then closes its
//!    own copy), and creates [`LazyServer::new`] with it. [`LazyServer::watch_exit`] with a
//!    pidfd of the process lets the server see the exit at once and kill the process
//!    itself if serving fails.
//! 4. [`LazyServer::prefetch`] (working set) while the process is still stopped, then
//!    let the app resume and run [`LazyServer::serve`] on its own thread: it uses no
//!    ptrace, so the main thread can keep tracing and waiting for the sandbox.
//! 5. `serve` returns `Ok` once every stored page is in (the app keeps running, no
//!    server needed any more) or the process and every child it forked exited.
//!    `Err(LazyError)` (e.g. a corrupt page: the message names the snapshot and the
//!    pack) means the instance must die: the error keeps the userfaultfds open so the
//!    faulting threads stay blocked rather than see zeros; kill the instance (the whole
//!    sandbox: forked children too), then drop the error. An error from `new` or
//!    `prefetch` likewise aborts the restore: kill, then drop the server.
//! 6. With `record_working_set`, store [`ServeStats::working_set`] beside the snapshot
//!    (call [`RecordHandle::stop_recording`] when the app answered its first request) and
//!    pass it as [`LazyOptions::prefetch`] next time.
//!
//! Never serve this process's own memory with these event features from one of its
//! threads: see the deadlock note in `sys::uffd`.

pub mod plan;
pub mod server;

#[cfg(test)]
mod tests;

pub use plan::{plan, Extent, LazyPlan};
pub use server::{
    LazyError, LazyOptions, LazyServer, PrefetchStats, RecordHandle, ServeStats, SpaceKeeper,
    BATCH_PAGES, READAHEAD_PAGES, REQUIRED_FEATURES,
};
