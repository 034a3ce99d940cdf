//! Output per turn: what is written to one connection during a turn (by its own callbacks, by
//! other connections' `send`, by work from other threads) leaves in one `write`/`writev` at the
//! end of the turn; shared buffers go out without a copy; replies larger than the pending cap
//! reach a reader that keeps reading; a producer driven by `on_drained` streams any size within
//! bounded memory. Syscalls are counted by the loop itself (`Metrics::write_calls`).

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sockman::{ConnId, Context, Handler};
use util::{local_config, read_exactly, turn_until_at};

/// Replies to each byte it reads with `copies` small writes (`<byte><i>\n`), all to itself;
/// keeps the ids of its connections.
#[derive(Default)]
struct Chatty {
    copies: u8,
    ids: Vec<ConnId>,
}

impl Handler for Chatty {
    type Conn = ();
    fn on_open(&mut self, ctx: &mut Context<'_>) {
        self.ids.push(ctx.id());
    }
    fn on_data(&mut self, _: &mut (), ctx: &mut Context<'_>, data: &[u8]) {
        for &b in data {
            for i in 0..self.copies {
                ctx.write(&[b, b'a' + i, b'\n']);
            }
        }
    }
}

#[test]
fn sixteen_writes_in_one_callback_leave_in_one_write() {
    let (mut server, addr) = util::bind(
        local_config(),
        Chatty {
            copies: 16,
            ..Chatty::default()
        },
    );
    let t0 = server.now();
    let mut client = util::connect(addr);
    turn_until_at(&mut server, t0, "the accept", |s| s.metrics().accepted == 1);
    for round in 0..20u8 {
        let before = server.metrics().write_calls;
        client.write_all(&[b'A' + round]).unwrap();
        turn_until_at(&mut server, t0, "the replies", |s| {
            s.metrics().bytes_out == 48 * (round as u64 + 1)
        });
        let got = read_exactly(&mut client, 48);
        let want: Vec<u8> = (0..16u8)
            .flat_map(|i| [b'A' + round, b'a' + i, b'\n'])
            .collect();
        assert_eq!(got, want, "round {round}");
        assert_eq!(
            server.metrics().write_calls - before,
            1,
            "16 writes in one turn are one write call"
        );
    }
    util::stop_at(&mut server, t0);
}

/// A publisher and subscribers: a line from a publisher goes to every subscriber, by `send`.
#[derive(Default)]
struct PubSub {
    subscribers: Vec<ConnId>,
    shared: bool,
}

impl Handler for PubSub {
    /// Whether this connection publishes (its first byte was `P`).
    type Conn = Option<bool>;
    fn on_open(&mut self, _ctx: &mut Context<'_, Option<bool>>) -> Option<bool> {
        None
    }
    fn on_data(
        &mut self,
        role: &mut Option<bool>,
        ctx: &mut Context<'_, Option<bool>>,
        data: &[u8],
    ) {
        let data = match role {
            Some(_) => data,
            None => {
                let publishes = data[0] == b'P';
                *role = Some(publishes);
                if !publishes {
                    self.subscribers.push(ctx.id());
                }
                &data[1..]
            }
        };
        if *role == Some(true) {
            for line in data.split_inclusive(|&b| b == b'\n') {
                let msg = Bytes::copy_from_slice(line);
                for &s in &self.subscribers {
                    let sent = if self.shared {
                        ctx.send_shared(s, msg.clone())
                    } else {
                        ctx.send(s, line)
                    };
                    sent.unwrap();
                }
            }
        }
    }
}

fn fan_out(shared: bool) {
    const SUBSCRIBERS: usize = 50;
    const MESSAGES: usize = 16;
    let handler = PubSub {
        shared,
        ..PubSub::default()
    };
    let (mut server, addr) = util::bind(local_config(), handler);
    let t0 = server.now();
    let mut subs: Vec<TcpStream> = (0..SUBSCRIBERS)
        .map(|_| {
            let mut s = util::connect(addr);
            s.write_all(b"S").unwrap();
            s
        })
        .collect();
    turn_until_at(&mut server, t0, "the subscribers", |s| {
        s.handler().subscribers.len() == SUBSCRIBERS
    });
    let mut publisher = util::connect(addr);
    // A message long enough to be shared whole (a shared buffer under 512 bytes is copied).
    let body = "x".repeat(600);
    let lines: String = (0..MESSAGES).map(|i| format!("{i:02} {body}\n")).collect();
    let before = server.metrics().write_calls;
    // The publisher's role byte and its 16 lines arrive in one segment: one read, one turn.
    publisher.write_all(format!("P{lines}").as_bytes()).unwrap();
    let total = (SUBSCRIBERS * lines.len()) as u64;
    turn_until_at(&mut server, t0, "the fan-out", |s| {
        s.metrics().bytes_out >= total
    });
    let calls = server.metrics().write_calls - before;
    assert_eq!(
        calls, SUBSCRIBERS as u64,
        "{MESSAGES} messages to each of {SUBSCRIBERS} subscribers in one turn: one write each"
    );
    for s in &mut subs {
        assert_eq!(read_exactly(s, lines.len()), lines.as_bytes());
    }
    util::stop_at(&mut server, t0);
}

#[test]
fn a_fan_out_of_sixteen_messages_is_one_write_per_subscriber() {
    fan_out(false);
}

#[test]
fn a_shared_fan_out_is_one_writev_per_subscriber() {
    fan_out(true);
}

#[test]
fn messages_from_another_thread_in_one_turn_leave_in_one_write() {
    let (mut server, addr) = util::bind(local_config(), Chatty::default());
    let t0 = server.now();
    let mut client = util::connect(addr);
    client.write_all(b"x").unwrap();
    turn_until_at(&mut server, t0, "the accept", |s| s.metrics().bytes_in == 1);
    let id = server.handler().ids[0];
    let handle = server.handle();
    let before = server.metrics().write_calls;
    let sender = std::thread::spawn(move || {
        for i in 0..16u8 {
            handle.send(id, vec![b'a' + i; 10]).unwrap();
        }
    });
    sender.join().unwrap();
    // All sixteen are queued before the loop turns: one turn delivers them, in one write.
    turn_until_at(&mut server, t0, "the messages", |s| {
        s.metrics().bytes_out == 160
    });
    assert_eq!(server.metrics().write_calls - before, 1);
    let got = read_exactly(&mut client, 160);
    let want: Vec<u8> = (0..16u8).flat_map(|i| [b'a' + i; 10]).collect();
    assert_eq!(got, want);
    util::stop_at(&mut server, t0);
}

/// Answers `G<n>\n` with a shared buffer of `n` MiB (the same one for every reader), and
/// `S<n>\n` with `n` MiB produced piece by piece while the socket drains.
struct Store {
    value: Bytes,
    /// Bytes the streaming producer still owes each connection.
    high_water: usize,
}

const PIECE: usize = 16 * 1024;

fn piece(offset: usize) -> Vec<u8> {
    (0..PIECE).map(|i| ((offset + i) % 251) as u8).collect()
}

impl Store {
    /// Writes pieces of the stream while the connection is writable.
    fn produce(&mut self, owed: &mut (usize, usize), ctx: &mut Context<'_, (usize, usize)>) {
        let (sent, total) = owed;
        while *sent < *total && ctx.is_writable() {
            ctx.write(&piece(*sent));
            *sent += PIECE;
            self.high_water = self.high_water.max(ctx.pending());
        }
    }
}

impl Handler for Store {
    /// The stream: bytes produced so far, and its length.
    type Conn = (usize, usize);
    fn on_open(&mut self, _ctx: &mut Context<'_, (usize, usize)>) -> (usize, usize) {
        (0, 0)
    }
    fn on_data(
        &mut self,
        owed: &mut (usize, usize),
        ctx: &mut Context<'_, (usize, usize)>,
        data: &[u8],
    ) {
        let text = std::str::from_utf8(data).unwrap().trim();
        let mib: usize = text[1..].parse().unwrap();
        match &text[..1] {
            "G" => assert!(ctx.write_shared(self.value.slice(..mib << 20))),
            "S" => {
                *owed = (0, mib << 20);
                self.produce(owed, ctx);
            }
            _ => panic!("{text}"),
        }
    }
    fn on_drained(&mut self, owed: &mut (usize, usize), ctx: &mut Context<'_, (usize, usize)>) {
        self.produce(owed, ctx);
    }
}

/// Reads `len` bytes on a thread (as a reader that keeps reading), returning them.
fn reader(mut s: TcpStream, len: usize) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut got = vec![0; len];
        s.read_exact(&mut got).expect("read the whole reply");
        got
    })
}

#[test]
fn a_shared_reply_far_larger_than_the_pending_cap_reaches_every_reader() {
    const READERS: usize = 4;
    const MIB: usize = 16;
    let value = Bytes::from(util::pattern(MIB << 20, 7));
    let store = Store {
        value: value.clone(),
        high_water: 0,
    };
    // The default cap: 64 KiB of copied output per connection; the reply is 256 times that.
    let (mut server, addr) = util::bind(local_config(), store);
    let t0 = server.now();
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let mut s = util::connect(addr);
            s.write_all(format!("G{MIB}\n").as_bytes()).unwrap();
            reader(s, MIB << 20)
        })
        .collect();
    let total = (READERS * (MIB << 20)) as u64;
    let bound = Instant::now() + Duration::from_secs(60);
    while server.metrics().bytes_out < total {
        assert!(Instant::now() < bound, "{}", server.metrics());
        server.turn_at(t0, Some(Duration::from_millis(5))).unwrap();
    }
    for r in readers {
        assert!(r.join().unwrap() == value[..], "a reader got other bytes");
    }
    let m = server.metrics();
    // The readers close once they have it all; nothing else closed anything.
    assert_eq!(
        m.closed_total(),
        m.closed_by(sockman::CloseReason::PeerClosed),
        "{m}"
    );
    assert_eq!(m.pending_bytes, 0, "{m}");
    util::stop_at(&mut server, t0);
}

#[test]
fn a_producer_driven_by_on_drained_streams_any_size_in_bounded_memory() {
    const MIB: usize = 32;
    let store = Store {
        value: Bytes::new(),
        high_water: 0,
    };
    let config = local_config();
    let (_, high) = config.watermarks();
    let (mut server, addr) = util::bind(config, store);
    let t0 = server.now();
    let mut s = util::connect(addr);
    s.write_all(format!("S{MIB}\n").as_bytes()).unwrap();
    let r = reader(s, MIB << 20);
    let bound = Instant::now() + Duration::from_secs(60);
    while server.metrics().bytes_out < (MIB << 20) as u64 {
        assert!(Instant::now() < bound, "{}", server.metrics());
        server.turn_at(t0, Some(Duration::from_millis(5))).unwrap();
    }
    let got = r.join().unwrap();
    for (i, chunk) in got.chunks(PIECE).enumerate() {
        assert!(chunk == piece(i * PIECE), "piece {i} differs");
    }
    // Never more queued than the high watermark plus the piece that crossed it.
    let most = server.handler().high_water;
    assert!(
        most <= high + PIECE,
        "{most} queued at most (high watermark {high})"
    );
    util::stop_at(&mut server, t0);
}

#[test]
fn messages_from_another_thread_count_against_the_pending_cap() {
    // A reader that never reads, no write timeout: only the cap can end it. Every message a
    // producer sends it is copied for it, so the cap applies (64 KiB here), and the 4 KiB
    // messages overflow it long before 64 MiB pile up.
    let config = sockman::Config {
        max_pending: 64 * 1024,
        write_timeout: Duration::ZERO,
        ..local_config()
    };
    let (mut server, addr) = util::bind(config, Chatty::default());
    let t0 = server.now();
    let _client = util::connect_small_rcvbuf(addr);
    turn_until_at(&mut server, t0, "the accept", |s| {
        !s.handler().ids.is_empty()
    });
    let id = server.handler().ids[0];
    let handle = server.handle();
    let producer = std::thread::spawn(move || {
        let mut sent = 0;
        while sent < 16 * 1024 {
            match handle.send(id, vec![0u8; 4096]) {
                Ok(()) => sent += 1,
                Err(sockman::RemoteError::Full(_)) => std::thread::yield_now(),
                Err(sockman::RemoteError::Stopped(_)) => break,
            }
        }
    });
    turn_until_at(&mut server, t0, "the overflow", |s| {
        let m = s.metrics();
        assert!(
            m.pending_bytes <= 64 * 1024,
            "{} pending for a 64 KiB cap: {m}",
            m.pending_bytes
        );
        m.closed_by(sockman::CloseReason::Overflow) == 1
    });
    // The rest of the producer's messages find the connection gone (counted as dropped).
    turn_until_at(&mut server, t0, "the producer's end", |_| {
        producer.is_finished()
    });
    producer.join().unwrap();
    assert!(server.metrics().remote_dropped > 0, "{}", server.metrics());
    util::stop_at(&mut server, t0);
}

/// Dials, and writes past the high watermark when the dial connects.
#[derive(Default)]
struct Dialer {
    connected: bool,
    drained: usize,
    writable_after_connect: Option<bool>,
}

impl Handler for Dialer {
    type Conn = ();
    fn on_open(&mut self, _: &mut Context<'_>) {}
    fn on_data(&mut self, _: &mut (), _: &mut Context<'_>, _: &[u8]) {}
    fn on_connected(&mut self, _: &mut (), ctx: &mut Context<'_>) {
        self.connected = true;
        assert!(
            !ctx.is_writable(),
            "unwritable: more than the high watermark was queued"
        );
        // The queue and this pass the high watermark: they leave at once, all of it.
        assert!(ctx.write(&[2u8; 40 * 1024]));
        self.writable_after_connect = Some(ctx.is_writable());
    }
    fn on_drained(&mut self, _: &mut (), _: &mut Context<'_>) {
        self.drained += 1;
    }
}

#[test]
fn a_dial_unwritable_while_connecting_is_told_when_it_drains() {
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut server, _) = util::bind(local_config(), Dialer::default());
    let t0 = server.now();
    let id = server.connect(upstream.local_addr().unwrap(), ()).unwrap();
    // More than the 32 KiB high watermark, queued while connecting.
    server.with_context(|_, ctx| ctx.send(id, &[1u8; 40 * 1024]).unwrap());
    let _peer = util::accept_within(&upstream, util::WAIT);
    turn_until_at(&mut server, t0, "the connect and the flush", |s| {
        s.handler().connected && s.metrics().pending_bytes == 0
    });
    for _ in 0..5 {
        util::step(&mut server, t0);
    }
    let h = server.handler();
    assert_eq!(h.writable_after_connect, Some(true));
    assert_eq!(
        h.drained, 1,
        "it went unwritable, became writable, and was never told"
    );
    util::stop_at(&mut server, t0);
}
