//! zdtm-style fixtures (tests/fixtures/*.c), one kernel resource each: every fixture is run
//! cold (it must PASS, and FAIL after its `break` negative control), then recorded at its
//! warm point and restored with `warmstart run`, where it must PASS again.

mod common;

use common::{cold, fixture, tempdir, Ws};

/// Input for the restored instance: two checks (the state must also survive the first
/// check's own use of it).
const INPUT: &str = "check\ncheck\n";

fn argv(bin: &std::path::Path, dir: Option<&std::path::Path>) -> Vec<std::ffi::OsString> {
    let mut v = vec![bin.as_os_str().to_owned()];
    if let Some(d) = dir {
        v.push(d.as_os_str().to_owned());
    }
    v
}

fn assert_all_pass(out: &common::Out, lines: usize, ctx: &str) {
    let want = "PASS\n".repeat(lines);
    assert!(
        out.stdout == want && out.code() == 0,
        "{ctx}: expected {lines}x PASS and exit 0:\n{}",
        out.describe()
    );
}

fn run_fixture(name: &str, needs_dir: bool) {
    let bin = fixture(name);

    // Cold: the fixture itself passes...
    let d = tempdir("ws-cold-");
    let out = cold(&argv(&bin, needs_dir.then(|| d.path())), INPUT);
    assert_all_pass(&out, 2, &format!("cold {name}"));
    // ...and can fail: the negative control breaks its state on purpose.
    let d = tempdir("ws-neg-");
    let out = cold(
        &argv(&bin, needs_dir.then(|| d.path())),
        "check\nbreak\ncheck\n",
    );
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines.len() == 2 && lines[0] == "PASS" && lines[1].starts_with("FAIL: ") && out.code() == 1,
        "cold {name} with `break` should print PASS then FAIL and exit 1:\n{}",
        out.describe()
    );

    // Record at the warm point, restore, check.
    let ws = Ws::new();
    let d = tempdir("ws-rec-");
    let id = ws.record(name, &argv(&bin, needs_dir.then(|| d.path())));
    let out = ws.instance(name, INPUT);
    assert_all_pass(&out, 2, &format!("restored {name} ({id})"));
}

#[test]
fn heap_and_mmap() {
    run_fixture("heap", false);
}

#[test]
fn private_file_mapping_written_page() {
    run_fixture("file_private", true);
}

#[test]
fn shared_file_mapping() {
    run_fixture("file_shared", true);
}

#[test]
fn guard_page() {
    run_fixture("guard", false);
}

#[test]
fn growsdown_stack() {
    run_fixture("growsdown", false);
}

#[test]
fn signal_handlers_mask_pending() {
    run_fixture("signals", false);
}

#[test]
fn rlimits() {
    run_fixture("rlimits", false);
}

#[test]
fn cwd_and_umask() {
    run_fixture("cwd_umask", true);
}

#[test]
fn open_file_offsets_append_dup() {
    run_fixture("files", true);
}

#[test]
fn pipe_with_unread_data() {
    run_fixture("pipe", false);
}

#[test]
fn vdso_clock_and_getpid() {
    run_fixture("vdso_pid", false);
}

#[test]
fn dev_null_and_urandom() {
    run_fixture("devs", false);
}

/// The restored process's /proc/self/maps matches the one it wrote just before the snapshot.
#[test]
fn maps_equal_after_restore() {
    let bin = fixture("maps");
    let ws = Ws::new();
    let d = tempdir("ws-maps-");
    let before_path = d.path().join("maps.before");
    ws.record(
        "maps",
        &[
            bin.as_os_str(),
            before_path.as_os_str(),
            d.path().as_os_str(),
        ],
    );
    let before = std::fs::read_to_string(&before_path)
        .expect("the fixture wrote its maps before the warm point");
    let out = ws.instance("maps", "maps\n");
    assert!(
        out.code() == 0 && out.stdout.ends_with("END\n"),
        "restored maps fixture:\n{}",
        out.describe()
    );
    let after = out.stdout.strip_suffix("END\n").unwrap();

    let norm = |s: &str| -> Vec<String> {
        s.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    };
    let (b, a) = (norm(&before), norm(after));
    let mut diffs = Vec::new();
    for l in &b {
        if !a.contains(l) {
            diffs.push(format!("- {l}"));
        }
    }
    for l in &a {
        if !b.contains(l) {
            diffs.push(format!("+ {l}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "/proc/self/maps differs after restore (- before snapshot, + restored):\n{}\n\n--- before ---\n{before}\n--- after ---\n{after}",
        diffs.join("\n")
    );
}
