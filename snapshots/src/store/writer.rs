//! Writing a snapshot: deduplicating, compressing and appending pages, then committing.

use std::collections::HashMap;
use std::fs::{self, File};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::io::{BufWriter, Write};
use std::path::PathBuf;

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

struct OpenPack {
    number: u32,
    tmp: PathBuf,
    out: BufWriter<File>,
    len: u64,
    /// Bytes whose writeback has been started ([`WRITEBACK_STEP`]).
    flushing: u64,
    records: Vec<Record>,
}

/// Writeback of a pack being written is started every this many bytes, so that the
/// `fsync` sealing it finds most of it on disk already (it took a third of a large
/// dump's time when it had to write 256 MiB at the end).
const WRITEBACK_STEP: u64 = 16 << 20;

impl OpenPack {
    /// Starts writeback (without waiting) of what reached the file since the last call,
    /// once that is [`WRITEBACK_STEP`] or more.
    fn start_writeback(&mut self) {
        use std::os::fd::AsRawFd;
        let in_file = self.len - self.out.buffer().len() as u64;
        if in_file - self.flushing < WRITEBACK_STEP {
            return;
        }
        // SAFETY: plain syscall on our own file; advice only, so its result is ignored.
        unsafe {
            libc::sync_file_range(
                self.out.get_ref().as_raw_fd(),
                self.flushing as i64,
                (in_file - self.flushing) as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        self.flushing = in_file;
    }
}

/// Builds one snapshot. Holds the store's writer lock until committed or dropped;
/// dropping it uncommitted leaves only garbage that `gc` removes.
pub struct SnapshotWriter<'a> {
    store: &'a Store,
    _lock: WriteLock,
    index: Index,
    table: Vec<Record>,
    block: Vec<u8>,
    block_hashes: Vec<[u8; 32]>,
    /// (table index, slot) of records waiting for the current block's location.
    block_refs: Vec<(usize, u8)>,
    compressed: Vec<u8>,
    pack: Option<OpenPack>,
    next_pack: u32,
    sealed: Vec<u32>,
    new_bytes: u64,
}

fn parse_pack_name(name: &str, ext: &str) -> Option<u32> {
    name.strip_prefix("pack-")?.strip_suffix(ext)?.parse().ok()
}

impl<'a> SnapshotWriter<'a> {
    pub(crate) fn new(store: &'a Store, lock: WriteLock) -> Result<Self, StoreError> {
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
        Ok(SnapshotWriter {
            store,
            _lock: lock,
            index,
            table: Vec::new(),
            block: Vec::with_capacity(BLOCK_PAGES * PAGE_SIZE),
            block_hashes: Vec::with_capacity(BLOCK_PAGES),
            block_refs: Vec::new(),
            compressed: vec![0; lz4_flex::block::get_maximum_output_size(BLOCK_PAGES * PAGE_SIZE)],
            pack: None,
            next_pack,
            sealed: Vec::new(),
            new_bytes: 0,
        })
    }

    /// Compressed bytes appended to packs so far by this writer.
    pub fn new_bytes(&self) -> u64 {
        self.new_bytes
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
        for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let at = first_page + i as u64;
            let content = if is_zero(page) {
                RunContent::Zero
            } else {
                RunContent::Data {
                    first: self.add_page(page)?,
                }
            };
            push_run(runs, at, content);
        }
        Ok(())
    }

    fn add_page(&mut self, page: &[u8]) -> Result<u64, StoreError> {
        let hash = *blake3::hash(page).as_bytes();
        let idx = self.table.len();
        if let Some(loc) = self.index.get(&Key(hash)) {
            self.table.push(Record { hash, loc: *loc });
            return Ok(idx as u64);
        }
        self.table.push(Record {
            hash,
            loc: Location::default(),
        });
        if let Some(slot) = self.block_hashes.iter().position(|h| *h == hash) {
            self.block_refs.push((idx, slot as u8));
            return Ok(idx as u64);
        }
        self.block_refs.push((idx, self.block_hashes.len() as u8));
        self.block_hashes.push(hash);
        self.block.extend_from_slice(page);
        if self.block_hashes.len() == BLOCK_PAGES {
            self.flush_block()?;
        }
        Ok(idx as u64)
    }

    fn open_pack(&mut self) -> Result<&mut OpenPack, StoreError> {
        if self.pack.is_none() {
            let number = self.next_pack;
            self.next_pack += 1;
            let (file, tmp) =
                fsutil::create_tmp(&self.store.tmp_dir(), &format!("pack-{number:08}"))?;
            let mut out = BufWriter::with_capacity(4 << 20, file);
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

    fn flush_block(&mut self) -> Result<(), StoreError> {
        if self.block_hashes.is_empty() {
            return Ok(());
        }
        let raw_len = self.block.len();
        let clen = lz4_flex::block::compress_into(&self.block, &mut self.compressed)
            .expect("output sized by get_maximum_output_size");
        // Store raw when lz4 saves under 1/32: reading raw needs no decompression.
        let (codec, len) = if clen < raw_len - raw_len / 32 {
            (CODEC_LZ4, clen)
        } else {
            (CODEC_RAW, raw_len)
        };
        let pages = self.block_hashes.len() as u8;
        self.open_pack()?;
        let pack = self.pack.as_mut().unwrap();
        let data = if codec == CODEC_LZ4 {
            &self.compressed[..len]
        } else {
            &self.block[..]
        };
        pack.out
            .write_all(data)
            .map_err(io_err("write", &pack.tmp))?;
        let base = Location {
            pack: pack.number,
            offset: pack.len,
            len: len as u32,
            slot: 0,
            pages,
            codec,
        };
        pack.len += len as u64;
        pack.start_writeback();
        self.new_bytes += len as u64;
        for (slot, hash) in self.block_hashes.iter().enumerate() {
            let loc = Location {
                slot: slot as u8,
                ..base
            };
            pack.records.push(Record { hash: *hash, loc });
            self.index.insert(Key(*hash), loc);
        }
        for &(idx, slot) in &self.block_refs {
            self.table[idx].loc = Location { slot, ..base };
        }
        let full = pack.len >= PACK_TARGET_SIZE;
        self.block.clear();
        self.block_hashes.clear();
        self.block_refs.clear();
        if full {
            self.seal_pack()?;
        }
        Ok(())
    }

    /// Makes the open pack durable under `packs/` and writes its index.
    fn seal_pack(&mut self) -> Result<(), StoreError> {
        let Some(mut pack) = self.pack.take() else {
            return Ok(());
        };
        let res = (|| {
            pack.out.flush().map_err(io_err("write", &pack.tmp))?;
            pack.out
                .get_ref()
                .sync_all()
                .map_err(io_err("sync", &pack.tmp))?;
            let dest = self.store.pack_path(pack.number);
            fs::rename(&pack.tmp, &dest).map_err(io_err("rename into place", &dest))?;
            pack.records.sort_unstable_by_key(|r| r.hash);
            let idx = table::encode(INDEX_MAGIC, [0; 32], &pack.records);
            fsutil::write_atomic(
                &self.store.tmp_dir(),
                &self.store.idx_path(pack.number),
                &idx,
            )
        })();
        if res.is_err() {
            let _ = fs::remove_file(&pack.tmp);
        }
        res?;
        self.sealed.push(pack.number);
        Ok(())
    }

    /// Fills `manifest.page_count` and `pages_hash`, writes the page table and the
    /// manifest durably, names the snapshot, and returns its id.
    pub fn commit(
        mut self,
        mut manifest: Manifest,
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
        self.flush_block()?;
        self.seal_pack()?;
        if !self.sealed.is_empty() {
            fsutil::fsync_dir(&self.store.packs_dir())?;
        }
        let pages_hash = table::pages_hash(self.table.iter().map(|r| &r.hash));
        manifest.page_count = count;
        manifest.pages_hash = pages_hash;
        let bytes = format::encode(&manifest);
        let id = SnapshotId::of_manifest_bytes(&bytes);
        let tmp = self.store.tmp_dir();
        let tbl = table::encode(table::TABLE_MAGIC, pages_hash, &self.table);
        fsutil::write_atomic(&tmp, &self.store.table_path(&id), &tbl)?;
        fsutil::write_atomic(&tmp, &self.store.manifest_path(&id), &bytes)?;
        if let Some(name) = name {
            self.store.set_name_locked(name, &id)?;
        }
        tracing::debug!(
            "committed snapshot {} ({count} page records, {} new bytes)",
            id.short(),
            self.new_bytes
        );
        Ok(id)
    }
}

impl Drop for SnapshotWriter<'_> {
    fn drop(&mut self) {
        // An uncommitted (or already sealed) pack in tmp/ is garbage: drop it now.
        if let Some(pack) = self.pack.take() {
            let _ = fs::remove_file(&pack.tmp);
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
