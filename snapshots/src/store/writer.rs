//! Writing a snapshot: deduplicating, compressing and appending pages, then committing.

use std::collections::HashMap;
use std::fs::{self, File};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use super::direct::DirectWriter;
use super::fsutil::{self, io_err};
use super::lock::WriteLock;
use super::table::{self, Location, Record, TableMap, CODEC_LZ4, CODEC_RAW, INDEX_MAGIC};
use super::{
    SnapshotId, Store, StoreError, BLOCK_PAGES, PACK_HEADER, PACK_MAGIC, PACK_TARGET_SIZE,
    PACK_VERSION,
};
use crate::format;
use crate::model::{Manifest, PageRun, RunContent, PAGE_SIZE};

/// A blake3 key: already uniformly distributed, so hash it by its first 8 bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key([u8; 32]);

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(u64::from_le_bytes(self.0[..8].try_into().unwrap()));
    }
}

#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Index = HashMap<Key, Location, BuildHasherDefault<PassThrough>>;

/// True if the page is all zero. Non-zero pages usually fail on the first chunk.
pub(crate) fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(64).all(|c| {
        let mut acc = 0u128;
        for w in c.chunks_exact(16) {
            acc |= u128::from_ne_bytes(w.try_into().unwrap());
        }
        acc == 0
    })
}

/// Pack number of a location whose block is still with a packer thread; its `offset`
/// is then the block's sequence number, resolved at commit.
const PENDING: u32 = u32::MAX;

/// Blocks handed to a packer at once (64 blocks = 1 MiB of pages).
const BATCH_BLOCKS: usize = 64;

/// Batches in flight between the hashing side and the packers: bounds memory, and lets
/// hashing run ahead of compression by a few MiB.
const BATCHES_IN_FLIGHT: usize = 8;

/// Packer threads at most: each compresses the batches it takes and writes them to
/// packs of its own, so compression and the copy into the page cache (which on a VM
/// whose free memory was handed back costs a host fault per page) run on every core.
const MAX_PACKERS: usize = 4;

fn packer_count() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, MAX_PACKERS))
}

/// Pages of one `add_pages` call at or above which hashing is split across two threads.
const PARALLEL_HASH_PAGES: usize = 128;

/// Consecutive new blocks (each `pages` of 4 KiB in `data`, in order) for a packer,
/// the first of them block `first_block` of the snapshot.
#[derive(Default)]
struct Batch {
    first_block: u64,
    data: Vec<u8>,
    /// Each block's pages, their hashes, and whether every one of its pages is known
    /// not to compress (its compression is then not tried).
    blocks: Vec<(u8, [[u8; 32]; BLOCK_PAGES], bool)>,
}

/// Where an open pack's bytes go.
enum PackOut {
    /// Through the page cache (a dump: a restore may read the pack right away).
    Cached(BufWriter<File>),
    /// Past it ([`super::direct`]: a pull, whose pages are not read right away).
    Direct(DirectWriter),
}

impl PackOut {
    fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            PackOut::Cached(w) => w.write_all(data),
            PackOut::Direct(w) => w.write_all(data),
        }
    }

    /// Writes what is buffered and returns the file.
    fn finish(self) -> std::io::Result<File> {
        match self {
            PackOut::Cached(mut w) => {
                w.flush()?;
                w.into_inner().map_err(|e| e.into_error())
            }
            PackOut::Direct(w) => w.finish(),
        }
    }
}

struct OpenPack {
    number: u32,
    tmp: PathBuf,
    out: PackOut,
    len: u64,
    /// Bytes whose writeback has been started ([`WRITEBACK_STEP`]).
    flushing: u64,
    records: Vec<Record>,
}

/// A pack written completely but not yet durable nor visible: it stays in `tmp/` until
/// the snapshot's commit syncs it and moves it under `packs/`.
struct SealedPack {
    number: u32,
    tmp: PathBuf,
    file: File,
    records: Vec<Record>,
}

/// Bytes written to a file at once. Not more: the page cache gives a write of 2 MiB or
/// more large folios, which on a VM whose free memory is handed back to the host
/// (free page reporting hands back exactly such large free blocks) come from memory the
/// host must fault in again: `dd` of 256 MiB into a new file runs at 130-190 MB/s with
/// 2 or 4 MiB writes, against 1.2-2 GB/s with 256 KiB to 1 MiB ones (2026-12-07).
pub(crate) const WRITE_SIZE: usize = 512 << 10;

/// Writeback of a pack being written is started every this many bytes, so that the one
/// `fsync` at commit finds most of it on disk already and the dump never waits for the
/// disk while it reads.
const WRITEBACK_STEP: u64 = 2 << 20;

impl OpenPack {
    /// Starts writeback (without waiting) of what reached the file since the last call,
    /// once that is [`WRITEBACK_STEP`] or more.
    fn start_writeback(&mut self) {
        use std::os::fd::AsRawFd;
        // Direct writes are on the disk already.
        let PackOut::Cached(out) = &self.out else {
            return;
        };
        let in_file = self.len - out.buffer().len() as u64;
        if in_file - self.flushing < WRITEBACK_STEP {
            return;
        }
        // SAFETY: plain syscall on our own file; advice only, so its result is ignored.
        unsafe {
            libc::sync_file_range(
                out.get_ref().as_raw_fd(),
                self.flushing as i64,
                (in_file - self.flushing) as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        self.flushing = in_file;
    }
}

/// What the packers hand back when their input ends.
struct Packed {
    /// Base location of every block, by sequence number (`None`: a block of a batch
    /// never sent, which only a writer dropped uncommitted has).
    bases: Vec<Option<Location>>,
    sealed: Vec<SealedPack>,
    new_bytes: u64,
}

/// What one packer thread hands back: (block sequence number, base location) of each
/// block it wrote, in the order it wrote them.
struct PackerDone {
    bases: Vec<(u64, Location)>,
    sealed: Vec<SealedPack>,
    new_bytes: u64,
}

/// Batches waiting for a packer: whichever packer is free takes the next one.
type Queue = Arc<Mutex<mpsc::Receiver<Batch>>>;

/// One packer thread's side: compresses the blocks of the batches it takes and appends
/// them to packs of its own in `tmp/`; block `n` of the snapshot is where its `bases`
/// say.
struct Packer {
    store: Store,
    /// Packs bypass the page cache.
    direct: bool,
    /// The next pack number, shared by the packers of one writer.
    next_pack: Arc<AtomicU32>,
    pack: Option<OpenPack>,
    sealed: Vec<SealedPack>,
    bases: Vec<(u64, Location)>,
    compressed: Vec<u8>,
    new_bytes: u64,
}

impl Packer {
    /// Packs batches of `queue` until it ends; each emptied batch goes back through
    /// `free` to be filled again (its buffer's pages are then already touched: fresh
    /// memory costs a page fault per 4 KiB, which on a VM is slower than compressing it).
    fn run(
        mut self,
        queue: Queue,
        free: mpsc::SyncSender<Batch>,
    ) -> Result<PackerDone, StoreError> {
        let res = (|| {
            loop {
                // The lock is held only while waiting for the next batch, not while
                // packing it.
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
                let Ok(mut batch) = next else { break };
                let mut at = 0;
                for (i, (pages, hashes, raw)) in batch.blocks.iter().enumerate() {
                    let len = *pages as usize * PAGE_SIZE;
                    self.write_block(
                        batch.first_block + i as u64,
                        &batch.data[at..at + len],
                        &hashes[..*pages as usize],
                        *raw,
                    )?;
                    at += len;
                }
                batch.blocks.clear();
                batch.data.clear();
                let _ = free.try_send(batch);
            }
            self.seal_pack()
        })();
        match res {
            Ok(()) => Ok(PackerDone {
                bases: std::mem::take(&mut self.bases),
                sealed: std::mem::take(&mut self.sealed),
                new_bytes: self.new_bytes,
            }),
            Err(e) => {
                self.discard();
                Err(e)
            }
        }
    }

    fn open_pack(&mut self) -> Result<&mut OpenPack, StoreError> {
        if self.pack.is_none() {
            let number = self.next_pack.fetch_add(1, Ordering::Relaxed);
            let (file, tmp) =
                fsutil::create_tmp(&self.store.tmp_dir(), &format!("pack-{number:08}"))?;
            let mut out = if self.direct {
                PackOut::Direct(DirectWriter::new(file).map_err(io_err("write", &tmp))?)
            } else {
                PackOut::Cached(BufWriter::with_capacity(WRITE_SIZE, file))
            };
            let mut header = [0u8; PACK_HEADER];
            header[..8].copy_from_slice(&PACK_MAGIC);
            header[8..12].copy_from_slice(&PACK_VERSION.to_le_bytes());
            out.write_all(&header).map_err(io_err("write", &tmp))?;
            self.pack = Some(OpenPack {
                number,
                tmp,
                out,
                len: PACK_HEADER as u64,
                flushing: 0,
                records: Vec::new(),
            });
        }
        Ok(self.pack.as_mut().unwrap())
    }

    fn write_block(
        &mut self,
        seq: u64,
        block: &[u8],
        hashes: &[[u8; 32]],
        incompressible: bool,
    ) -> Result<(), StoreError> {
        let raw_len = block.len();
        let clen = if incompressible {
            raw_len
        } else {
            lz4_flex::block::compress_into(block, &mut self.compressed)
                .expect("output sized by get_maximum_output_size")
        };
        // Store raw when lz4 saves under 1/32: reading raw needs no decompression.
        let (codec, len) = if clen < raw_len - raw_len / 32 {
            (CODEC_LZ4, clen)
        } else {
            (CODEC_RAW, raw_len)
        };
        self.open_pack()?;
        let pack = self.pack.as_mut().unwrap();
        let data = if codec == CODEC_LZ4 {
            &self.compressed[..len]
        } else {
            block
        };
        pack.out
            .write_all(data)
            .map_err(io_err("write", &pack.tmp))?;
        let base = Location {
            pack: pack.number,
            offset: pack.len,
            len: len as u32,
            slot: 0,
            pages: hashes.len() as u8,
            codec,
        };
        pack.len += len as u64;
        pack.start_writeback();
        self.new_bytes += len as u64;
        for (slot, hash) in hashes.iter().enumerate() {
            let loc = Location {
                slot: slot as u8,
                ..base
            };
            pack.records.push(Record { hash: *hash, loc });
        }
        self.bases.push((seq, base));
        if pack.len >= PACK_TARGET_SIZE {
            self.seal_pack()?;
        }
        Ok(())
    }

    /// Finishes the open pack's writes (no sync: that is the commit's one flush).
    fn seal_pack(&mut self) -> Result<(), StoreError> {
        let Some(pack) = self.pack.take() else {
            return Ok(());
        };
        let file = match pack.out.finish() {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_file(&pack.tmp);
                return Err(io_err("write", &pack.tmp)(e));
            }
        };
        self.sealed.push(SealedPack {
            number: pack.number,
            tmp: pack.tmp,
            file,
            records: pack.records,
        });
        Ok(())
    }

    /// Removes every file this packer wrote (on error).
    fn discard(&mut self) {
        if let Some(pack) = self.pack.take() {
            let _ = fs::remove_file(&pack.tmp);
        }
        for s in self.sealed.drain(..) {
            let _ = fs::remove_file(&s.tmp);
        }
    }
}

/// Builds one snapshot. Holds the store's writer lock until committed or dropped;
/// dropping it uncommitted leaves nothing behind (at worst, after a crash, garbage in
/// `tmp/` that `gc` removes).
///
/// The work is shared: the caller's thread zero-checks and hashes pages (on two threads
/// for large calls) and deduplicates them; packer threads (one per core, up to
/// [`MAX_PACKERS`]) take batches of the new ones as they come, compress them and append
/// them to packs of their own. Packs are written to the page cache with writeback
/// started as they grow, and made durable all at once by [`SnapshotWriter::commit`].
pub struct SnapshotWriter<'a> {
    store: &'a Store,
    _lock: WriteLock,
    /// Every page hash known: in the store's packs, or (pack [`PENDING`]) in a block of
    /// this snapshot still with a packer.
    index: Index,
    table: Vec<Record>,
    /// The batch being filled: its last block is incomplete while `block_pages` > 0.
    batch: Batch,
    block_pages: usize,
    /// Sequence number of the block being filled.
    next_block: u64,
    tx: Option<mpsc::SyncSender<Batch>>,
    /// Emptied batches coming back from the packers, to be filled again.
    free: mpsc::Receiver<Batch>,
    packers: Vec<std::thread::JoinHandle<Result<PackerDone, StoreError>>>,
    new_pages: u64,
    /// Time the last commit spent making the snapshot durable.
    flush_time: std::time::Duration,
    /// The snapshot whose records [`Self::add_base`] copies.
    base: Option<super::Snapshot>,
}

fn parse_pack_name(name: &str, ext: &str) -> Option<u32> {
    name.strip_prefix("pack-")?.strip_suffix(ext)?.parse().ok()
}

/// Zero-ness and hash of each page of `data`: `None` for a zero page. The non-zero
/// pages are hashed together ([`super::page_hash`]).
fn hash_pages(data: &[u8], out: &mut [Option<[u8; 32]>]) {
    let mut pages: Vec<&[u8; PAGE_SIZE]> = Vec::with_capacity(out.len());
    let mut at = Vec::with_capacity(out.len());
    for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
        if is_zero(page) {
            out[i] = None;
        } else {
            pages.push(page.try_into().unwrap());
            at.push(i);
        }
    }
    let mut hashes = vec![[0u8; 32]; pages.len()];
    super::page_hash::hash_pages(&pages, &mut hashes);
    for (i, h) in at.into_iter().zip(hashes) {
        out[i] = Some(h);
    }
}

impl<'a> SnapshotWriter<'a> {
    pub(crate) fn new(store: &'a Store, lock: WriteLock, direct: bool) -> Result<Self, StoreError> {
        let packs = store.packs_dir();
        let mut pack_numbers = Vec::new();
        let mut idx_numbers = Vec::new();
        for e in fs::read_dir(&packs).map_err(io_err("list", &packs))? {
            let e = e.map_err(io_err("list", &packs))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(n) = parse_pack_name(name, ".pack") {
                pack_numbers.push(n);
            } else if let Some(n) = parse_pack_name(name, ".idx") {
                idx_numbers.push(n);
            }
        }
        let next_pack = pack_numbers
            .iter()
            .chain(&idx_numbers)
            .max()
            .map_or(1, |m| m + 1);
        let mut index = Index::default();
        for n in idx_numbers {
            if !pack_numbers.contains(&n) {
                continue;
            }
            let path = store.idx_path(n);
            match TableMap::open(&path, INDEX_MAGIC, true) {
                Ok(t) => {
                    index.reserve(t.len() as usize);
                    for r in t.records() {
                        if r.loc.pack == n {
                            index.insert(Key(r.hash), r.loc);
                        }
                    }
                }
                Err(reason) => tracing::warn!(
                    "ignoring pack index {}: {}; its pages will not be deduplicated",
                    path.display(),
                    reason.reason()
                ),
            }
        }
        let next_pack = Arc::new(AtomicU32::new(next_pack));
        let (tx, rx) = mpsc::sync_channel(BATCHES_IN_FLIGHT);
        let queue: Queue = Arc::new(Mutex::new(rx));
        let (free_tx, free_rx) = mpsc::sync_channel(BATCHES_IN_FLIGHT + 2 * MAX_PACKERS);
        let mut packers = Vec::new();
        for _ in 0..packer_count() {
            let packer = Packer {
                store: store.clone(),
                direct,
                next_pack: next_pack.clone(),
                pack: None,
                sealed: Vec::new(),
                bases: Vec::new(),
                compressed: vec![
                    0;
                    lz4_flex::block::get_maximum_output_size(BLOCK_PAGES * PAGE_SIZE)
                ],
                new_bytes: 0,
            };
            let (queue, free_tx) = (queue.clone(), free_tx.clone());
            let spawned = std::thread::Builder::new()
                .name("warmstart-packer".into())
                .spawn(move || packer.run(queue, free_tx));
            match spawned {
                Ok(h) => packers.push(h),
                // Fewer packers are slower, not wrong; none is an error.
                Err(e) if packers.is_empty() => {
                    return Err(StoreError::Io {
                        action: "start the packer thread for",
                        path: store.tmp_dir(),
                        source: e,
                    })
                }
                Err(_) => break,
            }
        }
        Ok(SnapshotWriter {
            store,
            _lock: lock,
            index,
            table: Vec::new(),
            batch: Batch::default(),
            block_pages: 0,
            next_block: 0,
            tx: Some(tx),
            free: free_rx,
            packers,
            new_pages: 0,
            flush_time: std::time::Duration::ZERO,
            base: None,
        })
    }

    /// Pages so far not found in the store nor earlier in this snapshot (to be written).
    pub fn new_pages(&self) -> u64 {
        self.new_pages
    }

    /// Page-table records so far.
    pub fn page_count(&self) -> u64 {
        self.table.len() as u64
    }

    /// Adds consecutive pages of a VMA starting at page index `first_page` of that VMA
    /// (`data.len()` a multiple of 4096) and appends the resulting runs to `runs`,
    /// splitting zero and data runs and merging with the previous run when contiguous.
    pub fn add_pages(
        &mut self,
        first_page: u64,
        data: &[u8],
        runs: &mut Vec<PageRun>,
    ) -> Result<(), StoreError> {
        if !data.len().is_multiple_of(PAGE_SIZE) {
            return Err(StoreError::UnalignedPages { len: data.len() });
        }
        let pages = data.len() / PAGE_SIZE;
        let mut hashes = vec![None; pages];
        if pages >= PARALLEL_HASH_PAGES {
            let half = pages / 2;
            let (d1, d2) = data.split_at(half * PAGE_SIZE);
            let (h1, h2) = hashes.split_at_mut(half);
            std::thread::scope(|s| {
                s.spawn(|| hash_pages(d2, h2));
                hash_pages(d1, h1);
            });
        } else {
            hash_pages(data, &mut hashes);
        }
        self.add_hashed(
            first_page,
            data,
            hashes.into_iter().map(|h| (h, false)),
            runs,
        )
    }

    /// [`Self::add_pages`] of pages whose blake3 hashes the caller has computed or
    /// checked already (a pull verifies every page against its record), none of them a
    /// zero page: they are not hashed again.
    pub fn add_verified_pages(
        &mut self,
        first_page: u64,
        data: &[u8],
        hashes: &[[u8; 32]],
        runs: &mut Vec<PageRun>,
    ) -> Result<(), StoreError> {
        let unknown = std::iter::repeat(false);
        self.add_verified(first_page, data, hashes, unknown, runs)
    }

    /// [`Self::add_verified_pages`], knowing of each page whether it compresses
    /// (`incompressible[i]`: it did not where it comes from, e.g. a registry block that
    /// holds it raw), so that blocks of such pages are stored without trying.
    pub fn add_verified_pages_hinted(
        &mut self,
        first_page: u64,
        data: &[u8],
        hashes: &[[u8; 32]],
        incompressible: &[bool],
        runs: &mut Vec<PageRun>,
    ) -> Result<(), StoreError> {
        assert_eq!(hashes.len(), incompressible.len(), "one hint per page");
        let hints = incompressible.iter().copied();
        self.add_verified(first_page, data, hashes, hints, runs)
    }

    fn add_verified(
        &mut self,
        first_page: u64,
        data: &[u8],
        hashes: &[[u8; 32]],
        incompressible: impl Iterator<Item = bool>,
        runs: &mut Vec<PageRun>,
    ) -> Result<(), StoreError> {
        if !data.len().is_multiple_of(PAGE_SIZE) {
            return Err(StoreError::UnalignedPages { len: data.len() });
        }
        assert_eq!(data.len() / PAGE_SIZE, hashes.len(), "one hash per page");
        let hashes = (hashes.iter().zip(incompressible)).map(|(h, raw)| (Some(*h), raw));
        self.add_hashed(first_page, data, hashes, runs)
    }

    /// Adds the pages of `data` with their hashes (`None`: a zero page) and whether
    /// each is known not to compress.
    fn add_hashed(
        &mut self,
        first_page: u64,
        data: &[u8],
        hashes: impl Iterator<Item = (Option<[u8; 32]>, bool)>,
        runs: &mut Vec<PageRun>,
    ) -> Result<(), StoreError> {
        for (i, (page, (hash, raw))) in data.chunks_exact(PAGE_SIZE).zip(hashes).enumerate() {
            let at = first_page + i as u64;
            let content = match hash {
                None => RunContent::Zero,
                Some(hash) => RunContent::Data {
                    first: self.add_page(page, hash, raw)?,
                },
            };
            push_run(runs, at, content);
        }
        Ok(())
    }

    /// Makes snapshot `id` of this store the base of this one: [`Self::add_base`] then
    /// copies its page-table records (the same stored pages, neither read nor hashed
    /// again). Its manifest and whole page table are validated here. Fails when the
    /// store lacks it or it is damaged (the caller then reads the pages instead).
    pub fn set_base(&mut self, id: &SnapshotId) -> Result<(), StoreError> {
        self.base = Some(self.store.load(id)?);
        Ok(())
    }

    /// [`Self::set_base`] with a snapshot of store `other`, whose packs this store must
    /// have adopted ([`Store::adopt_packs`], before this writer was made).
    pub fn set_base_from(&mut self, other: &Store, id: &SnapshotId) -> Result<(), StoreError> {
        let base = other.load(id)?;
        let mut packs: Vec<u32> = (0..base.page_count())
            .map(|i| base.record(i).loc.pack)
            .collect();
        packs.sort_unstable();
        packs.dedup();
        if let Some(p) = packs.iter().find(|&&p| !self.store.pack_path(p).exists()) {
            return Err(StoreError::BaseRecords {
                reason: format!(
                    "snapshot {} of {} is in pack {p}, which {} lacks",
                    id.short(),
                    other.dir().display(),
                    self.store.dir().display()
                ),
            });
        }
        self.base = Some(base);
        Ok(())
    }

    /// Adds, for each `(first_page, base_first, count)`, pages `first_page..+count` of a
    /// VMA whose contents are those of the base's page-table records
    /// `base_first..+count` (see [`Self::set_base`]); the runs go to `runs` in the order
    /// given. A record outside the base's table is an error, and nothing is added then.
    pub fn add_base(
        &mut self,
        pages: &[(u64, u64, u64)],
        runs: &mut Vec<PageRun>,
    ) -> Result<(), StoreError> {
        let Some(base) = &self.base else {
            return Err(StoreError::BaseRecords {
                reason: "no base snapshot was set".into(),
            });
        };
        let n = base.page_count();
        if let Some(&(_, f, c)) = pages
            .iter()
            .find(|&&(_, f, c)| f.checked_add(c).is_none_or(|e| e > n))
        {
            return Err(StoreError::BaseRecords {
                reason: format!(
                    "records {f}..+{c} asked of snapshot {}, which has {n}",
                    base.id.short()
                ),
            });
        }
        for &(first_page, base_first, count) in pages {
            let idx = self.table.len() as u64;
            self.table
                .extend((base_first..base_first + count).map(|i| base.record(i)));
            if count > 0 {
                push_run(runs, first_page, RunContent::Data { first: idx });
                if let Some(last) = runs.last_mut() {
                    // push_run added one page; the run covers `count`.
                    last.count += count - 1;
                }
            }
        }
        Ok(())
    }

    fn add_page(
        &mut self,
        page: &[u8],
        hash: [u8; 32],
        incompressible: bool,
    ) -> Result<u64, StoreError> {
        let idx = self.table.len() as u64;
        if let Some(loc) = self.index.get(&Key(hash)) {
            self.table.push(Record { hash, loc: *loc });
            return Ok(idx);
        }
        let loc = Location {
            pack: PENDING,
            offset: self.next_block,
            len: 0,
            slot: self.block_pages as u8,
            pages: 0,
            codec: 0,
        };
        self.table.push(Record { hash, loc });
        self.index.insert(Key(hash), loc);
        self.new_pages += 1;
        if self.block_pages == 0 {
            self.batch.blocks.push((0, [[0; 32]; BLOCK_PAGES], true));
        }
        let block = self.batch.blocks.last_mut().unwrap();
        block.1[self.block_pages] = hash;
        block.0 += 1;
        block.2 &= incompressible;
        self.batch.data.extend_from_slice(page);
        self.block_pages += 1;
        if self.block_pages == BLOCK_PAGES {
            self.block_pages = 0;
            self.next_block += 1;
            if self.batch.blocks.len() == BATCH_BLOCKS {
                self.send_batch()?;
            }
        }
        Ok(idx)
    }

    /// Hands the batch (with its incomplete last block, if any) to the packers.
    fn send_batch(&mut self) -> Result<(), StoreError> {
        if self.batch.blocks.is_empty() {
            return Ok(());
        }
        if self.block_pages > 0 {
            self.block_pages = 0;
            self.next_block += 1;
        }
        let fresh = self.free.try_recv().unwrap_or_else(|_| Batch {
            first_block: 0,
            blocks: Vec::with_capacity(BATCH_BLOCKS),
            data: Vec::with_capacity(BATCH_BLOCKS * BLOCK_PAGES * PAGE_SIZE),
        });
        let mut batch = std::mem::replace(&mut self.batch, fresh);
        batch.first_block = self.next_block - batch.blocks.len() as u64;
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(batch).is_ok());
        if !sent {
            // The packer stopped: its error says why.
            self.finish_packer()?;
            return Err(StoreError::Io {
                action: "write",
                path: self.store.tmp_dir(),
                source: std::io::Error::other("the packer threads stopped"),
            });
        }
        Ok(())
    }

    /// Ends the packers' input and waits for what they wrote. On an error of any of
    /// them, what the others wrote is removed too.
    fn finish_packer(&mut self) -> Result<Packed, StoreError> {
        self.tx = None;
        if self.packers.is_empty() {
            return Err(StoreError::Io {
                action: "write",
                path: self.store.tmp_dir(),
                source: std::io::Error::other("the packer threads already finished"),
            });
        }
        let mut done = Vec::new();
        let mut error = None;
        for h in self.packers.drain(..) {
            match h.join() {
                Ok(Ok(d)) => done.push(d),
                Ok(Err(e)) => {
                    error.get_or_insert(e);
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        if let Some(e) = error {
            for s in done.iter().flat_map(|d| &d.sealed) {
                let _ = fs::remove_file(&s.tmp);
            }
            return Err(e);
        }
        let mut bases = vec![None; self.next_block as usize];
        let mut packed = Packed {
            bases: Vec::new(),
            sealed: Vec::new(),
            new_bytes: 0,
        };
        for d in done {
            for (seq, loc) in d.bases {
                bases[seq as usize] = Some(loc);
            }
            packed.sealed.extend(d.sealed);
            packed.new_bytes += d.new_bytes;
        }
        packed.bases = bases;
        Ok(packed)
    }

    /// Fills `manifest.page_count` and `pages_hash`, makes the new packs durable and
    /// visible, writes the page table and the manifest durably, names the snapshot, and
    /// returns its id (and the time spent flushing to disk).
    pub fn commit(
        mut self,
        mut manifest: Manifest,
        name: Option<&str>,
    ) -> Result<SnapshotId, StoreError> {
        self.commit_inner(&mut manifest, name)
    }

    /// [`commit`](Self::commit), also returning the time spent on the final flush.
    pub fn commit_timed(
        mut self,
        mut manifest: Manifest,
        name: Option<&str>,
    ) -> Result<(SnapshotId, std::time::Duration), StoreError> {
        let id = self.commit_inner(&mut manifest, name)?;
        Ok((id, self.flush_time))
    }

    fn commit_inner(
        &mut self,
        manifest: &mut Manifest,
        name: Option<&str>,
    ) -> Result<SnapshotId, StoreError> {
        if let Some(name) = name {
            super::is_valid_name(name).map_err(|reason| StoreError::InvalidName {
                name: name.into(),
                reason,
            })?;
        }
        let count = self.table.len() as u64;
        for p in &manifest.processes {
            for v in &p.vmas {
                for r in &v.pages {
                    if let RunContent::Data { first } = r.content {
                        if first.checked_add(r.count).is_none_or(|end| end > count) {
                            return Err(StoreError::InvalidManifest {
                                reason: format!(
                                    "pid {} VMA {:#x}: run references page-table records \
                                     {first}..+{} but only {count} pages were added",
                                    p.pid, v.start, r.count
                                ),
                            });
                        }
                    }
                }
            }
        }
        for f in &manifest.shared_files {
            for r in &f.pages {
                if let RunContent::Data { first } = r.content {
                    if first.checked_add(r.count).is_none_or(|end| end > count) {
                        return Err(StoreError::InvalidManifest {
                            reason: format!(
                                "shared file {} ({}): run references page-table records \
                                 {first}..+{} but only {count} pages were added",
                                f.id, f.path, r.count
                            ),
                        });
                    }
                }
            }
        }
        self.send_batch()?;
        let packed = self.finish_packer()?;
        let flush_start = std::time::Instant::now();
        let res = self.publish(&packed, manifest, name);
        self.flush_time = flush_start.elapsed();
        // Packs not moved into place (an error before or while publishing) are garbage.
        for s in &packed.sealed {
            let _ = fs::remove_file(&s.tmp);
        }
        let id = res?;
        tracing::debug!(
            "committed snapshot {} ({count} page records, {} new bytes, flush {:?})",
            id.short(),
            packed.new_bytes,
            self.flush_time
        );
        Ok(id)
    }

    /// The commit's one flush, in rounds that each wait for the disk once: (1) the new
    /// packs (their writeback started as they were written) and, written to temp files,
    /// their indexes, the page table and the manifest are synced, all at once; (2) the
    /// packs, their indexes and the page table are renamed into place and their
    /// directories synced; (3) the manifest is renamed into place and its directory
    /// synced, which makes the snapshot exist, everything it references durable by then.
    fn publish(
        &mut self,
        packed: &Packed,
        manifest: &mut Manifest,
        name: Option<&str>,
    ) -> Result<SnapshotId, StoreError> {
        for r in &mut self.table {
            if r.loc.pack == PENDING {
                // The commit sent every batch before it waited for the packers.
                let base = packed.bases[r.loc.offset as usize].expect("every block was sent");
                r.loc = Location {
                    slot: r.loc.slot,
                    ..base
                };
            }
        }
        let pages_hash = table::pages_hash(self.table.iter().map(|r| &r.hash));
        manifest.page_count = self.table.len() as u64;
        manifest.pages_hash = pages_hash;
        let bytes = format::encode(manifest);
        let id = SnapshotId::of_manifest_bytes(&bytes);
        let tbl = table::encode(table::TABLE_MAGIC, pages_hash, &self.table);
        let idxs: Vec<Vec<u8>> = (packed.sealed.iter())
            .map(|p| {
                let mut records = p.records.clone();
                records.sort_unstable_by_key(|r| r.hash);
                table::encode(INDEX_MAGIC, [0; 32], &records)
            })
            .collect();
        // (1) Everything synced at once; the temp files, in the order of `contents`.
        let tmp = self.store.tmp_dir();
        let contents: Vec<&[u8]> = (idxs.iter().map(|i| &i[..]))
            .chain([&tbl[..], &bytes[..]])
            .collect();
        let (synced, temps) = std::thread::scope(|s| {
            let packs: Vec<_> = (packed.sealed.iter())
                .map(|p| s.spawn(move || p.file.sync_all().map_err(io_err("sync", &p.tmp))))
                .collect();
            let temps: Vec<_> = (contents.iter())
                .map(|c| s.spawn(|| write_synced(&tmp, c)))
                .collect();
            let synced: Vec<Result<(), StoreError>> = packs.into_iter().map(join).collect();
            let temps: Vec<Result<PathBuf, StoreError>> = temps.into_iter().map(join).collect();
            (synced, temps)
        });
        let mut failed = synced.into_iter().find_map(Result::err);
        let mut ok = Vec::with_capacity(temps.len());
        for t in temps {
            match t {
                Ok(path) => ok.push(path),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        let temps = ok;
        let res = match failed {
            Some(e) => Err(e),
            None => self.put_in_place(packed, &temps, &id),
        };
        // Temp files not moved into place (an error) are garbage.
        for t in &temps {
            let _ = fs::remove_file(t);
        }
        res?;
        if let Some(name) = name {
            self.store.set_name_locked(name, &id)?;
        }
        Ok(id)
    }

    /// Rounds (2) and (3) of [`Self::publish`]: `temps` holds the synced indexes of the
    /// packs, then the page table and the manifest.
    fn put_in_place(
        &self,
        packed: &Packed,
        temps: &[PathBuf],
        id: &SnapshotId,
    ) -> Result<(), StoreError> {
        let n = packed.sealed.len();
        for (p, idx) in packed.sealed.iter().zip(&temps[..n]) {
            let dest = self.store.pack_path(p.number);
            fs::rename(&p.tmp, &dest).map_err(io_err("rename into place", &dest))?;
            let dest = self.store.idx_path(p.number);
            fs::rename(idx, &dest).map_err(io_err("rename into place", &dest))?;
        }
        let table = self.store.table_path(id);
        fs::rename(&temps[n], &table).map_err(io_err("rename into place", &table))?;
        let dirs = [
            self.store.packs_dir(),
            table.parent().unwrap().to_path_buf(),
        ];
        let skip = usize::from(n == 0);
        std::thread::scope(|s| {
            let syncs: Vec<_> = (dirs[skip..].iter())
                .map(|d| s.spawn(move || fsutil::fsync_dir(d)))
                .collect();
            syncs.into_iter().try_for_each(join)
        })?;
        let dest = self.store.manifest_path(id);
        fs::rename(&temps[n + 1], &dest).map_err(io_err("rename into place", &dest))?;
        fsutil::fsync_dir(&dirs[1])
    }
}

/// The result of a scoped thread; its panic goes on in the caller.
fn join<T>(h: std::thread::ScopedJoinHandle<'_, T>) -> T {
    h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// Writes `bytes` to a fresh temp file in `tmp_dir` and syncs it; removed on error.
fn write_synced(tmp_dir: &std::path::Path, bytes: &[u8]) -> Result<PathBuf, StoreError> {
    let (mut f, tmp) = fsutil::create_tmp(tmp_dir, "write")?;
    let written = (bytes.chunks(WRITE_SIZE)).try_for_each(|c| f.write_all(c));
    match written.and_then(|()| f.sync_all()) {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(io_err("write", &tmp)(e))
        }
    }
}

impl Drop for SnapshotWriter<'_> {
    fn drop(&mut self) {
        // Uncommitted: what the packers wrote is garbage, removed now.
        if !self.packers.is_empty() {
            self.batch = Batch::default();
            if let Ok(packed) = self.finish_packer() {
                for s in &packed.sealed {
                    let _ = fs::remove_file(&s.tmp);
                }
            }
        }
    }
}

pub(crate) fn push_run(runs: &mut Vec<PageRun>, page: u64, content: RunContent) {
    if let Some(last) = runs.last_mut() {
        if last.page + last.count == page {
            let merge = match (last.content, content) {
                (RunContent::Zero, RunContent::Zero) => true,
                (RunContent::Data { first: a }, RunContent::Data { first: b }) => {
                    a + last.count == b
                }
                _ => false,
            };
            if merge {
                last.count += 1;
                return;
            }
        }
    }
    runs.push(PageRun {
        page,
        count: 1,
        content,
    });
}
