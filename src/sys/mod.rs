//! Thin kernel wrappers that no crate provides.
