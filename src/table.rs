//! The connection table: the slab of connections and the parts of the loop that a handler
//! callback may change through its [`Context`](crate::Context): the poll's registry (to dial),
//! the metrics, and the list of connections to settle once the callback returns.
//!
//! # Invariants
//! - A connection is reached by [`ConnId`] only through [`Table::live`]: the generation must match
//!   the slot's occupant, and the connection must still be the handler's (not closing, not
//!   lingering), so a stale id never touches a slot's next occupant.
//! - A callback never closes a connection itself: it marks it (`abort`, `graceful`) and the
//!   connection is put on [`Table::dirty`]; the loop settles every dirty connection after the
//!   callback returns, through its one close path. So no callback runs inside another.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::debug;
use mio::net::TcpStream;
use mio::{Interest, Poll};
use slab::Slab;
use socket2::{Domain, Protocol, Socket, Type};

use crate::conn::{flag, Conn, Outbox, OutputLimits, Phase};
use crate::limits::SharedCap;
use crate::metrics::Metrics;
use crate::output::Output;
use crate::time::{Clock, Tick};
use crate::token::{self, ConnId};

/// Socket options applied to every connection the loop creates or accepts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SocketOptions {
    pub(crate) nodelay: bool,
    pub(crate) recv_buffer: Option<usize>,
    pub(crate) send_buffer: Option<usize>,
}

/// The connection table; see the [module docs](self).
#[derive(Debug)]
pub(crate) struct Table<S> {
    pub(crate) slab: Slab<Conn<S>>,
    pub(crate) poll: Poll,
    pub(crate) metrics: Metrics,
    /// Connections a callback changed, to settle (close, arm deadlines, resume reading) once it
    /// returns, as ids: one that closed meanwhile is skipped.
    pub(crate) dirty: Vec<ConnId>,
    /// Connections with output queued this turn, written once each at the end of the turn
    /// (as ids: one that closed meanwhile is skipped).
    pub(crate) flushing: Vec<ConnId>,
    /// Drained output buffers kept for reuse, so that a connection's output allocates nothing
    /// in steady state.
    #[allow(
        clippy::vec_box,
        reason = "the boxes are what is reused: a connection holds one"
    )]
    pub(crate) spare: Vec<Box<Output>>,
    /// Generation for the next connection: a 64-bit count that never wraps in practice (see
    /// the `token` module docs).
    next_gen: u64,
    /// The connection cap in force; dials count against it like accepts. In a group of
    /// workers, the group's (see `group_cap`).
    pub(crate) max_connections: usize,
    /// In a group of workers: the group's count of open connections against its cap, which
    /// this loop's admission shares with every other worker's. `None` for one loop: the slab's
    /// own length is the count.
    pub(crate) group_cap: Option<Arc<SharedCap>>,
    pub(crate) limits: OutputLimits,
    pub(crate) clock: Clock,
    /// This turn's time, as a tick and as the instant it was given as.
    pub(crate) now: Tick,
    pub(crate) now_at: Instant,
    pub(crate) options: SocketOptions,
    /// The server stopped: no more dials.
    pub(crate) stopped: bool,
    /// The server is asked to stop (shared with the handles of other threads, which are
    /// refused from then on): a callback's [`Context::shutdown`](crate::Context::shutdown)
    /// sets it, the loop stops at the end of the turn.
    pub(crate) stop: Arc<AtomicBool>,
    /// A callback asked for a drain ([`Context::drain`](crate::Context::drain)), with this
    /// timeout: the loop starts it at the end of the turn.
    pub(crate) drain_asked: Option<Duration>,
}

/// Why a dial failed at once; the state given to [`Context::connect`](crate::Context::connect)
/// comes back in [`DialError`].
#[derive(Debug)]
#[non_exhaustive]
pub enum DialFailure {
    /// The server holds `max_connections` connections (accepted and dialed together): a dial
    /// over the fd-derived cap fails here rather than with EMFILE.
    Full {
        /// The cap in force.
        max_connections: usize,
    },
    /// The server has stopped.
    Stopped,
    /// The socket could not be created, configured or started connecting (for instance
    /// `EADDRNOTAVAIL`: no local port left; `ENETUNREACH`: no route).
    Socket(io::Error),
}

/// A dial that failed at once, with the handler state it was given.
#[derive(Debug)]
pub struct DialError<S> {
    /// The address dialed.
    pub addr: SocketAddr,
    /// What went wrong.
    pub failure: DialFailure,
    /// The state passed to the dial, handed back.
    pub state: S,
}

impl<S> std::fmt::Display for DialError<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.failure {
            DialFailure::Full { max_connections } => write!(
                f,
                "cannot dial {}: the server holds its maximum of {max_connections} connections",
                self.addr
            ),
            DialFailure::Stopped => write!(f, "cannot dial {}: the server has stopped", self.addr),
            DialFailure::Socket(e) => write!(f, "cannot dial {}: {e}", self.addr),
        }
    }
}

impl<S: std::fmt::Debug> std::error::Error for DialError<S> {}

impl<S> Table<S> {
    pub(crate) fn new(
        poll: Poll,
        max_connections: usize,
        limits: OutputLimits,
        clock: Clock,
        options: SocketOptions,
        metrics: Metrics,
        stop: Arc<AtomicBool>,
    ) -> Table<S> {
        Table {
            // Reserve up to 64 Ki slots up front: untouched pages cost no RSS, and growth by
            // copying would briefly double the slab at the worst moment (a connection spike).
            slab: Slab::with_capacity(max_connections.min(1 << 16)),
            poll,
            metrics,
            dirty: Vec::new(),
            flushing: Vec::new(),
            spare: Vec::new(),
            next_gen: 0,
            max_connections,
            group_cap: None,
            limits,
            clock,
            now: 0,
            now_at: clock.start(),
            options,
            stopped: false,
            stop,
            drain_asked: None,
        }
    }

    /// The id the next connection inserted will have, and advances the generation.
    pub(crate) fn next_id(&mut self) -> ConnId {
        let gen = self.next_gen;
        // 2^64 connections at 100 k/s take 5.8 million years: wrapping is for the form.
        self.next_gen = self.next_gen.wrapping_add(1);
        ConnId::new(self.slab.vacant_key(), gen)
    }

    /// Tests: advances the generation as `n` connections made meanwhile would (without making
    /// them).
    #[cfg(test)]
    pub(crate) fn skip_generations(&mut self, n: u64) {
        self.next_gen = self.next_gen.wrapping_add(n);
    }

    /// Takes a place for one more connection under the cap (this loop's, or its group's);
    /// returns whether there was one. Every slab insert is preceded by it, and every removal
    /// (and an admission that fails after it) followed by [`give_back`](Self::give_back).
    pub(crate) fn take_place(&mut self) -> bool {
        match &self.group_cap {
            None => self.slab.len() < self.max_connections,
            Some(cap) => cap.try_take(),
        }
    }

    /// Gives back a place [`take_place`](Self::take_place) took (nothing to do for one loop).
    pub(crate) fn give_back(&mut self) {
        if let Some(cap) = &self.group_cap {
            cap.give_back();
        }
    }

    /// Open connections and the cap they count against: the group's in a group of workers.
    pub(crate) fn occupancy(&self) -> (usize, usize) {
        match &self.group_cap {
            None => (self.slab.len(), self.max_connections),
            Some(cap) => (cap.open(), cap.max()),
        }
    }

    /// The connection `id` names, if it is still the handler's (open or connecting, not
    /// closing): the generation check that keeps a stale id from reaching a slot's next
    /// occupant.
    pub(crate) fn live(&mut self, id: ConnId) -> Option<&mut Conn<S>> {
        self.slab
            .get_mut(id.key())
            .filter(|c| c.gen == id.generation() && c.is_live())
    }

    /// The connection `id` names, whatever its phase (for settling).
    pub(crate) fn get(&mut self, id: ConnId) -> Option<&mut Conn<S>> {
        self.slab
            .get_mut(id.key())
            .filter(|c| c.gen == id.generation())
    }

    /// Every connection's id, for a pass that may close some of them.
    pub(crate) fn ids(&self) -> Vec<ConnId> {
        self.slab
            .iter()
            .map(|(key, c)| ConnId::new(key, c.gen))
            .collect()
    }

    /// Connection `key` and what a write to it needs, borrowed apart.
    pub(crate) fn outbox(&mut self, key: usize) -> (&mut Conn<S>, Outbox<'_>) {
        let Table {
            slab,
            metrics,
            flushing,
            spare,
            limits,
            now,
            ..
        } = self;
        (
            &mut slab[key],
            Outbox {
                limits: *limits,
                now: *now,
                metrics,
                spare,
                flushing,
            },
        )
    }

    /// What a write needs, for a connection already out of the slab (its output is dropped).
    pub(crate) fn outbox_only(&mut self) -> Outbox<'_> {
        Outbox {
            limits: self.limits,
            now: self.now,
            metrics: &mut self.metrics,
            spare: &mut self.spare,
            flushing: &mut self.flushing,
        }
    }

    /// Puts `id` on the list of connections to settle after the callback (once).
    pub(crate) fn mark_dirty(&mut self, id: ConnId) {
        if let Some(conn) = self.slab.get_mut(id.key()) {
            if conn.gen == id.generation() && !conn.has(flag::DIRTY) {
                conn.set(flag::DIRTY);
                self.dirty.push(id);
            }
        }
    }

    /// Starts a nonblocking dial to `addr` as a new connection in the `Connecting` phase; see
    /// [`Context::connect`](crate::Context::connect).
    pub(crate) fn dial(&mut self, addr: SocketAddr, state: S) -> Result<ConnId, DialError<S>> {
        let fail = |failure, state| {
            Err(DialError {
                addr,
                failure,
                state,
            })
        };
        if self.stopped {
            return fail(DialFailure::Stopped, state);
        }
        if !self.take_place() {
            return fail(
                DialFailure::Full {
                    max_connections: self.max_connections,
                },
                state,
            );
        }
        let mut stream = match connect_socket(addr, &self.options) {
            Ok(stream) => stream,
            Err(e) => {
                self.give_back();
                return fail(DialFailure::Socket(e), state);
            }
        };
        let id = self.next_id();
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            token::conn(id),
            Interest::READABLE | Interest::WRITABLE | Interest::PRIORITY,
        ) {
            self.give_back();
            return fail(DialFailure::Socket(e), state);
        }
        let mut conn = Conn::new(stream, addr, id.generation(), Phase::Connecting, self.now);
        conn.state = Some(state);
        let key = self.slab.insert(conn);
        debug_assert_eq!(key, id.key(), "slab did not use its vacant key");
        self.metrics.count_dial();
        debug!("dialing conn={id} peer={addr}");
        // Settled after the callback: arms the connect deadline.
        self.mark_dirty(id);
        Ok(id)
    }
}

/// A nonblocking socket connecting to `addr`, with the loop's options set before the handshake
/// (buffer sizes must be, to take effect on the window).
fn connect_socket(addr: SocketAddr, options: &SocketOptions) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    apply_buffers(&socket, options)?;
    if options.nodelay {
        socket.set_tcp_nodelay(true)?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

/// Unsent bytes the kernel keeps per socket at most (`TCP_NOTSENT_LOWAT`), set on every
/// listener (accepted sockets inherit it) and dialed socket.
///
/// Why: the write timeout means "no progress of the pending output", and the loop sees
/// progress as writability. With autotuned send buffers of megabytes and no such limit,
/// writability comes back only once half of the buffer has drained (a reader taking 20 KB/s
/// from 4 MB is "stalled" for 100 s, though it never stopped), and a write can succeed without
/// any progress of the peer (acknowledgements of bytes that were already in flight free
/// space). With it, the kernel accepts more only once it has *sent* some, which it does only
/// when the peer's window opens: writability every few hundred KB a reader takes, and a
/// write that succeeds is the peer's progress. It also bounds the kernel memory a slow reader
/// holds. Costs nothing per connection (inherited from the listener) and nothing per write.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) const UNSENT_LOWAT: u32 = 256 * 1024;

/// Sets `SO_RCVBUF` / `SO_SNDBUF` where configured, and the unsent limit ([`UNSENT_LOWAT`]).
pub(crate) fn apply_buffers(socket: &Socket, options: &SocketOptions) -> io::Result<()> {
    if let Some(n) = options.recv_buffer {
        socket.set_recv_buffer_size(n)?;
    }
    if let Some(n) = options.send_buffer {
        socket.set_send_buffer_size(n)?;
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    socket.set_tcp_notsent_lowat(UNSENT_LOWAT)?;
    Ok(())
}
