//! Accepting: the listeners, the accept gate (pausing after fd exhaustion), admission (the
//! connection cap, per-IP cap, evict-idle) and listener binding.
//!
//! # Invariants
//! - While the gate is paused listener events are ignored; the gate resuming (a close, or the
//!   retry time) makes the loop accept by itself, since queued connections bring no new edge.
//! - A listener whose accept budget ran out is carried to the next turn (which then polls with
//!   a zero timeout), so the budget holds per turn and nothing queued is forgotten.
//! - A refusal at accept (cap, per-IP, shed) is counted as a rejection, never as a close.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use log::{debug, trace, warn};
use mio::net::{TcpListener, TcpStream};
use mio::Interest;
use socket2::{Domain, Protocol, Socket, TcpKeepalive, Type};

use super::Server;
use crate::config::{Config, ProxyProtocol};
use crate::conn::{flag, Conn, Phase};
use crate::context::Context;
use crate::handler::Handler;
use crate::limits::{self, AcceptGate, Lru, PerIp};
use crate::reason::{AcceptError, CloseReason, RejectReason};
use crate::table::{apply_buffers, SocketOptions};
use crate::time::Tick;
use crate::token::{self, ConnId};

/// A listening socket.
#[derive(Debug)]
pub(super) struct Listener {
    pub(super) socket: TcpListener,
    /// The bound address (with the real port when configured with port 0).
    pub(super) addr: SocketAddr,
    /// The accept budget ran out with connections possibly still queued: no new edge will come
    /// for them, so the next turn accepts again without waiting for an event.
    pub(super) ready: bool,
    /// `ready` as it was when this turn began: what this turn continues.
    pub(super) carried: bool,
}

/// The accept side's state: its field group in [`Server`].
#[derive(Debug)]
pub(super) struct Acceptor {
    pub(super) listeners: Vec<Listener>,
    pub(super) gate: AcceptGate,
    /// Least-recently-active order, only with [`OnFull::EvictIdle`](crate::OnFull::EvictIdle).
    pub(super) lru: Option<Lru>,
    /// Connections per peer IP, only with a per-IP cap.
    pub(super) per_ip: Option<PerIp>,
    pub(super) evict_min_ticks: Tick,
    pub(super) retry_ticks: Tick,
    /// `accept` error numbers already logged (each kind once).
    logged: Vec<i32>,
    /// PROXY protocol on the data listeners: connections start in the header phase.
    pub(super) proxy_protocol: ProxyProtocol,
}

impl Acceptor {
    pub(super) fn new(
        listeners: Vec<Listener>,
        config: &Config,
        ticks: impl Fn(Duration) -> Tick,
    ) -> Acceptor {
        Acceptor {
            listeners,
            gate: AcceptGate::new(),
            lru: (config.on_full == crate::OnFull::EvictIdle).then(Lru::new),
            per_ip: (config.max_per_ip > 0).then(PerIp::default),
            evict_min_ticks: ticks(config.evict_min_idle),
            retry_ticks: ticks(config.accept_retry).max(1),
            logged: Vec::new(),
            proxy_protocol: config.proxy_protocol,
        }
    }

    /// Whether a listener has queued connections this turn could not take.
    pub(super) fn has_ready(&self) -> bool {
        !self.gate.is_paused() && self.listeners.iter().any(|l| l.ready)
    }
}

impl<H: Handler> Server<H> {
    /// Accepts on listener `i` until WouldBlock or the per-turn budget.
    pub(super) fn accept(&mut self, i: usize, now: Tick) {
        self.accept.listeners[i].ready = false;
        let mut admitted = false;
        let mut other = false;
        for _ in 0..self.config.accept_budget {
            let err = match self.accept.listeners[i].socket.accept() {
                Ok((stream, peer)) => {
                    admitted = true;
                    self.admit(stream, peer, now);
                    continue;
                }
                Err(e) => e,
            };
            let Some(kind) = limits::classify_accept_error(&err) else {
                return; // drained
            };
            self.table.metrics.accept_errors[kind.index()] += 1;
            match kind {
                AcceptError::ProcessFds | AcceptError::SystemFds => {
                    return self.exhausted(i, &err, now)
                }
                AcceptError::Memory => return self.pause_accepting(&err, now),
                AcceptError::Connection => trace!("accept: the new connection failed: {err}"),
                AcceptError::Other => {
                    other = true;
                    let errno = err.raw_os_error().unwrap_or(-1);
                    if !self.accept.logged.contains(&errno) {
                        self.accept.logged.push(errno);
                        warn!(
                            "accept on {} failed: {err} (retried; logged once per kind)",
                            self.accept.listeners[i].addr
                        );
                    }
                }
            }
        }
        if other && !admitted {
            // A whole budget of nothing but unexplained errors: wait a retry period rather than
            // spin with a zero poll timeout.
            return self.pause_accepting(&io::Error::other("accept keeps failing"), now);
        }
        self.accept.listeners[i].ready = true;
    }

    /// Out of descriptors: shed what is queued with the spare fd, then pause accepting until a
    /// connection closes or the retry time passes. Warns on the transition, not per attempt.
    fn exhausted(&mut self, i: usize, err: &io::Error, now: Tick) {
        let (may_shed, first) = self.accept.gate.exhausted(now, self.accept.retry_ticks);
        let mut shed = 0;
        if may_shed {
            // One free descriptor: accept and close at once what is queued, so those clients
            // learn now instead of hanging in the backlog.
            shed = self.accept_queued(i, None);
            self.accept.gate.shed(shed);
        }
        self.table.metrics.rejected[RejectReason::Shed.index()] += shed;
        self.table.metrics.accept_pauses += 1;
        if first {
            warn!(
                "accept paused: {err} (active={} max_connections={}); shed {shed} queued connections; resuming on the next close or in {:?}",
                self.table.metrics.active, self.table.max_connections, self.config.accept_retry
            );
        } else {
            debug!("accept paused again: {err}; shed {shed}");
        }
    }

    /// Pauses accepting without shedding (ENOBUFS/ENOMEM: a spare descriptor would not help).
    fn pause_accepting(&mut self, err: &io::Error, now: Tick) {
        let first = self.accept.gate.pause(now, self.accept.retry_ticks);
        self.table.metrics.accept_pauses += 1;
        if first {
            warn!(
                "accept paused: {err}; resuming on the next close or in {:?}",
                self.config.accept_retry
            );
        }
    }

    /// Resumes a paused accept whose time came (or that a close resumed): accepts at once,
    /// since queued connections bring no new edge.
    pub(super) fn resume_accepting(&mut self, now: Tick) {
        if self.accept.gate.take_resume(now) {
            debug!("accept: retrying after pause");
            for l in &mut self.accept.listeners {
                l.carried = true;
            }
        }
        for i in 0..self.accept.listeners.len() {
            if std::mem::take(&mut self.accept.listeners[i].carried)
                && !self.accept.gate.is_paused()
            {
                self.accept(i, now);
            }
        }
    }

    /// Accepts what listener `i` has queued, up to one backlog's worth (a flood cannot hold the
    /// loop here): admitted as connections with `Some(now)`, closed at once with `None` (shed).
    /// Returns how many were accepted.
    fn accept_queued(&mut self, i: usize, admit_at: Option<Tick>) -> u64 {
        let mut accepted = 0;
        for _ in 0..self.config.backlog.min(65_536) {
            match self.accept.listeners[i].socket.accept() {
                Ok((stream, peer)) => {
                    accepted += 1;
                    match admit_at {
                        Some(now) => self.admit(stream, peer, now),
                        None => drop(stream),
                    }
                }
                Err(e) if limits::classify_accept_error(&e) == Some(AcceptError::Connection) => {}
                Err(_) => break,
            }
        }
        accepted
    }

    /// Accepts every listener's backlog, then closes the listeners (the start of a drain). In a
    /// group of workers, worker 0 closes last: until every other worker has closed its
    /// listeners it keeps its own open and accepting (see [`crate::workers`]); returns whether
    /// the listeners are closed now.
    /// `force` closes them anyway (the drain deadline came).
    pub(super) fn close_listeners_after_backlog(&mut self, now: Tick, force: bool) -> bool {
        if self.accept.listeners.is_empty() {
            return true;
        }
        if let Some(m) = &self.member {
            if m.index == 0 && m.group.open_listeners() > 1 && !force {
                return false;
            }
        }
        for i in 0..self.accept.listeners.len() {
            self.accept_queued(i, Some(now));
        }
        self.close_listeners();
        self.accept.gate.reset();
        true
    }

    /// Deregisters and closes every data listener (and tells the group, if any).
    pub(super) fn close_listeners(&mut self) {
        if self.accept.listeners.is_empty() {
            return;
        }
        for l in &mut self.accept.listeners {
            let _ = self.table.poll.registry().deregister(&mut l.socket);
        }
        self.accept.listeners.clear();
        if let Some(m) = &self.member {
            m.group.listeners_closed();
        }
    }

    /// Admits an accepted socket as a connection, or refuses it (cap, per-IP).
    fn admit(&mut self, mut stream: TcpStream, peer: SocketAddr, now: Tick) {
        if let Some((shed, pauses)) = self.accept.gate.on_admit() {
            warn!("accept resumed: {shed} connections shed and {pauses} pauses since it stopped");
        }
        // Behind a PROXY protocol listener the socket's peer is the balancer: the per-IP check
        // waits for the header, which names the client.
        let header = self.accept.proxy_protocol != ProxyProtocol::Off;
        // The per-IP cap is checked first: a refused client must not evict anybody.
        if !header && !self.per_ip_admits(peer) {
            return;
        }
        // Evicting runs the evicted connection's `on_close`, which may dial into the freed slot
        // (and in a group another worker may take it): look again.
        let placed = self.table.take_place() || (self.evict_for(now) && self.table.take_place());
        if !placed {
            if let (Some(per_ip), false) = (&mut self.accept.per_ip, header) {
                per_ip.remove(peer.ip());
            }
            self.table.metrics.rejected[RejectReason::Full.index()] += 1;
            trace!("rejected peer={peer} reason=full");
            return; // dropping the stream closes it: the client learns at once
        }
        let id = self.table.next_id();
        // Readable, writable and priority (urgent data), edge-triggered, once for the
        // connection's life: backpressure is "do not read" rather than an interest change, so
        // no epoll_ctl per stall.
        if let Err(e) = self.table.poll.registry().register(
            &mut stream,
            token::conn(id),
            Interest::READABLE | Interest::WRITABLE | Interest::PRIORITY,
        ) {
            self.table.give_back();
            self.table.metrics.rejected[RejectReason::Register.index()] += 1;
            if let (Some(per_ip), false) = (&mut self.accept.per_ip, header) {
                per_ip.remove(peer.ip());
            }
            warn!("cannot register connection from {peer}: {e}");
            return;
        }
        #[cfg(not(target_os = "linux"))]
        if self.config.nodelay {
            let _ = stream.set_nodelay(true);
        }
        let phase = if header { Phase::Header } else { Phase::Open };
        let key = self
            .table
            .slab
            .insert(Conn::new(stream, peer, id.generation(), phase, now));
        debug_assert_eq!(key, id.key(), "slab did not use its vacant key");
        if header {
            // Not the handler's until its header is read (under a deadline).
            self.table.metrics.awaiting_header += 1;
            trace!("accepted conn={id} peer={peer}: waiting for its PROXY header");
            self.arm(key);
            return;
        }
        self.open(id);
    }

    /// Whether the per-IP cap lets `peer` in (counting it if so).
    fn per_ip_admits(&mut self, peer: SocketAddr) -> bool {
        let max = self.config.max_per_ip;
        if self
            .accept
            .per_ip
            .as_mut()
            .is_some_and(|per_ip| !per_ip.try_add(peer.ip(), max))
        {
            self.table.metrics.rejected[RejectReason::PerIp.index()] += 1;
            trace!("rejected peer={peer} reason=per_ip");
            return false;
        }
        true
    }

    /// Makes accepted connection `id` the handler's: counted, in the eviction order, `on_open`.
    fn open(&mut self, id: ConnId) {
        let key = id.key();
        self.table.metrics.count_open();
        if let Some(lru) = &mut self.accept.lru {
            lru.push(key);
        }
        debug!("accepted conn={id} peer={}", self.table.slab[key].peer());
        let state = self.handler.on_open(&mut Context::new(&mut self.table, id));
        self.table.slab[key].state = Some(state);
        self.after_callback(id);
    }

    /// Reads the PROXY protocol header of connection `key`: once complete, its client address
    /// replaces the peer, the per-IP cap applies, and the connection opens (what followed the
    /// header is its first data). A missing, invalid or late header (see `fire`) closes the
    /// connection before the handler sees it, counted as a rejection. `more` says the event
    /// announced more than data (the peer's FIN, urgent data): then a short read is not the end.
    pub(super) fn read_header(&mut self, key: usize, more: bool) {
        use crate::proxy_header::{self, Parsed, MAX_HEADER};
        loop {
            let conn = &mut self.table.slab[key];
            let had = conn.header_bytes();
            // Never more than the read buffer holds (it may be smaller than a header: then the
            // header is read in pieces).
            let room = (MAX_HEADER + 1 - had).min(self.buf.len());
            let n = match std::io::Read::read(&mut conn.stream, &mut self.buf[..room]) {
                Ok(0) => {
                    let reason = if had == 0 {
                        RejectReason::ProxyHeaderMissing
                    } else {
                        RejectReason::ProxyHeaderInvalid
                    };
                    return self.reject_header(key, reason);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.reject_header(key, RejectReason::ProxyHeaderMissing),
            };
            // The header so far, with what was just read (in the read buffer when there was
            // nothing before: the common case of a header that arrives in one segment).
            let mut joined = conn.take_header_bytes();
            joined.extend_from_slice(&self.buf[..n]);
            match proxy_header::parse(&joined, self.accept.proxy_protocol) {
                Parsed::Incomplete => self.table.slab[key].set_header_bytes(&joined),
                Parsed::Missing => {
                    return self.reject_header(key, RejectReason::ProxyHeaderMissing)
                }
                Parsed::Invalid => {
                    return self.reject_header(key, RejectReason::ProxyHeaderInvalid)
                }
                Parsed::WrongVersion => {
                    let (got, wanted) = match self.accept.proxy_protocol {
                        ProxyProtocol::V1 => ("v2", "v1"),
                        _ => ("v1", "v2"),
                    };
                    debug!(
                        "peer={}: a PROXY protocol {got} header on a listener that takes {wanted} only (is the balancer configured for {got}?)",
                        self.table.slab[key].peer()
                    );
                    return self.reject_header(key, RejectReason::ProxyHeaderVersion);
                }
                Parsed::Done { len, source } => {
                    let rest = joined.split_off(len);
                    // A short read drained the socket (as in `read`): what comes next brings
                    // its own edge, so the loop need not read again only to get EAGAIN.
                    let drained = n < room && !more;
                    return self.after_header(key, source, rest, drained);
                }
            }
        }
    }

    /// A complete header: the client it names becomes the peer, then the per-IP cap, then the
    /// connection opens with `rest` (what followed the header) as its first data: owned, not
    /// in the shared read buffer (which `on_open` may reuse), and delivered as any data is (in
    /// chunks within the pending cap, only while reading is not paused). `drained`: the
    /// header's read emptied the socket.
    fn after_header(
        &mut self,
        key: usize,
        source: Option<SocketAddr>,
        rest: Vec<u8>,
        drained: bool,
    ) {
        let conn = &mut self.table.slab[key];
        let id = ConnId::new(key, conn.gen);
        if let Some(client) = source {
            conn.set_peer(client);
        }
        let peer = conn.peer();
        if !self.per_ip_admits(peer) {
            return drop(self.release(key));
        }
        let conn = &mut self.table.slab[key];
        conn.phase = Phase::Open;
        if !rest.is_empty() {
            conn.set(flag::LEFTOVER);
            self.leftover.push((id, rest));
        }
        self.table.metrics.awaiting_header -= 1;
        debug!("conn={id}: PROXY header names peer={peer}");
        self.open(id);
        // The bytes after the header, then whatever else is waiting (no new edge comes for
        // it), unless the header's read left nothing waiting.
        if self.table.get(id).is_some_and(|c| c.is_live()) && self.can_read(key) {
            if !drained {
                self.read(key);
            } else if self.table.slab[key].has(flag::LEFTOVER) {
                self.feed_leftover(key);
            }
        }
    }

    /// Closes a connection whose PROXY header failed, counted as a rejection: it never became
    /// the handler's.
    pub(super) fn reject_header(&mut self, key: usize, reason: RejectReason) {
        let conn = self.release(key);
        self.table.metrics.rejected[reason.index()] += 1;
        debug!(
            "rejected peer={} reason={}",
            conn.peer(),
            RejectReason::NAMES[reason.index()]
        );
    }

    /// At the cap with evict-idle: closes the longest-idle connection if it has been idle long
    /// enough. Returns whether a slot was freed.
    fn evict_for(&mut self, now: Tick) -> bool {
        let Some(key) = self.accept.lru.as_ref().and_then(Lru::oldest) else {
            return false;
        };
        // Idle at least `evict_min_idle` (zero: any connection): the stamp is rounded down, so a
        // full tick more.
        let (last, min) = (
            self.table.slab[key].last_active,
            self.accept.evict_min_ticks,
        );
        if min > 0 && now < crate::time::deadline(last, min) {
            return false;
        }
        self.close(key, CloseReason::Evicted);
        true
    }

    /// Forgets connection `key` in the accept side's bookkeeping (LRU, per-IP): it no longer
    /// counts as the handler's.
    pub(super) fn forget(&mut self, key: usize) {
        if let Some(lru) = &mut self.accept.lru {
            lru.remove(key);
        }
        let conn = &self.table.slab[key];
        if !conn.has(crate::conn::flag::DIALED) {
            if let Some(per_ip) = &mut self.accept.per_ip {
                per_ip.remove(conn.peer().ip());
            }
        }
    }

    /// Marks connection `key` as just active for eviction order.
    pub(super) fn touch_lru(&mut self, key: usize) {
        if let Some(lru) = &mut self.accept.lru {
            lru.touch(key);
        }
    }

    /// A dialed connection completed: it joins the eviction order like an accepted one.
    pub(super) fn push_lru(&mut self, id: ConnId) {
        if let Some(lru) = &mut self.accept.lru {
            lru.push(id.key());
        }
    }
}

/// Whether `listener` is in the listening state (`SO_ACCEPTCONN`): a socket that is bound but
/// not listening would never accept (every connect to it is refused). `None` where the kernel
/// cannot be asked.
pub(super) fn is_listening(listener: &std::net::TcpListener) -> Option<bool> {
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "fuchsia"
    ))]
    {
        socket2::SockRef::from(listener).is_listener().ok()
    }
    #[cfg(not(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "fuchsia"
    )))]
    {
        let _ = listener;
        None
    }
}

/// Makes an already listening socket (inherited) a nonblocking listener with the configured
/// options, as [`bind_listener`] sets them before binding.
pub(super) fn configure_listener(
    listener: std::net::TcpListener,
    config: &Config,
) -> io::Result<TcpListener> {
    let socket = Socket::from(listener);
    set_options(&socket, config)?;
    socket.set_nonblocking(true)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// The options accepted sockets inherit from their listener.
fn set_options(socket: &Socket, config: &Config) -> io::Result<()> {
    socket.set_tcp_nodelay(config.nodelay)?;
    if !config.tcp_keepalive.is_zero() {
        let interval = (config.tcp_keepalive / 3).max(Duration::from_secs(1));
        socket.set_tcp_keepalive(
            &TcpKeepalive::new()
                .with_time(config.tcp_keepalive)
                .with_interval(interval),
        )?;
    }
    apply_buffers(socket, &socket_options(config))
}

/// Creates a nonblocking listening socket with the configured options. Options set on the
/// listener are inherited by accepted sockets on Linux (TCP_NODELAY, keepalive, SO_RCVBUF,
/// SO_SNDBUF), which saves a `setsockopt` per connection.
pub(super) fn bind_listener(addr: SocketAddr, config: &Config) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Restart without waiting out TIME_WAIT of the previous run's connections.
    socket.set_reuse_address(true)?;
    if config.reuse_port {
        // Several loops, each its own socket on this address; the kernel spreads connections.
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    set_options(&socket, config)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(config.backlog as i32)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// The socket options of every connection, from the configuration.
pub(super) fn socket_options(config: &Config) -> SocketOptions {
    SocketOptions {
        nodelay: config.nodelay,
        recv_buffer: config.recv_buffer,
        send_buffer: config.send_buffer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_sockets_inherit_listener_options() {
        // TCP_NODELAY, keepalive and the buffer sizes are set once on the listener; Linux copies
        // them to each accepted socket, which saves a setsockopt per connection. Verify that it
        // does.
        let config = Config {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            tcp_keepalive: Duration::from_secs(30),
            recv_buffer: Some(16 * 1024),
            send_buffer: Some(24 * 1024),
            ..Config::default()
        };
        let listener = bind_listener(config.listen[0], &config).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let (stream, _) = loop {
            match listener.accept() {
                Ok(pair) => break pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "no connection to accept"
                    );
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
        // Linux doubles the value set (for its bookkeeping overhead) and reports the double.
        assert_eq!(sock.recv_buffer_size().unwrap(), 2 * 16 * 1024, "SO_RCVBUF");
        assert_eq!(sock.send_buffer_size().unwrap(), 2 * 24 * 1024, "SO_SNDBUF");
        #[cfg(target_os = "linux")]
        assert_eq!(
            sock.tcp_notsent_lowat().unwrap(),
            crate::table::UNSENT_LOWAT,
            "TCP_NOTSENT_LOWAT"
        );
    }
}
