//! The snapshot model: everything a restore needs to rebuild a process tree.
//!
//! These types are the contract between `dump` (which fills them), the store (which
//! encodes them, see `format`) and `restore` (which reads them). Page contents are not
//! here: a VMA names its populated pages as runs over the snapshot's page table, a
//! compact array of fixed-size records stored beside the manifest (see `store`), so that
//! decoding a manifest costs time proportional to the number of VMAs, not pages.

use serde::{Deserialize, Serialize};

pub const PAGE_SIZE: usize = 4096;

/// One snapshot: a frozen process tree plus the host facts it depends on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Seconds since the epoch when the dump finished.
    pub created_unix: u64,
    /// The command line that was recorded (empty for `dump -t`).
    pub command: Vec<String>,
    /// How the warm point was chosen (`stdin`, `dump`, ...), for `inspect`.
    pub trigger: String,
    pub host: HostFacts,
    /// The tree's monotonic and boot-time clocks at the dump: a restore runs the tree in
    /// a time namespace whose offsets make them go on from here.
    pub clocks: Clocks,
    /// Processes, parents before children. The first is the root of the tree.
    /// `Fd::ofd` ids are unique across the whole tree: the same id in two processes is
    /// one open file description they share (inherited over fork, or passed).
    pub processes: Vec<Process>,
    /// Pipes referenced by `FileDesc::Pipe` and `FileDesc::Fifo`, with the bytes that were buffered in them.
    pub pipes: Vec<PipeObject>,
    /// Connected unix socket pairs referenced by `FileDesc::UnixPair`, with their queues.
    pub unix_pairs: Vec<UnixPairObject>,
    /// flock, POSIX and OFD locks held by the processes on their files.
    pub file_locks: Vec<FileLock>,
    /// Number of records in the page table that `PageRun::first` indexes.
    pub page_count: u64,
    /// blake3 over the concatenated page hashes of the page table, in table order (filled
    /// by `SnapshotWriter::commit`). The snapshot id (blake3 of the encoded manifest) thus
    /// covers the page contents but not where the store keeps them.
    pub pages_hash: [u8; 32],
    /// Deleted files and memfds that are mapped (`VmaKind::SharedFile`), each one object
    /// shared by every mapping and fd of it (`FileDesc::SharedFile`).
    pub shared_files: Vec<SharedFile>,
    /// `Some` when the tree ran with a private `/tmp` (`record` without `--share-tmp`):
    /// what was in it at the warm point, parents before children. Every instance gets a
    /// fresh tmpfs on `/tmp` holding exactly this.
    pub private_tmp: Option<Vec<TmpEntry>>,
    /// Recorded with `record --tool`: a command-line tool waiting at its entry point for
    /// the arguments, working directory and environment of each run.
    pub tool: Option<ToolInfo>,
    /// Listening unix sockets with connections not accepted yet: each listener's queue,
    /// in accept order. A restore connects a client end to the listener for each, in
    /// this order, and sends what the client had sent.
    pub unix_queues: Vec<UnixQueue>,
    /// `dump --manage-cgroups`: the tree's cgroups (`None`: not recorded, and a restore
    /// leaves the processes where the restorer is).
    pub cgroups: Option<Cgroups>,
    /// The uts, ipc and net namespaces the tree had of its own (not the dumper's): a
    /// restore creates new ones holding this state. `None` for each it shared with the
    /// host, where a restore leaves it.
    pub namespaces: Namespaces,
}

/// Namespaces of the tree's own, with what a restore puts in them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Namespaces {
    pub uts: Option<UtsNs>,
    pub ipc: Option<IpcNs>,
    pub net: Option<NetNs>,
}

impl Namespaces {
    /// `CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNET` for those the tree had of its own.
    pub fn clone_flags(&self) -> u64 {
        (if self.uts.is_some() {
            libc::CLONE_NEWUTS as u64
        } else {
            0
        }) | (if self.ipc.is_some() {
            libc::CLONE_NEWIPC as u64
        } else {
            0
        }) | (if self.net.is_some() {
            libc::CLONE_NEWNET as u64
        } else {
            0
        })
    }

    pub fn any(&self) -> bool {
        self.clone_flags() != 0
    }
}

/// A uts namespace: `uname -n` and the NIS domain name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UtsNs {
    pub hostname: String,
    pub domainname: String,
}

/// An ipc namespace: its System V objects (restored at their exact ids) and its limits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcNs {
    /// The namespace's `/proc/sys/kernel` settings (`shmmax`, `msgmnb`, `sem`, ...,
    /// and `{shm,sem,msg}_next_id` when set), by file name, as read.
    pub sysctls: Vec<(String, String)>,
    pub shm: Vec<ShmSegment>,
    pub sem: Vec<SemSet>,
    pub msg: Vec<MsgQueue>,
}

/// What `ipcs` shows of every System V object: key, id, owner, creator and mode.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcPerm {
    pub key: i32,
    pub id: i32,
    pub uid: u32,
    pub gid: u32,
    pub cuid: u32,
    pub cgid: u32,
    /// Permission bits (and `SHM_LOCKED` for a segment).
    pub mode: u32,
}

/// A System V shared memory segment (not attached by any process: attached ones are
/// refused at dump). Its contents go through the page table like memory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmSegment {
    pub perm: IpcPerm,
    pub size: u64,
    /// Populated pages of the contents, page index from offset 0.
    pub pages: Vec<PageRun>,
}

/// A System V semaphore set and the value of each semaphore.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SemSet {
    pub perm: IpcPerm,
    pub values: Vec<u16>,
}

/// A System V message queue, its limit and its messages in queue order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsgQueue {
    pub perm: IpcPerm,
    /// `msg_qbytes`: the most bytes the queue holds.
    pub qbytes: u64,
    pub messages: Vec<IpcMessage>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpcMessage {
    pub mtype: i64,
    pub data: Vec<u8>,
}

/// A network namespace with no interface but the loopback (others are refused at dump).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetNs {
    /// `lo` is up (`IFF_UP`).
    pub lo_up: bool,
    pub lo_mtu: u32,
    /// Addresses on `lo`, those the kernel adds when it comes up included.
    pub addrs: Vec<NetAddr>,
    /// Routes through `lo` that the kernel does not add by itself (any protocol but
    /// `kernel`), in every table.
    pub routes: Vec<NetRoute>,
    /// The namespace's sysctls (`/proc/sys/net`, as paths: `net/ipv4/tcp_syncookies`)
    /// whose values differ from a new namespace's, with their values, in the order a
    /// restore writes them.
    pub sysctls: Vec<(String, String)>,
    /// The namespace's veth interfaces (their peers elsewhere), recreated by a restore
    /// with a new peer.
    pub veths: Vec<NetVeth>,
}

/// A veth interface of a namespace of the tree's own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetVeth {
    /// Its interface index (kept: sockets and routes name interfaces by index).
    pub index: i32,
    pub name: String,
    pub mtu: u32,
    /// Its MAC address.
    pub mac: Vec<u8>,
    pub up: bool,
    /// Its addresses, but for those the kernel made itself (IPv6 link-local ones).
    pub addrs: Vec<NetAddr>,
    /// Its peer's name when the peer was in the dumper's namespace (where a restore
    /// creates the new peer by default), else empty.
    pub peer: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetAddr {
    /// `AF_INET` or `AF_INET6`.
    pub family: u8,
    pub prefix_len: u8,
    /// `IFA_F_*` flags.
    pub flags: u32,
    pub scope: u8,
    /// 4 or 16 bytes.
    pub addr: Vec<u8>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRoute {
    pub family: u8,
    pub dst_len: u8,
    pub table: u32,
    pub protocol: u8,
    pub scope: u8,
    /// `RTN_*`.
    pub kind: u8,
    /// The index of the interface it goes through (`RTA_OIF`: `lo`, or a veth, which a
    /// restore recreates at its index); none for a route with no device (unreachable,
    /// blackhole).
    pub oif: Option<i32>,
    /// Empty for a default route.
    pub dst: Vec<u8>,
    pub gateway: Option<Vec<u8>>,
    pub prefsrc: Option<Vec<u8>>,
    pub priority: Option<u32>,
}

/// Where the tree's processes were in each cgroup hierarchy, and the settings of the
/// cgroups the tree owned: those strictly below the dumper's own cgroup whose processes,
/// their descendants' included, were all the tree's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cgroups {
    pub hierarchies: Vec<CgroupHierarchy>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupHierarchy {
    /// The hierarchy as `/proc/PID/cgroup` names it: `""` for cgroup v2, the controllers
    /// of a v1 hierarchy (`memory`, `cpu,cpuacct`, `name=systemd`).
    pub key: String,
    /// The dumper's own cgroup in it (absolute): owned cgroups are below it.
    pub base: String,
    /// The cgroups the tree owned, relative to `base` (`a/b`), parents before children.
    pub owned: Vec<OwnedCgroup>,
    /// Per process of `Manifest::processes`, in that order: its cgroup (absolute path).
    pub members: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnedCgroup {
    /// Relative to the hierarchy's `base`, without a leading `/`.
    pub path: String,
    /// cgroup v2: the controllers enabled in it (its `cgroup.controllers`), which its
    /// parent's `cgroup.subtree_control` must enable at restore.
    pub controllers: Vec<String>,
    /// (file, value as read), in the order a restore writes them
    /// (`cgroup.subtree_control` first).
    pub settings: Vec<(String, String)>,
}

/// A file that is mapped but has no name any more: a deleted file (POSIX semaphores and
/// shared memory in `/dev/shm` after `sem_unlink` / `shm_unlink`, `tmpfile`-style
/// scratch files) or a memfd. Its contents are stored in the page table like memory;
/// a restore creates the file once per instance, and every mapping and open of it in
/// the tree shares that one file again.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedFile {
    /// Unique in the manifest (an index, not the inode: inodes of different
    /// filesystems may be equal).
    pub id: u64,
    /// The file's last name, without ` (deleted)`: `/dev/shm/sem.NAME`, or for a memfd
    /// `/memfd:NAME`.
    pub path: String,
    pub memfd: bool,
    /// `F_GET_SEALS` of a memfd.
    pub seals: i32,
    pub owner: FileOwner,
    pub size: u64,
    /// Populated pages of the contents, page index from offset 0.
    pub pages: Vec<PageRun>,
}

/// One entry of a private `/tmp`, `path` relative to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TmpEntry {
    pub path: String,
    pub owner: FileOwner,
    pub mtime_ns: i128,
    pub kind: TmpKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TmpKind {
    Dir,
    Symlink {
        target: String,
    },
    /// A regular file of `size` bytes: small ones inline, larger ones as runs over the
    /// page table (deduplicated like memory; `page` counts from the file's start).
    File {
        size: u64,
        inline: Vec<u8>,
        pages: Vec<PageRun>,
    },
    /// A named FIFO (made again empty: what an fd of the tree had buffered in it comes
    /// back with that fd).
    Fifo,
}

/// `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME` as the dumped tree saw them (its own time
/// namespace's offsets included), in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clocks {
    pub monotonic_ns: i64,
    pub boottime_ns: i64,
}

/// Facts about the dumping host that a restored process silently depends on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    pub kernel_release: String,
    /// blake3 of the `[vdso]` bytes: restored code calls into the live vdso by address.
    pub vdso_hash: [u8; 32],
    /// XCR0: the xsave features enabled, i.e. the layout of the saved xsave blobs.
    pub xsave_features: u64,
    /// Size of the xsave area (`NT_X86_XSTATE` length).
    pub xsave_size: u32,
    /// The `[vdso]` image itself (its blake3 is `vdso_hash`): what a restore on a host
    /// whose vdso differs compares its own with, export by export.
    pub vdso_image: Vec<u8>,
    /// The CPU features the app could see through CPUID (names as in
    /// `/proc/cpuinfo`'s flags, those warmstart knows): glibc's and JITs' code choices
    /// rest on them, so a restoring CPU must have every one.
    pub cpu_features: Vec<String>,
    /// Where each xsave component of XCR0 above SSE sits in the saved xsave images
    /// (standard format): `(component, offset, size)`, as CPUID leaf 0xD says.
    pub xsave_layout: Vec<(u8, u32, u32)>,
    /// `record --cpu-baseline`: the x86-64 level (`x86-64-v3`, ...) CPUID showed the app
    /// while it started and warmed up; `cpu_features` is what that level let it see.
    pub cpu_baseline: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    /// Pid in the process's own (innermost) pid namespace.
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
    pub comm: String,
    pub exe: FileIdentity,
    pub creds: Creds,
    pub rlimits: Vec<Rlimit>,
    pub cwd: String,
    pub root: String,
    pub umask: u32,
    pub personality: u32,
    pub no_new_privs: bool,
    pub dumpable: i32,
    pub mm: MmFields,
    /// Raw auxv words (pairs of key, value, ending with AT_NULL).
    pub auxv: Vec<u64>,
    pub vmas: Vec<Vma>,
    pub fds: Vec<Fd>,
    /// `rt_sigaction` state for signals 1..=64 (index 0 is signal 1).
    pub sigactions: Vec<SigAction>,
    /// Signals pending for the whole process (shared queue).
    pub shared_pending: Vec<SigInfo>,
    pub threads: Vec<Thread>,
    /// `ITIMER_REAL`, `ITIMER_VIRTUAL`, `ITIMER_PROF`.
    pub itimers: [Itimer; 3],
    pub posix_timers: Vec<PosixTimer>,
    /// The app's seccomp filters, oldest first, each a raw `struct sock_filter` array
    /// (warmstart's own warm-point trap is never among them).
    pub seccomp_filters: Vec<Vec<u8>>,
    /// Files of the instance-private directories (e.g. the JVM's hsperfdata) that the
    /// process maps or holds open: recreated in each instance's own copy of the directory.
    pub private_files: Vec<PrivateFile>,
    /// `Some(raw wait status)` for a zombie (a child that exited and was not reaped yet,
    /// `/proc/PID/stat` field 52): only its ids are meaningful. Restored as a child that
    /// exits with this status, so its parent's `wait` gets the same answer.
    pub zombie: Option<i32>,
    /// A zombie's signal mask (`SigBlk`); its `sigactions` say only which signals it
    /// ignored (`SIG_IGN`) or caught (a handler address that is never called). What
    /// `/proc` shows of a zombie besides its ids and exit status.
    pub zombie_sigmask: u64,
    /// Slots of the fd table (`FDSize` in `/proc/PID/status`): the kernel grows a table
    /// and never shrinks it, so it shows the most fds the process ever had.
    pub fd_table_size: u32,
    /// The controlling terminal, when it is a pty of the app's own (its master is held
    /// by a process of the tree): the pty's index. `None`: no controlling terminal, or
    /// one from outside (a shell's terminal, see `--shell-job`).
    pub ctty: Option<u32>,
    /// `PR_SET_CHILD_SUBREAPER`: orphaned descendants are reparented to it.
    pub child_subreaper: bool,
    /// `PR_SET_THP_DISABLE`.
    pub thp_disable: bool,
    /// `/proc/PID/oom_score_adj`.
    pub oom_score_adj: i32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrivateFile {
    pub path: String,
    pub mode: u32,
    pub data: Vec<u8>,
}

/// An interval timer: (interval, remaining value), each in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Itimer {
    pub interval_us: u64,
    pub value_us: u64,
}

/// A POSIX timer (`timer_create`), restored with its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PosixTimer {
    pub id: i32,
    pub clock: i32,
    pub signo: i32,
    pub sigval: u64,
    /// `SIGEV_SIGNAL`, `SIGEV_NONE`, `SIGEV_THREAD_ID` (4) ...
    pub notify: i32,
    /// Target thread (own pid namespace) for `SIGEV_THREAD_ID`.
    pub notify_tid: i32,
    pub interval_ns: u64,
    /// Time left until expiry; 0 when disarmed.
    pub value_ns: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Creds {
    pub uid: [u32; 4],
    pub gid: [u32; 4],
    pub groups: Vec<u32>,
    pub cap_inheritable: u64,
    pub cap_permitted: u64,
    pub cap_effective: u64,
    pub cap_bounding: u64,
    pub cap_ambient: u64,
    /// `prctl(PR_GET_SECUREBITS)` (e.g. `SECBIT_KEEP_CAPS`).
    pub securebits: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    pub resource: u32,
    pub cur: u64,
    pub max: u64,
}

/// The `prctl(PR_SET_MM_MAP)` fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmFields {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

/// A tool recorded at its entry point (`record --tool`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolInfo {
    /// The runtime whose launcher holds it (`python`).
    pub runtime: String,
    /// The command as given to `record`, after `--` (for re-recording).
    pub command: Vec<String>,
    /// The `--prime-args` of the record (for re-recording).
    pub prime_args: Vec<String>,
    /// The command that runs the tool cold, before its arguments (e.g. `python3 -m
    /// black`): a stale snapshot's run uses it.
    pub cold_prefix: Vec<String>,
    /// `argv[0]` the tool sees, as a cold start would set it.
    pub argv0: String,
    /// Every file the tool loaded while it warmed up (its modules, the interpreter's),
    /// with what identifies it: a run after any of them changed never runs the old code.
    pub files: Vec<FileIdentity>,
    /// The environment variables the runtime reads at its start (locale, time zone, its
    /// own options and search paths) as the record had them, sorted: a run with other
    /// values runs the tool cold.
    pub startup_env: Vec<(String, String)>,
}

/// What a file looked like at dump time; a restore refuses a file that no longer matches.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub path: String,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub mode: u32,
    /// blake3 of the contents at the dump, for a file the process reads or maps (`None`
    /// for one it only writes, or one that could not be read): a restore compares it
    /// only when size, mtime or inode differ, so a file put back by copying is accepted.
    pub hash: Option<[u8; 32]>,
    /// Birth time (statx `btime`) where the filesystem keeps one: tells a file replaced
    /// by another that got the same (reused) inode number.
    pub btime_ns: Option<i128>,
}

impl FileIdentity {
    /// Whether an fd with these status flags only writes its file (a log: it may grow
    /// between dump and restore; its bytes are not hashed).
    pub fn write_only(flags: i32) -> bool {
        flags & libc::O_ACCMODE == libc::O_WRONLY
    }

    /// The content hash of a file ([`FileIdentity::hash`]): blake3 of everything `r`
    /// reads. Taken at the dump, compared at the restore.
    pub fn hash_of(mut r: impl std::io::Read) -> std::io::Result<[u8; 32]> {
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            hasher.update(&buf[..n]);
        }
        Ok(*hasher.finalize().as_bytes())
    }
}

pub const PROT_READ: u8 = 1;
pub const PROT_WRITE: u8 = 2;
pub const PROT_EXEC: u8 = 4;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// `PROT_*` bits as above.
    pub prot: u8,
    pub shared: bool,
    /// `VM_*` flags from smaps that a restore re-applies (growsdown, dontfork, ...).
    pub flags: VmaFlags,
    pub kind: VmaKind,
    /// File offset in bytes (0 for anonymous memory).
    pub offset: u64,
    /// Populated pages whose contents are in the snapshot, in address order.
    pub pages: Vec<PageRun>,
}

impl Vma {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
    pub fn page_count(&self) -> u64 {
        self.len() / PAGE_SIZE as u64
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmaFlags {
    pub growsdown: bool,
    pub dontfork: bool,
    pub dontdump: bool,
    pub wipeonfork: bool,
    pub locked: bool,
    pub hugepage: bool,
    pub nohugepage: bool,
    pub mergeable: bool,
    /// `MADV_SEQUENTIAL` (smaps `sr`) and `MADV_RANDOM` (`rr`).
    pub sequential: bool,
    pub random: bool,
    /// `MAP_NORESERVE` (`nr`): no swap space reserved.
    pub noreserve: bool,
    /// `mlock2(MLOCK_ONFAULT)` (`lf`): locked as pages fault in.
    pub lockonfault: bool,
    /// `VM_ACCOUNT` (smaps `ac`): the area was writable once. It keeps an area that is
    /// read-only now from merging with a neighbour that never was.
    pub accounted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmaKind {
    /// Private or shared anonymous memory (`[heap]`, `[stack]` and unnamed areas included).
    Anon {
        name: String,
    },
    /// Shared anonymous memory (`MAP_SHARED | MAP_ANONYMOUS`, shown as `/dev/zero
    /// (deleted)`): one shmem object, identified by its inode at dump time, that every
    /// process mapping it shares (`Vma::offset` is the offset into the object). Restored
    /// as one object mapped in each of them.
    Shmem {
        id: u64,
    },
    /// A mapping of a regular file.
    File {
        file: FileIdentity,
    },
    /// The kernel's vdso and its data pages, moved (never copied) at restore.
    Vdso,
    Vvar,
    VvarVclock,
    Vsyscall,
    /// A mapping (shared or private; `Vma::offset` into the file) of
    /// `Manifest::shared_files[id]`. Its `pages` are, for a private mapping, the pages no
    /// longer the file's; a shared mapping has none (the object holds them).
    SharedFile {
        id: u64,
    },
    /// An attach (`shmat`) of System V shared memory segment `shmid` of the tree's own
    /// ipc namespace, whose contents are the segment's (`IpcNs::shm`): attached again at
    /// its address by the restore, and given each VMA's protection (an attach split by
    /// `mprotect` is several VMAs, `Vma::offset` into the segment). `writable`: attached
    /// read-write (smaps `mw`), whatever its protection is now.
    SysvShm {
        shmid: i32,
        writable: bool,
    },
}

/// Appends `new` runs (in page order, after those of `runs`) to `runs`, joining runs that
/// continue each other (pages and, for data, records) as the store's writer does.
pub fn append_runs(runs: &mut Vec<PageRun>, new: &[PageRun]) {
    for r in new {
        if let Some(last) = runs.last_mut() {
            if last.page + last.count == r.page {
                let merge = match (last.content, r.content) {
                    (RunContent::Zero, RunContent::Zero) => true,
                    (RunContent::Data { first: a }, RunContent::Data { first: b }) => {
                        a + last.count == b
                    }
                    _ => false,
                };
                if merge {
                    last.count += r.count;
                    continue;
                }
            }
        }
        runs.push(*r);
    }
}

/// A run of consecutive populated pages of a VMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    /// Page index from the start of the VMA.
    pub page: u64,
    pub count: u64,
    pub content: RunContent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunContent {
    /// Present pages that are all zero: never stored, restored by touching nothing
    /// (anonymous memory reads as zero) unless the VMA is file-backed.
    Zero,
    /// Page-table records `first .. first + count`.
    Data { first: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fd {
    pub fd: i32,
    pub cloexec: bool,
    /// Fds with the same `ofd` share one open file description (a dup, or across
    /// processes an fd inherited over fork): ids are unique in the whole manifest.
    pub ofd: u32,
    pub file: FileDesc,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileDesc {
    Regular {
        file: FileIdentity,
        flags: i32,
        pos: i64,
    },
    /// A directory, at its read position (`getdents` continues from there: a cookie of
    /// the filesystem's).
    Directory { path: String, flags: i32, pos: i64 },
    /// A character device reopened by path (`/dev/null`, `/dev/zero`, `/dev/urandom`, ...).
    CharDev {
        path: String,
        rdev: u64,
        flags: i32,
        pos: i64,
    },
    /// One end of a pipe in `Manifest::pipes`.
    Pipe { pipe: u64, write: bool, flags: i32 },
    /// An open of a named FIFO at `path`: its pipe (buffered bytes, capacity) is
    /// `Manifest::pipes[fifo]`. Restored by opening the FIFO again and refilling it.
    Fifo { path: String, fifo: u64, flags: i32 },
    /// The launcher's stdin/stdout/stderr: at restore, the caller's fd `stdio` (0, 1 or 2).
    External { stdio: u8 },
    /// `eventfd`: its counter and whether it counts as a semaphore (`EFD_SEMAPHORE`).
    EventFd {
        count: u64,
        semaphore: bool,
        flags: i32,
    },
    /// `epoll_create`: its registrations, re-added once every target exists.
    Epoll {
        flags: i32,
        targets: Vec<EpollTarget>,
    },
    /// `timerfd_create`: times are what remained at dump; `ticks` expirations were not
    /// read yet. `settime_flags` are those it was last set with (`TFD_TIMER_ABSTIME`,
    /// `TFD_TIMER_CANCEL_ON_SET`): an absolute timer on a realtime clock keeps its
    /// deadline on the wall clock (`realtime_deadline_ns`, since the epoch), however long
    /// the snapshot waited; one on another clock is set absolute again from the time
    /// that remained (those clocks go on from the dump in a restored instance).
    TimerFd {
        clockid: i32,
        value_ns: u64,
        interval_ns: u64,
        ticks: u64,
        flags: i32,
        settime_flags: i32,
        realtime_deadline_ns: Option<u64>,
    },
    /// `signalfd`: the signals it reads (bit N-1 for signal N).
    SignalFd { mask: u64, flags: i32 },
    /// `memfd_create`: name (without the `memfd:` prefix), whole contents and seals.
    Memfd {
        name: String,
        data: Vec<u8>,
        owner: FileOwner,
        seals: i32,
        flags: i32,
        pos: i64,
    },
    /// A regular file deleted while open: its contents, recreated with `O_TMPFILE` in
    /// the directory of `path` (or `/tmp` when that is gone).
    Ghost {
        path: String,
        owner: FileOwner,
        data: Vec<u8>,
        flags: i32,
        pos: i64,
    },
    /// One end of a connected unix socket pair in `Manifest::unix_pairs`.
    UnixPair {
        pair: u64,
        /// 0 or 1: which end of the pair.
        end: u8,
        flags: i32,
    },
    /// A unix socket that is not connected: listening, bound, or neither.
    Unix {
        sock_type: i32,
        addr: UnixAddr,
        /// `Some(backlog)` for a listening socket.
        listen: Option<u32>,
        flags: i32,
    },
    /// A TCP or UDP socket that is listening, bound, unbound, or (UDP) connected.
    Inet {
        family: i32,
        sock_type: i32,
        protocol: i32,
        /// Local address (`ip:port`, `[ip6]:port`); port 0 when unbound.
        local: String,
        /// Peer address of a connected UDP socket.
        peer: Option<String>,
        /// `Some(backlog)` for a listening socket.
        listen: Option<u32>,
        options: SockOptions,
        flags: i32,
    },
    /// An established TCP connection dumped with `tcp_close`: restored as a socket whose
    /// peer has reset the connection (the app reads ECONNRESET, then EOF).
    TcpClosed {
        family: i32,
        local: String,
        peer: String,
        flags: i32,
    },
    /// A netlink socket (no multicast groups), bound to `port` (0: unbound / autobind).
    Netlink {
        protocol: i32,
        port: u32,
        flags: i32,
    },
    /// `inotify_init`: watches in wd order, each on a path resolved at dump.
    Inotify {
        flags: i32,
        watches: Vec<InotifyWatch>,
    },
    /// An open of `Manifest::shared_files[id]` (a deleted file or memfd that is also
    /// mapped): opened again from that one object.
    SharedFile { id: u64, flags: i32, pos: i64 },
    /// A TCP socket whose connection is over (state CLOSE) but still open in the app:
    /// restored as a connection that ended the same way. `reset`: an error is pending
    /// (the peer reset it; the app's next read fails with ECONNRESET, then EOF);
    /// otherwise it ended with FINs both ways (reads give EOF). Writes fail with EPIPE.
    TcpEnded {
        family: i32,
        reset: bool,
        flags: i32,
    },
    /// The client end of a unix connection still waiting in a listener's accept queue:
    /// `Manifest::unix_queues` has it (`UnixQueuedConn::id == conn`), and the restore
    /// creates it by connecting to that listener.
    UnixQueued { conn: u64, flags: i32 },
    /// The master of a pseudo-terminal the app opened itself (`/dev/ptmx` or
    /// `/dev/pts/ptmx`, `path`), with the state of the pair. A pty has one master open
    /// file description, so this is the pty's record; its slaves are [`FileDesc::PtySlave`].
    PtyMaster {
        path: String,
        flags: i32,
        pty: Box<Pty>,
    },
    /// An open of the slave `/dev/pts/INDEX` of a pty whose master the tree holds
    /// ([`FileDesc::PtyMaster`] with that index).
    PtySlave { index: u32, flags: i32 },
    /// An established TCP connection dumped with `tcp_established`: its state as
    /// `TCP_REPAIR` reads it, restored in repair mode so that the peer sees nothing.
    TcpEstablished(Box<TcpConnection>),
}

/// The state of an established TCP connection (`FileDesc::TcpEstablished`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpConnection {
    pub family: i32,
    /// Local and peer address (`ip:port`, `[ip6]:port`).
    pub local: String,
    pub peer: String,
    /// `TCP_QUEUE_SEQ` of the send queue: the sequence number after its last byte
    /// (`write_seq`); the queue starts at `send_seq - send_queue.len()` (`snd_una`).
    pub send_seq: u32,
    /// `TCP_QUEUE_SEQ` of the receive queue: the next byte expected (`rcv_nxt`).
    pub recv_seq: u32,
    /// Bytes written by the app and not acknowledged by the peer, sent or not, in order.
    pub send_queue: Vec<u8>,
    /// How many bytes at the end of `send_queue` were never sent (`SIOCOUTQNSD`).
    pub unsent: u32,
    /// Bytes received and not read by the app yet.
    pub recv_queue: Vec<u8>,
    /// Negotiated options: MSS clamp, window scales (0xff: not negotiated), SACK,
    /// timestamps, and the timestamp clock at the dump (`TCP_TIMESTAMP`).
    pub mss: u32,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    pub sack: bool,
    pub timestamps: bool,
    pub timestamp: u32,
    /// `TCP_REPAIR_WINDOW`: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup.
    pub window: [u32; 5],
    /// Socket options (`TCP_NODELAY`, `SO_KEEPALIVE`, `SO_REUSEADDR`, ...; the buffer
    /// sizes as they had grown, set at restore: they no longer grow after it).
    pub options: SockOptions,
    /// `TCP_KEEPIDLE`, `TCP_KEEPINTVL`, `TCP_KEEPCNT` (seconds, seconds, probes).
    pub keepalive: [i32; 3],
    /// `TCP_USER_TIMEOUT` in ms (0: the default).
    pub user_timeout: u32,
    pub flags: i32,
    /// The nftables table (family inet) the dump left holding this connection's
    /// packets, because the tree was killed: the restore removes it once the
    /// connection is back. `None` when the dumped tree went on running.
    pub lock: Option<String>,
    /// The TCP state (`TCP_ESTABLISHED` 1, or a half-closed one: `TCP_FIN_WAIT1` 4,
    /// `TCP_FIN_WAIT2` 5, `TCP_CLOSE_WAIT` 8, `TCP_LAST_ACK` 9, `TCP_CLOSING` 11). In a
    /// half-closed state `send_seq` and `recv_seq` leave out the FINs (each takes one
    /// sequence number): they are the ends of the data, as in ESTABLISHED.
    pub state: u8,
}

/// A pseudo-terminal pair of the app's own, as the dump found it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pty {
    /// `TIOCGPTN`: the N of `/dev/pts/N`.
    pub index: u32,
    /// The line settings (`TCGETS2`, the slave's: a master's termios calls act on it).
    pub termios: Termios,
    /// `TIOCGLCKTRMIOS`: the locked-bits mask of the settings.
    pub termios_locked: Termios,
    /// `TIOCGWINSZ`: rows, columns, x pixels, y pixels.
    pub winsize: [u16; 4],
    /// `TIOCGPKT`: packet mode of the master.
    pub packet_mode: bool,
    /// `TIOCGPTLCK`: the slave cannot be opened (no `unlockpt` yet, or locked again).
    pub locked: bool,
    /// `TIOCGEXCL` of the master and of the slave (`TIOCEXCL`: no further opens).
    pub master_exclusive: bool,
    pub slave_exclusive: bool,
    /// The session whose controlling terminal it is and its foreground process group
    /// (`TIOCGSID`, `TIOCGPGRP`; pids in the app's namespace), 0 when none.
    pub sid: i32,
    pub pgrp: i32,
    /// Owner and mode of the slave's inode (`/dev/pts/N`).
    pub slave_owner: FileOwner,
}

/// `struct termios2`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Termios {
    pub iflag: u32,
    pub oflag: u32,
    pub cflag: u32,
    pub lflag: u32,
    pub line: u8,
    /// `c_cc[NCCS]` (19 on Linux).
    pub cc: Vec<u8>,
    pub ispeed: u32,
    pub ospeed: u32,
}

/// Owner and permission bits of a file the restore creates anew (a deleted file, a
/// memfd): set explicitly, not left to the restorer's credentials and umask.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOwner {
    pub uid: u32,
    pub gid: u32,
    /// `st_mode & 0o7777`.
    pub mode: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpollTarget {
    /// The fd number the target was registered under.
    pub fd: i32,
    pub events: u32,
    pub data: u64,
    /// The fd of the process that holds the registered file now, when number `fd` no
    /// longer does (closed after the add, the file kept by a dup): restored by adding
    /// the file under number `fd` for a moment.
    pub via: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InotifyWatch {
    pub wd: i32,
    pub mask: u32,
    /// The watched path; for a deleted inode, the path it had (` (deleted)` stripped).
    pub path: String,
    /// The watched inode is deleted (still open): the fd of the same process that is
    /// open on it, through which the watch is added again.
    pub via_fd: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UnixAddr {
    Unnamed,
    Path(String),
    /// Abstract name, without the leading NUL.
    Abstract(Vec<u8>),
}

/// Socket options restored on an inet socket; buffer sizes are as `getsockopt` reports
/// them (the kernel doubles what `setsockopt` asks for), `None` when they were the default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SockOptions {
    pub reuseaddr: bool,
    pub reuseport: bool,
    pub keepalive: bool,
    pub nodelay: bool,
    pub v6only: bool,
    pub rcvbuf: Option<u32>,
    pub sndbuf: Option<u32>,
    /// Further options whose value differed from a new socket's: (level, name, the
    /// bytes `getsockopt` gave), set back as they are.
    pub more: Vec<(i32, i32, Vec<u8>)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixPairObject {
    /// Inode of end 0 at dump time; the key `FileDesc::UnixPair::pair` refers to.
    pub id: u64,
    pub sock_type: i32,
    /// Messages queued for each end to read (one element per datagram; one element for
    /// a stream's bytes).
    pub queued: [Vec<Vec<u8>>; 2],
    /// Each end's own shutdown state (`sk_shutdown`: 1 receive, 2 send), applied once the
    /// queues are refilled.
    pub shutdown: [u8; 2],
}

/// A listening unix socket (stream or seqpacket) with connections not accepted yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixQueue {
    /// The listener: fd `fd` of process `pid` (a `FileDesc::Unix` with `listen`).
    pub pid: i32,
    pub fd: i32,
    /// The connections in accept order.
    pub conns: Vec<UnixQueuedConn>,
}

/// One connection in a listener's accept queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixQueuedConn {
    /// Inode of the client end at dump, the key `FileDesc::UnixQueued::conn` refers to;
    /// 0 when the client has closed its end (the connection, its data and its EOF wait
    /// for `accept` all the same).
    pub id: u64,
    /// The client end's own name (usually unnamed).
    pub addr: UnixAddr,
    /// What the client sent that the server side has not read (one element per
    /// seqpacket message; one element for a stream's bytes).
    pub queued: Vec<Vec<u8>>,
    /// The client end's `sk_shutdown` (1 receive, 2 send), applied after the data.
    pub shutdown: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockKind {
    Flock,
    Posix,
    Ofd,
}

/// A lock held through fd `fd` of process `pid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileLock {
    pub pid: i32,
    pub fd: i32,
    pub kind: LockKind,
    pub write: bool,
    pub start: u64,
    /// Length in bytes; 0 means to the end of the file.
    pub len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipeObject {
    /// Pipe inode at dump time; the key `FileDesc::Pipe::pipe` refers to.
    pub id: u64,
    /// `F_GETPIPE_SZ`.
    pub capacity: u32,
    /// Bytes that were buffered (written, not yet read).
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigAction {
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// A queued `siginfo_t` (128 bytes) as read by `PTRACE_PEEKSIGINFO`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigInfo(pub Vec<u8>);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thread {
    pub tid: i32,
    pub comm: String,
    /// `struct user_regs_struct` (27 words) with syscall restart already applied.
    pub regs: Vec<u64>,
    /// Raw `NT_X86_XSTATE` blob.
    pub xsave: Vec<u8>,
    pub sigmask: u64,
    pub pending: Vec<SigInfo>,
    pub sigaltstack: AltStack,
    pub rseq: Option<Rseq>,
    pub robust_list: (u64, u64),
    pub tid_address: u64,
    /// Scheduling, I/O priority, timer slack, parent-death signal.
    pub attrs: ThreadAttrs,
}

/// A thread's attributes that the scheduler and `prctl` keep per thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadAttrs {
    /// `sched_getattr`: policy, flags (`SCHED_FLAG_RESET_ON_FORK`), nice, static
    /// priority, and the deadline parameters.
    pub sched_policy: u32,
    pub sched_flags: u64,
    pub nice: i32,
    pub rt_priority: u32,
    pub dl_runtime: u64,
    pub dl_deadline: u64,
    pub dl_period: u64,
    /// `ioprio_get` (class << 13 | data).
    pub ioprio: i32,
    /// `PR_GET_TIMERSLACK` (`/proc/TID/timerslack_ns`).
    pub timerslack_ns: u64,
    /// `PR_GET_PDEATHSIG`: the signal the thread gets when its parent dies (0: none).
    pub pdeathsig: i32,
    /// `sched_getaffinity` (CPUs 0..1023, bit N of word N / 64) when the thread was kept
    /// off some online CPU of the dumping host (`None`: it could run on all of them, and
    /// a restored thread keeps what its restorer has).
    pub cpus: Option<[u64; CPU_MASK_WORDS]>,
}

/// Words of a thread's CPU affinity mask in [`ThreadAttrs::cpus`] (1024 CPUs).
pub const CPU_MASK_WORDS: usize = 16;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AltStack {
    pub sp: u64,
    pub flags: i32,
    pub size: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rseq {
    pub addr: u64,
    pub len: u32,
    pub sig: u32,
}

/// Index of a register in `Thread::regs` (`struct user_regs_struct` order on x86_64).
pub mod reg {
    pub const R15: usize = 0;
    pub const R14: usize = 1;
    pub const R13: usize = 2;
    pub const R12: usize = 3;
    pub const RBP: usize = 4;
    pub const RBX: usize = 5;
    pub const R11: usize = 6;
    pub const R10: usize = 7;
    pub const R9: usize = 8;
    pub const R8: usize = 9;
    pub const RAX: usize = 10;
    pub const RCX: usize = 11;
    pub const RDX: usize = 12;
    pub const RSI: usize = 13;
    pub const RDI: usize = 14;
    pub const ORIG_RAX: usize = 15;
    pub const RIP: usize = 16;
    pub const CS: usize = 17;
    pub const EFLAGS: usize = 18;
    pub const RSP: usize = 19;
    pub const SS: usize = 20;
    pub const FS_BASE: usize = 21;
    pub const GS_BASE: usize = 22;
    pub const DS: usize = 23;
    pub const ES: usize = 24;
    pub const FS: usize = 25;
    pub const GS: usize = 26;
    pub const COUNT: usize = 27;
}
