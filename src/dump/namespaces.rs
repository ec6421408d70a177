//! The namespaces a tree runs in, and the state of those a restore recreates.
//!
//! Every process of the tree must share the root's namespaces (nested ones are
//! refused). Then, for the root, kind by kind against warmstart's own (the host's):
//!
//! 1. **uts, ipc, net** of its own: recorded ([`collect`]) and recreated by a restore —
//!    host and domain name; System V shm segments (contents through the page store),
//!    semaphore sets and message queues at their exact ids, with the namespace's ipc
//!    limits; the loopback interface's state, addresses and routes, and the network
//!    sysctls the app changed (those that differ from a new namespace's). Anything else
//!    in a network namespace (another interface) is refused by name.
//! 2. **pid**: handled by the process collection (pids as the tree sees them).
//! 3. **mnt**: a restore gives every instance a mount namespace of its own with a fresh
//!    `/proc` (and its own `/dev/pts`, `/tmp` and private directories), so a mount
//!    namespace that differs from the host's only there (as `unshare --mount-proc`
//!    makes, or warmstart's own sandbox) is fine; any other mount of its own is refused
//!    by mount point.
//! 4. **user, cgroup** of its own: refused.
//! 5. **time**: the clocks are recorded as the tree sees them (see `sys::timens`).
//!
//! The namespace state is read from a thread of warmstart's that joins the tree's
//! namespace ([`crate::sys::ns::run_in`]), so reading never touches the frozen tree.

use std::collections::HashSet;
use std::os::fd::AsFd;

use anyhow::{bail, Context, Result};
use warmstart_snapshots::model::{
    IpcNs, MsgQueue, Namespaces, NetAddr, NetNs, NetRoute, NetVeth, SemSet, ShmSegment, UtsNs,
    PAGE_SIZE,
};
use warmstart_snapshots::PageWriter;

use crate::sys::ipc::{self, Kind};
use crate::sys::ns;
use crate::sys::rtnl::Rtnl;
use crate::sys::sysctl;

/// The ipc namespace's settings kept (`/proc/sys/kernel/NAME`); the `*_next_id` ones
/// are written last at restore, after the objects are created.
pub const IPC_SYSCTLS: [&str; 11] = [
    "shmmax",
    "shmall",
    "shmmni",
    "shm_rmid_forced",
    "msgmax",
    "msgmnb",
    "msgmni",
    "sem",
    "shm_next_id",
    "sem_next_id",
    "msg_next_id",
];

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Refuses what a restore could not recreate and collects the state of the tree's own
/// uts, ipc and net namespaces. `order`: the tree's pids, root first, zombies left out;
/// `private`: the
/// directories the sandbox mounts privately (a private `/tmp` included when the tree has
/// one).
pub fn collect(
    order: &[i32],
    private: &[String],
    writer: &mut PageWriter<'_>,
) -> Result<Namespaces> {
    let root = order[0];
    let id = |pid: i32, kind: &str| {
        ns::id(&pid.to_string(), kind)
            .with_context(|| format!("reading the {kind} namespace of process {pid}"))
    };
    for &pid in &order[1..] {
        for kind in ["uts", "ipc", "net", "mnt", "user", "cgroup"] {
            if id(pid, kind)? != id(root, kind)? {
                bail!(
                    "process {pid} ({}) runs in a {kind} namespace of its own, nested in \
                     the one of the tree's root {root} ({}): nested namespaces inside the \
                     app are not supported; dump a tree whose processes share their \
                     namespaces",
                    comm(pid),
                    comm(root)
                );
            }
        }
    }
    let own = |kind: &str| -> Result<bool> {
        Ok(id(root, kind)?
            != ns::id("self", kind).with_context(|| format!("reading our {kind} namespace"))?)
    };
    for (kind, what) in [("user", "user"), ("cgroup", "cgroup")] {
        if own(kind)? {
            bail!(
                "process {root} ({}) runs in a {what} namespace of its own: {what} \
                 namespaces are not restored; dump a tree that runs in warmstart's {what} \
                 namespace",
                comm(root)
            );
        }
    }
    if own("pid")? && super::process::pid_in_own_ns(root) == Some(1) {
        // The root is the namespace's init, restored as the sandbox's init: every other
        // process of the namespace must be in the tree (one that joined it with setns,
        // or its descendants, would be missing from the instance).
        let ns_pid = id(root, "pid")?;
        let procs = std::fs::read_dir("/proc").context("listing the processes in /proc")?;
        let pids = procs.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok());
        for pid in pids {
            if order.contains(&pid) || ns::id(&pid.to_string(), "pid").ok() != Some(ns_pid) {
                continue;
            }
            if is_zombie(pid) {
                continue;
            }
            bail!(
                "process {pid} ({}) runs in the pid namespace whose init is the tree's root \
                 {root} ({}) but is not one of its descendants (it joined the namespace, \
                 e.g. with nsenter): a restore of the namespace would lack it; end it, then \
                 dump again",
                comm(pid),
                comm(root)
            );
        }
    }
    if own("mnt")? {
        check_mounts(order, private)?;
    }
    let attaches = sysv_attaches(order)?;
    if let Some(a) = attaches.first().filter(|_| !own("ipc").unwrap_or(false)) {
        bail!(
            "process {} ({}) has System V shared memory segment {} attached at {:x} \
             (shmat), a segment of the host's ipc namespace: its contents are shared with \
             the host's other processes and are not in a snapshot, so only segments of an \
             ipc namespace of the tree's own are restored; run the app in one (warmstart \
             record --ipc, or unshare --ipc)",
            a.pid,
            comm(a.pid),
            a.map.inode,
            a.map.start
        );
    }
    let mut out = Namespaces::default();
    if own("uts")? {
        let fd = ns::open(root, "uts")?;
        let (hostname, domainname) = ns::run_in(
            fd.as_fd(),
            libc::CLONE_NEWUTS,
            "the tree's uts namespace",
            ns::uts_names,
        )?;
        out.uts = Some(UtsNs {
            hostname,
            domainname,
        });
    }
    if own("ipc")? {
        let fd = ns::open(root, "ipc")?;
        out.ipc = Some(ns::run_in(
            fd.as_fd(),
            libc::CLONE_NEWIPC,
            "the tree's ipc namespace",
            || collect_ipc(root, &attaches, writer),
        )?);
    }
    if own("net")? {
        // What a new namespace starts with (a restore's does the same on this host).
        let fresh = ns::run_unshared(libc::CLONE_NEWNET, || {
            sysctl::net_settings().context("reading the sysctls of a new network namespace")
        })?;
        // Where the peers of the tree's veths may be.
        let ours = Rtnl::open()?
            .links()
            .context("listing this namespace's network interfaces")?;
        let fd = ns::open(root, "net")?;
        out.net = Some(ns::run_in(
            fd.as_fd(),
            libc::CLONE_NEWNET,
            "the tree's network namespace",
            || collect_net(root, &fresh, &ours),
        )?);
    }
    Ok(out)
}

/// Whether `pid` is a zombie (or gone).
fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            Some(rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// One line of `mountinfo`: (mount point, filesystem type, source).
fn mounts(text: &str) -> Vec<(String, String, String)> {
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            let mut r = right.split(' ');
            Some((unescape(point), r.next()?.to_owned(), r.next()?.to_owned()))
        })
        .collect()
}

/// `mountinfo` escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points a restore's sandbox makes itself: these may differ from the host's.
fn recreated(point: &str, private: &[String]) -> bool {
    let under =
        |dir: &str| point == dir || point.strip_prefix(dir).is_some_and(|r| r.starts_with('/'));
    ["/proc", "/dev/pts"].iter().any(|d| under(d)) || private.iter().any(|d| under(d))
}

/// The mounts the tree sees that the host does not have (besides what a restore mounts
/// itself) are refused. Read through a process of the tree's mount namespace whose root
/// is `/` (the tree's root, or its parent: a sandbox's init), since `mountinfo` shows
/// only what lies under a process's root.
fn check_mounts(order: &[i32], private: &[String]) -> Result<()> {
    let root = order[0];
    let mnt = ns::id(&root.to_string(), "mnt")?;
    let parent = std::fs::read_to_string(format!("/proc/{root}/stat"))
        .ok()
        .and_then(|s| {
            s[s.rfind(')')? + 2..]
                .split_whitespace()
                .nth(1)?
                .parse::<i32>()
                .ok()
        });
    let viewer = order.iter().copied().chain(parent).find(|&p| {
        ns::id(&p.to_string(), "mnt").ok() == Some(mnt)
            && std::fs::read_link(format!("/proc/{p}/root"))
                .ok()
                .as_deref()
                == Some(std::path::Path::new("/"))
    });
    let Some(viewer) = viewer else {
        tracing::debug!(
            "no process of the tree's mount namespace has / as its root: mounts not compared"
        );
        return Ok(());
    };
    let theirs = std::fs::read_to_string(format!("/proc/{viewer}/mountinfo"))
        .with_context(|| format!("reading the mounts of process {viewer}"))?;
    let ours = std::fs::read_to_string("/proc/self/mountinfo").context("reading our mounts")?;
    let ours: HashSet<(String, String, String)> = mounts(&ours).into_iter().collect();
    for m in mounts(&theirs) {
        if !recreated(&m.0, private) && !ours.contains(&m) {
            bail!(
                "process {root} ({}) runs in a mount namespace of its own where {} is \
                 mounted ({} from {}) unlike on the host: mount namespaces are not \
                 restored (only a fresh /proc is); unmount it, or dump a tree that sees \
                 the host's mounts",
                comm(root),
                m.0,
                m.1,
                m.2
            );
        }
    }
    Ok(())
}

/// A mapping of a System V shared memory segment by a process of the tree.
#[derive(Clone)]
struct Attach {
    pid: i32,
    /// Its inode is the segment's id.
    map: crate::sys::maps::MapEntry,
}

/// Every mapping of a System V segment by the tree's processes, per process in address
/// order.
fn sysv_attaches(order: &[i32]) -> Result<Vec<Attach>> {
    let mut out = Vec::new();
    for &pid in order {
        let path = format!("/proc/{pid}/maps");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let maps = crate::sys::maps::parse(&text).with_context(|| format!("parsing {path}"))?;
        out.extend(
            maps.into_iter()
                .filter(|m| m.shared && m.dev.0 == 0 && super::vmas::sysv_name(&m.name))
                .map(|map| Attach { pid, map }),
        );
    }
    Ok(out)
}

/// Checks that the tree's mappings of segment `id` (`size` bytes, `nattch` mappings in
/// all) can be attached again: they are all the tree's, and each attach is whole (its
/// VMAs, split by `mprotect` perhaps, cover the segment from its start to its end).
fn check_attaches(root: i32, id: i32, size: u64, nattch: u64, attaches: &[Attach]) -> Result<()> {
    let mine: Vec<&Attach> = attaches
        .iter()
        .filter(|a| a.map.inode == id as u64)
        .collect();
    if nattch != mine.len() as u64 {
        bail!(
            "System V shared memory segment {id} in the ipc namespace of process {root} ({}) \
             is attached {nattch} time(s), {} of them by the tree: a process outside the \
             tree has it attached, and its view of the segment would not follow the \
             restored one; dump the whole tree that shares it",
            comm(root),
            mine.len()
        );
    }
    let whole = size.div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64;
    let mut i = 0;
    while i < mine.len() {
        let first = mine[i];
        if first.map.offset != 0 {
            bail!(
                "process {} ({}) has System V shared memory segment {id} mapped at {:x} from \
                 offset {:#x} without its start: part of that attach was unmapped, which \
                 a restore cannot attach again",
                first.pid,
                comm(first.pid),
                first.map.start,
                first.map.offset
            );
        }
        let base = first.map.start;
        let mut end = first.map.end;
        i += 1;
        while i < mine.len()
            && mine[i].pid == first.pid
            && mine[i].map.start == end
            && mine[i].map.offset == end - base
        {
            end = mine[i].map.end;
            i += 1;
        }
        if end - base != whole {
            bail!(
                "process {} ({}) has System V shared memory segment {id} ({size} bytes) \
                 attached at {base:x} with only {:#x} bytes of it mapped: part of that \
                 attach was unmapped, which a restore cannot attach again",
                first.pid,
                comm(first.pid),
                end - base
            );
        }
    }
    Ok(())
}

/// Runs in the tree's ipc namespace.
fn collect_ipc(root: i32, attaches: &[Attach], writer: &mut PageWriter<'_>) -> Result<IpcNs> {
    let mut out = IpcNs::default();
    for name in IPC_SYSCTLS {
        let path = format!("/proc/sys/kernel/{name}");
        match std::fs::read_to_string(&path) {
            Ok(v) => out.sysctls.push((name.to_owned(), v.trim().to_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {path}")),
        }
    }
    let msgmax: usize = out
        .sysctls
        .iter()
        .find(|(n, _)| n == "msgmax")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(8192);
    for seg in ipc::list(Kind::Shm)? {
        let (id, key) = (seg.perm.id, seg.perm.key);
        let nattch = seg.field("nattch");
        check_attaches(root, id, seg.field("size"), nattch, attaches)?;
        let size = seg.field("size");
        let pages = shm_contents(id, size, writer)
            .with_context(|| format!("reading System V shm segment {id} (key {key:#x})"))?;
        out.shm.push(ShmSegment {
            perm: seg.perm,
            size,
            pages,
        });
    }
    for set in ipc::list(Kind::Sem)? {
        let values = ipc::sem_values(set.perm.id, set.field("nsems") as usize)?;
        out.sem.push(SemSet {
            perm: set.perm,
            values,
        });
    }
    for q in ipc::list(Kind::Msg)? {
        let id = q.perm.id;
        let messages = ipc::msg_copy_all(id, q.field("qnum") as usize, msgmax)?;
        out.msg.push(MsgQueue {
            qbytes: ipc::msg_qbytes(id)?,
            perm: q.perm,
            messages,
        });
    }
    out.shm.sort_by_key(|s| s.perm.id);
    out.sem.sort_by_key(|s| s.perm.id);
    out.msg.sort_by_key(|s| s.perm.id);
    Ok(out)
}

/// The contents of segment `id` as page runs (holes are read as zeros and not stored).
fn shm_contents(
    id: i32,
    size: u64,
    writer: &mut PageWriter<'_>,
) -> Result<Vec<warmstart_snapshots::model::PageRun>> {
    let a = ipc::Attached::new(id, size, false)?;
    let file = a.file()?;
    const CHUNK: usize = 4 << 20;
    let total = (size as usize).div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let mut buf = vec![0u8; CHUNK.min(total)];
    let mut pages = Vec::new();
    let mut at = 0usize;
    while at < total {
        let n = CHUNK.min(total - at);
        let got = ipc::pread_full(&file, &mut buf[..n], at as u64)?;
        buf[got..n].fill(0);
        writer.add_pages((at / PAGE_SIZE) as u64, &buf[..n], &mut pages)?;
        at += n;
    }
    Ok(pages)
}

/// Runs in the tree's network namespace; `fresh`: the sysctls of a new one; `ours`: the
/// interfaces of the dumper's namespace (where a veth's peer may be).
fn collect_net(
    root: i32,
    fresh: &[(String, String)],
    ours: &[crate::sys::rtnl::Link],
) -> Result<NetNs> {
    let mut nl = Rtnl::open()?;
    let links = nl.links()?;
    if let Some(other) = links.iter().find(|l| l.name != "lo" && l.kind != "veth") {
        let kind = if other.kind.is_empty() {
            "device"
        } else {
            &other.kind
        };
        bail!(
            "process {root} ({}) runs in a network namespace of its own with interface \
             {} ({kind}): only the loopback interface and veth interfaces of a network \
             namespace are restored; remove it (ip link del {}) or dump a tree in the \
             host's network namespace",
            comm(root),
            other.name,
            other.name
        );
    }
    if let Some(v) = links
        .iter()
        .find(|l| l.kind == "veth" && l.link_netnsid.is_none())
    {
        bail!(
            "process {root} ({}) runs in a network namespace of its own with veth {} whose \
             peer is in the same namespace: only veths whose peer is outside are restored; \
             remove the pair (ip link del {}) or dump a tree in the host's network namespace",
            comm(root),
            v.name,
            v.name
        );
    }
    let lo = links
        .iter()
        .find(|l| l.name == "lo")
        .context("the network namespace has no loopback interface")?;
    let all_addrs = nl.addrs()?;
    let net_addr = |a: &crate::sys::rtnl::Addr| NetAddr {
        family: a.family,
        prefix_len: a.prefix_len,
        flags: a.flags,
        scope: a.scope,
        addr: a.addr.clone(),
    };
    let addrs = all_addrs
        .iter()
        .filter(|a| a.index == lo.index)
        .map(net_addr)
        .collect();
    let veths = links
        .iter()
        .filter(|l| l.kind == "veth")
        .map(|v| NetVeth {
            index: v.index,
            name: v.name.clone(),
            mtu: v.mtu,
            mac: v.mac.clone(),
            up: v.flags & libc::IFF_UP as u32 != 0,
            // The kernel's own (IPv6 link-local, from the MAC) come back by themselves.
            addrs: all_addrs
                .iter()
                .filter(|a| a.index == v.index && a.flags & IFA_F_PERMANENT != 0)
                .map(net_addr)
                .collect(),
            peer: ours
                .iter()
                .find(|o| o.kind == "veth" && o.link == Some(v.index) && v.link == Some(o.index))
                .map(|o| o.name.clone())
                .unwrap_or_default(),
        })
        .collect();
    let routes = nl
        .routes()?
        .into_iter()
        .filter(|r| r.protocol != libc::RTPROT_KERNEL)
        .map(|r| NetRoute {
            family: r.family,
            dst_len: r.dst_len,
            table: r.table,
            protocol: r.protocol,
            scope: r.scope,
            kind: r.kind,
            oif: r.oif,
            dst: r.dst,
            gateway: r.gateway,
            prefsrc: r.prefsrc,
            priority: r.priority,
        })
        .collect();
    let now = sysctl::net_settings()
        .with_context(|| format!("reading the sysctls of process {root}'s network namespace"))?;
    Ok(NetNs {
        lo_up: lo.flags & libc::IFF_UP as u32 != 0,
        lo_mtu: lo.mtu,
        addrs,
        routes,
        sysctls: sysctl::changed(&now, fresh),
        veths,
    })
}

/// `IFA_F_PERMANENT`: an address added by hand (or by a program), not by the kernel.
const IFA_F_PERMANENT: u32 = 0x80;

#[cfg(test)]
mod tests {
    use super::*;

    fn attach(pid: i32, start: u64, end: u64, offset: u64, id: u64) -> Attach {
        Attach {
            pid,
            map: crate::sys::maps::MapEntry {
                start,
                end,
                read: true,
                write: true,
                exec: false,
                shared: true,
                offset,
                dev: (0, 1),
                inode: id,
                name: "/SYSV00005158 (deleted)".into(),
                vm_flags: Vec::new(),
            },
        }
    }

    #[test]
    fn attaches_must_be_whole_and_the_trees() {
        const P: u64 = PAGE_SIZE as u64;
        // Segment 7: 3 pages + 100 bytes, attached twice by process 10 (once split in
        // three by mprotect) and once by process 11.
        let all = [
            attach(10, 0x10000, 0x10000 + P, 0, 7),
            attach(10, 0x10000 + P, 0x10000 + 2 * P, P, 7),
            attach(10, 0x10000 + 2 * P, 0x10000 + 4 * P, 2 * P, 7),
            attach(10, 0x40000, 0x40000 + 4 * P, 0, 7),
            attach(11, 0x40000, 0x40000 + 4 * P, 0, 7),
            attach(11, 0x90000, 0x90000 + P, 0, 8),
        ];
        let size = 3 * P + 100;
        check_attaches(1, 7, size, 5, &all).unwrap();
        let e = check_attaches(1, 7, size, 6, &all).unwrap_err().to_string();
        assert!(
            e.contains("attached 6 time(s), 5 of them by the tree"),
            "{e}"
        );
        // The head of an attach unmapped.
        let e = check_attaches(1, 7, size, 4, &all[1..])
            .unwrap_err()
            .to_string();
        assert!(e.contains("from offset 0x1000 without its start"), "{e}");
        // Its tail unmapped.
        let e = check_attaches(1, 7, size, 2, &all[..2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("with only 0x2000 bytes of it mapped"), "{e}");
        // A hole in the middle.
        let holed = [all[0].clone(), all[2].clone()];
        let e = check_attaches(1, 7, size, 2, &holed)
            .unwrap_err()
            .to_string();
        assert!(e.contains("with only 0x1000 bytes"), "{e}");
    }

    #[test]
    fn mountinfo_lines() {
        let text = "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n\
                    30 22 0:5 / /mnt/a\\040b rw - tmpfs tmpfs rw\n";
        assert_eq!(
            mounts(text),
            vec![
                ("/".into(), "ext4".into(), "/dev/vda1".into()),
                ("/mnt/a b".into(), "tmpfs".into(), "tmpfs".into())
            ]
        );
        assert!(recreated("/proc", &[]));
        assert!(recreated("/proc/sys/fs/binfmt_misc", &[]));
        assert!(!recreated("/process", &[]));
        assert!(recreated(
            "/tmp/hsperfdata_x",
            &["/tmp/hsperfdata_x".into()]
        ));
        assert!(!recreated("/tmp", &[]));
        assert!(!recreated("/mnt", &[]));
    }
}
