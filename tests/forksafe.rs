//! Restores under concurrent load never hang (issue 14): a child of a raw `clone3`
//! must not inherit a lock another thread of its parent held (glibc's malloc arenas
//! above all; see `warmstart_launcher::forksafe`). Short forms of
//! `warmstart::bench::stress`; `cargo bench --bench forksafe` runs the long ones.
//!
//! Before the fix, the first burst through `serve` already lost about a third of its
//! restores to a child asleep in `futex_wait` inside `malloc`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{workloads_dir, Ws};
use warmstart::bench::stress;
use warmstart_snapshots::store::Store;

/// Each burst (or each restore) has this long; a healthy one takes well under a second.
const DEADLINE: Duration = Duration::from_secs(15);

/// A store with `py_echo.py` recorded as `echo` and its working set learned.
fn echo_store() -> Ws {
    let ws = Ws::new();
    let py = common::python();
    let app = workloads_dir().join("py_echo.py");
    ws.record("echo", &[py.as_os_str(), app.as_os_str()]);
    let out = ws.run(&["run", "--no-serve", "echo"], "x0\n");
    out.assert_ok();
    assert_eq!(out.stdout, "1 x0\n", "{}", out.describe());
    ws
}

#[test]
fn bursts_of_runs_through_serve_all_answer() {
    let ws = echo_store();
    let exe = std::path::Path::new(common::bin());
    let tally =
        stress::serve_bursts(exe, ws.store(), "echo", 5, 20, DEADLINE).expect("running the bursts");
    assert!(tally.clean(), "{}", tally.describe());
    assert_eq!(tally.ok.len(), 100, "{}", tally.describe());
}

#[test]
fn restores_from_many_threads_while_others_allocate_all_finish() {
    let ws = echo_store();
    let store = Store::open(ws.store()).expect("store");
    let id = store.resolve("echo").expect("echo");
    let snap = Arc::new(store.load_deferred(&id).expect("loading echo"));
    let tally = stress::threaded_restores(&snap, 8, 4, 4, DEADLINE);
    assert!(tally.clean(), "{}", tally.describe());
    assert_eq!(tally.ok.len(), 32, "{}", tally.describe());
}
