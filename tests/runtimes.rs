//! Real runtimes (JVM, Node, Python's multiprocessing) recorded at their first read of
//! stdin (`--ready stdin`, the default): restored instances, one after another and eight
//! at once, print exactly what a cold run prints.

mod acc_util;
mod common;

use std::ffi::OsString;
use std::time::Instant;

use acc_util::{instances_of, java_argv, which, InstanceGuard};
use common::{cold, python, workloads_dir, Proc, Ws};

const INPUT: &str = "hello world\nsecond Line 2\nthird: x-y-z\n";

/// Cold output for [`INPUT`], checked to be one answer per line.
fn cold_out(name: &str, argv: &[OsString]) -> String {
    let out = cold(argv, INPUT);
    out.assert_ok();
    assert_eq!(
        out.stdout.lines().count(),
        INPUT.lines().count(),
        "cold {name} should answer one line per input line:\n{}",
        out.describe()
    );
    out.stdout
}

/// Record `argv` (default trigger), then three instances one after another, each printing
/// exactly the cold output.
fn three_in_a_row(name: &str, argv: &[OsString]) {
    let expected = cold_out(name, argv);
    let ws = Ws::new();
    let t = Instant::now();
    let id = ws.record(name, argv);
    eprintln!("{name}: record took {:?}", t.elapsed());
    let _guard = InstanceGuard {
        ws: &ws,
        id: id.clone(),
    };
    for round in 1..=3 {
        let t = Instant::now();
        let out = ws.instance(name, INPUT);
        eprintln!("{name}: instance {round} took {:?}", t.elapsed());
        assert!(
            out.success() && out.stdout == expected,
            "restored {name} ({id}), instance {round}, differs from the cold run.\n--- cold stdout ---\n{expected}\n--- restored ---\n{}",
            out.describe()
        );
    }
    assert!(instances_of(&ws, &id).is_empty(), "instances left running");
}

#[test]
fn java_echo_three_instances() {
    three_in_a_row("java_echo", &java_argv("Echo"));
}

/// The JVM without its perf-data file (`-XX:-UsePerfData`): no `/tmp/hsperfdata_USER/2`
/// shared mapping that a restored instance rewrites.
#[test]
fn java_echo_three_instances_no_perfdata() {
    let mut argv = java_argv("Echo");
    argv.insert(1, "-XX:-UsePerfData".into());
    three_in_a_row("java_echo_noperf", &argv);
}

#[test]
fn node_echo_three_instances() {
    three_in_a_row(
        "node_echo",
        &[
            which("node").into_os_string(),
            workloads_dir().join("node_echo.js").into_os_string(),
        ],
    );
}

/// Eight instances of one JVM snapshot at once, each with its own input, all correct.
fn java_eight_concurrent(name: &str, argv: &[OsString]) {
    let inputs: Vec<String> = (0..8)
        .map(|i| format!("instance {i} alpha\nBeta{i} gamma\nline {i}-3\n"))
        .collect();
    // Expected answers: one cold run with all eight inputs (the counter restarts per run).
    let expected: Vec<String> = inputs
        .iter()
        .map(|inp| {
            let out = cold(argv, inp);
            out.assert_ok();
            out.stdout
        })
        .collect();
    let ws = Ws::new();
    let id = ws.record(name, argv);
    let _guard = InstanceGuard {
        ws: &ws,
        id: id.clone(),
    };
    let t = Instant::now();
    let outs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = inputs
            .iter()
            .map(|inp| {
                let ws = &ws;
                s.spawn(move || {
                    let t = Instant::now();
                    let out = ws.instance(name, inp);
                    (out, t.elapsed())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    eprintln!(
        "{name}: eight concurrent instances took {:?} in all; each: {:?}",
        t.elapsed(),
        outs.iter().map(|(_, d)| *d).collect::<Vec<_>>()
    );
    let mut bad = Vec::new();
    for (i, ((out, _), want)) in outs.iter().zip(&expected).enumerate() {
        if !(out.success() && &out.stdout == want) {
            bad.push(format!(
                "instance {i}: expected\n{want}got:\n{}",
                out.describe()
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} of 8 concurrent instances of {name} ({id}) are wrong:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn java_echo_eight_concurrent() {
    java_eight_concurrent("java_echo8", &java_argv("Echo"));
}

#[test]
fn java_echo_eight_concurrent_no_perfdata() {
    let mut argv = java_argv("Echo");
    argv.insert(1, "-XX:-UsePerfData".into());
    java_eight_concurrent("java_echo8_noperf", &argv);
}

/// Python's `multiprocessing.Pool(2)` with a `multiprocessing.Lock`, a `Queue` and a
/// shared `Value` (issue 13): POSIX semaphores and an arena in `/dev/shm`, deleted and
/// mapped by the parent and both workers, plus the pipes between them and the queue's
/// feeder threads. Restored in every mode and
/// handed out by `serve`, it answers as a cold run does; two instances side by side each
/// have their own lock and counter.
#[test]
fn python_multiprocessing_pool() {
    let name = "py_pool";
    let argv = [
        python().into_os_string(),
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/mp_pool.py")
            .into_os_string(),
    ];
    let expected = cold_out(name, &argv);
    let ws = Ws::new();
    let id = ws.record(name, &argv);
    let _guard = InstanceGuard {
        ws: &ws,
        id: id.clone(),
    };
    let same = |how: &str, out: &common::Out| {
        assert!(
            out.success() && out.stdout == expected,
            "restored {name} ({id}), {how}, differs from the cold run.\n--- cold stdout ---\n{expected}\n--- restored ---\n{}",
            out.describe()
        );
    };
    ws.each_mode(name, INPUT, |mode, out| same(&mode.to_string(), out));

    // Side by side, lines interleaved: a lock or counter shared between the two would
    // show in the counts.
    let mut a = Proc::spawn(&mut ws.cmd(&["run", "--eager", name]));
    let mut b = Proc::spawn(&mut ws.cmd(&["run", name]));
    let (mut got_a, mut got_b) = (String::new(), String::new());
    for line in INPUT.lines() {
        for (p, got) in [(&mut a, &mut got_a), (&mut b, &mut got_b)] {
            p.send(line);
            got.push_str(&p.read_line());
            got.push('\n');
        }
    }
    for (p, got, which) in [(&mut a, &got_a, "eager"), (&mut b, &got_b, "lazy")] {
        p.close_stdin();
        let status = p.wait();
        assert!(
            status.success() && *got == expected,
            "{which} instance side by side: {status:?}\n--- cold ---\n{expected}--- got ---\n{got}"
        );
    }

    {
        let _daemon = ws.serve(name);
        same("served parked", &ws.served(name, INPUT));
    }
    assert!(instances_of(&ws, &id).is_empty(), "instances left running");
}
