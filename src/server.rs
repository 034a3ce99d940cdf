//! The event loop: one `mio::Poll`, a `Slab` of connections, one timer wheel, one close path.
//!
//! # One turn
//! 1. Poll with a zero timeout if a budget left ready work behind (edge-triggered readiness will
//!    not report it again), else until the next wheel tick that holds entries or the accept
//!    resume, capped by the caller's `max_wait`.
//! 2. Read the clock once, *after* the poll: everything below takes that tick as an argument.
//! 3. Dispatch events: waker → stop; listener → accept; connection → flush and read.
//! 4. Expire due wheel entries (within a budget).
//! 5. Continue connections and listeners that a budget left with ready work; resume accepting.
//!
//! # Invariants
//! - Every connection lives in `conns` from accept to [`Server::close`], the only code that
//!   removes slab entries; it deregisters, closes the fd, frees the slot, calls `on_close` and
//!   counts the reason, in that order.
//! - A token and a wheel entry carry the slot's generation; one whose generation does not match
//!   the slot's occupant is stale and is dropped (see [`token_for`]).
//! - A connection with pending output is not read (backpressure), and has a write-stall deadline.

use std::io::{self, Read};
use std::mem;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, trace, warn};
use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};

use crate::close::{CloseReason, Error};
use crate::config::{Config, OnFull};
use crate::conn::{Conn, Io, UNSCHEDULED};
use crate::handler::{ConnId, Context, Handler};
use crate::limits::{self, AcceptError, AcceptGate, Lru, PerIp};
use crate::metrics::{Metrics, RejectReason};
use crate::wheel::{Entry, Tick, Wheel};

/// Dead wheel entries tolerated before a sweep (see `Server::wheel_stale`).
const COMPACT_MIN: usize = 4096;

/// Events fetched per poll.
const EVENTS_CAPACITY: usize = 1024;
/// Most listeners one server takes (their tokens sit just below the waker's).
const MAX_LISTENERS: usize = 1024;
/// Low half of a token: the slab key; high half: the generation.
const KEY_BITS: u32 = usize::BITS / 2;
const KEY_MASK: usize = (1 << KEY_BITS) - 1;
const GEN_MASK: u32 = if KEY_BITS >= 32 {
    u32::MAX
} else {
    (1 << KEY_BITS) - 1
};
/// The waker's token; listener `i` has `WAKER - 1 - i`, the admin listener
/// `WAKER - 1 - MAX_LISTENERS`, admin connection `k` `WAKER - 2 - MAX_LISTENERS - k`. These
/// special tokens are within `SPECIAL` of `WAKER`; a connection token never is, because its key
/// half stays below [`MAX_CONNECTIONS_LIMIT`](crate::config::MAX_CONNECTIONS_LIMIT).
const WAKER: Token = Token(usize::MAX);
const SPECIAL: usize = MAX_LISTENERS + 2 + 64;
#[cfg(feature = "admin")]
const ADMIN_LISTENER: Token = Token(WAKER.0 - 1 - MAX_LISTENERS);
#[cfg(feature = "admin")]
const ADMIN_CONN_BASE: usize = WAKER.0 - 2 - MAX_LISTENERS;

/// The token of the connection in slot `key` with generation `gen`.
///
/// Why a generation: epoll reports an fd at most once per batch, but a connection can be closed
/// by something other than its own event (eviction, expiry, a handler, a shutdown) and its slot
/// refilled by an accept before the rest of the batch is dispatched — slab reuses the most
/// recently freed key first. mio only promises that a deregistered token is absent from *later*
/// polls. The lazy wheel also holds entries of connections long gone. So events and wheel
/// entries carry the generation, and a mismatch means stale. (nginx's `instance` bit and tokio's
/// pre-1.29 token generation guard the same way.)
fn token_for(key: usize, gen: u32) -> Token {
    debug_assert!(key < KEY_MASK, "slab key {key} does not fit a token");
    Token(((gen as usize) << (usize::BITS - KEY_BITS)) | key)
}

fn split_token(token: Token) -> (usize, u32) {
    (
        token.0 & KEY_MASK,
        ((token.0 >> (usize::BITS - KEY_BITS)) as u32) & GEN_MASK,
    )
}

/// Whole ticks in `d`, rounded up (a deadline is never early), capped far below overflow.
fn ticks_in(d: Duration, tick_ns: u64) -> Tick {
    (d.as_nanos().div_ceil(tick_ns as u128)).min(Tick::MAX as u128 / 4) as Tick
}

fn listener_token(i: usize) -> Token {
    Token(WAKER.0 - 1 - i)
}

/// Readiness of one event, as the loop uses it (also built for continuing budgeted work).
#[derive(Debug, Clone, Copy, Default)]
struct Readiness {
    readable: bool,
    writable: bool,
    read_closed: bool,
    error: bool,
}

impl Readiness {
    fn of(event: &Event) -> Readiness {
        Readiness {
            readable: event.is_readable(),
            writable: event.is_writable(),
            read_closed: event.is_read_closed(),
            error: event.is_error(),
        }
    }

    /// Continuing a read that a budget interrupted.
    const CONTINUE: Readiness = Readiness {
        readable: true,
        writable: false,
        read_closed: false,
        error: false,
    };
}

/// A listening socket.
#[derive(Debug)]
struct Listener {
    socket: TcpListener,
    /// The bound address (with the real port when configured with port 0).
    addr: SocketAddr,
    /// The accept budget ran out with connections possibly still queued: no new edge will come
    /// for them, so the next turn accepts again without waiting for an event.
    ready: bool,
    /// `ready` as it was when this turn began: what this turn continues.
    carried: bool,
}

/// What the loop shares with [`Handle`]s on other threads.
#[derive(Debug)]
struct Shared {
    waker: Waker,
    stop: AtomicBool,
    /// Requested drain timeout in nanoseconds; `u64::MAX` = no drain requested.
    drain_ns: AtomicU64,
}

/// Stops a [`Server`] from any thread (a signal thread, a test, a supervisor).
#[derive(Debug, Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// Asks the loop to stop now: at its next turn it closes every connection with
    /// [`CloseReason::Shutdown`], closes its listeners, and [`Server::run`] returns. Also ends a
    /// drain early.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.wake();
    }

    /// Asks the loop to drain: the data listeners close at once (connections already queued are
    /// accepted and served; new connects are refused), connections idle for
    /// [`Config::drain_idle`] with nothing pending are closed, active ones are served until they
    /// end or go idle, and after `timeout` whatever is left is closed ([`CloseReason::Shutdown`]).
    /// The loop stops when no connection is left.
    pub fn drain(&self, timeout: Duration) {
        let ns = timeout.as_nanos().min(u64::MAX as u128 - 1) as u64;
        self.shared.drain_ns.store(ns, Ordering::Release);
        self.wake();
    }

    fn wake(&self) {
        if let Err(e) = self.shared.waker.wake() {
            warn!("cannot wake the loop: {e}");
        }
    }
}

/// A single-threaded TCP server: listeners, connections, deadlines and metrics, driven by
/// [`Server::run`] or turn by turn with [`Server::turn`].
#[derive(Debug)]
pub struct Server<H: Handler> {
    poll: Poll,
    /// Taken out while a batch is dispatched (dispatch needs `&mut self`), put back after.
    events: Option<Events>,
    listeners: Vec<Listener>,
    /// Every open connection, keyed by the low half of its token.
    conns: Slab<Conn<H::Conn>>,
    /// Idle and write-stall deadlines, re-armed lazily (see `expire`).
    wheel: Wheel,
    handler: H,
    config: Config,
    /// The connection cap in force (the configured one clamped to the fd limit).
    max_connections: usize,
    metrics: Metrics,
    /// The one read buffer of the loop: an idle connection owns no buffer.
    buf: Vec<u8>,
    /// Tick 0. Monotonic: wall-clock steps must not close connections.
    start: Instant,
    /// The current turn's tick (read once per turn, after the poll).
    now: Tick,
    tick_ns: u64,
    idle_ticks: Option<Tick>,
    write_ticks: Option<Tick>,
    evict_min_ticks: Tick,
    retry_ticks: Tick,
    /// Generation for the next connection (a wrapping accept counter).
    next_gen: u32,
    /// Connections a read budget left with data to read, as (key, generation).
    ready: Vec<(usize, u32)>,
    /// Scratch: last turn's `ready`, being continued.
    carried: Vec<(usize, u32)>,
    /// The expiry budget left due wheel entries.
    expire_ready: bool,
    /// Scratch for fired wheel entries.
    fired: Vec<Entry>,
    /// Wheel entries known to be dead (their connection closed, or a newer entry superseded
    /// them). They die lazily when their slot fires; past [`COMPACT_MIN`] and twice the live
    /// connections, `compact_wheel` sweeps them, so a high close rate with a long idle timeout
    /// cannot pile up rate × timeout entries.
    wheel_stale: usize,
    shared: Arc<Shared>,
    stopped: bool,
    /// While draining: the tick at which whatever is left gets closed.
    drain_deadline: Option<Tick>,
    #[cfg(feature = "admin")]
    admin: Option<crate::admin::Admin>,
    /// Leak self-check: next check tick, and the descriptors that were open before the loop's
    /// first turn and are not the loop's own (stdio, logs, the embedder's files).
    next_fd_check: Option<Tick>,
    fd_baseline: Option<i64>,
    /// Least-recently-active order, only with [`OnFull::EvictIdle`].
    lru: Option<Lru>,
    /// Connections per peer IP, only with a per-IP cap.
    per_ip: Option<PerIp>,
    gate: AcceptGate,
}

impl<H: Handler> Server<H> {
    /// Validates `config`, raises the fd limit if configured, binds and registers the listeners.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration, [`Error::Bind`] when an address cannot be
    /// bound (e.g. in use), [`Error::Io`] when the poll cannot be created.
    pub fn bind(config: Config, handler: H) -> Result<Server<H>, Error> {
        config.validate()?;
        if config.listen.len() > MAX_LISTENERS {
            return Err(Error::Config(format!(
                "at most {MAX_LISTENERS} listen addresses (got {})",
                config.listen.len()
            )));
        }
        let fd_limit = limits::fd_limit(config.raise_fd_limit);
        // Besides FD_RESERVE: one fd per listener, and the admin listener with its connections.
        #[allow(unused_mut)]
        let mut own_fds = config.listen.len() as u64;
        #[cfg(feature = "admin")]
        if config.admin.is_some() {
            own_fds += 1 + crate::admin::MAX_ADMIN_CONNS as u64;
        }
        let max_connections =
            limits::effective_max_connections(config.max_connections, fd_limit, own_fds);
        let poll = Poll::new()?;
        let mut listeners = Vec::with_capacity(config.listen.len());
        for (i, &addr) in config.listen.iter().enumerate() {
            let mut socket =
                bind_listener(addr, &config).map_err(|source| Error::Bind { addr, source })?;
            let addr = socket.local_addr()?;
            poll.registry()
                .register(&mut socket, listener_token(i), Interest::READABLE)?;
            listeners.push(Listener {
                socket,
                addr,
                ready: false,
                carried: false,
            });
        }
        let waker = Waker::new(poll.registry(), WAKER)?;
        #[cfg(feature = "admin")]
        let admin = match config.admin {
            Some(addr) => Some(
                crate::admin::Admin::bind(
                    addr,
                    poll.registry(),
                    ADMIN_LISTENER,
                    ADMIN_CONN_BASE,
                    config.tick.as_nanos().max(1) as u64,
                )
                .map_err(|source| Error::Bind { addr, source })?,
            ),
            None => None,
        };
        #[cfg(not(feature = "admin"))]
        if config.admin.is_some() {
            return Err(Error::Config(
                "the admin endpoint needs the `admin` cargo feature".into(),
            ));
        }
        let tick_ns = config.tick.as_nanos().min(u64::MAX as u128) as u64;
        let ticks = |d: Duration| ticks_in(d, tick_ns);
        let idle_ticks = (!config.idle_timeout.is_zero()).then(|| ticks(config.idle_timeout));
        let write_ticks = (!config.write_timeout.is_zero()).then(|| ticks(config.write_timeout));
        let span = idle_ticks.unwrap_or(0).max(write_ticks.unwrap_or(0));
        let metrics = Metrics {
            max_connections: max_connections as u64,
            fd_limit: fd_limit.unwrap_or(0),
            ..Metrics::default()
        };
        #[allow(unused_mut)]
        let mut addrs: Vec<String> = listeners.iter().map(|l| l.addr.to_string()).collect();
        #[cfg(feature = "admin")]
        if let Some(admin) = &admin {
            addrs.push(format!("admin=http://{}", admin.addr));
        }
        info!(
            "listening on {} max_connections={max_connections} fd_limit={} on_full={:?} max_per_ip={} idle_timeout={:?} write_timeout={:?} tick={:?} max_pending={}",
            addrs.join(","),
            fd_limit.map_or("unknown".to_string(), |l| l.to_string()),
            config.on_full,
            config.max_per_ip,
            config.idle_timeout,
            config.write_timeout,
            config.tick,
            config.max_pending,
        );
        Ok(Server {
            poll,
            events: Some(Events::with_capacity(EVENTS_CAPACITY)),
            listeners,
            // Reserve up to 64 Ki slots up front: untouched pages cost no RSS, and growth by
            // copying would briefly double the slab at the worst moment (a connection spike).
            conns: Slab::with_capacity(max_connections.min(1 << 16)),
            wheel: Wheel::for_span(span),
            handler,
            max_connections,
            metrics,
            buf: vec![0; config.read_buffer],
            start: Instant::now(),
            now: 0,
            tick_ns,
            idle_ticks,
            write_ticks,
            evict_min_ticks: ticks(config.evict_min_idle),
            retry_ticks: ticks(config.accept_retry).max(1),
            next_gen: 0,
            ready: Vec::new(),
            carried: Vec::new(),
            expire_ready: false,
            fired: Vec::new(),
            wheel_stale: 0,
            shared: Arc::new(Shared {
                waker,
                stop: AtomicBool::new(false),
                drain_ns: AtomicU64::new(u64::MAX),
            }),
            stopped: false,
            drain_deadline: None,
            #[cfg(feature = "admin")]
            admin,
            next_fd_check: None,
            fd_baseline: None,
            lru: (config.on_full == OnFull::EvictIdle).then(Lru::new),
            per_ip: (config.max_per_ip > 0).then(PerIp::default),
            gate: AcceptGate::new(),
            config,
        })
    }

    /// The bound listen addresses, in configuration order (with real ports for port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.addr).collect()
    }

    /// A handle that stops this server from any thread.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Counters and gauges so far.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The connection cap in force.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// The handler.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// The handler, mutably (between turns).
    pub fn handler_mut(&mut self) -> &mut H {
        &mut self.handler
    }

    /// Whether the server has stopped: every connection and listener is closed.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Runs turns until a [`Handle::shutdown`], then returns the final metrics.
    ///
    /// # Errors
    /// [`Error::Io`] if polling fails (anything but EINTR). Connections still open are then
    /// closed with [`CloseReason::Shutdown`] as the server is dropped (`on_close` runs for each).
    pub fn run(mut self) -> Result<Metrics, Error> {
        while !self.stopped {
            self.turn(None)?;
        }
        Ok(mem::take(&mut self.metrics))
    }

    /// Runs one turn of the loop: waits for readiness at most `max_wait` (or less, for a deadline;
    /// `None` = as long as needed), then handles what is ready and what is due.
    ///
    /// # Errors
    /// [`Error::Io`] if polling fails (anything but EINTR).
    pub fn turn(&mut self, max_wait: Option<Duration>) -> Result<(), Error> {
        if self.stopped {
            return Ok(());
        }
        if self.metrics.turns == 0 && !self.config.fd_check_interval.is_zero() {
            self.start_fd_check();
        }
        let timeout = self.poll_timeout(max_wait);
        let mut events = self
            .events
            .take()
            .unwrap_or_else(|| Events::with_capacity(EVENTS_CAPACITY));
        let polled = self.poll.poll(&mut events, timeout);
        // The clock is read after the poll: a `now` from before a blocking wait would be stale by
        // the whole wait and stamp activity early.
        let now = self.tick_at(Instant::now());
        self.now = now;
        if let Err(e) = polled {
            if e.kind() != io::ErrorKind::Interrupted {
                self.events = Some(events);
                return Err(Error::Io(e));
            }
        }
        self.metrics.turns += 1;
        mem::swap(&mut self.ready, &mut self.carried);
        // Listeners whose budget ran out in an earlier turn; ones that run out in this turn's
        // dispatch wait for the next turn, so the budget holds per turn.
        for l in &mut self.listeners {
            l.carried = mem::take(&mut l.ready);
        }
        for event in events.iter() {
            self.metrics.events += 1;
            self.dispatch(event.token(), Readiness::of(event), now);
        }
        self.events = Some(events);
        if self.stopped {
            return Ok(());
        }
        self.expire(now);
        self.continue_ready(now);
        if self.wheel_stale > COMPACT_MIN && self.wheel_stale > 2 * self.conns.len() {
            self.compact_wheel();
        }
        #[cfg(feature = "admin")]
        if let Some(admin) = &mut self.admin {
            if admin.next_deadline().is_some_and(|t| t <= now) {
                admin.expire(self.poll.registry(), now);
            }
        }
        if self.next_fd_check.is_some_and(|t| t <= now) {
            self.check_fds(now);
        }
        if let Some(deadline) = self.drain_deadline {
            self.check_drain(deadline, now);
        }
        Ok(())
    }

    /// Whether a drain is under way.
    pub fn is_draining(&self) -> bool {
        self.drain_deadline.is_some()
    }

    /// Starts a drain now (see [`Handle::drain`]); a second call only shortens the deadline.
    pub fn drain(&mut self, timeout: Duration) {
        let now = self.tick_at(Instant::now());
        self.begin_drain(timeout, now);
    }

    fn begin_drain(&mut self, timeout: Duration, now: Tick) {
        if self.stopped {
            return;
        }
        let deadline = now.saturating_add(self.ticks(timeout));
        if let Some(current) = self.drain_deadline {
            self.drain_deadline = Some(current.min(deadline));
            return;
        }
        // Serve what the kernel already queued (those clients connected before the drain), then
        // close the data listeners so that new connects are refused instead of left hanging.
        for i in 0..self.listeners.len() {
            self.accept_queued(i, Some(now));
        }
        self.close_listeners();
        self.gate.paused_until = None;
        // Idle connections go after `drain_idle`: shorten the idle deadline and arm every
        // connection for it (one pass over the slab, once per drain).
        let drain_idle = self.ticks(self.config.drain_idle);
        self.idle_ticks = Some(self.idle_ticks.map_or(drain_idle, |t| t.min(drain_idle)));
        let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.arm(key);
        }
        self.drain_deadline = Some(deadline);
        info!(
            "draining: listeners closed, {} connections open, idle ones close after {:?}, the rest at {:?}",
            self.conns.len(),
            self.config.drain_idle,
            timeout
        );
        self.check_drain(deadline, now);
    }

    /// Ends the drain when no connection is left, or at its deadline.
    fn check_drain(&mut self, deadline: Tick, now: Tick) {
        if self.conns.is_empty() {
            info!("drain complete: every connection ended");
            self.shutdown();
        } else if now >= deadline {
            self.metrics.drain_forced += self.conns.len() as u64;
            warn!(
                "drain deadline: force-closing {} connections",
                self.conns.len()
            );
            self.shutdown();
        }
    }

    fn ticks(&self, d: Duration) -> Tick {
        ticks_in(d, self.tick_ns)
    }

    /// Closes every connection with [`CloseReason::Shutdown`] and every listener, now.
    pub fn shutdown(&mut self) {
        if self.stopped {
            return;
        }
        let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.close(key, CloseReason::Shutdown);
        }
        self.close_listeners();
        #[cfg(feature = "admin")]
        if let Some(mut admin) = self.admin.take() {
            admin.close_all(self.poll.registry());
        }
        self.drain_deadline = None;
        self.stopped = true;
        info!("stopped: {}", self.metrics);
    }

    fn tick_at(&self, at: Instant) -> Tick {
        (at.saturating_duration_since(self.start).as_nanos() / self.tick_ns as u128) as Tick
    }

    fn poll_timeout(&self, max_wait: Option<Duration>) -> Option<Duration> {
        // A paused accept must not count as ready work: it would spin until the retry time.
        let accept_ready = !self.gate.is_paused() && self.listeners.iter().any(|l| l.ready);
        if !self.ready.is_empty() || self.expire_ready || accept_ready {
            return Some(Duration::ZERO);
        }
        let mut next = self.wheel.next_deadline();
        #[allow(unused_mut)]
        let mut others = [self.drain_deadline, self.next_fd_check, None];
        #[cfg(feature = "admin")]
        {
            others[2] = self.admin.as_ref().and_then(|a| a.next_deadline());
        }
        for t in others.into_iter().flatten() {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        if let Some(resume) = self.gate.paused_until {
            next = Some(next.map_or(resume, |n| n.min(resume)));
        }
        // A deadline too far to be an Instant is no deadline.
        let wake = next
            .and_then(|t| t.checked_mul(self.tick_ns))
            .and_then(|ns| self.start.checked_add(Duration::from_nanos(ns)))
            .map(|at| at.saturating_duration_since(Instant::now()));
        match (wake, max_wait) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn dispatch(&mut self, token: Token, ready: Readiness, now: Tick) {
        if token == WAKER {
            if self.shared.stop.load(Ordering::Acquire) {
                self.shutdown();
            } else {
                let ns = self.shared.drain_ns.swap(u64::MAX, Ordering::AcqRel);
                if ns != u64::MAX {
                    self.begin_drain(Duration::from_nanos(ns), now);
                }
            }
            return;
        }
        let special = WAKER.0 - token.0;
        if special <= SPECIAL {
            let i = special - 1;
            if i < self.listeners.len() {
                // While paused after fd exhaustion, listener events are ignored (resume accepts).
                if !self.gate.is_paused() {
                    self.accept(i, now);
                }
            } else {
                #[cfg(feature = "admin")]
                self.dispatch_admin(token, now);
            }
            return;
        }
        let (key, gen) = split_token(token);
        match self.conns.get(key) {
            Some(conn) if conn.io.gen == gen => self.drive(key, ready, now),
            _ => {
                self.metrics.stale += 1;
                trace!("stale event token={} key={key} gen={gen}", token.0);
            }
        }
    }

    #[cfg(feature = "admin")]
    fn dispatch_admin(&mut self, token: Token, now: Tick) {
        let Some(admin) = &mut self.admin else {
            return;
        };
        match admin.owns(token) {
            Some(None) => admin.accept(self.poll.registry(), now),
            Some(Some(key)) => {
                let view = crate::admin::View {
                    metrics: &self.metrics,
                    conns: &self.conns,
                    now,
                    tick_ns: self.tick_ns,
                    draining: self.drain_deadline.is_some(),
                    token_of: |key, gen| token_for(key, gen).0 as u64,
                };
                admin.drive(key, self.poll.registry(), &view);
            }
            None => {}
        }
    }

    /// The admin endpoint's address, if it is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        #[cfg(feature = "admin")]
        {
            self.admin.as_ref().map(|a| a.addr)
        }
        #[cfg(not(feature = "admin"))]
        None
    }

    /// Descriptors the loop itself holds besides connections: epoll, waker, listeners, the
    /// spare, the admin side.
    fn own_fds(&self) -> i64 {
        #[allow(unused_mut)]
        let mut n = 2 + self.listeners.len() + self.gate.fds();
        #[cfg(feature = "admin")]
        if let Some(admin) = &self.admin {
            n += admin.fds();
        }
        n as i64
    }

    fn start_fd_check(&mut self) {
        if let Some(open) = limits::count_open_fds() {
            self.metrics.fds_open = open;
            self.fd_baseline = Some(open as i64 - self.own_fds() - self.conns.len() as i64);
            self.next_fd_check = Some(self.now + self.ticks(self.config.fd_check_interval));
        }
    }

    /// The leak self-check: every descriptor the process has is a connection, one of the loop's
    /// own, or was there before the first turn. Reports the difference as a gauge, and warns
    /// when it changes from zero.
    fn check_fds(&mut self, now: Tick) {
        self.next_fd_check = Some(now + self.ticks(self.config.fd_check_interval));
        let (Some(open), Some(baseline)) = (limits::count_open_fds(), self.fd_baseline) else {
            return;
        };
        let unaccounted = open as i64 - baseline - self.own_fds() - self.conns.len() as i64;
        if unaccounted != 0 && self.metrics.fds_unaccounted == 0 {
            warn!(
                "leak check: {open} descriptors open, {unaccounted} more than connections ({}) + own ({}) + baseline ({baseline})",
                self.conns.len(),
                self.own_fds()
            );
        } else if unaccounted == 0 && self.metrics.fds_unaccounted != 0 {
            info!("leak check: every descriptor accounted for again");
        }
        self.metrics.fds_open = open;
        self.metrics.fds_unaccounted = unaccounted;
    }

    /// Handles readiness on a live connection: flush pending output, then read.
    fn drive(&mut self, key: usize, ready: Readiness, now: Tick) {
        let io = &mut self.conns[key].io;
        if ready.read_closed {
            io.read_closed = true;
        }
        let mut want_read = ready.readable || ready.read_closed || ready.error;
        if io.has_pending() {
            if !(ready.writable || ready.error) {
                return; // reading stays paused until the output drains
            }
            let flushed = io.flush(now, &mut self.metrics);
            if let Some(lru) = self.lru.as_mut().filter(|_| io.last_active == now) {
                lru.touch(key); // write progress is activity
            }
            match flushed {
                Err(reason) => return self.close(key, reason),
                Ok(false) => return,
                // Reading was paused: data may be waiting with no new edge to announce it.
                Ok(true) => want_read = true,
            }
            let io = &self.conns[key].io;
            if let Some(reason) = io.closing {
                return self.close(key, reason);
            }
        }
        if want_read {
            self.read(key, now);
        }
    }

    /// Reads until WouldBlock, a short read (unless the peer's write side is closed: data and
    /// FIN can share one edge), pending output (backpressure), a close, or the read budget.
    fn read(&mut self, key: usize, now: Tick) {
        // A read never takes more than the output cap, so echoing it back cannot overflow.
        let chunk = self.buf.len().min(self.config.max_pending);
        let mut reads = 0;
        loop {
            let conn = &mut self.conns[key];
            match conn.io.stream.read(&mut self.buf[..chunk]) {
                Ok(0) => return self.close(key, CloseReason::PeerClosed),
                Ok(n) => {
                    conn.io.bytes_in += n as u64;
                    conn.io.last_active = now;
                    self.metrics.bytes_in += n as u64;
                    if let Some(lru) = &mut self.lru {
                        lru.touch(key);
                    }
                    let id = ConnId(token_for(key, conn.io.gen).0 as u64);
                    let mut ctx = Context {
                        io: &mut conn.io,
                        metrics: &mut self.metrics,
                        max_pending: self.config.max_pending,
                        now,
                        id,
                    };
                    self.handler
                        .on_data(&mut conn.state, &mut ctx, &self.buf[..n]);
                    let io = &mut conn.io;
                    if io.failed.is_some() || io.closing.is_some() || io.has_pending() {
                        return self.settle(key);
                    }
                    reads += 1;
                    if n < chunk && !io.read_closed {
                        return; // drained: the next data brings a new edge
                    }
                    if reads >= self.config.read_budget {
                        if !io.queued {
                            io.queued = true;
                            self.ready.push((key, io.gen));
                        }
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.close(key, CloseReason::from_io(&e)),
            }
        }
    }

    /// After a handler callback: close if it failed or asked to (once flushed), and arm the
    /// write-stall deadline if output is now pending.
    fn settle(&mut self, key: usize) {
        let io = &mut self.conns[key].io;
        if let Some(reason) = io.failed {
            return self.close(key, reason);
        }
        if !io.has_pending() {
            if let Some(reason) = io.closing {
                return self.close(key, reason);
            }
        }
        self.arm(key);
    }

    /// Inserts a wheel entry if the connection's earliest deadline is before its scheduled one
    /// (at most one live entry per connection; later deadlines are re-armed lazily on fire).
    fn arm(&mut self, key: usize) {
        let io = &mut self.conns[key].io;
        if let Some((when, _)) = io.deadline(self.idle_ticks, self.write_ticks) {
            if when < io.scheduled {
                if io.scheduled != UNSCHEDULED {
                    self.wheel_stale += 1; // the later entry is superseded
                }
                self.wheel.insert(key as u32, io.gen, when);
                io.scheduled = when;
            }
        }
    }

    /// Fires due wheel entries: stale → drop; deadline moved by activity → re-insert; else close.
    fn expire(&mut self, now: Tick) {
        let draining = self.drain_deadline.is_some();
        let mut fired = mem::take(&mut self.fired);
        self.expire_ready = self
            .wheel
            .advance(now, self.config.expire_budget, &mut fired);
        for entry in fired.drain(..) {
            let key = entry.key as usize;
            let Some(conn) = self.conns.get_mut(key).filter(|c| c.io.gen == entry.gen) else {
                self.metrics.stale += 1;
                self.wheel_stale = self.wheel_stale.saturating_sub(1);
                continue;
            };
            let io = &mut conn.io;
            if io.scheduled != entry.when {
                self.wheel_stale = self.wheel_stale.saturating_sub(1);
                continue; // superseded by an earlier entry
            }
            io.scheduled = UNSCHEDULED;
            match io.deadline(self.idle_ticks, self.write_ticks) {
                // Idle during a drain is the drain closing it: reason Shutdown.
                Some((when, CloseReason::IdleTimeout)) if when <= now && draining => {
                    if io.has_pending() {
                        // Output still waiting is not idle: look again one drain-idle period
                        // later, not every tick (write stall and the drain deadline bound it).
                        let again = now + self.idle_ticks.unwrap_or(1).max(1);
                        self.wheel.insert(entry.key, entry.gen, again);
                        io.scheduled = again;
                    } else {
                        self.close(key, CloseReason::Shutdown)
                    }
                }
                Some((when, reason)) if when <= now => self.close(key, reason),
                Some((when, _)) => {
                    self.wheel.insert(entry.key, entry.gen, when);
                    io.scheduled = when;
                }
                None => {}
            }
        }
        self.fired = fired;
    }

    /// Sweeps dead entries out of the wheel: O(entries), paid once per [`COMPACT_MIN`] (and at
    /// least twice the live connections) closes, so O(1) per close amortised.
    fn compact_wheel(&mut self) {
        let conns = &self.conns;
        let before = self.wheel.len();
        self.wheel.retain(|e| {
            conns
                .get(e.key as usize)
                .is_some_and(|c| c.io.gen == e.gen && c.io.scheduled == e.when)
        });
        trace!(
            "wheel compacted: {} dead entries dropped, {} kept",
            before - self.wheel.len(),
            self.wheel.len()
        );
        self.wheel_stale = 0;
    }

    /// Continues what budgets left: connections with data, listeners with a queue, and a paused
    /// accept whose retry time has come (or that a close resumed).
    fn continue_ready(&mut self, now: Tick) {
        let mut carried = mem::take(&mut self.carried);
        for &(key, gen) in &carried {
            if let Some(conn) = self.conns.get_mut(key).filter(|c| c.io.gen == gen) {
                conn.io.queued = false;
                self.drive(key, Readiness::CONTINUE, now);
            }
        }
        carried.clear();
        self.carried = carried;
        if let Some(resume) = self.gate.paused_until {
            if resume <= now {
                self.gate.paused_until = None;
                self.gate.reclaim_spare();
                debug!("accept: retrying after pause");
                // Edge-triggered: the queued connections produce no new event, so accept now.
                for l in &mut self.listeners {
                    l.carried = true;
                }
            }
        }
        for i in 0..self.listeners.len() {
            if mem::take(&mut self.listeners[i].carried) && !self.gate.is_paused() {
                self.accept(i, now);
            }
        }
    }

    /// Accepts until WouldBlock or the per-turn budget.
    fn accept(&mut self, i: usize, now: Tick) {
        self.listeners[i].ready = false;
        for _ in 0..self.config.accept_budget {
            match self.listeners[i].socket.accept() {
                Ok((stream, peer)) => self.admit(stream, peer, now),
                Err(e) => match limits::classify_accept_error(&e) {
                    AcceptError::Drained => return,
                    AcceptError::Retry => {}
                    kind @ (AcceptError::ProcessFds | AcceptError::SystemFds) => {
                        if kind == AcceptError::ProcessFds {
                            self.metrics.accept_emfile += 1;
                        } else {
                            self.metrics.accept_enfile += 1;
                        }
                        return self.pause_accepting(i, &e, now);
                    }
                    AcceptError::Other => {
                        self.metrics.accept_other += 1;
                        warn!("accept on {} failed: {e}", self.listeners[i].addr);
                        return self.pause_accepting(i, &e, now);
                    }
                },
            }
        }
        self.listeners[i].ready = true;
    }

    /// Out of descriptors: shed what is queued with the spare fd, then pause accepting until a
    /// connection closes or the retry time passes. Warns on the transition, not per attempt.
    fn pause_accepting(&mut self, i: usize, err: &io::Error, now: Tick) {
        let mut shed = 0;
        if self.gate.release_spare() {
            // One free descriptor: accept and close at once what is queued, so those clients
            // learn now instead of hanging in the backlog.
            shed = self.accept_queued(i, None);
            self.gate.reclaim_spare();
        }
        self.metrics.rejected[RejectReason::Shed.index()] += shed;
        self.gate.shed += shed;
        let first = !self.gate.exhausted;
        self.gate.exhausted = true;
        self.gate.paused_until = Some(now + self.retry_ticks);
        self.metrics.accept_pauses += 1;
        if first {
            warn!(
                "accept paused: {err} (active={} max_connections={}); shed {shed} queued connections; resuming on the next close or in {:?}",
                self.metrics.active, self.max_connections, self.config.accept_retry
            );
        } else {
            debug!("accept paused again: {err}; shed {shed}");
        }
    }

    /// Accepts what listener `i` has queued, up to one backlog's worth (a flood cannot hold the
    /// loop here): admitted as connections with `Some(now)`, closed at once with `None` (shed).
    /// Returns how many were accepted.
    fn accept_queued(&mut self, i: usize, admit_at: Option<Tick>) -> u64 {
        let mut accepted = 0;
        for _ in 0..self.config.backlog.min(65_536) {
            match self.listeners[i].socket.accept() {
                Ok((stream, peer)) => {
                    accepted += 1;
                    match admit_at {
                        Some(now) => self.admit(stream, peer, now),
                        None => drop(stream),
                    }
                }
                Err(e) if limits::classify_accept_error(&e) == AcceptError::Retry => {}
                Err(_) => break,
            }
        }
        accepted
    }

    /// Deregisters and closes every data listener.
    fn close_listeners(&mut self) {
        for l in &mut self.listeners {
            let _ = self.poll.registry().deregister(&mut l.socket);
        }
        self.listeners.clear();
    }

    /// Admits an accepted socket as a connection, or refuses it (cap, per-IP).
    fn admit(&mut self, mut stream: TcpStream, peer: SocketAddr, now: Tick) {
        if self.gate.exhausted {
            self.gate.exhausted = false;
            warn!(
                "accept resumed: {} connections shed and {} pauses since it stopped",
                self.gate.shed, self.metrics.accept_pauses
            );
            self.gate.shed = 0;
        }
        // The per-IP cap is checked first: a refused client must not evict anybody.
        if let Some(per_ip) = &mut self.per_ip {
            if !per_ip.try_add(peer.ip(), self.config.max_per_ip) {
                self.metrics.rejected[RejectReason::PerIp.index()] += 1;
                trace!("rejected peer={peer} reason=per_ip");
                return;
            }
        }
        if self.conns.len() >= self.max_connections && !self.evict_for(now) {
            if let Some(per_ip) = &mut self.per_ip {
                per_ip.remove(peer.ip());
            }
            self.metrics.rejected[RejectReason::Full.index()] += 1;
            trace!("rejected peer={peer} reason=full");
            return; // dropping the stream closes it: the client learns at once
        }
        let key = self.conns.vacant_key();
        let gen = self.next_gen & GEN_MASK;
        self.next_gen = self.next_gen.wrapping_add(1);
        let token = token_for(key, gen);
        // Readable and writable, edge-triggered, once for the connection's life: backpressure
        // is "do not read" rather than an interest change, so no epoll_ctl per stall.
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.metrics.rejected[RejectReason::Register.index()] += 1;
            if let Some(per_ip) = &mut self.per_ip {
                per_ip.remove(peer.ip());
            }
            warn!("cannot register connection from {peer}: {e}");
            return;
        }
        #[cfg(not(target_os = "linux"))]
        if self.config.nodelay {
            let _ = stream.set_nodelay(true);
        }
        let mut io = Io::new(stream, peer, gen, now);
        self.metrics.count_open();
        let id = ConnId(token.0 as u64);
        let state = self.handler.on_open(&mut Context {
            io: &mut io,
            metrics: &mut self.metrics,
            max_pending: self.config.max_pending,
            now,
            id,
        });
        let inserted = self.conns.insert(Conn { io, state });
        debug_assert_eq!(inserted, key, "slab did not use its vacant key");
        if let Some(lru) = &mut self.lru {
            lru.push(key);
        }
        debug!("accepted conn={id} peer={peer}");
        self.settle(key);
    }

    /// At the cap with evict-idle: closes the longest-idle connection if it has been idle long
    /// enough. Returns whether a slot was freed.
    fn evict_for(&mut self, now: Tick) -> bool {
        let Some(key) = self.lru.as_ref().and_then(Lru::oldest) else {
            return false;
        };
        let idle = now.saturating_sub(self.conns[key].io.last_active);
        if idle < self.evict_min_ticks {
            return false;
        }
        self.close(key, CloseReason::Evicted);
        true
    }

    /// The one close path: deregister, close the fd, free the slot, `on_close`, count.
    fn close(&mut self, key: usize, reason: CloseReason) {
        let conn = &mut self.conns[key];
        // mio's contract: deregister before the source is dropped.
        if let Err(e) = self.poll.registry().deregister(&mut conn.io.stream) {
            trace!("deregister key={key}: {e}");
        }
        // Freeing the slot moves the connection out; its socket is closed just below, before
        // anything else can run (one thread), so the order is not observable.
        let Conn { io, state } = self.conns.remove(key);
        if io.scheduled != UNSCHEDULED {
            self.wheel_stale += 1; // its wheel entry dies lazily
        }
        let id = ConnId(token_for(key, io.gen).0 as u64);
        let (peer, bytes_in, bytes_out, opened) = (io.peer(), io.bytes_in, io.bytes_out, io.opened);
        self.metrics.pending_bytes -= io.pending_len() as u64;
        drop(io); // closes the fd
        if let Some(lru) = &mut self.lru {
            lru.remove(key);
        }
        if let Some(per_ip) = &mut self.per_ip {
            per_ip.remove(peer.ip());
        }
        if self.gate.is_paused() {
            // A descriptor came free: resume accepting this turn.
            self.gate.paused_until = Some(0);
        }
        self.handler.on_close(state, id, reason);
        let lifetime_us = (self.now.saturating_sub(opened) as u128 * self.tick_ns as u128 / 1000)
            .min(u64::MAX as u128) as u64;
        self.metrics.count_close(reason, lifetime_us);
        debug!(
            "closed conn={id} peer={peer} reason={reason} bytes_in={bytes_in} bytes_out={bytes_out} age_ms={}",
            lifetime_us / 1000
        );
    }
}

/// Dropping a server that has not stopped (an embedder's choice, or `run` failing) closes every
/// connection through the close path, so `on_close` still runs exactly once per connection.
impl<H: Handler> Drop for Server<H> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Creates a nonblocking listening socket with the configured options. Options set on the
/// listener are inherited by accepted sockets on Linux (TCP_NODELAY, keepalive), which saves a
/// `setsockopt` per connection.
fn bind_listener(addr: SocketAddr, config: &Config) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Restart without waiting out TIME_WAIT of the previous run's connections.
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_tcp_nodelay(config.nodelay)?;
    if !config.tcp_keepalive.is_zero() {
        let interval = (config.tcp_keepalive / 3).max(Duration::from_secs(1));
        socket.set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(config.tcp_keepalive)
                .with_interval(interval),
        )?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(config.backlog as i32)?;
    Ok(TcpListener::from_std(socket.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::Echo;
    use std::io::Write as _;

    fn local_config() -> Config {
        Config {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            ..Config::default()
        }
    }

    /// Turns until `done` holds; bounded in turns and time.
    #[track_caller]
    fn turn_until<H: Handler>(server: &mut Server<H>, mut done: impl FnMut(&Server<H>) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done(server) {
            assert!(Instant::now() < deadline, "condition not reached in 5 s");
            server.turn(Some(Duration::from_millis(50))).unwrap();
        }
    }

    #[test]
    fn tokens_round_trip_key_and_generation() {
        for (key, gen) in [(0, 0), (1, 7), (12345, GEN_MASK), (KEY_MASK - 2000, 3)] {
            assert_eq!(split_token(token_for(key, gen)), (key, gen));
        }
        // The highest connection token stays clear of the special (listener, admin) tokens.
        let highest = token_for(crate::config::MAX_CONNECTIONS_LIMIT - 1, GEN_MASK);
        assert!(WAKER.0 - highest.0 > SPECIAL);
        assert!(WAKER.0 - listener_token(MAX_LISTENERS - 1).0 <= SPECIAL);
    }

    #[test]
    fn stale_event_for_reused_slot_is_dropped() {
        let mut server = Server::bind(local_config(), Echo).unwrap();
        let addr = server.local_addrs()[0];
        let _a = std::net::TcpStream::connect(addr).unwrap();
        turn_until(&mut server, |s| s.metrics().accepted == 1);
        let (key, old_gen) = {
            let (key, conn) = server.conns.iter().next().unwrap();
            (key, conn.io.gen)
        };
        let stale = token_for(key, old_gen);
        // Closed by something other than its own event, then the slot is refilled.
        server.close(key, CloseReason::Evicted);
        let mut b = std::net::TcpStream::connect(addr).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        turn_until(&mut server, |s| s.metrics().accepted == 2);
        let new_gen = server.conns[key].io.gen;
        assert_ne!(
            new_gen, old_gen,
            "the reused slot must get a new generation"
        );
        b.write_all(b"ping").unwrap();
        // The old connection's event, as if still in the same batch: dropped, B untouched.
        let readable = Readiness {
            readable: true,
            read_closed: true,
            ..Readiness::default()
        };
        server.dispatch(stale, readable, 0);
        assert_eq!(server.metrics().stale, 1);
        assert_eq!(
            server.metrics().bytes_in,
            0,
            "a stale event must not read B's data"
        );
        assert!(server.conns.contains(key));
        // B still echoes through its own events.
        turn_until(&mut server, |s| s.metrics().bytes_out == 4);
        let mut reply = [0; 4];
        b.read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"ping");
        // A stale wheel entry for the old generation is dropped as well.
        server.wheel.insert(key as u32, old_gen, 0);
        // An entry inserted for a tick the wheel has passed fires at its next tick.
        let now = server.tick_at(Instant::now()).max(server.wheel.elapsed());
        server.expire(now);
        assert_eq!(server.metrics().stale, 2);
        assert!(server.conns.contains(key));
        server.shutdown();
        assert_eq!(server.metrics().active, 0);
        assert_eq!(server.metrics().closed_by(CloseReason::Shutdown), 1);
    }

    #[test]
    fn closed_connections_do_not_pile_up_in_the_wheel() {
        // A 60 s idle timeout and short-lived connections: each close leaves a dead entry that
        // would otherwise wait 60 s for its slot. The sweep keeps them bounded.
        let mut server = Server::bind(local_config(), Echo).unwrap();
        let addr = server.local_addrs()[0];
        let total = 3 * COMPACT_MIN as u64;
        let mut done = 0;
        while done < total {
            let batch: Vec<_> = (0..256)
                .map(|_| std::net::TcpStream::connect(addr).unwrap())
                .collect();
            done += batch.len() as u64;
            drop(batch);
            turn_until(&mut server, |s| s.metrics().closed_total() == done);
            assert!(
                server.wheel.len() <= 2 * COMPACT_MIN + 256,
                "{} wheel entries for {} live connections after {done} closes",
                server.wheel.len(),
                server.conns.len()
            );
        }
        assert_eq!(server.metrics().closed_by(CloseReason::PeerClosed), total);
    }

    #[test]
    fn accepted_sockets_inherit_listener_options() {
        // TCP_NODELAY and keepalive are set once on the listener; Linux copies them to each
        // accepted socket, which saves a setsockopt per connection. Verify that it does.
        let config = Config {
            tcp_keepalive: Duration::from_secs(30),
            ..local_config()
        };
        let listener = bind_listener(config.listen[0], &config).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let (stream, _) = loop {
            match listener.accept() {
                Ok(pair) => break pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "no connection to accept");
                    std::thread::yield_now();
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        assert!(stream.nodelay().unwrap(), "TCP_NODELAY not inherited");
        let sock = socket2::SockRef::from(&stream);
        assert!(sock.keepalive().unwrap(), "SO_KEEPALIVE not inherited");
        #[cfg(target_os = "linux")]
        assert_eq!(sock.tcp_keepalive_time().unwrap(), Duration::from_secs(30));
    }

    #[test]
    fn bind_reports_address_in_use() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let config = Config {
            listen: vec![taken.local_addr().unwrap()],
            ..Config::default()
        };
        match Server::bind(config, Echo) {
            Err(Error::Bind { addr, source }) => {
                assert_eq!(addr, taken.local_addr().unwrap());
                assert_eq!(source.kind(), io::ErrorKind::AddrInUse);
            }
            other => panic!("expected a bind error, got {other:?}"),
        }
    }
}
