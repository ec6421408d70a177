//! Snapshots in an OCI registry: the artifact format, `push`, `pull`, and the page
//! source of a lazy run straight from a registry.
//!
//! # The artifact
//!
//! The tag names an OCI image index (`application/vnd.oci.image.index.v1+json`) with
//! `artifactType` [`ARTIFACT_TYPE`] and annotations [`ID_ANNOTATION`] (the snapshot id),
//! [`HEAD_ANNOTATION`] and [`HOT_ANNOTATION`] (`DIGEST@SIZE` of the head and hot blobs,
//! so that a run fetches them at once) and, for a head blob up to 192 KiB,
//! [`HEAD_DATA_ANNOTATION`] (the head blob itself, base64, checked against its digest:
//! a run starts after one request), listing two OCI image manifests: the *head*,
//! all a lazy run reads before it starts, small whatever the snapshot's size, and the
//! *blocks*, which only keeps the bulk referenced (registries collect unreferenced
//! blobs) and lets generic tools copy the artifact:
//!
//! ```text
//! head (artifactType ARTIFACT_TYPE)
//!   config     MT_MANIFEST      the snapshot's encoded manifest; its blake3 is the id
//!   layers[0]  MT_HEAD          see [`Head`]: how the page table is split (records,
//!                               records per part, pages_hash, each part's blake3
//!                               chaining value and blob), the blocks (sha256, size), the
//!                               learned working set, the index parts of the working set
//!                               and hot pages whole when there is no hot blob, and the
//!                               config once more; lz4-compressed
//!   layers[1]  MT_HOT           (optional) the hot pages: the working set's and those a
//!                               restore writes before the app resumes, with the index
//!                               parts that hold their records (see [`HotBlob`])
//! blocks (artifactType BLOCKS_ARTIFACT, config the OCI empty blob)
//!   layers     MT_INDEX_PART    the page table's records, a part each (warmstart's
//!                               56-byte records: page i's blake3 and where it is: block
//!                               number, byte offset and length in it, codec)
//!   then       MT_BLOCK         blocks, in block-number order: pages one after another,
//!                               each lz4 or raw on its own, so that any page or run of
//!                               pages is one range read
//! ```
//!
//! Pages are grouped into blocks in page-table order, each distinct page once, cut
//! where a page's hash says so (content-defined: at least [`MIN_BLOCK_PAGES`] pages,
//! then after any page whose hash is 0 modulo [`CUT_MODULUS`], or at
//! [`MAX_BLOCK_BYTES`]): two snapshots sharing runs of pages share blocks, and a
//! re-recorded app pushes only the blocks around what changed. Every blob is checked
//! against its sha256 digest, every page against its blake3, the manifest against the
//! id. The page table is fetched by parts, those a run needs first: the hashes of all
//! records are one blake3 input (whose root is the manifest's `pages_hash`), and each
//! part's chaining value is listed, so the list is checked against `pages_hash` at once
//! and each part against its value when it comes.

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
use crate::store::table::{self, Parts, Record, TableMap, CODEC_LZ4, CODEC_RAW};
use crate::store::{Location, Snapshot, SnapshotId, Store, StoreError};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const ARTIFACT_TYPE: &str = "application/vnd.warmstart.snapshot.v1";
pub const MT_MANIFEST: &str = "application/vnd.warmstart.snapshot.manifest.v1";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const BLOCKS_ARTIFACT: &str = "application/vnd.warmstart.snapshot.blocks.v1";
pub const MT_HEAD: &str = "application/vnd.warmstart.snapshot.head.v1";
pub const MT_INDEX_PART: &str = "application/vnd.warmstart.snapshot.index-part.v1";
pub const MT_BLOCK: &str = "application/vnd.warmstart.snapshot.block.v1";
pub const MT_HOT: &str = "application/vnd.warmstart.snapshot.hot.v1";
pub const ID_ANNOTATION: &str = "dev.warmstart.snapshot.id";
/// Annotations of the OCI index naming the head manifest's head blob (which carries the
/// config too) and hot pages blob (`DIGEST@SIZE`), so that a run fetches them at once,
/// not after the head manifest.
pub const HEAD_ANNOTATION: &str = "dev.warmstart.snapshot.head";
pub const HOT_ANNOTATION: &str = "dev.warmstart.snapshot.hot";
/// Annotation of the OCI index carrying the head blob itself (base64) when it is small,
/// checked against [`HEAD_ANNOTATION`]'s digest: a run starts after one request.
pub const HEAD_DATA_ANNOTATION: &str = "dev.warmstart.snapshot.head.data";
/// The most index parts a head blob carries whole.
pub const INLINE_PARTS: usize = 32;

/// A block holds at least this many pages (unless the snapshot ends)...
pub const MIN_BLOCK_PAGES: u64 = 512;
/// ...then ends after a page whose hash (first 4 bytes, little-endian) is 0 modulo this...
pub const CUT_MODULUS: u32 = 1024;
/// At the edges of a large mapping blocks end after a page whose hash is 0 modulo this,
/// up to one whose hash is 0 modulo the next at least `EDGE_PAGES` pages from the edge
/// (see `Blocker`).
pub const EDGE_MODULUS: u32 = 32;
pub const NEAR_EDGE_MODULUS: u32 = 256;
pub const EDGE_PAGES: u64 = 64;
/// ...or once it holds this many bytes.
pub const MAX_BLOCK_BYTES: usize = 8 << 20;
/// Page-table records in a part of the index (112 KiB; 256 parts for 2 GiB of pages).
pub const INDEX_PART_RECORDS: u64 = 2048;
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
const PULL_AHEAD: usize = 24;

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

/// An OCI image index (the fields warmstart writes and reads).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageIndex {
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    #[serde(rename = "artifactType", default)]
    pub artifact_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// A head blob: this magic and the body compressed; `HEAD_MAGIC_RAW` and the body as
/// is (pushed before 2026-12-07 19:00; still read).
const HEAD_MAGIC: &[u8; 8] = b"WSHEAD02";
/// A head of an artifact pushed against a base: [`HEAD_MAGIC`]'s body, then its record
/// patches and stale hot pages.
const HEAD_MAGIC_DELTA: &[u8; 8] = b"WSHEAD03";
const HEAD_MAGIC_RAW: &[u8; 8] = b"WSHEAD01";
/// A head blob at most this long is carried in the OCI index too (base64, annotation
/// [`HEAD_DATA_ANNOTATION`]), so that a run has it with its first request; registries
/// take manifests of 4 MiB.
const HEAD_DATA_MAX: usize = 192 << 10;

/// Decompresses an lz4 block with its length prepended, refusing a length beyond what
/// lz4 can expand `b` to (so that a damaged length allocates nothing absurd).
fn decompress_bounded(b: &[u8]) -> Option<Vec<u8>> {
    let n = u32::from_le_bytes(b.get(..4)?.try_into().unwrap()) as usize;
    if n > b.len().saturating_mul(255) {
        return None;
    }
    lz4_flex::block::decompress_size_prepended(b).ok()
}

/// The `MT_HEAD` blob: what a run needs besides the snapshot's manifest to find any page
/// (see the module's documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Head {
    /// Page-table records, records per index part, blake3 of the records' hashes.
    count: u64,
    per: u64,
    pages_hash: [u8; 32],
    /// Each index part's blake3 chaining value and blob.
    cvs: Vec<[u8; 32]>,
    parts: Vec<Descriptor>,
    blocks: Vec<Descriptor>,
    working_set: Vec<u64>,
    /// Index parts carried whole (their number and records): those of the hot pages, so
    /// that a lazy run finds them here rather than one request later.
    inline: Vec<(u64, Vec<u8>)>,
    /// The snapshot's manifest (the head manifest's config, once more): one request
    /// fewer for a run.
    config: Vec<u8>,
    /// Pushed against a base: the records of each index part that differ from the bytes
    /// of its blob (which is the base's), by part. Applied to a part's bytes however
    /// they come (its blob, or carried by a head or hot blob: always that blob's bytes).
    patches: Patches,
    /// Pushed against a base whose hot-pages blob it names: the page-table indexes of
    /// that blob's pages that are not this snapshot's (their new contents are in its
    /// blocks).
    stale_hot: Vec<u64>,
}

/// Records that replace records of an index part's blob: part number → (record number
/// in the part, the record's bytes), ascending.
pub(crate) type Patches = std::collections::BTreeMap<u64, Vec<(u32, Vec<u8>)>>;

/// `records` (a part's bytes) with `patch` applied; refused if a record number is
/// outside them.
fn patched(mut records: Vec<u8>, patch: Option<&Vec<(u32, Vec<u8>)>>) -> Result<Vec<u8>, String> {
    for (slot, rec) in patch.into_iter().flatten() {
        let at = *slot as usize * table::RECORD_SIZE;
        let dst = (records.get_mut(at..at + table::RECORD_SIZE))
            .ok_or_else(|| format!("a patch names record {slot}, past its part's end"))?;
        dst.copy_from_slice(rec);
    }
    Ok(records)
}

fn put_digest(out: &mut Vec<u8>, d: &Descriptor) {
    let hex = d.digest.strip_prefix("sha256:").expect("sha256 digests");
    for k in 0..32 {
        out.push(u8::from_str_radix(&hex[2 * k..2 * k + 2], 16).expect("hex digest"));
    }
    out.extend_from_slice(&d.size.to_le_bytes());
}

impl Head {
    /// `HEAD_MAGIC`, then the body below as one lz4 block (its length first).
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            96 + self.parts.len() * 72 + self.blocks.len() * 40 + self.working_set.len() * 8,
        );
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&self.per.to_le_bytes());
        out.extend_from_slice(&self.pages_hash);
        out.extend_from_slice(&(self.parts.len() as u64).to_le_bytes());
        for (cv, d) in self.cvs.iter().zip(&self.parts) {
            out.extend_from_slice(cv);
            put_digest(&mut out, d);
        }
        out.extend_from_slice(&(self.blocks.len() as u64).to_le_bytes());
        for d in &self.blocks {
            put_digest(&mut out, d);
        }
        out.extend_from_slice(&(self.working_set.len() as u64).to_le_bytes());
        for p in &self.working_set {
            out.extend_from_slice(&p.to_le_bytes());
        }
        out.extend_from_slice(&(self.inline.len() as u64).to_le_bytes());
        for (k, records) in &self.inline {
            out.extend_from_slice(&k.to_le_bytes());
            out.extend_from_slice(&(records.len() as u64).to_le_bytes());
            out.extend_from_slice(records);
        }
        out.extend_from_slice(&(self.config.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.config);
        let delta = !self.patches.is_empty() || !self.stale_hot.is_empty();
        if delta {
            out.extend_from_slice(&(self.patches.len() as u64).to_le_bytes());
            for (k, recs) in &self.patches {
                out.extend_from_slice(&k.to_le_bytes());
                out.extend_from_slice(&(recs.len() as u64).to_le_bytes());
                for (slot, rec) in recs {
                    out.extend_from_slice(&slot.to_le_bytes());
                    out.extend_from_slice(rec);
                }
            }
            out.extend_from_slice(&(self.stale_hot.len() as u64).to_le_bytes());
            for i in &self.stale_hot {
                out.extend_from_slice(&i.to_le_bytes());
            }
        }
        let mut blob = if delta { HEAD_MAGIC_DELTA } else { HEAD_MAGIC }.to_vec();
        blob.extend_from_slice(&lz4_flex::block::compress_prepend_size(&out));
        blob
    }

    /// Decodes a head blob; every count is checked against the blob's size first.
    fn decode(blob: &[u8]) -> Result<Head, String> {
        let body;
        let delta = blob.starts_with(HEAD_MAGIC_DELTA);
        let b = match blob.split_at_checked(8) {
            Some((m, rest)) if m == HEAD_MAGIC || m == HEAD_MAGIC_DELTA => {
                body = decompress_bounded(rest).ok_or("its body does not decompress")?;
                &body[..]
            }
            Some((m, rest)) if m == HEAD_MAGIC_RAW => rest,
            Some((m, _)) if m.starts_with(b"WSHEAD") => {
                return Err(format!(
                    "its format {} is newer than this warmstart reads: upgrade warmstart",
                    String::from_utf8_lossy(m)
                ))
            }
            _ => return Err("it has no head magic".into()),
        };
        struct Rd<'a>(&'a [u8]);
        impl Rd<'_> {
            fn take(&mut self, n: usize) -> Result<&[u8], String> {
                if self.0.len() < n {
                    return Err("it is truncated".into());
                }
                let (a, rest) = self.0.split_at(n);
                self.0 = rest;
                Ok(a)
            }
            fn u64(&mut self) -> Result<u64, String> {
                Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
            }
            fn count(&mut self, each: usize) -> Result<usize, String> {
                let n = self.u64()?;
                if n > (self.0.len() / each) as u64 {
                    return Err(format!("it lists {n} entries it has no room for"));
                }
                Ok(n as usize)
            }
            fn desc(&mut self, media_type: &str) -> Result<Descriptor, String> {
                let hex: String = self.take(32)?.iter().map(|x| format!("{x:02x}")).collect();
                Ok(Descriptor {
                    media_type: media_type.into(),
                    digest: format!("sha256:{hex}"),
                    size: self.u64()?,
                })
            }
        }
        let mut r = Rd(b);
        let (count, per) = (r.u64()?, r.u64()?);
        let pages_hash = r.take(32)?.try_into().unwrap();
        let n = r.count(72)?;
        let (mut cvs, mut parts) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..n {
            cvs.push(r.take(32)?.try_into().unwrap());
            parts.push(r.desc(MT_INDEX_PART)?);
        }
        let n = r.count(40)?;
        let blocks = (0..n).map(|_| r.desc(MT_BLOCK)).collect::<Result<_, _>>()?;
        let n = r.count(8)?;
        let working_set = (0..n).map(|_| r.u64()).collect::<Result<_, _>>()?;
        let n = r.count(16)?;
        let mut inline = Vec::with_capacity(n);
        for _ in 0..n {
            let k = r.u64()?;
            let len = r.u64()?;
            let len = usize::try_from(len).map_err(|_| "an inline part is too long")?;
            inline.push((k, r.take(len)?.to_vec()));
        }
        let len = r.u64()?;
        let len = usize::try_from(len).map_err(|_| "its manifest is too long")?;
        let config = r.take(len)?.to_vec();
        let mut patches = Patches::new();
        let mut stale_hot = Vec::new();
        if delta {
            let n = r.count(16)?;
            for _ in 0..n {
                let k = r.u64()?;
                let m = r.count(4 + table::RECORD_SIZE)?;
                let mut recs = Vec::with_capacity(m);
                for _ in 0..m {
                    let slot = u32::from_le_bytes(r.take(4)?.try_into().unwrap());
                    recs.push((slot, r.take(table::RECORD_SIZE)?.to_vec()));
                }
                patches.insert(k, recs);
            }
            let n = r.count(8)?;
            stale_hot = (0..n).map(|_| r.u64()).collect::<Result<_, _>>()?;
        }
        if !r.0.is_empty() {
            return Err(format!("{} bytes follow its end", r.0.len()));
        }
        Ok(Head {
            count,
            per,
            pages_hash,
            cvs,
            parts,
            blocks,
            working_set,
            inline,
            config,
            patches,
            stale_hot,
        })
    }
}

/// The hot pages of a snapshot as one blob (`MT_HOT`), in chunks compressed on their
/// own so that a run decompresses them on every core:
///
/// ```text
/// magic "WSHOTBL3" | count u64 LE | chunk pages u64 LE
/// | parts u64 LE | parts × (part number u64 LE, records' bytes u64 LE)
/// | u64 LE length of the next | one lz4_flex block of those parts' records, one after another
/// | count × u64 LE page-table index (ascending)
/// | chunks × u32 LE compressed length of each chunk
/// | the chunks: lz4_flex blocks, each of chunk pages × 4096 page bytes (the last of the rest),
///   the pages in index order
/// ```
///
/// The index parts are those holding the records of the working set and of the hot
/// pages (see [`INLINE_PARTS`]), so that a run has them with the pages rather than a
/// request before; each is checked against its chaining value as any part is. Every page
/// is checked against its page-table hash when fetched; the blob is advice (a lazy run
/// without it fetches those parts and the blocks of those pages). Blobs of the format
/// before (`WSHOTBL2`, no parts) are still read.
pub struct HotBlob {
    indexes: Vec<u64>,
    data: Vec<u8>,
    /// Each page's blake3, computed as it was decoded.
    hashes: Vec<[u8; 32]>,
    parts: Vec<(u64, Vec<u8>)>,
    /// Pages of it not to use (ascending): a base's hot pages that changed since.
    stale: Vec<u64>,
}

const HOT_MAGIC: &[u8; 8] = b"WSHOTBL3";
const HOT_MAGIC_NO_PARTS: &[u8; 8] = b"WSHOTBL2";
/// Pages per compressed chunk of a hot blob (256 KiB).
const HOT_CHUNK_PAGES: usize = 64;

impl HotBlob {
    /// Encodes pages `bytes` (in the order of `indexes`, ascending) and index `parts`
    /// (part number, records).
    pub fn encode(indexes: &[u64], bytes: &[u8], parts: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let chunks: Vec<Vec<u8>> = bytes
            .chunks(HOT_CHUNK_PAGES * PAGE_SIZE)
            .map(lz4_flex::block::compress)
            .collect();
        let records: Vec<u8> = parts.iter().flat_map(|(_, r)| r.iter().copied()).collect();
        let records = lz4_flex::block::compress(&records);
        let mut out = Vec::with_capacity(
            40 + parts.len() * 16
                + records.len()
                + indexes.len() * 8
                + chunks.iter().map(|c| 4 + c.len()).sum::<usize>(),
        );
        out.extend_from_slice(HOT_MAGIC);
        out.extend_from_slice(&(indexes.len() as u64).to_le_bytes());
        out.extend_from_slice(&(HOT_CHUNK_PAGES as u64).to_le_bytes());
        out.extend_from_slice(&(parts.len() as u64).to_le_bytes());
        for (k, r) in parts {
            out.extend_from_slice(&k.to_le_bytes());
            out.extend_from_slice(&(r.len() as u64).to_le_bytes());
        }
        out.extend_from_slice(&(records.len() as u64).to_le_bytes());
        out.extend_from_slice(&records);
        for i in indexes {
            out.extend_from_slice(&i.to_le_bytes());
        }
        for c in &chunks {
            out.extend_from_slice(&(c.len() as u32).to_le_bytes());
        }
        for c in &chunks {
            out.extend_from_slice(c);
        }
        out
    }

    /// Decodes and checks `blob` against `table` (on up to `threads` threads).
    #[cfg(test)]
    pub(crate) fn decode(blob: &[u8], table: &TableMap, threads: usize) -> Result<Self, String> {
        let h = HotDecoder::new(table.len()).finish(blob, threads)?;
        h.check(table)?;
        Ok(h)
    }

    /// Checks every page against `table` (whose records of these pages are in): the
    /// hashes taken as the pages were decoded against the records'.
    pub(crate) fn check(&self, table: &TableMap) -> Result<(), String> {
        let mut pages = self.indexes.iter().zip(&self.hashes);
        match pages.find(|&(&i, h)| table.hash(i) != *h && self.stale.binary_search(&i).is_err()) {
            Some((i, _)) => Err(format!("page {i} in it does not match its hash")),
            None => Ok(()),
        }
    }

    /// The index parts it carries (part number, records), taken out of it.
    fn take_parts(&mut self) -> Vec<(u64, Vec<u8>)> {
        std::mem::take(&mut self.parts)
    }

    /// The page-table indexes of the pages it has for the snapshot (not stale).
    fn live(&self) -> Vec<u64> {
        (self.indexes.iter().copied())
            .filter(|i| self.stale.binary_search(i).is_err())
            .collect()
    }

    /// Leaves pages `stale` (ascending) out: they are not the snapshot's.
    fn forget(&mut self, stale: &[u64]) {
        self.stale = stale.to_vec();
    }

    /// Page-table record `i`'s bytes if the blob has them.
    fn page(&self, i: u64) -> Option<&[u8]> {
        if self.stale.binary_search(&i).is_ok() {
            return None;
        }
        let k = self.indexes.binary_search(&i).ok()?;
        Some(&self.data[k * PAGE_SIZE..(k + 1) * PAGE_SIZE])
    }
}

/// Decodes a hot-pages blob (see [`HotBlob`]) as its bytes come: the header once it
/// is in, then each chunk as soon as it is whole, so that decompressing overlaps the
/// transfer.
struct HotDecoder {
    count: u64,
    head: Option<HotHeader>,
    /// Chunks decoded so far.
    done: usize,
    /// Bytes seen so far.
    seen: usize,
}

struct HotHeader {
    per: usize,
    indexes: Vec<u64>,
    parts: Vec<(u64, Vec<u8>)>,
    /// Where each chunk starts and ends in the blob.
    spans: Vec<(usize, usize)>,
    data: Vec<u8>,
    /// Each decoded page's blake3 (hashed as its chunk is decoded, while in the cache).
    hashes: Vec<[u8; 32]>,
}

impl HotDecoder {
    fn new(count: u64) -> Self {
        HotDecoder {
            count,
            head: None,
            done: 0,
            seen: 0,
        }
    }

    /// The header of `blob` (its first bytes), `None` while they are not all in.
    fn header(blob: &[u8], count: u64) -> Result<Option<HotHeader>, String> {
        let u64_at = |at: usize| -> Option<u64> {
            let b = blob.get(at..at.checked_add(8)?)?;
            Some(u64::from_le_bytes(b.try_into().unwrap()))
        };
        let Some(magic) = blob.get(..8) else {
            return Ok(None);
        };
        let with_parts = match magic {
            m if m == HOT_MAGIC => true,
            m if m == HOT_MAGIC_NO_PARTS => false,
            _ => return Err("it has no hot-pages magic (pushed by another version?)".into()),
        };
        let (Some(n), Some(per)) = (u64_at(8), u64_at(16)) else {
            return Ok(None);
        };
        if n > count.min(super::store::hot::MAX_HOT_PAGES as u64) || per == 0 || per > 1 << 16 {
            return Err(format!("implausible header ({n} pages, chunks of {per})"));
        }
        let (n, per) = (n as usize, per as usize);
        let mut at = 24;
        let mut parts = Vec::new();
        if with_parts {
            let Some(k) = u64_at(at) else {
                return Ok(None);
            };
            if k > INLINE_PARTS as u64 {
                return Err(format!(
                    "it carries {k} index parts, at most {INLINE_PARTS} are pushed"
                ));
            }
            let mut lens = Vec::with_capacity(k as usize);
            for j in 0..k as usize {
                let (Some(part), Some(len)) = (u64_at(at + 8 + 16 * j), u64_at(at + 16 + 16 * j))
                else {
                    return Ok(None);
                };
                lens.push((
                    part,
                    usize::try_from(len).map_err(|_| "a part is too long")?,
                ));
            }
            at += 8 + 16 * k as usize;
            let Some(packed) = u64_at(at) else {
                return Ok(None);
            };
            let packed = usize::try_from(packed).map_err(|_| "its parts are too long")?;
            let total = lens.iter().try_fold(0usize, |a, &(_, l)| a.checked_add(l));
            let total = total
                .filter(|&t| t <= packed.saturating_mul(255))
                .ok_or("its index parts' lengths are implausible")?;
            let Some(src) = blob.get(at + 8..).and_then(|b| b.get(..packed)) else {
                return Ok(None);
            };
            at += 8 + packed;
            let mut records = vec![0u8; total];
            if lz4_flex::block::decompress_into(src, &mut records).ok() != Some(total) {
                return Err("its index parts do not decompress".into());
            }
            let mut from = 0;
            for (part, len) in lens {
                parts.push((part, records[from..from + len].to_vec()));
                from += len;
            }
        }
        let chunks = n.div_ceil(per);
        let lens_at = at + n * 8;
        let data_at = lens_at + chunks * 4;
        if blob.len() < data_at {
            return Ok(None);
        }
        let indexes: Vec<u64> = blob[at..lens_at]
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        if indexes.windows(2).any(|w| w[0] >= w[1]) || indexes.last().is_some_and(|&i| i >= count) {
            return Err("its page indexes are not ascending page-table indexes".into());
        }
        let mut spans = Vec::with_capacity(chunks);
        let mut end = data_at;
        for l in blob[lens_at..data_at].chunks_exact(4) {
            let len = u32::from_le_bytes(l.try_into().unwrap()) as usize;
            spans.push((end, end + len));
            end += len;
        }
        Ok(Some(HotHeader {
            per,
            indexes,
            parts,
            spans,
            data: crate::buffers::zeroed(n * PAGE_SIZE),
            hashes: vec![[0; 32]; n],
        }))
    }

    /// Takes the blob's first bytes `blob` (all that came so far, a longer prefix at each
    /// call; a shorter one starts over) and decodes the chunks now whole in it, on up to
    /// `threads` threads.
    fn feed(&mut self, blob: &[u8], threads: usize) -> Result<(), String> {
        if blob.len() < self.seen {
            *self = HotDecoder::new(self.count);
        }
        self.seen = blob.len();
        if self.head.is_none() {
            self.head = Self::header(blob, self.count)?;
        }
        let Some(h) = &mut self.head else {
            return Ok(());
        };
        let whole = h.spans[self.done..]
            .iter()
            .take_while(|&&(_, end)| end <= blob.len())
            .count();
        if whole == 0 {
            return Ok(());
        }
        let chunk_bytes = h.per * PAGE_SIZE;
        let outs = h.data[self.done * chunk_bytes..].chunks_mut(chunk_bytes);
        let hashes = h.hashes[self.done * h.per..].chunks_mut(h.per);
        type Job<'a> = (&'a [u8], (&'a mut [u8], &'a mut [[u8; 32]]));
        let mut jobs: Vec<Job> = (h.spans[self.done..self.done + whole].iter())
            .map(|&(s, e)| &blob[s..e])
            .zip(outs.zip(hashes))
            .collect();
        let bad = |(src, (out, hashes)): Job| {
            if lz4_flex::block::decompress_into(src, out).map_or(true, |k| k != out.len()) {
                return true;
            }
            let pages: Vec<&[u8; PAGE_SIZE]> = (out.chunks_exact(PAGE_SIZE))
                .map(|p| p.try_into().unwrap())
                .collect();
            crate::store::page_hash::hash_pages(&pages, hashes);
            false
        };
        let per_thread = jobs.len().div_ceil(threads.max(1)).max(1);
        let bad = if jobs.len() <= per_thread {
            jobs.into_iter().any(bad)
        } else {
            std::thread::scope(|s| {
                let mut handles = Vec::new();
                while !jobs.is_empty() {
                    let mine: Vec<_> = jobs.drain(..per_thread.min(jobs.len())).collect();
                    handles.push(s.spawn(move || mine.into_iter().any(bad)));
                }
                handles.into_iter().fold(false, |acc, h| {
                    h.join().expect("hot chunk decoder panicked") | acc
                })
            })
        };
        if bad {
            return Err("a chunk of it does not decompress to its pages".into());
        }
        self.done += whole;
        Ok(())
    }

    /// The blob decoded, given it whole (what is left of it decoded on up to `threads`
    /// threads).
    fn finish(mut self, blob: &[u8], threads: usize) -> Result<HotBlob, String> {
        self.feed(blob, threads)?;
        let Some(h) = self.head else {
            return Err("it is truncated".into());
        };
        if self.done < h.spans.len() {
            return Err(if h.spans.last().is_some_and(|&(_, e)| e > blob.len()) {
                "its chunks overrun it".into()
            } else {
                "it is truncated".into()
            });
        }
        if h.spans.last().map_or(blob.len(), |&(_, e)| e) != blob.len() {
            return Err("bytes follow its last chunk".into());
        }
        Ok(HotBlob {
            indexes: h.indexes,
            data: h.data,
            hashes: h.hashes,
            parts: h.parts,
            stale: Vec::new(),
        })
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
    /// The base it was pushed against (its reference), if any.
    pub against: Option<String>,
}

impl PushReport {
    /// Counts blob `d` of the artifact (uploaded or not).
    fn count(&mut self, d: &Descriptor) {
        self.blobs += 1;
        self.bytes += d.size;
    }
}

/// Uploads `blob` unless the repository has it; returns its descriptor.
fn upload(
    c: &Client,
    media_type: &str,
    blob: &[u8],
    rep: &mut PushReport,
) -> Result<Descriptor, StoreError> {
    let d = Descriptor {
        media_type: media_type.into(),
        digest: client::sha256_digest(blob),
        size: blob.len() as u64,
    };
    rep.count(&d);
    if !c.has_blob(&d.digest)? {
        c.put_blob(&d.digest, blob)?;
        rep.blobs_uploaded += 1;
        rep.bytes_uploaded += d.size;
    }
    Ok(d)
}

/// Content-defined grouping of compressed pages into blocks.
///
/// Within a mapping, a block ends after a page whose hash says so ([`CUT_MODULUS`], once
/// it holds [`MIN_BLOCK_PAGES`]), so that a changed page costs the block around it and
/// the blocks after it are found again. The edges of a large mapping are where two
/// records of one app differ most: the kernel merges a mapping with its neighbour when it
/// can, so a few pages of data that does change can sit at either end of one that does
/// not. There blocks are small, so that such pages cost a small block, not a whole one:
/// from a large mapping's start a block ends at every *edge point* (a page whose hash is
/// 0 modulo [`EDGE_MODULUS`]) up to the first *near point* (modulo
/// [`NEAR_EDGE_MODULUS`]) at least [`EDGE_PAGES`] pages in; the mapping's last block is
/// split at its last near point at least [`EDGE_PAGES`] pages before the end and at every
/// edge point after it. (Counted from the mapping's edges, so that the pages that
/// change there do not move where the blocks of the rest end.)
struct Blocker {
    cur: Vec<u8>,
    cur_pages: u64,
    number: u32,
    seen: HashMap<[u8; 32], Location>,
    records: Vec<Record>,
    scratch: Vec<u8>,
    /// The current block belongs to a large mapping of this many pages...
    large: Option<u64>,
    /// ...of which this many are added...
    pos: u64,
    /// ...and its first blocks are still being cut at every edge point.
    leading: bool,
    /// The first record of the current block.
    first_record: usize,
    /// Where the current block is split if the mapping ends with it (bytes and pages
    /// before each point).
    tail: Vec<(usize, u64)>,
}

impl Blocker {
    /// A blocker whose first block is number `first` (the blocks before are a base's).
    fn new(first: u32) -> Self {
        Blocker {
            cur: Vec::with_capacity(MAX_BLOCK_BYTES + PAGE_SIZE),
            cur_pages: 0,
            number: first,
            seen: HashMap::new(),
            records: Vec::new(),
            scratch: vec![0; lz4_flex::block::get_maximum_output_size(PAGE_SIZE)],
            large: None,
            pos: 0,
            leading: false,
            first_record: 0,
            tail: Vec::new(),
        }
    }

    /// Adds a page; blocks it ends go to `out`. `region`: this page starts a mapping of
    /// that many stored pages. A large mapping (or one after a block of at least the
    /// minimum) starts a block of its own, so that the small mappings an app changes
    /// from one record to the next (stack, heap, libraries' data) never share blocks
    /// with the large ones it does not.
    fn add(&mut self, hash: [u8; 32], page: &[u8], region: Option<u64>, out: &mut Vec<Vec<u8>>) {
        if let Some(n) = region {
            if self.large.is_some() || n >= MIN_BLOCK_PAGES || self.cur_pages >= MIN_BLOCK_PAGES {
                self.end(out);
            }
            self.large = (n >= MIN_BLOCK_PAGES).then_some(n);
            self.leading = self.large.is_some();
            self.pos = 0;
        }
        self.pos += 1;
        if let Some(loc) = self.seen.get(&hash) {
            self.records.push(Record { hash, loc: *loc });
            return;
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
        let mut edge_cut = false;
        if let Some(len) = self.large.filter(|_| v % EDGE_MODULUS == 0) {
            let point = (self.cur.len(), self.cur_pages);
            let near = v % NEAR_EDGE_MODULUS == 0;
            if near && self.pos + EDGE_PAGES <= len {
                self.tail = vec![point];
            } else {
                self.tail.push(point);
            }
            edge_cut = self.leading;
            if near && self.pos > EDGE_PAGES {
                self.leading = false;
            }
        }
        if edge_cut
            || (self.cur_pages >= MIN_BLOCK_PAGES && v % CUT_MODULUS == 0)
            || self.cur.len() >= MAX_BLOCK_BYTES
        {
            out.extend(self.finish());
        }
    }

    /// Adds a page that a block before the blocker's first holds at `loc`.
    fn reuse(&mut self, hash: [u8; 32], loc: Location) {
        self.seen.entry(hash).or_insert(loc);
        self.records.push(Record { hash, loc });
    }

    /// Ends the current block (the last of a large mapping is split first).
    fn end(&mut self, out: &mut Vec<Vec<u8>>) {
        if self.large.is_some() {
            let points: Vec<(usize, u64)> = (self.tail.iter())
                .filter(|&&(_, p)| p < self.cur_pages)
                .copied()
                .collect();
            self.split(&points, out);
        }
        self.large = None;
        self.leading = false;
        out.extend(self.finish());
    }

    /// Ends a block at each of `points` (ascending, inside the current block): the
    /// records of the pages after a point move to the block that starts there.
    fn split(&mut self, points: &[(usize, u64)], out: &mut Vec<Vec<u8>>) {
        let Some(&(at, pages)) = points.first() else {
            return;
        };
        let (first, head) = (self.first_record, self.number);
        let tail = self.cur.split_off(at);
        let tail_pages = self.cur_pages - pages;
        self.cur_pages = pages;
        out.extend(self.finish());
        let moved = |loc: &mut Location| {
            if loc.pack == head && loc.offset >= at as u64 {
                loc.pack += 1;
                loc.offset -= at as u64;
            }
        };
        for r in &mut self.records[first..] {
            moved(&mut r.loc);
            if let Some(l) = self.seen.get_mut(&r.hash) {
                moved(l);
            }
        }
        self.first_record = first;
        self.cur = tail;
        self.cur_pages = tail_pages;
        let rest: Vec<(usize, u64)> = (points[1..].iter())
            .map(|&(b, p)| (b - at, p - pages))
            .collect();
        self.split(&rest, out);
    }

    fn finish(&mut self) -> Option<Vec<u8>> {
        self.tail.clear();
        self.first_record = self.records.len();
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

/// What a push against a base reuses of it: the artifact `r` names in the same
/// repository, pushed before (usually the tag being pushed again, after a re-record).
struct Base {
    head: Head,
    /// The bytes of each of its index parts' blobs (before its patches).
    raw: Vec<Vec<u8>>,
    /// Where each of its pages is: hash → location in its blocks.
    at: HashMap<[u8; 32], Location>,
    hot: Option<BaseHot>,
}

/// A base's hot-pages blob, decoded.
struct BaseHot {
    desc: Descriptor,
    blob: HotBlob,
    /// The index parts it carries (part number, bytes), taken out of `blob`.
    carried: Vec<(u64, Vec<u8>)>,
}

/// Loads the base `r` for a push: `None` if the registry has no such manifest; an error
/// if it has but it cannot be used (not a warmstart snapshot, damaged).
fn load_base(c: &Client, r: &Reference, threads: usize) -> Result<Option<Base>, StoreError> {
    let Some(index) = fetch_index_if_any(c, r)? else {
        return Ok(None);
    };
    let bad = |reason: String| StoreError::Registry {
        what: r.to_string(),
        reason,
    };
    let head_desc = (named(&index, HEAD_ANNOTATION, MT_HEAD).map_err(bad)?)
        .ok_or_else(|| bad("its OCI index names no head blob".into()))?;
    let head = read_head(c, &index, &head_desc, &bad)?;
    let raw: Vec<Mutex<Vec<u8>>> = head.parts.iter().map(|_| Mutex::default()).collect();
    let which: Vec<usize> = (0..head.parts.len()).collect();
    side_by_side(&which, PREFETCHERS, |k| {
        let d = &head.parts[k];
        *raw[k].lock().unwrap() = c.get_blob(&d.digest, d.size)?;
        Ok(())
    })?;
    let raw: Vec<Vec<u8>> = raw.into_iter().map(|m| m.into_inner().unwrap()).collect();
    // Checked as a run checks them: the parts against the head, each part (patched)
    // against its chaining value, every record inside the blocks.
    let damaged = |why: String| bad(format!("its index is damaged: {why}"));
    let table = TableMap::by_parts(head.count, head.per, head.pages_hash, head.cvs.clone())
        .map_err(damaged)?;
    for (k, bytes) in raw.iter().enumerate() {
        let merged = patched(bytes.clone(), head.patches.get(&(k as u64))).map_err(damaged)?;
        (table.fill_part(k, merged, |rec| record_fits(&head.blocks, rec))).map_err(damaged)?;
    }
    let mut at: HashMap<[u8; 32], Location> = (0..head.count)
        .map(|i| {
            let r = table.record(i);
            (r.hash, r.loc)
        })
        .collect();
    // Pages of its parts' blobs that its patches replaced are still in its blocks (the
    // blobs are a whole push's index, checked by their digests): a snapshot going back
    // to them uploads nothing for them.
    for rec in raw
        .iter()
        .flat_map(|b| b.chunks_exact(table::RECORD_SIZE).map(Record::read))
    {
        if record_fits(&head.blocks, &rec).is_ok() {
            at.entry(rec.hash).or_insert(rec.loc);
        }
    }
    let hot = match named(&index, HOT_ANNOTATION, MT_HOT).map_err(bad)? {
        Some(d) => {
            let blob = c.get_blob(&d.digest, d.size)?;
            let mut h = (HotDecoder::new(u64::MAX).finish(&blob, threads))
                .map_err(|e| bad(format!("its hot-pages blob is damaged: {e}")))?;
            let carried = h.take_parts();
            Some(BaseHot {
                desc: d,
                blob: h,
                carried,
            })
        }
        None => None,
    };
    Ok(Some(Base { head, raw, at, hot }))
}

/// Whether pushing `snap` (page hashes `hashes`) against `base` is worth it: most of its
/// pages are the base's, and the base blocks they are in are mostly theirs (else the
/// artifact would drag along blocks it barely uses: pushed whole instead).
fn worth_a_delta(base: &Base, hashes: &[[u8; 32]]) -> bool {
    let mut used = vec![false; base.head.blocks.len()];
    let mut new = 0usize;
    for h in hashes {
        match base.at.get(h) {
            Some(loc) => used[loc.pack as usize] = true,
            None => new += 1,
        }
    }
    let total: u64 = base.head.blocks.iter().map(|d| d.size).sum();
    let kept: u64 = (base.head.blocks.iter().zip(&used))
        .filter(|(_, &u)| u)
        .map(|(d, _)| d.size)
        .sum();
    new * 2 < hashes.len() && kept * 2 >= total
}

/// What a push goes against.
#[derive(Debug, Clone, Copy)]
pub enum PushBase<'a> {
    /// Nothing: the whole snapshot.
    None,
    /// This artifact if the registry has it (the tag pushed again); one that cannot be
    /// used gives a whole push, with a warning.
    IfThere(&'a Reference),
    /// This artifact, which must be there and usable.
    Named(&'a Reference),
}

/// Pushes `snap` to `r` (tag required); `progress(done, total)` after each window.
///
/// With `base` (an artifact of the same repository, usually `r` itself as pushed
/// before), pages the base has are not uploaded again: the artifact lists the base's
/// blocks before its own, its index parts are the base's blobs with the records that
/// differ carried in its head ([`Patches`]), and its hot pages are the base's blob,
/// with the pages that changed named stale. A base that is not there is no base; one
/// that cannot be used, or shares too little, gives a whole push (with a warning for
/// the first).
pub fn push(
    snap: &Snapshot,
    r: &Reference,
    base: PushBase,
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
    let (base, required) = match base {
        PushBase::None => (None, false),
        PushBase::IfThere(b) => (Some(b), false),
        PushBase::Named(b) => (Some(b), true),
    };
    if let Some(b) = base.filter(|b| (&b.registry, &b.repository) != (&r.registry, &r.repository)) {
        return Err(StoreError::Registry {
            what: r.to_string(),
            reason: format!(
                "the base {b} is in another repository: a push reuses blobs of its own \
                 repository only (name a tag or digest of {}/{})",
                r.registry, r.repository
            ),
        });
    }
    let c = Client::new(r, opts, true)?;
    let mut rep = PushReport {
        id: Some(snap.id),
        ..Default::default()
    };
    let n = snap.page_count();
    let hashes: Vec<[u8; 32]> = (0..n).map(|i| snap.page_hash(i)).collect();
    let base = match base.map(|b| (b, load_base(&c, b, threads))) {
        Some((b, Ok(None))) if required => {
            return Err(StoreError::Registry {
                what: b.to_string(),
                reason: "--base: the registry has no such manifest (push that first, or \
                         leave --base out)"
                    .into(),
            })
        }
        Some((_, Err(e))) if required => return Err(e),
        None | Some((_, Ok(None))) => None,
        Some((b, Err(e))) => {
            tracing::warn!("not pushing against {b}: {e}; pushing the whole snapshot");
            None
        }
        Some((b, Ok(Some(base)))) => Some(base)
            .filter(|base| worth_a_delta(base, &hashes))
            .inspect(|_| rep.against = Some(b.to_string())),
    };
    let regions = if base.is_some() {
        // New pages are few and scattered: blocks cut by content alone.
        HashMap::new()
    } else {
        regions(&snap.manifest)
    };
    let base_blocks = base.as_ref().map_or(&[][..], |b| &b.head.blocks[..]);
    let mut blocker = Blocker::new(base_blocks.len() as u32);
    let mut blocks = base_blocks.to_vec();
    base_blocks.iter().for_each(|d| rep.count(d));
    let mut done = Vec::new();
    let mut buf = vec![0u8; (PUSH_WINDOW.min(n.max(1)) as usize) * PAGE_SIZE];
    let mut at = 0;
    while at < n {
        let k = (n - at).min(PUSH_WINDOW);
        let out = &mut buf[..k as usize * PAGE_SIZE];
        snap.read_pages_parallel(at, k, out, threads)?;
        for (j, page) in out.chunks_exact(PAGE_SIZE).enumerate() {
            let i = at + j as u64;
            let hash = hashes[i as usize];
            match base.as_ref().and_then(|b| b.at.get(&hash)) {
                Some(loc) => blocker.reuse(hash, *loc),
                None => blocker.add(hash, page, regions.get(&i).copied(), &mut done),
            }
            for b in done.drain(..) {
                blocks.push(upload(&c, MT_BLOCK, &b, &mut rep)?);
            }
        }
        at += k;
        progress(at, n);
    }
    blocker.end(&mut done);
    for b in done.drain(..) {
        blocks.push(upload(&c, MT_BLOCK, &b, &mut rep)?);
    }
    let records = &blocker.records;
    let pages_hash = table::pages_hash(records.iter().map(|r| &r.hash));
    let per = INDEX_PART_RECORDS;
    let cvs = Parts::chaining_values(records, per);
    // Each part: the base's blob with its differing records patched if few differ,
    // else a blob of its own. `reference`: the bytes of each part's blob, which is what
    // a head or hot blob carries of it (the patches apply to either).
    let mut parts = Vec::with_capacity(cvs.len());
    let mut reference = Vec::with_capacity(cvs.len());
    let mut patches = Patches::new();
    for (k, chunk) in records.chunks(per as usize).enumerate() {
        let mut bytes = Vec::with_capacity(chunk.len() * table::RECORD_SIZE);
        for rec in chunk {
            rec.write_to(&mut bytes);
        }
        let same_size = base.as_ref().and_then(|b| {
            let raw = b.raw.get(k).filter(|raw| raw.len() == bytes.len())?;
            Some((raw, &b.head.parts[k]))
        });
        if let Some((raw, d)) = same_size {
            let differ: Vec<(u32, Vec<u8>)> = (raw.chunks_exact(table::RECORD_SIZE))
                .zip(bytes.chunks_exact(table::RECORD_SIZE))
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .map(|(slot, (_, b))| (slot as u32, b.to_vec()))
                .collect();
            if differ.len() * 4 <= chunk.len() {
                if !differ.is_empty() {
                    patches.insert(k as u64, differ);
                }
                rep.count(d);
                parts.push(d.clone());
                reference.push(raw.clone());
                continue;
            }
        }
        parts.push(upload(&c, MT_INDEX_PART, &bytes, &mut rep)?);
        reference.push(bytes);
    }
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
    let config_bytes = config;
    let config = upload(&c, MT_MANIFEST, &config_bytes, &mut rep)?;
    let working_set = snap.working_sets().map(|w| w.flatten()).unwrap_or_default();
    // The base's hot pages serve if most are still this snapshot's and every part they
    // carry is still the base's blob (patched).
    let mut stale_hot = Vec::new();
    let base_hot = base.as_ref().and_then(|b| b.hot.as_ref()).filter(
        |BaseHot {
             blob: h, carried, ..
         }| {
            let kept = carried.iter().all(|(k, bytes)| {
                let k = *k as usize;
                parts.get(k) == base.as_ref().and_then(|b| b.head.parts.get(k))
                    && reference.get(k) == Some(bytes)
            });
            stale_hot = (h.indexes.iter().zip(&h.hashes))
                .filter(|&(&i, hash)| i >= n || hashes[i as usize] != *hash)
                .map(|(&i, _)| i)
                .collect();
            kept && stale_hot.len() * 10 <= h.indexes.len()
        },
    );
    if base_hot.is_none() {
        stale_hot.clear();
    }
    let hot = match base_hot {
        Some(_) => None,
        None => snap.hot(threads).filter(|h| !h.is_empty()),
    };
    // The index parts a lazy run needs first (those of the working set and the hot
    // pages) go whole into the hot blob (the head blob if there is none), up to
    // INLINE_PARTS of them.
    let mut first: Vec<u64> = (working_set.iter())
        .chain(hot.as_ref().map(|h| h.indexes()).unwrap_or_default())
        .map(|&i| i / per)
        .filter(|&k| k < cvs.len() as u64)
        .collect();
    first.sort_unstable();
    first.dedup();
    first.truncate(INLINE_PARTS);
    let inline: Vec<(u64, Vec<u8>)> = (first.into_iter())
        .map(|k| (k, reference[k as usize].clone()))
        .collect();
    let (head_inline, hot_inline) = match (&hot, base_hot) {
        (Some(_), _) => (Vec::new(), inline),
        (None, Some(_)) => (Vec::new(), Vec::new()),
        (None, None) => (inline, Vec::new()),
    };
    let head = Head {
        count: records.len() as u64,
        per,
        pages_hash,
        cvs,
        parts: parts.clone(),
        blocks: blocks.clone(),
        working_set,
        inline: head_inline,
        config: config_bytes,
        patches,
        stale_hot,
    };
    let head_bytes = head.encode();
    let head_blob = upload(&c, MT_HEAD, &head_bytes, &mut rep)?;
    let mut layers = vec![head_blob];
    if let Some(hot) = hot {
        let blob = HotBlob::encode(hot.indexes(), hot.bytes(), &hot_inline);
        layers.push(upload(&c, MT_HOT, &blob, &mut rep)?);
    } else if let Some(BaseHot { desc, .. }) = base_hot {
        rep.count(desc);
        layers.push(desc.clone());
    }
    // The index names the head manifest's blobs too, so that a run fetches them at once,
    // and carries a small head blob whole.
    let id_note: std::collections::BTreeMap<String, String> =
        [(ID_ANNOTATION.to_owned(), snap.id.to_hex())].into();
    let mut index_note = id_note.clone();
    for (key, d) in [HEAD_ANNOTATION, HOT_ANNOTATION].into_iter().zip(&layers) {
        index_note.insert(key.to_owned(), format!("{}@{}", d.digest, d.size));
    }
    if head_bytes.len() <= HEAD_DATA_MAX {
        use base64::Engine;
        let data = base64::engine::general_purpose::STANDARD.encode(&head_bytes);
        index_note.insert(HEAD_DATA_ANNOTATION.to_owned(), data);
    }
    let head = ImageManifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.into()),
        artifact_type: Some(ARTIFACT_TYPE.into()),
        config,
        layers,
        annotations: id_note.clone(),
    };
    parts.extend(blocks);
    let blocks = parts;
    let empty = upload(&c, OCI_EMPTY, b"{}", &mut rep)?;
    let blocks = ImageManifest {
        schema_version: 2,
        media_type: Some(OCI_MANIFEST.into()),
        artifact_type: Some(BLOCKS_ARTIFACT.into()),
        config: empty,
        layers: blocks,
        annotations: id_note.clone(),
    };
    let mut manifests = Vec::new();
    for m in [&head, &blocks] {
        let bytes = serde_json::to_vec(m).expect("serializable");
        let digest = client::sha256_digest(&bytes);
        c.put_manifest(&digest, OCI_MANIFEST, &bytes)?;
        rep.bytes += bytes.len() as u64;
        rep.bytes_uploaded += bytes.len() as u64;
        manifests.push(Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest,
            size: bytes.len() as u64,
        });
    }
    let index = ImageIndex {
        schema_version: 2,
        media_type: Some(OCI_INDEX.into()),
        artifact_type: Some(ARTIFACT_TYPE.into()),
        manifests,
        annotations: index_note,
    };
    let bytes = serde_json::to_vec(&index).expect("serializable");
    c.put_manifest(tag, OCI_INDEX, &bytes)?;
    rep.manifest_digest = client::sha256_digest(&bytes);
    rep.bytes += bytes.len() as u64;
    rep.bytes_uploaded += bytes.len() as u64;
    Ok(rep)
}

/// A snapshot's artifact in a registry, its small blobs fetched and checked: the source
/// of pages for a lazy run or a pull. Blocks are fetched whole into `cache` (a pull,
/// background streaming) or by ranges for single faults.
pub struct Remote {
    client: Arc<Client>,
    reference: Reference,
    id: SnapshotId,
    pub(crate) blocks: Vec<Descriptor>,
    /// The index parts, by number (see [`Parts`]), and the records that replace some of
    /// their blobs' (an artifact pushed against a base).
    parts: Vec<Descriptor>,
    patches: Patches,
    /// Pages of its hot-pages blob (a base's) that are not the snapshot's.
    stale_hot: Vec<u64>,
    /// Blocks fetched whole (and checked), by number; a pull drops each after its last
    /// page is stored.
    cache: Mutex<Vec<Option<Arc<Vec<u8>>>>>,
    /// Buffers of blocks a pull is done with, to fetch the next ones into.
    spare: Mutex<Vec<Vec<u8>>>,
    working_set: Vec<u64>,
    /// A lazy run's hot pages and first pages, made ready at its first read.
    first: Option<FirstPages>,
    /// When the last page read (an instance's restore or fault) ended.
    last_read: Mutex<Option<Instant>>,
}

/// A background pull beside a lazy run starts once the instance has read no page for
/// this long (its restore and first work done)...
const PULL_QUIET: Duration = Duration::from_millis(50);
/// ...or after waiting this long.
const PULL_QUIET_AT_MOST: Duration = Duration::from_secs(2);

/// What a lazy run reads first: the hot pages (fetched and decoded in the background
/// from [`open`] on, while the restore builds the sandbox and the processes), and the
/// pages `first` (the working set and those the restore writes before the app
/// resumes). The first read waits for the hot pages, checks them against the page
/// table and fetches the blocks of the first pages they lack; reads on other threads
/// wait for that.
struct FirstPages {
    first: Vec<u64>,
    state: Mutex<HotState>,
    /// Blocks fetched beside the hot pages: those holding the new contents of the hot
    /// pages that are stale (an artifact pushed against a base names them, and its
    /// patched records where they are), which the first read would fetch only after
    /// the hot pages are in.
    early: Mutex<Vec<(usize, EarlyBlock)>>,
}

type EarlyBlock = std::thread::JoinHandle<Result<Vec<u8>, StoreError>>;

enum HotState {
    /// Fetching (`None`: the artifact has no hot pages).
    Pending(Option<std::thread::JoinHandle<Result<HotBlob, String>>>),
    /// Checked (`None`: none, or ignored).
    Ready(Option<Arc<HotBlob>>),
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "registry::Remote({})", self.reference)
    }
}

/// Marks a page read as the last one at its start and at its end (the guard's drop,
/// however the read ends).
struct ReadMark<'a>(&'a Mutex<Option<Instant>>);

impl<'a> ReadMark<'a> {
    fn start(last: &'a Mutex<Option<Instant>>) -> Self {
        *last.lock().unwrap() = Some(Instant::now());
        ReadMark(last)
    }
}

impl Drop for ReadMark<'_> {
    fn drop(&mut self) {
        *self.0.lock().unwrap() = Some(Instant::now());
    }
}

/// What [`open`] found: the artifact, or the snapshot it names in the local store.
pub(crate) enum Found {
    Registry(Box<Opened>),
    Stored(Box<Snapshot>),
}

/// An artifact opened: the snapshot's id, manifest, page table and its source.
pub(crate) struct Opened {
    pub id: SnapshotId,
    pub manifest: Manifest,
    pub table: TableMap,
    pub remote: Remote,
}

/// The id of the snapshot `r` names now, from its OCI index's annotation alone (one
/// request): enough to find the snapshot in a local store, where it is checked as any
/// local snapshot is (its id is its manifest's blake3).
pub fn resolve(r: &Reference, opts: &Options) -> Result<SnapshotId, StoreError> {
    let c = Client::new(r, opts, false)?;
    let index = fetch_index(&c, r)?;
    (index.annotations.get(ID_ANNOTATION))
        .and_then(|h| SnapshotId::from_hex(h))
        .ok_or_else(|| StoreError::Registry {
            what: r.to_string(),
            reason: "its OCI index names no snapshot id".into(),
        })
}

/// Fetches `r`'s OCI index and checks that it is a warmstart snapshot of this format.
fn fetch_index(c: &Client, r: &Reference) -> Result<ImageIndex, StoreError> {
    let accept = format!("{OCI_INDEX}, {OCI_MANIFEST}");
    let bytes = c.get_manifest(r.manifest_ref(), &accept)?;
    index_of(r, &bytes)
}

/// `r`'s OCI index (see [`fetch_index`]), `None` if the registry has no such manifest.
fn fetch_index_if_any(c: &Client, r: &Reference) -> Result<Option<ImageIndex>, StoreError> {
    let accept = format!("{OCI_INDEX}, {OCI_MANIFEST}");
    (c.get_manifest_if_any(r.manifest_ref(), &accept)?)
        .map(|bytes| index_of(r, &bytes))
        .transpose()
}

/// Parses manifest `bytes` of `r` as the OCI index of a warmstart snapshot.
fn index_of(r: &Reference, bytes: &[u8]) -> Result<ImageIndex, StoreError> {
    let bad = |reason: String| StoreError::Registry {
        what: r.to_string(),
        reason,
    };
    let top: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("its manifest is not JSON: {e}")))?;
    let kind = (top.get("mediaType").and_then(|v| v.as_str())).unwrap_or_default();
    let artifact = (top.get("artifactType").and_then(|v| v.as_str())).unwrap_or("none");
    if artifact != ARTIFACT_TYPE {
        return Err(bad(format!(
            "it is not a warmstart snapshot (artifactType {artifact}, expected {ARTIFACT_TYPE})"
        )));
    }
    if kind != OCI_INDEX {
        return Err(bad(
            "it was pushed by an older warmstart (one OCI manifest, not an index): push the \
             snapshot again with this warmstart"
                .into(),
        ));
    }
    serde_json::from_value(top).map_err(|e| bad(format!("its OCI index is damaged: {e}")))
}

/// The blob the OCI index's annotation `key` names (`DIGEST@SIZE`), if it has one.
/// (The index names the head manifest's blobs; the head manifest itself keeps them
/// referenced for the registry and for tools that copy artifacts.)
fn named(index: &ImageIndex, key: &str, media_type: &str) -> Result<Option<Descriptor>, String> {
    let Some(v) = index.annotations.get(key) else {
        return Ok(None);
    };
    let (digest, size) = (v.split_once('@'))
        .and_then(|(d, n)| Some((d, n.parse::<u64>().ok()?)))
        .filter(|(d, _)| d.starts_with("sha256:") && d.len() == 71)
        .ok_or_else(|| format!("its OCI index's annotation {key} is not DIGEST@SIZE"))?;
    Ok(Some(Descriptor {
        media_type: media_type.into(),
        digest: digest.into(),
        size,
    }))
}

/// The head blob `desc` of an artifact whose OCI index is `index`: carried in the index
/// (checked against `desc`) or fetched, and decoded.
fn read_head(
    c: &Client,
    index: &ImageIndex,
    desc: &Descriptor,
    bad: &dyn Fn(String) -> StoreError,
) -> Result<Head, StoreError> {
    let bytes = match index.annotations.get(HEAD_DATA_ANNOTATION) {
        Some(data) => {
            use base64::Engine;
            let b = (base64::engine::general_purpose::STANDARD.decode(data)).map_err(|e| {
                bad(format!(
                    "its OCI index's annotation {HEAD_DATA_ANNOTATION} is not base64: {e}"
                ))
            })?;
            if b.len() as u64 != desc.size || client::sha256_digest(&b) != desc.digest {
                return Err(bad(format!(
                    "the head blob its OCI index carries is not {}: refusing it",
                    desc.digest
                )));
            }
            b
        }
        None => c.get_blob(&desc.digest, desc.size)?,
    };
    Head::decode(&bytes).map_err(|e| bad(format!("its head blob is damaged: {e}")))
}

/// Fetches and checks `r`'s OCI index, and returns the snapshot it names from `local`
/// if that store has it. Else fetches and checks its head blob (the snapshot's manifest,
/// the index parts list, blocks, working set) and, for a lazy run (`lazy`: the pages a
/// restore writes eagerly), side by side its hot pages (a damaged blob is ignored with a
/// warning); a lazy run then fetches the index parts and blocks of the working set's,
/// the hot and the eager pages (see [`Remote::prefetch`]). Other parts come when pages
/// need them ([`pull_into`] fetches them all).
pub(crate) fn open(
    r: &Reference,
    opts: &Options,
    lazy: Option<&crate::store::snapshot::EagerPages>,
    local: Option<&Store>,
) -> Result<Found, StoreError> {
    let t0 = Instant::now();
    let c = Client::new(r, opts, false)?;
    let what = r.to_string();
    let bad = |reason: String| StoreError::Registry {
        what: what.clone(),
        reason,
    };
    let index = fetch_index(&c, r)?;
    let t_index = t0.elapsed();
    if let Some(store) = local {
        let id = index
            .annotations
            .get(ID_ANNOTATION)
            .and_then(|h| SnapshotId::from_hex(h));
        if let Some(snap) = id.and_then(|id| store.load_deferred(&id).ok()) {
            return Ok(Found::Stored(Box::new(snap)));
        }
    }
    let (Some(head_desc), Some(want)) = (
        named(&index, HEAD_ANNOTATION, MT_HEAD).map_err(bad)?,
        index.annotations.get(ID_ANNOTATION),
    ) else {
        return Err(bad(
            "its OCI index does not name its snapshot and head blob: a different format \
             version?"
                .into(),
        ));
    };
    let hot = named(&index, HOT_ANNOTATION, MT_HOT).map_err(bad)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let client = Arc::new(c);
    // A lazy run's hot pages are fetched and decoded in the background: the restore
    // starts as soon as the head blob is in, and its first read waits for them.
    let hot_fetch = hot.filter(|_| lazy.is_some()).map(|d| {
        let c = Arc::clone(&client);
        std::thread::spawn(move || {
            // Decoded as it comes (the decoder starts over if the transfer does), checked
            // against its digest once whole.
            let mut dec = HotDecoder::new(u64::MAX);
            let mut failed = None;
            let blob = c
                .get_blob_seen(&d.digest, d.size, Vec::new(), &mut |b| {
                    if b.is_empty() {
                        failed = None;
                    }
                    if failed.is_none() {
                        failed = dec.feed(b, 1).err();
                    }
                })
                .map_err(|e| e.to_string())?;
            let t_blob = t0.elapsed();
            let h = match failed {
                Some(why) => Err(why),
                None => dec.finish(&blob, threads),
            };
            tracing::debug!(
                "hot pages: {} bytes in at {t_blob:?}, decoded at {:?}",
                blob.len(),
                t0.elapsed()
            );
            h
        })
    });
    let (blocks, parts, working_set, table, config) = (|| {
        let head = read_head(&client, &index, &head_desc, &bad)?;
        let table = TableMap::by_parts(head.count, head.per, head.pages_hash, head.cvs.clone())
            .map_err(|e| bad(format!("its index is damaged: {e}")))?;
        let ws: Vec<u64> = (head.working_set.iter())
            .copied()
            .filter(|&p| p < head.count)
            .collect();
        fill_carried(&table, &head.blocks, &head.patches, head.inline)
            .map_err(|why| bad(format!("its index is damaged: {why}; refusing it")))?;
        let mut stale_hot = head.stale_hot;
        stale_hot.sort_unstable();
        Ok::<_, StoreError>((
            head.blocks,
            (head.parts, head.patches, stale_hot),
            ws,
            table,
            head.config,
        ))
    })()?;
    let (parts, patches, stale_hot) = parts;
    let t_head = t0.elapsed();
    let id = SnapshotId::of_manifest_bytes(&config);
    if want != &id.to_hex() {
        return Err(bad(format!(
            "its snapshot manifest hashes to {}, the annotation says {want}: refusing it",
            id.short()
        )));
    }
    let manifest: Manifest = crate::format::decode(&config).map_err(|e| {
        bad(format!(
            "snapshot {}: its manifest is damaged: {e}",
            id.short()
        ))
    })?;
    if table.len() != manifest.page_count || table.pages_hash() != manifest.pages_hash {
        return Err(bad(format!(
            "snapshot {}: its index belongs to different pages than its manifest: refusing it",
            id.short()
        )));
    }
    let first = lazy.map(|eager| {
        let mut first: Vec<u64> = (working_set.iter().copied())
            .chain(eager(&manifest))
            .filter(|&i| i < table.len())
            .collect();
        first.sort_unstable();
        first.dedup();
        let per = table.parts().1;
        let mut early: Vec<usize> = (stale_hot.iter())
            .filter_map(|&i| {
                let recs = patches.get(&(i / per))?;
                let (_, rec) = recs.iter().find(|(slot, _)| u64::from(*slot) == i % per)?;
                Some(Record::read(rec).loc.pack as usize)
            })
            .filter(|&b| b < blocks.len())
            .collect();
        early.sort_unstable();
        early.dedup();
        let early = (early.into_iter())
            .map(|b| {
                let (c, d) = (Arc::clone(&client), blocks[b].clone());
                (b, std::thread::spawn(move || c.get_blob(&d.digest, d.size)))
            })
            .collect();
        FirstPages {
            first,
            state: Mutex::new(HotState::Pending(hot_fetch)),
            early: Mutex::new(early),
        }
    });
    let remote = Remote {
        client,
        reference: r.clone(),
        id,
        cache: Mutex::new(vec![None; blocks.len()]),
        spare: Mutex::new(Vec::new()),
        blocks,
        parts,
        patches,
        stale_hot,
        working_set,
        first,
        last_read: Mutex::new(None),
    };
    // The index parts of the first pages come with the hot pages (see
    // `Remote::hot_pages`): the restore starts now.
    tracing::debug!(
        "{what}: opened in {:?} (index {t_index:?}, head {t_head:?})",
        t0.elapsed()
    );
    Ok(Found::Registry(Box::new(Opened {
        id,
        manifest,
        table,
        remote,
    })))
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

    /// Waits until the lazy run this source serves has read no page for [`PULL_QUIET`]
    /// (or for at most [`PULL_QUIET_AT_MOST`], or until the run is over), so that work
    /// in the background (a pull into the store, which keeps the registry busy too) does
    /// not slow down the restore and the instance's first work. Nothing to wait for
    /// without a lazy run.
    fn wait_quiet(&self) {
        if self.first.is_none() {
            return;
        }
        let t0 = Instant::now();
        loop {
            let since = (*self.last_read.lock().unwrap()).map_or(Duration::ZERO, |t| t.elapsed());
            if since >= PULL_QUIET
                || t0.elapsed() >= PULL_QUIET_AT_MOST
                || self.client.is_abandoned()
            {
                return;
            }
            std::thread::sleep((PULL_QUIET - since).min(Duration::from_millis(10)));
        }
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
        // A spare buffer that holds the block (else the largest): growing one maps
        // fresh memory again.
        let buf = {
            let mut spare = self.spare.lock().unwrap();
            let fits = (spare.iter()).position(|b| b.capacity() as u64 >= d.size);
            let largest = (0..spare.len()).max_by_key(|&k| spare[k].capacity());
            fits.or(largest)
                .map(|k| spare.swap_remove(k))
                .unwrap_or_default()
        };
        let b = Arc::new(self.client.get_blob_into(&d.digest, d.size, buf)?);
        Ok(self.cache.lock().unwrap()[n].get_or_insert(b).clone())
    }

    /// Drops block `n` from the cache, keeping its buffer for the next block fetched.
    fn drop_block(&self, n: usize) {
        let b = self.cache.lock().unwrap()[n].take();
        if let Some(buf) = b.and_then(|b| Arc::try_unwrap(b).ok()) {
            let mut spare = self.spare.lock().unwrap();
            if spare.len() < PULL_AHEAD {
                spare.push(buf);
            }
        }
    }

    /// The hot pages of a lazy run, ready: the first call waits for their fetch, checks
    /// them against `table` (ignoring them, with a warning, if they do not hold) and
    /// fetches whole, on [`PREFETCHERS`] connections side by side, the blocks holding
    /// the first pages (see [`FirstPages`]) that they lack; other callers wait for it.
    fn hot_pages(&self, table: &TableMap) -> Result<Option<Arc<HotBlob>>, StoreError> {
        let Some(f) = &self.first else {
            return Ok(None);
        };
        let mut state = f.state.lock().unwrap();
        let fetch = match &mut *state {
            HotState::Ready(h) => return Ok(h.clone()),
            HotState::Pending(fetch) => fetch.take(),
        };
        // Whatever happens below, later reads do not wait again.
        *state = HotState::Ready(None);
        let t0 = Instant::now();
        let what = self.what();
        let ignore = |why: String| {
            tracing::warn!(
                "{what}: ignoring its hot pages ({why}); fetching the blocks of those pages"
            )
        };
        let fetched = fetch.map(|j| j.join().expect("hot pages fetch panicked"));
        // A block fetched early that failed is fetched again below if it is needed.
        for (b, j) in std::mem::take(&mut *f.early.lock().unwrap()) {
            if let Ok(bytes) = j.join().expect("early block fetch panicked") {
                self.cache.lock().unwrap()[b].get_or_insert(Arc::new(bytes));
            }
        }
        let t_fetched = t0.elapsed();
        let hot = match fetched {
            None => None,
            Some(Err(why)) => {
                ignore(why);
                None
            }
            Some(Ok(mut h)) => {
                h.forget(&self.stale_hot);
                let live = h.live();
                let filled = if live.last().is_some_and(|&i| i >= table.len()) {
                    Err("its page indexes are beyond the snapshot's".into())
                } else {
                    fill_carried(table, &self.blocks, &self.patches, h.take_parts())
                };
                match filled.and_then(|()| {
                    (self.ensure_parts(table, &live)).map_err(|e| e.to_string())?;
                    h.check(table)
                }) {
                    Ok(()) => Some(Arc::new(h)),
                    Err(why) => {
                        ignore(why);
                        None
                    }
                }
            }
        };
        self.ensure_parts(table, &f.first)?;
        let mut want: Vec<usize> = (f.first.iter())
            .filter(|&&i| hot.as_ref().is_none_or(|h| h.page(i).is_none()))
            .map(|&i| table.record(i).loc.pack as usize)
            .filter(|&b| b < self.blocks.len())
            .collect();
        want.sort_unstable();
        want.dedup();
        self.fetch(&want, PREFETCHERS)?;
        tracing::debug!(
            "{what}: first pages ready after {:?} (hot pages waited for {t_fetched:?}, {} \
             blocks fetched)",
            t0.elapsed(),
            want.len()
        );
        *state = HotState::Ready(hot.clone());
        Ok(hot)
    }

    /// Fetches (side by side, each checked) the parts of `table` that hold records
    /// `indexes` and are not in yet; a lazy run first waits for its hot pages, which
    /// carry the parts it needs first.
    pub(crate) fn ensure(&self, table: &TableMap, indexes: &[u64]) -> Result<(), StoreError> {
        self.hot_pages(table)?;
        self.ensure_parts(table, indexes)
    }

    fn ensure_parts(&self, table: &TableMap, indexes: &[u64]) -> Result<(), StoreError> {
        let missing = table.missing_parts(indexes.iter().copied());
        self.fetch_parts(table, &missing)
    }

    /// Fetches every part of `table` not in yet.
    pub(crate) fn ensure_all(&self, table: &TableMap) -> Result<(), StoreError> {
        self.hot_pages(table)?;
        let (parts, per) = table.parts();
        let missing = table.missing_parts((0..parts as u64).map(|k| k * per));
        self.fetch_parts(table, &missing)
    }

    fn fetch_parts(&self, table: &TableMap, which: &[usize]) -> Result<(), StoreError> {
        fill_parts(
            &self.client,
            &self.blocks,
            &self.parts,
            &self.patches,
            table,
            which,
            &|why| StoreError::Registry {
                what: self.what(),
                reason: format!(
                    "snapshot {}: its index is damaged: {why}; refusing it",
                    self.id.short()
                ),
            },
        )
    }

    fn fetch(&self, which: &[usize], threads: usize) -> Result<(), StoreError> {
        side_by_side(which, threads, |n| self.block(n).map(drop))
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
        let hot = self.hot_pages(table)?;
        self.ensure(table, indexes)?;
        let _reading = ReadMark::start(&self.last_read);
        let mut reader = BlockReader::default();
        let mut want = Vec::new();
        let mut k = 0;
        while k < indexes.len() {
            if let Some(page) = hot.as_ref().and_then(|h| h.page(indexes[k])) {
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

/// Whether index record `rec` points inside `blocks` (one page, whole).
fn record_fits(blocks: &[Descriptor], rec: &Record) -> Result<(), String> {
    let l = rec.loc;
    let ok = (l.pack as usize) < blocks.len()
        && l.offset + u64::from(l.len) <= blocks[l.pack as usize].size
        && l.pages == 1
        && l.slot == 0;
    ok.then_some(())
        .ok_or_else(|| "it points outside the snapshot's blocks".to_owned())
}

/// Fills into `table` the index parts a head or hot blob carries whole (part number,
/// records), each checked as a fetched one is (chaining value, every record pointing
/// inside `blocks`).
fn fill_carried(
    table: &TableMap,
    blocks: &[Descriptor],
    patches: &Patches,
    parts: Vec<(u64, Vec<u8>)>,
) -> Result<(), String> {
    let count = table.parts().0;
    parts.into_iter().try_for_each(|(k, records)| {
        let records = patched(records, patches.get(&k))?;
        let k = usize::try_from(k)
            .ok()
            .filter(|&k| k < count)
            .ok_or_else(|| format!("it carries index part {k} of {count}"))?;
        table.fill_part(k, records, |rec| record_fits(blocks, rec))
    })
}

/// Fetches index parts `which` (side by side), checks them (digest, chaining value,
/// every record pointing inside `blocks`) and fills them into `table`.
fn fill_parts(
    client: &Client,
    blocks: &[Descriptor],
    parts: &[Descriptor],
    patches: &Patches,
    table: &TableMap,
    which: &[usize],
    damaged: &(dyn Fn(String) -> StoreError + Sync),
) -> Result<(), StoreError> {
    let fits = |rec: &Record| record_fits(blocks, rec);
    side_by_side(which, PREFETCHERS, |k| {
        let d = &parts[k];
        let bytes = client.get_blob(&d.digest, d.size)?;
        let bytes = patched(bytes, patches.get(&(k as u64))).map_err(damaged)?;
        table.fill_part(k, bytes, fits).map_err(damaged)
    })
}

/// Runs `f` on every item of `which` on up to `threads` threads side by side (each
/// taking the next item when done), stopping at the first error; one item runs here.
fn side_by_side(
    which: &[usize],
    threads: usize,
    f: impl Fn(usize) -> Result<(), StoreError> + Sync,
) -> Result<(), StoreError> {
    match which {
        [] => Ok(()),
        [k] => f(*k),
        _ => {
            let next = std::sync::atomic::AtomicUsize::new(0);
            std::thread::scope(|s| {
                let jobs: Vec<_> = (0..threads.clamp(1, which.len()))
                    .map(|_| {
                        s.spawn(|| loop {
                            let at = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(&k) = which.get(at) else {
                                return Ok(());
                            };
                            f(k)?;
                        })
                    })
                    .collect();
                jobs.into_iter()
                    .try_for_each(|j| j.join().expect("registry fetcher panicked"))
            })
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
    /// The blocks the pages use, in the order of their first use (an artifact pushed
    /// against a base lists blocks it does not use, and its own new blocks last), and
    /// each block's place in it.
    order: Vec<usize>,
    place: Vec<usize>,
    /// Next place in `order` to fetch.
    next: usize,
    /// Places below this are wanted now; fetchers stay under `wanted + PULL_AHEAD`.
    wanted: usize,
    /// Fetchers still running.
    active: usize,
    failed: Option<StoreError>,
    stop: bool,
}

/// One fetcher of [`pull_into`]: fetches the next block in order while it is within
/// [`PULL_AHEAD`] of what the storing side wants.
fn fetch_blocks(remote: &Remote, feed: &Mutex<Feed>, ready: &Condvar) {
    loop {
        let k = {
            let mut f = feed.lock().unwrap();
            loop {
                if f.stop || f.failed.is_some() || f.next >= f.order.len() {
                    f.active -= 1;
                    ready.notify_all();
                    return;
                }
                if f.next < f.wanted + PULL_AHEAD {
                    f.next += 1;
                    break f.order[f.next - 1];
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
    // Beside a lazy run: not before its first pages are in (the hot pages and the
    // blocks its restore needs first) and it has done its first work, so as not to
    // compete with them.
    remote.hot_pages(table)?;
    remote.wait_quiet();
    remote.ensure_all(table)?;
    let n = snap.page_count();
    // The last page of each block: after it is stored, the block is not needed again.
    let mut last_use = vec![0u64; remote.blocks.len()];
    let mut order = Vec::new();
    let mut place = vec![usize::MAX; remote.blocks.len()];
    for i in 0..n {
        let b = table.record(i).loc.pack as usize;
        last_use[b] = i;
        if place[b] == usize::MAX {
            place[b] = order.len();
            order.push(b);
        }
    }
    let fetchers = fetchers.max(1);
    let used_bytes = order.iter().map(|&b| remote.blocks[b].size).sum();
    let feed = Mutex::new(Feed {
        order,
        place,
        next: 0,
        wanted: 0,
        active: fetchers,
        failed: None,
        stop: false,
    });
    let ready = Condvar::new();
    let mut rep = PullReport {
        bytes: used_bytes,
        ..Default::default()
    };
    let zero_hash = *blake3::hash(&[0u8; PAGE_SIZE]).as_bytes();
    let id = std::thread::scope(|s| {
        for _ in 0..fetchers {
            s.spawn(|| fetch_blocks(remote, &feed, &ready));
        }
        let res = (|| {
            // A pull's pages go past the page cache (no process reads them right
            // away); a lazy run's go through it, for the runs that follow.
            let mut w = if keep {
                store.writer()?
            } else {
                store.writer_past_cache()?
            };
            let mut runs = Vec::new();
            let mut buf = vec![0u8; (PULL_WINDOW.min(n.max(1)) as usize) * PAGE_SIZE];
            let mut hashes = Vec::new();
            let mut raw = Vec::new();
            let mut need = Vec::new();
            let mut at = 0;
            while at < n {
                let k = (n - at).min(PULL_WINDOW);
                need.clear();
                hashes.clear();
                raw.clear();
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
                    // A page the push could not compress is stored without trying.
                    raw.push(rec.loc.codec == CODEC_RAW);
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
                w.add_verified_pages_hinted(at, out, &hashes, &raw, &mut runs)?;
                at += k;
                if !keep {
                    for &b in need.iter().filter(|&&b| last_use[b] < at) {
                        remote.drop_block(b);
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

/// Waits until every block of `need` is fetched, letting the fetchers run
/// ahead of the last one; fetches a block itself if no fetcher is left to.
fn wait_for_blocks(
    remote: &Remote,
    feed: &Mutex<Feed>,
    ready: &Condvar,
    need: &[usize],
) -> Result<(), StoreError> {
    let mut f = feed.lock().unwrap();
    let Some(last) = need.iter().map(|&b| f.place[b]).max() else {
        return Ok(());
    };
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
        let seeds: Vec<u64> = seeds.collect();
        blocked(&[(false, seeds)]).0
    }

    /// The digests of the blocks of mappings of pages `page(seed)` (`true`: the mapping
    /// is announced as a region, as `push` does for every mapping), after checking
    /// that every record locates its page in its block.
    fn blocked(maps: &[(bool, Vec<u64>)]) -> (Vec<String>, Vec<usize>) {
        let mut b = Blocker::new(0);
        let mut out = Vec::new();
        let mut pages = Vec::new();
        for (region, seeds) in maps {
            for (k, &s) in seeds.iter().enumerate() {
                let p = page(s);
                let start = (*region && k == 0).then_some(seeds.len() as u64);
                b.add(*blake3::hash(&p).as_bytes(), &p, start, &mut out);
                pages.push(p);
            }
        }
        b.end(&mut out);
        assert_eq!(b.records.len(), pages.len());
        for (r, p) in b.records.iter().zip(&pages) {
            let blk = &out[r.loc.pack as usize];
            let bytes = &blk[r.loc.offset as usize..][..r.loc.len as usize];
            let got = match r.loc.codec {
                CODEC_RAW => bytes.to_vec(),
                _ => lz4_flex::block::decompress(bytes, PAGE_SIZE).unwrap(),
            };
            assert_eq!(&got, p, "record {:?}", r.loc);
        }
        let mut pages = vec![0; out.len()];
        let mut once = std::collections::HashSet::new();
        for r in b.records.iter().filter(|r| once.insert(r.hash)) {
            pages[r.loc.pack as usize] += 1;
        }
        (
            out.iter().map(|b| client::sha256_digest(b)).collect(),
            pages,
        )
    }

    /// Pages in the blocks of `b` that `a` lacks.
    fn new_pages(a: &(Vec<String>, Vec<usize>), b: &(Vec<String>, Vec<usize>)) -> usize {
        (b.0.iter().zip(&b.1))
            .filter(|(d, _)| !a.0.contains(d))
            .map(|(_, n)| n)
            .sum()
    }

    /// A large mapping that the kernel merged with a few pages of another one (which
    /// differ from one record to the next) at either end costs small blocks, not one
    /// of the large ones; so do pages at its edges that differ from one record to the
    /// next, whatever their hashes.
    #[test]
    fn pages_merged_onto_a_large_mapping_cost_small_blocks() {
        let big: Vec<u64> = (1000..5_000).collect();
        let small = |s: u64| (s..s + 5).collect::<Vec<u64>>();
        let of = |big: Vec<u64>| blocked(&[(true, small(0)), (true, big), (true, small(100))]);
        let base = of(big.clone());
        let total: usize = base.1.iter().sum();
        let limit = 600;
        for (k, salt) in [
            (1u64, 7u64),
            (2, 40_000),
            (3, 50_000),
            (8, 70_000),
            (17, 90_000),
        ] {
            let extra: Vec<u64> = (salt..salt + k).collect();
            for merged in [
                [big.clone(), extra.clone()].concat(),
                [extra, big.clone()].concat(),
            ] {
                let new = new_pages(&base, &of(merged));
                assert!(
                    new <= limit,
                    "{k} pages merged: {new} pages in new blocks of {total}"
                );
            }
        }
        let mut worst = 0;
        for salt in 0..100u64 {
            let mut edges = big.clone();
            edges[0] = 1_000_000 + salt;
            *edges.last_mut().unwrap() = 2_000_000 + salt;
            worst = worst.max(new_pages(&base, &of(edges)));
        }
        assert!(
            worst <= 2 * EDGE_PAGES as usize,
            "edge pages changed: {worst} pages in new blocks"
        );
        // A re-record of the same content has exactly the same blocks.
        assert_eq!(of(big), base);
    }

    /// A whole page table of `records`.
    /// A page table of `pages` (their hashes; no locations).
    fn table_of_pages(pages: &[Vec<u8>]) -> TableMap {
        let records: Vec<Record> = (pages.iter())
            .map(|p| Record {
                hash: *blake3::hash(p).as_bytes(),
                loc: Location::default(),
            })
            .collect();
        table_of(&records)
    }

    fn table_of(records: &[Record]) -> TableMap {
        let ph = table::pages_hash(records.iter().map(|r| &r.hash));
        TableMap::from_bytes(
            table::encode(table::TABLE_MAGIC, ph, records),
            table::TABLE_MAGIC,
        )
        .unwrap()
    }

    #[test]
    fn hot_blob_of_many_chunks_decodes_on_every_thread_count() {
        let n = 3 * HOT_CHUNK_PAGES as u64 + 5;
        let pages: Vec<Vec<u8>> = (0..n).map(page).collect();
        let table = table_of_pages(&pages);
        let idx: Vec<u64> = (0..n).collect();
        let bytes = pages.concat();
        let blob = HotBlob::encode(&idx, &bytes, &[]);
        for threads in [1, 2, 3, 8] {
            let hot = HotBlob::decode(&blob, &table, threads).unwrap();
            assert_eq!(hot.data, bytes);
        }
        // A chunk's compressed length off by one is refused.
        let no_parts = 16 + lz4_flex::block::compress(&[]).len();
        let lens_at = 24 + no_parts + idx.len() * 8;
        let mut bad = blob.clone();
        bad[lens_at] = bad[lens_at].wrapping_add(1);
        assert!(HotBlob::decode(&bad, &table, 2).is_err());
        // A byte of the last chunk changed: it does not decompress, or a page mismatches.
        let mut bad = blob;
        let last = bad.len() - 9;
        bad[last] ^= 0x5a;
        assert!(HotBlob::decode(&bad, &table, 2).is_err());
    }

    /// The index parts a hot blob carries come back whole; the blob decodes the same
    /// fed as it comes, in pieces of any size, starting over after a retry; a blob of
    /// the format before (no parts) is read; implausible part lengths are refused.
    #[test]
    fn hot_blob_carries_index_parts_and_decodes_as_it_comes() {
        let n = 2 * HOT_CHUNK_PAGES as u64 + 3;
        let idx: Vec<u64> = (0..n).map(|i| 2 * i).collect();
        let bytes: Vec<u8> = idx.iter().flat_map(|&i| page(i)).collect();
        let parts = vec![
            (0u64, vec![7u8; 56 * 20]),
            (3, (0..56 * 9).map(|b| b as u8).collect()),
        ];
        let blob = HotBlob::encode(&idx, &bytes, &parts);
        for step in [1000, 4096 + 7, 100_000, blob.len()] {
            let mut d = HotDecoder::new(u64::MAX);
            let mut at = 0;
            while at < blob.len() {
                at = (at + step).min(blob.len());
                d.feed(&blob[..at], 1).unwrap();
            }
            let mut hot = d.finish(&blob, 2).unwrap();
            assert_eq!(hot.data, bytes, "fed {step} bytes at a time");
            assert_eq!(hot.indexes, idx);
            assert_eq!(hot.take_parts(), parts);
        }
        // A transfer that starts over: the decoder does too.
        let mut d = HotDecoder::new(u64::MAX);
        d.feed(&blob[..blob.len() * 2 / 3], 1).unwrap();
        d.feed(&blob[..10], 1).unwrap();
        let hot = d.finish(&blob, 1).unwrap();
        assert_eq!(hot.data, bytes);
        // The format before: no parts section.
        let plain = HotBlob::encode(&idx, &bytes, &[]);
        let mut old = HOT_MAGIC_NO_PARTS.to_vec();
        old.extend_from_slice(&plain[8..24]);
        old.extend_from_slice(&plain[24 + 16 + lz4_flex::block::compress(&[]).len()..]);
        let mut hot = HotDecoder::new(u64::MAX).finish(&old, 2).unwrap();
        assert_eq!(hot.data, bytes);
        assert!(hot.take_parts().is_empty());
        // A part claiming more bytes than its compressed records can hold.
        let mut bad = blob.clone();
        bad[40..48].copy_from_slice(&(u64::MAX / 4).to_le_bytes());
        let err = HotDecoder::new(u64::MAX).finish(&bad, 1).err().unwrap();
        assert!(err.contains("implausible"), "{err}");
        // More parts than a push writes.
        let mut bad = blob;
        bad[24..32].copy_from_slice(&(INLINE_PARTS as u64 + 1).to_le_bytes());
        assert!(HotDecoder::new(u64::MAX).finish(&bad, 1).is_err());
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
        let table = table_of(&records);
        let idx = [1u64, 2, 6];
        let bytes: Vec<u8> = idx
            .iter()
            .flat_map(|&i| pages[i as usize].clone())
            .collect();
        let blob = HotBlob::encode(&idx, &bytes, &[]);
        let hot = HotBlob::decode(&blob, &table, 2).unwrap();
        assert_eq!(hot.page(6).unwrap(), &pages[6][..]);
        assert_eq!(hot.page(2).unwrap(), &pages[2][..]);
        assert!(hot.page(3).is_none());
        // Page 6's bytes given as page 5's.
        let err = HotBlob::decode(&HotBlob::encode(&[1, 2, 5], &bytes, &[]), &table, 2)
            .err()
            .unwrap();
        assert!(err.contains("page 5"), "{err}");
        let err = HotBlob::decode(&HotBlob::encode(&[2, 1, 6], &bytes, &[]), &table, 1)
            .err()
            .unwrap();
        assert!(err.contains("ascending"), "{err}");
        let err = HotBlob::decode(&HotBlob::encode(&[1, 2, 60], &bytes, &[]), &table, 1)
            .err()
            .unwrap();
        assert!(err.contains("ascending"), "{err}");
        // A claimed count larger than the snapshot's pages is refused before allocating.
        let mut huge = blob.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(HotBlob::decode(&huge, &table, 1).is_err());
        let mut longer = blob.clone();
        longer.push(0);
        assert!(HotBlob::decode(&longer, &table, 1).is_err());
        assert!(HotBlob::decode(&blob[..3], &table, 1).is_err());
        assert!(HotBlob::decode(&blob[..blob.len() / 2], &table, 1).is_err());
    }

    /// Content-defined blocks: a change in the middle leaves the blocks before and
    /// after it alone.
    #[test]
    fn head_blob_round_trips_and_refuses_damage() {
        let desc = |k: u8, mt: &str| Descriptor {
            media_type: mt.into(),
            digest: client::sha256_digest(&[k]),
            size: 1000 + u64::from(k),
        };
        let head = Head {
            count: 10_000,
            per: 8192,
            pages_hash: [3; 32],
            cvs: vec![[7; 32], [9; 32]],
            parts: vec![desc(1, MT_INDEX_PART), desc(2, MT_INDEX_PART)],
            blocks: (10..15).map(|k| desc(k, MT_BLOCK)).collect(),
            working_set: vec![4, 5, 9_999],
            inline: vec![(1, vec![1, 2, 3]), (0, Vec::new())],
            config: b"manifest".to_vec(),
            patches: Patches::new(),
            stale_hot: Vec::new(),
        };
        let packed = head.encode();
        assert!(
            packed.starts_with(HEAD_MAGIC),
            "a whole push's head is as before"
        );
        assert_eq!(Head::decode(&packed).unwrap(), head);
        // The body as pushed before it was compressed is read the same.
        let mut b = HEAD_MAGIC_RAW.to_vec();
        b.extend(lz4_flex::block::decompress_size_prepended(&packed[8..]).unwrap());
        assert_eq!(Head::decode(&b).unwrap(), head);
        for blob in [&packed, &b] {
            for cut in [0, 8, 11, 50, blob.len() - 1] {
                assert!(Head::decode(&blob[..cut]).is_err(), "cut at {cut}");
            }
            let mut longer = blob.clone();
            longer.push(0);
            assert!(Head::decode(&longer).is_err());
            let mut wrong = blob.clone();
            wrong[0] ^= 1;
            assert!(Head::decode(&wrong).is_err());
        }
        // A compressed body claiming more than lz4 can expand it to is refused before
        // anything is allocated.
        let mut claims = packed.clone();
        claims[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Head::decode(&claims).is_err());
        // A count larger than what follows is refused before anything is allocated.
        let mut huge = b;
        huge[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Head::decode(&huge).is_err());
    }

    /// The head of a push against a base: its patches and stale hot pages round trip
    /// (`WSHEAD03`, which warmstarts before it refuse by name), and a patch is applied
    /// to a part's bytes, refused past their end.
    #[test]
    fn delta_head_round_trips_and_patches_apply() {
        let rec = |x: u8| vec![x; table::RECORD_SIZE];
        let mut patches = Patches::new();
        patches.insert(1, vec![(0, rec(5)), (3, rec(6))]);
        let head = Head {
            count: 3000,
            per: 2048,
            pages_hash: [1; 32],
            cvs: vec![[2; 32], [4; 32]],
            parts: (1..3)
                .map(|k| Descriptor {
                    media_type: MT_INDEX_PART.into(),
                    digest: client::sha256_digest(&[k]),
                    size: 100,
                })
                .collect(),
            blocks: Vec::new(),
            working_set: Vec::new(),
            inline: Vec::new(),
            config: b"m".to_vec(),
            patches,
            stale_hot: vec![7, 2999],
        };
        let packed = head.encode();
        assert!(packed.starts_with(HEAD_MAGIC_DELTA));
        assert_eq!(Head::decode(&packed).unwrap(), head);
        for cut in [packed.len() - 1, packed.len() - 9] {
            assert!(Head::decode(&packed[..cut]).is_err());
        }
        let part: Vec<u8> = (0..4).flat_map(|_| rec(0)).collect();
        let got = patched(part.clone(), head.patches.get(&1)).unwrap();
        let want: Vec<u8> = [rec(5), rec(0), rec(0), rec(6)].concat();
        assert_eq!(got, want);
        assert_eq!(patched(part.clone(), None).unwrap(), part);
        assert!(patched(
            part[..3 * table::RECORD_SIZE].to_vec(),
            head.patches.get(&1)
        )
        .is_err());
    }

    /// A hot blob whose pages changed since (a base's): those named stale are neither
    /// served nor checked; any other page that does not match is still refused.
    #[test]
    fn stale_hot_pages_are_left_out() {
        let pages: Vec<Vec<u8>> = (1..=3).map(page).collect();
        let table = table_of_pages(&pages);
        let mut changed = pages.clone();
        changed[1] = page(99);
        let blob = HotBlob::encode(&[0, 1, 2], &changed.concat(), &[]);
        let mut h = HotDecoder::new(3).finish(&blob, 1).unwrap();
        assert!(h.check(&table).is_err(), "page 1 does not match");
        h.forget(&[1]);
        h.check(&table).unwrap();
        assert_eq!(h.live(), vec![0, 2]);
        assert!(h.page(1).is_none());
        assert_eq!(h.page(2).unwrap(), &pages[2][..]);
        h.forget(&[0]);
        assert!(h.check(&table).is_err(), "page 1 is not stale any more");
    }

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
