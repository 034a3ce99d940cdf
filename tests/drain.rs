//! Graceful drain of the `sockman` binary on SIGTERM (signals go to a child: in the test process
//! they would hit every server of every test): streaming clients get back every byte they sent
//! and then EOF, idle clients are closed after `--drain-idle`, new connects are refused, `/health`
//! says 503, and the process exits 0 well within `--drain-timeout`. A second SIGTERM stops at once.
//!
//! These are real-time end-to-end tests with generous bounds; the drain's exact tick behaviour
//! (drain idle, the drain deadline) is asserted in-process at virtual times in
//! tests/drain_ticks.rs.
#![cfg(feature = "cli")]

mod util;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use util::child::{is_stats, Bin};
use util::http;
use util::{assert_same, connect, expect_closed, pattern, read_exactly, stat};

const STREAMING: usize = 50;
const IDLE: usize = 20;
const DRAIN_IDLE: Duration = Duration::from_millis(300);
/// The server's deadline granularity (`--tick`, default 10 ms): an idle close can come up to one
/// tick before `drain_idle` after the activity as measured by the client.
const TICK: Duration = Duration::from_millis(10);
/// Upper bound on one streaming writer's output, so a runaway test cannot fill memory.
const MAX_STREAM: usize = 16 << 20;

/// The same byte stream as [`util::pattern`], produced chunk by chunk (a writer streams for as
/// long as the test needs; the reader checks against `pattern(total, seed)`).
struct PatternStream(u64);

impl PatternStream {
    fn new(seed: u64) -> PatternStream {
        PatternStream(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            let x = &mut self.0;
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            *b = *x as u8;
        }
    }
}

#[test]
fn pattern_stream_matches_util_pattern() {
    let mut s = PatternStream::new(7);
    let mut a = vec![0; 1000];
    let mut b = vec![0; 2345];
    s.fill(&mut a);
    s.fill(&mut b);
    a.extend_from_slice(&b);
    assert_eq!(a, pattern(3345, 7));
}

/// One streaming client: a writer thread (512-byte chunks every 2 ms until told to stop, then
/// `shutdown(Write)`) and a reader thread (collects the echo until EOF).
struct Streamer {
    writer: JoinHandle<usize>,
    reader: JoinHandle<(Vec<u8>, Instant)>,
    seed: u64,
}

fn stream_client(
    addr: SocketAddr,
    seed: u64,
    stop: Arc<AtomicBool>,
    started: Arc<Barrier>,
) -> Streamer {
    let mut w = connect(addr);
    let mut r = w.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut gen = PatternStream::new(seed);
        let mut chunk = [0; 512];
        let mut sent = 0;
        let mut first = true;
        while !stop.load(Ordering::Acquire) && sent < MAX_STREAM {
            gen.fill(&mut chunk);
            if let Err(e) = w.write_all(&chunk) {
                panic!("streaming client {seed}: write after {sent} bytes: {e}");
            }
            sent += chunk.len();
            if first {
                started.wait();
                first = false;
            }
            // Pacing, not synchronisation: a steady stream rather than a saturated one.
            std::thread::sleep(Duration::from_millis(2));
        }
        w.shutdown(Shutdown::Write).unwrap();
        sent
    });
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0; 16 * 1024];
        loop {
            match r.read(&mut buf) {
                Ok(0) => return (got, Instant::now()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!(
                    "streaming client {seed}: read after {} bytes: {e}",
                    got.len()
                ),
            }
            assert!(got.len() <= MAX_STREAM, "more echoed than sent");
        }
    });
    Streamer {
        writer,
        reader,
        seed,
    }
}

/// An idle client: echoes one byte, records when it wrote it, then a thread waits for the server
/// to close it and records when.
struct Idler {
    wrote_at: Instant,
    closed: JoinHandle<Instant>,
}

fn idle_client(addr: SocketAddr) -> Idler {
    let mut s = connect(addr);
    let wrote_at = Instant::now();
    s.write_all(b"i").unwrap();
    assert_eq!(read_exactly(&mut s, 1), b"i");
    let closed = std::thread::spawn(move || {
        expect_closed(&mut s);
        Instant::now()
    });
    Idler { wrote_at, closed }
}

/// `sockman serve --stats-interval 100ms EXTRA...` once its loop runs (its first stats line: the
/// signal handlers are installed by then), and its address.
#[track_caller]
fn serve_running(extra: &[&str]) -> (Bin, SocketAddr) {
    let (mut bin, addr) = Bin::serve(&[&["--stats-interval", "100ms"], extra].concat());
    bin.wait_first_stats();
    (bin, addr)
}

#[test]
fn sigterm_drains_streams_without_losing_a_byte_and_closes_idle_ones() {
    let (mut bin, addr, admin) = Bin::serve_with_admin(&[
        "--drain-idle",
        "300ms",
        "--drain-timeout",
        "10s",
        "--stats-interval",
        "100ms",
    ]);
    // The first stats line comes from the loop: by then the signal handlers are installed.
    bin.wait_first_stats();
    assert_eq!(http::get(admin, "/health").status, 200);

    // 20 idle clients (each echoes one byte, then stays silent)...
    let idlers: Vec<Idler> = (0..IDLE).map(|_| idle_client(addr)).collect();
    // ...and 50 streaming clients; wait until each has written its first chunk.
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(Barrier::new(STREAMING + 1));
    let streamers: Vec<Streamer> = (0..STREAMING)
        .map(|i| stream_client(addr, i as u64, Arc::clone(&stop), Arc::clone(&started)))
        .collect();
    started.wait();
    let line = bin.wait_line("stats line with every client", |l| {
        is_stats(l) && stat(l, "active") == Some((STREAMING + IDLE) as u64)
    });
    assert_eq!(stat(&line, "closed"), Some(0), "{line}");

    let signalled = Instant::now();
    bin.signal("TERM");
    let line = bin.wait_line("draining line", |l| l.contains("draining: "));
    assert!(
        line.contains(&format!("{} connections open", STREAMING + IDLE)),
        "{line}"
    );

    // During the drain: new connects are refused (the listener is closed, not left to hang)...
    util::expect_refused(addr);
    // ...and the admin endpoint stays up and reports it (the streams keep the drain going until
    // they are told to stop below, so this cannot come too late).
    let health = http::get(admin, "/health");
    assert_eq!(health.status, 503, "{health:?}");

    // The idle clients are closed by the drain while the streams go on. The exact drain-idle
    // ticks are asserted in-process (tests/drain_ticks.rs); here: never before --drain-idle after
    // the client's last activity, and within 5 s of the signal. That upper bound is loose on
    // purpose (it was 1 s, which a loaded 2-core machine can miss): it is still half the 10 s
    // --drain-timeout, so with reason `shutdown` and no "force-closing" in the log it shows that
    // drain-idle closed them, not the deadline.
    let mut idle_closed: Vec<Duration> = Vec::new();
    for idler in idlers {
        let closed_at = idler.closed.join().expect("an idle client was not closed");
        assert!(
            closed_at > signalled,
            "an idle client closed before the signal"
        );
        assert!(
            closed_at >= idler.wrote_at + DRAIN_IDLE - TICK,
            "an idle client closed {:?} after its last activity, before --drain-idle {DRAIN_IDLE:?}",
            closed_at - idler.wrote_at
        );
        assert!(
            closed_at <= signalled + Duration::from_secs(5),
            "an idle client closed only {:?} after the signal",
            closed_at - signalled
        );
        idle_closed.push(closed_at - signalled);
    }
    // Every idle client is gone: the streaming clients, active throughout, stop now and
    // half-close.
    stop.store(true, Ordering::Release);

    let mut streamed = 0;
    let mut last_eof = signalled;
    for s in streamers {
        let sent = s.writer.join().expect("a streaming writer failed");
        let (got, eof_at) = s.reader.join().expect("a streaming reader failed");
        assert!(sent > 0);
        // Every byte back, in order, then EOF (the reader ends only at EOF).
        assert_same(&got, &pattern(sent, s.seed));
        streamed += sent;
        last_eof = last_eof.max(eof_at);
    }

    bin.wait_success();
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the drain took {took:?}; log:\n{}",
        bin.log()
    );
    bin.assert_log(&["drain complete"], &["force-closing", "panicked"]);
    let last = bin.final_line();
    assert_eq!(stat(last, "active"), Some(0), "{last}");
    assert_eq!(
        stat(last, "accepted"),
        Some((STREAMING + IDLE) as u64),
        "{last}"
    );
    assert_eq!(stat(last, "peer_closed"), Some(STREAMING as u64), "{last}");
    assert_eq!(stat(last, "shutdown"), Some(IDLE as u64), "{last}");
    assert_eq!(
        stat(last, "closed"),
        Some((STREAMING + IDLE) as u64),
        "{last}"
    );
    assert_eq!(stat(last, "pending"), Some(0), "{last}");
    eprintln!(
        "drain: {STREAMING} streams echoed {streamed} bytes whole, last EOF {:?} after SIGTERM; \
         idle clients closed {:?} to {:?} after it; exit {took:?} after it",
        last_eof - signalled,
        idle_closed.iter().min().unwrap(),
        idle_closed.iter().max().unwrap(),
    );
}

#[test]
fn a_second_sigterm_during_a_drain_stops_at_once() {
    let (mut bin, addr) = serve_running(&["--drain-idle", "5s", "--drain-timeout", "10s"]);
    let mut client = connect(addr);
    util::echo(&mut client, b"before");

    bin.signal("TERM");
    bin.wait_line("draining line", |l| l.contains("draining: "));
    // Still served during the drain: it is active, and --drain-idle is 5 s.
    util::echo(&mut client, b"during the drain");

    let second = Instant::now();
    bin.signal("TERM");
    expect_closed(&mut client);
    let closed_after = second.elapsed();
    bin.wait_success();
    let exited_after = second.elapsed();
    assert!(
        closed_after < Duration::from_secs(1),
        "closed {closed_after:?} after the second signal"
    );
    assert!(
        exited_after < Duration::from_secs(2),
        "exited {exited_after:?} after the second signal; log:\n{}",
        bin.log()
    );
    bin.assert_log(
        &["closing every connection now"],
        &["drain complete", "panicked"],
    );
    let last = bin.final_line();
    assert_eq!(stat(last, "active"), Some(0), "{last}");
    assert_eq!(stat(last, "shutdown"), Some(1), "{last}");
    assert_eq!(stat(last, "closed"), Some(1), "{last}");
}

#[test]
fn the_drain_deadline_force_closes_what_is_left_and_still_exits_0() {
    let (mut bin, addr) = serve_running(&["--drain-idle", "5s", "--drain-timeout", "500ms"]);
    let mut client = connect(addr);
    util::echo(&mut client, b"open through the drain");

    let signalled = Instant::now();
    bin.signal("TERM");
    bin.wait_line("draining line", |l| l.contains("draining: "));
    expect_closed(&mut client);
    let closed_after = signalled.elapsed();
    assert!(
        closed_after >= Duration::from_millis(500) - TICK,
        "closed {closed_after:?} after the signal, before the 500ms drain timeout"
    );
    assert!(
        closed_after < Duration::from_millis(1500),
        "closed only {closed_after:?} after the signal (drain timeout 500ms)"
    );
    bin.wait_success();
    bin.assert_log(
        &[
            "force-closing 1 connections",
            "1 connections were still open at the drain deadline",
        ],
        &[],
    );
    let last = bin.final_line();
    assert_eq!(stat(last, "shutdown"), Some(1), "{last}");
    assert_eq!(stat(last, "active"), Some(0), "{last}");
}

#[test]
fn connections_queued_in_the_backlog_at_the_signal_are_served_not_reset() {
    const QUEUED: usize = 300;
    let (mut bin, addr) = serve_running(&["--drain-idle", "300ms"]);
    // Freeze the server, queue connections in its backlog (the kernel completes them), queue
    // SIGTERM, then let it run. Those clients connected before the drain: they must be served,
    // not reset by the listener's close. More than one turn's accept budget (128) are queued, so
    // the drain starts while most are still in the backlog, whichever event comes first.
    bin.signal("STOP");
    let mut queued: Vec<TcpStream> = (0..QUEUED).map(|_| connect(addr)).collect();
    for (i, c) in queued.iter_mut().enumerate() {
        c.write_all(format!("queued {i}").as_bytes()).unwrap();
    }
    bin.signal("TERM");
    bin.signal("CONT");
    for (i, c) in queued.iter_mut().enumerate() {
        let want = format!("queued {i}");
        let got = read_exactly(c, want.len());
        assert_eq!(got, want.as_bytes(), "client {i}");
    }
    bin.wait_line("draining line", |l| l.contains("draining: "));
    for c in &mut queued {
        expect_closed(c);
    }
    bin.wait_success();
    let last = bin.final_line();
    assert_eq!(stat(last, "accepted"), Some(QUEUED as u64), "{last}");
    assert_eq!(stat(last, "reset"), None, "{last}");
    assert_eq!(stat(last, "shutdown"), Some(QUEUED as u64), "{last}");
}
