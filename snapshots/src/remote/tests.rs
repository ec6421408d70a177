use std::io::Cursor;
use std::net::TcpListener;

use super::*;

fn requests() -> Vec<Request> {
    let id = SnapshotId([7; 32]);
    vec![
        Request::Hello {
            magic: MAGIC,
            version: VERSION,
        },
        Request::Resolve {
            query: "web-app".into(),
        },
        Request::Resolve { query: "".into() },
        Request::Manifest { id },
        Request::Pages {
            id,
            first: 5,
            count: 1024,
        },
        Request::WorkingSet { id },
        Request::SaveWorkingSet { id, pages: vec![] },
        Request::SaveWorkingSet {
            id,
            pages: vec![7, 0, u64::MAX],
        },
        Request::Begin,
        Request::Base { id },
        Request::AddBase { pages: vec![] },
        Request::AddBase {
            pages: vec![(0, 5, 3), (u64::MAX, 0, 1)],
        },
        Request::AddPages {
            first_page: 3,
            pages: 2,
            lz4: lz4_flex::block::compress(&[1u8; 8192]),
        },
        Request::Commit {
            name: Some("x".into()),
            manifest: vec![1, 2, 3],
        },
        Request::Commit {
            name: None,
            manifest: vec![],
        },
    ]
}

fn responses() -> Vec<Response> {
    let mut blocks = Vec::new();
    push_block(&mut blocks, b"abc");
    push_block(&mut blocks, b"");
    push_block(&mut blocks, &[9; 100]);
    vec![
        Response::Hello {
            magic: MAGIC,
            version: VERSION,
        },
        Response::Id(SnapshotId([3; 32])),
        Response::Manifest {
            manifest: vec![1, 2, 3],
            table: vec![4, 5],
        },
        Response::Blocks(blocks),
        Response::WorkingSet(None),
        Response::WorkingSet(Some(vec![1, 5, u64::MAX])),
        Response::Ready,
        Response::Runs(vec![
            PageRun {
                page: 0,
                count: 3,
                content: RunContent::Zero,
            },
            PageRun {
                page: 3,
                count: 2,
                content: RunContent::Data { first: 17 },
            },
        ]),
        Response::Error("no such snapshot".into()),
    ]
}

/// Body of an encoded frame, checking its length prefix.
fn body(frame: &[u8]) -> &[u8] {
    let len = u32::from_le_bytes(frame[..4].try_into().unwrap()) as usize;
    assert_eq!(len, frame.len() - 4);
    &frame[4..]
}

#[test]
fn round_trips() {
    for r in requests() {
        let f = r.encode();
        assert_eq!(Request::decode(body(&f)).unwrap(), r);
        // Through the frame reader too.
        let got = read_frame(&mut Cursor::new(&f)).unwrap().unwrap();
        assert_eq!(Request::decode(&got).unwrap(), r);
    }
    for r in responses() {
        let f = r.encode();
        assert_eq!(Response::decode(body(&f)).unwrap(), r);
    }
}

#[test]
fn blocks_iterate_and_detect_truncation() {
    let mut b = Vec::new();
    push_block(&mut b, b"one");
    push_block(&mut b, b"three");
    let mut it = Blocks::new(&b);
    assert_eq!(it.next(), Some(&b"one"[..]));
    assert_eq!(it.next(), Some(&b"three"[..]));
    assert_eq!(it.next(), None);
    assert!(it.is_empty());
    let mut it = Blocks::new(&b[..b.len() - 1]);
    assert_eq!(it.next(), Some(&b"one"[..]));
    assert_eq!(it.next(), None);
    assert!(!it.is_empty(), "a truncated block must be noticed");
}

#[test]
fn truncated_messages_are_errors_not_panics() {
    for r in requests() {
        let f = r.encode();
        let b = body(&f);
        for n in 0..b.len() {
            let res = Request::decode(&b[..n]);
            // Variable-length tails may still decode; fixed fields must not.
            if matches!(
                r,
                Request::Hello { .. } | Request::Manifest { .. } | Request::Pages { .. }
            ) || n == 0
            {
                assert!(res.is_err(), "{r:?} cut to {n} bytes decoded as {res:?}");
            }
        }
        // One byte too many.
        let mut long = b.to_vec();
        long.push(0);
        if matches!(
            r,
            Request::Hello { .. } | Request::Manifest { .. } | Request::Begin
        ) {
            assert_eq!(Request::decode(&long), Err(ProtoError::Trailing(1)));
        }
    }
    for r in responses() {
        let f = r.encode();
        let b = body(&f);
        for n in 0..b.len() {
            let res = Response::decode(&b[..n]);
            if matches!(
                r,
                Response::Hello { .. }
                    | Response::Id(_)
                    | Response::Runs(_)
                    | Response::WorkingSet(Some(_))
            ) || n == 0
            {
                assert!(res.is_err(), "{r:?} cut to {n} bytes decoded as {res:?}");
            }
        }
    }
    assert_eq!(Request::decode(&[0x7e]), Err(ProtoError::UnknownKind(0x7e)));
    // A run count far beyond the payload must not allocate or panic.
    let mut f = Frame::new(kind::R_RUNS, 4).u32(u32::MAX).done();
    assert!(Response::decode(&f.split_off(4)).is_err());
}

#[test]
fn truncated_frames() {
    let f = Request::Manifest {
        id: SnapshotId([1; 32]),
    }
    .encode();
    // Clean end of stream before a frame.
    assert!(read_frame(&mut Cursor::new(&[][..])).unwrap().is_none());
    for n in 1..f.len() {
        let e = read_frame(&mut Cursor::new(&f[..n])).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "cut at {n}");
    }
    // Zero and oversized lengths.
    for len in [0u32, MAX_FRAME as u32 + 1, u32::MAX] {
        let e = read_frame(&mut Cursor::new(len.to_le_bytes())).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}

#[test]
fn append_runs_merges_contiguous_chunks() {
    let mut runs = vec![PageRun {
        page: 0,
        count: 2,
        content: RunContent::Data { first: 0 },
    }];
    append_runs(
        &mut runs,
        &[
            PageRun {
                page: 2,
                count: 1,
                content: RunContent::Data { first: 2 },
            },
            PageRun {
                page: 3,
                count: 1,
                content: RunContent::Zero,
            },
        ],
    );
    append_runs(
        &mut runs,
        &[PageRun {
            page: 4,
            count: 5,
            content: RunContent::Zero,
        }],
    );
    assert_eq!(
        runs,
        vec![
            PageRun {
                page: 0,
                count: 3,
                content: RunContent::Data { first: 0 }
            },
            PageRun {
                page: 3,
                count: 6,
                content: RunContent::Zero
            },
        ]
    );
}

/// A one-connection fake server answering the hello with `answer` (raw bytes).
fn fake_server(answer: Vec<u8>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let _ = read_frame(&mut s);
        let _ = s.write_all(&answer);
        // Keep the connection open a moment so the client reads the answer.
        let _ = read_frame(&mut s);
    });
    addr
}

#[test]
fn wrong_version_is_a_clear_error() {
    let addr = fake_server(
        Response::Hello {
            magic: MAGIC,
            version: VERSION + 1,
        }
        .encode(),
    );
    let e = Client::connect(&addr).unwrap_err().to_string();
    assert!(e.contains(&addr), "{e}");
    assert!(e.contains(&format!("version {}", VERSION + 1)), "{e}");

    let addr = fake_server(
        Response::Error("unsupported page-server protocol version 1: this server speaks 2".into())
            .encode(),
    );
    let e = Client::connect(&addr).unwrap_err().to_string();
    assert!(e.contains("this server speaks 2"), "{e}");
}

#[test]
fn foreign_server_is_a_clear_error() {
    let addr = fake_server(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec());
    let e = Client::connect(&addr).unwrap_err().to_string();
    assert!(e.contains(&addr), "{e}");
    assert!(
        e.contains("did not answer like a warmstart page server"),
        "{e}"
    );
}

#[test]
fn unreachable_server_names_the_address() {
    // Bind then drop: nothing listens on that port any more.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let e = Client::connect(&addr).unwrap_err().to_string();
    assert!(
        e.contains(&format!("page server {addr}: cannot connect")),
        "{e}"
    );
    let e = Client::connect("no-port-here").unwrap_err().to_string();
    assert!(e.contains("page server no-port-here"), "{e}");
}

/// `AddPages` may not claim more pages than its data can decompress to (the server
/// allocates that much), but the most compressible chunk a writer sends still decodes.
#[test]
fn add_pages_page_count_is_bounded_by_its_data() {
    let zero = vec![0u8; 64 << 20];
    let req = Request::AddPages {
        first_page: 0,
        pages: (zero.len() / PAGE_SIZE) as u32,
        lz4: lz4_flex::block::compress(&zero),
    };
    assert_eq!(Request::decode(body(&req.encode())).unwrap(), req);
    let lie = Request::AddPages {
        first_page: 0,
        pages: u32::MAX,
        lz4: vec![0; 16],
    };
    assert_eq!(
        Request::decode(body(&lie.encode())),
        Err(ProtoError::Invalid(
            "page count: more pages than the data can decompress to"
        ))
    );
}

/// A frame announcing 1 GiB is read as what arrives, not allocated up front.
#[test]
fn frame_length_is_not_trusted_for_allocation() {
    let mut f = (MAX_FRAME as u32).to_le_bytes().to_vec();
    f.extend_from_slice(&[kind::R_BLOCKS, 1, 2, 3]);
    let e = read_frame(&mut Cursor::new(&f)).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    assert!(e.to_string().contains("after 4 of its"), "{e}");
}
