//! `run --listen` and systemd-style `LISTEN_FDS`: instances of one server snapshot side
//! by side, each on a listening socket of its own in place of the one it recorded, and
//! the errors for bad listeners (before the app resumes).

mod acc_util;
mod common;

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::time::Instant;

use acc_util::{free_port, http_get, record_ok, signal};
use common::{python, wait_pid_exit, workloads_dir, Proc, Ws, TIMEOUT};

fn hit(port: u16, inst: &Proc, ctx: &str) -> i64 {
    let (status, body) = http_get(port, "/hit", Instant::now() + TIMEOUT)
        .unwrap_or_else(|e| panic!("{ctx}: {e}; stderr:\n{}", inst.err_log.lock().unwrap()));
    assert!(status.contains(" 200"), "{ctx}: {status:?} {body:?}");
    let v: serde_json::Value = serde_json::from_str(body.trim())
        .unwrap_or_else(|e| panic!("{ctx}: not JSON ({e}): {body:?}"));
    v["n"]
        .as_i64()
        .unwrap_or_else(|| panic!("{ctx}: no n in {body:?}"))
}

fn stop(inst: &Proc, ctx: &str) {
    signal(inst.pid(), libc::SIGTERM);
    assert!(
        wait_pid_exit(inst.pid(), TIMEOUT),
        "{ctx}: no exit after SIGTERM"
    );
}

/// One record of the Flask workload, then: two instances at once on new ports, each
/// counting on from the snapshot, the recorded port left free; one given its socket
/// through LISTEN_FDS; and each kind of bad listener refused with its reason.
#[test]
fn server_instances_side_by_side_on_their_own_listeners() {
    let ws = Ws::new();
    let recorded = free_port();
    let argv = [
        python().into_os_string(),
        workloads_dir().join("py_http.py").into_os_string(),
    ];
    record_ok(
        &ws,
        "http",
        "listen",
        &[("PORT", recorded.to_string())],
        &argv,
    );

    // Side by side: both answer at once, each its own counter from the snapshot's.
    let (p1, p2) = (free_port(), free_port());
    let a = Proc::spawn(&mut ws.cmd(&["run", "--listen", &format!("127.0.0.1:{p1}"), "http"]));
    let b = Proc::spawn(&mut ws.cmd(&["run", "--listen", &p2.to_string(), "http"]));
    assert_eq!(hit(p1, &a, "instance on p1"), 1);
    assert_eq!(hit(p2, &b, "instance on p2"), 1);
    assert_eq!(hit(p1, &a, "instance on p1, again"), 2);
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", recorded)).is_ok(),
        "an instance given its listener must not hold the recorded port {recorded}"
    );

    // Each kind of bad listener refused with its reason; nothing restored.
    bad_listeners_refused(&ws, recorded, p1);
    stop(&a, "instance on p1");
    stop(&b, "instance on p2");

    // LISTEN_FDS: the caller's socket at fd 3, LISTEN_PID the run itself (`exec` keeps
    // the shell's pid).
    let p3 = free_port();
    let given = std::net::TcpListener::bind(("127.0.0.1", p3)).unwrap();
    let sd = systemd_run(&ws, given.as_raw_fd(), &["run", "http"]);
    drop(given);
    assert_eq!(hit(p3, &sd, "instance on LISTEN_FDS"), 1);
    stop(&sd, "instance on LISTEN_FDS");

    // LISTEN_FDS naming something that is not a listening socket.
    let file = std::fs::File::open("/dev/null").unwrap();
    let not = systemd_run(&ws, file.as_raw_fd(), &["run", "http"]);
    assert!(wait_pid_exit(not.pid(), TIMEOUT));
    let err = not.stderr_after_exit();
    assert!(
        err.contains("LISTEN_FDS=1: fd 3 is not a listening TCP socket"),
        "{err}"
    );
}

/// Each kind of bad `--listen` for snapshot `http` (recorded listening on port
/// `recorded`) stops the `run` with its reason: port `busy`, held by a running instance
/// (the message names what holds it), something that is no address, a port the
/// snapshot does not listen on.
fn bad_listeners_refused(ws: &Ws, recorded: u16, busy: u16) {
    let out = ws.run(&["run", "--listen", &busy.to_string(), "http"], "");
    out.assert_fail();
    assert!(
        out.stderr.contains(&format!("--listen {busy}"))
            && out.stderr.contains("is in use")
            && out.stderr.contains("LISTEN socket of pid"),
        "{}",
        out.describe()
    );
    let bad = ws.run(&["run", "--listen", "nowhere", "http"], "");
    bad.assert_fail();
    assert!(
        bad.stderr.contains("\"nowhere\" is not an address"),
        "{}",
        bad.describe()
    );
    let other = if recorded == 1 { 2 } else { recorded - 1 };
    let wrong = ws.run(
        &["run", "--listen", &format!("{other}=127.0.0.1:0"), "http"],
        "",
    );
    wrong.assert_fail();
    assert!(
        wrong
            .stderr
            .contains(&format!("does not listen on port {other}"))
            && wrong.stderr.contains(&format!("127.0.0.1:{recorded}")),
        "{}",
        wrong.describe()
    );
}

/// `warmstart ARGS` with `fd` as its fd 3 and LISTEN_FDS=1, LISTEN_PID its own pid.
fn systemd_run(ws: &Ws, fd: i32, args: &[&str]) -> Proc {
    let cmd = ws.cmd(args);
    let exe = cmd.get_program().to_owned();
    let store_args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let envs: Vec<(std::ffi::OsString, Option<std::ffi::OsString>)> = cmd
        .get_envs()
        .map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned())))
        .collect();
    let mut sh = std::process::Command::new("sh");
    sh.arg("-c")
        .arg("LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"")
        .arg(exe)
        .args(&store_args);
    for (k, v) in envs {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    // SAFETY: dup2 and fcntl are async-signal-safe; it runs in the forked child before exec.
    unsafe {
        sh.pre_exec(move || {
            // dup2 onto itself keeps close-on-exec: clear it then.
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    drop(cmd);
    Proc::spawn(&mut sh)
}

/// `serve` parks a server: the parked instance holds a placeholder, so its port stays
/// free; at hand-out the daemon binds the recorded address and the instance answers
/// there, counting on from the snapshot, and stops on SIGTERM; the next one (once the
/// pool is refilled) gets the port again once the first is gone. `run --listen` goes
/// through the daemon too: parked instances side by side, each on the caller's socket.
#[test]
fn serve_parks_a_server_and_hands_it_its_listener() {
    let ws = Ws::new();
    let port = free_port();
    let argv = [
        python().into_os_string(),
        workloads_dir().join("py_http.py").into_os_string(),
    ];
    record_ok(&ws, "http", "listen", &[("PORT", port.to_string())], &argv);
    // The daemon parks only a snapshot with a working set: one lone run learns it.
    let first = Proc::spawn(&mut ws.cmd(&["run", "--no-serve", "http"]));
    assert_eq!(hit(port, &first, "lone run"), 1);
    stop(&first, "lone run");
    let daemon = ws.serve("http");
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "a parked instance must leave port {port} free"
    );
    for round in 1..=2 {
        let ctx = format!("served instance {round}");
        let inst = Proc::spawn(&mut ws.cmd(&["run", "--display-stats", "http"]));
        assert_eq!(
            hit(port, &inst, &ctx),
            1,
            "{ctx}: counts on from the snapshot"
        );
        assert_eq!(hit(port, &inst, &ctx), 2);
        inst.wait_stderr("by serve (parked instance)");
        stop(&inst, &ctx);
        // Its socket may linger a moment after the exit: wait (bounded) until it is gone.
        let deadline = Instant::now() + TIMEOUT;
        while std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "{ctx}: port {port} stays taken");
            std::thread::yield_now();
        }
        // Its hand-out parks a replacement once the instance has gone quiet (or gone):
        // the pool is full again once it is.
        daemon.wait_stderr("parked an instance of");
    }

    let mut side = Vec::new();
    for i in 1..=2 {
        let p = free_port();
        let ctx = format!("served instance {i} on --listen {p}");
        let inst = Proc::spawn(&mut ws.cmd(&[
            "run",
            "--display-stats",
            "--listen",
            &p.to_string(),
            "http",
        ]));
        inst.wait_stderr("by serve (parked instance)");
        assert_eq!(hit(p, &inst, &ctx), 1, "{ctx}: counts on from the snapshot");
        if i == 1 {
            daemon.wait_stderr("parked an instance of");
        }
        side.push((p, inst, ctx));
    }
    for (p, inst, ctx) in &side {
        assert_eq!(hit(*p, inst, ctx), 2, "{ctx}: its own counter");
    }
    // The daemon names the snapshot's listeners to a served `run --listen`, which binds
    // them itself: bad ones are refused as by a lone run, before anything is handed out.
    bad_listeners_refused(&ws, port, side[0].0);
    // LISTEN_FDS through the daemon: the caller's socket in place of the listener.
    let p3 = free_port();
    let given = std::net::TcpListener::bind(("127.0.0.1", p3)).unwrap();
    let sd = systemd_run(&ws, given.as_raw_fd(), &["run", "--display-stats", "http"]);
    drop(given);
    sd.wait_stderr("by serve (");
    assert_eq!(hit(p3, &sd, "served instance on LISTEN_FDS"), 1);
    stop(&sd, "served instance on LISTEN_FDS");
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "instances given their listeners must leave the recorded port {port} free"
    );
    for (_, inst, ctx) in &side {
        stop(inst, ctx);
    }
}
