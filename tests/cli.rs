//! Bad input and error paths of the CLI: each must fail with a clear message and store
//! nothing.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::{fixture, python, run_with, tempdir, workloads_dir, Out, Proc, Ws};

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
    // One flipped byte lands in a page the app may touch only after it has answered (a
    // lazy restore finds it at that fault), so every stored page is damaged here: the
    // first page the restore reads is then a damaged one, in either mode.
    damage_every_page(&pack);
    for mode in [&["run"][..], &["run", "--eager"][..]] {
        let mut args = mode.to_vec();
        args.push("echo");
        let out = ws.run(&args, "hello\n");
        out.assert_fail();
        assert!(
            out.stdout.is_empty(),
            "the damaged snapshot must not run ({mode:?}):\n{}",
            out.describe()
        );
        assert!(
            out.stderr.contains(&id) && out.stderr.contains(name),
            "{}",
            out.describe()
        );
    }
}

/// Flips every byte of `pack` past its 16-byte header, so that every block stored there
/// (a compressed one can be a few bytes long) is damaged.
fn damage_every_page(pack: &std::path::Path) {
    let mut b = std::fs::read(pack).unwrap();
    for x in b.iter_mut().skip(16) {
        *x ^= 0x5a;
    }
    std::fs::write(pack, &b).unwrap();
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

// ---------------------------------------------------------------------------------------
// Messages and output (issue 14): each asserts what a user sees.

fn echo_argv() -> [std::ffi::OsString; 2] {
    [
        python().into_os_string(),
        workloads_dir().join("py_echo.py").into_os_string(),
    ]
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// An error's causes are not repeated: a bad `--ready` is said once (and lists every
/// trigger), and an `EACCES` is not followed by the same `EACCES` again.
#[test]
fn error_chains_do_not_repeat_themselves() {
    let ws = Ws::new();
    let out = ws.run(&["record", "--ready", "bogus", "--", "true"], "");
    out.assert_fail();
    assert_eq!(
        out.stderr.matches("--ready").count(),
        1,
        "`--ready` said more than once:\n{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("bogus") && out.stderr.contains("notify"),
        "{}",
        out.describe()
    );
    if !is_root() {
        return;
    }
    // A store this user may not read: one `Permission denied`.
    ws.record("echo", &echo_argv());
    let out = run_with(
        common::as_nobody(&mut ws.cmd(&["inspect", "echo"])),
        b"",
        common::TIMEOUT,
    );
    out.assert_fail();
    assert!(
        out.stderr.lines().count() == 1
            && out
                .stderr
                .to_lowercase()
                .matches("permission denied")
                .count()
                <= 2
            && out.stderr.matches("(os error 13)").count() == 1,
        "{}",
        out.describe()
    );
}

/// Without root, `record`/`run`/`restore`/`dump` say which privileges are missing and
/// point to `warmstart check` (not `clone3(init): EPERM`); `ps` says why it cannot list.
#[test]
fn non_root_is_told_what_privilege_is_missing() {
    if !is_root() {
        return;
    }
    let ws = Ws::new();
    ws.record("echo", &echo_argv());
    let fresh = tempdir("ws-nobody-");
    std::fs::set_permissions(
        fresh.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let fresh_store = fresh.path().join("store");
    let fresh_store = fresh_store.to_str().unwrap();
    for args in [
        &["--store", fresh_store, "record", "--", "true"][..],
        &["run", "echo"][..],
        &["restore", "echo"][..],
        &["dump", "-t", "1"][..],
    ] {
        let out = run_with(common::as_nobody(&mut ws.cmd(args)), b"", common::TIMEOUT);
        out.assert_fail();
        assert!(
            out.stderr.contains("needs root")
                && out.stderr.contains("CAP_SYS_ADMIN")
                && out.stderr.contains("uid 65534")
                && out.stderr.contains("warmstart check")
                && !out.stderr.contains("EPERM"),
            "{args:?}:\n{}",
            out.describe()
        );
    }
    assert!(
        !std::path::Path::new(fresh_store).exists(),
        "a refused record created its store"
    );
    // `ps`: the registry of root's instances is root's.
    let rt = tempdir("ws-rt-");
    let registry = rt.path().join("warmstart/instances");
    std::fs::create_dir_all(&registry).unwrap();
    // As `run` creates it: root's only.
    std::fs::set_permissions(
        &registry,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let mut cmd = ws.cmd(&["ps"]);
    cmd.env("XDG_RUNTIME_DIR", rt.path());
    let out = run_with(common::as_nobody(&mut cmd), b"", common::TIMEOUT);
    out.assert_fail();
    assert!(
        out.stderr.contains("cannot list running instances")
            && out.stderr.contains("uid 65534")
            && out.stderr.contains("as root"),
        "{}",
        out.describe()
    );
}

/// A user the serve daemon does not serve is told so (not `Connection reset by peer`),
/// and the message does not say "root and uid 0".
#[test]
fn serve_tells_a_refused_user_why() {
    use std::os::unix::fs::PermissionsExt;
    if !is_root() {
        return;
    }
    let ws = Ws::new();
    let daemon = Proc::spawn(&mut ws.cmd(&["serve", "--pool", "0"]));
    let line = daemon.read_line();
    assert!(line.starts_with("serving "), "serve printed {line:?}");
    // Let the other user reach the socket (an admin's choice).
    std::fs::set_permissions(ws.store(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let sock = ws.store().join("serve.sock");
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = run_with(
        common::as_nobody(&mut ws.cmd(&["run", "anything"])),
        b"",
        common::TIMEOUT,
    );
    out.assert_fail();
    assert!(
        out.stderr.contains("not allowed")
            && out.stderr.contains("uid 65534")
            && out.stderr.contains("serves only root")
            && !out.stderr.contains("reset by peer")
            && !out.stderr.contains("uid 0"),
        "{}",
        out.describe()
    );
    let log = daemon.wait_stderr("not allowed");
    assert!(!log.contains("root and uid 0"), "daemon log: {log}");
}

/// Any unique prefix of an id works, however short; a prefix that several ids start
/// with is called ambiguous and the candidates are listed.
#[test]
fn any_unique_prefix_and_ambiguous_prefixes() {
    let ws = Ws::new();
    let id = ws.record("echo", &echo_argv());
    for n in [1, 2, 3] {
        let out = ws.run(&["inspect", &id[..n]], "");
        out.assert_ok();
        assert!(
            out.stdout.starts_with(&format!("snapshot {id}")),
            "{}",
            out.describe()
        );
    }
    // Two (fake) ids that share a first digit other than the real one's.
    let c = if id.starts_with('a') { 'b' } else { 'a' };
    let fakes: Vec<String> = ["1", "2"]
        .iter()
        .map(|d| format!("{c}{d}{}", "0".repeat(62)))
        .collect();
    for f in &fakes {
        std::fs::write(ws.store().join(format!("snapshots/{f}.manifest")), b"x").unwrap();
    }
    let out = ws.run(&["inspect", &c.to_string()], "");
    out.assert_fail();
    assert!(
        out.stderr.contains("ambiguous")
            && !out.stderr.contains("no snapshot")
            && fakes.iter().all(|f| out.stderr.contains(&f[..12])),
        "{}",
        out.describe()
    );
}

/// `ls`, `inspect`, `run`, `rm`, `verify` and `gc` never create a store; a mistyped
/// `--store` says it does not exist; a failed `dump` or `record` leaves no store or
/// image directory behind.
#[test]
fn read_only_and_failed_commands_create_nothing() {
    let ws = Ws::new();
    let parent = tempdir("ws-typo-");
    let typo = parent.path().join("no-such-store");
    let typo_s = typo.to_str().unwrap();
    for args in [
        &["ls"][..],
        &["inspect", "x"][..],
        &["run", "x"][..],
        &["rm", "x"][..],
        &["verify"][..],
        &["gc"][..],
    ] {
        let mut full = vec!["--store", typo_s];
        full.extend_from_slice(args);
        let out = ws.run(&full, "");
        out.assert_fail();
        assert!(
            out.stderr.contains(typo_s) && out.stderr.contains("does not exist"),
            "{args:?}:\n{}",
            out.describe()
        );
        assert!(!typo.exists(), "{args:?} created the store {typo_s}");
    }
    // An existing empty directory gets nothing written into it either.
    let empty = tempdir("ws-empty-");
    for args in [&["ls"][..], &["inspect", "x"][..], &["run", "x"][..]] {
        let mut full = vec!["--store", empty.path().to_str().unwrap()];
        full.extend_from_slice(args);
        ws.run(&full, "");
        assert_eq!(
            std::fs::read_dir(empty.path()).unwrap().count(),
            0,
            "{args:?} wrote into the store directory"
        );
    }
    // A dump or record that fails.
    let images = parent.path().join("images");
    let images_s = images.to_str().unwrap();
    for args in [
        &["dump", "-t", "2", "-D", images_s][..],
        &["--store", typo_s, "dump", "-t", "2"][..],
        &["--store", typo_s, "record", "--", "/nonexistent/cmd"][..],
    ] {
        ws.run(args, "").assert_fail();
        assert!(
            !images.exists() && !typo.exists(),
            "a failed {args:?} left a directory behind"
        );
    }
}

/// Reusing `--name` says which snapshot lost it; `ls` has CREATED and STORED columns,
/// newest first.
#[test]
fn reused_name_and_ls_columns() {
    let ws = Ws::new();
    let first = ws.record("echo", &echo_argv());
    let mut args: Vec<std::ffi::OsString> = vec!["record".into(), "--name".into(), "echo".into()];
    args.push("--".into());
    args.extend(echo_argv());
    let out = ws.run(&args, "");
    out.assert_ok();
    let second = out.stdout.trim().to_owned();
    assert_ne!(first, second);
    assert!(
        out.stderr
            .contains(&format!("name `echo` now points to snapshot {second}"))
            && out.stderr.contains(&format!("snapshot {first} lost it")),
        "{}",
        out.describe()
    );
    let ls = ws.run(&["ls"], "");
    ls.assert_ok();
    let lines: Vec<&str> = ls.stdout.lines().collect();
    assert!(
        lines[0].contains("CREATED") && lines[0].contains("STORED"),
        "{}",
        ls.describe()
    );
    assert!(
        lines[1].starts_with(&second) && lines[2].starts_with(&first),
        "newest first:\n{}",
        ls.describe()
    );
    assert!(
        lines[1].contains("just now") && (lines[1].contains("KiB") || lines[1].contains("MiB")),
        "{}",
        ls.describe()
    );
}

/// Help lists every `--ready` trigger, describes the snapshot arguments, and usage shows
/// `-- CMD`.
#[test]
fn help_texts() {
    let ws = Ws::new();
    for cmd in ["record", "bench"] {
        let out = ws.run(&[cmd, "--help"], "");
        out.assert_ok();
        for trigger in ["stdin", "listen", "notify", "after=", "signal"] {
            assert!(
                out.stdout.contains(trigger),
                "{cmd} --help lacks {trigger}:\n{}",
                out.stdout
            );
        }
        assert!(
            out.stdout
                .contains(&format!("Usage: warmstart {cmd} [OPTIONS] -- CMD")),
            "{}",
            out.stdout
        );
    }
    for cmd in ["rm", "inspect", "verify"] {
        let out = ws.run(&[cmd, "--help"], "");
        out.assert_ok();
        assert!(
            out.stdout.contains("a name, an id, or a unique prefix"),
            "{cmd} --help does not describe its argument:\n{}",
            out.stdout
        );
    }
}

/// `inspect` of a tree whose group and session are inherited says so instead of
/// `pgid 0 sid 0`.
#[test]
fn inspect_says_inherited_group_and_session() {
    let ws = Ws::new();
    ws.record("echo", &echo_argv());
    let out = ws.run(&["inspect", "echo"], "");
    out.assert_ok();
    assert!(
        !out.stdout.contains("pgid 0")
            && !out.stdout.contains("sid 0")
            && out.stdout.contains("inherited from outside the tree"),
        "{}",
        out.describe()
    );
}

/// Colours and progress are for terminals: through pipes a log line has no escape codes
/// and `gc` waiting for the store lock draws nothing; on a terminal (a pty through
/// `script`) the log is coloured and a spinner says what gc waits for.
#[test]
fn colours_and_progress_only_on_a_terminal() {
    use std::os::fd::AsRawFd;
    let ws = Ws::new();
    ws.run(&["ls"], "").assert_ok();
    std::fs::create_dir_all(ws.store()).unwrap();
    let hold = || {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(ws.store().join("lock"))
            .unwrap();
        // SAFETY: flock takes integers; `f` keeps the fd open.
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
        f
    };
    // Pipes.
    let lock = hold();
    let mut gc = Proc::spawn(&mut ws.cmd(&["-v", "gc"]));
    let line = gc.wait_stderr("waiting for the store lock");
    assert!(
        !line.contains('\x1b'),
        "a log line through a pipe is coloured: {line:?}"
    );
    drop(lock);
    assert!(gc.wait().success());
    let err = gc.stderr_after_exit();
    assert!(
        !err.contains('\r') && !err.contains('\x1b') && !err.contains("gc: waiting"),
        "gc drew progress on a pipe:\n{err}"
    );
    // A terminal.
    let lock = hold();
    let cmdline = format!(
        "{} -v --store {} gc",
        common::bin(),
        ws.store().to_str().unwrap()
    );
    let mut script =
        Proc::spawn(std::process::Command::new("script").args(["-qfec", &cmdline, "/dev/null"]));
    let mut seen = String::new();
    while !seen.contains("waiting for the store lock (another") {
        let l = script.read_line();
        seen.push_str(&l);
    }
    drop(lock);
    seen.push_str(&script.stdout_until_eof());
    assert!(script.wait().success(), "{seen}");
    assert!(
        seen.contains("gc: waiting for the store lock") && seen.contains("\x1b["),
        "no spinner or colours on a terminal:\n{seen:?}"
    );
    assert!(seen.contains("removed 0 pack(s)"), "{seen:?}");
}

/// Long work on a terminal shows progress: `record` of an app with 96 MiB of memory,
/// `run --eager` of it and `verify`; through pipes the same commands draw nothing.
#[test]
fn progress_of_large_memory_on_a_terminal() {
    let ws = Ws::new();
    let store = ws.store().to_str().unwrap().to_owned();
    let app = format!(
        "{} -c 'import os,sys; b=os.urandom(96<<20); sys.stdin.readline()'",
        python().display()
    );
    let on_tty = |cmd: &str| -> String {
        let line = format!("{} --store {store} {cmd}", common::bin());
        let mut p =
            Proc::spawn(std::process::Command::new("script").args(["-qfec", &line, "/dev/null"]));
        let all = p.stdout_until_eof();
        assert!(p.wait().success(), "{cmd}:\n{all}");
        all
    };
    let out = on_tty(&format!("record --name big -- {app} < /dev/null"));
    assert!(
        out.contains("writing the memory of the snapshot"),
        "{out:?}"
    );
    let out = on_tty("run --eager big < /dev/null");
    assert!(out.contains("copying memory into the instance"), "{out:?}");
    let out = on_tty("verify");
    assert!(
        out.contains("warmstart: verifying") && out.contains("ok: 1 snapshot(s)"),
        "{out:?}"
    );
    // Pipes: nothing drawn.
    for args in [&["run", "--eager", "big"][..], &["verify"][..]] {
        let out = ws.run(args, "");
        out.assert_ok();
        assert!(
            !out.stderr.contains('\r') && !out.stderr.contains('\x1b'),
            "{args:?} drew on a pipe:\n{}",
            out.describe()
        );
    }
}
