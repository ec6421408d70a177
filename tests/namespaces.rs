//! Trees that run in namespaces of their own (issue 18): an `unshare`d tree with its own
//! uts, ipc, net and pid namespaces is dumped with `dump -t` and restored with them —
//! host name, System V objects (as `/proc/sysvipc` shows them from inside), the
//! loopback's addresses and routes, every network sysctl — into new namespaces of its own; namespaces and
//! network interfaces a restore cannot recreate are refused by name at dump time, with
//! the tree left running.

mod common;

use std::process::Command;

use common::netns::{
    host_netns, in_net_of, ns_id, nsenter, output, unshared_in_net_of, ws_in_net_of,
};
use common::{alive, children, fixture, tempdir, wait_pid_exit, KillGuard, Proc, Ws, TIMEOUT};

/// `/proc/sysvipc/FILE` seen from inside `pid`'s ipc namespace, without the columns
/// that a restore changes by its nature (pids of last users, times, resident pages).
fn sysvipc(pid: i32, file: &str) -> Vec<String> {
    let text = nsenter(pid, &["-i"], &["cat", &format!("/proc/sysvipc/{file}")]);
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    const DROP: [&str; 11] = [
        "cpid", "lpid", "lspid", "lrpid", "atime", "dtime", "ctime", "stime", "rtime", "otime",
        "rss",
    ];
    let mut rows: Vec<String> = lines
        .map(|l| {
            header
                .iter()
                .zip(l.split_whitespace())
                .filter(|(h, _)| !DROP.contains(h))
                .map(|(h, v)| format!("{h}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    rows.sort();
    rows
}

/// What the tree's namespaces hold, seen from inside them.
fn ns_state(pid: i32) -> Vec<String> {
    let mut s = vec![
        format!("hostname {}", nsenter(pid, &["-u"], &["hostname"]).trim()),
        format!(
            "domainname {}",
            nsenter(pid, &["-u"], &["domainname"]).trim()
        ),
    ];
    for f in ["shm", "sem", "msg"] {
        s.extend(sysvipc(pid, f).into_iter().map(|r| format!("{f}: {r}")));
    }
    // An IPv6 link-local address is the kernel's (made from the MAC once the carrier is
    // seen, then tentative until its duplicate detection ends): not compared.
    let addrs = nsenter(pid, &["-n"], &["ip", "-o", "addr", "show"]);
    s.extend(
        addrs
            .lines()
            .filter(|l| !(l.contains("inet6 fe80::") && l.contains("scope link")))
            .map(|l| format!("addr: {}", l.split(" valid_lft").next().unwrap_or(l).trim())),
    );
    // A veth names its peer by index (`eth0@if7`), which a new peer does not keep; its
    // carrier and operational state follow the peer's (and the kernel updates them up to
    // a second late): the administrative state (UP) is the namespace's.
    let links = nsenter(pid, &["-n"], &["ip", "-o", "link", "show"]);
    s.extend(links.lines().map(|l| {
        let l = match l.find("@if") {
            Some(at) => {
                let digits = l[at + 3..].chars().take_while(char::is_ascii_digit).count();
                format!("{}@peer{}", &l[..at], &l[at + 3 + digits..])
            }
            None => l.to_owned(),
        };
        let l = l.replace("NO-CARRIER,", "").replace(",LOWER_UP", "");
        let l = match l.find(" state ") {
            Some(at) => {
                let word = l[at + 7..].find(' ').map_or(l.len(), |e| at + 7 + e);
                format!("{} state -{}", &l[..at], &l[word..])
            }
            None => l,
        };
        format!("link: {l}")
    }));
    for family in ["-4", "-6"] {
        let routes = nsenter(
            pid,
            &["-n"],
            &["ip", family, "route", "show", "table", "all"],
        );
        let mut r: Vec<String> = routes.lines().map(|l| format!("route: {l}")).collect();
        r.sort();
        s.extend(r);
    }
    // Every network sysctl that can be set (`path:value`).
    let sysctls = nsenter(
        pid,
        &["-n"],
        &[
            "sh",
            "-c",
            "find /proc/sys/net -type f -perm -600 -exec grep -H . {} + 2>/dev/null; true",
        ],
    );
    let mut v: Vec<String> = sysctls.lines().map(|l| format!("sysctl: {l}")).collect();
    v.sort();
    s.extend(v);
    s
}

/// `unshare FLAGS --fork --kill-child ARGV`, and the pid (ours) of the first process
/// under its pid 1 once it printed "ready".
fn unshared(flags: &[&str], argv: &[&str]) -> (Proc, i32) {
    unshared_env(flags, argv, &[])
}

fn unshared_env(flags: &[&str], argv: &[&str], env: &[(&str, &str)]) -> (Proc, i32) {
    let p = Proc::spawn(
        Command::new("unshare")
            .args(flags)
            .args(["--fork", "--kill-child"])
            .arg("--")
            .args(argv)
            .envs(env.iter().copied()),
    );
    p.wait_stderr("ready");
    let init = children(p.pid());
    assert_eq!(init.len(), 1, "unshare's children: {init:?}");
    let worker = children(init[0]);
    (p, *worker.first().unwrap_or(&init[0]))
}

const ALL_NS: [&str; 6] = [
    "--net",
    "--uts",
    "--ipc",
    "--pid",
    "--mount-proc",
    "--propagation=private",
];

/// `dump -t WORKER -D DIR` (into a new temporary directory, returned with DIR), which
/// must succeed and end the worker and `orig`, the `unshare` it ran under.
fn dump_worker(ws: &Ws, worker: i32, orig: &mut Proc) -> (tempfile::TempDir, std::path::PathBuf) {
    let images = tempdir("ws-images-");
    let dir = images.path().join("img");
    ws.run(
        &[
            "dump",
            "-t",
            &worker.to_string(),
            "-D",
            dir.to_str().unwrap(),
        ],
        "",
    )
    .assert_ok();
    assert!(
        wait_pid_exit(worker, TIMEOUT),
        "the dumped worker still runs"
    );
    orig.wait();
    (images, dir)
}

/// `restore -D DIR -d`: the instance's pid (guarded), with our pipes as its stdio.
fn restore_detached(ws: &Ws, dir: &std::path::Path, guard: &mut KillGuard) -> (Proc, i32) {
    restore_detached_with(ws, dir, guard, &[])
}

/// [`restore_detached`] with more arguments (`--lazy`).
fn restore_detached_with(
    ws: &Ws,
    dir: &std::path::Path,
    guard: &mut KillGuard,
    more: &[&str],
) -> (Proc, i32) {
    let mut args = vec!["restore", "-D", dir.to_str().unwrap(), "-d"];
    args.extend_from_slice(more);
    let mut r = Proc::spawn(&mut ws.cmd(&args));
    let first = r.read_line();
    let pid: i32 = first.trim().parse().unwrap_or_else(|_| {
        panic!(
            "restore -d should print a pid, printed {first:?}; stderr:\n{}",
            r.stderr_after_exit()
        )
    });
    guard.add(pid);
    assert!(r.wait().success(), "restore -d failed");
    (r, pid)
}

#[test]
fn unshared_tree_round_trips_with_its_namespaces() {
    let ws = Ws::new();
    let bin = fixture("ns_ipc");
    let (mut orig, worker) = unshared(&ALL_NS, &[bin.to_str().unwrap()]);
    // The loopback as an app would set it up: up, an address and a route of its own.
    for argv in [
        &["ip", "link", "set", "lo", "up"][..],
        &["ip", "addr", "add", "10.9.8.7/32", "dev", "lo"],
        &["ip", "addr", "add", "fd00::7/128", "dev", "lo", "nodad"],
        &["ip", "route", "add", "10.77.0.0/16", "dev", "lo"],
        // Sysctls of the namespace the app changed (one of several values, one on an
        // interface, one through `all`).
        &["sh", "-c", "echo 2 > /proc/sys/net/ipv4/tcp_syncookies"],
        &[
            "sh",
            "-c",
            "echo '40000 50000' > /proc/sys/net/ipv4/ip_local_port_range",
        ],
        &[
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/conf/lo/accept_local",
        ],
        &[
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv6/conf/all/forwarding",
        ],
    ] {
        nsenter(worker, &["-n"], argv);
    }
    orig.send("check");
    assert_eq!(orig.read_line(), "PASS");
    let before = ns_state(worker);
    assert!(
        before.iter().any(|l| l.contains("key=20823")),
        "{before:#?}"
    ); // 0x5157
    assert!(
        before.iter().any(|l| l.contains("10.77.0.0/16")),
        "{before:#?}"
    );
    for set in [
        "ipv4/tcp_syncookies:2",
        "ipv4/ip_local_port_range:40000\t50000",
        "ipv4/conf/lo/accept_local:1",
        "ipv6/conf/lo/forwarding:1",
    ] {
        assert!(
            before.iter().any(|l| l.ends_with(set)),
            "{set} not in {before:#?}"
        );
    }

    let (_images, dir) = dump_worker(&ws, worker, &mut orig);

    // Two instances side by side: each has namespaces of its own, the same ids in both.
    let mut guard = KillGuard::new();
    let (mut a, pa) = restore_detached(&ws, &dir, &mut guard);
    let (mut b, pb) = restore_detached(&ws, &dir, &mut guard);
    for kind in ["uts", "ipc", "net", "pid", "mnt"] {
        let host = ns_id("self", kind);
        assert_ne!(
            ns_id(&pa.to_string(), kind),
            host,
            "{kind} of the instance is the host's"
        );
        assert_ne!(
            ns_id(&pa.to_string(), kind),
            ns_id(&pb.to_string(), kind),
            "{kind} shared"
        );
    }
    assert_eq!(ns_state(pa), before, "namespaces of the first instance");
    assert_eq!(ns_state(pb), before, "namespaces of the second instance");
    for r in [&mut a, &mut b] {
        // The state goes on from the dump (one check before it: the semaphore says 1).
        r.send("check");
        assert_eq!(r.read_line(), "PASS");
        r.send("check");
        assert_eq!(r.read_line(), "PASS");
    }
    // Negative control: a changed host name is seen.
    a.send("break");
    a.send("check");
    assert!(a.read_line().starts_with("FAIL: host name is broken"));
    b.close_stdin();
    assert!(
        wait_pid_exit(pb, TIMEOUT),
        "the instance did not exit at EOF"
    );
    drop(guard);
    assert!(!alive(pa), "the instance survived its guard");
}

/// Starts `counter` under `unshare FLAGS` (after `setup`, a shell command run first in
/// its namespaces) and expects `dump -t` to fail naming `needle`, leaving it running.
fn refused(flags: &[&str], setup: &str, needle: &str) {
    let ws = Ws::new();
    let counter = fixture("counter");
    // Not exec'd: the shell stays pid 1 of the pid namespace, the counter is its child.
    let script = format!("{setup} && {}; true", counter.display());
    let (mut p, target) = unshared(flags, &["sh", "-c", &script]);
    let dir = tempdir("ws-images-");
    let out = ws.run(
        &[
            "dump",
            "-t",
            &target.to_string(),
            "-D",
            dir.path().join("img").to_str().unwrap(),
        ],
        "",
    );
    out.assert_fail();
    assert!(
        out.stderr.contains(needle),
        "expected {needle:?}: {}",
        out.describe()
    );
    assert!(alive(target), "a refused dump killed the process");
    p.send("a");
    assert_eq!(
        p.read_line(),
        "1 a",
        "the process does not run on after a refused dump"
    );
}

#[test]
fn other_network_interfaces_are_refused_by_name() {
    refused(
        &["--net", "--pid"],
        "ip link add wsb0 type bridge",
        "interface wsb0 (bridge): only the loopback interface and veth interfaces",
    );
    refused(
        &["--net", "--pid"],
        "ip link add wsv0 type veth peer name wsv1",
        "whose peer is in the same namespace: only veths whose peer is outside",
    );
}

#[test]
fn user_namespace_is_refused() {
    refused(
        &["--user", "--map-root-user", "--pid"],
        "true",
        "user namespace of its own",
    );
}

#[test]
fn mounts_of_its_own_are_refused_by_mount_point() {
    refused(
        &["--mount", "--propagation=private", "--pid"],
        "mount -t tmpfs ws-ns-test /mnt",
        "/mnt is mounted (tmpfs from ws-ns-test)",
    );
}

/// The `maps` lines of System V attaches of `pid`.
fn sysv_maps(pid: i32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("/SYSV"))
        .map(str::to_owned)
        .collect()
}

/// System V segments attached (`shmat`) in the tree's own ipc namespace come back
/// attached where they were: one segment attached twice (one attach split by
/// `mprotect`), one attached read-only, one removed while attached. The fixture checks
/// contents, sharing between the attaches, protections, attach modes and counts, and
/// that an attach is a real one (`shmdt`); the test compares the attaches' `maps` lines
/// and `/proc/sysvipc/shm` (attach counts, modes) with the dumped tree's.
#[test]
fn attached_shm_segments_round_trip() {
    let ws = Ws::new();
    let bin = fixture("shm_attach");
    let (mut orig, worker) = unshared(
        &["--ipc", "--pid", "--mount-proc", "--propagation=private"],
        &[bin.to_str().unwrap()],
    );
    orig.send("check");
    assert_eq!(orig.read_line(), "PASS");
    let maps = sysv_maps(worker);
    assert_eq!(maps.len(), 6, "{maps:#?}");
    let shm = sysvipc(worker, "shm");
    assert!(
        shm.iter()
            .any(|l| l.contains("key=20824") && l.contains("nattch=4")),
        "{shm:#?}"
    );
    let (_images, dir) = dump_worker(&ws, worker, &mut orig);

    let mut guard = KillGuard::new();
    // Eager, and lazy (the attaches are the segments' memory, never served on demand).
    let (mut a, pa) = restore_detached(&ws, &dir, &mut guard);
    let (mut l, pl) = restore_detached_with(&ws, &dir, &mut guard, &["--lazy"]);
    for (r, pid) in [(&mut a, pa), (&mut l, pl)] {
        assert_eq!(sysv_maps(pid), maps, "System V attaches of the instance");
        assert_eq!(
            sysvipc(pid, "shm"),
            shm,
            "System V segments of the instance"
        );
        r.send("check");
        assert_eq!(r.read_line(), "PASS");
        r.send("check");
        assert_eq!(r.read_line(), "PASS");
    }
    // Negative control: a write through the second attach is seen through the first.
    a.send("break");
    a.send("check");
    let line = a.read_line();
    assert!(line.starts_with("FAIL: A page 0 differs at 4092"), "{line}");
    drop(guard);
    assert!(!alive(pa) && !alive(pl), "an instance survived its guard");
}

/// A System V segment of the host's ipc namespace attached by the tree is refused by id
/// (its contents are the host's), the tree left running.
#[test]
fn attached_shm_segment_of_the_host_is_refused() {
    let ws = Ws::new();
    let bin = fixture("shm_attach");
    // Removed at once (still attached): nothing stays in the host's namespace.
    let (mut p, worker) = unshared_env(
        &["--pid", "--mount-proc", "--propagation=private"],
        &[bin.to_str().unwrap()],
        &[("SHM_ATTACH_RMID", "1")],
    );
    let dir = tempdir("ws-images-");
    let out = ws.run(
        &[
            "dump",
            "-t",
            &worker.to_string(),
            "-D",
            dir.path().join("img").to_str().unwrap(),
        ],
        "",
    );
    out.assert_fail();
    assert!(
        out.stderr.contains("a segment of the host's ipc namespace")
            && out.stderr.contains("record --ipc"),
        "{}",
        out.describe()
    );
    p.send("check");
    assert_eq!(
        p.read_line(),
        "PASS",
        "the tree does not run on after a refused dump"
    );
}

/// `NSpid`'s last column of `/proc/PID/status` (the pid in its own namespace), if any.
fn ns_pid(pid: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// Every process of the tree under `root` (ours), by its pid in its own namespace: that
/// of its parent (0 for one outside the namespace), its signal masks and its maps.
fn pid1_tree_state(root: i32) -> std::collections::BTreeMap<i32, Vec<String>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        todo.extend(children(pid));
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        let ppid: i32 = field("PPid:").parse().unwrap();
        let ns = ns_id(&pid.to_string(), "pid");
        let parent = if ppid > 0 && ns_id(&ppid.to_string(), "pid") == ns {
            ns_pid(ppid).unwrap()
        } else {
            0
        };
        let mut s = vec![format!("parent {parent}")];
        for f in ["SigBlk:", "SigIgn:", "SigCgt:"] {
            s.push(format!("{f} {}", field(f)));
        }
        let maps: Vec<String> = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .unwrap()
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        s.extend(common::merge_adjacent_maps(maps));
        out.insert(ns_pid(pid).unwrap(), s);
    }
    out
}

/// A tree whose root is the init (pid 1) of its own pid namespace, as a container's
/// entrypoint is, is dumped whole and restored as the init of a new pid namespace: every
/// process keeps its pid there, its parent, signal handlers and masks, maps, and the
/// namespace its host name; then it goes on as an init does: it answers a signal sent
/// from outside (which reaches a pid 1 only through a handler of its own), reaps its
/// child, inherits the orphaned grandchild and its exit ends the namespace. Eager and
/// lazy restores alike.
#[test]
fn pid_namespace_init_round_trips() {
    let ws = Ws::new();
    let bin = fixture("pid1_init");
    let mut orig = Proc::spawn(
        Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--kill-child",
                "--mount-proc",
                "--uts",
                "--ipc",
                "--net",
                "--",
            ])
            .arg(&bin),
    );
    orig.wait_stderr("ready");
    let init = children(orig.pid())[0];
    assert_eq!(ns_pid(init), Some(1), "the fixture is not pid 1");
    orig.send("state");
    assert_eq!(orig.read_line(), "n=1 pid=1 ppid=0 host=pid1-fixture");
    let before = pid1_tree_state(init);
    assert_eq!(
        before.keys().copied().collect::<Vec<_>>(),
        [1, 2, 3],
        "{before:#?}"
    );
    assert!(
        before[&1].contains(&"SigBlk: 0000000000000800".to_owned()),
        "{before:#?}"
    );
    let (_images, dir) = dump_worker(&ws, init, &mut orig);

    for mode in [&[][..], &["--lazy"][..]] {
        let mut guard = KillGuard::new();
        let (mut r, pid) = restore_detached_with(&ws, &dir, &mut guard, mode);
        assert_eq!(
            ns_pid(pid),
            Some(1),
            "{mode:?}: the restored root is not pid 1"
        );
        assert_ne!(ns_id(&pid.to_string(), "pid"), ns_id("self", "pid"));
        assert_eq!(pid1_tree_state(pid), before, "{mode:?}: the restored tree");
        // The root joined the instance's time namespace itself; its children are in it.
        let time = ns_id(&pid.to_string(), "time");
        assert_ne!(time, ns_id("self", "time"), "{mode:?}");
        for c in children(pid) {
            assert_eq!(ns_id(&c.to_string(), "time"), time, "{mode:?}");
        }
        assert_eq!(
            nsenter(pid, &["-u"], &["hostname"]).trim(),
            "pid1-fixture",
            "{mode:?}"
        );
        r.send("state");
        assert_eq!(
            r.read_line(),
            "n=2 pid=1 ppid=0 host=pid1-fixture",
            "{mode:?}"
        );
        // From outside the namespace: a pid 1 gets it through its handler.
        // SAFETY: kill takes integer arguments only.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0);
        assert_eq!(r.read_line(), "usr1 1", "{mode:?}");
        r.send("kids");
        assert_eq!(r.read_line(), "kids 2", "{mode:?}");
        // Its child exits now, and is its to reap; the grandchild becomes its own child.
        let grandchild = children(children(pid)[0])[0];
        r.send("end");
        assert_eq!(r.read_line(), "reaped 2 5", "{mode:?}");
        r.send("kids");
        assert_eq!(r.read_line(), "kids 3", "{mode:?}");
        assert_eq!(children(pid), [grandchild], "{mode:?}");
        // SAFETY: kill takes integer arguments only.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        assert_eq!(r.read_line(), "term", "{mode:?}");
        assert!(wait_pid_exit(pid, TIMEOUT), "{mode:?}: init did not exit");
        assert!(
            wait_pid_exit(grandchild, TIMEOUT),
            "{mode:?}: the namespace outlived its init"
        );
        drop(guard);
    }

    // In the foreground the monitor waits for the init, which is the app: its exit
    // status is the restore's (SIGTERM's handler exits with 7).
    let mut guard = KillGuard::new();
    let mut r = Proc::spawn(&mut ws.cmd(&["restore", "-D", dir.to_str().unwrap()]));
    r.send("state");
    assert_eq!(r.read_line(), "n=2 pid=1 ppid=0 host=pid1-fixture");
    let pid = children(r.pid())[0];
    guard.add(pid);
    assert_eq!(ns_pid(pid), Some(1));
    // SAFETY: kill takes integer arguments only.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    assert_eq!(r.read_line(), "term");
    let status = r.wait();
    assert_eq!(
        status.code(),
        Some(7),
        "the restore's exit status; stderr:\n{}",
        r.stderr_after_exit()
    );
}

/// The parent pid of `pid` (`PPid:` of its status, as seen from here).
fn ppid(pid: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// A pid 1 of its own namespace started without a parent-death signal (`unshare`
/// without `--kill-child`), as a container's entrypoint under a runtime that sets none:
/// its pid, guarded, with `orig` the `unshare` process.
fn pid1_without_pdeathsig(guard: &mut KillGuard) -> (Proc, i32) {
    let mut orig = Proc::spawn(
        Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc", "--uts", "--"])
            .arg(fixture("pid1_init")),
    );
    orig.wait_stderr("ready");
    let init = children(orig.pid())[0];
    guard.add(init);
    assert_eq!(ns_pid(init), Some(1));
    orig.send("pdeath");
    assert_eq!(orig.read_line(), "pdeathsig 0", "the original's");
    (orig, init)
}

/// A restored root that is pid 1 again is the sandbox's init, which ties itself to the
/// monitor with PDEATHSIG SIGKILL: the app still reads its own recorded value (0) with
/// `PR_GET_PDEATHSIG`, in every mode (`restore -d`, eager and lazy, `restore` and `run`
/// in the foreground), and the instance still goes when its monitor is killed (SIGKILL:
/// the warden outside the sandbox kills it).
#[test]
fn a_restored_pid1_root_keeps_its_pdeathsig_and_dies_with_its_monitor() {
    let ws = Ws::new();
    let mut guard = KillGuard::new();
    let (mut orig, init) = pid1_without_pdeathsig(&mut guard);
    let (_images, dir) = dump_worker(&ws, init, &mut orig);
    let kill9 = |pid: i32| {
        // SAFETY: kill takes integer arguments only.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    };

    for mode in [&[][..], &["--lazy"][..]] {
        let (mut r, pid) = restore_detached_with(&ws, &dir, &mut guard, mode);
        assert_eq!(ns_pid(pid), Some(1), "{mode:?}");
        r.send("pdeath");
        assert_eq!(r.read_line(), "pdeathsig 0", "restore -d {mode:?}");
        let monitor = ppid(pid);
        kill9(monitor);
        assert!(
            wait_pid_exit(pid, TIMEOUT),
            "restore -d {mode:?}: the instance outlived its monitor"
        );
    }

    // In the foreground: the monitor is the restore itself.
    let mut r = Proc::spawn(&mut ws.cmd(&["restore", "-D", dir.to_str().unwrap()]));
    r.send("pdeath");
    assert_eq!(r.read_line(), "pdeathsig 0", "restore");
    let pid = children(r.pid())[0];
    guard.add(pid);
    kill9(r.pid());
    r.wait();
    assert!(
        wait_pid_exit(pid, TIMEOUT),
        "restore: the instance outlived its monitor"
    );

    // `run` from the store, to its end: the instance's exit is the run's.
    let (mut orig, init) = pid1_without_pdeathsig(&mut guard);
    ws.run(&["dump", "-t", &init.to_string(), "--name", "pid1"], "")
        .assert_ok();
    assert!(wait_pid_exit(init, TIMEOUT));
    orig.wait();
    for mode in [&[][..], &["--eager"][..]] {
        let mut args = vec!["run"];
        args.extend_from_slice(mode);
        args.push("pid1");
        let out = ws.run(&args, "pdeath\n");
        out.assert_ok();
        assert_eq!(out.stdout, "pdeathsig 0\n", "run {mode:?}");
    }
}

/// A process that joined the pid namespace from outside (`nsenter`) is not under its init:
/// a dump of the init would leave it out of the namespace, so it is refused by name, the
/// tree left running.
#[test]
fn pid_namespace_with_a_process_joined_from_outside_is_refused() {
    let ws = Ws::new();
    let bin = fixture("pid1_init");
    let mut guard = KillGuard::new();
    let orig = Proc::spawn(
        Command::new("unshare")
            .args(["--pid", "--fork", "--kill-child", "--mount-proc", "--"])
            .arg(&bin),
    );
    orig.wait_stderr("ready");
    let init = children(orig.pid())[0];
    let joined = Proc::spawn(Command::new("nsenter").args([
        "-t",
        &init.to_string(),
        "-p",
        "--",
        "sh",
        "-c",
        "echo ready >&2; exec sleep 1000",
    ]));
    joined.wait_stderr("ready");
    let inside = children(joined.pid())[0];
    guard.add(inside);
    let dir = tempdir("ws-images-");
    let out = ws.run(
        &[
            "dump",
            "-t",
            &init.to_string(),
            "-D",
            dir.path().join("img").to_str().unwrap(),
        ],
        "",
    );
    out.assert_fail();
    assert!(
        out.stderr.contains(&format!("process {inside} (sleep)"))
            && out.stderr.contains("joined the namespace"),
        "{}",
        out.describe()
    );
    assert!(alive(init) && alive(inside));
}

/// `record --uts --ipc --net private`: the app starts in namespaces of its own (its
/// loopback up), and every instance gets its own, holding what the app left there —
/// its host name, its System V objects, a TCP listener on 127.0.0.1.
#[test]
fn record_in_namespaces_of_its_own() {
    let ws = Ws::new();
    let bin = fixture("ns_ipc");
    let host_name = output(&mut Command::new("hostname"));
    let mut cmd = ws.cmd(&[
        "record",
        "--uts",
        "--ipc",
        "--net",
        "private",
        "--name",
        "nsrec",
        "--",
        bin.to_str().unwrap(),
    ]);
    cmd.env("NS_IPC_LISTEN", "1");
    let out = common::run_with(&mut cmd, b"", TIMEOUT);
    out.assert_ok();
    let manifest = ws.inspect_json("nsrec");
    assert!(manifest.to_string().contains("ns-fixture"), "{manifest}");
    for mode in [&["run"][..], &["run", "--eager"]] {
        let mut args = mode.to_vec();
        args.push("nsrec");
        let out = ws.run(&args, "check\ncheck\n");
        assert_eq!(out.stdout, "PASS\nPASS\n", "{}", out.describe());
    }
    // The app's sethostname stayed in its namespace.
    assert_eq!(output(&mut Command::new("hostname")), host_name);
    let out = ws.run(&["record", "--net", "bridge", "--", "true"], "");
    out.assert_fail();
    assert!(out.stderr.contains("--net bridge"), "{}", out.describe());
}

/// What a client in the network namespace of `from` gets from `addr`:`port`.
fn hello(from: i32, addr: &str, port: &str) -> String {
    output(&mut in_net_of(
        from,
        &[
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{addr}/{port} && cat <&3"),
        ],
    ))
    .trim()
    .to_owned()
}

/// A tree in a network namespace of its own reached through a veth (the other end in a
/// namespace the test made, standing for the host's): the veth comes back at its index
/// with its MTU, MAC, state, addresses and the routes through it, its new peer named by
/// `--veth` in the restorer's namespace; a client there reaches the restored server by
/// the same address and route. A second instance would clash on the peer's name: refused
/// before any process runs.
#[test]
fn veth_is_recreated_with_a_new_peer() {
    let ws = Ws::new();
    let holder = host_netns("");
    let h = holder.pid();
    let server =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/veth_server.py");
    let script = format!("python3 {}; true", server.display());
    let app = unshared_in_net_of(h, &script);
    let port = app
        .wait_stderr("ready")
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_owned();
    let init = children(app.pid());
    assert_eq!(init.len(), 1, "{init:?}");
    let worker = children(init[0])[0];
    let w = worker.to_string();
    for argv in [
        &[
            "ip", "link", "add", "wsv0", "type", "veth", "peer", "name", "eth0", "netns", &w,
        ][..],
        &["ip", "addr", "add", "10.123.0.1/24", "dev", "wsv0"],
        &["ip", "link", "set", "wsv0", "up"],
    ] {
        output(&mut in_net_of(h, argv));
    }
    for argv in [
        &["ip", "link", "set", "lo", "up"][..],
        &["ip", "link", "set", "eth0", "mtu", "1400"],
        &["ip", "link", "set", "eth0", "address", "02:00:0a:7b:00:02"],
        &["ip", "addr", "add", "10.123.0.2/24", "dev", "eth0"],
        &["ip", "link", "set", "eth0", "up"],
        &["ip", "route", "add", "10.124.0.0/16", "via", "10.123.0.1"],
        &[
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/conf/eth0/arp_ignore",
        ],
    ] {
        nsenter(worker, &["-n"], argv);
    }
    assert_eq!(hello(h, "10.123.0.2", &port), "hello 1 from 10.123.0.1");
    let before = ns_state(worker);
    assert!(
        before.iter().any(|l| l.contains("eth0@peer:")
            && l.contains("mtu 1400")
            && l.contains("02:00:0a:7b:00:02")),
        "{before:#?}"
    );
    assert!(before
        .iter()
        .any(|l| l.contains("10.124.0.0/16 via 10.123.0.1 dev eth0")));
    assert!(before.iter().any(|l| l.ends_with("conf/eth0/arp_ignore:1")));

    let images = tempdir("ws-images-");
    let dir = images.path().join("img");
    let d = dir.to_str().unwrap();
    let out = common::run_with(
        &mut ws_in_net_of(&ws, h, &["dump", "-t", &w, "-D", d]),
        b"",
        TIMEOUT,
    );
    assert!(out.success(), "{}", out.describe());
    assert!(
        wait_pid_exit(worker, TIMEOUT),
        "the dumped server still runs"
    );
    drop(app);

    let mut guard = KillGuard::new();
    let mut r = Proc::spawn(&mut ws_in_net_of(
        &ws,
        h,
        &["restore", "-D", d, "-d", "--veth", "eth0=wsv1"],
    ));
    let first = r.read_line();
    let pid: i32 = first
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("restore printed {first:?}: {}", r.stderr_after_exit()));
    guard.add(pid);
    assert!(r.wait().success(), "restore -d failed");
    assert_eq!(ns_state(pid), before, "the instance's network namespace");
    // The new peer is the "host's": up, and given the old peer's address there.
    output(&mut in_net_of(
        h,
        &["ip", "addr", "add", "10.123.0.1/24", "dev", "wsv1"],
    ));
    assert_eq!(hello(h, "10.123.0.2", &port), "hello 2 from 10.123.0.1");

    // A second instance: its peer's name is taken.
    let out = common::run_with(
        &mut ws_in_net_of(&ws, h, &["restore", "-D", d, "-d", "--veth", "eth0=wsv1"]),
        b"",
        TIMEOUT,
    );
    assert!(!out.success(), "{}", out.describe());
    assert!(
        out.stderr
            .contains("this host already has an interface wsv1"),
        "{}",
        out.describe()
    );
    // Naming a veth the snapshot does not have is refused too.
    let out = common::run_with(
        &mut ws_in_net_of(&ws, h, &["restore", "-D", d, "-d", "--veth", "eth9=wsv2"]),
        b"",
        TIMEOUT,
    );
    assert!(
        !out.success() && out.stderr.contains("has no veth named eth9 (it has: eth0)"),
        "{}",
        out.describe()
    );
    drop(guard);
    assert!(!alive(pid), "the instance survived its guard");
    drop(holder);
}
