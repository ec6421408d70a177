//! What must hold on this host before a snapshot may be restored: the same vdso and
//! CPU state layout, and every file it maps or holds open unchanged since the dump.

use anyhow::{bail, Context, Result};
use warmstart_snapshots::model::{FileDesc, FileIdentity, HostFacts, Manifest, VmaKind};

use crate::sys::vdso::host_facts;

pub fn host(snap: &HostFacts) -> Result<()> {
    let here = host_facts(snap.xsave_size)?;
    if here.vdso_hash != snap.vdso_hash {
        let entries = vdso_proxy_entries(snap, &here)?;
        tracing::debug!(
            "this host's vdso differs from the snapshot's: its {} entries go to this host's",
            entries.len()
        );
    }
    cpu(snap, &here)
}

/// The CPU: every feature the snapshot's CPU showed the app (it may have chosen code by
/// them), and room for every piece of its saved FPU/vector state.
pub fn cpu(snap: &HostFacts, here: &HostFacts) -> Result<()> {
    let missing: Vec<&str> = (snap.cpu_features.iter())
        .filter(|f| !here.cpu_features.contains(f))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        bail!(
            "this CPU lacks {} that the snapshot's CPU had: the app may have chosen code that \
             uses {} (glibc, compilers and JITs pick code by CPU feature at start-up), which \
             would fault here; restore on a CPU that has {}",
            missing.join(", "),
            if missing.len() == 1 { "it" } else { "them" },
            if missing.len() == 1 { "it" } else { "them all" },
        );
    }
    // State of a feature the app never saw (`record --cpu-baseline` hid it) may be
    // missing here: each thread's image is then checked to hold it unused
    // ([`xsave_for_here`]).
    let hidden = (0..64u8)
        .filter(|&i| {
            crate::sys::cpuid::component_feature(i)
                .is_some_and(|f| !snap.cpu_features.iter().any(|x| x == f))
        })
        .fold(0u64, |m, i| m | 1 << i);
    let lacking = snap.xsave_features & !here.xsave_features & !hidden;
    if lacking != 0 {
        let names: Vec<String> = (0..64u8)
            .filter(|&i| lacking >> i & 1 == 1)
            .map(crate::sys::cpuid::component_name)
            .collect();
        bail!(
            "this CPU does not enable xsave state the snapshot's saved (XCR0 {:#x} here, {:#x} \
             there: {} missing): its threads' FPU/vector registers cannot be loaded here; \
             restore on a CPU that has them",
            here.xsave_features,
            snap.xsave_features,
            names.join(", ")
        );
    }
    for &(i, _, size) in &snap.xsave_layout {
        if let Some(&(_, _, mine)) = here.xsave_layout.iter().find(|c| c.0 == i) {
            if mine != size {
                bail!(
                    "this CPU keeps {} in {mine} bytes, the snapshot's CPU in {size}: its \
                     threads' saved state cannot be moved here; restore on the same CPU kind",
                    crate::sys::cpuid::component_name(i)
                );
            }
        }
    }
    Ok(())
}

/// Whether this CPU lays saved xsave images out as the snapshot's CPU did (same XCR0,
/// same layout): they are then loaded as they are.
pub fn same_xsave_layout(snap: &HostFacts) -> bool {
    let (xcr0, layout) = crate::sys::cpuid::xsave_here();
    *xcr0 == snap.xsave_features && *layout == snap.xsave_layout
}

/// The xsave image `saved` of a thread of a snapshot taken on `snap`, as thread `tid`
/// of this CPU takes it: as it is when both CPUs lay it out alike, else moved into this
/// CPU's layout (see [`crate::sys::cpuid::convert_xsave`]) over the thread's own image.
pub fn xsave_for_here<'a>(
    snap: &HostFacts,
    saved: &'a [u8],
    tid: i32,
) -> Result<std::borrow::Cow<'a, [u8]>> {
    if same_xsave_layout(snap) {
        return Ok(saved.into());
    }
    let layout = &crate::sys::cpuid::xsave_here().1;
    let current = crate::sys::ptrace::get_xstate(tid)
        .with_context(|| format!("reading thread {tid}'s xsave image"))?;
    crate::sys::cpuid::convert_xsave(
        saved,
        &snap.xsave_layout,
        snap.xsave_features,
        &snap.cpu_features,
        &current,
        layout,
    )
    .map(Into::into)
    .map_err(|e| anyhow::anyhow!("moving the saved xsave state to this CPU's layout: {e}"))
}

/// For a snapshot whose vdso (`snap`) is not this host's (`here`): each entry of its vdso
/// with the entry of the same export in this host's (see
/// [`crate::vdso_symbols::proxy_entries`]), or the refusal naming what cannot be sent.
pub fn vdso_proxy_entries(snap: &HostFacts, here: &HostFacts) -> Result<Vec<(u64, u64)>> {
    let kernels = format!(
        "kernel {} here, {} there",
        here.kernel_release, snap.kernel_release
    );
    let there = crate::vdso_symbols::parse(&snap.vdso_image).map_err(|e| {
        anyhow::anyhow!(
            "this host's vdso differs from the one the snapshot was taken with ({kernels}) and \
             the snapshot's record of its vdso cannot be read ({e}): restore on a host running \
             the snapshot's kernel"
        )
    })?;
    let mine = crate::vdso_symbols::parse(&here.vdso_image)
        .map_err(|e| anyhow::anyhow!("this host's vdso cannot be read ({e}) ({kernels})"))?;
    crate::vdso_symbols::proxy_entries(&there, &mine, snap.vdso_image.len() as u64).map_err(|e| {
        anyhow::anyhow!(
            "{e} ({kernels}): the restored code may call it there and its calls cannot all be \
             sent to this host's vdso; restore on a host running the snapshot's kernel"
        )
    })
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
                if FileIdentity::write_only(*flags) {
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
                            .and_then(FileIdentity::hash_of)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(xcr0: u64, layout: &[(u8, u32, u32)], features: &[&str]) -> HostFacts {
        HostFacts {
            xsave_features: xcr0,
            xsave_layout: layout.to_vec(),
            cpu_features: features.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        }
    }

    /// A host without AVX-512 runs a snapshot recorded with AVX-512 hidden (its xsave
    /// components may be missing: each image is checked when loaded), not one whose app
    /// could see avx512f.
    #[test]
    fn missing_state_of_a_hidden_feature_is_no_refusal() {
        let avx512 = [
            (2u8, 576u32, 256u32),
            (5, 1088, 64),
            (6, 1152, 512),
            (7, 1664, 1024),
        ];
        let here = facts(0x7, &avx512[..1], &["sse2", "avx", "avx2"]);
        let v3 = facts(0xe7, &avx512, &["sse2", "avx", "avx2"]);
        cpu(&v3, &here).unwrap();
        let v4 = facts(0xe7, &avx512, &["sse2", "avx", "avx2", "avx512f"]);
        let e = cpu(&v4, &here).unwrap_err().to_string();
        assert!(e.contains("this CPU lacks avx512f"), "{e}");
        let mut odd = v3.clone();
        odd.xsave_features |= 1 << 19;
        let e = cpu(&odd, &here).unwrap_err().to_string();
        assert!(e.contains("APX"), "{e}");
    }
}
