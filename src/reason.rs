//! Why things end, as counted: [`CloseReason`] (one per connection), [`RejectReason`] (a
//! connection refused before it became one), [`LingerEnd`] (how a graceful close's linger
//! ended) and [`AcceptError`] (why an `accept` call failed). Plain enums with a counter slot
//! and a name each; this module imports nothing of the crate.
//!
//! Every connection ends through the server's one close path with exactly one reason. A
//! connection refused at accept never becomes a connection: it is counted as a
//! [`RejectReason`], not as a close reason.

use std::fmt;
use std::io;

/// Why a connection was closed. Counted per variant in [`Metrics`](crate::Metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseReason {
    /// The peer closed its side (a read returned 0) and everything pending was flushed.
    PeerClosed,
    /// The peer reset the connection (`ECONNRESET`, `EPIPE`).
    Reset,
    /// Any other I/O error, with its kind.
    Io(io::ErrorKind),
    /// No activity for the idle timeout.
    IdleTimeout,
    /// Output was pending and made no progress for the write-stall timeout.
    WriteStall,
    /// Pending output would have exceeded the per-connection cap.
    Overflow,
    /// Closed to make room for a new connection at the connection cap.
    Evicted,
    /// The server stopped (shutdown, drain deadline, or drain of an idle connection).
    Shutdown,
    /// The handler asked for the close (after its output was flushed).
    Handler,
    /// A dial was refused (`ECONNREFUSED`: nothing listens there).
    ConnectRefused,
    /// A dial did not complete within [`Config::connect_timeout`](crate::Config::connect_timeout).
    ConnectTimeout,
    /// A dial found no route (`EHOSTUNREACH`, `ENETUNREACH`, `EHOSTDOWN`, `ENETDOWN`).
    Unreachable,
    /// The connection reached [`Config::max_lifetime`](crate::Config::max_lifetime) (closed
    /// gracefully, so that long-lived clients rebalance).
    MaxLifetime,
    /// The client sent nothing within
    /// [`Config::first_byte_timeout`](crate::Config::first_byte_timeout).
    FirstByteTimeout,
}

impl CloseReason {
    /// Number of distinct counters, one per variant ([`CloseReason::index`]).
    pub const COUNT: usize = 14;

    /// Every counter's name, in [`CloseReason::index`] order.
    pub const NAMES: [&'static str; Self::COUNT] = [
        "peer_closed",
        "reset",
        "io",
        "idle_timeout",
        "write_stall",
        "overflow",
        "evicted",
        "shutdown",
        "handler",
        "connect_refused",
        "connect_timeout",
        "unreachable",
        "max_lifetime",
        "first_byte_timeout",
    ];

    /// The counter slot of this reason (all `Io` kinds share one slot).
    pub fn index(self) -> usize {
        match self {
            CloseReason::PeerClosed => 0,
            CloseReason::Reset => 1,
            CloseReason::Io(_) => 2,
            CloseReason::IdleTimeout => 3,
            CloseReason::WriteStall => 4,
            CloseReason::Overflow => 5,
            CloseReason::Evicted => 6,
            CloseReason::Shutdown => 7,
            CloseReason::Handler => 8,
            CloseReason::ConnectRefused => 9,
            CloseReason::ConnectTimeout => 10,
            CloseReason::Unreachable => 11,
            CloseReason::MaxLifetime => 12,
            CloseReason::FirstByteTimeout => 13,
        }
    }

    /// The counter name of this reason, e.g. `idle_timeout`.
    pub fn name(self) -> &'static str {
        Self::NAMES[self.index()]
    }

    /// Classifies an I/O error that ended a connection. `WouldBlock` and `Interrupted` are not
    /// passed here: the caller stops draining or retries on those.
    pub fn from_io(err: &io::Error) -> CloseReason {
        match err.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => CloseReason::Reset,
            kind => CloseReason::Io(kind),
        }
    }

    /// Classifies the error that ended a dial (from `SO_ERROR` or `connect` itself).
    pub fn from_connect_error(err: &io::Error) -> CloseReason {
        match err.raw_os_error() {
            Some(libc::ECONNREFUSED) => CloseReason::ConnectRefused,
            Some(libc::ETIMEDOUT) => CloseReason::ConnectTimeout,
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN | libc::ENETDOWN) => {
                CloseReason::Unreachable
            }
            _ => CloseReason::from_io(err),
        }
    }

    /// Whether output queued for the connection still goes to the socket when it closes for
    /// this reason (one last nonblocking write: what a handler wrote before it closed, or
    /// before the server stopped, is not dropped). Not when the peer cannot take it: a reset,
    /// an I/O error, a stall or an overflow (both abortive), or a dial that never connected.
    pub(crate) fn keeps_output(self) -> bool {
        !matches!(
            self,
            CloseReason::Reset
                | CloseReason::Io(_)
                | CloseReason::WriteStall
                | CloseReason::Overflow
                | CloseReason::ConnectRefused
                | CloseReason::ConnectTimeout
                | CloseReason::Unreachable
        )
    }

    /// Whether the peer may still be sending when the server closes for this reason, so that a
    /// plain `close()` risks a reset that destroys the reply: these closes linger
    /// ([`Config::linger_timeout`](crate::Config::linger_timeout)). The others are either
    /// abortive (reset, overflow, write stall, forced stop) or happen when the peer is done
    /// (its FIN was read) or silent (idle).
    pub(crate) fn lingers(self) -> bool {
        matches!(
            self,
            CloseReason::Handler | CloseReason::Shutdown | CloseReason::MaxLifetime
        )
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Io(kind) => write!(f, "io({kind})"),
            other => f.write_str(other.name()),
        }
    }
}

/// Why a connection was refused at accept (it never became a connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectReason {
    /// The server was at its connection cap.
    Full,
    /// The peer IP already had `max_per_ip` connections.
    PerIp,
    /// Accepted and closed while shedding after EMFILE/ENFILE (the spare-fd trick).
    Shed,
    /// The socket could not be registered with the poll.
    Register,
    /// A PROXY protocol listener got bytes that are not the start of a PROXY protocol header
    /// (or the client went away before sending one).
    ProxyHeaderMissing,
    /// A PROXY protocol header was malformed or oversized.
    ProxyHeaderInvalid,
    /// A PROXY protocol header of a version the listener does not accept (a v1 header on a
    /// `v2` listener, or v2 on `v1`): a balancer configured for the other version.
    ProxyHeaderVersion,
    /// A PROXY protocol header was not complete within
    /// [`Config::proxy_header_timeout`](crate::Config::proxy_header_timeout).
    ProxyHeaderTimeout,
}

impl RejectReason {
    /// Number of counters, one per variant.
    pub const COUNT: usize = 8;
    /// Counter names, in [`RejectReason::index`] order.
    pub const NAMES: [&'static str; Self::COUNT] = [
        "full",
        "per_ip",
        "shed",
        "register",
        "proxy_header_missing",
        "proxy_header_invalid",
        "proxy_header_version",
        "proxy_header_timeout",
    ];

    /// The counter slot of this reason.
    pub fn index(self) -> usize {
        match self {
            RejectReason::Full => 0,
            RejectReason::PerIp => 1,
            RejectReason::Shed => 2,
            RejectReason::Register => 3,
            RejectReason::ProxyHeaderMissing => 4,
            RejectReason::ProxyHeaderInvalid => 5,
            RejectReason::ProxyHeaderVersion => 6,
            RejectReason::ProxyHeaderTimeout => 7,
        }
    }
}

/// What a lingering read found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LingerEnd {
    /// The peer's EOF: everything it sent was read.
    Eof,
    /// The linger deadline passed.
    Timeout,
    /// The byte cap was reached (reading stopped then; the deadline ended it).
    Bytes,
    /// A read failed (typically a reset).
    Error,
}

impl LingerEnd {
    pub(crate) const COUNT: usize = 4;
    pub(crate) const NAMES: [&'static str; Self::COUNT] = ["eof", "timeout", "bytes", "error"];
}

/// Why an `accept` call failed, as counted in [`Metrics::accept_errors`](crate::Metrics::accept_errors)
/// (what the accept loop does about each kind is the `limits` module's policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AcceptError {
    /// The new connection's own failure, retried like EAGAIN (accept(2): "Linux accept()
    /// passes already-pending network errors on the new socket as an error code from accept()";
    /// also EINTR, ECONNABORTED and EPERM, a firewall refusing it).
    Connection,
    /// The process's descriptors are exhausted (EMFILE).
    ProcessFds,
    /// The system's descriptors are exhausted (ENFILE).
    SystemFds,
    /// Kernel memory is short (ENOBUFS, ENOMEM).
    Memory,
    /// Anything else.
    Other,
}

impl AcceptError {
    pub(crate) const COUNT: usize = 5;
    /// Counter names, in [`AcceptError::index`] order.
    pub(crate) const NAMES: [&'static str; Self::COUNT] =
        ["emfile", "enfile", "nomem", "connection", "other"];

    pub(crate) fn index(self) -> usize {
        match self {
            AcceptError::ProcessFds => 0,
            AcceptError::SystemFds => 1,
            AcceptError::Memory => 2,
            AcceptError::Connection => 3,
            AcceptError::Other => 4,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_classify_to_reasons() {
        let e = |k| io::Error::from(k);
        assert_eq!(
            CloseReason::from_io(&e(io::ErrorKind::ConnectionReset)),
            CloseReason::Reset
        );
        assert_eq!(
            CloseReason::from_io(&e(io::ErrorKind::BrokenPipe)),
            CloseReason::Reset
        );
        assert_eq!(
            CloseReason::from_io(&e(io::ErrorKind::TimedOut)),
            CloseReason::Io(io::ErrorKind::TimedOut)
        );
    }

    #[test]
    fn names_and_indices_agree() {
        let all = [
            CloseReason::PeerClosed,
            CloseReason::Reset,
            CloseReason::Io(io::ErrorKind::Other),
            CloseReason::IdleTimeout,
            CloseReason::WriteStall,
            CloseReason::Overflow,
            CloseReason::Evicted,
            CloseReason::Shutdown,
            CloseReason::Handler,
            CloseReason::ConnectRefused,
            CloseReason::ConnectTimeout,
            CloseReason::Unreachable,
            CloseReason::MaxLifetime,
            CloseReason::FirstByteTimeout,
        ];
        for (i, r) in all.iter().enumerate() {
            assert_eq!(r.index(), i);
            assert_eq!(r.name(), CloseReason::NAMES[i]);
        }
        assert_eq!(
            CloseReason::Io(io::ErrorKind::TimedOut).to_string(),
            "io(timed out)"
        );
    }

    #[test]
    fn connect_errors_classify_to_reasons() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(
            CloseReason::from_connect_error(&os(libc::ECONNREFUSED)),
            CloseReason::ConnectRefused
        );
        assert_eq!(
            CloseReason::from_connect_error(&os(libc::ETIMEDOUT)),
            CloseReason::ConnectTimeout
        );
        assert_eq!(
            CloseReason::from_connect_error(&os(libc::ENETUNREACH)),
            CloseReason::Unreachable
        );
        assert_eq!(
            CloseReason::from_connect_error(&os(libc::ECONNRESET)),
            CloseReason::Reset
        );
    }
}
