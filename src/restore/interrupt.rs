//! SIGINT, SIGTERM and SIGHUP while a restore is in progress.
//!
//! `run` and `restore` block those signals in every thread (they are forwarded to the
//! instance once it runs, see `Restored::wait`). Before that, a restore that is slow or
//! stuck (a tree being rebuilt, a page server that stopped answering) must still stop
//! when asked: an [`Interrupt`] watches for them on a signalfd of its own thread while
//! the restore runs, and kills the sandbox being built, so that the restore fails at its
//! next step and unwinds (its [`super::reaper::Reaper`] reaps the traced tree).

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use warmstart_snapshots::store::Snapshot;

/// The signals an interrupted restore answers.
const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

#[derive(Debug, Default)]
pub struct Interrupt {
    /// The signal that arrived, 0 if none.
    signal: AtomicI32,
    /// The sandbox being built: its init's pidfd.
    target: Mutex<Option<OwnedFd>>,
    /// The snapshot being restored: a page server's reads are given up (the restore may
    /// be waiting for one that stopped answering).
    snapshot: Mutex<Option<Arc<Snapshot>>>,
    /// The instance is resuming: a signal is for it now, kept for the caller to forward.
    resumed: std::sync::atomic::AtomicBool,
}

/// The watching thread; [`Watch::stop`] ends it.
pub struct Watch {
    pub interrupt: Arc<Interrupt>,
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl Interrupt {
    /// The signal that interrupted the restore, if one did.
    pub fn signal(&self) -> Option<i32> {
        match self.signal.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }

    /// From now on a signal kills the sandbox whose init is `init_pidfd`; at once if one
    /// came already.
    pub fn arm(&self, init_pidfd: BorrowedFd<'_>) {
        let fd = init_pidfd.try_clone_to_owned().ok();
        if self.signal().is_some() {
            if let Some(fd) = &fd {
                kill(fd);
            }
        }
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = fd;
    }

    /// A signal also gives up the page reads of `snap` (from a page server), so that a
    /// restore waiting for one stops at once.
    pub fn abandon_reads_of(&self, snap: Arc<Snapshot>) {
        *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = Some(snap);
    }

    /// The restore is done and the instance resumes: from now on a signal kills nothing;
    /// the caller forwards it ([`Interrupt::resumed`]).
    pub fn resuming(&self) {
        // Under the lock: `fire` either saw the target (and killed a restore that had not
        // got here) or sees the flag.
        let _t = self.target.lock().unwrap_or_else(|e| e.into_inner());
        self.resumed.store(true, Ordering::SeqCst);
    }

    /// Whether the instance had resumed when the signal came (see [`Interrupt::resuming`]).
    pub fn resumed(&self) -> bool {
        self.resumed.load(Ordering::SeqCst)
    }

    /// The sandbox is no longer ours to kill (the restore ended).
    pub fn disarm(&self) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn fire(&self, sig: i32) {
        self.signal.store(sig, Ordering::SeqCst);
        let target = self.target.lock().unwrap_or_else(|e| e.into_inner());
        if self.resumed() {
            return;
        }
        if let Some(fd) = &*target {
            kill(fd);
        }
        drop(target);
        if let Some(s) = &*self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) {
            s.abandon_page_reads();
        }
    }
}

fn kill(pidfd: &OwnedFd) {
    let _ = crate::sys::pidfd::pidfd_send_signal(pidfd, libc::SIGKILL);
}

impl Watch {
    /// Starts watching. The signals must be blocked in every thread already
    /// (`block_forwarded_signals`), or they would not reach the signalfd.
    pub fn start() -> Result<Watch> {
        // SAFETY: sigset operations on a local, zeroed set.
        let set = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in SIGNALS {
                libc::sigaddset(&mut set, s);
            }
            set
        };
        // SAFETY: signalfd reads `set`; the fd returned is owned right away.
        let sfd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC) };
        if sfd < 0 {
            return Err(std::io::Error::last_os_error()).context("signalfd");
        }
        // SAFETY: a fresh fd of ours.
        let sfd = unsafe { OwnedFd::from_raw_fd(sfd) };
        // SAFETY: eventfd takes no pointers.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(std::io::Error::last_os_error()).context("eventfd");
        }
        // SAFETY: a fresh fd of ours.
        let stop = unsafe { OwnedFd::from_raw_fd(efd) };
        let theirs = stop.try_clone().context("dup of an eventfd")?;
        let interrupt = Arc::new(Interrupt::default());
        let i = interrupt.clone();
        let thread = std::thread::Builder::new()
            .name("interrupt".into())
            .spawn(move || watch(&i, &sfd, &theirs))
            .context("starting the interrupt thread")?;
        Ok(Watch {
            interrupt,
            stop,
            thread: Some(thread),
        })
    }

    /// Ends the watch; signals from now on stay pending for whoever takes them next.
    pub fn stop(mut self) -> Option<i32> {
        self.end();
        self.interrupt.signal()
    }

    fn end(&mut self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.end();
    }
}

fn watch(i: &Interrupt, sfd: &OwnedFd, stop: &OwnedFd) {
    let ready = match crate::sys::wait_readable([sfd.as_raw_fd(), stop.as_raw_fd()]) {
        Ok(r) => r,
        Err(_) => return,
    };
    if ready[1] || !ready[0] {
        return;
    }
    // SAFETY: a zeroed signalfd_siginfo is valid; read writes at most its size.
    let mut si: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    // SAFETY: `si` is a live, writable `signalfd_siginfo` and the length given is its size;
    // `sfd` is the signalfd we own.
    let n = unsafe {
        libc::read(
            sfd.as_raw_fd(),
            (&mut si as *mut libc::signalfd_siginfo).cast(),
            std::mem::size_of::<libc::signalfd_siginfo>(),
        )
    };
    if n == std::mem::size_of::<libc::signalfd_siginfo>() as isize {
        i.fire(si.ssi_signo as i32);
    }
}
