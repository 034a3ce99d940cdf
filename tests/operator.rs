//! What an operator of the binary sees (issue 19): log timestamps, the help text, host names on
//! the command line. Each test runs `sockman` as a child and bounds every wait.
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
