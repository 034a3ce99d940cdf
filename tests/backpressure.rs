//! Backpressure: a client that sends without reading is pushed back through TCP (pending output
//! stays at or under the cap, other clients still echo), a stalled writer is closed at the tick
//! after the write timeout, and a handler that writes more than the cap closes with `Overflow`.
//!
//! The tests own their server and turn it on the test thread, checking the metrics after every
//! turn; the misbehaving client is a nonblocking socket written between turns. The write-stall
//! test steps a virtual time with `turn_at` instead of waiting for the timeout.

mod util;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sockman::{CloseReason, Config, Context, Echo, Handler, Server};
use util::{
    bind, close_gracefully, connect, connect_small_rcvbuf, local_config, pattern, step_to, stop,
    stop_at, turn_until, turn_until_at,
};

const CAP: usize = 64 * 1024;
/// What the stalled client tries to send, and for how long at most.
const FLOOD: u64 = 64 << 20;
const FLOOD_FOR: Duration = Duration::from_secs(2);

/// A client that writes without ever reading, nonblocking.
struct Flooder {
    stream: TcpStream,
    chunk: Vec<u8>,
    sent: u64,
}

impl Flooder {
    fn connect(addr: std::net::SocketAddr) -> Flooder {
        let stream = connect_small_rcvbuf(addr);
        stream.set_nonblocking(true).unwrap();
        Flooder {
            stream,
            chunk: pattern(64 * 1024, 3),
            sent: 0,
        }
    }

    /// One nonblocking write, if there is anything left to send. Returns whether the connection
    /// is still writable (false once the server has closed it).
    fn push(&mut self) -> bool {
        if self.sent >= FLOOD {
            return true;
        }
        match self.stream.write(&self.chunk) {
            Ok(n) => self.sent += n as u64,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {
                return false
            }
            Err(e) => panic!("flooder write after {} bytes: {e}", self.sent),
        }
        true
    }
}

/// Checks the pending-output gauge against the cap, and keeps the highest seen in `max_seen`.
#[track_caller]
fn check_pending<H: Handler>(server: &Server<H>, max_seen: &mut u64) {
    let pending = server.metrics().pending_bytes;
    assert!(
        pending <= CAP as u64,
        "pending output {pending} over the cap {CAP}: {}",
        server.metrics()
    );
    *max_seen = (*max_seen).max(pending);
}

/// Turns once and checks the pending-output gauge against the cap.
#[track_caller]
fn turn_checked<H: Handler>(server: &mut Server<H>, max_seen: &mut u64) {
    server.turn(Some(Duration::from_millis(10))).unwrap();
    check_pending(server, max_seen);
}

#[test]
fn a_client_that_never_reads_is_pushed_back_and_others_still_echo() {
    let config = Config {
        max_pending: CAP,
        ..local_config()
    };
    let (mut server, addr) = bind(config, Echo);
    let mut flooder = Flooder::connect(addr);
    let mut max_pending = 0;
    let (done_tx, done_rx) = mpsc::channel();
    let mut echoer = None;
    let mut echoed = false;
    let started = Instant::now();
    for _ in 0..1_000_000 {
        if (flooder.sent >= FLOOD || started.elapsed() >= FLOOD_FOR) && echoed {
            break;
        }
        assert!(
            started.elapsed() < util::WAIT,
            "the other client did not echo: {}",
            server.metrics()
        );
        assert!(flooder.push(), "the server closed the flooder");
        turn_checked(&mut server, &mut max_pending);
        // Once the flooder is stalled (output pending), another client must still be served.
        if echoer.is_none() && server.metrics().pending_bytes > 0 {
            let tx = done_tx.clone();
            echoer = Some(std::thread::spawn(move || {
                let mut stream = connect(addr);
                let msg = b"still served while another client stalls";
                stream.write_all(msg).unwrap();
                let mut back = [0; 40];
                stream.read_exact(&mut back).unwrap();
                assert_eq!(&back, msg);
                close_gracefully(stream);
                tx.send(()).unwrap();
            }));
        }
        echoed |= done_rx.try_recv().is_ok();
    }
    eprintln!(
        "flooder sent {} bytes in {:?}; highest pending output {max_pending}",
        flooder.sent,
        started.elapsed()
    );
    assert!(echoed, "the loop ended before the other client echoed");
    echoer.unwrap().join().expect("the echo client failed");
    assert!(
        max_pending > 0,
        "backpressure never engaged: {}",
        server.metrics()
    );
    assert!(
        flooder.sent < FLOOD,
        "all {FLOOD} bytes went through: nothing pushed back"
    );
    let before_stop = server.metrics().clone();
    assert_eq!(
        before_stop.active, 1,
        "the flooder is still connected: {before_stop}"
    );
    assert_eq!(
        before_stop.closed_by(CloseReason::PeerClosed),
        1,
        "{before_stop}"
    );
    let m = stop(&mut server);
    assert_eq!(m.accepted, 2, "{m}");
    // Echo writes back at most what one read took, and a read never exceeds the cap.
    assert_eq!(m.closed_by(CloseReason::Overflow), 0, "{m}");
    assert_eq!(m.closed_by(CloseReason::Shutdown), 1, "the flooder: {m}");
    assert_eq!(
        m.closed_by(CloseReason::PeerClosed),
        1,
        "the echo client: {m}"
    );
    assert_eq!(m.closed_total(), 2, "{m}");
    drop(flooder);
}

/// Steps the server to the virtual time `at` (no wait for events) and checks the pending-output
/// gauge against the cap.
#[track_caller]
fn step_checked<H: Handler>(server: &mut Server<H>, at: Instant, max_seen: &mut u64) {
    step_to(server, at);
    check_pending(server, max_seen);
}

/// The write-stall deadline, at virtual times: with `tick = 10ms` and `write_timeout = 500ms`
/// (50 ticks), output whose last progress was in tick `T` stalls at tick `T + 50 + 1`. All the
/// progress happens at `t0` (tick 0), so the connection is open at `t0 + 500ms` and in the last
/// nanosecond of tick 50, and closed with `WriteStall` at `t0 + 510ms`.
#[test]
fn a_stalled_writer_is_closed_at_the_tick_after_the_write_timeout() {
    const WRITE_TIMEOUT: Duration = Duration::from_millis(500);
    const TICK: Duration = Duration::from_millis(10);
    let config = Config {
        max_pending: CAP,
        write_timeout: WRITE_TIMEOUT,
        tick: TICK,
        ..local_config()
    };
    let (mut server, addr) = bind(config, Echo);
    let t0 = server.now();
    let mut flooder = Flooder::connect(addr);
    let mut max_pending = 0;
    // Flood at t0 until the server has output it cannot send.
    turn_until_at(&mut server, t0, "pending output", |s| {
        assert!(flooder.push(), "the server closed the flooder");
        s.metrics().pending_bytes > 0
    });
    // Still at t0, until the socket has settled: no write progress (bytes out) for 20 turns and
    // 50 ms of real time in a row (the client's receive window is closed, so nothing frees the
    // server's send buffer any more). Whatever progress there was is stamped t0 too.
    let mut quiet = 0;
    let mut quiet_since = Instant::now();
    let mut out = server.metrics().bytes_out;
    turn_until_at(&mut server, t0, "no more write progress", |s| {
        flooder.push();
        let now_out = s.metrics().bytes_out;
        if now_out != out {
            (quiet, quiet_since, out) = (0, Instant::now(), now_out);
        }
        quiet += 1;
        quiet > 20 && quiet_since.elapsed() >= Duration::from_millis(50)
    });
    let pending = server.metrics().pending_bytes;
    assert!(pending > 0 && pending <= CAP as u64, "{}", server.metrics());
    for at in [
        t0 + TICK,
        t0 + WRITE_TIMEOUT,
        t0 + WRITE_TIMEOUT + TICK - Duration::from_nanos(1),
    ] {
        step_checked(&mut server, at, &mut max_pending);
        let m = server.metrics();
        assert_eq!(m.closed_total(), 0, "closed early, at {:?}: {m}", at - t0);
        assert_eq!(m.bytes_out, out, "write progress after t0: {m}");
    }
    step_checked(&mut server, t0 + WRITE_TIMEOUT + TICK, &mut max_pending);
    let m = server.metrics();
    assert_eq!(m.closed_by(CloseReason::WriteStall), 1, "{m}");
    assert_eq!(m.closed_total(), 1, "{m}");
    assert_eq!(m.pending_bytes, 0, "{m}");
    let m = stop_at(&mut server, t0 + WRITE_TIMEOUT + TICK);
    assert_eq!(m.closed_by(CloseReason::WriteStall), 1, "{m}");
    assert_eq!(m.closed_total(), 1, "{m}");
    assert_eq!(m.accepted, 1, "{m}");
    drop(flooder);
}

/// Writes every chunk back three times: more than it read, so it can outgrow the cap. It keeps
/// reading while its output waits (as a relay would): with the default backpressure a
/// connection whose socket refuses output is not read, so its output never grows past what
/// one callback writes, and whether that passes the cap depends on where the kernel's buffer
/// filled (with `TCP_NOTSENT_LOWAT` the kernel refuses whole writes at its limit, so the
/// connection could sit at exactly the cap until the write timeout).
#[derive(Debug)]
struct Triple;

impl Handler for Triple {
    type Conn = ();
    const PAUSE_READING_WHILE_PENDING: bool = false;
    fn on_open(&mut self, _ctx: &mut Context<'_>) {}
    fn on_data(&mut self, _conn: &mut (), ctx: &mut Context<'_>, data: &[u8]) {
        for _ in 0..3 {
            if !ctx.write(data) {
                return;
            }
        }
    }
}

#[test]
fn a_handler_writing_past_the_cap_closes_with_overflow() {
    const SMALL_CAP: usize = 4096;
    let config = Config {
        max_pending: SMALL_CAP,
        ..local_config()
    };
    let (mut server, addr) = bind(config, Triple);
    let mut flooder = Flooder::connect(addr);
    let deadline = Instant::now() + util::WAIT;
    while server.metrics().closed_total() == 0 {
        assert!(
            Instant::now() < deadline,
            "never closed: {}",
            server.metrics()
        );
        if !flooder.push() {
            break;
        }
        server.turn(Some(Duration::from_millis(10))).unwrap();
        let pending = server.metrics().pending_bytes;
        assert!(
            pending <= SMALL_CAP as u64,
            "pending {pending} over the cap"
        );
    }
    turn_until(&mut server, "the overflowing connection to close", |s| {
        s.metrics().closed_total() == 1
    });
    // The peer sees the connection end: its buffered echo, then EOF or a reset; never a hang.
    let bytes_out = server.metrics().bytes_out;
    let mut stream = flooder.stream;
    stream.set_nonblocking(false).unwrap();
    let mut got = 0u64;
    let mut buf = vec![0; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n as u64,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading what the server sent: {e} after {got} bytes"),
        }
        assert!(
            got <= bytes_out,
            "read {got} bytes, the server wrote {bytes_out}"
        );
    }
    let m = stop(&mut server);
    assert_eq!(m.closed_by(CloseReason::Overflow), 1, "{m}");
    assert_eq!(m.closed_total(), 1, "{m}");
    assert_eq!(m.accepted, 1, "{m}");
}
