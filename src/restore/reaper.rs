//! Ending a restore that failed (or was interrupted) without hanging.
//!
//! While the monitor drives a restore it is the ptrace tracer of every task of the tree.
//! When such a task dies, it stays a zombie until its *tracer* reaps it, and a thread
//! group leader is not reapable before its other threads are: the sandbox's init, which
//! waits in the kernel (`zap_pid_ns_processes`) until every task of its namespace is
//! gone, would then wait forever, and so would the monitor waiting for init. So on any
//! failure the [`Reaper`] lists every task of the tree, kills the sandbox and reaps each
//! of those tasks (`waitpid(tid, __WALL)`; tasks that are not ours answer `ECHILD`)
//! before the sandbox itself is dropped and waited for.

use std::os::fd::{BorrowedFd, OwnedFd};

/// Kills and reaps the traced tree of a restore unless disarmed. Drop it before the
/// `Sandbox` (declare it after, or as an earlier struct field).
pub struct Reaper {
    init_pidfd: Option<OwnedFd>,
    /// The root of the tree, as seen from here.
    root: i32,
}

impl Reaper {
    pub fn new(init_pidfd: BorrowedFd<'_>, root: i32) -> Reaper {
        Reaper {
            init_pidfd: init_pidfd.try_clone_to_owned().ok(),
            root,
        }
    }

    /// One that does nothing (a placeholder for one moved elsewhere).
    pub fn disarmed() -> Reaper {
        Reaper {
            init_pidfd: None,
            root: 0,
        }
    }

    /// The restore succeeded and nothing is traced any more.
    pub fn disarm(&mut self) {
        self.init_pidfd = None;
    }
}

/// Every task (thread) of `root` and its descendants.
fn tree_tasks(root: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            out.extend(dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok()));
        }
        todo.extend(crate::sys::tasks::children(pid));
    }
    out
}

impl Drop for Reaper {
    fn drop(&mut self) {
        let Some(pidfd) = self.init_pidfd.take() else {
            return;
        };
        let tasks = tree_tasks(self.root);
        let _ = crate::sys::pidfd::pidfd_send_signal(&pidfd, libc::SIGKILL);
        // Non-leaders first: a leader is reported only once its threads are reaped.
        for &tid in tasks.iter().rev() {
            loop {
                let mut status = 0;
                // SAFETY: waitpid writes one int to `status`.
                let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
                if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                // Exited, not ours (ECHILD), or a last ptrace stop on the way to death
                // (SIGKILL ends it: wait again).
                if r < 0 || libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                    break;
                }
            }
        }
    }
}
