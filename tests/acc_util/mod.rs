//! Helpers for the trigger, runtime and CRIU-extra acceptance tests (kept apart from
//! `common` so that module's owner can edit it freely): free ports, a tiny HTTP/1.0
//! client, `warmstart ps --json`, compiled Java classes, and guards for restored instances.

#![allow(dead_code)]

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::{alive, run_with, wait_pid_exit, Out, Ws, TIMEOUT};

/// A port that was free a moment ago, below the kernel's ephemeral range: a port the
/// kernel hands out for `bind(0)` may meanwhile become the local end of some client's
/// connection (another test's), and a server's restore then finds it "in use". Tried in
/// an order of this process's own (pid and a counter), so parallel tests and test
/// binaries rarely try the same one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (lo, hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut w = s.split_whitespace().map(|v| v.parse::<u32>().ok());
            Some((w.next()??, w.next()??))
        })
        .unwrap_or((32768, 60999));
    // Ports below the ephemeral range (or above it when that is the larger side).
    let (from, span) = if lo > 11000 {
        (10000, lo - 10000)
    } else {
        (hi + 1, 65535 - hi)
    };
    let seed = std::process::id().wrapping_mul(2654435761);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (from + (seed.wrapping_add(n.wrapping_mul(7919)) % span)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// One `GET path` over HTTP/1.0 to 127.0.0.1:`port`; retries (connection refused, reset,
/// empty or partial answer) until `deadline`. Returns (status line, body), or the last
/// error once the deadline has passed.
pub fn http_get(port: u16, path: &str, deadline: Instant) -> Result<(String, String), String> {
    loop {
        let err = match http_get_once(port, path) {
            Ok(r) => return Ok(r),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "GET http://127.0.0.1:{port}{path} got no answer before the deadline; last error: {err}"
            ));
        }
        // Wait for the listener to come up: a blocking connect with a short timeout is the
        // event we wait on; refused connections return at once, so pace them a little.
        let _ = TcpStream::connect_timeout(
            &format!("127.0.0.1:{port}").parse().unwrap(),
            Duration::from_millis(50),
        );
        std::thread::yield_now();
    }
}

fn http_get_once(port: u16, path: &str) -> Result<(String, String), String> {
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(format!("incomplete answer: {text:?}"));
    };
    let status = head.lines().next().unwrap_or("").to_owned();
    if !status.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP answer: {text:?}"));
    }
    // With a content-length, the body must be complete.
    for h in head.lines().skip(1) {
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                let n: usize = v.trim().parse().unwrap_or(0);
                if body.len() < n {
                    return Err(format!("short body: {text:?}"));
                }
            }
        }
    }
    Ok((status, body.to_owned()))
}

/// `PROG` looked up in `$PATH`, with symlinks resolved (so the real binary is recorded).
pub fn which(prog: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for d in std::env::split_paths(&path) {
        let p = d.join(prog);
        if p.is_file() {
            return std::fs::canonicalize(&p).unwrap_or(p);
        }
    }
    panic!("{prog} is not in $PATH");
}

/// `/work/shared/workloads/java/*.java` compiled once per test process (`javac -d DIR`);
/// returns DIR (under `CARGO_TARGET_TMPDIR`; directories of finished test processes are
/// removed first).
pub fn java_classes() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        if let Ok(rd) = std::fs::read_dir(base) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name
                    .strip_prefix("java-")
                    .and_then(|p| p.parse::<i32>().ok())
                {
                    if !Path::new(&format!("/proc/{pid}")).exists() {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        let dir = base.join(format!("java-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let java = crate::common::workloads_dir().join("java");
        let mut cmd = Command::new(which("javac"));
        cmd.arg("-d").arg(&dir);
        for e in std::fs::read_dir(&java).expect("workloads/java").flatten() {
            if e.path().extension().is_some_and(|x| x == "java") {
                cmd.arg(e.path());
            }
        }
        run_with(&mut cmd, b"", TIMEOUT).assert_ok();
        dir
    })
}

/// The argv running Java class `class` from [`java_classes`].
pub fn java_argv(class: &str) -> Vec<OsString> {
    vec![
        which("java").into_os_string(),
        "-cp".into(),
        java_classes().as_os_str().to_owned(),
        class.into(),
    ]
}

/// `warmstart record --name NAME --ready READY [EXTRA...] -- ARGV...` with `env` added;
/// returns the output unchecked.
pub fn record_out<S: AsRef<std::ffi::OsStr>>(
    ws: &Ws,
    name: &str,
    ready: &str,
    extra: &[&str],
    env: &[(&str, String)],
    argv: &[S],
) -> Out {
    let mut args: Vec<OsString> = vec![
        "record".into(),
        "--name".into(),
        name.into(),
        "--ready".into(),
        ready.into(),
    ];
    args.extend(extra.iter().map(OsString::from));
    args.push("--".into());
    args.extend(argv.iter().map(|a| a.as_ref().to_owned()));
    let mut cmd = ws.cmd(&args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_with(&mut cmd, b"", TIMEOUT)
}

/// [`record_out`], asserting success and a 12-hex id; returns the id.
pub fn record_ok<S: AsRef<std::ffi::OsStr>>(
    ws: &Ws,
    name: &str,
    ready: &str,
    env: &[(&str, String)],
    argv: &[S],
) -> String {
    let out = record_out(ws, name, ready, &[], env, argv);
    out.assert_ok();
    let id = out.stdout.trim().to_owned();
    assert!(
        id.len() == 12 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "record should print a 12-hex id:\n{}",
        out.describe()
    );
    id
}

/// `warmstart ps --json`, parsed (all instances on the machine: filter by monitor or
/// snapshot).
pub fn ps_json(ws: &Ws) -> Vec<serde_json::Value> {
    let out = ws.run(&["ps", "--json"], "");
    out.assert_ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("ps --json is not JSON ({e}):\n{}", out.describe()));
    v.as_array()
        .unwrap_or_else(|| panic!("ps --json is not an array:\n{}", out.describe()))
        .clone()
}

/// Running instances of snapshot `id` (a prefix of the full id is enough).
pub fn instances_of(ws: &Ws, id: &str) -> Vec<serde_json::Value> {
    ps_json(ws)
        .into_iter()
        .filter(|i| i["snapshot"].as_str().is_some_and(|s| s.starts_with(id)))
        .collect()
}

/// Kills every running instance of a snapshot (app and monitor) when dropped, so a failing
/// test leaks nothing even if the restored app outlives its monitor.
pub struct InstanceGuard<'a> {
    pub ws: &'a Ws,
    pub id: String,
}

impl Drop for InstanceGuard<'_> {
    fn drop(&mut self) {
        let Ok(list) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            instances_of(self.ws, &self.id)
        })) else {
            return;
        };
        for i in list {
            for key in ["pid", "monitor"] {
                if let Some(pid) = i[key].as_i64().map(|p| p as i32).filter(|&p| p > 1) {
                    // SAFETY: kill takes integer arguments only; no memory is passed.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    wait_pid_exit(pid, Duration::from_secs(10));
                }
            }
        }
    }
}

/// Sends `sig` to `pid`.
pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill takes integer arguments only; no memory is passed.
    let r = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        r,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// Field 3 of `/proc/PID/stat` (the state letter).
pub fn proc_state(pid: i32) -> char {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    s.rsplit_once(") ")
        .and_then(|(_, r)| r.chars().next())
        .unwrap_or('?')
}

/// Pids of live processes whose command line contains `needle`.
pub fn pids_with_cmdline(needle: &str) -> Vec<i32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        if let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            if String::from_utf8_lossy(&c).contains(needle) && alive(pid) {
                v.push(pid);
            }
        }
    }
    v
}

/// A unique marker for command lines (test process pid, a counter and the time).
pub fn marker(what: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("ws-{what}-{}-{n}-{t}", std::process::id())
}

/// `tests/fixtures/NAME`.
pub fn fixture_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `n` GETs of `path`; each must answer 200. Returns the bodies.
pub fn gets(port: u16, path: &str, n: usize, p: &crate::common::Proc, ctx: &str) -> Vec<String> {
    let deadline = Instant::now() + TIMEOUT;
    (0..n)
        .map(|i| {
            let (status, body) = http_get(port, path, deadline).unwrap_or_else(|e| {
                panic!(
                    "{ctx}: GET {path} #{}: {e}\n`{}` (pid {}) stderr:\n{}",
                    i + 1,
                    p.what,
                    p.pid(),
                    p.err_log.lock().unwrap()
                )
            });
            assert!(
                status.contains(" 200"),
                "{ctx}: GET {path} #{} answered {status:?} {body:?}",
                i + 1
            );
            body
        })
        .collect()
}
