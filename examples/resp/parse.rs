//! RESP2 requests as redis-server 7 reads them (`processMultibulkBuffer`, `processInlineBuffer`
//! and `sdssplitargs` in its `networking.c` and `sds.c`), byte for byte: the same requests are
//! accepted, the same ones are errors, with the same words.
//!
//! A request is parsed where it lies (the read's bytes, or a connection's buffer of a partial
//! request): arguments are [`Span`]s into it, never copies, except for inline requests, whose
//! quoting is undone into a scratch buffer. A parse that runs out of bytes says so and keeps its
//! [`Progress`], so that the next bytes continue it instead of starting over (a 64 MiB value in
//! 64 KiB reads is parsed once, not a thousand times).
//!
//! Redis's quirks kept on purpose, since a client that works with Redis must work here:
//! - a line ends at `\r` and the byte after it is skipped unchecked (`*1\rX$4\r\nPING\r\n` is a
//!   PING), and the two bytes after a bulk are skipped unchecked too;
//! - a line is searched with `strchr`, which stops at a NUL byte: a NUL before the line's end
//!   means "no line yet" until the 64 KiB limit makes it an error;
//! - a count of zero or less (`*0`, `*-1`) is an empty request, and so is an empty inline line:
//!   no reply;
//! - an inline line ends at `\n` (an `\r` before it is dropped) and is split like `redis-cli`
//!   input: quotes, `\xHH` and `\n`-style escapes.

/// Longest line (inline request, or a count line) buffered without its end: Redis's
/// `PROTO_INLINE_MAX_SIZE`.
pub const MAX_INLINE: usize = 64 * 1024;

/// Largest bulk a request may announce: Redis's default `proto-max-bulk-len`.
pub const MAX_BULK: i64 = 512 << 20;

/// Where one argument lies: `len` bytes from `start`, relative to the request's first byte (or,
/// for an inline request, to the scratch buffer its arguments were unquoted into).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    start: u32,
    len: u32,
}

impl Span {
    fn new(start: usize, len: usize) -> Span {
        // Requests are capped far below 4 GiB (see `Limits`), so offsets fit.
        Span {
            start: start as u32,
            len: len as u32,
        }
    }

    /// The argument's bytes in `buf`.
    pub fn of<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.start as usize..(self.start + self.len) as usize]
    }

    /// Its first byte's offset.
    pub fn start(&self) -> usize {
        self.start as usize
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A malformed request: Redis replies with the error and closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtoError {
    /// An inline line of more than 64 KiB without its `\n`.
    TooBigInline,
    /// A `*<count>` line of more than 64 KiB without its `\r`.
    TooBigMbulkCount,
    /// A `$<length>` line of more than 64 KiB without its `\r`.
    TooBigBulkCount,
    /// A count that is not an integer, or over `i32::MAX`.
    InvalidMultibulkLength,
    /// A length that is not an integer, negative, or over 512 MiB.
    InvalidBulkLength,
    /// An argument that does not start with `$`.
    ExpectedDollar(u8),
    /// An inline line with an open quote (or a closing one not followed by a space).
    UnbalancedQuotes,
}

impl ProtoError {
    /// The whole reply, as Redis sends it before it closes.
    pub fn reply(&self) -> Vec<u8> {
        let mut s = b"-ERR Protocol error: ".to_vec();
        match self {
            ProtoError::TooBigInline => s.extend_from_slice(b"too big inline request"),
            ProtoError::TooBigMbulkCount => s.extend_from_slice(b"too big mbulk count string"),
            ProtoError::TooBigBulkCount => s.extend_from_slice(b"too big bulk count string"),
            ProtoError::InvalidMultibulkLength => s.extend_from_slice(b"invalid multibulk length"),
            ProtoError::InvalidBulkLength => s.extend_from_slice(b"invalid bulk length"),
            ProtoError::ExpectedDollar(c) => {
                s.extend_from_slice(b"expected '$', got '");
                // Redis maps newlines in an error to spaces, so the reply stays one line.
                s.push(if matches!(c, b'\r' | b'\n') { b' ' } else { *c });
                s.push(b'\'');
            }
            ProtoError::UnbalancedQuotes => {
                s.extend_from_slice(b"unbalanced quotes in request");
            }
        }
        s.extend_from_slice(b"\r\n");
        s
    }
}

/// What one call of [`parse`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// A whole request of `len` bytes; its arguments are in the spans (into the request's bytes,
    /// or into the inline scratch when `inline`).
    Request { len: usize, inline: bool },
    /// A request with no arguments (`*0`, `*-1`, a blank inline line): skip `len` bytes, no
    /// reply.
    Empty { len: usize },
    /// The request is not whole yet: call again with more bytes and the same [`Progress`].
    Incomplete,
    /// Malformed: reply with the error and close.
    Error(ProtoError),
}

/// How far the parse of one request got, so that more bytes continue it. Offsets are relative
/// to the request's first byte.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bytes taken by whole lines and bulks so far.
    done: usize,
    /// Bytes after `done` already searched for a line's end without finding one.
    scanned: usize,
    /// Multibulk: arguments still to read; `None` until the count line is read.
    left: Option<u32>,
    /// The announced length of the bulk being read, once its length line is read.
    bulk: Option<usize>,
}

impl Progress {
    /// The request's length if it is known to be at least this long before it can complete:
    /// the end of the bulk being read (so a caller buffering a large bulk need not parse again
    /// until that many bytes are there). 0 when no bulk length is pending.
    pub fn needs(&self) -> usize {
        self.bulk.map_or(0, |b| self.done + b + 2)
    }
}

/// Parses the request at the start of `buf`, continuing from `progress` (start a new request
/// with `Progress::default()` and empty `args`). Arguments go to `args`; an inline request's
/// unquoted bytes go to `inline` (cleared first).
pub fn parse(
    buf: &[u8],
    progress: &mut Progress,
    args: &mut Vec<Span>,
    inline: &mut Vec<u8>,
) -> Step {
    if buf.is_empty() {
        return Step::Incomplete;
    }
    if buf[0] == b'*' {
        multibulk(buf, progress, args)
    } else {
        inline_request(buf, progress, args, inline)
    }
}

/// The end of the line that starts at `from`: the offset of its `\r` (or `\n` for an inline
/// line), searched as `strchr` does, i.e. stopping at a NUL. Resumes after `progress.scanned`.
fn line_end(buf: &[u8], from: usize, progress: &mut Progress, end: u8) -> Option<usize> {
    let start = from + progress.scanned;
    for (i, &b) in buf[start..].iter().enumerate() {
        if b == end {
            return Some(start + i);
        }
        if b == 0 {
            // strchr stops here, now and every later time.
            progress.scanned += i;
            return None;
        }
    }
    progress.scanned = buf.len() - from;
    None
}

fn multibulk(buf: &[u8], p: &mut Progress, args: &mut Vec<Span>) -> Step {
    let left = match p.left {
        Some(left) => left,
        None => {
            let Some(cr) = line_end(buf, 0, p, b'\r') else {
                return if buf.len() > MAX_INLINE {
                    Step::Error(ProtoError::TooBigMbulkCount)
                } else {
                    Step::Incomplete
                };
            };
            if cr + 2 > buf.len() {
                p.scanned = cr; // the byte after the '\r' is still to come
                return Step::Incomplete;
            }
            let count = match string2ll(&buf[1..cr]) {
                Some(n) if n <= i32::MAX as i64 => n,
                _ => return Step::Error(ProtoError::InvalidMultibulkLength),
            };
            if count <= 0 {
                return Step::Empty { len: cr + 2 };
            }
            p.done = cr + 2;
            p.scanned = 0;
            count as u32
        }
    };
    p.left = Some(left);
    while let Some(left) = p.left.filter(|&l| l > 0) {
        let bulk = match p.bulk {
            Some(b) => b,
            None => {
                let line = p.done;
                let Some(cr) = line_end(buf, line, p, b'\r') else {
                    return if buf.len() - line > MAX_INLINE {
                        Step::Error(ProtoError::TooBigBulkCount)
                    } else {
                        Step::Incomplete
                    };
                };
                if cr + 2 > buf.len() {
                    p.scanned = cr - line;
                    return Step::Incomplete;
                }
                if buf[line] != b'$' {
                    return Step::Error(ProtoError::ExpectedDollar(buf[line]));
                }
                let len = match string2ll(&buf[line + 1..cr]) {
                    Some(n) if (0..=MAX_BULK).contains(&n) => n as usize,
                    _ => return Step::Error(ProtoError::InvalidBulkLength),
                };
                p.done = cr + 2;
                p.scanned = 0;
                p.bulk = Some(len);
                len
            }
        };
        // The bulk and the two bytes after it (not checked: Redis skips them).
        if buf.len() < p.done + bulk + 2 {
            return Step::Incomplete;
        }
        args.push(Span::new(p.done, bulk));
        p.done += bulk + 2;
        p.bulk = None;
        p.left = Some(left - 1);
    }
    Step::Request {
        len: p.done,
        inline: false,
    }
}

fn inline_request(
    buf: &[u8],
    p: &mut Progress,
    args: &mut Vec<Span>,
    inline: &mut Vec<u8>,
) -> Step {
    let Some(nl) = line_end(buf, 0, p, b'\n') else {
        return if buf.len() > MAX_INLINE {
            Step::Error(ProtoError::TooBigInline)
        } else {
            Step::Incomplete
        };
    };
    let line = if nl > 0 && buf[nl - 1] == b'\r' {
        &buf[..nl - 1]
    } else {
        &buf[..nl]
    };
    inline.clear();
    if !split_args(line, inline, args) {
        return Step::Error(ProtoError::UnbalancedQuotes);
    }
    if args.is_empty() {
        Step::Empty { len: nl + 1 }
    } else {
        Step::Request {
            len: nl + 1,
            inline: true,
        }
    }
}

/// C's `isspace`.
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

fn hex(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

/// Redis's `sdssplitargs`: splits `line` into arguments (unquoted into `out`, spans into `out`
/// pushed to `spans`). `false` for unbalanced quotes. The line is a C string: it ends at a NUL.
pub fn split_args(line: &[u8], out: &mut Vec<u8>, spans: &mut Vec<Span>) -> bool {
    let at = |i: usize| line.get(i).copied().unwrap_or(0);
    let mut p = 0;
    loop {
        while at(p) != 0 && is_space(at(p)) {
            p += 1;
        }
        if at(p) == 0 {
            return true;
        }
        let start = out.len();
        let (mut in_double, mut in_single) = (false, false);
        loop {
            let c = at(p);
            if in_double {
                if let (b'\\', b'x', Some(hi), Some(lo)) =
                    (c, at(p + 1), hex(at(p + 2)), hex(at(p + 3)))
                {
                    out.push(hi * 16 + lo);
                    p += 3;
                } else if c == b'\\' && at(p + 1) != 0 {
                    p += 1;
                    out.push(match at(p) {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 0x08,
                        b'a' => 0x07,
                        other => other,
                    });
                } else if c == b'"' {
                    // The closing quote must be followed by a space or nothing.
                    if at(p + 1) != 0 && !is_space(at(p + 1)) {
                        return false;
                    }
                    p += 1;
                    break;
                } else if c == 0 {
                    return false;
                } else {
                    out.push(c);
                }
            } else if in_single {
                if c == b'\\' && at(p + 1) == b'\'' {
                    p += 1;
                    out.push(b'\'');
                } else if c == b'\'' {
                    if at(p + 1) != 0 && !is_space(at(p + 1)) {
                        return false;
                    }
                    p += 1;
                    break;
                } else if c == 0 {
                    return false;
                } else {
                    out.push(c);
                }
            } else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' => {
                        p += 1;
                        break;
                    }
                    0 => break,
                    b'"' => in_double = true,
                    b'\'' => in_single = true,
                    _ => out.push(c),
                }
            }
            p += 1;
        }
        spans.push(Span::new(start, out.len() - start));
    }
}

/// Redis's `string2ll`: a canonical decimal `i64` (no sign but `-`, no leading zeros, no
/// spaces, under 21 bytes), or `None`.
pub fn string2ll(s: &[u8]) -> Option<i64> {
    if s.is_empty() || s.len() >= 21 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (negative, digits) = match s {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, s),
    };
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    let mut v: u64 = 0;
    for &c in digits {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    if negative {
        if v > i64::MAX as u64 + 1 {
            return None;
        }
        Some((v as i64).wrapping_neg())
    } else {
        i64::try_from(v).ok()
    }
}
