//! Damage is reported where it is (issue 14): a damaged page table is not blamed on the
//! intact pack, `verify` checks the hot-pages and working-set files too, a missing pack
//! is one line (not one per page) and `ls` marks its snapshot, and a file the user may
//! not read is a permission problem, not damage. Each through the real binary.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{python, run_with, workloads_dir, Out, Ws, TIMEOUT};

fn record_echo(ws: &Ws) -> String {
    let argv = [
        python().into_os_string(),
        workloads_dir().join("py_echo.py").into_os_string(),
    ];
    ws.record("echo", &argv)
}

/// The one file of the store's `dir` whose name ends with `suffix`.
fn file_ending(ws: &Ws, dir: &str, suffix: &str) -> PathBuf {
    let d = ws.store().join(dir);
    let mut found: Vec<PathBuf> = std::fs::read_dir(&d)
        .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one {suffix} file in {}: {found:?}",
        d.display()
    );
    found.remove(0)
}

fn packs(ws: &Ws) -> Vec<PathBuf> {
    let d = ws.store().join("packs");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&d)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pack"))
        .collect();
    v.sort();
    v
}

fn flip(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x10;
    std::fs::write(path, &b).unwrap();
}

/// A record of the page table damaged (its hash): `verify` and a restore name the table,
/// not the pack whose block the record points to (the pack is intact).
#[test]
fn damaged_page_table_is_not_blamed_on_the_pack() {
    let ws = Ws::new();
    let id = record_echo(&ws);
    let table = file_ending(&ws, "snapshots", ".pages");
    let len = std::fs::metadata(&table).unwrap().len() as usize;
    let records = (len - 96) / 56;
    // A byte of the hash of a record in the middle of the table.
    flip(&table, 96 + records / 2 * 56 + 7);

    let out = ws.run(&["verify"], "");
    out.assert_fail();
    let table_name = table.file_name().unwrap().to_str().unwrap();
    assert!(
        out.stderr.contains(&id)
            && out.stderr.contains("page table")
            && out.stderr.contains(table_name),
        "verify should name the damaged page table {table_name}:\n{}",
        out.describe()
    );
    assert!(
        !out.stderr.contains("in pack") && !out.stderr.contains(".pack"),
        "verify should not blame a pack:\n{}",
        out.describe()
    );

    // A restore reads the pages (eagerly: all of them before the app resumes).
    let out = ws.run(&["run", "--eager", "echo"], "hello\n");
    out.assert_fail();
    assert!(out.stdout.is_empty(), "{}", out.describe());
    assert!(
        out.stderr.contains("page table") && out.stderr.contains(table_name),
        "the restore should name the damaged page table:\n{}",
        out.describe()
    );
    assert!(
        !out.stderr.contains(" in pack "),
        "the restore should not blame a pack:\n{}",
        out.describe()
    );
}

/// A missing pack is one line of `verify` (not one per page), and `ls` marks the
/// snapshot, in its text and JSON forms.
#[test]
fn missing_pack_is_one_line_and_marked_by_ls() {
    let ws = Ws::new();
    let id = record_echo(&ws);
    let gone = packs(&ws);
    assert!(!gone.is_empty());
    for p in &gone {
        std::fs::remove_file(p).unwrap();
    }
    let out = ws.run(&["verify"], "");
    out.assert_fail();
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(
        lines.iter().filter(|l| l.contains("is missing")).count(),
        gone.len(),
        "one line per missing pack:\n{}",
        out.describe()
    );
    for p in &gone {
        let name = p.file_name().unwrap().to_str().unwrap();
        assert!(out.stderr.contains(name), "{name}:\n{}", out.describe());
    }
    // The snapshot header, the pack lines and the summary: nothing per page.
    assert!(
        lines.len() <= gone.len() + 2,
        "verify should say it once per pack:\n{}",
        out.describe()
    );

    let out = ws.run(&["ls"], "");
    out.assert_ok();
    let row = out
        .stdout
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("no row for {id}:\n{}", out.describe()));
    assert!(
        row.contains("DAMAGED") && row.contains("missing") && row.contains("echo"),
        "ls should mark the snapshot (and keep its name):\n{}",
        out.describe()
    );
    let json = ws.ls_json();
    let damaged = json[0]["damaged"].as_str().unwrap_or_default();
    assert!(damaged.contains("missing"), "ls --json: {json}");
    assert!(json[0]["logical_bytes"].as_u64().unwrap() > 0, "{json}");
}

/// Waits (bounded) for `path` to exist.
fn wait_for(path: impl Fn() -> Option<PathBuf>) -> PathBuf {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(p) = path() {
            return p;
        }
        assert!(Instant::now() < deadline, "file never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn find(ws: &Ws, suffix: &str) -> Option<PathBuf> {
    std::fs::read_dir(ws.store().join("snapshots"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(suffix))
}

/// `verify` checks the hot-pages (`.hot`) and working-set (`.ws`) files beside a
/// snapshot: each damaged one is reported by name.
#[test]
fn verify_checks_hot_and_working_set_files() {
    let ws = Ws::new();
    let id = record_echo(&ws);
    // The first lazy run learns the working set and writes both files.
    let out = ws.run(&["run", "--no-serve", "echo"], "hello\n");
    out.assert_ok();
    let hot = wait_for(|| find(&ws, ".hot"));
    let wset = wait_for(|| find(&ws, ".ws"));
    ws.run(&["verify"], "").assert_ok();

    let good = std::fs::read(&hot).unwrap();
    flip(&hot, good.len() - 100);
    let out = ws.run(&["verify"], "");
    out.assert_fail();
    let name = hot.file_name().unwrap().to_str().unwrap();
    assert!(
        out.stderr.contains(&id)
            && out.stderr.contains("hot pages file")
            && out.stderr.contains(name),
        "verify should name the damaged hot pages file {name}:\n{}",
        out.describe()
    );
    std::fs::write(&hot, &good).unwrap();

    flip(&wset, 50);
    let out = ws.run(&["verify"], "");
    out.assert_fail();
    let name = wset.file_name().unwrap().to_str().unwrap();
    assert!(
        out.stderr.contains("working set file") && out.stderr.contains(name),
        "verify should name the damaged working set file {name}:\n{}",
        out.describe()
    );
    assert!(!out.stderr.contains("hot pages"), "{}", out.describe());
}

/// Runs `warmstart ARGS` as root without `CAP_DAC_OVERRIDE` and `CAP_DAC_READ_SEARCH`
/// (dropped from the bounding set before exec), so a mode-000 file is `EACCES` to it.
fn run_without_dac_override(ws: &Ws, args: &[&str]) -> Out {
    let mut cmd = ws.cmd(args);
    // SAFETY: only prctl(2), async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH (linux/capability.h).
            for cap in [1 as libc::c_ulong, 2] {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    run_with(&mut cmd, b"", TIMEOUT)
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A store file this user may not read (`EACCES`) is reported as a permission problem,
/// by `verify` (a pack) and by `ls` (a manifest), not as damage.
#[test]
fn permission_denied_is_not_damage() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (to drop CAP_DAC_OVERRIDE)");
        return;
    }
    let ws = Ws::new();
    let id = record_echo(&ws);
    let pack = packs(&ws).remove(0);
    chmod(&pack, 0o000);
    let out = run_without_dac_override(&ws, &["verify"]);
    out.assert_fail();
    let name = pack.file_name().unwrap().to_str().unwrap();
    assert!(
        out.stderr.contains("permission denied") && out.stderr.contains(name),
        "verify should report a permission problem on {name}:\n{}",
        out.describe()
    );
    assert!(
        !out.stderr.contains("is damaged") && out.stderr.contains("0 of 1 snapshot(s) damaged"),
        "a permission problem is not damage:\n{}",
        out.describe()
    );
    // Nothing per page.
    assert!(out.stderr.lines().count() <= 4, "{}", out.describe());
    chmod(&pack, 0o600);
    run_without_dac_override(&ws, &["verify"]).assert_ok();

    let manifest = file_ending(&ws, "snapshots", ".manifest");
    chmod(&manifest, 0o000);
    let out = run_without_dac_override(&ws, &["ls"]);
    out.assert_ok();
    let row = out
        .stdout
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_default();
    assert!(
        row.contains("UNREADABLE") && row.contains("permission denied") && !row.contains("DAMAGED"),
        "ls should report a permission problem, not damage:\n{}",
        out.describe()
    );
    let out = run_without_dac_override(&ws, &["verify"]);
    out.assert_fail();
    assert!(
        out.stderr.contains("permission denied") && !out.stderr.contains("is damaged"),
        "{}",
        out.describe()
    );
    chmod(&manifest, 0o600);
}
