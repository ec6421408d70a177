//! Seccomp filters, read with `PTRACE_SECCOMP_GET_FILTER`. Index 0 is the *oldest*
//! filter of the thread's stack (the kernel counts back from the newest by the number
//! of filters minus the index), so the indexes give the install order: the order in
//! which a restore installs them again, and which matters (of two filters returning
//! actions of the same precedence, the newer one's data wins).

use anyhow::Result;

const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;
const SOCK_FILTER_SIZE: usize = 8;

/// The filters of thread `tid`, oldest first, leaving out the `skip_oldest` first
/// installed (warmstart's own warm-point trap sits at the bottom of a recorded app's
/// stack).
pub fn filters(tid: i32, mode: u32, skip_oldest: usize) -> Result<Vec<Vec<u8>>> {
    if mode != 2 {
        if mode == 1 {
            anyhow::bail!("thread {tid} runs in seccomp strict mode, which cannot be restored");
        }
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for index in 0.. {
        // SAFETY: with a null `data`, SECCOMP_GET_FILTER only returns the filter's length
        // in instructions; no memory of ours is written.
        let n = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid,
                index as usize,
                std::ptr::null_mut::<u8>(),
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                break;
            }
            return Err(
                anyhow::Error::new(e).context(format!("PTRACE_SECCOMP_GET_FILTER of thread {tid}"))
            );
        }
        let mut buf = vec![0u8; n as usize * SOCK_FILTER_SIZE];
        // SAFETY: `buf` holds n sock_filters (8 bytes each), the length just reported for
        // this index; the thread is ptrace-stopped, so it cannot install a filter in
        // between, and the kernel copies exactly that many instructions.
        let r = unsafe {
            libc::ptrace(
                PTRACE_SECCOMP_GET_FILTER,
                tid,
                index as usize,
                buf.as_mut_ptr(),
            )
        };
        if r < 0 {
            return Err(anyhow::Error::new(std::io::Error::last_os_error())
                .context("PTRACE_SECCOMP_GET_FILTER"));
        }
        out.push(buf);
    }
    let skip = skip_oldest.min(out.len());
    Ok(out.split_off(skip))
}

/// Checks that thread `tid` (its `/proc/.../status` text `status`) has `leader`, the
/// filters of its process's main thread: a restore installs one stack for the whole
/// process (its threads inherit it), so a thread that installed a filter of its own
/// (without `SECCOMP_FILTER_FLAG_TSYNC`) would silently get the leader's.
pub fn check_thread(tid: i32, status: &str, leader: &[Vec<u8>], skip_oldest: usize) -> Result<()> {
    let mode = super::process::status_field(status, "Seccomp")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("thread {tid}: its status has no Seccomp line"))?;
    let theirs = filters(tid, mode, skip_oldest)?;
    if theirs != leader {
        anyhow::bail!(
            "thread {tid} has other seccomp filters than its process's main thread ({} \
             against {}): a restore gives every thread the same filters, so this process \
             cannot be restored as it is (install filters with SECCOMP_FILTER_FLAG_TSYNC to \
             give every thread the same)",
            theirs.len(),
            leader.len()
        );
    }
    Ok(())
}
