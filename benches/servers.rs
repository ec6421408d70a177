//! Servers benchmark (issue 15): HTTP servers from one snapshot, side by side.
//!
//! For `py_http.py` and `node_http.js` (each `GET /hit` answers a counter), each recorded
//! at its first wait for a connection and once more after one request (`record --prime
//! /hit`): record the server (`record --ready listen`), let one lone `run` learn its
//! working set, then
//! - a cold start's time to first response (the server on a free port; `GET /hit` polled
//!   until answered) and, alternating with it, a served one: `warmstart run --listen
//!   127.0.0.1:PORT SNAP` on a fresh free port with a `warmstart serve` daemon on the
//!   store (templates on, `--pool 1`, the pool refilled before each run), from launching
//!   `run` to the first answer;
//! - where the served time goes: when the `run` had its listener bound, the same served
//!   runs through a `--no-templates` daemon, and the app's first request timed alone
//!   (asked once the daemon has parked the replacement, so that no restore runs beside
//!   it);
//! - then 16 such `run --listen`s at once, each on its own port, through a daemon with 16
//!   instances parked: every first answer must show the counter going on from the
//!   snapshot; their time to first response (p50, max) and the total Pss of the 16
//!   instances (sandbox and app) and of the template they were forked from.
//!
//! `cargo bench --bench servers [-- PAIRS [ONLY]]` (default 11 pairs; `ONLY`: just the
//! workloads whose label contains it, e.g. `prime`). `WARMSTART_EXE` names another
//! warmstart binary to measure (an older build, side by side). Prints markdown tables.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use warmstart::bench::measure::{self, free_port, Probe, Running, ServeDaemon, Start, Target};
use warmstart::bench::report::{fmt_ms, ms_cell, ratio_cell};
use warmstart::bench::stats::{self, Summary};
use warmstart::bench::{python, real_path};

const EXE: &str = env!("CARGO_BIN_EXE_warmstart");
const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
const TIMEOUT: Duration = Duration::from_secs(60);
/// Instances started at once.
const AT_ONCE: usize = 16;
/// Between two tries of a port that does not answer yet (a refused connection returns
/// at once): short, since a served instance answers within milliseconds.
const PAUSE: Duration = Duration::from_micros(250);
/// The same for the 16 at once (16 pollers on a small machine take CPU from the apps).
const PAUSE_AT_ONCE: Duration = Duration::from_millis(1);
/// Served runs whose first request is timed alone.
const ALONE: usize = 5;
/// What the daemon logs (`-v`) for each instance it parked.
const PARKED: &str = "parked an instance of";
const SNAP: &str = "srv";

struct App {
    name: &'static str,
    command: Vec<String>,
    /// `record --prime` paths.
    prime: &'static [&'static str],
    /// Target ratio cold / served.
    target: f64,
}

impl App {
    /// What the recorded process would answer next: each primed `GET /hit` counted one.
    fn expect(&self) -> i64 {
        1 + self.prime.iter().filter(|p| **p == "/hit").count() as i64
    }

    fn label(&self) -> String {
        match self.prime {
            [] => self.name.to_owned(),
            p => format!("{} --prime {}", self.name, p.join(" --prime ")),
        }
    }
}

#[derive(Default)]
struct Row {
    cold: Vec<f64>,
    /// Served with templates, paired with `cold`.
    served: Vec<f64>,
    /// When their listener was bound (by the `run`).
    served_bound: Vec<f64>,
    /// Served by a daemon with `--no-templates`.
    served_private: Vec<f64>,
    /// The app's first request, asked once the daemon parked the replacement: from a
    /// template, and with its own memory (`--no-templates`).
    alone_template: Vec<f64>,
    alone_private: Vec<f64>,
    /// Served runs, and those the daemon answered (the others restored in the `run`).
    runs: usize,
    by_daemon: usize,
    /// Counters of served runs that did not count on from the snapshot.
    wrong_counter: Vec<i64>,
    at_once: Option<AtOnce>,
    error: Option<String>,
}

struct AtOnce {
    ttfr: Summary,
    /// Instances whose first answer counted on from the snapshot.
    continued: usize,
    by_daemon: usize,
    /// Requests the daemon restored on the spot (no parked instance ready).
    on_the_spot: usize,
    pss_bytes: u64,
}

/// The counter in a `GET /hit` answer (`{"n": N, ...}`).
fn counter(body: &str) -> Result<i64> {
    let v: serde_json::Value =
        serde_json::from_str(body.trim()).with_context(|| format!("not JSON: {body:?}"))?;
    v["n"]
        .as_i64()
        .ok_or_else(|| anyhow!("no counter in {body:?}"))
}

/// `t` serving on `port` (a cold start reads it from `PORT`).
fn on_port(t: &Target, port: u16) -> Target {
    Target {
        env: vec![("PORT".into(), port.to_string())],
        probe: Probe::Http { port },
        ..t.clone()
    }
}

fn listen_args(port: u16) -> Vec<String> {
    vec!["--listen".into(), format!("127.0.0.1:{port}")]
}

/// Whether a serve daemon runs the instance of `run` (a client it registered for `ps`).
fn served_by_daemon(r: &Running) -> bool {
    warmstart::instances::list()
        .unwrap_or_default()
        .iter()
        .any(|i| i.client == Some(r.pid()) && !i.template)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One start's first answer.
struct Answer {
    /// Until the port listened (ms since the start).
    bound: f64,
    /// Until the whole answer was there (ms since the start).
    answered: f64,
    /// The counter it answered.
    n: i64,
    /// A serve daemon ran it.
    by_daemon: bool,
}

/// One start on a free port (served: `run --listen`), timed from the start to the first
/// answer, which is asked for as soon as the port listens; or, with `alone`, only once
/// the daemon has parked that many instances in all (the replacement for this one: no
/// restore runs beside the app's first request), timing that request alone.
fn one(t: &Target, start: Start, alone: Option<(&mut ServeDaemon, usize)>) -> Result<Answer> {
    let port = free_port()?;
    let t = on_port(t, port);
    let args = if start == Start::Cold {
        Vec::new()
    } else {
        listen_args(port)
    };
    let mut r = t.start_with(start, &args)?;
    let res = match alone {
        None => r
            .first_http_answer(port, TIMEOUT, PAUSE)
            .map(|a| (ms(a.connected), ms(a.answered), a.body)),
        Some((daemon, parked)) => daemon.wait_log(PARKED, parked, TIMEOUT).and_then(|()| {
            let asked = Instant::now();
            let a = measure::http_get(port)
                .with_context(|| format!("no answer on 127.0.0.1:{port}"))?;
            Ok((0.0, ms(asked.elapsed()), a.body))
        }),
    }
    .and_then(|(bound, answered, body)| {
        Ok(Answer {
            bound,
            answered,
            n: counter(&body)?,
            by_daemon: served_by_daemon(&r),
        })
    });
    let tail = r.finish();
    res.map_err(|e| match tail {
        Some(tail) => anyhow!("{} start: {e:#} ({tail})", start.label()),
        None => anyhow!("{} start: {e:#}", start.label()),
    })
}

fn ppid(pid: i32) -> Option<i32> {
    procfs::process::Process::new(pid)
        .ok()?
        .stat()
        .ok()
        .map(|s| s.ppid)
}

/// Total Pss of the instances whose apps are `apps` (each app, its descendants and its
/// ancestors below `daemon`: its sandbox) and of `daemon`'s templates; not of the
/// instances it parks meanwhile.
fn instances_pss(daemon: i32, apps: &[i32]) -> u64 {
    let mut pids: BTreeSet<i32> = warmstart::instances::list()
        .unwrap_or_default()
        .iter()
        .filter(|i| i.template && i.monitor == daemon)
        .map(|i| i.pid)
        .collect();
    for &a in apps {
        pids.extend(warmstart::sys::tasks::descendants(a));
        let mut p = a;
        while p > 1 && p != daemon && pids.insert(p) {
            match ppid(p) {
                Some(pp) => p = pp,
                None => break,
            }
        }
    }
    pids.into_iter()
        .filter_map(|p| measure::smaps_rollup(p).ok())
        .map(|m| m.pss)
        .sum()
}

/// `AT_ONCE` `run --listen`s of `t` at once through a daemon with as many parked.
fn at_once(t: &Target, expect: i64) -> Result<AtOnce> {
    let n = AT_ONCE.to_string();
    let mut daemon = ServeDaemon::start_args(
        &t.exe,
        &t.store,
        &["--pool", &n, "--pool-max", &n, "--warm", SNAP],
    )?;
    daemon.wait_log(PARKED, AT_ONCE, TIMEOUT)?;
    // Distinct ports: each held until all are picked.
    let held: Vec<std::net::TcpListener> = (0..AT_ONCE)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    let ports: Vec<u16> = held
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<_>>()?;
    drop(held);
    let go = Barrier::new(AT_ONCE);
    let started: Vec<Result<(Running, f64, String)>> = std::thread::scope(|s| {
        let handles: Vec<_> = ports
            .iter()
            .map(|&port| {
                let go = &go;
                s.spawn(move || -> Result<(Running, f64, String)> {
                    go.wait();
                    let mut r = t.start_with(Start::Served, &listen_args(port))?;
                    match r.first_http_answer(port, TIMEOUT, PAUSE_AT_ONCE) {
                        Ok(a) => Ok((r, ms(a.answered), a.body)),
                        Err(e) => Err(match r.finish() {
                            Some(tail) => anyhow!("on port {port}: {e:#} ({tail})"),
                            None => anyhow!("on port {port}: {e:#}"),
                        }),
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow!("a thread panicked")))
            })
            .collect()
    });
    let mut runs = Vec::new();
    let mut first_err = None;
    for s in started {
        match s {
            Ok(x) => runs.push(x),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    let res = match first_err {
        Some(e) => Err(e),
        None => (|| {
            let apps: Vec<i32> = runs
                .iter()
                .map(|(r, _, _)| r.app_pid())
                .collect::<Result<_>>()?;
            let pss_bytes = instances_pss(daemon.pid(), &apps);
            let ms: Vec<f64> = runs.iter().map(|(_, ms, _)| *ms).collect();
            let mut continued = 0;
            for (_, _, body) in &runs {
                if counter(body)? == expect {
                    continued += 1;
                }
            }
            Ok(AtOnce {
                ttfr: Summary::of(&ms).context("no instance")?,
                continued,
                by_daemon: runs.iter().filter(|(r, _, _)| served_by_daemon(r)).count(),
                on_the_spot: daemon.count("on the spot"),
                pss_bytes,
            })
        })(),
    };
    for (r, _, _) in runs {
        r.finish();
    }
    res
}

/// A `serve --pool 1` daemon and how many instances it handed out.
struct Pool {
    daemon: ServeDaemon,
    handed: usize,
}

impl Pool {
    fn start(t: &Target, extra: &[&str]) -> Result<Pool> {
        let mut args = vec!["--pool", "1", "--warm", SNAP];
        args.extend(extra);
        Ok(Pool {
            daemon: ServeDaemon::start_args(&t.exe, &t.store, &args)?,
            handed: 0,
        })
    }

    /// One served run ([`one`]) once the pool is full again (one instance parked at the
    /// start, a replacement after each one handed out); counted in `row`.
    fn served(&mut self, t: &Target, expect: i64, row: &mut Row, alone: bool) -> Result<Answer> {
        self.daemon.wait_log(PARKED, 1 + self.handed, TIMEOUT)?;
        let replaced = 2 + self.handed;
        let a = one(
            t,
            Start::Served,
            alone.then_some((&mut self.daemon, replaced)),
        )?;
        if a.n != expect {
            row.wrong_counter.push(a.n);
        }
        row.runs += 1;
        row.by_daemon += a.by_daemon as usize;
        self.handed += a.by_daemon as usize;
        Ok(a)
    }
}

/// The warmstart binary measured: `WARMSTART_EXE`, else this build's.
fn exe() -> PathBuf {
    std::env::var_os("WARMSTART_EXE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(EXE))
}

fn measure_app(app: &App, pairs: usize) -> Row {
    let mut row = Row::default();
    if let Err(e) = measure_into(app, pairs, &mut row) {
        row.error = Some(format!("{e:#}"));
    }
    row
}

fn measure_into(app: &App, pairs: usize, row: &mut Row) -> Result<()> {
    let store = tempfile::tempdir()?;
    let t = on_port(
        &Target {
            exe: exe(),
            store: store.path().to_owned(),
            command: app.command.clone(),
            env: Vec::new(),
            snapshot: SNAP.into(),
            probe: Probe::Http { port: 0 },
            timeout: TIMEOUT,
        },
        free_port()?,
    );
    let prime: Vec<String> = app.prime.iter().map(|p| p.to_string()).collect();
    measure::record(&t, "listen", &prime).context("record")?;
    let expect = app.expect();
    // A lone run learns the working set (the daemon parks only a snapshot with one).
    t.run_once(Start::LazyWs, false)
        .context("the learning run")?;

    // Cold and served alternately, the pool refilled before each served run.
    let mut pool = Pool::start(&t, &[])?;
    for i in 0..pairs {
        eprintln!("{}: pair {}/{pairs}", app.label(), i + 1);
        let c = one(&t, Start::Cold, None)?;
        if c.n != 1 {
            bail!("a cold start answered with counter {}, not 1", c.n);
        }
        let s = pool.served(&t, expect, row, false)?;
        row.cold.push(c.answered);
        row.served.push(s.answered);
        row.served_bound.push(s.bound);
    }
    // Where the served time goes: the app's first request alone.
    for _ in 0..ALONE {
        let a = pool.served(&t, expect, row, true)?;
        row.alone_template.push(a.answered);
    }
    drop(pool);
    // The same without templates (each instance restored with its own memory).
    let mut pool = Pool::start(&t, &["--no-templates"])?;
    for _ in 0..pairs {
        let a = pool.served(&t, expect, row, false)?;
        row.served_private.push(a.answered);
    }
    for _ in 0..ALONE {
        let a = pool.served(&t, expect, row, true)?;
        row.alone_private.push(a.answered);
    }
    drop(pool);
    eprintln!("{}: {AT_ONCE} at once", app.label());
    row.at_once = Some(at_once(&t, expect)?);
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let pairs: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(11);
    let only = args.iter().find(|a| a.parse::<usize>().is_err());
    let workloads = Path::new(MANIFEST_DIR).join("../shared/workloads");
    let w = |f: &str| workloads.join(f).to_string_lossy().into_owned();
    let (py, node) = (python()?, real_path("node")?);
    let mut apps = Vec::new();
    // Each as recorded at its first wait for a connection, and after one request
    // (`record --prime /hit`: its request path warmed up, as e2e does for Java).
    for prime in [&[][..], &["/hit"][..]] {
        apps.push(App {
            name: "py_http.py",
            command: vec![py.clone(), w("py_http.py")],
            prime,
            target: 30.0,
        });
        apps.push(App {
            name: "node_http.js",
            command: vec![node.clone(), w("node_http.js")],
            prime,
            target: 20.0,
        });
    }
    if let Some(only) = only {
        apps.retain(|a| a.label().contains(only.as_str()));
    }
    eprintln!("measuring {}", exe().display());
    let started = Instant::now();
    let rows: Vec<(&App, Row)> = apps.iter().map(|a| (a, measure_app(a, pairs))).collect();
    println!(
        "\n{pairs} pairs, cold and served alternately; load average {} after {:.0} s\n",
        warmstart::bench::report::loadavg(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "| workload | cold TTFR | served TTFR (`run --listen`) | ratio | target | \
         {AT_ONCE} at once: TTFR p50 / max | counter continued | {AT_ONCE} at once: Pss |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut failed = false;
    let mut notes = Vec::new();
    for (app, r) in &rows {
        let cold = Summary::of(&r.cold);
        let served = Summary::of(&r.served);
        let ratio = Summary::of(&stats::ratios(&r.cold, &r.served));
        let med = match (&cold, &served) {
            (Some(c), Some(s)) if s.median > 0.0 => Some(c.median / s.median),
            _ => None,
        };
        let verdict = match med {
            Some(m) if m >= app.target => "**met**",
            Some(_) => "**missed**",
            None => "–",
        };
        let (once, cont, pss) = match &r.at_once {
            Some(a) => (
                format!("{} / {}", fmt_ms(a.ttfr.median), fmt_ms(a.ttfr.max)),
                format!(
                    "{}/{AT_ONCE}{}",
                    a.continued,
                    if a.by_daemon < AT_ONCE || a.on_the_spot > 0 {
                        format!(
                            " ({} by the daemon, {} on the spot)",
                            a.by_daemon, a.on_the_spot
                        )
                    } else {
                        String::new()
                    }
                ),
                format!("{:.1} MiB", a.pss_bytes as f64 / (1024.0 * 1024.0)),
            ),
            None => ("–".into(), "–".into(), "–".into()),
        };
        println!(
            "| `{}` | {} | {} | ×{} {} | ≥ {:.0}×: {verdict} | {once} | {cont} | {pss} |",
            app.label(),
            ms_cell(&cold),
            ms_cell(&served),
            med.map(|m| format!("{m:.1}")).unwrap_or_else(|| "–".into()),
            ratio_cell(&ratio)
                .strip_prefix('×')
                .map(|s| format!("(pairs {s})"))
                .unwrap_or_default(),
            app.target,
        );
        if r.by_daemon < r.runs {
            notes.push(format!(
                "`{}`: {} of {} served runs were answered by the daemon (the others \
                 restored in the `run` itself)",
                app.label(),
                r.by_daemon,
                r.runs
            ));
        }
        if !r.wrong_counter.is_empty() {
            failed = true;
            notes.push(format!(
                "`{}`: served runs that did not count on from the snapshot answered {:?} \
                 (not {})",
                app.label(),
                r.wrong_counter,
                app.expect()
            ));
        }
        if let Some(e) = &r.error {
            failed = true;
            notes.push(format!("`{}`: FAILED: {e}", app.label()));
        }
        if r.at_once.as_ref().is_some_and(|a| a.continued < AT_ONCE) {
            failed = true;
        }
    }
    println!(
        "\nWhere the served time goes (median ms): the `run` until its listener is bound, \
         the served first answer with templates and with `--no-templates`, and the app's \
         first request alone (asked once the daemon has parked the replacement), from a \
         template and with its own memory.\n"
    );
    println!(
        "| workload | listener bound | served, templates | served, `--no-templates` | \
         first request alone, template / own memory |"
    );
    println!("|---|---|---|---|---|");
    for (app, r) in &rows {
        let med = |v: &[f64]| {
            Summary::of(v)
                .map(|s| fmt_ms(s.median))
                .unwrap_or_else(|| "–".into())
        };
        println!(
            "| `{}` | {} | {} | {} | {} / {} |",
            app.label(),
            med(&r.served_bound),
            med(&r.served),
            med(&r.served_private),
            med(&r.alone_template),
            med(&r.alone_private)
        );
    }
    for n in notes {
        println!("\n{n}");
    }
    if failed {
        bail!("some instances failed or did not count on from the snapshot (above)");
    }
    Ok(())
}
