//! What the loops of a [`Workers`](crate::Workers) group share, below the loop and above
//! nothing but the counters: a [`Group`] of one slot per worker, written only by its worker and
//! read by others without locks: the worker's metrics, published at most once per tick as plain
//! atomics (relaxed stores of a snapshot; a reader sums the slots), the descriptors it holds (for
//! the leak self-check), and a heartbeat (for `/livez`). Only the admin endpoint's
//! `/connections`, which must ask each worker for its lines, goes through a mutex-guarded
//! exchange of tagged queries and answers, off the hot path.
//!
//! The loop ([`Server`](crate::Server)) knows its [`Member`]ship and nothing of its siblings;
//! the admin side reads the group to answer for all; [`Workers`](crate::Workers) builds the group
//! and starts the loops.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::limits::SharedCap;
use crate::metrics::Metrics;
use crate::remote::Handle;

// Only the admin endpoint asks these; without the `admin` feature they go unused.
/// A worker that has not started a turn for this long, while not waiting in its poll, is
/// wedged (what `/livez` reports).
#[cfg_attr(not(feature = "admin"), allow(dead_code))]
pub(crate) const WEDGED_AFTER: Duration = Duration::from_secs(5);

/// One worker's published state.
#[derive(Debug)]
pub(crate) struct Slot {
    /// [`Metrics::visit`] order.
    metrics: Vec<AtomicU64>,
    /// Descriptors the worker holds (connections and its own).
    pub(crate) fds: AtomicU64,
    /// When the worker last started processing a turn, in ms since the group's start.
    heartbeat_ms: AtomicU64,
    /// The worker is waiting in its poll (not wedged, however old its heartbeat).
    polling: AtomicBool,
    /// The worker's handle, to wake it.
    pub(crate) handle: OnceLock<Handle>,
    /// `/connections` queries for this worker and its answers.
    exchange: Mutex<Exchange>,
}

/// Worker 0's `/connections` queries to one worker and that worker's answers, tagged: each
/// query gets the next tag, an answer carries the tag of the query the worker took, and worker
/// 0 takes only the answer to the query it waits for. A late answer to a query it gave up on
/// (its gather timed out) is dropped, never taken for the next query's.
#[derive(Debug, Default)]
struct Exchange {
    /// Tag of the last query asked: the one worker 0 waits for (0: none yet).
    asked: u64,
    /// The query the worker has not taken yet, with its tag.
    request: Option<(u64, String)>,
    /// Tag of the query the worker took last: what its next answer answers.
    taken: u64,
    /// The worker's answer and the tag of the query it answers (`Err`: a bad query).
    response: Option<(u64, Result<String, String>)>,
}

/// What the workers of one [`Workers`](crate::Workers) share; see the [module docs](self).
#[derive(Debug)]
pub(crate) struct Group {
    start: Instant,
    pub(crate) slots: Vec<Slot>,
    /// Workers whose listeners are still open (the drain order).
    open_listeners: AtomicUsize,
    /// Workers that have not stopped yet: worker 0 keeps the admin endpoint up until it is the
    /// last.
    running: AtomicUsize,
    /// The group's connection cap, which every worker's admission shares (`None` for a group
    /// of one: its loop keeps its own plain check).
    pub(crate) cap: Option<Arc<SharedCap>>,
}

impl Group {
    /// A group of `n` workers sharing a cap of `max_connections` (for more than one).
    pub(crate) fn new(n: usize, max_connections: usize) -> Group {
        let width = Metrics::width();
        Group {
            start: Instant::now(),
            slots: (0..n)
                .map(|_| Slot {
                    metrics: (0..width).map(|_| AtomicU64::new(0)).collect(),
                    fds: AtomicU64::new(0),
                    heartbeat_ms: AtomicU64::new(0),
                    polling: AtomicBool::new(true),
                    handle: OnceLock::new(),
                    exchange: Mutex::new(Exchange::default()),
                })
                .collect(),
            open_listeners: AtomicUsize::new(n),
            running: AtomicUsize::new(n),
            cap: (n > 1).then(|| Arc::new(SharedCap::new(max_connections))),
        }
    }

    /// Publishes worker `i`'s metrics (relaxed: each value is whole; a reader may see some newer
    /// than others, never a torn one).
    pub(crate) fn publish(&self, i: usize, metrics: &Metrics) {
        let slot = &self.slots[i];
        let mut k = 0;
        metrics.clone().visit(|v| {
            slot.metrics[k].store(*v, Ordering::Relaxed);
            k += 1;
        });
    }

    /// Worker `i`'s last published metrics.
    pub(crate) fn snapshot(&self, i: usize) -> Metrics {
        let slot = &self.slots[i];
        let mut m = Metrics::default();
        let mut k = 0;
        m.visit(|v| {
            *v = slot.metrics[k].load(Ordering::Relaxed);
            k += 1;
        });
        m
    }

    /// Every worker's last published metrics, summed.
    pub(crate) fn total(&self) -> Metrics {
        let all: Vec<Metrics> = (0..self.slots.len()).map(|i| self.snapshot(i)).collect();
        Metrics::sum(&all)
    }

    /// Worker `i` is about to wait in its poll (`true`) or has started a turn (`false`).
    pub(crate) fn beat(&self, i: usize, polling: bool, at: Instant) {
        let slot = &self.slots[i];
        if !polling {
            let ms = at.saturating_duration_since(self.start).as_millis() as u64;
            slot.heartbeat_ms.store(ms, Ordering::Relaxed);
        }
        slot.polling.store(polling, Ordering::Relaxed);
    }

    /// The first worker that is wedged at `now`: busy in one turn for more than
    /// [`WEDGED_AFTER`].
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn wedged(&self, now: Instant) -> Option<(usize, Duration)> {
        let now_ms = now.saturating_duration_since(self.start).as_millis() as u64;
        self.slots.iter().enumerate().find_map(|(i, slot)| {
            let busy = now_ms.saturating_sub(slot.heartbeat_ms.load(Ordering::Relaxed));
            let busy = Duration::from_millis(busy);
            (!slot.polling.load(Ordering::Relaxed) && busy > WEDGED_AFTER).then_some((i, busy))
        })
    }

    /// Worker `i`'s query exchange (a poisoned lock is still whole: every write is one
    /// assignment).
    fn exchange(&self, i: usize) -> std::sync::MutexGuard<'_, Exchange> {
        self.slots[i]
            .exchange
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    /// Asks worker `i` for its `/connections` lines: a new query, which any answer to an
    /// earlier one no longer answers.
    pub(crate) fn request_connections(&self, i: usize, query: &str) {
        {
            let mut ex = self.exchange(i);
            ex.asked += 1;
            ex.request = Some((ex.asked, query.to_string()));
            ex.response = None;
        }
        if let Some(h) = self.slots[i].handle.get() {
            h.wake_loop();
        }
    }

    /// Worker `i`'s pending `/connections` query, if any; its next [`respond`](Self::respond)
    /// answers this one.
    pub(crate) fn take_request(&self, i: usize) -> Option<String> {
        let mut ex = self.exchange(i);
        let (tag, query) = ex.request.take()?;
        ex.taken = tag;
        Some(query)
    }

    /// Worker `i` answers the `/connections` query it took last; wakes worker 0, which gathers.
    pub(crate) fn respond(&self, i: usize, lines: Result<String, String>) {
        {
            let mut ex = self.exchange(i);
            ex.response = Some((ex.taken, lines));
        }
        if let Some(h) = self.slots[0].handle.get() {
            h.wake_loop();
        }
    }

    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    /// Worker `i`'s answer to the last query asked, once it has come (an answer to an earlier
    /// query is dropped).
    pub(crate) fn take_response(&self, i: usize) -> Option<Result<String, String>> {
        let mut ex = self.exchange(i);
        match ex.response.take() {
            Some((tag, lines)) if tag == ex.asked => Some(lines),
            _ => None,
        }
    }

    /// A worker closed its listeners; returns how many workers still have theirs open.
    pub(crate) fn listeners_closed(&self) -> usize {
        let left = self.open_listeners.fetch_sub(1, Ordering::AcqRel) - 1;
        if let Some(h) = self.slots[0].handle.get() {
            h.wake_loop(); // worker 0 may be waiting for this to close its own
        }
        left
    }

    /// Workers whose listeners are still open.
    pub(crate) fn open_listeners(&self) -> usize {
        self.open_listeners.load(Ordering::Acquire)
    }

    /// A worker stopped (once per worker); wakes worker 0, which may be serving the admin
    /// endpoint until every other worker has stopped.
    pub(crate) fn worker_stopped(&self) {
        self.running.fetch_sub(1, Ordering::AcqRel);
        if let Some(h) = self.slots[0].handle.get() {
            h.wake_loop();
        }
    }

    /// Workers that have not stopped yet.
    pub(crate) fn running(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    /// How many workers the group has.
    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }
}

/// A server's membership in a [`Group`].
#[derive(Debug)]
pub(crate) struct Member {
    pub(crate) group: Arc<Group>,
    pub(crate) index: usize,
    /// The tick metrics were last published at (once per tick at most).
    pub(crate) published: u64,
    /// A turn in the tick already published changed what it would publish: the next tick
    /// publishes it, and the loop wakes for that tick even if no event comes (else an idle
    /// worker's last figures would stay unpublished until its next event).
    pub(crate) unpublished: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_busy_in_one_turn_for_too_long_is_wedged_and_a_polling_one_is_not() {
        let g = Group::new(2, 10);
        let t0 = g.start;
        g.beat(0, true, t0); // waiting in its poll: never wedged, however long
        g.beat(1, false, t0); // started a turn at t0
        assert_eq!(g.wedged(t0 + WEDGED_AFTER), None);
        let late = t0 + WEDGED_AFTER + Duration::from_millis(10);
        assert_eq!(g.wedged(late).map(|(i, _)| i), Some(1));
        g.beat(1, true, late);
        assert_eq!(g.wedged(late + WEDGED_AFTER * 2), None);
    }

    #[test]
    fn a_late_answer_to_an_earlier_query_is_not_taken_for_the_next_one() {
        let g = Group::new(2, 10);
        g.request_connections(1, "limit=1");
        // Worker 1 takes the query, and is slow to answer: worker 0 gives up and asks anew.
        let first = g.take_request(1).expect("the first query");
        g.request_connections(1, "limit=1000");
        g.respond(1, Ok(format!("lines for {first}")));
        assert_eq!(g.take_response(1), None, "the late answer was taken");
        let second = g.take_request(1).expect("the second query");
        assert_eq!(second, "limit=1000");
        g.respond(1, Ok(format!("lines for {second}")));
        assert_eq!(g.take_response(1), Some(Ok("lines for limit=1000".into())));
    }

    #[test]
    fn listeners_close_in_order() {
        let g = Group::new(3, 10);
        assert_eq!(g.open_listeners(), 3);
        assert_eq!(g.listeners_closed(), 2);
        assert_eq!(g.listeners_closed(), 1);
        assert_eq!(g.open_listeners(), 1);
        assert_eq!(g.running(), 3);
        g.worker_stopped();
        assert_eq!(g.running(), 2);
    }
}
