//! The generator's event loop: one mio `Poll`, one slot per connection (a worker, in churn).
//!
//! One turn: read the clock; open connections while fewer than
//! [`MAX_UNCONFIRMED`](super::MAX_UNCONFIRMED) are unconfirmed; expire connects older than
//! [`CONNECT_TIMEOUT`]; fire due scheduled messages (`--rate`); move between phases (setup,
//! window, end); print progress; poll until the nearest
//! of those deadlines (not at all while connections wait in the ready queue); dispatch the
//! events, reading the clock per event (none after the window's end); then resume the ready
//! queue: connections that stopped at a read or write budget of [`protocol`](super::protocol),
//! which no new edge would wake. Every deadline is finite, so the loop always ends.
//!
//! Invariants: `slots[key].conn` is `Some` exactly while the connection is open or connecting;
//! `live`, `n_connecting` and `n_held` count those slots by phase, `n_unconfirmed` those that
//! have not received a byte yet; a slot's `gen` changes on every close, and tokens carry it, so
//! an event for a connection that is gone (its slot maybe reused in the same batch) is dropped.
//!
//! This module owns the engine's state, the turn, its deadlines, the progress line and the
//! report; [`lifecycle`] opens, ends and closes connections (and drains them at the end), and
//! [`events`] handles readiness events and the ready queue.

mod events;
mod lifecycle;

use std::collections::VecDeque;
use std::io::{self, ErrorKind};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::{Events, Poll, Token};

use super::mode::Mode;
use super::pattern::Pattern;
use super::procfs::{self, ServerSample};
use super::protocol::{stream_chunk, Conn, Params, Phase, IO_CHUNK};
use super::report::{Latency, Report};
use super::schedule::{self, Schedule};
use super::source::Sources;
use super::stats::{kind_label, Stats};
use super::{LoadConfig, LoadError, CONNECT_TIMEOUT, IDLE_SETUP_TIMEOUT};

/// Events taken per poll.
const EVENTS_CAPACITY: usize = 1024;

/// Descriptors kept free beyond the connections: the poller, `/proc` reads, stdio, and the
/// odd descriptor a caller (a bench) opens meanwhile.
const FD_MARGIN: u64 = 32;

/// Longest single poll, so the loop re-checks its deadlines at least this often.
const MAX_POLL_WAIT: Duration = Duration::from_millis(100);

/// Progress line period.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Largest latency the histogram holds (1 hour, in ns); larger values saturate.
const HIST_MAX_NS: u64 = 3_600_000_000_000;

/// Significant figures of the latency histogram.
const HIST_SIGFIG: u8 = 3;

/// A connection's place, reused across churn cycles.
#[derive(Debug, Default)]
struct Slot {
    /// Bumped on every close; the high half of the token.
    gen: u32,
    /// The connection, if open or connecting.
    conn: Option<Conn>,
}

/// Token for `key` in its current generation. Keys fit in 32 bits (connections are bounded by
/// the fd limit); on a 32-bit target the generation is dropped and stale events rely on the
/// phase checks alone.
fn token(key: usize, gen: u32) -> Token {
    Token(((u64::from(gen) << 32) | key as u64) as usize)
}

/// (key, gen) of a token.
fn split_token(t: Token) -> (usize, u32) {
    let v = t.0 as u64;
    ((v & 0xffff_ffff) as usize, (v >> 32) as u32)
}

/// What the loop measured besides the counters.
#[derive(Debug)]
struct Outcome {
    /// Length of the measured window actually run.
    elapsed: Duration,
    /// Server utime + stime over the window, in clock ticks.
    cpu_ticks: Option<u64>,
    /// Server RSS at the end, connections still open.
    rss_end: Option<u64>,
    /// Idle: connections held at the end.
    held: u64,
}

/// The running generator.
#[derive(Debug)]
struct Engine<'a> {
    cfg: &'a LoadConfig,
    poll: Poll,
    slots: Vec<Slot>,
    pattern: Pattern,
    buf: Vec<u8>,
    params: Params,
    stats: Stats,
    /// Slots waiting to (re)connect, in order.
    to_open: VecDeque<usize>,
    /// Churn: slots waiting out [`RETRY_DELAY`](lifecycle::RETRY_DELAY) after a failed connect
    /// (due times ascend).
    retry: VecDeque<(Instant, usize)>,
    /// Connects in progress, oldest first: (key, gen, started). Entries whose slot moved on
    /// are dropped lazily from the front.
    connecting: VecDeque<(usize, u32, Instant)>,
    n_connecting: usize,
    /// Connections connecting or connected without a byte echoed yet: not known to be
    /// accepted by the server (see [`MAX_UNCONFIRMED`](super::MAX_UNCONFIRMED)).
    n_unconfirmed: usize,
    live: usize,
    n_held: usize,
    /// Connections in [`Phase::Draining`].
    n_draining: usize,
    /// `--source-addrs`: what the next socket binds to.
    sources: Sources<'a>,
    /// `--rate`: the next global message to fire.
    next_j: u64,
    /// Connections that stopped at a read or write budget with work left, as (key, gen), in
    /// order; each turn resumes them (and polls without waiting while any are queued).
    ready: VecDeque<(usize, u32)>,
    /// Set when a connect is refused before any connect succeeded.
    refused_early: bool,
}

/// Raises the soft open-file limit to the hard one and checks the run fits.
fn check_fd_limit(connections: usize) -> Result<(), LoadError> {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(_) => rlimit::Resource::NOFILE
            .get()
            .map(|(soft, _)| soft)
            .map_err(|source| LoadError::Io {
                what: "read the open-file limit",
                source,
            })?,
    };
    let open = procfs::open_fds().unwrap_or(16);
    let needed = connections as u64 + open + FD_MARGIN;
    if needed > limit {
        return Err(LoadError::FdLimit { needed, limit });
    }
    log::debug!("load: open-file limit {limit}, {open} open, {connections} connections");
    Ok(())
}

/// Runs the load; see [`super::run`].
pub(super) fn run(cfg: &LoadConfig) -> Result<Report, LoadError> {
    check_fd_limit(cfg.connections)?;
    let rss_start = cfg.server_pid.map(procfs::sample).and_then(|s| s.rss_bytes);
    let mut engine = Engine::new(cfg)?;
    let outcome = engine.run_loop()?;
    Ok(engine.report(&outcome, rss_start))
}

impl<'a> Engine<'a> {
    fn new(cfg: &'a LoadConfig) -> Result<Engine<'a>, LoadError> {
        let poll = Poll::new().map_err(|source| LoadError::Io {
            what: "create the poller",
            source,
        })?;
        let hist =
            Histogram::new_with_bounds(1, HIST_MAX_NS, HIST_SIGFIG).map_err(|e| LoadError::Io {
                what: "create the latency histogram",
                source: io::Error::other(format!("{e:?}")),
            })?;
        let t0 = Instant::now();
        let window = match cfg.mode {
            Mode::Idle => None,
            _ => Some((t0 + cfg.warmup, t0 + cfg.warmup + cfg.duration)),
        };
        let depth = if cfg.mode == Mode::Pipeline {
            cfg.depth
        } else {
            1
        };
        Ok(Engine {
            cfg,
            poll,
            slots: (0..cfg.connections).map(|_| Slot::default()).collect(),
            pattern: Pattern::new(IO_CHUNK),
            buf: vec![0; IO_CHUNK],
            params: Params {
                mode: cfg.mode,
                size: cfg.size as u64,
                stream_chunk: stream_chunk(cfg.size),
                depth,
                schedule: cfg.rate.map(|r| Schedule::new(r, cfg.connections)),
                t0,
                window,
                preamble: cfg.preamble.clone(),
            },
            stats: Stats::new(hist),
            to_open: (0..cfg.connections).collect(),
            retry: VecDeque::new(),
            connecting: VecDeque::new(),
            n_connecting: 0,
            n_unconfirmed: 0,
            live: 0,
            n_held: 0,
            n_draining: 0,
            sources: Sources::new(&cfg.source_addrs),
            next_j: 0,
            ready: VecDeque::new(),
            refused_early: false,
        })
    }

    /// Turns until the window ends (or nothing is left to measure). Returns the measured time
    /// and the server's CPU ticks over it.
    fn run_loop(&mut self) -> Result<Outcome, LoadError> {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        let t0 = self.params.t0;
        let mut cpu_start: Option<ServerSample> = None;
        let mut next_progress = t0 + PROGRESS_INTERVAL;
        let mut last_progress_ops = 0;
        let end_time;
        loop {
            let now = Instant::now();
            self.retry_due(now);
            self.open_pending(now);
            self.expire_connects(now);
            if self.stats.connected == 0 {
                self.check_reachable(now)?;
            }
            if self.params.schedule.is_some() {
                self.fire_schedule(now);
            }
            if self.params.mode == Mode::Idle && self.params.window.is_none() {
                let timed_out = now >= t0 + IDLE_SETUP_TIMEOUT;
                if self.idle_setup_done() || timed_out {
                    self.finish_idle_setup();
                    self.params.window = Some((now, now + self.cfg.duration));
                }
            }
            if let Some((start, end)) = self.params.window {
                if cpu_start.is_none() && now >= start {
                    cpu_start = Some(self.sample_server());
                }
                if now >= end {
                    end_time = end;
                    break;
                }
            }
            let nothing_left = self.live == 0
                && self.to_open.is_empty()
                && self.retry.is_empty()
                && self.params.mode != Mode::Churn;
            if nothing_left {
                end_time = now;
                break;
            }
            if self.cfg.progress && now >= next_progress {
                let ops = self.stats.ops_total;
                self.print_progress(now, ops - last_progress_ops);
                last_progress_ops = ops;
                next_progress += PROGRESS_INTERVAL;
            }

            let timeout = if self.ready.is_empty() {
                self.poll_timeout(now, next_progress)
            } else {
                Duration::ZERO
            };
            if let Err(source) = self.poll.poll(&mut events, Some(timeout)) {
                if source.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(LoadError::Io {
                    what: "poll for events",
                    source,
                });
            }
            // The clock is read per event: one event's work is bounded by the budgets, not
            // the whole batch's. Events left over after the window's end are not needed: the
            // loop ends at the top of the next turn, and the drain reads what is waiting.
            for event in events.iter() {
                let now = Instant::now();
                if self.params.past_end(now) {
                    break;
                }
                self.dispatch(event, now);
            }
            self.resume_ready();
        }
        if self.cfg.progress {
            eprintln!();
        }
        // Sample before any connection closes: idle RSS must include the held connections.
        let last = self.sample_server();
        let cpu_ticks = match (cpu_start.and_then(|s| s.cpu_ticks), last.cpu_ticks) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        let elapsed = match self.params.window {
            Some((start, end)) => end_time.min(end).saturating_duration_since(start),
            None => Duration::ZERO,
        };
        let held = self.n_held as u64;
        self.drain(&mut events);
        Ok(Outcome {
            held,
            elapsed,
            cpu_ticks,
            rss_end: last.rss_bytes,
        })
    }

    /// `--rate`: lets every connection with a message due by `now` send it.
    fn fire_schedule(&mut self, now: Instant) {
        let Some(s) = self.params.schedule else {
            return;
        };
        let elapsed = now.saturating_duration_since(self.params.t0);
        // After a long stall many messages are due; each connection sends all of its own due
        // messages when poked, so poking each connection once is enough.
        let n = self.slots.len() as u64;
        let first_not_due = s.first_j_at(elapsed);
        if first_not_due > self.next_j.saturating_add(n) {
            self.next_j = first_not_due - n;
        }
        // At most one poke per connection per call, which is enough (see above): at a rate
        // where one nanosecond holds many messages, due times rounded to the nanosecond would
        // otherwise keep this loop going long past `first_not_due`. The index saturates: at
        // `u64::MAX` the schedule is spent (never reached at a valid rate); wrapping to 0
        // would make every message due again.
        for _ in 0..n {
            let due = schedule::at(self.params.t0, s.global_due(self.next_j));
            if self.next_j == u64::MAX || due.is_none_or(|t| t > now) {
                break;
            }
            let key = s.conn_of(self.next_j);
            self.next_j += 1;
            let open = self.slots[key]
                .conn
                .as_ref()
                .is_some_and(|c| c.phase == Phase::Open);
            if open {
                self.issue_and_flush(key, now, |conn, p| conn.issue_due(key, p, now));
            }
        }
    }

    /// Idle: every connection is held or gone, and nothing is left to open.
    fn idle_setup_done(&self) -> bool {
        self.to_open.is_empty() && self.n_connecting == 0 && self.live == self.n_held
    }

    /// Idle: connections not held when setup ends count as timed out.
    fn finish_idle_setup(&mut self) {
        for key in 0..self.slots.len() {
            let pending = self.slots[key]
                .conn
                .as_ref()
                .is_some_and(|c| c.phase != Phase::Held);
            if pending {
                self.stats.error(&kind_label(ErrorKind::TimedOut));
                self.close(key);
            }
        }
        self.to_open.clear();
    }

    fn sample_server(&self) -> ServerSample {
        self.cfg.server_pid.map(procfs::sample).unwrap_or_default()
    }

    /// One progress line on stderr, rewritten in place.
    fn print_progress(&self, now: Instant, ops_in_interval: u64) {
        let t = now.saturating_duration_since(self.params.t0).as_secs_f64();
        let errors: u64 = self.stats.errors.values().sum();
        let line = match (self.params.mode, self.params.window) {
            (Mode::Idle, None) => format!(
                "[{t:6.1}s] idle setup: {} connected, {} checked, {} connecting, errors {errors}",
                self.stats.connected, self.stats.idle_checked, self.n_connecting
            ),
            (Mode::Idle, Some(_)) => format!(
                "[{t:6.1}s] idle hold: {} held, {} closed by server, errors {errors}",
                self.n_held, self.stats.closed_by_server
            ),
            (mode, window) => {
                let phase = match window {
                    Some((start, _)) if now >= start => "run",
                    _ => "warmup",
                };
                format!(
                    "[{t:6.1}s] {mode} {phase}: {ops_in_interval} ops/s, {} connections, \
                     {} closed by server, errors {errors}",
                    self.live - self.n_connecting,
                    self.stats.closed_by_server
                )
            }
        };
        eprint!("\r{line:<96}");
    }

    /// How long the next poll may wait: until the nearest deadline, at most [`MAX_POLL_WAIT`].
    fn poll_timeout(&self, now: Instant, next_progress: Instant) -> Duration {
        let t0 = self.params.t0;
        let mut wake = now + MAX_POLL_WAIT;
        let mut consider = |t: Instant| wake = wake.min(t);
        match self.params.window {
            Some((start, end)) => {
                if now < start {
                    consider(start);
                }
                consider(end);
            }
            None => consider(t0 + IDLE_SETUP_TIMEOUT),
        }
        if let Some(&(_, _, since)) = self.connecting.front() {
            consider(since + CONNECT_TIMEOUT);
        }
        if self.stats.connected == 0 {
            consider(t0 + CONNECT_TIMEOUT);
        }
        if let Some(&(due, _)) = self.retry.front() {
            consider(due);
        }
        if self.cfg.progress {
            consider(next_progress);
        }
        let mut timeout = wake.saturating_duration_since(now);
        if let Some(s) = self.params.schedule {
            let due = schedule::at(t0, s.global_due(self.next_j))
                .map_or(MAX_POLL_WAIT, |t| t.saturating_duration_since(now));
            // mio rounds a timeout up to whole milliseconds, which would send scheduled
            // messages up to 1 ms late. Sleep whole milliseconds only, and spin (zero
            // timeout) through the last one, so sends leave on time.
            timeout = Duration::from_millis(timeout.min(due).as_millis() as u64);
        }
        timeout
    }

    /// The report from the counters.
    fn report(&self, outcome: &Outcome, rss_start: Option<u64>) -> Report {
        let cfg = self.cfg;
        let s = &self.stats;
        let secs = outcome.elapsed.as_secs_f64();
        let per_sec = |v: u64| if secs > 0.0 { v as f64 / secs } else { 0.0 };
        let ops = match cfg.mode {
            Mode::Stream => s.bytes / cfg.size as u64,
            Mode::Idle => s.idle_checked,
            _ => s.ops,
        };
        // Message modes count whole messages, so bytes = ops × size exactly; stream counts
        // every verified byte; idle times nothing.
        let bytes = match cfg.mode {
            Mode::Stream => s.bytes,
            Mode::Idle => 0,
            _ => s.ops * cfg.size as u64,
        };
        let timed = !matches!(cfg.mode, Mode::Stream | Mode::Idle);
        let latency = (timed && !s.hist.is_empty()).then(|| {
            let us = |ns: u64| ns as f64 / 1000.0;
            Latency {
                samples: s.hist.len(),
                mean_us: s.hist.mean() / 1000.0,
                p50_us: us(s.hist.value_at_quantile(0.50)),
                p90_us: us(s.hist.value_at_quantile(0.90)),
                p99_us: us(s.hist.value_at_quantile(0.99)),
                p999_us: us(s.hist.value_at_quantile(0.999)),
                max_us: us(s.hist.max()),
            }
        });
        let server_cpu_us = outcome
            .cpu_ticks
            .map(|ticks| ticks as f64 * 1e6 / procfs::clk_tck() as f64);
        Report {
            mode: cfg.mode,
            connect: cfg.connect,
            connections: cfg.connections,
            size: cfg.size,
            depth: self.params.depth,
            rate: cfg.rate,
            duration: cfg.duration,
            warmup: cfg.warmup,
            source_addrs: cfg.source_addrs.clone(),
            server_pid: cfg.server_pid,
            elapsed: outcome.elapsed,
            ops,
            ops_per_sec: if cfg.mode == Mode::Idle {
                0.0
            } else {
                per_sec(ops)
            },
            bytes,
            mb_per_sec: per_sec(bytes) / 1e6,
            latency,
            errors: s.errors.clone(),
            closed_by_server: s.closed_by_server,
            connected: s.connected,
            connections_held: (cfg.mode == Mode::Idle).then_some(outcome.held),
            connects_per_sec: (cfg.mode == Mode::Churn).then(|| per_sec(s.ops)),
            server_cpu_us,
            server_cpu_us_per_op: server_cpu_us
                .filter(|_| cfg.mode != Mode::Idle && ops > 0)
                .map(|us| us / ops as f64),
            server_rss_start_bytes: rss_start,
            server_rss_bytes: outcome.rss_end,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_key_and_generation() {
        for (key, gen) in [(0usize, 0u32), (19_999, 1), (7, u32::MAX), (0xffff_ffff, 3)] {
            assert_eq!(split_token(token(key, gen)), (key, gen));
        }
        assert_ne!(token(5, 1), token(5, 2), "a reused slot gets a new token");
    }
}
