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
