//! Review findings: each test demonstrates one bug found while reviewing the change since
//! `fc67ed6` (the reshaped loop, lingering, dialing, PROXY headers, workers, the admin side).
//! Every test here FAILS on the reviewed code; its doc comment names the code at fault.

mod util;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sockman::{Config, Context, Echo, Handler, ProxyProtocol, Server};
#[cfg(feature = "admin")]
use util::http;
use util::{bind, connect, local_config, silent_listener, turn_until, turn_until_at};

/// Reads until EOF or until `timeout` passes while the server is turned by `turn`; returns
/// what was read and whether EOF was seen.
fn read_until_eof<H: Handler>(
    server: &mut Server<H>,
    stream: &mut TcpStream,
    timeout: Duration,
) -> (Vec<u8>, bool) {
    stream.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return (got, true),
            Err(e) => panic!("read: {e}"),
        }
        if Instant::now() >= deadline {
            return (got, false);
        }
        server.turn(Some(Duration::from_millis(10))).unwrap();
    }
}

/// Binds `handler` with `config` and connects a client that sends `data` at once; returns the
/// server (not turned yet) and the client.
#[track_caller]
fn bind_and_send<H: Handler>(config: Config, handler: H, data: &[u8]) -> (Server<H>, TcpStream) {
    let (server, addr) = bind(config, handler);
    let mut client = connect(addr);
    client.write_all(data).unwrap();
    (server, client)
}

/// A listener that reads a PROXY protocol v1 header first.
fn v1_config() -> Config {
    Config {
        proxy_protocol: ProxyProtocol::V1,
        ..local_config()
    }
}

/// The PROXY v1 header of the tests of section 2: a client 10.0.0.1:1234 of 10.0.0.2:80.
const HEADER: &[u8] = b"PROXY TCP4 10.0.0.1 10.0.0.2 1234 80\r\n";

// ---------------------------------------------------------------------------------------------
// 1. `deliver`'s "plain" shortcut (src/server/mod.rs, `Server::deliver`) skips settling when the
//    callback left the current connection without pending output, not DIRTY and the dirty list
//    empty. But `ConnMut::shutdown_write` and `ConnMut::pause_reading` on the *current*
//    connection only set a flag (`ConnMut::touch` does not mark the current connection dirty),
//    so neither takes effect.
// ---------------------------------------------------------------------------------------------

/// Replies to the first bytes, then half-closes its own write side from `on_data`.
struct ReplyThenShutWrite;

impl Handler for ReplyThenShutWrite {
    type Conn = ();
    fn on_open(&mut self, _: &mut Context<'_>) {}
    fn on_data(&mut self, _: &mut (), ctx: &mut Context<'_>, _data: &[u8]) {
        ctx.write(b"bye");
        let me = ctx.id();
        ctx.conn(me)
            .expect("the current connection")
            .shutdown_write();
    }
}

/// `shutdown_write()` on the connection `on_data` is about, with the reply written whole: the
/// FIN never goes out (the "plain" path does not settle, and SHUT_WANTED is only acted on in
/// `settle`). The client waits for an EOF that does not come until some later callback settles
/// the connection (here: none, for the whole idle timeout).
#[test]
fn shutdown_write_on_the_current_connection_in_on_data_sends_a_fin() {
    let (mut server, mut client) = bind_and_send(local_config(), ReplyThenShutWrite, b"hi");
    let (got, eof) = read_until_eof(&mut server, &mut client, Duration::from_secs(2));
    assert_eq!(got, b"bye");
    assert!(
        eof,
        "shutdown_write() in on_data: the reply came but no FIN within 2 s: {}",
        server.metrics()
    );
}

/// Pauses reading from its first `on_data`, and counts the calls.
struct PauseOnFirstData {
    calls: Arc<AtomicUsize>,
}

impl Handler for PauseOnFirstData {
    type Conn = ();
    fn on_open(&mut self, _: &mut Context<'_>) {}
    fn on_data(&mut self, _: &mut (), ctx: &mut Context<'_>, _data: &[u8]) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let me = ctx.id();
        ctx.conn(me)
            .expect("the current connection")
            .pause_reading();
    }
}

/// `pause_reading()` on the current connection inside `on_data` does not stop the read loop
/// (`Server::read` goes on when `deliver` takes the plain path), so `on_data` keeps being
/// called although the docs say it is "not called while reading is paused".
#[test]
fn pause_reading_in_on_data_stops_further_on_data_calls() {
    let calls = Arc::new(AtomicUsize::new(0));
    let config = Config {
        read_buffer: 16,
        ..local_config()
    };
    let handler = PauseOnFirstData {
        calls: Arc::clone(&calls),
    };
    let (mut server, _client) = bind_and_send(config, handler, &[7u8; 1000]);
    turn_until(&mut server, "the first bytes", |s| s.metrics().bytes_in > 0);
    for _ in 0..20 {
        server.turn(Some(Duration::from_millis(5))).unwrap();
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "on_data ran again after the handler paused reading (read {} bytes)",
        server.metrics().bytes_in
    );
}

// ---------------------------------------------------------------------------------------------
// 2. PROXY protocol header phase (src/server/accept.rs, `read_header`).
// ---------------------------------------------------------------------------------------------

/// `read_header` reads into `self.buf[..room]` with `room` up to `MAX_HEADER + 1` (4097), but
/// `Config::validate` accepts any `read_buffer` >= 1: with a smaller read buffer the first
/// byte from any client on a PROXY protocol listener panics the loop (slice out of range).
#[test]
fn a_proxy_protocol_listener_with_a_small_read_buffer_does_not_panic() {
    let config = Config {
        read_buffer: 1024,
        ..v1_config()
    };
    config.validate().expect("a valid configuration");
    let (mut server, _client) = bind_and_send(config, Echo, &[HEADER, b"hello"].concat());
    let start = server.now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        turn_until_at(&mut server, start, "the echo", |s| {
            s.metrics().bytes_out >= 5
        });
    }));
    assert!(
        result.is_ok(),
        "the loop panicked on a PROXY header with read_buffer = 1024"
    );
}

/// Records the length of every `on_data` call.
struct Lengths {
    max: Arc<AtomicUsize>,
}

impl Handler for Lengths {
    type Conn = ();
    fn on_open(&mut self, _: &mut Context<'_>) {}
    fn on_data(&mut self, _: &mut (), _: &mut Context<'_>, data: &[u8]) {
        self.max.fetch_max(data.len(), Ordering::SeqCst);
    }
}

/// `Handler::on_data` promises `data` is "never longer than `Config::max_pending`" (so echoing
/// it cannot overflow). The bytes that follow a PROXY header are delivered in one piece by
/// `after_header` (`deliver(key, rest)`, up to 4 KiB), ignoring that bound.
#[test]
fn data_after_a_proxy_header_respects_the_max_pending_bound() {
    let max = Arc::new(AtomicUsize::new(0));
    let config = Config {
        max_pending: 64,
        write_high_watermark: Some(32),
        ..v1_config()
    };
    let handler = Lengths {
        max: Arc::clone(&max),
    };
    let (mut server, _client) = bind_and_send(config, handler, &[HEADER, &[b'x'; 1000]].concat());
    let start = server.now();
    turn_until_at(&mut server, start, "the data", |s| {
        s.metrics().bytes_in >= 1000
    });
    assert!(
        max.load(Ordering::SeqCst) <= 64,
        "on_data got {} bytes at once, above max_pending = 64",
        max.load(Ordering::SeqCst)
    );
}

/// Pauses every connection in `on_open` (as `sockman proxy` does for its clients until the
/// upstream is connected) and counts `on_data` calls.
struct PauseOnOpen {
    calls: Arc<AtomicUsize>,
}

impl Handler for PauseOnOpen {
    type Conn = ();
    fn on_open(&mut self, ctx: &mut Context<'_>) {
        let me = ctx.id();
        ctx.conn(me).expect("the new connection").pause_reading();
    }
    fn on_data(&mut self, _: &mut (), _: &mut Context<'_>, _data: &[u8]) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

/// `after_header` delivers the bytes that followed the PROXY header right after `on_open`
/// without checking `can_read`: a connection that `on_open` paused gets `on_data` anyway.
#[test]
fn bytes_after_a_proxy_header_wait_for_a_reading_paused_in_on_open() {
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = PauseOnOpen {
        calls: Arc::clone(&calls),
    };
    let (mut server, _client) = bind_and_send(v1_config(), handler, &[HEADER, b"hello"].concat());
    let start = server.now();
    turn_until_at(&mut server, start, "the open", |s| {
        s.metrics().accepted == 1
    });
    for _ in 0..10 {
        server
            .turn_at(start, Some(Duration::from_millis(5)))
            .unwrap();
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "on_data ran for a connection whose reading on_open paused"
    );
}

/// A "one session at a time" handler: a new connection closes the previous one. A connection
/// that sends `pause` stops being read; the data of the others is recorded.
struct Kick {
    last: Option<sockman::ConnId>,
    got: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Handler for Kick {
    type Conn = ();
    fn on_open(&mut self, ctx: &mut Context<'_>) {
        if let Some(prev) = self.last.replace(ctx.id()) {
            let _ = ctx.close_conn(prev);
        }
    }
    fn on_data(&mut self, _: &mut (), ctx: &mut Context<'_>, data: &[u8]) {
        if data == b"pause" {
            let me = ctx.id();
            ctx.conn(me).unwrap().pause_reading();
        } else {
            self.got.lock().unwrap().extend_from_slice(data);
        }
    }
}

/// `after_header` keeps the bytes after the header in the loop's one read buffer across
/// `on_open`; if `on_open` closes another connection, that one starts lingering at once
/// (`begin_linger` → `linger` → `linger_read(&mut self.buf)`) and its unread input overwrites
/// the buffer. The new connection's first `on_data` then gets the *other* client's bytes.
#[test]
fn bytes_after_a_proxy_header_survive_an_on_open_that_closes_another_connection() {
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (mut server, addr) = bind(
        v1_config(),
        Kick {
            last: None,
            got: Arc::clone(&got),
        },
    );
    let start = server.now();
    // The first session: opened, then paused, then sends bytes that stay unread.
    let mut first = connect(addr);
    first
        .write_all(b"PROXY TCP4 10.0.0.1 10.0.0.2 1111 80\r\n")
        .unwrap();
    turn_until_at(&mut server, start, "the first open", |s| {
        s.metrics().accepted == 1
    });
    first.write_all(b"pause").unwrap();
    turn_until_at(&mut server, start, "the pause", |s| {
        s.metrics().bytes_in == 5
    });
    first.write_all(b"XXXX").unwrap();
    for _ in 0..10 {
        server
            .turn_at(start, Some(Duration::from_millis(5)))
            .unwrap();
    }
    // The second session, header and data in one segment: it closes the first.
    let mut second = connect(addr);
    second
        .write_all(b"PROXY TCP4 10.0.0.3 10.0.0.2 2222 80\r\nhello")
        .unwrap();
    turn_until_at(&mut server, start, "the second session's data", |_| {
        got.lock().unwrap().len() >= 5
    });
    assert_eq!(
        String::from_utf8_lossy(&got.lock().unwrap()),
        "hello",
        "the second session's first bytes were overwritten by the first session's"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. `sockman proxy` behind a PROXY protocol balancer (src/bin/sockman/proxy.rs with the core's
//    `after_header`): the client's first bytes, which arrive with the header, are delivered
//    while the client is paused and the upstream still connecting, so they are queued on the
//    connecting upstream.
// ---------------------------------------------------------------------------------------------

/// Accepts one connection on `listener` and reads from it until `want` bytes or EOF/timeout.
fn accept_and_read(listener: &std::net::TcpListener, want: usize) -> Vec<u8> {
    let mut s = util::accept_within(listener, util::WAIT); // the proxy dials the upstream
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < want {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    got
}

/// `sockman proxy --listen 127.0.0.1:0 --upstream UPSTREAMS --proxy-protocol v1 EXTRA...`, and
/// a client that sends it a balancer's PROXY header with its first bytes, `hello`, in one
/// segment; returns both.
#[cfg(feature = "cli")]
#[track_caller]
fn proxy_behind_a_balancer(upstreams: &str, extra: &[&str]) -> (util::child::Bin, TcpStream) {
    let mut bin = util::child::Bin::spawn(
        &[
            &[
                "proxy",
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                upstreams,
                "--proxy-protocol",
                "v1",
            ],
            extra,
        ]
        .concat(),
    );
    let addr = bin.wait_listening();
    let mut client = connect(addr);
    client
        .write_all(b"PROXY TCP4 10.0.0.1 127.0.0.1 1234 80\r\nhello")
        .unwrap();
    (bin, client)
}

/// With `--proxy-protocol v1 --send-proxy v1`, the upstream must see its PROXY header first.
/// The client bytes that came with the balancer's header were queued on the upstream while it
/// was connecting, and `on_connected` appends the header *after* them: the upstream receives
/// `hello` and then `PROXY TCP4 ...`, which a PROXY-protocol upstream refuses.
#[cfg(feature = "cli")]
#[test]
fn sockman_proxy_behind_a_balancer_sends_its_proxy_header_first() {
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up = upstream.local_addr().unwrap().to_string();
    let _proxy = proxy_behind_a_balancer(&up, &["--send-proxy", "v1"]);
    let got = accept_and_read(&upstream, 5 + 20);
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(
        text.starts_with("PROXY TCP4 10.0.0.1 "),
        "the upstream got {text:?}: the client's bytes came before the PROXY header"
    );
}

/// Without `--send-proxy`: the first upstream refuses, the proxy retries the next one. The
/// bytes that came with the balancer's header were queued on the failed dial and discarded
/// with it: the second upstream never gets them ("no byte is sent to a dial that fails" is
/// the proxy's own promise).
#[cfg(feature = "cli")]
#[test]
fn sockman_proxy_behind_a_balancer_keeps_the_first_bytes_across_a_dial_retry() {
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }; // closed: connects are refused
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ups = format!("{refused},{}", upstream.local_addr().unwrap());
    let _proxy = proxy_behind_a_balancer(&ups, &[]);
    let got = accept_and_read(&upstream, 5);
    assert_eq!(
        String::from_utf8_lossy(&got),
        "hello",
        "the client's first bytes were lost with the refused dial"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Drain: a second `drain` during the lame-duck delay is ignored (src/server/timers.rs,
//    `begin_drain`: `if self.timers.lame_duck.is_some() { return; }`), although "a second call
//    only shortens the deadline".
// ---------------------------------------------------------------------------------------------

#[test]
fn a_shorter_drain_during_the_lame_duck_delay_shortens_the_deadline() {
    let config = Config {
        drain_delay: Duration::from_secs(1),
        drain_idle: Duration::from_secs(100),
        idle_timeout: Duration::from_secs(300),
        ..local_config()
    };
    let (mut server, addr) = bind(config, Echo);
    let t0 = server.now();
    let _client = connect(addr);
    turn_until_at(&mut server, t0, "the accept", |s| s.metrics().active == 1);
    server.drain(Duration::from_secs(60));
    server.drain(Duration::from_millis(200)); // changes its mind: 200 ms
    util::step_to(&mut server, t0 + Duration::from_millis(1100)); // the delay is served
    assert!(server.is_draining());
    util::step_to(&mut server, t0 + Duration::from_millis(1400)); // 300 ms into the drain
    assert!(
        server.is_stopped(),
        "the drain's 200 ms deadline passed and the connection is still open: {}",
        server.metrics()
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Workers (src/workers.rs, src/server/mod.rs `publish`, src/admin/http.rs).
// ---------------------------------------------------------------------------------------------

/// Tells each client which worker it landed on (one byte in `on_open`); `sleep` makes worker 1
/// busy for 500 ms (a slow turn, well under the 5 s "wedged" bound); anything else echoes.
struct WhichWorker {
    i: u8,
}

impl Handler for WhichWorker {
    type Conn = ();
    fn on_open(&mut self, ctx: &mut Context<'_>) {
        ctx.write(&[b'0' + self.i]);
    }
    fn on_data(&mut self, _: &mut (), ctx: &mut Context<'_>, data: &[u8]) {
        if data == b"sleep" {
            std::thread::sleep(Duration::from_millis(500));
        } else {
            ctx.write(data);
        }
    }
}

/// Connects until a client lands on worker `want` (at most 200 tries); returns it.
fn client_on_worker(addr: SocketAddr, want: u8) -> TcpStream {
    for _ in 0..200 {
        let mut c = connect(addr);
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        if b[0] == b'0' + want {
            return c;
        }
    }
    panic!("no connection landed on worker {want}");
}

/// `Server::publish` publishes a worker's metrics at most once per tick, at the end of a turn.
/// Changes made by a later turn within the same tick are published only by the next turn in a
/// later tick; a worker with nothing scheduled waits in its poll indefinitely, so the group's
/// figures (`RunningWorkers::metrics`, other workers' `/metrics` series) stay wrong for good:
/// here a closed connection still shows as active seconds later.
#[test]
fn a_workers_last_changes_in_a_tick_are_published() {
    let config = Config {
        tick: Duration::from_secs(1), // every turn of this test falls in tick 0
        idle_timeout: Duration::ZERO, // nothing in the wheel: the worker sleeps in its poll
        ..local_config()
    };
    let workers = sockman::Workers::bind(config, 1, |_| Echo).unwrap();
    let addr = workers.local_addrs()[0];
    let running = workers.start().unwrap();
    let client = connect(addr);
    let deadline = Instant::now() + Duration::from_secs(3);
    while running.metrics().accepted < 1 {
        assert!(Instant::now() < deadline, "the accept was never published");
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(client); // the worker reads the EOF and closes at once (same tick)
    std::thread::sleep(Duration::from_millis(2500));
    let m = running.metrics();
    running.handle().shutdown();
    assert_eq!(
        (m.active, m.closed_total()),
        (0, 1),
        "2.5 s after the close the published figures still show it open: {m}"
    );
}

/// `/livez` calls a worker "wedged" when it has not been in its poll for 5 s
/// (`Group::wedged`). A worker that finished its drain and exited is never in its poll again,
/// so while worker 0 is still draining a long connection, `/livez` fails (a liveness probe
/// would kill the process mid-drain).
#[cfg(feature = "admin")]
#[test]
fn livez_does_not_fail_for_a_worker_that_finished_its_drain() {
    let config = util::with_admin(Config {
        drain_idle: Duration::from_secs(60),
        ..local_config()
    });
    let workers = sockman::Workers::bind(config, 2, |i| WhichWorker { i: i as u8 }).unwrap();
    let addr = workers.local_addrs()[0];
    let admin = workers.admin_addr().unwrap();
    let running = workers.start().unwrap();
    let _on_worker_0 = client_on_worker(addr, 0); // the others are dropped (closed)
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(http::get(admin, "/livez").status, 200);
    running.handle().drain(Duration::from_secs(30));
    // Worker 1 has nothing left: it ends; worker 0 serves its one connection.
    std::thread::sleep(Duration::from_millis(5500));
    let r = http::get(admin, "/livez");
    running.handle().shutdown();
    assert_eq!(
        r.status, 200,
        "/livez during a drain, worker 1 done: {}",
        r.body
    );
}

/// Two `/connections` requests gathered at the same time: each asks every other worker through
/// the group's one request slot per worker (`Group::request_connections` overwrites the
/// previous query and clears its answer), and the first gathering request takes the one answer
/// (`take_response`). The other request waits out the gather timeout and reports
/// "worker 1 did not answer", though worker 1 answered in half a second.
#[cfg(feature = "admin")]
#[test]
fn concurrent_connections_requests_each_get_every_workers_lines() {
    let config = util::with_admin(local_config());
    let workers = sockman::Workers::bind(config, 2, |i| WhichWorker { i: i as u8 }).unwrap();
    let addr = workers.local_addrs()[0];
    let admin = workers.admin_addr().unwrap();
    let running = workers.start().unwrap();
    let mut on_1 = client_on_worker(addr, 1);
    let _on_0 = client_on_worker(addr, 0);
    std::thread::sleep(Duration::from_millis(100));
    on_1.write_all(b"sleep").unwrap(); // worker 1 is busy for 500 ms
    std::thread::sleep(Duration::from_millis(50));
    let a = std::thread::spawn(move || http::get(admin, "/connections"));
    std::thread::sleep(Duration::from_millis(50));
    let b = std::thread::spawn(move || http::get(admin, "/connections"));
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    running.handle().shutdown();
    for (name, r) in [("first", &a), ("second", &b)] {
        assert!(
            !r.body.contains("did not answer") && r.body.contains(" worker=1"),
            "the {name} request: {}",
            r.body
        );
    }
}

/// Two `Handle::drain` calls before the loop wakes: `Handle::drain` *stores* its timeout in
/// `Shared::drain_ns`, so the second overwrites the first and a later, longer drain replaces an
/// earlier, shorter one (the loop only ever sees the last), though a second drain "only
/// shortens the deadline".
#[test]
fn two_handle_drains_before_the_loop_wakes_keep_the_shorter_deadline() {
    let config = Config {
        drain_idle: Duration::from_secs(100),
        idle_timeout: Duration::from_secs(300),
        ..local_config()
    };
    let (mut server, addr) = bind(config, Echo);
    let t0 = server.now();
    let _client = connect(addr);
    turn_until_at(&mut server, t0, "the accept", |s| s.metrics().active == 1);
    let handle = server.handle();
    handle.drain(Duration::from_millis(200));
    handle.drain(Duration::from_secs(60)); // e.g. a supervisor's default, sent a moment later
    turn_until_at(&mut server, t0, "the drain", |s| s.is_draining());
    util::step_to(&mut server, t0 + Duration::from_millis(300));
    assert!(
        server.is_stopped(),
        "the first drain's 200 ms deadline passed and the connection is still open: {}",
        server.metrics()
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Idle timeout and write progress (src/conn.rs, `Conn::write`): the idle deadline counts
//    from "a read or write progress" (`Config::idle_timeout`, `ConnMut::idle`), and `flush`
//    stamps `last_active`, but a write that the socket takes at once (the common case) does
//    not. A connection the server keeps writing to, whose peer sends nothing, is closed as idle.
// ---------------------------------------------------------------------------------------------

/// Writes a byte every 300 ms (its own timer); never closes.
struct Ticker;

impl Handler for Ticker {
    type Conn = ();
    fn on_open(&mut self, ctx: &mut Context<'_>) {
        ctx.set_timer(Duration::from_millis(300));
    }
    fn on_data(&mut self, _: &mut (), _: &mut Context<'_>, _: &[u8]) {}
    fn on_timer(&mut self, _: &mut (), ctx: &mut Context<'_>) {
        assert!(ctx.write(b"t"));
        ctx.set_timer(Duration::from_millis(300));
    }
}

#[test]
fn a_connection_written_to_every_300ms_is_not_idle_after_1s() {
    let config = Config {
        idle_timeout: Duration::from_secs(1),
        ..local_config()
    };
    let (mut server, addr) = bind(config, Ticker);
    let t0 = server.now();
    let mut client = connect(addr);
    turn_until_at(&mut server, t0, "the accept", |s| s.metrics().active == 1);
    for ms in (100..=1600).step_by(100) {
        util::step_to(&mut server, t0 + Duration::from_millis(ms));
    }
    let m = server.metrics().clone();
    assert_eq!(
        (m.active, m.closed_by(sockman::CloseReason::IdleTimeout)),
        (1, 0),
        "written to every 300 ms (a byte each time, all taken by the socket), yet closed as idle: {m}"
    );
    assert!(m.bytes_out >= 4, "{m}");
    let mut buf = [0u8; 16];
    let _ = client.read(&mut buf);
}

// ---------------------------------------------------------------------------------------------
// 7. A dial with output queued before it connected (src/conn.rs, `Conn::deadline`): the
//    write-stall deadline is offered in `Phase::Connecting` too, counting from the write. With
//    `write_timeout` < `connect_timeout` a slow handshake is closed as a `WriteStall` (abortive,
//    SO_LINGER 0) instead of being given its connect timeout; the handler is told
//    `WriteStall`, not `ConnectTimeout`, and a dial failure goes uncounted as one.
// ---------------------------------------------------------------------------------------------

/// Records close reasons.
#[derive(Default)]
struct Reasons {
    seen: Vec<sockman::CloseReason>,
}

impl Handler for Reasons {
    type Conn = ();
    fn on_open(&mut self, _: &mut Context<'_>) {}
    fn on_data(&mut self, _: &mut (), _: &mut Context<'_>, _: &[u8]) {}
    fn on_close(&mut self, _: (), _: &mut Context<'_>, reason: sockman::CloseReason) {
        self.seen.push(reason);
    }
}

#[test]
fn a_dial_with_queued_output_gets_its_connect_timeout_not_a_write_stall() {
    let (_listener, silent, _fillers) = silent_listener();
    let config = Config {
        listen: Vec::new(),
        write_timeout: Duration::from_millis(100),
        connect_timeout: Duration::from_secs(1),
        ..Config::default()
    };
    let mut server = Server::bind(config, Reasons::default()).unwrap();
    let t0 = server.now();
    let id = server.connect(silent, ()).unwrap();
    // A request written before the handshake completes: kept as pending output.
    server.with_context(|_, ctx| ctx.send(id, b"GET / HTTP/1.1\r\n\r\n").unwrap());
    for _ in 0..5 {
        server.turn_at(t0, Some(Duration::from_millis(10))).unwrap();
    }
    assert_eq!(
        server.metrics().connecting,
        1,
        "the dial should still be connecting"
    );
    util::step_to(&mut server, t0 + Duration::from_millis(500));
    assert_eq!(
        (server.metrics().connecting, server.handler().seen.clone()),
        (1, vec![]),
        "half-way through its 1 s connect timeout the dial was closed: {}",
        server.metrics()
    );
}

// ---------------------------------------------------------------------------------------------
// 8. Evict-idle and an `on_close` that dials (src/server/accept.rs, `admit`/`evict_for`): the
//    evicted connection's `on_close` may dial, which takes the slot the eviction freed; `admit`
//    does not check again and inserts the new connection anyway, so the server holds more than
//    `max_connections`.
// ---------------------------------------------------------------------------------------------

/// Re-dials `to` when one of its connections is evicted (a client library reconnecting).
struct Redial {
    to: SocketAddr,
}

impl Handler for Redial {
    type Conn = ();
    fn on_open(&mut self, _: &mut Context<'_>) {}
    fn on_data(&mut self, _: &mut (), _: &mut Context<'_>, _: &[u8]) {}
    fn on_close(&mut self, _: (), ctx: &mut Context<'_>, reason: sockman::CloseReason) {
        if reason == sockman::CloseReason::Evicted {
            let _ = ctx.connect(self.to, ());
        }
    }
}

#[test]
fn eviction_whose_on_close_dials_does_not_exceed_the_cap() {
    let elsewhere = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = Config {
        max_connections: Some(2),
        on_full: sockman::OnFull::EvictIdle,
        evict_min_idle: Duration::ZERO,
        ..local_config()
    };
    let (mut server, addr) = bind(
        config,
        Redial {
            to: elsewhere.local_addr().unwrap(),
        },
    );
    let t0 = server.now();
    let _a = connect(addr);
    let _b = connect(addr);
    turn_until_at(&mut server, t0, "two connections", |s| {
        s.metrics().active == 2
    });
    let _c = connect(addr); // evicts one; its on_close dials
    turn_until_at(&mut server, t0, "the eviction", |s| {
        s.metrics().closed_by(sockman::CloseReason::Evicted) == 1
    });
    assert!(
        server.metrics().active <= 2,
        "max_connections = 2, holding {}: {}",
        server.metrics().active,
        server.metrics()
    );
}
