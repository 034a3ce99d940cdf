//! Echo round trips through a real socket: sizes from 1 byte to 200 KiB, many small exchanges on
//! one connection, and 1 000 connections open at once.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Barrier;

use sockman::{CloseReason, Echo};
use util::{close_gracefully, connect, echo, local_config, pattern, start};

#[test]
fn round_trip_of_every_size() {
    // Around the boundaries that matter: one byte, the read chunk (64 KiB), more than the pending
    // cap, and more than the socket buffers hold (the echo helper reads concurrently).
    let sizes = [
        1,
        2,
        1000,
        64 * 1024 - 1,
        64 * 1024,
        64 * 1024 + 1,
        200 * 1024,
    ];
    let server = start(local_config(), Echo);
    for (i, &len) in sizes.iter().enumerate() {
        let mut stream = connect(server.addr);
        echo(&mut stream, &pattern(len, i as u64));
        close_gracefully(stream);
    }
    let m = server.stop();
    let n = sizes.len() as u64;
    let total: u64 = sizes.iter().map(|&s| s as u64).sum();
    assert_eq!(m.accepted, n, "{m}");
    assert_eq!(m.closed_by(CloseReason::PeerClosed), n, "{m}");
    assert_eq!(m.closed_total(), n, "{m}");
    assert_eq!(m.bytes_in, total, "{m}");
    assert_eq!(m.bytes_out, total, "{m}");
}

#[test]
fn many_exchanges_on_one_connection() {
    let server = start(local_config(), Echo);
    let mut stream = connect(server.addr);
    let mut total = 0;
    for i in 0..200 {
        let msg = format!("message {i}\n");
        stream.write_all(msg.as_bytes()).unwrap();
        let back = util::read_exactly(&mut stream, msg.len());
        assert_eq!(back, msg.as_bytes(), "exchange {i}");
        total += msg.len() as u64;
    }
    close_gracefully(stream);
    let m = server.stop();
    assert_eq!(m.accepted, 1, "{m}");
    assert_eq!(m.closed_by(CloseReason::PeerClosed), 1, "{m}");
    assert_eq!(m.bytes_in, total, "{m}");
    assert_eq!(m.bytes_out, total, "{m}");
}

#[test]
fn a_thousand_concurrent_connections_each_echo() {
    const CONNS: usize = 1000;
    // Few threads, each owning a share: the CI machine has 2 cores.
    const THREADS: usize = 4;
    let server = start(local_config(), Echo);
    let addr = server.addr;
    let opened = Barrier::new(THREADS);
    let echoed = Barrier::new(THREADS);
    let bytes: u64 = std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (opened, echoed) = (&opened, &echoed);
                s.spawn(move || {
                    let ids: Vec<usize> = (t..CONNS).step_by(THREADS).collect();
                    let mut streams: Vec<TcpStream> = ids.iter().map(|_| connect(addr)).collect();
                    // Every connection is open before any echoes.
                    opened.wait();
                    let msgs: Vec<Vec<u8>> = ids
                        .iter()
                        .map(|id| format!("connection {id} says hello").into_bytes())
                        .collect();
                    // Write on all, then read on all: the server has many ready at once.
                    for (stream, msg) in streams.iter_mut().zip(&msgs) {
                        stream.write_all(msg).unwrap();
                    }
                    for (stream, msg) in streams.iter_mut().zip(&msgs) {
                        let mut back = vec![0; msg.len()];
                        stream.read_exact(&mut back).unwrap();
                        assert_eq!(back, *msg, "echo crossed connections");
                    }
                    // Every connection has echoed (so the server holds all 1000) before any closes.
                    echoed.wait();
                    for stream in streams {
                        close_gracefully(stream);
                    }
                    msgs.iter().map(|m| m.len() as u64).sum::<u64>()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    let m = server.stop();
    assert_eq!(m.accepted, CONNS as u64, "{m}");
    assert_eq!(m.peak, CONNS as u64, "{m}");
    assert_eq!(m.closed_by(CloseReason::PeerClosed), CONNS as u64, "{m}");
    assert_eq!(m.closed_total(), CONNS as u64, "{m}");
    assert_eq!(m.bytes_in, bytes, "{m}");
    assert_eq!(m.bytes_out, bytes, "{m}");
}
