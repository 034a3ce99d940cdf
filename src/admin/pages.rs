//! What each admin path answers: routing (`GET`/`HEAD`, 404, 405), `/metrics` (Prometheus
//! text, a total and one series per worker), `/connections` (one line per connection),
//! `/livez`, `/readyz`. Pure functions of a [`View`]: no socket here (`http.rs` has them).

use std::fmt::Write as _;

use super::View;
use crate::conn::{flag, Conn, Phase};
use crate::metrics::{Metrics, ACCEPT_ERROR_NAMES, LIFETIME_BUCKETS_MS, LINGER_END_NAMES};
use crate::reason::{CloseReason, RejectReason};
use crate::time::Tick;

/// `/connections` lines by default, and at most.
const DEFAULT_LIMIT: usize = 1_000;
/// Bounds one response (~130 bytes a line, ~2.6 MB at most): about every connection this
/// machine's fd limit allows, in one transient buffer freed when the response is sent.
const MAX_LIMIT: usize = 20_000;

/// A parsed `/connections` query.
#[derive(Debug, Clone, Copy)]
pub(super) struct Query {
    pub(super) limit: usize,
    pub(super) by_idle: bool,
}

pub(super) fn simple(code: u16, reason: &str, body: &str) -> Vec<u8> {
    response(code, reason, "text/plain; charset=utf-8", "", body)
}

/// A whole response: status line, headers (`extra` is more header lines, each ending in CRLF),
/// and the body.
fn response(code: u16, reason: &str, content_type: &str, extra: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

pub(super) fn route<S>(method: &str, target: &str, view: &View<'_, S>) -> Vec<u8> {
    let mut answer = match method {
        "GET" | "HEAD" => get(target, view),
        _ => response(
            405,
            "Method Not Allowed",
            "text/plain; charset=utf-8",
            "Allow: GET, HEAD\r\n",
            "only GET and HEAD\n",
        ),
    };
    if method == "HEAD" {
        strip_body(&mut answer);
    }
    answer
}

/// A HEAD answer: the same head as for GET (Content-Length included), without the body
/// (RFC 9110 9.3.2).
pub(super) fn strip_body(answer: &mut Vec<u8>) {
    if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
        answer.truncate(end + 4);
    }
}

fn get<S>(target: &str, view: &View<'_, S>) -> Vec<u8> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match path {
        "/metrics" => response(
            200,
            "OK",
            "text/plain; version=0.0.4; charset=utf-8",
            "",
            &prometheus(view),
        ),
        "/connections" => match connections(query, view, None) {
            Ok(body) => simple(200, "OK", &body),
            Err(msg) => simple(400, "Bad Request", &msg),
        },
        // The loop answers this itself: an answer at all means it is not wedged. With several
        // workers, a worker stuck in one turn (not waiting in its poll) fails it too.
        "/livez" => match view.group.and_then(|(g, _)| g.wedged(view.at)) {
            None => simple(200, "OK", "ok\n"),
            Some((i, busy)) => simple(
                503,
                "Service Unavailable",
                &format!("worker {i} has been busy in one turn for {busy:?}\n"),
            ),
        },
        // `/health` is what it was before `/readyz` existed: the readiness check.
        "/readyz" | "/health" => match view.ready {
            Ok(()) => simple(200, "OK", "ok\n"),
            Err(why) => simple(503, "Service Unavailable", &format!("{why}\n")),
        },
        _ => simple(
            404,
            "Not Found",
            "try /metrics, /connections, /livez or /readyz\n",
        ),
    }
}

/// Prometheus text exposition format 0.0.4: `sockman_*`, counters end in `_total`, base units.
/// With several workers, every family has its total (no `worker` label) and one series per
/// worker (`worker="N"`).
fn prometheus<S>(view: &View<'_, S>) -> String {
    let workers: Vec<Metrics> = match view.group {
        Some((group, me)) if group.len() > 1 => (0..group.len())
            .map(|i| {
                if i == me {
                    view.metrics.clone()
                } else {
                    group.snapshot(i)
                }
            })
            .collect(),
        _ => Vec::new(),
    };
    let total = if workers.is_empty() {
        view.metrics.clone()
    } else {
        Metrics::sum(&workers)
    };
    let mut out = String::with_capacity(8192 * (1 + workers.len()));
    let p = Page {
        total: &total,
        workers: &workers,
    };
    p.metric(
        &mut out,
        "connections_active",
        "gauge",
        "Accepted connections open for the handler (the client side; the dialed side is sockman_connections_dialed_active).",
        |m| m.active_accepted(),
    );
    p.metric(
        &mut out,
        "connections_peak",
        "gauge",
        "Most data connections open at once, accepted and dialed (summed over workers).",
        |m| m.peak,
    );
    p.metric(
        &mut out,
        "connections_max",
        "gauge",
        "The connection cap in force (with workers, the group's: every worker's admission shares it).",
        |m| m.max_connections,
    );
    p.metric(
        &mut out,
        "connections_lingering",
        "gauge",
        "Connections closed gracefully, their write side shut, reading until the peer's EOF.",
        |m| m.lingering,
    );
    p.metric(
        &mut out,
        "connections_dialed_active",
        "gauge",
        "Dialed (outbound) connections open for the handler, connecting ones included.",
        |m| m.active_dialed,
    );
    p.metric(
        &mut out,
        "connections_connecting",
        "gauge",
        "Dials still completing their handshake.",
        |m| m.connecting,
    );
    p.metric(
        &mut out,
        "connections_awaiting_header",
        "gauge",
        "Accepted connections waiting for their PROXY protocol header.",
        |m| m.awaiting_header,
    );
    family(
        &mut out,
        "fd_limit",
        "gauge",
        "Soft open-file limit of the process.",
        [("", total.fd_limit as i128)].into_iter(),
    );
    family(
        &mut out,
        "fds_open",
        "gauge",
        "Open descriptors at the last leak self-check.",
        [("", total.fds_open as i128)].into_iter(),
    );
    p.metric(
        &mut out,
        "accepted_total",
        "counter",
        "Data connections accepted.",
        |m| m.accepted,
    );
    p.metric(
        &mut out,
        "dialed_total",
        "counter",
        "Dials started (connections the handler dialed).",
        |m| m.dialed,
    );
    p.metric(
        &mut out,
        "connected_total",
        "counter",
        "Dials whose handshake completed.",
        |m| m.connected,
    );
    p.labelled(
        &mut out,
        "rejected_total",
        "Connections refused at accept (or at their PROXY header), by reason.",
        "reason",
        &RejectReason::NAMES,
        |m, i| m.rejected[i],
    );
    p.labelled(
        &mut out,
        "closed_total",
        "Accepted connections closed, by reason (dialed ones: sockman_dialed_closed_total).",
        "reason",
        &CloseReason::NAMES,
        |m, i| m.closed_accepted()[i],
    );
    p.labelled(
        &mut out,
        "dialed_closed_total",
        "Dialed connections closed, by reason (failed dials included: connect_refused, connect_timeout, unreachable).",
        "reason",
        &CloseReason::NAMES,
        |m, i| m.closed_dialed[i],
    );
    p.labelled(
        &mut out,
        "lingered_total",
        "Graceful closes that lingered, by how the linger ended.",
        "end",
        &LINGER_END_NAMES,
        |m, i| m.linger_ends[i],
    );
    p.labelled(
        &mut out,
        "accept_errors_total",
        "accept() failures, by kind.",
        "kind",
        &ACCEPT_ERROR_NAMES,
        |m, i| m.accept_errors[i],
    );
    p.metric(
        &mut out,
        "received_bytes_total",
        "counter",
        "Bytes read from accepted connections (the dialed side: sockman_dialed_received_bytes_total).",
        |m| m.bytes_in - m.dialed_bytes_in,
    );
    p.metric(
        &mut out,
        "sent_bytes_total",
        "counter",
        "Bytes written to accepted connections (the dialed side: sockman_dialed_sent_bytes_total).",
        |m| m.bytes_out - m.dialed_bytes_out,
    );
    p.metric(
        &mut out,
        "dialed_received_bytes_total",
        "counter",
        "Bytes read from dialed connections.",
        |m| m.dialed_bytes_in,
    );
    p.metric(
        &mut out,
        "dialed_sent_bytes_total",
        "counter",
        "Bytes written to dialed connections.",
        |m| m.dialed_bytes_out,
    );
    p.metric(
        &mut out,
        "pending_output_bytes",
        "gauge",
        "Output waiting for slow peers, accepted and dialed.",
        |m| m.pending_bytes,
    );
    p.metric(&mut out, "accept_pauses_total", "counter", "Times accepting paused (fd exhaustion, memory, a turn of nothing but errors); while exhausted every failed retry counts.", |m| m.accept_pauses);
    p.metric(
        &mut out,
        "loop_turns_total",
        "counter",
        "Event loop turns.",
        |m| m.turns,
    );
    p.metric(
        &mut out,
        "loop_events_total",
        "counter",
        "Readiness events dispatched.",
        |m| m.events,
    );
    p.metric(
        &mut out,
        "stale_total",
        "counter",
        "Events and timers dropped for a stale generation.",
        |m| m.stale,
    );
    p.metric(
        &mut out,
        "remote_dropped_total",
        "counter",
        "Messages from other threads whose connection was gone.",
        |m| m.remote_dropped,
    );
    family(
        &mut out,
        "draining",
        "gauge",
        "1 while draining.",
        [("", i128::from(view.draining))].into_iter(),
    );
    family(
        &mut out,
        "fds_unaccounted",
        "gauge",
        "Open descriptors the leak self-check cannot account for (0 = none leaked).",
        [("", total.fds_unaccounted as i128)].into_iter(),
    );
    let m = &total;
    let name = "sockman_connection_lifetime_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Lifetime of closed data connections, accepted and dialed.\n# TYPE {name} histogram"
    );
    let mut cumulative = 0;
    for (i, le_ms) in LIFETIME_BUCKETS_MS.iter().enumerate() {
        cumulative += m.lifetime_buckets[i];
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{}\"}} {cumulative}",
            *le_ms as f64 / 1000.0
        );
    }
    cumulative += m.lifetime_buckets[LIFETIME_BUCKETS_MS.len()];
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "{name}_sum {}", m.lifetime_sum_us as f64 / 1e6);
    let _ = writeln!(out, "{name}_count {cumulative}");
    view.hooks.write_metrics(&mut out);
    out
}

/// The metrics one `/metrics` page shows: the total, and each worker's when there are several.
struct Page<'a> {
    total: &'a Metrics,
    workers: &'a [Metrics],
}

impl Page<'_> {
    /// A family of one value per loop: the total, then `{worker="N"}` per worker.
    fn metric(
        &self,
        out: &mut String,
        name: &str,
        kind: &str,
        help: &str,
        value: impl Fn(&Metrics) -> u64,
    ) {
        let _ = writeln!(
            out,
            "# HELP sockman_{name} {help}\n# TYPE sockman_{name} {kind}"
        );
        let _ = writeln!(out, "sockman_{name} {}", value(self.total));
        for (i, m) in self.workers.iter().enumerate() {
            let _ = writeln!(out, "sockman_{name}{{worker=\"{i}\"}} {}", value(m));
        }
    }

    /// A counter family with one label, one sample per name: the totals, then per worker.
    fn labelled(
        &self,
        out: &mut String,
        name: &str,
        help: &str,
        label: &str,
        names: &[&str],
        values: impl Fn(&Metrics, usize) -> u64,
    ) {
        let _ = writeln!(
            out,
            "# HELP sockman_{name} {help}\n# TYPE sockman_{name} counter"
        );
        for (j, n) in names.iter().enumerate() {
            let _ = writeln!(
                out,
                "sockman_{name}{{{label}=\"{n}\"}} {}",
                values(self.total, j)
            );
        }
        for (i, m) in self.workers.iter().enumerate() {
            for (j, n) in names.iter().enumerate() {
                let v = values(m, j);
                let _ = writeln!(out, "sockman_{name}{{worker=\"{i}\",{label}=\"{n}\"}} {v}");
            }
        }
    }
}

fn family<'a>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: impl Iterator<Item = (&'a str, i128)>,
) {
    let _ = writeln!(
        out,
        "# HELP sockman_{name} {help}\n# TYPE sockman_{name} {kind}"
    );
    for (labels, value) in samples {
        let _ = writeln!(out, "sockman_{name}{labels} {value}");
    }
}

/// The query of `/connections[?limit=N][&sort=idle]`.
///
/// # Errors
/// An unknown parameter or a bad value, described.
pub(super) fn parse_query(query: &str) -> Result<Query, String> {
    let mut q = Query {
        limit: DEFAULT_LIMIT,
        by_idle: false,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=').unwrap_or((pair, "")) {
            ("limit", v) => {
                q.limit = v
                    .parse::<usize>()
                    .map_err(|_| format!("bad limit {v:?}\n"))?
                    .min(MAX_LIMIT)
            }
            ("sort", "idle") => q.by_idle = true,
            ("sort", v) => return Err(format!("unknown sort {v:?} (only idle)\n")),
            (k, _) => return Err(format!("unknown parameter {k:?}\n")),
        }
    }
    Ok(q)
}

/// `/connections` lines of one loop (`worker`: its index in a group, printed on each line).
///
/// Without `sort`, the first `limit` connections in slab order: O(limit), whatever the number of
/// connections. With `sort=idle`, the `limit` longest idle: one pass over the connections
/// keeping the best `limit` in a bounded heap, O(n log limit) time and O(limit) memory (nothing
/// keeps connections in idle order unless `--on-full evict-idle` is on).
///
/// # Errors
/// A bad query, described.
pub(crate) fn connections<S>(
    query: &str,
    view: &View<'_, S>,
    worker: Option<usize>,
) -> Result<String, String> {
    let Query { limit, by_idle } = parse_query(query)?;
    let rows: Vec<(usize, &Conn<S>)> = if by_idle {
        use std::collections::BinaryHeap;
        // A max-heap on last_active keeps the `limit` smallest (longest idle) seen so far.
        let mut heap: BinaryHeap<(Tick, usize)> = BinaryHeap::with_capacity(limit.min(4096) + 1);
        for (key, c) in view.conns.iter() {
            if limit == 0 {
                break;
            }
            if heap.len() < limit {
                heap.push((c.last_active, key));
            } else if heap.peek().is_some_and(|&(top, _)| c.last_active < top) {
                heap.pop();
                heap.push((c.last_active, key));
            }
        }
        let mut keys = heap.into_vec();
        keys.sort_unstable();
        keys.into_iter()
            .map(|(_, key)| (key, &view.conns[key]))
            .collect()
    } else {
        view.conns.iter().take(limit).collect()
    };
    let ms = |ticks: Tick| view.clock.micros(ticks) / 1000;
    let mut out = String::with_capacity(rows.len() * 130);
    for (key, c) in rows {
        let state = match c.phase {
            Phase::Header => "proxy_header",
            Phase::Connecting => "connecting",
            Phase::Lingering => "lingering",
            Phase::Open if !c.is_live() => "closing",
            Phase::Open if c.has(flag::EOF) => "half_closed",
            // Output merely queued for the end of the turn is no backpressure.
            Phase::Open if c.is_blocked() => "backpressure",
            Phase::Open => "open",
        };
        let direction = if c.has(flag::DIALED) { "out" } else { "in" };
        let _ = writeln!(
            out,
            "id={} dir={direction} peer={} age_ms={} idle_ms={} bytes_in={} bytes_out={} pending={} state={state}",
            crate::ConnId::new(key, c.gen),
            c.peer(),
            ms(view.now.saturating_sub(c.opened)),
            ms(view.now.saturating_sub(c.last_active)),
            c.bytes_in,
            c.bytes_out,
            c.pending_len(),
        );
        if worker.is_some() || c.state.is_some() {
            out.pop(); // more fields on the same line
            if let (Some(w), Some((g, _))) = (worker, view.group) {
                if g.len() > 1 {
                    let _ = write!(out, " worker={w}");
                }
            }
            if let Some(state) = &c.state {
                view.hooks.describe(state, &mut out);
            }
            out.push('\n');
        }
    }
    Ok(out)
}
