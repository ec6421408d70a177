//! The threads and children of a process, as `/proc` lists them.

use std::io;

/// The thread ids of `pid`, sorted.
pub fn tasks(pid: i32) -> io::Result<Vec<i32>> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// The children of every thread of `pid` (`/proc/PID/task/TID/children`).
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for tid in tasks(pid).unwrap_or_default() {
        let text =
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children")).unwrap_or_default();
        out.extend(
            text.split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok()),
        );
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Every descendant of `pid` (not `pid` itself), parents before their children.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut out = children(pid);
    let mut i = 0;
    while i < out.len() {
        let c = children(out[i]);
        out.extend(c);
        i += 1;
    }
    out
}
