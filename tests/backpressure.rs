//! Backpressure: a client that sends without reading is pushed back through TCP (pending output
//! stays at or under the cap, other clients still echo), a stalled writer is closed after the
//! write timeout, and a handler that writes more than the cap closes with `Overflow`.
//!
//! The tests own their server and turn it on the test thread, checking the metrics after every
//! turn; the misbehaving client is a nonblocking socket written between turns.

mod util;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sockman::{CloseReason, Config, Context, Echo, Handler, Server};
use util::{
    bind, close_gracefully, connect, connect_small_rcvbuf, local_config, pattern, stop, turn_until,
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

/// Turns once and checks the pending-output gauge against the cap.
#[track_caller]
fn turn_checked<H: Handler>(server: &mut Server<H>, max_seen: &mut u64) {
    server.turn(Some(Duration::from_millis(10))).unwrap();
    let pending = server.metrics().pending_bytes;
    assert!(
        pending <= CAP as u64,
        "pending output {pending} over the cap {CAP}: {}",
        server.metrics()
    );
    *max_seen = (*max_seen).max(pending);
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

#[test]
fn a_stalled_writer_is_closed_after_the_write_timeout() {
    const WRITE_TIMEOUT: Duration = Duration::from_millis(500);
    let config = Config {
        max_pending: CAP,
        write_timeout: WRITE_TIMEOUT,
        ..local_config()
    };
    let (mut server, addr) = bind(config, Echo);
    let mut flooder = Flooder::connect(addr);
    let mut max_pending = 0;
    // Flood until the server has output it cannot send; `stalled_from` is taken before the turn
    // that first showed pending output, so the stall began after it.
    let started = Instant::now();
    let stalled_from = loop {
        assert!(
            started.elapsed() < util::WAIT,
            "no pending output: {}",
            server.metrics()
        );
        flooder.push();
        let before = Instant::now();
        turn_checked(&mut server, &mut max_pending);
        if server.metrics().pending_bytes > 0 {
            break before;
        }
    };
    // Keep the flooder's data coming (it cannot go anywhere) and turn until the close.
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
        turn_checked(&mut server, &mut max_pending);
    }
    turn_until(&mut server, "the stalled connection to close", |s| {
        s.metrics().closed_total() == 1
    });
    let stalled_for = stalled_from.elapsed();
    assert!(
        stalled_for >= WRITE_TIMEOUT,
        "closed {stalled_for:?} after the stall began, before the {WRITE_TIMEOUT:?} write timeout"
    );
    assert!(
        stalled_for <= WRITE_TIMEOUT + Duration::from_secs(1),
        "closed only {stalled_for:?} after the stall began"
    );
    let m = stop(&mut server);
    assert_eq!(m.closed_by(CloseReason::WriteStall), 1, "{m}");
    assert_eq!(m.closed_total(), 1, "{m}");
    assert_eq!(m.accepted, 1, "{m}");
    drop(flooder);
}

/// Writes every chunk back three times: more than it read, so it can outgrow the cap.
#[derive(Debug)]
struct Triple;

impl Handler for Triple {
    type Conn = ();
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
