//! Decoding the status area and rendering failures.

use crate::layout::{RawStatus, STATE_DONE, STATE_FAILED, STATE_RUNNING};
use core::fmt;
use core::mem::{offset_of, size_of};

/// Decoded status area of a program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// No terminal step reached yet (or continued after a `Trap`).
    Running,
    /// A `Trap` or `Exit` step was reached.
    Done,
    /// Step `step` failed with `errno`. `errno == 0`: the program ran past
    /// its last step (`step == n_steps`) or hit an invalid step kind.
    Failed {
        /// Index of the failing step.
        step: u64,
        /// Positive errno.
        errno: i32,
    },
    /// The state word holds an unknown value (memory corrupted?).
    Invalid(u64),
}

impl Status {
    /// Size of the status area in bytes.
    pub const SIZE: usize = size_of::<RawStatus>();

    /// Decodes the status area (as read from the target). Missing bytes read
    /// as zero.
    pub fn decode(bytes: &[u8]) -> Status {
        let word = |off: usize| {
            let mut b = [0u8; 8];
            if let Some(src) = bytes.get(off..) {
                let n = src.len().min(8);
                b[..n].copy_from_slice(&src[..n]);
            }
            u64::from_le_bytes(b)
        };
        match word(offset_of!(RawStatus, state)) {
            STATE_RUNNING => Status::Running,
            STATE_DONE => Status::Done,
            STATE_FAILED => Status::Failed {
                step: word(offset_of!(RawStatus, step)),
                errno: word(offset_of!(RawStatus, errno)) as i32,
            },
            other => Status::Invalid(other),
        }
    }
}

/// A failed (or unfinished) syscall program, with the builder-side label of
/// the failing step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParasiteError {
    /// A syscall step returned -errno.
    #[error("step {step} ({label}): {}", Errno(*errno))]
    StepFailed {
        /// Step index.
        step: u64,
        /// The step's label.
        label: String,
        /// Positive errno.
        errno: i32,
    },
    /// Execution reached an invalid step kind (errno 0 in the status).
    #[error("step {step} ({label}): invalid step")]
    InvalidStep {
        /// Step index.
        step: u64,
        /// The step's label (empty if out of range).
        label: String,
    },
    /// Execution went past the last step without a terminal step.
    #[error("program ran past its last step (step {step})")]
    RanPastEnd {
        /// The number of steps.
        step: u64,
    },
    /// The program has not reached a terminal step.
    #[error("program did not finish (status: running)")]
    NotFinished,
    /// Garbage in the status word.
    #[error("invalid program status word {0:#x}")]
    InvalidStatus(u64),
}

/// Formats an errno as `EINVAL (errno 22)`; unknown numbers use the libc text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match errno_name(self.0) {
            Some(name) => write!(f, "{name} (errno {})", self.0),
            None => {
                let text = std::io::Error::from_raw_os_error(self.0).to_string();
                // io::Error appends " (os error N)"; keep only the text.
                let text = text.split(" (os error").next().unwrap_or("");
                write!(f, "{text} (errno {})", self.0)
            }
        }
    }
}

/// Symbolic name of a Linux errno (`22` → `"EINVAL"`).
pub fn errno_name(errno: i32) -> Option<&'static str> {
    use libc::*;
    Some(match errno {
        EPERM => "EPERM",
        ENOENT => "ENOENT",
        ESRCH => "ESRCH",
        EINTR => "EINTR",
        EIO => "EIO",
        ENXIO => "ENXIO",
        E2BIG => "E2BIG",
        ENOEXEC => "ENOEXEC",
        EBADF => "EBADF",
        ECHILD => "ECHILD",
        EAGAIN => "EAGAIN",
        ENOMEM => "ENOMEM",
        EACCES => "EACCES",
        EFAULT => "EFAULT",
        ENOTBLK => "ENOTBLK",
        EBUSY => "EBUSY",
        EEXIST => "EEXIST",
        EXDEV => "EXDEV",
        ENODEV => "ENODEV",
        ENOTDIR => "ENOTDIR",
        EISDIR => "EISDIR",
        EINVAL => "EINVAL",
        ENFILE => "ENFILE",
        EMFILE => "EMFILE",
        ENOTTY => "ENOTTY",
        ETXTBSY => "ETXTBSY",
        EFBIG => "EFBIG",
        ENOSPC => "ENOSPC",
        ESPIPE => "ESPIPE",
        EROFS => "EROFS",
        EMLINK => "EMLINK",
        EPIPE => "EPIPE",
        EDOM => "EDOM",
        ERANGE => "ERANGE",
        EDEADLK => "EDEADLK",
        ENAMETOOLONG => "ENAMETOOLONG",
        ENOLCK => "ENOLCK",
        ENOSYS => "ENOSYS",
        ENOTEMPTY => "ENOTEMPTY",
        ELOOP => "ELOOP",
        ENOMSG => "ENOMSG",
        ENODATA => "ENODATA",
        ENOSR => "ENOSR",
        ENOLINK => "ENOLINK",
        EPROTO => "EPROTO",
        EOVERFLOW => "EOVERFLOW",
        EBADFD => "EBADFD",
        EILSEQ => "EILSEQ",
        ERESTART => "ERESTART",
        EUSERS => "EUSERS",
        ENOTSOCK => "ENOTSOCK",
        EDESTADDRREQ => "EDESTADDRREQ",
        EMSGSIZE => "EMSGSIZE",
        EPROTOTYPE => "EPROTOTYPE",
        ENOPROTOOPT => "ENOPROTOOPT",
        EPROTONOSUPPORT => "EPROTONOSUPPORT",
        EOPNOTSUPP => "EOPNOTSUPP",
        EAFNOSUPPORT => "EAFNOSUPPORT",
        EADDRINUSE => "EADDRINUSE",
        EADDRNOTAVAIL => "EADDRNOTAVAIL",
        ENETDOWN => "ENETDOWN",
        ENETUNREACH => "ENETUNREACH",
        ECONNABORTED => "ECONNABORTED",
        ECONNRESET => "ECONNRESET",
        ENOBUFS => "ENOBUFS",
        EISCONN => "EISCONN",
        ENOTCONN => "ENOTCONN",
        ETIMEDOUT => "ETIMEDOUT",
        ECONNREFUSED => "ECONNREFUSED",
        EALREADY => "EALREADY",
        EINPROGRESS => "EINPROGRESS",
        ESTALE => "ESTALE",
        EDQUOT => "EDQUOT",
        ECANCELED => "ECANCELED",
        EOWNERDEAD => "EOWNERDEAD",
        ENOTRECOVERABLE => "ENOTRECOVERABLE",
        ERFKILL => "ERFKILL",
        EHWPOISON => "EHWPOISON",
        _ => return None,
    })
}
