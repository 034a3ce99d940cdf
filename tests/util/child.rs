//! The `sockman` binary as a child process ([`Bin`]): spawned with its stderr (the log) read
//! line by line on a thread, waited for line by line, signalled and reaped by its own PID; and
//! the parsing of its log lines.
//!
//! Every wait is bounded by [`WAIT`].

use std::io;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::WAIT;

/// A stats line (`... stats active=..`), not the listening or final line.
pub fn is_stats(line: &str) -> bool {
    line.contains(" stats active=")
}

/// The (first) listening address in a `listening on ADDR[,ADDR...][,admin=...] ...` line.
#[track_caller]
pub fn listening_addr_in(line: &str) -> SocketAddr {
    addr_after(line, "listening on ", &[' ', ','])
}

/// The admin address in a `listening on ADDR,admin=http://HOST:PORT ...` line.
#[track_caller]
pub fn admin_addr_in(line: &str) -> SocketAddr {
    addr_after(line, "admin=http://", &[' ', ',', '/'])
}

/// The address that follows `marker` in `line`, up to the first of `ends`.
#[track_caller]
fn addr_after(line: &str, marker: &str, ends: &[char]) -> SocketAddr {
    let rest = line
        .split(marker)
        .nth(1)
        .unwrap_or_else(|| panic!("no {marker:?} in {line:?}"));
    let addr = rest.split(ends).next().unwrap();
    addr.parse()
        .unwrap_or_else(|e| panic!("cannot parse the address after {marker:?} in {line:?}: {e}"))
}

/// The `sockman` binary running as a child, with its stderr (the log) read line by line on a
/// thread. Killed on drop if still running, so a failed test leaves no process behind.
pub struct Bin {
    pub child: std::process::Child,
    lines: mpsc::Receiver<String>,
    /// Every stderr line seen so far, for failure messages and final assertions.
    pub log: Vec<String>,
    /// The child's stderr reached EOF (it exited or closed it).
    pub eof: bool,
}

impl Bin {
    /// Spawns `sockman ARGS` with `RUST_LOG=info` and a piped stderr.
    #[track_caller]
    pub fn spawn(args: &[&str]) -> Bin {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sockman"));
        command.args(args);
        Bin::from_command(command)
    }

    /// Spawns `sockman serve --listen 127.0.0.1:0 EXTRA...` and waits for its listening line;
    /// returns it with its address.
    #[track_caller]
    pub fn serve(extra: &[&str]) -> (Bin, SocketAddr) {
        let mut bin = Bin::spawn(&[&["serve", "--listen", "127.0.0.1:0"], extra].concat());
        let addr = bin.wait_listening();
        (bin, addr)
    }

    /// Spawns `sockman serve --listen 127.0.0.1:0 --admin 127.0.0.1:0 EXTRA...` and waits for
    /// its listening line; returns it with its data and admin addresses.
    #[track_caller]
    pub fn serve_with_admin(extra: &[&str]) -> (Bin, SocketAddr, SocketAddr) {
        let mut bin = Bin::spawn(
            &[
                &["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
                extra,
            ]
            .concat(),
        );
        let (addr, admin) = bin.wait_listening_with_admin();
        (bin, addr, admin)
    }

    /// Spawns `sockman ARGS` under `prlimit --nofile=N:N` (util-linux; prlimit execs the binary,
    /// so the PID is sockman's).
    #[track_caller]
    pub fn spawn_limited(nofile: u64, args: &[&str]) -> Bin {
        let mut command = std::process::Command::new("prlimit");
        command
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg(env!("CARGO_BIN_EXE_sockman"))
            .args(args);
        Bin::from_command(command)
    }

    /// Spawns `command` with `RUST_LOG=info` and a piped stderr: the binary itself, or a program
    /// that execs it and so keeps the PID sockman runs with (`prlimit`, `sh -c 'exec ...'`).
    #[track_caller]
    pub fn from_command(mut command: std::process::Command) -> Bin {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut child = command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
            // Dropping `tx` tells the test that stderr is closed.
        });
        Bin {
            child,
            lines,
            log: Vec::new(),
            eof: false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the next stderr line; `None` at EOF. Fails after `timeout`.
    #[track_caller]
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        use std::sync::mpsc::RecvTimeoutError;
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                self.log.push(line.clone());
                Some(line)
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.eof = true;
                None
            }
            Err(RecvTimeoutError::Timeout) => {
                panic!("no log line in {timeout:?}; log so far:\n{}", self.log())
            }
        }
    }

    /// Reads lines until one satisfies `found` (returned); fails at EOF or after [`WAIT`].
    #[track_caller]
    pub fn wait_line(&mut self, what: &str, mut found: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {what} in {WAIT:?}; log:\n{}",
                self.log()
            );
            match self.next_line(left) {
                Some(line) if found(&line) => return line,
                Some(_) => {}
                None => panic!("sockman exited before {what}; log:\n{}", self.log()),
            }
        }
    }

    /// The listening address from the `listening on ADDR ...` line.
    #[track_caller]
    pub fn wait_listening(&mut self) -> SocketAddr {
        let line = self.wait_line("listening line", |l| l.contains("listening on "));
        listening_addr_in(&line)
    }

    /// The listening and admin addresses from the `listening on ADDR,admin=http://...` line (with
    /// `--workers`, the first worker's: it serves the admin endpoint).
    #[track_caller]
    pub fn wait_listening_with_admin(&mut self) -> (SocketAddr, SocketAddr) {
        let line = self.wait_line("listening line with the admin address", |l| {
            l.contains("listening on ") && l.contains("admin=")
        });
        (listening_addr_in(&line), admin_addr_in(&line))
    }

    /// Waits for the first stats line: it comes from the loop, so by then everything that lives
    /// for the whole run (the signal handlers, ...) is set up. Returns it.
    #[track_caller]
    pub fn wait_first_stats(&mut self) -> String {
        self.wait_line("first stats line", is_stats)
    }

    /// Waits for stderr to close and the child to exit (after [`WAIT`]: kills it and fails).
    /// Returns the exit status; the whole log is in `self.log`.
    #[track_caller]
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        while !self.eof {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let _ = self.child.kill();
                panic!("sockman did not exit in {WAIT:?}; log:\n{}", self.log());
            }
            self.next_line(left);
        }
        // stderr is closed: the process is exiting (or has exited) now.
        self.child.wait().expect("wait for sockman")
    }

    /// [`Bin::wait_exit`], and asserts that sockman exited with status 0 (else fails with its
    /// log).
    #[track_caller]
    pub fn wait_success(&mut self) {
        let status = self.wait_exit();
        assert!(
            status.success(),
            "exit status {status}; log:\n{}",
            self.log()
        );
    }

    /// [`Bin::wait_exit`], and asserts that sockman failed (a nonzero exit status) without a
    /// panic, as a clear error should; returns its log.
    #[track_caller]
    pub fn wait_failure(&mut self) -> String {
        let status = self.wait_exit();
        let log = self.log();
        assert!(!status.success(), "exit status {status}; stderr:\n{log}");
        assert!(!log.contains("panicked"), "stderr:\n{log}");
        log
    }

    /// SIGTERM, then [`Bin::wait_success`]: the drain ends and sockman exits 0.
    #[track_caller]
    pub fn terminate(&mut self) {
        self.signal("TERM");
        self.wait_success();
    }

    /// Sends a signal (e.g. `TERM`) with `kill(1)`.
    #[track_caller]
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed: {status}");
    }

    /// The log so far, one line each.
    pub fn log(&self) -> String {
        self.log.join("\n")
    }

    /// Asserts that the log so far says each of `has` and none of `lacks`.
    #[track_caller]
    pub fn assert_log(&self, has: &[&str], lacks: &[&str]) {
        let log = self.log();
        for text in has {
            assert!(log.contains(text), "no {text:?} in the log:\n{log}");
        }
        for text in lacks {
            assert!(!log.contains(text), "{text:?} in the log:\n{log}");
        }
    }

    /// The one `final ...` line (the metrics sockman logs as it exits). Fails if there is none
    /// or more than one; call it after [`Bin::wait_exit`].
    #[track_caller]
    pub fn final_line(&self) -> &str {
        let mut finals = self.log.iter().filter(|l| l.contains(" final "));
        let line = finals
            .next()
            .unwrap_or_else(|| panic!("no final line; log:\n{}", self.log()));
        assert!(
            finals.next().is_none(),
            "more than one final line; log:\n{}",
            self.log()
        );
        line
    }
}

impl Drop for Bin {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
