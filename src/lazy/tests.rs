//! End-to-end tests: a forked child registers its memory, the test serves it.
//!
//! The child never allocates (the harness is multi-threaded: malloc locks may be held
//! at fork), and the serving thread only ever serves the child's memory.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use warmstart_snapshots::model::*;
use warmstart_snapshots::store::{Snapshot, Store};

use super::*;
use crate::sys::pidfd;
use crate::sys::uffd::{Features, RegisterMode, Uffd, UffdFlags};

const P: usize = PAGE_SIZE;
/// Pages in the VMA; the snapshot stores pages 0..STORED (with a zero run 20..24).
const VMA_PAGES: usize = 64;
const STORED: usize = 40;
const BASE: u64 = 0x5a5a_0000_0000;
const MOVED: u64 = 0x5b5b_0000_0000;

fn page_content(i: usize) -> Vec<u8> {
    if (20..24).contains(&i) || i >= STORED {
        return vec![0; P];
    }
    let mut v = Vec::with_capacity(P);
    for w in 0..P / 8 {
        v.extend_from_slice(&(((i as u64) << 32) | w as u64 | 0x0100_0000_0000_0000).to_le_bytes());
    }
    v
}

/// FNV-1a over the page's words; the child computes the same.
fn sum_bytes(p: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for w in p.chunks_exact(8) {
        h = (h ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn sum_at(addr: u64) -> u64 {
    let p = addr as *const u64;
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for i in 0..P / 8 {
        // SAFETY: callers pass the address of a page of the child's fixed test mapping
        // (BASE or MOVED, page-aligned so u64-aligned), so all P/8 words are in it; a
        // missing page faults into the uffd and is filled, never reads garbage.
        h = (h ^ unsafe { p.add(i).read_volatile() }).wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn expected(i: usize) -> u64 {
    sum_bytes(&page_content(i))
}

/// Where the child maps its memory (one VMA).
#[derive(Clone, Copy)]
struct Layout {
    base: u64,
    pages: usize,
}

const SMALL: Layout = Layout {
    base: BASE,
    pages: VMA_PAGES,
};

/// Streaming tests: 16 MiB, every page stored (8 batches).
const BIG: Layout = Layout {
    base: 0x5c5c_0000_0000,
    pages: 4096,
};

fn big_content(i: usize) -> Vec<u8> {
    (0..P / 8)
        .flat_map(|w| (((i as u64) << 32) | w as u64 | 0x0200_0000_0000_0000).to_le_bytes())
        .collect()
}

fn process(runs: Vec<PageRun>) -> Process {
    process_in(SMALL, runs)
}

fn process_in(l: Layout, runs: Vec<PageRun>) -> Process {
    Process {
        pid: 1,
        pgid: 1,
        sid: 1,
        comm: "t".into(),
        cwd: "/".into(),
        root: "/".into(),
        umask: 0o22,
        dumpable: 1,
        auxv: vec![0, 0],
        vmas: vec![Vma {
            start: l.base,
            end: l.base + (l.pages * P) as u64,
            prot: PROT_READ | PROT_WRITE,
            shared: false,
            flags: VmaFlags::default(),
            kind: VmaKind::Anon {
                name: String::new(),
            },
            offset: 0,
            pages: runs,
        }],
        ..Default::default()
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    snap: Arc<Snapshot>,
}

fn fixture() -> Fixture {
    fixture_of(SMALL, (0..STORED).flat_map(page_content).collect())
}

/// A snapshot of one process whose VMA at `l` holds `data` from its start.
fn fixture_of(l: Layout, data: Vec<u8>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s")).unwrap();
    let mut w = store.writer().unwrap();
    let mut runs = Vec::new();
    w.add_pages(0, &data, &mut runs).unwrap();
    let m = Manifest {
        processes: vec![process_in(l, runs)],
        ..Default::default()
    };
    let id = w.commit(m, None).unwrap();
    let snap = Arc::new(store.load(&id).unwrap());
    Fixture {
        _dir: dir,
        store,
        snap,
    }
}

// ---- the child side: raw syscalls only ----

fn write_u64s(fd: i32, v: &[u64]) {
    // SAFETY: `v` is a live slice, readable for size_of_val(v) bytes, the count passed.
    unsafe { libc::write(fd, v.as_ptr().cast(), std::mem::size_of_val(v)) };
}

fn read_byte(fd: i32) -> bool {
    let mut b = 0u8;
    // SAFETY: `b` is a live local byte, and exactly 1 byte is read into it.
    unsafe { libc::read(fd, (&mut b as *mut u8).cast(), 1) == 1 }
}

fn send_sums(fd: i32, base: u64, pages: core::ops::Range<usize>) {
    for i in pages {
        write_u64s(fd, &[sum_at(base + (i * P) as u64)]);
    }
}

/// What the child does once released; writes u64 results to `out`.
type Scenario = fn(out: i32);

struct Child {
    pid: i32,
    pidfd: OwnedFd,
    uffd_fd: i32,
    go: File,
    out: File,
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.pid < 0 {
            return;
        }
        let _ = pidfd::pidfd_send_signal(&self.pidfd, libc::SIGKILL);
        // SAFETY: waitpid takes our child's pid and a null status pointer, which is allowed.
        unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), 0) };
    }
}

fn pipe() -> (i32, i32) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a live [c_int; 2], exactly the two fds pipe2 writes.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    (fds[0], fds[1])
}

fn spawn(scenario: Scenario) -> Child {
    spawn_in(SMALL, scenario)
}

fn spawn_in(l: Layout, scenario: Scenario) -> Child {
    let (go_r, go_w) = pipe();
    let (out_r, out_w) = pipe();
    // The test process has other threads, so the child may take no lock they might hold:
    // it makes raw syscalls, the Uffd wrappers (syscalls and ioctls that allocate nothing;
    // their errors are plain enums) and the scenario (raw syscalls, stack buffers).
    // SAFETY: as above; the child leaves with _exit, never returning into the harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: MAP_FIXED_NOREPLACE maps BASE only if nothing is there, so no existing
        // memory is replaced; the range is then ours alone. prctl, _exit and the fds
        // (go_r, out_w, inherited copies this child owns) take integers or local buffers.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            let len = l.pages * P;
            let p = libc::mmap(
                l.base as *mut _,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            );
            if p as u64 != l.base {
                libc::_exit(2);
            }
            let Ok(u) = Uffd::new(UffdFlags::CLOEXEC) else {
                libc::_exit(3)
            };
            let feats = REQUIRED_FEATURES | Features::THREAD_ID;
            if u.api(feats).is_err()
                || u.register(
                    crate::sys::uffd::Range::new(l.base as usize, len),
                    RegisterMode::MISSING,
                )
                .is_err()
            {
                libc::_exit(4);
            }
            write_u64s(out_w, &[u.as_raw_fd() as u64]);
            if !read_byte(go_r) {
                libc::_exit(5);
            }
            // The server took it: like the restorer, drop our copy, or the file would
            // outlive the server and faults would wait for nobody.
            drop(u);
            scenario(out_w);
            libc::_exit(0);
        }
    }
    // SAFETY: go_r and out_w are the parent's copies of the ends the child uses, owned by
    // this function and referenced by nothing else; each is closed exactly once.
    unsafe {
        libc::close(go_r);
        libc::close(out_w);
    }
    // SAFETY: go_w and out_r come from pipe2 above, are owned by nobody else and are
    // wrapped exactly once.
    let (go, mut out) = unsafe { (File::from_raw_fd(go_w), File::from_raw_fd(out_r)) };
    let pidfd = pidfd::pidfd_open(pid, 0).unwrap();
    let mut fd = [0u8; 8];
    out.read_exact(&mut fd)
        .expect("child failed before registering");
    Child {
        pid,
        pidfd,
        uffd_fd: u64::from_le_bytes(fd) as i32,
        go,
        out,
    }
}

impl Child {
    fn uffd(&self) -> Uffd {
        Uffd::from_owned(pidfd::pidfd_getfd(&self.pidfd, self.uffd_fd).unwrap())
    }
    fn release(&mut self) {
        std::io::Write::write_all(&mut self.go, b"g").unwrap();
    }
    /// Reads `n` results, failing after a generous timeout.
    fn results(&mut self, n: usize) -> Vec<u64> {
        let mut buf = vec![0u8; n * 8];
        let mut got = 0;
        while got < buf.len() {
            let mut p = libc::pollfd {
                fd: self.out.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `p` is one live, initialised pollfd; the kernel writes only revents.
            let r = unsafe { libc::poll(&mut p, 1, 60_000) };
            assert!(r > 0, "timed out waiting for the child's results");
            let k = self.out.read(&mut buf[got..]).unwrap();
            assert!(k > 0, "child exited after {got} of {} bytes", buf.len());
            got += k;
        }
        buf.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
    fn wait(&mut self) -> i32 {
        let mut st = 0;
        // SAFETY: `st` is a live c_int the kernel writes our child's status into.
        assert_eq!(unsafe { libc::waitpid(self.pid, &mut st, 0) }, self.pid);
        self.pid = -1;
        st
    }
}

fn opts(background: bool) -> LazyOptions {
    LazyOptions {
        background,
        ..Default::default()
    }
}

fn server(fx: &Fixture, c: &Child, o: LazyOptions) -> LazyServer {
    let p = plan(&fx.snap.manifest.processes[0]);
    let mut s = LazyServer::new(fx.snap.clone(), p, c.uffd(), o).unwrap();
    s.watch_exit(pidfd::pidfd_open(c.pid, 0).unwrap());
    s
}

fn run(
    fx: &Fixture,
    scenario: Scenario,
    o: LazyOptions,
    n: usize,
) -> (Vec<u64>, ServeStats, PrefetchStats) {
    let mut c = spawn(scenario);
    let mut s = server(fx, &c, o);
    let pf = s.prefetch().unwrap();
    let th = std::thread::spawn(move || s.serve());
    c.release();
    let res = c.results(n);
    let st = c.wait();
    assert!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "status {st:#x}"
    );
    let stats = th.join().unwrap().unwrap();
    (res, stats, pf)
}

#[test]
fn plan_covers_private_anon_only() {
    let mut p = process(vec![
        PageRun {
            page: 0,
            count: 3,
            content: RunContent::Data { first: 0 },
        },
        PageRun {
            page: 3,
            count: 2,
            content: RunContent::Zero,
        },
        PageRun {
            page: 7,
            count: 1,
            content: RunContent::Data { first: 3 },
        },
    ]);
    let mut file = p.vmas[0].clone();
    file.start = 0x1000_0000;
    file.end = 0x1001_0000;
    file.kind = VmaKind::File {
        file: FileIdentity::default(),
    };
    let mut zero_only = p.vmas[0].clone();
    zero_only.start = 0x2000_0000;
    zero_only.end = 0x2001_0000;
    zero_only.pages = vec![PageRun {
        page: 0,
        count: 1,
        content: RunContent::Zero,
    }];
    p.vmas.push(file);
    p.vmas.push(zero_only);
    let pl = plan(&p);
    assert_eq!(pl.ranges, vec![(BASE, (VMA_PAGES * P) as u64)]);
    assert_eq!(pl.data_pages(), 4);
    assert_eq!(pl.index_of(BASE + 7 * P as u64 + 5), Some(3));
    assert_eq!(pl.index_of(BASE + 3 * P as u64), None);
}

fn all_pages(out: i32) {
    send_sums(out, BASE, 0..VMA_PAGES);
}

#[test]
fn faults_serve_data_and_zeros_and_record() {
    let fx = fixture();
    let o = LazyOptions {
        background: false,
        record_working_set: true,
        ..Default::default()
    };
    let (res, st, _) = run(&fx, all_pages, o, VMA_PAGES);
    for (i, got) in res.iter().enumerate() {
        assert_eq!(*got, expected(i), "page {i}");
    }
    // Read-ahead: aligned 16-page blocks clipped to runs: faults at 0, 16 and 24. The
    // working set is every page those faults copied, in fault order.
    assert_eq!(st.working_set, (0..36).collect::<Vec<u64>>());
    assert_eq!(st.faults_data, 3);
    // One fault at page 20 maps zeros over 20..24 (and not over the stored page 24);
    // once every stored page is in the server closes and the kernel zero-fills the rest
    // itself (a fault or two may come before that).
    assert!((1..=4).contains(&st.faults_zero), "{}", st.faults_zero);
    assert_eq!(st.pages_on_fault, STORED as u64 - 4);
    assert!(st.target_exited || st.complete_after.is_some());
}

#[test]
fn background_streams_everything_then_closes() {
    let fx = fixture();
    let mut c = spawn(all_pages);
    let s = server(&fx, &c, opts(true));
    // Nothing touches memory until the server is done: no faults, all streamed.
    let st = s.serve().unwrap();
    assert_eq!(st.faults, 0);
    assert_eq!(st.pages_streamed, STORED as u64 - 4);
    assert_eq!(st.bytes_streamed, (STORED as u64 - 4) * P as u64);
    assert!(st.complete_after.is_some());
    c.release();
    let res = c.results(VMA_PAGES);
    for (i, got) in res.iter().enumerate() {
        assert_eq!(*got, expected(i), "page {i}");
    }
    c.wait();
}

fn dontneed(out: i32) {
    // SAFETY: both ranges lie inside the child's own fixed mapping (VMA_PAGES pages at
    // BASE), which no Rust reference points into; MADV_DONTNEED there only zeroes pages.
    unsafe {
        let _ = sum_at(BASE + 2 * P as u64); // loads 0..16
        libc::madvise(BASE as *mut _, 8 * P, libc::MADV_DONTNEED);
        // Not yet loaded: 24..30.
        libc::madvise((BASE + 24 * P as u64) as *mut _, 6 * P, libc::MADV_DONTNEED);
    }
    send_sums(out, BASE, 0..VMA_PAGES);
}

#[test]
fn dontneed_reads_zeros() {
    let fx = fixture();
    for background in [false, true] {
        let (res, st, _) = run(&fx, dontneed, opts(background), VMA_PAGES);
        let zero = sum_bytes(&[0; P]);
        for (i, got) in res.iter().enumerate() {
            let want = if i < 8 || (24..30).contains(&i) {
                zero
            } else {
                expected(i)
            };
            assert_eq!(*got, want, "page {i} (background {background})");
        }
        if !background {
            // (With streaming, everything may be in before the child even runs.)
            assert_eq!(st.removes, 2);
        }
    }
}

fn remap(out: i32) {
    // MREMAP_FIXED would replace whatever sits at MOVED: a fixed address chosen far from
    // where the loader, stacks and malloc place memory, so nothing is there in this child.
    // SAFETY: the 16 pages moved lie inside the child's fixed mapping at BASE, which no
    // Rust reference points into; MOVED is free (above); the result is checked.
    unsafe {
        let _ = sum_at(BASE); // loads 0..16
        let p = libc::mremap(
            (BASE + 24 * P as u64) as *mut _,
            16 * P,
            16 * P,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            MOVED as *mut libc::c_void,
        );
        if p as u64 != MOVED {
            libc::_exit(6);
        }
    }
    send_sums(out, MOVED, 0..16);
    send_sums(out, BASE, 0..24);
}

#[test]
fn mremap_moves_unloaded_pages() {
    let fx = fixture();
    let (res, st, _) = run(&fx, remap, opts(false), 16 + 24);
    for (i, got) in res[..16].iter().enumerate() {
        assert_eq!(*got, expected(24 + i), "moved page {i}");
    }
    for i in 0..24 {
        assert_eq!(res[16 + i], expected(i), "page {i}");
    }
    assert_eq!(st.remaps, 1);
}

fn fork_after_restore(out: i32) {
    // The forked test child is single-threaded, so its own fork needs no
    // async-signal-safety care; the grandchild only reads pages, writes results, _exits.
    // SAFETY: as above; the volatile writes are to pages 1 and 2 of the fixed mapping at
    // BASE (u64-aligned), which no Rust reference points into; `st` is a live local.
    unsafe {
        let _ = sum_at(BASE); // loads 0..16 in the parent
        ((BASE + P as u64) as *mut u64).write_volatile(0xdead);
        let pid = libc::fork();
        if pid == 0 {
            // The grandchild: its own uffd serves its faults.
            send_sums(out, BASE, 0..VMA_PAGES);
            libc::_exit(0);
        }
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
        ((BASE + 2 * P as u64) as *mut u64).write_volatile(0xbeef);
        send_sums(out, BASE, 0..VMA_PAGES);
    }
}

#[test]
fn fork_after_restore_serves_both() {
    let fx = fixture();
    let (res, st, _) = run(&fx, fork_after_restore, opts(false), 2 * VMA_PAGES);
    let mut p1 = page_content(1);
    p1[..8].copy_from_slice(&0xdeadu64.to_le_bytes());
    let mut p2 = page_content(2);
    p2[..8].copy_from_slice(&0xbeefu64.to_le_bytes());
    for (k, who) in ["grandchild", "child"].iter().enumerate() {
        for i in 0..VMA_PAGES {
            let want = match (i, k) {
                (1, _) => sum_bytes(&p1),
                (2, 1) => sum_bytes(&p2),
                _ => expected(i),
            };
            assert_eq!(res[k * VMA_PAGES + i], want, "{who} page {i}");
        }
    }
    assert_eq!(st.forks, 1);
}

fn working_set_only(out: i32) {
    send_sums(out, BASE, 0..20);
}

#[test]
fn prefetch_avoids_faults() {
    let fx = fixture();
    let o = LazyOptions {
        prefetch: Some((0..20).rev().chain([10_000, 3]).collect()),
        background: false,
        ..Default::default()
    };
    let (res, st, pf) = run(&fx, working_set_only, o, 20);
    for (i, got) in res.iter().enumerate() {
        assert_eq!(*got, expected(i), "page {i}");
    }
    assert_eq!(pf.requested, 20);
    assert_eq!(pf.ignored, 1);
    assert_eq!(pf.pages, 20);
    assert_eq!(pf.batches, 1);
    assert_eq!(st.faults, 0);
}

#[test]
fn corrupt_page_kills_the_instance() {
    let fx = fixture();
    let packs = fx.store.dir().join("packs");
    let pack = std::fs::read_dir(&packs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "pack"))
        .unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    for b in &mut bytes[20..60] {
        *b ^= 0x55;
    }
    std::fs::write(&pack, &bytes).unwrap();
    let mut c = spawn(all_pages);
    let s = server(&fx, &c, opts(false));
    let th = std::thread::spawn(move || s.serve());
    c.release();
    let err = th.join().unwrap().unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&fx.snap.id.short()), "{msg}");
    assert!(msg.contains(&pack.display().to_string()), "{msg}");
    // The server killed the instance (while its fault was still blocked).
    let st = c.wait();
    assert!(
        libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL,
        "status {st:#x}"
    );
    let mut rest = Vec::new();
    c.out.read_to_end(&mut rest).unwrap();
    assert!(
        rest.is_empty(),
        "the child produced results from bad memory"
    );
    drop(err.into_error());
}

#[test]
fn damaged_table_fails_the_deferred_check() {
    let fx = fixture();
    let id = fx.snap.id;
    // Flip a byte of a record's reserved area: every page still reads and verifies,
    // only the whole-table checksum sees it.
    let table = fx.snap.table_path().to_owned();
    let mut bytes = std::fs::read(&table).unwrap();
    bytes[96 + 56 * 5 + 53] ^= 1;
    std::fs::write(&table, &bytes).unwrap();
    assert!(fx.store.load(&id).is_err(), "a full load checks the table");
    let snap = Arc::new(fx.store.load_deferred(&id).unwrap());
    let mut c = spawn(all_pages);
    let p = plan(&snap.manifest.processes[0]);
    let mut s = LazyServer::new(snap.clone(), p, c.uffd(), opts(true)).unwrap();
    s.watch_exit(pidfd::pidfd_open(c.pid, 0).unwrap());
    let check = snap.clone();
    let job = std::thread::spawn(move || check.verify_table());
    while !job.is_finished() {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    s.check_table(job);
    let th = std::thread::spawn(move || s.serve());
    // (The server may have killed it already: the pipe may be closed.)
    let _ = std::io::Write::write_all(&mut c.go, b"g");
    let err = th.join().unwrap().unwrap_err();
    let msg = format!("{:#}", err.error());
    assert!(msg.contains("page table is damaged"), "{msg}");
    assert!(msg.contains(&id.short()), "{msg}");
    // Killed before it could read a page.
    let mut rest = Vec::new();
    c.out.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "the child produced results");
    let st = c.wait();
    assert!(
        libc::WIFSIGNALED(st) && libc::WTERMSIG(st) == libc::SIGKILL,
        "status {st:#x}"
    );
    drop(err.into_error());
}

#[test]
fn prefetch_copies_from_hot_pages() {
    let fx = fixture();
    fx.store
        .save_hot(&fx.snap, &(0..10).collect::<Vec<u64>>())
        .unwrap();
    let hot = fx.snap.hot(2).map(Arc::new);
    assert!(hot.is_some());
    let o = LazyOptions {
        prefetch: Some((0..20).collect()),
        hot,
        background: false,
        ..Default::default()
    };
    let (res, st, pf) = run(&fx, working_set_only, o, 20);
    for (i, got) in res.iter().enumerate() {
        assert_eq!(*got, expected(i), "page {i}");
    }
    assert_eq!(pf.pages, 20);
    assert_eq!(
        pf.hot_pages, 10,
        "0..10 from the hot pages, 10..20 from the packs"
    );
    assert_eq!(st.faults, 0);
}

fn last_then_all(out: i32) {
    let last = BIG.base + ((BIG.pages - 1) * P) as u64;
    write_u64s(out, &[sum_at(last)]);
    send_sums(out, BIG.base, 0..BIG.pages);
}

#[test]
fn fault_during_streaming_is_served_before_the_next_batch() {
    let fx = fixture_of(BIG, (0..BIG.pages).flat_map(big_content).collect());
    let mut c = spawn_in(BIG, last_then_all);
    let mut s = server(&fx, &c, opts(true));
    let start = std::time::Instant::now();
    // Stream until a first batch is in; the reader is reading the next ones by then.
    while s.stats().pages_streamed == 0 {
        assert!(!s.step(start).unwrap());
    }
    let streamed = s.stats().pages_streamed;
    assert!(streamed < BIG.pages as u64 / 2, "{streamed}");
    // The child faults on the last page (streamed last): wait until the fault can be
    // read, then let the server take one step.
    // (A copy of the userfaultfd taken before the child drops its own.)
    let u = c.uffd();
    c.release();
    wait_readable(u);
    assert!(!s.step(start).unwrap());
    assert_eq!(s.stats().faults, 1, "the fault is answered first");
    assert_eq!(s.stats().faults_data, 1);
    assert_eq!(
        s.stats().pages_streamed,
        streamed,
        "a batch was copied before the pending fault was answered"
    );
    // The rest: streaming between the child's faults, until every page is in.
    while !s.step(start).unwrap() {}
    assert!(s.stats().complete_after.is_some());
    let res = c.results(1 + BIG.pages);
    assert_eq!(res[0], sum_bytes(&big_content(BIG.pages - 1)), "last page");
    for i in 0..BIG.pages {
        assert_eq!(res[1 + i], sum_bytes(&big_content(i)), "page {i}");
    }
    let st = c.wait();
    assert!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "status {st:#x}"
    );
}

#[test]
fn streaming_pipeline_copies_every_page() {
    // Several batches read ahead while others are copied, no faults: every page in,
    // each exactly once.
    let fx = fixture_of(BIG, (0..BIG.pages).flat_map(big_content).collect());
    let mut c = spawn_in(BIG, |out| send_sums(out, BIG.base, 0..BIG.pages));
    let s = server(&fx, &c, opts(true));
    let st = s.serve().unwrap();
    assert_eq!(st.faults, 0);
    assert_eq!(st.pages_streamed, BIG.pages as u64);
    assert_eq!(st.pages_copied, BIG.pages as u64);
    assert!(st.stream_started.is_some() && st.complete_after.is_some());
    c.release();
    let res = c.results(BIG.pages);
    for (i, got) in res.iter().enumerate() {
        assert_eq!(*got, sum_bytes(&big_content(i)), "page {i}");
    }
    c.wait();
}

const BIG_MOVED: u64 = 0x5e5e_0000_0000;

fn remap_and_drop_while_streaming(out: i32) {
    // MREMAP_FIXED would replace whatever sits at BIG_MOVED: a fixed address far from
    // where the loader, stacks and malloc place memory, so nothing is there in this child.
    // SAFETY: both ranges lie inside the fixed mapping at BIG.base, which no Rust reference
    // points into; BIG_MOVED is free (above); MADV_DONTNEED only zeroes; result checked.
    unsafe {
        let p = libc::mremap(
            (BIG.base + 600 * P as u64) as *mut _,
            100 * P,
            100 * P,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            BIG_MOVED as *mut libc::c_void,
        );
        if p as u64 != BIG_MOVED {
            libc::_exit(6);
        }
        libc::madvise(
            (BIG.base + 1000 * P as u64) as *mut _,
            100 * P,
            libc::MADV_DONTNEED,
        );
    }
    send_sums(out, BIG_MOVED, 0..100);
    send_sums(out, BIG.base, 0..600);
    send_sums(out, BIG.base, 700..BIG.pages);
}

#[test]
fn batches_read_ahead_follow_mremap_and_dontneed() {
    // Batches of pages 512..1536 are with the reader (read for their old addresses) when
    // the child moves 600..700 and drops 1000..1100: the moved pages must arrive at their
    // new address, the dropped ones read as zeros, whichever comes first.
    let fx = fixture_of(BIG, (0..BIG.pages).flat_map(big_content).collect());
    let mut c = spawn_in(BIG, remap_and_drop_while_streaming);
    let mut s = server(&fx, &c, opts(true));
    let start = std::time::Instant::now();
    while s.stats().pages_streamed == 0 {
        assert!(!s.step(start).unwrap());
    }
    let u = c.uffd();
    c.release();
    // The child's mremap waits until its event is read: let it be pending first, so that
    // it is read while the next batch (512..1024) is with the reader.
    wait_readable(u);
    while !s.step(start).unwrap() {}
    let res = c.results(BIG.pages);
    let zero = sum_bytes(&[0; P]);
    let want = (600..700).chain(0..600).chain(700..BIG.pages).map(|i| {
        if (1000..1100).contains(&i) {
            zero
        } else {
            sum_bytes(&big_content(i))
        }
    });
    for (k, (got, want)) in res.iter().zip(want).enumerate() {
        assert_eq!(*got, want, "result {k}");
    }
    let st = c.wait();
    assert!(
        libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
        "status {st:#x}"
    );
    assert_eq!(s.stats().remaps, 1);
}

/// Waits until the child's userfaultfd (`u`, a copy) has a message to read, then closes
/// the copy (the server's must be the last).
fn wait_readable(u: Uffd) {
    let mut p = libc::pollfd {
        fd: u.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one live, initialised pollfd; the kernel writes only revents.
    let r = unsafe { libc::poll(&mut p, 1, 60_000) };
    assert!(r > 0, "no message from the child");
}
