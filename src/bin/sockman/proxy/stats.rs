//! The proxy's counters: per upstream and per worker, written by each worker into its own
//! slots and summed by whoever reads them.
//!
//! Owns what the counters look like outside: the proxy's part of the stats line
//! ([`Stats::line`]) and its families of `/metrics` ([`Stats::write_metrics`]).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// What happened to one upstream through one worker. Atomics written by that worker only
/// (uncontended), summed by whoever reads them: the stats line, worker 0's `/metrics`.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) dials: AtomicU64,
    pub(super) dial_failures: AtomicU64,
    /// Times it was marked down.
    pub(super) marked_down: AtomicU64,
    /// Sessions through it now, and in all.
    pub(super) active: AtomicU64,
    pub(super) sessions: AtomicU64,
    /// Bytes client → upstream, and upstream → client.
    pub(super) bytes_up: AtomicU64,
    pub(super) bytes_down: AtomicU64,
}

/// The per-upstream families of `/metrics`, in their order there: the name after
/// `sockman_upstream_`, the type, the help text, and the [`Counters`] field summed over the
/// workers (one sample per upstream).
const UPSTREAM_FAMILIES: [(&str, &str, &str, fn(&Counters) -> &AtomicU64); 7] = [
    (
        "dials_total",
        "counter",
        "Dials started to this upstream.",
        |c| &c.dials,
    ),
    (
        "dial_failures_total",
        "counter",
        "Dials to this upstream that failed (refused, unreachable, timed out, at the cap).",
        |c| &c.dial_failures,
    ),
    (
        "marked_down_total",
        "counter",
        "Times a worker skipped this upstream after its dials failed in a row.",
        |c| &c.marked_down,
    ),
    (
        "sessions_active",
        "gauge",
        "Sessions through this upstream now.",
        |c| &c.active,
    ),
    (
        "sessions_total",
        "counter",
        "Sessions through this upstream.",
        |c| &c.sessions,
    ),
    (
        "sent_bytes_total",
        "counter",
        "Bytes relayed from clients to this upstream.",
        |c| &c.bytes_up,
    ),
    (
        "received_bytes_total",
        "counter",
        "Bytes relayed from this upstream to clients.",
        |c| &c.bytes_down,
    ),
];

/// The proxy-wide counters of `/metrics`, after the upstream families: the name after
/// `sockman_proxy_`, the help text, and the [`WorkerStats`] field summed over the workers.
const PROXY_TOTALS: [(&str, &str, fn(&WorkerStats) -> &AtomicU64); 2] = [
    (
        "no_upstream_total",
        "Clients closed because no dial succeeded.",
        |w| &w.no_upstream,
    ),
    (
        "skipped_total",
        "Dials that skipped an upstream marked down.",
        |w| &w.skipped,
    ),
];

/// One worker's counters, on cache lines of their own.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(super) struct WorkerStats {
    /// Indexed like the upstreams.
    pub(super) upstreams: Vec<Counters>,
    /// Clients closed because no dial succeeded.
    pub(super) no_upstream: AtomicU64,
    /// Dials that skipped an upstream marked down.
    pub(super) skipped: AtomicU64,
}

/// The proxy's counters for every worker (see [`Counters`]).
#[derive(Debug)]
pub(crate) struct Stats {
    addrs: Vec<SocketAddr>,
    workers: Vec<WorkerStats>,
}

impl Stats {
    pub(crate) fn new(upstreams: &[SocketAddr], workers: usize) -> Arc<Stats> {
        Arc::new(Stats {
            addrs: upstreams.to_vec(),
            workers: (0..workers.max(1))
                .map(|_| WorkerStats {
                    upstreams: upstreams.iter().map(|_| Counters::default()).collect(),
                    ..WorkerStats::default()
                })
                .collect(),
        })
    }

    /// Worker `me`'s counters (each worker writes only its own).
    pub(super) fn worker(&self, me: usize) -> &WorkerStats {
        &self.workers[me]
    }

    /// `field` of upstream `i`, summed over the workers.
    fn upstream(&self, i: usize, field: impl Fn(&Counters) -> &AtomicU64) -> u64 {
        self.workers
            .iter()
            .map(|w| field(&w.upstreams[i]).load(Relaxed))
            .sum()
    }

    /// `field` over every upstream and worker.
    fn all(&self, field: impl Fn(&Counters) -> &AtomicU64 + Copy) -> u64 {
        (0..self.addrs.len()).map(|i| self.upstream(i, field)).sum()
    }

    /// `field` over every worker.
    fn worker_sum(&self, field: impl Fn(&WorkerStats) -> &AtomicU64) -> u64 {
        self.workers.iter().map(|w| field(w).load(Relaxed)).sum()
    }

    /// The proxy's part of the stats line.
    pub(crate) fn line(&self) -> String {
        format!(
            " sessions={} active_sessions={} dial_failures={} no_upstream={}",
            self.all(|c| &c.sessions),
            self.all(|c| &c.active),
            self.all(|c| &c.dial_failures),
            self.worker_sum(|w| &w.no_upstream),
        )
    }

    /// The proxy's families of `/metrics`, each counter summed over the workers.
    pub(super) fn write_metrics(&self, out: &mut String) {
        for (name, kind, help, field) in UPSTREAM_FAMILIES {
            let _ = writeln!(
                out,
                "# HELP sockman_upstream_{name} {help}\n# TYPE sockman_upstream_{name} {kind}"
            );
            for (i, addr) in self.addrs.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "sockman_upstream_{name}{{upstream=\"{addr}\"}} {}",
                    self.upstream(i, field)
                );
            }
        }
        for (name, help, field) in PROXY_TOTALS {
            let _ = writeln!(
                out,
                "# HELP sockman_proxy_{name} {help}\n# TYPE sockman_proxy_{name} counter\nsockman_proxy_{name} {}",
                self.worker_sum(field)
            );
        }
    }
}
