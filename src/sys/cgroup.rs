//! cgroupfs at the file level: which hierarchies this host mounts (cgroup v2, and the v1
//! hierarchies of a "hybrid" host), where a process is in each (`/proc/PID/cgroup`), and
//! reading, writing, creating and removing cgroups.
//!
//! A hierarchy is named as `/proc/PID/cgroup` names it: `""` for cgroup v2, the
//! comma-separated controllers of a v1 hierarchy (`memory`, `cpu,cpuacct`,
//! `name=systemd`). Paths inside a hierarchy are absolute from its root (`/a/b`).

use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// `""` for cgroup v2, else the v1 hierarchy's controllers as `/proc/PID/cgroup`
    /// lists them.
    pub key: String,
    /// Where its root is mounted.
    pub mount: PathBuf,
}

impl Hierarchy {
    pub fn v2(&self) -> bool {
        self.key.is_empty()
    }

    /// The directory of cgroup `path` (absolute in the hierarchy).
    pub fn dir(&self, path: &str) -> PathBuf {
        let rel = path.trim_start_matches('/');
        if rel.is_empty() {
            self.mount.clone()
        } else {
            self.mount.join(rel)
        }
    }

    /// Controllers of a v1 hierarchy (`name=...` left out); for v2, those of its root
    /// (`cgroup.controllers`: the ones not bound to a v1 hierarchy).
    pub fn controllers(&self) -> Vec<String> {
        if self.v2() {
            read(&self.mount, "cgroup.controllers")
                .map(|s| words(&s))
                .unwrap_or_default()
        } else {
            self.key
                .split(',')
                .filter(|c| !c.starts_with("name="))
                .map(str::to_owned)
                .collect()
        }
    }

    /// What this hierarchy is called in messages.
    pub fn describe(&self) -> String {
        if self.v2() {
            format!("cgroup v2 hierarchy ({})", self.mount.display())
        } else {
            format!(
                "cgroup v1 hierarchy `{}` ({})",
                self.key,
                self.mount.display()
            )
        }
    }
}

/// The words of a space-separated cgroup file (`cgroup.controllers`, ...).
pub fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

/// The cgroup hierarchies mounted here (each once, at a mount of its root), from
/// `/proc/self/mountinfo`.
pub fn hierarchies() -> std::io::Result<Vec<Hierarchy>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_mountinfo(&info))
}

fn parse_mountinfo(info: &str) -> Vec<Hierarchy> {
    let mut out: Vec<Hierarchy> = Vec::new();
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.len() < 3 || l[3] != "/" {
            continue; // a bind mount of a sub-cgroup: not the hierarchy's root
        }
        let key = match r[0] {
            "cgroup2" => String::new(),
            "cgroup" => {
                // Super options: rw,cpu,cpuacct / rw,name=systemd, in the kernel's
                // controller order, which is also /proc/PID/cgroup's.
                let known = [
                    "rw",
                    "ro",
                    "noprefix",
                    "clone_children",
                    "xattr",
                    "cpuset_v2_mode",
                ];
                r[2].split(',')
                    .filter(|o| !known.contains(o) && !o.starts_with("release_agent="))
                    .collect::<Vec<_>>()
                    .join(",")
            }
            _ => continue,
        };
        if out.iter().any(|h| h.key == key) {
            continue;
        }
        out.push(Hierarchy {
            key,
            mount: PathBuf::from(unescape(l[4])),
        });
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where `pid` (or a thread, `/proc/PID/task/TID`) is: (hierarchy key, path) per line of
/// its `cgroup` file.
pub fn membership(proc_dir: &Path) -> std::io::Result<Vec<(String, String)>> {
    let s = std::fs::read_to_string(proc_dir.join("cgroup"))?;
    Ok(parse_membership(&s))
}

fn parse_membership(s: &str) -> Vec<(String, String)> {
    s.lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let _id = it.next()?;
            let key = it.next()?;
            let path = it.next()?;
            Some((key.to_owned(), path.to_owned()))
        })
        .collect()
}

/// The path of `pid` in hierarchy `key`.
pub fn path_of(pid: i32, key: &str) -> std::io::Result<Option<String>> {
    Ok(membership(Path::new(&format!("/proc/{pid}")))?
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, p)| p))
}

/// `dir/file`, trimmed of its final newline.
pub fn read(dir: &Path, file: &str) -> std::io::Result<String> {
    let s = std::fs::read_to_string(dir.join(file))?;
    Ok(s.trim_end_matches('\n').to_owned())
}

/// Writes `value` to `dir/file` in one `write` (cgroupfs takes one value per write).
pub fn write(dir: &Path, file: &str, value: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(file))?;
    f.write_all(value.as_bytes())
}

/// The processes directly in cgroup `dir`.
pub fn procs(dir: &Path) -> std::io::Result<Vec<i32>> {
    Ok(read(dir, "cgroup.procs")?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

/// Moves process `pid` (all its threads) into cgroup `dir`.
pub fn move_process(dir: &Path, pid: i32) -> std::io::Result<()> {
    write(dir, "cgroup.procs", &pid.to_string())
}

/// The child cgroups of `dir`.
pub fn children(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            out.push(e.path());
        }
    }
    Ok(out)
}

/// Waits until no process is left in cgroup v2 `dir` or its descendants
/// (`cgroup.events`: `populated 0`), for at most `timeout`; true if it emptied.
/// cgroupfs signals a change of `cgroup.events` as `POLLPRI`.
pub fn wait_unpopulated(dir: &Path, timeout: Duration) -> std::io::Result<bool> {
    let mut f = std::fs::File::open(dir.join("cgroup.events"))?;
    let deadline = Instant::now() + timeout;
    loop {
        let mut s = String::new();
        f.rewind()?;
        f.read_to_string(&mut s)?;
        if s.lines().any(|l| l.trim() == "populated 0") {
            return Ok(true);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let mut p = libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLPRI,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: `p` is one live, initialised pollfd; the kernel writes only `revents`.
        if unsafe { libc::poll(&mut p, 1, ms) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// A value of a key-value cgroup file (`memory.events`, `memory.oom_control`,
/// `cpu.stat`): `key N`.
pub fn keyed(dir: &Path, file: &str, key: &str) -> Option<u64> {
    let s = read(dir, file).ok()?;
    s.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 31 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 31 0:38 /sub /mnt/sub rw,relatime - cgroup2 cgroup2 rw
43 31 0:39 / /mnt/cc rw,relatime - cgroup cgroup rw,cpu,cpuacct,release_agent=/x
";

    #[test]
    fn hierarchies_of_a_hybrid_host() {
        let h = parse_mountinfo(HYBRID);
        let keys: Vec<&str> = h.iter().map(|h| h.key.as_str()).collect();
        assert_eq!(keys, ["cpu", "memory", "name=systemd", "", "cpu,cpuacct"]);
        assert_eq!(h[3].mount, PathBuf::from("/sys/fs/cgroup/unified"));
        assert!(h[3].v2());
        assert_eq!(h[4].controllers(), ["cpu", "cpuacct"]);
        assert_eq!(h[2].controllers(), Vec::<String>::new());
        assert_eq!(h[1].dir("/a/b"), PathBuf::from("/sys/fs/cgroup/memory/a/b"));
        assert_eq!(h[1].dir("/"), PathBuf::from("/sys/fs/cgroup/memory"));
    }

    #[test]
    fn membership_lines() {
        let m = parse_membership("4:memory:/x/y\n1:name=systemd:/\n0::/a:b\n");
        assert_eq!(
            m,
            [
                ("memory".to_owned(), "/x/y".to_owned()),
                ("name=systemd".to_owned(), "/".to_owned()),
                (String::new(), "/a:b".to_owned()),
            ]
        );
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/a\04"), r"/a\04");
    }
}
