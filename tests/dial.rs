//! Dialed connections (the dialing example's handler, `examples/dial.rs`): against an echo
//! server, a refused port and a listener whose backlog is full, every socket ends exactly once
//! with the right reason and, with time stepped, at the right tick. Dials count against the
//! connection cap, obey idle timeouts and show in the metrics.

#[path = "../examples/dial.rs"]
#[allow(dead_code)]
mod dial;
mod util;

use std::net::SocketAddr;
use std::time::Duration;

use dial::{Dial, Dialer};
use sockman::{CloseReason, Config, DialFailure, Handler, Server};
use util::{step, turn_until_at};

/// The client loop's configuration (see `examples/dial.rs`) with a 10 ms tick, for the tests
/// that step time.
fn ticked() -> Config {
    Config {
        tick: Duration::from_millis(10),
        ..dial::config()
    }
}

fn dial(server: &mut Server<Dialer>, addr: SocketAddr, target: usize) {
    let started = server.now();
    server
        .connect(
            addr,
            Dial {
                target,
                started,
                expect: 0,
            },
        )
        .unwrap();
}

fn reasons(server: &Server<Dialer>, target: usize) -> Vec<CloseReason> {
    let mut r: Vec<CloseReason> = server
        .handler()
        .ended
        .iter()
        .filter(|e| e.0 == target)
        .map(|e| e.1)
        .collect();
    r.dedup();
    r
}

#[test]
fn dials_to_an_echo_server_connect_echo_and_close_once() {
    let echo = util::start(util::local_config(), sockman::Echo);
    let mut client = Server::bind(dial::config(), Dialer::default()).unwrap();
    let t0 = client.now();
    for _ in 0..100 {
        dial(&mut client, echo.addr, 0);
    }
    assert_eq!(client.metrics().dialed, 100);
    assert_eq!(client.metrics().connecting, 100);
    turn_until_at(&mut client, t0, "every echo", |s| {
        s.handler().ended.len() == 100
    });
    assert_eq!(reasons(&client, 0), vec![CloseReason::Handler]);
    let m = client.metrics().clone();
    assert_eq!(
        (m.connected, m.connecting, m.dial_failures()),
        (100, 0, 0),
        "{m}"
    );
    assert_eq!(m.closed_dialed[CloseReason::Handler.index()], 100, "{m}");
    assert_eq!(m.active, 0, "{m}");
    // Graceful closes linger until the echo server's EOF; then the slots are free.
    turn_until_at(&mut client, t0, "the lingers", |s| {
        s.metrics().lingering == 0
    });
    assert_eq!(client.metrics().linger_ends_named("eof"), 100);
    util::stop(&mut client);
    echo.stop();
}

#[test]
fn a_refused_dial_ends_at_once_with_its_reason() {
    let refused = dial::refused_port().unwrap();
    let mut client = Server::bind(dial::config(), Dialer::default()).unwrap();
    let t0 = client.now();
    for _ in 0..20 {
        dial(&mut client, refused, 1);
    }
    // No time passes: a refusal is an event, not a timeout.
    turn_until_at(&mut client, t0, "the refusals", |s| {
        s.handler().ended.len() == 20
    });
    assert_eq!(reasons(&client, 1), vec![CloseReason::ConnectRefused]);
    let m = client.metrics();
    assert_eq!(m.closed_by(CloseReason::ConnectRefused), 20, "{m}");
    assert_eq!(m.dial_failures(), 20, "{m}");
    util::stop(&mut client);
}

#[test]
fn a_dial_that_never_completes_ends_at_the_connect_timeout_tick() {
    let (_listener, silent, _fillers) = dial::silent_listener().unwrap();
    let config = Config {
        connect_timeout: Duration::from_millis(300),
        ..ticked()
    };
    let mut client = Server::bind(config, Dialer::default()).unwrap();
    let t0 = client.now();
    for _ in 0..20 {
        dial(&mut client, silent, 2);
    }
    // Give the SYNs a chance to be answered (they are not: the backlog is full).
    for _ in 0..5 {
        client.turn_at(t0, Some(Duration::from_millis(10))).unwrap();
    }
    // 300 ms is 30 ticks, and a deadline is stamp + timeout + 1 tick: open at 300 ms...
    step(&mut client, t0 + Duration::from_millis(300));
    assert!(client.handler().ended.is_empty(), "{}", client.metrics());
    assert_eq!(client.metrics().connecting, 20);
    // ...closed by the next tick after it.
    step(&mut client, t0 + Duration::from_millis(310));
    assert_eq!(client.handler().ended.len(), 20, "{}", client.metrics());
    assert_eq!(reasons(&client, 2), vec![CloseReason::ConnectTimeout]);
    for (_, _, age) in &client.handler().ended {
        assert_eq!(*age, Duration::from_millis(310));
    }
    assert_eq!(client.metrics().connecting, 0);
    util::stop(&mut client);
}

#[test]
fn a_dial_over_the_cap_fails_at_once_with_a_clear_error() {
    let echo = util::start(util::local_config(), sockman::Echo);
    let config = Config {
        max_connections: Some(2),
        ..dial::config()
    };
    let mut client = Server::bind(config, Dialer::default()).unwrap();
    let started = client.now();
    let new = |target| Dial {
        target,
        started,
        expect: 0,
    };
    client.connect(echo.addr, new(0)).unwrap();
    client.connect(echo.addr, new(0)).unwrap();
    let err = client.connect(echo.addr, new(7)).unwrap_err();
    assert!(
        matches!(err.failure, DialFailure::Full { max_connections: 2 }),
        "{err}"
    );
    assert_eq!(err.state.target, 7, "the state comes back");
    assert!(
        err.to_string().contains("maximum of 2 connections"),
        "{err}"
    );
    assert_eq!(client.metrics().dialed, 2);
    util::stop(&mut client);
    echo.stop();
}

/// Connects and then never writes: idle.
#[derive(Default)]
struct Quiet {
    closed: Vec<CloseReason>,
}

impl Handler for Quiet {
    type Conn = ();
    fn on_open(&mut self, _: &mut sockman::Context<'_>) {}
    fn on_data(&mut self, _: &mut (), _: &mut sockman::Context<'_>, _: &[u8]) {}
    fn on_close(&mut self, _: (), _: &mut sockman::Context<'_>, reason: CloseReason) {
        self.closed.push(reason);
    }
}

#[test]
fn an_idle_dialed_connection_closes_at_its_idle_timeout() {
    let echo = util::start(util::local_config(), sockman::Echo);
    let config = Config {
        idle_timeout: Duration::from_millis(500),
        ..ticked()
    };
    let mut client = Server::bind(config, Quiet::default()).unwrap();
    let t0 = client.now();
    client.connect(echo.addr, ()).unwrap();
    turn_until_at(&mut client, t0, "the handshake", |s| {
        s.metrics().connected == 1
    });
    step(&mut client, t0 + Duration::from_millis(500));
    assert!(client.handler().closed.is_empty());
    step(&mut client, t0 + Duration::from_millis(510));
    assert_eq!(client.handler().closed, vec![CloseReason::IdleTimeout]);
    assert_eq!(
        client.metrics().closed_dialed[CloseReason::IdleTimeout.index()],
        1
    );
    util::stop(&mut client);
    echo.stop();
}

/// With evict-idle on, a dial that fails before it connected (it never joined the eviction
/// order) must leave that order intact: it used to unlink a key that was never linked (an
/// index out of bounds, or a list cut short).
#[test]
fn a_failed_dial_with_evict_idle_leaves_the_eviction_order_intact() {
    let echo = util::start(util::local_config(), sockman::Echo);
    let refused = dial::refused_port().unwrap();
    let config = Config {
        listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        on_full: sockman::OnFull::EvictIdle,
        max_connections: Some(20),
        evict_min_idle: Duration::ZERO,
        ..dial::config()
    };
    let mut client = Server::bind(config, Dialer::default()).unwrap();
    let t0 = client.now();
    for _ in 0..10 {
        dial(&mut client, refused, 1);
    }
    turn_until_at(&mut client, t0, "the refusals", |s| {
        s.handler().ended.len() == 10
    });
    // The order still works: dials to the echo server connect and close normally.
    for _ in 0..3 {
        dial(&mut client, echo.addr, 0);
    }
    turn_until_at(&mut client, t0, "the echoes", |s| {
        s.handler().ended.len() == 13
    });
    assert_eq!(reasons(&client, 0), vec![CloseReason::Handler]);
    util::stop(&mut client);
    echo.stop();
}
