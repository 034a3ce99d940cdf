//! The I/O of one connection as the loop drives it: a dial completing, pending output flushed,
//! reads delivered to the handler (and what followed a PROXY header), the peer's EOF.
//!
//! # Invariants
//! - Reads go into the loop's one buffer and never take more than the output cap, so echoing
//!   them back cannot overflow.
//! - Edge-triggered: a connection is read until WouldBlock, a short read (unless the peer's FIN
//!   or urgent data came with the edge), a reason to stop, or the read budget (then it is queued
//!   in `ready` and continued next turn).
//! - With [`Handler::PAUSE_READING_WHILE_PENDING`], a connection whose socket refused output
//!   (`BLOCKED`) is not read; output queued for the end of the turn does not pause reading.

use log::debug;
use mio::event::Event;

use super::Server;
use crate::conn::{flag, Phase};
use crate::context::Context;
use crate::handler::{Eof, Handler};
use crate::reason::CloseReason;
use crate::token::ConnId;

/// Readiness of one event, as the loop uses it (also built for continuing budgeted work).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Readiness {
    pub(super) readable: bool,
    pub(super) writable: bool,
    pub(super) read_closed: bool,
    pub(super) error: bool,
    /// EPOLLPRI: TCP urgent data arrived.
    pub(super) priority: bool,
}

impl Readiness {
    pub(super) fn of(event: &Event) -> Readiness {
        Readiness {
            readable: event.is_readable(),
            writable: event.is_writable(),
            read_closed: event.is_read_closed(),
            error: event.is_error(),
            priority: event.is_priority(),
        }
    }

    /// Continuing a read that a budget interrupted, or that the handler resumed.
    pub(super) const CONTINUE: Readiness = Readiness {
        readable: true,
        writable: false,
        read_closed: false,
        error: false,
        priority: false,
    };
}

/// Connections that the end-of-turn flush may write beyond twice those queued when it began
/// (output that `on_drained` or a settled close queued meanwhile).
const FLUSH_EXTRA: usize = 64;

impl<H: Handler> Server<H> {
    /// Handles readiness on a live connection: complete a dial, flush pending output, read (or,
    /// while lingering, read and discard).
    pub(super) fn drive(&mut self, key: usize, ready: Readiness) {
        match self.table.slab[key].phase {
            Phase::Header => return self.read_header(key, ready.read_closed || ready.priority),
            Phase::Lingering => return self.linger(key),
            Phase::Connecting => {
                if !self.finish_connect(key) {
                    return;
                }
            }
            Phase::Open => {}
        }
        let conn = &mut self.table.slab[key];
        let id = ConnId::new(key, conn.gen);
        if ready.read_closed {
            conn.set(flag::READ_CLOSED);
        }
        if ready.priority {
            conn.set(flag::URGENT);
        }
        let mut want_read = ready.readable || ready.read_closed || ready.error || ready.priority;
        if conn.has_pending() {
            if ready.writable || ready.error {
                match self.write_out(id) {
                    None => return,
                    // Reading was paused: data may be waiting with no new edge to announce it.
                    Some(done) => want_read |= done,
                }
            } else if H::PAUSE_READING_WHILE_PENDING && conn.is_blocked() {
                return; // reading stays paused until the output drains
            }
        }
        if want_read && self.can_read(key) {
            self.read(key);
        }
    }

    /// The end of a turn: every connection written to during the turn (by its own callbacks,
    /// by other connections' `send`, by work from other threads) writes what it has queued,
    /// in one `write` (or `writev`) each. What that runs (`on_drained`, settling a close) may
    /// queue more; it leaves in the same pass, within a budget (a handler that keeps writing
    /// to fast readers cannot hold the loop: the rest waits for the next turn, which then
    /// polls without waiting).
    pub(super) fn flush_queued(&mut self) {
        let budget = 2 * self.table.flushing.len() + FLUSH_EXTRA;
        let mut i = 0;
        while i < self.table.flushing.len() && i < budget {
            let id = self.table.flushing[i];
            i += 1;
            let Some(conn) = self.table.get(id) else {
                continue; // closed meanwhile
            };
            conn.clear(flag::FLUSH);
            // A blocked socket is written when it says it is writable, not before; one that
            // drained during the turn (a write passed the watermark) is told here.
            let queued = conn.has_pending() && !conn.has(flag::BLOCKED);
            if conn.phase == Phase::Open && (queued || conn.has(flag::DRAINED)) {
                self.write_out(id);
            }
        }
        self.table.flushing.drain(..i);
    }

    /// Writes connection `id`'s queued output (one `write`, or `writev` with shared buffers,
    /// per attempt), tells the handler if it drained below the low watermark, and settles it.
    /// Returns whether everything is out, or `None` if the connection closed (or its handler
    /// part ended).
    pub(super) fn write_out(&mut self, id: ConnId) -> Option<bool> {
        let (key, now) = (id.key(), self.table.now);
        let (conn, mut out) = self.table.outbox(key);
        let flushed = conn.flush(&mut out);
        let active = conn.last_active == now;
        if active {
            self.touch_lru(key); // write progress is activity
        }
        let done = match flushed {
            Ok(done) => done,
            Err(reason) => {
                self.close(key, reason);
                return None;
            }
        };
        let c = &self.table.slab[key];
        if done && c.graceful.is_none() && !c.has(flag::DRAINED | flag::SHUT_WANTED | flag::RESUME)
        {
            // The common case (an echo's reply): all out, and nothing waits on it (no close or
            // half-close after the flush, no drained callback, no resumed read). No deadline
            // moved either (output that was not refused has none), so there is nothing to
            // settle: measured, settling every flush cost 9 % of the CPU per echo at 5 000
            // connections.
            return Some(true);
        }
        if self.table.slab[key].has(flag::DRAINED) {
            self.table.slab[key].clear(flag::DRAINED);
            self.call(key, |h, state, ctx| h.on_drained(state, ctx))?;
        }
        self.after_callback(id).then_some(done)
    }

    /// A dialed connection's socket is ready: completes the dial, or closes it with the dial's
    /// error. Returns whether it is now open.
    pub(super) fn finish_connect(&mut self, key: usize) -> bool {
        let conn = &mut self.table.slab[key];
        let id = ConnId::new(key, conn.gen);
        // mio's recipe: on writable, `SO_ERROR` tells a failed handshake; `getpeername` failing
        // with ENOTCONN is a wakeup before the handshake completed.
        let error = match conn.stream.take_error() {
            Ok(None) => match conn.stream.peer_addr() {
                Ok(_) => None,
                Err(e) if e.kind() == std::io::ErrorKind::NotConnected => return false,
                Err(e) => Some(e),
            },
            Ok(Some(e)) | Err(e) => Some(e),
        };
        if let Some(e) = error {
            self.close(key, CloseReason::from_connect_error(&e));
            return false;
        }
        let conn = &mut self.table.slab[key];
        conn.phase = Phase::Open;
        conn.last_active = self.table.now;
        // The write-stall clock of output queued while connecting starts now.
        conn.restart_progress(self.table.now);
        self.table.metrics.connected += 1;
        self.table.metrics.connecting -= 1;
        self.push_lru(id);
        debug!("connected conn={id}");
        if self
            .call(key, |h, state, ctx| h.on_connected(state, ctx))
            .is_none()
        {
            return false;
        }
        self.after_callback(id)
    }

    /// Reads until WouldBlock, a short read (unless the peer's write side is closed: data and
    /// FIN can share one edge; or urgent data stopped the read at its mark), a reason to stop
    /// (pending output, a pause, a close), or the read budget.
    pub(super) fn read(&mut self, key: usize) {
        if self.table.slab[key].has(flag::LEFTOVER) && !self.feed_leftover(key) {
            return;
        }
        // A read never takes more than the output cap, so echoing it back cannot overflow.
        let chunk = self.buf.len().min(self.config.max_pending);
        let mut reads = 0;
        loop {
            let conn = &mut self.table.slab[key];
            let id = ConnId::new(key, conn.gen);
            match std::io::Read::read(&mut conn.stream, &mut self.buf[..chunk]) {
                Ok(0) => {
                    conn.set(flag::EOF);
                    return self.on_eof(key);
                }
                Ok(n) => {
                    if !self.deliver(key, n) {
                        return;
                    }
                    reads += 1;
                    let conn = &mut self.table.slab[key];
                    if n < chunk && !conn.has(flag::READ_CLOSED | flag::URGENT) {
                        return; // drained: the next data brings a new edge
                    }
                    if reads >= self.config.read_budget {
                        if !conn.has(flag::QUEUED) {
                            conn.set(flag::QUEUED);
                            self.ready.push(id);
                        }
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Past every urgent mark: short reads mean drained again.
                    conn.clear(flag::URGENT);
                    return;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return self.close(key, CloseReason::from_io(&e)),
            }
        }
    }

    /// Delivers what followed connection `key`'s PROXY header, in chunks like reads, while
    /// reading is not paused; keeps the rest for later. Returns whether reading may go on.
    pub(super) fn feed_leftover(&mut self, key: usize) -> bool {
        let id = ConnId::new(key, self.table.slab[key].gen);
        let Some(at) = self.leftover.iter().position(|(i, _)| *i == id) else {
            self.table.slab[key].clear(flag::LEFTOVER);
            return true;
        };
        let (_, mut bytes) = self.leftover.swap_remove(at);
        let chunk = self.buf.len().min(self.config.max_pending);
        let mut off = 0;
        while off < bytes.len() && self.can_read(key) {
            let n = (bytes.len() - off).min(chunk);
            self.buf[..n].copy_from_slice(&bytes[off..off + n]);
            off += n;
            if !self.deliver(key, n) {
                break;
            }
        }
        let Some(conn) = self.table.get(id) else {
            return false; // closed meanwhile (and its entry was taken out above)
        };
        if off < bytes.len() {
            bytes.drain(..off);
            self.leftover.push((id, bytes));
            return false;
        }
        conn.clear(flag::LEFTOVER);
        self.can_read(key)
    }

    /// Hands the first `n` bytes of the read buffer to the handler as connection `key`'s data,
    /// then settles what the callback did. Returns whether reading may go on.
    pub(super) fn deliver(&mut self, key: usize, n: usize) -> bool {
        let now = self.table.now;
        let conn = &mut self.table.slab[key];
        let id = ConnId::new(key, conn.gen);
        conn.bytes_in += n as u64;
        conn.last_active = now;
        self.table.metrics.bytes_in += n as u64;
        if conn.has(flag::DIALED) {
            self.table.metrics.dialed_bytes_in += n as u64;
        }
        self.touch_lru(key);
        let Some(mut state) = self.table.slab[key].state.take() else {
            return false;
        };
        self.handler.on_data(
            &mut state,
            &mut Context::new(&mut self.table, id),
            &self.buf[..n],
        );
        let conn = &mut self.table.slab[key];
        conn.state = Some(state);
        // The common case (a reply written whole, nothing else touched) needs no settling: no
        // deadline moved, nothing to close.
        // Output merely queued for the end of the turn needs no settling either.
        let plain = conn.is_live()
            && !conn.is_blocked()
            && !conn.has(flag::DIRTY)
            && self.table.dirty.is_empty();
        plain || (self.after_callback(id) && self.can_read(key))
    }

    /// A read returned 0: the handler decides between closing (the default, once pending
    /// output is flushed) and keeping the connection open for writing.
    pub(super) fn on_eof(&mut self, key: usize) {
        let id = ConnId::new(key, self.table.slab[key].gen);
        match self.call(key, |h, state, ctx| h.on_eof(state, ctx)) {
            None => return,
            Some(Eof::Close) => self.table.slab[key].close_gracefully(CloseReason::PeerClosed),
            Some(Eof::KeepOpen) => {}
        }
        self.after_callback(id);
    }

    /// Calls `f` with the handler, connection `key`'s state and a context for it. `None` if the
    /// connection has no state (its handler part ended).
    pub(super) fn call<R>(
        &mut self,
        key: usize,
        f: impl FnOnce(&mut H, &mut H::Conn, &mut Context<'_, H::Conn>) -> R,
    ) -> Option<R> {
        let conn = &mut self.table.slab[key];
        let id = ConnId::new(key, conn.gen);
        let mut state = conn.state.take()?;
        let r = f(
            &mut self.handler,
            &mut state,
            &mut Context::new(&mut self.table, id),
        );
        // Still there: a callback never closes a connection itself.
        self.table.slab[key].state = Some(state);
        Some(r)
    }
    /// Whether connection `key` may be read now.
    pub(super) fn can_read(&self, key: usize) -> bool {
        let c = &self.table.slab[key];
        c.phase == Phase::Open
            && c.is_live()
            && !c.has(flag::EOF | flag::READ_PAUSED)
            && !(H::PAUSE_READING_WHILE_PENDING && c.is_blocked())
    }
}
