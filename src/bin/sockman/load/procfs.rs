//! What the generator reads from `/proc`: the server's CPU time and RSS, the clock-tick rate,
//! and this process's open descriptors. Every reader returns `None` when the file is missing or
//! unparsable (another OS, a server that exited, no permission); the report then says "n/a".

use std::fs;

/// `AT_CLKTCK` in the ELF auxiliary vector: the unit of utime/stime in `/proc/PID/stat`.
const AT_CLKTCK: u64 = 17;

/// Clock ticks per second when the auxiliary vector is unreadable: `getconf CLK_TCK` is 100 on
/// every Linux architecture (the kernel's USER_HZ).
const DEFAULT_CLK_TCK: u64 = 100;

/// One reading of the server process.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ServerSample {
    /// utime + stime, in clock ticks (all threads).
    pub(super) cpu_ticks: Option<u64>,
    /// Resident set size in bytes (VmRSS).
    pub(super) rss_bytes: Option<u64>,
}

/// Reads `/proc/PID/stat` and `/proc/PID/status`.
pub(super) fn sample(pid: u32) -> ServerSample {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok();
    ServerSample {
        cpu_ticks: stat.as_deref().and_then(parse_stat_cpu_ticks),
        rss_bytes: status.as_deref().and_then(parse_status_rss),
    }
}

/// utime + stime from the text of `/proc/PID/stat`. The command name (field 2) is in
/// parentheses and may itself hold spaces and ')', so fields are counted after the *last* ')':
/// there field 3 (state) is index 0, utime (14) index 11 and stime (15) index 12.
pub(super) fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS in bytes from the text of `/proc/PID/status` (the file says kB, meaning KiB).
pub(super) fn parse_status_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut words = line["VmRSS:".len()..].split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => Some(kib * 1024),
        _ => None,
    }
}

/// Clock ticks per second, read from `/proc/self/auxv` (pairs of native-endian words:
/// type, value) without libc; [`DEFAULT_CLK_TCK`] when that fails.
pub(super) fn clk_tck() -> u64 {
    fs::read("/proc/self/auxv")
        .ok()
        .and_then(|auxv| parse_auxv(&auxv, AT_CLKTCK))
        .filter(|&hz| hz > 0)
        .unwrap_or(DEFAULT_CLK_TCK)
}

/// The value of entry `key` in an auxiliary vector of native-width words.
pub(super) fn parse_auxv(auxv: &[u8], key: u64) -> Option<u64> {
    const W: usize = std::mem::size_of::<usize>();
    let word = |b: &[u8]| -> Option<u64> {
        let mut buf = [0u8; W];
        buf.copy_from_slice(b.get(..W)?);
        Some(usize::from_ne_bytes(buf) as u64)
    };
    for pair in auxv.chunks_exact(2 * W) {
        let (k, v) = (word(&pair[..W])?, word(&pair[W..])?);
        if k == key {
            return Some(v);
        }
        if k == 0 {
            break; // AT_NULL ends the vector
        }
    }
    None
}

/// Descriptors this process has open now (entries of `/proc/self/fd`, less the one the
/// listing itself uses), or `None` when `/proc` is unavailable.
pub(super) fn open_fds() -> Option<u64> {
    let n = fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(n.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_is_counted_after_the_last_paren() {
        let stat = "1234 (we ird) (x)) S 1 1234 1234 0 -1 4194560 500 0 0 0 \
                    370 25 0 0 20 0 1 0 100 12345678 300 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(395));
        assert_eq!(parse_stat_cpu_ticks("1234 (short) S 1 2"), None);
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn rss_is_read_in_kib() {
        let status = "Name:\tepoll_echo\nVmPeak:\t    9000 kB\nVmRSS:\t    1532 kB\nThreads:\t1\n";
        assert_eq!(parse_status_rss(status), Some(1532 * 1024));
        assert_eq!(parse_status_rss("Name:\tx\n"), None);
        assert_eq!(parse_status_rss("VmRSS: lots\n"), None);
    }

    #[test]
    fn auxv_lookup_finds_the_key_and_stops_at_null() {
        let mut v = Vec::new();
        for (k, val) in [(6u64, 4096u64), (17, 100), (0, 0), (17, 5)] {
            v.extend_from_slice(&(k as usize).to_ne_bytes());
            v.extend_from_slice(&(val as usize).to_ne_bytes());
        }
        assert_eq!(parse_auxv(&v, 17), Some(100));
        assert_eq!(parse_auxv(&v, 6), Some(4096));
        assert_eq!(parse_auxv(&v, 99), None);
        assert_eq!(parse_auxv(&v[..5], 17), None);
    }

    #[test]
    fn this_process_is_readable() {
        let me = sample(std::process::id());
        assert!(me.cpu_ticks.is_some());
        assert!(me.rss_bytes.unwrap_or(0) > 0);
        assert!(clk_tck() >= 1);
        assert!(open_fds().unwrap_or(0) >= 1);
    }
}
