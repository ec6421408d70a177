//! Density benchmark (issue 15): N instances of one snapshot handed out by
//! `warmstart serve`, each after answering one request and with its memory in (a few
//! seconds of streaming), all alive at once; the total Pss of everything the daemon runs
//! (templates, sandboxes, apps), with templates and with `--no-templates`, side by side.
//!
//! `cargo bench --bench density [-- N [ONLY]]` (default 32 instances; `ONLY`: just the
//! workloads whose name contains it). `WARMSTART_EXE` names another warmstart binary to
//! measure (an older build, side by side). Prints a markdown table.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use warmstart::bench::measure::ServeDaemon;
use warmstart::bench::real_path;

const EXE: &str = env!("CARGO_BIN_EXE_warmstart");
const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
const TIMEOUT: Duration = Duration::from_secs(300);

/// The warmstart binary measured: `WARMSTART_EXE`, else this build's.
fn exe() -> PathBuf {
    std::env::var_os("WARMSTART_EXE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(EXE))
}

fn ws(store: &Path) -> Command {
    let mut c = Command::new(exe());
    c.arg("--store").arg(store);
    c
}

fn check(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A `run` holding its instance alive after the first answer.
struct Client {
    child: Child,
    stdin: Option<ChildStdin>,
}

/// Total Pss (KiB) of `n` instances served from `store`'s snapshot `w`.
fn measure(store: &Path, n: usize, templates: bool) -> Result<u64> {
    let ns = n.to_string();
    let mut args = vec!["--pool", &ns, "--pool-max", &ns, "--warm", "w"];
    if !templates {
        args.push("--no-templates");
    }
    let mut daemon = ServeDaemon::start_args(&exe(), store, &args)?;
    daemon
        .wait_log("parked an instance of", n, TIMEOUT)
        .context("waiting for the pool to fill")?;
    let mut clients = Vec::new();
    for i in 0..n {
        let mut child = ws(store)
            .args(["run", "w"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut stdin = child.stdin.take();
        writeln!(stdin.as_mut().expect("piped"), "request {i}")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        if line.is_empty() {
            bail!("instance {i} did not answer");
        }
        clients.push(Client { child, stdin });
    }
    // Memory streams in after the answer.
    std::thread::sleep(Duration::from_secs(3));
    // A process that ended meanwhile counts nothing.
    let total = warmstart::sys::tasks::descendants(daemon.pid())
        .into_iter()
        .filter_map(|p| warmstart::bench::measure::smaps_rollup(p).ok())
        .map(|m| m.pss / 1024)
        .sum::<u64>();
    for c in &mut clients {
        drop(c.stdin.take());
        let _ = c.child.wait();
    }
    drop(daemon);
    Ok(total)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let n: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(32);
    let only = args.iter().find(|a| a.parse::<usize>().is_err());
    let workloads = PathBuf::from(MANIFEST_DIR).join("../shared/workloads");
    // Not under /tmp: a recorded app gets a private /tmp of its own.
    let target = PathBuf::from(MANIFEST_DIR).join("target");
    std::fs::create_dir_all(&target)?;
    let build = tempfile::tempdir_in(&target)?;
    let java_dir = build.path().join("java");
    std::fs::create_dir_all(&java_dir)?;
    check(
        Command::new(real_path("javac")?)
            .arg("-d")
            .arg(&java_dir)
            .arg(workloads.join("java/Echo.java"))
            .arg(workloads.join("java/Http.java")),
    )?;
    let w = |f: &str| workloads.join(f).to_string_lossy().into_owned();
    let apps: Vec<(&str, Vec<String>)> = vec![
        ("py_boto3.py", vec![real_path("python3")?, w("py_boto3.py")]),
        ("node_echo.js", vec![real_path("node")?, w("node_echo.js")]),
        (
            "java/Echo.java",
            vec![
                real_path("java")?,
                "-cp".into(),
                java_dir.to_string_lossy().into_owned(),
                "Echo".into(),
            ],
        ),
    ];
    println!(
        "| workload | instances | total Pss, templates | total Pss, each on its own | ratio |"
    );
    println!("|---|---|---|---|---|");
    eprintln!("measuring {}", exe().display());
    for (name, cmd) in apps {
        if only.is_some_and(|o| !name.contains(o.as_str())) {
            continue;
        }
        let store = tempfile::tempdir()?;
        check(
            ws(store.path())
                .args(["record", "--name", "w", "--"])
                .args(&cmd),
        )?;
        // The first run learns the working set (served runs need one).
        let mut learn = ws(store.path())
            .args(["run", "--no-serve", "w"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        writeln!(learn.stdin.take().expect("piped"), "learn")?;
        learn.wait()?;
        let with = measure(store.path(), n, true)?;
        let without = measure(store.path(), n, false)?;
        println!(
            "| `{name}` | {n} | {:.1} MiB | {:.1} MiB | {:.0}% |",
            with as f64 / 1024.0,
            without as f64 / 1024.0,
            100.0 * with as f64 / without.max(1) as f64
        );
    }
    Ok(())
}
