//! End-to-end benchmark: every workload of `../shared/workloads`, cold start vs
//! restored instance (eager, lazy, lazy with the learned working set), record time,
//! snapshot sizes, memory per instance and of 8 instances at once, and `c/mem.c` at
//! 64, 512 and 2048 MiB.
//!
//! `cargo bench --bench e2e` (optionally `-- NAME...` to run only the workloads whose
//! name contains one of the NAMEs). Writes `bench.md`, `bench.json` and `bench.svg` to
//! `$WARMSTART_BENCH_OUT` (default `docs/` of this repository) and prints the markdown.
//! `WARMSTART_BENCH_PAIRS` overrides the number of pairs (default 5).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use warmstart::bench::report::{self, Machine, Report};
use warmstart::bench::{self, chart, python, real_path, Probe, Progress, Workload};

const EXE: &str = env!("CARGO_BIN_EXE_warmstart");
const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn line(s: &str) -> Probe {
    Probe::Line {
        input: format!("{s}\n").into_bytes(),
    }
}

struct Spec {
    name: &'static str,
    command: Result<Vec<String>>,
    ready: &'static str,
    probe: Probe,
    env: Vec<(String, String)>,
    mib: Option<u64>,
    /// `record --prime` lines.
    prime: &'static [&'static str],
}

fn specs(workloads: &Path, build: &Path) -> Vec<Spec> {
    let w = |f: &str| workloads.join(f).to_string_lossy().into_owned();
    let py = python();
    let node = real_path("node");
    let java_dir = build.join("java");
    let java = real_path("java").and_then(|j| {
        std::fs::create_dir_all(&java_dir)?;
        let srcs: Vec<PathBuf> = ["Echo.java", "Http.java"]
            .iter()
            .map(|f| workloads.join("java").join(f))
            .collect();
        run(Command::new(real_path("javac")?)
            .arg("-d")
            .arg(&java_dir)
            .args(&srcs))?;
        Ok(j)
    });
    let mem_bin = build.join("mem");
    let mem = run(Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&mem_bin)
        .arg(workloads.join("c/mem.c")))
    .map(|_| mem_bin.to_string_lossy().into_owned());
    let with = |r: &Result<String>, args: Vec<String>| -> Result<Vec<String>> {
        match r {
            Ok(p) => Ok(std::iter::once(p.clone()).chain(args).collect()),
            Err(e) => Err(anyhow::anyhow!("{e:#}")),
        }
    };
    let cp = java_dir.to_string_lossy().into_owned();
    let port = |p: u16| vec![("PORT".to_owned(), p.to_string())];
    let mut v = vec![
        Spec {
            name: "py_echo.py",
            command: with(&py, vec![w("py_echo.py")]),
            ready: "stdin",
            probe: line("hello"),
            env: vec![],
            mib: None,
            prime: &[],
        },
        Spec {
            name: "py_boto3.py",
            command: with(&py, vec![w("py_boto3.py")]),
            ready: "stdin",
            probe: line("list"),
            env: vec![],
            mib: None,
            prime: &[],
        },
        Spec {
            name: "py_sympy.py",
            command: with(&py, vec![w("py_sympy.py")]),
            ready: "stdin",
            probe: line("20"),
            env: vec![],
            mib: None,
            prime: &[],
        },
        // sympy defers part of its import (sympy.tensor, ~60 ms) to the first `expand`:
        // warmed up with one request of another size before the snapshot
        // (`record --prime 10`), the snapshot holds it. n=20 then still computes for
        // 15-20 ms (as long as in a warm process: a floor no restore can go under); n=2,
        // the app's default request, shows what the restore itself costs.
        Spec {
            name: "py_sympy.py --prime",
            command: with(&py, vec![w("py_sympy.py")]),
            ready: "stdin",
            probe: line("20"),
            env: vec![],
            mib: None,
            prime: &["10"],
        },
        Spec {
            name: "py_sympy.py --prime, n=2",
            command: with(&py, vec![w("py_sympy.py")]),
            ready: "stdin",
            probe: line("2"),
            env: vec![],
            mib: None,
            prime: &["10"],
        },
        Spec {
            name: "py_http.py",
            command: with(&py, vec![w("py_http.py")]),
            ready: "listen",
            probe: Probe::Http { port: 8731 },
            env: port(8731),
            mib: None,
            prime: &[],
        },
        Spec {
            name: "node_echo.js",
            command: with(&node, vec![w("node_echo.js")]),
            ready: "stdin",
            probe: line("hello"),
            env: vec![],
            mib: None,
            prime: &[],
        },
        Spec {
            name: "node_http.js",
            command: with(&node, vec![w("node_http.js")]),
            ready: "listen",
            probe: Probe::Http { port: 8732 },
            env: port(8732),
            mib: None,
            prime: &[],
        },
        Spec {
            name: "java/Echo.java",
            command: with(&java, vec!["-cp".into(), cp.clone(), "Echo".into()]),
            ready: "stdin",
            probe: line("hello"),
            env: vec![],
            mib: None,
            prime: &[],
        },
        Spec {
            name: "java/Http.java",
            command: with(&java, vec!["-cp".into(), cp.clone(), "Http".into()]),
            ready: "listen",
            probe: Probe::Http { port: 8733 },
            env: port(8733),
            mib: None,
            prime: &[],
        },
        // Its first request takes ~100 ms even in a JVM up for seconds: warmed up with one
        // (`record --prime /hit`), the snapshot has the request path loaded.
        Spec {
            name: "java/Http.java --prime /hit",
            command: with(&java, vec!["-cp".into(), cp, "Http".into()]),
            ready: "listen",
            probe: Probe::Http { port: 8733 },
            env: port(8733),
            mib: None,
            prime: &["/hit"],
        },
    ];
    // Process trees: a parent and N children blocked on pipes (issue 17: the cost of a
    // tree should follow its memory, not tens of milliseconds per process).
    let tree = Path::new(MANIFEST_DIR)
        .join("benches/fixtures/py_tree.py")
        .to_string_lossy()
        .into_owned();
    for (name, n) in [
        ("py_tree.py 1", 1),
        ("py_tree.py 16", 16),
        ("py_tree.py 64", 64),
    ] {
        v.push(Spec {
            name,
            command: with(&py, vec![tree.clone(), n.to_string()]),
            ready: "stdin",
            probe: line("hello"),
            env: vec![],
            mib: None,
            prime: &[],
        });
    }
    for (name, mib) in [
        ("c/mem.c 64 MiB", 64u64),
        ("c/mem.c 512 MiB", 512),
        ("c/mem.c 2048 MiB", 2048),
    ] {
        v.push(Spec {
            name,
            command: with(&mem, vec![mib.to_string()]),
            ready: "stdin",
            probe: line("head"),
            env: vec![],
            mib: Some(mib),
            prime: &[],
        });
    }
    v
}

fn main() -> Result<()> {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let manifest = Path::new(MANIFEST_DIR);
    let workloads = std::env::var_os("WARMSTART_WORKLOADS")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../shared/workloads"));
    let workloads = std::fs::canonicalize(&workloads)
        .with_context(|| format!("workloads directory {}", workloads.display()))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("target"));
    let build = target.join("e2e-bench");
    let store = build.join("store");
    let _ = std::fs::remove_dir_all(&store);
    std::fs::create_dir_all(&build)?;
    let out = std::env::var_os("WARMSTART_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("docs"));
    std::fs::create_dir_all(&out)?;
    let pairs: usize = std::env::var("WARMSTART_BENCH_PAIRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);

    let mut machine = Machine::describe();
    let started = Instant::now();
    let all = specs(&workloads, &build);
    let chosen: Vec<Spec> = all
        .into_iter()
        .filter(|s| filters.is_empty() || filters.iter().any(|f| s.name.contains(f.as_str())))
        .collect();
    let list: Vec<Workload> = chosen
        .iter()
        .map(|s| {
            let big = s.mib.is_some_and(|m| m >= 2048);
            Workload {
                name: s.name.to_owned(),
                command: s.command.as_ref().cloned().unwrap_or_default(),
                env: s.env.clone(),
                ready: s.ready.to_owned(),
                prime: s.prime.iter().map(|l| l.to_string()).collect(),
                probe: s.probe.clone(),
                pairs: if big { pairs.min(3) } else { pairs },
                // HTTP instances would share one port: no concurrent figure for them.
                concurrent: if s.mib.is_some_and(|m| m > 64)
                    || matches!(s.probe, Probe::Http { .. })
                {
                    0
                } else {
                    8
                },
                memory_mib: s.mib,
                note: (big && pairs > 3)
                    .then(|| "3 pairs instead of 5 to keep the run short".to_owned()),
                snapshot: format!(
                    "e2e-{}",
                    s.name
                        .to_lowercase()
                        .replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "-")
                ),
            }
        })
        .collect();
    let progress = Progress::new(list.iter().map(bench::runs_of).sum());
    let mut results = Vec::new();
    for (w, s) in list.iter().zip(&chosen) {
        let r = match &s.command {
            Err(e) => {
                progress.inc(bench::runs_of(w));
                failed(w, format!("cannot build or find the command: {e:#}"))
            }
            Ok(_) => bench::run_workload(
                w,
                Path::new(EXE),
                &store,
                Duration::from_secs(60),
                &progress,
            ),
        };
        progress.println(format!(
            "{}: {}",
            w.name,
            match &r.error {
                Some(e) => format!("FAILED: {e}"),
                None => format!(
                    "cold {:.1} ms, lazy+ws {}",
                    r.cold_ms.as_ref().map(|s| s.median).unwrap_or(0.0),
                    r.mode(bench::Start::LazyWs)
                        .and_then(|m| m.first_answer_ms.as_ref())
                        .map(|s| format!("{:.2} ms", s.median))
                        .unwrap_or_else(|| "failed".into())
                ),
            }
        ));
        results.push(r);
    }
    progress.finish();
    let names: Vec<String> = list.iter().map(|w| w.snapshot.clone()).collect();
    bench::refresh_sizes(&store, &mut results, &names);
    machine.load_after = report::loadavg();
    let commit = Command::new("git")
        .args(["-C", MANIFEST_DIR, "rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let rep = Report {
        machine,
        total_seconds: started.elapsed().as_secs_f64(),
        warmstart_commit: commit,
        workloads: results,
    };
    let md = report::markdown(&rep);
    std::fs::write(out.join("bench.md"), &md)?;
    std::fs::write(out.join("bench.json"), serde_json::to_vec_pretty(&rep)?)?;
    chart::draw(&rep, &out.join("bench.svg"))?;
    println!("{md}");
    println!(
        "wrote {}, bench.json and bench.svg",
        out.join("bench.md").display()
    );
    // The store holds GiBs of pages: drop it.
    let _ = std::fs::remove_dir_all(&store);
    Ok(())
}

fn failed(w: &Workload, error: String) -> bench::WorkloadResult {
    bench::WorkloadResult {
        name: w.name.clone(),
        command: w.command.clone(),
        ready: w.ready.clone(),
        memory_mib: w.memory_mib,
        pairs: w.pairs,
        note: w.note.clone(),
        error: Some(error),
        record_ms: None,
        snapshot_id: None,
        sizes: None,
        cold_ms: None,
        cold_rss_bytes: None,
        cold_pss_bytes: None,
        modes: Vec::new(),
        concurrent: None,
    }
}
