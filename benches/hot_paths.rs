//! Micro-benchmarks of restore-side hot paths the page store benchmarks do not cover:
//!
//! - `parasite`: building a syscall program, and running it in a forked child (1 step
//!   vs 1000 steps: the difference is the executor's cost per step);
//! - `lazy/fault_round_trip`: one userfaultfd fault served from a snapshot (the faulting
//!   child times its own page touches: fault → decompress + verify → `UFFDIO_COPY` →
//!   wake);
//! - `lazy/prefetch`: bulk prefetch of a 16 MiB working set into a stopped process, from
//!   the packs (decompress + verify per page) and from the hot pages (`_hot`; GiB/s);
//! - `lazy/stream_128mib`: background streaming of 128 MiB of incompressible pages
//!   (stored raw, like `c/mem.c`'s) into an idle process, from its first bulk batch until
//!   every page is in (the server's `stream_started` to `complete_after`; GB/s);
//! - `open`: what `warmstart run` does before restoring: open the store, resolve a
//!   name, load a manifest of 400 VMAs, read the working set.
//!
//! `cargo bench --bench hot_paths`. Needs userfaultfd (root, or
//! `vm.unprivileged_userfaultfd=1`) for the `lazy` group.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use warmstart::lazy::{plan, LazyOptions, LazyServer, REQUIRED_FEATURES};
use warmstart::sys::pidfd;
use warmstart::sys::uffd::{Features, Range, RegisterMode, Uffd, UffdFlags};
use warmstart_parasite::{jump, FailMode, ProgramBuilder};
use warmstart_snapshots::model::*;
use warmstart_snapshots::store::{Snapshot, Store};

const P: usize = PAGE_SIZE;

// ---------------------------------------------------------------- parasite

fn program(steps: usize) -> ProgramBuilder {
    let mut b = ProgramBuilder::new();
    b.fail_mode(FailMode::ExitGroup(99));
    for _ in 0..steps {
        b.syscall(libc::SYS_getppid, &[], "getppid");
    }
    b.exit(0u64);
    b
}

/// Copies the program to an RWX mapping, forks, and jumps to it in the child.
fn run_forked(b: &ProgramBuilder) {
    let len = b.build(0).map_len();
    // SAFETY: plain anonymous mapping, unmapped below.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(mem, libc::MAP_FAILED);
    let blob = b.build(mem as u64);
    // SAFETY: the mapping is large enough (map_len).
    unsafe { std::ptr::copy_nonoverlapping(blob.bytes.as_ptr(), mem.cast(), blob.len()) };
    // SAFETY: the child only jumps into the blob.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: the blob is mapped RWX at its base.
        unsafe { jump(blob.entry, blob.program, blob.stack_top) }
    }
    let mut st = 0;
    // SAFETY: our child.
    unsafe {
        assert_eq!(libc::waitpid(pid, &mut st, 0), pid);
        libc::munmap(mem, len);
    }
    assert!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "status {st:#x}"
    );
}

fn parasite(c: &mut Criterion) {
    let mut g = c.benchmark_group("parasite");
    let big = program(1000);
    g.bench_function("build_1000_steps", |b| {
        b.iter(|| big.build(0x7000_0000_0000))
    });
    for steps in [1usize, 1000] {
        let p = program(steps);
        g.bench_function(format!("run_forked_{steps}_steps"), |b| {
            b.iter(|| run_forked(&p))
        });
    }
    g.finish();
}

// ---------------------------------------------------------------- lazy paging

const BASE: u64 = 0x5c5c_0000_0000;
/// Sparse part: one stored page every 16 (one fault per read-ahead block).
const SPARSE_BLOCKS: usize = 1024;
const SPARSE_PAGES: usize = SPARSE_BLOCKS * 16;
/// Dense part: the working set for prefetch (16 MiB).
const DENSE_PAGES: usize = 4096;
const VMA_PAGES: usize = SPARSE_PAGES + DENSE_PAGES;

fn fill_page(out: &mut [u8], i: usize) {
    for (w, c) in out.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&(((i as u64) << 32) | w as u64 | 1 << 62).to_le_bytes());
    }
}

fn process(vmas: Vec<Vma>) -> Process {
    Process {
        pid: 1,
        ppid: 0,
        pgid: 1,
        sid: 1,
        comm: "bench".into(),
        exe: FileIdentity::default(),
        creds: Creds::default(),
        rlimits: vec![],
        cwd: "/".into(),
        root: "/".into(),
        umask: 0o22,
        personality: 0,
        no_new_privs: false,
        dumpable: 1,
        mm: MmFields::default(),
        auxv: vec![0, 0],
        vmas,
        fds: vec![],
        sigactions: vec![],
        shared_pending: vec![],
        threads: vec![],
        itimers: Default::default(),
        posix_timers: vec![],
        seccomp_filters: vec![],
        private_files: vec![],
        zombie: None,
        zombie_sigmask: 0,
        fd_table_size: 64,
        ctty: None,
        child_subreaper: false,
        thp_disable: false,
        oom_score_adj: 0,
    }
}

fn anon_vma(start: u64, pages: usize, runs: Vec<PageRun>) -> Vma {
    Vma {
        start,
        end: start + (pages * P) as u64,
        prot: PROT_READ | PROT_WRITE,
        shared: false,
        flags: VmaFlags::default(),
        kind: VmaKind::Anon {
            name: String::new(),
        },
        offset: 0,
        pages: runs,
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    snap: Arc<Snapshot>,
}

fn lazy_fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s")).unwrap();
    let mut w = store.writer().unwrap();
    let mut data = vec![0u8; VMA_PAGES * P];
    for b in 0..SPARSE_BLOCKS {
        fill_page(&mut data[b * 16 * P..(b * 16 + 1) * P], b);
    }
    for i in SPARSE_PAGES..VMA_PAGES {
        fill_page(&mut data[i * P..(i + 1) * P], i);
    }
    let mut runs = Vec::new();
    w.add_pages(0, &data, &mut runs).unwrap();
    let m = Manifest {
        processes: vec![process(vec![anon_vma(BASE, VMA_PAGES, runs)])],
        ..Default::default()
    };
    let id = w.commit(m, None).unwrap();
    let snap = Arc::new(store.load(&id).unwrap());
    assert_eq!(snap.page_count(), (SPARSE_BLOCKS + DENSE_PAGES) as u64);
    Fixture {
        _dir: dir,
        store,
        snap,
    }
}

/// Streaming: a VMA of incompressible pages (xorshift, as `c/mem.c` fills its memory).
const STREAM_BASE: u64 = 0x5d5d_0000_0000;
const STREAM_PAGES: usize = 32768;

fn stream_fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s")).unwrap();
    let mut w = store.writer().unwrap();
    let mut data = vec![0u8; STREAM_PAGES * P];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for c in data.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    let mut runs = Vec::new();
    w.add_pages(0, &data, &mut runs).unwrap();
    let m = Manifest {
        processes: vec![process(vec![anon_vma(STREAM_BASE, STREAM_PAGES, runs)])],
        ..Default::default()
    };
    let id = w.commit(m, None).unwrap();
    let snap = Arc::new(store.load(&id).unwrap());
    assert_eq!(snap.page_count(), STREAM_PAGES as u64);
    Fixture {
        _dir: dir,
        store,
        snap,
    }
}

fn pipe() -> (i32, i32) {
    let mut fds = [0; 2];
    // SAFETY: valid array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    (fds[0], fds[1])
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A forked child whose VMA at `BASE` is registered with a userfaultfd; once released
/// it touches `faults` pages of the sparse part (one per 16-page block) and reports how
/// long that took (ns).
struct Child {
    pid: i32,
    pidfd: OwnedFd,
    uffd_fd: i32,
    go: File,
    out: File,
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.pid > 0 {
            let _ = pidfd::pidfd_send_signal(&self.pidfd, libc::SIGKILL);
            // SAFETY: reaping our child.
            unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), 0) };
        }
    }
}

fn write_u64(fd: i32, v: u64) {
    // SAFETY: writing from a valid location.
    unsafe { libc::write(fd, (&v as *const u64).cast(), 8) };
}

fn spawn(faults: usize) -> Child {
    spawn_at(BASE, VMA_PAGES, faults)
}

/// [`spawn`] with a mapping of `pages` pages at `base`.
fn spawn_at(base: u64, pages: usize, faults: usize) -> Child {
    assert!(faults <= SPARSE_BLOCKS);
    let (go_r, go_w) = pipe();
    let (out_r, out_w) = pipe();
    // SAFETY: the child makes raw syscalls only and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: raw syscalls on our own memory and descriptors.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            let len = pages * P;
            let p = libc::mmap(
                base as *mut _,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            );
            if p as u64 != base {
                libc::_exit(2);
            }
            let Ok(u) = Uffd::new(UffdFlags::CLOEXEC) else {
                libc::_exit(3)
            };
            if u.api(REQUIRED_FEATURES | Features::THREAD_ID).is_err()
                || u.register(Range::new(base as usize, len), RegisterMode::MISSING)
                    .is_err()
            {
                libc::_exit(4);
            }
            write_u64(out_w, u.as_raw_fd() as u64);
            let mut b = 0u8;
            if libc::read(go_r, (&mut b as *mut u8).cast(), 1) != 1 {
                libc::_exit(5);
            }
            drop(u);
            let t = now_ns();
            let mut sum = 0u64;
            for i in 0..faults {
                sum =
                    sum.wrapping_add(((base + (i * 16 * P) as u64) as *const u64).read_volatile());
            }
            let took = now_ns() - t;
            write_u64(out_w, took);
            write_u64(out_w, sum);
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copies of the child's ends; then owning ours.
    let (go, mut out) = unsafe {
        libc::close(go_r);
        libc::close(out_w);
        (File::from_raw_fd(go_w), File::from_raw_fd(out_r))
    };
    let pidfd = pidfd::pidfd_open(pid, 0).unwrap();
    let mut fd = [0u8; 8];
    out.read_exact(&mut fd)
        .expect("child failed to register its userfaultfd");
    Child {
        pid,
        pidfd,
        uffd_fd: u64::from_le_bytes(fd) as i32,
        go,
        out,
    }
}

fn server(fx: &Fixture, c: &Child, o: LazyOptions) -> LazyServer {
    let p = plan(&fx.snap.manifest.processes[0]);
    let u = Uffd::from_owned(pidfd::pidfd_getfd(&c.pidfd, c.uffd_fd).unwrap());
    let mut s = LazyServer::new(fx.snap.clone(), p, u, o).unwrap();
    s.watch_exit(pidfd::pidfd_open(c.pid, 0).unwrap());
    s
}

/// Time of `faults` fault round trips, as the faulting child measured it.
fn fault_batch(fx: &Fixture, faults: usize) -> Duration {
    let mut c = spawn(faults);
    let s = server(
        fx,
        &c,
        LazyOptions {
            background: false,
            ..Default::default()
        },
    );
    let th = std::thread::spawn(move || s.serve().map_err(|e| e.into_error()));
    c.go.write_all(b"g").unwrap();
    let mut buf = [0u8; 16];
    c.out
        .read_exact(&mut buf)
        .expect("child died while faulting");
    let mut st = 0;
    // SAFETY: reaping our child.
    unsafe { libc::waitpid(c.pid, &mut st, 0) };
    c.pid = -1;
    let stats = th.join().unwrap().unwrap();
    assert_eq!(stats.faults_data, faults as u64);
    Duration::from_nanos(u64::from_le_bytes(buf[..8].try_into().unwrap()))
}

fn lazy(c: &mut Criterion) {
    if Uffd::probe().is_err() {
        eprintln!("lazy: userfaultfd unavailable here, skipped");
        return;
    }
    let fx = lazy_fixture();
    let mut g = c.benchmark_group("lazy");
    g.sample_size(20);
    g.throughput(Throughput::Elements(1));
    g.bench_function("fault_round_trip", |b| {
        b.iter_custom(|n| {
            let mut total = Duration::ZERO;
            let mut left = n as usize;
            while left > 0 {
                let k = left.min(SPARSE_BLOCKS);
                total += fault_batch(&fx, k);
                left -= k;
            }
            total
        })
    });
    g.throughput(Throughput::Bytes((DENSE_PAGES * P) as u64));
    let ws: Vec<u64> = (SPARSE_BLOCKS as u64..(SPARSE_BLOCKS + DENSE_PAGES) as u64).collect();
    g.bench_function("prefetch_16mib", |b| {
        b.iter_custom(|n| {
            let mut total = Duration::ZERO;
            for _ in 0..n {
                let c = spawn(0);
                let mut s = server(
                    &fx,
                    &c,
                    LazyOptions {
                        prefetch: Some(ws.clone()),
                        background: false,
                        ..Default::default()
                    },
                );
                let t = Instant::now();
                let st = s.prefetch().unwrap();
                total += t.elapsed();
                assert_eq!(st.pages, DENSE_PAGES as u64);
                drop(c);
                drop(s);
            }
            total
        })
    });
    // The same from the snapshot's hot pages (what `run` does once the working set is
    // learned): verifying them (chunk hashes, 2 threads) is timed too.
    fx.store.save_hot(&fx.snap, &ws).unwrap();
    g.bench_function("prefetch_16mib_hot", |b| {
        b.iter_custom(|n| {
            let mut total = Duration::ZERO;
            for _ in 0..n {
                let c = spawn(0);
                let t = Instant::now();
                let hot = fx.snap.hot(2).map(Arc::new);
                assert!(hot.is_some());
                let mut s = server(
                    &fx,
                    &c,
                    LazyOptions {
                        prefetch: Some(ws.clone()),
                        hot,
                        background: false,
                        ..Default::default()
                    },
                );
                let st = s.prefetch().unwrap();
                total += t.elapsed();
                assert_eq!(st.hot_pages, DENSE_PAGES as u64);
                drop(c);
                drop(s);
            }
            total
        })
    });
    drop(fx);
    let sfx = stream_fixture();
    g.sample_size(10);
    g.throughput(Throughput::Bytes((STREAM_PAGES * P) as u64));
    g.bench_function("stream_128mib", |b| {
        b.iter_custom(|n| {
            let mut total = Duration::ZERO;
            for _ in 0..n {
                // The child waits (never touching its memory) while everything streams.
                let c = spawn_at(STREAM_BASE, STREAM_PAGES, 0);
                let s = server(&sfx, &c, LazyOptions::default());
                let st = s.serve().map_err(|e| e.into_error()).unwrap();
                assert_eq!(st.pages_streamed, STREAM_PAGES as u64);
                total += st.complete_after.unwrap() - st.stream_started.unwrap();
                drop(c);
            }
            total
        })
    });
    g.finish();
}

// ---------------------------------------------------------------- snapshot open

fn open(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut w = store.writer().unwrap();
    // 400 VMAs of 64 pages (a mid-sized interpreter), distinct compressible pages.
    let mut vmas = Vec::new();
    let mut page = vec![0u8; 64 * P];
    for v in 0..400usize {
        for i in 0..64 {
            fill_page(&mut page[i * P..(i + 1) * P], v * 64 + i);
        }
        let mut runs = Vec::new();
        w.add_pages(0, &page, &mut runs).unwrap();
        vmas.push(anon_vma(0x10_0000_0000 + (v as u64) * 0x100_0000, 64, runs));
    }
    let m = Manifest {
        processes: vec![process(vmas)],
        ..Default::default()
    };
    let id = w.commit(m, Some("app")).unwrap();
    let ws: Vec<u64> = (0..25_600).step_by(7).collect();
    store.save_working_set(&id, &ws).unwrap();
    let path = dir.path().to_owned();
    let mut g = c.benchmark_group("open");
    g.bench_function("run_path_400_vmas", |b| {
        b.iter(|| {
            let s = Store::open(&path).unwrap();
            let id = s.resolve("app").unwrap();
            let snap = s.load(&id).unwrap();
            let ws = s.working_set(&id).unwrap();
            (snap.page_count(), ws.len())
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! { name = benches; config = config(); targets = parasite, lazy, open }
criterion_main!(benches);
