//! The architecture invariant "no allocation per event on the echo path" (ARCHITECTURE.md),
//! held by counting allocations: a global allocator counts, per thread, every allocation the
//! thread makes; the test turns an echo server on its own thread and echoes 64-byte messages
//! from a client on that same thread, so the count covers the loop's whole work per echo (poll,
//! dispatch, read, `on_data`, write, deadlines) and the client's plain socket calls (which do not
//! allocate). It also checks that each echo costs one write.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use sockman::{Config, Echo, Server};

/// Counts allocations per thread, then lets the system allocator do them.
struct Counting;

thread_local! {
    /// A const-initialised `Cell` has no destructor and needs no lazy setup, so the allocator
    /// may touch it at any time (even while the thread's other locals are torn down).
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count() {
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; counting
// touches only a thread-local `Cell`, which neither allocates nor unwinds.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which `System` shares.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: `ptr` and `layout` come from this allocator, i.e. from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` and `layout` come from this allocator, i.e. from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// Echoes one 64-byte message: writes it, then turns the server until the client has read it
/// back (within a bound that only keeps a broken run from hanging).
fn echo_once(server: &mut Server<Echo>, client: &mut TcpStream, msg: &[u8; 64]) {
    client.write_all(msg).expect("client write");
    let mut got = [0u8; 64];
    let mut have = 0;
    let bound = Instant::now() + Duration::from_secs(10);
    while have < got.len() {
        server
            .turn(Some(Duration::from_millis(1)))
            .expect("server turn");
        match client.read(&mut got[have..]) {
            Ok(0) => panic!("the server closed the connection"),
            Ok(n) => have += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("client read: {e}"),
        }
        assert!(Instant::now() < bound, "no echo within 10 s");
    }
    assert_eq!(&got, msg, "the echo differs");
}

#[test]
fn the_echo_path_allocates_nothing_per_event() {
    const ECHOES: u64 = 1_000;
    let config = Config {
        listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        ..Config::default()
    };
    let mut server = Server::bind(config, Echo).expect("bind");
    let mut client = TcpStream::connect(server.local_addrs()[0]).expect("connect");
    client.set_nodelay(true).expect("nodelay");
    client.set_nonblocking(true).expect("nonblocking");
    let msg = [b'x'; 64];
    // Warm-up: the accept, the first turns and the scratch vectors' first growth allocate.
    for _ in 0..100 {
        echo_once(&mut server, &mut client, &msg);
    }
    let turns_before = server.metrics().turns;
    let writes_before = server.metrics().write_calls;
    let before = allocations();
    for _ in 0..ECHOES {
        echo_once(&mut server, &mut client, &msg);
    }
    let allocated = allocations() - before;
    let turns = server.metrics().turns - turns_before;
    let writes = server.metrics().write_calls - writes_before;
    assert_eq!(writes, ECHOES, "one write per echo");
    assert_eq!(server.metrics().accepted, 1, "{}", server.metrics());
    // Not one per echo, nor one per turn: a deadline re-armed in the wheel now and then may
    // grow a slot's vector, which is why the bound is not zero.
    assert!(
        allocated < ECHOES / 100,
        "{allocated} allocations over {ECHOES} echoes ({turns} turns): the echo path allocates per event"
    );
}

/// One round of many echoes: every client writes 64 bytes (on loopback the bytes are in the
/// server's sockets when `write` returns, so the server's next turn sees them all), then the
/// server turns until every client has its echo.
fn echo_round(server: &mut Server<Echo>, clients: &mut [TcpStream], msg: &[u8; 64]) {
    for c in clients.iter_mut() {
        c.write_all(msg).expect("client write");
    }
    let mut have = [0usize; 256];
    let bound = Instant::now() + Duration::from_secs(10);
    while have[..clients.len()].iter().any(|&h| h < 64) {
        server
            .turn(Some(Duration::from_millis(1)))
            .expect("server turn");
        for (c, h) in clients.iter_mut().zip(have.iter_mut()) {
            let mut got = [0u8; 64];
            match c.read(&mut got[..64 - *h]) {
                Ok(0) => panic!("the server closed a connection"),
                Ok(n) => *h += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("client read: {e}"),
            }
        }
        assert!(Instant::now() < bound, "no echoes within 10 s");
    }
}

#[test]
fn two_hundred_connections_echoing_in_one_turn_allocate_nothing_per_event() {
    const CLIENTS: usize = 200;
    const ROUNDS: u64 = 50;
    let config = Config {
        listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        ..Config::default()
    };
    let mut server = Server::bind(config, Echo).expect("bind");
    let mut clients: Vec<TcpStream> = (0..CLIENTS)
        .map(|_| {
            let c = TcpStream::connect(server.local_addrs()[0]).expect("connect");
            c.set_nodelay(true).expect("nodelay");
            c.set_nonblocking(true).expect("nonblocking");
            c
        })
        .collect();
    let msg = [b'x'; 64];
    for _ in 0..20 {
        echo_round(&mut server, &mut clients, &msg);
    }
    let turns_before = server.metrics().turns;
    let before = allocations();
    for _ in 0..ROUNDS {
        echo_round(&mut server, &mut clients, &msg);
    }
    let allocated = allocations() - before;
    let turns = server.metrics().turns - turns_before;
    let echoes = ROUNDS * CLIENTS as u64;
    assert!(
        allocated < echoes / 100,
        "{allocated} allocations over {echoes} echoes in {turns} turns: output buffers are not reused"
    );
}
