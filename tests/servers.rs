//! Real servers as users run them (issue 13): a master that forks workers, recorded with
//! `--ready listen` (the warm point is a worker's blocking wait for a connection), then
//! restored: it serves what a cold run serves, every process of the tree learns its own
//! working set, and it stops on the signal users send, leaving nothing running.
//!
//! nginx comes from the distribution (`apt-get install nginx`), gunicorn from PyPI
//! (`pip install gunicorn`); `.ci/run` installs both and sets `WARMSTART_REQUIRE_SERVERS`,
//! so CI never skips. Without that variable a test whose server is not installed prints
//! a loud SKIP instead of failing.

mod acc_util;
mod common;

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use acc_util::{free_port, gets, instances_of, record_ok, signal, InstanceGuard};
use common::{children, pidfd_open, python, wait_pid_exit, wait_pidfd_exit, Proc, Ws, TIMEOUT};

/// Whether a test may go on: `found`, or else a failure naming `install` when
/// `WARMSTART_REQUIRE_SERVERS` is set, or a loud SKIP when it is not.
fn available(what: &str, found: bool, install: &str) -> bool {
    if found {
        return true;
    }
    if std::env::var_os("WARMSTART_REQUIRE_SERVERS").is_some() {
        panic!(
            "{what} is not installed, and WARMSTART_REQUIRE_SERVERS is set: install it \
             with `{install}` (.ci/run does)"
        );
    }
    eprintln!(
        "\n*** SKIP: {what} is not installed (`{install}`); this test did NOT run. \
         Set WARMSTART_REQUIRE_SERVERS=1 to make that a failure. ***\n"
    );
    false
}

/// nginx's binary, if installed (PATH, then /usr/sbin where Debian puts it).
fn nginx() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
}

/// Whether `python3 -m gunicorn` works.
fn has_gunicorn() -> bool {
    std::process::Command::new(python())
        .args(["-c", "import gunicorn"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `pid` and its descendants, each with a pidfd (taken while they run, so their exit can
/// be waited for later without mistaking a recycled pid for them).
fn tree_pidfds(pid: i32) -> Vec<(i32, OwnedFd)> {
    let mut pids = vec![pid];
    let mut i = 0;
    while i < pids.len() {
        let c = children(pids[i]);
        pids.extend(c);
        i += 1;
    }
    pids.into_iter()
        .filter_map(|p| pidfd_open(p).ok().map(|fd| (p, fd)))
        .collect()
}

/// How many of `tree` run the executable `exe`.
fn running_exe(tree: &[(i32, OwnedFd)], exe: &Path) -> usize {
    tree.iter()
        .filter(|(p, _)| std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e == exe))
        .count()
}

/// The real executable of the interpreter (as `/proc/PID/exe` shows it).
fn python_exe() -> PathBuf {
    std::fs::canonicalize(python()).unwrap_or_else(|_| python())
}

fn code(st: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

/// Sends `sig` to `p`, waits (bounded) for it to exit and for every process of `tree`
/// (taken while it ran) to be gone; returns its exit code.
fn stop(p: &mut Proc, sig: i32, tree: &[(i32, OwnedFd)], ctx: &str) -> i32 {
    signal(p.pid(), sig);
    assert!(
        wait_pid_exit(p.pid(), TIMEOUT),
        "{ctx}: still running {TIMEOUT:?} after signal {sig} (hangs); stderr:\n{}",
        p.err_log.lock().unwrap()
    );
    let c = code(p.wait());
    for (pid, fd) in tree {
        assert!(
            wait_pidfd_exit(fd, TIMEOUT),
            "{ctx}: process {pid} is still running after the server exited"
        );
    }
    c
}

/// The pids (in the snapshot) of the processes of snapshot `snap`.
fn snapshot_pids(ws: &Ws, snap: &str) -> Vec<i64> {
    ws.inspect_json(snap)["manifest"]["processes"]
        .as_array()
        .expect("inspect --json: manifest.processes")
        .iter()
        .map(|p| p["pid"].as_i64().expect("a process pid"))
        .collect()
}

/// Restores `snap` (`warmstart run`), GETs `path` three times, checks the bodies against
/// `cold`, stops it with `sig` and checks its exit code against `cold_code` and that
/// nothing of it is left. Returns how many of its processes ran `exe`.
#[allow(clippy::too_many_arguments)]
fn restored_round(
    ws: &Ws,
    snap: &str,
    port: u16,
    path: &str,
    cold: &[String],
    sig: i32,
    cold_code: i32,
    exe: &Path,
    ctx: &str,
) -> usize {
    let mut inst = Proc::spawn(&mut ws.cmd(&["run", snap]));
    let bodies = gets(port, path, 3, &inst, ctx);
    assert_eq!(bodies, cold, "{ctx}: bodies differ from the cold run's");
    let tree = tree_pidfds(inst.pid());
    let servers = running_exe(&tree, exe);
    let c = stop(&mut inst, sig, &tree, ctx);
    assert_eq!(
        c,
        cold_code,
        "{ctx}: exit status after signal {sig} differs from the cold run's; stderr:\n{}",
        inst.stderr_after_exit()
    );
    // Its listening socket is gone with it: the port can be bound again.
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
        "{ctx}: 127.0.0.1:{port} is still taken after the run exited"
    );
    servers
}

/// After the learning run: processes of the snapshot learned working sets of their own —
/// at least one besides the root (with one set for the tree, only the root would have
/// one). Not
/// necessarily every one: the pages a process shares with its parent are restored
/// eagerly, shared copy-on-write, so a process that stays idle (nginx's master, a worker
/// no request reached) may fault on nothing.
fn assert_learned_per_process(ws: &Ws, snap: &str) {
    let pids = snapshot_pids(ws, snap);
    let v = ws.inspect_json(snap);
    let by_pid = &v["stats"]["working_set_by_pid"];
    let learned = pids
        .iter()
        .skip(1)
        .any(|pid| by_pid[pid.to_string()].as_u64().unwrap_or(0) > 0);
    assert!(
        learned,
        "{snap}: a process of {pids:?} besides the root should have learned a working set \
         of its own; working_set_by_pid = {by_pid}"
    );
}

// ---------------------------------------------------------------------------------------
// gunicorn

const WSGI_APP: &str = "\
import os

BODY = ('hello from a gunicorn worker, ' + str(sum(i * i for i in range(1000))) + '\\n').encode()


def app(environ, start_response):
    start_response('200 OK', [('Content-Type', 'text/plain'),
                              ('Content-Length', str(len(BODY)))])
    return [BODY]
";

/// gunicorn with 2 sync workers: records with `--ready listen` (master and both
/// workers in the snapshot), serves as a cold one does, every process learns its own
/// working set, and it stops on SIGTERM with status 0, leaving nothing running.
#[test]
fn gunicorn_two_sync_workers_record_serve_and_stop_on_sigterm() {
    if !available(
        "gunicorn",
        has_gunicorn(),
        "python3 -m pip install gunicorn",
    ) {
        return;
    }
    let dir = common::tempdir("ws-gunicorn-");
    std::fs::write(dir.path().join("wsgiapp.py"), WSGI_APP).unwrap();
    // Newer gunicorns open a control socket (by default in ~/.gunicorn): each server
    // here gets its own, in its directory.
    let help = std::process::Command::new(python())
        .args(["-m", "gunicorn", "--help"])
        .output()
        .expect("gunicorn --help");
    let control = String::from_utf8_lossy(&help.stdout).contains("--control-socket");
    let argv = |port: u16, tag: &str| -> Vec<OsString> {
        let mut v: Vec<OsString> = vec![
            python().into(),
            "-m".into(),
            "gunicorn".into(),
            "--chdir".into(),
            dir.path().into(),
            "--workers".into(),
            "2".into(),
            "--worker-class".into(),
            "sync".into(),
            "--bind".into(),
            format!("127.0.0.1:{port}").into(),
        ];
        if control {
            v.push("--control-socket".into());
            v.push(dir.path().join(format!("{tag}.ctl")).into());
        }
        v.push("wsgiapp:app".into());
        v
    };
    let exe = python_exe();

    // Cold.
    let port = free_port();
    let a = argv(port, "cold");
    let mut cold = Proc::spawn(std::process::Command::new(&a[0]).args(&a[1..]));
    let cold_bodies = gets(port, "/", 3, &cold, "cold gunicorn");
    let tree = tree_pidfds(cold.pid());
    let cold_code = stop(&mut cold, libc::SIGTERM, &tree, "cold gunicorn");
    assert_eq!(cold_code, 0, "cold gunicorn should exit 0 on SIGTERM");

    // Recorded: the warm point is a worker's wait for a connection, with both workers
    // booted.
    let ws = Ws::new();
    let port = free_port();
    let id = record_ok(&ws, "gunicorn", "listen", &[], &argv(port, "warm"));
    let _guard = InstanceGuard {
        ws: &ws,
        id: id.clone(),
    };
    let pids = snapshot_pids(&ws, "gunicorn");
    assert_eq!(
        pids.len(),
        3,
        "the snapshot should hold the master and its 2 workers: pids {pids:?}"
    );

    // First run learns (per process), second prefetches.
    for round in 1..=2 {
        let ctx = format!("restored gunicorn ({id}), run {round}");
        let n = restored_round(
            &ws,
            "gunicorn",
            port,
            "/",
            &cold_bodies,
            libc::SIGTERM,
            cold_code,
            &exe,
            &ctx,
        );
        assert_eq!(n, 3, "{ctx}: master + 2 workers should have run, not {n}");
        if round == 1 {
            assert_learned_per_process(&ws, "gunicorn");
        }
    }
    assert!(
        instances_of(&ws, &id).is_empty(),
        "an instance of {id} is still listed"
    );
}

// ---------------------------------------------------------------------------------------
// nginx

/// nginx, master + 2 workers: records with `--ready listen` (the workers wait in
/// `epoll_wait` while the master sleeps), serves a file as a cold one does, every
/// process learns its own working set, and it stops on SIGTERM as a cold one does,
/// leaving nothing running.
#[test]
fn nginx_master_two_workers_record_serve_and_stop() {
    let Some(bin) = nginx() else {
        available("nginx", false, "apt-get install -y nginx");
        return;
    };
    let dir = common::tempdir("ws-nginx-");
    // The workers run as `nobody`: they must reach the files they serve.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::create_dir_all(dir.path().join("www")).unwrap();
    std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
    let content = format!("served by nginx from {}\n", dir.path().display());
    std::fs::write(dir.path().join("www/index.html"), &content).unwrap();
    let argv = |port: u16, tag: &str| -> Vec<OsString> {
        let conf = dir.path().join(format!("{tag}.conf"));
        std::fs::write(&conf, warmstart::bench::nginx_conf(dir.path(), port, 2)).unwrap();
        vec![
            bin.clone().into(),
            "-p".into(),
            dir.path().into(),
            "-c".into(),
            conf.into(),
            "-e".into(),
            "stderr".into(),
        ]
    };

    // Cold.
    let port = free_port();
    let a = argv(port, "cold");
    let mut cold = Proc::spawn(std::process::Command::new(&a[0]).args(&a[1..]));
    let cold_bodies = gets(port, "/index.html", 3, &cold, "cold nginx");
    assert_eq!(cold_bodies[0], content, "cold nginx serves the file");
    // (Its second worker may still be starting: the count is checked on the restored
    // tree, which comes back whole.)
    let tree = tree_pidfds(cold.pid());
    let cold_code = stop(&mut cold, libc::SIGTERM, &tree, "cold nginx");

    let ws = Ws::new();
    let port = free_port();
    let id = record_ok(&ws, "nginx", "listen", &[], &argv(port, "warm"));
    let _guard = InstanceGuard {
        ws: &ws,
        id: id.clone(),
    };
    let pids = snapshot_pids(&ws, "nginx");
    assert_eq!(
        pids.len(),
        3,
        "the snapshot should hold the master and its 2 workers: pids {pids:?}"
    );
    for round in 1..=2 {
        let ctx = format!("restored nginx ({id}), run {round}");
        let n = restored_round(
            &ws,
            "nginx",
            port,
            "/index.html",
            &cold_bodies,
            libc::SIGTERM,
            cold_code,
            &bin,
            &ctx,
        );
        assert_eq!(n, 3, "{ctx}: master + 2 workers should have run, not {n}");
        if round == 1 {
            assert_learned_per_process(&ws, "nginx");
        }
    }
    assert!(
        instances_of(&ws, &id).is_empty(),
        "an instance of {id} is still listed"
    );
}
