//! The `sockman serve` binary as users run it: its log lines, its fds (counted in
//! `/proc/PID/fd` of the child, where nothing else runs), idle closes, SIGTERM, and clear errors.
#![cfg(feature = "cli")]

mod util;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use util::{close_gracefully, connect, expect_closed, fd_count, stat, Bin};

/// A stats line (not the listening or final line).
fn is_stats(line: &str) -> bool {
    line.contains(" stats active=")
}

#[test]
fn serve_echoes_releases_every_fd_closes_idle_and_stops_on_sigterm() {
    let mut bin = Bin::spawn(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--idle-timeout",
        "1s",
        "--stats-interval",
        "200ms",
    ]);
    let addr = bin.wait_listening();
    // Baseline after the first stats line: by then the signal thread and everything else that
    // lives for the whole run is set up.
    bin.wait_line("first stats line", |l| {
        is_stats(l) && stat(l, "active") == Some(0)
    });
    let baseline = fd_count(bin.pid());

    // 50 connections open at once, each echoes, then each closes.
    let mut streams: Vec<_> = (0..50).map(|_| connect(addr)).collect();
    for (i, stream) in streams.iter_mut().enumerate() {
        let msg = format!("hello from {i}");
        stream.write_all(msg.as_bytes()).unwrap();
        let mut back = vec![0; msg.len()];
        stream.read_exact(&mut back).unwrap();
        assert_eq!(back, msg.as_bytes());
    }
    let during = fd_count(bin.pid());
    assert!(
        during >= baseline + 50,
        "50 open connections but {during} fds (baseline {baseline})"
    );
    for stream in streams {
        close_gracefully(stream);
    }
    // Bounded: stats lines come every 200 ms and `wait_line` gives up after its timeout.
    let deadline = Instant::now() + util::WAIT;
    loop {
        let line = bin.wait_line("stats line after the closes", is_stats);
        if stat(&line, "active") == Some(0) && stat(&line, "peer_closed") == Some(50) {
            let fds = fd_count(bin.pid());
            if fds == baseline {
                assert_eq!(stat(&line, "accepted"), Some(50), "{line}");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "fds never back to {baseline} (now {}); log:\n{}",
            fd_count(bin.pid()),
            bin.log()
        );
    }

    // One idle connection: closed after about 1 s, counted, its fd released.
    let before = Instant::now();
    let mut idle = connect(addr);
    expect_closed(&mut idle);
    let idle_for = before.elapsed();
    assert!(
        idle_for >= Duration::from_secs(1),
        "idle connection closed after {idle_for:?}, before the 1s timeout"
    );
    assert!(
        idle_for <= Duration::from_millis(1500),
        "idle connection closed only after {idle_for:?}"
    );
    let line = bin.wait_line("stats line with idle_timeout=1", |l| {
        is_stats(l) && stat(l, "idle_timeout") == Some(1)
    });
    assert_eq!(stat(&line, "active"), Some(0), "{line}");
    assert_eq!(fd_count(bin.pid()), baseline, "after the idle close");

    // SIGTERM: every connection closed, a final line, exit 0. One connection is still open.
    let mut open = connect(addr);
    open.write_all(b"x").unwrap();
    assert_eq!(util::read_exactly(&mut open, 1), b"x");
    bin.signal("TERM");
    expect_closed(&mut open);
    let status = bin.wait_exit();
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        bin.log()
    );
    let final_line = bin
        .log
        .iter()
        .find(|l| l.contains(" final "))
        .unwrap_or_else(|| panic!("no final line; log:\n{}", bin.log()));
    assert_eq!(stat(final_line, "active"), Some(0), "{final_line}");
    assert_eq!(stat(final_line, "accepted"), Some(52), "{final_line}");
    assert_eq!(stat(final_line, "peer_closed"), Some(50), "{final_line}");
    assert_eq!(stat(final_line, "idle_timeout"), Some(1), "{final_line}");
    assert_eq!(stat(final_line, "shutdown"), Some(1), "{final_line}");
    assert!(!bin.log().contains("panicked"), "log:\n{}", bin.log());
}

#[test]
fn a_bad_duration_is_one_clear_error_not_a_panic() {
    let mut bin = Bin::spawn(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--idle-timeout",
        "banana",
    ]);
    let status = bin.wait_exit();
    let log = bin.log();
    assert!(!status.success(), "exit status {status}; stderr:\n{log}");
    assert!(
        log.contains("banana"),
        "the error does not name the value:\n{log}"
    );
    assert!(
        log.contains("idle-timeout"),
        "the error does not name the flag:\n{log}"
    );
    assert!(!log.contains("panicked"), "stderr:\n{log}");
    let lines = bin.log.iter().filter(|l| !l.trim().is_empty()).count();
    assert!(lines <= 4, "{lines} lines for one bad flag:\n{log}");
}

#[test]
fn an_address_in_use_is_one_clear_error_not_a_panic() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut bin = Bin::spawn(&["serve", "--listen", &addr]);
    let status = bin.wait_exit();
    let log = bin.log();
    assert!(!status.success(), "exit status {status}; stderr:\n{log}");
    assert!(
        log.contains(&format!("cannot listen on {addr}")),
        "stderr does not say which address:\n{log}"
    );
    assert!(!log.contains("panicked"), "stderr:\n{log}");
    drop(taken);
}
