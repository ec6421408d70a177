//! The birth of processes: sandbox, init, exact pids, stdio, warm-point detection.
