//! The chat example (`examples/chat.rs`) under load: `cargo bench --bench chat`.
//!
//! - **broadcast**: 1 000 clients; one of them sends a line, and the time until all 999 others
//!   have it is one broadcast's latency; 2 000 broadcasts in a row (each after the last one
//!   arrived everywhere), then the same with 20 lines in flight for the rate.
//! - **idle**: 10 000 clients that only read their greeting; the chat server's RSS growth per
//!   client.
//!
//! The chat server runs in a child process (this bench, re-executed with `--serve`), pinned by
//! nothing: run it under `taskset` to pin. Clients are one mio loop in this process.

#[path = "../examples/chat.rs"]
#[allow(dead_code)]
mod chat;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--serve") {
        let addr: SocketAddr = args[i + 1].parse().expect("an address");
        let server = sockman::Server::bind(chat::config(addr), chat::Chat::default())
            .expect("bind the chat server");
        println!("{}", server.local_addrs()[0]);
        server.run().expect("the chat server");
        return;
    }
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-')).cloned();
    let run = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    if run("broadcast") {
        broadcast(1000, 2000);
    }
    if run("idle") {
        idle(10_000);
    }
}

/// The chat server as a child process on a free port; returns it and its address.
fn spawn_server() -> (Child, SocketAddr) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--serve", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the chat server");
    let mut line = String::new();
    let mut out = child.stdout.take().unwrap();
    let mut byte = [0];
    while !line.ends_with('\n') {
        out.read_exact(&mut byte).expect("the server's address");
        line.push(byte[0] as char);
    }
    (child, line.trim().parse().unwrap())
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap()
}

/// Clients on one poll: connect `n`, wait for every greeting.
struct Clients {
    poll: Poll,
    events: Events,
    streams: Vec<TcpStream>,
    /// Bytes received per client since the last reset.
    got: Vec<usize>,
    buf: Vec<u8>,
}

impl Clients {
    fn connect(addr: SocketAddr, n: usize) -> Clients {
        let poll = Poll::new().unwrap();
        let mut streams = Vec::with_capacity(n);
        let mut c = Clients {
            poll,
            events: Events::with_capacity(1024),
            streams: Vec::new(),
            got: vec![0; n],
            buf: vec![0; 64 * 1024],
        };
        // In batches, so that the server's backlog never overflows.
        for batch in (0..n).collect::<Vec<_>>().chunks(100) {
            for &i in batch {
                let std = std::net::TcpStream::connect(addr).expect("connect");
                std.set_nonblocking(true).unwrap();
                let mut s = TcpStream::from_std(std);
                c.poll
                    .registry()
                    .register(&mut s, Token(i), Interest::READABLE)
                    .unwrap();
                streams.push(s);
            }
            c.streams = std::mem::take(&mut streams);
            c.wait(
                |got| batch.iter().all(|&i| got[i] > 0),
                Duration::from_secs(30),
            );
            streams = std::mem::take(&mut c.streams);
        }
        c.streams = streams;
        c.got.iter_mut().for_each(|g| *g = 0);
        c
    }

    /// Reads until `done(got)` or `timeout` (panics then).
    fn wait(&mut self, mut done: impl FnMut(&[usize]) -> bool, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !done(&self.got) {
            assert!(Instant::now() < deadline, "timed out");
            self.poll
                .poll(&mut self.events, Some(Duration::from_millis(100)))
                .unwrap();
            for e in self.events.iter() {
                let i = e.token().0;
                loop {
                    match self.streams[i].read(&mut self.buf) {
                        Ok(0) => panic!("client {i} closed"),
                        Ok(n) => self.got[i] += n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("client {i}: {e}"),
                    }
                }
            }
        }
    }
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((q * sorted.len() as f64) as usize).min(sorted.len() - 1)]
}

fn broadcast(n: usize, lines: usize) {
    let (mut child, addr) = spawn_server();
    let mut c = Clients::connect(addr, n);
    // The message each of the others receives: "<id>: <line>\n", the id of client 0.
    let line = b"hello everyone, this is a 48-byte chat line ok";
    let mut latencies = Vec::with_capacity(lines);
    let mut sent = 0usize;
    let mut per_line = 0;
    for _ in 0..lines {
        let before: Vec<usize> = c.got.clone();
        let t = Instant::now();
        c.streams[0].write_all(line).unwrap();
        c.streams[0].write_all(b"\n").unwrap();
        if per_line == 0 {
            // Learn the size of one delivered message from the first broadcast.
            c.wait(
                |g| g[1] > before[1] && g[1] - before[1] > line.len(),
                Duration::from_secs(10),
            );
            per_line = c.got[1] - before[1];
        }
        c.wait(
            |g| (1..n).all(|i| g[i] - before[i] >= per_line),
            Duration::from_secs(10),
        );
        latencies.push(t.elapsed());
        sent += 1;
    }
    latencies.sort();
    println!(
        "== broadcast: {n} clients, {sent} lines one at a time: fan-out to all {} others p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
        n - 1,
        quantile(&latencies, 0.5).as_secs_f64() * 1e6,
        quantile(&latencies, 0.99).as_secs_f64() * 1e6,
        latencies.last().unwrap().as_secs_f64() * 1e6,
    );
    // Rate: 20 lines in flight.
    let before = c.got.clone();
    let t = Instant::now();
    let burst = 20;
    let rounds = lines / burst;
    for r in 0..rounds {
        for _ in 0..burst {
            c.streams[0].write_all(line).unwrap();
            c.streams[0].write_all(b"\n").unwrap();
        }
        let want = (r + 1) * burst * per_line;
        c.wait(
            |g| (1..n).all(|i| g[i] - before[i] >= want),
            Duration::from_secs(30),
        );
    }
    let took = t.elapsed();
    let delivered = (rounds * burst * (n - 1)) as f64;
    println!(
        "== broadcast: {} lines with {burst} in flight: {:.0} lines/s, {:.0} deliveries/s",
        rounds * burst,
        (rounds * burst) as f64 / took.as_secs_f64(),
        delivered / took.as_secs_f64()
    );
    drop(c);
    let _ = child.kill();
    let _ = child.wait();
}

fn idle(n: usize) {
    let (mut child, addr) = spawn_server();
    let before = rss_kib(child.id());
    let c = Clients::connect(addr, n);
    // Let the server settle (it has nothing to do: every client is idle).
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_kib(child.id());
    println!(
        "== idle: {n} chat clients: server RSS {before} KiB -> {after} KiB, {:.0} B per idle client",
        (after.saturating_sub(before) * 1024) as f64 / n as f64
    );
    drop(c);
    let _ = child.kill();
    let _ = child.wait();
}
