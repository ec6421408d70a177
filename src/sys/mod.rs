//! Thin kernel wrappers that no crate provides.

pub mod pidfd;
pub mod uffd;
