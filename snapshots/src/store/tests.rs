use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::*;
use crate::format::tests::sample_manifest;
use crate::model::{PageRun, RunContent, PAGE_SIZE};

fn rand_pages(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(n * PAGE_SIZE);
    for _ in 0..n * PAGE_SIZE / 8 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Compressible but distinct pages.
fn text_pages(seed: u64, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * PAGE_SIZE);
    for p in 0..n {
        let line =
            format!("page {p} of seed {seed}: the quick brown fox jumps over the lazy dog\n");
        while out.len() < (p + 1) * PAGE_SIZE {
            out.extend_from_slice(line.as_bytes());
        }
        out.truncate((p + 1) * PAGE_SIZE);
    }
    out
}

fn manifest_with(runs: Vec<PageRun>, pages: u64, tag: u64) -> Manifest {
    let mut m = sample_manifest();
    m.created_unix = tag;
    let v = &mut m.processes[0].vmas[0];
    v.end = v.start + pages * PAGE_SIZE as u64;
    v.pages = runs;
    m
}

/// Writes `data` as one VMA and commits it.
fn snap(store: &Store, data: &[u8], tag: u64, name: Option<&str>) -> SnapshotId {
    let mut w = store.writer().unwrap();
    let mut runs = Vec::new();
    w.add_pages(0, data, &mut runs).unwrap();
    let pages = (data.len() / PAGE_SIZE) as u64;
    w.commit(manifest_with(runs, pages, tag), name).unwrap()
}

fn read_all(store: &Store, id: &SnapshotId) -> Result<Vec<u8>, StoreError> {
    let s = store.load(id)?;
    let mut out = vec![0; s.page_count() as usize * PAGE_SIZE];
    s.read_pages(0, s.page_count(), &mut out)?;
    Ok(out)
}

/// The data pages of `data`, in order (what the page table holds).
fn non_zero(data: &[u8]) -> Vec<u8> {
    data.chunks(PAGE_SIZE)
        .filter(|p| p.iter().any(|&b| b != 0))
        .flatten()
        .copied()
        .collect()
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn pack_files(store: &Store) -> Vec<String> {
    files(&store.packs_dir())
        .into_iter()
        .filter(|f| f.ends_with(".pack"))
        .collect()
}

#[test]
fn round_trip_and_runs() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(&d.path().join("s")).unwrap();
    let mut data = rand_pages(1, 3);
    data.extend(vec![0; 2 * PAGE_SIZE]);
    data.extend(text_pages(2, 5));
    data.extend(rand_pages(1, 1)); // duplicate of page 0
    let mut w = store.writer().unwrap();
    let mut runs = Vec::new();
    w.add_pages(10, &data[..4 * PAGE_SIZE], &mut runs).unwrap();
    w.add_pages(14, &data[4 * PAGE_SIZE..], &mut runs).unwrap();
    assert_eq!(
        runs,
        vec![
            PageRun {
                page: 10,
                count: 3,
                content: RunContent::Data { first: 0 }
            },
            PageRun {
                page: 13,
                count: 2,
                content: RunContent::Zero
            },
            PageRun {
                page: 15,
                count: 6,
                content: RunContent::Data { first: 3 }
            },
        ]
    );
    assert!(w.add_pages(0, &[1; 100], &mut runs).is_err());
    let id = w
        .commit(manifest_with(runs.clone(), 30, 1), Some("first"))
        .unwrap();
    let s = store.load(&id).unwrap();
    assert_eq!(s.manifest.page_count, 9);
    assert_eq!(s.manifest.processes[0].vmas[0].pages, runs);
    assert_eq!(read_all(&store, &id).unwrap(), non_zero(&data));
    // Partial reads, a single page in the middle of a block.
    let mut one = vec![0; PAGE_SIZE];
    s.read_pages(4, 1, &mut one).unwrap();
    assert_eq!(one, text_pages(2, 5)[PAGE_SIZE..2 * PAGE_SIZE]);
    assert_eq!(s.page_hash(4), *blake3::hash(&one).as_bytes());
    assert!(matches!(
        s.read_pages(8, 2, &mut [0; 2 * PAGE_SIZE]),
        Err(StoreError::PageRange { .. })
    ));
    assert!(matches!(
        s.read_pages(0, 1, &mut [0; 10]),
        Err(StoreError::BufferSize { .. })
    ));
    // A list of records in any order, with repeats, each page as read alone.
    let list = [7, 4, 0, 4, 8, 3];
    let mut got = vec![0; list.len() * PAGE_SIZE];
    s.read_page_list(&list, &mut got).unwrap();
    let all = non_zero(&data);
    for (k, &i) in list.iter().enumerate() {
        let i = i as usize;
        assert_eq!(
            got[k * PAGE_SIZE..(k + 1) * PAGE_SIZE],
            all[i * PAGE_SIZE..(i + 1) * PAGE_SIZE],
            "record {i} at {k}"
        );
    }
    assert!(matches!(
        s.read_page_list(&[1, 9], &mut [0; 2 * PAGE_SIZE]),
        Err(StoreError::PageRange { .. })
    ));
    assert!(matches!(
        s.read_page_list(&[1], &mut [0; 2 * PAGE_SIZE]),
        Err(StoreError::BufferSize { .. })
    ));
    // The id is the blake3 of the manifest file; display forms.
    let bytes = fs::read(store.manifest_path(&id)).unwrap();
    assert_eq!(id, SnapshotId::of_manifest_bytes(&bytes));
    assert_eq!(id.to_string().len(), 64);
    assert_eq!(id.short(), id.to_string()[..12]);
    assert_eq!(store.resolve("first").unwrap(), id);
    assert!(store.verify(None).unwrap().is_ok());
}

#[test]
fn commit_rejects_runs_outside_table() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path()).unwrap();
    let w = store.writer().unwrap();
    let runs = vec![PageRun {
        page: 0,
        count: 2,
        content: RunContent::Data { first: 0 },
    }];
    let e = w.commit(manifest_with(runs, 2, 0), None).unwrap_err();
    assert!(matches!(e, StoreError::InvalidManifest { .. }), "{e}");
}

#[test]
fn dedup_across_snapshots() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path()).unwrap();
    let mut data = rand_pages(7, 40);
    data.extend(text_pages(7, 24));
    let a = snap(&store, &data, 1, None);
    let packs = pack_files(&store);
    // Re-recording identical memory writes no new page.
    let mut w = store.writer().unwrap();
    let mut runs = Vec::new();
    w.add_pages(0, &data, &mut runs).unwrap();
    assert_eq!(w.new_pages(), 0);
    let b = w.commit(manifest_with(runs, 64, 2), None).unwrap();
    assert_ne!(a, b);
    assert_eq!(pack_files(&store), packs);
    assert_eq!(read_all(&store, &b).unwrap(), data);
    let sa = store.stats(&a).unwrap();
    let sb = store.stats(&b).unwrap();
    assert_eq!(sa.shared_with_others, 64);
    assert_eq!(sb.shared_with_others, 64);
    assert_eq!(sa.stored_bytes, sb.stored_bytes);
    assert!(sa.stored_bytes < data.len() as u64, "text pages compress");
    assert_eq!(sa.logical_bytes, 64 * PAGE_SIZE as u64);
    assert_eq!(sa.resident_pages, 64);
    // Duplicates inside one writer (also inside one block) are stored once.
    let mut w = store.writer().unwrap();
    let page = rand_pages(99, 1);
    let rep: Vec<u8> = page.iter().copied().cycle().take(10 * PAGE_SIZE).collect();
    let mut runs = Vec::new();
    w.add_pages(0, &rep, &mut runs).unwrap();
    assert_eq!(w.page_count(), 10);
    w.add_pages(10, &rand_pages(100, 1), &mut runs).unwrap();
    w.add_pages(11, &rand_pages(101, 3), &mut runs).unwrap(); // fills the block
    let c = w.commit(manifest_with(runs, 14, 3), None).unwrap();
    assert_eq!(read_all(&store, &c).unwrap().len(), 14 * PAGE_SIZE);
    let st = store.stats(&c).unwrap();
    assert_eq!(
        st.stored_bytes,
        5 * PAGE_SIZE as u64,
        "5 distinct random pages, stored raw"
    );
}

/// Pages taken from a base snapshot by record copy what it stored: nothing new is
/// written, they read back as the base's pages, in the order the runs give them, next to
/// pages added as usual; records the base lacks are refused, as is a base not there.
#[test]
fn pages_taken_from_a_base_snapshot() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path()).unwrap();
    let data = rand_pages(11, 8);
    let a = snap(&store, &data, 1, None);
    let mut w = store.writer().unwrap();
    let mut runs = Vec::new();
    assert!(matches!(
        w.add_base(&[(0, 0, 1)], &mut runs),
        Err(StoreError::BaseRecords { .. })
    ));
    assert!(
        w.set_base(&SnapshotId([7; 32])).is_err(),
        "no such snapshot"
    );
    w.set_base(&a).unwrap();
    assert!(matches!(
        w.add_base(&[(0, 6, 3)], &mut runs),
        Err(StoreError::BaseRecords { .. })
    ));
    assert!(runs.is_empty() && w.page_count() == 0, "nothing added");
    // Pages 0..2 are the base's records 4..6, page 2 new, pages 3..5 records 0..2.
    w.add_base(&[(0, 4, 2)], &mut runs).unwrap();
    let fresh = rand_pages(12, 1);
    w.add_pages(2, &fresh, &mut runs).unwrap();
    w.add_base(&[(3, 0, 2), (5, 2, 1)], &mut runs).unwrap();
    assert_eq!(w.new_pages(), 1);
    assert_eq!(runs.len(), 1, "contiguous runs are joined: {runs:?}");
    let b = w.commit(manifest_with(runs, 6, 2), None).unwrap();
    let page = |i: usize| &data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
    let mut want = Vec::new();
    for p in [page(4), page(5), &fresh[..], page(0), page(1), page(2)] {
        want.extend_from_slice(p);
    }
    assert_eq!(read_all(&store, &b).unwrap(), want);
}

/// A batch large enough to be hashed and compressed on two threads: pages that repeat
/// across the blocks it fills (before any of them is written) are stored once, zero pages
/// never, and everything reads back in order, also across two batches.
#[test]
fn large_batches_dedup_across_their_own_blocks() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path()).unwrap();
    let distinct = rand_pages(5, 13);
    let mut data = Vec::new();
    for i in 0..300 {
        match i % 17 {
            0 => data.extend(std::iter::repeat_n(0u8, PAGE_SIZE)),
            _ => data.extend_from_slice(&distinct[(i % 13) * PAGE_SIZE..][..PAGE_SIZE]),
        }
    }
    let mut w = store.writer().unwrap();
    let mut runs = Vec::new();
    w.add_pages(0, &data[..200 * PAGE_SIZE], &mut runs).unwrap();
    w.add_pages(200, &data[200 * PAGE_SIZE..], &mut runs)
        .unwrap();
    let id = w.commit(manifest_with(runs, 300, 9), None).unwrap();
    assert_eq!(read_all(&store, &id).unwrap(), non_zero(&data));
    let st = store.stats(&id).unwrap();
    assert_eq!(
        st.stored_bytes,
        13 * PAGE_SIZE as u64,
        "13 distinct random pages"
    );
}

#[test]
fn zero_pages_are_not_stored() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path()).unwrap();
    let mut w = store.writer().unwrap();
    let mut runs = Vec::new();
    w.add_pages(0, &vec![0; 100 * PAGE_SIZE], &mut runs)
        .unwrap();
    assert_eq!(
        runs,
        vec![PageRun {
            page: 0,
            count: 100,
            content: RunContent::Zero
        }]
    );
    let mut m = manifest_with(runs, 100, 0);
    // The sample's shared file has a stored page; this snapshot stores none.
    m.shared_files.clear();
    let id = w.commit(m, None).unwrap();
    assert!(pack_files(&store).is_empty());
    let st = store.stats(&id).unwrap();
    assert_eq!((st.zero_pages, st.data_pages, st.stored_bytes), (100, 0, 0));
    assert!(writer::is_zero(&[0; PAGE_SIZE]));
    let mut p = vec![0; PAGE_SIZE];
    p[PAGE_SIZE - 1] = 1;
    assert!(!writer::is_zero(&p));
}

#[test]
fn short_id_resolution() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path()).unwrap();
    let id = snap(&store, &rand_pages(1, 1), 1, None);
    let hex = id.to_hex();
    assert_eq!(store.resolve(&hex).unwrap(), id);
    assert_eq!(store.resolve(&hex[..4]).unwrap(), id);
    assert_eq!(store.resolve(&hex[..12].to_uppercase()).unwrap(), id);
    // Any prefix length works while it is unique.
    assert_eq!(store.resolve(&hex[..3]).unwrap(), id);
    assert_eq!(store.resolve(&hex[..1]).unwrap(), id);
    // Empty, not hex, unknown.
    assert!(matches!(
        store.resolve(""),
        Err(StoreError::UnknownSnapshot { .. })
    ));
    assert!(matches!(
        store.resolve("zzzzzz"),
        Err(StoreError::UnknownSnapshot { .. })
    ));
    let other = if hex.starts_with('0') { "1111" } else { "0000" };
    let e = store.resolve(other).unwrap_err();
    assert!(e.to_string().contains(other), "{e}");
    // A whole id (upper case too) that the store lacks, not any prefix of it.
    let missing = format!("{other}{}", &hex[4..]);
    let e = store.resolve(&missing).unwrap_err();
    assert!(matches!(e, StoreError::UnknownSnapshot { .. }), "{e}");
    assert_eq!(store.resolve(&hex.to_uppercase()).unwrap(), id);
    // Two ids sharing a prefix (fake manifest files suffice for resolution).
    let a = format!("abcd1{}", &"0".repeat(59));
    let b = format!("abcd2{}", &"0".repeat(59));
    for x in [&a, &b] {
        fs::write(store.snaps_dir().join(format!("{x}.manifest")), b"x").unwrap();
    }
    let e = store.resolve("abcd").unwrap_err();
    match &e {
        StoreError::AmbiguousSnapshot { candidates, .. } => {
            assert_eq!(candidates, &vec![a[..12].to_string(), b[..12].to_string()])
        }
        _ => panic!("{e}"),
    }
    assert!(e.to_string().contains(&a[..12]) && e.to_string().contains("ambiguous"));
    // A shorter prefix is ambiguous too, not unknown.
    assert!(matches!(
        store.resolve("ab"),
        Err(StoreError::AmbiguousSnapshot { .. })
    ));
    assert_eq!(store.resolve("abcd1").unwrap().to_hex(), a);
    // The damaged fakes are listed as damaged, not hidden.
    let list = store.list().unwrap();
    assert_eq!(list.iter().filter(|i| i.damaged.is_some()).count(), 2);
}

#[test]
fn names() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path()).unwrap();
    let a = snap(&store, &rand_pages(1, 2), 1, Some("app-1.0_warm"));
    let b = snap(&store, &rand_pages(2, 2), 2, None);
    assert_eq!(store.resolve("app-1.0_warm").unwrap(), a);
    store.set_name("latest", &b).unwrap();
    store.set_name("app-1.0_warm", &b).unwrap(); // re-pointing
    assert_eq!(store.resolve("app-1.0_warm").unwrap(), b);
    for bad in ["", "a/b", ".hidden", "sp ace", "é"] {
        let e = store.set_name(bad, &a).unwrap_err();
        assert!(matches!(e, StoreError::InvalidName { .. }), "{bad}: {e}");
    }
    let ghost = SnapshotId([9; 32]);
    assert!(matches!(
        store.set_name("x", &ghost),
        Err(StoreError::UnknownSnapshot { .. })
    ));
    let list = store.list().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].id, a);
    assert!(list[0].names.is_empty());
    assert_eq!(
        list[1].names,
        vec!["app-1.0_warm".to_string(), "latest".into()]
    );
    assert_eq!(list[1].command, sample_manifest().command);
    // Removing by name drops the snapshot and every name pointing at it.
    assert_eq!(store.remove("latest").unwrap(), b);
    assert!(store.names().unwrap().is_empty());
    assert!(matches!(
        store.resolve("latest"),
        Err(StoreError::UnknownSnapshot { .. })
    ));
    // A name whose snapshot vanished behind our back.
    fs::write(store.refs_dir().join("dangling"), format!("{b}\n")).unwrap();
    assert!(matches!(
        store.resolve("dangling"),
        Err(StoreError::DanglingName { .. })
    ));
    let r = store.gc().unwrap();
    assert_eq!(r.removed_dangling_names, vec!["dangling".to_string()]);
}

#[test]
fn remove_then_gc_reclaims() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path()).unwrap();
    let a = snap(&store, &rand_pages(1, 20), 1, Some("a"));
    let b_data = rand_pages(2, 20);
    let b = snap(&store, &b_data, 2, None);
    assert_eq!(pack_files(&store).len(), 2);
    assert_eq!(store.gc().unwrap().removed_packs.len(), 0);
    store.remove(&a.short()).unwrap();
    assert!(!store.manifest_path(&a).exists() && !store.table_path(&a).exists());
    let r = store.gc().unwrap();
    assert_eq!(r.removed_packs.len(), 1);
    assert!(r.freed_bytes >= 20 * PAGE_SIZE as u64);
    assert_eq!(r.live_packs, 1);
    assert_eq!(pack_files(&store).len(), 1);
    assert_eq!(read_all(&store, &b).unwrap(), b_data);
    assert!(store.verify(None).unwrap().is_ok());
    // A pack shared by two snapshots survives removal of one of them.
    let c = snap(&store, &b_data, 3, None);
    store.remove(&b.to_hex()).unwrap();
    assert!(store.gc().unwrap().removed_packs.is_empty());
    assert_eq!(read_all(&store, &c).unwrap(), b_data);
}

#[test]
fn killed_writer_leaves_only_garbage() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path()).unwrap();
    let keep = snap(&store, &text_pages(1, 8), 1, None);
    {
        let mut w = store.writer().unwrap();
        let mut runs = Vec::new();
        w.add_pages(0, &rand_pages(5, 9), &mut runs).unwrap();
        // dropped without commit
    }
    // Leftovers of a writer killed at various points: a pack being written, a sealed
    // pack and index nobody references, a page table without manifest, a temp manifest.
    fs::write(store.tmp_dir().join("pack-00000007.123.0.tmp"), b"partial").unwrap();
    let live = pack_files(&store)[0].clone();
    fs::copy(store.packs_dir().join(&live), store.pack_path(77)).unwrap();
    fs::copy(
        store.packs_dir().join(live.replace(".pack", ".idx")),
        store.idx_path(77),
    )
    .unwrap();
    let orphan = SnapshotId([0xab; 32]);
    fs::copy(store.table_path(&keep), store.table_path(&orphan)).unwrap();
    fs::write(store.snaps_dir().join("x.manifest.tmp"), b"half").unwrap();
    // Still readable while dirty.
    assert_eq!(store.list().unwrap().len(), 1);
    assert_eq!(read_all(&store, &keep).unwrap(), text_pages(1, 8));
    let r = store.gc().unwrap();
    // The dropped writer removed its unsealed pack itself; pack 77 is garbage.
    assert_eq!(r.removed_packs, vec![store.pack_path(77)], "{r:?}");
    assert_eq!(r.removed_orphan_tables, 1);
    assert!(r.removed_temp_files >= 2);
    assert!(files(&store.tmp_dir()).is_empty());
    assert_eq!(files(&store.snaps_dir()).len(), 2);
    assert_eq!(read_all(&store, &keep).unwrap(), text_pages(1, 8));
    assert!(store.verify(None).unwrap().is_ok());
    // A new writer after gc works and numbers packs without clashing.
    let again = snap(&store, &rand_pages(6, 3), 2, None);
    assert_eq!(read_all(&store, &again).unwrap(), rand_pages(6, 3));
}

fn flip_byte(path: &Path, at: u64) {
    let mut b = fs::read(path).unwrap();
    b[at as usize] ^= 0x55;
    fs::write(path, b).unwrap();
}

#[test]
fn corrupt_pack_is_reported() {
    for (kind, data) in [("raw", rand_pages(3, 8)), ("lz4", text_pages(3, 8))] {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path()).unwrap();
        let bad = snap(&store, &data, 1, None);
        let good = snap(&store, &rand_pages(4, 4), 2, None);
        let loc = store.load(&bad).unwrap().record(5).loc;
        let pack = store.pack_path(loc.pack);
        flip_byte(&pack, loc.offset + u64::from(loc.len) / 2);
        let s = store.load(&bad).unwrap();
        let mut out = vec![0; 8 * PAGE_SIZE];
        let e = s.read_pages(0, 8, &mut out).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, StoreError::CorruptPage { .. }), "{kind}: {msg}");
        assert!(
            msg.contains(&pack.display().to_string()) && msg.contains(&bad.short()),
            "{msg}"
        );
        // Pages of the undamaged block still read.
        s.read_pages(0, 4, &mut out[..4 * PAGE_SIZE]).unwrap();
        let r = store.verify(None).unwrap();
        assert_eq!(r.snapshots_checked, 2);
        assert_eq!(r.damaged.len(), 1, "{kind}: {r:?}");
        assert_eq!(r.damaged[0].id, bad);
        assert!(r.damaged[0].reasons[0].contains(&pack.display().to_string()));
        assert!(store.verify(Some(&good)).unwrap().is_ok());
    }
}

#[test]
fn missing_and_short_pack() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path()).unwrap();
    let id = snap(&store, &rand_pages(3, 8), 1, None);
    let pack = store.pack_path(store.load(&id).unwrap().record(0).loc.pack);
    let full = fs::read(&pack).unwrap();
    fs::write(&pack, &full[..full.len() - 100]).unwrap();
    let e = read_all(&store, &id).unwrap_err();
    assert!(matches!(e, StoreError::ShortPack { .. }), "{e}");
    assert!(e.to_string().contains(&pack.display().to_string()));
    // verify: one line for the pack, not one per page past its end.
    let r = store.verify(Some(&id)).unwrap();
    assert_eq!(r.damaged[0].reasons.len(), 1, "{r:?}");
    assert!(r.damaged[0].reasons[0].contains("truncated"), "{r:?}");
    fs::remove_file(&pack).unwrap();
    let e = read_all(&store, &id).unwrap_err();
    assert!(matches!(e, StoreError::MissingPack { .. }), "{e}");
    assert!(
        e.to_string().contains(&pack.display().to_string()) && e.to_string().contains(&id.short())
    );
    let r = store.verify(Some(&id)).unwrap();
    assert!(r.damaged[0].reasons[0].contains("missing"), "{r:?}");
    // gc must not run into trouble with a referenced-but-missing pack.
    store.gc().unwrap();
}

#[test]
fn truncated_manifest_and_damaged_table() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path()).unwrap();
    let id = snap(&store, &rand_pages(3, 2), 1, Some("t"));
    let other = snap(&store, &rand_pages(4, 2), 2, None);
    let mpath = store.manifest_path(&id);
    let bytes = fs::read(&mpath).unwrap();
    fs::write(&mpath, &bytes[..bytes.len() - 7]).unwrap();
    let e = store.load(&id).unwrap_err();
    assert!(matches!(e, StoreError::BadManifest { .. }), "{e}");
    assert!(
        e.to_string().contains("truncated") && e.to_string().contains(&mpath.display().to_string())
    );
    let list = store.list().unwrap();
    assert!(list.iter().any(|i| i.id == id && i.damaged.is_some()));
    fs::write(&mpath, &bytes).unwrap();
    // Damaged page table: checksum catches it at load.
    let tpath = store.table_path(&id);
    flip_byte(&tpath, 100);
    let e = store.load(&id).unwrap_err();
    assert!(matches!(e, StoreError::BadTable { .. }), "{e}");
    // A table swapped in from another snapshot is refused too.
    fs::copy(store.table_path(&other), &tpath).unwrap();
    let e = store.load(&id).unwrap_err();
    assert!(e.to_string().contains("different page contents"), "{e}");
    let r = store.verify(None).unwrap();
    assert_eq!(r.damaged.len(), 1);
    // gc refuses to delete packs when a live table is unreadable.
    flip_byte(&tpath, 100);
    assert!(matches!(store.gc(), Err(StoreError::GcUnsafe { .. })));
}

#[test]
fn permissions_are_private() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("a/b/store");
    let store = Store::open(&root).unwrap();
    let id = snap(&store, &rand_pages(1, 4), 1, Some("n"));
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for dir in [
        root.clone(),
        store.packs_dir(),
        store.snaps_dir(),
        store.refs_dir(),
        store.tmp_dir(),
    ] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    let mut checked = 0;
    for dir in [store.packs_dir(), store.snaps_dir(), store.refs_dir()] {
        for f in files(&dir) {
            assert_eq!(mode(&dir.join(&f)), 0o600, "{f}");
            checked += 1;
        }
    }
    assert_eq!(mode(&store.lock_path()), 0o600);
    assert!(checked >= 5);
    assert!(store.exists(&id));
}

#[test]
fn store_path_that_is_a_file() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("plain");
    fs::write(&f, b"x").unwrap();
    let e = Store::open(&f).unwrap_err();
    assert!(matches!(e, StoreError::NotADirectory { .. }), "{e}");
    assert!(e.to_string().contains(&f.display().to_string()));
    let e = Store::open(&f.join("sub")).unwrap_err();
    assert!(e.to_string().contains("plain"), "{e}");
}

#[test]
fn only_snapshot() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open_image_dir(d.path()).unwrap();
    assert!(matches!(
        store.only_snapshot(),
        Err(StoreError::EmptyStore { .. })
    ));
    let a = snap(&store, &rand_pages(1, 1), 1, None);
    assert_eq!(store.only_snapshot().unwrap(), a);
    snap(&store, &rand_pages(2, 1), 2, None);
    let e = store.only_snapshot().unwrap_err();
    assert!(matches!(e, StoreError::NotSingleSnapshot { .. }));
    assert!(e.to_string().contains(&a.short()));
}

/// A page table damaged in a record (met while reading pages of a snapshot loaded
/// without the whole-table checksum, as a restore does) is the table's damage, not the
/// pack's; a record pointing anywhere (offset near 2^64) is an error, not a panic.
#[test]
fn damaged_table_record_is_blamed_on_the_table() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path()).unwrap();
    let id = snap(&store, &text_pages(5, 8), 1, None);
    let tpath = store.table_path(&id);
    let good = fs::read(&tpath).unwrap();
    let rec = |i: usize| table::HEADER_SIZE + i * table::RECORD_SIZE;
    // A hash byte, the block offset, the pack number.
    for (at, bytes) in [
        (rec(3) + 5, vec![good[rec(3) + 5] ^ 1]),
        (rec(2) + 32, u64::MAX.to_le_bytes().to_vec()),
        (rec(6) + 32, (u64::MAX - 10).to_le_bytes().to_vec()),
        (rec(1) + 40, 77u32.to_le_bytes().to_vec()),
    ] {
        let mut bad = good.clone();
        bad[at..at + bytes.len()].copy_from_slice(&bytes);
        fs::write(&tpath, &bad).unwrap();
        let s = store.load_deferred(&id).unwrap();
        let mut out = vec![0; 8 * PAGE_SIZE];
        let e = s.read_pages(0, 8, &mut out).unwrap_err();
        assert!(matches!(e, StoreError::BadTable { .. }), "at {at}: {e}");
        let msg = e.to_string();
        assert!(
            msg.starts_with("page table") && msg.contains(&tpath.display().to_string()),
            "at {at}: {msg}"
        );
        assert!(
            !msg.contains("is corrupt") && !msg.contains("truncated"),
            "{msg}"
        );
        let r = store.verify(Some(&id)).unwrap();
        assert_eq!(r.damaged[0].reasons.len(), 1, "{r:?}");
        assert!(r.damaged[0].reasons[0].contains(".pages"), "{r:?}");
    }
    fs::write(&tpath, &good).unwrap();
    assert!(store.verify(Some(&id)).unwrap().is_ok());
}

/// A missing pack is one reason, however many pages were in it; `list` marks the
/// snapshot (keeping what its manifest says).
#[test]
fn missing_pack_is_one_line_and_listed() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path()).unwrap();
    let id = snap(&store, &rand_pages(6, 600), 1, Some("big"));
    assert!(store.list().unwrap()[0].damaged.is_none());
    let snap = store.load(&id).unwrap();
    let number = snap.record(0).loc.pack;
    let pack = store.pack_path(number);
    // The packer threads may have spread the pages over packs of their own.
    let in_pack = (0..600)
        .filter(|&i| snap.record(i).loc.pack == number)
        .count();
    fs::remove_file(&pack).unwrap();
    let r = store.verify(Some(&id)).unwrap();
    assert_eq!(r.damaged[0].reasons.len(), 1, "{r:?}");
    let reason = &r.damaged[0].reasons[0];
    assert!(
        reason.contains(&pack.display().to_string())
            && reason.contains(&format!("{in_pack} of the")),
        "{reason}"
    );
    let list = store.list().unwrap();
    let info = &list[0];
    let damaged = info.damaged.as_deref().unwrap();
    assert!(damaged.contains(&pack.display().to_string()), "{damaged}");
    assert_eq!(info.names, vec!["big".to_string()]);
    assert_eq!(info.data_pages, 600);
}

/// `verify` checks the hot-pages and working-set files beside a snapshot.
#[test]
fn verify_checks_hot_and_working_set_files() {
    let d = tempfile::tempdir().unwrap();
    let store = Store::open(d.path()).unwrap();
    let id = snap(&store, &text_pages(7, 20), 1, None);
    let s = store.load(&id).unwrap();
    store.save_hot(&s, &[1, 2, 3, 10]).unwrap();
    store
        .save_working_sets(&id, &[(1, vec![3, 1, 2])].into_iter().collect())
        .unwrap();
    assert!(store.verify(Some(&id)).unwrap().is_ok());
    let (hot, ws) = (store.hot_path(&id), store.working_set_path(&id));
    flip_byte(&hot, fs::metadata(&hot).unwrap().len() - 3);
    flip_byte(&ws, 60);
    let r = store.verify(Some(&id)).unwrap();
    let reasons = &r.damaged[0].reasons;
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].contains(&hot.display().to_string()),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains(&ws.display().to_string()),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("checksum mismatch"), "{reasons:?}");
    // The pages themselves were all checked and are fine.
    assert_eq!(r.pages_checked, 20);
}

/// Pages known not to compress (a pull's pages held raw in the registry) are stored
/// raw without trying; a block with any page not known so is compressed as ever; both
/// read back the same.
#[test]
fn pages_known_incompressible_are_stored_raw() {
    use crate::store::table::{CODEC_LZ4, CODEC_RAW};
    let data = text_pages(7, 64);
    let hashes: Vec<[u8; 32]> = data
        .chunks(PAGE_SIZE)
        .map(|p| *blake3::hash(p).as_bytes())
        .collect();
    for (hint, want) in [(true, CODEC_RAW), (false, CODEC_LZ4)] {
        // A store each: the second would find the pages stored by the first.
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(&d.path().join("s")).unwrap();
        let mut w = store.writer().unwrap();
        let mut runs = Vec::new();
        let hints = vec![hint; hashes.len()];
        w.add_verified_pages_hinted(0, &data, &hashes, &hints, &mut runs)
            .unwrap();
        let id = w.commit(manifest_with(runs, 64, 1), None).unwrap();
        let s = store.load(&id).unwrap();
        let codecs: std::collections::BTreeSet<u8> =
            (0..s.page_count()).map(|i| s.record(i).loc.codec).collect();
        assert_eq!(codecs, [want].into(), "hinted {hint}");
        assert_eq!(read_all(&store, &id).unwrap(), data);
    }
}
