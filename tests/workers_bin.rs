//! `sockman serve --workers 2` as users run it: `/metrics` has a total and one series per
//! worker that add up, the stats line counts every worker's connections, and a drain loses no
//! handshake the kernel already completed on either worker's `SO_REUSEPORT` listener.
#![cfg(feature = "cli")]

mod util;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use util::child::{is_stats, Bin};
use util::{connect, echo, http, procfs, stat, WAIT};

/// Spawns `sockman serve --workers 2` on 127.0.0.1:0 with an admin endpoint and `extra`
/// flags; returns it with its data and admin addresses once it is listening.
#[track_caller]
fn spawn_two_workers(extra: &[&str]) -> (Bin, SocketAddr, SocketAddr) {
    let (mut bin, addr, admin) =
        Bin::serve_with_admin(&[&["--workers", "2", "--stats-interval", "100ms"], extra].concat());
    bin.wait_line("the workers line", |l| l.contains("2 workers on "));
    (bin, addr, admin)
}

/// `accepted=N` of every worker's `stopped:` line (one per worker as it ends).
fn stopped_accepted(bin: &Bin) -> Vec<u64> {
    bin.log
        .iter()
        .filter(|l| l.contains(" stopped: "))
        .map(|l| stat(l, "accepted").unwrap_or_else(|| panic!("no accepted= in {l:?}")))
        .collect()
}

#[test]
fn two_workers_metrics_have_a_total_and_per_worker_series_that_add_up() {
    let (mut bin, addr, admin) = spawn_two_workers(&[]);
    let mut clients: Vec<_> = (0..200).map(|_| connect(addr)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        echo(c, format!("worker test {i}").as_bytes());
    }
    // Published once per tick (10 ms) by each worker: wait until the total shows all 200 and
    // the per-worker series add up to it in one scrape.
    let deadline = Instant::now() + WAIT;
    let (w0, w1) = loop {
        let body = http::get(admin, "/metrics").body;
        let total = http::value(&body, "sockman_accepted_total", "");
        let w0 = http::value(&body, "sockman_accepted_total", "worker=\"0\"");
        let w1 = http::value(&body, "sockman_accepted_total", "worker=\"1\"");
        assert!(
            total.is_some() && w0.is_some() && w1.is_some(),
            "no total or per-worker sockman_accepted_total in /metrics:\n{body}"
        );
        if total == Some(200) && w0.unwrap() + w1.unwrap() == 200 {
            assert_eq!(
                http::value(&body, "sockman_connections_active", ""),
                Some(200),
                "{body}"
            );
            break (w0.unwrap(), w1.unwrap());
        }
        assert!(
            Instant::now() < deadline,
            "total {total:?}, workers {w0:?} + {w1:?}, want 200 = 200:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(5)); // pacing: a tick is 10 ms
    };
    // 200 connections from 200 source ports: the kernel's hash used both listeners.
    assert!(w0 > 0 && w1 > 0, "worker 0 got {w0}, worker 1 got {w1}");
    // The stats line (the main thread sums the workers' slots) counts all 200.
    let line = bin.wait_line("stats line with accepted=200", |l| {
        is_stats(l) && stat(l, "accepted") == Some(200)
    });
    assert_eq!(stat(&line, "active"), Some(200), "{line}");
    for c in clients {
        util::close_gracefully(c);
    }
    bin.wait_line("stats line with every close", |l| {
        is_stats(l) && stat(l, "active") == Some(0) && stat(l, "peer_closed") == Some(200)
    });
    bin.terminate();
    let last = bin.final_line();
    assert_eq!(stat(last, "accepted"), Some(200), "{last}");
    assert_eq!(stat(last, "peer_closed"), Some(200), "{last}");
    let mut per_worker = stopped_accepted(&bin);
    per_worker.sort_unstable();
    let mut want = vec![w0, w1];
    want.sort_unstable();
    assert_eq!(per_worker, want, "log:\n{}", bin.log());
    bin.assert_log(&[], &["panicked"]);
}

/// How one client's request ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    Echoed,
    Short(usize),
    Failed(io::ErrorKind),
}

#[test]
fn a_drain_of_two_workers_serves_every_handshake_queued_while_stopped() {
    const N: usize = 200;
    let (mut bin, addr, _admin) = spawn_two_workers(&["--drain-timeout", "10s"]);
    bin.wait_first_stats();
    // Every thread of the process stops: nothing accepts, the kernel completes the handshakes
    // and queues them on the two workers' listeners.
    bin.signal("STOP");
    let deadline = Instant::now() + WAIT;
    while procfs::state(bin.pid()) != 'T' {
        assert!(Instant::now() < deadline, "sockman did not stop");
        std::thread::sleep(Duration::from_millis(1)); // pacing: the kernel stops it at once
    }
    let mut clients: Vec<(TcpStream, Vec<u8>)> = (0..N)
        .map(|i| {
            let mut c = connect(addr);
            let msg = format!("queued request {i:03}\n").into_bytes();
            c.write_all(&msg)
                .expect("write a request to the queued connection");
            (c, msg)
        })
        .collect();
    assert_eq!(procfs::state(bin.pid()), 'T', "sockman ran while stopped");
    // The drain is requested while every worker is still stopped: the signal is delivered as
    // the process continues.
    bin.signal("TERM");
    bin.signal("CONT");
    let mut outcomes = Vec::with_capacity(N);
    for (c, msg) in &mut clients {
        let mut back = vec![0; msg.len()];
        let mut got = 0;
        let outcome = loop {
            match c.read(&mut back[got..]) {
                Ok(0) => break Outcome::Short(got),
                Ok(n) => {
                    got += n;
                    if got == back.len() {
                        break if back == *msg {
                            Outcome::Echoed
                        } else {
                            Outcome::Short(got)
                        };
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Outcome::Failed(e.kind()),
            }
        };
        outcomes.push(outcome);
    }
    let bad = util::failures(&outcomes, &Outcome::Echoed);
    assert!(
        bad.is_empty(),
        "{} of {N} queued clients did not get their echo: {:?}; log:\n{}",
        bad.len(),
        &bad[..bad.len().min(10)],
        bin.log()
    );
    // Each client ends politely: the server's EOF follows (no reset).
    for (c, _) in clients {
        util::close_gracefully(c);
    }
    bin.wait_success();
    let last = bin.final_line();
    assert_eq!(stat(last, "accepted"), Some(N as u64), "{last}");
    assert_eq!(stat(last, "reset").unwrap_or(0), 0, "{last}");
    assert_eq!(stat(last, "shutdown").unwrap_or(0), 0, "{last}");
    assert_eq!(stat(last, "active"), Some(0), "{last}");
    // Both workers' queues held some of them (and each worker served its own).
    let per_worker = stopped_accepted(&bin);
    assert_eq!(per_worker.len(), 2, "log:\n{}", bin.log());
    assert_eq!(per_worker.iter().sum::<u64>(), N as u64);
    assert!(per_worker.iter().all(|&n| n > 0), "{per_worker:?}");
    bin.assert_log(&["SIGTERM: draining"], &["force-closing", "panicked"]);
}

/// The cap of a group of workers, from its `N workers on ADDR: at most M connections in all`
/// line.
#[track_caller]
fn group_cap(line: &str) -> u64 {
    stat(&line.replace("at most ", "cap="), "cap")
        .unwrap_or_else(|| panic!("no \"at most M connections\" in {line:?}"))
}

#[test]
fn sixty_four_workers_under_a_1024_fd_limit_reach_their_cap_without_emfile() {
    const CLIENTS: u64 = 3000;
    // Each worker holds an epoll fd, a waker, a timerfd, the accept gate's spare and its
    // listener: a reserve that leaves one of them out runs out of descriptors below the cap.
    let mut bin = Bin::spawn_limited(
        1024,
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--workers",
            "64",
            "--stats-interval",
            "100ms",
            "--fd-check-interval",
            "0",
        ],
    );
    let (addr, admin) = bin.wait_listening_with_admin();
    let cap = group_cap(&bin.wait_line("the workers line", |l| l.contains("64 workers on ")));
    bin.wait_first_stats();
    let clients: Vec<TcpStream> = (0..CLIENTS).map(|_| connect(addr)).collect();
    let line = bin.wait_line("stats line with every connect handled, or EMFILE", |l| {
        let handled: u64 = ["accepted", "full", "shed"]
            .iter()
            .map(|k| stat(l, k).unwrap_or(0))
            .sum();
        is_stats(l) && (handled == CLIENTS || stat(l, "emfile").is_some())
    });
    assert_eq!(
        stat(&line, "emfile"),
        None,
        "out of descriptors below the cap of {cap}: {line}"
    );
    assert_eq!(stat(&line, "active"), Some(cap), "{line}");
    assert_eq!(stat(&line, "full"), Some(CLIENTS - cap), "{line}");
    // The admin endpoint still gets descriptors.
    let r = http::get(admin, "/metrics");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        http::value(&r.body, "sockman_connections_active", ""),
        Some(cap),
        "{}",
        r.body
    );
    drop(clients);
    bin.terminate();
    bin.assert_log(&[], &["Too many open files", "panicked"]);
}

/// The status of `GET path` on the admin endpoint, or why there is none (refused, reset).
fn admin_status(admin: SocketAddr, path: &str) -> Result<u16, String> {
    let mut c = TcpStream::connect(admin).map_err(|e| format!("connect: {e}"))?;
    c.set_read_timeout(Some(util::IO_TIMEOUT)).unwrap();
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut text = String::new();
    c.read_to_string(&mut text)
        .map_err(|e| format!("read: {e}"))?;
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {text:?}"))
}

#[test]
fn the_admin_endpoint_answers_until_every_worker_has_drained() {
    let (mut bin, addr, admin) =
        spawn_two_workers(&["--drain-timeout", "20s", "--drain-idle", "10s"]);
    // One connection held on worker 1 (worker 0 serves the admin endpoint); the rest let go.
    let mut held = None;
    for _ in 0..200 {
        let mut c = connect(addr);
        echo(&mut c, b"which worker?");
        let me = c.local_addr().unwrap();
        let on_1 = http::connections(admin, "")
            .iter()
            .any(|(peer, line)| *peer == me && line.contains(" worker=1"));
        if on_1 {
            held = Some(c);
            break;
        }
    }
    let mut held = held.expect("no connection landed on worker 1");
    bin.wait_line("stats line with the held connection alone", |l| {
        is_stats(l) && stat(l, "active") == Some(1)
    });
    bin.signal("TERM");
    // Worker 0 has nothing left to drain: it is done at once, worker 1 is not.
    bin.wait_line("worker 0's drain complete", |l| {
        l.contains("drain complete")
    });
    for path in ["/livez", "/readyz", "/metrics", "/livez"] {
        let want = if path == "/readyz" { 503 } else { 200 };
        assert_eq!(
            admin_status(admin, path),
            Ok(want),
            "GET {path} while worker 1 still drains; log:\n{}",
            bin.log()
        );
    }
    let m = http::get(admin, "/metrics").body;
    assert_eq!(
        http::value(&m, "sockman_connections_active", ""),
        Some(1),
        "{m}"
    );
    // The held connection still echoes; when it leaves, the drain ends and every worker stops.
    echo(&mut held, b"still served");
    util::close_gracefully(held);
    bin.wait_success();
    assert_eq!(
        bin.log.iter().filter(|l| l.contains(" stopped: ")).count(),
        2
    );
    bin.assert_log(&["SIGTERM: draining"], &["force-closing", "panicked"]);
}
