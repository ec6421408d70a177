//! CRIU-style use: dump a process that was started without warmstart, restore it elsewhere.

mod common;

use std::process::Command;

use common::{alive, fixture, tempdir, wait_pid_exit, KillGuard, Proc, Ws, TIMEOUT};

fn start_counter() -> Proc {
    let p = Proc::spawn(&mut Command::new(fixture("counter")));
    let ready = p.wait_stderr("ready");
    assert_eq!(ready, format!("ready {}", p.pid()));
    p
}

#[test]
fn dump_kills_and_restore_continues() {
    let ws = Ws::new();
    let mut orig = start_counter();
    orig.send("a");
    assert_eq!(orig.read_line(), "1 a");
    orig.send("b");
    assert_eq!(orig.read_line(), "2 b");

    let images = tempdir("ws-images-");
    let dir = images.path().join("img");
    let pid = orig.pid().to_string();
    let out = ws.run(&["dump", "-t", &pid, "-D", dir.to_str().unwrap()], "");
    out.assert_ok();
    // The original is killed by the dump.
    assert!(
        wait_pid_exit(orig.pid(), TIMEOUT),
        "the dumped process is still running"
    );
    let st = orig.wait();
    assert!(
        !st.success(),
        "the original should have been killed, not exit normally: {st:?}"
    );

    let mut restored = Proc::spawn(&mut ws.cmd(&["restore", "-D", dir.to_str().unwrap()]));
    restored.send("c");
    assert_eq!(restored.read_line(), "3 c");
    restored.send("d");
    assert_eq!(restored.read_line(), "4 d");
    restored.close_stdin();
    let st = restored.wait();
    assert!(
        st.success(),
        "restored counter should exit 0 at EOF: {st:?}"
    );
}

#[test]
fn dump_leave_running() {
    let ws = Ws::new();
    let mut orig = start_counter();
    orig.send("a");
    assert_eq!(orig.read_line(), "1 a");
    let images = tempdir("ws-images-");
    let dir = images.path().join("img");
    let pid = orig.pid().to_string();
    ws.run(
        &[
            "dump",
            "-t",
            &pid,
            "-D",
            dir.to_str().unwrap(),
            "--leave-running",
        ],
        "",
    )
    .assert_ok();

    // The original keeps going...
    assert!(alive(orig.pid()), "--leave-running killed the process");
    orig.send("b");
    assert_eq!(orig.read_line(), "2 b");
    // ...and the copy continues from the dump point.
    let mut copy = Proc::spawn(&mut ws.cmd(&["restore", "-D", dir.to_str().unwrap()]));
    copy.send("x");
    assert_eq!(copy.read_line(), "2 x");
    orig.send("c");
    assert_eq!(orig.read_line(), "3 c");
    copy.close_stdin();
    assert!(copy.wait().success());
    orig.close_stdin();
    assert!(orig.wait().success());
}

/// A counter that answered "a", dumped with `dump -t PID -D DIR` (it exits): the image
/// directory (and the temporary directory holding it).
fn dumped_counter(ws: &Ws) -> (tempfile::TempDir, std::path::PathBuf) {
    let mut orig = start_counter();
    orig.send("a");
    assert_eq!(orig.read_line(), "1 a");
    let images = tempdir("ws-images-");
    let dir = images.path().join("img");
    let pid = orig.pid().to_string();
    ws.run(&["dump", "-t", &pid, "-D", dir.to_str().unwrap()], "")
        .assert_ok();
    orig.wait();
    (images, dir)
}

#[test]
fn restore_detached() {
    let ws = Ws::new();
    let (_images, dir) = dumped_counter(&ws);

    let mut guard = KillGuard::new();
    let mut r = Proc::spawn(&mut ws.cmd(&["restore", "-D", dir.to_str().unwrap(), "-d"]));
    let first = r.read_line();
    let pid: i32 = first
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("restore -d should print a pid, printed {first:?}"));
    guard.add(pid);
    // It returns at once, leaving the instance running.
    let st = r.wait();
    assert!(st.success(), "restore -d failed: {st:?}");
    assert!(alive(pid), "the detached instance {pid} is not running");
    // The instance has the restorer's stdio: our pipes.
    r.send("b");
    assert_eq!(r.read_line(), "2 b");
    drop(guard);
    assert!(!alive(pid), "the instance survived the guard");
}

/// `ps` shows an instance restored from an image directory with a NAME (the directory)
/// and a COMMAND (the dumped process's command line).
#[test]
fn ps_names_a_restore_from_an_image_directory() {
    let ws = Ws::new();
    let (_images, dir) = dumped_counter(&ws);

    let rt = tempdir("ws-rt-");
    let mut copy = Proc::spawn(
        ws.cmd(&["restore", "-D", dir.to_str().unwrap()])
            .env("XDG_RUNTIME_DIR", rt.path()),
    );
    copy.send("b");
    assert_eq!(copy.read_line(), "2 b");
    let list = ws.ps_json(rt.path());
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["names"][0], dir.to_str().unwrap(), "{list:?}");
    let command = list[0]["command"].to_string();
    assert!(command.contains("counter"), "{list:?}");
    let out = common::run_with(
        ws.cmd(&["ps"]).env("XDG_RUNTIME_DIR", rt.path()),
        b"",
        common::TIMEOUT,
    );
    let row = out.stdout.lines().nth(1).unwrap_or_default().to_owned();
    assert!(
        row.contains(dir.to_str().unwrap()) && row.contains("counter"),
        "{}",
        out.describe()
    );
    copy.close_stdin();
    assert!(copy.wait().success());
}

/// Reads one line from the FIFO `f` (held open O_RDWR by the test), waiting at most
/// TIMEOUT for it.
fn fifo_line(f: &std::fs::File) -> String {
    use std::os::fd::AsRawFd;
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut got = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(
            !left.is_zero(),
            "no line on the FIFO within {TIMEOUT:?}: {got:?}"
        );
        let mut pfd = libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n <= 0 {
            continue;
        }
        let mut b = [0u8; 1];
        // SAFETY: reads one byte into a live one-byte buffer.
        let r = unsafe { libc::read(f.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
        assert_eq!(
            r,
            1,
            "reading the FIFO: {}",
            std::io::Error::last_os_error()
        );
        if b[0] == b'\n' {
            return String::from_utf8_lossy(&got).into_owned();
        }
        got.push(b[0]);
    }
}

/// A process whose stdin and stdout are named FIFOs (a daemon fed through paths) is
/// restored on the same FIFOs, as CRIU does, not on the restorer's stdio.
#[test]
fn stdio_on_named_fifos_is_reopened() {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let ws = Ws::new();
    let dir = tempdir("ws-fifo-");
    let (inp, outp) = (dir.path().join("in"), dir.path().join("out"));
    for p in [&inp, &outp] {
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path that lives for the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }
    // Held open read-write by the test: neither end ever sees its peer go away.
    let rw = |p: &std::path::Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(p)
            .unwrap()
    };
    let (mut to_app, from_app) = (rw(&inp), rw(&outp));
    let mut guard = KillGuard::new();
    let mut orig = Command::new(fixture("counter"))
        .stdin(std::fs::File::open(&inp).unwrap())
        .stdout(std::fs::OpenOptions::new().write(true).open(&outp).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    guard.add(orig.id() as i32);
    to_app.write_all(b"a\n").unwrap();
    assert_eq!(fifo_line(&from_app), "1 a");

    let images = tempdir("ws-images-");
    let img = images.path().join("img");
    let pid = orig.id().to_string();
    let inspect = ws.run(&["dump", "-t", &pid, "-D", img.to_str().unwrap()], "");
    inspect.assert_ok();
    let _ = orig.wait();

    // The restorer's own stdio is /dev/null and a pipe: the app must not get them.
    let out = ws.run(&["restore", "-D", img.to_str().unwrap(), "-d"], "");
    out.assert_ok();
    let rpid: i32 = out
        .stdout
        .split_whitespace()
        .last()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("restore -d printed no pid: {}", out.describe()));
    guard.add(rpid);
    for (fd, path) in [(0, &inp), (1, &outp)] {
        let link = std::fs::read_link(format!("/proc/{rpid}/fd/{fd}")).unwrap();
        assert_eq!(&link, path, "fd {fd} of the restored process");
    }
    let flags = std::fs::read_to_string(format!("/proc/{rpid}/fdinfo/0")).unwrap();
    let acc = flags
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .map(|f| u32::from_str_radix(f.trim(), 8).unwrap() & libc::O_ACCMODE as u32);
    assert_eq!(
        acc,
        Some(libc::O_RDONLY as u32),
        "stdin's access mode: {flags}"
    );
    to_app.write_all(b"b\n").unwrap();
    assert_eq!(fifo_line(&from_app), "2 b");
    to_app.write_all(b"c\n").unwrap();
    assert_eq!(fifo_line(&from_app), "3 c");
    assert!(alive(rpid));
}
