//! End to end, in one process: the library server on 127.0.0.1:0 (its own thread) driven for a
//! few seconds per point by the load generator's library code, the figures printed.
//!
//! `cargo bench --bench e2e` (CI only builds it). Server and client share this process and the
//! machine's two cores, so the figures are for spotting regressions between runs of this bench;
//! the comparison with peers lives in `benches/compare.sh` and BENCHMARKS.md.
use std::time::Duration;

use sockman::load::{self, LoadConfig, Mode};
use sockman::{Config, Echo, Server};

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
        ("pingpong_64B_1conn", Mode::Pingpong, 1, 64, 1),
        ("pingpong_64B_50conns", Mode::Pingpong, 50, 64, 1),
        ("pingpong_1KiB_50conns", Mode::Pingpong, 50, 1024, 1),
        ("pipeline_16_50conns", Mode::Pipeline, 50, 64, 16),
        ("stream_64KiB_1conn", Mode::Stream, 1, 64 * 1024, 1),
        ("churn_10conns", Mode::Churn, 10, 64, 1),
    ];
    for (name, mode, connections, size, depth) in points {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        let config = LoadConfig {
            connect: addr,
            connections,
            mode,
            size,
            depth,
            duration: Duration::from_secs(2),
            warmup: Duration::from_millis(500),
            ..LoadConfig::default()
        };
        match load::run(&config) {
            Ok(report) => println!("== {name}\n{report}\n"),
            Err(e) => println!("== {name}: failed: {e}\n"),
        }
    }
    handle.shutdown();
    let metrics = thread.join().expect("server thread").expect("server loop");
    println!("server: {metrics}");
    assert_eq!(metrics.active, 0, "connections left open");
}
