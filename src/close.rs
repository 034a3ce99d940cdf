//! Why a connection ended ([`CloseReason`]) and the crate's [`Error`].
//!
//! Every connection ends through the server's one close path with exactly one reason; the
//! metrics count closes per reason. A connection refused at accept never becomes a connection:
//! it is counted as a rejection, not as a close reason.

use std::fmt;
use std::io;
use std::net::SocketAddr;

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
}

impl CloseReason {
    /// Number of distinct counters, one per variant ([`CloseReason::index`]).
    pub const COUNT: usize = 9;

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
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Io(kind) => write!(f, "io({kind})"),
            other => f.write_str(other.name()),
        }
    }
}

/// A failure that stops the server (or keeps it from starting). A connection's own error never
/// becomes an `Error`: it closes that connection with a [`CloseReason`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid; the message says which setting and why.
    Config(String),
    /// A listen address could not be bound.
    Bind {
        /// The address that failed.
        addr: SocketAddr,
        /// The underlying error (e.g. address in use).
        source: io::Error,
    },
    /// The poll or another loop-wide resource failed.
    Io(io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(msg) => write!(f, "invalid configuration: {msg}"),
            Error::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            Error::Io(e) => write!(f, "event loop failed: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Config(_) => None,
            Error::Bind { source, .. } => Some(source),
            Error::Io(e) => Some(e),
        }
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
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
}
