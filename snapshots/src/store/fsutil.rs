//! Small filesystem helpers: private directories and files, atomic durable writes.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::StoreError;

pub(crate) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::io(action, path, source)
}

/// Creates `path` as a 0700 directory unless it already is a directory.
pub(crate) fn mkdir_private(path: &Path) -> Result<(), StoreError> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => {
            return Err(StoreError::NotADirectory {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspect", path)(e)),
    }
    match DirBuilder::new().recursive(true).mode(0o700).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => Err(StoreError::NotADirectory {
            path: path.to_path_buf(),
        }),
        Err(e) => Err(io_err("create directory", path)(e)),
    }
}

/// Opens a fresh, uniquely named 0600 file in `tmp_dir`.
pub(crate) fn create_tmp(tmp_dir: &Path, prefix: &str) -> Result<(File, PathBuf), StoreError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = tmp_dir.join(format!("{prefix}.{}.{n}.tmp", std::process::id()));
        match OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(f) => return Ok((f, path)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err("create temporary file", &path)(e)),
        }
    }
}

pub(crate) fn fsync_dir(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory", path))
}

/// Durably replaces `dest` with `bytes`: temp file, fsync, rename, fsync of the directory.
pub(crate) fn write_atomic(tmp_dir: &Path, dest: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let (mut f, tmp) = create_tmp(tmp_dir, "write")?;
    let res = f
        .write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_err("write", &tmp))
        .and_then(|()| fs::rename(&tmp, dest).map_err(io_err("rename into place", dest)));
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res?;
    fsync_dir(dest.parent().unwrap_or(Path::new(".")))
}

/// Removes a file, treating "already gone" as success. Returns the bytes freed.
pub(crate) fn remove_file(path: &Path) -> Result<u64, StoreError> {
    let len = fs::symlink_metadata(path).map(|m| m.len()).unwrap_or(0);
    match fs::remove_file(path) {
        Ok(()) => Ok(len),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}
