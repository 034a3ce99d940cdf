//! One connection's side of the protocol: what it sends and expects in each [`Mode`], and the
//! check of every echoed byte against the connection's [`Pattern`] stream.
//!
//! Invariant: `recv <= sent <= target` on every connection, and a received byte counts (in
//! `recv`, in the window's bytes, toward a message) only after it matched the pattern at its
//! stream offset; a message completes once, when the last byte of its echo is verified.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::time::Instant;

use mio::net::TcpStream;

use super::mode::Mode;
use super::pattern::{seed_for, Pattern};
use super::schedule::{self, Schedule};
use super::stats::Stats;

/// The one loop-wide receive buffer; also the longest write. 256 KiB lets a streaming
/// connection move a large part of a socket buffer per syscall.
pub(super) const IO_CHUNK: usize = 256 * 1024;

/// Bytes one connection may write per readiness event (or per turn from the ready queue)
/// before the others get their turn; at most one [`IO_CHUNK`] more is written. A loopback send
/// buffer holds megabytes: filling it in 64-byte writes took seconds, during which no other
/// connection ran and the clock was not read.
pub(super) const WRITE_BUDGET: usize = 4 * IO_CHUNK;

/// Bytes one connection may read per readiness event (or per turn from the ready queue), the
/// same bound for the receive side.
pub(super) const READ_BUDGET: usize = 4 * IO_CHUNK;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// `connect` returned in progress; waiting for writable.
    Connecting,
    /// Connected and exchanging data.
    Open,
    /// Idle mode: echoed once, now only watched for a close.
    Held,
    /// The run is over: our FIN is sent, reading and discarding until the server's.
    Draining,
}

/// Why a connection ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum End {
    /// Read returned 0; `owed` when echoed bytes were still expected.
    Eof {
        /// Echo was still expected.
        owed: bool,
    },
    /// An I/O error, as a report label.
    Io(ErrorKind),
    /// The echo differs from what was sent (or exceeds it).
    Mismatch,
    /// Churn: the cycle's echo arrived; close and start the next cycle.
    CycleDone,
}

/// One connection.
#[derive(Debug)]
pub(super) struct Conn {
    /// The socket, registered for READABLE | WRITABLE once (edge-triggered), never re-registered.
    pub(super) stream: TcpStream,
    /// Life stage.
    pub(super) phase: Phase,
    /// Start of this connection's byte pattern.
    seed: u8,
    /// Bytes written so far (stream offset of the next byte to write).
    sent: u64,
    /// Bytes issued so far; `target - sent` still has to go out.
    target: u64,
    /// Bytes received and verified so far.
    pub(super) recv: u64,
    /// Messages in flight: the stream offset at which each one's echo is complete, and the
    /// instant its latency is measured from (actual issue, or scheduled time with `--rate`).
    inflight: VecDeque<(u64, Instant)>,
    /// `--rate`: the next message of this connection's schedule.
    next_k: u64,
    /// When this connection started connecting (churn: the cycle's start).
    started: Instant,
    /// The last write was short or WouldBlock: wait for a writable event. Writing again before
    /// would only cost an EAGAIN syscall.
    pub(super) write_blocked: bool,
    /// The last flush stopped at [`WRITE_BUDGET`] with the socket still writable: no new edge
    /// will come, so the ready queue must resume it.
    write_more: bool,
    /// The last read stopped at [`READ_BUDGET`] without draining the socket: likewise.
    pub(super) read_more: bool,
    /// In the engine's ready queue.
    pub(super) queued: bool,
    /// Bytes of the preamble written so far.
    preamble_sent: usize,
}

/// Run-wide parameters the per-connection code reads.
#[derive(Debug)]
pub(super) struct Params {
    pub(super) mode: Mode,
    pub(super) size: u64,
    /// Stream: bytes issued at once when everything issued is written: as many whole `size`
    /// units as fit in [`IO_CHUNK`] (at least one), so one write call moves up to
    /// [`IO_CHUNK`] bytes whatever `size` is.
    pub(super) stream_chunk: u64,
    pub(super) depth: usize,
    pub(super) schedule: Option<Schedule>,
    /// Start of the load: the origin of the schedule.
    pub(super) t0: Instant,
    /// The measured window `[start, end)`; `None` until idle setup completes.
    pub(super) window: Option<(Instant, Instant)>,
    /// Sent first on every connection (a PROXY protocol header), not echoed.
    pub(super) preamble: Vec<u8>,
}

impl Params {
    pub(super) fn in_window(&self, t: Instant) -> bool {
        self.window.is_some_and(|(s, e)| t >= s && t < e)
    }

    /// Whether the window has ended by `t`.
    pub(super) fn past_end(&self, t: Instant) -> bool {
        self.window.is_some_and(|(_, e)| t >= e)
    }

    /// Whether new messages may still be issued at `t` (not after the window's end).
    pub(super) fn may_issue(&self, t: Instant) -> bool {
        self.window.is_none_or(|(_, e)| t < e)
    }
}

impl Conn {
    /// A connection in slot `key` whose nonblocking connect started at `now`.
    pub(super) fn connecting(stream: TcpStream, key: usize, p: &Params, now: Instant) -> Conn {
        Conn {
            stream,
            phase: Phase::Connecting,
            seed: seed_for(key),
            sent: 0,
            target: 0,
            recv: 0,
            inflight: VecDeque::with_capacity(if p.mode == Mode::Stream { 0 } else { p.depth }),
            next_k: 0,
            started: now,
            write_blocked: false,
            write_more: false,
            read_more: false,
            queued: false,
            preamble_sent: 0,
        }
    }

    /// The connect completed at `now`: the connection opens and issues its mode's first
    /// messages (pingpong, pipeline: `depth` of them, or those due with `--rate`; idle, churn:
    /// one; stream: none, [`Conn::flush`] issues as it writes).
    pub(super) fn start(&mut self, key: usize, p: &Params, now: Instant) {
        self.phase = Phase::Open;
        match p.mode {
            Mode::Pingpong | Mode::Pipeline => {
                if let Some(s) = p.schedule {
                    let elapsed = now.saturating_duration_since(p.t0);
                    self.next_k = s.first_k_at(key, elapsed);
                    self.issue_due(key, p, now);
                } else if p.may_issue(now) {
                    let t = Instant::now();
                    for _ in 0..p.depth {
                        self.issue(p.size, t);
                    }
                }
            }
            Mode::Stream => {}
            Mode::Idle | Mode::Churn => self.issue(p.size, Instant::now()),
        }
    }

    /// Stopped at a budget with work left; the ready queue resumes it (no edge will).
    pub(super) fn has_more(&self) -> bool {
        self.read_more || self.write_more
    }

    /// Queues one message and remembers when its latency starts.
    fn issue(&mut self, size: u64, origin: Instant) {
        self.target += size;
        self.inflight.push_back((self.target, origin));
    }

    /// `--rate`: issues every message of this connection that is due by `now` and fits in
    /// `depth`.
    pub(super) fn issue_due(&mut self, key: usize, p: &Params, now: Instant) {
        let Some(s) = p.schedule else { return };
        while self.inflight.len() < p.depth && self.next_k < u64::MAX {
            // Past what an `Instant` holds: never due.
            let Some(due) = schedule::at(p.t0, s.due(key, self.next_k)) else {
                break;
            };
            if due > now || !p.may_issue(due) {
                break;
            }
            self.issue(p.size, due);
            self.next_k += 1;
        }
    }

    /// Writes what is left of the preamble until it is all out or the socket is full
    /// (`write_blocked`). Returns whether all of it is out.
    fn write_preamble(&mut self, p: &Params) -> Result<bool, End> {
        while self.preamble_sent < p.preamble.len() {
            if self.write_blocked {
                return Ok(false);
            }
            match self.stream.write(&p.preamble[self.preamble_sent..]) {
                Ok(0) => return Err(End::Io(ErrorKind::WriteZero)),
                Ok(n) => self.preamble_sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.write_blocked = true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(End::Io(e.kind())),
            }
        }
        Ok(true)
    }

    /// At the end of the run: writes what is left of the preamble, without waiting. Returns
    /// whether all of it is out (so that the server sees a whole header before the FIN, not a
    /// connection that ended before its header); true without a preamble. A connect still in
    /// progress fails the write (the server has no connection to count yet).
    pub(super) fn finish_preamble(&mut self, p: &Params) -> bool {
        matches!(self.write_preamble(p), Ok(true))
    }

    /// Writes issued bytes (stream: endlessly, [`Params::stream_chunk`] at a time) until done,
    /// the socket is full, or [`WRITE_BUDGET`] is spent (then `write_more` is set).
    pub(super) fn flush(&mut self, pattern: &Pattern, p: &Params) -> Result<(), End> {
        self.write_more = false;
        // Until it is all out, `write_blocked` is set and nothing else is written.
        self.write_preamble(p)?;
        let mut written = 0;
        while !self.write_blocked {
            if self.sent == self.target {
                if p.mode != Mode::Stream {
                    break;
                }
                self.target += p.stream_chunk;
            }
            if written >= WRITE_BUDGET {
                self.write_more = true;
                break;
            }
            let len = (self.target - self.sent).min(IO_CHUNK as u64) as usize;
            match self.stream.write(pattern.slice(self.seed, self.sent, len)) {
                Ok(0) => return Err(End::Io(ErrorKind::WriteZero)),
                Ok(n) => {
                    self.sent += n as u64;
                    written += n;
                    // A short write means the send buffer filled; Linux then flags the socket
                    // so that freed space raises a new writable edge.
                    self.write_blocked = n < len;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => self.write_blocked = true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(End::Io(e.kind())),
            }
        }
        Ok(())
    }

    /// Reads and verifies until the socket is drained or [`READ_BUDGET`] is spent (then
    /// `read_more` is set), completing messages as their echo arrives and issuing the next
    /// ones. Bytes count in the window by `now`, read per event, so at most one budget late.
    ///
    /// A read shorter than the buffer ends the drain without the extra read that would return
    /// WouldBlock: it emptied the receive queue, and on Linux any later arrival raises a new
    /// edge (the same choice as `epoll_echo short`). The generator shares the CPUs with the
    /// server it measures, so it saves the syscall.
    pub(super) fn read(
        &mut self,
        key: usize,
        buf: &mut [u8],
        pattern: &Pattern,
        p: &Params,
        stats: &mut Stats,
        now: Instant,
    ) -> Result<(), End> {
        self.read_more = false;
        let mut read = 0;
        loop {
            if read >= READ_BUDGET {
                self.read_more = true;
                return Ok(());
            }
            let n = match self.stream.read(buf) {
                Ok(0) => {
                    return Err(End::Eof {
                        owed: self.recv < self.target,
                    })
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(End::Io(e.kind())),
            };
            let data = &buf[..n];
            if self.recv + n as u64 > self.sent || !pattern.matches(self.seed, self.recv, data) {
                return Err(End::Mismatch);
            }
            self.recv += n as u64;
            read += n;
            if p.in_window(now) {
                stats.bytes += n as u64;
            }
            self.complete_messages(key, p, stats)?;
            if n < buf.len() {
                return Ok(());
            }
        }
    }

    /// Pops every message whose echo is now complete, records it, and issues what follows.
    pub(super) fn complete_messages(
        &mut self,
        key: usize,
        p: &Params,
        stats: &mut Stats,
    ) -> Result<(), End> {
        let mut done_at = None;
        while let Some(&(end, origin)) = self.inflight.front() {
            if self.recv < end {
                break;
            }
            self.inflight.pop_front();
            // Latency ends when the echo is seen, not at the start of the turn.
            let t = *done_at.get_or_insert_with(Instant::now);
            let since = if p.mode == Mode::Churn {
                self.started
            } else {
                origin
            };
            if p.mode == Mode::Idle {
                self.phase = Phase::Held;
                stats.idle_checked += 1;
                continue;
            }
            stats.ops_total += 1;
            if p.in_window(t) {
                stats.ops += 1;
                let ns = u64::try_from(t.saturating_duration_since(since).as_nanos())
                    .unwrap_or(u64::MAX);
                stats.hist.saturating_record(ns.max(1));
            }
            match p.mode {
                Mode::Churn => return Err(End::CycleDone),
                _ if p.schedule.is_some() => self.issue_due(key, p, t),
                _ if p.may_issue(t) => self.issue(p.size, t),
                _ => {}
            }
        }
        Ok(())
    }
}

/// Stream: bytes issued at once for messages of `size` bytes — the whole `size` units that fit
/// in [`IO_CHUNK`], or one unit when `size` is larger (then written [`IO_CHUNK`] at a time).
pub(super) fn stream_chunk(size: usize) -> u64 {
    let size = size.max(1) as u64;
    (IO_CHUNK as u64 / size).max(1) * size
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_chunks_are_whole_units_up_to_the_io_chunk() {
        assert_eq!(stream_chunk(64), IO_CHUNK as u64);
        assert_eq!(stream_chunk(1), IO_CHUNK as u64);
        assert_eq!(stream_chunk(100_000), 200_000);
        assert_eq!(stream_chunk(IO_CHUNK), IO_CHUNK as u64);
        assert_eq!(stream_chunk(IO_CHUNK + 1), IO_CHUNK as u64 + 1);
    }
}
