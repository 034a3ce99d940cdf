//! A single-level hashed timing wheel over `u64` ticks, holding `(slab key, generation)` entries.
//!
//! Public only for the benches and the property tests (`#[doc(hidden)]`): not part of the API.
//!
//! The server keeps one entry per connection for its earliest deadline (idle timeout, write
//! stall). [`Wheel::advance`] hands back the entries that are due; [`Wheel::next_deadline`] tells
//! the loop how long it may sleep. The wheel knows nothing about connections or clocks: time is
//! an input (`now`), and what an entry means is the caller's business.
//!
//! # Invariant
//!
//! An entry lives in slot `max(when, elapsed) & mask`:
//!
//! - an entry with `when >= elapsed` is in slot `when & mask`;
//! - an entry with `when < elapsed` (inserted in the past, or left due by a budget) is in slot
//!   `elapsed & mask`, the slot the next [`advance`](Wheel::advance) visits first.
//!
//! Every tick below `elapsed` has been fully processed, so nothing with `when < elapsed` exists
//! anywhere else. Each slot's bit in the occupancy bitmap is set exactly when the slot is
//! non-empty, and `len` is the number of entries.
//!
//! # Algorithm
//!
//! Scheme 6 of Varghese & Lauck, "Hashed and Hierarchical Timing Wheels" (SOSP 1987,
//! <http://www.cs.columbia.edu/~nahum/w6998/papers/sosp87-timing-wheels.pdf>): `2^k` slots, each
//! a `Vec<Entry>`; an entry hashes to `when & mask`. A deadline more than one rotation away
//! shares its slot with nearer ones and is simply skipped (left in place) when the slot is
//! visited before its rotation: firing checks `when <= now`, there is no round counter to keep.
//! A bitmap of occupied slots (one bit per slot, in `u64` words) lets `advance` and
//! `next_deadline` jump between non-empty slots with `trailing_zeros`, as tokio's wheel levels do
//! (`tokio/src/runtime/time/wheel/level.rs`); unlike tokio there is one level, no intrusive
//! list and no `unsafe`.
//!
//! # Cost
//!
//! - [`insert`](Wheel::insert): O(1) amortised (a `Vec::push`), 16 bytes per entry.
//! - [`advance`](Wheel::advance): O(words scanned + entries in the visited slots). It scans the
//!   bitmap only over the ticks it moves across, and at most one rotation, so a jump of `10^12`
//!   ticks costs the same as a jump of one rotation. No per-tick and no per-rotation loop.
//! - [`next_deadline`](Wheel::next_deadline): O(slots / 64) words in the worst case (128 words
//!   for a 60 s timeout at a 10 ms tick), usually one.
//! - Nothing at all for cancellation: there is none (see below).
//!
//! # Why lazy
//!
//! Activity on a connection does not touch the wheel: the connection only stores its
//! `last_active` tick. When the entry fires, the server drops it if the generation is stale,
//! re-inserts it at `last_active + timeout` if the connection was active meanwhile, and closes
//! the connection otherwise. A busy connection therefore costs about one wheel operation per
//! timeout period instead of one per read, and a closed connection costs nothing until its stale
//! entry fires. This is what a `BTreeMap` or heap of deadlines (O(log n) on every activity) would
//! cost instead, and why nginx, Netty's `IdleStateHandler` and tokio's `extend_expiration` are
//! lazy too.

use std::cell::Cell;
use std::fmt;

/// The fewest slots a wheel has: one bitmap word.
const MIN_SLOTS: usize = 64;

/// The most slots [`Wheel::for_span`] chooses: 65 536 slots cover 10.9 minutes at a 10 ms tick;
/// longer deadlines just wait for a later rotation.
const MAX_SPAN_SLOTS: usize = 1 << 16;

/// The most slots [`Wheel::with_slots`] accepts (about 24 MiB of empty slot headers), so that
/// no argument can make it overflow or try an absurd allocation.
const MAX_SLOTS: usize = 1 << 20;

/// A drained slot keeps up to this much capacity (entries), so a steady trickle through a slot
/// does not reallocate every rotation; only capacity beyond it, left by a burst, is given back.
const SHRINK_FLOOR: usize = 64;

/// Gives back a bucket's spare capacity once it holds under a quarter of it, keeping at least
/// [`SHRINK_FLOOR`] entries of room.
fn trim(bucket: &mut Vec<Entry>) {
    if bucket.capacity() > SHRINK_FLOOR && bucket.capacity() > 4 * bucket.len() {
        bucket.shrink_to((2 * bucket.len()).max(SHRINK_FLOOR));
    }
}

/// One scheduled deadline: which connection (slab key and generation) and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Entry {
    /// The connection's slab key.
    pub key: u32,
    /// The connection's generation at insert time (its low 32 bits: the server's `token`
    /// module says why that is enough); a mismatch on fire means the key was reused.
    pub gen: u32,
    /// The tick at or after which the entry is due.
    pub when: u64,
}

/// A single-level hashed timing wheel; see the [module docs](self).
pub struct Wheel {
    /// `2^k` buckets; an entry sits in `max(when, elapsed) & mask`.
    slots: Vec<Vec<Entry>>,
    /// Bit `s % 64` of word `s / 64` is set iff `slots[s]` is non-empty, so the next occupied slot
    /// is a `trailing_zeros` away instead of a walk over empty slots.
    occupied: Vec<u64>,
    /// `slots.len() - 1`, for hashing a tick to its slot.
    mask: u64,
    /// Every tick below this has been processed; the next `advance` starts here.
    elapsed: u64,
    /// Number of entries in all slots, kept exact for `len` and for cheap emptiness checks.
    len: usize,
    /// [`next_deadline`](Wheel::next_deadline)'s answer, while known: `Some(answer)`. The loop
    /// asks for it every turn and the answer rarely changes (an entry is usually inserted far
    /// ahead of the next one), so a known answer saves the bitmap scan (up to one word per 64
    /// slots: 128 for a 60 s timeout at a 10 ms tick). `insert` keeps it (the minimum with the
    /// new entry's slot); an `advance` that visits a slot, and `retain`, forget it.
    next: Cell<Option<Option<u64>>>,
    /// Bitmap words read by `next_occupied` so far (tests only): the cost measure that
    /// `huge_jump_scans_at_most_one_rotation` asserts on instead of a wall-clock bound.
    #[cfg(test)]
    words_scanned: std::cell::Cell<u64>,
}

impl Wheel {
    /// Creates an empty wheel with `slots` rounded up to a power of two, at least 64 and at
    /// most 2^20 (so that no argument can overflow or ask for an absurd allocation).
    ///
    /// # Examples
    /// ```
    /// use sockman::wheel::Wheel;
    ///
    /// assert_eq!(Wheel::with_slots(0).slots(), 64);
    /// assert_eq!(Wheel::with_slots(100).slots(), 128);
    /// ```
    pub fn with_slots(slots: usize) -> Wheel {
        let slots = slots.clamp(MIN_SLOTS, MAX_SLOTS).next_power_of_two();
        Wheel {
            slots: (0..slots).map(|_| Vec::new()).collect(),
            occupied: vec![0; slots / 64],
            mask: slots as u64 - 1,
            elapsed: 0,
            len: 0,
            next: Cell::new(Some(None)),
            #[cfg(test)]
            words_scanned: std::cell::Cell::new(0),
        }
    }

    /// Creates a wheel whose one rotation covers `span` ticks (the longest usual deadline):
    /// `next_power_of_two(span + 2)` slots, clamped to `[64, 65536]`.
    ///
    /// The `+ 2` leaves room for `elapsed` itself and one tick of rounding, so an entry inserted
    /// at `elapsed + span` is still within one rotation and [`next_deadline`](Self::next_deadline)
    /// is exact for it. Longer deadlines are still correct; they just wait for later rotations.
    ///
    /// # Examples
    /// ```
    /// use sockman::wheel::Wheel;
    ///
    /// // A 60 s idle timeout at a 10 ms tick.
    /// assert_eq!(Wheel::for_span(6000).slots(), 8192);
    /// ```
    pub fn for_span(span: u64) -> Wheel {
        let want = span.saturating_add(2).min(MAX_SPAN_SLOTS as u64) as usize;
        Wheel::with_slots(want)
    }

    /// Schedules an entry for `when`.
    ///
    /// `when` may be in the past (`< elapsed()`): the entry then fires at the next
    /// [`advance`](Self::advance). Nothing is deduplicated: inserting the same key twice yields
    /// two entries (the caller keeps at most one live entry per connection).
    ///
    /// # Examples
    /// ```
    /// use sockman::wheel::Wheel;
    ///
    /// let mut wheel = Wheel::with_slots(64);
    /// wheel.insert(7, 1, 40);
    /// assert_eq!(wheel.len(), 1);
    /// assert_eq!(wheel.next_deadline(), Some(40));
    /// // 100 is beyond one rotation: it shares slot 36 (100 - 64) and is a lower bound there.
    /// wheel.insert(8, 1, 100);
    /// assert_eq!(wheel.next_deadline(), Some(36));
    /// ```
    pub fn insert(&mut self, key: u32, gen: u32, when: u64) {
        let slot = self.slot_for(when);
        let bucket = &mut self.slots[slot];
        bucket.push(Entry { key, gen, when });
        self.occupied[slot / 64] |= 1 << (slot % 64);
        self.len += 1;
        if let Some(known) = self.next.get() {
            // This slot's tick in the current rotation, as `next_deadline` would find it.
            let distance = (slot as u64).wrapping_sub(self.elapsed & self.mask) & self.mask;
            let tick = self.elapsed.saturating_add(distance);
            self.next
                .set(Some(Some(known.map_or(tick, |k| k.min(tick)))));
        }
    }

    /// Moves the wheel to `now`, appending to `out` every entry with `when <= now`, at most
    /// `budget` of them.
    ///
    /// Returns `true` if due entries remain because the budget ran out: `elapsed()` then stays
    /// at the partly processed tick (`<= now`) and the caller should poll with a zero timeout
    /// and call again. Returns `false` once everything due by `now` has been handed out;
    /// `elapsed()` is then `now + 1`. With `now < elapsed()` nothing happens and it returns
    /// `false`. The order of `out` within a tick is unspecified.
    ///
    /// Only occupied slots are visited (via the bitmap), at most one rotation's worth, so a
    /// quiet tick and a jump over many rotations are both cheap. Entries due in a later
    /// rotation stay in place. A slot left with much more capacity than entries (a mass
    /// expiry) gives the memory back.
    ///
    /// # Examples
    /// ```
    /// use sockman::wheel::Wheel;
    ///
    /// let mut wheel = Wheel::with_slots(64);
    /// for key in 0..3 {
    ///     wheel.insert(key, 0, 10);
    /// }
    /// let mut out = Vec::new();
    /// assert!(!wheel.advance(9, usize::MAX, &mut out));
    /// assert!(out.is_empty());
    /// // A budget of 2 leaves one due entry for the next call.
    /// assert!(wheel.advance(10, 2, &mut out));
    /// assert_eq!(out.len(), 2);
    /// assert!(!wheel.advance(10, 2, &mut out));
    /// assert_eq!(out.len(), 3);
    /// assert_eq!(wheel.elapsed(), 11);
    /// ```
    pub fn advance(&mut self, now: u64, budget: usize, out: &mut Vec<Entry>) -> bool {
        if now < self.elapsed {
            return false;
        }
        // Nothing occupied up to `now` (the known next deadline is later, or the wheel is
        // empty): just move on, and the known answer stays right.
        if let Some(next) = self.next.get() {
            if next.is_none_or(|t| t > now) {
                self.elapsed = now.saturating_add(1);
                return false;
            }
        }
        self.next.set(None);
        let start = self.elapsed;
        // The last offset from `start` to visit: never more than one rotation, since a
        // rotation visits every slot and the `when <= now` check handles the rest.
        let last = (now - start).min(self.mask);
        let mut budget = budget;
        let mut offset = 0;
        while self.len > 0 {
            let from = (start.wrapping_add(offset) & self.mask) as usize;
            let Some(found) = self.next_occupied(from, last - offset) else {
                break;
            };
            offset += found as u64;
            // `offset <= now - start`, so this cannot overflow.
            let tick = start + offset;
            if self.drain_slot(tick, now, &mut budget, out) {
                // Ticks before `tick` are done; this one still holds due entries. Entries due
                // in slots after it have `when >= tick`, so the invariant holds with
                // `elapsed = tick`.
                self.elapsed = tick;
                return true;
            }
            if offset == last {
                break;
            }
            offset += 1;
        }
        // Everything up to and including `now` is processed. At `now == u64::MAX` this stays
        // at `u64::MAX`, which only means that tick may be visited again.
        self.elapsed = now.saturating_add(1);
        false
    }

    /// The earliest tick at which an entry may be due, or `None` when the wheel is empty.
    ///
    /// This is a lower bound of the smallest `when`, exact when every entry is due within one
    /// rotation (`when < elapsed() + slots()`), and never less than `elapsed()`: an entry in the
    /// past is due at the next advance, i.e. at `elapsed()`. If a budget left due entries, this
    /// is `elapsed()`. A deadline several rotations away shows up as its slot's tick in the
    /// current rotation, so the loop wakes up early at most once per rotation.
    ///
    /// Found with the occupancy bitmap (`trailing_zeros` over `u64` words), not by walking
    /// slots.
    pub fn next_deadline(&self) -> Option<u64> {
        if let Some(known) = self.next.get() {
            return known;
        }
        let answer = self.find_next_deadline();
        self.next.set(Some(answer));
        answer
    }

    /// [`next_deadline`](Self::next_deadline) from the bitmap.
    fn find_next_deadline(&self) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let from = (self.elapsed & self.mask) as usize;
        let found = self.next_occupied(from, self.mask);
        debug_assert!(
            found.is_some(),
            "len = {} but no slot is occupied; elapsed = {}",
            self.len,
            self.elapsed
        );
        // No entry can lie beyond `u64::MAX`, so saturation never changes the answer.
        found.map(|offset| self.elapsed.saturating_add(offset as u64))
    }

    /// The number of entries in the wheel, due or not.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the wheel holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every tick `< elapsed()` has been fully processed; the next advance starts here.
    pub fn elapsed(&self) -> u64 {
        self.elapsed
    }

    /// The number of slots (a power of two): the ticks one rotation covers.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// The slot an entry for `when` goes to now: `max(when, elapsed) & mask`.
    fn slot_for(&self, when: u64) -> usize {
        (when.max(self.elapsed) & self.mask) as usize
    }

    /// The distance from slot `from` (wrapping) to the first occupied slot, if it is at most
    /// `limit` slots away. Scans only the bitmap words that cover `from ..= from + limit`.
    fn next_occupied(&self, from: usize, limit: u64) -> Option<usize> {
        debug_assert!(
            from < self.slots.len() && limit <= self.mask,
            "from = {from}, limit = {limit}, slots = {}",
            self.slots.len()
        );
        let limit = limit as usize;
        let words = self.occupied.len();
        let mut word = from / 64;
        // Bits below `from` in its first word belong to the end of the rotation.
        let mut bits = self.occupied[word] & (!0u64 << (from % 64));
        // Distance from `from` to bit 0 of `word` (negative in the first word, hence wrapping).
        let mut base = 0usize.wrapping_sub(from % 64);
        loop {
            #[cfg(test)]
            self.words_scanned.set(self.words_scanned.get() + 1);
            if bits != 0 {
                let distance = base.wrapping_add(bits.trailing_zeros() as usize);
                return (distance <= limit).then_some(distance);
            }
            base = base.wrapping_add(64);
            // `base` is where the next word starts; past `limit` nothing more can qualify.
            // This also ends the scan after one full turn, since `limit <= mask`.
            if base > limit {
                return None;
            }
            word = (word + 1) & (words - 1);
            bits = self.occupied[word];
        }
    }

    /// Hands out the entries of the slot for `tick` with `when <= now`, spending `budget`.
    /// Returns `true` if due entries remain there because the budget ran out.
    fn drain_slot(
        &mut self,
        tick: u64,
        now: u64,
        budget: &mut usize,
        out: &mut Vec<Entry>,
    ) -> bool {
        let slot = (tick & self.mask) as usize;
        let elapsed = self.elapsed;
        let mask = self.mask;
        let bucket = &mut self.slots[slot];
        debug_assert!(
            !bucket.is_empty(),
            "slot {slot} (tick {tick}) has its bit set but is empty"
        );
        let before = bucket.len();
        let mut starved = false;
        // Backwards, so `swap_remove` only ever moves an entry already looked at (and a slot
        // that is due as a whole is simply popped).
        let mut i = bucket.len();
        while i > 0 {
            i -= 1;
            let entry = bucket[i];
            debug_assert!(
                (entry.when.max(elapsed) & mask) as usize == slot,
                "entry {entry:?} in slot {slot}, expected slot {}; elapsed = {elapsed}, tick = {tick}",
                entry.when.max(elapsed) & mask
            );
            if entry.when <= now {
                if *budget == 0 {
                    starved = true;
                    break;
                }
                *budget -= 1;
                out.push(bucket.swap_remove(i));
            }
        }
        self.len -= before - bucket.len();
        if bucket.is_empty() {
            self.occupied[slot / 64] &= !(1 << (slot % 64));
        }
        // A burst (20 000 connections expiring together) must not pin its memory forever.
        trim(bucket);
        starved
    }

    /// Keeps only the entries for which `keep` returns true, visiting every occupied slot once:
    /// O(slots / 64 + entries). For a caller whose entries go stale without being cancelled
    /// (lazy deletion), this is the compaction that bounds memory when they pile up.
    ///
    /// # Examples
    /// ```
    /// use sockman::wheel::Wheel;
    ///
    /// let mut wheel = Wheel::with_slots(64);
    /// wheel.insert(1, 0, 10);
    /// wheel.insert(2, 0, 500);
    /// wheel.retain(|e| e.key != 1);
    /// assert_eq!(wheel.len(), 1);
    /// assert_eq!(wheel.next_deadline(), Some(500 % 64)); // a lower bound, one rotation ahead
    /// ```
    pub fn retain(&mut self, mut keep: impl FnMut(&Entry) -> bool) {
        self.next.set(None);
        for word in 0..self.occupied.len() {
            let mut bits = self.occupied[word];
            while bits != 0 {
                let slot = word * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let bucket = &mut self.slots[slot];
                let before = bucket.len();
                bucket.retain(|e| keep(e));
                self.len -= before - bucket.len();
                if bucket.is_empty() {
                    self.occupied[word] &= !(1 << (slot % 64));
                    // A sweep empties slots that may not fill again for a rotation: free them
                    // outright rather than keep the floor that `advance` keeps for busy slots.
                    *bucket = Vec::new();
                } else {
                    trim(bucket);
                }
            }
        }
    }

    /// Checks every invariant of the module docs by walking all slots (tests only).
    #[cfg(test)]
    fn check_invariants(&self) {
        let mut count = 0;
        for (slot, bucket) in self.slots.iter().enumerate() {
            let bit = self.occupied[slot / 64] >> (slot % 64) & 1 == 1;
            assert_eq!(bit, !bucket.is_empty(), "occupancy bit of slot {slot}");
            for entry in bucket {
                assert_eq!(
                    self.slot_for(entry.when),
                    slot,
                    "{entry:?}, elapsed {}",
                    self.elapsed
                );
            }
            count += bucket.len();
        }
        assert_eq!(count, self.len, "len");
        if let Some(known) = self.next.get() {
            assert_eq!(known, self.find_next_deadline(), "the known next deadline");
        }
    }
}

impl fmt::Debug for Wheel {
    /// A summary (slots, elapsed, len, next deadline), not every entry: a wheel may hold a
    /// million of them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wheel")
            .field("slots", &self.slots.len())
            .field("elapsed", &self.elapsed)
            .field("len", &self.len)
            .field("next_deadline", &self.next_deadline())
            .finish()
    }
}

#[cfg(test)]
mod tests;
