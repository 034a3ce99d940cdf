//! The loop's side of handing its listeners to a successor ([`crate::handover`]): binding from
//! handed listeners, answering a [`Handover`]'s requests for duplicates, and releasing the
//! listeners (stop accepting *without* accepting the queues, which are the successor's now),
//! then draining.
//!
//! # Invariants
//! - Releasing deregisters every listener before dropping this loop's descriptor of it: the
//!   successor holds the same socket (and file description), so epoll would not forget a
//!   registration by itself when this descriptor closes.
//! - The leak self-check is suspended while a [`Listeners`](crate::Listeners) from this loop
//!   lives: the embedder holds descriptors for the handover that the loop cannot count.

use std::io;
use std::time::Duration;

use log::info;

use super::Server;
use crate::config::Config;
use crate::error::Error;
use crate::handler::Handler;
use crate::handover::{HandedListener, Handover, Inbox, Plan, Port, Request};
use crate::time::Tick;

impl<H: Handler> Server<H> {
    /// Binds a server that serves `listeners` handed over by a predecessor (see
    /// [`Handover`]): it binds nothing of its own for their addresses. Each handed data
    /// listener must be on one of [`Config::listen`] (the same address, or the same IP where
    /// the configuration says port 0); a listen address none is on is bound fresh, which is
    /// safe (nobody listened there). A handed admin listener must be on [`Config::admin`] in
    /// the same way and serves the admin endpoint; an admin address with none handed is bound
    /// fresh. The listeners get the configured socket options, as with
    /// [`Server::bind_listeners`].
    ///
    /// # Errors
    /// [`Error::Handover`] for a handed listener the configuration does not name (the flags
    /// changed?): it is not closed, since its queue would be lost; otherwise as
    /// [`Server::bind`].
    ///
    /// # Examples
    /// Moving a server's listeners to a new one in the same process (an upgrade passes them to
    /// another process instead, e.g. with `SCM_RIGHTS`; `examples/upgrade.rs` runs this with a
    /// client that keeps connecting):
    /// ```no_run
    /// use std::time::Duration;
    /// use sockman::{Config, Echo, Server};
    ///
    /// # fn main() -> Result<(), sockman::Error> {
    /// let config = Config {
    ///     listen: vec!["127.0.0.1:7000".parse().unwrap()],
    ///     ..Config::default()
    /// };
    /// let mut old = Server::bind(config.clone(), Echo)?;
    /// let handover = old.handover();
    /// let old = std::thread::spawn(move || old.run());
    ///
    /// let listeners = handover.listeners(Duration::from_secs(1))?;
    /// let new = Server::bind_handed(config, listeners.into_vec(), Echo)?;
    /// handover.release(Duration::from_secs(10)); // the old one stops accepting and drains
    /// let new = std::thread::spawn(move || new.run());
    /// # drop((old, new));
    /// # Ok(())
    /// # }
    /// ```
    pub fn bind_handed(
        config: Config,
        listeners: Vec<HandedListener>,
        handler: H,
    ) -> Result<Server<H>, Error> {
        let mut plan = Plan::new(&config, listeners, 1)?;
        let (listen, given) = plan.take(0);
        Server::bind_given(Config { listen, ..config }, given, handler)
    }

    /// A handle that takes this server's listeners out for a successor, from any thread, and
    /// then lets them go (see [`Handover`]). Get it before [`Server::run`] moves the server.
    pub fn handover(&mut self) -> Handover {
        Handover::new(vec![self.handover_port()])
    }

    /// This loop's port for a [`Handover`] (one per worker in a group).
    pub(crate) fn handover_port(&mut self) -> Port {
        let handle = self.handle();
        self.handover.get_or_insert_with(Inbox::new).port(handle)
    }

    /// Whether a handover holds descriptors the loop cannot see: the leak check waits.
    pub(super) fn leak_check_suspended(&self) -> bool {
        self.handover.as_ref().is_some_and(Inbox::is_suspended)
    }

    /// Answers what [`Handover`]s asked (the loop was woken for it).
    pub(super) fn answer_handover(&mut self, now: Tick) {
        loop {
            let Some(request) = self.handover.as_ref().and_then(|h| h.rx.try_recv().ok()) else {
                return;
            };
            match request {
                // The asker may have given up waiting: then the duplicates just close.
                Request::Listeners(reply) => drop(reply.send(self.duplicate_listeners())),
                Request::Release(timeout) => self.release_listeners(timeout, now),
            }
        }
    }

    /// Duplicates of every listener: data in order, then admin.
    fn duplicate_listeners(&self) -> io::Result<Vec<HandedListener>> {
        let mut out = Vec::with_capacity(self.accept.listeners.len() + 1);
        for l in &self.accept.listeners {
            let socket = socket2::SockRef::from(&l.socket);
            out.push(HandedListener::duplicate(socket, l.addr, false)?);
        }
        out.extend(self.admin.duplicate_listener()?);
        Ok(out)
    }

    /// Stops accepting without accepting what is queued (the successor accepts it from the
    /// same sockets), stops serving the admin endpoint's new connections, and drains the
    /// connections by the drain rules within `timeout`, with no lame-duck delay.
    fn release_listeners(&mut self, timeout: Duration, now: Tick) {
        let data = self.accept.listeners.len();
        // Deregistered, then this descriptor dropped: the socket lives on in the successor.
        self.close_listeners();
        self.accept.gate.reset();
        let admin = self.admin.release_listener(self.table.poll.registry());
        let m = &self.table.metrics;
        info!(
            "handover: released {data} listener{}{} to the successor; accepting no more: accepted={} active={}",
            if data == 1 { "" } else { "s" },
            if admin { " and the admin one" } else { "" },
            m.accepted,
            m.active
        );
        // The successor takes new connects already: no lame duck.
        self.config.drain_delay = Duration::ZERO;
        self.begin_drain(timeout, now);
    }
}
