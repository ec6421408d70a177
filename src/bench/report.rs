//! Rendering: the markdown tables of a full run, its JSON, and the text summary of
//! `warmstart bench`.

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::stats::Summary;
use super::{Start, WorkloadResult};
use crate::stats::human;

/// Where and when a run happened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub date: String,
    pub cpu: String,
    pub cpus: usize,
    pub memory: String,
    pub kernel: String,
    pub load_before: String,
    pub load_after: String,
}

impl Machine {
    /// Reads the machine's description now (`load_after` is filled in later).
    pub fn describe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            .unwrap_or_else(|| "unknown CPU".into());
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let memory = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map(|kb| human(kb * 1024))
            .unwrap_or_default();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned();
        Machine {
            date: date_now(),
            cpu,
            cpus,
            memory,
            kernel,
            load_before: loadavg(),
            load_after: String::new(),
        }
    }

    pub fn one_line(&self) -> String {
        format!(
            "{} vCPU ({}), {} RAM, Linux {}",
            self.cpus, self.cpu, self.memory, self.kernel
        )
    }
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// UTC date and time, `YYYY-MM-DD HH:MM UTC`.
pub fn date_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let (h, m) = ((secs % 86_400) / 3600, (secs % 3600) / 60);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02} UTC")
}

/// A whole run: what the JSON file holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub machine: Machine,
    pub total_seconds: f64,
    pub warmstart_commit: Option<String>,
    pub workloads: Vec<WorkloadResult>,
}

/// `median [min–max]` in ms (`–` without samples).
pub fn ms_cell(s: &Option<Summary>) -> String {
    match s {
        Some(s) => format!("{} [{}–{}]", fmt_ms(s.median), fmt_ms(s.min), fmt_ms(s.max)),
        None => "–".into(),
    }
}

/// Milliseconds with 3 significant digits or so.
pub fn fmt_ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// `×median [min–max]` (`–` without samples).
pub fn ratio_cell(s: &Option<Summary>) -> String {
    match s {
        Some(s) => format!("×{:.1} [{:.1}–{:.1}]", s.median, s.min, s.max),
        None => "–".into(),
    }
}

fn bytes_cell(s: &Option<Summary>) -> String {
    s.as_ref()
        .map(|s| human(s.median as u64))
        .unwrap_or_else(|| "–".into())
}

fn escape(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

fn mode_cell(r: &WorkloadResult, m: Start) -> String {
    match r.mode(m) {
        None => "–".into(),
        Some(x) => {
            let mut s = if x.first_answer_ms.is_some() {
                format!("{} {}", ms_cell(&x.first_answer_ms), ratio_cell(&x.ratio))
            } else {
                String::new()
            };
            if let Some(e) = &x.error {
                if !s.is_empty() {
                    s.push_str("; ");
                }
                let _ = write!(s, "**failed**: {}", escape(e));
            }
            s
        }
    }
}

fn name_cell(r: &WorkloadResult) -> String {
    let mut n = format!("`{}`", r.name);
    if r.pairs > 0 {
        let _ = write!(n, " ({} pairs)", r.pairs);
    }
    n
}

/// The markdown tables of a run.
pub fn markdown(rep: &Report) -> String {
    let mut o = String::new();
    let m = &rep.machine;
    let _ = writeln!(
        o,
        "Measured {} on {}; load average {} before, {} after; {:.0} s in all{}.",
        m.date,
        m.one_line(),
        m.load_before,
        m.load_after,
        rep.total_seconds,
        rep.warmstart_commit
            .as_deref()
            .map(|c| format!(", warmstart {c}"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        o,
        "The machine is shared and noisy: compare the ratios, each taken from a cold run and \
         the restored run right after it.\n"
    );
    let _ = writeln!(
        o,
        "**Time to first answer** (ms from starting the process to its first answer; median \
         [min–max]; ×ratio = cold / restored per pair, median [min–max]). *eager* = `run \
         --eager`, *lazy* = `run --no-prefetch`, *lazy+ws* = `run` with the learned working \
         set, *served* = `run` answered by a `warmstart serve` daemon from its pool of parked \
         instances (the pool refilled between runs).\n"
    );
    o.push_str(
        "| workload | cold | eager | lazy | lazy+ws | served |\n|---|---|---|---|---|---|\n",
    );
    for r in &rep.workloads {
        let cold = ms_cell(&r.cold_ms);
        match (&r.error, r.modes.is_empty()) {
            (Some(e), true) => {
                let _ = writeln!(
                    o,
                    "| {} | {cold} | **failed**: {} | | | |",
                    name_cell(r),
                    escape(e)
                );
            }
            _ => {
                // One cell for a failure every mode shares.
                let errs: Vec<Option<&String>> = Start::RESTORED
                    .iter()
                    .map(|m| r.mode(*m).and_then(|x| x.error.as_ref()))
                    .collect();
                let same = errs.iter().all(|e| e.is_some() && *e == errs[0])
                    && r.modes.iter().all(|m| m.first_answer_ms.is_none());
                if same {
                    let _ = writeln!(
                        o,
                        "| {} | {cold} | **failed** (every mode): {} | | | |",
                        name_cell(r),
                        escape(errs[0].map(String::as_str).unwrap_or(""))
                    );
                    continue;
                }
                let _ = writeln!(
                    o,
                    "| {} | {cold} | {} | {} | {} | {} |",
                    name_cell(r),
                    mode_cell(r, Start::Eager),
                    mode_cell(r, Start::Lazy),
                    mode_cell(r, Start::LazyWs),
                    mode_cell(r, Start::Served)
                );
            }
        }
    }
    let _ = writeln!(
        o,
        "\n**Record and snapshot sizes** (logical = mapped; resident = present pages; zero = \
         zero pages, never stored; stored = compressed bytes of the distinct blocks; shared = \
         pages whose content another snapshot of the store also has).\n"
    );
    o.push_str(
        "| workload | record | logical | resident | zero | stored | shared |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in &rep.workloads {
        match (&r.record_ms, &r.sizes) {
            (Some(t), Some(s)) => {
                let _ = writeln!(
                    o,
                    "| `{}` | {} ms | {} | {} | {} | {} | {} |",
                    r.name,
                    fmt_ms(*t),
                    human(s.logical_bytes),
                    human(s.resident_bytes),
                    human(s.zero_bytes),
                    human(s.stored_bytes),
                    human(s.shared_bytes_with_others)
                );
            }
            _ => {
                let _ = writeln!(o, "| `{}` | failed | | | | | |", r.name);
            }
        }
    }
    let _ = writeln!(
        o,
        "\n**Memory** of the app process right after its first answer (`/proc/PID/smaps_rollup`, \
         median), and the total Pss of N instances started at once (each after its first \
         answer).\n"
    );
    o.push_str(
        "| workload | cold Rss / Pss | eager Rss / Pss | lazy+ws Rss / Pss | N at once: cold Pss | N at once: restored Pss |\n\
         |---|---|---|---|---|---|\n",
    );
    for r in &rep.workloads {
        let mode_mem = |m: Start| {
            r.mode(m)
                .filter(|x| x.rss_bytes.is_some())
                .map(|x| {
                    format!(
                        "{} / {}",
                        bytes_cell(&x.rss_bytes),
                        bytes_cell(&x.pss_bytes)
                    )
                })
                .unwrap_or_else(|| "–".into())
        };
        let cold = if r.cold_rss_bytes.is_some() {
            format!(
                "{} / {}",
                bytes_cell(&r.cold_rss_bytes),
                bytes_cell(&r.cold_pss_bytes)
            )
        } else {
            "–".into()
        };
        let (cc, cr) = match &r.concurrent {
            Some(c) => (
                c.cold_pss_total_bytes
                    .map(|b| format!("{}: {}", c.instances, human(b)))
                    .unwrap_or_else(|| c.error.clone().map(|e| escape(&e)).unwrap_or_default()),
                c.restored_pss_total_bytes
                    .map(|b| format!("{}: {} ({})", c.instances, human(b), c.restored_mode))
                    .unwrap_or_else(|| c.error.clone().map(|e| escape(&e)).unwrap_or_default()),
            ),
            None => ("–".into(), "–".into()),
        };
        let _ = writeln!(
            o,
            "| `{}` | {cold} | {} | {} | {cc} | {cr} |",
            r.name,
            mode_mem(Start::Eager),
            mode_mem(Start::LazyWs)
        );
    }
    let notes: Vec<String> = rep
        .workloads
        .iter()
        .filter_map(|r| r.note.as_ref().map(|n| format!("- `{}`: {n}", r.name)))
        .collect();
    if !notes.is_empty() {
        let _ = writeln!(o, "\n{}", notes.join("\n"));
    }
    o
}

/// The readable comparison `warmstart bench` prints.
pub fn text_summary(r: &WorkloadResult, took: Duration) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "warmstart bench: {}", r.name);
    let _ = writeln!(
        o,
        "  {} cold/restored pairs per mode, {:.1} s in all; machine load {}",
        r.pairs,
        took.as_secs_f64(),
        loadavg()
    );
    if let Some(e) = &r.error {
        let _ = writeln!(o, "  FAILED: {e}");
    }
    if let Some(c) = &r.cold_ms {
        let _ = writeln!(
            o,
            "\n  time to first answer   median      range            vs cold"
        );
        let _ = writeln!(
            o,
            "  cold start           {:>9} ms  {:>7}–{:<7} ms",
            fmt_ms(c.median),
            fmt_ms(c.min),
            fmt_ms(c.max)
        );
        for m in &r.modes {
            let label = match m.mode.as_str() {
                "eager" => "restore, eager",
                "lazy" => "restore, lazy",
                "served" => "served (parked pool)",
                _ => "restore, lazy+ws",
            };
            match &m.first_answer_ms {
                Some(s) => {
                    let ratio = m
                        .ratio
                        .as_ref()
                        .map(|x| format!("{:.1}× faster ({:.1}–{:.1})", x.median, x.min, x.max))
                        .unwrap_or_default();
                    let _ = writeln!(
                        o,
                        "  {label:<20} {:>9} ms  {:>7}–{:<7} ms  {ratio}",
                        fmt_ms(s.median),
                        fmt_ms(s.min),
                        fmt_ms(s.max)
                    );
                }
                None => {
                    let _ = writeln!(o, "  {label:<20} failed");
                }
            }
            if let Some(e) = &m.error {
                let _ = writeln!(o, "      error: {e}");
            }
        }
    }
    if let (Some(t), Some(s)) = (r.record_ms, &r.sizes) {
        let _ = writeln!(
            o,
            "\n  record: {:.0} ms; snapshot: logical {}, resident {}, zero {}, stored {} (compressed), shared with other snapshots {}",
            t,
            human(s.logical_bytes),
            human(s.resident_bytes),
            human(s.zero_bytes),
            human(s.stored_bytes),
            human(s.shared_bytes_with_others)
        );
    }
    let mem = |rss: &Option<Summary>, pss: &Option<Summary>| {
        format!("Rss {}, Pss {}", bytes_cell(rss), bytes_cell(pss))
    };
    if r.cold_rss_bytes.is_some() {
        let _ = writeln!(
            o,
            "  memory after the first answer: cold    {}",
            mem(&r.cold_rss_bytes, &r.cold_pss_bytes)
        );
        for m in &r.modes {
            if m.rss_bytes.is_some() {
                let _ = writeln!(
                    o,
                    "                                 {:<7} {}",
                    m.mode,
                    mem(&m.rss_bytes, &m.pss_bytes)
                );
            }
        }
    }
    if let Some(c) = &r.concurrent {
        let f = |b: Option<u64>| b.map(human).unwrap_or_else(|| "failed".into());
        let _ = writeln!(
            o,
            "  {} instances at once, total Pss: cold {}, restored ({}) {}",
            c.instances,
            f(c.cold_pss_total_bytes),
            c.restored_mode,
            f(c.restored_pss_total_bytes)
        );
        if let Some(e) = &c.error {
            let _ = writeln!(o, "      error: {e}");
        }
    }
    o
}
