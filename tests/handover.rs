//! Handing a running server's listeners to another one (the library's way to upgrade in place,
//! here within one process): the successor serves the same sockets, so not one connect is
//! refused; the old one stops accepting without taking the queue and drains; workers hand over
//! to a different number of workers without closing a socket; a listener the successor's
//! configuration does not name is an error, and the old server keeps it.

mod util;

use std::net::SocketAddr;
use std::time::Duration;

use sockman::{Config, Echo, Error, Metrics, Server, Workers};
use util::load::Load;
use util::{connect, echo, local_config, with_admin, WAIT};

/// The old server's drain timeout: long enough for every session to end by itself.
const DRAIN: Duration = Duration::from_secs(5);

#[test]
fn a_server_handed_to_another_under_load_loses_no_connect_and_the_old_one_drains() {
    let config = with_admin(local_config());
    let mut old = Server::bind(config.clone(), Echo).unwrap();
    let (addr, admin) = (old.local_addrs()[0], old.admin_addr().unwrap());
    let handover = old.handover();
    let old = std::thread::spawn(move || old.run());
    let mut load = Load::start(addr, 200, 4);
    // A long-lived connection of the old server's, used across the release.
    let mut long = connect(addr);
    echo(&mut long, b"before");
    load.wait_echoes(40);

    let listeners = handover.listeners(WAIT).unwrap();
    let addrs: Vec<(SocketAddr, bool)> =
        listeners.iter().map(|l| (l.addr(), l.is_admin())).collect();
    assert_eq!(addrs, vec![(addr, false), (admin, true)]);
    let new = Server::bind_handed(config, listeners.into_vec(), Echo).unwrap();
    assert_eq!(
        (new.local_addrs(), new.admin_addr()),
        (vec![addr], Some(admin))
    );
    let new_handle = new.handle();
    let new = std::thread::spawn(move || new.run());
    handover.release(DRAIN);
    load.wait_echoes(40);
    // Still served by the old server, which drains: it ends when this and the sessions end.
    echo(&mut long, b"after the release");
    drop(long);
    let old = old.join().unwrap().unwrap();
    // From here on only the new server can answer, on the same addresses.
    load.wait_echoes(40);
    let ready = util::http::get(admin, "/readyz");
    assert_eq!(
        ready.status, 200,
        "the new server answers the admin port: {ready:?}"
    );
    let tally = load.stop();
    new_handle.shutdown();
    let new = new.join().unwrap().unwrap();

    assert!(tally.is_clean(), "{tally:?}");
    assert!(tally.echoes >= 120 && tally.requests > 0, "{tally:?}");
    assert_eq!(
        old.accepted + new.accepted,
        tally.connects + 1,
        "every connection was accepted once, by one of them: old {old}, new {new}, {tally:?}"
    );
    assert!(
        new.accepted >= 40,
        "new connections reach the new server: {new}"
    );
    assert_eq!(
        old.drain_forced, 0,
        "the old server's drain ended by itself: {old}"
    );
    assert_eq!(old.active, 0, "{old}");
}

#[test]
fn workers_hand_over_to_more_workers_and_then_to_one_loop_serving_every_socket() {
    let config = local_config();
    // Two workers: two SO_REUSEPORT sockets on one address.
    let mut two = Workers::bind(config.clone(), 2, |_| Echo).unwrap();
    let addr = two.local_addrs()[0];
    let from_two = two.handover();
    let two = two.start().unwrap();
    let listeners = from_two.listeners(WAIT).unwrap();
    assert_eq!(listeners.len(), 2, "one socket per worker");
    // Three workers from two sockets: the third binds one more SO_REUSEPORT socket.
    let mut three =
        Workers::bind_handed(config.clone(), listeners.into_vec(), 3, |_| Echo).unwrap();
    assert_eq!(three.local_addrs(), [addr]);
    let from_three = three.handover();
    let three = three.start().unwrap();
    from_two.release(DRAIN);
    assert_eq!(Metrics::sum(&two.wait().unwrap()).accepted, 0);
    for i in 0..60 {
        echo(&mut connect(addr), format!("three {i}").as_bytes());
    }

    let listeners = from_three.listeners(WAIT).unwrap();
    assert_eq!(listeners.len(), 3, "every socket of the three workers");
    // One loop from three sockets: it serves all three and closes none.
    let one = Server::bind_handed(config, listeners.into_vec(), Echo).unwrap();
    assert_eq!(one.local_addrs(), [addr, addr, addr]);
    let one_handle = one.handle();
    let one = std::thread::spawn(move || one.run());
    from_three.release(DRAIN);
    let three = Metrics::sum(&three.wait().unwrap());
    for i in 0..60 {
        echo(&mut connect(addr), format!("one {i}").as_bytes());
    }
    one_handle.shutdown();
    let one = one.join().unwrap().unwrap();
    assert_eq!(three.accepted, 60, "{three}");
    assert_eq!(one.accepted, 60, "{one}");
}

#[test]
fn a_handed_listener_the_configuration_does_not_name_is_refused_and_the_old_server_keeps_it() {
    let config = local_config();
    let mut old = Server::bind(config.clone(), Echo).unwrap();
    let addr = old.local_addrs()[0];
    let handover = old.handover();
    let old_handle = old.handle();
    let old = std::thread::spawn(move || old.run());
    let listeners = handover.listeners(WAIT).unwrap();
    let elsewhere = Config {
        listen: vec![SocketAddr::from(([127, 0, 0, 2], addr.port()))],
        ..config
    };
    match Server::bind_handed(elsewhere, listeners.into_vec(), Echo) {
        Err(Error::Handover(msg)) => assert!(
            msg.contains(&format!("a listener on {addr} was handed over"))
                && msg.contains("would lose its queue"),
            "{msg}"
        ),
        other => panic!("expected a handover error, got {other:?}"),
    }
    // The duplicate went with the failed server; the socket is still the old server's.
    echo(&mut connect(addr), b"still here");
    old_handle.shutdown();
    assert_eq!(old.join().unwrap().unwrap().accepted, 1);
}
