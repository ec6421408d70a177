//! zdtm-style fixtures (tests/fixtures/*.c), one kernel resource each: every fixture is run
//! cold (it must PASS, and FAIL after its `break` negative control), then recorded at its
//! warm point and restored with `warmstart run` in every mode ([`Mode::ALL`]: lazy while
//! learning the working set, eager, lazy with the working set prefetched), where it must
//! PASS again.

mod common;

use common::{
    assert_all_pass, fixture, tempdir, zdtm_cold_break, zdtm_cold_pass, Mode, Ws, CHECK_TWICE,
};

fn argv(bin: &std::path::Path, dir: Option<&std::path::Path>) -> Vec<std::ffi::OsString> {
    let mut v = vec![bin.as_os_str().to_owned()];
    if let Some(d) = dir {
        v.push(d.as_os_str().to_owned());
    }
    v
}

fn run_fixture(name: &str, needs_dir: bool) {
    let bin = fixture(name);

    // Cold: the fixture itself passes, and can fail.
    let d = tempdir("ws-cold-");
    zdtm_cold_pass(name, &argv(&bin, needs_dir.then(|| d.path())));
    let d = tempdir("ws-neg-");
    zdtm_cold_break(name, &argv(&bin, needs_dir.then(|| d.path())));

    // Record at the warm point, restore in every mode, check. An instance may write to
    // the fixture's files, which the next restore would rightly refuse (the snapshot's
    // files changed): each run gets them back as they were at the warm point.
    let ws = Ws::new();
    let d = tempdir("ws-rec-");
    let id = ws.record(name, &argv(&bin, needs_dir.then(|| d.path())));
    let files = SavedFiles::save(d.path());
    ws.each_mode_prepared(
        name,
        CHECK_TWICE,
        |_| files.put_back(),
        |mode, out| {
            assert_all_pass(out, 2, &format!("restored {name} ({id}), {mode}"));
        },
    );
}

/// The regular files of a directory (recursively): content and mtime.
struct SavedFiles(Vec<(std::path::PathBuf, Vec<u8>, std::time::SystemTime)>);

impl SavedFiles {
    fn save(dir: &std::path::Path) -> SavedFiles {
        let mut v = Vec::new();
        let mut todo = vec![dir.to_owned()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let ft = e.file_type().unwrap();
                if ft.is_dir() {
                    todo.push(e.path());
                } else if ft.is_file() {
                    let meta = e.metadata().unwrap();
                    v.push((
                        e.path(),
                        std::fs::read(e.path()).unwrap(),
                        meta.modified().unwrap(),
                    ));
                }
            }
        }
        SavedFiles(v)
    }

    /// Rewrites each file in place (same inode), then its mtime.
    fn put_back(&self) {
        for (path, content, mtime) in &self.0 {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            std::io::Write::write_all(&mut &f, content).unwrap();
            f.set_modified(*mtime).unwrap();
        }
    }
}

#[test]
fn heap_and_mmap() {
    run_fixture("heap", false);
}

#[test]
fn private_file_mapping_written_page() {
    run_fixture("file_private", true);
}

#[test]
fn shared_file_mapping() {
    run_fixture("file_shared", true);
}

#[test]
fn guard_page() {
    run_fixture("guard", false);
}

#[test]
fn growsdown_stack() {
    run_fixture("growsdown", false);
}

#[test]
fn signal_handlers_mask_pending() {
    run_fixture("signals", false);
}

#[test]
fn rlimits() {
    run_fixture("rlimits", false);
}

#[test]
fn cwd_and_umask() {
    run_fixture("cwd_umask", true);
}

#[test]
fn open_file_offsets_append_dup() {
    run_fixture("files", true);
}

#[test]
fn pipe_with_unread_data() {
    run_fixture("pipe", false);
}

#[test]
fn vdso_clock_and_getpid() {
    run_fixture("vdso_pid", false);
}

#[test]
fn dev_null_and_urandom() {
    run_fixture("devs", false);
}

/// The restored process's /proc/self/maps matches the one it wrote just before the snapshot.
#[test]
fn maps_equal_after_restore() {
    let bin = fixture("maps");
    let ws = Ws::new();
    let d = tempdir("ws-maps-");
    let before_path = d.path().join("maps.before");
    ws.record(
        "maps",
        &[
            bin.as_os_str(),
            before_path.as_os_str(),
            d.path().as_os_str(),
        ],
    );
    let before = std::fs::read_to_string(&before_path)
        .expect("the fixture wrote its maps before the warm point");
    ws.each_mode("maps", "maps\n", |mode, out| {
        assert!(
            out.code() == 0 && out.stdout.ends_with("END\n"),
            "restored maps fixture, {mode}:\n{}",
            out.describe()
        );
        let after = out.stdout.strip_suffix("END\n").unwrap();
        assert_same_maps(&before, after, mode);
    });
}

fn assert_same_maps(before: &str, after: &str, mode: Mode) {
    let norm = |s: &str| -> Vec<String> {
        s.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    };
    let (b, a) = (norm(before), norm(after));
    let mut diffs = Vec::new();
    for l in &b {
        if !a.contains(l) {
            diffs.push(format!("- {l}"));
        }
    }
    for l in &a {
        if !b.contains(l) {
            diffs.push(format!("+ {l}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "/proc/self/maps differs after restore, {mode} (- before snapshot, + restored):\n{}\n\n--- before ---\n{before}\n--- after ---\n{after}",
        diffs.join("\n")
    );
}

#[test]
fn credentials_of_a_non_root_process_with_capabilities() {
    run_fixture("creds", false);
}

#[test]
fn capabilities_a_root_process_dropped_stay_dropped() {
    run_fixture("creds_root", false);
}
