//! Whether a dumped tree has a shape a restore can rebuild by forking: checked by the dump
//! (refusing before anything is stored) and by the restore (a snapshot from elsewhere).

use anyhow::{bail, Result};
use warmstart_snapshots::model::Manifest;

/// What the tree needs that a restore cannot build: every process's parent is in the
/// snapshot, the root is alive, and each session and process group can be recreated by
/// forking (a session is inherited or started with `setsid`; a group has its leader in
/// the snapshot, or is the root's). A group or session whose leader is gone would need a
/// helper process (as CRIU does), which warmstart does not do yet.
pub fn tree(m: &Manifest) -> Result<()> {
    if m.trigger == crate::dump::predump::TRIGGER {
        bail!(
            "this snapshot is a pre-dump (memory only, taken while the app ran): it cannot \
             be restored; restore the final dump made with `dump --prev` of it"
        );
    }
    let Some(root) = m.processes.first() else {
        bail!("the snapshot holds no process");
    };
    if root.zombie.is_some() {
        bail!(
            "process {} ({}), the root of the snapshot, is a zombie: there is nothing to restore",
            root.pid,
            root.comm
        );
    }
    let by_pid = |pid: i32| m.processes.iter().find(|q| q.pid == pid);
    for p in &m.processes[1..] {
        let Some(parent) = by_pid(p.ppid) else {
            bail!(
                "process {} ({}) has parent {}, which is not in the snapshot (corrupt manifest?)",
                p.pid,
                p.comm,
                p.ppid
            );
        };
        if p.sid != p.pid && p.sid != parent.sid {
            bail!(
                "process {} ({}) is in session {}, its parent {} in session {}: a session \
                 entered after fork cannot be recreated (that needs a helper process, which \
                 warmstart does not do yet); checkpoint the tree before it calls setsid",
                p.pid,
                p.comm,
                p.sid,
                parent.pid,
                parent.sid
            );
        }
        if p.pgid != p.pid && by_pid(p.pgid).is_none() && p.pgid != root.pgid {
            bail!(
                "process {} ({}) is in process group {}, whose leader is not part of the tree \
                 (it exited, or lives outside the tree): recreating such a group needs a \
                 helper process, which warmstart does not do yet",
                p.pid,
                p.comm,
                p.pgid
            );
        }
        if let Some(leader) = by_pid(p.pgid) {
            if leader.sid != p.sid {
                bail!(
                    "process {} ({}) is in process group {} of another session ({} vs {}): \
                     corrupt manifest?",
                    p.pid,
                    p.comm,
                    p.pgid,
                    p.sid,
                    leader.sid
                );
            }
        }
    }
    crate::fds::pty::check(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use warmstart_snapshots::model::Process;

    fn proc(pid: i32, ppid: i32, pgid: i32, sid: i32) -> Process {
        Process {
            pid,
            ppid,
            pgid,
            sid,
            comm: format!("p{pid}"),
            ..Default::default()
        }
    }

    fn manifest(processes: Vec<Process>) -> Manifest {
        Manifest {
            processes,
            ..Default::default()
        }
    }

    #[test]
    fn trees_that_forking_can_rebuild() {
        // The root's session and group are its caller's (a shell job).
        let m = manifest(vec![
            proc(10, 1, 9, 5),
            proc(11, 10, 9, 5),   // inherits both
            proc(12, 10, 12, 5),  // its own group
            proc(13, 10, 12, 5),  // joins a sibling's group
            proc(14, 10, 14, 14), // its own session
            proc(15, 14, 15, 14), // a group in that session
            proc(16, 14, 15, 14), // joins it
        ]);
        tree(&m).unwrap();
    }

    #[test]
    fn session_entered_after_fork_is_refused() {
        let m = manifest(vec![
            proc(10, 1, 10, 10),
            proc(11, 10, 11, 11),
            // 12 is 10's child in 11's session: no fork gives that (it needs a helper).
            proc(12, 10, 11, 11),
        ]);
        let e = tree(&m).unwrap_err().to_string();
        assert!(e.contains("process 12 (p12) is in session 11"), "{e}");
    }

    #[test]
    fn group_without_its_leader_is_refused() {
        let m = manifest(vec![proc(10, 1, 10, 10), proc(11, 10, 42, 10)]);
        let e = tree(&m).unwrap_err().to_string();
        assert!(
            e.contains(
                "process 11 (p11) is in process group 42, whose leader is not part of the tree"
            ),
            "{e}"
        );
    }

    #[test]
    fn zombie_root_and_orphan_are_refused() {
        let mut z = proc(10, 1, 10, 10);
        z.zombie = Some(0);
        assert!(tree(&manifest(vec![z]))
            .unwrap_err()
            .to_string()
            .contains("is a zombie"));
        let m = manifest(vec![proc(10, 1, 10, 10), proc(11, 99, 10, 10)]);
        assert!(tree(&m).unwrap_err().to_string().contains("has parent 99"));
    }
}
