//! Regressions found in review: each test failed before its fix.

mod util;

use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::rc::Rc;
use std::time::Duration;

use sockman::{CloseReason, Config, Context, Echo, Handler, OnFull, RejectReason, Server};
use util::{connect_from, expect_closed, local_config, turn_until, turn_until_at};

/// A client refused by the per-IP cap must not evict another client's idle connection, even when
/// that connection is evictable: the test steps virtual time past `evict_min_idle`, and a client
/// from a third address then does evict it (so the refusal had something to wrongly evict).
#[test]
fn per_ip_refusal_does_not_evict() {
    let config = Config {
        max_connections: Some(2),
        on_full: OnFull::EvictIdle,
        evict_min_idle: Duration::from_millis(20),
        max_per_ip: 1,
        tick: Duration::from_millis(1),
        ..local_config()
    };
    let mut server = Server::bind(config, Echo).unwrap();
    let addr = server.local_addrs()[0];
    let t0 = server.now();
    let mut victim = connect_from([127, 0, 0, 1], addr);
    turn_until_at(&mut server, t0, "the first accept", |s| {
        s.metrics().accepted == 1
    });
    let _attacker = connect_from([127, 0, 0, 2], addr);
    turn_until_at(&mut server, t0, "the second accept", |s| {
        s.metrics().accepted == 2
    });
    // 50 ms of virtual time later both are idle 50 ticks, well past the 20 ms minimum.
    let later = t0 + Duration::from_millis(50);
    let _again = connect_from([127, 0, 0, 2], addr);
    turn_until_at(&mut server, later, "the per-IP refusal", |s| {
        s.metrics().rejected_by(RejectReason::PerIp) == 1
    });
    let m = server.metrics();
    assert_eq!(m.closed_by(CloseReason::Evicted), 0, "{m}");
    assert_eq!(m.active, 2, "{m}");
    // The victim was evictable all along: a client the per-IP cap admits evicts it (the
    // longest idle, accepted first).
    let _third = connect_from([127, 0, 0, 3], addr);
    turn_until_at(&mut server, later, "the eviction", |s| {
        s.metrics().closed_by(CloseReason::Evicted) == 1
    });
    expect_closed(&mut victim);
    let m = server.metrics();
    assert_eq!(m.accepted, 3, "{m}");
    assert_eq!(m.active, 2, "{m}");
}

struct Count(Rc<Cell<i64>>);

impl Handler for Count {
    type Conn = ();
    fn on_open(&mut self, _: &mut Context<'_>) {
        self.0.set(self.0.get() + 1);
    }
    fn on_data(&mut self, _: &mut (), _: &mut Context<'_>, _: &[u8]) {}
    fn on_close(&mut self, _: (), _: &mut Context<'_>, reason: CloseReason) {
        assert_eq!(reason, CloseReason::Shutdown);
        self.0.set(self.0.get() - 1);
    }
}

/// Dropping a running server still calls `on_close` once per connection.
#[test]
fn dropping_a_running_server_closes_through_on_close() {
    let open = Rc::new(Cell::new(0));
    let mut server = Server::bind(local_config(), Count(Rc::clone(&open))).unwrap();
    let mut client = util::connect(server.local_addrs()[0]);
    turn_until(&mut server, "the first accept", |s| {
        s.metrics().accepted == 1
    });
    assert_eq!(open.get(), 1);
    drop(server);
    assert_eq!(open.get(), 0, "on_open without on_close after drop");
    // EOF or a reset: closed. Data, a timeout (the socket left open) or another error fails.
    expect_closed(&mut client);
}

/// An admin request that arrives together with the client's FIN still gets its answer.
#[test]
fn admin_request_followed_by_fin_is_answered() {
    let (mut server, _, admin) = util::bind_with_admin(local_config(), Echo);
    let mut admin = TcpStream::connect(admin).unwrap();
    admin.write_all(b"GET /health HTTP/1.0\r\n\r\n").unwrap();
    admin.shutdown(Shutdown::Write).unwrap();
    admin.set_nonblocking(true).unwrap();
    let mut out = Vec::new();
    turn_until(&mut server, "the admin answer and EOF", |_| {
        let mut buf = [0; 512];
        match admin.read(&mut buf) {
            Ok(0) => true,
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                false
            }
            Err(_) => false,
        }
    });
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    assert!(text.ends_with("ok\n"), "{text:?}");
}
