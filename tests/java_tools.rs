//! Warm Java command-line tools (issue 16): `record --tool` of `java -jar JAR` (the fixture
//! tool in tests/fixtures/javatool) and of the JDK's own compiler (`java -cp DIR
//! com.sun.tools.javac.Main`), then `run SNAP -- ARGS` compared with cold runs of the same
//! command for many argument sets, working directories, environments, umasks and stdin:
//! same output, same files written (contents and modes), same exit status.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{assert_same_run, run_with, tempdir, Out, Ws, TIMEOUT};

fn which(prog: &str) -> PathBuf {
    for d in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(d).join(prog);
        if p.is_file() {
            return p;
        }
    }
    panic!("{prog} is not in $PATH");
}

/// Runs `cmd` in `cwd` with `umask`, stdin `input`, and WSTOOL_GREETING set or not.
fn run_in(
    mut cmd: Command,
    cwd: &Path,
    umask: libc::mode_t,
    greeting: Option<&str>,
    input: &str,
) -> Out {
    cmd.current_dir(cwd);
    match greeting {
        Some(g) => cmd.env("WSTOOL_GREETING", g),
        None => cmd.env_remove("WSTOOL_GREETING"),
    };
    // SAFETY: umask is async-signal-safe; it runs in the forked child before exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::umask(umask);
            Ok(())
        });
    }
    run_with(&mut cmd, input.as_bytes(), TIMEOUT)
}

/// Every regular file under `dir`: relative path, mode and contents.
fn tree_of(dir: &Path) -> Vec<(String, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file() {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.push((rel, meta.permissions().mode(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// The fixture tool compiled and packed as an executable jar in `dir`; `edit` changes its
/// source first.
fn fixture_jar(dir: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    let orig = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/javatool/WsTool.java");
    let srcdir = dir.join("src");
    std::fs::create_dir_all(&srcdir).unwrap();
    let src = srcdir.join("WsTool.java");
    std::fs::write(&src, edit(std::fs::read_to_string(orig).unwrap())).unwrap();
    let classes = dir.join("classes");
    let mut javac = Command::new(which("javac"));
    javac.arg("-d").arg(&classes).arg(&src);
    run_with(&mut javac, b"", TIMEOUT).assert_ok();
    let jar = dir.join("wstool.jar");
    let mut pack = Command::new(which("jar"));
    pack.args(["--create", "--file"])
        .arg(&jar)
        .args(["--main-class", "WsTool", "-C"])
        .arg(&classes)
        .arg(".");
    run_with(&mut pack, b"", TIMEOUT).assert_ok();
    jar
}

#[test]
fn java_jar_tool_warm_runs_match_cold_runs() {
    let ws = Ws::new();
    let build = tempdir("ws-jtool-");
    let jar = fixture_jar(build.path(), |s| s);
    let java = which("java");
    let mut rec = ws.cmd(&[
        "record",
        "--tool",
        "--name",
        "wsj",
        "--prime-args",
        "--exit 3 --stderr priming --write primed.txt",
        "--",
    ]);
    rec.arg(&java)
        .arg("-jar")
        .arg(&jar)
        .current_dir(build.path());
    let out = run_with(&mut rec, b"", TIMEOUT);
    out.assert_ok();
    let first = out.stdout.trim().to_owned();
    assert!(
        out.stderr
            .contains("primed with '--exit 3 --stderr priming --write primed.txt': exit status 3"),
        "the priming run's status is reported:\n{}",
        out.describe()
    );
    let dirs = [tempdir("ws-jcwd-a-"), tempdir("ws-jcwd-b-")];
    std::fs::write(dirs[1].path().join("marker"), "marked\n").unwrap();
    std::fs::write(dirs[1].path().join("in.txt"), "contents of b\n").unwrap();
    std::fs::write(dirs[0].path().join("in.txt"), "contents of a\n").unwrap();
    let sets: &[(&[&str], Option<&str>, libc::mode_t, &str)] = &[
        (&[], None, 0o022, ""),
        (&["plain", "words"], Some("hello"), 0o022, ""),
        (&["--exit", "7"], None, 0o022, ""),
        (
            &["--exit", "1", "--stderr", "to stderr"],
            Some("x"),
            0o077,
            "",
        ),
        (&["--throw", "badly"], None, 0o022, ""),
        (&["--stdin"], None, 0o022, "some input\nover lines\n"),
        (&["--stdin", "--exit", "2"], Some("in"), 0o022, ""),
        (&["--write", "out.txt"], None, 0o022, ""),
        (&["--write", "private.txt"], None, 0o077, ""),
        (&["--write", "group.txt"], Some("g"), 0o002, ""),
        (&["--read", "in.txt"], None, 0o022, ""),
        (&["--read", "missing.txt"], None, 0o022, ""),
        (
            &["--env", "WSTOOL_GREETING"],
            Some("from the env"),
            0o022,
            "",
        ),
        (&["--env", "HOME"], None, 0o022, ""),
        (&["--thread"], None, 0o022, ""),
        (&["--thread", "--exit", "4"], None, 0o022, ""),
        (&["--child"], Some("to the child"), 0o027, ""),
        (&["--child", "--write", "c.txt"], None, 0o007, ""),
        (&["-", "--", "--exit"], None, 0o022, ""),
        (
            &["\u{e9}t\u{e9}", "sp ace"],
            Some("\u{fc}nicode"),
            0o022,
            "",
        ),
        (&["--stderr", "only"], None, 0o022, "ignored stdin"),
    ];
    let mut n = 0;
    for (args, greeting, umask, input) in sets {
        for d in &dirs {
            let cwd = d.path();
            let clean = |p: &Path| {
                for (f, _, _) in tree_of(p) {
                    if f != "marker" && f != "in.txt" {
                        std::fs::remove_file(p.join(f)).unwrap();
                    }
                }
            };
            clean(cwd);
            let mut cold = Command::new(&java);
            cold.arg("-jar").arg(&jar).args(*args);
            let cold = run_in(cold, cwd, *umask, *greeting, input);
            let cold_files = tree_of(cwd);
            clean(cwd);
            let mut warm = ws.cmd(&["run", "wsj", "--"]);
            warm.args(*args);
            let warm = run_in(warm, cwd, *umask, *greeting, input);
            let ctx = format!("{args:?} in {} (umask {umask:o})", cwd.display());
            assert_same_run(&ctx, &cold, &warm);
            assert_eq!(tree_of(cwd), cold_files, "{ctx}: the files written");
            n += 1;
        }
    }
    assert!(n >= 40);

    // The JVM reads TZ at its start: a run with another one runs cold, saying why.
    let cwd = dirs[0].path();
    let mut cold = Command::new(&java);
    cold.arg("-jar").arg(&jar).env("TZ", "Asia/Tokyo");
    let cold = run_in(cold, cwd, 0o022, None, "");
    let mut warm = ws.cmd(&["run", "wsj", "--env", "TZ=Asia/Tokyo", "--"]);
    warm.env_remove("TZ");
    let warm = run_in(warm, cwd, 0o022, None, "");
    assert_eq!(warm.stdout, cold.stdout, "{}", warm.describe());
    assert!(
        warm.stderr.contains("TZ is \"Asia/Tokyo\" here")
            && warm.stderr.contains("running the tool cold"),
        "{}",
        warm.describe()
    );
    // A new version of the tool: the next run is cold, and runs the new code.
    fixture_jar(build.path(), |s| {
        s.replace("\"greeting: \"", "\"Greeting: \"")
    });
    let warm = ws.cmd(&["run", "wsj", "--"]);
    let warm = run_in(warm, cwd, 0o022, Some("new"), "");
    warm.assert_ok();
    assert!(
        warm.stdout.contains("Greeting: new") && warm.stderr.contains("is stale"),
        "{}",
        warm.describe()
    );
    // Recorded again in the background: then warm, with the new code.
    ws.wait_renamed("wsj", &first);
    let warm = ws.cmd(&["run", "wsj", "--"]);
    let warm = run_in(warm, cwd, 0o022, Some("new"), "");
    warm.assert_ok();
    assert!(
        warm.stdout.contains("Greeting: new") && !warm.stderr.contains("stale"),
        "{}",
        warm.describe()
    );

    let mut refuse = ws.cmd(&[
        "run",
        "wsj",
        "--stale",
        "fail",
        "--env",
        "TZ=Asia/Tokyo",
        "--",
    ]);
    let refused = run_with(refuse.current_dir(cwd), b"", TIMEOUT);
    refused.assert_fail();
    assert!(
        refused.stderr.contains("cannot run warm: TZ"),
        "{}",
        refused.describe()
    );
}

#[test]
fn javac_warm_is_javac() {
    let ws = Ws::new();
    let java = which("java");
    let work = tempdir("ws-javac-");
    let sample = common::workloads_dir().join("tools/Sample.java");
    std::fs::copy(&sample, work.path().join("Sample.java")).unwrap();
    std::fs::write(
        work.path().join("Broken.java"),
        "class Broken { int f() { return \"x\"; } }\n",
    )
    .unwrap();
    std::fs::write(
        work.path().join("Warn.java"),
        "import java.util.*;\nclass Warn { List l = new ArrayList(); void f() { l.add(1); } }\n",
    )
    .unwrap();
    std::fs::create_dir(work.path().join("pkg")).unwrap();
    std::fs::write(
        work.path().join("pkg/A.java"),
        "package pkg;\npublic class A { public static int x() { return B.y(); } }\n",
    )
    .unwrap();
    std::fs::write(
        work.path().join("pkg/B.java"),
        "package pkg;\nclass B { static int y() { return 1; } }\n",
    )
    .unwrap();
    // The class path is not used by javac's own classes (they are in the JDK's image).
    let cp = work.path().join("cp");
    std::fs::create_dir(&cp).unwrap();
    let prime = "-d prime-out -g Sample.java";
    let mut rec = ws.cmd(&[
        "record",
        "--tool",
        "--name",
        "javac",
        "--prime-args",
        prime,
        "--prime-args",
        "-d prime-out Sample.java",
        "--",
    ]);
    rec.arg(&java)
        .arg("-cp")
        .arg(&cp)
        .arg("com.sun.tools.javac.Main")
        .current_dir(work.path());
    run_with(&mut rec, b"", TIMEOUT).assert_ok();
    let sets: &[&[&str]] = &[
        &["-d", "out", "Sample.java"],
        &["-d", "out", "-g", "Sample.java"],
        &["-d", "out", "-g:none", "Sample.java"],
        &["-d", "out", "--release", "11", "Sample.java"],
        &["-d", "out", "-source", "17", "-target", "17", "Sample.java"],
        &["-d", "out", "Broken.java"],
        &["-d", "out", "Sample.java", "Broken.java"],
        &["-d", "out", "Warn.java"],
        &["-d", "out", "-Xlint:all", "Warn.java"],
        &["-d", "out", "-Xlint:all", "-Werror", "Warn.java"],
        &["-d", "out", "pkg/A.java", "pkg/B.java"],
        &["-d", "out", "-sourcepath", ".", "pkg/A.java"],
        &[
            "-d",
            "out",
            "-implicit:none",
            "-sourcepath",
            ".",
            "pkg/A.java",
        ],
        &["-d", "out", "Missing.java"],
        &["-d", "out", "-verbose", "pkg/B.java"],
        &["--no-such-option"],
        &["-version"],
        &["-help"],
        &[],
        &[
            "-d",
            "out",
            "-parameters",
            "-encoding",
            "UTF-8",
            "Sample.java",
        ],
        &["-d", "out", "-nowarn", "-Xmaxerrs", "1", "Broken.java"],
    ];
    let mut runs = 0;
    for args in sets {
        let clean = || {
            let _ = std::fs::remove_dir_all(work.path().join("out"));
        };
        clean();
        let cold = {
            let mut c = Command::new(&java);
            c.arg("-cp")
                .arg(&cp)
                .arg("com.sun.tools.javac.Main")
                .args(*args);
            run_in(c, work.path(), 0o022, None, "")
        };
        let cold_files = tree_of(work.path());
        clean();
        let mut w = ws.cmd(&["run", "javac", "--"]);
        w.args(*args);
        let warm = run_in(w, work.path(), 0o022, None, "");
        let ctx = format!("javac {args:?}");
        if args.contains(&"-verbose") {
            // -verbose prints timings and the class path it searched: only the status and
            // the files are the same.
            assert_eq!(
                warm.code(),
                cold.code(),
                "{ctx}\n{}\n{}",
                cold.describe(),
                warm.describe()
            );
        } else {
            assert_same_run(&ctx, &cold, &warm);
        }
        assert_eq!(tree_of(work.path()), cold_files, "{ctx}: the files written");
        runs += 1;
    }
    assert!(runs >= 20);
}

/// Java launch forms warmstart cannot place as tools are refused with the reason, before
/// anything runs.
#[test]
fn unplaceable_java_commands_are_refused() {
    let ws = Ws::new();
    for (argv, why) in [
        (&["-version"][..], "JVM's start"),
        (&["Hello.java"][..], "source-file mode"),
        (
            &["-m", "jdk.compiler/com.sun.tools.javac.Main"][..],
            "module",
        ),
        (&["-Xss2m"][..], "runs no class or jar"),
    ] {
        let mut c = ws.cmd(&["record", "--tool", "--"]);
        c.arg(which("java")).args(argv);
        let out = run_with(&mut c, b"", TIMEOUT);
        out.assert_fail();
        assert!(out.stderr.contains(why), "{argv:?}: {}", out.describe());
    }
}
