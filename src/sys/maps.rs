//! `/proc/PID/smaps`: the VMA list with the `VmFlags` a restore must re-apply.
//!
//! Parsed by hand rather than with `procfs` because the name column carries things
//! `procfs` folds away (`[vvar_vclock]`, `[anon:NAME]`, ` (deleted)`), and those decide
//! how a VMA is restored.

use std::io;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    pub dev: (u32, u32),
    pub inode: u64,
    /// The name column: a path, `[heap]`, `[stack]`, `[vdso]`, `[anon:NAME]`, or empty.
    pub name: String,
    /// Two-letter `VmFlags` codes (`gd`, `dc`, `wf`, ...); empty when read from `maps`.
    pub vm_flags: Vec<String>,
}

impl MapEntry {
    pub fn has_flag(&self, code: &str) -> bool {
        self.vm_flags.iter().any(|f| f == code)
    }

    /// The `maps` line as the kernel prints it, for comparing layouts.
    pub fn maps_line(&self) -> String {
        format!(
            "{:08x}-{:08x} {}{}{}{} {:08x} {:02x}:{:02x} {} {}",
            self.start,
            self.end,
            if self.read { 'r' } else { '-' },
            if self.write { 'w' } else { '-' },
            if self.exec { 'x' } else { '-' },
            if self.shared { 's' } else { 'p' },
            self.offset,
            self.dev.0,
            self.dev.1,
            self.inode,
            self.name
        )
    }
}

pub fn read_smaps(pid: i32) -> io::Result<Vec<MapEntry>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    parse(&text)
}

pub fn read_maps(pid: i32) -> io::Result<Vec<MapEntry>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    parse(&text)
}

fn bad(line: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unexpected maps line: {line:?}"),
    )
}

/// Parses `maps` or `smaps` text.
pub fn parse(text: &str) -> io::Result<Vec<MapEntry>> {
    let mut out: Vec<MapEntry> = Vec::new();
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(last) = out.last_mut() {
                last.vm_flags = flags.split_whitespace().map(str::to_owned).collect();
            }
            continue;
        }
        let Some((range, rest)) = line.split_once(' ') else {
            continue;
        };
        let Some((start, end)) = range.split_once('-') else {
            continue; // an smaps "Key: value" line
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        // perms offset dev inode name — the name may contain spaces, so split at most 5.
        let mut it = rest.splitn(4, ' ');
        let perms = it.next().ok_or_else(|| bad(line))?.as_bytes();
        let offset =
            u64::from_str_radix(it.next().ok_or_else(|| bad(line))?, 16).map_err(|_| bad(line))?;
        let dev = it.next().ok_or_else(|| bad(line))?;
        let (maj, min) = dev.split_once(':').ok_or_else(|| bad(line))?;
        let rest = it.next().unwrap_or("");
        let rest = rest.trim_start();
        let (inode, name) = rest.split_once(' ').unwrap_or((rest, ""));
        if perms.len() < 4 {
            return Err(bad(line));
        }
        out.push(MapEntry {
            start,
            end,
            read: perms[0] == b'r',
            write: perms[1] == b'w',
            exec: perms[2] == b'x',
            shared: perms[3] == b's',
            offset,
            dev: (
                u32::from_str_radix(maj, 16).map_err(|_| bad(line))?,
                u32::from_str_radix(min, 16).map_err(|_| bad(line))?,
            ),
            inode: inode.parse().map_err(|_| bad(line))?,
            name: name.trim_start().to_owned(),
            vm_flags: Vec::new(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_smaps_with_flags_and_names() {
        let text = "\
55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
VmFlags: rd wr mr mw me ac sd
7f00aa000000-7f00aa001000 r--p 00002000 fe:01 1234                       /usr/lib/my lib.so (deleted)
VmFlags: rd mr mw me sd
7ffc10000000-7ffc10021000 rw-p 00000000 00:00 0                          [stack]
VmFlags: rd wr mr mw me gd ac
7ffc10100000-7ffc10102000 r--p 00000000 00:00 0                          [vvar_vclock]
";
        let m = parse(text).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].name, "[heap]");
        assert!(m[0].write && !m[0].shared);
        assert_eq!(m[1].name, "/usr/lib/my lib.so (deleted)");
        assert_eq!(m[1].offset, 0x2000);
        assert_eq!(m[1].dev, (0xfe, 1));
        assert_eq!(m[1].inode, 1234);
        assert!(m[2].has_flag("gd"));
        assert_eq!(m[3].name, "[vvar_vclock]");
        assert!(m[3].vm_flags.is_empty());
        assert_eq!(
            m[1].maps_line(),
            "7f00aa000000-7f00aa001000 r--p 00002000 fe:01 1234 /usr/lib/my lib.so (deleted)"
        );
    }
}
