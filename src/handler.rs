//! The protocol side: the [`Handler`] trait (its docs explain the shape of the whole API),
//! what its callbacks return ([`Eof`], [`Idle`]), and the two handlers that ship with the
//! crate, [`Echo`] and [`Discard`].

use crate::context::Context;
use crate::reason::CloseReason;

/// What to do after the peer's end of stream (see [`Handler::on_eof`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eof {
    /// Flush what is pending, then close ([`CloseReason::PeerClosed`]). The default.
    Close,
    /// Keep the connection open for writing (a half-closed TCP connection): nothing more is
    /// read; the handler closes it when it is done. Idle and write-stall deadlines still apply.
    KeepOpen,
}

/// What to do with a connection whose idle deadline passed (see [`Handler::on_idle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// Close it ([`CloseReason::IdleTimeout`]). The default.
    Close,
    /// Keep it: the idle timeout starts again from now (after writing a ping, say).
    Keep,
}

/// A protocol: what to do with connections, their bytes and their events.
///
/// Only [`on_open`](Self::on_open) and [`on_data`](Self::on_data) are required; every other
/// callback has a default that keeps the behaviour of a plain server.
///
/// The loop owns sockets, buffers, deadlines and the close path; a handler sees bytes and
/// events and decides what to write, to whom, and when to close. Its per-connection state
/// ([`Handler::Conn`]) lives in the connection's slab entry, so it costs nothing beyond its own
/// size.
///
/// # Shape of the API
/// A single-threaded, slab-indexed core wants callbacks, not futures: the loop calls the
/// handler with `&mut` access to its own state and to a [`Context`]. From the peers studied:
/// - **What a callback may touch**: its handler (`&mut self`), its connection's state (the
///   `conn` argument), and, through the [`Context`], every open connection by [`ConnId`]
///   ([`Context::conn`] → [`ConnMut`]: write, close, half-close, pause and resume reading,
///   its timer, its idle timeout; another connection's state too), dials, the turn's time,
///   and the stop. Not the poll, the listeners, the wheel or the close path: a callback
///   *marks* (a close, a shut write side, a timer) and the loop acts once it returns.
/// - **Reaching other connections** by id, as Netty's `ChannelGroup` or a libuv program keeping
///   `uv_tcp_t` pointers would, but through a generation-checked [`ConnId`]:
///   [`Context::conn`] fails for a connection that is gone, so a stale id never reaches the
///   slot's next occupant. A write to another connection obeys *its* pending cap.
/// - **Dialing** ([`Context::connect`], like `uv_tcp_connect`) puts the new connection in the
///   same slab with its handler state from the start; the handshake's end is
///   [`Handler::on_connected`], and a dial that fails (refused, unreachable, timed out) ends in
///   [`Handler::on_close`] with its own [`CloseReason`], like any other close.
/// - **Timers** are one per connection ([`Context::set_timer`] → [`Handler::on_timer`]) riding
///   the same lazy wheel entry as the idle deadline: no allocation and no wheel operation per
///   re-arm, like a `uv_timer_t` embedded in the connection. [`Handler::on_idle`] lets a
///   protocol keep an idle connection (after writing a ping), as Netty's `IdleStateHandler` does.
/// - **Output leaves once per turn.** Everything written to one connection during a turn (by
///   its own callbacks, by other connections' [`Context::send`], by work from other threads)
///   is queued and leaves at the end of the turn in one `write` (or one `writev`), as Redis
///   writes a client's replies before it sleeps: sixteen replies in a turn are one syscall,
///   and nothing waits past the turn. Output that would pass the high watermark leaves at
///   once instead, and a large write to an empty queue goes straight to the socket from the
///   caller's buffer.
/// - **Output and its bounds.** [`Context::write`] copies into the connection's buffer (reused
///   from turn to turn: no allocation in steady state); [`Config::max_pending`] bounds the
///   bytes *copied* on a connection's behalf, and a write past it closes the connection
///   ([`CloseReason::Overflow`]). [`Context::write_shared`] / [`Context::send_shared`] queue a
///   shared [`Bytes`](crate::Bytes) without a copy, not counted against that cap: one stored
///   value sent to N readers is one copy in memory, and a reply may be of any size. What
///   bounds a reader that stops reading is the write timeout
///   ([`Config::write_timeout`]: no progress of the pending output).
/// - **Writability** is a threshold with hysteresis (Netty's `channelWritabilityChanged`): a
///   connection whose pending output passes the high watermark is not writable until it falls
///   to the low one, when [`Handler::on_drained`] runs. That is how a large reply is produced
///   piece by piece as the socket drains: write while [`Context::is_writable`], continue in
///   `on_drained`.
/// - **Other threads** reach the loop through bounded queues and mio's waker
///   ([`Handle::send`](crate::Handle::send), [`Remote::run`](crate::Remote::run)). Work they
///   were told was accepted is done, even if the server is asked to stop before its turn; once
///   a stop is asked for, they are refused ([`RemoteError::Stopped`](crate::RemoteError)).
///
/// None of it costs [`Echo`] anything: its callbacks are the same two, an idle connection's
/// entry is the same size, and nothing is queued or armed unless a handler asks.
///
/// # Re-entrancy and panics
/// A callback never runs inside another. Closing a connection from a callback
/// ([`ConnMut::close`], an overflowing write to another connection) only marks it; the loop
/// closes it, and calls its `on_close`, once the callback has returned.
///
/// A handler that panics unwinds through [`Server::turn`](crate::Server::turn): on one thread
/// that stops every connection. The loop does not catch panics; make handlers total.
///
/// [`Config::max_pending`]: crate::Config::max_pending
/// [`Config::write_timeout`]: crate::Config::write_timeout
/// [`ConnMut`]: crate::ConnMut
/// [`ConnMut::close`]: crate::ConnMut::close
/// [`ConnId`]: crate::ConnId
/// [`Context::conn`]: crate::Context::conn
/// [`Context::connect`]: crate::Context::connect
/// [`Context::set_timer`]: crate::Context::set_timer
/// [`Context::send`]: crate::Context::send
/// [`Context::write`]: crate::Context::write
/// [`Context::write_shared`]: crate::Context::write_shared
/// [`Context::send_shared`]: crate::Context::send_shared
/// [`Context::is_writable`]: crate::Context::is_writable
///
/// # Examples
/// A handler that upper-cases what it receives and closes on `q`:
/// ```
/// use sockman::{CloseReason, Context, Handler};
///
/// struct Upper;
/// impl Handler for Upper {
///     type Conn = u64; // bytes seen on this connection
///     fn on_open(&mut self, ctx: &mut Context<'_, u64>) -> u64 {
///         ctx.write(b"hello\n");
///         0
///     }
///     fn on_data(&mut self, seen: &mut u64, ctx: &mut Context<'_, u64>, data: &[u8]) {
///         *seen += data.len() as u64;
///         if data.contains(&b'q') {
///             ctx.close(); // flushes what was written, then closes
///         } else {
///             ctx.write(&data.to_ascii_uppercase());
///         }
///     }
///     fn on_close(&mut self, seen: u64, ctx: &mut Context<'_, u64>, reason: CloseReason) {
///         println!("{} closed ({reason}) after {seen} bytes", ctx.id());
///     }
/// }
/// ```
pub trait Handler {
    /// Per-connection state, kept in the connection's slab entry. `()` for stateless protocols.
    type Conn;

    /// Whether a connection is not read while its socket refuses its output (the default, and
    /// the backpressure an echo or request/reply protocol wants: a peer that does not read its
    /// answers is not read either). Output merely queued for the end of the turn does not
    /// pause reading. A relay that moves bytes between two connections sets it to
    /// `false` and pauses the *source* instead ([`ConnMut::pause_reading`](crate::ConnMut::pause_reading)).
    const PAUSE_READING_WHILE_PENDING: bool = true;

    /// A connection was accepted. May write a greeting or close at once.
    fn on_open(&mut self, ctx: &mut Context<'_, Self::Conn>) -> Self::Conn;

    /// Bytes arrived. `data` borrows the loop's read buffer and is valid for this call only; it
    /// is never longer than [`Config::max_pending`](crate::Config::max_pending), so writing it
    /// back cannot overflow. Not called while reading is paused or after the connection closed.
    fn on_data(&mut self, conn: &mut Self::Conn, ctx: &mut Context<'_, Self::Conn>, data: &[u8]);

    /// A dialed connection completed its handshake; what was written while it was connecting is
    /// sent now.
    fn on_connected(&mut self, conn: &mut Self::Conn, ctx: &mut Context<'_, Self::Conn>) {
        let _ = (conn, ctx);
    }

    /// The peer closed its write side (a read returned 0). The default closes once pending
    /// output is flushed.
    fn on_eof(&mut self, conn: &mut Self::Conn, ctx: &mut Context<'_, Self::Conn>) -> Eof {
        let _ = (conn, ctx);
        Eof::Close
    }

    /// Pending output fell to the low watermark after passing the high one: the connection is
    /// writable again (see [`Config::write_high_watermark`](crate::Config::write_high_watermark)).
    fn on_drained(&mut self, conn: &mut Self::Conn, ctx: &mut Context<'_, Self::Conn>) {
        let _ = (conn, ctx);
    }

    /// The timer set with [`Context::set_timer`] is due. It is not re-armed by itself.
    fn on_timer(&mut self, conn: &mut Self::Conn, ctx: &mut Context<'_, Self::Conn>) {
        let _ = (conn, ctx);
    }

    /// The connection has been idle for [`Config::idle_timeout`](crate::Config::idle_timeout).
    /// The default closes it; [`Idle::Keep`] starts the timeout again. (During a drain idle
    /// connections close without asking.)
    fn on_idle(&mut self, conn: &mut Self::Conn, ctx: &mut Context<'_, Self::Conn>) -> Idle {
        let _ = (conn, ctx);
        Idle::Close
    }

    /// The connection is gone for `reason`: called exactly once per connection that `on_open`
    /// was called for or that was dialed. After an abortive close the socket is already closed;
    /// after a graceful one the loop still owns it while it lingers (it is no longer the
    /// handler's: [`Context::conn`] no longer finds it). `ctx` acts on the *other* connections;
    /// what it says of this one is still true ([`Context::id`], [`Context::peer`],
    /// [`Context::origin`]: "reconnect if it was dialed" works here; [`Context::bytes_in`],
    /// [`Context::bytes_out`] and [`Context::age`] give its whole life, what an access log
    /// writes), and writes to it are refused.
    fn on_close(
        &mut self,
        conn: Self::Conn,
        ctx: &mut Context<'_, Self::Conn>,
        reason: CloseReason,
    ) {
        let _ = (conn, ctx, reason);
    }

    /// Runs every [`Config::periodic`](crate::Config::periodic), on the loop, with no current
    /// connection (`ctx.id()` is [`ConnId::NONE`](crate::ConnId::NONE)): housekeeping.
    fn on_periodic(&mut self, ctx: &mut Context<'_, Self::Conn>) {
        let _ = ctx;
    }

    /// The admin endpoint's `/connections`: appends the handler's own fields for one connection
    /// to its line (e.g. ` side=client pair=3#1`; start with a space). Nothing by default.
    fn describe(&self, conn: &Self::Conn, out: &mut String) {
        let _ = (conn, out);
    }

    /// The admin endpoint's `/metrics`: appends the handler's own families in Prometheus text
    /// format (`# HELP`, `# TYPE`, samples; names should start with `sockman_`). Nothing by
    /// default.
    fn write_metrics(&self, out: &mut String) {
        let _ = out;
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
