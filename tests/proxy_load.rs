//! `sockman proxy` under many sessions, in a process of its own (the test process holds one
//! socket per client, and these two tests take both cores for a few seconds): 5 000 idle
//! sessions held and released, and 50 000 churned sessions (the `sockman load` generator) with
//! every fd given back. The upstream is a `sockman serve` child, so that its sockets count
//! against neither the test process nor the proxy.
#![cfg(feature = "cli")]

mod util;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use util::child::Bin;
use util::procfs::fd_count;
use util::proxy::{serve_child, Proxy};
use util::{connect, read_exactly};

/// The tests here run one at a time: each wants both cores and thousands of sockets.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// A `sockman serve` upstream and a `sockman proxy` in front of it (leak self-check every
/// 200 ms), once the proxy's first stats line is out: everything that lives for the whole run
/// is set up by then. Returns both and the proxy's descriptor count at that point.
#[track_caller]
fn proxy_in_front_of_serve() -> (Bin, Proxy, usize) {
    let (serve, up) = serve_child(&[]);
    let mut proxy = Proxy::spawn(up, &["--fd-check-interval", "200ms"]);
    proxy.bin.wait_first_stats();
    let baseline = fd_count(proxy.bin.pid());
    (serve, proxy, baseline)
}

/// Waits until the child `pid` has exactly `want` descriptors (closes are asynchronous to the
/// test: the proxy closes the last side after the upstream's FIN); fails after `within`.
#[track_caller]
fn wait_fds(pid: u32, want: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let now = fd_count(pid);
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy has {now} fds, not {want}, after {within:?}"
        );
        // The sampling interval: nothing announces the last close to the test.
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn five_thousand_idle_sessions_are_held_then_all_released() {
    const N: usize = 5_000;
    let _one = one_at_a_time();
    let (_serve, proxy, baseline) = proxy_in_front_of_serve();
    let pid = proxy.bin.pid();

    // One at a time (connect, echo one byte): the proxy's backlog never overflows, and every
    // session is known to be relaying before the next one starts.
    let started = Instant::now();
    let mut clients = Vec::with_capacity(N);
    for i in 0..N {
        let mut client = connect(proxy.addr);
        client.write_all(&[i as u8]).unwrap();
        assert_eq!(read_exactly(&mut client, 1), [i as u8], "session {i}");
        clients.push(client);
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "only {i} sessions opened in 60 s"
        );
    }
    let opened_in = started.elapsed();
    let m = proxy.wait_metrics("every session open", |m| {
        m.get("sockman_connections_active") == N as i64
    });
    assert_eq!(m.get(&proxy.up("sessions_active")), N as i64, "{m}");
    assert_eq!(m.get("sockman_connections_dialed_active"), N as i64, "{m}");
    assert_eq!(m.get(&proxy.up("sessions_total")), N as i64, "{m}");
    assert_eq!(m.closed_all(), 0, "{m}");
    wait_fds(pid, baseline + 2 * N, util::WAIT);
    // The first, a middle and the last session still relay with all of them open.
    for i in [0, N / 2, N - 1] {
        util::echo(
            &mut clients[i],
            format!("session {i} still there").as_bytes(),
        );
    }

    drop(clients); // 5 000 FINs at once
    let closing = Instant::now();
    let m = proxy.wait_metrics_for(Duration::from_secs(30), "every session closed", |m| {
        m.get("sockman_connections_active") == 0
            && m.get("sockman_connections_dialed_active") == 0
            && m.get("sockman_connections_lingering") == 0
    });
    let closed_in = closing.elapsed();
    assert_eq!(m.get(&proxy.up("sessions_active")), 0, "{m}");
    assert_eq!(m.closed_all(), N as i64, "{m}");
    assert_eq!(m.dialed_closed_all(), N as i64, "{m}");
    assert_eq!(m.get(&proxy.up("dial_failures_total")), 0, "{m}");
    wait_fds(pid, baseline, util::WAIT);
    let m = proxy.wait_metrics("a leak self-check after the closes", |m| {
        m.get("sockman_fds_unaccounted") == 0 && m.get("sockman_fds_open") < baseline as i64 + 8
    });
    assert_eq!(m.get("sockman_connections_active"), 0, "{m}");
    eprintln!("{N} sessions opened one by one in {opened_in:?}, all closed in {closed_in:?}");
}

/// Runs `sockman load --mode churn` against `addr` for `duration` and returns its JSON report;
/// fails if it does not end within `duration` plus a margin, or fails.
#[track_caller]
fn churn(addr: SocketAddr, duration: &str, within: Duration) -> serde_json::Value {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sockman"))
        .args([
            "load",
            "--connect",
            &addr.to_string(),
            "--mode",
            "churn",
            "--connections",
            "50",
            "--duration",
            duration,
            "--source-addrs",
            "127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7,127.0.0.8,127.0.0.9",
            "--json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sockman load");
    let (mut stdout, mut stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut out = String::new();
        let mut err = String::new();
        let _ = stdout.read_to_string(&mut out);
        let _ = stderr.read_to_string(&mut err);
        let _ = tx.send((out, err));
    });
    let Ok((out, err)) = rx.recv_timeout(within) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("sockman load did not end in {within:?}");
    };
    let status = child.wait().unwrap();
    assert!(status.success(), "sockman load: {status}\n{err}");
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("sockman load printed no JSON report ({e}): {out:?}\n{err}"))
}

#[test]
fn fifty_thousand_churned_sessions_leave_no_fd_behind() {
    const SESSIONS: i64 = 50_000;
    const WORKERS: i64 = 50;
    let _one = one_at_a_time();
    let (_serve, proxy, baseline) = proxy_in_front_of_serve();
    let pid = proxy.bin.pid();

    // 8 s runs (after the generator's 1 s warmup) until 50 000 sessions have gone through: one
    // run on this machine (about 9 000 sessions/s in debug), more on a slower one, within 50 s.
    let started = Instant::now();
    let mut connected = 0;
    let mut runs = 0;
    let sessions = loop {
        let report = churn(proxy.addr, "8s", Duration::from_secs(30));
        runs += 1;
        assert_eq!(report["mode"], "churn", "{report}");
        assert_eq!(
            report["errors"],
            serde_json::json!({}),
            "the generator saw errors: {report}"
        );
        assert_eq!(report["closed_by_server"], 0, "{report}");
        let ops = report["ops"].as_u64().expect("ops");
        assert!(ops > 0, "no session completed: {report}");
        connected += report["connected"].as_i64().expect("connected");
        let m = proxy.scrape();
        let sessions = m.get(&proxy.up("sessions_total"));
        eprintln!(
            "run {runs}: {sessions} sessions after {:?}",
            started.elapsed()
        );
        // Every connect the generator saw became a session; a few more may have connected in
        // the kernel as a run ended (closed by the generator before it saw them complete).
        assert!(
            connected <= sessions && sessions <= connected + WORKERS * runs,
            "the generator connected {connected} times, the proxy counts {sessions} sessions\n{m}"
        );
        if sessions >= SESSIONS {
            break sessions;
        }
        assert!(
            runs < 8 && started.elapsed() < Duration::from_secs(50),
            "only {sessions} sessions in {runs} runs ({:?})",
            started.elapsed()
        );
    };
    let churned_in = started.elapsed();

    let m = proxy.wait_idle("every churned session to end");
    assert_eq!(m.get("sockman_connections_connecting"), 0, "{m}");
    assert_eq!(m.closed_all(), sessions, "{m}");
    assert_eq!(m.dialed_closed_all(), sessions, "{m}");
    assert_eq!(m.get(&proxy.up("dial_failures_total")), 0, "{m}");
    assert_eq!(m.get("sockman_proxy_no_upstream_total"), 0, "{m}");
    wait_fds(pid, baseline, util::WAIT);
    // A leak self-check that ran after the last close finds nothing unaccounted for.
    let m = proxy.wait_metrics("a leak self-check after the churn", |m| {
        m.get("sockman_fds_open") < baseline as i64 + 8 && m.get("sockman_fds_unaccounted") == 0
    });
    assert_eq!(m.get("sockman_connections_active"), 0, "{m}");
    // Waited for, not read once: the scrape's own admin connection ends as the test reads EOF.
    wait_fds(pid, baseline, util::WAIT);
    eprintln!("{sessions} sessions in {runs} runs, {churned_in:?}");
}
