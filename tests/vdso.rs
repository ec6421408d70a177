//! A snapshot whose recorded vdso differs from this host's (issue 19, portability):
//! simulated by rewriting the snapshot's vdso record in the store (a new manifest over
//! the same page records, so a new id, every hash in place). A restore names what
//! differs: an export of the snapshot's vdso that this host lacks, or the entries that
//! moved.

mod common;

use common::{fixture, Ws};
use warmstart_snapshots::store::Store;

/// Stores snapshot `name` again as `new_name` with its recorded vdso image changed by
/// `edit` (and its vdso hash made that image's).
fn rewrite_vdso(ws: &Ws, name: &str, new_name: &str, edit: impl FnOnce(&mut Vec<u8>)) {
    let store = Store::open_existing(ws.store()).unwrap();
    let snap = store.load(&store.resolve(name).unwrap()).unwrap();
    let mut m = snap.manifest.clone();
    edit(&mut m.host.vdso_image);
    m.host.vdso_hash = *blake3::hash(&m.host.vdso_image).as_bytes();
    let hashes: Vec<[u8; 32]> = (0..snap.page_count()).map(|i| snap.page_hash(i)).collect();
    let mut w = store.writer().unwrap();
    assert!(
        w.add_known(0, &hashes, &mut Vec::new()),
        "the store has every page"
    );
    w.commit(m, Some(new_name)).unwrap();
}

/// Processes running `exe`.
fn running(exe: &std::path::Path) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe))
        .collect()
}

/// Where `needle` is in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn differing_vdso_is_refused_naming_what_differs() {
    let ws = Ws::new();
    let exe = fixture("vdso_calls");
    ws.record("app", &[&exe]);
    ws.run(&["run", "app"], "check\n").assert_ok();

    // An export this host lacks: the snapshot's vdso names __vdso_getcpu otherwise.
    rewrite_vdso(&ws, "app", "renamed", |img| {
        let at = find(img, b"__vdso_getcpu\0").expect("the vdso exports __vdso_getcpu");
        img[at + 12] = b'X';
    });
    let out = ws.run(&["run", "renamed"], "check\n");
    out.assert_fail();
    assert!(
        out.stderr.contains("this host's vdso lacks") && out.stderr.contains("__vdso_getcpX"),
        "{}",
        out.describe()
    );
    assert!(
        !out.stderr.contains("__vdso_clock_gettime"),
        "{}",
        out.describe()
    );
    assert_eq!(running(&exe), Vec::<i32>::new(), "nothing restored");

    // Other code behind the same exports (the last byte of the image, past its tables).
    rewrite_vdso(&ws, "app", "recompiled", |img| {
        let last = img.len() - 1;
        img[last] ^= 0xff;
    });
    let out = ws.run(&["run", "recompiled"], "check\n");
    out.assert_fail();
    assert!(
        out.stderr
            .contains("the same exports at the same places, other code"),
        "{}",
        out.describe()
    );
    assert_eq!(running(&exe), Vec::<i32>::new(), "nothing restored");

    // The untouched snapshot still runs.
    ws.run(&["run", "app"], "check\n").assert_ok();
}
