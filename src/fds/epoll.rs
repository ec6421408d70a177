//! epoll: every registration (`tfd: N events: X data: Y` in fdinfo, hex) is re-added with
//! `epoll_ctl(EPOLL_CTL_ADD)` once its target exists at its final number.
//!
//! The kernel keys a registration by (file, fd number at the time of the add). A target
//! closed after being added stays registered while its file lives on elsewhere (a dup):
//! `kcmp(KCMP_EPOLL_TFD)` tells whether the number still holds the registered file and,
//! if not, which other fd of the process does (`EpollTarget::via`). At restore that file
//! is put at the registered number for the add (whatever holds the number meanwhile is
//! kept aside and put back), so the registration shows the same `tfd` as at the dump.
//! A registered file no fd of the process reaches is refused.

use std::collections::HashSet;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use anyhow::{bail, Result};
use warmstart_snapshots::model::{EpollTarget, Fd, FileDesc, Process};

use super::{errno_err, FdInfo, Installer, Target};

pub fn dump(t: &Target) -> Result<FileDesc> {
    let targets = parse(t.info);
    let mut targets = targets;
    for tg in &mut targets {
        if t.all_fds.contains(&tg.fd) && registered_file_is(t.pid, t.fd, tg.fd, tg.fd) {
            continue;
        }
        tg.via = t
            .all_fds
            .iter()
            .copied()
            .find(|&f| f != t.fd && registered_file_is(t.pid, t.fd, tg.fd, f));
        if tg.via.is_none() {
            return Err(t.refuse(format_args!(
                "an epoll watching fd {} which the process has closed since (its file is \
                 still registered but no fd of the process reaches it)",
                tg.fd
            )));
        }
    }
    Ok(FileDesc::Epoll {
        flags: t.flags(),
        targets,
    })
}

fn parse(info: &FdInfo) -> Vec<EpollTarget> {
    info.lines_with("tfd:")
        .filter_map(|rest| {
            let mut it = rest.split_whitespace();
            let fd = it.next()?.parse().ok()?;
            let mut events = None;
            let mut data = None;
            while let Some(k) = it.next() {
                match k {
                    "events:" => events = u32::from_str_radix(it.next()?, 16).ok(),
                    "data:" => data = u64::from_str_radix(it.next()?, 16).ok(),
                    _ => {}
                }
            }
            Some(EpollTarget {
                fd,
                events: events?,
                data: data?,
                via: None,
            })
        })
        .collect()
}

/// Whether fd `fd` of `pid` holds the file registered in epoll `efd` under number `tfd`.
fn registered_file_is(pid: i32, efd: i32, tfd: i32, fd: i32) -> bool {
    const KCMP_EPOLL_TFD: libc::c_long = 7;
    #[repr(C)]
    struct Slot {
        efd: u32,
        tfd: u32,
        toff: u32,
    }
    let slot = Slot {
        efd: efd as u32,
        tfd: tfd as u32,
        toff: 0,
    };
    // SAFETY: `slot` is a live `struct kcmp_epoll_slot` (three u32s, `repr(C)`), which the
    // kernel only reads; the other arguments are integers.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_EPOLL_TFD,
            fd,
            &slot as *const Slot,
        )
    };
    r == 0
}

/// The process's epoll fds in an order where an epoll inside another comes first.
pub fn install_order(p: &Process) -> Result<Vec<&Fd>> {
    let mut left: Vec<&Fd> = p
        .fds
        .iter()
        .filter(|f| matches!(f.file, FileDesc::Epoll { .. }))
        .collect();
    let epoll_fds: HashSet<i32> = left.iter().map(|f| f.fd).collect();
    let mut placed: HashSet<i32> = HashSet::new();
    let mut order = Vec::new();
    while !left.is_empty() {
        let before = left.len();
        left.retain(|f| {
            let FileDesc::Epoll { targets, .. } = &f.file else {
                return false;
            };
            let ready = targets.iter().all(|t| {
                let fd = t.via.unwrap_or(t.fd);
                !epoll_fds.contains(&fd) || placed.contains(&fd)
            });
            if ready {
                placed.insert(f.fd);
                order.push(*f);
            }
            !ready
        });
        if left.len() == before {
            let fds: Vec<String> = left.iter().map(|f| f.fd.to_string()).collect();
            bail!(
                "epoll fds {} watch each other in a cycle (corrupt manifest?)",
                fds.join(", ")
            );
        }
    }
    Ok(order)
}

pub fn restore(ins: &mut Installer, flags: i32, targets: &[EpollTarget]) -> Result<RawFd> {
    let _ = flags; // epoll files have no status flags worth restoring

    // SAFETY: integer arguments only; the fd returned is owned right below.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(errno_err("epoll_create1"));
    }
    // SAFETY: the call above succeeded: a new descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let fd = ins.keep_high(fd)?;
    let late: Vec<i32> = if ins.parked {
        super::late_places(ins.m, ins.p)
            .iter()
            .map(|s| s.0)
            .collect()
    } else {
        Vec::new()
    };
    for t in targets.iter().filter(|t| !late.contains(&t.fd)) {
        let mut ev = libc::epoll_event {
            events: t.events,
            u64: t.data,
        };
        let add = |ev: &mut libc::epoll_event| {
            // SAFETY: `ev` is a valid epoll_event for the call.
            if unsafe { libc::epoll_ctl(fd, libc::EPOLL_CTL_ADD, t.fd, ev) } < 0 {
                return Err(errno_err(format!(
                    "re-adding fd {} (events {:#x}) to the epoll",
                    t.fd, t.events
                )));
            }
            Ok(())
        };
        match t.via {
            None => add(&mut ev)?,
            Some(via) => add_via(ins, t.fd, via, || add(&mut ev))?,
        }
    }
    Ok(fd)
}

/// Runs `add` while fd number `num` holds the file of fd `via`: whatever holds `num`
/// now (another of the app's fds) is kept aside above `ins.high` and put back after,
/// with its close-on-exec flag.
fn add_via(
    ins: &mut Installer,
    num: RawFd,
    via: RawFd,
    add: impl FnOnce() -> Result<()>,
) -> Result<()> {
    // SAFETY: fcntl/dup3/close on fds of this restoring process only.
    let held = unsafe { libc::fcntl(num, libc::F_GETFD) };
    let aside = if held >= 0 {
        Some(ins.keep_high(super::dup_high(num, ins.high)?)?)
    } else {
        None
    };
    // SAFETY: integer arguments only. `num` is one of the app's fd numbers: what held it
    // (if anything) was moved aside above, so replacing it loses nothing.
    if unsafe { libc::dup3(via, num, 0) } < 0 {
        return Err(errno_err(format!(
            "putting fd {via} at {num} for its epoll registration"
        )));
    }
    let added = add();
    match aside {
        Some(a) => {
            // SAFETY: integer arguments only: the saved copy `a` goes back to `num`.
            if unsafe {
                libc::dup3(
                    a,
                    num,
                    if held & libc::FD_CLOEXEC != 0 {
                        libc::O_CLOEXEC
                    } else {
                        0
                    },
                )
            } < 0
            {
                return Err(errno_err(format!("putting fd {num} back")));
            }
        }
        // SAFETY: `num` now holds only the temporary duplicate of `via` made above (it was
        // free before), which nothing else refers to.
        None => unsafe {
            libc::close(num);
        },
    }
    added
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets() {
        let i = FdInfo::parse(
            "pos:\t0\nflags:\t02\nmnt_id:\t16\nino:\t1\n\
             tfd:        5 events:       19 data:                5  pos:0 ino:402 sdev:f\n\
             tfd:       12 events: 80000001 data: ffffffffffffffff  pos:0 ino:1 sdev:9\n"
                .into(),
        );
        assert_eq!(
            parse(&i),
            vec![
                EpollTarget {
                    fd: 5,
                    events: 0x19,
                    data: 5,
                    via: None,
                },
                EpollTarget {
                    fd: 12,
                    events: 0x8000_0001,
                    data: u64::MAX,
                    via: None,
                }
            ]
        );
    }

    fn epoll_fd(fd: i32, targets: &[i32]) -> Fd {
        Fd {
            fd,
            cloexec: false,
            ofd: fd as u32,
            file: FileDesc::Epoll {
                flags: 0,
                targets: targets
                    .iter()
                    .map(|&t| EpollTarget {
                        fd: t,
                        events: 1,
                        data: 0,
                        via: None,
                    })
                    .collect(),
            },
        }
    }

    #[test]
    fn nested_epolls_come_after_their_inner_ones() {
        let mut p = crate::fds::tests_support::process();
        p.fds = vec![epoll_fd(3, &[4, 0]), epoll_fd(4, &[5]), epoll_fd(5, &[1])];
        let order: Vec<i32> = install_order(&p).unwrap().iter().map(|f| f.fd).collect();
        assert_eq!(order, vec![5, 4, 3]);
        p.fds = vec![epoll_fd(3, &[4]), epoll_fd(4, &[3])];
        assert!(install_order(&p).is_err());
    }
}
