//! The bytes the generator sends, and their verification.
//!
//! Byte `k` of a connection's stream is `(k + seed) % PERIOD`, where `seed` comes from the
//! connection's slot. An echo server must return the same stream, so a received chunk at stream
//! offset `k` is checked against the same formula. A prime period does not divide typical
//! message sizes, so a reordered, duplicated or shifted message breaks the match.

/// Length of the repeating byte cycle (prime, < 256).
pub(super) const PERIOD: usize = 251;

/// One precomputed run of the cycle, long enough to slice any offset and `max_len` bytes.
#[derive(Debug)]
pub(super) struct Pattern {
    bytes: Vec<u8>,
}

impl Pattern {
    /// A pattern from which slices of up to `max_len` bytes can be taken at any offset.
    pub(super) fn new(max_len: usize) -> Pattern {
        let bytes = (0..PERIOD + max_len).map(|i| (i % PERIOD) as u8).collect();
        Pattern { bytes }
    }

    /// The longest slice [`Pattern::slice`] can return.
    pub(super) fn max_len(&self) -> usize {
        self.bytes.len() - PERIOD
    }

    /// The `len` bytes at stream offset `offset` of the stream with `seed`, `len` capped at
    /// [`Pattern::max_len`].
    pub(super) fn slice(&self, seed: u8, offset: u64, len: usize) -> &[u8] {
        let start = ((offset + u64::from(seed)) % PERIOD as u64) as usize;
        let len = len.min(self.max_len());
        &self.bytes[start..start + len]
    }

    /// Whether `data` is what the stream with `seed` holds at `offset`. `data` may be longer
    /// than [`Pattern::max_len`]; it is checked piecewise.
    pub(super) fn matches(&self, seed: u8, offset: u64, data: &[u8]) -> bool {
        let mut offset = offset;
        for chunk in data.chunks(self.max_len().max(1)) {
            if self.slice(seed, offset, chunk.len()) != chunk {
                return false;
            }
            offset += chunk.len() as u64;
        }
        true
    }
}

/// The seed for the connection in slot `key`.
pub(super) fn seed_for(key: usize) -> u8 {
    (key % PERIOD) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_follow_the_stream_offset() {
        let p = Pattern::new(600);
        let whole: Vec<u8> = (0..1000u64).map(|k| ((k + 7) % 251) as u8).collect();
        assert_eq!(p.slice(7, 0, 600), &whole[..600]);
        assert_eq!(p.slice(7, 300, 500), &whole[300..800]);
        assert!(p.matches(7, 123, &whole[123..1000]));
    }

    #[test]
    fn shifted_or_foreign_bytes_do_not_match() {
        let p = Pattern::new(64);
        let good = p.slice(3, 10, 64).to_vec();
        assert!(p.matches(3, 10, &good));
        assert!(!p.matches(3, 11, &good), "shifted by one");
        assert!(!p.matches(4, 10, &good), "another connection's stream");
        let mut bad = good.clone();
        bad[63] ^= 1;
        assert!(!p.matches(3, 10, &bad));
    }
}
