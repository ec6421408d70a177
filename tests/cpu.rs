//! A snapshot taken on another CPU (issue 19, portability): simulated by rewriting the
//! snapshot's CPU record in the store (a new manifest over the same page records). A
//! restore refuses, naming it, a feature or xsave state this CPU lacks, and moves the
//! threads' saved xsave images from a smaller layout to this CPU's, bit-exact;
//! `check --snapshot` says the same before any restore.

mod common;

use common::{fixture, Ws};
use warmstart_snapshots::model::Manifest;
use warmstart_snapshots::store::Store;

/// Stores snapshot `name` again as `new_name` with its manifest changed by `edit`.
fn rewrite(ws: &Ws, name: &str, new_name: &str, edit: impl FnOnce(&mut Manifest)) {
    let store = Store::open_existing(ws.store()).unwrap();
    let snap = store.load(&store.resolve(name).unwrap()).unwrap();
    let mut m = snap.manifest.clone();
    edit(&mut m);
    let mut w = store.writer().unwrap();
    w.set_base(&snap.id).unwrap();
    w.add_base(&[(0, 0, snap.page_count())], &mut Vec::new())
        .unwrap();
    w.commit(m, Some(new_name)).unwrap();
}

fn host_of(ws: &Ws, name: &str) -> warmstart_snapshots::model::HostFacts {
    let store = Store::open_existing(ws.store()).unwrap();
    let snap = store.load(&store.resolve(name).unwrap()).unwrap();
    snap.manifest.host.clone()
}

#[test]
fn other_cpus_refused_by_name_or_state_moved() {
    let ws = Ws::new();
    let exe = fixture("ymm_state");
    ws.record("app", &[&exe]);
    let host = host_of(&ws, "app");
    assert!(
        host.cpu_features.iter().any(|f| f == "sse2"),
        "{:?}",
        host.cpu_features
    );
    let out = ws.run(&["run", "--no-serve", "app"], "a\n");
    out.assert_ok();
    if out.stdout == "no avx\n" {
        eprintln!("this CPU has no AVX: the xsave move is not exercised here");
        return;
    }
    assert_eq!(out.stdout, "ymm ok\n", "{}", out.describe());
    let check = ws.run(&["check", "--snapshot", "app"], "");
    check.assert_ok();
    assert!(
        check.stdout.contains("it can run here"),
        "{}",
        check.describe()
    );

    // A CPU feature this CPU does not have.
    rewrite(&ws, "app", "newer", |m| {
        m.host.cpu_features.push("avx1024_future".into())
    });
    let out = ws.run(&["run", "--no-serve", "newer"], "a\n");
    out.assert_fail();
    assert!(
        out.stderr.contains("this CPU lacks avx1024_future") && out.stdout.is_empty(),
        "{}",
        out.describe()
    );
    let check = ws.run(&["check", "--snapshot", "newer", "--json"], "");
    check.assert_fail();
    let v: serde_json::Value = serde_json::from_str(&check.stdout).unwrap();
    assert_eq!(v["runnable"], false, "{v}");
    assert_eq!(v["cpu"]["ok"], false, "{v}");
    assert_eq!(v["kernel"]["ok"], true, "{v}");
    assert!(v["cpu"]["detail"]
        .as_str()
        .unwrap()
        .contains("avx1024_future"));

    // Saved xsave state this CPU does not enable (APX first: no feature of warmstart's
    // table stands for it, so it is never taken for the state of a feature the app could
    // not see, which may be missing when unused).
    let absent = [19u8, 9, 17, 18]
        .into_iter()
        .find(|&i| host.xsave_features >> i & 1 == 0)
        .expect("some xsave component is not enabled here");
    rewrite(&ws, "app", "morestate", |m| {
        m.host.xsave_features |= 1 << absent
    });
    let out = ws.run(&["run", "--no-serve", "morestate"], "a\n");
    out.assert_fail();
    assert!(
        out.stderr.contains("does not enable xsave state") && out.stdout.is_empty(),
        "{}",
        out.describe()
    );

    // Saved on a CPU with only x87, SSE and AVX state (no AVX-512): every thread's image
    // cut to that layout. The restore moves it back into this CPU's, ymm intact.
    if host.xsave_features == 0x7 {
        return;
    }
    let avx = *host.xsave_layout.iter().find(|c| c.0 == 2).unwrap();
    rewrite(&ws, "app", "avxonly", |m| {
        m.host.xsave_features = 0x7;
        m.host.xsave_layout = vec![avx];
        let end = (avx.1 + avx.2) as usize;
        m.host.xsave_size = end as u32;
        for p in &mut m.processes {
            for t in &mut p.threads {
                t.xsave.truncate(end);
                let bv = u64::from_le_bytes(t.xsave[512..520].try_into().unwrap()) & 0x7;
                t.xsave[512..520].copy_from_slice(&bv.to_le_bytes());
            }
        }
    });
    let check = ws.run(&["check", "--snapshot", "avxonly"], "");
    check.assert_ok();
    assert!(
        check.stdout.contains("xsave state moved from XCR0 0x7"),
        "{}",
        check.describe()
    );
    let out = ws.run(&["run", "--no-serve", "avxonly"], "a\n");
    out.assert_ok();
    assert_eq!(out.stdout, "ymm ok\n", "{}", out.describe());
}

/// Whether this host can show an app less than it has: CPUID faulting, and AVX-512 to
/// hide (else the test says why it does nothing).
fn can_mask_avx512() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .unwrap()
        .split_whitespace()
        .collect();
    for need in ["cpuid_fault", "avx512f", "avx2"] {
        if !flags.contains(&need) {
            eprintln!("this host has no {need}: `record --cpu-baseline` is not exercised here");
            return false;
        }
    }
    true
}

/// `record --cpu-baseline x86-64-v3`: the app's own CPUID instructions, in the process,
/// a thread, a forked child and an exec'd program, show no AVX-512 (a cold run shows
/// it); its own SIGSEGVs still reach its handler; the snapshot needs no avx512* and its
/// threads hold no AVX-512 state in use; the restored app's memory, signal mask and
/// handler are exact, its ymm registers too, and it sees the real CPU again.
#[test]
fn cpu_baseline_hides_what_the_level_lacks() {
    if !can_mask_avx512() {
        return;
    }
    let ws = Ws::new();
    let exe = fixture("cpu_seen");
    let cold = common::cold(&[&exe], "x\n");
    cold.assert_ok();
    assert!(
        cold.stdout.contains("parent avx512f=1 avx2=1") && cold.stdout.contains("exec avx512f=1"),
        "{}",
        cold.describe()
    );

    let rec = ws.run(
        &[
            "record".as_ref(),
            "--name".as_ref(),
            "v3".as_ref(),
            "--cpu-baseline".as_ref(),
            "x86-64-v3".as_ref(),
            "--".as_ref(),
            exe.as_os_str(),
        ],
        "",
    );
    rec.assert_ok();
    // Before its warm point the app's output goes to record's stderr.
    for tag in ["parent", "thread", "child", "exec"] {
        let want = format!("{tag} avx512f=0 avx2=1 avx=1 osxsave=1 sse4_2=1 aes=0\n");
        assert!(rec.stderr.contains(&want), "{want}{}", rec.describe());
    }
    assert!(
        rec.stderr
            .contains("segv read handled\nsegv kill handled\n"),
        "{}",
        rec.describe()
    );

    let host = host_of(&ws, "v3");
    assert_eq!(host.cpu_baseline.as_deref(), Some("x86-64-v3"));
    for f in ["avx2", "bmi2", "fma", "movbe", "sse4_2"] {
        assert!(host.cpu_features.iter().any(|x| x == f), "{f}: {host:?}");
    }
    for f in &host.cpu_features {
        assert!(
            !f.starts_with("avx512") && f != "aes" && f != "sha_ni",
            "{f} in {:?}",
            host.cpu_features
        );
    }
    let store = Store::open_existing(ws.store()).unwrap();
    let snap = store.load(&store.resolve("v3").unwrap()).unwrap();
    for p in &snap.manifest.processes {
        for t in &p.threads {
            let bv = u64::from_le_bytes(t.xsave[512..520].try_into().unwrap());
            assert_eq!(
                bv & 0xe0,
                0,
                "thread {} holds AVX-512 state: {bv:#x}",
                t.tid
            );
        }
    }
    let inspect = ws.run(&["inspect", "v3"], "");
    inspect.assert_ok();
    let needs = inspect
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("needs:"))
        .unwrap_or_default();
    assert!(
        inspect.stdout.contains("cpu baseline: x86-64-v3")
            && needs.contains("avx2")
            && !needs.contains("avx512"),
        "{}",
        inspect.describe()
    );
    let check = ws.run(&["check", "--snapshot", "v3", "--json"], "");
    check.assert_ok();
    let v: serde_json::Value = serde_json::from_str(&check.stdout).unwrap();
    assert_eq!(v["runnable"], true, "{v}");
    assert!(
        v["cpu"]["detail"]
            .as_str()
            .unwrap()
            .contains("recorded with --cpu-baseline x86-64-v3"),
        "{v}"
    );

    let out = ws.run(&["run", "--no-serve", "v3"], "a\nb\n");
    out.assert_ok();
    let real = "now avx512f=1 avx2=1 avx=1 osxsave=1 sse4_2=1";
    assert_eq!(
        out.stdout.lines().filter(|l| *l == "state ok").count(),
        2,
        "{}",
        out.describe()
    );
    assert!(out.stdout.contains(real), "{}", out.describe());

    // The app left running after the dump executes CPUID natively (a faulting CPUID with
    // nobody to emulate it would kill it).
    let lr = ws.run(
        &[
            "record".as_ref(),
            "-R".as_ref(),
            "--name".as_ref(),
            "lr".as_ref(),
            "--cpu-baseline".as_ref(),
            "x86-64-v3".as_ref(),
            "--".as_ref(),
            exe.as_os_str(),
        ],
        "a\n",
    );
    lr.assert_ok();
    assert!(
        lr.stdout.contains("state ok\n") && lr.stdout.contains(real),
        "{}",
        lr.describe()
    );

    // Vector registers exact across a snapshot recorded under the emulation.
    let ymm = fixture("ymm_state");
    let rec = ws.run(
        &[
            "record".as_ref(),
            "--name".as_ref(),
            "ymm".as_ref(),
            "--cpu-baseline".as_ref(),
            "x86-64-v3".as_ref(),
            "--".as_ref(),
            ymm.as_os_str(),
        ],
        "",
    );
    rec.assert_ok();
    let out = ws.run(&["run", "--no-serve", "ymm"], "a\n");
    out.assert_ok();
    assert_eq!(out.stdout, "ymm ok\n", "{}", out.describe());
}

/// A level that does not exist is refused by name, before anything runs.
#[test]
fn cpu_baseline_unknown_level_refused() {
    let ws = Ws::new();
    let out = ws.run(
        &["record", "--cpu-baseline", "x86-64-v9", "--", "/bin/true"],
        "",
    );
    out.assert_fail();
    assert!(
        out.stderr.contains("unknown CPU baseline \"x86-64-v9\"")
            && out.stderr.contains("x86-64-v2, x86-64-v3, x86-64-v4"),
        "{}",
        out.describe()
    );
}

/// A real interpreter recorded with only x86-64-v2 visible (glibc takes its SSE paths:
/// no AVX, no XSAVE shown) answers exactly after a restore.
#[test]
fn cpu_baseline_v2_python() {
    if !can_mask_avx512() {
        return;
    }
    let ws = Ws::new();
    let py = common::python();
    let app = common::workloads_dir().join("py_echo.py");
    let rec = ws.run(
        &[
            "record".as_ref(),
            "--name".as_ref(),
            "py".as_ref(),
            "--cpu-baseline".as_ref(),
            "x86-64-v2".as_ref(),
            "--".as_ref(),
            py.as_os_str(),
            app.as_os_str(),
        ],
        "",
    );
    rec.assert_ok();
    let host = host_of(&ws, "py");
    assert_eq!(host.cpu_baseline.as_deref(), Some("x86-64-v2"));
    assert!(
        !host
            .cpu_features
            .iter()
            .any(|f| f.starts_with("avx") || f == "xsave"),
        "{:?}",
        host.cpu_features
    );
    let out = ws.run(&["run", "--no-serve", "py"], "hello\nworld\n");
    out.assert_ok();
    assert_eq!(out.stdout, "1 hello\n2 world\n", "{}", out.describe());
}

/// An app that executes CPUID without end keeps the emulation busy: `--timeout` still
/// gives up (and nothing of the app is left running), `--ready after=` still takes its
/// snapshot (the restored app then sees the real CPU); an app that exits before its
/// warm point fails the record.
#[test]
fn cpu_baseline_deadlines_fire_under_a_cpuid_loop() {
    if !can_mask_avx512() {
        return;
    }
    let ws = Ws::new();
    let exe = fixture("cpuid_loop");
    let record = |extra: &[&str], name: &str, argv: &[&std::ffi::OsStr]| {
        let mut args: Vec<&std::ffi::OsStr> = vec!["record".as_ref()];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        args.extend(
            ["--cpu-baseline", "x86-64-v3", "--name", name, "--"].map(std::ffi::OsStr::new),
        );
        args.extend(argv);
        ws.run(&args, "")
    };

    let out = record(&["--timeout", "1"], "never", &[exe.as_os_str()]);
    out.assert_fail();
    assert!(
        out.stderr.contains("did not reach its warm point")
            && out.stderr.contains("nothing was stored"),
        "{}",
        out.describe()
    );
    let left = std::process::Command::new("pgrep")
        .args(["-f", &exe.to_string_lossy()])
        .output()
        .unwrap();
    assert!(
        left.stdout.is_empty(),
        "left running: {}",
        String::from_utf8_lossy(&left.stdout)
    );

    let rec = record(&["--ready", "after=300ms"], "loop", &[exe.as_os_str()]);
    rec.assert_ok();
    assert!(!rec.stderr.contains("avx512f=1"), "{}", rec.describe());
    let run = common::Proc::spawn(&mut ws.cmd(&["run", "--no-serve", "loop"]));
    let line = run.read_line();
    assert!(line.ends_with(" avx512f=1"), "{line:?}");
    drop(run);

    let out = record(&[], "gone", &["/bin/true".as_ref()]);
    out.assert_fail();
    assert!(
        out.stderr
            .contains("exited with status 0 before its warm point"),
        "{}",
        out.describe()
    );
}
