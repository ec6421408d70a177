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

/// A memory-mapped (or received), validated table or index file.
#[derive(Debug)]
pub(crate) struct TableMap {
    map: TableBytes,
    count: u64,
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

    /// The whole file: header and records.
    pub(crate) fn bytes(&self) -> &[u8] {
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
        let t = TableMap { map, count };
        if check {
            t.verify_checksum()?;
        }
        Ok(t)
    }

    /// Hashes the header and every record and compares with the stored checksum.
    pub(crate) fn verify_checksum(&self) -> Result<(), String> {
        if checksum(&self.map) != self.map[64..96] {
            return Err("checksum mismatch".into());
        }
        Ok(())
    }

    pub(crate) fn len(&self) -> u64 {
        self.count
    }

    pub(crate) fn pages_hash(&self) -> [u8; 32] {
        self.map[24..56].try_into().unwrap()
    }

    fn rec_bytes(&self, i: u64) -> &[u8] {
        assert!(
            i < self.count,
            "page table index {i} out of range {}",
            self.count
        );
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

    pub(crate) fn records(&self) -> impl Iterator<Item = Record> + '_ {
        self.map[HEADER_SIZE..]
            .chunks_exact(RECORD_SIZE)
            .map(Record::read)
    }

    /// Recomputes blake3 over the record hashes.
    pub(crate) fn compute_pages_hash(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        for r in self.map[HEADER_SIZE..].chunks_exact(RECORD_SIZE) {
            h.update(&r[..32]);
        }
        *h.finalize().as_bytes()
    }
}
