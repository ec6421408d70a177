//! The page-server protocol and its client: a store's snapshots served over TCP
//! (`warmstart page-server`), read by [`Snapshot::connect`](crate::Snapshot::connect)
//! for restores on another machine, and written by [`RemoteWriter`] for dumps made
//! elsewhere (live migration: dump here, restore there).
//!
//! # Frames
//!
//! Every message, both ways, is one length-prefixed frame; integers are little-endian.
//!
//! ```text
//! +----------------+-----------+---------------------------------------+
//! | body length u32| kind u8   | payload (body length - 1 bytes)       |
//! +----------------+-----------+---------------------------------------+
//!   1 <= body length <= MAX_FRAME (1 GiB); anything else ends the connection
//! ```
//!
//! # Conversation
//!
//! ```text
//!  client                                              server
//!    | Hello   magic "WARMPSRV" version u32 ---------->  |  a wrong magic or version is
//!    | <----------------- Hello magic version          |  answered with Error, then closed
//!    |                                                 |
//!    | Resolve  query (utf-8: name, id, id prefix) --> |
//!    | <---------------------------------- Id id[32]   |
//!    | Manifest id[32] ------------------------------> |  (the server also checks that
//!    | <--- Manifest len u64, manifest, page table     |   every pack it references exists)
//!    | WorkingSet id[32] ----------------------------> |
//!    | <---- WorkingSet present u8, count u64, u64s    |
//!    | Pages id[32] first u64 count u64 -------------> |  count <= MAX_PAGES_PER_REQUEST
//!    | <---------- Blocks (len u32, stored block)...   |  one per run of consecutive records
//!    |                                                 |  sharing a block, in record order
//!    |                                                 |
//!    | Begin ----------------------------------------> |  takes the store's writer: a second
//!    | <------------------------------------- Ready    |  concurrent writer gets Error
//!    | AddPages first_page u64 pages u32 lz4 data ---> |  SnapshotWriter::add_pages there
//!    | <-------------------- Runs count u32, run...    |  run: page u64 count u64 kind u8
//!    |   ... (one AddPages per chunk of a VMA)         |       [first u64 if kind = 1 data]
//!    | Base id[32] ----------------------------------> |  SnapshotWriter::set_base there:
//!    | <------------------------- Ready (or Error)     |  an Error leaves the writer as it was
//!    | AddBase count u64, (page, record, count) u64s > |  SnapshotWriter::add_base there
//!    | <-------------------- Runs count u32, run...    |
//!    | Commit name_len u16 name manifest ------------> |  SnapshotWriter::commit there
//!    | <------------------------------------- Id id    |
//!    |                                                 |
//!    | <------------------------- Error utf-8 message  |  instead of any answer
//! ```
//!
//! The client trusts nothing it receives: the manifest must hash to the id (and to the id
//! asked for, when a full id was given), the page table's `pages_hash` and records must
//! match the manifest, and each page decoded from the blocks must hash to its record.
//! Blocks are sent as stored (lz4 or raw) and decompressed by the client.
//!
//! Without TLS the protocol has no authentication or encryption: serve only on trusted
//! networks. With TLS (see [`tls`]) the same frames go inside a TLS stream, the server is
//! verified against a CA, and the server may require client certificates.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use thiserror::Error;

use crate::model::{append_runs, Manifest, PageRun, RunContent, PAGE_SIZE};
use crate::store::{SnapshotId, SnapshotWriter, StoreError};

pub mod tls;
use tls::{ClientTls, Stream};

pub const MAGIC: [u8; 8] = *b"WARMPSRV";
/// 2: `AddKnown` (pages by hash) replaced by `Base` and `AddBase` (by base record).
pub const VERSION: u32 = 2;
/// Largest frame body either side accepts.
pub const MAX_FRAME: usize = 1 << 30;
/// Most pages one `Pages` request may ask for; the client splits larger reads.
pub const MAX_PAGES_PER_REQUEST: u64 = 1024;
/// By default, a server that does not answer within this long is taken for dead (every
/// connect and every read; `run --page-server-timeout` sets another).
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this long for a connect and the handshake (something else listening there may
/// never answer), or the I/O timeout if shorter.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a page server receiving a dump may take to answer.
const WRITER_TIMEOUT: Duration = Duration::from_secs(60);

/// `n s` or `n ms` for a timeout in a message.
fn secs(t: Duration) -> String {
    if t.subsec_millis() == 0 {
        format!("{} s", t.as_secs())
    } else {
        format!("{} ms", t.as_millis())
    }
}

mod kind {
    pub const HELLO: u8 = 0x01;
    pub const RESOLVE: u8 = 0x02;
    pub const MANIFEST: u8 = 0x03;
    pub const PAGES: u8 = 0x04;
    pub const WORKING_SET: u8 = 0x05;
    pub const SAVE_WORKING_SET: u8 = 0x06;
    pub const BEGIN: u8 = 0x10;
    pub const ADD_PAGES: u8 = 0x11;
    pub const COMMIT: u8 = 0x12;
    pub const BASE: u8 = 0x14;
    pub const ADD_BASE: u8 = 0x15;

    pub const R_HELLO: u8 = 0x81;
    pub const R_ID: u8 = 0x82;
    pub const R_MANIFEST: u8 = 0x83;
    pub const R_BLOCKS: u8 = 0x84;
    pub const R_WORKING_SET: u8 = 0x85;
    pub const R_READY: u8 = 0x90;
    pub const R_RUNS: u8 = 0x91;
    pub const R_ERROR: u8 = 0xff;
}

/// A frame that cannot be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtoError {
    #[error("truncated message: {0} missing")]
    Truncated(&'static str),
    #[error("unknown message kind {0:#04x}")]
    UnknownKind(u8),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    #[error("invalid message: {0}")]
    Invalid(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Hello {
        magic: [u8; 8],
        version: u32,
    },
    Resolve {
        query: String,
    },
    Manifest {
        id: SnapshotId,
    },
    Pages {
        id: SnapshotId,
        first: u64,
        count: u64,
    },
    WorkingSet {
        id: SnapshotId,
    },
    /// Store the working set a lazy run learned (answered with `Ready`).
    SaveWorkingSet {
        id: SnapshotId,
        pages: Vec<u64>,
    },
    Begin,
    AddPages {
        first_page: u64,
        pages: u32,
        lz4: Vec<u8>,
    },
    Commit {
        name: Option<String>,
        manifest: Vec<u8>,
    },
    /// Use snapshot `id` of the server's store as the base of the one being written.
    Base {
        id: SnapshotId,
    },
    /// Pages whose contents are the base's records: `(first_page, base_first, count)`
    /// each, answered with the runs.
    AddBase {
        pages: Vec<(u64, u64, u64)>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Hello {
        magic: [u8; 8],
        version: u32,
    },
    Id(SnapshotId),
    Manifest {
        manifest: Vec<u8>,
        table: Vec<u8>,
    },
    /// Stored blocks, each `len u32 ++ bytes` (see [`push_block`], [`Blocks`]).
    Blocks(Vec<u8>),
    WorkingSet(Option<Vec<u64>>),
    Ready,
    Runs(Vec<PageRun>),
    Error(String),
}

/// A frame under construction: length placeholder and kind, then the payload.
struct Frame(Vec<u8>);

impl Frame {
    fn new(kind: u8, capacity: usize) -> Frame {
        let mut v = Vec::with_capacity(5 + capacity);
        v.extend_from_slice(&[0, 0, 0, 0, kind]);
        Frame(v)
    }
    fn u8(mut self, x: u8) -> Self {
        self.0.push(x);
        self
    }
    fn u16(mut self, x: u16) -> Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u32(mut self, x: u32) -> Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u64(mut self, x: u64) -> Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    /// The whole frame, length filled in.
    fn done(mut self) -> Vec<u8> {
        let len = (self.0.len() - 4) as u32;
        self.0[..4].copy_from_slice(&len.to_le_bytes());
        self.0
    }
}

/// Reads a payload field by field.
struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtoError> {
        if self.0.len() < n {
            return Err(ProtoError::Truncated(what));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, ProtoError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
    /// A `u64` count, then that many `u64`s.
    fn u64s(&mut self, what: &'static str) -> Result<Vec<u64>, ProtoError> {
        let n = self.u64(what)?;
        if n > (self.0.len() / 8) as u64 {
            return Err(ProtoError::Truncated(what));
        }
        (0..n).map(|_| self.u64(what)).collect()
    }
    fn id(&mut self) -> Result<SnapshotId, ProtoError> {
        Ok(SnapshotId(
            self.take(32, "snapshot id")?.try_into().unwrap(),
        ))
    }
    fn magic(&mut self) -> Result<[u8; 8], ProtoError> {
        Ok(self.take(8, "magic")?.try_into().unwrap())
    }
    fn string(&mut self, n: usize, what: &'static str) -> Result<String, ProtoError> {
        String::from_utf8(self.take(n, what)?.to_vec()).map_err(|_| ProtoError::Invalid(what))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
    fn end(self) -> Result<(), ProtoError> {
        match self.0.len() {
            0 => Ok(()),
            n => Err(ProtoError::Trailing(n)),
        }
    }
}

fn split_kind(body: &[u8]) -> Result<(u8, Rd<'_>), ProtoError> {
    match body.split_first() {
        Some((&k, rest)) => Ok((k, Rd(rest))),
        None => Err(ProtoError::Truncated("message kind")),
    }
}

impl Request {
    /// The whole frame (length prefix included).
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Request::Hello { magic, version } => {
                Frame::new(kind::HELLO, 12).bytes(magic).u32(*version)
            }
            Request::Resolve { query } => {
                Frame::new(kind::RESOLVE, query.len()).bytes(query.as_bytes())
            }
            Request::Manifest { id } => Frame::new(kind::MANIFEST, 32).bytes(&id.0),
            Request::Pages { id, first, count } => Frame::new(kind::PAGES, 48)
                .bytes(&id.0)
                .u64(*first)
                .u64(*count),
            Request::WorkingSet { id } => Frame::new(kind::WORKING_SET, 32).bytes(&id.0),
            Request::SaveWorkingSet { id, pages } => {
                let mut f = Frame::new(kind::SAVE_WORKING_SET, 40 + pages.len() * 8)
                    .bytes(&id.0)
                    .u64(pages.len() as u64);
                for &p in pages {
                    f = f.u64(p);
                }
                f
            }
            Request::Begin => Frame::new(kind::BEGIN, 0),
            Request::AddPages {
                first_page,
                pages,
                lz4,
            } => Frame::new(kind::ADD_PAGES, 12 + lz4.len())
                .u64(*first_page)
                .u32(*pages)
                .bytes(lz4),
            Request::Base { id } => Frame::new(kind::BASE, 32).bytes(&id.0),
            Request::AddBase { pages } => {
                let mut f =
                    Frame::new(kind::ADD_BASE, 8 + pages.len() * 24).u64(pages.len() as u64);
                for &(page, first, count) in pages {
                    f = f.u64(page).u64(first).u64(count);
                }
                f
            }
            Request::Commit { name, manifest } => {
                let name = name.as_deref().unwrap_or("");
                Frame::new(kind::COMMIT, 2 + name.len() + manifest.len())
                    .u16(name.len() as u16)
                    .bytes(name.as_bytes())
                    .bytes(manifest)
            }
        }
        .done()
    }

    /// Decodes a frame body (kind and payload, without the length prefix).
    pub fn decode(body: &[u8]) -> Result<Request, ProtoError> {
        let (k, mut r) = split_kind(body)?;
        let req = match k {
            kind::HELLO => Request::Hello {
                magic: r.magic()?,
                version: r.u32("version")?,
            },
            kind::RESOLVE => {
                let n = r.0.len();
                Request::Resolve {
                    query: r.string(n, "query")?,
                }
            }
            kind::MANIFEST => Request::Manifest { id: r.id()? },
            kind::PAGES => Request::Pages {
                id: r.id()?,
                first: r.u64("first page")?,
                count: r.u64("page count")?,
            },
            kind::WORKING_SET => Request::WorkingSet { id: r.id()? },
            kind::SAVE_WORKING_SET => {
                let id = r.id()?;
                let pages = r.u64s("working set")?;
                Request::SaveWorkingSet { id, pages }
            }
            kind::BEGIN => Request::Begin,
            kind::ADD_PAGES => {
                let first_page = r.u64("first page")?;
                let pages = r.u32("page count")?;
                let lz4 = r.rest();
                // The server allocates `pages` pages to decompress into: no more than the
                // data can decompress to (an lz4 block expands at most 255-fold).
                if pages as u64 * PAGE_SIZE as u64 > (lz4.len() as u64).saturating_mul(255) {
                    return Err(ProtoError::Invalid(
                        "page count: more pages than the data can decompress to",
                    ));
                }
                Request::AddPages {
                    first_page,
                    pages,
                    lz4: lz4.to_vec(),
                }
            }
            kind::BASE => Request::Base { id: r.id()? },
            kind::ADD_BASE => {
                let n = r.u64("base run count")?;
                if n > (r.0.len() / 24) as u64 {
                    return Err(ProtoError::Truncated("base runs"));
                }
                let mut pages = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    pages.push((
                        r.u64("base run page")?,
                        r.u64("base run record")?,
                        r.u64("base run count")?,
                    ));
                }
                Request::AddBase { pages }
            }
            kind::COMMIT => {
                let n = r.u16("name length")? as usize;
                let name = r.string(n, "name")?;
                Request::Commit {
                    name: (!name.is_empty()).then_some(name),
                    manifest: r.rest().to_vec(),
                }
            }
            k => return Err(ProtoError::UnknownKind(k)),
        };
        r.end()?;
        Ok(req)
    }
}

impl Response {
    /// The whole frame (length prefix included).
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Response::Hello { magic, version } => {
                Frame::new(kind::R_HELLO, 12).bytes(magic).u32(*version)
            }
            Response::Id(id) => Frame::new(kind::R_ID, 32).bytes(&id.0),
            Response::Manifest { manifest, table } => {
                Frame::new(kind::R_MANIFEST, 8 + manifest.len() + table.len())
                    .u64(manifest.len() as u64)
                    .bytes(manifest)
                    .bytes(table)
            }
            Response::Blocks(b) => Frame::new(kind::R_BLOCKS, b.len()).bytes(b),
            Response::WorkingSet(None) => Frame::new(kind::R_WORKING_SET, 1).u8(0),
            Response::WorkingSet(Some(ws)) => {
                let mut f = Frame::new(kind::R_WORKING_SET, 9 + ws.len() * 8)
                    .u8(1)
                    .u64(ws.len() as u64);
                for &p in ws {
                    f = f.u64(p);
                }
                f
            }
            Response::Ready => Frame::new(kind::R_READY, 0),
            Response::Runs(runs) => {
                let mut f = Frame::new(kind::R_RUNS, 4 + runs.len() * 25).u32(runs.len() as u32);
                for r in runs {
                    f = f.u64(r.page).u64(r.count);
                    f = match r.content {
                        RunContent::Zero => f.u8(0),
                        RunContent::Data { first } => f.u8(1).u64(first),
                    };
                }
                f
            }
            Response::Error(msg) => Frame::new(kind::R_ERROR, msg.len()).bytes(msg.as_bytes()),
        }
        .done()
    }

    /// Decodes a frame body (kind and payload, without the length prefix).
    pub fn decode(body: &[u8]) -> Result<Response, ProtoError> {
        let (k, mut r) = split_kind(body)?;
        let resp = match k {
            kind::R_HELLO => Response::Hello {
                magic: r.magic()?,
                version: r.u32("version")?,
            },
            kind::R_ID => Response::Id(r.id()?),
            kind::R_MANIFEST => {
                let n = r.u64("manifest length")?;
                let n = usize::try_from(n).map_err(|_| ProtoError::Truncated("manifest"))?;
                Response::Manifest {
                    manifest: r.take(n, "manifest")?.to_vec(),
                    table: r.rest().to_vec(),
                }
            }
            kind::R_BLOCKS => Response::Blocks(r.rest().to_vec()),
            kind::R_WORKING_SET => match r.u8("working set flag")? {
                0 => Response::WorkingSet(None),
                1 => Response::WorkingSet(Some(r.u64s("working set")?)),
                _ => return Err(ProtoError::Invalid("working set flag")),
            },
            kind::R_READY => Response::Ready,
            kind::R_RUNS => {
                let n = r.u32("run count")?;
                let mut runs = Vec::with_capacity((n as usize).min(r.0.len() / 17));
                for _ in 0..n {
                    let page = r.u64("run page")?;
                    let count = r.u64("run length")?;
                    let content = match r.u8("run kind")? {
                        0 => RunContent::Zero,
                        1 => RunContent::Data {
                            first: r.u64("run first record")?,
                        },
                        _ => return Err(ProtoError::Invalid("run kind")),
                    };
                    runs.push(PageRun {
                        page,
                        count,
                        content,
                    });
                }
                Response::Runs(runs)
            }
            kind::R_ERROR => {
                let n = r.0.len();
                Response::Error(String::from_utf8_lossy(r.take(n, "message")?).into_owned())
            }
            k => return Err(ProtoError::UnknownKind(k)),
        };
        r.end()?;
        Ok(resp)
    }
}

/// Appends one block to a `Blocks` payload.
pub fn push_block(out: &mut Vec<u8>, block: &[u8]) {
    out.extend_from_slice(&(block.len() as u32).to_le_bytes());
    out.extend_from_slice(block);
}

/// Iterates the blocks of a `Blocks` payload; stops (and stays non-empty) at a
/// truncated one.
pub struct Blocks<'a>(&'a [u8]);

impl<'a> Blocks<'a> {
    pub fn new(payload: &'a [u8]) -> Blocks<'a> {
        Blocks(payload)
    }
    /// True once every byte was consumed as whole blocks.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> Iterator for Blocks<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        let (len, rest) = self.0.split_at_checked(4)?;
        let len = u32::from_le_bytes(len.try_into().unwrap()) as usize;
        let block = rest.get(..len)?;
        self.0 = &rest[len..];
        Some(block)
    }
}

/// lz4 block decompression (for the server's side of `AddPages`); the decompressed size.
pub fn lz4_decompress_into(src: &[u8], dst: &mut [u8]) -> Result<usize, String> {
    lz4_flex::block::decompress_into(src, dst).map_err(|e| e.to_string())
}

/// Writes one whole frame.
pub fn write_frame(w: &mut impl Write, frame: &[u8]) -> io::Result<()> {
    w.write_all(frame)?;
    w.flush()
}

/// Most of a frame's announced length allocated before its bytes arrive.
const FRAME_PREALLOC: usize = 64 << 10;

/// Reads one frame body (kind and payload). `Ok(None)` at a clean end of stream (before
/// the length prefix); a length of 0 or over [`MAX_FRAME`] is `InvalidData`.
pub fn read_frame(r: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    read_frame_max(r, MAX_FRAME)
}

/// [`read_frame`] accepting bodies of at most `max` bytes.
pub fn read_frame_max(r: &mut impl Read, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame length {len} is out of range (1..={max})"),
        ));
    }
    // The length is the peer's word: read up to it, growing the buffer with what really
    // arrives, rather than allocating it up front (a 4-byte "1 GiB" would cost 1 GiB).
    let mut body = Vec::with_capacity(len.min(FRAME_PREALLOC));
    r.take(len as u64).read_to_end(&mut body)?;
    if body.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the frame ends after {} of its {len} bytes", body.len()),
        ));
    }
    Ok(Some(body))
}

/// One connection to a page server, handshake done.
#[derive(Debug)]
struct Conn {
    stream: Stream,
    /// How long an answer may take.
    timeout: Duration,
}

fn unexpected(addr: &str, what: &str, got: &Response) -> StoreError {
    let reason = match got {
        Response::Error(msg) => msg.clone(),
        other => format!(
            "answered {what} with an unexpected {} message",
            match other {
                Response::Hello { .. } => "Hello",
                Response::Id(_) => "Id",
                Response::Manifest { .. } => "Manifest",
                Response::Blocks(_) => "Blocks",
                Response::WorkingSet(_) => "WorkingSet",
                Response::Ready => "Ready",
                Response::Runs(_) => "Runs",
                Response::Error(_) => "Error",
            }
        ),
    };
    StoreError::PageServer {
        addr: addr.to_owned(),
        reason,
    }
}

impl Conn {
    fn open(addr: &str, timeout: Duration, tls: Option<&ClientTls>) -> Result<Conn, StoreError> {
        let hello_timeout = timeout.min(CONNECT_TIMEOUT);
        let io = |action: &'static str| {
            move |error: io::Error| StoreError::PageServerIo {
                addr: addr.to_owned(),
                action,
                error,
            }
        };
        let addrs: Vec<_> = addr
            .to_socket_addrs()
            .map_err(io("resolve its address (expected HOST:PORT)"))?
            .collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the name has no address");
        let mut stream = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, hello_timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let stream = stream.ok_or_else(|| io("connect")(last))?;
        let _ = stream.set_nodelay(true);
        // A short timeout for the handshake: something else listening there may never answer.
        stream
            .set_read_timeout(Some(hello_timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(io("configure the connection"))?;
        let tls_failed = |reason: String| StoreError::PageServer {
            addr: addr.to_owned(),
            reason,
        };
        let stream = match tls {
            None => Stream::Plain(tls::Sock(stream)),
            Some(t) => {
                let mut s = t.wrap(addr, stream).map_err(tls_failed)?;
                match s.handshake() {
                    Ok(()) => s,
                    Err(e) => {
                        return Err(match tls::client_error_reason(&e) {
                            Some(reason) => tls_failed(reason),
                            None if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            ) =>
                            {
                                tls_failed(format!(
                                    "no TLS handshake within {} (is it a page server, \
                                     started with --tls-cert/--tls-key?)",
                                    secs(hello_timeout)
                                ))
                            }
                            None => io("make the TLS handshake")(e),
                        })
                    }
                }
            }
        };
        let mut conn = Conn {
            stream,
            timeout: hello_timeout,
        };
        let hello = Request::Hello {
            magic: MAGIC,
            version: VERSION,
        };
        let answer = conn.call_max(addr, &hello, 1024);
        if let (Some(_), Err(StoreError::PageServerIo { error, .. })) = (tls, &answer) {
            let closed = matches!(
                error.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::UnexpectedEof
            );
            if closed && tls::client_error_reason(error).is_none() {
                // A server refusing this client's certificate (TLS 1.3: after the client's
                // side of the handshake) sends an alert and closes: the hello may meet the
                // closed connection before the alert was read. Read it; else say what the
                // closing most likely means.
                let mut byte = [0u8; 1];
                let reason = match conn.stream.read(&mut byte) {
                    Err(e) => tls::client_error_reason(&e),
                    Ok(_) => None,
                }
                .unwrap_or_else(|| {
                    format!(
                        "it closed the connection right after the TLS handshake ({error}): \
                         it most likely requires a client certificate or refused this \
                         one: --tls-cert and --tls-key must be given, signed by the CA the \
                         page server trusts (its --tls-cacert)"
                    )
                });
                return Err(tls_failed(reason));
            }
        }
        conn.stream
            .tcp()
            .set_read_timeout(Some(timeout))
            .map_err(io("configure the connection"))?;
        conn.timeout = timeout;
        match answer {
            Ok(Response::Hello { magic, version }) if magic == MAGIC && version == VERSION => {
                Ok(conn)
            }
            Ok(Response::Hello { magic, version }) if magic == MAGIC => {
                Err(StoreError::PageServer {
                    addr: addr.to_owned(),
                    reason: format!(
                        "it speaks page-server protocol version {version}, this warmstart {VERSION}"
                    ),
                })
            }
            Ok(Response::Error(msg)) => Err(StoreError::PageServer {
                addr: addr.to_owned(),
                reason: msg,
            }),
            // The server refused this client's certificate after the handshake (TLS 1.3).
            Err(StoreError::PageServerIo { error, .. })
                if tls::client_error_reason(&error).is_some() =>
            {
                Err(tls_failed(
                    tls::client_error_reason(&error).unwrap_or_default(),
                ))
            }
            Ok(_) | Err(StoreError::PageServer { .. }) => Err(StoreError::PageServer {
                addr: addr.to_owned(),
                reason: "it did not answer like a warmstart page server".into(),
            }),
            Err(StoreError::PageServerIo { error, .. })
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(StoreError::PageServer {
                    addr: addr.to_owned(),
                    reason: format!(
                        "it did not answer like a warmstart page server within {}",
                        secs(hello_timeout)
                    ),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Sends `req`, reads the answer. An `Error` answer is returned as a response.
    fn call(&mut self, addr: &str, req: &Request) -> Result<Response, StoreError> {
        self.call_max(addr, req, MAX_FRAME)
    }

    fn call_max(&mut self, addr: &str, req: &Request, max: usize) -> Result<Response, StoreError> {
        let io = |action: &'static str| {
            move |error: io::Error| StoreError::PageServerIo {
                addr: addr.to_owned(),
                action,
                error,
            }
        };
        write_frame(&mut self.stream, &req.encode()).map_err(io("send a request"))?;
        let body = match read_frame_max(&mut self.stream, max) {
            Ok(Some(b)) => b,
            Ok(None) => {
                return Err(io("read its answer")(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection was closed (did the page server exit?)",
                )))
            }
            // (A TLS failure is InvalidData too: kept as I/O, for its own message.)
            Err(e)
                if e.kind() == io::ErrorKind::InvalidData
                    && tls::client_error_reason(&e).is_none() =>
            {
                return Err(StoreError::PageServer {
                    addr: addr.to_owned(),
                    reason: format!("malformed answer: {e}"),
                })
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io("read its answer")(io::Error::new(
                    e.kind(),
                    format!(
                        "no answer within {} (the page-server timeout: \
                         --page-server-timeout SECS)",
                        secs(self.timeout)
                    ),
                )))
            }
            Err(e) => return Err(io("read its answer")(e)),
        };
        Response::decode(&body).map_err(|e| StoreError::PageServer {
            addr: addr.to_owned(),
            reason: format!("malformed answer: {e}"),
        })
    }
}

/// A page-server client: a pool of connections, one per concurrent caller, so reads
/// from several threads (eager restore, the lazy page server) do not queue behind each
/// other. `Send + Sync`.
#[derive(Debug)]
pub struct Client {
    addr: String,
    pool: Mutex<Vec<Conn>>,
    /// Every connect and every answer: at most this long.
    timeout: Duration,
    /// [`Client::abandon_page_reads`] was called.
    abandoned: AtomicBool,
    /// The connections a `Pages` request is waiting on (copies, to shut them down).
    in_flight: Mutex<HashMap<u64, TcpStream>>,
    next_call: AtomicU64,
    /// TLS for every connection, when the server speaks it.
    tls: Option<ClientTls>,
}

impl Client {
    /// Connects and shakes hands (an unreachable or foreign server fails here).
    pub fn connect(addr: &str) -> Result<Client, StoreError> {
        Self::connect_timeout(addr, IO_TIMEOUT)
    }

    /// [`Client::connect`] with another timeout for every connect and answer.
    pub fn connect_timeout(addr: &str, timeout: Duration) -> Result<Client, StoreError> {
        Self::connect_tls(addr, timeout, None)
    }

    /// [`Client::connect_timeout`], over TLS when `tls` is given.
    pub fn connect_tls(
        addr: &str,
        timeout: Duration,
        tls: Option<&ClientTls>,
    ) -> Result<Client, StoreError> {
        let conn = Conn::open(addr, timeout, tls)?;
        Ok(Client {
            addr: addr.to_owned(),
            pool: Mutex::new(vec![conn]),
            timeout,
            abandoned: AtomicBool::new(false),
            in_flight: Mutex::default(),
            next_call: AtomicU64::new(0),
            tls: tls.cloned(),
        })
    }

    /// Gives up on reading pages: the reads waiting for an answer fail at once, and so
    /// does every later one, with [`StoreError::PageReadsAbandoned`] (the instance they
    /// were for is over, or its restore was interrupted). Other requests (storing a
    /// working set) go on.
    pub fn abandon_page_reads(&self) {
        self.abandoned.store(true, Ordering::SeqCst);
        for s in self.in_flight.lock().unwrap().values() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn abandoned(&self) -> StoreError {
        StoreError::PageReadsAbandoned {
            addr: self.addr.clone(),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// One request on a pooled (or new) connection. A connection that failed is dropped;
    /// one that answered (even with an error) goes back to the pool.
    pub fn call(&self, req: &Request) -> Result<Response, StoreError> {
        let pooled = self.pool.lock().unwrap().pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => Conn::open(&self.addr, self.timeout, self.tls.as_ref())?,
        };
        let resp = conn.call(&self.addr, req)?;
        self.pool.lock().unwrap().push(conn);
        Ok(resp)
    }

    /// [`Client::call`] for a `Pages` request: abandoned by [`Client::abandon_page_reads`].
    fn call_pages(&self, req: &Request) -> Result<Response, StoreError> {
        if self.abandoned.load(Ordering::SeqCst) {
            return Err(self.abandoned());
        }
        let pooled = self.pool.lock().unwrap().pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => Conn::open(&self.addr, self.timeout, self.tls.as_ref())?,
        };
        let key = self.next_call.fetch_add(1, Ordering::Relaxed);
        if let Ok(copy) = conn.stream.tcp().try_clone() {
            self.in_flight.lock().unwrap().insert(key, copy);
        }
        // Abandoned meanwhile: the copy may have missed the shutdown.
        let resp = if self.abandoned.load(Ordering::SeqCst) {
            Err(self.abandoned())
        } else {
            conn.call(&self.addr, req)
        };
        self.in_flight.lock().unwrap().remove(&key);
        if self.abandoned.load(Ordering::SeqCst) {
            // Whatever came of it, this connection was shut down: not back to the pool.
            return Err(self.abandoned());
        }
        let resp = resp?;
        self.pool.lock().unwrap().push(conn);
        Ok(resp)
    }

    /// The id of snapshot `query` (a name, an id or a unique prefix) in the server's store.
    pub fn resolve(&self, query: &str) -> Result<SnapshotId, StoreError> {
        match self.call(&Request::Resolve {
            query: query.to_owned(),
        })? {
            Response::Id(id) => Ok(id),
            other => Err(unexpected(&self.addr, "Resolve", &other)),
        }
    }

    /// Resolves `query` and fetches the snapshot's manifest and page table bytes.
    pub fn fetch_manifest(
        &self,
        query: &str,
    ) -> Result<(SnapshotId, Vec<u8>, Vec<u8>), StoreError> {
        let id = match self.call(&Request::Resolve {
            query: query.to_owned(),
        })? {
            Response::Id(id) => id,
            other => return Err(unexpected(&self.addr, "Resolve", &other)),
        };
        match self.call(&Request::Manifest { id })? {
            Response::Manifest { manifest, table } => Ok((id, manifest, table)),
            other => Err(unexpected(&self.addr, "Manifest", &other)),
        }
    }

    /// The stored blocks of records `first..first+count` (see [`Blocks`]).
    pub fn pages(&self, id: &SnapshotId, first: u64, count: u64) -> Result<Vec<u8>, StoreError> {
        match self.call_pages(&Request::Pages {
            id: *id,
            first,
            count,
        })? {
            Response::Blocks(b) => Ok(b),
            other => Err(unexpected(&self.addr, "Pages", &other)),
        }
    }

    pub fn working_set(&self, id: &SnapshotId) -> Result<Option<Vec<u64>>, StoreError> {
        match self.call(&Request::WorkingSet { id: *id })? {
            Response::WorkingSet(ws) => Ok(ws),
            other => Err(unexpected(&self.addr, "WorkingSet", &other)),
        }
    }

    /// Stores a learned working set beside the snapshot in the server's store.
    pub fn save_working_set(&self, id: &SnapshotId, pages: &[u64]) -> Result<(), StoreError> {
        match self.call(&Request::SaveWorkingSet {
            id: *id,
            pages: pages.to_vec(),
        })? {
            Response::Ready => Ok(()),
            other => Err(unexpected(&self.addr, "SaveWorkingSet", &other)),
        }
    }
}

/// Builds a snapshot in a page server's store: [`SnapshotWriter`] over the network.
/// Holds the server's writer until committed or dropped (dropping it uncommitted
/// leaves garbage there for `gc`, as locally).
#[derive(Debug)]
pub struct RemoteWriter {
    addr: String,
    conn: Conn,
}

impl RemoteWriter {
    /// Connects and takes the server store's writer.
    pub fn begin(addr: &str) -> Result<RemoteWriter, StoreError> {
        Self::begin_tls(addr, None)
    }

    /// [`RemoteWriter::begin`], over TLS when `tls` is given.
    pub fn begin_tls(addr: &str, tls: Option<&ClientTls>) -> Result<RemoteWriter, StoreError> {
        // A dump's answers (a commit) may take longer than a restore's.
        let mut conn = Conn::open(addr, WRITER_TIMEOUT, tls)?;
        match conn.call(addr, &Request::Begin)? {
            Response::Ready => Ok(RemoteWriter {
                addr: addr.to_owned(),
                conn,
            }),
            other => Err(unexpected(addr, "Begin", &other)),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// As [`SnapshotWriter::set_base`], in the server's store.
    pub fn set_base(&mut self, id: &SnapshotId) -> Result<(), StoreError> {
        match self.conn.call(&self.addr, &Request::Base { id: *id })? {
            Response::Ready => Ok(()),
            other => Err(unexpected(&self.addr, "Base", &other)),
        }
    }

    /// As [`SnapshotWriter::add_base`], on the server (one request).
    pub fn add_base(
        &mut self,
        pages: &[(u64, u64, u64)],
        runs: &mut Vec<PageRun>,
    ) -> Result<(), StoreError> {
        if pages.is_empty() {
            return Ok(());
        }
        let req = Request::AddBase {
            pages: pages.to_vec(),
        };
        match self.conn.call(&self.addr, &req)? {
            Response::Runs(new) => {
                append_runs(runs, &new);
                Ok(())
            }
            other => Err(unexpected(&self.addr, "AddBase", &other)),
        }
    }

    /// As [`SnapshotWriter::add_pages`]: the pages go compressed to the server, which
    /// stores them and answers with the runs.
    pub fn add_pages(
        &mut self,
        first_page: u64,
        data: &[u8],
        runs: &mut Vec<PageRun>,
    ) -> Result<(), StoreError> {
        if !data.len().is_multiple_of(PAGE_SIZE) {
            return Err(StoreError::UnalignedPages { len: data.len() });
        }
        // Bounded so that a frame stays far below MAX_FRAME.
        for (k, chunk) in data.chunks(64 << 20).enumerate() {
            let pages = (chunk.len() / PAGE_SIZE) as u32;
            let req = Request::AddPages {
                first_page: first_page + k as u64 * ((64 << 20) / PAGE_SIZE) as u64,
                pages,
                lz4: lz4_flex::block::compress(chunk),
            };
            match self.conn.call(&self.addr, &req)? {
                Response::Runs(new) => append_runs(runs, &new),
                other => return Err(unexpected(&self.addr, "AddPages", &other)),
            }
        }
        Ok(())
    }

    /// As [`SnapshotWriter::commit`], in the server's store.
    pub fn commit(
        mut self,
        manifest: Manifest,
        name: Option<&str>,
    ) -> Result<SnapshotId, StoreError> {
        let req = Request::Commit {
            name: name.map(str::to_owned),
            manifest: crate::format::encode(&manifest),
        };
        match self.conn.call(&self.addr, &req)? {
            Response::Id(id) => Ok(id),
            other => Err(unexpected(&self.addr, "Commit", &other)),
        }
    }
}

/// Where a dump writes memory: the local store, or a page server's.
#[allow(clippy::large_enum_variant)] // one per dump, never moved in a loop
pub enum PageWriter<'a> {
    Local(SnapshotWriter<'a>),
    Remote(RemoteWriter),
}

impl PageWriter<'_> {
    pub fn add_pages(
        &mut self,
        first_page: u64,
        data: &[u8],
        runs: &mut Vec<PageRun>,
    ) -> Result<(), StoreError> {
        match self {
            PageWriter::Local(w) => w.add_pages(first_page, data, runs),
            PageWriter::Remote(w) => w.add_pages(first_page, data, runs),
        }
    }

    /// See [`SnapshotWriter::set_base`]; with `from`, a snapshot of that store (see
    /// [`SnapshotWriter::set_base_from`]; a page server's writer takes only its own).
    pub fn set_base(
        &mut self,
        id: &SnapshotId,
        from: Option<&crate::store::Store>,
    ) -> Result<(), StoreError> {
        match (self, from) {
            (PageWriter::Local(w), None) => w.set_base(id),
            (PageWriter::Local(w), Some(from)) => w.set_base_from(from, id),
            (PageWriter::Remote(w), None) => w.set_base(id),
            (PageWriter::Remote(_), Some(from)) => Err(StoreError::BaseRecords {
                reason: format!(
                    "a page server cannot take pages from image directory {}",
                    from.dir().display()
                ),
            }),
        }
    }

    /// See [`SnapshotWriter::add_base`].
    pub fn add_base(
        &mut self,
        pages: &[(u64, u64, u64)],
        runs: &mut Vec<PageRun>,
    ) -> Result<(), StoreError> {
        match self {
            PageWriter::Local(w) => w.add_base(pages, runs),
            PageWriter::Remote(w) => w.add_base(pages, runs),
        }
    }

    pub fn commit(self, manifest: Manifest, name: Option<&str>) -> Result<SnapshotId, StoreError> {
        match self {
            PageWriter::Local(w) => w.commit(manifest, name),
            PageWriter::Remote(w) => w.commit(manifest, name),
        }
    }

    /// [`commit`](Self::commit), also returning how long the local store took to make
    /// the snapshot durable (zero for a page server, which does that on its side).
    pub fn commit_timed(
        self,
        manifest: Manifest,
        name: Option<&str>,
    ) -> Result<(SnapshotId, std::time::Duration), StoreError> {
        match self {
            PageWriter::Local(w) => w.commit_timed(manifest, name),
            PageWriter::Remote(w) => Ok((w.commit(manifest, name)?, std::time::Duration::ZERO)),
        }
    }
}

#[cfg(test)]
mod tests;
