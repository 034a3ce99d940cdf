//! `sockman proxy`: an L4 TCP proxy on the library's public API. Every session is two
//! connections in the same table, the accepted client and the dialed upstream, with one
//! lifecycle:
//!
//! - **Dial**: each client dials the next upstream (round robin); a refused, unreachable or
//!   timed-out dial tries the next one, up to `--connect-tries`, then the client is closed
//!   (counted as `no_upstream`). The client is not read until its upstream is connected, so no
//!   byte is sent to a dial that fails.
//! - **Passive health**: an upstream whose dials fail `--upstream-max-fails` times in a row is
//!   skipped for `--upstream-down-for` (default 3 and 10 s, HAProxy's `fall` and `inter`), unless
//!   every upstream is down. A completed dial clears it.
//! - **Relay with backpressure**: bytes read on one side are written straight to the other; a
//!   side is not read while its peer has output pending (write watermarks of zero: any pending
//!   output pauses the source, [`Handler::on_drained`] resumes it), so a session holds at most
//!   one pending cap per direction, whatever the speeds of its ends.
//! - **Half-close**: a FIN from one side becomes `shutdown(Write)` on the other once what is
//!   pending is flushed; the session ends when both sides have sent their FIN.
//! - **One lifecycle**: when either side closes (reset, error, idle with its peer idle too,
//!   write stall, drain), the other is closed too, each exactly once; closes are counted per
//!   side by the core (`closed` for all, `dialed_closed` for the upstream side).
//! - `--send-proxy v1|v2` writes a PROXY protocol header (the ppp crate) to the upstream before
//!   any client byte.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use log::{debug, warn};
use sockman::{CloseReason, Config, ConnId, Context, DialFailure, Eof, Handler, Idle, SendError};

use crate::server::{self, ServerArgs};
use crate::units::parse_duration;

/// The PROXY protocol version `--send-proxy` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ProxyVersion {
    /// The text header (`PROXY TCP4 src dst sport dport\r\n`).
    V1,
    /// The binary header.
    V2,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ProxyArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Upstream address; repeat or separate with commas for several (round robin).
    #[arg(
        long,
        value_name = "ADDR",
        env = "SOCKMAN_UPSTREAM",
        value_delimiter = ',',
        required = true
    )]
    upstream: Vec<SocketAddr>,
    /// A dial to an upstream that has not completed after this long fails (and the next is tried).
    #[arg(long, value_name = "DURATION", default_value = "5s", env = "SOCKMAN_CONNECT_TIMEOUT", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Dials per client before it is closed [default: each upstream once].
    #[arg(long, value_name = "N", env = "SOCKMAN_CONNECT_TRIES")]
    connect_tries: Option<usize>,
    /// Consecutive failed dials after which an upstream is skipped for --upstream-down-for.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 3,
        env = "SOCKMAN_UPSTREAM_MAX_FAILS"
    )]
    upstream_max_fails: u32,
    /// How long an upstream that keeps failing is skipped.
    #[arg(long, value_name = "DURATION", default_value = "10s", env = "SOCKMAN_UPSTREAM_DOWN_FOR", value_parser = parse_duration)]
    upstream_down_for: Duration,
    /// Send a PROXY protocol header to the upstream so that it sees the client's address.
    #[arg(long, value_enum, value_name = "v1|v2", env = "SOCKMAN_SEND_PROXY")]
    send_proxy: Option<ProxyVersion>,
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

/// What happened to one upstream through one worker. Atomics written by that worker only
/// (uncontended), summed by whoever reads them: the stats line, worker 0's `/metrics`.
#[derive(Debug, Default)]
struct Counters {
    dials: AtomicU64,
    dial_failures: AtomicU64,
    /// Times it was marked down.
    marked_down: AtomicU64,
    /// Sessions through it now, and in all.
    active: AtomicU64,
    sessions: AtomicU64,
    /// Bytes client → upstream, and upstream → client.
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

/// The per-upstream families of `/metrics`, in their order there: the name after
/// `sockman_upstream_`, the type, the help text, and the [`Counters`] field summed over the
/// workers (one sample per upstream).
const UPSTREAM_FAMILIES: [(&str, &str, &str, fn(&Counters) -> &AtomicU64); 7] = [
    (
        "dials_total",
        "counter",
        "Dials started to this upstream.",
        |c| &c.dials,
    ),
    (
        "dial_failures_total",
        "counter",
        "Dials to this upstream that failed (refused, unreachable, timed out, at the cap).",
        |c| &c.dial_failures,
    ),
    (
        "marked_down_total",
        "counter",
        "Times a worker skipped this upstream after its dials failed in a row.",
        |c| &c.marked_down,
    ),
    (
        "sessions_active",
        "gauge",
        "Sessions through this upstream now.",
        |c| &c.active,
    ),
    (
        "sessions_total",
        "counter",
        "Sessions through this upstream.",
        |c| &c.sessions,
    ),
    (
        "sent_bytes_total",
        "counter",
        "Bytes relayed from clients to this upstream.",
        |c| &c.bytes_up,
    ),
    (
        "received_bytes_total",
        "counter",
        "Bytes relayed from this upstream to clients.",
        |c| &c.bytes_down,
    ),
];

/// The proxy-wide counters of `/metrics`, after the upstream families: the name after
/// `sockman_proxy_`, the help text, and the [`WorkerStats`] field summed over the workers.
const PROXY_TOTALS: [(&str, &str, fn(&WorkerStats) -> &AtomicU64); 2] = [
    (
        "no_upstream_total",
        "Clients closed because no dial succeeded.",
        |w| &w.no_upstream,
    ),
    (
        "skipped_total",
        "Dials that skipped an upstream marked down.",
        |w| &w.skipped,
    ),
];

/// One worker's counters, on cache lines of their own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct WorkerStats {
    upstreams: Vec<Counters>,
    /// Clients closed because no dial succeeded.
    no_upstream: AtomicU64,
    /// Dials that skipped an upstream marked down.
    skipped: AtomicU64,
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

    fn worker_sum(&self, field: impl Fn(&WorkerStats) -> &AtomicU64) -> u64 {
        self.workers.iter().map(|w| field(w).load(Relaxed)).sum()
    }

    /// The proxy's part of the stats line.
    pub(crate) fn line(&self) -> String {
        format!(
            " sessions={} active_sessions={} dial_failures={} no_upstream={}",
            self.all(|c| &c.sessions),
            self.all(|c| &c.active),
            self.all(|c| &c.dial_failures),
            self.worker_sum(|w| &w.no_upstream),
        )
    }
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

/// A client's `(upstream, index)` while it has no upstream: after its last dial failed, or
/// when every try did.
const NO_UPSTREAM: (ConnId, u16) = (ConnId::NONE, 0);

/// One side of a session: the handler state of each connection.
#[derive(Debug)]
pub(crate) enum Side {
    /// The accepted connection. `upstream` is [`ConnId::NONE`] only between a failed dial and
    /// the next (not an `Option`: a session's two sides fit 12 bytes each this way).
    Client {
        upstream: ConnId,
        index: u16,
        tries: u8,
    },
    /// The dialed connection.
    Upstream {
        client: ConnId,
        index: u16,
        connected: bool,
    },
}

impl Side {
    fn peer(&self) -> Option<ConnId> {
        match *self {
            Side::Client { upstream, .. } => (upstream != ConnId::NONE).then_some(upstream),
            Side::Upstream { client, .. } => Some(client),
        }
    }

    fn index(&self) -> usize {
        match *self {
            Side::Client { index, .. } | Side::Upstream { index, .. } => index as usize,
        }
    }
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
        }
    }

    /// This worker's counters.
    fn my(&self) -> &WorkerStats {
        &self.stats.workers[self.me]
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

    /// Dials for `client` until one dial starts or `tries` runs out; returns the upstream's id
    /// and index.
    fn dial(
        &mut self,
        ctx: &mut Context<'_, Side>,
        client: ConnId,
        tries: &mut u8,
    ) -> Option<(ConnId, u16)> {
        while (*tries as usize) < self.tries {
            *tries += 1;
            let i = self.pick(ctx.now());
            self.counters(i).dials.fetch_add(1, Relaxed);
            let addr = self.upstreams[i].addr;
            let state = Side::Upstream {
                client,
                index: i as u16,
                connected: false,
            };
            match ctx.connect(addr, state) {
                Ok(id) => return Some((id, i as u16)),
                Err(e) => {
                    debug!("{e}");
                    // Only the upstream's own failures count against its health: at the
                    // connection cap or stopping, another upstream would fare no better.
                    match e.failure {
                        DialFailure::Socket(_) => self.dial_failed(i, ctx.now()),
                        _ => return None,
                    }
                }
            }
        }
        None
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
        let Some(mut c) = ctx.conn(client) else {
            return;
        };
        if let Some(Side::Client {
            upstream,
            index,
            tries: t,
        }) = c.state_mut()
        {
            *t = tries;
            (*upstream, *index) = next.unwrap_or(NO_UPSTREAM);
        }
        if next.is_none() {
            debug!("client {client}: no upstream after {tries} dials ({reason})");
            self.my().no_upstream.fetch_add(1, Relaxed);
            c.close();
        }
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
        let (upstream, index) = self.dial(ctx, client, &mut tries).unwrap_or_else(|| {
            self.my().no_upstream.fetch_add(1, Relaxed);
            ctx.close();
            NO_UPSTREAM
        });
        Side::Client {
            upstream,
            index,
            tries,
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
            return ctx.close();
        };
        let c = self.counters(side.index());
        let relayed = match side {
            Side::Client { .. } => &c.bytes_up,
            Side::Upstream { .. } => &c.bytes_down,
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
            Err(SendError::Gone | SendError::Refused) => ctx.close(),
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
        if peer.is_eof() {
            // Both directions are done: close both (each after its pending output).
            peer.close();
            Eof::Close
        } else {
            // Pass the FIN on; this side stays open to carry the other direction.
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
            Side::Client { .. } => {}
        }
        // One lifecycle: the other side goes too (after an abandoned dial, a client still there:
        // none is, today).
        if let Some(mut peer) = side.peer().and_then(|peer| ctx.conn(peer)) {
            peer.close();
        }
    }

    fn describe(&self, side: &Side, out: &mut String) {
        let name = match side {
            Side::Client { .. } => "client",
            Side::Upstream { .. } => "upstream",
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

    fn write_metrics(&self, out: &mut String) {
        let stats = &self.stats;
        for (name, kind, help, field) in UPSTREAM_FAMILIES {
            let _ = writeln!(
                out,
                "# HELP sockman_upstream_{name} {help}\n# TYPE sockman_upstream_{name} {kind}"
            );
            for (i, addr) in stats.addrs.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "sockman_upstream_{name}{{upstream=\"{addr}\"}} {}",
                    stats.upstream(i, field)
                );
            }
        }
        for (name, help, field) in PROXY_TOTALS {
            let _ = writeln!(
                out,
                "# HELP sockman_proxy_{name} {help}\n# TYPE sockman_proxy_{name} counter\nsockman_proxy_{name} {}",
                stats.worker_sum(field)
            );
        }
    }
}

impl ProxyArgs {
    fn config(&self) -> Config {
        let (low, high) = (Some(0), Some(0));
        Config {
            connect_timeout: self.connect_timeout,
            // Any output pending on a side pauses its peer (see the module docs).
            write_high_watermark: high,
            write_low_watermark: low,
            ..self.server.config()
        }
    }
}

/// Runs `sockman proxy` with `args` until a signal stops it.
pub(crate) fn run(args: &ProxyArgs) -> Result<(), String> {
    if args.connect_tries == Some(0) {
        return Err("--connect-tries must be at least 1".into());
    }
    let config = args.config();
    let stats = Stats::new(&args.upstream, args.server.workers);
    let idle = config.idle_timeout;
    let make = |me| {
        Proxy::new(
            &args.upstream,
            args.connect_tries,
            args.upstream_max_fails,
            args.upstream_down_for,
            args.send_proxy,
            idle,
            Arc::clone(&stats),
            me,
        )
    };
    server::run(config, make, &args.server, || stats.line()).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sessions_state_is_small() {
        // Each of a session's two connections carries one; with a slab entry and no buffer,
        // an idle session is meant to cost at most 256 B in all (BENCHMARKS.md).
        assert!(
            std::mem::size_of::<Side>() <= 12,
            "{}",
            std::mem::size_of::<Side>()
        );
        assert_eq!(
            std::mem::size_of::<Option<Side>>(),
            std::mem::size_of::<Side>()
        );
    }

    /// Turns `server` at `now` until `done`, within a wall-clock bound that only keeps a broken
    /// run from hanging (time itself is stepped, not waited for).
    #[track_caller]
    fn turn_until_at<H: Handler>(
        server: &mut sockman::Server<H>,
        now: Instant,
        what: &str,
        mut done: impl FnMut(&mut sockman::Server<H>) -> bool,
    ) {
        let bound = Instant::now() + Duration::from_secs(10);
        while !done(server) {
            assert!(Instant::now() < bound, "no {what}: {}", server.metrics());
            server
                .turn_at(now, Some(Duration::from_millis(10)))
                .unwrap();
        }
    }

    /// One nonblocking read: `Some(n)` bytes (0 = EOF), `None` = nothing yet.
    fn try_read(s: &mut std::net::TcpStream) -> Option<usize> {
        use std::io::Read;
        match s.read(&mut [0; 64]) {
            Ok(n) => Some(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("read: {e}"),
        }
    }

    #[test]
    fn a_session_closes_when_both_sides_are_idle_not_while_the_upstream_talks() {
        use std::io::Write;
        let idle = Duration::from_millis(500);
        let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        upstream.set_nonblocking(true).unwrap();
        let up = upstream.local_addr().unwrap();
        let config = Config {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            idle_timeout: idle,
            tick: Duration::from_millis(10),
            ..Config::default()
        };
        let stats = Stats::new(&[up], 1);
        let proxy = Proxy::new(
            &[up],
            None,
            3,
            Duration::from_secs(10),
            None,
            idle,
            stats,
            0,
        );
        let mut server = sockman::Server::bind(config, proxy).unwrap();
        let t0 = server.now();
        let mut client = std::net::TcpStream::connect(server.local_addrs()[0]).unwrap();
        client.set_nonblocking(true).unwrap();
        let mut pusher = None;
        turn_until_at(&mut server, t0, "upstream connect", |_| {
            pusher = upstream.accept().ok().map(|(s, _)| s);
            pusher.is_some()
        });
        let mut pusher = pusher.unwrap();
        // The client never sends; the upstream pushes a byte every 400 ms for 1.6 s (over
        // three idle timeouts): the session is not idle while one side talks.
        let mut last = t0;
        for i in 1..=4 {
            last = t0 + Duration::from_millis(400) * i;
            pusher.write_all(b"p").unwrap();
            turn_until_at(&mut server, last, "the push relayed", |_| {
                try_read(&mut client) == Some(1)
            });
        }
        // Both sides silent: still open just before the idle timeout...
        for _ in 0..3 {
            server
                .turn_at(
                    last + idle - Duration::from_millis(10),
                    Some(Duration::ZERO),
                )
                .unwrap();
        }
        assert_eq!(try_read(&mut client), None, "closed early");
        assert_eq!(server.metrics().closed_total(), 0, "{}", server.metrics());
        // ...and closed, both sides, once it has passed (the deadline's tick rounding: +2 ticks).
        turn_until_at(
            &mut server,
            last + idle + Duration::from_millis(20),
            "the close",
            |s| s.metrics().closed_total() == 2,
        );
        let m = server.metrics();
        assert_eq!(m.closed_by(CloseReason::IdleTimeout), 1, "{m}");
        assert_eq!(m.closed_dialed[CloseReason::Handler.index()], 1, "{m}");
        let bound = Instant::now() + Duration::from_secs(10);
        loop {
            match try_read(&mut client) {
                Some(0) => break,
                Some(n) => panic!("{n} more bytes after the pushes"),
                None => assert!(Instant::now() < bound, "no EOF"),
            }
            server
                .turn_at(
                    last + idle + Duration::from_millis(20),
                    Some(Duration::from_millis(10)),
                )
                .unwrap();
        }
    }

    #[test]
    fn proxy_headers_name_the_client_and_the_listener() {
        let c: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let l: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let v1 = Proxy::proxy_header(ProxyVersion::V1, c, l);
        assert_eq!(v1, b"PROXY TCP4 192.0.2.1 127.0.0.1 4000 7000\r\n");
        let v2 = Proxy::proxy_header(ProxyVersion::V2, c, l);
        assert_eq!(&v2[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(v2.len(), 16 + 12);
    }
}
