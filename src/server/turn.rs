//! One turn of the loop: the poll and its timeout, dispatching events, the waker (stop, drain,
//! work from other threads), continuing what budgets left, and publishing to a group of workers.
//!
//! # Invariants
//! - The clock is read once per turn, after the poll; everything the turn does takes that tick.
//! - The poll waits with a zero timeout whenever a budget left ready work behind
//!   (`has_ready_work`): edge-triggered readiness will not announce it again.

use std::mem;
use std::time::{Duration, Instant};

use log::trace;
use mio::{Events, Registry};

use super::io::Readiness;
use super::timers::{Timers, COMPACT_MIN};
use super::{Server, EVENTS_CAPACITY};
use crate::admin::{AdminSide, View};
use crate::conn::{flag, Phase};
use crate::context::Context;
use crate::error::Error;
use crate::group::Member;
use crate::handler::Handler;
use crate::remote::Msg;
use crate::table::Table;
use crate::time::Tick;
use crate::token::{self, ConnId, Kind};

impl<H: Handler> Server<H> {
    pub(super) fn has_ready_work(&self) -> bool {
        !self.ready.is_empty()
            || self.timers.expire_ready
            || self.accept.has_ready()
            || self.remote_ready
            || !self.table.flushing.is_empty()
            // A callback between turns (in `Server::drain`, say) asked for a stop or a drain.
            || self.table.drain_asked.is_some()
            || self.shared.is_stopping()
    }

    /// The tick of the loop's next deadline of any kind, if any.
    pub(super) fn next_wake(&self) -> Option<Tick> {
        // Figures a worker could not publish in this tick are published in the next.
        let publish_at = self
            .member
            .as_ref()
            .filter(|m| m.unpublished)
            .map(|_| self.table.now + 1);
        [
            self.timers.poll_at(),
            self.accept.gate.poll_at(),
            self.admin.poll_at(),
            publish_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The poll timeout: zero for ready work; else until the next deadline, from `now` (the
    /// clock is read only if there is a deadline), capped by `max_wait`.
    pub(super) fn timeout(
        &self,
        max_wait: Option<Duration>,
        now: Option<Instant>,
    ) -> Option<Duration> {
        if self.has_ready_work() {
            return Some(Duration::ZERO);
        }
        let next = self.next_wake();
        // A deadline too far to be an Instant is no deadline.
        let wait = next
            .and_then(|t| self.table.clock.instant_of(t))
            .map(|at| at.saturating_duration_since(now.unwrap_or_else(Instant::now)));
        crate::time::earlier(wait, max_wait)
    }

    pub(super) fn poll_and_process(
        &mut self,
        timeout: Option<Duration>,
        now: Option<Instant>,
    ) -> Result<(), Error> {
        if self.table.stopped {
            return Ok(());
        }
        if self.table.metrics.turns == 0 {
            self.start_fd_check();
        }
        let mut events = self
            .events
            .take()
            .unwrap_or_else(|| Events::with_capacity(EVENTS_CAPACITY));
        if let Some(m) = &self.member {
            m.group.beat(m.index, true, self.table.now_at);
        }
        let polled = self.table.poll.poll(&mut events, timeout);
        // The clock is read after the poll: a `now` from before a blocking wait would be stale by
        // the whole wait and stamp activity early.
        let at = now.unwrap_or_else(Instant::now).max(self.table.now_at);
        let now = self.table.clock.tick_at(at).max(self.table.now);
        self.table.now = now;
        self.table.now_at = at;
        if let Some(m) = &self.member {
            m.group.beat(m.index, false, at);
        }
        if let Err(e) = polled {
            if e.kind() != std::io::ErrorKind::Interrupted {
                self.events = Some(events);
                return Err(Error::Io(e));
            }
        }
        self.table.metrics.turns += 1;
        mem::swap(&mut self.ready, &mut self.carried);
        // Listeners whose budget ran out in an earlier turn; ones that run out in this turn's
        // dispatch wait for the next turn, so the budget holds per turn.
        for l in &mut self.accept.listeners {
            l.carried = mem::take(&mut l.ready);
        }
        for event in events.iter() {
            self.table.metrics.events += 1;
            self.dispatch(event.token(), Readiness::of(event), now);
        }
        self.events = Some(events);
        if self.table.stopped {
            return Ok(());
        }
        self.expire(now);
        self.continue_ready(now);
        if self.remote_ready {
            self.drain_remote();
        }
        if self.timers.stale > COMPACT_MIN && self.timers.stale > 2 * self.table.slab.len() {
            self.compact_wheel();
        }
        let (admin, registry, view) = self.admin_parts();
        admin.tick(registry, &view);
        self.check_fds(now);
        self.run_periodic(now);
        self.check_lame_duck(now);
        if let Some(deadline) = self.timers.drain_deadline {
            self.check_drain(deadline, now);
        } else if self.timers.awaiting_group {
            self.check_group();
        }
        // A callback asked for a drain or the stop (`Context::drain`, `Context::shutdown`).
        if let Some(timeout) = self.table.drain_asked.take() {
            self.begin_drain(timeout, now);
        }
        if self.shared.is_stopping() {
            self.shutdown();
            return Ok(());
        }
        // Last: what every step above wrote leaves now, once per connection.
        self.flush_queued();
        self.publish();
        Ok(())
    }

    pub(super) fn dispatch(&mut self, token: mio::Token, ready: Readiness, now: Tick) {
        match token::decode(token) {
            Kind::Waker => self.wake_up(now),
            Kind::Alarm => {
                #[cfg(target_os = "linux")]
                if let Some(a) = &mut self.alarm {
                    a.fired(); // what is due is handled below, as every turn
                }
            }
            Kind::Listener(i) => {
                // While paused after fd exhaustion, listener events are ignored (resume accepts).
                if i < self.accept.listeners.len() && !self.accept.gate.is_paused() {
                    self.accept(i, now);
                }
            }
            Kind::AdminListener => self.admin.accept(self.table.poll.registry(), now),
            Kind::AdminConn(k) => {
                let (admin, registry, view) = self.admin_parts();
                admin.drive(k, registry, &view);
            }
            Kind::Conn { key, gen } => match self.table.slab.get(key) {
                // The token's low generation bits tell connections apart within a batch.
                Some(conn) if token::gen_low(conn.gen) == gen => self.drive(key, ready),
                _ => {
                    self.table.metrics.stale += 1;
                    trace!("stale event token={} key={key} gen={gen}", token.0);
                }
            },
        }
    }

    /// The waker fired: a stop, a drain, or messages from other threads.
    pub(super) fn wake_up(&mut self, now: Tick) {
        self.shared.clear_wake();
        self.answer_group();
        self.answer_handover(now);
        if self.shared.is_stopping() {
            return self.shutdown(); // it does what was accepted before the stop first
        }
        let ns = self
            .shared
            .drain_ns
            .swap(u64::MAX, std::sync::atomic::Ordering::AcqRel);
        if ns != u64::MAX {
            self.begin_drain(Duration::from_nanos(ns), now);
        }
        self.drain_remote();
    }

    /// Delivers what other threads queued, within a budget of one queue's capacity per queue.
    pub(super) fn drain_remote(&mut self) {
        let budget = self.config.remote_queue;
        let mut left = false;
        for n in 0.. {
            if n == budget {
                left = true;
                break;
            }
            let Ok(msg) = self.mail.try_recv() else {
                break;
            };
            let mut ctx = Context::new(&mut self.table, ConnId::NONE);
            let delivered = match msg {
                // Copied, so that the connection's pending cap applies (a producer on a slow
                // reader would otherwise pile up without bound); `SendShared` is the caller's
                // choice of a shared buffer, bounded by the write timeout instead.
                Msg::Send(id, data) => ctx.send(id, &data).is_ok(),
                Msg::SendShared(id, data) => ctx.send_shared(id, data).is_ok(),
                Msg::Close(id) => ctx.close_conn(id).is_ok(),
            };
            if !delivered {
                self.table.metrics.remote_dropped += 1;
            }
            self.process_dirty();
        }
        if let Some((jobs, _)) = self.jobs.get() {
            let mut batch = Vec::new();
            for n in 0.. {
                if n == budget {
                    left = true;
                    break;
                }
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            for job in batch {
                job(
                    &mut self.handler,
                    &mut Context::new(&mut self.table, ConnId::NONE),
                );
                self.process_dirty();
            }
        }
        self.remote_ready = left;
    }

    /// Continues what budgets left: connections with data, listeners with a queue, a paused
    /// accept whose retry time has come (or that a close resumed).
    pub(super) fn continue_ready(&mut self, now: Tick) {
        let mut carried = mem::take(&mut self.carried);
        for &id in &carried {
            if let Some(conn) = self.table.get(id) {
                conn.clear(flag::QUEUED);
                if conn.phase == Phase::Open {
                    self.drive(id.key(), Readiness::CONTINUE);
                }
            }
        }
        carried.clear();
        self.carried = carried;
        self.resume_accepting(now);
    }

    /// In a group: publishes this worker's metrics and descriptors, once per tick at most. A
    /// turn in a tick already published leaves them for the next tick, which the poll timeout
    /// then waits for at most (see `timeout`).
    pub(super) fn publish(&mut self) {
        let now = self.table.now;
        if let Some(m) = &mut self.member {
            m.unpublished = m.published == now;
        }
        if self.member.as_ref().is_some_and(|m| !m.unpublished) {
            let fds = self.own_fds() as u64 + self.table.slab.len() as u64;
            let m = self.member.as_mut().expect("checked above");
            m.published = now;
            m.group.publish(m.index, &self.table.metrics);
            m.group.slots[m.index]
                .fds
                .store(fds, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// In a group: answers worker 0's `/connections` query, if one is waiting.
    pub(super) fn answer_group(&mut self) {
        let Some(m) = &self.member else {
            return;
        };
        let Some(query) = m.group.take_request(m.index) else {
            return;
        };
        let view = self.view();
        let lines = crate::admin::connection_lines(&query, &view, Some(m.index));
        m.group.respond(m.index, lines);
    }

    /// What the admin pages show, now.
    fn view(&self) -> View<'_, H::Conn> {
        view(
            &self.table,
            &self.handler,
            &self.timers,
            self.member.as_ref(),
        )
    }

    /// The admin side, the registry and what the admin pages show, borrowed apart: the admin
    /// side is driven while its pages read the rest of the server.
    fn admin_parts(&mut self) -> (&mut AdminSide, &Registry, View<'_, H::Conn>) {
        let view = view(
            &self.table,
            &self.handler,
            &self.timers,
            self.member.as_ref(),
        );
        (&mut self.admin, self.table.poll.registry(), view)
    }
}

/// What the admin pages show of a loop, now: its table, the handler's parts, its drain state and
/// its group.
fn view<'a, H: Handler>(
    table: &'a Table<H::Conn>,
    handler: &'a H,
    timers: &Timers,
    member: Option<&'a Member>,
) -> View<'a, H::Conn> {
    View {
        metrics: &table.metrics,
        conns: &table.slab,
        now: table.now,
        at: table.now_at,
        clock: table.clock,
        draining: timers.is_draining(),
        ready: {
            let (open, cap) = table.occupancy();
            timers.readiness(open, cap)
        },
        hooks: handler,
        group: member.map(|m| (&*m.group, m.index)),
    }
}
