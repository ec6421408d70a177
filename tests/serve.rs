//! `warmstart serve` (DESIGN §9): `run` answered by a daemon from its pool of parked
//! instances. The zdtm fixtures and process trees also go through a parked instance each
//! (`common::zdtm_every_mode`); here: independence of instances, exit codes, signals, a
//! caller that vanishes, snapshots that cannot be parked, and the daemon's own errors.

mod common;

use common::{fixture, python, Proc, Ws, TIMEOUT};

/// Records `counter` and learns its working set with one run without a daemon (a run
/// through the daemon needs one).
fn counter_snapshot(ws: &Ws) {
    ws.record("counter", &[fixture("counter")]);
    let out = ws.run(&["run", "--no-serve", "counter"], "x\n");
    out.assert_ok();
    assert_eq!(out.stdout, "1 x\n", "{}", out.describe());
}

#[test]
fn parked_instances_are_independent_copies_of_the_snapshot() {
    let ws = Ws::new();
    counter_snapshot(&ws);
    let daemon = ws.serve("counter");
    for i in 0..3 {
        let out = ws.served("counter", &format!("a{i}\nb{i}\n"));
        out.assert_ok();
        // Each starts from the snapshot's state, not from the previous instance's.
        assert_eq!(
            out.stdout,
            format!("1 a{i}\n2 b{i}\n"),
            "{}",
            out.describe()
        );
        // The pool refills after each hand-out.
        daemon.wait_stderr("parked an instance of");
    }
    // The same bytes as a restore without the daemon.
    let local = ws.run(&["run", "--no-serve", "counter"], "a0\nb0\n");
    assert_eq!(local.stdout, "1 a0\n2 b0\n", "{}", local.describe());
}

#[test]
fn signals_reach_the_instance_and_a_vanished_caller_takes_it_along() {
    let ws = Ws::new();
    counter_snapshot(&ws);
    let rt = common::tempdir("ws-rt-");
    let mut daemon_cmd = ws.cmd(&["-v", "serve", "--warm", "counter"]);
    daemon_cmd.env("XDG_RUNTIME_DIR", rt.path());
    let daemon = Proc::spawn(&mut daemon_cmd);
    daemon.read_line();
    daemon.wait_stderr("parked an instance of");

    // SIGTERM to `run` goes to the app, whose death by it is `run`'s exit code.
    let mut client = Proc::spawn(&mut ws.cmd(&["run", "counter"]));
    client.send("one");
    assert_eq!(client.read_line(), "1 one");
    // SAFETY: kill takes no pointers; `client` is our child, not yet waited for, so its pid
    // cannot have been reused.
    unsafe { libc::kill(client.pid(), libc::SIGTERM) };
    let status = client.wait();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");

    // A caller killed outright: its instance goes too.
    daemon.wait_stderr("parked an instance of");
    let mut client = Proc::spawn(
        ws.cmd(&["run", "counter"])
            .env("XDG_RUNTIME_DIR", rt.path()),
    );
    client.send("two");
    assert_eq!(client.read_line(), "1 two");
    let listed = ws.ps_json(rt.path());
    let app = listed
        .iter()
        .find(|i| i["client"].as_i64() == Some(client.pid() as i64))
        .unwrap_or_else(|| {
            panic!(
                "ps --json lists no instance for client {}: {listed:?}",
                client.pid()
            )
        })["pid"]
        .as_i64()
        .unwrap() as i32;
    assert!(common::alive(app));
    // SAFETY: kill takes no pointers; `client` is our child, not yet waited for, so its pid
    // cannot have been reused.
    unsafe { libc::kill(client.pid(), libc::SIGKILL) };
    client.wait();
    assert!(
        common::wait_pid_exit(app, TIMEOUT),
        "instance {app} outlived its killed caller"
    );
}

/// A TCP listener does not keep an instance from being parked: the parked one holds a
/// placeholder and gets the listener, bound at its recorded port, when handed out (the
/// port is free meanwhile). Other network sockets (a bound UDP socket) still do.
#[test]
fn instances_holding_a_port_are_parked_and_get_their_listener_at_hand_out() {
    let ws = Ws::new();
    let listen = "import socket, sys\n\
                  s = socket.socket()\n\
                  s.bind(('127.0.0.1', 0))\n\
                  s.listen()\n\
                  for line in sys.stdin:\n    print('port', s.getsockname()[1], line.strip(), flush=True)\n";
    ws.record(
        "listen",
        &[python().as_os_str(), "-c".as_ref(), listen.as_ref()],
    );
    let learn = ws.run(&["run", "--no-serve", "listen"], "a\n");
    learn.assert_ok();
    let port = |s: &str| s.split_whitespace().nth(1).map(str::to_owned);
    let recorded: u16 = port(&learn.stdout).unwrap().parse().unwrap();
    let daemon = ws.serve("listen");
    for i in 0..2 {
        if i > 0 {
            // The replacement of the instance the first run took.
            daemon.wait_stderr("parked an instance of");
        }
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", recorded)).is_ok(),
            "a parked instance leaves port {recorded} free"
        );
        let out = ws.served("listen", "b\n");
        out.assert_ok();
        // The same port as at the warm point, which the first run printed too.
        assert_eq!(port(&out.stdout), port(&learn.stdout), "{}", out.describe());
    }
    drop(daemon);
    let udp = "import socket, sys\n\
               s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
               s.bind(('127.0.0.1', 0))\n\
               for line in sys.stdin:\n    print('udp', line.strip(), flush=True)\n";
    ws.record("udp", &[python().as_os_str(), "-c".as_ref(), udp.as_ref()]);
    ws.run(&["run", "--no-serve", "udp"], "a\n").assert_ok();
    let daemon = Proc::spawn(&mut ws.cmd(&["-v", "serve", "--warm", "udp"]));
    daemon.read_line();
    let why = daemon.wait_stderr("are not parked");
    assert!(why.contains("network sockets"), "{why}");
    let out = ws.run(&["run", "--display-stats", "udp"], "b\n");
    out.assert_ok();
    assert!(
        out.stderr.contains("by serve (restored)"),
        "{}",
        out.describe()
    );
}

#[test]
fn daemon_errors_are_clear_and_a_dead_daemon_is_not_needed() {
    let ws = Ws::new();
    counter_snapshot(&ws);
    let mut daemon = Proc::spawn(&mut ws.cmd(&["serve", "--pool", "0"]));
    let line = daemon.read_line();
    let socket = ws.store().join("serve.sock");
    assert!(line.ends_with(&socket.display().to_string()), "{line}");

    let second = ws.run(&["serve"], "");
    second.assert_fail();
    assert!(
        second.stderr.contains("already listens"),
        "{}",
        second.describe()
    );

    let missing = ws.run(&["run", "nosuch"], "");
    missing.assert_fail();
    assert!(missing.stderr.contains("nosuch"), "{}", missing.describe());

    // Without a pool every request is restored on the spot.
    let out = ws.run(&["run", "--display-stats", "counter"], "z\n");
    out.assert_ok();
    assert_eq!(out.stdout, "1 z\n");
    assert!(
        out.stderr.contains("by serve (restored)"),
        "{}",
        out.describe()
    );

    // A daemon killed outright leaves its socket file: `run` restores by itself, and a
    // new daemon takes the place.
    // SAFETY: kill takes no pointers; `daemon` is our child, not yet waited for, so its pid
    // cannot have been reused.
    unsafe { libc::kill(daemon.pid(), libc::SIGKILL) };
    daemon.wait();
    assert!(socket.exists());
    let out = ws.run(&["run", "--display-stats", "counter"], "y\n");
    out.assert_ok();
    assert_eq!(out.stdout, "1 y\n");
    assert!(!out.stderr.contains("by serve"), "{}", out.describe());
    let again = Proc::spawn(&mut ws.cmd(&["serve", "--pool", "0"]));
    assert!(again.read_line().starts_with("serving "));
}

#[test]
fn a_snapshot_without_working_set_learns_one_first() {
    let ws = Ws::new();
    ws.record("counter", &[fixture("counter")]);
    let daemon = Proc::spawn(&mut ws.cmd(&["serve"]));
    daemon.read_line();
    // Refused by the daemon (learning watches the caller's stdout): restored here.
    let out = ws.run(&["run", "--display-stats", "counter"], "q\n");
    out.assert_ok();
    assert_eq!(out.stdout, "1 q\n");
    assert!(!out.stderr.contains("by serve"), "{}", out.describe());
    assert!(ws.working_set_pages("counter").is_some_and(|n| n > 0));
    // Now the daemon takes it.
    let out = ws.run(&["run", "--display-stats", "counter"], "r\n");
    assert_eq!(out.stdout, "1 r\n");
    assert!(out.stderr.contains("by serve"), "{}", out.describe());
}

#[test]
fn an_event_loop_on_stdin_is_parked_and_watches_the_stdio_it_is_handed() {
    let ws = Ws::new();
    ws.record("loop", &[fixture("epoll_stdin")]);
    let learn = ws.run(&["run", "--no-serve", "loop"], "a\nb\n");
    learn.assert_ok();
    assert_eq!(learn.stdout, "1 a\n2 b\n", "{}", learn.describe());
    let daemon = ws.serve("loop");
    for i in 0..2 {
        let out = ws.served("loop", &format!("x{i}\ny{i}\n"));
        out.assert_ok();
        assert_eq!(
            out.stdout,
            format!("1 x{i}\n2 y{i}\n"),
            "{}",
            out.describe()
        );
        daemon.wait_stderr("parked an instance of");
    }
}

#[test]
fn removing_a_snapshot_stops_its_parked_instances() {
    let ws = Ws::new();
    counter_snapshot(&ws);
    ws.record("other", &[fixture("counter")]);
    ws.run(&["run", "--no-serve", "other"], "o\n").assert_ok();
    let daemon = ws.serve("counter");
    // The parked instance's sandbox is the daemon's only child.
    let sandboxes = Ws::sandboxes(daemon.pid());
    assert_eq!(
        sandboxes.len(),
        1,
        "one parked instance expected: {sandboxes:?}"
    );
    let parked = common::pidfd_open(sandboxes[0]).expect("pidfd of the parked sandbox");
    ws.run(&["rm", "counter"], "").assert_ok();
    // The next request (for another snapshot) lets go of the removed one's pool.
    let out = ws.run(&["run", "other"], "p\n");
    assert_eq!(out.stdout, "1 p\n", "{}", out.describe());
    assert!(
        common::wait_pidfd_exit(&parked, TIMEOUT),
        "the parked instance of a removed snapshot is still there"
    );
    let missing = ws.run(&["run", "counter"], "");
    missing.assert_fail();
    assert!(missing.stderr.contains("counter"), "{}", missing.describe());
}

/// The three remaining times `park_timers` prints, in ms.
fn remaining(out: &common::Out) -> Vec<i64> {
    out.stdout
        .split_whitespace()
        .skip(1)
        .step_by(2)
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{}", out.describe())))
        .collect()
}

#[test]
fn timers_do_not_run_down_while_parked() {
    let ws = Ws::new();
    ws.record("timers", &[fixture("park_timers")]);
    let started = std::time::Instant::now();
    let learn = ws.run(&["run", "--no-serve", "timers"], "t\n");
    // What the first run printed is what was left at the warm point less its own run
    // time, at most this long: what a handed-out instance has left is at most that.
    let learn_ms = started.elapsed().as_millis() as i64;
    learn.assert_ok();
    let at_warm_point = remaining(&learn);
    assert_eq!(at_warm_point.len(), 3, "{}", learn.describe());
    let _daemon = ws.serve("timers");
    // Time passing is the point here: the instance waits parked for it.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let out = ws.served("timers", "t\n");
    out.assert_ok();
    for (before, after) in at_warm_point.iter().zip(remaining(&out)) {
        assert!(
            after > before - 2000 && after <= *before + learn_ms,
            "a timer ran down while parked (or went on from more than was left at the warm \
             point): {before} ms left at the warm point's first run ({learn_ms} ms long), \
             {after} ms when handed out after 3 s parked\n{}",
            out.describe()
        );
    }
}

/// An app with handlers for signals beyond SIGINT/SIGTERM/SIGHUP. It prints each relayed signal its handler gets, and each line of stdin. A Python handler
/// runs between bytecodes: a signal that comes after the loop's last check and before it
/// blocks in a read would wait for the next line (a race of the app's own, widened by lazy
/// paging on the way to the read). The handler's wakeup fd (written by the C-level
/// handler) ends the wait on stdin instead, so every signal is answered.
const SIGNAL_APP: &str = "import os, select, signal\n\
    def on(sig, frame):\n    print('got', signal.Signals(sig).name, flush=True)\n\
    for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT, signal.SIGWINCH, signal.SIGALRM):\n    signal.signal(s, on)\n\
    r, w = os.pipe()\n\
    os.set_blocking(w, False)\n\
    signal.set_wakeup_fd(w)\n\
    buf = b''\n\
    while True:\n\
    \x20   ready = select.select([0, r], [], [])[0]\n\
    \x20   if r in ready:\n\
    \x20       os.read(r, 64)\n\
    \x20   if 0 in ready:\n\
    \x20       data = os.read(0, 4096)\n\
    \x20       if not data:\n\
    \x20           break\n\
    \x20       buf += data\n\
    \x20       while b'\\n' in buf:\n\
    \x20           line, buf = buf.split(b'\\n', 1)\n\
    \x20           print('line', line.decode(), flush=True)\n";

/// Sends `run` (already answering) each signal and expects the app's handler to print it.
fn relays_signals(client: &mut Proc) {
    client.send("one");
    assert_eq!(client.read_line(), "line one");
    for (sig, name) in [
        (libc::SIGQUIT, "SIGQUIT"),
        (libc::SIGUSR1, "SIGUSR1"),
        (libc::SIGUSR2, "SIGUSR2"),
        (libc::SIGWINCH, "SIGWINCH"),
        (libc::SIGALRM, "SIGALRM"),
    ] {
        // SAFETY: kill takes no pointers.
        unsafe { libc::kill(client.pid(), sig) };
        assert_eq!(client.read_line(), format!("got {name}"));
    }
    client.send("two");
    assert_eq!(client.read_line(), "line two");
    client.close_stdin();
    let status = client.wait();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[test]
fn every_signal_a_caller_sends_reaches_the_app_directly_and_through_serve() {
    let ws = Ws::new();
    ws.record(
        "sigs",
        &[python().as_os_str(), "-c".as_ref(), SIGNAL_APP.as_ref()],
    );
    let learn = ws.run(&["run", "--no-serve", "sigs"], "a\n");
    learn.assert_ok();
    assert_eq!(learn.stdout, "line a\n", "{}", learn.describe());

    // `run` restoring by itself: SIGQUIT no longer kills `run` (and the app with it).
    relays_signals(&mut Proc::spawn(&mut ws.cmd(&[
        "run",
        "--no-serve",
        "sigs",
    ])));

    // Through the daemon: the client relays, the daemon signals the instance.
    let _daemon = ws.serve("sigs");
    let mut client = Proc::spawn(&mut ws.cmd(&["run", "--display-stats", "sigs"]));
    client.wait_stderr("by serve (parked instance)");
    relays_signals(&mut client);
}

/// Requests faster than the pool refills: each one that finds no instance ready is
/// restored on the spot (never queued behind a parker), and the pool grows with demand.
#[test]
fn a_burst_of_requests_is_answered_and_grows_the_pool() {
    let ws = Ws::new();
    counter_snapshot(&ws);
    let daemon = ws.serve("counter");
    let outs: Vec<common::Out> = std::thread::scope(|s| {
        let jobs: Vec<_> = (0..6)
            .map(|i| {
                let ws = &ws;
                s.spawn(move || ws.run(&["run", "--display-stats", "counter"], &format!("b{i}\n")))
            })
            .collect();
        jobs.into_iter().map(|j| j.join().unwrap()).collect()
    });
    for (i, out) in outs.iter().enumerate() {
        out.assert_ok();
        assert_eq!(out.stdout, format!("1 b{i}\n"), "{}", out.describe());
        assert!(out.stderr.contains("by serve ("), "{}", out.describe());
    }
    daemon.wait_stderr("restoring this request on the spot");
    let grew = daemon.wait_stderr("grows to");
    assert!(grew.contains("at most 4"), "{grew}");
    // The grown pool fills: more than one instance parked (or parking) at once, each a
    // sandbox of the daemon's (the burst's instances are over).
    let sandboxes = || Ws::sandboxes(daemon.pid()).len();
    daemon.wait_stderr("parked an instance of");
    while sandboxes() < 2 {
        daemon.wait_stderr("parked an instance of");
    }
    // Sequential requests are answered by parked instances again.
    ws.served("counter", "c\n").assert_ok();
}

/// Anonymous memory of an instance's app: (Anonymous, Pss_Anon) in kB.
fn anon_kb(pid: i32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("Anonymous:"), field("Pss_Anon:"))
}

/// A first run of the pattern fixture recorded as `pat`, alone: it learns the working set
/// (served runs need one).
fn learn_pattern(ws: &Ws) {
    let learn = ws.run(&["run", "--no-serve", "pat"], "check\n");
    assert_eq!(learn.stdout, "PASS\n", "{}", learn.describe());
}

/// Instances parked from a snapshot's template share its memory (issue 15): each parked
/// app's anonymous memory is mostly shared (its proportional share a fraction of what it
/// maps), where without templates each holds its own copy; and they answer as usual.
#[test]
fn parked_instances_share_the_template_s_memory() {
    let ws = Ws::new();
    ws.record("pat", &[fixture("pattern").as_os_str(), "16".as_ref()]);
    learn_pattern(&ws);
    for (templates, shared) in [(true, true), (false, false)] {
        let mut args = vec!["-v", "serve", "--pool", "2", "--warm", "pat"];
        if !templates {
            args.push("--no-templates");
        }
        let rt = common::tempdir("ws-rt-");
        let daemon = Proc::spawn(ws.cmd(&args).env("XDG_RUNTIME_DIR", rt.path()));
        let line = daemon.read_line();
        assert!(line.starts_with("serving "), "serve printed {line:?}");
        if templates {
            daemon.wait_stderr("template of");
        }
        daemon.wait_stderr("parked an instance of");
        daemon.wait_stderr("parked an instance of");
        let apps: Vec<i32> = Ws::sandboxes(daemon.pid())
            .into_iter()
            .flat_map(common::children)
            .collect();
        assert_eq!(apps.len(), 2, "two parked apps expected: {apps:?}");
        for &app in &apps {
            let (rss, pss) = anon_kb(app);
            assert!(
                rss >= 16 << 10,
                "app {app} maps {rss} kB of anonymous memory"
            );
            assert_eq!(
                pss * 2 < rss,
                shared,
                "templates {templates}: app {app} has Pss_Anon {pss} kB of Rss_Anon {rss} kB"
            );
        }
        let out = ws.served("pat", "check\n");
        assert_eq!(out.stdout, "PASS\n", "{}", out.describe());
        // `ps` lists the template apart from instances.
        let listed = ws.ps_json(rt.path());
        let listed_templates = listed
            .iter()
            .filter(|i| i["template"].as_bool() == Some(true))
            .count();
        assert_eq!(listed_templates, usize::from(templates), "{listed:?}");
        // The next daemon takes the same socket: stop this one as a user would (it
        // removes its socket). Killed instead, its template could still hold the socket,
        // exiting, when the next one starts, and that one would refuse to.
        let mut daemon = daemon;
        // SAFETY: kill takes integer arguments only.
        unsafe { libc::kill(daemon.pid(), libc::SIGTERM) };
        assert!(daemon.wait().success(), "serve stopped by SIGTERM");
    }
}

/// Hands out instances of `pat` that each verify the area (their first work), send
/// `also`, and sleep (quiet, still there), until the daemon prints `learned` (returned,
/// with the instances): on a host too busy for an instance to work within the daemon's
/// wait, it parks the next one without learning, and that one is asked the same.
fn learn_from_instances(ws: &Ws, daemon: &Proc, also: &str, learned: &str) -> (String, Vec<Proc>) {
    let mut instances = Vec::new();
    loop {
        assert!(instances.len() < 5, "nothing learned from 5 instances");
        let mut instance = Proc::spawn(&mut ws.cmd(&["run", "pat"]));
        instance.send(&format!("check\n{also}sleep"));
        assert_eq!(instance.read_line(), "PASS");
        assert_eq!(instance.read_line(), "SLEEPING");
        instances.push(instance);
        if let (0, line) = daemon.wait_stderr_any(&[learned, "parked an instance of"]) {
            return (line, instances);
        }
    }
}

/// The count after `word` in a line of the daemon's.
fn count_after(line: &str, word: &str) -> u64 {
    line.split_whitespace()
        .skip_while(|w| *w != word)
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no page count in {line:?}"))
}

/// The pages an instance from a template writes by its first answer are learned once it
/// has gone quiet, and every instance parked after that gets its own copy of those it
/// still shares, at parking (issue 15: its first request pays no copy-on-write fault on
/// them). The copies hold the snapshot's bytes, not those of the instance they were
/// learned from (which flipped a byte of the area), and the instance's `/proc` state is
/// the one recorded.
#[test]
fn pages_written_first_are_copied_at_parking_with_the_snapshot_s_bytes() {
    let ws = Ws::new();
    let captures = common::tempdir("ws-state-");
    let before_path = captures.path().join("before");
    ws.record_env(
        "pat",
        &[fixture("pattern").as_os_str(), "16".as_ref()],
        &[("ZDTM_STATE", before_path.as_os_str())],
    );
    let before = std::fs::read_to_string(&before_path).unwrap();
    learn_pattern(&ws);
    let daemon = ws.serve_with(&["-vv", "serve", "--warm", "pat"]);

    // An instance verifies the whole area (its first work), flips a byte of it and
    // waits.
    let (learned, instances) =
        learn_from_instances(&ws, &daemon, "break\n", "by their first answer");
    // The code the first request ran is in the next instances' page tables before they
    // are offered (a fork copies none of a read-only file mapping's); then the pages it
    // wrote are their own.
    let code = daemon.wait_stderr("pages of code the first request runs");
    let mapped = count_after(&code, "mapped");
    assert!(mapped > 0, "no code mapped ahead: {learned} / {code}");
    let copied = daemon.wait_stderr("the first request writes into a parked instance");
    let pages = count_after(&copied, "copied");
    assert!(pages > 0, "nothing copied: {learned} / {copied}");
    daemon.wait_stderr("parked an instance of");

    // Handed out: the snapshot's bytes, every one, and its recorded /proc state.
    let out = ws.served("pat", common::STATE_CHECK_TWICE);
    let ctx = format!(
        "served after {pages} pages were copied in and {mapped} pages of code mapped at \
         parking"
    );
    let (after, rest) = common::state::split_state(&out.stdout)
        .unwrap_or_else(|| panic!("{ctx}: no state capture:\n{}", out.describe()));
    let diffs = common::state::differences(&ctx, &before, common::state::Taken::AtRecord, after);
    common::state::report(&ctx, &diffs);
    assert_eq!(rest, "PASS\nPASS\n", "{ctx}:\n{}", out.describe());
    assert_eq!(out.code(), 0, "{ctx}:\n{}", out.describe());
    drop(instances);
}

/// Instances parked with their own memory (`--no-templates`) have the code their first
/// request runs mapped ahead too: their restorer maps the program's files anew, and
/// their first request would fault in all of that code.
#[test]
fn instances_with_their_own_memory_have_their_code_mapped_ahead() {
    let ws = Ws::new();
    ws.record("pat", &[fixture("pattern").as_os_str(), "16".as_ref()]);
    learn_pattern(&ws);
    let daemon = ws.serve_with(&["-vv", "serve", "--no-templates", "--warm", "pat"]);
    let (learned, instances) = learn_from_instances(&ws, &daemon, "", "pages of code mapped by");
    let code = daemon.wait_stderr("pages of code the first request runs");
    let mapped = count_after(&code, "mapped");
    assert!(mapped > 0, "no code mapped ahead: {learned} / {code}");
    daemon.wait_stderr("parked an instance of");
    let out = ws.served("pat", "check\n");
    assert_eq!(out.stdout, "PASS\n", "{}", out.describe());
    drop(instances);
}

/// The daemon keeps the store's names between requests: a served instance is listed
/// (`ps`) under the names its snapshot has when it starts, and not under a name that
/// has moved since to a snapshot recorded again.
#[test]
fn served_instances_are_listed_under_the_names_their_snapshot_has_now() {
    let ws = Ws::new();
    counter_snapshot(&ws);
    let id_named = |name: &str| -> String {
        let ls = ws.run(&["ls", "--json"], "");
        let v: serde_json::Value = serde_json::from_str(&ls.stdout).unwrap();
        v.as_array()
            .into_iter()
            .flatten()
            .find(|s| {
                s["names"]
                    .as_array()
                    .is_some_and(|n| n.iter().any(|x| x == name))
            })
            .and_then(|s| s["id"].as_str())
            .unwrap_or_else(|| panic!("no snapshot named {name}: {}", ls.describe()))
            .to_owned()
    };
    // The names `ps` lists for each instance of snapshot `id` (templates aside), sorted.
    let listed = |id: &str| -> Vec<Vec<String>> {
        let ps = ws.run(&["ps", "--json"], "");
        let v: serde_json::Value = serde_json::from_str(&ps.stdout).unwrap();
        let mut names: Vec<Vec<String>> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["snapshot"] == id && i["template"] != true)
            .map(|i| {
                i["names"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|n| n.as_str().unwrap().to_owned())
                    .collect()
            })
            .collect();
        names.sort();
        names
    };
    let old = id_named("counter");
    let daemon = ws.serve("counter");
    let mut first = Proc::spawn(&mut ws.cmd(&["run", "counter"]));
    first.send("a");
    assert_eq!(first.read_line(), "1 a");
    assert_eq!(listed(&old), vec![vec!["counter".to_owned()]]);
    // Recorded again under the same name: the name moves to the new snapshot.
    ws.record("counter", &[fixture("counter")]);
    assert_ne!(id_named("counter"), old);
    daemon.wait_stderr("parked an instance of");
    let mut second = Proc::spawn(&mut ws.cmd(&["run", &old]));
    second.send("b");
    assert_eq!(second.read_line(), "1 b");
    assert_eq!(
        listed(&old),
        vec![Vec::<String>::new(), vec!["counter".to_owned()]],
        "the instance started after the name moved is listed without it"
    );
    for mut p in [first, second] {
        p.close_stdin();
        assert!(p.wait().success());
    }
}
