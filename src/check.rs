//! `warmstart check`: probe, by trying, every kernel feature warmstart relies on.
//!
//! Probes that could disturb this process (namespaces, prctl on the mm, seccomp, vdso
//! moves) run in a forked child that reports back over a pipe.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::sys::pagemap_scan;
use crate::sys::pidfd;
use crate::sys::uffd::{Features, Uffd, UffdFlags};

/// One probed feature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub required: bool,
    /// What was found; when missing, also what breaks without it.
    pub detail: String,
}

/// Facts about the host printed above the checks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostFacts {
    pub kernel: String,
    /// XSAVE area size for the enabled features (CPUID 0xD.0 EBX), if XSAVE exists.
    pub xsave_size: Option<u32>,
    /// XCR0 via `xgetbv(0)`, if the OS enabled XSAVE (OSXSAVE).
    pub xcr0: Option<u64>,
}

type Probe = Result<String, String>;

fn push(out: &mut Vec<Check>, name: &str, required: bool, breaks: &str, r: Probe) {
    let (ok, detail) = match r {
        Ok(d) => (true, d),
        Err(e) => (false, format!("{e}; without it: {breaks}")),
    };
    out.push(Check {
        name: name.to_string(),
        ok,
        required,
        detail,
    });
}

fn errno_str(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn sys(r: libc::c_long, what: &str) -> Result<libc::c_long, String> {
    if r < 0 {
        Err(errno_str(what))
    } else {
        Ok(r)
    }
}

/// Runs `f` in a forked child and returns its result (10 s timeout; the child is killed
/// then). The child must not rely on other threads of this process.
fn in_child(f: impl FnOnce() -> Probe) -> Probe {
    let mut fds = [0; 2];
    // SAFETY: valid array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(errno_str("pipe2"));
    }
    // SAFETY: fresh descriptors we own.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child only runs `f`, writes the pipe and _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(errno_str("fork"));
    }
    if pid == 0 {
        drop(rd);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .unwrap_or_else(|_| Err("probe panicked".into()));
        let msg = match r {
            Ok(s) => format!("O{s}"),
            Err(s) => format!("E{s}"),
        };
        // SAFETY: writing a valid buffer, then leaving without destructors.
        unsafe {
            libc::write(wr.as_raw_fd(), msg.as_ptr().cast(), msg.len());
            libc::_exit(0);
        }
    }
    drop(wr);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut file = std::fs::File::from(rd);
    let mut buf = Vec::new();
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, left.as_millis() as i32) };
        if r == 0 {
            timed_out = true;
            break;
        }
        if r < 0 {
            continue; // EINTR
        }
        let mut chunk = [0u8; 4096];
        match file.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if timed_out {
        // SAFETY: our child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let mut st = 0;
    // SAFETY: reaping our child.
    unsafe { libc::waitpid(pid, &mut st, libc::__WALL) };
    let s = String::from_utf8_lossy(&buf).into_owned();
    match s.split_at_checked(1) {
        Some(("O", rest)) => Ok(rest.to_string()),
        Some(("E", rest)) => Err(rest.to_string()),
        _ if timed_out => Err("probe timed out".into()),
        _ => Err(format!("probe child died (wait status {st:#x})")),
    }
}

/// A forked child that just waits in `pause()`; killed and reaped on drop.
struct Sleeper(libc::pid_t);

impl Sleeper {
    fn spawn() -> Result<Self, String> {
        // SAFETY: the child only loops in pause().
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(errno_str("fork"));
        }
        if pid == 0 {
            loop {
                // SAFETY: async-signal-safe.
                unsafe { libc::pause() };
            }
        }
        Ok(Self(pid))
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        // SAFETY: our child.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
            libc::waitpid(self.0, std::ptr::null_mut(), libc::__WALL);
        }
    }
}

const PTRACE_SEIZE: libc::c_uint = 0x4206;
const PTRACE_INTERRUPT: libc::c_uint = 0x4207;
const PTRACE_GETREGSET: libc::c_uint = 0x4204;
const PTRACE_SETOPTIONS: libc::c_uint = 0x4200;
const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
const PTRACE_O_SUSPEND_SECCOMP: libc::c_long = 1 << 21;
const PTRACE_EVENT_STOP: i32 = 128;
const NT_X86_XSTATE: libc::c_long = 0x202;

fn ptrace(req: libc::c_uint, pid: libc::pid_t, addr: usize, data: usize) -> libc::c_long {
    // SAFETY: callers pass addresses of live buffers as `addr`/`data` where needed.
    unsafe { libc::ptrace(req, pid, addr, data) }
}

fn probe_ptrace(out: &mut Vec<Check>) {
    const WHY: &str = "cannot stop and inspect the process to dump it";
    let names = [
        ("ptrace-seize", true, WHY),
        (
            "ptrace-xstate",
            true,
            "FPU/AVX registers cannot be dumped (NT_X86_XSTATE)",
        ),
        (
            "ptrace-suspend-seccomp",
            true,
            "seccomp-filtered processes cannot be dumped/restored",
        ),
        (
            "ptrace-rseq-config",
            true,
            "rseq registrations cannot be dumped; restored glibc threads may crash",
        ),
        (
            "ptrace-sigmask",
            true,
            "blocked-signal masks cannot be dumped",
        ),
    ];
    let child = match Sleeper::spawn() {
        Ok(c) => c,
        Err(e) => {
            for (n, req, why) in names {
                push(out, n, req, why, Err(e.clone()));
            }
            return;
        }
    };
    let pid = child.0;
    let seize = (|| {
        sys(ptrace(PTRACE_SEIZE, pid, 0, 0), "PTRACE_SEIZE")?;
        sys(ptrace(PTRACE_INTERRUPT, pid, 0, 0), "PTRACE_INTERRUPT")?;
        let mut st = 0;
        // SAFETY: waiting for our tracee.
        let r = unsafe { libc::waitpid(pid, &mut st, libc::__WALL) };
        if r != pid || !libc::WIFSTOPPED(st) || (st >> 16) != PTRACE_EVENT_STOP {
            return Err(format!("unexpected wait status {st:#x}"));
        }
        Ok("PTRACE_SEIZE + PTRACE_INTERRUPT stopped a child (group-stop event)".to_string())
    })();
    let seized = seize.is_ok();
    push(out, names[0].0, names[0].1, names[0].2, seize);
    let need_seize = || -> Probe { Err("not probed: PTRACE_SEIZE failed".into()) };

    let xstate = if !seized {
        need_seize()
    } else {
        let mut buf = vec![0u8; 64 * 1024];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        sys(
            ptrace(
                PTRACE_GETREGSET,
                pid,
                NT_X86_XSTATE as usize,
                &mut iov as *mut _ as usize,
            ),
            "PTRACE_GETREGSET NT_X86_XSTATE",
        )
        .map(|_| format!("NT_X86_XSTATE: {} bytes", iov.iov_len))
    };
    push(out, names[1].0, names[1].1, names[1].2, xstate);

    let seccomp = if !seized {
        need_seize()
    } else {
        sys(
            ptrace(PTRACE_SETOPTIONS, pid, 0, PTRACE_O_SUSPEND_SECCOMP as usize),
            "PTRACE_SETOPTIONS(PTRACE_O_SUSPEND_SECCOMP)",
        )
        .map(|_| "PTRACE_O_SUSPEND_SECCOMP accepted".to_string())
    };
    push(out, names[2].0, names[2].1, names[2].2, seccomp);

    let rseq = if !seized {
        need_seize()
    } else {
        let mut conf = [0u64; 4];
        sys(
            ptrace(
                PTRACE_GET_RSEQ_CONFIGURATION,
                pid,
                size_of_val(&conf),
                conf.as_mut_ptr() as usize,
            ),
            "PTRACE_GET_RSEQ_CONFIGURATION",
        )
        .map(|n| {
            format!(
                "{n} bytes; rseq area {:#x}, len {}",
                conf[0], conf[1] as u32
            )
        })
    };
    push(out, names[3].0, names[3].1, names[3].2, rseq);

    let sigmask = if !seized {
        need_seize()
    } else {
        let mut mask = 0u64;
        sys(
            ptrace(PTRACE_GETSIGMASK, pid, 8, &mut mask as *mut u64 as usize),
            "PTRACE_GETSIGMASK",
        )
        .map(|_| format!("mask {mask:#x}"))
    };
    push(out, names[4].0, names[4].1, names[4].2, sigmask);

    // /proc/PID/pagemap of another process, while we have one.
    let pagemap = (|| {
        let f = std::fs::File::open(format!("/proc/{pid}/pagemap"))
            .map_err(|e| format!("open /proc/{pid}/pagemap: {e}"))?;
        // The child is a fork of us: this stack page is present there too.
        let probe_var = 0u64;
        let vaddr = &probe_var as *const u64 as u64;
        let mut ent = [0u8; 8];
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut ent, vaddr / 4096 * 8)
            .map_err(|e| format!("read pagemap: {e}"))?;
        let e = u64::from_ne_bytes(ent);
        if e >> 63 & 1 == 1 && e & ((1 << 55) - 1) != 0 {
            Ok("present page with PFN visible".to_string())
        } else if e >> 63 & 1 == 1 {
            Ok("present page, PFN hidden".to_string())
        } else {
            Err(format!("stack page not reported present ({e:#x})"))
        }
    })();
    push(
        out,
        "proc-pagemap",
        true,
        "cannot find which pages to dump",
        pagemap,
    );
    drop(child);
}

fn probe_uffd(out: &mut Vec<Check>) {
    const WHY: &str = "no lazy restore (all memory copied before the app resumes)";
    let via_sys = Uffd::new_syscall(UffdFlags::CLOEXEC | UffdFlags::NONBLOCK);
    let via_dev = Uffd::new_dev(UffdFlags::CLOEXEC | UffdFlags::NONBLOCK);
    let detail = match (&via_sys, &via_dev) {
        (Ok(_), Ok(_)) => Ok("userfaultfd() and /dev/userfaultfd".to_string()),
        (Ok(_), Err(e)) => Ok(format!("userfaultfd() ({e})")),
        (Err(e), Ok(_)) => Ok(format!("/dev/userfaultfd ({e})")),
        (Err(a), Err(b)) => Err(format!("{a}; {b}")),
    };
    let avail = detail.is_ok();
    push(out, "userfaultfd", true, WHY, detail);
    let feats: [(&str, Features, bool, &str); 10] = [
        (
            "EVENT_FORK",
            Features::EVENT_FORK,
            true,
            "lazy restore of forking apps",
        ),
        (
            "EVENT_REMAP",
            Features::EVENT_REMAP,
            true,
            "mremap during lazy restore serves wrong addresses",
        ),
        (
            "EVENT_REMOVE",
            Features::EVENT_REMOVE,
            true,
            "MADV_DONTNEED'd memory would be refilled with stale snapshot data",
        ),
        (
            "EVENT_UNMAP",
            Features::EVENT_UNMAP,
            true,
            "munmap during lazy restore goes unnoticed",
        ),
        (
            "MISSING_SHMEM",
            Features::MISSING_SHMEM,
            false,
            "shared memory cannot be restored lazily",
        ),
        (
            "THREAD_ID",
            Features::THREAD_ID,
            false,
            "working-set recording cannot attribute faults to threads",
        ),
        (
            "MOVE",
            Features::MOVE,
            false,
            "pages are copied instead of moved",
        ),
        (
            "POISON",
            Features::POISON,
            false,
            "unreadable snapshot pages cannot be poisoned",
        ),
        (
            "WP_ASYNC",
            Features::WP_ASYNC,
            false,
            "no incremental (dirty-tracking) dumps",
        ),
        (
            "EXACT_ADDRESS",
            Features::EXACT_ADDRESS,
            false,
            "fault addresses only page-precise",
        ),
    ];
    let want = feats.iter().fold(Features::empty(), |a, f| a | f.1);
    let reported = if avail {
        Uffd::probe().map_err(|e| e.to_string())
    } else {
        Err("no userfaultfd".to_string())
    };
    // Enable, for real, every offered feature among those we use.
    let enabled = reported.as_ref().map_err(Clone::clone).and_then(|info| {
        let u = Uffd::new(UffdFlags::CLOEXEC | UffdFlags::NONBLOCK).map_err(|e| e.to_string())?;
        let req = info.features & want;
        u.api(req).map_err(|e| e.to_string())?;
        Ok(req)
    });
    for (name, f, required, why) in feats {
        let r = match &enabled {
            Ok(en) if en.contains(f) => Ok("reported by UFFDIO_API and enabled".to_string()),
            Ok(_) => Err("not reported by UFFDIO_API".to_string()),
            Err(e) => Err(e.clone()),
        };
        push(out, &format!("uffd-{name}"), required, why, r);
    }
}

use warmstart_launcher::sys::CloneArgs;

/// Raw clone3 without a new stack (fork-like); the child must stick to raw syscalls.
fn clone3(args: &CloneArgs) -> libc::c_long {
    // SAFETY: fork semantics (no CLONE_VM): the child of this single-threaded probe child
    // runs only raw syscalls and exits.
    unsafe { warmstart_launcher::sys::clone3(args) }
}

fn raw_exit(code: i32) -> ! {
    // SAFETY: terminates this (single-threaded) child.
    unsafe {
        libc::syscall(libc::SYS_exit_group, code);
    }
    unreachable!()
}

fn raw_wait(pid: libc::c_long) -> i32 {
    let mut st = 0;
    // SAFETY: valid pointer.
    unsafe {
        libc::syscall(
            libc::SYS_wait4,
            pid,
            &mut st as *mut i32,
            libc::__WALL,
            0usize,
        )
    };
    st
}

fn probe_clone3_set_tid() -> Probe {
    const WANT: i32 = 4242;
    in_child(|| {
        let a = CloneArgs {
            flags: libc::CLONE_NEWPID as u64,
            exit_signal: libc::SIGCHLD as u64,
            ..Default::default()
        };
        let pid = sys(clone3(&a), "clone3(CLONE_NEWPID)")?;
        if pid == 0 {
            // pid 1 of the new namespace.
            // SAFETY: raw getpid.
            if unsafe { libc::syscall(libc::SYS_getpid) } != 1 {
                raw_exit(10);
            }
            let tid = [WANT];
            let b = CloneArgs {
                exit_signal: libc::SIGCHLD as u64,
                set_tid: tid.as_ptr() as u64,
                set_tid_size: 1,
                ..Default::default()
            };
            let r = clone3(&b);
            if r == 0 {
                // SAFETY: raw getpid.
                let me = unsafe { libc::syscall(libc::SYS_getpid) };
                raw_exit(if me == WANT as i64 { 0 } else { 12 });
            }
            if r < 0 {
                raw_exit(11);
            }
            let st = raw_wait(r);
            raw_exit(if r == WANT as i64 && libc::WIFEXITED(st) {
                libc::WEXITSTATUS(st)
            } else {
                13
            });
        }
        let st = raw_wait(pid);
        match (libc::WIFEXITED(st), libc::WEXITSTATUS(st)) {
            (true, 0) => Ok(format!("pid 1 in a new pid namespace, then set_tid={WANT}")),
            (true, 10) => Err("first child of CLONE_NEWPID is not pid 1".into()),
            (true, 11) => Err("clone3 with set_tid failed inside the namespace".into()),
            (true, c) => Err(format!("set_tid not honoured (code {c})")),
            _ => Err(format!("namespace child died (status {st:#x})")),
        }
    })
}

fn probe_pidfd() -> (Probe, Probe) {
    let open = pidfd::pidfd_open(std::process::id() as i32, 0);
    let open_r = open
        .as_ref()
        .map(|_| "pidfd_open(self)".to_string())
        .map_err(|e| format!("pidfd_open: {e}"));
    let getfd = match &open {
        Ok(pfd) => pidfd::pidfd_getfd(pfd, pfd.as_raw_fd())
            .map(|_| "pidfd_getfd of own descriptor".to_string())
            .map_err(|e| format!("pidfd_getfd: {e}")),
        Err(_) => Err("not probed: pidfd_open failed".to_string()),
    };
    (open_r, getfd)
}

fn probe_pagemap_scan() -> Probe {
    let len = 4 * 4096;
    // SAFETY: anonymous mapping, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(errno_str("mmap"));
    }
    let base = p as u64;
    // SAFETY: in-bounds writes to our mapping.
    unsafe {
        (p as *mut u8).write_volatile(1);
        (p as *mut u8).add(2 * 4096).write_volatile(1);
    }
    let r = (|| {
        let f = std::fs::File::open("/proc/self/pagemap").map_err(|e| e.to_string())?;
        let q = pagemap_scan::Query {
            mask: pagemap_scan::PAGE_IS_PRESENT,
            ret: pagemap_scan::PAGE_IS_PRESENT,
            ..Default::default()
        };
        let regions = pagemap_scan::scan(&f, base, base + len as u64, q)
            .map_err(|e| format!("ioctl(PAGEMAP_SCAN): {e}"))?;
        let got: Vec<(u64, u64)> = regions
            .iter()
            .map(|r| ((r.start - base) / 4096, (r.end - base) / 4096))
            .collect();
        if got == [(0, 1), (2, 3)] {
            Ok("found exactly the 2 touched pages".to_string())
        } else {
            Err(format!("unexpected regions {got:?}"))
        }
    })();
    // SAFETY: our mapping.
    unsafe { libc::munmap(p, len) };
    r
}

const PR_SET_MM: i32 = 35;
const PR_SET_MM_MAP: libc::c_ulong = 14;
const PR_SET_MM_MAP_SIZE: libc::c_ulong = 15;

#[repr(C)]
struct PrctlMmMap {
    start_code: u64,
    end_code: u64,
    start_data: u64,
    end_data: u64,
    start_brk: u64,
    brk: u64,
    start_stack: u64,
    arg_start: u64,
    arg_end: u64,
    env_start: u64,
    env_end: u64,
    auxv: u64,
    auxv_size: u32,
    exe_fd: u32,
}
const _: () = assert!(size_of::<PrctlMmMap>() == 104);

/// Fields 1-based as in proc(5), from `/proc/self/stat` text.
fn stat_field(stat: &str, n: usize) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}

fn probe_prctl_mm_map() -> Probe {
    in_child(|| {
        let mut size: u32 = 0;
        // SAFETY: PR_SET_MM_MAP_SIZE writes an unsigned int.
        let r = unsafe { libc::prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE, &mut size as *mut u32, 0, 0) };
        if r < 0 {
            return Err(errno_str("PR_SET_MM_MAP_SIZE"));
        }
        if size as usize != size_of::<PrctlMmMap>() {
            return Err(format!("prctl_mm_map size {size}, expected 104"));
        }
        let stat = std::fs::read_to_string("/proc/self/stat").map_err(|e| e.to_string())?;
        let f = |n| stat_field(&stat, n).ok_or(format!("/proc/self/stat field {n}"));
        let auxv = std::fs::read("/proc/self/auxv").map_err(|e| e.to_string())?;
        // SAFETY: brk(0) queries the current break.
        let brk = unsafe { libc::syscall(libc::SYS_brk, 0usize) } as u64;
        let map = PrctlMmMap {
            start_code: f(26)?,
            end_code: f(27)?,
            start_stack: f(28)?,
            start_data: f(45)?,
            end_data: f(46)?,
            start_brk: f(47)?,
            brk,
            arg_start: f(48)?,
            arg_end: f(49)?,
            env_start: f(50)?,
            env_end: f(51)?,
            auxv: auxv.as_ptr() as u64,
            auxv_size: auxv.len() as u32,
            exe_fd: u32::MAX,
        };
        // SAFETY: valid struct of the size we pass.
        let r = unsafe {
            libc::prctl(
                PR_SET_MM,
                PR_SET_MM_MAP,
                &map as *const PrctlMmMap,
                size as libc::c_ulong,
                0,
            )
        };
        if r < 0 {
            return Err(errno_str("PR_SET_MM_MAP with current values"));
        }
        Ok(format!(
            "PR_SET_MM_MAP accepted (size {size}, auxv {} bytes)",
            auxv.len()
        ))
    })
}

const KCMP_FILE: i32 = 0;

fn probe_kcmp() -> Probe {
    // SAFETY: plain syscalls on our own descriptors.
    unsafe {
        let fd = libc::dup(0);
        let fd = if fd < 0 {
            libc::open(c"/".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC)
        } else {
            fd
        };
        if fd < 0 {
            return Err(errno_str("open"));
        }
        let other = libc::open(c"/".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        let dup = libc::dup(fd);
        let pid = libc::getpid();
        let same = libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, fd, dup);
        let diff = libc::syscall(libc::SYS_kcmp, pid, pid, KCMP_FILE, fd, other);
        let err = errno_str("kcmp(KCMP_FILE)");
        for d in [fd, other, dup] {
            libc::close(d);
        }
        match (same, diff) {
            (0, d) if d > 0 => Ok("KCMP_FILE tells dup'ed from distinct files".into()),
            (s, _) if s < 0 => Err(err),
            (s, d) => Err(format!("unexpected kcmp results {s}, {d}")),
        }
    }
}

fn probe_process_vm_readv() -> Probe {
    let src = *b"warmstart!";
    let mut dst = [0u8; 10];
    let local = libc::iovec {
        iov_base: dst.as_mut_ptr().cast(),
        iov_len: dst.len(),
    };
    let remote = libc::iovec {
        iov_base: src.as_ptr() as *mut _,
        iov_len: src.len(),
    };
    // SAFETY: valid iovecs over live buffers.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(errno_str("process_vm_readv"));
    }
    if dst == src {
        Ok(format!("read {n} bytes"))
    } else {
        Err("data mismatch".into())
    }
}

fn cap_eff() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let v = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(v.trim(), 16).ok()
}

/// The capabilities a checkpoint or a restore needs, by name: namespaces and mounts
/// (`CAP_SYS_ADMIN`), seizing and reading other processes (`CAP_SYS_PTRACE`), chosen pids
/// and process-state setters (`CAP_CHECKPOINT_RESTORE`).
const NEEDED_CAPS: [(u32, &str); 3] = [
    (21, "CAP_SYS_ADMIN"),
    (19, "CAP_SYS_PTRACE"),
    (40, "CAP_CHECKPOINT_RESTORE"),
];

/// Fails, saying what is missing and what to do, unless this process holds every
/// capability `command` (e.g. "run") needs.
pub fn require_privileges(command: &str) -> anyhow::Result<()> {
    let caps = cap_eff().unwrap_or(0);
    let missing: Vec<&str> = NEEDED_CAPS
        .iter()
        .filter(|(c, _)| caps >> c & 1 == 0)
        .map(|(_, n)| *n)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    anyhow::bail!(
        "`warmstart {command}` needs root (or {}), and this process (uid {uid}) lacks {}: \
         run it as root (e.g. with sudo); `warmstart check` shows what this host and user \
         can do",
        NEEDED_CAPS.map(|(_, n)| n).join(" + "),
        missing.join(", ")
    )
}

fn probe_caps() -> Probe {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_CHECKPOINT_RESTORE: u32 = 40;
    // SAFETY: no preconditions.
    let uid = unsafe { libc::geteuid() };
    let caps = cap_eff().unwrap_or(0);
    let has = |c: u32| caps >> c & 1 == 1;
    if uid == 0 && has(CAP_SYS_ADMIN) {
        Ok(format!("root (CapEff {caps:#x})"))
    } else if has(CAP_CHECKPOINT_RESTORE) {
        Ok(format!("CAP_CHECKPOINT_RESTORE (CapEff {caps:#x})"))
    } else {
        Err(format!("uid {uid}, CapEff {caps:#x}"))
    }
}

const SECCOMP_SET_MODE_FILTER: u32 = 1;
const SECCOMP_GET_ACTION_AVAIL: u32 = 2;
const SECCOMP_RET_TRACE: u32 = 0x7ff0_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;

fn probe_seccomp() -> Probe {
    let act = SECCOMP_RET_TRACE;
    // SAFETY: pointer to a u32.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_GET_ACTION_AVAIL,
            0,
            &act as *const u32,
        )
    };
    sys(r, "SECCOMP_GET_ACTION_AVAIL(RET_TRACE)")?;
    in_child(|| {
        let filter = [libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ALLOW,
        }];
        let prog = libc::sock_fprog {
            len: 1,
            filter: filter.as_ptr() as *mut _,
        };
        // SAFETY: valid program; affects only this child.
        let r = unsafe {
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
            libc::syscall(
                libc::SYS_seccomp,
                SECCOMP_SET_MODE_FILTER,
                0,
                &prog as *const libc::sock_fprog,
            )
        };
        sys(r, "SECCOMP_SET_MODE_FILTER")?;
        Ok("filters install; SECCOMP_RET_TRACE available".to_string())
    })
}

const PR_TIMER_CREATE_RESTORE_IDS: i32 = 77;
const PR_TIMER_CREATE_RESTORE_IDS_GET: libc::c_ulong = 2;

fn probe_timer_ids() -> Probe {
    // SAFETY: GET only reads the current mode.
    let r = unsafe {
        libc::prctl(
            PR_TIMER_CREATE_RESTORE_IDS,
            PR_TIMER_CREATE_RESTORE_IDS_GET,
            0,
            0,
            0,
        )
    };
    sys(r as libc::c_long, "prctl(PR_TIMER_CREATE_RESTORE_IDS, GET)")
        .map(|v| format!("supported (mode {v})"))
}

fn probe_namespaces() -> Probe {
    in_child(|| {
        // SAFETY: affects only this child.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWPID) };
        sys(r as libc::c_long, "unshare(CLONE_NEWNS|CLONE_NEWPID)")?;
        // SAFETY: valid C strings; private propagation in our own mount namespace.
        let r = unsafe {
            libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        };
        sys(
            r as libc::c_long,
            "mount(MS_PRIVATE) in the new mount namespace",
        )?;
        // SAFETY: a mount of our own in the private namespace.
        let r = unsafe {
            libc::mount(
                c"none".as_ptr(),
                c"/tmp".as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        sys(r as libc::c_long, "mount tmpfs in the new mount namespace")?;
        Ok("mount + pid namespaces (unshare, mount)".to_string())
    })
}

fn probe_vdso_mremap() -> Probe {
    in_child(|| {
        let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| e.to_string())?;
        let layout = crate::sys::vdso::vdso_layout(&maps);
        if !layout.iter().any(|m| m.2 == "[vdso]") {
            return Err("no [vdso] mapping".into());
        }
        let lo = layout.iter().map(|m| m.0).min().unwrap_or(0);
        let hi = layout.iter().map(|m| m.1).max().unwrap_or(0);
        let span = (hi - lo) as usize;
        // Reserve a destination span, then move each mapping keeping relative offsets.
        // SAFETY: fresh reservation in this child.
        let dst = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if dst == libc::MAP_FAILED {
            return Err(errno_str("mmap"));
        }
        let dst = dst as u64;
        for (a, b, name) in &layout {
            let len = (b - a) as usize;
            // SAFETY: moving a whole special mapping inside this child only.
            let r = unsafe {
                libc::mremap(
                    *a as *mut _,
                    len,
                    len,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    (dst + (a - lo)) as *mut libc::c_void,
                )
            };
            if r == libc::MAP_FAILED {
                return Err(errno_str(&format!("mremap {name}")));
            }
        }
        let after = std::fs::read_to_string("/proc/self/maps").map_err(|e| e.to_string())?;
        let moved = crate::sys::vdso::vdso_layout(&after);
        let want: Vec<_> = layout
            .iter()
            .map(|(a, b, n)| (a - lo + dst, b - lo + dst, n.clone()))
            .collect();
        if moved != want {
            return Err(format!("layout after move {moved:?}, expected {want:?}"));
        }
        let names: Vec<_> = layout
            .iter()
            .map(|m| format!("{} {}p", m.2, (m.1 - m.0) / 4096))
            .collect();
        Ok(format!(
            "moved {} (calls through the moved vDSO not probed)",
            names.join(", ")
        ))
    })
}

/// Runs every probe.
pub fn probe_all() -> Vec<Check> {
    let mut out = Vec::new();
    probe_ptrace(&mut out);
    probe_uffd(&mut out);
    push(
        &mut out,
        "clone3-set-tid",
        true,
        "restored processes cannot get their original pids/tids",
        probe_clone3_set_tid(),
    );
    let (open, getfd) = probe_pidfd();
    push(
        &mut out,
        "pidfd_open",
        true,
        "race-free process handles",
        open,
    );
    push(
        &mut out,
        "pidfd_getfd",
        true,
        "the monitor cannot take the restored child's userfaultfd",
        getfd,
    );
    push(
        &mut out,
        "pagemap-scan",
        false,
        "no incremental dumps (WP_ASYNC + PAGEMAP_SCAN); slower page discovery",
        probe_pagemap_scan(),
    );
    push(
        &mut out,
        "prctl-mm-map",
        true,
        "cannot restore mm layout (code/data/brk/stack/args/env/auxv)",
        probe_prctl_mm_map(),
    );
    push(
        &mut out,
        "kcmp",
        true,
        "cannot detect shared files/mm/fs between tasks",
        probe_kcmp(),
    );
    push(
        &mut out,
        "process_vm_readv",
        true,
        "cannot read memory of the dumped process",
        probe_process_vm_readv(),
    );
    push(
        &mut out,
        "cap-checkpoint-restore",
        true,
        "no privilege for set_tid, PR_SET_MM exe, pagemap PFNs",
        probe_caps(),
    );
    push(
        &mut out,
        "seccomp",
        true,
        "seccomp filters cannot be restored",
        probe_seccomp(),
    );
    push(
        &mut out,
        "timer-restore-ids",
        false,
        "POSIX timers get new ids on restore",
        probe_timer_ids(),
    );
    push(
        &mut out,
        "namespaces",
        true,
        "no isolated mount/pid namespaces for restored instances",
        probe_namespaces(),
    );
    push(
        &mut out,
        "vdso-mremap",
        false,
        "the vDSO cannot be moved to the snapshot's address",
        probe_vdso_mremap(),
    );
    out
}

/// Kernel release, XSAVE size and XCR0.
pub fn host_facts() -> HostFacts {
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "?".into());
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        // SAFETY: cpuid is always available on x86_64 (safe fn on newer toolchains).
        #[allow(unused_unsafe)]
        let l1 = unsafe { __cpuid(1) };
        let xsave = l1.ecx >> 26 & 1 == 1;
        let osxsave = l1.ecx >> 27 & 1 == 1;
        // SAFETY: leaf 0xD exists when XSAVE is supported.
        #[allow(unused_unsafe)]
        let xsave_size = xsave.then(|| unsafe { __cpuid_count(0xd, 0) }.ebx);
        let xcr0 = osxsave.then(crate::sys::vdso::xcr0);
        HostFacts {
            kernel,
            xsave_size,
            xcr0,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    HostFacts {
        kernel,
        xsave_size: None,
        xcr0: None,
    }
}

/// Human-readable report.
pub fn render_human(checks: &[Check], host: &HostFacts) -> String {
    let opt = |v: Option<String>| v.unwrap_or_else(|| "n/a".into());
    let mut s = format!(
        "host: kernel {}, xsave {} bytes, XCR0 {}\n",
        host.kernel,
        opt(host.xsave_size.map(|v| v.to_string())),
        opt(host.xcr0.map(|v| format!("{v:#x}"))),
    );
    let w = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in checks {
        let status = if c.ok { "ok" } else { "MISSING" };
        let opt = if c.required { "" } else { " (optional)" };
        s.push_str(&format!("{status:<7}  {:<w$}  {}{opt}\n", c.name, c.detail));
    }
    s
}

/// JSON report: an array of `{name, ok, required, detail}`.
pub fn render_json(checks: &[Check]) -> serde_json::Value {
    serde_json::to_value(checks).unwrap_or_default()
}

/// Whether every required check passed.
pub fn all_required_ok(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.ok || !c.required)
}

/// `warmstart check`: prints the report; true when every required feature is present.
pub fn run(json: bool) -> anyhow::Result<bool> {
    let checks = probe_all();
    if json {
        println!("{}", serde_json::to_string_pretty(&render_json(&checks))?);
    } else {
        print!("{}", render_human(&checks, &host_facts()));
    }
    Ok(all_required_ok(&checks))
}

/// `check --snapshot`: whether this host can run `snap`, aspect by aspect (its vdso,
/// its CPU, the files it uses); true if it can.
pub fn snapshot(snap: &warmstart_snapshots::store::Snapshot, json: bool) -> anyhow::Result<bool> {
    use crate::restore::checks;
    let m = &snap.manifest;
    let here = crate::sys::vdso::host_facts(m.host.xsave_size)?;
    let vdso = if here.vdso_hash == m.host.vdso_hash {
        Ok("the same vdso".to_owned())
    } else {
        checks::vdso_proxy_entries(&m.host, &here).map(|e| {
            format!(
                "another vdso (kernel {} here, {} there): its {} entries are sent to this \
                 host's",
                here.kernel_release,
                m.host.kernel_release,
                e.len()
            )
        })
    };
    let cpu = checks::cpu(&m.host, &here).map(|()| {
        let layout = if checks::same_xsave_layout(&m.host) {
            "the same xsave layout".to_owned()
        } else {
            format!(
                "xsave state moved from XCR0 {:#x} to this CPU's {:#x}",
                m.host.xsave_features, here.xsave_features
            )
        };
        let seen = match &m.host.cpu_baseline {
            Some(b) => format!("the app could see (recorded with --cpu-baseline {b})"),
            None => "the snapshot's CPU had".to_owned(),
        };
        format!(
            "all {} CPU features {seen}; {layout}",
            m.host.cpu_features.len()
        )
    });
    let files = checks::unchanged_files(m).map(|()| "unchanged".to_owned());
    let aspects = [("kernel", vdso), ("cpu", cpu), ("files", files)];
    let ok = aspects.iter().all(|(_, r)| r.is_ok());
    if json {
        let mut o = serde_json::Map::new();
        o.insert("snapshot".into(), snap.id.to_hex().into());
        o.insert("runnable".into(), ok.into());
        for (k, r) in &aspects {
            let v = match r {
                Ok(s) => serde_json::json!({"ok": true, "detail": s}),
                Err(e) => serde_json::json!({"ok": false, "detail": format!("{e:#}")}),
            };
            o.insert((*k).into(), v);
        }
        println!("{}", serde_json::to_string_pretty(&o)?);
    } else {
        println!("snapshot {} on this host:", snap.id.short());
        for (k, r) in &aspects {
            match r {
                Ok(s) => println!("  {k:<7} ok: {s}"),
                Err(e) => println!("  {k:<7} NO: {e:#}"),
            }
        }
        println!(
            "{}",
            if ok {
                "it can run here"
            } else {
                "it cannot run here"
            }
        );
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields() {
        let s = "42 (a b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25";
        assert_eq!(stat_field(s, 4), Some(1));
        assert_eq!(stat_field(s, 28), Some(25));
        assert_eq!(stat_field(s, 29), None);
    }

    #[test]
    fn child_reports() {
        assert_eq!(in_child(|| Ok("x".into())), Ok("x".to_string()));
        assert_eq!(in_child(|| Err("y".into())), Err("y".to_string()));
    }

    #[test]
    fn required_checks_pass_here_and_json_shape() {
        let checks = probe_all();
        let failed: Vec<_> = checks.iter().filter(|c| c.required && !c.ok).collect();
        assert!(failed.is_empty(), "{failed:#?}");
        assert!(all_required_ok(&checks));
        let v = render_json(&checks);
        let arr = v.as_array().unwrap();
        assert_eq!(arr.len(), checks.len());
        for o in arr {
            let o = o.as_object().unwrap();
            let mut keys: Vec<_> = o.keys().map(String::as_str).collect();
            keys.sort();
            assert_eq!(keys, ["detail", "name", "ok", "required"]);
            assert!(o["ok"].is_boolean() && o["required"].is_boolean());
        }
        let human = render_human(&checks, &host_facts());
        assert_eq!(human.lines().count(), checks.len() + 1);
        eprintln!("{human}");
    }

    #[test]
    fn host_facts_here() {
        let h = host_facts();
        assert!(!h.kernel.is_empty());
        assert!(h.xsave_size.unwrap_or(0) >= 576);
        assert_eq!(h.xcr0.unwrap_or(0) & 3, 3);
    }
}
