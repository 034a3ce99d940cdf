//! The admin endpoint: a tiny HTTP/1.1 server on its own listener, served by the same loop as the
//! data connections (no extra thread). `GET /metrics` (Prometheus text), `GET /connections` (one
//! line per connection, like Redis `CLIENT LIST`), `GET /livez` (200 while the loop answers),
//! `GET /readyz` and `GET /health` (200 ready; 503 draining, in the lame-duck delay, or at the
//! connection cap).
//!
//! Admin connections have their own small limits (count, request size, lifetime), are never
//! counted as data connections, and get `Connection: close` responses: one request each. Like a
//! data connection's graceful close, an answer is followed by `shutdown(Write)` and a linger that
//! reads and discards until the client's EOF: a client that sent more than its request would
//! otherwise get a reset that destroys the end of the answer.
//!
//! A monitoring system must always get in: when every slot is taken, the oldest connection that
//! has not sent a byte yet is closed to make room, and accepting is budgeted per turn and retried
//! after an error instead of waiting for an edge that may never come.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use log::{debug, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry};
use slab::Slab;

use super::View;
use crate::conn::{flag, Conn, Phase};
use crate::limits;
use crate::metrics::{Metrics, ACCEPT_ERROR_NAMES, LIFETIME_BUCKETS_MS, LINGER_END_NAMES};
use crate::reason::{CloseReason, RejectReason};
use crate::time::{Clock, Tick};
use crate::token;

/// Admin connections open at once (their descriptors are kept back from the connection cap:
/// [`ADMIN_FDS`](crate::limits::ADMIN_FDS)).
const MAX_ADMIN_CONNS: usize = limits::ADMIN_CONNS;
const _: () = assert!(MAX_ADMIN_CONNS <= token::MAX_ADMIN_CONNS);
/// Accepts per turn: a flood of admin connects cannot hold the loop.
const ACCEPT_BUDGET: usize = 16;
/// Largest request head accepted (431 beyond).
const MAX_REQUEST: usize = 8 * 1024;
/// An admin connection that has not completed its request and response within this is closed.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
/// After an accept error, the admin listener is tried again this much later (the data side
/// handles fd exhaustion; this only keeps queued admin clients from waiting for an edge).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// `/connections` lines by default, and at most.
const DEFAULT_LIMIT: usize = 1_000;
/// Bounds one response (~130 bytes a line, ~2.6 MB at most): about every connection this
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
    /// Since when the answer is out and the connection lingers (write side shut).
    lingering: Option<Tick>,
    /// Bytes discarded while lingering.
    discarded: u64,
    /// A `/connections` answer waiting for the other workers' lines.
    gather: Option<Gather>,
}

/// A `/connections` request of a group of workers: this worker's lines are in, the others'
/// are asked for and come back through the group.
#[derive(Debug)]
struct Gather {
    query: Query,
    /// The query as asked, for the other workers.
    raw: String,
    head: bool,
    /// Asked of the other workers (one gather at a time: each worker has one answer slot;
    /// later requests wait their turn).
    started: bool,
    /// Each worker's lines, as they come (`Err`: a bad query, `None`: not yet).
    parts: Vec<Option<Result<String, String>>>,
    /// Answer with what has come by then.
    deadline: Tick,
}

/// A parsed `/connections` query.
#[derive(Debug, Clone, Copy)]
struct Query {
    limit: usize,
    by_idle: bool,
}

/// How long worker 0 waits for the other workers' `/connections` lines.
const GATHER_TIMEOUT: Duration = Duration::from_secs(1);

impl AdminConn {
    /// Nothing received yet: the first to go when every slot is taken.
    fn is_silent(&self) -> bool {
        self.request.is_empty() && self.response.is_empty()
    }
}

/// The admin listener and its connections.
#[derive(Debug)]
pub(crate) struct Admin {
    listener: TcpListener,
    pub(crate) addr: SocketAddr,
    conns: Slab<AdminConn>,
    timeout_ticks: Tick,
    retry_ticks: Tick,
    /// Linger deadline and byte cap (the data connections' settings).
    linger_ticks: Tick,
    linger_bytes: u64,
    /// The accept budget ran out or an accept failed: accept again at this tick without waiting
    /// for an edge (0 = this turn).
    accept_at: Option<Tick>,
}

impl Admin {
    pub(crate) fn bind(
        addr: SocketAddr,
        registry: &Registry,
        clock: &Clock,
        (linger_ticks, linger_bytes): (Tick, u64),
    ) -> io::Result<Admin> {
        let mut listener = TcpListener::bind(addr)?;
        registry.register(&mut listener, token::admin_listener(), Interest::READABLE)?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() {
            warn!("admin endpoint on {addr} is not loopback: anyone who can reach it sees the connection list");
        }
        Ok(Admin {
            listener,
            addr,
            conns: Slab::with_capacity(MAX_ADMIN_CONNS),
            timeout_ticks: clock.ticks(ADMIN_TIMEOUT).max(1),
            retry_ticks: clock.ticks(ACCEPT_RETRY).max(1),
            linger_ticks,
            linger_bytes,
            accept_at: None,
        })
    }

    /// Accepts up to [`ACCEPT_BUDGET`] connections; when every slot is taken, the oldest silent
    /// connection makes room (else the newcomer is closed at once).
    pub(crate) fn accept(&mut self, registry: &Registry, now: Tick) {
        self.accept_at = None;
        for _ in 0..ACCEPT_BUDGET {
            match self.listener.accept() {
                Ok((mut stream, peer)) => {
                    if self.conns.len() >= MAX_ADMIN_CONNS && !self.evict_silent(registry) {
                        // Dropped here: admin connections are never counted as data ones.
                        debug!("admin: every slot busy with a request, closing peer={peer}");
                        continue;
                    }
                    let key = self.conns.vacant_key();
                    if let Err(e) = registry.register(
                        &mut stream,
                        token::admin_conn(key),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        debug!("admin: cannot register peer={peer}: {e}");
                        continue;
                    }
                    self.conns.insert(AdminConn {
                        stream,
                        request: Vec::new(),
                        response: Vec::new(),
                        written: 0,
                        opened: now,
                        peer_closed: false,
                        lingering: None,
                        discarded: 0,
                        gather: None,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO | libc::EPERM) => {}
                    _ => {
                        // Out of fds or similar: retry shortly, not at the next edge (queued
                        // clients produce none).
                        debug!("admin accept: {e}; retrying");
                        self.accept_at = Some(crate::time::deadline(now, self.retry_ticks));
                        return;
                    }
                },
            }
        }
        self.accept_at = Some(0); // the budget ran out: continue next turn
    }

    /// Closes the oldest connection that has not sent a byte. Returns whether one was found.
    fn evict_silent(&mut self, registry: &Registry) -> bool {
        let oldest = self
            .conns
            .iter()
            .filter(|(_, c)| c.is_silent())
            .min_by_key(|(_, c)| c.opened)
            .map(|(k, _)| k);
        match oldest {
            Some(k) => {
                debug!("admin: every slot taken, closing the oldest silent connection");
                self.close(k, registry);
                true
            }
            None => false,
        }
    }

    /// Reads the request, answers it, writes the answer, lingers; closes when done or on error.
    pub(crate) fn drive<S>(&mut self, key: usize, registry: &Registry, view: &View<'_, S>) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.lingering.is_some() {
            return self.linger(key, registry);
        }
        if conn.gather.is_some() {
            return; // waiting for the other workers
        }
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
                        let (method, target) = (req.method.unwrap_or(""), req.path.unwrap_or(""));
                        if let Some(gather) = new_gather(method, target, view) {
                            conn.gather = Some(gather);
                            self.start_gather(view);
                            return;
                        }
                        conn.response = route(method, target, view);
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
        self.write_response(key, registry, view.now);
    }

    /// Writes the answer; once it is all with the kernel, closes or lingers.
    fn write_response(&mut self, key: usize, registry: &Registry, now: Tick) {
        let conn = &mut self.conns[key];
        while conn.written < conn.response.len() {
            match conn.stream.write(&conn.response[conn.written..]) {
                Ok(0) => return self.close(key, registry),
                Ok(n) => conn.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.close(key, registry),
            }
        }
        // The answer is with the kernel. A client that already sent its FIN has nothing unread
        // to trigger a reset; any other lingers until its EOF.
        if conn.peer_closed || self.linger_ticks == 0 {
            return self.close(key, registry);
        }
        conn.response = Vec::new();
        if conn.stream.shutdown(std::net::Shutdown::Write).is_err() {
            return self.close(key, registry);
        }
        conn.lingering = Some(now);
        self.linger(key, registry);
    }

    /// Starts the oldest waiting gather if none is under way: this worker's lines now, the
    /// others asked for.
    fn start_gather<S>(&mut self, view: &View<'_, S>) {
        let Some((group, me)) = view.group else {
            return;
        };
        if self
            .conns
            .iter()
            .any(|(_, c)| c.gather.as_ref().is_some_and(|g| g.started))
        {
            return;
        }
        let next = self
            .conns
            .iter()
            .filter(|(_, c)| c.gather.is_some())
            .min_by_key(|(_, c)| c.opened)
            .map(|(k, _)| k);
        let Some(key) = next else {
            return;
        };
        let g = self.conns[key].gather.as_mut().expect("filtered above");
        g.parts[me] = Some(connections(&g.raw, view, Some(me)));
        for i in (0..group.len()).filter(|&i| i != me) {
            group.request_connections(i, &g.raw);
        }
        g.started = true;
        let wait = view.clock.ticks(GATHER_TIMEOUT).max(1);
        g.deadline = crate::time::deadline(view.now, wait);
    }

    /// Collects the other workers' `/connections` lines for the request under way and answers
    /// it once complete (or past its deadline); then starts the next.
    fn gather<S>(&mut self, registry: &Registry, view: &View<'_, S>) {
        let Some((group, me)) = view.group else {
            return;
        };
        let mut done = Vec::new();
        for (key, conn) in self.conns.iter_mut() {
            let Some(g) = conn.gather.as_mut().filter(|g| g.started) else {
                continue;
            };
            for (i, part) in g.parts.iter_mut().enumerate() {
                if part.is_none() && i != me {
                    *part = group.take_response(i);
                }
            }
            if g.parts.iter().all(Option::is_some) || view.now >= g.deadline {
                done.push(key);
            }
        }
        for key in done {
            let g = self.conns[key].gather.take().expect("collected above");
            let body = assemble(&g);
            let mut answer = simple(200, "OK", &body);
            if g.head {
                strip_body(&mut answer);
            }
            self.conns[key].response = answer;
            self.write_response(key, registry, view.now);
        }
        self.start_gather(view);
    }

    /// Reads and discards until the client's EOF, an error or the byte cap; then closes.
    fn linger(&mut self, key: usize, registry: &Registry) {
        let conn = &mut self.conns[key];
        let mut buf = [0u8; 4096];
        loop {
            match conn.stream.read(&mut buf) {
                Ok(n) if n > 0 && conn.discarded + (n as u64) < self.linger_bytes => {
                    conn.discarded += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => return self.close(key, registry),
            }
        }
    }

    /// Continues an accept a budget or an error left, answers gathered `/connections`
    /// requests, and closes connections past their deadline (the admin timeout, or the linger).
    pub(crate) fn tick<S>(&mut self, registry: &Registry, view: &View<'_, S>) {
        let now = view.now;
        if self.conns.iter().any(|(_, c)| c.gather.is_some()) {
            self.gather(registry, view);
        }
        if self.accept_at.is_some_and(|t| t <= now) {
            self.accept(registry, now);
        }
        if self.deadline().is_some_and(|t| t <= now) {
            let expired: Vec<usize> = self
                .conns
                .iter()
                .filter(|(_, c)| self.deadline_of(c) <= now)
                .map(|(k, _)| k)
                .collect();
            for key in expired {
                self.close(key, registry);
            }
        }
    }

    fn deadline_of(&self, c: &AdminConn) -> Tick {
        match c.lingering {
            Some(since) => crate::time::deadline(since, self.linger_ticks),
            None => crate::time::deadline(c.opened, self.timeout_ticks),
        }
    }

    fn deadline(&self) -> Option<Tick> {
        self.conns.iter().map(|(_, c)| self.deadline_of(c)).min()
    }

    /// When the loop must run for the admin side.
    pub(crate) fn poll_at(&self) -> Option<Tick> {
        let gather = self
            .conns
            .iter()
            .filter_map(|(_, c)| c.gather.as_ref().filter(|g| g.started).map(|g| g.deadline))
            .min();
        [self.deadline(), gather, self.accept_at]
            .into_iter()
            .flatten()
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

fn route<S>(method: &str, target: &str, view: &View<'_, S>) -> Vec<u8> {
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
fn strip_body(answer: &mut Vec<u8>) {
    if let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
        answer.truncate(end + 4);
    }
}

/// A `/connections` request to gather over a group of workers, not yet asked of the others.
/// `None` when there is nothing to gather (one worker, another path, a bad query: answered at
/// once).
fn new_gather<S>(method: &str, target: &str, view: &View<'_, S>) -> Option<Gather> {
    let (group, _) = view.group.filter(|(g, _)| g.len() > 1)?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != "/connections" || !matches!(method, "GET" | "HEAD") {
        return None;
    }
    Some(Gather {
        query: parse_query(query).ok()?,
        raw: query.to_string(),
        head: method == "HEAD",
        started: false,
        parts: vec![None; group.len()],
        deadline: Tick::MAX,
    })
}

/// One `/connections` body from every worker's lines: merged (longest idle first with
/// `sort=idle`), cut to the limit, with a line for any worker that did not answer.
fn assemble(g: &Gather) -> String {
    let mut lines: Vec<&str> = Vec::new();
    let mut missing = String::new();
    for (i, part) in g.parts.iter().enumerate() {
        match part {
            Some(Ok(body)) => lines.extend(body.lines()),
            Some(Err(e)) => {
                let _ = write!(missing, "# worker {i}: {e}");
            }
            None => {
                let _ = writeln!(missing, "# worker {i} did not answer");
            }
        }
    }
    if g.query.by_idle {
        let idle = |l: &str| -> u64 {
            l.split(' ')
                .find_map(|f| f.strip_prefix("idle_ms="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        lines.sort_by_key(|l| std::cmp::Reverse(idle(l)));
    }
    lines.truncate(g.query.limit);
    let mut out = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum::<usize>());
    for l in lines {
        out.push_str(l);
        out.push('\n');
    }
    out.push_str(&missing);
    out
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
        "Data connections open for the handler (accepted and dialed).",
        |m| m.active,
    );
    p.metric(
        &mut out,
        "connections_peak",
        "gauge",
        "Most data connections open at once (summed over workers).",
        |m| m.peak,
    );
    p.metric(
        &mut out,
        "connections_max",
        "gauge",
        "The connection cap in force.",
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
        "Dialed (outbound) connections open, connecting ones included.",
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
    p.metric(&mut out, "dialed_total", "counter", "Dials started.", |m| {
        m.dialed
    });
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
        |m| &m.rejected,
    );
    p.labelled(
        &mut out,
        "closed_total",
        "Data connections closed (accepted and dialed), by reason.",
        "reason",
        &CloseReason::NAMES,
        |m| &m.closed,
    );
    p.labelled(
        &mut out,
        "dialed_closed_total",
        "Dialed connections closed, by reason (a part of sockman_closed_total).",
        "reason",
        &CloseReason::NAMES,
        |m| &m.closed_dialed,
    );
    p.labelled(
        &mut out,
        "lingered_total",
        "Graceful closes that lingered, by how the linger ended.",
        "end",
        &LINGER_END_NAMES,
        |m| &m.linger_ends,
    );
    p.labelled(
        &mut out,
        "accept_errors_total",
        "accept() failures, by kind.",
        "kind",
        &ACCEPT_ERROR_NAMES,
        |m| &m.accept_errors,
    );
    p.metric(
        &mut out,
        "received_bytes_total",
        "counter",
        "Bytes read from peers.",
        |m| m.bytes_in,
    );
    p.metric(
        &mut out,
        "sent_bytes_total",
        "counter",
        "Bytes written to peers.",
        |m| m.bytes_out,
    );
    p.metric(
        &mut out,
        "pending_output_bytes",
        "gauge",
        "Output waiting for slow peers.",
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
        values: impl Fn(&Metrics) -> &[u64],
    ) {
        let _ = writeln!(
            out,
            "# HELP sockman_{name} {help}\n# TYPE sockman_{name} counter"
        );
        for (n, v) in names.iter().zip(values(self.total)) {
            let _ = writeln!(out, "sockman_{name}{{{label}=\"{n}\"}} {v}");
        }
        for (i, m) in self.workers.iter().enumerate() {
            for (n, v) in names.iter().zip(values(m)) {
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

/// `/connections[?limit=N][&sort=idle]`: one line per connection.
///
/// Without `sort`, the first `limit` connections in slab order: O(limit), whatever the number of
/// connections. With `sort=idle`, the `limit` longest idle: one pass over the connections
/// keeping the best `limit` in a bounded heap, O(n log limit) time and O(limit) memory (nothing
/// keeps connections in idle order unless `--on-full evict-idle` is on).
fn parse_query(query: &str) -> Result<Query, String> {
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
            Phase::Open if c.has_pending() => "backpressure",
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
