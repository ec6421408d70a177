//! The files of a private `/tmp` (`record` gives the app a tmpfs of its own there, as a
//! container would): what the app created while warming up is part of its state (a
//! SQLite database in WAL mode maps its `-shm` file, which SQLite deletes when the last
//! connection closes). At the warm point every directory, file and symlink of it goes
//! into the snapshot; file contents through the page store (deduplicated like memory),
//! small ones inline; FIFOs are made again, empty. Sockets are left out: the fds that use them recreate
//! what they need.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use anyhow::{Context, Result};
use warmstart_snapshots::model::{FileOwner, TmpEntry, TmpKind, PAGE_SIZE};
use warmstart_snapshots::PageWriter;

/// Files up to this size are kept in the manifest itself.
const INLINE_MAX: u64 = PAGE_SIZE as u64;

/// Everything in `/tmp` as process `pid` sees it (through `/proc/PID/root`, since the
/// sandbox's tmpfs is invisible from here by path), parents before children. Mounts
/// inside it (the instance-private directories) are not descended into.
pub fn collect(pid: i32, writer: &mut PageWriter<'_>) -> Result<Vec<TmpEntry>> {
    // Through the sandbox's init (the app's parent), whose root is the sandbox's `/`:
    // the app's own root may be a chroot without the private /tmp in it.
    let holder = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = &s[s.rfind(')')? + 2..];
            after.split_whitespace().nth(1)?.parse::<i32>().ok()
        })
        .filter(|&ppid| ppid > 0)
        .unwrap_or(pid);
    let base = format!("/proc/{holder}/root/tmp");
    let dev = std::fs::symlink_metadata(&base)
        .with_context(|| format!("stat of the app's private /tmp ({base})"))?
        .dev();
    let mut out = Vec::new();
    let mut todo = vec![String::new()];
    while let Some(rel) = todo.pop() {
        let dir = Path::new(&base).join(&rel);
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .with_context(|| format!("listing /tmp/{rel} of process {pid}"))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        names.sort();
        for name in names {
            let Some(name) = name.to_str() else {
                tracing::warn!("/tmp/{rel}: skipping a file name that is not UTF-8: {name:?}");
                continue;
            };
            let rel = if rel.is_empty() {
                name.to_owned()
            } else {
                format!("{rel}/{name}")
            };
            let full = Path::new(&base).join(&rel);
            let meta = std::fs::symlink_metadata(&full)
                .with_context(|| format!("stat of /tmp/{rel} of process {pid}"))?;
            if meta.dev() != dev {
                continue;
            }
            let ft = meta.file_type();
            let kind = if ft.is_dir() {
                todo.push(rel.clone());
                TmpKind::Dir
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&full)
                    .with_context(|| format!("reading the link /tmp/{rel}"))?;
                TmpKind::Symlink {
                    target: target.to_string_lossy().into_owned(),
                }
            } else if ft.is_file() {
                file(&full, meta.size(), writer).with_context(|| format!("storing /tmp/{rel}"))?
            } else if ft.is_fifo() {
                TmpKind::Fifo
            } else {
                if !ft.is_socket() {
                    tracing::warn!("/tmp/{rel} is a device node: not kept in the snapshot");
                }
                continue;
            };
            out.push(TmpEntry {
                path: rel,
                owner: FileOwner {
                    uid: meta.uid(),
                    gid: meta.gid(),
                    mode: meta.mode() & 0o7777,
                },
                mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
                kind,
            });
        }
    }
    Ok(out)
}

fn file(path: &Path, size: u64, writer: &mut PageWriter<'_>) -> Result<TmpKind> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    if size <= INLINE_MAX {
        let mut inline = Vec::with_capacity(size as usize);
        f.read_to_end(&mut inline)?;
        return Ok(TmpKind::File {
            size: inline.len() as u64,
            inline,
            pages: Vec::new(),
        });
    }
    const CHUNK: usize = 4 << 20;
    let mut buf = vec![0u8; CHUNK];
    let mut pages = Vec::new();
    let mut total = 0u64;
    loop {
        let mut got = 0;
        while got < CHUNK {
            match f.read(&mut buf[got..])? {
                0 => break,
                n => got += n,
            }
        }
        if got == 0 {
            break;
        }
        let padded = got.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        buf[got..padded].fill(0);
        writer.add_pages(total / PAGE_SIZE as u64, &buf[..padded], &mut pages)?;
        total += got as u64;
        if got < CHUNK {
            break;
        }
    }
    Ok(TmpKind::File {
        size: total,
        inline: Vec::new(),
        pages,
    })
}
