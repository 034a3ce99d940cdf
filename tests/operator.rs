//! What an operator of the binary sees (issue 19): log timestamps, the help text, host names on
//! the command line (resolved at start; a name that does not resolve is a clear error). Each test
//! runs `sockman` as a child and bounds every wait.
#![cfg(feature = "cli")]

mod util;

use util::child::Bin;

/// Whether `line` starts with env_logger's bracketed timestamp in milliseconds, UTC:
/// `[2026-12-03T06:22:34.123Z ...`.
fn has_millisecond_timestamp(line: &str) -> bool {
    let Some(stamp) = line.strip_prefix('[').and_then(|l| l.split(' ').next()) else {
        return false;
    };
    let b = stamp.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b[i].is_ascii_digit());
    b.len() == 24
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..23)
        && b[23] == b'Z'
}

#[test]
fn log_lines_carry_milliseconds() {
    let (mut bin, _) = Bin::serve(&[]);
    let line = bin.log.last().expect("the listening line").clone();
    assert!(has_millisecond_timestamp(&line), "{line}");
    bin.terminate();
    let last = bin.final_line();
    assert!(has_millisecond_timestamp(last), "{last}");
}
#[test]
fn serve_help_names_every_admin_path() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sockman"))
        .args(["serve", "--help"])
        .output()
        .expect("run sockman serve --help");
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    let admin = help
        .split("--admin <ADDR>")
        .nth(1)
        .expect("--admin in the help")
        .split("\n      --")
        .next()
        .unwrap();
    for path in ["/metrics", "/connections", "/livez", "/readyz", "/health"] {
        assert!(admin.contains(path), "--admin's help lacks {path}:{admin}");
    }
}

#[test]
fn a_host_name_listens_on_each_of_its_addresses_admin_included() {
    let mut bin = Bin::spawn(&["serve", "--listen", "localhost:0", "--admin", "localhost:0"]);
    let (addr, admin) = bin.wait_listening_with_admin();
    assert!(addr.ip().is_loopback(), "{addr}");
    let mut c = util::connect(addr);
    util::echo(&mut c, b"by name");
    assert_eq!(util::http::get(admin, "/livez").status, 200);
    bin.terminate();
}

#[test]
fn a_host_name_that_does_not_resolve_is_one_clear_error() {
    // `.invalid` never resolves (RFC 6761); the resolver answers at once here (no DNS beyond
    // the registries), and `wait_failure` bounds the wait anyway (it kills the child after
    // util::WAIT).
    for args in [
        &["serve", "--listen", "no-such-host.invalid:7000"][..],
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "no-such-host.invalid:9090",
        ],
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "no-such-host.invalid:5432",
        ],
    ] {
        let log = Bin::spawn(args).wait_failure();
        assert!(
            log.contains("cannot resolve host name \"no-such-host.invalid\""),
            "{args:?}: {log}"
        );
        let naming = log.lines().filter(|l| l.contains("no-such-host.invalid"));
        assert_eq!(naming.count(), 1, "one error line: {args:?}: {log}");
    }
}

#[test]
fn a_proxy_dials_an_upstream_given_by_name() {
    let (mut upstream, up) = Bin::serve(&[]);
    let target = format!("localhost:{}", up.port());
    let mut proxy = Bin::spawn(&["proxy", "--listen", "127.0.0.1:0", "--upstream", &target]);
    let addr = proxy.wait_listening();
    let mut c = util::connect(addr);
    util::echo(&mut c, b"through an upstream named localhost");
    drop(c);
    proxy.terminate();
    upstream.terminate();
}

/// The `key=value` of an access log line, e.g. `field(line, "client")`.
#[track_caller]
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(' ')
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// Whether `line` is an access log line: it starts with its time, `2026-12-03T06:22:34.123Z`.
fn is_access_line(line: &str) -> bool {
    has_millisecond_timestamp(&format!("[{line}"))
}

#[test]
fn serve_logs_one_line_per_connection_to_a_file_reopened_on_sighup() {
    let dir = util::TempDir::new("access-log");
    let path = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    let p = path.to_str().unwrap();
    let (mut bin, addr, admin) = Bin::serve_with_admin(&["--access-log", p]);
    let m = util::http::get(admin, "/metrics");
    assert_eq!(
        util::http::sample(&m.body, "sockman_access_log_dropped_total"),
        Some(0),
        "{}",
        m.body
    );
    // Two connections, then the rotation: renamed, SIGHUP, reopened...
    let mut ports = Vec::new();
    for msg in [&b"one"[..], b"second"] {
        let mut c = util::connect(addr);
        ports.push(c.local_addr().unwrap().port());
        util::echo(&mut c, msg);
        util::close_gracefully(c);
    }
    // Their lines reach the file within the loop's flush interval (100 ms); a line still in
    // the loop's batch at the rotation would go to the new file (none is lost either way).
    let deadline = std::time::Instant::now() + util::WAIT;
    while std::fs::read_to_string(&path).unwrap().lines().count() < 2 {
        assert!(std::time::Instant::now() < deadline, "no lines in {path:?}");
        // The polling interval of a file another process writes (no event to wait on).
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::fs::rename(&path, &rotated).unwrap();
    bin.signal("HUP");
    bin.wait_line("the reopen", |l| {
        l.contains("access log") && l.contains("reopened")
    });
    // ...and one more, which goes to the new file.
    let mut c = util::connect(addr);
    let last = c.local_addr().unwrap().port();
    util::echo(&mut c, b"after the rotation");
    util::close_gracefully(c);
    // At exit every line is written (the loop's last batch, then the writer's queue).
    bin.terminate();
    let before = std::fs::read_to_string(&rotated).unwrap();
    let after = std::fs::read_to_string(&path).unwrap();
    let before: Vec<&str> = before.lines().collect();
    let after: Vec<&str> = after.lines().collect();
    assert_eq!(before.len(), 2, "{before:?}");
    assert_eq!(after.len(), 1, "{after:?}");
    for (line, (port, len)) in
        before
            .iter()
            .chain(&after)
            .zip([(ports[0], 3), (ports[1], 6), (last, 18)])
    {
        assert!(is_access_line(line), "{line}");
        assert_eq!(field(line, "client"), format!("127.0.0.1:{port}"), "{line}");
        assert_eq!(field(line, "bytes_in"), len.to_string(), "{line}");
        assert_eq!(field(line, "bytes_out"), len.to_string(), "{line}");
        assert_eq!(field(line, "reason"), "peer_closed", "{line}");
        let ms: u64 = field(line, "duration_ms").parse().unwrap();
        assert!(ms < 10_000, "{line}");
    }
    assert!(
        bin.final_line().contains(" access_log_dropped=0"),
        "{}",
        bin.log()
    );
}

#[test]
fn serve_logs_the_proxy_protocol_client_and_dev_null_takes_the_lines() {
    let (mut bin, addr) = Bin::serve(&["--proxy-protocol", "v1", "--access-log", "-"]);
    let mut c = util::connect(addr);
    std::io::Write::write_all(&mut c, b"PROXY TCP4 192.0.2.7 127.0.0.1 51000 7000\r\n").unwrap();
    util::echo(&mut c, b"hi");
    util::close_gracefully(c);
    let line = bin.wait_line("the access log line", is_access_line);
    assert_eq!(field(&line, "client"), "192.0.2.7:51000", "{line}");
    assert_eq!(field(&line, "bytes_in"), "2", "{line}");
    bin.terminate();

    // The figure BENCHMARKS.md measures: the log on, to /dev/null.
    let (mut bin, addr) = Bin::serve(&["--access-log", "/dev/null"]);
    for _ in 0..20 {
        let mut c = util::connect(addr);
        util::echo(&mut c, b"churn");
        util::close_gracefully(c);
    }
    bin.terminate();
    assert!(
        bin.final_line().contains(" access_log_dropped=0"),
        "{}",
        bin.log()
    );
}

#[test]
fn a_proxy_logs_one_line_per_session_with_its_upstream_and_termination_state() {
    let (mut upstream, up) = Bin::serve(&[]);
    let mut proxy = Bin::spawn(&[
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &up.to_string(),
        "--access-log",
        "-",
    ]);
    let addr = proxy.wait_listening();
    // A session that ends normally, then one whose client resets.
    let mut c = util::connect(addr);
    let first = c.local_addr().unwrap();
    util::echo(&mut c, b"a normal session");
    util::close_gracefully(c);
    let line = proxy.wait_line("the first session's line", is_access_line);
    assert_eq!(field(&line, "client"), first.to_string(), "{line}");
    assert_eq!(field(&line, "upstream"), up.to_string(), "{line}");
    assert_eq!(field(&line, "bytes_in"), "16", "{line}");
    assert_eq!(field(&line, "bytes_out"), "16", "{line}");
    assert_eq!(field(&line, "state"), "--", "{line}");
    assert_eq!(field(&line, "reason"), "handler", "{line}");
    let mut c = util::connect(addr);
    util::echo(&mut c, b"then a reset");
    util::abort(c);
    let line = proxy.wait_line("the second session's line", is_access_line);
    assert_eq!(field(&line, "state"), "CD", "{line}");
    assert_eq!(field(&line, "reason"), "reset", "{line}");
    proxy.terminate();
    upstream.terminate();
}
