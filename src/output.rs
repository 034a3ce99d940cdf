//! A connection's queued output: bytes copied on its behalf and shared buffers it was handed
//! ([`Bytes`]), in the order they were written, sent with one `write` (one run of bytes) or one
//! `writev` (several) per attempt.
//!
//! Copied bytes all go into one buffer, so a handler that writes sixteen small replies in a
//! turn queues one run of bytes and the socket gets one `write`. A shared buffer is queued as
//! it is (a reference count, no copy), between the runs of copied bytes around it, and the
//! whole queue leaves with one `writev`. So N readers of one stored value cost one copy of it,
//! not N.
//!
//! # Invariants
//! - `len` is the sum of what every segment has left; `copied` the part of it in `buf`.
//! - Once everything is written the buffer is cleared but keeps its capacity (bounded by
//!   [`KEEP_CAPACITY`]), so a connection's next turn of output allocates nothing.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use bytes::Bytes;

use crate::time::Tick;

/// Shared buffers up to this size are copied instead: a segment of its own costs more than
/// copying a few hundred bytes, and it keeps the common case (all copied) to one `write`.
pub(crate) const COPY_SHARED_BELOW: usize = 512;

/// Written bytes at the front of the buffer below which it is not worth moving the rest down.
const COMPACT_MIN: usize = 4096;

/// Slices handed to one `writev` at most (Linux allows 1 024; past a few dozen the call is
/// dominated by the copy, not by the call).
const MAX_IOV: usize = 64;

/// Capacity a drained output keeps for the next time (more is given back): a connection that
/// once queued megabytes does not hold them while idle.
pub(crate) const KEEP_CAPACITY: usize = 64 * 1024;

/// One run of queued output.
#[derive(Debug)]
enum Seg {
    /// The next `n` bytes of [`Output::buf`].
    Copied(usize),
    /// A shared buffer, whole.
    Shared(Bytes),
}

/// How an attempt to write queued output ended.
#[derive(Debug)]
pub(crate) enum Status {
    /// Everything queued is written.
    Done,
    /// The socket would block with output left.
    Blocked,
    /// A write failed.
    Failed(io::Error),
}

/// What an attempt to write queued output did.
#[derive(Debug)]
pub(crate) struct Wrote {
    pub(crate) bytes: usize,
    /// `write`/`writev` calls made.
    pub(crate) calls: u64,
    pub(crate) status: Status,
}

/// Queued output of one connection; see the [module docs](self).
#[derive(Debug, Default)]
pub(crate) struct Output {
    /// Every copied byte not yet written, from `start` on.
    buf: Vec<u8>,
    /// Where in `buf` the front copied run begins (bytes before it are written).
    start: usize,
    segs: VecDeque<Seg>,
    /// Bytes of the front segment already written.
    front: usize,
    /// Bytes queued and not yet written, copied and shared.
    len: usize,
    /// The part of `len` copied into `buf`: what [`Config::max_pending`](crate::Config::max_pending)
    /// bounds.
    copied: usize,
    /// Tick of the last write progress (or of when output was first queued): the write-stall
    /// deadline counts from here.
    pub(crate) last_progress: Tick,
}

impl Output {
    /// Bytes queued and not yet written.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes queued that were copied (not shared).
    pub(crate) fn copied(&self) -> usize {
        self.copied
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues a copy of `data`.
    pub(crate) fn push_copy(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        self.compact();
        self.buf.extend_from_slice(data);
        match self.segs.back_mut() {
            Some(Seg::Copied(n)) => *n += data.len(),
            _ => self.segs.push_back(Seg::Copied(data.len())),
        }
        self.len += data.len();
        self.copied += data.len();
    }

    /// Drops the copied bytes already written from the front of the buffer once they are at
    /// least as many as the live ones (and a few KiB): a queue that is refilled before it
    /// empties (a producer on a slow reader) would otherwise keep every byte it ever sent.
    /// Each live byte moves at most once per halving of the dead part: amortised O(1).
    fn compact(&mut self) {
        let front_copied = matches!(self.segs.front(), Some(Seg::Copied(_)));
        let dead = self.start + if front_copied { self.front } else { 0 };
        if dead < COMPACT_MIN || dead < self.buf.len() - dead {
            return;
        }
        self.buf.drain(..dead);
        self.start = 0;
        if front_copied {
            if let Some(Seg::Copied(n)) = self.segs.front_mut() {
                *n -= self.front;
            }
            self.front = 0;
        }
    }

    /// Queues a shared buffer (a small one is copied, see [`COPY_SHARED_BELOW`]).
    pub(crate) fn push_shared(&mut self, data: Bytes) {
        if data.len() < COPY_SHARED_BELOW {
            return self.push_copy(&data);
        }
        self.len += data.len();
        self.segs.push_back(Seg::Shared(data));
    }

    /// The queued bytes, in order, as slices for one `writev` (at most [`MAX_IOV`]).
    fn slices<'a>(&'a self, out: &mut [IoSlice<'a>; MAX_IOV]) -> usize {
        let mut pos = self.start;
        let mut n = 0;
        for (i, seg) in self.segs.iter().enumerate() {
            if n == MAX_IOV {
                break;
            }
            let skip = if i == 0 { self.front } else { 0 };
            let s: &[u8] = match seg {
                Seg::Copied(len) => {
                    let s = &self.buf[pos + skip..pos + len];
                    pos += len;
                    s
                }
                Seg::Shared(b) => &b[skip..],
            };
            out[n] = IoSlice::new(s);
            n += 1;
        }
        n
    }

    /// Marks `n` more bytes as written, from the front.
    fn advance(&mut self, mut n: usize) {
        if n == self.len {
            // All of it (the common case: a turn's replies leave whole).
            self.reset();
            return;
        }
        self.len -= n;
        while n > 0 {
            let Some(front) = self.segs.front() else {
                debug_assert!(false, "advanced past the queue by {n}");
                break;
            };
            let (seg_len, copied) = match front {
                Seg::Copied(len) => (*len, true),
                Seg::Shared(b) => (b.len(), false),
            };
            let left = seg_len - self.front;
            let step = n.min(left);
            if copied {
                self.copied -= step;
            }
            n -= step;
            if step == left {
                self.segs.pop_front();
                self.front = 0;
                if copied {
                    self.start += seg_len;
                }
            } else {
                self.front += step;
            }
        }
        if self.segs.is_empty() {
            debug_assert_eq!((self.len, self.copied), (0, 0));
            self.reset();
        }
    }

    /// Empty: nothing queued, the buffer cleared (its capacity kept).
    fn reset(&mut self) {
        if !self.segs.is_empty() {
            self.segs.clear();
        }
        self.buf.clear();
        self.start = 0;
        self.front = 0;
        self.len = 0;
        self.copied = 0;
    }

    /// Writes as much as `w` takes: one `write` for a single run, `writev` for several, until
    /// everything is out or `w` would block.
    pub(crate) fn write_to(&mut self, w: &mut impl Write) -> Wrote {
        let mut wrote = Wrote {
            bytes: 0,
            calls: 0,
            status: Status::Done,
        };
        while !self.is_empty() {
            wrote.calls += 1;
            let result = if self.segs.len() == 1 {
                let s: &[u8] = match &self.segs[0] {
                    Seg::Copied(len) => &self.buf[self.start + self.front..self.start + len],
                    Seg::Shared(b) => &b[self.front..],
                };
                w.write(s)
            } else {
                let mut iov = [IoSlice::new(&[]); MAX_IOV];
                let n = self.slices(&mut iov);
                w.write_vectored(&iov[..n])
            };
            match result {
                Ok(0) => {
                    wrote.status = Status::Failed(io::ErrorKind::WriteZero.into());
                    break;
                }
                Ok(n) => {
                    self.advance(n);
                    wrote.bytes += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wrote.status = Status::Blocked;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    wrote.status = Status::Failed(e);
                    break;
                }
            }
        }
        wrote
    }

    /// Drops everything queued and readies the output for reuse, with at most `keep` bytes of
    /// buffer capacity (at most [`KEEP_CAPACITY`]).
    pub(crate) fn clear(&mut self, keep: usize) {
        if !self.is_empty() {
            self.reset();
        }
        let keep = keep.min(KEEP_CAPACITY);
        if self.buf.capacity() > keep {
            self.buf.shrink_to(keep);
        }
        if self.segs.capacity() > 16 {
            self.segs.shrink_to(16);
        }
    }

    /// The copied bytes, taken out (for the PROXY header phase, which keeps a partial header
    /// here: no output exists yet).
    pub(crate) fn take_copied(&mut self) -> Vec<u8> {
        let mut v = std::mem::take(&mut self.buf);
        v.drain(..self.start);
        self.clear(0);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that takes at most `per_call` bytes per call, and would block after
    /// `calls_left` calls; counts plain and vectored calls.
    struct Sink {
        got: Vec<u8>,
        per_call: usize,
        calls_left: usize,
        plain: usize,
        vectored: usize,
    }

    impl Sink {
        fn take(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if self.calls_left == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.calls_left -= 1;
            let mut room = self.per_call;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(room);
                self.got.extend_from_slice(&b[..take]);
                room -= take;
                n += take;
                if room == 0 {
                    break;
                }
            }
            Ok(n)
        }
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.plain += 1;
            self.take(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.vectored += 1;
            self.take(bufs)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn sink(per_call: usize, calls: usize) -> Sink {
        Sink {
            got: Vec::new(),
            per_call,
            calls_left: calls,
            plain: 0,
            vectored: 0,
        }
    }

    #[test]
    fn sixteen_small_writes_leave_in_one_call() {
        let mut o = Output::default();
        for i in 0..16u8 {
            o.push_copy(&[i; 10]);
        }
        assert_eq!((o.len(), o.copied()), (160, 160));
        let mut s = sink(1 << 20, 100);
        let w = o.write_to(&mut s);
        assert!(matches!(w.status, Status::Done), "{w:?}");
        assert_eq!((w.bytes, w.calls, s.plain, s.vectored), (160, 1, 1, 0));
        let want: Vec<u8> = (0..16u8).flat_map(|i| [i; 10]).collect();
        assert_eq!(s.got, want);
        assert!(o.is_empty());
    }

    #[test]
    fn shared_buffers_keep_their_place_between_copies_and_leave_in_one_writev() {
        let big = Bytes::from(vec![7u8; 4096]);
        let mut o = Output::default();
        o.push_copy(b"$4096\r\n");
        o.push_shared(big.clone());
        o.push_copy(b"\r\n");
        o.push_shared(Bytes::from_static(b"+OK\r\n")); // small: copied
        assert_eq!(o.len(), 7 + 4096 + 2 + 5);
        assert_eq!(o.copied(), 7 + 2 + 5);
        let mut s = sink(1 << 20, 100);
        let w = o.write_to(&mut s);
        assert_eq!((w.calls, s.plain, s.vectored), (1, 0, 1), "one writev");
        let mut want = b"$4096\r\n".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(b"\r\n+OK\r\n");
        assert_eq!(s.got, want);
    }

    #[test]
    fn partial_writes_resume_where_they_stopped() {
        let mut o = Output::default();
        let mut want = Vec::new();
        for i in 0..50u8 {
            if i % 3 == 0 {
                let b = Bytes::from(vec![i; 600 + i as usize]);
                want.extend_from_slice(&b);
                o.push_shared(b);
            } else {
                want.extend_from_slice(&[i; 37]);
                o.push_copy(&[i; 37]);
            }
        }
        let total = o.len();
        assert_eq!(total, want.len());
        let mut got = Vec::new();
        // 97 bytes per call, 5 calls per attempt: many attempts, each blocked at the end.
        for _ in 0..1000 {
            let mut s = sink(97, 5);
            let w = o.write_to(&mut s);
            got.extend_from_slice(&s.got);
            assert_eq!(w.bytes, s.got.len());
            match w.status {
                Status::Done => break,
                Status::Blocked => assert_eq!(w.calls, 6, "five writes and the one that blocked"),
                Status::Failed(e) => panic!("{e}"),
            }
            assert_eq!(o.len(), total - got.len());
        }
        assert_eq!(got, want);
        assert!(o.is_empty() && o.copied() == 0);
    }

    #[test]
    fn a_drained_output_keeps_bounded_capacity() {
        let mut o = Output::default();
        o.push_copy(&vec![1u8; 4 * KEEP_CAPACITY]);
        let mut s = sink(usize::MAX, 10);
        assert!(matches!(o.write_to(&mut s).status, Status::Done));
        o.clear(KEEP_CAPACITY);
        assert!(o.buf.capacity() <= KEEP_CAPACITY);
    }

    #[test]
    fn a_queue_that_never_empties_keeps_only_its_live_bytes() {
        // A producer that refills a slowly drained queue: 4 KiB in, 4 KiB out, 1 KiB left
        // each round. The buffer must hold what is queued, not everything ever sent.
        let mut o = Output::default();
        o.push_copy(&[1u8; 1024]);
        for _ in 0..10_000 {
            o.push_copy(&[2u8; 4096]);
            let mut s = sink(4096, 1);
            assert!(matches!(o.write_to(&mut s).status, Status::Blocked));
            assert_eq!((o.len(), o.copied()), (1024, 1024));
        }
        assert!(
            o.buf.len() <= 4 * 4096,
            "{} bytes held for {} queued",
            o.buf.len(),
            o.len()
        );
        // And what is left is the right bytes.
        let mut s = sink(1 << 20, 1);
        o.write_to(&mut s);
        assert_eq!(s.got, vec![2u8; 1024]);
    }

    #[test]
    fn the_header_phase_gets_its_bytes_back() {
        let mut o = Output::default();
        o.push_copy(b"PROXY TCP4 ");
        o.push_copy(b"1.2.3.4");
        assert_eq!(o.take_copied(), b"PROXY TCP4 1.2.3.4");
        assert!(o.is_empty());
    }
}
