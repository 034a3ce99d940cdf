//! Steady load on an echo address for the handover and upgrade tests ([`Load`]): new
//! connections at a steady rate, each doing one echo and closing (churn), plus long-lived
//! sessions exchanging requests one after another; every outcome is counted ([`Tally`]).
//!
//! The rate is paced with sleeps: a steady load, not synchronisation. Tests synchronise on
//! [`Load::wait_echoes`] (a channel of completed echoes). Every loop is bounded in count and
//! time ([`MAX_RUN`]).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::WAIT;

/// The longest a load runs: its loops stop by themselves after this.
pub const MAX_RUN: Duration = Duration::from_secs(60);

/// Requests a session makes before it closes its connection and opens a new one.
const SESSION_REQUESTS: u32 = 25;

/// Pause between a session's requests.
const SESSION_GAP: Duration = Duration::from_millis(10);

/// What a load saw.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Connections established (churn and sessions).
    pub connects: u64,
    /// Churn echoes answered in full.
    pub echoes: u64,
    /// Session requests answered in full.
    pub requests: u64,
    /// Connects refused.
    pub refused: u64,
    /// Resets (or broken pipes) on an established connection.
    pub resets: u64,
    /// Answers cut short (EOF before the whole echo) or wrong.
    pub short: u64,
    /// Connects or reads that timed out.
    pub timeouts: u64,
    /// Anything else, described (the first few).
    pub other: Vec<String>,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.connects += o.connects;
        self.echoes += o.echoes;
        self.requests += o.requests;
        self.refused += o.refused;
        self.resets += o.resets;
        self.short += o.short;
        self.timeouts += o.timeouts;
        self.other.extend(o.other.iter().take(5).cloned());
    }

    /// Counts a failed operation by its kind.
    fn failed(&mut self, e: &io::Error) {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => self.refused += 1,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => self.resets += 1,
            io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData => self.short += 1,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => self.timeouts += 1,
            _ => {
                if self.other.len() < 5 {
                    self.other.push(e.to_string());
                }
            }
        }
    }

    /// Nothing was refused, reset, cut short, timed out or otherwise failed.
    pub fn is_clean(&self) -> bool {
        self.refused == 0
            && self.resets == 0
            && self.short == 0
            && self.timeouts == 0
            && self.other.is_empty()
    }
}

/// A running load; [`Load::stop`] ends it and returns the [`Tally`].
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Tally>>,
    echoes: mpsc::Receiver<()>,
}

impl Load {
    /// Starts `rate` new connections a second on `addr`, each doing one echo, and `sessions`
    /// long-lived sessions (each: a connection exchanging [`SESSION_REQUESTS`] requests, then
    /// a new connection).
    pub fn start(addr: SocketAddr, rate: u32, sessions: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, echoes) = mpsc::channel();
        let mut threads = Vec::new();
        let period = Duration::from_secs(1) / rate.max(1);
        let s = Arc::clone(&stop);
        threads.push(
            std::thread::Builder::new()
                .name("churn".into())
                .spawn(move || churn(addr, period, &s, &tx))
                .expect("spawn the churn thread"),
        );
        for k in 0..sessions {
            let s = Arc::clone(&stop);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("session-{k}"))
                    .spawn(move || session(addr, k, &s))
                    .expect("spawn a session thread"),
            );
        }
        Load {
            stop,
            threads,
            echoes,
        }
    }

    /// Waits until `n` more churn connections have finished (answered or not), at most
    /// [`WAIT`] for each.
    #[track_caller]
    pub fn wait_echoes(&mut self, n: usize) {
        for i in 0..n {
            if self.echoes.recv_timeout(WAIT).is_err() {
                panic!("the churn stalled after {i} of {n} connections");
            }
        }
    }

    /// Stops every thread (sessions close their connection after the request under way) and
    /// returns what they saw.
    #[track_caller]
    pub fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Release);
        let mut tally = Tally::default();
        for t in self.threads {
            tally.add(&t.join().expect("a load thread panicked"));
        }
        tally
    }
}

/// One connection with timeouts, counted.
fn open(addr: SocketAddr, tally: &mut Tally) -> Option<TcpStream> {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
        Ok(s) => {
            tally.connects += 1;
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
            Some(s)
        }
        Err(e) => {
            tally.failed(&e);
            None
        }
    }
}

/// Writes `msg` and reads its echo in full.
fn exchange(stream: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    stream.write_all(msg)?;
    let mut back = vec![0; msg.len()];
    stream.read_exact(&mut back)?;
    if back != msg {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "a wrong echo"));
    }
    Ok(())
}

fn churn(addr: SocketAddr, period: Duration, stop: &AtomicBool, done: &mpsc::Sender<()>) -> Tally {
    let mut tally = Tally::default();
    let start = Instant::now();
    let mut next = start;
    for i in 0u64.. {
        if stop.load(Ordering::Acquire) || start.elapsed() > MAX_RUN {
            break;
        }
        if let Some(mut s) = open(addr, &mut tally) {
            match exchange(&mut s, format!("churn {i:010}\n").as_bytes()) {
                Ok(()) => tally.echoes += 1,
                Err(e) => tally.failed(&e),
            }
        }
        let _ = done.send(());
        next += period;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait); // the pace of the load, not synchronisation
        }
    }
    tally
}

fn session(addr: SocketAddr, k: usize, stop: &AtomicBool) -> Tally {
    let mut tally = Tally::default();
    let start = Instant::now();
    'sessions: for n in 0u64.. {
        if stop.load(Ordering::Acquire) || start.elapsed() > MAX_RUN {
            break;
        }
        let Some(mut s) = open(addr, &mut tally) else {
            std::thread::sleep(SESSION_GAP); // the pace of the load
            continue;
        };
        for r in 0..SESSION_REQUESTS {
            let msg = format!("session {k:03} {n:06} request {r:04} {}\n", "x".repeat(40));
            if let Err(e) = exchange(&mut s, msg.as_bytes()) {
                tally.failed(&e);
                continue 'sessions;
            }
            tally.requests += 1;
            if stop.load(Ordering::Acquire) {
                break 'sessions;
            }
            std::thread::sleep(SESSION_GAP); // the pace of the load
        }
    }
    tally
}
