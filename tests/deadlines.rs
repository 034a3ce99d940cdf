//! Deadlines that were early, found while moving the timing tests onto `turn_at`: each test
//! asserts the behaviour the rounding rule promises, and each failed before its fix.
//!
//! The rule (src/time.rs): an instant rounds down to its tick, a duration rounds up, and a
//! deadline is `stamp + ticks + 1`, so nothing fires before its full timeout and everything
//! fires within one tick after it. Idle, write-stall, connect and the data connections' linger
//! deadlines follow it (`Conn::deadline`). The deadlines below add no `+ 1` tick: stamped in the
//! middle of a tick, they fire up to one tick *before* their timeout has passed. Every test here
//! stamps at `t0 + 5ms` (the middle of tick 0 with a 10 ms tick) to show it.
//!
//! The last test is of another kind: a deadline that is already due when a drain starts does not
//! fire in the turn that started the drain if that turn's tick was already processed.

mod util;

use std::io::Write;
use std::time::Duration;

use sockman::{CloseReason, Config, Context, Echo, Handler, OnFull, RejectReason};
use util::{bind, bind_with_admin, connect, local_config, ping_at, step_to, turn_until_at};

const TICK: Duration = Duration::from_millis(10);
const HALF: Duration = Duration::from_millis(5);

/// The test server's config: on 127.0.0.1, with the 10 ms tick every test here reasons in.
fn ticked() -> Config {
    Config {
        tick: TICK,
        ..local_config()
    }
}

/// `Admin::deadline_of` (src/admin/http.rs) is `opened + timeout_ticks`.
#[test]
fn an_admin_connection_is_not_closed_before_the_admin_timeout() {
    const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
    let config = ticked();
    let (mut server, _, admin) = bind_with_admin(config, Echo);
    let t0 = server.now();
    let accepted_at = t0 + HALF;
    let _client = connect(admin);
    turn_until_at(&mut server, accepted_at, "the admin accept", |s| {
        s.poll_delay(accepted_at).is_some()
    });
    // 4.995 s after the accept: the timeout has not passed.
    let at = t0 + ADMIN_TIMEOUT;
    step_to(&mut server, at);
    assert!(
        server.poll_delay(at).is_some(),
        "admin connection closed {:?} after its accept, before the {ADMIN_TIMEOUT:?} timeout",
        at - accepted_at
    );
    // One tick later (5.005 s after the accept) it is closed.
    let at = t0 + ADMIN_TIMEOUT + TICK;
    step_to(&mut server, at);
    assert_eq!(server.poll_delay(at), None, "still open a tick later");
}

/// `Timers::begin_drain` (src/server/timers.rs) sets the deadline to `now + ticks(timeout)`.
#[test]
fn the_drain_deadline_is_not_before_the_drain_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(500);
    let config = Config {
        drain_idle: Duration::from_secs(5),
        ..ticked()
    };
    let (mut server, addr) = bind(config, Echo);
    let t0 = server.now();
    let started = t0 + HALF;
    let mut client = connect(addr);
    ping_at(&mut server, started, &mut client, b"x");
    server.drain(TIMEOUT); // at the last turn's time: t0 + 5ms
    step_to(&mut server, t0 + TIMEOUT);
    assert!(
        !server.is_stopped(),
        "force-closed {:?} after the drain started, before its {TIMEOUT:?} timeout: {}",
        t0 + TIMEOUT - started,
        server.metrics()
    );
    step_to(&mut server, t0 + TIMEOUT + TICK);
    assert!(server.is_stopped(), "{}", server.metrics());
    assert_eq!(server.metrics().drain_forced, 1, "{}", server.metrics());
}

/// `Server::evict_for` (src/server/accept.rs) evicts when `now - last_active >=
/// ticks(evict_min_idle)`: a tick count from a rounded-down stamp, with no `+ 1`.
#[test]
fn a_connection_idle_less_than_evict_min_idle_is_not_evicted() {
    let config = Config {
        max_connections: Some(1),
        on_full: OnFull::EvictIdle,
        evict_min_idle: Duration::from_millis(100),
        ..ticked()
    };
    let (mut server, addr) = bind(config, Echo);
    let t0 = server.now();
    let mut held = connect(addr);
    ping_at(&mut server, t0 + HALF, &mut held, b"x");
    // A newcomer 95 ms later: rejected, the held connection is not idle long enough.
    let _newcomer = connect(addr);
    turn_until_at(
        &mut server,
        t0 + Duration::from_millis(100),
        "the newcomer's fate",
        |s| s.metrics().accepted == 2 || s.metrics().rejected_by(RejectReason::Full) == 1,
    );
    let m = server.metrics();
    assert_eq!(
        m.closed_by(CloseReason::Evicted),
        0,
        "evicted after 95 ms idle (evict_min_idle 100ms): {m}"
    );
    assert_eq!(m.rejected_by(RejectReason::Full), 1, "{m}");
}

/// Sets a 100 ms timer in `on_open`; `on_timer` closes the connection.
struct TimerThenClose;

impl Handler for TimerThenClose {
    type Conn = ();
    fn on_open(&mut self, ctx: &mut Context<'_>) {
        ctx.set_timer(Duration::from_millis(100));
    }
    fn on_data(&mut self, _: &mut (), _: &mut Context<'_>, _: &[u8]) {}
    fn on_timer(&mut self, _: &mut (), ctx: &mut Context<'_>) {
        ctx.close();
    }
}

/// `ConnMut::set_timer` (src/handler.rs) sets `now + ticks(after)`.
#[test]
fn a_handler_timer_does_not_fire_before_its_duration() {
    let config = Config {
        linger_timeout: Duration::ZERO,
        ..ticked()
    };
    let (mut server, addr) = bind(config, TimerThenClose);
    let t0 = server.now();
    let _client = connect(addr);
    turn_until_at(&mut server, t0 + HALF, "the accept", |s| {
        s.metrics().accepted == 1
    });
    step_to(&mut server, t0 + Duration::from_millis(100));
    assert_eq!(
        server.metrics().closed_total(),
        0,
        "the 100 ms timer fired 95 ms after it was set: {}",
        server.metrics()
    );
    step_to(&mut server, t0 + Duration::from_millis(110));
    assert_eq!(
        server.metrics().closed_by(CloseReason::Handler),
        1,
        "{}",
        server.metrics()
    );
}

/// `Admin::deadline_of` (src/admin/http.rs) is `since + linger_ticks` for a lingering admin
/// connection.
#[test]
fn an_admin_linger_lasts_the_whole_linger_timeout() {
    let config = Config {
        linger_timeout: Duration::from_millis(100),
        ..ticked()
    };
    let (mut server, _, admin) = bind_with_admin(config, Echo);
    let t0 = server.now();
    let answered = t0 + HALF;
    // A request without FIN: the answer is followed by a linger until the client's EOF, which
    // never comes.
    let mut client = connect(admin);
    client
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut head = Vec::new();
    turn_until_at(&mut server, answered, "the admin answer", |_| {
        client.set_nonblocking(true).unwrap();
        let mut buf = [0; 512];
        match std::io::Read::read(&mut client, &mut buf) {
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}"),
        }
        head.ends_with(b"ok\n")
    });
    assert!(
        server.poll_delay(answered).is_some(),
        "the answered admin connection should linger"
    );
    let at = t0 + Duration::from_millis(100);
    step_to(&mut server, at);
    assert!(
        server.poll_delay(at).is_some(),
        "the linger ended {:?} after the answer, before the 100 ms linger timeout",
        at - answered
    );
    let at = t0 + Duration::from_millis(110);
    step_to(&mut server, at);
    assert_eq!(server.poll_delay(at), None, "still lingering a tick later");
}

/// A wheel entry inserted for a tick the wheel has already passed sits in the slot of
/// `elapsed = now + 1` (src/wheel.rs), so it fires at the next tick, not in the current turn.
#[test]
fn a_connection_past_drain_idle_is_closed_in_the_turn_that_starts_the_drain() {
    let config = Config {
        drain_idle: Duration::from_millis(300),
        ..ticked()
    };
    let (mut server, addr) = bind(config, Echo);
    let t0 = server.now();
    let mut long_idle = connect(addr);
    ping_at(&mut server, t0, &mut long_idle, b"x");
    // Activity of another connection at td: a turn at td (tick 40) has run.
    let td = t0 + Duration::from_millis(400);
    let mut other = connect(addr);
    ping_at(&mut server, td, &mut other, b"y");
    server.handle().drain(Duration::from_secs(10));
    turn_until_at(&mut server, td, "the drain to start", |s| s.is_draining());
    // long_idle's drain-idle deadline is tick 31, due by td (tick 40).
    assert_eq!(
        server.metrics().closed_by(CloseReason::Shutdown),
        1,
        "the connection idle for 400 ms is still open in the drain's turn: {}",
        server.metrics()
    );
}

/// Real-time turns (`run`) wait without a poll timeout, on a timer armed for the next
/// deadline: an idle connection is still closed, no earlier than its timeout.
#[test]
fn a_running_server_wakes_for_its_deadlines() {
    let config = sockman::Config {
        idle_timeout: Duration::from_millis(200),
        ..util::local_config()
    };
    let server = util::start(config, sockman::Echo);
    let started = std::time::Instant::now();
    let mut idle = util::connect(server.addr);
    util::expect_closed(&mut idle);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(200),
        "closed after {waited:?}"
    );
    let m = server.stop();
    assert_eq!(m.closed_by(sockman::CloseReason::IdleTimeout), 1, "{m}");
}
