//! sockman: a single-threaded readiness-polling TCP server core that never leaks a socket.
//!
//! Every accepted connection is tracked, timed and freed exactly once, by one loop:
//!
//! - **One turn** ([`Server::turn`]): poll (zero timeout when a budget left ready work, else
//!   until the next wheel tick that holds entries); read the clock once, after the poll; dispatch
//!   events (listener → accept, connection → flush and read); expire due deadlines; continue
//!   budgeted work. [`Server::run`] loops over turns until a [`Handle`] stops it.
//! - **Connections** live in a [`slab`], keyed by the low half of their `mio::Token`; the high
//!   half is a generation, so an event or a timer for a connection that is gone (and whose slot
//!   was reused) is recognised and dropped.
//! - **Deadlines** (idle, write stall) live in a hashed timer [`wheel`] with lazy re-arm:
//!   activity only stamps the connection; the wheel re-inserts or closes when a slot fires.
//! - **I/O**: reads go into one loop-wide buffer (an idle connection owns no buffer); writes go
//!   straight out and only the unsent remainder is kept, up to a cap. While output is pending
//!   the connection is not read, which pushes back on the peer through TCP.
//! - **One close path** deregisters, closes the fd, frees the slot, calls
//!   [`Handler::on_close`] and counts the [`CloseReason`] in the [`Metrics`].
//! - **Limits**: the connection cap follows the open-file limit; at the cap new connections are
//!   rejected or the longest-idle one is evicted; EMFILE sheds the backlog with a spare fd and
//!   pauses accepting instead of spinning.
//!
//! The protocol is a [`Handler`]; [`Echo`] and [`Discard`] ship with the crate.
//!
//! # Example
//! ```no_run
//! use sockman::{Config, Echo, Server};
//!
//! let config = Config {
//!     listen: vec!["127.0.0.1:7000".parse().unwrap()],
//!     ..Config::default()
//! };
//! let server = Server::bind(config, Echo)?;
//! let handle = server.handle(); // handle.shutdown() from any thread stops it
//! # drop(handle);
//! let metrics = server.run()?;
//! println!("{metrics}");
//! # Ok::<(), sockman::Error>(())
//! ```
//!
//! # Features
//! `cli` (default) adds the dependencies only the `sockman` binary needs: clap, env_logger,
//! signal-hook, hdrhistogram, serde and serde_json. With `default-features = false` the library
//! depends on mio, slab, log, socket2 and rlimit only.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

#[cfg(feature = "admin")]
mod admin;
mod close;
mod config;
mod conn;
mod handler;
mod limits;
mod metrics;
mod server;
pub mod wheel;

pub use close::{CloseReason, Error};
pub use config::{Config, OnFull, MAX_CONNECTIONS_LIMIT};
pub use handler::{ConnId, Context, Discard, Echo, Handler};
pub use limits::{FALLBACK_MAX_CONNECTIONS, FD_RESERVE};
pub use metrics::{Metrics, RejectReason, LIFETIME_BUCKETS_MS};
pub use server::{Handle, Server};
