//! Plain counters and gauges of one server loop.
//!
//! One thread owns the loop, so these are ordinary integers, not atomics. An embedder reads them
//! between turns ([`Server::metrics`](crate::Server::metrics)), or from the value
//! [`Server::run`](crate::Server::run) returns.

use std::fmt;

use crate::close::CloseReason;

/// Why a connection was refused at accept (it never became a connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectReason {
    /// The server was at its connection cap.
    Full,
    /// The peer IP already had `max_per_ip` connections.
    PerIp,
    /// Accepted and closed while shedding after EMFILE/ENFILE (the spare-fd trick).
    Shed,
    /// The socket could not be registered with the poll.
    Register,
}

impl RejectReason {
    /// Number of counters, one per variant.
    pub const COUNT: usize = 4;
    /// Counter names, in [`RejectReason::index`] order.
    pub const NAMES: [&'static str; Self::COUNT] = ["full", "per_ip", "shed", "register"];

    /// The counter slot of this reason.
    pub fn index(self) -> usize {
        match self {
            RejectReason::Full => 0,
            RejectReason::PerIp => 1,
            RejectReason::Shed => 2,
            RejectReason::Register => 3,
        }
    }
}

/// Upper bounds (inclusive, milliseconds) of the connection-lifetime histogram buckets.
pub const LIFETIME_BUCKETS_MS: [u64; 9] = [
    1, 10, 100, 1_000, 10_000, 60_000, 300_000, 1_800_000, 3_600_000,
];

/// Counters (monotonic) and gauges (current values) of one server loop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Gauge: open connections.
    pub active: u64,
    /// Highest `active` seen.
    pub peak: u64,
    /// Connections accepted and admitted.
    pub accepted: u64,
    /// Closes per [`CloseReason::index`].
    pub closed: [u64; CloseReason::COUNT],
    /// Refusals at accept per [`RejectReason::index`].
    pub rejected: [u64; RejectReason::COUNT],
    /// `accept` failures with EMFILE (the process's open-file limit).
    pub accept_emfile: u64,
    /// `accept` failures with ENFILE (the system-wide file limit) or ENOBUFS/ENOMEM.
    pub accept_enfile: u64,
    /// Other `accept` failures (not counting WouldBlock, EINTR, ECONNABORTED).
    pub accept_other: u64,
    /// Times accepting was paused after fd exhaustion.
    pub accept_pauses: u64,
    /// Bytes read from peers.
    pub bytes_in: u64,
    /// Bytes written to peers.
    pub bytes_out: u64,
    /// Gauge: bytes of output waiting for slow peers, over all connections.
    pub pending_bytes: u64,
    /// Loop turns (one poll each).
    pub turns: u64,
    /// Readiness events dispatched.
    pub events: u64,
    /// Events and wheel entries dropped because their generation no longer matched.
    pub stale: u64,
    /// Connections still open at a drain's deadline, closed by force.
    pub drain_forced: u64,
    /// Connection lifetimes: count per bucket of [`LIFETIME_BUCKETS_MS`] (the last slot is
    /// everything longer), for the `/metrics` histogram.
    pub lifetime_buckets: [u64; LIFETIME_BUCKETS_MS.len() + 1],
    /// Sum of connection lifetimes, in microseconds.
    pub lifetime_sum_us: u64,
    /// Gauge: descriptors the process has open, from the last leak self-check (0 = not checked).
    pub fds_open: u64,
    /// Gauge: open descriptors the last leak self-check could not account for (process fds minus
    /// connections, the loop's own fds and those open before the server started). Non-zero means
    /// a leak — or files the embedder opened since.
    pub fds_unaccounted: i64,
    /// Gauge: the effective connection cap.
    pub max_connections: u64,
    /// Gauge: the soft open-file limit in force (0 if unknown).
    pub fd_limit: u64,
}

impl Metrics {
    /// Closes with this reason so far.
    pub fn closed_by(&self, reason: CloseReason) -> u64 {
        self.closed[reason.index()]
    }

    /// Closes for any reason so far.
    pub fn closed_total(&self) -> u64 {
        self.closed.iter().sum()
    }

    /// Refusals for this reason so far.
    pub fn rejected_by(&self, reason: RejectReason) -> u64 {
        self.rejected[reason.index()]
    }

    pub(crate) fn count_close(&mut self, reason: CloseReason, lifetime_us: u64) {
        self.closed[reason.index()] += 1;
        self.active -= 1;
        let bucket = LIFETIME_BUCKETS_MS
            .iter()
            .position(|&le_ms| lifetime_us <= le_ms * 1000)
            .unwrap_or(LIFETIME_BUCKETS_MS.len());
        self.lifetime_buckets[bucket] += 1;
        self.lifetime_sum_us = self.lifetime_sum_us.saturating_add(lifetime_us);
    }

    pub(crate) fn count_open(&mut self) {
        self.accepted += 1;
        self.active += 1;
        self.peak = self.peak.max(self.active);
    }
}

/// One line for logs: `active=.. peak=.. accepted=.. closed=N{reason=n ..} rejected=N{..}
/// bytes_in=.. bytes_out=.. pending=..`; reasons with a zero count are left out.
impl fmt::Display for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "active={} peak={} accepted={} closed={}{{",
            self.active,
            self.peak,
            self.accepted,
            self.closed_total()
        )?;
        let mut sep = "";
        for (name, n) in CloseReason::NAMES.iter().zip(self.closed) {
            if n > 0 {
                write!(f, "{sep}{name}={n}")?;
                sep = " ";
            }
        }
        write!(f, "}} rejected={}{{", self.rejected.iter().sum::<u64>())?;
        sep = "";
        for (name, n) in RejectReason::NAMES.iter().zip(self.rejected) {
            if n > 0 {
                write!(f, "{sep}{name}={n}")?;
                sep = " ";
            }
        }
        write!(
            f,
            "}} bytes_in={} bytes_out={} pending={}",
            self.bytes_in, self.bytes_out, self.pending_bytes
        )?;
        let accept_errors = self.accept_emfile + self.accept_enfile + self.accept_other;
        if accept_errors > 0 {
            write!(
                f,
                " accept_errors={{emfile={} enfile={} other={}}} accept_pauses={}",
                self.accept_emfile, self.accept_enfile, self.accept_other, self.accept_pauses
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_line_names_nonzero_reasons() {
        let mut m = Metrics::default();
        m.count_open();
        m.count_open();
        m.count_close(CloseReason::IdleTimeout, 1500);
        assert_eq!(m.lifetime_buckets[1], 1);
        m.rejected[RejectReason::Full.index()] += 3;
        let line = m.to_string();
        assert!(
            line.starts_with("active=1 peak=2 accepted=2 closed=1{idle_timeout=1}"),
            "{line}"
        );
        assert!(line.contains("rejected=3{full=3}"), "{line}");
        assert!(!line.contains("reset"), "{line}");
    }
}
