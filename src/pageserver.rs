//! `warmstart page-server`: serves a store's snapshots over TCP (protocol and client in
//! `warmstart_snapshots::remote`), and `run --page-server`: restores from one.
//!
//! Over TLS with `--tls-cert`/`--tls-key` (and client certificates required with
//! `--tls-cacert`); see `warmstart_snapshots::remote::tls`. With `-D DIR` it serves the
//! image directory DIR instead of the store, and receives one dump into it while it holds
//! no restorable snapshot: pre-dumps first (a live migration's, each taking from the last
//! by `Base`/`AddBase` as in a store), then the final dump, once committed the only
//! snapshot left there (the pre-dumps go, their pages it took stay). With
//! `--prev-images-dir PREV` too (a server per step, CRIU's other form), PREV's packs are
//! linked into DIR before it listens, and PREV's pre-dump answers `Resolve` and `Base`.
//!
//! One thread per connection. Readers share opened snapshots; one connection at a time
//! may write (a remote `dump --page-server`); a second concurrent writer is refused.
//! Before serving a manifest the server checks that every pack it references exists, so
//! a store missing pages is an error before the instance resumes.
//!
//! `WARMSTART_PAGE_SERVER_DELAY_MS` (testing): sleep this long before every `Pages`
//! answer, to make a restore slow enough to kill its page server in the middle.

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use warmstart_snapshots::model::{PageRun, PAGE_SIZE};
use warmstart_snapshots::remote::tls::{self, ServerTls, Sock, Stream};
use warmstart_snapshots::remote::{
    self, push_block, read_frame, write_frame, Request, Response, MAX_PAGES_PER_REQUEST,
};
use warmstart_snapshots::store::{Snapshot, SnapshotId, SnapshotWriter, Store};

struct Shared {
    store: Store,
    snaps: Mutex<HashMap<SnapshotId, Arc<Snapshot>>>,
    /// The peer holding the store's writer through this server.
    writer: Mutex<Option<SocketAddr>>,
    delay: Option<Duration>,
    /// How long a new connection may take to its hello ([`HELLO_TIMEOUT`]).
    hello_timeout: Duration,
    tls: Option<ServerTls>,
    /// `-D DIR`: the store is an image directory, receiving one dump.
    images_dir: Option<PathBuf>,
    /// `--prev-images-dir`: the image directory of the migration's previous step, whose
    /// packs the store has adopted; its pre-dump may be a dump's base.
    prev: Option<Store>,
}

/// `page-server -D DIR [--prev-images-dir PREV]`: what it serves and receives into.
pub struct ImageDir<'a> {
    pub dir: &'a Path,
    /// The previous step's image directory, whose packs DIR's store has adopted
    /// ([`Store::adopt_packs`]).
    pub prev: Option<&'a Store>,
}

/// Serves `store` on `bind` until killed. Prints the bound address (useful with port 0)
/// as one line on stdout once listening (labelled when stdout is a terminal; the label
/// goes to stderr otherwise).
pub fn serve(
    store: &Store,
    bind: SocketAddr,
    tls: Option<ServerTls>,
    images_dir: Option<ImageDir<'_>>,
) -> Result<()> {
    let listener = TcpListener::bind(bind).with_context(|| format!("listening on {bind}"))?;
    let local = listener.local_addr().context("local address")?;
    let authenticated = tls.as_ref().is_some_and(|t| t.requires_client_certs());
    if !local.ip().is_loopback() && !authenticated {
        // Before the address line, so that whoever reads that has seen this too.
        eprintln!("{}", exposure_warning(local, store, tls.is_some()));
    }
    {
        use std::io::IsTerminal;
        let what = match &images_dir {
            Some(ImageDir {
                dir,
                prev: Some(prev),
            }) => format!(
                "the image directory {} (taking pages from {})",
                dir.display(),
                prev.dir().display()
            ),
            Some(d) => format!("the image directory {}", d.dir.display()),
            None => format!("the snapshots of store {}", store.dir().display()),
        };
        let security = match &tls {
            None => "",
            Some(t) if t.requires_client_certs() => " over TLS, client certificates required",
            Some(_) => " over TLS",
        };
        let label =
            format!("warmstart page-server: listening on {local}{security}, serving {what}");
        let mut out = std::io::stdout().lock();
        // A script reads the bare address from stdout (it matters with --port 0); a
        // person sees what it is.
        if out.is_terminal() {
            writeln!(out, "{label}")
        } else {
            eprintln!("{label}");
            writeln!(out, "{local}")
        }
        .and_then(|()| out.flush())
        .context("printing the bound address")?;
    }
    serve_on(store, listener, tls, images_dir)
}

/// What a page server reachable from other hosts without client certificates says when
/// it starts.
fn exposure_warning(local: SocketAddr, store: &Store, tls: bool) -> String {
    let how = if tls {
        "over TLS but without client certificates"
    } else {
        "with no authentication and no encryption"
    };
    format!(
        "warmstart page-server: WARNING: listening on {local} {how}: anyone who can reach \
         this address can read the memory of every snapshot in {} (and store new ones). \
         Use it on a trusted network only, keep the default --bind 127.0.0.1 (e.g. behind \
         an SSH tunnel), or use TLS with client certificates (--tls-cert, --tls-key and \
         --tls-cacert).",
        store.dir().display()
    )
}

/// [`serve`] on a listener already bound.
pub fn serve_on(
    store: &Store,
    listener: TcpListener,
    tls: Option<ServerTls>,
    images_dir: Option<ImageDir<'_>>,
) -> Result<()> {
    let local = listener.local_addr().context("local address")?;
    tracing::info!(
        "page server for store {} listening on {local} ({})",
        store.dir().display(),
        match &tls {
            None => "unauthenticated: trusted networks only",
            Some(t) if t.requires_client_certs() => "TLS, client certificates required",
            Some(_) => "TLS, no client certificates",
        }
    );
    let delay = std::env::var("WARMSTART_PAGE_SERVER_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis);
    // For tests: a shorter wait for a client's hello.
    let hello_timeout = std::env::var("WARMSTART_PAGE_SERVER_HELLO_TIMEOUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(HELLO_TIMEOUT, Duration::from_millis);
    let shared = Arc::new(Shared {
        store: store.clone(),
        snaps: Mutex::new(HashMap::new()),
        writer: Mutex::new(None),
        delay,
        hello_timeout,
        tls,
        images_dir: images_dir.as_ref().map(|d| d.dir.to_path_buf()),
        prev: images_dir.and_then(|d| d.prev.cloned()),
    });
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("accepting a connection: {e}");
                continue;
            }
        };
        let peer = match stream.peer_addr() {
            Ok(p) => p,
            Err(_) => continue,
        };
        let shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("conn-{peer}"))
            .spawn(move || {
                tracing::info!("{peer}: connected");
                match handle(&shared, stream, peer) {
                    Ok(()) => tracing::info!("{peer}: disconnected"),
                    Err(e) => tracing::warn!("{peer}: connection ended: {e:#}"),
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("{peer}: cannot start a thread for it: {e}");
        }
    }
    Ok(())
}

/// Releases the server's writer slot when the writing connection ends.
struct WriterSlot<'a>(&'a Mutex<Option<SocketAddr>>);

impl Drop for WriterSlot<'_> {
    fn drop(&mut self) {
        *self.0.lock().unwrap() = None;
    }
}

fn send(out: &mut Stream, resp: &Response) -> Result<()> {
    write_frame(out, &resp.encode()).context("sending an answer")
}

/// The connection as this server speaks it: TLS or plain, as configured. A client
/// speaking the other is told so and the connection ends (`None`).
fn accept(shared: &Shared, tcp: TcpStream) -> Result<Option<Stream>> {
    let mut first = [0u8; 1];
    if tcp.peek(&mut first).context("reading the first bytes")? == 0 {
        return Ok(None);
    }
    let tls_hello = first[0] == tls::HANDSHAKE_RECORD;
    let mut tcp = Sock(tcp);
    match &shared.tls {
        Some(t) if tls_hello => Ok(Some(t.wrap(tcp.0).map_err(anyhow::Error::msg)?)),
        Some(_) => {
            // A plain client: one plain Error frame it understands.
            let _ = write_frame(&mut tcp, &Response::Error(tls::TLS_ONLY.into()).encode());
            anyhow::bail!("a client without TLS (this server speaks TLS only): refused");
        }
        None if tls_hello => {
            // A TLS client: an alert its TLS stack understands.
            let _ = tcp.write_all(&tls::PLAIN_SERVER_ALERT);
            anyhow::bail!("a TLS client (this server speaks plain TCP; --tls-cert/--tls-key give it TLS): refused");
        }
        None => Ok(Some(Stream::Plain(tcp))),
    }
}

/// A client has this long from connecting to its hello (a TLS handshake included): one
/// that says nothing is dropped, not left holding a thread for good. A session idles as
/// long as it likes after that (a lazy restore asks only at its faults).
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

fn handle(shared: &Shared, stream: TcpStream, peer: SocketAddr) -> Result<()> {
    let _ = stream.set_nodelay(true);
    // The socket's options, shared with the stream the session reads.
    let ctl = stream
        .try_clone()
        .context("cloning the connection's socket")?;
    ctl.set_read_timeout(Some(shared.hello_timeout))
        .context("setting the hello timeout")?;
    let Some(stream) = accept(shared, stream)? else {
        return Ok(());
    };
    // Reads are buffered; answers are written whole (one frame each) to the same stream.
    let mut input = BufReader::with_capacity(1 << 20, stream);
    // Handshake.
    let Some(body) = read_frame(&mut input).context("reading the hello")? else {
        return Ok(());
    };
    match Request::decode(&body) {
        Ok(Request::Hello { magic, version })
            if magic == remote::MAGIC && version == remote::VERSION =>
        {
            ctl.set_read_timeout(None)
                .context("clearing the hello timeout")?;
            send(
                input.get_mut(),
                &Response::Hello {
                    magic: remote::MAGIC,
                    version: remote::VERSION,
                },
            )?;
        }
        Ok(Request::Hello { magic, version }) if magic == remote::MAGIC => {
            send(
                input.get_mut(),
                &Response::Error(format!(
                    "unsupported page-server protocol version {version}: this server speaks {}",
                    remote::VERSION
                )),
            )?;
            anyhow::bail!("client speaks protocol version {version}");
        }
        _ => {
            let _ = send(
                input.get_mut(),
                &Response::Error("not a warmstart page-server client".into()),
            );
            anyhow::bail!("not a warmstart page-server client");
        }
    }
    let mut writer: Option<(SnapshotWriter<'_>, WriterSlot<'_>)> = None;
    let mut scratch = Vec::new();
    while let Some(body) = read_frame(&mut input).context("reading a request")? {
        let req = match Request::decode(&body) {
            Ok(r) => r,
            Err(e) => {
                let _ = send(
                    input.get_mut(),
                    &Response::Error(format!("bad request: {e}")),
                );
                anyhow::bail!("bad request: {e}");
            }
        };
        let mut committed = None;
        let resp = answer(shared, peer, req, &mut writer, &mut scratch, &mut committed)
            .unwrap_or_else(|e| Response::Error(crate::report::error_line(&e)));
        if let Response::Error(msg) = &resp {
            tracing::warn!("{peer}: {msg}");
        }
        send(input.get_mut(), &resp)?;
        // After the answer: the dumping client (whose app may still be frozen) need not
        // wait for it.
        if let (Some(id), Some(dir)) = (committed, &shared.images_dir) {
            drop_pre_dumps(shared, dir, &id);
        }
    }
    Ok(())
}

/// The snapshots of image directory `store`: the restorable ones (at most one) and the
/// pre-dumps (any number, the steps of a live migration towards it).
fn image_dir_contents(store: &Store) -> Result<(Vec<SnapshotId>, Vec<SnapshotId>)> {
    let (mut restorable, mut pre) = (Vec::new(), Vec::new());
    for id in store.ids()? {
        let m = store
            .manifest(&id)
            .with_context(|| format!("reading snapshot {} of the image directory", id.short()))?;
        if m.trigger == crate::dump::predump::TRIGGER {
            pre.push(id);
        } else {
            restorable.push(id);
        }
    }
    Ok((restorable, pre))
}

/// An image directory holds one restorable snapshot: a second dump into it is refused
/// (pre-dumps before it are welcome).
fn refuse_into_full_dir(store: &Store, dir: &Path) -> Result<()> {
    if let Some(id) = image_dir_contents(store)?.0.first() {
        anyhow::bail!(
            "image directory {} already holds snapshot {}: a page server with -D receives \
             one dump (after any pre-dumps); restart it on an empty directory",
            dir.display(),
            id.short()
        );
    }
    Ok(())
}

/// Once image directory `dir` holds its restorable snapshot `id`: the pre-dumps that led
/// to it are removed (their pages it took stay in its packs, the others go), so that DIR
/// holds that one snapshot. A failure here is only a warning: the dump is committed and
/// whole, and `restore -D` takes the one restorable snapshot of a directory anyway.
fn drop_pre_dumps(shared: &Shared, dir: &Path, id: &SnapshotId) {
    let cleaned = (|| -> Result<Option<(usize, usize)>> {
        let (_, pre) = image_dir_contents(&shared.store)?;
        for p in &pre {
            shared.snaps.lock().unwrap().remove(p);
            shared.store.remove(&p.to_hex())?;
        }
        // (Pages of the previous step's packs that it did not take go too.)
        if pre.is_empty() && shared.prev.is_none() {
            return Ok(None);
        }
        let gc = shared.store.gc()?;
        Ok(Some((pre.len(), gc.removed_packs.len())))
    })();
    match cleaned {
        Ok(None) => {}
        Ok(Some((n, packs))) => tracing::info!(
            "image directory {}: snapshot {} alone there now (removed the {n} pre-dump(s) \
             before it and {packs} pack(s) it does not use)",
            dir.display(),
            id.short()
        ),
        Err(e) => tracing::warn!(
            "image directory {}: the pre-dumps before snapshot {} could not be removed \
             ({e:#}); `restore -D` takes that snapshot all the same, and they can be \
             removed with `WARMSTART_STORE={} warmstart rm ID` then `gc`",
            dir.display(),
            id.short(),
            dir.display()
        ),
    }
}

fn snapshot(shared: &Shared, id: &SnapshotId) -> Result<Arc<Snapshot>> {
    if let Some(s) = shared.snaps.lock().unwrap().get(id) {
        return Ok(s.clone());
    }
    let snap = Arc::new(shared.store.load(id)?);
    snap.check_packs()?;
    shared.snaps.lock().unwrap().insert(*id, snap.clone());
    Ok(snap)
}

fn answer<'s>(
    shared: &'s Shared,
    peer: SocketAddr,
    req: Request,
    writer: &mut Option<(SnapshotWriter<'s>, WriterSlot<'s>)>,
    scratch: &mut Vec<u8>,
    committed: &mut Option<SnapshotId>,
) -> Result<Response> {
    Ok(match req {
        Request::Hello { .. } => Response::Error("hello was already done".into()),
        Request::Resolve { query } => {
            Response::Id(match (shared.store.resolve(&query), &shared.prev) {
                (Ok(id), _) => id,
                // The previous step's pre-dump, for a dump's `--prev`.
                (Err(e), Some(prev)) => prev.resolve(&query).map_err(|_| e)?,
                (Err(e), None) => return Err(e.into()),
            })
        }
        Request::Manifest { id } => {
            let snap = snapshot(shared, &id)?;
            tracing::info!("{peer}: serving snapshot {}", id.short());
            Response::Manifest {
                manifest: warmstart_snapshots::format::encode(&snap.manifest),
                table: snap.table_bytes().to_vec(),
            }
        }
        Request::Pages { id, first, count } => {
            if count > MAX_PAGES_PER_REQUEST {
                anyhow::bail!("asked for {count} pages at once; at most {MAX_PAGES_PER_REQUEST}");
            }
            let snap = snapshot(shared, &id)?;
            if let Some(d) = shared.delay {
                std::thread::sleep(d);
            }
            let mut blocks = Vec::with_capacity(count as usize * PAGE_SIZE / 2);
            snap.stored_blocks(first, count, |b| push_block(&mut blocks, b))?;
            Response::Blocks(blocks)
        }
        Request::WorkingSet { id } => Response::WorkingSet(shared.store.working_set(&id)),
        Request::SaveWorkingSet { id, pages } => {
            let snap = snapshot(shared, &id)?;
            // Entries are page-table indexes, each at most once.
            let n = snap.page_count();
            if pages.len() as u64 > n || pages.iter().any(|&p| p >= n) {
                anyhow::bail!(
                    "a working set for snapshot {} that does not fit it ({} entries, {n} pages)",
                    id.short(),
                    pages.len()
                );
            }
            shared.store.save_working_set(&id, &pages)?;
            tracing::info!(
                "{peer}: stored a working set of {} pages for {}",
                pages.len(),
                id.short()
            );
            Response::Ready
        }
        Request::Begin => {
            if writer.is_some() {
                anyhow::bail!("this connection already holds the store's writer");
            }
            if let Some(dir) = &shared.images_dir {
                refuse_into_full_dir(&shared.store, dir)?;
            }
            {
                let mut w = shared.writer.lock().unwrap();
                if let Some(other) = *w {
                    anyhow::bail!(
                        "the page server is already receiving a dump from {other}; \
                         try again when it is done"
                    );
                }
                *w = Some(peer);
            }
            let slot = WriterSlot(&shared.writer);
            let w = shared.store.writer()?;
            tracing::info!("{peer}: receiving a dump");
            *writer = Some((w, slot));
            Response::Ready
        }
        Request::AddPages {
            first_page,
            pages,
            lz4,
        } => {
            let Some((w, _)) = writer.as_mut() else {
                anyhow::bail!("AddPages before Begin");
            };
            let len = pages as usize * PAGE_SIZE;
            if len > remote::MAX_FRAME {
                anyhow::bail!("{pages} pages in one AddPages is too many");
            }
            scratch.resize(len, 0);
            match remote::lz4_decompress_into(&lz4, scratch) {
                Ok(n) if n == len => {}
                Ok(n) => anyhow::bail!("AddPages data decompresses to {n} bytes, expected {len}"),
                Err(e) => anyhow::bail!("AddPages data does not decompress: {e}"),
            }
            let mut runs: Vec<PageRun> = Vec::new();
            w.add_pages(first_page, scratch, &mut runs)?;
            Response::Runs(runs)
        }
        Request::Base { id } => {
            let Some((w, _)) = writer.as_mut() else {
                anyhow::bail!("Base before Begin");
            };
            // Not fatal to the dump: it sends those pages instead.
            let set = match (w.set_base(&id), &shared.prev) {
                // Not in the image directory: the previous step's, if it is there.
                (Err(_), Some(prev)) if !shared.store.ids()?.contains(&id) => {
                    w.set_base_from(prev, &id)
                }
                (r, _) => r,
            };
            match set {
                Ok(()) => Response::Ready,
                Err(e) => Response::Error(e.to_string()),
            }
        }
        Request::AddBase { pages } => {
            let Some((w, _)) = writer.as_mut() else {
                anyhow::bail!("AddBase before Begin");
            };
            let mut runs: Vec<PageRun> = Vec::new();
            w.add_base(&pages, &mut runs)?;
            Response::Runs(runs)
        }
        Request::Commit { name, manifest } => {
            let Some((w, _slot)) = writer.take() else {
                anyhow::bail!("Commit before Begin");
            };
            let manifest: warmstart_snapshots::model::Manifest =
                warmstart_snapshots::format::decode(&manifest)
                    .context("the manifest to commit is damaged")?;
            let restorable = manifest.trigger != crate::dump::predump::TRIGGER;
            // (An image directory was checked at `Begin`, and the writer holds the store's
            // lock since: nothing was committed there meanwhile.)
            let id = w.commit(manifest, name.as_deref())?;
            tracing::info!(
                "{peer}: committed {} {}{}",
                if restorable { "snapshot" } else { "pre-dump" },
                id.short(),
                name.map(|n| format!(" as {n}")).unwrap_or_default()
            );
            if restorable {
                *committed = Some(id);
            }
            Response::Id(id)
        }
    })
}

#[cfg(test)]
mod tests;
