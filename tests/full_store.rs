//! A store on a full disk (issue 17): a record or dump that runs out of space fails with
//! the reason, leaves no snapshot (nor name) behind, `gc` reclaims what it had written,
//! and the snapshots already there still restore.
//!
//! The store is a small tmpfs mounted in a mount namespace of the test's own (`unshare
//! --mount`), so the mount goes away with the namespace whatever happens to the test.

mod common;

use std::process::Command;

use common::{run_with, tempdir, workloads_dir, TIMEOUT};

#[test]
fn a_full_store_fails_the_record_cleanly_and_gc_reclaims_it() {
    let mem = common::compile(&workloads_dir().join("c/mem.c"), &["-O2"], "mem");
    let store = tempdir("ws-full-");
    // In the namespace: a 24 MiB store; a 1 MiB app fits, a 64 MiB one (incompressible)
    // does not. Each step prints a `key=value` line the test checks.
    let script = r#"
set -u
mount -t tmpfs -o size=24m,mode=0700 ws-full "$STORE" || { echo mount=failed; exit 0; }
echo mount=ok
small_err=$(echo hi | "$WS" record --name small -- "$MEM" 1 2>&1 >/dev/null)
echo small=$?
echo "small_err=$(echo "$small_err" | tr '\n' ' ')"
echo hi | "$WS" record --name big -- "$MEM" 64 >/dev/null 2>"$STORE/../big.err.$$"
echo big=$?
echo "err=$(tr '\n' ' ' < "$STORE/../big.err.$$")"
rm -f "$STORE/../big.err.$$"
echo "ls=$("$WS" ls 2>&1 | tr '\n' ' ')"
echo "snapshots=$(ls "$STORE/snapshots" | tr '\n' ' ')"
echo "used_after_failure=$(du -sk "$STORE" | cut -f1)"
"$WS" gc >/dev/null 2>&1
echo gc=$?
echo "used_after_gc=$(du -sk "$STORE" | cut -f1)"
echo "answer=$(echo x | "$WS" run small 2>&1 | tr '\n' ' ')"
"#;
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", script])
        .env("STORE", store.path())
        .env("WS", common::bin())
        .env("MEM", &mem)
        .env("WARMSTART_STORE", store.path())
        .current_dir(store.path().parent().unwrap());
    let out = run_with(&mut cmd, b"", TIMEOUT);
    out.assert_ok();
    let get = |k: &str| -> String {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k}= line:\n{}", out.describe()))
            .trim()
            .to_owned()
    };
    assert_ne!(get("mount"), "failed", "{}", out.describe());
    assert_eq!(get("small"), "0", "the small app fits:\n{}", out.describe());
    assert_ne!(
        get("big"),
        "0",
        "the big app cannot fit:\n{}",
        out.describe()
    );
    let err = get("err");
    assert!(
        err.contains("filesystem is full")
            && err.contains("--store")
            && err.contains(&*store.path().to_string_lossy()),
        "the reason, naming the store, and what to do: {err}"
    );
    assert_eq!(err.matches("No space left").count(), 1, "said once: {err}");
    let ls = get("ls");
    assert!(ls.contains("small") && !ls.contains("big"), "{ls}");
    // One snapshot's files (its manifest, page table, maybe its working set): nothing
    // of the failed one.
    let snaps = get("snapshots");
    let ids: std::collections::HashSet<&str> = snaps
        .split_whitespace()
        .map(|f| f.split('.').next().unwrap_or(f))
        .collect();
    assert_eq!(ids.len(), 1, "only the small snapshot's files: {snaps}");
    assert_eq!(get("gc"), "0");
    let (failed, reclaimed): (u64, u64) = (
        get("used_after_failure").parse().unwrap(),
        get("used_after_gc").parse().unwrap(),
    );
    // The small snapshot holds about 1 MiB; the failed record had filled 24.
    assert!(
        reclaimed <= failed && reclaimed < 8 << 10,
        "the partial packs are gone after gc: {failed} KiB before, {reclaimed} KiB after"
    );
    assert!(get("answer").contains(" head "), "{}", out.describe());
}
