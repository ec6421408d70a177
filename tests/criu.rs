//! CRIU-style use: dump a process that was started without warmstart, restore it elsewhere.

mod common;

use std::process::Command;

use common::{alive, fixture, tempdir, wait_pid_exit, KillGuard, Proc, Ws, TIMEOUT};

fn start_counter() -> Proc {
    let p = Proc::spawn(&mut Command::new(fixture("counter")));
    let ready = p.wait_stderr("ready");
    assert_eq!(ready, format!("ready {}", p.pid()));
    p
}

#[test]
fn dump_kills_and_restore_continues() {
    let ws = Ws::new();
    let mut orig = start_counter();
    orig.send("a");
    assert_eq!(orig.read_line(), "1 a");
    orig.send("b");
    assert_eq!(orig.read_line(), "2 b");

    let images = tempdir("ws-images-");
    let dir = images.path().join("img");
    let pid = orig.pid().to_string();
    let out = ws.run(&["dump", "-t", &pid, "-D", dir.to_str().unwrap()], "");
    out.assert_ok();
    // The original is killed by the dump.
    assert!(
        wait_pid_exit(orig.pid(), TIMEOUT),
        "the dumped process is still running"
    );
    let st = orig.wait();
    assert!(
        !st.success(),
        "the original should have been killed, not exit normally: {st:?}"
    );

    let mut restored = Proc::spawn(&mut ws.cmd(&["restore", "-D", dir.to_str().unwrap()]));
    restored.send("c");
    assert_eq!(restored.read_line(), "3 c");
    restored.send("d");
    assert_eq!(restored.read_line(), "4 d");
    restored.close_stdin();
    let st = restored.wait();
    assert!(
        st.success(),
        "restored counter should exit 0 at EOF: {st:?}"
    );
}

#[test]
fn dump_leave_running() {
    let ws = Ws::new();
    let mut orig = start_counter();
    orig.send("a");
    assert_eq!(orig.read_line(), "1 a");
    let images = tempdir("ws-images-");
    let dir = images.path().join("img");
    let pid = orig.pid().to_string();
    ws.run(
        &[
            "dump",
            "-t",
            &pid,
            "-D",
            dir.to_str().unwrap(),
            "--leave-running",
        ],
        "",
    )
    .assert_ok();

    // The original keeps going...
    assert!(alive(orig.pid()), "--leave-running killed the process");
    orig.send("b");
    assert_eq!(orig.read_line(), "2 b");
    // ...and the copy continues from the dump point.
    let mut copy = Proc::spawn(&mut ws.cmd(&["restore", "-D", dir.to_str().unwrap()]));
    copy.send("x");
    assert_eq!(copy.read_line(), "2 x");
    orig.send("c");
    assert_eq!(orig.read_line(), "3 c");
    copy.close_stdin();
    assert!(copy.wait().success());
    orig.close_stdin();
    assert!(orig.wait().success());
}

/// A counter that answered "a", dumped with `dump -t PID -D DIR` (it exits): the image
/// directory (and the temporary directory holding it).
fn dumped_counter(ws: &Ws) -> (tempfile::TempDir, std::path::PathBuf) {
    let mut orig = start_counter();
    orig.send("a");
    assert_eq!(orig.read_line(), "1 a");
    let images = tempdir("ws-images-");
    let dir = images.path().join("img");
    let pid = orig.pid().to_string();
    ws.run(&["dump", "-t", &pid, "-D", dir.to_str().unwrap()], "")
        .assert_ok();
    orig.wait();
    (images, dir)
}

#[test]
fn restore_detached() {
    let ws = Ws::new();
    let (_images, dir) = dumped_counter(&ws);

    let mut guard = KillGuard::new();
    let mut r = Proc::spawn(&mut ws.cmd(&["restore", "-D", dir.to_str().unwrap(), "-d"]));
    let first = r.read_line();
    let pid: i32 = first
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("restore -d should print a pid, printed {first:?}"));
    guard.add(pid);
    // It returns at once, leaving the instance running.
    let st = r.wait();
    assert!(st.success(), "restore -d failed: {st:?}");
    assert!(alive(pid), "the detached instance {pid} is not running");
    // The instance has the restorer's stdio: our pipes.
    r.send("b");
    assert_eq!(r.read_line(), "2 b");
    drop(guard);
    assert!(!alive(pid), "the instance survived the guard");
}

/// `ps` shows an instance restored from an image directory with a NAME (the directory)
/// and a COMMAND (the dumped process's command line).
#[test]
fn ps_names_a_restore_from_an_image_directory() {
    let ws = Ws::new();
    let (_images, dir) = dumped_counter(&ws);

    let rt = tempdir("ws-rt-");
    let mut copy = Proc::spawn(
        ws.cmd(&["restore", "-D", dir.to_str().unwrap()])
            .env("XDG_RUNTIME_DIR", rt.path()),
    );
    copy.send("b");
    assert_eq!(copy.read_line(), "2 b");
    let list = ws.ps_json(rt.path());
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["names"][0], dir.to_str().unwrap(), "{list:?}");
    let command = list[0]["command"].to_string();
    assert!(command.contains("counter"), "{list:?}");
    let out = common::run_with(
        ws.cmd(&["ps"]).env("XDG_RUNTIME_DIR", rt.path()),
        b"",
        common::TIMEOUT,
    );
    let row = out.stdout.lines().nth(1).unwrap_or_default().to_owned();
    assert!(
        row.contains(dir.to_str().unwrap()) && row.contains("counter"),
        "{}",
        out.describe()
    );
    copy.close_stdin();
    assert!(copy.wait().success());
}
