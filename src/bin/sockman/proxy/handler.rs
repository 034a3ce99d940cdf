//! The proxy handler ([`Proxy`]): a session's two sides ([`Side`]), dialing the upstreams
//! round robin with passive health, relaying with backpressure, half-close, and closing both
//! sides as one; see the [module docs](super) for the lifecycle.
//!
//! Owns the PROXY protocol header `--send-proxy` writes ([`Proxy::proxy_header`], also what
//! `sockman load --send-proxy` sends).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use log::{debug, warn};
use sockman::{CloseReason, ConnId, Context, DialFailure, Eof, Handler, Idle, SendError};

use super::session::{Cause, End, Phase, Side, CLIENT_FIN, NO_INDEX, UPSTREAM_FIN};
use super::stats::{Counters, Stats, WorkerStats};
use crate::access_log::Sink;

/// The PROXY protocol version `--send-proxy` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ProxyVersion {
    /// The text header (`PROXY TCP4 src dst sport dport\r\n`).
    V1,
    /// The binary header.
    V2,
}

/// One upstream, as one worker sees it (passive health is each worker's own judgement).
#[derive(Debug)]
struct Upstream {
    addr: SocketAddr,
    /// Dials that failed since the last one that completed.
    fails_in_a_row: u32,
    /// Skipped until then (passive health).
    down_until: Option<Instant>,
}

/// Whether an upstream side that closed before it connected failed its dial (and the client
/// should try the next upstream), rather than being abandoned by the proxy.
fn is_dial_failure(reason: CloseReason) -> bool {
    matches!(
        reason,
        CloseReason::ConnectRefused
            | CloseReason::ConnectTimeout
            | CloseReason::Unreachable
            | CloseReason::Reset
            | CloseReason::Io(_)
    )
}

/// Whether a side that closed for `reason` ended abortively (reset, I/O error, write stall,
/// overflow): its session is broken, and the other side is closed at once
/// ([`ConnMut::close_now`](sockman::ConnMut::close_now): a reset if it still sends) rather
/// than gracefully, as after a FIN, an idle timeout or a drain.
fn ends_abortively(reason: CloseReason) -> bool {
    matches!(
        reason,
        CloseReason::Reset | CloseReason::Io(_) | CloseReason::WriteStall | CloseReason::Overflow
    )
}

/// Whether a dial's socket error is the proxy's own failure, not the upstream's: out of
/// descriptors (EMFILE, ENFILE), kernel memory (ENOBUFS, ENOMEM) or local ports
/// (EADDRNOTAVAIL). Another upstream would fare no better, and none of them is to blame.
fn is_local(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// How dialing for a client went. The upstream index that comes with a failure is the last
/// one tried (`None`: no try was made).
#[derive(Debug)]
enum Dialed {
    /// A dial started: the upstream's id and index.
    Started(ConnId, u16),
    /// Every try failed at once (or none was left): the caller knows the last failure.
    Exhausted(Option<u16>),
    /// The proxy could not dial at all (at its cap, stopping): the session's end.
    Refused(End, Option<u16>),
    /// The proxy itself could not dial (see [`is_local`]): the client is shed.
    Local(Option<u16>),
}

/// The proxy handler.
#[derive(Debug)]
pub(crate) struct Proxy {
    upstreams: Vec<Upstream>,
    /// Round-robin position.
    next: usize,
    /// Dials per client.
    tries: usize,
    max_fails: u32,
    down_for: Duration,
    send_proxy: Option<ProxyVersion>,
    /// Both sides idle this long closes the session (the core's idle timeout).
    idle_timeout: Duration,
    /// The counters of every worker, and this one's index there.
    stats: Arc<Stats>,
    me: usize,
    /// Dials failed for the proxy's own lack of descriptors, memory or ports, and none has
    /// started since: the warning is logged on this flag's transitions only.
    local_failing: bool,
    /// `--access-log`: a line per ended session, written at its client side's close.
    log: Option<Sink>,
}

impl Proxy {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        upstreams: &[SocketAddr],
        tries: Option<usize>,
        max_fails: u32,
        down_for: Duration,
        send_proxy: Option<ProxyVersion>,
        idle_timeout: Duration,
        stats: Arc<Stats>,
        me: usize,
    ) -> Proxy {
        Proxy {
            upstreams: upstreams
                .iter()
                .map(|&addr| Upstream {
                    addr,
                    fails_in_a_row: 0,
                    down_until: None,
                })
                .collect(),
            next: 0,
            tries: tries.unwrap_or(upstreams.len()).clamp(1, u8::MAX as usize),
            max_fails: max_fails.max(1),
            down_for,
            send_proxy,
            idle_timeout,
            stats,
            me,
            local_failing: false,
            log: None,
        }
    }

    /// Logs a line per ended session to `log` (`--access-log`).
    pub(crate) fn with_access_log(mut self, log: Sink) -> Proxy {
        self.log = Some(log);
        self
    }

    /// This worker's counters.
    fn my(&self) -> &WorkerStats {
        self.stats.worker(self.me)
    }

    /// This worker's counters of upstream `i`.
    fn counters(&self, i: usize) -> &Counters {
        &self.my().upstreams[i]
    }

    /// The next upstream to dial: round robin over those not marked down (over all of them when
    /// every one is down: a proxy that refuses everything helps nobody).
    fn pick(&mut self, now: Instant) -> usize {
        let n = self.upstreams.len();
        for _ in 0..n {
            let i = self.next % n;
            self.next = self.next.wrapping_add(1);
            match self.upstreams[i].down_until {
                Some(until) if until > now => {
                    self.my().skipped.fetch_add(1, Relaxed);
                }
                _ => return i,
            }
        }
        let i = self.next % n;
        self.next = self.next.wrapping_add(1);
        i
    }

    /// Dials for `client` until one dial starts or `tries` runs out.
    fn dial(&mut self, ctx: &mut Context<'_, Side>, client: ConnId, tries: &mut u8) -> Dialed {
        let mut last = None;
        while (*tries as usize) < self.tries {
            *tries += 1;
            let i = self.pick(ctx.now());
            last = Some(i as u16);
            let addr = self.upstreams[i].addr;
            let state = Side::Upstream {
                client,
                index: i as u16,
                connected: false,
            };
            match ctx.connect(addr, state) {
                Ok(id) => {
                    self.counters(i).dials.fetch_add(1, Relaxed);
                    return Dialed::Started(id, i as u16);
                }
                Err(e) => {
                    debug!("{e}");
                    // Only the upstream's own failures count against its health: at the
                    // connection cap, stopping, or out of descriptors, another upstream would
                    // fare no better, and this one is not to blame.
                    match &e.failure {
                        DialFailure::Socket(err) if is_local(err) => {
                            self.my().local_dial_errors.fetch_add(1, Relaxed);
                            if !std::mem::replace(&mut self.local_failing, true) {
                                warn!(
                                    "cannot dial {addr}: {err}: the proxy is out of descriptors, memory or local ports; shedding clients (upstream health unchanged)"
                                );
                            }
                            return Dialed::Local(last);
                        }
                        DialFailure::Socket(_) => {
                            self.counters(i).dials.fetch_add(1, Relaxed);
                            self.dial_failed(i, ctx.now());
                        }
                        DialFailure::Full { .. } => {
                            return Dialed::Refused(End::new(Cause::Proxy, Phase::Connect), last)
                        }
                        DialFailure::Stopped => {
                            return Dialed::Refused(End::new(Cause::Down, Phase::Connect), last)
                        }
                        _ => {
                            let end = End::new(Cause::Internal, Phase::Connect);
                            return Dialed::Refused(end, last);
                        }
                    }
                }
            }
        }
        Dialed::Exhausted(last)
    }

    /// How the session of a client whose dialing came to nothing (`dialed`, anything but
    /// [`Dialed::Started`]) ended, and the upstream last tried; counts it. `failure`: the last
    /// dial's failure, if it failed after it started.
    fn no_dial(&self, dialed: Dialed, failure: Option<CloseReason>) -> (End, Option<u16>) {
        let no_upstream = || self.my().no_upstream.fetch_add(1, Relaxed);
        match dialed {
            Dialed::Started(..) => (End::new(Cause::Internal, Phase::Connect), None),
            Dialed::Exhausted(last) => {
                no_upstream();
                let reason = failure.unwrap_or(CloseReason::ConnectRefused);
                (End::by_upstream(reason, Phase::Connect), last)
            }
            Dialed::Refused(end, last) => {
                no_upstream();
                (end, last)
            }
            // Counted in `dial`.
            Dialed::Local(last) => (End::new(Cause::Resource, Phase::Connect), last),
        }
    }

    /// Counts a failed dial to upstream `i`; `max_fails` in a row mark it down for `down_for`.
    fn dial_failed(&mut self, i: usize, now: Instant) {
        self.counters(i).dial_failures.fetch_add(1, Relaxed);
        let up = &mut self.upstreams[i];
        up.fails_in_a_row += 1;
        if up.fails_in_a_row >= self.max_fails && up.down_until.is_none_or(|t| t <= now) {
            up.down_until = Some(now + self.down_for);
            warn!(
                "upstream {} failed {} dials in a row: skipped for {:?}",
                up.addr, up.fails_in_a_row, self.down_for
            );
            self.counters(i).marked_down.fetch_add(1, Relaxed);
        }
    }

    /// The dial of `client`'s upstream `index` failed for `reason`: counts it against that
    /// upstream and dials the next one, or closes the client when its tries are spent.
    fn redial(
        &mut self,
        ctx: &mut Context<'_, Side>,
        client: ConnId,
        index: u16,
        reason: CloseReason,
    ) {
        self.dial_failed(index as usize, ctx.now());
        let tries = match ctx.conn(client).as_ref().and_then(|c| c.state()) {
            Some(Side::Client { tries, .. }) => *tries,
            _ => return, // the client is gone too
        };
        let mut tries = tries;
        let next = self.dial(ctx, client, &mut tries);
        let ended = match next {
            Dialed::Started(id, i) => {
                if let Some(Side::Client {
                    upstream,
                    index,
                    tries: t,
                }) = ctx.conn(client).as_mut().and_then(|c| c.state_mut())
                {
                    (*upstream, *index, *t) = (id, i, tries);
                }
                return;
            }
            other => {
                debug!("client {client}: no upstream after {tries} dials ({reason})");
                self.no_dial(other, Some(reason))
            }
        };
        let Some(mut c) = ctx.conn(client) else {
            return;
        };
        if let Some(state) = c.state_mut() {
            let (end, last) = ended;
            *state = Side::Ended {
                upstream: ConnId::NONE,
                index: last.unwrap_or(index),
                end,
            };
        }
        c.close();
    }

    /// The PROXY protocol header for a session from `client` to `local` (our listener).
    pub(crate) fn proxy_header(
        version: ProxyVersion,
        client: SocketAddr,
        local: SocketAddr,
    ) -> Vec<u8> {
        match version {
            ProxyVersion::V1 => {
                let addrs = match (client, local) {
                    (SocketAddr::V4(c), SocketAddr::V4(l)) => {
                        ppp::v1::Addresses::new_tcp4(*c.ip(), *l.ip(), c.port(), l.port())
                    }
                    (SocketAddr::V6(c), SocketAddr::V6(l)) => {
                        ppp::v1::Addresses::new_tcp6(*c.ip(), *l.ip(), c.port(), l.port())
                    }
                    _ => ppp::v1::Addresses::Unknown,
                };
                addrs.to_string().into_bytes()
            }
            ProxyVersion::V2 => {
                use ppp::v2::{Builder, Command, Protocol, Version};
                let addrs: ppp::v2::Addresses = match (client, local) {
                    (SocketAddr::V4(_), SocketAddr::V4(_))
                    | (SocketAddr::V6(_), SocketAddr::V6(_)) => (client, local).into(),
                    _ => ppp::v2::Addresses::Unspecified,
                };
                Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, addrs)
                    .build()
                    .unwrap_or_default()
            }
        }
    }
}

impl Handler for Proxy {
    type Conn = Side;
    /// Each side is paused explicitly while its *peer* has output pending.
    const PAUSE_READING_WHILE_PENDING: bool = false;

    fn on_open(&mut self, ctx: &mut Context<'_, Side>) -> Side {
        let client = ctx.id();
        // Not read until the upstream is connected: no byte goes to a dial that fails.
        if let Some(mut c) = ctx.conn(client) {
            c.pause_reading();
        }
        let mut tries = 0;
        match self.dial(ctx, client, &mut tries) {
            Dialed::Started(upstream, index) => Side::Client {
                upstream,
                index,
                tries,
            },
            other => {
                let (end, last) = self.no_dial(other, None);
                ctx.close();
                Side::Ended {
                    upstream: ConnId::NONE,
                    index: last.unwrap_or(NO_INDEX),
                    end,
                }
            }
        }
    }

    fn on_connected(&mut self, side: &mut Side, ctx: &mut Context<'_, Side>) {
        let Side::Upstream {
            client,
            index,
            connected,
        } = side
        else {
            return;
        };
        *connected = true;
        self.local_failing = false;
        // A session is idle only when both sides are: the client side's idle deadline asks
        // (`on_idle`), so the upstream side needs none of its own (one wheel entry less).
        let me = ctx.id();
        if let Some(mut u) = ctx.conn(me) {
            u.set_idle_timeout(false);
        }
        let up = &mut self.upstreams[*index as usize];
        up.fails_in_a_row = 0;
        up.down_until = None;
        let c = self.counters(*index as usize);
        c.active.fetch_add(1, Relaxed);
        c.sessions.fetch_add(1, Relaxed);
        let Some(mut c) = ctx.conn(*client) else {
            return ctx.close(); // the client left while we dialed
        };
        if let Some(state @ Side::Client { .. }) = c.state_mut() {
            let (upstream, index) = (me, *index);
            *state = Side::Relaying {
                upstream,
                index,
                fins: 0,
            };
        }
        let header = self.send_proxy.and_then(|v| {
            let local = c.local_addr().ok()?;
            Some(Proxy::proxy_header(v, c.peer(), local))
        });
        c.resume_reading();
        if let Some(header) = header {
            ctx.write(&header);
        }
    }

    fn on_data(&mut self, side: &mut Side, ctx: &mut Context<'_, Side>, data: &[u8]) {
        let Some(peer) = side.peer() else {
            // A client is not read until its upstream is connected.
            side.end(End::new(Cause::Internal, side.phase()));
            return ctx.close();
        };
        let c = self.counters(side.index());
        let relayed = if side.is_client() {
            &c.bytes_up
        } else {
            &c.bytes_down
        };
        relayed.fetch_add(data.len() as u64, Relaxed);
        match ctx.send(peer, data) {
            Ok(()) => {
                // Backpressure: the peer has output pending; read this side again once it
                // drained (`on_drained` of the peer).
                if ctx.conn(peer).is_some_and(|p| !p.is_writable()) {
                    let me = ctx.id();
                    if let Some(mut c) = ctx.conn(me) {
                        c.pause_reading();
                    }
                }
            }
            Err(SendError::Gone | SendError::Refused) => {
                let me = ctx.id();
                match ctx.conn(peer) {
                    // The peer is closing (a write to it failed, it overflowed, or it closed
                    // meanwhile): its `on_close` ends the session and closes this side. Read
                    // nothing more until then.
                    None => {
                        if let Some(mut c) = ctx.conn(me) {
                            c.pause_reading();
                        }
                    }
                    // Still open, and refused: a relay never writes to a shut write side.
                    Some(mut p) => {
                        let end = End::new(Cause::Internal, Phase::Data);
                        if side.is_client() {
                            side.end(end);
                        } else if let Some(client) = p.state_mut() {
                            client.end(end);
                        }
                        p.close();
                        ctx.close();
                    }
                }
            }
        }
    }

    fn on_drained(&mut self, side: &mut Side, ctx: &mut Context<'_, Side>) {
        if let Some(mut p) = side.peer().and_then(|peer| ctx.conn(peer)) {
            p.resume_reading();
        }
    }

    fn on_eof(&mut self, side: &mut Side, ctx: &mut Context<'_, Side>) -> Eof {
        let Some(mut peer) = side.peer().and_then(|peer| ctx.conn(peer)) else {
            return Eof::Close;
        };
        let client = side.is_client();
        if peer.is_eof() {
            // Both directions are done: the session ended normally; close both (each after
            // its pending output).
            if client {
                side.end(End::NORMAL);
            } else if let Some(state) = peer.state_mut() {
                state.end(End::NORMAL);
            }
            peer.close();
            Eof::Close
        } else {
            // Pass the FIN on; this side stays open to carry the other direction.
            let (session, fin) = if client {
                (Some(side), CLIENT_FIN)
            } else {
                (peer.state_mut(), UPSTREAM_FIN)
            };
            if let Some(Side::Relaying { fins, .. }) = session {
                *fins |= fin;
            }
            peer.shutdown_write();
            Eof::KeepOpen
        }
    }

    fn on_idle(&mut self, side: &mut Side, ctx: &mut Context<'_, Side>) -> Idle {
        // A session is idle only when both of its sides are.
        match side.peer().and_then(|peer| ctx.conn(peer)) {
            Some(p) if p.idle() < self.idle_timeout => Idle::Keep,
            _ => Idle::Close,
        }
    }

    fn on_close(&mut self, side: Side, ctx: &mut Context<'_, Side>, reason: CloseReason) {
        match side {
            Side::Upstream {
                client,
                index,
                connected: false,
            } if is_dial_failure(reason) => {
                // The client stays: it dials the next upstream, or is given up on.
                return self.redial(ctx, client, index, reason);
            }
            // A dial the proxy itself abandoned (its client went first, or the server stops) is
            // no failure of the upstream: neither counted nor retried.
            Side::Upstream {
                connected: false, ..
            } => {}
            Side::Upstream { index, .. } => {
                self.counters(index as usize).active.fetch_sub(1, Relaxed);
            }
            // The client side: its session ends now, as decided before, or by this close.
            Side::Client { .. } | Side::Relaying { .. } | Side::Ended { .. } => {
                let end = match side {
                    Side::Ended { end, .. } => end,
                    _ => End::by_client(reason, side.phase()),
                };
                self.my().ended[end.index()].fetch_add(1, Relaxed);
                if let Some(log) = &mut self.log {
                    let upstream = self.upstreams.get(side.index()).map(|u| u.addr);
                    log.line(|line| {
                        let _ = write!(line, " client={}", ctx.peer());
                        let _ = match upstream {
                            Some(addr) => write!(line, " upstream={addr}"),
                            None => write!(line, " upstream=-"),
                        };
                        let _ = write!(
                            line,
                            " duration_ms={} bytes_in={} bytes_out={} state={end} reason={}",
                            ctx.age().as_millis(),
                            ctx.bytes_in(),
                            ctx.bytes_out(),
                            reason.name()
                        );
                    });
                }
            }
        }
        // One lifecycle: the other side goes too (after an abandoned dial, a client still there,
        // if the stop closed the dial first). After an abortive end it goes at once, without
        // lingering: what it still sends can go nowhere, and a linger would read and discard it
        // for seconds. An upstream that goes first decides how its session ended.
        let Some(mut peer) = side.peer().and_then(|peer| ctx.conn(peer)) else {
            return;
        };
        if !side.is_client() {
            if let Some(client) = peer.state_mut() {
                client.end(End::by_upstream(reason, client.phase()));
            }
        }
        if ends_abortively(reason) {
            peer.close_now();
        } else {
            peer.close();
        }
    }

    fn describe(&self, side: &Side, out: &mut String) {
        let name = if side.is_client() {
            "client"
        } else {
            "upstream"
        };
        let _ = write!(out, " side={name}");
        if let Some(peer) = side.peer() {
            let _ = write!(
                out,
                " pair={peer} upstream={}",
                self.upstreams[side.index()].addr
            );
        }
    }

    fn on_periodic(&mut self, _ctx: &mut Context<'_, Side>) {
        if let Some(log) = &mut self.log {
            log.flush();
        }
    }

    fn write_metrics(&self, out: &mut String) {
        self.stats.write_metrics(out);
        if let Some(log) = &self.log {
            log.write_metrics(out);
        }
    }
}
