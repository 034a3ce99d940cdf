//! The loop's unit of time: ticks since the loop started, and their conversion to and from
//! `Instant`s and `Duration`s.
//!
//! Time is an input ([`Server::turn_at`](crate::Server::turn_at)): the loop reads the clock in
//! one place (`Server::turn`, after its poll) or takes `now` from its caller, turns it into one
//! tick per turn with [`Clock::tick_at`], and passes that tick to everything below. Nothing else
//! reads the clock, so a test can step time exactly (smoltcp's `Interface::poll(timestamp)`).
//!
//! # Rounding
//! An instant rounds *down* to its tick ([`Clock::tick_at`]); a duration rounds *up* to whole
//! ticks ([`Clock::ticks`]). A deadline is `stamp + ticks + 1`, so it is never early: a
//! connection active late in tick `t` is not closed before a full timeout has passed.

use std::time::{Duration, Instant};

/// An absolute tick number since the loop started (tick 0 is [`Clock::start`]).
pub(crate) type Tick = u64;

/// "No deadline" for tick-valued fields.
pub(crate) const NEVER: Tick = Tick::MAX;

/// The deadline `ticks` after `stamp`: `stamp + ticks + 1`. Stamps are rounded down to their
/// tick, so the `+ 1` keeps a deadline from coming before its full timeout (and it comes within
/// one tick after it).
pub(crate) fn deadline(stamp: Tick, ticks: Tick) -> Tick {
    stamp.saturating_add(ticks).saturating_add(1)
}

/// Ticks are capped here when a duration is converted, far below overflow, so that
/// `stamp + ticks + 1` never wraps.
const MAX_TICKS: Tick = Tick::MAX / 4;

/// Converts between instants and ticks for one loop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    /// Tick 0. Monotonic: wall-clock steps must not close connections.
    start: Instant,
    /// Length of a tick in nanoseconds (at least 1 ms, see `Config::validate`).
    tick_ns: u64,
}

impl Clock {
    pub(crate) fn new(start: Instant, tick: Duration) -> Clock {
        Clock {
            start,
            tick_ns: tick.as_nanos().clamp(1, u64::MAX as u128) as u64,
        }
    }

    /// The tick `at` falls in (rounded down); instants before the start are tick 0.
    pub(crate) fn tick_at(&self, at: Instant) -> Tick {
        (at.saturating_duration_since(self.start).as_nanos() / self.tick_ns as u128)
            .min(MAX_TICKS as u128) as Tick
    }

    /// The instant tick `t` begins, if it is representable.
    pub(crate) fn instant_of(&self, t: Tick) -> Option<Instant> {
        let ns = t.checked_mul(self.tick_ns)?;
        self.start.checked_add(Duration::from_nanos(ns))
    }

    /// Whole ticks in `d`, rounded up (a timeout is never shortened), capped far below overflow.
    pub(crate) fn ticks(&self, d: Duration) -> Tick {
        d.as_nanos()
            .div_ceil(self.tick_ns as u128)
            .min(MAX_TICKS as u128) as Tick
    }

    /// The length of `ticks` ticks.
    pub(crate) fn duration(&self, ticks: Tick) -> Duration {
        Duration::from_nanos(ticks.saturating_mul(self.tick_ns))
    }

    /// `ticks` ticks in microseconds (saturating), for lifetimes and ages.
    pub(crate) fn micros(&self, ticks: Tick) -> u64 {
        (ticks as u128 * self.tick_ns as u128 / 1000).min(u64::MAX as u128) as u64
    }

    /// Tick 0.
    pub(crate) fn start(&self) -> Instant {
        self.start
    }
}

/// The earlier of two optional times (`None` = never).
pub(crate) fn earlier<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_round_down_and_durations_round_up() {
        let start = Instant::now();
        let c = Clock::new(start, Duration::from_millis(10));
        assert_eq!(c.tick_at(start), 0);
        assert_eq!(c.tick_at(start + Duration::from_micros(9_999)), 0);
        assert_eq!(c.tick_at(start + Duration::from_millis(10)), 1);
        assert_eq!(c.ticks(Duration::ZERO), 0);
        assert_eq!(c.ticks(Duration::from_nanos(1)), 1);
        assert_eq!(c.ticks(Duration::from_millis(10)), 1);
        assert_eq!(c.ticks(Duration::from_millis(11)), 2);
        assert_eq!(c.instant_of(3), Some(start + Duration::from_millis(30)));
        assert_eq!(c.duration(3), Duration::from_millis(30));
        assert_eq!(c.micros(3), 30_000);
        // Before the start is tick 0; absurd durations are capped, not wrapped.
        assert_eq!(
            c.tick_at(start - Duration::from_millis(5).min(start.elapsed())),
            0
        );
        assert_eq!(c.ticks(Duration::MAX), MAX_TICKS);
        assert!(c.instant_of(NEVER).is_none());
    }
}
