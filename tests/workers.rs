//! Several loops with SO_REUSEPORT ([`sockman::Workers`]), in process: the kernel spreads
//! connections over the workers, `/metrics` has a total and one series per worker, `/connections`
//! gathers every worker's lines, a drain drains every worker, and a worker that fails stops the
//! others with an error naming it.
#![cfg(feature = "admin")]

mod util;

use std::time::Duration;

use sockman::{Context, Echo, Error, Handler, Workers};
use util::http;
use util::{connect, echo, local_config, with_admin};

#[test]
fn connections_spread_over_workers_and_the_admin_sees_all_of_them() {
    let workers = Workers::bind(with_admin(local_config()), 2, |_| Echo).unwrap();
    let addr = workers.local_addrs()[0];
    let admin = workers.admin_addr().unwrap();
    let running = workers.start().unwrap();
    let mut clients: Vec<_> = (0..200).map(|_| connect(addr)).collect();
    for c in &mut clients {
        echo(c, b"x");
    }
    // Published at most once per tick: wait until the totals show all 200.
    let deadline = std::time::Instant::now() + util::WAIT;
    let body = loop {
        let body = http::get(admin, "/metrics").body;
        if http::value(&body, "sockman_connections_active", "") == Some(200) {
            break body;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        std::thread::yield_now();
    };
    let w0 = http::value(&body, "sockman_connections_active", "worker=\"0\"").unwrap();
    let w1 = http::value(&body, "sockman_connections_active", "worker=\"1\"").unwrap();
    assert_eq!(w0 + w1, 200);
    // 200 connections from 200 source ports: the kernel's hash uses both sockets.
    assert!(w0 > 0 && w1 > 0, "{w0} and {w1}");
    assert_eq!(
        http::value(
            &body,
            "sockman_closed_total",
            "worker=\"1\",reason=\"reset\""
        ),
        Some(0)
    );
    // /connections gathers both workers' lines, each tagged with its worker.
    let lines = http::get(admin, "/connections?limit=1000").body;
    let tagged = |w: &str| lines.lines().filter(|l| l.contains(w)).count() as u64;
    assert_eq!(lines.lines().count(), 200, "{lines}");
    assert_eq!(tagged(" worker=0"), w0);
    assert_eq!(tagged(" worker=1"), w1);
    assert_eq!(
        http::get(admin, "/connections?limit=7")
            .body
            .lines()
            .count(),
        7
    );
    assert_eq!(http::get(admin, "/livez").status, 200);
    assert_eq!(http::get(admin, "/readyz").status, 200);
    // A drain drains every worker.
    running.handle().drain(Duration::from_secs(5));
    drop(clients);
    let finals = running.wait().unwrap();
    assert_eq!(finals.len(), 2);
    let accepted: u64 = finals.iter().map(|m| m.accepted).sum();
    assert_eq!(accepted, 200);
    assert!(finals.iter().all(|m| m.active == 0));
}

/// Panics on its first byte: a worker with a bug.
struct Fragile;

impl Handler for Fragile {
    type Conn = ();
    fn on_open(&mut self, _: &mut Context<'_>) {}
    fn on_data(&mut self, _: &mut (), _: &mut Context<'_>, _: &[u8]) {
        panic!("a bug in the handler");
    }
}

#[test]
fn a_worker_that_fails_stops_the_others_with_an_error_naming_it() {
    let workers = Workers::bind(local_config(), 2, |_| Fragile).unwrap();
    let addr = workers.local_addrs()[0];
    let mut running = workers.start().unwrap();
    // Some connection lands on some worker and makes it panic.
    let mut clients = Vec::new();
    let result = loop {
        let mut c = connect(addr);
        let _ = std::io::Write::write_all(&mut c, b"boom");
        clients.push(c);
        match running.wait_timeout(Duration::from_millis(200)) {
            Ok(None) => assert!(clients.len() < 50, "no worker failed"),
            other => break other,
        }
    };
    match result {
        Err(Error::Worker { index, message }) => {
            assert!(index < 2);
            assert!(message.contains("panicked"), "{message}");
        }
        other => panic!("expected a worker error, got {other:?}"),
    }
}

#[test]
fn listeners_bound_elsewhere_are_served() {
    // As systemd would hand them over: bound and listening before the server exists.
    let inherited = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = inherited.local_addr().unwrap();
    let server = sockman::Server::bind_listeners(local_config(), vec![inherited], Echo).unwrap();
    assert_eq!(server.local_addrs(), vec![addr]);
    let handle = server.handle();
    let thread = std::thread::spawn(move || server.run().unwrap());
    let mut c = connect(addr);
    echo(&mut c, b"inherited");
    drop(c);
    handle.shutdown();
    assert_eq!(thread.join().unwrap().accepted, 1);
    // And shared by two workers.
    let inherited = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = inherited.local_addr().unwrap();
    let workers = Workers::bind_listeners(local_config(), vec![inherited], 2, |_| Echo).unwrap();
    let running = workers.start().unwrap();
    let mut clients: Vec<_> = (0..20).map(|_| connect(addr)).collect();
    for c in &mut clients {
        echo(c, b"y");
    }
    running.handle().shutdown();
    let accepted: u64 = running.wait().unwrap().iter().map(|m| m.accepted).sum();
    assert_eq!(accepted, 20);
}

/// A TCP socket bound to 127.0.0.1 but not listening, as a `std::net::TcpListener` (what a
/// caller could pass by mistake, or systemd for a misconfigured unit).
fn bound_not_listening() -> (std::net::TcpListener, std::net::SocketAddr) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    (socket.into(), addr)
}

#[test]
fn listeners_that_are_not_listening_are_refused_with_a_clear_error() {
    // Accepted, such a socket would never accept: every connect to it is refused.
    let (socket, addr) = bound_not_listening();
    match sockman::Server::bind_listeners(local_config(), vec![socket], Echo) {
        Err(Error::Config(msg)) => assert!(
            msg.contains(&addr.to_string()) && msg.contains("not listening"),
            "{msg}"
        ),
        Err(other) => panic!("expected a configuration error, got {other}"),
        Ok(_) => panic!("a socket that is not listening was accepted"),
    }
    let (socket, addr) = bound_not_listening();
    match Workers::bind_listeners(local_config(), vec![socket], 2, |_| Echo) {
        Err(Error::Config(msg)) => assert!(
            msg.contains(&addr.to_string()) && msg.contains("not listening"),
            "{msg}"
        ),
        Err(other) => panic!("expected a configuration error, got {other}"),
        Ok(_) => panic!("a socket that is not listening was accepted by the workers"),
    }
}
