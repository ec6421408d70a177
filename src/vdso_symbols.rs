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

/// How a snapshot's vdso exports differ from this host's.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Exported there, not here: a call the app may make that this host cannot serve.
    pub missing: Vec<String>,
    /// Exported by both, at other offsets: (name, there, here).
    pub moved: Vec<(String, u64, u64)>,
}

/// What differs between the exports `there` (the snapshot's vdso) and `here`.
pub fn diff(there: &Symbols, here: &Symbols) -> Diff {
    let mut d = Diff::default();
    for (name, &at) in there {
        match here.get(name) {
            None => d.missing.push(name.clone()),
            Some(&h) if h != at => d.moved.push((name.clone(), at, h)),
            Some(_) => {}
        }
    }
    d
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
    fn diff_names_missing_and_moved() {
        let there: Symbols = [("a".into(), 0x10), ("b".into(), 0x20), ("c".into(), 0x30)].into();
        let here: Symbols = [("a".into(), 0x10), ("b".into(), 0x28), ("d".into(), 0x40)].into();
        assert_eq!(
            diff(&there, &here),
            Diff {
                missing: vec!["c".into()],
                moved: vec![("b".into(), 0x20, 0x28)],
            }
        );
    }

    #[test]
    fn refuses_what_is_not_an_image() {
        assert!(parse(b"hello").unwrap_err().contains("not an ELF"));
        let img = crate::sys::vdso::own_vdso_image().unwrap();
        assert!(parse(&img[..100]).unwrap_err().contains("cut short"));
    }
}
