//! Robustness checks for every decoder of bytes that come from outside (issue 14): the
//! manifest, the page table, the pack index, the blocks of a pack (with the record that
//! points to them), the hot-pages file, the working set and the page-server messages. Each decoder is fed valid encodings made by the real encoders,
//! mutated (bit flips, truncation, extension, length fields set to extreme values,
//! checksums re-sealed so the mutation reaches the parser behind them) and purely random
//! bytes, and must never panic, never allocate more than the input justifies, and fail
//! with a message.
//!
//! Used by `snapshots/tests/decoders.rs` (a few thousand cases, in `cargo test`), by
//! `snapshots/benches/decoders.rs` (`WARMSTART_FUZZ_CASES`, 100k per decoder by default;
//! not run by CI) and by the root crate's `tests/decoders.rs` (the serve protocol).
//! Allocations are measured by [`CountingAlloc`], which the test or bench binary
//! installs as its global allocator (not possible in a binary linking
//! `warmstart-launcher`, whose fork-safe allocator is global: see [`run_unmeasured`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::model::*;
use crate::remote::{self, Request, Response};
use crate::store::table::{self, Location, Record, TableMap, INDEX_MAGIC, TABLE_MAGIC};
use crate::store::{hot, working_set, SnapshotId};

/// A small deterministic generator (xorshift64*): the same seed gives the same cases.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// A value for a length or count field: the edges a decoder must survive.
fn length_value(rng: &mut Rng, len: usize) -> u64 {
    let len = len as u64;
    const EDGES: [u64; 16] = [
        0,
        1,
        2,
        7,
        8,
        0x7f,
        0x80,
        0xff,
        0xffff,
        0x1_0000,
        (1 << 31) - 1,
        1 << 31,
        u32::MAX as u64,
        1 << 32,
        i64::MAX as u64,
        u64::MAX,
    ];
    match rng.below(4) {
        0 => EDGES[rng.below(EDGES.len())],
        1 => [len, len + 1, len.saturating_sub(1), len / 8, len * 8][rng.below(5)],
        2 => rng.next_u64() >> rng.below(64),
        _ => rng.next_u64(),
    }
}

/// One to four mutations of `seed`.
pub fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = b.len();
        match rng.below(9) {
            0 if len > 0 => {
                let i = rng.below(len);
                b[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                b[i] = rng.next_u64() as u8;
            }
            2 => b.truncate(rng.below(len + 1)),
            3 => {
                let n = 1 + rng.below(64);
                let extra = rng.bytes(n);
                b.extend_from_slice(&extra);
            }
            4 | 5 if len > 0 => {
                // A length field: 1, 2, 4 or 8 bytes at any offset, set to an edge value.
                let width = [1, 2, 4, 8][rng.below(4)];
                let at = rng.below(len);
                let v = length_value(rng, len).to_le_bytes();
                let end = (at + width).min(len);
                b[at..end].copy_from_slice(&v[..end - at]);
            }
            6 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below(len - at);
                b.drain(at..at + n);
            }
            7 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(32);
                let extra = rng.bytes(n);
                b.splice(at..at, extra);
            }
            8 if len > 0 => {
                // A part of itself copied elsewhere (a record or a header repeated).
                let from = rng.below(len);
                let n = 1 + rng.below((len - from).min(128));
                let part = b[from..from + n].to_vec();
                let at = rng.below(len + 1);
                b.splice(at..at, part);
            }
            _ => b.push(rng.next_u64() as u8),
        }
    }
    b
}

// ---- allocation accounting ----

/// A global allocator (the system's) that, on a thread inside [`measure`], records the
/// bytes allocated: the peak above what was live when the measure began, and the
/// largest single request. Install it in a test or bench binary:
/// `#[global_allocator] static A: CountingAlloc = CountingAlloc;`.
pub struct CountingAlloc;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn record_alloc(size: usize) {
    // `try_with`: during thread teardown the slots may be gone; nothing is recorded then.
    let _ = TRACKING.try_with(|t| {
        if t.get() {
            let live = LIVE.get() + size as isize;
            LIVE.set(live);
            PEAK.set(PEAK.get().max(live));
            LARGEST.set(LARGEST.get().max(size));
        }
    });
}

fn record_free(size: usize) {
    let _ = TRACKING.try_with(|t| {
        if t.get() {
            LIVE.set(LIVE.get() - size as isize);
        }
    });
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the GlobalAlloc
// contract; the bookkeeping only touches const-initialised thread-local `Cell`s (no
// allocation, no destructor, no reentrancy).
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record_alloc(layout.size());
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record_alloc(layout.size());
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        record_free(layout.size());
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // The block grows (or shrinks) by the difference; the largest request is its
        // new size.
        record_free(layout.size());
        record_alloc(new_size);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// What a closure allocated on this thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Most bytes live at once, above those live before.
    pub peak: usize,
    /// The largest single allocation.
    pub largest: usize,
}

/// Runs `f`, measuring its allocations on this thread (all zero unless [`CountingAlloc`]
/// is the global allocator).
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Usage) {
    LIVE.set(0);
    PEAK.set(0);
    LARGEST.set(0);
    TRACKING.set(true);
    let r = f();
    TRACKING.set(false);
    let usage = Usage {
        peak: PEAK.get().max(0) as usize,
        largest: LARGEST.get(),
    };
    (r, usage)
}

/// Whether [`CountingAlloc`] is the global allocator of this binary.
pub fn counting() -> bool {
    let (_, u) = measure(|| std::hint::black_box(vec![0u8; 1000]));
    u.largest >= 1000
}

/// The most a decoder may have allocated at once for an input of `len` bytes: a multiple
/// of it (a decoded value is larger than its encoding: a 1-byte empty string is a
/// 24-byte `String`, in a `Vec` that may have doubled its capacity) plus a constant
/// (error messages, the threads that verify hot-page chunks, a frame reader's first
/// 64 KiB). Nothing sized by a length field fits under it.
pub fn alloc_limit(len: usize) -> usize {
    ALLOC_PER_BYTE * len + ALLOC_SLACK
}

pub const ALLOC_PER_BYTE: usize = 64;
pub const ALLOC_SLACK: usize = 128 << 10;

// ---- the decoders ----

/// A decoder: `Err` is its message.
pub type Decoder = Box<dyn Fn(&[u8]) -> Result<(), String> + Send + Sync>;

/// A decoder under test and the valid encodings its cases start from.
pub struct Target {
    pub name: &'static str,
    /// Valid encodings, made by the real encoders.
    pub seeds: Vec<Vec<u8>>,
    /// Prefixes random inputs sometimes start with (magics), to get past the first check.
    pub prefixes: Vec<Vec<u8>>,
    /// The decoder: `Err` is its message.
    pub decode: Decoder,
    /// Repairs the checksums (and what else guards the body) of a mutated input, so the
    /// mutation reaches the parser behind them. Applied to half the mutated cases.
    pub reseal: Option<fn(&mut Vec<u8>)>,
}

/// How the cases of one target went.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub cases: u64,
    /// Inputs the decoder accepted.
    pub accepted: u64,
    /// Inputs it refused with a message.
    pub refused: u64,
    /// The largest `peak / max(input length, 1024)` seen, for which input length and peak.
    pub worst_ratio: f64,
    pub worst_len: usize,
    pub worst_peak: usize,
}

fn hex(b: &[u8]) -> String {
    let shown: String = b.iter().take(256).map(|x| format!("{x:02x}")).collect();
    if b.len() > 256 {
        format!("{shown}... ({} bytes)", b.len())
    } else {
        shown
    }
}

/// The input of case `case` of `t` (deterministic in `seed` and `case`).
pub fn case_input(t: &Target, seed: u64, case: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed ^ case.wrapping_mul(0x5851_f42d_4c95_7f2d) ^ 0xdec0de);
    match rng.below(10) {
        // Purely random bytes, sometimes behind a magic.
        0 | 1 => {
            let n = if rng.below(2) == 0 {
                rng.below(16)
            } else {
                rng.below(600)
            };
            let mut b = Vec::new();
            if !t.prefixes.is_empty() && rng.below(2) == 0 {
                b.extend_from_slice(&t.prefixes[rng.below(t.prefixes.len())]);
            }
            b.extend(rng.bytes(n));
            b
        }
        // A valid encoding, unchanged (every few hundred cases) or mutated.
        _ => {
            let s = &t.seeds[rng.below(t.seeds.len())];
            if rng.below(300) == 0 {
                return s.clone();
            }
            let mut b = mutate(&mut rng, s);
            if let Some(reseal) = t.reseal {
                if rng.below(2) == 0 {
                    reseal(&mut b);
                }
            }
            b
        }
    }
}

/// Runs `cases` cases of `t`. `Err` describes the first failure (a panic, too much
/// allocated, an empty error message) with its input.
pub fn run(t: &Target, cases: u64, seed: u64) -> Result<Summary, String> {
    if !counting() {
        return Err("CountingAlloc is not this binary's global allocator".into());
    }
    run_cases(t, cases, seed, true)
}

/// [`run`] without the allocation check, for a binary that cannot install
/// [`CountingAlloc`] (one linking `warmstart-launcher`, which has its own allocator).
pub fn run_unmeasured(t: &Target, cases: u64, seed: u64) -> Result<Summary, String> {
    run_cases(t, cases, seed, false)
}

fn run_cases(t: &Target, cases: u64, seed: u64, measured: bool) -> Result<Summary, String> {
    let mut s = Summary::default();
    for case in 0..cases {
        let input = case_input(t, seed, case);
        let (res, usage) = measure(|| catch_unwind(AssertUnwindSafe(|| (t.decode)(&input))));
        let fail = |what: String| {
            format!(
                "{}: case {case} (seed {seed:#x}) {what}; input ({} bytes): {}",
                t.name,
                input.len(),
                hex(&input)
            )
        };
        match res {
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                return Err(fail(format!("panicked: {msg}")));
            }
            Ok(Ok(())) => s.accepted += 1,
            Ok(Err(msg)) if msg.trim().is_empty() => {
                return Err(fail("failed with an empty message".into()))
            }
            Ok(Err(_)) => s.refused += 1,
        }
        let limit = alloc_limit(input.len());
        if measured && (usage.peak > limit || usage.largest > limit) {
            return Err(fail(format!(
                "allocated {} bytes at peak (largest block {}), more than the {limit} its \
                 length justifies",
                usage.peak, usage.largest
            )));
        }
        // Small inputs are all constant; the multiple shows on the longer ones.
        let ratio = usage.peak as f64 / input.len().max(1024) as f64;
        if ratio > s.worst_ratio {
            s.worst_ratio = ratio;
            s.worst_len = input.len();
            s.worst_peak = usage.peak;
        }
        s.cases += 1;
    }
    Ok(s)
}

fn record(i: u64, pack: u32) -> Record {
    let mut hash = [0u8; 32];
    hash[..8].copy_from_slice(&i.to_le_bytes());
    hash[8] = pack as u8;
    Record {
        hash: *blake3::hash(&hash).as_bytes(),
        loc: Location {
            pack,
            offset: i.wrapping_mul(1000).wrapping_add(16),
            len: (i as u32).wrapping_add(700),
            slot: (i % 4) as u8,
            pages: 4,
            codec: (i % 2) as u8,
        },
    }
}

fn records(n: u64) -> Vec<Record> {
    (0..n).map(|i| record(i, 1 + (i / 3) as u32)).collect()
}

#[allow(clippy::ptr_arg)] // the type of `Target::reseal`, which may resize
fn reseal_manifest(b: &mut Vec<u8>) {
    use crate::format::HEADER_LEN;
    if b.len() >= HEADER_LEN {
        let body_len = (b.len() - HEADER_LEN) as u64;
        b[12..20].copy_from_slice(&body_len.to_le_bytes());
        let sum = blake3::hash(&b[HEADER_LEN..]);
        b[20..52].copy_from_slice(sum.as_bytes());
    }
}

fn reseal_table(b: &mut Vec<u8>) {
    if b.len() >= table::HEADER_SIZE {
        let n = (b.len() - table::HEADER_SIZE) / table::RECORD_SIZE;
        b.truncate(table::HEADER_SIZE + n * table::RECORD_SIZE);
        b[16..24].copy_from_slice(&(n as u64).to_le_bytes());
        let sum = table::checksum(b);
        b[64..96].copy_from_slice(&sum);
    }
}

fn decode_table(b: &[u8], magic: [u8; 8]) -> Result<(), String> {
    let t = TableMap::from_bytes(b.to_vec(), magic)?;
    // What readers do with a valid table: every record, the pages hash.
    let mut packs = 0u64;
    for i in 0..t.len() {
        let r = t.record(i);
        packs = packs.wrapping_add(u64::from(t.pack_of(i)) ^ r.loc.offset);
    }
    std::hint::black_box((packs, t.compute_pages_hash(), t.pages_hash()));
    Ok(())
}

/// A pack-block case: a page-table record (56 bytes) and the stored block it points to;
/// decoding it is what a read of that page does with them.
fn decode_pack_block(b: &[u8]) -> Result<(), String> {
    if b.len() < table::RECORD_SIZE {
        return Err("shorter than a record".into());
    }
    let rec = Record::read(b);
    let mut page = [0u8; PAGE_SIZE];
    crate::store::snapshot::BlockReader::default().page(&rec, &b[table::RECORD_SIZE..], &mut page)
}

/// Makes the record's hash that of the page it decodes to (if it decodes), so the
/// mutations of the record and the block get past the hash check.
#[allow(clippy::ptr_arg)] // the type of `Target::reseal`, which may resize
fn reseal_pack_block(b: &mut Vec<u8>) {
    if b.len() < table::RECORD_SIZE {
        return;
    }
    let mut rec = Record::read(b);
    rec.hash = [0; 32];
    let mut page = [0u8; PAGE_SIZE];
    let _ = crate::store::snapshot::BlockReader::default().page(
        &rec,
        &b[table::RECORD_SIZE..],
        &mut page,
    );
    let h = blake3::hash(&page);
    b[..32].copy_from_slice(h.as_bytes());
}

/// Valid records and blocks, as the store's writer makes them: lz4 blocks of up to
/// four pages (every slot) and raw ones.
fn pack_blocks() -> Vec<Vec<u8>> {
    let text: Vec<u8> = (0..4 * PAGE_SIZE)
        .map(|i| b"page block lorem ipsum "[i % 23] ^ (i / PAGE_SIZE) as u8)
        .collect();
    let noise = Rng::new(4).bytes(PAGE_SIZE);
    let mut out = Vec::new();
    let lz4 = lz4_flex::block::compress(&text);
    for slot in 0..4u8 {
        let page = &text[slot as usize * PAGE_SIZE..(slot as usize + 1) * PAGE_SIZE];
        let rec = Record {
            hash: *blake3::hash(page).as_bytes(),
            loc: Location {
                pack: 1,
                offset: 16,
                len: lz4.len() as u32,
                slot,
                pages: 4,
                codec: table::CODEC_LZ4,
            },
        };
        let mut b = Vec::new();
        rec.write_to(&mut b);
        b.extend_from_slice(&lz4);
        out.push(b);
    }
    let rec = Record {
        hash: *blake3::hash(&noise).as_bytes(),
        loc: Location {
            pack: 2,
            offset: 16,
            len: PAGE_SIZE as u32,
            slot: 0,
            pages: 1,
            codec: table::CODEC_RAW,
        },
    };
    let mut b = Vec::new();
    rec.write_to(&mut b);
    b.extend_from_slice(&noise);
    out.push(b);
    out
}

/// The page count of the page table the hot-pages cases belong to.
const HOT_TABLE: u64 = 40;

/// The records hash of a hot-pages file of the fuzzed (imaginary) table: the hashes of
/// its records are those of [`record`].
fn hot_records_hash(idx: &[u64]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    for &i in idx {
        h.update(&record(i, 0).hash);
    }
    h.finalize()
}

fn hot_file(magic: &[u8; 8], chunk: u64, idx: &[u64]) -> Vec<u8> {
    let pages: Vec<u8> = idx
        .iter()
        .flat_map(|&i| (0..PAGE_SIZE).map(move |k| (i as usize * 7 + k) as u8))
        .collect();
    let mut b = hot::encode_head(magic, chunk, hot_records_hash(idx).as_bytes(), idx, &pages);
    b.extend_from_slice(&pages);
    b
}

fn reseal_hot(b: &mut Vec<u8>) {
    // Re-derive the layout from the (mutated) header; where it is plausible and fits,
    // rewrite the records hash, the chunk sums and the header hash.
    let u64_at = |b: &[u8], at: usize| {
        b.get(at..at + 8)
            .map(|x| u64::from_le_bytes(x.try_into().unwrap()))
    };
    let (Some(count), Some(chunk)) = (u64_at(b, 8), u64_at(b, 16)) else {
        return;
    };
    if count > 64 || chunk == 0 || chunk > 64 {
        return;
    }
    let (count, chunk) = (count as usize, chunk as usize);
    let chunks = count.div_ceil(chunk);
    let head_len = 56 + count * 8 + chunks * 32;
    let data = (head_len + 32).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    b.resize(data + count * PAGE_SIZE, 0);
    let idx: Vec<u64> = (0..count).map(|k| u64_at(b, 56 + k * 8).unwrap()).collect();
    b[24..56].copy_from_slice(hot_records_hash(&idx).as_bytes());
    let blake = &b[..8] == b"WARMHOT1";
    for c in 0..chunks {
        let bytes =
            &b[data + c * chunk * PAGE_SIZE..(data + (c + 1) * chunk * PAGE_SIZE).min(b.len())];
        let mut sum = [0u8; 32];
        if blake {
            sum = *blake3::hash(bytes).as_bytes();
        } else {
            sum[..16].copy_from_slice(&xxhash_rust::xxh3::xxh3_128(bytes).to_le_bytes());
        }
        let at = 56 + count * 8 + c * 32;
        b[at..at + 32].copy_from_slice(&sum);
    }
    let h = blake3::hash(&b[..head_len]);
    b[head_len..head_len + 32].copy_from_slice(h.as_bytes());
}

#[allow(clippy::ptr_arg)] // the type of `Target::reseal`, which may resize
fn reseal_working_set(b: &mut Vec<u8>) {
    if b.len() >= 48 {
        let sum = blake3::hash(&b[48..]);
        b[16..48].copy_from_slice(sum.as_bytes());
    }
}

fn sample_requests() -> Vec<Request> {
    let id = SnapshotId([7; 32]);
    vec![
        Request::Hello {
            magic: remote::MAGIC,
            version: remote::VERSION,
        },
        Request::Resolve {
            query: "web-app".into(),
        },
        Request::Manifest { id },
        Request::Pages {
            id,
            first: 5,
            count: 1024,
        },
        Request::WorkingSet { id },
        Request::SaveWorkingSet {
            id,
            pages: vec![7, 0, u64::MAX, 3],
        },
        Request::Begin,
        Request::AddPages {
            first_page: 3,
            pages: 2,
            lz4: lz4_flex::block::compress(&[1u8; 8192]),
        },
        Request::Commit {
            name: Some("x".into()),
            manifest: crate::format::encode(&Manifest::default()),
        },
    ]
}

fn sample_responses() -> Vec<Response> {
    let mut blocks = Vec::new();
    remote::push_block(&mut blocks, b"abc");
    remote::push_block(&mut blocks, &[9; 40]);
    vec![
        Response::Hello {
            magic: remote::MAGIC,
            version: remote::VERSION,
        },
        Response::Id(SnapshotId([3; 32])),
        Response::Manifest {
            manifest: crate::format::encode(&Manifest::default()),
            table: table::encode(TABLE_MAGIC, [1; 32], &records(2)),
        },
        Response::Blocks(blocks),
        Response::WorkingSet(None),
        Response::WorkingSet(Some(vec![1, 5, u64::MAX])),
        Response::Ready,
        Response::Runs(vec![
            PageRun {
                page: 0,
                count: 3,
                content: RunContent::Zero,
            },
            PageRun {
                page: 3,
                count: 2,
                content: RunContent::Data { first: 17 },
            },
        ]),
        Response::Error("no such snapshot".into()),
    ]
}

/// Frame bodies (kind and payload, no length prefix).
fn bodies(frames: impl Iterator<Item = Vec<u8>>) -> Vec<Vec<u8>> {
    frames.map(|f| f[4..].to_vec()).collect()
}

/// Every decoder of this crate.
pub fn targets() -> Vec<Target> {
    let mut rich = sample_manifest();
    rich.processes.push(rich.processes[0].clone());
    let manifests = [Manifest::default(), sample_manifest(), rich];
    let mut sets = BTreeMap::new();
    sets.insert(1, vec![3, 1, 2]);
    sets.insert(7, vec![]);
    sets.insert(9, vec![u64::MAX, 0]);
    vec![
        Target {
            name: "manifest",
            seeds: manifests.iter().map(crate::format::encode).collect(),
            prefixes: vec![crate::format::MAGIC.to_vec()],
            decode: Box::new(|b| {
                crate::format::decode(b)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }),
            reseal: Some(reseal_manifest),
        },
        Target {
            name: "page table",
            seeds: [0, 1, 5]
                .iter()
                .map(|&n| table::encode(TABLE_MAGIC, [9; 32], &records(n)))
                .collect(),
            prefixes: vec![TABLE_MAGIC.to_vec()],
            decode: Box::new(|b| decode_table(b, TABLE_MAGIC)),
            reseal: Some(reseal_table),
        },
        Target {
            name: "pack index",
            seeds: [0, 2, 6]
                .iter()
                .map(|&n| table::encode(INDEX_MAGIC, [0; 32], &records(n)))
                .collect(),
            prefixes: vec![INDEX_MAGIC.to_vec()],
            decode: Box::new(|b| decode_table(b, INDEX_MAGIC)),
            reseal: Some(reseal_table),
        },
        Target {
            name: "hot pages",
            seeds: vec![
                hot_file(b"WARMHOT2", 64, &[]),
                hot_file(b"WARMHOT2", 64, &[3]),
                hot_file(b"WARMHOT2", 2, &[0, 1, 5, 9, 39]),
                hot_file(b"WARMHOT1", 2, &[4, 6, 7]),
            ],
            prefixes: vec![b"WARMHOT2".to_vec(), b"WARMHOT1".to_vec()],
            decode: Box::new(|b| {
                hot::parse(b, HOT_TABLE, hot_records_hash, 2).map(|(idx, data)| {
                    std::hint::black_box((idx, data));
                })
            }),
            reseal: Some(reseal_hot),
        },
        Target {
            name: "working set",
            seeds: vec![
                working_set::encode_v1(&[]),
                working_set::encode_v1(&[5, 1, 9, u64::MAX]),
                working_set::encode_v2(&BTreeMap::new()),
                working_set::encode_v2(&sets),
            ],
            prefixes: vec![b"WARMWS1\0".to_vec(), b"WARMWS2\0".to_vec()],
            decode: Box::new(|b| working_set::decode(b).map(|w| drop(std::hint::black_box(w)))),
            reseal: Some(reseal_working_set),
        },
        Target {
            name: "pack block",
            seeds: pack_blocks(),
            prefixes: vec![],
            decode: Box::new(decode_pack_block),
            reseal: Some(reseal_pack_block),
        },
        Target {
            name: "page-server request",
            seeds: bodies(sample_requests().iter().map(Request::encode)),
            prefixes: vec![],
            decode: Box::new(|b| {
                Request::decode(b)
                    .map(|r| drop(std::hint::black_box(r)))
                    .map_err(|e| e.to_string())
            }),
            reseal: None,
        },
        Target {
            name: "page-server response",
            seeds: bodies(sample_responses().iter().map(Response::encode)),
            prefixes: vec![],
            decode: Box::new(|b| {
                Response::decode(b)
                    .map(|r| drop(std::hint::black_box(r)))
                    .map_err(|e| e.to_string())
            }),
            reseal: None,
        },
        Target {
            name: "page-server frames",
            // Whole conversations: length-prefixed frames back to back.
            seeds: vec![
                sample_requests().iter().flat_map(Request::encode).collect(),
                sample_responses()
                    .iter()
                    .flat_map(Response::encode)
                    .collect(),
            ],
            prefixes: vec![],
            decode: Box::new(|b| {
                let mut r = std::io::Cursor::new(b);
                loop {
                    match remote::read_frame(&mut r) {
                        Ok(None) => return Ok(()),
                        Ok(Some(body)) => {
                            let _ = std::hint::black_box(Request::decode(&body));
                            let _ = std::hint::black_box(Response::decode(&body));
                        }
                        Err(e) => return Err(e.to_string()),
                    }
                }
            }),
            reseal: None,
        },
    ]
}

/// A small but fully populated manifest.
pub fn sample_manifest() -> Manifest {
    Manifest {
        created_unix: 1_700_000_000,
        command: vec!["/usr/bin/python3".into(), "-c".into(), "print(1)".into()],
        trigger: "stdin".into(),
        host: HostFacts {
            kernel_release: "6.8.0".into(),
            vdso_hash: [7; 32],
            xsave_features: 0x2e7,
            xsave_size: 2696,
            vdso_image: b"\x7fELF".to_vec(),
            cpu_features: vec!["sse4_2".into(), "avx2".into()],
            xsave_layout: vec![(2, 576, 256), (5, 1088, 64)],
            cpu_baseline: Some("x86-64-v3".into()),
        },
        clocks: crate::model::Clocks {
            monotonic_ns: 12_345_678_901,
            boottime_ns: 12_445_678_901,
        },
        processes: vec![Process {
            pid: 1,
            ppid: 0,
            pgid: 1,
            sid: 1,
            comm: "python3".into(),
            exe: FileIdentity {
                path: "/usr/bin/python3".into(),
                dev: 2049,
                ino: 42,
                size: 1 << 20,
                mtime_ns: -5,
                mode: 0o100755,
                hash: Some([3; 32]),
                btime_ns: Some(-7),
            },
            creds: Creds::default(),
            rlimits: vec![Rlimit {
                resource: 7,
                cur: 1024,
                max: 4096,
            }],
            cwd: "/".into(),
            root: "/".into(),
            umask: 0o22,
            personality: 0,
            no_new_privs: false,
            dumpable: 1,
            mm: MmFields::default(),
            auxv: vec![6, 4096, 0, 0],
            vmas: vec![Vma {
                start: 0x7000_0000,
                end: 0x7000_4000,
                prot: PROT_READ | PROT_WRITE,
                shared: false,
                flags: VmaFlags::default(),
                kind: VmaKind::Anon {
                    name: "[heap]".into(),
                },
                offset: 0,
                pages: vec![
                    PageRun {
                        page: 0,
                        count: 2,
                        content: RunContent::Data { first: 0 },
                    },
                    PageRun {
                        page: 3,
                        count: 1,
                        content: RunContent::Zero,
                    },
                ],
            }],
            fds: vec![Fd {
                fd: 0,
                cloexec: false,
                ofd: 0,
                file: FileDesc::External { stdio: 0 },
            }],
            sigactions: vec![SigAction::default(); 64],
            shared_pending: vec![],
            threads: vec![Thread {
                tid: 1,
                comm: "python3".into(),
                regs: vec![0; reg::COUNT],
                xsave: vec![0; 64],
                sigmask: 0,
                pending: vec![],
                sigaltstack: AltStack::default(),
                rseq: Some(Rseq {
                    addr: 0x1000,
                    len: 32,
                    sig: 0x53053053,
                }),
                robust_list: (0, 24),
                tid_address: 0,
                attrs: ThreadAttrs {
                    nice: 7,
                    pdeathsig: 12,
                    ..Default::default()
                },
            }],
            itimers: Default::default(),
            posix_timers: vec![PosixTimer {
                id: 3,
                clock: 1,
                signo: 14,
                sigval: 7,
                notify: 0,
                notify_tid: 1,
                interval_ns: 0,
                value_ns: 5_000,
            }],
            seccomp_filters: vec![vec![6, 0, 0, 0, 0, 0, 0xff, 0x7f]],
            private_files: vec![PrivateFile {
                path: "/tmp/hsperfdata_root/1".into(),
                mode: 0o100600,
                data: vec![1, 2, 3],
            }],
            zombie: None,
            zombie_sigmask: 0,
            fd_table_size: 64,
            ctty: Some(3),
            child_subreaper: true,
            thp_disable: false,
            oom_score_adj: 321,
        }],
        pipes: vec![PipeObject {
            id: 9,
            capacity: 65536,
            data: b"hello".to_vec(),
        }],
        unix_pairs: vec![crate::model::UnixPairObject {
            id: 11,
            sock_type: 1,
            queued: [vec![b"ping".to_vec()], Vec::new()],
            shutdown: [2, 1],
        }],
        file_locks: vec![crate::model::FileLock {
            pid: 1,
            fd: 3,
            kind: crate::model::LockKind::Posix,
            write: true,
            start: 0,
            len: 0,
        }],
        page_count: 2,
        pages_hash: [3; 32],
        shared_files: vec![SharedFile {
            id: 0,
            path: "/dev/shm/sem.mp-x1y2".into(),
            memfd: false,
            seals: 0,
            owner: FileOwner {
                uid: 0,
                gid: 0,
                mode: 0o600,
            },
            size: 32,
            pages: vec![PageRun {
                page: 0,
                count: 1,
                content: RunContent::Data { first: 0 },
            }],
        }],
        private_tmp: Some(vec![crate::model::TmpEntry {
            path: "db.sqlite-shm".into(),
            owner: Default::default(),
            mtime_ns: 1,
            kind: crate::model::TmpKind::Symlink { target: "x".into() },
        }]),
        tool: Some(crate::model::ToolInfo {
            runtime: "python".into(),
            command: vec!["python3".into(), "-m".into(), "black".into()],
            prime_args: vec!["--check x.py".into()],
            cold_prefix: vec!["python3".into(), "-m".into(), "black".into()],
            argv0: "-m black".into(),
            files: vec![FileIdentity {
                path: "/usr/lib/python3/black/__init__.py".into(),
                size: 10,
                hash: Some([3; 32]),
                ..Default::default()
            }],
            startup_env: vec![("LANG".into(), "C.UTF-8".into())],
        }),
        unix_queues: Vec::new(),
        cgroups: None,
        namespaces: Namespaces {
            uts: Some(UtsNs {
                hostname: "box".into(),
                domainname: "(none)".into(),
            }),
            ipc: Some(IpcNs {
                sysctls: vec![("msgmax".into(), "8192".into())],
                shm: vec![ShmSegment {
                    perm: IpcPerm {
                        key: 0x1234,
                        id: 32769,
                        mode: 0o600,
                        ..Default::default()
                    },
                    size: 8192,
                    pages: vec![PageRun {
                        page: 0,
                        count: 1,
                        content: RunContent::Zero,
                    }],
                }],
                sem: vec![SemSet {
                    perm: IpcPerm::default(),
                    values: vec![1, 2, 3],
                }],
                msg: vec![MsgQueue {
                    perm: IpcPerm::default(),
                    qbytes: 16384,
                    messages: vec![IpcMessage {
                        mtype: 1,
                        data: b"hi".to_vec(),
                    }],
                }],
            }),
            net: Some(NetNs {
                lo_up: true,
                lo_mtu: 65536,
                addrs: vec![NetAddr {
                    family: 2,
                    prefix_len: 8,
                    addr: vec![127, 0, 0, 1],
                    ..Default::default()
                }],
                routes: Vec::new(),
                sysctls: vec![("net/ipv4/tcp_syncookies".into(), "2".into())],
                veths: vec![NetVeth {
                    index: 2,
                    name: "eth0".into(),
                    mtu: 1500,
                    mac: vec![2, 0, 0, 0, 0, 1],
                    up: true,
                    addrs: Vec::new(),
                    peer: "veth-host".into(),
                }],
            }),
        },
    }
}
