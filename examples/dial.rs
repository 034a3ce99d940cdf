//! Many outbound connections through the library, and what became of each: `cargo run --release
//! --example dial -- [N]` (default 200 per target).
//!
//! It starts three targets on loopback: an echo server, a port where nothing listens (refused),
//! and a listener that never accepts with its backlog full (the handshake never completes).
//! Then one client loop, with no listener of its own, dials each target N times; each dialed
//! connection sends `ping`, waits for the echo and closes. Every socket ends in `on_close` with
//! its reason and its age, and the program prints them per target:
//!
//! ```text
//! echo     127.0.0.1:39019  200 dials: handler=200          age p50 3.7 ms  max 4.4 ms
//! refused  127.0.0.1:38003  200 dials: connect_refused=200  age p50 1.3 ms  max 1.6 ms
//! silent   127.0.0.1:53027  200 dials: connect_timeout=200  age p50 1007.4 ms  max 1007.8 ms
//! ```
//! (`handler`: closed by the dialer after its echo; the 1 s connect timeout is the client's.)

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sockman::{CloseReason, Config, Context, Handler, Server};

/// Which target a dialed connection went to.
pub type Target = usize;

/// Per connection: its target, when it was dialed, and the echo bytes still expected.
#[derive(Debug)]
pub struct Dial {
    pub target: Target,
    pub started: Instant,
    pub expect: usize,
}

/// Sends `ping` once connected, closes once it is echoed; records how every dial ended.
#[derive(Debug, Default)]
pub struct Dialer {
    /// (target, reason, age) of every connection closed.
    pub ended: Vec<(Target, CloseReason, Duration)>,
}

impl Handler for Dialer {
    type Conn = Dial;

    fn on_open(&mut self, _: &mut Context<'_, Dial>) -> Dial {
        unreachable!("this loop has no listener")
    }

    fn on_connected(&mut self, dial: &mut Dial, ctx: &mut Context<'_, Dial>) {
        dial.expect = 4;
        ctx.write(b"ping");
    }

    fn on_data(&mut self, dial: &mut Dial, ctx: &mut Context<'_, Dial>, data: &[u8]) {
        dial.expect = dial.expect.saturating_sub(data.len());
        if dial.expect == 0 {
            ctx.close();
        }
    }

    fn on_close(&mut self, dial: Dial, ctx: &mut Context<'_, Dial>, reason: CloseReason) {
        let age = ctx.now().saturating_duration_since(dial.started);
        self.ended.push((dial.target, reason, age));
    }
}

/// A listener that never accepts, with its backlog filled: connects to it never complete.
pub fn silent_listener() -> std::io::Result<(socket2::Socket, SocketAddr, Vec<std::net::TcpStream>)>
{
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    // A backlog of 0 still queues one connection; the kernel drops SYNs once it is full.
    socket.listen(0)?;
    let addr = socket.local_addr()?.as_socket().expect("an IPv4 address");
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
            fillers.push(s);
        }
    }
    Ok((socket, addr, fillers))
}

/// A port where nothing listens (bound once, then released).
pub fn refused_port() -> std::io::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    l.local_addr()
}

/// The client loop's configuration: no listener, a 1 s connect timeout.
pub fn config() -> Config {
    Config {
        listen: Vec::new(),
        connect_timeout: Duration::from_secs(1),
        ..Config::default()
    }
}

#[allow(dead_code)] // the tests include this file for `Dialer` and the targets
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let per_target: usize = match std::env::args().nth(1) {
        Some(n) => n.parse().map_err(|e| format!("bad count {n:?}: {e}"))?,
        None => 200,
    };
    // The echo target: sockman's own echo server, on a thread.
    let echo = Server::bind(
        Config {
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            ..Config::default()
        },
        sockman::Echo,
    )?;
    let echo_addr = echo.local_addrs()[0];
    let echo_handle = echo.handle();
    let echo_thread = std::thread::spawn(move || echo.run());
    let refused = refused_port()?;
    let (_silent, silent, _fillers) = silent_listener()?;
    let targets = [
        ("echo", echo_addr),
        ("refused", refused),
        ("silent", silent),
    ];

    let mut client = Server::bind(config(), Dialer::default())?;
    let mut failed_at_once = 0;
    for (target, &(_, addr)) in targets.iter().enumerate() {
        for _ in 0..per_target {
            let dial = Dial {
                target,
                started: Instant::now(),
                expect: 0,
            };
            if let Err(e) = client.connect(addr, dial) {
                eprintln!("{e}");
                failed_at_once += 1;
            }
        }
    }
    let expected = targets.len() * per_target - failed_at_once;
    let give_up = Instant::now() + Duration::from_secs(30);
    while client.handler().ended.len() < expected && Instant::now() < give_up {
        client.turn(Some(Duration::from_millis(100)))?;
    }
    for (target, (name, addr)) in targets.iter().enumerate() {
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        let mut ages: Vec<Duration> = Vec::new();
        for (t, reason, age) in &client.handler().ended {
            if *t == target {
                *reasons.entry(reason.to_string()).or_default() += 1;
                ages.push(*age);
            }
        }
        ages.sort();
        let p50 = ages.get(ages.len() / 2).copied().unwrap_or_default();
        let max = ages.last().copied().unwrap_or_default();
        let reasons: Vec<String> = reasons.iter().map(|(r, n)| format!("{r}={n}")).collect();
        println!(
            "{name:8} {addr}  {} dials: {:40} age p50 {:.1} ms  max {:.1} ms",
            ages.len(),
            reasons.join(" "),
            p50.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3,
        );
    }
    println!("client: {}", client.metrics());
    client.shutdown();
    echo_handle.shutdown();
    echo_thread.join().expect("echo thread")?;
    Ok(())
}
