//! The admin endpoint of an in-process server: `/metrics` parsed by a real Prometheus text parser
//! with counters that move as connections open and close, `/connections` listing exactly the open
//! connections, `/health`, and bad requests (400, 404, 431) that get an answer and a close without
//! disturbing data connections (the loop on a thread); `/connections` ages and idle times and the
//! admin timeout at virtual times (the test owns the server and steps it with `turn_at`).
//!
//! No `fd_check_interval` here: the test process holds every other test's sockets too.
#![cfg(feature = "admin")]

mod util;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_parse::{LineInfo, Scrape, Value};
use sockman::{Config, Echo, Server};
use util::http;
use util::{bind_with_admin, close_gracefully, connect, echo, local_config, start_with_admin};

/// `/metrics`, checked line by line (every line a comment, a sample or empty: nothing the parser
/// would silently skip) and parsed with `prometheus-parse`.
#[track_caller]
fn scrape(admin: SocketAddr) -> Scrape {
    let r = http::get(admin, "/metrics");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.head
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{}",
        r.head
    );
    for line in r.body.lines() {
        let info = LineInfo::parse(line);
        assert!(
            !matches!(info, LineInfo::Ignored),
            "a line the Prometheus parser does not understand: {line:?}"
        );
        if let LineInfo::Sample { value, .. } = info {
            assert!(
                value.parse::<f64>().is_ok() || value == "+Inf",
                "bad value in {line:?}"
            );
        }
        if line.starts_with("# TYPE ") && line.ends_with(" counter") {
            let name = line.split(' ').nth(2).unwrap();
            assert!(name.ends_with("_total"), "counter {name} without _total");
        }
        if !line.starts_with('#') && !line.is_empty() {
            assert!(
                line.starts_with("sockman_"),
                "not a sockman_* name: {line:?}"
            );
        }
    }
    Scrape::parse(r.body.lines().map(|l| Ok(l.to_owned()))).expect("parse /metrics")
}

/// The value of the sample `name` with exactly `labels` (a counter, gauge or untyped value).
#[track_caller]
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
        .unwrap_or_else(|| panic!("no sample {name}{labels:?} in /metrics"));
    match &sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{name} is not a plain value: {other:?}"),
    }
}

/// Asserts the sample kind: counters as counters, gauges as gauges.
#[track_caller]
fn assert_kind(scrape: &Scrape, name: &str, counter: bool) {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == name)
        .unwrap_or_else(|| panic!("no sample {name} in /metrics"));
    match (&sample.value, counter) {
        (Value::Counter(_), true) | (Value::Gauge(_), false) => {}
        (other, _) => panic!("{name}: unexpected kind {other:?}"),
    }
}

/// The lifetime histogram: cumulative bucket counts, ending with +Inf.
#[track_caller]
fn lifetimes(scrape: &Scrape) -> Vec<(f64, f64)> {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == "sockman_connection_lifetime_seconds")
        .expect("no lifetime histogram in /metrics");
    let Value::Histogram(buckets) = &sample.value else {
        panic!("the lifetime is not a histogram: {:?}", sample.value);
    };
    let buckets: Vec<(f64, f64)> = buckets.iter().map(|b| (b.less_than, b.count)).collect();
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "buckets not increasing and cumulative: {buckets:?}"
    );
    assert_eq!(
        buckets.last().map(|b| b.0),
        Some(f64::INFINITY),
        "{buckets:?}"
    );
    buckets
}

fn field(line: &str, key: &str) -> u64 {
    util::stat(line, key).unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// Echoes `n` bytes on `stream` (so the server has accepted it and stamped activity).
#[track_caller]
fn ping(stream: &mut TcpStream, seed: u64) {
    echo(stream, &util::pattern(16, seed));
}

#[test]
fn metrics_parse_and_counters_move_as_connections_open_and_close() {
    let (server, admin) = start_with_admin(local_config(), Echo);

    let s = scrape(admin);
    for (name, counter) in [
        ("sockman_connections_active", false),
        ("sockman_connections_peak", false),
        ("sockman_connections_max", false),
        ("sockman_fd_limit", false),
        ("sockman_accepted_total", true),
        ("sockman_received_bytes_total", true),
        ("sockman_sent_bytes_total", true),
        ("sockman_pending_output_bytes", false),
        ("sockman_accept_pauses_total", true),
        ("sockman_loop_turns_total", true),
        ("sockman_loop_events_total", true),
    ] {
        assert_kind(&s, name, counter);
    }
    assert_eq!(value(&s, "sockman_connections_active", &[]), 0.0);
    assert_eq!(value(&s, "sockman_accepted_total", &[]), 0.0);
    assert_eq!(
        value(&s, "sockman_closed_total", &[("reason", "peer_closed")]),
        0.0
    );
    assert_eq!(
        value(&s, "sockman_rejected_total", &[("reason", "full")]),
        0.0
    );
    assert_eq!(lifetimes(&s).last().unwrap().1, 0.0);
    let turns_before = value(&s, "sockman_loop_turns_total", &[]);

    // Three connections, each echoes 16 bytes: once `echo` returns the server has admitted it.
    let mut clients: Vec<TcpStream> = (0..3).map(|_| connect(server.addr)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        ping(c, i as u64);
    }
    let s = scrape(admin);
    assert_eq!(value(&s, "sockman_connections_active", &[]), 3.0);
    assert_eq!(value(&s, "sockman_connections_peak", &[]), 3.0);
    assert_eq!(value(&s, "sockman_accepted_total", &[]), 3.0);
    assert_eq!(value(&s, "sockman_received_bytes_total", &[]), 48.0);
    assert_eq!(value(&s, "sockman_sent_bytes_total", &[]), 48.0);
    assert!(value(&s, "sockman_loop_turns_total", &[]) > turns_before);
    assert_eq!(lifetimes(&s).last().unwrap().1, 0.0, "nothing closed yet");

    // Two close politely: when `close_gracefully` returns, the server has closed its side.
    let third = clients.pop().unwrap();
    for c in clients {
        close_gracefully(c);
    }
    let s = scrape(admin);
    assert_eq!(value(&s, "sockman_connections_active", &[]), 1.0);
    assert_eq!(value(&s, "sockman_connections_peak", &[]), 3.0);
    assert_eq!(value(&s, "sockman_accepted_total", &[]), 3.0);
    assert_eq!(
        value(&s, "sockman_closed_total", &[("reason", "peer_closed")]),
        2.0
    );
    let hist = lifetimes(&s);
    assert_eq!(hist.last().unwrap().1, 2.0, "{hist:?}");
    assert_eq!(
        value(&s, "sockman_connection_lifetime_seconds_count", &[]),
        2.0
    );
    assert!(value(&s, "sockman_connection_lifetime_seconds_sum", &[]) >= 0.0);

    close_gracefully(third);
    let s = scrape(admin);
    assert_eq!(value(&s, "sockman_connections_active", &[]), 0.0);
    assert_eq!(
        value(&s, "sockman_closed_total", &[("reason", "peer_closed")]),
        3.0
    );
    assert_eq!(lifetimes(&s).last().unwrap().1, 3.0);
    // Admin requests are never data connections.
    assert_eq!(value(&s, "sockman_accepted_total", &[]), 3.0);

    let m = server.stop();
    assert_eq!(m.accepted, 3, "{m}");
    assert_eq!(m.closed_total(), 3, "{m}");
}

/// [`http::connections`] while the test turns `server` at the virtual time `now`.
#[track_caller]
fn connections_at(
    server: &mut Server<Echo>,
    now: Instant,
    admin: SocketAddr,
    query: &str,
) -> Vec<(SocketAddr, String)> {
    let query = query.to_string();
    util::turn_while_at(server, now, "a /connections answer", move || {
        http::connections(admin, &query)
    })
}

/// `GET target` while the test turns `server` at the virtual time `now`.
#[track_caller]
fn get_at(
    server: &mut Server<Echo>,
    now: Instant,
    admin: SocketAddr,
    target: &str,
) -> http::Response {
    let target = target.to_string();
    util::turn_while_at(server, now, "an admin answer", move || {
        http::get(admin, &target)
    })
}

/// Echoes 16 bytes on `stream`, turning `server` at the virtual time `at`: the server has
/// accepted the connection and stamped its activity with `at`.
#[track_caller]
fn ping_at(server: &mut Server<Echo>, at: Instant, stream: &mut TcpStream, seed: u64) {
    let msg = util::pattern(16, seed);
    let out = server.metrics().bytes_out;
    stream.write_all(&msg).unwrap();
    util::turn_until_at(server, at, "the echo of a ping", |s| {
        s.metrics().bytes_out == out + 16
    });
    util::assert_same(&util::read_exactly(stream, 16), &msg);
}

/// [`close_gracefully`] while the test turns `server` at the virtual time `now`.
#[track_caller]
fn close_gracefully_at(server: &mut Server<Echo>, now: Instant, stream: TcpStream) {
    util::turn_while_at(server, now, "a graceful close", move || {
        close_gracefully(stream)
    });
}

/// `/connections` at virtual times: with the default 10 ms tick, `age_ms` and `idle_ms` are whole
/// ticks, so they are asserted exactly.
#[test]
fn connections_lists_exactly_the_open_ones_and_sorts_by_idle() {
    let (mut server, addr, admin) = bind_with_admin(local_config(), Echo);
    let t0 = server.now();
    assert!(
        connections_at(&mut server, t0, admin, "").is_empty(),
        "no connection yet"
    );

    // `oldest` is accepted and active at t0; the others at t0 + 60ms; the listing is asked for
    // at t0 + 100ms: `oldest` is idle 100 ms, the others 40 ms.
    let mut oldest = connect(addr);
    ping_at(&mut server, t0, &mut oldest, 0);
    let t1 = t0 + Duration::from_millis(60);
    let mut others: Vec<TcpStream> = (0..3).map(|_| connect(addr)).collect();
    for (i, c) in others.iter_mut().enumerate() {
        ping_at(&mut server, t1, c, i as u64 + 1);
    }
    let tq = t0 + Duration::from_millis(100);

    let want: BTreeSet<SocketAddr> = std::iter::once(&oldest)
        .chain(&others)
        .map(|c| c.local_addr().unwrap())
        .collect();
    let listed = connections_at(&mut server, tq, admin, "");
    let got: BTreeSet<SocketAddr> = listed.iter().map(|(p, _)| *p).collect();
    assert_eq!(listed.len(), 4, "{listed:#?}");
    assert_eq!(got, want, "{listed:#?}");
    for (peer, line) in &listed {
        for key in [
            "id",
            "age_ms",
            "idle_ms",
            "bytes_in",
            "bytes_out",
            "pending",
        ] {
            assert!(line.contains(&format!("{key}=")), "no {key} in {line:?}");
        }
        assert_eq!(field(line, "bytes_in"), 16, "{line}");
        assert_eq!(field(line, "bytes_out"), 16, "{line}");
        assert_eq!(field(line, "pending"), 0, "{line}");
        assert!(line.ends_with("state=open"), "{line}");
        let ms = if *peer == oldest.local_addr().unwrap() {
            100
        } else {
            40
        };
        assert_eq!(field(line, "age_ms"), ms, "{line}");
        assert_eq!(field(line, "idle_ms"), ms, "{line}");
    }

    // The longest idle, alone.
    let top = connections_at(&mut server, tq, admin, "?limit=1&sort=idle");
    assert_eq!(top.len(), 1, "{top:#?}");
    assert_eq!(top[0].0, oldest.local_addr().unwrap(), "{top:#?}");
    assert_eq!(field(&top[0].1, "idle_ms"), 100, "{top:#?}");
    // Sorted by idle, longest first.
    let sorted = connections_at(&mut server, tq, admin, "?sort=idle");
    assert_eq!(sorted.len(), 4);
    assert_eq!(sorted[0].0, oldest.local_addr().unwrap(), "{sorted:#?}");
    let idles: Vec<u64> = sorted.iter().map(|(_, l)| field(l, "idle_ms")).collect();
    assert_eq!(idles, [100, 40, 40, 40], "{sorted:#?}");
    assert_eq!(connections_at(&mut server, tq, admin, "?limit=2").len(), 2);

    // A closed connection leaves the list; the rest stay.
    let gone = others.pop().unwrap();
    let gone_addr = gone.local_addr().unwrap();
    close_gracefully_at(&mut server, tq, gone);
    let listed = connections_at(&mut server, tq, admin, "");
    let got: BTreeSet<SocketAddr> = listed.iter().map(|(p, _)| *p).collect();
    let mut want = want;
    want.remove(&gone_addr);
    assert_eq!(got, want, "{listed:#?}");

    // Bad query parameters are a 400, not a panic.
    assert_eq!(
        get_at(&mut server, tq, admin, "/connections?limit=x").status,
        400
    );
    assert_eq!(
        get_at(&mut server, tq, admin, "/connections?sort=age").status,
        400
    );

    close_gracefully_at(&mut server, tq, oldest);
    for c in others {
        close_gracefully_at(&mut server, tq, c);
    }
    assert!(connections_at(&mut server, tq, admin, "").is_empty());
    let m = util::stop_at(&mut server, tq);
    assert_eq!(m.accepted, 4, "{m}");
    assert_eq!(m.closed_total(), 4, "admin requests counted as data: {m}");
}

/// The admin endpoint's own lifetime limit (`ADMIN_TIMEOUT` in `src/admin/http.rs`, not
/// configurable).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A silent admin connection is closed after the admin timeout, at virtual times. The loop's
/// only deadline here is that connection's, so `poll_delay` is `Some` exactly while it is open.
/// Accepted at t0 (the start of tick 0): open one tick before the timeout, closed one tick
/// after it. The tick at the timeout itself is left out: by the rounding rule (`stamp + ticks +
/// 1`) it would still be open there, but the admin deadline has no `+ 1` tick (see
/// `found_by_timing.rs`), so this test asserts only what holds either way.
#[test]
fn a_silent_admin_connection_is_closed_after_the_admin_timeout() {
    const TICK: Duration = Duration::from_millis(10);
    let (mut server, _addr, admin) = bind_with_admin(
        Config {
            tick: TICK,
            ..local_config()
        },
        Echo,
    );
    let t0 = server.now();
    assert_eq!(
        server.poll_delay(t0),
        None,
        "a deadline before any connection"
    );
    let mut client = connect(admin);
    util::turn_until_at(&mut server, t0, "the admin accept", |s| {
        s.poll_delay(t0).is_some()
    });
    let before = t0 + ADMIN_TIMEOUT - TICK;
    util::step_to(&mut server, before);
    assert!(
        server.poll_delay(before).is_some(),
        "closed a tick before the admin timeout"
    );
    util::assert_open(&mut client);
    let after = t0 + ADMIN_TIMEOUT + TICK;
    util::step_to(&mut server, after);
    assert_eq!(
        server.poll_delay(after),
        None,
        "still open a tick after the admin timeout"
    );
    util::expect_closed(&mut client);
    // The endpoint still answers, and no admin connection counts as a data connection.
    assert_eq!(get_at(&mut server, after, admin, "/health").status, 200);
    let m = util::stop_at(&mut server, after);
    assert_eq!(m.accepted, 0, "{m}");
}

#[test]
fn bad_requests_get_an_answer_and_a_close_and_data_connections_are_undisturbed() {
    let (server, admin) = start_with_admin(local_config(), Echo);
    assert_eq!(http::get(admin, "/health").status, 200);
    assert_eq!(http::get(admin, "/health").body, "ok\n");

    // A data connection echoing without pause on another thread for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let mut data = connect(server.addr);
    let pinger = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut rounds = 0u64;
            let deadline = Instant::now() + util::WAIT;
            // At least one round even if the main thread is done first (a loaded CI machine).
            while (rounds == 0 || !stop.load(Ordering::Acquire))
                && Instant::now() < deadline
                && rounds < 1_000_000
            {
                let msg = util::pattern(64, rounds);
                data.write_all(&msg).expect("data connection: write");
                let back = util::read_exactly(&mut data, msg.len());
                util::assert_same(&back, &msg);
                rounds += 1;
            }
            (data, rounds)
        })
    };

    let malformed: [&[u8]; 4] = [
        b"NOT A REQUEST\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nthis is no header\r\n\r\n",
        b"\x00\x01\x02\x03\xff\xfe\r\n\r\n",
        b"GET /metrics HTTP/9\r\n\r\n",
    ];
    for req in malformed {
        let r = http::raw(admin, req);
        assert_eq!(
            r.status,
            400,
            "for {:?}: {r:?}",
            String::from_utf8_lossy(req)
        );
        assert!(r.closed);
        assert!(r.head.contains("Connection: close"), "{}", r.head);
    }

    // Unknown path.
    let r = http::get(admin, "/nope");
    assert_eq!(r.status, 404, "{r:?}");
    // Over 8 KiB of headers: 431.
    let big = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(9 * 1024)
    );
    let r = http::raw(admin, big.as_bytes());
    assert_eq!(r.status, 431, "{r:?}");
    // More headers than the parser takes: 431 as well.
    let many: String = (0..40).map(|i| format!("X-H{i}: v\r\n")).collect();
    let r = http::raw(
        admin,
        format!("GET /health HTTP/1.1\r\n{many}\r\n").as_bytes(),
    );
    assert_eq!(r.status, 431, "{r:?}");
    // A request cut short (the client half-closes mid-head): closed without an answer or a panic.
    let mut cut = connect(admin);
    cut.write_all(b"GET /metr").unwrap();
    cut.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = cut.read_to_end(&mut rest);
    assert!(
        rest.is_empty() || rest.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&rest)
    );

    // The endpoint still answers, and the data connection never noticed.
    assert_eq!(http::get(admin, "/health").status, 200);
    stop.store(true, Ordering::Release);
    let (data, rounds) = pinger.join().expect("the data connection failed");
    assert!(rounds > 0, "the data connection never echoed");
    let s = scrape(admin);
    assert_eq!(value(&s, "sockman_connections_active", &[]), 1.0);
    assert_eq!(value(&s, "sockman_accepted_total", &[]), 1.0);
    close_gracefully(data);
    let m = server.stop();
    assert_eq!(m.accepted, 1, "{m}");
    assert_eq!(m.closed_total(), 1, "admin requests counted as data: {m}");
    eprintln!("data connection echoed {rounds} times during the bad requests");
}

/// What a client that sends `GET /livez` reads until the server closes (possibly nothing: a
/// newcomer turned away is closed unanswered), while the test turns `server` at `now`.
#[track_caller]
fn livez_text_at(server: &mut Server<Echo>, now: Instant, admin: SocketAddr) -> String {
    util::turn_while_at(server, now, "a /livez attempt", move || {
        let mut c = connect(admin);
        c.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut text = Vec::new();
        let _ = c.read_to_end(&mut text); // EOF, or a reset: either ends the attempt
        String::from_utf8_lossy(&text).into_owned()
    })
}

/// Every admin slot held by a client that sent one byte of a request: the slots are not
/// silent, yet none completes a request. Within a short time (1 s) they keep their slots; past
/// it the oldest yields to a newcomer, so `/livez` gets in long before the admin timeout (5 s)
/// would free them.
#[test]
fn admin_slots_held_by_one_byte_requests_yield_to_a_newcomer_after_a_second() {
    const SLOTS: usize = 16; // `limits::ADMIN_CONNS`
    let (mut server, _addr, admin) = bind_with_admin(local_config(), Echo);
    let t0 = server.now();
    let mut holders: Vec<TcpStream> = (0..SLOTS)
        .map(|_| {
            let mut c = connect(admin);
            c.write_all(b"G").unwrap();
            c
        })
        .collect();
    util::turn_until_at(&mut server, t0, "the admin accepts", |s| {
        s.poll_delay(t0).is_some()
    });
    // The bytes were queued before the accepts: the reads come with the next polls.
    for _ in 0..3 {
        util::step(&mut server, t0);
    }
    let young = livez_text_at(&mut server, t0 + Duration::from_millis(500), admin);
    assert_eq!(young, "", "a slot half a second into its request was taken");
    let later = t0 + Duration::from_millis(1100);
    let answer = livez_text_at(&mut server, later, admin);
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "/livez locked out by {SLOTS} one-byte requests a second old: {answer:?}"
    );
    // Exactly one holder made room (the oldest); the others keep their slots.
    let mut closed = 0;
    for c in &mut holders {
        c.set_nonblocking(true).unwrap();
        match c.read(&mut [0; 64]) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("a holder read {other:?}"),
        }
    }
    assert_eq!(closed, 1, "holders closed to make room");
    util::stop_at(&mut server, later);
}
