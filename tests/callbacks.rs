//! What a callback can ask about its own connection answers truthfully in every callback,
//! `on_close` included: its id, peer, origin and the turn's time, and that it is no longer
//! reachable (no `conn(id)`, writes refused). "Reconnect if it was dialed" in `on_close` must
//! see `Origin::Dialed`, whether the dial failed, the peer closed or the handler closed it.

mod util;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use sockman::{CloseReason, ConnId, Context, Handler, Origin, SendError, Server};
use util::{bind, connect, local_config, refused_port, turn_until_at};

/// What `on_close` saw of its connection.
#[derive(Debug)]
struct Seen {
    reason: CloseReason,
    id: ConnId,
    peer: SocketAddr,
    origin: Origin,
    now: Instant,
    /// `ctx.conn(ctx.id())` found it.
    found: bool,
    /// `ctx.write` took bytes.
    wrote: bool,
    sent: Result<(), SendError>,
    writable: bool,
    pending: usize,
}

/// Records what each callback says about its connection.
#[derive(Debug, Default)]
struct Asker {
    /// `on_open` and `on_connected`: id, peer, origin.
    opened: Vec<(ConnId, SocketAddr, Origin)>,
    /// `ctx.origin()` in `on_data` right after `ctx.close()`.
    origin_after_close: Vec<Origin>,
    closed: Vec<Seen>,
}

impl Handler for Asker {
    type Conn = ();
    fn on_open(&mut self, ctx: &mut Context<'_>) {
        self.opened.push((ctx.id(), ctx.peer(), ctx.origin()));
    }
    fn on_connected(&mut self, _: &mut (), ctx: &mut Context<'_>) {
        self.opened.push((ctx.id(), ctx.peer(), ctx.origin()));
    }
    fn on_data(&mut self, _: &mut (), ctx: &mut Context<'_>, data: &[u8]) {
        if data == b"bye" {
            ctx.close(); // graceful: on_close runs as its linger begins
            self.origin_after_close.push(ctx.origin());
        }
    }
    fn on_close(&mut self, _: (), ctx: &mut Context<'_>, reason: CloseReason) {
        let id = ctx.id();
        self.closed.push(Seen {
            reason,
            id,
            peer: ctx.peer(),
            origin: ctx.origin(),
            now: ctx.now(),
            found: ctx.conn(id).is_some(),
            wrote: ctx.write(b"late"),
            sent: ctx.send(id, b"late"),
            writable: ctx.is_writable(),
            pending: ctx.pending(),
        });
    }
}

/// Asserts that `seen` describes connection `id` to `peer` of `origin`, closed for `reason` at
/// `now`, and unreachable from its own `on_close`.
#[track_caller]
fn assert_seen(
    seen: &Seen,
    (id, peer, origin): (ConnId, SocketAddr, Origin),
    reason: CloseReason,
    now: Instant,
) {
    assert_eq!(
        (seen.reason, seen.id, seen.peer, seen.origin, seen.now),
        (reason, id, peer, origin, now),
        "{seen:?}"
    );
    assert!(
        !seen.found,
        "conn(id) found the closed connection: {seen:?}"
    );
    assert!(
        !seen.wrote,
        "a write to the closed connection was taken: {seen:?}"
    );
    assert_eq!(seen.sent, Err(SendError::Gone), "{seen:?}");
    assert!(!seen.writable && seen.pending == 0, "{seen:?}");
}

#[test]
fn on_close_answers_id_peer_origin_and_now_for_dialed_and_accepted_connections() {
    let (mut server, addr): (Server<Asker>, _) = bind(local_config(), Asker::default());
    let t0 = server.now();
    let (_refusing, refused) = refused_port();
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = upstream.local_addr().unwrap();

    // A refused dial: closed before it ever connected.
    let t1 = t0 + Duration::from_millis(100);
    let refused_id = server.connect(refused, ()).unwrap();
    turn_until_at(&mut server, t1, "the refusal", |s| {
        !s.handler().closed.is_empty()
    });
    assert_seen(
        &server.handler().closed[0],
        (refused_id, refused, Origin::Dialed),
        CloseReason::ConnectRefused,
        t1,
    );

    // A dial that connects, and an accepted client.
    let dialed_id = server.connect(up_addr, ()).unwrap();
    let client = connect(addr);
    let t2 = t0 + Duration::from_millis(200);
    turn_until_at(&mut server, t2, "the dial and the accept", |s| {
        s.handler().opened.len() == 2
    });
    let opened = server.handler().opened.clone();
    let dialed = *opened.iter().find(|o| o.0 == dialed_id).expect("dialed");
    let accepted = *opened.iter().find(|o| o.0 != dialed_id).expect("accepted");
    assert_eq!(dialed, (dialed_id, up_addr, Origin::Dialed));
    assert_eq!(
        accepted.1,
        client.local_addr().unwrap(),
        "the accepted peer"
    );
    assert_eq!(accepted.2, Origin::Accepted);

    // The handler closes the dialed one (gracefully: it lingers while on_close runs).
    let (mut up, _) = upstream.accept().unwrap();
    up.write_all(b"bye").unwrap();
    let t3 = t0 + Duration::from_millis(300);
    turn_until_at(&mut server, t3, "the handler's close", |s| {
        s.handler().closed.len() == 2
    });
    assert_eq!(server.handler().origin_after_close, vec![Origin::Dialed]);
    assert_seen(
        &server.handler().closed[1],
        dialed,
        CloseReason::Handler,
        t3,
    );

    // The accepted client leaves (an abortive close after its EOF).
    drop(client);
    let t4 = t0 + Duration::from_millis(400);
    turn_until_at(&mut server, t4, "the client's close", |s| {
        s.handler().closed.len() == 3
    });
    assert_seen(
        &server.handler().closed[2],
        accepted,
        CloseReason::PeerClosed,
        t4,
    );
    drop(up);
    util::stop(&mut server);
}

/// Remembers its connections' ids and counts the bytes they send.
#[derive(Debug, Default)]
struct Counter {
    ids: Vec<ConnId>,
    bytes: usize,
}

impl Handler for Counter {
    type Conn = ();
    fn on_open(&mut self, ctx: &mut Context<'_>) {
        self.ids.push(ctx.id());
    }
    fn on_data(&mut self, _: &mut (), _: &mut Context<'_>, data: &[u8]) {
        self.bytes += data.len();
    }
}

/// `SendError::Refused` is also what a connection whose write side is shut answers: it is not
/// closing (it still reads), unlike after a failed or overflowing write.
#[test]
fn a_send_after_shutdown_write_is_refused_and_the_connection_stays_open() {
    let (mut server, addr) = bind(local_config(), Counter::default());
    let t0 = server.now();
    let mut client = connect(addr);
    turn_until_at(&mut server, t0, "the accept", |s| s.metrics().active == 1);
    let id = server.handler().ids[0];
    let (refused, open) = server.with_context(|_, ctx| {
        ctx.conn(id).expect("open").shutdown_write();
        (ctx.send(id, b"after the FIN"), ctx.conn(id).is_some())
    });
    assert_eq!(refused, Err(SendError::Refused));
    assert!(open, "a half-closed connection is still the handler's");
    client.write_all(b"still read").unwrap();
    turn_until_at(&mut server, t0, "the client's bytes", |s| {
        s.handler().bytes == 10
    });
    assert_eq!(server.metrics().active, 1);
    util::stop(&mut server);
}
