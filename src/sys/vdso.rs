//! Facts about this host's vdso and CPU state that a restored process depends on.

use anyhow::{Context, Result};
use warmstart_snapshots::model::HostFacts;

/// The `[vvar]`/`[vvar_vclock]`/`[vdso]` lines of a `/proc/PID/maps` text, in address
/// order: (start, end, name).
pub fn vdso_layout(maps: &str) -> Vec<(u64, u64, String)> {
    maps.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let range = it.next()?;
            let name = it.nth(4)?;
            if !matches!(name, "[vdso]" | "[vvar]" | "[vvar_vclock]") {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
                name.to_string(),
            ))
        })
        .collect()
}

/// This process's `[vdso]` bytes (the same image is mapped into every process).
pub fn own_vdso_image() -> Result<Vec<u8>> {
    let maps = std::fs::read_to_string("/proc/self/maps").context("reading /proc/self/maps")?;
    let (start, end, _) = vdso_layout(&maps)
        .into_iter()
        .find(|v| v.2 == "[vdso]")
        .context("this process has no [vdso] mapping")?;
    // SAFETY: the vdso is mapped readable for the life of the process.
    let bytes = unsafe { std::slice::from_raw_parts(start as *const u8, (end - start) as usize) };
    Ok(bytes.to_vec())
}

/// XCR0: which xsave state components the OS enabled (0 without OSXSAVE).
pub fn xcr0() -> u64 {
    #[target_feature(enable = "xsave")]
    unsafe fn read() -> u64 {
        core::arch::x86_64::_xgetbv(0)
    }
    if std::is_x86_feature_detected!("xsave") {
        // SAFETY: xsave support was just checked; OSXSAVE is implied on Linux when it is.
        unsafe { read() }
    } else {
        0
    }
}

/// Host facts of the machine we run on; restore compares them with the snapshot's.
pub fn host_facts(xsave_size: u32) -> Result<HostFacts> {
    let uts = nix::sys::utsname::uname().context("uname")?;
    let vdso_image = own_vdso_image()?;
    Ok(HostFacts {
        kernel_release: uts.release().to_string_lossy().into_owned(),
        vdso_hash: *blake3::hash(&vdso_image).as_bytes(),
        vdso_image,
        xsave_features: super::cpuid::xsave_here().0,
        xsave_size,
        cpu_features: super::cpuid::features(),
        xsave_layout: super::cpuid::xsave_here().1.clone(),
        cpu_baseline: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vdso_layout_parses() {
        let m = "7ffc1000-7ffc5000 r--p 00000000 00:00 0                          [vvar]\n\
                 7ffc5000-7ffc7000 r--p 00000000 00:00 0                          [vvar_vclock]\n\
                 7ffc7000-7ffc9000 r-xp 00000000 00:00 0                          [vdso]\n\
                 7ffd0000-7ffd1000 rw-p 00000000 00:00 0 \n";
        let l = vdso_layout(m);
        assert_eq!(l.len(), 3);
        assert_eq!(l[2], (0x7ffc7000, 0x7ffc9000, "[vdso]".to_string()));
    }
}
