//! `NETLINK_ROUTE` (rtnetlink) for the calling thread's network namespace: links,
//! addresses and routes, listed and created. A netlink socket stays bound to the
//! namespace it was created in, so [`Rtnl::open`] on a thread inside another namespace
//! (see [`crate::sys::ns::run_in`]) talks to that one.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{anyhow, bail, Result};

const NLMSG_HDR: usize = 16;
pub const RTM_NEWLINK: u16 = 16;
pub const RTM_GETLINK: u16 = 18;
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_DELADDR: u16 = 21;
pub const RTM_GETADDR: u16 = 22;
pub const RTM_NEWROUTE: u16 = 24;
pub const RTM_GETROUTE: u16 = 26;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINK: u16 = 5;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_LINK_NETNSID: u16 = 37;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
/// `NLA_F_NESTED`, set on the nested attributes the kernel parses strictly.
const NESTED: u16 = 0x8000;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_FLAGS: u16 = 8;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PRIORITY: u16 = 6;
const RTA_PREFSRC: u16 = 7;
const RTA_TABLE: u16 = 15;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Walks the `rtattr`s of `payload` after `fixed` bytes: (type without the nested
/// bit, data).
pub fn attrs(payload: &[u8], fixed: usize) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = payload.get(fixed..).unwrap_or(&[]);
    std::iter::from_fn(move || {
        if rest.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let ty = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            return None;
        }
        let data = &rest[4..len];
        rest = &rest[align4(len).min(rest.len())..];
        Some((ty, data))
    })
}

/// Appends one attribute to a message body.
fn put_attr(body: &mut Vec<u8>, ty: u16, data: &[u8]) {
    body.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    body.extend_from_slice(&ty.to_ne_bytes());
    body.extend_from_slice(data);
    body.resize(align4(body.len()), 0);
}

fn u32_of(d: &[u8]) -> u32 {
    d.get(..4)
        .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
        .unwrap_or(0)
}

/// `s` with its terminating NUL, as names go in netlink attributes.
fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn str_of(d: &[u8]) -> String {
    String::from_utf8_lossy(d.split(|&b| b == 0).next().unwrap_or(d)).into_owned()
}

/// A network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: i32,
    pub name: String,
    /// `IFF_*`.
    pub flags: u32,
    pub mtu: u32,
    /// `IFLA_INFO_KIND` (`veth`, `bridge`, ...): empty for a device without one (`lo`, a
    /// physical NIC).
    pub kind: String,
    /// `IFLA_LINK`: for a veth, its peer's index (in the peer's namespace).
    pub link: Option<i32>,
    /// `IFLA_LINK_NETNSID`: for a veth whose peer is in another namespace, that
    /// namespace's id here (none when the peer is in this one).
    pub link_netnsid: Option<i32>,
    /// `IFLA_ADDRESS`: the hardware (MAC) address.
    pub mac: Vec<u8>,
}

/// One end of a veth pair to create in the calling thread's namespace, with its peer in
/// another.
#[derive(Debug, Clone)]
pub struct VethSpec<'a> {
    /// Interface index wanted for this end (0: any).
    pub index: i32,
    pub name: &'a str,
    pub mtu: u32,
    pub mac: &'a [u8],
    pub peer: &'a str,
    /// The peer's network namespace (an fd of `/proc/PID/ns/net`).
    pub peer_ns: std::os::fd::BorrowedFd<'a>,
}

/// An address of an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addr {
    pub family: u8,
    pub prefix_len: u8,
    pub flags: u32,
    pub scope: u8,
    pub index: i32,
    pub addr: Vec<u8>,
}

/// A route.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Route {
    pub family: u8,
    pub dst_len: u8,
    pub table: u32,
    pub protocol: u8,
    pub scope: u8,
    pub kind: u8,
    pub dst: Vec<u8>,
    pub oif: Option<i32>,
    pub gateway: Option<Vec<u8>>,
    pub prefsrc: Option<Vec<u8>>,
    pub priority: Option<u32>,
}

pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

impl Rtnl {
    /// A route netlink socket in the calling thread's network namespace.
    pub fn open() -> Result<Rtnl> {
        // SAFETY: integer arguments only; the fd returned is owned right below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            bail!("socket(NETLINK_ROUTE): {}", std::io::Error::last_os_error());
        }
        Ok(Rtnl {
            // SAFETY: `socket` succeeded: a new descriptor owned by nothing else.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            seq: 0,
        })
    }

    fn send(&mut self, ty: u16, flags: i32, body: &[u8]) -> Result<u32> {
        self.seq += 1;
        let mut req = Vec::with_capacity(NLMSG_HDR + body.len());
        req.extend_from_slice(&((NLMSG_HDR + body.len()) as u32).to_ne_bytes());
        req.extend_from_slice(&ty.to_ne_bytes());
        req.extend_from_slice(&((libc::NLM_F_REQUEST | flags) as u16).to_ne_bytes());
        req.extend_from_slice(&self.seq.to_ne_bytes());
        req.extend_from_slice(&0u32.to_ne_bytes());
        req.extend_from_slice(body);
        // SAFETY: the pointer and length describe `req`, a live buffer `send` only reads.
        if unsafe { libc::send(self.fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
            bail!("sending to rtnetlink: {}", std::io::Error::last_os_error());
        }
        Ok(self.seq)
    }

    /// Reads answers to request `seq`, calling `each` with every message's (type,
    /// payload), until `NLMSG_DONE` or the ack (an error ack is returned as the errno).
    fn answers(&mut self, seq: u32, mut each: impl FnMut(u16, &[u8])) -> Result<()> {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let (fd, len) = (self.fd.as_raw_fd(), buf.len());
            // SAFETY: the pointer and length describe `buf`, a live writable buffer.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), len, 0) };
            if n < 0 {
                bail!(
                    "reading from rtnetlink: {}",
                    std::io::Error::last_os_error()
                );
            }
            let mut msgs = &buf[..n as usize];
            while msgs.len() >= NLMSG_HDR {
                let len = u32_of(&msgs[0..4]) as usize;
                let ty = u16::from_ne_bytes([msgs[4], msgs[5]]);
                let mseq = u32_of(&msgs[8..12]);
                if len < NLMSG_HDR || len > msgs.len() {
                    bail!("malformed rtnetlink answer");
                }
                if mseq == seq {
                    match ty as i32 {
                        libc::NLMSG_DONE => return Ok(()),
                        libc::NLMSG_ERROR => {
                            let e = i32::from_ne_bytes(msgs[16..20].try_into().unwrap());
                            if e == 0 {
                                return Ok(());
                            }
                            return Err(std::io::Error::from_raw_os_error(-e).into());
                        }
                        _ => each(ty, &msgs[NLMSG_HDR..len]),
                    }
                }
                msgs = &msgs[align4(len).min(msgs.len())..];
            }
        }
    }

    fn dump(&mut self, ty: u16, body: &[u8]) -> Result<Vec<Vec<u8>>> {
        let seq = self.send(ty, libc::NLM_F_DUMP, body)?;
        let mut out = Vec::new();
        self.answers(seq, |_, p| out.push(p.to_vec()))?;
        Ok(out)
    }

    /// Sends a request with `NLM_F_ACK` and waits for its ack.
    fn request(&mut self, ty: u16, flags: i32, body: &[u8]) -> std::io::Result<()> {
        let seq = self
            .send(ty, flags | libc::NLM_F_ACK, body)
            .map_err(std::io::Error::other)?;
        self.answers(seq, |_, _| {})
            .map_err(|e| match e.downcast::<std::io::Error>() {
                Ok(io) => io,
                Err(e) => std::io::Error::other(e),
            })
    }

    pub fn links(&mut self) -> Result<Vec<Link>> {
        let msgs = self.dump(RTM_GETLINK, &[0u8; 16])?;
        Ok(msgs
            .iter()
            .filter(|p| p.len() >= 16)
            .map(|p| {
                let mut l = Link {
                    index: u32_of(&p[4..8]) as i32,
                    flags: u32_of(&p[8..12]),
                    name: String::new(),
                    mtu: 0,
                    kind: String::new(),
                    link: None,
                    link_netnsid: None,
                    mac: Vec::new(),
                };
                for (ty, d) in attrs(p, 16) {
                    match ty {
                        IFLA_IFNAME => l.name = str_of(d),
                        IFLA_MTU => l.mtu = u32_of(d),
                        IFLA_LINK => l.link = Some(u32_of(d) as i32),
                        IFLA_LINK_NETNSID => l.link_netnsid = Some(u32_of(d) as i32),
                        IFLA_ADDRESS => l.mac = d.to_vec(),
                        IFLA_LINKINFO => {
                            for (t, k) in attrs(d, 0) {
                                if t == IFLA_INFO_KIND {
                                    l.kind = str_of(k);
                                }
                            }
                        }
                        _ => {}
                    }
                }
                l
            })
            .collect())
    }

    pub fn addrs(&mut self) -> Result<Vec<Addr>> {
        let msgs = self.dump(RTM_GETADDR, &[0u8; 8])?;
        Ok(msgs
            .iter()
            .filter(|p| p.len() >= 8)
            .map(|p| {
                let mut a = Addr {
                    family: p[0],
                    prefix_len: p[1],
                    flags: p[2] as u32,
                    scope: p[3],
                    index: u32_of(&p[4..8]) as i32,
                    addr: Vec::new(),
                };
                let mut address = Vec::new();
                for (ty, d) in attrs(p, 8) {
                    match ty {
                        IFA_LOCAL => a.addr = d.to_vec(),
                        IFA_ADDRESS => address = d.to_vec(),
                        IFA_FLAGS => a.flags = u32_of(d),
                        _ => {}
                    }
                }
                if a.addr.is_empty() {
                    a.addr = address;
                }
                a
            })
            .collect())
    }

    pub fn routes(&mut self) -> Result<Vec<Route>> {
        let msgs = self.dump(RTM_GETROUTE, &[0u8; 12])?;
        Ok(msgs
            .iter()
            .filter(|p| p.len() >= 12)
            .map(|p| {
                let mut r = Route {
                    family: p[0],
                    dst_len: p[1],
                    table: p[4] as u32,
                    protocol: p[5],
                    scope: p[6],
                    kind: p[7],
                    ..Default::default()
                };
                for (ty, d) in attrs(p, 12) {
                    match ty {
                        RTA_DST => r.dst = d.to_vec(),
                        RTA_OIF => r.oif = Some(u32_of(d) as i32),
                        RTA_GATEWAY => r.gateway = Some(d.to_vec()),
                        RTA_PRIORITY => r.priority = Some(u32_of(d)),
                        RTA_PREFSRC => r.prefsrc = Some(d.to_vec()),
                        RTA_TABLE => r.table = u32_of(d),
                        _ => {}
                    }
                }
                r
            })
            .collect())
    }

    /// Sets a link's `IFF_UP` and, if given, its MTU.
    pub fn set_link(&mut self, index: i32, up: bool, mtu: Option<u32>) -> std::io::Result<()> {
        let mut body = Vec::with_capacity(32);
        body.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
        body.extend_from_slice(&index.to_ne_bytes());
        let flags = if up { libc::IFF_UP as u32 } else { 0 };
        body.extend_from_slice(&flags.to_ne_bytes());
        body.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
        if let Some(m) = mtu {
            put_attr(&mut body, IFLA_MTU, &m.to_ne_bytes());
        }
        self.request(RTM_NEWLINK, 0, &body)
    }

    /// Creates a veth pair: `v.name` here (at index `v.index` when not 0), its peer in
    /// `v.peer_ns`; `EEXIST` when either name or the index is taken.
    pub fn create_veth(&mut self, v: &VethSpec<'_>) -> std::io::Result<()> {
        let mut body = Vec::with_capacity(128);
        body.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
        body.extend_from_slice(&v.index.to_ne_bytes());
        body.extend_from_slice(&[0u8; 8]);
        put_attr(&mut body, IFLA_IFNAME, &cstr(v.name));
        put_attr(&mut body, IFLA_MTU, &v.mtu.to_ne_bytes());
        if !v.mac.is_empty() {
            put_attr(&mut body, IFLA_ADDRESS, v.mac);
        }
        let mut peer = Vec::with_capacity(64);
        peer.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
        peer.extend_from_slice(&[0u8; 12]);
        put_attr(&mut peer, IFLA_IFNAME, &cstr(v.peer));
        put_attr(&mut peer, IFLA_MTU, &v.mtu.to_ne_bytes());
        let ns = std::os::fd::AsRawFd::as_raw_fd(&v.peer_ns) as u32;
        put_attr(&mut peer, IFLA_NET_NS_FD, &ns.to_ne_bytes());
        let mut data = Vec::new();
        put_attr(&mut data, VETH_INFO_PEER | NESTED, &peer);
        let mut info = Vec::new();
        put_attr(&mut info, IFLA_INFO_KIND, b"veth");
        put_attr(&mut info, IFLA_INFO_DATA | NESTED, &data);
        put_attr(&mut body, IFLA_LINKINFO | NESTED, &info);
        self.request(RTM_NEWLINK, libc::NLM_F_CREATE | libc::NLM_F_EXCL, &body)
    }

    /// Makes link `index` a port of bridge `master`.
    pub fn set_master(&mut self, index: i32, master: i32) -> std::io::Result<()> {
        let mut body = Vec::with_capacity(32);
        body.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
        body.extend_from_slice(&index.to_ne_bytes());
        body.extend_from_slice(&[0u8; 8]);
        put_attr(&mut body, IFLA_MASTER, &master.to_ne_bytes());
        self.request(RTM_NEWLINK, 0, &body)
    }

    fn addr_body(a: &Addr) -> Vec<u8> {
        let mut body = vec![a.family, a.prefix_len, a.flags as u8, a.scope];
        body.extend_from_slice(&a.index.to_ne_bytes());
        put_attr(&mut body, IFA_LOCAL, &a.addr);
        put_attr(&mut body, IFA_ADDRESS, &a.addr);
        body
    }

    /// Adds an address (`EEXIST` when the interface has it already).
    pub fn add_addr(&mut self, a: &Addr) -> std::io::Result<()> {
        let mut body = Self::addr_body(a);
        put_attr(&mut body, IFA_FLAGS, &a.flags.to_ne_bytes());
        self.request(RTM_NEWADDR, libc::NLM_F_CREATE | libc::NLM_F_EXCL, &body)
    }

    pub fn del_addr(&mut self, a: &Addr) -> std::io::Result<()> {
        self.request(RTM_DELADDR, 0, &Self::addr_body(a))
    }

    /// Adds a route (`EEXIST` when it is there already).
    pub fn add_route(&mut self, r: &Route) -> std::io::Result<()> {
        let mut body = vec![
            r.family,
            r.dst_len,
            0,
            0,
            r.table.min(255) as u8,
            r.protocol,
            r.scope,
            r.kind,
        ];
        body.extend_from_slice(&0u32.to_ne_bytes());
        put_attr(&mut body, RTA_TABLE, &r.table.to_ne_bytes());
        if !r.dst.is_empty() {
            put_attr(&mut body, RTA_DST, &r.dst);
        }
        if let Some(oif) = r.oif {
            put_attr(&mut body, RTA_OIF, &oif.to_ne_bytes());
        }
        if let Some(g) = &r.gateway {
            put_attr(&mut body, RTA_GATEWAY, g);
        }
        if let Some(p) = r.priority {
            put_attr(&mut body, RTA_PRIORITY, &p.to_ne_bytes());
        }
        if let Some(s) = &r.prefsrc {
            put_attr(&mut body, RTA_PREFSRC, s);
        }
        self.request(RTM_NEWROUTE, libc::NLM_F_CREATE | libc::NLM_F_EXCL, &body)
    }
}

/// Brings up the loopback interface of this thread's network namespace (the kernel adds
/// 127.0.0.1/8 and ::1/128 to it).
pub fn loopback_up() -> Result<()> {
    let mut nl = Rtnl::open()?;
    let lo = nl
        .links()?
        .into_iter()
        .find(|l| l.name == "lo")
        .ok_or_else(|| anyhow!("the network namespace has no loopback interface"))?;
    nl.set_link(lo.index, true, None)
        .map_err(|e| fail("bringing lo up", e))
}

/// The error of a netlink request, naming it.
pub fn fail(what: impl std::fmt::Display, e: std::io::Error) -> anyhow::Error {
    anyhow!("{what}: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::ns::run_unshared;

    /// In a new network namespace: only `lo`, down; brought up with an address and a
    /// route added, all read back.
    #[test]
    fn loopback_up_with_an_address_and_a_route() {
        run_unshared(libc::CLONE_NEWNET, || {
            let mut nl = Rtnl::open()?;
            let links = nl.links()?;
            assert_eq!(links.len(), 1, "{links:?}");
            let lo = &links[0];
            assert_eq!(lo.name, "lo");
            assert_eq!(lo.flags & libc::IFF_UP as u32, 0);
            nl.set_link(lo.index, true, Some(16384))?;
            let lo2 = nl.links()?.remove(0);
            assert!(lo2.flags & libc::IFF_UP as u32 != 0);
            assert_eq!(lo2.mtu, 16384);
            let extra = Addr {
                family: libc::AF_INET as u8,
                prefix_len: 32,
                flags: 0,
                scope: 0,
                index: lo.index,
                addr: vec![10, 9, 8, 7],
            };
            nl.add_addr(&extra)?;
            let again = nl.add_addr(&extra).unwrap_err();
            assert_eq!(again.raw_os_error(), Some(libc::EEXIST));
            let addrs = nl.addrs()?;
            assert!(addrs.iter().any(|a| a.addr == [127, 0, 0, 1]), "{addrs:?}");
            assert!(addrs
                .iter()
                .any(|a| a.addr == [10, 9, 8, 7] && a.prefix_len == 32));
            nl.add_route(&Route {
                family: libc::AF_INET as u8,
                dst_len: 16,
                table: libc::RT_TABLE_MAIN as u32,
                protocol: libc::RTPROT_BOOT,
                scope: libc::RT_SCOPE_LINK,
                kind: libc::RTN_UNICAST,
                dst: vec![10, 1, 0, 0],
                oif: Some(lo.index),
                ..Default::default()
            })?;
            let routes = nl.routes()?;
            let r = routes
                .iter()
                .find(|r| r.dst == [10, 1, 0, 0])
                .expect("the route added");
            assert_eq!((r.dst_len, r.oif, r.protocol), (16, Some(lo.index), 3));
            nl.del_addr(&extra)?;
            assert!(!nl.addrs()?.iter().any(|a| a.addr == [10, 9, 8, 7]));
            Ok(())
        })
        .unwrap();
    }

    /// Between two new namespaces: a veth pair created with a chosen index, name, MTU
    /// and MAC here and its peer there, each end naming the other; a second pair with a
    /// taken name is refused with `EEXIST`.
    #[test]
    fn veth_pair_across_namespaces() {
        run_unshared(libc::CLONE_NEWNET, || {
            let peer_ns = std::fs::File::open("/proc/thread-self/ns/net")?;
            let (peer_index, peer_links) = std::thread::scope(|s| {
                s.spawn(|| {
                    run_unshared(libc::CLONE_NEWNET, || {
                        let mut nl = Rtnl::open()?;
                        let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
                        let spec = VethSpec {
                            index: 7,
                            name: "wsin0",
                            mtu: 1400,
                            mac: &mac,
                            peer: "wsout0",
                            peer_ns: std::os::fd::AsFd::as_fd(&peer_ns),
                        };
                        nl.create_veth(&spec)?;
                        let l = nl.links()?;
                        let me = l.iter().find(|l| l.name == "wsin0").expect("created");
                        assert_eq!((me.index, me.mtu, me.kind.as_str()), (7, 1400, "veth"));
                        assert!(me.link_netnsid.is_some(), "the peer is elsewhere");
                        assert_eq!(me.mac, mac);
                        let again = nl.create_veth(&VethSpec { index: 0, ..spec }).unwrap_err();
                        assert_eq!(again.raw_os_error(), Some(libc::EEXIST));
                        Ok((me.link.expect("a veth names its peer"), l.len()))
                    })
                })
                .join()
                .unwrap()
            })?;
            assert_eq!(peer_links, 2);
            let mut nl = Rtnl::open()?;
            let out = nl.links()?;
            let o = out.iter().find(|l| l.name == "wsout0").expect("the peer");
            assert_eq!((o.index, o.link, o.mtu), (peer_index, Some(7), 1400));
            Ok(())
        })
        .unwrap();
    }
}
