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

use mio::net::TcpStream;

use crate::metrics::Metrics;
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
}

/// Output the socket did not take yet. Boxed so that a connection without pending output pays
/// one pointer for it, not a `Vec` header plus counters.
#[derive(Debug)]
pub(crate) struct Pending {
    buf: Vec<u8>,
    /// Bytes of `buf` already written.
    off: usize,
    /// Tick of the last write progress: the write-stall deadline counts from here.
    last_progress: Tick,
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
    /// Unsent output, if any.
    pending: Option<Box<Pending>>,
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
            pending: None,
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
    pub(crate) fn header_bytes(&self) -> &[u8] {
        self.pending.as_ref().map_or(&[], |p| &p.buf)
    }

    /// While in [`Phase::Header`]: keeps `data` as the partial header (no output exists yet, so
    /// the pending box is free to hold it; it is not counted as pending output).
    pub(crate) fn set_header_bytes(&mut self, data: Vec<u8>) {
        debug_assert_eq!(self.phase, Phase::Header);
        self.pending = Some(Box::new(Pending {
            buf: data,
            off: 0,
            last_progress: 0,
        }));
    }

    /// Leaves [`Phase::Header`]: drops the partial header without touching the output gauge.
    pub(crate) fn take_header_bytes(&mut self) -> Vec<u8> {
        debug_assert_eq!(self.phase, Phase::Header);
        self.pending.take().map_or_else(Vec::new, |p| p.buf)
    }

    pub(crate) fn pending_len(&self) -> usize {
        self.pending.as_ref().map_or(0, |p| p.buf.len() - p.off)
    }

    pub(crate) fn has_pending(&self) -> bool {
        self.pending.is_some()
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

    /// Writes `data` straight to the socket and keeps only what it did not take (while
    /// connecting, keeps all of it). See [`Context::write`](crate::Context::write).
    pub(crate) fn write(
        &mut self,
        data: &[u8],
        limits: &OutputLimits,
        now: Tick,
        metrics: &mut Metrics,
    ) -> bool {
        if !self.is_live() || self.has(flag::SHUT_WANTED) {
            return false;
        }
        let mut off = 0;
        if self.pending.is_none() && self.phase == Phase::Open {
            while off < data.len() {
                match self.stream.write(&data[off..]) {
                    Ok(0) => return self.fail(CloseReason::Io(io::ErrorKind::WriteZero)),
                    Ok(n) => off += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return self.fail(CloseReason::from_io(&e)),
                }
            }
            self.bytes_out += off as u64;
            metrics.bytes_out += off as u64;
            if off > 0 {
                self.last_active = now; // write progress is activity
            }
            if off == data.len() {
                return true;
            }
        }
        let rest = &data[off..];
        let pending = self.pending_len() + rest.len();
        if pending > limits.max_pending {
            return self.fail(CloseReason::Overflow);
        }
        if pending > limits.high {
            self.set(flag::UNWRITABLE);
        }
        let p = self.pending.get_or_insert_with(|| {
            Box::new(Pending {
                buf: Vec::with_capacity(rest.len()),
                off: 0,
                last_progress: now,
            })
        });
        p.buf.extend_from_slice(rest);
        metrics.pending_bytes += rest.len() as u64;
        true
    }

    /// Writes pending output until the socket would block. Returns whether everything is out.
    /// Sets [`flag::DRAINED`] when an unwritable connection falls to the low watermark.
    ///
    /// # Errors
    /// The reason to close with when a write fails.
    pub(crate) fn flush(
        &mut self,
        limits: &OutputLimits,
        now: Tick,
        metrics: &mut Metrics,
    ) -> Result<bool, CloseReason> {
        let Some(p) = self.pending.as_mut() else {
            return Ok(true);
        };
        let start = p.off;
        let result = loop {
            if p.off == p.buf.len() {
                break Ok(());
            }
            match self.stream.write(&p.buf[p.off..]) {
                Ok(0) => break Err(CloseReason::Io(io::ErrorKind::WriteZero)),
                Ok(n) => p.off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(CloseReason::from_io(&e)),
            }
        };
        let written = (p.off - start) as u64;
        let left = p.buf.len() - p.off;
        if written > 0 {
            p.last_progress = now;
            self.last_active = now;
            self.bytes_out += written;
            metrics.bytes_out += written;
            metrics.pending_bytes -= written;
        }
        result?;
        if left == 0 {
            self.pending = None;
        }
        if self.has(flag::UNWRITABLE) && left <= limits.low {
            self.clear(flag::UNWRITABLE);
            self.set(flag::DRAINED);
        }
        Ok(left == 0)
    }

    /// Restarts the write-stall clock (a dial's queued output has just become writable).
    pub(crate) fn restart_progress(&mut self, now: Tick) {
        if let Some(p) = &mut self.pending {
            p.last_progress = now;
        }
    }

    /// Drops pending output (the connection is closing), keeping the gauge exact.
    pub(crate) fn discard_pending(&mut self, metrics: &mut Metrics) {
        metrics.pending_bytes -= self.pending_len() as u64;
        self.pending = None;
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
            if let (Some(w), Some(p), Phase::Open) = (t.write, &self.pending, self.phase) {
                offer(after(p.last_progress, w), Due::WriteStall);
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
