//! The old process's side of an upgrade: [`Upgrader`] turns a `SIGUSR2` into a successor that
//! serves this process's listeners (see the [module docs](super) for the sequence), on a
//! thread of its own so that the signal thread stays free for `SIGTERM`.
//!
//! # States
//! idle → running (one upgrade at a time; another `SIGUSR2` is refused) → handed over (the
//! listeners are the successor's; this process drains and exits), or back to idle when the
//! upgrade fails. A drain (`SIGINT`/`SIGTERM`) makes it stopping: an upgrade under way is
//! called off before its `go`, and no new one starts.

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use sd_notify::NotifyState;
use sockman::{Handover, Listeners};

use super::channel::{Channel, Listening};
use super::wire::{Msg, VERSION};
use super::{notify, UpgradeArgs, Upgrades, UPGRADE_FROM};

const IDLE: u8 = 0;
const RUNNING: u8 = 1;
const HANDED_OVER: u8 = 2;
const STOPPING: u8 = 3;

/// How long a successor that refused, or was called off, has to exit by itself before it is
/// killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// How the error of a successor that refused begins.
const REFUSED: &str = "refused: ";

/// systemd's variables for socket activation: they describe this process's descriptors, not
/// the successor's, so they never reach it.
const LISTEN_VARS: [&str; 4] = [
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "LISTEN_FDS_FIRST_FD",
];

/// Upgrades this process in place on `SIGUSR2`; cheap to clone (the signal thread keeps one).
#[derive(Debug, Clone)]
pub(crate) struct Upgrader {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    handover: Handover,
    /// The binary to start, resolved when this process started (or why it cannot be).
    exe: Result<PathBuf, String>,
    /// This process's arguments, for the successor.
    args: Vec<OsString>,
    timeout: Duration,
    drain_timeout: Duration,
    /// The data listeners came from socket activation (the successor is told).
    activated: bool,
    upgrades: Arc<Upgrades>,
    state: AtomicU8,
    /// The successor of the upgrade under way or done (for log lines).
    successor: AtomicU32,
}

impl Upgrader {
    /// An upgrader for the loops behind `handover`; `activated`: their data listeners came from
    /// socket activation; `drain_timeout`: how long this process drains after a handover.
    pub(crate) fn new(
        handover: Handover,
        args: &UpgradeArgs,
        drain_timeout: Duration,
        activated: bool,
        upgrades: Arc<Upgrades>,
    ) -> Upgrader {
        Upgrader {
            inner: Arc::new(Inner {
                handover,
                exe: own_exe(),
                args: std::env::args_os().skip(1).collect(),
                timeout: args.upgrade_timeout,
                drain_timeout,
                activated,
                upgrades,
                state: AtomicU8::new(IDLE),
                successor: AtomicU32::new(0),
            }),
        }
    }

    /// `SIGUSR2`: starts an upgrade on its own thread, unless one is under way, the listeners
    /// are handed over already, or this process is draining (each refused with a log line).
    pub(crate) fn start(&self) {
        let inner = &self.inner;
        let pid = inner.successor.load(Ordering::Relaxed);
        match inner
            .state
            .compare_exchange(IDLE, RUNNING, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                let me = Arc::clone(inner);
                let spawned = std::thread::Builder::new()
                    .name("upgrade".into())
                    .spawn(move || me.run());
                if let Err(e) = spawned {
                    inner.upgrades.started.fetch_add(1, Ordering::Relaxed);
                    inner.upgrades.failed.fetch_add(1, Ordering::Relaxed);
                    error!("upgrade failed: cannot start its thread: {e}; this process keeps serving");
                    inner.state.store(IDLE, Ordering::Release);
                }
            }
            Err(RUNNING) => {
                warn!("SIGUSR2 ignored: an upgrade is already under way (successor pid {pid})")
            }
            Err(HANDED_OVER) => warn!(
                "SIGUSR2 ignored: this process handed its listeners to pid {pid} already; signal that one"
            ),
            Err(_) => warn!("SIGUSR2 ignored: this process is draining"),
        }
    }

    /// The first `SIGINT`/`SIGTERM`: no upgrade starts from now on, and one under way is
    /// called off before its successor is told to go.
    pub(crate) fn stopping(&self) {
        let _ = self
            .inner
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                (s != HANDED_OVER).then_some(STOPPING)
            });
    }

    /// Whether the listeners are the successor's now (systemd's main process is the successor:
    /// this one must not tell it `STOPPING=1`).
    pub(crate) fn handed_over(&self) -> bool {
        self.inner.state.load(Ordering::Acquire) == HANDED_OVER
    }
}

impl Inner {
    /// One upgrade, start to end: counted, logged, and on failure this process serves on.
    fn run(&self) {
        let me = std::process::id();
        self.upgrades.started.fetch_add(1, Ordering::Relaxed);
        let exe = self
            .exe
            .as_ref()
            .map_or("?".into(), |p| p.display().to_string());
        info!(
            "SIGUSR2: upgrading in place: starting a successor from {exe} (ready within {:?}, or this process keeps serving)",
            self.timeout
        );
        let mut reloading = vec![NotifyState::Reloading];
        reloading.extend(NotifyState::monotonic_usec_now().ok());
        notify(&reloading);
        match self.attempt() {
            Ok(pid) => {
                self.upgrades.succeeded.fetch_add(1, Ordering::Relaxed);
                info!(
                    "upgrade: pid {pid} serves the listeners now; this process (pid {me}) accepts no more, drains its connections (up to {:?}) and exits",
                    self.drain_timeout
                );
            }
            Err(e) if self.state.load(Ordering::Acquire) == STOPPING => {
                self.upgrades.failed.fetch_add(1, Ordering::Relaxed);
                warn!("upgrade called off: {e}; this process (pid {me}) drains");
            }
            Err(e) => {
                self.upgrades.failed.fetch_add(1, Ordering::Relaxed);
                error!("upgrade failed: {e}; this process (pid {me}) keeps serving");
                notify(&[NotifyState::Ready]);
                let _ =
                    self.state
                        .compare_exchange(RUNNING, IDLE, Ordering::AcqRel, Ordering::Acquire);
            }
        }
    }

    /// Starts the successor and hands it the listeners; its pid once it serves them.
    fn attempt(&self) -> Result<u32, String> {
        let exe = self.exe.as_ref().map_err(Clone::clone)?;
        let deadline = Instant::now() + self.timeout;
        // While these live the loops' leak check waits: this thread holds descriptors for the
        // handover (these duplicates, the upgrade socket) that the loops cannot count.
        let listeners = self
            .handover
            .listeners(self.timeout)
            .map_err(|e| format!("cannot take the listeners from the loops: {e}"))?;
        if listeners.is_empty() {
            return Err("no listener to hand over".into());
        }
        let name = unique_name();
        let listening = Listening::bind(&name)
            .map_err(|e| format!("cannot open the upgrade socket @{name}: {e}"))?;
        let mut command = Command::new(exe);
        command
            .args(&self.args)
            .env(UPGRADE_FROM, &name)
            .stdin(Stdio::null());
        for var in LISTEN_VARS {
            command.env_remove(var);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        let pid = child.id();
        self.successor.store(pid, Ordering::Relaxed);
        info!("upgrade: started the successor, pid {pid}");
        match self.hand(&listening, &mut child, &listeners, deadline) {
            Ok(channel) => self.confirm(&channel, child),
            Err((e, refused)) => {
                stop(&mut child, refused);
                Err(format!("the successor (pid {pid}) {e}"))
            }
        }
    }

    /// Waits for the successor's connection, sends it the listeners and waits for `ready`. An
    /// error says what the successor did, and whether it refused (then it exits by itself).
    fn hand(
        &self,
        listening: &Listening,
        child: &mut Child,
        listeners: &Listeners,
        deadline: Instant,
    ) -> Result<Channel, (String, bool)> {
        self.hand_over(listening, child, listeners, deadline)
            .map_err(|e| {
                let refused = e.starts_with(REFUSED);
                (e, refused)
            })
    }

    fn hand_over(
        &self,
        listening: &Listening,
        child: &mut Child,
        listeners: &Listeners,
        deadline: Instant,
    ) -> Result<Channel, String> {
        let timeout = self.timeout;
        let waited = |e: std::io::Error, what: &str| match e.kind() {
            std::io::ErrorKind::TimedOut => format!("was not ready within {timeout:?}"),
            _ => format!("{e} {what}"),
        };
        let pid = child.id();
        // Every wait ends early if the successor exits or this process starts to drain (then
        // the drain's listeners must close soon: the duplicates held here keep them open).
        let mut check = || -> std::io::Result<()> {
            if let Some(status) = child.try_wait()? {
                return Err(std::io::Error::other(format!("exited ({status})")));
            }
            if self.state.load(Ordering::Acquire) == STOPPING {
                return Err(std::io::Error::other(
                    "was called off: this process began to drain",
                ));
            }
            Ok(())
        };
        let mut strangers = Vec::new();
        let accepted = listening.accept_from(pid, deadline, &mut check, &mut strangers);
        for pid in strangers {
            warn!("upgrade: pid {pid} connected to the upgrade socket and was turned away");
        }
        let channel = accepted.map_err(|e| waited(e, "before it took the listeners"))?;
        let left = deadline.saturating_duration_since(Instant::now());
        channel
            .set_send_timeout(left)
            .map_err(|e| format!("the upgrade socket: {e}"))?;
        let me = std::process::id();
        let sent = |e: std::io::Error| format!("went away while taking the listeners ({e})");
        let hello = Msg::Hello {
            version: VERSION,
            pid: me,
            listeners: listeners.len(),
        };
        channel.send(&hello.to_string(), None).map_err(sent)?;
        for l in listeners.iter() {
            let msg = Msg::Listener {
                admin: l.is_admin(),
                addr: l.addr(),
                activated: self.activated && !l.is_admin(),
            };
            channel
                .send(&msg.to_string(), Some(l.socket().as_fd()))
                .map_err(sent)?;
        }
        let reply = channel
            .recv(deadline, &mut check)
            .map_err(|e| waited(e, "before it was ready"))?;
        match reply.map(|(text, _)| text.parse::<Msg>()) {
            Some(Ok(Msg::Ready { pid: ready })) if ready == pid => Ok(channel),
            Some(Ok(Msg::Failed(why))) => Err(format!("{REFUSED}{why}")),
            Some(Ok(other)) => Err(format!("sent {other} instead of ready")),
            Some(Err(e)) => Err(e),
            None => Err("closed the upgrade socket before it was ready".into()),
        }
    }

    /// The successor is ready: moves systemd's main pid to it, tells it to go and releases the
    /// listeners (the loops drain). Called off if this process began to stop meanwhile.
    fn confirm(&self, channel: &Channel, mut child: Child) -> Result<u32, String> {
        let pid = child.id();
        let me = std::process::id();
        if self
            .state
            .compare_exchange(RUNNING, HANDED_OVER, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            let _ = channel.send(
                &Msg::Abort("the old process is stopping".into()).to_string(),
                None,
            );
            stop(&mut child, true);
            return Err(format!(
                "this process began to drain before the successor (pid {pid}) could take over; stopped it"
            ));
        }
        // Before `go`: the successor's own READY=1 must reach systemd after this.
        notify(&[NotifyState::MainPid(pid)]);
        if let Err(e) = channel.send(&Msg::Go.to_string(), None) {
            notify(&[NotifyState::MainPid(me)]);
            self.state.store(RUNNING, Ordering::Release);
            stop(&mut child, false);
            return Err(format!(
                "the successor (pid {pid}) went away when it was told to go ({e})"
            ));
        }
        self.handover.release(self.drain_timeout);
        // The successor lives on; when this process exits it is reparented and reaped there.
        drop(child);
        Ok(pid)
    }
}

/// Stops a successor that will not serve: with `grace` (it refused, or was called off, and is
/// exiting by itself, saying why) waits a moment for it to exit, then kills it; reaps it
/// either way. It never accepted a connection: it serves only after `go`.
fn stop(child: &mut Child, grace: bool) {
    let until = Instant::now() + if grace { EXIT_GRACE } else { Duration::ZERO };
    while Instant::now() < until {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return,
            Ok(None) => std::thread::sleep(Duration::from_millis(10)), // no pidfd: poll its exit
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// This binary's path, as started. `/proc/self/exe` names a file replaced since
/// `PATH (deleted)`; the path is what counts (the new file is the upgrade).
fn own_exe() -> Result<PathBuf, String> {
    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find the path of this program: {e}"))?;
    Ok(
        match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
            Some(path) => PathBuf::from(path),
            None => exe,
        },
    )
}

/// An abstract socket name no other process uses: this pid and 64 random bits.
fn unique_name() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("sockman-upgrade-{}-{:016x}", std::process::id(), h.finish())
}
