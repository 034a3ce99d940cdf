//! `sockman proxy` out of descriptors: a dial whose socket cannot even be created (EMFILE) is
//! the proxy's own failure, not the upstream's. It is counted apart
//! (`sockman_proxy_local_dial_errors_total`, `local_dial_errors=` on the stats line), its
//! client is shed, and the upstreams' passive health is left alone: healthy upstreams are not
//! marked down for the proxy's lack of descriptors.
#![cfg(all(feature = "cli", feature = "admin"))]

mod util;

use std::io::Read;

use sockman::Echo;
use util::child::{is_stats, Bin};
use util::proxy::Scrape;
use util::{connect, echo, http, local_config, procfs, stat};

/// Sets the open-file limit of the running process `pid` with `prlimit --pid` (util-linux).
#[track_caller]
fn set_nofile(pid: u32, soft: u64, hard: u64) {
    let status = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={soft}:{hard}"),
        ])
        .status()
        .expect("run prlimit (util-linux)");
    assert!(status.success(), "prlimit --pid {pid} failed: {status}");
}

/// The soft and hard `Max open files` of process `pid`.
#[track_caller]
fn nofile(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut fields = line.split_whitespace().skip(3);
    let mut next = || fields.next().unwrap().parse().unwrap();
    (next(), next())
}

#[test]
fn a_proxy_out_of_descriptors_sheds_clients_and_leaves_healthy_upstreams_up() {
    let a = util::start(local_config(), Echo);
    let b = util::start(local_config(), Echo);
    let upstreams = format!("{},{}", a.addr, b.addr);
    let mut bin = Bin::spawn(&[
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstreams,
        "--admin",
        "127.0.0.1:0",
        "--stats-interval",
        "100ms",
        "--fd-check-interval",
        "0",
    ]);
    let (addr, admin) = bin.wait_listening_with_admin();
    bin.wait_first_stats();
    let pid = bin.pid();
    let (soft, hard) = nofile(pid);
    // Room for exactly one more descriptor (the numbers in use need not be contiguous): an
    // accept takes it, so the dial's socket() fails with EMFILE.
    let limit = (1..=soft)
        .find(|&l| l as usize - procfs::fds_below(pid, l) == 1)
        .expect("a limit with room for one descriptor");
    set_nofile(pid, limit, hard);
    const CLIENTS: u64 = 4; // above --upstream-max-fails (3) per upstream
    for i in 1..=CLIENTS {
        let mut c = connect(addr);
        let mut buf = [0; 16];
        match c.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("client {i}: expected to be shed, read {other:?}"),
        }
        drop(c);
        // Its close lingers until our EOF: the next client needs the descriptor back.
        bin.wait_line("the shed client's descriptor back", |l| {
            is_stats(l) && stat(l, "lingered") == Some(i) && stat(l, "lingering") == Some(0)
        });
    }
    set_nofile(pid, soft, hard);

    let m = Scrape(http::get(admin, "/metrics").body);
    for up in [a.addr, b.addr] {
        for family in ["dial_failures_total", "marked_down_total", "dials_total"] {
            let name = format!("sockman_upstream_{family}{{upstream=\"{up}\"}}");
            assert_eq!(
                m.get(&name),
                0,
                "{name}, blamed for the proxy's EMFILE: {m}"
            );
        }
    }
    assert_eq!(
        m.get("sockman_proxy_local_dial_errors_total"),
        CLIENTS as i64,
        "{m}"
    );
    let line = bin.wait_line("stats line with every local dial error", |l| {
        is_stats(l) && stat(l, "local_dial_errors") == Some(CLIENTS)
    });
    assert_eq!(stat(&line, "dial_failures"), Some(0), "{line}");
    assert_eq!(stat(&line, "no_upstream"), Some(0), "{line}");
    // Each shed session ended for lack of a resource of the proxy's, while connecting.
    assert_eq!(stat(&line, "RC"), Some(CLIENTS), "{line}");
    // Descriptors are back: clients get through, and no upstream is skipped as down.
    for i in 0..4 {
        let mut c = connect(addr);
        echo(&mut c, format!("after {i}").as_bytes());
    }
    let m = Scrape(http::get(admin, "/metrics").body);
    assert_eq!(m.get("sockman_proxy_skipped_total"), 0, "{m}");
    for up in [a.addr, b.addr] {
        let name = format!("sockman_upstream_sessions_total{{upstream=\"{up}\"}}");
        assert_eq!(m.get(&name), 2, "round robin over both: {m}");
    }
    bin.terminate();
    bin.assert_log(&["out of descriptors"], &["dials in a row", "panicked"]);
    for up in [a, b] {
        up.handle.shutdown();
        up.thread.join().unwrap();
    }
}
