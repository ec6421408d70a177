//! Warm command-line tools: `record --tool` of a Python tool (`python3 -m wstool`, the
//! fixture in tests/fixtures/pytool), then `run SNAP -- ARGS` compared with a cold run of
//! the tool for many argument sets, working directories, environments and stdin: same
//! output, same files written, same exit status. A changed source file makes the next
//! run cold (and the snapshot is recorded again); arguments to a snapshot that is not a
//! tool are refused.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_same_run, fixture, python, run_with, tempdir, Out, Ws, TIMEOUT};

const UMASK: libc::mode_t = 0o027;

/// The fixture tool's package, copied where a test may change it.
fn tool_copy() -> tempfile::TempDir {
    let d = tempdir("ws-tool-");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pytool/wstool");
    let dst = d.path().join("wstool");
    std::fs::create_dir(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        if e.path().extension().is_some_and(|x| x == "py") {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
    d
}

/// Runs `cmd` in `cwd` with the tool on PYTHONPATH, umask [`UMASK`], one extra variable.
fn in_dir(mut cmd: Command, cwd: &Path, pythonpath: &Path, greeting: Option<&str>) -> Command {
    cmd.current_dir(cwd).env("PYTHONPATH", pythonpath);
    match greeting {
        Some(g) => cmd.env("WSTOOL_GREETING", g),
        None => cmd.env_remove("WSTOOL_GREETING"),
    };
    // SAFETY: umask is async-signal-safe; it runs in the forked child before exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(UMASK);
            Ok(())
        });
    }
    cmd
}

fn files_of(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap_or_default(),
            )
        })
        .collect();
    v.sort();
    v
}

fn record_tool(ws: &Ws, pythonpath: &Path) -> String {
    record_tool_with(ws, pythonpath, &[])
}

/// [`record_tool`] with `extra` options of `record`.
fn record_tool_with(ws: &Ws, pythonpath: &Path, extra: &[&str]) -> String {
    let mut cmd = ws.cmd(&[
        "record",
        "--tool",
        "--name",
        "wst",
        "--prime-args",
        "--exit 3 --stderr priming",
    ]);
    cmd.args(extra)
        .arg("--")
        .arg(python())
        .args(["-m", "wstool"])
        .env("PYTHONPATH", pythonpath);
    let out = run_with(&mut cmd, b"", TIMEOUT);
    out.assert_ok();
    assert!(
        out.stderr
            .contains("primed with '--exit 3 --stderr priming': exit status 3"),
        "the priming run's status is reported:\n{}",
        out.describe()
    );
    out.stdout.trim().to_owned()
}

#[test]
fn warm_runs_match_cold_runs() {
    let ws = Ws::new();
    let tool = tool_copy();
    record_tool(&ws, tool.path());
    let dirs = [
        tempdir("ws-cwd-a-"),
        tempdir("ws-cwd-b-"),
        tempdir("ws-cwd-c-"),
    ];
    let sets: Vec<(Vec<&str>, &str, Option<&str>)> = vec![
        (vec![], "", None),
        (vec!["a"], "", Some("hello")),
        (vec!["a", "b", "c"], "", None),
        (vec!["--exit", "0"], "", None),
        (vec!["--exit", "1"], "", Some("x")),
        (vec!["--exit", "2", "more"], "", None),
        (vec!["--exit", "127"], "", None),
        (vec!["--stdin"], "some input\nlines\n", None),
        (vec!["--stdin", "--exit", "5"], "x", Some("y")),
        (vec!["--write", "out.txt"], "", None),
        (vec!["--write", "other.txt", "--exit", "4"], "", Some("w")),
        (vec!["--stderr", "warning"], "", None),
        (vec!["--stderr", "two words", "--exit", "9"], "", None),
        (vec!["--crash"], "", None),
        (vec!["--crash", "--stdin"], "unread", Some("c")),
        (vec!["-v", "--", "-x"], "", None),
        (vec!["ünïcode", "ärg"], "", Some("grüße")),
        (vec![""], "", None),
        (vec!["--exit", "255"], "", None),
        (vec!["--write", "f1", "--write", "f2"], "", None),
        (
            vec!["--stdin", "--stderr", "e", "--write", "g"],
            "in",
            Some("z"),
        ),
    ];
    for (i, (args, stdin, greeting)) in sets.iter().enumerate() {
        let dir = dirs[i % dirs.len()].path();
        let cold_dir = tempdir("ws-cold-");
        let mut cold = Command::new(python());
        cold.args(["-m", "wstool"]).args(args);
        let cold = run_with(
            &mut in_dir(cold, cold_dir.path(), tool.path(), *greeting),
            stdin.as_bytes(),
            TIMEOUT,
        );
        let mut warm = ws.cmd(&["run", "wst", "--"]);
        warm.args(args);
        let warm = run_with(
            &mut in_dir(warm, dir, tool.path(), *greeting),
            stdin.as_bytes(),
            TIMEOUT,
        );
        // The cwd is in the output: compare with the cold run's directory named alike.
        let warm = Out {
            stdout: warm.stdout.replace(
                &dir.display().to_string(),
                &cold_dir.path().display().to_string(),
            ),
            ..warm
        };
        assert_same_run(&format!("args {args:?}"), &cold, &warm);
        assert_eq!(
            files_of(dir),
            files_of(cold_dir.path()),
            "args {args:?}: files written"
        );
        for (f, _) in files_of(dir) {
            std::fs::remove_file(dir.join(f)).unwrap();
        }
    }
}

#[test]
fn concurrent_warm_runs_keep_their_own_cwd_and_env() {
    let ws = Ws::new();
    let tool = tool_copy();
    record_tool(&ws, tool.path());
    let (a, b) = (tempdir("ws-conc-a-"), tempdir("ws-conc-b-"));
    let run = |dir: PathBuf, g: &'static str, file: &'static str| {
        let mut c = ws.cmd(&["run", "wst", "--", "--write", file]);
        // As a cold run needs it (a warm run with another PYTHONPATH would run cold).
        c.current_dir(&dir)
            .env("WSTOOL_GREETING", g)
            .env("PYTHONPATH", tool.path());
        let out = run_with(&mut c, b"", TIMEOUT);
        out.assert_ok();
        let v: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
        (v, dir)
    };
    let (ra, rb) = std::thread::scope(|s| {
        let ha = s.spawn(|| run(a.path().to_owned(), "from a", "a.txt"));
        let hb = s.spawn(|| run(b.path().to_owned(), "from b", "b.txt"));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    for ((v, dir), g, f, other) in [
        (ra, "from a", "a.txt", "b.txt"),
        (rb, "from b", "b.txt", "a.txt"),
    ] {
        assert_eq!(v["cwd"], dir.display().to_string());
        assert_eq!(v["greeting"], g);
        assert!(dir.join(f).is_file() && !dir.join(other).exists());
    }
}

#[test]
fn a_changed_source_file_runs_the_new_code() {
    let ws = Ws::new();
    let tool = tool_copy();
    let first = record_tool_with(&ws, tool.path(), &["--reproducible"]);
    let version = |out: &Out| -> String {
        let v: serde_json::Value = serde_json::from_str(out.stdout.trim())
            .unwrap_or_else(|e| panic!("{e}: {}", out.describe()));
        v["version"].as_str().unwrap().to_owned()
    };
    let run = || {
        let mut c = ws.cmd(&["run", "wst", "--", "x"]);
        c.env("PYTHONPATH", tool.path());
        run_with(&mut c, b"", TIMEOUT)
    };
    let out = run();
    out.assert_ok();
    assert_eq!(version(&out), "1");
    assert!(!out.stderr.contains("stale"), "{}", out.describe());
    std::fs::write(tool.path().join("wstool/helper.py"), "VERSION = \"2\"\n").unwrap();
    let fail = {
        let mut c = ws.cmd(&["run", "--stale", "fail", "wst", "--", "x"]);
        c.env("PYTHONPATH", tool.path());
        run_with(&mut c, b"", TIMEOUT)
    };
    fail.assert_fail();
    assert!(
        fail.stderr.contains("is stale") && fail.stderr.contains("helper.py"),
        "{}",
        fail.describe()
    );
    let cold = run();
    cold.assert_ok();
    assert_eq!(
        version(&cold),
        "2",
        "the new code runs: {}",
        cold.describe()
    );
    assert_eq!(
        cold.stderr.matches("warmstart:").count(),
        1,
        "said once: {}",
        cold.describe()
    );
    // It is recorded again in the background: wait (bounded) until the name moves.
    ws.wait_renamed("wst", &first);
    let warm = run();
    warm.assert_ok();
    assert_eq!(version(&warm), "2");
    // Recorded again as it was recorded: with --reproducible.
    let personality = ws.inspect_json("wst")["manifest"]["processes"][0]["personality"]
        .as_u64()
        .unwrap();
    assert_ne!(
        personality & libc::ADDR_NO_RANDOMIZE as u64,
        0,
        "the background record should be --reproducible as the first was"
    );
    assert!(!warm.stderr.contains("stale"), "{}", warm.describe());
}

#[test]
fn arguments_to_a_snapshot_that_is_not_a_tool_are_refused() {
    let ws = Ws::new();
    ws.record("counter", &[fixture("counter")]);
    let out = ws.run(&["run", "counter", "--", "x"], "");
    out.assert_fail();
    assert!(
        out.stderr.contains("was not recorded with --tool"),
        "{}",
        out.describe()
    );
    let bad = ws.run(&["record", "--tool", "--", "true"], "");
    bad.assert_fail();
    assert!(bad.stderr.contains("python3 -m MOD"), "{}", bad.describe());
}

/// A real tool from PyPI (installed by .ci/run), recorded as its console script and as
/// `python3 -m`, compared with cold runs on good, badly formatted and broken inputs.
fn real_tool(name: &str, module: &str, sets: &[&[&str]]) {
    let have = Command::new(python())
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        assert!(
            std::env::var_os("WARMSTART_REQUIRE_SERVERS").is_none(),
            "{name} is not installed (.ci/run installs it)"
        );
        eprintln!("skipping: {name} is not installed");
        return;
    }
    let ws = Ws::new();
    let scripts = Command::new(python())
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .unwrap();
    let script = Path::new(String::from_utf8_lossy(&scripts.stdout).trim()).join(name);
    let inputs = tempdir("ws-tool-in-");
    let sample = common::workloads_dir().join("tools/sample.py");
    std::fs::copy(&sample, inputs.path().join("good.py")).unwrap();
    std::fs::write(
        inputs.path().join("ugly.py"),
        "x = [1,2 ,3]\nimport os\ndef f( a ):\n  return a\n",
    )
    .unwrap();
    std::fs::write(inputs.path().join("broken.py"), "def f(:\n    pass\n").unwrap();
    for (how, argv) in [
        ("console script", vec![script.clone().into_os_string()]),
        (
            "-m",
            vec![python().into_os_string(), "-m".into(), module.into()],
        ),
    ] {
        let mut rec = ws.cmd(&[
            "record",
            "--tool",
            "--name",
            name,
            "--prime-args",
            "good.py",
            "--",
        ]);
        rec.args(&argv).current_dir(inputs.path());
        run_with(&mut rec, b"", TIMEOUT).assert_ok();
        for args in sets {
            let mut cold = Command::new(&argv[0]);
            cold.args(&argv[1..]).args(*args).current_dir(inputs.path());
            let cold = run_with(&mut cold, b"", TIMEOUT);
            let mut warm = ws.cmd(&["run", name, "--"]);
            warm.args(*args).current_dir(inputs.path());
            let warm = run_with(&mut warm, b"", TIMEOUT);
            assert_same_run(&format!("{name} ({how}) {args:?}"), &cold, &warm);
        }
    }
}

#[test]
fn black_warm_is_black() {
    real_tool(
        "black",
        "black",
        &[
            &["--check", "good.py"],
            &["--check", "ugly.py"],
            &["--check", "-q", "ugly.py"],
            &["-", "--check"],
            &["--check", "broken.py"],
            &["--check", "--line-length", "20", "good.py"],
            &["--version"],
            &["--code", "x=1"],
            &["--nonexistent-option"],
            &["--check", "missing.py"],
        ],
    );
}

#[test]
fn flake8_warm_is_flake8() {
    real_tool(
        "flake8",
        "flake8",
        &[
            &["good.py"],
            &["ugly.py"],
            &["broken.py"],
            &["--max-line-length", "20", "good.py"],
            &["--select", "E2", "ugly.py"],
            &["--version"],
            &["--bogus"],
            &["missing.py"],
        ],
    );
}

/// `shim`: an executable that runs the tool warm, and cold (saying why, once) when the
/// snapshot is gone; a snapshot that is not a tool gets no shim.
#[test]
fn a_shim_runs_the_tool_warm_or_cold() {
    let ws = Ws::new();
    let tool = tool_copy();
    record_tool(&ws, tool.path());
    let dir = tempdir("ws-shim-");
    ws.run(&["shim", "wst", "--dir", dir.path().to_str().unwrap()], "")
        .assert_ok();
    let shim = dir.path().join("wst");
    let run = |args: &[&str]| {
        let mut c = Command::new(&shim);
        c.args(args)
            .env("PYTHONPATH", tool.path())
            .env_remove("WARMSTART_STORE");
        run_with(&mut c, b"", TIMEOUT)
    };
    let warm = run(&["-x", "--exit", "3"]);
    assert_eq!(warm.code(), 3, "{}", warm.describe());
    assert!(
        warm.stdout
            .contains("\"argv\": [\"-x\", \"--exit\", \"3\"]"),
        "{}",
        warm.describe()
    );
    assert!(!warm.stderr.contains("warmstart"), "{}", warm.describe());
    ws.run(&["rm", "wst"], "").assert_ok();
    let cold = run(&["-x", "--exit", "4"]);
    assert_eq!(cold.code(), 4, "{}", cold.describe());
    assert!(
        cold.stdout
            .contains("\"argv\": [\"-x\", \"--exit\", \"4\"]"),
        "{}",
        cold.describe()
    );
    assert_eq!(
        cold.stderr.matches("running it cold").count(),
        1,
        "{}",
        cold.describe()
    );
    ws.record("counter", &[fixture("counter")]);
    let no = ws.run(
        &["shim", "counter", "--dir", dir.path().to_str().unwrap()],
        "",
    );
    no.assert_fail();
    assert!(
        no.stderr.contains("not recorded with --tool"),
        "{}",
        no.describe()
    );
    assert!(!dir.path().join("counter").exists());
}

/// `bench --tool` times cold runs of a tool against warm ones (issue 16), lone and (with
/// `--served`) answered by a daemon, compares their output and exit status, and leaves no
/// snapshot behind.
#[test]
fn bench_compares_cold_and_warm_runs_of_a_tool() {
    let tool = tool_copy();
    let ws = Ws::new();
    let mut cmd = ws.cmd(&["bench", "--tool", "--served", "--runs", "2", "--"]);
    cmd.arg(python())
        .args(["-m", "wstool", "--exit", "4"])
        .env("PYTHONPATH", tool.path());
    let out = run_with(&mut cmd, b"", TIMEOUT);
    out.assert_ok();
    assert!(
        out.stdout.contains("cold: ")
            && out.stdout.contains("warm: ")
            && out.stdout.contains("served: ")
            && out.stdout.matches("(median of 2 pairs)").count() == 2
            && !out.stdout.contains("differ"),
        "{}",
        out.describe()
    );
    assert_eq!(ws.ls_json(), serde_json::json!([]), "the snapshot was kept");
}

/// A tool's runs go through `warmstart serve` when it runs (issue 16): handed out by a
/// parked instance, each with its own arguments, cwd, environment and umask, as a cold
/// start would run.
#[test]
fn tool_runs_through_serve_from_parked_instances() {
    let ws = Ws::new();
    let tool = tool_copy();
    let recorded = record_tool(&ws, tool.path());
    // The first run learns the working set (served runs need one).
    let dir = tempdir("ws-cwd-");
    let first = ws.cmd(&["run", "--no-serve", "wst", "--", "learn"]);
    run_with(
        &mut in_dir(first, dir.path(), tool.path(), None),
        b"",
        TIMEOUT,
    )
    .assert_ok();
    let daemon = ws.serve("wst");
    for (i, (args, greeting)) in [
        (vec!["a", "b"], Some("hi")),
        (vec!["--exit", "3", "--write", "f.txt"], None),
        (vec!["--stdin"], Some("again")),
    ]
    .into_iter()
    .enumerate()
    {
        if i > 0 {
            daemon.wait_stderr("parked an instance of");
        }
        let cold_dir = tempdir("ws-cold-");
        let mut cold = Command::new(python());
        cold.args(["-m", "wstool"]).args(&args);
        let cold = run_with(
            &mut in_dir(cold, cold_dir.path(), tool.path(), greeting),
            b"in\n",
            TIMEOUT,
        );
        let mut warm = ws.cmd(&["run", "--display-stats", "wst", "--"]);
        warm.args(&args);
        let warm = run_with(
            &mut in_dir(warm, dir.path(), tool.path(), greeting),
            b"in\n",
            TIMEOUT,
        );
        assert!(
            warm.stderr.contains("by serve (parked instance)"),
            "{}",
            warm.describe()
        );
        let warm = Out {
            stdout: warm.stdout.replace(
                &dir.path().display().to_string(),
                &cold_dir.path().display().to_string(),
            ),
            stderr: warm
                .stderr
                .lines()
                .take_while(|l| !l.starts_with("restore of "))
                .map(|l| format!("{l}\n"))
                .collect(),
            ..warm
        };
        assert_same_run(&format!("served {args:?}"), &cold, &warm);
        assert_eq!(files_of(dir.path()), files_of(cold_dir.path()), "{args:?}");
        for (f, _) in files_of(dir.path()) {
            std::fs::remove_file(dir.path().join(f)).unwrap();
        }
    }
    // The daemon checks what the run brings before it hands out an instance: a start-up
    // variable other than the record's, or a changed source file, runs the tool cold
    // (saying why, once), never the recorded state.
    let version = |out: &Out| -> String {
        let v: serde_json::Value = serde_json::from_str(out.stdout.trim())
            .unwrap_or_else(|e| panic!("{e}: {}", out.describe()));
        v["version"].as_str().unwrap().to_owned()
    };
    let mut other_env = ws.cmd(&["run", "wst", "--", "x"]);
    other_env
        .env("PYTHONPATH", tool.path())
        .env("PYTHONHASHSEED", "4242");
    let out = run_with(&mut other_env, b"", TIMEOUT);
    out.assert_ok();
    assert!(
        out.stderr.contains("PYTHONHASHSEED")
            && out.stderr.contains("running the tool cold")
            && out.stderr.matches("warmstart:").count() == 1,
        "{}",
        out.describe()
    );
    assert_eq!(version(&out), "1");
    std::fs::write(tool.path().join("wstool/helper.py"), "VERSION = \"2\"\n").unwrap();
    let mut changed = ws.cmd(&["run", "wst", "--", "x"]);
    changed.env("PYTHONPATH", tool.path());
    let out = run_with(&mut changed, b"", TIMEOUT);
    out.assert_ok();
    assert!(
        out.stderr.contains("is stale") && out.stderr.contains("helper.py"),
        "{}",
        out.describe()
    );
    assert_eq!(version(&out), "2", "the new code runs: {}", out.describe());
    // Recorded again in the background: wait (bounded) until the name moves.
    ws.wait_renamed("wst", &recorded);
}

/// A Node tool (`node SCRIPT`, issue 16): warmed by its priming run (its async part
/// included: none of it is left for the warm runs), then each warm run prints, writes and
/// exits as the cold one, with its own arguments, cwd, environment, stdin and umask.
#[test]
fn node_tool_warm_runs_match_cold_runs() {
    let Ok(node) = warmstart::bench::real_path("node") else {
        assert!(
            std::env::var_os("WARMSTART_REQUIRE_SERVERS").is_none(),
            "node is not installed"
        );
        eprintln!("skipping: node is not installed");
        return;
    };
    let ws = Ws::new();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nodetool/wsnode.js");
    let mut rec = ws.cmd(&[
        "record",
        "--tool",
        "--name",
        "wn",
        "--prime-args",
        "--exit 3 --later priming",
        "--",
    ]);
    rec.arg(&node).arg(&script);
    let out = run_with(&mut rec, b"", TIMEOUT);
    out.assert_ok();
    assert!(
        out.stderr
            .contains("later still: priming\nwarmstart: primed with '--exit 3 --later priming': exit status 3"),
        "the priming run's async part runs before the snapshot: {}",
        out.describe()
    );
    let nowhere = tempdir("ws-none-");
    for (args, stdin, greeting) in [
        (vec![], "", None),
        (vec!["a", "b c"], "", Some("hello")),
        (vec!["--exit", "4"], "", None),
        (vec!["--stdin", "--exit", "2"], "in\nput\n", Some("x")),
        (vec!["--write", "out.txt"], "", None),
        (vec!["--stderr", "warning"], "", None),
        (vec!["ünï", ""], "", None),
        (vec!["--later", "x", "--exit", "5"], "", None),
    ] {
        let dir = tempdir("ws-cwd-");
        let cold_dir = tempdir("ws-cold-");
        let mut cold = Command::new(&node);
        cold.arg(&script).args(&args);
        let cold = run_with(
            &mut in_dir(cold, cold_dir.path(), nowhere.path(), greeting),
            stdin.as_bytes(),
            TIMEOUT,
        );
        let mut warm = ws.cmd(&["run", "wn", "--"]);
        warm.args(&args);
        let warm = run_with(
            &mut in_dir(warm, dir.path(), nowhere.path(), greeting),
            stdin.as_bytes(),
            TIMEOUT,
        );
        let warm = Out {
            stdout: warm.stdout.replace(
                &dir.path().display().to_string(),
                &cold_dir.path().display().to_string(),
            ),
            ..warm
        };
        assert_same_run(&format!("node {args:?}"), &cold, &warm);
        assert_eq!(files_of(dir.path()), files_of(cold_dir.path()), "{args:?}");
    }
    // An uncaught exception: the same error and status (the stack's frames differ).
    let mut warm = ws.cmd(&["run", "wn", "--", "--throw"]);
    let warm = run_with(&mut warm, b"", TIMEOUT);
    assert_eq!(warm.code(), 1, "{}", warm.describe());
    assert!(
        warm.stderr.contains("Error: wsnode failed on purpose"),
        "{}",
        warm.describe()
    );
}

/// `tsc` on PATH when it is TypeScript 5's npm bin link (a Node script; .ci/run installs
/// it), else `None` (a failure under WARMSTART_REQUIRE_SERVERS).
fn node_tsc() -> Option<PathBuf> {
    let found = Command::new("sh")
        .args(["-c", "command -v tsc"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|p| !p.is_empty());
    let why = match &found {
        None => "tsc is not installed (.ci/run installs it: npm install -g typescript@5)".into(),
        Some(p) => {
            let head = std::fs::read(p).unwrap_or_default();
            let version = Command::new(p)
                .arg("--version")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default();
            if !head.starts_with(b"#!")
                || !head
                    .split(|&b| b == b'\n')
                    .next()
                    .unwrap()
                    .ends_with(b"node")
            {
                format!("{p} is not a Node script (TypeScript 7 is native; .ci/run pins 5)")
            } else if !version.starts_with("Version 5.") {
                format!("{p} is {version:?}, not TypeScript 5 (.ci/run pins it)")
            } else {
                return found.map(PathBuf::from);
            }
        }
    };
    assert!(
        std::env::var_os("WARMSTART_REQUIRE_SERVERS").is_none(),
        "{why}"
    );
    eprintln!("skipping: {why}");
    None
}

fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dst.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

/// Every file and directory under `dir` (relative path, mode, content), sorted.
fn tree_of(dir: &Path) -> Vec<(String, u32, Vec<u8>)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.is_dir() {
                todo.push(p);
                out.push((rel, mode, Vec::new()));
            } else {
                out.push((rel, mode, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// What `cmd` writes on a terminal (stdout and stderr on a new pty), and its exit code.
fn on_terminal(mut cmd: Command) -> (i32, Vec<u8>) {
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::ExitStatusExt;
    // SAFETY: posix_openpt returns a new fd or -1; it is owned from here on.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    assert!(
        master >= 0,
        "posix_openpt: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `master` is a new fd nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `master` is a pty master; `name` is a buffer of the length given.
    let ok = unsafe {
        libc::grantpt(master.as_raw_fd()) == 0
            && libc::unlockpt(master.as_raw_fd()) == 0
            && libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) == 0
    };
    assert!(ok, "setting up a pty: {}", std::io::Error::last_os_error());
    // SAFETY: ptsname_r wrote a NUL-terminated path into `name`.
    let slave_path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&slave_path)
        .unwrap();
    cmd.stdin(std::process::Stdio::null())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .process_group(0);
    let mut child = cmd.spawn().expect("spawning on a terminal");
    // Only the child holds the slave now: the master reads EIO once it is gone.
    drop(cmd);
    let mut guard = common::KillGuard::new();
    guard.add(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    let mut m = std::fs::File::from(master);
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = m.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        let _ = tx.send(out);
    });
    assert!(
        common::wait_pid_exit(child.id() as i32, TIMEOUT),
        "the command on a terminal did not finish"
    );
    let status = child.wait().unwrap();
    let out = rx.recv_timeout(TIMEOUT).expect("the terminal's output");
    drop(guard);
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    (code, out)
}

/// tsc, TypeScript 5 from npm (installed by .ci/run), recorded as its npm bin link: the
/// same output, files written (and their modes) and exit status as cold runs, checking
/// a good and a broken project with and without emitting, bad options, from other
/// working directories, with another environment, and on a terminal (pretty output).
#[test]
fn tsc_warm_is_tsc() {
    let Some(tsc) = node_tsc() else {
        return;
    };
    // The projects: the shared one, the same with a type error, an empty directory.
    let template = tempdir("ws-tsc-in-");
    let tsproj = common::workloads_dir().join("tools/tsproj");
    copy_tree(&tsproj, &template.path().join("tsproj"));
    copy_tree(&tsproj, &template.path().join("bad"));
    std::fs::write(
        template.path().join("bad/src/bad.ts"),
        "import { total } from \"./item\";\nexport const n: number = total({ name: \"x\" });\n",
    )
    .unwrap();
    std::fs::create_dir(template.path().join("empty")).unwrap();
    // Cold and warm runs each get a fresh copy at one path, so paths in the output match.
    let root = tempdir("ws-tsc-");
    let work = root.path().join("w");
    let fresh = || {
        if work.exists() {
            std::fs::remove_dir_all(&work).unwrap();
        }
        copy_tree(template.path(), &work);
    };
    fresh();
    let ws = Ws::new();
    let mut rec = ws.cmd(&[
        "record",
        "--tool",
        "--name",
        "tsc",
        "--prime-args",
        "--noEmit -p tsproj",
        "--",
        "tsc",
    ]);
    rec.current_dir(&work);
    let out = run_with(&mut rec, b"", TIMEOUT);
    out.assert_ok();
    assert!(
        out.stderr
            .contains("primed with '--noEmit -p tsproj': exit status 0"),
        "{}",
        out.describe()
    );
    // (NODE_* variables differing from the record run cold: see tool::read_at_start.)
    let dev = Some(("CI", "true"));
    // (working directory under the copy, arguments, an environment variable)
    type Set<'a> = (&'a str, Vec<&'a str>, Option<(&'a str, &'a str)>);
    let sets: Vec<Set> = vec![
        ("", vec!["--noEmit", "-p", "tsproj"], None),
        ("", vec!["-p", "tsproj"], None),
        ("", vec!["-p", "tsproj", "--outDir", "js"], dev),
        ("", vec!["--noEmit", "-p", "bad"], None),
        ("", vec!["-p", "bad"], None),
        ("", vec!["-p", "bad", "--noEmitOnError"], None),
        ("", vec!["--noEmit", "-p", "bad", "--pretty"], None),
        ("", vec!["--noEmit", "-p", "bad", "--skipLibCheck"], dev),
        ("tsproj", vec!["--noEmit"], None),
        ("bad", vec![], None),
        ("tsproj/src", vec!["--noEmit", "-p", ".."], dev),
        ("", vec!["--version"], None),
        ("", vec!["--bogus"], None),
        ("", vec!["--noEmit", "-p", "missing"], None),
        ("", vec!["--noEmit", "-p", "tsproj", "--target"], None),
        ("", vec!["missing.ts"], None),
        ("", vec!["--noEmit", "-p", "tsproj", "--listFiles"], None),
        ("", vec!["--showConfig", "-p", "tsproj"], None),
        ("empty", vec!["--init"], None),
        (
            "",
            vec![
                "--target",
                "es2020",
                "--outDir",
                "one",
                "tsproj/src/item.ts",
            ],
            None,
        ),
        (
            "",
            vec![
                "--noEmit",
                "--strict",
                "--target",
                "es2022",
                "tsproj/src/main.ts",
            ],
            None,
        ),
        (
            "",
            vec![
                "--declaration",
                "--emitDeclarationOnly",
                "-p",
                "tsproj",
                "--outDir",
                "types",
            ],
            None,
        ),
        ("", vec!["-b", "tsproj"], None),
        (
            "",
            vec![
                "--noEmit",
                "-p",
                "tsproj",
                "--noUnusedLocals",
                "--noImplicitReturns",
            ],
            None,
        ),
    ];
    let mut failing = 0;
    for (dir, args, env) in &sets {
        let ctx = format!("tsc {args:?} in {dir:?}");
        let run = |mut cmd: Command| {
            cmd.args(args).current_dir(work.join(dir));
            if let Some((k, v)) = env {
                cmd.env(k, v);
            }
            // SAFETY: umask is async-signal-safe; it runs in the forked child before exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::umask(UMASK);
                    Ok(())
                });
            }
            // tsc reads no stdin: it is there all the same.
            let out = run_with(&mut cmd, b"unread input\n", TIMEOUT);
            (out, tree_of(&work))
        };
        fresh();
        let (cold, cold_files) = run(Command::new(&tsc));
        fresh();
        let (warm, warm_files) = run(ws.cmd(&["run", "tsc", "--"]));
        assert_same_run(&ctx, &cold, &warm);
        assert!(cold_files == warm_files, "{ctx}: files written differ");
        failing += usize::from(cold.code() != 0);
    }
    assert!(failing >= 8, "{failing} of the argument sets fail");
    // On a terminal tsc is pretty (colors, the source line): the warm run's stdout is a
    // TTY too, not the pipe the record had.
    fresh();
    let mut cold = Command::new(&tsc);
    cold.args(["--noEmit", "-p", "bad"]).current_dir(&work);
    let (cold_code, cold_out) = on_terminal(cold);
    let mut warm = ws.cmd(&["run", "tsc", "--", "--noEmit", "-p", "bad"]);
    warm.current_dir(&work);
    let (warm_code, warm_out) = on_terminal(warm);
    let text = String::from_utf8_lossy(&warm_out);
    assert!(
        cold_out.starts_with(b"\x1b["),
        "cold tsc is pretty on a terminal: {:?}",
        String::from_utf8_lossy(&cold_out)
    );
    assert_eq!(
        (warm_code, text.as_ref()),
        (cold_code, String::from_utf8_lossy(&cold_out).as_ref())
    );
}
