//! The server and the remote `Snapshot` together, in-process, on loopback.

use std::path::Path;

use warmstart_snapshots::model::{Manifest, PageRun, RunContent};
use warmstart_snapshots::store::StoreError;
use warmstart_snapshots::{PageWriter, RemoteWriter};

use super::*;

/// Distinct, compressible pages, with a zero page every 5th.
fn pages(seed: u64, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n * PAGE_SIZE];
    for (p, page) in out.chunks_mut(PAGE_SIZE).enumerate() {
        if p % 5 == 4 {
            continue;
        }
        let line = format!("page {p} seed {seed} lorem ipsum dolor sit amet\n");
        for (i, b) in page.iter_mut().enumerate() {
            *b = line.as_bytes()[i % line.len()];
        }
    }
    out
}

fn commit(w: PageWriter<'_>, runs: Vec<PageRun>, tag: u64, name: &str) -> SnapshotId {
    let mut m = Manifest {
        created_unix: tag,
        ..Manifest::default()
    };
    // The runs are not attached to a VMA here: only the pages matter.
    m.command = vec![format!("{} runs", runs.len())];
    w.commit(m, Some(name)).unwrap()
}

fn start(dir: &Path) -> String {
    let store = Store::open(dir).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || serve_on(&store, listener, None, None));
    addr
}

fn data_pages(data: &[u8]) -> Vec<u8> {
    data.chunks(PAGE_SIZE)
        .filter(|p| p.iter().any(|&b| b != 0))
        .flatten()
        .copied()
        .collect()
}

#[test]
fn remote_snapshot_reads_verified_pages() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let data = pages(1, 3000);
    let mut w = PageWriter::Local(store.writer().unwrap());
    let mut runs = Vec::new();
    w.add_pages(0, &data, &mut runs).unwrap();
    let id = commit(w, runs, 1, "one");
    let addr = start(dir.path());

    let local = store.load(&id).unwrap();
    for query in ["one", &id.to_hex(), &id.short()] {
        let remote = Snapshot::connect(&addr, query).unwrap();
        assert_eq!(remote.id, id);
        assert_eq!(remote.manifest, local.manifest);
        assert_eq!(remote.page_count(), local.page_count());
        assert_eq!(remote.page_server(), Some(addr.as_str()));
        let n = remote.page_count();
        let mut out = vec![0u8; n as usize * PAGE_SIZE];
        remote.read_pages(0, n, &mut out).unwrap();
        assert_eq!(out, data_pages(&data));
        // Unaligned pieces, from several threads at once (the pool).
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let remote = &remote;
                let expect = &out;
                s.spawn(move || {
                    let first = 1 + t * 301;
                    let mut buf = vec![0u8; 1200 * PAGE_SIZE];
                    remote.read_pages(first, 1200, &mut buf).unwrap();
                    let at = first as usize * PAGE_SIZE;
                    assert_eq!(buf, expect[at..at + buf.len()]);
                });
            }
        });
        let e = remote.read_pages(n - 1, 2, &mut [0; 2 * PAGE_SIZE]);
        assert!(matches!(e, Err(StoreError::PageRange { .. })), "{e:?}");
    }
    assert_eq!(Snapshot::connect(&addr, "one").unwrap().working_set(), None);
    store.save_working_set(&id, &[3, 1, 2]).unwrap();
    assert_eq!(
        Snapshot::connect(&addr, "one").unwrap().working_set(),
        Some(vec![3, 1, 2])
    );
}

#[test]
fn wrong_or_unknown_snapshot_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut w = PageWriter::Local(store.writer().unwrap());
    let mut runs = Vec::new();
    w.add_pages(0, &pages(2, 8), &mut runs).unwrap();
    let _id = commit(w, runs, 2, "two");
    let addr = start(dir.path());
    let e = Snapshot::connect(&addr, "nope").unwrap_err().to_string();
    assert!(
        e.contains(&addr) && e.contains("no snapshot or name matches `nope`"),
        "{e}"
    );
    let other = SnapshotId([0xab; 32]).to_hex();
    let e = Snapshot::connect(&addr, &other).unwrap_err().to_string();
    assert!(e.contains(&addr) && e.contains("no snapshot"), "{e}");
}

#[test]
fn corrupt_or_missing_pages_on_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let data = pages(3, 64);
    let mut w = PageWriter::Local(store.writer().unwrap());
    let mut runs = Vec::new();
    w.add_pages(0, &data, &mut runs).unwrap();
    let id = commit(w, runs, 3, "three");
    let addr = start(dir.path());
    let remote = Snapshot::connect(&addr, "three").unwrap();
    // Flip a byte inside the block of record 10.
    let loc = store.load(&id).unwrap().record(10).loc;
    let pack = dir.path().join(format!("packs/pack-{:08}.pack", loc.pack));
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[loc.offset as usize + loc.len as usize / 2] ^= 0x40;
    // Replace the file: the server's mapping of the old one stays as it was, so open
    // the snapshot afresh through a new server.
    std::fs::remove_file(&pack).unwrap();
    std::fs::write(&pack, &bytes).unwrap();
    let addr2 = start(dir.path());
    let fresh = Snapshot::connect(&addr2, "three").unwrap();
    let e = fresh.read_pages(8, 4, &mut [0; 4 * PAGE_SIZE]).unwrap_err();
    assert!(matches!(e, StoreError::PageServerCorrupt { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains(&addr2) && msg.contains("corrupt"), "{msg}");
    // The first server mapped the intact pack: still good.
    remote.read_pages(8, 4, &mut [0; 4 * PAGE_SIZE]).unwrap();

    // A pack gone: the manifest is refused before any page is read.
    std::fs::remove_file(&pack).unwrap();
    let addr3 = start(dir.path());
    let e = Snapshot::connect(&addr3, "three").unwrap_err().to_string();
    assert!(e.contains(&addr3) && e.contains("is missing"), "{e}");
}

#[test]
fn remote_writer_round_trip_and_single_writer() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start(dir.path());
    let data = pages(4, 40);
    let mut w = RemoteWriter::begin(&addr).unwrap();
    // A second writer is refused while the first holds the store.
    let e = RemoteWriter::begin(&addr).unwrap_err().to_string();
    assert!(e.contains("already receiving a dump"), "{e}");
    let mut runs = Vec::new();
    // In two chunks: runs merge across them.
    w.add_pages(0, &data[..17 * PAGE_SIZE], &mut runs).unwrap();
    w.add_pages(17, &data[17 * PAGE_SIZE..], &mut runs).unwrap();
    let mut local_runs = Vec::new();
    {
        let other = tempfile::tempdir().unwrap();
        let s = Store::open(other.path()).unwrap();
        let mut lw = s.writer().unwrap();
        lw.add_pages(0, &data, &mut local_runs).unwrap();
    }
    assert_eq!(runs, local_runs);
    assert!(runs.iter().any(|r| matches!(r.content, RunContent::Zero)));
    let id = commit(PageWriter::Remote(w), runs, 4, "four");
    // The writer is free again, and the snapshot is there.
    drop(RemoteWriter::begin(&addr).unwrap());
    let remote = Snapshot::connect(&addr, "four").unwrap();
    assert_eq!(remote.id, id);
    let n = remote.page_count();
    let mut out = vec![0u8; n as usize * PAGE_SIZE];
    remote.read_pages(0, n, &mut out).unwrap();
    assert_eq!(out, data_pages(&data));
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.resolve("four").unwrap(), id);
}
