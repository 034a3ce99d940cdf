//! The handler API beyond echo, over real sockets with time stepped by `turn_at`: writes to and
//! closes of other connections by id (and the stale-id guarantee), timers, the idle policy,
//! writability, half-close, pausing reads, periodic work, work from other threads, what
//! `Context` says of a connection (bytes, age; in `on_close` too), and closing without a linger.

mod util;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use sockman::{
    CloseReason, Config, ConnId, Context, Eof, Handler, Idle, RemoteError, SendError, Server,
};
use util::{connect, local_config, read_exactly, step, turn_until_at};

const TICK: Duration = Duration::from_millis(10);

fn config() -> Config {
    Config {
        tick: TICK,
        ..local_config()
    }
}

/// Records every callback, and does what its knobs say.
#[derive(Default)]
struct Probe {
    ids: Vec<ConnId>,
    log: Vec<String>,
    timer_after: Option<Duration>,
    keep_idle: bool,
    keep_open_on_eof: bool,
    periodic: u32,
}

impl Handler for Probe {
    type Conn = u32; // timers fired on this connection

    fn on_open(&mut self, ctx: &mut Context<'_, u32>) -> u32 {
        self.ids.push(ctx.id());
        if let Some(after) = self.timer_after {
            ctx.set_timer(after);
        }
        0
    }

    fn on_data(&mut self, _: &mut u32, ctx: &mut Context<'_, u32>, data: &[u8]) {
        self.log.push(format!("data {} {}", ctx.id(), data.len()));
        match data {
            b"cancel" => ctx.cancel_timer(),
            b"close" => ctx.close(),
            _ => {}
        }
    }

    fn on_timer(&mut self, fired: &mut u32, ctx: &mut Context<'_, u32>) {
        *fired += 1;
        ctx.write(format!("timer {fired}\n").as_bytes());
        self.log.push(format!("timer {}", ctx.id()));
    }

    fn on_idle(&mut self, _: &mut u32, ctx: &mut Context<'_, u32>) -> Idle {
        self.log.push(format!("idle {}", ctx.id()));
        if self.keep_idle {
            ctx.write(b"ping\n");
            Idle::Keep
        } else {
            Idle::Close
        }
    }

    fn on_eof(&mut self, _: &mut u32, ctx: &mut Context<'_, u32>) -> Eof {
        self.log.push(format!("eof {}", ctx.id()));
        if self.keep_open_on_eof {
            ctx.write(b"after your eof\n");
            ctx.close();
            Eof::KeepOpen
        } else {
            Eof::Close
        }
    }

    fn on_close(&mut self, _: u32, ctx: &mut Context<'_, u32>, reason: CloseReason) {
        self.log.push(format!("close {} {reason}", ctx.id()));
    }

    fn on_periodic(&mut self, ctx: &mut Context<'_, u32>) {
        assert_eq!(ctx.id(), ConnId::NONE);
        self.periodic += 1;
    }
}

impl Probe {
    /// A probe that sets a timer of `after` on each new connection.
    fn with_timer(after: Duration) -> Probe {
        Probe {
            timer_after: Some(after),
            ..Probe::default()
        }
    }
}

/// Binds `handler` with `config` and accepts one client at the server's time from the start;
/// returns the server, that time and the client.
#[track_caller]
fn bind_and_accept<H: Handler>(config: Config, handler: H) -> (Server<H>, Instant, TcpStream) {
    let (mut server, _) = util::bind(config, handler);
    let t0 = server.now();
    let client = accept_one(&mut server, t0);
    (server, t0, client)
}

#[track_caller]
fn accept_one<H: Handler>(server: &mut Server<H>, now: Instant) -> TcpStream {
    let before = server.metrics().accepted;
    let client = connect(server.local_addrs()[0]);
    turn_until_at(server, now, "the accept", |s| s.metrics().accepted > before);
    client
}

#[test]
fn a_timer_fires_at_its_tick_and_not_before() {
    let probe = Probe::with_timer(Duration::from_millis(100));
    let (mut server, t0, mut client) = bind_and_accept(config(), probe);
    // 100 ms is 10 ticks from the tick of t0: due at t0's tick + 10, never before.
    step(&mut server, t0 + Duration::from_millis(99));
    assert!(!server.handler().log.iter().any(|l| l.starts_with("timer")));
    step(&mut server, t0 + Duration::from_millis(110));
    assert!(
        server.handler().log.iter().any(|l| l.starts_with("timer")),
        "{:?}",
        server.handler().log
    );
    assert_eq!(read_exactly(&mut client, 8), b"timer 1\n");
    // Not re-armed by itself.
    step(&mut server, t0 + Duration::from_secs(2));
    assert_eq!(
        server
            .handler()
            .log
            .iter()
            .filter(|l| l.starts_with("timer"))
            .count(),
        1
    );
    util::stop(&mut server);
}

#[test]
fn a_cancelled_timer_does_not_fire() {
    let probe = Probe::with_timer(Duration::from_millis(100));
    let (mut server, t0, mut client) = bind_and_accept(config(), probe);
    client.write_all(b"cancel").unwrap();
    turn_until_at(&mut server, t0, "the cancel", |s| s.metrics().bytes_in == 6);
    step(&mut server, t0 + Duration::from_secs(1));
    assert!(
        !server.handler().log.iter().any(|l| l.starts_with("timer")),
        "{:?}",
        server.handler().log
    );
    util::stop(&mut server);
}

#[test]
fn idle_deadline_asks_the_handler_and_keep_restarts_it() {
    let cfg = Config {
        idle_timeout: Duration::from_millis(200),
        ..config()
    };
    let probe = Probe {
        keep_idle: true,
        ..Probe::default()
    };
    let (mut server, t0, mut client) = bind_and_accept(cfg, probe);
    // Idle for 200 ms (+ the one tick of rounding): the handler is asked and keeps it.
    step(&mut server, t0 + Duration::from_millis(199));
    assert!(
        server.handler().log.is_empty(),
        "{:?}",
        server.handler().log
    );
    let t1 = t0 + Duration::from_millis(210);
    step(&mut server, t1);
    assert_eq!(server.handler().log.len(), 1, "{:?}", server.handler().log);
    assert_eq!(read_exactly(&mut client, 5), b"ping\n");
    assert_eq!(server.metrics().active, 1);
    // Kept: the timeout starts again from t1.
    step(&mut server, t1 + Duration::from_millis(199));
    assert_eq!(server.handler().log.len(), 1);
    step(&mut server, t1 + Duration::from_millis(210));
    assert_eq!(server.handler().log.len(), 2, "{:?}", server.handler().log);
    assert_eq!(read_exactly(&mut client, 5), b"ping\n");
    // The default policy closes.
    server.handler_mut().keep_idle = false;
    step(&mut server, t1 + Duration::from_millis(420));
    assert_eq!(server.metrics().closed_by(CloseReason::IdleTimeout), 1);
    util::expect_closed(&mut client);
}

#[test]
fn writes_reach_other_connections_and_stale_ids_reach_nothing() {
    let (mut server, _) = util::bind(config(), Probe::default());
    let t0 = server.now();
    let mut a = accept_one(&mut server, t0);
    let mut b = accept_one(&mut server, t0);
    let [id_a, id_b] = [server.handler().ids[0], server.handler().ids[1]];
    server.with_context(|_, ctx| {
        ctx.send(id_b, b"from outside to b\n").unwrap();
        ctx.conn(id_a).unwrap().write(b"to a\n");
    });
    assert_eq!(read_exactly(&mut b, 18), b"from outside to b\n");
    assert_eq!(read_exactly(&mut a, 5), b"to a\n");
    // Close a by id; its id goes stale.
    server.with_context(|_, ctx| ctx.close_conn(id_a).unwrap());
    a.shutdown(Shutdown::Write).unwrap(); // the linger ends at our EOF
    util::expect_closed(&mut a);
    turn_until_at(&mut server, t0, "a closed", |s| {
        s.metrics().closed_by(CloseReason::Handler) == 1
    });
    // A new connection takes a's slot (slab reuses the last freed key) with a new generation.
    turn_until_at(&mut server, t0, "a's linger", |s| {
        s.metrics().lingering == 0
    });
    let mut c = accept_one(&mut server, t0);
    let id_c = server.handler().ids[2];
    assert_eq!(id_c.key(), id_a.key(), "the slot is reused");
    assert_ne!(id_c.generation(), id_a.generation());
    let stale = server.with_context(|_, ctx| {
        (
            ctx.send(id_a, b"must not reach c"),
            ctx.close_conn(id_a),
            ctx.conn(id_a).is_none(),
        )
    });
    assert_eq!(stale, (Err(SendError::Gone), Err(SendError::Gone), true));
    // c got nothing and is still open: it echoes its own traffic through the log.
    c.write_all(b"hi").unwrap();
    turn_until_at(&mut server, t0, "c's data", |s| s.metrics().bytes_in == 2);
    c.set_nonblocking(true).unwrap();
    let mut buf = [0; 64];
    assert!(c.read(&mut buf).is_err(), "c received the stale write");
    assert_eq!(server.metrics().active, 2);
    drop(b);
    util::stop(&mut server);
}

/// Writes whatever a connection sends to every other connection; counts drain callbacks.
#[derive(Default)]
struct Fanout {
    ids: Vec<ConnId>,
    drained: Vec<ConnId>,
    closed: Vec<(ConnId, CloseReason)>,
}

impl Handler for Fanout {
    type Conn = ();
    fn on_open(&mut self, ctx: &mut Context<'_>) {
        self.ids.push(ctx.id());
    }
    fn on_data(&mut self, _: &mut (), ctx: &mut Context<'_>, data: &[u8]) {
        for &id in &self.ids {
            if id != ctx.id() {
                let _ = ctx.send(id, data);
            }
        }
    }
    fn on_drained(&mut self, _: &mut (), ctx: &mut Context<'_>) {
        assert!(ctx.is_writable());
        self.drained.push(ctx.id());
    }
    fn on_close(&mut self, _: (), ctx: &mut Context<'_>, reason: CloseReason) {
        self.closed.push((ctx.id(), reason));
        self.ids.retain(|&id| id != ctx.id());
    }
}

#[test]
fn an_overflowing_write_closes_the_target_not_the_sender() {
    let cfg = Config {
        max_pending: 64 * 1024,
        // A small kernel send buffer, so that the pending cap, not the kernel, takes the flood.
        send_buffer: Some(16 * 1024),
        ..config()
    };
    let (mut server, addr) = util::bind(cfg, Fanout::default());
    let t0 = server.now();
    let mut sender = connect(addr);
    let slow = util::connect_small_rcvbuf(addr);
    turn_until_at(&mut server, t0, "two accepts", |s| {
        s.metrics().accepted == 2
    });
    // The slow reader never reads: its pending output overflows and it alone is closed.
    let chunk = vec![b'x'; 16 * 1024];
    for _ in 0..64 {
        sender.write_all(&chunk).unwrap();
        let want = server.metrics().bytes_in + chunk.len() as u64;
        turn_until_at(&mut server, t0, "the chunk", |s| {
            s.metrics().bytes_in == want
        });
        if server.metrics().closed_by(CloseReason::Overflow) == 1 {
            break;
        }
    }
    let m = server.metrics().clone();
    assert_eq!(m.closed_by(CloseReason::Overflow), 1, "{m}");
    assert_eq!(m.active, 1, "the sender stays: {m}");
    let closed = &server.handler().closed;
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0].1, CloseReason::Overflow);
    drop(slow);
    util::stop(&mut server);
}

#[test]
fn on_drained_runs_once_pending_output_falls_to_the_low_watermark() {
    let cfg = Config {
        max_pending: 1 << 20,
        send_buffer: Some(16 * 1024),
        write_high_watermark: Some(64 * 1024),
        write_low_watermark: Some(0),
        ..config()
    };
    let (mut server, addr) = util::bind(cfg, Fanout::default());
    let t0 = server.now();
    let mut sender = connect(addr);
    let mut reader = util::connect_small_rcvbuf(addr);
    turn_until_at(&mut server, t0, "two accepts", |s| {
        s.metrics().accepted == 2
    });
    let reader_id = server.handler().ids[1];
    let total = 512 * 1024;
    let data = util::pattern(total, 3);
    for chunk in data.chunks(64 * 1024) {
        sender.write_all(chunk).unwrap();
        let want = server.metrics().bytes_in + chunk.len() as u64;
        turn_until_at(&mut server, t0, "the chunk read", |s| {
            s.metrics().bytes_in == want
        });
    }
    let writable = server.with_context(|_, ctx| ctx.conn(reader_id).unwrap().is_writable());
    assert!(
        !writable,
        "512 KiB pending is above the 64 KiB high watermark"
    );
    assert!(server.handler().drained.is_empty());
    // The reader catches up: everything arrives, and the drain is reported once.
    let got = std::thread::scope(|s| {
        let r = s.spawn(|| read_exactly(&mut reader, total));
        turn_until_at(&mut server, t0, "the drain", |s| {
            !s.handler().drained.is_empty()
        });
        r.join().unwrap()
    });
    util::assert_same(&got, &data);
    assert_eq!(server.handler().drained, vec![reader_id]);
    util::stop(&mut server);
}

#[test]
fn eof_can_keep_the_connection_open_for_writing() {
    let probe = Probe {
        keep_open_on_eof: true,
        ..Probe::default()
    };
    let (mut server, t0, mut client) = bind_and_accept(config(), probe);
    client.shutdown(Shutdown::Write).unwrap();
    turn_until_at(&mut server, t0, "the eof", |s| {
        s.handler().log.iter().any(|l| l.starts_with("eof"))
    });
    // Written after the peer's FIN, then closed: the half-open connection carried it.
    assert_eq!(read_exactly(&mut client, 15), b"after your eof\n");
    util::expect_closed(&mut client);
    turn_until_at(&mut server, t0, "the close", |s| s.metrics().active == 0);
    assert_eq!(server.metrics().closed_by(CloseReason::Handler), 1);
    util::stop(&mut server);
}

/// Pauses reading its connection after the first bytes; resumes it from another thread.
struct Pauser {
    id: Option<ConnId>,
    seen: usize,
}

impl Handler for Pauser {
    type Conn = ();
    fn on_open(&mut self, ctx: &mut Context<'_>) {
        self.id = Some(ctx.id());
    }
    fn on_data(&mut self, _: &mut (), ctx: &mut Context<'_>, data: &[u8]) {
        self.seen += data.len();
        let id = ctx.id();
        ctx.conn(id).unwrap().pause_reading();
    }
}

#[test]
fn paused_reads_resume_without_a_new_edge_and_remote_work_runs_on_the_loop() {
    let (mut server, t0, mut client) = bind_and_accept(config(), Pauser { id: None, seen: 0 });
    client.write_all(b"first").unwrap();
    turn_until_at(&mut server, t0, "the first read", |s| s.handler().seen == 5);
    client.write_all(b"second").unwrap();
    // Paused: the bytes wait in the kernel (several turns, none reads them).
    for _ in 0..5 {
        server.turn_at(t0, Some(Duration::from_millis(10))).unwrap();
    }
    assert_eq!(server.handler().seen, 5);
    // Resumed from another thread through a Remote: the waiting bytes are read although no
    // new data (no new edge) arrives.
    let remote = server.remote();
    std::thread::spawn(move || {
        remote
            .run(|h: &mut Pauser, ctx| {
                let id = h.id.unwrap();
                ctx.conn(id).unwrap().resume_reading();
            })
            .unwrap();
    })
    .join()
    .unwrap();
    turn_until_at(&mut server, t0, "the resumed read", |s| {
        s.handler().seen == 11
    });
    util::stop(&mut server);
}

#[test]
fn handle_close_flushes_what_was_sent_first_and_a_gone_id_is_counted_dropped() {
    let (mut server, t0, mut client) = bind_and_accept(config(), Probe::default());
    let id = server.handler().ids[0];
    let handle = server.handle();
    std::thread::spawn(move || {
        handle.send(id, b"bye\n".to_vec()).unwrap();
        handle.close(id).unwrap();
        // The connection is gone by the time this one is delivered.
        handle.close(id).unwrap();
    })
    .join()
    .unwrap();
    turn_until_at(&mut server, t0, "the remote close", |s| {
        s.metrics().closed_by(CloseReason::Handler) == 1
    });
    // Graceful: the bytes queued before the close arrive, then EOF.
    assert_eq!(read_exactly(&mut client, 4), b"bye\n");
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(server.metrics().remote_dropped, 1);
    util::stop(&mut server);
}

#[test]
fn handle_send_delivers_from_another_thread_and_a_full_queue_is_an_error() {
    let cfg = Config {
        remote_queue: 2,
        ..config()
    };
    let (mut server, t0, mut client) = bind_and_accept(cfg, Probe::default());
    let id = server.handler().ids[0];
    let handle = server.handle();
    let results = std::thread::spawn(move || {
        (0..3)
            .map(|i| handle.send(id, format!("m{i}\n").into_bytes()))
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    // Bounded: the loop did not turn, so the third did not fit and came back.
    assert_eq!(results[0], Ok(()));
    assert_eq!(results[1], Ok(()));
    assert_eq!(results[2], Err(RemoteError::Full(b"m2\n".to_vec())));
    turn_until_at(&mut server, t0, "delivery", |s| s.metrics().bytes_out == 6);
    assert_eq!(read_exactly(&mut client, 6), b"m0\nm1\n");
    util::stop(&mut server);
}

#[test]
fn periodic_work_runs_on_its_interval() {
    let cfg = Config {
        periodic: Duration::from_millis(100),
        ..config()
    };
    let (mut server, _) = util::bind(cfg, Probe::default());
    let t0 = server.now();
    step(&mut server, t0 + Duration::from_millis(90));
    assert_eq!(server.handler().periodic, 0);
    step(&mut server, t0 + Duration::from_millis(100));
    assert_eq!(server.handler().periodic, 1);
    step(&mut server, t0 + Duration::from_millis(150));
    assert_eq!(server.handler().periodic, 1);
    step(&mut server, t0 + Duration::from_millis(200));
    assert_eq!(server.handler().periodic, 2);
    util::stop(&mut server);
}

/// Turns the idle timeout off for its connections.
struct NeverIdle;

impl Handler for NeverIdle {
    type Conn = ();
    fn on_open(&mut self, ctx: &mut Context<'_>) {
        let id = ctx.id();
        ctx.conn(id).unwrap().set_idle_timeout(false);
    }
    fn on_data(&mut self, _: &mut (), _: &mut Context<'_>, _: &[u8]) {}
}

#[test]
fn a_connection_without_an_idle_timeout_outlives_it() {
    let cfg = Config {
        idle_timeout: Duration::from_millis(100),
        ..config()
    };
    let (mut server, t0, _client) = bind_and_accept(cfg, NeverIdle);
    step(&mut server, t0 + Duration::from_secs(10));
    assert_eq!(server.metrics().active, 1, "{}", server.metrics());
    assert_eq!(server.metrics().closed_total(), 0);
    util::stop(&mut server);
}

/// Echoes, and writes down what `Context` says of each connection: while it is open (at its
/// first data) and in `on_close` (what an access log needs, asked only at the close).
#[derive(Default)]
struct Ledger {
    /// `(bytes_in, bytes_out, age)` at each connection's first data.
    at_data: Vec<(u64, u64, Duration)>,
    /// `(bytes_in, bytes_out, age, reason)` in each `on_close`.
    at_close: Vec<(u64, u64, Duration, CloseReason)>,
}

impl Handler for Ledger {
    type Conn = ();
    fn on_open(&mut self, _: &mut Context<'_>) {}
    fn on_data(&mut self, _: &mut (), ctx: &mut Context<'_>, data: &[u8]) {
        self.at_data
            .push((ctx.bytes_in(), ctx.bytes_out(), ctx.age()));
        ctx.write(data);
    }
    fn on_close(&mut self, _: (), ctx: &mut Context<'_>, reason: CloseReason) {
        self.at_close
            .push((ctx.bytes_in(), ctx.bytes_out(), ctx.age(), reason));
    }
}

#[test]
fn context_tells_a_connections_bytes_and_age_and_on_close_its_whole_life() {
    let (mut server, t0, mut client) = bind_and_accept(config(), Ledger::default());
    let t1 = t0 + Duration::from_millis(250);
    util::ping_at(&mut server, t1, &mut client, b"hello");
    client.write_all(b", world").unwrap();
    let t2 = t0 + Duration::from_millis(1000);
    turn_until_at(&mut server, t2, "the second echo", |s| {
        s.metrics().bytes_out == 12
    });
    read_exactly(&mut client, 7);
    client.shutdown(Shutdown::Write).unwrap();
    let t3 = t0 + Duration::from_millis(1500);
    turn_until_at(&mut server, t3, "the close", |s| {
        s.metrics().closed_total() == 1
    });
    let h = server.handler();
    // To the tick: the accept's stamp is rounded down, the turn's time too.
    let about = |age: Duration, want: u64| {
        let ms = age.as_millis() as u64;
        assert!(ms + 10 >= want && ms <= want + 10, "{age:?}, not {want} ms");
    };
    assert_eq!(h.at_data.len(), 2);
    assert_eq!((h.at_data[0].0, h.at_data[0].1), (5, 0)); // this data counted, not echoed yet
    about(h.at_data[0].2, 250);
    assert_eq!((h.at_data[1].0, h.at_data[1].1), (12, 5));
    about(h.at_data[1].2, 1000);
    let &[(bytes_in, bytes_out, age, reason)] = &h.at_close[..] else {
        panic!("{:?}", h.at_close);
    };
    assert_eq!(
        (bytes_in, bytes_out, reason),
        (12, 12, CloseReason::PeerClosed)
    );
    about(age, 1500);
    util::stop(&mut server);
}

/// On `now` from any connection, writes `bye` to every connection and closes each at once.
#[derive(Default)]
struct Closer {
    ids: Vec<ConnId>,
}

impl Handler for Closer {
    type Conn = ();
    fn on_open(&mut self, ctx: &mut Context<'_>) {
        self.ids.push(ctx.id());
    }
    fn on_data(&mut self, _: &mut (), ctx: &mut Context<'_>, data: &[u8]) {
        if data == b"now" {
            for &id in &self.ids {
                if let Some(mut c) = ctx.conn(id) {
                    c.write(b"bye\n");
                    c.close_now();
                }
            }
        }
    }
}

#[test]
fn close_now_writes_what_is_queued_and_closes_this_and_another_connection_without_lingering() {
    let (mut server, t0, mut a) = bind_and_accept(config(), Closer::default());
    let mut b = accept_one(&mut server, t0);
    a.write_all(b"now").unwrap();
    turn_until_at(&mut server, t0, "both closes", |s| {
        s.metrics().closed_total() == 2
    });
    // Closed in the same turn, and neither lingers (a graceful close would, 5 s by default,
    // until each peer's EOF).
    let m = server.metrics();
    assert_eq!(m.closed_by(CloseReason::Handler), 2, "{m}");
    assert_eq!(m.lingering, 0, "{m}");
    assert_eq!(m.active, 0, "{m}");
    for c in [&mut a, &mut b] {
        assert_eq!(read_exactly(c, 4), b"bye\n");
        util::expect_closed(c);
    }
    util::stop(&mut server);
}
