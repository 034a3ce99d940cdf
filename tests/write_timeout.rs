//! The write timeout means what it says: no progress of the pending output. A reader that takes
//! 2 000 bytes every 100 ms (20 KB/s) from a 16 MiB reply, with the kernel's autotuned buffers,
//! stays connected for three write timeouts (the loop used to close it after one, judging
//! progress by its own last write: writability came back only once megabytes had drained); a
//! reader that stops is closed within the timeout plus a tick. Time is stepped (`turn_at`);
//! the sockets and their kernel buffers are real. Accepted and dialed connections alike.

mod util;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use sockman::{Bytes, CloseReason, ConnId, Context, Handler, Server};
use util::{local_config, turn_until_at};

const REPLY: usize = 16 << 20;

/// Sends a 16 MiB reply to every connection it opens or dials, at once.
struct Big {
    reply: Bytes,
    ids: Vec<ConnId>,
}

impl Handler for Big {
    type Conn = ();
    fn on_open(&mut self, ctx: &mut Context<'_>) {
        self.ids.push(ctx.id());
        ctx.write_shared(self.reply.clone());
    }
    fn on_connected(&mut self, _: &mut (), ctx: &mut Context<'_>) {
        self.ids.push(ctx.id());
        ctx.write_shared(self.reply.clone());
    }
    fn on_data(&mut self, _: &mut (), _ctx: &mut Context<'_>, _data: &[u8]) {}
}

fn server() -> Server<Big> {
    let config = sockman::Config {
        // The default 30 s, and an idle timeout that cannot interfere.
        write_timeout: Duration::from_secs(30),
        idle_timeout: Duration::ZERO,
        ..local_config()
    };
    let big = Big {
        reply: Bytes::from(vec![b'r'; REPLY]),
        ids: Vec::new(),
    };
    util::bind(config, big).0
}

/// Turns at `t0` until the server's output to its connection is blocked and nothing more
/// moves (the kernel's buffers are full): its last write progress is then `t0`.
fn fill_at(server: &mut Server<Big>, t0: Instant) {
    turn_until_at(server, t0, "the connection", |s| {
        !s.handler().ids.is_empty()
    });
    let mut last = u64::MAX;
    let mut same = 0;
    turn_until_at(server, t0, "the buffers to fill", |s| {
        let out = s.metrics().bytes_out;
        same = if out == last { same + 1 } else { 0 };
        last = out;
        same >= 20 && s.metrics().pending_bytes > 0
    });
}

/// Reads 2 000 bytes every 100 ms of virtual time for `seconds`, turning the server at each
/// step: the connection must stay open throughout.
fn read_slowly(server: &mut Server<Big>, t0: Instant, client: &mut TcpStream, seconds: u64) {
    let mut buf = [0u8; 2000];
    let mut read = 0;
    for step in 1..=seconds * 10 {
        let mut got = 0;
        while got < buf.len() {
            match client.read(&mut buf[got..]) {
                Ok(0) => panic!(
                    "closed after {read} bytes, at step {step}: {}",
                    server.metrics()
                ),
                Ok(n) => got += n,
                Err(e) => panic!("read after {read} bytes: {e}"),
            }
        }
        read += got;
        util::step(server, t0 + Duration::from_millis(100) * step as u32);
        let m = server.metrics();
        assert_eq!(
            m.closed_total(),
            0,
            "at {} ms, after {read} bytes: {m}",
            step * 100
        );
    }
}

#[test]
fn a_reader_taking_20_kb_a_second_outlives_three_write_timeouts() {
    let mut server = server();
    let t0 = server.now();
    let mut client = util::connect(server.local_addrs()[0]);
    fill_at(&mut server, t0);
    read_slowly(&mut server, t0, &mut client, 90);
    assert_eq!(server.metrics().closed_total(), 0);
}

#[test]
fn a_dialed_connection_to_a_slow_reader_outlives_three_write_timeouts() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut server = server();
    let t0 = server.now();
    let addr = listener.local_addr().unwrap();
    server.connect(addr, ()).unwrap();
    let mut upstream = util::accept_within(&listener, util::WAIT);
    fill_at(&mut server, t0);
    read_slowly(&mut server, t0, &mut upstream, 90);
    assert_eq!(server.metrics().closed_total(), 0);
}

#[test]
fn a_reader_that_stops_is_closed_within_the_timeout_and_a_tick() {
    let mut server = server();
    let t0 = server.now();
    let client = util::connect(server.local_addrs()[0]);
    fill_at(&mut server, t0);
    // Its last progress was at t0 (the loop's time did not move while the buffers filled).
    let tick = Duration::from_millis(10);
    util::step(&mut server, t0 + Duration::from_secs(30) - tick);
    assert_eq!(server.metrics().closed_total(), 0, "{}", server.metrics());
    util::step(&mut server, t0 + Duration::from_secs(30) + tick);
    let m = server.metrics();
    assert_eq!(m.closed_by(CloseReason::WriteStall), 1, "{m}");
    drop(client);
}
