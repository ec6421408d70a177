//! Snapshots through an OCI registry on loopback (Debian's `docker-registry`): time to
//! first answer of a lazy `run REF` straight from the registry against the local lazy
//! run, re-push bytes after a re-record, pull throughput.
//!
//! `cargo bench --bench registry` (optionally `-- boto3` or `-- mem`); needs
//! `docker-registry`, `cc` and python3 with boto3. Prints markdown rows.
//! `WARMSTART_BENCH_RUNS` sets the runs per median (default 5).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const EXE: &str = env!("CARGO_BIN_EXE_warmstart");
const WORKLOADS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/workloads");

struct Registry {
    child: Child,
    _dir: tempfile::TempDir,
    addr: String,
}

impl Registry {
    fn start() -> Result<Registry> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let cfg = dir.path().join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                // The blob descriptor cache as in Debian's and upstream's default config.
                "version: 0.1\nlog:\n  level: info\nstorage:\n  cache:\n    blobdescriptor: inmemory\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )?;
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting docker-registry")?;
        let err = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(|l| l.ok()) {
                if l.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(30))
            .context("docker-registry did not start")?;
        Ok(Registry {
            child,
            _dir: dir,
            addr,
        })
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ws(store: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(EXE);
    c.env("WARMSTART_STORE", store).args(args);
    c
}

fn ok(cmd: &mut Command, stdin: &str) -> Result<String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().unwrap().write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Time from spawning `cmd` to its first stdout line, `input` given on stdin.
fn first_answer(cmd: &mut Command, input: &str) -> Result<Duration> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes())?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line)?;
    let t = start.elapsed();
    drop(stdin);
    child.wait()?;
    if line.is_empty() {
        bail!("{cmd:?} gave no answer");
    }
    Ok(t)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn json_field(s: &str, k: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(s.trim()).unwrap_or_default();
    v[k].as_u64().unwrap_or(0)
}

fn workload(
    reg: &Registry,
    name: &str,
    argv: &[String],
    input: &str,
    runs: usize,
) -> Result<Vec<String>> {
    let store = tempfile::tempdir()?;
    let s = store.path();
    // Recorded reproducibly (address-space randomization off, Python's hash seed
    // fixed), as a user who re-pushes re-records does.
    let mut rec = vec!["record", "--reproducible", "--name", "app", "--"];
    rec.extend(argv.iter().map(String::as_str));
    ok(ws(s, &rec).env("PYTHONHASHSEED", "1234"), "")?;
    // A first lazy run learns the working set (pushed with the snapshot).
    ok(&mut ws(s, &["run", "--no-serve", "app"]), input)?;
    let r1 = format!(
        "{}/bench/{}:v1",
        reg.addr,
        name.replace(['.', ' ', '/'], "-")
    );
    let push = ok(
        &mut ws(s, &["push", "app", &r1, "--insecure", "--json"]),
        "",
    )?;
    let total = json_field(&push, "bytes");
    let local = median(
        (0..runs)
            .map(|_| first_answer(&mut ws(s, &["run", "--no-serve", "app"]), input))
            .collect::<Result<_>>()?,
    );
    let mut remote = Vec::new();
    let mut remote_stream = Vec::new();
    for _ in 0..runs {
        let empty = tempfile::tempdir()?;
        remote.push(first_answer(
            &mut ws(
                empty.path(),
                &["run", "--no-serve", "--no-stream", "--insecure", &r1],
            ),
            input,
        )?);
        let empty = tempfile::tempdir()?;
        remote_stream.push(first_answer(
            &mut ws(empty.path(), &["run", "--no-serve", "--insecure", &r1]),
            input,
        )?);
    }
    let (remote, remote_stream) = (median(remote), median(remote_stream));
    // Pull into an empty store.
    let empty = tempfile::tempdir()?;
    let t = Instant::now();
    ok(&mut ws(empty.path(), &["pull", &r1, "--insecure"]), "")?;
    let pull = t.elapsed();
    // Re-record the unchanged app (its working set learned again), push it to the same
    // tag: against the artifact there.
    ok(ws(s, &rec).env("PYTHONHASHSEED", "1234"), "")?;
    ok(&mut ws(s, &["run", "--no-serve", "app"]), input)?;
    let again = ok(
        &mut ws(s, &["push", "app", &r1, "--insecure", "--json"]),
        "",
    )?;
    let (up, tot2) = (
        json_field(&again, "bytes_uploaded"),
        json_field(&again, "bytes"),
    );
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    Ok(vec![
        format!(
            "| {name} | {} | {} ({:.1}×) | {} ({:.1}×) | {:.1} of {:.1} MiB ({:.1}%) | {:.0} MiB/s ({:.1} MiB in {}) |",
            ms(local),
            ms(remote),
            remote.as_secs_f64() / local.as_secs_f64(),
            ms(remote_stream),
            remote_stream.as_secs_f64() / local.as_secs_f64(),
            mib(up),
            mib(tot2),
            up as f64 * 100.0 / tot2.max(1) as f64,
            mib(total) / pull.as_secs_f64(),
            mib(total),
            ms(pull),
        ),
    ])
}

fn main() -> Result<()> {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let runs: usize = std::env::var("WARMSTART_BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5);
    let reg = Registry::start()?;
    // Not under /tmp: `record` gives the app a private /tmp.
    let build = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    let mem: PathBuf = build.path().join("mem");
    let st = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&mem)
        .arg(Path::new(WORKLOADS).join("c/mem.c"))
        .status()?;
    if !st.success() {
        bail!("cannot build c/mem.c");
    }
    let py = String::from_utf8(
        Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()?
            .stdout,
    )?
    .trim()
    .to_owned();
    let specs: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "py_boto3.py",
            vec![py, format!("{WORKLOADS}/py_boto3.py")],
            "list\n",
        ),
        (
            "c/mem.c 2048",
            vec![mem.to_string_lossy().into_owned(), "2048".into()],
            "x\n",
        ),
    ];
    let mut rows = vec![
        "| workload | local lazy run | from the registry, faults only | from the registry, streaming into the store | re-push after a re-record | pull |".to_owned(),
        "|---|---|---|---|---|---|".to_owned(),
    ];
    for (name, argv, input) in specs {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        eprintln!("{name}...");
        match workload(&reg, name, &argv, input, runs) {
            Ok(r) => rows.extend(r),
            Err(e) => rows.push(format!("| {name} | failed: {e:#} | | | | |")),
        }
    }
    println!("{}", rows.join("\n"));
    Ok(())
}
