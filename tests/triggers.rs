//! Every `record --ready` trigger: the snapshot is taken at the promised point, and a
//! restored run answers as a cold run does. Also the errors for bad `record` input.

mod acc_util;
mod common;

use std::ffi::OsString;
use std::time::{Duration, Instant};

use acc_util::{
    fixture_file, free_port, gets, http_get, instances_of, java_argv, marker, pids_with_cmdline,
    record_ok, record_out, signal, which, InstanceGuard,
};
use common::{fixture, python, wait_pid_exit, workloads_dir, Proc, Ws, TIMEOUT};

// ---------------------------------------------------------------------------------------
// listen

/// The `n` field of a `{"n":N,...}` body (panics with the body if it is not JSON).
fn body_json(body: &str, ctx: &str) -> serde_json::Value {
    serde_json::from_str(body.trim())
        .unwrap_or_else(|e| panic!("{ctx}: body is not JSON ({e}): {body:?}"))
}

/// Two `GET /hit` on a server `p`; returns the bodies.
fn two_hits(port: u16, p: &Proc, ctx: &str) -> Vec<String> {
    gets(port, "/hit", 2, p, ctx)
}

/// Checks the bodies of the first two hits: counters 1 and 2, and `pid` (when the workload
/// reports one) equal to `pid`.
fn check_hits(bodies: &[String], pid: Option<i64>, ctx: &str) {
    for (i, b) in bodies.iter().enumerate() {
        let v = body_json(b, ctx);
        assert_eq!(
            v["n"].as_i64(),
            Some(i as i64 + 1),
            "{ctx}: hit {} should carry n={}: {b:?}",
            i + 1,
            i + 1
        );
        if let Some(pid) = pid {
            assert_eq!(
                v["pid"].as_i64(),
                Some(pid),
                "{ctx}: hit {} should carry pid {pid}: {b:?}",
                i + 1
            );
        }
    }
}

/// Cold run on its own port, record with `--ready listen` and `PORT=p`, then three restored
/// instances one after another: each answers n=1 then n=2 (bodies equal to the cold ones,
/// except the pid, which is 2 inside the sandbox when `has_pid`), and each exits on SIGTERM
/// sent to `warmstart run`.
fn listen_workload(name: &str, argv: &[OsString], has_pid: bool) {
    // Cold run (outside warmstart).
    let cold_port = free_port();
    let mut cold_cmd = std::process::Command::new(&argv[0]);
    cold_cmd.args(&argv[1..]).env("PORT", cold_port.to_string());
    let cold = Proc::spawn(&mut cold_cmd);
    let cold_bodies = two_hits(cold_port, &cold, &format!("cold {name}"));
    check_hits(
        &cold_bodies,
        has_pid.then_some(cold.pid() as i64),
        &format!("cold {name}"),
    );
    drop(cold);

    let ws = Ws::new();
    let port = free_port();
    let t = Instant::now();
    let id = record_ok(&ws, name, "listen", &[("PORT", port.to_string())], argv);
    eprintln!("{name}: record --ready listen took {:?}", t.elapsed());
    let _guard = InstanceGuard {
        ws: &ws,
        id: id.clone(),
    };

    let mut late_close = Vec::new();
    for round in 1..=3 {
        let ctx = format!("restored {name} ({id}), instance {round}");
        let t = Instant::now();
        let mut inst = Proc::spawn(&mut ws.cmd(&["run", name]));
        let bodies = two_hits(port, &inst, &ctx);
        eprintln!("{ctx}: two hits answered after {:?}", t.elapsed());
        check_hits(&bodies, has_pid.then_some(2), &ctx);
        if round == 1 {
            // The first run learns until the first response on a connection, and keeps
            // the working set at once, while the server runs on.
            let deadline = Instant::now() + TIMEOUT;
            while ws.working_set_pages(name).is_none_or(|n| n == 0) {
                assert!(
                    Instant::now() < deadline,
                    "{ctx}: no working set kept after the first responses"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            assert!(
                common::alive(inst.pid()),
                "{ctx}: the instance is gone; stderr:\n{}",
                inst.err_log.lock().unwrap()
            );
        }
        if !has_pid {
            assert_eq!(
                bodies, cold_bodies,
                "{ctx}: bodies differ from the cold run's"
            );
        } else {
            // Equal to the cold bodies once the pid is put aside.
            for (b, c) in bodies.iter().zip(&cold_bodies) {
                let (mut b, mut c) = (body_json(b, &ctx), body_json(c, &ctx));
                b["pid"] = serde_json::Value::Null;
                c["pid"] = serde_json::Value::Null;
                assert_eq!(b, c, "{ctx}: bodies differ from the cold run's");
            }
        }
        let listed = instances_of(&ws, &id);
        assert!(
            listed
                .iter()
                .any(|i| i["monitor"].as_i64() == Some(inst.pid() as i64)),
            "{ctx}: `ps --json` does not list the instance (monitor {}): {listed:?}",
            inst.pid()
        );
        // SIGTERM to `warmstart run` is forwarded to the app; the run exits with 128+15.
        signal(inst.pid(), libc::SIGTERM);
        assert!(
            wait_pid_exit(inst.pid(), TIMEOUT),
            "{ctx}: `warmstart run` did not exit after SIGTERM; stderr:\n{}",
            inst.err_log.lock().unwrap()
        );
        let st = inst.wait();
        let exited = Instant::now();
        assert_eq!(
            common_code(st),
            128 + libc::SIGTERM,
            "{ctx}: `warmstart run` should exit with the app's status (killed by SIGTERM); stderr:\n{}",
            inst.err_log.lock().unwrap()
        );
        // Once `warmstart run` has exited, the app is gone with its sockets, as when a
        // cold server's parent reaps it: the port can be bound again at once (std's
        // listener sets SO_REUSEADDR, as the servers do, so TIME_WAIT does not count).
        // A violation is noted, then waited out (bounded) so the next instances are
        // still tested; the test fails at the end.
        if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            let seen = ss_port(port);
            let deadline = exited + TIMEOUT;
            while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "{ctx}: 127.0.0.1:{port} stays taken after the run exited"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            late_close.push(format!(
                "{ctx}: `warmstart run` exited, but 127.0.0.1:{port} was still taken ({e}) \
                 (free again {:?} after the exit): the app's listening socket outlived the \
                 run\n{seen}",
                exited.elapsed()
            ));
        }
        // Nothing of the instance is left (the app and its monitor).
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = instances_of(&ws, &id);
            if left.is_empty() {
                break;
            }
            for i in &left {
                if let Some(p) = i["pid"].as_i64() {
                    wait_pid_exit(p as i32, Duration::from_secs(1));
                }
            }
            assert!(
                Instant::now() < deadline,
                "{ctx}: still running after SIGTERM: {left:?}"
            );
        }
    }
    assert!(late_close.is_empty(), "{}", late_close.join("\n"));
}

/// `ss -tanpe` lines for `port` (for failure messages).
fn ss_port(port: u16) -> String {
    let out = std::process::Command::new("ss").arg("-tanpe").output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.contains(&format!(":{port} ")))
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("(ss: {e})"),
    }
}

fn common_code(st: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

/// Python's own `http.server`, as a user runs it: restored, it serves a file and exits
/// on SIGINT exactly as a cold one does (CPython installs its handlers with SA_ONSTACK:
/// a restored thread that kept warmstart's alternate signal stack died of SIGSEGV, 139).
#[test]
fn python_http_server_exits_on_sigint_like_a_cold_one() {
    let dir = common::tempdir("ws-httpserver-");
    std::fs::write(dir.path().join("index.html"), "warm\n").unwrap();
    let argv = |port: u16| -> Vec<OsString> {
        vec![
            python().into(),
            "-m".into(),
            "http.server".into(),
            port.to_string().into(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--directory".into(),
            dir.path().into(),
        ]
    };
    let serve_and_interrupt = |port: u16, p: &mut Proc, ctx: &str| -> i32 {
        let (status, body) = http_get(port, "/index.html", Instant::now() + TIMEOUT)
            .unwrap_or_else(|e| panic!("{ctx}: GET: {e}; stderr:\n{}", p.err_log.lock().unwrap()));
        assert!(
            status.contains(" 200") && body == "warm\n",
            "{ctx}: answered {status:?} {body:?}"
        );
        signal(p.pid(), libc::SIGINT);
        assert!(
            wait_pid_exit(p.pid(), TIMEOUT),
            "{ctx}: did not exit after SIGINT; stderr:\n{}",
            p.err_log.lock().unwrap()
        );
        common_code(p.wait())
    };
    let port = free_port();
    let a = argv(port);
    let mut cold = Proc::spawn(std::process::Command::new(&a[0]).args(&a[1..]));
    let cold_code = serve_and_interrupt(port, &mut cold, "cold http.server");

    let ws = Ws::new();
    let port = free_port();
    let id = record_ok(&ws, "httpserver", "listen", &[], &argv(port));
    let _guard = InstanceGuard {
        ws: &ws,
        id: id.clone(),
    };
    let ctx = format!("restored http.server ({id})");
    let mut inst = Proc::spawn(&mut ws.cmd(&["run", "httpserver"]));
    let code = serve_and_interrupt(port, &mut inst, &ctx);
    assert_eq!(
        code,
        cold_code,
        "{ctx}: exit status after SIGINT differs from the cold run's; stderr:\n{}",
        inst.err_log.lock().unwrap()
    );
}

#[test]
fn listen_py_http() {
    let argv = vec![
        python().into_os_string(),
        workloads_dir().join("py_http.py").into_os_string(),
    ];
    listen_workload("py_http", &argv, true);
}

#[test]
fn listen_node_http() {
    let argv = vec![
        which("node").into_os_string(),
        workloads_dir().join("node_http.js").into_os_string(),
    ];
    listen_workload("node_http", &argv, true);
}

#[test]
fn listen_java_http() {
    listen_workload("java_http", &java_argv("Http"), false);
}

/// The same with `-XX:-UsePerfData`: the JVM then maps no `/tmp/hsperfdata_USER/PID` file
/// (which every sandboxed JVM names `.../2`, and which a running instance rewrites).
#[test]
fn listen_java_http_no_perfdata() {
    let mut argv = java_argv("Http");
    argv.insert(1, "-XX:-UsePerfData".into());
    listen_workload("java_http_noperf", &argv, false);
}

// ---------------------------------------------------------------------------------------
// notify

/// Two runs of a notify fixture: each prints `RESTORED=1`, a random number (different
/// between the runs: the app reseeded), then echoes its input.
fn notify_workload(name: &str, argv: &[OsString]) {
    let ws = Ws::new();
    let out = record_out(&ws, name, "notify", &["--timeout", "60"], &[], argv);
    out.assert_ok();
    assert!(
        out.stderr.contains("warming"),
        "record should copy the app's start-up output to stderr:\n{}",
        out.describe()
    );
    let mut numbers = Vec::new();
    for round in 1..=2 {
        let out = ws.instance(name, "a\nb b\n");
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert!(
            out.success()
                && lines.len() == 4
                && lines[0] == "RESTORED=1"
                && lines[1].parse::<u64>().is_ok()
                && lines[2] == "echo a"
                && lines[3] == "echo b b",
            "restored {name}, run {round}: expected RESTORED=1, a number, echo a, echo b b:\n{}",
            out.describe()
        );
        assert!(
            !out.stderr.contains("warming"),
            "restored {name}, run {round}: the start-up ran again (snapshot taken too early?):\n{}",
            out.describe()
        );
        numbers.push(lines[1].to_owned());
    }
    assert_ne!(
        numbers[0], numbers[1],
        "{name}: two restored runs printed the same random number: the reseed after RESTORED=1 did not happen"
    );
}

/// `record --leave-running`: the snapshot's id comes first, then the recorded app goes on
/// with our stdio. A notify app reads `RESTORED=0` (so it keeps its seeded generator and
/// prints the seeded number) and answers its input; a restored instance reads
/// `RESTORED=1` and draws another number.
#[test]
fn notify_leave_running() {
    let ws = Ws::new();
    let py = python().into_os_string();
    let args: Vec<OsString> = ["record", "--name", "lr", "--ready", "notify", "-R", "--"]
        .iter()
        .map(OsString::from)
        .chain([py.clone(), fixture_file("notify.py").into_os_string()])
        .collect();
    let out = ws.run(&args, "a\nb\n");
    let seeded = std::process::Command::new(&py)
        .args([
            "-c",
            "import random; random.seed(12345); print(random.getrandbits(64))",
        ])
        .output()
        .expect("python");
    let seeded = String::from_utf8_lossy(&seeded.stdout).trim().to_owned();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        out.success()
            && lines.len() == 5
            && lines[0].len() == 12
            && lines[1] == "RESTORED=0"
            && lines[2] == seeded
            && lines[3] == "echo a"
            && lines[4] == "echo b",
        "record -R: expected the id, RESTORED=0, the seeded number {seeded}, echo a, echo b:\n{}",
        out.describe()
    );
    let run = ws.instance("lr", "c\n");
    let rl: Vec<&str> = run.stdout.lines().collect();
    assert!(
        run.success()
            && rl.len() == 3
            && rl[0] == "RESTORED=1"
            && rl[1] != seeded
            && rl[2] == "echo c",
        "restored instance of a snapshot recorded with -R:\n{}",
        run.describe()
    );
}

/// `record --leave-running` exits with the app's own status once the app is done, and the
/// app's syscalls that the warm-point trap covers keep working (it reads stdin again).
#[test]
fn leave_running_exit_status() {
    let ws = Ws::new();
    let script = "read a; echo \"got $a\"; read b; echo \"got $b\"; exit 3";
    let out = ws.run(
        &[
            "record", "--name", "sh", "-R", "--", "/bin/sh", "-c", script,
        ],
        "one\ntwo\n",
    );
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        out.code() == 3 && lines.len() == 3 && lines[1] == "got one" && lines[2] == "got two",
        "record -R of a shell script that exits 3:\n{}",
        out.describe()
    );
}

/// Child processes of a recorded app inherit the warm-point trap: they are traced too, so
/// their trapped syscalls (here `cat` reading its stdin, before and after the warm point)
/// work instead of failing with ENOSYS, and they never make the warm point themselves.
#[test]
fn children_of_a_recorded_app_run_normally() {
    let ws = Ws::new();
    let script = "echo piped | cat; read y; echo \"got $y\"; echo sub | cat; echo done";
    let out = ws.run(
        &[
            "record", "--name", "kids", "-R", "--", "/bin/sh", "-c", script,
        ],
        "yy\n",
    );
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        out.success()
            && out.stderr.contains("piped")
            && !out.stderr.contains("not implemented")
            && lines[1..] == ["got yy", "sub", "done"],
        "a recorded shell's children (cat) should read their stdin normally:\n{}",
        out.describe()
    );
    let run = ws.instance("kids", "zz\n");
    assert!(
        run.success() && run.stdout == "got zz\nsub\ndone\n" && !run.stderr.contains("piped"),
        "restored instance:\n{}",
        run.describe()
    );
}

#[test]
fn notify_python() {
    notify_workload(
        "notify_py",
        &[
            python().into_os_string(),
            fixture_file("notify.py").into_os_string(),
        ],
    );
}

#[test]
fn notify_node() {
    notify_workload(
        "notify_js",
        &[
            which("node").into_os_string(),
            fixture_file("notify.js").into_os_string(),
        ],
    );
}

// ---------------------------------------------------------------------------------------
// after=DURATION and signal

/// `after=500ms` on a C busy loop that runs for 2 s: the snapshot lands in the loop (the
/// record returns well before the loop ends, and the restored run prints "loop done"
/// itself), and the restored run answers its input.
#[test]
fn after_500ms_busy_loop() {
    let bin = fixture("busy_after");
    let ws = Ws::new();
    let out = record_out(&ws, "busy", "after=500ms", &[], &[], &[&bin]);
    out.assert_ok();
    // The app's stderr is the record's: had the snapshot come after the loop, its end
    // would be there (no timing threshold: a loaded host may take longer).
    assert!(
        out.stderr.contains("started") && !out.stderr.contains("loop done"),
        "record with after=500ms should snapshot inside the 2 s loop:\n{}",
        out.describe()
    );
    for round in 1..=2 {
        let out = ws.instance("busy", "a\nb\n");
        assert!(
            out.success() && out.stdout == "loop done ok\n1 a\n2 b\n",
            "restored busy loop, run {round}: expected the loop's end and two answers:\n{}",
            out.describe()
        );
        assert!(
            !out.stderr.contains("started"),
            "restored busy loop started over:\n{}",
            out.describe()
        );
    }
}

/// `signal`: the app stops itself with SIGSTOP after warming up; the restored run goes on
/// from there.
#[test]
fn signal_sigstop() {
    let ws = Ws::new();
    let argv = [
        python().into_os_string(),
        fixture_file("sigstop.py").into_os_string(),
    ];
    let out = record_out(&ws, "stop", "signal", &[], &[], &argv);
    out.assert_ok();
    assert!(
        out.stderr.contains("warming") && !out.stderr.contains("resumed"),
        "record --ready signal should snapshot at the SIGSTOP:\n{}",
        out.describe()
    );
    let expected = format!(
        "resumed {}\n1 a\n2 b\n",
        (0u64..100000).map(|i| i * i).sum::<u64>() % 1000003
    );
    for round in 1..=2 {
        let out = ws.instance("stop", "a\nb\n");
        assert!(
            out.success() && out.stdout == expected,
            "restored SIGSTOP fixture, run {round}: expected {expected:?}:\n{}",
            out.describe()
        );
    }
}

// ---------------------------------------------------------------------------------------
// bad input

#[test]
fn record_missing_command() {
    let ws = Ws::new();
    let out = ws.run(&["record", "--", "/no/such/cmd"], "");
    out.assert_fail();
    assert!(
        out.stderr.contains("/no/such/cmd")
            && (out.stderr.contains("not found") || out.stderr.contains("No such file")),
        "record of a missing command should name it and say it is not found:\n{}",
        out.describe()
    );
    assert!(
        !out.stderr.contains("panicked"),
        "record panicked:\n{}",
        out.describe()
    );
    assert_eq!(ws.ls_json(), serde_json::json!([]), "something was stored");
}

#[test]
fn record_listen_timeout() {
    let ws = Ws::new();
    let mark = marker("timeout");
    let t = Instant::now();
    let out = ws.run(
        &[
            "record",
            "--ready",
            "listen",
            "--timeout",
            "2",
            "--",
            python().to_str().unwrap(),
            "-c",
            "import time; time.sleep(60)",
            &mark,
        ],
        "",
    );
    let took = t.elapsed();
    out.assert_fail();
    assert!(
        out.stderr.contains("timeout") && out.stderr.contains("nothing was stored"),
        "record past --timeout should say so:\n{}",
        out.describe()
    );
    assert!(
        took < Duration::from_secs(30),
        "record --timeout 2 took {took:?}"
    );
    assert_eq!(ws.ls_json(), serde_json::json!([]), "something was stored");
    // `run_with` already checked nothing holds record's stdout/stderr; the app is gone too.
    let left = pids_with_cmdline(&mark);
    for &p in &left {
        // SAFETY: kill takes integer arguments only; no memory is passed.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    assert!(
        left.is_empty(),
        "the app survived the timed-out record: pids {left:?}"
    );
}

#[test]
fn record_bogus_trigger() {
    let ws = Ws::new();
    let out = ws.run(&["record", "--ready", "bogus", "--", "true"], "");
    out.assert_fail();
    for form in ["bogus", "stdin", "listen", "notify", "after=", "signal"] {
        assert!(
            out.stderr.contains(form),
            "--ready bogus: the error should list the valid forms (missing {form:?}):\n{}",
            out.describe()
        );
    }
    assert_eq!(ws.ls_json(), serde_json::json!([]), "something was stored");
}

#[test]
fn priming_input_is_consumed_before_the_snapshot() {
    let ws = Ws::new();
    let counter = fixture("counter");
    let out = ws.run(
        &[
            "record".as_ref(),
            "--name".as_ref(),
            "primed".as_ref(),
            "--prime".as_ref(),
            "a".as_ref(),
            "--prime".as_ref(),
            "b".as_ref(),
            "--".as_ref(),
            counter.as_os_str(),
        ],
        "",
    );
    out.assert_ok();
    // Its answers to the priming input went to our stderr while it warmed up.
    assert!(out.stderr.contains("2 b"), "{}", out.describe());
    // The snapshot holds the state the priming left: the counter goes on from 2.
    let run = ws.run(&["run", "primed"], "c\n");
    run.assert_ok();
    assert_eq!(run.stdout, "3 c\n", "{}", run.describe());
    let bad = ws.run(
        &[
            "record", "--ready", "after=1s", "--prime", "x", "--", "true",
        ],
        "",
    );
    bad.assert_fail();
    assert!(
        bad.stderr.contains("--ready stdin") && bad.stderr.contains("--ready listen"),
        "{}",
        bad.describe()
    );
}

/// `record --ready listen --prime PATH`: the GETs are answered before the snapshot, so a
/// restored instance's counter goes on from there, twice in a row (each instance starts
/// from the snapshot). The JVM's request path leaves it holding a unix socket whose peer
/// has closed (its pre-close socket), which must be checkpointed too.
fn primed_listen_workload(name: &str, argv: &[OsString], primes: usize) {
    let ws = Ws::new();
    let port = free_port();
    let mut extra = Vec::new();
    for _ in 0..primes {
        extra.extend(["--prime", "/hit"]);
    }
    let out = record_out(
        &ws,
        name,
        "listen",
        &extra,
        &[("PORT", port.to_string())],
        argv,
    );
    out.assert_ok();
    assert_eq!(
        out.stderr
            .matches("warmstart: primed: GET /hit: HTTP/1.")
            .count(),
        primes,
        "each priming request is answered:\n{}",
        out.describe()
    );
    // The priming connections the recorded app closed may linger a moment as orphans on
    // its port (FIN_WAIT, not yet TIME_WAIT) after it is gone; a restore refuses a port
    // in use, as it should. Wait (bounded) until an SO_REUSEADDR bind, as the app's, works.
    let deadline = Instant::now() + TIMEOUT;
    while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "127.0.0.1:{port} stays taken after the record of {name}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    for round in 1..=2 {
        let ctx = format!("restored primed {name}, instance {round}");
        let inst = Proc::spawn(&mut ws.cmd(&["run", name]));
        let deadline = Instant::now() + TIMEOUT;
        let (status, body) = http_get(port, "/hit", deadline)
            .unwrap_or_else(|e| panic!("{ctx}: {e}; stderr:\n{}", inst.err_log.lock().unwrap()));
        assert!(status.contains(" 200"), "{ctx}: {status:?} {body:?}");
        assert_eq!(
            body_json(&body, &ctx)["n"].as_i64(),
            Some(primes as i64 + 1),
            "{ctx}: the primed requests are in the snapshot: {body:?}"
        );
        signal(inst.pid(), libc::SIGTERM);
        assert!(
            wait_pid_exit(inst.pid(), TIMEOUT),
            "{ctx}: no exit after SIGTERM"
        );
    }
}

#[test]
fn listen_primed_py_http() {
    let argv = vec![
        python().into_os_string(),
        workloads_dir().join("py_http.py").into_os_string(),
    ];
    primed_listen_workload("py_http_primed", &argv, 2);
}

#[test]
fn listen_primed_java_http() {
    primed_listen_workload("java_http_primed", &java_argv("Http"), 1);
}

#[test]
fn prime_path_must_be_a_path() {
    let ws = Ws::new();
    let out = record_out(&ws, "x", "listen", &["--prime", "hit me"], &[], &["true"]);
    assert_ne!(out.code(), 0, "{}", out.describe());
    assert!(
        out.stderr.contains("--prime \"hit me\"") && out.stderr.contains("path of an HTTP GET"),
        "{}",
        out.describe()
    );
    assert!(
        ws.run(&["ls"], "").stdout.lines().count() <= 1,
        "nothing stored"
    );
}

/// A server that answers but never closes the connection (despite `Connection: close`):
/// priming cannot finish; `record` says so when `--timeout` passes, stores nothing, and
/// exits 1 (not killed by a SIGPIPE from the priming thread it leaves behind).
#[test]
fn priming_a_server_that_keeps_its_connections_fails_clearly() {
    let ws = Ws::new();
    let port = free_port();
    let dir = common::tempdir("ws-mute-");
    let script = dir.path().join("mute.py");
    std::fs::write(
        &script,
        format!(
            "import socket\n\
             s = socket.socket()\n\
             s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('127.0.0.1', {port}))\n\
             s.listen()\n\
             kept = []\n\
             while True:\n\
             \x20   c, _ = s.accept()\n\
             \x20   kept.append(c)\n\
             \x20   c.recv(1000)\n\
             \x20   c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok')\n"
        ),
    )
    .unwrap();
    let argv = [python().into_os_string(), script.into_os_string()];
    let out = record_out(
        &ws,
        "mute",
        "listen",
        &["--prime", "/x", "--timeout", "3"],
        &[],
        &argv,
    );
    assert_eq!(out.code(), 1, "{}", out.describe());
    assert!(
        out.stderr.contains("priming requests were under way")
            && out.stderr.contains("nothing was stored"),
        "{}",
        out.describe()
    );
    assert_eq!(ws.ls_json(), serde_json::json!([]), "something was stored");
}

/// File descriptors in flight between two processes of the tree at a `--ready listen`
/// stop (nginx's master passing a channel to a worker): the recorder lets the tree go on
/// until they are received, and the restored child holds what it received.
#[test]
fn record_waits_for_fds_in_flight_to_be_received() {
    let ws = Ws::new();
    let bin = fixture("fd_in_flight");
    let out = ws.run(
        &[
            "record",
            "--name",
            "inflight",
            "--ready",
            "listen",
            "--",
            bin.to_str().unwrap(),
            "read",
        ],
        "",
    );
    out.assert_ok();
    let run = ws.run(&["run", "inflight"], "check\n");
    run.assert_ok();
    assert_eq!(run.stdout, "child holds /dev/null\n", "{}", run.describe());
}

/// Fds queued that no process of the tree ever reads: refused, naming the socket.
#[test]
fn record_refuses_fds_in_flight_nobody_receives() {
    let ws = Ws::new();
    let bin = fixture("fd_in_flight");
    let out = ws.run(
        &[
            "record",
            "--ready",
            "listen",
            "--timeout",
            "3",
            "--",
            bin.to_str().unwrap(),
            "never",
        ],
        "",
    );
    out.assert_fail();
    assert!(
        out.stderr.contains("never came to rest")
            && out
                .stderr
                .contains("file descriptors or credentials queued")
            && out.stderr.contains("nothing was stored"),
        "{}",
        out.describe()
    );
    assert_eq!(ws.ls_json(), serde_json::json!([]), "something was stored");
}

/// The VMAs `(start, end)` of the first process of snapshot `snap`, and how many of its
/// pages hold data.
fn layout_and_pages(ws: &Ws, snap: &str) -> (Vec<(u64, u64)>, u64, u64) {
    let j = ws.inspect_json(snap);
    let p = &j["manifest"]["processes"][0];
    let vmas = (p["vmas"].as_array().expect("vmas").iter())
        .map(|v| (v["start"].as_u64().unwrap(), v["end"].as_u64().unwrap()))
        .collect();
    let data: u64 = (j["manifest"]["processes"].as_array().unwrap().iter())
        .flat_map(|p| p["vmas"].as_array().unwrap())
        .flat_map(|v| v["pages"].as_array().unwrap())
        .filter(|r| r["content"].get("Data").is_some())
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    let personality = p["personality"].as_u64().unwrap();
    (vmas, data, personality)
}

/// `record --reproducible`: the app runs with address-space randomization off, so that
/// recording it again gives the same layout and shares nearly all of its pages with the
/// first record (what lets a re-push upload only what changed); without it, the layout
/// differs from record to record.
#[test]
fn reproducible_records_share_layout_and_pages() {
    let ws = Ws::new();
    let app = [python(), workloads_dir().join("py_echo.py")];
    let env = [("PYTHONHASHSEED", "7".to_owned())];
    let rec = |name: &str, extra: &[&str]| {
        let out = record_out(&ws, name, "stdin", extra, &env, &app);
        out.assert_ok();
        layout_and_pages(&ws, name)
    };
    let (a, _, pers) = rec("a", &["--reproducible"]);
    assert_ne!(
        pers & libc::ADDR_NO_RANDOMIZE as u64,
        0,
        "the app should run with ADDR_NO_RANDOMIZE"
    );
    let (b, data, _) = rec("b", &["--reproducible"]);
    assert_eq!(a, b, "two reproducible records should have the same layout");
    let shared = ws.inspect_json("b")["stats"]["shared_pages_with_others"]
        .as_u64()
        .unwrap();
    assert!(
        shared * 100 >= data * 90,
        "a reproducible re-record should share at least 90% of its {data} pages with the \
         first one, shares {shared}"
    );
    let randomized = std::fs::read_to_string("/proc/sys/kernel/randomize_va_space")
        .map(|s| s.trim() != "0")
        .unwrap_or(false);
    if randomized {
        let (c, _, pers) = rec("c", &[]);
        assert_eq!(pers & libc::ADDR_NO_RANDOMIZE as u64, 0);
        assert_ne!(
            a, c,
            "a record without --reproducible should get a random layout"
        );
    }
    // Instances of the snapshot answer as ever.
    let out = ws.instance("b", "hi\n");
    out.assert_ok();
    assert!(out.stdout.contains("hi"), "{}", out.describe());
}
