//! The admin endpoint as HTTP clients and orchestrators meet it: HEAD without a body, 405 with
//! `Allow`, and a health probe that gets in while silent sockets hold every admin slot.
#![cfg(feature = "admin")]

mod util;

use std::io::{Read, Write};

use sockman::Echo;
use util::http;
use util::{local_config, start_with_admin};

#[test]
fn head_answers_the_get_head_without_a_body() {
    let (server, admin) = start_with_admin(local_config(), Echo);
    // Read raw: a HEAD answer's Content-Length describes the GET's body, which is not sent.
    let mut stream = util::connect(admin);
    stream
        .write_all(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a whole head");
    assert!(head.starts_with("HTTP/1.1 200"), "{raw:?}");
    assert!(body.is_empty(), "a HEAD answer has no body: {raw:?}");
    // The Content-Length the GET has ("ok\n").
    assert!(head.lines().any(|l| l == "Content-Length: 3"), "{raw:?}");
    assert_eq!(http::get(admin, "/health").body, "ok\n");
    server.stop();
}

#[test]
fn a_refused_method_is_told_which_are_allowed() {
    let (server, admin) = start_with_admin(local_config(), Echo);
    let r = http::raw(
        admin,
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(r.status, 405, "{r:?}");
    assert!(
        r.head.lines().any(|l| l == "Allow: GET, HEAD"),
        "no Allow header: {r:?}"
    );
    server.stop();
}

#[test]
fn a_health_probe_gets_in_while_silent_sockets_hold_every_admin_slot() {
    let (server, admin) = start_with_admin(local_config(), Echo);
    // Sixteen connections that never send a byte (an attacker, or a broken client) take every
    // admin slot. Their handshakes complete before the probe's, so the backlog hands them to
    // the server first.
    let silent: Vec<_> = (0..16).map(|_| util::connect(admin)).collect();
    // The probe: before the fix it was accepted and closed at once (no answer) because every
    // slot was taken. Now the oldest silent connection makes room.
    let r = http::get(admin, "/health");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "ok\n");
    // And again, with the slots still held by the remaining silent sockets.
    let r = http::get(admin, "/health");
    assert_eq!(r.status, 200, "{r:?}");
    drop(silent);
    server.stop();
}
