//! What a `mio::Token` names, in one place: the waker, a listener, the admin side, or a
//! connection's slab key and generation. [`ConnId`] is the public face of the last.
//!
//! # Layout
//! - A connection's token is `generation << KEY_BITS | key`, with `KEY_BITS` half a `usize`
//!   (32 bits on 64-bit targets, 16 on 32-bit ones). Keys stay below
//!   [`MAX_CONNECTIONS_LIMIT`], far below `2^KEY_BITS`.
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

use std::fmt;

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
    /// A connection: slab key and generation (masked to what fits a token).
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

/// The token of the connection `id`.
pub(crate) fn conn(id: ConnId) -> Token {
    debug_assert!(
        (id.key as usize) < KEY_MASK - SPECIAL,
        "{id} does not fit a token"
    );
    Token((((id.gen & GEN_MASK) as usize) << KEY_BITS) | id.key as usize)
}

/// Identifies one connection for its whole life: its slab key and the generation of that slot's
/// occupant. A later connection that reuses the slot gets another generation, so an id of a
/// connection that is gone never reaches the slot's new occupant.
///
/// Printed as `key#generation`, e.g. `3#17`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    key: u32,
    gen: u32,
}

impl ConnId {
    /// An id no connection ever has: [`Context::id`](crate::Context::id) in callbacks that are
    /// not about one connection (periodic callbacks, work from other threads).
    pub const NONE: ConnId = ConnId {
        key: u32::MAX,
        gen: u32::MAX,
    };

    pub(crate) fn new(key: usize, gen: u32) -> ConnId {
        ConnId {
            key: key as u32,
            gen,
        }
    }

    /// The connection's slab key (reused by later connections once this one is gone).
    pub fn key(self) -> usize {
        self.key as usize
    }

    /// The generation of the slot's occupant: what tells this connection from a later one in
    /// the same slot.
    pub fn generation(self) -> u32 {
        self.gen
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == ConnId::NONE {
            return f.write_str("none");
        }
        write!(f, "{}#{}", self.key, self.gen)
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
            (12345, GEN_MASK),
            (MAX_CONNECTIONS_LIMIT - 1, 3),
        ] {
            let id = ConnId::new(key, gen);
            assert_eq!(decode(conn(id)), Kind::Conn { key, gen });
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
        assert_eq!(ConnId::new(0, u32::MAX - 1).to_string(), "0#4294967294");
        assert_eq!(ConnId::NONE.to_string(), "none");
    }
}
