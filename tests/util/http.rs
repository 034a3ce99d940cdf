//! A minimal HTTP/1.1 client for the admin endpoint, and the samples of its `/metrics`.
//!
//! Every wait is bounded: reads carry [`IO_TIMEOUT`](super::IO_TIMEOUT) as a safety net.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};

/// One HTTP response: status code, head (status line and headers) and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: String,
    /// The server closed the connection after the response (EOF or a reset after it).
    pub closed: bool,
}

/// Sends `request` as-is on a new connection to `addr` and reads the response until the server
/// closes (the admin endpoint answers `Connection: close`). A reset after some bytes still
/// returns what was read; a reset before any byte fails.
#[track_caller]
pub fn raw(addr: SocketAddr, request: &[u8]) -> Response {
    let mut stream = super::connect(addr);
    stream.write_all(request).expect("write the HTTP request");
    read_response(&mut stream)
}

/// `GET target` with a Host header.
#[track_caller]
pub fn get(addr: SocketAddr, target: &str) -> Response {
    raw(
        addr,
        format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: sockman-tests\r\n\r\n")
            .as_bytes(),
    )
}

/// Reads a whole response until EOF (bounded by the stream's read timeout).
#[track_caller]
pub fn read_response(stream: &mut TcpStream) -> Response {
    let mut raw = Vec::new();
    let mut buf = [0; 16 * 1024];
    let mut closed = false;
    for _ in 0..100_000 {
        match stream.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !raw.is_empty() => {
                closed = true;
                break;
            }
            Err(e) => panic!(
                "reading the HTTP response ({} bytes so far: {:?}): {e}",
                raw.len(),
                String::from_utf8_lossy(&raw)
            ),
        }
    }
    assert!(closed, "the response did not end in 100000 reads");
    let text = String::from_utf8(raw).expect("the response is not UTF-8");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in the response {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status code in {head:?}"));
    assert!(head.starts_with("HTTP/1.1 "), "bad status line: {head:?}");
    if let Some(len) = head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("content-length:")
            .map(|v| v.trim().parse::<usize>().expect("Content-Length"))
    }) {
        assert_eq!(body.len(), len, "Content-Length does not match the body");
    }
    Response {
        status,
        head: head.to_string(),
        body: body.to_string(),
        closed,
    }
}

/// The value of the unlabelled sample `name` (e.g. `sockman_fds_open`) in a `/metrics` body;
/// `None` if there is no such line. Integer gauges and counters only.
#[track_caller]
pub fn sample(body: &str, name: &str) -> Option<i64> {
    body.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        Some(
            value
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("bad value in {line:?}: {e}")),
        )
    })
}

/// The value of the sample `name` with exactly the labels `labels` (e.g. `worker="1"`), or the
/// unlabelled one for `""`.
#[track_caller]
pub fn value(body: &str, name: &str, labels: &str) -> Option<u64> {
    let key = if labels.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{labels}}}")
    };
    sample(body, &key).map(|v| u64::try_from(v).unwrap_or_else(|e| panic!("{key} {v}: {e}")))
}

/// `GET /metrics` (must answer 200) and the unlabelled samples `names`, in order; fails naming
/// any that is missing.
#[track_caller]
pub fn samples<const N: usize>(admin: SocketAddr, names: [&str; N]) -> [i64; N] {
    let r = get(admin, "/metrics");
    assert_eq!(r.status, 200, "{r:?}");
    names.map(|name| {
        sample(&r.body, name).unwrap_or_else(|| panic!("no {name} in /metrics:\n{}", r.body))
    })
}

/// `GET /connections{query}` (must answer 200) as (peer, line) per connection.
#[track_caller]
pub fn connections(admin: SocketAddr, query: &str) -> Vec<(SocketAddr, String)> {
    let r = get(admin, &format!("/connections{query}"));
    assert_eq!(r.status, 200, "{r:?}");
    r.body
        .lines()
        .map(|line| {
            let peer = line
                .split_whitespace()
                .find_map(|f| f.strip_prefix("peer="))
                .unwrap_or_else(|| panic!("no peer= in {line:?}"));
            let peer = peer
                .parse()
                .unwrap_or_else(|e| panic!("bad peer in {line:?}: {e}"));
            (peer, line.to_string())
        })
        .collect()
}
