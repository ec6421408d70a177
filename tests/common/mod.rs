//! Helpers shared by the integration tests: a private store per test, C fixtures compiled at
//! test time, running `warmstart` (or anything) with a deadline, and guards that kill whatever
//! a test leaves behind, even when it fails.
//!
//! Nothing here sleeps for a fixed time: waits are on events (process exit through a pidfd,
//! a line on a pipe, EOF), each with a generous deadline.

#![allow(dead_code)]

pub mod netns;
pub mod state;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Deadline for anything that should take a second or two.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_warmstart")
}

/// The shared workloads: `$WARMSTART_WORKLOADS`, else the repository's sibling folder
/// `../shared/workloads`, else `/work/shared/workloads` (for a checkout elsewhere).
pub fn workloads_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("WARMSTART_WORKLOADS") {
        return PathBuf::from(d);
    }
    let sibling = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/workloads");
    if sibling.is_dir() {
        return sibling;
    }
    PathBuf::from("/work/shared/workloads")
}

/// The Python interpreter by its real path (a version-manager shim would be recorded instead).
pub fn python() -> PathBuf {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 must be installed");
        assert!(out.status.success(), "python3 -c failed: {out:?}");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

// ---------------------------------------------------------------------------------------
// Process helpers

/// A pidfd for `pid` (`ESRCH` if it is gone).
pub fn pidfd_open(pid: i32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes integer arguments only; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pidfd_open succeeded, so `fd` is a fresh descriptor nothing else owns; it is
    // wrapped exactly once.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits until `pid` (a child or not) exits or `timeout` passes; true if it exited.
pub fn wait_pid_exit(pid: i32, timeout: Duration) -> bool {
    let Ok(fd) = pidfd_open(pid) else {
        return true; // ESRCH: already gone
    };
    wait_pidfd_exit(&fd, timeout)
}

/// Waits until the process of `fd` (a pidfd) exits or `timeout` passes; true if it exited.
pub fn wait_pidfd_exit(fd: &std::os::fd::OwnedFd, timeout: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `p` is one live, initialised pollfd; the kernel writes only its revents.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            return true;
        }
        if r == 0 || Instant::now() >= deadline {
            return false;
        }
        // EINTR: go round again
    }
}

/// The children of every thread of `pid`.
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        out.extend(
            text.split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok()),
        );
    }
    out.sort_unstable();
    out
}

/// `/proc/PID/maps` lines (fields joined by single spaces) with adjacent mappings of
/// identical attributes joined, as CRIU's zdtm compares them: the kernel keeps two
/// such areas apart only when their `anon_vma`s differ (e.g. one faulted before a
/// `fork`, the next mapped after it), a split the process cannot see except here and
/// that no restore reproduces; every other attribute still has to match.
pub fn merge_adjacent_maps(lines: Vec<String>) -> Vec<String> {
    fn parse(l: &str) -> Option<(u64, u64, Vec<&str>)> {
        let w: Vec<&str> = l.split(' ').collect();
        let (a, b) = w.first()?.split_once('-')?;
        Some((
            u64::from_str_radix(a, 16).ok()?,
            u64::from_str_radix(b, 16).ok()?,
            w[1..].to_vec(),
        ))
    }
    let mut out: Vec<String> = Vec::new();
    for l in lines {
        if let (Some(prev), Some((start, end, rest))) = (out.last(), parse(&l)) {
            if let Some((pstart, pend, prest)) = parse(prev) {
                // Same perms, device, inode and name; the offset continues (file
                // mappings) or is 0 on both (anonymous ones).
                let off = |v: &[&str]| u64::from_str_radix(v.get(1).unwrap_or(&""), 16).ok();
                let same = pend == start
                    && prest.len() == rest.len()
                    && prest[0] == rest[0]
                    && prest[2..] == rest[2..]
                    && match (off(&prest), off(&rest), rest.get(3)) {
                        (Some(0), Some(0), Some(&"0")) => true,
                        (Some(po), Some(o), Some(ino)) => *ino != "0" && po + (pend - pstart) == o,
                        _ => false,
                    };
                if same {
                    let joined = format!("{pstart:x}-{end:x} {}", prest.join(" "));
                    *out.last_mut().unwrap() = joined;
                    continue;
                }
            }
        }
        out.push(l);
    }
    out
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            let state = s
                .rsplit_once(") ")
                .map(|(_, r)| r.chars().next().unwrap_or('?'));
            !matches!(state, Some('Z') | Some('X'))
        }
        Err(_) => false,
    }
}

fn kill_tree(pid: i32) {
    // SAFETY: kill takes integer arguments only; no memory of ours is involved.
    unsafe {
        libc::kill(-pid, libc::SIGKILL); // its process group (spawned with process_group(0))
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Kills pids (and reaps children) when dropped, so a failing test leaks no processes.
#[derive(Default)]
pub struct KillGuard {
    pids: Vec<i32>,
}

impl KillGuard {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn add(&mut self, pid: i32) {
        self.pids.push(pid);
    }
}

impl Drop for KillGuard {
    fn drop(&mut self) {
        for &pid in &self.pids {
            if pid > 1 {
                // SAFETY: kill takes integer arguments only; no memory is passed.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                wait_pid_exit(pid, Duration::from_secs(10));
            }
        }
    }
}

/// The result of a finished command.
#[derive(Debug, Clone)]
pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub what: String,
}

impl Out {
    /// Exit code, or 128+N for a signal (like a shell).
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| 128 + self.status.signal().unwrap_or(0))
    }
    pub fn success(&self) -> bool {
        self.status.success()
    }
    pub fn describe(&self) -> String {
        format!(
            "`{}` exited with {} ({:?})\n--- stdout ---\n{}\n--- stderr ---\n{}\n--------------",
            self.what,
            self.code(),
            self.status,
            self.stdout,
            self.stderr
        )
    }
    /// Panics with the whole output unless the command succeeded.
    pub fn assert_ok(&self) -> &Self {
        assert!(self.success(), "command failed:\n{}", self.describe());
        self
    }
    /// Panics with the whole output unless the command failed.
    pub fn assert_fail(&self) -> &Self {
        assert!(
            !self.success(),
            "command should have failed:\n{}",
            self.describe()
        );
        self
    }
}

fn describe_cmd(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn reader<R: Read + Send + 'static>(mut r: R, buf: Arc<Mutex<Vec<u8>>>, done: mpsc::Sender<()>) {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.lock().unwrap().extend_from_slice(&chunk[..n]),
            }
        }
        let _ = done.send(());
    });
}

/// Runs `cmd` with `stdin` as its input, capturing stdout and stderr. On `timeout` the
/// command (and its process group) is killed and the test fails with what it printed. A
/// command that exits but leaves something holding its stdout/stderr open also fails.
pub fn run_with(cmd: &mut Command, stdin: &[u8], timeout: Duration) -> Out {
    let what = describe_cmd(cmd);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning `{what}`: {e}"));
    let pid = child.id() as i32;
    let mut guard = KillGuard::new();
    guard.add(pid);

    let input = stdin.to_vec();
    let mut sin = child.stdin.take().unwrap();
    std::thread::spawn(move || {
        let _ = sin.write_all(&input);
        // dropped here: EOF
    });
    let (done_tx, done_rx) = mpsc::channel();
    let out = Arc::new(Mutex::new(Vec::new()));
    let err = Arc::new(Mutex::new(Vec::new()));
    reader(child.stdout.take().unwrap(), out.clone(), done_tx.clone());
    reader(child.stderr.take().unwrap(), err.clone(), done_tx);

    let snapshot =
        |out: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    let deadline = Instant::now() + timeout;
    if !wait_pid_exit(pid, timeout) {
        kill_tree(pid);
        let _ = child.wait();
        panic!(
            "`{what}` did not finish within {timeout:?}; killed it.\n--- stdout ---\n{}\n--- stderr ---\n{}",
            snapshot(&out),
            snapshot(&err)
        );
    }
    let status = child.wait().expect("wait");
    for _ in 0..2 {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(10));
        match done_rx.recv_timeout(left) {
            Ok(()) => {}
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                kill_tree(pid);
                panic!(
                    "`{what}` exited ({status:?}) but something it started still holds its stdout/stderr open\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    snapshot(&out),
                    snapshot(&err)
                );
            }
        }
    }
    drop(guard);
    Out {
        status,
        stdout: snapshot(&out),
        stderr: snapshot(&err),
        what,
    }
}

/// Runs a program directly (cold, no warmstart).
pub fn cold<S: AsRef<std::ffi::OsStr>>(argv: &[S], stdin: &str) -> Out {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    run_with(&mut cmd, stdin.as_bytes(), TIMEOUT)
}

/// A long-lived process with piped stdio, read line by line. Killed (with its process group)
/// when dropped.
pub struct Proc {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub out: Receiver<String>,
    pub err: Receiver<String>,
    /// Everything read from stderr so far (for failure messages).
    pub err_log: Arc<Mutex<String>>,
    pub what: String,
}

fn line_reader<R: Read + Send + 'static>(
    r: R,
    tx: mpsc::Sender<String>,
    log: Option<Arc<Mutex<String>>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if let Some(l) = &log {
                let mut l = l.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        let what = describe_cmd(cmd);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning `{what}`: {e}"));
        let (otx, orx) = mpsc::channel();
        let (etx, erx) = mpsc::channel();
        let log = Arc::new(Mutex::new(String::new()));
        line_reader(child.stdout.take().unwrap(), otx, None);
        line_reader(child.stderr.take().unwrap(), etx, Some(log.clone()));
        let stdin = child.stdin.take();
        Proc {
            child,
            stdin,
            out: orx,
            err: erx,
            err_log: log,
            what,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn send(&mut self, line: &str) {
        let w = self.stdin.as_mut().expect("stdin already closed");
        writeln!(w, "{line}")
            .and_then(|_| w.flush())
            .unwrap_or_else(|e| panic!("writing to `{}`: {e}", self.what));
    }

    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    fn stderr_so_far(&self) -> String {
        self.err_log.lock().unwrap().clone()
    }

    /// Next stdout line (panics on timeout or EOF, showing stderr).
    pub fn read_line(&self) -> String {
        match self.out.recv_timeout(TIMEOUT) {
            Ok(l) => l,
            Err(e) => panic!(
                "no stdout line from `{}` ({e:?}); stderr:\n{}",
                self.what,
                self.stderr_so_far()
            ),
        }
    }

    /// Waits for a stderr line containing `needle`; returns it.
    pub fn wait_stderr(&self, needle: &str) -> String {
        self.wait_stderr_any(&[needle]).1
    }

    /// Waits for a stderr line containing one of `needles`; returns which (the first
    /// that matches) and the line.
    pub fn wait_stderr_any(&self, needles: &[&str]) -> (usize, String) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.err.recv_timeout(left) {
                Ok(l) => {
                    if let Some(i) = needles.iter().position(|n| l.contains(n)) {
                        return (i, l);
                    }
                }
                Err(e) => panic!(
                    "`{}` never printed any of {needles:?} on stderr ({e:?}); stderr:\n{}",
                    self.what,
                    self.stderr_so_far()
                ),
            }
        }
    }

    /// All it wrote on stderr, once it has exited: waits for the end of its stderr (up to
    /// the timeout: a process it left behind may hold the pipe), since the reader thread
    /// may still be behind when the exit is seen.
    pub fn stderr_after_exit(&self) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.err.recv_timeout(left) {
                Ok(_) => {}
                Err(_) => break,
            }
        }
        self.stderr_so_far()
    }

    /// Everything it writes on stdout from here to the end of it (EOF), lines joined
    /// with `\n`; panics if that takes longer than the timeout.
    pub fn stdout_until_eof(&self) -> String {
        let deadline = Instant::now() + TIMEOUT;
        let mut all = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.out.recv_timeout(left) {
                Ok(l) => {
                    all.push_str(&l);
                    all.push('\n');
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return all,
                Err(e) => panic!(
                    "`{}` did not close its stdout ({e:?}); so far:\n{all}\nstderr:\n{}",
                    self.what,
                    self.stderr_so_far()
                ),
            }
        }
    }

    /// Waits for exit (panics on timeout); returns the status.
    pub fn wait(&mut self) -> ExitStatus {
        if !wait_pid_exit(self.pid(), TIMEOUT) {
            panic!(
                "`{}` did not exit within {TIMEOUT:?}; stderr:\n{}",
                self.what,
                self.stderr_so_far()
            );
        }
        self.child.wait().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            kill_tree(self.pid());
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Restore modes

/// How `warmstart run` gives a restored instance its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `run SNAP` (the default): served on demand by the page server; the first such run
    /// of a snapshot learns its working set.
    Lazy,
    /// `run --eager SNAP`: everything copied before the app resumes.
    Eager,
    /// `run SNAP` again, once a working set was learned: it is prefetched, the rest lazy.
    LazyPrefetched,
    /// `run --no-prefetch SNAP`: lazy, no prefetching and no learning.
    LazyNoPrefetch,
}

impl Mode {
    /// The modes every restore test goes through, in this order.
    pub const ALL: [Mode; 3] = [Mode::Lazy, Mode::Eager, Mode::LazyPrefetched];

    /// The `run` flags for this mode.
    pub fn flags(self) -> &'static [&'static str] {
        match self {
            Mode::Lazy | Mode::LazyPrefetched => &[],
            Mode::Eager => &["--eager"],
            Mode::LazyNoPrefetch => &["--no-prefetch"],
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Lazy => "lazy (learning)",
            Mode::Eager => "eager",
            Mode::LazyPrefetched => "lazy (prefetched)",
            Mode::LazyNoPrefetch => "lazy (--no-prefetch)",
        })
    }
}

// ---------------------------------------------------------------------------------------
// Stores

/// A private, temporary snapshot store and the commands that use it.
pub struct Ws {
    pub dir: tempfile::TempDir,
}

impl Ws {
    pub fn new() -> Ws {
        Ws {
            dir: tempfile::Builder::new()
                .prefix("ws-store-")
                .tempdir()
                .expect("temp store"),
        }
    }

    pub fn store(&self) -> &Path {
        self.dir.path()
    }

    /// `warmstart ARGS` against this store.
    pub fn cmd<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Command {
        let mut c = Command::new(bin());
        c.env("WARMSTART_STORE", self.store())
            .env_remove("RUST_LOG")
            .args(args);
        c
    }

    pub fn run<S: AsRef<std::ffi::OsStr>>(&self, args: &[S], stdin: &str) -> Out {
        run_with(&mut self.cmd(args), stdin.as_bytes(), TIMEOUT)
    }

    /// Waits (bounded) until `name` names another snapshot than the one whose id starts
    /// with `first` (a tool recorded again in the background).
    pub fn wait_renamed(&self, name: &str, first: &str) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let ls = self.run(&["ls", "--json"], "");
            let v: serde_json::Value = serde_json::from_str(&ls.stdout).unwrap_or_default();
            let now = v
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| {
                    s["names"]
                        .as_array()
                        .is_some_and(|n| n.iter().any(|n| n == name))
                })
                .and_then(|s| s["id"].as_str().map(str::to_owned));
            if now.as_deref().is_some_and(|id| !id.starts_with(first)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} was not recorded again: {}",
                ls.stdout
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `record --name NAME -- ARGV...`; asserts success and returns the printed id.
    pub fn record<S: AsRef<std::ffi::OsStr>>(&self, name: &str, argv: &[S]) -> String {
        self.record_env(name, argv, &[])
    }

    /// [`Ws::record`] with extra environment variables (the app inherits them).
    pub fn record_env<S: AsRef<std::ffi::OsStr>>(
        &self,
        name: &str,
        argv: &[S],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> String {
        let mut args: Vec<std::ffi::OsString> =
            vec!["record".into(), "--name".into(), name.into(), "--".into()];
        args.extend(argv.iter().map(|a| a.as_ref().to_owned()));
        let mut cmd = self.cmd(&args);
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let out = run_with(&mut cmd, b"", TIMEOUT);
        out.assert_ok();
        let id = out.stdout.trim().to_owned();
        assert!(
            id.len() == 12 && id.chars().all(|c| c.is_ascii_hexdigit()),
            "record should print a 12-hex id:\n{}",
            out.describe()
        );
        id
    }

    /// `warmstart run SNAP` with `stdin`.
    pub fn instance(&self, snap: &str, stdin: &str) -> Out {
        self.run(&["run", snap], stdin)
    }

    /// `warmstart run [MODE FLAGS] SNAP` with `stdin`.
    pub fn run_mode(&self, snap: &str, mode: Mode, stdin: &str) -> Out {
        let mut args: Vec<&str> = vec!["run"];
        args.extend_from_slice(mode.flags());
        args.push(snap);
        self.run(&args, stdin)
    }

    /// Restores `snap` once in each of [`Mode::ALL`], in that order (the first lazy run
    /// learns the working set, the last one prefetches it), calling `check` with each
    /// output. Asserts that the learning run stored a working set.
    pub fn each_mode(&self, snap: &str, stdin: &str, check: impl FnMut(Mode, &Out)) {
        self.each_mode_prepared(snap, stdin, |_| {}, check)
    }

    /// [`Ws::each_mode`], calling `prepare` before each run (e.g. to put back files that
    /// the previous instance changed).
    pub fn each_mode_prepared(
        &self,
        snap: &str,
        stdin: &str,
        mut prepare: impl FnMut(Mode),
        mut check: impl FnMut(Mode, &Out),
    ) {
        for mode in Mode::ALL {
            prepare(mode);
            let out = self.run_mode(snap, mode, stdin);
            check(mode, &out);
            if mode == Mode::Lazy {
                let pages = self.working_set_pages(snap);
                assert!(
                    pages.is_some_and(|n| n > 0),
                    "the first lazy run of {snap} should have learned a working set; \
                     `inspect --json` says working_set_pages = {pages:?}\n{}",
                    out.describe()
                );
            }
        }
    }

    /// `warmstart -v serve --warm SNAP` on this store, once it listens and has an
    /// instance of `snap` parked (the daemon says so on stderr). Dropping it kills it,
    /// and its instances with it.
    /// The sandboxes (parked or running instances) of the daemon `daemon`: its children
    /// but its templates (`ws-template`).
    pub fn sandboxes(daemon: i32) -> Vec<i32> {
        children(daemon)
            .into_iter()
            .filter(|&p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() != "ws-template")
            })
            .collect()
    }

    pub fn serve(&self, snap: &str) -> Proc {
        self.serve_with(&["-v", "serve", "--warm", snap])
    }

    /// A daemon started with `args` (`serve ... --warm SNAP`), once it has parked an
    /// instance.
    pub fn serve_with(&self, args: &[&str]) -> Proc {
        let daemon = Proc::spawn(&mut self.cmd(args));
        let line = daemon.read_line();
        assert!(line.starts_with("serving "), "serve printed {line:?}");
        daemon.wait_stderr("parked an instance of");
        daemon
    }

    /// `run --display-stats SNAP` answered by a parked instance of the daemon [`Ws::serve`]
    /// started (asserted).
    pub fn served(&self, snap: &str, stdin: &str) -> Out {
        let out = self.run(&["run", "--display-stats", snap], stdin);
        assert!(
            out.stderr.contains("by serve (parked instance)"),
            "run {snap} should have been answered by a parked instance:\n{}",
            out.describe()
        );
        out
    }

    /// `warmstart ps --json` with the runtime directory `rt` (where instances are listed),
    /// parsed.
    pub fn ps_json(&self, rt: &Path) -> Vec<serde_json::Value> {
        let out = run_with(
            self.cmd(&["ps", "--json"]).env("XDG_RUNTIME_DIR", rt),
            b"",
            TIMEOUT,
        );
        out.assert_ok();
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("ps --json is not a JSON list ({e}):\n{}", out.describe()))
    }

    /// `inspect --json SNAP`, parsed.
    pub fn inspect_json(&self, snap: &str) -> serde_json::Value {
        let out = self.run(&["inspect", "--json", snap], "");
        out.assert_ok();
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("inspect --json is not JSON ({e}):\n{}", out.describe()))
    }

    /// Pages in the learned working set of `snap` (`None`: not learned yet).
    pub fn working_set_pages(&self, snap: &str) -> Option<u64> {
        self.inspect_json(snap)["stats"]["working_set_pages"].as_u64()
    }

    /// `ls --json`, parsed.
    pub fn ls_json(&self) -> serde_json::Value {
        let out = self.run(&["ls", "--json"], "");
        out.assert_ok();
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("ls --json is not JSON ({e}):\n{}", out.describe()))
    }
}

impl Default for Ws {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------
// Fixtures

/// Directory for binaries compiled by this test process: `CARGO_TARGET_TMPDIR/fixtures-PID`.
/// Directories of test processes that are gone are removed first.
fn build_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        if let Ok(rd) = std::fs::read_dir(base) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name
                    .strip_prefix("fixtures-")
                    .and_then(|p| p.parse::<i32>().ok())
                {
                    if !Path::new(&format!("/proc/{pid}")).exists() {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        let dir = base.join(format!("fixtures-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    })
}

/// Compiles `src` with `cc FLAGS -o OUT src` once per test process; returns the binary.
pub fn compile(src: &Path, flags: &[&str], out_name: &str) -> PathBuf {
    static CACHE: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    // Holding the lock while compiling also keeps two tests from writing the same file.
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = cache.get(out_name) {
        return p.clone();
    }
    let out = build_dir().join(out_name);
    let res = Command::new("cc")
        .args(flags)
        .arg("-o")
        .arg(&out)
        .arg(src)
        .output()
        .expect("cc must be installed");
    assert!(
        res.status.success(),
        "compiling {} failed:\n{}{}",
        src.display(),
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
    cache.insert(out_name.to_owned(), out.clone());
    out
}

/// `tests/fixtures/NAME.c` compiled with `cc -O1 -g`.
pub fn fixture(name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.c"));
    compile(&src, &["-O1", "-g", "-Wall"], name)
}

/// Input for a restored zdtm fixture: two checks (the state must also survive the first
/// check's own use of it).
pub const CHECK_TWICE: &str = "check\ncheck\n";

/// Panics unless `out` is exactly `lines` PASS lines and exit 0.
pub fn assert_all_pass(out: &Out, lines: usize, ctx: &str) {
    let want = "PASS\n".repeat(lines);
    assert!(
        out.stdout == want && out.code() == 0,
        "{ctx}: expected {lines}x PASS and exit 0:\n{}",
        out.describe()
    );
}

/// A zdtm fixture run cold (no warmstart) passes its two checks.
pub fn zdtm_cold_pass<S: AsRef<std::ffi::OsStr>>(name: &str, argv: &[S]) {
    let out = cold(argv, CHECK_TWICE);
    assert_all_pass(&out, 2, &format!("cold {name}"));
}

/// The negative control: a cold zdtm fixture whose state is broken on purpose between two
/// checks prints PASS then FAIL and exits 1 (its checks can fail).
pub fn zdtm_cold_break<S: AsRef<std::ffi::OsStr>>(name: &str, argv: &[S]) {
    let out = cold(argv, "check\nbreak\ncheck\n");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines.len() == 2 && lines[0] == "PASS" && lines[1].starts_with("FAIL: ") && out.code() == 1,
        "cold {name} with `break` should print PASS then FAIL and exit 1:\n{}",
        out.describe()
    );
}

/// A temporary directory for a fixture's files. Outside `/tmp`: `record` gives the app a
/// private `/tmp` (as a container does), where a directory the test made in the host's
/// `/tmp` would not be seen.
/// `cmd` runs as user and group `nobody` (65534) with no supplementary groups and no
/// capabilities, as a new user would (the test itself runs as root).
pub fn as_nobody(cmd: &mut Command) -> &mut Command {
    // SAFETY: only setgroups/setgid/setuid (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(65534) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(root).expect("creating CARGO_TARGET_TMPDIR");
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(root)
        .expect("tempdir")
}

/// The regular files of a directory (recursively): content and mtime.
pub struct SavedFiles(
    std::path::PathBuf,
    Vec<(std::path::PathBuf, Vec<u8>, std::time::SystemTime)>,
    Vec<std::path::PathBuf>,
);

impl SavedFiles {
    pub fn save(dir: &std::path::Path) -> SavedFiles {
        let mut v = Vec::new();
        let mut others = Vec::new();
        let mut todo = vec![dir.to_owned()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let ft = e.file_type().unwrap();
                if ft.is_dir() {
                    todo.push(e.path());
                } else if ft.is_file() {
                    let meta = e.metadata().unwrap();
                    v.push((
                        e.path(),
                        std::fs::read(e.path()).unwrap(),
                        meta.modified().unwrap(),
                    ));
                } else {
                    // A FIFO or socket of the fixture's: kept as it is.
                    others.push(e.path());
                }
            }
        }
        SavedFiles(dir.to_owned(), v, others)
    }

    /// Removes what an instance created (anything but directories that was not there when
    /// saved), then rewrites each saved file in place (same inode) and its mtime.
    pub fn put_back(&self) {
        let mut todo = vec![self.0.clone()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let path = e.path();
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    todo.push(path);
                } else if !self.1.iter().any(|(p, _, _)| *p == path) && !self.2.contains(&path) {
                    std::fs::remove_file(&path)
                        .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
                }
            }
        }
        for (path, content, mtime) in &self.1 {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            std::io::Write::write_all(&mut &f, content).unwrap();
            f.set_modified(*mtime).unwrap();
        }
    }
}

fn argv(bin: &std::path::Path, dir: Option<&std::path::Path>) -> Vec<std::ffi::OsString> {
    let mut v = vec![bin.as_os_str().to_owned()];
    if let Some(d) = dir {
        v.push(d.as_os_str().to_owned());
    }
    v
}

/// A zdtm fixture (`needs_dir`: it takes a scratch directory as its argument): cold it
/// passes and its negative control fails; recorded, it passes again restored in every
/// mode ([`Mode::ALL`]) and handed out by `warmstart serve`, with the same `/proc` state
/// as at the warm point each time ([`zdtm_every_mode_of`]).
pub fn zdtm_every_mode(name: &str, needs_dir: bool) {
    zdtm_every_mode_of(name, &fixture(name), needs_dir, &[]);
}

/// Input for a restored zdtm fixture under the state diff: the `/proc` state capture
/// first (before anything else touches the restored state), then [`CHECK_TWICE`].
pub const STATE_CHECK_TWICE: &str = "state\ncheck\ncheck\n";

/// [`zdtm_every_mode`] for the fixture binary `bin`, also restored in the `extra` modes
/// after [`Mode::ALL`].
///
/// The state diff: the fixture is recorded with `ZDTM_STATE` naming a file, where it
/// writes its `/proc` state capture at the warm point (tests/fixtures/zdtm_state.h); each
/// restored instance is asked for the capture again (`state`) before its checks, and the
/// two must agree outside the documented exclusions ([`state::EXCLUDED`]).
pub fn zdtm_every_mode_of(name: &str, bin: &Path, needs_dir: bool, extra: &[Mode]) {
    zdtm_run(
        name,
        bin,
        &Zdtm {
            needs_dir,
            extra_modes: extra,
            ..Zdtm::default()
        },
    );
}

/// How [`zdtm_run`] runs a zdtm fixture.
#[derive(Default)]
pub struct Zdtm<'a> {
    /// The fixture takes a scratch directory as its first argument.
    pub needs_dir: bool,
    /// Modes restored in after [`Mode::ALL`].
    pub extra_modes: &'a [Mode],
    /// Further arguments of the cold runs.
    pub cold_args: &'a [&'a str],
    /// Further arguments of the recorded run.
    pub record_args: &'a [&'a str],
    /// The snapshot's age: waited once between the record and the first restore. Not
    /// synchronisation: it creates the condition a fixture checks (e.g. clocks that must
    /// not count the time spent as a snapshot).
    pub age: Duration,
    /// Why the fixture is not handed out by `warmstart serve` too (`None`: it is).
    pub not_served: Option<&'static str>,
    /// Why the fixture's `/proc` state legitimately changes after its warm point by its
    /// own doing (e.g. glibc starts a thread per SIGEV_THREAD expiry), so the state diff
    /// is printed but not enforced (`None`: enforced).
    pub state_changes: Option<&'static str>,
}

/// [`zdtm_every_mode_of`] with the options of `how`.
pub fn zdtm_run(name: &str, bin: &Path, how: &Zdtm) {
    let needs_dir = how.needs_dir;
    let with = |mut v: Vec<std::ffi::OsString>, extra: &[&str]| {
        v.extend(extra.iter().map(std::ffi::OsString::from));
        v
    };
    // Cold: the fixture itself passes, and can fail.
    let d = tempdir("ws-cold-");
    zdtm_cold_pass(
        name,
        &with(argv(bin, needs_dir.then(|| d.path())), how.cold_args),
    );
    let d = tempdir("ws-neg-");
    zdtm_cold_break(
        name,
        &with(argv(bin, needs_dir.then(|| d.path())), how.cold_args),
    );

    // Record at the warm point, restore in every mode, check. An instance may write to
    // the fixture's files, which the next restore would rightly refuse (the snapshot's
    // files changed): each run gets them back as they were at the warm point.
    let ws = Ws::new();
    let d = tempdir("ws-rec-");
    let captures = tempdir("ws-state-");
    // Writable for a fixture that drops root before its warm point (creds).
    std::fs::set_permissions(
        captures.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    let before_path = captures.path().join("before");
    let id = ws.record_env(
        name,
        &with(argv(bin, needs_dir.then(|| d.path())), how.record_args),
        &[("ZDTM_STATE", before_path.as_os_str())],
    );
    if !how.age.is_zero() {
        std::thread::sleep(how.age); // the snapshot's age (see `Zdtm::age`)
    }
    let before = std::fs::read_to_string(&before_path).unwrap_or_else(|e| {
        panic!(
            "{name}: no state capture from the warm point in {}: {e}",
            before_path.display()
        )
    });
    let files = SavedFiles::save(d.path());
    let state_changes = how.state_changes;
    let check = |how: &str, out: &Out| {
        let ctx = format!("restored {name} ({id}), {how}");
        let Some((after, rest)) = state::split_state(&out.stdout) else {
            panic!(
                "{ctx}: no state capture (`state` ... END):\n{}",
                out.describe()
            );
        };
        let mut diffs = state::differences(&ctx, &before, state::Taken::AtRecord, after);
        if let Some(why) = state_changes {
            if !diffs.is_empty() {
                eprintln!("{ctx}: state diff not enforced ({why}):");
                for d in &diffs {
                    eprintln!("  {d}");
                }
            }
            diffs.clear();
        }
        if state::policy() == "warn" {
            state::report(&ctx, &diffs);
        }
        assert!(
            rest == "PASS\nPASS\n" && out.code() == 0,
            "{ctx}: expected the state capture, 2x PASS and exit 0 (/proc state differences: \
             {}):\n{}",
            if diffs.is_empty() {
                "none".to_owned()
            } else {
                diffs.join("; ")
            },
            out.describe()
        );
        if state::policy() != "warn" {
            state::report(&ctx, &diffs);
        }
    };
    ws.each_mode_prepared(
        name,
        STATE_CHECK_TWICE,
        |_| files.put_back(),
        |mode, out| check(&mode.to_string(), out),
    );
    for &mode in how.extra_modes {
        files.put_back();
        let out = ws.run_mode(name, mode, STATE_CHECK_TWICE);
        check(&mode.to_string(), &out);
    }
    // And handed out by `warmstart serve` from its pool of parked instances.
    if how.not_served.is_none() {
        files.put_back();
        let daemon = ws.serve(name);
        let out = ws.served(name, STATE_CHECK_TWICE);
        check("served parked", &out);
        // A template that failed an instance where a restore on its own worked is
        // dropped quietly for the next ones: never here.
        let log = daemon.stderr_so_far();
        assert!(
            !log.contains("from its template failed") && !log.contains("no template for"),
            "{name}: the template failed:\n{log}"
        );
    }
}

/// A warm run of a tool did what the cold one did: exit status, stdout, stderr (for a
/// Python traceback, its last line: the frames above the tool's own differ).
pub fn assert_same_run(ctx: &str, cold: &Out, warm: &Out) {
    assert_eq!(
        warm.code(),
        cold.code(),
        "{ctx}: exit status\n{}\n{}",
        cold.describe(),
        warm.describe()
    );
    assert_eq!(
        warm.stdout,
        cold.stdout,
        "{ctx}: stdout\n{}",
        warm.describe()
    );
    if cold.stderr.contains("Traceback") {
        // The frames above the tool's own differ (runpy's), the error does not.
        let last = |s: &str| s.trim_end().lines().last().unwrap_or("").to_owned();
        assert_eq!(last(&warm.stderr), last(&cold.stderr), "{ctx}: the error");
    } else {
        assert_eq!(warm.stderr, cold.stderr, "{ctx}: stderr");
    }
}
