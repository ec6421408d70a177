//! The restorer program: the syscall program that turns the restoring child (a copy of
//! warmstart) into the snapshot's process. It runs from a blob mapped at an address free
//! in both layouts, in two phases separated by traps to the monitor:
//!
//! 1. unmap everything of warmstart; move `[vvar]`, `[vvar_vclock]` and `[vdso]`
//!    together to their recorded addresses; map every VMA; apply madvise flags and anon
//!    names; `PR_SET_MM_MAP` (with `exe_fd`); close the fds used for mapping; install
//!    signal handlers; trap — the monitor now writes the memory contents;
//! 2. per-thread state that must see the final memory (rseq, robust list, tid address,
//!    sigaltstack, name), re-queue pending signals, drop credentials; trap — the monitor
//!    unmaps the blob, loads registers, FPU state and sigmask, and detaches.

use anyhow::{bail, Result};
use warmstart_parasite::{Arg, Blob, DataRef, ProgramBuilder, Slot, Width};
use warmstart_snapshots::model::{
    EpollTarget, Process, Thread, Vma, VmaKind, PROT_READ, PROT_WRITE,
};

use crate::sys::maps::MapEntry;

/// What the child prepared for the program: fds it opened, memory it mapped.
pub struct ProgramFds {
    /// Per VMA index: the fd to map it from (file VMAs, and the `[vdso]` when proxied).
    pub vma_fds: Vec<Option<i32>>,
    /// This host's vdso is not the snapshot's: its `[vdso]`/`[vvar]` go (as laid out)
    /// to this address instead of the snapshot's, whose `[vdso]` address gets the proxy
    /// in `vma_fds` ([`super::vdso_proxy`]).
    pub host_vdso_at: Option<u64>,
    pub exe_fd: i32,
    /// Per VMA index: where the VMA's memory is mapped already, with the pages it shares
    /// with other processes of the tree ([`super::cow`]): moved into place, not mapped.
    pub premapped: Vec<Option<u64>>,
    /// System V segments removed while attached (`SHM_DEST`): each process removes them
    /// again once it has attached them.
    pub sysv_rmid: Vec<i32>,
}

/// VMA `v` of an attach of System V segment `shmid`: the attach is made again at its
/// address by its first VMA (offset 0; the dump checked that the VMAs of an attach cover
/// the whole segment, in order), read-only unless `writable`; then every VMA gets its
/// protection. `rmid`: the segment was removed while attached, so it is removed again
/// once attached (it stays while attached, and `shmat` by id still finds it).
fn sysv_attach(b: &mut ProgramBuilder, v: &Vma, shmid: i32, writable: bool, rmid: bool) {
    let prot = PROT_READ | if writable { PROT_WRITE } else { 0 };
    if v.offset == 0 {
        b.syscall(
            libc::SYS_shmat,
            &[
                imm(shmid as u32),
                imm(v.start),
                imm(if writable { 0 } else { libc::SHM_RDONLY as u64 }),
            ],
            format!("shmat System V segment {shmid} at {:x}", v.start),
        );
        if rmid {
            b.syscall(
                libc::SYS_shmctl,
                &[imm(shmid as u32), imm(libc::IPC_RMID as u64), imm(0u64)],
                format!("shmctl(IPC_RMID) System V segment {shmid}"),
            );
        }
    }
    if v.prot != prot {
        b.syscall(
            libc::SYS_mprotect,
            &[imm(v.start), imm(v.len()), imm(v.prot)],
            format!("mprotect System V segment {shmid} at {:x}", v.start),
        );
    }
}

/// What a parked restore (`warmstart serve`'s pool) does when it is handed out. Every
/// process stops at its last trap with placeholders where its stdio goes and no timer
/// armed; then its leader runs this *late phase*: it receives the caller's stdin, stdout
/// and stderr on `sock` (one `SCM_RIGHTS` message of three fds) if it has stdio fds, puts
/// them in place, adds the epoll registrations on them, arms its timers and timerfds (so
/// none ran down while parked) and traps again.
#[derive(Debug, Clone, Default)]
pub struct Late {
    /// The stdio socket, for a process with stdio fds.
    pub sock: Option<i32>,
    /// (app fd, which of the received fds, close-on-exec)
    pub places: Vec<(i32, u8, bool)>,
    /// How many fds arrive: the caller's stdio, then the instance's TCP listeners
    /// (`crate::fds::late_places`).
    pub n_given: usize,
    /// Epoll registrations on those fds, added once they are in place: (epoll fd, target).
    pub epoll_adds: Vec<(i32, EpollTarget)>,
    /// Timerfds to arm: (fd, interval ns, value ns, unread expirations).
    pub timerfds: Vec<crate::fds::LateTimerFd>,
    /// Which time namespace the process moves to when handed out.
    pub timens: LateTimeNs,
    /// An `O_PATH` fd of `/proc/self` (`Create`) or `/proc/ROOT` (`Join`), opened before
    /// the process may have chrooted: the late phase reaches the namespace files through
    /// it, and closes it.
    pub proc_dir: i32,
}

/// A parked instance's clocks go on from the dump when it is *handed out*, not when it
/// was parked: its processes move to a new time namespace then (`setns` needs a
/// single-threaded caller, so a parked process creates its threads only after that).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LateTimeNs {
    /// The root: creates the namespace with the offsets the monitor writes into the
    /// program ([`TIMENS_TEXT_LEN`] bytes at `BlobInfo::timens_text`) and enters it.
    #[default]
    Create,
    /// Another process of the tree: enters the namespace the root (this pid) created.
    Join(i32),
}

/// Length of the `/proc/PID/timens_offsets` text a monitor writes for a handed-out
/// instance ([`timens_text`]).
pub const TIMENS_TEXT_LEN: usize = 83;

/// The offsets text for `/proc/PID/timens_offsets`, fixed-width (the program writes
/// [`TIMENS_TEXT_LEN`] bytes): `monotonic` and `boottime` offsets in nanoseconds.
pub fn timens_text(monotonic_ns: i64, boottime_ns: i64) -> Vec<u8> {
    let field = |ns: i64| {
        let (sec, nsec) = (ns.div_euclid(1_000_000_000), ns.rem_euclid(1_000_000_000));
        let sec = if sec < 0 {
            format!("-{:020}", sec.unsigned_abs())
        } else {
            format!("{sec:021}")
        };
        format!("{sec} {nsec:09}")
    };
    let t = format!(
        "monotonic {}\nboottime {}\n",
        field(monotonic_ns),
        field(boottime_ns)
    );
    debug_assert_eq!(t.len(), TIMENS_TEXT_LEN);
    t.into_bytes()
}

fn imm(v: impl Into<u64>) -> Arg {
    Arg::Imm(v.into())
}

fn mmap_flags(v: &Vma) -> u64 {
    let mut f = libc::MAP_FIXED as u64;
    f |= if v.shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    } as u64;
    if matches!(v.kind, VmaKind::Anon { .. }) {
        f |= libc::MAP_ANONYMOUS as u64;
    }
    if v.flags.growsdown {
        f |= libc::MAP_GROWSDOWN as u64;
    }
    // A lock-on-fault area is locked by `mlock2(MLOCK_ONFAULT)` after the mmap instead:
    // `MAP_LOCKED` would populate it and lose the on-fault flag.
    if v.flags.locked && !v.flags.lockonfault {
        f |= libc::MAP_LOCKED as u64;
    }
    if v.flags.noreserve {
        f |= libc::MAP_NORESERVE as u64;
    }
    f
}

/// A private area that was writable once (VM_ACCOUNT) and is read-only now, as RELRO.
fn is_relro(v: &Vma) -> bool {
    v.flags.accounted && v.prot & PROT_WRITE == 0 && !v.shared
}

/// Whether private area `v` is writable while the monitor writes memory (at the
/// program's first trap), so that plain `process_vm_writev` reaches it.
pub fn writable_at_first_trap(v: &Vma) -> bool {
    !v.shared && (v.prot & PROT_WRITE != 0 || is_relro(v))
}

fn label(v: &Vma) -> String {
    let what = match &v.kind {
        VmaKind::Anon { name } if name.is_empty() => "anon".to_owned(),
        VmaKind::Anon { name } => name.clone(),
        VmaKind::File { file } => file.path.clone(),
        k => format!("{k:?}"),
    };
    format!("{:x}-{:x} {what}", v.start, v.end)
}

/// `[vvar]`, `[vvar_vclock]`, `[vdso]` of the snapshot, in address order.
fn vdso_family(p: &Process) -> Vec<&Vma> {
    p.vmas
        .iter()
        .filter(|v| matches!(v.kind, VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock))
        .collect()
}

/// Moves our vdso block onto the snapshot's (or, proxied, to `host_at`), piece by piece,
/// in an order where no move lands on a piece not yet moved.
fn move_vdso(
    b: &mut ProgramBuilder,
    p: &Process,
    own: &[MapEntry],
    host_at: Option<u64>,
) -> Result<()> {
    let ours: Vec<&MapEntry> = own
        .iter()
        .filter(|m| matches!(m.name.as_str(), "[vdso]" | "[vvar]" | "[vvar_vclock]"))
        .collect();
    if let Some(at) = host_at {
        let Some(first) = ours.first() else {
            bail!("this process has no [vdso] mapping");
        };
        let targets: Vec<u64> = ours.iter().map(|m| at + (m.start - first.start)).collect();
        return move_pieces(b, &ours, &targets);
    }
    let theirs = vdso_family(p);
    let shape = |v: Vec<(String, u64, u64)>| -> Vec<(String, u64)> {
        let base = v.first().map(|x| x.1).unwrap_or(0);
        v.into_iter()
            .map(|(n, s, e)| (n, (s - base) << 20 | (e - s)))
            .collect()
    };
    let their_shape = shape(
        theirs
            .iter()
            .map(|v| {
                let n = match v.kind {
                    VmaKind::Vdso => "[vdso]",
                    VmaKind::Vvar => "[vvar]",
                    _ => "[vvar_vclock]",
                };
                (n.to_owned(), v.start, v.end)
            })
            .collect(),
    );
    let our_shape = shape(
        ours.iter()
            .map(|m| (m.name.clone(), m.start, m.end))
            .collect(),
    );
    if their_shape != our_shape {
        bail!(
            "the vdso layout here ({}) differs from the snapshot's ({}); restore on the \
             snapshot's kernel",
            ours.iter()
                .map(|m| format!("{} {:#x}", m.name, m.end - m.start))
                .collect::<Vec<_>>()
                .join(", "),
            theirs
                .iter()
                .map(|v| format!("{:?} {:#x}", v.kind, v.len()))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let targets: Vec<u64> = theirs.iter().map(|v| v.start).collect();
    move_pieces(b, &ours, &targets)
}

/// Moves each of `ours` (in address order, one shift apart from `targets`) to its
/// target, in an order where no move lands on a piece not yet moved.
fn move_pieces(b: &mut ProgramBuilder, ours: &[&MapEntry], targets: &[u64]) -> Result<()> {
    let delta = targets[0] as i64 - ours[0].start as i64;
    if delta == 0 {
        return Ok(());
    }
    let mut order: Vec<usize> = (0..ours.len()).collect();
    if delta > 0 {
        order.reverse();
    }
    for i in order {
        let m = ours[i];
        let len = m.end - m.start;
        b.syscall(
            libc::SYS_mremap,
            &[
                imm(m.start),
                imm(len),
                imm(len),
                imm((libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64),
                imm(targets[i]),
            ],
            format!("mremap {} {:x} -> {:x}", m.name, m.start, targets[i]),
        );
    }
    Ok(())
}

/// End of the user address space with 4-level paging.
const TASK_TOP: u64 = 0x7fff_ffff_f000;

/// `struct prctl_mm_map` (linux/prctl.h).
fn mm_map(p: &Process, auxv_addr: u64, exe_fd: i32) -> Vec<u8> {
    let m = &p.mm;
    let mut out = Vec::with_capacity(104);
    for v in [
        m.start_code,
        m.end_code,
        m.start_data,
        m.end_data,
        m.start_brk,
        m.brk,
        m.start_stack,
        m.arg_start,
        m.arg_end,
        m.env_start,
        m.env_end,
        auxv_addr,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&((p.auxv.len() * 8) as u32).to_le_bytes());
    out.extend_from_slice(&(exe_fd as u32).to_le_bytes());
    out
}

/// Builds the program. `own` is the child's layout before the blob is mapped at `base`
/// (`blob_len` bytes: the program does not depend on it except to keep it mapped).
/// With `lazy` ranges, the program also creates a userfaultfd, registers those ranges
/// and leaves the fd in the returned slot for the monitor to take; it closes its own
/// copy at the start of phase 2.
pub fn build(
    p: &Process,
    own: &[MapEntry],
    fds: &ProgramFds,
    base: u64,
    blob_len: u64,
    lazy: &[(u64, u64)],
    late: Option<&Late>,
) -> Result<(Blob, Option<Slot>, Option<DataRef>)> {
    let (b, uffd, text) = program(p, own, fds, base, blob_len, lazy, late)?;
    Ok((b.build(base), uffd, text))
}

/// Whether the restoring child also sends the monitor a listing of its program (`-vv`).
/// Set by the monitor before the clone (the child only reads it).
pub static LISTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The program [`build`] assembles, as plain steps (for the listing and for tests).
pub fn program(
    p: &Process,
    own: &[MapEntry],
    fds: &ProgramFds,
    base: u64,
    blob_len: u64,
    lazy: &[(u64, u64)],
    late: Option<&Late>,
) -> Result<(ProgramBuilder, Option<Slot>, Option<DataRef>)> {
    let mut b = ProgramBuilder::new();
    b.stack_size(64 * 1024);

    // Phase 1: warmstart's own memory goes, the snapshot's layout comes. Everything but
    // the blob and the vdso family is unmapped as whole ranges, so memory our own code
    // mapped after `own` was read (a grown heap) goes too.
    let mut keep: Vec<(u64, u64)> = own
        .iter()
        .filter(|m| matches!(m.name.as_str(), "[vdso]" | "[vvar]" | "[vvar_vclock]"))
        .map(|m| (m.start, m.end))
        .collect();
    keep.push((base, base + blob_len));
    keep.extend(
        p.vmas
            .iter()
            .zip(&fds.premapped)
            .filter_map(|(v, at)| at.map(|at| (at, at + v.len()))),
    );
    keep.sort_unstable();
    let top = own
        .iter()
        .filter(|m| m.name != "[vsyscall]")
        .map(|m| m.end)
        .max()
        .unwrap_or(0)
        .max(TASK_TOP);
    let mut from = 0u64;
    for &(s, e) in keep.iter().chain(std::iter::once(&(top, top))) {
        if s > from {
            b.syscall(
                libc::SYS_munmap,
                &[imm(from), imm(s - from)],
                format!("munmap {from:x}-{s:x} (warmstart)"),
            );
        }
        from = from.max(e);
    }
    move_vdso(&mut b, p, own, fds.host_vdso_at)?;
    let mut relros = Vec::new();
    for (i, v) in p.vmas.iter().enumerate() {
        // The kernel's; a proxied `[vdso]` is mapped from its fd like a file.
        let proxy = v.kind == VmaKind::Vdso && fds.host_vdso_at.is_some();
        if !proxy
            && matches!(
                v.kind,
                VmaKind::Vdso | VmaKind::Vvar | VmaKind::VvarVclock | VmaKind::Vsyscall
            )
        {
            continue;
        }
        let (fd, off) = match fds.vma_fds[i] {
            Some(fd) => (fd as i64 as u64, v.offset),
            None => (u64::MAX, 0),
        };
        // An area that was writable once (VM_ACCOUNT, e.g. RELRO) is mapped writable and
        // protected after the first trap, as the loader did, so it keeps the flag; the
        // monitor writes its pages meanwhile with `process_vm_writev`
        // ([`writable_at_first_trap`]). Other areas get their final protection at once
        // (pages of read-only ones go through /proc/PID/mem, which may write them).
        let relro = is_relro(v);
        let premapped = fds.premapped.get(i).copied().flatten();
        match (&v.kind, premapped) {
            (VmaKind::SysvShm { shmid, writable }, _) => {
                sysv_attach(&mut b, v, *shmid, *writable, fds.sysv_rmid.contains(shmid));
            }
            // A shared area, mapped read-write where it is now: moved into place, then
            // given its protection (a RELRO-like one after the first trap, as below).
            (_, Some(at)) => {
                if at != v.start {
                    b.syscall(
                        libc::SYS_mremap,
                        &[
                            imm(at),
                            imm(v.len()),
                            imm(v.len()),
                            imm((libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64),
                            imm(v.start),
                        ],
                        format!("mremap shared {at:x} -> {}", label(v)),
                    );
                }
                if !relro && v.prot != PROT_READ | PROT_WRITE {
                    b.syscall(
                        libc::SYS_mprotect,
                        &[imm(v.start), imm(v.len()), imm(v.prot)],
                        format!("mprotect {}", label(v)),
                    );
                }
            }
            (_, None) => {
                b.syscall(
                    libc::SYS_mmap,
                    &[
                        imm(v.start),
                        imm(v.len()),
                        imm(if relro { v.prot | PROT_WRITE } else { v.prot }),
                        imm(mmap_flags(v)),
                        imm(fd),
                        imm(off),
                    ],
                    format!("mmap {}", label(v)),
                );
            }
        }
        if relro {
            relros.push((v, premapped.is_some()));
        }
        let advice = [
            (v.flags.dontfork, libc::MADV_DONTFORK),
            (v.flags.dontdump, libc::MADV_DONTDUMP),
            (v.flags.wipeonfork, libc::MADV_WIPEONFORK),
            (v.flags.hugepage, libc::MADV_HUGEPAGE),
            (v.flags.nohugepage, libc::MADV_NOHUGEPAGE),
            (v.flags.mergeable, libc::MADV_MERGEABLE),
            (v.flags.sequential, libc::MADV_SEQUENTIAL),
            (v.flags.random, libc::MADV_RANDOM),
        ];
        for (on, adv) in advice {
            if on {
                b.syscall(
                    libc::SYS_madvise,
                    &[imm(v.start), imm(v.len()), imm(adv as u64)],
                    format!("madvise({adv}) {}", label(v)),
                );
            }
        }
        if v.flags.lockonfault {
            const MLOCK_ONFAULT: u64 = 1;
            b.syscall(
                libc::SYS_mlock2,
                &[imm(v.start), imm(v.len()), imm(MLOCK_ONFAULT)],
                format!("mlock2(MLOCK_ONFAULT) {}", label(v)),
            );
        }
        if let VmaKind::Anon { name } = &v.kind {
            if let Some(n) = name
                .strip_prefix("[anon:")
                .and_then(|n| n.strip_suffix(']'))
            {
                let mut s = n.as_bytes().to_vec();
                s.push(0);
                let d = b.data(&s);
                b.syscall(
                    libc::SYS_prctl,
                    &[
                        imm(libc::PR_SET_VMA as u64),
                        imm(libc::PR_SET_VMA_ANON_NAME as u64),
                        imm(v.start),
                        imm(v.len()),
                        d.arg(),
                    ],
                    format!("name {}", label(v)),
                );
            }
        }
    }
    let auxv: Vec<u8> = p.auxv.iter().flat_map(|w| w.to_le_bytes()).collect();
    let auxv = b.data(&auxv);
    let map = b.data_zeroed(104);
    // The auxv pointer inside prctl_mm_map is absolute: patched in at build time.
    let map_bytes = mm_map(p, 0, fds.exe_fd);
    b.write_data(map, 0, &map_bytes);
    b.data_pointer(map, 88, auxv, 0);
    b.syscall(
        libc::SYS_prctl,
        &[
            imm(libc::PR_SET_MM as u64),
            imm(libc::PR_SET_MM_MAP as u64),
            map.arg(),
            imm(104u64),
        ],
        "prctl(PR_SET_MM_MAP)",
    );
    // Before the memory is written: the pages faulted in then are not huge pages.
    if p.thp_disable {
        b.syscall(
            libc::SYS_prctl,
            &[
                imm(libc::PR_SET_THP_DISABLE as u64),
                imm(1u64),
                imm(0u64),
                imm(0u64),
                imm(0u64),
            ],
            "prctl(PR_SET_THP_DISABLE)",
        );
    }
    if p.child_subreaper {
        b.syscall(
            libc::SYS_prctl,
            &[imm(libc::PR_SET_CHILD_SUBREAPER as u64), imm(1u64)],
            "prctl(PR_SET_CHILD_SUBREAPER)",
        );
    }
    let uffd = (!lazy.is_empty()).then(|| register_lazy(&mut b, lazy));
    let mut closing: Vec<i32> = fds.vma_fds.iter().flatten().copied().collect();
    closing.push(fds.exe_fd);
    closing.sort_unstable();
    closing.dedup();
    for fd in closing {
        b.syscall(
            libc::SYS_close,
            &[imm(fd as u32)],
            format!("close mapping fd {fd}"),
        );
    }
    for (i, sa) in p.sigactions.iter().enumerate() {
        let sig = i as u64 + 1;
        if sig == libc::SIGKILL as u64 || sig == libc::SIGSTOP as u64 {
            continue;
        }
        let mut raw = Vec::with_capacity(32);
        for w in [sa.handler, sa.flags, sa.restorer, sa.mask] {
            raw.extend_from_slice(&w.to_le_bytes());
        }
        let d = b.data(&raw);
        b.syscall(
            libc::SYS_rt_sigaction,
            &[imm(sig), d.arg(), imm(0u64), imm(8u64)],
            format!("rt_sigaction({sig})"),
        );
    }
    b.trap();

    for (v, premapped) in relros {
        // A shared area faulted long ago (and a write here would copy a shared page).
        if matches!(v.kind, VmaKind::Anon { .. }) && !premapped {
            keep_accounted(&mut b, v);
        }
        b.syscall(
            libc::SYS_mprotect,
            &[imm(v.start), imm(v.len()), imm(v.prot)],
            format!("mprotect {}", label(v)),
        );
    }
    // Phase 2: after the monitor has written memory. The leader installs the seccomp
    // filters (threads inherit them; the monitor traces with PTRACE_O_SUSPEND_SECCOMP, so
    // they bind only once it lets go), creates the other threads at their recorded tids,
    // arms the timers; every thread sets its own state and traps.
    if p.no_new_privs {
        b.syscall(
            libc::SYS_prctl,
            &[imm(libc::PR_SET_NO_NEW_PRIVS as u64), imm(1u64)],
            "prctl(PR_SET_NO_NEW_PRIVS)",
        );
    }
    for (i, f) in p.seccomp_filters.iter().enumerate() {
        let insns = b.data(f);
        let prog = b.data_zeroed(16);
        b.write_data(prog, 0, &((f.len() / 8) as u16).to_le_bytes());
        b.data_pointer(prog, 8, insns, 0);
        b.syscall(
            libc::SYS_seccomp,
            &[
                imm(libc::SECCOMP_SET_MODE_FILTER as u64),
                imm(0u64),
                prog.arg(),
            ],
            format!("seccomp filter {i} ({} instructions)", f.len() / 8),
        );
    }
    if let Some(fd) = uffd {
        // The monitor holds its own copy now; ours would keep the uffd alive after the
        // monitor is done with it (faults would then block forever).
        b.syscall(libc::SYS_close, &[fd.plus(0)], "close userfaultfd");
    }
    // Parked: single-threaded until handed out (see [`LateTimeNs`]), then the late phase.
    let text = late.and_then(|late| {
        b.trap();
        let text = switch_timens(&mut b, late.timens, late.proc_dir);
        late_phase(&mut b, late);
        text
    });
    let spawned = clone_threads(&mut b, p);
    // Once their threads exist (SIGEV_THREAD_ID), before the creds drop.
    create_timers(&mut b, p);
    arm_timers(&mut b, p);
    last_of_leader(&mut b, p);
    b.trap();
    // The monitor gives every thread its registers at its last trap; none goes on.
    b.exit_thread(0);
    spawned_threads(&mut b, p, spawned);
    Ok((b, uffd, text))
}

/// Creates the other threads at their recorded tids: the leader goes on at the step after
/// this; each new thread jumps to its label, bound by [`spawned_threads`].
fn clone_threads<'a>(
    b: &mut ProgramBuilder,
    p: &'a Process,
) -> Vec<(warmstart_parasite::Label, &'a Thread)> {
    let mut spawned = Vec::new();
    for t in &p.threads[1..] {
        let stack = b.stack(THREAD_STACK);
        let tid = b.data(&t.tid.to_le_bytes());
        let args = b.data_zeroed(88);
        let flags = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM) as u64;
        b.write_data(args, 0, &flags.to_le_bytes());
        b.data_pointer(args, 40, stack, 0);
        b.write_data(args, 48, &(THREAD_STACK as u64).to_le_bytes());
        b.data_pointer(args, 64, tid, 0);
        b.write_data(args, 72, &1u64.to_le_bytes());
        b.syscall(
            libc::SYS_clone3,
            &[args.arg(), imm(88u64)],
            format!("clone3 thread {}", t.tid),
        );
        let child = b.label();
        b.jump_if_zero(Slot::LAST, child);
        spawned.push((child, t));
    }
    spawned
}

/// What each created thread runs: its own state, then its last trap.
fn spawned_threads(
    b: &mut ProgramBuilder,
    p: &Process,
    spawned: Vec<(warmstart_parasite::Label, &Thread)>,
) {
    for (label, t) in spawned {
        b.bind(label);
        thread_state(b, p, t);
        b.trap();
        b.exit_thread(0);
    }
}

/// The leader's last steps: its own thread state (credentials last of all), the
/// process-wide pending signals, the dumpable flag.
fn last_of_leader(b: &mut ProgramBuilder, p: &Process) {
    thread_state(b, p, &p.threads[0]);
    for info in &p.shared_pending {
        let sig = u32::from_le_bytes(info.0[0..4].try_into().unwrap()) as u64;
        let d = b.data(&info.0);
        b.syscall(
            libc::SYS_rt_sigqueueinfo,
            &[imm(p.pid as u32), imm(sig), d.arg()],
            format!("queue process signal {sig}"),
        );
    }
    // After creds: changing them resets the dumpable flag.
    b.syscall(
        libc::SYS_prctl,
        &[imm(libc::PR_SET_DUMPABLE as u64), imm(p.dumpable as u64)],
        "prctl(PR_SET_DUMPABLE)",
    );
}

/// Moves a handed-out process to the time namespace of [`LateTimeNs`], through
/// `proc_dir` ([`Late::proc_dir`]); for the root, the data where the monitor writes the
/// offsets text.
fn switch_timens(b: &mut ProgramBuilder, how: LateTimeNs, proc_dir: i32) -> Option<DataRef> {
    let openat = |b: &mut ProgramBuilder, name: &str, flags: i32| {
        let mut n = name.as_bytes().to_vec();
        n.push(0);
        let d = b.data(&n);
        b.syscall_saved(
            libc::SYS_openat,
            &[
                imm(proc_dir as u32),
                d.arg(),
                imm((flags | libc::O_CLOEXEC) as u64),
                imm(0u64),
            ],
            format!("open {name} of the time namespace"),
        )
    };
    let text = match how {
        LateTimeNs::Create => {
            let text = b.data_zeroed(TIMENS_TEXT_LEN);
            b.syscall(
                libc::SYS_unshare,
                &[imm(libc::CLONE_NEWTIME as u64)],
                "unshare(CLONE_NEWTIME)",
            );
            let fd = openat(b, "timens_offsets", libc::O_WRONLY);
            b.syscall(
                libc::SYS_write,
                &[fd.plus(0), text.arg(), imm(TIMENS_TEXT_LEN as u64)],
                "write the clock offsets of the hand-out",
            );
            b.syscall(libc::SYS_close, &[fd.plus(0)], "close timens_offsets");
            Some(text)
        }
        LateTimeNs::Join(_) => None,
    };
    let fd = openat(b, "ns/time_for_children", libc::O_RDONLY);
    b.syscall(
        libc::SYS_setns,
        &[fd.plus(0), imm(libc::CLONE_NEWTIME as u64)],
        "setns(CLONE_NEWTIME): the clocks of the hand-out",
    );
    b.syscall(libc::SYS_close, &[fd.plus(0)], "close the time namespace");
    b.syscall(
        libc::SYS_close,
        &[imm(proc_dir as u32)],
        format!("close /proc dir fd {proc_dir}"),
    );
    text
}

/// Makes sure anonymous area `v` has faulted once before it loses write permission, so
/// that `mprotect` keeps its `VM_ACCOUNT` (smaps `ac`): since Linux 6.6 mprotect drops
/// the flag from an area that never faulted (no `anon_vma`), and the dumped area had
/// faulted (a guard page split from a used area, a read-only table written once). One
/// page is write-faulted in: a stored page (in a lazy restore its contents come from the
/// page server, eagerly they are there already), else the first page, dropped again
/// unless the snapshot has it present.
fn keep_accounted(b: &mut ProgramBuilder, v: &Vma) {
    const MADV_POPULATE_WRITE: u64 = 23;
    let (page, present) = v
        .pages
        .iter()
        .find(|r| {
            matches!(
                r.content,
                warmstart_snapshots::model::RunContent::Data { .. }
            )
        })
        .or_else(|| v.pages.first())
        .map(|r| (r.page, true))
        .unwrap_or((0, false));
    let addr = v.start + page * 4096;
    b.syscall(
        libc::SYS_madvise,
        &[imm(addr), imm(4096u64), imm(MADV_POPULATE_WRITE)],
        format!("fault one page of {} (keeps VM_ACCOUNT)", label(v)),
    );
    if !present {
        b.syscall(
            libc::SYS_madvise,
            &[imm(addr), imm(4096u64), imm(libc::MADV_DONTNEED as u64)],
            format!("drop that page again {}", label(v)),
        );
    }
}

/// Creates the userfaultfd of a lazy restore and registers `ranges` for missing faults.
fn register_lazy(b: &mut ProgramBuilder, ranges: &[(u64, u64)]) -> Slot {
    use crate::sys::uffd;
    let fd = b.syscall_saved(
        libc::SYS_userfaultfd,
        &[imm((libc::O_CLOEXEC | libc::O_NONBLOCK) as u64)],
        "userfaultfd",
    );
    let features = crate::lazy::REQUIRED_FEATURES | uffd::Features::THREAD_ID;
    let mut api = Vec::with_capacity(24);
    for w in [uffd::UFFD_API, features.bits(), 0] {
        api.extend_from_slice(&w.to_le_bytes());
    }
    let api = b.data(&api);
    b.syscall(
        libc::SYS_ioctl,
        &[fd.plus(0), imm(uffd::UFFDIO_API), api.arg()],
        "UFFDIO_API",
    );
    for &(start, len) in ranges {
        let mut reg = Vec::with_capacity(32);
        for w in [start, len, uffd::RegisterMode::MISSING.bits(), 0] {
            reg.extend_from_slice(&w.to_le_bytes());
        }
        let reg = b.data(&reg);
        b.syscall(
            libc::SYS_ioctl,
            &[fd.plus(0), imm(uffd::UFFDIO_REGISTER), reg.arg()],
            format!("UFFDIO_REGISTER {start:x}-{:x}", start + len),
        );
    }
    fd
}

/// A `struct itimerval` (`per_sec` 10^6, microseconds) or `struct itimerspec` (10^9,
/// nanoseconds): interval then value, each as (seconds, fraction).
fn interval_and_value(interval: u64, value: u64, per_sec: u64) -> Vec<u8> {
    [
        interval / per_sec,
        interval % per_sec,
        value / per_sec,
        value % per_sec,
    ]
    .iter()
    .flat_map(|w| w.to_le_bytes())
    .collect()
}

/// Re-creates POSIX timers with their ids, disarmed ([`arm_timers`] arms them).
fn create_timers(b: &mut ProgramBuilder, p: &Process) {
    if p.posix_timers.is_empty() {
        return;
    }
    // With this mode on, timer_create takes the id to create from *timerid.
    const PR_TIMER_CREATE_RESTORE_IDS: u64 = 77;
    b.syscall(
        libc::SYS_prctl,
        &[imm(PR_TIMER_CREATE_RESTORE_IDS), imm(1u64)],
        "prctl(PR_TIMER_CREATE_RESTORE_IDS, on)",
    );
    for t in &p.posix_timers {
        let mut sev = vec![0u8; 64];
        sev[0..8].copy_from_slice(&t.sigval.to_le_bytes());
        sev[8..12].copy_from_slice(&t.signo.to_le_bytes());
        sev[12..16].copy_from_slice(&t.notify.to_le_bytes());
        sev[16..20].copy_from_slice(&t.notify_tid.to_le_bytes());
        let sev = b.data(&sev);
        let id = b.data(&t.id.to_le_bytes());
        b.syscall(
            libc::SYS_timer_create,
            &[imm(t.clock as u32 as u64), sev.arg(), id.arg()],
            format!("timer_create(id {})", t.id),
        );
    }
    b.syscall(
        libc::SYS_prctl,
        &[imm(PR_TIMER_CREATE_RESTORE_IDS), imm(0u64)],
        "prctl(PR_TIMER_CREATE_RESTORE_IDS, off)",
    );
}

/// Re-arms interval timers and the POSIX timers [`create_timers`] made.
fn arm_timers(b: &mut ProgramBuilder, p: &Process) {
    for (which, t) in p.itimers.iter().enumerate() {
        if t.value_us == 0 {
            continue;
        }
        let d = b.data(&interval_and_value(t.interval_us, t.value_us, 1_000_000));
        b.syscall(
            libc::SYS_setitimer,
            &[imm(which as u64), d.arg(), imm(0u64)],
            format!("setitimer({which})"),
        );
    }
    for t in p.posix_timers.iter().filter(|t| t.value_ns != 0) {
        let its = b.data(&interval_and_value(
            t.interval_ns,
            t.value_ns,
            1_000_000_000,
        ));
        b.syscall(
            libc::SYS_timer_settime,
            &[imm(t.id as u32 as u64), imm(0u64), its.arg(), imm(0u64)],
            format!("timer_settime(id {})", t.id),
        );
    }
}

/// The late phase of a parked restore ([`Late`]), but for the POSIX and interval timers.
fn late_phase(b: &mut ProgramBuilder, late: &Late) {
    if let Some(sock) = late.sock {
        late_stdio(b, sock, &late.places, late.n_given.max(3));
    }
    for (epfd, t) in &late.epoll_adds {
        // struct epoll_event is packed on x86-64: events (4 bytes), data (8).
        let mut ev = t.events.to_le_bytes().to_vec();
        ev.extend_from_slice(&t.data.to_le_bytes());
        let ev = b.data(&ev);
        b.syscall(
            libc::SYS_epoll_ctl,
            &[
                imm(*epfd as u32),
                imm(libc::EPOLL_CTL_ADD as u64),
                imm(t.fd as u32),
                ev.arg(),
            ],
            format!("epoll {epfd}: watch stdio fd {}", t.fd),
        );
    }
    for t in &late.timerfds {
        let (fd, ticks) = (t.fd, t.ticks);
        let its = b.data(&interval_and_value(
            t.interval_ns,
            t.value_ns,
            1_000_000_000,
        ));
        b.syscall(
            libc::SYS_timerfd_settime,
            &[
                imm(fd as u32),
                imm(t.settime_flags as u32),
                its.arg(),
                imm(0u64),
            ],
            format!("timerfd_settime (fd {fd})"),
        );
        // After settime, which zeroes them.
        if ticks > 0 {
            let t = b.data(&ticks.to_le_bytes());
            b.syscall(
                libc::SYS_ioctl,
                &[
                    imm(fd as u32),
                    imm(crate::fds::timerfd::TFD_IOC_SET_TICKS),
                    t.arg(),
                ],
                format!("timerfd {fd}: {ticks} unread expirations"),
            );
        }
    }
}

/// Receives the `n` fds (the caller's stdio, then listeners) on `sock` and puts them
/// where the app had them (`dup3` over the placeholders, atomically), then closes what it
/// received and the socket.
fn late_stdio(b: &mut ProgramBuilder, sock: i32, places: &[(i32, u8, bool)], n: usize) {
    // CMSG_SPACE(4n) and CMSG_LEN(4n): a 16-byte header, then the fds (space padded to 8).
    let cmsg_len = 16 + 4 * n as u64;
    let cmsg_space = 16 + (4 * n).div_ceil(8) * 8;
    let byte = b.data_zeroed(8);
    let iov = b.data_zeroed(16);
    b.data_pointer(iov, 0, byte, 0);
    b.write_data(iov, 8, &1u64.to_le_bytes());
    let cmsg = b.data_zeroed(cmsg_space);
    let msg = b.data_zeroed(56);
    b.data_pointer(msg, 16, iov, 0);
    b.write_data(msg, 24, &1u64.to_le_bytes());
    b.data_pointer(msg, 32, cmsg, 0);
    b.write_data(msg, 40, &(cmsg_space as u64).to_le_bytes());
    b.syscall(
        libc::SYS_recvmsg,
        &[
            imm(sock as u32),
            msg.arg(),
            imm(libc::MSG_CMSG_CLOEXEC as u64),
        ],
        "recvmsg (the caller's stdio and listeners)",
    );
    // All fds came, or the kernel cut the message (no room in the fd table under
    // RLIMIT_NOFILE): cmsg_len must be CMSG_LEN(4n).
    let len = b.slot();
    b.load(cmsg.at(0), Width::U64, Some(len));
    let whole = b.label();
    b.jump_if_zero(len.plus(-(cmsg_len as i64)), whole);
    b.syscall(
        libc::SYS_close,
        &[imm(u32::MAX as u64)],
        "the caller's fds did not arrive whole (no room under RLIMIT_NOFILE?)",
    );
    b.bind(whole);
    // The fds follow the 16-byte cmsghdr.
    let got: Vec<Slot> = (0..n as u64)
        .map(|k| {
            let s = b.slot();
            b.load(cmsg.at(16 + 4 * k), Width::U32, Some(s));
            s
        })
        .collect();
    for &(fd, k, cloexec) in places {
        let flags = if cloexec { libc::O_CLOEXEC } else { 0 };
        let what = if k < 3 { "stdio" } else { "listener" };
        b.syscall(
            libc::SYS_dup3,
            &[got[k as usize].plus(0), imm(fd as u32), imm(flags as u64)],
            format!("dup3 {what} {k} to fd {fd}"),
        );
    }
    for (k, s) in got.iter().enumerate() {
        b.syscall(
            libc::SYS_close,
            &[s.plus(0)],
            format!("close received fd {k}"),
        );
    }
    b.syscall(
        libc::SYS_close,
        &[imm(sock as u32)],
        "close the stdio socket",
    );
}

/// Stack of a thread between its clone3 and its final trap (the executor uses none;
/// the kernel needs one).
const THREAD_STACK: usize = 4096;

/// State each thread must set for itself.
fn thread_state(b: &mut ProgramBuilder, p: &Process, t: &Thread) {
    let who = format!("thread {}", t.tid);
    b.syscall(
        libc::SYS_set_robust_list,
        &[imm(t.robust_list.0), imm(t.robust_list.1)],
        format!("set_robust_list ({who})"),
    );
    b.syscall(
        libc::SYS_set_tid_address,
        &[imm(t.tid_address)],
        format!("set_tid_address ({who})"),
    );
    if let Some(r) = t.rseq {
        b.syscall(
            libc::SYS_rseq,
            &[imm(r.addr), imm(r.len), imm(0u64), imm(r.sig)],
            format!("rseq register ({who})"),
        );
    }
    // Always, disabled included: the restoring child is a copy of warmstart, whose main
    // thread has an alternate stack of its own (Rust's std installs one); left in place,
    // every `SA_ONSTACK` handler of the app would run on memory the app does not have.
    {
        let mut ss = Vec::with_capacity(24);
        ss.extend_from_slice(&t.sigaltstack.sp.to_le_bytes());
        // The restored thread is not on the alternate stack yet: SS_ONSTACK is state, not a
        // flag. An empty record (size 0, from snapshots older than per-thread stacks) is a
        // disabled stack.
        let flags = if t.sigaltstack.size == 0 {
            libc::SS_DISABLE
        } else {
            t.sigaltstack.flags & !libc::SS_ONSTACK
        };
        ss.extend_from_slice(&(flags as i64).to_le_bytes());
        ss.extend_from_slice(&t.sigaltstack.size.to_le_bytes());
        let d = b.data(&ss);
        b.syscall(
            libc::SYS_sigaltstack,
            &[d.arg(), imm(0u64)],
            format!("sigaltstack ({who})"),
        );
    }
    let mut comm = t.comm.as_bytes().to_vec();
    comm.truncate(15);
    comm.push(0);
    let d = b.data(&comm);
    b.syscall(
        libc::SYS_prctl,
        &[imm(libc::PR_SET_NAME as u64), d.arg()],
        format!("prctl(PR_SET_NAME) ({who})"),
    );
    for info in &t.pending {
        let sig = u32::from_le_bytes(info.0[0..4].try_into().unwrap()) as u64;
        let d = b.data(&info.0);
        b.syscall(
            libc::SYS_rt_tgsigqueueinfo,
            &[imm(p.pid as u32), imm(t.tid as u32), imm(sig), d.arg()],
            format!("queue signal {sig} ({who})"),
        );
    }
    // Credentials are per thread in the kernel; each drops its own, last.
    creds(b, p);
    // After them: a change of credentials clears the parent-death signal. The main
    // thread of a root that is pid 1 again is the sandbox's init, which tied itself to the
    // monitor with SIGKILL: it gets its recorded value back, 0 included (the instance is
    // held to the monitor's life by a warden from then on, see `super::warden`).
    if t.attrs.pdeathsig != 0 || (p.pid == 1 && t.tid == 1) {
        b.syscall(
            libc::SYS_prctl,
            &[
                imm(libc::PR_SET_PDEATHSIG as u64),
                imm(t.attrs.pdeathsig as u32),
            ],
            format!("prctl(PR_SET_PDEATHSIG) ({who})"),
        );
    }
}

/// Takes the snapshot's credentials, last, since everything before needs root. The ids
/// change with `SECBIT_NO_SETUID_FIXUP` so that the capabilities survive them; then, while
/// `CAP_SETPCAP` is still held, the securebits and the bounding set; then the capability
/// sets themselves (which may drop `CAP_SETPCAP`); ambient ones last, since they must be
/// permitted and inheritable already. Root with all its capabilities still goes through
/// it: a root process that dropped some must not get them back.
fn creds(b: &mut ProgramBuilder, p: &Process) {
    let c = &p.creds;
    b.syscall(
        libc::SYS_prctl,
        &[
            imm(libc::PR_SET_SECUREBITS as u64),
            imm(libc::SECBIT_NO_SETUID_FIXUP as u64),
        ],
        "prctl(PR_SET_SECUREBITS, NO_SETUID_FIXUP)",
    );
    let groups: Vec<u8> = c.groups.iter().flat_map(|g| g.to_le_bytes()).collect();
    let g = b.data(&groups);
    b.syscall(
        libc::SYS_setgroups,
        &[imm(c.groups.len() as u64), g.arg()],
        "setgroups",
    );
    b.syscall(
        libc::SYS_setresgid,
        &[imm(c.gid[0]), imm(c.gid[1]), imm(c.gid[2])],
        "setresgid",
    );
    b.syscall(libc::SYS_setfsgid, &[imm(c.gid[3])], "setfsgid");
    b.syscall(
        libc::SYS_setresuid,
        &[imm(c.uid[0]), imm(c.uid[1]), imm(c.uid[2])],
        "setresuid",
    );
    b.syscall(libc::SYS_setfsuid, &[imm(c.uid[3])], "setfsuid");
    b.syscall(
        libc::SYS_prctl,
        &[
            imm(libc::PR_SET_SECUREBITS as u64),
            imm(c.securebits as u64),
        ],
        "prctl(PR_SET_SECUREBITS)",
    );
    for cap in (0..=last_cap()).filter(|&cap| c.cap_bounding & (1 << cap) == 0) {
        b.syscall(
            libc::SYS_prctl,
            &[imm(libc::PR_CAPBSET_DROP as u64), imm(cap as u64)],
            format!("prctl(PR_CAPBSET_DROP, {cap})"),
        );
    }
    // capset(v3): a header {version, pid} and two {effective, permitted, inheritable}.
    const CAP_V3: u32 = 0x2008_0522;
    let words = [
        CAP_V3,
        0,
        c.cap_effective as u32,
        c.cap_permitted as u32,
        c.cap_inheritable as u32,
        (c.cap_effective >> 32) as u32,
        (c.cap_permitted >> 32) as u32,
        (c.cap_inheritable >> 32) as u32,
    ];
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let d = b.data(&bytes);
    b.syscall(
        libc::SYS_capset,
        &[d.arg(), d.at(8)],
        "capset (the snapshot's capabilities)",
    );
    for cap in (0..=last_cap()).filter(|&cap| c.cap_ambient & (1 << cap) != 0) {
        b.syscall(
            libc::SYS_prctl,
            &[
                imm(libc::PR_CAP_AMBIENT as u64),
                imm(libc::PR_CAP_AMBIENT_RAISE as u64),
                imm(cap as u64),
                imm(0u64),
                imm(0u64),
            ],
            format!("prctl(PR_CAP_AMBIENT_RAISE, {cap})"),
        );
    }
}

/// The highest capability number this kernel knows. Cached: called once before the
/// restoring child is cloned (see `restore::prepare`).
pub(crate) fn last_cap() -> u32 {
    static LAST: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *LAST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40)
            .min(63)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use warmstart_parasite::Step;
    use warmstart_snapshots::model::{AltStack, PosixTimer, VmaFlags};

    fn map(start: u64, end: u64, name: &str) -> MapEntry {
        MapEntry {
            start,
            end,
            read: true,
            write: true,
            exec: false,
            shared: false,
            offset: 0,
            dev: (0, 0),
            inode: 0,
            name: name.to_owned(),
            vm_flags: Vec::new(),
        }
    }

    fn anon(start: u64, end: u64, prot: u8) -> Vma {
        Vma {
            start,
            end,
            prot,
            shared: false,
            flags: VmaFlags::default(),
            kind: VmaKind::Anon {
                name: String::new(),
            },
            offset: 0,
            pages: Vec::new(),
        }
    }

    fn thread(tid: i32, alt: AltStack) -> Thread {
        Thread {
            tid,
            comm: "t".into(),
            regs: vec![0; warmstart_snapshots::model::reg::COUNT],
            xsave: Vec::new(),
            sigmask: 0,
            pending: Vec::new(),
            sigaltstack: alt,
            rseq: None,
            robust_list: (0, 0),
            tid_address: 0,
            attrs: Default::default(),
        }
    }

    /// A process with two anonymous areas, two threads (the leader without an alternate
    /// signal stack, the other with one) and an armed POSIX timer.
    fn process() -> Process {
        Process {
            pid: 7,
            ppid: 1,
            pgid: 7,
            sid: 7,
            comm: "app".into(),
            vmas: vec![
                anon(0x10_0000, 0x12_0000, PROT_READ | PROT_WRITE),
                anon(0x20_0000, 0x20_1000, PROT_READ),
                Vma {
                    kind: VmaKind::Vvar,
                    ..anon(0x7f00_0000_0000, 0x7f00_0000_2000, PROT_READ)
                },
                Vma {
                    kind: VmaKind::Vdso,
                    ..anon(0x7f00_0000_2000, 0x7f00_0000_4000, PROT_READ)
                },
            ],
            threads: vec![
                thread(7, AltStack::default()),
                thread(
                    8,
                    AltStack {
                        sp: 0x10_0000,
                        flags: 0,
                        size: 0x2000,
                    },
                ),
            ],
            posix_timers: vec![PosixTimer {
                id: 0,
                clock: libc::CLOCK_MONOTONIC,
                signo: libc::SIGALRM,
                sigval: 0,
                notify: libc::SIGEV_SIGNAL,
                notify_tid: 0,
                interval_ns: 0,
                value_ns: 5_000_000,
            }],
            ..Default::default()
        }
    }

    fn own() -> Vec<MapEntry> {
        vec![
            map(0x5555_0000_0000, 0x5555_0001_0000, "/usr/bin/warmstart"),
            map(0x7fff_f000_0000, 0x7fff_f000_2000, "[vvar]"),
            map(0x7fff_f000_2000, 0x7fff_f000_4000, "[vdso]"),
        ]
    }

    const BASE: u64 = 0x7e00_0000_0000;
    const LEN: u64 = 0x10_0000;

    fn build_steps(
        p: &Process,
        late: Option<&Late>,
    ) -> (ProgramBuilder, Vec<(usize, u64, [u64; 6])>) {
        let fds = ProgramFds {
            vma_fds: vec![None; p.vmas.len()],
            host_vdso_at: None,
            exe_fd: 3,
            premapped: vec![None; p.vmas.len()],
            sysv_rmid: Vec::new(),
        };
        let (b, _, _) = program(p, &own(), &fds, BASE, LEN, &[], late).unwrap();
        let calls = b
            .steps()
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Step::Syscall { nr, args, .. } => {
                    let imm = args.map(|a| match a {
                        Arg::Imm(v) => v,
                        _ => u64::MAX,
                    });
                    Some((i, *nr, imm))
                }
                _ => None,
            })
            .collect();
        (b, calls)
    }

    fn first(calls: &[(usize, u64, [u64; 6])], nr: i64) -> usize {
        calls
            .iter()
            .find(|c| c.1 == nr as u64)
            .unwrap_or_else(|| panic!("no syscall {nr}"))
            .0
    }

    #[test]
    fn warmstart_goes_but_the_blob_and_the_vdso_stay() {
        let (_, calls) = build_steps(&process(), None);
        let unmapped: Vec<(u64, u64)> = calls
            .iter()
            .filter(|c| c.1 == libc::SYS_munmap as u64)
            .map(|c| (c.2[0], c.2[0] + c.2[1]))
            .collect();
        let covered = |a: u64| unmapped.iter().any(|&(s, e)| s <= a && a < e);
        assert!(
            covered(0x5555_0000_0000),
            "warmstart's own mapping is unmapped"
        );
        assert!(!covered(BASE) && !covered(BASE + LEN - 1), "the blob stays");
        assert!(
            !covered(0x7fff_f000_2000),
            "the vdso is moved, not unmapped"
        );
    }

    #[test]
    fn every_area_is_mapped_fixed_where_it_was() {
        let p = process();
        let (_, calls) = build_steps(&p, None);
        for v in p
            .vmas
            .iter()
            .filter(|v| matches!(v.kind, VmaKind::Anon { .. }))
        {
            let m = calls
                .iter()
                .find(|c| c.1 == libc::SYS_mmap as u64 && c.2[0] == v.start)
                .unwrap_or_else(|| panic!("no mmap of {:#x}", v.start));
            assert_eq!(m.2[1], v.len());
            assert_ne!(m.2[3] & libc::MAP_FIXED as u64, 0);
            assert_ne!(m.2[3] & libc::MAP_PRIVATE as u64, 0);
            // Not RELRO: mapped with its own protection at once (the monitor writes
            // read-only memory through /proc/PID/mem).
            assert!(!writable_at_first_trap(v) || v.prot & PROT_WRITE != 0);
            assert_eq!(m.2[2], v.prot as u64, "prot of {:#x}", v.start);
        }
    }

    #[test]
    fn each_thread_gets_its_own_alternate_signal_stack_disabled_included() {
        let (b, calls) = build_steps(&process(), None);
        let n = calls
            .iter()
            .filter(|c| c.1 == libc::SYS_sigaltstack as u64)
            .count();
        assert_eq!(n, 2, "one sigaltstack per thread:\n{b}");
        // The leader's says SS_DISABLE: its `stack_t` is in the data area, so look at
        // the listing's label.
        let text = b.to_string();
        assert!(text.contains("sigaltstack"), "{text}");
    }

    #[test]
    fn timers_are_armed_after_the_threads_exist() {
        let (b, calls) = build_steps(&process(), None);
        let clone = first(&calls, libc::SYS_clone3);
        let create = first(&calls, libc::SYS_timer_create);
        let arm = first(&calls, libc::SYS_timer_settime);
        assert!(
            clone < create && create < arm,
            "clone3 {clone}, timer_create {create}, timer_settime {arm}:\n{b}"
        );
        // ... and the last trap (the monitor loads registers there) comes after them.
        let last_trap = b
            .steps()
            .iter()
            .rposition(|s| matches!(s, Step::Trap))
            .unwrap();
        assert!(arm < last_trap);
    }

    #[test]
    fn a_parked_process_switches_time_namespace_before_creating_threads() {
        let late = Late {
            proc_dir: 9,
            ..Late::default()
        };
        let (b, calls) = build_steps(&process(), Some(&late));
        let setns = first(&calls, libc::SYS_setns);
        let clone = first(&calls, libc::SYS_clone3);
        assert!(setns < clone, "setns {setns} before clone3 {clone}:\n{b}");
        // The plain restore has no late phase: no setns at all.
        let (_, plain) = build_steps(&process(), None);
        assert!(plain.iter().all(|c| c.1 != libc::SYS_setns as u64));
    }

    #[test]
    fn timens_text_is_fixed_width() {
        for (m, b) in [
            (0, 0),
            (-1, 1),
            (i64::MAX, i64::MIN + 1),
            (-1_500_000_000, 7),
        ] {
            assert_eq!(timens_text(m, b).len(), TIMENS_TEXT_LEN, "{m} {b}");
        }
        assert_eq!(
            String::from_utf8(timens_text(-1_500_000_000, 2_000_000_001)).unwrap(),
            "monotonic -00000000000000000002 500000000\nboottime 000000000000000000002 000000001\n"
        );
    }
}
