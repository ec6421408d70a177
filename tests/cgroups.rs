//! Cgroups: `run --memory/--cpus/--pids` (an instance in a cgroup of its own, killed by
//! the OOM killer as a cold start would be) and `dump`/`restore --manage-cgroups` (the
//! tree's cgroups and their settings round-trip, as cgroupfs and `/proc/PID/cgroup` show).
//!
//! Test cgroups are made below the test's own cgroup in each hierarchy that takes part
//! (cgroup v2 always; memory and pids where this host has them, v2 or v1) and removed by
//! a guard, with any process left in them, even when a test fails.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{alive, compile, tempdir, wait_pid_exit, KillGuard, Ws, TIMEOUT};
use warmstart::sys::cgroup::{self as cg, Hierarchy};

/// Cgroups a test made (parents before children); dropped: their processes are killed
/// and they are removed.
#[derive(Default)]
struct Made(Vec<PathBuf>);

impl Made {
    fn mkdir(&mut self, dir: PathBuf) -> PathBuf {
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        self.0.push(dir.clone());
        dir
    }
}

impl Drop for Made {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            for pid in cg::procs(d).unwrap_or_default() {
                // SAFETY: kill takes integer arguments only; no memory is passed.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                wait_pid_exit(pid, TIMEOUT);
            }
            if d.join("cgroup.events").exists() {
                let _ = cg::wait_unpopulated(d, TIMEOUT);
            }
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// The test's own cgroup in `h`.
fn own(h: &Hierarchy) -> PathBuf {
    let p = cg::path_of(std::process::id() as i32, &h.key)
        .unwrap()
        .unwrap_or_else(|| "/".into());
    h.dir(&p)
}

/// The hierarchy that has `ctrl` usable for a child of our cgroup (v2 when our
/// `cgroup.subtree_control` enables it, else its v1 hierarchy).
fn with_controller(ctrl: &str) -> Option<Hierarchy> {
    let all = cg::hierarchies().unwrap();
    if let Some(h) = all.iter().find(|h| h.v2()) {
        let enabled = cg::read(&own(h), "cgroup.subtree_control").unwrap_or_default();
        if cg::words(&enabled).iter().any(|c| c == ctrl) {
            return Some(h.clone());
        }
    }
    all.into_iter()
        .find(|h| !h.v2() && h.controllers().iter().any(|c| c == ctrl))
}

fn v2() -> Option<Hierarchy> {
    cg::hierarchies().unwrap().into_iter().find(|h| h.v2())
}

fn memory_limit_file(h: &Hierarchy) -> &'static str {
    if h.v2() {
        "memory.max"
    } else {
        "memory.limit_in_bytes"
    }
}

/// `warmstart-run-PID` cgroups below our own in every hierarchy whose `run` (PID) has
/// exited: a `run` must remove its own (other tests' runs may be going on).
fn leftover_run_cgroups() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for h in cg::hierarchies().unwrap() {
        for c in cg::children(&own(&h)).unwrap_or_default() {
            let monitor = c
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("warmstart-run-"))
                .and_then(|p| p.parse::<i32>().ok());
            if monitor.is_some_and(|m| !alive(m)) {
                out.push(c);
            }
        }
    }
    out
}

fn mem_binary() -> PathBuf {
    compile(
        &common::workloads_dir().join("c/mem.c"),
        &["-O2"],
        "cgroups-mem",
    )
}

/// `sh` that moves itself into `dirs` and then execs `argv`.
fn in_cgroups(dirs: &[PathBuf], argv: &[&str]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(r#"n=$1; shift; i=0; while [ $i -lt $n ]; do echo $$ > "$1/cgroup.procs" || exit 99; shift; i=$((i+1)); done; exec "$@""#)
        .arg("sh")
        .arg(dirs.len().to_string());
    c.args(dirs).args(argv);
    c
}

#[test]
fn run_memory_limit_is_oom_killed_like_a_cold_start() {
    let mem_h = with_controller("memory").expect("no memory controller on this host");
    let mem = mem_binary();
    // The cold start: `mem 128` in a cgroup limited to 64 MiB.
    let mut made = Made::default();
    let cold_cg = made.mkdir(own(&mem_h).join(format!("ws-test-cold-{}", std::process::id())));
    cg::write(
        &cold_cg,
        memory_limit_file(&mem_h),
        &(64u64 << 20).to_string(),
    )
    .unwrap();
    let cold = in_cgroups(
        std::slice::from_ref(&cold_cg),
        &[mem.to_str().unwrap(), "128"],
    )
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .status()
    .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        cold.signal(),
        Some(libc::SIGKILL),
        "the cold start in a 64 MiB cgroup should be killed by the OOM killer: {cold:?}"
    );
    let cold_code = 128 + libc::SIGKILL;
    drop(made);

    let ws = Ws::new();
    ws.record("mem", &[mem.to_str().unwrap(), "128"]);
    // Eager: the restore itself fills 128 MiB; lazy: the app's "all" touches it.
    for (mode, input) in [("--eager", "head\n"), ("--no-prefetch", "all\n")] {
        let out = ws.run(&["run", "--memory", "64M", mode, "mem"], input);
        assert_eq!(out.code(), cold_code, "{mode}: {}", out.describe());
        assert!(
            out.stderr.contains("killed by the OOM killer"),
            "{}",
            out.describe()
        );
        assert_eq!(
            leftover_run_cgroups(),
            Vec::<PathBuf>::new(),
            "{mode}: run left its cgroup"
        );
    }
    // Within the limit it runs as without one.
    let out = ws.run(
        &[
            "run", "--memory", "512M", "--pids", "8", "--cpus", "1.5", "mem",
        ],
        "head\n",
    );
    out.assert_ok();
    assert!(out.stdout.starts_with("1 128 head "), "{}", out.describe());
    assert_eq!(leftover_run_cgroups(), Vec::<PathBuf>::new());
}

#[test]
fn run_limits_are_in_the_instance_cgroup_and_ps_shows_usage() {
    let ws = Ws::new();
    let mem = mem_binary();
    ws.record("mem", &[mem.to_str().unwrap(), "16"]);
    let rt = tempdir("ws-rt-");
    // Eager: all of its memory is in (and charged) when it answers.
    let mut cmd = ws.cmd(&[
        "run", "--eager", "--memory", "256M", "--pids", "9", "--cpus", "0.5", "mem",
    ]);
    cmd.env("XDG_RUNTIME_DIR", rt.path());
    let mut p = common::Proc::spawn(&mut cmd);
    p.send("head");
    assert!(p.read_line().starts_with("1 16 head "));
    // Listed once `run` is back from the restore (the app may answer before).
    let deadline = std::time::Instant::now() + TIMEOUT;
    let list = loop {
        let list = ws.ps_json(rt.path());
        if !list.is_empty() || std::time::Instant::now() > deadline {
            break list;
        }
    };
    assert_eq!(list.len(), 1, "{list:?}");
    let i = &list[0];
    let pid = i["pid"].as_i64().unwrap() as i32;
    assert!(i["memory_bytes"].as_u64().unwrap() >= 16 << 20, "{i}");
    assert!(i["cpu_usec"].as_u64().is_some(), "{i}");
    let dirs: Vec<PathBuf> = i["cgroups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| PathBuf::from(d.as_str().unwrap()))
        .collect();
    // Removed (with the instance) even if this test fails and `run` is killed.
    let _made = Made(dirs.clone());
    // The app is in every one of them, and the limits are set there.
    let mut seen = BTreeMap::new();
    for d in &dirs {
        assert!(
            cg::procs(d).unwrap().contains(&pid),
            "{} lacks {pid}",
            d.display()
        );
        for (f, want) in [
            ("memory.max", "268435456"),
            ("memory.limit_in_bytes", "268435456"),
            ("pids.max", "9"),
            ("cpu.max", "50000 100000"),
            ("cpu.cfs_quota_us", "50000"),
        ] {
            if let Ok(v) = cg::read(d, f) {
                assert_eq!(v, want, "{}/{f}", d.display());
                seen.insert(f.split('.').next().unwrap().to_owned(), ());
            }
        }
    }
    assert_eq!(
        seen.len(),
        3,
        "memory, pids and cpu limits each set once: {dirs:?}"
    );
    p.close_stdin();
    assert!(p.wait().success());
    for d in &dirs {
        assert!(!d.exists(), "{} stays after the instance", d.display());
    }
}

/// Cgroups for a dumped tree: `wsx` below our own cgroup in v2 and in the memory and pids
/// hierarchies, with limits.
struct Tree {
    made: Made,
    dirs: Vec<PathBuf>,
    /// (dir, file) → value before the dump.
    settings: BTreeMap<(PathBuf, String), String>,
}

fn tree_cgroups(name: &str) -> Tree {
    let mut made = Made::default();
    let mut hs: Vec<Hierarchy> = Vec::new();
    for h in [v2(), with_controller("memory"), with_controller("pids")]
        .into_iter()
        .flatten()
    {
        if !hs.contains(&h) {
            hs.push(h);
        }
    }
    let mut dirs = Vec::new();
    for h in &hs {
        dirs.push(made.mkdir(own(h).join(name)));
    }
    let mut settings = BTreeMap::new();
    for (h, d) in hs.iter().zip(&dirs) {
        let ctrls = if h.v2() {
            cg::words(&cg::read(d, "cgroup.controllers").unwrap())
        } else {
            h.controllers()
        };
        if ctrls.iter().any(|c| c == "memory") {
            cg::write(d, memory_limit_file(h), &(100u64 << 20).to_string()).unwrap();
        }
        if ctrls.iter().any(|c| c == "pids") {
            cg::write(d, "pids.max", "7").unwrap();
        }
        for f in [
            "memory.max",
            "memory.high",
            "memory.limit_in_bytes",
            "pids.max",
            "cpu.max",
            "cpu.weight",
        ] {
            if let Ok(v) = cg::read(d, f) {
                settings.insert((d.clone(), f.to_owned()), v);
            }
        }
    }
    Tree {
        made,
        dirs,
        settings,
    }
}

fn cgroup_file(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap()
}

#[test]
fn manage_cgroups_round_trips_membership_and_limits() {
    let ws = Ws::new();
    let name = format!("ws-test-tree-{}", std::process::id());
    let t = tree_cgroups(&name);
    let mut guard = KillGuard::new();
    let mut child = in_cgroups(&t.dirs, &["sleep", "1000"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    guard.add(pid);
    // It has moved itself when it is `sleep`.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default() != "sleep\n" {
        assert!(
            std::time::Instant::now() < deadline,
            "the test process never became sleep"
        );
        std::thread::yield_now();
    }
    let before = cgroup_file(pid);
    let images = tempdir("ws-images-");
    let dir = images.path().join("img");
    let dir_s = dir.to_str().unwrap();
    ws.run(
        &[
            "dump",
            "-t",
            &pid.to_string(),
            "-D",
            dir_s,
            "--manage-cgroups",
        ],
        "",
    )
    .assert_ok();
    child.wait().unwrap();
    // Gone with the process: the restore must recreate them.
    for d in t.dirs.iter().rev() {
        std::fs::remove_dir(d).unwrap();
    }

    // `restore -d`: prints the instance's pid and exits (the instance keeps its stdio);
    // Err(stderr) when it fails.
    let restore = |extra: &[&str], guard: &mut KillGuard, ok: bool| -> Result<i32, String> {
        let mut args = vec!["restore", "-D", dir_s, "--manage-cgroups", "-d"];
        args.extend_from_slice(extra);
        let mut p = common::Proc::spawn(&mut ws.cmd(&args));
        if !ok {
            assert!(!p.wait().success(), "restore should have failed");
            return Err(p.stderr_after_exit());
        }
        let first = p.read_line();
        let pid: i32 = first.trim().parse().expect("restore -d prints the pid");
        guard.add(pid);
        assert!(p.wait().success());
        Ok(pid)
    };
    let rpid = restore(&[], &mut guard, true).unwrap();
    assert_eq!(
        cgroup_file(rpid),
        before,
        "the restored process's /proc/PID/cgroup"
    );
    for ((d, f), v) in &t.settings {
        assert_eq!(
            &cg::read(d, f).unwrap(),
            v,
            "{}/{f} after the restore",
            d.display()
        );
    }

    // A second instance clashes: the cgroups hold the first one.
    let err = restore(&[], &mut guard, false).unwrap_err();
    assert!(err.contains("holds other processes"), "{err}");

    // Under another root (relative to ours): the same tree there.
    let mut roots = Made::default();
    let root = format!("ws-test-root-{}", std::process::id());
    for d in &t.dirs {
        roots.mkdir(d.parent().unwrap().join(&root));
    }
    // A v2 root must delegate what the cgroup had enabled (ours does).
    for d in &t.dirs {
        if d.join("cgroup.events").exists() {
            let ours = cg::read(d.parent().unwrap(), "cgroup.subtree_control").unwrap();
            for c in cg::words(&ours) {
                cg::write(
                    &d.parent().unwrap().join(&root),
                    "cgroup.subtree_control",
                    &format!("+{c}"),
                )
                .unwrap();
            }
        }
    }
    let rpid2 = restore(&["--cgroup-root", &root], &mut guard, true).unwrap();
    let moved = before.replace(&format!("/{name}"), &format!("/{root}/{name}"));
    assert_eq!(cgroup_file(rpid2), moved);
    for d in &t.dirs {
        roots.0.push(d.parent().unwrap().join(&root).join(&name));
    }
    for ((d, f), v) in &t.settings {
        let there = d.parent().unwrap().join(&root).join(&name);
        assert_eq!(&cg::read(&there, f).unwrap(), v, "{}/{f}", there.display());
    }
    drop(guard);
    assert!(!alive(rpid) && !alive(rpid2));
    drop(roots);
    drop(t.made);
}

#[test]
fn manage_cgroups_refuses_a_setting_it_cannot_restore() {
    let Some(h) = with_controller("memory") else {
        panic!("no memory controller on this host");
    };
    let mut made = Made::default();
    let d = made.mkdir(own(&h).join(format!("ws-test-soft-{}", std::process::id())));
    let (file, value) = if h.v2() {
        ("memory.low", "1048576")
    } else {
        ("memory.soft_limit_in_bytes", "1048576")
    };
    cg::write(&d, file, value).unwrap();
    let mut guard = KillGuard::new();
    let mut child = in_cgroups(std::slice::from_ref(&d), &["sleep", "1000"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    guard.add(pid);
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !cg::procs(&d).unwrap().contains(&pid)
        || std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default() != "sleep\n"
    {
        assert!(std::time::Instant::now() < deadline);
        std::thread::yield_now();
    }
    let ws = Ws::new();
    let images = tempdir("ws-images-");
    let dir = images.path().join("img");
    let out = ws.run(
        &[
            "dump",
            "-t",
            &pid.to_string(),
            "-D",
            dir.to_str().unwrap(),
            "--manage-cgroups",
        ],
        "",
    );
    out.assert_fail();
    assert!(
        out.stderr.contains(file),
        "names the file: {}",
        out.describe()
    );
    assert!(alive(pid), "a refused dump leaves the process running");
    assert!(
        !Path::new(&dir).exists(),
        "a refused dump leaves no image directory"
    );
    drop(guard);
    child.wait().unwrap();
}
