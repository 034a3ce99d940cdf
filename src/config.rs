//! Server configuration: [`Config`] with defaults, and [`Config::validate`].
//!
//! Plain data: nothing here reads the environment or argv, or does I/O. The binary maps its flags
//! and `SOCKMAN_*` variables onto a `Config`; an embedder fills one in code.

use std::net::SocketAddr;
use std::time::Duration;

use crate::error::Error;
use crate::token::MAX_CONNECTIONS_LIMIT;

/// What to do with a new connection when the server already holds `max_connections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFull {
    /// Accept it and close it at once (counted as `rejected{full}`), so the kernel backlog never
    /// silently fills with clients that hang.
    #[default]
    Reject,
    /// Close the longest-idle connection (reason `Evicted`) to make room, if it has been idle for
    /// at least [`Config::evict_min_idle`]; otherwise reject.
    EvictIdle,
}

/// Whether data listeners expect a PROXY protocol header (from an L4 balancer such as HAProxy
/// with `send-proxy`) at the start of every connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProxyProtocol {
    /// No header: the socket's peer is the client. The default.
    #[default]
    Off,
    /// The text header (version 1) is required.
    V1,
    /// The binary header (version 2) is required.
    V2,
    /// Either version is required.
    Any,
}

/// Everything the server loop needs to know. Durations of zero mean "off" where documented.
#[derive(Debug, Clone)]
pub struct Config {
    /// Addresses to listen on. Port 0 picks a free port: read it back with
    /// [`Server::local_addrs`](crate::Server::local_addrs). Empty for a loop that only dials
    /// ([`Server::connect`](crate::Server::connect)).
    pub listen: Vec<SocketAddr>,
    /// Close a connection after this long without activity (a read or write progress).
    /// `Duration::ZERO` turns idle timeouts off. Default 60 s.
    pub idle_timeout: Duration,
    /// Granularity of every deadline: an idle connection is closed no earlier than
    /// `idle_timeout` after its last activity and no later than one tick after that.
    /// At least 1 ms. Default 10 ms.
    pub tick: Duration,
    /// Close a connection whose pending output made no progress for this long (a peer that
    /// stopped reading). Progress is judged at the socket: when the deadline comes the loop
    /// tries to write, and a socket that takes bytes (the kernel takes more only once it has
    /// sent some, as the peer's window opens) restarts it, so a reader that keeps taking bytes,
    /// however slowly, is never closed. `Duration::ZERO` turns it off. Default 30 s.
    pub write_timeout: Duration,
    /// Cap on the output *copied* for one connection and not yet written
    /// ([`Context::write`](crate::Context::write)); a write beyond it closes the connection
    /// with `Overflow`. Shared buffers ([`Context::write_shared`](crate::Context::write_shared))
    /// do not count: they are the caller's, not copied, and the write timeout bounds a reader
    /// that stops. A read never takes more than this many bytes, so a handler that writes back
    /// at most what it read (echo) never overflows. Default 64 KiB.
    pub max_pending: usize,
    /// Size of the one loop-wide read buffer. Default 64 KiB.
    pub read_buffer: usize,
    /// Connection cap. `None` derives it from the open-file limit (raised to its hard limit when
    /// [`raise_fd_limit`](Self::raise_fd_limit) is set) minus [`FD_RESERVE`](crate::FD_RESERVE)
    /// and the loop's own descriptors (epoll, waker, timerfd, the spare, listeners, the admin
    /// endpoint; for [`Workers`](crate::Workers), every worker's);
    /// a value above that is clamped with a warning.
    pub max_connections: Option<usize>,
    /// Policy at the connection cap. Default [`OnFull::Reject`].
    pub on_full: OnFull,
    /// With [`OnFull::EvictIdle`], only connections idle at least this long may be evicted.
    /// Default 1 s.
    pub evict_min_idle: Duration,
    /// Connections allowed from one peer IP address; 0 = no per-IP cap. Default 0.
    pub max_per_ip: usize,
    /// After `accept` fails with EMFILE/ENFILE, accepting pauses until a connection closes or
    /// this long has passed. Default 100 ms.
    pub accept_retry: Duration,
    /// Listen backlog. Default 1024.
    pub backlog: u32,
    /// Set `TCP_NODELAY` (on the listener; Linux copies it to accepted sockets). Default on.
    pub nodelay: bool,
    /// TCP keepalive idle time for peers that vanish without a FIN; zero = off. Default off.
    pub tcp_keepalive: Duration,
    /// Raise the soft `RLIMIT_NOFILE` to the hard limit at start. Default on.
    pub raise_fd_limit: bool,
    /// Address of the admin endpoint (`/metrics`, `/connections`, `/health`), served by the same
    /// loop. `None` = off. A warning is logged if it is not a loopback address.
    pub admin: Option<SocketAddr>,
    /// How often the loop compares its own descriptors with the process's open ones (the leak
    /// self-check; reads `/proc/self/fd`, so seconds, never per turn). Zero = off. Default off:
    /// an embedder's own files would show as unaccounted.
    pub fd_check_interval: Duration,
    /// During a drain, connections idle this long with nothing pending are closed.
    /// Default 1 s.
    pub drain_idle: Duration,
    /// Accepts per listener per loop turn, so a connect flood cannot starve established
    /// connections. Default 128.
    pub accept_budget: usize,
    /// Reads per connection per loop turn, so one fast peer cannot starve the rest. Default 16.
    pub read_budget: usize,
    /// Wheel entries handled per loop turn, so a mass expiry does not stall the loop. Default 4096.
    pub expire_budget: usize,
    /// A graceful close (the handler's, a drain's) flushes the output, shuts down the write side
    /// and then reads and discards what the peer still sends, until its EOF, this long, or
    /// [`linger_bytes`](Self::linger_bytes): closing a socket with unread input makes Linux
    /// send a reset and drop the reply still queued (nginx's `lingering_close`). Zero closes at
    /// once. Default 5 s.
    pub linger_timeout: Duration,
    /// Most bytes read and discarded while lingering before the socket is closed anyway.
    /// Default 4 MiB.
    pub linger_bytes: u64,
    /// `SO_RCVBUF` of accepted and dialed sockets (set once on the listener; Linux copies it to
    /// accepted sockets). The kernel doubles the value and stops autotuning that socket's
    /// buffer: the knob that bounds kernel memory per slow peer (nginx `listen ... rcvbuf=`,
    /// HAProxy `tune.rcvbuf.client`). `None` = the kernel's autotuning. Default `None`.
    pub recv_buffer: Option<usize>,
    /// `SO_SNDBUF` of accepted and dialed sockets, like [`recv_buffer`](Self::recv_buffer).
    /// Default `None`.
    pub send_buffer: Option<usize>,
    /// A dial ([`Context::connect`](crate::Context::connect)) that has not completed after this
    /// long is closed with [`CloseReason::ConnectTimeout`](crate::CloseReason::ConnectTimeout).
    /// Default 5 s.
    pub connect_timeout: Duration,
    /// A connection whose pending output exceeds this many bytes is not writable
    /// ([`Context::is_writable`](crate::Context::is_writable) is false) until it falls to
    /// [`write_low_watermark`](Self::write_low_watermark), when
    /// [`Handler::on_drained`](crate::Handler::on_drained) is called. At most
    /// [`max_pending`](Self::max_pending). `None` = half of `max_pending`.
    pub write_high_watermark: Option<usize>,
    /// See [`write_high_watermark`](Self::write_high_watermark); at most the high watermark.
    /// `None` = a quarter of the high watermark.
    pub write_low_watermark: Option<usize>,
    /// How often [`Handler::on_periodic`](crate::Handler::on_periodic) runs (housekeeping on the
    /// loop); zero = never. Default zero.
    pub periodic: Duration,
    /// PROXY protocol on every data listener. When on, a header is *required* (anything else
    /// would let clients spoof their address): its client address replaces the socket's peer
    /// in per-IP limits, logs, `/connections` and [`Context::peer`](crate::Context::peer); a
    /// v2 `LOCAL` header (a balancer's health check) keeps the socket's peer. A missing,
    /// malformed, oversized or late header closes the connection before the handler sees it
    /// (counted as `rejected{proxy_header_*}`). Needs the `proxy-protocol` feature. Default off.
    pub proxy_protocol: ProxyProtocol,
    /// The PROXY protocol header must be complete this long after the accept. Default 3 s.
    pub proxy_header_timeout: Duration,
    /// Accepted connections are closed gracefully this long after they were accepted
    /// ([`CloseReason::MaxLifetime`](crate::CloseReason::MaxLifetime)), so that long-lived
    /// clients rebalance after a scale-out (Envoy's `max_connection_duration`). Zero = off.
    /// Default off.
    pub max_lifetime: Duration,
    /// Spread of [`max_lifetime`](Self::max_lifetime): each connection's lifetime is within
    /// ± this of it, so that a fleet does not reconnect at once. `None` = a tenth of the
    /// lifetime.
    pub max_lifetime_jitter: Option<Duration>,
    /// An accepted connection that sends nothing this long after it was accepted is closed
    /// ([`CloseReason::FirstByteTimeout`](crate::CloseReason::FirstByteTimeout)) rather than
    /// after the whole idle timeout. Zero = off. Default off.
    pub first_byte_timeout: Duration,
    /// Lame-duck delay of a drain: readiness (`/readyz`) fails at once, but the listeners keep
    /// accepting for this long, so that a balancer stops sending before they close; then the
    /// drain runs. Default zero.
    pub drain_delay: Duration,
    /// Bind the listeners with `SO_REUSEPORT`, so that several loops (threads or processes)
    /// can each have their own socket on one address and the kernel spreads connections over
    /// them. Default off.
    pub reuse_port: bool,
    /// Capacity of each queue that other threads feed through [`Handle::send`](crate::Handle::send),
    /// [`Handle::close`](crate::Handle::close) and [`Remote::run`](crate::Remote::run); a full
    /// queue is the sender's error. Default 1024.
    pub remote_queue: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 7000))],
            idle_timeout: Duration::from_secs(60),
            tick: Duration::from_millis(10),
            write_timeout: Duration::from_secs(30),
            max_pending: 64 * 1024,
            read_buffer: 64 * 1024,
            max_connections: None,
            on_full: OnFull::Reject,
            evict_min_idle: Duration::from_secs(1),
            max_per_ip: 0,
            accept_retry: Duration::from_millis(100),
            backlog: 1024,
            nodelay: true,
            tcp_keepalive: Duration::ZERO,
            raise_fd_limit: true,
            drain_idle: Duration::from_secs(1),
            admin: None,
            fd_check_interval: Duration::ZERO,
            accept_budget: 128,
            read_budget: 16,
            expire_budget: 4096,
            linger_timeout: Duration::from_secs(5),
            linger_bytes: 4 << 20,
            recv_buffer: None,
            send_buffer: None,
            connect_timeout: Duration::from_secs(5),
            write_high_watermark: None,
            write_low_watermark: None,
            periodic: Duration::ZERO,
            remote_queue: 1024,
            proxy_protocol: ProxyProtocol::Off,
            proxy_header_timeout: Duration::from_secs(3),
            max_lifetime: Duration::ZERO,
            max_lifetime_jitter: None,
            first_byte_timeout: Duration::ZERO,
            drain_delay: Duration::ZERO,
            reuse_port: false,
        }
    }
}

impl Config {
    /// The write watermarks in force, `(low, high)`, with the defaults filled in.
    pub fn watermarks(&self) -> (usize, usize) {
        let high = self.write_high_watermark.unwrap_or(self.max_pending / 2);
        let low = self.write_low_watermark.unwrap_or(high / 4);
        (low, high)
    }

    /// Checks the settings against each other.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first offending setting and why.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::Config(msg));
        if self.tick < Duration::from_millis(1) {
            return bad(format!(
                "tick must be at least 1ms (got {:?}): the poll timeout has millisecond resolution",
                self.tick
            ));
        }
        if self.tick > Duration::from_secs(60) {
            return bad(format!("tick must be at most 60s (got {:?})", self.tick));
        }
        for (name, value) in [
            ("idle timeout", self.idle_timeout),
            ("write timeout", self.write_timeout),
            ("linger timeout", self.linger_timeout),
            ("connect timeout", self.connect_timeout),
            ("periodic interval", self.periodic),
            ("max lifetime", self.max_lifetime),
            ("first byte timeout", self.first_byte_timeout),
            ("drain delay", self.drain_delay),
        ] {
            if !value.is_zero() && value < self.tick {
                return bad(format!(
                    "{name} {value:?} is shorter than the tick {:?} (use 0 to turn it off)",
                    self.tick
                ));
            }
            if value > Duration::from_secs(365 * 24 * 3600) {
                return bad(format!("{name} {value:?} is longer than a year"));
            }
        }
        if self.max_pending == 0 {
            return bad("max pending output must be at least 1 byte".into());
        }
        if self.read_buffer == 0 {
            return bad("read buffer must be at least 1 byte".into());
        }
        if self.read_buffer > 64 << 20 {
            return bad(format!("read buffer {} is over 64 MiB", self.read_buffer));
        }
        match self.max_connections {
            Some(0) => return bad("max connections must be at least 1".into()),
            Some(n) if n > MAX_CONNECTIONS_LIMIT => {
                return bad(format!(
                    "max connections {n} is over the limit {MAX_CONNECTIONS_LIMIT}"
                ))
            }
            _ => {}
        }
        if self.backlog == 0 || self.backlog > i32::MAX as u32 {
            return bad(format!(
                "backlog must be in 1..={} (got {})",
                i32::MAX,
                self.backlog
            ));
        }
        for (name, value) in [
            ("accept budget", self.accept_budget),
            ("read budget", self.read_budget),
            ("expire budget", self.expire_budget),
        ] {
            if value == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        // TCP_KEEPIDLE is whole seconds, at least 1 (a 500 ms value would become 0, which the
        // kernel refuses with a bare EINVAL at listen time) and at most 32767
        // (MAX_TCP_KEEPIDLE).
        if !self.tcp_keepalive.is_zero() {
            let k = self.tcp_keepalive;
            if k.subsec_nanos() != 0 || k < Duration::from_secs(1) {
                return bad(format!(
                    "tcp keepalive {k:?} must be whole seconds, at least 1s (TCP_KEEPIDLE has one-second resolution), or 0 for off"
                ));
            }
            if k > Duration::from_secs(32_767) {
                return bad(format!(
                    "tcp keepalive {k:?} is above the 32767s the kernel accepts"
                ));
            }
        }
        for (name, value) in [
            ("receive buffer", self.recv_buffer),
            ("send buffer", self.send_buffer),
        ] {
            // The kernel clamps SO_RCVBUF/SO_SNDBUF to [rmem|wmem]_max and doubles it; the
            // setsockopt argument is an int.
            if let Some(v) = value {
                if v == 0 || v > i32::MAX as usize / 2 {
                    return bad(format!("{name} must be between 1 byte and 1GiB (got {v})"));
                }
            }
        }
        let (low, high) = self.watermarks();
        if high > self.max_pending {
            return bad(format!(
                "write high watermark {high} is above max pending {} (the connection would overflow before it is unwritable)",
                self.max_pending
            ));
        }
        if low > high {
            return bad(format!(
                "write low watermark {low} is above the high watermark {high}"
            ));
        }
        if self.remote_queue == 0 {
            return bad("remote queue capacity must be at least 1".into());
        }
        if self.proxy_protocol != ProxyProtocol::Off {
            if !cfg!(feature = "proxy-protocol") {
                return bad("the PROXY protocol needs the `proxy-protocol` cargo feature".into());
            }
            if self.proxy_header_timeout < self.tick {
                return bad(format!(
                    "proxy header timeout {:?} is shorter than the tick {:?}",
                    self.proxy_header_timeout, self.tick
                ));
            }
        }
        if let Some(j) = self.max_lifetime_jitter {
            if !self.max_lifetime.is_zero() && j >= self.max_lifetime {
                return bad(format!(
                    "max lifetime jitter {j:?} must be less than the max lifetime {:?}",
                    self.max_lifetime
                ));
            }
        }
        if self.accept_retry.is_zero() {
            return bad("accept retry must be above 0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(c: &Config) -> String {
        c.validate().unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn bad_settings_are_named() {
        let mut c = Config {
            tick: Duration::ZERO,
            ..Config::default()
        };
        assert!(err(&c).contains("tick"), "{}", err(&c));
        c.tick = Duration::from_millis(10);
        c.idle_timeout = Duration::from_millis(5);
        assert!(err(&c).contains("idle timeout"), "{}", err(&c));
        c.idle_timeout = Duration::ZERO;
        c.validate().unwrap();
        // No listener: a loop that only dials.
        c.listen.clear();
        c.validate().unwrap();
        let c = Config {
            max_connections: Some(0),
            ..Config::default()
        };
        assert!(err(&c).contains("max connections"));
        let c = Config {
            max_pending: 0,
            ..Config::default()
        };
        assert!(err(&c).contains("pending"));
        let c = Config {
            write_timeout: Duration::from_micros(10),
            ..Config::default()
        };
        assert!(err(&c).contains("write timeout"));
    }

    #[test]
    fn keepalive_must_be_whole_seconds() {
        for bad in [
            Duration::from_millis(500),
            Duration::from_millis(1500),
            Duration::from_secs(40_000),
        ] {
            let c = Config {
                tcp_keepalive: bad,
                ..Config::default()
            };
            assert!(err(&c).contains("tcp keepalive"), "{bad:?}: {}", err(&c));
        }
        for good in [
            Duration::ZERO,
            Duration::from_secs(1),
            Duration::from_secs(30),
        ] {
            Config {
                tcp_keepalive: good,
                ..Config::default()
            }
            .validate()
            .unwrap();
        }
    }

    #[test]
    fn watermarks_are_ordered_under_the_cap() {
        let c = Config {
            max_pending: 1000,
            write_high_watermark: Some(2000),
            ..Config::default()
        };
        assert!(err(&c).contains("high watermark"), "{}", err(&c));
        let c = Config {
            write_high_watermark: Some(100),
            write_low_watermark: Some(200),
            ..Config::default()
        };
        assert!(err(&c).contains("low watermark"), "{}", err(&c));
    }
}
