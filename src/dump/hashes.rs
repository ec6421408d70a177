//! Content hashes of the files a snapshot reads or maps (its executables, mapped files,
//! fds open for reading), taken at the dump so that a restore can accept a file whose
//! size, mtime or inode changed but whose bytes did not (a file put back with `cp`).
//!
//! A restore compares a hash only when the cheap identity (inode, size, mtime) differs,
//! so the cost is here: one blake3 pass over each distinct file, read by path while the
//! tree is frozen. Files the process only writes (logs) are not hashed: they may grow.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;

use warmstart_snapshots::model::{FileDesc, FileIdentity, Process, VmaKind};

/// What a file looked like when it was hashed: (dev, inode, size, mtime ns).
type Key = (u64, u64, u64, i128);

/// Hashes computed ahead, keyed by what each file looked like when read.
pub type Precomputed = HashMap<Key, [u8; 32]>;

/// Hashes, on a thread of its own, the files that processes `pids` (frozen) map, execute
/// or hold open for reading, as `/proc` lists them, so that the work overlaps the dump
/// of memory (which keeps one core busy). [`fill`] takes what it finds there and hashes
/// the rest itself.
pub fn start(pids: Vec<i32>, private: Vec<String>) -> std::thread::JoinHandle<Precomputed> {
    std::thread::spawn(move || {
        let t = std::time::Instant::now();
        let mut out = Precomputed::new();
        let mut tried = std::collections::HashSet::new();
        for pid in pids {
            for path in paths_of(pid) {
                if crate::private_dirs::is_private(&private, &path) || !tried.insert(path.clone()) {
                    continue;
                }
                if let Some((key, h)) = hash_path(&path) {
                    out.insert(key, h);
                }
            }
        }
        let bytes: u64 = out.keys().map(|k| k.2).sum();
        tracing::debug!(
            "hashed {} files ({} MiB) in {:?}, beside the dump",
            out.len(),
            bytes >> 20,
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

/// A regular file's key and hash, if it did not change while read.
fn hash_path(path: &str) -> Option<(Key, [u8; 32])> {
    let file = std::fs::File::open(path).ok()?;
    let key = |m: &std::fs::Metadata| {
        (
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        )
    };
    let before = file.metadata().ok()?;
    if !before.is_file() {
        return None;
    }
    let h = FileIdentity::hash_of(&file).ok()?;
    let after = file.metadata().ok()?;
    (key(&before) == key(&after)).then(|| (key(&after), h))
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
