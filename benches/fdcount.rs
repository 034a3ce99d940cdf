//! What the leak self-check costs the loop, by open descriptors: listing `/proc/self/fd` (what
//! the check did before Linux 6.2, O(fds)) against the `stat` size of the directory (Linux 6.2+:
//! the count in one syscall). `cargo bench --bench fdcount`.
//!
//! The process's hard limit here is 20 000 descriptors, so 200 000 cannot be opened: the figures
//! go to 19 000 and the listing's cost per descriptor gives the rest.

use std::time::{Duration, Instant};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard);
    let _ = soft;
    let mut files = Vec::new();
    println!(
        "{:>8} {:>14} {:>12} {:>14}",
        "fds", "listing", "stat", "listing/fd"
    );
    for target in [100usize, 1_000, 5_000, 10_000, 19_000] {
        while files.len() < target && (files.len() as u64) < hard - 100 {
            files.push(std::fs::File::open("/dev/null").expect("open /dev/null"));
        }
        let reps = 21;
        let listing = median(
            (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    let n = std::fs::read_dir("/proc/self/fd").unwrap().count();
                    assert!(n >= target);
                    t.elapsed()
                })
                .collect(),
        );
        let stat = median(
            (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    let n = std::fs::metadata("/proc/self/fd").unwrap().len();
                    assert!(n as usize >= target);
                    t.elapsed()
                })
                .collect(),
        );
        println!(
            "{:>8} {:>11.1} µs {:>9.2} µs {:>11.0} ns",
            files.len(),
            listing.as_secs_f64() * 1e6,
            stat.as_secs_f64() * 1e6,
            listing.as_nanos() as f64 / files.len() as f64
        );
    }
}
