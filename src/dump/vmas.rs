//! VMAs: how each mapping is restored, and its memory written into the page store.

use anyhow::{bail, Context, Result};
use warmstart_snapshots::model::{
    Vma, VmaFlags, VmaKind, PAGE_SIZE, PROT_EXEC, PROT_READ, PROT_WRITE,
};
use warmstart_snapshots::PageWriter;

use super::files::identity;
use super::memory::Target;
use super::shared_files::SharedFiles;
use crate::sys::maps::MapEntry;

/// Largest piece of a run read from the target at once.
const CHUNK: u64 = 8 << 20;

fn kind_of(
    pid: i32,
    comm: &str,
    m: &MapEntry,
    objects: &mut SharedFiles,
    writer: &mut PageWriter<'_>,
) -> Result<VmaKind> {
    let refuse = |what: &str| -> anyhow::Error {
        anyhow::anyhow!(
            "process {pid} ({comm}): mapping {:x}-{:x} {} is {what}, which warmstart cannot checkpoint yet",
            m.start,
            m.end,
            if m.name.is_empty() { "(anonymous)" } else { &m.name }
        )
    };
    Ok(match m.name.as_str() {
        "[vdso]" => VmaKind::Vdso,
        "[vvar]" => VmaKind::Vvar,
        "[vvar_vclock]" => VmaKind::VvarVclock,
        "[vsyscall]" => VmaKind::Vsyscall,
        _ if m.has_flag("io") || m.has_flag("pf") => {
            return Err(refuse("a device (I/O or PFN) mapping"))
        }
        // mseal(2): never unmapped, moved or changed again; a restore cannot seal it
        // again in place of building it (and would hand the app an unsealed mapping).
        _ if m.has_flag("sl") => return Err(refuse("sealed with mseal(2)")),
        // MAP_DROPPABLE: the kernel may drop its pages under memory pressure; mapped
        // again as ordinary memory it would silently stop being droppable.
        _ if m.has_flag("dp") => return Err(refuse("droppable memory (MAP_DROPPABLE)")),
        // Shared anonymous memory is a file of the kernel's internal shmem mount.
        "/dev/zero (deleted)" if m.shared && m.inode != 0 => VmaKind::Shmem { id: m.inode },
        // An attach of a System V segment: a file of the kernel's internal shm mount
        // (device major 0) whose inode number is the segment's id (0 included).
        n if m.shared && m.dev.0 == 0 && sysv_name(n) && m.has_flag("ht") => {
            return Err(refuse("System V shared memory in huge pages (SHM_HUGETLB)"))
        }
        n if m.shared && m.dev.0 == 0 && sysv_name(n) => VmaKind::SysvShm {
            shmid: i32::try_from(m.inode)
                .map_err(|_| refuse("System V shared memory with an impossible id"))?,
            writable: m.has_flag("mw"),
        },
        n if m.inode != 0 && n.starts_with('/') && n.ends_with(" (deleted)") => {
            let name = n.trim_end_matches(" (deleted)");
            let memfd = name.starts_with("/memfd:");
            let path = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
            let meta = std::fs::metadata(&path)
                .with_context(|| format!("process {pid}: stat of {path}"))?;
            if !meta.is_file() {
                return Err(refuse("a deleted file that is not a regular file"));
            }
            if !memfd && std::os::unix::fs::MetadataExt::nlink(&meta) != 0 {
                return Err(refuse(
                    "a file deleted under this name but still linked under another",
                ));
            }
            VmaKind::SharedFile {
                id: objects.add(&path, name, memfd, writer)?,
            }
        }
        n if m.inode != 0 && n.starts_with('/') => {
            // map_files resolves to the mapped inode itself, even if the path was replaced.
            let meta =
                std::fs::metadata(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end))
                    .or_else(|_| std::fs::metadata(n))
                    .with_context(|| format!("process {pid}: stat of mapped file {n}"))?;
            if meta_ino(&meta) != m.inode {
                return Err(refuse(
                    "a file that was replaced on disk since it was mapped",
                ));
            }
            VmaKind::File {
                file: identity(n, &meta),
            }
        }
        n if m.shared => return Err(refuse(&format!("shared anonymous memory {n}"))),
        n if n.is_empty() || n == "[heap]" || n == "[stack]" || n.starts_with("[anon:") => {
            VmaKind::Anon { name: n.to_owned() }
        }
        _ => return Err(refuse("an unknown kind of mapping")),
    })
}

/// The contents of a shared anonymous mapping, read from the shmem object itself
/// (`/proc/PID/map_files`): pages another process wrote are there even where this one
/// never touched them, and reading a hole allocates nothing.
fn shmem_pages(
    pid: i32,
    vma: &mut Vma,
    writer: &mut PageWriter<'_>,
    buf: &mut Vec<u8>,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let path = format!("/proc/{pid}/map_files/{:x}-{:x}", vma.start, vma.end);
    let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    let pages = vma.page_count();
    let mut done = 0u64;
    while done < pages {
        let n = (pages - done).min(CHUNK / PAGE_SIZE as u64);
        buf.clear();
        buf.resize(n as usize * PAGE_SIZE, 0);
        let at = vma.offset + done * PAGE_SIZE as u64;
        let mut got = 0;
        while got < buf.len() {
            let k = f
                .read_at(&mut buf[got..], at + got as u64)
                .with_context(|| format!("reading shared anonymous memory {path}"))?;
            if k == 0 {
                break; // past the object's end: reads as zero (and would fault)
            }
            got += k;
        }
        writer.add_pages(done, buf, &mut vma.pages)?;
        done += n;
    }
    Ok(())
}

/// `/SYSV` and eight hex digits (the key), then ` (deleted)`: how `maps` names an attach
/// of a System V shared memory segment.
pub fn sysv_name(n: &str) -> bool {
    n.strip_prefix("/SYSV")
        .and_then(|r| r.strip_suffix(" (deleted)"))
        .is_some_and(|k| k.len() == 8 && k.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn meta_ino(meta: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(meta)
}

pub(super) fn collect(
    pid: i32,
    comm: &str,
    smaps: &[MapEntry],
    objects: &mut SharedFiles,
    writer: &mut PageWriter<'_>,
    times: &mut super::PhaseTimes<'_>,
) -> Result<Vec<Vma>> {
    let progress = times.memory_progress.as_ref();
    let tracked = times.tracking.and_then(|t| t.proc(pid));
    let counts = &mut times.counts;
    // `--prev`: this process's write tracking and the previous image's contents.
    let tracked = match tracked {
        Some((uffd, st)) => Some((
            uffd,
            &st.slots[..],
            std::fs::File::open(format!("/proc/{pid}/pagemap"))
                .with_context(|| format!("opening /proc/{pid}/pagemap"))?,
        )),
        None => None,
    };
    let target = Target::open(pid).with_context(|| format!("opening memory of process {pid}"))?;
    let mut out = Vec::with_capacity(smaps.len());
    let mut buf = Vec::new();
    for m in smaps {
        let kind = kind_of(pid, comm, m, objects, writer)?;
        let mut vma = Vma {
            start: m.start,
            end: m.end,
            prot: (m.read as u8 * PROT_READ)
                | (m.write as u8 * PROT_WRITE)
                | (m.exec as u8 * PROT_EXEC),
            shared: m.shared,
            flags: VmaFlags {
                growsdown: m.has_flag("gd"),
                dontfork: m.has_flag("dc"),
                dontdump: m.has_flag("dd"),
                wipeonfork: m.has_flag("wf"),
                locked: m.has_flag("lo"),
                hugepage: m.has_flag("hg"),
                nohugepage: m.has_flag("nh"),
                mergeable: m.has_flag("mg"),
                sequential: m.has_flag("sr"),
                random: m.has_flag("rr"),
                noreserve: m.has_flag("nr"),
                lockonfault: m.has_flag("lf"),
                accounted: m.has_flag("ac"),
            },
            kind,
            offset: m.offset,
            pages: Vec::new(),
        };
        let file_backed = match &vma.kind {
            VmaKind::Anon { .. } => false,
            VmaKind::Shmem { .. } => {
                shmem_pages(pid, &mut vma, writer, &mut buf)?;
                out.push(vma);
                continue;
            }
            VmaKind::File { .. } | VmaKind::SharedFile { .. } if !vma.shared => true,
            // Shared file mappings live in the file (a deleted one's contents are its
            // object's); the vdso family is the kernel's.
            _ => {
                out.push(vma);
                continue;
            }
        };
        let wanted = target
            .wanted(m.start, m.end, file_backed)
            .with_context(|| {
                format!(
                    "reading page map of process {pid} ({comm}) at {:x}-{:x}",
                    m.start, m.end
                )
            })?;
        if let Some((uffd, prev, pagemap)) = &tracked {
            // Registered with our userfaultfd before (`uw`), and still ours: the pages
            // it reports not written are the previous image's (see `track`).
            if !file_backed
                && super::track::trackable(m)
                && m.has_flag("uw")
                && super::track::register(uffd, m)
            {
                let unwritten = super::track::unwritten(pagemap, m.start, m.end, false)
                    .with_context(|| format!("process {pid}"))?;
                super::track::write_pages(
                    &target,
                    m.start,
                    &wanted.runs,
                    &unwritten,
                    prev,
                    writer,
                    &mut vma.pages,
                    None,
                    false,
                    counts,
                )
                .with_context(|| format!("process {pid}"))?;
                out.push(vma);
                continue;
            }
        }
        for &(first, count, exclusive) in &wanted.runs {
            counts.read += count;
            let mut done = 0u64;
            while done < count {
                let n = (count - done).min(CHUNK / PAGE_SIZE as u64);
                buf.resize((n as usize) * PAGE_SIZE, 0);
                let addr = m.start + (first + done) * PAGE_SIZE as u64;
                target.read(addr, &mut buf, exclusive).with_context(|| {
                    format!("reading memory of process {pid} at {addr:x} ({n} pages)")
                })?;
                writer.add_pages(first + done, &buf, &mut vma.pages)?;
                if let Some(p) = progress {
                    p.inc(buf.len() as u64);
                }
                done += n;
            }
        }
        out.push(vma);
    }
    if !out.iter().any(|v| v.kind == VmaKind::Vdso) {
        bail!("process {pid} ({comm}) has no [vdso] mapping: it cannot be restored on this kernel");
    }
    Ok(out)
}
