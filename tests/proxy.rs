//! `sockman proxy` over real sockets: the proxy runs as a child (its fds, its log, its signals
//! are its own), in front of an in-process echo server on a thread, a `sockman serve` child
//! (when a test kills it) or a small std-thread upstream (when a test needs an upstream that
//! half-closes, never accepts or streams without end). Every session is checked byte for byte
//! and every close is checked in the proxy's `/metrics`.
//!
//! The heavy ones (5 000 idle sessions, 50 000 churned sessions) are in `proxy_load.rs`, their
//! own process.
#![cfg(feature = "cli")]

mod util;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use sockman::CloseReason;
use util::child::is_stats;
use util::procfs::rss_kib;
use util::proxy::{serve_child, Proxy};
use util::{
    accept_within, assert_same, connect, expect_closed, pattern, read_to_eof, refused_port,
    silent_listener, stat,
};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

#[test]
fn echoes_byte_exact_through_the_proxy_on_several_connections_and_sizes() {
    const CONNS: usize = 6;
    const SIZES: [usize; 6] = [1, 100, 1460, 16 * KIB, 200 * KIB, MIB];
    let upstream = util::start(util::local_config(), sockman::Echo);
    let proxy = Proxy::spawn(upstream.addr, &[]);

    let mut streams: Vec<TcpStream> = (0..CONNS).map(|_| connect(proxy.addr)).collect();
    // All connections at once, each through every size, each message its own pattern.
    thread::scope(|s| {
        for (i, stream) in streams.iter_mut().enumerate() {
            s.spawn(move || {
                for (j, &size) in SIZES.iter().enumerate() {
                    util::echo(stream, &pattern(size, (i * SIZES.len() + j) as u64));
                }
            });
        }
    });
    let m = proxy.scrape();
    assert_eq!(m.get(&proxy.up("sessions_active")), CONNS as i64, "{m}");
    assert_eq!(m.get("sockman_connections_active"), CONNS as i64, "{m}");
    assert_eq!(
        m.get("sockman_connections_dialed_active"),
        CONNS as i64,
        "{m}"
    );

    for stream in streams {
        util::close_gracefully(stream);
    }
    let m = proxy.wait_idle("every session to end");
    let bytes = (CONNS * SIZES.iter().sum::<usize>()) as i64;
    assert_eq!(m.get(&proxy.up("sessions_total")), CONNS as i64, "{m}");
    assert_eq!(m.get(&proxy.up("sent_bytes_total")), bytes, "{m}");
    assert_eq!(m.get(&proxy.up("received_bytes_total")), bytes, "{m}");
    assert_eq!(m.get(&proxy.up("dial_failures_total")), 0, "{m}");
    // The client's FIN went on to the upstream, whose FIN ended the session: the upstream side
    // closed on its peer's EOF, the client side by the proxy after it.
    assert_eq!(
        m.dialed_closed(CloseReason::PeerClosed),
        CONNS as i64,
        "{m}"
    );
    assert_eq!(m.closed(CloseReason::Handler), CONNS as i64, "{m}");
    assert_eq!(m.closed_all(), CONNS as i64, "{m}");
    assert_eq!(m.dialed_closed_all(), CONNS as i64, "{m}");
    assert_eq!(m.ended("--"), CONNS as i64, "{m}");

    let um = upstream.stop();
    assert_eq!(um.accepted, CONNS as u64, "{um}");
    assert_eq!(um.closed_by(CloseReason::PeerClosed), CONNS as u64, "{um}");
}

#[test]
fn counters_add_up_per_side_in_the_stats_line_and_in_metrics() {
    // The run: sessions that each send a line, read the reply and close. Each side
    // is told apart and adds up: the client side (accepted) and the upstream side (dialed).
    const N: u64 = 20;
    let upstream = util::start(util::local_config(), sockman::Echo);
    let mut proxy = Proxy::spawn(upstream.addr, &[]);
    for i in 0..N {
        let mut c = connect(proxy.addr);
        util::echo(&mut c, format!("line {i:02}\n").as_bytes()); // 8 bytes
        util::close_gracefully(c);
    }
    let m = proxy.wait_idle("every session to end");
    let (n, bytes) = (N as i64, 8 * N as i64);
    for (name, want) in [
        ("sockman_accepted_total", n),
        ("sockman_dialed_total", n),
        ("sockman_connected_total", n),
        ("sockman_received_bytes_total", bytes),
        ("sockman_sent_bytes_total", bytes),
        ("sockman_dialed_received_bytes_total", bytes),
        ("sockman_dialed_sent_bytes_total", bytes),
    ] {
        assert_eq!(m.get(name), want, "{name}: {m}");
    }
    assert_eq!(m.closed_all(), n, "{m}");
    assert_eq!(m.dialed_closed_all(), n, "{m}");
    // Every session ended normally (both FINs), though the proxy closed each client side
    // itself (`handler`) after its upstream's FIN.
    assert_eq!(m.ended("--"), n, "{m}");
    assert_eq!(m.ended_all(), n, "{m}");
    // The stats line says the same, with one name per thing.
    let line = proxy.bin.wait_line("a stats line after the sessions", |l| {
        is_stats(l) && stat(l, "closed") == Some(N) && stat(l, "dialed_closed") == Some(N)
    });
    for (key, want) in [
        ("active", 0),
        ("accepted", N),
        ("closed", N),
        ("bytes_in", 8 * N),
        ("bytes_out", 8 * N),
        ("dialed", N),
        ("connected", N),
        ("active_dialed", 0),
        ("dialed_closed", N),
        ("dialed_bytes_in", 8 * N),
        ("dialed_bytes_out", 8 * N),
        ("dial_failures", 0),
        ("sessions", N),
        ("sessions_ended", N),
        ("--", N),
    ] {
        assert_eq!(stat(&line, key), Some(want), "{key}: {line}");
    }
    assert!(!line.contains("dial_failed"), "{line}");
    upstream.stop();
}

#[test]
fn a_client_half_close_after_1_mib_gets_1_mib_back_then_eof() {
    let upstream = util::start(util::local_config(), sockman::Echo);
    let proxy = Proxy::spawn(upstream.addr, &[]);
    let data = pattern(MIB, 21);

    let mut client = connect(proxy.addr);
    let mut reader = client.try_clone().unwrap();
    let echoed = thread::spawn(move || read_to_eof(&mut reader, 2 * MIB));
    client.write_all(&data).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    // The reader ends only at EOF: 1 MiB, the same bytes, then EOF.
    let got = echoed.join().unwrap().expect("reading the echo until EOF");
    assert_same(&got, &data);

    let m = proxy.wait_idle("the session to end");
    assert_eq!(m.get(&proxy.up("sent_bytes_total")), MIB as i64, "{m}");
    assert_eq!(m.get(&proxy.up("received_bytes_total")), MIB as i64, "{m}");
    assert_eq!(m.dialed_closed(CloseReason::PeerClosed), 1, "{m}");
    assert_eq!(m.closed_all(), 1, "{m}");
    assert_eq!(m.dialed_closed_all(), 1, "{m}");
    assert_eq!(m.ended("--"), 1, "{m}");
    upstream.stop();
}

#[test]
fn an_upstream_half_close_reaches_the_client_while_the_client_still_sends() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = listener.local_addr().unwrap();
    let from_upstream = pattern(MIB, 22);
    let from_client = pattern(MIB, 23);

    // The upstream: writes 1 MiB and shuts down its write side while it reads until EOF.
    let to_send = from_upstream.clone();
    let upstream = thread::spawn(move || {
        let mut stream = accept_within(&listener, util::WAIT);
        let mut writer = stream.try_clone().unwrap();
        let wrote = thread::spawn(move || {
            writer.write_all(&to_send)?;
            writer.shutdown(Shutdown::Write)
        });
        let got = read_to_eof(&mut stream, 2 * MIB);
        wrote
            .join()
            .unwrap()
            .expect("the upstream's write and shutdown");
        got.expect("the upstream reading until EOF")
    });
    let proxy = Proxy::spawn(up_addr, &[]);

    let mut client = connect(proxy.addr);
    let mut reader = client.try_clone().unwrap();
    let (eof_tx, eof_rx) = mpsc::channel();
    let received = thread::spawn(move || {
        let got = read_to_eof(&mut reader, 2 * MIB);
        let _ = eof_tx.send(());
        got
    });
    // Half of the client's bytes, then the upstream's whole stream and its FIN must arrive while
    // the client's direction is still open; then the other half and the client's FIN.
    client.write_all(&from_client[..MIB / 2]).unwrap();
    eof_rx.recv_timeout(util::WAIT).unwrap_or_else(|_| {
        panic!("the upstream's 1 MiB and EOF did not reach the client while it was still sending")
    });
    let got = received
        .join()
        .unwrap()
        .expect("the client reading until EOF");
    assert_same(&got, &from_upstream);
    client.write_all(&from_client[MIB / 2..]).unwrap();
    client.shutdown(Shutdown::Write).unwrap();

    let upstream_got = upstream.join().expect("the upstream thread failed");
    assert_same(&upstream_got, &from_client);
    let m = proxy.wait_idle("the session to end");
    assert_eq!(m.get(&proxy.up("sent_bytes_total")), MIB as i64, "{m}");
    assert_eq!(m.get(&proxy.up("received_bytes_total")), MIB as i64, "{m}");
    // The upstream's FIN came first: the proxy closed the upstream side after the client's FIN.
    assert_eq!(m.closed(CloseReason::PeerClosed), 1, "{m}");
    assert_eq!(m.dialed_closed(CloseReason::Handler), 1, "{m}");
    assert_eq!(m.closed_all(), 1, "{m}");
    assert_eq!(m.dialed_closed_all(), 1, "{m}");
    assert_eq!(m.ended("--"), 1, "{m}");
}

#[test]
fn a_refused_upstream_closes_the_client_promptly_and_counts_it() {
    const CLIENTS: i64 = 3;
    let (_bound, dead) = refused_port();
    let mut proxy = Proxy::spawn(dead, &[]);
    for i in 0..CLIENTS {
        let started = Instant::now();
        let mut client = connect(proxy.addr);
        expect_closed(&mut client);
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "client {i} closed only after {took:?}"
        );
    }
    let m = proxy.wait_metrics("every refused dial counted", |m| {
        m.get("sockman_proxy_no_upstream_total") == CLIENTS
    });
    assert_eq!(m.get(&proxy.up("dial_failures_total")), CLIENTS, "{m}");
    assert_eq!(m.get(&proxy.up("dials_total")), CLIENTS, "{m}");
    assert_eq!(m.dialed_closed(CloseReason::ConnectRefused), CLIENTS, "{m}");
    assert_eq!(m.get(&proxy.up("sessions_total")), 0, "{m}");
    // Each session ended with its dial refused: the upstream's doing, while connecting.
    assert_eq!(m.ended("SC"), CLIENTS, "{m}");
    assert_eq!(m.ended_all(), CLIENTS, "{m}");
    // Three failures in a row (--upstream-max-fails 3) mark it down once.
    assert_eq!(m.get(&proxy.up("marked_down_total")), 1, "{m}");
    let line = proxy
        .bin
        .wait_line("a stats line counting the refusals", |l| {
            is_stats(l) && stat(l, "no_upstream") == Some(CLIENTS as u64)
        });
    assert_eq!(stat(&line, "dial_failures"), Some(CLIENTS as u64), "{line}");
    assert_eq!(stat(&line, "sessions"), Some(0), "{line}");
    assert_eq!(
        stat(&line, "connect_refused"),
        Some(CLIENTS as u64),
        "{line}"
    );
    assert_eq!(stat(&line, "SC"), Some(CLIENTS as u64), "{line}");
}

#[test]
fn an_upstream_that_never_completes_the_handshake_times_out_and_closes_the_client() {
    let (_listener, silent, _fillers) = silent_listener();
    let proxy = Proxy::spawn(silent, &["--connect-timeout", "300ms"]);
    let started = Instant::now();
    let mut client = connect(proxy.addr);
    // The client's bytes wait: none goes to a dial that has not completed.
    client.write_all(b"hello?").unwrap();
    expect_closed(&mut client);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(290),
        "client closed after {took:?}, before the 300ms connect timeout"
    );
    assert!(
        took < Duration::from_secs(3),
        "client closed only after {took:?}"
    );
    drop(client); // its FIN ends the proxy's linger on the client side
    let m = proxy.wait_idle("the timed-out session to end");
    assert_eq!(m.dialed_closed(CloseReason::ConnectTimeout), 1, "{m}");
    assert_eq!(m.get("sockman_proxy_no_upstream_total"), 1, "{m}");
    assert_eq!(m.get(&proxy.up("dial_failures_total")), 1, "{m}");
    assert_eq!(m.get(&proxy.up("sent_bytes_total")), 0, "{m}");
    assert_eq!(m.get("sockman_connections_connecting"), 0, "{m}");
    // A server-side timeout while connecting.
    assert_eq!(m.ended("sC"), 1, "{m}");
}

#[test]
fn a_client_closed_while_its_dial_is_in_flight_does_not_count_against_the_upstream() {
    const CLIENTS: i64 = 3;
    // The dial hangs (full backlog, 5 s connect timeout); the idle timeout closes each client
    // first, and the proxy abandons its dial. The upstream did not fail: it was not given time.
    let (_listener, silent, _fillers) = silent_listener();
    let proxy = Proxy::spawn(
        silent,
        &["--idle-timeout", "300ms", "--connect-timeout", "5s"],
    );
    for i in 0..CLIENTS {
        let started = Instant::now();
        let mut client = connect(proxy.addr);
        expect_closed(&mut client);
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "client {i} closed after {took:?}, not at its idle timeout"
        );
    }
    let m = proxy.wait_idle("the abandoned dials to end");
    assert_eq!(m.closed(CloseReason::IdleTimeout), CLIENTS, "{m}");
    assert_eq!(m.dialed_closed(CloseReason::Handler), CLIENTS, "{m}");
    assert_eq!(m.dialed_closed(CloseReason::ConnectTimeout), 0, "{m}");
    // A client-side timeout while connecting, not the upstream's doing.
    assert_eq!(m.ended("cC"), CLIENTS, "{m}");
    assert_eq!(m.get(&proxy.up("dials_total")), CLIENTS, "{m}");
    assert_eq!(
        m.get(&proxy.up("dial_failures_total")),
        0,
        "dials the proxy abandoned were counted as failures of the upstream\n{m}"
    );
    assert_eq!(
        m.get(&proxy.up("marked_down_total")),
        0,
        "the upstream was marked down for dials the proxy abandoned\n{m}"
    );
    assert_eq!(m.get("sockman_proxy_no_upstream_total"), 0, "{m}");
}

/// A client that streams 4 KiB chunks of a 1 MiB pattern, cyclically, until told to stop or a
/// write fails; returns the bytes sent. Writes have a short timeout so that the stop flag is seen
/// even when the proxy no longer reads.
fn stream_cyclic(mut stream: TcpStream, data: Arc<Vec<u8>>, stop: Arc<AtomicBool>) -> u64 {
    const CHUNK: usize = 4 * KIB;
    const MAX: u64 = 256 << 20;
    stream
        .set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut sent = 0u64;
    while !stop.load(Ordering::Acquire) && sent < MAX {
        let at = (sent as usize) % data.len();
        let end = (at + CHUNK).min(data.len());
        match stream.write(&data[at..end]) {
            Ok(n) => sent += n as u64,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return sent,
        }
        // Pacing (about 2 MB/s), not synchronisation: a steady stream, not a saturating one.
        thread::sleep(Duration::from_millis(2));
    }
    let _ = stream.shutdown(Shutdown::Write);
    sent
}

#[test]
fn an_upstream_killed_mid_stream_closes_the_client_within_a_second() {
    let (mut serve, up_addr) = serve_child(&[]);
    let proxy = Proxy::spawn(up_addr, &[]);
    let data = Arc::new(pattern(MIB, 5));
    let stop = Arc::new(AtomicBool::new(false));

    let client = connect(proxy.addr);
    let mut reader = client.try_clone().unwrap();
    let writer = {
        let (data, stop) = (Arc::clone(&data), Arc::clone(&stop));
        thread::spawn(move || stream_cyclic(client, data, stop))
    };
    let (streaming_tx, streaming_rx) = mpsc::channel();
    let expected = Arc::clone(&data);
    let reader = thread::spawn(move || {
        let mut got = 0usize;
        let mut buf = vec![0; 64 * KIB];
        let mut told = false;
        let end = loop {
            match reader.read(&mut buf) {
                Ok(0) => break "eof".to_string(),
                Ok(n) => {
                    for (k, &b) in buf[..n].iter().enumerate() {
                        let at = (got + k) % expected.len();
                        assert_eq!(b, expected[at], "echoed byte {} differs", got + k);
                    }
                    got += n;
                    if got >= 256 * KIB && !told {
                        told = true;
                        let _ = streaming_tx.send(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break e.to_string(),
                Err(e) => panic!("the client's read after {got} bytes: {e}"),
            }
        };
        (got, end, Instant::now())
    });

    streaming_rx
        .recv_timeout(util::WAIT)
        .expect("256 KiB did not come back through the proxy");
    let killed_at = Instant::now();
    serve.child.kill().expect("SIGKILL the upstream");
    serve.child.wait().unwrap();
    let (got, end, ended_at) = reader.join().expect("the client's reader failed");
    let took = ended_at - killed_at;
    assert!(
        took < Duration::from_secs(1),
        "the client saw {end} only {took:?} after the upstream was killed ({got} bytes echoed)"
    );

    // The upstream side ends with a reset (its socket is gone) or its EOF, whichever the kernel
    // sends for the killed process, and the proxy closes the client side with it, while the
    // client still streams (it stops, and sends its FIN, only after that).
    let m = proxy.wait_metrics("the close of both sides", |m| {
        m.dialed_closed(CloseReason::Reset) + m.dialed_closed(CloseReason::PeerClosed) == 1
            && m.get("sockman_connections_active") == 0
            && m.get("sockman_connections_dialed_active") == 0
    });
    assert_eq!(m.get(&proxy.up("sessions_active")), 0, "{m}");
    stop.store(true, Ordering::Release);
    let sent = writer.join().expect("the client's writer failed");
    assert!(sent as usize >= got, "sent {sent}, echoed {got}");
    let m = proxy.wait_idle("both sides to end");
    assert_eq!(m.closed_all(), 1, "{m}");
    assert_eq!(m.dialed_closed_all(), 1, "{m}");
    assert_eq!(m.ended_all(), 1, "{m}");
}

#[test]
fn an_upstream_reset_closes_its_idle_client_at_once() {
    // The upstream echoes one message, then resets its connection (linger 0) while the client,
    // having its answer, sends nothing: only the upstream side's close can end the client side.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = listener.local_addr().unwrap();
    let upstream = thread::spawn(move || {
        let mut stream = accept_within(&listener, util::WAIT);
        let mut msg = [0; 5];
        stream.read_exact(&mut msg).expect("the upstream's read");
        stream.write_all(&msg).expect("the upstream's write");
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        Instant::now() // dropped here: an RST
    });
    let proxy = Proxy::spawn(up_addr, &[]);
    let mut client = connect(proxy.addr);
    client.write_all(b"hello").unwrap();
    assert_eq!(util::read_exactly(&mut client, 5), b"hello");
    let reset_at = upstream.join().expect("the upstream thread failed");
    expect_closed(&mut client);
    let took = reset_at.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "the client was closed {took:?} after its upstream reset"
    );
    // The client side was closed at once, without a linger (its upstream reset).
    let m = proxy.wait_idle("both sides to end");
    assert_eq!(m.get("sockman_connections_lingering"), 0, "{m}");
    assert_eq!(m.dialed_closed(CloseReason::Reset), 1, "{m}");
    assert_eq!(
        m.closed(CloseReason::Handler),
        1,
        "the proxy closes the client side: {m}"
    );
    assert_eq!(m.closed_all(), 1, "{m}");
    assert_eq!(m.dialed_closed_all(), 1, "{m}");
    // The session's end is the upstream's doing, not the client's nor the proxy's.
    assert_eq!(m.ended("SD"), 1, "{m}");
}

#[test]
fn a_client_that_resets_closes_its_upstream_side() {
    let upstream = util::start(util::local_config(), sockman::Echo);
    let proxy = Proxy::spawn(upstream.addr, &[]);
    let mut client = connect(proxy.addr);
    util::echo(&mut client, b"before the reset");
    let m = proxy.scrape();
    assert_eq!(m.get(&proxy.up("sessions_active")), 1, "{m}");

    util::abort(client); // an RST, not a FIN

    // Lingering 0 too: the proxy closed its upstream side at once (a FIN: nothing was unread).
    let m = proxy.wait_idle("both sides of the reset session to end");
    assert_eq!(m.closed(CloseReason::Reset), 1, "{m}");
    assert_eq!(m.dialed_closed(CloseReason::Handler), 1, "{m}");
    assert_eq!(m.closed_all(), 1, "{m}");
    assert_eq!(m.dialed_closed_all(), 1, "{m}");
    assert_eq!(m.ended("CD"), 1, "{m}");
    assert_eq!(m.get(&proxy.up("sessions_active")), 0, "{m}");
    // The upstream saw an orderly close of its connection, before the test stopped it.
    let um = upstream.stop();
    assert_eq!(um.closed_by(CloseReason::PeerClosed), 1, "{um}");
    assert_eq!(um.closed_by(CloseReason::Shutdown), 0, "{um}");
}

/// The never-read test's upstream: accepts one connection and writes to it as fast as it can,
/// counting what the kernel took in `written`, until a write fails (returns its kind) or `stop`.
fn upstream_writes(
    listener: &TcpListener,
    written: &AtomicU64,
    stop: &AtomicBool,
) -> Option<io::ErrorKind> {
    let mut stream = accept_within(listener, util::WAIT);
    stream
        .set_write_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let chunk = pattern(16 * KIB, 7);
    while !stop.load(Ordering::Acquire) && written.load(Ordering::Relaxed) < 1 << 30 {
        match stream.write(&chunk) {
            Ok(n) => {
                written.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Some(e.kind()),
        }
    }
    None
}

/// A listener on 127.0.0.1 whose connections have a 16 KiB `SO_SNDBUF` (the kernel doubles it
/// and stops autotuning), so that what an upstream's writes count is what left it, give or take
/// 32 KiB, rather than megabytes queued in its own kernel buffer.
fn small_sndbuf_listener() -> TcpListener {
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    listener.set_send_buffer_size(16 * KIB).unwrap(); // inherited by accepted sockets
    listener
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    listener.listen(16).unwrap();
    listener.into()
}

/// Samples `written` (bytes an upstream got rid of) every 10 ms until it has stood still for
/// 200 ms, and returns it: the upstream is pushed back. Runs `each` at every sample. Fails if it
/// passes `max` or after [`util::WAIT`].
#[track_caller]
fn wait_pushed_back(written: &AtomicU64, max: u64, mut each: impl FnMut()) -> u64 {
    let started = Instant::now();
    let mut last = (0, started);
    loop {
        let now = written.load(Ordering::Relaxed);
        each();
        if now != last.0 {
            last = (now, Instant::now());
        } else if now > 0 && last.1.elapsed() >= Duration::from_millis(200) {
            return now;
        }
        assert!(
            started.elapsed() < util::WAIT && now < max,
            "the upstream was never pushed back: {now} bytes written in {:?}",
            started.elapsed()
        );
        // The sampling interval of the upstream's progress (no event marks "stopped growing").
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_slow_client_pauses_the_upstream_and_gets_every_byte_once_it_reads() {
    const LEN: usize = 2 * MIB;
    let listener = small_sndbuf_listener();
    let up_addr = listener.local_addr().unwrap();
    let data = pattern(LEN, 31);
    let written = Arc::new(AtomicU64::new(0));
    // The upstream: 2 MiB in 16 KiB writes (counted), its FIN, then it reads until the client's.
    let upstream = {
        let (data, written) = (data.clone(), Arc::clone(&written));
        thread::spawn(move || {
            let mut stream = accept_within(&listener, util::WAIT);
            for chunk in data.chunks(16 * KIB) {
                stream.write_all(chunk).expect("the upstream's write");
                written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            stream.shutdown(Shutdown::Write).unwrap();
            read_to_eof(&mut stream, MIB).expect("the upstream reading until EOF")
        })
    };
    let proxy = Proxy::spawn(up_addr, &["--rcvbuf", "16KiB", "--sndbuf", "16KiB"]);
    let mut client = util::connect_small_rcvbuf(proxy.addr);
    // The client reads nothing until the upstream stands still, well short of its 2 MiB...
    let plateau = wait_pushed_back(&written, LEN as u64, || {});
    assert!(
        plateau < LEN as u64 / 2,
        "the upstream wrote {plateau} of {LEN} bytes to a client that reads nothing"
    );
    // ...then reads: the upstream side resumes each time the client side drains.
    let got = read_to_eof(&mut client, 2 * LEN).expect("the client reading until EOF");
    assert_same(&got, &data);
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(upstream.join().expect("the upstream thread failed"), b"");
    let m = proxy.wait_idle("the session to end");
    assert_eq!(m.get(&proxy.up("received_bytes_total")), LEN as i64, "{m}");
    assert_eq!(m.closed(CloseReason::WriteStall), 0, "{m}");
    assert_eq!(m.closed(CloseReason::Overflow), 0, "{m}");
    assert_eq!(m.closed_all(), 1, "{m}");
    assert_eq!(m.dialed_closed_all(), 1, "{m}");
    assert_eq!(m.ended("--"), 1, "{m}");
}

#[test]
fn a_client_that_never_reads_pushes_the_upstream_back_then_the_write_timeout_closes_it() {
    // Bytes the upstream can get rid of while the client reads nothing: its own send buffer, the
    // proxy's receive buffer on the upstream side, one --max-pending of output, the proxy's send
    // buffer on the client side and the client's receive buffer (each at most twice what was set:
    // the kernel doubles SO_RCVBUF/SO_SNDBUF), about 200 KiB in all. Without backpressure it
    // would be everything the upstream can write in a second: hundreds of MiB.
    const BOUND: u64 = 512 * KIB as u64;
    let listener = small_sndbuf_listener();
    let up_addr = listener.local_addr().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));

    // The upstream writes as fast as it can until a write fails (or the test gives up), then
    // says how its writes ended.
    let (ended_tx, ended_rx) = mpsc::channel();
    let upstream = {
        let (written, stop) = (Arc::clone(&written), Arc::clone(&stop));
        thread::spawn(move || {
            let _ = ended_tx.send(upstream_writes(&listener, &written, &stop));
        })
    };
    let proxy = Proxy::spawn(
        up_addr,
        &[
            "--rcvbuf",
            "16KiB",
            "--sndbuf",
            "16KiB",
            "--max-pending",
            "64KiB",
            "--write-timeout",
            "500ms",
            // The linger timeout is the default (5 s): the upstream side closes at once when
            // the session ends (a reset, as it has unread input), not lingering, so that
            // nothing the upstream writes after that is taken.
        ],
    );
    let pid = proxy.bin.pid();
    let rss_before = rss_kib(pid);

    let connected_at = Instant::now();
    let client = util::connect_small_rcvbuf(proxy.addr);
    let mut max_rss = rss_before;
    let plateau = wait_pushed_back(&written, 64 * BOUND, || {
        max_rss = max_rss.max(rss_kib(pid));
    });
    assert!(
        plateau < BOUND,
        "the upstream wrote {plateau} bytes to a client that reads nothing (bound {BOUND})"
    );
    assert!(
        max_rss < rss_before + 4 * 1024,
        "the proxy's RSS grew from {rss_before} KiB to {max_rss} KiB while the upstream pushed"
    );

    // The client side's output makes no progress: the write timeout closes the session.
    let m = proxy.wait_metrics("the write-stall close", |m| {
        m.closed(CloseReason::WriteStall) == 1
    });
    let closed_after = connected_at.elapsed();
    assert!(
        closed_after >= Duration::from_millis(500),
        "closed {closed_after:?} after connecting, before the 500ms write timeout"
    );
    assert!(
        closed_after < Duration::from_secs(3),
        "the write-stall close came only {closed_after:?} after connecting"
    );
    assert_eq!(m.dialed_closed(CloseReason::Handler), 1, "{m}");
    // The upstream's connection was closed under it: its writes fail.
    let ended = ended_rx.recv_timeout(util::WAIT);
    stop.store(true, Ordering::Release);
    upstream.join().expect("the upstream thread panicked");
    let ended = ended.expect("the upstream's writes did not end after the session closed");
    assert!(
        matches!(
            ended,
            Some(io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe)
        ),
        "the upstream's writes ended with {ended:?}, not a reset"
    );
    let total = written.load(Ordering::Relaxed);
    assert!(
        total < BOUND,
        "the upstream wrote {total} bytes in all (plateau {plateau}, bound {BOUND})"
    );
    let m = proxy.wait_idle("both sides to end");
    assert_eq!(m.closed_all(), 1, "{m}");
    assert_eq!(m.dialed_closed_all(), 1, "{m}");
    // A client-side timeout in the data phase.
    assert_eq!(m.ended("cD"), 1, "{m}");
    drop(client);
}

#[test]
fn sigterm_lets_an_open_session_finish_its_exchange_and_refuses_new_ones() {
    let upstream = util::start(util::local_config(), sockman::Echo);
    let mut proxy = Proxy::spawn(upstream.addr, &["--drain-idle", "2s"]);
    let data = pattern(512 * KIB, 10);

    let mut client = connect(proxy.addr);
    let mut reader = client.try_clone().unwrap();
    let echoed = thread::spawn(move || read_to_eof(&mut reader, MIB));
    // The first half is on its way (some echoed, some in flight) when the signal comes.
    client.write_all(&data[..256 * KIB]).unwrap();
    let signalled = Instant::now();
    proxy.bin.signal("TERM");
    let line = proxy.bin.wait_line("the draining line", |l| {
        l.contains("draining: listeners closed")
    });
    assert!(line.contains("2 connections open"), "{line}");
    util::expect_refused(proxy.addr);
    // The session goes on: the second half, the client's FIN, all of it back, then EOF.
    client.write_all(&data[256 * KIB..]).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let got = echoed.join().unwrap().expect("reading the echo until EOF");
    assert_same(&got, &data);

    proxy.bin.wait_success();
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the drain took {took:?} for a session that ended at once"
    );
    assert!(
        proxy.bin.log.iter().any(|l| l.contains("drain complete")),
        "the drain did not end by itself; log:\n{}",
        proxy.bin.log()
    );
    let line = proxy.bin.final_line();
    assert_eq!(stat(line, "active"), Some(0), "{line}");
    assert_eq!(stat(line, "accepted"), Some(1), "{line}");
    assert_eq!(stat(line, "sessions"), Some(1), "{line}");
    assert_eq!(stat(line, "peer_closed"), Some(1), "{line}");
    assert_eq!(stat(line, "handler"), Some(1), "{line}");
    assert_eq!(
        stat(line, "shutdown"),
        None,
        "no connection was cut: {line}"
    );
    assert_eq!(stat(line, "bytes_in"), Some(512 * KIB as u64), "{line}");
    assert_eq!(
        stat(line, "dialed_bytes_in"),
        Some(512 * KIB as u64),
        "{line}"
    );
    assert_eq!(
        stat(line, "--"),
        Some(1),
        "finished, not cut by the drain: {line}"
    );
    let um = upstream.stop();
    assert_eq!(um.closed_by(CloseReason::PeerClosed), 1, "{um}");
}
