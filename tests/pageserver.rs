//! `warmstart page-server`, `run --page-server` and `dump --page-server`: on loopback and
//! between two network namespaces joined by a veth pair.

mod common;

use std::process::Command;

use common::{cold, fixture, wait_pid_exit, Proc, Ws, TIMEOUT};

/// Input for the fixture and what it answers.
const INPUT: &str = "a\nb\nsum\n";

fn expected() -> String {
    let out = cold(&[fixture("pscounter")], INPUT);
    out.assert_ok();
    assert!(out.stdout.contains("3 sum="), "{}", out.describe());
    out.stdout
}

/// A store holding the fixture recorded as `x`.
fn recorded() -> Ws {
    let ws = Ws::new();
    ws.record("x", &[fixture("pscounter")]);
    ws
}

/// `warmstart page-server --port 0` on `ws`'s store (through `wrap`, e.g. `ip netns
/// exec`); returns it and the address it printed.
fn page_server(ws: &Ws, wrap: &[&str], bind: &str, env: &[(&str, &str)]) -> (Proc, String) {
    let mut cmd = if wrap.is_empty() {
        Command::new(common::bin())
    } else {
        let mut c = Command::new(wrap[0]);
        c.args(&wrap[1..]).arg(common::bin());
        c
    };
    cmd.env("WARMSTART_STORE", ws.store())
        .env("WARMSTART_LOG", "info")
        .args(["page-server", "--port", "0", "--bind", bind]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let p = Proc::spawn(&mut cmd);
    let addr = p.read_line();
    assert!(
        addr.starts_with(bind) && addr.rsplit(':').next().unwrap().parse::<u16>().is_ok(),
        "page-server should print its bound address, printed {addr:?}"
    );
    (p, addr)
}

#[test]
fn run_from_page_server_lazy_and_eager() {
    let ws = recorded();
    let (_server, addr) = page_server(&ws, &[], "127.0.0.1", &[]);
    let empty = Ws::new();
    let expect = expected();
    for extra in [&[][..], &["--eager"][..], &["--no-prefetch"][..]] {
        let mut args = vec!["run", "--page-server", &addr];
        args.extend_from_slice(extra);
        args.push("x");
        let out = empty.run(&args, INPUT);
        out.assert_ok();
        assert_eq!(out.stdout, expect, "{extra:?}: {}", out.describe());
    }
    // Nothing was written to the local store.
    assert_eq!(empty.ls_json(), serde_json::json!([]));
}

/// The first lazy run from a page server learns the working set and stores it in the
/// server's store (later remote runs prefetch it); `restore --page-server` restores from
/// it too, eagerly or lazily.
#[test]
fn remote_run_learns_working_set_and_restore_uses_page_server() {
    let ws = recorded();
    let (_server, addr) = page_server(&ws, &[], "127.0.0.1", &[]);
    let empty = Ws::new();
    let expect = expected();
    assert_eq!(ws.working_set_pages("x"), None, "nothing learned yet");
    let out = empty.run(&["run", "--page-server", &addr, "x"], INPUT);
    out.assert_ok();
    assert_eq!(out.stdout, expect, "{}", out.describe());
    let learned = ws.working_set_pages("x");
    assert!(
        learned.is_some_and(|n| n > 0),
        "a remote lazy run should store the working set it learned in the server's store: {learned:?}"
    );
    let out = empty.run(
        &["run", "--page-server", &addr, "--display-stats", "x"],
        INPUT,
    );
    out.assert_ok();
    assert_eq!(out.stdout, expect, "{}", out.describe());
    assert!(
        out.stderr.contains("from page server") && !out.stderr.contains(" 0 pages prefetched"),
        "the second remote run should prefetch the learned working set:\n{}",
        out.describe()
    );
    for extra in [&[][..], &["--lazy"][..]] {
        let mut args = vec!["restore", "--page-server", &addr];
        args.extend_from_slice(extra);
        args.push("x");
        let out = empty.run(&args, INPUT);
        out.assert_ok();
        assert_eq!(out.stdout, expect, "restore {extra:?}: {}", out.describe());
    }
    assert_eq!(empty.ls_json(), serde_json::json!([]));
}

#[test]
fn wrong_snapshot_or_server_is_a_clear_error() {
    let ws = recorded();
    let (_server, addr) = page_server(&ws, &[], "127.0.0.1", &[]);
    let empty = Ws::new();
    let unknown = "ab".repeat(32);
    let out = empty.run(&["run", "--page-server", &addr, &unknown], "");
    out.assert_fail();
    assert!(
        out.stderr.contains(&format!("page server {addr}"))
            && out.stderr.contains("no snapshot or name matches"),
        "{}",
        out.describe()
    );
    // Nothing listens there any more.
    let gone = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let out = empty.run(&["run", "--page-server", &gone, "x"], "");
    out.assert_fail();
    assert!(
        out.stderr
            .contains(&format!("page server {gone}: cannot connect")),
        "{}",
        out.describe()
    );
    // Something that is not a page server.
    let foreign = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let faddr = foreign.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        if let Ok((mut s, _)) = foreign.accept() {
            let mut b = [0u8; 64];
            let _ = s.read(&mut b);
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n");
            let _ = s.read(&mut b);
        }
    });
    let out = empty.run(&["run", "--page-server", &faddr, "x"], "");
    out.assert_fail();
    assert!(
        out.stderr
            .contains("did not answer like a warmstart page server"),
        "{}",
        out.describe()
    );
}

#[test]
fn killing_the_page_server_kills_the_instance() {
    let ws = recorded();
    // Slow pages: streaming the 16 MiB takes seconds, so the server dies mid-way.
    let (mut server, addr) = page_server(
        &ws,
        &[],
        "127.0.0.1",
        &[("WARMSTART_PAGE_SERVER_DELAY_MS", "200")],
    );
    let empty = Ws::new();
    let mut run =
        Proc::spawn(&mut empty.cmd(&["run", "--no-prefetch", "--page-server", &addr, "x"]));
    run.send("a");
    assert_eq!(run.read_line(), "1 a");
    // SAFETY: kill takes no pointers; `server` is our child, not yet waited for, so its pid
    // cannot have been reused.
    unsafe { libc::kill(server.pid(), libc::SIGKILL) };
    server.wait();
    // The whole buffer is needed now: the instance must die, never read zeros.
    run.send("sum");
    let st = run.wait();
    assert!(
        !st.success(),
        "run should fail once its page server is gone"
    );
    let err = run.stderr_after_exit();
    assert!(
        err.contains(&format!("page server {addr}")) && err.contains("killed"),
        "stderr should name the page server and say the instance was killed:\n{err}"
    );
    let leftover: Vec<String> = run.out.try_iter().collect();
    assert!(
        leftover.iter().all(|l| !l.contains("sum=")),
        "the instance answered without its memory: {leftover:?}"
    );
}

#[test]
fn dump_to_page_server_then_run_from_it() {
    let server_ws = Ws::new();
    let (_server, addr) = page_server(&server_ws, &[], "127.0.0.1", &[]);
    let mut orig = Proc::spawn(&mut Command::new(fixture("pscounter")));
    orig.wait_stderr("ready");
    orig.send("a");
    assert_eq!(orig.read_line(), "1 a");

    let here = Ws::new();
    let pid = orig.pid().to_string();
    let out = here.run(
        &[
            "dump",
            "-t",
            &pid,
            "--page-server",
            &addr,
            "--name",
            "moved",
        ],
        "",
    );
    out.assert_ok();
    let id = out.stdout.trim().to_owned();
    assert!(
        wait_pid_exit(orig.pid(), TIMEOUT),
        "the dumped process still runs"
    );
    // The snapshot is in the server's store, not here.
    assert_eq!(here.ls_json(), serde_json::json!([]));
    let ls = server_ws.ls_json();
    assert!(ls[0]["id"].as_str().unwrap().starts_with(&id), "{ls}");
    assert_eq!(ls[0]["names"], serde_json::json!(["moved"]));

    let there = Ws::new();
    let out = there.run(&["run", "--page-server", &addr, "moved"], "b\nsum\n");
    out.assert_ok();
    let cold_out = cold(&[fixture("pscounter")], "a\nb\nsum\n");
    assert_eq!(
        out.stdout,
        cold_out
            .stdout
            .lines()
            .skip(1)
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
        "{}",
        out.describe()
    );
    // And by id prefix, eagerly.
    let out = there.run(&["run", "--eager", "--page-server", &addr, &id], "b\n");
    out.assert_ok();
    assert_eq!(out.stdout, "2 b\n");
}

/// Two network namespaces joined by a veth pair; removed (with the pair) on drop.
struct NetnsPair {
    a: String,
    b: String,
}

impl NetnsPair {
    fn create() -> Result<NetnsPair, String> {
        let tag = std::process::id() % 100_000;
        let pair = NetnsPair {
            a: format!("ws-ps-a-{tag}"),
            b: format!("ws-ps-b-{tag}"),
        };
        let (va, vb) = (format!("wspa{tag}"), format!("wspb{tag}"));
        let ip = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("ip: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        ip(&["netns", "add", &pair.a])?;
        // From here on, dropping `pair` cleans up whatever was made.
        ip(&["netns", "add", &pair.b])?;
        ip(&[
            "link", "add", &va, "netns", &pair.a, "type", "veth", "peer", "name", &vb, "netns",
            &pair.b,
        ])?;
        for (ns, dev, addr) in [
            (&pair.a, &va, "10.77.0.1/24"),
            (&pair.b, &vb, "10.77.0.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

#[test]
fn run_across_network_namespaces() {
    if Command::new("ip").arg("-V").output().is_err() {
        eprintln!("SKIPPED run_across_network_namespaces: the `ip` command is missing");
        return;
    }
    let pair = match NetnsPair::create() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("SKIPPED run_across_network_namespaces: cannot create namespaces: {e}");
            return;
        }
    };
    let ws = recorded();
    let (_server, addr) = page_server(&ws, &["ip", "netns", "exec", &pair.a], "10.77.0.1", &[]);
    let empty = Ws::new();
    let expect = expected();
    for extra in [&[][..], &["--eager"][..]] {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &pair.b, common::bin()])
            .env("WARMSTART_STORE", empty.store())
            .args(["run", "--page-server", &addr])
            .args(extra)
            .arg("x");
        let out = common::run_with(&mut cmd, INPUT.as_bytes(), TIMEOUT);
        out.assert_ok();
        assert_eq!(out.stdout, expect, "{extra:?}: {}", out.describe());
    }
}

/// Loopback unless told otherwise; told otherwise, it warns that anyone who can reach it
/// can read every snapshot's memory.
#[test]
fn page_server_listens_on_loopback_by_default_and_warns_when_exposed() {
    let ws = recorded();
    let start = |extra: &[&str]| {
        let mut cmd = ws.cmd(&["page-server", "--port", "0"]);
        cmd.args(extra);
        let p = Proc::spawn(&mut cmd);
        let addr = p.read_line();
        (p, addr)
    };
    let (mut quiet, addr) = start(&[]);
    assert!(addr.starts_with("127.0.0.1:"), "default bind: {addr}");
    // A person reading it is told what the address is (on stderr: stdout is the bare
    // address, for scripts).
    let label = quiet.wait_stderr(&format!("listening on {addr}"));
    assert!(
        label.contains("page-server") && label.contains("store"),
        "{label}"
    );
    // The warning would come before the address line: none came.
    // SAFETY: kill takes no pointers; `quiet` is our child, not yet waited for, so its pid
    // cannot have been reused.
    unsafe { libc::kill(quiet.pid(), libc::SIGTERM) };
    quiet.wait();
    let err = quiet.stderr_after_exit();
    assert!(!err.contains("WARNING"), "a loopback server warned:\n{err}");

    let (exposed, addr) = start(&["--bind", "0.0.0.0"]);
    assert!(addr.starts_with("0.0.0.0:"), "explicit bind: {addr}");
    let warning = exposed.wait_stderr("WARNING");
    assert!(
        warning.contains(&addr)
            && warning.contains("anyone who can reach")
            && warning.contains("every snapshot")
            && warning.contains("TLS"),
        "{warning}"
    );
}

/// A page server that stops answering (SIGSTOP) is taken for dead after
/// `--page-server-timeout`: the instance is killed with a message naming the server and
/// the timeout. Before that, SIGTERM to `run` ends it at once, whether the app runs or
/// is still being restored, never waiting on the silent server.
#[test]
fn a_page_server_that_stops_answering_times_out_and_sigterm_always_ends_run() {
    let ws = recorded();
    // Slow pages: the 16 MiB stream in for seconds, so the server stops mid-way.
    let (server, addr) = page_server(
        &ws,
        &[],
        "127.0.0.1",
        &[("WARMSTART_PAGE_SERVER_DELAY_MS", "200")],
    );
    let signal = |pid: i32, sig: i32| {
        // SAFETY: kill takes no pointers.
        unsafe { libc::kill(pid, sig) };
    };
    let empty = Ws::new();
    let run = |timeout: &str| {
        Proc::spawn(&mut empty.cmd(&[
            "run",
            "--no-prefetch",
            "--page-server",
            &addr,
            "--page-server-timeout",
            timeout,
            "x",
        ]))
    };

    // The timeout: the instance needs the whole buffer, the server is stopped.
    let mut r = run("2");
    r.send("a");
    assert_eq!(r.read_line(), "1 a");
    signal(server.pid(), libc::SIGSTOP);
    r.send("sum");
    let st = r.wait();
    assert!(!st.success(), "{st:?}");
    let err = r.stderr_after_exit();
    assert!(
        err.contains(&format!("page server {addr}"))
            && err.contains("within 2 s")
            && err.contains("--page-server-timeout")
            && err.contains("killed"),
        "stderr should name the page server and the timeout and say the instance was killed:\n{err}"
    );
    assert!(
        r.out.try_iter().all(|l| !l.contains("sum=")),
        "the instance answered without its memory"
    );

    // SIGTERM while the app waits for a page: `run` ends with the app, long before a
    // timeout that outlasts the test's own wait.
    signal(server.pid(), libc::SIGCONT);
    let mut r = run("1000");
    r.send("a");
    assert_eq!(r.read_line(), "1 a");
    signal(server.pid(), libc::SIGSTOP);
    r.send("sum");
    signal(r.pid(), libc::SIGTERM);
    let st = r.wait();
    assert_eq!(
        st.code(),
        Some(128 + libc::SIGTERM),
        "{}",
        r.stderr_after_exit()
    );

    // SIGTERM while the restore waits for pages (the server stops right after serving
    // the manifest; each page answer takes 200 ms, so the restore is not done).
    signal(server.pid(), libc::SIGCONT);
    let mut r = run("1000");
    server.wait_stderr("serving snapshot");
    signal(server.pid(), libc::SIGSTOP);
    signal(r.pid(), libc::SIGTERM);
    let st = r.wait();
    // Still connecting (signals have their default effect until the restore starts), or
    // the restore was interrupted.
    use std::os::unix::process::ExitStatusExt;
    assert!(
        st.code() == Some(128 + libc::SIGTERM) || st.signal() == Some(libc::SIGTERM),
        "{st:?}: {}",
        r.stderr_after_exit()
    );
}

/// A client that connects and says nothing is dropped after the hello timeout (it would
/// otherwise hold a thread of the server for good); the server still serves others.
#[test]
fn silent_client_is_dropped_after_the_hello_timeout() {
    use std::io::Read;
    let ws = recorded();
    let (_server, addr) = page_server(
        &ws,
        &[],
        "127.0.0.1",
        &[("WARMSTART_PAGE_SERVER_HELLO_TIMEOUT_MS", "200")],
    );
    let mut silent = std::net::TcpStream::connect(&addr).unwrap();
    silent
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    let mut buf = [0u8; 16];
    match silent.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the server should have closed the silent connection: {other:?}"),
    }
    let out = Ws::new().run(&["run", "--page-server", &addr, "x"], INPUT);
    assert_eq!(out.stdout, expected(), "{}", out.describe());
}
