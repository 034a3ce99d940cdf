//! Life behind a balancer, in process over real sockets, with time stepped by `turn_at`: PROXY
//! protocol headers (the client address replaces the peer; LOCAL keeps it; missing, malformed,
//! late and wrong-version headers are refused and counted, each apart; the per-IP cap applies
//! to the header's client), the maximum connection lifetime with its jitter, the first-byte
//! timeout, and readiness during a lame-duck drain delay.
#![cfg(feature = "proxy-protocol")]

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use sockman::{CloseReason, Config, Context, Echo, Handler, ProxyProtocol, RejectReason, Server};
use util::{connect, local_config, read_exactly, step, turn_until_at};

const TICK: Duration = Duration::from_millis(10);

/// Writes back `peer=<address the handler sees>\n` once, then echoes.
#[derive(Default)]
struct WhoAmI;

impl Handler for WhoAmI {
    type Conn = bool;
    fn on_open(&mut self, ctx: &mut Context<'_, bool>) -> bool {
        let line = format!("peer={}\n", ctx.peer());
        ctx.write(line.as_bytes());
        false
    }
    fn on_data(&mut self, _: &mut bool, ctx: &mut Context<'_, bool>, data: &[u8]) {
        ctx.write(data);
    }
}

fn header_config(mode: ProxyProtocol) -> Config {
    Config {
        proxy_protocol: mode,
        tick: TICK,
        ..local_config()
    }
}

/// A [`WhoAmI`] server reading headers of `mode` (turned by the test), its time at the start
/// and a connected client.
#[track_caller]
fn header_server(mode: ProxyProtocol) -> (Server<WhoAmI>, Instant, TcpStream) {
    let (server, addr) = util::bind(header_config(mode), WhoAmI);
    let t0 = server.now();
    (server, t0, connect(addr))
}

fn v2_header(src: SocketAddr, dst: SocketAddr, local: bool) -> Vec<u8> {
    use ppp::v2::{Builder, Command, Protocol, Version};
    let command = if local {
        Command::Local
    } else {
        Command::Proxy
    };
    Builder::with_addresses(Version::Two | command, Protocol::Stream, (src, dst))
        .build()
        .unwrap()
}

/// Reads the `peer=...` line the handler writes first.
#[track_caller]
fn peer_line(stream: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0];
    while line.last() != Some(&b'\n') {
        stream.read_exact(&mut byte).expect("the peer line");
        line.push(byte[0]);
        assert!(line.len() < 200, "no newline");
    }
    String::from_utf8(line).unwrap()
}

#[test]
fn a_v1_header_names_the_client_and_the_data_after_it_is_the_first_data() {
    let (mut server, t0, mut c) = header_server(ProxyProtocol::V1);
    // Header and data in one segment: the data after the header is delivered, not lost.
    c.write_all(b"PROXY TCP4 203.0.113.7 127.0.0.1 40123 7000\r\nhello")
        .unwrap();
    turn_until_at(&mut server, t0, "the open", |s| s.metrics().accepted == 1);
    assert_eq!(peer_line(&mut c), "peer=203.0.113.7:40123\n");
    turn_until_at(&mut server, t0, "the echo", |s| s.metrics().bytes_out >= 5);
    assert_eq!(read_exactly(&mut c, 5), b"hello");
    assert_eq!(server.metrics().awaiting_header, 0);
    util::stop(&mut server);
}

#[test]
fn a_header_its_data_and_the_fin_in_one_edge_are_all_seen() {
    let (mut server, t0, mut c) = header_server(ProxyProtocol::V1);
    // All of it before the server reads anything: one readable edge carries header, data and
    // FIN, and no later edge comes.
    c.write_all(b"PROXY TCP4 203.0.113.9 127.0.0.1 40124 7000\r\nbye")
        .unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    turn_until_at(&mut server, t0, "the close at the peer's EOF", |s| {
        s.metrics().closed_by(CloseReason::PeerClosed) == 1
    });
    assert_eq!(peer_line(&mut c), "peer=203.0.113.9:40124\n");
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
    util::stop(&mut server);
}

#[test]
fn data_that_comes_after_a_header_alone_is_read_on_its_own_edge() {
    let (mut server, t0, mut c) = header_server(ProxyProtocol::V1);
    c.write_all(b"PROXY TCP4 203.0.113.10 127.0.0.1 40125 7000\r\n")
        .unwrap();
    turn_until_at(&mut server, t0, "the open", |s| s.metrics().accepted == 1);
    assert_eq!(peer_line(&mut c), "peer=203.0.113.10:40125\n");
    c.write_all(b"later").unwrap();
    turn_until_at(&mut server, t0, "the echo", |s| s.metrics().bytes_in >= 5);
    assert_eq!(read_exactly(&mut c, 5), b"later");
    util::stop(&mut server);
}

#[test]
fn a_header_in_pieces_is_read_whole() {
    let (mut server, t0, mut c) = header_server(ProxyProtocol::Any);
    let header = v2_header(
        "198.51.100.20:5555".parse().unwrap(),
        "127.0.0.1:7000".parse().unwrap(),
        false,
    );
    for piece in header.chunks(5) {
        c.write_all(piece).unwrap();
        // Each piece is read before the next is sent.
        let before = server.metrics().turns;
        turn_until_at(&mut server, t0, "a turn", |s| {
            s.metrics().turns > before + 1
        });
    }
    turn_until_at(&mut server, t0, "the open", |s| s.metrics().accepted == 1);
    assert_eq!(peer_line(&mut c), "peer=198.51.100.20:5555\n");
    util::stop(&mut server);
}

#[test]
fn a_v2_local_header_keeps_the_sockets_peer() {
    let (mut server, t0, mut c) = header_server(ProxyProtocol::V2);
    let own = c.local_addr().unwrap();
    let header = v2_header(
        "10.0.0.1:1".parse().unwrap(),
        "10.0.0.2:2".parse().unwrap(),
        true,
    );
    c.write_all(&header).unwrap();
    turn_until_at(&mut server, t0, "the open", |s| s.metrics().accepted == 1);
    assert_eq!(peer_line(&mut c), format!("peer={own}\n"));
    util::stop(&mut server);
}

#[test]
fn missing_malformed_wrong_version_and_late_headers_are_refused_and_counted() {
    let (mut server, addr) = util::bind(header_config(ProxyProtocol::V1), WhoAmI);
    let t0 = server.now();
    let mut plain = connect(addr);
    plain.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut bad = connect(addr);
    bad.write_all(b"PROXY TCP4 300.1.1.1 127.0.0.1 1 2\r\n")
        .unwrap();
    let mut v2 = connect(addr);
    v2.write_all(&v2_header(
        "10.0.0.1:1".parse().unwrap(),
        "10.0.0.2:2".parse().unwrap(),
        false,
    ))
    .unwrap();
    let mut late = connect(addr);
    late.write_all(b"PROXY TCP4 10.0.0.1 ").unwrap(); // and never the rest
                                                      // The v2 header is there, of the other version: counted apart from a missing one.
    turn_until_at(&mut server, t0, "three refusals", |s| {
        let m = s.metrics();
        m.rejected_by(RejectReason::ProxyHeaderMissing) == 1
            && m.rejected_by(RejectReason::ProxyHeaderVersion) == 1
            && m.rejected_by(RejectReason::ProxyHeaderInvalid) == 1
    });
    for c in [&mut plain, &mut bad, &mut v2] {
        util::expect_closed(c);
    }
    // The late one waits out the 3 s header timeout, not a tick less.
    assert_eq!(server.metrics().awaiting_header, 1);
    step(&mut server, t0 + Duration::from_millis(3000));
    assert_eq!(
        server
            .metrics()
            .rejected_by(RejectReason::ProxyHeaderTimeout),
        0
    );
    step(&mut server, t0 + Duration::from_millis(3010));
    assert_eq!(
        server
            .metrics()
            .rejected_by(RejectReason::ProxyHeaderTimeout),
        1
    );
    util::expect_closed(&mut late);
    let m = util::stop(&mut server);
    assert_eq!(m.accepted, 0, "none became a connection: {m}");
    assert_eq!(m.awaiting_header, 0);
}

#[test]
fn a_v1_header_on_a_v2_listener_is_of_the_wrong_version_not_missing() {
    let (mut server, t0, mut c) = header_server(ProxyProtocol::V2);
    c.write_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 51000 7000\r\nhello")
        .unwrap();
    turn_until_at(&mut server, t0, "the refusal", |s| {
        s.metrics().rejected.iter().sum::<u64>() == 1
    });
    util::expect_closed(&mut c);
    let m = util::stop(&mut server);
    assert_eq!(m.rejected_by(RejectReason::ProxyHeaderVersion), 1, "{m}");
    assert_eq!(m.rejected_by(RejectReason::ProxyHeaderMissing), 0, "{m}");
    assert_eq!(m.accepted, 0, "{m}");
}

#[test]
fn the_per_ip_cap_counts_the_headers_client_not_the_balancer() {
    let config = Config {
        max_per_ip: 1,
        ..header_config(ProxyProtocol::V1)
    };
    let (mut server, addr) = util::bind(config, WhoAmI);
    let t0 = server.now();
    // All three come from the balancer's one address (127.0.0.1); two carry the same client.
    let header = |ip: &str| format!("PROXY TCP4 {ip} 127.0.0.1 4000 7000\r\n");
    let mut a = connect(addr);
    a.write_all(header("192.0.2.1").as_bytes()).unwrap();
    let mut b = connect(addr);
    b.write_all(header("192.0.2.2").as_bytes()).unwrap();
    turn_until_at(&mut server, t0, "two opens", |s| s.metrics().accepted == 2);
    let mut again = connect(addr);
    again.write_all(header("192.0.2.1").as_bytes()).unwrap();
    turn_until_at(&mut server, t0, "the per-IP refusal", |s| {
        s.metrics().rejected_by(RejectReason::PerIp) == 1
    });
    util::expect_closed(&mut again);
    assert_eq!(peer_line(&mut a), "peer=192.0.2.1:4000\n");
    assert_eq!(peer_line(&mut b), "peer=192.0.2.2:4000\n");
    util::stop(&mut server);
}

#[test]
fn max_lifetime_closes_gracefully_within_its_jitter() {
    let config = Config {
        tick: TICK,
        max_lifetime: Duration::from_secs(10),
        max_lifetime_jitter: Some(Duration::from_secs(1)),
        idle_timeout: Duration::ZERO,
        ..local_config()
    };
    let (mut server, addr) = util::bind(config, Echo);
    let t0 = server.now();
    let mut clients: Vec<TcpStream> = (0..20).map(|_| connect(addr)).collect();
    turn_until_at(&mut server, t0, "20 accepts", |s| {
        s.metrics().accepted == 20
    });
    // None before 10 s - 1 s, all by 10 s + 1 s (+ one tick), and not all at the same tick.
    step(&mut server, t0 + Duration::from_millis(9_000));
    assert_eq!(server.metrics().closed_by(CloseReason::MaxLifetime), 0);
    let mut ticks_with_closes = 0;
    let mut closed = 0;
    for ms in (9_010..=11_010).step_by(10) {
        step(&mut server, t0 + Duration::from_millis(ms));
        let now = server.metrics().closed_by(CloseReason::MaxLifetime);
        if now > closed {
            ticks_with_closes += 1;
            closed = now;
        }
    }
    assert_eq!(closed, 20, "{}", server.metrics());
    assert!(
        ticks_with_closes > 5,
        "the jitter spreads them: {ticks_with_closes} ticks"
    );
    // Graceful: each lingers until its client's EOF, and the client sees a FIN, not a reset.
    for c in &mut clients {
        let mut buf = [0; 8];
        assert_eq!(c.read(&mut buf).unwrap(), 0);
        c.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let t1 = t0 + Duration::from_millis(11_010);
    turn_until_at(&mut server, t1, "the lingers", |s| {
        s.metrics().lingering == 0
    });
    assert_eq!(server.metrics().linger_ends_named("eof"), 20);
    util::stop(&mut server);
}

#[test]
fn a_silent_client_is_closed_at_the_first_byte_timeout_and_a_talker_is_not() {
    let config = Config {
        tick: TICK,
        first_byte_timeout: Duration::from_millis(500),
        ..local_config()
    };
    let (mut server, addr) = util::bind(config, Echo);
    let t0 = server.now();
    let mut silent = connect(addr);
    let mut talker = connect(addr);
    turn_until_at(&mut server, t0, "two accepts", |s| {
        s.metrics().accepted == 2
    });
    talker.write_all(b"x").unwrap();
    turn_until_at(&mut server, t0, "the byte", |s| s.metrics().bytes_in == 1);
    step(&mut server, t0 + Duration::from_millis(500));
    assert_eq!(server.metrics().active, 2);
    step(&mut server, t0 + Duration::from_millis(510));
    assert_eq!(server.metrics().closed_by(CloseReason::FirstByteTimeout), 1);
    assert_eq!(server.metrics().active, 1);
    util::expect_closed(&mut silent);
    assert_eq!(read_exactly(&mut talker, 1), b"x");
    util::stop(&mut server);
}

#[test]
fn a_drain_delay_fails_readiness_at_once_but_keeps_accepting_until_it_is_over() {
    let config = Config {
        tick: TICK,
        drain_delay: Duration::from_secs(2),
        drain_idle: Duration::from_millis(100),
        ..local_config()
    };
    let (mut server, addr) = util::bind(config, Echo);
    let t0 = server.now();
    assert_eq!(server.readiness(), Ok(()));
    server.handle().drain(Duration::from_secs(5));
    turn_until_at(&mut server, t0, "the lame duck", |s| s.readiness().is_err());
    assert_eq!(server.readiness(), Err("draining soon (lame duck)"));
    // Still accepting and serving during the delay.
    let mut late = connect(addr);
    late.write_all(b"still here").unwrap();
    turn_until_at(&mut server, t0, "the late echo", |s| {
        s.metrics().bytes_out == 10
    });
    assert_eq!(read_exactly(&mut late, 10), b"still here");
    step(&mut server, t0 + Duration::from_millis(2_000));
    assert!(!server.local_addrs().is_empty(), "listeners closed early");
    // The delay is over (a full 2 s after the tick the drain was asked in): the drain proper
    // closes the listeners.
    step(&mut server, t0 + Duration::from_millis(2_010));
    assert!(server.local_addrs().is_empty(), "listeners still open");
    assert_eq!(server.readiness(), Err("draining"));
    assert!(
        TcpStream::connect(addr).is_err(),
        "a new connect is refused"
    );
    // The idle connection is closed by the drain after drain-idle.
    late.shutdown(std::net::Shutdown::Write).unwrap();
    turn_until_at(
        &mut server,
        t0 + Duration::from_millis(2_200),
        "the end",
        |s| s.is_stopped(),
    );
}
