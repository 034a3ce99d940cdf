//! `sockman serve` behind a real HAProxy (`mode tcp`, `send-proxy-v2`, HTTP health checks on
//! each instance's `/readyz` through its admin port): echo through the balancer with the
//! clients' real addresses in `/connections`, fail-over when an instance is SIGKILLed, and a
//! lame-duck drain (`--drain-delay`) during which no client through HAProxy sees a failure.
//!
//! **Skipped when `haproxy` is not installed**: each test then prints
//! `SKIPPED: haproxy is not installed (apt-get install haproxy)` on stderr and returns (`.ci/run`
//! installs it). HAProxy's state is read from its stats socket (`show stat`), never guessed
//! from sleeps.
#![cfg(feature = "cli")]

mod util;

use std::collections::BTreeSet;
use std::io::{self, BufRead, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use util::child::Bin;
use util::http;
use util::{close_gracefully, connect_from, echo, stat, TempDir, IO_TIMEOUT, WAIT};

const SKIPPED: &str = "SKIPPED: haproxy is not installed (apt-get install haproxy)";

/// The `haproxy` executable: on PATH, or where Debian puts it (`/usr/sbin`, which a non-root
/// PATH may lack).
fn haproxy_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|dir| dir.join("haproxy"))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The binary, or `None` after printing the SKIPPED line.
fn haproxy_or_skip() -> Option<PathBuf> {
    let found = haproxy_binary();
    if found.is_none() {
        // Straight to the process's stderr: the test harness captures `eprintln!` of a passing
        // test, and a skip must be seen.
        let _ = writeln!(io::stderr(), "{SKIPPED}");
    }
    found
}

/// One `sockman serve --proxy-protocol v2 --admin` instance.
struct Instance {
    bin: Bin,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Instance {
    #[track_caller]
    fn spawn(extra: &[&str]) -> Instance {
        let (bin, addr, admin) = Bin::serve_with_admin(
            &[
                &["--proxy-protocol", "v2", "--stats-interval", "100ms"],
                extra,
            ]
            .concat(),
        );
        Instance { bin, addr, admin }
    }

    /// `sockman_accepted_total` in its `/metrics`.
    #[track_caller]
    fn accepted(&self) -> u64 {
        let [n] = http::samples(self.admin, ["sockman_accepted_total"]);
        n as u64
    }

    /// The `peer=` field of every line of its `/connections`.
    #[track_caller]
    fn peers(&self) -> Vec<SocketAddr> {
        http::connections(self.admin, "")
            .into_iter()
            .map(|(peer, _)| peer)
            .collect()
    }
}

/// HAProxy as a child (`haproxy -db -f CFG`), killed by its pid on drop; its output is kept
/// for failure messages.
struct Haproxy {
    child: Child,
    frontend: SocketAddr,
    stats: PathBuf,
    output: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

impl Haproxy {
    /// Starts HAProxy in front of `servers` (name, instance) and waits until its stats socket
    /// answers and every server has passed a health check.
    #[track_caller]
    fn start(binary: &Path, servers: &[(&str, &Instance)]) -> Haproxy {
        let dir = TempDir::new("haproxy-cfg");
        let stats = dir.path().join("stats.sock");
        // A free port for the frontend: the kernel picks it, HAProxy binds it right after.
        let frontend = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut cfg = format!(
            "global\n\
             \x20   nbthread 1\n\
             \x20   no strict-limits\n\
             \x20   stats socket {stats} mode 600 level admin\n\
             defaults\n\
             \x20   mode tcp\n\
             \x20   timeout connect 2s\n\
             \x20   timeout client 10s\n\
             \x20   timeout server 10s\n\
             \x20   timeout check 1s\n\
             frontend fe\n\
             \x20   bind {frontend}\n\
             \x20   default_backend socks\n\
             backend socks\n\
             \x20   balance roundrobin\n\
             \x20   option httpchk GET /readyz\n",
            stats = stats.display(),
        );
        for (name, inst) in servers {
            cfg.push_str(&format!(
                "    server {name} {} send-proxy-v2 check port {} inter 100ms fall 1 rise 1\n",
                inst.addr,
                inst.admin.port()
            ));
        }
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, &cfg).unwrap();
        let mut child = Command::new(binary)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn haproxy");
        let output = Arc::new(Mutex::new(Vec::new()));
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = Arc::clone(&output);
            std::thread::spawn(move || {
                for line in io::BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    output.lock().unwrap().push(line);
                }
            });
        }
        let mut h = Haproxy {
            child,
            frontend,
            stats,
            output,
            _dir: dir,
        };
        for (name, _) in servers {
            h.wait_server(name, "the first passed health check", |s| {
                s.status == "UP" && s.check == "L7OK"
            });
        }
        h
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// `show stat` on the stats socket: `None` while it does not answer yet.
    fn show_stat(&self) -> Option<String> {
        let mut s = UnixStream::connect(&self.stats).ok()?;
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.write_all(b"show stat\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    }

    /// Server `name`'s row of `show stat`, if HAProxy answers.
    fn server(&self, name: &str) -> Option<ServerState> {
        let csv = self.show_stat()?;
        let mut lines = csv.lines();
        let header: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
        let col = |field: &str| header.iter().position(|h| *h == field).unwrap();
        let (px, sv, status, check) = (
            col("pxname"),
            col("svname"),
            col("status"),
            col("check_status"),
        );
        lines.find_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f.get(px) == Some(&"socks") && f.get(sv) == Some(&name)).then(|| ServerState {
                status: f[status].to_string(),
                // A check under way is marked "* ".
                check: f[check].trim_start_matches("* ").to_string(),
            })
        })
    }

    /// Polls `show stat` until server `name` satisfies `ok`; fails after [`WAIT`] or if
    /// HAProxy exits, with what it last reported and its output.
    #[track_caller]
    fn wait_server(&mut self, name: &str, what: &str, ok: impl Fn(&ServerState) -> bool) {
        let deadline = Instant::now() + WAIT;
        let mut last = None;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("haproxy exited ({status}); output:\n{}", self.output());
            }
            if let Some(state) = self.server(name) {
                if ok(&state) {
                    return;
                }
                last = Some(state);
            }
            assert!(
                Instant::now() < deadline,
                "server {name}: no {what} in {WAIT:?} (last {last:?}); haproxy output:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10)); // pacing: checks run every 100 ms
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL to this child's pid only.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct ServerState {
    /// `UP`, `DOWN`, ...
    status: String,
    /// The last check's result: `L7OK`, `L7STS` (a bad HTTP status), `L4CON` (refused), ...
    check: String,
}

/// Connects to HAProxy's frontend from the loopback source address 127.0.0.`n`.
#[track_caller]
fn client(h: &Haproxy, n: u8) -> TcpStream {
    connect_from([127, 0, 0, n], h.frontend)
}

/// Echo through HAProxy with the clients' own addresses in each sockman's `/connections`
/// (PROXY v2 from HAProxy), then a SIGKILLed instance: once HAProxy's check marks it down,
/// every new connection goes to the other one and echoes. Skipped (a SKIPPED line on
/// stderr) when haproxy is not installed.
#[test]
fn behind_haproxy_clients_keep_their_addresses_and_a_killed_instance_fails_over_or_skipped() {
    let Some(binary) = haproxy_or_skip() else {
        return;
    };
    let mut a = Instance::spawn(&[]);
    let b = Instance::spawn(&[]);
    let mut h = Haproxy::start(&binary, &[("a", &a), ("b", &b)]);

    // Eight clients, each from its own 127.0.0.N, open at once.
    let mut clients: Vec<TcpStream> = (0..8).map(|k| client(&h, 10 + k)).collect();
    for (k, c) in clients.iter_mut().enumerate() {
        echo(c, format!("through haproxy {k}").as_bytes());
    }
    let want: BTreeSet<SocketAddr> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
    let (pa, pb) = (a.peers(), b.peers());
    let got: BTreeSet<SocketAddr> = pa.iter().chain(&pb).copied().collect();
    assert_eq!(pa.len() + pb.len(), 8, "a: {pa:?}, b: {pb:?}");
    assert_eq!(got, want, "a: {pa:?}, b: {pb:?}");
    assert!(
        got.iter().all(|p| p.ip() != std::net::Ipv4Addr::LOCALHOST),
        "a peer is HAProxy's own address: {got:?}"
    );
    // Round robin: both instances have some.
    assert!(!pa.is_empty() && !pb.is_empty(), "a: {pa:?}, b: {pb:?}");
    for c in clients {
        close_gracefully(c);
    }

    // SIGKILL a: no drain, its sockets just vanish. HAProxy's check finds it refused.
    a.bin.signal("KILL");
    let status = a.bin.wait_exit();
    assert!(!status.success(), "{status}");
    h.wait_server("a", "DOWN after the kill", |s| s.status == "DOWN");
    let before = b.accepted();
    let mut clients: Vec<TcpStream> = (0..10).map(|k| client(&h, 30 + k)).collect();
    for (k, c) in clients.iter_mut().enumerate() {
        echo(c, format!("after the kill {k}").as_bytes());
    }
    assert_eq!(b.accepted(), before + 10);
    let want: BTreeSet<SocketAddr> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
    let got: BTreeSet<SocketAddr> = b.peers().into_iter().collect();
    assert_eq!(got, want);
    for c in clients {
        close_gracefully(c);
    }
    drop(h);
    let mut b = b;
    b.bin.terminate();
    assert_eq!(stat(b.bin.final_line(), "accepted"), Some(before + 10));
}

/// How one client's connect + echo + close through HAProxy ended.
#[derive(Debug, PartialEq)]
enum Outcome {
    Ok,
    Connect(io::ErrorKind),
    Write(io::ErrorKind),
    Read(io::ErrorKind),
    /// EOF or wrong bytes after this many of the echo.
    Short(usize),
    /// Something other than EOF after the echo and our FIN.
    NoEof(String),
}

fn one_client(frontend: SocketAddr, i: u64) -> Outcome {
    let mut c = match TcpStream::connect_timeout(&frontend, IO_TIMEOUT) {
        Ok(c) => c,
        Err(e) => return Outcome::Connect(e.kind()),
    };
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    c.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    let msg = util::pattern(64, i);
    if let Err(e) = c.write_all(&msg) {
        return Outcome::Write(e.kind());
    }
    let mut back = vec![0; msg.len()];
    let mut got = 0;
    while got < back.len() {
        match c.read(&mut back[got..]) {
            Ok(0) => return Outcome::Short(got),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Outcome::Read(e.kind()),
        }
    }
    if back != msg {
        return Outcome::Short(back.iter().zip(&msg).take_while(|(a, b)| a == b).count());
    }
    let _ = c.shutdown(Shutdown::Write);
    let mut buf = [0; 16];
    match c.read(&mut buf) {
        Ok(0) => Outcome::Ok,
        other => Outcome::NoEof(format!("{other:?}")),
    }
}

/// A lame-duck drain behind HAProxy: SIGTERM to an instance with `--drain-delay 2s` fails its
/// `/readyz` at once, HAProxy's check marks it down while it still accepts, and only then do
/// its listeners close; for 3 s a client connects, echoes and closes every few ms, and not one
/// of them sees a refusal, a reset or a short echo. The drained instance exits 0 with a final
/// line, no earlier than the delay. Skipped (a SKIPPED line on stderr) when haproxy is not
/// installed.
#[test]
fn behind_haproxy_a_lame_duck_drain_fails_no_client_or_skipped() {
    let Some(binary) = haproxy_or_skip() else {
        return;
    };
    let mut a = Instance::spawn(&["--drain-delay", "2s", "--drain-timeout", "10s"]);
    let b = Instance::spawn(&[]);
    let mut h = Haproxy::start(&binary, &[("a", &a), ("b", &b)]);
    let (a_before, b_before) = (a.accepted(), b.accepted());

    let frontend = h.frontend;
    let clients = std::thread::spawn(move || {
        let start = Instant::now();
        let mut outcomes = Vec::new();
        for i in 0..3000u64 {
            if start.elapsed() >= Duration::from_secs(3) {
                break;
            }
            outcomes.push(one_client(frontend, i));
            std::thread::sleep(Duration::from_millis(2)); // pacing: one connection every few ms
        }
        outcomes
    });
    // Some connections land on both before the drain.
    let deadline = Instant::now() + WAIT;
    while a.accepted() == a_before || b.accepted() == b_before {
        assert!(Instant::now() < deadline, "round robin did not reach both");
        std::thread::sleep(Duration::from_millis(5)); // pacing: the clients run meanwhile
    }
    let sigterm = Instant::now();
    a.bin.signal("TERM");
    // Not ready once the signal is handled (its log line), while the listeners stay open
    // (HAProxy sees the 503: L7STS).
    a.bin.wait_line("the lame-duck line", |l| {
        l.contains("draining in 2s: /readyz fails now")
    });
    let r = http::get(a.admin, "/readyz");
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(http::get(a.admin, "/livez").status, 200);
    h.wait_server("a", "DOWN from its failing /readyz", |s| {
        s.status == "DOWN" && s.check == "L7STS"
    });
    let down_after = sigterm.elapsed();
    assert!(
        down_after < Duration::from_secs(2),
        "HAProxy marked the instance down only after the delay ({down_after:?}): the test proves nothing"
    );
    a.bin.wait_success();
    let drained_after = sigterm.elapsed();
    assert!(
        drained_after >= Duration::from_secs(2),
        "exited {drained_after:?} after SIGTERM, before the 2 s drain delay"
    );
    let a_final = a.bin.final_line().to_string();
    assert_eq!(stat(&a_final, "active"), Some(0), "{a_final}");
    assert_eq!(stat(&a_final, "reset").unwrap_or(0), 0, "{a_final}");

    let outcomes = clients.join().expect("the client thread panicked");
    let failed = util::failures(&outcomes, &Outcome::Ok);
    assert!(
        failed.is_empty(),
        "{} of {} clients failed through HAProxy during the drain: {:?}\nhaproxy:\n{}\nlog of a:\n{}",
        failed.len(),
        outcomes.len(),
        &failed[..failed.len().min(10)],
        h.output(),
        a.bin.log()
    );
    assert!(
        outcomes.len() >= 100,
        "only {} clients in 3 s",
        outcomes.len()
    );
    // Every client landed on exactly one instance: a's final count and b's /metrics add up.
    let a_total = stat(&a_final, "accepted").unwrap();
    let n = outcomes.len() as u64;
    let deadline = Instant::now() + WAIT;
    loop {
        let b_total = b.accepted();
        if (a_total - a_before) + (b_total - b_before) == n {
            eprintln!(
                "drain behind haproxy: {n} clients, {} on the drained instance, {} on the other; \
                 marked down {down_after:?} and exited {drained_after:?} after SIGTERM",
                a_total - a_before,
                b_total - b_before
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a accepted {}, b {}, clients {n}",
            a_total - a_before,
            b_total - b_before
        );
        std::thread::sleep(Duration::from_millis(5)); // pacing: a stats tick is 10 ms
    }
    drop(h);
    let mut b = b;
    b.bin.terminate();
}
