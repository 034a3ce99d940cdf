//! What a callback acts through: [`Context`] (the current connection, every other one by
//! [`ConnId`], dialing, timers, the stop) and [`ConnMut`] (one connection, for the length of a
//! borrow). A `Context` holds the loop's table and nothing else, so this is the whole reach of
//! a callback; see [`Handler`](crate::Handler) for the shape of the API.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::conn::{flag, Conn, Ended, Phase};
use crate::reason::CloseReason;
use crate::table::{DialError, Table};
use crate::time::NEVER;
use crate::token::ConnId;

/// Whether the server accepted a connection or dialed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// Accepted on a listener.
    Accepted,
    /// Dialed with [`Context::connect`] or [`Server::connect`](crate::Server::connect).
    Dialed,
}

/// A handler's view of the loop during a callback: the current connection (write, close, who
/// it is) and, by [`ConnId`], every other one; dials; timers.
///
/// `S` is the handler's per-connection state ([`Handler::Conn`](crate::Handler::Conn)); the default `()` lets a
/// stateless handler write `Context<'_>`.
#[derive(Debug)]
pub struct Context<'a, S = ()> {
    pub(crate) table: &'a mut Table<S>,
    /// The connection the callback is about ([`ConnId::NONE`] for periodic and remote work).
    pub(crate) id: ConnId,
    /// In `on_close`: what is kept of the closed connection (an abortive close has already
    /// taken it out of the table; a lingering one is there but no longer the handler's).
    pub(crate) closed: Option<Ended>,
}

impl<'a, S> Context<'a, S> {
    pub(crate) fn new(table: &'a mut Table<S>, id: ConnId) -> Context<'a, S> {
        Context {
            table,
            id,
            closed: None,
        }
    }

    /// The current connection's slab entry, whatever its phase (closing and lingering
    /// included): what the accessors read when the connection is no longer the handler's.
    fn entry(&self) -> Option<&Conn<S>> {
        self.table
            .slab
            .get(self.id.key())
            .filter(|c| c.gen == self.id.generation())
    }

    /// The current connection's id (in `on_close`, the closed connection's).
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// The current turn's time (the loop reads the clock once per turn, or takes it from
    /// [`Server::turn_at`](crate::Server::turn_at)).
    pub fn now(&self) -> Instant {
        self.table.now_at
    }

    /// The current connection's peer address (for a dialed connection, the address dialed;
    /// in `on_close`, the closed connection's). `0.0.0.0:0` where there is no current
    /// connection (periodic and remote work).
    pub fn peer(&self) -> SocketAddr {
        match (&self.closed, self.entry()) {
            (Some(ended), _) => ended.peer,
            (None, Some(c)) => c.peer(),
            (None, None) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        }
    }

    /// The current connection, if it is still open for the handler.
    fn current(&mut self) -> Option<ConnMut<'_, S>> {
        let id = self.id;
        self.conn(id)
    }

    /// Writes `data` to the current connection (see [`ConnMut::write`]: it is copied and
    /// leaves with everything else written to the connection this turn, in one write at the
    /// end of the turn).
    ///
    /// Returns `false` if the data was not accepted: the connection is closing, its write side
    /// is shut, or the bytes copied for it would exceed
    /// [`Config::max_pending`](crate::Config::max_pending) (the connection then closes with
    /// [`CloseReason::Overflow`]).
    pub fn write(&mut self, data: &[u8]) -> bool {
        self.current().is_some_and(|mut c| c.write(data))
    }

    /// Writes a shared buffer to the current connection without copying it (see
    /// [`ConnMut::write_shared`]).
    pub fn write_shared(&mut self, data: Bytes) -> bool {
        self.current().is_some_and(|mut c| c.write_shared(data))
    }

    /// Closes the current connection once what was written so far is flushed (reason
    /// [`CloseReason::Handler`]); it then lingers (see
    /// [`Config::linger_timeout`](crate::Config::linger_timeout)). No further `on_data` calls
    /// follow.
    pub fn close(&mut self) {
        if let Some(mut c) = self.current() {
            c.close();
        }
    }

    /// Closes the current connection at once, without lingering (see [`ConnMut::close_now`]).
    pub fn close_now(&mut self) {
        if let Some(mut c) = self.current() {
            c.close_now();
        }
    }

    /// Bytes written to the current connection but not yet taken by its socket (0 in
    /// `on_close`: what was pending has been flushed or dropped).
    pub fn pending(&self) -> usize {
        match self.closed {
            Some(_) => 0,
            None => self.entry().map_or(0, |c| c.pending_len()),
        }
    }

    /// Bytes read from the current connection so far (a PROXY protocol header excluded); in
    /// `on_close`, in all. 0 where there is no current connection.
    pub fn bytes_in(&self) -> u64 {
        match (&self.closed, self.entry()) {
            (Some(ended), _) => ended.bytes_in,
            (None, Some(c)) => c.bytes_in,
            (None, None) => 0,
        }
    }

    /// Bytes the current connection's socket took so far; in `on_close`, in all. 0 where
    /// there is no current connection.
    pub fn bytes_out(&self) -> u64 {
        match (&self.closed, self.entry()) {
            (Some(ended), _) => ended.bytes_out,
            (None, Some(c)) => c.bytes_out,
            (None, None) => 0,
        }
    }

    /// How long the current connection has been open, from its accept or dial to this turn's
    /// time (to the tick); in `on_close`, its whole life. Zero where there is no current
    /// connection. What an access log writes as the duration, with [`bytes_in`](Self::bytes_in)
    /// and [`bytes_out`](Self::bytes_out), from `on_close`, at no cost to the connection before.
    pub fn age(&self) -> Duration {
        let opened = match (&self.closed, self.entry()) {
            (Some(ended), _) => ended.opened,
            (None, Some(c)) => c.opened,
            (None, None) => return Duration::ZERO,
        };
        self.table
            .clock
            .duration(self.table.now.saturating_sub(opened))
    }

    /// Whether the current connection is writable (its pending output is not above the high
    /// watermark); see [`Handler::on_drained`](crate::Handler::on_drained). `false` once it is
    /// closing (writes are refused then), in `on_close` included.
    pub fn is_writable(&self) -> bool {
        self.entry()
            .is_some_and(|c| self.closed.is_none() && c.is_live() && !c.has(flag::UNWRITABLE))
    }

    /// Whether the current connection was accepted or dialed: in every callback about it,
    /// `on_close` included (for a dial that failed too), and after the callback asked to close
    /// it. [`Origin::Accepted`] where there is no current connection (periodic and remote work).
    pub fn origin(&self) -> Origin {
        let dialed = match (&self.closed, self.entry()) {
            (Some(ended), _) => ended.dialed,
            (None, Some(c)) => c.has(flag::DIALED),
            (None, None) => false,
        };
        if dialed {
            Origin::Dialed
        } else {
            Origin::Accepted
        }
    }

    /// Arms the current connection's timer: [`Handler::on_timer`](crate::Handler::on_timer) runs `after` from now (rounded
    /// up to the tick). One timer per connection; setting it again replaces it.
    pub fn set_timer(&mut self, after: Duration) {
        if let Some(mut c) = self.current() {
            c.set_timer(after);
        }
    }

    /// Disarms the current connection's timer.
    pub fn cancel_timer(&mut self) {
        if let Some(mut c) = self.current() {
            c.cancel_timer();
        }
    }

    /// The connection `id`, if it is still open for the handler: `None` once it closed (or
    /// started closing), so a stale id can never reach the slot's next occupant.
    pub fn conn(&mut self, id: ConnId) -> Option<ConnMut<'_, S>> {
        self.table.live(id)?;
        Some(ConnMut {
            table: self.table,
            id,
            current: id == self.id,
        })
    }

    /// Writes `data` to connection `id` (see [`ConnMut::write`]).
    ///
    /// # Errors
    /// [`SendError::Gone`] if that connection is gone or closing; [`SendError::Refused`] if it
    /// did not take the data: its write side is shut ([`ConnMut::shutdown_write`]: it stays
    /// open, reading), or a write failed or its pending cap overflowed (*it* then closes, not
    /// the sender).
    pub fn send(&mut self, id: ConnId, data: &[u8]) -> Result<(), SendError> {
        let mut conn = self.conn(id).ok_or(SendError::Gone)?;
        if conn.write(data) {
            Ok(())
        } else {
            Err(SendError::Refused)
        }
    }

    /// Writes a shared buffer to connection `id` without copying it (see
    /// [`ConnMut::write_shared`]): how one message reaches many connections at the cost of
    /// one copy in memory.
    ///
    /// # Errors
    /// As [`Context::send`].
    pub fn send_shared(&mut self, id: ConnId, data: Bytes) -> Result<(), SendError> {
        let mut conn = self.conn(id).ok_or(SendError::Gone)?;
        if conn.write_shared(data) {
            Ok(())
        } else {
            Err(SendError::Refused)
        }
    }

    /// Closes connection `id` once its pending output is flushed (reason
    /// [`CloseReason::Handler`]).
    ///
    /// # Errors
    /// [`SendError::Gone`] if it is already gone or closing.
    pub fn close_conn(&mut self, id: ConnId) -> Result<(), SendError> {
        self.conn(id).ok_or(SendError::Gone)?.close();
        Ok(())
    }

    /// Asks the server to stop, as [`Handle::shutdown`](crate::Handle::shutdown) does from
    /// another thread: from now on other threads' work is refused
    /// ([`RemoteError::Stopped`](crate::RemoteError::Stopped)); at the end of this turn the
    /// loop does the work it had accepted, writes what is queued and closes every connection
    /// ([`CloseReason::Shutdown`]).
    pub fn shutdown(&mut self) {
        self.table
            .stop
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Asks the server to drain, as [`Handle::drain`](crate::Handle::drain) does from another
    /// thread; it starts at the end of this turn. A second drain only shortens the deadline.
    pub fn drain(&mut self, timeout: Duration) {
        let asked = self.table.drain_asked.get_or_insert(timeout);
        *asked = (*asked).min(timeout);
    }

    /// Dials `addr`: a nonblocking TCP connection in the same table, with `state` as its handler
    /// state from the start. [`Handler::on_connected`](crate::Handler::on_connected) runs when the handshake completes; a
    /// refused, unreachable or timed-out dial ([`Config::connect_timeout`](crate::Config::connect_timeout))
    /// ends in [`Handler::on_close`](crate::Handler::on_close) with [`CloseReason::ConnectRefused`],
    /// [`CloseReason::Unreachable`] or [`CloseReason::ConnectTimeout`]. Until connected, writes
    /// to it are kept as pending output (up to its cap).
    ///
    /// # Errors
    /// [`DialError`] (with `state` handed back) when the dial cannot start: at the connection
    /// cap (a clear error, never EMFILE), after the server stopped, or when the socket cannot
    /// be created or start connecting.
    pub fn connect(&mut self, addr: SocketAddr, state: S) -> Result<ConnId, DialError<S>> {
        self.table.dial(addr, state)
    }
}

/// Why [`Context::send`] or [`Context::close_conn`] did nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// No such open connection: it closed (or is closing), or the id is stale.
    Gone,
    /// The connection did not take the data: either its write side is shut
    /// ([`ConnMut::shutdown_write`]; it stays open and is still read), or a write failed or its
    /// pending output would have exceeded its cap (it is closing now).
    Refused,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SendError::Gone => "the connection is gone",
            SendError::Refused => "the connection did not take the data",
        })
    }
}

impl std::error::Error for SendError {}

/// One open connection, reached through [`Context::conn`] for the length of a borrow.
#[derive(Debug)]
pub struct ConnMut<'c, S> {
    table: &'c mut Table<S>,
    id: ConnId,
    /// The callback's own connection: the loop settles it after the callback anyway.
    current: bool,
}

impl<S> ConnMut<'_, S> {
    /// The connection, marked to be settled after the callback: every caller changes something
    /// the loop must act on (a close, a half-close, a pause, a timer). The callback's own
    /// connection too: a read loop that took the fast path would otherwise miss it.
    fn touch(&mut self) -> &mut crate::conn::Conn<S> {
        self.table.mark_dirty(self.id);
        &mut self.table.slab[self.id.key()]
    }

    /// This connection's id.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// The peer's address (for a dialed connection, the address dialed).
    pub fn peer(&self) -> SocketAddr {
        self.table.slab[self.id.key()].peer()
    }

    /// The local address of this connection's socket (`getsockname`: one syscall).
    ///
    /// # Errors
    /// The socket's error, e.g. for a dial that has not connected yet.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.table.slab[self.id.key()].stream.local_addr()
    }

    /// Accepted or dialed.
    pub fn origin(&self) -> Origin {
        if self.table.slab[self.id.key()].has(flag::DIALED) {
            Origin::Dialed
        } else {
            Origin::Accepted
        }
    }

    /// Whether the peer's end of stream was read (its write side is closed).
    pub fn is_eof(&self) -> bool {
        self.table.slab[self.id.key()].has(flag::EOF)
    }

    /// This connection's handler state; `None` for the connection the callback is about (its
    /// state is the callback's `conn` argument).
    pub fn state(&self) -> Option<&S> {
        self.table.slab[self.id.key()].state.as_ref()
    }

    /// This connection's handler state, mutably; `None` for the connection the callback is
    /// about.
    pub fn state_mut(&mut self) -> Option<&mut S> {
        self.table.slab[self.id.key()].state.as_mut()
    }

    /// Whether a dialed connection is still completing its handshake.
    pub fn is_connecting(&self) -> bool {
        self.table.slab[self.id.key()].phase == Phase::Connecting
    }

    /// Writes `data`: copied into this connection's queue, which leaves at the end of the turn
    /// in one write with everything else written to it this turn (at once, past the high
    /// watermark; a large write to an empty queue goes straight from `data`). Up to *this*
    /// connection's pending cap. Returns `false` if it was not taken: the connection is
    /// closing, its write side is shut, a write failed, or the cap overflowed (the connection
    /// then closes with [`CloseReason::Overflow`]).
    pub fn write(&mut self, data: &[u8]) -> bool {
        let id = self.id;
        let (conn, mut out) = self.table.outbox(id.key());
        let ok = conn.write(id, data, &mut out);
        self.settle_later(ok);
        ok
    }

    /// Writes a shared buffer without copying it: it is queued as it is (a reference count)
    /// between the bytes written before and after it, and leaves with them in one `writev`.
    /// Its bytes count in the watermarks ([`is_writable`](Self::is_writable)) and the pending
    /// gauge, but not against [`Config::max_pending`](crate::Config::max_pending), which bounds
    /// the bytes *copied* on a connection's behalf: memory for N connections sent one
    /// shared buffer stays one copy. A reader that stops reading is still ended by the write
    /// timeout. Buffers under 512 bytes are copied (cheaper than a segment of their own).
    ///
    /// Returns `false` if it was not taken (as [`write`](Self::write)).
    pub fn write_shared(&mut self, data: Bytes) -> bool {
        let id = self.id;
        let (conn, mut out) = self.table.outbox(id.key());
        let ok = conn.write_shared(id, data, &mut out);
        self.settle_later(ok);
        ok
    }

    /// After a write to another connection than the callback's own: the loop settles it if
    /// the write changed more than its queue (it failed, the socket blocked, or bytes went
    /// out now: a deadline to arm, a close to make, activity to record). Output merely queued
    /// waits for the end of the turn without any settling. (The callback's own connection is
    /// settled after the callback anyway.)
    fn settle_later(&mut self, ok: bool) {
        if !self.current {
            let c = &self.table.slab[self.id.key()];
            if !ok || c.is_blocked() || c.last_active == self.table.now {
                self.table.mark_dirty(self.id);
            }
        }
    }

    /// Bytes written but not yet taken by the socket.
    pub fn pending(&self) -> usize {
        self.table.slab[self.id.key()].pending_len()
    }

    /// Whether pending output is not above the high watermark (see [`Handler::on_drained`](crate::Handler::on_drained)).
    pub fn is_writable(&self) -> bool {
        !self.table.slab[self.id.key()].has(flag::UNWRITABLE)
    }

    /// How long since the connection last read a byte or made write progress.
    pub fn idle(&self) -> Duration {
        let c = &self.table.slab[self.id.key()];
        self.table
            .clock
            .duration(self.table.now.saturating_sub(c.last_active))
    }

    /// Closes once pending output is flushed (reason [`CloseReason::Handler`]), then lingers.
    pub fn close(&mut self) {
        self.touch().close_gracefully(CloseReason::Handler);
    }

    /// Closes at once, without lingering (reason [`CloseReason::Handler`]): what is queued gets
    /// one last nonblocking write and the rest is dropped; then the socket is closed, so the
    /// kernel sends a FIN, or a reset if input is still unread. No further callbacks but
    /// `on_close` follow.
    ///
    /// For a connection that ends because another one failed, where lingering has nothing to
    /// protect: a proxy's upstream when its client stopped reading (what the upstream still
    /// sends can go nowhere) or reset. [`close`](Self::close) is the orderly close.
    pub fn close_now(&mut self) {
        self.touch().fail(CloseReason::Handler);
    }

    /// Shuts down the write side (sends FIN) once pending output is flushed; later writes are
    /// refused. Reading goes on: a half-close, as a proxy passes a FIN on.
    pub fn shutdown_write(&mut self) {
        self.touch().set(flag::SHUT_WANTED);
    }

    /// Stops reading this connection until [`resume_reading`](Self::resume_reading): the
    /// kernel's buffers fill and TCP pushes back on the peer.
    pub fn pause_reading(&mut self) {
        self.touch().set(flag::READ_PAUSED);
    }

    /// Reads again: data that arrived meanwhile is read at the next turn, without waiting for an
    /// edge (none comes for it).
    pub fn resume_reading(&mut self) {
        let id = self.id;
        let conn = self.touch();
        if conn.has(flag::READ_PAUSED) {
            conn.clear(flag::READ_PAUSED);
            conn.set(flag::RESUME);
            // Settling queues the read; the callback's own connection is settled only if dirty.
            self.table.mark_dirty(id);
        }
    }

    /// Whether the idle timeout (and a drain's idle close) applies to this connection; on by
    /// default. A protocol that judges idleness elsewhere turns it off (a proxy's upstream
    /// side, whose client side asks [`Handler::on_idle`](crate::Handler::on_idle) for both): one wheel entry less.
    /// Write stalls, dials, timers and the drain deadline still apply.
    pub fn set_idle_timeout(&mut self, on: bool) {
        let conn = self.touch();
        if on {
            conn.clear(flag::NO_IDLE);
        } else {
            conn.set(flag::NO_IDLE);
        }
    }

    /// Arms this connection's timer: [`Handler::on_timer`](crate::Handler::on_timer) runs `after` from now.
    pub fn set_timer(&mut self, after: Duration) {
        let when =
            crate::time::deadline(self.table.now, self.table.clock.ticks(after)).min(NEVER - 1);
        let id = self.id;
        self.touch().timer = when;
        // The wheel entry may be later than the new timer: settle re-arms.
        self.table.mark_dirty(id);
    }

    /// Disarms this connection's timer (its wheel entry dies lazily).
    pub fn cancel_timer(&mut self) {
        self.touch().timer = NEVER;
    }
}
