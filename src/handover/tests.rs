//! The handover's pure parts: checking a handed descriptor, and the plan over loops.

use std::io;
use std::net::SocketAddr;

use super::plan::Slot;
use super::{HandedListener, Plan};
use crate::config::Config;

fn listener(reuse_port: bool) -> std::net::TcpListener {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    if reuse_port {
        s.set_reuse_port(true).unwrap();
    }
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    s.listen(16).unwrap();
    s.into()
}

fn handed(socket: std::net::TcpListener, admin: bool) -> HandedListener {
    HandedListener::new(socket, admin).unwrap()
}

fn config(listen: Vec<SocketAddr>, admin: Option<SocketAddr>) -> Config {
    Config {
        listen,
        admin,
        ..Config::default()
    }
}

fn kinds(plan: &Plan, i: usize) -> String {
    plan.loops[i]
        .iter()
        .map(|s| match s {
            Slot::Handed(_) => 'h',
            Slot::Fresh { .. } => 'f',
        })
        .collect()
}

#[test]
fn a_descriptor_that_is_not_a_listening_tcp_socket_is_refused_saying_what_it_is() {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let e = HandedListener::new(s.into(), false).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(e.to_string(), "a TCP socket that is not listening");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let fd = std::os::fd::OwnedFd::from(udp);
    let e = HandedListener::new(fd.into(), false).unwrap_err();
    assert!(e.to_string().contains("not a TCP socket"), "{e}");
    let file = std::fs::File::open("/dev/null").unwrap();
    let fd = std::os::fd::OwnedFd::from(file);
    let e = HandedListener::new(fd.into(), false).unwrap_err();
    assert_eq!(e.to_string(), "not a socket");
}

#[test]
fn each_handed_socket_goes_to_exactly_one_loop_when_there_are_as_many_or_more() {
    let first = listener(true);
    let addr = first.local_addr().unwrap();
    let mut socks = vec![first];
    for _ in 0..3 {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_reuse_port(true).unwrap();
        s.bind(&addr.into()).unwrap();
        s.listen(16).unwrap();
        socks.push(s.into());
    }
    let c = config(vec![addr], None);
    let handed = socks.into_iter().map(|s| handed(s, false)).collect();
    let mut plan = Plan::new(&c, handed, 2).unwrap();
    assert_eq!(
        (kinds(&plan, 0), kinds(&plan, 1)),
        ("hh".into(), "hh".into())
    );
    assert_eq!(plan.take(1).0, vec![addr, addr]);
}

#[test]
fn extra_loops_bind_more_reuseport_sockets_or_share_the_handed_ones() {
    for (reuse_port, expect) in [(true, "f"), (false, "h")] {
        let s = listener(reuse_port);
        let addr = s.local_addr().unwrap();
        let c = config(vec![SocketAddr::from(([127, 0, 0, 1], 0))], None);
        let mut plan = Plan::new(&c, vec![handed(s, false)], 3).unwrap();
        assert_eq!(kinds(&plan, 0), "h");
        for i in 1..3 {
            assert_eq!(kinds(&plan, i), expect, "reuse_port={reuse_port}");
            let (addrs, given) = plan.take(i);
            assert_eq!(addrs, vec![addr], "a fresh socket binds the handed address");
            assert_eq!(given.data[0].is_some(), !reuse_port);
        }
    }
}

#[test]
fn a_handed_listener_the_configuration_does_not_name_is_an_error_and_a_new_address_is_fresh() {
    let s = listener(false);
    let addr = s.local_addr().unwrap();
    let other = SocketAddr::from(([127, 0, 0, 2], 7));
    let e = Plan::new(&config(vec![other], None), vec![handed(s, false)], 1).unwrap_err();
    assert!(
        e.to_string()
            .contains(&format!("a listener on {addr} was handed over")),
        "{e}"
    );
    let s = listener(false);
    let addr = s.local_addr().unwrap();
    let mut plan = Plan::new(&config(vec![addr, other], None), vec![handed(s, false)], 1).unwrap();
    assert_eq!(kinds(&plan, 0), "hf");
    let (addrs, given) = plan.take(0);
    assert_eq!(addrs, vec![addr, other]);
    assert!(given.data[0].is_some() && given.data[1].is_none());
}

#[test]
fn the_admin_listener_must_match_the_admin_address_and_goes_to_loop_0() {
    let s = listener(false);
    let addr = s.local_addr().unwrap();
    let e = Plan::new(&config(vec![], None), vec![handed(s, true)], 1).unwrap_err();
    assert!(
        e.to_string().contains("no admin address is configured"),
        "{e}"
    );
    let s = listener(false);
    let want = SocketAddr::from(([127, 0, 0, 2], 9090));
    let e = Plan::new(&config(vec![], Some(want)), vec![handed(s, true)], 1).unwrap_err();
    assert!(e.to_string().contains("the configuration asks for"), "{e}");
    let s = listener(false);
    let wildcard = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut plan = Plan::new(&config(vec![], Some(wildcard)), vec![handed(s, true)], 2).unwrap();
    assert!(plan.take(0).1.admin.is_some());
    assert!(plan.take(1).1.admin.is_none());
    let _ = addr;
}
