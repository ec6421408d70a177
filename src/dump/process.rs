//! Process-wide state read from `/proc` and `prlimit`: identity, creds, limits, mm fields.

use anyhow::{bail, Context, Result};
use warmstart_snapshots::model::{Creds, FileIdentity, MmFields, Rlimit};

use super::files::identity;

/// `RLIMIT_CPU` ..= `RLIMIT_RTTIME`.
const RLIMIT_COUNT: u32 = 16;

pub struct ProcInfo {
    pub pid_in_ns: i32,
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
    pub fd_table_size: u32,
    pub seccomp_mode: u32,
    pub mm: MmFields,
    pub auxv: Vec<u64>,
}

pub(super) fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':').map(str::trim))
}

fn words<T: std::str::FromStr>(s: Option<&str>) -> Vec<T> {
    s.unwrap_or("")
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect()
}

fn hex(s: Option<&str>) -> u64 {
    s.and_then(|v| u64::from_str_radix(v, 16).ok()).unwrap_or(0)
}

/// The innermost-namespace value of an `NSpid`-style line (the last column).
fn innermost(s: Option<&str>) -> Option<i32> {
    s?.split_whitespace().last()?.parse().ok()
}

/// The parent's pid in the target's own pid namespace: 0 when the parent lives outside
/// it (as the launcher's monitor does for a sandbox's init).
fn ppid_in_ns(ppid: i32, nspid: Option<&str>) -> i32 {
    let depth = nspid.map(|s| s.split_whitespace().count()).unwrap_or(1);
    let parent = std::fs::read_to_string(format!("/proc/{ppid}/status")).unwrap_or_default();
    let levels: Vec<i32> = words(status_field(&parent, "NSpid"));
    if levels.len() == depth {
        levels.last().copied().unwrap_or(ppid)
    } else {
        0
    }
}

/// `/proc/PID/stat`: the comm and the numbered fields of proc(5) (field 3 onwards).
struct Stat {
    comm: String,
    fields: Vec<u64>,
}

impl Stat {
    fn read(pid: i32) -> Result<Stat> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading stat of process {pid}"))?;
        // comm may contain spaces and parentheses: fields start after the last ')'.
        let close = stat.rfind(')').context("malformed /proc/PID/stat")?;
        Ok(Stat {
            comm: stat[stat.find('(').unwrap_or(0) + 1..close].to_owned(),
            fields: stat[close + 2..]
                .trim_end()
                .split(' ')
                .map(|v| v.parse().unwrap_or(0))
                .collect(),
        })
    }

    fn field(&self, n: usize) -> u64 {
        self.fields.get(n - 3).copied().unwrap_or(0)
    }
}

const PF_KTHREAD: u64 = 0x0020_0000;

/// Refuses, before anything touches it, a pid that cannot be checkpointed at all.
pub fn check_target(pid: i32) -> Result<()> {
    let stat = Stat::read(pid).map_err(|_| anyhow::anyhow!("no such process: {pid}"))?;
    if stat.field(9) & PF_KTHREAD != 0 {
        bail!(
            "pid {pid} ({}) is a kernel thread: there is nothing to checkpoint",
            stat.comm
        );
    }
    Ok(())
}

/// `/proc/PID/limits`: a header, then one row per resource in `RLIMIT_*` order, printed
/// with `"%-25s %-20s %-20s"` (name, soft, hard; `unlimited` for `RLIM_INFINITY`).
fn parse_limits(text: &str) -> Result<Vec<Rlimit>> {
    let value = |row: &str, range: std::ops::Range<usize>| -> Result<u64> {
        let v = row.get(range).unwrap_or("").trim();
        match v {
            "unlimited" => Ok(libc::RLIM_INFINITY),
            v => v
                .parse()
                .with_context(|| format!("bad value {v:?} in row {row:?}")),
        }
    };
    let rows: Vec<&str> = text.lines().skip(1).collect();
    if rows.len() < RLIMIT_COUNT as usize {
        bail!("{} rows, expected {RLIMIT_COUNT}", rows.len());
    }
    (0..RLIMIT_COUNT)
        .map(|resource| {
            let row = rows[resource as usize];
            Ok(Rlimit {
                resource,
                cur: value(row, 26..47)?,
                max: value(row, 47..68)?,
            })
        })
        .collect()
}

pub fn collect(pid: i32) -> Result<ProcInfo> {
    let ctx = |what: &str| format!("reading {what} of process {pid}");
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| ctx("status"))?;
    let st = Stat::read(pid)?;
    let comm = st.comm.clone();
    let field = |n: usize| st.field(n);
    let uid: Vec<u32> = words(status_field(&status, "Uid"));
    let gid: Vec<u32> = words(status_field(&status, "Gid"));
    let ns =
        |key: &str, fallback: u64| innermost(status_field(&status, key)).unwrap_or(fallback as i32);
    let exe_path = std::fs::read_link(format!("/proc/{pid}/exe")).with_context(|| ctx("exe"))?;
    let exe_meta = std::fs::metadata(format!("/proc/{pid}/exe")).with_context(|| ctx("exe"))?;
    let auxv_bytes = std::fs::read(format!("/proc/{pid}/auxv")).with_context(|| ctx("auxv"))?;
    let personality = std::fs::read_to_string(format!("/proc/{pid}/personality"))
        .ok()
        .and_then(|s| u32::from_str_radix(s.trim(), 16).ok())
        .unwrap_or(0);
    // Not prlimit(): reading another user's limits needs CAP_SYS_RESOURCE.
    let rlimits = parse_limits(
        &std::fs::read_to_string(format!("/proc/{pid}/limits")).with_context(|| ctx("limits"))?,
    )
    .with_context(|| ctx("limits"))?;
    Ok(ProcInfo {
        pid_in_ns: ns("NSpid", pid as u64),
        ppid: ppid_in_ns(field(4) as i32, status_field(&status, "NSpid")),
        pgid: ns("NSpgid", field(5)),
        sid: ns("NSsid", field(6)),
        comm,
        exe: identity(&exe_path.to_string_lossy(), &exe_meta),
        creds: Creds {
            uid: [uid[0], uid[1], uid[2], uid[3]],
            gid: [gid[0], gid[1], gid[2], gid[3]],
            groups: words(status_field(&status, "Groups")),
            cap_inheritable: hex(status_field(&status, "CapInh")),
            cap_permitted: hex(status_field(&status, "CapPrm")),
            cap_effective: hex(status_field(&status, "CapEff")),
            cap_bounding: hex(status_field(&status, "CapBnd")),
            cap_ambient: hex(status_field(&status, "CapAmb")),
            // Only the process can read it: filled in from the parasite's run.
            securebits: 0,
        },
        rlimits,
        cwd: std::fs::read_link(format!("/proc/{pid}/cwd"))
            .with_context(|| ctx("cwd"))?
            .to_string_lossy()
            .into_owned(),
        root: std::fs::read_link(format!("/proc/{pid}/root"))
            .with_context(|| ctx("root"))?
            .to_string_lossy()
            .into_owned(),
        umask: status_field(&status, "Umask")
            .and_then(|v| u32::from_str_radix(v, 8).ok())
            .unwrap_or(0o022),
        personality,
        no_new_privs: status_field(&status, "NoNewPrivs") == Some("1"),
        fd_table_size: status_field(&status, "FDSize")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0),
        seccomp_mode: status_field(&status, "Seccomp")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        mm: MmFields {
            start_code: field(26),
            end_code: field(27),
            start_stack: field(28),
            start_data: field(45),
            end_data: field(46),
            start_brk: field(47),
            brk: 0, // from the parasite: brk(0)
            arg_start: field(48),
            arg_end: field(49),
            env_start: field(50),
            env_end: field(51),
        },
        auxv: auxv_bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
    })
}

/// The pid in its own (innermost) pid namespace that `/proc/PID/status` text `status`
/// shows: the last `NSpid` column.
pub(crate) fn own_ns_pid(status: &str) -> Option<i32> {
    innermost(status_field(status, "NSpid"))
}

/// [`own_ns_pid`] of process `pid`; `None` when its status cannot be read.
pub fn pid_in_own_ns(pid: i32) -> Option<i32> {
    own_ns_pid(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// How many pid namespaces `pid` is seen in (the number of `NSpid` columns).
pub fn pid_ns_depth(pid: i32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status_field(&status, "NSpid")
        .map(|v| v.split_whitespace().count())
        .unwrap_or(1)
}

/// The ids and exit status of a zombie (an exited child its parent has not reaped):
/// all that is left of it, and all a restore needs to recreate it.
/// The handler a zombie's caught signals are recorded with: a zombie has no memory, so
/// only *that* a signal was caught is kept (restored as this address, never called).
pub const ZOMBIE_HANDLER: u64 = 0x1000;

pub fn zombie(pid: i32) -> Result<warmstart_snapshots::model::Process> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading status of zombie process {pid}"))?;
    let st = Stat::read(pid)?;
    let ns =
        |key: &str, fallback: u64| innermost(status_field(&status, key)).unwrap_or(fallback as i32);
    let mask = |key: &str| {
        status_field(&status, key)
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    Ok(warmstart_snapshots::model::Process {
        pid: ns("NSpid", pid as u64),
        ppid: ppid_in_ns(st.field(4) as i32, status_field(&status, "NSpid")),
        pgid: ns("NSpgid", st.field(5)),
        sid: ns("NSsid", st.field(6)),
        comm: st.comm.clone(),
        // proc(5) field 52, `exit_code`: the status its parent's wait() will report.
        zombie: Some(st.field(52) as i32),
        zombie_sigmask: mask("SigBlk"),
        sigactions: (0..64)
            .map(|i| warmstart_snapshots::model::SigAction {
                handler: if mask("SigIgn") >> i & 1 == 1 {
                    1 // SIG_IGN
                } else if mask("SigCgt") >> i & 1 == 1 {
                    ZOMBIE_HANDLER
                } else {
                    0 // SIG_DFL
                },
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
}

/// `/proc/PID/task/TID/status`.
pub fn thread_status(pid: i32, tid: i32) -> Result<String> {
    let path = format!("/proc/{pid}/task/{tid}/status");
    std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))
}

/// A thread's filesystem context: cwd, root and umask (shared by every thread unless one
/// called `unshare(CLONE_FS)`).
#[derive(Debug, PartialEq, Eq)]
pub struct FsContext {
    cwd: String,
    root: String,
    umask: String,
}

/// The filesystem context of thread `tid` of `pid`, whose status text is `status`.
pub fn fs_context(pid: i32, tid: i32, status: &str) -> Result<FsContext> {
    let link = |name: &str| {
        let path = format!("/proc/{pid}/task/{tid}/{name}");
        std::fs::read_link(&path)
            .map(|p| p.to_string_lossy().into_owned())
            .with_context(|| format!("reading {path}"))
    };
    Ok(FsContext {
        cwd: link("cwd")?,
        root: link("root")?,
        umask: status_field(status, "Umask").unwrap_or("").to_owned(),
    })
}

/// Checks that thread `tid` shares `leader`, its main thread's filesystem context: a
/// restore gives the process one, so a thread with its own would silently lose it.
pub fn check_shared_fs(tid: i32, theirs: &FsContext, leader: &FsContext) -> Result<()> {
    if theirs != leader {
        bail!(
            "thread {tid} has a filesystem context of its own (unshare(CLONE_FS): cwd {}, \
             root {}, umask {} against the process's {}, {}, {}), which warmstart cannot \
             checkpoint yet (a restore gives all threads the process's)",
            theirs.cwd,
            theirs.root,
            theirs.umask,
            leader.cwd,
            leader.root,
            leader.umask
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = collect(std::process::id() as i32).unwrap();
        assert!(me.mm.start_code > 0 && me.mm.end_code > me.mm.start_code);
        assert!(me.mm.arg_end > me.mm.arg_start);
        assert_eq!(me.rlimits.len(), RLIMIT_COUNT as usize);
        assert!(me.exe.path.starts_with('/'));
        assert_eq!(me.auxv.len() % 2, 0);
        assert_eq!(me.cwd, std::env::current_dir().unwrap().to_string_lossy());
    }

    #[test]
    fn limits_match_getrlimit() {
        let me = collect(std::process::id() as i32).unwrap();
        for r in &me.rlimits {
            let mut want = libc::rlimit64 {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: `want` is a live rlimit64 the kernel writes; the resource number is
            // just an integer (an unknown one fails with EINVAL).
            assert_eq!(unsafe { libc::getrlimit64(r.resource as _, &mut want) }, 0);
            assert_eq!((r.cur, r.max), (want.rlim_cur, want.rlim_max), "{r:?}");
        }
        assert!(parse_limits("Limit\nMax cpu time  x\n").is_err());
    }
}
