//! Thin typed wrapper over userfaultfd(2).
//!
//! Constants and structures follow `include/uapi/linux/userfaultfd.h` (Linux 6.8+:
//! `UFFDIO_MOVE`, `UFFDIO_POISON`, `UFFD_FEATURE_WP_ASYNC`, `UFFD_FEATURE_MOVE`). The
//! descriptor is owned as an [`OwnedFd`]; no raw descriptor leaves this module except
//! through [`AsFd`]/[`AsRawFd`].
//!
//! Most range operations act on the address space the userfaultfd was created in, which
//! may be another process's (an fd taken with `pidfd_getfd`).
//!
//! Hazard: with `EVENT_FORK`/`EVENT_REMOVE`/`EVENT_UNMAP`/`EVENT_REMAP` the kernel blocks
//! the task doing fork/madvise/munmap/mremap until the event is read. Never negotiate them
//! for this process's own memory in a multi-threaded monitor: glibc's `fork` holds malloc
//! locks while blocked, so the reader thread can deadlock on its first allocation.

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

/// Defines a small bitflags-like newtype with named constants.
macro_rules! flags {
    ($(#[$m:meta])* pub struct $name:ident: $t:ty {
        $( $(#[$fm:meta])* const $f:ident = $v:expr; )*
    }) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name($t);

        impl $name {
            $( $(#[$fm])* pub const $f: Self = Self($v); )*
            /// Every named flag with its name, in declaration order.
            pub const NAMED: &'static [(&'static str, Self)] = &[$((stringify!($f), Self($v))),*];

            /// No flag set.
            pub const fn empty() -> Self { Self(0) }
            /// Union of every named flag.
            pub const fn all_named() -> Self { Self(0 $(| $v)*) }
            /// Raw bits.
            pub const fn bits(self) -> $t { self.0 }
            /// From raw bits, keeping unknown ones.
            pub const fn from_bits_retain(bits: $t) -> Self { Self(bits) }
            /// Whether every bit of `other` is set.
            pub const fn contains(self, other: Self) -> bool { self.0 & other.0 == other.0 }
            /// Whether any bit of `other` is set.
            pub const fn intersects(self, other: Self) -> bool { self.0 & other.0 != 0 }
            /// `self | other`.
            pub const fn union(self, other: Self) -> Self { Self(self.0 | other.0) }
            /// `self & !other`.
            pub const fn difference(self, other: Self) -> Self { Self(self.0 & !other.0) }
            /// Whether no bit is set.
            pub const fn is_empty(self) -> bool { self.0 == 0 }
            /// Names of the named flags that are set.
            pub fn names(self) -> impl Iterator<Item = &'static str> {
                Self::NAMED
                    .iter()
                    .filter(move |(_, f)| f.0 != 0 && self.contains(*f))
                    .map(|(n, _)| *n)
            }
        }

        impl std::ops::BitOr for $name {
            type Output = Self;
            fn bitor(self, o: Self) -> Self { Self(self.0 | o.0) }
        }
        impl std::ops::BitOrAssign for $name {
            fn bitor_assign(&mut self, o: Self) { self.0 |= o.0 }
        }
        impl std::ops::BitAnd for $name {
            type Output = Self;
            fn bitand(self, o: Self) -> Self { Self(self.0 & o.0) }
        }
        impl std::ops::Sub for $name {
            type Output = Self;
            fn sub(self, o: Self) -> Self { Self(self.0 & !o.0) }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}(", stringify!($name))?;
                let mut first = true;
                for n in self.names() {
                    if !first { f.write_str(" | ")?; }
                    f.write_str(n)?;
                    first = false;
                }
                let unknown = self.0 & !Self::all_named().0;
                if unknown != 0 {
                    if !first { f.write_str(" | ")?; }
                    write!(f, "{unknown:#x}")?;
                }
                f.write_str(")")
            }
        }
    };
}

flags! {
    /// Flags of the `userfaultfd` syscall / `USERFAULTFD_IOC_NEW`.
    pub struct UffdFlags: i32 {
        const CLOEXEC = libc::O_CLOEXEC;
        const NONBLOCK = libc::O_NONBLOCK;
        /// Only user-mode faults are handled (allowed unprivileged).
        const USER_MODE_ONLY = 1;
    }
}

flags! {
    /// `UFFD_FEATURE_*` bits (`uffdio_api.features`).
    pub struct Features: u64 {
        const PAGEFAULT_FLAG_WP = 1 << 0;
        const EVENT_FORK = 1 << 1;
        const EVENT_REMAP = 1 << 2;
        const EVENT_REMOVE = 1 << 3;
        const MISSING_HUGETLBFS = 1 << 4;
        const MISSING_SHMEM = 1 << 5;
        const EVENT_UNMAP = 1 << 6;
        /// Faults raise SIGBUS instead of producing events.
        const SIGBUS = 1 << 7;
        const THREAD_ID = 1 << 8;
        const MINOR_HUGETLBFS = 1 << 9;
        const MINOR_SHMEM = 1 << 10;
        const EXACT_ADDRESS = 1 << 11;
        const WP_HUGETLBFS_SHMEM = 1 << 12;
        const WP_UNPOPULATED = 1 << 13;
        const POISON = 1 << 14;
        const WP_ASYNC = 1 << 15;
        const MOVE = 1 << 16;
    }
}

flags! {
    /// Bitmask of available ioctls (`1 << _UFFDIO_*`), as reported by `UFFDIO_API`
    /// and `UFFDIO_REGISTER`.
    pub struct Ioctls: u64 {
        const REGISTER = 1 << 0x00;
        const UNREGISTER = 1 << 0x01;
        const WAKE = 1 << 0x02;
        const COPY = 1 << 0x03;
        const ZEROPAGE = 1 << 0x04;
        const MOVE = 1 << 0x05;
        const WRITEPROTECT = 1 << 0x06;
        const CONTINUE = 1 << 0x07;
        const POISON = 1 << 0x08;
        const API = 1 << 0x3f;
    }
}

flags! {
    /// `UFFDIO_REGISTER_MODE_*`.
    pub struct RegisterMode: u64 {
        const MISSING = 1 << 0;
        const WP = 1 << 1;
        const MINOR = 1 << 2;
    }
}

flags! {
    /// `UFFDIO_COPY_MODE_*`.
    pub struct CopyMode: u64 {
        const DONTWAKE = 1 << 0;
        const WP = 1 << 1;
    }
}

flags! {
    /// `UFFDIO_ZEROPAGE_MODE_*`.
    pub struct ZeropageMode: u64 {
        const DONTWAKE = 1 << 0;
    }
}

flags! {
    /// `UFFDIO_WRITEPROTECT_MODE_*`.
    pub struct WriteprotectMode: u64 {
        const WP = 1 << 0;
        const DONTWAKE = 1 << 1;
    }
}

flags! {
    /// `UFFDIO_CONTINUE_MODE_*`.
    pub struct ContinueMode: u64 {
        const DONTWAKE = 1 << 0;
        const WP = 1 << 1;
    }
}

flags! {
    /// `UFFDIO_POISON_MODE_*`.
    pub struct PoisonMode: u64 {
        const DONTWAKE = 1 << 0;
    }
}

flags! {
    /// `UFFDIO_MOVE_MODE_*`.
    pub struct MoveMode: u64 {
        const DONTWAKE = 1 << 0;
        const ALLOW_SRC_HOLES = 1 << 1;
    }
}

flags! {
    /// `UFFD_PAGEFAULT_FLAG_*` of a page-fault event.
    pub struct PagefaultFlags: u64 {
        const WRITE = 1 << 0;
        const WP = 1 << 1;
        const MINOR = 1 << 2;
    }
}

/// `UFFD_API`.
pub const UFFD_API: u64 = 0xaa;

const UFFDIO: u64 = 0xaa;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}
const IOC_READ: u64 = 2;
const IOC_RW: u64 = 3;

/// `USERFAULTFD_IOC_NEW` = `_IO(0xAA, 0x00)` on `/dev/userfaultfd`.
pub const USERFAULTFD_IOC_NEW: u64 = UFFDIO << 8;
/// ioctl request numbers.
pub const UFFDIO_API: u64 = ioc(IOC_RW, 0x3f, size_of::<RawApi>());
pub const UFFDIO_REGISTER: u64 = ioc(IOC_RW, 0x00, size_of::<RawRegister>());
pub const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0x01, size_of::<Range>());
pub const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, size_of::<Range>());
pub const UFFDIO_COPY: u64 = ioc(IOC_RW, 0x03, size_of::<RawCopy>());
pub const UFFDIO_ZEROPAGE: u64 = ioc(IOC_RW, 0x04, size_of::<RawRangeOp>());
pub const UFFDIO_MOVE: u64 = ioc(IOC_RW, 0x05, size_of::<RawCopy>());
pub const UFFDIO_WRITEPROTECT: u64 = ioc(IOC_RW, 0x06, size_of::<RawWriteprotect>());
pub const UFFDIO_CONTINUE: u64 = ioc(IOC_RW, 0x07, size_of::<RawRangeOp>());
pub const UFFDIO_POISON: u64 = ioc(IOC_RW, 0x08, size_of::<RawRangeOp>());

const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_FORK: u8 = 0x13;
const UFFD_EVENT_REMAP: u8 = 0x14;
const UFFD_EVENT_REMOVE: u8 = 0x15;
const UFFD_EVENT_UNMAP: u8 = 0x16;

/// `struct uffdio_range`: an address range in the userfaultfd's address space.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Range {
    pub start: u64,
    pub len: u64,
}

impl Range {
    pub fn new(start: usize, len: usize) -> Self {
        Self {
            start: start as u64,
            len: len as u64,
        }
    }
}

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Default)]
struct RawApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
struct RawRegister {
    range: Range,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_copy` and `struct uffdio_move` (same layout).
#[repr(C)]
struct RawCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    result: i64,
}

/// `struct uffdio_zeropage`, `uffdio_continue`, `uffdio_poison` (same layout).
#[repr(C)]
struct RawRangeOp {
    range: Range,
    mode: u64,
    result: i64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
struct RawWriteprotect {
    range: Range,
    mode: u64,
}

/// `struct uffd_msg` as read from the descriptor. Decode it with [`UffdMsg::take`].
///
/// A fork message carries a new descriptor: it is closed when the message is dropped,
/// overwritten by [`Uffd::read_events`], or handed out (once) by `take`.
#[repr(C)]
#[derive(Default)]
pub struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: [u64; 3],
}

const _: () = {
    assert!(size_of::<RawApi>() == 24);
    assert!(size_of::<Range>() == 16);
    assert!(size_of::<RawRegister>() == 32);
    assert!(size_of::<RawCopy>() == 40);
    assert!(size_of::<RawRangeOp>() == 32);
    assert!(size_of::<RawWriteprotect>() == 24);
    assert!(size_of::<UffdMsg>() == 32);
    assert!(std::mem::offset_of!(UffdMsg, arg) == 8);
    assert!(UFFDIO_API == 0xc018_aa3f);
    assert!(UFFDIO_REGISTER == 0xc020_aa00);
    assert!(UFFDIO_UNREGISTER == 0x8010_aa01);
    assert!(UFFDIO_COPY == 0xc028_aa03);
    assert!(UFFDIO_ZEROPAGE == 0xc020_aa04);
    assert!(UFFDIO_MOVE == 0xc028_aa05);
    assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);
};

impl UffdMsg {
    /// Raw event code (`UFFD_EVENT_*`), 0 once taken or when empty.
    pub fn event_code(&self) -> u8 {
        self.event
    }

    /// Decodes the message, transferring ownership of a fork descriptor. Returns `None`
    /// for an empty or already-taken message.
    pub fn take(&mut self) -> Option<Event> {
        let ev = match self.event {
            0 => return None,
            UFFD_EVENT_PAGEFAULT => Event::Pagefault {
                flags: PagefaultFlags::from_bits_retain(self.arg[0]),
                addr: self.arg[1],
                tid: self.arg[2] as u32,
            },
            UFFD_EVENT_FORK => Event::Fork {
                // SAFETY: the kernel installed this descriptor for us in read(); it is
                // owned by this message until taken (event is zeroed below).
                uffd: unsafe { OwnedFd::from_raw_fd(self.arg[0] as u32 as RawFd) },
            },
            UFFD_EVENT_REMAP => Event::Remap {
                from: self.arg[0],
                to: self.arg[1],
                len: self.arg[2],
            },
            UFFD_EVENT_REMOVE => Event::Remove {
                start: self.arg[0],
                end: self.arg[1],
            },
            UFFD_EVENT_UNMAP => Event::Unmap {
                start: self.arg[0],
                end: self.arg[1],
            },
            other => Event::Unknown { event: other },
        };
        self.event = 0;
        Some(ev)
    }

    fn clear(&mut self) {
        drop(self.take());
    }
}

impl Drop for UffdMsg {
    fn drop(&mut self) {
        self.clear();
    }
}

impl fmt::Debug for UffdMsg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UffdMsg")
            .field("event", &self.event)
            .field("arg", &self.arg)
            .finish()
    }
}

/// A decoded userfaultfd event.
#[derive(Debug)]
pub enum Event {
    /// A fault; `addr` is page-aligned unless `EXACT_ADDRESS` was negotiated; `tid` is
    /// the faulting thread (in the uffd's pid namespace) with `THREAD_ID`, else 0.
    Pagefault {
        addr: u64,
        flags: PagefaultFlags,
        tid: u32,
    },
    /// The registered process forked; `uffd` serves the child's registered ranges.
    Fork { uffd: OwnedFd },
    /// `mremap` moved `[from, from+len)` to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// `madvise(MADV_DONTNEED/REMOVE)` dropped `[start, end)`: it must read as zeros.
    Remove { start: u64, end: u64 },
    /// `munmap` (or an overlapping mmap/mremap) removed `[start, end)`.
    Unmap { start: u64, end: u64 },
    /// An event code this wrapper does not know.
    Unknown { event: u8 },
}

/// Error of a userfaultfd operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `EEXIST`: the destination page is already populated.
    #[error("userfaultfd {op}: range already populated")]
    Exists { op: &'static str },
    /// Any other failure.
    #[error("userfaultfd {op}: {errno}")]
    Os { op: &'static str, errno: Errno },
}

impl Error {
    /// The errno behind the error.
    pub fn errno(&self) -> Errno {
        match self {
            Error::Exists { .. } => Errno::EEXIST,
            Error::Os { errno, .. } => *errno,
        }
    }

    fn from_errno(op: &'static str, errno: Errno) -> Self {
        if errno == Errno::EEXIST {
            Error::Exists { op }
        } else {
            Error::Os { op, errno }
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// What `UFFDIO_API` reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiInfo {
    /// Every feature the kernel supports (not only the requested ones).
    pub features: Features,
    /// ioctls usable on the descriptor.
    pub ioctls: Ioctls,
}

/// An owned userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// Creates a userfaultfd with the syscall, falling back to `/dev/userfaultfd`
    /// (`USERFAULTFD_IOC_NEW`) when the syscall is missing or refused.
    pub fn new(flags: UffdFlags) -> Result<Self> {
        match Self::new_syscall(flags) {
            Ok(u) => Ok(u),
            Err(e) if matches!(e.errno(), Errno::ENOSYS | Errno::EPERM) => Self::new_dev(flags),
            Err(e) => Err(e),
        }
    }

    /// Creates a userfaultfd with the `userfaultfd` syscall only.
    pub fn new_syscall(flags: UffdFlags) -> Result<Self> {
        // SAFETY: plain syscall with an integer argument.
        let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags.bits()) };
        if r < 0 {
            return Err(Error::from_errno("userfaultfd()", Errno::last()));
        }
        Ok(Self {
            // SAFETY: userfaultfd() succeeded, so `r` is a fresh descriptor in our table
            // that nothing else owns; it is wrapped exactly once.
            fd: unsafe { OwnedFd::from_raw_fd(r as RawFd) },
        })
    }

    /// Creates a userfaultfd through `/dev/userfaultfd` only.
    pub fn new_dev(flags: UffdFlags) -> Result<Self> {
        let path = c"/dev/userfaultfd";
        // SAFETY: `path` is a NUL-terminated C string literal, valid for the whole call.
        let dev = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if dev < 0 {
            return Err(Error::from_errno("open /dev/userfaultfd", Errno::last()));
        }
        // SAFETY: open() succeeded, so `dev` is a fresh descriptor nothing else owns.
        let dev = unsafe { OwnedFd::from_raw_fd(dev) };
        // SAFETY: USERFAULTFD_IOC_NEW takes the flags as an integer argument.
        let r = unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                USERFAULTFD_IOC_NEW as libc::Ioctl,
                flags.bits() as libc::c_ulong,
            )
        };
        if r < 0 {
            return Err(Error::from_errno("USERFAULTFD_IOC_NEW", Errno::last()));
        }
        Ok(Self {
            // SAFETY: USERFAULTFD_IOC_NEW succeeded, so `r` is a fresh userfaultfd in our
            // table that nothing else owns; it is wrapped exactly once.
            fd: unsafe { OwnedFd::from_raw_fd(r) },
        })
    }

    /// Wraps a descriptor that is a userfaultfd (e.g. taken with `pidfd_getfd` or from a
    /// fork event). Nothing is verified.
    pub fn from_owned(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// Gives the descriptor back.
    pub fn into_owned(self) -> OwnedFd {
        self.fd
    }

    /// Which features and ioctls this kernel offers, on a throwaway descriptor
    /// (`UFFDIO_API` can be called only once per descriptor).
    pub fn probe() -> Result<ApiInfo> {
        Self::new(UffdFlags::CLOEXEC | UffdFlags::NONBLOCK)?.api(Features::empty())
    }

    fn ioctl<T>(&self, op: &'static str, req: u64, arg: &mut T) -> Result<()> {
        // SAFETY: every caller passes a UFFDIO_* request together with the repr(C) struct
        // that request takes (sizes pinned by the const asserts above, and encoded in the
        // request number); `arg` is an exclusive borrow, live for the call, so the kernel
        // reads and writes only within it. The one pointer inside an argument, COPY's
        // `src`, comes from a `&[u8]` borrowed for the call with `len` its length, and is
        // only read. The ranges the operations fill, zero or move live in the uffd's
        // registered address space: a restored process in warmstart; in the tests below,
        // registered test mappings that no Rust reference points into.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as libc::Ioctl, arg as *mut T) };
        if r < 0 {
            Err(Error::from_errno(op, Errno::last()))
        } else {
            Ok(())
        }
    }

    /// `UFFDIO_API`: enables `requested` (EINVAL if any is unsupported) and returns what
    /// the kernel reported. Must be the first ioctl and succeeds once per descriptor.
    pub fn api(&self, requested: Features) -> Result<ApiInfo> {
        let mut a = RawApi {
            api: UFFD_API,
            features: requested.bits(),
            ioctls: 0,
        };
        self.ioctl("UFFDIO_API", UFFDIO_API, &mut a)?;
        Ok(ApiInfo {
            features: Features::from_bits_retain(a.features),
            ioctls: Ioctls::from_bits_retain(a.ioctls),
        })
    }

    /// `UFFDIO_REGISTER`; returns the ioctls available on the range.
    pub fn register(&self, range: Range, mode: RegisterMode) -> Result<Ioctls> {
        let mut r = RawRegister {
            range,
            mode: mode.bits(),
            ioctls: 0,
        };
        self.ioctl("UFFDIO_REGISTER", UFFDIO_REGISTER, &mut r)?;
        Ok(Ioctls::from_bits_retain(r.ioctls))
    }

    /// `UFFDIO_UNREGISTER`.
    pub fn unregister(&self, range: Range) -> Result<()> {
        let mut r = range;
        self.ioctl("UFFDIO_UNREGISTER", UFFDIO_UNREGISTER, &mut r)
    }

    /// `UFFDIO_WAKE`: wakes threads waiting on faults in `range`.
    pub fn wake(&self, range: Range) -> Result<()> {
        let mut r = range;
        self.ioctl("UFFDIO_WAKE", UFFDIO_WAKE, &mut r)
    }

    /// Shared handling of the ops that report a byte count in their last field:
    /// `Ok(n)` with `n < len` on a partial operation (EAGAIN after progress) or
    /// `Ok(0)` on EAGAIN without progress (the address space is changing: read pending
    /// events, then retry the remainder); `Err(Exists)` when the first page is populated.
    fn counted(&self, op: &'static str, req: u64, arg: &mut impl Counted) -> Result<usize> {
        match self.ioctl(op, req, arg) {
            Ok(()) => Ok(arg.result().max(0) as usize),
            Err(e) if e.errno() == Errno::EAGAIN => Ok(arg.result().max(0) as usize),
            Err(e) => Err(e),
        }
    }

    /// `UFFDIO_COPY` of `src` to `dst`; returns the bytes copied. `Ok(n)` with
    /// `n < src.len()` is a partial copy (or `Ok(0)`: EAGAIN while the address space is
    /// changing — drain events, then retry the rest); `Err(Error::Exists)` means the first
    /// destination page is already populated.
    pub fn copy(&self, dst: u64, src: &[u8], mode: CopyMode) -> Result<usize> {
        let mut c = RawCopy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: mode.bits(),
            result: 0,
        };
        self.counted("UFFDIO_COPY", UFFDIO_COPY, &mut c)
    }

    /// `UFFDIO_ZEROPAGE`; returns the number of bytes mapped (partial like `copy`).
    pub fn zeropage(&self, range: Range, mode: ZeropageMode) -> Result<usize> {
        let mut z = RawRangeOp {
            range,
            mode: mode.bits(),
            result: 0,
        };
        self.counted("UFFDIO_ZEROPAGE", UFFDIO_ZEROPAGE, &mut z)
    }

    /// `UFFDIO_CONTINUE` (minor faults); returns the number of bytes mapped.
    pub fn continue_(&self, range: Range, mode: ContinueMode) -> Result<usize> {
        let mut c = RawRangeOp {
            range,
            mode: mode.bits(),
            result: 0,
        };
        self.counted("UFFDIO_CONTINUE", UFFDIO_CONTINUE, &mut c)
    }

    /// `UFFDIO_POISON`; returns the number of bytes poisoned.
    pub fn poison(&self, range: Range, mode: PoisonMode) -> Result<usize> {
        let mut p = RawRangeOp {
            range,
            mode: mode.bits(),
            result: 0,
        };
        self.counted("UFFDIO_POISON", UFFDIO_POISON, &mut p)
    }

    /// `UFFDIO_MOVE` of `len` bytes from `src` to `dst` (both in the uffd's address
    /// space; needs `Features::MOVE`); returns the number of bytes moved.
    pub fn move_(&self, dst: u64, src: u64, len: u64, mode: MoveMode) -> Result<usize> {
        let mut m = RawCopy {
            dst,
            src,
            len,
            mode: mode.bits(),
            result: 0,
        };
        self.counted("UFFDIO_MOVE", UFFDIO_MOVE, &mut m)
    }

    /// `UFFDIO_WRITEPROTECT`: protect (`mode` has `WP`) or unprotect `range`.
    pub fn writeprotect(&self, range: Range, mode: WriteprotectMode) -> Result<()> {
        let mut w = RawWriteprotect {
            range,
            mode: mode.bits(),
        };
        self.ioctl("UFFDIO_WRITEPROTECT", UFFDIO_WRITEPROTECT, &mut w)
    }

    /// Reads pending messages into `buf` and returns how many were read; 0 when none is
    /// pending on a non-blocking descriptor. Undecoded messages already in `buf` are
    /// dropped first (closing fork descriptors).
    pub fn read_events(&self, buf: &mut [UffdMsg]) -> Result<usize> {
        for m in buf.iter_mut() {
            m.clear();
        }
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            // SAFETY: `buf` is valid for writes of its size; UffdMsg is repr(C) POD-like
            // (event 0 / reserved are plain integers).
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    std::mem::size_of_val(buf),
                )
            };
            if n >= 0 {
                return Ok(n as usize / size_of::<UffdMsg>());
            }
            match Errno::last() {
                Errno::EINTR => continue,
                Errno::EAGAIN => return Ok(0),
                e => {
                    return Err(Error::Os {
                        op: "read",
                        errno: e,
                    })
                }
            }
        }
    }

    /// Sets or clears `O_NONBLOCK` on the open file description (shared with every
    /// process holding it). `poll` on a uffd needs it set.
    pub fn set_nonblocking(&self, nonblocking: bool) -> Result<()> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: F_GETFL takes no argument and reads no memory; self.fd is open.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if fl < 0 {
            return Err(Error::Os {
                op: "F_GETFL",
                errno: Errno::last(),
            });
        }
        let new = if nonblocking {
            fl | libc::O_NONBLOCK
        } else {
            fl & !libc::O_NONBLOCK
        };
        // SAFETY: F_SETFL takes an integer flag argument; self.fd is open.
        if new != fl && unsafe { libc::fcntl(fd, libc::F_SETFL, new) } < 0 {
            return Err(Error::Os {
                op: "F_SETFL",
                errno: Errno::last(),
            });
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` (-1: forever) for a message; true if one is readable.
    pub fn poll_readable(&self, timeout_ms: i32) -> Result<bool> {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: `p` is one live, initialised pollfd; the kernel writes only revents.
            let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
            if r >= 0 {
                if p.revents & libc::POLLIN != 0 {
                    return Ok(true);
                }
                if p.revents & libc::POLLERR != 0 {
                    // The kernel reports POLLERR for a descriptor without O_NONBLOCK.
                    return Err(Error::Os {
                        op: "poll (needs O_NONBLOCK)",
                        errno: Errno::EINVAL,
                    });
                }
                return Ok(false);
            }
            let e = Errno::last();
            if e != Errno::EINTR {
                return Err(Error::Os {
                    op: "poll",
                    errno: e,
                });
            }
        }
    }
}

trait Counted {
    fn result(&self) -> i64;
}
impl Counted for RawCopy {
    fn result(&self) -> i64 {
        self.result
    }
}
impl Counted for RawRangeOp {
    fn result(&self) -> i64 {
        self.result
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<OwnedFd> for Uffd {
    fn from(fd: OwnedFd) -> Self {
        Self::from_owned(fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    const PAGE: usize = 4096;

    struct Map {
        addr: *mut u8,
        len: usize,
    }
    // SAFETY: `addr` is a private anonymous mapping owned by the Map (unmapped only on
    // drop); nothing in it is thread-bound, so it may move to another thread.
    unsafe impl Send for Map {}
    // SAFETY: shared access only reads the mapping with volatile byte loads (or lets the
    // kernel fill it via the uffd); no `&self` method writes through `addr`.
    unsafe impl Sync for Map {}
    impl Map {
        fn new(len: usize) -> Self {
            // SAFETY: a fresh private anonymous mapping at an address the kernel picks, so
            // it replaces nothing; the Map owns it until drop.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Map {
                addr: p.cast(),
                len,
            }
        }
        fn range(&self) -> Range {
            Range::new(self.addr as usize, self.len)
        }
        fn read(&self, off: usize) -> u8 {
            // SAFETY: the tests pass `off < self.len`, so the byte lies inside our live
            // mapping (readable; a missing page faults into the uffd and is filled).
            unsafe { self.addr.add(off).read_volatile() }
        }
    }
    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: `addr`/`len` are exactly the mapping Map::new made, unmapped only here
            // and never touched after (the Map is being dropped).
            unsafe { libc::munmap(self.addr.cast(), self.len) };
        }
    }

    fn new_uffd() -> Uffd {
        Uffd::new(UffdFlags::CLOEXEC | UffdFlags::NONBLOCK).expect("userfaultfd")
    }

    /// Every feature except SIGBUS (which suppresses fault events).
    fn all_features() -> Features {
        let avail = Uffd::probe().expect("probe").features;
        avail - Features::SIGBUS
    }

    /// Waits for the next event other than Fork (another test may fork meanwhile).
    fn next_event(u: &Uffd, deadline: Instant) -> Event {
        let mut buf: [UffdMsg; 4] = Default::default();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out waiting for a uffd event");
            if !u.poll_readable(left.as_millis().min(1000) as i32).unwrap() {
                continue;
            }
            let n = u.read_events(&mut buf).unwrap();
            for m in buf[..n].iter_mut() {
                match m.take() {
                    Some(Event::Fork { .. }) | None => {}
                    Some(ev) => return ev,
                }
            }
        }
    }

    #[test]
    fn ioctl_numbers_and_flags() {
        assert_eq!(Features::all_named().bits(), (1 << 17) - 1);
        let f = Features::EVENT_FORK | Features::MOVE;
        assert_eq!(format!("{f:?}"), "Features(EVENT_FORK | MOVE)");
        assert!(f.contains(Features::MOVE));
        assert!(!f.contains(Features::POISON));
    }

    #[test]
    fn negotiate_all_features() {
        let info = Uffd::probe().unwrap();
        assert!(info
            .ioctls
            .contains(Ioctls::REGISTER | Ioctls::UNREGISTER | Ioctls::API));
        let want = all_features();
        let u = new_uffd();
        let got = u.api(want).unwrap();
        assert!(
            got.features.contains(want),
            "{:?} vs {:?}",
            got.features,
            want
        );
        // A second UFFDIO_API on the same descriptor is refused.
        assert!(u.api(want).is_err());
    }

    #[test]
    fn copy_serves_thread_fault() {
        let u = new_uffd();
        // Not EVENT_FORK: a fork by another test thread would then block inside glibc's
        // fork (holding malloc locks) until we read the event — a deadlock in-process.
        let feats = u
            .api(all_features() - Features::EVENT_FORK)
            .unwrap()
            .features;
        let map = Arc::new(Map::new(4 * PAGE));
        let ioctls = u.register(map.range(), RegisterMode::MISSING).unwrap();
        assert!(ioctls.contains(Ioctls::COPY | Ioctls::ZEROPAGE | Ioctls::WAKE));

        let tid = Arc::new(AtomicU64::new(0));
        let (m2, t2) = (map.clone(), tid.clone());
        let th = std::thread::spawn(move || {
            // SAFETY: gettid takes no arguments and cannot fail.
            t2.store(unsafe { libc::gettid() } as u64, Ordering::SeqCst);
            (m2.read(PAGE + 123), m2.read(PAGE + 4095))
        });
        let ev = next_event(&u, Instant::now() + Duration::from_secs(20));
        let Event::Pagefault {
            addr,
            flags,
            tid: ftid,
        } = ev
        else {
            panic!("unexpected {ev:?}")
        };
        let want = map.addr as u64 + PAGE as u64;
        assert_eq!(addr & !(PAGE as u64 - 1), want);
        if feats.contains(Features::EXACT_ADDRESS) {
            assert_eq!(addr, want + 123);
        }
        assert!(!flags.contains(PagefaultFlags::WRITE));
        let page: Vec<u8> = (0..PAGE).map(|i| (i % 251) as u8).collect();
        let mut done = 0;
        while done < PAGE {
            // Ok(n < len): partial or EAGAIN; retry the rest.
            done += u
                .copy(want + done as u64, &page[done..], CopyMode::empty())
                .unwrap();
        }
        let (a, b) = th.join().unwrap();
        assert_eq!((a, b), (page[123], page[4095]));
        assert_eq!(ftid as u64, tid.load(Ordering::SeqCst));
        // Same page again: already populated.
        assert!(matches!(
            u.copy(want, &page, CopyMode::empty()),
            Err(Error::Exists { .. })
        ));
        u.unregister(map.range()).unwrap();
    }

    #[test]
    fn zeropage_and_exists() {
        let u = new_uffd();
        u.api(Features::empty()).unwrap();
        let map = Map::new(2 * PAGE);
        u.register(map.range(), RegisterMode::MISSING).unwrap();
        let n = u.zeropage(map.range(), ZeropageMode::empty()).unwrap();
        assert_eq!(n, 2 * PAGE);
        assert_eq!(map.read(0), 0);
        assert_eq!(map.read(2 * PAGE - 1), 0);
        let e = u.zeropage(map.range(), ZeropageMode::empty()).unwrap_err();
        assert!(matches!(e, Error::Exists { .. }), "{e}");
    }

    #[test]
    fn event_remove_on_dontneed() {
        let u = new_uffd();
        u.api(Features::EVENT_REMOVE).unwrap();
        let map = Arc::new(Map::new(4 * PAGE));
        u.register(map.range(), RegisterMode::MISSING).unwrap();
        let page = vec![7u8; 4 * PAGE];
        assert_eq!(
            u.copy(map.addr as u64, &page, CopyMode::empty()).unwrap(),
            4 * PAGE
        );
        assert_eq!(map.read(PAGE), 7);
        let m2 = map.clone();
        // madvise blocks until the event is read: do it on a helper thread.
        let th = std::thread::spawn(move || {
            // SAFETY: pages 1..3 of the 4-page mapping the Arc keeps alive on this thread;
            // DONTNEED only drops their contents (they read back as zero or via the uffd),
            // and no Rust reference points into the mapping.
            unsafe { libc::madvise(m2.addr.add(PAGE).cast(), 2 * PAGE, libc::MADV_DONTNEED) }
        });
        let ev = next_event(&u, Instant::now() + Duration::from_secs(20));
        assert_eq!(th.join().unwrap(), 0);
        let base = map.addr as u64;
        match ev {
            Event::Remove { start, end } => {
                assert_eq!((start, end), (base + PAGE as u64, base + 3 * PAGE as u64))
            }
            other => panic!("unexpected {other:?}"),
        }
        // Dropped pages are missing again: zeropage succeeds there, not elsewhere.
        assert_eq!(
            u.zeropage(
                Range::new(map.addr as usize + PAGE, PAGE),
                ZeropageMode::empty()
            )
            .unwrap(),
            PAGE
        );
        assert_eq!(map.read(PAGE), 0);
        assert_eq!(map.read(0), 7);
    }

    /// The design's flow: the child creates and registers the uffd, the monitor takes it
    /// with pidfd_getfd and serves the child's fault from outside.
    #[test]
    fn serve_child_fault_via_pidfd_getfd() {
        use crate::sys::pidfd;
        let mut fds = [0i32; 2];
        // SAFETY: `fds` is a live [c_int; 2], exactly the two fds pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: the test harness has other threads, so the child must take no lock
        // they might hold: it runs only mmap, the Uffd wrappers (syscalls and ioctls that
        // allocate nothing; their errors are plain enums), write and a volatile read, and
        // leaves with _exit without returning into the harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let code = (|| {
                let map = std::mem::ManuallyDrop::new(Map::new(PAGE));
                let u = Uffd::new(UffdFlags::CLOEXEC).ok()?;
                u.api(Features::THREAD_ID).ok()?;
                u.register(map.range(), RegisterMode::MISSING).ok()?;
                let msg = [u.as_raw_fd() as u64, map.addr as u64];
                // SAFETY: the source is `msg`, a live [u64; 2] (16 bytes, only read).
                unsafe { libc::write(fds[1], msg.as_ptr().cast(), 16) };
                std::mem::forget(u);
                Some(if map.read(100) == 0x5a { 0 } else { 3 })
            })()
            .unwrap_or(2);
            // SAFETY: _exit takes an integer and does not return; skipping destructors
            // and atexit handlers is the point in a forked child.
            unsafe { libc::_exit(code) };
        }
        // SAFETY: fds[1] is the parent's copy of the write end, owned by this test and
        // referenced by nothing else; it is closed exactly once.
        unsafe { libc::close(fds[1]) };
        let mut msg = [0u64; 2];
        // SAFETY: `msg` is a live [u64; 2], writable for the 16 bytes requested.
        let n = unsafe { libc::read(fds[0], msg.as_mut_ptr().cast(), 16) };
        // SAFETY: fds[0] is owned by this test, referenced by nothing else, closed once.
        unsafe { libc::close(fds[0]) };
        let kill = || {
            // SAFETY: kill takes integer arguments only; `pid` is our unreaped child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        };
        let result = std::panic::catch_unwind(|| {
            assert_eq!(n, 16, "child failed before registering");
            let pfd = pidfd::pidfd_open(pid, 0).unwrap();
            let u = Uffd::from_owned(pidfd::pidfd_getfd(&pfd, msg[0] as i32).unwrap());
            u.set_nonblocking(true).unwrap();
            let ev = next_event(&u, Instant::now() + Duration::from_secs(20));
            let Event::Pagefault { addr, tid, .. } = ev else {
                panic!("unexpected {ev:?}")
            };
            assert_eq!(addr, msg[1]);
            assert_eq!(tid as i32, pid);
            assert_eq!(
                u.copy(msg[1], &[0x5a; PAGE], CopyMode::empty()).unwrap(),
                PAGE
            );
        });
        if result.is_err() {
            kill();
        }
        let mut st = 0;
        // SAFETY: `st` is a live c_int the kernel writes the child's status into.
        assert_eq!(unsafe { libc::waitpid(pid, &mut st, 0) }, pid);
        if let Err(e) = result {
            std::panic::resume_unwind(e);
        }
        assert!(
            libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0,
            "status {st:#x}"
        );
    }

    #[test]
    fn move_page() {
        let info = Uffd::probe().unwrap();
        if !info.features.contains(Features::MOVE) {
            return;
        }
        let u = new_uffd();
        u.api(Features::MOVE).unwrap();
        let dst = Map::new(PAGE);
        let src = Map::new(PAGE);
        // SAFETY: `src` is a live, writable one-page mapping owned by this test, and no
        // Rust reference points into it.
        unsafe { src.addr.write_volatile(42) };
        u.register(dst.range(), RegisterMode::MISSING).unwrap();
        let n = u
            .move_(
                dst.addr as u64,
                src.addr as u64,
                PAGE as u64,
                MoveMode::empty(),
            )
            .unwrap();
        assert_eq!(n, PAGE);
        assert_eq!(dst.read(0), 42);
        assert_eq!(src.read(0), 0);
    }
}
