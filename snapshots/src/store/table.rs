//! Fixed-size page records and the two files made of them: a snapshot's page table
//! (`snapshots/<id>.pages`, in table order) and a sealed pack's index
//! (`packs/pack-N.idx`, sorted by hash, used by writers to deduplicate).
//!
//! ```text
//!   0 +---------------------------------------------+
//!     | magic "WARMPTBL" (table) / "WARMPIDX" (idx) |
//!   8 | version u32 | record size u32 (= 56)        |
//!  16 | record count u64                            |
//!  24 | pages_hash: blake3 of all record hashes  32 |  (zero in an idx)
//!  56 | reserved 8 (zero)                           |
//!  64 | checksum: blake3(bytes 0..64 ++ records) 32 |
//!  96 +---------------------------------------------+
//!     | record 0 | record 1 | ...   56 bytes each   |
//!     +---------------------------------------------+
//!
//! record:  0 hash 32 | 32 block offset u64 | 40 pack u32 | 44 block length u32 |
//!         48 slot u8 | 49 pages in block u8 | 50 codec u8 | 51 reserved 5
//! ```
//! All integers little-endian.

use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

pub(crate) const TABLE_MAGIC: [u8; 8] = *b"WARMPTBL";
pub(crate) const INDEX_MAGIC: [u8; 8] = *b"WARMPIDX";
const VERSION: u32 = 1;
pub(crate) const RECORD_SIZE: usize = 56;
pub(crate) const HEADER_SIZE: usize = 96;

pub(crate) const CODEC_RAW: u8 = 0;
pub(crate) const CODEC_LZ4: u8 = 1;

/// Where a page lives: block `offset..offset+len` of pack `pack`, page `slot` of the
/// `pages` pages the block decompresses to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Location {
    pub pack: u32,
    pub offset: u64,
    pub len: u32,
    pub slot: u8,
    pub pages: u8,
    pub codec: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub hash: [u8; 32],
    pub loc: Location,
}

impl Record {
    pub(crate) fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.hash);
        out.extend_from_slice(&self.loc.offset.to_le_bytes());
        out.extend_from_slice(&self.loc.pack.to_le_bytes());
        out.extend_from_slice(&self.loc.len.to_le_bytes());
        out.extend_from_slice(&[self.loc.slot, self.loc.pages, self.loc.codec, 0, 0, 0, 0, 0]);
    }

    pub(crate) fn read(b: &[u8]) -> Record {
        let b = &b[..RECORD_SIZE];
        Record {
            hash: b[0..32].try_into().unwrap(),
            loc: Location {
                offset: u64::from_le_bytes(b[32..40].try_into().unwrap()),
                pack: u32::from_le_bytes(b[40..44].try_into().unwrap()),
                len: u32::from_le_bytes(b[44..48].try_into().unwrap()),
                slot: b[48],
                pages: b[49],
                codec: b[50],
            },
        }
    }
}

/// blake3 over the concatenated hashes, as stored in `Manifest::pages_hash`.
pub(crate) fn pages_hash<'a>(hashes: impl Iterator<Item = &'a [u8; 32]>) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    let mut buf = Vec::with_capacity(32 * 1024);
    for x in hashes {
        buf.extend_from_slice(x);
        if buf.len() >= 32 * 1024 {
            h.update(&buf);
            buf.clear();
        }
    }
    h.update(&buf);
    *h.finalize().as_bytes()
}

pub(crate) fn encode(magic: [u8; 8], pages_hash: [u8; 32], records: &[Record]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_SIZE + records.len() * RECORD_SIZE);
    out.extend_from_slice(&magic);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(RECORD_SIZE as u32).to_le_bytes());
    out.extend_from_slice(&(records.len() as u64).to_le_bytes());
    out.extend_from_slice(&pages_hash);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&[0; 32]);
    for r in records {
        r.write_to(&mut out);
    }
    let sum = checksum(&out);
    out[64..96].copy_from_slice(&sum);
    out
}

pub(crate) fn checksum(file: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&file[..64]);
    h.update(&file[HEADER_SIZE..]);
    *h.finalize().as_bytes()
}

/// The bytes of a table: mapped from a file, or received from a page server.
#[derive(Debug)]
enum TableBytes {
    Map(Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for TableBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            TableBytes::Map(m) => m,
            TableBytes::Owned(v) => v,
        }
    }
}

/// Why a table or index file could not be opened.
#[derive(Debug)]
pub(crate) enum TableError {
    Missing,
    /// It could not be opened or mapped (a permission problem, say): not damage.
    Io(std::io::Error),
    /// It is damaged: the reason.
    Bad(String),
}

impl TableError {
    pub(crate) fn reason(&self) -> String {
        match self {
            TableError::Missing => "the file is missing".into(),
            TableError::Io(e) => format!("cannot read it: {e}"),
            TableError::Bad(r) => r.clone(),
        }
    }
}

/// A memory-mapped (or received), validated table or index file; or a page table
/// received by parts ([`Parts`]).
#[derive(Debug)]
pub(crate) struct TableMap {
    map: TableBytes,
    count: u64,
    parts: Option<Parts>,
}

/// A page table received by parts (a registry's chunked index): runs of `per` records
/// (`per * 32` bytes of record hashes a power of two multiple of blake3's chunk), each
/// bound to the table's `pages_hash` by its blake3 chaining value (the hashes of all
/// records are one blake3 input, so the chaining values of its parts merge into the
/// root). The chaining values are checked against `pages_hash` when the table is made,
/// each part against its chaining value before it is filled in, so every record read
/// is as trustworthy as in a whole table. A record is read only after its part is in.
#[derive(Debug)]
pub(crate) struct Parts {
    per: u64,
    pages_hash: [u8; 32],
    cvs: Vec<[u8; 32]>,
    filled: Vec<std::sync::OnceLock<Vec<u8>>>,
}

/// The blake3 chaining value of record hashes `hashes` (the concatenation of 32-byte
/// hashes) that start at byte `offset` of the whole input.
fn subtree_cv(offset: u64, hashes: &[u8]) -> [u8; 32] {
    use blake3::hazmat::HasherExt;
    blake3::Hasher::new()
        .set_input_offset(offset)
        .update(hashes)
        .finalize_non_root()
}

/// The blake3 root of an input of `len` bytes split into parts of `part` bytes (a power
/// of two multiple of the chunk size) whose chaining values are `cvs`.
fn merged_root(cvs: &[[u8; 32]], part: u64, len: u64) -> [u8; 32] {
    use blake3::hazmat::{left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, Mode};
    fn cv(cvs: &[[u8; 32]], part: u64, len: u64) -> [u8; 32] {
        if cvs.len() == 1 {
            return cvs[0];
        }
        let left = left_subtree_len(len);
        let k = (left / part) as usize;
        merge_subtrees_non_root(
            &cv(&cvs[..k], part, left),
            &cv(&cvs[k..], part, len - left),
            Mode::Hash,
        )
    }
    let left = left_subtree_len(len);
    let k = (left / part) as usize;
    *merge_subtrees_root(
        &cv(&cvs[..k], part, left),
        &cv(&cvs[k..], part, len - left),
        Mode::Hash,
    )
    .as_bytes()
}

impl Parts {
    /// Records per part: `per * 32` bytes of hashes must be a power of two multiple of
    /// blake3's chunk.
    pub(crate) fn valid_per(per: u64) -> bool {
        per.is_power_of_two() && per * 32 >= blake3::CHUNK_LEN as u64 && per <= 1 << 24
    }

    /// The chaining values (one per part of `per` records) of `records`, as a pusher
    /// writes them; a table of one part has its root hash as its only value.
    pub(crate) fn chaining_values(records: &[Record], per: u64) -> Vec<[u8; 32]> {
        let hashes: Vec<u8> = records.iter().flat_map(|r| r.hash).collect();
        if records.len() as u64 <= per {
            return vec![*blake3::hash(&hashes).as_bytes()];
        }
        let part = (per * 32) as usize;
        hashes
            .chunks(part)
            .enumerate()
            .map(|(k, h)| subtree_cv((k * part) as u64, h))
            .collect()
    }
}

impl TableMap {
    /// Maps and validates (header, size, checksum). Errors are for the caller to wrap
    /// with the file and snapshot names.
    /// Without `checksum`, the records are not hashed (see
    /// [`verify_checksum`](Self::verify_checksum)).
    pub(crate) fn open(
        path: &Path,
        magic: [u8; 8],
        checksum: bool,
    ) -> Result<TableMap, TableError> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(TableError::Missing),
            Err(e) => return Err(TableError::Io(e)),
        };
        // SAFETY: tables are never modified in place (replaced only by rename), so the
        // mapping cannot change under us.
        let map = unsafe { Mmap::map(&file) }.map_err(TableError::Io)?;
        let t = Self::validate(TableBytes::Map(map), magic, checksum).map_err(TableError::Bad)?;
        Ok(t)
    }

    /// Validates a table received as bytes (header, size, checksum).
    pub(crate) fn from_bytes(bytes: Vec<u8>, magic: [u8; 8]) -> Result<TableMap, String> {
        Self::validate(TableBytes::Owned(bytes), magic, true)
    }

    /// The whole file: header and records. Not for a table by parts (which has no file).
    pub(crate) fn bytes(&self) -> &[u8] {
        assert!(
            self.parts.is_none(),
            "a page table by parts has no single file"
        );
        &self.map
    }

    fn validate(map: TableBytes, magic: [u8; 8], check: bool) -> Result<TableMap, String> {
        if map.len() < HEADER_SIZE {
            return Err(format!(
                "truncated: {} bytes, header alone is {HEADER_SIZE}",
                map.len()
            ));
        }
        if map[0..8] != magic {
            return Err("wrong magic".into());
        }
        let version = u32::from_le_bytes(map[8..12].try_into().unwrap());
        if version != VERSION {
            return Err(format!(
                "unsupported version {version} (this build reads {VERSION})"
            ));
        }
        let rs = u32::from_le_bytes(map[12..16].try_into().unwrap()) as usize;
        if rs != RECORD_SIZE {
            return Err(format!("record size {rs}, expected {RECORD_SIZE}"));
        }
        let count = u64::from_le_bytes(map[16..24].try_into().unwrap());
        let expected = count
            .checked_mul(RECORD_SIZE as u64)
            .and_then(|n| n.checked_add(HEADER_SIZE as u64));
        if expected != Some(map.len() as u64) {
            return Err(format!(
                "size is {} bytes but {count} records need {}",
                map.len(),
                expected.map_or("more than 2^64".into(), |n| n.to_string())
            ));
        }
        let t = TableMap {
            map,
            count,
            parts: None,
        };
        if check {
            t.verify_checksum()?;
        }
        Ok(t)
    }

    /// An empty table of `count` records to be filled by parts of `per` records whose
    /// blake3 chaining values are `cvs` (see [`Parts`]); checks them against
    /// `pages_hash`.
    pub(crate) fn by_parts(
        count: u64,
        per: u64,
        pages_hash: [u8; 32],
        cvs: Vec<[u8; 32]>,
    ) -> Result<TableMap, String> {
        if !Parts::valid_per(per) {
            return Err(format!("{per} records per part is not a valid part size"));
        }
        if cvs.len() as u64 != count.div_ceil(per).max(1) {
            return Err(format!(
                "{} parts listed for {count} records of {per} a part",
                cvs.len()
            ));
        }
        let root = match cvs.len() {
            1 => cvs[0],
            _ => merged_root(&cvs, per * 32, count * 32),
        };
        if root != pages_hash {
            return Err("its parts do not add up to its page hashes".into());
        }
        let filled = cvs.iter().map(|_| std::sync::OnceLock::new()).collect();
        Ok(TableMap {
            map: TableBytes::Owned(Vec::new()),
            count,
            parts: Some(Parts {
                per,
                pages_hash,
                cvs,
                filled,
            }),
        })
    }

    /// Number of parts (1 for a whole table) and records per part.
    pub(crate) fn parts(&self) -> (usize, u64) {
        match &self.parts {
            Some(p) => (p.filled.len(), p.per),
            None => (1, self.count.max(1)),
        }
    }

    /// The parts (see [`Parts`]) that hold none of the records `indexes` yet.
    pub(crate) fn missing_parts(&self, indexes: impl IntoIterator<Item = u64>) -> Vec<usize> {
        let Some(p) = &self.parts else {
            return Vec::new();
        };
        let mut out: Vec<usize> = indexes
            .into_iter()
            .filter(|&i| i < self.count)
            .map(|i| (i / p.per) as usize)
            .filter(|&k| p.filled[k].get().is_none())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Fills part `k` with `records` (56 bytes each) after checking their number and
    /// their hashes against the part's chaining value; `check` judges each record
    /// (where it points). Filling a part twice keeps the first.
    pub(crate) fn fill_part(
        &self,
        k: usize,
        records: Vec<u8>,
        check: impl Fn(&Record) -> Result<(), String>,
    ) -> Result<(), String> {
        let p = self.parts.as_ref().expect("a table by parts");
        let first = k as u64 * p.per;
        let n = p.per.min(self.count - first) as usize;
        if records.len() != n * RECORD_SIZE {
            return Err(format!(
                "part {k} has {} bytes, {n} records need {}",
                records.len(),
                n * RECORD_SIZE
            ));
        }
        let hashes: Vec<u8> = records
            .chunks_exact(RECORD_SIZE)
            .flat_map(|r| r[..32].iter().copied())
            .collect();
        let cv = match p.filled.len() {
            1 => *blake3::hash(&hashes).as_bytes(),
            _ => subtree_cv(first * 32, &hashes),
        };
        if cv != p.cvs[k] {
            return Err(format!("part {k} does not match its hash"));
        }
        records
            .chunks_exact(RECORD_SIZE)
            .try_for_each(|r| check(&Record::read(r)))?;
        let _ = p.filled[k].set(records);
        Ok(())
    }

    /// Hashes the header and every record and compares with the stored checksum. A
    /// table by parts: every part was checked as it came, nothing is left to check.
    pub(crate) fn verify_checksum(&self) -> Result<(), String> {
        if self.parts.is_some() {
            return Ok(());
        }
        if checksum(&self.map) != self.map[64..96] {
            return Err("checksum mismatch".into());
        }
        Ok(())
    }

    pub(crate) fn len(&self) -> u64 {
        self.count
    }

    pub(crate) fn pages_hash(&self) -> [u8; 32] {
        match &self.parts {
            Some(p) => p.pages_hash,
            None => self.map[24..56].try_into().unwrap(),
        }
    }

    fn rec_bytes(&self, i: u64) -> &[u8] {
        assert!(
            i < self.count,
            "page table index {i} out of range {}",
            self.count
        );
        if let Some(p) = &self.parts {
            let k = (i / p.per) as usize;
            let Some(part) = p.filled[k].get() else {
                panic!("page-table record {i} read before its part {k} was fetched");
            };
            let at = (i % p.per) as usize * RECORD_SIZE;
            return &part[at..at + RECORD_SIZE];
        }
        let at = HEADER_SIZE + i as usize * RECORD_SIZE;
        &self.map[at..at + RECORD_SIZE]
    }

    pub(crate) fn record(&self, i: u64) -> Record {
        Record::read(self.rec_bytes(i))
    }

    pub(crate) fn hash(&self, i: u64) -> [u8; 32] {
        self.rec_bytes(i)[..32].try_into().unwrap()
    }

    pub(crate) fn pack_of(&self, i: u64) -> u32 {
        u32::from_le_bytes(self.rec_bytes(i)[40..44].try_into().unwrap())
    }

    /// Every record (a table by parts: once every part is in).
    pub(crate) fn records(&self) -> impl Iterator<Item = Record> + '_ {
        (0..self.count).map(|i| self.record(i))
    }

    /// Recomputes blake3 over the record hashes.
    pub(crate) fn compute_pages_hash(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        for i in 0..self.count {
            h.update(&self.rec_bytes(i)[..32]);
        }
        *h.finalize().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(n: u64) -> Vec<Record> {
        (0..n)
            .map(|i| Record {
                hash: *blake3::hash(&i.to_le_bytes()).as_bytes(),
                loc: Location {
                    pack: (i / 7) as u32,
                    offset: i * 100,
                    len: 100,
                    slot: 0,
                    pages: 1,
                    codec: CODEC_LZ4,
                },
            })
            .collect()
    }

    fn bytes_of(recs: &[Record]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in recs {
            r.write_to(&mut out);
        }
        out
    }

    #[test]
    fn parts_add_up_to_the_pages_hash_and_are_checked() {
        let per = 64;
        for n in [
            1,
            63,
            64,
            65,
            128,
            129,
            3 * 64 + 17,
            8 * 64,
            8 * 64 + 1,
            13 * 64 - 5,
        ] {
            let recs = records(n);
            let ph = pages_hash(recs.iter().map(|r| &r.hash));
            let cvs = Parts::chaining_values(&recs, per);
            let t =
                TableMap::by_parts(n, per, ph, cvs.clone()).unwrap_or_else(|e| panic!("{n}: {e}"));
            assert_eq!(t.missing_parts(0..n).len(), cvs.len());
            for (k, part) in recs.chunks(per as usize).enumerate() {
                // A part with one record swapped for a well-formed other is refused.
                let mut bad = part.to_vec();
                bad[0].hash[0] ^= 1;
                assert!(t.fill_part(k, bytes_of(&bad), |_| Ok(())).is_err());
                // Another part's records are refused too (another offset in the tree).
                if k > 0 && part.len() == per as usize {
                    let other = &recs[..per as usize];
                    assert!(t.fill_part(k, bytes_of(other), |_| Ok(())).is_err());
                }
                t.fill_part(k, bytes_of(part), |_| Ok(())).unwrap();
            }
            assert!(t.missing_parts(0..n).is_empty());
            assert_eq!(t.compute_pages_hash(), ph);
            assert!(t.records().eq(recs.iter().copied()));
            // Chaining values that do not add up are refused.
            let mut cvs = cvs;
            cvs[0][5] ^= 1;
            assert!(TableMap::by_parts(n, per, ph, cvs).is_err());
        }
        assert!(TableMap::by_parts(10, 48, [0; 32], vec![[0; 32]]).is_err());
        let recs = records(200);
        let t = TableMap::by_parts(
            200,
            64,
            pages_hash(recs.iter().map(|r| &r.hash)),
            Parts::chaining_values(&recs, 64),
        )
        .unwrap();
        let refused = t.fill_part(1, bytes_of(&recs[64..128]), |r| {
            (r.loc.pack < 10).then_some(()).ok_or("outside".into())
        });
        assert_eq!(refused.unwrap_err(), "outside");
        assert_eq!(t.missing_parts([70, 5, 199]), vec![0, 1, 3]);
    }
}
