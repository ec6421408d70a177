//! `dump --pre-dump` / `pre-dump` and `dump --prev`: memory copied while the app runs,
//! written pages tracked with userfaultfd `WP_ASYNC`, the final dump taking unwritten
//! pages from the last pre-dump. The restored process must see exactly the memory the
//! live one had, including pages written, dropped, mapped, unmapped and moved between
//! the dumps.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixture, tempdir, wait_pid_exit, KillGuard, Proc, Ws, TIMEOUT};

/// `warmstart ARGS` on `ws`'s store with the tracking holders' sockets under `rt`.
fn cmd(ws: &Ws, rt: &Path, args: &[&str]) -> Command {
    let mut c = ws.cmd(args);
    c.env("XDG_RUNTIME_DIR", rt);
    c
}

fn run(ws: &Ws, rt: &Path, args: &[&str]) -> common::Out {
    common::run_with(&mut cmd(ws, rt, args), b"", TIMEOUT)
}

fn digest(p: &mut Proc) -> String {
    p.send("digest");
    let l = p.read_line();
    assert!(l.starts_with("digest "), "{l}");
    l
}

fn step(p: &mut Proc, n: u32) {
    p.send("step");
    assert_eq!(p.read_line(), format!("stepped {n}"));
}

/// The fds of `pid` as `/proc` shows them (number and target).
fn fds(pid: i32) -> Vec<(String, PathBuf)> {
    let mut v: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            (n, std::fs::read_link(e.path()).unwrap_or_default())
        })
        .collect();
    v.sort();
    v
}

/// (pages read, pages taken from the previous image) from `--display-stats`.
fn counts(out: &common::Out) -> (u64, u64) {
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("taken from the previous image"))
        .unwrap_or_else(|| panic!("no page counts in the stats:\n{}", out.describe()));
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect();
    let n = nums.len();
    (nums[n - 2], nums[n - 1])
}

/// The holder processes of sockets under `rt` (their command line names the socket).
fn holders(rt: &Path) -> Vec<i32> {
    let needle = rt.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            let c = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let c = String::from_utf8_lossy(&c);
            c.contains("__track-holder") && c.contains(&needle)
        })
        .collect()
}

fn sockets(rt: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(rt.join("warmstart/track"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[test]
fn pre_dumps_then_final_dump_restore_every_change() {
    let ws = Ws::new();
    let rt = tempdir("ws-rt-");
    let rt = rt.path();
    let mut orig = Proc::spawn(&mut Command::new(fixture("predump")));
    let pid = orig.pid();
    let pid_s = pid.to_string();
    let d0 = digest(&mut orig);
    let fds_before = fds(pid);

    let out = run(&ws, rt, &["pre-dump", "-t", &pid_s, "--display-stats"]);
    out.assert_ok();
    let id1 = out.stdout.trim().to_owned();
    let mut guard = KillGuard::new();
    let hs = holders(rt);
    assert_eq!(hs.len(), 1, "one holder keeps the tracking: {hs:?}");
    hs.iter().for_each(|&h| guard.add(h));
    assert_eq!(sockets(rt).len(), 1);
    // Nothing of warmstart's in the app: the userfaultfd was made in it and closed again.
    assert_eq!(fds(pid), fds_before, "the app's fd table");
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    assert!(
        smaps
            .lines()
            .any(|l| l.starts_with("VmFlags:") && l.split_whitespace().any(|f| f == "uw")),
        "the app's private memory should be registered for write tracking"
    );
    let (read1, taken1) = counts(&out);
    assert!(
        read1 > 600 && taken1 == 0,
        "first pre-dump reads all: {read1} {taken1}"
    );
    assert_eq!(
        digest(&mut orig),
        d0,
        "a pre-dump changes nothing the app sees"
    );

    step(&mut orig, 1);
    let d1 = digest(&mut orig);
    assert_ne!(d1, d0);
    let out = run(
        &ws,
        rt,
        &["pre-dump", "-t", &pid_s, "--prev", &id1, "--display-stats"],
    );
    out.assert_ok();
    let id2 = out.stdout.trim().to_owned();
    let (read2, taken2) = counts(&out);
    assert!(
        taken2 > 400 && read2 < 200,
        "second pre-dump: read {read2}, taken {taken2}"
    );
    // The first holder exits once it has handed over (after the pre-dump returned).
    assert!(
        wait_pid_exit(hs[0], TIMEOUT),
        "the first holder handed over and exited"
    );
    let hs2 = holders(rt);
    assert_eq!(hs2.len(), 1, "{hs2:?}");
    hs2.iter().for_each(|&h| guard.add(h));

    step(&mut orig, 2);
    let d2 = digest(&mut orig);
    assert_ne!(d2, d1);
    let out = run(
        &ws,
        rt,
        &[
            "dump",
            "-t",
            &pid_s,
            "--prev",
            &id2,
            "--name",
            "fin",
            "--display-stats",
        ],
    );
    out.assert_ok();
    let (read3, taken3) = counts(&out);
    assert!(
        taken3 > 400 && read3 < 200,
        "final dump: read {read3}, taken {taken3}"
    );
    assert!(!orig.wait().success(), "the dump kills the app");
    assert!(
        wait_pid_exit(hs2[0], TIMEOUT),
        "the holder exits with the tracking taken"
    );
    assert!(sockets(rt).is_empty(), "{:?}", sockets(rt));

    let mut restored = Proc::spawn(&mut cmd(&ws, rt, &["restore", "fin"]));
    assert_eq!(
        digest(&mut restored),
        d2,
        "the restored memory is the live memory at the final dump"
    );
    // And it goes on changing as the original would have.
    step(&mut restored, 3);
    restored.close_stdin();
    assert!(restored.wait().success());

    let out = run(&ws, rt, &["restore", &id1]);
    out.assert_fail();
    assert!(out.stderr.contains("is a pre-dump"), "{}", out.describe());
}

#[test]
fn prev_must_be_the_last_pre_dump_and_tracking_ends_with_the_app() {
    let ws = Ws::new();
    let rt = tempdir("ws-rt-");
    let rt = rt.path();
    let mut orig = Proc::spawn(&mut Command::new(fixture("predump")));
    let pid_s = orig.pid().to_string();
    let mut guard = KillGuard::new();
    let out = run(&ws, rt, &["dump", "--pre-dump", "-t", &pid_s]);
    out.assert_ok();
    let id1 = out.stdout.trim().to_owned();
    let first = holders(rt);
    assert_eq!(first.len(), 1, "{first:?}");
    guard.add(first[0]);
    // (Without a change the second image would be the first: same content, same id.)
    step(&mut orig, 1);
    let out = run(&ws, rt, &["pre-dump", "-t", &pid_s, "--prev", &id1]);
    out.assert_ok();
    let id2 = out.stdout.trim().to_owned();
    assert_ne!(id1, id2);
    assert!(
        wait_pid_exit(first[0], TIMEOUT),
        "the first holder handed over"
    );
    let second = holders(rt);
    assert_eq!(second.len(), 1, "{second:?}");
    guard.add(second[0]);

    // An older image than the last pre-dump's would give stale pages: refused.
    let out = run(&ws, rt, &["dump", "-t", &pid_s, "--prev", &id1]);
    out.assert_fail();
    assert!(
        out.stderr.contains(&format!("--prev {}", &id2[..12])),
        "{}",
        out.describe()
    );
    let d = digest(&mut orig);
    assert!(!d.is_empty(), "the app goes on after a refused dump");
    // That attempt ended the tracking: nothing to take from any more.
    let out = run(&ws, rt, &["dump", "-t", &pid_s, "--prev", &id2]);
    out.assert_fail();
    assert!(
        out.stderr.contains("no write tracking"),
        "{}",
        out.describe()
    );
    assert!(
        wait_pid_exit(second[0], TIMEOUT),
        "the holder handed its tracking to the refused dump"
    );
    assert!(holders(rt).is_empty(), "{:?}", holders(rt));

    // An abandoned migration: the holder goes with the app.
    run(&ws, rt, &["pre-dump", "-t", &pid_s]).assert_ok();
    let hs = holders(rt);
    assert_eq!(hs.len(), 1);
    guard.add(hs[0]);
    drop(orig);
    assert!(
        wait_pid_exit(hs[0], TIMEOUT),
        "the holder exits when the app does"
    );
    assert!(sockets(rt).is_empty(), "{:?}", sockets(rt));
}

/// CRIU's form: `pre-dump -D DIR`, then `--prev-images-dir` (relative to `-D`) for the
/// next pre-dump and the final `dump -D`. The final image directory takes the unwritten
/// pages from the last one and is restorable alone (the earlier directories removed).
#[test]
fn criu_image_directories_with_prev_images_dir() {
    let ws = Ws::new();
    let rt = tempdir("ws-rt-");
    let rt = rt.path();
    let imgs = tempdir("ws-imgs-");
    let d = |n: &str| imgs.path().join(n).to_string_lossy().into_owned();
    let mut orig = Proc::spawn(&mut Command::new(fixture("predump")));
    let pid_s = orig.pid().to_string();
    let mut guard = KillGuard::new();
    // (Its first answer: its memory is all there, so that pre1 has it.)
    digest(&mut orig);

    let out = run(&ws, rt, &["pre-dump", "-t", &pid_s, "-D", &d("pre1")]);
    out.assert_ok();
    holders(rt).iter().for_each(|&h| guard.add(h));
    step(&mut orig, 1);
    // `WHAT -D DIR --prev-images-dir PREV`: it takes most pages from PREV.
    let from_prev = |what: &str, dir: &str, prev: &str| {
        let (dir, extra) = (d(dir), ["--track-mem", "--display-stats"]);
        let args = [what, "-t", &pid_s, "-D", &dir, "--prev-images-dir", prev];
        let out = run(&ws, rt, &[&args[..], &extra[..]].concat());
        out.assert_ok();
        let (read, taken) = counts(&out);
        assert!(
            taken > 400 && read < 200,
            "{what} into {dir}: read {read}, taken {taken}"
        );
    };
    from_prev("pre-dump", "pre2", "../pre1");
    holders(rt).iter().for_each(|&h| guard.add(h));

    // A directory without a pre-dump is refused by name, before anything is frozen.
    std::fs::create_dir(d("empty")).unwrap();
    let args = ["dump", "-t", &pid_s, "-D", &d("fin0"), "--prev-images-dir"];
    let out = run(&ws, rt, &[&args[..], &[&d("empty")]].concat());
    out.assert_fail();
    assert!(
        out.stderr.contains("--prev-images-dir"),
        "{}",
        out.describe()
    );
    assert!(
        !Path::new(&d("fin0")).exists(),
        "nothing left of a refused dump"
    );

    step(&mut orig, 2);
    let want = digest(&mut orig);
    from_prev("dump", "final", "../pre2");
    assert!(!orig.wait().success(), "the dump kills the app");
    std::fs::remove_dir_all(d("pre1")).unwrap();
    std::fs::remove_dir_all(d("pre2")).unwrap();
    let mut restored = Proc::spawn(&mut cmd(&ws, rt, &["restore", "-D", &d("final")]));
    assert_eq!(digest(&mut restored), want, "the restored memory");
    step(&mut restored, 3);
    restored.close_stdin();
    assert!(restored.wait().success());
}

/// The fixture's `/proc/self/maps` (adjacent areas of identical attributes joined, as
/// zdtm compares them) and process-wide `/proc/self/status` lines.
fn proc_state(p: &mut Proc) -> Vec<String> {
    p.send("state");
    let mut maps = Vec::new();
    let mut status = Vec::new();
    loop {
        let l = p.read_line();
        if l == "end" {
            break;
        }
        let l = l.split_whitespace().collect::<Vec<_>>().join(" ");
        if l.split(' ').next().is_some_and(|w| w.ends_with(':')) {
            status.push(l);
        } else {
            maps.push(l);
        }
    }
    let mut out = common::merge_adjacent_maps(maps);
    out.extend(status);
    out
}

/// `warmstart page-server -D DIR --port 0`; returns it and the address it printed.
fn image_dir_page_server(ws: &Ws, dir: &Path) -> (Proc, String) {
    let mut c = ws.cmd(&["page-server", "--port", "0", "-D", dir.to_str().unwrap()]);
    c.env("WARMSTART_LOG", "info");
    let p = Proc::spawn(&mut c);
    let addr = p.read_line().trim().to_owned();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    (p, addr)
}

/// Ids of the snapshots image directory `dir` holds.
fn dir_ids(dir: &Path) -> Vec<String> {
    let out = common::run_with(
        Ws::new().cmd(&["ls", "--json"]).env("WARMSTART_STORE", dir),
        b"",
        TIMEOUT,
    );
    out.assert_ok();
    let ls: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let mut ids: Vec<String> = (ls.as_array().unwrap().iter())
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// CRIU's migration flow into `page-server -D DIR`: two pre-dumps and the final dump
/// (each taking the unwritten pages from the last by record), then `restore -D DIR` on
/// the receiving side gives the memory and `/proc` state of the process at the final
/// dump, though it changed between the pre-dumps. DIR ends up holding that one snapshot.
/// A final dump naming a pre-dump the server does not hold is refused by name before
/// anything is frozen, and the tree keeps running and tracked.
#[test]
fn migration_into_an_image_directory_page_server() {
    let ws = Ws::new();
    let rt = tempdir("ws-rt-");
    let rt = rt.path();
    let imgs = tempdir("ws-imgs-");
    let dir = imgs.path().join("dst");
    let (server, addr) = image_dir_page_server(&Ws::new(), &dir);
    let mut orig = Proc::spawn(&mut Command::new(fixture("predump")));
    let pid_s = orig.pid().to_string();
    let mut guard = KillGuard::new();
    // `warmstart WHAT -t PID --page-server ADDR EXTRA... --display-stats`: its id and
    // (pages read, pages taken).
    let to_server = |what: &str, extra: &[&str]| {
        let mut args = vec![what, "-t", &pid_s, "--page-server", &addr];
        args.extend_from_slice(extra);
        args.push("--display-stats");
        let out = run(&ws, rt, &args);
        out.assert_ok();
        (out.stdout.trim().to_owned(), counts(&out))
    };

    // (Its first answer: its memory is all there.)
    digest(&mut orig);
    let (id1, (read1, taken1)) = to_server("pre-dump", &[]);
    holders(rt).iter().for_each(|&h| guard.add(h));
    assert!(
        read1 > 600 && taken1 == 0,
        "first pre-dump: {read1} {taken1}"
    );
    step(&mut orig, 1);
    let (id2, (read2, taken2)) = to_server("pre-dump", &["--prev", &id1]);
    holders(rt).iter().for_each(|&h| guard.add(h));
    assert!(
        taken2 > 400 && read2 < 200,
        "second pre-dump: read {read2}, taken {taken2}"
    );
    assert_eq!(dir_ids(&dir).len(), 2, "both pre-dumps are in {dir:?}");
    // Not restorable yet: refused, saying why.
    let out = run(&ws, rt, &["restore", "-D", dir.to_str().unwrap()]);
    out.assert_fail();
    assert!(
        out.stderr.contains("holds only pre-dumps"),
        "{}",
        out.describe()
    );

    // Bad input: a pre-dump this server does not hold (it went to another one): refused
    // by name, the app goes on, its tracking kept for the right --prev.
    let other_dir = imgs.path().join("other");
    let (_other, other_addr) = image_dir_page_server(&Ws::new(), &other_dir);
    let args = ["dump", "-t", &pid_s, "--page-server", &other_addr];
    let out = run(&ws, rt, &[&args[..], &["--prev", &id2]].concat());
    out.assert_fail();
    assert!(
        out.stderr.contains(&format!("--prev {id2}")) && out.stderr.contains(&other_addr),
        "{}",
        out.describe()
    );
    assert!(dir_ids(&other_dir).is_empty(), "{:?}", dir_ids(&other_dir));

    step(&mut orig, 2);
    let want = digest(&mut orig);
    let state = proc_state(&mut orig);
    assert!(
        state.iter().any(|l| l.ends_with("[stack]"))
            && state.iter().any(|l| l.starts_with("SigBlk:")),
        "{state:?}"
    );
    let (fin, (read3, taken3)) = to_server("dump", &["--prev", &id2]);
    assert!(
        taken3 > 400 && read3 < 200,
        "final dump: read {read3}, taken {taken3}"
    );
    assert!(!orig.wait().success(), "the dump kills the app");
    // DIR holds the final snapshot alone once the server has removed the pre-dumps (just
    // after answering the dump).
    server.wait_stderr("alone there now (removed the 2 pre-dump(s)");
    let ids = dir_ids(&dir);
    assert!(
        ids.len() == 1 && ids[0].starts_with(&fin),
        "{ids:?} in {dir:?}, final {fin}"
    );
    assert!(!ids[0].starts_with(&id1) && !ids[0].starts_with(&id2));
    let out = common::run_with(
        Ws::new().cmd(&["verify"]).env("WARMSTART_STORE", &dir),
        b"",
        TIMEOUT,
    );
    out.assert_ok();

    // A second final dump into it: refused by name.
    let mut other = Proc::spawn(&mut Command::new(fixture("predump")));
    let other_pid = other.pid().to_string();
    let other_digest = digest(&mut other);
    let out = run(&ws, rt, &["dump", "-t", &other_pid, "--page-server", &addr]);
    out.assert_fail();
    assert!(
        out.stderr.contains("already holds snapshot"),
        "{}",
        out.describe()
    );
    assert_eq!(
        digest(&mut other),
        other_digest,
        "a refused dump leaves it running"
    );
    drop(server);

    let mut restored = Proc::spawn(&mut cmd(
        &Ws::new(),
        rt,
        &["restore", "-D", dir.to_str().unwrap()],
    ));
    assert_eq!(digest(&mut restored), want, "the restored memory");
    assert_eq!(proc_state(&mut restored), state, "the restored /proc state");
    step(&mut restored, 3);
    restored.close_stdin();
    assert!(restored.wait().success());
}

/// CRIU's form with a page server per step: `page-server -D pre1`, then `page-server -D
/// pre2 --prev-images-dir ../pre1` and `page-server -D final --prev-images-dir ../pre2`,
/// each taking one dump. Each dump takes the unwritten pages from the last by record, and
/// `final` is restorable alone (the earlier directories removed): the memory and `/proc`
/// state of the process at the final dump.
#[test]
fn migration_into_one_image_directory_page_server_per_step() {
    let ws = Ws::new();
    let rt = tempdir("ws-rt-");
    let rt = rt.path();
    let imgs = tempdir("ws-imgs-");
    let d = |n: &str| imgs.path().join(n);
    let mut orig = Proc::spawn(&mut Command::new(fixture("predump")));
    let pid_s = orig.pid().to_string();
    digest(&mut orig);
    let mut guard = KillGuard::new();
    // A page server on `dir` (after `prev`) takes `what -t PID EXTRA...`: its id and
    // (pages read, pages taken).
    let step_into = |dir: &str, prev: Option<&str>, what: &str, extra: &[&str]| {
        let dir = d(dir);
        let mut args = vec!["page-server", "--port", "0", "-D", dir.to_str().unwrap()];
        if let Some(p) = prev {
            args.extend(["--prev-images-dir", p]);
        }
        let server = Proc::spawn(Ws::new().cmd(&args).env("WARMSTART_LOG", "info"));
        let addr = server.read_line().trim().to_owned();
        let mut args = vec![what, "-t", &pid_s, "--page-server", &addr];
        args.extend_from_slice(extra);
        args.push("--display-stats");
        let out = run(&ws, rt, &args);
        out.assert_ok();
        // Done with it: answered, and (a final dump) its directory cleaned up.
        server.wait_stderr(if what == "dump" {
            "alone there now"
        } else {
            "committed pre-dump"
        });
        drop(server);
        (out.stdout.trim().to_owned(), counts(&out))
    };
    let (id1, _) = step_into("pre1", None, "pre-dump", &[]);
    holders(rt).iter().for_each(|&h| guard.add(h));
    step(&mut orig, 1);
    let (id2, (read2, taken2)) = step_into("pre2", Some("../pre1"), "pre-dump", &["--prev", &id1]);
    holders(rt).iter().for_each(|&h| guard.add(h));
    assert!(
        taken2 > 400 && read2 < 200,
        "second pre-dump: read {read2}, taken {taken2}"
    );
    step(&mut orig, 2);
    let want = digest(&mut orig);
    let state = proc_state(&mut orig);
    let (_, (read3, taken3)) = step_into("final", Some("../pre2"), "dump", &["--prev", &id2]);
    assert!(
        taken3 > 400 && read3 < 200,
        "final dump: read {read3}, taken {taken3}"
    );
    assert!(!orig.wait().success(), "the dump kills the app");
    std::fs::remove_dir_all(d("pre1")).unwrap();
    std::fs::remove_dir_all(d("pre2")).unwrap();
    let out = common::run_with(
        Ws::new()
            .cmd(&["verify"])
            .env("WARMSTART_STORE", d("final")),
        b"",
        TIMEOUT,
    );
    out.assert_ok();
    let final_dir = d("final");
    let mut restored = Proc::spawn(&mut cmd(
        &Ws::new(),
        rt,
        &["restore", "-D", final_dir.to_str().unwrap()],
    ));
    assert_eq!(digest(&mut restored), want, "the restored memory");
    assert_eq!(proc_state(&mut restored), state, "the restored /proc state");
    restored.close_stdin();
    assert!(restored.wait().success());
}
