//! Open file descriptors: see [`crate::fds`], which holds the dump and restore of every
//! kind. Kept so that `dump::files::identity` and `dump::StdioPolicy` stay where callers
//! find them.

pub use crate::fds::{
    collect, collect_in_tree, identity, CollectOptions, Collected, StdioPolicy, TreeFiles,
};
