//! What must hold on this host before a snapshot may be restored: the same vdso and
//! CPU state layout, and every file it maps or holds open unchanged since the dump.

use anyhow::{bail, Context, Result};
use warmstart_snapshots::model::{FileDesc, FileIdentity, HostFacts, Manifest, VmaKind};

use crate::dump::host_facts;

pub fn host(snap: &HostFacts) -> Result<()> {
    let here = host_facts(snap.xsave_size)?;
    if here.vdso_hash != snap.vdso_hash {
        bail!(
            "this host's vdso differs from the one the snapshot was taken with (kernel {} here, {} \
             there): restored code would call into the wrong vdso; restore on a host running the \
             snapshot's kernel",
            here.kernel_release,
            snap.kernel_release
        );
    }
    if here.xsave_features != snap.xsave_features {
        bail!(
            "this CPU's enabled xsave features (XCR0 {:#x}) differ from the snapshot's ({:#x}): \
             its saved FPU/vector state cannot be loaded here; restore on the same CPU kind",
            here.xsave_features,
            snap.xsave_features
        );
    }
    Ok(())
}

/// How a process uses a file, which decides what may have changed since the dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Use {
    /// Read or mapped (or both read and written, or executed): it must hold the same
    /// bytes. Its inode, size and mtime are compared first, and only when they differ
    /// its contents, against the blake3 hash taken at the dump.
    Read,
    /// Only written (`O_WRONLY`): it may have grown, since it was the same file. An
    /// `O_APPEND` fd goes on at its (new) end, another at its offset.
    Write { append: bool },
}

/// Files whose identity the snapshot depends on, each with what uses it and how.
fn files(m: &Manifest) -> Vec<(&FileIdentity, String, Use)> {
    let mut out = Vec::new();
    for p in m.processes.iter().filter(|p| p.zombie.is_none()) {
        out.push((
            &p.exe,
            format!("the executable of process {}", p.pid),
            Use::Read,
        ));
        for v in &p.vmas {
            if let VmaKind::File { file } = &v.kind {
                out.push((
                    file,
                    format!("mapped at {:x} by process {}", v.start, p.pid),
                    Use::Read,
                ));
            }
        }
        for fd in &p.fds {
            if let FileDesc::Regular { file, flags, pos } = &fd.file {
                if crate::dump::hashes::write_only(*flags) {
                    let append = flags & libc::O_APPEND != 0;
                    let how = if append {
                        "appended to".to_owned()
                    } else {
                        format!("written at offset {pos}")
                    };
                    out.push((
                        file,
                        format!("{how} by fd {} of process {}", fd.fd, p.pid),
                        Use::Write { append },
                    ));
                } else {
                    out.push((
                        file,
                        format!("open as fd {} of process {}", fd.fd, p.pid),
                        Use::Read,
                    ));
                }
            }
        }
    }
    out
}

/// Every file the snapshot reads, maps or writes still fits it (see [`Use`]); files in
/// the snapshot's private `/tmp` and instance-private directories are its own and are
/// not looked at.
pub fn unchanged_files(m: &Manifest) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut private = crate::private_dirs::dirs();
    if m.private_tmp.is_some() {
        private.push("/tmp".to_owned());
    }
    // Contents compared once per path.
    let mut same_bytes: std::collections::HashMap<&str, bool> = Default::default();
    for (f, used, how) in files(m) {
        if crate::private_dirs::is_private(&private, &f.path) {
            continue;
        }
        if !seen.insert((&f.path, f.ino, how)) {
            continue;
        }
        let meta = match std::fs::metadata(&f.path) {
            Ok(meta) => meta,
            Err(e) => bail!(
                "file {} ({used}) is gone since the dump ({e}): put it back at that path, \
                 or record a new snapshot",
                f.path
            ),
        };
        let mtime = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
        // An inode number can be reused at once by a new file: the birth time tells.
        let born = crate::fds::btime_ns(&meta);
        let replaced = meta.ino() != f.ino
            || meta.dev() != f.dev
            || (born.is_some() && f.btime_ns.is_some() && born != f.btime_ns);
        if !replaced && meta.size() == f.size && mtime == f.mtime_ns {
            continue;
        }
        match how {
            Use::Write { append } => {
                if replaced {
                    bail!(
                        "file {} ({used}) was replaced since the dump (another file is at \
                         that path now, as after a log rotation): the process would go on \
                         writing {} a file it never wrote. Put the original file back, or \
                         record a new snapshot",
                        f.path,
                        if append { "at the end of" } else { "into" }
                    );
                }
                if meta.size() < f.size {
                    bail!(
                        "file {} ({used}) shrank since the dump ({} bytes then, {} now): the \
                         process only writes it, so it may grow, but what it wrote before the \
                         dump must still be there. Put the file back as it was (or at least \
                         its first {} bytes), or record a new snapshot",
                        f.path,
                        f.size,
                        meta.size(),
                        f.size
                    );
                }
            }
            Use::Read => {
                if meta.size() != f.size {
                    bail!(
                        "file {} ({used}) changed size since the dump ({} bytes then, {} now): \
                         the process reads it, so restoring would run it on different bytes. \
                         Put the file back as it was (a copy is fine: its contents are \
                         compared, not its mtime), or record a new snapshot",
                        f.path,
                        f.size,
                        meta.size()
                    );
                }
                let what = if replaced {
                    "was replaced (another inode, same size)"
                } else {
                    "was modified (new mtime, same size)"
                };
                let Some(want) = f.hash else {
                    bail!(
                        "file {} ({used}) {what} since the dump, and the snapshot holds no hash \
                         of its contents to compare (it could not be read at the dump): put the \
                         original file back untouched, or record a new snapshot",
                        f.path
                    );
                };
                let same = match same_bytes.get(f.path.as_str()) {
                    Some(&same) => same,
                    None => {
                        let got = std::fs::File::open(&f.path)
                            .and_then(crate::dump::hashes::hash_reader)
                            .with_context(|| {
                                format!("reading {} ({used}) to compare it", f.path)
                            })?;
                        same_bytes.insert(&f.path, got == want);
                        got == want
                    }
                };
                if !same {
                    bail!(
                        "file {} ({used}) {what} since the dump and its contents differ (blake3 \
                         of the {} bytes changed): the process reads it, so restoring would run \
                         it on different bytes. Put the file back as it was, or record a new \
                         snapshot",
                        f.path,
                        f.size
                    );
                }
                tracing::debug!("{} ({used}) {what} but holds the same bytes", f.path);
            }
        }
    }
    Ok(())
}

/// What the tree needs that a restore cannot build: every process's parent is in the
/// snapshot, the root is alive, and each session and process group can be recreated by
/// forking (a session is inherited or started with `setsid`; a group has its leader in
/// the snapshot, or is the root's). A group or session whose leader is gone would need a
/// helper process (as CRIU does), which warmstart does not do yet.
pub fn tree(m: &Manifest) -> Result<()> {
    let Some(root) = m.processes.first() else {
        bail!("the snapshot holds no process");
    };
    if root.zombie.is_some() {
        bail!(
            "process {} ({}), the root of the snapshot, is a zombie: there is nothing to restore",
            root.pid,
            root.comm
        );
    }
    let by_pid = |pid: i32| m.processes.iter().find(|q| q.pid == pid);
    for p in &m.processes[1..] {
        let Some(parent) = by_pid(p.ppid) else {
            bail!(
                "process {} ({}) has parent {}, which is not in the snapshot (corrupt manifest?)",
                p.pid,
                p.comm,
                p.ppid
            );
        };
        if p.sid != p.pid && p.sid != parent.sid {
            bail!(
                "process {} ({}) is in session {}, its parent {} in session {}: a session \
                 entered after fork cannot be recreated (that needs a helper process, which \
                 warmstart does not do yet); checkpoint the tree before it calls setsid",
                p.pid,
                p.comm,
                p.sid,
                parent.pid,
                parent.sid
            );
        }
        if p.pgid != p.pid && by_pid(p.pgid).is_none() && p.pgid != root.pgid {
            bail!(
                "process {} ({}) is in process group {}, whose leader is not part of the tree \
                 (it exited, or lives outside the tree): recreating such a group needs a \
                 helper process, which warmstart does not do yet",
                p.pid,
                p.comm,
                p.pgid
            );
        }
        if let Some(leader) = by_pid(p.pgid) {
            if leader.sid != p.sid {
                bail!(
                    "process {} ({}) is in process group {} of another session ({} vs {}): \
                     corrupt manifest?",
                    p.pid,
                    p.comm,
                    p.pgid,
                    p.sid,
                    leader.sid
                );
            }
        }
    }
    crate::fds::pty::check(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use warmstart_snapshots::model::Process;

    fn proc(pid: i32, ppid: i32, pgid: i32, sid: i32) -> Process {
        Process {
            pid,
            ppid,
            pgid,
            sid,
            comm: format!("p{pid}"),
            ..Default::default()
        }
    }

    fn manifest(processes: Vec<Process>) -> Manifest {
        Manifest {
            processes,
            ..Default::default()
        }
    }

    #[test]
    fn trees_that_forking_can_rebuild() {
        // The root's session and group are its caller's (a shell job).
        let m = manifest(vec![
            proc(10, 1, 9, 5),
            proc(11, 10, 9, 5),   // inherits both
            proc(12, 10, 12, 5),  // its own group
            proc(13, 10, 12, 5),  // joins a sibling's group
            proc(14, 10, 14, 14), // its own session
            proc(15, 14, 15, 14), // a group in that session
            proc(16, 14, 15, 14), // joins it
        ]);
        tree(&m).unwrap();
    }

    #[test]
    fn session_entered_after_fork_is_refused() {
        let m = manifest(vec![
            proc(10, 1, 10, 10),
            proc(11, 10, 11, 11),
            // 12 is 10's child in 11's session: no fork gives that (it needs a helper).
            proc(12, 10, 11, 11),
        ]);
        let e = tree(&m).unwrap_err().to_string();
        assert!(e.contains("process 12 (p12) is in session 11"), "{e}");
    }

    #[test]
    fn group_without_its_leader_is_refused() {
        let m = manifest(vec![proc(10, 1, 10, 10), proc(11, 10, 42, 10)]);
        let e = tree(&m).unwrap_err().to_string();
        assert!(
            e.contains(
                "process 11 (p11) is in process group 42, whose leader is not part of the tree"
            ),
            "{e}"
        );
    }

    #[test]
    fn zombie_root_and_orphan_are_refused() {
        let mut z = proc(10, 1, 10, 10);
        z.zombie = Some(0);
        assert!(tree(&manifest(vec![z]))
            .unwrap_err()
            .to_string()
            .contains("is a zombie"));
        let m = manifest(vec![proc(10, 1, 10, 10), proc(11, 99, 10, 10)]);
        assert!(tree(&m).unwrap_err().to_string().contains("has parent 99"));
    }
}
