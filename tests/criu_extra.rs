//! More CRIU-compatible operation: dumping a process whose memory is shared copy-on-write
//! with its parent (without breaking the sharing), `restore -d` with `ps`, `--display-stats`,
//! and `dump --leave-stopped`.

mod acc_util;
mod common;

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use acc_util::{instances_of, proc_state, signal, InstanceGuard};
use common::{alive, fixture, wait_pid_exit, KillGuard, Proc, Ws, TIMEOUT};

const PAGE: u64 = 4096;
const AREA_PAGES: usize = (8 << 20) / PAGE as usize;

/// `/proc/PID/pagemap` entries for `pages` pages from `addr`.
fn pagemap(pid: i32, addr: u64, pages: usize) -> Vec<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(format!("/proc/{pid}/pagemap"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/pagemap: {e}"));
    f.seek(SeekFrom::Start(addr / PAGE * 8)).unwrap();
    let mut buf = vec![0u8; pages * 8];
    f.read_exact(&mut buf).unwrap();
    buf.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Indexes of pages that are present (bit 63) and not exclusively mapped (bit 56 clear).
fn shared_pages(entries: &[u64]) -> Vec<usize> {
    entries
        .iter()
        .enumerate()
        .filter(|(_, &e)| e >> 63 & 1 == 1 && e >> 56 & 1 == 0)
        .map(|(i, _)| i)
        .collect()
}

/// Lines matching "PHASE  N.NNN ms" in `--display-stats` output.
fn phase_lines(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() >= 3
                && w[w.len() - 1] == "ms"
                && w[w.len() - 2].parse::<f64>().is_ok()
                && w[0].chars().all(|c| c.is_ascii_alphabetic() || c == '-')
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn dump_child_keeps_cow_sharing() {
    let ws = Ws::new();
    // Parent and child are in the fixture's own process group: dropping `p` kills both.
    let mut p = Proc::spawn(&mut Command::new(fixture("cow_fork")));
    let line = p.wait_stderr("child ");
    let w: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(w.len(), 4, "unexpected fixture line {line:?}");
    let child: i32 = w[1].parse().unwrap();
    let addr = u64::from_str_radix(w[2], 16).unwrap();
    let sum = w[3].to_owned();
    let mut guard = KillGuard::new();
    guard.add(child);

    let before = pagemap(child, addr, AREA_PAGES);
    let shared_before = shared_pages(&before);
    assert_eq!(
        shared_before.len(),
        AREA_PAGES,
        "setup: every page of the child's 8 MiB should be present and shared with the parent"
    );

    let out = ws.run(
        &[
            "dump",
            "-t",
            &child.to_string(),
            "--name",
            "cow",
            "--leave-running",
        ],
        "",
    );
    out.assert_ok();
    assert!(alive(child), "--leave-running killed the child");
    assert!(alive(p.pid()), "the dump killed the parent");

    let after = pagemap(child, addr, AREA_PAGES);
    let shared_after = shared_pages(&after);
    let broken: Vec<usize> = shared_before
        .iter()
        .filter(|i| !shared_after.contains(i))
        .copied()
        .collect();
    assert!(
        broken.is_empty() && shared_after.len() == shared_before.len(),
        "the dump broke copy-on-write sharing of {} of {} pages (first: {:?}); \
         exclusive bits differ after `dump --leave-running`",
        broken.len(),
        shared_before.len(),
        &broken[..broken.len().min(8)]
    );

    // The child still answers, with its memory intact.
    p.send("a");
    assert_eq!(p.read_line(), format!("1 a {sum}"));
    p.send("b");
    assert_eq!(p.read_line(), format!("2 b {sum}"));
    // And a restored copy has the same memory.
    let restored = ws.run(&["run", "cow"], "x\n");
    assert!(
        restored.success() && restored.stdout == format!("1 x {sum}\n"),
        "restored copy of the CoW child is wrong:\n{}",
        restored.describe()
    );
    drop(guard);
    drop(p);
}

#[test]
fn restore_detached_listed_by_ps() {
    let ws = Ws::new();
    let id = ws.record("counter", &[fixture("counter")]);
    let _iguard = InstanceGuard {
        ws: &ws,
        id: id.clone(),
    };
    let mut guard = KillGuard::new();
    let t = Instant::now();
    // stdin is a pipe we keep open: the instance blocks on it and outlives `restore -d`.
    let mut r = Proc::spawn(&mut ws.cmd(&["restore", "-d", "counter"]));
    let first = r.read_line();
    let pid: i32 = first
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("restore -d should print a pid, printed {first:?}"));
    guard.add(pid);
    let st = r.wait();
    let took = t.elapsed();
    assert!(st.success(), "restore -d failed: {st:?}");
    assert!(
        alive(pid),
        "the detached instance {pid} is not running after restore -d returned"
    );
    assert!(
        took < Duration::from_secs(20),
        "restore -d took {took:?} to return"
    );
    let listed = instances_of(&ws, &id);
    assert!(
        listed.iter().any(|i| i["pid"].as_i64() == Some(pid as i64)
            && i["snapshot"].as_str().is_some_and(|s| s.starts_with(&id))),
        "`ps --json` should list pid {pid} with snapshot {id}: {listed:?}"
    );
    let table = ws.run(&["ps"], "");
    table.assert_ok();
    assert!(
        table
            .stdout
            .lines()
            .any(|l| l.contains(&pid.to_string()) && l.contains(&id)),
        "`ps` should show {pid} and {id}:\n{}",
        table.describe()
    );
    for i in &listed {
        if let Some(m) = i["monitor"].as_i64() {
            guard.add(m as i32);
        }
    }
    r.send("a");
    assert_eq!(r.read_line(), "1 a");
    r.send("b");
    assert_eq!(r.read_line(), "2 b");
    signal(pid, libc::SIGKILL);
    assert!(
        wait_pid_exit(pid, TIMEOUT),
        "instance {pid} survived SIGKILL"
    );
    let deadline = Instant::now() + TIMEOUT;
    while !instances_of(&ws, &id).is_empty() {
        assert!(
            Instant::now() < deadline,
            "ps still lists the killed instance: {:?}",
            instances_of(&ws, &id)
        );
        for i in instances_of(&ws, &id) {
            if let Some(m) = i["monitor"].as_i64() {
                wait_pid_exit(m as i32, Duration::from_secs(1));
            }
        }
    }
}

#[test]
fn display_stats_on_dump_and_run() {
    let ws = Ws::new();
    let mut p = Proc::spawn(&mut Command::new(fixture("counter")));
    p.wait_stderr("ready");
    p.send("a");
    assert_eq!(p.read_line(), "1 a");
    let out = ws.run(
        &[
            "dump",
            "-t",
            &p.pid().to_string(),
            "--name",
            "c",
            "--display-stats",
        ],
        "",
    );
    out.assert_ok();
    let phases = phase_lines(&out.stderr);
    assert!(
        phases.len() >= 3 && phases.iter().any(|l| l.contains("total")),
        "dump --display-stats should print phase names with ms times on stderr:\n{}",
        out.describe()
    );
    p.wait();
    let out = ws.run(&["run", "--display-stats", "c"], "b\n");
    assert!(
        out.success() && out.stdout == "2 b\n",
        "run --display-stats: wrong answer:\n{}",
        out.describe()
    );
    let phases = phase_lines(&out.stderr);
    assert!(
        phases.len() >= 3 && phases.iter().any(|l| l.contains("total")),
        "run --display-stats should print phase names with ms times on stderr:\n{}",
        out.describe()
    );
}

#[test]
fn dump_leave_stopped() {
    let ws = Ws::new();
    let mut p = Proc::spawn(&mut Command::new(fixture("counter")));
    p.wait_stderr("ready");
    p.send("a");
    assert_eq!(p.read_line(), "1 a");
    let pid = p.pid();
    ws.run(&["dump", "-t", &pid.to_string(), "--name", "c", "-s"], "")
        .assert_ok();
    assert!(alive(pid), "--leave-stopped killed the process");
    let state = proc_state(pid);
    assert_eq!(
        state, 'T',
        "after dump -s, /proc/{pid}/stat should say T (stopped), says {state}"
    );
    signal(pid, libc::SIGCONT);
    p.send("b");
    assert_eq!(p.read_line(), "2 b");
    p.close_stdin();
    assert!(p.wait().success(), "the counter should exit 0 at EOF");
}

/// A pty pair: (master, slave).
fn openpty() -> (std::fs::File, std::fs::File) {
    let (mut m, mut s) = (0, 0);
    // SAFETY: `m` and `s` are live c_ints openpty writes the two fds into; the name,
    // termios and winsize pointers may be null (none wanted).
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // Children get the slave only through their stdio.
    for fd in [m, s] {
        // SAFETY: F_SETFD takes an integer flag argument; `fd` is open (openpty succeeded).
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    use std::os::fd::FromRawFd;
    // SAFETY: openpty succeeded, so `m` and `s` are fresh descriptors nothing else owns;
    // each is wrapped exactly once.
    unsafe { (std::fs::File::from_raw_fd(m), std::fs::File::from_raw_fd(s)) }
}

/// Reads the pty master until its output contains `needle` (panics after `TIMEOUT`).
fn read_until(master: &mut std::fs::File, needle: &str, seen: &mut String) {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + TIMEOUT;
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "no {needle:?} on the terminal; it showed {seen:?}"
        );
        let mut p = libc::pollfd {
            fd: master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is one live, initialised pollfd; the kernel writes only its revents.
        if unsafe { libc::poll(&mut p, 1, left.as_millis().min(1000) as i32) } > 0 {
            let mut buf = [0u8; 4096];
            match master.read(&mut buf) {
                Ok(n) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                r => panic!("terminal closed ({r:?}) before {needle:?}; it showed {seen:?}"),
            }
        }
    }
}

/// A job of an interactive shell (stdio on a terminal): `dump -t` refuses it without
/// `--shell-job`, naming the terminal, and leaves it running; with `--shell-job` it is
/// dumped, and `restore --shell-job` from another terminal gives it that terminal: it
/// reads what is typed there and answers there.
#[test]
fn shell_job_gets_the_restorers_terminal() {
    use std::io::Write;
    let ws = Ws::new();
    let (mut m1, s1) = openpty();
    let mut guard = KillGuard::new();
    let mut job = Command::new("/bin/sh")
        .args(["-c", "echo ready; while read l; do echo \"got $l\"; done"])
        .stdin(s1.try_clone().unwrap())
        .stdout(s1.try_clone().unwrap())
        .stderr(s1)
        .process_group(0)
        .spawn()
        .expect("sh");
    let pid = job.id() as i32;
    guard.add(pid);
    let mut seen = String::new();
    read_until(&mut m1, "ready", &mut seen);

    let dir = tempfile::tempdir().unwrap();
    let refused = ws.run(
        &[
            "dump",
            "-t",
            &pid.to_string(),
            "-D",
            &dir.path().to_string_lossy(),
        ],
        "",
    );
    assert!(
        !refused.success()
            && refused.stderr.contains("terminal /dev/pts/")
            && refused.stderr.contains("--shell-job"),
        "dump of a terminal job without --shell-job should be refused naming the terminal:\n{}",
        refused.describe()
    );
    assert!(alive(pid), "a refused dump must leave the job running");
    m1.write_all(b"before\n").unwrap();
    read_until(&mut m1, "got before", &mut seen);

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_string_lossy().into_owned();
    let out = ws.run(
        &["dump", "-t", &pid.to_string(), "-D", &d, "--shell-job"],
        "",
    );
    out.assert_ok();
    assert!(wait_pid_exit(pid, TIMEOUT), "the dumped job should be gone");
    let _ = job.wait();

    let (mut m2, s2) = openpty();
    let mut restore = ws
        .cmd(&["restore", "-D", &d, "--shell-job"])
        .stdin(s2.try_clone().unwrap())
        .stdout(s2.try_clone().unwrap())
        .stderr(s2)
        .process_group(0)
        .spawn()
        .expect("warmstart restore");
    guard.add(restore.id() as i32);
    let mut seen2 = String::new();
    m2.write_all(b"after\n").unwrap();
    read_until(&mut m2, "got after", &mut seen2);
    // Hanging up the terminal ends the job (its read fails) and the restore with it.
    drop(m2);
    assert!(
        wait_pid_exit(restore.id() as i32, TIMEOUT),
        "restore did not end after the terminal hung up"
    );
    let _ = restore.wait();
}

/// "LINE born=B done=D" from the thread_churn fixture: (B, D), after checking the line.
fn churn_counts(line: &str, tag: &str) -> (i64, i64) {
    let w: Vec<&str> = line.split_whitespace().collect();
    let num = |s: &str, key: &str| s.strip_prefix(key).and_then(|v| v.parse::<i64>().ok());
    match w[..] {
        [t, b, d] if t == tag => match (num(b, "born="), num(d, "done=")) {
            (Some(b), Some(d)) => (b, d),
            _ => panic!("bad answer {line:?}"),
        },
        _ => panic!("expected \"{tag} born=B done=D\", got {line:?}"),
    }
}

/// Threads born and exiting all the time while they are dumped: five `dump -R` in a row
/// each succeed and leave the process churning; then a dump and a restore, eager and
/// lazy, whose spawner and workers go on (the counters continue from the dumped values).
#[test]
fn threads_born_and_exiting_while_dumped() {
    let ws = Ws::new();
    let mut p = Proc::spawn(&mut Command::new(fixture("thread_churn")));
    p.wait_stderr("ready");
    let pid = p.pid().to_string();
    let mut last = 0;
    for i in 0..5 {
        let out = ws.run(&["dump", "-t", &pid, "-R", "--name", &format!("c{i}")], "");
        out.assert_ok();
        p.send(&format!("r{i}"));
        let (_, done) = churn_counts(&p.read_line(), &format!("r{i}"));
        assert!(done > last, "the churn should go on after dump -R #{i}");
        last = done;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("img");
    let d = d.to_str().unwrap();
    ws.run(&["dump", "-t", &pid, "-D", d], "").assert_ok();
    assert!(
        wait_pid_exit(p.pid(), TIMEOUT),
        "the dumped process is still running"
    );
    let _ = p.wait();
    for extra in [&[][..], &["--lazy"][..]] {
        let mut args = vec!["restore", "-D", d];
        args.extend_from_slice(extra);
        let mut r = Proc::spawn(&mut ws.cmd(&args));
        r.send("x");
        let (born, done) = churn_counts(&r.read_line(), "x");
        assert!(
            done > last && born >= last,
            "restore {extra:?}: counters should continue from the dumped {last}: born={born} done={done}"
        );
        r.close_stdin();
        let st = r.wait();
        assert!(
            st.success(),
            "restore {extra:?} should exit 0 at EOF: {st:?}"
        );
    }
}
