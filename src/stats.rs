//! Phase timings and sizes for `--display-stats`.

use std::fmt;
use std::time::Duration;

#[derive(Debug, Default, Clone)]
pub struct Phases(pub Vec<(&'static str, Duration)>);

impl Phases {
    pub fn add(&mut self, name: &'static str, d: Duration) {
        self.0.push((name, d));
    }

    pub fn total(&self) -> Duration {
        self.0.iter().map(|p| p.1).sum()
    }
}

impl fmt::Display for Phases {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, d) in &self.0 {
            writeln!(f, "  {name:<12} {:>10.3} ms", d.as_secs_f64() * 1e3)?;
        }
        write!(
            f,
            "  {:<12} {:>10.3} ms",
            "total",
            self.total().as_secs_f64() * 1e3
        )
    }
}

/// Bytes as a short human figure: 512 B, 4.0 KiB, 1.5 GiB.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_sizes() {
        assert_eq!(super::human(512), "512 B");
        assert_eq!(super::human(4096), "4.0 KiB");
        assert_eq!(super::human(3 << 29), "1.5 GiB");
    }
}
