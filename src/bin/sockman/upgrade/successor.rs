//! The successor's side of an upgrade: [`take_over`] receives the old process's listeners
//! before anything is bound, and [`confirm`] says `ready` once the loops are built from them
//! and waits for the go-ahead. Every failure is told to the old process (which keeps serving)
//! and returned as this process's error: it exits non-zero.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use log::{info, warn};
use sockman::HandedListener;

use super::channel::{wait_on, Channel};
use super::wire::{Msg, VERSION};
use super::{notify, UPGRADE_FROM};

/// Most listeners one upgrade hands over (1024 workers with a few addresses each).
const MAX_LISTENERS: usize = 8192;

/// The listeners taken over from the old process, and the channel to it.
#[derive(Debug)]
pub(crate) struct TakeOver {
    channel: Channel,
    /// The old process.
    from: u32,
    listeners: Vec<HandedListener>,
    /// The data listeners came from systemd socket activation.
    activated: bool,
}

/// If this process was started as a successor (`SOCKMAN_UPGRADE_FROM`), connects to the old
/// process and receives its listeners, within `timeout`; `Ok(None)` for an ordinary start.
///
/// # Errors
/// The old process is gone or is not this process's parent, the protocol does not match, or
/// a descriptor is not a listening TCP socket: described (and told to the old process).
pub(crate) fn take_over(timeout: Duration) -> Result<Option<TakeOver>, String> {
    let Some(name) = std::env::var_os(UPGRADE_FROM).filter(|n| !n.is_empty()) else {
        return Ok(None);
    };
    let name = name
        .into_string()
        .map_err(|n| format!("{UPGRADE_FROM}={n:?} is not a socket name"))?;
    let deadline = Instant::now() + timeout;
    let channel = Channel::connect(&name).map_err(|e| {
        format!("{UPGRADE_FROM}={name}: the process that started this upgrade is gone (its upgrade socket: {e})")
    })?;
    channel
        .set_send_timeout(timeout)
        .map_err(|e| format!("{UPGRADE_FROM}={name}: {e}"))?;
    let parent = std::os::unix::process::parent_id();
    let from = channel
        .peer_pid()
        .map_err(|e| format!("{UPGRADE_FROM}={name}: {e}"))?;
    if from != parent {
        return Err(format!(
            "{UPGRADE_FROM}={name}: the upgrade socket belongs to pid {from}, not to this process's parent (pid {parent})"
        ));
    }
    let mut t = TakeOver {
        channel,
        from,
        listeners: Vec::new(),
        activated: false,
    };
    if let Err(e) = t.receive(deadline) {
        return Err(t.fail(&format!("taking over from pid {from}: {e}")));
    }
    let names: Vec<String> = t
        .listeners
        .iter()
        .map(|l| {
            let kind = if l.is_admin() { "admin " } else { "" };
            format!("{kind}{}", l.addr())
        })
        .collect();
    info!(
        "upgrade: took over {} listeners from pid {from}: {}{}",
        t.listeners.len(),
        names.join(", "),
        if t.activated {
            " (from socket activation)"
        } else {
            ""
        }
    );
    Ok(Some(t))
}

impl TakeOver {
    /// Receives the hello and every listener.
    fn receive(&mut self, deadline: Instant) -> Result<(), String> {
        let hello = self.next(deadline)?;
        let count = match hello.0 {
            Msg::Hello { version, .. } if version != VERSION => {
                return Err(format!(
                    "it speaks version {version} of the upgrade protocol, this binary {VERSION}"
                ))
            }
            Msg::Hello { pid, .. } if pid != self.from => {
                return Err(format!("its hello names pid {pid}"))
            }
            Msg::Hello { listeners, .. } if listeners <= MAX_LISTENERS => listeners,
            other => return Err(format!("expected its hello, got {other:?}")),
        };
        for _ in 0..count {
            let (msg, fd) = self.next(deadline)?;
            let Msg::Listener {
                admin,
                addr,
                activated,
            } = msg
            else {
                return Err(format!("expected a listener, got {msg:?}"));
            };
            let fd = fd.ok_or_else(|| format!("no descriptor came for {addr}"))?;
            let l = HandedListener::new(std::net::TcpListener::from(fd), admin).map_err(|e| {
                format!("the descriptor for {addr} is not a listening TCP socket: {e}")
            })?;
            if l.addr() != addr {
                return Err(format!(
                    "the descriptor for {addr} is a listener on {}",
                    l.addr()
                ));
            }
            self.activated |= activated && !admin;
            self.listeners.push(l);
        }
        Ok(())
    }

    /// The next message and its descriptor.
    fn next(&self, deadline: Instant) -> Result<(Msg, Option<std::os::fd::OwnedFd>), String> {
        match self.channel.recv(deadline, &mut wait_on) {
            Ok(Some((text, fd))) => Ok((text.parse()?, fd)),
            Ok(None) => Err("it closed the upgrade socket".into()),
            Err(e) => Err(format!("the upgrade socket: {e}")),
        }
    }

    /// Tells the old process why this successor gives up (it keeps serving); returns `why`.
    pub(crate) fn fail(self, why: &str) -> String {
        // Best effort: the old process stops waiting either way once this one exits.
        let _ = self
            .channel
            .send(&Msg::Failed(why.to_string()).to_string(), None);
        why.to_string()
    }

    /// The data listeners came from socket activation: serve them whatever `--listen` says,
    /// as the old process did.
    pub(crate) fn activated(&self) -> bool {
        self.activated
    }

    /// The addresses of the data listeners taken over.
    pub(crate) fn data_addrs(&self) -> Vec<SocketAddr> {
        let data = self.listeners.iter().filter(|l| !l.is_admin());
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for a in data.map(HandedListener::addr) {
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
        addrs
    }

    /// The listeners, to build the loops from (once).
    pub(crate) fn take_listeners(&mut self) -> Vec<HandedListener> {
        std::mem::take(&mut self.listeners)
    }

    /// The loops are built: says `ready` and waits for the old process's go-ahead.
    fn ready(self, timeout: Duration) -> Result<(), String> {
        let from = self.from;
        let me = std::process::id();
        let deadline = Instant::now() + timeout;
        // A send that fails means the old process is gone: the receive below sees it.
        let _ = self.channel.send(&Msg::Ready { pid: me }.to_string(), None);
        match self.channel.recv(deadline, &mut wait_on) {
            Ok(Some((text, _))) => match text.parse::<Msg>()? {
                Msg::Go => {}
                Msg::Abort(why) => return Err(format!("pid {from} called the upgrade off: {why}")),
                other => return Err(format!("expected go from pid {from}, got {other:?}")),
            },
            Ok(None) => warn!(
                "upgrade: pid {from} went away before its go-ahead; serving its listeners (nothing else holds them now)"
            ),
            Err(e) => return Err(format!("no go-ahead from pid {from}: {e}")),
        }
        info!("upgrade: serving in place of pid {from}");
        notify(&[sd_notify::NotifyState::MainPid(me)]);
        Ok(())
    }
}

/// For a successor (`takeover`), the end of the take-over: `bound` (the loops built from the
/// listeners, or why not) is told to the old process: `ready` and wait for `go`, or `failed`.
/// Without a take-over, `bound` as it is.
///
/// # Errors
/// `bound`'s error, or a go-ahead that does not come.
pub(crate) fn confirm<T>(
    takeover: Option<TakeOver>,
    bound: Result<T, String>,
    timeout: Duration,
) -> Result<T, String> {
    match (takeover, bound) {
        (None, bound) => bound,
        (Some(t), Err(e)) => Err(t.fail(&e)),
        (Some(t), Ok(loops)) => t.ready(timeout).map(|()| loops),
    }
}
