//! Real workloads from ../shared/workloads: each is recorded once, then restored in every
//! mode ([`Mode::ALL`]: lazy while learning the working set, eager, lazy with the working
//! set prefetched); every restored instance must print exactly what a cold run prints.

mod common;

use common::{cold, compile, python, workloads_dir, Mode, Ws};

/// Cold output of `argv` for `input`, then record + one restored run per mode compared
/// with it.
fn cold_vs_restored(name: &str, argv: &[std::ffi::OsString], input: &str) {
    let expected = cold(argv, input);
    expected.assert_ok();
    assert_eq!(
        expected.stdout.lines().count(),
        input.lines().count(),
        "cold {name} should answer one line per input line:\n{}",
        expected.describe()
    );
    let ws = Ws::new();
    let id = ws.record(name, argv);
    ws.each_mode(name, input, |mode, out| {
        assert!(
            out.success() && out.stdout == expected.stdout,
            "restored run of {name} ({id}), {mode}, differs from the cold run.\n--- cold stdout ---\n{}\n--- restored ---\n{}",
            expected.stdout,
            out.describe()
        );
    });
}

fn py(script: &str) -> Vec<std::ffi::OsString> {
    vec![
        python().into_os_string(),
        workloads_dir().join(script).into_os_string(),
    ]
}

#[test]
fn py_echo() {
    cold_vs_restored("py_echo", &py("py_echo.py"), "hello\nworld\nthird line\n");
}

#[test]
fn py_boto3() {
    cold_vs_restored("py_boto3", &py("py_boto3.py"), "get\nput\nlist\n");
}

#[test]
fn py_sympy() {
    cold_vs_restored("py_sympy", &py("py_sympy.py"), "3\n10\n25\n");
}

#[test]
fn c_mem_256() {
    let bin = compile(&workloads_dir().join("c/mem.c"), &["-O2"], "mem");
    cold_vs_restored(
        "mem",
        &[bin.into_os_string(), "256".into()],
        "head\nall\nhead\n",
    );
}

/// Eight instances of one snapshot at the same time, all correct: lazy ones (several may
/// learn the working set at once), eager ones, and lazy ones prefetching the learned set.
#[test]
fn py_echo_eight_concurrent_instances() {
    let argv = py("py_echo.py");
    let ws = Ws::new();
    ws.record("echo", &argv);
    for mode in Mode::ALL {
        eight_concurrent(&ws, mode);
    }
}

fn eight_concurrent(ws: &Ws, mode: Mode) {
    let outs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                s.spawn(move || {
                    let input: String = (0..20).map(|j| format!("instance{i} line{j}\n")).collect();
                    (input.clone(), ws.run_mode("echo", mode, &input))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (input, out)) in outs.iter().enumerate() {
        let want: String = input
            .lines()
            .enumerate()
            .map(|(n, l)| format!("{} {l}\n", n + 1))
            .collect();
        assert!(
            out.success() && out.stdout == want,
            "instance {i} ({mode}) is wrong:\n{}",
            out.describe()
        );
    }
}
