//! A connection's life in the generator, from the connect to the close: starting nonblocking
//! connects (at most [`MAX_UNCONFIRMED`] unconfirmed), their completion, failure and timeout
//! ([`CONNECT_TIMEOUT`]), churn's retries, the end of a connection and how it counts, and the
//! polite end of the run (the drain).
//!
//! Owns the one close path, [`Engine::close`], which keeps the engine's counts by phase
//! (`live`, `n_connecting`, `n_unconfirmed`, `n_held`, `n_draining`) in step with the slots.

use std::io::{self, ErrorKind, Read};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest};
use socket2::{Domain, Protocol, Socket, Type};

use super::{token, Engine, MAX_POLL_WAIT};
use crate::load::mode::Mode;
use crate::load::protocol::{Conn, End, Phase};
use crate::load::stats::kind_label;
use crate::load::{LoadError, CONNECT_TIMEOUT, MAX_UNCONFIRMED};

/// Linux `EINPROGRESS`: what a nonblocking connect returns while under way. Written out because
/// the crate has no libc and `ErrorKind::InProgress` is not stable yet (rust#130840); MIPS
/// numbers its errnos differently.
#[cfg(any(target_arch = "mips", target_arch = "mips64"))]
const EINPROGRESS: i32 = 150;
/// Linux `EINPROGRESS`: what a nonblocking connect returns while under way. Written out because
/// the crate has no libc and `ErrorKind::InProgress` is not stable yet (rust#130840).
#[cfg(not(any(target_arch = "mips", target_arch = "mips64")))]
const EINPROGRESS: i32 = 115;

/// Churn: pause before a worker whose connect failed tries again, so a refusing or
/// port-exhausted host costs counted errors, not a busy loop.
pub(super) const RETRY_DELAY: Duration = Duration::from_millis(10);

/// Longest wait, after the run, for servers to close their side (see `Engine::drain`).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether an error means the server closed or reset the connection.
fn is_server_close(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
    )
}

impl Engine<'_> {
    /// Moves churn workers whose retry delay has passed back to the open queue.
    pub(super) fn retry_due(&mut self, now: Instant) {
        while let Some(&(due, key)) = self.retry.front() {
            if due > now {
                break;
            }
            self.retry.pop_front();
            self.to_open.push_back(key);
        }
    }

    /// Starts connects from the queue while fewer than [`MAX_UNCONFIRMED`] are unconfirmed.
    pub(super) fn open_pending(&mut self, now: Instant) {
        if !self.params.may_issue(now) {
            self.to_open.clear();
            return;
        }
        while self.n_unconfirmed < MAX_UNCONFIRMED {
            let Some(key) = self.to_open.pop_front() else {
                break;
            };
            self.open(key, now);
        }
    }

    /// Starts one nonblocking connect in slot `key`.
    fn open(&mut self, key: usize, now: Instant) {
        debug_assert!(self.slots[key].conn.is_none(), "slot {key} is busy");
        let gen = self.slots[key].gen;
        let stream = self.new_stream().and_then(|mut stream| {
            self.poll
                .registry()
                .register(
                    &mut stream,
                    token(key, gen),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .map(|()| stream)
        });
        match stream {
            Ok(stream) => {
                self.slots[key].conn = Some(Conn::connecting(stream, key, &self.params, now));
                self.live += 1;
                self.n_connecting += 1;
                self.n_unconfirmed += 1;
                self.connecting.push_back((key, gen, now));
            }
            Err(e) => self.connect_failed(key, e.kind(), now),
        }
    }

    /// A nonblocking socket with TCP_NODELAY, bound to the next source address if any, whose
    /// connect is under way.
    fn new_stream(&mut self) -> io::Result<TcpStream> {
        let addr: SocketAddr = self.cfg.connect;
        let socket = Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking(),
            Some(Protocol::TCP),
        )?;
        // Small messages must leave at once; Nagle would hold a pipeline's second message.
        socket.set_tcp_nodelay(true)?;
        self.sources.bind_next(&socket)?;
        match socket.connect(&addr.into()) {
            Ok(()) => {}
            Err(e)
                if e.raw_os_error() == Some(EINPROGRESS) || e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        Ok(TcpStream::from_std(socket.into()))
    }

    /// Counts a connect that failed in slot `key` (already empty or about to be closed by the
    /// caller) and, in churn, schedules the worker's retry.
    pub(super) fn connect_failed(&mut self, key: usize, kind: ErrorKind, now: Instant) {
        self.stats.error(&kind_label(kind));
        if kind == ErrorKind::ConnectionRefused && self.stats.connected == 0 {
            self.refused_early = true;
        }
        self.close(key);
        if self.params.mode == Mode::Churn {
            self.retry.push_back((now + RETRY_DELAY, key));
        }
    }

    /// Fails connects in progress for longer than [`CONNECT_TIMEOUT`].
    pub(super) fn expire_connects(&mut self, now: Instant) {
        while let Some(&(key, gen, since)) = self.connecting.front() {
            let slot = &self.slots[key];
            let still = slot.gen == gen
                && slot
                    .conn
                    .as_ref()
                    .is_some_and(|c| c.phase == Phase::Connecting);
            if still {
                if now < since + CONNECT_TIMEOUT {
                    break;
                }
                self.connect_failed(key, ErrorKind::TimedOut, now);
            }
            self.connecting.pop_front();
        }
    }

    /// Before the first connection succeeds: refused means nothing listens; no success within
    /// [`CONNECT_TIMEOUT`] means nothing answers.
    pub(super) fn check_reachable(&self, now: Instant) -> Result<(), LoadError> {
        let addr = self.cfg.connect;
        if self.refused_early {
            return Err(LoadError::Unreachable {
                addr,
                reason: "connection refused".into(),
            });
        }
        if now >= self.params.t0 + CONNECT_TIMEOUT {
            let errors: Vec<String> = self
                .stats
                .errors
                .iter()
                .map(|(k, n)| format!("{k}={n}"))
                .collect();
            let detail = if errors.is_empty() {
                String::new()
            } else {
                format!("; errors: {}", errors.join(" "))
            };
            return Err(LoadError::Unreachable {
                addr,
                reason: format!(
                    "no connection completed within {} s{detail}",
                    CONNECT_TIMEOUT.as_secs()
                ),
            });
        }
        Ok(())
    }

    /// A connect in slot `key` completed: start the mode's traffic.
    pub(super) fn connected(&mut self, key: usize, now: Instant) {
        self.n_connecting -= 1;
        self.stats.connected += 1;
        self.issue_and_flush(key, now, |conn, p| conn.start(key, p, now));
    }

    /// Ends the connection in slot `key` for `why`, counting it; churn starts the next cycle.
    pub(super) fn end(&mut self, key: usize, why: End, now: Instant) {
        match &why {
            End::Eof { owed } => {
                self.stats.closed_by_server += 1;
                if *owed {
                    self.stats.error("server_closed");
                }
            }
            End::Io(kind) => {
                if is_server_close(*kind) {
                    self.stats.closed_by_server += 1;
                }
                self.stats.error(&kind_label(*kind));
            }
            End::Mismatch => self.stats.error("mismatch"),
            End::CycleDone => {}
        }
        self.close(key);
        if self.params.mode == Mode::Churn {
            if why == End::CycleDone {
                self.to_open.push_back(key);
            } else {
                self.retry.push_back((now + RETRY_DELAY, key));
            }
        }
    }

    /// Ends the run politely: FIN on every connection, then read and discard until the server
    /// closes too, for at most [`DRAIN_TIMEOUT`].
    ///
    /// Closing a socket with unread echo in its receive queue sends an RST instead of a FIN;
    /// a server still writing then gets EPIPE or, without SIGPIPE ignored, dies (epoll_echo
    /// does). A drained close shows the server an ordinary end of stream.
    pub(super) fn drain(&mut self, events: &mut Events) {
        for key in 0..self.slots.len() {
            let Some(conn) = self.slots[key].conn.as_mut() else {
                continue;
            };
            // With a preamble (a PROXY header), a connection that has not sent all of it gets
            // it out first: a server that requires the header would otherwise count the FIN
            // as a connection that never sent one. A connect still in progress just closes
            // (the write fails; nothing reached the server), as it does without a preamble.
            let connecting_bare =
                conn.phase == Phase::Connecting && self.params.preamble.is_empty();
            if connecting_bare || !conn.finish_preamble(&self.params) {
                self.close(key);
                continue;
            }
            if conn.stream.shutdown(std::net::Shutdown::Write).is_err() {
                self.close(key);
                continue;
            }
            match conn.phase {
                Phase::Held => self.n_held -= 1,
                Phase::Open | Phase::Connecting => {}
                Phase::Draining => {
                    debug_assert!(false, "slot {key} in {:?} at drain", conn.phase);
                }
            }
            conn.phase = Phase::Draining;
            self.n_draining += 1;
            // Data may already be waiting, with its edge consumed: read it now.
            if drain_read(&mut conn.stream, &mut self.buf) {
                self.close(key);
            }
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.n_draining > 0 {
            let now = Instant::now();
            if now >= deadline {
                log::debug!(
                    "load: {} connections not closed by the server",
                    self.n_draining
                );
                break;
            }
            let timeout = deadline.saturating_duration_since(now).min(MAX_POLL_WAIT);
            match self.poll.poll(events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
            for event in events.iter() {
                self.dispatch(event, now);
            }
        }
    }

    /// The one close path: deregister, drop (closes the fd), bump the generation, fix counts.
    pub(super) fn close(&mut self, key: usize) {
        let slot = &mut self.slots[key];
        slot.gen = slot.gen.wrapping_add(1);
        let Some(mut conn) = slot.conn.take() else {
            return;
        };
        // Failure only means the fd is already gone from the poller; the drop closes it.
        let _ = self.poll.registry().deregister(&mut conn.stream);
        self.live -= 1;
        if conn.recv == 0 {
            self.n_unconfirmed -= 1;
        }
        match conn.phase {
            Phase::Connecting => self.n_connecting -= 1,
            Phase::Held => self.n_held -= 1,
            Phase::Draining => self.n_draining -= 1,
            Phase::Open => {}
        }
    }
}

/// Reads and discards until the socket would block; `true` when the connection is finished
/// (end of stream or an error).
pub(super) fn drain_read(stream: &mut TcpStream, buf: &mut [u8]) -> bool {
    loop {
        match stream.read(buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}
