//! How the listeners handed to a successor are spread over its loops ([`Plan`]), and what each
//! loop is given ([`Given`]).

use std::net::SocketAddr;

use super::HandedListener;
use crate::config::Config;
use crate::error::Error;

/// Where one loop's listening sockets come from, when not all from binding its configuration.
#[derive(Debug, Default)]
pub(crate) struct Given {
    /// One per listen address of the loop's configuration, in order: `Some` = serve this socket,
    /// `None` = bind the address.
    pub(crate) data: Vec<Option<std::net::TcpListener>>,
    /// The admin listener, instead of binding [`Config::admin`].
    pub(crate) admin: Option<std::net::TcpListener>,
}

/// One listener slot of one loop in a [`Plan`].
#[derive(Debug)]
pub(super) enum Slot {
    /// Serve this handed socket.
    Handed(std::net::TcpListener),
    /// Bind this address; `entry` is its listen address's index in the configuration when it
    /// is one the predecessor did not have (a port 0 is then resolved by worker 0 and bound
    /// the same by the others), `None` for one more `SO_REUSEPORT` socket on a handed address.
    Fresh {
        addr: SocketAddr,
        entry: Option<usize>,
    },
}

/// How the listeners handed to a successor are spread over its `n` loops:
///
/// - every handed data listener must match one of [`Config::listen`] (the same address, or the
///   same IP where the configuration says port 0), else [`Error::Handover`]: it is never
///   closed with its queue;
/// - a listen address that no handed listener matches is bound fresh (nobody listened there,
///   so nothing can be lost), by every loop, with `SO_REUSEPORT` if there are several;
/// - with `M` sockets handed for one address and `n` loops: loop `i` serves sockets `i`,
///   `i + n`, ... when `M >= n` (each socket has exactly one loop, none is closed); when
///   `M < n`, loop `i < M` serves socket `i` and each further loop binds one more
///   `SO_REUSEPORT` socket on the address if the handed ones have that option, else serves
///   socket `i % M` too (sockets from socket activation are shared that way);
/// - the handed admin listener must match [`Config::admin`] in the same way and goes to loop
///   0; an admin address with none handed is bound fresh.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(super) loops: Vec<Vec<Slot>>,
    admin: Option<std::net::TcpListener>,
    /// Addresses of the fresh listen entries once loop 0 has bound them (real ports).
    resolved: Vec<Option<SocketAddr>>,
    /// Where loop 0's fresh entries are in its listeners: (position, entry).
    first_fresh: Vec<(usize, usize)>,
}

/// Whether a listener on `got` is what the configured `want` asks for.
fn matches(want: SocketAddr, got: SocketAddr) -> bool {
    want == got || (want.port() == 0 && want.ip() == got.ip())
}

fn list(addrs: &[SocketAddr]) -> String {
    let names: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    names.join(", ")
}

impl Plan {
    /// Plans `n` loops for `config` from `handed` (see [`Plan`]).
    ///
    /// # Errors
    /// [`Error::Handover`] for a handed listener the configuration does not name, a second
    /// admin listener, or a descriptor that cannot be duplicated for sharing.
    pub(crate) fn new(
        config: &Config,
        handed: Vec<HandedListener>,
        n: usize,
    ) -> Result<Plan, Error> {
        let n = n.max(1);
        let mut admin = None;
        // Handed data sockets by configured entry, then by address in order of arrival.
        let mut by_entry: Vec<Vec<(SocketAddr, Vec<HandedListener>)>> =
            (0..config.listen.len()).map(|_| Vec::new()).collect();
        for l in handed {
            if l.admin {
                let want = config.admin.ok_or_else(|| {
                    Error::Handover(format!(
                        "an admin listener on {} was handed over, but no admin address is configured",
                        l.addr
                    ))
                })?;
                if !matches(want, l.addr) {
                    return Err(Error::Handover(format!(
                        "the admin listener handed over is on {}, the configuration asks for {want}",
                        l.addr
                    )));
                }
                if admin.replace(l).is_some() {
                    return Err(Error::Handover("two admin listeners handed over".into()));
                }
                continue;
            }
            let Some(entry) = config.listen.iter().position(|&w| matches(w, l.addr)) else {
                return Err(Error::Handover(format!(
                    "a listener on {} was handed over, but the listen addresses are {}: closing it would lose its queue",
                    l.addr,
                    list(&config.listen)
                )));
            };
            let groups = &mut by_entry[entry];
            match groups.iter_mut().find(|(a, _)| *a == l.addr) {
                Some((_, group)) => group.push(l),
                None => groups.push((l.addr, vec![l])),
            }
        }
        let mut loops: Vec<Vec<Slot>> = (0..n).map(|_| Vec::new()).collect();
        for (entry, groups) in by_entry.into_iter().enumerate() {
            if groups.is_empty() {
                let addr = config.listen[entry];
                for slots in &mut loops {
                    slots.push(Slot::Fresh {
                        addr,
                        entry: Some(entry),
                    });
                }
                continue;
            }
            for (addr, group) in groups {
                spread(&mut loops, addr, group)?;
            }
        }
        Ok(Plan {
            loops,
            admin: admin.map(HandedListener::into_socket),
            resolved: vec![None; config.listen.len()],
            first_fresh: Vec::new(),
        })
    }

    /// How many listeners (handed and fresh) loop `i` will have.
    pub(crate) fn len(&self, i: usize) -> usize {
        self.loops.get(i).map_or(0, Vec::len)
    }

    /// Loop `i`'s listen addresses and sockets (the admin one goes to loop 0). Loops are taken
    /// in order: a fresh entry's port 0 is the port loop 0 got (see [`Plan::bound`]).
    pub(crate) fn take(&mut self, i: usize) -> (Vec<SocketAddr>, Given) {
        let slots = std::mem::take(&mut self.loops[i]);
        let mut addrs = Vec::with_capacity(slots.len());
        let mut data = Vec::with_capacity(slots.len());
        for slot in slots {
            match slot {
                Slot::Handed(socket) => {
                    // Checked at hand-over: a listening socket has an address.
                    addrs.push(socket.local_addr().unwrap_or(SocketAddr::from(([0; 4], 0))));
                    data.push(Some(socket));
                }
                Slot::Fresh { addr, entry } => {
                    if let (0, Some(e)) = (i, entry) {
                        self.first_fresh.push((addrs.len(), e));
                    }
                    let resolved = entry.and_then(|e| self.resolved[e]);
                    addrs.push(resolved.unwrap_or(addr));
                    data.push(None);
                }
            }
        }
        let admin = if i == 0 { self.admin.take() } else { None };
        (addrs, Given { data, admin })
    }

    /// Loop 0 bound `addrs` for the slots it took: fresh entries keep their real port, for the
    /// other loops to bind the same.
    pub(crate) fn bound(&mut self, addrs: &[SocketAddr]) {
        for &(at, entry) in &self.first_fresh {
            self.resolved[entry] = addrs.get(at).copied();
        }
    }
}

/// Spreads the `group` of sockets handed for `addr` over `loops` (see [`Plan`]).
fn spread(
    loops: &mut [Vec<Slot>],
    addr: SocketAddr,
    group: Vec<HandedListener>,
) -> Result<(), Error> {
    let n = loops.len();
    let m = group.len();
    let reuse_port = group.iter().all(HandedListener::reuse_port);
    let mut sockets: Vec<std::net::TcpListener> =
        group.into_iter().map(HandedListener::into_socket).collect();
    if m < n && !reuse_port {
        // Loops beyond the handed sockets share them (descriptors of the same sockets).
        for i in m..n {
            let shared = sockets[i % m].try_clone().map_err(Error::Io)?;
            sockets.push(shared);
        }
    }
    for (j, socket) in sockets.into_iter().enumerate() {
        loops[j % n].push(Slot::Handed(socket));
    }
    if m < n && reuse_port {
        for slots in &mut loops[m..] {
            slots.push(Slot::Fresh { addr, entry: None });
        }
    }
    Ok(())
}
