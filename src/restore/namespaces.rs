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

use std::os::fd::{AsFd, BorrowedFd};

use anyhow::{bail, Context, Result};
use warmstart_snapshots::model::{
    IpcNs, Namespaces, NetAddr, NetNs, NetVeth, RunContent, UtsNs, PAGE_SIZE,
};
use warmstart_snapshots::store::Snapshot;

use crate::sys::ipc::{self, Kind};
use crate::sys::ns;
use crate::sys::rtnl::{self, Addr, Route, Rtnl, VethSpec};
use crate::sys::sysctl;

/// Where the new peer of a snapshot's veth goes (`restore --veth NAME=HOSTNAME[@BRIDGE]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethMap {
    /// The veth of the snapshot's namespace.
    pub inner: String,
    /// Its new peer's name, in warmstart's namespace.
    pub outer: String,
    /// A bridge of warmstart's namespace the peer is made a port of.
    pub bridge: Option<String>,
}

impl VethMap {
    /// `NAME=HOSTNAME` or `NAME=HOSTNAME@BRIDGE`.
    pub fn parse(s: &str) -> std::result::Result<VethMap, String> {
        let (inner, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not NAME=HOSTNAME[@BRIDGE]"))?;
        let (outer, bridge) = match rest.split_once('@') {
            Some((o, b)) => (o, Some(b.to_owned())),
            None => (rest, None),
        };
        for (what, n) in [("NAME", inner), ("HOSTNAME", outer)]
            .into_iter()
            .chain(bridge.as_deref().map(|b| ("BRIDGE", b)))
        {
            if n.is_empty() || n.len() > 15 || n.contains(['/', ' ', '=', '@']) {
                return Err(format!(
                    "{s:?}: {what} {n:?} is not an interface name (1 to 15 characters, no \
                     '/', ' ', '=' or '@')"
                ));
            }
        }
        Ok(VethMap {
            inner: inner.to_owned(),
            outer: outer.to_owned(),
            bridge,
        })
    }
}

/// Fills the namespaces of sandbox init `init_pidfd` with `nss`; `veths`: where the new
/// peers of its veths go.
pub fn fill(
    init_pidfd: BorrowedFd<'_>,
    nss: &Namespaces,
    snap: &Snapshot,
    veths: &[VethMap],
) -> Result<()> {
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
        if let Some(m) = veths
            .iter()
            .find(|m| !net.veths.iter().any(|v| v.name == m.inner))
        {
            bail!(
                "--veth {}=...: the snapshot's network namespace has no veth named {} (it \
                 has: {})",
                m.inner,
                m.inner,
                net.veths
                    .iter()
                    .map(|v| v.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        // The new peers go to this (the monitor's) namespace.
        let here = std::fs::File::open("/proc/self/ns/net")
            .context("opening warmstart's network namespace")?;
        let mut host = if net.veths.is_empty() {
            None
        } else {
            Some(Rtnl::open()?)
        };
        ns::run_in(
            init_pidfd,
            libc::CLONE_NEWNET,
            "the new network namespace",
            || fill_net(net, veths, here.as_fd(), host.as_mut()),
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

/// Recreates veth `v` in this thread's namespace (at its index, with its MTU and MAC,
/// up if it was) with its new peer in `here` (`host`: a netlink socket there), named and
/// bridged as `map` says, else named as the old peer; the peer is brought up.
fn make_veth(
    nl: &mut Rtnl,
    host: &mut Rtnl,
    v: &NetVeth,
    map: Option<&VethMap>,
    here: BorrowedFd<'_>,
) -> Result<()> {
    let outer = match map {
        Some(m) => m.outer.as_str(),
        None if !v.peer.is_empty() => v.peer.as_str(),
        None => bail!(
            "the snapshot's network namespace has veth {} whose peer was not in the dumping \
             warmstart's namespace, so there is no name for its new peer: give one with \
             --veth {}=HOSTNAME[@BRIDGE]",
            v.name,
            v.name
        ),
    };
    let ours = host.links()?;
    if ours.iter().any(|l| l.name == outer) {
        bail!(
            "cannot recreate veth {} of the snapshot: its new peer would be named {outer}, and \
             this host already has an interface {outer} (another instance of the snapshot, \
             or the original's peer still there?); remove it, or name the peer with --veth \
             {}=HOSTNAME",
            v.name,
            v.name
        );
    }
    let bridge = match map.and_then(|m| m.bridge.as_deref()) {
        Some(b) => Some(
            ours.iter()
                .find(|l| l.name == b && l.kind == "bridge")
                .map(|l| l.index)
                .with_context(|| {
                    format!(
                        "--veth {}={outer}@{b}: this host has no bridge named {b}",
                        v.name
                    )
                })?,
        ),
        None => None,
    };
    nl.create_veth(&VethSpec {
        index: v.index,
        name: &v.name,
        mtu: v.mtu,
        mac: &v.mac,
        peer: outer,
        peer_ns: here,
    })
    .map_err(|e| {
        rtnl::fail(
            format!(
                "creating veth {} (index {}) with its peer {outer} on this host",
                v.name, v.index
            ),
            e,
        )
    })?;
    if v.up {
        nl.set_link(v.index, true, None)
            .map_err(|e| rtnl::fail(format!("bringing {} up", v.name), e))?;
    }
    let peer = host
        .links()?
        .into_iter()
        .find(|l| l.name == outer)
        .with_context(|| {
            format!(
                "the new peer {outer} of veth {} is not on this host",
                v.name
            )
        })?;
    if let Some(b) = bridge {
        host.set_master(peer.index, b)
            .map_err(|e| rtnl::fail(format!("adding {outer} to its bridge"), e))?;
    }
    host.set_link(peer.index, true, None)
        .map_err(|e| rtnl::fail(format!("bringing {outer} up"), e))
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

/// Runs in the new namespace. `here`: warmstart's namespace, where the new veth peers go
/// (`host`: a netlink socket of it).
fn fill_net(
    net: &NetNs,
    veths: &[VethMap],
    here: BorrowedFd<'_>,
    mut host: Option<&mut Rtnl>,
) -> Result<()> {
    let mut nl = Rtnl::open()?;
    let lo = nl
        .links()?
        .into_iter()
        .find(|l| l.name == "lo")
        .context("the new network namespace has no loopback interface")?;
    let addr_on = |a: &NetAddr, index: i32| Addr {
        family: a.family,
        prefix_len: a.prefix_len,
        flags: a.flags,
        scope: a.scope,
        index,
        addr: a.addr.clone(),
    };
    let addr = |a: &NetAddr| addr_on(a, lo.index);
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
    for v in &net.veths {
        let map = veths.iter().find(|m| m.inner == v.name);
        let host = host
            .as_deref_mut()
            .context("no netlink socket of warmstart's namespace")?;
        make_veth(&mut nl, host, v, map, here)?;
        for a in &v.addrs {
            match nl.add_addr(&addr_on(a, v.index)) {
                Err(e) if e.raw_os_error() != Some(libc::EEXIST) => {
                    return Err(rtnl::fail(
                        format!(
                            "adding address {} to {}",
                            show(&a.addr, a.prefix_len),
                            v.name
                        ),
                        e,
                    ))
                }
                _ => {}
            }
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
            oif: r.oif,
            gateway: r.gateway.clone(),
            prefsrc: r.prefsrc.clone(),
            priority: r.priority,
        };
        match nl.add_route(&route) {
            Err(e) if e.raw_os_error() != Some(libc::EEXIST) => {
                return Err(rtnl::fail(
                    format!(
                        "adding the route to {} (table {}) through interface {}",
                        if r.dst.is_empty() {
                            "default".to_owned()
                        } else {
                            show(&r.dst, r.dst_len)
                        },
                        r.table,
                        r.oif.map_or("none".to_owned(), |i| i.to_string())
                    ),
                    e,
                ))
            }
            _ => {}
        }
    }
    fill_net_sysctls(net)
}
