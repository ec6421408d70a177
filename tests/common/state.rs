//! The `/proc` state diff of the zdtm fixtures, the way CRIU's own suite checks itself: a
//! capture of what `/proc` shows about every process and thread of a fixture's tree, taken
//! at the warm point (before the dump) and again in the restored instance (after), parsed
//! and normalised here, then compared field by field. Any difference outside
//! [`EXCLUDED`] fails the test, naming the process, thread, section and field.
//!
//! The capture is written by `zdtm_capture()` in tests/fixtures/zdtm_state.h: sections
//! `#@ PID TID NAME` (TID `-` for per-process sections) holding the raw `/proc` text (fd
//! link, stat, shared open file description, bytes queued, unix socket state and shutdown
//! from sock_diag, and fdinfo per fd; smaps,
//! limits, timers, personality, cwd, root, oom_score_adj per process; status, stat, comm per
//! thread; sigaltstack for the capturing thread).
//!
//! Normalisation (not exclusion: these keep everything comparable):
//! * inode numbers (fd links `pipe:[N]`/`socket:[N]`, fdinfo `ino`, epoll `tfd` and
//!   inotify `ino:` and `f_handle:`, eventfd `eventfd-id`, smaps inodes) are replaced by labels in order of
//!   first appearance: a restored pipe, socket, memfd or deleted file is a new object with a
//!   new number, but which fds and mappings refer to the same object must not change;
//! * fdinfo `mnt_id` is replaced by the mount point and type it names in the process's
//!   mountinfo (a restored instance lives in a new mount namespace, so every id is new);
//! * the `before` capture of `warmstart record` discounts the one seccomp filter `record`
//!   stacks under the app to trap its warm point (`Seccomp_filters` minus one, `Seccomp` 0
//!   if it was the only one): that filter is warmstart's and never part of the snapshot.
//!
//! `WARMSTART_STATE_DIFF=warn` prints differences on stderr instead of failing (to survey
//! a whole suite run); `=off` skips the comparison.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

/// One thing the diff ignores, and why. [`EXCLUDED`] is the only place that decides it.
pub struct Exclusion {
    /// `status`, `stat`, `smaps`, `fd` (any fd), `stdio` (fds 0, 1 and 2), `timerfd`.
    pub section: &'static str,
    /// The field (a trailing `*` matches any field with that prefix).
    pub field: &'static str,
    pub why: &'static str,
    /// Applies only when this holds of the values (before, after); `None`: always.
    pub when: Option<Condition>,
}

/// A condition on the values (before, after) of a field.
pub type Condition = fn(Option<&str>, Option<&str>) -> bool;

/// The `mnt_id` value of an fd whose mount is not in the process's mount namespace.
const OUTSIDE_MOUNT: &str = "a mount outside the process's namespace";

/// Everything the diff ignores. Anything else that differs is a restore bug until shown
/// otherwise; never add an entry to hide one.
pub const EXCLUDED: &[Exclusion] = &[
    Exclusion {
        section: "status",
        field: "State",
        why: "running or sleeping at the instant /proc is read",
        when: None,
    },
    Exclusion {
        section: "status",
        field: "*ctxt_switches",
        why: "scheduler counters: they count since the task was created",
        when: None,
    },
    Exclusion {
        section: "status",
        field: "SigQ",
        why: "its first number counts the signals queued for the whole user, other \
              processes included (its limit is RLIMIT_SIGPENDING, compared in limits)",
        when: None,
    },
    Exclusion {
        section: "status",
        field: "VmHWM",
        why: "resident set: a lazy restore pages memory in on demand",
        when: None,
    },
    Exclusion {
        section: "status",
        field: "VmRSS",
        why: "resident set: a lazy restore pages memory in on demand",
        when: None,
    },
    Exclusion {
        section: "status",
        field: "Rss*",
        why: "resident set (RssAnon, RssFile, RssShmem): lazy paging, page cache",
        when: None,
    },
    Exclusion {
        section: "status",
        field: "VmPTE",
        why: "page-table memory follows the resident set",
        when: None,
    },
    Exclusion {
        section: "status",
        field: "VmPeak",
        why: "a high-water mark of the address space that includes the restorer's own \
              mappings before they are unmapped; no interface sets it",
        when: None,
    },
    Exclusion {
        section: "smaps",
        field: "Rss",
        why: "residency: lazy paging, page cache, touched [vvar]-family pages",
        when: None,
    },
    Exclusion {
        section: "smaps",
        field: "Pss*",
        why: "residency (Pss, Pss_Dirty, Pss_Anon, Pss_File, Pss_Shmem)",
        when: None,
    },
    Exclusion {
        section: "smaps",
        field: "Shared_*",
        why: "residency and sharing with other processes (page cache, other instances)",
        when: None,
    },
    Exclusion {
        section: "smaps",
        field: "Private_*",
        why: "residency (Private_Clean, Private_Dirty, Private_Hugetlb)",
        when: None,
    },
    Exclusion {
        section: "smaps",
        field: "Referenced",
        why: "accessed bits: residency",
        when: None,
    },
    Exclusion {
        section: "smaps",
        field: "Anonymous",
        why: "resident anonymous pages: lazy paging",
        when: None,
    },
    Exclusion {
        section: "smaps",
        field: "AnonHugePages",
        why: "transparent huge pages are formed by khugepaged when it gets round to it",
        when: None,
    },
    Exclusion {
        section: "smaps",
        field: "LazyFree",
        why: "residency of MADV_FREE pages (the kernel may reclaim them any time)",
        when: None,
    },
    Exclusion {
        section: "smaps",
        field: "Swap*",
        why: "swapped-out pages (Swap, SwapPss): residency",
        when: None,
    },
    Exclusion {
        section: "smaps",
        field: "Locked",
        why: "resident pages of mlocked areas (the mlock itself is VmFlags `lo`)",
        when: None,
    },
    Exclusion {
        section: "smaps",
        field: "KSM",
        why: "pages merged by ksmd when it gets round to it",
        when: None,
    },
    Exclusion {
        section: "smaps",
        field: "VmFlags um/uw/ui",
        why: "userfaultfd registration of the lazy page server, dropped once every page \
              is in (only these three flags are left out of VmFlags)",
        when: None,
    },
    Exclusion {
        section: "stat",
        field: "state",
        why: "running or sleeping at the instant /proc is read",
        when: None,
    },
    Exclusion {
        section: "stdio",
        field: "*",
        why: "fds 0-2 were the launcher's stdin/stdout/stderr at record and are the \
              caller's at run (DESIGN 6: external): other pipes, positions, flags and \
              queued bytes; only that they exist and which of them share an open file \
              description (ofd) is compared",
        when: None,
    },
    Exclusion {
        section: "timerfd",
        field: "it_value",
        why: "the time left on a running timerfd: a clock reading (its interval, clock \
              and flags are compared)",
        when: None,
    },
    Exclusion {
        section: "fd",
        field: "mnt_id",
        why: "an fd the app inherited from outside its sandbox (e.g. from the shell that \
              started the tests) is on a mount its mount namespace does not have; the \
              restored one is reopened inside (the file itself is compared)",
        when: Some(|before, _| before == Some(OUTSIDE_MOUNT)),
    },
];

fn matches(pattern: &str, field: &str) -> bool {
    match (pattern.strip_prefix('*'), pattern.strip_suffix('*')) {
        (_, _) if pattern == "*" => true,
        (Some(suffix), _) => field.ends_with(suffix),
        (_, Some(prefix)) => field.starts_with(prefix),
        _ => pattern == field,
    }
}

/// The exclusion that applies to `key`, if any.
pub fn excluded(
    key: &Key,
    before: Option<&str>,
    after: Option<&str>,
) -> Option<&'static Exclusion> {
    let sections: &[&str] = match key.section.as_str() {
        s if s.starts_with("smaps ") => &["smaps"],
        s if s.starts_with("fd ") => {
            let fd: i32 = s[3..].parse().unwrap_or(-1);
            if (0..3).contains(&fd) && key.field != "ofd" {
                &["stdio", "fd"]
            } else {
                &["fd"]
            }
        }
        "status" => &["status"],
        "stat" => &["stat"],
        _ => &[],
    };
    let timerfd = key.field.starts_with("timerfd.");
    EXCLUDED.iter().find(|e| {
        ((sections.contains(&e.section) && matches(e.field, &key.field))
            || (timerfd && e.section == "timerfd" && key.field == format!("timerfd.{}", e.field)))
            && e.when.is_none_or(|w| w(before, after))
    })
}

/// What a value is about: process, thread (`None`: the whole process), section, field.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub pid: i32,
    pub tid: Option<i32>,
    pub section: String,
    pub field: String,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {}", self.pid)?;
        if let Some(t) = self.tid {
            write!(f, " tid {t}")?;
        }
        write!(f, " {}", self.section)?;
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        Ok(())
    }
}

/// A parsed, normalised capture.
#[derive(Debug, Default)]
pub struct Capture {
    pub values: BTreeMap<Key, String>,
}

/// Which capture this is, for the normalisations that depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// At the warm point of `warmstart record` (its seccomp trap is stacked under the app).
    AtRecord,
    /// Anywhere else (a restored instance, a process started outside warmstart).
    Plain,
}

struct Section<'a> {
    pid: i32,
    tid: Option<i32>,
    name: &'a str,
    lines: Vec<&'a str>,
}

fn sections(text: &str) -> Result<Vec<Section<'_>>, String> {
    let mut out: Vec<Section> = Vec::new();
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("#@ ") {
            let mut w = h.splitn(3, ' ');
            let (Some(pid), Some(tid), Some(name)) = (w.next(), w.next(), w.next()) else {
                return Err(format!("bad section header {line:?}"));
            };
            let pid = pid
                .parse()
                .map_err(|_| format!("bad pid in section header {line:?}"))?;
            let tid = if tid == "-" {
                None
            } else {
                Some(
                    tid.parse()
                        .map_err(|_| format!("bad tid in section header {line:?}"))?,
                )
            };
            out.push(Section {
                pid,
                tid,
                name,
                lines: Vec::new(),
            });
        } else if let Some(s) = out.last_mut() {
            s.lines.push(line);
        } else if !line.trim().is_empty() {
            return Err(format!("text before the first section: {line:?}"));
        }
    }
    if out.is_empty() {
        return Err("no sections".into());
    }
    Ok(out)
}

/// Inode numbers to labels in order of first appearance.
#[derive(Default)]
struct Labels(HashMap<String, usize>);

impl Labels {
    fn get(&mut self, raw: &str) -> String {
        let n = self.0.len();
        format!("#{}", self.0.entry(raw.to_owned()).or_insert(n))
    }
    /// Replaces the number after every `tag` (e.g. `ino:`) in `value` with its label.
    fn replace_after(&mut self, value: &str, tag: &str) -> String {
        let mut out = String::new();
        let mut rest = value;
        while let Some(i) = rest.find(tag) {
            let (head, tail) = rest.split_at(i + tag.len());
            out.push_str(head);
            let end = tail
                .find(|c: char| !c.is_ascii_hexdigit())
                .unwrap_or(tail.len());
            if end > 0 {
                out.push_str(&self.get(&tail[..end]));
            }
            rest = &tail[end..];
        }
        out.push_str(rest);
        out
    }
}

fn squash(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `mnt_id` → "MOUNTPOINT (FSTYPE)", from a mountinfo section.
fn mounts(lines: &[&str]) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for l in lines {
        let w: Vec<&str> = l.split_whitespace().collect();
        let Some(sep) = w.iter().position(|x| *x == "-") else {
            continue;
        };
        if w.len() > 4 && sep + 1 < w.len() {
            m.insert(w[0].to_owned(), format!("{} ({})", w[4], w[sep + 1]));
        }
    }
    m
}

const STAT_FIELDS: &[(usize, &str)] = &[
    (3, "state"),
    (4, "ppid"),
    (5, "pgrp"),
    (6, "session"),
    (7, "tty_nr"),
    (8, "tpgid"),
    (18, "priority"),
    (19, "nice"),
    (20, "num_threads"),
    (38, "exit_signal"),
    (40, "rt_priority"),
    (41, "policy"),
];

impl Capture {
    /// Parses the text `zdtm_capture()` wrote.
    pub fn parse(text: &str, taken: Taken) -> Result<Capture, String> {
        let secs = sections(text)?;
        let mut mountinfo: HashMap<i32, HashMap<String, String>> = HashMap::new();
        for s in &secs {
            if s.name == "mountinfo" {
                mountinfo.insert(s.pid, mounts(&s.lines));
            }
        }
        let mut labels = Labels::default();
        let mut cap = Capture::default();
        for s in &secs {
            let mut put = |section: &str, field: &str, value: String| {
                cap.values.insert(
                    Key {
                        pid: s.pid,
                        tid: s.tid,
                        section: section.to_owned(),
                        field: field.to_owned(),
                    },
                    value,
                );
            };
            if s.lines.first().is_some_and(|l| l.starts_with("!error")) {
                put(s.name, "", s.lines[0].to_owned());
                continue;
            }
            match s.name {
                "mountinfo" => {}
                "status" | "limits" | "timers" if s.lines.is_empty() => put(s.name, "", "".into()),
                "status" => {
                    for l in &s.lines {
                        if let Some((k, v)) = l.split_once(':') {
                            put("status", k, squash(v));
                        }
                    }
                }
                "stat" => {
                    let line = s.lines.first().copied().unwrap_or("");
                    // "pid (comm) state ppid ...": fields from 3 on follow the last ')'.
                    let rest = line.rsplit_once(") ").map(|x| x.1).unwrap_or("");
                    let w: Vec<&str> = rest.split_whitespace().collect();
                    for &(n, name) in STAT_FIELDS {
                        put("stat", name, w.get(n - 3).unwrap_or(&"?").to_string());
                    }
                }
                "limits" => {
                    for l in s.lines.iter().skip(1) {
                        // "Max open files            1024                 1024                 files"
                        let (name, rest) = l.split_at(l.len().min(26));
                        put("limits", name.trim(), squash(rest));
                    }
                }
                "timers" => {
                    let mut id = String::new();
                    for l in &s.lines {
                        if let Some((k, v)) = l.split_once(':') {
                            if k == "ID" {
                                id = v.trim().to_owned();
                                put("timers", &format!("timer {id}"), "exists".into());
                            } else {
                                put("timers", &format!("timer {id} {k}"), squash(v));
                            }
                        }
                    }
                }
                "smaps" => parse_smaps(&s.lines, &mut labels, &mut put),
                name if name.starts_with("fd ") => {
                    let mnt = mountinfo.get(&s.pid);
                    parse_fd(name, &s.lines, &mut labels, mnt, &mut put)
                }
                name => put(
                    name,
                    "",
                    s.lines
                        .iter()
                        .map(|l| squash(l))
                        .collect::<Vec<_>>()
                        .join(" | "),
                ),
            }
        }
        if taken == Taken::AtRecord {
            cap.discount_record_trap();
        }
        Ok(cap)
    }

    /// Removes `record`'s own seccomp filter from every thread (see the module docs).
    fn discount_record_trap(&mut self) {
        let keys: Vec<Key> = self
            .values
            .keys()
            .filter(|k| k.section == "status" && k.field == "Seccomp_filters")
            .cloned()
            .collect();
        for k in keys {
            let n: i64 = self.values[&k].parse().unwrap_or(0);
            if n >= 1 {
                self.values.insert(k.clone(), (n - 1).to_string());
                if n == 1 {
                    let mode = Key {
                        field: "Seccomp".into(),
                        ..k
                    };
                    if self.values.get(&mode).map(String::as_str) == Some("2") {
                        self.values.insert(mode, "0".into());
                    }
                }
            }
        }
    }

    /// The section names of a key (process/thread and section, without the field).
    fn sections(&self) -> BTreeSet<(i32, Option<i32>, String)> {
        self.values
            .keys()
            .map(|k| (k.pid, k.tid, k.section.clone()))
            .collect()
    }
}

fn parse_smaps(lines: &[&str], labels: &mut Labels, put: &mut impl FnMut(&str, &str, String)) {
    let mut area = String::new();
    for l in lines {
        let first = l.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // "START-END PERMS OFFSET DEV INODE [PATH]"
            let w: Vec<&str> = l.splitn(6, char::is_whitespace).collect();
            area = format!("smaps {first}");
            let inode = w.get(4).copied().unwrap_or("0");
            let inode = if inode == "0" {
                "0".to_owned()
            } else {
                labels.get(inode)
            };
            let path = w.get(5).map(|p| p.trim()).unwrap_or("");
            put(
                &area,
                "mapping",
                format!(
                    "{} {} {} inode {} {}",
                    w.get(1).unwrap_or(&""),
                    w.get(2).unwrap_or(&""),
                    w.get(3).unwrap_or(&""),
                    inode,
                    path
                )
                .trim_end()
                .to_owned(),
            );
        } else if let Some((k, v)) = l.split_once(':') {
            let v = if k == "VmFlags" {
                let mut f: Vec<&str> = v
                    .split_whitespace()
                    .filter(|f| !matches!(*f, "um" | "uw" | "ui"))
                    .collect();
                f.sort_unstable();
                f.join(" ")
            } else {
                squash(v)
            };
            put(&area, k, v);
        }
    }
}

fn parse_fd(
    section: &str,
    lines: &[&str],
    labels: &mut Labels,
    mnt: Option<&HashMap<String, String>>,
    put: &mut impl FnMut(&str, &str, String),
) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut kind = "";
    // The kernel lists an epoll's targets and an inotify's watches in an order of its
    // own (struct addresses): put them in fd/wd order, in place, so their inodes get
    // their labels in the same order on both sides.
    let mut lines: Vec<&str> = lines.to_vec();
    for tag in ["tfd:", "inotify wd:"] {
        let at: Vec<usize> = (0..lines.len())
            .filter(|&i| lines[i].trim_start().starts_with(tag))
            .collect();
        let mut sorted: Vec<&str> = at.iter().map(|&i| lines[i]).collect();
        sorted.sort_by_key(|l| {
            let v = l.trim_start()[tag.len()..].trim_start();
            let id = v.split_whitespace().next().unwrap_or("");
            id.parse::<i64>().unwrap_or(i64::MAX)
        });
        for (&i, l) in at.iter().zip(sorted) {
            lines[i] = l;
        }
    }
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let v = v.trim();
        let mut field = k.trim().to_owned();
        let value = match field.as_str() {
            "link" => {
                kind = if v.starts_with("anon_inode:[timerfd]") {
                    "timerfd"
                } else {
                    ""
                };
                match v.split_once(":[") {
                    Some((obj @ ("pipe" | "socket"), num)) => {
                        format!("{obj}:[{}]", labels.get(num.trim_end_matches(']')))
                    }
                    _ => v.to_owned(),
                }
            }
            "ino" => labels.get(v),
            "mnt_id" => mnt
                .and_then(|m| m.get(v))
                .cloned()
                .unwrap_or_else(|| OUTSIDE_MOUNT.to_owned()),
            "eventfd-id" => "new object".into(),
            // epoll targets and inotify watches name inodes inside the value
            "tfd" => labels.replace_after(&squash(v), "ino:"),
            // an inotify watch's file handle encodes the inode too (number, generation)
            "inotify wd" => {
                let v = labels.replace_after(&squash(v), "ino:");
                labels.replace_after(&v, "f_handle:")
            }
            // a unix socket's peer is another socket's inode
            "unix" => labels.replace_after(&squash(v), "peer="),
            _ => squash(v),
        };
        if field == "tfd" || field == "inotify wd" {
            // one line per target/watch: key on its fd/wd
            let id = value.split_whitespace().next().unwrap_or("").to_owned();
            field = format!("{field} {id}");
        }
        if !kind.is_empty()
            && !matches!(
                field.as_str(),
                "link" | "stat" | "ofd" | "pos" | "flags" | "mnt_id" | "ino"
            )
        {
            field = format!("{kind}.{field}");
        }
        let n = seen.entry(field.clone()).or_insert(0);
        *n += 1;
        if *n > 1 {
            field = format!("{field} #{n}");
        }
        put(section, &field, value);
    }
}

/// The differences between two captures that [`EXCLUDED`] does not cover, one readable
/// line each: a whole section present on one side only, else field by field.
pub fn diff(before: &Capture, after: &Capture) -> Vec<String> {
    let mut out = Vec::new();
    let (sb, sa) = (before.sections(), after.sections());
    let describe = |c: &Capture, s: &(i32, Option<i32>, String)| -> String {
        c.values
            .iter()
            .filter(|(k, _)| (k.pid, k.tid, &k.section) == (s.0, s.1, &s.2))
            .find(|(k, _)| k.field == "mapping" || k.field == "link" || k.field.is_empty())
            .map(|(_, v)| format!(" ({v})"))
            .unwrap_or_default()
    };
    let name = |s: &(i32, Option<i32>, String)| {
        Key {
            pid: s.0,
            tid: s.1,
            section: s.2.clone(),
            field: String::new(),
        }
        .to_string()
    };
    for s in sb.difference(&sa) {
        out.push(format!(
            "{}: only before the dump{}",
            name(s),
            describe(before, s)
        ));
    }
    for s in sa.difference(&sb) {
        out.push(format!(
            "{}: only after the restore{}",
            name(s),
            describe(after, s)
        ));
    }
    let keys: BTreeSet<&Key> = before.values.keys().chain(after.values.keys()).collect();
    for k in keys {
        let s = (k.pid, k.tid, k.section.clone());
        let (b, a) = (before.values.get(k), after.values.get(k));
        if !(sb.contains(&s) && sa.contains(&s))
            || excluded(k, b.map(String::as_str), a.map(String::as_str)).is_some()
        {
            continue;
        }
        if b != a {
            let show = |v: Option<&String>| v.map_or("(absent)".to_owned(), |v| format!("{v:?}"));
            out.push(format!("{k}: before {} -> after {}", show(b), show(a)));
        }
    }
    out
}

/// What to do with differences: `WARMSTART_STATE_DIFF` = `fail` (default), `warn`, `off`.
pub fn policy() -> &'static str {
    match std::env::var("WARMSTART_STATE_DIFF").as_deref() {
        Ok("warn") => "warn",
        Ok("off") => "off",
        _ => "fail",
    }
}

/// The differences between the `before` and `after` capture texts of `ctx` (e.g.
/// "restored heap, eager"), or none when `WARMSTART_STATE_DIFF=off`. Panics if a capture
/// does not parse.
pub fn differences(ctx: &str, before: &str, taken: Taken, after: &str) -> Vec<String> {
    if policy() == "off" {
        return Vec::new();
    }
    let b = Capture::parse(before, taken).unwrap_or_else(|e| {
        panic!("{ctx}: the capture before the dump does not parse: {e}\n{before}")
    });
    let a = Capture::parse(after, Taken::Plain).unwrap_or_else(|e| {
        panic!("{ctx}: the capture after the restore does not parse: {e}\n{after}")
    });
    diff(&b, &a)
}

/// Panics with every difference (or, with `WARMSTART_STATE_DIFF=warn`, prints them on
/// stderr as `STATE-DIFF ctx: ...` lines).
pub fn report(ctx: &str, d: &[String]) {
    if d.is_empty() {
        return;
    }
    if policy() == "warn" {
        for l in d {
            eprintln!("STATE-DIFF {ctx}: {l}");
        }
        return;
    }
    panic!(
        "{ctx}: /proc state differs between the warm point and the restored instance \
         ({} differences; tests/common/state.rs EXCLUDED lists what is ignored, \
         WARMSTART_STATE_DIFF=warn only reports):\n{}",
        d.len(),
        d.join("\n")
    );
}

/// [`differences`], then [`report`].
pub fn assert_same_state(ctx: &str, before: &str, taken: Taken, after: &str) {
    report(ctx, &differences(ctx, before, taken, after));
}

/// Splits a restored fixture's output for `state` followed by other commands: the capture
/// (up to its `END` line) and the rest.
pub fn split_state(stdout: &str) -> Option<(&str, &str)> {
    if let Some(rest) = stdout.strip_prefix("END\n") {
        return Some(("", rest));
    }
    let i = stdout.find("\nEND\n")?;
    Some((&stdout[..i + 1], &stdout[i + 5..]))
}
