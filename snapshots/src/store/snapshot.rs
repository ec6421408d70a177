//! Reading a committed snapshot: its manifest, its mapped page table, its packs.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use memmap2::Mmap;

use super::table::{Record, TableError, TableMap, CODEC_LZ4, CODEC_RAW, TABLE_MAGIC};
use super::{SnapshotId, Store, StoreError, PACK_HEADER, PACK_MAGIC};
use crate::model::{Manifest, PAGE_SIZE};
use crate::remote::{self, Client};

/// Where a snapshot's pages come from.
#[derive(Debug)]
enum Source {
    /// A store directory; packs are mapped lazily on first use and kept mapped.
    Local {
        store: Store,
        packs: RwLock<HashMap<u32, Arc<Mmap>>>,
    },
    /// A page server (`crate::remote`): blocks are fetched on demand and verified here.
    Remote(Client),
    /// An OCI registry (`crate::registry`): pages fetched by range requests or from
    /// blocks fetched whole, verified here.
    Registry(Box<crate::registry::Remote>),
}

/// The pages a restore of a snapshot with this manifest writes before its app resumes
/// (page-table indexes), as the restorer reckons them.
pub type EagerPages = dyn Fn(&Manifest) -> Vec<u64>;

/// An opened snapshot, local (a store directory) or remote (a page server). Either way
/// every page read is verified against the page table, whose hashes are bound to the
/// manifest (`pages_hash`), which is bound to the id (its blake3).
#[derive(Debug)]
pub struct Snapshot {
    pub id: SnapshotId,
    pub manifest: Manifest,
    source: Source,
    table: TableMap,
    table_path: PathBuf,
}

/// Decompresses blocks into pages, each block once while consecutive pages use it.
#[derive(Default)]
pub(crate) struct BlockReader {
    scratch: Vec<u8>,
    cur: Option<(u32, u64)>,
}

impl BlockReader {
    /// Writes page `rec.loc.slot` of block `src` (stored at `rec.loc`) into `dst` and
    /// checks it against `rec.hash`. The error is the reason the page is corrupt.
    pub(crate) fn page(&mut self, rec: &Record, src: &[u8], dst: &mut [u8]) -> Result<(), String> {
        self.copy(rec, src, dst)?;
        if blake3::hash(dst).as_bytes() != &rec.hash {
            return Err(HASH_MISMATCH.into());
        }
        Ok(())
    }

    /// [`Self::page`] without the hash check: the caller checks a run of pages at once
    /// ([`first_mismatch`]).
    pub(crate) fn copy(&mut self, rec: &Record, src: &[u8], dst: &mut [u8]) -> Result<(), String> {
        let loc = rec.loc;
        if loc.slot >= loc.pages {
            return Err("its page-table record is inconsistent".into());
        }
        let block_len = loc.pages as usize * PAGE_SIZE;
        let slot = loc.slot as usize * PAGE_SIZE;
        match loc.codec {
            CODEC_RAW => {
                if src.len() != block_len {
                    return Err("raw block has the wrong length".into());
                }
                dst.copy_from_slice(&src[slot..slot + PAGE_SIZE]);
            }
            CODEC_LZ4 => {
                if self.cur != Some((loc.pack, loc.offset)) {
                    self.cur = None;
                    // An lz4 block expands at most 255-fold: a record claiming more pages
                    // than its block can hold is refused before the buffer is sized.
                    if block_len > src.len().saturating_mul(255) {
                        return Err(format!(
                            "a block of {} bytes cannot decompress to {} pages",
                            src.len(),
                            loc.pages
                        ));
                    }
                    self.scratch.resize(block_len, 0);
                    match lz4_flex::block::decompress_into(src, &mut self.scratch[..block_len]) {
                        Ok(n) if n == block_len => {}
                        Ok(n) => {
                            return Err(format!(
                                "block decompresses to {n} bytes, expected {block_len}"
                            ))
                        }
                        Err(e) => return Err(format!("block does not decompress: {e}")),
                    }
                    self.cur = Some((loc.pack, loc.offset));
                }
                dst.copy_from_slice(&self.scratch[slot..slot + PAGE_SIZE]);
            }
            c => return Err(format!("unknown block codec {c}")),
        }
        Ok(())
    }
}

/// Pages read before they are verified together: what [`super::page_hash`] hashes at
/// once (64 KiB, still in the cache when hashed).
const VERIFY_GROUP: usize = 16;

/// Why a page whose bytes are not those its record's hash names is refused.
pub(crate) const HASH_MISMATCH: &str = "its content does not match its hash";

/// The first of `want` (`(k, hash)`: page `k` of `out` must hash to `hash`) that does
/// not hold, if any; the pages are hashed together ([`super::page_hash`]).
pub(crate) fn first_mismatch(out: &[u8], want: &[(usize, [u8; 32])]) -> Option<usize> {
    let pages: Vec<&[u8; PAGE_SIZE]> = (want.iter())
        .map(|&(k, _)| out[k * PAGE_SIZE..(k + 1) * PAGE_SIZE].try_into().unwrap())
        .collect();
    let mut got = vec![[0u8; 32]; pages.len()];
    super::page_hash::hash_pages(&pages, &mut got);
    got.iter().zip(want).position(|(a, b)| *a != b.1)
}

impl Snapshot {
    pub(crate) fn open(
        store: &Store,
        id: SnapshotId,
        manifest: Manifest,
        checksum: bool,
    ) -> Result<Self, StoreError> {
        let table_path = store.table_path(&id);
        let bad = |reason: String| StoreError::BadTable {
            id: id.short(),
            path: table_path.clone(),
            reason,
        };
        let table = TableMap::open(&table_path, TABLE_MAGIC, checksum).map_err(|e| match e {
            TableError::Io(e) => StoreError::io("read page table", table_path.clone(), e),
            e => bad(e.reason()),
        })?;
        if table.len() != manifest.page_count {
            return Err(bad(format!(
                "it has {} records but the manifest says {}",
                table.len(),
                manifest.page_count
            )));
        }
        if table.pages_hash() != manifest.pages_hash {
            return Err(bad(
                "it belongs to different page contents than the manifest".into(),
            ));
        }
        Ok(Snapshot {
            id,
            manifest,
            source: Source::Local {
                store: store.clone(),
                packs: RwLock::new(HashMap::new()),
            },
            table,
            table_path,
        })
    }

    /// Opens snapshot `id_or_name` served by the page server at `addr` (`HOST:PORT`):
    /// fetches and checks its manifest and page table; pages are fetched on demand by
    /// [`Snapshot::read_pages`]. A server that serves another snapshot than the one asked
    /// for (by full id), or a manifest and table that do not belong together, is an error.
    pub fn connect(addr: &str, id_or_name: &str) -> Result<Snapshot, StoreError> {
        Self::connect_timeout(addr, id_or_name, remote::IO_TIMEOUT)
    }

    /// [`Snapshot::connect`], taking the server for dead when a connect or an answer
    /// takes longer than `timeout`.
    pub fn connect_timeout(
        addr: &str,
        id_or_name: &str,
        timeout: std::time::Duration,
    ) -> Result<Snapshot, StoreError> {
        Self::connect_tls(addr, id_or_name, timeout, None)
    }

    /// [`Snapshot::connect_timeout`], over TLS when `tls` is given (for every connection,
    /// the lazy page reads' included).
    pub fn connect_tls(
        addr: &str,
        id_or_name: &str,
        timeout: std::time::Duration,
        tls: Option<&remote::tls::ClientTls>,
    ) -> Result<Snapshot, StoreError> {
        let client = Client::connect_tls(addr, timeout, tls)?;
        let (id, manifest_bytes, table_bytes) = client.fetch_manifest(id_or_name)?;
        let bad = |reason: String| StoreError::PageServer {
            addr: addr.to_owned(),
            reason: format!("snapshot {}: {reason}", id.short()),
        };
        if let Some(want) = SnapshotId::from_hex(id_or_name) {
            if want != id {
                return Err(StoreError::PageServer {
                    addr: addr.to_owned(),
                    reason: format!(
                        "asked for snapshot {}, it answered with snapshot {}: a wrong page server",
                        want.short(),
                        id.short()
                    ),
                });
            }
        }
        let actual = SnapshotId::of_manifest_bytes(&manifest_bytes);
        if actual != id {
            return Err(bad(format!(
                "the manifest it served hashes to {}: it is not this snapshot's \
                 (a wrong or damaged page server)",
                actual.short()
            )));
        }
        let manifest = crate::format::decode(&manifest_bytes)
            .map_err(|e| bad(format!("the manifest it served is damaged: {e}")))?;
        let table = TableMap::from_bytes(table_bytes, TABLE_MAGIC)
            .map_err(|r| bad(format!("the page table it served is damaged: {r}")))?;
        if table.len() != manifest.page_count
            || table.pages_hash() != manifest.pages_hash
            || table.compute_pages_hash() != manifest.pages_hash
        {
            return Err(bad(
                "the page table it served belongs to different page contents than the \
                 manifest (a wrong or damaged page server)"
                    .into(),
            ));
        }
        Ok(Snapshot {
            id,
            manifest,
            source: Source::Remote(client),
            table,
            table_path: PathBuf::from(format!("{addr}/{id}.pages")),
        })
    }

    /// Opens the snapshot at registry reference `r`: the one in `local` if that store
    /// has the snapshot `r` names now, else the registry's: fetches and checks its
    /// manifest, index head and working set, and with `prefetch` (a lazy run) its hot
    /// pages, the index parts and blocks of the working set's pages and of the pages
    /// `prefetch` names given the manifest (those a restore writes before the app
    /// resumes), all at once on several connections. Other index parts and pages are
    /// fetched on demand (see [`crate::registry`]).
    pub fn open_registry(
        r: &crate::registry::Reference,
        opts: &crate::registry::Options,
        prefetch: Option<&EagerPages>,
        local: Option<&Store>,
    ) -> Result<Snapshot, StoreError> {
        let o = match crate::registry::open(r, opts, prefetch, local)? {
            crate::registry::Found::Stored(snap) => return Ok(*snap),
            crate::registry::Found::Registry(o) => *o,
        };
        Ok(Snapshot {
            id: o.id,
            manifest: o.manifest,
            table_path: PathBuf::from(format!("{r}/index")),
            source: Source::Registry(Box::new(o.remote)),
            table: o.table,
        })
    }

    /// The registry source of a snapshot opened with [`Snapshot::open_registry`].
    pub fn registry(&self) -> Option<&crate::registry::Remote> {
        match &self.source {
            Source::Registry(r) => Some(r),
            _ => None,
        }
    }

    /// A remote snapshot: gives up on the page reads waiting for the page server and on
    /// every later one (the instance they were for is over, or its restore was
    /// interrupted); see `remote::Client::abandon_page_reads`. Nothing for a local one.
    pub fn abandon_page_reads(&self) {
        match &self.source {
            Source::Remote(client) => client.abandon_page_reads(),
            Source::Registry(r) => r.abandon(),
            Source::Local { .. } => {}
        }
    }

    /// The page server's address, for a remote snapshot.
    pub fn page_server(&self) -> Option<&str> {
        match &self.source {
            Source::Local { .. } | Source::Registry(_) => None,
            Source::Remote(c) => Some(c.addr()),
        }
    }

    /// Keeps a working set learned by a lazy run: in the store, or in the page server's.
    pub fn save_working_set(&self, pages: &[u64]) -> Result<(), StoreError> {
        match &self.source {
            Source::Local { store, .. } => store.save_working_set(&self.id, pages),
            Source::Remote(c) => c.save_working_set(&self.id, pages),
            Source::Registry(_) => Ok(()),
        }
    }

    /// Keeps the working sets learned by a lazy run, per process (by pid in the
    /// snapshot): in the store; a page server's protocol carries one list, so it gets
    /// them as one (each process then picks its own indexes).
    pub fn save_working_sets(
        &self,
        sets: &std::collections::BTreeMap<i32, Vec<u64>>,
    ) -> Result<(), StoreError> {
        match &self.source {
            Source::Local { store, .. } => store.save_working_sets(&self.id, sets),
            Source::Remote(c) => {
                let flat: Vec<u64> = sets.values().flatten().copied().collect();
                c.save_working_set(&self.id, &flat)
            }
            Source::Registry(_) => Ok(()),
        }
    }

    /// The learned working sets (see [`WorkingSets`](super::WorkingSets)); advice only:
    /// `None` if there are none or they cannot be read.
    pub fn working_sets(&self) -> Option<super::WorkingSets> {
        match &self.source {
            Source::Local { store, .. } => store.working_sets(&self.id),
            Source::Remote(_) | Source::Registry(_) => {
                self.working_set().map(super::WorkingSets::Flat)
            }
        }
    }

    /// The learned working set: from the page server for a remote snapshot, from the
    /// store otherwise. Advice only: `None` if there is none or it cannot be read.
    pub fn working_set(&self) -> Option<Vec<u64>> {
        match &self.source {
            Source::Local { store, .. } => store.working_set(&self.id),
            Source::Remote(c) => c
                .working_set(&self.id)
                .map_err(|e| tracing::warn!("no working set: {e}"))
                .ok()
                .flatten(),
            Source::Registry(r) => (!r.working_set().is_empty()).then(|| r.working_set().to_vec()),
        }
    }

    /// The verified hot pages (see [`Hot`](super::Hot)) of a local snapshot, their
    /// chunks hashed on up to `threads` threads. `None` if it has none (or is remote).
    pub fn hot(&self, threads: usize) -> Option<super::Hot> {
        match &self.source {
            Source::Local { store, .. } => super::Hot::open(store, self, threads),
            Source::Remote(_) | Source::Registry(_) => None,
        }
    }

    /// Stores the hot pages (see [`Hot`](super::Hot)) at page-table `indexes` of a
    /// local snapshot; nothing for a remote one.
    pub fn save_hot(&self, indexes: &[u64]) -> Result<(), StoreError> {
        match &self.source {
            Source::Local { store, .. } => store.save_hot(self, indexes),
            Source::Remote(_) | Source::Registry(_) => Ok(()),
        }
    }

    /// Checks the whole page table against its checksum (see
    /// [`Store::load_deferred`]); a snapshot opened otherwise was checked already.
    pub fn verify_table(&self) -> Result<(), StoreError> {
        self.table
            .verify_checksum()
            .map_err(|reason| StoreError::BadTable {
                id: self.id.short(),
                path: self.table_path.clone(),
                reason,
            })
    }

    /// The page table file, header and records (what a page server sends).
    pub fn table_bytes(&self) -> &[u8] {
        self.table.bytes()
    }

    /// Checks that every pack the page table references is present (maps them). A page
    /// server does this before serving a manifest so that a store missing pages is an
    /// error before the instance resumes. Remote snapshots: nothing to check here.
    pub fn check_packs(&self) -> Result<(), StoreError> {
        if let Source::Local { .. } = self.source {
            let mut seen = std::collections::HashSet::new();
            for i in 0..self.table.len() {
                let pack = self.table.pack_of(i);
                if seen.insert(pack) {
                    self.pack(pack)?;
                }
            }
        }
        Ok(())
    }

    /// Number of page-table records (`manifest.page_count`).
    pub fn page_count(&self) -> u64 {
        self.table.len()
    }

    /// Path of the page table file.
    pub fn table_path(&self) -> &std::path::Path {
        &self.table_path
    }

    /// Makes sure the page-table records `indexes` are at hand: a snapshot from a
    /// registry fetches its index by parts (see `registry`), the first ones when it is
    /// opened and others when pages need them; [`Self::page_hash`] and
    /// [`Self::record`] of a record not at hand panic. Other snapshots: nothing to do.
    pub fn ensure_records(&self, indexes: &[u64]) -> Result<(), StoreError> {
        match &self.source {
            Source::Registry(r) => r.ensure(&self.table, indexes),
            _ => Ok(()),
        }
    }

    /// [`Self::ensure_records`] of every record.
    pub fn ensure_all_records(&self) -> Result<(), StoreError> {
        match &self.source {
            Source::Registry(r) => r.ensure_all(&self.table),
            _ => Ok(()),
        }
    }

    /// The blake3 of page-table record `index`. Panics if out of range.
    pub fn page_hash(&self, index: u64) -> [u8; 32] {
        self.table.hash(index)
    }

    /// The record (hash and location) of page-table entry `index`. Panics if out of range.
    pub fn record(&self, index: u64) -> Record {
        self.table.record(index)
    }

    pub(crate) fn table(&self) -> &TableMap {
        &self.table
    }

    /// [`Self::pack`], remembering the last one in `cur` (runs of pages share packs).
    fn pack_cached(
        &self,
        cur: &mut Option<(u32, Arc<Mmap>)>,
        number: u32,
    ) -> Result<Arc<Mmap>, StoreError> {
        match cur {
            Some((n, m)) if *n == number => Ok(m.clone()),
            _ => {
                let m = self.pack(number)?;
                *cur = Some((number, m.clone()));
                Ok(m)
            }
        }
    }

    pub(crate) fn pack(&self, number: u32) -> Result<Arc<Mmap>, StoreError> {
        let Source::Local { store, packs } = &self.source else {
            unreachable!("packs are only mapped from a local store")
        };
        if let Some(m) = packs.read().unwrap().get(&number) {
            return Ok(m.clone());
        }
        let path = store.pack_path(number);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::MissingPack {
                    id: self.id.short(),
                    pack: path,
                })
            }
            Err(e) => return Err(StoreError::io("open pack", path, e)),
        };
        // SAFETY: packs are immutable once renamed into packs/; gc only unlinks them.
        let map =
            unsafe { Mmap::map(&file) }.map_err(|e| StoreError::io("map pack", path.clone(), e))?;
        if map.len() < PACK_HEADER || map[..8] != PACK_MAGIC {
            return Err(StoreError::CorruptPage {
                id: self.id.short(),
                page: 0,
                pack: path,
                reason: "the pack header is damaged".into(),
            });
        }
        let map = Arc::new(map);
        packs.write().unwrap().insert(number, map.clone());
        Ok(map)
    }

    fn check_range(&self, first: u64, count: u64) -> Result<u64, StoreError> {
        let end = first.saturating_add(count);
        if end > self.table.len() {
            return Err(StoreError::PageRange {
                id: self.id.short(),
                first,
                end,
                count: self.table.len(),
            });
        }
        Ok(end)
    }

    /// Calls `f` with the stored block of every record of `first..first+count`, once per
    /// run of consecutive records sharing a block: exactly the blocks, in order, that
    /// decoding those records needs (what a page server sends for a `Pages` request).
    /// Local snapshots only; the blocks are not verified here (the reader verifies).
    pub fn stored_blocks(
        &self,
        first: u64,
        count: u64,
        mut f: impl FnMut(&[u8]),
    ) -> Result<(), StoreError> {
        let end = self.check_range(first, count)?;
        let Source::Local { store, .. } = &self.source else {
            return Err(StoreError::PageServer {
                addr: self.page_server().unwrap_or_default().to_owned(),
                reason: "a remote snapshot cannot be served on".into(),
            });
        };
        let mut cur_block: Option<(u32, u64)> = None;
        let mut cur_pack: Option<(u32, Arc<Mmap>)> = None;
        for i in first..end {
            let loc = self.table.record(i).loc;
            if cur_block == Some((loc.pack, loc.offset)) {
                continue;
            }
            let map = self.pack_cached(&mut cur_pack, loc.pack)?;
            let (start, stop) = self.block_bounds(store, i, &map)?;
            f(&map[start..stop]);
            cur_block = Some((loc.pack, loc.offset));
        }
        Ok(())
    }

    /// Byte range of record `i`'s block in its (mapped) pack, checked.
    fn block_bounds(
        &self,
        store: &Store,
        i: u64,
        map: &Mmap,
    ) -> Result<(usize, usize), StoreError> {
        let loc = self.table.record(i).loc;
        let start = loc.offset;
        // A damaged record may hold any offset: no overflow, a range past the end is short.
        let stop = start.saturating_add(u64::from(loc.len));
        if stop > map.len() as u64 {
            return Err(StoreError::ShortPack {
                id: self.id.short(),
                pack: store.pack_path(loc.pack),
                page: i,
                len: map.len() as u64,
            });
        }
        if loc.slot >= loc.pages || start < PACK_HEADER as u64 {
            return Err(StoreError::CorruptPage {
                id: self.id.short(),
                page: i,
                pack: store.pack_path(loc.pack),
                reason: "its page-table record is inconsistent".into(),
            });
        }
        Ok((start as usize, stop as usize))
    }

    /// Reads table records `first..first+count` into `out` (`count * 4096` bytes),
    /// decompressing each block once and verifying every page's blake3. A remote
    /// snapshot fetches the blocks from its page server.
    pub fn read_pages(&self, first: u64, count: u64, out: &mut [u8]) -> Result<(), StoreError> {
        self.read_pages_unblamed(first, count, out)
            .map_err(|e| self.blame(e))
    }

    /// Damage met reading pages is the pack's only if the page table is intact: a
    /// damaged record (in a table opened with [`Store::load_deferred`], whose checksum
    /// is checked later) points to the wrong place or hash, and the pack behind it is
    /// fine. So before blaming a pack, the table's checksum is checked, and a mismatch
    /// is reported as the table's damage.
    fn blame(&self, e: StoreError) -> StoreError {
        let Source::Local { .. } = self.source else {
            return e;
        };
        match &e {
            StoreError::CorruptPage { page, .. } | StoreError::ShortPack { page, .. } => {
                let page = *page;
                match self.table.verify_checksum() {
                    Ok(()) => e,
                    Err(reason) => StoreError::BadTable {
                        id: self.id.short(),
                        path: self.table_path.clone(),
                        reason: format!("{reason} (page {page} cannot be read through it)"),
                    },
                }
            }
            StoreError::MissingPack { pack, .. } => match self.table.verify_checksum() {
                Ok(()) => e,
                Err(reason) => StoreError::BadTable {
                    id: self.id.short(),
                    path: self.table_path.clone(),
                    reason: format!(
                        "{reason} (it names pack {}, which does not exist)",
                        pack.display()
                    ),
                },
            },
            _ => e,
        }
    }

    fn read_pages_unblamed(
        &self,
        first: u64,
        count: u64,
        out: &mut [u8],
    ) -> Result<(), StoreError> {
        let end = self.check_range(first, count)?;
        let expected = count * PAGE_SIZE as u64;
        if out.len() as u64 != expected {
            return Err(StoreError::BufferSize {
                got: out.len(),
                pages: count,
                expected,
            });
        }
        let store = match &self.source {
            Source::Local { store, .. } => store,
            Source::Remote(client) => return self.read_remote(client, first, end, out),
            Source::Registry(r) => {
                let idx: Vec<u64> = (first..end).collect();
                return r.read(&self.id, &self.table, &idx, out);
            }
        };
        self.read_local(store, first..end, out)
    }

    /// Reads the table records `indexes` (any order, repeats allowed) into consecutive
    /// pages of `out` (`indexes.len() * 4096` bytes), verified like
    /// [`read_pages`](Self::read_pages). A block is decompressed once for a run of
    /// indexes that lie in it one after the other: sorted by [`Record::loc`], every block
    /// is decompressed once.
    pub fn read_page_list(&self, indexes: &[u64], out: &mut [u8]) -> Result<(), StoreError> {
        let expected = indexes.len() as u64 * PAGE_SIZE as u64;
        if out.len() as u64 != expected {
            return Err(StoreError::BufferSize {
                got: out.len(),
                pages: indexes.len() as u64,
                expected,
            });
        }
        for &i in indexes {
            self.check_range(i, 1)?;
        }
        let store = match &self.source {
            Source::Local { store, .. } => store,
            Source::Registry(r) => return r.read(&self.id, &self.table, indexes, out),
            Source::Remote(_) => {
                for (&i, page) in indexes.iter().zip(out.chunks_mut(PAGE_SIZE)) {
                    self.read_pages(i, 1, page)?;
                }
                return Ok(());
            }
        };
        self.read_local(store, indexes.iter().copied(), out)
            .map_err(|e| self.blame(e))
    }

    /// Reads the (checked) table records `indexes` of a local snapshot into consecutive
    /// pages of `out`, each block decompressed once per run of its pages.
    fn read_local(
        &self,
        store: &Store,
        indexes: impl Iterator<Item = u64>,
        out: &mut [u8],
    ) -> Result<(), StoreError> {
        let mut reader = BlockReader::default();
        let mut cur_pack: Option<(u32, Arc<Mmap>)> = None;
        let mut read: Vec<(usize, [u8; 32])> = Vec::new();
        let mut pages: Vec<u64> = Vec::new();
        let corrupt = |i: u64, pack: u32, reason: String| StoreError::CorruptPage {
            id: self.id.short(),
            page: i,
            pack: store.pack_path(pack),
            reason,
        };
        // Verified a group at a time, while the group's pages are still in the cache.
        let verify = |out: &[u8], read: &mut Vec<(usize, [u8; 32])>, pages: &mut Vec<u64>| {
            if let Some(k) = first_mismatch(out, read) {
                let i = pages[k];
                return Err(corrupt(
                    i,
                    self.table.record(i).loc.pack,
                    HASH_MISMATCH.into(),
                ));
            }
            read.clear();
            pages.clear();
            Ok(())
        };
        for (k, i) in indexes.enumerate() {
            let rec = self.table.record(i);
            let loc = rec.loc;
            let map = self.pack_cached(&mut cur_pack, loc.pack)?;
            let (start, stop) = self.block_bounds(store, i, &map)?;
            let dst = &mut out[k * PAGE_SIZE..(k + 1) * PAGE_SIZE];
            reader
                .copy(&rec, &map[start..stop], dst)
                .map_err(|reason| corrupt(i, loc.pack, reason))?;
            read.push((k, rec.hash));
            pages.push(i);
            if read.len() == VERIFY_GROUP {
                verify(out, &mut read, &mut pages)?;
            }
        }
        verify(out, &mut read, &mut pages)
    }

    /// [`read_pages`](Self::read_pages) split over up to `threads` threads (for large
    /// reads: decompressing and hashing are the cost, and they split cleanly).
    pub fn read_pages_parallel(
        &self,
        first: u64,
        count: u64,
        out: &mut [u8],
        threads: usize,
    ) -> Result<(), StoreError> {
        let parts = threads.clamp(1, count.max(1) as usize);
        if parts == 1 || self.page_server().is_some() {
            return self.read_pages(first, count, out);
        }
        let per = count.div_ceil(parts as u64);
        std::thread::scope(|s| {
            let jobs: Vec<_> = out
                .chunks_mut(per as usize * PAGE_SIZE)
                .enumerate()
                .map(|(k, part)| {
                    let at = first + k as u64 * per;
                    let n = (part.len() / PAGE_SIZE) as u64;
                    s.spawn(move || self.read_pages(at, n, part))
                })
                .collect();
            jobs.into_iter()
                .try_for_each(|j| j.join().expect("page reader panicked"))
        })
    }

    /// [`read_page_list`](Self::read_page_list) split over `threads` threads (one when
    /// `threads` is 1 or less).
    pub fn read_page_list_parallel(
        &self,
        indexes: &[u64],
        out: &mut [u8],
        threads: usize,
    ) -> Result<(), StoreError> {
        if threads <= 1 || indexes.len() < 2 {
            return self.read_page_list(indexes, out);
        }
        let per = indexes.len().div_ceil(threads);
        std::thread::scope(|s| {
            let jobs: Vec<_> = (indexes.chunks(per).zip(out.chunks_mut(per * PAGE_SIZE)))
                .map(|(idx, part)| s.spawn(move || self.read_page_list(idx, part)))
                .collect();
            jobs.into_iter()
                .try_for_each(|j| j.join().expect("page decoder panicked"))
        })
    }

    fn read_remote(
        &self,
        client: &Client,
        first: u64,
        end: u64,
        out: &mut [u8],
    ) -> Result<(), StoreError> {
        let mut reader = BlockReader::default();
        let mut want = Vec::new();
        let mut at = first;
        while at < end {
            let n = (end - at).min(remote::MAX_PAGES_PER_REQUEST);
            let blocks = client.pages(&self.id, at, n)?;
            let mut blocks = remote::Blocks::new(&blocks);
            let mut block: &[u8] = &[];
            let mut cur: Option<(u32, u64)> = None;
            for i in at..at + n {
                let rec = self.table.record(i);
                let corrupt = |reason: String| StoreError::PageServerCorrupt {
                    addr: client.addr().to_owned(),
                    id: self.id.short(),
                    page: i,
                    reason,
                };
                if cur != Some((rec.loc.pack, rec.loc.offset)) {
                    block = blocks
                        .next()
                        .ok_or_else(|| corrupt("the server sent too few blocks".into()))?;
                    if block.len() != rec.loc.len as usize {
                        return Err(corrupt(format!(
                            "it sent a block of {} bytes, the page table says {}",
                            block.len(),
                            rec.loc.len
                        )));
                    }
                    cur = Some((rec.loc.pack, rec.loc.offset));
                }
                let k = (i - first) as usize;
                reader
                    .copy(&rec, block, &mut out[k * PAGE_SIZE..(k + 1) * PAGE_SIZE])
                    .map_err(corrupt)?;
                want.push((k, rec.hash));
            }
            if let Some(j) = first_mismatch(out, &want) {
                return Err(StoreError::PageServerCorrupt {
                    addr: client.addr().to_owned(),
                    id: self.id.short(),
                    page: first + want[j].0 as u64,
                    reason: HASH_MISMATCH.into(),
                });
            }
            want.clear();
            if !blocks.is_empty() {
                return Err(StoreError::PageServer {
                    addr: client.addr().to_owned(),
                    reason: format!("it sent more blocks than pages {at}..{} need", at + n),
                });
            }
            at += n;
        }
        Ok(())
    }
}
