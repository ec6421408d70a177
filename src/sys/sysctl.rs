//! Sysctls (`/proc/sys`): reading and writing one, and listing those of a network
//! namespace.
//!
//! The files under `/proc/sys/net` show the network namespace of the *thread* that opens
//! them, so a thread that joined another namespace ([`crate::sys::ns::run_in`]) reads and
//! writes that namespace's settings.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// `/proc/sys/NAME`, `NAME` as a path (`net/ipv4/tcp_syncookies`).
fn path(name: &str) -> String {
    format!("/proc/sys/{name}")
}

/// `net/ipv4/tcp_syncookies` as sysctl(8) writes it: `net.ipv4.tcp_syncookies`.
pub fn dotted(name: &str) -> String {
    name.replace('/', ".")
}

/// The value of sysctl `name`, without its trailing newline.
pub fn read(name: &str) -> io::Result<String> {
    let v = std::fs::read_to_string(path(name))?;
    Ok(v.strip_suffix('\n').unwrap_or(&v).to_owned())
}

/// Writes `value` to sysctl `name`.
pub fn write(name: &str, value: &str) -> io::Result<()> {
    std::fs::write(path(name), value)
}

/// Every sysctl under `/proc/sys/net` that can be both read and written, with its value,
/// as the calling thread's network namespace has them. Files that refuse to be read
/// (`stable_secret` before one is set, write-only ones) are left out.
pub fn net_settings() -> io::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    walk(Path::new("/proc/sys/net"), "net", &mut out)?;
    out.sort_by(|a, b| write_order(&a.0).cmp(&write_order(&b.0)));
    Ok(out)
}

fn walk(dir: &Path, name: &str, out: &mut Vec<(String, String)>) -> io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let Some(leaf) = e.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let child = format!("{name}/{leaf}");
        let ty = e.file_type()?;
        if ty.is_dir() {
            walk(&e.path(), &child, out)?;
        } else if ty.is_file() && e.metadata()?.permissions().mode() & 0o600 == 0o600 {
            if let Ok(v) = read(&child) {
                out.push((child, v));
            }
        }
    }
    Ok(())
}

/// The order a restore writes settings in: a write to `conf/all/X` (and on some kernels
/// `conf/default/X`) also changes `X` of every interface, so those come before the
/// interfaces' own (`conf/lo/X`), which then get their recorded value.
fn write_order(name: &str) -> (u8, &str) {
    let rank = if name.contains("/all/") {
        0
    } else if name.contains("/default/") {
        1
    } else if name.contains("/conf/") || name.contains("/neigh/") {
        2
    } else {
        0
    };
    (rank, name)
}

/// The settings of `now` that differ from (or are missing in) `fresh`: what an app
/// changed in its network namespace, given what a new namespace starts with.
pub fn changed(now: &[(String, String)], fresh: &[(String, String)]) -> Vec<(String, String)> {
    let fresh: std::collections::HashMap<&str, &str> = fresh
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    now.iter()
        .filter(|(n, v)| fresh.get(n.as_str()) != Some(&v.as_str()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keeps_differences_and_new_ones_in_order() {
        let s = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let fresh = s(&[("net/a", "1"), ("net/b", "2")]);
        let now = s(&[("net/a", "1"), ("net/b", "3"), ("net/c", "x\ty")]);
        assert_eq!(
            changed(&now, &fresh),
            s(&[("net/b", "3"), ("net/c", "x\ty")])
        );
        assert!(changed(&fresh, &fresh).is_empty());
        assert_eq!(
            dotted("net/ipv4/conf/lo/forwarding"),
            "net.ipv4.conf.lo.forwarding"
        );
    }

    #[test]
    fn interfaces_come_after_all_and_default() {
        let mut v = [
            "net/ipv4/conf/lo/forwarding",
            "net/ipv4/conf/default/forwarding",
            "net/ipv4/conf/all/forwarding",
            "net/ipv4/tcp_syncookies",
        ];
        v.sort_by(|a, b| write_order(a).cmp(&write_order(b)));
        assert_eq!(
            v,
            [
                "net/ipv4/conf/all/forwarding",
                "net/ipv4/tcp_syncookies",
                "net/ipv4/conf/default/forwarding",
                "net/ipv4/conf/lo/forwarding",
            ]
        );
    }

    /// In a new network namespace of this thread's: a changed setting is found, and
    /// nothing else differs from another new namespace.
    #[test]
    fn a_changed_setting_of_a_new_namespace_is_found() {
        if !nix::unistd::Uid::effective().is_root() {
            return;
        }
        let fresh =
            crate::sys::ns::run_unshared(libc::CLONE_NEWNET, || Ok(net_settings()?)).unwrap();
        assert!(fresh.iter().any(|(n, _)| n == "net/ipv4/tcp_syncookies"));
        let now = crate::sys::ns::run_unshared(libc::CLONE_NEWNET, || {
            let old = read("net/ipv4/tcp_syncookies")?;
            let new = if old == "1" { "2" } else { "1" };
            write("net/ipv4/tcp_syncookies", new)?;
            Ok(net_settings()?)
        })
        .unwrap();
        let c = changed(&now, &fresh);
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0].0, "net/ipv4/tcp_syncookies");
    }
}
