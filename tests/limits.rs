//! Limits and fd exhaustion, on the `sockman` binary as a child (fd counts, rlimits and CPU time
//! are per process): the connection cap derived from a low `RLIMIT_NOFILE`, EMFILE after the
//! limit is lowered under a running server, `--max-connections` with reject and evict-idle,
//! `--max-per-ip`, and a connect flood beside an established connection.
//!
//! Bounds catch the failure modes (a spinning loop burns ~100 % of a core; a full backlog hangs
//! clients for seconds) without flaking on a shared 2-core machine; the measured figures are
//! printed with `eprintln!` (`cargo test --test limits -- --nocapture`) for BENCHMARKS.md.
#![cfg(feature = "cli")]

mod util;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use util::child::{is_stats, listening_addr_in, Bin};
use util::procfs::{self, fd_count, fds_below};
use util::{close_gracefully, connect, connect_from, echo, expect_closed, stat};

/// The open-file limit the tests impose (soft and hard).
const NOFILE: u64 = 64;
/// Connections the tests open against that limit.
const CLIENTS: usize = 200;
/// How long the CPU of a saturated server is measured.
const CPU_WINDOW: Duration = Duration::from_secs(2);
/// The connect flood: its length, and a bound on its connects.
const FLOOD_TIME: Duration = Duration::from_secs(2);
const FLOOD_MAX: u64 = 60_000;

/// The timing-sensitive tests (CPU, latency, promptness) run one at a time, so that they do not
/// measure each other on a 2-core machine. The others run beside them.
fn timing_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits (bounded, on stats lines) until the child's open fds are back to `baseline` with no
/// connection open.
#[track_caller]
fn wait_fds_back(pid: u32, baseline: usize, mut next_stats: impl FnMut() -> String) -> Duration {
    let start = Instant::now();
    for _ in 0..200 {
        let line = next_stats();
        if stat(&line, "active") == Some(0) && fd_count(pid) == baseline {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < util::WAIT,
            "fds never back to {baseline} (now {}); last stats: {line}",
            fd_count(pid)
        );
    }
    panic!("fds never back to {baseline} in 200 stats lines");
}

/// The accept paused/resumed warnings in `log`, in order.
fn transitions(log: &[String]) -> Vec<&'static str> {
    log.iter()
        .filter_map(|l| {
            if l.contains("accept paused") {
                Some("accept paused")
            } else if l.contains("accept resumed") {
                Some("accept resumed")
            } else {
                None
            }
        })
        .collect()
}

/// How one client fared: echoed (accepted), or closed by the server (with when that was seen).
#[derive(Debug)]
enum Fate {
    Echoed(TcpStream),
    Closed(Instant),
}

/// Writes one byte and reads: the echo means the server admitted the connection; EOF or a reset
/// means it closed it. A timeout (the read's 2 s safety net) means the connection hangs
/// unaccepted in the backlog: the failure mode under test.
#[track_caller]
fn fate(mut stream: TcpStream) -> Fate {
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    if let Err(e) = stream.write_all(b"x") {
        // The server already closed it and a reset came back.
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "write: {e}"
        );
        return Fate::Closed(Instant::now());
    }
    let mut b = [0; 1];
    match stream.read(&mut b) {
        Ok(1) => {
            stream.set_read_timeout(Some(util::IO_TIMEOUT)).unwrap();
            Fate::Echoed(stream)
        }
        Ok(0) => Fate::Closed(Instant::now()),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Fate::Closed(Instant::now()),
        Ok(n) => panic!("read {n} bytes"),
        Err(e) => panic!("the connection hangs: neither echoed nor closed ({e})"),
    }
}

/// Opens [`CLIENTS`] connections at once, then sorts them: echoed ones are returned; closed ones
/// must have been closed within 1 s of the last connect.
#[track_caller]
fn open_many(addr: SocketAddr) -> (Vec<TcpStream>, usize, Duration) {
    let streams: Vec<TcpStream> = (0..CLIENTS)
        .map(|_| {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .expect("connect (the kernel completes it in the backlog)")
        })
        .collect();
    let connected = Instant::now();
    let mut echoed = Vec::new();
    let mut closed = 0;
    let mut slowest = Duration::ZERO;
    for s in streams {
        match fate(s) {
            Fate::Echoed(s) => echoed.push(s),
            Fate::Closed(at) => {
                closed += 1;
                slowest = slowest.max(at - connected);
            }
        }
    }
    assert!(
        slowest < Duration::from_secs(1),
        "an overflow connection was closed only {slowest:?} after the connects"
    );
    (echoed, closed, slowest)
}

/// Keeps a modest stream of new connections (one per 10 ms) against a saturated server for
/// [`CPU_WINDOW`] and returns the child's CPU share of one core over it. Each new connection
/// must be closed by the server within 1 s (not left hanging); returns the slowest close too.
#[track_caller]
fn cpu_while_saturated(pid: u32, addr: SocketAddr) -> (f64, Duration, usize) {
    let cpu0 = procfs::cpu_time(pid);
    let t0 = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut attempts = 0;
    while t0.elapsed() < CPU_WINDOW && attempts < 1_000 {
        attempts += 1;
        let started = Instant::now();
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
        match fate(s) {
            Fate::Closed(at) => slowest = slowest.max(at - started),
            Fate::Echoed(_) => panic!("a connection was admitted beyond the limit"),
        }
        // Pacing: a steady trickle of connects keeps the listener busy without being load.
        std::thread::sleep(Duration::from_millis(10));
    }
    let cpu = procfs::cpu_time(pid) - cpu0;
    let share = cpu.as_secs_f64() / t0.elapsed().as_secs_f64();
    assert!(
        slowest < Duration::from_secs(1),
        "a connection at the limit was closed only after {slowest:?}"
    );
    (share, slowest, attempts)
}

/// The saturated server, the same for the cap and for EMFILE: every admitted client still
/// echoes, and the child spends less than half a core on [`cpu_while_saturated`]'s trickle of
/// connects (`how` it is saturated names it in a failure). Returns what that returns.
#[track_caller]
fn saturated(
    pid: u32,
    addr: SocketAddr,
    accepted: &mut [TcpStream],
    how: &str,
) -> (f64, Duration, usize) {
    for (i, s) in accepted.iter_mut().enumerate() {
        echo(s, format!("still served {i}").as_bytes());
    }
    let (cpu, slowest, attempts) = cpu_while_saturated(pid, addr);
    assert!(
        cpu < 0.5,
        "sockman used {:.0} % of a core {how}",
        cpu * 100.0
    );
    (cpu, slowest, attempts)
}

/// Frees one fd (a client closes politely; `close_gracefully` returns once the server closed its
/// side), then connects and echoes: returns the time from the close to the echo.
#[track_caller]
fn freed_fd_to_echo(addr: SocketAddr, victim: TcpStream) -> Duration {
    let t = Instant::now();
    close_gracefully(victim);
    let mut s = connect(addr);
    echo(&mut s, b"after a freed fd");
    let took = t.elapsed();
    close_gracefully(s);
    took
}

/// Recovery after a saturating load, the same for the cap and for EMFILE: a freed slot is taken
/// by the next connection within 1 s; once every client has left, a new connection echoes within
/// 1 s and the child's fds come back to `baseline`. Returns (freed fd -> echo, echo after load).
#[track_caller]
fn assert_recovers(
    bin: &mut Bin,
    addr: SocketAddr,
    baseline: usize,
    mut accepted: Vec<TcpStream>,
) -> (Duration, Duration) {
    let victim = accepted.pop().expect("no accepted connection to free");
    let freed = freed_fd_to_echo(addr, victim);
    assert!(
        freed < Duration::from_secs(1),
        "freed fd to echo: {freed:?}"
    );

    drop(accepted);
    let t = Instant::now();
    let mut s = connect(addr);
    echo(&mut s, b"after the load");
    let recovered = t.elapsed();
    assert!(
        recovered < Duration::from_secs(1),
        "echo after the load took {recovered:?}"
    );
    close_gracefully(s);
    let pid = bin.pid();
    wait_fds_back(pid, baseline, || bin.wait_line("stats line", is_stats));
    (freed, recovered)
}

#[test]
fn at_the_cap_from_a_low_fd_limit_overflow_is_closed_promptly_without_spinning() {
    let _serial = timing_lock();
    let mut bin = Bin::spawn_limited(
        NOFILE,
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--stats-interval",
            "100ms",
        ],
    );
    let line = bin.wait_line("listening line", |l| l.contains("listening on "));
    let addr = listening_addr_in(&line);
    assert_eq!(stat(&line, "fd_limit"), Some(NOFILE), "{line}");
    let cap = stat(&line, "max_connections").unwrap_or_else(|| panic!("no cap in {line:?}"));
    // Besides FD_RESERVE, the loop's own: epoll, waker, timerfd, spare, one listener.
    assert_eq!(cap, NOFILE - sockman::FD_RESERVE - 5, "{line}");
    let pid = bin.pid();
    bin.wait_first_stats();
    let baseline = fd_count(pid);

    // 200 connections against a cap of 32: the first 32 echo, the rest are closed at once.
    let (mut accepted, closed, slowest_close) = open_many(addr);
    assert_eq!(accepted.len() as u64, cap, "accepted connections");
    assert_eq!(closed as u64, CLIENTS as u64 - cap);
    let full = CLIENTS as u64 - cap;
    bin.wait_line("stats line with the rejects", |l| {
        is_stats(l) && stat(l, "full") == Some(full)
    });
    // Saturated: CPU stays far from a spinning loop.
    let (cpu, slowest_reject, attempts) = saturated(pid, addr, &mut accepted, "at the cap");
    let line = bin.wait_line("stats line with every reject", |l| {
        is_stats(l) && stat(l, "full") == Some(full + attempts as u64)
    });
    assert_eq!(stat(&line, "active"), Some(cap), "{line}");
    assert_eq!(stat(&line, "closed"), Some(0), "{line}");
    assert_eq!(
        stat(&line, "emfile"),
        None,
        "no accept errors at the cap: {line}"
    );

    // A freed slot is taken by the next connection; then clients leave, a new connection
    // echoes, and the fds are back to the baseline.
    let (freed, recovered) = assert_recovers(&mut bin, addr, baseline, accepted);
    eprintln!(
        "cap path (limit {NOFILE}, cap {cap}): CPU {:.1} % of a core over {CPU_WINDOW:?} with {attempts} \
         connects rejected; overflow closed within {slowest_close:?} (slowest of {closed}), \
         at-cap rejects within {slowest_reject:?}; freed fd -> echo {freed:?}; echo after load {recovered:?}",
        cpu * 100.0
    );
    bin.terminate();
    let last = bin.final_line();
    assert_eq!(stat(last, "active"), Some(0), "{last}");
}

#[test]
fn emfile_after_lowering_the_limit_sheds_pauses_once_and_recovers() {
    let _serial = timing_lock();
    let (mut bin, addr) = serve(&["--fd-check-interval", "0"]);
    bin.wait_first_stats();
    let pid = bin.pid();
    let baseline = fd_count(pid);

    // Lower the running server's limit below what its cap (computed at start) assumes.
    let status = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={NOFILE}:{NOFILE}"),
        ])
        .status()
        .expect("run prlimit (util-linux)");
    assert!(status.success(), "prlimit --pid failed: {status}");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert!(
        line.split_whitespace().nth(3) == Some(&NOFILE.to_string()),
        "{line}"
    );

    // 200 connections: as many as the fds allow echo, the rest are shed promptly. Descriptors
    // inherited with a number at or above the limit (a test harness's pipe) take no room.
    let room = NOFILE as usize - fds_below(pid, NOFILE);
    let (mut accepted, closed, slowest_close) = open_many(addr);
    assert_eq!(
        accepted.len(),
        room,
        "accepted connections (limit {NOFILE}, {baseline} fds before)"
    );
    assert_eq!(closed, CLIENTS - room);
    // Out of fds: CPU stays far from a spinning loop, new connections are shed, not left hanging.
    let (cpu, slowest_shed, attempts) = saturated(pid, addr, &mut accepted, "while out of fds");
    let line = bin.wait_line("stats line with every shed", |l| {
        is_stats(l) && stat(l, "shed") == Some((CLIENTS - room + attempts) as u64)
    });
    let emfile = stat(&line, "emfile").unwrap_or(0);
    assert!(emfile > 1, "{line}");
    assert!(
        stat(&line, "accept_pauses").is_some_and(|n| n > 1),
        "{line}"
    );
    // Many failed accepts (one per retry), one warning: the transition into exhaustion.
    assert_eq!(
        transitions(&bin.log),
        ["accept paused"],
        "warnings while out of fds ({emfile} EMFILE errors); log:\n{}",
        bin.log()
    );
    assert_eq!(stat(&line, "active"), Some(room as u64), "{line}");
    assert_eq!(stat(&line, "closed"), Some(0), "{line}");

    // A freed fd resumes accepting at once; after the load, the fds are back to the baseline.
    let (freed, recovered) = assert_recovers(&mut bin, addr, baseline, accepted);

    // One warning per transition, however many accepts failed in between: paused and resumed
    // alternate. Each time the last free fd is taken, the next accept fails with EMFILE (Linux
    // allocates the fd before looking at the queue), so the freed-fd and recovery steps above may
    // each add a pair; a warning per attempt would add one per retry (every 100 ms).
    let seen = transitions(&bin.log);
    assert!(
        seen.iter()
            .enumerate()
            .all(|(i, t)| *t == ["accept paused", "accept resumed"][i % 2])
            && (2..=6).contains(&seen.len()),
        "paused/resumed warnings do not alternate once per transition: {seen:?}; log:\n{}",
        bin.log()
    );
    let pauses = stat(&line, "accept_pauses").unwrap();
    eprintln!(
        "EMFILE path (limit {NOFILE} under a cap of {}): CPU {:.1} % of a core over {CPU_WINDOW:?} \
         with {attempts} connects shed; {emfile} EMFILE errors, {pauses} pauses; overflow closed \
         within {slowest_close:?}, later connects shed within {slowest_shed:?}; freed fd -> echo \
         {freed:?}; echo after load {recovered:?}",
        stat(&bin.log[0], "max_connections").unwrap_or(0),
        cpu * 100.0
    );
    bin.terminate();
}

/// Spawns `sockman serve` on 127.0.0.1:0 with stats every 100 ms and `extra` flags.
#[track_caller]
fn serve(extra: &[&str]) -> (Bin, SocketAddr) {
    Bin::serve(&[&["--stats-interval", "100ms"], extra].concat())
}

/// `n` connections, each echoed once (so each is admitted when this returns).
#[track_caller]
fn open_echoing(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = connect(addr);
            echo(&mut s, format!("client {i}").as_bytes());
            s
        })
        .collect()
}

/// 50 connections, each echoed once, then a 51st that the server must close at once; returns the
/// 50 and the first stats line that counts the 51st as rejected with `full`.
#[track_caller]
fn fifty_and_a_refused_one(bin: &mut Bin, addr: SocketAddr) -> (Vec<TcpStream>, String) {
    let clients = open_echoing(addr, 50);
    let mut extra = connect(addr);
    expect_closed(&mut extra);
    let line = bin.wait_line("stats line with the reject", |l| {
        is_stats(l) && stat(l, "full") == Some(1)
    });
    (clients, line)
}

#[test]
fn max_connections_rejects_the_51st() {
    let (mut bin, addr) = serve(&["--max-connections", "50"]);
    let (mut clients, line) = fifty_and_a_refused_one(&mut bin, addr);
    assert_eq!(stat(&line, "rejected"), Some(1), "{line}");
    assert_eq!(stat(&line, "active"), Some(50), "{line}");
    assert_eq!(stat(&line, "closed"), Some(0), "{line}");
    for s in &mut clients {
        echo(s, b"still here");
    }
    // A slot freed is a slot taken.
    close_gracefully(clients.pop().unwrap());
    clients.extend(open_echoing(addr, 1));
    drop(clients);
    bin.terminate();
}

/// [`serve`] with a cap of 50 connections and `--on-full evict-idle --evict-min-idle MIN_IDLE`.
#[track_caller]
fn serve_evicting(min_idle: &str) -> (Bin, SocketAddr) {
    serve(&[
        "--max-connections",
        "50",
        "--on-full",
        "evict-idle",
        "--evict-min-idle",
        min_idle,
    ])
}

/// The `--on-full evict-idle` wiring on the binary: the least recently active connection makes
/// room. `--evict-min-idle 0` makes every connection evictable at once, so no time has to pass;
/// the minimum idle time itself is asserted to the tick in-process (tests/evict_idle.rs).
#[test]
fn evict_idle_makes_room_by_closing_the_longest_idle() {
    let (mut bin, addr) = serve_evicting("0");
    let mut clients = open_echoing(addr, 50);
    // Connection 0 is the least recently active; the rest are touched again after it.
    echo(&mut clients[0], b"oldest");
    for s in &mut clients[1..] {
        echo(s, b"newer");
    }
    let mut newcomer = connect(addr);
    echo(&mut newcomer, b"newcomer");
    expect_closed(&mut clients[0]);
    let line = bin.wait_line("stats line with the eviction", |l| {
        is_stats(l) && stat(l, "evicted") == Some(1)
    });
    assert_eq!(stat(&line, "active"), Some(50), "{line}");
    assert_eq!(stat(&line, "accepted"), Some(51), "{line}");
    assert_eq!(stat(&line, "closed"), Some(1), "{line}");
    assert_eq!(stat(&line, "rejected"), Some(0), "{line}");
    for s in &mut clients[1..] {
        echo(s, b"still here");
    }
    echo(&mut newcomer, b"still here");
    bin.terminate();
}

#[test]
fn evict_idle_rejects_when_none_is_idle_long_enough() {
    let (mut bin, addr) = serve_evicting("30s");
    let (mut clients, line) = fifty_and_a_refused_one(&mut bin, addr);
    assert_eq!(stat(&line, "active"), Some(50), "{line}");
    assert_eq!(stat(&line, "closed"), Some(0), "nothing evicted: {line}");
    assert_eq!(stat(&line, "evicted"), None, "{line}");
    for s in &mut clients {
        echo(s, b"still here");
    }
    bin.terminate();
}

#[test]
fn max_per_ip_rejects_the_4th_from_one_address_but_not_another() {
    let (mut bin, addr) = serve(&["--max-per-ip", "3"]);
    let mut from_one: Vec<TcpStream> = (0..3)
        .map(|i| {
            let mut s = connect_from([127, 0, 0, 1], addr);
            echo(&mut s, format!("one {i}").as_bytes());
            s
        })
        .collect();
    let mut fourth = connect_from([127, 0, 0, 1], addr);
    expect_closed(&mut fourth);
    let mut other = connect_from([127, 0, 0, 2], addr);
    echo(&mut other, b"from 127.0.0.2");
    let line = bin.wait_line("stats line with the per-IP reject", |l| {
        is_stats(l) && stat(l, "per_ip") == Some(1) && stat(l, "active") == Some(4)
    });
    assert_eq!(stat(&line, "rejected"), Some(1), "{line}");
    for s in &mut from_one {
        echo(s, b"still here");
    }
    // A closed connection frees its address's slot.
    close_gracefully(from_one.pop().unwrap());
    let mut again = connect_from([127, 0, 0, 1], addr);
    echo(&mut again, b"room again");
    bin.terminate();
}

#[test]
fn a_connect_flood_does_not_delay_an_established_connection() {
    let _serial = timing_lock();
    let (mut bin, addr) = serve(&[]);
    bin.wait_first_stats();
    let mut established = connect(addr);
    echo(&mut established, b"warm up");

    let stop = Arc::new(AtomicBool::new(false));
    let flooding = Arc::new(AtomicBool::new(true));
    let flood = {
        let (stop, flooding) = (Arc::clone(&stop), Arc::clone(&flooding));
        std::thread::spawn(move || {
            use socket2::{Domain, Protocol, Socket, Type};
            let (mut ok, mut failed) = (0u64, 0u64);
            let t = Instant::now();
            // As fast as one thread can, for 2 s, bounded in count (this machine does ~20 000/s).
            // RST on close (linger 0): no TIME_WAIT, so the count cannot exhaust local ports.
            while !stop.load(Ordering::Acquire)
                && ok + failed < FLOOD_MAX
                && t.elapsed() < FLOOD_TIME
            {
                let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
                s.set_linger(Some(Duration::ZERO)).unwrap();
                match s.connect_timeout(&addr.into(), Duration::from_secs(1)) {
                    Ok(()) => ok += 1,
                    Err(_) => failed += 1,
                }
            }
            flooding.store(false, Ordering::Release);
            (ok, failed, t.elapsed())
        })
    };

    // 1-byte ping-pongs, one per millisecond, while the flood runs.
    let mut latencies = Vec::new();
    let t = Instant::now();
    let mut b = [0; 1];
    while flooding.load(Ordering::Acquire) && t.elapsed() < util::WAIT && latencies.len() < 100_000
    {
        let sent = Instant::now();
        established.write_all(b"p").unwrap();
        established
            .read_exact(&mut b)
            .expect("the established connection stopped echoing");
        latencies.push(sent.elapsed());
        assert_eq!(&b, b"p");
        // Pacing, not synchronisation: about one ping per millisecond (the loop is bounded by
        // the flood's end, `WAIT` and a count).
        std::thread::sleep(Duration::from_millis(1));
    }
    stop.store(true, Ordering::Release);
    let (ok, failed, flood_time) = flood.join().unwrap();
    latencies.sort();
    let p50 = util::quantile(&latencies, 0.50);
    let p99 = util::quantile(&latencies, 0.99);
    let max = *latencies.last().unwrap();
    let rate = ok as f64 / flood_time.as_secs_f64();
    eprintln!(
        "connect flood: {ok} connects ({failed} failed) in {flood_time:?} = {rate:.0}/s; \
         established echo over {} pings: p50 {p50:?} p99 {p99:?} max {max:?}",
        latencies.len()
    );
    assert!(
        ok >= 1_000,
        "the flood made only {ok} connects ({failed} failed)"
    );
    assert!(p50 < Duration::from_millis(5), "p50 echo latency {p50:?}");
    assert!(max < Duration::from_millis(200), "max echo latency {max:?}");
    echo(&mut established, b"still here");
    close_gracefully(established);
    let line = bin.wait_line("stats line after the flood", |l| {
        is_stats(l) && stat(l, "active") == Some(0) && stat(l, "accepted") >= Some(ok / 2)
    });
    assert!(stat(&line, "peer_closed").unwrap_or(0) >= 1, "{line}");
    bin.terminate();
}
