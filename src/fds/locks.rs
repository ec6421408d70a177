//! File locks held by the process: `lock:` lines of `/proc/PID/fdinfo/N`,
//!
//! ```text
//! lock:    1: FLOCK  ADVISORY  WRITE 4242 00:2a:1234 0 EOF
//! lock:    2: POSIX  ADVISORY  READ 4242 00:2a:1234 10 19
//! lock:    3: OFDLCK ADVISORY  WRITE -1 00:2a:1234 0 EOF
//! ```
//!
//! An fd shows the flock and OFD locks of its own open file description and the POSIX
//! locks its process holds on the file. Restore takes them again (non-blocking) on the
//! placed fds once the table is built: closing *any* fd of a file drops the process's
//! POSIX locks on it, so they must come after the temporary fds are closed. For the same
//! reason a POSIX lock on a file the process also maps is lost when the restorer closes
//! the fd it mapped the file with. Leases and delegations are refused.

use anyhow::{anyhow, bail, Result};
use warmstart_snapshots::model::{FileLock, LockKind, Manifest, Process};

use super::{errno_err, Target};

/// The locks held through `t`; `pid` is the process's pid in its own namespace.
pub fn dump(t: &Target, pid: i32) -> Result<Vec<FileLock>> {
    let mut out = Vec::new();
    for line in t.info.lines_with("lock:") {
        if line.contains("->") {
            continue; // a waiter blocked on this lock, not a holder
        }
        match parse(line) {
            Ok(Some((kind, write, start, len))) => out.push(FileLock {
                pid,
                fd: t.fd,
                kind,
                write,
                start,
                len,
            }),
            Ok(None) => {}
            Err(e) => return Err(t.refuse(format_args!("a file with {e}"))),
        }
    }
    Ok(out)
}

/// (kind, write, start, len); `None` for an unlocked entry.
fn parse(line: &str) -> Result<Option<(LockKind, bool, u64, u64)>> {
    let f: Vec<&str> = line.split_whitespace().collect();
    // id: KIND ADVISORY|MANDATORY READ|WRITE|UNLCK pid dev:ino start end|EOF
    if f.len() < 8 {
        bail!("a lock line we cannot read ({line:?})");
    }
    let kind = match f[1] {
        "FLOCK" => LockKind::Flock,
        "POSIX" => LockKind::Posix,
        "OFDLCK" => LockKind::Ofd,
        other => bail!("a {} lock", other.to_lowercase()),
    };
    let write = match f[3] {
        "WRITE" => true,
        "READ" => false,
        _ => return Ok(None),
    };
    let start: u64 = f[6]
        .parse()
        .map_err(|_| anyhow!("a lock line we cannot read ({line:?})"))?;
    let len = match f[7] {
        "EOF" => 0,
        end => {
            let end: u64 = end
                .parse()
                .map_err(|_| anyhow!("a lock line we cannot read ({line:?})"))?;
            end - start + 1
        }
    };
    Ok(Some((kind, write, start, len)))
}

/// Takes the locks of process `p` on its (placed) fds.
pub fn restore(m: &Manifest, p: &Process) -> Result<()> {
    for l in m.file_locks.iter().filter(|l| l.pid == p.pid) {
        let what = format!(
            "{} {} lock on fd {} (bytes {}+{})",
            if l.write { "write" } else { "read" },
            match l.kind {
                LockKind::Flock => "flock",
                LockKind::Posix => "POSIX",
                LockKind::Ofd => "OFD",
            },
            l.fd,
            l.start,
            l.len
        );
        let r = match l.kind {
            // SAFETY: integer arguments only; `l.fd` has been placed by the fd table
            // restore.
            LockKind::Flock => unsafe {
                libc::flock(
                    l.fd,
                    if l.write {
                        libc::LOCK_EX
                    } else {
                        libc::LOCK_SH
                    } | libc::LOCK_NB,
                )
            },
            LockKind::Posix | LockKind::Ofd => {
                // SAFETY: `libc::flock` is a plain C struct; all-zero bytes are valid.
                let mut fl: libc::flock = unsafe { std::mem::zeroed() };
                fl.l_type = if l.write {
                    libc::F_WRLCK
                } else {
                    libc::F_RDLCK
                } as i16;
                fl.l_whence = libc::SEEK_SET as i16;
                fl.l_start = l.start as libc::off_t;
                fl.l_len = l.len as libc::off_t;
                let cmd = if l.kind == LockKind::Posix {
                    libc::F_SETLK
                } else {
                    libc::F_OFD_SETLK
                };
                // SAFETY: the lock commands read one `struct flock` from the pointer, which
                // is `fl`, live across the call.
                unsafe { libc::fcntl(l.fd, cmd, &fl) }
            }
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
                bail!("cannot take the {what}: another process holds a conflicting lock");
            }
            return Err(errno_err(format!("taking the {what}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lock_lines() {
        assert_eq!(
            parse("\t1: FLOCK  ADVISORY  WRITE 4242 00:2a:1234 0 EOF").unwrap(),
            Some((LockKind::Flock, true, 0, 0))
        );
        assert_eq!(
            parse("2: POSIX  ADVISORY  READ 4242 00:2a:1234 10 19").unwrap(),
            Some((LockKind::Posix, false, 10, 10))
        );
        assert_eq!(
            parse("3: OFDLCK ADVISORY  WRITE -1 00:2a:1234 0 EOF").unwrap(),
            Some((LockKind::Ofd, true, 0, 0))
        );
        assert!(parse("4: LEASE  ACTIVE    READ 4242 00:2a:1234 0 EOF").is_err());
    }
}
