//! Facts about this host's vdso and CPU state that a restored process depends on.

use anyhow::{Context, Result};

/// The `[vvar]`/`[vvar_vclock]`/`[vdso]` layout of the current process, in address order.
pub fn own_vdso_layout() -> Result<Vec<(String, u64, u64)>> {
    let text = std::fs::read_to_string("/proc/self/maps").context("reading /proc/self/maps")?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let name = l.split_whitespace().nth(5)?;
            if !matches!(name, "[vdso]" | "[vvar]" | "[vvar_vclock]") {
                return None;
            }
            let (s, e) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                name.to_owned(),
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
            ))
        })
        .collect())
}

/// blake3 of this process's `[vdso]` bytes (the same image is mapped into every process).
pub fn own_vdso_hash() -> Result<[u8; 32]> {
    let (_, start, end) = own_vdso_layout()?
        .into_iter()
        .find(|v| v.0 == "[vdso]")
        .context("this process has no [vdso] mapping")?;
    // SAFETY: the vdso is mapped readable for the life of the process.
    let bytes = unsafe { std::slice::from_raw_parts(start as *const u8, (end - start) as usize) };
    Ok(*blake3::hash(bytes).as_bytes())
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
