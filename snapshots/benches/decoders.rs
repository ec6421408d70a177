//! Robustness run of every decoder of outside bytes in this crate (issue 14):
//! `WARMSTART_FUZZ_CASES` cases per decoder (default 100000) of mutated valid encodings
//! and random bytes, each checked for panics, allocations beyond what its length
//! justifies and empty error messages. Not run by CI:
//! `cargo bench -p warmstart-snapshots --bench decoders [-- SEED]`. `cargo test` runs a
//! few thousand cases of the same (tests/decoders.rs); the serve protocol's decoder is in
//! the root crate (`cargo test --test decoders -- --ignored`).

use std::time::Instant;

use warmstart_snapshots::fuzz::{self, CountingAlloc};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn main() {
    let cases: u64 = std::env::var("WARMSTART_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    // `cargo bench` passes `--bench`; a number among the arguments is the seed.
    let seed = std::env::args()
        .skip(1)
        .find_map(|a| a.parse::<u64>().ok())
        .unwrap_or(0x1405);
    let mut failed = 0;
    for t in &fuzz::targets() {
        let start = Instant::now();
        match fuzz::run(t, cases, seed) {
            Ok(s) => println!(
                "{:<22} {} cases in {:.1?}: {} accepted, {} refused; most allocated: {} bytes \
                 for {} input bytes ({:.1}x)",
                t.name,
                s.cases,
                start.elapsed(),
                s.accepted,
                s.refused,
                s.worst_peak,
                s.worst_len,
                s.worst_ratio
            ),
            Err(e) => {
                failed += 1;
                println!("{:<22} FAILED: {e}", t.name);
            }
        }
    }
    if failed > 0 {
        eprintln!("{failed} decoder(s) failed");
        std::process::exit(1);
    }
}
