//! eventfd: the counter (`eventfd-count:`, hex) and semaphore mode (`eventfd-semaphore:`)
//! come from fdinfo. Restore creates it at 0 and writes the count (the initial value of
//! `eventfd()` is only 32 bits wide).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{anyhow, Result};
use warmstart_snapshots::model::FileDesc;

use super::{errno_err, FdInfo, Installer, Target};

pub fn dump(t: &Target) -> Result<FileDesc> {
    let (count, semaphore) = parse(t.info).ok_or_else(|| {
        anyhow!(
            "{}: fdinfo has no readable eventfd-count/eventfd-semaphore (kernel too old?)",
            t.context()
        )
    })?;
    Ok(FileDesc::EventFd {
        count,
        semaphore,
        flags: t.flags(),
    })
}

fn parse(info: &FdInfo) -> Option<(u64, bool)> {
    let count = u64::from_str_radix(info.field("eventfd-count")?, 16).ok()?;
    let semaphore = info.field("eventfd-semaphore")? == "1";
    Some((count, semaphore))
}

pub fn restore(ins: &mut Installer, count: u64, semaphore: bool, flags: i32) -> Result<RawFd> {
    let mut efd_flags = libc::EFD_CLOEXEC;
    if semaphore {
        efd_flags |= libc::EFD_SEMAPHORE;
    }
    if flags & libc::O_NONBLOCK != 0 {
        efd_flags |= libc::EFD_NONBLOCK;
    }
    // SAFETY: integer arguments only; the fd returned is owned
    // right below.
    let fd = unsafe { libc::eventfd(0, efd_flags) };
    if fd < 0 {
        return Err(errno_err("eventfd"));
    }
    // SAFETY: the call above succeeded: a new descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if count > 0 {
        // SAFETY: the buffer is `count`, a live u64, and the length is its 8 bytes.
        let n = unsafe { libc::write(fd.as_raw_fd(), (&count as *const u64).cast(), 8) };
        if n != 8 {
            return Err(errno_err(format!("setting the eventfd count to {count}")));
        }
    }
    ins.keep_high(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_count_and_semaphore() {
        let i = FdInfo::parse(
            "pos:\t0\nflags:\t02004002\nmnt_id:\t16\nino:\t1\neventfd-count:               2a\neventfd-id: 3\neventfd-semaphore: 1\n"
                .into(),
        );
        assert_eq!(parse(&i), Some((42, true)));
        let i = FdInfo::parse("eventfd-count: 0\neventfd-semaphore: 0\n".into());
        assert_eq!(parse(&i), Some((0, false)));
        assert_eq!(parse(&FdInfo::parse("pos: 0\n".into())), None);
    }
}
