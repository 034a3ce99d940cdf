//! Deadlines: the wheel and what fires from it (idle, write stall, connect, handler timers,
//! linger), the drain's schedule, the periodic callback and the leak self-check.
//!
//! # Invariants
//! - At most one live wheel entry per connection, for its earliest deadline
//!   ([`Conn::deadline`](crate::conn::Conn::deadline)); `Conn::scheduled` names it. A later
//!   deadline is not inserted: the entry is recomputed when it fires (lazy re-arm), so activity
//!   never touches the wheel.
//! - Dead entries (their connection closed, or a newer entry superseded them) die when their
//!   slot fires, or in a sweep once they outnumber live connections twice over.

use std::mem;
use std::time::Duration;

use log::{info, trace, warn};

use super::Server;
use crate::conn::{Due, Timeouts};
use crate::context::Context;
use crate::handler::{Handler, Idle};
use crate::limits::{self, LoopFds};
use crate::reason::{CloseReason, LingerEnd, RejectReason};
use crate::time::{Tick, NEVER};
use crate::token::{self, ConnId};
use crate::wheel::{Entry, Wheel};

/// Dead wheel entries tolerated before a sweep.
pub(super) const COMPACT_MIN: usize = 4096;

/// The loop's deadlines: its field group in [`Server`].
#[derive(Debug)]
pub(super) struct Timers {
    pub(super) wheel: Wheel,
    /// The deadlines a connection can have, in ticks.
    pub(super) timeouts: Timeouts,
    /// The expiry budget left due wheel entries.
    pub(super) expire_ready: bool,
    /// Scratch for fired wheel entries.
    fired: Vec<Entry>,
    /// Wheel entries known to be dead. Past [`COMPACT_MIN`] and twice the live connections,
    /// `compact` sweeps them, so a high close rate with a long idle timeout cannot pile up
    /// rate × timeout entries.
    pub(super) stale: usize,
    /// While draining: the tick at which whatever is left gets closed.
    pub(super) drain_deadline: Option<Tick>,
    /// The lame-duck delay of a drain ([`Config::drain_delay`](crate::Config::drain_delay)):
    /// when the drain proper starts, and its timeout. Readiness fails meanwhile.
    pub(super) lame_duck: Option<(Tick, Duration)>,
    /// The lame-duck delay has been served (a drain starts at once from now on).
    lame_done: bool,
    /// Draining, with the listeners still open: worker 0 of a group waits for the others to
    /// close theirs first.
    pub(super) close_pending: bool,
    /// This loop's drain is over, but it serves the admin endpoint for a group whose other
    /// workers still drain: it stops once they all have (still "draining" for `/readyz`).
    pub(super) awaiting_group: bool,
    /// Next run of `Handler::on_periodic`, and its period.
    next_periodic: Option<Tick>,
    periodic: Tick,
    /// Leak self-check: next check tick, its period, and the descriptors that were open before
    /// the loop's first turn and are not the loop's own (stdio, logs, the embedder's files).
    pub(super) next_fd_check: Option<Tick>,
    fd_check: Tick,
    fd_baseline: Option<i64>,
    /// The leak check warned and has not seen every descriptor accounted for since.
    fd_warned: bool,
}

impl Timers {
    pub(super) fn new(timeouts: Timeouts, span: Tick, periodic: Tick, fd_check: Tick) -> Timers {
        Timers {
            wheel: Wheel::for_span(span),
            timeouts,
            expire_ready: false,
            fired: Vec::new(),
            stale: 0,
            drain_deadline: None,
            lame_duck: None,
            lame_done: false,
            close_pending: false,
            awaiting_group: false,
            next_periodic: (periodic > 0).then_some(periodic),
            periodic,
            next_fd_check: None,
            fd_check,
            fd_baseline: None,
            fd_warned: false,
        }
    }

    /// Whether a drain is under way (its lame-duck delay included, and, for the worker that
    /// serves a group's admin endpoint, until the whole group has stopped).
    pub(super) fn is_draining(&self) -> bool {
        self.drain_deadline.is_some() || self.lame_duck.is_some() || self.awaiting_group
    }

    /// What `/readyz` answers for a loop holding `open` of `cap` connections (see
    /// [`Server::readiness`]).
    pub(super) fn readiness(&self, open: usize, cap: usize) -> Result<(), &'static str> {
        if self.lame_duck.is_some() {
            Err("draining soon (lame duck)")
        } else if self.drain_deadline.is_some() || self.awaiting_group {
            Err("draining")
        } else if open >= cap {
            Err("at the connection cap")
        } else {
            Ok(())
        }
    }

    /// The earliest tick at which the loop has something to do for a deadline.
    pub(super) fn poll_at(&self) -> Option<Tick> {
        [
            self.wheel.next_deadline(),
            self.drain_deadline,
            self.lame_duck.map(|(at, _)| at),
            self.next_fd_check,
            self.next_periodic,
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

impl<H: Handler> Server<H> {
    /// Inserts a wheel entry if the connection's earliest deadline is before its scheduled one
    /// (at most one live entry per connection; later deadlines are re-armed lazily on fire).
    pub(super) fn arm(&mut self, key: usize) {
        let t = &mut self.timers;
        let conn = &mut self.table.slab[key];
        if let Some((when, _)) = conn.deadline(&t.timeouts) {
            if when < conn.scheduled {
                if conn.scheduled != NEVER {
                    t.stale += 1; // the later entry is superseded
                }
                t.wheel.insert(key as u32, token::gen_low(conn.gen), when);
                conn.scheduled = when;
            }
        }
    }

    /// Fires due wheel entries: stale → drop; deadline moved by activity → re-insert; else act
    /// on what came due.
    pub(super) fn expire(&mut self, now: Tick) {
        let mut fired = mem::take(&mut self.timers.fired);
        self.timers.expire_ready =
            self.timers
                .wheel
                .advance(now, self.config.expire_budget, &mut fired);
        for entry in fired.drain(..) {
            let key = entry.key as usize;
            let t = &mut self.timers;
            // The entry's low generation bits, and below its tick, tell the occupant's own entry
            // from a dead one (see the `token` docs for why low bits are enough).
            let Some(conn) = self
                .table
                .slab
                .get_mut(key)
                .filter(|c| token::gen_low(c.gen) == entry.gen)
            else {
                self.table.metrics.stale += 1;
                t.stale = t.stale.saturating_sub(1);
                continue;
            };
            if conn.scheduled != entry.when {
                t.stale = t.stale.saturating_sub(1);
                continue; // superseded by an earlier entry
            }
            conn.scheduled = NEVER;
            match conn.deadline(&t.timeouts) {
                Some((when, due)) if when <= now => self.fire(key, due, now),
                Some((when, _)) => {
                    t.wheel.insert(entry.key, entry.gen, when);
                    conn.scheduled = when;
                }
                None => {}
            }
        }
        self.timers.fired = fired;
    }

    /// Acts on a deadline that came due for connection `key`.
    fn fire(&mut self, key: usize, due: Due, now: Tick) {
        let id = ConnId::new(key, self.table.slab[key].gen);
        match due {
            Due::Connect => self.close(key, CloseReason::ConnectTimeout),
            Due::Header => self.reject_header(key, RejectReason::ProxyHeaderTimeout),
            Due::FirstByte => self.close(key, CloseReason::FirstByteTimeout),
            Due::Lifetime => {
                self.table.slab[key].close_gracefully(CloseReason::MaxLifetime);
                self.settle(id);
            }
            Due::WriteStall => {
                // No writability for the write timeout: judged at the socket, not from the
                // last edge. If the socket takes bytes now, the peer made progress (the kernel
                // only takes more once it has sent some: `UNSENT_LOWAT`): the stall clock
                // restarts from now. Else the output is stalled.
                let before = self.table.slab[key].bytes_out;
                let wrote = |s: &mut Self| s.table.get(id).map(|c| c.bytes_out > before);
                // `None`: closed (a write failed) or no longer the handler's.
                if self.write_out(id).is_some() && wrote(self) == Some(false) {
                    self.close(key, CloseReason::WriteStall);
                }
            }
            Due::Linger => {
                // Past the byte cap the linger stopped reading and waited for this deadline.
                let capped = self.table.slab[key].timer >= self.config.linger_bytes;
                let end = if capped {
                    LingerEnd::Bytes
                } else {
                    LingerEnd::Timeout
                };
                self.end_linger(key, end);
            }
            Due::Idle if self.timers.drain_deadline.is_some() => {
                // Idle during a drain is the drain closing it: reason Shutdown, gracefully.
                let conn = &mut self.table.slab[key];
                if conn.has_pending() {
                    // Output still waiting is not idle: look again one drain-idle period
                    // later, not every tick (write stall and the drain deadline bound it).
                    let again = now + self.timers.timeouts.idle.unwrap_or(1).max(1);
                    if conn.scheduled != NEVER {
                        self.timers.stale += 1; // the entry it had is superseded
                    }
                    let gen = token::gen_low(conn.gen);
                    self.timers.wheel.insert(key as u32, gen, again);
                    conn.scheduled = again;
                } else {
                    conn.close_gracefully(CloseReason::Shutdown);
                    self.settle(id);
                }
            }
            // Closing already (its output is being flushed): not the handler's to keep.
            Due::Idle if !self.table.slab[key].is_live() => {
                self.close(key, CloseReason::IdleTimeout)
            }
            Due::Timer if !self.table.slab[key].is_live() => {
                self.table.slab[key].timer = NEVER;
                self.arm(key);
            }
            Due::Idle => {
                let verdict = self.call(key, |h, state, ctx| h.on_idle(state, ctx));
                match verdict {
                    Some(Idle::Keep) => {
                        if let Some(conn) = self.table.get(id) {
                            conn.last_active = now;
                        }
                        self.after_callback(id);
                    }
                    Some(Idle::Close) => {
                        if let Some(conn) = self.table.get(id) {
                            conn.fail(CloseReason::IdleTimeout);
                        }
                        self.after_callback(id);
                    }
                    None => {}
                }
            }
            Due::Timer => {
                self.table.slab[key].timer = NEVER;
                if self
                    .call(key, |h, state, ctx| h.on_timer(state, ctx))
                    .is_some()
                {
                    self.after_callback(id);
                }
            }
        }
    }

    /// Sweeps dead entries out of the wheel: O(entries), paid once per [`COMPACT_MIN`] (and at
    /// least twice the live connections) closes, so O(1) per close amortised.
    pub(super) fn compact_wheel(&mut self) {
        let conns = &self.table.slab;
        let before = self.timers.wheel.len();
        self.timers.wheel.retain(|e| {
            conns
                .get(e.key as usize)
                .is_some_and(|c| token::gen_low(c.gen) == e.gen && c.scheduled == e.when)
        });
        trace!(
            "wheel compacted: {} dead entries dropped, {} kept",
            before - self.timers.wheel.len(),
            self.timers.wheel.len()
        );
        self.timers.stale = 0;
    }

    /// The periodic callback, when due.
    pub(super) fn run_periodic(&mut self, now: Tick) {
        if self.timers.next_periodic.is_some_and(|t| t <= now) {
            self.timers.next_periodic = Some(now + self.timers.periodic);
            let mut ctx = Context::new(&mut self.table, ConnId::NONE);
            self.handler.on_periodic(&mut ctx);
            self.process_dirty();
        }
    }

    /// Starts a drain at `now` (see [`Handle::drain`](crate::Handle::drain)); a second call only
    /// shortens the deadline.
    pub(super) fn begin_drain(&mut self, timeout: Duration, now: Tick) {
        if self.table.stopped || self.timers.awaiting_group {
            return;
        }
        let deadline = crate::time::deadline(now, self.table.clock.ticks(timeout));
        if let Some(current) = self.timers.drain_deadline {
            self.timers.drain_deadline = Some(current.min(deadline));
            return;
        }
        if let Some((_, pending)) = &mut self.timers.lame_duck {
            // The drain proper starts when the delay is served; a second call still shortens it.
            *pending = (*pending).min(timeout);
            return;
        }
        let delay = self.table.clock.ticks(self.config.drain_delay);
        if delay > 0 && !self.timers.lame_done {
            // Lame duck: readiness fails now, the listeners keep accepting until the balancer
            // has noticed (Kubernetes removes endpoints asynchronously).
            self.timers.lame_duck = Some((crate::time::deadline(now, delay), timeout));
            info!(
                "draining in {:?}: /readyz fails now, the listeners stay open until then",
                self.config.drain_delay
            );
            return;
        }
        // Serve what the kernel already queued (those clients connected before the drain), then
        // close the data listeners so that new connects are refused instead of left hanging
        // (worker 0 of a group may close later: `close_pending`).
        self.timers.close_pending = !self.close_listeners_after_backlog(now, false);
        // Idle connections go after `drain_idle`: shorten the idle deadline and arm every
        // connection for it (one pass over the slab, once per drain).
        let drain_idle = self.table.clock.ticks(self.config.drain_idle);
        let t = &mut self.timers.timeouts;
        t.idle = Some(t.idle.map_or(drain_idle, |i| i.min(drain_idle)));
        self.timers.drain_deadline = Some(deadline);
        for id in self.table.ids() {
            // Already idle past drain_idle: closed now, not at the wheel's next tick (an entry
            // inserted for a tick the wheel has passed waits for the next one).
            let Some(conn) = self.table.get(id) else {
                continue;
            };
            match conn.deadline(&self.timers.timeouts) {
                Some((when, due)) if when <= now => self.fire(id.key(), due, now),
                _ => self.arm(id.key()),
            }
        }
        info!(
            "draining: listeners closed, {} connections open, idle ones close after {:?}, the rest at {:?}",
            self.table.slab.len(),
            self.config.drain_idle,
            timeout
        );
        self.check_drain(deadline, now);
    }

    /// Starts the drain proper once a lame-duck delay is served.
    pub(super) fn check_lame_duck(&mut self, now: Tick) {
        if let Some((at, timeout)) = self.timers.lame_duck {
            if at <= now {
                self.timers.lame_duck = None;
                self.timers.lame_done = true;
                self.begin_drain(timeout, now);
            }
        }
    }

    /// Ends the drain when no connection is left (lingering ones included), or at its deadline.
    pub(super) fn check_drain(&mut self, deadline: Tick, now: Tick) {
        if self.timers.close_pending {
            // Worker 0 waits for the others' listeners to close first, but not past the
            // deadline.
            self.timers.close_pending = !self.close_listeners_after_backlog(now, now >= deadline);
            if self.timers.close_pending {
                return;
            }
        }
        if self.table.slab.is_empty() {
            info!("drain complete: every connection ended");
            self.end_drain();
        } else if now >= deadline {
            let left = self.table.slab.len() as u64;
            self.table.metrics.drain_forced += left;
            warn!("drain deadline: force-closing {left} connections");
            self.end_drain();
        }
    }

    /// This loop's drain is over: it stops, unless it serves the admin endpoint of a group
    /// whose other workers still drain. Then it closes what is left of its own and serves the
    /// admin side alone (`/livez`, `/readyz` failing, `/metrics` with the others' figures)
    /// until every other worker has stopped ([`check_group`](Self::check_group)): liveness
    /// must not fail during a drain.
    fn end_drain(&mut self) {
        let others = self.member.as_ref().map_or(0, |m| m.group.running() - 1);
        if others == 0 || self.admin.addr().is_none() {
            return self.shutdown();
        }
        self.close_connections();
        self.close_listeners();
        self.timers.drain_deadline = None;
        self.timers.awaiting_group = true;
        info!("serving the admin endpoint until every worker has stopped ({others} still running)");
        self.check_group();
    }

    /// Serving a group's admin endpoint after this loop's drain: stops once every other worker
    /// has (each one's stop wakes this loop).
    pub(super) fn check_group(&mut self) {
        if self.member.as_ref().is_none_or(|m| m.group.running() <= 1) {
            info!("every worker has stopped");
            self.shutdown();
        }
    }

    /// Descriptors the loop itself holds besides connections, as they are now: epoll, waker,
    /// timer, listeners, the spare, the admin side (what the cap kept back for them is
    /// [`LoopFds::planned`]).
    pub(super) fn own_fds(&self) -> i64 {
        #[cfg(target_os = "linux")]
        let alarm = self.alarm.is_some();
        #[cfg(not(target_os = "linux"))]
        let alarm = false;
        let fds = LoopFds {
            alarm,
            spare: self.accept.gate.fds() > 0,
            listeners: self.accept.listeners.len(),
            admin: self.admin.fds() as u64,
        };
        fds.total() as i64
    }

    /// Descriptors held by the other workers of this loop's group (connections and their own),
    /// as they last published them: the process-wide leak check counts them too.
    fn others_fds(&self) -> i64 {
        self.member.as_ref().map_or(0, |m| {
            (0..m.group.len())
                .filter(|&i| i != m.index)
                .map(|i| {
                    m.group.slots[i]
                        .fds
                        .load(std::sync::atomic::Ordering::Relaxed) as i64
                })
                .sum()
        })
    }

    pub(super) fn start_fd_check(&mut self) {
        if self.timers.fd_check == 0 {
            return;
        }
        if let Some(open) = limits::count_open_fds() {
            self.table.metrics.fds_open = open;
            if self.timers.fd_baseline.is_none() {
                self.timers.fd_baseline = Some(
                    open as i64 - self.own_fds() - self.others_fds() - self.table.slab.len() as i64,
                );
            }
            self.timers.next_fd_check = Some(self.table.now + self.timers.fd_check);
        }
    }

    /// The leak check's baseline (descriptors that are not the group's), taken before any
    /// worker of a group ran (see [`crate::Workers::start`]): a worker that accepts before this
    /// one's first turn would otherwise put its connections in this loop's baseline.
    pub(crate) fn set_fd_baseline(&mut self, baseline: i64) {
        self.timers.fd_baseline = Some(baseline);
    }

    /// The leak self-check: every descriptor the process has is a connection, one of the loop's
    /// own, or was there before the first turn. Reports the difference as a gauge, and warns
    /// when it changes from zero.
    pub(super) fn check_fds(&mut self, now: Tick) {
        if self.timers.next_fd_check.is_none_or(|t| t > now) {
            return;
        }
        self.timers.next_fd_check = Some(now + self.timers.fd_check);
        if self.leak_check_suspended() {
            return; // a handover holds descriptors the loop cannot count
        }
        let (Some(open), Some(baseline)) = (limits::count_open_fds(), self.timers.fd_baseline)
        else {
            return;
        };
        let conns = self.table.slab.len() as i64 + self.others_fds();
        let unaccounted = open as i64 - baseline - self.own_fds() - conns;
        let m = &mut self.table.metrics;
        // In a group the other workers' counts are up to a tick old: a connection they opened
        // or closed meanwhile shows as a difference once; warn only when it persists.
        let was = m.fds_unaccounted;
        let warn_now = if self.member.is_some() {
            unaccounted != 0 && was != 0 && !self.timers.fd_warned
        } else {
            unaccounted != 0 && was == 0
        };
        if warn_now {
            self.timers.fd_warned = true;
            warn!(
                "leak check: {open} descriptors open, {unaccounted} more than connections ({conns}) + own ({}) + baseline ({baseline})",
                self.own_fds()
            );
        } else if unaccounted == 0 && was != 0 && self.timers.fd_warned {
            self.timers.fd_warned = false;
            info!("leak check: every descriptor accounted for again");
        }
        let m = &mut self.table.metrics;
        m.fds_open = open;
        m.fds_unaccounted = unaccounted;
    }
}
