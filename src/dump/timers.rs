//! Interval and POSIX timers. `/proc/PID/timers` names each POSIX timer (id, signal,
//! notification, clock); the time left on it and on the itimers is read from inside by
//! the parasite (`timer_gettime`, `getitimer`).

use anyhow::{Context, Result};

/// A POSIX timer as `/proc/PID/timers` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcTimer {
    pub id: i32,
    pub signo: i32,
    pub sigval: u64,
    pub notify: i32,
    /// Target thread in *our* pid namespace, for `SIGEV_THREAD_ID`.
    pub target: i32,
    pub clock: i32,
}

pub const SIGEV_SIGNAL: i32 = 0;
pub const SIGEV_NONE: i32 = 1;
pub const SIGEV_THREAD: i32 = 2;
pub const SIGEV_THREAD_ID: i32 = 4;

pub fn parse(text: &str) -> Result<Vec<ProcTimer>> {
    let mut out: Vec<ProcTimer> = Vec::new();
    for line in text.lines() {
        let Some((key, val)) = line.split_once(':') else {
            continue;
        };
        let val = val.trim();
        if key == "ID" {
            out.push(ProcTimer {
                id: val.parse().context("timer ID")?,
                signo: 0,
                sigval: 0,
                notify: 0,
                target: 0,
                clock: 0,
            });
            continue;
        }
        let Some(t) = out.last_mut() else { continue };
        match key {
            "signal" => {
                let (sig, value) = val.split_once('/').context("timer signal line")?;
                t.signo = sig.parse().context("timer signal")?;
                t.sigval = u64::from_str_radix(value.trim_start_matches("0x"), 16).unwrap_or(0);
            }
            "notify" => {
                // "signal/pid.12", "signal/tid.12", "none/pid.12", "thread/pid.12"
                let (how, who) = val.split_once('/').context("timer notify line")?;
                let (kind, id) = who.split_once('.').context("timer notify target")?;
                t.notify = match how {
                    "none" => SIGEV_NONE,
                    "thread" => SIGEV_THREAD,
                    _ => SIGEV_SIGNAL,
                } | if kind == "tid" { SIGEV_THREAD_ID } else { 0 };
                t.target = id.parse().unwrap_or(0);
            }
            "ClockID" => t.clock = val.parse().context("timer clock")?,
            _ => {}
        }
    }
    Ok(out)
}

pub fn read(pid: i32) -> Result<Vec<ProcTimer>> {
    match std::fs::read_to_string(format!("/proc/{pid}/timers")) {
        Ok(text) => parse(&text),
        Err(e) => Err(e).with_context(|| format!("reading /proc/{pid}/timers")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_proc_timers() {
        let t = super::parse(
            "ID: 0\nsignal: 14/00007ffd00001234\nnotify: signal/pid.40\nClockID: 1\n\
             ID: 3\nsignal: 10/0000000000000000\nnotify: signal/tid.41\nClockID: 0\n",
        )
        .unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            (
                t[0].id,
                t[0].signo,
                t[0].sigval,
                t[0].notify,
                t[0].target,
                t[0].clock
            ),
            (0, 14, 0x7ffd00001234, 0, 40, 1)
        );
        assert_eq!(
            (t[1].id, t[1].notify, t[1].target),
            (3, super::SIGEV_THREAD_ID, 41)
        );
    }
}
