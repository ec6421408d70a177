//! `warmstart page-server` over TLS with client certificates (`--tls-cert`, `--tls-key`,
//! `--tls-cacert`) and with an image directory (`-D DIR`): dumps sent to it and lazy
//! restores from it, and the clients it refuses (each with one clear message).
//!
//! Certificates are made at test time with the `openssl` command (a CA, a server
//! certificate for 127.0.0.1, a client certificate, and a client certificate of another CA).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{cold, fixture, run_with, wait_pid_exit, Out, Proc, Ws, TIMEOUT};

/// The certificates of one test, in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let pki = Pki {
            dir: tempfile::Builder::new()
                .prefix("ws-pki-")
                .tempdir()
                .unwrap(),
        };
        let sh = |args: &[&str]| {
            run_with(
                Command::new("openssl")
                    .args(args)
                    .current_dir(pki.dir.path()),
                b"",
                TIMEOUT,
            )
            .assert_ok();
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other"] {
            let subj = format!("/CN=warmstart test {ca} CA");
            let (key, crt) = (format!("{ca}.key"), format!("{ca}.crt"));
            let mut a = vec!["req", "-x509"];
            a.extend(ec);
            a.extend(["-keyout", &key, "-out", &crt, "-subj", &subj, "-days", "2"]);
            sh(&a);
        }
        for (name, ca, ext) in [
            (
                "srv",
                "ca",
                "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
            ),
            ("cli", "ca", "extendedKeyUsage=clientAuth\n"),
            ("stranger", "other", "extendedKeyUsage=clientAuth\n"),
        ] {
            let (key, csr, crt, extf) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
                format!("{name}.ext"),
            );
            let subj = format!("/CN={name}");
            let mut a = vec!["req"];
            a.extend(ec);
            a.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            sh(&a);
            std::fs::write(pki.dir.path().join(&extf), ext).unwrap();
            let (cacrt, cakey) = (format!("{ca}.crt"), format!("{ca}.key"));
            sh(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &cacrt,
                "-CAkey",
                &cakey,
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "2",
                "-extfile",
                &extf,
            ]);
        }
        pki
    }

    fn path(&self, file: &str) -> String {
        self.dir.path().join(file).to_str().unwrap().to_owned()
    }

    /// The server's options: its certificate, and client certificates required.
    fn server(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.path("srv.crt"),
            "--tls-key".into(),
            self.path("srv.key"),
            "--tls-cacert".into(),
            self.path("ca.crt"),
        ]
    }

    /// A client's options: `cert` (`cli`, `stranger`, or none) and the CA to trust.
    fn client(&self, cert: Option<&str>, ca: &str) -> Vec<String> {
        let mut v = vec!["--tls-cacert".into(), self.path(&format!("{ca}.crt"))];
        if let Some(c) = cert {
            v.extend([
                "--tls-cert".into(),
                self.path(&format!("{c}.crt")),
                "--tls-key".into(),
                self.path(&format!("{c}.key")),
            ]);
        }
        v
    }
}

/// `warmstart page-server --port 0 ARGS` on `ws`'s store; returns it and its address.
fn page_server(ws: &Ws, args: &[String]) -> (Proc, String) {
    let mut cmd = ws.cmd(&["page-server", "--port", "0"]);
    cmd.env("WARMSTART_LOG", "info").args(args);
    let p = Proc::spawn(&mut cmd);
    let addr = p.read_line();
    assert!(
        addr.starts_with("127.0.0.1:"),
        "page-server should print its bound address, printed {addr:?}"
    );
    (p, addr)
}

/// The fixture started and given one line ("a"), ready to be dumped.
fn started() -> Proc {
    let mut orig = Proc::spawn(&mut Command::new(fixture("pscounter")));
    orig.wait_stderr("ready");
    orig.send("a");
    assert_eq!(orig.read_line(), "1 a");
    orig
}

/// What the fixture prints for "b\nsum\n" after it was given "a": from a cold run.
fn expected_after_a() -> String {
    let out = cold(&[fixture("pscounter")], "a\nb\nsum\n");
    out.assert_ok();
    assert!(out.stdout.contains("3 sum="), "{}", out.describe());
    out.stdout
        .lines()
        .skip(1)
        .map(|l| format!("{l}\n"))
        .collect()
}

/// `dump -t PID --page-server ADDR EXTRA` from a fresh store; the id it printed. The
/// dumped process is gone afterwards.
fn dump_to(addr: &str, orig: &Proc, extra: &[String]) -> String {
    let here = Ws::new();
    let pid = orig.pid().to_string();
    let mut args: Vec<String> = ["dump", "-t", &pid, "--page-server", addr]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend_from_slice(extra);
    let out = here.run(&args, "");
    out.assert_ok();
    assert!(
        wait_pid_exit(orig.pid(), TIMEOUT),
        "the dumped process still runs"
    );
    // Nothing went to the local store.
    assert_eq!(here.ls_json(), serde_json::json!([]));
    out.stdout.trim().to_owned()
}

fn assert_refused(out: &Out, addr: &str, needles: &[&str]) {
    out.assert_fail();
    let err = out.stderr.trim();
    assert!(
        err.contains(&format!("page server {addr}: "))
            && needles.iter().all(|n| err.contains(n))
            && err.lines().count() == 1,
        "expected one line naming page server {addr} and saying {needles:?}:\n{}",
        out.describe()
    );
}

#[test]
fn dump_to_a_tls_page_server_and_run_lazily_from_it() {
    let pki = Pki::new();
    let server_ws = Ws::new();
    let (server, addr) = page_server(&server_ws, &pki.server());
    server.wait_stderr("over TLS, client certificates required");
    let client = pki.client(Some("cli"), "ca");

    let orig = started();
    let mut extra = client.clone();
    extra.extend(["--name".into(), "moved".into()]);
    let id = dump_to(&addr, &orig, &extra);
    let ls = server_ws.ls_json();
    assert!(ls[0]["id"].as_str().unwrap().starts_with(&id), "{ls}");
    assert_eq!(ls[0]["names"], serde_json::json!(["moved"]));

    // Lazy runs (the default, and --no-prefetch: every page fetched by the fault
    // handler over TLS), then an eager one; "sum" reads the whole 16 MiB buffer.
    let expect = expected_after_a();
    let there = Ws::new();
    for extra in [&[][..], &["--no-prefetch"][..], &["--eager"][..]] {
        let mut args: Vec<String> = vec!["run".into(), "--page-server".into(), addr.clone()];
        args.extend(client.iter().cloned());
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push("moved".into());
        let out = there.run(&args, "b\nsum\n");
        out.assert_ok();
        assert_eq!(out.stdout, expect, "run {extra:?}: {}", out.describe());
    }
    // restore --page-server --lazy too, by id prefix.
    let mut args: Vec<String> = vec![
        "restore".into(),
        "--lazy".into(),
        "--page-server".into(),
        addr.clone(),
    ];
    args.extend(client.iter().cloned());
    args.push(id);
    let out = there.run(&args, "b\nsum\n");
    out.assert_ok();
    assert_eq!(out.stdout, expect, "restore --lazy: {}", out.describe());
    assert_eq!(there.ls_json(), serde_json::json!([]));
}

#[test]
fn tls_page_server_refuses_clients_it_cannot_trust() {
    let pki = Pki::new();
    let ws = Ws::new();
    ws.record("x", &[fixture("pscounter")]);
    let (server, addr) = page_server(&ws, &pki.server());
    let (_plain, plain_addr) = page_server(&ws, &[]);
    let empty = Ws::new();
    let run = |addr: &str, tls: Vec<String>| {
        let mut args: Vec<String> = vec!["run".into(), "--page-server".into(), addr.into()];
        args.extend(tls);
        args.push("x".into());
        empty.run(&args, "sum\n")
    };
    // A plain client.
    let out = run(&addr, vec![]);
    assert_refused(&out, &addr, &["speaks TLS only", "--tls-cacert"]);
    // A TLS client without a certificate.
    let out = run(&addr, pki.client(None, "ca"));
    assert_refused(
        &out,
        &addr,
        &["requires a client certificate", "--tls-cert"],
    );
    // A client certificate from another CA.
    let out = run(&addr, pki.client(Some("stranger"), "ca"));
    assert_refused(&out, &addr, &["refused this client's certificate"]);
    // A client that does not trust the server's CA.
    let out = run(&addr, pki.client(Some("cli"), "other"));
    assert_refused(&out, &addr, &["certificate is not trusted", "--tls-cacert"]);
    // A TLS client to a plain server.
    let out = run(&plain_addr, pki.client(Some("cli"), "ca"));
    assert_refused(&out, &plain_addr, &["does not speak TLS"]);
    // dump --page-server is refused the same way, the process left running.
    let mut orig = started();
    let pid = orig.pid().to_string();
    let out = empty.run(&["dump", "-t", &pid, "--page-server", &addr], "");
    assert_refused(&out, &addr, &["speaks TLS only"]);
    orig.send("b");
    assert_eq!(
        orig.read_line(),
        "2 b",
        "a refused dump must leave the process"
    );
    // The server said why it ended each refused connection, and still serves.
    server.wait_stderr("peer sent no certificates");
    let mut args: Vec<String> = vec!["run".into(), "--page-server".into(), addr.clone()];
    args.extend(pki.client(Some("cli"), "ca"));
    args.push("x".into());
    let out = empty.run(&args, "a\n");
    out.assert_ok();
    assert_eq!(out.stdout, "1 a\n");
}

#[test]
fn unusable_tls_files_are_named() {
    let pki = Pki::new();
    let ws = Ws::new();
    let missing = pki.path("missing.crt");
    // The server.
    for (args, needles) in [
        (
            vec!["--tls-cert", &missing, "--tls-key", &pki.path("srv.key")],
            vec![format!("--tls-cert {missing}: cannot read it")],
        ),
        (
            vec![
                "--tls-cert",
                &pki.path("srv.crt"),
                "--tls-key",
                &pki.path("cli.key"),
            ],
            vec![format!(
                "--tls-key {}: it is not the private key of the certificate",
                pki.path("cli.key")
            )],
        ),
        (
            vec![
                "--tls-cert",
                &pki.path("srv.crt"),
                "--tls-key",
                &pki.path("srv.key"),
                "--tls-cacert",
                &pki.path("srv.key"),
            ],
            vec![format!(
                "--tls-cacert {}: it holds no PEM certificate",
                pki.path("srv.key")
            )],
        ),
        (
            vec!["--tls-cacert", &pki.path("ca.crt")],
            vec!["also needs --tls-cert FILE and --tls-key FILE".to_owned()],
        ),
    ] {
        let mut a = vec!["page-server", "--port", "0"];
        a.extend(args);
        let out = ws.run(&a, "");
        out.assert_fail();
        assert!(
            needles.iter().all(|n| out.stderr.contains(n)) && out.stdout.is_empty(),
            "{needles:?}: {}",
            out.describe()
        );
    }
    // A client (before it connects anywhere: nothing listens there).
    let out = ws.run(
        &[
            "run",
            "--page-server",
            "127.0.0.1:1",
            "--tls-cacert",
            &missing,
            "x",
        ],
        "",
    );
    out.assert_fail();
    assert!(
        out.stderr
            .contains(&format!("--tls-cacert {missing}: cannot read it")),
        "{}",
        out.describe()
    );
    let out = ws.run(&["run", "--tls-cacert", &pki.path("ca.crt"), "x"], "");
    out.assert_fail();
    assert!(
        out.stderr.contains("add --page-server"),
        "{}",
        out.describe()
    );
}

/// With TLS and client certificates, a page server on another address than loopback is
/// not warned about; with TLS but no client certificates it still is.
#[test]
fn exposed_tls_page_server_warns_only_without_client_certificates() {
    let pki = Pki::new();
    let ws = Ws::new();
    let start = |tls: &[String]| {
        let mut cmd = ws.cmd(&["page-server", "--port", "0", "--bind", "0.0.0.0"]);
        cmd.args(tls);
        let p = Proc::spawn(&mut cmd);
        let addr = p.read_line();
        (p, addr)
    };
    let (mut quiet, addr) = start(&pki.server());
    // The label comes after any warning.
    quiet.wait_stderr(&format!("listening on {addr} over TLS"));
    // SAFETY: kill takes no pointers; `quiet` is our child, not yet waited for.
    unsafe { libc::kill(quiet.pid(), libc::SIGTERM) };
    quiet.wait();
    let err = quiet.stderr_after_exit();
    assert!(!err.contains("WARNING"), "{err}");

    let (_loud, addr) = start(&pki.server()[..4]);
    let warning = _loud.wait_stderr("WARNING");
    assert!(
        warning.contains(&addr)
            && warning.contains("without client certificates")
            && warning.contains("--tls-cacert"),
        "{warning}"
    );
}

/// `page-server -D DIR` receives a dump into the image directory DIR (which `restore -D`
/// then reads) and serves it to `run --page-server`; a second dump into it is refused.
#[test]
fn image_dir_page_server_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir: PathBuf = tmp.path().join("images");
    let dir_s = dir.to_str().unwrap().to_owned();
    let ws = Ws::new();
    let (server, addr) = page_server(&ws, &["-D".into(), dir_s.clone()]);
    server.wait_stderr(&format!("serving the image directory {dir_s}"));

    // A pre-dump goes there (the first step of a migration into DIR; tests/predump.rs
    // has the whole flow), and the final dump replaces it as DIR's one snapshot.
    let orig = started();
    let pid = orig.pid().to_string();
    let out = Ws::new().run(&["pre-dump", "-t", &pid, "--page-server", &addr], "");
    out.assert_ok();
    let pre = out.stdout.trim().to_owned();
    assert!(image_dir_holds(&dir, &pre), "pre-dump {pre} not in {dir_s}");

    let id = dump_to(&addr, &orig, &[]);
    // The dump is in DIR, not in the server's store.
    assert_eq!(ws.ls_json(), serde_json::json!([]));
    assert!(image_dir_holds(&dir, &id), "{id} not in {dir_s}");

    let expect = expected_after_a();
    let there = Ws::new();
    let out = there.run(&["restore", "-D", &dir_s], "b\nsum\n");
    out.assert_ok();
    assert_eq!(out.stdout, expect, "restore -D: {}", out.describe());
    let out = there.run(&["run", "--page-server", &addr, &id], "b\nsum\n");
    out.assert_ok();
    assert_eq!(out.stdout, expect, "run --page-server: {}", out.describe());

    // A second dump: refused by name, the process left running, DIR unchanged.
    let mut second = started();
    let pid = second.pid().to_string();
    let out = there.run(&["dump", "-t", &pid, "--page-server", &addr], "");
    assert_refused(
        &out,
        &addr,
        &[&format!(
            "image directory {dir_s} already holds snapshot {id}"
        )],
    );
    second.send("b");
    assert_eq!(second.read_line(), "2 b");
    let out = there.run(&["restore", "-D", &dir_s], "b\nsum\n");
    out.assert_ok();
    assert_eq!(out.stdout, expect, "{}", out.describe());
}

/// The one snapshot of image directory `dir` has an id starting with `id`.
fn image_dir_holds(dir: &Path, id: &str) -> bool {
    let ws = Ws::new();
    let out = run_with(
        ws.cmd(&["ls", "--json"]).env("WARMSTART_STORE", dir),
        b"",
        TIMEOUT,
    );
    out.assert_ok();
    let ls: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    ls.as_array().is_some_and(|a| a.len() == 1)
        && ls[0]["id"].as_str().is_some_and(|i| i.starts_with(id))
}
