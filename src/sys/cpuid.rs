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
    features_seen(None)
}

/// The features of [`FEATURES`] an app sees through CPUID: all of this CPU's, or with
/// `baseline` only those [`Baseline::mask`] leaves visible.
pub fn features_seen(baseline: Option<Baseline>) -> Vec<String> {
    let mut cache: Vec<((u32, u32), [u32; 4])> = Vec::new();
    let mut out = Vec::new();
    for &(name, leaf, sub, reg, bit) in FEATURES {
        let regs = match cache.iter().find(|(k, _)| *k == (leaf, sub)) {
            Some((_, r)) => *r,
            None => {
                let mut r = cpuid(leaf, sub);
                if let Some(b) = baseline {
                    r = b.mask(leaf, sub, r);
                }
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

/// `record --cpu-baseline`: an x86-64 psABI micro-architecture level the app is shown
/// through CPUID, whatever more this CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Baseline {
    V2,
    V3,
    V4,
}

const fn bits(list: &[u8]) -> u32 {
    let mut m = 0u32;
    let mut i = 0;
    while i < list.len() {
        m |= 1 << list[i];
        i += 1;
    }
    m
}

/// Leaf 1 ECX bits that are no instruction an app can use (system and monitoring
/// features): shown as they are. DTES64, DS-CPL, VMX, SMX, EIST, TM2, CNXT-ID, SDBG,
/// xTPR, PDCM, PCID, DCA, x2APIC, TSC-deadline, hypervisor.
const SYS_1_ECX: u32 = bits(&[2, 4, 5, 6, 7, 8, 10, 11, 14, 15, 17, 18, 21, 24, 31]);
/// Leaf 1 ECX of x86-64-v2: SSE3, SSSE3, CX16, SSE4.1, SSE4.2, POPCNT.
const V2_1_ECX: u32 = bits(&[0, 9, 13, 19, 20, 23]);
/// Leaf 1 ECX added by x86-64-v3: FMA, MOVBE, XSAVE, OSXSAVE, AVX, F16C.
const V3_1_ECX: u32 = bits(&[12, 22, 26, 27, 28, 29]);
/// Leaf 7.0 EBX system bits: TSC_ADJUST, FDP_EXCPTN_ONLY, SMEP, INVPCID, RDT-M, FPU
/// CS/DS deprecation, RDT-A, SMAP, Intel PT.
const SYS_7_EBX: u32 = bits(&[1, 6, 7, 10, 12, 13, 15, 20, 25]);
/// Leaf 7.0 EBX of x86-64-v3: BMI1, AVX2, BMI2.
const V3_7_EBX: u32 = bits(&[3, 5, 8]);
/// Leaf 7.0 EBX added by x86-64-v4: AVX512F, AVX512DQ, AVX512CD, AVX512BW, AVX512VL.
const V4_7_EBX: u32 = bits(&[16, 17, 28, 30, 31]);
/// Leaf 7.0 ECX system bits: UMIP, TME, LA57, MAWAU (17-21), bus-lock detect, PKS.
const SYS_7_ECX: u32 = bits(&[2, 13, 16, 17, 18, 19, 20, 21, 24, 31]);
/// Leaf 7.0 EDX system bits (speculation controls and reports, hybrid): MD_CLEAR,
/// RTM_ALWAYS_ABORT, TSX_FORCE_ABORT, HYBRID, IBRS/IBPB, STIBP, L1D_FLUSH,
/// ARCH_CAPABILITIES, CORE_CAPABILITIES, SSBD.
const SYS_7_EDX: u32 = bits(&[10, 11, 13, 15, 26, 27, 28, 29, 30, 31]);
/// Leaf 0x80000001 ECX system bits: CmpLegacy, SVM, ExtApicSpace, AltMovCr8,
/// MisAlignSse, OSVW, IBS, SKINIT, WDT, TCE, NodeId, TopologyExtensions, the three
/// PerfCtr extensions, DataBreakpointExtension, PerfTsc, AddrMaskExt.
const SYS_81_ECX: u32 = bits(&[
    1, 2, 3, 4, 7, 9, 10, 12, 13, 17, 19, 22, 23, 24, 26, 27, 28, 30,
]);
/// Leaf 0x80000001 ECX of x86-64-v2 (LAHF/SAHF) and v3 (LZCNT, `abm`).
const V2_81_ECX: u32 = bits(&[0]);
const V3_81_ECX: u32 = bits(&[5]);
/// Leaf 0x80000001 EDX shown: AMD's copies of leaf 1 EDX (0-9, 12-17, 23, 24), SYSCALL,
/// NX, FFXSR, 1 GiB pages, long mode. Hidden: MMXEXT, RDTSCP, 3DNow!(Ext).
const KEEP_81_EDX: u32 = bits(&[
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17, 20, 23, 24, 25, 26, 29,
]);

impl Baseline {
    pub const FORMS: &'static str = "x86-64-v2, x86-64-v3, x86-64-v4";

    pub fn parse(s: &str) -> Result<Baseline, String> {
        match s {
            "x86-64-v2" => Ok(Baseline::V2),
            "x86-64-v3" => Ok(Baseline::V3),
            "x86-64-v4" => Ok(Baseline::V4),
            _ => Err(format!(
                "unknown CPU baseline {s:?}: the x86-64 psABI levels warmstart can show an \
                 app are {} (x86-64 itself is every x86-64 CPU)",
                Self::FORMS
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Baseline::V2 => "x86-64-v2",
            Baseline::V3 => "x86-64-v3",
            Baseline::V4 => "x86-64-v4",
        }
    }

    /// The features of [`FEATURES`] this level requires (`/proc/cpuinfo` names: `pni`
    /// is SSE3, `abm` LZCNT), the x86-64 base set included.
    pub fn required(self) -> Vec<&'static str> {
        let mut v = vec![
            "fpu", "cx8", "cmov", "mmx", "fxsr", "sse", "sse2", "syscall", "lm",
        ];
        v.extend([
            "cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3",
        ]);
        if self >= Baseline::V3 {
            v.extend([
                "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave",
            ]);
        }
        if self >= Baseline::V4 {
            v.extend(["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"]);
        }
        v
    }

    /// The XCR0 state components this level needs the OS to enable: SSE (and AVX for
    /// v3, the AVX-512 opmask and zmm state for v4).
    pub fn xcr0_needed(self) -> u64 {
        match self {
            Baseline::V2 => 0x3,
            Baseline::V3 => 0x7,
            Baseline::V4 => 0xe7,
        }
    }

    /// What an app shown this level sees for `CPUID leaf.sub` = `regs`. Leaves 1, 7.0,
    /// 0x80000001: every bit that is not this level's, the x86-64 base set or a system
    /// bit (one that names no instruction: the `SYS_*` lists) reads 0; 7.1 and 0x24
    /// (AVX10) read 0 entirely; 0xD.1 EAX hides XSAVEOPT, XSAVEC and XGETBV1. Every
    /// other leaf, and the xsave sizes and supported-state bits of leaf 0xD, are the
    /// CPU's own (ld.so sizes its xsave buffer from them while XSAVE writes what XCR0
    /// enables).
    pub fn mask(self, leaf: u32, sub: u32, regs: [u32; 4]) -> [u32; 4] {
        let (v3, v4) = (self >= Baseline::V3, self >= Baseline::V4);
        let lvl = |on: bool, m: u32| if on { m } else { 0 };
        let [a, b, c, d] = regs;
        match (leaf, sub) {
            (1, _) => [a, b, c & (SYS_1_ECX | V2_1_ECX | lvl(v3, V3_1_ECX)), d],
            (7, 0) => [
                a,
                b & (SYS_7_EBX | lvl(v3, V3_7_EBX) | lvl(v4, V4_7_EBX)),
                c & SYS_7_ECX,
                d & SYS_7_EDX,
            ],
            (7, 1) | (0x24, _) => [0; 4],
            (0xd, 1) => [a & !0b111, b, c, d],
            (0x8000_0001, _) => [
                a,
                b,
                c & (SYS_81_ECX | V2_81_ECX | lvl(v3, V3_81_ECX)),
                d & KEEP_81_EDX,
            ],
            _ => regs,
        }
    }

    /// Whether this CPU (and its OS) meets the level; else the error names what lacks.
    pub fn check_host(self) -> Result<(), String> {
        self.check(&features(), xsave_here().0)
    }

    /// [`check_host`](Self::check_host) for a CPU with features `have` and XCR0 `xcr0`.
    pub fn check(self, have: &[String], xcr0: u64) -> Result<(), String> {
        let mut missing: Vec<String> = self
            .required()
            .into_iter()
            .filter(|f| !have.iter().any(|h| h == f))
            .map(str::to_owned)
            .collect();
        let off = self.xcr0_needed() & !xcr0 & !0x3;
        if off != 0 {
            let names: Vec<String> = (2..64u8)
                .filter(|&i| off >> i & 1 == 1)
                .map(component_name)
                .collect();
            missing.push(format!("OS-enabled {}", names.join(", ")));
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "this host does not meet {}: it lacks {}; pick a lower --cpu-baseline or \
                 record on a host that has them",
                self.name(),
                missing.join(", ")
            ))
        }
    }
}

/// The CPU feature (a [`FEATURES`] name) an app needs to use xsave component `i`: its
/// state can only be in use if the app saw that feature.
pub fn component_feature(i: u8) -> Option<&'static str> {
    match i {
        2 => Some("avx"),
        5..=7 => Some("avx512f"),
        9 => Some("pku"),
        17 | 18 => Some("amx_tile"),
        _ => None,
    }
}

/// CPUID `leaf`.`sub` exactly as an app executing it here gets it (no clamping to the
/// highest leaf), for emulating its CPUID.
#[cfg(target_arch = "x86_64")]
pub fn cpuid_raw(leaf: u32, sub: u32) -> [u32; 4] {
    // SAFETY: CPUID exists on every x86_64 CPU and only reads the CPU's identification.
    #[allow(unused_unsafe)]
    let r = unsafe { std::arch::x86_64::__cpuid_count(leaf, sub) };
    [r.eax, r.ebx, r.ecx, r.edx]
}

#[cfg(not(target_arch = "x86_64"))]
pub fn cpuid_raw(_leaf: u32, _sub: u32) -> [u32; 4] {
    [0; 4]
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
/// in their initial state. A component this CPU lacks is dropped only when the image
/// holds it in its initial state (its XSTATE_BV bit clear) and the app never saw the
/// feature it belongs to (`features`, the snapshot's: `record --cpu-baseline` hid it).
/// An error names what cannot be moved.
pub fn convert_xsave(
    saved: &[u8],
    from: &[(u8, u32, u32)],
    from_xcr0: u64,
    features: &[String],
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
        let Some(&(_, to_off, to_size)) = to.iter().find(|c| c.0 == i) else {
            let seen = component_feature(i).is_none_or(|f| features.iter().any(|x| x == f));
            if bv >> i & 1 == 1 || seen {
                return Err(format!(
                    "this CPU has no {}{}",
                    component_name(i),
                    if bv >> i & 1 == 1 {
                        " and the thread's saved state uses it"
                    } else {
                        ", whose feature the app could see"
                    }
                ));
            }
            continue;
        };
        if bv >> i & 1 == 0 {
            continue;
        }
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
        let out = convert_xsave(&saved, &from, 0x7, &[], &current, &to).unwrap();
        assert_eq!(out.len(), 2696);
        assert!(out[..512].iter().all(|&b| b == 0x11));
        assert_eq!(u64::from_le_bytes(out[512..520].try_into().unwrap()), 0x7);
        assert!(out[520..576].iter().all(|&b| b == 0));
        assert!(out[576..832].iter().all(|&b| b == 0x22));
        // Moved: the same component at another offset.
        let moved = convert_xsave(&saved, &from, 0x7, &[], &current, &[(2, 1024, 256)]).unwrap();
        assert!(moved[1024..1280].iter().all(|&b| b == 0x22));
        // A component this CPU lacks, or keeps in another size, is refused by name.
        let err = convert_xsave(&saved, &from, 0x7, &[], &current, &[(5, 1088, 64)]).unwrap_err();
        assert!(err.contains("AVX (ymm"), "{err}");
        let err = convert_xsave(&saved, &from, 0x7, &[], &current, &[(2, 576, 512)]).unwrap_err();
        assert!(err.contains("512 bytes"), "{err}");
        // A component in its initial state (bit clear) needs no room.
        saved[512..520].copy_from_slice(&0x3u64.to_le_bytes());
        assert!(convert_xsave(&saved, &from, 0x7, &[], &current, &[]).is_ok());
    }

    /// Down to a CPU without AVX-512: the opmask / zmm components of an image taken
    /// under `--cpu-baseline x86-64-v3` are dropped when unused (XSTATE_BV clear) and the
    /// app never saw avx512f; refused by name when the image holds them in use, or when
    /// the app could see avx512f.
    #[test]
    fn xsave_down_conversion_drops_only_unused_hidden_state() {
        let from = [
            (2u8, 576u32, 256u32),
            (5, 1088, 64),
            (6, 1152, 512),
            (7, 1664, 1024),
        ];
        let to = [(2u8, 576u32, 256u32)];
        let v3: Vec<String> = ["sse2", "avx", "avx2"].map(String::from).to_vec();
        let mut saved = vec![0u8; 2688];
        saved[..512].fill(0x11);
        saved[512..520].copy_from_slice(&0x7u64.to_le_bytes());
        saved[576..832].fill(0x22);
        saved[1088..2688].fill(0x33);
        let mut current = vec![0x55u8; 832];
        current[512..520].copy_from_slice(&0x7u64.to_le_bytes());
        let out = convert_xsave(&saved, &from, 0xe7, &v3, &current, &to).unwrap();
        assert_eq!(out.len(), 832);
        assert!(out[..512].iter().all(|&b| b == 0x11));
        assert_eq!(u64::from_le_bytes(out[512..520].try_into().unwrap()), 0x7);
        assert!(out[576..832].iter().all(|&b| b == 0x22));
        // The zmm upper halves in use: refused, naming them.
        saved[512..520].copy_from_slice(&0x47u64.to_le_bytes());
        let err = convert_xsave(&saved, &from, 0xe7, &v3, &current, &to).unwrap_err();
        assert!(
            err.contains("AVX-512 zmm upper halves") && err.contains("uses it"),
            "{err}"
        );
        // Unused, but the app saw avx512f (it may hold AVX-512 code paths): refused.
        saved[512..520].copy_from_slice(&0x7u64.to_le_bytes());
        let v4: Vec<String> = ["avx", "avx2", "avx512f"].map(String::from).to_vec();
        let err = convert_xsave(&saved, &from, 0xe7, &v4, &current, &to).unwrap_err();
        assert!(
            err.contains("AVX-512 opmask") && err.contains("could see"),
            "{err}"
        );
        // A component of no known feature is never dropped.
        let err =
            convert_xsave(&saved, &[(19, 2688, 128)], 0x80007, &v3, &current, &to).unwrap_err();
        assert!(err.contains("APX"), "{err}");
    }

    /// The masks keep each level's features and the base set, and hide the rest of the
    /// FEATURES table; leaf 0xD's sizes pass unchanged.
    #[test]
    fn baseline_masks_by_level() {
        let all = [u32::MAX; 4];
        let names = |b: Baseline| -> Vec<&'static str> {
            FEATURES
                .iter()
                .filter(|&&(_, leaf, sub, reg, bit)| {
                    b.mask(leaf, sub, all)[reg as usize] >> bit & 1 == 1
                })
                .map(|f| f.0)
                .collect()
        };
        for b in [Baseline::V2, Baseline::V3, Baseline::V4] {
            let seen = names(b);
            let mut want = b.required();
            want.extend(["tsc", "clflush", "nx", "pdpe1gb"]);
            want.sort_unstable();
            let mut got = seen.clone();
            got.sort_unstable();
            assert_eq!(got, want, "{}", b.name());
        }
        assert_eq!(Baseline::V3.mask(0xd, 0, [1, 2, 3, 4]), [1, 2, 3, 4]);
        assert_eq!(
            Baseline::V3.mask(0xd, 2, [256, 576, 0, 0]),
            [256, 576, 0, 0]
        );
        assert_eq!(Baseline::V4.mask(7, 1, all), [0; 4]);
        assert_eq!(Baseline::V2.mask(0x4000_0000, 0, all), all);
        // A host below the level is refused, naming what it lacks.
        let v3: Vec<String> = Baseline::V3
            .required()
            .into_iter()
            .map(String::from)
            .collect();
        Baseline::V3.check(&v3, 0x7).unwrap();
        let e = Baseline::V4.check(&v3, 0x7).unwrap_err();
        assert!(
            e.contains("does not meet x86-64-v4")
                && e.contains("avx512f, avx512bw")
                && e.contains("AVX-512 opmask"),
            "{e}"
        );
        let no_avx2: Vec<String> = v3.iter().filter(|f| *f != "avx2").cloned().collect();
        let e = Baseline::V3.check(&no_avx2, 0x7).unwrap_err();
        assert!(e.contains("lacks avx2;"), "{e}");
        assert!(Baseline::parse("x86-64-v9")
            .unwrap_err()
            .contains("x86-64-v2, x86-64-v3"));
    }
}
