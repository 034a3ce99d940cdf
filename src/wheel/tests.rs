//! Unit tests of the wheel: slot arithmetic at its boundaries, entries in the past and beyond a
//! rotation, the expiry budget, memory given back, and the sweep (`retain`).

use super::*;

fn advance_all(wheel: &mut Wheel, now: u64) -> Vec<Entry> {
    let mut out = Vec::new();
    assert!(!wheel.advance(now, usize::MAX, &mut out));
    wheel.check_invariants();
    out
}

#[test]
fn slots_rounded_and_clamped() {
    for (asked, slots) in [
        (0, 64),
        (1, 64),
        (64, 64),
        (65, 128),
        (1000, 1024),
        (MAX_SLOTS, MAX_SLOTS),
        (MAX_SLOTS + 1, MAX_SLOTS),
        (usize::MAX, MAX_SLOTS),
    ] {
        assert_eq!(
            Wheel::with_slots(asked).slots(),
            slots,
            "with_slots({asked})"
        );
    }
    for (span, slots) in [
        (0, 64),
        (62, 64),
        (63, 128),
        (6000, 8192),
        (8190, 8192),
        (8191, 16384),
        (65534, 65536),
        (65535, 65536),
        (u64::MAX, 65536),
    ] {
        assert_eq!(Wheel::for_span(span).slots(), slots, "for_span({span})");
    }
}

#[test]
fn slot_for_boundaries() {
    // (elapsed, when, slot) on a 64-slot wheel.
    for (elapsed, when, slot) in [
        (0, 0, 0),
        (0, 1, 1),
        (0, 63, 63),
        (0, 64, 0),
        (0, 65, 1),
        (0, 64 * 1000 + 5, 5),
        (10, 0, 10),
        (10, 9, 10),
        (10, 10, 10),
        (10, 11, 11),
        (63, 62, 63),
        (64, 0, 0),
        (130, 127, 2),
        (0, u64::MAX, 63),
        (0, u64::MAX / 2, 63),
        (u64::MAX, 0, 63),
    ] {
        let mut wheel = Wheel::with_slots(64);
        wheel.elapsed = elapsed;
        assert_eq!(wheel.slot_for(when), slot, "elapsed {elapsed}, when {when}");
    }
}

#[test]
fn next_occupied_boundaries() {
    let mut wheel = Wheel::with_slots(256);
    for slot in [0usize, 63, 64, 200] {
        wheel.insert(slot as u32, 0, slot as u64);
    }
    // (from, limit, found)
    for (from, limit, found) in [
        (0, 255, Some(0)),
        (1, 255, Some(62)),
        (1, 61, None),
        (1, 62, Some(62)),
        (63, 0, Some(0)),
        (64, 0, Some(0)),
        (65, 255, Some(135)),
        (65, 134, None),
        (201, 255, Some(55)), // wraps to slot 0
        (201, 54, None),
        (255, 1, Some(1)),
    ] {
        assert_eq!(
            wheel.next_occupied(from, limit),
            found,
            "from {from} limit {limit}"
        );
    }
}

#[test]
fn insert_in_past_fires_on_next_advance() {
    let mut wheel = Wheel::with_slots(64);
    assert!(advance_all(&mut wheel, 100).is_empty());
    assert_eq!(wheel.elapsed(), 101);
    wheel.insert(1, 0, 5);
    wheel.insert(2, 0, 100);
    wheel.insert(3, 0, 101);
    wheel.check_invariants();
    assert_eq!(wheel.next_deadline(), Some(101));
    let mut fired = advance_all(&mut wheel, 101);
    fired.sort();
    let keys: Vec<u32> = fired.iter().map(|e| e.key).collect();
    assert_eq!(keys, [1, 2, 3]);
    assert!(wheel.is_empty());
    assert_eq!(wheel.next_deadline(), None);
}

#[test]
fn far_future_entry_fires_exactly_at_its_tick() {
    let mut wheel = Wheel::with_slots(64);
    let when = 64 * 7 + 9;
    wheel.insert(1, 0, when);
    // Visit its slot (tick ≡ 9 mod 64) in every earlier rotation, one tick at a time.
    for now in 0..when {
        assert!(
            advance_all(&mut wheel, now).is_empty(),
            "fired early at {now}"
        );
        assert_eq!(wheel.len(), 1);
        let next = wheel.next_deadline().unwrap();
        assert!(next > now && next <= when, "next_deadline {next} at {now}");
    }
    assert_eq!(wheel.next_deadline(), Some(when));
    assert_eq!(
        advance_all(&mut wheel, when),
        [Entry {
            key: 1,
            gen: 0,
            when
        }]
    );
    // And with jumps that land just before it.
    wheel.insert(2, 0, when + 64 * 3);
    assert!(advance_all(&mut wheel, when + 64 * 3 - 1).is_empty());
    assert_eq!(advance_all(&mut wheel, u64::MAX / 2).len(), 1);
}

#[test]
fn budget_drains_a_huge_slot_in_parts() {
    const N: u32 = 20_000;
    let mut wheel = Wheel::with_slots(64);
    for key in 0..N {
        wheel.insert(key, 0, 10);
    }
    wheel.insert(N, 0, 11);
    wheel.insert(N + 1, 0, 10 + 64); // same slot, next rotation
    let mut out = Vec::new();
    let mut calls = 0;
    while wheel.advance(11, 4096, &mut out) {
        calls += 1;
        assert_eq!(out.len(), calls * 4096);
        assert_eq!(wheel.elapsed(), 10, "stays at the partly processed tick");
        assert_eq!(wheel.next_deadline(), Some(10));
        wheel.check_invariants();
    }
    assert_eq!(calls, 4);
    assert_eq!(out.len(), N as usize + 1);
    let mut keys: Vec<u32> = out.iter().map(|e| e.key).collect();
    keys.sort_unstable();
    assert!(keys.iter().copied().eq(0..=N));
    assert_eq!(wheel.elapsed(), 12);
    assert_eq!(wheel.len(), 1);
    assert_eq!(wheel.next_deadline(), Some(74));
    wheel.check_invariants();
}

#[test]
fn next_deadline_after_partial_budget_is_elapsed() {
    let mut wheel = Wheel::with_slots(64);
    for key in 0..10 {
        wheel.insert(key, 0, 30 + u64::from(key));
    }
    let mut out = Vec::new();
    // A jump past all of them with a budget of 3: fires 30, 31, 32 and stops at 33.
    assert!(wheel.advance(1000, 3, &mut out));
    assert_eq!(wheel.elapsed(), 33);
    assert_eq!(wheel.next_deadline(), Some(wheel.elapsed()));
    // Budget 0 hands out nothing but still reports the due work.
    assert!(wheel.advance(1000, 0, &mut out));
    assert_eq!(out.len(), 3);
    assert!(wheel.next_deadline().unwrap() <= wheel.elapsed());
    while wheel.advance(1000, 3, &mut out) {}
    assert_eq!(out.len(), 10);
    assert_eq!(wheel.next_deadline(), None);
    assert_eq!(wheel.elapsed(), 1001);
}

#[test]
fn now_before_elapsed_is_a_noop() {
    let mut wheel = Wheel::with_slots(64);
    wheel.insert(1, 0, 50);
    advance_all(&mut wheel, 40);
    let mut out = Vec::new();
    assert!(!wheel.advance(3, usize::MAX, &mut out));
    assert!(out.is_empty());
    assert_eq!(wheel.elapsed(), 41);
    assert_eq!(wheel.len(), 1);
}

#[test]
fn huge_jump_scans_at_most_one_rotation() {
    // No per-tick and no per-rotation loop: a jump of 10^12 ticks reads at most one
    // rotation of bitmap words (plus one to wrap) for each occupied slot it stops at.
    // Counted, not timed: a wall-clock bound flakes on a shared CI machine.
    let mut wheel = Wheel::for_span(65_535);
    let words = (wheel.slots() / 64) as u64;
    for key in 0..1000u32 {
        wheel.insert(key, 0, u64::from(key) * 1_000_000_007);
    }
    let mut now = 0;
    for _ in 0..1000 {
        let before = wheel.words_scanned.get();
        let due_before = wheel.len();
        now += 1_000_000_000_000;
        advance_all(&mut wheel, now);
        let fired = (due_before - wheel.len()) as u64;
        let scanned = wheel.words_scanned.get() - before;
        assert!(
            scanned <= (fired + 1) * (words + 1),
            "a jump to {now} read {scanned} bitmap words for {fired} fired entries ({words} words per rotation)"
        );
    }
    assert!(wheel.is_empty());
    // Saturating at the very end of time.
    wheel.insert(1, 0, u64::MAX);
    assert_eq!(advance_all(&mut wheel, u64::MAX).len(), 1);
    assert_eq!(wheel.elapsed(), u64::MAX);
}

#[test]
fn mass_expiry_gives_memory_back() {
    let mut wheel = Wheel::with_slots(64);
    for key in 0..20_000 {
        wheel.insert(key, 0, 5);
    }
    wheel.insert(20_000, 0, 5 + 64);
    let slot = 5;
    assert!(wheel.slots[slot].capacity() >= 20_000);
    let fired = advance_all(&mut wheel, 5);
    assert_eq!(fired.len(), 20_000);
    assert_eq!(wheel.slots[slot].len(), 1);
    assert!(
        wheel.slots[slot].capacity() <= SHRINK_FLOOR,
        "{}",
        wheel.slots[slot].capacity()
    );
    // A small steady slot keeps its capacity.
    for key in 0..SHRINK_FLOOR as u32 {
        wheel.insert(key, 0, 7);
    }
    let capacity = wheel.slots[7].capacity();
    advance_all(&mut wheel, 7);
    assert_eq!(wheel.slots[7].capacity(), capacity);
}

#[test]
fn debug_is_a_summary() {
    let mut wheel = Wheel::with_slots(64);
    wheel.insert(1, 2, 3);
    assert_eq!(
        format!("{wheel:?}"),
        "Wheel { slots: 64, elapsed: 0, len: 1, next_deadline: Some(3) }"
    );
}

#[test]
fn retain_drops_entries_and_keeps_the_invariants() {
    let mut wheel = Wheel::with_slots(64);
    for key in 0..1000u32 {
        wheel.insert(key, key % 3, u64::from(key) * 7);
    }
    wheel.retain(|e| e.gen != 0);
    wheel.check_invariants();
    assert_eq!(wheel.len(), 1000 - 334);
    let mut out = Vec::new();
    wheel.advance(u64::MAX / 2, usize::MAX, &mut out);
    assert_eq!(out.len(), 1000 - 334);
    assert!(out.iter().all(|e| e.gen != 0));
    wheel.check_invariants();
    wheel.retain(|_| false);
    assert!(wheel.is_empty());
    assert_eq!(wheel.next_deadline(), None);
}
