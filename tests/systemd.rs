//! `sockman serve` started as systemd starts a socket-activated `Type=notify` service: the
//! listening socket is bound by the "manager" (this test) and passed as fd 3 with `LISTEN_FDS=1`
//! and `LISTEN_PID` set to the service's own pid, and `NOTIFY_SOCKET` names a Unix datagram
//! socket the manager reads `READY=1` and `STOPPING=1` from.
#![cfg(feature = "cli")]

mod util;

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use util::child::Bin;
use util::{connect, echo, stat, TempDir, WAIT};

/// The service manager's end of `NOTIFY_SOCKET`.
struct Notify {
    socket: UnixDatagram,
    path: PathBuf,
    /// Every message received so far.
    seen: Vec<String>,
}

impl Notify {
    fn bind(dir: &Path) -> Notify {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        Notify {
            socket,
            path,
            seen: Vec::new(),
        }
    }

    /// Waits (at most [`WAIT`]) for a datagram with the line `state` (e.g. `READY=1`).
    #[track_caller]
    fn wait_for(&mut self, state: &str) {
        let deadline = Instant::now() + WAIT;
        let mut buf = [0; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {state} in {WAIT:?}; received: {:?}",
                self.seen
            );
            self.socket.set_read_timeout(Some(left)).unwrap();
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.seen.push(msg.clone());
                    if msg.lines().any(|l| l == state) {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("waiting for {state}: {e}; received: {:?}", self.seen),
            }
        }
    }
}

/// `sockman ARGS` as a socket-activated service: `fd` is its fd 3, `LISTEN_FDS=1`,
/// `LISTEN_PID` its pid (a shell exports its own `$$` and execs sockman, keeping the pid),
/// `NOTIFY_SOCKET` the given path.
#[track_caller]
fn activated(fd: RawFd, notify: Option<&Path>, args: &[&str]) -> Bin {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(r#"export LISTEN_PID=$$; exec "$0" "$@""#)
        .arg(env!("CARGO_BIN_EXE_sockman"))
        .args(args)
        .env("LISTEN_FDS", "1")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .env_remove("LISTEN_FDS_FIRST_FD");
    match notify {
        Some(path) => command.env("NOTIFY_SOCKET", path),
        None => command.env_remove("NOTIFY_SOCKET"),
    };
    // SAFETY: between fork and exec only async-signal-safe calls (dup2, fcntl).
    unsafe {
        command.pre_exec(move || {
            if fd == 3 {
                // dup2(3, 3) would keep FD_CLOEXEC: clear it instead.
                let flags = libc::fcntl(3, libc::F_GETFD);
                if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Bin::from_command(command)
}

#[track_caller]
fn activated_service_serves_the_inherited_socket_and_notifies(workers: &str) {
    let dir = TempDir::new("systemd-notify");
    let mut notify = Notify::bind(dir.path());
    // Bound and listening by the "manager", in blocking mode, as systemd passes it: sockman
    // must make it nonblocking itself.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut service = activated(
        listener.as_raw_fd(),
        Some(&notify.path),
        &[
            "serve",
            "--workers",
            workers,
            "--stats-interval",
            "100ms",
            "--drain-idle",
            "100ms",
        ],
    );
    assert_eq!(service.wait_listening(), addr, "log:\n{}", service.log());
    notify.wait_for("READY=1");
    // The manager's copy is closed: only sockman holds the socket now.
    drop(listener);
    let mut clients: Vec<_> = (0..20).map(|_| connect(addr)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        echo(c, format!("activated {i}").as_bytes());
    }
    service.wait_line("stats line with accepted=20", |l| {
        l.contains(" stats ") && stat(l, "accepted") == Some(20)
    });
    assert!(
        !notify.seen.iter().any(|m| m.contains("STOPPING=1")),
        "{:?}",
        notify.seen
    );
    service.signal("TERM");
    notify.wait_for("STOPPING=1");
    drop(clients);
    service.wait_success();
    let log = service.log();
    let last = service
        .log
        .iter()
        .rfind(|l| l.contains(" final "))
        .unwrap_or_else(|| panic!("no final line; log:\n{log}"));
    assert_eq!(stat(last, "accepted"), Some(20), "{last}");
    assert_eq!(stat(last, "active"), Some(0), "{last}");
    // Nothing but the listening socket came in: no warning about --listen being ignored.
    service.assert_log(&[], &["panicked", "is ignored"]);
    // READY=1 came before STOPPING=1, each once.
    let ready = notify.seen.iter().position(|m| m.contains("READY=1"));
    let stopping = notify.seen.iter().position(|m| m.contains("STOPPING=1"));
    assert!(ready < stopping, "{:?}", notify.seen);
}

#[test]
fn socket_activation_one_loop_echoes_on_fd_3_and_notifies_ready_and_stopping() {
    activated_service_serves_the_inherited_socket_and_notifies("1");
}

#[test]
fn socket_activation_two_workers_share_fd_3_and_notify_ready_and_stopping() {
    activated_service_serves_the_inherited_socket_and_notifies("2");
}

#[test]
fn listen_fds_naming_a_file_that_is_not_a_socket_is_a_clear_error() {
    let dir = TempDir::new("systemd-notsock");
    let path = dir.path().join("not-a-socket");
    let file = std::fs::File::create(&path).unwrap();
    let started = Instant::now();
    let mut service = activated(
        file.as_raw_fd(),
        None,
        &["serve", "--listen", "127.0.0.1:0"],
    );
    let status = service.wait_exit();
    let log = service.log();
    assert!(!status.success(), "exit {status}; log:\n{log}");
    assert_eq!(status.code(), Some(1), "exit {status}; log:\n{log}");
    assert!(
        log.contains("sockman: inherited descriptor 3 (LISTEN_FDS) is not a TCP listener"),
        "the error does not say which descriptor or why:\n{log}"
    );
    service.assert_log(&["not a socket"], &["panicked", "listening on"]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_passed_tcp_socket_that_is_not_listening_is_a_clear_error() {
    // Bound by the "manager" but never put into the listening state: served, it would never
    // accept (every connect to it is refused).
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let mut service = activated(
        socket.as_raw_fd(),
        None,
        &["serve", "--listen", "127.0.0.1:0"],
    );
    let status = service.wait_exit();
    let log = service.log();
    assert_eq!(status.code(), Some(1), "exit {status}; log:\n{log}");
    assert!(
        log.contains(
            "sockman: inherited descriptor 3 (LISTEN_FDS) is a TCP socket that is not listening"
        ),
        "the error does not say which descriptor or why:\n{log}"
    );
    service.assert_log(&[], &["panicked", "listening on"]);
}

/// The pid in a log line's header (`[... pid=N] ...`).
fn pid_of(line: &str) -> u32 {
    let rest = line
        .split(" pid=")
        .nth(1)
        .expect("a pid in the line header");
    rest.split(']').next().unwrap().parse().expect("a pid")
}

/// Sends signal `name` to `pid` (a successor of this test's child) with `kill(1)`.
#[track_caller]
fn kill(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid}: {status}");
}

#[test]
fn socket_activation_upgrade_hands_the_inherited_socket_on_and_moves_the_main_pid() {
    let dir = TempDir::new("systemd-upgrade");
    let mut notify = Notify::bind(dir.path());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut service = activated(
        listener.as_raw_fd(),
        Some(&notify.path),
        &["serve", "--stats-interval", "0", "--admin", "127.0.0.1:0"],
    );
    assert_eq!(service.wait_listening(), addr, "log:\n{}", service.log());
    notify.wait_for("READY=1");
    drop(listener); // only sockman holds the socket now
    let old = service.pid();
    let mut client = connect(addr);
    echo(&mut client, b"before the upgrade");

    // SIGUSR2 (ExecReload=kill -USR2 $MAINPID): a reload that ends with a new main pid.
    service.signal("USR2");
    notify.wait_for("RELOADING=1");
    let took = service.wait_line("the take-over", |l| l.contains("upgrade: took over"));
    let new = pid_of(&took);
    assert!(
        took.contains(&format!(
            "took over 2 listeners from pid {old}: {addr}, admin "
        )) && took.contains("(from socket activation)"),
        "{took}"
    );
    notify.wait_for(&format!("MAINPID={new}"));
    notify.wait_for("READY=1");
    // The old process drains: its connection is still served, then it exits 0.
    echo(&mut client, b"served by the old process while it drains");
    drop(client);
    service.wait_line("the old process's final line", |l| {
        l.contains(&format!("pid={old}]")) && l.contains(" final ")
    });
    let status = service.child.wait().expect("wait for the old process");
    assert!(status.success(), "{status}; log:\n{}", service.log());
    echo(&mut connect(addr), b"served by the successor");

    // Upgraded again: the socket is still known as socket activation's (--listen stays
    // ignored), and the main pid moves on.
    kill(new, "USR2");
    let took = service.wait_line("the second take-over", |l| {
        l.contains(&format!("took over 2 listeners from pid {new}"))
    });
    assert!(took.contains("(from socket activation)"), "{took}");
    let newer = pid_of(&took);
    notify.wait_for(&format!("MAINPID={newer}"));
    notify.wait_for("READY=1");
    echo(&mut connect(addr), b"served by the third process");
    assert!(
        !notify.seen.iter().any(|m| m.contains("STOPPING=1")),
        "an upgrade is no stop: {:?}",
        notify.seen
    );
    kill(newer, "TERM");
    notify.wait_for("STOPPING=1");
    service.wait_exit(); // every generation has closed the shared stderr
    service.assert_log(
        &[&format!("pid={newer}] final ")],
        &["panicked", "is ignored", "ERROR", "leak check"],
    );
}
