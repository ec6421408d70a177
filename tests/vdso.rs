//! A snapshot whose recorded vdso differs from this host's (issue 19, portability):
//! simulated by rewriting the snapshot's vdso record in the store (a new manifest over
//! the same page records, so a new id, every hash in place). A restore sends the
//! snapshot's vdso calls to this host's vdso, or refuses naming an export of the
//! snapshot's vdso that this host lacks.

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
    // The same page table: every record copied, in order.
    let mut w = store.writer().unwrap();
    w.set_base(&snap.id).unwrap();
    w.add_base(&[(0, 0, snap.page_count())], &mut Vec::new())
        .unwrap();
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
fn differing_vdso_is_proxied_or_refused_by_name() {
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

    // Other code behind the same exports (the last byte of the image, past its tables):
    // restored with its vdso calls sent to this host's vdso. The old [vvar] is not
    // mapped, so a call into the old code itself would fault; the fixture checks every
    // vdso answer against the system call's.
    rewrite_vdso(&ws, "app", "recompiled", |img| {
        let last = img.len() - 1;
        img[last] ^= 0xff;
    });
    let out = ws.run(&["run", "recompiled"], "check\nmaps\ncheck\n");
    out.assert_ok();
    let maps: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(maps.first(), Some(&"PASS"), "{}", out.describe());
    assert_eq!(maps.last(), Some(&"PASS"), "{}", out.describe());
    let proxy = maps
        .iter()
        .find(|l| l.ends_with("/memfd:warmstart-vdso-proxy (deleted)"))
        .unwrap_or_else(|| panic!("no proxy mapped: {}", out.describe()));
    assert!(proxy.split_whitespace().nth(1) == Some("r-xp"), "{proxy}");
    assert!(
        maps.iter().any(|l| l.ends_with("[vdso]")),
        "{}",
        out.describe()
    );
    assert!(
        maps.iter().any(|l| l.ends_with("[vvar]")),
        "{}",
        out.describe()
    );
    ws.each_mode("recompiled", "check\n", |mode, out| {
        assert_eq!(out.stdout, "PASS\n", "{mode}: {}", out.describe());
    });
    {
        let _daemon = ws.serve("recompiled");
        let out = ws.served("recompiled", "check\n");
        assert_eq!(out.stdout, "PASS\n", "served: {}", out.describe());
    }
    let out = ws.run(&["run", "recompiled"], "break\ncheck\n");
    assert!(
        out.stdout.starts_with("FAIL: CLOCK_MONOTONIC went back"),
        "{}",
        out.describe()
    );

    // The untouched snapshot still runs.
    let out = ws.run(&["run", "app"], "check\n");
    out.assert_ok();
    assert_eq!(out.stdout, "PASS\n");
}
