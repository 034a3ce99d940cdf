//! Evict-idle at the connection cap, at virtual times: the test owns the server and steps it
//! with `turn_at`, so the minimum idle time is asserted to the tick.
//!
//! With `tick = 10ms` and `evict_min_idle = 200ms` (20 ticks), a newcomer at the cap evicts the
//! least recently active connection if it has been idle long enough: a connection last active
//! at `t` (the start of a tick) is kept for a newcomer at `t + 190ms` (which is rejected) and
//! evicted for one at `t + 210ms`. The tick in between (`t + 200ms`, idle exactly 20 ticks) is
//! left out: the library evicts there, but the rounding rule (`stamp + ticks + 1`, see
//! `found_by_timing.rs`) would not, since a stamp in the middle of a tick would then be evicted
//! before `evict_min_idle` has passed; this test asserts only what holds either way.

mod util;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use sockman::{CloseReason, Config, Echo, OnFull, RejectReason, Server};
use util::{
    assert_open, bind, connect, expect_closed, local_config, ping_at, stop_at, turn_until_at,
};

const TICK: Duration = Duration::from_millis(10);
const MIN_IDLE: Duration = Duration::from_millis(200);

/// Connects a newcomer and turns the server at `at` until it has been admitted or rejected.
#[track_caller]
fn newcomer(server: &mut Server<Echo>, at: Instant) -> TcpStream {
    let seen = |s: &Server<Echo>| s.metrics().accepted + s.metrics().rejected.iter().sum::<u64>();
    let before = seen(server);
    let stream = connect(server.local_addrs()[0]);
    turn_until_at(server, at, "the newcomer admitted or rejected", |s| {
        seen(s) > before
    });
    stream
}

/// A [`newcomer`] at `at` that is admitted by evicting `victim`: the server has evicted
/// `evicted` and accepted `accepted` connections in all by then, and `victim` sees its close.
#[track_caller]
fn evicting_newcomer(
    server: &mut Server<Echo>,
    at: Instant,
    victim: &mut TcpStream,
    evicted: u64,
    accepted: u64,
) -> TcpStream {
    let newcomer = newcomer(server, at);
    let m = server.metrics();
    assert_eq!(m.closed_by(CloseReason::Evicted), evicted, "{m}");
    assert_eq!(m.accepted, accepted, "{m}");
    expect_closed(victim);
    newcomer
}

#[test]
fn the_least_recently_active_is_evicted_once_idle_for_evict_min_idle_and_not_before() {
    let config = Config {
        max_connections: Some(3),
        on_full: OnFull::EvictIdle,
        evict_min_idle: MIN_IDLE,
        tick: TICK,
        ..local_config()
    };
    let (mut server, addr) = bind(config, Echo);
    let t0 = server.now();
    // c0 last active at t0 (tick 0); c1 then c2 at t0 + 20ms (tick 2): c0 is the least recently
    // active, then c1.
    let mut c: Vec<TcpStream> = (0..3).map(|_| connect(addr)).collect();
    ping_at(&mut server, t0, &mut c[0], b"c0");
    let t1 = t0 + 2 * TICK;
    ping_at(&mut server, t1, &mut c[1], b"c1");
    ping_at(&mut server, t1, &mut c[2], b"c2");
    assert_eq!(server.metrics().active, 3);

    // t0 + 190ms: c0 is idle 19 ticks: nobody may be evicted, the newcomer is rejected.
    let mut rejected = newcomer(&mut server, t0 + MIN_IDLE - TICK);
    expect_closed(&mut rejected);
    let m = server.metrics();
    assert_eq!(m.rejected_by(RejectReason::Full), 1, "{m}");
    assert_eq!(m.closed_total(), 0, "{m}");

    // t0 + 210ms: c0 is idle 21 ticks: evicted, and the newcomer admitted.
    let at = t0 + MIN_IDLE + TICK;
    let mut n1 = evicting_newcomer(&mut server, at, &mut c[0], 1, 4);
    ping_at(&mut server, at, &mut n1, b"n1");

    // Still t0 + 210ms: the least recently active is now c1, idle 19 ticks: rejected again.
    let mut rejected = newcomer(&mut server, at);
    expect_closed(&mut rejected);
    let m = server.metrics();
    assert_eq!(m.rejected_by(RejectReason::Full), 2, "{m}");
    assert_eq!(m.closed_by(CloseReason::Evicted), 1, "{m}");

    // t0 + 230ms: c1 is idle 21 ticks (c2 too, but c1 was active before it): c1 goes.
    let at = t1 + MIN_IDLE + TICK;
    let mut n2 = evicting_newcomer(&mut server, at, &mut c[1], 2, 5);
    assert_open(&mut c[2]);
    for (s, msg) in [(&mut c[2], b"c2"), (&mut n1, b"n1"), (&mut n2, b"n2")] {
        ping_at(&mut server, at, s, msg);
    }
    let m = stop_at(&mut server, at);
    assert_eq!(m.closed_by(CloseReason::Evicted), 2, "{m}");
    assert_eq!(m.closed_by(CloseReason::Shutdown), 3, "{m}");
    assert_eq!(m.rejected_by(RejectReason::Full), 2, "{m}");
}
