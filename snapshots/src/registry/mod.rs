//! Snapshots in an OCI registry: the artifact format, `push`, `pull`, and the page
//! source of a lazy run straight from a registry.
//!
//! # The artifact
//!
//! An OCI image manifest (`application/vnd.oci.image.manifest.v1+json`) with
//! `artifactType` [`ARTIFACT_TYPE`] and annotation [`ID_ANNOTATION`] (the snapshot id):
//!
//! ```text
//! config     MT_MANIFEST      the snapshot's encoded manifest; its blake3 is the id
//! layers[0]  MT_INDEX         the page table (warmstart's table format, checksummed):
//!                             record i = page i's blake3 and where it is: block
//!                             number (layers[2 + n]), byte offset and length in it, codec
//! layers[1]  MT_WORKING_SET   JSON {"pages": [...]}: the learned working set (page
//!                             indexes) a lazy run fetches first
//! layers[2+] MT_BLOCK         blocks: pages one after another, each lz4 or raw on its
//!                             own, so that any page or run of pages is one range read
//! last       MT_HOT           (optional) the hot pages: the working set's and those a
//!                             restore writes before the app resumes, in one lz4 blob
//!                             (see [`HotBlob`]) a lazy run fetches before anything else
//! ```
//!
//! Pages are grouped into blocks in page-table order, each distinct page once, cut
//! where a page's hash says so (content-defined: at least [`MIN_BLOCK_PAGES`] pages,
//! then after any page whose hash is 0 modulo [`CUT_MODULUS`], or at
//! [`MAX_BLOCK_BYTES`]): two snapshots sharing runs of pages share blocks, and a
//! re-recorded app pushes only the blocks around what changed. Every blob is checked
//! against its sha256 digest, every page against its blake3, the table against the
//! manifest and the manifest against the id.

pub mod client;
pub mod reference;

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use client::{Client, Options};
pub use reference::Reference;

use crate::model::{Manifest, PAGE_SIZE};
use crate::store::snapshot::{first_mismatch, BlockReader, HASH_MISMATCH};
use crate::store::table::{self, Record, TableMap, CODEC_LZ4, CODEC_RAW, TABLE_MAGIC};
use crate::store::{Location, Snapshot, SnapshotId, Store, StoreError};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const ARTIFACT_TYPE: &str = "application/vnd.warmstart.snapshot.v1";
pub const MT_MANIFEST: &str = "application/vnd.warmstart.snapshot.manifest.v1";
pub const MT_INDEX: &str = "application/vnd.warmstart.snapshot.index.v1";
pub const MT_WORKING_SET: &str = "application/vnd.warmstart.snapshot.working-set.v1+json";
pub const MT_BLOCK: &str = "application/vnd.warmstart.snapshot.block.v1";
pub const MT_HOT: &str = "application/vnd.warmstart.snapshot.hot.v1";
pub const ID_ANNOTATION: &str = "dev.warmstart.snapshot.id";

/// A block holds at least this many pages (unless the snapshot ends)...
pub const MIN_BLOCK_PAGES: u64 = 32;
/// ...then ends after a page whose hash (first 4 bytes, little-endian) is 0 modulo this...
pub const CUT_MODULUS: u32 = 256;
/// ...or once it holds this many bytes.
pub const MAX_BLOCK_BYTES: usize = 4 << 20;
/// A lazy run fetches a block this small whole at its first fault, a larger one by
/// range requests.
pub const WHOLE_BLOCK: u64 = 1 << 20;

/// Connections a lazy run fetches its first blocks on (a few ms of latency each on
/// loopback, hidden behind the others).
const PREFETCHERS: usize = 8;
/// Pages read from the store at a time while pushing.
const PUSH_WINDOW: u64 = 8192;
/// Pages stored at a time while pulling: small enough that storing starts while most
/// blocks are still coming.
const PULL_WINDOW: u64 = 1024;
/// A pull fetches blocks at most this many ahead of the pages it is storing (bounds its
/// memory to about this many blocks of up to [`MAX_BLOCK_BYTES`] besides the window).
const PULL_AHEAD: usize = 48;

/// An OCI descriptor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// An OCI image manifest (the fields warmstart writes and reads).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageManifest {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    #[serde(rename = "artifactType", default)]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Serialize, Deserialize, Default)]
struct WorkingSetBlob {
    pages: Vec<u64>,
}

/// The hot pages of a snapshot as one blob (`MT_HOT`): lz4 (`lz4_flex`'s block format
/// with its decompressed size prepended as u32 LE) of
///
/// ```text
/// magic "WSHOTBL1" | count u64 LE | count × u64 LE page-table index (ascending)
/// | count × 4096 page bytes, in index order
/// ```
///
/// Every page is checked against its page-table hash when fetched; the blob is advice
/// (a lazy run without it fetches the blocks of those pages).
pub struct HotBlob {
    indexes: Vec<u64>,
    data: Vec<u8>,
}

const HOT_MAGIC: &[u8; 8] = b"WSHOTBL1";

impl HotBlob {
    /// Encodes pages `bytes` (in the order of `indexes`, ascending).
    pub fn encode(indexes: &[u64], bytes: &[u8]) -> Vec<u8> {
        let mut raw = Vec::with_capacity(16 + indexes.len() * (8 + PAGE_SIZE));
        raw.extend_from_slice(HOT_MAGIC);
        raw.extend_from_slice(&(indexes.len() as u64).to_le_bytes());
        for i in indexes {
            raw.extend_from_slice(&i.to_le_bytes());
        }
        raw.extend_from_slice(bytes);
        lz4_flex::block::compress_prepend_size(&raw)
    }

    /// Decodes `blob` and checks every page against `table` (on up to `threads`
    /// threads); every length is checked before anything is allocated.
    pub(crate) fn decode(blob: &[u8], table: &TableMap, threads: usize) -> Result<Self, String> {
        let size = blob
            .get(..4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()) as u64)
            .ok_or("it is truncated")?;
        let max =
            16 + table.len().min(super::store::hot::MAX_HOT_PAGES as u64) * (8 + PAGE_SIZE as u64);
        if size < 16 || size > max {
            return Err(format!(
                "it claims {size} bytes, more than its snapshot's pages"
            ));
        }
        let raw = lz4_flex::block::decompress_size_prepended(blob)
            .map_err(|e| format!("it does not decompress: {e}"))?;
        if &raw[..8] != HOT_MAGIC {
            return Err("it has no hot-pages magic".into());
        }
        let count = u64::from_le_bytes(raw[8..16].try_into().unwrap());
        let data_at = count
            .checked_mul(8)
            .and_then(|n| n.checked_add(16))
            .filter(|&n| n <= raw.len() as u64)
            .ok_or("its page count does not fit its size")? as usize;
        if (raw.len() - data_at) as u64 != count * PAGE_SIZE as u64 {
            return Err("its page count does not fit its size".into());
        }
        let indexes: Vec<u64> = raw[16..data_at]
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        if indexes.windows(2).any(|w| w[0] >= w[1])
            || indexes.last().is_some_and(|&i| i >= table.len())
        {
            return Err("its page indexes are not ascending page-table indexes".into());
        }
        let data = &raw[data_at..];
        let per = indexes.len().div_ceil(threads.max(1)).max(1);
        let bad = std::thread::scope(|s| {
            let jobs: Vec<_> = (indexes.chunks(per).zip(data.chunks(per * PAGE_SIZE)))
                .map(|(idx, pages)| {
                    s.spawn(move || {
                        let want: Vec<(usize, [u8; 32])> = (idx.iter().enumerate())
                            .map(|(k, &i)| (k, table.record(i).hash))
                            .collect();
                        first_mismatch(pages, &want).map(|k| idx[k])
                    })
                })
                .collect();
            jobs.into_iter()
                .find_map(|j| j.join().expect("hot page check panicked"))
        });
        if let Some(i) = bad {
            return Err(format!("page {i} in it does not match its hash"));
        }
        let mut raw = raw;
        raw.drain(..data_at);
        Ok(HotBlob { indexes, data: raw })
    }

    /// Page-table record `i`'s bytes if the blob has them.
    fn page(&self, i: u64) -> Option<&[u8]> {
        let k = self.indexes.binary_search(&i).ok()?;
        Some(&self.data[k * PAGE_SIZE..(k + 1) * PAGE_SIZE])
    }
}

/// What a push did.
#[derive(Debug, Clone, Default)]
pub struct PushReport {
    pub id: Option<SnapshotId>,
    pub manifest_digest: String,
    pub blobs: usize,
    pub blobs_uploaded: usize,
    pub bytes: u64,
    pub bytes_uploaded: u64,
}

/// Uploads `blob` unless the repository has it; returns its descriptor.
fn upload(
    c: &Client,
    media_type: &str,
    blob: &[u8],
    rep: &mut PushReport,
) -> Result<Descriptor, StoreError> {
    let digest = client::sha256_digest(blob);
    rep.blobs += 1;
    rep.bytes += blob.len() as u64;
    if !c.has_blob(&digest)? {
        c.put_blob(&digest, blob)?;
        rep.blobs_uploaded += 1;
        rep.bytes_uploaded += blob.len() as u64;
    }
    Ok(Descriptor {
        media_type: media_type.into(),
        digest,
        size: blob.len() as u64,
    })
}

/// Content-defined grouping of compressed pages into blocks.
struct Blocker {
    cur: Vec<u8>,
    cur_pages: u64,
    number: u32,
    seen: HashMap<[u8; 32], Location>,
    records: Vec<Record>,
    scratch: Vec<u8>,
}

impl Blocker {
    fn new() -> Self {
        Blocker {
            cur: Vec::with_capacity(MAX_BLOCK_BYTES + PAGE_SIZE),
            cur_pages: 0,
            number: 0,
            seen: HashMap::new(),
            records: Vec::new(),
            scratch: vec![0; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)],
        }
    }

    /// Adds a page; returns a finished block when this page ends one (or starts a
    /// region of `region` pages, below).
    #[cfg(test)]
    fn add(&mut self, hash: [u8; 32], page: &[u8]) -> Option<Vec<u8>> {
        self.add_at(hash, page, None).1
    }

    /// [`Self::add`]; `region`: this page starts a mapping of that many stored pages.
    /// A large mapping (or one after a block of at least the minimum) starts a block of
    /// its own, so that the small mappings an app changes from one record to the next
    /// (stack, heap, libraries' data) never share blocks with the large ones it does not.
    /// Returns the block ended before this page and the one ended by it.
    fn add_at(
        &mut self,
        hash: [u8; 32],
        page: &[u8],
        region: Option<u64>,
    ) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let before = match region {
            Some(n) if n >= MIN_BLOCK_PAGES || self.cur_pages >= MIN_BLOCK_PAGES => self.finish(),
            _ => None,
        };
        (before, self.add_page(hash, page))
    }

    fn add_page(&mut self, hash: [u8; 32], page: &[u8]) -> Option<Vec<u8>> {
        if let Some(loc) = self.seen.get(&hash) {
            self.records.push(Record { hash, loc: *loc });
            return None;
        }
        let n = lz4_flex::block::compress_into(page, &mut self.scratch).unwrap_or(usize::MAX);
        let (codec, bytes) = if n < PAGE_SIZE {
            (CODEC_LZ4, &self.scratch[..n])
        } else {
            (CODEC_RAW, page)
        };
        let loc = Location {
            pack: self.number,
            offset: self.cur.len() as u64,
            len: bytes.len() as u32,
            slot: 0,
            pages: 1,
            codec,
        };
        self.cur.extend_from_slice(bytes);
        self.cur_pages += 1;
        self.seen.insert(hash, loc);
        self.records.push(Record { hash, loc });
        let v = u32::from_le_bytes(hash[..4].try_into().expect("4 bytes"));
        if (self.cur_pages >= MIN_BLOCK_PAGES && v % CUT_MODULUS == 0)
            || self.cur.len() >= MAX_BLOCK_BYTES
        {
            return self.finish();
        }
        None
    }

    fn finish(&mut self) -> Option<Vec<u8>> {
        if self.cur_pages == 0 {
            return None;
        }
        self.cur_pages = 0;
        self.number += 1;
        Some(std::mem::replace(
            &mut self.cur,
            Vec::with_capacity(MAX_BLOCK_BYTES + PAGE_SIZE),
        ))
    }
}

/// The page-table index where each mapping's (or shared file's) stored pages start, and
/// how many there are.
fn regions(m: &Manifest) -> HashMap<u64, u64> {
    use crate::model::RunContent;
    let mut out = HashMap::new();
    let mut note = |runs: &[crate::model::PageRun]| {
        let mut first = None;
        let mut count = 0;
        for r in runs {
            if let RunContent::Data { first: f } = r.content {
                first = Some(first.map_or(f, |x: u64| x.min(f)));
                count += r.count;
            }
        }
        if let Some(f) = first {
            let e = out.entry(f).or_insert(0);
            *e = count.max(*e);
        }
    };
    for p in &m.processes {
        for v in &p.vmas {
            note(&v.pages);
        }
    }
    for f in &m.shared_files {
        note(&f.pages);
    }
    out
}

/// Pushes `snap` to `r` (tag required); `progress(done, total)` after each window.
pub fn push(
    snap: &Snapshot,
    r: &Reference,
    opts: &Options,
    threads: usize,
    mut progress: impl FnMut(u64, u64),
) -> Result<PushReport, StoreError> {
    let Some(tag) = r.tag.as_deref() else {
        return Err(StoreError::Registry {
            what: r.to_string(),
            reason: "push needs a tag (REGISTRY/REPO:TAG), not a digest".into(),
        });
    };
    let c = Client::new(r, opts, true)?;
    let mut rep = PushReport {
        id: Some(snap.id),
        ..Default::default()
    };
    let n = snap.page_count();
    let regions = regions(&snap.manifest);
    let mut blocker = Blocker::new();
    let mut blocks = Vec::new();
    let mut buf = vec![0u8; (PUSH_WINDOW.min(n.max(1)) as usize) * PAGE_SIZE];
    let mut at = 0;
    while at < n {
        let k = (n - at).min(PUSH_WINDOW);
        let out = &mut buf[..k as usize * PAGE_SIZE];
        snap.read_pages_parallel(at, k, out, threads)?;
        for (j, page) in out.chunks_exact(PAGE_SIZE).enumerate() {
            let i = at + j as u64;
            let (before, after) = blocker.add_at(snap.page_hash(i), page, regions.get(&i).copied());
            for b in [before, after].into_iter().flatten() {
                blocks.push(upload(&c, MT_BLOCK, &b, &mut rep)?);
            }
        }
        at += k;
        progress(at, n);
    }
    if let Some(b) = blocker.finish() {
        blocks.push(upload(&c, MT_BLOCK, &b, &mut rep)?);
    }
    let pages_hash = table::pages_hash(blocker.records.iter().map(|r| &r.hash));
    let index = table::encode(TABLE_MAGIC, pages_hash, &blocker.records);
    let index = upload(&c, MT_INDEX, &index, &mut rep)?;
    let ws = WorkingSetBlob {
        pages: snap.working_sets().map(|w| w.flatten()).unwrap_or_default(),
    };
    let ws = serde_json::to_vec(&ws).expect("serializable");
    let ws = upload(&c, MT_WORKING_SET, &ws, &mut rep)?;
    let config = crate::format::encode(&snap.manifest);
    if SnapshotId::of_manifest_bytes(&config) != snap.id {
        return Err(StoreError::Registry {
            what: r.to_string(),
            reason: format!(
                "snapshot {}: its manifest does not encode back to its id (damaged store?): \
                 run `warmstart verify`",
                snap.id.short()
            ),
        });
    }
    let config = upload(&c, MT_MANIFEST, &config, &mut rep)?;
    let mut layers = vec![index, ws];
    layers.extend(blocks);
    if let Some(hot) = snap.hot(threads).filter(|h| !h.is_empty()) {
        let blob = HotBlob::encode(hot.indexes(), hot.bytes());
        layers.push(upload(&c, MT_HOT, &blob, &mut rep)?);
    }
    let m = ImageManifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.into()),
        artifact_type: Some(ARTIFACT_TYPE.into()),
        config,
        layers,
        annotations: [(ID_ANNOTATION.to_owned(), snap.id.to_hex())].into(),
    };
    let bytes = serde_json::to_vec(&m).expect("serializable");
    c.put_manifest(tag, OCI_MANIFEST, &bytes)?;
    rep.manifest_digest = client::sha256_digest(&bytes);
    rep.bytes += bytes.len() as u64;
    rep.bytes_uploaded += bytes.len() as u64;
    Ok(rep)
}

/// A snapshot's artifact in a registry, its small blobs fetched and checked: the source
/// of pages for a lazy run or a pull. Blocks are fetched whole into `cache` (a pull,
/// background streaming) or by ranges for single faults.
pub struct Remote {
    client: Client,
    reference: Reference,
    pub(crate) blocks: Vec<Descriptor>,
    /// Blocks fetched whole (and checked), by number; a pull drops each after its last
    /// page is stored.
    cache: Mutex<Vec<Option<Arc<Vec<u8>>>>>,
    working_set: Vec<u64>,
    /// The hot pages, fetched and checked, if the artifact has them and they were asked
    /// for.
    hot_pages: Option<HotBlob>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "registry::Remote({})", self.reference)
    }
}

/// What [`open`] returns: the snapshot's id, manifest, page table and its source.
pub(crate) struct Opened {
    pub id: SnapshotId,
    pub manifest: Manifest,
    pub table: TableMap,
    pub remote: Remote,
}

/// Fetches and checks `r`'s manifest, config (the snapshot's manifest), index and
/// working set, and with `with_hot` its hot pages (if any; a damaged blob is ignored with
/// a warning): those blobs side by side, once the manifest has named them.
pub(crate) fn open(r: &Reference, opts: &Options, with_hot: bool) -> Result<Opened, StoreError> {
    let c = Client::new(r, opts, false)?;
    let what = r.to_string();
    let bad = |reason: String| StoreError::Registry {
        what: what.clone(),
        reason,
    };
    let bytes = c.get_manifest(r.manifest_ref(), OCI_MANIFEST)?;
    let m: ImageManifest = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("its manifest is not an OCI image manifest: {e}")))?;
    if m.artifact_type.as_deref() != Some(ARTIFACT_TYPE) || m.config.media_type != MT_MANIFEST {
        return Err(bad(format!(
            "it is not a warmstart snapshot (artifactType {:?}, expected {ARTIFACT_TYPE})",
            m.artifact_type.as_deref().unwrap_or("none")
        )));
    }
    let mut layers = m.layers.clone();
    let hot = match layers.last() {
        Some(l) if l.media_type == MT_HOT => layers.pop(),
        _ => None,
    };
    if layers.len() < 2
        || layers[0].media_type != MT_INDEX
        || layers[1].media_type != MT_WORKING_SET
        || layers[2..].iter().any(|l| l.media_type != MT_BLOCK)
    {
        return Err(bad(
            "its layers are not index, working set, blocks (and hot pages): a different \
             format version?"
                .into(),
        ));
    }
    let get = |d: &Descriptor| c.get_blob(&d.digest, d.size);
    let (config, index, ws, hot_bytes) = std::thread::scope(|s| {
        let index = s.spawn(|| get(&layers[0]));
        let ws = s.spawn(|| get(&layers[1]));
        let hot = (hot.as_ref())
            .filter(|_| with_hot)
            .map(|d| s.spawn(move || get(d)));
        let config = get(&m.config);
        let join = |h: std::thread::ScopedJoinHandle<'_, _>| h.join().expect("blob fetch panicked");
        (config, join(index), join(ws), hot.map(join))
    });
    let config = config?;
    let id = SnapshotId::of_manifest_bytes(&config);
    if let Some(want) = m.annotations.get(ID_ANNOTATION) {
        if want != &id.to_hex() {
            return Err(bad(format!(
                "its snapshot manifest hashes to {}, the annotation says {want}: refusing it",
                id.short()
            )));
        }
    }
    let manifest: Manifest = crate::format::decode(&config).map_err(|e| {
        bad(format!(
            "snapshot {}: its manifest is damaged: {e}",
            id.short()
        ))
    })?;
    let index = index?;
    let table = TableMap::from_bytes(index, TABLE_MAGIC).map_err(|e| {
        bad(format!(
            "snapshot {}: its index is damaged: {e}",
            id.short()
        ))
    })?;
    if table.len() != manifest.page_count
        || table.pages_hash() != manifest.pages_hash
        || table.compute_pages_hash() != manifest.pages_hash
    {
        return Err(bad(format!(
            "snapshot {}: its index belongs to different pages than its manifest: refusing it",
            id.short()
        )));
    }
    let blocks: Vec<Descriptor> = layers[2..].to_vec();
    for rec in table.records() {
        let l = rec.loc;
        let ok = (l.pack as usize) < blocks.len()
            && l.offset + u64::from(l.len) <= blocks[l.pack as usize].size
            && l.pages == 1
            && l.slot == 0;
        if !ok {
            return Err(bad(format!(
                "snapshot {}: its index points outside its blocks: refusing it",
                id.short()
            )));
        }
    }
    let ws = ws?;
    let ws: WorkingSetBlob = serde_json::from_slice(&ws)
        .map_err(|e| bad(format!("its working set blob is damaged: {e}")))?;
    let working_set = ws
        .pages
        .into_iter()
        .filter(|&p| p < manifest.page_count)
        .collect();
    let hot_pages = hot_bytes.and_then(|blob| {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let checked = blob
            .map_err(|e| e.to_string())
            .and_then(|b| HotBlob::decode(&b, &table, threads));
        checked
            .map_err(|why| {
                tracing::warn!(
                    "{what}: ignoring its hot pages ({why}); fetching the blocks of those pages"
                )
            })
            .ok()
    });
    let cache = Mutex::new(vec![None; blocks.len()]);
    Ok(Opened {
        id,
        manifest,
        table,
        remote: Remote {
            client: c,
            reference: r.clone(),
            blocks,
            cache,
            working_set,
            hot_pages,
        },
    })
}

impl Remote {
    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    pub fn what(&self) -> String {
        self.reference.to_string()
    }

    pub fn working_set(&self) -> &[u64] {
        &self.working_set
    }

    pub fn abandon(&self) {
        self.client.abandon();
    }

    /// Total bytes of the blocks.
    pub fn block_bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.size).sum()
    }

    /// Block `n` if fetched already.
    fn cached(&self, n: usize) -> Option<Arc<Vec<u8>>> {
        self.cache.lock().unwrap()[n].clone()
    }

    /// Block `n`, fetched whole (and checked) once.
    pub fn block(&self, n: usize) -> Result<Arc<Vec<u8>>, StoreError> {
        if let Some(b) = self.cached(n) {
            return Ok(b);
        }
        let d = &self.blocks[n];
        let b = Arc::new(self.client.get_blob(&d.digest, d.size)?);
        Ok(self.cache.lock().unwrap()[n].get_or_insert(b).clone())
    }

    /// Fetches whole, on [`PREFETCHERS`] connections side by side, the blocks holding
    /// the pages of the working set and the pages `eager` (page-table indexes) that the
    /// hot pages lack: what a lazy run needs before its app resumes.
    pub(crate) fn prefetch(&self, table: &TableMap, eager: &[u64]) -> Result<(), StoreError> {
        let hot = self.hot_pages.as_ref();
        let mut want: Vec<usize> = (self.working_set.iter().chain(eager))
            .filter(|&&i| i < table.len() && hot.is_none_or(|h| h.page(i).is_none()))
            .map(|&i| table.record(i).loc.pack as usize)
            .filter(|&b| b < self.blocks.len())
            .collect();
        want.sort_unstable();
        want.dedup();
        self.fetch(&want, PREFETCHERS)
    }

    fn fetch(&self, which: &[usize], threads: usize) -> Result<(), StoreError> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            let jobs: Vec<_> = (0..threads.max(1))
                .map(|_| {
                    s.spawn(|| loop {
                        let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&n) = which.get(k) else {
                            return Ok(());
                        };
                        self.block(n)?;
                    })
                })
                .collect();
            jobs.into_iter()
                .try_for_each(|j| j.join().expect("block fetcher panicked"))
        })
    }

    /// Reads the records `indexes` of `table` into consecutive pages of `out`, from
    /// fetched blocks or by range requests (a run of records stored one after the other
    /// in one block is one request); every page checked against its hash.
    pub(crate) fn read(
        &self,
        id: &SnapshotId,
        table: &TableMap,
        indexes: &[u64],
        out: &mut [u8],
    ) -> Result<(), StoreError> {
        let mut reader = BlockReader::default();
        let mut want = Vec::new();
        let mut k = 0;
        while k < indexes.len() {
            if let Some(page) = self.hot_pages.as_ref().and_then(|h| h.page(indexes[k])) {
                out[k * PAGE_SIZE..(k + 1) * PAGE_SIZE].copy_from_slice(page);
                k += 1;
                continue;
            }
            let rec = table.record(indexes[k]);
            let b = rec.loc.pack as usize;
            if b >= self.blocks.len() {
                return Err(self.corrupt(id, indexes[k], "its index record is inconsistent"));
            }
            let start = rec.loc.offset;
            let mut end = start + u64::from(rec.loc.len);
            let mut j = k + 1;
            // A block up to WHOLE_BLOCK is fetched whole at its first fault (about the
            // cost of one page's range request from a registry), larger ones by ranges.
            let cached = match self.cached(b) {
                Some(c) => Some(c),
                None if self.blocks[b].size <= WHOLE_BLOCK => Some(self.block(b)?),
                None => None,
            };
            if cached.is_none() {
                while j < indexes.len() {
                    let r2 = table.record(indexes[j]);
                    if r2.loc.pack as usize != b || r2.loc.offset != end {
                        break;
                    }
                    end += u64::from(r2.loc.len);
                    j += 1;
                }
            }
            let (data, base): (Arc<Vec<u8>>, u64) = match cached {
                Some(c) => (c, 0),
                None => {
                    let d = &self.blocks[b];
                    (
                        Arc::new(self.client.get_range(&d.digest, start, end - start)?),
                        start,
                    )
                }
            };
            for (m, &i) in indexes.iter().enumerate().take(j).skip(k) {
                let r = table.record(i);
                let s = (r.loc.offset - base) as usize;
                let e = s + r.loc.len as usize;
                let src = data
                    .get(s..e)
                    .ok_or_else(|| self.corrupt(id, i, "its block is too short"))?;
                reader
                    .copy(&r, src, &mut out[m * PAGE_SIZE..(m + 1) * PAGE_SIZE])
                    .map_err(|reason| self.corrupt(id, i, &reason))?;
                want.push((m, r.hash));
            }
            k = j;
        }
        if let Some(w) = first_mismatch(out, &want) {
            return Err(self.corrupt(id, indexes[want[w].0], HASH_MISMATCH));
        }
        Ok(())
    }

    fn corrupt(&self, id: &SnapshotId, page: u64, reason: &str) -> StoreError {
        StoreError::Registry {
            what: self.what(),
            reason: format!(
                "snapshot {}: page {page} is corrupt as served: {reason}; refusing it",
                id.short()
            ),
        }
    }
}

/// What [`pull_into`] did, and where its time went.
#[derive(Debug, Clone, Default)]
pub struct PullReport {
    /// Bytes of blocks fetched.
    pub bytes: u64,
    /// Time the storing side waited for blocks from the registry.
    pub waited: Duration,
    /// Time spent decompressing and verifying pages, and handing them to the store.
    pub stored: Duration,
    /// Time of the commit (the one flush to disk).
    pub committed: Duration,
}

/// The fetchers' and the storing side's shared state in [`pull_into`].
struct Feed {
    /// Next block to fetch.
    next: usize,
    /// Blocks below this are wanted now; fetchers stay under `wanted + PULL_AHEAD`.
    wanted: usize,
    /// Fetchers still running.
    active: usize,
    failed: Option<StoreError>,
    stop: bool,
}

/// One fetcher of [`pull_into`]: fetches the next block in order while it is within
/// [`PULL_AHEAD`] of what the storing side wants.
fn fetch_blocks(remote: &Remote, feed: &Mutex<Feed>, ready: &Condvar) {
    let n = remote.blocks.len();
    loop {
        let k = {
            let mut f = feed.lock().unwrap();
            loop {
                if f.stop || f.failed.is_some() || f.next >= n {
                    f.active -= 1;
                    ready.notify_all();
                    return;
                }
                if f.next < f.wanted + PULL_AHEAD {
                    f.next += 1;
                    break f.next - 1;
                }
                f = ready.wait(f).unwrap();
            }
        };
        let res = remote.block(k);
        let mut f = feed.lock().unwrap();
        if let Err(e) = res {
            f.failed.get_or_insert(e);
        }
        ready.notify_all();
    }
}

/// Stores the snapshot `snap` (opened from a registry) into `store` under `name`, with
/// the same id: `fetchers` threads fetch its blocks (each checked against its digest) in
/// order, a bounded distance ahead, while the pages of the blocks fetched are checked
/// against their hashes (on `threads` threads) and stored; a block is dropped after its
/// last page is stored unless `keep` (a lazy run's faults may still read it).
pub fn pull_into(
    snap: &Snapshot,
    store: &Store,
    name: Option<&str>,
    fetchers: usize,
    threads: usize,
    keep: bool,
) -> Result<(SnapshotId, PullReport), StoreError> {
    let what = || snap.registry().map(|r| r.what()).unwrap_or_default();
    let Some(remote) = snap.registry() else {
        return Err(StoreError::Registry {
            what: what(),
            reason: format!("snapshot {} is not from a registry", snap.id.short()),
        });
    };
    let table = snap.table();
    let n = snap.page_count();
    // The last page of each block: after it is stored, the block is not needed again.
    let mut last_use = vec![0u64; remote.blocks.len()];
    for i in 0..n {
        last_use[table.record(i).loc.pack as usize] = i;
    }
    let fetchers = fetchers.max(1);
    let feed = Mutex::new(Feed {
        next: 0,
        wanted: 0,
        active: fetchers,
        failed: None,
        stop: false,
    });
    let ready = Condvar::new();
    let mut rep = PullReport {
        bytes: remote.block_bytes(),
        ..Default::default()
    };
    let zero_hash = *blake3::hash(&[0u8; PAGE_SIZE]).as_bytes();
    let id = std::thread::scope(|s| {
        for _ in 0..fetchers {
            s.spawn(|| fetch_blocks(remote, &feed, &ready));
        }
        let res = (|| {
            let mut w = store.writer()?;
            let mut runs = Vec::new();
            let mut buf = vec![0u8; (PULL_WINDOW.min(n.max(1)) as usize) * PAGE_SIZE];
            let mut hashes = Vec::new();
            let mut need = Vec::new();
            let mut at = 0;
            while at < n {
                let k = (n - at).min(PULL_WINDOW);
                need.clear();
                hashes.clear();
                for i in at..at + k {
                    let rec = table.record(i);
                    if rec.hash == zero_hash {
                        return Err(StoreError::Registry {
                            what: what(),
                            reason: format!(
                                "snapshot {}: its page table holds a zero page, which \
                                 warmstart never stores: refusing it",
                                snap.id.short()
                            ),
                        });
                    }
                    hashes.push(rec.hash);
                    need.push(rec.loc.pack as usize);
                }
                need.sort_unstable();
                need.dedup();
                let t = Instant::now();
                wait_for_blocks(remote, &feed, &ready, &need)?;
                rep.waited += t.elapsed();
                let t = Instant::now();
                let out = &mut buf[..k as usize * PAGE_SIZE];
                snap.read_pages_parallel(at, k, out, threads)?;
                w.add_verified_pages(at, out, &hashes, &mut runs)?;
                at += k;
                if !keep {
                    for &b in need.iter().filter(|&&b| last_use[b] < at) {
                        remote.cache.lock().unwrap()[b] = None;
                    }
                }
                rep.stored += t.elapsed();
            }
            let t = Instant::now();
            let id = w.commit(snap.manifest.clone(), None)?;
            rep.committed = t.elapsed();
            Ok(id)
        })();
        let mut f = feed.lock().unwrap();
        f.stop = true;
        ready.notify_all();
        res
    })?;
    if id != snap.id {
        return Err(StoreError::Registry {
            what: what(),
            reason: format!(
                "snapshot {} stored as {}: the pulled pages do not rebuild it",
                snap.id.short(),
                id.short()
            ),
        });
    }
    if let Some(name) = name {
        store.set_name(name, &id)?;
    }
    if !remote.working_set().is_empty() {
        let _ = store.save_working_set(&id, remote.working_set());
    }
    Ok((id, rep))
}

/// Waits until every block of `need` (ascending) is fetched, letting the fetchers run
/// ahead of the last one; fetches a block itself if no fetcher is left to.
fn wait_for_blocks(
    remote: &Remote,
    feed: &Mutex<Feed>,
    ready: &Condvar,
    need: &[usize],
) -> Result<(), StoreError> {
    let Some(&last) = need.last() else {
        return Ok(());
    };
    let mut f = feed.lock().unwrap();
    f.wanted = f.wanted.max(last + 1);
    ready.notify_all();
    for &b in need {
        loop {
            if let Some(e) = f.failed.take() {
                return Err(e);
            }
            if remote.cached(b).is_some() {
                break;
            }
            if f.active == 0 {
                drop(f);
                remote.block(b)?;
                f = feed.lock().unwrap();
                continue;
            }
            f = ready.wait(f).unwrap();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u64) -> Vec<u8> {
        let mut p = vec![0u8; PAGE_SIZE];
        let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
        for c in p.chunks_mut(8).take(64) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        p
    }

    fn blocks_of(seeds: impl Iterator<Item = u64>) -> Vec<String> {
        let mut b = Blocker::new();
        let mut out = Vec::new();
        for s in seeds {
            let p = page(s);
            if let Some(blk) = b.add(*blake3::hash(&p).as_bytes(), &p) {
                out.push(client::sha256_digest(&blk));
            }
        }
        if let Some(blk) = b.finish() {
            out.push(client::sha256_digest(&blk));
        }
        out
    }

    /// The hot-pages blob decodes to its pages, checked against the page table; a
    /// page that is not its record's, a size it cannot have or indexes out of order are
    /// refused.
    #[test]
    fn hot_blob_round_trip_and_damage() {
        let pages: Vec<Vec<u8>> = (0..8).map(page).collect();
        let records: Vec<Record> = (pages.iter().enumerate())
            .map(|(i, p)| Record {
                hash: *blake3::hash(p).as_bytes(),
                loc: Location {
                    pack: 0,
                    offset: i as u64 * PAGE_SIZE as u64,
                    len: PAGE_SIZE as u32,
                    slot: 0,
                    pages: 1,
                    codec: CODEC_RAW,
                },
            })
            .collect();
        let ph = table::pages_hash(records.iter().map(|r| &r.hash));
        let table =
            TableMap::from_bytes(table::encode(TABLE_MAGIC, ph, &records), TABLE_MAGIC).unwrap();
        let idx = [1u64, 2, 6];
        let bytes: Vec<u8> = idx
            .iter()
            .flat_map(|&i| pages[i as usize].clone())
            .collect();
        let blob = HotBlob::encode(&idx, &bytes);
        let hot = HotBlob::decode(&blob, &table, 2).unwrap();
        assert_eq!(hot.page(6).unwrap(), &pages[6][..]);
        assert_eq!(hot.page(2).unwrap(), &pages[2][..]);
        assert!(hot.page(3).is_none());
        // Page 6's bytes given as page 5's.
        let err = HotBlob::decode(&HotBlob::encode(&[1, 2, 5], &bytes), &table, 2)
            .err()
            .unwrap();
        assert!(err.contains("page 5"), "{err}");
        let err = HotBlob::decode(&HotBlob::encode(&[2, 1, 6], &bytes), &table, 1)
            .err()
            .unwrap();
        assert!(err.contains("ascending"), "{err}");
        let err = HotBlob::decode(&HotBlob::encode(&[1, 2, 60], &bytes), &table, 1)
            .err()
            .unwrap();
        assert!(err.contains("ascending"), "{err}");
        // A claimed size larger than the snapshot's pages is refused before allocating.
        let mut huge = blob.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(HotBlob::decode(&huge, &table, 1).is_err());
        assert!(HotBlob::decode(&blob[..3], &table, 1).is_err());
        assert!(HotBlob::decode(&blob[..blob.len() / 2], &table, 1).is_err());
    }

    /// Content-defined blocks: a change in the middle leaves the blocks before and
    /// after it alone.
    #[test]
    fn blocks_resynchronise() {
        let a = blocks_of(0..20_000);
        let b = blocks_of((0..20_000).map(|i| if i == 10_000 { 999_999 } else { i }));
        assert!(a.len() > 10, "{} blocks", a.len());
        let shared = a.iter().filter(|d| b.contains(d)).count();
        assert!(shared >= a.len() - 2, "{shared} of {} shared", a.len());
        assert_eq!(blocks_of(0..20_000), a, "deterministic");
    }
}
