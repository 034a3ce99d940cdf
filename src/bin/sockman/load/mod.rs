//! `sockman load`: a load generator for echo servers, on one thread and one mio `Poll`.
//!
//! It drives any TCP echo server on loopback (sockman or a peer) and reports operations/s, MB/s,
//! latency percentiles, errors by kind and connections the server closed, like redis ships
//! redis-benchmark. `sockman load` calls [`run`]; `benches/e2e.rs` and `benches/compare.sh` run
//! the binary with `--json`.
//!
//! # Modes ([`Mode`])
//! - **pingpong**: each connection sends `size` bytes, waits for all of them back, verifies them,
//!   and repeats.
//! - **pipeline**: the same with `depth` messages in flight per connection.
//! - **stream**: each connection writes as fast as the socket takes (whole `size` units, up to
//!   256 KiB per write call, at most about 1 MiB per turn before the other connections get
//!   theirs) and reads the echo concurrently; the result is MB/s of verified echoed bytes, and
//!   operations are echoed bytes / `size`.
//! - **idle**: opens `connections`, checks that each echoes once, then holds them for `duration`
//!   and reports how many are still held and how many the server closed.
//! - **churn**: `connections` workers each connect, echo `size` bytes once and close, as fast as
//!   possible; the result is connections/s, and latency is the whole connect-echo cycle.
//!
//! # Measurement
//! - Every byte sent is a per-connection pattern (a 251-byte cycle started at an offset derived
//!   from the connection's slot), so every echoed byte is verified against its stream offset.
//! - Latency goes into an HDR histogram (nanoseconds, 3 significant figures), reported in µs.
//!   Without `rate` it runs from the moment a message is issued; with `rate` messages are due at
//!   fixed times and latency runs from the *scheduled* time, so a stalled server shows in the
//!   percentiles (no coordinated omission).
//! - Only the window after `warmup` counts (for idle: the hold after setup); errors count always.
//! - With `server_pid` (a running process, checked before the run), the server's utime+stime from `/proc/PID/stat` over the window gives
//!   server CPU µs per operation, and `/proc/PID/status` its RSS.
//!
//! # Bounds
//! Nothing waits on the server without a deadline: a connect gives up after
//! [`CONNECT_TIMEOUT`]; an address where nothing listens is a [`LoadError::Unreachable`] within
//! that time; pingpong, pipeline, stream and churn end at `warmup + duration` (in-flight messages
//! are abandoned, not waited for); idle ends at its setup (at most [`IDLE_SETUP_TIMEOUT`]) plus
//! `duration`. Then every connection is shut down for writing and read until the server
//! closes it, for at most 5 s more, so the server sees an end of stream and not a reset.
//!
//! # Connections
//! New connections are opened while fewer than [`MAX_UNCONFIRMED`] are unconfirmed, so the
//! server's accept backlog never overflows. With `source_addrs` each socket is bound to the
//! next address round-robin and to a port chosen by the generator outside the kernel's
//! ephemeral range: with many TIME_WAIT sockets about, that is several times faster than the
//! kernel's own choice (see "Load generator design figures" in BENCHMARKS.md), so pass
//! `--source-addrs 127.0.0.2,127.0.0.3` for idle and churn runs.
//!
//! # CPU use
//! The generator is one thread. With `rate`, it sleeps whole milliseconds and spins through
//! the last one before a message is due (mio's poll timeout has millisecond resolution), so
//! once a message is due every millisecond or more often it keeps a core busy: pin it away
//! from the server (`taskset`).
//!
//! # Example
//! ```text
//! sockman load --connect 127.0.0.1:7000 --connections 50 --mode pipeline --depth 16 \
//!     --duration 5s --json
//! ```

mod engine;
mod mode;
mod pattern;
mod procfs;
mod protocol;
mod report;
mod schedule;
mod source;
mod stats;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use crate::units::{parse_duration, parse_size};

pub use mode::Mode;
pub use report::Report;
pub(crate) use schedule::{MAX_RATE, MIN_RATE};

/// How long one connect may take before it counts as a `timed_out` error; also how long the
/// generator waits for the *first* connection before it calls the server unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Idle mode: the most time that connecting and the one echo per connection may take before the
/// hold starts; connections not ready by then count as `timed_out`. Generous because tens of
/// thousands of connects on a busy machine take seconds.
pub const IDLE_SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Connections opened but not yet confirmed (connecting, or connected with no byte echoed
/// yet), at most. A connect completes on the client as soon as the kernel answers, before the
/// server calls accept(), so limiting connects in progress does not protect the server's
/// accept backlog; the first echoed byte proves the accept. With many more in flight, a peer
/// with a backlog of 128 overflowed it (see "Load generator design figures" in BENCHMARKS.md),
/// and each dropped SYN came back only after the kernel's 1 s retransmit timeout. 128 fits the
/// smallest common backlog (the old SOMAXCONN).
pub const MAX_UNCONFIRMED: usize = 128;

/// Upper bound on `--depth`: the in-flight queue per connection is allocated up front.
pub const MAX_DEPTH: usize = 65_536;

/// Upper bound on `--size` (64 MiB). A message must fit through the echo server's buffers and
/// come back within the run; a larger one (say `100GB`) would only ever report 0 operations.
pub const MAX_SIZE: usize = 64 << 20;

/// Command-line flags of `sockman load` (each also readable from a `SOCKMAN_LOAD_*` variable).
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Echo server to load (loopback only).
    #[arg(
        long,
        value_name = "ADDR",
        default_value = "127.0.0.1:7000",
        env = "SOCKMAN_LOAD_CONNECT"
    )]
    pub connect: SocketAddr,
    /// Concurrent connections (workers, in churn mode).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 50,
        env = "SOCKMAN_LOAD_CONNECTIONS"
    )]
    pub connections: usize,
    /// What to measure.
    #[arg(
        long,
        value_enum,
        default_value = "pingpong",
        env = "SOCKMAN_LOAD_MODE"
    )]
    pub mode: Mode,
    /// Message size (e.g. 64, 1KiB), at most 64MiB; in stream mode the unit of an operation
    /// (writes are whole units, up to 256 KiB).
    #[arg(long, value_name = "BYTES", default_value = "64", env = "SOCKMAN_LOAD_SIZE", value_parser = parse_size)]
    pub size: usize,
    /// Measured time (e.g. 10s); in idle mode how long connections are held.
    #[arg(long, value_name = "DURATION", default_value = "10s", env = "SOCKMAN_LOAD_DURATION", value_parser = parse_duration)]
    pub duration: Duration,
    /// Unmeasured time before the measured window (ignored in idle mode).
    #[arg(long, value_name = "DURATION", default_value = "1s", env = "SOCKMAN_LOAD_WARMUP", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Messages in flight per connection (pipeline mode only).
    #[arg(
        long,
        value_name = "K",
        default_value_t = 1,
        env = "SOCKMAN_LOAD_DEPTH"
    )]
    pub depth: usize,
    /// Fixed total message rate per second, spread over the connections (pingpong, pipeline;
    /// from 0.001 to 10000000); latency is then measured from each message's scheduled send
    /// time. Spins a core.
    #[arg(long, value_name = "R", env = "SOCKMAN_LOAD_RATE")]
    pub rate: Option<f64>,
    /// Loopback source addresses to spread connections over, e.g. 127.0.0.2,127.0.0.3.
    #[arg(
        long,
        value_name = "IP,...",
        value_delimiter = ',',
        env = "SOCKMAN_LOAD_SOURCE_ADDRS"
    )]
    pub source_addrs: Vec<IpAddr>,
    /// Server process id (must be running): also report its CPU µs per operation and its RSS.
    #[arg(long, value_name = "PID", env = "SOCKMAN_LOAD_SERVER_PID")]
    pub server_pid: Option<u32>,
    /// Print one JSON object instead of the readable report.
    #[arg(long, env = "SOCKMAN_LOAD_JSON")]
    pub json: bool,
    /// Start every connection with a PROXY protocol header (for a server with
    /// `--proxy-protocol`): what parsing it costs the server.
    #[arg(
        long,
        value_enum,
        value_name = "v1|v2",
        env = "SOCKMAN_LOAD_SEND_PROXY"
    )]
    pub send_proxy: Option<crate::proxy::ProxyVersion>,
}

impl LoadArgs {
    /// Builds and validates the [`LoadConfig`]; `progress` starts off (the binary turns it on
    /// when stderr is a terminal).
    ///
    /// # Errors
    /// A one-line message naming the flag when a value is out of range (see
    /// [`LoadConfig::validate`]).
    pub fn to_config(&self) -> Result<LoadConfig, String> {
        let cfg = LoadConfig {
            connect: self.connect,
            connections: self.connections,
            mode: self.mode,
            size: self.size,
            duration: self.duration,
            warmup: self.warmup,
            depth: self.depth,
            rate: self.rate,
            source_addrs: self.source_addrs.clone(),
            server_pid: self.server_pid,
            progress: false,
            // A fixed documentation-range client: the header's parse cost does not depend on it.
            preamble: self.send_proxy.map_or_else(Vec::new, |v| {
                crate::proxy::Proxy::proxy_header(
                    v,
                    SocketAddr::from(([192, 0, 2, 1], 40000)),
                    self.connect,
                )
            }),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// What [`run`] does: the validated form of [`LoadArgs`], also built directly by the tests.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Echo server address; must be loopback (127.0.0.0/8 or ::1).
    pub connect: SocketAddr,
    /// Connections held at once (churn: concurrent connect-echo-close workers).
    pub connections: usize,
    /// What to measure.
    pub mode: Mode,
    /// Bytes per message, at most [`MAX_SIZE`] (stream: the unit of an operation).
    pub size: usize,
    /// Length of the measured window (idle: the hold).
    pub duration: Duration,
    /// Unmeasured time before the window, so connects and slow start do not skew it.
    pub warmup: Duration,
    /// Messages in flight per connection; more than 1 only in pipeline mode.
    pub depth: usize,
    /// Total messages per second over all connections, or `None` to go as fast as possible.
    pub rate: Option<f64>,
    /// Loopback source IPs bound round-robin before connect, for more than one address's worth
    /// of ephemeral ports; empty = let the kernel choose.
    pub source_addrs: Vec<IpAddr>,
    /// Server process to sample in `/proc` for CPU per operation and RSS; [`run`] refuses one
    /// whose `/proc/PID/stat` is not readable.
    pub server_pid: Option<u32>,
    /// Print a live progress line on stderr once a second.
    pub progress: bool,
    /// Bytes every connection sends first, before its messages (a PROXY protocol header);
    /// not echoed, not counted.
    pub preamble: Vec<u8>,
}

impl Default for LoadConfig {
    /// 127.0.0.1:7000, 50 connections, pingpong, 64 B, 10 s after a 1 s warmup, depth 1.
    fn default() -> Self {
        LoadConfig {
            connect: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7000),
            connections: 50,
            mode: Mode::Pingpong,
            size: 64,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            depth: 1,
            rate: None,
            source_addrs: Vec::new(),
            server_pid: None,
            progress: false,
            preamble: Vec::new(),
        }
    }
}

impl LoadConfig {
    /// Checks every field; [`run`] calls it too.
    ///
    /// # Errors
    /// A one-line message naming the offending flag: connections, size or depth below 1; size
    /// above [`MAX_SIZE`]; depth above 1 outside pipeline mode or above [`MAX_DEPTH`]; a rate that is not a positive finite
    /// number, outside [`MIN_RATE`]..=[`MAX_RATE`], or in stream, idle or churn mode; a zero duration; a connect or source
    /// address that is not loopback, or a source address of the other IP family.
    pub fn validate(&self) -> Result<(), String> {
        if self.connections == 0 {
            return Err("--connections must be at least 1".into());
        }
        if self.size == 0 {
            return Err("--size must be at least 1 byte".into());
        }
        if self.size > MAX_SIZE {
            return Err(format!(
                "--size {} is too large (at most {MAX_SIZE} bytes, 64MiB)",
                self.size
            ));
        }
        if self.depth == 0 {
            return Err("--depth must be at least 1".into());
        }
        if self.depth > MAX_DEPTH {
            return Err(format!(
                "--depth {} is too large (at most {MAX_DEPTH})",
                self.depth
            ));
        }
        if self.depth > 1 && self.mode != Mode::Pipeline {
            return Err(format!(
                "--depth {} needs --mode pipeline ({} keeps at most one message in flight)",
                self.depth, self.mode
            ));
        }
        if let Some(rate) = self.rate {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(format!(
                    "--rate must be a positive number of messages per second, not {rate}"
                ));
            }
            if !(MIN_RATE..=MAX_RATE).contains(&rate) {
                return Err(format!(
                    "--rate {rate} is out of range: from {MIN_RATE} to {MAX_RATE} messages per second over all connections"
                ));
            }
            if !matches!(self.mode, Mode::Pingpong | Mode::Pipeline) {
                return Err(format!(
                    "--rate applies to --mode pingpong or pipeline, not {}",
                    self.mode
                ));
            }
        }
        if self.duration.is_zero() {
            return Err("--duration must be longer than 0".into());
        }
        if !self.connect.ip().is_loopback() {
            return Err(format!(
                "--connect {}: only loopback servers (127.0.0.0/8 or ::1) are supported; \
                 the generator measures a server on this machine",
                self.connect
            ));
        }
        if self.connect.port() == 0 {
            return Err(format!(
                "--connect {}: port 0 is not a server",
                self.connect
            ));
        }
        for ip in &self.source_addrs {
            if !ip.is_loopback() {
                return Err(format!(
                    "--source-addrs {ip}: not a loopback address (127.0.0.0/8 or ::1)"
                ));
            }
            if ip.is_ipv4() != self.connect.is_ipv4() {
                return Err(format!(
                    "--source-addrs {ip}: a different IP family from --connect {}",
                    self.connect
                ));
            }
        }
        Ok(())
    }
}

/// Why [`run`] could not produce a [`Report`]. Failures of single connections are not errors
/// here: they are counted in [`Report::errors`].
#[derive(Debug)]
pub enum LoadError {
    /// The configuration is invalid (the message names the flag).
    Config(String),
    /// The requested connections need more file descriptors than the hard limit allows.
    FdLimit {
        /// Descriptors the run needs: connections plus those already open plus a margin.
        needed: u64,
        /// The open-file limit after raising the soft limit to the hard one.
        limit: u64,
    },
    /// No connection to the server could be made: refused, or none completed within
    /// [`CONNECT_TIMEOUT`].
    Unreachable {
        /// The address tried.
        addr: SocketAddr,
        /// What happened (e.g. "connection refused").
        reason: String,
    },
    /// The generator itself failed (creating or polling the mio `Poll`).
    Io {
        /// The step that failed.
        what: &'static str,
        /// The cause.
        source: io::Error,
    },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Config(msg) => write!(f, "invalid load configuration: {msg}"),
            LoadError::FdLimit { needed, limit } => write!(
                f,
                "too many connections: the run needs about {needed} open files but the hard \
                 limit is {limit}; use fewer --connections or raise the limit (ulimit -Hn)"
            ),
            LoadError::Unreachable { addr, reason } => write!(
                f,
                "cannot reach an echo server at {addr}: {reason} (is it running and listening there?)"
            ),
            LoadError::Io { what, source } => write!(f, "load generator failed to {what}: {source}"),
        }
    }
}

impl std::error::Error for LoadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LoadError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Generates the configured load and returns the figures.
///
/// Raises this process's soft open-file limit to the hard limit first. Blocks for about
/// `warmup + duration` (idle: setup + `duration`); every wait has a deadline, so it returns
/// even if the server stalls or vanishes.
///
/// # Errors
/// [`LoadError::Config`] for an invalid `cfg` or a `server_pid` with no readable
/// `/proc/PID/stat` (no such process, or not ours to read), [`LoadError::FdLimit`] before any connect when
/// the connections cannot fit the open-file limit, [`LoadError::Unreachable`] when no
/// connection succeeds (refused, or none within [`CONNECT_TIMEOUT`]), [`LoadError::Io`] when
/// the poller fails.
pub fn run(cfg: &LoadConfig) -> Result<Report, LoadError> {
    cfg.validate().map_err(LoadError::Config)?;
    if let Some(pid) = cfg.server_pid {
        check_server_pid(pid).map_err(LoadError::Config)?;
    }
    engine::run(cfg)
}

/// `--server-pid`: the process must exist and its `/proc/PID/stat` be readable, or every
/// server figure of the report would silently be "n/a". Checked when the run starts, not in
/// [`LoadConfig::validate`], which does not depend on the machine's state.
fn check_server_pid(pid: u32) -> Result<(), String> {
    match procfs::sample(pid).cpu_ticks {
        Some(_) => Ok(()),
        None => Err(format!(
            "--server-pid {pid}: no such process (/proc/{pid}/stat is not readable); \
             pass the pid of the running echo server, or leave the flag out"
        )),
    }
}
