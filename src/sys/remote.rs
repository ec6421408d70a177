//! Another process's memory, read or written whole (`process_vm_readv`/`writev`), and
//! the pipes the monitor shares with the processes it starts.

use std::io;
use std::os::fd::OwnedFd;

/// Reads exactly `buf.len()` bytes at `addr` of `pid`; a short read is an error.
pub fn read(pid: i32, addr: u64, buf: &mut [u8]) -> io::Result<()> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // The `remote` range lives in `pid`'s address space, which the kernel checks itself
    // (EFAULT); it does not alias our memory unless `pid` is this process, and then it is
    // only read.
    // SAFETY: `local` describes `buf`, exclusively borrowed and writable for buf.len()
    // bytes for the whole call, and the kernel writes at most that many.
    match unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) } {
        n if n == buf.len() as isize => Ok(()),
        n if n < 0 => Err(io::Error::last_os_error()),
        n => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("short read: {n} of {} bytes at {addr:#x}", buf.len()),
        )),
    }
}

/// Writes all of `bytes` at `addr` of `pid`; a short write is an error.
pub fn write(pid: i32, addr: u64, bytes: &[u8]) -> io::Result<()> {
    let local = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // The `remote` range lives in `pid`'s address space and is checked by the kernel
    // (EFAULT); callers point it at a tracee, or (the test below) at memory of their own
    // that nothing else borrows.
    // SAFETY: `local` describes `bytes`, readable for bytes.len() bytes for the whole
    // call and only read (the *mut cast is what iovec's type demands).
    match unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) } {
        n if n == bytes.len() as isize => Ok(()),
        n if n < 0 => Err(io::Error::last_os_error()),
        n => Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short write: {n} of {} bytes at {addr:#x}", bytes.len()),
        )),
    }
}

/// Reads one byte at each of `addrs` in `pid` (into a scratch buffer, thrown away): the
/// kernel faults each page in for `pid` as it reads, so it is in `pid`'s page tables
/// after. Up to `IOV_MAX` addresses a call; a short read is an error.
pub fn touch(pid: i32, addrs: &[u64]) -> io::Result<()> {
    const IOV_MAX: usize = 1024;
    let mut scratch = [0u8; IOV_MAX];
    for batch in addrs.chunks(IOV_MAX) {
        let local = libc::iovec {
            iov_base: scratch.as_mut_ptr().cast(),
            iov_len: batch.len(),
        };
        let remote: Vec<libc::iovec> = batch
            .iter()
            .map(|&a| libc::iovec {
                iov_base: a as *mut libc::c_void,
                iov_len: 1,
            })
            .collect();
        // The remote ranges live in `pid`'s address space, checked by the kernel
        // (EFAULT); they are only read.
        // SAFETY: `local` describes `scratch`, exclusively borrowed and writable for
        // batch.len() <= IOV_MAX bytes; the kernel writes at most the remote lengths'
        // sum (one byte each), which is that.
        let n = unsafe {
            libc::process_vm_readv(
                pid,
                &local,
                1,
                remote.as_ptr(),
                remote.len() as libc::c_ulong,
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != batch.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("short read: {n} of {} pages", batch.len()),
            ));
        }
    }
    Ok(())
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// A close-on-exec `AF_UNIX` stream socket pair.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    super::scm::unix_pair(libc::SOCK_STREAM)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_and_writes_own_memory() {
        let me = std::process::id() as i32;
        let mut src = [1u8, 2, 3, 4];
        let mut out = [0u8; 4];
        super::read(me, src.as_ptr() as u64, &mut out).unwrap();
        assert_eq!(out, [1, 2, 3, 4]);
        super::write(me, src.as_mut_ptr() as u64, &[9, 9]).unwrap();
        assert_eq!(std::hint::black_box(src), [9, 9, 3, 4]);
    }
}
