//! Settling what callbacks asked, and the one close path: a graceful close flushes, shuts the
//! write side and lingers; an abortive one deregisters, closes the fd, frees the slot, runs
//! `on_close` and counts the reason, in that order.
//!
//! # Invariants
//! - [`Server::release`] is the only code that removes slab entries.
//! - A connection's handler part ends exactly once: in `close`, or at the start of its linger
//!   (`begin_linger`), each through `end_for_handler` (`on_close`, then the count).
//! - Callbacks never close connections themselves; they mark them and `settle` acts after the
//!   callback returns, so no callback runs inside another.

use std::net::Shutdown;
use std::time::Duration;

use log::{debug, trace};

use super::Server;
use crate::conn::{flag, Conn, Ended, Phase};
use crate::context::Context;
use crate::handler::Handler;
use crate::reason::{CloseReason, LingerEnd};
use crate::time::NEVER;
use crate::token::ConnId;

impl<H: Handler> Server<H> {
    /// After a callback about connection `id`: settles it, then every connection the callback
    /// touched. Returns whether `id` is still open (possibly closing after a flush).
    pub(super) fn after_callback(&mut self, id: ConnId) -> bool {
        let alive = self.settle(id);
        self.process_dirty();
        alive
            && self
                .table
                .get(id)
                .is_some_and(|c| c.phase != Phase::Lingering)
    }

    /// Settles every connection a callback marked, until none is left (a close may run
    /// `on_close`, which may mark more; each round either closes a connection or calls no
    /// handler code, so this ends).
    pub(super) fn process_dirty(&mut self) {
        while let Some(id) = self.table.dirty.pop() {
            self.settle(id);
        }
    }

    /// Acts on what a callback asked of connection `id`: close it at once (a write failed,
    /// overflow), shut its write side or close it once its output is flushed, queue a resumed
    /// read, arm its earliest deadline. Returns whether it is still open.
    pub(super) fn settle(&mut self, id: ConnId) -> bool {
        let now = self.table.now;
        let Some(conn) = self.table.get(id) else {
            return false;
        };
        conn.clear(flag::DIRTY);
        let key = id.key();
        match conn.phase {
            Phase::Lingering => return false,
            Phase::Header => {
                self.arm(key);
                return false;
            }
            _ => {}
        }
        if let Some(reason) = conn.abort {
            self.close(key, reason);
            return false;
        }
        if !conn.has_pending() {
            match conn.phase {
                Phase::Open => {
                    if conn.has(flag::SHUT_WANTED) && !conn.has(flag::SHUT_DONE) {
                        conn.set(flag::SHUT_DONE);
                        if let Err(e) = conn.stream.shutdown(Shutdown::Write) {
                            self.close(key, CloseReason::from_io(&e));
                            return false;
                        }
                    }
                    if let Some(reason) = conn.graceful {
                        self.finish_graceful(key, reason);
                        return false;
                    }
                }
                // Closed before it connected, with nothing to send: nothing to linger for.
                Phase::Connecting => {
                    if let Some(reason) = conn.graceful {
                        self.close(key, reason);
                        return false;
                    }
                }
                Phase::Lingering | Phase::Header => {}
            }
        }
        let active_now = conn.last_active == now;
        if conn.has(flag::RESUME) {
            conn.clear(flag::RESUME);
            if !conn.has(flag::QUEUED) && self.can_read(key) {
                self.table.slab[key].set(flag::QUEUED);
                self.ready.push(id);
            }
        }
        if active_now {
            self.touch_lru(key); // a write the socket took at once is activity too
        }
        self.arm(key);
        true
    }

    /// A graceful close whose output is flushed: linger if the peer may still be sending,
    /// else close now.
    pub(super) fn finish_graceful(&mut self, key: usize, reason: CloseReason) {
        let conn = &self.table.slab[key];
        if self.timers.timeouts.linger > 0 && reason.lingers() && !conn.has(flag::EOF) {
            self.begin_linger(key, reason);
        } else {
            self.close(key, reason);
        }
    }

    /// Ends the handler's part of connection `key` (`on_close`, the count) and keeps the socket
    /// to linger: its write side is shut (FIN after the queued reply) and what the peer still
    /// sends is read and discarded, so that closing never meets unread input (which would make
    /// Linux reset the connection and drop the reply still queued). Bounded by
    /// [`Config::linger_timeout`] and [`Config::linger_bytes`]; costs no buffer.
    pub(super) fn begin_linger(&mut self, key: usize, reason: CloseReason) {
        let conn = &mut self.table.slab[key];
        if !conn.has(flag::SHUT_DONE) {
            if conn.stream.shutdown(Shutdown::Write).is_err() {
                return self.close(key, reason);
            }
            conn.set(flag::SHUT_DONE);
        }
        self.forget(key);
        let now = self.table.now;
        let conn = &mut self.table.slab[key];
        let ended = conn.ended(key);
        let state = conn.state.take();
        conn.phase = Phase::Lingering;
        conn.last_active = now;
        conn.timer = 0; // bytes discarded from here on
        self.table.metrics.lingering += 1;
        self.end_for_handler(state, ended, reason, " lingering");
        let id = ended.id;
        // Input may be waiting already (reads were paused while output was pending).
        if self.table.get(id).is_some() {
            self.linger(key);
        }
    }

    /// Reads and discards on lingering connection `key`; ends the linger at the peer's EOF or
    /// an error, else arms the linger deadline. Past the byte cap it stops reading instead of
    /// closing: closing now, with input unread, would reset the connection and destroy the
    /// reply still queued; a full receive window stops the peer, and the deadline ends it.
    pub(super) fn linger(&mut self, key: usize) {
        let cap = self.config.linger_bytes;
        let conn = &mut self.table.slab[key];
        match conn.timer < cap {
            true => match conn.linger_read(&mut self.buf, cap) {
                None | Some(LingerEnd::Bytes) => self.arm(key),
                Some(end) => self.end_linger(key, end),
            },
            false => self.arm(key),
        }
    }

    /// Frees a lingering connection's socket and slot.
    pub(super) fn end_linger(&mut self, key: usize, end: LingerEnd) {
        let conn = self.release(key);
        let id = ConnId::new(key, conn.gen);
        drop(conn); // closes the fd
        self.table.metrics.lingering -= 1;
        self.table.metrics.linger_ends[end as usize] += 1;
        trace!(
            "linger ended conn={id} end={}",
            LingerEnd::NAMES[end as usize]
        );
    }

    /// The close path for a connection the handler still has: deregister, close the fd, free
    /// the slot, `on_close`, count the reason, in that order.
    pub(super) fn close(&mut self, key: usize, reason: CloseReason) {
        if matches!(reason, CloseReason::Overflow | CloseReason::WriteStall) {
            // The peer is not reading: an abortive close (RST) frees the kernel's buffers for
            // this socket now, rather than keeping them for an orphan that cannot drain.
            let _ = socket2::SockRef::from(&self.table.slab[key].stream)
                .set_linger(Some(Duration::ZERO));
        }
        if reason.keeps_output() {
            // What was queued this turn still goes out (it would have, written at once).
            let (conn, mut out) = self.table.outbox(key);
            if conn.phase == Phase::Open && conn.has_pending() && !conn.has(flag::BLOCKED) {
                let _ = conn.flush(&mut out);
            }
        }
        self.forget(key);
        let mut conn = self.release(key);
        let ended = conn.ended(key);
        let state = conn.state.take();
        if conn.phase == Phase::Connecting {
            self.table.metrics.connecting -= 1;
        }
        drop(conn); // closes the fd
        self.end_for_handler(state, ended, reason, "");
    }

    /// The end of a connection's handler part, for both ways out (`close`, `begin_linger`):
    /// `on_close` (if the handler still has its state), the count, the debug line (`note` is
    /// appended to it), then whatever `on_close` marked is settled.
    fn end_for_handler(
        &mut self,
        state: Option<H::Conn>,
        ended: Ended,
        reason: CloseReason,
        note: &str,
    ) {
        let Ended { id, peer, .. } = ended;
        let lifetime_us = self
            .table
            .clock
            .micros(self.table.now.saturating_sub(ended.opened));
        if let Some(state) = state {
            let mut ctx = Context::new(&mut self.table, id);
            ctx.closed = Some(ended);
            self.handler.on_close(state, &mut ctx, reason);
        }
        self.table
            .metrics
            .count_close(reason, ended.dialed, lifetime_us);
        debug!(
            "closed conn={id} peer={peer} reason={reason} bytes_in={} bytes_out={} age_ms={}{note}",
            ended.bytes_in,
            ended.bytes_out,
            lifetime_us / 1000
        );
        self.process_dirty();
    }

    /// Removes connection `key` from the poll and the slab (the only code that removes slab
    /// entries) and returns it; dropping it closes the fd.
    pub(super) fn release(&mut self, key: usize) -> Conn<H::Conn> {
        let conn = &mut self.table.slab[key];
        // mio's contract: deregister before the source is dropped.
        if let Err(e) = self.table.poll.registry().deregister(&mut conn.stream) {
            trace!("deregister key={key}: {e}");
        }
        let mut conn = self.table.slab.remove(key);
        self.table.give_back();
        if conn.has(flag::LEFTOVER) {
            let id = ConnId::new(key, conn.gen);
            self.leftover.retain(|(i, _)| *i != id);
        }
        if conn.scheduled != NEVER {
            self.timers.stale += 1; // its wheel entry dies lazily
        }
        if conn.phase == Phase::Header {
            conn.take_header_bytes(); // input, not pending output
            self.table.metrics.awaiting_header -= 1;
        } else {
            conn.discard_pending(&mut self.table.outbox_only());
        }
        // A descriptor came free: a paused accept resumes this turn.
        self.accept.gate.on_close();
        conn
    }
}
