//! Graceful closes with unread input: a reply is delivered whole, then EOF, however the peer
//! keeps sending. Linux answers `close()` on a socket with unread received data with a reset and
//! drops what is still queued to send, so the server lingers: it flushes, shuts down its write
//! side, and reads and discards until the peer's EOF (or a deadline or byte cap).
#![cfg(feature = "admin")]

mod util;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sockman::{CloseReason, Config, Context, Echo, Handler};
use util::{connect, local_config, pattern, read_to_eof};

const REPLY: usize = 512 * 1024;

/// On the first bytes it receives, writes 512 KiB and closes (an HTTP/1.0-style server closing
/// after its response while the client pipelines more requests).
struct ReplyAndClose;

impl Handler for ReplyAndClose {
    type Conn = ();
    fn on_open(&mut self, _: &mut Context<'_>) {}
    fn on_data(&mut self, _: &mut (), ctx: &mut Context<'_>, _: &[u8]) {
        assert!(
            ctx.write(&pattern(REPLY, 7)),
            "the reply fits the pending cap"
        );
        ctx.close();
    }
}

/// Sends 1 KiB chunks until `stop` is set or the server stops taking them (bounded: 64 MiB).
fn keep_sending(mut stream: TcpStream, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let chunk = [b'x'; 1024];
        let mut sent = 0u64;
        while !stop.load(Ordering::Acquire) && sent < 64 << 20 {
            match stream.write(&chunk) {
                Ok(n) => sent += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        sent
    })
}

#[test]
fn handler_close_delivers_the_whole_reply_while_the_peer_keeps_sending() {
    let config = Config {
        max_pending: 1 << 20,
        ..local_config()
    };
    let server = util::start(config, ReplyAndClose);
    // A small receive window: most of the reply is still queued on the server when it closes.
    let mut client = util::connect_small_rcvbuf(server.addr);
    client.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = keep_sending(client.try_clone().unwrap(), Arc::clone(&stop));
    let got = read_to_eof(&mut client, 2 * REPLY);
    stop.store(true, Ordering::Release);
    let got = got.unwrap_or_else(|e| panic!("reading the {REPLY}-byte reply: {e}, not EOF"));
    util::assert_same(&got, &pattern(REPLY, 7));
    // The sender may be blocked on a full window (past the linger's byte cap the server stops
    // reading): shutting the socket down unblocks it.
    let _ = client.shutdown(std::net::Shutdown::Both);
    sender.join().unwrap();
    drop(client);
    let m = server.stop();
    assert_eq!(m.closed_by(CloseReason::Handler), 1, "{m}");
}

#[test]
fn admin_reply_is_whole_when_the_client_sends_more_after_its_request() {
    // Enough connections for a /connections answer far larger than the client's small receive
    // buffer, so most of it is still queued on the server side when the answer is complete.
    let (server, admin) = util::start_with_admin(local_config(), Echo);
    let addr = server.addr;
    let mut held = Vec::new();
    for _ in 0..400 {
        let mut c = connect(addr);
        util::echo(&mut c, b"x"); // accepted and registered
        held.push(c);
    }
    let mut client = util::connect_small_rcvbuf(admin);
    client
        .write_all(b"GET /connections?limit=400 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    // Once the first byte of the answer is here, the request has been read: what follows is
    // input the server will never read as a request.
    let mut first = [0; 1];
    client.read_exact(&mut first).unwrap();
    client.write_all(&[b'y'; 2000]).unwrap();
    let rest = read_to_eof(&mut client, 4 << 20)
        .unwrap_or_else(|e| panic!("reading the answer after its first byte: {e}, not EOF"));
    let mut raw = first.to_vec();
    raw.extend_from_slice(&rest);
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole head");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .parse()
        .unwrap();
    assert_eq!(body.len(), len, "the body was cut short");
    assert_eq!(body.lines().count(), 400, "one line per connection");
    drop(held);
    server.handle.shutdown();
    server.thread.join().unwrap();
}
