//! The admin endpoint's connections: a tiny HTTP/1.1 server on its own listener, served by the
//! same loop as the data connections (no extra thread): accepting, reading a request, writing
//! the answer (`pages.rs` says what each path answers: `GET /metrics`, `/connections`,
//! `/livez`, `/readyz`, `/health`), lingering, and gathering `/connections` over workers.
//!
//! Admin connections have their own small limits (count, request size, lifetime), are never
//! counted as data connections, and get `Connection: close` responses: one request each. Like a
//! data connection's graceful close, an answer is followed by `shutdown(Write)` and a linger that
//! reads and discards until the client's EOF: a client that sent more than its request would
//! otherwise get a reset that destroys the end of the answer.
//!
//! A monitoring system must always get in: when every slot is taken, the oldest connection that
//! is not answering a request now is closed to make room, if it has not sent a byte yet or has
//! held its slot for [`YIELD_AFTER`] without completing a request (or lingers that long after
//! its answer): so clients that each send one byte and stall hold the endpoint for a second at
//! most, not for the admin timeout. Accepting is budgeted per turn and retried after an error
//! instead of waiting for an edge that may never come.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use log::{debug, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry};
use slab::Slab;

use super::pages::{connections, parse_query, route, simple, strip_body, Query};
use super::View;
use crate::handover::HandedListener;
use crate::limits;
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
/// When every slot is taken, a connection that has held its slot this long without completing a
/// request (or lingers this long after its answer) yields to a newcomer: a real client's
/// request arrives in one segment, well within it.
const YIELD_AFTER: Duration = Duration::from_secs(1);
/// After an accept error, the admin listener is tried again this much later (the data side
/// handles fd exhaustion; this only keeps queued admin clients from waiting for an edge).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

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

/// How long worker 0 waits for the other workers' `/connections` lines.
const GATHER_TIMEOUT: Duration = Duration::from_secs(1);

impl AdminConn {
    /// Whether this connection yields its slot to a newcomer at `now` (every slot taken): it is
    /// not answering a request (writing an answer, gathering one), and it has sent nothing
    /// yet, or has had `yield_ticks` to complete its request (or to end its linger).
    fn may_yield(&self, now: Tick, yield_ticks: Tick) -> bool {
        let old = now >= crate::time::deadline(self.opened, yield_ticks);
        match self.lingering {
            Some(since) => now >= crate::time::deadline(since, yield_ticks),
            None if self.gather.is_some() || !self.response.is_empty() => false,
            None => self.request.is_empty() || old,
        }
    }
}

/// The admin listener and its connections.
#[derive(Debug)]
pub(crate) struct Admin {
    /// `None` once released to a successor (see [`crate::handover`]): the connections already
    /// accepted are still answered.
    listener: Option<TcpListener>,
    pub(crate) addr: SocketAddr,
    conns: Slab<AdminConn>,
    timeout_ticks: Tick,
    /// [`YIELD_AFTER`] in ticks.
    yield_ticks: Tick,
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
        linger: (Tick, u64),
    ) -> io::Result<Admin> {
        Admin::adopt(TcpListener::bind(addr)?, registry, clock, linger)
    }

    /// Serves the admin endpoint on `listener`, bound already (handed over by a predecessor, or
    /// just bound by [`Admin::bind`]).
    pub(crate) fn adopt(
        mut listener: TcpListener,
        registry: &Registry,
        clock: &Clock,
        (linger_ticks, linger_bytes): (Tick, u64),
    ) -> io::Result<Admin> {
        registry.register(&mut listener, token::admin_listener(), Interest::READABLE)?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() {
            warn!("admin endpoint on {addr} is not loopback: anyone who can reach it sees the connection list");
        }
        Ok(Admin {
            listener: Some(listener),
            addr,
            conns: Slab::with_capacity(MAX_ADMIN_CONNS),
            timeout_ticks: clock.ticks(ADMIN_TIMEOUT).max(1),
            yield_ticks: clock.ticks(YIELD_AFTER).max(1),
            retry_ticks: clock.ticks(ACCEPT_RETRY).max(1),
            linger_ticks,
            linger_bytes,
            accept_at: None,
        })
    }

    /// Accepts up to [`ACCEPT_BUDGET`] connections; when every slot is taken, the oldest
    /// connection that may yield makes room (else the newcomer is closed at once).
    pub(crate) fn accept(&mut self, registry: &Registry, now: Tick) {
        self.accept_at = None;
        for _ in 0..ACCEPT_BUDGET {
            let accepted = match &self.listener {
                Some(listener) => listener.accept(),
                None => return,
            };
            match accepted {
                Ok((mut stream, peer)) => {
                    if self.conns.len() >= MAX_ADMIN_CONNS && !self.make_room(registry, now) {
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

    /// Closes the oldest connection that may yield its slot at `now` (see
    /// [`AdminConn::may_yield`]). Returns whether one was found.
    fn make_room(&mut self, registry: &Registry, now: Tick) -> bool {
        let oldest = self
            .conns
            .iter()
            .filter(|(_, c)| c.may_yield(now, self.yield_ticks))
            .min_by_key(|(_, c)| c.opened)
            .map(|(k, _)| k);
        match oldest {
            Some(k) => {
                debug!("admin: every slot taken, closing the oldest connection without a request under way");
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
        usize::from(self.listener.is_some()) + self.conns.len()
    }

    /// A duplicate of the listener (the same socket), for a successor; `None` once released.
    pub(crate) fn duplicate_listener(&self) -> io::Result<Option<HandedListener>> {
        self.listener
            .as_ref()
            .map(|l| HandedListener::duplicate(socket2::SockRef::from(l), self.addr, true))
            .transpose()
    }

    /// Stops accepting and closes this descriptor of the listener (the socket lives on in the
    /// successor, which accepts its queue); the connections already accepted are still
    /// answered. Returns whether there was a listener.
    pub(crate) fn release_listener(&mut self, registry: &Registry) -> bool {
        let Some(mut listener) = self.listener.take() else {
            return false;
        };
        let _ = registry.deregister(&mut listener);
        self.accept_at = None;
        true
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
        self.release_listener(registry);
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
