//! Instance-private directories: scratch places an app keys by its own pid, which every
//! instance of a snapshot shares (all run at the same pid). The JVM's `hsperfdata`
//! directory is the case in point: it maps `/tmp/hsperfdata_USER/PID` shared and deletes
//! it at exit, so instances would write into one file and the first to exit would pull
//! it from under the others (and from under the next restore).
//!
//! Each sandbox (record and restore) mounts a fresh tmpfs on these directories; a dump
//! stores the files there that the app maps or holds open, and a restore recreates them
//! in the new instance's tmpfs before mapping them.
//!
//! `record` also gives the app a private `/tmp` ([`mount_private_tmp`]; `--share-tmp`
//! keeps the host's): all of it goes into the snapshot ([`crate::dump::tmp`]) and every
//! instance gets a filled copy ([`crate::restore::tmp`]). The directories above are
//! mounts of their own inside it, handled as before.

use std::ffi::CString;

/// The directories made private, for the user warmstart runs as (looked up once: a
/// `serve` daemon checks them at every hand-out).
pub fn dirs() -> Vec<String> {
    static FIRST: std::sync::OnceLock<(u32, Vec<String>)> = std::sync::OnceLock::new();
    let uid = nix::unistd::geteuid().as_raw();
    match FIRST.get_or_init(|| (uid, dirs_for(uid))) {
        (u, dirs) if *u == uid => dirs.clone(),
        _ => dirs_for(uid),
    }
}

fn dirs_for(uid: u32) -> Vec<String> {
    let name = user_name(uid).unwrap_or_else(|| uid.to_string());
    vec![format!("/tmp/hsperfdata_{name}")]
}

fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        f.next()?;
        (f.next()?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
    })
}

/// Whether `path` lies in one of `dirs`.
pub fn is_private(dirs: &[String], path: &str) -> bool {
    dirs.iter().any(|d| {
        path.strip_prefix(d.as_str())
            .is_some_and(|r| r.starts_with('/'))
    })
}

/// In the sandboxed child of `record` (own mount namespace): a fresh tmpfs on `/tmp`,
/// the app's private `/tmp`. No allocation (it runs right after clone3).
pub fn mount_private_tmp() -> bool {
    // SAFETY: NUL-terminated static strings; mount reads nothing else.
    unsafe {
        libc::mkdir(c"/tmp".as_ptr(), 0o1777);
        libc::mount(
            c"tmpfs".as_ptr(),
            c"/tmp".as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            c"mode=1777".as_ptr().cast(),
        ) == 0
    }
}

/// Mount points prepared before a sandbox starts: C strings, so that mounting needs no
/// allocation in the child (it may run right after clone3).
pub struct Mounts(Vec<CString>);

impl Mounts {
    pub fn prepare() -> Mounts {
        Mounts(
            dirs()
                .into_iter()
                .filter_map(|d| CString::new(d).ok())
                .collect(),
        )
    }

    /// In the sandboxed child (own mount namespace): a fresh tmpfs on each directory.
    /// Best effort: a failure leaves the shared directory, as without warmstart.
    pub fn mount(&self) {
        for d in &self.0 {
            // Results are ignored on purpose (best effort, see above).
            // SAFETY: every path is a NUL-terminated C string (literals, or a CString made
            // by prepare() and owned by self), valid for each call; mkdir and mount only
            // read them and allocate nothing, as the child right after clone3 requires.
            unsafe {
                libc::mkdir(c"/tmp".as_ptr(), 0o1777);
                libc::mkdir(d.as_ptr(), 0o755);
                libc::mount(
                    c"tmpfs".as_ptr(),
                    d.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    c"mode=0755".as_ptr().cast(),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn private_paths() {
        let d = vec!["/tmp/hsperfdata_root".to_owned()];
        assert!(super::is_private(&d, "/tmp/hsperfdata_root/2"));
        assert!(!super::is_private(&d, "/tmp/hsperfdata_rootx/2"));
        assert!(!super::is_private(&d, "/tmp/other"));
    }
}
