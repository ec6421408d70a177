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
//! `it_value` is the time *remaining*, whatever the timer was set with: a timer set with
//! `TFD_TIMER_ABSTIME` is restored relative (it fires as long after the restore as it had
//! left at the dump), and `TFD_TIMER_CANCEL_ON_SET` (which needs an absolute realtime
//! timer) is dropped. Unread expirations are put back with `TFD_IOC_SET_TICKS`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{anyhow, Result};
use warmstart_snapshots::model::FileDesc;

use super::{errno_err, FdInfo, Installer, Target};

/// `_IOW('T', 0, __u64)`.
pub const TFD_IOC_SET_TICKS: libc::c_ulong = 0x4008_5400;

pub fn dump(t: &Target) -> Result<FileDesc> {
    let (clockid, ticks, value_ns, interval_ns) = parse(t.info)
        .ok_or_else(|| anyhow!("{}: cannot parse the timerfd's fdinfo", t.context()))?;
    Ok(FileDesc::TimerFd {
        clockid,
        value_ns,
        interval_ns,
        ticks,
        flags: t.flags(),
    })
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
    let spec = libc::itimerspec {
        it_interval: timespec(interval_ns),
        it_value: timespec(value_ns),
    };
    // SAFETY: `spec` is a live `itimerspec` the kernel only reads; the old value is not
    // wanted (null).
    if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
        return Err(errno_err("timerfd_settime"));
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
