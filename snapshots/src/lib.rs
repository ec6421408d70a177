//! Snapshot model, its on-disk encoding, and the content-addressed page store.
//! Pure Rust: no ptrace, no namespaces.

pub mod format;
pub mod model;
pub mod store;

pub use store::{Snapshot, SnapshotId, SnapshotInfo, SnapshotWriter, Store, StoreError};
