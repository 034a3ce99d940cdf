//! The protocol side: the [`Handler`] trait, the [`Context`] it writes through, and the two
//! handlers that ship with the crate, [`Echo`] and [`Discard`].
//!
//! The loop owns sockets, buffers, deadlines and the close path; a handler only sees bytes and
//! decides what to write back. Its per-connection state ([`Handler::Conn`]) lives in the
//! connection's slab entry, so it costs nothing beyond its own size.
//!
//! A handler that panics unwinds through [`Server::turn`](crate::Server::turn): on one thread that
//! stops every connection. The loop does not catch panics; make handlers total.

use std::net::SocketAddr;

use crate::close::CloseReason;
use crate::conn::Io;
use crate::metrics::Metrics;
use crate::wheel::Tick;

/// Identifies one connection for its whole life: slab key and generation. A later connection
/// that reuses the slot gets a different id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // key#generation reads better in logs than the packed integer.
        write!(f, "{}#{}", self.0 & 0xffff_ffff, self.0 >> 32)
    }
}

/// A protocol: what to do with a connection's bytes.
///
/// # Examples
/// A handler that upper-cases what it receives and closes on `q`:
/// ```
/// use sockman::{CloseReason, ConnId, Context, Handler};
///
/// struct Upper;
/// impl Handler for Upper {
///     type Conn = u64; // bytes seen on this connection
///     fn on_open(&mut self, ctx: &mut Context<'_>) -> u64 {
///         ctx.write(b"hello\n");
///         0
///     }
///     fn on_data(&mut self, seen: &mut u64, ctx: &mut Context<'_>, data: &[u8]) {
///         *seen += data.len() as u64;
///         if data.contains(&b'q') {
///             ctx.close(); // flushes what was written, then closes
///         } else {
///             ctx.write(&data.to_ascii_uppercase());
///         }
///     }
///     fn on_close(&mut self, seen: u64, id: ConnId, reason: CloseReason) {
///         println!("{id} closed ({reason}) after {seen} bytes");
///     }
/// }
/// ```
pub trait Handler {
    /// Per-connection state, kept in the connection's slab entry. `()` for stateless protocols.
    type Conn;

    /// A connection was accepted. May write a greeting or close at once.
    fn on_open(&mut self, ctx: &mut Context<'_>) -> Self::Conn;

    /// Bytes arrived. `data` borrows the loop's read buffer and is valid for this call only.
    /// Not called while the connection has output pending (backpressure) or after it closed.
    fn on_data(&mut self, conn: &mut Self::Conn, ctx: &mut Context<'_>, data: &[u8]);

    /// The connection is gone (its socket is already closed) for `reason`. Called exactly once
    /// per connection that `on_open` was called for.
    fn on_close(&mut self, conn: Self::Conn, id: ConnId, reason: CloseReason) {
        let _ = (conn, id, reason);
    }
}

/// A handler's view of one connection during a callback: write, close, and who it is.
#[derive(Debug)]
pub struct Context<'a> {
    pub(crate) io: &'a mut Io,
    pub(crate) metrics: &'a mut Metrics,
    pub(crate) max_pending: usize,
    pub(crate) now: Tick,
    pub(crate) id: ConnId,
}

impl Context<'_> {
    /// Writes `data`: straight to the socket, and only what the socket does not take at once is
    /// kept (up to the pending-output cap). While output is pending the loop stops reading from
    /// this connection, which pushes back on the peer through TCP.
    ///
    /// Returns `false` if the data was not accepted: the connection is closing, a write failed, or
    /// the pending output would exceed the cap (the connection then closes with
    /// [`CloseReason::Overflow`]).
    pub fn write(&mut self, data: &[u8]) -> bool {
        self.io
            .write(data, self.max_pending, self.now, self.metrics)
    }

    /// Closes the connection once what was written so far is flushed (reason
    /// [`CloseReason::Handler`]). No further `on_data` calls follow.
    pub fn close(&mut self) {
        self.io.request_close(CloseReason::Handler);
    }

    /// This connection's id.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.io.peer()
    }

    /// Bytes written but not yet taken by the socket.
    pub fn pending(&self) -> usize {
        self.io.pending_len()
    }
}

/// Writes back every byte it receives. The default handler of `sockman serve`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Echo;

impl Handler for Echo {
    type Conn = ();
    fn on_open(&mut self, _ctx: &mut Context<'_>) {}
    fn on_data(&mut self, _conn: &mut (), ctx: &mut Context<'_>, data: &[u8]) {
        ctx.write(data);
    }
}

/// Reads and drops every byte (a sink, for measuring the read side alone).
#[derive(Debug, Default, Clone, Copy)]
pub struct Discard;

impl Handler for Discard {
    type Conn = ();
    fn on_open(&mut self, _ctx: &mut Context<'_>) {}
    fn on_data(&mut self, _conn: &mut (), _ctx: &mut Context<'_>, _data: &[u8]) {}
}
