//! The admin side of the loop, as the loop sees it: [`AdminSide`] has the same methods whether
//! the `admin` feature is on (an HTTP endpoint, [`http`]) or off (a shell that does nothing),
//! so the loop has no `cfg` of its own for it (mio's approach to platform shells).

use std::io;
use std::net::SocketAddr;

use mio::Registry;
use slab::Slab;

use crate::conn::Conn;
use crate::group::Group;
use crate::handler::Handler;
use crate::handover::HandedListener;
use crate::metrics::Metrics;
use crate::time::{Clock, Tick};

#[cfg(feature = "admin")]
mod http;
#[cfg(feature = "admin")]
mod pages;

/// What the admin pages show, borrowed from the server for one request.
#[cfg_attr(not(feature = "admin"), allow(dead_code))]
pub(crate) struct View<'a, S> {
    pub(crate) metrics: &'a Metrics,
    pub(crate) conns: &'a Slab<Conn<S>>,
    pub(crate) now: Tick,
    /// `now` as an instant (for the workers' heartbeats).
    pub(crate) at: std::time::Instant,
    pub(crate) clock: Clock,
    pub(crate) draining: bool,
    /// `/readyz`: whether to send this server new connections, or why not.
    pub(crate) ready: Result<(), &'static str>,
    /// The handler's own parts of the pages.
    pub(crate) hooks: &'a dyn Hooks<S>,
    /// The group of workers this loop belongs to, and its index there.
    pub(crate) group: Option<(&'a Group, usize)>,
}

impl<S> std::fmt::Debug for View<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View").finish_non_exhaustive()
    }
}

/// The handler's contributions to the admin pages ([`Handler::describe`],
/// [`Handler::write_metrics`]), as a trait object so that the admin side needs no handler type.
#[cfg_attr(not(feature = "admin"), allow(dead_code))]
pub(crate) trait Hooks<S> {
    fn describe(&self, state: &S, out: &mut String);
    fn write_metrics(&self, out: &mut String);
}

impl<H: Handler> Hooks<H::Conn> for H {
    fn describe(&self, state: &H::Conn, out: &mut String) {
        Handler::describe(self, state, out);
    }
    fn write_metrics(&self, out: &mut String) {
        Handler::write_metrics(self, out);
    }
}

/// One loop's `/connections` lines for `query`, for worker 0 of a group to gather (`worker`:
/// this loop's index, printed on each line).
///
/// # Errors
/// A bad query, described.
pub(crate) fn connection_lines<S>(
    query: &str,
    view: &View<'_, S>,
    worker: Option<usize>,
) -> Result<String, String> {
    #[cfg(feature = "admin")]
    {
        pages::connections(query, view, worker)
    }
    #[cfg(not(feature = "admin"))]
    {
        let _ = (query, view, worker);
        Err("no admin endpoint in this build".into())
    }
}

/// The admin endpoint, or nothing.
#[derive(Debug, Default)]
pub(crate) struct AdminSide {
    #[cfg(feature = "admin")]
    inner: Option<http::Admin>,
}

impl AdminSide {
    /// Binds the admin listener at `addr` (`None` = off).
    ///
    /// # Errors
    /// The bind error; without the `admin` feature, any address is an `Unsupported` error.
    pub(crate) fn bind(
        addr: Option<SocketAddr>,
        registry: &Registry,
        clock: &Clock,
        linger: (Tick, u64),
    ) -> io::Result<AdminSide> {
        #[cfg(feature = "admin")]
        {
            Ok(AdminSide {
                inner: match addr {
                    Some(addr) => Some(http::Admin::bind(addr, registry, clock, linger)?),
                    None => None,
                },
            })
        }
        #[cfg(not(feature = "admin"))]
        {
            let _ = (registry, clock, linger);
            match addr {
                Some(_) => Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "the admin endpoint needs the `admin` cargo feature",
                )),
                None => Ok(AdminSide::default()),
            }
        }
    }

    /// Serves the admin endpoint on `listener`, bound already (handed over by a predecessor).
    ///
    /// # Errors
    /// Registering it; without the `admin` feature, an `Unsupported` error.
    pub(crate) fn adopt(
        listener: std::net::TcpListener,
        registry: &Registry,
        clock: &Clock,
        linger: (Tick, u64),
    ) -> io::Result<AdminSide> {
        #[cfg(feature = "admin")]
        {
            listener.set_nonblocking(true)?;
            let listener = mio::net::TcpListener::from_std(listener);
            Ok(AdminSide {
                inner: Some(http::Admin::adopt(listener, registry, clock, linger)?),
            })
        }
        #[cfg(not(feature = "admin"))]
        {
            let _ = (listener, registry, clock, linger);
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the admin endpoint needs the `admin` cargo feature",
            ))
        }
    }

    /// A duplicate of the admin listener for a successor, if there is one.
    pub(crate) fn duplicate_listener(&self) -> io::Result<Option<HandedListener>> {
        #[cfg(feature = "admin")]
        if let Some(a) = &self.inner {
            return a.duplicate_listener();
        }
        Ok(None)
    }

    /// Stops accepting admin connections and closes this descriptor of the listener (handed to
    /// a successor); the admin connections already accepted are still answered. Returns
    /// whether there was a listener.
    pub(crate) fn release_listener(&mut self, registry: &Registry) -> bool {
        #[cfg(feature = "admin")]
        if let Some(a) = &mut self.inner {
            return a.release_listener(registry);
        }
        let _ = registry;
        false
    }

    /// The bound address, if on.
    pub(crate) fn addr(&self) -> Option<SocketAddr> {
        #[cfg(feature = "admin")]
        {
            self.inner.as_ref().map(|a| a.addr)
        }
        #[cfg(not(feature = "admin"))]
        None
    }

    /// The admin listener is readable: accept (within a per-turn budget).
    pub(crate) fn accept(&mut self, registry: &Registry, now: Tick) {
        #[cfg(feature = "admin")]
        if let Some(a) = &mut self.inner {
            a.accept(registry, now);
        }
        #[cfg(not(feature = "admin"))]
        let _ = (registry, now);
    }

    /// Admin connection `k` is ready.
    pub(crate) fn drive<S>(&mut self, k: usize, registry: &Registry, view: &View<'_, S>) {
        #[cfg(feature = "admin")]
        if let Some(a) = &mut self.inner {
            a.drive(k, registry, view);
        }
        #[cfg(not(feature = "admin"))]
        let _ = (k, registry, view);
    }

    /// Work a budget left (queued admin clients), answers gathered from other workers, and
    /// deadlines due by `view.now`.
    pub(crate) fn tick<S>(&mut self, registry: &Registry, view: &View<'_, S>) {
        #[cfg(feature = "admin")]
        if let Some(a) = &mut self.inner {
            a.tick(registry, view);
        }
        #[cfg(not(feature = "admin"))]
        let _ = (registry, view);
    }

    /// When the loop must run for the admin side: `Some(0)` if a budget left work.
    pub(crate) fn poll_at(&self) -> Option<Tick> {
        #[cfg(feature = "admin")]
        {
            self.inner.as_ref().and_then(|a| a.poll_at())
        }
        #[cfg(not(feature = "admin"))]
        None
    }

    /// Open descriptors the admin side holds.
    pub(crate) fn fds(&self) -> usize {
        #[cfg(feature = "admin")]
        {
            self.inner.as_ref().map_or(0, |a| a.fds())
        }
        #[cfg(not(feature = "admin"))]
        0
    }

    /// Closes the listener and every admin connection.
    pub(crate) fn close_all(&mut self, registry: &Registry) {
        #[cfg(feature = "admin")]
        if let Some(mut a) = self.inner.take() {
            a.close_all(registry);
        }
        #[cfg(not(feature = "admin"))]
        let _ = registry;
    }
}
