//! The proxy's unit tests: the size of a session's state, the idle close of a session (time
//! stepped with `turn_at`), and the PROXY headers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sockman::{CloseReason, Config, Handler};

use super::handler::{Proxy, ProxyVersion};
use super::session::Side;
use super::stats::Stats;

#[test]
fn a_sessions_state_is_small() {
    // Each of a session's two connections carries one; with a slab entry and no buffer,
    // an idle session is meant to cost at most 256 B in all (BENCHMARKS.md): two entries of
    // at most 96 + 16 B and the client side's one wheel entry of 16 B.
    assert!(
        std::mem::size_of::<Side>() <= 16,
        "{}",
        std::mem::size_of::<Side>()
    );
    assert_eq!(
        std::mem::size_of::<Option<Side>>(),
        std::mem::size_of::<Side>()
    );
}

/// Turns `server` at `now` until `done`, within a wall-clock bound that only keeps a broken
/// run from hanging (time itself is stepped, not waited for).
#[track_caller]
fn turn_until_at<H: Handler>(
    server: &mut sockman::Server<H>,
    now: Instant,
    what: &str,
    mut done: impl FnMut(&mut sockman::Server<H>) -> bool,
) {
    let bound = Instant::now() + Duration::from_secs(10);
    while !done(server) {
        assert!(Instant::now() < bound, "no {what}: {}", server.metrics());
        server
            .turn_at(now, Some(Duration::from_millis(10)))
            .unwrap();
    }
}

/// One nonblocking read: `Some(n)` bytes (0 = EOF), `None` = nothing yet.
fn try_read(s: &mut std::net::TcpStream) -> Option<usize> {
    use std::io::Read;
    match s.read(&mut [0; 64]) {
        Ok(n) => Some(n),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(e) => panic!("read: {e}"),
    }
}

#[test]
fn a_session_closes_when_both_sides_are_idle_not_while_the_upstream_talks() {
    use std::io::Write;
    let idle = Duration::from_millis(500);
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    upstream.set_nonblocking(true).unwrap();
    let up = upstream.local_addr().unwrap();
    let config = Config {
        listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        idle_timeout: idle,
        tick: Duration::from_millis(10),
        ..Config::default()
    };
    let (mut server, stats) = proxy_server(config, up);
    let t0 = server.now();
    let mut client = std::net::TcpStream::connect(server.local_addrs()[0]).unwrap();
    client.set_nonblocking(true).unwrap();
    let mut pusher = None;
    turn_until_at(&mut server, t0, "upstream connect", |_| {
        pusher = upstream.accept().ok().map(|(s, _)| s);
        pusher.is_some()
    });
    let mut pusher = pusher.unwrap();
    // The client never sends; the upstream pushes a byte every 400 ms for 1.6 s (over
    // three idle timeouts): the session is not idle while one side talks.
    let mut last = t0;
    for i in 1..=4 {
        last = t0 + Duration::from_millis(400) * i;
        pusher.write_all(b"p").unwrap();
        turn_until_at(&mut server, last, "the push relayed", |_| {
            try_read(&mut client) == Some(1)
        });
    }
    // Both sides silent: still open just before the idle timeout...
    for _ in 0..3 {
        server
            .turn_at(
                last + idle - Duration::from_millis(10),
                Some(Duration::ZERO),
            )
            .unwrap();
    }
    assert_eq!(try_read(&mut client), None, "closed early");
    assert_eq!(server.metrics().closed_total(), 0, "{}", server.metrics());
    // ...and closed, both sides, once it has passed (the deadline's tick rounding: +2 ticks).
    turn_until_at(
        &mut server,
        last + idle + Duration::from_millis(20),
        "the close",
        |s| s.metrics().closed_total() == 2,
    );
    let m = server.metrics();
    assert_eq!(m.closed_by(CloseReason::IdleTimeout), 1, "{m}");
    assert_eq!(m.closed_dialed[CloseReason::Handler.index()], 1, "{m}");
    // A client-side timeout of the session in its data phase.
    let line = stats.line();
    assert!(line.contains(" sessions_ended=1{cD=1} "), "{line}");
    let bound = Instant::now() + Duration::from_secs(10);
    loop {
        match try_read(&mut client) {
            Some(0) => break,
            Some(n) => panic!("{n} more bytes after the pushes"),
            None => assert!(Instant::now() < bound, "no EOF"),
        }
        server
            .turn_at(
                last + idle + Duration::from_millis(20),
                Some(Duration::from_millis(10)),
            )
            .unwrap();
    }
}

#[test]
fn proxy_headers_name_the_client_and_the_listener() {
    let c: SocketAddr = "192.0.2.1:4000".parse().unwrap();
    let l: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    let v1 = Proxy::proxy_header(ProxyVersion::V1, c, l);
    assert_eq!(v1, b"PROXY TCP4 192.0.2.1 127.0.0.1 4000 7000\r\n");
    let v2 = Proxy::proxy_header(ProxyVersion::V2, c, l);
    assert_eq!(&v2[..12], b"\r\n\r\n\0\r\nQUIT\n");
    assert_eq!(v2.len(), 16 + 12);
}

#[test]
fn the_dial_failures_help_says_what_it_counts() {
    // A dial refused at the proxy's own cap (or for its own lack of descriptors) is not the
    // upstream's failure and is not counted there: the help must not say it is.
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let mut out = String::new();
    Stats::new(&[addr], 1).write_metrics(&mut out);
    let help = out
        .lines()
        .find(|l| l.starts_with("# HELP sockman_upstream_dial_failures_total "))
        .expect("the dial failures family");
    let counted = help.split('.').next().unwrap();
    assert!(!counted.contains("cap"), "{help}");
    assert!(
        help.contains("refused") && help.contains("timed out"),
        "{help}"
    );
}

/// A proxy (one worker) with `config` in front of the upstream at `up`, and its counters.
fn proxy_server(config: Config, up: SocketAddr) -> (sockman::Server<Proxy>, Arc<Stats>) {
    let stats = Stats::new(&[up], 1);
    let idle = config.idle_timeout;
    let proxy = Proxy::new(
        &[up],
        None,
        3,
        Duration::from_secs(10),
        None,
        idle,
        Arc::clone(&stats),
        0,
    );
    (sockman::Server::bind(config, proxy).unwrap(), stats)
}

/// A client of `addr` whose receive buffer is small (4 KiB, doubled by the kernel), so that a
/// proxy's output to it blocks after a few tens of KiB.
fn small_rcvbuf_client(addr: SocketAddr) -> std::net::TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect(&addr.into()).unwrap();
    s.into()
}

#[test]
fn a_client_closed_for_a_write_stall_takes_its_upstream_with_it_at_once() {
    use std::io::{ErrorKind, Read, Write};
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    upstream.set_nonblocking(true).unwrap();
    let up = upstream.local_addr().unwrap();
    let write_timeout = Duration::from_millis(500);
    // The proxy's own settings (watermarks of zero), small socket buffers, and the default
    // linger timeout (5 s).
    let config = Config {
        listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        tick: Duration::from_millis(10),
        write_timeout,
        recv_buffer: Some(16 * 1024),
        send_buffer: Some(16 * 1024),
        write_high_watermark: Some(0),
        write_low_watermark: Some(0),
        ..Config::default()
    };
    let (mut server, stats) = proxy_server(config, up);
    let t0 = server.now();
    let _client = small_rcvbuf_client(server.local_addrs()[0]);
    let mut pusher = None;
    turn_until_at(&mut server, t0, "upstream connect", |_| {
        pusher = upstream.accept().ok().map(|(s, _)| s);
        pusher.is_some()
    });
    let mut pusher = pusher.unwrap();
    pusher.set_nonblocking(true).unwrap();
    // The upstream writes until it is pushed back (the client reads nothing): 20 turns in a
    // row in which its socket takes nothing and the proxy writes nothing more to the client.
    let chunk = [7u8; 16 * 1024];
    let (mut still, mut last) = (0, u64::MAX);
    turn_until_at(&mut server, t0, "the upstream pushed back", |s| {
        let out = s.metrics().bytes_out;
        let took = match pusher.write(&chunk) {
            Ok(_) => true,
            Err(e) if e.kind() == ErrorKind::WouldBlock => false,
            Err(e) => panic!("the upstream's write: {e}"),
        };
        still = if took || out != last { 0 } else { still + 1 };
        last = out;
        still >= 20 && s.metrics().pending_bytes > 0
    });
    assert_eq!(server.metrics().closed_total(), 0, "{}", server.metrics());
    // The client side is closed for its stall within a few write timeouts (a probe at the
    // deadline that the socket still takes a little of, as acknowledgements free space,
    // restarts the clock), time stepped 100 ms at a time...
    let mut at = t0;
    while server.metrics().closed_total() == 0 {
        at += Duration::from_millis(100);
        assert!(at < t0 + 10 * write_timeout, "{}", server.metrics());
        server.turn_at(at, Some(Duration::ZERO)).unwrap();
    }
    let m = server.metrics();
    assert_eq!(m.closed_by(CloseReason::WriteStall), 1, "{m}");
    // ...and the upstream side with it, in the same turn, without lingering (a linger would
    // read and discard what the upstream still sends, for up to 5 s).
    assert_eq!(m.closed_dialed[CloseReason::Handler.index()], 1, "{m}");
    assert_eq!(m.lingering, 0, "{m}");
    assert_eq!(m.active, 0, "{m}");
    let line = stats.line();
    assert!(line.contains(" sessions_ended=1{cD=1} "), "{line}");
    // The upstream learns at once: a reset (its bytes were unread), not a FIN.
    pusher.set_nonblocking(false).unwrap();
    pusher
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let read = pusher.read(&mut [0; 64]);
    assert!(
        matches!(&read, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "the upstream read {read:?}, not a reset"
    );
}

#[test]
fn a_dial_refused_at_the_proxys_own_cap_ends_its_session_as_the_proxys_doing() {
    // One connection allowed: the client takes it, its dial is refused (PC), not the
    // upstream's failure.
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up = upstream.local_addr().unwrap();
    let config = Config {
        listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        max_connections: Some(1),
        ..Config::default()
    };
    let (mut server, stats) = proxy_server(config, up);
    let t0 = server.now();
    let mut client = std::net::TcpStream::connect(server.local_addrs()[0]).unwrap();
    turn_until_at(&mut server, t0, "the client's close", |s| {
        s.metrics().closed_total() == 1
    });
    let line = stats.line();
    assert!(line.contains(" sessions_ended=1{PC=1} "), "{line}");
    assert!(line.contains(" dial_failures=0 no_upstream=1 "), "{line}");
    client.set_nonblocking(true).unwrap();
    let bound = Instant::now() + Duration::from_secs(10);
    while try_read(&mut client) != Some(0) {
        assert!(Instant::now() < bound, "no EOF");
        server.turn_at(t0, Some(Duration::from_millis(10))).unwrap();
    }
}
