//! What a readiness event does to a connection: completing its connect, reading and writing
//! within the budgets of [`protocol`](crate::load::protocol), and the ready queue of
//! connections that stopped at a budget with work left (no new edge would wake them).

use std::io::ErrorKind;
use std::time::Instant;

use mio::event::Event;
use mio::net::TcpStream;

use super::lifecycle::drain_read;
use super::{split_token, Engine};
use crate::load::protocol::{Conn, End, Params, Phase};

impl Engine<'_> {
    /// Handles one event; events for closed or reused slots are skipped.
    pub(super) fn dispatch(&mut self, event: &Event, now: Instant) {
        let (key, gen) = split_token(event.token());
        let Engine { slots, buf, .. } = self;
        let Some(slot) = slots.get_mut(key) else {
            return;
        };
        if slot.gen != gen {
            return;
        }
        let Some(conn) = slot.conn.as_mut() else {
            return;
        };
        if event.is_writable() {
            conn.write_blocked = false;
        }
        if conn.phase == Phase::Connecting {
            let signalled = event.is_writable()
                || event.is_error()
                || event.is_read_closed()
                || event.is_write_closed();
            if !signalled {
                return;
            }
            match finish_connect(&conn.stream) {
                Ok(false) => {}
                Ok(true) => self.connected(key, now),
                Err(kind) => self.connect_failed(key, kind, now),
            }
            return;
        }
        if conn.phase == Phase::Draining {
            if drain_read(&mut conn.stream, buf) {
                self.close(key);
            }
            return;
        }
        self.work(key, now, true);
    }

    /// Reads (if `read`) and writes on the open or held connection in slot `key`, each up to
    /// its budget; ends the connection or queues it for more as the outcome says.
    fn work(&mut self, key: usize, now: Instant, read: bool) {
        let Engine {
            slots,
            params,
            pattern,
            buf,
            stats,
            ..
        } = self;
        let Some(conn) = slots[key].conn.as_mut() else {
            return;
        };
        let was_held = conn.phase == Phase::Held;
        let was_confirmed = conn.recv > 0;
        let result = if read {
            conn.read(key, buf, pattern, params, stats, now)
        } else {
            Ok(())
        };
        let result = result.and_then(|()| conn.flush(pattern, params));
        // Counted before `end`, so that closing the connection right after balances.
        if !was_held && conn.phase == Phase::Held {
            self.n_held += 1;
        }
        if !was_confirmed && conn.recv > 0 {
            self.n_unconfirmed -= 1;
        }
        self.settle(key, result, now);
    }

    /// After work on slot `key`: ends the connection on an error, or queues it in `ready`
    /// when it stopped at a budget with work left (no readiness edge will come for that).
    fn settle(&mut self, key: usize, result: Result<(), End>, now: Instant) {
        if let Err(end) = result {
            self.end(key, end, now);
            return;
        }
        let slot = &mut self.slots[key];
        if let Some(conn) = slot.conn.as_mut() {
            if conn.has_more() && !conn.queued {
                conn.queued = true;
                self.ready.push_back((key, slot.gen));
            }
        }
    }

    /// Lets the connection in slot `key` issue messages (`issue`: [`Conn::start`] or
    /// [`Conn::issue_due`]), writes them and settles the outcome; nothing for an empty slot.
    pub(super) fn issue_and_flush(
        &mut self,
        key: usize,
        now: Instant,
        issue: impl FnOnce(&mut Conn, &Params),
    ) {
        let Engine {
            slots,
            params,
            pattern,
            ..
        } = self;
        let Some(conn) = slots[key].conn.as_mut() else {
            return;
        };
        issue(conn, params);
        let result = conn.flush(pattern, params);
        self.settle(key, result, now);
    }

    /// Resumes, once each, the connections queued in `ready` before this call, with the clock
    /// read per connection; stops at the window's end (the loop ends then).
    pub(super) fn resume_ready(&mut self) {
        for _ in 0..self.ready.len() {
            let now = Instant::now();
            if self.params.past_end(now) {
                return;
            }
            let Some((key, gen)) = self.ready.pop_front() else {
                return;
            };
            let slot = &mut self.slots[key];
            if slot.gen != gen {
                continue;
            }
            let Some(conn) = slot.conn.as_mut() else {
                continue;
            };
            conn.queued = false;
            if matches!(conn.phase, Phase::Open | Phase::Held) {
                let read = conn.read_more;
                self.work(key, now, read);
            }
        }
    }
}

/// Whether a connect signalled by an event has completed: `Ok(true)` connected, `Ok(false)`
/// still in progress (a spurious event), `Err` failed. mio's contract: check `take_error`,
/// then `peer_addr` (NotConnected means not yet).
fn finish_connect(stream: &TcpStream) -> Result<bool, ErrorKind> {
    match stream.take_error() {
        Ok(Some(e)) | Err(e) => return Err(e.kind()),
        Ok(None) => {}
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e.kind()),
    }
}
