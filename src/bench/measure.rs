//! One measured run: start an app cold or restored, feed it its input, time the first
//! answer, read its memory figures, and tear it down.
//!
//! The first answer is the first line on the app's stdout (the input is written at
//! start and waits in the pipe until the app reads it), or, for an HTTP app, the first
//! `GET /hit` on 127.0.0.1:PORT that returns a status line. Restored runs go through
//! `warmstart run`, exactly as a user starts them; the instance's host pid comes from the
//! monitor's registration (`warmstart ps`), or from the monitor's process tree.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Lines of a process's stderr kept for error messages.
const TAIL_LINES: usize = 12;

/// How the first answer is recognised.
#[derive(Debug, Clone)]
pub enum Probe {
    /// Write `input` to stdin at start; the first answer is the first stdout line.
    Line { input: Vec<u8> },
    /// Poll `GET /hit` on 127.0.0.1:`port` until a status line comes back.
    Http { port: u16 },
}

/// How a run starts the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Start {
    Cold,
    /// `warmstart run --eager`
    Eager,
    /// `warmstart run --no-prefetch`: pages on demand only
    Lazy,
    /// `warmstart run`: the learned working set is prefetched
    LazyWs,
    /// `warmstart run` through a `warmstart serve` daemon with a pool of parked instances
    Served,
}

impl Start {
    pub const RESTORED: [Start; 4] = [Start::Eager, Start::Lazy, Start::LazyWs, Start::Served];

    pub fn label(self) -> &'static str {
        match self {
            Start::Cold => "cold",
            Start::Eager => "eager",
            Start::Lazy => "lazy",
            Start::LazyWs => "lazy+ws",
            Start::Served => "served",
        }
    }
}

/// What the runs of one app share.
#[derive(Debug, Clone)]
pub struct Target {
    /// The warmstart binary.
    pub exe: PathBuf,
    /// The store directory.
    pub store: PathBuf,
    /// The app's command (cold) and recording.
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Snapshot name in the store.
    pub snapshot: String,
    pub probe: Probe,
    /// Longest wait for a first answer (and for a recording).
    pub timeout: Duration,
}

/// A first answer over HTTP, timed from the start of the run.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    /// Until the connection that got it was established (the port listened).
    pub connected: Duration,
    /// Until the whole answer was there.
    pub answered: Duration,
    pub body: String,
}

/// A started app, cold or restored.
pub struct Running {
    child: Child,
    start: Start,
    started: Instant,
    stdout: Option<std::process::ChildStdout>,
    /// Closing it (dropping the sender) closes the app's stdin.
    close_stdin: Option<mpsc::Sender<()>>,
    tail: Arc<Mutex<Vec<String>>>,
    /// Line apps: give them a moment to leave on EOF; servers get SIGTERM, then as long.
    wait_exit: bool,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

/// Memory of one process, from `/proc/PID/smaps_rollup`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Mem {
    pub rss: u64,
    pub pss: u64,
}

/// One run's figures.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub first_answer: Duration,
    pub mem: Option<Mem>,
}

fn keep_tail(
    r: impl Read + Send + 'static,
) -> (Arc<Mutex<Vec<String>>>, std::thread::JoinHandle<()>) {
    let tail = Arc::new(Mutex::new(Vec::new()));
    let t = tail.clone();
    let h = std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(r);
        let mut line = Vec::new();
        loop {
            line.clear();
            match std::io::BufRead::read_until(&mut r, b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let mut t = t.lock().unwrap();
                    if t.len() == TAIL_LINES {
                        t.remove(0);
                    }
                    t.push(String::from_utf8_lossy(&line).trim_end().to_owned());
                }
            }
        }
    });
    (tail, h)
}

/// The error lines of a tail: from warmstart's own `warmstart: ...` line if there is
/// one, else the last few lines.
pub fn error_text(tail: &[String]) -> String {
    if let Some(i) = tail.iter().rposition(|l| l.starts_with("warmstart: ")) {
        return tail[i..].join(" / ");
    }
    let n = tail.len();
    tail[n.saturating_sub(4)..].join(" / ")
}

impl Target {
    /// `args` go to `warmstart run` before the snapshot (restored starts only).
    fn command_for(&self, start: Start, args: &[String]) -> Command {
        let mut c = match start {
            Start::Cold => {
                let mut c = Command::new(&self.command[0]);
                c.args(&self.command[1..]);
                c
            }
            mode => {
                let mut c = Command::new(&self.exe);
                c.arg("--store").arg(&self.store).arg("run");
                match mode {
                    Start::Eager => {
                        c.args(["--no-serve", "--eager"]);
                    }
                    Start::Lazy => {
                        c.args(["--no-serve", "--no-prefetch"]);
                    }
                    Start::LazyWs => {
                        c.arg("--no-serve");
                    }
                    _ => {}
                }
                c.args(args).arg(&self.snapshot);
                c
            }
        };
        c.envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Starts one instance; its input is already on the way.
    pub fn start(&self, start: Start) -> Result<Running> {
        self.start_with(start, &[])
    }

    /// [`Target::start`] with `args` given to `warmstart run` (e.g. `--listen ADDR`);
    /// a cold start ignores them.
    pub fn start_with(&self, start: Start, args: &[String]) -> Result<Running> {
        let mut cmd = self.command_for(start, args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let (tx, rx) = mpsc::channel::<()>();
        let input = match &self.probe {
            Probe::Line { input } => input.clone(),
            Probe::Http { .. } => Vec::new(),
        };
        std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
            let _ = stdin.flush();
            // Keep stdin open until told (the app must not see EOF before we measured).
            let _ = rx.recv();
        });
        let (tail, h) = keep_tail(child.stderr.take().expect("piped stderr"));
        Ok(Running {
            stdout: child.stdout.take(),
            child,
            start,
            started,
            close_stdin: Some(tx),
            tail,
            wait_exit: matches!(self.probe, Probe::Line { .. }),
            stderr_reader: Some(h),
        })
    }

    /// One full run: start, first answer, memory, teardown.
    pub fn run_once(&self, start: Start, with_mem: bool) -> Result<Sample> {
        let mut r = self.start(start)?;
        let res: Result<Sample> = (|| {
            let first_answer = r.first_answer(&self.probe, self.timeout)?;
            let mem = if with_mem {
                r.app_pid().ok().and_then(|p| smaps_rollup(p).ok())
            } else {
                None
            };
            Ok(Sample { first_answer, mem })
        })();
        let out = r.finish();
        match res {
            Ok(s) => Ok(s),
            Err(e) => Err(match out {
                Some(tail) => anyhow!("{tail} ({e:#})"),
                None => e,
            }),
        }
    }
}

fn wait_readable(fd: i32, until: Instant) -> Result<bool> {
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms.max(1)) };
        if r > 0 {
            return Ok(true);
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e).context("poll");
            }
        }
    }
}

/// An answer to `GET /hit`.
#[derive(Debug, Clone)]
pub struct HttpReply {
    /// When the connection was established (the port listened).
    pub connected: Instant,
    pub status: String,
    pub body: String,
}

/// One `GET /hit` on 127.0.0.1:`port`, returned once the whole answer came (its
/// `Content-Length`, else up to the end of the connection: a server may close it well
/// after the answer, werkzeug's 10 ms later).
pub fn http_get(port: u16) -> Option<HttpReply> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    let connected = Instant::now();
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    s.write_all(b"GET /hit HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).unwrap_or(0);
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            });
            if n == 0 || length.is_some_and(|len| body.len() >= len) {
                if !head.starts_with("HTTP/") {
                    return None;
                }
                return Some(HttpReply {
                    connected,
                    status: head.lines().next().unwrap_or_default().to_owned(),
                    body: body.to_owned(),
                });
            }
        }
        if n == 0 {
            return None;
        }
    }
}

impl Running {
    /// Waits for the first answer; the time is from the moment the app was started.
    pub fn first_answer(&mut self, probe: &Probe, timeout: Duration) -> Result<Duration> {
        let until = self.started + timeout;
        match probe {
            Probe::Line { .. } => self.first_line_until(until, timeout).map(|(at, _)| at),
            Probe::Http { port } => self
                .first_http_answer(*port, timeout, Duration::from_millis(2))
                .map(|a| a.answered),
        }
    }

    /// Waits for the first line on the app's stdout and returns it (without its end of
    /// line); [`Running::first_answer`] with a [`Probe::Line`] times the same wait.
    pub fn first_line(&mut self, timeout: Duration) -> Result<String> {
        let until = self.started + timeout;
        self.first_line_until(until, timeout).map(|(_, l)| l)
    }

    /// The first stdout line, and when it came (since the start).
    fn first_line_until(
        &mut self,
        until: Instant,
        timeout: Duration,
    ) -> Result<(Duration, String)> {
        let out = self.stdout.as_mut().expect("stdout");
        let fd = out.as_raw_fd();
        let mut buf = [0u8; 4096];
        let mut got = Vec::new();
        loop {
            if !wait_readable(fd, until)? {
                bail!(
                    "no answer within {} s (the app never wrote a line)",
                    timeout.as_secs()
                );
            }
            let n = out.read(&mut buf).context("reading the app's stdout")?;
            if n == 0 {
                let status = self.child.wait()?;
                bail!("the app closed its stdout without answering ({status})");
            }
            got.extend_from_slice(&buf[..n]);
            if let Some(end) = got.iter().position(|&b| b == b'\n') {
                let at = self.started.elapsed();
                return Ok((at, String::from_utf8_lossy(&got[..end]).into_owned()));
            }
        }
    }

    /// Whether the process started has exited (its status; it is reaped).
    pub fn exited(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Polls `GET /hit` on 127.0.0.1:`port` until it is answered, `pause` between tries
    /// (a refused connection returns at once).
    pub fn first_http_answer(
        &mut self,
        port: u16,
        timeout: Duration,
        pause: Duration,
    ) -> Result<HttpAnswer> {
        let until = self.started + timeout;
        loop {
            if let Some(r) = http_get(port) {
                return Ok(HttpAnswer {
                    answered: self.started.elapsed(),
                    connected: r.connected.saturating_duration_since(self.started),
                    body: r.body,
                });
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("exited without answering on port {port} ({status})");
            }
            if Instant::now() >= until {
                bail!(
                    "no answer on 127.0.0.1:{port} within {} s",
                    timeout.as_secs()
                );
            }
            std::thread::sleep(pause);
        }
    }

    /// Pid of the process started (the app when cold, else `warmstart run`).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Host pid of the app: the child itself when cold; for a restored instance the pid
    /// its monitor registered for `warmstart ps`, or the deepest process under the
    /// monitor (monitor → sandbox init → app).
    pub fn app_pid(&self) -> Result<i32> {
        let me = self.child.id() as i32;
        if self.start == Start::Cold {
            return Ok(me);
        }
        let until = Instant::now() + Duration::from_secs(1);
        loop {
            if let Some(i) = crate::instances::list()
                .unwrap_or_default()
                .into_iter()
                .find(|i| i.monitor == me || i.client == Some(me))
            {
                return Ok(i.pid);
            }
            if Instant::now() >= until {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        deepest_descendant(me).ok_or_else(|| anyhow!("no process found under monitor {me}"))
    }

    /// Closes stdin, waits a little for the app to leave, then kills what is left.
    /// Returns the tail of the stderr (for error messages).
    pub fn finish(mut self) -> Option<String> {
        // Everything under the monitor (sandbox init, the app): gone before we return, so
        // the next run never meets this one (e.g. on the same port).
        let tree = crate::sys::tasks::descendants(self.child.id() as i32);
        drop(self.close_stdin.take());
        if !self.wait_exit {
            // A server does not end at EOF: stop it as a platform would, with SIGTERM
            // (relayed by a monitor, which then keeps what its first run learned).
            // SAFETY: signalling a process we started.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        }
        let until = Instant::now() + Duration::from_millis(2000);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(2)),
                _ => {
                    // A monitor takes its sandbox down with it (init's PDEATHSIG).
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        let until = Instant::now() + Duration::from_secs(2);
        for p in tree {
            // SAFETY: signalling a process we started (through the monitor).
            unsafe { libc::kill(p, libc::SIGKILL) };
            while Path::new(&format!("/proc/{p}")).exists() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        drop(self.stdout.take());
        if let Some(h) = self.stderr_reader.take() {
            let _ = h.join();
        }
        let t = self.tail.lock().unwrap();
        (!t.is_empty()).then(|| error_text(&t))
    }
}

fn deepest_descendant(pid: i32) -> Option<i32> {
    let mut best = None;
    let mut frontier = vec![pid];
    while !frontier.is_empty() {
        let next: Vec<i32> = frontier
            .iter()
            .flat_map(|&p| crate::sys::tasks::children(p))
            .collect();
        if let Some(&p) = next.first() {
            best = Some(p);
        }
        frontier = next;
    }
    best
}

/// A `warmstart serve` daemon for the store, with instances of the snapshot parked;
/// stopped (with its instances) when dropped. Its log (`-v`, stderr) is kept, to wait
/// for what it says (e.g. `parked an instance of`).
pub struct ServeDaemon {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl ServeDaemon {
    /// `serve --pool 1 --warm SNAP` for `t`'s store and snapshot.
    pub fn start(t: &Target) -> Result<ServeDaemon> {
        ServeDaemon::start_args(&t.exe, &t.store, &["--pool", "1", "--warm", &t.snapshot])
    }

    /// `EXE --store STORE -v serve ARGS`, once it listens on its socket.
    pub fn start_args(exe: &Path, store: &Path, args: &[&str]) -> Result<ServeDaemon> {
        let mut c = Command::new(exe);
        c.arg("--store")
            .arg(store)
            .args(["-v", "serve"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().context("starting warmstart serve")?;
        let err = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufRead::lines(std::io::BufReader::new(err)).map_while(|l| l.ok()) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut out = child.stdout.take().expect("piped stdout");
        // It prints its socket once it listens (and has started parking).
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while !line.ends_with(b"\n") {
            match out.read(&mut b) {
                Ok(1) => line.push(b[0]),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let err: Vec<String> = lines.iter().collect();
                    bail!(
                        "warmstart serve did not start: {}",
                        error_text(&err[err.len().saturating_sub(TAIL_LINES)..])
                    );
                }
            }
        }
        Ok(ServeDaemon {
            child,
            lines,
            log: Vec::new(),
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// How many lines of its log so far contain `pat`.
    pub fn count(&mut self, pat: &str) -> usize {
        self.log.extend(self.lines.try_iter());
        self.log.iter().filter(|l| l.contains(pat)).count()
    }

    /// Waits until `n` lines of its log (from its start) contain `pat`.
    pub fn wait_log(&mut self, pat: &str, n: usize, timeout: Duration) -> Result<()> {
        let until = Instant::now() + timeout;
        while self.count(pat) < n {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.log.push(l),
                Err(_) => bail!(
                    "warmstart serve: {} of {n} lines \"{pat}\" within {} s; its log ends: {}",
                    self.count(pat),
                    timeout.as_secs(),
                    error_text(&self.log[self.log.len().saturating_sub(TAIL_LINES)..])
                ),
            }
        }
        Ok(())
    }
}

impl Drop for ServeDaemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// A TCP port of 127.0.0.1 free a moment ago (the kernel's pick for a bind to port 0).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Rss and Pss of a process (bytes).
pub fn smaps_rollup(pid: i32) -> Result<Mem> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("reading /proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Ok(Mem {
        rss: field("Rss:").context("no Rss in smaps_rollup")?,
        pss: field("Pss:").context("no Pss in smaps_rollup")?,
    })
}

/// Starts `n` instances at once, waits for every first answer, and adds up their Pss.
pub fn concurrent_pss(t: &Target, start: Start, n: usize) -> Result<u64> {
    let mut runs = Vec::with_capacity(n);
    let mut res = Ok(0);
    for _ in 0..n {
        match t.start(start) {
            Ok(r) => runs.push(r),
            Err(e) => {
                res = Err(e);
                break;
            }
        }
    }
    if res.is_ok() {
        let mut total = 0;
        for r in &mut runs {
            if let Err(e) = r.first_answer(&t.probe, t.timeout) {
                res = Err(e);
                break;
            }
        }
        if res.is_ok() {
            for r in &runs {
                match r.app_pid().and_then(smaps_rollup) {
                    Ok(m) => total += m.pss,
                    Err(e) => {
                        res = Err(e);
                        break;
                    }
                }
            }
            res = res.map(|_| total);
        }
    }
    for r in runs {
        r.finish();
    }
    res
}

/// What recording produced.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub elapsed: Duration,
    pub id: String,
}

/// `warmstart record --name SNAP --ready READY --timeout T -- CMD`, timed.
pub fn record(t: &Target, ready: &str, prime: &[String]) -> Result<Recorded> {
    let mut c = Command::new(&t.exe);
    c.arg("--store")
        .arg(&t.store)
        .arg("record")
        .arg("--name")
        .arg(&t.snapshot)
        .arg("--ready")
        .arg(ready);
    for l in prime {
        c.arg("--prime").arg(l);
    }
    c.arg("--timeout")
        .arg(t.timeout.as_secs().max(1).to_string())
        .arg("--")
        .args(&t.command)
        .envs(t.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = c.spawn().context("starting warmstart record")?;
    let (tail, h) = keep_tail(child.stderr.take().expect("stderr"));
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .context("reading warmstart record's output")?;
    let status = child.wait()?;
    let elapsed = started.elapsed();
    let _ = h.join();
    if !status.success() {
        let tail = tail.lock().unwrap();
        let mut msg = error_text(&tail);
        if msg.is_empty() {
            msg = format!("warmstart record failed ({status})");
        }
        if elapsed >= t.timeout && msg.contains("warm point") {
            bail!("{msg} (--timeout {} s)", t.timeout.as_secs());
        }
        if elapsed >= t.timeout {
            bail!(
                "the app did not reach its warm point (--ready {ready}) within {} s: {msg}",
                t.timeout.as_secs()
            );
        }
        bail!("{msg}");
    }
    Ok(Recorded {
        elapsed,
        id: out.trim().to_owned(),
    })
}

/// Sizes of a stored snapshot (as `warmstart inspect --json` shows them).
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Sizes {
    pub logical_bytes: u64,
    pub resident_bytes: u64,
    pub zero_bytes: u64,
    pub stored_bytes: u64,
    pub shared_bytes_with_others: u64,
}

pub fn sizes(store: &Path, snapshot: &str) -> Result<Sizes> {
    let s = warmstart_snapshots::store::Store::open(store)?;
    let id = s.resolve(snapshot)?;
    let st = s.stats(&id)?;
    Ok(Sizes {
        logical_bytes: st.logical_bytes,
        resident_bytes: st.resident_pages * 4096,
        zero_bytes: st.zero_pages * 4096,
        stored_bytes: st.stored_bytes,
        shared_bytes_with_others: st.shared_with_others * 4096,
    })
}
