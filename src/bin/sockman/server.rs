//! The flags every server subcommand shares (`serve`, `proxy`): addresses, limits, timeouts,
//! drain, admin, logging; their mapping onto a [`Config`]; and the loop that runs a [`Server`]
//! with a counters line until a signal stops it. Invariant: signal handlers are installed
//! before the server binds and logs its listening line, so a SIGTERM right after "ready"
//! drains instead of killing.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use log::{info, warn};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use sockman::{Config, Handler, Metrics, OnFull, Server};

use crate::units::{parse_duration, parse_size};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OnFullArg {
    /// Accept and close new connections at the cap.
    Reject,
    /// Close the longest-idle connection (idle at least --evict-min-idle) to make room.
    EvictIdle,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ServerArgs {
    /// Address to listen on; repeat for several (replaces the default 127.0.0.1:7000).
    #[arg(
        long = "listen",
        value_name = "ADDR",
        env = "SOCKMAN_LISTEN",
        value_delimiter = ','
    )]
    listen: Vec<SocketAddr>,
    /// Close connections idle this long (e.g. 30s, 250ms); 0 = off.
    #[arg(long, value_name = "DURATION", default_value = "60s", env = "SOCKMAN_IDLE_TIMEOUT", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// Deadline granularity: idle connections close within one tick after their timeout.
    #[arg(long, value_name = "DURATION", default_value = "10ms", env = "SOCKMAN_TICK", value_parser = parse_duration)]
    tick: Duration,
    /// Close connections whose pending output makes no progress this long; 0 = off.
    #[arg(long, value_name = "DURATION", default_value = "30s", env = "SOCKMAN_WRITE_TIMEOUT", value_parser = parse_duration)]
    write_timeout: Duration,
    /// Cap on output buffered for one slow reader (e.g. 64KiB); beyond it the connection closes.
    #[arg(long, value_name = "SIZE", default_value = "64KiB", env = "SOCKMAN_MAX_PENDING", value_parser = parse_size)]
    max_pending: usize,
    /// Connection cap [default: the open-file limit minus a reserve].
    #[arg(long, value_name = "N", env = "SOCKMAN_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// What to do with a new connection at the cap.
    #[arg(long, value_enum, default_value = "reject", env = "SOCKMAN_ON_FULL")]
    on_full: OnFullArg,
    /// With --on-full evict-idle: only connections idle at least this long are evicted.
    #[arg(long, value_name = "DURATION", default_value = "1s", env = "SOCKMAN_EVICT_MIN_IDLE", value_parser = parse_duration)]
    evict_min_idle: Duration,
    /// Connections allowed from one peer IP address; 0 = no cap.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        env = "SOCKMAN_MAX_PER_IP"
    )]
    max_per_ip: usize,
    /// After accept fails for lack of file descriptors, retry after this long (or on the next close).
    #[arg(long, value_name = "DURATION", default_value = "100ms", env = "SOCKMAN_ACCEPT_RETRY", value_parser = parse_duration)]
    accept_retry: Duration,
    /// Listen backlog.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 1024,
        env = "SOCKMAN_BACKLOG"
    )]
    backlog: u32,
    /// TCP keepalive idle time, for peers that vanish without a FIN; 0 = off.
    #[arg(long, value_name = "DURATION", default_value = "0", env = "SOCKMAN_TCP_KEEPALIVE", value_parser = parse_duration)]
    tcp_keepalive: Duration,
    /// On SIGINT/SIGTERM: close what is left after this long (a second signal stops at once).
    #[arg(long, value_name = "DURATION", default_value = "10s", env = "SOCKMAN_DRAIN_TIMEOUT", value_parser = parse_duration)]
    pub(crate) drain_timeout: Duration,
    /// During a drain, close connections idle this long with nothing pending.
    #[arg(long, value_name = "DURATION", default_value = "1s", env = "SOCKMAN_DRAIN_IDLE", value_parser = parse_duration)]
    drain_idle: Duration,
    /// Serve /metrics, /connections and /health on this address (e.g. 127.0.0.1:9090); off unless given.
    #[arg(long, value_name = "ADDR", env = "SOCKMAN_ADMIN")]
    admin: Option<SocketAddr>,
    /// How often to check that every open descriptor is accounted for (the leak self-check); 0 = off.
    #[arg(long, value_name = "DURATION", default_value = "5s", env = "SOCKMAN_FD_CHECK_INTERVAL", value_parser = parse_duration)]
    fd_check_interval: Duration,
    /// Log a counters line this often; 0 = off.
    #[arg(long, value_name = "DURATION", default_value = "5s", env = "SOCKMAN_STATS_INTERVAL", value_parser = parse_duration)]
    pub(crate) stats_interval: Duration,
    /// SO_RCVBUF of every connection (e.g. 16KiB; the kernel doubles it and stops autotuning):
    /// bounds kernel memory per slow peer. Default: the kernel's autotuning.
    #[arg(long, value_name = "SIZE", env = "SOCKMAN_RCVBUF", value_parser = parse_size)]
    rcvbuf: Option<usize>,
    /// SO_SNDBUF of every connection, like --rcvbuf.
    #[arg(long, value_name = "SIZE", env = "SOCKMAN_SNDBUF", value_parser = parse_size)]
    sndbuf: Option<usize>,
    /// After a graceful close, read and discard the peer's input for at most this long (until its
    /// EOF), so that the reply is not cut short by a reset; 0 = close at once.
    #[arg(long, value_name = "DURATION", default_value = "5s", env = "SOCKMAN_LINGER_TIMEOUT", value_parser = parse_duration)]
    linger_timeout: Duration,
    /// Most bytes discarded while lingering; past it reading stops until the linger timeout.
    #[arg(long, value_name = "SIZE", default_value = "4MiB", env = "SOCKMAN_LINGER_BYTES", value_parser = parse_size)]
    linger_bytes: usize,
}

impl ServerArgs {
    /// The library configuration these flags describe.
    pub(crate) fn config(&self) -> Config {
        let defaults = Config::default();
        Config {
            listen: if self.listen.is_empty() {
                defaults.listen.clone()
            } else {
                self.listen.clone()
            },
            idle_timeout: self.idle_timeout,
            tick: self.tick,
            write_timeout: self.write_timeout,
            max_pending: self.max_pending,
            max_connections: self.max_connections,
            on_full: match self.on_full {
                OnFullArg::Reject => OnFull::Reject,
                OnFullArg::EvictIdle => OnFull::EvictIdle,
            },
            evict_min_idle: self.evict_min_idle,
            max_per_ip: self.max_per_ip,
            accept_retry: self.accept_retry,
            backlog: self.backlog,
            tcp_keepalive: self.tcp_keepalive,
            drain_idle: self.drain_idle,
            admin: self.admin,
            fd_check_interval: self.fd_check_interval,
            recv_buffer: self.rcvbuf,
            send_buffer: self.sndbuf,
            linger_timeout: self.linger_timeout,
            linger_bytes: self.linger_bytes as u64,
            ..defaults
        }
    }
}

/// Binds `config` with `handler` and runs it turn by turn, logging a counters line every
/// `stats_interval`, until a signal drains or stops it. `stats` adds the handler's own part
/// to each counters line.
pub(crate) fn run<H: Handler>(
    config: Config,
    handler: H,
    args: &ServerArgs,
    stats: impl Fn(&H) -> String,
) -> Result<Metrics, String> {
    // Signal handlers go in before the listening line is logged: a supervisor that reads that
    // line as "ready" and sends SIGTERM must get a drain, not the default action. A signal that
    // arrives before the thread below runs waits in `signals`.
    let signals = Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let mut server = Server::bind(config, handler).map_err(|e| e.to_string())?;
    watch_signals(signals, server.handle(), args.drain_timeout)?;
    let interval = (!args.stats_interval.is_zero()).then_some(args.stats_interval);
    let mut next_stats = interval.map(|i| Instant::now() + i);
    while !server.is_stopped() {
        let wait = next_stats.map(|t| t.saturating_duration_since(Instant::now()));
        server.turn(wait).map_err(|e| e.to_string())?;
        if let (Some(at), Some(every)) = (next_stats, interval) {
            let now = Instant::now();
            if now >= at {
                info!("stats {}{}", server.metrics(), stats(server.handler()));
                // Skip missed intervals rather than logging a burst after a long turn.
                next_stats = Some(if now >= at + every {
                    now + every
                } else {
                    at + every
                });
            }
        }
    }
    let m = server.metrics();
    if m.drain_forced > 0 {
        warn!(
            "{} connections were still open at the drain deadline and were closed",
            m.drain_forced
        );
    }
    info!("final {m}{}", stats(server.handler()));
    Ok(m.clone())
}

/// A small thread turns the first SIGINT/SIGTERM into a drain of the loop and a second one into an
/// immediate shutdown (the library has no signal code).
fn watch_signals(
    mut signals: Signals,
    handle: sockman::Handle,
    drain_timeout: Duration,
) -> Result<(), String> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut draining = false;
            for signal in signals.forever() {
                let name = if signal == SIGINT {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                if draining {
                    warn!("{name} again: closing every connection now");
                    handle.shutdown();
                } else {
                    warn!("{name}: draining (up to {drain_timeout:?}; signal again to stop now)");
                    handle.drain(drain_timeout);
                    draining = true;
                }
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    Ok(())
}
