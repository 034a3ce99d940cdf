//! The crate's [`Error`]: what stops a server or keeps it from starting.
//!
//! A connection's own error never becomes an `Error`: it closes that connection with a
//! [`CloseReason`](crate::CloseReason).

use std::fmt;
use std::io;
use std::net::SocketAddr;

/// A failure that stops the server (or keeps it from starting). A connection's own error never
/// becomes an `Error`: it closes that connection with a [`CloseReason`](crate::CloseReason).
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
    /// One of several [`Workers`](crate::Workers) failed (the others were stopped).
    Worker {
        /// Which worker.
        index: usize,
        /// What went wrong.
        message: String,
    },
    /// Handing listeners to a successor, or building one from handed listeners, failed; the
    /// message says why (see [`Handover`](crate::Handover)).
    Handover(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(msg) => write!(f, "invalid configuration: {msg}"),
            Error::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            Error::Io(e) => write!(f, "event loop failed: {e}"),
            Error::Worker { index, message } => write!(f, "worker {index} failed: {message}"),
            Error::Handover(msg) => write!(f, "handover: {msg}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Config(_) | Error::Worker { .. } | Error::Handover(_) => None,
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
