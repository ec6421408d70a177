//! Maintenance: garbage collection, verification and per-snapshot statistics.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::PathBuf;

use super::fsutil::{self, io_err};
use super::lock::WriteLock;
use super::table::{TableMap, TABLE_MAGIC};
use super::{manifest_sizes, SnapshotId, Store, StoreError};
use crate::model::{RunContent, PAGE_SIZE};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Pack files (and their indexes) no snapshot references.
    pub removed_packs: Vec<PathBuf>,
    /// Leftovers of interrupted writers in `tmp/` and stray temp files.
    pub removed_temp_files: usize,
    /// Page tables whose manifest was never committed (or was removed).
    pub removed_orphan_tables: usize,
    /// Names pointing to snapshots that no longer exist.
    pub removed_dangling_names: Vec<String>,
    pub freed_bytes: u64,
    pub live_packs: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedSnapshot {
    pub id: SnapshotId,
    /// Human-readable reasons, first problems first (capped, with a count of the rest).
    pub reasons: Vec<String>,
}

/// Where a [`Store::verify_progress`] is: snapshot `index` of `snapshots` (`id`), `pages_done`
/// of its `pages` page records read.
#[derive(Debug, Clone, Copy)]
pub struct VerifyProgress {
    pub id: SnapshotId,
    pub index: usize,
    pub snapshots: usize,
    pub pages_done: u64,
    pub pages: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub snapshots_checked: usize,
    pub pages_checked: u64,
    pub damaged: Vec<DamagedSnapshot>,
    /// Snapshots with files this user may not read (permission problems, not damage):
    /// those files were not checked.
    pub unreadable: Vec<DamagedSnapshot>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.damaged.is_empty() && self.unreadable.is_empty()
    }
}

/// What `verify` found wrong with one snapshot.
#[derive(Default)]
struct Findings {
    damage: Vec<String>,
    denied: Vec<String>,
}

impl Findings {
    fn push(&mut self, e: StoreError) {
        if e.is_permission() {
            self.denied.push(e.to_string());
        } else {
            self.damage.push(e.to_string());
        }
    }
}

/// Caps `reasons` at [`MAX_REASONS`], with a count of the rest.
fn capped(mut reasons: Vec<String>) -> Vec<String> {
    if reasons.len() > MAX_REASONS {
        let more = reasons.len() - MAX_REASONS;
        reasons.truncate(MAX_REASONS);
        reasons.push(format!("... and {more} more"));
    }
    reasons
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Sum of VMA sizes, bytes.
    pub logical_bytes: u64,
    /// Present pages (zero and data).
    pub resident_pages: u64,
    pub zero_pages: u64,
    /// Page-table records.
    pub data_pages: u64,
    /// Compressed bytes of the distinct blocks this snapshot references.
    pub stored_bytes: u64,
    /// Data pages whose content is also referenced by another snapshot.
    pub shared_with_others: u64,
}

const MAX_REASONS: usize = 8;
const VERIFY_CHUNK: u64 = 256;

impl Store {
    /// Removes unreferenced packs, tables without manifest, dangling names and temp
    /// leftovers. Takes the writer lock. Refuses to delete packs if a live page table
    /// cannot be read (it could reference any pack).
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        self.gc_waiting(&mut |_| {})
    }

    /// [`gc`](Self::gc); `waiting(true)` is called if another writer holds the store's
    /// lock (gc then waits for it), `waiting(false)` once gc has it.
    pub fn gc_waiting(&self, waiting: &mut dyn FnMut(bool)) -> Result<GcReport, StoreError> {
        let _lock = WriteLock::acquire_waiting(&self.lock_path(), waiting)?;
        let mut report = GcReport::default();
        if !self.snaps_dir().exists() {
            // An existing directory that holds no store yet: nothing to collect.
            return Ok(report);
        }

        // 1. tmp/: nobody writes there without the lock we hold.
        let tmp = self.tmp_dir();
        for e in fs::read_dir(&tmp).map_err(io_err("list", &tmp))? {
            let path = e.map_err(io_err("list", &tmp))?.path();
            if path.is_dir() {
                fs::remove_dir_all(&path).map_err(io_err("remove", &path))?;
            } else {
                report.freed_bytes += fsutil::remove_file(&path)?;
            }
            report.removed_temp_files += 1;
        }

        // 2. snapshots/: orphan tables and stray files.
        let ids: HashSet<SnapshotId> = self.ids()?.into_iter().collect();
        let snaps = self.snaps_dir();
        for e in fs::read_dir(&snaps).map_err(io_err("list", &snaps))? {
            let e = e.map_err(io_err("list", &snaps))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let table_or_ws = name
                .strip_suffix(".pages")
                .or_else(|| name.strip_suffix(".ws"))
                .or_else(|| name.strip_suffix(".hot"));
            if let Some(id) = table_or_ws.and_then(SnapshotId::from_hex) {
                if !ids.contains(&id) {
                    report.freed_bytes += fsutil::remove_file(&e.path())?;
                    report.removed_orphan_tables += 1;
                }
            } else if name.ends_with(".tmp") {
                report.freed_bytes += fsutil::remove_file(&e.path())?;
                report.removed_temp_files += 1;
            }
        }

        // 3. refs/: dangling names.
        for (name, id) in self.names()? {
            if !ids.contains(&id) {
                fsutil::remove_file(&self.refs_dir().join(&name))?;
                report.removed_dangling_names.push(name);
            }
        }

        // 4. packs/: keep exactly the packs some live table references.
        let mut live: HashSet<u32> = HashSet::new();
        for id in &ids {
            let path = self.table_path(id);
            let t = TableMap::open(&path, TABLE_MAGIC, true).map_err(|r| StoreError::GcUnsafe {
                reason: format!(
                    "page table {} of snapshot {} is unreadable ({})",
                    path.display(),
                    id.short(),
                    r.reason()
                ),
            })?;
            for i in 0..t.len() {
                live.insert(t.pack_of(i));
            }
        }
        let packs = self.packs_dir();
        for e in fs::read_dir(&packs).map_err(io_err("list", &packs))? {
            let e = e.map_err(io_err("list", &packs))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let number = name
                .strip_prefix("pack-")
                .and_then(|s| s.strip_suffix(".pack").or_else(|| s.strip_suffix(".idx")))
                .and_then(|s| s.parse::<u32>().ok());
            match number {
                Some(n) if live.contains(&n) => {
                    report.live_packs += usize::from(name.ends_with(".pack"));
                }
                Some(_) => {
                    report.freed_bytes += fsutil::remove_file(&e.path())?;
                    if name.ends_with(".pack") {
                        report.removed_packs.push(e.path());
                    }
                }
                None if name.ends_with(".tmp") => {
                    report.freed_bytes += fsutil::remove_file(&e.path())?;
                    report.removed_temp_files += 1;
                }
                None => {}
            }
        }
        report.removed_packs.sort();
        for d in [packs, snaps, self.refs_dir(), tmp] {
            fsutil::fsync_dir(&d)?;
        }
        tracing::info!(
            "gc: removed {} packs, {} temp files, {} orphan tables; freed {} bytes",
            report.removed_packs.len(),
            report.removed_temp_files,
            report.removed_orphan_tables,
            report.freed_bytes
        );
        Ok(report)
    }

    /// Re-checks the manifest, the page table and every page of every snapshot (or of
    /// `which`), reporting every damaged snapshot with its reasons.
    pub fn verify(&self, which: Option<&SnapshotId>) -> Result<VerifyReport, StoreError> {
        self.verify_progress(which, &mut |_| {})
    }

    /// [`verify`](Self::verify), telling `progress` where it is as it goes.
    pub fn verify_progress(
        &self,
        which: Option<&SnapshotId>,
        progress: &mut dyn FnMut(VerifyProgress),
    ) -> Result<VerifyReport, StoreError> {
        let ids = match which {
            Some(id) => vec![*id],
            None => self.ids()?,
        };
        let mut report = VerifyReport::default();
        let snapshots = ids.len();
        for (index, id) in ids.into_iter().enumerate() {
            report.snapshots_checked += 1;
            let mut found = Findings::default();
            let mut on_pages = |pages_done, pages| {
                progress(VerifyProgress {
                    id,
                    index,
                    snapshots,
                    pages_done,
                    pages,
                })
            };
            self.verify_one(&id, &mut found, &mut report.pages_checked, &mut on_pages);
            if !found.damage.is_empty() {
                report.damaged.push(DamagedSnapshot {
                    id,
                    reasons: capped(found.damage),
                });
            }
            if !found.denied.is_empty() {
                report.unreadable.push(DamagedSnapshot {
                    id,
                    reasons: capped(found.denied),
                });
            }
        }
        Ok(report)
    }

    fn verify_one(
        &self,
        id: &SnapshotId,
        found: &mut Findings,
        pages_checked: &mut u64,
        progress: &mut dyn FnMut(u64, u64),
    ) {
        let snap = match self.load(id) {
            Ok(s) => s,
            Err(e) => return found.push(e),
        };
        let n = snap.page_count();
        if snap.table().compute_pages_hash() != snap.manifest.pages_hash {
            found.damage.push(format!(
                "page table {} does not match the manifest's pages_hash",
                snap.table_path().display()
            ));
        }
        for p in &snap.manifest.processes {
            for v in &p.vmas {
                for r in &v.pages {
                    if let RunContent::Data { first } = r.content {
                        if first.checked_add(r.count).is_none_or(|e| e > n) {
                            found.damage.push(format!(
                                "pid {} VMA {:#x}: run {first}..+{} is outside the \
                                 page table ({n} records)",
                                p.pid, v.start, r.count
                            ));
                        }
                    }
                }
            }
        }
        for f in &snap.manifest.shared_files {
            for r in &f.pages {
                if let RunContent::Data { first } = r.content {
                    if first.checked_add(r.count).is_none_or(|e| e > n) {
                        found.damage.push(format!(
                            "shared file {} ({}): run {first}..+{} is outside the page \
                             table ({n} records)",
                            f.id, f.path, r.count
                        ));
                    }
                }
            }
        }
        // The advice files beside it: damaged ones are ignored by restores (which then
        // read the packs), but they are damage all the same.
        match super::Hot::verify(self, &snap) {
            Ok(_) => {}
            Err(Ok(why)) => found.damage.push(format!(
                "hot pages file {} is damaged: {why} (restores ignore it and read the packs; \
                 remove it to have the next lazy run write it again)",
                self.hot_path(id).display()
            )),
            Err(Err(e)) => found.push(StoreError::io("read hot pages file", self.hot_path(id), e)),
        }
        match self.verify_working_sets(id) {
            Ok(_) => {}
            Err(Ok(why)) => found.damage.push(format!(
                "working set file {} is damaged: {why} (restores ignore it; remove it to \
                 have the next lazy run learn it again)",
                self.working_set_path(id).display()
            )),
            Err(Err(e)) => found.push(StoreError::io(
                "read working set file",
                self.working_set_path(id),
                e,
            )),
        }
        // Every pack once: one that is missing or cannot be opened is one line, and its
        // pages are not read one by one.
        let mut per_pack: BTreeMap<u32, u64> = BTreeMap::new();
        for i in 0..n {
            *per_pack.entry(snap.table().pack_of(i)).or_default() += 1;
        }
        let mut bad_packs = HashSet::new();
        for (&pack, &pages) in &per_pack {
            match snap.pack(pack) {
                Ok(_) => {}
                Err(StoreError::MissingPack { pack: path, .. }) => {
                    bad_packs.insert(pack);
                    found.damage.push(format!(
                        "pack {} is missing ({pages} of the snapshot's {n} pages are in \
                         it); the snapshot cannot be restored",
                        path.display()
                    ));
                }
                Err(e) => {
                    bad_packs.insert(pack);
                    found.push(e);
                }
            }
        }
        let mut buf = vec![0u8; VERIFY_CHUNK as usize * PAGE_SIZE];
        let mut first = 0;
        // A truncated pack: its length and how many pages lie beyond its end.
        let mut short: BTreeMap<PathBuf, (u64, u64)> = BTreeMap::new();
        while first < n {
            let count = VERIFY_CHUNK.min(n - first);
            let out = &mut buf[..count as usize * PAGE_SIZE];
            if snap.read_pages(first, count, out).is_err() {
                // Find every bad page of the chunk (those of a pack reported above aside).
                for i in first..first + count {
                    if bad_packs.contains(&snap.table().pack_of(i)) {
                        continue;
                    }
                    match snap.read_pages(i, 1, &mut out[..PAGE_SIZE]) {
                        Ok(()) => {}
                        Err(StoreError::ShortPack { pack, len, .. }) => {
                            short.entry(pack).or_insert((len, 0)).1 += 1;
                        }
                        Err(e) => found.push(e),
                    }
                }
            }
            *pages_checked += count;
            first += count;
            progress(first, n);
        }
        for (pack, (len, pages)) in short {
            found.damage.push(format!(
                "pack {} is truncated ({len} bytes): {pages} pages of the snapshot lie \
                 beyond its end",
                pack.display()
            ));
        }
    }

    /// Sizes of one snapshot, including how much of it is stored and shared.
    pub fn stats(&self, id: &SnapshotId) -> Result<SnapshotStats, StoreError> {
        let snap = self.load(id)?;
        let (logical_bytes, resident_pages, zero_pages) = manifest_sizes(&snap.manifest);
        let mut blocks: HashMap<(u32, u64), u32> = HashMap::new();
        for r in snap.table().records() {
            blocks.insert((r.loc.pack, r.loc.offset), r.loc.len);
        }
        let stored_bytes = blocks.values().map(|&l| u64::from(l)).sum();
        let mut others: HashSet<[u8; 32]> = HashSet::new();
        for other in self.ids()? {
            if other == *id {
                continue;
            }
            if let Ok(t) = TableMap::open(&self.table_path(&other), TABLE_MAGIC, true) {
                others.extend(t.records().map(|r| r.hash));
            }
        }
        let shared_with_others = (0..snap.page_count())
            .filter(|&i| others.contains(&snap.page_hash(i)))
            .count() as u64;
        Ok(SnapshotStats {
            logical_bytes,
            resident_pages,
            zero_pages,
            data_pages: snap.page_count(),
            stored_bytes,
            shared_with_others,
        })
    }
}
