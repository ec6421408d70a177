//! warmstart against CRIU through CRIU's own interface, side by side in one run (issue 17):
//! the same workload started cold, answering one request, then `dump -t PID -D DIR`
//! (timed) and `restore -D DIR -d` (timed from launching the restore to the restored
//! process's next answer), both eager, alternating tools pair by pair; image size is the
//! bytes of the image directory.
//!
//! `cargo bench --bench criu [-- NAME...]`. CRIU is `$WARMSTART_CRIU` or `criu` on PATH;
//! without a working one (`criu check`), only warmstart's figures are printed.
//! `WARMSTART_BENCH_PAIRS` sets the pairs (default 5; 3 for 2048 MiB).
//!
//! Each app's stdin and stdout are named FIFOs the bench holds open read-write: both tools
//! reopen them at restore, so the restored app is fed and read the same way.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use warmstart::bench::stats::Summary;
use warmstart::bench::{python, real_path};

const EXE: &str = env!("CARGO_BIN_EXE_warmstart");
const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
const TIMEOUT: Duration = Duration::from_secs(120);

struct Spec {
    name: String,
    argv: Vec<String>,
    probe: &'static str,
    big: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum Tool {
    Warmstart,
    Criu,
}

/// One line from `f` (a FIFO opened non-blocking), waiting at most until `until`.
fn read_line(f: &mut File, until: Instant) -> Result<String> {
    let mut got = Vec::new();
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no answer within {} s", TIMEOUT.as_secs());
        }
        let mut pfd = libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) };
        let mut buf = [0u8; 4096];
        match f.read(&mut buf) {
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if let Some(i) = got.iter().position(|&b| b == b'\n') {
                    return Ok(String::from_utf8_lossy(&got[..i]).into_owned());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn dir_bytes(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn wait_gone(pid: i32) {
    let until = Instant::now() + Duration::from_secs(20);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One trial: (dump ms, restore-to-answer ms, image bytes).
fn trial(tool: Tool, criu: &Path, s: &Spec, work: &Path) -> Result<(f64, f64, u64)> {
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work)?;
    let (inp, outp) = (work.join("in"), work.join("out"));
    for p in [&inp, &outp] {
        let c = std::ffi::CString::new(p.to_str().unwrap())?;
        // SAFETY: a NUL-terminated path that lives for the call.
        if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
            bail!(
                "mkfifo {}: {}",
                p.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    let rw = |p: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(p)
    };
    let (mut to_app, mut from_app) = (rw(&inp)?, rw(&outp)?);
    let mut cmd = Command::new(&s.argv[0]);
    cmd.args(&s.argv[1..])
        .stdin(File::open(&inp)?)
        .stdout(OpenOptions::new().write(true).open(&outp)?)
        .stderr(Stdio::null());
    // SAFETY: setsid is async-signal-safe; CRIU wants the dumped task to lead its session.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        })
    };
    let mut app = cmd
        .spawn()
        .with_context(|| format!("starting {:?}", s.argv))?;
    let pid = app.id() as i32;
    let result = (|| -> Result<(f64, f64, u64)> {
        to_app.write_all(format!("{}\n", s.probe).as_bytes())?;
        read_line(&mut from_app, Instant::now() + TIMEOUT).context("the cold app's answer")?;
        let img = work.join("img");
        std::fs::create_dir_all(&img)?;
        let (exe, store) = match tool {
            Tool::Warmstart => (PathBuf::from(EXE), Some(work.join("store"))),
            Tool::Criu => (criu.to_path_buf(), None),
        };
        let mut dump = Command::new(&exe);
        dump.args(["dump", "-t", &pid.to_string(), "-D"]).arg(&img);
        if let Some(st) = &store {
            dump.env("WARMSTART_STORE", st);
        }
        let t = Instant::now();
        let out = dump.output()?;
        let dump_ms = t.elapsed().as_secs_f64() * 1e3;
        if !out.status.success() {
            bail!(
                "dump failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let _ = app.wait();
        let bytes = dir_bytes(&img);
        let pidfile = work.join("restored.pid");
        let mut restore = Command::new(&exe);
        restore.args(["restore", "-d", "-D"]).arg(&img);
        if tool == Tool::Criu {
            restore.arg("--pidfile").arg(&pidfile);
        }
        if let Some(st) = &store {
            restore.env("WARMSTART_STORE", st);
        }
        let t = Instant::now();
        let out = restore.stdin(Stdio::null()).output()?;
        if !out.status.success() {
            bail!(
                "restore failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let rpid: i32 = match tool {
            Tool::Criu => std::fs::read_to_string(&pidfile)?.trim().parse()?,
            Tool::Warmstart => String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .last()
                .and_then(|w| w.parse().ok())
                .context("restore -d printed no pid")?,
        };
        to_app.write_all(format!("{}\n", s.probe).as_bytes())?;
        let answer = read_line(&mut from_app, t + TIMEOUT);
        let restore_ms = t.elapsed().as_secs_f64() * 1e3;
        // SAFETY: kill takes integers only.
        unsafe { libc::kill(rpid, libc::SIGKILL) };
        wait_gone(rpid);
        answer.context("the restored app's answer")?;
        Ok((dump_ms, restore_ms, bytes))
    })();
    // SAFETY: kill takes integers only; the app is our child (reaped below).
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = app.wait();
    wait_gone(pid);
    let _ = std::fs::remove_dir_all(work);
    result
}

fn criu_path() -> Option<PathBuf> {
    let p = std::env::var_os("WARMSTART_CRIU")
        .map(PathBuf::from)
        .or_else(|| real_path("criu").ok().map(PathBuf::from))?;
    let ok = Command::new(&p)
        .arg("check")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(p)
}

fn fmt_ms(s: &Option<Summary>) -> String {
    match s {
        Some(s) if s.median >= 1000.0 => format!("{:.2} s", s.median / 1e3),
        Some(s) => format!("{:.0} ms", s.median),
        None => "–".into(),
    }
}

fn fmt_mib(b: Option<u64>) -> String {
    b.map(|b| format!("{:.1} MiB", b as f64 / (1 << 20) as f64))
        .unwrap_or_else(|| "–".into())
}

fn main() -> Result<()> {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let manifest = Path::new(MANIFEST_DIR);
    let workloads = std::fs::canonicalize(manifest.join("../shared/workloads"))?;
    let build = manifest.join("target/criu-bench");
    std::fs::create_dir_all(&build)?;
    let pairs: usize = std::env::var("WARMSTART_BENCH_PAIRS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let criu = criu_path();
    let w = |f: &str| workloads.join(f).to_string_lossy().into_owned();
    let py = python()?;
    let mut specs = vec![
        Spec {
            name: "py_boto3.py".into(),
            argv: vec![py.clone(), w("py_boto3.py")],
            probe: "list",
            big: false,
        },
        Spec {
            name: "py_sympy.py".into(),
            argv: vec![py.clone(), w("py_sympy.py")],
            probe: "20",
            big: false,
        },
    ];
    if let Ok(node) = real_path("node") {
        specs.push(Spec {
            name: "node_echo.js".into(),
            argv: vec![node, w("node_echo.js")],
            probe: "hello",
            big: false,
        });
    }
    let java_dir = build.join("java");
    std::fs::create_dir_all(&java_dir)?;
    if let (Ok(java), Ok(javac)) = (real_path("java"), real_path("javac")) {
        let ok = Command::new(javac)
            .arg("-d")
            .arg(&java_dir)
            .arg(workloads.join("java/Echo.java"))
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            specs.push(Spec {
                name: "java/Echo.java".into(),
                argv: vec![
                    java,
                    "-cp".into(),
                    java_dir.to_string_lossy().into_owned(),
                    "Echo".into(),
                ],
                probe: "hello",
                big: false,
            });
        }
    }
    let mem = build.join("mem");
    if Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&mem)
        .arg(workloads.join("c/mem.c"))
        .status()
        .is_ok_and(|s| s.success())
    {
        for mib in [64, 512, 2048] {
            specs.push(Spec {
                name: format!("c/mem.c {mib}"),
                argv: vec![mem.to_string_lossy().into_owned(), mib.to_string()],
                probe: "head",
                big: mib >= 2048,
            });
        }
    }
    specs.retain(|s| filters.is_empty() || filters.iter().any(|f| s.name.contains(f)));

    let mut md = String::from(
        "| workload | dump: warmstart / CRIU | restore to first answer: warmstart / CRIU | image: warmstart / CRIU |\n|---|---|---|---|\n",
    );
    for s in &specs {
        let n = if s.big { pairs.min(3) } else { pairs };
        let mut res: [(Vec<f64>, Vec<f64>, Option<u64>); 2] = Default::default();
        let mut errors = Vec::new();
        for i in 0..n {
            let mut order = vec![Tool::Warmstart];
            if criu.is_some() {
                // Alternate who goes first: drift in the machine's load hits both alike.
                if i % 2 == 0 {
                    order.push(Tool::Criu);
                } else {
                    order.insert(0, Tool::Criu);
                }
            }
            for tool in order {
                let k = (tool == Tool::Criu) as usize;
                let crit = criu.as_deref().unwrap_or(Path::new("criu"));
                match trial(tool, crit, s, &build.join("work")) {
                    Ok((d, r, b)) => {
                        res[k].0.push(d);
                        res[k].1.push(r);
                        res[k].2 = Some(b);
                    }
                    Err(e) => {
                        errors.push(format!("{} {}: {e:#}", s.name, ["warmstart", "criu"][k]))
                    }
                }
            }
        }
        let row = format!(
            "| `{}` ({n} pairs) | {} / {} | {} / {} | {} / {} |\n",
            s.name,
            fmt_ms(&Summary::of(&res[0].0)),
            fmt_ms(&Summary::of(&res[1].0)),
            fmt_ms(&Summary::of(&res[0].1)),
            fmt_ms(&Summary::of(&res[1].1)),
            fmt_mib(res[0].2),
            fmt_mib(res[1].2),
        );
        eprint!("{row}");
        for e in &errors {
            eprintln!("  error: {e}");
        }
        md.push_str(&row);
    }
    if criu.is_none() {
        md.push_str("\n(no working CRIU: set WARMSTART_CRIU or put criu on PATH)\n");
    }
    println!("{md}");
    Ok(())
}
