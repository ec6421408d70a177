//! The network lock of `--tcp-established`: an nftables table, spoken to over
//! `NETLINK_NETFILTER` (no `nft` binary), whose two base chains drop every packet of the
//! connections being checkpointed, in both directions.
//!
//! ```text
//! table inet warmstart-<pid>-<n> {
//!   chain in  { type filter hook input  priority -310; meta nfproto ipv4 meta l4proto tcp
//!               ip saddr PEER ip daddr LOCAL tcp sport . dport PEERPORT . LOCALPORT drop; ... }
//!   chain out { type filter hook output priority -310; ... LOCAL -> PEER ... drop; }
//! }
//! ```
//!
//! The input chain starts with `meta mark 0xc114 accept`: the segments a restore forges
//! to bring back a half-closed connection ([`FORGED_MARK`]) pass.
//!
//! Why a lock at all: while a connection is checkpointed its peer goes on sending
//! (data, ACKs, retransmissions). A segment that reaches the host after the socket is gone
//! (the tree killed, not restored yet) is answered with a RST, which ends the connection
//! for the peer; one that reaches the socket after its queues were read is data the
//! snapshot does not hold. Dropped instead, the peer retransmits it once the lock is
//! gone, to the restored socket. The priority (-310) is before conntrack (-200) and every
//! ordinary filter chain, so the packets are dropped before anything else sees them.
//!
//! Each rule is built from netlink expressions as `nft` would send them: `meta` loads
//! (nfproto, l4proto), `payload` loads of the network header (addresses) and transport
//! header (ports, one 4-byte load), `cmp eq` on each, then an immediate `drop` verdict.
//! The table is created, filled and deleted in `NFNL_MSG_BATCH_BEGIN`/`END` batches, each
//! message acknowledged, so every failure comes back with its errno.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{anyhow, bail, Result};

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_NEWRULE: u16 = 6;
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NLA_F_NESTED: u16 = 0x8000;
const NF_INET_LOCAL_IN: u32 = 1;
const NF_INET_LOCAL_OUT: u32 = 3;
const PRIORITY: i32 = -310;

// Attribute numbers (linux/netfilter/nf_tables.h).
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_META_DREG: u16 = 1;
const NFTA_META_KEY: u16 = 2;
const NFT_META_MARK: u32 = 3;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFTA_PAYLOAD_DREG: u16 = 1;
const NFTA_PAYLOAD_BASE: u16 = 2;
const NFTA_PAYLOAD_OFFSET: u16 = 3;
const NFTA_PAYLOAD_LEN: u16 = 4;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFTA_CMP_SREG: u16 = 1;
const NFTA_CMP_OP: u16 = 2;
const NFTA_CMP_DATA: u16 = 3;
const NFT_CMP_EQ: u32 = 0;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_IMMEDIATE_DREG: u16 = 1;
const NFTA_IMMEDIATE_DATA: u16 = 2;
const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;

/// One netlink message being built: header, `nfgenmsg`, attributes.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(ty: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&(flags | libc::NLM_F_REQUEST as u16).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel's
                                                    // struct nfgenmsg: family, version (NFNETLINK_V0), resource id (big endian)
        buf.extend_from_slice(&[family, 0]);
        buf.extend_from_slice(&res_id.to_be_bytes());
        Msg { buf }
    }

    fn nft(ty: u16, flags: u16, seq: u32) -> Msg {
        Msg::new(
            NFNL_SUBSYS_NFTABLES << 8 | ty,
            flags | libc::NLM_F_ACK as u16,
            seq,
            NFPROTO_INET,
            0,
        )
    }

    fn attr(&mut self, ty: u16, data: &[u8]) -> &mut Msg {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
        self
    }

    fn str(&mut self, ty: u16, s: &str) -> &mut Msg {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.attr(ty, &b)
    }

    fn be32(&mut self, ty: u16, v: u32) -> &mut Msg {
        self.attr(ty, &v.to_be_bytes())
    }

    /// A nested attribute whose contents `f` adds.
    fn nest(&mut self, ty: u16, f: impl FnOnce(&mut Msg)) -> &mut Msg {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        f(self);
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// One expression of a rule: `{ name, data { ... } }` in the expression list.
    fn expr(&mut self, name: &str, f: impl FnOnce(&mut Msg)) -> &mut Msg {
        self.nest(NFTA_LIST_ELEM, |m| {
            m.str(NFTA_EXPR_NAME, name).nest(NFTA_EXPR_DATA, f);
        })
    }

    /// `cmp eq` of register 1 against `value`.
    fn cmp_eq(&mut self, value: &[u8]) -> &mut Msg {
        self.expr("cmp", |m| {
            m.be32(NFTA_CMP_SREG, NFT_REG_1)
                .be32(NFTA_CMP_OP, NFT_CMP_EQ)
                .nest(NFTA_CMP_DATA, |m| {
                    m.attr(NFTA_DATA_VALUE, value);
                });
        })
    }

    fn meta(&mut self, key: u32) -> &mut Msg {
        self.expr("meta", |m| {
            m.be32(NFTA_META_DREG, NFT_REG_1).be32(NFTA_META_KEY, key);
        })
    }

    fn payload(&mut self, base: u32, offset: u32, len: u32) -> &mut Msg {
        self.expr("payload", |m| {
            m.be32(NFTA_PAYLOAD_DREG, NFT_REG_1)
                .be32(NFTA_PAYLOAD_BASE, base)
                .be32(NFTA_PAYLOAD_OFFSET, offset)
                .be32(NFTA_PAYLOAD_LEN, len);
        })
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// The rule that drops the packets from `src` to `dst`, in `chain` of `table`.
fn drop_rule(table: &str, chain: &str, src: &SocketAddr, dst: &SocketAddr, seq: u32) -> Vec<u8> {
    let mut m = Msg::nft(
        NFT_MSG_NEWRULE,
        (libc::NLM_F_CREATE | libc::NLM_F_APPEND) as u16,
        seq,
    );
    m.str(NFTA_RULE_TABLE, table)
        .str(NFTA_RULE_CHAIN, chain)
        .nest(NFTA_RULE_EXPRESSIONS, |m| {
            // Addresses: IPv4 at 12 (source) and 16, IPv6 at 8 and 24.
            let (proto, (s_off, d_off, len), s, d) = match (src, dst) {
                (SocketAddr::V4(s), SocketAddr::V4(d)) => (
                    NFPROTO_IPV4,
                    (12, 16, 4),
                    s.ip().octets().to_vec(),
                    d.ip().octets().to_vec(),
                ),
                _ => (
                    NFPROTO_IPV6,
                    (8, 24, 16),
                    v6(src).octets().to_vec(),
                    v6(dst).octets().to_vec(),
                ),
            };
            let mut ports = src.port().to_be_bytes().to_vec();
            ports.extend_from_slice(&dst.port().to_be_bytes());
            m.meta(NFT_META_NFPROTO)
                .cmp_eq(&[proto])
                .meta(NFT_META_L4PROTO)
                .cmp_eq(&[libc::IPPROTO_TCP as u8])
                .payload(NFT_PAYLOAD_NETWORK_HEADER, s_off, len)
                .cmp_eq(&s)
                .payload(NFT_PAYLOAD_NETWORK_HEADER, d_off, len)
                .cmp_eq(&d)
                .payload(NFT_PAYLOAD_TRANSPORT_HEADER, 0, 4)
                .cmp_eq(&ports)
                .expr("immediate", |m| {
                    m.be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT)
                        .nest(NFTA_IMMEDIATE_DATA, |m| {
                            m.nest(NFTA_DATA_VERDICT, |m| {
                                m.be32(NFTA_VERDICT_CODE, NF_DROP);
                            });
                        });
                });
        });
    m.finish()
}

/// The mark of the segments a restore forges to bring back a half-closed connection
/// (the peer's FIN, its ACK of ours: [`crate::fds::tcp`]); the lock lets them in. CRIU's
/// (`SOCCR_MARK`).
pub const FORGED_MARK: u32 = 0xC114;

/// `meta mark FORGED_MARK accept`, the first rule of the input chain.
fn mark_rule(table: &str, seq: u32) -> Vec<u8> {
    let mut m = Msg::nft(
        NFT_MSG_NEWRULE,
        (libc::NLM_F_CREATE | libc::NLM_F_APPEND) as u16,
        seq,
    );
    m.str(NFTA_RULE_TABLE, table)
        .str(NFTA_RULE_CHAIN, "in")
        .nest(NFTA_RULE_EXPRESSIONS, |m| {
            m.meta(NFT_META_MARK)
                .cmp_eq(&FORGED_MARK.to_ne_bytes())
                .expr("immediate", |m| {
                    m.be32(NFTA_IMMEDIATE_DREG, NFT_REG_VERDICT)
                        .nest(NFTA_IMMEDIATE_DATA, |m| {
                            m.nest(NFTA_DATA_VERDICT, |m| {
                                m.be32(NFTA_VERDICT_CODE, NF_ACCEPT);
                            });
                        });
                });
        });
    m.finish()
}

/// An IPv6 view of an address (an IPv4 one as v4-mapped, as an IPv6 socket sees it).
fn v6(a: &SocketAddr) -> std::net::Ipv6Addr {
    match a {
        SocketAddr::V6(a) => *a.ip(),
        SocketAddr::V4(a) => a.ip().to_ipv6_mapped(),
    }
}

/// A `NETLINK_NETFILTER` socket of the calling thread's network namespace.
fn socket() -> Result<OwnedFd> {
    // SAFETY: integer arguments only; the fd returned is owned right below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_NETFILTER,
        )
    };
    if fd < 0 {
        bail!(
            "opening a netfilter netlink socket for the network lock: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: `socket` succeeded: a new descriptor owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `msgs` as one batch and waits for the acknowledgement of each; the first error
/// is returned (the kernel applies a batch whole or not at all).
fn batch(fd: &OwnedFd, seq: &mut u32, msgs: Vec<Vec<u8>>) -> std::io::Result<()> {
    let mut out = Msg::new(NFNL_MSG_BATCH_BEGIN, 0, *seq, 0, NFNL_SUBSYS_NFTABLES).finish();
    let n = msgs.len();
    for m in msgs {
        out.extend_from_slice(&m);
    }
    out.extend_from_slice(&Msg::new(NFNL_MSG_BATCH_END, 0, *seq, 0, NFNL_SUBSYS_NFTABLES).finish());
    *seq += n as u32 + 2;
    // SAFETY: the pointer and length describe `out`, a live buffer `send` only reads.
    if unsafe { libc::send(fd.as_raw_fd(), out.as_ptr().cast(), out.len(), 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut acks = 0;
    let mut buf = vec![0u8; 16 << 10];
    let mut first_err = None;
    while acks < n {
        // SAFETY: the pointer and length describe `buf`, a live writable buffer; `recv`
        // writes at most `buf.len()` bytes.
        let r = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut rest = &buf[..r as usize];
        while rest.len() >= 16 {
            let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
            if len < 16 || len > rest.len() {
                return Err(std::io::Error::from_raw_os_error(libc::EPROTO));
            }
            if ty as i32 == libc::NLMSG_ERROR && len >= 20 {
                acks += 1;
                let e = i32::from_ne_bytes(rest[16..20].try_into().unwrap());
                if e != 0 && first_err.is_none() {
                    first_err = Some(std::io::Error::from_raw_os_error(-e));
                    // After an error the kernel aborts the batch: no more acks come.
                    acks = n;
                }
            }
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// A network lock being held: the table, and the socket that made it.
pub struct NetLock {
    fd: OwnedFd,
    table: String,
    seq: u32,
    /// Connections locked so far (local, peer).
    conns: Vec<(SocketAddr, SocketAddr)>,
}

impl NetLock {
    /// Creates the (empty) table `table` with its two chains, in the calling thread's
    /// network namespace.
    pub fn new(table: &str) -> Result<NetLock> {
        let fd = socket()?;
        let mut seq = 1;
        let mut msgs = vec![{
            let mut m = Msg::nft(NFT_MSG_NEWTABLE, libc::NLM_F_CREATE as u16, seq + 1);
            m.str(NFTA_TABLE_NAME, table);
            m.finish()
        }];
        for (i, (chain, hook)) in [("in", NF_INET_LOCAL_IN), ("out", NF_INET_LOCAL_OUT)]
            .into_iter()
            .enumerate()
        {
            let mut m = Msg::nft(
                NFT_MSG_NEWCHAIN,
                libc::NLM_F_CREATE as u16,
                seq + 2 + i as u32,
            );
            m.str(NFTA_CHAIN_TABLE, table)
                .str(NFTA_CHAIN_NAME, chain)
                .nest(NFTA_CHAIN_HOOK, |m| {
                    m.be32(NFTA_HOOK_HOOKNUM, hook)
                        .be32(NFTA_HOOK_PRIORITY, PRIORITY as u32);
                })
                .be32(NFTA_CHAIN_POLICY, NF_ACCEPT)
                .str(NFTA_CHAIN_TYPE, "filter");
            msgs.push(m.finish());
        }
        msgs.push(mark_rule(table, seq + 4));
        batch(&fd, &mut seq, msgs).map_err(|e| {
            anyhow!(
                "taking the network lock (nftables table inet {table}): {e}; \
                 --tcp-established needs nf_tables in the kernel and CAP_NET_ADMIN"
            )
        })?;
        Ok(NetLock {
            fd,
            table: table.to_owned(),
            seq,
            conns: Vec::new(),
        })
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Drops every packet of the connection `local` ↔ `peer` from now on.
    pub fn add(&mut self, local: SocketAddr, peer: SocketAddr) -> Result<()> {
        if self.conns.contains(&(local, peer)) {
            return Ok(());
        }
        let s = self.seq;
        let msgs = vec![
            drop_rule(&self.table, "in", &peer, &local, s + 1),
            drop_rule(&self.table, "out", &local, &peer, s + 2),
        ];
        batch(&self.fd, &mut self.seq, msgs).map_err(|e| {
            anyhow!(
                "locking the TCP connection {local} -> {peer} (nftables table inet {}): {e}",
                self.table
            )
        })?;
        self.conns.push((local, peer));
        Ok(())
    }

    /// Leaves the table in place after this process is gone (a restore removes it with
    /// [`unlock`]); its name.
    pub fn keep(self) -> String {
        let me = std::mem::ManuallyDrop::new(self);
        // SAFETY: `me` is never dropped, so each field is read out exactly once.
        let (fd, table) = unsafe { (std::ptr::read(&me.fd), std::ptr::read(&me.table)) };
        // SAFETY: as above: `conns` is read out once and dropped here.
        drop(unsafe { std::ptr::read(&me.conns) });
        drop(fd);
        table
    }
}

impl Drop for NetLock {
    fn drop(&mut self) {
        if let Err(e) = delete(&self.fd, &mut self.seq, &self.table) {
            tracing::warn!(
                "releasing the network lock (table inet {}): {e}",
                self.table
            );
        }
    }
}

fn delete(fd: &OwnedFd, seq: &mut u32, table: &str) -> std::io::Result<()> {
    let mut m = Msg::nft(NFT_MSG_DELTABLE, 0, *seq + 1);
    m.str(NFTA_TABLE_NAME, table);
    batch(fd, seq, vec![m.finish()])
}

/// Removes the lock table `table` left by a dump (see [`NetLock::keep`]); one that is
/// gone already is fine.
pub fn unlock(table: &str) -> Result<()> {
    let fd = socket()?;
    match delete(&fd, &mut 1, table) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(anyhow!(
            "releasing the network lock of the snapshot (nftables table inet {table}): {e}"
        )),
    }
}

/// Whether table `table` exists (for tests and `check`).
pub fn exists(table: &str) -> Result<bool> {
    const NFT_MSG_GETTABLE: u16 = 1;
    let fd = socket()?;
    let mut m = Msg::nft(NFT_MSG_GETTABLE, 0, 1);
    m.str(NFTA_TABLE_NAME, table);
    let out = m.finish();
    // SAFETY: the pointer and length describe `out`, a live buffer `send` only reads.
    if unsafe { libc::send(fd.as_raw_fd(), out.as_ptr().cast(), out.len(), 0) } < 0 {
        bail!(
            "asking for table {table}: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut buf = vec![0u8; 8 << 10];
    // SAFETY: the pointer and length describe `buf`, a live writable buffer.
    let r = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if r < 20 {
        bail!(
            "asking for table {table}: {}",
            std::io::Error::last_os_error()
        );
    }
    let ty = u16::from_ne_bytes(buf[4..6].try_into().unwrap());
    if ty as i32 == libc::NLMSG_ERROR {
        let e = i32::from_ne_bytes(buf[16..20].try_into().unwrap());
        if e == -libc::ENOENT {
            return Ok(false);
        }
        if e != 0 {
            bail!(
                "asking for table {table}: {}",
                std::io::Error::from_raw_os_error(-e)
            );
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::Duration;

    #[test]
    fn attributes_are_padded_and_nests_sized() {
        let mut m = Msg::new(1, 0, 7, NFPROTO_INET, 0);
        m.str(1, "ab").nest(2, |m| {
            m.be32(1, 5);
        });
        let b = m.finish();
        assert_eq!(b.len(), 20 + 8 + 4 + 8);
        assert_eq!(&b[20..27], &[7, 0, 1, 0, b'a', b'b', 0]);
        assert_eq!(u16::from_ne_bytes([b[28], b[29]]), 12);
        assert_eq!(u16::from_ne_bytes([b[30], b[31]]), 2 | NLA_F_NESTED);
        assert_eq!(&b[36..40], &5u32.to_be_bytes());
    }

    #[test]
    fn a_locked_connection_gets_nothing_until_the_lock_is_released() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let table = format!("warmstart-test-{}", std::process::id());
        let mut lock = NetLock::new(&table).unwrap();
        assert!(exists(&table).unwrap());
        lock.add(s.local_addr().unwrap(), s.peer_addr().unwrap())
            .unwrap();
        c.write_all(b"x").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut b = [0u8; 1];
        assert!(s.read(&mut b).is_err(), "the byte passed the lock");
        drop(lock);
        assert!(!exists(&table).unwrap());
        // The client retransmits it once the lock is gone.
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        let kept = NetLock::new(&table).unwrap().keep();
        assert!(exists(&kept).unwrap());
        unlock(&kept).unwrap();
        unlock(&kept).unwrap();
        assert!(!exists(&kept).unwrap());
    }
}
