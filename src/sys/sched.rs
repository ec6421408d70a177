//! Per-thread scheduling attributes of any thread, read and set from outside:
//! `sched_getattr`/`sched_setattr`, `ioprio_get`/`ioprio_set`, the timer slack
//! (`/proc/TID/timerslack_ns`) and the CPU affinity (`sched_getaffinity`).

use std::io;

use warmstart_snapshots::model::{ThreadAttrs, CPU_MASK_WORDS};

type CpuMask = [u64; CPU_MASK_WORDS];

/// The online CPUs of this host (`/sys/devices/system/cpu/online`: `0-3,6`).
fn online_cpus() -> io::Result<CpuMask> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online")?;
    let mut mask = [0u64; CPU_MASK_WORDS];
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (
            a.parse().map_err(io::Error::other)?,
            b.parse().map_err(io::Error::other)?,
        );
        for cpu in a..=b.min(CPU_MASK_WORDS * 64 - 1) {
            mask[cpu / 64] |= 1 << (cpu % 64);
        }
    }
    Ok(mask)
}

/// Thread `tid`'s affinity mask; `None` on a host with more CPUs than the mask holds
/// (`EINVAL`).
fn affinity_mask(tid: i32) -> io::Result<Option<CpuMask>> {
    let mut mask = [0u64; CPU_MASK_WORDS];
    // SAFETY: the kernel writes at most `size_of_val(&mask)` bytes into the live `mask`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_sched_getaffinity,
            tid,
            std::mem::size_of_val(&mask),
            mask.as_mut_ptr(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EINVAL) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(mask))
}

/// Thread `tid`'s affinity when it leaves out an online CPU, else `None` (a host with
/// more CPUs than the mask holds counts as unpinned).
fn affinity(tid: i32) -> io::Result<Option<CpuMask>> {
    let Some(mask) = affinity_mask(tid)? else {
        return Ok(None);
    };
    let online = online_cpus()?;
    let all = online.iter().zip(&mask).all(|(o, m)| o & !m == 0);
    Ok((!all).then_some(mask))
}

/// `mask` as a list of CPUs (`0,2,3`), for messages.
fn cpu_list(mask: &CpuMask) -> String {
    (0..CPU_MASK_WORDS * 64)
        .filter(|&c| mask[c / 64] & (1 << (c % 64)) != 0)
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// `struct sched_attr` (`SCHED_ATTR_SIZE_VER1`).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

const IOPRIO_WHO_PROCESS: i64 = 1;
/// `SCHED_FLAG_RESET_ON_FORK`: the one flag kept (the utilization clamps are left as
/// they are).
const RESET_ON_FORK: u64 = 1;

fn check(r: i64) -> io::Result<i64> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The attributes of thread `tid` (a tid of our pid namespace) but its parent-death
/// signal, which only the thread can read (left 0).
pub fn get(tid: i32) -> io::Result<ThreadAttrs> {
    Ok(ThreadAttrs {
        cpus: affinity(tid)?,
        ..get_but_cpus(tid)?
    })
}

/// [`get`] but the CPU affinity (left `None`).
fn get_but_cpus(tid: i32) -> io::Result<ThreadAttrs> {
    let mut a = SchedAttr::default();
    // SAFETY: `a` is a live, writable `sched_attr` of the size passed; the kernel writes
    // at most that many bytes.
    check(unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            tid,
            &mut a as *mut SchedAttr,
            std::mem::size_of::<SchedAttr>() as u32,
            0u32,
        )
    })?;
    // SAFETY: integer arguments only.
    let ioprio =
        check(unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, tid) })? as i32;
    // sched_getattr reports the nice value of fair-policy threads only; a real-time
    // thread has one too (the raw syscall answers 20 - nice).
    // SAFETY: integer arguments only.
    let nice = 20
        - check(unsafe { libc::syscall(libc::SYS_getpriority, libc::PRIO_PROCESS, tid) })? as i32;
    let slack = std::fs::read_to_string(format!("/proc/{tid}/timerslack_ns"))?;
    Ok(ThreadAttrs {
        sched_policy: a.policy,
        sched_flags: a.flags & RESET_ON_FORK,
        nice,
        rt_priority: a.priority,
        dl_runtime: a.runtime,
        dl_deadline: a.deadline,
        dl_period: a.period,
        ioprio,
        timerslack_ns: slack.trim().parse().map_err(io::Error::other)?,
        pdeathsig: 0,
        cpus: None,
    })
}

/// Gives thread `tid` the scheduling policy, nice value, priority, I/O priority and
/// timer slack of `want`, each only where it differs from what the thread has. The
/// error names what could not be set.
pub fn set(tid: i32, want: &ThreadAttrs) -> Result<(), String> {
    let now = get_but_cpus(tid).map_err(|e| format!("reading the scheduling attributes: {e}"))?;
    let sched = |a: &ThreadAttrs| {
        (
            a.sched_policy,
            a.sched_flags,
            a.rt_priority,
            a.dl_runtime,
            a.dl_deadline,
            a.dl_period,
        )
    };
    let changed = sched(&now) != sched(want);
    if changed {
        let a = SchedAttr {
            size: std::mem::size_of::<SchedAttr>() as u32,
            policy: want.sched_policy,
            flags: want.sched_flags,
            nice: want.nice,
            priority: want.rt_priority,
            runtime: want.dl_runtime,
            deadline: want.dl_deadline,
            period: want.dl_period,
            ..Default::default()
        };
        // SAFETY: `a` is a live `sched_attr` whose `size` field says how much the kernel
        // reads.
        check(unsafe { libc::syscall(libc::SYS_sched_setattr, tid, &a as *const SchedAttr, 0u32) })
            .map_err(|e| {
                format!(
                    "setting scheduling policy {} (nice {}, priority {}): {e}",
                    want.sched_policy, want.nice, want.rt_priority
                )
            })?;
    }
    // sched_setattr sets the nice value of the fair policies only: a real-time thread
    // keeps the one it had, set on its own.
    let fair = matches!(
        want.sched_policy as i32,
        libc::SCHED_OTHER | libc::SCHED_BATCH | libc::SCHED_IDLE
    );
    let nice = if changed && fair { want.nice } else { now.nice };
    if nice != want.nice {
        // SAFETY: integer arguments only.
        check(unsafe {
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, want.nice) as i64
        })
        .map_err(|e| format!("setting nice {}: {e}", want.nice))?;
    }
    if now.ioprio != want.ioprio {
        // SAFETY: integer arguments only.
        check(unsafe {
            libc::syscall(
                libc::SYS_ioprio_set,
                IOPRIO_WHO_PROCESS,
                tid,
                want.ioprio as i64,
            )
        })
        .map_err(|e| format!("setting I/O priority {:#x}: {e}", want.ioprio))?;
    }
    if let Some(mask) = want.cpus {
        let now = affinity_mask(tid).map_err(|e| format!("reading the CPU affinity: {e}"))?;
        if now != Some(mask) {
            // SAFETY: the kernel reads `size_of_val(&mask)` bytes from the live `mask`.
            check(unsafe {
                libc::syscall(
                    libc::SYS_sched_setaffinity,
                    tid,
                    std::mem::size_of_val(&mask),
                    mask.as_ptr(),
                )
            })
            .map_err(|e| {
                format!(
                    "setting CPU affinity to CPUs {} (the thread was kept to them; this host \
                     must have at least one of them online and allowed): {e}",
                    cpu_list(&mask)
                )
            })?;
        }
    }
    if now.timerslack_ns != want.timerslack_ns {
        std::fs::write(
            format!("/proc/{tid}/timerslack_ns"),
            want.timerslack_ns.to_string(),
        )
        .map_err(|e| format!("setting timer slack {} ns: {e}", want.timerslack_ns))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread of ours: read, changed, read back.
    #[test]
    fn attributes_of_a_thread_round_trip() {
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: gettid takes no argument.
                let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
                let before = get(tid).unwrap();
                let want = ThreadAttrs {
                    sched_policy: libc::SCHED_BATCH as u32,
                    nice: before.nice.max(0) + 2,
                    ioprio: (2 << 13) | 5,
                    timerslack_ns: 77_777,
                    ..before
                };
                set(tid, &want).unwrap();
                assert_eq!(get(tid).unwrap(), want);
                set(tid, &want).unwrap();
            });
        });
    }
}
