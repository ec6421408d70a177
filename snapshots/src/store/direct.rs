//! Appending to a file past the page cache (`O_DIRECT`).
//!
//! On these machines a page-cache page taken from memory the guest handed back to the
//! host costs a host fault on its first write, so buffered writes of a large file run at
//! 250-450 MB/s with most of a core in the kernel, while `O_DIRECT` writes of the same
//! bytes (and the `fsync` that makes them durable) run at 1.1-1.4 GB/s. A pull stores
//! pages that no process reads right away (a lazy run reads its working set, not the
//! whole snapshot), so its packs are written this way.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;

use memmap2::MmapMut;

/// Bytes written at a time: a multiple of every block size `O_DIRECT` asks alignment to.
const CHUNK: usize = 4 << 20;

/// Appends to `file` (written from offset 0 on, only through this writer) in aligned
/// chunks of [`CHUNK`] bytes with `O_DIRECT`; the last, partial chunk goes through the
/// page cache at [`DirectWriter::finish`]. Where the filesystem refuses `O_DIRECT`
/// (tmpfs), every chunk goes through the page cache.
pub(crate) struct DirectWriter {
    file: File,
    /// Page-aligned (an anonymous mapping), as `O_DIRECT` wants the memory it writes.
    buf: MmapMut,
    len: usize,
    direct: bool,
}

/// Sets or clears `O_DIRECT` on `file`.
fn set_direct(file: &File, on: bool) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on an fd we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::O_DIRECT
    } else {
        flags & !libc::O_DIRECT
    };
    // SAFETY: F_SETFL with plain flags on an fd we own.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl DirectWriter {
    /// A writer appending to the empty file `file`.
    pub(crate) fn new(file: File) -> io::Result<Self> {
        let direct = set_direct(&file, true).is_ok();
        Ok(DirectWriter {
            file,
            buf: MmapMut::map_anon(CHUNK)?,
            len: 0,
            direct,
        })
    }

    /// Writes the full buffer.
    fn write_chunk(&mut self) -> io::Result<()> {
        let res = self.file.write_all(&self.buf[..self.len]);
        match res {
            // A filesystem that took the flag but refuses the write: the page cache.
            Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                set_direct(&self.file, false)?;
                self.direct = false;
                self.file.write_all(&self.buf[..self.len])?;
            }
            r => r?,
        }
        self.len = 0;
        Ok(())
    }

    /// Writes what is buffered (through the page cache) and returns the file.
    pub(crate) fn finish(mut self) -> io::Result<File> {
        if self.direct {
            set_direct(&self.file, false)?;
            self.direct = false;
        }
        if self.len > 0 {
            self.write_chunk()?;
        }
        Ok(self.file)
    }
}

impl Write for DirectWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&data[..n]);
        self.len += n;
        if self.len == CHUNK {
            self.write_chunk()?;
        }
        Ok(n)
    }

    /// Nothing: only whole chunks are written before [`DirectWriter::finish`].
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn writes_every_byte_in_order_whatever_the_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut w = DirectWriter::new(File::create(&path).unwrap()).unwrap();
        let mut want = Vec::new();
        let mut x = 1u32;
        // Pieces of odd sizes, crossing several chunk boundaries.
        for k in 0..1000 {
            let piece: Vec<u8> = (0..(k * 97 + 13) % 40_000)
                .map(|_| {
                    x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (x >> 24) as u8
                })
                .collect();
            w.write_all(&piece).unwrap();
            want.extend_from_slice(&piece);
        }
        assert!(want.len() > 3 * CHUNK);
        let f = w.finish().unwrap();
        f.sync_all().unwrap();
        let mut got = Vec::new();
        File::open(&path).unwrap().read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "contents differ");
    }
}
