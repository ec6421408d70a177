//! What CPUID says of this CPU: the features an app can see (and choose code by), the
//! standard-format xsave layout; and moving a saved xsave image from the layout of the
//! CPU it was saved on to this one's.

/// A CPUID output register.
#[derive(Clone, Copy)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// Where CPUID reports each feature warmstart checks, by its `/proc/cpuinfo` name: the
/// ones glibc's string and math functions, compilers' multi-versioned code and the JITs
/// (HotSpot, V8) choose code by.
const FEATURES: &[(&str, u32, u32, Reg, u8)] = &[
    ("fpu", 1, 0, Reg::Edx, 0),
    ("tsc", 1, 0, Reg::Edx, 4),
    ("cx8", 1, 0, Reg::Edx, 8),
    ("cmov", 1, 0, Reg::Edx, 15),
    ("clflush", 1, 0, Reg::Edx, 19),
    ("mmx", 1, 0, Reg::Edx, 23),
    ("fxsr", 1, 0, Reg::Edx, 24),
    ("sse", 1, 0, Reg::Edx, 25),
    ("sse2", 1, 0, Reg::Edx, 26),
    ("pni", 1, 0, Reg::Ecx, 0),
    ("pclmulqdq", 1, 0, Reg::Ecx, 1),
    ("ssse3", 1, 0, Reg::Ecx, 9),
    ("fma", 1, 0, Reg::Ecx, 12),
    ("cx16", 1, 0, Reg::Ecx, 13),
    ("sse4_1", 1, 0, Reg::Ecx, 19),
    ("sse4_2", 1, 0, Reg::Ecx, 20),
    ("movbe", 1, 0, Reg::Ecx, 22),
    ("popcnt", 1, 0, Reg::Ecx, 23),
    ("aes", 1, 0, Reg::Ecx, 25),
    ("xsave", 1, 0, Reg::Ecx, 26),
    ("avx", 1, 0, Reg::Ecx, 28),
    ("f16c", 1, 0, Reg::Ecx, 29),
    ("rdrand", 1, 0, Reg::Ecx, 30),
    ("fsgsbase", 7, 0, Reg::Ebx, 0),
    ("bmi1", 7, 0, Reg::Ebx, 3),
    ("hle", 7, 0, Reg::Ebx, 4),
    ("avx2", 7, 0, Reg::Ebx, 5),
    ("bmi2", 7, 0, Reg::Ebx, 8),
    ("erms", 7, 0, Reg::Ebx, 9),
    ("rtm", 7, 0, Reg::Ebx, 11),
    ("avx512f", 7, 0, Reg::Ebx, 16),
    ("avx512dq", 7, 0, Reg::Ebx, 17),
    ("rdseed", 7, 0, Reg::Ebx, 18),
    ("adx", 7, 0, Reg::Ebx, 19),
    ("avx512ifma", 7, 0, Reg::Ebx, 21),
    ("clflushopt", 7, 0, Reg::Ebx, 23),
    ("clwb", 7, 0, Reg::Ebx, 24),
    ("avx512cd", 7, 0, Reg::Ebx, 28),
    ("sha_ni", 7, 0, Reg::Ebx, 29),
    ("avx512bw", 7, 0, Reg::Ebx, 30),
    ("avx512vl", 7, 0, Reg::Ebx, 31),
    ("avx512vbmi", 7, 0, Reg::Ecx, 1),
    ("pku", 7, 0, Reg::Ecx, 3),
    ("waitpkg", 7, 0, Reg::Ecx, 5),
    ("avx512_vbmi2", 7, 0, Reg::Ecx, 6),
    ("gfni", 7, 0, Reg::Ecx, 8),
    ("vaes", 7, 0, Reg::Ecx, 9),
    ("vpclmulqdq", 7, 0, Reg::Ecx, 10),
    ("avx512_vnni", 7, 0, Reg::Ecx, 11),
    ("avx512_bitalg", 7, 0, Reg::Ecx, 12),
    ("avx512_vpopcntdq", 7, 0, Reg::Ecx, 14),
    ("rdpid", 7, 0, Reg::Ecx, 22),
    ("movdiri", 7, 0, Reg::Ecx, 27),
    ("movdir64b", 7, 0, Reg::Ecx, 28),
    ("fsrm", 7, 0, Reg::Edx, 4),
    ("avx512_vp2intersect", 7, 0, Reg::Edx, 8),
    ("serialize", 7, 0, Reg::Edx, 14),
    ("amx_bf16", 7, 0, Reg::Edx, 22),
    ("avx512_fp16", 7, 0, Reg::Edx, 23),
    ("amx_tile", 7, 0, Reg::Edx, 24),
    ("amx_int8", 7, 0, Reg::Edx, 25),
    ("avx_vnni", 7, 1, Reg::Eax, 4),
    ("avx512_bf16", 7, 1, Reg::Eax, 5),
    ("xsaveopt", 0xd, 1, Reg::Eax, 0),
    ("xsavec", 0xd, 1, Reg::Eax, 1),
    ("xgetbv1", 0xd, 1, Reg::Eax, 2),
    ("lahf_lm", 0x8000_0001, 0, Reg::Ecx, 0),
    ("abm", 0x8000_0001, 0, Reg::Ecx, 5),
    ("sse4a", 0x8000_0001, 0, Reg::Ecx, 6),
    ("3dnowprefetch", 0x8000_0001, 0, Reg::Ecx, 8),
    ("xop", 0x8000_0001, 0, Reg::Ecx, 11),
    ("fma4", 0x8000_0001, 0, Reg::Ecx, 16),
    ("tbm", 0x8000_0001, 0, Reg::Ecx, 21),
    ("syscall", 0x8000_0001, 0, Reg::Edx, 11),
    ("nx", 0x8000_0001, 0, Reg::Edx, 20),
    ("pdpe1gb", 0x8000_0001, 0, Reg::Edx, 26),
    ("rdtscp", 0x8000_0001, 0, Reg::Edx, 27),
    ("lm", 0x8000_0001, 0, Reg::Edx, 29),
];

/// CPUID `leaf`.`sub` as (eax, ebx, ecx, edx); zeros beyond the CPU's highest leaf.
#[cfg(target_arch = "x86_64")]
fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    use std::arch::x86_64::__cpuid_count;
    // SAFETY: CPUID exists on every x86_64 CPU and only reads the CPU's identification.
    #[allow(unused_unsafe)]
    let max = unsafe { __cpuid_count(leaf & 0x8000_0000, 0) }.eax;
    if leaf > max {
        return [0; 4];
    }
    // SAFETY: as above; `leaf` is at most the highest leaf of its range.
    #[allow(unused_unsafe)]
    let r = unsafe { __cpuid_count(leaf, sub) };
    [r.eax, r.ebx, r.ecx, r.edx]
}

#[cfg(not(target_arch = "x86_64"))]
fn cpuid(_leaf: u32, _sub: u32) -> [u32; 4] {
    [0; 4]
}

/// The features of [`FEATURES`] this CPU has, in that table's order.
pub fn features() -> Vec<String> {
    let mut cache: Vec<((u32, u32), [u32; 4])> = Vec::new();
    let mut out = Vec::new();
    for &(name, leaf, sub, reg, bit) in FEATURES {
        let regs = match cache.iter().find(|(k, _)| *k == (leaf, sub)) {
            Some((_, r)) => *r,
            None => {
                let r = cpuid(leaf, sub);
                cache.push(((leaf, sub), r));
                r
            }
        };
        if regs[reg as usize] >> bit & 1 == 1 {
            out.push(name.to_owned());
        }
    }
    out
}

/// The standard-format xsave layout of the components of `xcr0` above SSE:
/// `(component, offset, size)` from CPUID leaf 0xD.
pub fn xsave_layout(xcr0: u64) -> Vec<(u8, u32, u32)> {
    (2..64u8)
        .filter(|&i| xcr0 >> i & 1 == 1)
        .map(|i| {
            let r = cpuid(0xd, u32::from(i));
            (i, r[1], r[0])
        })
        .collect()
}

/// An XCR0 and its [`xsave_layout`].
pub type XsaveFacts = (u64, Vec<(u8, u32, u32)>);

/// This CPU's XCR0 and its [`xsave_layout`], read once.
pub fn xsave_here() -> &'static XsaveFacts {
    static HERE: std::sync::OnceLock<XsaveFacts> = std::sync::OnceLock::new();
    HERE.get_or_init(|| {
        let xcr0 = super::vdso::xcr0();
        (xcr0, xsave_layout(xcr0))
    })
}

/// A name for xsave component `i`, for messages.
pub fn component_name(i: u8) -> String {
    match i {
        2 => "AVX (ymm upper halves)".into(),
        3 => "MPX bounds registers".into(),
        4 => "MPX configuration".into(),
        5 => "AVX-512 opmask registers".into(),
        6 => "AVX-512 zmm upper halves".into(),
        7 => "AVX-512 zmm16-31".into(),
        9 => "protection keys (PKRU)".into(),
        17 => "AMX tile configuration".into(),
        18 => "AMX tile data".into(),
        19 => "APX extended registers".into(),
        n => format!("xsave component {n}"),
    }
}

/// Offset of the xsave header in a standard-format image (after the 512-byte legacy
/// area), and its length.
const HEADER: usize = 512;
const HEADER_LEN: usize = 64;

/// The xsave image `saved` (standard format, components `from` of XCR0 `from_xcr0`) laid
/// out as this CPU's image `current` of the same thread (as ptrace returns it: the size
/// and layout the kernel takes back): the legacy area, and each component the saved
/// image holds moved to where this CPU keeps it; components only this CPU has are left
/// in their initial state. An error names what cannot be moved.
pub fn convert_xsave(
    saved: &[u8],
    from: &[(u8, u32, u32)],
    from_xcr0: u64,
    current: &[u8],
    to: &[(u8, u32, u32)],
) -> Result<Vec<u8>, String> {
    if saved.len() < HEADER + HEADER_LEN || current.len() < HEADER + HEADER_LEN {
        return Err(format!(
            "an xsave image of {} bytes (here {}) is shorter than its header",
            saved.len(),
            current.len()
        ));
    }
    let mut out = current.to_vec();
    out[..HEADER].copy_from_slice(&saved[..HEADER]);
    let bv = u64::from_le_bytes(saved[HEADER..HEADER + 8].try_into().unwrap()) & from_xcr0;
    out[HEADER..HEADER + HEADER_LEN].fill(0);
    out[HEADER..HEADER + 8].copy_from_slice(&bv.to_le_bytes());
    for &(i, off, size) in from {
        if bv >> i & 1 == 0 {
            continue;
        }
        let Some(&(_, to_off, to_size)) = to.iter().find(|c| c.0 == i) else {
            return Err(format!("this CPU has no {}", component_name(i)));
        };
        if to_size != size {
            return Err(format!(
                "this CPU keeps {} in {to_size} bytes, the snapshot's in {size}",
                component_name(i)
            ));
        }
        let (off, to_off, size) = (off as usize, to_off as usize, size as usize);
        let src = saved
            .get(off..off + size)
            .ok_or_else(|| format!("the saved image lacks {}", component_name(i)))?;
        out.get_mut(to_off..to_off + size)
            .ok_or_else(|| format!("this CPU's image lacks room for {}", component_name(i)))?
            .copy_from_slice(src);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_cpu_has_the_x86_64_baseline() {
        let f = features();
        for want in ["fpu", "cx8", "cmov", "fxsr", "sse", "sse2", "syscall", "lm"] {
            assert!(f.iter().any(|n| n == want), "{want} missing from {f:?}");
        }
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let flags: Vec<&str> = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .unwrap()
            .split_whitespace()
            .collect();
        // What CPUID says agrees with the kernel's view, for the features the kernel
        // does not hide.
        for n in ["sse4_2", "avx", "avx2", "bmi2", "avx512f", "sha_ni"] {
            if flags.contains(&n) {
                assert!(f.iter().any(|x| x == n), "{n} in cpuinfo, not in {f:?}");
            }
        }
    }

    /// A component moves to its offset on the other CPU; one the saved CPU lacked stays
    /// initial (its bit clear); the legacy area comes along.
    #[test]
    fn xsave_image_moves_between_layouts() {
        let from = [(2u8, 576u32, 256u32)];
        let to = [(2u8, 576u32, 256u32), (5, 1088, 64), (9, 2688, 8)];
        let mut saved = vec![0u8; 832];
        saved[..512].fill(0x11);
        saved[512..520].copy_from_slice(&0x7u64.to_le_bytes());
        saved[576..832].fill(0x22);
        let mut current = vec![0x55u8; 2696];
        current[512..520].copy_from_slice(&0x2e7u64.to_le_bytes());
        let out = convert_xsave(&saved, &from, 0x7, &current, &to).unwrap();
        assert_eq!(out.len(), 2696);
        assert!(out[..512].iter().all(|&b| b == 0x11));
        assert_eq!(u64::from_le_bytes(out[512..520].try_into().unwrap()), 0x7);
        assert!(out[520..576].iter().all(|&b| b == 0));
        assert!(out[576..832].iter().all(|&b| b == 0x22));
        // Moved: the same component at another offset.
        let moved = convert_xsave(&saved, &from, 0x7, &current, &[(2, 1024, 256)]).unwrap();
        assert!(moved[1024..1280].iter().all(|&b| b == 0x22));
        // A component this CPU lacks, or keeps in another size, is refused by name.
        let err = convert_xsave(&saved, &from, 0x7, &current, &[(5, 1088, 64)]).unwrap_err();
        assert!(err.contains("AVX (ymm"), "{err}");
        let err = convert_xsave(&saved, &from, 0x7, &current, &[(2, 576, 512)]).unwrap_err();
        assert!(err.contains("512 bytes"), "{err}");
        // A component in its initial state (bit clear) needs no room.
        saved[512..520].copy_from_slice(&0x3u64.to_le_bytes());
        assert!(convert_xsave(&saved, &from, 0x7, &current, &[]).is_ok());
    }
}
