//! Other threads talking to the loop: [`Handle`] (stop, drain, write to or close a connection)
//! and [`Remote`] (run a closure on the loop with the handler and a context).
//!
//! Both go through bounded queues plus the mio `Waker`: a full queue is the sender's error,
//! never unbounded memory. The loop drains the queues once per turn, within a budget of one
//! queue's capacity. A sender wakes the loop only if no wake is already pending (one `eventfd`
//! write per burst, not per message).
//!
//! # Stop means stopped
//! Work a sender was told was accepted (`Ok`) is done: a closure runs, a message is written to
//! its connection (or counted `remote_dropped` if that connection is gone by then), a close is
//! made. From the moment the server is asked to stop ([`Handle::shutdown`], or
//! [`Context::shutdown`](crate::Context::shutdown) in a callback), every sender gets
//! [`RemoteError::Stopped`] instead, with its work handed back. The two never overlap: senders
//! queue under a shared lock (`gate`) and re-check the stop under it; the loop, stopping, takes
//! the lock exclusively to close the queues, then does everything accepted before, then closes
//! its connections (so "send goodbye, then shut down" delivers the goodbye).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use log::warn;
use mio::Waker;

use crate::context::Context;
use crate::handler::Handler;
use crate::token::ConnId;

/// Work from another thread for connection `id`.
#[derive(Debug)]
pub(crate) enum Msg {
    /// Copied into the connection's buffer on the loop (its pending cap applies).
    Send(ConnId, Vec<u8>),
    /// Queued as a shared buffer (no copy; not counted against the cap).
    SendShared(ConnId, Bytes),
    Close(ConnId),
}

/// What the loop shares with [`Handle`]s and [`Remote`]s on other threads.
#[derive(Debug)]
pub(crate) struct Shared {
    waker: Waker,
    /// The server is asked to stop: senders are refused from now on. Shared with the loop's
    /// table, so that a callback can ask too ([`Context::shutdown`](crate::Context::shutdown)).
    stop: Arc<AtomicBool>,
    /// `true` once the loop has closed the queues (see the [module docs](self)). Senders hold
    /// it shared while they check `stop` and queue; the loop takes it exclusively to close.
    gate: RwLock<bool>,
    /// Requested drain timeout in nanoseconds; `u64::MAX` = no drain requested.
    pub(crate) drain_ns: AtomicU64,
    /// A wake is pending: set by the sender that wakes the loop, cleared by the loop before it
    /// drains the queues (so a message sent after the clear wakes it again).
    woken: AtomicBool,
    mail: SyncSender<Msg>,
}

impl Shared {
    /// The shared part, and the receiving end of the message queue (the loop's).
    pub(crate) fn new(
        waker: Waker,
        capacity: usize,
        stop: Arc<AtomicBool>,
    ) -> (Arc<Shared>, Receiver<Msg>) {
        let (mail, rx) = mpsc::sync_channel(capacity);
        (
            Arc::new(Shared {
                waker,
                stop,
                gate: RwLock::new(false),
                drain_ns: AtomicU64::new(u64::MAX),
                woken: AtomicBool::new(false),
                mail,
            }),
            rx,
        )
    }

    fn wake(&self) {
        if !self.woken.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.waker.wake() {
                warn!("cannot wake the loop: {e}");
            }
        }
    }

    /// The loop is about to drain the queues: later sends must wake it again.
    pub(crate) fn clear_wake(&self) {
        self.woken.store(false, Ordering::Release);
    }

    /// Whether a stop was asked for.
    pub(crate) fn is_stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Asks for the stop (from the loop itself): senders are refused from now on.
    pub(crate) fn ask_stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// The loop is stopping: refuses every sender from now on. Once this returns, whatever a
    /// sender was told was accepted is in the queues, for the loop's last pass over them.
    pub(crate) fn close_queues(&self) {
        self.ask_stop();
        *self.gate.write().unwrap_or_else(|e| e.into_inner()) = true;
    }

    /// Queues `msg` on `tx` unless the server is stopping; `back` turns a refused message back
    /// into what the sender gave. Wakes the loop for what was queued.
    fn queue<M, T>(
        &self,
        tx: &SyncSender<M>,
        msg: M,
        back: impl FnOnce(M) -> T,
    ) -> Result<(), RemoteError<T>> {
        {
            let closed = self.gate.read().unwrap_or_else(|e| e.into_inner());
            if *closed || self.is_stopping() {
                return Err(RemoteError::Stopped(back(msg)));
            }
            tx.try_send(msg).map_err(|e| match e {
                TrySendError::Full(m) => RemoteError::Full(back(m)),
                TrySendError::Disconnected(m) => RemoteError::Stopped(back(m)),
            })?;
        }
        self.wake();
        Ok(())
    }
}

/// A message or closure that could not be queued, handed back.
#[derive(Debug, PartialEq, Eq)]
pub enum RemoteError<T> {
    /// The queue is full ([`Config::remote_queue`](crate::Config::remote_queue)): try later.
    Full(T),
    /// The server has stopped or is stopping (its shutdown was asked for): the work will not
    /// be done. Handed back, like the rest.
    Stopped(T),
}

impl<T> std::fmt::Display for RemoteError<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RemoteError::Full(_) => "the loop's queue is full",
            RemoteError::Stopped(_) => "the server has stopped (or is stopping)",
        })
    }
}

impl<T: std::fmt::Debug> std::error::Error for RemoteError<T> {}

impl<T> RemoteError<T> {
    /// The same error with what it hands back converted by `f`.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> RemoteError<U> {
        match self {
            RemoteError::Full(t) => RemoteError::Full(f(t)),
            RemoteError::Stopped(t) => RemoteError::Stopped(f(t)),
        }
    }
}

/// Stops, drains or feeds a [`Server`](crate::Server) from any thread (a signal thread, a test,
/// a supervisor, a producer).
///
/// Stop means stopped: work a sender was told was accepted (`Ok`) is done, even if the stop
/// comes before its turn (a closure runs, a message is written, a close is made); from the
/// moment a stop is asked for ([`Handle::shutdown`], or
/// [`Context::shutdown`](crate::Context::shutdown) from a callback) every sender gets
/// [`RemoteError::Stopped`] with its work handed back, while the `Server` value lives and after.
/// A producer that retries on [`RemoteError::Full`] therefore ends.
#[derive(Debug, Clone)]
pub struct Handle {
    pub(crate) shared: Arc<Shared>,
}

impl Handle {
    /// Asks the loop to stop now: from this moment every [`send`](Self::send),
    /// [`close`](Self::close) and [`Remote::run`] is refused with [`RemoteError::Stopped`]; at
    /// its next turn the loop does what it had accepted before (runs the closures, writes the
    /// messages), writes what is queued (one last nonblocking write each: output the socket
    /// still refuses, or queued on a dial that has not connected, is dropped), closes every
    /// connection with
    /// [`CloseReason::Shutdown`](crate::CloseReason::Shutdown), closes its listeners, and
    /// [`Server::run`](crate::Server::run) returns. Also ends a drain early.
    pub fn shutdown(&self) {
        self.shared.ask_stop();
        self.wake_now();
    }

    /// Asks the loop to drain: the data listeners close at once (connections already queued
    /// are accepted and served; new connects are refused), connections idle for
    /// [`Config::drain_idle`](crate::Config::drain_idle) with nothing pending are closed, active
    /// ones are served until they end or go idle, and after `timeout` whatever is left is
    /// closed. The loop stops when no connection is left.
    pub fn drain(&self, timeout: Duration) {
        let ns = timeout.as_nanos().min(u64::MAX as u128 - 1) as u64;
        // Two drains before the loop wakes: the shorter deadline wins (`u64::MAX` is none).
        self.shared.drain_ns.fetch_min(ns, Ordering::AcqRel);
        self.wake_now();
    }

    /// Writes `data` to connection `id` from another thread, as
    /// [`Context::send`](crate::Context::send) would on the loop: copied into the
    /// connection's buffer, so its pending cap applies (a connection that would pass it closes
    /// with `Overflow`), and it leaves with whatever else the connection gets in that turn, in
    /// one write. A connection that is gone by then drops it (counted as `remote_dropped`).
    ///
    /// # Errors
    /// [`RemoteError::Full`] (with `data` back) when the queue is full, [`RemoteError::Stopped`]
    /// once the server is stopping or stopped (see [`shutdown`](Self::shutdown)).
    pub fn send(&self, id: ConnId, data: Vec<u8>) -> Result<(), RemoteError<Vec<u8>>> {
        self.shared
            .queue(&self.shared.mail, Msg::Send(id, data), |m| match m {
                Msg::Send(_, d) => d,
                _ => Vec::new(),
            })
    }

    /// [`send`](Self::send) of a shared buffer, as
    /// [`Context::send_shared`](crate::Context::send_shared) would on the loop: not copied,
    /// so one buffer sent to many connections is one copy in memory; not counted against the
    /// pending cap either (a reader that stops is ended by the write timeout).
    ///
    /// # Errors
    /// As [`send`](Self::send).
    pub fn send_shared(&self, id: ConnId, data: Bytes) -> Result<(), RemoteError<Bytes>> {
        self.shared
            .queue(&self.shared.mail, Msg::SendShared(id, data), |m| match m {
                Msg::SendShared(_, d) => d,
                _ => Bytes::new(),
            })
    }

    /// Closes connection `id` (gracefully, as [`Context::close_conn`](crate::Context::close_conn))
    /// from another thread.
    ///
    /// # Errors
    /// As [`Handle::send`].
    pub fn close(&self, id: ConnId) -> Result<(), RemoteError<()>> {
        self.shared.queue(&self.shared.mail, Msg::Close(id), |_| ())
    }

    /// Wakes the loop (a group request is waiting for it).
    pub(crate) fn wake_loop(&self) {
        self.shared.wake();
    }

    /// Stop and drain always wake the loop, even if a message wake is pending.
    fn wake_now(&self) {
        self.shared.woken.store(true, Ordering::Release);
        if let Err(e) = self.shared.waker.wake() {
            warn!("cannot wake the loop: {e}");
        }
    }
}

/// A closure run on the loop.
pub(crate) type Job<H> = Box<dyn FnOnce(&mut H, &mut Context<'_, <H as Handler>::Conn>) + Send>;

/// Runs closures on a [`Server`](crate::Server)'s loop from any thread, with the handler and a
/// [`Context`] (no current connection: `ctx.id()` is [`ConnId::NONE`]). From
/// [`Server::remote`](crate::Server::remote).
pub struct Remote<H: Handler> {
    pub(crate) tx: SyncSender<Job<H>>,
    pub(crate) shared: Arc<Shared>,
}

impl<H: Handler> Remote<H> {
    /// Queues `job` to run on the loop at its next turn. A job that was accepted runs, even if
    /// the server is asked to stop before its turn comes (it runs just before the stop).
    ///
    /// # Errors
    /// [`RemoteError::Full`] when the queue is full, [`RemoteError::Stopped`] once the server is
    /// stopping or stopped (the job is dropped either way: it will not run).
    pub fn run(
        &self,
        job: impl FnOnce(&mut H, &mut Context<'_, H::Conn>) + Send + 'static,
    ) -> Result<(), RemoteError<()>> {
        self.shared.queue(&self.tx, Box::new(job) as Job<H>, |_| ())
    }
}

impl<H: Handler> Clone for Remote<H> {
    fn clone(&self) -> Self {
        Remote {
            tx: self.tx.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<H: Handler> std::fmt::Debug for Remote<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").finish_non_exhaustive()
    }
}
