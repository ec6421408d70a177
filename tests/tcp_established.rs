//! `--tcp-established`: established TCP connections checkpointed with TCP_REPAIR, their
//! peers outside the tree (this test process) never seeing a reset, the bytes in flight
//! both ways arriving exactly once. The server is `fixtures/tcp_peer.c`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

use common::{fixture, tempdir, wait_pid_exit, Proc, Ws, TIMEOUT};

/// The server: `tcp_peer ADDR`, its port, and a client connected to it whose receive
/// buffer is small (so the server's fill leaves bytes unsent and unacknowledged).
fn server(prefix: &[&str], addr: &str, client_ns: Option<&str>) -> (Proc, TcpStream, SocketAddr) {
    let bin = fixture("tcp_peer");
    let mut cmd = Command::new(prefix.first().copied().unwrap_or(bin.to_str().unwrap()));
    cmd.args(prefix.iter().skip(1));
    if !prefix.is_empty() {
        cmd.arg(&bin);
    }
    cmd.arg(addr);
    let p = Proc::spawn(&mut cmd);
    let port: u16 = p
        .read_line()
        .strip_prefix("port ")
        .and_then(|s| s.parse().ok())
        .expect("port line");
    let to: SocketAddr = if addr.contains(':') {
        format!("[{addr}]:{port}").parse().unwrap()
    } else {
        format!("{addr}:{port}").parse().unwrap()
    };
    let client = match client_ns {
        None => connect_small(to),
        // Made on a thread that joins the namespace: the socket stays in it.
        Some(ns) => {
            let path = format!("/var/run/netns/{ns}");
            std::thread::spawn(move || {
                let f = std::fs::File::open(&path).unwrap();
                // SAFETY: setns on an fd we hold open; it moves this thread only.
                assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
                connect_small(to)
            })
            .join()
            .unwrap()
        }
    };
    assert_eq!(p.read_line(), "accepted");
    (p, client, to)
}

/// A client socket with a 4 KiB receive buffer, connected to `to`.
fn connect_small(to: SocketAddr) -> TcpStream {
    let family = if to.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: integer arguments only; the fd is owned right below.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: a new descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let v: libc::c_int = 4096;
    // SAFETY: the value points at `v`, a live c_int, and the length is its size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&v as *const libc::c_int).cast(),
            4,
        )
    };
    let s = socket2_connect(fd, to);
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s
}

fn socket2_connect(fd: OwnedFd, to: SocketAddr) -> TcpStream {
    // SAFETY: sockaddr_storage is plain data; all zeroes are valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match to {
        SocketAddr::V4(a) => {
            // SAFETY: storage is large and aligned enough for a sockaddr_in.
            let s = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            s.sin_family = libc::AF_INET as u16;
            s.sin_port = a.port().to_be();
            s.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            16
        }
        SocketAddr::V6(a) => {
            // SAFETY: storage is large and aligned enough for a sockaddr_in6.
            let s = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            s.sin6_family = libc::AF_INET6 as u16;
            s.sin6_port = a.port().to_be();
            s.sin6_addr.s6_addr = a.ip().octets();
            28
        }
    };
    // SAFETY: `ss` holds a sockaddr of `len` bytes and lives across the call.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &ss as *const _ as *const libc::sockaddr,
            len,
        )
    };
    assert_eq!(r, 0, "connect to {to}: {}", std::io::Error::last_os_error());
    TcpStream::from(fd)
}

/// Reads `n` bytes and checks they are the fixture's fill pattern from byte `from` on.
fn expect_pattern(c: &mut TcpStream, from: usize, n: usize) {
    let mut b = vec![0u8; n];
    c.read_exact(&mut b).expect("the server's filled bytes");
    for (i, x) in b.iter().enumerate() {
        assert_eq!(
            *x,
            b'a' + ((from + i) % 26) as u8,
            "byte {} of the fill",
            from + i
        );
    }
}

/// An answer of the fixture: "K rest" → (K, rest).
fn answer(p: &Proc) -> (u32, String) {
    let l = p.read_line();
    let (k, rest) = l.split_once(' ').unwrap_or_else(|| panic!("answer {l:?}"));
    (
        k.parse().unwrap_or_else(|_| panic!("answer {l:?}")),
        rest.to_owned(),
    )
}

fn filled(p: &mut Proc, n: usize) -> usize {
    p.send(&format!("fill {n}"));
    let (_, a) = answer(p);
    a.strip_prefix("filled ").unwrap().parse().unwrap()
}

/// `info` without its counter.
fn info(p: &mut Proc) -> String {
    p.send("info");
    answer(p).1
}

/// Nothing more to read on `c` right now (no byte delivered twice).
fn assert_drained(c: &mut TcpStream) {
    c.set_nonblocking(true).unwrap();
    let mut b = [0u8; 16];
    match c.read(&mut b) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("unexpected bytes or end on the client: {other:?}"),
    }
    c.set_nonblocking(false).unwrap();
}

/// `nft list tables` (under `prefix`, e.g. `ip netns exec NS`).
fn nft_tables(prefix: &[&str]) -> String {
    let mut c = Command::new(prefix.first().copied().unwrap_or("nft"));
    if !prefix.is_empty() {
        c.args(&prefix[1..]).arg("nft");
    }
    let o = c.args(["list", "tables"]).output();
    o.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

#[test]
fn a_left_running_server_keeps_its_client_and_every_byte() {
    let ws = Ws::new();
    let (mut p, mut client, _) = server(&[], "127.0.0.1", None);
    let before = info(&mut p);
    assert!(
        before.contains("nodelay=1 keepalive=1 keepidle=77"),
        "{before}"
    );
    client.write_all(b"AAAA").unwrap(); // unread by the server
    let n = filled(&mut p, 4 << 20); // unread, unacknowledged and unsent on its side
    assert!(n > 8192, "the fill should exceed the client's window: {n}");

    let images = tempdir("ws-tcp-");
    let dir = images.path().join("img");
    let pid = p.pid().to_string();
    let mut dump = Proc::spawn(&mut ws.cmd(&[
        "dump",
        "-t",
        &pid,
        "-D",
        dir.to_str().unwrap(),
        "-R",
        "--tcp-established",
    ]));
    // Sent while the dump runs (or right after): held by the lock, then retransmitted.
    client.write_all(b"CCCC").unwrap();
    let st = dump.wait();
    assert!(st.success(), "dump: {}", dump.stderr_after_exit());
    assert!(
        !nft_tables(&[]).contains(&format!("warmstart-{}-", dump.pid())),
        "the lock outlived the dump: {}",
        nft_tables(&[])
    );

    expect_pattern(&mut client, 0, n);
    p.send("read 8");
    assert_eq!(answer(&p), (3, "got AAAACCCC".into()));
    p.send("write ZZ");
    assert_eq!(answer(&p).1, "wrote");
    let mut z = [0u8; 2];
    client.read_exact(&mut z).unwrap();
    assert_eq!(&z, b"ZZ");
    assert_drained(&mut client);
    assert_eq!(info(&mut p), before);
}

/// `warmstart ARGS` on `ws`'s store, run under `prefix` (e.g. `ip netns exec NS`).
fn ws_cmd(ws: &Ws, prefix: &[&str], args: &[&str]) -> Command {
    let mut c = match prefix.split_first() {
        None => Command::new(common::bin()),
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(common::bin());
            c
        }
    };
    c.env("WARMSTART_STORE", ws.store())
        .env_remove("RUST_LOG")
        .args(args);
    c
}

/// Dumps the server `p` (killed) into the store as `tcp`, runs `between`, checks the lock
/// left for the restore and the refusal without the flag, and restores it with
/// `--tcp-established`.
fn dump_and_restore(
    ws: &Ws,
    mut p: Proc,
    prefix: &[&str],
    lock_prefix: &[&str],
    between: impl FnOnce(),
) -> (Proc, String) {
    let pid = p.pid().to_string();
    // The lock is the table this dump adds (a table of an earlier dump by a process of
    // the same pid may still be there).
    let tables_before = nft_tables(lock_prefix);
    let dump = ws_cmd(
        ws,
        prefix,
        &["dump", "-t", &pid, "--name", "tcp", "--tcp-established"],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let lock_prefix_name = format!("warmstart-{}-", dump.id());
    let out = dump.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(wait_pid_exit(p.pid(), TIMEOUT), "the dumped server runs on");
    p.wait();
    let tables = nft_tables(lock_prefix);
    let lock = tables
        .lines()
        .filter(|l| !tables_before.lines().any(|b| b == *l))
        .filter_map(|l| l.trim().strip_prefix("table inet "))
        .find(|t| t.starts_with(&lock_prefix_name))
        .unwrap_or_else(|| panic!("no lock between the dump and the restore: {tables}"))
        .to_owned();
    between();
    let out = ws_cmd(ws, prefix, &["restore", "tcp"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("TCP connection")
            && err.contains("--tcp-established"),
        "a restore without the flag should be refused naming the connection: {err}"
    );
    let r = Proc::spawn(&mut ws_cmd(
        ws,
        prefix,
        &["restore", "tcp", "--tcp-established"],
    ));
    (r, lock)
}

/// The inspected snapshot's connection line: (snd_una, write_seq, rcv_nxt).
fn recorded_seqs(ws: &Ws) -> (u32, u32, u32) {
    let out = ws.run(&["inspect", "tcp"], "");
    out.assert_ok();
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains("established (snd_una"))
        .unwrap_or_else(|| panic!("no connection in:\n{}", out.stdout))
        .to_owned();
    let num = |key: &str| -> u32 {
        let at = line.find(key).unwrap() + key.len() + 1;
        line[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    (num("snd_una"), num("write_seq"), num("rcv_nxt"))
}

/// `TCP_REPAIR` on our own socket for a moment: (write_seq, rcv_nxt).
fn client_seqs(c: &TcpStream) -> (u32, u32) {
    let fd = c.as_raw_fd();
    let set = |opt: i32, v: i32| {
        // SAFETY: the value points at `v`, a live c_int, and the length is its size.
        let r =
            unsafe { libc::setsockopt(fd, libc::IPPROTO_TCP, opt, (&v as *const i32).cast(), 4) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    };
    let get = || {
        let mut v: u32 = 0;
        let mut l: libc::socklen_t = 4;
        // SAFETY: `v` and `l` are live locals; the kernel writes at most 4 bytes.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                21,
                (&mut v as *mut u32).cast(),
                &mut l,
            )
        };
        assert_eq!(r, 0);
        v
    };
    set(19, 1);
    set(20, 2);
    let w = get();
    set(20, 1);
    let r = get();
    set(19, 0);
    (w, r)
}

fn killed_and_restored(addr: &str, prefix: &[&str], lock_prefix: &[&str], client_ns: Option<&str>) {
    let ws = Ws::new();
    let (mut p, mut client, _) = server(prefix, addr, client_ns);
    let before = info(&mut p);
    client.write_all(b"AAAA").unwrap();
    let n = filled(&mut p, 4 << 20);
    let (w, _) = client_seqs(&client);
    let mut avail = 0;
    let (mut r, lock) = dump_and_restore(&ws, p, prefix, lock_prefix, || {
        // The server is gone: what the client sends now is dropped by the lock the dump
        // left, never answered by a RST, and retransmitted to the restored server.
        avail = client_avail(&client);
        client.write_all(b"CCCC").unwrap();
    });
    let (snd_una, write_seq, rcv_nxt) = recorded_seqs(&ws);
    // The server had every byte the client wrote before the dump; what the client has
    // received ends at or after snd_una, the rest of the fill was the server's queue.
    assert_eq!(rcv_nxt, w, "the server's rcv_nxt is the client's write_seq");
    // (Segments the client had received but whose ACK the server had not yet seen stay
    // in the server's queue: retransmitted, and dropped by the client as duplicates.)
    let queued = write_seq.wrapping_sub(snd_una) as usize;
    assert!(
        queued >= n - avail && queued - (n - avail) <= 65536,
        "server queue {queued}, fill {n}, client holds {avail}"
    );
    expect_pattern(&mut client, 0, n);
    r.send("read 8");
    assert_eq!(
        answer(&r),
        (3, "got AAAACCCC".into()),
        "the counter goes on"
    );
    r.send("write ZZ");
    assert_eq!(answer(&r).1, "wrote");
    let mut z = [0u8; 2];
    client.read_exact(&mut z).unwrap();
    assert_eq!(&z, b"ZZ");
    assert_drained(&mut client);
    assert_eq!(info(&mut r), before, "addresses and options as before");
    let (cw, cr) = client_seqs(&client);
    assert_eq!(
        cw,
        w.wrapping_add(4),
        "the client's stream went on where it was"
    );
    assert_eq!(cr, write_seq.wrapping_add(2));
    let tables = nft_tables(lock_prefix);
    assert!(!tables.contains(&lock), "the dump's lock is left: {tables}");
    let restore_lock = format!("warmstart-restore-{}", r.pid());
    assert!(
        !tables.contains(&restore_lock),
        "the restore's lock is left: {tables}"
    );
    r.close_stdin();
    assert!(r.wait().success(), "{}", r.stderr_after_exit());
}

/// Bytes the client has received and not read.
fn client_avail(c: &TcpStream) -> usize {
    let mut v: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to `v`, a live local.
    unsafe { libc::ioctl(c.as_raw_fd(), libc::FIONREAD, &mut v) };
    v as usize
}

#[test]
fn a_killed_server_is_restored_without_a_reset_ipv4() {
    killed_and_restored("127.0.0.1", &[], &[], None);
}

#[test]
fn a_killed_server_is_restored_without_a_reset_ipv6() {
    killed_and_restored("::1", &[], &[], None);
}

/// Both ends in the tree (a server and the child that connected to it): each end's
/// queues come back, the bytes in flight both ways arrive once.
#[test]
fn both_ends_in_the_tree() {
    let ws = Ws::new();
    let bin = fixture("tcp_peer");
    let mut p = Proc::spawn(Command::new(&bin).args(["127.0.0.1", "0", "pair"]));
    assert!(p.read_line().starts_with("port "));
    assert_eq!(p.read_line(), "accepted");
    p.send("c fill 8000000");
    let l = p.read_line();
    let n: usize = l
        .strip_prefix("c 1 filled ")
        .unwrap_or_else(|| panic!("{l}"))
        .parse()
        .unwrap();
    p.send("write HELLO");
    assert_eq!(p.read_line(), "1 wrote");
    let (mut r, lock) = dump_and_restore(&ws, p, &[], &[], || {});
    r.send(&format!("drain {n}"));
    assert_eq!(r.read_line(), "2 drained ok");
    r.send("c read 5");
    assert_eq!(r.read_line(), "c 2 got HELLO");
    r.send("c write BYE");
    assert_eq!(r.read_line(), "c 3 wrote");
    r.send("read 3");
    assert_eq!(r.read_line(), "3 got BYE");
    lock_gone_then_exit(r, &lock);
}

/// Two network namespaces joined by a veth pair, deleted (with the pair) when dropped.
struct Netns(Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let o = Command::new("ip")
        .args(args)
        .output()
        .expect("ip from iproute2");
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Namespaces A (10.231.0.1) and B (10.231.0.2) joined by a veth pair, named after
/// `tag` and this process.
fn veth_pair(tag: &str) -> (Netns, String, String) {
    let id = std::process::id();
    let (a, b) = (format!("wsa{tag}{id}"), format!("wsb{tag}{id}"));
    let ns = Netns(vec![a.clone(), b.clone()]);
    ip(&["netns", "add", &a]);
    ip(&["netns", "add", &b]);
    let (va, vb) = (format!("wa{tag}{id}"), format!("wb{tag}{id}"));
    ip(&[
        "link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b,
    ]);
    for (ns, dev, addr) in [(&a, &va, "10.231.0.1/24"), (&b, &vb, "10.231.0.2/24")] {
        ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
        ip(&["-n", ns, "link", "set", dev, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
    }
    (ns, a, b)
}

/// The server in namespace A, its client in B, over a veth pair (a real device, not
/// loopback); warmstart runs in A, where the server's addresses are.
#[test]
fn across_two_network_namespaces_over_veth() {
    let (_ns, a, b) = veth_pair("");
    let prefix = ["ip", "netns", "exec", a.as_str()];
    killed_and_restored("10.231.0.1", &prefix, &prefix, Some(&b));
}

const FIN_WAIT1: u8 = 4;
const FIN_WAIT2: u8 = 5;
const TIME_WAIT: u8 = 6;
const CLOSE_WAIT: u8 = 8;
const LAST_ACK: u8 = 9;
const CLOSING: u8 = 11;

/// The state of the TCP connection between ports `local` and `remote` in the network
/// namespace of `pid`, from `/proc/PID/net/tcp` and `tcp6` (column `st`).
fn proc_tcp_state(pid: i32, (local, remote): (u16, u16)) -> Option<u8> {
    for f in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let port = |c: &str| u16::from_str_radix(c.rsplit(':').next().unwrap_or(""), 16).ok();
            if cols.len() > 3 && port(cols[1]) == Some(local) && port(cols[2]) == Some(remote) {
                return u8::from_str_radix(cols[3], 16).ok();
            }
        }
    }
    None
}

/// Waits (bounded) for the connection to reach `state`.
fn wait_tcp_state(pid: i32, ports: (u16, u16), state: u8) {
    wait_tcp(pid, ports, Some(state));
}

/// Waits (bounded) for the connection to be in `state` (`None`: closed, no longer listed).
fn wait_tcp(pid: i32, ports: (u16, u16), state: Option<u8>) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while proc_tcp_state(pid, ports) != state {
        assert!(
            std::time::Instant::now() < deadline,
            "the connection {ports:?} stays in state {:?}, not {state:?}",
            proc_tcp_state(pid, ports)
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// The connection line of `inspect tcp`.
fn inspected_connection(ws: &Ws) -> String {
    let out = ws.run(&["inspect", "tcp"], "");
    out.assert_ok();
    out.stdout
        .lines()
        .find(|l| l.contains("(snd_una"))
        .unwrap_or_else(|| panic!("no connection in:\n{}", out.stdout))
        .to_owned()
}

/// The server shut its write side (FIN_WAIT2: the client read EOF and acknowledged) while
/// the client goes on sending: restored in FIN_WAIT2, it receives every byte once, and
/// the client sees its EOF once, no reset.
#[test]
fn a_half_closed_server_in_fin_wait2_is_restored_and_still_receives() {
    let ws = Ws::new();
    let (mut p, mut client, to) = server(&[], "127.0.0.1", None);
    let ports = (to.port(), client.local_addr().unwrap().port());
    client.write_all(b"AAAA").unwrap(); // unread by the server
    p.send("shutdown");
    assert_eq!(answer(&p).1, "shut");
    let mut b = [0u8; 1];
    assert_eq!(client.read(&mut b).unwrap(), 0, "the server's FIN");
    wait_tcp_state(p.pid(), ports, FIN_WAIT2);
    let (mut r, lock) = dump_and_restore(&ws, p, &[], &[], || {
        client.write_all(b"CCCC").unwrap();
    });
    let line = inspected_connection(&ws);
    assert!(line.contains("fin_wait2 (snd_una"), "{line}");
    r.send("read 8");
    assert_eq!(answer(&r).1, "got AAAACCCC");
    assert_eq!(
        proc_tcp_state(r.pid(), ports),
        Some(FIN_WAIT2),
        "restored in the dumped state"
    );
    client.write_all(b"DD").unwrap();
    r.send("read 2");
    assert_eq!(answer(&r).1, "got DD");
    // The client: EOF (again: no second FIN's data, no RST), its end in CLOSE_WAIT.
    assert_eq!(client.read(&mut b).unwrap(), 0);
    assert_eq!(
        proc_tcp_state(std::process::id() as i32, (ports.1, ports.0)),
        Some(CLOSE_WAIT),
        "the client's end"
    );
    client.shutdown(std::net::Shutdown::Write).unwrap();
    r.send("readeof");
    assert_eq!(answer(&r).1, "got  eof");
    lock_gone_then_exit(r, &lock);
}

/// The client closed its write side with bytes the server has not read (CLOSE_WAIT),
/// over IPv6: restored in CLOSE_WAIT, the server reads them and then EOF, and still
/// writes to the client.
#[test]
fn a_server_in_close_wait_reads_its_bytes_then_eof_and_still_writes() {
    let ws = Ws::new();
    let (mut p, mut client, to) = server(&[], "::1", None);
    let ports = (to.port(), client.local_addr().unwrap().port());
    client.write_all(b"HELLO").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    wait_tcp_state(p.pid(), ports, CLOSE_WAIT);
    p.send("read 2");
    assert_eq!(answer(&p).1, "got HE");
    let (mut r, lock) = dump_and_restore(&ws, p, &[], &[], || {});
    let line = inspected_connection(&ws);
    assert!(
        line.contains("close_wait (snd_una") && line.contains("3 to read"),
        "{line}"
    );
    r.send("readeof");
    assert_eq!(answer(&r).1, "got LLO eof");
    // (The answer says the tree runs; reading EOF leaves the state as it was.)
    assert_eq!(
        proc_tcp_state(r.pid(), ports),
        Some(CLOSE_WAIT),
        "restored in the dumped state"
    );
    r.send("write ZZ");
    assert_eq!(answer(&r).1, "wrote");
    let mut z = [0u8; 2];
    client.read_exact(&mut z).unwrap();
    assert_eq!(&z, b"ZZ");
    assert_drained(&mut client);
    r.send("shutdown");
    assert_eq!(answer(&r).1, "shut");
    let mut b = [0u8; 1];
    assert_eq!(client.read(&mut b).unwrap(), 0, "the server's FIN");
    lock_gone_then_exit(r, &lock);
}

/// Left running (`-R`): a server in CLOSE_WAIT with unread bytes stays in it through the
/// dump (repair mode on and off), reads them and EOF, and still writes.
#[test]
fn half_closed_connections_of_a_left_running_tree_go_on() {
    let ws = Ws::new();
    let (mut p, mut client, to) = server(&[], "127.0.0.1", None);
    let ports = (to.port(), client.local_addr().unwrap().port());
    client.write_all(b"HELLO").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    wait_tcp_state(p.pid(), ports, CLOSE_WAIT);
    let images = tempdir("ws-tcp-");
    let dir = images.path().join("img");
    let pid = p.pid().to_string();
    let dump = ws
        .cmd(&[
            "dump",
            "-t",
            &pid,
            "-D",
            dir.to_str().unwrap(),
            "-R",
            "--tcp-established",
        ])
        .output()
        .unwrap();
    assert!(
        dump.status.success(),
        "dump: {}",
        String::from_utf8_lossy(&dump.stderr)
    );
    assert_eq!(proc_tcp_state(p.pid(), ports), Some(CLOSE_WAIT));
    p.send("readeof");
    assert_eq!(answer(&p).1, "got HELLO eof");
    p.send("write ZZ");
    assert_eq!(answer(&p).1, "wrote");
    let mut z = [0u8; 2];
    client.read_exact(&mut z).unwrap();
    assert_eq!(&z, b"ZZ");
    assert_drained(&mut client);
    p.close_stdin();
    assert!(p.wait().success(), "{}", p.stderr_after_exit());
}

/// CLOSE_WAIT with the client in another namespace, over veth: the peer's FIN, forged in
/// the server's namespace from the client's address, comes back after the unread bytes.
#[test]
fn close_wait_across_two_network_namespaces_over_veth() {
    let (_ns, a, b) = veth_pair("c");
    let prefix = ["ip", "netns", "exec", a.as_str()];
    let ws = Ws::new();
    let (p, mut client, to) = server(&prefix, "10.231.0.1", Some(&b));
    let ports = (to.port(), client.local_addr().unwrap().port());
    client.write_all(b"HELLO").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    wait_tcp_state(p.pid(), ports, CLOSE_WAIT);
    let (mut r, _) = dump_and_restore(&ws, p, &prefix, &prefix, || {});
    r.send("readeof");
    assert_eq!(answer(&r).1, "got HELLO eof");
    assert_eq!(proc_tcp_state(r.pid(), ports), Some(CLOSE_WAIT));
    r.send("write ZZ");
    assert_eq!(answer(&r).1, "wrote");
    let mut z = [0u8; 2];
    client.read_exact(&mut z).unwrap();
    assert_eq!(&z, b"ZZ");
    r.close_stdin();
    assert!(r.wait().success(), "{}", r.stderr_after_exit());
    // The server's end is closed: the client reads EOF (a FIN, not a reset).
    let mut b = [0u8; 1];
    assert_eq!(client.read(&mut b).unwrap(), 0);
}

/// The dump's network lock is gone once the restored tree runs; the restored fixture
/// ends cleanly at EOF on its stdin.
fn lock_gone_then_exit(mut r: Proc, lock: &str) {
    let tables = nft_tables(&[]);
    assert!(!tables.contains(lock), "the dump's lock is left: {tables}");
    r.close_stdin();
    assert!(r.wait().success(), "{}", r.stderr_after_exit());
}

/// The test's own hold on the connection `server` <-> `client` (an nftables table made
/// with warmstart's [`NetLock`](warmstart::sys::nft::NetLock): every packet of it dropped
/// both ways), so that the server's FIN stays unacknowledged: released by dropping it.
fn hold(server: SocketAddr, client: &TcpStream, tag: &str) -> warmstart::sys::nft::NetLock {
    let name = format!("warmstart-test-{tag}-{}", std::process::id());
    let mut lock = warmstart::sys::nft::NetLock::new(&name).expect("an nftables table");
    lock.add(server, client.local_addr().unwrap())
        .expect("the hold's rules");
    lock
}

/// FIN_WAIT1 for real: the server shut its write side while the client's answers (and
/// bytes) are held, so its FIN is sent and never acknowledged. Dumped, killed, restored,
/// the hold released: the client gets every byte it had not, then EOF once (the FIN
/// retransmitted), the server the client's bytes sent meanwhile once, and the close
/// completes both ways.
#[test]
fn a_server_in_fin_wait1_is_restored_and_its_fin_arrives_once() {
    let ws = Ws::new();
    let (mut p, mut client, to) = server(&[], "127.0.0.1", None);
    let ports = (to.port(), client.local_addr().unwrap().port());
    client.write_all(b"AAAA").unwrap(); // unread by the server (held, or arrived)
    let held = hold(to, &client, "fw1");
    p.send("write ZZ"); // sent, unacknowledged
    assert_eq!(answer(&p).1, "wrote");
    p.send("shutdown");
    assert_eq!(answer(&p).1, "shut");
    wait_tcp_state(p.pid(), ports, FIN_WAIT1);
    client.write_all(b"CCCC").unwrap(); // held: retransmitted to the restored server
    let (mut r, lock) = dump_and_restore(&ws, p, &[], &[], move || drop(held));
    let line = inspected_connection(&ws);
    assert!(line.contains("fin_wait1 (snd_una"), "{line}");
    let mut z = [0u8; 2];
    client.read_exact(&mut z).unwrap();
    assert_eq!(&z, b"ZZ");
    let mut b = [0u8; 1];
    assert_eq!(client.read(&mut b).unwrap(), 0, "the server's FIN");
    // Our FIN acknowledged: FIN_WAIT2; the client's end in CLOSE_WAIT.
    wait_tcp_state(r.pid(), ports, FIN_WAIT2);
    assert_eq!(
        proc_tcp_state(std::process::id() as i32, (ports.1, ports.0)),
        Some(CLOSE_WAIT),
        "the client's end"
    );
    r.send("read 8");
    assert_eq!(answer(&r).1, "got AAAACCCC");
    client.write_all(b"DD").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    r.send("readeof");
    assert_eq!(answer(&r).1, "got DD eof");
    // The server's end ends in TIME_WAIT, the client's closed: no reset either way.
    wait_tcp_state(r.pid(), ports, TIME_WAIT);
    assert_eq!(client.read(&mut b).unwrap(), 0, "EOF again, not a reset");
    lock_gone_then_exit(r, &lock);
}

/// LAST_ACK for real, over IPv6: the client closed its side (CLOSE_WAIT), the server
/// wrote and shut its own while the client's answers are held. Restored, the hold
/// released: the server reads the bytes it had not and EOF, the client gets the bytes
/// in flight once and then EOF, and the server's end closes (its FIN acknowledged).
#[test]
fn a_server_in_last_ack_is_restored_and_the_close_completes() {
    let ws = Ws::new();
    let (mut p, mut client, to) = server(&[], "::1", None);
    let ports = (to.port(), client.local_addr().unwrap().port());
    client.write_all(b"HELLO").unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    wait_tcp_state(p.pid(), ports, CLOSE_WAIT);
    p.send("read 2");
    assert_eq!(answer(&p).1, "got HE");
    let held = hold(to, &client, "la");
    p.send("write ZZ"); // sent, unacknowledged
    assert_eq!(answer(&p).1, "wrote");
    p.send("shutdown");
    assert_eq!(answer(&p).1, "shut");
    wait_tcp_state(p.pid(), ports, LAST_ACK);
    let (mut r, lock) = dump_and_restore(&ws, p, &[], &[], move || drop(held));
    let line = inspected_connection(&ws);
    assert!(
        line.contains("last_ack (snd_una") && line.contains("3 to read"),
        "{line}"
    );
    r.send("readeof");
    assert_eq!(answer(&r).1, "got LLO eof");
    let mut z = [0u8; 2];
    client.read_exact(&mut z).unwrap();
    assert_eq!(&z, b"ZZ");
    let mut b = [0u8; 1];
    assert_eq!(client.read(&mut b).unwrap(), 0, "the server's FIN");
    // The client's end: our FIN answered, TIME_WAIT; the server's: closed.
    wait_tcp_state(std::process::id() as i32, (ports.1, ports.0), TIME_WAIT);
    wait_tcp(r.pid(), ports, None);
    lock_gone_then_exit(r, &lock);
}

/// CLOSING for real: the server filled the client's (small, unread) window and shut its
/// write side, so its FIN waits behind bytes never sent (FIN_WAIT1); the client's FIN
/// then arrives first (CLOSING, a simultaneous close). Restored: the client reads every
/// filled byte once, then EOF; the server reads EOF; both ends reach TIME_WAIT.
#[test]
fn a_server_in_closing_is_restored_and_sends_its_bytes_then_fin() {
    let ws = Ws::new();
    let (mut p, mut client, to) = server(&[], "127.0.0.1", None);
    let ports = (to.port(), client.local_addr().unwrap().port());
    let n = filled(&mut p, 4 << 20);
    assert!(n > 8192, "the fill should exceed the client's window: {n}");
    p.send("shutdown");
    assert_eq!(answer(&p).1, "shut");
    wait_tcp_state(p.pid(), ports, FIN_WAIT1);
    client.shutdown(std::net::Shutdown::Write).unwrap();
    wait_tcp_state(p.pid(), ports, CLOSING);
    let (mut r, lock) = dump_and_restore(&ws, p, &[], &[], || {});
    let line = inspected_connection(&ws);
    assert!(line.contains("closing (snd_una"), "{line}");
    expect_pattern(&mut client, 0, n);
    let mut b = [0u8; 1];
    assert_eq!(
        client.read(&mut b).unwrap(),
        0,
        "the server's FIN, after its bytes"
    );
    r.send("readeof");
    assert_eq!(answer(&r).1, "got  eof");
    wait_tcp_state(r.pid(), ports, TIME_WAIT);
    wait_tcp_state(std::process::id() as i32, (ports.1, ports.0), TIME_WAIT);
    lock_gone_then_exit(r, &lock);
}
