//! Idle-deadline bookkeeping for N open connections (10k, 100k, 1M), as the server does it.
//!
//! Scenario: a 10 ms tick and a 60 s idle timeout (6000 ticks); every connection is busy and
//! sends something every second (100 ticks), so it never times out but its deadline moves on
//! every read.
//!
//! - `touch`: what a read costs for the deadline. sockman stores `last_active[key] = now` and
//!   leaves the wheel alone (`store`); the baseline is the `BTreeMap<(deadline, key)>` a
//!   timer-per-connection design re-keys on every read (`btreemap_remove_insert`).
//! - `advance_one_tick`: the steady-state cost of one loop turn's expiry step with N entries
//!   spread uniformly over the timeout. Each fired entry is re-inserted lazily at
//!   `last_active + timeout`, as the server does when the connection was active meanwhile.
//! - `mass_expiry_20k`: one slot holding 20 000 connections expires at once, with an unlimited
//!   budget and with the server's default budget of 4096 entries per call.
//!
//! Setup (filling wheels and maps) is outside the timed part. Run: `cargo bench --bench wheel`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use sockman::wheel::{Entry, Wheel};

/// A tick, as the wheel counts them.
type Tick = u64;

/// 60 s at a 10 ms tick.
const TIMEOUT: Tick = 6000;
/// A busy connection is active once a second.
const ACTIVITY_PERIOD: Tick = 100;
const SIZES: [usize; 3] = [10_000, 100_000, 1_000_000];
/// Touches per timed batch: keys come from a precomputed pseudo-random sequence.
const KEY_SEQUENCE: usize = 1 << 16;

/// A fixed pseudo-random key sequence (xorshift), so touches miss the cache like real ones.
fn keys(n: usize) -> Vec<usize> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..KEY_SEQUENCE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        })
        .collect()
}

fn touch(c: &mut Criterion) {
    let mut group = c.benchmark_group("touch");
    for &n in &SIZES {
        let keys = keys(n);

        // sockman: a store to the connection's `last_active`. The wheel is not touched.
        let mut last_active: Vec<Tick> = vec![0; n];
        let mut now: Tick = 0;
        group.bench_function(BenchmarkId::new("store", n), |b| {
            let mut i = 0;
            b.iter(|| {
                let key = keys[i % KEY_SEQUENCE];
                i += 1;
                now += 1;
                last_active[black_box(key)] = now;
            });
        });
        black_box(&last_active);

        // Baseline: one ordered deadline per connection, moved on every read.
        let mut deadline: Vec<Tick> = (0..n as u64).map(|k| k % TIMEOUT).collect();
        let mut map: BTreeMap<(Tick, u32), ()> = deadline
            .iter()
            .enumerate()
            .map(|(k, &d)| ((d, k as u32), ()))
            .collect();
        let mut now: Tick = TIMEOUT;
        group.bench_function(BenchmarkId::new("btreemap_remove_insert", n), |b| {
            let mut i = 0;
            b.iter(|| {
                let key = keys[i % KEY_SEQUENCE];
                i += 1;
                now += 1;
                map.remove(&(deadline[key], key as u32));
                deadline[key] = now + TIMEOUT;
                map.insert((deadline[key], key as u32), ());
            });
        });
        black_box(&map);
    }
    group.finish();
}

/// The last tick `<= now` at which connection `key` was active: it is active every
/// `ACTIVITY_PERIOD` ticks, at an offset of its own. Reading this is what reading the
/// connection's stored `last_active` amounts to.
fn last_active(key: u32, now: Tick) -> Tick {
    let phase = u64::from(key) % ACTIVITY_PERIOD;
    now - (now + ACTIVITY_PERIOD - phase) % ACTIVITY_PERIOD
}

fn advance_one_tick(c: &mut Criterion) {
    let mut group = c.benchmark_group("advance_one_tick");
    for &n in &SIZES {
        let mut wheel = Wheel::for_span(TIMEOUT);
        let mut fired: Vec<Entry> = Vec::with_capacity(n / TIMEOUT as usize * 4 + 64);
        // Start one timeout in, so that `last_active` never underflows.
        let mut now: Tick = TIMEOUT;
        wheel.advance(now - 1, usize::MAX, &mut fired);
        for key in 0..n as u32 {
            let when = now + 1 + u64::from(key) * TIMEOUT / n as u64;
            wheel.insert(key, 0, when);
        }
        let gens: Vec<u32> = vec![0; n];
        // Warm up into the steady state: one full timeout period.
        for _ in 0..TIMEOUT {
            now += 1;
            step(&mut wheel, now, &gens, &mut fired);
        }
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_custom(|iters| {
                let begin = Instant::now();
                for _ in 0..iters {
                    now += 1;
                    step(&mut wheel, now, &gens, &mut fired);
                }
                begin.elapsed()
            });
        });
        assert_eq!(wheel.len(), n, "steady state keeps every connection");
    }
    group.finish();
}

/// One tick of the server's expiry step: advance, then drop stale / re-insert active / close.
fn step(wheel: &mut Wheel, now: Tick, gens: &[u32], fired: &mut Vec<Entry>) {
    let more = wheel.advance(now, usize::MAX, fired);
    debug_assert!(!more);
    for entry in fired.drain(..) {
        if gens[entry.key as usize] != entry.gen {
            continue; // stale: the connection is gone
        }
        let active = last_active(entry.key, now);
        if now - active < TIMEOUT {
            wheel.insert(entry.key, entry.gen, active + TIMEOUT);
        } else {
            unreachable!("busy connections never time out in this scenario");
        }
    }
}

fn mass_expiry(c: &mut Criterion) {
    const N: u32 = 20_000;
    const WHEN: Tick = 100;
    let mut group = c.benchmark_group("mass_expiry_20k");
    let setup = || {
        let mut wheel = Wheel::for_span(TIMEOUT);
        for key in 0..N {
            wheel.insert(key, 0, WHEN);
        }
        (wheel, Vec::with_capacity(N as usize))
    };
    group.bench_function("unlimited_budget", |b| {
        b.iter_batched(
            setup,
            |(mut wheel, mut out)| {
                let more = wheel.advance(WHEN, usize::MAX, &mut out);
                assert!(!more && out.len() == N as usize);
                (wheel, out)
            },
            BatchSize::LargeInput,
        );
    });
    group.bench_function("budget_4096_all_calls", |b| {
        b.iter_batched(
            setup,
            |(mut wheel, mut out)| {
                let mut calls = 1;
                while wheel.advance(WHEN, 4096, &mut out) {
                    calls += 1;
                }
                assert!(calls == 5 && out.len() == N as usize);
                (wheel, out)
            },
            BatchSize::LargeInput,
        );
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = touch, advance_one_tick, mass_expiry
}
criterion_main!(benches);
