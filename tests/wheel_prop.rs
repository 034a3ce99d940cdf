//! The hashed wheel against an obviously correct model: a `BTreeMap` ordered by deadline.
//!
//! Random sequences of inserts (in the past, within one rotation, several rotations ahead, near
//! `u64::MAX / 2`) and advances (small and large steps, unlimited and small budgets) go to both.
//! After every advance the fired entries must be exactly the model's entries with
//! `when <= now`: nothing early, late, lost or duplicated. The wheel has 64 slots so that
//! rotations happen all the time. The pattern is BurntSushi/memchr `src/tests/memchr/prop.rs`.

use std::collections::BTreeMap;

use proptest::prelude::*;
use sockman::wheel::{Entry, Wheel};

/// A tick, as the wheel counts them.
type Tick = u64;

const SLOTS: u64 = 64;
const NEAR_HALF: Tick = u64::MAX / 2;

/// `(when, seq) -> (key, gen)`: the reference the wheel replaces, minus its O(log n) cost.
type Model = BTreeMap<(Tick, u64), (u32, u32)>;

#[derive(Clone, Debug)]
enum When {
    /// `elapsed - d`, saturating: already due.
    Past(u64),
    /// `elapsed + d`, `d < 64`: within one rotation.
    Near(u64),
    /// `elapsed + d`, up to ten rotations ahead.
    Far(u64),
    /// `u64::MAX / 2 + d`, `d` possibly negative: a long way ahead, until a jump gets there.
    Half(i64),
}

#[derive(Clone, Debug)]
enum Op {
    Insert {
        gen: u32,
        when: When,
    },
    /// Advance to `elapsed + step` with `budget` per call, calling until it returns false.
    Advance {
        step: u64,
        budget: usize,
    },
    /// Advance to just around `u64::MAX / 2` (or nowhere, if already past it).
    JumpToHalf {
        delta: i64,
        budget: usize,
    },
    /// Advance to a tick before `elapsed`: must be a no-op.
    Backwards {
        by: u64,
    },
}

fn budget() -> impl Strategy<Value = usize> {
    prop_oneof![3 => Just(usize::MAX), 1 => 1usize..4, 1 => 4usize..20]
}

fn op() -> impl Strategy<Value = Op> {
    let when = prop_oneof![
        2 => (0u64..200).prop_map(When::Past),
        4 => (0u64..SLOTS).prop_map(When::Near),
        3 => (0u64..SLOTS * 10).prop_map(When::Far),
        1 => (-300i64..300).prop_map(When::Half),
    ];
    prop_oneof![
        6 => (any::<u32>(), when).prop_map(|(gen, when)| Op::Insert { gen, when }),
        3 => (0u64..4, budget()).prop_map(|(step, budget)| Op::Advance { step, budget }),
        2 => (0u64..SLOTS * 3, budget()).prop_map(|(step, budget)| Op::Advance { step, budget }),
        1 => (0u64..SLOTS * 40, budget()).prop_map(|(step, budget)| Op::Advance { step, budget }),
        1 => (-200i64..200, budget()).prop_map(|(delta, budget)| Op::JumpToHalf { delta, budget }),
        1 => (1u64..100).prop_map(|by| Op::Backwards { by }),
    ]
}

struct Harness {
    wheel: Wheel,
    model: Model,
    seq: u64,
}

impl Harness {
    fn new() -> Harness {
        Harness {
            wheel: Wheel::with_slots(SLOTS as usize),
            model: Model::new(),
            seq: 0,
        }
    }

    fn insert(&mut self, gen: u32, when: Tick) {
        // The key is the sequence number, so every entry is distinguishable.
        let key = self.seq as u32;
        self.wheel.insert(key, gen, when);
        self.model.insert((when, self.seq), (key, gen));
        self.seq += 1;
        assert_eq!(self.wheel.len(), self.model.len());
    }

    fn advance(&mut self, now: Tick, budget: usize) {
        let mut fired = Vec::new();
        let mut calls = 0;
        loop {
            let before = fired.len();
            let more = self.wheel.advance(now, budget, &mut fired);
            assert!(fired.len() - before <= budget, "budget {budget} exceeded");
            if !more {
                break;
            }
            assert!(
                self.wheel.elapsed() <= now,
                "elapsed {} past now {now}",
                self.wheel.elapsed()
            );
            let next = self.wheel.next_deadline().expect("due entries remain");
            assert!(
                next <= self.wheel.elapsed(),
                "next_deadline {next} with due entries left"
            );
            calls += 1;
            assert!(calls <= 100_000, "advance never finished");
        }
        assert_eq!(self.wheel.elapsed(), now.saturating_add(1));

        let later = match now.checked_add(1) {
            Some(after) => self.model.split_off(&(after, 0)),
            None => Model::new(),
        };
        let due = std::mem::replace(&mut self.model, later);
        let mut expected: Vec<Entry> = due
            .iter()
            .map(|(&(when, _), &(key, gen))| Entry { key, gen, when })
            .collect();
        expected.sort_unstable();
        fired.sort_unstable();
        assert_eq!(fired, expected, "fired set at now = {now}");
        self.check();
    }

    fn check(&self) {
        assert_eq!(self.wheel.len(), self.model.len());
        assert_eq!(self.wheel.is_empty(), self.model.is_empty());
        let elapsed = self.wheel.elapsed();
        let next = self.wheel.next_deadline();
        match self.model.keys().next() {
            None => assert_eq!(next, None),
            Some(&(min, _)) => {
                let next = next.expect("entries but no next_deadline");
                assert!(next <= min.max(elapsed), "next_deadline {next} > min {min}");
                let (&(max, _), _) = self.model.last_key_value().unwrap();
                if max < elapsed.saturating_add(SLOTS) {
                    assert_eq!(next, min.max(elapsed), "exact within one rotation");
                }
            }
        }
    }

    fn apply(&mut self, op: &Op) {
        let elapsed = self.wheel.elapsed();
        match *op {
            Op::Insert { gen, ref when } => {
                let when = match *when {
                    When::Past(d) => elapsed.saturating_sub(d),
                    When::Near(d) | When::Far(d) => elapsed.saturating_add(d),
                    When::Half(d) => NEAR_HALF.saturating_add_signed(d),
                };
                self.insert(gen, when);
            }
            Op::Advance { step, budget } => self.advance(elapsed.saturating_add(step), budget),
            Op::JumpToHalf { delta, budget } => {
                let now = NEAR_HALF.saturating_add_signed(delta);
                if now >= elapsed {
                    self.advance(now, budget);
                }
            }
            Op::Backwards { by } => {
                let Some(now) = elapsed.checked_sub(by) else {
                    return;
                };
                let mut out = Vec::new();
                assert!(!self.wheel.advance(now, usize::MAX, &mut out));
                assert!(
                    out.is_empty(),
                    "advance to {now} < elapsed {elapsed} fired {out:?}"
                );
                assert_eq!(self.wheel.elapsed(), elapsed);
                self.check();
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn wheel_matches_btreemap_model(ops in prop::collection::vec(op(), 1..200)) {
        let mut harness = Harness::new();
        for op in &ops {
            harness.apply(op);
        }
        // Finally everything fires, exactly once.
        harness.advance(u64::MAX, usize::MAX);
        prop_assert!(harness.wheel.is_empty());
    }
}

/// One entry per tick over 0..300 (three at every seventh tick), advanced one tick at a time:
/// exactly the entries for that tick fire at each step (tokio `poll_process_levels`).
fn tick_by_tick(budget: usize) {
    const END: Tick = 300;
    let mut wheel = Wheel::with_slots(SLOTS as usize);
    let mut expected: BTreeMap<Tick, Vec<Entry>> = BTreeMap::new();
    let mut key = 0;
    for when in 0..END {
        let copies = if when % 7 == 3 { 3 } else { 1 };
        for gen in 0..copies {
            wheel.insert(key, gen, when);
            expected
                .entry(when)
                .or_default()
                .push(Entry { key, gen, when });
            key += 1;
        }
    }
    let mut remaining = key as usize;
    for now in 0..END + 2 * SLOTS {
        assert_eq!(
            wheel.next_deadline(),
            (now < END).then_some(now),
            "next_deadline at {now}"
        );
        let mut fired = Vec::new();
        while wheel.advance(now, budget, &mut fired) {}
        fired.sort_unstable();
        let want = expected.remove(&now).unwrap_or_default();
        assert_eq!(fired, want, "fired at tick {now}");
        remaining -= fired.len();
        assert_eq!(wheel.len(), remaining);
        assert_eq!(wheel.elapsed(), now + 1);
    }
    assert!(wheel.is_empty());
}

#[test]
fn every_tick_fires_exactly_its_entries() {
    tick_by_tick(usize::MAX);
}

#[test]
fn every_tick_fires_exactly_its_entries_with_budget_one() {
    tick_by_tick(1);
}

/// The same 0..300 entries, but inserted as the ticks pass (always a few rotations ahead),
/// advanced by varying strides.
#[test]
fn strides_fire_exactly_the_due_entries() {
    for stride in [1, 2, 3, 63, 64, 65, 127, 128, 129, 1000] {
        let mut wheel = Wheel::with_slots(SLOTS as usize);
        for when in 0..300u64 {
            wheel.insert(when as u32, 0, when);
        }
        let mut now = 0;
        let mut last = None;
        while !wheel.is_empty() {
            let mut fired = Vec::new();
            assert!(!wheel.advance(now, usize::MAX, &mut fired));
            let mut whens: Vec<Tick> = fired.iter().map(|e| e.when).collect();
            whens.sort_unstable();
            let from = last.map_or(0, |l: Tick| l + 1);
            let want: Vec<Tick> = (from..=now.min(299)).collect();
            assert_eq!(whens, want, "stride {stride}, now {now}");
            last = Some(now);
            now += stride;
        }
    }
}
