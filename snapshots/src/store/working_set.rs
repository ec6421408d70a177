//! The learned working sets of a snapshot: per process of its tree, the page-table
//! indexes its first lazy run faulted in, in order, until the app answered. Stored beside
//! the snapshot (`snapshots/<id>.ws`), outside its id: it is advice for prefetching, and
//! a damaged or missing one only costs speed, so reading it never fails a restore.
//!
//! ```text
//! WARMWS2 (per process, current):
//! +-----------------+--------------------+---------------------+------------------------------+
//! | "WARMWS2\0" (8) | processes u64      | blake3 (32) of body | body                         |
//! +-----------------+--------------------+---------------------+------------------------------+
//! body, per process (ascending pid): pid u64 | count u64 | count × u64 LE index
//!
//! WARMWS1 (one list, the root's; written before trees learned per process; still read):
//! | "WARMWS1\0" (8) | count u64 | blake3 (32) of the indexes | count × u64 LE index |
//! ```
//!
//! A page-table index belongs to exactly one page of one process, so an index list can
//! be handed to any process: a server ignores the indexes that are not its own. A
//! `WARMWS1` list (or one from a page server, whose protocol carries one list) is given
//! to every process that way.

use std::collections::BTreeMap;

use super::{fsutil, SnapshotId, Store, StoreError};

const MAGIC: &[u8; 8] = b"WARMWS1\0";
const MAGIC2: &[u8; 8] = b"WARMWS2\0";

/// The learned working sets of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkingSets {
    /// One list for the whole tree (`WARMWS1`, or from a page server): each process
    /// prefetches the indexes that are its own.
    Flat(Vec<u64>),
    /// Per process, by its pid in the snapshot.
    PerProcess(BTreeMap<i32, Vec<u64>>),
}

impl WorkingSets {
    /// The list process `pid` (its pid in the snapshot) prefetches.
    pub fn for_process(&self, pid: i32) -> Option<Vec<u64>> {
        match self {
            WorkingSets::Flat(v) => Some(v.clone()),
            WorkingSets::PerProcess(m) => m.get(&pid).cloned(),
        }
    }

    /// Every index, process after process.
    pub fn flatten(&self) -> Vec<u64> {
        match self {
            WorkingSets::Flat(v) => v.clone(),
            WorkingSets::PerProcess(m) => m.values().flatten().copied().collect(),
        }
    }
}

fn words(body: &[u8]) -> impl Iterator<Item = u64> + '_ {
    body.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
}

fn decode_v1(bytes: &[u8]) -> Result<Vec<u64>, String> {
    let (head, body) = bytes
        .split_at_checked(48)
        .ok_or_else(|| format!("truncated: {} bytes, the header alone is 48", bytes.len()))?;
    let count = u64::from_le_bytes(head[8..16].try_into().unwrap());
    if count.checked_mul(8) != Some(body.len() as u64) {
        return Err(format!(
            "it says {count} pages but holds {} bytes of them",
            body.len()
        ));
    }
    if blake3::hash(body).as_bytes() != &head[16..48] {
        return Err("checksum mismatch".into());
    }
    Ok(words(body).collect())
}

fn decode_v2(bytes: &[u8]) -> Result<BTreeMap<i32, Vec<u64>>, String> {
    let (head, body) = bytes
        .split_at_checked(48)
        .ok_or_else(|| format!("truncated: {} bytes, the header alone is 48", bytes.len()))?;
    let procs = u64::from_le_bytes(head[8..16].try_into().unwrap());
    if blake3::hash(body).as_bytes() != &head[16..48] {
        return Err("checksum mismatch".into());
    }
    if body.len() % 8 != 0 {
        return Err(format!("{} bytes of lists, not whole u64s", body.len()));
    }
    let mut out = BTreeMap::new();
    let mut w = body;
    for p in 0..procs {
        // Every length is checked against what is left before anything is copied.
        let (pid, count, rest) = match (w.get(..8), w.get(8..16)) {
            (Some(pid), Some(count)) => (
                u64::from_le_bytes(pid.try_into().unwrap()),
                u64::from_le_bytes(count.try_into().unwrap()),
                &w[16..],
            ),
            _ => return Err(format!("it says {procs} processes but ends after {p}")),
        };
        let pid = i32::try_from(pid).map_err(|_| format!("process {p}: pid {pid} out of range"))?;
        let list = usize::try_from(count)
            .ok()
            .and_then(|n| rest.get(..n.checked_mul(8)?))
            .ok_or_else(|| {
                format!(
                    "process {pid}: {count} pages, but only {} bytes are left",
                    rest.len()
                )
            })?;
        if out.insert(pid, words(list).collect()).is_some() {
            return Err(format!("process {pid} is listed twice"));
        }
        w = &rest[list.len()..];
    }
    if !w.is_empty() {
        return Err(format!("{} bytes after the last process", w.len()));
    }
    Ok(out)
}

/// Decodes a working-set file (either format); the error says what is wrong with it.
pub(crate) fn decode(bytes: &[u8]) -> Result<WorkingSets, String> {
    match bytes.get(..8) {
        Some(m) if m == MAGIC => decode_v1(bytes).map(WorkingSets::Flat),
        Some(m) if m == MAGIC2 => decode_v2(bytes).map(WorkingSets::PerProcess),
        _ => Err("wrong magic".into()),
    }
}

/// A `WARMWS1` file: one list.
pub(crate) fn encode_v1(pages: &[u64]) -> Vec<u8> {
    let body: Vec<u8> = pages.iter().flat_map(|p| p.to_le_bytes()).collect();
    let mut out = Vec::with_capacity(48 + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(pages.len() as u64).to_le_bytes());
    out.extend_from_slice(blake3::hash(&body).as_bytes());
    out.extend_from_slice(&body);
    out
}

/// A `WARMWS2` file: per process.
pub(crate) fn encode_v2(sets: &BTreeMap<i32, Vec<u64>>) -> Vec<u8> {
    let mut body = Vec::new();
    for (pid, pages) in sets {
        body.extend_from_slice(&(*pid as u64).to_le_bytes());
        body.extend_from_slice(&(pages.len() as u64).to_le_bytes());
        body.extend(pages.iter().flat_map(|p| p.to_le_bytes()));
    }
    let mut out = Vec::with_capacity(48 + body.len());
    out.extend_from_slice(MAGIC2);
    out.extend_from_slice(&(sets.len() as u64).to_le_bytes());
    out.extend_from_slice(blake3::hash(&body).as_bytes());
    out.extend_from_slice(&body);
    out
}

impl Store {
    pub(crate) fn working_set_path(&self, id: &SnapshotId) -> std::path::PathBuf {
        self.snaps_dir().join(format!("{id}.ws"))
    }

    /// Replaces the working set of `id` with one list (`WARMWS1`; a page server's
    /// clients send one list).
    pub fn save_working_set(&self, id: &SnapshotId, pages: &[u64]) -> Result<(), StoreError> {
        let out = encode_v1(pages);
        fsutil::write_atomic(&self.tmp_dir(), &self.working_set_path(id), &out)
    }

    /// Replaces the working sets of `id` (`WARMWS2`: per process, by pid in the snapshot).
    pub fn save_working_sets(
        &self,
        id: &SnapshotId,
        sets: &BTreeMap<i32, Vec<u64>>,
    ) -> Result<(), StoreError> {
        let out = encode_v2(sets);
        fsutil::write_atomic(&self.tmp_dir(), &self.working_set_path(id), &out)
    }

    /// The working sets of `id`, if learned and intact (either format).
    pub fn working_sets(&self, id: &SnapshotId) -> Option<WorkingSets> {
        let bytes = std::fs::read(self.working_set_path(id)).ok()?;
        decode(&bytes)
            .map_err(|why| {
                tracing::warn!(
                    "ignoring damaged working set of snapshot {}: {why}",
                    id.short()
                )
            })
            .ok()
    }

    /// What `warmstart verify` says of the working sets of `id`: `Ok(false)` if there
    /// are none, `Ok(true)` if intact, else why not (damage, or the read error).
    pub(crate) fn verify_working_sets(
        &self,
        id: &SnapshotId,
    ) -> Result<bool, Result<String, std::io::Error>> {
        match std::fs::read(self.working_set_path(id)) {
            Ok(bytes) => decode(&bytes).map(|_| true).map_err(Ok),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Err(e)),
        }
    }

    /// Every index of the working sets of `id` in one list, if learned and intact.
    pub fn working_set(&self, id: &SnapshotId) -> Option<Vec<u64>> {
        self.working_sets(id).map(|w| w.flatten())
    }
}

#[cfg(test)]
mod tests {
    use super::WorkingSets;
    use crate::store::Store;

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = crate::store::SnapshotId([7; 32]);
        assert_eq!(store.working_set(&id), None);
        store.save_working_set(&id, &[5, 1, 9]).unwrap();
        assert_eq!(store.working_set(&id), Some(vec![5, 1, 9]));
        let path = store.working_set_path(&id);
        let mut b = std::fs::read(&path).unwrap();
        let last = b.len() - 1;
        b[last] ^= 1;
        std::fs::write(&path, b).unwrap();
        assert_eq!(store.working_set(&id), None);
    }

    #[test]
    fn per_process_round_trip_old_format_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = crate::store::SnapshotId([8; 32]);
        // An old single list is still read: every process may use it.
        store.save_working_set(&id, &[4, 2]).unwrap();
        let old = store.working_sets(&id).unwrap();
        assert_eq!(old, WorkingSets::Flat(vec![4, 2]));
        assert_eq!(old.for_process(7), Some(vec![4, 2]));
        let sets = [(2, vec![9, 3, 4]), (5, vec![]), (7, vec![11])]
            .into_iter()
            .collect();
        store.save_working_sets(&id, &sets).unwrap();
        let got = store.working_sets(&id).unwrap();
        assert_eq!(got, WorkingSets::PerProcess(sets.clone()));
        assert_eq!(got.for_process(2), Some(vec![9, 3, 4]));
        assert_eq!(got.for_process(3), None);
        assert_eq!(store.working_set(&id), Some(vec![9, 3, 4, 11]));
        let path = store.working_set_path(&id);
        let mut b = std::fs::read(&path).unwrap();
        let last = b.len() - 1;
        b[last] ^= 1;
        std::fs::write(&path, &b).unwrap();
        assert_eq!(store.working_sets(&id), None);
        // Truncated: a count that runs past the end.
        b.truncate(b.len() - 8);
        std::fs::write(&path, &b).unwrap();
        assert_eq!(store.working_sets(&id), None);
    }
}
