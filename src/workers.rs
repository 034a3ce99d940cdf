//! Several loops on several cores: [`Workers`] runs N complete servers (each its own `Poll`,
//! slab and wheel) on N threads, each with its own listener sockets bound with `SO_REUSEPORT`,
//! so that the kernel spreads connections over them. Scale comes from more loops, not from
//! sharing one: nothing is shared on the hot path.
//!
//! # What the workers share
//! A [`Group`] (the `group` module, below the loop): one slot per worker with its published
//! metrics, descriptors and heartbeat. This module sits above the loop and uses the loop's
//! public face, plus joining it to the group; the loop knows nothing of this module.
//!
//! Which worker does what, and how a drain loses no handshake: see [`Workers`].

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, info};

use crate::config::Config;
use crate::error::Error;
use crate::group::Group;
use crate::handler::Handler;
use crate::handover::{HandedListener, Handover, Plan};
use crate::limits::{self, LoopFds};
use crate::metrics::Metrics;
use crate::remote::Handle;
use crate::server::Server;

/// Where the workers' listeners come from.
enum Sources {
    /// Each worker binds its own `SO_REUSEPORT` sockets.
    Bind,
    /// Every worker serves these (socket activation).
    Shared(Vec<std::net::TcpListener>),
    /// Listeners handed over by a predecessor, spread over the workers.
    Handed(Plan),
}

/// N servers bound and ready to run on N threads, each a complete loop (its own `Poll`, slab
/// and wheel) with its own listener sockets bound with `SO_REUSEPORT`, so that the kernel
/// spreads connections over them; they share only their published figures and the
/// connection count.
///
/// # Which worker does what
/// Worker 0 serves the admin endpoint (its `/metrics` has a total series and one per worker with
/// a `worker="N"` label; its `/connections` gathers every worker's lines) and runs the leak
/// self-check for the whole process. The connection cap is the group's: one shared count of
/// open connections that every worker's admission (accept and dial) checks, so the group holds
/// at most the cap whatever worker the kernel hashes a connection to, and `/readyz` judges the
/// group's count against it. The cap (configured, or derived from the fd limit) keeps every
/// worker's own descriptors back, so that the total stays under the fd limit.
///
/// # The admin endpoint through a drain
/// Worker 0 may finish its own drain while others still serve theirs: it then closes what is
/// left of its own and serves the admin endpoint alone (`/livez`, `/readyz` failing with
/// "draining", `/metrics` with every worker's figures) until every other worker has stopped
/// (each one's stop wakes it), so that liveness never fails during a drain.
///
/// # Draining without losing a handshake
/// Closing one `SO_REUSEPORT` listener resets the connections still queued on it. A drain
/// therefore has every worker accept its queue before it closes its listener, and worker 0 keep
/// its own open (and accepting: the kernel hashes new connections only to listeners still open)
/// until every other worker has closed its own; then it accepts its queue and closes last.
/// Handshakes still in progress on a closing listener are moved to an open one only if the
/// kernel is told to (`net.ipv4.tcp_migrate_req = 1`, Linux 5.14+); without it, a connect that
/// is mid-handshake at that instant can be reset, as with any listener that closes.
pub struct Workers<H: Handler> {
    servers: Vec<Server<H>>,
    group: Arc<Group>,
    addrs: Vec<SocketAddr>,
    admin: Option<SocketAddr>,
}

impl<H: Handler> std::fmt::Debug for Workers<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("workers", &self.servers.len())
            .field("addrs", &self.addrs)
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

impl<H> Workers<H>
where
    H: Handler + Send + 'static,
    H::Conn: Send,
{
    /// Binds `n` servers for `config`, each with its own `SO_REUSEPORT` listener on every listen
    /// address (a port 0 is resolved by the first, and the others bind the same), with
    /// `make(i)` as worker `i`'s handler. The connection cap (configured or derived from the fd
    /// limit) is the group's, shared by every worker's admission. Only worker 0 serves the admin
    /// endpoint and runs the leak self-check.
    ///
    /// # Errors
    /// As [`Server::bind`], for any worker; `n` of 0 is [`Error::Config`].
    pub fn bind(config: Config, n: usize, make: impl FnMut(usize) -> H) -> Result<Self, Error> {
        Workers::bind_inner(config, Sources::Bind, n, make)
    }

    /// Like [`Workers::bind`], but every worker serves `listeners` that are already bound (for
    /// instance inherited from systemd): each gets its own descriptor for the same socket (no
    /// `SO_REUSEPORT`: the kernel wakes whichever worker is waiting).
    ///
    /// # Errors
    /// As [`Workers::bind`] and [`Server::bind_listeners`] (a socket that is not listening is
    /// [`Error::Config`]); [`Error::Io`] if a descriptor cannot be duplicated.
    pub fn bind_listeners(
        config: Config,
        listeners: Vec<std::net::TcpListener>,
        n: usize,
        make: impl FnMut(usize) -> H,
    ) -> Result<Self, Error> {
        Workers::bind_inner(config, Sources::Shared(listeners), n, make)
    }

    /// Like [`Workers::bind`], but the workers serve `listeners` handed over by a predecessor
    /// (see [`Handover`]) and bind nothing of their own for their addresses. The addresses
    /// must match as for [`Server::bind_handed`]. With `M` sockets handed for an address, each
    /// goes to exactly one worker (worker `i` serves sockets `i`, `i + n`, ...) when `M >= n`;
    /// when `M < n` the further workers each bind one more `SO_REUSEPORT` socket on it if the
    /// handed ones have that option (sockets from an earlier `Workers`), else share the handed
    /// ones (socket activation). A handed socket is never closed. Worker 0 gets the admin one.
    ///
    /// # Errors
    /// As [`Server::bind_handed`], for any worker; `n` of 0 is [`Error::Config`].
    pub fn bind_handed(
        config: Config,
        listeners: Vec<HandedListener>,
        n: usize,
        make: impl FnMut(usize) -> H,
    ) -> Result<Self, Error> {
        let plan = Plan::new(&config, listeners, n)?;
        Workers::bind_inner(config, Sources::Handed(plan), n, make)
    }

    /// A handle that takes every worker's listeners out for a successor, from any thread, and
    /// then lets them go (see [`Handover`]). Get it before [`Workers::start`].
    pub fn handover(&mut self) -> Handover {
        Handover::new(self.servers.iter_mut().map(Server::handover_port).collect())
    }

    fn bind_inner(
        config: Config,
        mut sources: Sources,
        n: usize,
        mut make: impl FnMut(usize) -> H,
    ) -> Result<Self, Error> {
        if n == 0 {
            return Err(Error::Config("workers must be at least 1".into()));
        }
        config.validate()?;
        let fd_limit = limits::fd_limit(config.raise_fd_limit);
        // What every worker opens itself (worker 0 the admin side too), as one loop would.
        let listeners_of = |i: usize| match &sources {
            Sources::Handed(plan) => plan.len(i),
            Sources::Shared(l) => l.len(),
            Sources::Bind => config.listen.len(),
        };
        let own = (0..n)
            .map(|i| LoopFds::planned(listeners_of(i), i == 0 && config.admin.is_some()).total())
            .sum();
        let total = limits::effective_max_connections(config.max_connections, fd_limit, own);
        // One cap for the group, shared by every worker's admission (see `limits::SharedCap`):
        // whatever worker the kernel's hash picks, the group holds `total` at most.
        let group = Arc::new(Group::new(n, total));
        let mut servers = Vec::with_capacity(n);
        let mut listen = match &sources {
            Sources::Shared(l) => l.iter().map(|l| l.local_addr()).collect::<Result<_, _>>()?,
            _ => config.listen.clone(),
        };
        for i in 0..n {
            let worker_config = Config {
                listen: listen.clone(),
                max_connections: Some(total),
                reuse_port: !matches!(sources, Sources::Shared(_)) && (config.reuse_port || n > 1),
                raise_fd_limit: false,
                admin: if i == 0 { config.admin } else { None },
                fd_check_interval: if i == 0 {
                    config.fd_check_interval
                } else {
                    Duration::ZERO
                },
                ..config.clone()
            };
            let mut server = match &mut sources {
                Sources::Shared(l) => {
                    let own = l.iter().map(|l| l.try_clone()).collect::<Result<_, _>>()?;
                    Server::bind_listeners(worker_config, own, make(i))?
                }
                Sources::Bind => Server::bind(worker_config, make(i))?,
                Sources::Handed(plan) => {
                    let (listen, given) = plan.take(i);
                    let worker_config = Config {
                        listen,
                        ..worker_config
                    };
                    Server::bind_given(worker_config, given, make(i))?
                }
            };
            if i == 0 {
                listen = server.local_addrs(); // the real ports, for the others to share
                if let Sources::Handed(plan) = &mut sources {
                    plan.bound(&listen);
                }
            }
            server.join_group(Arc::clone(&group), i);
            let _ = group.slots[i].handle.set(server.handle());
            servers.push(server);
        }
        info!(
            "{n} workers on {}: at most {total} connections in all, whichever worker takes them",
            listen
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
        let admin = servers[0].admin_addr();
        Ok(Workers {
            servers,
            group,
            addrs: listen,
            admin,
        })
    }

    /// The bound listen addresses (with real ports for port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The admin endpoint's address, if it is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// A handle that drains or stops every worker.
    pub fn handle(&self) -> WorkersHandle {
        WorkersHandle {
            handles: self.servers.iter().map(Server::handle).collect(),
        }
    }

    /// Starts every worker on its own thread.
    ///
    /// # Errors
    /// [`Error::Io`] if a thread cannot be spawned (the workers already started are stopped).
    pub fn start(mut self) -> Result<RunningWorkers, Error> {
        // The leak check's baseline before any worker runs: with connections already queued
        // (a successor of an upgrade starts under load) another worker may accept before
        // worker 0's first turn, and its connections are not "there before".
        if let Some(open) = limits::count_open_fds() {
            let own: u64 = self.group.slots.iter().map(|s| s.fds.load(Relaxed)).sum();
            self.servers[0].set_fd_baseline(open as i64 - own as i64);
        }
        let (tx, rx) = mpsc::channel();
        let handle = self.handle();
        let mut threads = Vec::with_capacity(self.servers.len());
        for (i, server) in self.servers.into_iter().enumerate() {
            let tx = tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("worker-{i}"))
                .spawn(move || {
                    // A panic is reported as this worker's failure (by the guard's drop).
                    let guard = Exit { i, tx: Some(tx) };
                    let result = server.run();
                    guard.finish(result);
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    handle.shutdown();
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(Error::Io(e));
                }
            }
        }
        let n = threads.len();
        Ok(RunningWorkers {
            threads,
            exits: rx,
            handle,
            group: self.group,
            done: vec![None; n],
            ended: 0,
        })
    }
}

/// Reports a worker thread's end (its result, or a panic) on drop.
struct Exit {
    i: usize,
    tx: Option<mpsc::Sender<(usize, Result<Metrics, Error>)>>,
}

impl Exit {
    fn finish(mut self, result: Result<Metrics, Error>) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((self.i, result));
        }
    }
}

impl Drop for Exit {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((self.i, Err(Error::Config("it panicked".into()))));
        }
    }
}

/// Drains or stops every worker of a [`Workers`] from any thread.
#[derive(Debug, Clone)]
pub struct WorkersHandle {
    handles: Vec<Handle>,
}

impl WorkersHandle {
    /// Drains every worker (see [`Handle::drain`]).
    pub fn drain(&self, timeout: Duration) {
        for h in &self.handles {
            h.drain(timeout);
        }
    }

    /// Stops every worker now (see [`Handle::shutdown`]).
    pub fn shutdown(&self) {
        for h in &self.handles {
            h.shutdown();
        }
    }
}

/// The workers, running.
#[derive(Debug)]
pub struct RunningWorkers {
    threads: Vec<JoinHandle<()>>,
    exits: mpsc::Receiver<(usize, Result<Metrics, Error>)>,
    handle: WorkersHandle,
    group: Arc<Group>,
    /// Final metrics of the workers that ended, by index.
    done: Vec<Option<Metrics>>,
    ended: usize,
}

impl RunningWorkers {
    /// Every worker's last published metrics, summed (at most a tick old).
    pub fn metrics(&self) -> Metrics {
        self.group.total()
    }

    /// A handle that drains or stops every worker.
    pub fn handle(&self) -> WorkersHandle {
        self.handle.clone()
    }

    /// Waits up to `timeout` for every worker to end: `Ok(Some(final metrics))` once all have,
    /// `Ok(None)` while some still run. A worker that fails (an error or a panic) stops the
    /// others: its error is returned, never a half-blind server.
    ///
    /// # Errors
    /// [`Error::Worker`] for the first worker that failed.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<Vec<Metrics>>, Error> {
        let deadline = Instant::now() + timeout;
        while self.ended < self.done.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.exits.recv_timeout(left) {
                Ok((i, Ok(m))) => {
                    self.done[i] = Some(m);
                    self.ended += 1;
                }
                Ok((i, Err(e))) => {
                    error!("worker {i} failed: {e}; stopping the others");
                    self.handle.shutdown();
                    for t in self.threads.drain(..) {
                        let _ = t.join();
                    }
                    return Err(Error::Worker {
                        index: i,
                        message: e.to_string(),
                    });
                }
                Err(mpsc::RecvTimeoutError::Timeout) => return Ok(None),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        Ok(Some(self.done.iter().flatten().cloned().collect()))
    }

    /// Waits for every worker to end; see [`RunningWorkers::wait_timeout`].
    ///
    /// # Errors
    /// [`Error::Worker`] for the first worker that failed.
    pub fn wait(mut self) -> Result<Vec<Metrics>, Error> {
        loop {
            if let Some(all) = self.wait_timeout(Duration::from_secs(3600))? {
                return Ok(all);
            }
        }
    }
}
