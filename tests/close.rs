//! How connections end: a half-close flushes everything then closes, a reset is counted as a
//! reset, and a handler's close delivers its reply, then EOF, with one `on_close` each.

mod util;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;

use sockman::{CloseReason, ConnId, Context, Echo, Handler, Metrics, Server};
use util::{
    assert_same, bind, connect, local_config, pattern, read_exactly, start, stop, turn_until,
};

#[test]
fn half_close_after_a_mebibyte_flushes_it_all_then_eof() {
    const LEN: usize = 1 << 20;
    let server = start(local_config(), Echo);
    let mut stream = connect(server.addr);
    let data = pattern(LEN, 42);
    let mut reader = stream.try_clone().unwrap();
    let back = std::thread::spawn(move || {
        // Read until EOF: the echo must be whole and in order, and then the server must close.
        let mut back = Vec::with_capacity(LEN);
        let result = reader.read_to_end(&mut back);
        (result, back)
    });
    stream.write_all(&data).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let (result, back) = back.join().unwrap();
    match result {
        Ok(n) => assert_eq!(n, LEN, "bytes before EOF"),
        Err(e) => panic!("reading the echo until EOF: {e} after {} bytes", back.len()),
    }
    assert_same(&back, &data);
    // EOF again, not a reset: the server closed only after flushing.
    assert_eq!(stream.read(&mut [0; 16]).unwrap(), 0);
    let m = server.stop();
    assert_eq!(m.accepted, 1, "{m}");
    assert_eq!(m.closed_by(CloseReason::PeerClosed), 1, "{m}");
    assert_eq!(m.closed_total(), 1, "{m}");
    assert_eq!(m.bytes_in, LEN as u64, "{m}");
    assert_eq!(m.bytes_out, LEN as u64, "{m}");
}

#[test]
fn reset_mid_stream_is_counted_as_reset() {
    // The test owns the server and turns it; the client is a nonblocking socket on the same thread,
    // so "the server has pending output and unread data" is observed, not hoped for.
    let (mut server, addr) = bind(local_config(), Echo);
    let mut client = util::connect_small_rcvbuf(addr);
    client.set_nonblocking(true).unwrap();
    let chunk = pattern(64 * 1024, 7);
    let mut sent = 0u64;
    // Write between turns (nonblocking) until the server holds output it cannot send.
    turn_until(
        &mut server,
        "output pending for a client that does not read",
        |s| {
            if s.metrics().pending_bytes > 0 {
                return true;
            }
            match client.write(&chunk) {
                Ok(n) => sent += n as u64,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("client write after {sent} bytes: {e}"),
            }
            false
        },
    );
    assert_eq!(server.metrics().active, 1);
    // Abort: a RST instead of a FIN.
    let m = reset_is_counted(&mut server, client);
    assert_eq!(m.accepted, 1, "{m}");
}

#[test]
fn reset_of_a_quiet_connection_is_counted_as_reset() {
    // Nothing unread and nothing pending: the reset alone must be noticed and classified.
    let (mut server, addr) = bind(local_config(), Echo);
    let mut client = connect(addr);
    client.write_all(b"ping").unwrap();
    turn_until(&mut server, "the ping echoed", |s| {
        s.metrics().bytes_out == 4
    });
    assert_eq!(read_exactly(&mut client, 4), b"ping");
    reset_is_counted(&mut server, client);
}

/// Resets `client` (a RST, see [`util::abort`]), turns until the server has closed it, and
/// asserts after the stop that it was the one close, counted as `Reset`; returns the metrics.
#[track_caller]
fn reset_is_counted(server: &mut Server<Echo>, client: TcpStream) -> Metrics {
    util::abort(client);
    turn_until(server, "the reset connection to close", |s| {
        s.metrics().closed_total() == 1
    });
    let m = stop(server);
    assert_eq!(m.closed_by(CloseReason::Reset), 1, "{m}");
    assert_eq!(m.closed_total(), 1, "{m}");
    m
}

/// Greets, echoes, and on `q` replies `bye` and closes (optionally closes right after the
/// greeting). Records every `on_open` and `on_close`.
#[derive(Debug, Default)]
struct Greeter {
    close_on_open: bool,
    opened: Vec<ConnId>,
    closed: Vec<(ConnId, CloseReason)>,
    /// `on_data` calls after the handler asked to close (must stay 0).
    data_after_close: usize,
}

impl Handler for Greeter {
    /// The connection's own id and whether it asked to close.
    type Conn = (ConnId, bool);

    fn on_open(&mut self, ctx: &mut Context<'_, (ConnId, bool)>) -> (ConnId, bool) {
        self.opened.push(ctx.id());
        ctx.write(b"hello\n");
        if self.close_on_open {
            ctx.close();
        }
        (ctx.id(), self.close_on_open)
    }

    fn on_data(
        &mut self,
        conn: &mut (ConnId, bool),
        ctx: &mut Context<'_, (ConnId, bool)>,
        data: &[u8],
    ) {
        if conn.1 {
            self.data_after_close += 1;
        }
        match data.iter().position(|&b| b == b'q') {
            Some(i) => {
                ctx.write(&data[..i]);
                ctx.write(b"bye\n");
                ctx.close();
                conn.1 = true;
            }
            None => {
                ctx.write(data);
            }
        }
    }

    fn on_close(
        &mut self,
        conn: (ConnId, bool),
        ctx: &mut Context<'_, (ConnId, bool)>,
        reason: CloseReason,
    ) {
        let id = ctx.id();
        assert_eq!(conn.0, id, "on_close got another connection's state");
        self.closed.push((id, reason));
    }
}

/// Runs `clients` client threads against an owned server (turned on this thread) until each has
/// finished and `on_close` was called for each, then stops the server and checks that every
/// connection had exactly one `on_close`, with reason `Handler`.
fn run_greeter(greeter: Greeter, clients: usize, client: fn(TcpStream)) {
    let (mut server, addr) = bind(local_config(), greeter);
    let (tx, rx) = mpsc::channel();
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                client(connect(addr));
                tx.send(()).unwrap();
            })
        })
        .collect();
    let mut done = 0;
    turn_until(&mut server, "every client done and closed", |s| {
        while rx.try_recv().is_ok() {
            done += 1;
        }
        done == clients && s.handler().closed.len() >= clients
    });
    for t in threads {
        t.join().expect("a client thread failed");
    }
    let m = stop(&mut server);
    assert_eq!(m.accepted, clients as u64, "{m}");
    assert_eq!(m.closed_by(CloseReason::Handler), clients as u64, "{m}");
    assert_eq!(m.closed_total(), clients as u64, "{m}");
    // After the shutdown too: exactly one on_close per connection, each with reason Handler.
    let h = server.handler();
    assert_eq!(h.closed.len(), clients, "on_close calls: {:?}", h.closed);
    assert!(
        h.closed.iter().all(|&(_, r)| r == CloseReason::Handler),
        "reasons: {:?}",
        h.closed
    );
    let mut opened = h.opened.clone();
    let mut closed: Vec<ConnId> = h.closed.iter().map(|&(id, _)| id).collect();
    opened.sort();
    closed.sort();
    closed.dedup();
    assert_eq!(opened.len(), clients, "ids not distinct: {:?}", h.opened);
    assert_eq!(closed, opened, "on_close ids differ from on_open ids");
    assert_eq!(h.data_after_close, 0, "on_data called after ctx.close()");
}

#[test]
fn handler_close_sends_the_reply_then_eof_and_calls_on_close_once() {
    run_greeter(Greeter::default(), 3, |mut stream| {
        assert_eq!(read_exactly(&mut stream, 6), b"hello\n");
        stream.write_all(b"abc").unwrap();
        assert_eq!(read_exactly(&mut stream, 3), b"abc");
        stream.write_all(b"xyq").unwrap();
        assert_eq!(read_exactly(&mut stream, 6), b"xybye\n");
        assert_eq!(stream.read(&mut [0; 16]).unwrap(), 0, "EOF after the reply");
    });
}

#[test]
fn handler_close_in_on_open_sends_the_greeting_then_eof() {
    let greeter = Greeter {
        close_on_open: true,
        ..Greeter::default()
    };
    run_greeter(greeter, 2, |mut stream| {
        assert_eq!(read_exactly(&mut stream, 6), b"hello\n");
        assert_eq!(
            stream.read(&mut [0; 16]).unwrap(),
            0,
            "EOF after the greeting"
        );
    });
}
