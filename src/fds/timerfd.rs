//! timerfd: clock, remaining time, interval and unread expirations from fdinfo:
//!
//! ```text
//! clockid: 1
//! ticks: 0
//! settime flags: 01
//! it_value: (9, 999963051)
//! it_interval: (5, 0)
//! ```
//!
//! `it_value` is the time *remaining*, whatever the timer was set with. A timer set with
//! `TFD_TIMER_ABSTIME` on a realtime clock is due at a wall-clock time: the dump keeps
//! that deadline (the realtime clock read beside the fdinfo, plus what remained), and a
//! restore sets it absolute again, with `TFD_TIMER_CANCEL_ON_SET` if it had it, so it
//! fires at its deadline however long the snapshot waited (at once if that has passed).
//! On the other clocks, which go on from the dump in a restored instance, an absolute
//! timer is set absolute again from the time that remained. Unread expirations are put
//! back with `TFD_IOC_SET_TICKS`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{anyhow, Result};
use warmstart_snapshots::model::FileDesc;

use super::{errno_err, FdInfo, Installer, Target};

/// `_IOW('T', 0, __u64)`.
pub const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;

/// The clocks whose absolute timers are due at a wall-clock time.
fn is_realtime(clockid: i32) -> bool {
    clockid == libc::CLOCK_REALTIME || clockid == libc::CLOCK_REALTIME_ALARM
}

pub fn dump(t: &Target) -> Result<FileDesc> {
    let (clockid, ticks, value_ns, interval_ns) = parse(t.info)
        .ok_or_else(|| anyhow!("{}: cannot parse the timerfd's fdinfo", t.context()))?;
    let settime_flags = settime_flags(t.info);
    let realtime_deadline_ns =
        (settime_flags & libc::TFD_TIMER_ABSTIME != 0 && is_realtime(clockid) && value_ns > 0)
            .then(|| now_ns(libc::CLOCK_REALTIME) + value_ns);
    Ok(FileDesc::TimerFd {
        clockid,
        value_ns,
        interval_ns,
        ticks,
        flags: t.flags(),
        settime_flags,
        realtime_deadline_ns,
    })
}

/// `settime flags:` of a timerfd's fdinfo (octal; 0 when absent, before Linux 5.x).
fn settime_flags(info: &FdInfo) -> i32 {
    info.field("settime flags")
        .and_then(|v| i32::from_str_radix(v.trim(), 8).ok())
        .unwrap_or(0)
        & (libc::TFD_TIMER_ABSTIME | libc::TFD_TIMER_CANCEL_ON_SET)
}

/// `clock`'s time now, in ns (never before the epoch on the clocks of a timerfd).
fn now_ns(clock: libc::clockid_t) -> u64 {
    crate::sys::timens::now_ns(clock).max(0) as u64
}

/// How to arm a restored timerfd: the `timerfd_settime` flags and `it_value` (ns), from
/// what was dumped (`value_ns` already made armable by [`value_to_arm`]). An absolute
/// timer on a realtime clock is armed at its deadline; one on another clock is due
/// `value_ns` after `now(clockid)`, the time its clock reads when it starts again
/// (relative when that is not known: `None`).
pub fn how_to_arm(
    clockid: i32,
    value_ns: u64,
    settime_flags: i32,
    realtime_deadline_ns: Option<u64>,
    now: impl FnOnce(i32) -> Option<u64>,
) -> (i32, u64) {
    if value_ns == 0 || settime_flags & libc::TFD_TIMER_ABSTIME == 0 {
        return (0, value_ns);
    }
    match realtime_deadline_ns {
        Some(deadline) => (settime_flags, deadline),
        None if is_realtime(clockid) => (0, value_ns),
        None => now(clockid).map_or((0, value_ns), |t| (libc::TFD_TIMER_ABSTIME, t + value_ns)),
    }
}

fn timespec_ns(v: &str) -> Option<u64> {
    let (s, ns) = v
        .trim()
        .strip_prefix('(')?
        .strip_suffix(')')?
        .split_once(',')?;
    Some(s.trim().parse::<u64>().ok()? * 1_000_000_000 + ns.trim().parse::<u64>().ok()?)
}

fn parse(info: &FdInfo) -> Option<(i32, u64, u64, u64)> {
    Some((
        info.field("clockid")?.parse().ok()?,
        info.field("ticks")?.parse().ok()?,
        timespec_ns(info.field("it_value")?)?,
        timespec_ns(info.field("it_interval")?)?,
    ))
}

fn timespec(ns: u64) -> libc::timespec {
    libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    }
}

/// A periodic timer due right now shows 0 remaining; 0 would disarm it.
pub fn value_to_arm(value_ns: u64, interval_ns: u64) -> u64 {
    if value_ns == 0 && interval_ns > 0 {
        1
    } else {
        value_ns
    }
}

pub fn restore(ins: &mut Installer, file: &FileDesc) -> Result<RawFd> {
    let &FileDesc::TimerFd {
        clockid,
        value_ns,
        interval_ns,
        ticks,
        flags,
        settime_flags,
        realtime_deadline_ns,
    } = file
    else {
        unreachable!("timerfd::restore called for {file:?}")
    };
    let mut tfd_flags = libc::TFD_CLOEXEC;
    if flags & libc::O_NONBLOCK != 0 {
        tfd_flags |= libc::TFD_NONBLOCK;
    }
    // SAFETY: integer arguments only; the fd returned is owned
    // right below.
    let fd = unsafe { libc::timerfd_create(clockid, tfd_flags) };
    if fd < 0 {
        return Err(errno_err(format!("timerfd_create(clock {clockid})")));
    }
    // SAFETY: the call above succeeded: a new descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if ins.parked {
        // Armed when handed out (`late_timerfds`), not while parked.
        return ins.keep_high(fd);
    }
    let value_ns = value_to_arm(value_ns, interval_ns);
    let (arm_flags, value_ns) = how_to_arm(
        clockid,
        value_ns,
        settime_flags,
        realtime_deadline_ns,
        |c| Some(now_ns(c)),
    );
    let spec = libc::itimerspec {
        it_interval: timespec(interval_ns),
        it_value: timespec(value_ns),
    };
    // SAFETY: `spec` is a live `itimerspec` the kernel only reads; the old value is not
    // wanted (null).
    if unsafe { libc::timerfd_settime(fd.as_raw_fd(), arm_flags, &spec, std::ptr::null_mut()) } < 0
    {
        return Err(errno_err(format!(
            "timerfd_settime (clock {clockid}, flags {arm_flags:#o})"
        )));
    }
    // SAFETY: TFD_IOC_SET_TICKS reads one u64 from the pointer, which is `ticks`, a live
    // u64.
    if ticks > 0 && unsafe { libc::ioctl(fd.as_raw_fd(), TFD_IOC_SET_TICKS, &ticks) } < 0 {
        return Err(errno_err(format!(
            "putting back {ticks} unread timer expirations (TFD_IOC_SET_TICKS needs \
             CONFIG_CHECKPOINT_RESTORE)"
        )));
    }
    ins.keep_high(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fdinfo() {
        let i = FdInfo::parse(
            "pos:\t0\nflags:\t02004000\nmnt_id:\t16\nino:\t1\nclockid: 1\nticks: 3\n\
             settime flags: 01\nit_value: (9, 999963051)\nit_interval: (5, 0)\n"
                .into(),
        );
        assert_eq!(parse(&i), Some((1, 3, 9_999_963_051, 5_000_000_000)));
        assert_eq!(parse(&FdInfo::parse("clockid: 0\n".into())), None);
    }
}
