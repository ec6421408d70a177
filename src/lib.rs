//! warmstart: checkpoint an app at its warm point, restore instances in milliseconds.

pub mod bench;
pub mod cgroup;
pub mod check;
pub mod cli;
pub mod cpu_baseline;
pub mod dirs;
pub mod dump;
pub mod fds;
pub mod http_prime;
pub mod instances;
pub mod lazy;
pub mod pageserver;
pub mod private_dirs;
pub mod progress;
pub mod record;
pub mod registry;
pub mod report;
pub mod restore;
pub mod run;
pub mod serve;
pub mod stats;
pub mod sys;
pub mod tool;
pub mod tree_check;
pub mod vdso_symbols;
