//! Time namespaces as the dump sees them: what `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME`
//! read in a process's time namespace.
//!
//! Offsets of a time namespace are relative to the host's clocks (time namespaces are
//! flat, not nested), and `/proc/PID/timens_offsets` shows those of the namespace the
//! process's *children* get (`time_for_children`). That is the process's own namespace
//! unless it called `unshare(CLONE_NEWTIME)` and has not forked since, which
//! [`clocks_of`] refuses (its own offsets are then unreadable from outside).

use std::os::unix::fs::MetadataExt;

use anyhow::{bail, Context, Result};
use warmstart_snapshots::model::Clocks;

/// `clock_gettime(clock)` in nanoseconds, in this process's time namespace.
pub use warmstart_launcher::sys::now_ns;

/// The (monotonic, boottime) offsets in nanoseconds that `/proc/<who>/timens_offsets`
/// shows (`who` is a pid or `self`; the file is per process, not per thread).
pub fn offsets(who: &str) -> Result<(i64, i64)> {
    let path = format!("/proc/{who}/timens_offsets");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_offsets(&text).with_context(|| format!("{path} is not as expected: {text:?}"))
}

fn parse_offsets(text: &str) -> Option<(i64, i64)> {
    let (mut mono, mut boot) = (None, None);
    for line in text.lines() {
        let mut w = line.split_whitespace();
        let (clock, sec, nsec) = (w.next()?, w.next()?.parse::<i64>().ok()?, w.next()?);
        let ns = sec * 1_000_000_000 + nsec.parse::<i64>().ok()?;
        match clock {
            "monotonic" | "1" => mono = Some(ns),
            "boottime" | "7" => boot = Some(ns),
            _ => {}
        }
    }
    Some((mono?, boot?))
}

/// The clocks as process `pid` reads them now.
pub fn clocks_of(pid: i32) -> Result<Clocks> {
    let ns = |name: &str| {
        let p = format!("/proc/{pid}/ns/{name}");
        std::fs::metadata(&p)
            .map(|m| m.ino())
            .with_context(|| format!("reading {p}"))
    };
    if ns("time")? != ns("time_for_children")? {
        bail!(
            "process {pid} entered a new time namespace (unshare(CLONE_NEWTIME)) and has not \
             forked since: its clock offsets cannot be read from outside"
        );
    }
    let (own_mono, own_boot) = offsets("self")?;
    let (mono, boot) = offsets(&pid.to_string())?;
    Ok(Clocks {
        monotonic_ns: now_ns(libc::CLOCK_MONOTONIC) - own_mono + mono,
        boottime_ns: now_ns(libc::CLOCK_BOOTTIME) - own_boot + boot,
    })
}

/// What the launcher needs to give a sandbox clocks that go on from `c`: the targets
/// moved into this thread's view (`target + own offset`), so that the new namespace's
/// offset is `adjusted - now` read in the same view (see `warmstart_launcher`).
pub fn adjusted_targets(c: &Clocks) -> Result<[i64; 2]> {
    let (mono, boot) = offsets("self")?;
    Ok([c.monotonic_ns + mono, c.boottime_ns + boot])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_named_and_numbered_clocks() {
        assert_eq!(
            parse_offsets("monotonic -5 250000000\nboottime 3 0\n"),
            Some((-4_750_000_000, 3_000_000_000))
        );
        assert_eq!(parse_offsets("1 0 1\n7 0 2\n"), Some((1, 2)));
        assert_eq!(parse_offsets("monotonic 0 0\n"), None);
    }

    #[test]
    fn own_clocks_match_clock_gettime() {
        let me = std::process::id() as i32;
        let c = clocks_of(me).unwrap();
        let mono = now_ns(libc::CLOCK_MONOTONIC);
        assert!(c.monotonic_ns <= mono && mono - c.monotonic_ns < 10_000_000_000);
    }
}
