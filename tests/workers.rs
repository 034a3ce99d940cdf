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

/// Greets each connection with its worker's index (`b'0' + i`), then echoes.
struct Greeter {
    i: u8,
}

impl Handler for Greeter {
    type Conn = ();
    fn on_open(&mut self, ctx: &mut Context<'_>) {
        ctx.write(&[b'0' + self.i]);
    }
    fn on_data(&mut self, _: &mut (), ctx: &mut Context<'_>, data: &[u8]) {
        ctx.write(data);
    }
}

/// A new connection and the worker it landed on (`None`: refused, closed before its greeting).
#[track_caller]
fn connect_to_a_worker(addr: std::net::SocketAddr) -> (std::net::TcpStream, Option<u8>) {
    use std::io::Read;
    let mut c = connect(addr);
    let mut b = [0u8; 1];
    let worker = match c.read(&mut b) {
        Ok(1) => Some(b[0] - b'0'),
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
        Err(e) => panic!("reading the greeting: {e}"),
    };
    (c, worker)
}

/// Waits until the group's published figures show `n` open connections (published once per
/// tick: there is no event to wait for).
#[track_caller]
fn wait_active(running: &sockman::RunningWorkers, n: u64) {
    let deadline = std::time::Instant::now() + util::WAIT;
    while running.metrics().active != n {
        assert!(
            std::time::Instant::now() < deadline,
            "not {n} open: {}",
            running.metrics()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn the_connection_cap_is_the_groups_whatever_worker_the_kernel_picks() {
    const CAP: usize = 20;
    let config = with_admin(sockman::Config {
        max_connections: Some(CAP),
        ..local_config()
    });
    let workers = Workers::bind(config, 2, |i| Greeter { i: i as u8 }).unwrap();
    let addr = workers.local_addrs()[0];
    let admin = workers.admin_addr().unwrap();
    let running = workers.start().unwrap();
    // Worker 1 alone takes 15 (more than half of the cap): those on worker 0 are let go.
    let mut kept = Vec::new();
    for _ in 0..1000 {
        if kept.len() == 15 {
            break;
        }
        match connect_to_a_worker(addr) {
            (c, Some(1)) => kept.push(c),
            (c, Some(_)) => {
                drop(c);
                wait_active(&running, kept.len() as u64);
            }
            (_, None) => panic!(
                "connection {} on worker 1 refused, below the group's cap of {CAP}: {}",
                kept.len() + 1,
                running.metrics()
            ),
        }
    }
    assert_eq!(kept.len(), 15, "the kernel never picked worker 1");
    // Then any worker, up to one below the cap: /readyz still says yes.
    while kept.len() < CAP - 1 {
        let (c, worker) = connect_to_a_worker(addr);
        assert!(worker.is_some(), "refused at {} of {CAP}", kept.len());
        kept.push(c);
    }
    wait_active(&running, CAP as u64 - 1);
    assert_eq!(http::get(admin, "/readyz").status, 200, "one below the cap");
    // The 20th fills the cap: /readyz says no exactly then; the 21st is refused.
    let (c, worker) = connect_to_a_worker(addr);
    assert!(worker.is_some(), "the {CAP}th was refused");
    kept.push(c);
    wait_active(&running, CAP as u64);
    let r = http::get(admin, "/readyz");
    assert_eq!(r.status, 503, "at the group's cap: {r:?}");
    let (_refused, worker) = connect_to_a_worker(addr);
    assert_eq!(
        worker, None,
        "a connection over the group's cap was accepted"
    );
    let deadline = std::time::Instant::now() + util::WAIT;
    while running.metrics().rejected_by(sockman::RejectReason::Full) != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            running.metrics()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // One leaves: room again.
    drop(kept.pop());
    wait_active(&running, CAP as u64 - 1);
    assert_eq!(
        http::get(admin, "/readyz").status,
        200,
        "below the cap again"
    );
    running.handle().shutdown();
    let finals = running.wait().unwrap();
    let rejected: u64 = finals
        .iter()
        .map(|m| m.rejected_by(sockman::RejectReason::Full))
        .sum();
    assert_eq!(rejected, 1, "{finals:?}");
}
