//! Files that changed since the dump (issue 13): what a restore accepts and refuses, and
//! the private `/tmp` that `record` gives the app, restored fresh in every instance.
//!
//! Rules (see the README): a file the process only writes (`O_WRONLY`, with or without
//! `O_APPEND`) may have grown; an append fd goes on at its end, a write-only one at its
//! offset. A file it reads or maps must hold the same bytes: a new mtime or inode with
//! the same contents (blake3 taken at the dump) is accepted, anything else refused with
//! the file, what changed, and what to do.

mod common;

use std::path::Path;

use common::{python, tempdir, Mode, Proc, Ws};

/// The app of these tests: `data.txt` read, `log.txt` appended to, `out.bin` written at
/// its offset; each input line answers with what it read and where its writes landed.
const LOGGER: &str = r#"
import os, sys
d = sys.argv[1]
data = open(os.path.join(d, "data.txt"))
log = os.open(os.path.join(d, "log.txt"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(log, b"warm\n")
out = os.open(os.path.join(d, "out.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(out, b"AAAA")
for line in sys.stdin:
    data.seek(0)
    at = os.lseek(log, 0, os.SEEK_CUR)
    os.write(log, b"req\n")
    os.write(out, b"B")
    print(data.read().strip(), at, os.lseek(log, 0, os.SEEK_CUR), os.lseek(out, 0, os.SEEK_CUR), flush=True)
"#;

fn write_app(dir: &Path, name: &str, src: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, src).unwrap();
    p
}

fn record_logger(ws: &Ws, d: &Path) -> String {
    std::fs::write(d.join("data.txt"), "hello\n").unwrap();
    let app = write_app(d, "logger.py", LOGGER);
    ws.record(
        "logger",
        &[python().as_os_str(), app.as_os_str(), d.as_os_str()],
    )
}

fn log_len(d: &Path) -> u64 {
    std::fs::metadata(d.join("log.txt")).unwrap().len()
}

#[test]
fn log_grows_and_write_only_fd_goes_on_in_every_mode() {
    let ws = Ws::new();
    let d = tempdir("ws-changed-");
    record_logger(&ws, d.path());
    assert_eq!(std::fs::read(d.path().join("log.txt")).unwrap(), b"warm\n");
    let check = |how: &str, out: &common::Out| {
        out.assert_ok();
        // The log grew by the previous instances' lines: this one's append fd goes on
        // at the end (its offset is the end, and its line lands there); the write-only
        // fd writes at the offset it had (4), whatever other instances wrote there.
        let before = log_len(d.path()) - 4;
        let want = format!("hello {before} {} 5\n", before + 4);
        assert_eq!(out.stdout, want, "{how}:\n{}", out.describe());
        assert_eq!(std::fs::read(d.path().join("out.bin")).unwrap(), b"AAAAB");
    };
    ws.each_mode("logger", "q\n", |mode, out| check(&mode.to_string(), out));
    let _daemon = ws.serve("logger");
    let out = ws.served("logger", "q\n");
    check("served", &out);
    let log = std::fs::read_to_string(d.path().join("log.txt")).unwrap();
    assert_eq!(log, "warm\nreq\nreq\nreq\nreq\n");
}

#[test]
fn read_file_with_same_bytes_is_accepted_changed_bytes_refused() {
    let ws = Ws::new();
    let d = tempdir("ws-changed-");
    let data = d.path().join("data.txt");
    record_logger(&ws, d.path());
    // A new mtime, same bytes (`touch`): accepted after comparing the contents.
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&data)
        .unwrap()
        .set_modified(later)
        .unwrap();
    for mode in [Mode::Eager, Mode::Lazy] {
        let out = ws.run_mode("logger", mode, "q\n");
        out.assert_ok();
        assert!(
            out.stdout.starts_with("hello "),
            "{mode}:\n{}",
            out.describe()
        );
    }
    // Put back by copying (another inode, new mtime, same bytes): accepted too.
    std::fs::remove_file(&data).unwrap();
    std::fs::write(&data, "hello\n").unwrap();
    ws.run_mode("logger", Mode::Eager, "q\n").assert_ok();

    // Same size, other bytes: refused, naming the file, what changed and what to do.
    std::fs::write(&data, "jello\n").unwrap();
    let out = ws.run_mode("logger", Mode::Eager, "q\n");
    out.assert_fail();
    let path = data.display().to_string();
    for needle in [
        path.as_str(),
        "open as fd 3 of process",
        "its contents differ",
        "Put the file back as it was, or record a new snapshot",
    ] {
        assert!(
            out.stderr.contains(needle),
            "{needle:?}:\n{}",
            out.describe()
        );
    }
    // Another size: refused without reading it.
    std::fs::write(&data, "hello world\n").unwrap();
    let out = ws.run_mode("logger", Mode::Lazy, "q\n");
    out.assert_fail();
    assert!(
        out.stderr
            .contains("changed size since the dump (6 bytes then, 12 now)"),
        "{}",
        out.describe()
    );
    // Back as it was: restores again, and served too.
    std::fs::write(&data, "hello\n").unwrap();
    let _daemon = ws.serve("logger");
    ws.served("logger", "q\n").assert_ok();
}

#[test]
fn log_that_shrank_or_was_replaced_is_refused() {
    let ws = Ws::new();
    let d = tempdir("ws-changed-");
    let log = d.path().join("log.txt");
    record_logger(&ws, d.path());
    std::fs::write(&log, "").unwrap();
    let out = ws.run_mode("logger", Mode::Eager, "q\n");
    out.assert_fail();
    for needle in [
        &log.display().to_string()[..],
        "appended to by fd 4 of process",
        "shrank since the dump (5 bytes then, 0 now)",
        "or record a new snapshot",
    ] {
        assert!(
            out.stderr.contains(needle),
            "{needle:?}:\n{}",
            out.describe()
        );
    }
    // Rotated: another file at the path, even a longer one.
    std::fs::remove_file(&log).unwrap();
    std::fs::write(&log, "warm\nrotated\n").unwrap();
    let out = ws.run_mode("logger", Mode::Lazy, "q\n");
    out.assert_fail();
    assert!(
        out.stderr.contains("was replaced since the dump"),
        "{}",
        out.describe()
    );
    // The out.bin fd writes at its offset: a shorter file is refused too.
    std::fs::remove_file(&log).unwrap();
    std::fs::write(d.path().join("out.bin"), "AA").unwrap();
    let out = ws.run_mode("logger", Mode::Eager, "q\n");
    out.assert_fail();
    assert!(out.stderr.contains("log.txt") && out.stderr.contains("is gone since the dump"));
}

/// An app that leaves files in `/tmp` while it warms up: a small one, a larger one (in
/// the page store), a directory and a symlink; each request reads them, then changes
/// them.
const TMP_APP: &str = r#"
import hashlib, os, sys
os.makedirs("/tmp/sub/dir", exist_ok=True)
with open("/tmp/state.txt", "w") as f: f.write("fresh\n")
big = bytes((i * 7) % 251 for i in range(300000))
with open("/tmp/sub/dir/big.bin", "wb") as f: f.write(big)
os.symlink("sub/dir/big.bin", "/tmp/link")
want = hashlib.sha256(big).hexdigest()
for line in sys.stdin:
    st = open("/tmp/state.txt").read().strip()
    ok = hashlib.sha256(open("/tmp/link", "rb").read()).hexdigest() == want
    with open("/tmp/state.txt", "w") as f: f.write("touched by " + line.strip() + "\n")
    os.remove("/tmp/sub/dir/big.bin")
    print(line.strip(), st, ok, flush=True)
"#;

#[test]
fn private_tmp_is_fresh_in_every_instance() {
    let ws = Ws::new();
    let d = tempdir("ws-tmp-");
    let app = write_app(d.path(), "tmp_app.py", TMP_APP);
    ws.record("tmp", &[python().as_os_str(), app.as_os_str()]);
    // Nothing of it in the host's /tmp.
    assert!(!Path::new("/tmp/sub/dir/big.bin").exists() || !Path::new("/tmp/link").exists());
    ws.each_mode("tmp", "a\n", |mode, out| {
        out.assert_ok();
        assert_eq!(out.stdout, "a fresh True\n", "{mode}:\n{}", out.describe());
    });
    // Two instances at once: what one changes the other does not see.
    let mut first = Proc::spawn(&mut ws.cmd(&["run", "--eager", "tmp"]));
    first.send("one");
    assert_eq!(first.read_line(), "one fresh True");
    let out = ws.run_mode("tmp", Mode::Lazy, "two\n");
    out.assert_ok();
    assert_eq!(out.stdout, "two fresh True\n", "{}", out.describe());
    first.close_stdin();
    assert!(first.wait().success());
    let _daemon = ws.serve("tmp");
    let out = ws.served("tmp", "s\n");
    assert_eq!(out.stdout, "s fresh True\n", "{}", out.describe());
}

#[test]
fn share_tmp_keeps_the_hosts_tmp() {
    let ws = Ws::new();
    let d = tempdir("ws-tmp-");
    let name = format!("/tmp/ws-share-tmp-{}", std::process::id());
    let app = write_app(
        d.path(),
        "share.py",
        &format!(
            "import sys\nopen({name:?}, 'w').write('x')\nfor l in sys.stdin: print(open({name:?}).read(), flush=True)\n"
        ),
    );
    let out = ws.run(
        &[
            "record".as_ref(),
            "--share-tmp".as_ref(),
            "--name".as_ref(),
            "share".as_ref(),
            "--".as_ref(),
            python().as_os_str(),
            app.as_os_str(),
        ],
        "",
    );
    out.assert_ok();
    assert_eq!(std::fs::read_to_string(&name).unwrap(), "x");
    let out = ws.run_mode("share", Mode::Eager, "q\n");
    let _ = std::fs::remove_file(&name);
    out.assert_ok();
    assert_eq!(out.stdout, "x\n");
}

/// SQLite in WAL mode maps its `-shm` file and deletes it (and the WAL) when the last
/// connection closes: without a private `/tmp` restored per instance, the first
/// restored instance to exit would leave the next one without it.
const SQLITE_APP: &str = r#"
import sqlite3, sys
db = sqlite3.connect("/tmp/app.db")
db.execute("pragma journal_mode=wal")
db.execute("create table if not exists t(x)")
db.execute("insert into t values (1)")
db.commit()
mapped = "/tmp/app.db-shm" in open("/proc/self/maps").read()
for line in sys.stdin:
    db.execute("insert into t values (2)")
    db.commit()
    n = db.execute("select count(*) from t").fetchone()[0]
    print(line.strip(), n, mapped, flush=True)
db.close()
"#;

#[test]
fn sqlite_wal_database_in_private_tmp_restores_again_and_again() {
    let ws = Ws::new();
    let d = tempdir("ws-sqlite-");
    let app = write_app(d.path(), "db.py", SQLITE_APP);
    ws.record("sqlite", &[python().as_os_str(), app.as_os_str()]);
    for mode in [
        Mode::Eager,
        Mode::Eager,
        Mode::Lazy,
        Mode::Lazy,
        Mode::LazyPrefetched,
    ] {
        let out = ws.run_mode("sqlite", mode, "q\nr\n");
        out.assert_ok();
        assert_eq!(
            out.stdout,
            "q 2 True\nr 3 True\n",
            "{mode}:\n{}",
            out.describe()
        );
    }
    let daemon = ws.serve("sqlite");
    for _ in 0..2 {
        let out = ws.served("sqlite", "q\n");
        assert_eq!(out.stdout, "q 2 True\n", "{}", out.describe());
        // The pool refills once the instance handed out has gone quiet or ended.
        daemon.wait_stderr("parked an instance of");
    }
}
