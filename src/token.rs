//! What a `mio::Token` names, in one place: the waker, a listener, the admin side, or a
//! connection's slab key and generation. [`ConnId`] is the public face of the last.
//!
//! # Layout
//! - A connection's token is `generation << KEY_BITS | key`, with `KEY_BITS` half a `usize`
//!   (32 bits on 64-bit targets, 16 on 32-bit ones): the generation's low bits only. Keys stay
//!   below [`MAX_CONNECTIONS_LIMIT`], far below `2^KEY_BITS`.
//! - The special tokens count down from `usize::MAX`: the waker, then [`MAX_LISTENERS`]
//!   listeners, the deadline alarm, the admin listener, then the admin connections. Their low halves are all above
//!   any slab key, so [`decode`] tells them apart from connections by distance from the top.
//!
//! # Why a generation
//! epoll reports an fd at most once per batch, but a connection can be closed by something other
//! than its own event (eviction, expiry, a handler, a shutdown) and its slot refilled by an
//! accept before the rest of the batch is dispatched: slab reuses the most recently freed key
//! first. mio only promises that a deregistered token is absent from *later* polls, and the lazy
//! wheel holds entries of connections long gone. So tokens, wheel entries and [`ConnId`]s carry
//! the generation, and a mismatch means stale. (nginx's `instance` bit and tokio's pre-1.29
//! token generation guard the same way.)
//!
//! # How many bits, where
//! The generation is a 64-bit counter of the loop (every connection it accepts or dials takes
//! the next value; not per slot: the slab reuses the most recently freed key first, so one slot
//! can take almost every connection of a churning server). It is never reused in practice:
//! 2^64 connections at 100 k/s take 5.8 million years. What each holder keeps of it:
//!
//! - **A [`ConnId`] and the slab entry keep all 64 bits**, and a `ConnId` reaches a connection
//!   only if they are equal: an id held for any length of time never reaches a later occupant
//!   of its slot. (With the 32-bit generation this replaced, an id held across 2^32
//!   connections, 12 hours at 100 k/s, matched the slot's occupant then.)
//! - **A token keeps the low 32 bits** (16 on 32-bit targets). A token only has to tell
//!   connections apart within one poll batch: mio drops a deregistered token from later polls,
//!   and a batch cannot span 2^32 connections into one slot.
//! - **A wheel entry keeps the low 32 bits** (and its tick). An entry that outlived its
//!   connection by exactly a multiple of 2^32 generations while its slot holds the match, *and*
//!   whose tick equals the occupant's `scheduled` tick (else it is dropped as superseded),
//!   stands for the occupant's own entry for that same tick: firing it only re-evaluates the
//!   occupant's own deadline at its due time (`Conn::deadline`), and the occupant's real entry
//!   is then dropped as superseded. So a stale entry can cost a recheck, never a wrong action.
//!   Keeping 32 bits keeps an entry at 16 bytes.

use std::fmt;
use std::num::NonZeroU32;

use mio::Token;

/// Bits of a token that hold the slab key.
const KEY_BITS: u32 = usize::BITS / 2;
const KEY_MASK: usize = (1 << KEY_BITS) - 1;
/// Bits of the generation that fit a token beside the key.
pub(crate) const GEN_MASK: u32 = if usize::BITS - KEY_BITS >= 32 {
    u32::MAX
} else {
    (1 << (usize::BITS - KEY_BITS)) - 1
};

/// Largest connection cap accepted: slab keys must fit the low half of a [`mio::Token`], below the
/// special tokens.
pub const MAX_CONNECTIONS_LIMIT: usize = if usize::BITS >= 64 {
    1 << 31
} else {
    (1 << 15) - 1
};

/// Most listeners one server takes.
pub(crate) const MAX_LISTENERS: usize = 1024;
/// Most admin connections: their tokens sit below the admin listener's.
pub(crate) const MAX_ADMIN_CONNS: usize = 64;

/// The waker's token: the top of the token space.
pub(crate) const WAKER: Token = Token(usize::MAX);
/// Distances from [`WAKER`] that special tokens use.
const ALARM_AT: usize = MAX_LISTENERS + 1;
const ADMIN_LISTENER_AT: usize = MAX_LISTENERS + 2;
const ADMIN_CONN_AT: usize = MAX_LISTENERS + 3;
const SPECIAL: usize = ADMIN_CONN_AT + MAX_ADMIN_CONNS;

// Every connection token's low half (its key) must stay below every special token's low half.
const _: () = assert!(MAX_CONNECTIONS_LIMIT < KEY_MASK - SPECIAL);

/// What a token names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The loop's waker (stop, drain, messages from other threads).
    Waker,
    /// Data listener `i` (in configuration order).
    Listener(usize),
    /// The deadline alarm (a timerfd).
    Alarm,
    /// The admin endpoint's listener.
    AdminListener,
    /// Admin connection `k` (its key in the admin side's own slab).
    AdminConn(usize),
    /// A connection: slab key and the low bits of its generation (what fits a token).
    Conn { key: usize, gen: u32 },
}

/// Decodes a token.
pub(crate) fn decode(token: Token) -> Kind {
    let from_top = usize::MAX - token.0;
    match from_top {
        0 => Kind::Waker,
        d if d <= MAX_LISTENERS => Kind::Listener(d - 1),
        ALARM_AT => Kind::Alarm,
        ADMIN_LISTENER_AT => Kind::AdminListener,
        d if d < SPECIAL => Kind::AdminConn(d - ADMIN_CONN_AT),
        _ => Kind::Conn {
            key: token.0 & KEY_MASK,
            gen: (token.0 >> KEY_BITS) as u32 & GEN_MASK,
        },
    }
}

pub(crate) fn listener(i: usize) -> Token {
    debug_assert!(i < MAX_LISTENERS, "listener {i}");
    Token(usize::MAX - 1 - i)
}

#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub(crate) fn alarm() -> Token {
    Token(usize::MAX - ALARM_AT)
}

#[cfg_attr(not(feature = "admin"), allow(dead_code))]
pub(crate) fn admin_listener() -> Token {
    Token(usize::MAX - ADMIN_LISTENER_AT)
}

#[cfg_attr(not(feature = "admin"), allow(dead_code))]
pub(crate) fn admin_conn(k: usize) -> Token {
    debug_assert!(k < MAX_ADMIN_CONNS, "admin connection {k}");
    Token(usize::MAX - ADMIN_CONN_AT - k)
}

/// The low bits of generation `gen` that a token and a wheel entry keep (see the
/// [module docs](self)).
pub(crate) fn gen_low(gen: u64) -> u32 {
    gen as u32 & GEN_MASK
}

/// The token of the connection `id`.
pub(crate) fn conn(id: ConnId) -> Token {
    debug_assert!(id.key() < KEY_MASK - SPECIAL, "{id} does not fit a token");
    Token(((gen_low(id.generation()) as usize) << KEY_BITS) | id.key())
}

/// Identifies one connection for its whole life: its slab key and its generation, a 64-bit
/// count of the loop's connections that is never reused in practice (see the `token` module
/// docs). A later connection that reuses the slot has another generation, so an id of a
/// connection that is gone never reaches the slot's new occupant, however long it was held.
///
/// Ids are the loop's own: an id of one [`Server`](crate::Server) means nothing to another.
/// 12 bytes, and `Option<ConnId>` is no larger.
///
/// Printed as `key#generation`, e.g. `3#17`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    /// The slab key plus one: never zero, which gives `Option<ConnId>` a niche. (Keys stay
    /// below [`MAX_CONNECTIONS_LIMIT`]; [`ConnId::NONE`] holds `u32::MAX`.)
    key: NonZeroU32,
    /// The generation as two halves (high first, so that the derived order is the numeric
    /// one): a `u64` would align the id to 8 and make it 16 bytes.
    gen_hi: u32,
    gen_lo: u32,
}

impl ConnId {
    /// An id no connection ever has: [`Context::id`](crate::Context::id) in callbacks that are
    /// not about one connection (periodic callbacks, work from other threads).
    pub const NONE: ConnId = ConnId {
        key: NonZeroU32::MAX,
        gen_hi: u32::MAX,
        gen_lo: u32::MAX,
    };

    pub(crate) fn new(key: usize, gen: u64) -> ConnId {
        debug_assert!(key < MAX_CONNECTIONS_LIMIT, "key {key}");
        ConnId {
            key: NonZeroU32::MIN.saturating_add(key as u32),
            gen_hi: (gen >> 32) as u32,
            gen_lo: gen as u32,
        }
    }

    /// The connection's slab key (reused by later connections once this one is gone).
    pub fn key(self) -> usize {
        (self.key.get() - 1) as usize
    }

    /// The connection's generation: what tells this connection from every other one this loop
    /// had in the same slot.
    pub fn generation(self) -> u64 {
        (u64::from(self.gen_hi) << 32) | u64::from(self.gen_lo)
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == ConnId::NONE {
            return f.write_str("none");
        }
        write!(f, "{}#{}", self.key(), self.generation())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips() {
        assert_eq!(decode(WAKER), Kind::Waker);
        for i in [0, 1, MAX_LISTENERS - 1] {
            assert_eq!(decode(listener(i)), Kind::Listener(i));
        }
        assert_eq!(decode(admin_listener()), Kind::AdminListener);
        assert_eq!(decode(alarm()), Kind::Alarm);
        for k in [0, MAX_ADMIN_CONNS - 1] {
            assert_eq!(decode(admin_conn(k)), Kind::AdminConn(k));
        }
        for (key, gen) in [
            (0, 0),
            (1, 7),
            (12345, u64::from(GEN_MASK)),
            (MAX_CONNECTIONS_LIMIT - 1, 3),
            (5, (9 << 32) | 4),
            (6, u64::MAX - 1),
        ] {
            let id = ConnId::new(key, gen);
            let low = gen_low(gen);
            assert_eq!(decode(conn(id)), Kind::Conn { key, gen: low });
            assert_eq!((id.key(), id.generation()), (key, gen));
        }
        // The lowest special token is still above the highest connection token's key half.
        let lowest_special = admin_conn(MAX_ADMIN_CONNS - 1);
        assert!(matches!(decode(lowest_special), Kind::AdminConn(_)));
        assert!(matches!(
            decode(Token(lowest_special.0 - 1)),
            Kind::Conn { .. }
        ));
    }

    #[test]
    fn ids_print_key_and_generation() {
        assert_eq!(ConnId::new(3, 17).to_string(), "3#17");
        assert_eq!(ConnId::new(0, 1 << 32).to_string(), "0#4294967296");
        assert_eq!(ConnId::NONE.to_string(), "none");
    }

    #[test]
    fn ids_are_12_bytes_order_by_key_then_generation_and_have_a_niche() {
        assert_eq!(std::mem::size_of::<ConnId>(), 12);
        assert_eq!(std::mem::size_of::<Option<ConnId>>(), 12);
        assert!(ConnId::new(1, 1 << 32) > ConnId::new(1, u64::from(u32::MAX)));
        assert!(ConnId::new(2, 0) > ConnId::new(1, u64::MAX - 1));
        // Ids a generation 2^32 apart share a token, never an id.
        let (a, b) = (ConnId::new(4, 7), ConnId::new(4, 7 + (1 << 32)));
        assert_ne!(a, b);
        assert_eq!(conn(a), conn(b));
    }
}
