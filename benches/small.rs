//! Small apps benchmark (issue 17): a lone `warmstart run` (no daemon) of a small C
//! program against a cold start of the same program, side by side.
//!
//! For each app: record it at its ready point, let one lone `run` learn its working set,
//! then time, in alternating pairs (cold, then restored), from starting the process to
//! its first answer:
//! - `redis-server` (`--bind 127.0.0.1 --save '' --appendonly no`) on a free port: the
//!   first `+PONG` to a `PING` (the port polled until it answers). Recorded with `--ready
//!   listen`; restored with `warmstart run --listen 127.0.0.1:PORT SNAP` on a fresh port.
//! - `nginx` (master and one worker; a throwaway prefix and config: no access log, errors
//!   on stderr) on a free port: the first `200` to `GET /hit`, a static file. Recorded and
//!   restored as redis.
//! - the `sqlite3` CLI on a small prepared database, a query on stdin: its first output
//!   line. Recorded with `--ready stdin` (its first read of stdin).
//!
//! Each restored answer is compared with the cold one. Besides, `warmstart --version`
//! (the cost of starting the warmstart binary) is timed in the same pairs.
//!
//! `cargo bench --bench small [-- PAIRS]` (default 11 pairs). Prints a markdown table.
//! With `WARMSTART_BASELINE=PATH` (another build of warmstart, e.g. of an earlier
//! commit), each pair is a triple: a lone `run` of the same snapshot by that binary is
//! timed too, after the other two, for a before/after comparison in one run.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use warmstart::bench::measure::{self, free_port, Probe, Running, Start, Target};
use warmstart::bench::real_path;
use warmstart::bench::report::{fmt_ms, loadavg, ms_cell, ratio_cell};
use warmstart::bench::stats::{self, Summary};

const EXE: &str = env!("CARGO_BIN_EXE_warmstart");
const WORK: &str = env!("CARGO_TARGET_TMPDIR");
const TIMEOUT: Duration = Duration::from_secs(30);
/// Between two tries of a port that does not answer yet (a refused connection returns at
/// once).
const PAUSE: Duration = Duration::from_micros(200);
const SNAP: &str = "small";
const QUERY: &str = "SELECT count(*), sum(v), max(name) FROM t;\n";

/// How an app answers first.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Redis,
    Http,
    Line,
}

struct App {
    label: String,
    kind: Kind,
    /// The command for a server on `port` (ignored by line apps).
    command: Box<dyn Fn(u16) -> Result<Vec<String>>>,
    /// `record --ready`.
    ready: &'static str,
}

/// `PING` on 127.0.0.1:`port`; `Some` once a whole `+PONG` line came back.
fn redis_ping(port: u16) -> Option<String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    s.write_all(b"PING\r\n").ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while !got.ends_with(b"\r\n") {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
    }
    Some(String::from_utf8_lossy(&got).trim_end().to_owned())
}

/// The first answer of a server on `port`: polled until it comes; its text (redis: the
/// reply line; HTTP: status line and body).
fn server_answer(r: &mut Running, kind: Kind, port: u16, started: Instant) -> Result<String> {
    let until = started + TIMEOUT;
    loop {
        let got = match kind {
            Kind::Redis => redis_ping(port),
            _ => measure::http_get(port).map(|a| format!("{}\n{}", a.status, a.body)),
        };
        if let Some(g) = got {
            return Ok(g);
        }
        if let Some(status) = r.exited()? {
            bail!("exited without answering on port {port} ({status})");
        }
        if Instant::now() >= until {
            bail!(
                "no answer on 127.0.0.1:{port} within {} s",
                TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(PAUSE);
    }
}

/// One start to its first answer: (ms, answer).
fn one(t: &Target, app: &App, start: Start) -> Result<(f64, String)> {
    let (t, args, port) = if app.kind == Kind::Line {
        (t.clone(), Vec::new(), 0)
    } else {
        let port = free_port()?;
        let t = Target {
            command: (app.command)(port)?,
            ..t.clone()
        };
        let args = match start {
            Start::Cold => Vec::new(),
            _ => vec!["--listen".to_owned(), format!("127.0.0.1:{port}")],
        };
        (t, args, port)
    };
    let started = Instant::now();
    let mut r = t.start_with(start, &args)?;
    let res = match app.kind {
        Kind::Line => r
            .first_line(TIMEOUT)
            .map(|line| (ms(started.elapsed()), line)),
        kind => server_answer(&mut r, kind, port, started).map(|a| (ms(started.elapsed()), a)),
    };
    let tail = r.finish();
    let what = if start == Start::Cold {
        "cold start"
    } else {
        "lone run"
    };
    res.map_err(|e| match tail {
        Some(tail) => anyhow!("{what}: {e:#} ({tail})"),
        None => anyhow!("{what}: {e:#}"),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `warmstart --version`, start to exit.
fn version() -> Result<f64> {
    let t = Instant::now();
    let st = Command::new(EXE)
        .arg("--version")
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("warmstart --version: {st}");
    }
    Ok(ms(t.elapsed()))
}

#[derive(Default)]
struct Row {
    cold: Vec<f64>,
    run: Vec<f64>,
    /// Lone runs by `WARMSTART_BASELINE`.
    baseline: Vec<f64>,
    version: Vec<f64>,
    error: Option<String>,
}

fn measure_app(app: &App, work: &Path, pairs: usize) -> Row {
    let mut row = Row::default();
    if let Err(e) = measure_into(app, work, pairs, &mut row) {
        row.error = Some(format!("{e:#}"));
    }
    row
}

fn measure_into(app: &App, work: &Path, pairs: usize, row: &mut Row) -> Result<()> {
    let store = tempfile::tempdir()?;
    let port = free_port()?;
    let t = Target {
        exe: PathBuf::from(EXE),
        store: store.path().to_owned(),
        command: (app.command)(port)?,
        env: Vec::new(),
        snapshot: SNAP.into(),
        probe: Probe::Line {
            input: QUERY.as_bytes().to_vec(),
        },
        timeout: TIMEOUT,
    };
    // Recorded from `work` (record refuses a working directory under /tmp).
    std::env::set_current_dir(work)?;
    measure::record(&t, app.ready, &[]).context("record")?;
    // The cold answer, and a lone run that learns the working set (and must agree).
    let (_, expect) = one(&t, app, Start::Cold).context("the first cold start")?;
    let (_, learned) = one(&t, app, Start::Served).context("the learning run")?;
    if learned != expect {
        bail!("the learning run answered {learned:?}, a cold start {expect:?}");
    }
    for i in 0..pairs {
        eprintln!("{}: pair {}/{pairs}", app.label, i + 1);
        let (c, a) = one(&t, app, Start::Cold)?;
        if a != expect {
            bail!("a cold start answered {a:?}, the first one {expect:?}");
        }
        let (r, a) = one(&t, app, Start::Served)?;
        if a != expect {
            bail!("a lone run answered {a:?}, a cold start {expect:?}");
        }
        row.cold.push(c);
        row.run.push(r);
        if let Some(exe) = std::env::var_os("WARMSTART_BASELINE") {
            let b = Target {
                exe: PathBuf::from(exe),
                ..t.clone()
            };
            let (r, a) = one(&b, app, Start::Served).context("a lone run of the baseline")?;
            if a != expect {
                bail!("a lone run of the baseline answered {a:?}, a cold start {expect:?}");
            }
            row.baseline.push(r);
        }
        row.version.push(version()?);
    }
    Ok(())
}

/// `cmd`'s path on `PATH`, links kept.
fn which(cmd: &str) -> Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()?;
    let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if p.is_empty() {
        bail!("{cmd} not found on PATH");
    }
    Ok(p)
}

fn apps(work: &Path) -> Result<Vec<App>> {
    let mut apps = Vec::new();
    // Not `real_path`: redis-server is a link to redis-check-rdb, which acts on its name.
    match which("redis-server") {
        Ok(redis) => apps.push(App {
            label: "redis-server".into(),
            kind: Kind::Redis,
            command: Box::new(move |port| {
                Ok([
                    &redis,
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ]
                .map(str::to_owned)
                .to_vec())
            }),
            ready: "listen",
        }),
        Err(e) => eprintln!("redis-server: skipped ({e}; apt-get install redis-server)"),
    }
    let nginx = real_path("nginx").or_else(|_| {
        Path::new("/usr/sbin/nginx")
            .is_file()
            .then(|| "/usr/sbin/nginx".to_owned())
            .ok_or_else(|| anyhow!("nginx not found"))
    });
    match nginx {
        Ok(nginx) => {
            let dir = work.join("nginx");
            std::fs::create_dir_all(dir.join("www"))?;
            std::fs::create_dir_all(dir.join("tmp"))?;
            std::fs::write(dir.join("www/hit"), "hello from nginx\n")?;
            // The worker runs as `nobody`: it must reach the files it serves.
            for d in [work, &dir, &dir.join("www")] {
                std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
            }
            apps.push(App {
                label: "nginx (master + 1 worker)".into(),
                kind: Kind::Http,
                command: Box::new(move |port| {
                    let conf = dir.join(format!("nginx-{port}.conf"));
                    std::fs::write(&conf, warmstart::bench::nginx_conf(&dir, port, 1))?;
                    Ok(vec![
                        nginx.clone(),
                        "-p".into(),
                        dir.to_string_lossy().into_owned(),
                        "-c".into(),
                        conf.to_string_lossy().into_owned(),
                        "-e".into(),
                        "stderr".into(),
                    ])
                }),
                ready: "listen",
            });
        }
        Err(e) => eprintln!("nginx: skipped ({e}; apt-get install nginx)"),
    }
    match real_path("sqlite3") {
        Ok(sqlite) => {
            let db = work.join("small.db");
            let _ = std::fs::remove_file(&db);
            let mut sql =
                String::from("CREATE TABLE t(id INTEGER PRIMARY KEY, v INT, name TEXT);\n");
            sql.push_str("BEGIN;\n");
            for i in 0..1000 {
                sql.push_str(&format!(
                    "INSERT INTO t(v, name) VALUES ({}, 'row{i:04}');\n",
                    i * 7
                ));
            }
            sql.push_str("COMMIT;\n");
            let mut c = Command::new(&sqlite)
                .arg(&db)
                .stdin(Stdio::piped())
                .spawn()
                .context("starting sqlite3")?;
            c.stdin.take().expect("piped").write_all(sql.as_bytes())?;
            if !c.wait()?.success() {
                bail!("sqlite3 could not prepare {}", db.display());
            }
            let db = db.to_string_lossy().into_owned();
            apps.push(App {
                label: "sqlite3 CLI".into(),
                kind: Kind::Line,
                command: Box::new(move |_| Ok(vec![sqlite.clone(), db.clone()])),
                ready: "stdin",
            });
        }
        Err(e) => eprintln!("sqlite3: skipped ({e}; apt-get install sqlite3)"),
    }
    Ok(apps)
}

fn main() -> Result<()> {
    let pairs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(11);
    let work = tempfile::Builder::new()
        .prefix("small-")
        .tempdir_in(WORK)
        .context("a work directory")?;
    let before = loadavg();
    let started = Instant::now();
    let apps = apps(work.path())?;
    let rows: Vec<(&App, Row)> = apps
        .iter()
        .map(|a| (a, measure_app(a, work.path(), pairs)))
        .collect();
    println!(
        "\n{} ({}), {pairs} pairs, cold and lone `run` alternately; load average {before} \
         before, {} after {:.0} s\n",
        warmstart::bench::report::date_now(),
        warmstart::bench::report::Machine::describe().one_line(),
        loadavg(),
        started.elapsed().as_secs_f64()
    );
    let baseline = std::env::var_os("WARMSTART_BASELINE").is_some();
    println!(
        "| app | cold | lone `run` | cold / run (of medians) | per pair | target (≥ ×1) | \
         `warmstart --version` |{}",
        if baseline {
            " baseline lone `run` | cold / baseline |"
        } else {
            ""
        }
    );
    println!(
        "|---|---|---|---|---|---|---|{}",
        if baseline { "---|---|" } else { "" }
    );
    let mut failed = Vec::new();
    for (app, r) in &rows {
        let cold = Summary::of(&r.cold);
        let run = Summary::of(&r.run);
        let pairs = Summary::of(&stats::ratios(&r.cold, &r.run));
        let med = match (&cold, &run) {
            (Some(c), Some(s)) if s.median > 0.0 => Some(c.median / s.median),
            _ => None,
        };
        let verdict = match med {
            Some(m) if m >= 1.0 => "**met**",
            Some(_) => "**missed**",
            None => "–",
        };
        let base = Summary::of(&r.baseline);
        let extra = match (&cold, &base) {
            (Some(c), Some(b)) if b.median > 0.0 => {
                format!(" {} | ×{:.2} |", ms_cell(&base), c.median / b.median)
            }
            _ if baseline => " – | – |".into(),
            _ => String::new(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {verdict} | {} |{extra}",
            app.label,
            ms_cell(&cold),
            ms_cell(&run),
            med.map(|m| format!("×{m:.2}"))
                .unwrap_or_else(|| "–".into()),
            ratio_cell(&pairs),
            Summary::of(&r.version)
                .map(|s| fmt_ms(s.median))
                .unwrap_or_else(|| "–".into()),
        );
        if let Some(e) = &r.error {
            failed.push(format!("{}: FAILED: {e}", app.label));
        }
    }
    for f in &failed {
        println!("\n{f}");
    }
    if !failed.is_empty() {
        bail!("some apps failed (above)");
    }
    Ok(())
}
