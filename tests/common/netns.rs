//! Running commands in the namespaces of a process (`nsenter`), for the namespace,
//! veth and migration tests.

use std::process::Command;

use super::{run_with, Proc, Ws, TIMEOUT};

/// Runs `cmd` (e.g. `nsenter ...`), which must succeed; its stdout.
pub fn output(cmd: &mut Command) -> String {
    let out = run_with(cmd, b"", TIMEOUT);
    assert!(out.success(), "{}", out.describe());
    out.stdout
}

pub fn nsenter(pid: i32, flags: &[&str], argv: &[&str]) -> String {
    output(
        Command::new("nsenter")
            .arg("-t")
            .arg(pid.to_string())
            .args(flags)
            .arg("--")
            .args(argv),
    )
}

/// `nsenter -t PID -n -- ARGV`: run in the network namespace of `pid`.
pub fn in_net_of(pid: i32, argv: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg("-t")
        .arg(pid.to_string())
        .args(["-n", "--"])
        .args(argv);
    c
}

/// warmstart with `args`, in the network namespace of `pid`.
pub fn ws_in_net_of(ws: &Ws, pid: i32, args: &[&str]) -> Command {
    let mut c = in_net_of(pid, &[super::bin()]);
    c.env("WARMSTART_STORE", ws.store())
        .env_remove("RUST_LOG")
        .args(args);
    c
}

/// The namespace of `kind` of process `pid` (or "self"), as `/proc/PID/ns/KIND` names it.
pub fn ns_id(pid: &str, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/ns/{kind}: {e}"))
        .to_string_lossy()
        .into_owned()
}

/// A network namespace of the test's own standing for the host's (so nothing touches the
/// real one): loopback up, then `setup` (shell commands, may be empty); held by the
/// returned process until it is dropped.
pub fn host_netns(setup: &str) -> Proc {
    let p = Proc::spawn(Command::new("unshare").args([
        "--net",
        "--",
        "sh",
        "-c",
        &format!("ip link set lo up && {setup} echo ready >&2 && exec cat"),
    ]));
    p.wait_stderr("ready");
    p
}

/// `sh -c SCRIPT` in network, pid and mount namespaces of its own (under `unshare`'s
/// pid 1, killed with it), started from the network namespace of `host`.
pub fn unshared_in_net_of(host: i32, script: &str) -> Proc {
    Proc::spawn(&mut in_net_of(
        host,
        &[
            "unshare",
            "--net",
            "--pid",
            "--mount-proc",
            "--propagation=private",
            "--fork",
            "--kill-child",
            "--",
            "sh",
            "-c",
            script,
        ],
    ))
}
