//! Helpers shared by the integration tests, the one module every file in `tests/` includes with
//! `mod util;`: in-process servers (on a thread, or owned and turned by the test, on the real
//! clock or at virtual times with `turn_at`), clients with a read timeout as a safety net, and
//! byte patterns; by topic in the submodules: [`child`] (the `sockman` binary as a child and its
//! log lines), [`proxy`] (a `sockman proxy` child and its `/metrics`), [`http`] (the admin
//! endpoint's HTTP client and `/metrics` samples), [`procfs`] (a child's descriptors, memory
//! and CPU time) and [`load`] (steady churn and long-lived sessions on an echo address).
//!
//! Every wait here is bounded in time and count; a timeout fails the test with what was seen.
//! Each test file uses a subset of these helpers.
#![allow(dead_code)]

#[cfg(feature = "cli")]
pub mod child;
pub mod http;
pub mod load;
pub mod procfs;
#[cfg(feature = "cli")]
pub mod proxy;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sockman::{CloseReason, Config, Handle, Handler, Metrics, Server};

/// Safety net for blocking reads and writes: long enough never to fire on a slow CI machine,
/// short enough that a hang fails the test instead of the whole suite.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Upper bound for waiting on any one event (a turn condition, a log line, a child's exit).
pub const WAIT: Duration = Duration::from_secs(10);

/// A config listening on 127.0.0.1 with a port the kernel picks.
pub fn local_config() -> Config {
    Config {
        listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        ..Config::default()
    }
}

/// `config` with the admin endpoint on 127.0.0.1 at a port the kernel picks.
pub fn with_admin(config: Config) -> Config {
    Config {
        admin: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        ..config
    }
}

/// A server running `run()` on its own thread.
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    /// The admin endpoint's address, if it is on.
    pub admin: Option<SocketAddr>,
    pub handle: Handle,
    pub thread: JoinHandle<Metrics>,
}

impl Running {
    /// Stops the server through its handle and returns its final metrics, after asserting the
    /// invariants every test shares: no connection left open and no output left pending.
    #[track_caller]
    pub fn stop(self) -> Metrics {
        self.handle.shutdown();
        let metrics = self.thread.join().expect("the server thread panicked");
        assert_stopped_clean(metrics)
    }
}

/// The invariants every test shares at the end of a run: no connection left open and no output
/// left pending. Returns `metrics`.
#[track_caller]
fn assert_stopped_clean(metrics: Metrics) -> Metrics {
    assert_eq!(metrics.active, 0, "connections left open: {metrics}");
    assert_eq!(metrics.pending_bytes, 0, "output left pending: {metrics}");
    metrics
}

/// Binds `config` (usually [`local_config`]) with `handler` on a new thread and runs it there.
/// Returns once the listener is bound, so clients can connect at once.
#[track_caller]
pub fn start<H>(config: Config, handler: H) -> Running
where
    H: Handler + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("server".into())
        .spawn(move || {
            let server = Server::bind(config, handler).expect("bind the test server");
            tx.send((
                server.local_addrs()[0],
                server.admin_addr(),
                server.handle(),
            ))
            .expect("the test thread went away");
            server.run().expect("the server loop failed")
        })
        .expect("spawn the server thread");
    let (addr, admin, handle) = rx
        .recv_timeout(WAIT)
        .expect("the server did not start (see its panic above)");
    Running {
        addr,
        admin,
        handle,
        thread,
    }
}

/// [`start`] with the admin endpoint on (see [`with_admin`]); returns the server and the admin
/// address.
#[track_caller]
pub fn start_with_admin<H>(config: Config, handler: H) -> (Running, SocketAddr)
where
    H: Handler + Send + 'static,
{
    let server = start(with_admin(config), handler);
    let admin = server.admin.expect("the admin endpoint is on");
    (server, admin)
}

/// Binds a server to be turned by the test itself; returns it and its address.
#[track_caller]
pub fn bind<H: Handler>(config: Config, handler: H) -> (Server<H>, SocketAddr) {
    let server = Server::bind(config, handler).expect("bind the test server");
    let addr = server.local_addrs()[0];
    (server, addr)
}

/// [`bind`] with the admin endpoint on (see [`with_admin`]); returns the server, its data
/// address and the admin address.
#[track_caller]
pub fn bind_with_admin<H: Handler>(
    config: Config,
    handler: H,
) -> (Server<H>, SocketAddr, SocketAddr) {
    let (server, addr) = bind(with_admin(config), handler);
    let admin = server.admin_addr().expect("the admin endpoint is on");
    (server, addr, admin)
}

/// Turns `server` (at most 20 ms per turn) until `done` holds. `done` runs before every turn, so
/// it may also act as a client between turns (e.g. a nonblocking write). Fails after [`WAIT`] or
/// 100 000 turns, naming `what` and the metrics.
#[track_caller]
pub fn turn_until<H: Handler>(
    server: &mut Server<H>,
    what: &str,
    done: impl FnMut(&Server<H>) -> bool,
) {
    turn_loop(server, what, "", done, |s| {
        s.turn(Some(Duration::from_millis(20)))
            .expect("turn failed");
    });
}

/// How long one turn at a fixed virtual time waits for real socket events (an accept, bytes to
/// arrive): short, since the loop's own time does not move while it waits.
pub const EVENT_WAIT: Duration = Duration::from_millis(5);

/// Turns `server` at the fixed virtual time `now` (each turn waits at most [`EVENT_WAIT`] for
/// real socket events) until `done` holds: how a test waits for an accept or for bytes to
/// arrive without letting the server's time move. `done` runs before every turn, so it may also
/// act as a client between turns. Fails after [`WAIT`] of real time or 100 000 turns, naming
/// `what` and the metrics.
#[track_caller]
pub fn turn_until_at<H: Handler>(
    server: &mut Server<H>,
    now: Instant,
    what: &str,
    done: impl FnMut(&Server<H>) -> bool,
) {
    turn_loop(server, what, " (at a fixed virtual time)", done, |s| {
        s.turn_at(now, Some(EVENT_WAIT)).expect("turn_at failed");
    });
}

/// The loop of [`turn_until`] and [`turn_until_at`]: `done` before every `turn`, bounded by
/// [`WAIT`] and 100 000 turns.
#[track_caller]
fn turn_loop<H: Handler>(
    server: &mut Server<H>,
    what: &str,
    how: &str,
    mut done: impl FnMut(&Server<H>) -> bool,
    mut turn: impl FnMut(&mut Server<H>),
) {
    let deadline = Instant::now() + WAIT;
    for _ in 0..100_000 {
        if done(server) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}{how}: {}",
            server.metrics()
        );
        turn(server);
    }
    panic!("{what}: not reached in 100000 turns: {}", server.metrics());
}

/// Runs `job` (a blocking client: an HTTP request, a read until EOF) on its own thread while the
/// test turns `server` at the fixed virtual time `now`, until the job has finished; returns its
/// result. Bounded like [`turn_until_at`]; a panic in the job fails the test with its message.
#[track_caller]
pub fn turn_while_at<H: Handler, T: Send + 'static>(
    server: &mut Server<H>,
    now: Instant,
    what: &str,
    job: impl FnOnce() -> T + Send + 'static,
) -> T {
    let thread = std::thread::Builder::new()
        .name("client".into())
        .spawn(job)
        .expect("spawn the client thread");
    turn_until_at(server, now, what, |_| thread.is_finished());
    match thread.join() {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e),
    }
}

/// One turn at the virtual time `now` that does not wait for events: what is due by `now` fires.
#[track_caller]
pub fn step<H: Handler>(server: &mut Server<H>, now: Instant) {
    server
        .turn_at(now, Some(Duration::ZERO))
        .expect("turn_at failed");
}

/// [`step`], and asserts that the server's time moved to `now`.
#[track_caller]
pub fn step_to<H: Handler>(server: &mut Server<H>, now: Instant) {
    step(server, now);
    assert_eq!(
        server.now(),
        now,
        "the server's time did not move to the step's"
    );
}

/// [`step_to`] `at`, then asserts that exactly `closed` connections have been closed so far, all
/// for `reason`.
#[track_caller]
pub fn step_closing<H: Handler>(
    server: &mut Server<H>,
    at: Instant,
    reason: CloseReason,
    closed: u64,
) {
    step_to(server, at);
    let m = server.metrics();
    assert_eq!(m.closed_by(reason), closed, "{m}");
    assert_eq!(m.closed_total(), closed, "{m}");
}

/// Writes `msg` on `stream` and turns the echo server `server` at the virtual time `at` until
/// it has written it back, then reads it: the connection is accepted and its activity is
/// stamped `at`.
#[track_caller]
pub fn ping_at<H: Handler>(
    server: &mut Server<H>,
    at: Instant,
    stream: &mut TcpStream,
    msg: &[u8],
) {
    let out = server.metrics().bytes_out;
    stream.write_all(msg).expect("write a ping");
    turn_until_at(server, at, "the echo of a ping", |s| {
        s.metrics().bytes_out >= out + msg.len() as u64
    });
    assert_same(&read_exactly(stream, msg.len()), msg);
}

/// Stops an owned server at the virtual time `now` through its [`Handle`], like [`stop`] but
/// without letting the server's time move. Returns its metrics after the shared invariants.
#[track_caller]
pub fn stop_at<H: Handler>(server: &mut Server<H>, now: Instant) -> Metrics {
    server.handle().shutdown();
    turn_until_at(server, now, "the server to stop", |s| s.is_stopped());
    assert_stopped_clean(server.metrics().clone())
}

/// Asserts that the server has not closed `stream`: a nonblocking read finds nothing to read
/// (no EOF, no reset, no data). Only meaningful together with a server-side check (the metrics):
/// a FIN sent a moment ago may still be in flight.
#[track_caller]
pub fn assert_open(stream: &mut TcpStream) {
    stream.set_nonblocking(true).unwrap();
    let mut buf = [0; 64];
    let result = stream.read(&mut buf);
    stream.set_nonblocking(false).unwrap();
    match result {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Ok(0) => panic!("expected the connection open, got EOF"),
        Ok(n) => panic!("expected nothing to read, got {n} bytes"),
        Err(e) => panic!("expected the connection open, got {e}"),
    }
}

/// Stops an owned server through its [`Handle`] (as another thread would), turns it until it
/// has stopped, and returns its metrics after the shared invariants (see [`Running::stop`]).
#[track_caller]
pub fn stop<H: Handler>(server: &mut Server<H>) -> Metrics {
    server.handle().shutdown();
    turn_until(server, "the server to stop", |s| s.is_stopped());
    assert_stopped_clean(server.metrics().clone())
}

/// Connects with [`IO_TIMEOUT`] on reads and writes.
#[track_caller]
pub fn connect(addr: SocketAddr) -> TcpStream {
    with_io_timeout(TcpStream::connect(addr).expect("connect to the test server"))
}

/// Connects a client with a small receive buffer (set before the handshake, so the window is
/// small from the start and autotuning is off): a client that does not read fills up quickly.
#[track_caller]
pub fn connect_small_rcvbuf(addr: SocketAddr) -> TcpStream {
    connect_socket(addr, |socket| socket.set_recv_buffer_size(4096).unwrap())
}

/// Connects from the local address `ip` (any of 127.0.0.0/8 is local on Linux), with
/// [`IO_TIMEOUT`] on reads and writes: a second "client address" for per-IP tests.
#[track_caller]
pub fn connect_from(ip: [u8; 4], addr: SocketAddr) -> TcpStream {
    connect_socket(addr, |socket| {
        socket
            .bind(&SocketAddr::from((ip, 0)).into())
            .expect("bind the client to a loopback source address")
    })
}

/// Connects a TCP socket that `setup` prepared (before the handshake), with [`IO_TIMEOUT`] on
/// reads and writes.
#[track_caller]
fn connect_socket(addr: SocketAddr, setup: impl FnOnce(&socket2::Socket)) -> TcpStream {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    setup(&socket);
    socket
        .connect(&addr.into())
        .expect("connect to the test server");
    with_io_timeout(socket.into())
}

/// `stream` with [`IO_TIMEOUT`] on reads and writes.
#[track_caller]
fn with_io_timeout(stream: TcpStream) -> TcpStream {
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
}

/// Asserts that a connect to `addr` during a drain is refused (the listener is closed), not
/// accepted and not left hanging (a connect timeout of 2 s).
#[track_caller]
pub fn expect_refused(addr: SocketAddr) {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
        Err(e) => panic!("a connect during the drain failed with {e}, not refused"),
        Ok(_) => panic!("a connect during the drain was accepted"),
    }
}

/// Closes `stream` abortively: with `SO_LINGER` 0, `close()` sends a RST instead of a FIN.
#[track_caller]
pub fn abort(stream: TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
}

/// A port where a connect is refused: bound (so that nobody else gets it while the test runs)
/// but not listening, so the kernel answers a SYN with a reset. Keep the socket while the port
/// is in use.
pub fn refused_port() -> (socket2::Socket, SocketAddr) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    (socket, addr)
}

/// A listener that never accepts, with its backlog (0: one queued connection) filled, so that
/// the kernel drops further SYNs and a dial to it never completes. Fails unless a filler connect
/// timed out, i.e. the backlog is seen to be full.
#[track_caller]
pub fn silent_listener() -> (socket2::Socket, SocketAddr, Vec<TcpStream>) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => fillers.push(s),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return (socket, addr, fillers),
            Err(e) => panic!("filling the silent listener's backlog: {e}"),
        }
    }
    panic!(
        "the backlog of a listen(0) socket took {} connections without filling",
        fillers.len()
    );
}

/// Accepts one connection on `listener`, waiting at most `within` (`SO_RCVTIMEO` bounds a
/// blocking `accept` on Linux); the stream gets [`IO_TIMEOUT`] on reads and writes.
#[track_caller]
pub fn accept_within(listener: &TcpListener, within: Duration) -> TcpStream {
    socket2::SockRef::from(listener)
        .set_read_timeout(Some(within))
        .unwrap();
    let (stream, _) = listener
        .accept()
        .unwrap_or_else(|e| panic!("no connection to accept in {within:?}: {e}"));
    with_io_timeout(stream)
}

/// Reads until EOF (bounded by the stream's read timeout per read and by `max` bytes in all).
pub fn read_to_eof(stream: &mut TcpStream, max: usize) -> io::Result<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("after {} bytes: {e}", got.len()),
                ))
            }
        }
        if got.len() > max {
            return Err(io::Error::other(format!(
                "more than {max} bytes before EOF"
            )));
        }
    }
}

/// `len` bytes of a pattern that differs per `seed` and does not repeat every 256 bytes, so a
/// lost, duplicated or reordered chunk shows up.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Reads exactly `len` bytes (blocking, with the stream's read timeout as the safety net).
#[track_caller]
pub fn read_exactly(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    if let Err(e) = stream.read_exact(&mut buf) {
        panic!("reading {len} bytes: {e}");
    }
    buf
}

/// Writes `data` and reads it back with a concurrent reader thread (so data larger than the
/// socket buffers cannot deadlock); asserts it came back whole and in order.
#[track_caller]
pub fn echo(stream: &mut TcpStream, data: &[u8]) {
    let mut reader = stream.try_clone().unwrap();
    let len = data.len();
    let back = std::thread::scope(|s| {
        let r = s.spawn(move || {
            let mut buf = vec![0; len];
            reader.read_exact(&mut buf).map(|_| buf)
        });
        stream.write_all(data).expect("write to the echo server");
        r.join().unwrap()
    });
    let back = back.unwrap_or_else(|e| panic!("reading back {len} bytes: {e}"));
    assert_same(&back, data);
}

/// The outcomes other than `ok`, with their indices: what a test that runs many clients reports
/// when not all of them went well.
pub fn failures<'a, T: PartialEq>(outcomes: &'a [T], ok: &T) -> Vec<(usize, &'a T)> {
    outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| *o != ok)
        .collect()
}

/// Asserts `got == want` without printing megabytes: names the first difference.
#[track_caller]
pub fn assert_same(got: &[u8], want: &[u8]) {
    if got != want {
        let at = got.iter().zip(want).position(|(a, b)| a != b);
        panic!(
            "data differs: got {} bytes, want {}; first difference at {at:?}",
            got.len(),
            want.len()
        );
    }
}

/// Blocks until the server closes `stream`: asserts the read sees EOF (or a reset) rather than
/// data or the timeout.
#[track_caller]
pub fn expect_closed(stream: &mut TcpStream) {
    let mut buf = [0; 64];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Ok(n) => panic!("expected the server to close, got {n} bytes"),
        Err(e) => panic!("expected the server to close, got {e}"),
    }
}

/// Closes like a polite client: shuts down the write side and waits for the server's EOF. When
/// this returns, the server has closed its side (and counted the close as `PeerClosed`).
#[track_caller]
pub fn close_gracefully(mut stream: TcpStream) {
    stream.shutdown(Shutdown::Write).unwrap();
    let mut buf = [0; 64];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("expected EOF after shutdown(Write), got {n} bytes"),
        Err(e) => panic!("expected EOF after shutdown(Write), got {e}"),
    }
}

/// A temporary directory `sockman-TAG-PID-N` under the system's temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    #[track_caller]
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sockman-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The value of `key=N` in a log line such as
/// `stats active=0 peak=3 accepted=3 closed=3{peer_closed=2 idle_timeout=1} ...`.
pub fn stat(line: &str, key: &str) -> Option<u64> {
    line.split(|c: char| c.is_whitespace() || c == '{' || c == '}')
        .find_map(|field| field.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// The `q` quantile (0..=1) of `sorted` (nearest rank).
#[track_caller]
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    assert!(!sorted.is_empty(), "no samples");
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
