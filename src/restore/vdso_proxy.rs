//! Restoring on a host whose vdso differs from the snapshot's (CRIU's vdso proxy).
//!
//! The host's `[vdso]` and `[vvar]` stay mapped in the restored process, together as the
//! kernel laid them out: where they are in the restoring child when the snapshot has
//! nothing there, else moved to a range free in both layouts. At the snapshot's vdso
//! address comes the snapshot's own vdso image (recorded at the dump) with a jump at each
//! of its exports' entries to the same export of the host's vdso
//! ([`crate::vdso_symbols::proxy_image`]). Code that kept vdso addresses (glibc resolves
//! them once, at start) goes on calling them and lands in the host's vdso, which reads
//! the host's `[vvar]`.
//!
//! What a restored process shows: `/proc/PID/maps` names the proxy
//! `/memfd:warmstart-vdso-proxy (deleted)` (a private file mapping at the snapshot's vdso
//! address) and `[vdso]`/`[vvar]` where the host's are; the snapshot's `[vvar]` range is
//! left unmapped (only the old vdso code read it, and none of it runs). The auxv is
//! restored as recorded, so `AT_SYSINFO_EHDR` names the proxy, whose ELF headers and
//! symbols are the snapshot's vdso's: a lookup through it finds the proxied entries.

use std::io::Write;
use std::os::fd::OwnedFd;

use anyhow::{anyhow, bail, Context, Result};
use warmstart_snapshots::model::{Manifest, Process, VmaKind};

use crate::sys::maps::MapEntry;

/// The proxy of one restored process.
pub struct Proxy {
    /// A memfd holding the proxy image, mapped at the snapshot's vdso address.
    pub fd: OwnedFd,
    /// Where the host's vdso family (its first mapping) goes, and its length.
    pub host_at: u64,
    pub len: u64,
}

fn is_vdso_family(m: &MapEntry) -> bool {
    matches!(m.name.as_str(), "[vdso]" | "[vvar]" | "[vvar_vclock]")
}

/// Where this host's vdso family, now at `start..end` in this process (layout `own`),
/// goes in process `p`: where it is when `p` has nothing there, else the highest range
/// free in both layouts.
fn place(start: u64, end: u64, own: &[MapEntry], p: &Process) -> Result<u64> {
    let len = end - start;
    if !p.vmas.iter().any(|v| v.start < end && start < v.end) {
        return Ok(start);
    }
    let mut used: Vec<(u64, u64)> = own
        .iter()
        .map(|m| (m.start, m.end))
        .chain(p.vmas.iter().map(|v| (v.start, v.end)))
        .collect();
    used.sort_unstable();
    super::child::gap_below(&used, len, super::child::GAP_TOP)
        .ok_or_else(|| anyhow!("no free address range of {len:#x} bytes for this host's vdso"))
}

/// The proxy for process `p` of `m` restored by this process (layout `own`), or `None`
/// when this host's vdso is the snapshot's. The error is why the snapshot's vdso calls
/// cannot be sent here.
pub fn prepare(m: &Manifest, p: &Process, own: &[MapEntry]) -> Result<Option<Proxy>> {
    let here = crate::sys::vdso::host_facts(m.host.xsave_size)?;
    if here.vdso_hash == m.host.vdso_hash {
        return Ok(None);
    }
    let entries = super::checks::vdso_proxy_entries(&m.host, &here)?;
    let family: Vec<&MapEntry> = own.iter().filter(|m| is_vdso_family(m)).collect();
    let (Some(start), Some(end), Some(ours)) = (
        family.iter().map(|m| m.start).min(),
        family.iter().map(|m| m.end).max(),
        family.iter().find(|m| m.name == "[vdso]"),
    ) else {
        bail!("this process has no [vdso] mapping to send the snapshot's vdso calls to");
    };
    let Some(v) = p.vmas.iter().find(|v| v.kind == VmaKind::Vdso) else {
        bail!("process {} of the snapshot has no [vdso] mapping", p.pid);
    };
    let img_len = m.host.vdso_image.len() as u64;
    if v.len() != img_len.next_multiple_of(4096) {
        bail!(
            "process {}'s [vdso] mapping ({:#x} bytes) is not the size of the vdso image the \
             snapshot recorded ({img_len:#x} bytes): its record is damaged; record it again",
            p.pid,
            v.len()
        );
    }
    let len = end - start;
    let host_at = place(start, end, own, p)?;
    let image = crate::vdso_symbols::proxy_image(
        &m.host.vdso_image,
        &entries,
        host_at + (ours.start - start),
    );
    let fd = nix::sys::memfd::memfd_create(
        c"warmstart-vdso-proxy",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .context("memfd_create for the vdso proxy")?;
    let mut f = std::fs::File::from(fd);
    f.write_all(&image)
        .context("writing the vdso proxy into its memfd")?;
    Ok(Some(Proxy {
        fd: f.into(),
        host_at,
        len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use warmstart_snapshots::model::Vma;

    fn entry(start: u64, end: u64, name: &str) -> MapEntry {
        let line = format!("{start:x}-{end:x} r--p 00000000 00:00 0 {name}");
        crate::sys::maps::parse(&line).unwrap().remove(0)
    }

    fn vma(start: u64, end: u64) -> Vma {
        Vma {
            start,
            end,
            prot: 1,
            shared: false,
            flags: Default::default(),
            kind: VmaKind::Anon {
                name: String::new(),
            },
            offset: 0,
            pages: Vec::new(),
        }
    }

    /// The host's vdso stays where it is unless the snapshot has something there; then
    /// it goes where neither layout has anything.
    #[test]
    fn host_vdso_moves_only_out_of_the_way() {
        let own = vec![
            entry(0x7fff_f000_0000, 0x7fff_f000_4000, "[vvar]"),
            entry(0x7fff_f000_4000, 0x7fff_f000_6000, "[vdso]"),
        ];
        let (start, end) = (0x7fff_f000_0000, 0x7fff_f000_6000);
        let apart = Process {
            vmas: vec![vma(0x5555_0000_0000, 0x5555_0001_0000)],
            ..Default::default()
        };
        assert_eq!(place(start, end, &own, &apart).unwrap(), start);
        let over = Process {
            vmas: vec![vma(0x7fff_efff_0000, 0x7fff_f000_1000)],
            ..Default::default()
        };
        let at = place(start, end, &own, &over).unwrap();
        let len = end - start;
        assert!(at + len <= super::super::child::GAP_TOP, "{at:#x}");
        for (s, e) in own
            .iter()
            .map(|m| (m.start, m.end))
            .chain(over.vmas.iter().map(|v| (v.start, v.end)))
        {
            assert!(at + len <= s || e <= at, "{at:#x} overlaps {s:#x}-{e:#x}");
        }
    }
}
