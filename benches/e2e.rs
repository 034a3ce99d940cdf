//! End to end: the library server on 127.0.0.1:0 (a thread of this process) driven for a few
//! seconds per point by the `sockman` binary as a child process (`sockman load ... --json`),
//! the figures printed.
//!
//! `cargo bench --bench e2e` (CI only builds it). Server and client share the machine's two
//! cores, so the figures are for spotting regressions between runs of this bench; the
//! comparison with peers lives in `benches/compare.sh` and BENCHMARKS.md.
use std::net::SocketAddr;
use std::process::Command;

use serde_json::Value;
use sockman::{Config, Echo, Server};

/// The binary Cargo built for this bench.
const SOCKMAN: &str = env!("CARGO_BIN_EXE_sockman");

fn main() {
    // `cargo bench` passes `--bench`; a name filter selects points, like criterion's.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let config = Config {
        listen: vec!["127.0.0.1:0".parse().unwrap()],
        ..Config::default()
    };
    let server = Server::bind(config, Echo).expect("bind the server");
    let addr = server.local_addrs()[0];
    let handle = server.handle();
    let thread = std::thread::spawn(move || server.run());

    let points = [
        ("pingpong_64B_1conn", "pingpong", 1, 64, 1),
        ("pingpong_64B_50conns", "pingpong", 50, 64, 1),
        ("pingpong_1KiB_50conns", "pingpong", 50, 1024, 1),
        ("pipeline_16_50conns", "pipeline", 50, 64, 16),
        ("stream_64KiB_1conn", "stream", 1, 64 * 1024, 1),
        ("churn_10conns", "churn", 10, 64, 1),
    ];
    for (name, mode, connections, size, depth) in points {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        match load(addr, mode, connections, size, depth) {
            Ok((json, report)) => println!("== {name}\n{}\n  {json}\n", summary(&report)),
            Err(e) => println!("== {name}: failed: {e}\n"),
        }
    }
    handle.shutdown();
    let metrics = thread.join().expect("server thread").expect("server loop");
    println!("server: {metrics}");
    assert_eq!(metrics.active, 0, "connections left open");
}

/// Runs `sockman load` against `addr` for 2 s after a 0.5 s warm-up; returns its JSON report as
/// printed and parsed.
fn load(
    addr: SocketAddr,
    mode: &str,
    connections: usize,
    size: usize,
    depth: usize,
) -> Result<(String, Value), String> {
    let mut cmd = Command::new(SOCKMAN);
    cmd.arg("load")
        .args(["--connect", &addr.to_string()])
        .args(["--connections", &connections.to_string()])
        .args(["--mode", mode])
        .args(["--size", &size.to_string()])
        .args(["--depth", &depth.to_string()])
        .args(["--duration", "2s", "--warmup", "500ms", "--json"]);
    // Every flag is given, but a SOCKMAN_LOAD_* variable (e.g. --rate, --source-addrs) of the
    // caller's environment would still reach the child.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SOCKMAN_") {
            cmd.env_remove(key);
        }
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {SOCKMAN}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let json = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let report = serde_json::from_str(&json).map_err(|e| format!("bad JSON ({e}): {json}"))?;
    Ok((json, report))
}

/// The report's main figures on one line.
fn summary(r: &Value) -> String {
    let f = |v: &Value, decimals: usize| match v.as_f64() {
        Some(x) => format!("{x:.decimals$}"),
        None => "n/a".to_string(),
    };
    let lat = &r["latency_us"];
    let mut line = format!(
        "  ops {} ({}/s)  {} MB/s  latency µs p50 {} p99 {} max {}",
        r["ops"],
        f(&r["ops_per_sec"], 0),
        f(&r["mb_per_sec"], 1),
        f(&lat["p50"], 1),
        f(&lat["p99"], 1),
        f(&lat["max"], 1),
    );
    if r["mode"] == "churn" {
        line += &format!("  connects/s {}", f(&r["connects_per_sec"], 0));
    }
    line += &format!(
        "  errors {}  closed by server {}",
        r["errors"], r["closed_by_server"]
    );
    line
}
