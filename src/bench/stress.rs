//! Restores under concurrency, counting hangs (issue 14: a child of a raw `clone3` that
//! inherits a lock another thread held never finishes; see `warmstart_launcher::forksafe`).
//!
//! * [`serve_bursts`]: a `serve --warm SNAP` daemon and bursts of concurrent `run SNAP`
//!   through it (parked instances, restores on request, parkers refilling the pool: all
//!   at once in the daemon's threads).
//! * [`threaded_restores`]: restores from many threads of this process while other
//!   threads allocate and free as fast as they can.
//!
//! Every wait has a deadline: a hang is counted (and its processes killed), never waited
//! out. `tests/forksafe.rs` runs a short form, `benches/forksafe.rs` a long one.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use warmstart_snapshots::store::Snapshot;

use crate::restore::RestoreOptions;
use crate::sys::{pidfd, remote};

/// The input line instance `i` gets.
fn input(i: usize) -> String {
    format!("x{i}\n")
}

/// Whether `out` answers [`input`]`(i)`: one line that holds `x{i}` as a word
/// (`py_echo.py` and the `counter` fixture say `1 x{i}`, `py_boto3.py` a JSON object).
fn answers(out: &str, i: usize) -> bool {
    let word = format!("x{i}");
    out.lines().count() == 1
        && out
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(|w| w == word)
}

/// What a stress run saw.
#[derive(Debug, Default)]
pub struct Tally {
    /// Instances that answered as expected, and how long each took (start to exit).
    pub ok: Vec<Duration>,
    /// Instances that did not finish by the deadline: what was known of each.
    pub hung: Vec<String>,
    /// Instances that finished wrongly.
    pub failed: Vec<String>,
    /// Processes left behind once everything was stopped.
    pub leaked: Vec<i32>,
}

impl Tally {
    pub fn clean(&self) -> bool {
        self.hung.is_empty() && self.failed.is_empty() && self.leaked.is_empty()
    }

    /// One line of figures, then the first problems.
    pub fn describe(&self) -> String {
        let mut ok = self.ok.clone();
        ok.sort();
        let ms = |d: Option<&Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
        let mut s = format!(
            "{} ok (median {:.1} ms, max {:.1} ms), {} hung, {} failed, {} leaked",
            ok.len(),
            ms(ok.get(ok.len() / 2)),
            ms(ok.last()),
            self.hung.len(),
            self.failed.len(),
            self.leaked.len()
        );
        for p in self.hung.iter().chain(&self.failed).take(5) {
            s.push_str("\n  ");
            s.push_str(p);
        }
        if !self.leaked.is_empty() {
            s.push_str(&format!("\n  leaked pids: {:?}", self.leaked));
        }
        s
    }
}

/// Waits until every pidfd in `fds` is readable (its process exited) or `deadline`;
/// returns when each was seen to exit (`None`: still running).
fn wait_exits(fds: &[OwnedFd], deadline: Instant) -> Vec<Option<Instant>> {
    let mut done = vec![None; fds.len()];
    loop {
        let mut pfds: Vec<libc::pollfd> = fds
            .iter()
            .zip(&done)
            .map(|(f, d)| libc::pollfd {
                fd: if d.is_some() { -1 } else { f.as_raw_fd() },
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        if done.iter().all(Option::is_some) {
            return done;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return done;
        }
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfds.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return done;
        }
        let now = Instant::now();
        for (d, p) in done.iter_mut().zip(&pfds) {
            if p.revents != 0 && d.is_none() {
                *d = Some(now);
            }
        }
    }
}

/// Waits (up to `deadline`) for `pids` to be gone; those still there.
fn wait_gone(pids: &[i32], deadline: Instant) -> Vec<i32> {
    let (pids, fds): (Vec<i32>, Vec<OwnedFd>) = pids
        .iter()
        .filter_map(|&p| Some((p, pidfd::pidfd_open(p, 0).ok()?)))
        .unzip();
    let done = wait_exits(&fds, deadline);
    pids.into_iter()
        .zip(done)
        .filter(|(_, d)| d.is_none())
        .map(|(p, _)| p)
        .collect()
}

/// Kills `pids` and waits (up to `deadline`) for them to be gone; those still there.
fn kill_and_wait(pids: &[i32], deadline: Instant) -> Vec<i32> {
    for &p in pids {
        // SAFETY: a plain signal (a pid reused meanwhile is a risk the caller takes for
        // processes it just saw as its descendants).
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    wait_gone(pids, deadline)
}

/// Reads what `fd` holds now (non-blocking, to EOF or to the first empty read).
fn read_available(fd: &OwnedFd) -> String {
    // SAFETY: flags of a descriptor we own.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    let mut out = Vec::new();
    let _ = std::fs::File::from(fd.try_clone().expect("dup")).read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// A running `serve` daemon, killed (with what it started) when dropped.
struct Daemon {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Daemon {
    fn start(exe: &Path, store: &Path, snap: &str, deadline: Instant) -> Result<Daemon> {
        let mut child = Command::new(exe)
            .env("WARMSTART_STORE", store)
            .args(["-v", "serve", "--warm", snap])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .context("starting the serve daemon")?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let mut out = child.stdout.take().expect("piped");
        std::thread::spawn(move || {
            let mut line = [0u8; 256];
            let n = out.read(&mut line).unwrap_or(0);
            let _ = tx.send(String::from_utf8_lossy(&line[..n]).into_owned());
            // Keep reading: the daemon must never block on a full pipe.
            let _ = std::io::copy(&mut out, &mut std::io::sink());
        });
        let mut err = child.stderr.take().expect("piped");
        let log = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = err.read(&mut buf) {
                log.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let d = Daemon { child, stderr };
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with("serving ") => Ok(d),
            other => bail!(
                "the daemon did not start ({other:?}); stderr:\n{}",
                d.stderr()
            ),
        }
    }

    fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops the daemon (SIGTERM: its instances end with it); the processes it leaves.
    fn stop(mut self, deadline: Instant) -> Vec<i32> {
        let pid = self.child.id() as i32;
        let under = crate::sys::tasks::descendants(pid);
        // SAFETY: our child, not reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let fd = pidfd::pidfd_open(pid, 0).ok();
        let exited = fd.is_some_and(|fd| wait_exits(&[fd], deadline)[0].is_some());
        if !exited {
            // SAFETY: our child, not reaped yet.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = self.child.wait();
        let leaked = wait_gone(&under, deadline);
        kill_and_wait(&leaked, deadline + Duration::from_secs(5));
        leaked
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: its process group (it was started in a group of its own).
            unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// `bursts` bursts of `burst` concurrent `run SNAP` answered by a `serve --warm SNAP`
/// daemon on the store `store` (`exe`: the warmstart binary). `SNAP` answers a line
/// `x{i}` with one line holding it ([`answers`]) and has a learned working set. Each
/// burst has `deadline` to finish.
pub fn serve_bursts(
    exe: &Path,
    store: &Path,
    snap: &str,
    bursts: usize,
    burst: usize,
    deadline: Duration,
) -> Result<Tally> {
    let mut tally = Tally::default();
    let daemon = Daemon::start(exe, store, snap, Instant::now() + deadline)?;
    for b in 0..bursts {
        let start = Instant::now();
        let mut clients = Vec::new();
        for i in 0..burst {
            // Pipes read only once `run` has exited, without waiting for EOF: `run`
            // hands its stdio to the daemon, whose instance may still hold them.
            let (stdout_r, stdout_w) = remote::pipe().context("pipe2")?;
            let (stderr_r, stderr_w) = remote::pipe().context("pipe2")?;
            let mut child = Command::new(exe)
                .env("WARMSTART_STORE", store)
                .args(["run", snap])
                .stdin(Stdio::piped())
                .stdout(stdout_w)
                .stderr(stderr_w)
                .process_group(0)
                .spawn()
                .context("starting `run`")?;
            let _ = child
                .stdin
                .take()
                .expect("piped")
                .write_all(input(i).as_bytes());
            let fd = pidfd::pidfd_open(child.id() as i32, 0).context("pidfd_open")?;
            clients.push((i, child, fd, stdout_r, stderr_r));
        }
        let fds: Vec<OwnedFd> = clients
            .iter()
            .map(|c| c.2.try_clone())
            .collect::<std::io::Result<_>>()?;
        let done = wait_exits(&fds, start + deadline);
        for ((i, mut child, _, out, err), exited) in clients.into_iter().zip(done) {
            let what = format!("burst {b}, run {i}");
            let Some(exited) = exited else {
                // SAFETY: its process group (started in a group of its own).
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                tally
                    .hung
                    .push(format!("{what}: no exit within {deadline:?}"));
                continue;
            };
            let status = child.wait().context("wait")?;
            let err = read_available(&err);
            let got = read_available(&out);
            if status.success() && answers(&got, i) {
                tally.ok.push(exited - start);
            } else {
                tally.failed.push(format!(
                    "{what}: {status}, stdout {got:?}, stderr {:?}",
                    err.trim()
                ));
            }
        }
        if !tally.hung.is_empty() {
            // Enough to know; the next bursts would only add their deadlines.
            tally
                .failed
                .push(format!("daemon stderr:\n{}", daemon.stderr()));
            break;
        }
    }
    tally.leaked = daemon.stop(Instant::now() + deadline);
    Ok(tally)
}

/// `threads` threads each restoring `snap` `per_thread` times in this process (lazily,
/// with its working set and the page-table check, as `serve` does), while `allocators`
/// threads allocate and free blocks of all sizes. `snap` answers as for
/// [`serve_bursts`].
/// All of them have `deadline` to answer and exit.
pub fn threaded_restores(
    snap: &Arc<Snapshot>,
    threads: usize,
    per_thread: usize,
    allocators: usize,
    deadline: Duration,
) -> Tally {
    let stop = Arc::new(AtomicBool::new(false));
    let churn: Vec<_> = (0..allocators)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || allocate_until(&stop, t))
        })
        .collect();
    let overall = Instant::now() + deadline;
    let (tx, rx) = mpsc::channel::<(usize, Result<Duration>)>();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (snap, tx) = (snap.clone(), tx.clone());
            std::thread::spawn(move || {
                for i in 0..per_thread {
                    let n = t * per_thread + i;
                    let r = restore_once(&snap, n, overall);
                    if tx.send((n, r)).is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    drop(tx);
    let mut tally = Tally::default();
    let total = threads * per_thread;
    let mut seen = 0;
    while seen < total {
        let left = overall.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((n, r)) => {
                seen += 1;
                match r {
                    Ok(d) => tally.ok.push(d),
                    Err(e) => tally.failed.push(format!("restore {n}: {e:#}")),
                }
            }
            Err(_) => break,
        }
    }
    if seen < total {
        // Stuck restores: their threads wait for a child that never reports. Killing the
        // sandboxes those threads started lets them see the end and return.
        tally.hung.push(format!(
            "{} of {total} restores did not finish within {deadline:?}",
            total - seen
        ));
        let stuck: Vec<i32> = std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|t| {
                std::fs::read_to_string(t.path().join("children"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|c| c.parse::<i32>().ok())
                    .collect::<Vec<_>>()
            })
            .filter(|&p| is_sandbox_init(p))
            .collect();
        tally.leaked = kill_and_wait(&stuck, Instant::now() + Duration::from_secs(10));
    }
    stop.store(true, Ordering::Relaxed);
    for c in churn {
        let _ = c.join();
    }
    if seen == total {
        for w in workers {
            let _ = w.join();
        }
    }
    tally
}

/// Whether `pid` is the pid 1 of a pid namespace of its own (a sandbox's init).
fn is_sandbox_init(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .is_some_and(|v| v.split_whitespace().last() == Some("1"))
}

/// Allocates and frees blocks of varied sizes (some above glibc's mmap threshold) until
/// `stop`, keeping a few alive so that frees and allocations interleave.
fn allocate_until(stop: &AtomicBool, seed: usize) {
    let mut live: Vec<Vec<u8>> = Vec::with_capacity(64);
    let mut x = seed as u64 * 0x9e37_79b9_7f4a_7c15 + 1;
    while !stop.load(Ordering::Relaxed) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let size = match x % 16 {
            0 => 256 << 10,
            1..=4 => (x as usize >> 8) % 65536,
            _ => (x as usize >> 8) % 512 + 1,
        };
        let mut v = vec![0u8; size];
        if let Some(b) = v.first_mut() {
            *b = x as u8;
        }
        if live.len() == live.capacity() {
            live.swap_remove((x as usize >> 20) % live.len());
        }
        live.push(v);
    }
}

/// One restore of `snap` in this thread: input `x{n}`, answer and exit awaited until
/// `deadline`.
fn restore_once(snap: &Arc<Snapshot>, n: usize, deadline: Instant) -> Result<Duration> {
    let start = Instant::now();
    let (in_r, in_w) = remote::pipe().context("pipe2")?;
    let (out_r, out_w) = remote::pipe().context("pipe2")?;
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .context("/dev/null")?;
    std::fs::File::from(in_w)
        .write_all(input(n).as_bytes())
        .context("writing the input")?;
    let opts = RestoreOptions {
        lazy: true,
        prefetch: snap.working_sets(),
        learn: false,
        verify_table: true,
        stdio: Some([in_r.as_raw_fd(), out_w.as_raw_fd(), null.as_raw_fd()]),
        interrupt: None,
        listeners: Vec::new(),
        tool_request: None,
        template: None,
        cgroups: None,
        tcp_established: false,
        veths: Vec::new(),
    };
    let restored = crate::restore::restore(snap, &opts)?;
    drop((in_r, out_w, null));
    let got = read_until_eof(&out_r, deadline);
    let left = deadline.saturating_duration_since(Instant::now());
    let code = match restored.sandbox.wait_timeout(left)? {
        Some(c) => c,
        None => {
            let _ = restored.sandbox.kill();
            bail!("instance {n} did not exit by the deadline (stdout {got:?})");
        }
    };
    let (code, _) = restored.finish(code)?;
    if code != 0 || !answers(&got, n) {
        bail!("instance {n}: exit code {code}, stdout {got:?}, expected an answer to x{n}");
    }
    Ok(start.elapsed())
}

/// Reads `fd` to EOF or until `deadline`.
fn read_until_eof(fd: &OwnedFd, deadline: Instant) -> String {
    let mut out = Vec::new();
    let raw: RawFd = fd.as_fd().as_raw_fd();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let mut p = libc::pollfd {
            fd: raw,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut p, 1, ms) } <= 0 {
            continue;
        }
        let mut buf = [0u8; 4096];
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::read(raw, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
    String::from_utf8_lossy(&out).into_owned()
}
