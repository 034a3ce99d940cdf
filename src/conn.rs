//! One connection's socket-side state: the stream, the unsent remainder of its output, its
//! activity stamps and byte counts.
//!
//! This module drains and writes a socket and reports progress or a [`CloseReason`]; it never
//! touches the poll, the wheel, the slab or other connections (the server does).
//!
//! Memory: an idle connection owns no buffer. Its whole userspace cost is its slab entry (this
//! struct plus the handler's state) and one 16-byte wheel entry.

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};

use mio::net::TcpStream;

use crate::close::CloseReason;
use crate::metrics::Metrics;
use crate::wheel::Tick;

/// `scheduled` value of a connection with no wheel entry.
pub(crate) const UNSCHEDULED: Tick = Tick::MAX;

/// A connection in the slab: socket state plus the handler's state.
#[derive(Debug)]
pub(crate) struct Conn<S> {
    pub(crate) io: Io,
    pub(crate) state: S,
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

/// The socket side of a connection.
#[derive(Debug)]
pub(crate) struct Io {
    pub(crate) stream: TcpStream,
    /// Unsent output, if any. While `Some`, the loop does not read (backpressure).
    pending: Option<Box<Pending>>,
    /// The peer's address, kept as IP and port: a `SocketAddr` is 32 bytes (IPv6 flow info and
    /// scope id), this is 19, and an idle connection's whole cost is this struct.
    peer_ip: IpAddr,
    peer_port: u16,
    /// Tick of the last activity (bytes read or write progress). Activity only stamps this; the
    /// wheel entry is re-armed lazily when it fires.
    pub(crate) last_active: Tick,
    /// Tick of this connection's one wheel entry, or [`UNSCHEDULED`]. A fired entry whose `when`
    /// differs was superseded by an earlier one and is dropped.
    pub(crate) scheduled: Tick,
    pub(crate) opened: Tick,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    /// Generation of the slab slot's occupant (see `server::token`).
    pub(crate) gen: u32,
    /// Close at once with this reason (a write failed, output overflowed).
    pub(crate) failed: Option<CloseReason>,
    /// Close with this reason once pending output is flushed (peer FIN, handler close).
    pub(crate) closing: Option<CloseReason>,
    /// The peer's write side is closed (the event said so): read past short reads until 0.
    pub(crate) read_closed: bool,
    /// Already in the loop's list of connections a read budget left with ready data.
    pub(crate) queued: bool,
}

impl Io {
    pub(crate) fn new(stream: TcpStream, peer: SocketAddr, gen: u32, now: Tick) -> Io {
        Io {
            stream,
            pending: None,
            peer_ip: peer.ip(),
            peer_port: peer.port(),
            last_active: now,
            scheduled: UNSCHEDULED,
            opened: now,
            bytes_in: 0,
            bytes_out: 0,
            gen,
            failed: None,
            closing: None,
            read_closed: false,
            queued: false,
        }
    }

    pub(crate) fn peer(&self) -> SocketAddr {
        SocketAddr::new(self.peer_ip, self.peer_port)
    }

    pub(crate) fn pending_len(&self) -> usize {
        self.pending.as_ref().map_or(0, |p| p.buf.len() - p.off)
    }

    pub(crate) fn has_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Asks for a close after the pending output is flushed; the first reason wins.
    pub(crate) fn request_close(&mut self, reason: CloseReason) {
        if self.closing.is_none() {
            self.closing = Some(reason);
        }
    }

    /// Writes `data` straight to the socket and keeps only what it did not take. See
    /// [`Context::write`](crate::Context::write).
    pub(crate) fn write(
        &mut self,
        data: &[u8],
        max_pending: usize,
        now: Tick,
        metrics: &mut Metrics,
    ) -> bool {
        if self.failed.is_some() || self.closing.is_some() {
            return false;
        }
        let mut off = 0;
        if self.pending.is_none() {
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
            if off == data.len() {
                return true;
            }
        }
        let rest = &data[off..];
        if self.pending_len() + rest.len() > max_pending {
            return self.fail(CloseReason::Overflow);
        }
        let pending = self.pending.get_or_insert_with(|| {
            Box::new(Pending {
                buf: Vec::with_capacity(rest.len()),
                off: 0,
                last_progress: now,
            })
        });
        pending.buf.extend_from_slice(rest);
        metrics.pending_bytes += rest.len() as u64;
        true
    }

    fn fail(&mut self, reason: CloseReason) -> bool {
        self.failed.get_or_insert(reason);
        false
    }

    /// Writes pending output until the socket would block. Returns whether everything is out.
    ///
    /// # Errors
    /// The reason to close with when a write fails.
    pub(crate) fn flush(&mut self, now: Tick, metrics: &mut Metrics) -> Result<bool, CloseReason> {
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
        if written > 0 {
            p.last_progress = now;
            self.last_active = now;
            self.bytes_out += written;
            metrics.bytes_out += written;
            metrics.pending_bytes -= written;
        }
        result?;
        if p.off == p.buf.len() {
            self.pending = None;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// The earliest deadline this connection has, and the reason it would close for:
    /// idle (`last_active + idle + 1`) and, while output is pending, write stall
    /// (`last_progress + write + 1`). The `+ 1` makes up for `last_active` being rounded down
    /// to its tick, so nothing closes before its full timeout.
    pub(crate) fn deadline(
        &self,
        idle: Option<Tick>,
        write: Option<Tick>,
    ) -> Option<(Tick, CloseReason)> {
        let idle = idle.map(|t| {
            (
                self.last_active.saturating_add(t).saturating_add(1),
                CloseReason::IdleTimeout,
            )
        });
        let stall = match (write, &self.pending) {
            (Some(t), Some(p)) => Some((
                p.last_progress.saturating_add(t).saturating_add(1),
                CloseReason::WriteStall,
            )),
            _ => None,
        };
        match (idle, stall) {
            (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    /// An idle connection's userspace cost is its slab entry: keep it small (the target is
    /// <= 128 B per idle connection in all, wheel entry included; see BENCHMARKS.md).
    #[test]
    fn idle_connection_entry_stays_small() {
        let entry = std::mem::size_of::<super::Conn<()>>();
        assert!(entry <= 96, "Conn<()> grew to {entry} bytes");
    }
}
