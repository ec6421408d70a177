//! The functions a vdso image exports: its ELF dynamic symbol table, read from the
//! image's bytes (as mapped, or as a snapshot recorded them). A restore compares the
//! snapshot's vdso with this host's by these: what an app can have called is exactly
//! these entry points.

use std::collections::BTreeMap;

const SHT_DYNSYM: u32 = 11;
const PT_LOAD: u32 = 1;
const STT_FUNC: u8 = 2;
const STB_GLOBAL: u8 = 1;
const STB_WEAK: u8 = 2;

/// Exported function name -> offset of its entry from the image's start.
pub type Symbols = BTreeMap<String, u64>;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn off(v: u64) -> Option<usize> {
    usize::try_from(v).ok()
}

/// The exported functions of the ELF64 little-endian image `img` (a vdso), with their
/// entries as offsets into `img`. The error names what is wrong with the image.
pub fn parse(img: &[u8]) -> Result<Symbols, String> {
    if img.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err("it is not an ELF image".into());
    }
    if img.get(4) != Some(&2) || img.get(5) != Some(&1) {
        return Err("it is not a 64-bit little-endian ELF image".into());
    }
    let short = || "it is cut short (its headers point past its end)".to_owned();
    // The load address the symbols' values are relative to: the first PT_LOAD's vaddr
    // less its file offset.
    let phoff = off(u64_at(img, 0x20).ok_or_else(short)?).ok_or_else(short)?;
    let phentsize = usize::from(u16_at(img, 0x36).ok_or_else(short)?);
    let phnum = usize::from(u16_at(img, 0x38).ok_or_else(short)?);
    let mut base = None;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(img, ph).ok_or_else(short)? == PT_LOAD {
            let offset = u64_at(img, ph + 8).ok_or_else(short)?;
            let vaddr = u64_at(img, ph + 16).ok_or_else(short)?;
            base = Some(vaddr.wrapping_sub(offset));
            break;
        }
    }
    let base = base.ok_or("it has no loadable segment")?;
    let shoff = off(u64_at(img, 0x28).ok_or_else(short)?).ok_or_else(short)?;
    let shentsize = usize::from(u16_at(img, 0x3a).ok_or_else(short)?);
    let shnum = usize::from(u16_at(img, 0x3c).ok_or_else(short)?);
    let section = |i: usize| -> Option<(u32, u32, usize, usize, usize)> {
        let sh = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((
            u32_at(img, sh + 4)?,        // sh_type
            u32_at(img, sh + 40)?,       // sh_link
            off(u64_at(img, sh + 24)?)?, // sh_offset
            off(u64_at(img, sh + 32)?)?, // sh_size
            off(u64_at(img, sh + 56)?)?, // sh_entsize
        ))
    };
    let mut out = Symbols::new();
    let mut found = false;
    for i in 0..shnum {
        let (kind, link, at, size, entsize) = section(i).ok_or_else(short)?;
        if kind != SHT_DYNSYM {
            continue;
        }
        found = true;
        let (_, _, str_at, str_size, _) = section(link as usize).ok_or_else(short)?;
        let strtab = img.get(str_at..str_at + str_size).ok_or_else(short)?;
        let syms = img.get(at..at + size).ok_or_else(short)?;
        if entsize < 24 {
            return Err(format!("its symbols are {entsize} bytes each, not 24"));
        }
        for s in syms.chunks_exact(entsize) {
            let name = u32_at(s, 0).ok_or_else(short)? as usize;
            let info = s[4];
            let shndx = u16_at(s, 6).ok_or_else(short)?;
            let value = u64_at(s, 8).ok_or_else(short)?;
            let bind = info >> 4;
            if info & 0xf != STT_FUNC || shndx == 0 || !matches!(bind, STB_GLOBAL | STB_WEAK) {
                continue;
            }
            let name = strtab
                .get(name..)
                .and_then(|t| t.split(|&c| c == 0).next())
                .ok_or_else(short)?;
            let name = String::from_utf8_lossy(name).into_owned();
            let entry = value.wrapping_sub(base);
            if entry >= img.len() as u64 {
                return Err(format!("its symbol {name} points outside it"));
            }
            out.insert(name, entry);
        }
    }
    if !found {
        return Err("it has no dynamic symbol table".into());
    }
    Ok(out)
}

/// `movabs rax, ADDR; jmp rax`: what an entry of the snapshot's vdso becomes in a proxy.
/// `rax` is free at a function's entry in the x86-64 ABI (caller-saved, no argument in
/// it), so the host's function sees the call exactly as it was made.
pub const JUMP_LEN: u64 = 12;

fn jump(to: u64) -> [u8; JUMP_LEN as usize] {
    let mut j = [0u8; JUMP_LEN as usize];
    j[..2].copy_from_slice(&[0x48, 0xb8]);
    j[2..10].copy_from_slice(&to.to_le_bytes());
    j[10..].copy_from_slice(&[0xff, 0xe0]);
    j
}

/// For every entry of the snapshot's vdso (exports `there`, image `len` bytes), the
/// entry of the same export in this host's (`here`): (offset there, offset here), by
/// offset there. The error is why its calls cannot all be sent to this host's vdso.
pub fn proxy_entries(there: &Symbols, here: &Symbols, len: u64) -> Result<Vec<(u64, u64)>, String> {
    let missing: Vec<&str> = there
        .keys()
        .filter(|n| !here.contains_key(*n))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "this host's vdso lacks {}, which the snapshot's vdso exports",
            missing.join(", ")
        ));
    }
    // Names of one entry (aliases such as clock_gettime and __vdso_clock_gettime) must
    // lead to one entry here too.
    let mut by_entry: BTreeMap<u64, (&str, u64)> = BTreeMap::new();
    for (name, &at) in there {
        let to = here[name];
        match by_entry.get(&at) {
            Some(&(other, to2)) if to2 != to => {
                return Err(format!(
                    "the snapshot's vdso has {other} and {name} at one entry, this host's \
                     at two"
                ))
            }
            _ => {
                by_entry.insert(at, (name, to));
            }
        }
    }
    let entries: Vec<(u64, u64, &str)> = by_entry.iter().map(|(&a, &(n, t))| (a, t, n)).collect();
    for w in entries.windows(2) {
        if w[1].0 - w[0].0 < JUMP_LEN {
            return Err(format!(
                "the snapshot's vdso entries {} and {} are closer than a jump ({JUMP_LEN} bytes)",
                w[0].2, w[1].2
            ));
        }
    }
    if let Some(&(at, _, name)) = entries.last() {
        if at + JUMP_LEN > len {
            return Err(format!(
                "the snapshot's vdso entry {name} is too close to its end"
            ));
        }
    }
    Ok(entries.into_iter().map(|(a, t, _)| (a, t)).collect())
}

/// The snapshot's vdso image `img` as a proxy: a jump at each of its `entries` to the
/// same export of this host's vdso mapped at `host_vdso`.
pub fn proxy_image(img: &[u8], entries: &[(u64, u64)], host_vdso: u64) -> Vec<u8> {
    let mut out = img.to_vec();
    for &(at, to) in entries {
        let at = at as usize;
        out[at..at + JUMP_LEN as usize].copy_from_slice(&jump(host_vdso + to));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This process's own vdso exports the clock functions, each inside the image.
    #[test]
    fn own_vdso() {
        let img = crate::sys::vdso::own_vdso_image().unwrap();
        let syms = parse(&img).unwrap();
        for name in ["__vdso_clock_gettime", "__vdso_gettimeofday", "__vdso_time"] {
            let at = syms.get(name).copied();
            assert!(at.is_some_and(|a| a < img.len() as u64), "{name}: {syms:?}");
        }
    }

    #[test]
    fn proxy_entries_name_what_cannot_be_sent() {
        let there: Symbols = [("a".into(), 0x10), ("b".into(), 0x40), ("b2".into(), 0x40)].into();
        let here: Symbols = [("a".into(), 0x20), ("b".into(), 0x80), ("b2".into(), 0x80)].into();
        assert_eq!(
            proxy_entries(&there, &here, 0x100),
            Ok(vec![(0x10, 0x20), (0x40, 0x80)])
        );
        let fewer: Symbols = [("a".into(), 0x20)].into();
        let e = proxy_entries(&there, &fewer, 0x100).unwrap_err();
        assert!(e.contains("lacks b, b2"), "{e}");
        let split: Symbols = [("a".into(), 0x20), ("b".into(), 0x80), ("b2".into(), 0x90)].into();
        let e = proxy_entries(&there, &split, 0x100).unwrap_err();
        assert!(e.contains("at one entry"), "{e}");
        let close: Symbols = [("a".into(), 0x10), ("c".into(), 0x18)].into();
        let e = proxy_entries(&close, &close, 0x100).unwrap_err();
        assert!(e.contains("closer than a jump"), "{e}");
        assert!(proxy_entries(&there, &here, 0x48).is_err(), "past the end");
    }

    #[test]
    fn proxy_image_jumps_to_the_host_entries() {
        let img = vec![0x90u8; 64];
        let out = proxy_image(&img, &[(8, 0x30)], 0x7000_0000_1000);
        assert_eq!(&out[8..10], &[0x48, 0xb8]);
        assert_eq!(out[10..18], 0x7000_0000_1030u64.to_le_bytes());
        assert_eq!(&out[18..20], &[0xff, 0xe0]);
        assert_eq!(&out[..8], &img[..8]);
        assert_eq!(&out[20..], &img[20..]);
    }

    #[test]
    fn refuses_what_is_not_an_image() {
        assert!(parse(b"hello").unwrap_err().contains("not an ELF"));
        let img = crate::sys::vdso::own_vdso_image().unwrap();
        assert!(parse(&img[..100]).unwrap_err().contains("cut short"));
    }
}
