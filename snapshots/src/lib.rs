//! Snapshot model, its on-disk encoding, and the content-addressed page store.
//! Pure Rust: no ptrace, no namespaces.

pub mod model;
