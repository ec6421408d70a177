//! Snapshot model, its on-disk encoding, and the content-addressed page store.
//! Pure Rust: no ptrace, no namespaces.

pub mod buffers;
pub mod format;
#[doc(hidden)]
pub mod fuzz;
pub mod model;
pub mod registry;
pub mod remote;
pub mod store;

pub use remote::{PageWriter, RemoteWriter};
pub use store::{Snapshot, SnapshotId, SnapshotInfo, SnapshotWriter, Store, StoreError};
