//! The learned working set of a snapshot: the page-table indexes its first lazy run
//! faulted in, in order, until the app answered. Stored beside the snapshot
//! (`snapshots/<id>.ws`), outside its id: it is advice for prefetching, and a damaged or
//! missing one only costs speed, so reading it never fails a restore.
//!
//! ```text
//! +----------+---------+-----------+------------------+---------------------+
//! | "WARMWS1\0" (8) | count u64 | blake3 (32) of the indexes | count × u64 LE index |
//! +----------+---------+-----------+------------------+---------------------+
//! ```

use super::{fsutil, SnapshotId, Store, StoreError};

const MAGIC: &[u8; 8] = b"WARMWS1\0";

impl Store {
    pub(crate) fn working_set_path(&self, id: &SnapshotId) -> std::path::PathBuf {
        self.snaps_dir().join(format!("{id}.ws"))
    }

    /// Replaces the working set of `id`.
    pub fn save_working_set(&self, id: &SnapshotId, pages: &[u64]) -> Result<(), StoreError> {
        let body: Vec<u8> = pages.iter().flat_map(|p| p.to_le_bytes()).collect();
        let mut out = Vec::with_capacity(48 + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(pages.len() as u64).to_le_bytes());
        out.extend_from_slice(blake3::hash(&body).as_bytes());
        out.extend_from_slice(&body);
        fsutil::write_atomic(&self.tmp_dir(), &self.working_set_path(id), &out)
    }

    /// The working set of `id`, if one was learned and is intact.
    pub fn working_set(&self, id: &SnapshotId) -> Option<Vec<u64>> {
        let bytes = std::fs::read(self.working_set_path(id)).ok()?;
        let (head, body) = bytes.split_at_checked(48)?;
        let count = u64::from_le_bytes(head[8..16].try_into().ok()?);
        if &head[..8] != MAGIC
            || body.len() as u64 != count.checked_mul(8)?
            || blake3::hash(body).as_bytes() != &head[16..48]
        {
            tracing::warn!("ignoring damaged working set of snapshot {}", id.short());
            return None;
        }
        Some(
            body.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
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
}
