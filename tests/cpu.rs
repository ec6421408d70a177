//! A snapshot taken on another CPU (issue 19, portability): simulated by rewriting the
//! snapshot's CPU record in the store (a new manifest over the same page records). A
//! restore refuses, naming it, a feature or xsave state this CPU lacks, and moves the
//! threads' saved xsave images from a smaller layout to this CPU's, bit-exact;
//! `check --snapshot` says the same before any restore.

mod common;

use common::{fixture, Ws};
use warmstart_snapshots::model::Manifest;
use warmstart_snapshots::store::Store;

/// Stores snapshot `name` again as `new_name` with its manifest changed by `edit`.
fn rewrite(ws: &Ws, name: &str, new_name: &str, edit: impl FnOnce(&mut Manifest)) {
    let store = Store::open_existing(ws.store()).unwrap();
    let snap = store.load(&store.resolve(name).unwrap()).unwrap();
    let mut m = snap.manifest.clone();
    edit(&mut m);
    let mut w = store.writer().unwrap();
    w.set_base(&snap.id).unwrap();
    w.add_base(&[(0, 0, snap.page_count())], &mut Vec::new())
        .unwrap();
    w.commit(m, Some(new_name)).unwrap();
}

fn host_of(ws: &Ws, name: &str) -> warmstart_snapshots::model::HostFacts {
    let store = Store::open_existing(ws.store()).unwrap();
    let snap = store.load(&store.resolve(name).unwrap()).unwrap();
    snap.manifest.host.clone()
}

#[test]
fn other_cpus_refused_by_name_or_state_moved() {
    let ws = Ws::new();
    let exe = fixture("ymm_state");
    ws.record("app", &[&exe]);
    let host = host_of(&ws, "app");
    assert!(
        host.cpu_features.iter().any(|f| f == "sse2"),
        "{:?}",
        host.cpu_features
    );
    let out = ws.run(&["run", "--no-serve", "app"], "a\n");
    out.assert_ok();
    if out.stdout == "no avx\n" {
        eprintln!("this CPU has no AVX: the xsave move is not exercised here");
        return;
    }
    assert_eq!(out.stdout, "ymm ok\n", "{}", out.describe());
    let check = ws.run(&["check", "--snapshot", "app"], "");
    check.assert_ok();
    assert!(
        check.stdout.contains("it can run here"),
        "{}",
        check.describe()
    );

    // A CPU feature this CPU does not have.
    rewrite(&ws, "app", "newer", |m| {
        m.host.cpu_features.push("avx1024_future".into())
    });
    let out = ws.run(&["run", "--no-serve", "newer"], "a\n");
    out.assert_fail();
    assert!(
        out.stderr.contains("this CPU lacks avx1024_future") && out.stdout.is_empty(),
        "{}",
        out.describe()
    );
    let check = ws.run(&["check", "--snapshot", "newer", "--json"], "");
    check.assert_fail();
    let v: serde_json::Value = serde_json::from_str(&check.stdout).unwrap();
    assert_eq!(v["runnable"], false, "{v}");
    assert_eq!(v["cpu"]["ok"], false, "{v}");
    assert_eq!(v["kernel"]["ok"], true, "{v}");
    assert!(v["cpu"]["detail"]
        .as_str()
        .unwrap()
        .contains("avx1024_future"));

    // Saved xsave state this CPU does not enable.
    let absent = [9u8, 17, 18, 19]
        .into_iter()
        .find(|&i| host.xsave_features >> i & 1 == 0)
        .expect("some xsave component is not enabled here");
    rewrite(&ws, "app", "morestate", |m| {
        m.host.xsave_features |= 1 << absent
    });
    let out = ws.run(&["run", "--no-serve", "morestate"], "a\n");
    out.assert_fail();
    assert!(
        out.stderr.contains("does not enable xsave state") && out.stdout.is_empty(),
        "{}",
        out.describe()
    );

    // Saved on a CPU with only x87, SSE and AVX state (no AVX-512): every thread's image
    // cut to that layout. The restore moves it back into this CPU's, ymm intact.
    if host.xsave_features == 0x7 {
        return;
    }
    let avx = *host.xsave_layout.iter().find(|c| c.0 == 2).unwrap();
    rewrite(&ws, "app", "avxonly", |m| {
        m.host.xsave_features = 0x7;
        m.host.xsave_layout = vec![avx];
        let end = (avx.1 + avx.2) as usize;
        m.host.xsave_size = end as u32;
        for p in &mut m.processes {
            for t in &mut p.threads {
                t.xsave.truncate(end);
                let bv = u64::from_le_bytes(t.xsave[512..520].try_into().unwrap()) & 0x7;
                t.xsave[512..520].copy_from_slice(&bv.to_le_bytes());
            }
        }
    });
    let check = ws.run(&["check", "--snapshot", "avxonly"], "");
    check.assert_ok();
    assert!(
        check.stdout.contains("xsave state moved from XCR0 0x7"),
        "{}",
        check.describe()
    );
    let out = ws.run(&["run", "--no-serve", "avxonly"], "a\n");
    out.assert_ok();
    assert_eq!(out.stdout, "ymm ok\n", "{}", out.describe());
}
