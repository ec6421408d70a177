//! signalfd: the mask (`sigmask:` in fdinfo, 64 bits in hex, bit N-1 for signal N) and
//! `O_NONBLOCK`. The signals themselves stay pending in the process (restored with it).

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use anyhow::{anyhow, Result};
use warmstart_snapshots::model::FileDesc;

use super::{errno_err, FdInfo, Installer, Target};

pub fn dump(t: &Target) -> Result<FileDesc> {
    let mask =
        parse(t.info).ok_or_else(|| anyhow!("{}: fdinfo has no readable sigmask", t.context()))?;
    Ok(FileDesc::SignalFd {
        mask,
        flags: t.flags(),
    })
}

fn parse(info: &FdInfo) -> Option<u64> {
    u64::from_str_radix(info.field("sigmask")?, 16).ok()
}

pub fn restore(ins: &mut Installer, mask: u64, flags: i32) -> Result<RawFd> {
    // SAFETY: `sigset_t` is a plain C bit array; all-zero bytes are valid.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live, writable `sigset_t`.
    unsafe { libc::sigemptyset(&mut set) };
    for sig in 1..=64 {
        if mask & (1u64 << (sig - 1)) != 0 {
            // SAFETY: `set` is a live, writable `sigset_t` and `sig` is in 1..=64, within
            // its range.
            unsafe { libc::sigaddset(&mut set, sig) };
        }
    }
    let mut sfd_flags = libc::SFD_CLOEXEC;
    if flags & libc::O_NONBLOCK != 0 {
        sfd_flags |= libc::SFD_NONBLOCK;
    }
    // SAFETY: `set` is a live `sigset_t` the kernel only reads; the new fd is owned right
    // below.
    let fd = unsafe { libc::signalfd(-1, &set, sfd_flags) };
    if fd < 0 {
        return Err(errno_err(format!("signalfd(mask {mask:#x})")));
    }
    // SAFETY: the call above succeeded: a new descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    ins.keep_high(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mask() {
        let i = FdInfo::parse("pos:\t0\nflags:\t02\nsigmask:\t0000000000000a00\n".into());
        assert_eq!(parse(&i), Some((1 << 9) | (1 << 11))); // SIGUSR1, SIGUSR2
    }
}
