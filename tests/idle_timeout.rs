//! Idle timeouts through real sockets, at virtual times: the test owns the server and turns it
//! with `turn_at`, so it asserts the exact tick at which a silent connection closes instead of
//! sleeping and measuring.
//!
//! With `tick = 10ms` and `idle_timeout = 300ms` (30 ticks), a connection last active in tick
//! `T` has its deadline at tick `T + 30 + 1`: it is open at a turn in tick `T + 30` and closed
//! at the first turn in tick `T + 31`. Activity stamped at the start of a tick (at `t`) is
//! therefore still open at `t + 300ms` and closed at `t + 310ms`; activity in the middle of a
//! tick (at `t + 5ms`) closes at `t + 310ms` too, i.e. 305 ms after it: never early, at most one
//! tick late.

mod util;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use sockman::{CloseReason, Config, Echo, Server};
use util::{
    assert_open, bind, connect, expect_closed, local_config, read_exactly, step_closing, stop_at,
    turn_until_at,
};

const IDLE: Duration = Duration::from_millis(300);
const TICK: Duration = Duration::from_millis(10);

fn config() -> Config {
    Config {
        idle_timeout: IDLE,
        tick: TICK,
        ..local_config()
    }
}

/// Sends one byte and turns the server at the virtual time `at` until it has echoed it, then
/// reads the echo: activity the server stamps with `at`.
#[track_caller]
fn ping(server: &mut Server<Echo>, at: Instant, stream: &mut TcpStream, byte: u8) {
    let out = server.metrics().bytes_out;
    stream.write_all(&[byte]).unwrap();
    turn_until_at(server, at, "the echo of a ping", |s| {
        s.metrics().bytes_out == out + 1
    });
    assert_eq!(read_exactly(stream, 1), [byte], "ping {byte}");
}

/// Steps the server to `at` and asserts that exactly `closed` connections have been closed for
/// idleness so far, and nothing else.
#[track_caller]
fn step_expecting(server: &mut Server<Echo>, at: Instant, closed: u64) {
    step_closing(server, at, CloseReason::IdleTimeout, closed);
}

#[test]
fn idle_connection_closes_on_its_tick_while_an_active_one_survives() {
    let (mut server, addr) = bind(config(), Echo);
    let t0 = server.now();
    let mut silent = connect(addr);
    let mut active = connect(addr);
    turn_until_at(&mut server, t0, "both accepts", |s| {
        s.metrics().accepted == 2
    });
    // Both last active at t0 (tick 0): the silent one's deadline is tick 31.
    ping(&mut server, t0, &mut silent, b's');
    ping(&mut server, t0, &mut active, 0);

    // The active one pings every IDLE/3 of virtual time for 10 pings (more than three timeouts
    // in all); every ping is answered. The silent one closes at t0 + 310ms, between two pings.
    let mut last = t0;
    for i in 1..=10u8 {
        let at = t0 + IDLE / 3 * u32::from(i);
        if at >= t0 + IDLE + TICK && last < t0 + IDLE + TICK {
            // Crossing the silent connection's deadline: both sides of it, exactly.
            step_expecting(&mut server, t0 + IDLE, 0);
            assert_open(&mut silent);
            step_expecting(&mut server, t0 + IDLE + TICK - Duration::from_nanos(1), 0);
            step_expecting(&mut server, t0 + IDLE + TICK, 1);
            expect_closed(&mut silent);
        }
        ping(&mut server, at, &mut active, i);
        last = at;
    }
    assert_eq!(last, t0 + Duration::from_millis(1000));
    assert_eq!(server.metrics().active, 1, "{}", server.metrics());

    // Now the active one falls silent and is closed like any idle connection: still open at a
    // full timeout after its last ping (t0 + 1000ms is the start of tick 100), closed one tick
    // later.
    step_expecting(&mut server, last + IDLE, 1);
    assert_open(&mut active);
    step_expecting(&mut server, last + IDLE + TICK - Duration::from_nanos(1), 1);
    step_expecting(&mut server, last + IDLE + TICK, 2);
    expect_closed(&mut active);

    let m = stop_at(&mut server, last + IDLE + TICK);
    assert_eq!(m.accepted, 2, "{m}");
    assert_eq!(m.closed_by(CloseReason::IdleTimeout), 2, "{m}");
    assert_eq!(m.closed_total(), 2, "{m}");
    assert_eq!(m.bytes_in, 12, "{m}");
    assert_eq!(m.bytes_out, 12, "{m}");
}

#[test]
fn connection_that_never_sends_closes_after_the_timeout_from_accept() {
    let (mut server, addr) = bind(config(), Echo);
    let t0 = server.now();
    // Accepted in the middle of tick 0: the accept is its last activity, stamped tick 0.
    let accepted_at = t0 + TICK / 2;
    let mut stream = connect(addr);
    turn_until_at(&mut server, accepted_at, "the accept", |s| {
        s.metrics().accepted == 1
    });
    // Never early: open a full timeout after the accept (tick 30)...
    step_expecting(&mut server, accepted_at + IDLE, 0);
    assert_open(&mut stream);
    // ...and still in the last nanosecond of tick 30...
    step_expecting(&mut server, t0 + IDLE + TICK - Duration::from_nanos(1), 0);
    // ...closed at the start of tick 31: half a tick after the full timeout, within one tick.
    step_expecting(&mut server, accepted_at + IDLE + TICK / 2, 1);
    expect_closed(&mut stream);
    let m = stop_at(&mut server, accepted_at + IDLE + TICK / 2);
    assert_eq!(m.accepted, 1, "{m}");
    assert_eq!(m.closed_by(CloseReason::IdleTimeout), 1, "{m}");
    assert_eq!(m.closed_total(), 1, "{m}");
}

#[test]
fn activity_resets_the_deadline_to_its_own_tick() {
    let (mut server, addr) = bind(config(), Echo);
    let t0 = server.now();
    let mut stream = connect(addr);
    turn_until_at(&mut server, t0, "the accept", |s| s.metrics().accepted == 1);
    // Active again at t0 + 295ms (tick 29), one tick before the accept's deadline would have
    // closed it at tick 31: the new deadline is tick 29 + 31 = 60.
    let again = t0 + Duration::from_millis(295);
    ping(&mut server, again, &mut stream, b'a');
    step_expecting(&mut server, t0 + IDLE + TICK, 0);
    step_expecting(
        &mut server,
        t0 + Duration::from_millis(600) - Duration::from_nanos(1),
        0,
    );
    assert_open(&mut stream);
    step_expecting(&mut server, t0 + Duration::from_millis(600), 1);
    expect_closed(&mut stream);
    stop_at(&mut server, t0 + Duration::from_millis(600));
}
