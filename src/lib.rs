//! sockman: a single-threaded readiness-polling TCP server core that never leaks a socket.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod close;
mod config;
mod conn;
mod handler;
mod limits;
mod metrics;
mod server;
pub mod wheel;

#[cfg(feature = "cli")]
pub mod load;
#[cfg(feature = "cli")]
pub mod units;

pub use close::{CloseReason, Error};
pub use config::{Config, OnFull, MAX_CONNECTIONS_LIMIT};
pub use handler::{ConnId, Context, Discard, Echo, Handler};
pub use limits::{FALLBACK_MAX_CONNECTIONS, FD_RESERVE};
pub use metrics::{Metrics, RejectReason};
pub use server::{Handle, Server};
