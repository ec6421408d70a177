//! The birth of processes: sandbox, init, exact pids, stdio, warm-point detection.
//!
//! * [`forksafe`]: the global allocator that lets the children of a raw `clone3`
//!   allocate although other threads of their parent may hold glibc's malloc locks.
//! * [`sandbox`]: [`spawn`] an app as a child of a tiny init (pid 1 of a fresh pid + mount
//!   namespace with its own `/proc`), optionally at an exact pid and held at a release gate
//!   until the monitor has seized it with ptrace.
//! * [`trigger`]: seccomp filters that stop the app at its warm point
//!   (`SECCOMP_RET_TRACE`), e.g. [`trigger::install_stdin_trap`].
//! * [`warmpoint`]: `--ready TRIGGER` ([`Ready`]) and the tracer-side state machine that
//!   decides, stop by stop, when the app is warm ([`WarmPointTracker`]).

pub mod forksafe;
mod init;
pub mod sandbox;
pub mod sys;
mod timens;
pub mod trigger;
pub mod warmpoint;

pub use init::{relayed_signals, RELAYED, RELAYED_RT};
pub use sandbox::{fork_with_pid, spawn, Sandbox, SandboxParts, SignalForwarder, SpawnOptions};
pub use trigger::{install_stdin_trap, install_traps, Trap, Trigger};
pub use warmpoint::{Ready, Verdict, WarmPointTracker, WarmStop};

use nix::errno::Errno;

/// Errors of the launcher.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// A system call failed in the calling process.
    #[error("{op}: {errno}")]
    Sys { op: &'static str, errno: Errno },
    /// The sandbox's init failed while setting up (reported by init itself).
    #[error("sandbox init failed at {stage}: {errno}")]
    Init { stage: &'static str, errno: Errno },
    /// init exited before it reported (status as returned by [`Sandbox::wait`]).
    #[error("sandbox init exited before reporting (exit code {0})")]
    InitDied(i32),
    /// init did not report within the handshake timeout.
    #[error("timed out waiting for the sandbox init")]
    Timeout,
    /// Invalid argument (e.g. a pid outside 2..=pid_max).
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// Unexpected content of a kernel interface file.
    #[error("cannot parse {what}: {detail}")]
    Parse { what: &'static str, detail: String },
    /// init was reaped by someone else (a `waitpid(-1)` in the caller?).
    #[error("sandbox init was reaped by someone else")]
    Lost,
    /// The seccomp filter does not fit in the fixed-size buffer.
    #[error("seccomp filter too long")]
    FilterTooLong,
}

impl LaunchError {
    pub(crate) fn sys(op: &'static str) -> Self {
        LaunchError::Sys {
            op,
            errno: Errno::last(),
        }
    }
}
