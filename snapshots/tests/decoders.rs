//! Every decoder of outside bytes, fed mutated valid encodings and random bytes: no
//! panic, no allocation beyond what the input justifies, a message on refusal (see
//! `warmstart_snapshots::fuzz`). A few thousand cases each here; `cargo bench --bench
//! decoders` (root crate) runs 100k per decoder.

use warmstart_snapshots::fuzz::{self, CountingAlloc};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// Cases per decoder: `WARMSTART_FUZZ_CASES`, or a count that keeps `cargo test` fast.
fn cases() -> u64 {
    std::env::var("WARMSTART_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

fn check(name: &str) {
    let t = fuzz::targets()
        .into_iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no decoder target {name}"));
    // The seeds themselves decode.
    for (i, s) in t.seeds.iter().enumerate() {
        if let Err(e) = (t.decode)(s) {
            panic!("{name}: seed {i} does not decode: {e}");
        }
    }
    let s = fuzz::run(&t, cases(), 0x1405).unwrap_or_else(|e| panic!("{e}"));
    assert!(s.refused > 0, "{name}: nothing refused in {s:?}");
    eprintln!("{name}: {s:?}");
}

#[test]
fn manifest() {
    check("manifest");
}

#[test]
fn page_table() {
    check("page table");
}

#[test]
fn pack_index() {
    check("pack index");
}

#[test]
fn hot_pages() {
    check("hot pages");
}

#[test]
fn working_set() {
    check("working set");
}

#[test]
fn pack_block() {
    check("pack block");
}

#[test]
fn page_server_request() {
    check("page-server request");
}

#[test]
fn page_server_response() {
    check("page-server response");
}

#[test]
fn page_server_frames() {
    check("page-server frames");
}

#[test]
fn every_target_is_tested() {
    let names: Vec<&str> = fuzz::targets().iter().map(|t| t.name).collect();
    assert_eq!(
        names,
        [
            "manifest",
            "page table",
            "pack index",
            "hot pages",
            "working set",
            "pack block",
            "page-server request",
            "page-server response",
            "page-server frames"
        ]
    );
}

/// The counting allocator sees a length-field allocation: the harness would catch one.
#[test]
fn harness_catches_an_allocation_from_a_length_field() {
    assert!(fuzz::counting());
    let t = fuzz::Target {
        name: "naive",
        seeds: vec![vec![0, 0, 0, 0]],
        prefixes: vec![],
        decode: Box::new(|b| {
            let n = b
                .get(..4)
                .map_or(0, |x| u32::from_le_bytes(x.try_into().unwrap()));
            let v = vec![0u8; (n as usize).min(64 << 20)];
            std::hint::black_box(v);
            Ok(())
        }),
        reseal: None,
    };
    let e = fuzz::run(&t, 2000, 1).unwrap_err();
    assert!(e.contains("more than"), "{e}");
}
