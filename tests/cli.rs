//! Bad input and error paths of the CLI: each must fail with a clear message and store
//! nothing.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::{fixture, python, tempdir, workloads_dir, Out, Ws};

fn assert_nothing_stored(ws: &Ws) {
    let ls = ws.ls_json();
    assert_eq!(
        ls,
        serde_json::json!([]),
        "nothing should be stored, `ls --json` shows {ls}"
    );
}

fn err_line(out: &Out) -> String {
    out.stderr.trim().to_owned()
}

#[test]
fn unknown_snapshot_id() {
    let ws = Ws::new();
    let out = ws.run(&["run", "deadbeef0000"], "");
    out.assert_fail();
    let err = err_line(&out);
    assert!(
        err.lines().count() == 1 && err.contains("deadbeef0000"),
        "expected a one-line message naming the id:\n{}",
        out.describe()
    );
    assert!(out.stdout.is_empty(), "{}", out.describe());
    // The same for restore and inspect.
    for cmd in [["restore", "deadbeef0000"], ["inspect", "deadbeef0000"]] {
        let out = ws.run(&cmd, "");
        out.assert_fail();
        let err = err_line(&out);
        assert!(
            err.lines().count() == 1 && err.contains("deadbeef0000"),
            "{}",
            out.describe()
        );
    }
}

#[test]
fn record_command_not_found() {
    let ws = Ws::new();
    let out = ws.run(&["record", "--", "/nonexistent/cmd"], "");
    out.assert_fail();
    assert!(
        out.stderr.contains("command not found") && out.stderr.contains("/nonexistent/cmd"),
        "expected a clear `command not found` naming the command:\n{}",
        out.describe()
    );
    let out = ws.run(&["record", "--", "no-such-command-warmstart-test"], "");
    out.assert_fail();
    assert!(
        out.stderr.contains("command not found")
            && out.stderr.contains("no-such-command-warmstart-test"),
        "{}",
        out.describe()
    );
    assert_nothing_stored(&ws);
}

#[test]
fn record_app_exits_before_warm_point() {
    let ws = Ws::new();
    let out = ws.run(&["record", "--", "sh", "-c", "echo oops >&2; exit 3"], "");
    out.assert_fail();
    assert!(
        out.stderr.contains("oops"),
        "the error should show the app's stderr:\n{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("status 3"),
        "the error should give the exit status 3:\n{}",
        out.describe()
    );
    assert!(
        out.stdout.is_empty(),
        "no id should be printed:\n{}",
        out.describe()
    );
    assert_nothing_stored(&ws);
}

#[test]
fn record_timeout() {
    let ws = Ws::new();
    let t = Instant::now();
    let out = ws.run(&["record", "--timeout", "2", "--", "sleep", "30"], "");
    let took = t.elapsed();
    out.assert_fail();
    assert!(took < Duration::from_secs(20), "--timeout 2 took {took:?}");
    assert!(
        out.stderr.contains("timeout") || out.stderr.contains("timed out"),
        "expected a timeout error:\n{}",
        out.describe()
    );
    assert_nothing_stored(&ws);
}

#[test]
fn dump_no_such_process() {
    let ws = Ws::new();
    let out = ws.run(&["dump", "-t", "999999"], "");
    out.assert_fail();
    assert!(
        out.stderr.contains("no such process") && out.stderr.contains("999999"),
        "{}",
        out.describe()
    );
    assert_nothing_stored(&ws);
}

/// Pid 2 is kthreadd. Running as root, the error must say it is a kernel thread rather than
/// guess at permissions.
#[test]
fn dump_kernel_thread() {
    let ws = Ws::new();
    let comm = std::fs::read_to_string("/proc/2/comm").unwrap_or_default();
    assert_eq!(
        comm.trim(),
        "kthreadd",
        "this test expects pid 2 to be kthreadd"
    );
    let out = ws.run(&["dump", "-t", "2"], "");
    out.assert_fail();
    assert!(
        out.stderr.contains("kernel thread"),
        "expected an error saying pid 2 is a kernel thread:\n{}",
        out.describe()
    );
    let root = nix::unistd::geteuid().is_root();
    assert!(
        !(root && (out.stderr.contains("permission denied") || out.stderr.contains("needs root"))),
        "as root, the error should state that pid 2 is a kernel thread, not suggest a permission problem:\n{}",
        out.describe()
    );
    assert_nothing_stored(&ws);
}

fn record_copy(ws: &Ws) -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempdir("ws-exe-");
    let exe = d.path().join("devs-copy");
    std::fs::copy(fixture("devs"), &exe).unwrap();
    ws.record("copy", &[&exe]);
    // Restores fine while the file is unchanged.
    let out = ws.instance("copy", "check\n");
    assert!(
        out.success() && out.stdout == "PASS\n",
        "{}",
        out.describe()
    );
    (d, exe)
}

/// A new mtime alone (`touch`, or a copy put back with `cp`) is not a change: the bytes
/// are compared with the hash taken at the dump, and they are the same.
#[test]
fn restore_accepts_touched_executable_with_same_bytes() {
    let ws = Ws::new();
    let (_d, exe) = record_copy(&ws);
    let f = std::fs::File::options().write(true).open(&exe).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(3600))
        .unwrap();
    drop(f);
    let out = ws.instance("copy", "check\n");
    assert!(
        out.success() && out.stdout == "PASS\n",
        "{}",
        out.describe()
    );
}

#[test]
fn restore_refuses_rewritten_executable() {
    let ws = Ws::new();
    let (_d, exe) = record_copy(&ws);
    // Same size, different bytes (a string in .rodata), so only the content/mtime differ.
    let mut bytes = std::fs::read(&exe).unwrap();
    let pos = bytes
        .windows(9)
        .position(|w| w == b"/dev/null")
        .expect("string in binary");
    bytes[pos + 5] = b'N';
    std::fs::write(&exe, &bytes).unwrap();
    let out = ws.instance("copy", "check\n");
    out.assert_fail();
    assert!(
        out.stderr.contains(exe.to_str().unwrap())
            && out.stderr.contains("the executable of process")
            && out.stderr.contains("its contents differ"),
        "the error should name {}:\n{}",
        exe.display(),
        out.describe()
    );
}

fn corrupt_largest_pack(ws: &Ws) -> std::path::PathBuf {
    let packs = ws.store().join("packs");
    let pack = std::fs::read_dir(&packs)
        .unwrap_or_else(|e| panic!("{}: {e}", packs.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pack"))
        .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .expect("a pack file under STORE/packs");
    let mut b = std::fs::read(&pack).unwrap();
    let i = b.len() / 2;
    b[i] ^= 0xff;
    std::fs::write(&pack, &b).unwrap();
    pack
}

#[test]
fn verify_detects_flipped_byte() {
    let ws = Ws::new();
    let argv = [
        python().into_os_string(),
        workloads_dir().join("py_echo.py").into_os_string(),
    ];
    let id = ws.record("echo", &argv);
    let out = ws.run(&["verify"], "");
    out.assert_ok();
    let pack = corrupt_largest_pack(&ws);
    let out = ws.run(&["verify"], "");
    out.assert_fail();
    assert!(
        out.stderr.contains(&id),
        "verify should name the damaged snapshot {id}:\n{}",
        out.describe()
    );
    let name = pack.file_name().unwrap().to_str().unwrap();
    assert!(
        out.stderr.contains(name),
        "verify should name the damaged pack {name}:\n{}",
        out.describe()
    );
    // A restore from the damaged store fails clearly instead of running with wrong memory.
    let out = ws.instance("echo", "hello\n");
    out.assert_fail();
    assert!(
        out.stdout.is_empty(),
        "the damaged snapshot must not run:\n{}",
        out.describe()
    );
    assert!(
        out.stderr.contains(&id) && out.stderr.contains(name),
        "{}",
        out.describe()
    );
}

#[test]
fn check_passes() {
    let ws = Ws::new();
    let out = ws.run(&["check"], "");
    out.assert_ok();
}

/// `record` of a program under the host's /tmp (which the app's private /tmp hides) is
/// refused before anything starts, saying why and what to do.
#[test]
fn record_refuses_a_program_hidden_by_the_private_tmp() {
    use std::os::unix::fs::PermissionsExt;
    let tool = format!("/tmp/warmstart-test-tool-{}", std::process::id());
    std::fs::write(&tool, "#!/bin/sh\nread x\n").unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ws = Ws::new();
    let out = ws.run(&["record", "--name", "t", "--", tool.as_str()], "");
    let _ = std::fs::remove_file(&tool);
    out.assert_fail();
    assert!(
        out.stderr.contains("is under /tmp") && out.stderr.contains("--share-tmp"),
        "{}",
        out.describe()
    );
}
