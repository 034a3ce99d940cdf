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

use super::session::End;

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

/// One metric family of `/metrics` that sums a counter over the workers.
struct Family<T> {
    /// The whole name, as it stands in `/metrics`.
    name: &'static str,
    /// The Prometheus type: `counter` or `gauge`.
    kind: &'static str,
    help: &'static str,
    /// The counter, in a [`Counters`] (one sample per upstream) or a [`WorkerStats`].
    field: fn(&T) -> &AtomicU64,
}

impl<T> Family<T> {
    /// Writes the family's `# HELP` and `# TYPE` lines, which go before its samples.
    fn write_header(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP {} {}\n# TYPE {} {}",
            self.name, self.help, self.name, self.kind
        );
    }
}

/// The per-upstream families of `/metrics`, in their order there.
const UPSTREAM_FAMILIES: [Family<Counters>; 7] = [
    Family {
        name: "sockman_upstream_dials_total",
        kind: "counter",
        help: "Dials started to this upstream (not those the proxy could not start itself).",
        field: |c| &c.dials,
    },
    Family {
        name: "sockman_upstream_dial_failures_total",
        kind: "counter",
        help: "Dials to this upstream that failed: refused, unreachable, timed out or reset. Dials the proxy refused itself (at its connection cap, out of descriptors) are not counted here.",
        field: |c| &c.dial_failures,
    },
    Family {
        name: "sockman_upstream_marked_down_total",
        kind: "counter",
        help: "Times a worker skipped this upstream after its dials failed in a row.",
        field: |c| &c.marked_down,
    },
    Family {
        name: "sockman_upstream_sessions_active",
        kind: "gauge",
        help: "Sessions through this upstream now.",
        field: |c| &c.active,
    },
    Family {
        name: "sockman_upstream_sessions_total",
        kind: "counter",
        help: "Sessions through this upstream.",
        field: |c| &c.sessions,
    },
    Family {
        name: "sockman_upstream_sent_bytes_total",
        kind: "counter",
        help: "Bytes relayed from clients to this upstream.",
        field: |c| &c.bytes_up,
    },
    Family {
        name: "sockman_upstream_received_bytes_total",
        kind: "counter",
        help: "Bytes relayed from this upstream to clients.",
        field: |c| &c.bytes_down,
    },
];

/// The proxy-wide counters of `/metrics`, after the upstream families.
const PROXY_TOTALS: [Family<WorkerStats>; 3] = [
    Family {
        name: "sockman_proxy_no_upstream_total",
        kind: "counter",
        help: "Clients closed because no dial succeeded.",
        field: |w| &w.no_upstream,
    },
    Family {
        name: "sockman_proxy_skipped_total",
        kind: "counter",
        help: "Dials that skipped an upstream marked down.",
        field: |w| &w.skipped,
    },
    Family {
        name: "sockman_proxy_local_dial_errors_total",
        kind: "counter",
        help: "Dials the proxy could not start for its own lack of descriptors, memory or local ports (EMFILE, ENFILE, ENOBUFS, ENOMEM, EADDRNOTAVAIL): the client was shed, no upstream blamed.",
        field: |w| &w.local_dial_errors,
    },
];

/// Sessions ended, per termination state ([`End::index`]).
#[derive(Debug)]
pub(super) struct Ended(pub(super) [AtomicU64; End::COUNT]);

impl Default for Ended {
    fn default() -> Ended {
        Ended(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl std::ops::Index<usize> for Ended {
    type Output = AtomicU64;
    fn index(&self, i: usize) -> &AtomicU64 {
        &self.0[i]
    }
}

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
    /// Dials the proxy could not start itself (out of descriptors, memory, local ports).
    pub(super) local_dial_errors: AtomicU64,
    /// Sessions ended (every accepted client, counted at its close), by termination state.
    pub(super) ended: Ended,
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

    /// Sessions ended in termination state `i` ([`End::index`]), over the workers.
    fn ended(&self, i: usize) -> u64 {
        self.workers.iter().map(|w| w.ended[i].load(Relaxed)).sum()
    }

    /// The proxy's part of the stats line: ` sessions=.. active_sessions=..
    /// sessions_ended=N{--=n CD=n ..} dial_failures=.. no_upstream=.. local_dial_errors=..`
    /// (states with a zero count left out).
    pub(crate) fn line(&self) -> String {
        let ended: Vec<(End, u64)> = (0..End::COUNT)
            .map(|i| (End::from_index(i), self.ended(i)))
            .filter(|&(_, n)| n > 0)
            .collect();
        let mut states = String::new();
        for (end, n) in &ended {
            let sep = if states.is_empty() { "" } else { " " };
            let _ = write!(states, "{sep}{end}={n}");
        }
        format!(
            " sessions={} active_sessions={} sessions_ended={}{{{states}}} dial_failures={} no_upstream={} local_dial_errors={}",
            self.all(|c| &c.sessions),
            self.all(|c| &c.active),
            ended.iter().map(|(_, n)| n).sum::<u64>(),
            self.all(|c| &c.dial_failures),
            self.worker_sum(|w| &w.no_upstream),
            self.worker_sum(|w| &w.local_dial_errors),
        )
    }

    /// The proxy's families of `/metrics`, each counter summed over the workers.
    pub(super) fn write_metrics(&self, out: &mut String) {
        for family in &UPSTREAM_FAMILIES {
            family.write_header(out);
            for (i, addr) in self.addrs.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{}{{upstream=\"{addr}\"}} {}",
                    family.name,
                    self.upstream(i, family.field)
                );
            }
        }
        for family in &PROXY_TOTALS {
            family.write_header(out);
            let _ = writeln!(out, "{} {}", family.name, self.worker_sum(family.field));
        }
        // Every state that happened, and the normal end always (so that the family is there
        // from the start).
        let name = "sockman_proxy_sessions_ended_total";
        let _ = writeln!(
            out,
            "# HELP {name} Sessions ended (each accepted client, at its close), by termination state: who ended it and in which phase, as HAProxy's (-- normal, CD client abort in data, SD upstream abort, cD/sD timeouts, SC/sC no upstream, PC at the cap, RC out of resources, DD stopping; see the README).\n# TYPE {name} counter"
        );
        for i in 0..End::COUNT {
            let n = self.ended(i);
            let end = End::from_index(i);
            if n > 0 || end == End::NORMAL {
                let _ = writeln!(out, "{name}{{state=\"{end}\"}} {n}");
            }
        }
    }
}
