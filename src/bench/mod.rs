//! End-to-end measurement of what warmstart saves: cold start vs restored instance.
//!
//! For one app ([`Workload`]): record it (timed), read the snapshot's sizes, then run
//! cold and restored instances alternately (cold, eager, cold, lazy, cold, lazy with the
//! learned working set, and again), so that machine drift hits both sides of each pair;
//! each run is timed from its start to its first answer, and its app process's Rss and
//! Pss are read right after that answer. Finally `concurrent` instances are started at
//! once, cold and restored, and their Pss added up.
//!
//! Used by `benches/e2e.rs` (every workload of `../shared/workloads`) and by
//! `warmstart bench -- CMD` ([`bench_command`]) for a user's own app.

pub mod chart;
pub mod measure;
pub mod report;
pub mod stats;
pub mod stress;
pub mod tool;

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use warmstart_snapshots::store::Store;

pub use measure::{Probe, Start, Target};
use stats::Summary;

/// An app to measure.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Short name (table row).
    pub name: String,
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `--ready` trigger for `record`.
    pub ready: String,
    /// `--prime` lines for `record`.
    pub prime: Vec<String>,
    pub probe: Probe,
    /// Cold/restored pairs per restore mode.
    pub pairs: usize,
    /// Instances started at once for the total-Pss figure (0: skip).
    pub concurrent: usize,
    /// For the restore-time-vs-size series (`c/mem.c`).
    pub memory_mib: Option<u64>,
    /// Shown under the table (e.g. fewer pairs).
    pub note: Option<String>,
    /// Snapshot name in the store.
    pub snapshot: String,
}

/// One restore mode's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModeResult {
    pub mode: String,
    /// Time to first answer of the restored runs (ms).
    pub first_answer_ms: Option<Summary>,
    /// The cold run paired with each restored run (ms).
    pub paired_cold_ms: Option<Summary>,
    /// cold / restored per pair.
    pub ratio: Option<Summary>,
    pub rss_bytes: Option<Summary>,
    pub pss_bytes: Option<Summary>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Concurrent {
    pub instances: usize,
    pub cold_pss_total_bytes: Option<u64>,
    pub restored_mode: String,
    pub restored_pss_total_bytes: Option<u64>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadResult {
    pub name: String,
    pub command: Vec<String>,
    pub ready: String,
    pub memory_mib: Option<u64>,
    pub pairs: usize,
    pub note: Option<String>,
    /// Why the workload could not be recorded or restored at all.
    pub error: Option<String>,
    pub record_ms: Option<f64>,
    pub snapshot_id: Option<String>,
    pub sizes: Option<measure::Sizes>,
    /// Every cold run (ms).
    pub cold_ms: Option<Summary>,
    pub cold_rss_bytes: Option<Summary>,
    pub cold_pss_bytes: Option<Summary>,
    pub modes: Vec<ModeResult>,
    pub concurrent: Option<Concurrent>,
}

impl WorkloadResult {
    pub fn mode(&self, m: Start) -> Option<&ModeResult> {
        self.modes.iter().find(|r| r.mode == m.label())
    }
}

/// Progress on stderr: a bar on a terminal, plain lines elsewhere.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    pub fn new(total: u64) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress { bar: None };
        }
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} runs  {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress { bar: Some(bar) }
    }

    /// A new stage: shown as the bar's message, or as a line.
    pub fn stage(&self, msg: impl Into<String>) {
        let msg = msg.into();
        match &self.bar {
            Some(b) => b.set_message(msg),
            None => eprintln!("{msg}"),
        }
    }

    /// A line above the bar.
    pub fn println(&self, msg: impl AsRef<str>) {
        match &self.bar {
            Some(b) => b.println(msg.as_ref()),
            None => eprintln!("{}", msg.as_ref()),
        }
    }

    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Runs counted by the progress bar for one workload.
pub fn runs_of(w: &Workload) -> u64 {
    (3 + w.pairs * 2 * Start::RESTORED.len() + w.concurrent * 2) as u64
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn short(e: &anyhow::Error) -> String {
    let s = format!("{e:#}").replace('\n', " / ");
    if s.chars().count() > 400 {
        let cut: String = s.chars().take(400).collect();
        format!("{cut}…")
    } else {
        s
    }
}

/// Measures one workload. Never fails: whatever broke is in the result's `error` (the
/// workload as a whole) or its modes' `error`.
pub fn run_workload(
    w: &Workload,
    exe: &std::path::Path,
    store: &std::path::Path,
    timeout: Duration,
    progress: &Progress,
) -> WorkloadResult {
    let t = Target {
        exe: exe.to_owned(),
        store: store.to_owned(),
        command: w.command.clone(),
        env: w.env.clone(),
        snapshot: w.snapshot.clone(),
        probe: w.probe.clone(),
        timeout,
    };
    let mut r = WorkloadResult {
        name: w.name.clone(),
        command: w.command.clone(),
        ready: w.ready.clone(),
        memory_mib: w.memory_mib,
        pairs: w.pairs,
        note: w.note.clone(),
        error: None,
        record_ms: None,
        snapshot_id: None,
        sizes: None,
        cold_ms: None,
        cold_rss_bytes: None,
        cold_pss_bytes: None,
        modes: Vec::new(),
        concurrent: None,
    };
    let mut cold = Vec::new();
    let mut cold_mem = Vec::new();
    let mut skipped = runs_of(w);
    let tick = |n: u64, skipped: &mut u64| {
        progress.inc(n);
        *skipped -= n;
    };

    // Record first: an app that never reaches its warm point stops everything at the
    // timeout (its cold runs would likely wait as long). It warms the page cache too.
    progress.stage(format!("{}: record (--ready {})", w.name, w.ready));
    let rec_started = Instant::now();
    let rec = measure::record(&t, &w.ready, &w.prime);
    tick(1, &mut skipped);
    let recorded = match rec {
        Ok(rec) => {
            r.record_ms = Some(ms(rec.elapsed));
            r.snapshot_id = Some(rec.id);
            r.sizes = measure::sizes(store, &w.snapshot).ok();
            true
        }
        Err(e) => {
            r.error = Some(format!("record failed: {}", short(&e)));
            if rec_started.elapsed() >= timeout {
                progress.inc(skipped);
                return r;
            }
            false
        }
    };

    // An untimed cold run: shows the app answers at all when started normally.
    progress.stage(format!("{}: cold warm-up run", w.name));
    let warm = t.run_once(Start::Cold, false);
    tick(1, &mut skipped);
    if let Err(e) = warm {
        r.error = Some(format!(
            "{}cold run failed: {}",
            r.error
                .as_ref()
                .map(|e| format!("{e}; "))
                .unwrap_or_default(),
            short(&e)
        ));
        progress.inc(skipped);
        return r;
    }

    // The first lazy run learns the working set that `lazy+ws` runs prefetch.
    let mut failed: Vec<(Start, String)> = Vec::new();
    if recorded {
        progress.stage(format!(
            "{}: first restore (learns the working set)",
            w.name
        ));
        if let Err(e) = t.run_once(Start::LazyWs, false) {
            failed.push((Start::LazyWs, format!("learning run failed: {}", short(&e))));
        }
        tick(1, &mut skipped);
    } else {
        tick(1, &mut skipped);
    }

    // Served runs go through a daemon with an instance of the snapshot parked.
    let daemon = if recorded && !failed.iter().any(|(m, _)| *m == Start::LazyWs) {
        progress.stage(format!("{}: starting warmstart serve", w.name));
        match measure::ServeDaemon::start(&t) {
            Ok(d) => Some(d),
            Err(e) => {
                failed.push((Start::Served, short(&e)));
                None
            }
        }
    } else {
        None
    };

    /// A restore mode's samples: paired cold runs, restored runs, memory.
    type ModeRuns = (Start, Vec<f64>, Vec<f64>, Vec<measure::Mem>);
    let mut per_mode: Vec<ModeRuns> = Start::RESTORED
        .iter()
        .map(|&m| (m, Vec::new(), Vec::new(), Vec::new()))
        .collect();
    for round in 0..w.pairs {
        for (mode, cold_of_mode, restored, mem) in per_mode.iter_mut() {
            progress.stage(format!(
                "{}: pair {}/{} cold vs {}",
                w.name,
                round + 1,
                w.pairs,
                mode.label()
            ));
            let dead = !recorded || failed.iter().any(|(m, _)| m == mode);
            // Without a snapshot the cold runs still give the cold figures.
            if dead && (recorded || *mode != Start::Eager) {
                tick(2, &mut skipped);
                continue;
            }
            let c = match t.run_once(Start::Cold, true) {
                Ok(c) => c,
                Err(e) => {
                    if r.error.is_none() {
                        r.error = Some(format!("cold run failed: {}", short(&e)));
                    }
                    tick(2, &mut skipped);
                    continue;
                }
            };
            tick(1, &mut skipped);
            cold.push(ms(c.first_answer));
            cold_mem.extend(c.mem);
            if dead {
                tick(1, &mut skipped);
                continue;
            }
            match t.run_once(*mode, true) {
                Ok(s) => {
                    cold_of_mode.push(ms(c.first_answer));
                    restored.push(ms(s.first_answer));
                    mem.extend(s.mem);
                }
                Err(e) => failed.push((*mode, short(&e))),
            }
            tick(1, &mut skipped);
        }
    }
    drop(daemon);
    r.cold_ms = Summary::of(&cold);
    r.cold_rss_bytes = Summary::of(&cold_mem.iter().map(|m| m.rss as f64).collect::<Vec<_>>());
    r.cold_pss_bytes = Summary::of(&cold_mem.iter().map(|m| m.pss as f64).collect::<Vec<_>>());
    if recorded {
        for (mode, c, s, mem) in per_mode {
            r.modes.push(ModeResult {
                mode: mode.label().to_owned(),
                first_answer_ms: Summary::of(&s),
                paired_cold_ms: Summary::of(&c),
                ratio: Summary::of(&stats::ratios(&c, &s)),
                rss_bytes: Summary::of(&mem.iter().map(|m| m.rss as f64).collect::<Vec<_>>()),
                pss_bytes: Summary::of(&mem.iter().map(|m| m.pss as f64).collect::<Vec<_>>()),
                error: failed
                    .iter()
                    .find(|(m, _)| *m == mode)
                    .map(|(_, e)| e.clone()),
            });
        }
        if r.modes.iter().all(|m| m.error.is_some()) && r.error.is_none() {
            r.error = Some(format!(
                "restore failed: {}",
                r.modes[0].error.clone().unwrap_or_default()
            ));
        }
    }

    if w.concurrent > 0 && r.error.is_none() {
        // The default `run` mode (lazy with the working set), else whatever worked.
        let mode = [Start::LazyWs, Start::Lazy, Start::Eager]
            .into_iter()
            .find(|m| r.mode(*m).is_some_and(|x| x.error.is_none()))
            .unwrap_or(Start::LazyWs);
        progress.stage(format!(
            "{}: {} cold instances at once",
            w.name, w.concurrent
        ));
        let c = measure::concurrent_pss(&t, Start::Cold, w.concurrent);
        tick(w.concurrent as u64, &mut skipped);
        progress.stage(format!(
            "{}: {} restored ({}) instances at once",
            w.name,
            w.concurrent,
            mode.label()
        ));
        let s = measure::concurrent_pss(&t, mode, w.concurrent);
        tick(w.concurrent as u64, &mut skipped);
        let error = match (&c, &s) {
            (Err(e), _) => Some(format!("cold: {}", short(e))),
            (_, Err(e)) => Some(format!("restored: {}", short(e))),
            _ => None,
        };
        r.concurrent = Some(Concurrent {
            instances: w.concurrent,
            cold_pss_total_bytes: c.ok(),
            restored_mode: mode.label().to_owned(),
            restored_pss_total_bytes: s.ok(),
            error,
        });
    }
    progress.inc(skipped);
    r
}

/// Re-reads every recorded snapshot's sizes (sharing with the snapshots recorded after
/// it counts too).
pub fn refresh_sizes(store: &std::path::Path, results: &mut [WorkloadResult], names: &[String]) {
    for (r, n) in results.iter_mut().zip(names) {
        if r.sizes.is_some() {
            if let Ok(s) = measure::sizes(store, n) {
                r.sizes = Some(s);
            }
        }
    }
}

/// `warmstart bench`: the same measurement for the user's own app.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Cold/restored pairs per restore mode (eager, lazy, lazy with working set)
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Warm the app up with this input line before the snapshot (as `record --prime`)
    #[arg(long, value_name = "LINE")]
    pub prime: Vec<String>,
    /// When to take the snapshot (as `record --ready`): `stdin`, `listen`, `notify`,
    /// `after=DURATION` (e.g. after=2s), `signal`
    #[arg(long, default_value = "stdin")]
    pub ready: String,
    /// Give up on the warm point, or on a first answer, after this many seconds
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// First answer = `GET /hit` on 127.0.0.1:PORT answered (for HTTP apps) instead of
    /// the first line on stdout
    #[arg(long, value_name = "PORT")]
    pub http_port: Option<u16>,
    /// Instances to start at once, cold and restored, for the total-Pss figure (0: skip)
    #[arg(long, default_value_t = 4)]
    pub concurrent: usize,
    /// Also write the results as JSON to this file
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Keep the snapshot (named bench-PID) in the store afterwards
    #[arg(long)]
    pub keep: bool,
    /// CMD is a command-line tool: compare cold runs of `CMD ARGS` with `run SNAP --
    /// ARGS` of a `record --tool` snapshot, each run timed whole (start to exit)
    #[arg(long)]
    pub tool: bool,
    /// With --tool: run the tool with these arguments before the snapshot (as `record
    /// --prime-args`); repeatable
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub prime_args: Vec<String>,
    /// With --tool: then as many pairs again with the warm runs answered by a `warmstart
    /// serve` daemon (an instance parked before each)
    #[arg(long, requires = "tool")]
    pub served: bool,
    /// The app's command (after `--`); its input is this command's stdin (one answer is
    /// waited for)
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

pub fn bench_command(store: &Store, args: &BenchArgs) -> Result<i32> {
    if args.tool {
        return tool::bench_tool(store, args);
    }
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let exe = std::env::current_exe().context("locating the warmstart binary")?;
    let mut input = Vec::new();
    if args.http_port.is_none() {
        if std::io::stdin().is_terminal() {
            eprintln!("stdin is a terminal: each run gets one empty line as its input");
        } else {
            std::io::stdin()
                .read_to_end(&mut input)
                .context("reading the input from stdin")?;
        }
        if input.is_empty() {
            input.push(b'\n');
        }
    }
    let probe = match args.http_port {
        Some(port) => Probe::Http { port },
        None => Probe::Line { input },
    };
    let snapshot = format!("bench-{}", std::process::id());
    // Instances of an HTTP app would share its port.
    let concurrent = if args.http_port.is_some() {
        0
    } else {
        args.concurrent
    };
    let mut command = args.command.clone();
    if let Some(real) = unshim(&command[0]) {
        eprintln!(
            "{} is a version manager's shim: measuring {real} (a shim adds tens of ms to \
             every start, and its own reads of stdin would be taken for the warm point)",
            command[0]
        );
        command[0] = real;
    }
    let w = Workload {
        name: args.command.join(" "),
        command,
        env: Vec::new(),
        ready: args.ready.clone(),
        prime: args.prime.clone(),
        probe,
        pairs: args.runs,
        concurrent,
        memory_mib: None,
        note: None,
        snapshot: snapshot.clone(),
    };
    let progress = Progress::new(runs_of(&w));
    let started = Instant::now();
    let res = run_workload(
        &w,
        &exe,
        store.dir(),
        Duration::from_secs(args.timeout.max(1)),
        &progress,
    );
    progress.finish();
    if !args.keep && res.snapshot_id.is_some() {
        if let Err(e) = store.remove(&snapshot) {
            eprintln!("warning: could not remove snapshot {snapshot}: {e}");
        }
    }
    print!("{}", report::text_summary(&res, started.elapsed()));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&res)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    // The summary above already shows what failed.
    Ok(if res.error.is_some() { 1 } else { 0 })
}

/// The real program behind a version manager's shim (`~/.pyenv/shims/python3` →
/// `pyenv which python3`; likewise rbenv, nodenv, asdf...), if `cmd` is one.
pub(crate) fn unshim(cmd: &str) -> Option<String> {
    let path = if cmd.contains('/') {
        PathBuf::from(cmd)
    } else {
        std::env::var_os("PATH")?
            .to_string_lossy()
            .split(':')
            .map(|d| std::path::Path::new(d).join(cmd))
            .find(|p| p.is_file())?
    };
    let dir = path.parent()?;
    if dir.file_name()? != "shims" {
        return None;
    }
    let tool = dir.parent()?.file_name()?.to_str()?.trim_start_matches('.');
    let name = path.file_name()?;
    let out = std::process::Command::new(tool)
        .arg("which")
        .arg(name)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let real = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !real.is_empty() && std::path::Path::new(&real).is_file())
        .then_some(real)
}

/// The executable `cmd` names on `PATH`, symlinks resolved.
pub fn real_path(cmd: &str) -> anyhow::Result<String> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if p.is_empty() {
        anyhow::bail!("{cmd} not found on PATH");
    }
    Ok(std::fs::canonicalize(&p)?.to_string_lossy().into_owned())
}

/// The Python interpreter itself (`sys.executable` of `python3`), not a version
/// manager's shim (which adds tens of ms).
pub fn python() -> anyhow::Result<String> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .context("running python3")?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() || p.is_empty() {
        anyhow::bail!("python3 did not tell its executable");
    }
    Ok(p)
}

/// A minimal nginx.conf for tests and benchmarks: a master and `workers` workers in the
/// foreground serving `dir/www` on 127.0.0.1:`port`, everything it writes in `dir` (pid
/// file `nginx-PORT.pid`, temp paths under `dir/tmp`) or on stderr (errors), no access
/// log.
pub fn nginx_conf(dir: &std::path::Path, port: u16, workers: u32) -> String {
    let d = dir.display();
    format!(
        "daemon off;\n\
         master_process on;\n\
         worker_processes {workers};\n\
         pid {d}/nginx-{port}.pid;\n\
         error_log stderr warn;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n\
         \x20 access_log off;\n\
         \x20 client_body_temp_path {d}/tmp/body;\n\
         \x20 proxy_temp_path {d}/tmp/proxy;\n\
         \x20 fastcgi_temp_path {d}/tmp/fastcgi;\n\
         \x20 uwsgi_temp_path {d}/tmp/uwsgi;\n\
         \x20 scgi_temp_path {d}/tmp/scgi;\n\
         \x20 server {{\n\
         \x20   listen 127.0.0.1:{port};\n\
         \x20   root {d}/www;\n\
         \x20 }}\n\
         }}\n"
    )
}
