//! The content-addressed page store.
//!
//! # Layout of a store directory
//!
//! ```text
//! DIR/                                 0700 (every directory below too; files 0600)
//! ├── lock                             flock(LOCK_EX) held by a writer or gc
//! ├── packs/
//! │   ├── pack-00000001.pack           immutable: 16-byte header "WARMPACK" + version,
//! │   │                                then blocks (lz4 or raw) of up to 4 pages each
//! │   └── pack-00000001.idx            hash -> location of every page in the pack,
//! │                                    sorted; written when the pack is sealed
//! ├── snapshots/
//! │   ├── <id>.pages                   page table: fixed 56-byte records (hash + pack,
//! │   │                                block offset, block length, slot), mmap-able,
//! │   │                                own checksum (see `table`)
//! │   └── <id>.manifest                `format::encode(Manifest)`; id = blake3 of it
//! ├── refs/<name>                      "<id>\n": a name for a snapshot
//! └── tmp/                             files being written; leftovers are garbage
//! ```
//!
//! `<id>` is 64 lowercase hex; `SnapshotId::short` is its first 12.
//!
//! # Durability and concurrency
//!
//! Writers (and gc/remove/set_name) serialise on the `lock` file; readers take no lock.
//! A writer's packer threads append to packs in `tmp/` (page cache only, writeback started
//! as they go); `commit` fsyncs the sealed packs and, written to temp files, their `.idx`,
//! the page table and the manifest, all at once; renames packs, indexes and the page table
//! into place and fsyncs their directories; and finally renames the manifest into place
//! and fsyncs its directory. A snapshot
//! exists (is listed, resolvable) exactly when its manifest exists, and by then everything
//! it references is durable. A writer killed at any point leaves only unreferenced packs,
//! tables without a manifest and temp files; `gc` removes them.
//!
//! Every page served is checked against its blake3: damage is an error naming the
//! snapshot and the pack, never wrong memory.

mod direct;
mod fsutil;
pub(crate) mod hot;
mod lock;
mod maint;
pub(crate) mod page_hash;
pub(crate) mod snapshot;
pub(crate) mod table;
pub(crate) mod working_set;
mod writer;

#[cfg(test)]
mod tests;

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::format::{self, FormatError};
use crate::model::{Manifest, RunContent};

pub use hot::{Hot, MAX_HOT_PAGES};
pub use maint::{DamagedSnapshot, GcReport, SnapshotStats, VerifyProgress, VerifyReport};
pub use snapshot::Snapshot;
pub use table::{Location, Record};
pub use working_set::WorkingSets;
pub use writer::SnapshotWriter;

use fsutil::{io_err, mkdir_private};
use lock::WriteLock;

/// Pages per compressed block: a fault decompresses at most this many pages.
pub const BLOCK_PAGES: usize = 4;
/// A pack is sealed and a new one started once it grows past this size.
pub const PACK_TARGET_SIZE: u64 = 256 << 20;
pub(crate) const PACK_MAGIC: [u8; 8] = *b"WARMPACK";
pub(crate) const PACK_VERSION: u32 = 1;
pub(crate) const PACK_HEADER: usize = 16;

/// blake3 of the encoded manifest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SnapshotId(pub [u8; 32]);

impl SnapshotId {
    pub fn of_manifest_bytes(bytes: &[u8]) -> SnapshotId {
        SnapshotId(*blake3::hash(bytes).as_bytes())
    }

    /// 64 lowercase hex.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from(self.0).to_hex().to_string()
    }

    /// First 12 hex digits, like git.
    pub fn short(&self) -> String {
        let mut s = self.to_hex();
        s.truncate(12);
        s
    }

    /// Parses exactly 64 hex digits (either case).
    pub fn from_hex(s: &str) -> Option<SnapshotId> {
        if s.len() != 64 {
            return None;
        }
        blake3::Hash::from_hex(s)
            .ok()
            .map(|h| SnapshotId(*h.as_bytes()))
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnapshotId({})", self.short())
    }
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot {action} {}: its filesystem is full: free space there (`warmstart gc`, `warmstart rm`) or use \
         another --store",
        path.display()
    )]
    NoSpace {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot {action} {}: permission denied; run warmstart as the store's owner (or \
         root), or give the file back its owner and mode", path.display()
    )]
    PermissionDenied {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("store path {} exists but is not a directory; pick another store directory", path.display())]
    NotADirectory { path: PathBuf },
    #[error("store directory {} does not exist", path.display())]
    NoStore { path: PathBuf },
    #[error("store directory {} is not writable: {source}", path.display())]
    NotWritable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("manifest {} is damaged: {source}; run `warmstart verify`", path.display())]
    BadManifest {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    #[error(
        "manifest {} does not match its id (its content hashes to {actual}); \
         run `warmstart verify`", path.display()
    )]
    ManifestIdMismatch { path: PathBuf, actual: String },
    #[error("page table {} of snapshot {id} is damaged: {reason}; run `warmstart verify`", path.display())]
    BadTable {
        id: String,
        path: PathBuf,
        reason: String,
    },
    /// Pages taken from a base snapshot that it does not have (a dump's own error).
    #[error("pages taken from the previous image: {reason}")]
    BaseRecords { reason: String },
    #[error("no snapshot or name matches `{query}` in store {}; run `warmstart ls`", dir.display())]
    UnknownSnapshot { query: String, dir: PathBuf },
    #[error(
        "`{query}` is ambiguous in store {}: it is the start of {} snapshot ids: {}; \
         give more hex digits", dir.display(), candidates.len(), candidates.join(", ")
    )]
    AmbiguousSnapshot {
        query: String,
        dir: PathBuf,
        candidates: Vec<String>,
    },
    #[error(
        "name `{name}` points to snapshot {id}, which no longer exists; \
         run `warmstart gc` to drop dangling names"
    )]
    DanglingName { name: String, id: String },
    #[error("invalid snapshot name `{name}`: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error(
        "snapshot {id}: pack {} is missing; the snapshot cannot be restored \
         (run `warmstart verify`)", pack.display()
    )]
    MissingPack { id: String, pack: PathBuf },
    #[error(
        "snapshot {id}: page {page} lies beyond the end of pack {} ({len} bytes): \
         the pack is truncated; run `warmstart verify`", pack.display()
    )]
    ShortPack {
        id: String,
        pack: PathBuf,
        page: u64,
        len: u64,
    },
    #[error("snapshot {id}: page {page} in pack {} is corrupt: {reason}; run `warmstart verify`", pack.display())]
    CorruptPage {
        id: String,
        page: u64,
        pack: PathBuf,
        reason: String,
    },
    #[error("snapshot {id}: pages {first}..{end} requested but it has {count} pages")]
    PageRange {
        id: String,
        first: u64,
        end: u64,
        count: u64,
    },
    #[error("page buffer is {got} bytes but {pages} pages need {expected}")]
    BufferSize {
        got: usize,
        pages: u64,
        expected: u64,
    },
    #[error("page data of {len} bytes is not a whole number of 4096-byte pages")]
    UnalignedPages { len: usize },
    #[error("manifest to commit is inconsistent: {reason}")]
    InvalidManifest { reason: String },
    #[error("store {} holds no snapshot", dir.display())]
    EmptyStore { dir: PathBuf },
    #[error(
        "store {} holds {} snapshots ({}); say which one",
        dir.display(), ids.len(), ids.join(", ")
    )]
    NotSingleSnapshot { dir: PathBuf, ids: Vec<String> },
    #[error("page server {addr}: cannot {action}: {error}")]
    PageServerIo {
        addr: String,
        action: &'static str,
        error: io::Error,
    },
    #[error("page server {addr}: {reason}")]
    PageServer { addr: String, reason: String },
    /// A `--tls-cert`, `--tls-key` or `--tls-cacert` file that cannot be used.
    #[error("{flag} {}: {reason}", path.display())]
    TlsFile {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// Reads from the page server were given up (`Client::abandon_page_reads`): the
    /// instance they were for is over, or its restore was interrupted.
    #[error("reading pages from {addr} was given up (the instance is over)")]
    PageReadsAbandoned { addr: String },
    /// An OCI registry (`crate::registry`): `what` names the registry, repository or blob.
    #[error("registry {what}: {reason}")]
    Registry { what: String, reason: String },
    #[error(
        "snapshot {id}: page {page} served by page server {addr} is corrupt: {reason}; \
         never restoring wrong memory"
    )]
    PageServerCorrupt {
        addr: String,
        id: String,
        page: u64,
        reason: String,
    },
    #[error(
        "gc stopped without deleting packs: {reason}; run `warmstart verify` and remove \
         the damaged snapshot first"
    )]
    GcUnsafe { reason: String },
}

impl StoreError {
    /// An I/O error on a store file: [`StoreError::PermissionDenied`] for a permission
    /// problem (not damage), [`StoreError::Io`] otherwise.
    pub(crate) fn io(action: &'static str, path: PathBuf, source: io::Error) -> StoreError {
        if source.kind() == io::ErrorKind::PermissionDenied {
            StoreError::PermissionDenied {
                action,
                path,
                source,
            }
        } else if source.raw_os_error() == Some(libc::ENOSPC)
            || source.raw_os_error() == Some(libc::EDQUOT)
        {
            StoreError::NoSpace {
                action,
                path,
                source,
            }
        } else {
            StoreError::Io {
                action,
                path,
                source,
            }
        }
    }

    /// Whether this is a permission problem rather than damage or absence.
    pub fn is_permission(&self) -> bool {
        matches!(self, StoreError::PermissionDenied { .. })
    }
}

/// One line of `list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: SnapshotId,
    pub names: Vec<String>,
    pub created_unix: u64,
    pub command: Vec<String>,
    /// Sum of the VMA sizes of every process.
    pub logical_bytes: u64,
    /// Present pages (zero and data).
    pub resident_pages: u64,
    pub zero_pages: u64,
    /// Page-table records.
    pub data_pages: u64,
    /// When its manifest was written (orders snapshots created in the same second).
    pub committed: Option<std::time::SystemTime>,
    /// Compressed bytes of its pages in the packs (pages shared with other snapshots
    /// counted in each).
    pub stored_bytes: u64,
    /// Set when the snapshot is damaged: its manifest cannot be read (the other fields
    /// are then empty), or its page table or a pack it needs is missing or damaged.
    pub damaged: Option<String>,
    /// Set when a file of it may not be read by this user (a permission problem, not
    /// damage); the other fields are empty if that file is the manifest.
    pub unreadable: Option<String>,
}

/// A store directory. Cheap to create; holds no open files.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

pub(crate) fn is_valid_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > 200 {
        return Err("it is longer than 200 characters");
    }
    if name.starts_with('.') {
        return Err("it starts with '.'");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("only A-Z a-z 0-9 . _ - are allowed");
    }
    Ok(())
}

pub(crate) fn manifest_sizes(m: &Manifest) -> (u64, u64, u64) {
    let (mut logical, mut resident, mut zero) = (0u64, 0u64, 0u64);
    for p in &m.processes {
        for v in &p.vmas {
            logical = logical.saturating_add(v.end.saturating_sub(v.start));
            for r in &v.pages {
                resident = resident.saturating_add(r.count);
                if r.content == RunContent::Zero {
                    zero = zero.saturating_add(r.count);
                }
            }
        }
    }
    (logical, resident, zero)
}

impl Store {
    /// Opens the store at `dir`, creating it (0700) if missing.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        mkdir_private(dir)?;
        let store = Store {
            dir: dir.to_path_buf(),
        };
        for sub in [
            store.packs_dir(),
            store.snaps_dir(),
            store.refs_dir(),
            store.tmp_dir(),
        ] {
            match mkdir_private(&sub) {
                Err(StoreError::PermissionDenied { source, .. }) => {
                    return Err(StoreError::NotWritable {
                        path: dir.to_path_buf(),
                        source,
                    })
                }
                r => r?,
            }
        }
        let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str()))
            .map_err(|e| io_err("open", dir)(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        // SAFETY: `c` is a NUL-terminated CString that outlives the call; access(2) only
        // reads the path.
        if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } != 0 {
            return Err(StoreError::NotWritable {
                path: dir.to_path_buf(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(store)
    }

    /// The store at `dir` for reading (and removing from): nothing is created. A missing
    /// `dir` is [`StoreError::NoStore`]; a directory without the store's subdirectories
    /// reads as an empty store.
    pub fn open_existing(dir: &Path) -> Result<Store, StoreError> {
        match fs::metadata(dir) {
            Ok(m) if m.is_dir() => Ok(Store {
                dir: dir.to_path_buf(),
            }),
            Ok(_) => Err(StoreError::NotADirectory {
                path: dir.to_path_buf(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(StoreError::NoStore {
                path: dir.to_path_buf(),
            }),
            Err(e) => Err(StoreError::io("open store", dir.to_path_buf(), e)),
        }
    }

    /// A CRIU-style `-D DIR` image directory is simply a store holding one snapshot.
    pub fn open_image_dir(dir: &Path) -> Result<Store, StoreError> {
        Store::open(dir)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn packs_dir(&self) -> PathBuf {
        self.dir.join("packs")
    }
    /// The directories whose entries are the store's snapshots and names: what
    /// [`Self::ids`] and [`Self::names`] list (a change to them can change those).
    pub fn index_dirs(&self) -> [PathBuf; 2] {
        [self.snaps_dir(), self.refs_dir()]
    }

    pub(crate) fn snaps_dir(&self) -> PathBuf {
        self.dir.join("snapshots")
    }
    pub(crate) fn refs_dir(&self) -> PathBuf {
        self.dir.join("refs")
    }
    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }
    pub(crate) fn lock_path(&self) -> PathBuf {
        self.dir.join("lock")
    }
    pub(crate) fn pack_path(&self, pack: u32) -> PathBuf {
        self.packs_dir().join(format!("pack-{pack:08}.pack"))
    }
    pub(crate) fn idx_path(&self, pack: u32) -> PathBuf {
        self.packs_dir().join(format!("pack-{pack:08}.idx"))
    }
    pub(crate) fn manifest_path(&self, id: &SnapshotId) -> PathBuf {
        self.snaps_dir().join(format!("{id}.manifest"))
    }
    pub(crate) fn table_path(&self, id: &SnapshotId) -> PathBuf {
        self.snaps_dir().join(format!("{id}.pages"))
    }

    pub(crate) fn lock(&self) -> Result<WriteLock, StoreError> {
        WriteLock::acquire(&self.lock_path())
    }

    /// Starts a new snapshot; holds the writer lock until committed or dropped.
    pub fn writer(&self) -> Result<SnapshotWriter<'_>, StoreError> {
        SnapshotWriter::new(self, self.lock()?, false)
    }

    /// A [`Self::writer`] whose packs bypass the page cache (`O_DIRECT`, see
    /// [`direct`]): for pages no process reads right away (a pull). Equally durable
    /// once committed.
    pub fn writer_past_cache(&self) -> Result<SnapshotWriter<'_>, StoreError> {
        SnapshotWriter::new(self, self.lock()?, true)
    }

    /// Ids of all committed snapshots (those with a manifest), sorted.
    pub fn ids(&self) -> Result<Vec<SnapshotId>, StoreError> {
        let dir = self.snaps_dir();
        let mut ids = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ids),
            r => r.map_err(io_err("list", &dir))?,
        };
        for e in entries {
            let e = e.map_err(io_err("list", &dir))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(id) = name
                .strip_suffix(".manifest")
                .and_then(SnapshotId::from_hex)
            {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// All names, as (name, id) pairs sorted by name. Unreadable refs are skipped.
    pub fn names(&self) -> Result<Vec<(String, SnapshotId)>, StoreError> {
        let dir = self.refs_dir();
        let mut out = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            r => r.map_err(io_err("list", &dir))?,
        };
        for e in entries {
            let e = e.map_err(io_err("list", &dir))?;
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            if is_valid_name(&name).is_err() {
                continue;
            }
            if let Some(id) = self.read_ref(&name)? {
                out.push((name, id));
            }
        }
        out.sort();
        Ok(out)
    }

    fn read_ref(&self, name: &str) -> Result<Option<SnapshotId>, StoreError> {
        let path = self.refs_dir().join(name);
        match fs::read_to_string(&path) {
            Ok(s) => Ok(SnapshotId::from_hex(s.trim())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &path)(e)),
        }
    }

    pub(crate) fn exists(&self, id: &SnapshotId) -> bool {
        self.manifest_path(id).exists()
    }

    /// A name, a full id, or a unique hex prefix of one (any length); a prefix that
    /// matches several ids is [`StoreError::AmbiguousSnapshot`], listing them.
    pub fn resolve(&self, id_or_name: &str) -> Result<SnapshotId, StoreError> {
        let q = id_or_name;
        if is_valid_name(q).is_ok() {
            if let Some(id) = self.read_ref(q)? {
                if !self.exists(&id) {
                    return Err(StoreError::DanglingName {
                        name: q.into(),
                        id: id.short(),
                    });
                }
                return Ok(id);
            }
        }
        let unknown = || StoreError::UnknownSnapshot {
            query: q.into(),
            dir: self.dir.clone(),
        };
        if q.is_empty() || q.len() > 64 || !q.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(unknown());
        }
        // A whole id names at most itself: no listing of the store.
        if let Some(id) = SnapshotId::from_hex(q) {
            return if self.exists(&id) {
                Ok(id)
            } else {
                Err(unknown())
            };
        }
        let prefix = q.to_ascii_lowercase();
        let matches: Vec<SnapshotId> = self
            .ids()?
            .into_iter()
            .filter(|id| id.to_hex().starts_with(&prefix))
            .collect();
        match matches.len() {
            0 => Err(unknown()),
            1 => Ok(matches[0]),
            _ => Err(StoreError::AmbiguousSnapshot {
                query: q.into(),
                dir: self.dir.clone(),
                candidates: {
                    let names = self.names().unwrap_or_default();
                    matches
                        .iter()
                        .map(|id| {
                            let mine: Vec<&str> = names
                                .iter()
                                .filter(|(_, i)| i == id)
                                .map(|(n, _)| n.as_str())
                                .collect();
                            if mine.is_empty() {
                                id.short()
                            } else {
                                format!("{} ({})", id.short(), mine.join(", "))
                            }
                        })
                        .collect()
                },
            }),
        }
    }

    pub(crate) fn read_manifest(&self, id: &SnapshotId) -> Result<Manifest, StoreError> {
        let path = self.manifest_path(id);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::UnknownSnapshot {
                    query: id.to_hex(),
                    dir: self.dir.clone(),
                })
            }
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let actual = SnapshotId::of_manifest_bytes(&bytes);
        let manifest = format::decode(&bytes).map_err(|source| StoreError::BadManifest {
            path: path.clone(),
            source,
        })?;
        if actual != *id {
            return Err(StoreError::ManifestIdMismatch {
                path,
                actual: actual.to_hex(),
            });
        }
        Ok(manifest)
    }

    /// The manifest of snapshot `id` alone (checked against its id; the page table is
    /// not opened).
    pub fn manifest(&self, id: &SnapshotId) -> Result<Manifest, StoreError> {
        self.read_manifest(id)
    }

    /// Opens a snapshot: reads the manifest and maps its page table (validating both).
    pub fn load(&self, id: &SnapshotId) -> Result<Snapshot, StoreError> {
        let manifest = self.read_manifest(id)?;
        Snapshot::open(self, *id, manifest, true)
    }

    /// [`load`](Self::load) without hashing the whole page table (a table of GiBs of
    /// pages is tens of MiB): its header, size and binding to the manifest are checked,
    /// and every page read is still verified against its record's hash, so a damaged
    /// record fails that read. What only the whole-table checksum catches (a record
    /// replaced by another well-formed one) needs [`Snapshot::verify_table`]: run it
    /// before trusting the snapshot further, e.g. on another thread while restoring.
    pub fn load_deferred(&self, id: &SnapshotId) -> Result<Snapshot, StoreError> {
        let manifest = self.read_manifest(id)?;
        Snapshot::open(self, *id, manifest, false)
    }

    /// Every committed snapshot, oldest first. A damaged manifest is listed with
    /// `damaged` set rather than failing the whole listing.
    pub fn list(&self) -> Result<Vec<SnapshotInfo>, StoreError> {
        let names = self.names()?;
        let mut out = Vec::new();
        for id in self.ids()? {
            let my_names: Vec<String> = names
                .iter()
                .filter(|(_, i)| *i == id)
                .map(|(n, _)| n.clone())
                .collect();
            let committed = fs::metadata(self.manifest_path(&id))
                .and_then(|m| m.modified())
                .ok();
            let info = match self.read_manifest(&id) {
                Ok(m) => {
                    let (logical_bytes, resident_pages, zero_pages) = manifest_sizes(&m);
                    let (stored_bytes, damaged, unreadable) = match self.check_files(&id) {
                        Ok(stored) => (stored, None, None),
                        Err(e) if e.is_permission() => (0, None, Some(e.to_string())),
                        Err(e) => (0, Some(e.to_string()), None),
                    };
                    SnapshotInfo {
                        id,
                        names: my_names,
                        created_unix: m.created_unix,
                        command: m.command,
                        logical_bytes,
                        resident_pages,
                        zero_pages,
                        data_pages: m.page_count,
                        stored_bytes,
                        committed,
                        damaged,
                        unreadable,
                    }
                }
                Err(StoreError::UnknownSnapshot { .. }) => continue, // removed meanwhile
                Err(e) => SnapshotInfo {
                    damaged: (!e.is_permission()).then(|| e.to_string()),
                    unreadable: e.is_permission().then(|| e.to_string()),
                    id,
                    names: my_names,
                    created_unix: 0,
                    command: vec![],
                    logical_bytes: 0,
                    resident_pages: 0,
                    zero_pages: 0,
                    data_pages: 0,
                    stored_bytes: 0,
                    committed,
                },
            };
            out.push(info);
        }
        out.sort_by_key(|i| (i.created_unix, i.committed, i.id));
        Ok(out)
    }

    /// What `list` checks beyond the manifest, cheaply (no page is read): the page
    /// table is there with a plausible header and size, and every pack it names is there
    /// and can be opened. Missing packs are named together.
    fn check_files(&self, id: &SnapshotId) -> Result<u64, StoreError> {
        let path = self.table_path(id);
        let table =
            table::TableMap::open(&path, table::TABLE_MAGIC, false).map_err(|e| match e {
                table::TableError::Io(e) => StoreError::io("read page table", path.clone(), e),
                e => StoreError::BadTable {
                    id: id.short(),
                    path: path.clone(),
                    reason: e.reason(),
                },
            })?;
        let packs: std::collections::BTreeSet<u32> =
            (0..table.len()).map(|i| table.pack_of(i)).collect();
        let mut missing = Vec::new();
        for n in packs {
            let pack = self.pack_path(n);
            match fs::File::open(&pack) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    missing.push(pack.display().to_string())
                }
                Err(e) => return Err(StoreError::io("open pack", pack, e)),
            }
        }
        match missing.len() {
            0 => {
                // Compressed blocks of its pages, each once (pages of a block share it).
                let mut blocks = std::collections::HashMap::new();
                for r in table.records() {
                    blocks.insert((r.loc.pack, r.loc.offset), r.loc.len);
                }
                Ok(blocks.values().map(|&l| u64::from(l)).sum())
            }
            1 => Err(StoreError::MissingPack {
                id: id.short(),
                pack: missing.remove(0).into(),
            }),
            k => Err(StoreError::MissingPack {
                id: id.short(),
                pack: format!(
                    "{} (and {} more: {})",
                    missing[0],
                    k - 1,
                    missing[1..].join(", ")
                )
                .into(),
            }),
        }
    }

    /// Removes a snapshot (manifest first, then its table and the names pointing to it).
    /// Its pages stay until `gc`.
    pub fn remove(&self, id_or_name: &str) -> Result<SnapshotId, StoreError> {
        let _lock = self.lock()?;
        let id = self.resolve(id_or_name)?;
        fsutil::remove_file(&self.manifest_path(&id))?;
        fsutil::fsync_dir(&self.snaps_dir())?;
        fsutil::remove_file(&self.table_path(&id))?;
        fsutil::remove_file(&self.working_set_path(&id))?;
        fsutil::remove_file(&self.hot_path(&id))?;
        for (name, target) in self.names()? {
            if target == id {
                fsutil::remove_file(&self.refs_dir().join(name))?;
            }
        }
        fsutil::fsync_dir(&self.refs_dir())?;
        Ok(id)
    }

    /// Points `name` at `id` (replacing any previous target).
    pub fn set_name(&self, name: &str, id: &SnapshotId) -> Result<(), StoreError> {
        let _lock = self.lock()?;
        self.set_name_locked(name, id)
    }

    pub(crate) fn set_name_locked(&self, name: &str, id: &SnapshotId) -> Result<(), StoreError> {
        is_valid_name(name).map_err(|reason| StoreError::InvalidName {
            name: name.into(),
            reason,
        })?;
        if !self.exists(id) {
            return Err(StoreError::UnknownSnapshot {
                query: id.to_hex(),
                dir: self.dir.clone(),
            });
        }
        fsutil::write_atomic(
            &self.tmp_dir(),
            &self.refs_dir().join(name),
            format!("{id}\n").as_bytes(),
        )
    }

    /// The single snapshot of an image directory.
    /// Makes the packs of `other` (with their indexes) this store's too, under the same
    /// numbers: hard links, or copies across filesystems. A writer of this store can then
    /// take the records of `other`'s snapshots ([`SnapshotWriter::set_base_from`]) and
    /// the snapshot it writes needs nothing of `other` (CRIU's `--prev-images-dir`, with
    /// each image directory restorable alone). A pack this store already has under a
    /// number must be the same file.
    pub fn adopt_packs(&self, other: &Store) -> Result<(), StoreError> {
        use std::os::unix::fs::MetadataExt;
        let _lock = self.lock()?;
        let from = other.packs_dir();
        let to = self.packs_dir();
        for e in fs::read_dir(&from).map_err(io_err("list", &from))? {
            let e = e.map_err(io_err("list", &from))?;
            let name = e.file_name();
            let Some(n) = name.to_str() else { continue };
            if !(n.starts_with("pack-") && (n.ends_with(".pack") || n.ends_with(".idx"))) {
                continue;
            }
            let src = e.path();
            let dst = to.join(&name);
            match fs::metadata(&dst) {
                Ok(m) => {
                    let s = fs::metadata(&src).map_err(io_err("inspect", &src))?;
                    if (m.dev(), m.ino()) != (s.dev(), s.ino()) {
                        return Err(StoreError::io(
                            "adopt pack",
                            dst,
                            io::Error::other(format!(
                                "a different {n} is already there; use an empty directory"
                            )),
                        ));
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("inspect", &dst)(e)),
            }
            match fs::hard_link(&src, &dst) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                    // Another filesystem: a durable copy, renamed into place.
                    let (mut tmp, tmp_path) = fsutil::create_tmp(&self.tmp_dir(), "adopt")?;
                    let mut f = fs::File::open(&src).map_err(io_err("open", &src))?;
                    io::copy(&mut f, &mut tmp).map_err(io_err("copy", &src))?;
                    tmp.sync_all().map_err(io_err("sync", &tmp_path))?;
                    fs::rename(&tmp_path, &dst).map_err(io_err("rename", &dst))?;
                }
                Err(e) => return Err(io_err("link", &dst)(e)),
            }
        }
        fsutil::fsync_dir(&to)
    }

    pub fn only_snapshot(&self) -> Result<SnapshotId, StoreError> {
        let ids = self.ids()?;
        match ids.len() {
            0 => Err(StoreError::EmptyStore {
                dir: self.dir.clone(),
            }),
            1 => Ok(ids[0]),
            _ => Err(StoreError::NotSingleSnapshot {
                dir: self.dir.clone(),
                ids: ids.iter().map(|i| i.short()).collect(),
            }),
        }
    }
}
