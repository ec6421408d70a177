//! Fills the uts, ipc and net namespaces a restored tree gets of its own (created by the
//! sandbox's init, `SpawnOptions::namespaces`) with what the dump recorded, from a
//! thread of the monitor that joins them through init's pidfd, while the app is still
//! held at the sandbox's gate: it runs only once they are complete. On failure the
//! caller drops the sandbox, and the namespaces die with it.
//!
//! Order, per namespace:
//! 1. uts: host name, domain name.
//! 2. ipc: the limits (`shmmax`, `msgmnb`, ...); then every shm segment (contents
//!    written), semaphore set (values) and message queue (`msg_qbytes`, then the
//!    messages in order), each created at its recorded id through `*_next_id`, by its
//!    recorded creator (`cuid`, `cgid`: this thread's effective ids are switched for the
//!    `*get`), then given its owner and mode; last the `*_next_id` values the namespace
//!    had.
//! 3. net: `lo`'s MTU and state, its addresses (and none the kernel added that it did
//!    not have), then the routes, then the sysctls the app had changed.

use std::os::fd::BorrowedFd;

use anyhow::{bail, Context, Result};
use warmstart_snapshots::model::{IpcNs, Namespaces, NetNs, RunContent, UtsNs, PAGE_SIZE};
use warmstart_snapshots::store::Snapshot;

use crate::sys::ipc::{self, Kind};
use crate::sys::ns;
use crate::sys::rtnl::{self, Addr, Route, Rtnl};
use crate::sys::sysctl;

/// Fills the namespaces of sandbox init `init_pidfd` with `nss`.
pub fn fill(init_pidfd: BorrowedFd<'_>, nss: &Namespaces, snap: &Snapshot) -> Result<()> {
    if let Some(uts) = &nss.uts {
        ns::run_in(
            init_pidfd,
            libc::CLONE_NEWUTS,
            "the new uts namespace",
            || fill_uts(uts),
        )
        .context("restoring the uts namespace")?;
    }
    if let Some(ipc) = &nss.ipc {
        ns::run_in(
            init_pidfd,
            libc::CLONE_NEWIPC,
            "the new ipc namespace",
            || fill_ipc(ipc, snap),
        )
        .context("restoring the ipc namespace (System V IPC)")?;
    }
    if let Some(net) = &nss.net {
        ns::run_in(
            init_pidfd,
            libc::CLONE_NEWNET,
            "the new network namespace",
            || fill_net(net),
        )
        .context("restoring the network namespace")?;
    }
    Ok(())
}

fn fill_uts(uts: &UtsNs) -> Result<()> {
    ns::set_uts_names(&uts.hostname, &uts.domainname)
}

fn is_next_id(name: &str) -> bool {
    name.ends_with("_next_id")
}

fn write_sysctl(name: &str, value: &str) -> Result<()> {
    sysctl::write(&format!("kernel/{name}"), value)
        .with_context(|| format!("writing {value:?} to /proc/sys/kernel/{name}"))
}

/// The network sysctls the app had changed, each written unless it already has its value
/// (a write to `conf/all/X` may have set an interface's `X` already).
fn fill_net_sysctls(net: &NetNs) -> Result<()> {
    for (name, value) in &net.sysctls {
        let what = || format!("sysctl {} = {value:?}", sysctl::dotted(name));
        match sysctl::read(name) {
            Ok(v) if v == *value => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "the snapshot's network namespace had {} changed by the app, and this \
                 host's kernel has no such setting (a module or feature of the host the \
                 dump was taken on, missing here?): restore on a host that has it",
                what()
            ),
            _ => {}
        }
        sysctl::write(name, value).with_context(|| {
            format!(
                "restoring {} in the instance's network namespace (the app had changed \
                 it)",
                what()
            )
        })?;
    }
    Ok(())
}

fn fill_ipc(ipc: &IpcNs, snap: &Snapshot) -> Result<()> {
    for (name, value) in ipc.sysctls.iter().filter(|(n, _)| !is_next_id(n)) {
        write_sysctl(name, value)?;
    }
    for seg in &ipc.shm {
        let p = &seg.perm;
        let what = || format!("System V shm segment {} (key {:#x})", p.id, p.key);
        ipc::create(Kind::Shm, p, seg.size).with_context(what)?;
        if seg
            .pages
            .iter()
            .any(|r| matches!(r.content, RunContent::Data { .. }))
        {
            let mut a = ipc::Attached::new(p.id, seg.size, true).with_context(what)?;
            let mut buf = Vec::new();
            for run in &seg.pages {
                let RunContent::Data { first } = run.content else {
                    continue; // zeros: the new segment has them
                };
                let mut done = 0;
                while done < run.count {
                    let n = (run.count - done).min(1024);
                    buf.resize(n as usize * PAGE_SIZE, 0);
                    snap.read_pages(first + done, n, &mut buf)
                        .with_context(what)?;
                    a.write(((run.page + done) as usize) * PAGE_SIZE, &buf);
                    done += n;
                }
            }
        }
        if p.mode & ipc::SHM_LOCKED != 0 {
            ipc::shm_lock(p.id).with_context(what)?;
        }
    }
    for set in &ipc.sem {
        let p = &set.perm;
        let what = || format!("System V semaphore set {} (key {:#x})", p.id, p.key);
        ipc::create(Kind::Sem, p, set.values.len() as u64).with_context(what)?;
        ipc::sem_set_values(p.id, &set.values).with_context(what)?;
    }
    for q in &ipc.msg {
        let p = &q.perm;
        let what = || format!("System V message queue {} (key {:#x})", p.id, p.key);
        ipc::create(Kind::Msg, p, 0).with_context(what)?;
        ipc::set_perm(Kind::Msg, p.id, p, Some(q.qbytes)).with_context(what)?;
        for m in &q.messages {
            ipc::msg_send(p.id, m).with_context(what)?;
        }
    }
    for (name, value) in ipc.sysctls.iter().filter(|(n, _)| is_next_id(n)) {
        if value != "-1" {
            write_sysctl(name, value)?;
        }
    }
    Ok(())
}

fn fill_net(net: &NetNs) -> Result<()> {
    let mut nl = Rtnl::open()?;
    let lo = nl
        .links()?
        .into_iter()
        .find(|l| l.name == "lo")
        .context("the new network namespace has no loopback interface")?;
    let addr = |a: &warmstart_snapshots::model::NetAddr| Addr {
        family: a.family,
        prefix_len: a.prefix_len,
        flags: a.flags,
        scope: a.scope,
        index: lo.index,
        addr: a.addr.clone(),
    };
    let show = |a: &[u8], len: u8| match a.len() {
        4 => format!(
            "{}/{len}",
            std::net::Ipv4Addr::from(<[u8; 4]>::try_from(a).unwrap())
        ),
        16 => format!(
            "{}/{len}",
            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(a).unwrap())
        ),
        _ => format!("{a:?}/{len}"),
    };
    nl.set_link(lo.index, net.lo_up, Some(net.lo_mtu))
        .map_err(|e| {
            rtnl::fail(
                format!("setting lo {}", if net.lo_up { "up" } else { "down" }),
                e,
            )
        })?;
    for a in &net.addrs {
        match nl.add_addr(&addr(a)) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => {
                return Err(rtnl::fail(
                    format!("adding address {} to lo", show(&a.addr, a.prefix_len)),
                    e,
                ))
            }
            _ => {}
        }
    }
    // The kernel adds 127.0.0.1/8 and ::1/128 when lo comes up: the app may have had
    // them removed.
    for a in nl.addrs()?.into_iter().filter(|a| a.index == lo.index) {
        let wanted = net
            .addrs
            .iter()
            .any(|w| (w.family, w.prefix_len, &w.addr) == (a.family, a.prefix_len, &a.addr));
        if !wanted {
            nl.del_addr(&a).map_err(|e| {
                rtnl::fail(
                    format!("removing address {} from lo", show(&a.addr, a.prefix_len)),
                    e,
                )
            })?;
        }
    }
    for r in &net.routes {
        let route = Route {
            family: r.family,
            dst_len: r.dst_len,
            table: r.table,
            protocol: r.protocol,
            scope: r.scope,
            kind: r.kind,
            dst: r.dst.clone(),
            oif: r.dev_lo.then_some(lo.index),
            gateway: r.gateway.clone(),
            prefsrc: r.prefsrc.clone(),
            priority: r.priority,
        };
        match nl.add_route(&route) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => {
                return Err(rtnl::fail(
                    format!(
                        "adding the route to {} (table {}) through lo",
                        if r.dst.is_empty() {
                            "default".to_owned()
                        } else {
                            show(&r.dst, r.dst_len)
                        },
                        r.table
                    ),
                    e,
                ))
            }
            _ => {}
        }
    }
    fill_net_sysctls(net)
}
