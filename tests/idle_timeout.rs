//! Idle timeouts through real sockets: a silent connection is closed within
//! [timeout, timeout + tick + slack] of its last activity; one that keeps talking survives.

mod util;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use sockman::{CloseReason, Config, Echo};
use util::{connect, local_config, start};

const IDLE: Duration = Duration::from_millis(300);
const TICK: Duration = Duration::from_millis(10);
/// Scheduling noise allowed on a shared 2-core CI machine, on the upper bound only.
const SLACK: Duration = Duration::from_millis(250);

/// Sends one byte and reads its echo: activity the server sees. Returns the instants just
/// before the write and just after the echo came back; the server's last activity lies between.
#[track_caller]
fn ping(stream: &mut TcpStream, byte: u8) -> (Instant, Instant) {
    let before = Instant::now();
    stream.write_all(&[byte]).unwrap();
    let mut back = [0];
    match stream.read(&mut back) {
        Ok(1) => assert_eq!(back[0], byte),
        Ok(n) => panic!("ping {byte}: got {n} bytes (closed while active?)"),
        Err(e) => panic!("ping {byte}: {e}"),
    }
    (before, Instant::now())
}

/// Blocks until the server closes the idle `stream` and checks when, against the window in which
/// its last activity happened.
#[track_caller]
fn expect_idle_close(stream: &mut TcpStream, (before, after): (Instant, Instant)) {
    let mut buf = [0; 16];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Ok(n) => panic!("expected the idle close, got {n} bytes"),
        Err(e) => panic!("expected the idle close, got {e} (did the timeout never fire?)"),
    }
    let closed = Instant::now();
    // Exact lower bound: never before the full timeout since the last activity.
    let since_before = closed - before;
    assert!(
        since_before >= IDLE,
        "closed {since_before:?} after the last activity, before the {IDLE:?} timeout"
    );
    // Loose upper bound: one tick late at most, plus scheduling slack.
    let since_after = closed - after;
    assert!(
        since_after <= IDLE + TICK + SLACK,
        "closed {since_after:?} after the last activity, later than {IDLE:?} + {TICK:?} + {SLACK:?}"
    );
}

#[test]
fn idle_connection_closes_on_time_while_an_active_one_survives() {
    let config = Config {
        idle_timeout: IDLE,
        tick: TICK,
        ..local_config()
    };
    let server = start(config, Echo);
    let addr = server.addr;
    // Silent after one ping, on its own thread so both run at once.
    let silent = std::thread::spawn(move || {
        let mut stream = connect(addr);
        let last = ping(&mut stream, b's');
        expect_idle_close(&mut stream, last);
    });
    // Active: one byte every IDLE/3 for about 1 s (a pacing sleep, not synchronisation), more
    // than three timeouts in all; every ping must be answered.
    let mut active = connect(addr);
    let started = Instant::now();
    let mut last = ping(&mut active, 0);
    for i in 1..=10u8 {
        std::thread::sleep(IDLE / 3);
        last = ping(&mut active, i);
    }
    assert!(
        started.elapsed() >= IDLE * 3,
        "the active connection ran only {:?}",
        started.elapsed()
    );
    // Now it falls silent and is closed like any idle connection.
    expect_idle_close(&mut active, last);
    silent
        .join()
        .expect("the silent connection's checks failed");
    let m = server.stop();
    assert_eq!(m.accepted, 2, "{m}");
    assert_eq!(m.closed_by(CloseReason::IdleTimeout), 2, "{m}");
    assert_eq!(m.closed_total(), 2, "{m}");
    assert_eq!(m.bytes_in, 12, "{m}");
    assert_eq!(m.bytes_out, 12, "{m}");
}

#[test]
fn connection_that_never_sends_closes_after_the_timeout_from_accept() {
    let config = Config {
        idle_timeout: IDLE,
        tick: TICK,
        ..local_config()
    };
    let server = start(config, Echo);
    // No ping: the accept is the last activity. It happens after `before` (the connect starts
    // it) and, at the latest, when the server's next turn runs after the handshake.
    let before = Instant::now();
    let mut stream = connect(server.addr);
    let after = Instant::now();
    expect_idle_close(&mut stream, (before, after));
    let m = server.stop();
    assert_eq!(m.accepted, 1, "{m}");
    assert_eq!(m.closed_by(CloseReason::IdleTimeout), 1, "{m}");
    assert_eq!(m.closed_total(), 1, "{m}");
}
