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
//!   output pauses the source, [`Handler::on_drained`](sockman::Handler::on_drained) resumes
//!   it), so a session holds at most one pending cap per direction, whatever the speeds of its
//!   ends.
//! - **Half-close**: a FIN from one side becomes `shutdown(Write)` on the other once what is
//!   pending is flushed; the session ends when both sides have sent their FIN.
//! - **One lifecycle**: when either side closes (reset, error, idle with its peer idle too,
//!   write stall, drain), the other is closed too, each exactly once: gracefully after an
//!   orderly end (FIN, idle, drain, lifetime), at once after an abortive one (reset, I/O
//!   error, write stall, overflow: [`ConnMut::close_now`](sockman::ConnMut::close_now), no
//!   linger, so a side that still sends gets a reset). Closes are counted per side by the core
//!   (`closed` for the client side, `dialed_closed` for the upstream side).
//! - `--send-proxy v1|v2` writes a PROXY protocol header (the ppp crate) to the upstream before
//!   any client byte.
//!
//! - **How each session ended**: its termination state, HAProxy's two letters (who ended it, in
//!   which phase: `--`, `CD`, `SD`, `sC`, ...), decided by whichever side ends first and
//!   counted once per session, when its client side closes.
//!
//! This module owns the command line (`ProxyArgs`) and [`run`]; [`handler`] is the
//! [`Handler`](sockman::Handler) that does the above, [`session`] the termination states,
//! [`stats`] its counters.

mod handler;
mod session;
mod stats;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use sockman::Config;

pub(crate) use handler::{Proxy, ProxyVersion};
use stats::Stats;

use crate::access_log::{self, AccessLog};
use crate::resolve::{self, Addrs};
use crate::server::{self, ServerArgs};
use crate::units::parse_duration;

/// Command-line flags of `sockman proxy`: the server's, and the upstreams'.
#[derive(Debug, clap::Args)]
pub(crate) struct ProxyArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Upstream address, HOST:PORT: an IP address, or a host name (resolved at start: an
    /// upstream for each of its addresses, in the order resolved); repeat or separate with
    /// commas for several (round robin).
    #[arg(
        long,
        value_name = "ADDR",
        env = "SOCKMAN_UPSTREAM",
        value_delimiter = ',',
        required = true,
        value_parser = resolve::parse_addrs
    )]
    upstream: Vec<Addrs>,
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
    #[command(flatten)]
    access_log: access_log::Args,
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
    let mut config = args.config();
    let upstreams = resolve::flatten(&args.upstream);
    let stats = Stats::new(&upstreams, args.server.workers);
    let log = match &args.access_log.target {
        Some(target) => Some(AccessLog::start(target)?),
        None => None,
    };
    if log.is_some() && config.periodic.is_zero() {
        config.periodic = access_log::FLUSH_EVERY; // the batch goes out at least this often
    }
    let idle = config.idle_timeout;
    let make = |me| {
        let proxy = Proxy::new(
            &upstreams,
            args.connect_tries,
            args.upstream_max_fails,
            args.upstream_down_for,
            args.send_proxy,
            idle,
            Arc::clone(&stats),
            me,
        );
        match &log {
            Some(log) => proxy.with_access_log(log.sink()),
            None => proxy,
        }
    };
    let line = || match &log {
        Some(log) => format!("{} access_log_dropped={}", stats.line(), log.dropped()),
        None => stats.line(),
    };
    let result = server::run(config, make, &args.server, line);
    if let Some(log) = log {
        log.finish();
    }
    result.map(|_| ())
}
