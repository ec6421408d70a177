//! Running instances, for `warmstart ps`: each monitor registers the instance it runs in
//! a small file under the runtime directory and removes it when the instance ends (a file
//! whose monitor is gone is stale and dropped when listed).

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Instance {
    /// The `warmstart run`/`restore` process that owns the instance.
    pub monitor: i32,
    /// The restored app's pid, as seen from the host.
    pub pid: i32,
    pub snapshot: String,
    pub names: Vec<String>,
    pub command: Vec<String>,
    pub started_unix: u64,
    /// The `warmstart run` a serve daemon started it for.
    #[serde(default)]
    pub client: Option<i32>,
    /// Not an instance: a serve daemon's template of the snapshot, which instances are
    /// forked from (`crate::restore::template`).
    #[serde(default)]
    pub template: bool,
    /// The instance's own cgroups (`run --memory/--cpus/--pids`), one per hierarchy.
    #[serde(default)]
    pub cgroups: Vec<std::path::PathBuf>,
}

/// Seconds since the epoch, for `started_unix`.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("warmstart/instances"),
        None => PathBuf::from("/run/warmstart/instances"),
    }
}

/// Removes the registration when dropped.
pub struct Registration(PathBuf);

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub fn register(instance: &Instance) -> Result<Registration> {
    use std::os::unix::fs::DirBuilderExt;
    let d = dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&d)
        .with_context(|| format!("creating {}", d.display()))?;
    // A serve daemon monitors many instances: one file per (monitor, instance).
    let key = format!("{}-{}", instance.monitor, instance.pid);
    let path = d.join(&key);
    let tmp = d.join(format!(".{key}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(instance)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(Registration(path))
}

fn alive(pid: i32) -> bool {
    matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Ok(()) | Err(nix::errno::Errno::EPERM)
    )
}

pub fn list() -> Result<Vec<Instance>> {
    let d = dir();
    let entries = match std::fs::read_dir(&d) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            // SAFETY: geteuid has no preconditions and cannot fail.
            let uid = unsafe { libc::geteuid() };
            anyhow::bail!(
                "cannot list running instances: their registry {} belongs to another user \
                 (instances restored by root are listed there) and uid {uid} may not read \
                 it; run `warmstart ps` as root, or as the user who started the instances",
                d.display()
            )
        }
        Err(e) => return Err(e).with_context(|| format!("listing {}", d.display())),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'))
        {
            continue;
        }
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        match serde_json::from_slice::<Instance>(&bytes) {
            Ok(i) if alive(i.monitor) && alive(i.pid) => out.push(i),
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    out.sort_by_key(|i| (i.started_unix, i.monitor));
    Ok(out)
}
