//! Unit tests of the loop's internals over real sockets: stale tokens and wheel entries, the
//! wheel sweep, bind errors.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::io::Readiness;
use super::timers::COMPACT_MIN;
use super::*;
use crate::handler::Echo;

fn local_config() -> Config {
    Config {
        listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        ..Config::default()
    }
}

/// Turns until `done` holds; bounded in turns and time.
#[track_caller]
fn turn_until<H: Handler>(server: &mut Server<H>, mut done: impl FnMut(&Server<H>) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done(server) {
        assert!(Instant::now() < deadline, "condition not reached in 5 s");
        server.turn(Some(Duration::from_millis(50))).unwrap();
    }
}

#[test]
fn stale_event_for_reused_slot_is_dropped() {
    let mut server = Server::bind(local_config(), Echo).unwrap();
    let addr = server.local_addrs()[0];
    let _a = std::net::TcpStream::connect(addr).unwrap();
    turn_until(&mut server, |s| s.metrics().accepted == 1);
    let (key, old_gen) = {
        let (key, conn) = server.table.slab.iter().next().unwrap();
        (key, conn.gen)
    };
    let stale = token::conn(ConnId::new(key, old_gen));
    // Closed by something other than its own event, then the slot is refilled.
    server.close(key, CloseReason::Evicted);
    let mut b = std::net::TcpStream::connect(addr).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    turn_until(&mut server, |s| s.metrics().accepted == 2);
    let new_gen = server.table.slab[key].gen;
    assert_ne!(
        new_gen, old_gen,
        "the reused slot must get a new generation"
    );
    b.write_all(b"ping").unwrap();
    // The old connection's event, as if still in the same batch: dropped, B untouched.
    let readable = Readiness {
        readable: true,
        read_closed: true,
        ..Readiness::default()
    };
    let now = server.table.now;
    server.dispatch(stale, readable, now);
    assert_eq!(server.metrics().stale, 1);
    assert_eq!(
        server.metrics().bytes_in,
        0,
        "a stale event must not read B's data"
    );
    assert!(server.table.slab.contains(key));
    // A stale id cannot reach B either.
    let reached = server.with_context(|_, ctx| ctx.send(ConnId::new(key, old_gen), b"x"));
    assert_eq!(reached, Err(crate::SendError::Gone));
    // B still echoes through its own events.
    turn_until(&mut server, |s| s.metrics().bytes_out == 4);
    let mut reply = [0; 4];
    b.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"ping");
    // A stale wheel entry for the old generation is dropped as well.
    server
        .timers
        .wheel
        .insert(key as u32, token::gen_low(old_gen), 0);
    // An entry inserted for a tick the wheel has passed fires at its next tick.
    let now = server.table.now.max(server.timers.wheel.elapsed());
    server.expire(now);
    assert_eq!(server.metrics().stale, 2);
    assert!(server.table.slab.contains(key));
    server.shutdown();
    assert_eq!(server.metrics().active, 0);
    assert_eq!(server.metrics().closed_by(CloseReason::Shutdown), 1);
}

#[test]
fn closed_connections_do_not_pile_up_in_the_wheel() {
    // A 60 s idle timeout and short-lived connections: each close leaves a dead entry that
    // would otherwise wait 60 s for its slot. The sweep keeps them bounded.
    let mut server = Server::bind(local_config(), Echo).unwrap();
    let addr = server.local_addrs()[0];
    let total = 3 * COMPACT_MIN as u64;
    let mut done = 0;
    while done < total {
        let batch: Vec<_> = (0..256)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        done += batch.len() as u64;
        drop(batch);
        turn_until(&mut server, |s| s.metrics().closed_total() == done);
        assert!(
            server.timers.wheel.len() <= 2 * COMPACT_MIN + 256,
            "{} wheel entries for {} live connections after {done} closes",
            server.timers.wheel.len(),
            server.table.slab.len()
        );
    }
    assert_eq!(server.metrics().closed_by(CloseReason::PeerClosed), total);
}

#[test]
fn bind_reports_address_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = Config {
        listen: vec![taken.local_addr().unwrap()],
        ..Config::default()
    };
    match Server::bind(config, Echo) {
        Err(Error::Bind { addr, source }) => {
            assert_eq!(addr, taken.local_addr().unwrap());
            assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse);
        }
        other => panic!("expected a bind error, got {other:?}"),
    }
}

#[test]
fn an_id_held_across_2_pow_32_connections_does_not_reach_the_slots_new_occupant() {
    let mut server = Server::bind(local_config(), Echo).unwrap();
    let addr = server.local_addrs()[0];
    let a = std::net::TcpStream::connect(addr).unwrap();
    turn_until(&mut server, |s| s.metrics().accepted == 1);
    let held = server.table.ids()[0];
    drop(a);
    turn_until(&mut server, |s| s.metrics().active == 0);
    // 2^32 connections later (at 100 k/s, 12 hours), the slot is refilled.
    server.table.skip_generations((1 << 32) - 1);
    let b = std::net::TcpStream::connect(addr).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    turn_until(&mut server, |s| s.metrics().accepted == 2);
    let now_there = server.table.ids()[0];
    assert_eq!(now_there.key(), held.key(), "the slot was reused");
    assert_ne!(now_there, held, "a new occupant has a new id");
    let reached = server.with_context(|_, ctx| ctx.send(held, b"stale"));
    assert_eq!(
        reached,
        Err(crate::SendError::Gone),
        "an id held for 2^32 connections reached the slot's new occupant {now_there}"
    );
    assert_eq!(server.metrics().bytes_out, 0);
    server.shutdown();
}
