//! System V IPC of the calling thread's ipc namespace: listing (`/proc/sysvipc`),
//! reading without consuming (shm contents through the segment's file, semaphore values,
//! messages with `MSG_COPY`), and creating objects at chosen ids.
//!
//! Ids: an object's id is `seq * 32768 + slot`. Writing an id to
//! `/proc/sys/kernel/{shm,sem,msg}_next_id` makes the next `*get` of that kind use it
//! exactly (the kernel resets the file to -1 after); like the other ipc sysctls, these
//! files act on the ipc namespace of the thread that opens them.
//!
//! The `*ctl` calls go through raw syscalls with the kernel's own 64-bit structures (on
//! x86_64 the syscalls always use them, and refuse the `IPC_64` bit in `cmd`):
//! every one starts with `struct ipc64_perm` (key, uid, gid, cuid, cgid, mode
//! as 32-bit fields), and `IPC_SET` reads uid, gid and the low 9 mode bits from it.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};

use anyhow::{anyhow, bail, Context, Result};
use warmstart_snapshots::model::{IpcMessage, IpcPerm};

/// `msgrcv` flag: copy message number `msgtyp` without removing it.
const MSG_COPY: i32 = 0o40000;
/// Room for any `struct {shm,sem,msq}id64_ds` (the largest is 120 bytes).
const DS_WORDS: usize = 32;
/// Byte offsets in `struct ipc64_perm`.
const PERM_UID: usize = 4;
const PERM_GID: usize = 8;
const PERM_MODE: usize = 20;
/// Byte offset of `msg_qbytes` in `struct msqid64_ds` (x86_64).
const MSQ_QBYTES: usize = 88;
/// Shm mode bit: the segment is locked in memory (`SHM_LOCK`).
pub const SHM_LOCKED: u32 = 0o2000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Shm,
    Sem,
    Msg,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Shm => "shm",
            Kind::Sem => "sem",
            Kind::Msg => "msg",
        }
    }

    fn ctl(self) -> libc::c_long {
        match self {
            Kind::Shm => libc::SYS_shmctl,
            Kind::Sem => libc::SYS_semctl,
            Kind::Msg => libc::SYS_msgctl,
        }
    }
}

/// One line of `/proc/sysvipc/{shm,sem,msg}`: the object's perm and the other columns
/// by name (`size`, `nsems`, `qnum`, `cbytes`, ...).
#[derive(Debug, Clone, Default)]
pub struct Listed {
    pub perm: IpcPerm,
    pub fields: HashMap<String, u64>,
}

impl Listed {
    pub fn field(&self, name: &str) -> u64 {
        self.fields.get(name).copied().unwrap_or(0)
    }
}

/// Every object of `kind` in this thread's ipc namespace.
pub fn list(kind: Kind) -> Result<Vec<Listed>> {
    let path = format!("/proc/sysvipc/{}", kind.name());
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_list(&text, kind).with_context(|| format!("parsing {path}"))
}

fn parse_list(text: &str, kind: Kind) -> Result<Vec<Listed>> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .context("no header line")?
        .split_whitespace()
        .collect();
    let id_col = format!(
        "{}id",
        if kind == Kind::Msg {
            "msq"
        } else {
            kind.name()
        }
    );
    let mut out = Vec::new();
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < header.len() {
            bail!("short line {line:?}");
        }
        let get = |name: &str| -> Result<&str> {
            let i = header
                .iter()
                .position(|h| *h == name)
                .with_context(|| format!("no column {name}"))?;
            Ok(cols[i])
        };
        let num = |name: &str| -> Result<u32> {
            get(name)?
                .parse()
                .with_context(|| format!("column {name} of {line:?}"))
        };
        let perm = IpcPerm {
            key: get("key")?.parse().context("key")?,
            id: get(&id_col)?.parse().context("id")?,
            uid: num("uid")?,
            gid: num("gid")?,
            cuid: num("cuid")?,
            cgid: num("cgid")?,
            mode: u32::from_str_radix(get("perms")?, 8).context("perms")?,
        };
        let fields = header
            .iter()
            .zip(&cols)
            .filter_map(|(h, c)| Some((h.to_string(), c.parse().ok()?)))
            .collect();
        out.push(Listed { perm, fields });
    }
    Ok(out)
}

fn err(what: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{what}: {}", std::io::Error::last_os_error())
}

/// A shm segment attached to this process (`shmat`), detached on drop.
pub struct Attached {
    addr: *mut libc::c_void,
    len: usize,
}

impl Attached {
    /// Attaches segment `id` of `size` bytes (its whole pages), read-only or writable.
    pub fn new(id: i32, size: u64, writable: bool) -> Result<Attached> {
        let flags = if writable { 0 } else { libc::SHM_RDONLY };
        // SAFETY: a null address lets the kernel choose a free place; the mapping is
        // owned by the returned value and detached on its drop.
        let addr = unsafe { libc::shmat(id, std::ptr::null(), flags) };
        if addr as isize == -1 {
            return Err(err(format!("shmat of System V shm {id}")));
        }
        Ok(Attached {
            addr,
            len: (size as usize).div_ceil(4096) * 4096,
        })
    }

    /// The segment's file (`/proc/self/map_files`): read with `pread`, a hole reads as
    /// zeros without being allocated, so dumping a sparse segment does not fill it.
    pub fn file(&self) -> Result<OwnedFd> {
        let start = self.addr as usize;
        let end = start + self.len;
        let path = format!("/proc/self/map_files/{start:x}-{end:x}");
        Ok(OwnedFd::from(
            std::fs::File::open(&path).with_context(|| format!("opening {path}"))?,
        ))
    }

    /// Copies `data` to offset `at` of the segment.
    pub fn write(&mut self, at: usize, data: &[u8]) {
        assert!(at + data.len() <= self.len, "write past the segment's end");
        // SAFETY: the segment is attached writable for `len` bytes at `addr` (checked
        // above) and `data` is a separate live buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), (self.addr as *mut u8).add(at), data.len())
        };
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        // SAFETY: `addr` is this value's own attachment, not used after this.
        unsafe { libc::shmdt(self.addr) };
    }
}

/// Reads `buf.len()` bytes at `at` from `fd` (short only at the end of the file).
pub fn pread_full(fd: &OwnedFd, buf: &mut [u8], at: u64) -> Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: the pointer and length describe the unfilled rest of `buf`.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf[got..].as_mut_ptr().cast(),
                buf.len() - got,
                (at + got as u64) as libc::off_t,
            )
        };
        match n {
            0 => break,
            n if n < 0 => {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err("reading a System V shm segment"));
            }
            n => got += n as usize,
        }
    }
    Ok(got)
}

/// The values of the `nsems` semaphores of set `id` (`GETALL`).
pub fn sem_values(id: i32, nsems: usize) -> Result<Vec<u16>> {
    let mut v = vec![0u16; nsems];
    // SAFETY: GETALL writes `nsems` shorts to the array passed as the semun pointer,
    // which `v` holds.
    let r = unsafe { libc::syscall(libc::SYS_semctl, id, 0, libc::GETALL, v.as_mut_ptr()) };
    if r < 0 {
        return Err(err(format!(
            "semctl(GETALL) of System V semaphore set {id}"
        )));
    }
    Ok(v)
}

/// Sets every semaphore of set `id` (`SETALL`).
pub fn sem_set_values(id: i32, values: &[u16]) -> Result<()> {
    // SAFETY: SETALL reads as many shorts as the set has semaphores (`values.len()`, it
    // was created with that many) from the array passed as the semun pointer.
    let r = unsafe { libc::syscall(libc::SYS_semctl, id, 0, libc::SETALL, values.as_ptr()) };
    if r < 0 {
        return Err(err(format!(
            "semctl(SETALL) of System V semaphore set {id}"
        )));
    }
    Ok(())
}

/// Copies of the `count` messages of queue `id`, in queue order, leaving them queued
/// (`MSG_COPY`). `max` is the namespace's `msgmax`.
pub fn msg_copy_all(id: i32, count: usize, max: usize) -> Result<Vec<IpcMessage>> {
    let mut buf = vec![0u64; (8 + max).div_ceil(8)];
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        // SAFETY: `buf` holds a `long mtype` and `max` bytes of text, as the size passed
        // says; the kernel writes at most that.
        let n = unsafe {
            libc::syscall(
                libc::SYS_msgrcv,
                id,
                buf.as_mut_ptr(),
                max,
                i as libc::c_long,
                libc::IPC_NOWAIT | MSG_COPY,
            )
        };
        if n < 0 {
            return Err(err(format!(
                "copying message {i} of System V message queue {id} (msgrcv MSG_COPY)"
            )));
        }
        let bytes: &[u8] = bytes_of(&buf);
        out.push(IpcMessage {
            mtype: buf[0] as i64,
            data: bytes[8..8 + n as usize].to_vec(),
        });
    }
    Ok(out)
}

fn bytes_mut(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: any bytes are valid u64 bits and the reverse; the slice covers exactly the
    // words' memory and borrows them mutably for its lifetime.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), words.len() * 8) }
}

fn bytes_of(words: &[u64]) -> &[u8] {
    // SAFETY: any initialised u64s are valid bytes; the slice covers exactly their
    // memory and borrows `words` for its lifetime.
    unsafe { std::slice::from_raw_parts(words.as_ptr().cast(), words.len() * 8) }
}

/// Queues one message on queue `id` (never blocking: the queue was sized to hold them).
pub fn msg_send(id: i32, m: &IpcMessage) -> Result<()> {
    let mut buf = vec![0u8; 8 + m.data.len()];
    buf[..8].copy_from_slice(&m.mtype.to_ne_bytes());
    buf[8..].copy_from_slice(&m.data);
    // SAFETY: `buf` holds a `long mtype` followed by `data.len()` bytes of text.
    let r = unsafe {
        libc::syscall(
            libc::SYS_msgsnd,
            id,
            buf.as_ptr(),
            m.data.len(),
            libc::IPC_NOWAIT,
        )
    };
    if r < 0 {
        return Err(err(format!("msgsnd to System V message queue {id}")));
    }
    Ok(())
}

/// Makes the next object of `kind` created in this thread's ipc namespace get `id`.
pub fn set_next_id(kind: Kind, id: i32) -> Result<()> {
    let path = format!("/proc/sys/kernel/{}_next_id", kind.name());
    std::fs::write(&path, id.to_string()).with_context(|| format!("writing {id} to {path}"))
}

/// Creates an object of `kind` with exactly `perm.id` and `perm.key` (`size`: bytes of a
/// segment, semaphores of a set), created by `perm.cuid`/`perm.cgid` (see
/// [`as_creator`]), then gives it `perm`'s owner and mode.
pub fn create(kind: Kind, perm: &IpcPerm, size: u64) -> Result<i32> {
    set_next_id(kind, perm.id)?;
    let flags = libc::IPC_CREAT | libc::IPC_EXCL | 0o600;
    let what = format!(
        "System V {} id {} key {:#x}",
        kind.name(),
        perm.id,
        perm.key
    );
    let got = as_creator(perm.cuid, perm.cgid, || {
        // SAFETY: integer arguments only.
        let got = unsafe {
            match kind {
                Kind::Shm => libc::shmget(perm.key, size as usize, flags),
                Kind::Sem => libc::semget(perm.key, size as i32, flags),
                Kind::Msg => libc::msgget(perm.key, flags),
            }
        };
        if got < 0 {
            return Err(err(format!("creating {what}")));
        }
        Ok(got)
    })?;
    if got != perm.id {
        bail!("creating {what}: the kernel gave id {got}");
    }
    set_perm(kind, got, perm, None).with_context(|| format!("setting owner and mode of {what}"))?;
    Ok(got)
}

/// Runs `f` with this thread's effective uid and gid set to `uid`, `gid` (raw
/// syscalls: glibc's wrappers would change every thread of the process), then switches
/// back: a System V object's creator is the effective ids of the thread that creates
/// it. Call it on a thread of its own (see `sys::ns::run_in`).
pub fn as_creator<T>(uid: u32, gid: u32, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let (euid, egid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    if (uid, gid) == (euid, egid) {
        return f();
    }
    let set = |nr: libc::c_long, id: u32, what: &str| -> Result<()> {
        // SAFETY: setresuid/setresgid take integers only (-1 leaves an id as it is); as
        // raw syscalls they change the calling thread's credentials alone.
        if unsafe { libc::syscall(nr, -1i64, id as i64, -1i64) } != 0 {
            return Err(err(format!(
                "switching this thread's effective {what} to {id}"
            )));
        }
        Ok(())
    };
    set(libc::SYS_setresgid, gid, "gid")?;
    if let Err(e) = set(libc::SYS_setresuid, uid, "uid") {
        set(libc::SYS_setresgid, egid, "gid")?;
        return Err(e);
    }
    let r = f();
    // Back: the saved uid is still ours, and with uid 0 the permitted capabilities come
    // back into the effective set.
    set(libc::SYS_setresuid, euid, "uid")?;
    set(libc::SYS_setresgid, egid, "gid")?;
    r
}

/// `IPC_STAT`, then `IPC_SET` with `perm`'s uid, gid and mode (and for a queue its
/// `msg_qbytes`).
pub fn set_perm(kind: Kind, id: i32, perm: &IpcPerm, qbytes: Option<u64>) -> Result<()> {
    let mut ds = [0u64; DS_WORDS];
    ctl(kind, id, libc::IPC_STAT, &mut ds)?;
    {
        let bytes = bytes_mut(&mut ds);
        bytes[PERM_UID..PERM_UID + 4].copy_from_slice(&perm.uid.to_ne_bytes());
        bytes[PERM_GID..PERM_GID + 4].copy_from_slice(&perm.gid.to_ne_bytes());
        bytes[PERM_MODE..PERM_MODE + 4].copy_from_slice(&(perm.mode & 0o777).to_ne_bytes());
        if let Some(q) = qbytes {
            bytes[MSQ_QBYTES..MSQ_QBYTES + 8].copy_from_slice(&q.to_ne_bytes());
        }
    }
    ctl(kind, id, libc::IPC_SET, &mut ds)
}

fn ctl(kind: Kind, id: i32, cmd: i32, ds: &mut [u64; DS_WORDS]) -> Result<()> {
    // SAFETY: `ds` is larger than any `*id64_ds` the kernel reads or writes for these
    // commands; for semctl the pointer is the semun argument, as the kernel expects.
    let r = unsafe {
        match kind {
            Kind::Sem => libc::syscall(kind.ctl(), id, 0, cmd, ds.as_mut_ptr()),
            _ => libc::syscall(kind.ctl(), id, cmd, ds.as_mut_ptr()),
        }
    };
    if r < 0 {
        return Err(err(format!("{}ctl({cmd}) of id {id}", kind.name())));
    }
    Ok(())
}

/// `msg_qbytes` of queue `id`: the most bytes it holds.
pub fn msg_qbytes(id: i32) -> Result<u64> {
    let mut ds = [0u64; DS_WORDS];
    ctl(Kind::Msg, id, libc::IPC_STAT, &mut ds)?;
    Ok(ds[MSQ_QBYTES / 8])
}

/// Locks segment `id` in memory (`SHM_LOCK`).
pub fn shm_lock(id: i32) -> Result<()> {
    // SAFETY: integer arguments only; SHM_LOCK passes no buffer.
    if unsafe { libc::syscall(libc::SYS_shmctl, id, libc::SHM_LOCK, 0usize) } < 0 {
        return Err(err(format!("SHM_LOCK of System V shm {id}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::ns::run_unshared;

    #[test]
    fn parses_proc_sysvipc() {
        let shm = "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap\n\
                   \x20     4660      32769   640                  8192   100     0      0  1000   100     0     0          0          0 1733400000                  4096                     0\n";
        let l = parse_list(shm, Kind::Shm).unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(
            l[0].perm,
            IpcPerm {
                key: 4660,
                id: 32769,
                uid: 1000,
                gid: 100,
                cuid: 0,
                cgid: 0,
                mode: 0o640
            }
        );
        assert_eq!(l[0].field("size"), 8192);
        let msg = "       key      msqid perms      cbytes       qnum lspid lrpid   uid   gid  cuid  cgid      stime      rtime      ctime\n\
                   \x20       -1          5   600          10          2     0     0     0     0     0     0          0          0 1\n";
        let l = parse_list(msg, Kind::Msg).unwrap();
        assert_eq!(
            (l[0].perm.key, l[0].perm.id, l[0].field("qnum")),
            (-1, 5, 2)
        );
        assert!(parse_list("", Kind::Sem).is_err());
    }

    /// Objects created at chosen ids in a new ipc namespace read back as created, and
    /// reading them consumes nothing.
    #[test]
    fn create_at_ids_and_read_back() {
        run_unshared(libc::CLONE_NEWIPC, || {
            let perm = |key, id, mode| IpcPerm {
                key,
                id,
                uid: 1234,
                gid: 99,
                cuid: 0,
                cgid: 0,
                mode,
            };
            let shm = create(Kind::Shm, &perm(0x51, 3 * 32768 + 7, 0o640), 3 * 4096)?;
            let mut a = Attached::new(shm, 3 * 4096, true)?;
            a.write(4096 + 5, b"hello");
            drop(a);
            let sem = create(Kind::Sem, &perm(0, 65540, 0o600), 3)?;
            sem_set_values(sem, &[1, 0, 42])?;
            let msg = create(Kind::Msg, &perm(0x77, 12, 0o620), 0)?;
            set_perm(Kind::Msg, msg, &perm(0x77, 12, 0o620), Some(4000))?;
            let m1 = IpcMessage {
                mtype: 3,
                data: b"one".to_vec(),
            };
            let m2 = IpcMessage {
                mtype: 1,
                data: vec![],
            };
            msg_send(msg, &m1)?;
            msg_send(msg, &m2)?;

            let shms = list(Kind::Shm)?;
            assert_eq!(shms.len(), 1);
            assert_eq!((shms[0].perm.cuid, shms[0].perm.cgid), (0, 0));
            assert_eq!(shms[0].perm.id, 3 * 32768 + 7);
            assert_eq!((shms[0].perm.uid, shms[0].perm.gid), (1234, 99));
            assert_eq!(shms[0].perm.mode & 0o777, 0o640);
            let a = Attached::new(shm, 3 * 4096, false)?;
            let f = a.file()?;
            let mut page = vec![0u8; 4096];
            assert_eq!(pread_full(&f, &mut page, 4096)?, 4096);
            assert_eq!(&page[5..10], b"hello");
            assert_eq!(sem_values(sem, 3)?, vec![1, 0, 42]);
            assert_eq!(list(Kind::Sem)?[0].perm.id, 65540);
            let other = IpcPerm {
                cuid: 1000,
                cgid: 1001,
                ..perm(0x52, 40, 0o600)
            };
            create(Kind::Shm, &other, 4096)?;
            let l = list(Kind::Shm)?;
            let s2 = l
                .iter()
                .find(|s| s.perm.id == 40)
                .expect("the second segment");
            assert_eq!((s2.perm.cuid, s2.perm.cgid), (1000, 1001));
            assert_eq!(nix::unistd::geteuid().as_raw(), 0, "still root afterwards");
            let q = &list(Kind::Msg)?[0];
            assert_eq!((q.perm.key, q.perm.id, q.field("qnum")), (0x77, 12, 2));
            assert_eq!(msg_copy_all(msg, 2, 8192)?, vec![m1.clone(), m2.clone()]);
            assert_eq!(list(Kind::Msg)?[0].field("qnum"), 2, "MSG_COPY consumed");
            assert_eq!(msg_qbytes(msg)?, 4000);
            // Taken ids are refused, not moved.
            assert!(create(Kind::Msg, &perm(0x78, 12, 0o600), 0).is_err());
            Ok(())
        })
        .unwrap();
    }
}
