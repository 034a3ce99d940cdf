//! Fixed-rate message schedule (`--rate`), as offsets from the start of the load.
//!
//! Global message `j` is due at `j / rate` seconds and belongs to connection `j % n`, so
//! connection `c` sends its `k`-th message at `(k·n + c) / rate`: every connection runs at
//! `rate / n`, staggered so the total is evenly spaced. Because each due time is a formula, a
//! connection that falls behind needs no queue: it remembers the next `k` it owes and sends
//! every due one as soon as it can, and each message's latency runs from its due time (no
//! coordinated omission).
//!
//! # Bounds
//! [`MIN_RATE`] and [`MAX_RATE`] bound `--rate` (validation refuses the rest), and the arithmetic
//! saturates anyway: a due offset too large for a `Duration` is `Duration::MAX`, a due time past
//! what an `Instant` holds is never ([`at`] is `None`), and message indices stop at `u64::MAX`
//! instead of wrapping to 0 (which made every message due again and spun forever).

use std::time::{Duration, Instant};

/// Lowest `--rate`: one message per 1 000 s over all connections. Below it a run of any
/// sensible length sends only message 0 (due at the start).
pub(crate) const MIN_RATE: f64 = 1e-3;
/// Highest `--rate`: 10 M messages/s over all connections, ten times what one generator thread
/// completes on loopback (BENCHMARKS.md); beyond it the schedule says nothing a plain run
/// (without `--rate`, as fast as the server answers) does not.
pub(crate) const MAX_RATE: f64 = 1e7;

/// The schedule for `n` connections sharing `rate` messages per second.
#[derive(Debug, Clone, Copy)]
pub(super) struct Schedule {
    /// Messages per second over all connections (positive, finite: checked by validation).
    rate: f64,
    /// Number of connections the rate is spread over (at least 1).
    n: u64,
}

impl Schedule {
    /// A schedule of `rate` messages/s over `n` connections.
    pub(super) fn new(rate: f64, n: usize) -> Schedule {
        debug_assert!(rate.is_finite() && rate > 0.0, "rate {rate}");
        Schedule {
            rate,
            n: n.max(1) as u64,
        }
    }

    /// When global message `j` is due, from the start of the load.
    pub(super) fn global_due(&self, j: u64) -> Duration {
        secs(j as f64 / self.rate)
    }

    /// The connection that global message `j` belongs to.
    pub(super) fn conn_of(&self, j: u64) -> usize {
        (j % self.n) as usize
    }

    /// When connection `c`'s `k`-th message is due, from the start of the load.
    pub(super) fn due(&self, c: usize, k: u64) -> Duration {
        secs((k as f64 * self.n as f64 + c as f64) / self.rate)
    }

    /// The first `k` of connection `c` due at or after `elapsed`: a connection that opens late
    /// starts there instead of owing every message scheduled before it existed.
    pub(super) fn first_k_at(&self, c: usize, elapsed: Duration) -> u64 {
        let k = (elapsed.as_secs_f64() * self.rate - c as f64) / self.n as f64;
        if k <= 0.0 {
            0
        } else {
            k.ceil() as u64
        }
    }

    /// The first global message due at or after `elapsed`.
    pub(super) fn first_j_at(&self, elapsed: Duration) -> u64 {
        (elapsed.as_secs_f64() * self.rate).ceil() as u64
    }
}

/// `t0 + offset`, or `None` when that is past what an `Instant` holds (never due).
pub(super) fn at(t0: Instant, offset: Duration) -> Option<Instant> {
    t0.checked_add(offset)
}

/// Seconds to a `Duration`, saturating instead of panicking on absurd values.
fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(d: Duration) -> u128 {
        d.as_micros()
    }

    #[test]
    fn global_messages_are_evenly_spaced_and_round_robin() {
        let s = Schedule::new(1000.0, 4);
        assert_eq!(us(s.global_due(0)), 0);
        assert_eq!(us(s.global_due(1)), 1000);
        assert_eq!(us(s.global_due(2500)), 2_500_000);
        let owners: Vec<usize> = (0..9).map(|j| s.conn_of(j)).collect();
        assert_eq!(owners, [0, 1, 2, 3, 0, 1, 2, 3, 0]);
    }

    #[test]
    fn per_connection_due_matches_the_global_schedule() {
        let s = Schedule::new(300.0, 7);
        for j in 0..1000u64 {
            let c = s.conn_of(j);
            let k = j / 7;
            assert_eq!(s.due(c, k), s.global_due(j), "j={j}");
        }
        // Each connection runs at rate / n.
        let gap = s.due(3, 11) - s.due(3, 10);
        assert_eq!(us(gap), 23_333); // 7 / 300 s
    }

    #[test]
    fn a_late_connection_starts_at_the_first_message_not_yet_due() {
        let s = Schedule::new(100.0, 2); // conn 0 due at 0, 20, 40 ms...; conn 1 at 10, 30, 50 ms
        assert_eq!(s.first_k_at(0, Duration::ZERO), 0);
        assert_eq!(s.first_k_at(1, Duration::ZERO), 0);
        assert_eq!(
            s.first_k_at(0, Duration::from_millis(20)),
            1,
            "exactly due counts"
        );
        assert_eq!(s.first_k_at(0, Duration::from_millis(21)), 2);
        assert_eq!(s.first_k_at(1, Duration::from_millis(25)), 1);
        for (c, ms) in [(0usize, 33u64), (1, 33), (0, 999), (1, 1000)] {
            let e = Duration::from_millis(ms);
            let k = s.first_k_at(c, e);
            assert!(s.due(c, k) >= e, "c={c} e={ms}ms");
            assert!(
                k == 0 || s.due(c, k - 1) < e,
                "c={c} e={ms}ms: not the first"
            );
        }
        assert_eq!(s.first_j_at(Duration::from_millis(25)), 3);
        assert_eq!(s.first_j_at(Duration::from_millis(30)), 3);
    }

    #[test]
    fn absurd_offsets_saturate() {
        let s = Schedule::new(1e-300, 1);
        assert_eq!(s.global_due(u64::MAX), Duration::MAX);
        assert_eq!(at(Instant::now(), s.global_due(1)), None);
        let s = Schedule::new(1e20, 1);
        assert_eq!(s.first_j_at(Duration::from_secs(3600)), u64::MAX);
        assert_eq!(s.first_k_at(0, Duration::from_secs(3600)), u64::MAX);
    }
}
