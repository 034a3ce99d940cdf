//! The drain of an in-process server at virtual times: the test owns the server and steps it with
//! `turn_at`, so drain-idle closes and the drain deadline are asserted to the tick (the binary's
//! drain on SIGTERM is tests/drain.rs, in real time).
//!
//! With `tick = 10ms` and `drain_idle = 300ms` (30 ticks), a connection last active in tick `T`
//! is closed by the drain at tick `T + 31` (its idle deadline shortened to `drain_idle`): open at
//! `t + 300ms`, closed at `t + 310ms` for activity at the start of a tick. One idle for longer
//! than `drain_idle` when the drain starts is closed at once (by the next tick).

mod util;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use sockman::{CloseReason, Config, Echo, Server};
use util::{
    assert_open, bind, connect, expect_closed, local_config, ping_at, step_closing, step_to,
    turn_until_at,
};

const TICK: Duration = Duration::from_millis(10);
const DRAIN_IDLE: Duration = Duration::from_millis(300);

/// An echo server with `drain_idle` and the 10 ms tick, to be turned by the test; returns it,
/// its address and its time at the start.
#[track_caller]
fn drain_server(drain_idle: Duration) -> (Server<Echo>, SocketAddr, Instant) {
    let config = Config {
        drain_idle,
        tick: TICK,
        ..local_config()
    };
    let (server, addr) = bind(config, Echo);
    let t0 = server.now();
    (server, addr, t0)
}

/// Steps to `at` and asserts how many connections the drain has closed so far (reason
/// `Shutdown`; they linger until their client's EOF) and that nothing else closed.
#[track_caller]
fn step_expecting(server: &mut Server<Echo>, at: Instant, closed: u64) {
    step_closing(server, at, CloseReason::Shutdown, closed);
}

/// [`ping_at`] `msg` at `base` plus each of `offsets` (in ms).
#[track_caller]
fn pings_at(
    server: &mut Server<Echo>,
    base: Instant,
    offsets: [u64; 3],
    stream: &mut TcpStream,
    msg: &[u8],
) {
    for ms in offsets {
        ping_at(server, base + Duration::from_millis(ms), stream, msg);
    }
}

#[test]
fn a_drain_closes_connections_idle_for_drain_idle_on_their_tick_and_serves_active_ones() {
    let (mut server, addr, t0) = drain_server(DRAIN_IDLE);
    // `long_idle` is last active at t0; `late` and `active` at td = t0 + 400ms, just before the
    // drain starts: `long_idle` has been idle longer than drain_idle by then.
    let mut long_idle = connect(addr);
    ping_at(&mut server, t0, &mut long_idle, b"long idle");
    let td = t0 + Duration::from_millis(400);
    let mut late = connect(addr);
    let mut active = connect(addr);
    ping_at(&mut server, td, &mut late, b"late");
    ping_at(&mut server, td, &mut active, b"active");

    // The drain starts at the time of the turn that sees the wake-up: td.
    server.handle().drain(Duration::from_secs(10));
    turn_until_at(&mut server, td, "the drain to start", |s| s.is_draining());
    // The listener is closed: a new connect is refused, not left hanging.
    util::expect_refused(addr);

    // The long-idle one goes at once, without a new drain_idle period: by the next tick.
    step_expecting(&mut server, td + TICK, 1);
    expect_closed(&mut long_idle);
    drop(long_idle); // its EOF ends the linger

    // `active` keeps talking every 100 ms and is served; `late`, silent since td (the start of
    // tick 40), is open at td + 300ms (tick 70) and closed at td + 310ms (tick 71).
    pings_at(
        &mut server,
        td,
        [100, 200, 300],
        &mut active,
        b"still served",
    );
    step_expecting(&mut server, td + DRAIN_IDLE, 1);
    assert_open(&mut late);
    step_expecting(
        &mut server,
        td + DRAIN_IDLE + TICK - Duration::from_nanos(1),
        1,
    );
    step_expecting(&mut server, td + DRAIN_IDLE + TICK, 2);
    expect_closed(&mut late);
    drop(late);

    // `active` falls silent after its ping at td + 400ms (tick 80): open at td + 700ms, closed
    // at td + 710ms.
    let last = td + Duration::from_millis(400);
    ping_at(&mut server, last, &mut active, b"last words");
    step_expecting(&mut server, last + DRAIN_IDLE, 2);
    assert_open(&mut active);
    assert!(server.is_draining());
    step_expecting(&mut server, last + DRAIN_IDLE + TICK, 3);
    expect_closed(&mut active);
    drop(active);

    // Every client has sent its EOF: the lingers end, the drain completes, the server stops.
    let end = last + DRAIN_IDLE + TICK;
    turn_until_at(&mut server, end, "the drain to complete", |s| {
        s.is_stopped()
    });
    let m = server.metrics();
    assert_eq!(m.accepted, 3, "{m}");
    assert_eq!(m.closed_by(CloseReason::Shutdown), 3, "{m}");
    assert_eq!(m.closed_total(), 3, "{m}");
    assert_eq!(m.drain_forced, 0, "{m}");
    assert_eq!(m.linger_ends_named("eof"), 3, "{m}");
    assert_eq!(m.active, 0, "{m}");
    assert_eq!(m.pending_bytes, 0, "{m}");
}

/// The drain deadline: `Server::drain(500ms)` starts at the last turn's time td; what is left is
/// force-closed when the deadline comes, however active it is. A second call only shortens the
/// deadline. Open at td + 490ms, closed by td + 510ms. The turn at td + 500ms itself is left out:
/// by the rounding rule (`stamp + ticks + 1`) the connection would still be open there, but the
/// drain deadline has no `+ 1` tick (see `found_by_timing.rs`), so this test asserts only what
/// holds either way.
#[test]
fn the_drain_deadline_force_closes_what_is_left() {
    const TIMEOUT: Duration = Duration::from_millis(500);
    let (mut server, addr, t0) = drain_server(Duration::from_secs(5));
    let mut client = connect(addr);
    let td = t0 + Duration::from_millis(100);
    ping_at(&mut server, td, &mut client, b"before");
    server.drain(Duration::from_secs(10));
    server.drain(TIMEOUT); // shortens: the deadline is td + 500ms
    server.drain(Duration::from_secs(10)); // does not lengthen it again
    assert!(server.is_draining());
    pings_at(
        &mut server,
        td,
        [0, 200, 400],
        &mut client,
        b"during the drain",
    );
    step_to(&mut server, td + TIMEOUT - TICK);
    assert!(!server.is_stopped(), "{}", server.metrics());
    assert_eq!(server.metrics().closed_total(), 0, "{}", server.metrics());
    assert_open(&mut client);
    step_to(&mut server, td + TIMEOUT + TICK);
    assert!(server.is_stopped(), "{}", server.metrics());
    let m = server.metrics();
    assert_eq!(m.drain_forced, 1, "{m}");
    assert_eq!(m.closed_by(CloseReason::Shutdown), 1, "{m}");
    assert_eq!(m.closed_total(), 1, "{m}");
    assert_eq!(m.active, 0, "{m}");
    expect_closed(&mut client);
}
