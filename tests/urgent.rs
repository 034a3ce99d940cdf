//! TCP urgent data: Linux's `recv` stops at the urgent mark, so a short read there does not
//! mean the socket is drained. The data on both sides of the urgent byte is echoed; the urgent
//! byte itself is dropped (no `SO_OOBINLINE`: it is out of band, as tokio and a C server that
//! reads until EAGAIN treat it).

mod util;

use std::io::Read;

use socket2::SockRef;
use sockman::Echo;
use util::{bind, connect, local_config, turn_until};

#[test]
fn data_after_an_urgent_byte_is_echoed_without_more_input() {
    let (mut server, addr) = bind(local_config(), Echo);
    let mut client = connect(addr);
    turn_until(&mut server, "the accept", |s| s.metrics().accepted == 1);
    // All three before the server reads: it does not turn until they are sent, and loopback
    // delivers a segment into the peer's receive queue before send returns.
    let sock = SockRef::from(&client);
    assert_eq!(sock.send(b"AAAA").unwrap(), 4);
    assert_eq!(sock.send_out_of_band(b"B").unwrap(), 1);
    assert_eq!(sock.send(b"CCCC").unwrap(), 4);
    turn_until(&mut server, "all 8 in-band bytes echoed", |s| {
        s.metrics().bytes_out == 8
    });
    let mut back = [0; 8];
    client.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"AAAACCCC");
    assert_eq!(
        server.metrics().bytes_in,
        8,
        "the urgent byte is not read in band"
    );
    util::stop(&mut server);
}
