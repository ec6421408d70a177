//! Warm command-line tools benchmark (issue 16): the total wall time of one invocation of
//! a real tool, cold against warm (`record --tool`, then `run SNAP -- ARGS`), on the
//! inputs in `../shared/workloads/tools/`. Each row is one `warmstart bench --tool
//! --served`: cold and warm runs alternate in pairs, each timed whole (start to exit), and
//! their output and exit status are compared; the warm runs are lone `run`s (no daemon),
//! then as many again answered by a `warmstart serve` daemon (an instance parked before
//! each).
//!
//! `cargo bench --bench tools [-- RUNS]` (default 10 pairs per tool). Prints a markdown
//! table; a tool that cannot be recorded (or is not installed) gets a row saying why.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const EXE: &str = env!("CARGO_BIN_EXE_warmstart");
const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let e = e?;
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &dst.join(e.file_name()))?;
        } else {
            std::fs::copy(e.path(), dst.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// One tool: what the table calls it, its priming arguments, its command, the target.
struct Tool {
    name: &'static str,
    /// Its priming argument strings (a JIT warms up over several runs).
    primes: Vec<String>,
    command: Vec<String>,
    target: f64,
}

/// What one `bench --tool --served` measured (ms, and the median ratios of the pairs).
struct Measured {
    cold: f64,
    warm: f64,
    ratio: f64,
    served: f64,
    served_ratio: f64,
}

/// The number after `after` in `line`.
fn num(line: &str, after: &str) -> Option<f64> {
    let rest = &line[line.find(after)? + after.len()..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// From `bench --tool --served`'s summary lines (`cold: X ms median [...]   warm: Y ms
/// median [...]   ×R (median of N pairs)` and `served: Z ms median [...] ... ×S ...`).
fn parse(out: &str) -> Option<Measured> {
    let lone = out.lines().find(|l| l.starts_with("cold: "))?;
    let served = out.lines().find(|l| l.starts_with("served: "))?;
    Some(Measured {
        cold: num(lone, "cold: ")?,
        warm: num(lone, "warm: ")?,
        ratio: num(lone, "×")?,
        served: num(served, "served: ")?,
        served_ratio: num(served, "×")?,
    })
}

fn bench(store: &Path, inputs: &Path, runs: usize, tool: &Tool) -> Result<Measured> {
    let out = Command::new(EXE)
        .arg("--store")
        .arg(store)
        .args(["bench", "--tool", "--served", "--runs", &runs.to_string()])
        .args(tool.primes.iter().flat_map(|p| ["--prime-args", p]))
        .arg("--")
        .args(&tool.command)
        .current_dir(inputs)
        .output()
        .with_context(|| format!("running {EXE} bench --tool"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stdout.contains("differ") {
        bail!("warm and cold runs differ in their output or exit status");
    }
    match parse(&stdout) {
        Some(r) if out.status.success() => Ok(r),
        _ => {
            let why = stderr
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no output");
            bail!("{why}")
        }
    }
}

fn main() -> Result<()> {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10);
    let workloads = std::env::var_os("WARMSTART_WORKLOADS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(MANIFEST_DIR).join("../shared/workloads"));
    let shared = workloads.join("tools");
    // The inputs where the tools may write, not under /tmp: a recorded tool gets a
    // private /tmp of its own.
    let target = PathBuf::from(MANIFEST_DIR).join("target");
    std::fs::create_dir_all(&target)?;
    let inputs = tempfile::Builder::new()
        .prefix("bench-tools-")
        .tempdir_in(&target)?;
    for f in ["sample.py", "Sample.java"] {
        std::fs::copy(shared.join(f), inputs.path().join(f))
            .with_context(|| format!("copying {}", shared.join(f).display()))?;
    }
    copy_tree(&shared.join("tsproj"), &inputs.path().join("tsproj"))?;
    let store = tempfile::tempdir()?;
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let cp = inputs.path().to_string_lossy().into_owned();
    let tools = [
        Tool {
            name: "black --check sample.py",
            primes: vec!["--check sample.py".into()],
            command: s(&["black", "--check", "sample.py"]),
            target: 10.0,
        },
        Tool {
            name: "flake8 sample.py",
            primes: vec!["sample.py".into()],
            command: s(&["flake8", "sample.py"]),
            target: 10.0,
        },
        Tool {
            name: "tsc --noEmit -p tsproj",
            primes: vec!["--noEmit -p tsproj".into()],
            command: s(&["tsc", "--noEmit", "-p", "tsproj"]),
            target: 5.0,
        },
        Tool {
            name: "javac Sample.java",
            primes: vec!["-d primed Sample.java".into(); 20],
            command: s(&[
                "java",
                "-cp",
                &cp,
                "com.sun.tools.javac.Main",
                "-d",
                "out",
                "Sample.java",
            ]),
            target: 5.0,
        },
    ];
    println!(
        "total wall time of one invocation, cold vs warm (median of {runs} pairs each): a lone \
         `run`, and one answered by `warmstart serve`\n"
    );
    println!("| tool | cold | lone `run` | cold / lone | served | cold / served | target |");
    println!("|---|---|---|---|---|---|---|");
    for tool in &tools {
        let verdict = |r: f64| if r >= tool.target { "met" } else { "missed" };
        match bench(store.path(), inputs.path(), runs, tool) {
            Ok(m) => println!(
                "| `{}` | {:.1} ms | {:.1} ms | ×{:.1} | {:.1} ms | ×{:.1} | ≥{:.0}×: lone {}, served {} |",
                tool.name,
                m.cold,
                m.warm,
                m.ratio,
                m.served,
                m.served_ratio,
                tool.target,
                verdict(m.ratio),
                verdict(m.served_ratio),
            ),
            Err(e) => println!(
                "| `{}` | – | – | – | – | – | not measured: {} |",
                tool.name,
                e.to_string().replace('|', "\\|")
            ),
        }
    }
    Ok(())
}
