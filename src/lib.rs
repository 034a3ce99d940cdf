//! sockman: a single-threaded readiness-polling TCP core that never leaks a socket.
//!
//! Every connection, accepted or dialed, is tracked, timed and freed exactly once, by one loop:
//!
//! - **One turn** ([`Server::turn`], or [`Server::turn_at`] with time as an input): poll (zero
//!   timeout when a budget left ready work, else until the next deadline); take `now` once,
//!   after the poll; dispatch events (listener → accept, connection → connect, flush, read);
//!   expire due deadlines; continue budgeted work. [`Server::run`] loops over turns until a
//!   [`Handle`] stops it.
//! - **Connections** live in a [`slab`], keyed by the low half of their `mio::Token`; the high
//!   half is a generation (its low bits: a [`ConnId`] carries all 64), so an event, a timer or
//!   a [`ConnId`] for a connection that is gone (and whose slot was reused) is recognised and
//!   dropped.
//! - **Deadlines** (idle, write stall, connect, the handler's timer, linger) share one entry per
//!   connection in a hashed timer wheel with lazy re-arm: activity only stamps the connection;
//!   the wheel re-inserts or acts when a slot fires.
//! - **I/O**: reads go into one loop-wide buffer (an idle connection owns no buffer); what a
//!   turn writes to a connection leaves at the end of the turn in one `write` (or `writev`),
//!   only the unsent remainder is kept, and copied output is capped. While the socket refuses
//!   output the connection is not read, which pushes back on the peer through TCP.
//! - **One close path** deregisters, closes the fd, frees the slot, calls
//!   [`Handler::on_close`] and counts the [`CloseReason`] in the [`Metrics`]. A graceful close
//!   lingers first (write side shut, input discarded until the peer's EOF), so a reply is never
//!   cut short by a reset.
//! - **Limits**: the connection cap follows the open-file limit; at the cap new connections are
//!   rejected or the longest-idle one is evicted; EMFILE sheds the backlog with a spare fd and
//!   pauses accepting instead of spinning.
//! - **Handing over**: a running server's listening sockets go to a successor (another
//!   process, for an upgrade in place) with their accept queues: [`Handover`] takes
//!   duplicates out and later releases them (the old loops stop accepting without taking the
//!   queues, and drain), [`Server::bind_handed`] builds the successor. No connect is refused.
//!
//! The protocol is a [`Handler`]; [`Echo`] and [`Discard`] ship with the crate. The
//! [`Handler`] docs explain the API's shape: what a callback may touch, reaching other
//! connections by [`ConnId`], dialing, timers, output (once per connection per turn; shared
//! [`Bytes`] without a copy) and its bounds, writability, other threads ([`Handle`],
//! [`Remote`]: stop means stopped).
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
//! # Layout
//! The code map and the rules of which module may import which are in `ARCHITECTURE.md`.
//!
//! | file | holds |
//! |---|---|
//! | `server/mod.rs` | the loop: [`Server`], binding, its public face (turns, run, drain, shutdown) |
//! | `server/turn.rs` | one turn: the poll and its timeout, dispatch, the waker, continuing budgeted work |
//! | `server/io.rs` | one connection's I/O: connect, flush, read, deliver, EOF |
//! | `server/close.rs` | settling what a callback asked, the one close path, lingering |
//! | `server/accept.rs` | listeners, the accept gate, admission (cap, per-IP, evict-idle), PROXY headers |
//! | `server/handover.rs` | the loop's side of a handover: binding from handed listeners, duplicating, releasing |
//! | `server/timers.rs` | the wheel's use: arming, expiry, the drain's schedule, periodic work, the leak self-check |
//! | `table.rs` | the slab and what a callback may touch; dialing |
//! | `conn.rs` | one connection: socket, queued output, phase, flags, its deadlines |
//! | `output.rs` | a connection's output queue: copied runs and shared buffers, one `writev` |
//! | `handler.rs` | [`Handler`] (its docs: the API's shape), [`Echo`], [`Discard`] |
//! | `context.rs` | [`Context`] and [`ConnMut`]: what a callback acts through |
//! | `remote.rs` | [`Handle`] and [`Remote`]: other threads to the loop |
//! | `group.rs` | what the loops of a [`Workers`] group share: published figures, heartbeats |
//! | `handover/mod.rs` | [`Handover`], [`HandedListener`], [`Listeners`]: listeners to a successor |
//! | `handover/plan.rs` | how handed listeners are spread over a successor's loops |
//! | `handover/tests.rs` | the handover's unit tests: descriptor checks, plans |
//! | `workers.rs` | [`Workers`]: N loops on N threads with `SO_REUSEPORT` |
//! | `admin/mod.rs` | the admin side as the loop sees it (a shell without the `admin` feature) |
//! | `admin/http.rs` | the admin endpoint's sockets: requests, answers, lingering, the workers' gather |
//! | `admin/pages.rs` | what each admin path answers: `/metrics`, `/connections`, `/livez`, `/readyz` |
//! | `token.rs` | what a `mio::Token` names; [`ConnId`] |
//! | `time.rs` | ticks and their conversion to and from instants |
//! | `alarm.rs` | the timerfd that wakes the loop for deadlines (armed only when they move earlier) |
//! | `wheel/mod.rs` | the hashed timing wheel, a plain data structure (its tests: `wheel/tests.rs`) |
//! | `limits.rs` | the fd limit and budgets, the accept gate's states, per-IP counts, the LRU |
//! | `reason.rs` | every counted outcome: [`CloseReason`], [`RejectReason`], linger ends, accept errors |
//! | `metrics.rs`, `error.rs`, `config.rs` | [`Metrics`], [`Error`], [`Config`] |
//! | `proxy_header.rs` | reading a PROXY protocol header (the `ppp` crate parses) |
//!
//! # Features
//! `admin` (default) serves `/metrics`, `/connections`, `/livez`, `/readyz` and `/health` from
//! the loop (httparse). `proxy-protocol` (default) reads PROXY protocol v1/v2 headers on
//! listeners (ppp). `cli` (default) adds the dependencies only the `sockman` binary needs: clap,
//! env_logger, signal-hook, listenfd, sd-notify, hdrhistogram, serde and serde_json, and
//! rustix's `net` and `event` (the upgrade's `SCM_RIGHTS`). With
//! `default-features = false` the library depends on mio, slab, bytes, log, socket2, rlimit and libc
//! only, and rustix on Linux (the timerfd of `alarm.rs`).
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod admin;
#[cfg(target_os = "linux")]
mod alarm;
mod config;
mod conn;
mod context;
mod error;
mod group;
mod handler;
mod handover;
mod limits;
mod metrics;
mod output;
mod proxy_header;
mod reason;
mod remote;
mod server;
mod table;
mod time;
mod token;
#[doc(hidden)]
pub mod wheel;
mod workers;

/// The shared, immutable byte buffer that [`ConnMut::write_shared`] queues without a copy (the
/// `bytes` crate's, re-exported).
pub use bytes::Bytes;
pub use config::{Config, OnFull, ProxyProtocol};
pub use context::{ConnMut, Context, Origin, SendError};
pub use error::Error;
pub use handler::{Discard, Echo, Eof, Handler, Idle};
pub use handover::{HandedListener, Handover, Listeners};
pub use limits::{FALLBACK_MAX_CONNECTIONS, FD_RESERVE};
pub use metrics::{Metrics, ACCEPT_ERROR_NAMES, LIFETIME_BUCKETS_MS, LINGER_END_NAMES};
pub use reason::{CloseReason, RejectReason};
pub use remote::{Handle, Remote, RemoteError};
pub use server::Server;
pub use table::{DialError, DialFailure};
pub use token::{ConnId, MAX_CONNECTIONS_LIMIT};
pub use workers::{RunningWorkers, Workers, WorkersHandle};
