//! Write tracking between dumps: `dump --pre-dump` and `dump --prev SNAPSHOT`.
//!
//! A pre-dump makes, inside each process of the tree, a userfaultfd in `WP_ASYNC` mode
//! (the descriptor is taken out with `pidfd_getfd` and closed in the process again: the
//! app's fd table is unchanged), registers the process's private anonymous VMAs with it
//! for write-protect and write-protects their populated pages, all while the tree is
//! frozen. From then on the kernel clears a page's write-protect bit when it is written,
//! without stopping the app. The next pre-dump or the final dump asks `PAGEMAP_SCAN` which
//! pages are still protected ("not written") and takes those from the previous image
//! instead of reading and hashing them while the app is frozen.
//!
//! **Why a page taken from the previous image is right.** A page is taken only when all
//! of these hold, each checked by the kernel at the time of the dump:
//! * its VMA shows `uw` (registered for write-protect) and registering it again with
//!   *our* descriptor succeeds (another userfaultfd would make that `EBUSY`); only our
//!   pre-dumps register anything with our descriptor, and each write-protects every
//!   populated page of every VMA it registers. A VMA created, moved (`mremap` drops the
//!   registration: we never ask for `EVENT_REMAP`) or mapped over since is not registered
//!   with us, so it is read whole;
//! * `PAGEMAP_SCAN` with `PM_SCAN_CHECK_WPASYNC` reports the page populated (present or
//!   swapped) and *not written*: its write-protect bit, set by our last pre-dump, is still
//!   there, so nothing wrote it since (a write, from the app or the kernel on its behalf,
//!   clears the bit before the data changes; `MADV_DONTNEED` drops the page and a new one
//!   comes without the bit);
//! * the previous image, the one the holder says was made by the pre-dump that last
//!   write-protected this process, has a content for that address: it was read after the
//!   write-protect, so it is the page's content since then (a page written after the
//!   protect and before the read is reported written now and read again).
//!
//! Anything else is read. Not tracked: memory written by DMA into pages pinned before
//! the pre-dump (`O_DIRECT`, RDMA, io_uring fixed buffers), which bypasses page tables.
//!
//! **The holder.** The userfaultfds must stay open between two dumps (closing the last
//! descriptor ends the tracking). After a pre-dump a small process of ours (`warmstart
//! __track-holder`, in a process group of its own) holds them with the image's page list,
//! listening on `$XDG_RUNTIME_DIR/warmstart/track/PID-START.sock` (else `/run/warmstart/
//! track`). The next dump connects, receives everything and acknowledges *before* it
//! changes any write-protect bit; the holder then exits. The holder also exits when the
//! tree's root process exits, when its socket is removed or replaced, or after
//! [`HOLD_LIMIT`] (an abandoned migration), so it never outlives its use.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use warmstart_snapshots::model::{append_runs, PageRun, RunContent, PAGE_SIZE};
use warmstart_snapshots::PageWriter;

use crate::sys::maps::MapEntry;
use crate::sys::pagemap_scan::{self as pms, Query};
use crate::sys::uffd::{Features, Range, RegisterMode, Uffd};

/// How long a holder keeps the tracking of a tree nobody dumps again.
pub const HOLD_LIMIT: Duration = Duration::from_secs(3600);

/// The content a page had in the previous image.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    Zero,
    /// The previous image's page-table record (the next dump copies the record: the
    /// page is neither read nor hashed again, nor named by its hash).
    Record(u64),
}

/// What the previous image holds of one process.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct ProcState {
    pub pid: i32,
    pub start_time: u64,
    /// Page address → content, of the VMAs tracked, in address order.
    pub slots: Vec<(u64, Slot)>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct State {
    /// The snapshot (pre-dump) whose write-protect the bits now show.
    pub snapshot: [u8; 32],
    pub root: i32,
    pub root_start: u64,
    /// One per userfaultfd held, in the same order.
    pub procs: Vec<ProcState>,
}

/// A tree's write tracking: the state and a userfaultfd per process of `state.procs`.
pub struct Tracking {
    pub state: State,
    pub uffds: Vec<OwnedFd>,
}

impl Tracking {
    /// The userfaultfd and previous slots of process `pid` (if it is the same process).
    pub fn proc(&self, pid: i32) -> Option<(&OwnedFd, &ProcState)> {
        let st = start_time(pid).ok()?;
        let i = (self.state.procs.iter()).position(|p| p.pid == pid && p.start_time == st)?;
        Some((&self.uffds[i], &self.state.procs[i]))
    }
}

/// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks since boot.
pub fn start_time(pid: i32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let after = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    after
        .split_whitespace()
        .nth(19)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("parsing /proc/{pid}/stat"))
}

fn track_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("warmstart/track"),
        _ => PathBuf::from("/run/warmstart/track"),
    }
}

fn socket_path(root: i32, start: u64) -> PathBuf {
    track_dir().join(format!("{root}-{start}.sock"))
}

/// Whether `m` is private anonymous memory (what write tracking covers).
pub fn trackable(m: &MapEntry) -> bool {
    !m.shared
        && m.inode == 0
        && !m.has_flag("io")
        && !m.has_flag("pf")
        && (m.name.is_empty()
            || m.name == "[heap]"
            || m.name == "[stack]"
            || m.name.starts_with("[anon:"))
}

/// Enables `WP_ASYNC` on a fresh userfaultfd.
pub fn init_uffd(fd: &OwnedFd) -> Result<()> {
    let u = Uffd::from_owned(fd.try_clone()?);
    u.api(Features::WP_ASYNC)
        .context("enabling userfaultfd WP_ASYNC write tracking")?;
    Ok(())
}

/// Registers `m` for write-protect with `uffd`; false when it cannot be (another
/// userfaultfd holds it, the process has exec'd, ...): then it is not tracked.
pub fn register(uffd: &OwnedFd, m: &MapEntry) -> bool {
    let Ok(fd) = uffd.try_clone() else {
        return false;
    };
    let u = Uffd::from_owned(fd);
    u.register(
        Range::new(m.start as usize, (m.end - m.start) as usize),
        RegisterMode::WP,
    )
    .is_ok()
}

/// Populated pages of `[start, end)` that are not written since the last write-protect,
/// as sorted `[start, end)` address ranges; with `protect`, the written ones are
/// write-protected again (atomically with the scan).
pub fn unwritten(
    pagemap: &std::fs::File,
    start: u64,
    end: u64,
    protect: bool,
) -> Result<Vec<(u64, u64)>> {
    let q = Query {
        flags: pms::PM_SCAN_CHECK_WPASYNC | if protect { pms::PM_SCAN_WP_MATCHING } else { 0 },
        mask: 0,
        anyof: pms::PAGE_IS_PRESENT | pms::PAGE_IS_SWAPPED,
        ret: pms::PAGE_IS_WRITTEN,
    };
    let regions = pms::scan(pagemap.as_fd(), start, end, q)
        .with_context(|| format!("PAGEMAP_SCAN of {start:x}-{end:x}"))?;
    Ok(regions
        .iter()
        .filter(|r| r.categories & pms::PAGE_IS_WRITTEN == 0)
        .map(|r| (r.start, r.end))
        .collect())
}

/// Pages read and pages taken from the previous image.
#[derive(Default, Clone, Copy, Debug)]
pub struct Counts {
    pub read: u64,
    pub taken: u64,
}

/// Writes the wanted pages `runs` (page index from `vma_start`, count, exclusive) of one
/// VMA: those in `unwritten` with a slot in `prev` are taken from it (the writer's base,
/// [`PageWriter::set_base`], must be the previous image), the others read from
/// `target`. Fills `new_slots` (when given) with the content now recorded per page.
#[allow(clippy::too_many_arguments)]
pub fn write_pages(
    target: &super::memory::Target,
    vma_start: u64,
    runs: &[(u64, u64, bool)],
    unwritten: &[(u64, u64)],
    prev: &[(u64, Slot)],
    writer: &mut PageWriter<'_>,
    out: &mut Vec<PageRun>,
    new_slots: Option<&mut Vec<(u64, Slot)>>,
    tolerate_unmapped: bool,
    counts: &mut Counts,
) -> Result<()> {
    let ps = PAGE_SIZE as u64;
    let out_start = out.len();
    let mut buf: Vec<u8> = Vec::new();
    let is_unwritten = |addr: u64| {
        let i = unwritten.partition_point(|r| r.1 <= addr);
        i < unwritten.len() && unwritten[i].0 <= addr
    };
    // A run of pages to read: (first page index, count, exclusive).
    let mut pending: Option<(u64, u64, bool)> = None;
    // Runs of pages to take from the previous image: (first page index, its first
    // record, count), sent in one request at the end.
    let mut taken: Vec<(u64, u64, u64)> = Vec::new();
    let mut flush = |pending: &mut Option<(u64, u64, bool)>,
                     writer: &mut PageWriter<'_>,
                     out: &mut Vec<PageRun>,
                     counts: &mut Counts|
     -> Result<()> {
        let Some((first, count, excl)) = pending.take() else {
            return Ok(());
        };
        let mut done = 0;
        while done < count {
            let n = (count - done).min(2048);
            let addr = vma_start + (first + done) * ps;
            buf.resize((n * ps) as usize, 0);
            match target.read(addr, &mut buf, excl) {
                Ok(()) => writer.add_pages(first + done, &buf, out)?,
                Err(_) if tolerate_unmapped => {
                    // The app (running during a pre-dump) unmapped some of it: keep
                    // what is still there, page by page; a page gone has no content to
                    // remember (a new mapping there is never taken from this image).
                    for k in 0..n {
                        let a = addr + k * ps;
                        let page = &mut buf[(k * ps) as usize..((k + 1) * ps) as usize];
                        if target.read(a, page, excl).is_ok() {
                            let page = page.to_vec();
                            writer.add_pages(first + done + k, &page, out)?;
                        }
                    }
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("reading memory at {addr:x} ({n} pages)"))
                }
            }
            counts.read += n;
            done += n;
        }
        Ok(())
    };
    let mut cursor = prev.partition_point(|s| s.0 < vma_start);
    for &(first, count, excl) in runs {
        for idx in first..first + count {
            let addr = vma_start + idx * ps;
            let slot = if is_unwritten(addr) {
                // `prev` is in address order (see `ProcState::slots`), and so are the
                // pages asked: a cursor walks it (a search only when it goes back).
                if cursor > 0 && prev[cursor - 1].0 >= addr {
                    cursor = prev.partition_point(|s| s.0 < addr);
                }
                while cursor < prev.len() && prev[cursor].0 < addr {
                    cursor += 1;
                }
                prev.get(cursor).filter(|s| s.0 == addr).map(|s| s.1)
            } else {
                None
            };
            match slot {
                Some(Slot::Zero) => {
                    flush(&mut pending, writer, out, counts)?;
                    push_zero(out, idx);
                    counts.taken += 1;
                }
                Some(Slot::Record(r)) => {
                    flush(&mut pending, writer, out, counts)?;
                    match taken.last_mut() {
                        Some((p, f, c)) if *p + *c == idx && *f + *c == r => *c += 1,
                        _ => taken.push((idx, r, 1)),
                    }
                    counts.taken += 1;
                }
                None => match &mut pending {
                    Some(p) if p.0 + p.1 == idx && p.2 == excl => p.1 += 1,
                    _ => {
                        flush(&mut pending, writer, out, counts)?;
                        pending = Some((idx, 1, excl));
                    }
                },
            }
        }
    }
    flush(&mut pending, writer, out, counts)?;
    if !taken.is_empty() {
        let mut runs = Vec::new();
        writer.add_base(&taken, &mut runs)?;
        let mut mine = out.split_off(out_start);
        mine.extend(runs);
        mine.sort_unstable_by_key(|r| r.page);
        append_runs(out, &mine);
    }
    if let Some(slots) = new_slots {
        for r in &out[out_start..] {
            for k in 0..r.count {
                let slot = match r.content {
                    RunContent::Zero => Slot::Zero,
                    RunContent::Data { first } => Slot::Record(first + k),
                };
                slots.push((vma_start + (r.page + k) * ps, slot));
            }
        }
    }
    Ok(())
}

fn push_zero(out: &mut Vec<PageRun>, idx: u64) {
    match out.last_mut() {
        Some(l) if l.content == RunContent::Zero && l.page + l.count == idx => l.count += 1,
        _ => out.push(PageRun {
            page: idx,
            count: 1,
            content: RunContent::Zero,
        }),
    }
}

/// Receives a tracking (header with the uffds, then the state) on `sock`.
fn recv_tracking(sock: &UnixStream) -> Result<Tracking> {
    let mut head = [0u8; 12];
    let (n, uffds) = crate::sys::scm::recv(sock.as_fd(), &mut head)?;
    if n == 0 {
        bail!("the tracking holder closed the connection");
    }
    let mut s = sock;
    s.read_exact(&mut head[n..])?;
    let len = u64::from_le_bytes(head[..8].try_into().unwrap());
    let count = u32::from_le_bytes(head[8..].try_into().unwrap()) as usize;
    if len > 1 << 32 || count != uffds.len() {
        bail!(
            "malformed tracking message ({count} descriptors announced, {} received)",
            uffds.len()
        );
    }
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body)?;
    let state: State = postcard::from_bytes(&body).context("decoding the tracking state")?;
    if state.procs.len() != uffds.len() {
        bail!("malformed tracking state");
    }
    Ok(Tracking { state, uffds })
}

fn send_tracking(sock: &UnixStream, t: &Tracking) -> Result<()> {
    let body = postcard::to_allocvec(&t.state)?;
    let mut head = Vec::with_capacity(12);
    head.extend_from_slice(&(body.len() as u64).to_le_bytes());
    head.extend_from_slice(&(t.uffds.len() as u32).to_le_bytes());
    let fds: Vec<RawFd> = t.uffds.iter().map(|f| f.as_raw_fd()).collect();
    if fds.len() > crate::sys::scm::MAX_FDS {
        bail!("too many processes to track ({})", fds.len());
    }
    crate::sys::scm::send(sock.as_fd(), &head, &fds)?;
    let mut s = sock;
    s.write_all(&body)?;
    Ok(())
}

/// Takes over the write tracking of the tree rooted at `root` from its holder, if there
/// is one: the holder exits, the tracking is ours (and ends when dropped).
pub fn take_over(root: i32) -> Result<Option<Tracking>> {
    let start = start_time(root)?;
    let path = socket_path(root, start);
    let conn = match UnixStream::connect(&path) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            // A holder that died: its tracking is gone with it.
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        Err(e) => {
            return Err(e).with_context(|| {
                format!("connecting to the write tracking holder {}", path.display())
            })
        }
    };
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    conn.set_write_timeout(Some(Duration::from_secs(30)))?;
    let t = recv_tracking(&conn)
        .with_context(|| format!("receiving the write tracking from {}", path.display()))?;
    // Acknowledged before anything changes a write-protect bit: from here only we hold
    // the descriptors (the holder exits), so no stale page list survives a change.
    (&conn).write_all(&[1])?;
    if t.state.root != root || t.state.root_start != start {
        return Ok(None);
    }
    Ok(Some(t))
}

/// Starts a holder for `t` (after a pre-dump).
pub fn spawn_holder(t: &Tracking) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    use std::os::unix::process::CommandExt;
    let dir = track_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let path = socket_path(t.state.root, t.state.root_start);
    let tmp = dir.join(format!(".{}-{}.tmp", t.state.root, std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener =
        UnixListener::bind(&tmp).with_context(|| format!("binding {}", tmp.display()))?;
    let (ours, theirs) = crate::sys::scm::unix_pair(libc::SOCK_STREAM)?;
    let child = std::process::Command::new(
        std::env::current_exe().context("finding warmstart's own executable")?,
    )
    .arg("__track-holder")
    .arg(&path)
    .stdin(OwnedFd::from(listener))
    .stdout(theirs)
    .stderr(std::process::Stdio::null())
    .process_group(0)
    .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).context("starting the write tracking holder");
        }
    };
    // SAFETY: `ours` is a socket we own; it becomes the stream's, wrapped exactly once.
    let ours = unsafe { UnixStream::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(ours)) };
    let renamed =
        std::fs::rename(&tmp, &path).with_context(|| format!("naming {}", path.display()));
    // The holder answers once it holds the tracking: a pre-dump that returns has a
    // running holder (or fails), never one still starting.
    let sent = renamed
        .and_then(|()| send_tracking(&ours, t))
        .and_then(|()| {
            ours.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut ack = [0u8; 1];
            (&ours)
                .read_exact(&mut ack)
                .map_err(anyhow::Error::from)
                .and_then(|()| {
                    if ack[0] == 1 {
                        Ok(())
                    } else {
                        bail!("the process tree exited during the pre-dump")
                    }
                })
                .context("the write tracking holder did not start")
        });
    if let Err(e) = sent {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&path);
        // SAFETY: kill takes integer arguments only.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        return Err(e);
    }
    // Reaped by whoever adopts it (it outlives us by design).
    std::mem::forget(child);
    Ok(())
}

/// `warmstart __track-holder PATH`: fd 0 is the listening socket (renamed to PATH by
/// our parent), fd 1 the stream the tracking arrives on.
pub fn holder_main(path: &std::path::Path) -> Result<i32> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: our parent (spawn_holder) made fd 0 the listening socket and fd 1 a
    // stream socket; nothing else in this process owns them, each is wrapped once.
    let (listener, chan) = unsafe { (UnixListener::from_raw_fd(0), UnixStream::from_raw_fd(1)) };
    chan.set_read_timeout(Some(Duration::from_secs(30)))?;
    let t = recv_tracking(&chan)?;
    // Renamed to `path` before the tracking was sent: this inode is ours.
    let ino = std::fs::metadata(path)?.ino();
    // Gone already (killed while we started): nothing to keep, and the socket goes.
    let root = match crate::sys::pidfd::pidfd_open(t.state.root, 0) {
        Ok(fd) if start_time(t.state.root).ok() == Some(t.state.root_start) => fd,
        _ => {
            if std::fs::metadata(path).map(|m| m.ino()).ok() == Some(ino) {
                let _ = std::fs::remove_file(path);
            }
            let _ = (&chan).write_all(&[0]);
            return Ok(0);
        }
    };
    // Holding: the pre-dump that started us may return.
    (&chan).write_all(&[1])?;
    drop(chan);
    let started = Instant::now();
    loop {
        if started.elapsed() > HOLD_LIMIT {
            break;
        }
        match std::fs::metadata(path) {
            Ok(m) if m.ino() == ino => {}
            _ => return Ok(0), // removed or replaced: not ours to clean up
        }
        let mut p = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: root.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `p` is a live array of two initialised pollfds; the kernel writes only
        // their `revents`.
        let n = unsafe { libc::poll(p.as_mut_ptr(), 2, 1000) };
        if n < 0 {
            continue; // EINTR
        }
        if p[1].revents != 0 {
            break; // the tree's root exited
        }
        if p[0].revents != 0 {
            let Ok((conn, _)) = listener.accept() else {
                continue;
            };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
            let _ = conn.set_write_timeout(Some(Duration::from_secs(30)));
            if send_tracking(&conn, &t).is_ok() {
                let mut ack = [0u8; 1];
                if (&conn).read_exact(&mut ack).is_ok() {
                    break; // handed over
                }
            }
        }
    }
    if std::fs::metadata(path).map(|m| m.ino()).ok() == Some(ino) {
        let _ = std::fs::remove_file(path);
    }
    Ok(0)
}
