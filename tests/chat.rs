//! The chat example (`examples/chat.rs`, included here) over real sockets: greetings, lines to
//! every other client, `/quit`, departures announced, long lines, a client that stops reading,
//! and one line reaching 999 others.

#[path = "../examples/chat.rs"]
#[allow(dead_code)]
mod chat;
mod util;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};

use sockman::{CloseReason, Config};

/// A chat client: reads whole lines (with the stream's read timeout as the safety net).
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    id: String,
}

impl Client {
    #[track_caller]
    fn join(addr: SocketAddr) -> Client {
        Client::from(util::connect(addr))
    }

    #[track_caller]
    fn from(stream: TcpStream) -> Client {
        let writer = stream.try_clone().unwrap();
        let mut c = Client {
            reader: BufReader::new(stream),
            writer,
            id: String::new(),
        };
        let hello = c.line();
        c.id = hello
            .strip_prefix("* you are ")
            .unwrap_or_else(|| panic!("no greeting: {hello:?}"))
            .to_string();
        c
    }

    #[track_caller]
    fn line(&mut self) -> String {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => panic!("EOF instead of a line"),
            Ok(_) => line.trim_end_matches('\n').to_string(),
            Err(e) => panic!("no line: {e}"),
        }
    }

    #[track_caller]
    fn say(&mut self, text: &str) {
        self.writer
            .write_all(format!("{text}\n").as_bytes())
            .unwrap();
    }

    #[track_caller]
    fn expect_eof(&mut self) {
        let mut rest = String::new();
        match self.reader.read_line(&mut rest) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the server to close, got {other:?} {rest:?}"),
        }
    }
}

fn start(config: Config) -> util::Running {
    util::start(config, chat::Chat::default())
}

fn config() -> Config {
    chat::config(SocketAddr::from(([127, 0, 0, 1], 0)))
}

#[test]
fn lines_reach_every_other_client_and_departures_are_announced() {
    let server = start(config());
    let mut a = Client::join(server.addr);
    let mut b = Client::join(server.addr);
    let mut c = Client::join(server.addr);
    assert_ne!(a.id, b.id);
    a.say("hello");
    assert_eq!(b.line(), format!("{}: hello", a.id));
    assert_eq!(c.line(), format!("{}: hello", a.id));
    // Not to the sender: the next thing a sees is b's line.
    b.say("hi a");
    assert_eq!(a.line(), format!("{}: hi a", b.id));
    assert_eq!(c.line(), format!("{}: hi a", b.id));
    // A line in pieces is one line.
    c.writer.write_all(b"in ").unwrap();
    c.writer.flush().unwrap();
    c.writer.write_all(b"two\n").unwrap();
    assert_eq!(a.line(), format!("{}: in two", c.id));
    assert_eq!(b.line(), format!("{}: in two", c.id));
    // /quit closes the sender; the others hear it.
    c.say("/quit");
    c.expect_eof();
    assert_eq!(a.line(), format!("* {} left", c.id));
    assert_eq!(b.line(), format!("* {} left", c.id));
    // So does a plain disconnect.
    drop(b);
    assert_eq!(a.line().split(' ').nth(2), Some("left"));
    let m = server.stop();
    assert_eq!(m.closed_by(CloseReason::Handler), 1, "{m}");
}

#[test]
fn a_line_over_4_kib_closes_its_sender() {
    let server = start(config());
    let mut a = Client::join(server.addr);
    let mut b = Client::join(server.addr);
    a.writer.write_all(&vec![b'x'; chat::MAX_LINE + 1]).unwrap();
    a.expect_eof();
    assert_eq!(b.line(), format!("* {} left", a.id));
    // Exactly 4 KiB is fine.
    let mut c = Client::join(server.addr);
    let long = "y".repeat(chat::MAX_LINE);
    c.say(&long);
    assert_eq!(b.line(), format!("{}: {long}", c.id));
    server.stop();
}

#[test]
fn a_client_that_stops_reading_is_dropped_without_losing_lines_for_the_others() {
    // A small kernel send buffer, so that the stuck client's pending output, not the kernel,
    // takes the flood. (The pending cap stays at its 64 KiB default: a line read in one chunk
    // of up to 64 KiB goes out with a prefix per line, and a reader that keeps up must never
    // overflow on that.)
    let cfg = Config {
        send_buffer: Some(16 * 1024),
        ..config()
    };
    let server = start(cfg);
    let mut talker = Client::join(server.addr);
    let mut listener = Client::join(server.addr);
    let stuck = Client::from(util::connect_small_rcvbuf(server.addr));
    // The talker sends 2 000 lines of 100 bytes in batches of 20, each once the listener has
    // read the previous one (a reader that keeps up); the stuck client reads none.
    let line = "z".repeat(100);
    let (progress, batches) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut got = 0;
        let mut left = None;
        while got < 2000 {
            let l = listener.line();
            if l.ends_with(" left") {
                left = Some(l);
            } else {
                assert!(l.ends_with(&"z".repeat(100)), "{l:?}");
                got += 1;
                if got % 20 == 0 {
                    let _ = progress.send(got);
                }
            }
        }
        (got, left, listener)
    });
    for batch in 1..=100 {
        for _ in 0..20 {
            talker.say(&line);
        }
        let read = batches
            .recv_timeout(util::WAIT)
            .expect("the listener fell behind");
        assert_eq!(read, batch * 20);
    }
    let (got, left, _listener) = reader.join().unwrap();
    assert_eq!(got, 2000, "every line reached the reader");
    assert_eq!(
        left,
        Some(format!("* {} left", stuck.id)),
        "the stuck one left"
    );
    let m = server.stop();
    assert_eq!(m.closed_by(CloseReason::Overflow), 1, "{m}");
}

#[test]
fn one_line_reaches_999_others() {
    let server = start(config());
    let mut clients: Vec<Client> = (0..1000).map(|_| Client::join(server.addr)).collect();
    let from = clients[0].id.clone();
    clients[0].say("to everyone");
    let want = format!("{from}: to everyone");
    for c in &mut clients[1..] {
        assert_eq!(c.line(), want);
    }
    drop(clients);
    server.stop();
}
