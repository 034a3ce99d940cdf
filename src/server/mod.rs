//! The event loop: one `mio::Poll`, the connection [`Table`], one timer wheel, one close path.
//!
//! # One turn ([`Server::turn`], or [`Server::turn_at`] with time as an input)
//! 1. Poll with a zero timeout if a budget left ready work behind (edge-triggered readiness will
//!    not report it again), else until the next deadline (wheel, accept resume, drain, admin,
//!    periodic, self-check), capped by the caller's `max_wait`.
//! 2. Take `now`: read the clock once, *after* the poll (`turn`), or the caller's (`turn_at`).
//!    Everything below takes that tick; nothing else reads the clock.
//! 3. Dispatch events: waker → stop, drain, messages from other threads; listener → accept;
//!    admin → admin; connection → connect, flush, read (or linger).
//! 4. Expire due wheel entries (within a budget).
//! 5. Continue what budgets left (connections with data, listeners with a queue, resumed
//!    reads, a paused accept whose time came), the admin side, the self-check, the periodic
//!    callback, the drain.
//!
//! # Invariants
//! - Every connection lives in the slab from accept or dial to [`Server::release`], the only
//!   code that removes slab entries. A connection's handler part ends in [`Server::close`]
//!   (deregister, close the fd, free the slot, `on_close`, count the reason, in that order) or,
//!   for a graceful close, in `begin_linger` (`on_close` and the count at the start of the
//!   linger; the slot and fd are freed when the linger ends).
//! - A token, a wheel entry and a [`ConnId`] carry the slot's generation; one whose generation
//!   does not match the slot's occupant is stale and is dropped (see [`crate::token`]).
//! - Callbacks never close connections themselves; they mark them and the loop settles them
//!   (`settle`) after the callback, so no callback runs inside another.
//! - With [`Handler::PAUSE_READING_WHILE_PENDING`], a connection with pending output is not
//!   read (backpressure); any connection with pending output has a write-stall deadline.

mod accept;
mod timers;

use std::mem;
use std::net::{Shutdown, SocketAddr};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, trace};
use mio::event::Event;
use mio::{Events, Interest, Poll};

use crate::admin::{AdminSide, View};
use crate::config::Config;
use crate::conn::{flag, Conn, OutputLimits, Phase, Timeouts};
use crate::error::Error;
use crate::group::{Group, Member};
use crate::handler::{Context, Eof, Handler};
use crate::limits::{self, ADMIN_FDS};
use crate::metrics::Metrics;
use crate::reason::{CloseReason, LingerEnd};
use crate::remote::{Handle, Job, Msg, Remote, Shared};
use crate::table::{DialError, Table};
use crate::time::{Clock, Tick, NEVER};
use crate::token::{self, ConnId, Kind, MAX_LISTENERS};

use accept::{bind_listener, socket_options, Acceptor, Listener};
use timers::{Timers, COMPACT_MIN};

/// The loop's end of the closure queue, and the sending end that [`Remote`]s clone.
type JobQueue<H> = (Receiver<Job<H>>, std::sync::mpsc::SyncSender<Job<H>>);

/// Events fetched per poll.
const EVENTS_CAPACITY: usize = 1024;

/// Readiness of one event, as the loop uses it (also built for continuing budgeted work).
#[derive(Debug, Clone, Copy, Default)]
struct Readiness {
    readable: bool,
    writable: bool,
    read_closed: bool,
    error: bool,
    /// EPOLLPRI: TCP urgent data arrived.
    priority: bool,
}

impl Readiness {
    fn of(event: &Event) -> Readiness {
        Readiness {
            readable: event.is_readable(),
            writable: event.is_writable(),
            read_closed: event.is_read_closed(),
            error: event.is_error(),
            priority: event.is_priority(),
        }
    }

    /// Continuing a read that a budget interrupted, or that the handler resumed.
    const CONTINUE: Readiness = Readiness {
        readable: true,
        writable: false,
        read_closed: false,
        error: false,
        priority: false,
    };
}

/// A single-threaded TCP server: listeners, connections (accepted and dialed), deadlines and
/// metrics, driven by [`Server::run`] or turn by turn with [`Server::turn`] /
/// [`Server::turn_at`].
#[derive(Debug)]
pub struct Server<H: Handler> {
    /// The slab of connections and what a callback may touch (poll, metrics, dirty list).
    table: Table<H::Conn>,
    handler: H,
    /// Taken out while a batch is dispatched (dispatch needs `&mut self`), put back after.
    events: Option<Events>,
    /// The one read buffer of the loop: an idle connection owns no buffer.
    buf: Vec<u8>,
    config: Config,
    /// Listeners, the accept gate, admission bookkeeping.
    accept: Acceptor,
    /// The wheel and every other deadline.
    timers: Timers,
    /// Connections a read budget (or a resume) left with data to read.
    ready: Vec<ConnId>,
    /// Scratch: last turn's `ready`, being continued.
    carried: Vec<ConnId>,
    admin: AdminSide,
    shared: Arc<Shared>,
    /// Messages from [`Handle::send`] and [`Handle::close`].
    mail: Receiver<Msg>,
    /// Closures from [`Remote::run`], once a `Remote` exists.
    jobs: Option<JobQueue<H>>,
    /// The remote budget ran out with messages left.
    remote_ready: bool,
    /// Membership in a group of workers ([`crate::Workers`]), if any.
    member: Option<Member>,
    /// The deadline wake-up of real-time turns (Linux), so that the poll waits without a
    /// timeout; `None` elsewhere, or if it could not be created (then the poll timeout does).
    #[cfg(target_os = "linux")]
    alarm: Option<crate::alarm::Alarm>,
    /// Bytes read with a PROXY header, after it, not yet delivered (reading was paused): rare
    /// and short, so a list, looked up only for connections flagged `LEFTOVER`.
    leftover: Vec<(ConnId, Vec<u8>)>,
}

impl<H: Handler> Server<H> {
    /// Validates `config`, raises the fd limit if configured, binds and registers the listeners.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration, [`Error::Bind`] when an address cannot be
    /// bound (e.g. in use), [`Error::Io`] when the poll cannot be created.
    pub fn bind(config: Config, handler: H) -> Result<Server<H>, Error> {
        Server::bind_inner(config, handler, None)
    }

    /// Like [`Server::bind`], but serves `listeners` that are already bound and listening (for
    /// instance inherited from systemd socket activation) instead of binding
    /// [`Config::listen`]. They are made nonblocking and get the configured socket options
    /// (TCP_NODELAY, keepalive, buffer sizes), which their accepted sockets inherit.
    ///
    /// # Errors
    /// As [`Server::bind`]; [`Error::Io`] if a listener cannot be configured.
    pub fn bind_listeners(
        config: Config,
        listeners: Vec<std::net::TcpListener>,
        handler: H,
    ) -> Result<Server<H>, Error> {
        Server::bind_inner(config, handler, Some(listeners))
    }

    fn bind_inner(
        mut config: Config,
        handler: H,
        inherited: Option<Vec<std::net::TcpListener>>,
    ) -> Result<Server<H>, Error> {
        if let Some(l) = &inherited {
            config.listen = l.iter().map(|l| l.local_addr()).collect::<Result<_, _>>()?;
        }
        config.validate()?;
        if config.listen.len() > MAX_LISTENERS {
            return Err(Error::Config(format!(
                "at most {MAX_LISTENERS} listen addresses (got {})",
                config.listen.len()
            )));
        }
        if config.admin.is_some() && ADMIN_FDS == 0 {
            return Err(Error::Config(
                "the admin endpoint needs the `admin` cargo feature".into(),
            ));
        }
        let fd_limit = limits::fd_limit(config.raise_fd_limit);
        // Besides FD_RESERVE: one fd per listener, and the admin listener with its connections.
        let own_fds = config.listen.len() as u64 + config.admin.map_or(0, |_| ADMIN_FDS);
        let max_connections =
            limits::effective_max_connections(config.max_connections, fd_limit, own_fds);
        let poll = Poll::new()?;
        let mut listeners = Vec::with_capacity(config.listen.len());
        let mut inherited = inherited.map(Vec::into_iter);
        for (i, &addr) in config.listen.iter().enumerate() {
            let mut socket = match inherited.as_mut().and_then(Iterator::next) {
                Some(l) => accept::configure_listener(l, &config)?,
                None => {
                    bind_listener(addr, &config).map_err(|source| Error::Bind { addr, source })?
                }
            };
            let addr = socket.local_addr()?;
            poll.registry()
                .register(&mut socket, token::listener(i), Interest::READABLE)?;
            listeners.push(Listener {
                socket,
                addr,
                ready: false,
                carried: false,
            });
        }
        let waker = mio::Waker::new(poll.registry(), token::WAKER)?;
        let clock = Clock::new(Instant::now(), config.tick);
        let ticks = |d: Duration| clock.ticks(d);
        let off_or = |d: Duration| (!d.is_zero()).then(|| ticks(d));
        let lifetime = off_or(config.max_lifetime);
        let timeouts = Timeouts {
            idle: off_or(config.idle_timeout),
            write: off_or(config.write_timeout),
            connect: off_or(config.connect_timeout),
            linger: ticks(config.linger_timeout),
            header: ticks(config.proxy_header_timeout),
            lifetime,
            jitter: match config.max_lifetime_jitter {
                Some(j) => ticks(j),
                None => lifetime.unwrap_or(0) / 10,
            },
            first_byte: off_or(config.first_byte_timeout),
        };
        let admin = AdminSide::bind(
            config.admin,
            poll.registry(),
            &clock,
            (timeouts.linger, config.linger_bytes),
        )
        .map_err(|source| Error::Bind {
            addr: config.admin.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
            source,
        })?;
        let span = [timeouts.idle, timeouts.write, timeouts.connect]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(0);
        let metrics = Metrics {
            max_connections: max_connections as u64,
            fd_limit: fd_limit.unwrap_or(0),
            ..Metrics::default()
        };
        let mut addrs: Vec<String> = listeners.iter().map(|l| l.addr.to_string()).collect();
        if let Some(addr) = admin.addr() {
            addrs.push(format!("admin=http://{addr}"));
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
        let (low, high) = config.watermarks();
        let limits = OutputLimits {
            max_pending: config.max_pending,
            high,
            low,
        };
        let (shared, mail) = Shared::new(waker, config.remote_queue);
        #[cfg(target_os = "linux")]
        let alarm = match crate::alarm::Alarm::new(poll.registry(), token::alarm()) {
            Ok(a) => Some(a),
            Err(e) => {
                log::warn!("no timerfd ({e}): deadlines wake the loop through the poll timeout");
                None
            }
        };
        Ok(Server {
            table: Table::new(
                poll,
                max_connections,
                limits,
                clock,
                socket_options(&config),
                metrics,
            ),
            handler,
            events: Some(Events::with_capacity(EVENTS_CAPACITY)),
            buf: vec![0; config.read_buffer],
            accept: Acceptor::new(listeners, &config, ticks),
            timers: Timers::new(
                timeouts,
                span,
                off_or(config.periodic).unwrap_or(0),
                off_or(config.fd_check_interval).unwrap_or(0),
            ),
            ready: Vec::new(),
            carried: Vec::new(),
            admin,
            shared,
            mail,
            jobs: None,
            remote_ready: false,
            member: None,
            leftover: Vec::new(),
            #[cfg(target_os = "linux")]
            alarm,
            config,
        })
    }

    /// The bound listen addresses, in configuration order (with real ports for port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.accept.listeners.iter().map(|l| l.addr).collect()
    }

    /// The admin endpoint's address, if it is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.addr()
    }

    /// A handle that stops, drains or feeds this server from any thread.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// A sender of closures to run on this server's loop from any thread (a bounded queue of
    /// [`Config::remote_queue`] closures).
    pub fn remote(&mut self) -> Remote<H> {
        let capacity = self.config.remote_queue;
        let (_, tx) = self.jobs.get_or_insert_with(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel(capacity);
            (rx, tx)
        });
        Remote {
            tx: tx.clone(),
            shared: Arc::clone(&self.shared),
        }
    }

    /// Counters and gauges so far.
    pub fn metrics(&self) -> &Metrics {
        &self.table.metrics
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The connection cap in force.
    pub fn max_connections(&self) -> usize {
        self.table.max_connections
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
        self.table.stopped
    }

    /// Whether a drain is under way (its lame-duck delay included).
    pub fn is_draining(&self) -> bool {
        self.timers.drain_deadline.is_some() || self.timers.lame_duck.is_some()
    }

    /// Whether this server should get new connections (what `/readyz` answers): not while
    /// draining (its lame-duck delay included), nor at the connection cap.
    ///
    /// # Errors
    /// Why not, in a few words.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.timers.lame_duck.is_some() {
            Err("draining soon (lame duck)")
        } else if self.timers.drain_deadline.is_some() {
            Err("draining")
        } else if self.table.slab.len() >= self.table.max_connections {
            Err("at the connection cap")
        } else {
            Ok(())
        }
    }

    /// The time of the last turn (the server's start before the first).
    pub fn now(&self) -> Instant {
        self.table.now_at
    }

    /// Makes this server worker `index` of `group`.
    pub(crate) fn join_group(&mut self, group: Arc<Group>, index: usize) {
        let own = self.own_fds() as u64;
        group.slots[index]
            .fds
            .store(own, std::sync::atomic::Ordering::Relaxed);
        group.publish(index, &self.table.metrics);
        self.member = Some(Member {
            group,
            index,
            published: Tick::MAX,
            unpublished: false,
        });
    }

    /// In a group: publishes this worker's metrics and descriptors, once per tick at most. A
    /// turn in a tick already published leaves them for the next tick, which the poll timeout
    /// then waits for at most (see `timeout`).
    fn publish(&mut self) {
        let now = self.table.now;
        if let Some(m) = &mut self.member {
            m.unpublished = m.published == now;
        }
        if self.member.as_ref().is_some_and(|m| !m.unpublished) {
            let fds = self.own_fds() as u64 + self.table.slab.len() as u64;
            let m = self.member.as_mut().expect("checked above");
            m.published = now;
            m.group.publish(m.index, &self.table.metrics);
            m.group.slots[m.index]
                .fds
                .store(fds, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// In a group: answers worker 0's `/connections` query, if one is waiting.
    fn answer_group(&mut self) {
        let Some(m) = &self.member else {
            return;
        };
        let Some(query) = m.group.take_request(m.index) else {
            return;
        };
        let view = self.view();
        let lines = crate::admin::connection_lines(&query, &view, Some(m.index));
        m.group.respond(m.index, lines);
    }

    /// What the admin pages show, now.
    fn view(&self) -> View<'_, H::Conn> {
        View {
            metrics: &self.table.metrics,
            conns: &self.table.slab,
            now: self.table.now,
            at: self.table.now_at,
            clock: self.table.clock,
            draining: self.is_draining(),
            ready: self.readiness(),
            hooks: &self.handler,
            group: self.member.as_ref().map(|m| (&*m.group, m.index)),
        }
    }

    /// Dials `addr` from outside a callback (between turns); see [`Context::connect`].
    ///
    /// # Errors
    /// As [`Context::connect`].
    pub fn connect(
        &mut self,
        addr: SocketAddr,
        state: H::Conn,
    ) -> Result<ConnId, DialError<H::Conn>> {
        let id = self.table.dial(addr, state)?;
        self.process_dirty();
        Ok(id)
    }

    /// Runs `f` with the handler and a context (no current connection) between turns: how an
    /// embedder that drives the loop itself writes to connections, closes them or dials.
    pub fn with_context<R>(&mut self, f: impl FnOnce(&mut H, &mut Context<'_, H::Conn>) -> R) -> R {
        let r = f(
            &mut self.handler,
            &mut Context::new(&mut self.table, ConnId::NONE),
        );
        self.process_dirty();
        r
    }

    /// Runs turns until the server stops ([`Handle::shutdown`], or a drain that ended), then
    /// returns the final metrics.
    ///
    /// # Errors
    /// [`Error::Io`] if polling fails (anything but EINTR). Connections still open are then
    /// closed with [`CloseReason::Shutdown`] as the server is dropped (`on_close` runs for each).
    pub fn run(mut self) -> Result<Metrics, Error> {
        while !self.table.stopped {
            self.turn(None)?;
        }
        Ok(mem::take(&mut self.table.metrics))
    }

    /// Runs one turn of the loop on the real clock: waits for readiness at most `max_wait` (or
    /// less, for a deadline; `None` = as long as needed), reads the clock once, then handles
    /// what is ready and what is due.
    ///
    /// # Errors
    /// [`Error::Io`] if polling fails (anything but EINTR).
    pub fn turn(&mut self, max_wait: Option<Duration>) -> Result<(), Error> {
        match max_wait {
            None => self.turn_until(None),
            Some(_) => {
                let timeout = self.timeout(max_wait, None);
                self.poll_and_process(timeout, None)
            }
        }
    }

    /// Runs one turn on the real clock, waiting for readiness until `deadline` at the latest (or
    /// a deadline of the loop's own; `None` = as long as needed). Prefer this to
    /// [`turn`](Self::turn) with a `max_wait` when the caller's deadline is fixed for a while
    /// (a stats line every few seconds): on Linux the loop then waits without a poll timeout,
    /// on a timer it arms only when the next deadline moves earlier (see the `alarm` module).
    ///
    /// # Errors
    /// [`Error::Io`] if polling fails (anything but EINTR).
    pub fn turn_until(&mut self, deadline: Option<Instant>) -> Result<(), Error> {
        #[cfg(target_os = "linux")]
        if self.alarm.is_some() {
            let timeout = if self.has_ready_work() {
                Some(Duration::ZERO)
            } else {
                let next = self
                    .next_wake()
                    .and_then(|t| self.table.clock.instant_of(t));
                if let (Some(at), Some(alarm)) =
                    (crate::time::earlier(next, deadline), self.alarm.as_mut())
                {
                    alarm.ensure(at)?;
                }
                None
            };
            return self.poll_and_process(timeout, None);
        }
        let max_wait = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let timeout = self.timeout(max_wait, None);
        self.poll_and_process(timeout, None)
    }

    /// Runs one turn with time as an input: `now` is the time for everything this turn does
    /// (deadlines due by `now` fire; activity is stamped `now`), as smoltcp's
    /// `Interface::poll(timestamp)`. It still waits for readiness, at most `max_wait` or until
    /// the next deadline as seen from `now`. Time never goes backwards: a `now` before the
    /// last turn's counts as the last turn's.
    ///
    /// This is how tests step time exactly: they pass `start + 5s` instead of sleeping 5 s.
    ///
    /// # Errors
    /// [`Error::Io`] if polling fails (anything but EINTR).
    pub fn turn_at(&mut self, now: Instant, max_wait: Option<Duration>) -> Result<(), Error> {
        let timeout = self.timeout(max_wait, Some(now));
        self.poll_and_process(timeout, Some(now))
    }

    /// How long, from `now`, until the loop has work that no event will announce (a deadline,
    /// or work a budget left: then zero). `None` = nothing scheduled.
    pub fn poll_delay(&self, now: Instant) -> Option<Duration> {
        self.timeout(None, Some(now))
    }

    fn has_ready_work(&self) -> bool {
        !self.ready.is_empty()
            || self.timers.expire_ready
            || self.accept.has_ready()
            || self.remote_ready
    }

    /// The tick of the loop's next deadline of any kind, if any.
    fn next_wake(&self) -> Option<Tick> {
        // Figures a worker could not publish in this tick are published in the next.
        let publish_at = self
            .member
            .as_ref()
            .filter(|m| m.unpublished)
            .map(|_| self.table.now + 1);
        [
            self.timers.poll_at(),
            self.accept.gate.poll_at(),
            self.admin.poll_at(),
            publish_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The poll timeout: zero for ready work; else until the next deadline, from `now` (the
    /// clock is read only if there is a deadline), capped by `max_wait`.
    fn timeout(&self, max_wait: Option<Duration>, now: Option<Instant>) -> Option<Duration> {
        if self.has_ready_work() {
            return Some(Duration::ZERO);
        }
        let next = self.next_wake();
        // A deadline too far to be an Instant is no deadline.
        let wait = next
            .and_then(|t| self.table.clock.instant_of(t))
            .map(|at| at.saturating_duration_since(now.unwrap_or_else(Instant::now)));
        crate::time::earlier(wait, max_wait)
    }

    fn poll_and_process(
        &mut self,
        timeout: Option<Duration>,
        now: Option<Instant>,
    ) -> Result<(), Error> {
        if self.table.stopped {
            return Ok(());
        }
        if self.table.metrics.turns == 0 {
            self.start_fd_check();
        }
        let mut events = self
            .events
            .take()
            .unwrap_or_else(|| Events::with_capacity(EVENTS_CAPACITY));
        if let Some(m) = &self.member {
            m.group.beat(m.index, true, self.table.now_at);
        }
        let polled = self.table.poll.poll(&mut events, timeout);
        // The clock is read after the poll: a `now` from before a blocking wait would be stale by
        // the whole wait and stamp activity early.
        let at = now.unwrap_or_else(Instant::now).max(self.table.now_at);
        let now = self.table.clock.tick_at(at).max(self.table.now);
        self.table.now = now;
        self.table.now_at = at;
        if let Some(m) = &self.member {
            m.group.beat(m.index, false, at);
        }
        if let Err(e) = polled {
            if e.kind() != std::io::ErrorKind::Interrupted {
                self.events = Some(events);
                return Err(Error::Io(e));
            }
        }
        self.table.metrics.turns += 1;
        mem::swap(&mut self.ready, &mut self.carried);
        // Listeners whose budget ran out in an earlier turn; ones that run out in this turn's
        // dispatch wait for the next turn, so the budget holds per turn.
        for l in &mut self.accept.listeners {
            l.carried = mem::take(&mut l.ready);
        }
        for event in events.iter() {
            self.table.metrics.events += 1;
            self.dispatch(event.token(), Readiness::of(event), now);
        }
        self.events = Some(events);
        if self.table.stopped {
            return Ok(());
        }
        self.expire(now);
        self.continue_ready(now);
        if self.remote_ready {
            self.drain_remote();
        }
        if self.timers.stale > COMPACT_MIN && self.timers.stale > 2 * self.table.slab.len() {
            self.compact_wheel();
        }
        let view = View {
            metrics: &self.table.metrics,
            conns: &self.table.slab,
            now,
            at: self.table.now_at,
            clock: self.table.clock,
            draining: self.timers.drain_deadline.is_some() || self.timers.lame_duck.is_some(),
            ready: self.readiness(),
            hooks: &self.handler,
            group: self.member.as_ref().map(|m| (&*m.group, m.index)),
        };
        self.admin.tick(self.table.poll.registry(), &view);
        self.check_fds(now);
        self.run_periodic(now);
        self.check_lame_duck(now);
        if let Some(deadline) = self.timers.drain_deadline {
            self.check_drain(deadline, now);
        }
        self.publish();
        Ok(())
    }

    fn dispatch(&mut self, token: mio::Token, ready: Readiness, now: Tick) {
        match token::decode(token) {
            Kind::Waker => self.wake_up(now),
            Kind::Alarm => {
                #[cfg(target_os = "linux")]
                if let Some(a) = &mut self.alarm {
                    a.fired(); // what is due is handled below, as every turn
                }
            }
            Kind::Listener(i) => {
                // While paused after fd exhaustion, listener events are ignored (resume accepts).
                if i < self.accept.listeners.len() && !self.accept.gate.is_paused() {
                    self.accept(i, now);
                }
            }
            Kind::AdminListener => self.admin.accept(self.table.poll.registry(), now),
            Kind::AdminConn(k) => {
                let view = View {
                    metrics: &self.table.metrics,
                    conns: &self.table.slab,
                    now,
                    at: self.table.now_at,
                    clock: self.table.clock,
                    draining: self.is_draining(),
                    ready: self.readiness(),
                    hooks: &self.handler,
                    group: self.member.as_ref().map(|m| (&*m.group, m.index)),
                };
                self.admin.drive(k, self.table.poll.registry(), &view);
            }
            Kind::Conn { key, gen } => match self.table.slab.get(key) {
                Some(conn) if conn.gen == gen => self.drive(key, ready),
                _ => {
                    self.table.metrics.stale += 1;
                    trace!("stale event token={} key={key} gen={gen}", token.0);
                }
            },
        }
    }

    /// The waker fired: a stop, a drain, or messages from other threads.
    fn wake_up(&mut self, now: Tick) {
        self.shared.clear_wake();
        self.answer_group();
        if self.shared.stop.load(std::sync::atomic::Ordering::Acquire) {
            return self.shutdown();
        }
        let ns = self
            .shared
            .drain_ns
            .swap(u64::MAX, std::sync::atomic::Ordering::AcqRel);
        if ns != u64::MAX {
            self.begin_drain(Duration::from_nanos(ns), now);
        }
        self.drain_remote();
    }

    /// Delivers what other threads queued, within a budget of one queue's capacity per queue.
    fn drain_remote(&mut self) {
        let budget = self.config.remote_queue;
        let mut left = false;
        for n in 0.. {
            if n == budget {
                left = true;
                break;
            }
            let Ok(msg) = self.mail.try_recv() else {
                break;
            };
            let mut ctx = Context::new(&mut self.table, ConnId::NONE);
            let delivered = match msg {
                Msg::Send(id, data) => ctx.send(id, &data).is_ok(),
                Msg::Close(id) => ctx.close_conn(id).is_ok(),
            };
            if !delivered {
                self.table.metrics.remote_dropped += 1;
            }
            self.process_dirty();
        }
        if let Some((jobs, _)) = &self.jobs {
            let mut batch = Vec::new();
            for n in 0.. {
                if n == budget {
                    left = true;
                    break;
                }
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            for job in batch {
                job(
                    &mut self.handler,
                    &mut Context::new(&mut self.table, ConnId::NONE),
                );
                self.process_dirty();
            }
        }
        self.remote_ready = left;
    }

    /// Handles readiness on a live connection: complete a dial, flush pending output, read (or,
    /// while lingering, read and discard).
    fn drive(&mut self, key: usize, ready: Readiness) {
        let now = self.table.now;
        match self.table.slab[key].phase {
            Phase::Header => return self.read_header(key, ready.read_closed || ready.priority),
            Phase::Lingering => return self.linger(key),
            Phase::Connecting => {
                if !self.finish_connect(key) {
                    return;
                }
            }
            Phase::Open => {}
        }
        let limits = self.table.limits;
        let table = &mut self.table;
        let conn = &mut table.slab[key];
        let id = ConnId::new(key, conn.gen);
        if ready.read_closed {
            conn.set(flag::READ_CLOSED);
        }
        if ready.priority {
            conn.set(flag::URGENT);
        }
        let mut want_read = ready.readable || ready.read_closed || ready.error || ready.priority;
        if conn.has_pending() {
            if ready.writable || ready.error {
                let flushed = conn.flush(&limits, now, &mut table.metrics);
                if conn.last_active == now {
                    self.touch_lru(key); // write progress is activity
                }
                match flushed {
                    Err(reason) => return self.close(key, reason),
                    // Reading was paused: data may be waiting with no new edge to announce it.
                    Ok(done) => want_read |= done,
                }
                if self.table.slab[key].has(flag::DRAINED) {
                    self.table.slab[key].clear(flag::DRAINED);
                    if self
                        .call(key, |h, state, ctx| h.on_drained(state, ctx))
                        .is_none()
                    {
                        return;
                    }
                }
                if !self.after_callback(id) {
                    return;
                }
            } else if H::PAUSE_READING_WHILE_PENDING {
                return; // reading stays paused until the output drains
            }
        }
        if want_read && self.can_read(key) {
            self.read(key);
        }
    }

    /// A dialed connection's socket is ready: completes the dial, or closes it with the dial's
    /// error. Returns whether it is now open.
    fn finish_connect(&mut self, key: usize) -> bool {
        let conn = &mut self.table.slab[key];
        let id = ConnId::new(key, conn.gen);
        // mio's recipe: on writable, `SO_ERROR` tells a failed handshake; `getpeername` failing
        // with ENOTCONN is a wakeup before the handshake completed.
        let error = match conn.stream.take_error() {
            Ok(None) => match conn.stream.peer_addr() {
                Ok(_) => None,
                Err(e) if e.kind() == std::io::ErrorKind::NotConnected => return false,
                Err(e) => Some(e),
            },
            Ok(Some(e)) | Err(e) => Some(e),
        };
        if let Some(e) = error {
            self.close(key, CloseReason::from_connect_error(&e));
            return false;
        }
        let conn = &mut self.table.slab[key];
        conn.phase = Phase::Open;
        conn.last_active = self.table.now;
        // The write-stall clock of output queued while connecting starts now.
        conn.restart_progress(self.table.now);
        self.table.metrics.connected += 1;
        self.table.metrics.connecting -= 1;
        self.push_lru(id);
        debug!("connected conn={id}");
        if self
            .call(key, |h, state, ctx| h.on_connected(state, ctx))
            .is_none()
        {
            return false;
        }
        self.after_callback(id)
    }

    /// Reads until WouldBlock, a short read (unless the peer's write side is closed: data and
    /// FIN can share one edge; or urgent data stopped the read at its mark), a reason to stop
    /// (pending output, a pause, a close), or the read budget.
    fn read(&mut self, key: usize) {
        if self.table.slab[key].has(flag::LEFTOVER) && !self.feed_leftover(key) {
            return;
        }
        // A read never takes more than the output cap, so echoing it back cannot overflow.
        let chunk = self.buf.len().min(self.config.max_pending);
        let mut reads = 0;
        loop {
            let conn = &mut self.table.slab[key];
            let id = ConnId::new(key, conn.gen);
            match std::io::Read::read(&mut conn.stream, &mut self.buf[..chunk]) {
                Ok(0) => {
                    conn.set(flag::EOF);
                    return self.on_eof(key);
                }
                Ok(n) => {
                    if !self.deliver(key, n) {
                        return;
                    }
                    reads += 1;
                    let conn = &mut self.table.slab[key];
                    if n < chunk && !conn.has(flag::READ_CLOSED | flag::URGENT) {
                        return; // drained: the next data brings a new edge
                    }
                    if reads >= self.config.read_budget {
                        if !conn.has(flag::QUEUED) {
                            conn.set(flag::QUEUED);
                            self.ready.push(id);
                        }
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Past every urgent mark: short reads mean drained again.
                    conn.clear(flag::URGENT);
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return self.close(key, CloseReason::from_io(&e)),
            }
        }
    }

    /// Delivers what followed connection `key`'s PROXY header, in chunks like reads, while
    /// reading is not paused; keeps the rest for later. Returns whether reading may go on.
    fn feed_leftover(&mut self, key: usize) -> bool {
        let id = ConnId::new(key, self.table.slab[key].gen);
        let Some(at) = self.leftover.iter().position(|(i, _)| *i == id) else {
            self.table.slab[key].clear(flag::LEFTOVER);
            return true;
        };
        let (_, mut bytes) = self.leftover.swap_remove(at);
        let chunk = self.buf.len().min(self.config.max_pending);
        let mut off = 0;
        while off < bytes.len() && self.can_read(key) {
            let n = (bytes.len() - off).min(chunk);
            self.buf[..n].copy_from_slice(&bytes[off..off + n]);
            off += n;
            if !self.deliver(key, n) {
                break;
            }
        }
        let Some(conn) = self.table.get(id) else {
            return false; // closed meanwhile (and its entry was taken out above)
        };
        if off < bytes.len() {
            bytes.drain(..off);
            self.leftover.push((id, bytes));
            return false;
        }
        conn.clear(flag::LEFTOVER);
        self.can_read(key)
    }

    /// Hands the first `n` bytes of the read buffer to the handler as connection `key`'s data,
    /// then settles what the callback did. Returns whether reading may go on.
    fn deliver(&mut self, key: usize, n: usize) -> bool {
        let now = self.table.now;
        let conn = &mut self.table.slab[key];
        let id = ConnId::new(key, conn.gen);
        conn.bytes_in += n as u64;
        conn.last_active = now;
        self.table.metrics.bytes_in += n as u64;
        self.touch_lru(key);
        let Some(mut state) = self.table.slab[key].state.take() else {
            return false;
        };
        self.handler.on_data(
            &mut state,
            &mut Context::new(&mut self.table, id),
            &self.buf[..n],
        );
        let conn = &mut self.table.slab[key];
        conn.state = Some(state);
        // The common case (a reply written whole, nothing else touched) needs no settling: no
        // deadline moved, nothing to close.
        let plain = conn.is_live()
            && !conn.has_pending()
            && !conn.has(flag::DIRTY)
            && self.table.dirty.is_empty();
        plain || (self.after_callback(id) && self.can_read(key))
    }

    /// A read returned 0: the handler decides between closing (the default, once pending
    /// output is flushed) and keeping the connection open for writing.
    fn on_eof(&mut self, key: usize) {
        let id = ConnId::new(key, self.table.slab[key].gen);
        match self.call(key, |h, state, ctx| h.on_eof(state, ctx)) {
            None => return,
            Some(Eof::Close) => self.table.slab[key].close_gracefully(CloseReason::PeerClosed),
            Some(Eof::KeepOpen) => {}
        }
        self.after_callback(id);
    }

    /// Calls `f` with the handler, connection `key`'s state and a context for it. `None` if the
    /// connection has no state (its handler part ended).
    fn call<R>(
        &mut self,
        key: usize,
        f: impl FnOnce(&mut H, &mut H::Conn, &mut Context<'_, H::Conn>) -> R,
    ) -> Option<R> {
        let conn = &mut self.table.slab[key];
        let id = ConnId::new(key, conn.gen);
        let mut state = conn.state.take()?;
        let r = f(
            &mut self.handler,
            &mut state,
            &mut Context::new(&mut self.table, id),
        );
        // Still there: a callback never closes a connection itself.
        self.table.slab[key].state = Some(state);
        Some(r)
    }

    /// After a callback about connection `id`: settles it, then every connection the callback
    /// touched. Returns whether `id` is still open (possibly closing after a flush).
    fn after_callback(&mut self, id: ConnId) -> bool {
        let alive = self.settle(id);
        self.process_dirty();
        alive
            && self
                .table
                .get(id)
                .is_some_and(|c| c.phase != Phase::Lingering)
    }

    /// Settles every connection a callback marked, until none is left (a close may run
    /// `on_close`, which may mark more; each round either closes a connection or calls no
    /// handler code, so this ends).
    fn process_dirty(&mut self) {
        while let Some(id) = self.table.dirty.pop() {
            self.settle(id);
        }
    }

    /// Acts on what a callback asked of connection `id`: close it at once (a write failed,
    /// overflow), shut its write side or close it once its output is flushed, queue a resumed
    /// read, arm its earliest deadline. Returns whether it is still open.
    fn settle(&mut self, id: ConnId) -> bool {
        let now = self.table.now;
        let Some(conn) = self.table.get(id) else {
            return false;
        };
        conn.clear(flag::DIRTY);
        let key = id.key();
        match conn.phase {
            Phase::Lingering => return false,
            Phase::Header => {
                self.arm(key);
                return false;
            }
            _ => {}
        }
        if let Some(reason) = conn.abort {
            self.close(key, reason);
            return false;
        }
        if !conn.has_pending() {
            match conn.phase {
                Phase::Open => {
                    if conn.has(flag::SHUT_WANTED) && !conn.has(flag::SHUT_DONE) {
                        conn.set(flag::SHUT_DONE);
                        if let Err(e) = conn.stream.shutdown(Shutdown::Write) {
                            self.close(key, CloseReason::from_io(&e));
                            return false;
                        }
                    }
                    if let Some(reason) = conn.graceful {
                        self.finish_graceful(key, reason);
                        return false;
                    }
                }
                // Closed before it connected, with nothing to send: nothing to linger for.
                Phase::Connecting => {
                    if let Some(reason) = conn.graceful {
                        self.close(key, reason);
                        return false;
                    }
                }
                Phase::Lingering | Phase::Header => {}
            }
        }
        let active_now = conn.last_active == now;
        if conn.has(flag::RESUME) {
            conn.clear(flag::RESUME);
            if !conn.has(flag::QUEUED) && self.can_read(key) {
                self.table.slab[key].set(flag::QUEUED);
                self.ready.push(id);
            }
        }
        if active_now {
            self.touch_lru(key); // a write the socket took at once is activity too
        }
        self.arm(key);
        true
    }

    /// A graceful close whose output is flushed: linger if the peer may still be sending,
    /// else close now.
    fn finish_graceful(&mut self, key: usize, reason: CloseReason) {
        let conn = &self.table.slab[key];
        if self.timers.timeouts.linger > 0 && reason.lingers() && !conn.has(flag::EOF) {
            self.begin_linger(key, reason);
        } else {
            self.close(key, reason);
        }
    }

    /// Ends the handler's part of connection `key` (`on_close`, the count) and keeps the socket
    /// to linger: its write side is shut (FIN after the queued reply) and what the peer still
    /// sends is read and discarded, so that closing never meets unread input (which would make
    /// Linux reset the connection and drop the reply still queued). Bounded by
    /// [`Config::linger_timeout`] and [`Config::linger_bytes`]; costs no buffer.
    fn begin_linger(&mut self, key: usize, reason: CloseReason) {
        let conn = &mut self.table.slab[key];
        if !conn.has(flag::SHUT_DONE) {
            if conn.stream.shutdown(Shutdown::Write).is_err() {
                return self.close(key, reason);
            }
            conn.set(flag::SHUT_DONE);
        }
        self.forget(key);
        let now = self.table.now;
        let conn = &mut self.table.slab[key];
        let id = ConnId::new(key, conn.gen);
        let state = conn.state.take();
        let (peer, dialed, opened) = (conn.peer(), conn.has(flag::DIALED), conn.opened);
        let (bytes_in, bytes_out) = (conn.bytes_in, conn.bytes_out);
        conn.phase = Phase::Lingering;
        conn.last_active = now;
        conn.timer = 0; // bytes discarded from here on
        let lifetime_us = self.table.clock.micros(now.saturating_sub(opened));
        self.table.metrics.lingering += 1;
        if let Some(state) = state {
            let mut ctx = Context::new(&mut self.table, id);
            ctx.closed_peer = Some(peer);
            self.handler.on_close(state, &mut ctx, reason);
        }
        self.table.metrics.count_close(reason, dialed, lifetime_us);
        debug!(
            "closed conn={id} peer={peer} reason={reason} bytes_in={bytes_in} bytes_out={bytes_out} age_ms={} lingering",
            lifetime_us / 1000
        );
        self.process_dirty();
        // Input may be waiting already (reads were paused while output was pending).
        if self.table.get(id).is_some() {
            self.linger(key);
        }
    }

    /// Reads and discards on lingering connection `key`; ends the linger at the peer's EOF or
    /// an error, else arms the linger deadline. Past the byte cap it stops reading instead of
    /// closing: closing now, with input unread, would reset the connection and destroy the
    /// reply still queued; a full receive window stops the peer, and the deadline ends it.
    fn linger(&mut self, key: usize) {
        let cap = self.config.linger_bytes;
        let conn = &mut self.table.slab[key];
        match conn.timer < cap {
            true => match conn.linger_read(&mut self.buf, cap) {
                None | Some(LingerEnd::Bytes) => self.arm(key),
                Some(end) => self.end_linger(key, end),
            },
            false => self.arm(key),
        }
    }

    /// Frees a lingering connection's socket and slot.
    pub(super) fn end_linger(&mut self, key: usize, end: LingerEnd) {
        let conn = self.release(key);
        let id = ConnId::new(key, conn.gen);
        drop(conn); // closes the fd
        self.table.metrics.lingering -= 1;
        self.table.metrics.linger_ends[end as usize] += 1;
        trace!(
            "linger ended conn={id} end={}",
            LingerEnd::NAMES[end as usize]
        );
    }

    /// The close path for a connection the handler still has: deregister, close the fd, free
    /// the slot, `on_close`, count the reason, in that order.
    fn close(&mut self, key: usize, reason: CloseReason) {
        if matches!(reason, CloseReason::Overflow | CloseReason::WriteStall) {
            // The peer is not reading: an abortive close (RST) frees the kernel's buffers for
            // this socket now, rather than keeping them for an orphan that cannot drain.
            let _ = socket2::SockRef::from(&self.table.slab[key].stream)
                .set_linger(Some(Duration::ZERO));
        }
        self.forget(key);
        let mut conn = self.release(key);
        let id = ConnId::new(key, conn.gen);
        let state = conn.state.take();
        let (peer, dialed, opened) = (conn.peer(), conn.has(flag::DIALED), conn.opened);
        let (bytes_in, bytes_out) = (conn.bytes_in, conn.bytes_out);
        if conn.phase == Phase::Connecting {
            self.table.metrics.connecting -= 1;
        }
        drop(conn); // closes the fd
        let lifetime_us = self
            .table
            .clock
            .micros(self.table.now.saturating_sub(opened));
        if let Some(state) = state {
            let mut ctx = Context::new(&mut self.table, id);
            ctx.closed_peer = Some(peer);
            self.handler.on_close(state, &mut ctx, reason);
        }
        self.table.metrics.count_close(reason, dialed, lifetime_us);
        debug!(
            "closed conn={id} peer={peer} reason={reason} bytes_in={bytes_in} bytes_out={bytes_out} age_ms={}",
            lifetime_us / 1000
        );
        self.process_dirty();
    }

    /// Removes connection `key` from the poll and the slab (the only code that removes slab
    /// entries) and returns it; dropping it closes the fd.
    fn release(&mut self, key: usize) -> Conn<H::Conn> {
        let conn = &mut self.table.slab[key];
        // mio's contract: deregister before the source is dropped.
        if let Err(e) = self.table.poll.registry().deregister(&mut conn.stream) {
            trace!("deregister key={key}: {e}");
        }
        let mut conn = self.table.slab.remove(key);
        if conn.has(flag::LEFTOVER) {
            let id = ConnId::new(key, conn.gen);
            self.leftover.retain(|(i, _)| *i != id);
        }
        if conn.scheduled != NEVER {
            self.timers.stale += 1; // its wheel entry dies lazily
        }
        if conn.phase == Phase::Header {
            conn.take_header_bytes(); // input, not pending output
            self.table.metrics.awaiting_header -= 1;
        } else {
            conn.discard_pending(&mut self.table.metrics);
        }
        // A descriptor came free: a paused accept resumes this turn.
        self.accept.gate.on_close();
        conn
    }

    /// Continues what budgets left: connections with data, listeners with a queue, a paused
    /// accept whose retry time has come (or that a close resumed).
    fn continue_ready(&mut self, now: Tick) {
        let mut carried = mem::take(&mut self.carried);
        for &id in &carried {
            if let Some(conn) = self.table.get(id) {
                conn.clear(flag::QUEUED);
                if conn.phase == Phase::Open {
                    self.drive(id.key(), Readiness::CONTINUE);
                }
            }
        }
        carried.clear();
        self.carried = carried;
        self.resume_accepting(now);
    }

    /// Starts a drain at the last turn's time (see [`Handle::drain`]); a second call only
    /// shortens the deadline.
    pub fn drain(&mut self, timeout: Duration) {
        let now = self.table.now;
        self.begin_drain(timeout, now);
    }

    /// Closes every connection with [`CloseReason::Shutdown`] (lingering ones just close) and
    /// every listener, now.
    pub fn shutdown(&mut self) {
        if self.table.stopped {
            return;
        }
        // No dials from the `on_close` calls below.
        self.table.stopped = true;
        let ids: Vec<ConnId> = self
            .table
            .slab
            .iter()
            .map(|(key, c)| ConnId::new(key, c.gen))
            .collect();
        for id in ids {
            match self.table.get(id).map(|c| c.phase) {
                Some(Phase::Lingering) => self.end_linger(id.key(), LingerEnd::Timeout),
                // Never the handler's: just closed (nothing to count but the gauge).
                Some(Phase::Header) => drop(self.release(id.key())),
                Some(_) => self.close(id.key(), CloseReason::Shutdown),
                None => {}
            }
        }
        self.close_listeners();
        self.admin.close_all(self.table.poll.registry());
        self.timers.drain_deadline = None;
        if let Some(m) = &mut self.member {
            m.published = Tick::MAX; // the final figures, whatever the tick
                                     // Stopped: never "busy in a turn" for /livez.
            m.group.beat(m.index, true, self.table.now_at);
        }
        self.publish();
        info!("stopped: {}", self.table.metrics);
    }
}

/// Dropping a server that has not stopped (an embedder's choice, or `run` failing) closes every
/// connection through the close path, so `on_close` still runs exactly once per connection.
impl<H: Handler> Drop for Server<H> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests;
