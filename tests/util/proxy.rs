//! `sockman proxy` as a child ([`Proxy`]) with its addresses and `/metrics` scrapes of it
//! ([`Scrape`]), and a `sockman serve` child as its upstream. Every wait is bounded in time and
//! count.

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sockman::CloseReason;

use super::child::Bin;
use super::{http, WAIT};

/// A `sockman proxy` child in front of one upstream, with its data and admin addresses.
pub struct Proxy {
    pub bin: Bin,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The upstream's address as the per-upstream samples label it.
    pub upstream: SocketAddr,
}

impl Proxy {
    /// Spawns `sockman proxy --listen 127.0.0.1:0 --upstream UPSTREAM --admin 127.0.0.1:0
    /// --stats-interval 100ms EXTRA...` and waits for its listening line.
    #[track_caller]
    pub fn spawn(upstream: SocketAddr, extra: &[&str]) -> Proxy {
        Proxy::spawn_with(upstream, extra, Bin::spawn)
    }

    /// As [`Proxy::spawn`], with `spawn` starting the binary (e.g. under a lower fd limit).
    #[track_caller]
    pub fn spawn_with(
        upstream: SocketAddr,
        extra: &[&str],
        spawn: impl FnOnce(&[&str]) -> Bin,
    ) -> Proxy {
        let up = upstream.to_string();
        let mut args = vec![
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &up,
            "--admin",
            "127.0.0.1:0",
            "--stats-interval",
            "100ms",
        ];
        args.extend_from_slice(extra);
        let mut bin = spawn(&args);
        let (addr, admin) = bin.wait_listening_with_admin();
        Proxy {
            bin,
            addr,
            admin,
            upstream,
        }
    }

    /// The name of the per-upstream sample `sockman_upstream_{family}{upstream="ADDR"}`.
    pub fn up(&self, family: &str) -> String {
        format!(
            "sockman_upstream_{family}{{upstream=\"{}\"}}",
            self.upstream
        )
    }

    /// One `GET /metrics` (must answer 200).
    #[track_caller]
    pub fn scrape(&self) -> Scrape {
        let r = http::get(self.admin, "/metrics");
        assert_eq!(r.status, 200, "{r:?}");
        Scrape(r.body)
    }

    /// Scrapes every 20 ms until `done` holds; fails after [`WAIT`] with the last scrape.
    #[track_caller]
    pub fn wait_metrics(&self, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
        self.wait_metrics_for(WAIT, what, done)
    }

    /// As [`Proxy::wait_metrics`], for at most `within`.
    #[track_caller]
    pub fn wait_metrics_for(
        &self,
        within: Duration,
        what: &str,
        done: impl Fn(&Scrape) -> bool,
    ) -> Scrape {
        let deadline = Instant::now() + within;
        loop {
            let m = self.scrape();
            if done(&m) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} in {within:?}; last scrape:\n{m}"
            );
            // The scrape interval: the proxy's counters change with no event the test can see.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until no connection is open (either side) or lingering and no session is active.
    #[track_caller]
    pub fn wait_idle(&self, what: &str) -> Scrape {
        let sessions = self.up("sessions_active");
        self.wait_metrics(what, |m| {
            m.get("sockman_connections_active") == 0
                && m.get("sockman_connections_dialed_active") == 0
                && m.get("sockman_connections_lingering") == 0
                && m.get(&sessions) == 0
        })
    }
}

/// The body of one `/metrics` scrape. `Display` shows its samples (not the comments).
pub struct Scrape(pub String);

impl Scrape {
    /// The value of the sample `name` (labels included, e.g. `sockman_closed_total{reason="reset"}`).
    #[track_caller]
    pub fn get(&self, name: &str) -> i64 {
        http::sample(&self.0, name).unwrap_or_else(|| panic!("no {name} in /metrics:\n{self}"))
    }

    /// `sockman_closed_total{reason=...}`: closes of the client side (accepted connections).
    #[track_caller]
    pub fn closed(&self, reason: CloseReason) -> i64 {
        self.get(&format!(
            "sockman_closed_total{{reason=\"{}\"}}",
            reason.name()
        ))
    }

    /// `sockman_dialed_closed_total{reason=...}`: closes of the upstream side.
    #[track_caller]
    pub fn dialed_closed(&self, reason: CloseReason) -> i64 {
        self.get(&format!(
            "sockman_dialed_closed_total{{reason=\"{}\"}}",
            reason.name()
        ))
    }

    /// `sockman_proxy_sessions_ended_total{state=...}`: sessions that ended in termination
    /// state `state` (`--`, `CD`, `sC`, ...); 0 for a state that never happened (not listed).
    #[track_caller]
    pub fn ended(&self, state: &str) -> i64 {
        http::sample(
            &self.0,
            &format!("sockman_proxy_sessions_ended_total{{state=\"{state}\"}}"),
        )
        .unwrap_or(0)
    }

    /// Every session ended, whatever its state.
    #[track_caller]
    pub fn ended_all(&self) -> i64 {
        self.sum("sockman_proxy_sessions_ended_total{")
    }

    /// Every close of a client side, whatever its reason.
    #[track_caller]
    pub fn closed_all(&self) -> i64 {
        self.sum("sockman_closed_total{")
    }

    /// Every close of an upstream side.
    #[track_caller]
    pub fn dialed_closed_all(&self) -> i64 {
        self.sum("sockman_dialed_closed_total{")
    }

    #[track_caller]
    fn sum(&self, prefix: &str) -> i64 {
        self.0
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<i64>().unwrap())
            .sum()
    }
}

impl fmt::Display for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in self.0.lines().filter(|l| !l.starts_with('#')) {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

/// A `sockman serve` (echo) child on a port of its own, and its address.
#[track_caller]
pub fn serve_child(extra: &[&str]) -> (Bin, SocketAddr) {
    Bin::serve(&[&["--stats-interval", "0"], extra].concat())
}
