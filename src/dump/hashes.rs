//! Content hashes of the files a snapshot reads or maps (its executables, mapped files,
//! fds open for reading), taken at the dump so that a restore can accept a file whose
//! size, mtime or inode changed but whose bytes did not (a file put back with `cp`).
//!
//! A restore compares a hash only when the cheap identity (inode, size, mtime) differs,
//! so the cost is here: one blake3 pass over each distinct file, read by path while the
//! tree is frozen. Files the process only writes (logs) are not hashed: they may grow.
//!
//! Runtimes map large files (a JDK's `lib/modules` is 130 MB, `node` 90 MB) that stay the
//! same from one dump to the next, so hashes are kept in a per-user cache
//! (`$XDG_CACHE_HOME/warmstart/file-hashes`, by default `~/.cache/warmstart/...`) keyed by
//! device, inode, size, mtime *and* ctime: any write or `touch` of a file changes its
//! ctime, which only the kernel sets (to its clock), so a file with the key of a cached
//! hash has the bytes that were hashed. Timestamps have the kernel's clock tick as
//! granularity, so a file changed in the last [`RACY`] before it was hashed could change
//! again without a new ctime: its hash is not cached (git's "racy" rule).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;

use warmstart_snapshots::model::{FileDesc, FileIdentity, Process, VmaKind};

/// What a file looked like when it was hashed: (dev, inode, size, mtime ns).
type Key = (u64, u64, u64, i128);

/// Hashes computed ahead, keyed by what each file looked like when read.
pub type Precomputed = HashMap<Key, [u8; 32]>;

/// A cached hash's key: [`Key`] and the ctime in ns.
type CacheKey = (u64, u64, u64, i128, i128);

/// How recently changed a file may be for its hash to be cached.
const RACY: std::time::Duration = std::time::Duration::from_secs(2);

/// Entries the cache keeps at most (those of the last dump first).
const CACHE_ENTRIES: usize = 4096;

/// Where the cache of file hashes is, if `XDG_CACHE_HOME` or `HOME` names a directory.
fn cache_path() -> Option<PathBuf> {
    Some(crate::dirs::cache_home()?.join("warmstart/file-hashes"))
}

/// The cache's entries: one a line, `dev ino size mtime_ns ctime_ns hash` (hash in hex).
/// A line that does not parse is left out; a missing or unreadable cache is empty.
fn load_cache(path: &std::path::Path) -> HashMap<CacheKey, [u8; 32]> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return HashMap::new();
    };
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let [dev, ino, size, mtime, ctime, hash] = f[..] else {
                return None;
            };
            let hash = (hash.len() == 64).then_some(hash)?;
            let mut h = [0u8; 32];
            for (i, b) in h.iter_mut().enumerate() {
                *b = u8::from_str_radix(hash.get(2 * i..2 * i + 2)?, 16).ok()?;
            }
            let key = (
                dev.parse().ok()?,
                ino.parse().ok()?,
                size.parse().ok()?,
                mtime.parse().ok()?,
                ctime.parse().ok()?,
            );
            Some((key, h))
        })
        .collect()
}

/// Replaces the cache with `used` (this dump's files) and as many of `old` as fit
/// under [`CACHE_ENTRIES`]: a temp file renamed over it, so a reader sees the old or the
/// new whole. Not synced: losing it costs hashing again, nothing more. Errors are
/// ignored for the same reason.
fn save_cache(
    path: &std::path::Path,
    used: &HashMap<CacheKey, [u8; 32]>,
    old: &HashMap<CacheKey, [u8; 32]>,
) {
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let mut text = String::new();
    let rest = old.iter().filter(|(k, _)| !used.contains_key(k));
    for (k, h) in used.iter().chain(rest).take(CACHE_ENTRIES) {
        let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
        text += &format!("{} {} {} {} {} {hex}\n", k.0, k.1, k.2, k.3, k.4);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    // A name of its own (another dump may be saving beside this one); never truncated.
    let tmp = dir.join(format!("file-hashes.{}.{nanos}.tmp", std::process::id()));
    let Ok(mut f) = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
    else {
        return;
    };
    if f.write_all(text.as_bytes()).is_err() || std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Hashes, on a thread of its own, the files that processes `pids` (frozen) map, execute
/// or hold open for reading, as `/proc` lists them, so that the work overlaps the dump
/// of memory (which keeps one core busy); files whose hash is cached from an earlier
/// dump (see the module's doc) are not read. [`fill`] takes what it finds there and
/// hashes the rest itself.
pub fn start(pids: Vec<i32>, private: Vec<String>) -> std::thread::JoinHandle<Precomputed> {
    std::thread::spawn(move || {
        let t = std::time::Instant::now();
        let cache_path = cache_path();
        let cache = cache_path.as_deref().map(load_cache).unwrap_or_default();
        let mut used = HashMap::new();
        let mut out = Precomputed::new();
        let mut tried = std::collections::HashSet::new();
        let mut read = 0u64;
        for pid in pids {
            for path in paths_of(pid) {
                if crate::private_dirs::is_private(&private, &path) || !tried.insert(path.clone()) {
                    continue;
                }
                if let Some((key, ctime, h, cacheable)) = hash_path(&path, &cache) {
                    if cacheable {
                        used.insert((key.0, key.1, key.2, key.3, ctime), h);
                    }
                    read += u64::from(!cache.contains_key(&(key.0, key.1, key.2, key.3, ctime)))
                        * key.2;
                    out.insert(key, h);
                }
            }
        }
        if let Some(p) = &cache_path {
            if used.keys().any(|k| !cache.contains_key(k)) {
                save_cache(p, &used, &cache);
            }
        }
        let bytes: u64 = out.keys().map(|k| k.2).sum();
        tracing::debug!(
            "hashed {} files ({} MiB, {} MiB of them read) in {:?}, beside the dump",
            out.len(),
            bytes >> 20,
            read >> 20,
            t.elapsed()
        );
        out
    })
}

/// The files process `pid` executes, maps and reads, by path.
fn paths_of(pid: i32) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) {
        out.push(exe.to_string_lossy().into_owned());
    }
    if let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) {
        for line in maps.lines() {
            // ADDR PERMS OFFSET DEV INODE PATH: the path is what follows the fifth field.
            let mut rest = line;
            for _ in 0..5 {
                rest = rest.trim_start();
                rest = rest.find(' ').map_or("", |i| &rest[i..]);
            }
            let path = rest.trim_start();
            if path.starts_with('/') && !path.ends_with(" (deleted)") {
                out.push(path.to_owned());
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in dir.flatten() {
            let Ok(link) = std::fs::read_link(e.path()) else {
                continue;
            };
            let fdinfo = e.file_name();
            let flags =
                std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fdinfo.to_string_lossy()))
                    .ok()
                    .and_then(|t| {
                        t.lines()
                            .find_map(|l| l.strip_prefix("flags:"))
                            .and_then(|v| i32::from_str_radix(v.trim(), 8).ok())
                    });
            let link = link.to_string_lossy();
            if link.starts_with('/') && flags.is_some_and(|f| !FileIdentity::write_only(f)) {
                out.push(link.into_owned());
            }
        }
    }
    out
}

/// A regular file's key, ctime and hash, if it did not change while read, from `cache`
/// when it holds the file; and whether the hash may be cached (the file was not changed
/// within [`RACY`] before it was read).
fn hash_path(
    path: &str,
    cache: &HashMap<CacheKey, [u8; 32]>,
) -> Option<(Key, i128, [u8; 32], bool)> {
    let file = std::fs::File::open(path).ok()?;
    let key = |m: &std::fs::Metadata| {
        (
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        )
    };
    let ctime = |m: &std::fs::Metadata| m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128;
    let before = file.metadata().ok()?;
    if !before.is_file() {
        return None;
    }
    let (k, c) = (key(&before), ctime(&before));
    if let Some(h) = cache.get(&(k.0, k.1, k.2, k.3, c)) {
        return Some((k, c, *h, true));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_nanos() as i128;
    let h = FileIdentity::hash_of(&file).ok()?;
    let after = file.metadata().ok()?;
    let unchanged = k == key(&after) && c == ctime(&after);
    unchanged.then(|| (k, c, h, now - c >= RACY.as_nanos() as i128))
}

/// Fills `hash` of every file the processes read or map, except those under the
/// instance-private directories (`private`), which the snapshot carries itself; from
/// `pre` where it holds the file as the dump saw it.
pub fn fill(processes: &mut [Process], private: &[String], pre: &Precomputed) {
    let mut done: HashMap<(u64, u64), Option<[u8; 32]>> = HashMap::new();
    let mut fill_one = |f: &mut FileIdentity| {
        if crate::private_dirs::is_private(private, &f.path) {
            return;
        }
        if let Some(h) = pre.get(&(f.dev, f.ino, f.size, f.mtime_ns)) {
            f.hash = Some(*h);
            return;
        }
        let key = (f.dev, f.ino);
        let h = *done.entry(key).or_insert_with(|| hash_of(f));
        f.hash = h;
    };
    for p in processes.iter_mut().filter(|p| p.zombie.is_none()) {
        fill_one(&mut p.exe);
        for v in &mut p.vmas {
            if let VmaKind::File { file } = &mut v.kind {
                fill_one(file);
            }
        }
        for fd in &mut p.fds {
            if let FileDesc::Regular { file, flags, .. } = &mut fd.file {
                if !FileIdentity::write_only(*flags) {
                    fill_one(file);
                }
            }
        }
    }
}

/// blake3 of the file at `f.path`, if it still is the file `f` describes (same inode,
/// size and mtime before and after reading); `None` otherwise.
fn hash_of(f: &FileIdentity) -> Option<[u8; 32]> {
    let file = std::fs::File::open(&f.path).ok()?;
    let same = |m: &std::fs::Metadata| {
        m.dev() == f.dev
            && m.ino() == f.ino
            && m.size() == f.size
            && m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128 == f.mtime_ns
    };
    if !same(&file.metadata().ok()?) {
        return None;
    }
    let h = FileIdentity::hash_of(&file).ok()?;
    same(&file.metadata().ok()?).then_some(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_hash_serves_only_the_file_as_it_was_hashed() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"one").unwrap();
        let path = f.to_str().unwrap();
        let (key, ctime, h, cacheable) = hash_path(path, &HashMap::new()).unwrap();
        assert_eq!(h, *blake3::hash(b"one").as_bytes());
        assert!(
            !cacheable,
            "changed just now: its ctime may not move on a second change"
        );
        // An entry for the file as it is (ctime included) is taken without reading it.
        let cached = (key.0, key.1, key.2, key.3, ctime);
        let cache = HashMap::from([(cached, [7u8; 32])]);
        assert_eq!(hash_path(path, &cache).unwrap().2, [7; 32]);
        // One whose ctime differs (the file was written or touched since) is not.
        let other = HashMap::from([((key.0, key.1, key.2, key.3, ctime - 1), [7u8; 32])]);
        assert_eq!(hash_path(path, &other).unwrap().2, h);
        // Saved and loaded whole; a damaged line is left out.
        let file = d.path().join("cache/file-hashes");
        save_cache(&file, &cache, &HashMap::new());
        assert_eq!(load_cache(&file), cache);
        let mut text = std::fs::read_to_string(&file).unwrap();
        text += "1 2 3 4 5 not-a-hash\n";
        std::fs::write(&file, text).unwrap();
        assert_eq!(load_cache(&file), cache);
    }
}
