//! The keyspace: binary keys to binary values, and a request's arguments as commands see them.
//!
//! A value up to [`SMALL`] bytes is kept inline (an overwrite of a short value allocates
//! nothing, as with redis-benchmark's `SET key:__rand_int__ xxx`); a longer one is a shared
//! [`Bytes`], so a `GET` of it goes out as it is stored, to any number of readers at once.

use sockman::Bytes;

use super::parse::Span;

/// Longest value kept inline.
pub const SMALL: usize = 22;

/// One stored value.
#[derive(Debug, Clone)]
pub enum Value {
    /// Up to [`SMALL`] bytes, inline.
    Small { len: u8, bytes: [u8; SMALL] },
    /// A longer value, shared with the replies that are sending it.
    Big(Bytes),
}

impl Value {
    /// A copy of `b`.
    pub fn copy(b: &[u8]) -> Value {
        if b.len() <= SMALL {
            let mut bytes = [0; SMALL];
            bytes[..b.len()].copy_from_slice(b);
            Value::Small {
                len: b.len() as u8,
                bytes,
            }
        } else {
            Value::Big(Bytes::copy_from_slice(b))
        }
    }

    /// The value's bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Value::Small { len, bytes } => &bytes[..*len as usize],
            Value::Big(b) => b,
        }
    }
}

/// The keyspace (hashbrown's map with its default hasher, foldhash: fast, and seeded per
/// process so that keys chosen by a client cannot be made to collide).
pub type Db = hashbrown::HashMap<Box<[u8]>, Value>;

/// One request's arguments: spans into the bytes it was parsed from. When those bytes are a
/// shared buffer (a large request that was buffered whole), a large argument can be kept
/// without a copy.
#[derive(Debug, Clone, Copy)]
pub struct Args<'a> {
    pub buf: &'a [u8],
    pub spans: &'a [Span],
    /// The shared buffer `buf` lies in, and where in it `buf` starts.
    pub owner: Option<(&'a Bytes, usize)>,
}

impl<'a> Args<'a> {
    /// Number of arguments, the command's name included.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// Whether there are none (never, for a parsed request).
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Argument `i`.
    pub fn get(&self, i: usize) -> &'a [u8] {
        self.spans[i].of(self.buf)
    }

    /// Argument `i` as a value to store: inline, a slice of the request's shared buffer (when
    /// it is most of that buffer: a small value never pins a large buffer), or a copy.
    pub fn value(&self, i: usize) -> Value {
        let span = self.spans[i];
        let b = span.of(self.buf);
        if let Some((owner, at)) = self.owner {
            if b.len() > SMALL && b.len() >= owner.len() / 2 {
                let start = at + span.start();
                return Value::Big(owner.slice(start..start + span.len()));
            }
        }
        Value::copy(b)
    }

    /// Argument `i` as a shared buffer (for a reply that echoes it).
    pub fn bytes(&self, i: usize) -> Bytes {
        match self.value(i) {
            Value::Big(b) => b,
            small => Bytes::copy_from_slice(small.as_slice()),
        }
    }
}

/// The bytes of `arg` as C sees them: up to its first NUL (Redis formats and compares some
/// arguments as C strings).
pub fn cstr(arg: &[u8]) -> &[u8] {
    arg.iter()
        .position(|&b| b == 0)
        .map_or(arg, |nul| &arg[..nul])
}
