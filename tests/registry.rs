//! `push`, `pull`, `login` and `run REF` against a real OCI registry (Debian's
//! `docker-registry`, the CNCF Distribution server) started on 127.0.0.1 with a throwaway
//! storage folder, once with basic auth and TLS (a CA made here).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{cold, fixture, python, run_with, workloads_dir, Proc, Ws, TIMEOUT};

/// Input for the fixture and what it answers.
const INPUT: &str = "a\nb\nsum\n";

fn expected() -> String {
    let out = cold(&[fixture("pscounter")], INPUT);
    out.assert_ok();
    assert!(out.stdout.contains("3 sum="), "{}", out.describe());
    out.stdout
}

/// A running `docker-registry`, killed (and its storage removed) on drop.
struct Registry {
    proc: Option<Proc>,
    dir: tempfile::TempDir,
    addr: String,
}

struct Secure {
    htpasswd: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Registry {
    fn start(secure: Option<&Secure>) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("registry-")
            .tempdir()
            .unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        if let Some(s) = secure {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                s.cert.display(),
                s.key.display(),
                s.htpasswd.display()
            ));
        }
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config).unwrap();
        let p = Proc::spawn(Command::new("docker-registry").arg("serve").arg(&cfg));
        p.wait_stderr("listening on");
        Registry {
            proc: Some(p),
            dir,
            addr,
        }
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            // SAFETY: kill takes no pointers; the child is not yet waited for.
            unsafe { libc::kill(p.pid(), libc::SIGKILL) };
            p.wait();
        }
    }

    /// The storage file of blob `digest`.
    fn blob(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Manifest `n` of `repo:tag`'s OCI index (0: the head, 1: the blocks), from the
    /// registry's storage.
    fn manifest_of(&self, repo: &str, tag: &str, n: usize) -> serde_json::Value {
        let link = self.dir.path().join(format!(
            "data/docker/registry/v2/repositories/{repo}/_manifests/tags/{tag}/current/link"
        ));
        let digest = std::fs::read_to_string(link).unwrap();
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.blob(digest.trim())).unwrap()).unwrap();
        assert_eq!(
            index["mediaType"],
            "application/vnd.oci.image.index.v1+json"
        );
        let m = index["manifests"][n]["digest"].as_str().unwrap();
        serde_json::from_slice(&std::fs::read(self.blob(m)).unwrap()).unwrap()
    }

    /// `repo:tag`'s head manifest.
    fn manifest(&self, repo: &str, tag: &str) -> serde_json::Value {
        self.manifest_of(repo, tag, 0)
    }

    /// The storage file of the `n`th blob of media type `kind` (the blocks manifest lists
    /// the index parts, then the blocks) of `repo:tag`.
    fn bulk(&self, repo: &str, tag: &str, kind: &str, n: usize) -> PathBuf {
        let m = self.manifest_of(repo, tag, 1);
        let want = format!("application/vnd.warmstart.snapshot.{kind}.v1");
        let l = (m["layers"].as_array().unwrap().iter())
            .filter(|l| l["mediaType"] == want.as_str())
            .nth(n)
            .unwrap_or_else(|| panic!("no {kind} {n} in {m}"));
        self.blob(l["digest"].as_str().unwrap())
    }

    /// The storage file of block `n` of `repo:tag`.
    fn layer(&self, repo: &str, tag: &str, n: usize) -> PathBuf {
        self.bulk(repo, tag, "block", n)
    }

    /// The blob files of the registry's storage, largest first.
    fn blobs(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let root = self.dir.path().join("data/docker/registry/v2/blobs");
        fn walk(d: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.file_name().is_some_and(|n| n == "data") {
                    out.push(p);
                }
            }
        }
        walk(&root, &mut out);
        out.sort_by_key(|p| std::cmp::Reverse(std::fs::metadata(p).unwrap().len()));
        out
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn json(out: &common::Out) -> serde_json::Value {
    out.assert_ok();
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", out.describe()))
}

fn push(ws: &Ws, snap: &str, reference: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["push", snap, reference, "--json"];
    args.extend_from_slice(extra);
    json(&ws.run(&args, ""))
}

/// The ids of a store's snapshots with their names.
fn listed(ws: &Ws) -> Vec<(String, Vec<String>)> {
    let v = json(&ws.run(&["ls", "--json"], ""));
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_owned(),
                s["names"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|n| n.as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn push_pull_and_run() {
    let reg = Registry::start(None);
    let ws = Ws::new();
    let id = ws.record("x", &[fixture("pscounter")]);
    let r = format!("{}/apps/counter:v1", reg.addr);
    let rep = push(&ws, "x", &r, &["--insecure"]);
    assert!(rep["id"].as_str().unwrap().starts_with(&id));
    assert!(rep["blobs"].as_u64().unwrap() >= 4, "{rep}");
    assert_eq!(
        rep["bytes_uploaded"], rep["bytes"],
        "first push uploads all: {rep}"
    );

    // Pulled into an empty store: same id, named counter-v1, runs with its memory.
    let other = Ws::new();
    other.run(&["pull", &r, "--insecure"], "").assert_ok();
    let ls = listed(&other);
    assert_eq!(ls.len(), 1, "{ls:?}");
    assert!(ls[0].0.starts_with(&id), "{ls:?}");
    assert_eq!(ls[0].1, vec!["counter-v1".to_owned()]);
    other.run(&["verify"], "").assert_ok();
    let out = other.run(&["run", "--no-serve", "counter-v1"], INPUT);
    out.assert_ok();
    assert_eq!(out.stdout, expected(), "{}", out.describe());

    // Plain HTTP is refused for a registry that is not on loopback.
    let out = ws.run(
        &["push", "x", "registry.example.com/a/b:v1", "--insecure"],
        "",
    );
    out.assert_fail();
    assert!(
        out.stderr.contains("only for a loopback registry"),
        "{}",
        out.describe()
    );
}

#[test]
fn lazy_run_from_registry_then_local() {
    let mut reg = Registry::start(None);
    let ws = Ws::new();
    let id = ws.record("x", &[fixture("pscounter")]);
    let r = format!("{}/apps/counter:v1", reg.addr);
    push(&ws, "x", &r, &["--insecure"]);
    let expect = expected();
    // Faults only (no background stream): the memory comes by range requests.
    let empty = Ws::new();
    let out = empty.run(
        &[
            "run",
            "--no-serve",
            "--no-prefetch",
            "--no-stream",
            "--insecure",
            &r,
        ],
        INPUT,
    );
    assert_eq!(out.stdout, expect, "{}", out.describe());
    assert!(listed(&empty).is_empty(), "--no-stream keeps nothing");
    // With the background stream, the snapshot lands in the store...
    let out = empty.run(&["run", "--no-serve", "--insecure", &r], INPUT);
    assert_eq!(out.stdout, expect, "{}", out.describe());
    let ls = listed(&empty);
    assert!(
        ls.len() == 1 && ls[0].0.starts_with(&id) && ls[0].1 == ["counter-v1"],
        "{ls:?}"
    );
    // ...so the next run is local, registry gone.
    reg.stop();
    let out = empty.run(&["run", "--no-serve", "counter-v1"], INPUT);
    assert_eq!(out.stdout, expect, "{}", out.describe());
}

#[test]
fn repush_after_rerecord_and_shared_blocks() {
    let reg = Registry::start(None);
    let ws = Ws::new();
    let a = ws.record("x", &[fixture("regpages")]);
    let b = ws.record("y", &[fixture("regpages")]);
    assert_ne!(a, b, "two records are two snapshots");
    let first = push(
        &ws,
        "x",
        &format!("{}/apps/counter:v1", reg.addr),
        &["--insecure"],
    );
    let again = push(
        &ws,
        "y",
        &format!("{}/apps/counter:v2", reg.addr),
        &["--insecure"],
    );
    let (up, total) = (
        again["bytes_uploaded"].as_u64().unwrap(),
        again["bytes"].as_u64().unwrap(),
    );
    assert!(
        up * 20 < total,
        "re-push of a re-recorded app uploaded {up} of {total} bytes: {first} {again}"
    );
    assert!(
        again["blobs_uploaded"].as_u64().unwrap() < again["blobs"].as_u64().unwrap(),
        "{again}"
    );
    // Another repository of the same registry: blocks are shared by digest in storage.
    let before = reg.blobs().len();
    push(
        &ws,
        "y",
        &format!("{}/other/counter:v1", reg.addr),
        &["--insecure"],
    );
    assert_eq!(
        reg.blobs().len(),
        before,
        "the same blobs serve both repositories"
    );
    // Both pull and run.
    let cold = cold(&[fixture("regpages")], INPUT);
    cold.assert_ok();
    for tag in ["v1", "v2"] {
        let other = Ws::new();
        let r = format!("{}/apps/counter:{tag}", reg.addr);
        other.run(&["pull", &r, "--insecure"], "").assert_ok();
        let out = other.run(&["run", "--no-serve", &format!("counter-{tag}")], INPUT);
        assert_eq!(out.stdout, cold.stdout, "{}", out.describe());
    }
}

/// A Python app recorded twice with `--reproducible` (and its hash seed fixed) and pushed
/// to one tag twice: the second push goes against the first and uploads only what
/// changed (blocks of the changed pages, the head with the patched index records); a
/// lazy run of it (whose hot pages are the first push's, the changed ones stale) stores
/// exactly the second snapshot, and a pull does too.
#[test]
fn repush_against_the_base_uploads_what_changed() {
    let reg = Registry::start(None);
    let ws = Ws::new();
    let app = [python(), workloads_dir().join("py_echo.py")];
    let record = |name: &str| {
        let mut args: Vec<std::ffi::OsString> = vec![
            "record".into(),
            "--reproducible".into(),
            "--name".into(),
            name.into(),
            "--".into(),
        ];
        args.extend(app.iter().map(|a| a.clone().into_os_string()));
        let mut cmd = ws.cmd(&args);
        cmd.env("PYTHONHASHSEED", "11");
        let out = run_with(&mut cmd, b"", TIMEOUT);
        out.assert_ok();
        out.stdout.trim().to_owned()
    };
    record("a");
    let b = record("b");
    // A working set learned: the artifact gets hot pages.
    for name in ["a", "b"] {
        ws.run(&["run", "--no-serve", name], "x\n").assert_ok();
    }
    let r = format!("{}/apps/echo:latest", reg.addr);
    let first = push(&ws, "a", &r, &["--insecure"]);
    let again = push(&ws, "b", &r, &["--insecure"]);
    assert_eq!(again["against"], serde_json::json!(r), "{again}");
    assert!(first["against"].is_null(), "{first}");
    let whole = push(
        &ws,
        "b",
        &format!("{}/apps/echo:whole", reg.addr),
        &["--insecure", "--full"],
    );
    let up = |v: &serde_json::Value| v["bytes_uploaded"].as_u64().unwrap();
    let total = again["bytes"].as_u64().unwrap();
    assert!(
        up(&again) * 10 < total && up(&again) * 3 < up(&whole),
        "a re-push against the base uploaded {} of {total} bytes (a whole push after it \
         {}): {first} {again} {whole}",
        up(&again),
        up(&whole)
    );
    // Lazily from the registry, streaming into the store: the instance answers, and
    // what lands in the store is the second snapshot, every page as hashed.
    // (The instance lives until the stream is in: one that ends first keeps nothing.)
    let other = Ws::new();
    let mut run = Proc::spawn(&mut other.cmd(&["run", "--no-serve", "--insecure", &r]));
    run.send("p");
    assert_eq!(run.read_line(), "1 p");
    let deadline = std::time::Instant::now() + TIMEOUT;
    while listed(&other).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    run.send("q");
    assert_eq!(run.read_line(), "2 q");
    run.close_stdin();
    assert!(run.wait().success());
    let ls = listed(&other);
    assert!(ls.len() == 1 && ls[0].0.starts_with(&b), "{ls:?}");
    other.run(&["verify"], "").assert_ok();
    // Pulled whole.
    let pulled = Ws::new();
    pulled.run(&["pull", &r, "--insecure"], "").assert_ok();
    let ls = listed(&pulled);
    assert!(ls.len() == 1 && ls[0].0.starts_with(&b), "{ls:?}");
    pulled.run(&["verify"], "").assert_ok();
    // A base named that is not there is refused by name.
    let out = ws.run(&["push", "b", &r, "--insecure", "--base", "nosuchtag"], "");
    out.assert_fail();
    assert!(
        out.stderr.contains("apps/echo:nosuchtag") && out.stderr.contains("no such manifest"),
        "{}",
        out.describe()
    );
    // A base in another repository is refused by name.
    let out = ws.run(
        &[
            "push",
            "b",
            &format!("{}/apps/other:v1", reg.addr),
            "--insecure",
            "--base",
            &r,
        ],
        "",
    );
    out.assert_fail();
    assert!(
        out.stderr.contains("in another repository"),
        "{}",
        out.describe()
    );
}

#[test]
fn registry_stopped_mid_stream_kills_the_instance() {
    let mut reg = Registry::start(None);
    let ws = Ws::new();
    ws.record("x", &[fixture("pscounter")]);
    let r = format!("{}/apps/counter:v1", reg.addr);
    push(&ws, "x", &r, &["--insecure"]);
    let empty = Ws::new();
    let mut run = Proc::spawn(&mut empty.cmd(&[
        "run",
        "--no-serve",
        "--no-prefetch",
        "--no-stream",
        "--insecure",
        "--registry-timeout",
        "2",
        &r,
    ]));
    run.send("a");
    assert_eq!(run.read_line(), "1 a");
    reg.stop();
    // The whole buffer is needed now: the instance must die, never read zeros.
    run.send("sum");
    let st = run.wait();
    assert!(!st.success(), "run should fail once its registry is gone");
    let err = run.stderr_after_exit();
    assert!(
        err.contains(&format!("registry {}/apps/counter", reg.addr)) && err.contains("killed"),
        "stderr should name the registry and say the instance was killed:\n{err}"
    );
    assert!(
        run.out.try_iter().all(|l| !l.contains("sum=")),
        "the instance answered without its memory"
    );
}

#[test]
fn tampered_blob_is_refused() {
    let reg = Registry::start(None);
    let ws = Ws::new();
    ws.record("x", &[fixture("pscounter")]);
    let r = format!("{}/apps/counter:v1", reg.addr);
    push(&ws, "x", &r, &["--insecure"]);
    // Flip a byte in the middle of the first block.
    let blob = &reg.layer("apps/counter", "v1", 0);
    let original = std::fs::read(blob).unwrap();
    let mut bytes = original.clone();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(blob, &bytes).unwrap();

    let other = Ws::new();
    let out = other.run(&["pull", &r, "--insecure"], "");
    out.assert_fail();
    assert!(
        out.stderr.contains("tampered") && out.stderr.contains("sha256:"),
        "{}",
        out.describe()
    );
    assert!(listed(&other).is_empty(), "nothing half-pulled is listed");
    // A damaged part of the index (the blocks intact) is refused the same way, by a
    // lazy run too.
    std::fs::write(blob, &original).unwrap();
    let r2 = format!("{}/apps/counter:v2", reg.addr);
    push(&ws, "x", &r2, &["--insecure"]);
    let part = &reg.bulk("apps/counter", "v2", "index-part", 0);
    let part_digest = format!(
        "sha256:{}",
        part.parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
    );
    let mut bytes = std::fs::read(part).unwrap();
    bytes[40] ^= 0x01;
    std::fs::write(part, &bytes).unwrap();
    for args in [
        &["pull", &r2, "--insecure"][..],
        &["run", "--no-serve", "--no-stream", "--insecure", &r2][..],
    ] {
        let out = other.run(args, INPUT);
        out.assert_fail();
        assert!(
            out.stderr.contains("tampered")
                && out.stderr.contains(&part_digest)
                && !out.stdout.contains("sum="),
            "{}",
            out.describe()
        );
    }
    assert!(listed(&other).is_empty(), "nothing half-pulled is listed");
    // An eager run from the registry: the block (fetched whole, or the page by a range)
    // is refused.
    let out = other.run(
        &[
            "run",
            "--no-serve",
            "--eager",
            "--no-stream",
            "--insecure",
            &r,
        ],
        INPUT,
    );
    out.assert_fail();
    assert!(
        (out.stderr.contains("tampered") || out.stderr.contains("corrupt"))
            && !out.stdout.contains("sum="),
        "{}",
        out.describe()
    );
}

#[test]
fn hot_pages_blob_pushed_and_damage_ignored() {
    let reg = Registry::start(None);
    let ws = Ws::new();
    ws.record("x", &[fixture("pscounter")]);
    let expect = expected();
    // A lazy run learns the working set: its hot pages are pushed as the last layer.
    let out = ws.run(&["run", "--no-serve", "x"], INPUT);
    assert_eq!(out.stdout, expect, "{}", out.describe());
    let r = format!("{}/apps/counter:v1", reg.addr);
    push(&ws, "x", &r, &["--insecure"]);
    let m = reg.manifest("apps/counter", "v1");
    let layers = m["layers"].as_array().unwrap();
    let last = layers.last().unwrap();
    assert_eq!(
        last["mediaType"], "application/vnd.warmstart.snapshot.hot.v1",
        "{m}"
    );
    let lazy = ["run", "--no-serve", "--no-stream", "--insecure", r.as_str()];
    let out = Ws::new().run(&lazy, INPUT);
    assert_eq!(out.stdout, expect, "{}", out.describe());
    assert!(!out.stderr.contains("hot pages"), "{}", out.describe());
    // Damaged in the registry: refused by its digest, the run fetches the blocks.
    let blob = reg.blob(last["digest"].as_str().unwrap());
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();
    let out = Ws::new().run(&lazy, INPUT);
    assert_eq!(out.stdout, expect, "{}", out.describe());
    assert!(
        out.stderr.contains("ignoring its hot pages") && out.stderr.contains("tampered"),
        "{}",
        out.describe()
    );
}

#[test]
fn head_carried_in_the_index_is_checked() {
    use base64::Engine;
    use std::io::{Read, Write};
    let b64 = base64::engine::general_purpose::STANDARD;
    let reg = Registry::start(None);
    let ws = Ws::new();
    ws.record("x", &[fixture("pscounter")]);
    let expect = expected();
    let r = format!("{}/apps/counter:v1", reg.addr);
    push(&ws, "x", &r, &["--insecure"]);
    let link = reg
        .dir
        .path()
        .join("data/docker/registry/v2/repositories/apps/counter/_manifests/tags/v1/current/link");
    let index_file = reg.blob(std::fs::read_to_string(link).unwrap().trim());
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_file).unwrap()).unwrap();
    let notes = &index["annotations"];
    let data = notes["dev.warmstart.snapshot.head.data"].as_str().unwrap();
    let head_digest = notes["dev.warmstart.snapshot.head"].as_str().unwrap();
    let head_digest = head_digest.split('@').next().unwrap();
    // The head it carries is the head blob, byte for byte.
    assert_eq!(
        b64.decode(data).unwrap(),
        std::fs::read(reg.blob(head_digest)).unwrap()
    );
    // The index edited, pushed as it is under another tag (as a registry would hold
    // an artifact pushed so).
    let with = |edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut index = index.clone();
        edit(index["annotations"].as_object_mut().unwrap());
        let body = serde_json::to_vec(&index).unwrap();
        let mut c = std::net::TcpStream::connect(&reg.addr).unwrap();
        write!(
            c,
            "PUT /v2/apps/counter/manifests/edited HTTP/1.1\r\nHost: {}\r\nContent-Type: \
             application/vnd.oci.image.index.v1+json\r\nContent-Length: {}\r\nConnection: \
             close\r\n\r\n",
            reg.addr,
            body.len()
        )
        .unwrap();
        c.write_all(&body).unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 201"), "{reply}");
        let edited = format!("{}/apps/counter:edited", reg.addr);
        Ws::new().run(
            &["run", "--no-serve", "--no-stream", "--insecure", &edited],
            INPUT,
        )
    };
    // Without it (a head too large to carry), the run fetches the head blob.
    let out = with(&|a| {
        a.remove("dev.warmstart.snapshot.head.data");
    });
    assert_eq!(out.stdout, expect, "{}", out.describe());
    // Changed: refused by the head blob's digest, before anything runs.
    let mut bytes = b64.decode(data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    let out = with(&|a| {
        a.insert(
            "dev.warmstart.snapshot.head.data".into(),
            b64.encode(&bytes).into(),
        );
    });
    out.assert_fail();
    assert!(
        out.stderr
            .contains("the head blob its OCI index carries is not")
            && out.stderr.contains(head_digest)
            && !out.stdout.contains("sum="),
        "{}",
        out.describe()
    );
    let out = Ws::new().run(
        &["run", "--no-serve", "--no-stream", "--insecure", &r],
        INPUT,
    );
    assert_eq!(out.stdout, expect, "{}", out.describe());
}

/// A CA and a server certificate for 127.0.0.1 (openssl), and an htpasswd (bcrypt).
fn secure_setup(dir: &Path) -> (Secure, PathBuf) {
    let sh = |args: &[&str]| {
        let out = run_with(
            Command::new("openssl").args(args).current_dir(dir),
            b"",
            TIMEOUT,
        );
        out.assert_ok();
    };
    sh(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=warmstart test CA",
        "-days",
        "2",
    ]);
    sh(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    sh(&[
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.crt",
        "-days",
        "2",
        "-extfile",
        "ext",
    ]);
    let hash = bcrypt::hash("s3cret", 5).unwrap();
    std::fs::write(dir.join("htpasswd"), format!("alice:{hash}\n")).unwrap();
    (
        Secure {
            htpasswd: dir.join("htpasswd"),
            cert: dir.join("srv.crt"),
            key: dir.join("srv.key"),
        },
        dir.join("ca.crt"),
    )
}

#[test]
fn basic_auth_over_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let (secure, ca) = secure_setup(tmp.path());
    let reg = Registry::start(Some(&secure));
    let ws = Ws::new();
    ws.record("x", &[fixture("pscounter")]);
    let r = format!("{}/apps/counter:v1", reg.addr);
    let ca = ca.to_str().unwrap();
    let docker = tempfile::tempdir().unwrap();
    let with_docker = |args: &[&str], stdin: &str| {
        let mut c = ws.cmd(args);
        c.env("DOCKER_CONFIG", docker.path());
        run_with(&mut c, stdin.as_bytes(), TIMEOUT)
    };
    // No credentials: a clear error.
    let out = with_docker(&["push", "x", &r, "--ca-cert", ca], "");
    out.assert_fail();
    assert!(
        out.stderr.contains("requires authentication") && out.stderr.contains("warmstart login"),
        "{}",
        out.describe()
    );
    // Wrong password: a clear error.
    with_docker(
        &["login", &reg.addr, "-u", "alice", "--password-stdin"],
        "wrong\n",
    )
    .assert_ok();
    let out = with_docker(&["push", "x", &r, "--ca-cert", ca], "");
    out.assert_fail();
    assert!(
        out.stderr.contains("refused the credentials"),
        "{}",
        out.describe()
    );
    // The CA not trusted: refused.
    let out = with_docker(&["push", "x", &r], "");
    out.assert_fail();
    assert!(
        out.stderr.contains(&reg.addr) && out.stderr.to_lowercase().contains("certificate"),
        "{}",
        out.describe()
    );
    // Right password (config.json written by login, as docker's): push, pull, run.
    with_docker(
        &["login", &reg.addr, "-u", "alice", "--password-stdin"],
        "s3cret\n",
    )
    .assert_ok();
    let cfg = std::fs::read_to_string(docker.path().join("config.json")).unwrap();
    assert!(cfg.contains("auths") && cfg.contains(&reg.addr), "{cfg}");
    with_docker(&["push", "x", &r, "--ca-cert", ca], "").assert_ok();
    let other = Ws::new();
    let mut c = other.cmd(&["pull", &r, "--ca-cert", ca]);
    c.env("DOCKER_CONFIG", docker.path());
    run_with(&mut c, b"", TIMEOUT).assert_ok();
    let out = other.run(&["run", "--no-serve", "counter-v1"], INPUT);
    assert_eq!(out.stdout, expected(), "{}", out.describe());
    // Plain HTTP to a TLS registry fails (it answers 400 before any challenge: the
    // password is never sent in clear).
    let out = with_docker(&["pull", &r, "--insecure"], "");
    out.assert_fail();
}

#[test]
fn serve_warm_ref_pulls_and_serves_run_ref() {
    let reg = Registry::start(None);
    let ws = Ws::new();
    let id = ws.record("x", &[fixture("pscounter")]);
    let r = format!("{}/apps/counter:v1", reg.addr);
    push(&ws, "x", &r, &["--insecure"]);
    let host = Ws::new();
    let daemon = Proc::spawn(&mut host.cmd(&["-v", "serve", "--insecure", "--warm", &r]));
    let line = daemon.read_line();
    assert!(line.starts_with("serving "), "serve printed {line:?}");
    daemon.wait_stderr("parked an instance of");
    let ls = listed(&host);
    assert_eq!(ls.len(), 1, "{ls:?}");
    assert!(ls[0].0.starts_with(&id), "{ls:?}");
    assert_eq!(ls[0].1, vec!["counter-v1".to_owned()]);
    // `run REF` runs the store's copy of what REF names: the first run learns its working
    // set, the next ones are the daemon's.
    let out = host.run(&["run", "--display-stats", "--insecure", &r], INPUT);
    assert_eq!(out.stdout, expected(), "{}", out.describe());
    assert!(
        out.stderr.contains(&format!("restore of {}", &id[..12])),
        "{}",
        out.describe()
    );
    assert!(host.working_set_pages("counter-v1").is_some_and(|n| n > 0));
    let out = host.run(&["run", "--display-stats", "--insecure", &r], INPUT);
    assert_eq!(out.stdout, expected(), "{}", out.describe());
    assert!(out.stderr.contains("by serve ("), "{}", out.describe());
    // REF moved on to another snapshot the host does not have: not served stale, run
    // from the registry.
    let id2 = ws.record("y", &[fixture("pscounter")]);
    assert_ne!(id, id2);
    push(&ws, "y", &r, &["--insecure"]);
    let out = host.run(&["run", "--display-stats", "--insecure", &r], INPUT);
    assert_eq!(out.stdout, expected(), "{}", out.describe());
    assert!(
        !out.stderr.contains("by serve")
            && out.stderr.contains(&format!("restore of {}", &id2[..12])),
        "{}",
        out.describe()
    );
}
