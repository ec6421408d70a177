//! The user's directories warmstart keeps things in.

use std::path::PathBuf;

/// `$XDG_CACHE_HOME`, else `~/.cache`, if either is an absolute path.
pub fn cache_home() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|h| h.join(".cache"))
        })
}
