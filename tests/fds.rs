//! One small C program per kind of fd (tests/fds/*.c, zdtm style): each sets up its
//! resource, blocks reading stdin (the warm point), and on each `check` line verifies the
//! resource and prints PASS or "FAIL: what differs". Every fixture is run cold first (it
//! must pass, and fail after its `break` negative control), then recorded and restored.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use common::{cold, compile, tempdir, Proc, Ws};

fn fixture(name: &str) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fds")
        .join(format!("{name}.c"));
    compile(&src, &["-O1", "-g", "-Wall"], &format!("fds-{name}"))
}

fn argv(bin: &Path, dir: Option<&Path>) -> Vec<std::ffi::OsString> {
    let mut v = vec![bin.as_os_str().to_owned()];
    if let Some(d) = dir {
        v.push(d.as_os_str().to_owned());
    }
    v
}

fn assert_all_pass(out: &common::Out, lines: usize, ctx: &str) {
    let want = "PASS\n".repeat(lines);
    assert!(
        out.stdout == want && out.code() == 0,
        "{ctx}: expected {lines}x PASS and exit 0:\n{}",
        out.describe()
    );
}

/// Cold (pass, and fail after `break`), then recorded and restored in every mode and
/// served, with the same `/proc` state as at the warm point (`common::zdtm_every_mode_of`).
fn run_fixture(name: &str, needs_dir: bool) {
    common::zdtm_every_mode_of(name, &fixture(name), needs_dir, &[]);
}

/// [`run_fixture`] for a fixture `warmstart serve` does not park (`why`).
fn run_fixture_not_served(name: &str, needs_dir: bool, why: &'static str) {
    common::zdtm_run(
        name,
        &fixture(name),
        &common::Zdtm {
            needs_dir,
            not_served: Some(why),
            ..common::Zdtm::default()
        },
    );
}

#[test]
fn eventfd_count_semaphore_and_nonblock() {
    run_fixture("eventfd", false);
}

#[test]
fn epoll_registrations_and_nesting() {
    run_fixture("epoll", false);
}

#[test]
fn timerfd_remaining_time_interval_and_ticks() {
    run_fixture("timerfd", false);
}

#[test]
fn signalfd_mask() {
    run_fixture("signalfd", false);
}

#[test]
fn memfd_and_deleted_file() {
    run_fixture("memfd", true);
}

#[test]
fn unix_pairs_with_queues_and_listeners() {
    run_fixture_not_served(
        "unix",
        true,
        "serve refuses to park instances with bound unix sockets",
    );
}

#[test]
fn netlink_sockets() {
    run_fixture_not_served(
        "netlink",
        false,
        "serve refuses to park instances with network sockets",
    );
}

#[test]
fn inotify_watches() {
    run_fixture("inotify", true);
}

#[test]
fn flock_and_posix_locks() {
    run_fixture_not_served(
        "locks",
        true,
        "serve refuses to park instances that hold file locks",
    );
}

fn read_port(dir: &Path) -> u16 {
    let text = std::fs::read_to_string(dir.join("port")).expect("the fixture writes its port");
    text.trim().parse().expect("a port number")
}

#[test]
fn tcp_listener_accepts_after_restore() {
    let bin = fixture("inet");
    let d = tempdir("ws-cold-");
    let out = cold(&argv(&bin, Some(d.path())), "check\n");
    assert_all_pass(&out, 1, "cold inet");

    let ws = Ws::new();
    let d = tempdir("ws-rec-");
    ws.record("inet", &argv(&bin, Some(d.path())));
    let port = read_port(d.path());
    let mut p = Proc::spawn(&mut ws.cmd(&["run", "inet"]));
    p.send("check");
    assert_eq!(p.read_line(), "PASS", "restored inet check");
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connecting to the restored listener on port {port}: {e}"));
    p.send("accept");
    assert_eq!(p.read_line(), "PASS", "restored inet accept");
    let mut got = String::new();
    conn.read_to_string(&mut got).unwrap();
    assert_eq!(got, "hi\n");
    p.close_stdin();
    let st = p.wait();
    assert!(st.success(), "restored inet exited with {st:?}");
}

#[test]
fn taken_port_is_named_at_restore() {
    let bin = fixture("inet");
    let ws = Ws::new();
    let d = tempdir("ws-rec-");
    ws.record("inet", &argv(&bin, Some(d.path())));
    let port = read_port(d.path());
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", port)).expect("port is free again");
    let out = ws.instance("inet", "check\n");
    out.assert_fail();
    assert!(
        out.stderr.contains(&format!("127.0.0.1:{port} is in use")),
        "the error should name the address:\n{}",
        out.describe()
    );
}

#[test]
fn established_tcp_is_refused_unless_tcp_close() {
    let bin = fixture("tcp_established");
    let out = cold(&argv(&bin, None), "check\n");
    assert_all_pass(&out, 1, "cold tcp_established");

    let ws = Ws::new();
    let args = |extra: &[&str]| {
        let mut a: Vec<std::ffi::OsString> = vec!["record".into()];
        a.extend(extra.iter().map(Into::into));
        a.extend(["--name".into(), "tcp".into(), "--".into()]);
        a.extend(argv(&bin, None));
        a
    };
    let out = ws.run(&args(&[]), "");
    out.assert_fail();
    assert!(
        out.stderr
            .contains("established TCP connection from 127.0.0.1:")
            && out.stderr.contains("fd ")
            && out.stderr.contains("--tcp-close"),
        "the refusal should name the fd, the addresses and the option:\n{}",
        out.describe()
    );

    ws.run(&args(&["--tcp-close"]), "").assert_ok();
    let out = ws.instance("tcp", "reset\n");
    assert_all_pass(&out, 1, "restored tcp_established");
}

#[test]
fn io_uring_is_refused_by_name() {
    let bin = fixture("io_uring");
    let out = cold(&argv(&bin, None), "check\n");
    if out.code() == 2 {
        eprintln!(
            "io_uring is not available here; skipping:\n{}",
            out.describe()
        );
        return;
    }
    assert_all_pass(&out, 1, "cold io_uring");
    let ws = Ws::new();
    let mut a: Vec<std::ffi::OsString> =
        vec!["record".into(), "--name".into(), "u".into(), "--".into()];
    a.extend(argv(&bin, None));
    let out = ws.run(&a, "");
    out.assert_fail();
    assert!(
        out.stderr.contains(
            "is an anonymous inode of type io_uring, which warmstart cannot checkpoint yet"
        ),
        "{}",
        out.describe()
    );
    let _ = std::io::stderr().flush();
}

/// `record` of `name` (with `args`) must fail with every one of `needles` in its stderr.
fn assert_refused(name: &str, args: &[&std::ffi::OsStr], needles: &[&str]) {
    let bin = fixture(name);
    let ws = Ws::new();
    let mut a: Vec<std::ffi::OsString> =
        vec!["record".into(), "--name".into(), name.into(), "--".into()];
    a.push(bin.into_os_string());
    a.extend(args.iter().map(|s| s.to_os_string()));
    let out = ws.run(&a, "");
    out.assert_fail();
    for n in needles {
        assert!(
            out.stderr.contains(n),
            "the refusal should say {n:?}:\n{}",
            out.describe()
        );
    }
}

/// An epoll registration whose fd was closed while its file lives on in a dup, its number
/// taken by another file since: restored under the same number, same events.
#[test]
fn epoll_with_a_closed_target() {
    run_fixture("epoll_closed", false);
}

#[test]
fn unix_socket_connected_outside_is_refused() {
    let d = tempdir("ws-out-");
    let path = d.path().join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    assert_refused(
        "unix_outside",
        &[path.as_os_str()],
        &["fd 3 is a unix socket connected to a peer outside the process"],
    );
}

/// A refused `record` stops its app cleanly: the app never runs on into its warm-point
/// trap without a tracer (it used to see ENOSYS from the filter and print a traceback).
#[test]
fn a_refused_record_stops_the_app_cleanly() {
    let ws = Ws::new();
    let py = common::python();
    let script = "import socket\n\
                  s = socket.create_server(('127.0.0.1', 0))\n\
                  c = socket.create_connection(s.getsockname())\n\
                  a, _ = s.accept()\n\
                  print(input())\n";
    let out = ws.run(
        &[
            "record".as_ref(),
            "--name".as_ref(),
            "refused".as_ref(),
            "--".as_ref(),
            py.as_os_str(),
            "-c".as_ref(),
            script.as_ref(),
        ],
        "",
    );
    out.assert_fail();
    assert!(
        out.stderr.contains("established TCP connection"),
        "the refusal should name the connection:\n{}",
        out.describe()
    );
    assert!(
        !out.stderr.contains("Errno 38") && !out.stderr.contains("Traceback"),
        "the app ran on after the refusal:\n{}",
        out.describe()
    );
}
