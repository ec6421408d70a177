//! The serve protocol's decoder (what `warmstart run` and `warmstart serve` read from
//! each other) fed mutated valid messages and random bytes: no panic, a message on
//! refusal. The store's and the page server's decoders are tested, allocations
//! included, in `snapshots/tests/decoders.rs`; this binary links `warmstart-launcher`,
//! whose fork-safe allocator is global, so allocations are not counted here: the
//! decoder reads a packet of at most 64 KiB into a fixed buffer, and postcard checks
//! every string length against what is left of it. `--ignored`: 100k cases each.

use warmstart::serve::protocol::{decode, Reply, Request};
use warmstart_snapshots::fuzz::Target;

fn enc<T: serde::Serialize>(m: &T) -> Vec<u8> {
    postcard::to_allocvec(m).unwrap()
}

pub fn targets() -> Vec<Target> {
    vec![
        Target {
            name: "serve request",
            seeds: vec![
                enc(&Request::Run {
                    snapshot: "echo".into(),
                    display_stats: true,
                    tool: None,
                }),
                enc(&Request::Run {
                    snapshot: "0123456789ab".into(),
                    display_stats: false,
                    tool: Some(b"TOOL 2\n{}".to_vec()),
                }),
                enc(&Request::Signal(15)),
            ],
            prefixes: vec![],
            decode: Box::new(|b| {
                decode::<Request>(b)
                    .map(|m| drop(std::hint::black_box(m)))
                    .map_err(|e| format!("{e:#}"))
            }),
            reseal: None,
        },
        Target {
            name: "serve reply",
            seeds: vec![
                enc(&Reply::Started {
                    id: "0123456789ab".into(),
                    pid: 42,
                    parked: true,
                    stats: Some("restore 1.2 ms".into()),
                }),
                enc(&Reply::Refused("no working set yet".into())),
                enc(&Reply::Exited(3)),
                enc(&Reply::Error("snapshot gone".into())),
            ],
            prefixes: vec![],
            decode: Box::new(|b| {
                decode::<Reply>(b)
                    .map(|m| drop(std::hint::black_box(m)))
                    .map_err(|e| format!("{e:#}"))
            }),
            reseal: None,
        },
    ]
}

fn check(name: &str, cases: u64) {
    let t = targets().into_iter().find(|t| t.name == name).unwrap();
    for s in &t.seeds {
        (t.decode)(s).unwrap();
    }
    let s = warmstart_snapshots::fuzz::run_unmeasured(&t, cases, 0x1405)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(s.refused > 0 && s.accepted > 0, "{name}: {s:?}");
}

#[test]
fn serve_request() {
    check("serve request", 3000);
}

#[test]
fn serve_reply() {
    check("serve reply", 3000);
}

#[test]
#[ignore = "100k cases per decoder: run by hand"]
fn serve_100k() {
    check("serve request", 100_000);
    check("serve reply", 100_000);
}
