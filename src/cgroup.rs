//! Cgroups of a tree: recorded by `dump --manage-cgroups`, recreated by
//! `restore --manage-cgroups`, and the cgroup of its own that `run --memory/--cpus/--pids`
//! gives an instance. File-level access is [`crate::sys::cgroup`].
//!
//! **What a dump records** ([`collect`]), per mounted hierarchy (cgroup v2, and each v1
//! hierarchy of a hybrid host):
//! 1. each process's cgroup, as `/proc/PID/cgroup` shows it (every thread must be in its
//!    process's cgroup: a thread elsewhere is refused);
//! 2. the cgroups the tree *owns*: a cgroup strictly below the dumper's own cgroup in that
//!    hierarchy whose processes, those of all its descendants included, are all processes
//!    of the tree. Each is recorded relative to the dumper's cgroup, with its settings:
//!    v2 `cgroup.subtree_control`, `memory.max`, `memory.high`, `cpu.max`, `cpu.weight`,
//!    `pids.max`, `io.max`; v1 `memory.limit_in_bytes`, `cpu.cfs_period_us`,
//!    `cpu.cfs_quota_us`, `cpu.shares`, `pids.max`, `blkio.throttle.*_device`.
//!    Refused by name: an owned cgroup with a controller enabled that is not restored
//!    (v2: other than memory, cpu, io, pids; v1: a hierarchy of other than memory, cpu,
//!    cpuacct, pids, blkio or a named one), a threaded v2 cgroup, and a setting not
//!    restored that differs from the kernel's default ([`UNRESTORED`]).
//!
//! Cgroups that are not owned (the dumper's own, or one elsewhere that holds other
//! processes) are the host's: a restore puts processes back in them but neither creates
//! nor changes them.
//!
//! **What a restore does** ([`Placement::prepare`]), before any process runs: finds each
//! recorded hierarchy on this host; maps each owned cgroup to the same path below the
//! restorer-chosen base (`--cgroup-root DIR`: absolute in every hierarchy, or relative
//! to the restorer's own cgroup; default the dumper's cgroup, i.e. the same paths);
//! refuses a clash (the cgroup exists with processes or other settings, a controller is
//! not enabled in the parent's `cgroup.subtree_control`, a host cgroup is missing);
//! creates the missing cgroups, parents first, and writes their settings. The restore then
//! moves each process into its cgroups before it runs ([`Placement::join`]). What it
//! created is removed again if the restore fails; on success it stays (the restored
//! app's cgroups, as after a dump).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use warmstart_snapshots::model::{CgroupHierarchy, Cgroups, OwnedCgroup};

use crate::sys::cgroup::{self as cg, Hierarchy};

/// cgroup v2 controllers whose settings are restored.
const V2_CONTROLLERS: [&str; 4] = ["memory", "cpu", "io", "pids"];
/// The v2 settings restored, per controller.
const V2_SETTINGS: [(&str, &[&str]); 4] = [
    ("memory", &["memory.max", "memory.high"]),
    ("cpu", &["cpu.max", "cpu.weight"]),
    ("pids", &["pids.max"]),
    ("io", &["io.max"]),
];
/// v1 controllers whose hierarchies are managed, and their settings restored.
const V1_SETTINGS: [(&str, &[&str]); 5] = [
    ("memory", &["memory.limit_in_bytes"]),
    (
        "cpu",
        &["cpu.cfs_period_us", "cpu.cfs_quota_us", "cpu.shares"],
    ),
    ("cpuacct", &[]),
    ("pids", &["pids.max"]),
    (
        "blkio",
        &[
            "blkio.throttle.read_bps_device",
            "blkio.throttle.write_bps_device",
            "blkio.throttle.read_iops_device",
            "blkio.throttle.write_iops_device",
        ],
    ),
];
/// v1 `PAGE_COUNTER_MAX` in bytes: an unlimited v1 memory limit.
const V1_UNLIMITED: &str = "9223372036854771712";
/// Settings of restored controllers that are not restored, with the kernel's default: a
/// dump refuses an owned cgroup where one differs (a restore would silently lose it).
pub const UNRESTORED: [(&str, &str); 14] = [
    ("memory.min", "0"),
    ("memory.low", "0"),
    ("memory.swap.max", "max"),
    ("memory.swap.high", "max"),
    ("memory.zswap.max", "max"),
    ("memory.oom.group", "0"),
    ("cpu.idle", "0"),
    ("cpu.max.burst", "0"),
    ("memory.soft_limit_in_bytes", V1_UNLIMITED),
    ("memory.memsw.limit_in_bytes", V1_UNLIMITED),
    ("memory.kmem.limit_in_bytes", V1_UNLIMITED),
    ("memory.kmem.tcp.limit_in_bytes", V1_UNLIMITED),
    ("cpu.rt_runtime_us", "0"),
    ("cpu.cfs_burst_us", "0"),
];

fn v1_managed(key: &str) -> bool {
    key.split(',')
        .all(|c| c.starts_with("name=") || V1_SETTINGS.iter().any(|(name, _)| *name == c))
}

fn settings_files(h: &Hierarchy, controllers: &[String]) -> Vec<&'static str> {
    if h.v2() {
        V2_SETTINGS
            .iter()
            .filter(|(c, _)| controllers.iter().any(|x| x == c))
            .flat_map(|(_, f)| f.iter().copied())
            .collect()
    } else {
        V1_SETTINGS
            .iter()
            .filter(|(c, _)| h.key.split(',').any(|x| x == *c))
            .flat_map(|(_, f)| f.iter().copied())
            .collect()
    }
}

/// `a` strictly below `b` (both absolute): `a`'s path relative to `b`.
fn below<'a>(a: &'a str, b: &str) -> Option<&'a str> {
    let b = b.trim_end_matches('/');
    let rest = a.strip_prefix(b)?.strip_prefix('/')?;
    (!rest.is_empty()).then_some(rest)
}

fn join_path(base: &str, rel: &str) -> String {
    format!("{}/{}", base.trim_end_matches('/'), rel)
}

/// Records the cgroups of the tree `pids` (host pids, in `Manifest::processes` order).
pub fn collect(pids: &[i32]) -> Result<Cgroups> {
    let own = cg::membership(Path::new("/proc/self")).context("reading /proc/self/cgroup")?;
    let tree: BTreeSet<i32> = pids.iter().copied().collect();
    let mut per_proc = Vec::with_capacity(pids.len());
    for &pid in pids {
        let dir = PathBuf::from(format!("/proc/{pid}"));
        let m = cg::membership(&dir).with_context(|| format!("reading /proc/{pid}/cgroup"))?;
        for task in std::fs::read_dir(dir.join("task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let tm = cg::membership(&task.path()).unwrap_or_else(|_| m.clone());
            if tm != m {
                bail!(
                    "thread {} of process {pid} is in other cgroups than its process \
                     ({}): threads in cgroups of their own cannot be restored; move it back \
                     or dump without --manage-cgroups",
                    task.file_name().to_string_lossy(),
                    describe_membership(&tm)
                );
            }
        }
        per_proc.push(m);
    }
    let mut out = Cgroups::default();
    for h in cg::hierarchies().context("reading /proc/self/mountinfo")? {
        let Some((_, base)) = own.iter().find(|(k, _)| *k == h.key) else {
            continue;
        };
        let mut members = Vec::with_capacity(pids.len());
        for (&pid, m) in pids.iter().zip(&per_proc) {
            let Some((_, p)) = m.iter().find(|(k, _)| *k == h.key) else {
                bail!(
                    "process {pid} is in no cgroup of the {} (it lives in another cgroup \
                     namespace?): dump without --manage-cgroups",
                    h.describe()
                );
            };
            members.push(p.clone());
        }
        let mut owned_memo: BTreeMap<String, bool> = BTreeMap::new();
        let mut owned: BTreeSet<String> = BTreeSet::new();
        for p in &members {
            let Some(rel) = below(p, base) else { continue };
            // The cgroup and each ancestor up to (not including) the dumper's.
            let parts: Vec<&str> = rel.split('/').collect();
            for n in 1..=parts.len() {
                let r = parts[..n].join("/");
                let is = match owned_memo.get(&r) {
                    Some(&b) => b,
                    None => {
                        let b = only_tree(&h.dir(&join_path(base, &r)), &tree)?;
                        owned_memo.insert(r.clone(), b);
                        b
                    }
                };
                if is {
                    owned.insert(r);
                }
            }
        }
        let mut list = Vec::new();
        for rel in owned {
            list.push(owned_cgroup(&h, base, &rel)?);
        }
        out.hierarchies.push(CgroupHierarchy {
            key: h.key.clone(),
            base: base.clone(),
            owned: list,
            members,
        });
    }
    Ok(out)
}

fn describe_membership(m: &[(String, String)]) -> String {
    m.iter()
        .map(|(k, p)| format!("{}:{p}", if k.is_empty() { "v2" } else { k }))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Every process in cgroup `dir` and its descendants is one of `tree`.
fn only_tree(dir: &Path, tree: &BTreeSet<i32>) -> Result<bool> {
    let procs =
        cg::procs(dir).with_context(|| format!("reading {}/cgroup.procs", dir.display()))?;
    if procs.iter().any(|p| !tree.contains(p)) {
        return Ok(false);
    }
    for c in cg::children(dir).with_context(|| format!("listing {}", dir.display()))? {
        if !only_tree(&c, tree)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The settings of owned cgroup `base/rel` of `h`, refusing what cannot be restored.
fn owned_cgroup(h: &Hierarchy, base: &str, rel: &str) -> Result<OwnedCgroup> {
    let path = join_path(base, rel);
    let dir = h.dir(&path);
    let refuse = |what: String| -> anyhow::Error {
        anyhow::anyhow!(
            "cgroup {path} of the {}, which the dumped tree owns: {what}, which warmstart \
             cannot restore; change it or dump without --manage-cgroups",
            h.describe()
        )
    };
    let mut controllers = Vec::new();
    let mut settings = Vec::new();
    if h.v2() {
        let ty = cg::read(&dir, "cgroup.type").unwrap_or_else(|_| "domain".into());
        if ty != "domain" {
            return Err(refuse(format!("it is a `{ty}` cgroup (cgroup.type)")));
        }
        controllers = cg::words(&cg::read(&dir, "cgroup.controllers")?);
        if let Some(c) = controllers
            .iter()
            .find(|c| !V2_CONTROLLERS.contains(&c.as_str()))
        {
            return Err(refuse(format!(
                "controller `{c}` is enabled in it (by its parent's cgroup.subtree_control)"
            )));
        }
        let sub = cg::read(&dir, "cgroup.subtree_control")?;
        if !sub.is_empty() {
            settings.push(("cgroup.subtree_control".to_owned(), sub));
        }
    } else if !v1_managed(&h.key) {
        return Err(refuse(format!("it is in the v1 hierarchy of `{}`", h.key)));
    }
    for f in settings_files(h, &controllers) {
        match cg::read(&dir, f) {
            Ok(v) => settings.push((f.to_owned(), v)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}/{f}", dir.display())),
        }
    }
    for (f, default) in UNRESTORED {
        if let Ok(v) = cg::read(&dir, f) {
            if v != default {
                return Err(refuse(format!("{f} is {v} (default {default})")));
            }
        }
    }
    Ok(OwnedCgroup {
        path: rel.to_owned(),
        controllers,
        settings,
    })
}

/// Whether `current` (read back) is what writing `recorded` (read at dump) gives.
fn same_setting(file: &str, recorded: &str, current: &str) -> bool {
    if file == "cgroup.subtree_control" {
        let a: BTreeSet<&str> = recorded.split_whitespace().collect();
        let b: BTreeSet<&str> = current.split_whitespace().collect();
        return a == b;
    }
    recorded.trim() == current.trim()
}

/// Writes a recorded setting: multi-line files (`io.max`, `blkio.throttle.*`) one line
/// per write; `cgroup.subtree_control` as `+ctrl` words.
fn write_setting(dir: &Path, file: &str, value: &str) -> std::io::Result<()> {
    if file == "cgroup.subtree_control" {
        let v: Vec<String> = value.split_whitespace().map(|c| format!("+{c}")).collect();
        return cg::write(dir, file, &v.join(" "));
    }
    for line in value.lines().filter(|l| !l.trim().is_empty()) {
        cg::write(dir, file, line)?;
    }
    Ok(())
}

/// Where a restore puts the processes of an instance, and the cgroups it created for
/// them: those are removed when this is dropped, unless [`keep`](Self::keep) was called
/// (first waiting, bounded, until their processes are gone).
#[derive(Debug, Default)]
pub struct Placement {
    /// Per process of the manifest: the cgroup directories it joins.
    targets: Vec<Vec<PathBuf>>,
    /// The directories the sandbox's init joins (`run` limits: the whole instance).
    init: Vec<PathBuf>,
    /// What we created, parents first.
    created: Mutex<Vec<PathBuf>>,
    keep: std::sync::atomic::AtomicBool,
}

impl Placement {
    /// Plans and creates the cgroups of `c` (see the module doc); `root`: `--cgroup-root`.
    /// Fails, naming the clash, before anything is created; creates nothing that a
    /// failure leaves behind.
    pub fn prepare(c: &Cgroups, processes: usize, root: Option<&str>) -> Result<Placement> {
        let host = cg::hierarchies().context("reading /proc/self/mountinfo")?;
        let own = cg::membership(Path::new("/proc/self")).context("reading /proc/self/cgroup")?;
        let mut placement = Placement::default();
        placement.targets = vec![Vec::new(); processes];
        // (hierarchy, dir, settings) to create, in order, after every check passed.
        let mut to_create: Vec<(&Hierarchy, PathBuf, &OwnedCgroup)> = Vec::new();
        for rec in &c.hierarchies {
            let what = if rec.key.is_empty() {
                "the cgroup v2 hierarchy".to_owned()
            } else {
                format!("the cgroup v1 hierarchy `{}`", rec.key)
            };
            let Some(h) = host.iter().find(|h| h.key == rec.key) else {
                bail!(
                    "the snapshot's processes were in {what}, which this host does not mount: \
                     restore without --manage-cgroups"
                );
            };
            let target_base = match root {
                None => rec.base.clone(),
                Some(r) if r.starts_with('/') => r.to_owned(),
                Some(r) => {
                    let mine = own
                        .iter()
                        .find(|(k, _)| *k == rec.key)
                        .map(|(_, p)| p.clone())
                        .unwrap_or_else(|| "/".into());
                    join_path(&mine, r)
                }
            };
            if !rec.owned.is_empty() && !h.dir(&target_base).is_dir() {
                bail!(
                    "cgroup root {target_base} does not exist in the {} ({}): create it \
                     first or choose another --cgroup-root",
                    h.describe(),
                    h.dir(&target_base).display()
                );
            }
            let owned: BTreeMap<&str, &OwnedCgroup> =
                rec.owned.iter().map(|o| (o.path.as_str(), o)).collect();
            for o in &rec.owned {
                let path = join_path(&target_base, &o.path);
                let dir = h.dir(&path);
                if dir.is_dir() {
                    check_existing(h, &path, &dir, o)?;
                    continue;
                }
                let (parent_rel, parent) = match o.path.rsplit_once('/') {
                    Some((p, _)) => (Some(p), join_path(&target_base, p)),
                    None => (None, target_base.clone()),
                };
                let parent_dir = h.dir(&parent);
                let parent_owned = parent_rel.and_then(|p| owned.get(p));
                if parent_owned.is_none() && !parent_dir.is_dir() {
                    bail!(
                        "cgroup {parent} of the {} does not exist: it holds the snapshot's \
                         cgroup {path}; create it or choose another --cgroup-root",
                        h.describe()
                    );
                }
                if h.v2() {
                    let enabled = match parent_owned {
                        Some(p) => p
                            .settings
                            .iter()
                            .find(|(f, _)| f == "cgroup.subtree_control")
                            .map(|(_, v)| cg::words(v))
                            .unwrap_or_default(),
                        None => cg::words(&cg::read(&parent_dir, "cgroup.subtree_control")?),
                    };
                    if let Some(c) = o.controllers.iter().find(|c| !enabled.contains(c)) {
                        bail!(
                            "cannot recreate cgroup {path}: controller `{c}` is not enabled in \
                             {}/cgroup.subtree_control (enable it with `echo +{c} > \
                             {}/cgroup.subtree_control`, or choose another --cgroup-root)",
                            parent_dir.display(),
                            parent_dir.display()
                        );
                    }
                }
                to_create.push((h, dir, o));
            }
            for (i, m) in rec.members.iter().enumerate().take(processes) {
                let path = match below(m, &rec.base) {
                    Some(rel) if owned.contains_key(rel) => join_path(&target_base, rel),
                    _ => m.clone(),
                };
                let dir = h.dir(&path);
                if !dir.is_dir() && !to_create.iter().any(|(_, d, _)| *d == dir) {
                    bail!(
                        "cgroup {path} of the {}, where process {} of the snapshot was, does \
                         not exist on this host (it was not the tree's own, so it is not \
                         recreated): create it, or restore without --manage-cgroups",
                        h.describe(),
                        i + 1
                    );
                }
                placement.targets[i].push(dir);
            }
        }
        for (h, dir, o) in to_create {
            std::fs::create_dir(&dir)
                .with_context(|| format!("creating cgroup {} ({})", dir.display(), h.describe()))?;
            placement
                .created
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(dir.clone());
            for (f, v) in &o.settings {
                let cur = cg::read(&dir, f).unwrap_or_default();
                if same_setting(f, v, &cur) {
                    continue;
                }
                write_setting(&dir, f, v)
                    .with_context(|| format!("writing {v:?} to {}/{f}", dir.display()))?;
            }
        }
        Ok(placement)
    }

    /// Moves the sandbox's init (host pid) where it belongs, before the app runs.
    pub fn join_init(&self, pid: i32) -> Result<()> {
        join_dirs(&self.init, pid)
    }

    /// Moves process `idx` of the manifest (host pid `pid`) into its cgroups.
    pub fn join(&self, idx: usize, pid: i32) -> Result<()> {
        join_dirs(self.targets.get(idx).map_or(&[][..], |t| &t[..]), pid)
    }

    /// The restore succeeded: what was created stays (the restored app's cgroups).
    pub fn keep(&self) {
        self.keep.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn join_dirs(dirs: &[PathBuf], pid: i32) -> Result<()> {
    for d in dirs {
        // Already there (inherited from its parent, or the host cgroup it shares with
        // us): nothing to write.
        let procs = cg::procs(d).unwrap_or_default();
        if procs.contains(&pid) {
            continue;
        }
        cg::move_process(d, pid)
            .with_context(|| format!("moving process {pid} into cgroup {}", d.display()))?;
    }
    Ok(())
}

fn check_existing(h: &Hierarchy, path: &str, dir: &Path, o: &OwnedCgroup) -> Result<()> {
    let procs =
        cg::procs(dir).with_context(|| format!("reading {}/cgroup.procs", dir.display()))?;
    if !procs.is_empty() {
        bail!(
            "cgroup {path} of the {} exists and holds other processes ({}): remove them, \
             or restore under another --cgroup-root",
            h.describe(),
            procs
                .iter()
                .take(5)
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for (f, v) in &o.settings {
        let cur = cg::read(dir, f).with_context(|| format!("reading {}/{f}", dir.display()))?;
        if !same_setting(f, v, &cur) {
            bail!(
                "cgroup {path} of the {} exists with other settings: {f} is {cur:?}, the \
                 snapshot's is {v:?}; remove it, or restore under another --cgroup-root",
                h.describe()
            );
        }
    }
    Ok(())
}

impl Placement {
    /// Removes what was created now (once its processes are gone), and nothing later.
    pub fn remove_created(&self) {
        let created = std::mem::take(&mut *self.created.lock().unwrap_or_else(|p| p.into_inner()));
        remove_all(&created);
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        if !self.keep.load(std::sync::atomic::Ordering::Relaxed) {
            self.remove_created();
        }
    }
}

/// Removes the cgroups `dirs` (parents first in the list), once their processes are
/// gone: a cgroup v2 one is waited for (`populated 0`, at most 5 s); a v1 one empties
/// with it (the same tasks), or, alone, once the instance was reaped.
fn remove_all(dirs: &[PathBuf]) {
    for d in dirs.iter().rev() {
        if d.join("cgroup.events").exists() {
            match cg::wait_unpopulated(d, Duration::from_secs(5)) {
                Ok(true) => {}
                Ok(false) => tracing::warn!("cgroup {} still has processes after 5 s", d.display()),
                Err(e) => tracing::warn!("waiting for cgroup {} to empty: {e}", d.display()),
            }
        }
    }
    for d in dirs.iter().rev() {
        if let Err(e) = std::fs::remove_dir(d) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing cgroup {}: {e}", d.display());
            }
        }
    }
}

/// `run --memory/--cpus/--pids`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub pids: Option<u64>,
}

impl Limits {
    pub fn any(&self) -> bool {
        self.memory.is_some() || self.cpus.is_some() || self.pids.is_some()
    }
}

/// Parses a size: bytes, or with a K, M, G or T suffix (powers of 1024; `64M`, `1g`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => {
                    return Err(format!(
                        "{s:?}: unknown size suffix {c:?} (use K, M, G or T)"
                    ))
                }
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (bytes, or a number with K, M, G or T)"))?;
    n.checked_mul(mult)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("{s:?}: size out of range"))
}

/// Parses a CPU count (`2`, `0.5`): at least 0.01.
pub fn parse_cpus(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(n) if n.is_finite() && n >= 0.01 => Ok(n),
        _ => Err(format!(
            "{s:?} is not a CPU count (a number of at least 0.01, like 2 or 0.5)"
        )),
    }
}

/// The scheduler period `--cpus` uses (100 ms, as Docker's).
const CPU_PERIOD_US: u64 = 100_000;

impl Placement {
    /// A cgroup of its own for one `run` instance, with `limits`, named
    /// `warmstart-run-<our pid>` below warmstart's own cgroup in each hierarchy that takes
    /// part: cgroup v2 always (when mounted: its `cpu.stat` counts CPU time, its
    /// `cgroup.events` says when the instance is gone), and for each limited controller
    /// the hierarchy that has it (v2 when its own cgroup's `cgroup.subtree_control`
    /// enables it; else the v1 hierarchy of that controller, on a hybrid host). The
    /// sandbox's init and the app join it before the app runs; dropping it removes it.
    pub fn for_instance(limits: &Limits) -> Result<(Placement, Vec<PathBuf>)> {
        let host = cg::hierarchies().context("reading /proc/self/mountinfo")?;
        let own = cg::membership(Path::new("/proc/self")).context("reading /proc/self/cgroup")?;
        let own_path = |h: &Hierarchy| {
            own.iter()
                .find(|(k, _)| *k == h.key)
                .map(|(_, p)| p.clone())
                .unwrap_or_else(|| "/".into())
        };
        let v2 = host.iter().find(|h| h.v2());
        let v2_enabled = v2
            .map(|h| {
                cg::words(
                    &cg::read(&h.dir(&own_path(h)), "cgroup.subtree_control").unwrap_or_default(),
                )
            })
            .unwrap_or_default();
        let name = format!("warmstart-run-{}", std::process::id());
        // (hierarchy, [(file, value)]) in the order to create.
        let mut plan: Vec<(&Hierarchy, Vec<(&'static str, String)>)> = Vec::new();
        if let Some(h) = v2 {
            plan.push((h, Vec::new()));
        }
        // Per controller: the files to write on v2, and on v1.
        type Files = Vec<(&'static str, String)>;
        let mut wanted: Vec<(&str, Files, Files)> = Vec::new();
        if let Some(m) = limits.memory {
            wanted.push((
                "memory",
                vec![("memory.max", m.to_string())],
                vec![("memory.limit_in_bytes", m.to_string())],
            ));
        }
        if let Some(n) = limits.cpus {
            let quota = ((n * CPU_PERIOD_US as f64).round() as u64).max(1000);
            wanted.push((
                "cpu",
                vec![("cpu.max", format!("{quota} {CPU_PERIOD_US}"))],
                vec![
                    ("cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
                    ("cpu.cfs_quota_us", quota.to_string()),
                ],
            ));
        }
        if let Some(p) = limits.pids {
            wanted.push((
                "pids",
                vec![("pids.max", p.to_string())],
                vec![("pids.max", p.to_string())],
            ));
        }
        for (ctrl, on_v2, on_v1) in wanted {
            if let Some(h) = v2.filter(|h| h.controllers().iter().any(|c| c == ctrl)) {
                if !v2_enabled.iter().any(|c| c == ctrl) {
                    let d = h.dir(&own_path(h));
                    bail!(
                        "cannot limit the instance's {ctrl}: controller `{ctrl}` is not \
                         enabled in warmstart's own cgroup ({}/cgroup.subtree_control); run \
                         warmstart in a cgroup that delegates it (e.g. `systemd-run --scope \
                         -p Delegate=yes`)",
                        d.display()
                    );
                }
                let entry = plan.iter_mut().find(|(x, _)| x.v2()).expect("v2 planned");
                entry.1.extend(on_v2);
                continue;
            }
            let Some(h) = host
                .iter()
                .find(|h| !h.v2() && h.controllers().iter().any(|c| c == ctrl))
            else {
                bail!(
                    "cannot limit the instance's {ctrl}: no cgroup hierarchy on this host has \
                     the `{ctrl}` controller"
                );
            };
            match plan.iter_mut().find(|(x, _)| x.key == h.key) {
                Some(e) => e.1.extend(on_v1),
                None => plan.push((h, on_v1)),
            }
        }
        let mut placement = Placement::default();
        let mut dirs = Vec::new();
        for (h, files) in plan {
            sweep_stale(&h.dir(&own_path(h)));
            let dir = h.dir(&join_path(&own_path(h), &name));
            std::fs::create_dir(&dir).with_context(|| {
                format!(
                    "creating the instance's cgroup {} ({})",
                    dir.display(),
                    h.describe()
                )
            })?;
            placement
                .created
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(dir.clone());
            for (f, v) in files {
                cg::write(&dir, f, &v)
                    .with_context(|| format!("writing {v:?} to {}/{f}", dir.display()))?;
            }
            placement.init.push(dir.clone());
            dirs.push(dir);
        }
        placement.targets = vec![dirs.clone()];
        Ok((placement, dirs))
    }

    /// How many times the OOM killer killed a process in the cgroups of this placement
    /// that have a memory controller (`memory.events` on v2, `memory.oom_control` on v1).
    pub fn oom_kills(&self) -> u64 {
        let created = self.created.lock().unwrap_or_else(|p| p.into_inner());
        created
            .iter()
            .filter_map(|d| {
                cg::keyed(d, "memory.events", "oom_kill")
                    .or_else(|| cg::keyed(d, "memory.oom_control", "oom_kill"))
            })
            .sum()
    }
}

/// Removes the empty instance cgroups in `dir` of `run`s that are gone (killed before
/// they could remove their own): `warmstart-run-PID` with no process PID. One with
/// processes left stays (`rmdir` refuses it).
fn sweep_stale(dir: &Path) {
    for c in cg::children(dir).unwrap_or_default() {
        let Some(pid) = c
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("warmstart-run-"))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let gone = matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        );
        if gone && std::fs::remove_dir(&c).is_ok() {
            tracing::debug!("removed the cgroup of a run that is gone: {}", c.display());
        }
    }
}

/// Memory (bytes) and CPU time (µs) of an instance from its cgroups (`ps`).
pub fn usage(dirs: &[PathBuf]) -> (Option<u64>, Option<u64>) {
    let mut mem = None;
    let mut cpu = None;
    for d in dirs {
        mem = mem.or_else(|| {
            cg::read(d, "memory.current")
                .or_else(|_| cg::read(d, "memory.usage_in_bytes"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
        });
        cpu = cpu
            .or_else(|| cg::keyed(d, "cpu.stat", "usage_usec"))
            .or_else(|| {
                cg::read(d, "cpuacct.usage")
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .map(|ns| ns / 1000)
            });
    }
    (mem, cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12X").unwrap_err().contains("suffix"));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999T").is_err());
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus("0.5"), Ok(0.5));
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("nan").is_err());
    }

    #[test]
    fn below_and_join() {
        assert_eq!(below("/a/b/c", "/a"), Some("b/c"));
        assert_eq!(below("/a/b", "/"), Some("a/b"));
        assert_eq!(below("/a", "/a"), None);
        assert_eq!(below("/ab", "/a"), None);
        assert_eq!(join_path("/", "x"), "/x");
        assert_eq!(join_path("/a/", "x/y"), "/a/x/y");
    }

    #[test]
    fn settings_compare() {
        assert!(same_setting(
            "cgroup.subtree_control",
            "memory pids",
            "pids memory"
        ));
        assert!(!same_setting("memory.max", "max", "1048576"));
        assert!(v1_managed("cpu,cpuacct"));
        assert!(v1_managed("name=systemd"));
        assert!(!v1_managed("cpuset"));
    }
}
