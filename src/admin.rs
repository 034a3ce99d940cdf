//! The admin endpoint: a tiny HTTP/1.1 server on its own listener, served by the same loop as the
//! data connections (no extra thread). `GET /metrics` (Prometheus text), `GET /connections` (one
//! line per connection, like Redis `CLIENT LIST`), `GET /health` (200 running, 503 draining).
//!
//! Admin connections have their own small limits (count, request size, idle time), are never
//! counted as data connections, and get `Connection: close` responses: one request each.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use log::{debug, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use slab::Slab;

use crate::close::CloseReason;
use crate::conn::Conn;
use crate::metrics::{Metrics, RejectReason, LIFETIME_BUCKETS_MS};
use crate::wheel::Tick;

/// Admin connections open at once; more are accepted and closed.
pub(crate) const MAX_ADMIN_CONNS: usize = 16;
/// Largest request head accepted (431 beyond).
const MAX_REQUEST: usize = 8 * 1024;
/// An admin connection that has not completed its request and response within this is closed.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
/// `/connections` lines by default, and at most.
const DEFAULT_LIMIT: usize = 1_000;
/// Bounds one response (~120 bytes a line, ~2.4 MB at most): about every connection this
/// machine's fd limit allows, in one transient buffer freed when the response is sent.
const MAX_LIMIT: usize = 20_000;

#[derive(Debug)]
struct AdminConn {
    stream: TcpStream,
    request: Vec<u8>,
    response: Vec<u8>,
    written: usize,
    opened: Tick,
    /// The client half-closed: no more request bytes will come.
    peer_closed: bool,
}

/// What the admin pages show, borrowed from the server for one request.
#[derive(Debug)]
pub(crate) struct View<'a, S> {
    pub(crate) metrics: &'a Metrics,
    pub(crate) conns: &'a Slab<Conn<S>>,
    pub(crate) now: Tick,
    pub(crate) tick_ns: u64,
    pub(crate) draining: bool,
    pub(crate) token_of: fn(usize, u32) -> u64,
}

/// The admin listener and its connections.
#[derive(Debug)]
pub(crate) struct Admin {
    listener: TcpListener,
    pub(crate) addr: SocketAddr,
    conns: Slab<AdminConn>,
    listener_token: Token,
    /// Token of admin connection `k` is `conn_base - k`.
    conn_base: usize,
    timeout_ticks: Tick,
}

impl Admin {
    pub(crate) fn bind(
        addr: SocketAddr,
        registry: &Registry,
        listener_token: Token,
        conn_base: usize,
        tick_ns: u64,
    ) -> io::Result<Admin> {
        let mut listener = TcpListener::bind(addr)?;
        registry.register(&mut listener, listener_token, Interest::READABLE)?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() {
            warn!("admin endpoint on {addr} is not loopback: anyone who can reach it sees the connection list");
        }
        Ok(Admin {
            listener,
            addr,
            conns: Slab::with_capacity(MAX_ADMIN_CONNS),
            listener_token,
            conn_base,
            timeout_ticks: (ADMIN_TIMEOUT.as_nanos() / tick_ns as u128).max(1) as Tick,
        })
    }

    /// The admin connection key of `token`, if it is one of ours (or the listener: `Some(None)`).
    pub(crate) fn owns(&self, token: Token) -> Option<Option<usize>> {
        if token == self.listener_token {
            return Some(None);
        }
        let k = self.conn_base.checked_sub(token.0)?;
        (k < MAX_ADMIN_CONNS).then_some(Some(k))
    }

    pub(crate) fn accept(&mut self, registry: &Registry, now: Tick) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, peer)) => {
                    if self.conns.len() >= MAX_ADMIN_CONNS {
                        // Dropped here: admin connections are never counted as data ones.
                        debug!("admin: too many connections, closing peer={peer}");
                        continue;
                    }
                    let key = self.conns.vacant_key();
                    let token = Token(self.conn_base - key);
                    if registry
                        .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                        .is_err()
                    {
                        continue;
                    }
                    self.conns.insert(AdminConn {
                        stream,
                        request: Vec::new(),
                        response: Vec::new(),
                        written: 0,
                        opened: now,
                        peer_closed: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    // Out of fds or similar: the data path handles exhaustion; try on the next event.
                    debug!("admin accept: {e}");
                    return;
                }
            }
        }
    }

    /// Reads the request, answers it, writes the answer; closes when done or on error.
    pub(crate) fn drive<S>(&mut self, key: usize, registry: &Registry, view: &View<'_, S>) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.response.is_empty() {
            let mut buf = [0u8; 4096];
            loop {
                match conn.stream.read(&mut buf) {
                    // A complete request may come with the FIN: parse what was read; an
                    // incomplete one is closed below.
                    Ok(0) => {
                        conn.peer_closed = true;
                        break;
                    }
                    Ok(n) => {
                        conn.request.extend_from_slice(&buf[..n]);
                        if conn.request.len() > MAX_REQUEST {
                            conn.response = simple(
                                431,
                                "Request Header Fields Too Large",
                                "request too large\n",
                            );
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return self.close(key, registry),
                }
            }
            if conn.response.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut req = httparse::Request::new(&mut headers);
                match req.parse(&conn.request) {
                    Ok(httparse::Status::Complete(_)) => {
                        conn.response =
                            route(req.method.unwrap_or(""), req.path.unwrap_or(""), view);
                    }
                    Ok(httparse::Status::Partial) if conn.peer_closed => {
                        return self.close(key, registry)
                    }
                    Ok(httparse::Status::Partial) => return,
                    Err(httparse::Error::TooManyHeaders) => {
                        conn.response =
                            simple(431, "Request Header Fields Too Large", "too many headers\n");
                    }
                    Err(_) => conn.response = simple(400, "Bad Request", "malformed request\n"),
                }
            }
        }
        while conn.written < conn.response.len() {
            match conn.stream.write(&conn.response[conn.written..]) {
                Ok(0) => return self.close(key, registry),
                Ok(n) => conn.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.close(key, registry),
            }
        }
        self.close(key, registry);
    }

    /// Closes admin connections older than the admin timeout; returns the next deadline.
    pub(crate) fn expire(&mut self, registry: &Registry, now: Tick) -> Option<Tick> {
        let expired: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| now >= c.opened + self.timeout_ticks)
            .map(|(k, _)| k)
            .collect();
        for key in expired {
            self.close(key, registry);
        }
        self.next_deadline()
    }

    pub(crate) fn next_deadline(&self) -> Option<Tick> {
        self.conns
            .iter()
            .map(|(_, c)| c.opened + self.timeout_ticks)
            .min()
    }

    /// Open descriptors the admin side holds (listener and connections).
    pub(crate) fn fds(&self) -> usize {
        1 + self.conns.len()
    }

    fn close(&mut self, key: usize, registry: &Registry) {
        let mut conn = self.conns.remove(key);
        let _ = registry.deregister(&mut conn.stream);
    }

    pub(crate) fn close_all(&mut self, registry: &Registry) {
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close(key, registry);
        }
        let _ = registry.deregister(&mut self.listener);
    }
}

fn simple(code: u16, reason: &str, body: &str) -> Vec<u8> {
    response(code, reason, "text/plain; charset=utf-8", body)
}

fn response(code: u16, reason: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn route<S>(method: &str, target: &str, view: &View<'_, S>) -> Vec<u8> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if method != "GET" && method != "HEAD" {
        return simple(405, "Method Not Allowed", "only GET\n");
    }
    match path {
        "/metrics" => response(
            200,
            "OK",
            "text/plain; version=0.0.4; charset=utf-8",
            &prometheus(view),
        ),
        "/connections" => match connections(query, view) {
            Ok(body) => simple(200, "OK", &body),
            Err(msg) => simple(400, "Bad Request", &msg),
        },
        "/health" if view.draining => simple(503, "Service Unavailable", "draining\n"),
        "/health" => simple(200, "OK", "ok\n"),
        _ => simple(404, "Not Found", "try /metrics, /connections or /health\n"),
    }
}

/// Prometheus text exposition format 0.0.4: `sockman_*`, counters end in `_total`, base units.
fn prometheus<S>(view: &View<'_, S>) -> String {
    let m = view.metrics;
    let mut out = String::with_capacity(4096);
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        family(
            &mut out,
            name,
            kind,
            help,
            samples.iter().map(|&(l, v)| (l, v as i128)),
        );
    };
    metric(
        "connections_active",
        "gauge",
        "Open data connections.",
        &[("", m.active)],
    );
    metric(
        "connections_peak",
        "gauge",
        "Most data connections open at once.",
        &[("", m.peak)],
    );
    metric(
        "connections_max",
        "gauge",
        "The connection cap in force.",
        &[("", m.max_connections)],
    );
    metric(
        "fd_limit",
        "gauge",
        "Soft open-file limit of the process.",
        &[("", m.fd_limit)],
    );
    metric(
        "fds_open",
        "gauge",
        "Open descriptors at the last leak self-check.",
        &[("", m.fds_open)],
    );
    metric(
        "accepted_total",
        "counter",
        "Data connections accepted.",
        &[("", m.accepted)],
    );
    let rejected: Vec<(String, u64)> = RejectReason::NAMES
        .iter()
        .zip(m.rejected)
        .map(|(n, v)| (format!("{{reason=\"{n}\"}}"), v))
        .collect();
    let rejected: Vec<(&str, u64)> = rejected.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric(
        "rejected_total",
        "counter",
        "Connections refused at accept, by reason.",
        &rejected,
    );
    let closed: Vec<(String, u64)> = CloseReason::NAMES
        .iter()
        .zip(m.closed)
        .map(|(n, v)| (format!("{{reason=\"{n}\"}}"), v))
        .collect();
    let closed: Vec<(&str, u64)> = closed.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    metric(
        "closed_total",
        "counter",
        "Data connections closed, by reason.",
        &closed,
    );
    metric(
        "received_bytes_total",
        "counter",
        "Bytes read from peers.",
        &[("", m.bytes_in)],
    );
    metric(
        "sent_bytes_total",
        "counter",
        "Bytes written to peers.",
        &[("", m.bytes_out)],
    );
    metric(
        "pending_output_bytes",
        "gauge",
        "Output waiting for slow peers.",
        &[("", m.pending_bytes)],
    );
    metric(
        "accept_errors_total",
        "counter",
        "accept() failures, by kind.",
        &[
            ("{kind=\"emfile\"}", m.accept_emfile),
            ("{kind=\"enfile\"}", m.accept_enfile),
            ("{kind=\"other\"}", m.accept_other),
        ],
    );
    metric(
        "accept_pauses_total",
        "counter",
        "Times accepting paused after fd exhaustion.",
        &[("", m.accept_pauses)],
    );
    metric(
        "loop_turns_total",
        "counter",
        "Event loop turns.",
        &[("", m.turns)],
    );
    metric(
        "loop_events_total",
        "counter",
        "Readiness events dispatched.",
        &[("", m.events)],
    );
    metric(
        "stale_total",
        "counter",
        "Events and timers dropped for a stale generation.",
        &[("", m.stale)],
    );
    metric(
        "draining",
        "gauge",
        "1 while draining.",
        &[("", u64::from(view.draining))],
    );
    family(
        &mut out,
        "fds_unaccounted",
        "gauge",
        "Open descriptors the leak self-check cannot account for (0 = none leaked).",
        [("", m.fds_unaccounted as i128)].into_iter(),
    );
    let name = "sockman_connection_lifetime_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Lifetime of closed data connections.\n# TYPE {name} histogram"
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
    out
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

/// `/connections[?limit=N][&sort=idle]`: one line per connection.
fn connections<S>(query: &str, view: &View<'_, S>) -> Result<String, String> {
    let mut limit = DEFAULT_LIMIT;
    let mut by_idle = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=').unwrap_or((pair, "")) {
            ("limit", v) => {
                limit = v
                    .parse::<usize>()
                    .map_err(|_| format!("bad limit {v:?}\n"))?
                    .min(MAX_LIMIT)
            }
            ("sort", "idle") => by_idle = true,
            ("sort", v) => return Err(format!("unknown sort {v:?} (only idle)\n")),
            (k, _) => return Err(format!("unknown parameter {k:?}\n")),
        }
    }
    let mut rows: Vec<(usize, &Conn<S>)> = view.conns.iter().collect();
    if by_idle {
        // Longest idle first; only the first `limit` need ordering.
        let key = |c: &Conn<S>| c.io.last_active;
        if limit < rows.len() {
            rows.select_nth_unstable_by_key(limit, |(_, c)| key(c));
            rows.truncate(limit);
        }
        rows.sort_by_key(|(_, c)| key(c));
    }
    let ms = |ticks: Tick| ticks as u128 * view.tick_ns as u128 / 1_000_000;
    let mut out = String::with_capacity(rows.len().min(limit) * 120);
    for (key, conn) in rows.into_iter().take(limit) {
        let io = &conn.io;
        let id = (view.token_of)(key, io.gen);
        let state = if io.closing.is_some() {
            "closing"
        } else if io.has_pending() {
            "backpressure"
        } else {
            "open"
        };
        let _ = writeln!(
            out,
            "id={}#{} peer={} age_ms={} idle_ms={} bytes_in={} bytes_out={} pending={} state={state}",
            id & 0xffff_ffff,
            id >> 32,
            io.peer(),
            ms(view.now.saturating_sub(io.opened)),
            ms(view.now.saturating_sub(io.last_active)),
            io.bytes_in,
            io.bytes_out,
            io.pending_len(),
        );
    }
    Ok(out)
}
