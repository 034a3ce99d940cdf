//! `SIGUSR2` upgrades `sockman serve` and `sockman proxy` in place, losing no connection: the
//! running process starts its successor from the same binary path, with the same arguments and
//! environment, and hands it every listening socket (each worker's, the admin one, those from
//! socket activation). The same socket objects move, so their accept queues move with them.
//!
//! # How
//! 1. On `SIGUSR2` ([`Upgrader::start`]) the old process takes duplicates of its listeners from
//!    its loops ([`sockman::Handover`]), listens on a unix socket at an abstract address unique
//!    to it (`sockman-upgrade-PID-NONCE`) and spawns the successor from the path it was started
//!    from (so replacing the file, then `SIGUSR2`, upgrades the binary), with
//!    `SOCKMAN_UPGRADE_FROM=` that name and without systemd's `LISTEN_*` variables.
//! 2. The successor ([`take_over`]) connects, checks that the socket is its parent's, receives
//!    the listeners with `SCM_RIGHTS` and a description of each ([`wire`]), logs "took over N
//!    listeners from pid P" as its first line, builds its loops from them
//!    ([`sockman::Server::bind_handed`], [`sockman::Workers::bind_handed`]: nothing of its own
//!    is bound for those addresses) and says `ready`.
//! 3. The old process tells systemd `MAINPID=` the successor, says `go`, and releases its
//!    listeners: its loops stop accepting without taking the queues (the successor accepts
//!    them) and drain their connections by the usual drain rules; it exits 0 when they are
//!    done. The successor starts serving at `go` and tells systemd `MAINPID=` itself and
//!    `READY=1`.
//!
//! Why `SCM_RIGHTS` and not inheritance across `exec`: a passed descriptor needs no
//! `FD_CLOEXEC` juggling (which needs `unsafe` between fork and exec, or a window in which any
//! other spawn would inherit the listeners), arrives with a description of what it is, and the
//! two-step `ready`/`go` over the same channel lets the old process kill a successor that never
//! got ready: it has not accepted anything by then, so nothing is lost.
//!
//! # When it fails
//! A successor that cannot start, exits, refuses (its flags do not match the listeners, say),
//! or is not ready within `--upgrade-timeout` is stopped; the old process logs one error, counts
//! the failure, tells systemd `READY=1` again, and keeps serving. A `SIGUSR2` while an upgrade
//! runs, after a handover or during a drain is refused with a log line. A successor whose old
//! process is gone (or whose socket belongs to anyone but its parent), that receives a
//! descriptor that is not a listening TCP socket, or a listener its flags do not name, says so
//! and exits non-zero; an address its flags add is bound fresh (nobody listened there). If the
//! old process vanishes after `ready` but before `go`, the successor serves: it then holds the
//! only descriptors of the sockets.
//!
//! The files: `channel.rs` (the unix socket), `wire.rs` (its messages), `upgrader.rs` (the old
//! process's side), `successor.rs` (the new one's); this file the flags and the counters, which
//! ride in `/metrics` around every server's handler (`wrapped.rs`).

mod channel;
mod successor;
mod upgrader;
mod wire;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::warn;

use crate::units::parse_duration;
use crate::wrapped::Around;

pub(crate) use successor::{confirm, take_over};
pub(crate) use upgrader::Upgrader;

/// Makes a process a successor: the abstract name of its predecessor's upgrade socket.
const UPGRADE_FROM: &str = "SOCKMAN_UPGRADE_FROM";

/// The upgrade's flag, shared by `serve` and `proxy`.
#[derive(Debug, clap::Args)]
pub(crate) struct UpgradeArgs {
    /// On SIGUSR2 (upgrade in place): a successor not ready this long after it was started is
    /// stopped, and this process keeps serving. Also how long a successor waits for the
    /// listeners and the go-ahead.
    #[arg(long, value_name = "DURATION", default_value = "10s", env = "SOCKMAN_UPGRADE_TIMEOUT", value_parser = parse_duration)]
    pub(crate) upgrade_timeout: Duration,
}

/// Upgrades this process started, and how they ended (for the stats line and `/metrics`).
/// Every process counts from zero, like every other counter.
#[derive(Debug, Default)]
pub(crate) struct Upgrades {
    started: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
}

impl Upgrades {
    fn counts(&self) -> [u64; 3] {
        [&self.started, &self.succeeded, &self.failed].map(|c| c.load(Ordering::Relaxed))
    }

    /// The stats line's part: ` upgrades=STARTED{succeeded=.. failed=..}`.
    pub(crate) fn line(&self) -> String {
        let [started, succeeded, failed] = self.counts();
        format!(" upgrades={started}{{succeeded={succeeded} failed={failed}}}")
    }
}

/// The upgrade counters ride on every server's handler
/// ([`Wrapped`](crate::wrapped::Wrapped)); the admin endpoint asks worker 0's handler only, so
/// they appear once in `/metrics`.
impl Around for Arc<Upgrades> {
    /// `sockman_upgrades_total{result=...}` in Prometheus text.
    fn write_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let [started, succeeded, failed] = self.counts();
        out.push_str(
            "# HELP sockman_upgrades_total In-place upgrades (SIGUSR2) this process started, by result: succeeded (the successor serves the listeners), failed (this process kept serving).\n# TYPE sockman_upgrades_total counter\n",
        );
        for (result, n) in [
            ("started", started),
            ("succeeded", succeeded),
            ("failed", failed),
        ] {
            let _ = writeln!(out, "sockman_upgrades_total{{result=\"{result}\"}} {n}");
        }
    }
}

/// Tells systemd (if it started us with `NOTIFY_SOCKET`) about the upgrade.
fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!("cannot notify systemd: {e}");
    }
}
