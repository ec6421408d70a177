//! Progress of long work, for a person at a terminal: memory written by `record`/`dump`,
//! memory copied by an eager restore, pages re-read by `verify`, `gc` waiting for the
//! store lock. Nothing is drawn unless a command turned it on ([`enable`]) and stderr is
//! a terminal, and a counter appears only once its work is large
//! ([`SHOW_AFTER_BYTES`]), so that quick work stays quiet too.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

static ENABLED: AtomicBool = AtomicBool::new(false);

/// A counter is drawn once this much of its work is done.
pub const SHOW_AFTER_BYTES: u64 = 64 << 20;

/// Lets this process draw progress (when stderr is a terminal). Commands a person runs
/// turn it on; a daemon's restores never do.
pub fn enable() {
    ENABLED.store(std::io::stderr().is_terminal(), Ordering::Relaxed);
}

fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Bytes of some work done so far, drawn (with the rate, and the total when known) once
/// they pass [`SHOW_AFTER_BYTES`]. Cheap to count into from several threads; cleared
/// when dropped.
pub struct Bytes {
    bar: Option<ProgressBar>,
    done: AtomicU64,
    shown: AtomicBool,
}

impl Bytes {
    /// `what`: what is being done (`writing memory`); `total` if known.
    pub fn new(what: &str, total: Option<u64>) -> Bytes {
        let bar = enabled().then(|| {
            let (bar, template) = match total {
                Some(t) => (
                    ProgressBar::with_draw_target(Some(t), ProgressDrawTarget::hidden()),
                    "warmstart: {msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} \
                     ({binary_bytes_per_sec}, {eta} left)",
                ),
                None => (
                    ProgressBar::hidden(),
                    "warmstart: {msg} {spinner} {binary_bytes} ({binary_bytes_per_sec})",
                ),
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(what.to_owned());
            bar
        });
        Bytes {
            bar,
            done: AtomicU64::new(0),
            shown: AtomicBool::new(false),
        }
    }

    /// `n` more bytes done.
    pub fn inc(&self, n: u64) {
        let Some(bar) = &self.bar else { return };
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        bar.set_position(done);
        if done >= SHOW_AFTER_BYTES && !self.shown.swap(true, Ordering::Relaxed) {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            bar.enable_steady_tick(Duration::from_millis(200));
        }
    }
}

impl Drop for Bytes {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// A spinner with a message, drawn at once (work of unknown length, e.g. a wait);
/// cleared when dropped.
pub struct Spinner(Option<ProgressBar>);

impl Spinner {
    pub fn new(msg: &str) -> Spinner {
        Spinner(enabled().then(|| {
            let s = ProgressBar::new_spinner();
            if let Ok(style) = ProgressStyle::with_template("warmstart: {msg} {spinner} {elapsed}")
            {
                s.set_style(style);
            }
            s.set_message(msg.to_owned());
            // Drawn now, not at the first tick of the ticker thread.
            s.tick();
            s.enable_steady_tick(Duration::from_millis(120));
            s
        }))
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if let Some(s) = &self.0 {
            s.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Off (the default, and whenever stderr is not a terminal): counting draws nothing.
    #[test]
    fn quiet_unless_enabled() {
        let b = Bytes::new("writing memory", None);
        assert!(b.bar.is_none());
        b.inc(SHOW_AFTER_BYTES * 2);
        assert!(Spinner::new("waiting").0.is_none());
    }
}
