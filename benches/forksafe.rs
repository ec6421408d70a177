//! Long stress of restores under concurrency (issue 14; the short form is
//! `tests/forksafe.rs`): `py_echo.py` and, when boto3 imports, `py_boto3.py` recorded in a
//! private store, then
//!
//! - bursts of concurrent `run`s through a `serve --warm` daemon;
//! - restores from many threads of this process while other threads allocate.
//!
//! Prints the figures (instances that answered, median and slowest time to exit, hangs,
//! failures, leaked processes) and fails on any hang or failure.
//!
//! `cargo bench --bench forksafe` (needs root, like every restore).
//! `WARMSTART_STRESS_BURSTS` (default 30 bursts of 20 runs) and `WARMSTART_STRESS_ROUNDS`
//! (default 10 rounds of 8 threads × 4 restores) scale it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use warmstart::bench::stress::{self, Tally};
use warmstart_snapshots::store::Store;

const EXE: &str = env!("CARGO_BIN_EXE_warmstart");
const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
/// Per burst, per round of threaded restores.
const DEADLINE: Duration = Duration::from_secs(60);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn python() -> Result<String> {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .context("running python3")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Records `script` as `name` and learns its working set.
fn record(store: &Path, name: &str, script: &Path) -> Result<()> {
    let ws = |args: &[&str], input: &str| -> Result<String> {
        let mut child = Command::new(EXE)
            .env("WARMSTART_STORE", store)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        std::io::Write::write_all(&mut child.stdin.take().expect("piped"), input.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("warmstart {args:?}: {}", out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let py = python()?;
    let script = script.to_string_lossy();
    ws(&["record", "--name", name, "--", &py, &script], "")?;
    let answer = ws(&["run", "--no-serve", name], "x0\n")?;
    if !answer.contains("x0") {
        bail!("{name} answered {answer:?}");
    }
    Ok(())
}

fn report(what: &str, t: &Tally, took: Duration) -> bool {
    println!("{what:<40} {:>7.1} s  {}", took.as_secs_f64(), t.describe());
    t.clean()
}

fn main() -> Result<()> {
    let manifest = Path::new(MANIFEST_DIR);
    let workloads = std::env::var_os("WARMSTART_WORKLOADS")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../shared/workloads"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("target"));
    let store = target.join("forksafe-bench/store");
    let _ = std::fs::remove_dir_all(&store);
    std::fs::create_dir_all(&store)?;
    let mut snaps = vec!["echo"];
    record(&store, "echo", &workloads.join("py_echo.py"))?;
    let boto3 = Command::new("python3")
        .args(["-c", "import boto3"])
        .status()
        .is_ok_and(|s| s.success());
    if boto3 {
        record(&store, "boto3", &workloads.join("py_boto3.py"))?;
        snaps.push("boto3");
    }
    let bursts = env_usize("WARMSTART_STRESS_BURSTS", 30);
    let rounds = env_usize("WARMSTART_STRESS_ROUNDS", 10);
    let mut clean = true;
    for snap in &snaps {
        let t = Instant::now();
        let tally = stress::serve_bursts(Path::new(EXE), &store, snap, bursts, 20, DEADLINE)?;
        clean &= report(
            &format!("serve {snap}: {bursts} bursts of 20 runs"),
            &tally,
            t.elapsed(),
        );
        let s = Store::open(&store)?;
        let snapshot = Arc::new(s.load_deferred(&s.resolve(snap)?)?);
        let t = Instant::now();
        let mut all = Tally::default();
        for _ in 0..rounds {
            let r = stress::threaded_restores(&snapshot, 8, 4, 4, DEADLINE);
            let stop = !r.clean();
            all.ok.extend(r.ok);
            all.hung.extend(r.hung);
            all.failed.extend(r.failed);
            all.leaked.extend(r.leaked);
            if stop {
                break;
            }
        }
        clean &= report(
            &format!("threads {snap}: {rounds} × 8 threads × 4 restores"),
            &all,
            t.elapsed(),
        );
    }
    if !clean {
        bail!("restores hung or failed under concurrency");
    }
    Ok(())
}
