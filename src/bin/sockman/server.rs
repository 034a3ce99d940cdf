//! The flags every server subcommand shares (`serve`, `proxy`): addresses, limits, timeouts,
//! drain, admin, logging; their mapping onto a [`Config`]; and the loop that runs a [`Server`]
//! with a counters line until a signal stops it. Invariant: signal handlers are installed
//! before the server binds and logs its listening line, so a SIGTERM right after "ready"
//! drains instead of killing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use log::{info, warn};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR2};
use signal_hook::iterator::Signals;
use sockman::{Config, Handler, Metrics, OnFull, ProxyProtocol, Server, Workers};

use crate::resolve::{self, Addrs};
use crate::units::{parse_duration, parse_size};
use crate::upgrade::{self, UpgradeArgs, Upgrader, Upgrades};
use crate::wrapped::Wrapped;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum OnFullArg {
    /// Accept and close new connections at the cap.
    Reject,
    /// Close the longest-idle connection (idle at least --evict-min-idle) to make room.
    EvictIdle,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProxyProtocolArg {
    /// No header: the socket's peer is the client.
    Off,
    /// The text header is required.
    V1,
    /// The binary header is required.
    V2,
    /// Either version is required.
    Any,
}

/// `N` (at least 1) or `auto` (one per available core).
fn parse_workers(text: &str) -> Result<usize, String> {
    if text == "auto" {
        return Ok(std::thread::available_parallelism().map_or(1, |n| n.get()));
    }
    match text.parse::<usize>() {
        Ok(n) if (1..=1024).contains(&n) => Ok(n),
        _ => Err(format!(
            "invalid workers {text:?}: expected a number from 1 to 1024, or auto"
        )),
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct ServerArgs {
    /// Address to listen on, HOST:PORT: an IP address, or a host name (resolved at start: a
    /// listener on each of its addresses); repeat for several (replaces the default
    /// 127.0.0.1:7000).
    #[arg(
        long = "listen",
        value_name = "ADDR",
        env = "SOCKMAN_LISTEN",
        value_delimiter = ',',
        value_parser = resolve::parse_addrs
    )]
    listen: Vec<Addrs>,
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
    /// Serve /metrics, /connections, /livez and /readyz (= /health) on this address (e.g.
    /// 127.0.0.1:9090, or a host name: its first address); off unless given.
    #[arg(long, value_name = "ADDR", env = "SOCKMAN_ADMIN", value_parser = resolve::parse_addrs)]
    admin: Option<Addrs>,
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
    /// Loops (threads) to run, each with its own SO_REUSEPORT listener: a number, or `auto` for
    /// one per available core. The connection cap is the group's, shared by all of them.
    #[arg(long, value_name = "N|auto", default_value = "1", env = "SOCKMAN_WORKERS", value_parser = parse_workers)]
    pub(crate) workers: usize,
    /// Require a PROXY protocol header (from a balancer such as HAProxy with send-proxy) on every
    /// data connection: off, v1, v2 or any. Its client address replaces the peer.
    #[arg(
        long,
        value_enum,
        default_value = "off",
        env = "SOCKMAN_PROXY_PROTOCOL"
    )]
    proxy_protocol: ProxyProtocolArg,
    /// The PROXY protocol header must arrive within this long of the accept.
    #[arg(long, value_name = "DURATION", default_value = "3s", env = "SOCKMAN_PROXY_HEADER_TIMEOUT", value_parser = parse_duration)]
    proxy_header_timeout: Duration,
    /// On SIGTERM, fail /readyz at once but keep accepting this long before the drain closes
    /// the listeners (so that a balancer stops sending first).
    #[arg(long, value_name = "DURATION", default_value = "0", env = "SOCKMAN_DRAIN_DELAY", value_parser = parse_duration)]
    pub(crate) drain_delay: Duration,
    /// Close connections gracefully this long after they were accepted (± a tenth), so that
    /// long-lived clients rebalance; 0 = off.
    #[arg(long, value_name = "DURATION", default_value = "0", env = "SOCKMAN_MAX_LIFETIME", value_parser = parse_duration)]
    max_lifetime: Duration,
    /// Close a connection that sends nothing this long after it was accepted; 0 = off.
    #[arg(long, value_name = "DURATION", default_value = "0", env = "SOCKMAN_FIRST_BYTE_TIMEOUT", value_parser = parse_duration)]
    first_byte_timeout: Duration,
    /// Most bytes discarded while lingering; past it reading stops until the linger timeout.
    #[arg(long, value_name = "SIZE", default_value = "4MiB", env = "SOCKMAN_LINGER_BYTES", value_parser = parse_size)]
    linger_bytes: usize,
    #[command(flatten)]
    upgrade: UpgradeArgs,
}

impl ServerArgs {
    /// The library configuration these flags describe.
    pub(crate) fn config(&self) -> Config {
        let defaults = Config::default();
        Config {
            listen: if self.listen.is_empty() {
                defaults.listen.clone()
            } else {
                resolve::flatten(&self.listen)
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
            admin: self.admin.as_ref().and_then(|a| a.0.first().copied()),
            fd_check_interval: self.fd_check_interval,
            recv_buffer: self.rcvbuf,
            send_buffer: self.sndbuf,
            linger_timeout: self.linger_timeout,
            linger_bytes: self.linger_bytes as u64,
            proxy_protocol: match self.proxy_protocol {
                ProxyProtocolArg::Off => ProxyProtocol::Off,
                ProxyProtocolArg::V1 => ProxyProtocol::V1,
                ProxyProtocolArg::V2 => ProxyProtocol::V2,
                ProxyProtocolArg::Any => ProxyProtocol::Any,
            },
            proxy_header_timeout: self.proxy_header_timeout,
            drain_delay: self.drain_delay,
            max_lifetime: self.max_lifetime,
            first_byte_timeout: self.first_byte_timeout,
            ..defaults
        }
    }
}

/// Listeners inherited from systemd socket activation (`LISTEN_FDS`, `LISTEN_PID`), if any.
fn inherited_listeners() -> Result<Option<Vec<std::net::TcpListener>>, String> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() == 0 {
        return Ok(None);
    }
    let mut listeners = Vec::with_capacity(fds.len());
    for i in 0..fds.len() {
        match fds.take_tcp_listener(i) {
            // Bound but never put into the listening state (SO_ACCEPTCONN off): served, it
            // would never accept.
            Ok(Some(l)) if is_not_listening(&l) => {
                let addr = l.local_addr().map_or("?".into(), |a| a.to_string());
                return Err(format!(
                    "inherited descriptor {} (LISTEN_FDS) is a TCP socket that is not listening (bound to {addr}): pass a listening socket (systemd: ListenStream=)",
                    i + 3
                ));
            }
            Ok(Some(l)) => listeners.push(l),
            Ok(None) => return Err(format!("inherited descriptor {} is already taken", i + 3)),
            Err(e) => {
                return Err(format!(
                    "inherited descriptor {} (LISTEN_FDS) is not a TCP listener: {e}",
                    i + 3
                ))
            }
        }
    }
    Ok(Some(listeners))
}

/// Whether `l` is known not to be listening (`SO_ACCEPTCONN` off; unknown where the kernel
/// cannot be asked: the library then serves it as it is).
fn is_not_listening(l: &std::net::TcpListener) -> bool {
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "fuchsia"
    ))]
    {
        socket2::SockRef::from(l).is_listener().ok() == Some(false)
    }
    #[cfg(not(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "fuchsia"
    )))]
    {
        let _ = l;
        false
    }
}

/// Tells systemd (if it started us with `NOTIFY_SOCKET`) how the service is doing.
fn notify(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        warn!("cannot notify systemd: {e}");
    }
}

/// Binds `config` with `args.workers` handlers from `make` (one loop, or [`Workers`]), on the
/// listeners systemd passed or a predecessor handed over (see [`upgrade`]) if any, and runs
/// until a signal drains or stops it, logging a counters line every `stats_interval`. `stats`
/// adds the handler's own part to each line. `SIGUSR2` upgrades in place.
pub(crate) fn run<H>(
    config: Config,
    mut make: impl FnMut(usize) -> H,
    args: &ServerArgs,
    stats: impl Fn() -> String,
) -> Result<Metrics, String>
where
    H: Handler + Send + 'static,
    H::Conn: Send,
{
    // Signal handlers go in before the listening line is logged: a supervisor that reads that
    // line as "ready" and sends SIGTERM must get a drain, not the default action. A signal that
    // arrives before the thread below runs waits in `signals`.
    let signals = Signals::new([SIGINT, SIGTERM, SIGUSR2])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let timeout = args.upgrade.upgrade_timeout;
    let mut takeover = upgrade::take_over(timeout)?;
    let inherited = match takeover {
        Some(_) => None,
        None => inherited_listeners()?,
    };
    let activated = inherited.is_some() || takeover.as_ref().is_some_and(|t| t.activated());
    if activated && !args.listen.is_empty() {
        warn!("listening on the sockets systemd passed (LISTEN_FDS); --listen is ignored");
    }
    let config = match &takeover {
        Some(t) if t.activated() => Config {
            listen: t.data_addrs(),
            ..config
        },
        _ => config,
    };
    let handed = takeover.as_mut().map(|t| t.take_listeners());
    let upgrades = Arc::new(Upgrades::default());
    let mut make = |i| Wrapped::new(make(i), Arc::clone(&upgrades));
    let upgrader = |handover| {
        let drain = args.drain_timeout;
        Upgrader::new(
            handover,
            &args.upgrade,
            drain,
            activated,
            Arc::clone(&upgrades),
        )
    };
    let stats = || format!("{}{}", stats(), upgrades.line());
    let interval = (!args.stats_interval.is_zero()).then_some(args.stats_interval);
    let m = if args.workers > 1 {
        let bound = match (handed, inherited) {
            (Some(h), _) => Workers::bind_handed(config, h, args.workers, make),
            (None, Some(l)) => Workers::bind_listeners(config, l, args.workers, make),
            (None, None) => Workers::bind(config, args.workers, make),
        };
        let mut workers = upgrade::confirm(takeover, bound.map_err(|e| e.to_string()), timeout)?;
        let upgrader = upgrader(workers.handover());
        let mut running = workers.start().map_err(|e| e.to_string())?;
        watch_signals(
            signals,
            Stop::All(running.handle()),
            args.drain_timeout,
            upgrader,
        )?;
        notify(sd_notify::NotifyState::Ready);
        loop {
            let wait = interval.unwrap_or(Duration::from_secs(3600));
            match running.wait_timeout(wait).map_err(|e| e.to_string())? {
                Some(finals) => break Metrics::sum(&finals),
                None => {
                    if interval.is_some() {
                        info!("stats {}{}", running.metrics(), stats());
                    }
                }
            }
        }
    } else {
        let bound = match (handed, inherited) {
            (Some(h), _) => Server::bind_handed(config, h, make(0)),
            (None, Some(l)) => Server::bind_listeners(config, l, make(0)),
            (None, None) => Server::bind(config, make(0)),
        };
        let mut server = upgrade::confirm(takeover, bound.map_err(|e| e.to_string()), timeout)?;
        let upgrader = upgrader(server.handover());
        watch_signals(
            signals,
            Stop::One(server.handle()),
            args.drain_timeout,
            upgrader,
        )?;
        notify(sd_notify::NotifyState::Ready);
        let mut next_stats = interval.map(|i| Instant::now() + i);
        while !server.is_stopped() {
            // A fixed deadline, not a timeout: the loop waits on a timer it re-arms only when
            // its next deadline moves earlier (see `Server::turn_until`).
            server.turn_until(next_stats).map_err(|e| e.to_string())?;
            if let (Some(at), Some(every)) = (next_stats, interval) {
                let now = Instant::now();
                if now >= at {
                    info!("stats {}{}", server.metrics(), stats());
                    // Skip missed intervals rather than logging a burst after a long turn.
                    next_stats = Some(if now >= at + every {
                        now + every
                    } else {
                        at + every
                    });
                }
            }
        }
        server.metrics().clone()
    };
    if m.drain_forced > 0 {
        warn!(
            "{} connections were still open at the drain deadline and were closed",
            m.drain_forced
        );
    }
    info!("final {m}{}", stats());
    Ok(m)
}

/// What a signal stops: one loop, or every worker.
enum Stop {
    One(sockman::Handle),
    All(sockman::WorkersHandle),
}

impl Stop {
    fn drain(&self, timeout: Duration) {
        match self {
            Stop::One(h) => h.drain(timeout),
            Stop::All(h) => h.drain(timeout),
        }
    }

    fn shutdown(&self) {
        match self {
            Stop::One(h) => h.shutdown(),
            Stop::All(h) => h.shutdown(),
        }
    }
}

/// A small thread turns the first SIGINT/SIGTERM into a drain of the loop(s) and a second one
/// into an immediate shutdown (the library has no signal code), and tells systemd it is
/// stopping (unless the listeners went to a successor: systemd's main process is that one
/// now); SIGUSR2 starts an upgrade in place ([`Upgrader`]).
fn watch_signals(
    mut signals: Signals,
    stop: Stop,
    drain_timeout: Duration,
    upgrader: Upgrader,
) -> Result<(), String> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut draining = false;
            for signal in signals.forever() {
                if signal == SIGUSR2 {
                    upgrader.start();
                    continue;
                }
                let name = if signal == SIGINT {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                if draining {
                    warn!("{name} again: closing every connection now");
                    stop.shutdown();
                } else {
                    warn!("{name}: draining (up to {drain_timeout:?}; signal again to stop now)");
                    upgrader.stopping();
                    if !upgrader.handed_over() {
                        notify(sd_notify::NotifyState::Stopping);
                    }
                    stop.drain(drain_timeout);
                    draining = true;
                }
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    Ok(())
}
