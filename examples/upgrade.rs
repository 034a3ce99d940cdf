//! Upgrading a server in place without refusing a connect, here within one process: the old
//! server hands its listening sockets to a new one (the same sockets, so their accept queues
//! come along), then stops accepting without taking the queue and drains its connections,
//! while a client connects all along.
//!
//! Across processes (a new binary) the same calls apply, and the listeners travel in between:
//! by `SCM_RIGHTS` over a unix socket (what `sockman` does on `SIGUSR2`, in
//! `src/bin/sockman/upgrade/`) or by inheritance across `exec`. The old side calls
//! `Server::handover` (before `run`), `Handover::listeners` and, once the new one serves,
//! `Handover::release`; the new side calls `HandedListener::new` on each descriptor it
//! received and `Server::bind_handed` (or `Workers::bind_handed`).
//!
//! `cargo run --example upgrade -- 3000` (the number of connects; 2000 by default).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::Duration;

use sockman::{Config, Echo, Server};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let connects: usize = std::env::args().nth(1).map_or(Ok(2000), |n| n.parse())?;
    let config = Config {
        listen: vec!["127.0.0.1:0".parse()?],
        ..Config::default()
    };

    // The old server, running on its thread. Its handover handle is taken before `run`.
    let mut old = Server::bind(config.clone(), Echo)?;
    let addr = old.local_addrs()[0];
    let handover = old.handover();
    let old = std::thread::spawn(move || old.run());

    // A client that connects, echoes and closes, again and again, counting refusals.
    let (progress, done) = mpsc::channel();
    let client = std::thread::spawn(move || {
        let mut refused = 0;
        for i in 0..connects {
            match TcpStream::connect(addr) {
                Ok(mut s) => {
                    let msg = format!("hello {i}\n");
                    s.write_all(msg.as_bytes()).expect("write");
                    let mut back = vec![0; msg.len()];
                    s.read_exact(&mut back).expect("read the echo");
                    assert_eq!(back, msg.as_bytes());
                }
                Err(_) => refused += 1,
            }
            let _ = progress.send(i);
        }
        refused
    });

    // A third of the way in: the new server takes the same sockets, and the old one lets go.
    for _ in 0..connects / 3 {
        done.recv_timeout(Duration::from_secs(10))?;
    }
    let listeners = handover.listeners(Duration::from_secs(5))?;
    let new = Server::bind_handed(config, listeners.into_vec(), Echo)?;
    let stop_new = new.handle();
    let new = std::thread::spawn(move || new.run());
    handover.release(Duration::from_secs(10)); // stop accepting, drain, stop

    let refused = client.join().expect("the client panicked");
    let old = old.join().expect("the old server panicked")?;
    stop_new.shutdown();
    let new = new.join().expect("the new server panicked")?;
    println!(
        "{connects} connects, {refused} refused: the old server accepted {} (then drained), the new one {}",
        old.accepted, new.accepted
    );
    Ok(())
}
