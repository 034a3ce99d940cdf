//! Replies, staged: everything a turn's requests answer is gathered in one buffer and handed to
//! the core once ([`Out::flush`]), except values large enough to be worth sharing, which go out
//! as they are stored ([`Out::shared`]: no copy per reader).

use sockman::{Bytes, Context};

use super::Client;

/// Staged replies past this many bytes are handed to the core at the next request boundary,
/// and the connection's writability is checked.
pub const STAGE: usize = 64 * 1024;

/// A reply still growing past this (a large `MGET`) leaves as a buffer of its own: handed to
/// the core without a copy, so that it does not count against the copied-output cap.
pub const HANDOFF: usize = 256 * 1024;

/// Values at least this long are written as shared buffers (a reference count, not a copy).
pub const SHARE_MIN: usize = 4096;

/// The staged replies of the connection being served.
#[derive(Debug, Default)]
pub struct Out {
    buf: Vec<u8>,
}

/// `n` in decimal, into the end of `buf`; returns the digits.
pub fn itoa(n: i64, buf: &mut [u8; 20]) -> &[u8] {
    let mut u = n.unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (u % 10) as u8;
        u /= 10;
        if u == 0 {
            break;
        }
    }
    if n < 0 {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}

impl Out {
    /// Staged bytes.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Appends raw protocol bytes.
    pub fn raw(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    /// `<prefix><n>\r\n`.
    fn line(&mut self, prefix: u8, n: i64) {
        let mut digits = [0; 20];
        self.buf.push(prefix);
        self.buf.extend_from_slice(itoa(n, &mut digits));
        self.buf.extend_from_slice(b"\r\n");
    }

    /// An integer reply.
    pub fn int(&mut self, n: i64) {
        self.line(b':', n);
    }

    /// An array header of `n` elements.
    pub fn array(&mut self, n: usize) {
        self.line(b'*', n as i64);
    }

    /// A bulk string's header: its length.
    pub fn bulk_header(&mut self, len: usize) {
        self.line(b'$', len as i64);
    }

    /// A bulk string, copied.
    pub fn bulk(&mut self, b: &[u8]) {
        self.bulk_header(b.len());
        self.buf.extend_from_slice(b);
        self.buf.extend_from_slice(b"\r\n");
    }

    /// The null bulk string (`$-1`).
    pub fn nil(&mut self) {
        self.buf.extend_from_slice(b"$-1\r\n");
    }

    /// `+OK`.
    pub fn ok(&mut self) {
        self.buf.extend_from_slice(b"+OK\r\n");
    }

    /// An error reply: `-ERR <msg>`, with newlines in `msg` mapped to spaces as Redis does.
    pub fn error(&mut self, parts: &[&[u8]]) {
        self.buf.extend_from_slice(b"-ERR ");
        for part in parts {
            self.buf.extend(
                part.iter()
                    .map(|&c| if c == b'\r' || c == b'\n' { b' ' } else { c }),
            );
        }
        self.buf.extend_from_slice(b"\r\n");
    }

    /// A bulk string from a shared buffer: copied when short, else queued as it is.
    pub fn shared(&mut self, ctx: &mut Context<'_, Client>, b: &Bytes) {
        if b.len() < SHARE_MIN {
            return self.bulk(b);
        }
        self.bulk_header(b.len());
        self.flush(ctx);
        ctx.write_shared(b.clone());
        self.buf.extend_from_slice(b"\r\n");
    }

    /// Hands the staged bytes to the core (copied into the connection's output, or, past
    /// [`HANDOFF`], as a buffer of their own). `false` if the connection refused them (it is
    /// closing).
    pub fn flush(&mut self, ctx: &mut Context<'_, Client>) -> bool {
        if self.buf.is_empty() {
            return true;
        }
        if self.buf.len() >= HANDOFF {
            return ctx.write_shared(Bytes::from(std::mem::take(&mut self.buf)));
        }
        let ok = ctx.write(&self.buf);
        self.buf.clear();
        ok
    }

    /// Within a reply: hands a large staged part over, so that one reply never piles up.
    pub fn spill(&mut self, ctx: &mut Context<'_, Client>) {
        if self.buf.len() >= HANDOFF {
            self.flush(ctx);
        }
    }
}
