//! `warmstart bench --tool -- CMD ARGS...`: a command-line tool started cold against the
//! same tool run from a snapshot (`record --tool`, `run SNAP -- ARGS`), each run timed
//! whole (start to exit, as CI pays it), side by side in pairs, outputs compared.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use warmstart_snapshots::store::Store;

use super::BenchArgs;

/// One timed run: wall time, exit code, stdout.
struct Run {
    time: Duration,
    code: Option<i32>,
    stdout: Vec<u8>,
}

fn timed(cmd: &mut Command) -> Result<Run> {
    let t = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    Ok(Run {
        time: t.elapsed(),
        code: out.status.code(),
        stdout: out.stdout,
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn bench_tool(store: &Store, args: &BenchArgs) -> Result<i32> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let exe = std::env::current_exe().context("locating the warmstart binary")?;
    let ws = |sub: &[&str]| {
        let mut c = Command::new(&exe);
        c.arg("--store").arg(store.dir()).args(sub);
        c
    };
    let mut command = args.command.clone();
    if let Some(real) = super::unshim(&command[0]) {
        eprintln!(
            "{} is a version manager's shim: measuring {real}",
            command[0]
        );
        command[0] = real;
    }
    // What the tool gets as its arguments: the command after its launch form.
    let tool_args = crate::tool::args_after_form(&command)?;
    let snapshot = format!("bench-{}", std::process::id());
    eprintln!("recording {} as a tool...", command.join(" "));
    let mut record = ws(&["record", "--tool", "--name", &snapshot]);
    for p in &args.prime_args {
        record.arg("--prime-args").arg(p);
    }
    let out = record
        .arg("--")
        .args(&command)
        .stdin(Stdio::null())
        .output()
        .context("running record --tool")?;
    if !out.status.success() {
        bail!(
            "record --tool failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let result = pairs(&command, &tool_args, args.runs, &mut |a: &[String]| {
        let mut c = ws(&["run", "--no-serve", &snapshot, "--"]);
        c.args(a);
        c
    });
    // Through a daemon (the lone runs learned the working set it needs to park).
    let served = match (&result, args.served) {
        (Ok(_), true) => Some(served_pairs(
            &exe, store, &ws, &snapshot, &command, &tool_args, args.runs,
        )),
        _ => None,
    };
    if !args.keep {
        if let Err(e) = store.remove(&snapshot) {
            eprintln!("warning: could not remove snapshot {snapshot}: {e}");
        }
    }
    let (cold, warm, mut same) = result?;
    let lone = Summary::of(cold, warm);
    println!("tool: {}", command.join(" "));
    println!(
        "cold: {:.1} ms median [{:.1}–{:.1}]   warm: {:.1} ms median [{:.1}–{:.1}]   \
         ×{:.1} (median of {} pairs)",
        lone.cold_median,
        lone.cold[0],
        lone.cold[lone.cold.len() - 1],
        lone.warm_median,
        lone.warm[0],
        lone.warm[lone.warm.len() - 1],
        lone.ratio,
        lone.cold.len()
    );
    if let Some(served) = served {
        let (cold, warm, same_served) = served?;
        same &= same_served;
        let served = Summary::of(cold, warm);
        println!(
            "served: {:.1} ms median [{:.1}–{:.1}]   cold beside it: {:.1} ms median   \
             ×{:.1} (median of {} pairs)",
            served.warm_median,
            served.warm[0],
            served.warm[served.warm.len() - 1],
            served.cold_median,
            served.ratio,
            served.cold.len()
        );
    }
    if !same {
        println!("warning: warm and cold runs differ in their output or exit status");
        return Ok(1);
    }
    Ok(0)
}

/// Timed pairs (ms), each side sorted, with their medians and the median of the pairs'
/// cold / warm ratios.
struct Summary {
    cold: Vec<f64>,
    warm: Vec<f64>,
    cold_median: f64,
    warm_median: f64,
    ratio: f64,
}

impl Summary {
    fn of(mut cold: Vec<f64>, mut warm: Vec<f64>) -> Summary {
        let mut ratios: Vec<f64> = cold.iter().zip(&warm).map(|(c, w)| c / w).collect();
        let ratio = median(&mut ratios);
        let (cold_median, warm_median) = (median(&mut cold), median(&mut warm));
        Summary {
            cold,
            warm,
            cold_median,
            warm_median,
            ratio,
        }
    }
}

/// `runs` pairs of a cold run and a warm run handed out by a `warmstart serve` daemon
/// (`ws` makes a command of warmstart for the store), each warm run only once the daemon
/// has parked an instance for it.
fn served_pairs(
    exe: &std::path::Path,
    store: &Store,
    ws: &dyn Fn(&[&str]) -> Command,
    snapshot: &str,
    command: &[String],
    tool_args: &[String],
    runs: usize,
) -> Result<(Vec<f64>, Vec<f64>, bool)> {
    let mut daemon = super::measure::ServeDaemon::start_args(
        exe,
        store.dir(),
        &["--pool", "1", "--warm", snapshot],
    )?;
    let mut parked = 0;
    let mut unparked = None;
    let out = pairs(command, tool_args, runs, &mut |a: &[String]| {
        parked += 1;
        if unparked.is_none() {
            let wait = Duration::from_secs(60);
            unparked = daemon.wait_log("parked an instance of", parked, wait).err();
        }
        let mut c = ws(&["run", snapshot, "--"]);
        c.args(a);
        c
    })?;
    match unparked {
        // Runs the daemon restored on the spot (or left to `run`) are not served ones.
        Some(e) => Err(e.context("the daemon did not park an instance before every served run")),
        None => Ok(out),
    }
}

/// `runs` pairs of a cold run of `command` and a warm one (`warm(args)`), in ms, and
/// whether every warm run printed and exited as its cold twin did.
fn pairs(
    command: &[String],
    tool_args: &[String],
    runs: usize,
    warm: &mut dyn FnMut(&[String]) -> Command,
) -> Result<(Vec<f64>, Vec<f64>, bool)> {
    let (mut cold_ms, mut warm_ms) = (Vec::new(), Vec::new());
    let mut same = true;
    // The first warm run may check the tool's files by content (a fresh snapshot's
    // identities are cheap to check afterwards): one unmeasured pair first.
    for i in 0..=runs {
        let mut c = Command::new(&command[0]);
        c.args(&command[1..]);
        let cold = timed(&mut c)?;
        let warm = timed(&mut warm(tool_args))?;
        same &= cold.code == warm.code && cold.stdout == warm.stdout;
        if i > 0 {
            cold_ms.push(cold.time.as_secs_f64() * 1e3);
            warm_ms.push(warm.time.as_secs_f64() * 1e3);
        }
    }
    Ok((cold_ms, warm_ms, same))
}
