//! The sandbox's time namespace: restored clocks go on from the dump.
//!
//! A restored process keeps timestamps of `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME` in its
//! memory (deadlines of timed waits, rate limiters, caches). Read on the host, those
//! clocks would jump forward by the snapshot's age, and a deadline computed before the
//! dump would lie in the past: CPython 3.11, for one, then passes a negative timeout to
//! `sem_wait` and blocks forever. So a restore runs the app in a new time namespace
//! (`CLONE_NEWTIME`) whose offsets make both clocks read what they read at the dump plus
//! the time the restore itself takes. `CLOCK_REALTIME` is not namespaced and stays real.
//!
//! Kernel rules this follows: a time namespace's offsets can only be written (to
//! `/proc/PID/timens_offsets` of a process whose *children* will enter it) before any
//! process has entered it; `unshare(CLONE_NEWTIME)` moves only the caller's children
//! there; offsets are relative to the host's clocks (time namespaces do not nest) and may
//! be negative as long as the resulting clock is not. init does this, single-threaded,
//! just before it creates the app, with raw syscalls and a stack buffer only (it runs
//! after a raw `clone3`).

use crate::sys::{errno, now_ns};

/// The two clocks a time namespace offsets, in the order [`enter`] takes them.
const CLOCKS: [(libc::clockid_t, &[u8]); 2] = [
    (libc::CLOCK_MONOTONIC, b"monotonic "),
    (libc::CLOCK_BOOTTIME, b"boottime "),
];

/// Makes init's future children enter a new time namespace where `CLOCK_MONOTONIC` and
/// `CLOCK_BOOTTIME` read `targets` (nanoseconds, in init's own view of the clocks) right
/// now. Returns the failing step's stage on error (errno is left set).
pub(crate) fn enter(targets: [i64; 2]) -> Result<(), Step> {
    // SAFETY: unshare only changes this (single-threaded) process's namespace set.
    if unsafe { libc::unshare(libc::CLONE_NEWTIME) } != 0 {
        return Err(Step::Unshare);
    }
    let mut buf = [0u8; 128];
    let mut len = 0;
    for (i, (clock, name)) in CLOCKS.iter().enumerate() {
        let offset = targets[i].saturating_sub(now_ns(*clock));
        len = put(&mut buf, len, name);
        len = put_i64(&mut buf, len, offset.div_euclid(1_000_000_000));
        len = put(&mut buf, len, b" ");
        len = put_i64(&mut buf, len, offset.rem_euclid(1_000_000_000));
        len = put(&mut buf, len, b"\n");
    }
    // SAFETY: a NUL-terminated path literal; the returned fd is closed below.
    let fd = unsafe {
        libc::open(
            c"/proc/self/timens_offsets".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Step::Offsets);
    }
    // SAFETY: `buf[..len]` is initialised and lives across the call.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), len) };
    let e = errno();
    // SAFETY: `fd` was opened above, is owned by nothing else and is not used after.
    unsafe { crate::sys::close_raw(fd) };
    if n != len as isize {
        crate::sys::set_errno(if n < 0 { e } else { libc::EIO });
        return Err(Step::Offsets);
    }
    Ok(())
}

/// Moves the caller itself into the time namespace [`enter`] made for its children
/// (`setns` on `/proc/self/ns/time_for_children`; the offsets must be written first, as
/// no process may have entered the namespace before). The caller must be
/// single-threaded. errno is left set on error.
pub(crate) fn join_own() -> Result<(), ()> {
    // SAFETY: a NUL-terminated path literal; the returned fd is closed below.
    let fd = unsafe {
        libc::open(
            c"/proc/self/ns/time_for_children".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(());
    }
    // SAFETY: `fd` is a namespace file opened above; setns changes only this
    // (single-threaded) process's time namespace.
    let r = unsafe { libc::setns(fd, libc::CLONE_NEWTIME) };
    let e = errno();
    // SAFETY: `fd` was opened above, is owned by nothing else and is not used after.
    unsafe { crate::sys::close_raw(fd) };
    if r != 0 {
        crate::sys::set_errno(e);
        return Err(());
    }
    Ok(())
}

/// Which step of [`enter`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Unshare,
    Offsets,
}

fn put(buf: &mut [u8], at: usize, s: &[u8]) -> usize {
    buf[at..at + s.len()].copy_from_slice(s);
    at + s.len()
}

/// Writes `v` in decimal at `at`; the new end.
fn put_i64(buf: &mut [u8], mut at: usize, v: i64) -> usize {
    if v < 0 {
        at = put(buf, at, b"-");
    }
    let mut digits = [0u8; 20];
    let mut n = v.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put(buf, at, &digits[i..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt(v: i64) -> String {
        let mut b = [0u8; 32];
        let n = put_i64(&mut b, 0, v);
        String::from_utf8(b[..n].to_vec()).unwrap()
    }

    #[test]
    fn formats_integers_without_allocating() {
        for v in [0, 7, -7, 1_000_000_000, i64::MIN, i64::MAX] {
            assert_eq!(fmt(v), v.to_string());
        }
    }
}
