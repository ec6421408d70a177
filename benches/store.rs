//! Page store benchmarks: ingest (random, zero, duplicate pages), single page read,
//! and opening a snapshot with 1 GiB of logical pages.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use warmstart_snapshots::model::{Manifest, PageRun, PAGE_SIZE};
use warmstart_snapshots::store::{SnapshotId, Store};

const INGEST_BYTES: usize = 32 << 20;

fn random_pages(seed: u64, bytes: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(bytes);
    while out.len() < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Compressible, distinct pages (roughly like heap data with text).
fn text_pages(seed: u64, pages: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(pages * PAGE_SIZE);
    for p in 0..pages {
        let line = format!("{seed}/{p}: {{\"key\": \"value\", \"n\": {}}}\n", p * 7);
        while out.len() < (p + 1) * PAGE_SIZE {
            out.extend_from_slice(line.as_bytes());
        }
        out.truncate((p + 1) * PAGE_SIZE);
    }
    out
}

fn commit(store: &Store, data: &[u8]) -> SnapshotId {
    let mut w = store.writer().unwrap();
    let mut runs: Vec<PageRun> = Vec::new();
    w.add_pages(0, data, &mut runs).unwrap();
    w.commit(Manifest::default(), None).unwrap()
}

/// Times `add_pages(data)` on a fresh writer of `store` per iteration.
fn time_ingest(
    store_for_iter: impl Fn() -> (tempfile::TempDir, Store),
    data: &[u8],
    iters: u64,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let (_dir, store) = store_for_iter();
        let mut w = store.writer().unwrap();
        let mut runs = Vec::new();
        let t = Instant::now();
        w.add_pages(0, data, &mut runs).unwrap();
        total += t.elapsed();
    }
    total
}

fn ingest(c: &mut Criterion) {
    let mut g = c.benchmark_group("ingest");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(INGEST_BYTES as u64));
    let random = random_pages(1, INGEST_BYTES);
    let zero = vec![0u8; INGEST_BYTES];
    let fresh = || {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        (d, s)
    };
    g.bench_function("random", |b| {
        b.iter_custom(|n| time_ingest(fresh, &random, n))
    });
    g.bench_function("zero", |b| b.iter_custom(|n| time_ingest(fresh, &zero, n)));
    // Already stored: the same random pages into a store that holds them.
    let dup_dir = tempfile::tempdir().unwrap();
    let dup_store = Store::open(dup_dir.path()).unwrap();
    commit(&dup_store, &random);
    let same = || (tempfile::tempdir().unwrap(), dup_store.clone());
    g.bench_function("duplicate", |b| {
        b.iter_custom(|n| time_ingest(same, &random, n))
    });
    g.finish();
}

fn read(c: &mut Criterion) {
    let mut g = c.benchmark_group("read_page");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let pages = 4096u64;
    let lz4 = store
        .load(&commit(&store, &text_pages(1, pages as usize)))
        .unwrap();
    let raw = store
        .load(&commit(
            &store,
            &random_pages(2, pages as usize * PAGE_SIZE),
        ))
        .unwrap();
    let mut buf = vec![0u8; PAGE_SIZE];
    for (name, snap) in [("lz4", &lz4), ("raw", &raw)] {
        let mut i = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 2_654_435_761) % pages;
                snap.read_pages(i, 1, &mut buf).unwrap();
            })
        });
    }
    g.finish();
}

fn open(c: &mut Criterion) {
    let mut g = c.benchmark_group("open");
    g.sample_size(20);
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // 262144 non-zero pages (1 GiB logical) built from 4096 distinct pages.
    let distinct = text_pages(3, 4096);
    let mut w = store.writer().unwrap();
    let mut runs = Vec::new();
    for chunk in 0..64u64 {
        w.add_pages(chunk * 4096, &distinct, &mut runs).unwrap();
    }
    let id = w.commit(Manifest::default(), None).unwrap();
    assert_eq!(store.load(&id).unwrap().page_count(), 262_144);
    g.bench_function("snapshot_1gib", |b| b.iter(|| store.load(&id).unwrap()));
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! { name = benches; config = config(); targets = ingest, read, open }
criterion_main!(benches);
