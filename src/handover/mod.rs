//! Handing the listening sockets to a successor (a zero-downtime upgrade, or moving a server to
//! another loop): the listeners as they leave a running server ([`HandedListener`],
//! [`Listeners`]), the handle that asks the loops for them and then lets them go
//! ([`Handover`]), and the plan that builds a successor's loops from the ones it received.
//!
//! Why the same socket, and the sequence: see [`Handover`].
//!
//! # Invariants
//! - A socket handed over is never closed by the successor while it has a queue: a handed
//!   listener whose address the successor's configuration does not name is an error, never
//!   closed quietly.
//! - The old loop never accepts from a socket after releasing it, and releasing is the only way
//!   it lets a socket go without accepting its queue.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::remote::Handle;

mod plan;

pub(crate) use plan::{Given, Plan};

/// One listening TCP socket handed from a server to its successor: a descriptor of the same
/// socket, so its accept queue comes with it. Built by [`Handover::listeners`] on the old side
/// and by [`HandedListener::new`] on the receiving side, which checks that the descriptor is a
/// listening TCP socket.
#[derive(Debug)]
pub struct HandedListener {
    socket: std::net::TcpListener,
    /// The address it is bound to (with its real port).
    addr: SocketAddr,
    /// The admin endpoint's listener, not a data one.
    admin: bool,
}

impl HandedListener {
    /// Takes `socket` as a handed listener (`admin`: the admin endpoint's). It must be a
    /// listening TCP socket: anything else (not a socket, a datagram or unix socket, a TCP
    /// socket that is not listening) is refused with an [`io::ErrorKind::InvalidInput`] error
    /// that says what it is, so that a successor never serves the wrong thing.
    ///
    /// # Errors
    /// As above; or the error of reading the socket's address.
    pub fn new(socket: std::net::TcpListener, admin: bool) -> io::Result<HandedListener> {
        check_listening_tcp(&socket)?;
        let addr = socket.local_addr()?;
        Ok(HandedListener {
            socket,
            addr,
            admin,
        })
    }

    /// A duplicate of a loop's own listener (same socket: `F_DUPFD_CLOEXEC`).
    pub(crate) fn duplicate(
        socket: socket2::SockRef<'_>,
        addr: SocketAddr,
        admin: bool,
    ) -> io::Result<HandedListener> {
        let dup = socket.try_clone()?;
        Ok(HandedListener {
            socket: dup.into(),
            addr,
            admin,
        })
    }

    /// The address the socket is bound to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether this is the admin endpoint's listener.
    pub fn is_admin(&self) -> bool {
        self.admin
    }

    /// The socket, to pass its descriptor on (`AsFd`). Do not make it blocking: the old server
    /// still accepts from the same socket until it is released, and the nonblocking flag
    /// belongs to the socket, not to one descriptor.
    pub fn socket(&self) -> &std::net::TcpListener {
        &self.socket
    }

    /// The socket itself.
    pub fn into_socket(self) -> std::net::TcpListener {
        self.socket
    }

    /// Whether the socket was bound with `SO_REUSEPORT`: then more sockets can join its address.
    pub(crate) fn reuse_port(&self) -> bool {
        socket2::SockRef::from(&self.socket)
            .reuse_port()
            .unwrap_or(false)
    }
}

/// Refuses anything but a listening TCP socket, saying what it is instead.
fn check_listening_tcp(socket: &std::net::TcpListener) -> io::Result<()> {
    let s = socket2::SockRef::from(socket);
    let invalid = |what: String| Err(io::Error::new(io::ErrorKind::InvalidInput, what));
    let kind = match s.r#type() {
        Ok(kind) => kind,
        #[cfg(unix)]
        Err(e) if e.raw_os_error() == Some(libc::ENOTSOCK) => {
            return invalid("not a socket".into());
        }
        Err(e) => return Err(e),
    };
    let domain = s.domain()?;
    if domain != socket2::Domain::IPV4 && domain != socket2::Domain::IPV6 {
        return invalid(format!("not a TCP socket (a {domain:?} socket)"));
    }
    if kind != socket2::Type::STREAM {
        return invalid(format!("not a TCP socket (a {kind:?} socket)"));
    }
    if !s.is_listener()? {
        return invalid("a TCP socket that is not listening".into());
    }
    Ok(())
}

/// Duplicates of every listener of a running server or group of workers, from
/// [`Handover::listeners`]: data listeners in the loops' order (worker 0's first), then the
/// admin one. Each socket appears once, even when several workers serve it. While this lives
/// the loops' leak self-check is suspended (the embedder holds these and its channel to the
/// successor); dropping it closes the duplicates, never the sockets, which the loops still hold.
#[derive(Debug)]
pub struct Listeners {
    list: Vec<HandedListener>,
    _suspended: Vec<Suspension>,
}

impl Listeners {
    /// The listeners, data first.
    pub fn iter(&self) -> std::slice::Iter<'_, HandedListener> {
        self.list.iter()
    }

    /// How many listeners.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether there are none (the server had already closed its listeners: it is draining).
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The listeners themselves (to build a successor in the same process); ends the suspension
    /// of the leak self-check.
    pub fn into_vec(self) -> Vec<HandedListener> {
        self.list
    }
}

/// Suspends a loop's leak self-check while it lives.
#[derive(Debug)]
struct Suspension(Arc<AtomicUsize>);

impl Suspension {
    fn new(count: &Arc<AtomicUsize>) -> Suspension {
        count.fetch_add(1, Ordering::AcqRel);
        Suspension(Arc::clone(count))
    }
}

impl Drop for Suspension {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What another thread asks of a loop's handover side.
#[derive(Debug)]
pub(crate) enum Request {
    /// Duplicates of every listener, data then admin.
    Listeners(mpsc::SyncSender<io::Result<Vec<HandedListener>>>),
    /// Stop accepting without accepting the queues, close the admin listener, drain.
    Release(Duration),
}

/// A loop's end of its [`Handover`]s: the requests, and the leak check's suspension count.
#[derive(Debug)]
pub(crate) struct Inbox {
    pub(crate) rx: mpsc::Receiver<Request>,
    tx: mpsc::Sender<Request>,
    suspended: Arc<AtomicUsize>,
}

impl Inbox {
    pub(crate) fn new() -> Inbox {
        let (tx, rx) = mpsc::channel();
        Inbox {
            rx,
            tx,
            suspended: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Whether a handover holds descriptors the loop cannot see (the leak check waits).
    pub(crate) fn is_suspended(&self) -> bool {
        self.suspended.load(Ordering::Acquire) > 0
    }

    /// A port to this loop, for a [`Handover`].
    pub(crate) fn port(&self, handle: Handle) -> Port {
        Port {
            handle,
            tx: self.tx.clone(),
            suspended: Arc::clone(&self.suspended),
        }
    }
}

/// Another thread's way to one loop's handover side.
#[derive(Debug, Clone)]
pub(crate) struct Port {
    handle: Handle,
    tx: mpsc::Sender<Request>,
    suspended: Arc<AtomicUsize>,
}

/// Takes a running server's (or every worker's) listening sockets out for a successor, from any
/// thread, and then lets them go. From [`Server::handover`](crate::Server::handover) or
/// [`Workers::handover`](crate::Workers::handover), before the loops run; the example is at
/// [`Server::bind_handed`](crate::Server::bind_handed).
///
/// # Why the same socket
/// A listening socket that moves to another process keeps its accept queue: every connect the
/// kernel completed for it is still there for whoever holds the socket next. Closing it and
/// binding again loses that queue and refuses the connects in between, and `SO_REUSEPORT` does
/// not help (the kernel hashes new connects to the closing socket until it is gone). So the
/// old server hands out *duplicates* of its descriptors (the same socket object), the successor
/// serves them, and only then does the old one stop accepting: it deregisters and drops its own
/// descriptors, and the socket lives on in the successor. nginx's binary upgrade, HAProxy's
/// `expose-fd listeners` and Envoy's hot restart all move sockets the same way.
///
/// # The sequence
/// 1. [`Handover::listeners`] asks each loop for duplicates of its listeners, data and admin.
///    While the [`Listeners`] live, the loops' leak self-check is suspended: the embedder holds
///    descriptors the loops cannot see (the duplicates, a channel to the successor).
/// 2. The embedder passes them on: `SCM_RIGHTS` over a unix socket (what `sockman` does, see
///    its `upgrade` module) or inheritance across `exec`; in one process, just moving them.
/// 3. The successor builds its loops with [`Server::bind_handed`](crate::Server::bind_handed)
///    or [`Workers::bind_handed`](crate::Workers::bind_handed): it binds nothing of its own for
///    those addresses.
/// 4. [`Handover::release`] makes each loop stop accepting **without** accepting what is
///    queued (the queue is the successor's now: both hold the same socket, and accepting here
///    would only race the successor for it), close its admin listener, and drain its
///    connections by the drain rules ([`Handle::drain`]), without a lame-duck delay.
#[derive(Debug, Clone)]
pub struct Handover {
    ports: Vec<Port>,
}

impl Handover {
    pub(crate) fn new(ports: Vec<Port>) -> Handover {
        Handover { ports }
    }

    /// Asks every loop for duplicates of its listeners and waits for them, at most `timeout`
    /// in all. The leak self-check of the loops is suspended from now until the returned
    /// [`Listeners`] are dropped. It blocks until the loops answer, so call it from another
    /// thread than the loops' (from a callback on a loop's own thread it can only time out).
    ///
    /// # Errors
    /// [`Error::Handover`] if a loop has stopped or does not answer in time; [`Error::Io`] if a
    /// descriptor cannot be duplicated (e.g. the process is out of descriptors).
    pub fn listeners(&self, timeout: Duration) -> Result<Listeners, Error> {
        let deadline = Instant::now() + timeout;
        let suspended: Vec<Suspension> = self
            .ports
            .iter()
            .map(|p| Suspension::new(&p.suspended))
            .collect();
        let mut replies = Vec::with_capacity(self.ports.len());
        for (i, port) in self.ports.iter().enumerate() {
            let (tx, rx) = mpsc::sync_channel(1);
            port.tx
                .send(Request::Listeners(tx))
                .map_err(|_| stopped(i))?;
            port.handle.wake_loop();
            replies.push(rx);
        }
        let mut data = Vec::new();
        let mut admin = Vec::new();
        for (i, rx) in replies.into_iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            let list = match rx.recv_timeout(left) {
                Ok(list) => list?,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(Error::Handover(format!(
                        "loop {i} did not hand over its listeners within {timeout:?}"
                    )))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(stopped(i)),
            };
            for l in list {
                if l.admin {
                    admin.push(l);
                } else {
                    data.push(l);
                }
            }
        }
        data.extend(admin);
        Ok(Listeners {
            list: distinct(data),
            _suspended: suspended,
        })
    }

    /// Makes every loop stop accepting without accepting what is queued (the successor accepts
    /// it from the same sockets), close its admin listener, and drain its connections by the
    /// drain rules within `timeout` (see [`Handle::drain`]; no lame-duck delay: new connects
    /// reach the successor already). Call it once the successor serves the listeners; the loops
    /// stop when their last connection is gone.
    pub fn release(&self, timeout: Duration) {
        for port in &self.ports {
            if port.tx.send(Request::Release(timeout)).is_ok() {
                port.handle.wake_loop();
            }
        }
    }
}

fn stopped(i: usize) -> Error {
    Error::Handover(format!("loop {i} has stopped"))
}

/// `list` with each socket once: workers that share sockets (socket activation) each hand out a
/// descriptor of the same one. A socket is known by its inode.
fn distinct(list: Vec<HandedListener>) -> Vec<HandedListener> {
    #[cfg(unix)]
    {
        let mut seen = Vec::with_capacity(list.len());
        let mut out = Vec::with_capacity(list.len());
        for l in list {
            match identity(&l.socket) {
                Some(id) if seen.contains(&id) => {}
                Some(id) => {
                    seen.push(id);
                    out.push(l);
                }
                None => out.push(l),
            }
        }
        out
    }
    #[cfg(not(unix))]
    list
}

/// The socket's inode (device, inode), through `fstat` on one more duplicate.
#[cfg(unix)]
fn identity(socket: &std::net::TcpListener) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let dup = socket.try_clone().ok()?;
    let file = std::fs::File::from(std::os::fd::OwnedFd::from(dup));
    let meta = file.metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

#[cfg(test)]
mod tests;
