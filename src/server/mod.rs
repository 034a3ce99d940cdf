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
//! - With [`Handler::PAUSE_READING_WHILE_PENDING`], a connection whose socket refused output
//!   is not read (backpressure), and any such connection has a write-stall deadline; output
//!   queued for the end of the turn is neither.
//! - Every connection written to during a turn writes its queue before the turn ends
//!   (`flush_queued`), once.
//!
//! # Files
//! One `Server` type, its `impl` spread over files by job (each file's methods are
//! `pub(super)`, for its siblings):
//! - `mod.rs`: the struct, binding, and the public face (turns, run, drain, shutdown, readers);
//! - `turn.rs`: one turn: the poll and its timeout, dispatch, the waker, continuing budgeted
//!   work, publishing to a group;
//! - `io.rs`: one connection's I/O: connect, flush, read, deliver, EOF;
//! - `close.rs`: settling what a callback asked, the close path, lingering;
//! - `accept.rs`: listeners, the accept gate, admission, PROXY headers;
//! - `handover.rs`: handing the listeners to a successor, and binding from handed ones;
//! - `timers.rs`: the wheel's use, the drain's schedule, periodic work, the leak self-check.

mod accept;
mod close;
mod handover;
mod io;
mod timers;
mod turn;

use std::cell::OnceCell;
use std::mem;
use std::net::SocketAddr;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::info;
use mio::{Events, Interest, Poll};

use crate::admin::AdminSide;
use crate::config::Config;
use crate::conn::{OutputLimits, Phase, Timeouts};
use crate::context::Context;
use crate::error::Error;
use crate::group::{Group, Member};
use crate::handler::Handler;
use crate::handover::{Given, Inbox};
use crate::limits::{self, LoopFds, ADMIN_FDS};
use crate::metrics::Metrics;
use crate::reason::{CloseReason, LingerEnd};
use crate::remote::{Handle, Job, Msg, Remote, Shared};
use crate::table::{DialError, Table};
use crate::time::{Clock, Tick};
use crate::token::{self, ConnId, MAX_LISTENERS};

use accept::{bind_listener, socket_options, Acceptor, Listener};
use timers::Timers;

/// The loop's end of the closure queue, and the sending end that [`Remote`]s clone.
type JobQueue<H> = (Receiver<Job<H>>, std::sync::mpsc::SyncSender<Job<H>>);

/// Events fetched per poll.
pub(super) const EVENTS_CAPACITY: usize = 1024;

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
    jobs: OnceCell<JobQueue<H>>,
    /// The remote budget ran out with messages left.
    remote_ready: bool,
    /// Membership in a group of workers ([`crate::Workers`]), if any.
    member: Option<Member>,
    /// Requests from [`Handover`](crate::Handover)s, once one exists.
    handover: Option<Inbox>,
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
        Server::bind_given(config, Given::default(), handler)
    }

    /// Like [`Server::bind`], but serves `listeners` that are already bound and listening (for
    /// instance inherited from systemd socket activation) instead of binding
    /// [`Config::listen`]. They are made nonblocking and get the configured socket options
    /// (TCP_NODELAY, keepalive, buffer sizes), which their accepted sockets inherit.
    ///
    /// # Errors
    /// As [`Server::bind`]; [`Error::Config`] for a socket that is bound but not listening (it
    /// would never accept); [`Error::Io`] if a listener cannot be configured.
    pub fn bind_listeners(
        mut config: Config,
        listeners: Vec<std::net::TcpListener>,
        handler: H,
    ) -> Result<Server<H>, Error> {
        config.listen = listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<Result<_, _>>()?;
        let given = Given {
            data: listeners.into_iter().map(Some).collect(),
            admin: None,
        };
        Server::bind_given(config, given, handler)
    }

    /// Binds `config`, serving the sockets `given` names instead of binding their addresses
    /// (`given.data` is aligned with `config.listen`).
    pub(crate) fn bind_given(
        mut config: Config,
        given: Given,
        handler: H,
    ) -> Result<Server<H>, Error> {
        if let Some(l) = &given.admin {
            config.admin = Some(l.local_addr()?);
        }
        if let Some(addr) = given.data.iter().zip(&config.listen).find_map(|(l, addr)| {
            l.as_ref()
                .filter(|l| accept::is_listening(l) == Some(false))
                .map(|_| addr)
        }) {
            return Err(Error::Config(format!(
                "the socket bound to {addr} is not listening: it would never accept (call listen(2) on it before passing it)"
            )));
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
        // Besides FD_RESERVE: what this loop opens itself.
        let own_fds = LoopFds::planned(config.listen.len(), config.admin.is_some()).total();
        let max_connections =
            limits::effective_max_connections(config.max_connections, fd_limit, own_fds);
        let poll = Poll::new()?;
        let mut listeners = Vec::with_capacity(config.listen.len());
        let mut given_data = given.data.into_iter();
        for (i, &addr) in config.listen.iter().enumerate() {
            let mut socket = match given_data.next().flatten() {
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
        let linger = (timeouts.linger, config.linger_bytes);
        let admin = match given.admin {
            Some(l) => AdminSide::adopt(l, poll.registry(), &clock, linger),
            None => AdminSide::bind(config.admin, poll.registry(), &clock, linger),
        }
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
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (shared, mail) = Shared::new(waker, config.remote_queue, Arc::clone(&stop));
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
                stop,
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
            jobs: OnceCell::new(),
            remote_ready: false,
            member: None,
            handover: None,
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
    /// [`Config::remote_queue`] closures, made at the first call).
    pub fn remote(&self) -> Remote<H> {
        let capacity = self.config.remote_queue;
        let (_, tx) = self.jobs.get_or_init(|| {
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
        self.timers.is_draining()
    }

    /// Whether this server should get new connections (what `/readyz` answers): not while
    /// draining (its lame-duck delay included), nor at the connection cap.
    ///
    /// # Errors
    /// Why not, in a few words.
    pub fn readiness(&self) -> Result<(), &'static str> {
        let (open, cap) = self.table.occupancy();
        self.timers.readiness(open, cap)
    }

    /// The time of the last turn (the server's start before the first).
    pub fn now(&self) -> Instant {
        self.table.now_at
    }

    /// Makes this server worker `index` of `group`; its admission shares the group's cap, if
    /// the group has one (more than one worker).
    pub(crate) fn join_group(&mut self, group: Arc<Group>, index: usize) {
        debug_assert!(
            self.table.slab.is_empty(),
            "joined a group with connections open"
        );
        if let Some(cap) = &group.cap {
            self.table.max_connections = cap.max();
            self.table.metrics.max_connections = cap.max() as u64;
            self.table.group_cap = Some(Arc::clone(cap));
        }
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
    /// embedder that drives the loop itself writes to connections, closes them or dials. What
    /// `f` writes leaves before this returns (one write per connection), as at a turn's end.
    pub fn with_context<R>(&mut self, f: impl FnOnce(&mut H, &mut Context<'_, H::Conn>) -> R) -> R {
        let r = f(
            &mut self.handler,
            &mut Context::new(&mut self.table, ConnId::NONE),
        );
        self.process_dirty();
        if let Some(timeout) = self.table.drain_asked.take() {
            self.drain(timeout);
        }
        if self.shared.is_stopping() {
            self.shutdown(); // `f` asked (Context::shutdown), or another thread did
        } else {
            self.flush_queued();
        }
        r
    }

    /// Runs turns until the server stops ([`Handle::shutdown`], or a drain that ended), then
    /// returns the final metrics. Consumes the server; [`serve`](Self::serve) does the same and
    /// keeps it, so that the handler's state can be read back afterwards.
    ///
    /// # Errors
    /// [`Error::Io`] if polling fails (anything but EINTR). Connections still open are then
    /// closed with [`CloseReason::Shutdown`] as the server is dropped (`on_close` runs for each).
    pub fn run(mut self) -> Result<Metrics, Error> {
        self.serve()?;
        Ok(mem::take(&mut self.table.metrics))
    }

    /// Runs turns until the server stops, like [`run`](Self::run), without consuming it: the
    /// handler (its counters, its store) is there afterwards ([`handler`](Self::handler),
    /// [`handler_mut`](Self::handler_mut)), with the final [`metrics`](Self::metrics).
    ///
    /// ```no_run
    /// # use sockman::{Config, Echo, Server};
    /// let mut server = Server::bind(Config::default(), Echo)?;
    /// server.serve()?; // until a Handle stops it
    /// let (handler, metrics) = (server.handler(), server.metrics());
    /// # let _ = (handler, metrics);
    /// # Ok::<(), sockman::Error>(())
    /// ```
    ///
    /// # Errors
    /// As [`run`](Self::run); the server can then still be shut down (or dropped), which closes
    /// what is left through the close path.
    pub fn serve(&mut self) -> Result<(), Error> {
        while !self.table.stopped {
            self.turn(None)?;
        }
        Ok(())
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
    /// on a `timerfd` it arms only when the next deadline moves earlier (an `epoll_wait` with a
    /// timeout arms and cancels a kernel timer at every wait: a measured 5 % of the CPU per echo).
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
        // Other threads are refused from now on; what they were told was accepted is done
        // first (its output then goes out as each connection closes: `close` writes what is
        // queued for a reason like this one).
        self.shared.close_queues();
        self.remote_ready = true;
        while self.remote_ready {
            self.drain_remote();
        }
        // No dials from the `on_close` calls below.
        self.table.stopped = true;
        self.close_connections();
        self.close_listeners();
        self.admin.close_all(self.table.poll.registry());
        self.timers.drain_deadline = None;
        self.timers.awaiting_group = false;
        if let Some(m) = &mut self.member {
            m.published = Tick::MAX; // the final figures, whatever the tick
                                     // Stopped: never "busy in a turn" for /livez.
            m.group.beat(m.index, true, self.table.now_at);
        }
        self.publish();
        if let Some(m) = &self.member {
            m.group.worker_stopped();
        }
        info!("stopped: {}", self.table.metrics);
    }

    /// Closes every connection with [`CloseReason::Shutdown`] (lingering ones just close, ones
    /// waiting for their PROXY header just go).
    fn close_connections(&mut self) {
        for id in self.table.ids() {
            match self.table.get(id).map(|c| c.phase) {
                Some(Phase::Lingering) => self.end_linger(id.key(), LingerEnd::Timeout),
                // Never the handler's: just closed (nothing to count but the gauge).
                Some(Phase::Header) => drop(self.release(id.key())),
                Some(_) => self.close(id.key(), CloseReason::Shutdown),
                None => {}
            }
        }
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
