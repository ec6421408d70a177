//! Live migration freeze (issue 18): how long redis-server holding
//! `WARMSTART_BENCH_REDIS_KEYS` keys of 1000 bytes (default 1,000,000, ~1.2 GiB) with a
//! client connected is stopped by a plain `dump --page-server --tcp-established` against
//! the final `dump --prev` of a migration with two pre-dumps, measured side by side on one
//! redis (the plain dumps with `-R`), each from the dump's own `frozen for` figure.
//!
//! `cargo bench --bench migration`. Needs redis-server.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const EXE: &str = env!("CARGO_BIN_EXE_warmstart");

/// Kills and reaps the child when dropped.
struct Reaped(Child);
impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One RESP command; the first line of the reply.
fn ask(s: &mut TcpStream, args: &[&str]) -> Result<String> {
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        if s.read(&mut b)? == 0 {
            bail!("redis closed the connection");
        }
        line.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_owned())
}

/// `warmstart ARGS`: its stdout and the milliseconds of its `frozen for` line.
fn dump(store: &str, rt: &str, args: &[&str]) -> Result<(String, f64, String)> {
    let out = Command::new(EXE)
        .args(args)
        .args(["--display-stats", "--store", store])
        .env("XDG_RUNTIME_DIR", rt)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("warmstart {args:?} failed: {err}");
    }
    let ms = err
        .lines()
        .find_map(|l| l.trim().strip_prefix("frozen for "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no `frozen for` in: {err}"))?;
    Ok((
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        ms,
        err.into_owned(),
    ))
}

fn main() -> Result<()> {
    let keys: u64 = std::env::var("WARMSTART_BENCH_REDIS_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let tmp = tempfile::tempdir()?;
    let (src, dst, rt) = (
        tmp.path().join("src"),
        tmp.path().join("dst"),
        tmp.path().join("rt"),
    );
    let (src, dst, rt) = (
        src.to_str().unwrap(),
        dst.to_str().unwrap(),
        rt.to_str().unwrap(),
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let redis = Reaped(
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--enable-debug-command", "yes"])
            .stdout(Stdio::null())
            .spawn()
            .context("starting redis-server")?,
    );
    let pid = redis.0.id().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e).context("connecting to redis-server"),
        }
    };
    let n = keys.to_string();
    ask(&mut c, &["DEBUG", "POPULATE", &n, "key", "1000"])?;
    let mut server = Reaped(
        Command::new(EXE)
            .args(["page-server", "--port", "0", "--store", dst])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let mut addr = String::new();
    BufReader::new(server.0.stdout.take().unwrap()).read_line(&mut addr)?;
    let addr = addr.trim();

    let t = ["-t", &pid, "--page-server", addr];
    let mut full = Vec::new();
    for _ in 0..3 {
        let (_, ms, _) = dump(
            src,
            rt,
            &[&["dump", "-R", "--tcp-established"][..], &t].concat(),
        )?;
        full.push(ms);
        ask(&mut c, &["SET", "during", "full"])?;
    }
    full.sort_by(f64::total_cmp);
    let (id1, pre1, _) = dump(src, rt, &[&["pre-dump"][..], &t].concat())?;
    ask(&mut c, &["SET", "b", "2"])?;
    let (id2, pre2, _) = dump(src, rt, &[&["pre-dump", "--prev", &id1][..], &t].concat())?;
    ask(&mut c, &["SET", "c", "3"])?;
    let (_, fin, phases) = dump(
        src,
        rt,
        &[&["dump", "--prev", &id2, "--tcp-established"][..], &t].concat(),
    )?;
    println!("redis-server, {keys} keys of 1000 B, one client; frozen (ms):");
    println!("  full dump -R (median of 3)   {:9.1}", full[1]);
    println!("  pre-dump 1                   {pre1:9.1}");
    println!("  pre-dump 2 --prev            {pre2:9.1}");
    println!("  final dump --prev            {fin:9.1}");
    println!("  final / full                 {:9.3}", fin / full[1]);
    println!("the final dump's phases:\n{phases}");
    Ok(())
}
