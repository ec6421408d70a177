//! Live migration as the issue's acceptance describes it: redis-server, in network and
//! pid namespaces of its own reached through a veth on a bridge, with a client connected
//! from outside, is pre-dumped twice to a page server while it serves, then dumped with
//! `--prev` and `--tcp-established` and restored from the page server into a new network
//! namespace (its veth's new peer on the same bridge). The client's one connection goes on
//! (redis sees the same client: same `CLIENT ID`), every write made between the dumps is
//! there, and the final dump read only the pages written since the last pre-dump.

mod common;

use std::path::Path;

use common::netns::{
    host_netns, in_net_of, ns_id, nsenter, output, unshared_in_net_of, ws_in_net_of,
};
use common::{children, tempdir, wait_pid_exit, KillGuard, Proc, Ws, TIMEOUT};

/// A RESP client on one TCP connection: a command per stdin line, each reply on a stdout
/// line. Any error (a reset connection) ends it.
const CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
f = s.makefile("rb")
def reply():
    l = f.readline()
    if not l:
        raise SystemExit("connection closed by redis")
    if l[:1] == b"$":
        n = int(l[1:])
        return "(nil)" if n < 0 else f.read(n + 2)[:-2].decode()
    return l[:-2].decode()
print("connected", flush=True)
for line in sys.stdin:
    a = [x.encode() for x in line.split()]
    s.sendall(b"*%d\r\n" % len(a) + b"".join(b"$%d\r\n%s\r\n" % (len(x), x) for x in a))
    print(reply(), flush=True)
"#;

fn ask(client: &mut Proc, cmd: &str) -> String {
    client.send(cmd);
    client.read_line()
}

/// `warmstart ARGS` in the network namespace of `h`, holders' sockets under `rt`; the
/// snapshot id it prints and the `--display-stats` page counts (read, taken).
fn dump_step(ws: &Ws, h: i32, rt: &Path, args: &[&str]) -> (String, u64, u64) {
    let mut c = ws_in_net_of(ws, h, args);
    c.env("XDG_RUNTIME_DIR", rt);
    let out = common::run_with(&mut c, b"", TIMEOUT);
    assert!(out.success(), "{args:?}: {}", out.describe());
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("taken from the previous image"))
        .unwrap_or_else(|| panic!("no page counts: {}", out.describe()));
    let n: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect();
    (out.stdout.trim().to_owned(), n[n.len() - 2], n[n.len() - 1])
}

#[test]
fn redis_migrates_with_pre_dumps_through_a_page_server_keeping_its_client() {
    migrate(false);
}

/// The same through CRIU's form on the receiving side: `page-server -D DIR` takes the
/// pre-dumps and the final dump, and `restore -D DIR` brings redis back from DIR.
#[test]
fn redis_migrates_into_an_image_directory_page_server_keeping_its_client() {
    migrate(true);
}

/// The migration, the page server storing what it receives in image directory `-D DIR`
/// (`image_dir`, restored with `restore -D DIR`) or in its store (restored with `restore
/// --page-server ADDR ID`).
fn migrate(image_dir: bool) {
    let src = Ws::new();
    let dst = Ws::new();
    let rt = tempdir("ws-rt-");
    // The "hosts' network": a namespace of the test's own with a bridge.
    let holder = host_netns(
        "ip link add br0 type bridge && ip addr add 10.125.0.1/24 dev br0 && \
         ip link set br0 up &&",
    );
    let h = holder.pid();
    let app = unshared_in_net_of(
        h,
        "redis-server --port 6379 --bind 0.0.0.0 --protected-mode no --save '' \
         --appendonly no --enable-debug-command yes >&2; true",
    );
    app.wait_stderr("Ready to accept connections");
    let init = children(app.pid());
    assert_eq!(init.len(), 1, "{init:?}");
    let redis = children(init[0])[0];
    let r = redis.to_string();
    for argv in [
        &[
            "ip", "link", "add", "wsv0", "type", "veth", "peer", "name", "eth0", "netns", &r,
        ][..],
        &["ip", "link", "set", "wsv0", "master", "br0"],
        &["ip", "link", "set", "wsv0", "up"],
    ] {
        output(&mut in_net_of(h, argv));
    }
    nsenter(
        redis,
        &["-n"],
        &[
            "sh",
            "-c",
            "ip link set lo up && ip addr add 10.125.0.2/24 dev eth0 && ip link set eth0 up",
        ],
    );
    let mut client = Proc::spawn(&mut in_net_of(
        h,
        &["python3", "-c", CLIENT, "10.125.0.2", "6379"],
    ));
    assert_eq!(client.read_line(), "connected");
    let id = ask(&mut client, "CLIENT ID");
    assert_eq!(ask(&mut client, "DEBUG POPULATE 40000 key 1000"), "+OK");
    let images = tempdir("ws-mig-images-");
    let dir = images.path().join("dst");
    let dir_s = dir.to_str().unwrap();
    let mut server_args = vec!["page-server", "--port", "0"];
    if image_dir {
        server_args.extend(["-D", dir_s]);
    }
    let mut server = Proc::spawn(&mut ws_in_net_of(&dst, h, &server_args));
    let addr = server.read_line().trim().to_owned();

    // `warmstart CMD -t REDIS --page-server ADDR EXTRA... --display-stats`.
    let step = |cmd: &str, extra: &[&str]| {
        let mut args = vec![cmd, "-t", &r, "--page-server", &addr];
        args.extend_from_slice(extra);
        args.push("--display-stats");
        dump_step(&src, h, rt.path(), &args)
    };
    let (id1, read1, taken1) = step("pre-dump", &[]);
    assert!(read1 > 10_000 && taken1 == 0, "{read1} {taken1}");
    assert_eq!(ask(&mut client, "SET b 2"), "+OK");
    let (id2, _, taken2) = step("pre-dump", &["--prev", &id1]);
    assert!(taken2 > 10_000, "second pre-dump took {taken2} pages");
    assert_eq!(ask(&mut client, "SET c 3"), "+OK");
    let (fin, read3, taken3) = step("dump", &["--prev", &id2, "--tcp-established"]);
    assert!(
        taken3 > 10 * read3,
        "the final dump read {read3} pages and took {taken3} from the pre-dump"
    );
    assert!(wait_pid_exit(redis, TIMEOUT), "the dumped redis still runs");
    drop(app);

    // The destination: a new network namespace, the veth's new peer on the same bridge.
    let mut guard = KillGuard::new();
    let from: Vec<&str> = if image_dir {
        vec!["-D", dir_s]
    } else {
        vec!["--page-server", &addr, &fin]
    };
    let mut restore_args = vec![
        "restore",
        "--tcp-established",
        "-d",
        "--veth",
        "eth0=wsv1@br0",
    ];
    restore_args.extend(from);
    let mut restore = Proc::spawn(&mut ws_in_net_of(&src, h, &restore_args));
    let first = restore.read_line();
    let pid: i32 = first
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("restore printed {first:?}: {}", restore.stderr_after_exit()));
    guard.add(pid);
    assert!(restore.wait().success(), "restore -d failed");
    assert_ne!(
        ns_id(&pid.to_string(), "net"),
        ns_id(&h.to_string(), "net"),
        "the instance has a network namespace of its own"
    );

    // The same connection, the same client for redis, every write there.
    assert_eq!(
        ask(&mut client, "CLIENT ID"),
        id,
        "redis sees another client"
    );
    assert_eq!(ask(&mut client, "GET b"), "2");
    assert_eq!(ask(&mut client, "GET c"), "3");
    // DEBUG POPULATE pads each value with NULs to the size asked.
    let mut value = "value:39999".to_owned();
    value.extend(std::iter::repeat_n('\0', 1000 - value.len()));
    assert!(
        ask(&mut client, "GET key:39999") == value,
        "key:39999 changed"
    );
    assert_eq!(ask(&mut client, "DBSIZE"), ":40002");
    assert_eq!(ask(&mut client, "SET d 4"), "+OK");
    assert_eq!(ask(&mut client, "GET d"), "4");
    client.close_stdin();
    assert!(client.wait().success(), "the client");
    drop(guard);
    server.close_stdin();
    drop(server);
    drop(holder);
}
