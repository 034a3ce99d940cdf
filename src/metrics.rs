//! Plain counters and gauges of one server loop.
//!
//! One thread owns the loop, so these are ordinary integers, not atomics. An embedder reads them
//! between turns ([`Server::metrics`](crate::Server::metrics)), or from the value
//! [`Server::run`](crate::Server::run) returns.

use std::fmt;

use crate::reason::{AcceptError, CloseReason, LingerEnd, RejectReason};

/// Upper bounds (inclusive, milliseconds) of the connection-lifetime histogram buckets.
pub const LIFETIME_BUCKETS_MS: [u64; 9] = [
    1, 10, 100, 1_000, 10_000, 60_000, 300_000, 1_800_000, 3_600_000,
];

/// Names of the `accept` error counters in [`Metrics::accept_errors`]: `emfile` (the
/// process's open-file limit), `enfile` (the system's), `nomem` (ENOBUFS/ENOMEM),
/// `connection` (the new connection's own error, e.g. ECONNABORTED, EPROTO, ENETUNREACH:
/// retried), `other`.
pub const ACCEPT_ERROR_NAMES: [&str; AcceptError::COUNT] = AcceptError::NAMES;

/// Names of the counters in [`Metrics::linger_ends`]: how lingering closes ended (the peer's
/// `eof`, the `timeout`, the `bytes` cap, a read `error`).
pub const LINGER_END_NAMES: [&str; LingerEnd::COUNT] = LingerEnd::NAMES;

/// Counters (monotonic) and gauges (current values) of one server loop.
///
/// The fields count accepted and dialed connections together, with the dialed part apart
/// ([`active_dialed`](Self::active_dialed), [`closed_dialed`](Self::closed_dialed),
/// [`dialed_bytes_in`](Self::dialed_bytes_in), ...). What is shown outside tells the two sides
/// apart: the [`Display`](fmt::Display) line and `/metrics` give the accepted side (a proxy's
/// clients) under the plain names (`active`, `closed`, `bytes_in`) and the dialed side (its
/// upstreams) under `dialed` ones (`active_dialed`, `dialed_closed`, `dialed_bytes_in`), so that
/// each side adds up: `accepted = active + closed` and `dialed = active_dialed + dialed_closed`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    /// Gauge: connections open for the handler, accepted and dialed (dials still connecting
    /// included; lingering ones not: see [`lingering`](Self::lingering)).
    pub active: u64,
    /// Highest `active` seen.
    pub peak: u64,
    /// Connections accepted and admitted.
    pub accepted: u64,
    /// Dials started.
    pub dialed: u64,
    /// Dials whose handshake completed.
    pub connected: u64,
    /// Gauge: dialed connections open (the part of `active` that is outbound).
    pub active_dialed: u64,
    /// Closes per [`CloseReason::index`], accepted and dialed connections together.
    pub closed: [u64; CloseReason::COUNT],
    /// Gauge: dials still completing their handshake.
    pub connecting: u64,
    /// Gauge: accepted connections waiting for their PROXY protocol header (not yet counted
    /// in `accepted` or `active`).
    pub awaiting_header: u64,
    /// The part of [`closed`](Self::closed) that were dialed connections.
    pub closed_dialed: [u64; CloseReason::COUNT],
    /// Refusals at accept per [`RejectReason::index`].
    pub rejected: [u64; RejectReason::COUNT],
    /// `accept` failures per kind, named by [`ACCEPT_ERROR_NAMES`] (WouldBlock is not one).
    pub accept_errors: [u64; AcceptError::COUNT],
    /// Times accepting paused (fd exhaustion, memory shortage, a turn of nothing but errors);
    /// while exhausted, each retry that fails again counts too.
    pub accept_pauses: u64,
    /// Gauge: connections lingering after a graceful close (closed for the handler, their
    /// write side shut, input discarded until the peer's EOF).
    pub lingering: u64,
    /// How lingering closes ended, named by [`LINGER_END_NAMES`].
    pub linger_ends: [u64; LingerEnd::COUNT],
    /// Bytes read from peers, accepted and dialed connections together.
    pub bytes_in: u64,
    /// Bytes written to peers, accepted and dialed connections together.
    pub bytes_out: u64,
    /// The part of [`bytes_in`](Self::bytes_in) read from dialed connections.
    pub dialed_bytes_in: u64,
    /// The part of [`bytes_out`](Self::bytes_out) written to dialed connections.
    pub dialed_bytes_out: u64,
    /// `write`/`writev` calls made to send them: output written to one connection during a
    /// turn leaves in one call (more only when the socket takes it in parts), so this grows by
    /// at most one per connection written to per turn in the common case.
    pub write_calls: u64,
    /// Gauge: bytes of output waiting for slow peers, over all connections.
    pub pending_bytes: u64,
    /// Loop turns (one poll each).
    pub turns: u64,
    /// Readiness events dispatched.
    pub events: u64,
    /// Events and wheel entries dropped because their generation no longer matched.
    pub stale: u64,
    /// Messages from other threads ([`Handle::send`](crate::Handle::send),
    /// [`Handle::close`](crate::Handle::close)) whose connection was gone when they arrived.
    pub remote_dropped: u64,
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
    /// Gauge: the effective connection cap (in a group of workers, the group's, which each
    /// worker reports and [`Metrics::sum`] does not add up).
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

    /// `accept` failures of the kind named `name` (one of [`ACCEPT_ERROR_NAMES`]).
    pub fn accept_errors_named(&self, name: &str) -> u64 {
        ACCEPT_ERROR_NAMES
            .iter()
            .position(|&n| n == name)
            .map_or(0, |i| self.accept_errors[i])
    }

    /// Lingering closes that ended the way named `name` (one of [`LINGER_END_NAMES`]).
    pub fn linger_ends_named(&self, name: &str) -> u64 {
        LINGER_END_NAMES
            .iter()
            .position(|&n| n == name)
            .map_or(0, |i| self.linger_ends[i])
    }

    pub(crate) fn count_close(&mut self, reason: CloseReason, dialed: bool, lifetime_us: u64) {
        self.closed[reason.index()] += 1;
        self.active -= 1;
        if dialed {
            self.closed_dialed[reason.index()] += 1;
            self.active_dialed -= 1;
        }
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

    pub(crate) fn count_dial(&mut self) {
        self.dialed += 1;
        self.connecting += 1;
        self.active_dialed += 1;
        self.active += 1;
        self.peak = self.peak.max(self.active);
    }
}

impl Metrics {
    /// Visits every counter and gauge, in a fixed order (arrays element by element;
    /// `fds_unaccounted` as its two's-complement bits). The one list of fields that publishing
    /// and summing go by, so that a new field needs adding only here.
    pub(crate) fn visit(&mut self, mut f: impl FnMut(&mut u64)) {
        for v in [
            &mut self.active,
            &mut self.peak,
            &mut self.accepted,
            &mut self.dialed,
            &mut self.connected,
            &mut self.active_dialed,
            &mut self.connecting,
            &mut self.awaiting_header,
            &mut self.accept_pauses,
            &mut self.lingering,
            &mut self.bytes_in,
            &mut self.bytes_out,
            &mut self.dialed_bytes_in,
            &mut self.dialed_bytes_out,
            &mut self.write_calls,
            &mut self.pending_bytes,
            &mut self.turns,
            &mut self.events,
            &mut self.stale,
            &mut self.remote_dropped,
            &mut self.drain_forced,
            &mut self.lifetime_sum_us,
            &mut self.fds_open,
            &mut self.max_connections,
            &mut self.fd_limit,
        ] {
            f(v);
        }
        let arrays: [&mut [u64]; 6] = [
            &mut self.closed,
            &mut self.closed_dialed,
            &mut self.rejected,
            &mut self.accept_errors,
            &mut self.linger_ends,
            &mut self.lifetime_buckets,
        ];
        for a in arrays {
            a.iter_mut().for_each(&mut f);
        }
        let mut bits = self.fds_unaccounted as u64;
        f(&mut bits);
        self.fds_unaccounted = bits as i64;
    }

    /// How many values [`visit`](Self::visit) visits.
    pub(crate) fn width() -> usize {
        let mut n = 0;
        Metrics::default().visit(|_| n += 1);
        n
    }

    /// The metrics of several loops (workers) as one: counters and most gauges add up; the fd
    /// limit and the fds seen by the leak self-check are the process's, so they are taken, not
    /// summed (from the first); the connection cap is the group's, which every worker reports
    /// (the largest is taken); `peak` is the sum of the loops' peaks.
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a Metrics>) -> Metrics {
        let mut total = Metrics::default();
        let mut first = true;
        let mut cap = 0;
        for m in all {
            let mut values = Vec::with_capacity(Metrics::width());
            m.clone().visit(|v| values.push(*v));
            let mut i = 0;
            total.visit(|v| {
                *v = v.wrapping_add(values[i]);
                i += 1;
            });
            cap = cap.max(m.max_connections);
            if first {
                (total.fd_limit, total.fds_open, total.fds_unaccounted) =
                    (m.fd_limit, m.fds_open, m.fds_unaccounted);
                first = false;
            } else {
                total.fd_limit -= m.fd_limit;
                total.fds_open -= m.fds_open;
                total.fds_unaccounted = total.fds_unaccounted.wrapping_sub(m.fds_unaccounted);
            }
        }
        total.max_connections = cap;
        total
    }

    /// Dials that ended before their handshake completed: refused, unreachable, timed out,
    /// another error while connecting, or closed by the handler or a stop before they connected.
    pub fn dial_failures(&self) -> u64 {
        self.dialed - self.connected - self.connecting
    }

    /// Accepted connections open for the handler (the accepted side of [`active`](Self::active)).
    pub(crate) fn active_accepted(&self) -> u64 {
        self.active - self.active_dialed
    }

    /// Closes of accepted connections, per [`CloseReason::index`].
    pub(crate) fn closed_accepted(&self) -> [u64; CloseReason::COUNT] {
        std::array::from_fn(|i| self.closed[i] - self.closed_dialed[i])
    }
}

/// Writes ` NAME=TOTAL{reason=n ..}` (reasons with a zero count left out).
fn write_counts(
    f: &mut fmt::Formatter<'_>,
    name: &str,
    names: &[&str],
    counts: &[u64],
) -> fmt::Result {
    write!(f, " {name}={}{{", counts.iter().sum::<u64>())?;
    let mut sep = "";
    for (name, n) in names.iter().zip(counts) {
        if *n > 0 {
            write!(f, "{sep}{name}={n}")?;
            sep = " ";
        }
    }
    f.write_str("}")
}

/// One line for logs: `active=.. peak=.. accepted=.. closed=N{reason=n ..} rejected=N{..}
/// bytes_in=.. bytes_out=.. pending=..`; reasons with a zero count are left out. These are the
/// accepted side's figures (`peak` and `pending` are both sides'); once anything was dialed, the
/// dialed side follows: `dialed=.. connected=.. active_dialed=.. dialed_closed=N{..}
/// dialed_bytes_in=.. dialed_bytes_out=..`.
impl fmt::Display for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "active={} peak={} accepted={}",
            self.active_accepted(),
            self.peak,
            self.accepted,
        )?;
        write_counts(f, "closed", &CloseReason::NAMES, &self.closed_accepted())?;
        write_counts(f, "rejected", &RejectReason::NAMES, &self.rejected)?;
        write!(
            f,
            " bytes_in={} bytes_out={} pending={}",
            self.bytes_in - self.dialed_bytes_in,
            self.bytes_out - self.dialed_bytes_out,
            self.pending_bytes
        )?;
        if self.dialed > 0 {
            write!(
                f,
                " dialed={} connected={} active_dialed={}",
                self.dialed, self.connected, self.active_dialed,
            )?;
            write_counts(f, "dialed_closed", &CloseReason::NAMES, &self.closed_dialed)?;
            write!(
                f,
                " dialed_bytes_in={} dialed_bytes_out={}",
                self.dialed_bytes_in, self.dialed_bytes_out
            )?;
        }
        let lingered: u64 = self.linger_ends.iter().sum();
        if self.lingering > 0 || lingered > 0 {
            write!(f, " lingering={}", self.lingering)?;
            write_counts(f, "lingered", &LINGER_END_NAMES, &self.linger_ends)?;
        }
        if self.accept_errors.iter().any(|&n| n > 0) {
            write_counts(f, "accept_errors", &ACCEPT_ERROR_NAMES, &self.accept_errors)?;
            write!(f, " accept_pauses={}", self.accept_pauses)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visit_covers_every_field_and_sum_adds_them() {
        // Every field set to a distinct value must come back through visit: a field missing
        // from the list would keep its zero.
        let mut m = Metrics::default();
        let mut n = 0u64;
        m.visit(|v| {
            n += 1;
            *v = n;
        });
        assert_eq!(n as usize, Metrics::width());
        let debug = format!("{m:?}");
        assert!(
            !debug.contains(": 0,") && !debug.contains(" 0]") && !debug.contains("[0"),
            "{debug}"
        );
        let total = Metrics::sum([&m, &m]);
        assert_eq!(total.accepted, 2 * m.accepted);
        assert_eq!(total.closed[3], 2 * m.closed[3]);
        assert_eq!(
            total.fd_limit, m.fd_limit,
            "the process's limit is not summed"
        );
        assert_eq!(
            total.max_connections, m.max_connections,
            "the group's cap is not summed"
        );
        assert_eq!(total.fds_unaccounted, m.fds_unaccounted);
    }

    #[test]
    fn summary_line_names_nonzero_reasons() {
        let mut m = Metrics::default();
        m.count_open();
        m.count_open();
        m.count_close(CloseReason::IdleTimeout, false, 1500);
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

    #[test]
    fn the_line_tells_the_accepted_side_from_the_dialed_one_and_each_adds_up() {
        // A proxy's three sessions, two ended: each client closed by the proxy, each upstream
        // on its FIN.
        let mut m = Metrics::default();
        for _ in 0..3 {
            m.count_open();
            m.count_dial();
            m.connecting -= 1;
            m.connected += 1;
        }
        for _ in 0..2 {
            m.count_close(CloseReason::Handler, false, 10);
            m.count_close(CloseReason::PeerClosed, true, 10);
        }
        (
            m.bytes_in,
            m.dialed_bytes_in,
            m.bytes_out,
            m.dialed_bytes_out,
        ) = (10, 4, 10, 6);
        let line = m.to_string();
        assert!(
            line.starts_with("active=1 peak=6 accepted=3 closed=2{handler=2} rejected=0{}"),
            "{line}"
        );
        assert!(
            line.ends_with(
                " bytes_in=6 bytes_out=4 pending=0 dialed=3 connected=3 active_dialed=1 \
                 dialed_closed=2{peer_closed=2} dialed_bytes_in=4 dialed_bytes_out=6"
            ),
            "{line}"
        );
    }
}
