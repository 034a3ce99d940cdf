//! What the RESP tests share: the example served on a thread (with a way to read its handler's
//! counters while it runs), a client that reads whole replies, a live `redis-server` child for
//! the comparisons, and the tools' paths (or the SKIPPED line when they are missing).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sockman::{Config, Handle, Metrics, Remote, Server};

use crate::resp::{self, Resp};
use crate::util::{self, TempDir, WAIT};

/// The example on its own thread, on 127.0.0.1 at a port the kernel picks.
pub struct Served {
    pub addr: SocketAddr,
    handle: Handle,
    remote: Remote<Resp>,
    thread: std::thread::JoinHandle<Metrics>,
}

impl Served {
    /// Serves `handler` with the example's configuration (changed by `tweak`).
    #[track_caller]
    pub fn start(handler: Resp, tweak: impl FnOnce(&mut Config)) -> Served {
        let mut config = resp::config(SocketAddr::from(([127, 0, 0, 1], 0)));
        tweak(&mut config);
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let server = Server::bind(config, handler).expect("bind the example");
            tx.send((server.local_addrs()[0], server.handle(), server.remote()))
                .unwrap();
            server.run().expect("the server loop failed")
        });
        let (addr, handle, remote) = rx.recv_timeout(WAIT).expect("the example did not start");
        Served {
            addr,
            handle,
            remote,
            thread,
        }
    }

    /// The example as it ships.
    #[track_caller]
    pub fn example() -> Served {
        Served::start(Resp::default(), |_| {})
    }

    /// Reads something of the handler, on its loop.
    #[track_caller]
    pub fn query<T: Send + 'static>(&self, f: impl FnOnce(&Resp) -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        self.remote
            .run(move |h, _| {
                let _ = tx.send(f(h));
            })
            .expect("the loop took the query");
        rx.recv_timeout(WAIT).expect("the loop answered the query")
    }

    /// Waits until `f` of the handler holds (bounded by [`WAIT`]).
    #[track_caller]
    pub fn wait_for(&self, what: &str, f: impl Fn(&Resp) -> bool + Send + Clone + 'static) {
        let deadline = Instant::now() + WAIT;
        while !self.query(f.clone()) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Stops it; returns its metrics (no connection left, nothing pending).
    #[track_caller]
    pub fn stop(self) -> Metrics {
        self.handle.shutdown();
        let m = self.thread.join().expect("the server thread panicked");
        assert_eq!(m.active, 0, "{m}");
        assert_eq!(m.pending_bytes, 0, "{m}");
        m
    }
}

/// A RESP client: writes requests, reads whole replies (with the stream's read timeout as the
/// safety net).
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    #[track_caller]
    pub fn connect(addr: SocketAddr) -> Client {
        Client::from(util::connect(addr))
    }

    pub fn from(stream: TcpStream) -> Client {
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    #[track_caller]
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write a request");
    }

    /// Reads `n` whole replies; returns their bytes.
    #[track_caller]
    pub fn replies(&mut self, n: usize) -> Vec<u8> {
        let mut end = 0;
        for _ in 0..n {
            end = loop {
                if let Some(e) = frame_end(&self.buf, end) {
                    break e;
                }
                self.fill();
            };
        }
        self.buf.drain(..end).collect()
    }

    /// Reads replies until one equal to `last` (included); returns them all.
    #[track_caller]
    pub fn replies_until(&mut self, last: &[u8]) -> Vec<u8> {
        let mut end = 0;
        loop {
            let start = end;
            end = loop {
                if let Some(e) = frame_end(&self.buf, start) {
                    break e;
                }
                self.fill();
            };
            if &self.buf[start..end] == last {
                return self.buf.drain(..end).collect();
            }
        }
    }

    /// Sends `request` and reads its one reply.
    #[track_caller]
    pub fn call(&mut self, request: &[u8]) -> Vec<u8> {
        self.send(request);
        self.replies(1)
    }

    /// Reads everything until the server closes (its EOF, or a reset: a server that closes
    /// with unread input resets the connection).
    #[track_caller]
    pub fn rest(&mut self) -> Vec<u8> {
        let mut rest = std::mem::take(&mut self.buf);
        let mut chunk = [0; 64 * 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return rest,
                Ok(n) => rest.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return rest,
                Err(e) => panic!("no EOF ({e}) after {:?}", String::from_utf8_lossy(&rest)),
            }
            assert!(rest.len() < 64 << 20, "no EOF after 64 MiB");
        }
    }

    #[track_caller]
    fn fill(&mut self) {
        let mut chunk = [0; 64 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => panic!("EOF after {:?}", String::from_utf8_lossy(&self.buf)),
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!(
                "no reply ({e}) after {:?}",
                String::from_utf8_lossy(&self.buf[..self.buf.len().min(500)])
            ),
        }
    }
}

/// Where the RESP2 reply starting at `at` ends, if it is whole in `buf`.
pub fn frame_end(buf: &[u8], at: usize) -> Option<usize> {
    let line_end = at + buf.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
    let line = &buf[at + 1..line_end];
    let next = line_end + 2;
    let n = || -> i64 { std::str::from_utf8(line).unwrap().parse().unwrap() };
    match buf[at] {
        b'+' | b'-' | b':' => Some(next),
        b'$' if n() < 0 => Some(next),
        b'$' => {
            let end = next + n() as usize + 2;
            (buf.len() >= end).then_some(end)
        }
        b'*' => (0..n().max(0)).try_fold(next, |at, _| frame_end(buf, at)),
        other => panic!("not a RESP reply: {:?} at {at}", other as char),
    }
}

/// A request as a RESP array of bulk strings.
pub fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A tool on PATH (or in /usr/bin, /usr/sbin), or `None` after printing the SKIPPED line.
pub fn tool_or_skip(name: &str, test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/bin".into(), "/usr/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        // Straight to stderr: the harness captures eprintln! of a passing test.
        let _ = writeln!(
            io::stderr(),
            "SKIPPED {test}: {name} is not installed (apt-get install redis-server redis-tools)"
        );
    }
    found
}

/// A live `redis-server` (nothing saved, on a free port), killed when dropped.
pub struct RedisServer {
    child: Child,
    pub addr: SocketAddr,
    _dir: TempDir,
}

impl RedisServer {
    /// Starts one, or `None` (SKIPPED) without the binary or when it is not Redis 7.
    #[track_caller]
    pub fn start(test: &str) -> Option<RedisServer> {
        let bin = tool_or_skip("redis-server", test)?;
        let version = Command::new(&bin).arg("--version").output().ok()?;
        let version = String::from_utf8_lossy(&version.stdout).to_string();
        if !version.contains(" v=7.") {
            let _ = writeln!(
                io::stderr(),
                "SKIPPED {test}: the replies are compared with Redis 7, this is {version}"
            );
            return None;
        }
        let dir = TempDir::new("redis");
        // A port the kernel had free a moment ago; another process may take it first, so a
        // server that fails to start is retried on another.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Command::new(&bin)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .args(["--loglevel", "warning"])
                .arg("--dir")
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + WAIT;
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited: the port was taken
                }
                if let Ok(s) = TcpStream::connect(addr) {
                    let mut c = Client {
                        stream: s,
                        buf: Vec::new(),
                    };
                    c.stream.set_read_timeout(Some(util::IO_TIMEOUT)).unwrap();
                    if c.call(b"PING\r\n") == b"+PONG\r\n" {
                        return Some(RedisServer {
                            child,
                            addr,
                            _dir: dir,
                        });
                    }
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("redis-server did not answer on {addr}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        panic!("redis-server did not start on any of five ports");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
