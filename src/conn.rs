//! One connection as the slab holds it: its socket, the unsent remainder of its output, its
//! phase and flags, its time stamps and byte counts, and the handler's state.
//!
//! This module writes, flushes and (while lingering) drains a socket and reports progress or a
//! [`CloseReason`]; it never touches the poll, the wheel, the slab or other connections (the
//! server does). Its one decision is [`Conn::deadline`]: which of the connection's deadlines is
//! next.
//!
//! # Lifecycle
//! `Connecting` (dialed, until the handshake completes) → `Open` → `Lingering` (graceful close:
//! write side shut, input discarded until EOF) → gone. Every phase lives in the same slab entry
//! and ends in the server's one close path.
//!
//! # Memory
//! An idle connection owns no buffer: its whole userspace cost is this struct (96 bytes with a
//! stateless handler, checked by a test) and one 16-byte wheel entry.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use mio::net::TcpStream;

use crate::metrics::Metrics;
use crate::output::{Output, Status, COPY_SHARED_BELOW, KEEP_CAPACITY};
use crate::reason::{CloseReason, LingerEnd};
use crate::time::{Tick, NEVER};
use crate::token::ConnId;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Accepted on a PROXY protocol listener; the header has not been read yet. Not the
    /// handler's (no `on_open` yet); a partial header is kept where pending output would be.
    Header,
    /// Dialed; the handshake has not completed. Writes are kept as pending output.
    Connecting,
    /// Connected: read and written for the handler.
    Open,
    /// Closed for the handler (its `on_close` ran); the write side is shut and the loop reads
    /// and discards until the peer's EOF, the linger deadline or the byte cap.
    Lingering,
}

/// Flag bits of [`Conn::flags`]: one byte-sized field instead of a `bool` each.
pub(crate) mod flag {
    /// The event said the peer's write side is closed: read past short reads until 0.
    pub(crate) const READ_CLOSED: u16 = 1 << 0;
    /// Already in the loop's list of connections a read budget (or a resume) left with work.
    pub(crate) const QUEUED: u16 = 1 << 1;
    /// Priority readiness (TCP urgent data): `recv` stops at the urgent mark, so a short read
    /// is not "drained" until a read would block.
    pub(crate) const URGENT: u16 = 1 << 2;
    /// A read returned 0 (the peer's FIN): nothing more will be read.
    pub(crate) const EOF: u16 = 1 << 3;
    /// The handler paused reading.
    pub(crate) const READ_PAUSED: u16 = 1 << 4;
    /// Shut down the write side once pending output is flushed.
    pub(crate) const SHUT_WANTED: u16 = 1 << 5;
    /// The write side is shut down.
    pub(crate) const SHUT_DONE: u16 = 1 << 6;
    /// Pending output went above the high watermark and has not yet fallen to the low one.
    pub(crate) const UNWRITABLE: u16 = 1 << 7;
    /// Dialed by the server (else accepted).
    pub(crate) const DIALED: u16 = 1 << 8;
    /// Already in the loop's list of connections to settle after a callback.
    pub(crate) const DIRTY: u16 = 1 << 9;
    /// The handler is to be told that pending output fell to the low watermark.
    pub(crate) const DRAINED: u16 = 1 << 10;
    /// The handler resumed reading: read at once, without waiting for an edge.
    pub(crate) const RESUME: u16 = 1 << 11;
    /// Bytes that came after the PROXY header wait in the loop's leftover list.
    pub(crate) const LEFTOVER: u16 = 1 << 12;
    /// The idle timeout does not apply (the handler said so).
    pub(crate) const NO_IDLE: u16 = 1 << 13;
    /// The socket would not take all of the queued output: it waits for writability (and
    /// the write-stall deadline runs); reading is paused with
    /// [`Handler::PAUSE_READING_WHILE_PENDING`](crate::Handler::PAUSE_READING_WHILE_PENDING).
    pub(crate) const BLOCKED: u16 = 1 << 14;
    /// Already in the table's list of connections whose output leaves at the end of the turn.
    pub(crate) const FLUSH: u16 = 1 << 15;
}

/// What a write needs besides the connection: the limits, this turn's tick, the counters, the
/// loop's spare output buffers (so that a connection's output allocates nothing in steady
/// state) and the list of connections whose output leaves at the end of the turn. Borrowed
/// from the table for one write.
#[derive(Debug)]
pub(crate) struct Outbox<'a> {
    pub(crate) limits: OutputLimits,
    pub(crate) now: Tick,
    pub(crate) metrics: &'a mut Metrics,
    #[allow(
        clippy::vec_box,
        reason = "the boxes are what is reused: a connection holds one"
    )]
    pub(crate) spare: &'a mut Vec<Box<Output>>,
    pub(crate) flushing: &'a mut Vec<ConnId>,
}

/// Spare output buffers the loop keeps for reuse at most. Every connection written to in a
/// turn holds one until the end-of-turn flush, so the loop needs as many as connections it
/// writes to in one turn (one per event of a full poll, and then some) for the echo path to
/// allocate nothing; the first [`LARGE_SPARES`] keep up to
/// [`KEEP_CAPACITY`](crate::output::KEEP_CAPACITY) of buffer, the rest
/// [`SMALL_SPARE_CAPACITY`]: at most 4 + 4 MiB held in all.
const SPARE_OUTPUTS: usize = 1024;
/// Spares that keep a large buffer (for the connections that stream).
const LARGE_SPARES: usize = 64;
/// Buffer capacity the other spares keep.
const SMALL_SPARE_CAPACITY: usize = 4096;

impl Outbox<'_> {
    fn take(&mut self) -> Box<Output> {
        let mut o = self.spare.pop().unwrap_or_default();
        o.last_progress = self.now;
        o
    }

    fn give_back(&mut self, mut o: Box<Output>) {
        let keep = match self.spare.len() {
            n if n < LARGE_SPARES => KEEP_CAPACITY,
            n if n < SPARE_OUTPUTS => SMALL_SPARE_CAPACITY,
            _ => return, // dropped: the loop keeps enough
        };
        o.clear(keep);
        self.spare.push(o);
    }
}

/// Limits on a connection's output, from the configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutputLimits {
    /// Pending output beyond this closes the connection (`Overflow`).
    pub(crate) max_pending: usize,
    /// Above this the connection is not writable...
    pub(crate) high: usize,
    /// ...until pending output falls to this.
    pub(crate) low: usize,
}

/// The deadlines a connection can have, in ticks (`None` = off).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub(crate) idle: Option<Tick>,
    pub(crate) write: Option<Tick>,
    pub(crate) connect: Option<Tick>,
    pub(crate) linger: Tick,
    /// The PROXY protocol header must be complete this long after the accept.
    pub(crate) header: Tick,
    /// Accepted connections close gracefully this long after the accept, give or take
    /// `jitter` (spread per connection, so that a fleet does not reconnect at once).
    pub(crate) lifetime: Option<Tick>,
    pub(crate) jitter: Tick,
    /// An accepted connection that has sent nothing this long after the accept is closed.
    pub(crate) first_byte: Option<Tick>,
}

impl Timeouts {
    /// The lifetime of the connection with generation `gen`: `lifetime ± jitter`, spread by a
    /// hash of the generation (deterministic, so that re-computing a deadline never moves it).
    fn lifetime_of(&self, gen: u64) -> Option<Tick> {
        let base = self.lifetime?;
        if self.jitter == 0 {
            return Some(base);
        }
        // A multiplicative hash spreads consecutive generations over the whole range.
        let h = gen.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
        let spread = 2 * self.jitter + 1;
        Some((base + h % spread).saturating_sub(self.jitter).max(1))
    }
}

/// What a deadline that came due means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    /// No activity for the idle timeout.
    Idle,
    /// Pending output made no progress for the write timeout.
    WriteStall,
    /// A dial did not complete in time.
    Connect,
    /// The handler's timer.
    Timer,
    /// The linger deadline.
    Linger,
    /// The PROXY protocol header did not arrive in time.
    Header,
    /// The connection reached its maximum lifetime.
    Lifetime,
    /// An accepted connection sent nothing within the first-byte timeout.
    FirstByte,
}

/// What the loop keeps of a connection whose handler part ends, for `on_close` and the log.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ended {
    pub(crate) id: ConnId,
    pub(crate) peer: SocketAddr,
    pub(crate) dialed: bool,
    pub(crate) opened: Tick,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
}

/// A connection in the slab.
///
/// `T` is the socket's type, always mio's `TcpStream` but in the size test: that one carries
/// a selector id in debug builds (16 bytes instead of a 4-byte fd), which would skew the layout
/// measured, so the test measures `Conn` over std's `TcpStream`, the same 4 bytes as mio's in
/// a release build.
#[derive(Debug)]
pub(crate) struct Conn<S, T = TcpStream> {
    pub(crate) stream: T,
    /// This connection's generation, all 64 bits (see `token`).
    pub(crate) gen: u64,
    /// Output queued and not yet written, if any (boxed: a connection without any pays one
    /// pointer).
    out: Option<Box<Output>>,
    /// The peer's address, kept as IP and port: a `SocketAddr` is 32 bytes (IPv6 flow info and
    /// scope id), this is 19, and an idle connection's whole cost is this struct.
    peer_ip: IpAddr,
    peer_port: u16,
    pub(crate) phase: Phase,
    /// [`flag`] bits.
    pub(crate) flags: u16,
    /// Close at once with this reason (a write failed, output overflowed).
    pub(crate) abort: Option<CloseReason>,
    /// Close with this reason once pending output is flushed (peer FIN, handler close, drain).
    pub(crate) graceful: Option<CloseReason>,
    /// Tick of the last activity (bytes read or write progress); while lingering, when the
    /// linger began. Activity only stamps this; the wheel entry is re-armed lazily.
    pub(crate) last_active: Tick,
    /// Tick of this connection's one wheel entry, or [`NEVER`]. A fired entry whose `when`
    /// differs was superseded by an earlier one and is dropped.
    pub(crate) scheduled: Tick,
    pub(crate) opened: Tick,
    /// While open: the handler's timer ([`NEVER`] = none). While lingering: bytes discarded
    /// (the handler's timer is gone with its state, so the field is free to count them).
    pub(crate) timer: Tick,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    /// The handler's state: `None` only while it is lent to a callback, or once the handler's
    /// part has ended (lingering).
    pub(crate) state: Option<S>,
}

impl<S> Conn<S> {
    pub(crate) fn new(
        stream: TcpStream,
        peer: SocketAddr,
        gen: u64,
        phase: Phase,
        now: Tick,
    ) -> Conn<S> {
        Conn {
            stream,
            gen,
            out: None,
            peer_ip: peer.ip(),
            peer_port: peer.port(),
            phase,
            flags: if phase == Phase::Connecting {
                flag::DIALED
            } else {
                0
            },
            abort: None,
            graceful: None,
            last_active: now,
            scheduled: NEVER,
            opened: now,
            timer: NEVER,
            bytes_in: 0,
            bytes_out: 0,
            state: None,
        }
    }

    /// What is kept of this connection (slab key `key`) once its handler part ends.
    pub(crate) fn ended(&self, key: usize) -> Ended {
        Ended {
            id: ConnId::new(key, self.gen),
            peer: self.peer(),
            dialed: self.has(flag::DIALED),
            opened: self.opened,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
        }
    }

    pub(crate) fn has(&self, f: u16) -> bool {
        self.flags & f != 0
    }

    pub(crate) fn set(&mut self, f: u16) {
        self.flags |= f;
    }

    pub(crate) fn clear(&mut self, f: u16) {
        self.flags &= !f;
    }

    pub(crate) fn peer(&self) -> SocketAddr {
        SocketAddr::new(self.peer_ip, self.peer_port)
    }

    /// Replaces the peer (the client address a PROXY protocol header carries).
    pub(crate) fn set_peer(&mut self, peer: SocketAddr) {
        self.peer_ip = peer.ip();
        self.peer_port = peer.port();
    }

    /// While in [`Phase::Header`]: the partial header read so far.
    pub(crate) fn header_bytes(&self) -> usize {
        self.out.as_ref().map_or(0, |o| o.len())
    }

    /// While in [`Phase::Header`]: keeps `data` as the partial header (no output exists yet, so
    /// the output box is free to hold it; it is not counted as pending output).
    pub(crate) fn set_header_bytes(&mut self, data: &[u8]) {
        debug_assert_eq!(self.phase, Phase::Header);
        self.out.get_or_insert_with(Box::default).push_copy(data);
    }

    /// Leaves [`Phase::Header`]: the partial header, without touching the output gauge.
    pub(crate) fn take_header_bytes(&mut self) -> Vec<u8> {
        debug_assert_eq!(self.phase, Phase::Header);
        self.out
            .take()
            .map_or_else(Vec::new, |mut o| o.take_copied())
    }

    /// Bytes queued and not yet taken by the socket (copied and shared).
    pub(crate) fn pending_len(&self) -> usize {
        self.out.as_ref().map_or(0, |o| o.len())
    }

    /// Whether output is queued (this turn's, or what the socket would not take).
    pub(crate) fn has_pending(&self) -> bool {
        self.out.is_some()
    }

    /// Whether the socket would not take all of the queued output (it waits for writability).
    pub(crate) fn is_blocked(&self) -> bool {
        self.out.is_some() && self.has(flag::BLOCKED)
    }

    /// Open for the handler: neither closing nor closed (nor waiting for its PROXY header).
    pub(crate) fn is_live(&self) -> bool {
        !matches!(self.phase, Phase::Lingering | Phase::Header)
            && self.abort.is_none()
            && self.graceful.is_none()
    }

    /// Asks for a close after the pending output is flushed; the first reason wins.
    pub(crate) fn close_gracefully(&mut self, reason: CloseReason) {
        if self.graceful.is_none() {
            self.graceful = Some(reason);
        }
    }

    /// Marks the connection to close at once; the first reason wins.
    pub(crate) fn fail(&mut self, reason: CloseReason) -> bool {
        self.abort.get_or_insert(reason);
        false
    }

    /// Queues a copy of `data` for connection `id` (this one): it leaves with everything else
    /// written to the connection this turn, in one write at the end of the turn (the table's
    /// `flushing` list). Output that would pass the high watermark leaves at once instead:
    /// what is queued first, then `data` straight from the caller's buffer (no copy) if nothing
    /// is left queued; only what the socket does not take is kept. See
    /// [`Context::write`](crate::Context::write).
    ///
    /// Returns `false` if it was refused: closing, write side shut, or the copied bytes would
    /// pass `max_pending` (the connection is then marked to close with `Overflow`).
    pub(crate) fn write(&mut self, id: ConnId, data: &[u8], out: &mut Outbox<'_>) -> bool {
        if !self.is_live() || self.has(flag::SHUT_WANTED) {
            return false;
        }
        let data = match self.write_now(id, data, out) {
            Ok(rest) => rest,
            Err(reason) => return self.fail(reason),
        };
        if data.is_empty() {
            return true;
        }
        if self.copied_len() + data.len() > out.limits.max_pending {
            return self.fail(CloseReason::Overflow);
        }
        let o = match &mut self.out {
            Some(o) => o,
            None => self.out.insert(out.take()),
        };
        o.push_copy(data);
        out.metrics.pending_bytes += data.len() as u64;
        self.after_queue(id, out);
        true
    }

    /// Queues a shared buffer for connection `id` without copying it (a small one is copied):
    /// as [`write`](Self::write), but its bytes do not count against `max_pending` (they are
    /// the caller's, shared); they count in the watermarks and the pending gauge.
    pub(crate) fn write_shared(&mut self, id: ConnId, data: Bytes, out: &mut Outbox<'_>) -> bool {
        if data.len() < COPY_SHARED_BELOW {
            return self.write(id, &data, out);
        }
        if !self.is_live() || self.has(flag::SHUT_WANTED) {
            return false;
        }
        let taken = match self.write_now(id, &data, out) {
            Ok(rest) => data.len() - rest.len(),
            Err(reason) => return self.fail(reason),
        };
        if taken == data.len() {
            return true;
        }
        let data = data.slice(taken..);
        if data.len() < COPY_SHARED_BELOW {
            // A small remainder is copied like any small write, under the cap.
            return self.write(id, &data, out);
        }
        let o = match &mut self.out {
            Some(o) => o,
            None => self.out.insert(out.take()),
        };
        out.metrics.pending_bytes += data.len() as u64;
        o.push_shared(data);
        self.after_queue(id, out);
        true
    }

    /// When `data` would take an open connection's output past the high watermark, writes now:
    /// what is queued, then `data` itself if nothing is left queued. Returns the part of `data`
    /// still to queue (all of it below the watermark, or while connecting or blocked).
    fn write_now<'d>(
        &mut self,
        id: ConnId,
        data: &'d [u8],
        out: &mut Outbox<'_>,
    ) -> Result<&'d [u8], CloseReason> {
        if self.phase != Phase::Open
            || self.has(flag::BLOCKED)
            || self.pending_len() + data.len() <= out.limits.high
        {
            return Ok(data);
        }
        if self.out.is_some() {
            let all_out = self.flush(out)?;
            if self.has(flag::DRAINED) && !self.has(flag::FLUSH) {
                // It was unwritable (output queued while it connected) and no longer is: the
                // end-of-turn pass tells the handler (`on_drained`), as a writable event would.
                self.set(flag::FLUSH);
                out.flushing.push(id);
            }
            if !all_out {
                return Ok(data);
            }
        }
        let n = self.write_through(data, out)?;
        Ok(&data[n..])
    }

    /// After output was queued: an open connection that the socket is not blocking leaves it
    /// for the end of the turn (put on the list once); then the writability threshold.
    fn after_queue(&mut self, id: ConnId, out: &mut Outbox<'_>) {
        if self.phase == Phase::Open && !self.has(flag::BLOCKED | flag::FLUSH) {
            self.set(flag::FLUSH);
            out.flushing.push(id);
        }
        if self.pending_len() > out.limits.high {
            self.set(flag::UNWRITABLE);
        }
    }

    /// Writes `data` straight to the socket (nothing is queued before it); returns how much it
    /// took. A socket that would block with data left is [`flag::BLOCKED`].
    fn write_through(&mut self, data: &[u8], out: &mut Outbox<'_>) -> Result<usize, CloseReason> {
        let mut off = 0;
        let mut result = Ok(());
        while off < data.len() {
            out.metrics.write_calls += 1;
            match self.stream.write(&data[off..]) {
                Ok(0) => {
                    result = Err(CloseReason::Io(io::ErrorKind::WriteZero));
                    break;
                }
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.set(flag::BLOCKED);
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    result = Err(CloseReason::from_io(&e));
                    break;
                }
            }
        }
        self.wrote(off, out);
        result.map(|()| off)
    }

    /// Counts `n` bytes written: the connection's and the loop's totals, and activity.
    fn wrote(&mut self, n: usize, out: &mut Outbox<'_>) {
        if n > 0 {
            self.bytes_out += n as u64;
            out.metrics.bytes_out += n as u64;
            if self.has(flag::DIALED) {
                out.metrics.dialed_bytes_out += n as u64;
            }
            self.last_active = out.now; // write progress is activity
        }
    }

    /// Bytes queued that were copied into this connection's buffer.
    fn copied_len(&self) -> usize {
        self.out.as_ref().map_or(0, |o| o.copied())
    }

    /// Writes queued output until the socket would block: one `write` (or `writev`, with
    /// shared buffers) per attempt. Returns whether everything is out; a drained output goes
    /// back to the loop's spares. Sets [`flag::BLOCKED`] when the socket would block with
    /// output left, and [`flag::DRAINED`] when an unwritable connection falls to the low
    /// watermark.
    ///
    /// # Errors
    /// The reason to close with when a write fails.
    pub(crate) fn flush(&mut self, out: &mut Outbox<'_>) -> Result<bool, CloseReason> {
        let Some(o) = self.out.as_mut() else {
            self.clear(flag::BLOCKED);
            return Ok(true);
        };
        let wrote = o.write_to(&mut self.stream);
        out.metrics.write_calls += wrote.calls;
        if wrote.bytes > 0 {
            o.last_progress = out.now;
            out.metrics.pending_bytes -= wrote.bytes as u64;
        }
        let left = o.len();
        self.wrote(wrote.bytes, out);
        match wrote.status {
            Status::Done => self.clear(flag::BLOCKED),
            Status::Blocked => self.set(flag::BLOCKED),
            Status::Failed(e) => return Err(CloseReason::from_io(&e)),
        }
        if left == 0 {
            if let Some(o) = self.out.take() {
                out.give_back(o);
            }
        }
        if self.has(flag::UNWRITABLE) && left <= out.limits.low {
            self.clear(flag::UNWRITABLE);
            self.set(flag::DRAINED);
        }
        Ok(left == 0)
    }

    /// Restarts the write-stall clock (a dial's queued output has just become writable).
    pub(crate) fn restart_progress(&mut self, now: Tick) {
        if let Some(o) = &mut self.out {
            o.last_progress = now;
        }
    }

    /// Drops queued output (the connection is closing), keeping the gauge exact.
    pub(crate) fn discard_pending(&mut self, out: &mut Outbox<'_>) {
        if let Some(o) = self.out.take() {
            out.metrics.pending_bytes -= o.len() as u64;
            out.give_back(o);
        }
    }

    /// Reads and discards while lingering, into `buf`, until the read would block (`None`),
    /// or the linger ends. `cap` bounds the bytes discarded over the whole linger.
    pub(crate) fn linger_read(&mut self, buf: &mut [u8], cap: u64) -> Option<LingerEnd> {
        loop {
            match self.stream.read(buf) {
                Ok(0) => return Some(LingerEnd::Eof),
                Ok(n) => {
                    self.timer += n as u64;
                    if self.timer >= cap {
                        return Some(LingerEnd::Bytes);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Some(LingerEnd::Error),
            }
        }
    }

    /// The earliest deadline this connection has, and what it means. Each is a stamp plus its
    /// timeout plus one: the `+ 1` makes up for stamps being rounded down to their tick, so
    /// nothing fires before its full timeout.
    pub(crate) fn deadline(&self, t: &Timeouts) -> Option<(Tick, Due)> {
        let after = crate::time::deadline;
        let mut best: Option<(Tick, Due)> = None;
        let mut offer = |when: Tick, due: Due| {
            if best.is_none_or(|(b, _)| when < b) {
                best = Some((when, due));
            }
        };
        match self.phase {
            Phase::Header => return Some((after(self.opened, t.header), Due::Header)),
            Phase::Lingering => offer(after(self.last_active, t.linger), Due::Linger),
            Phase::Connecting => {
                if let Some(c) = t.connect {
                    offer(after(self.opened, c), Due::Connect);
                }
            }
            Phase::Open => {
                if let (Some(idle), false) = (t.idle, self.has(flag::NO_IDLE)) {
                    offer(after(self.last_active, idle), Due::Idle);
                }
                if !self.has(flag::DIALED) {
                    if let Some(life) = t.lifetime_of(self.gen) {
                        // Once its graceful close is under way, the lifetime is spent.
                        if self.graceful.is_none() {
                            offer(after(self.opened, life), Due::Lifetime);
                        }
                    }
                    if let (Some(fb), 0) = (t.first_byte, self.bytes_in) {
                        offer(after(self.opened, fb), Due::FirstByte);
                    }
                }
            }
        }
        if self.phase != Phase::Lingering {
            // A dial's queued output cannot stall before the handshake: the connect timeout
            // bounds that phase.
            // Output waiting for the end of the turn is not stalled: only output the socket
            // would not take.
            if let (Some(w), Some(o), Phase::Open, true) =
                (t.write, &self.out, self.phase, self.has(flag::BLOCKED))
            {
                offer(after(o.last_progress, w), Due::WriteStall);
            }
            if self.timer != NEVER {
                offer(self.timer, Due::Timer);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    /// An idle connection's userspace cost is its slab entry: keep it small (the target is
    /// <= 128 B per idle connection in all, wheel entry included; see BENCHMARKS.md).
    #[test]
    fn idle_connection_entry_stays_small() {
        // Over std's `TcpStream`: the release layout in every build (see `Conn`).
        type Entry<S> = super::Conn<S, std::net::TcpStream>;
        if !cfg!(debug_assertions) {
            assert_eq!(
                std::mem::size_of::<Entry<()>>(),
                std::mem::size_of::<super::Conn<()>>(),
                "the stand-in socket is not the size of mio's in a release build"
            );
        }
        let entry = std::mem::size_of::<Entry<()>>();
        assert!(entry <= 96, "Conn<()> grew to {entry} bytes");
        // Handler state that has a niche costs nothing more than its own size.
        let with_id = std::mem::size_of::<Entry<crate::ConnId>>();
        assert!(with_id <= 104, "Conn<ConnId> is {with_id} bytes");
    }
}
