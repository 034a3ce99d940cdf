//! What `/proc` says about a process (the `sockman` child, never the test process itself: a test
//! thread shares its process with every other test of its file).

use std::time::Duration;

/// Open descriptors of process `pid` (from `/proc/PID/fd`). Only meaningful for a child
/// process: a test thread shares its process with every other test of its file.
#[track_caller]
pub fn fd_count(pid: u32) -> usize {
    fd_dir(pid).count()
}

/// Open descriptors of `pid` numbered below `limit`: only those use up `RLIMIT_NOFILE` room.
#[track_caller]
pub fn fds_below(pid: u32, limit: u64) -> usize {
    fd_dir(pid)
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .filter(|&fd| fd < limit)
        .count()
}

#[track_caller]
fn fd_dir(pid: u32) -> std::fs::ReadDir {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("cannot list /proc/{pid}/fd: {e}"))
}

/// The fields of `/proc/PID/stat` from field 3 (the state) on: the command name (field 2) may
/// contain spaces and parentheses, so they are the ones after the last ')'.
#[track_caller]
fn stat_fields(pid: u32) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/stat: {e}"));
    let after = &stat[stat.rfind(')').expect("no ')' in /proc/PID/stat") + 1..];
    after.split_whitespace().map(String::from).collect()
}

/// The scheduler state of process `pid` (`R`, `S`, `T` for stopped, ...) from `/proc/PID/stat`.
#[track_caller]
pub fn state(pid: u32) -> char {
    stat_fields(pid)[0].chars().next().unwrap()
}

/// CPU time (user + system, all threads) of process `pid` so far, from `/proc/PID/stat`.
#[track_caller]
pub fn cpu_time(pid: u32) -> Duration {
    let fields = stat_fields(pid);
    // fields[0] is field 3 (state); utime is field 14, stime field 15.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_nanos(ticks * 1_000_000_000 / clock_ticks_per_second())
}

/// `sysconf(_SC_CLK_TCK)` via `getconf`, 100 (Linux's USER_HZ everywhere) if that fails.
pub fn clock_ticks_per_second() -> u64 {
    static TCK: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// VmRSS of process `pid`, in KiB.
#[track_caller]
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}
