//! Lazy restore (the default of `warmstart run`): memory served on demand by the page
//! server through userfaultfd, the learned working set, and what happens when the page
//! server cannot do its job.
//!
//! The zdtm-style fixtures here change lazily served memory right after the restore,
//! before reading it (`MADV_DONTNEED`, `mremap`, `fork`), or are large and sparse, or have
//! threads frozen in several blocking calls; each runs cold (PASS, and FAIL after `break`)
//! and restored in every mode.

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    assert_all_pass, fixture, pidfd_open, tempdir, wait_pidfd_exit, KillGuard, Mode, Out, Proc, Ws,
};

/// Cold (pass, and fail after `break`), then recorded and restored in every mode of
/// [`Mode::ALL`], with `--no-prefetch` and served: two PASS lines each time, and the same
/// `/proc` state as at the warm point (`common::zdtm_every_mode_of`).
fn zdtm_every_mode(name: &str, argv: &[OsString]) {
    common::zdtm_every_mode_of(name, Path::new(&argv[0]), false, &[Mode::LazyNoPrefetch]);
}

fn fixture_argv(name: &str) -> Vec<OsString> {
    vec![fixture(name).into_os_string()]
}

#[test]
fn madvise_dontneed_half_before_reading() {
    zdtm_every_mode("madvise_dontneed", &fixture_argv("madvise_dontneed"));
}

#[test]
fn mremap_before_touching() {
    zdtm_every_mode("mremap_lazy", &fixture_argv("mremap_lazy"));
}

#[test]
fn fork_right_after_restore() {
    zdtm_every_mode("fork_after_restore", &fixture_argv("fork_after_restore"));
}

#[test]
fn threads_in_read_nanosleep_cond_wait() {
    zdtm_every_mode("threads", &fixture_argv("threads"));
}

#[test]
fn big_sparse_noreserve_1gib() {
    zdtm_every_mode("big_sparse", &fixture_argv("big_sparse"));
}

/// `tests/fixtures/pattern.c` with a `mib` MiB pattern area.
fn pattern_argv(mib: u32) -> Vec<OsString> {
    vec![fixture("pattern").into_os_string(), mib.to_string().into()]
}

// ---------------------------------------------------------------------------------------
// Working set

/// The `page server:` line of `--display-stats`.
fn page_server_line(out: &Out) -> &str {
    out.stderr
        .lines()
        .find(|l| l.starts_with("page server:"))
        .unwrap_or_else(|| panic!("no `page server:` line:\n{}", out.describe()))
}

/// The number just before `what` on the `page server:` line.
fn figure_before(out: &Out, what: &str) -> u64 {
    let line = page_server_line(out);
    let at = line
        .find(what)
        .unwrap_or_else(|| panic!("no {what:?} on the page server line: {line}"));
    line[..at]
        .split(|c: char| !c.is_ascii_digit())
        .rfind(|w| !w.is_empty())
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no number before {what:?} in: {line}"))
}

/// The number just after `what` on the `page server:` line.
fn figure_after(out: &Out, what: &str) -> u64 {
    let line = page_server_line(out);
    let (_, rest) = line
        .split_once(what)
        .unwrap_or_else(|| panic!("no {what:?} on the page server line: {line}"));
    rest.split(|c: char| !c.is_ascii_digit())
        .find(|w| !w.is_empty())
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no number after {what:?} in: {line}"))
}

#[test]
fn working_set_learned_then_prefetched() {
    let ws = Ws::new();
    let id = ws.record("pattern", &pattern_argv(64));
    assert_eq!(ws.working_set_pages("pattern"), None, "nothing learned yet");
    let inspect = ws.run(&["inspect", "pattern"], "");
    inspect.assert_ok();
    assert!(
        inspect.stdout.contains("working set: not learned yet"),
        "{}",
        inspect.describe()
    );

    // `--eager` neither serves lazily nor learns.
    let out = ws.run(&["run", "--eager", "--display-stats", "pattern"], "check\n");
    assert_all_pass(&out, 1, &format!("eager run of {id}"));
    assert!(
        !out.stderr.contains("page server:"),
        "an eager run has no page server:\n{}",
        out.describe()
    );
    assert_eq!(
        ws.working_set_pages("pattern"),
        None,
        "an eager run learned"
    );

    // `--no-prefetch` neither prefetches nor learns.
    let out = ws.run(
        &["run", "--no-prefetch", "--display-stats", "pattern"],
        "check\n",
    );
    assert_all_pass(&out, 1, &format!("--no-prefetch run of {id}"));
    assert_eq!(figure_before(&out, "pages prefetched"), 0);
    assert_eq!(
        ws.working_set_pages("pattern"),
        None,
        "--no-prefetch learned"
    );

    // The first lazy run learns the pages faulted in until the first answer.
    let out = ws.run(&["run", "--display-stats", "pattern"], "check\n");
    assert_all_pass(&out, 1, &format!("first lazy run of {id}"));
    assert_eq!(figure_before(&out, "pages prefetched"), 0, "{}", out.stderr);
    let learned = figure_after(&out, "working set learned:");
    assert!(learned > 0, "nothing learned:\n{}", out.describe());
    let stored = ws.working_set_pages("pattern");
    assert_eq!(
        stored,
        Some(learned),
        "inspect --json should show the learned working set:\n{}",
        out.describe()
    );
    let inspect = ws.run(&["inspect", "pattern"], "");
    assert!(
        inspect
            .stdout
            .contains(&format!("working set: {learned} pages")),
        "inspect should show the working set size:\n{}",
        inspect.describe()
    );

    // The second lazy run prefetches it, and learns nothing new.
    let out = ws.run(&["run", "--display-stats", "pattern"], "check\ncheck\n");
    assert_all_pass(&out, 2, &format!("second lazy run of {id}"));
    let prefetched = figure_before(&out, "pages prefetched");
    assert!(
        prefetched > 0,
        "the second lazy run should prefetch the learned working set:\n{}",
        out.describe()
    );
    assert_eq!(prefetched, learned, "{}", out.stderr);
    assert_eq!(ws.working_set_pages("pattern"), Some(learned));
    assert!(
        out.stderr.contains("working set: kept from an earlier run")
            && !out.stderr.contains("learned: 0"),
        "a run that does not learn should say the working set was kept:\n{}",
        out.describe()
    );
}

// ---------------------------------------------------------------------------------------
// Failures

/// SIGKILL of the `warmstart run` monitor must take the instance with it: in lazy mode
/// the page server dies with the monitor, and an instance left running would read zeros
/// where its memory was.
fn killing_the_monitor_kills_the_instance(mode: Mode) {
    let ws = Ws::new();
    ws.record("pattern", &pattern_argv(256));
    let rt = tempdir("ws-rt-");
    let mut args: Vec<&str> = vec!["run"];
    args.extend_from_slice(mode.flags());
    args.push("pattern");
    let mut monitor = Proc::spawn(ws.cmd(&args).env("XDG_RUNTIME_DIR", rt.path()));
    monitor.send("check");
    assert_eq!(monitor.read_line(), "PASS", "{mode}");
    monitor.send("sleep");
    assert_eq!(monitor.read_line(), "SLEEPING", "{mode}");

    let list = ws.ps_json(rt.path());
    let me = list
        .iter()
        .find(|i| i["monitor"].as_i64() == Some(monitor.pid() as i64))
        .unwrap_or_else(|| {
            panic!(
                "`ps --json` does not list the instance of monitor {}: {list:?}",
                monitor.pid()
            )
        });
    let pid = me["pid"].as_i64().expect("ps --json gives the pid") as i32;
    assert_ne!(pid, monitor.pid());
    let pidfd = pidfd_open(pid).unwrap_or_else(|e| panic!("instance {pid} is gone already: {e}"));
    // Whatever happens below, nothing stays behind.
    let mut guard = KillGuard::new();
    guard.add(pid);

    // SAFETY: kill takes integer arguments only; `monitor` is our unreaped child, so its
    // pid is still its own.
    unsafe { libc::kill(monitor.pid(), libc::SIGKILL) };
    let st = monitor.wait();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(libc::SIGKILL)
    );
    let gone = wait_pidfd_exit(&pidfd, Duration::from_secs(30));
    let stack = std::fs::read_to_string(format!("/proc/{pid}/stack")).unwrap_or_default();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    assert!(
        gone,
        "{mode}: instance {pid} is still alive 30 s after its monitor was SIGKILLed\n\
         --- /proc/{pid}/status ---\n{status}\n--- /proc/{pid}/stack ---\n{stack}"
    );
    assert!(
        ws.ps_json(rt.path()).is_empty(),
        "{mode}: `ps` still lists an instance"
    );
}

#[test]
fn killing_the_monitor_kills_a_lazy_instance() {
    killing_the_monitor_kills_the_instance(Mode::Lazy);
}

#[test]
fn killing_the_monitor_kills_an_eager_instance() {
    killing_the_monitor_kills_the_instance(Mode::Eager);
}

/// The monitor is killed while the app is still faulting its memory in (no prefetch, a
/// 256 MiB area being checked): the instance must die, never go on reading zeros where the
/// page server would have put its memory (which its check would report as FAIL).
#[test]
fn killing_the_monitor_while_the_app_faults() {
    kill_the_monitor_mid_fault("pattern", &pattern_argv(256));
}

/// The same with the faults in a child the app forks right after the restore (its
/// userfaultfd comes from a fork event: the keeper must hold it too).
#[test]
fn killing_the_monitor_while_a_forked_child_faults() {
    kill_the_monitor_mid_fault("fork_after_restore", &fixture_argv("fork_after_restore"));
}

fn kill_the_monitor_mid_fault(name: &str, argv: &[OsString]) {
    let ws = Ws::new();
    ws.record(name, argv);
    let rt = tempdir("ws-rt-");
    let mut monitor = Proc::spawn(
        ws.cmd(&["run", "--no-prefetch", "--display-stats", name])
            .env("XDG_RUNTIME_DIR", rt.path()),
    );
    monitor.wait_stderr("restore of");
    // The monitor registers the instance right after printing its restore stats.
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    let pid = loop {
        let list = ws.ps_json(rt.path());
        if let Some(i) = list
            .iter()
            .find(|i| i["monitor"].as_i64() == Some(monitor.pid() as i64))
        {
            break i["pid"].as_i64().unwrap() as i32;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the instance never showed up in `ps --json`"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let pidfd = pidfd_open(pid).unwrap_or_else(|e| panic!("instance {pid} is gone already: {e}"));
    let mut guard = KillGuard::new();
    guard.add(pid);
    monitor.send("check\ncheck\ncheck\ncheck");
    // SAFETY: kill takes integer arguments only; `monitor` is our unreaped child, so its
    // pid is still its own.
    unsafe { libc::kill(monitor.pid(), libc::SIGKILL) };
    monitor.wait();
    let gone = wait_pidfd_exit(&pidfd, Duration::from_secs(30));
    let stack = std::fs::read_to_string(format!("/proc/{pid}/stack")).unwrap_or_default();
    assert!(
        gone,
        "{name}: instance {pid} is still alive 30 s after its monitor was SIGKILLed \
         mid-fault\n--- /proc/{pid}/stack ---\n{stack}"
    );
    // What the instance printed before it died (it writes to our pipe directly).
    let mut lines = Vec::new();
    while let Ok(l) = monitor.out.recv_timeout(Duration::from_secs(10)) {
        lines.push(l);
    }
    assert!(
        lines.iter().all(|l| l == "PASS"),
        "{name}: the instance ran on without its page server: {lines:?}"
    );
}

/// A corrupt page met by background streaming (the app never touches the area: it
/// sleeps) kills the instance too: the run ends non-zero with the page server's error.
#[test]
fn corrupt_page_met_while_streaming_kills_a_sleeping_instance() {
    let ws = Ws::new();
    let id = ws.record("pattern", &pattern_argv(48));
    corrupt_area(&ws, 48);
    // Without the damage the app would sleep until the deadline of `run_mode`.
    let out = ws.run_mode("pattern", Mode::LazyNoPrefetch, "sleep\n");
    assert!(
        out.stdout.is_empty() || out.stdout == "SLEEPING\n",
        "{}",
        out.describe()
    );
    assert!(
        !out.success() && out.stderr.contains("page server") && out.stderr.contains(&id),
        "streaming a corrupt page should kill the instance and say so:\n{}",
        out.describe()
    );
}

/// XORs one byte every `step` bytes of `range` in `path`.
fn flip_bytes(path: &Path, range: std::ops::Range<u64>, step: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    let mut at = range.start;
    while at < range.end {
        let mut b = [0u8];
        f.seek(SeekFrom::Start(at)).unwrap();
        f.read_exact(&mut b).unwrap();
        b[0] ^= 0x5a;
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&b).unwrap();
        at += step;
    }
}

fn packs(ws: &Ws) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(ws.store().join("packs"))
        .expect("STORE/packs")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "pack"))
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no pack in {}", ws.store().display());
    v
}

/// A run over corrupt pages must die, saying why; it must never print a PASS computed
/// from wrong bytes, and a FAIL line would mean wrong bytes were served to the app.
fn assert_killed_clearly(out: &Out, id: &str, ctx: &str, want_page_server: bool) {
    assert!(
        !out.stdout.contains("FAIL"),
        "{ctx}: WRONG BYTES SERVED: the app ran on corrupt memory and noticed it itself:\n{}",
        out.describe()
    );
    assert!(
        !out.stdout.contains("PASS"),
        "{ctx}: the app passed its check over corrupt pages (or pages not served from the \
         store):\n{}",
        out.describe()
    );
    assert!(
        !out.success(),
        "{ctx}: should exit non-zero:\n{}",
        out.describe()
    );
    assert!(
        out.stderr.contains(id) || out.stderr.contains("page server"),
        "{ctx}: stderr should name the snapshot ({id}) or the page server:\n{}",
        out.describe()
    );
    if want_page_server {
        assert!(
            out.stderr.contains("page server") && out.stderr.contains(id),
            "{ctx}: the page server's error should say so and name the snapshot ({id}):\n{}",
            out.describe()
        );
    }
}

/// Every pack past its 16-byte header has a flipped byte every 512 bytes.
#[test]
fn corrupt_packs_kill_a_lazy_instance() {
    let ws = Ws::new();
    let id = ws.record("pattern", &pattern_argv(64));
    for p in packs(&ws) {
        let len = std::fs::metadata(&p).unwrap().len();
        flip_bytes(&p, 16 + 100..len, 512);
    }
    let out = ws.run_mode("pattern", Mode::Lazy, "check\ncheck\n");
    assert_killed_clearly(&out, &id, "lazy run over corrupt packs", false);
}

/// Flips one byte in every stored block of the `mib` MiB area of the `pattern` snapshot
/// (found through the manifest and the page table), except a few at its ends so no block
/// shared with a neighbouring VMA's pages is touched. Returns how many blocks.
fn corrupt_area(ws: &Ws, mib: u64) -> usize {
    let j = ws.inspect_json("pattern");
    let full_id = j["id"].as_str().expect("inspect --json id").to_owned();
    let vmas = j["manifest"]["processes"][0]["vmas"]
        .as_array()
        .expect("manifest.processes[0].vmas");
    // The area, or the VMA it merged into when the kernel placed it next to another
    // anonymous mapping of the same kind: the smallest VMA of at least that size.
    let len = |v: &serde_json::Value| v["end"].as_u64().unwrap() - v["start"].as_u64().unwrap();
    let Some(area) = vmas
        .iter()
        .filter(|v| len(v) >= mib << 20)
        .min_by_key(|v| len(v))
    else {
        panic!("expected a VMA of at least {mib} MiB in the manifest: {vmas:?}");
    };
    // Page-table records of the area (runs of `Data { first }`), minus a few at each end
    // so no block is shared with a neighbouring VMA's pages.
    let mut records = Vec::new();
    for run in area["pages"].as_array().unwrap() {
        if let Some(first) = run["content"]["Data"]["first"].as_u64() {
            records.extend(first..first + run["count"].as_u64().unwrap());
        }
    }
    assert!(
        records.len() as u64 >= (mib << 20) / 4096 - 16,
        "the area should be stored as data: {area}"
    );
    let records = &records[8..records.len() - 8];
    let table = std::fs::read(ws.store().join(format!("snapshots/{full_id}.pages")))
        .expect("the page table");
    let mut blocks = std::collections::BTreeSet::new();
    for &r in records {
        let rec = &table[96 + r as usize * 56..][..56];
        let offset = u64::from_le_bytes(rec[32..40].try_into().unwrap());
        let pack = u32::from_le_bytes(rec[40..44].try_into().unwrap());
        let len = u32::from_le_bytes(rec[44..48].try_into().unwrap()) as u64;
        blocks.insert((pack, offset, len));
    }
    for &(pack, offset, len) in &blocks {
        let path = ws.store().join(format!("packs/pack-{pack:08}.pack"));
        flip_bytes(&path, offset + len / 2..offset + len / 2 + 1, 1);
    }

    blocks.len()
}

/// Only the blocks of the pattern area's pages are corrupted (found through the manifest
/// and the page table): everything restored eagerly is intact, so the damage is met on
/// the lazy path, by the page server, once the app is running.
#[test]
fn corrupt_lazy_page_kills_the_instance_with_a_clear_message() {
    const MIB: u64 = 48;
    let ws = Ws::new();
    let id = ws.record("pattern", &pattern_argv(MIB as u32));
    let blocks = corrupt_area(&ws, MIB);

    let mode = Mode::Lazy;
    let out = ws.run_mode("pattern", mode, "check\ncheck\n");
    assert_killed_clearly(
        &out,
        &id,
        &format!("{mode} run with {blocks} corrupt blocks"),
        true,
    );
    // Eager: the damage is found before the app resumes.
    let out = ws.run_mode("pattern", Mode::Eager, "check\ncheck\n");
    assert_killed_clearly(&out, &id, "eager run over a corrupt area", false);
    assert!(
        out.stderr.contains(&id),
        "the eager error should name the snapshot:\n{}",
        out.describe()
    );
}

/// The same with `--no-prefetch`, where the page server streams from the start: the
/// damage may be met while the restore is still finishing (before the app resumes); the
/// page server's error must still be the one reported.
#[test]
fn corrupt_lazy_page_no_prefetch_reports_the_page_server_error() {
    const MIB: u64 = 48;
    let ws = Ws::new();
    let id = ws.record("pattern", &pattern_argv(MIB as u32));
    let blocks = corrupt_area(&ws, MIB);
    let mode = Mode::LazyNoPrefetch;
    let out = ws.run_mode("pattern", mode, "check\ncheck\n");
    assert_killed_clearly(
        &out,
        &id,
        &format!("{mode} run with {blocks} corrupt blocks"),
        true,
    );
}

/// CRIU-style `restore` is eager unless `--lazy`; both restore correctly.
#[test]
fn restore_eager_and_lazy() {
    let ws = Ws::new();
    let id = ws.record("pattern", &pattern_argv(32));
    let out = ws.run(&["restore", "--display-stats", "pattern"], "check\n");
    assert_all_pass(&out, 1, &format!("restore of {id}"));
    assert!(
        !out.stderr.contains("page server:"),
        "`restore` without --lazy should be eager:\n{}",
        out.describe()
    );
    let out = ws.run(
        &["restore", "--lazy", "--display-stats", "pattern"],
        "check\n",
    );
    assert_all_pass(&out, 1, &format!("restore --lazy of {id}"));
    assert!(
        out.stderr.contains("page server:"),
        "`restore --lazy` should have a page server:\n{}",
        out.describe()
    );
}
