//! Process trees (issues 4 and 5): zdtm-style fixtures whose root forks workers
//! (tests/fixtures/tree_*.c, scaffolding in tree.h), recorded and restored in every mode
//! (the root lazy, its descendants eager; or all eager); `dump -t` of a tree started
//! outside warmstart; `/proc/PID/maps` and `/proc/PID/task` of every process equal
//! before the dump and after the restore; a failing restore leaves no process behind;
//! a wide tree (22 processes, tests/fixtures/tree_wide.py) whose every process keeps its
//! pid, parent, group, session and memory, seen from inside and from `/proc`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{children, fixture, tempdir, zdtm_every_mode as run_fixture, Proc, Ws};

#[test]
fn parent_children_grandchild_over_pipes() {
    run_fixture("tree_pipes", false);
}

#[test]
fn sessions_and_process_groups() {
    run_fixture("tree_session", false);
}

/// A pty the app opened itself, the controlling terminal of a session of its tree with
/// a foreground group of its own (issue 13).
#[test]
fn own_pty_as_controlling_terminal() {
    run_fixture("pty_own", false);
}

/// Bytes queued in a pty of the app's own cannot be read without consuming them: the
/// dump is refused, naming the process, the fd and the direction.
#[test]
fn own_pty_with_queued_bytes_is_refused() {
    let bin = fixture("pty_own");
    for (arg, fd, what) in [
        (
            "queued-in",
            "fd 12 is the master",
            "2 bytes are queued for the slave",
        ),
        (
            "queued-out",
            "fd 12 is the master",
            "3 bytes are queued for the master",
        ),
    ] {
        let ws = Ws::new();
        let out = ws.run(
            &["record", "--name", "q", "--", bin.to_str().unwrap(), arg],
            "",
        );
        assert!(
            !out.success()
                && out.stderr.contains(&format!("(pty_own): {fd}"))
                && out.stderr.contains(what)
                && out.stderr.contains("/dev/pts/"),
            "record of pty_own {arg} should be refused naming the queued bytes:\n{}",
            out.describe()
        );
    }
}

#[test]
fn zombie_children_reaped_after_restore() {
    run_fixture("tree_zombie", false);
}

#[test]
fn open_file_description_shared_with_a_child() {
    run_fixture("tree_ofd", true);
}

#[test]
fn shared_anonymous_memory_between_parent_and_child() {
    run_fixture("tree_shmem", false);
}

/// Private pages a parent, its child and a grandchild shared copy-on-write at the dump
/// are one physical page again after the restore, and only those (issue 13): the fixture
/// compares page frames in /proc/PID/pagemap of the three.
#[test]
fn copy_on_write_pages_stay_shared_across_the_tree() {
    run_fixture("cow_tree", false);
}

#[test]
fn posix_semaphore_and_shared_memory_between_parent_and_child() {
    run_fixture("tree_posix_shm", false);
}

// ---------------------------------------------------------------------------------------
// dump -t of a tree started outside warmstart

/// `dump -t PID -D DIR [EXTRA...]` of the tree at `pid`.
fn dump_t(ws: &Ws, pid: i32, dir: &Path, extra: &[&str]) -> common::Out {
    let pid = pid.to_string();
    let mut args = vec!["dump", "-t", &pid, "-D", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    ws.run(&args, "")
}

/// `pid` and its descendants.
fn descendants(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let c = children(out[i]);
        out.extend(c);
        i += 1;
    }
    out
}

/// The last `NSpid` of a task: its id in its own pid namespace.
fn ns_id(status_path: &str) -> i32 {
    std::fs::read_to_string(status_path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|v| v.split_whitespace().last()?.parse().ok())
        .unwrap_or(-1)
}

/// Per process of the tree under `root`, by its own-namespace pid: its maps (whitespace
/// normalised) and its threads' own-namespace ids.
fn tree_state(root: i32) -> BTreeMap<i32, (Vec<String>, Vec<i32>)> {
    let mut out = BTreeMap::new();
    for pid in descendants(root) {
        // A restored shared anonymous object, deleted file or memfd is a new one: only its
        // inode differs.
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let mut w: Vec<&str> = l.split_whitespace().collect();
                if l.ends_with(" (deleted)") && w.len() > 4 {
                    w[4] = "INODE";
                }
                w.join(" ")
            })
            .collect();
        let maps = common::merge_adjacent_maps(maps);
        let mut tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|t| ns_id(&format!("{}/status", t.path().display())))
            .collect();
        tids.sort_unstable();
        out.insert(ns_id(&format!("/proc/{pid}/status")), (maps, tids));
    }
    out
}

/// The restored root under a `restore` monitor: monitor → init → root.
fn restored_root(monitor: i32) -> i32 {
    let init = children(monitor);
    assert_eq!(init.len(), 1, "the monitor should have one child, init");
    let root = children(init[0]);
    assert_eq!(root.len(), 1, "init should have one child, the app");
    root[0]
}

fn assert_same_tree(
    before: &BTreeMap<i32, (Vec<String>, Vec<i32>)>,
    after: &BTreeMap<i32, (Vec<String>, Vec<i32>)>,
) {
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "the restored tree has other pids"
    );
    for (pid, (maps, tids)) in before {
        let (amaps, atids) = &after[pid];
        assert_eq!(tids, atids, "process {pid}: threads differ after restore");
        let mut diffs: Vec<String> = maps
            .iter()
            .filter(|l| !amaps.contains(l))
            .map(|l| format!("- {l}"))
            .collect();
        diffs.extend(
            amaps
                .iter()
                .filter(|l| !maps.contains(l))
                .map(|l| format!("+ {l}")),
        );
        assert!(
            diffs.is_empty(),
            "process {pid}: /proc/PID/maps differs after restore (- dumped, + restored):\n{}",
            diffs.join("\n")
        );
    }
}

/// A tree started by the test (no warmstart involved), past its setup: the first check
/// answered.
fn start_cold(name: &str) -> Proc {
    let mut p = Proc::spawn(&mut std::process::Command::new(fixture(name)));
    p.send("check");
    assert_eq!(p.read_line(), "PASS", "cold {name}");
    p
}

/// `dump -t` of a tree the test started, then `restore -D` (eager, then lazy): the tree
/// answers where it left off, and every process has the maps and threads it had.
fn dump_t_and_compare(name: &str, processes: usize) {
    let ws = Ws::new();
    let mut orig = start_cold(name);
    let before = tree_state(orig.pid());
    assert_eq!(before.len(), processes, "{name}: {:?}", before.keys());
    let images = tempdir("ws-images-");
    let dir = images.path().join("img");
    let out = dump_t(&ws, orig.pid(), &dir, &[]);
    out.assert_ok();
    let st = orig.wait();
    assert!(
        !st.success(),
        "the dump should have killed the tree: {st:?}"
    );

    for flags in [&[][..], &["--lazy"][..]] {
        let mut args = vec!["restore", "-D", dir.to_str().unwrap()];
        args.extend_from_slice(flags);
        let mut restored = Proc::spawn(&mut ws.cmd(&args));
        // Every process goes on where it was: this is its second check.
        restored.send("check");
        assert_eq!(restored.read_line(), "PASS", "{name} restored {flags:?}");
        let after = tree_state(restored_root(restored.pid()));
        assert_same_tree(&before, &after);
        restored.close_stdin();
        let st = restored.wait();
        assert!(
            st.success(),
            "the restored tree should exit 0 at EOF: {st:?}"
        );
    }
}

#[test]
fn dump_t_tree_restores_same_maps_tasks_and_answers() {
    // root, A, G (A's child) and B (two threads).
    dump_t_and_compare("tree_pipes", 4);
}

#[test]
fn dump_t_posix_shm_tree_restores_same_maps() {
    // The second restore starts from the image again: the first one's semaphore and
    // shared memory were its own.
    dump_t_and_compare("tree_posix_shm", 2);
}

#[test]
fn dump_t_shared_memory_tree_restores_same_maps() {
    dump_t_and_compare("tree_shmem", 2);
}

/// `dump -t` (no `--shell-job`) of a tree whose pty is its own: not refused as a
/// shell's terminal, and restored with its controlling terminal and foreground group.
#[test]
fn dump_t_own_pty_tree_restores_its_terminal() {
    dump_t_and_compare("pty_own", 3);
}

#[test]
fn dump_t_leave_running_tree_goes_on() {
    let ws = Ws::new();
    let mut orig = start_cold("tree_pipes");
    let images = tempdir("ws-images-");
    let dir = images.path().join("img");
    let out = dump_t(&ws, orig.pid(), &dir, &["--leave-running"]);
    out.assert_ok();
    // The original tree is unperturbed ...
    orig.send("check");
    assert_eq!(orig.read_line(), "PASS");
    // ... and the image restores beside it (a pid namespace of its own).
    let mut restored = Proc::spawn(&mut ws.cmd(&["restore", "-D", dir.to_str().unwrap()]));
    restored.send("check");
    assert_eq!(restored.read_line(), "PASS");
    restored.close_stdin();
    assert!(restored.wait().success());
    orig.close_stdin();
    assert!(orig.wait().success());
}

/// Pids of running processes (as seen from here) whose executable is `exe`.
fn running(exe: &Path) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe))
        .collect()
}

#[test]
fn failing_restore_of_a_tree_leaves_no_process() {
    let ws = Ws::new();
    let exe = fixture("tree_listen");
    let orig = start_cold("tree_listen");
    let port: u16 = orig
        .wait_stderr("port ")
        .trim()
        .strip_prefix("port ")
        .unwrap()
        .parse()
        .unwrap();
    let child = children(orig.pid());
    assert_eq!(child.len(), 1, "one worker");
    let images = tempdir("ws-images-");
    let dir = images.path().join("img");
    let out = dump_t(&ws, orig.pid(), &dir, &[]);
    out.assert_ok();
    drop(orig);
    // Someone else listens on the child's port now: the child cannot be restored.
    let _taken = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind the freed port");
    let out = ws.run(&["restore", "-D", dir.to_str().unwrap()], "check\n");
    assert!(
        !out.success()
            && out.stderr.contains(&format!("process {}", child[0]))
            && out.stderr.contains(&port.to_string()),
        "the restore should fail naming the child and its port:\n{}",
        out.describe()
    );
    assert!(
        out.stdout.is_empty(),
        "nothing may have run:\n{}",
        out.describe()
    );
    assert_eq!(
        running(&exe),
        Vec::<i32>::new(),
        "a failed restore left processes of the tree running"
    );
}

#[test]
fn group_whose_leader_is_gone_is_refused_at_dump_and_left_running() {
    let ws = Ws::new();
    let mut orig = start_cold("tree_lost_leader");
    let group = orig.wait_stderr("group ");
    let group = group.trim().strip_prefix("group ").unwrap();
    let member = children(orig.pid());
    assert_eq!(member.len(), 1, "one worker left");
    let images = tempdir("ws-images-");
    let dir = images.path().join("img");
    let out = dump_t(&ws, orig.pid(), &dir, &[]);
    assert!(
        !out.success()
            && out.stderr.contains(&format!("process {} (", member[0]))
            && out.stderr.contains(&format!(
                "is in process group {group}, whose leader is not part of the tree"
            )),
        "dump should refuse the leaderless group by name:\n{}",
        out.describe()
    );
    // Refused: the tree runs on as before.
    orig.send("check");
    assert_eq!(orig.read_line(), "PASS");
    orig.close_stdin();
    assert!(orig.wait().success());
}

/// A process forking all the time: each dump meets children being born, running,
/// exiting and not yet reaped. Every image restores a tree that goes on forking and
/// reaps every child with the status it exited with; the original runs on unperturbed.
#[test]
fn dump_t_of_a_process_forking_all_the_time() {
    let ws = Ws::new();
    let mut orig = start_cold("tree_forker");
    let images = tempdir("ws-images-");
    for round in 0..4 {
        let dir = images.path().join(format!("img{round}"));
        let out = dump_t(&ws, orig.pid(), &dir, &["--leave-running"]);
        out.assert_ok();
        let mut restored = Proc::spawn(&mut ws.cmd(&["restore", "-D", dir.to_str().unwrap()]));
        restored.send("check");
        assert_eq!(restored.read_line(), "PASS", "image {round}");
        restored.close_stdin();
        assert!(restored.wait().success(), "image {round}");
        orig.send("check");
        assert_eq!(orig.read_line(), "PASS", "the original after dump {round}");
    }
    orig.close_stdin();
    assert!(orig.wait().success());
}

/// The CRIU use case: a shell job that forked a child, checkpointed from outside and
/// restored; the shell then talks to its restored child (kills and reaps it).
#[test]
fn dump_t_of_a_shell_with_a_background_child() {
    let ws = Ws::new();
    let mut orig = Proc::spawn(std::process::Command::new("bash").args([
        "-c",
        "sleep 1000 & echo started; read line; echo \"got $line\"; kill $!; wait $!; echo \"sleep status $?\"",
    ]));
    assert_eq!(orig.read_line(), "started");
    assert_eq!(descendants(orig.pid()).len(), 2, "bash and its child");
    let images = tempdir("ws-images-");
    let dir = images.path().join("img");
    let out = dump_t(&ws, orig.pid(), &dir, &[]);
    out.assert_ok();
    let _ = orig.wait();
    let out = ws.run(&["restore", "-D", dir.to_str().unwrap()], "hi\n");
    assert!(
        out.success() && out.stdout == "got hi\nsleep status 143\n",
        "the restored shell should read its line, then kill and reap its child:\n{}",
        out.describe()
    );
}

/// Per process of the tree under `root`, by its own-namespace pid: its parent, process
/// group and session as `/proc/PID/stat` shows them, each as the own-namespace pid of a
/// process of the tree, or -1 for one outside it (the root's parent; the caller's
/// session at a cold start, the sandbox's after a restore).
fn tree_relations(root: i32) -> BTreeMap<i32, [i32; 3]> {
    let pids = descendants(root);
    let ns: BTreeMap<i32, i32> = pids
        .iter()
        .map(|&p| (p, ns_id(&format!("/proc/{p}/status"))))
        .collect();
    let inside = |host: i32| ns.get(&host).copied().unwrap_or(-1);
    pids.iter()
        .map(|&p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            // After the `(comm)`, which may hold spaces: state ppid pgrp session ...
            let f: Vec<i32> = stat
                .rsplit_once(") ")
                .map(|(_, rest)| rest)
                .unwrap_or_default()
                .split_whitespace()
                .skip(1)
                .take(3)
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            assert_eq!(f.len(), 3, "/proc/{p}/stat: {stat}");
            (inside(p), [inside(f[0]), inside(f[1]), inside(f[2])])
        })
        .collect()
}

/// The root's answer to `check`: one line per worker (pid, ppid, group, session, memory
/// digest as it sees them), then `done`.
fn wide_answers(p: &mut Proc, workers: usize) -> Vec<String> {
    p.send("check");
    let lines: Vec<String> = (0..=workers).map(|_| p.read_line()).collect();
    assert_eq!(lines.last().map(String::as_str), Some("done"), "{lines:?}");
    lines
}

/// A tree of 22 processes (issue 17: restored side by side), dumped with `dump -t` and
/// restored eager and lazy: every process answers with its own pid, parent, group,
/// session and memory as before the dump, `/proc` shows the same relations, maps and
/// threads for each.
#[test]
fn wide_tree_every_process_keeps_its_ids_relations_and_memory() {
    const CHILDREN: usize = 20;
    let workers = CHILDREN + 1; // and the grandchild
    let ws = Ws::new();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tree_wide.py");
    let mut orig = Proc::spawn(
        std::process::Command::new("python3")
            .arg(&script)
            .arg(CHILDREN.to_string()),
    );
    let answers = wide_answers(&mut orig, workers);
    let relations = tree_relations(orig.pid());
    let before = tree_state(orig.pid());
    assert_eq!(before.len(), workers + 1, "{:?}", before.keys());
    // The fixture's shape, as `/proc` sees it: children 1, 5, ... lead groups (2, 6, ...
    // join child 1's), children 3, 7, ... lead sessions, child 3's child (the grandchild)
    // is in its session.
    let root = ns_id(&format!("/proc/{}/status", orig.pid()));
    let kids: Vec<i32> = relations
        .iter()
        .filter(|(_, r)| r[0] == root)
        .map(|(&p, _)| p)
        .collect();
    assert_eq!(kids.len(), CHILDREN, "{relations:?}");
    let in_sessions = relations.values().filter(|r| r[2] != -1).count();
    assert_eq!(in_sessions, CHILDREN / 4 + 1, "{relations:?}");
    let leaders = relations.iter().filter(|(&p, r)| r[1] == p).count();
    assert_eq!(
        leaders,
        1 + CHILDREN / 2,
        "the root and 10 children: {relations:?}"
    );
    let joined = relations.values().filter(|r| r[1] == kids[1]).count();
    assert_eq!(joined, 1 + CHILDREN / 4, "child 1's group: {relations:?}");

    let images = tempdir("ws-images-");
    let dir = images.path().join("img");
    dump_t(&ws, orig.pid(), &dir, &[]).assert_ok();
    assert!(
        !orig.wait().success(),
        "the dump should have killed the tree"
    );

    for flags in [&[][..], &["--lazy"][..]] {
        let mut args = vec!["restore", "-D", dir.to_str().unwrap()];
        args.extend_from_slice(flags);
        let mut restored = Proc::spawn(&mut ws.cmd(&args));
        restored.send("ping");
        assert_eq!(restored.read_line(), "pong", "restored {flags:?}");
        // From outside, before the check changes anything (Python's heap grows and
        // shrinks with it): the same relations, maps and threads in /proc.
        let rroot = restored_root(restored.pid());
        assert_eq!(
            tree_relations(rroot),
            relations,
            "restored {flags:?}: (ppid, pgid, sid) per pid"
        );
        assert_same_tree(&before, &tree_state(rroot));
        // From inside: every worker's pid, parent, group, session and memory digest.
        assert_eq!(
            wide_answers(&mut restored, workers),
            answers,
            "restored {flags:?}: what the processes see of themselves"
        );
        restored.close_stdin();
        let st = restored.wait();
        assert!(
            st.success(),
            "restored {flags:?} should exit 0 at EOF: {st:?}"
        );
    }
}
