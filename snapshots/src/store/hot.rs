//! The *hot pages* of a snapshot: every page a restore copies before the app resumes
//! (its learned working set and the dirty pages of private file mappings), stored once
//! more, decompressed and in page-table order, beside the snapshot
//! (`snapshots/<id>.hot`). A restore copies them straight from this file instead of
//! decompressing and hashing one 4 KiB page at a time (the dominant cost of a prefetch).
//! Like the working set it is advice: missing or damaged, the restore reads the packs.
//!
//! ```text
//!    0 +------------------------------------------------------------+
//!      | magic "WARMHOT2" | count u64 | chunk pages u64              |
//!   24 | records: blake3 of the page-table hashes of the indexes 32 |
//!   56 | count × u64 LE page-table index (ascending)                |
//!      | ceil(count / chunk) × 32: xxh3-128 of each chunk, 16 zeros  |
//!      | header: blake3 of everything above                      32 |
//!      | zero padding to a multiple of 4096                          |
//!      +------------------------------------------------------------+
//!      | count × 4096 page bytes, in index order                    |
//!      +------------------------------------------------------------+
//! ```
//!
//! Integrity: [`Hot::open`] checks the header hash, that the pages belong to this
//! snapshot's page table (the `records` hash), and the checksum of every chunk of page
//! bytes. Every page was verified against its page-table hash (blake3) when the file was
//! written; the chunk checksums only have to catch damage since, so they are xxh3-128
//! (15 GB/s here against blake3's 1.9: verifying the hot pages was the largest wait of a
//! restore). They guard against corruption, not against a writer of the store, which
//! could rewrite the checksums too (as it could rewrite names). `WARMHOT1` files, whose
//! chunks are blake3-hashed, are still read.

use std::fs::File;
use std::io::Write;

use memmap2::Mmap;

use super::{fsutil, Snapshot, SnapshotId, Store, StoreError};
use crate::model::PAGE_SIZE;

const MAGIC: &[u8; 8] = b"WARMHOT2";
/// The first format: chunk checksums are blake3.
const MAGIC_BLAKE3: &[u8; 8] = b"WARMHOT1";
/// Pages per verified chunk (256 KiB).
const CHUNK_PAGES: u64 = 64;
/// Hot pages up to this size are verified on one thread.
const ONE_THREAD_BYTES: usize = 16 << 20;
/// A hot file is not worth more than this (it is read whole at every restore).
pub const MAX_HOT_PAGES: usize = 256 * 1024;

impl Store {
    pub(crate) fn hot_path(&self, id: &SnapshotId) -> std::path::PathBuf {
        self.snaps_dir().join(format!("{id}.hot"))
    }

    /// Writes the hot pages of `snap`: the pages at page-table `indexes` (any order,
    /// duplicates allowed), read and verified from the packs.
    pub fn save_hot(&self, snap: &Snapshot, indexes: &[u64]) -> Result<(), StoreError> {
        let mut idx: Vec<u64> = indexes
            .iter()
            .copied()
            .filter(|&i| i < snap.page_count())
            .collect();
        idx.sort_unstable();
        idx.dedup();
        idx.truncate(MAX_HOT_PAGES);
        let mut pages = vec![0u8; idx.len() * PAGE_SIZE];
        let mut k = 0;
        while k < idx.len() {
            let mut n = 1;
            while k + n < idx.len() && idx[k + n] == idx[k] + n as u64 {
                n += 1;
            }
            snap.read_pages(
                idx[k],
                n as u64,
                &mut pages[k * PAGE_SIZE..(k + n) * PAGE_SIZE],
            )?;
            k += n;
        }
        let head = encode_head(
            MAGIC,
            CHUNK_PAGES,
            records_hash(snap, &idx).as_bytes(),
            &idx,
            &pages,
        );
        let dest = self.hot_path(&snap.id);
        let (mut f, tmp) = fsutil::create_tmp(&self.tmp_dir(), "hot")?;
        let res = f
            .write_all(&head)
            .and_then(|()| f.write_all(&pages))
            .and_then(|()| f.sync_all())
            .map_err(fsutil::io_err("write", &tmp))
            .and_then(|()| {
                std::fs::rename(&tmp, &dest).map_err(fsutil::io_err("rename into place", &dest))
            });
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }
}

/// The header of a hot-pages file (everything before the page bytes, padding included):
/// `magic` is `WARMHOT2` (or `WARMHOT1`, blake3 chunk sums), `pages` the page bytes of
/// `idx`.
pub(crate) fn encode_head(
    magic: &[u8; 8],
    chunk_pages: u64,
    records: &[u8; 32],
    idx: &[u64],
    pages: &[u8],
) -> Vec<u8> {
    let sum: fn(&[u8]) -> [u8; 32] = if magic == MAGIC_BLAKE3 {
        |b| *blake3::hash(b).as_bytes()
    } else {
        chunk_sum
    };
    let mut head = Vec::new();
    head.extend_from_slice(magic);
    head.extend_from_slice(&(idx.len() as u64).to_le_bytes());
    head.extend_from_slice(&chunk_pages.to_le_bytes());
    head.extend_from_slice(records);
    for i in idx {
        head.extend_from_slice(&i.to_le_bytes());
    }
    for c in pages.chunks(chunk_pages as usize * PAGE_SIZE) {
        head.extend_from_slice(&sum(c));
    }
    let h = blake3::hash(&head);
    head.extend_from_slice(h.as_bytes());
    head.resize(head.len().div_ceil(PAGE_SIZE) * PAGE_SIZE, 0);
    head
}

/// The checksum of a chunk of page bytes in a `WARMHOT2` file.
fn chunk_sum(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[..16].copy_from_slice(&xxhash_rust::xxh3::xxh3_128(bytes).to_le_bytes());
    out
}

fn records_hash(snap: &Snapshot, idx: &[u64]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    for &i in idx {
        h.update(&snap.page_hash(i));
    }
    h.finalize()
}

/// The verified hot pages of a snapshot (see the module docs).
pub struct Hot {
    map: Mmap,
    /// Page-table indexes, ascending.
    indexes: Vec<u64>,
    data: usize,
}

impl std::fmt::Debug for Hot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hot({} pages)", self.indexes.len())
    }
}

impl Hot {
    /// Maps and verifies the hot pages of `snap` (chunks hashed on up to `threads`
    /// threads, one for less than 16 MiB). `None` if there are none; a damaged file is
    /// ignored with a warning.
    pub fn open(store: &Store, snap: &Snapshot, threads: usize) -> Option<Hot> {
        let path = store.hot_path(&snap.id);
        let file = File::open(&path).ok()?;
        // SAFETY: hot files are replaced by rename, never modified in place.
        let map = unsafe { memmap2::MmapOptions::new().populate().map(&file) }.ok()?;
        match Self::check(map, snap, threads) {
            Ok(h) => Some(h),
            Err(why) => {
                tracing::warn!(
                    "ignoring the hot pages of snapshot {} ({}): {why}",
                    snap.id.short(),
                    path.display()
                );
                None
            }
        }
    }

    fn check(map: Mmap, snap: &Snapshot, threads: usize) -> Result<Hot, String> {
        let (indexes, data) = parse(
            &map,
            snap.page_count(),
            |idx| records_hash(snap, idx),
            threads,
        )?;
        Ok(Hot { map, indexes, data })
    }

    /// What `warmstart verify` says of the hot pages of `snap`: `Ok(false)` if there
    /// are none, `Ok(true)` if they are intact, else why not (a damaged file, or one that
    /// cannot be read, as an [`io::Error`](std::io::Error) for the caller to classify).
    pub(crate) fn verify(
        store: &Store,
        snap: &Snapshot,
    ) -> Result<bool, Result<String, std::io::Error>> {
        let path = store.hot_path(&snap.id);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Err(e)),
        };
        // SAFETY: hot files are replaced by rename, never modified in place.
        let map = unsafe { Mmap::map(&file) }.map_err(Err)?;
        Self::check(map, snap, 2).map(|_| true).map_err(Ok)
    }
}

/// Decodes and verifies the bytes of a hot-pages file of a snapshot with `page_count`
/// page-table records whose hashes of the records at some indexes are `records_hash`:
/// the page-table indexes it holds and where its page bytes start. Every length in the
/// header is checked against the size of the file before anything is allocated.
pub(crate) fn parse(
    map: &[u8],
    page_count: u64,
    records_hash: impl Fn(&[u64]) -> blake3::Hash,
    threads: usize,
) -> Result<(Vec<u64>, usize), String> {
    let u64_at = |at: usize| -> Result<u64, String> {
        map.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            .ok_or_else(|| "truncated header".to_owned())
    };
    let sum: fn(&[u8]) -> [u8; 32] = match map.get(..8) {
        Some(m) if m == MAGIC => chunk_sum,
        Some(m) if m == MAGIC_BLAKE3 => |b| *blake3::hash(b).as_bytes(),
        _ => return Err("wrong magic".into()),
    };
    let count = u64_at(8)?;
    let chunk = u64_at(16)?;
    if count > MAX_HOT_PAGES as u64 || chunk == 0 || chunk > 1 << 20 {
        return Err(format!(
            "implausible header ({count} pages, chunks of {chunk})"
        ));
    }
    let (count, chunk) = (count as usize, chunk as usize);
    let chunks = count.div_ceil(chunk);
    let head_len = 56 + count * 8 + chunks * 32;
    let data = (head_len + 32).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    if map.len() != data + count * PAGE_SIZE {
        return Err(format!(
            "{} bytes, expected {}",
            map.len(),
            data + count * PAGE_SIZE
        ));
    }
    if blake3::hash(&map[..head_len]).as_bytes() != &map[head_len..head_len + 32] {
        return Err("header checksum mismatch".into());
    }
    let indexes: Vec<u64> = map[56..56 + count * 8]
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    if indexes.windows(2).any(|w| w[0] >= w[1]) || indexes.last().is_some_and(|&i| i >= page_count)
    {
        return Err("bad page-table indexes".into());
    }
    if records_hash(&indexes).as_bytes() != &map[24..56] {
        return Err("its pages belong to another page table (or the page table is damaged)".into());
    }
    let sums = &map[56 + count * 8..head_len];
    let pages = &map[data..];
    let bad = std::sync::atomic::AtomicBool::new(false);
    // A few MiB hash faster on one thread than it takes to share the cores with a
    // restore going on at the same time.
    let threads = if count * PAGE_SIZE < ONE_THREAD_BYTES {
        1
    } else {
        threads.max(1)
    };
    let per = chunks.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for t in 0..chunks.div_ceil(per) {
            let bad = &bad;
            s.spawn(move || {
                for c in t * per..((t + 1) * per).min(chunks) {
                    let bytes = &pages
                        [c * chunk * PAGE_SIZE..((c + 1) * chunk * PAGE_SIZE).min(pages.len())];
                    if sum(bytes) != sums[c * 32..c * 32 + 32] {
                        bad.store(true, std::sync::atomic::Ordering::Relaxed);
                        return;
                    }
                }
            });
        }
    });
    if bad.into_inner() {
        return Err("page bytes do not match their checksum".into());
    }
    Ok((indexes, data))
}

impl Hot {
    /// Number of pages.
    pub fn len(&self) -> usize {
        self.indexes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indexes.is_empty()
    }

    /// The page-table indexes held, ascending.
    pub fn indexes(&self) -> &[u64] {
        &self.indexes
    }

    /// The bytes of every page, in the order of [`Self::indexes`].
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.data..self.data + self.indexes.len() * PAGE_SIZE]
    }

    /// The bytes of page-table records `first..first + n` if all of them are here.
    pub fn pages(&self, first: u64, n: u64) -> Option<&[u8]> {
        if n == 0 {
            return None;
        }
        let k = self.indexes.binary_search(&first).ok()?;
        let last = k + n as usize - 1;
        if self.indexes.get(last) != Some(&(first + n - 1)) {
            return None;
        }
        Some(&self.map[self.data + k * PAGE_SIZE..self.data + (last + 1) * PAGE_SIZE])
    }

    /// How many of `first..first + n` are here, counting from `first` (0 if it is not).
    pub fn run_from(&self, first: u64, n: u64) -> u64 {
        let Ok(k) = self.indexes.binary_search(&first) else {
            return 0;
        };
        let mut m = 1;
        while m < n && self.indexes.get(k + m as usize) == Some(&(first + m)) {
            m += 1;
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Manifest;

    fn page(i: u64) -> Vec<u8> {
        (0..PAGE_SIZE as u64 / 8)
            .flat_map(|w| (i << 32 | w).to_le_bytes())
            .collect()
    }

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut w = store.writer().unwrap();
        let data: Vec<u8> = (0..300).flat_map(page).collect();
        let mut runs = Vec::new();
        w.add_pages(0, &data, &mut runs).unwrap();
        let id = w.commit(Manifest::default(), None).unwrap();
        let snap = store.load(&id).unwrap();
        assert!(Hot::open(&store, &snap, 2).is_none(), "none saved yet");

        let want: Vec<u64> = (10..80).chain(200..203).chain([5, 11, 299]).collect();
        store.save_hot(&snap, &want).unwrap();
        let hot = Hot::open(&store, &snap, 2).unwrap();
        assert_eq!(hot.len(), 75);
        assert_eq!(
            hot.pages(10, 70).unwrap(),
            &data[10 * PAGE_SIZE..80 * PAGE_SIZE]
        );
        assert_eq!(hot.pages(299, 1).unwrap(), &data[299 * PAGE_SIZE..]);
        assert!(hot.pages(79, 2).is_none(), "80 is not hot");
        assert!(hot.pages(6, 1).is_none());
        assert!(hot.pages(5, 0).is_none(), "no pages, not a panic");
        assert_eq!(hot.run_from(200, 10), 3);
        assert_eq!(hot.run_from(4, 10), 0);

        // A flipped page byte, a flipped index: ignored, never served.
        let path = store.hot_path(&id);
        let good = std::fs::read(&path).unwrap();
        for at in [good.len() - 5, 60] {
            let mut bad = good.clone();
            bad[at] ^= 1;
            std::fs::write(&path, &bad).unwrap();
            assert!(Hot::open(&store, &snap, 2).is_none(), "flip at {at}");
        }
        std::fs::write(&path, &good[..good.len() - 1]).unwrap();
        assert!(Hot::open(&store, &snap, 1).is_none(), "truncated");

        // Another snapshot's hot file copied over this one's.
        let mut w = store.writer().unwrap();
        let other: Vec<u8> = (1000..1300).flat_map(page).collect();
        let mut runs = Vec::new();
        w.add_pages(0, &other, &mut runs).unwrap();
        let m = Manifest {
            created_unix: 1,
            ..Default::default()
        };
        let id2 = w.commit(m, None).unwrap();
        let snap2 = store.load(&id2).unwrap();
        store.save_hot(&snap2, &want).unwrap();
        std::fs::copy(store.hot_path(&id2), &path).unwrap();
        assert!(
            Hot::open(&store, &snap, 2).is_none(),
            "another table's pages"
        );
        assert!(Hot::open(&store, &snap2, 2).is_some());

        store.remove(&id.to_string()).unwrap();
        assert!(!path.exists());
    }
}
