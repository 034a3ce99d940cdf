//! Admission control: the connection cap and its eviction order, the per-IP cap, and accept
//! pausing after fd exhaustion. Pure bookkeeping: this module owns no socket and no poll; the
//! server asks it and acts.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::IpAddr;

use log::warn;

use crate::wheel::Tick;

/// File descriptors kept back from the connection cap: listeners, the epoll fd, the waker, the
/// spare fd, stdio and logging, and a margin for an embedder's own files.
pub const FD_RESERVE: u64 = 32;

/// Connection cap used when the open-file limit cannot be read.
pub const FALLBACK_MAX_CONNECTIONS: usize = 10_000;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit when `raise` is set, and returns the soft
/// limit in force afterwards (`None` if it cannot be read).
pub(crate) fn fd_limit(raise: bool) -> Option<u64> {
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).ok()?;
    if raise && soft < hard {
        match rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard) {
            Ok(()) => return Some(hard),
            Err(e) => warn!("cannot raise the open-file limit from {soft} to {hard}: {e}"),
        }
    }
    Some(soft)
}

/// The effective connection cap: the configured one, clamped to what the fd limit allows after
/// [`FD_RESERVE`] and `own_fds` (listeners, the admin side) are kept back.
pub(crate) fn effective_max_connections(
    configured: Option<usize>,
    fd_limit: Option<u64>,
    own_fds: u64,
) -> usize {
    let reserve = FD_RESERVE + own_fds;
    let allowed = fd_limit.map(|l| l.saturating_sub(reserve).max(1) as usize);
    match (configured, allowed) {
        (None, Some(a)) => a,
        (None, None) => FALLBACK_MAX_CONNECTIONS,
        (Some(c), Some(a)) if c > a => {
            warn!(
                "max connections {c} is above what the open-file limit {} allows ({a} = limit - {reserve} reserved): using {a}",
                fd_limit.unwrap_or(0)
            );
            a
        }
        (Some(c), _) => c,
    }
}

/// Open descriptors of this process, from `/proc/self/fd` (None where it does not exist).
/// Blocking I/O on procfs: the loop calls it every few seconds, never per turn.
pub(crate) fn count_open_fds() -> Option<u64> {
    // The directory listing itself holds one descriptor: subtract it.
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(n.saturating_sub(1))
}

/// Connections per peer IP, kept only when a per-IP cap is configured.
#[derive(Debug, Default)]
pub(crate) struct PerIp {
    counts: HashMap<IpAddr, u32>,
}

impl PerIp {
    /// Counts one more connection from `ip` unless it already has `max`; returns whether admitted.
    pub(crate) fn try_add(&mut self, ip: IpAddr, max: usize) -> bool {
        let n = self.counts.entry(ip).or_insert(0);
        if *n as usize >= max {
            return false;
        }
        *n += 1;
        true
    }

    pub(crate) fn remove(&mut self, ip: IpAddr) {
        if let Some(n) = self.counts.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.counts.remove(&ip);
            }
        }
    }
}

const NIL: u32 = u32::MAX;

/// Least-recently-active order of connections, as a doubly linked list threaded through a side
/// `Vec` indexed by slab key: O(1) touch, O(1) removal, O(1) "longest idle" — no slab scan.
/// Kept only with the evict-idle policy, so the default loop pays nothing for it.
#[derive(Debug)]
pub(crate) struct Lru {
    /// `[prev, next]` per slab key.
    links: Vec<[u32; 2]>,
    head: u32,
    tail: u32,
}

impl Lru {
    pub(crate) fn new() -> Lru {
        Lru {
            links: Vec::new(),
            head: NIL,
            tail: NIL,
        }
    }

    /// The least recently active key.
    pub(crate) fn oldest(&self) -> Option<usize> {
        (self.head != NIL).then_some(self.head as usize)
    }

    /// Appends `key` as the most recently active (it must not be linked).
    pub(crate) fn push(&mut self, key: usize) {
        if self.links.len() <= key {
            self.links.resize(key + 1, [NIL, NIL]);
        }
        let k = key as u32;
        self.links[key] = [self.tail, NIL];
        if self.tail == NIL {
            self.head = k;
        } else {
            self.links[self.tail as usize][1] = k;
        }
        self.tail = k;
    }

    /// Unlinks `key` (it must be linked).
    pub(crate) fn remove(&mut self, key: usize) {
        let [prev, next] = self.links[key];
        if prev == NIL {
            self.head = next;
        } else {
            self.links[prev as usize][1] = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.links[next as usize][0] = prev;
        }
        self.links[key] = [NIL, NIL];
    }

    /// Marks `key` as the most recently active.
    pub(crate) fn touch(&mut self, key: usize) {
        if self.tail != key as u32 {
            self.remove(key);
            self.push(key);
        }
    }
}

/// Accept pausing after EMFILE/ENFILE, with libuv's spare-fd trick.
#[derive(Debug)]
pub(crate) struct AcceptGate {
    /// An open `/dev/null` held in reserve: closing it frees one descriptor, enough to accept
    /// (and at once close) what is queued instead of leaving those clients hanging.
    spare: Option<File>,
    /// While paused: the tick at which to try again (a close resumes earlier).
    pub(crate) paused_until: Option<Tick>,
    /// Connections shed since accepting first paused, for the resume message.
    pub(crate) shed: u64,
    /// Accepting failed for lack of descriptors and no connection was admitted since: the
    /// paused/resumed warnings are logged on this flag's transitions only.
    pub(crate) exhausted: bool,
}

impl AcceptGate {
    pub(crate) fn new() -> AcceptGate {
        AcceptGate {
            spare: File::open("/dev/null").ok(),
            paused_until: None,
            shed: 0,
            exhausted: false,
        }
    }

    /// Descriptors the gate holds (the spare).
    pub(crate) fn fds(&self) -> usize {
        usize::from(self.spare.is_some())
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.paused_until.is_some()
    }

    /// Releases the spare descriptor so that one `accept` can succeed.
    pub(crate) fn release_spare(&mut self) -> bool {
        self.spare.take().is_some()
    }

    /// Takes the spare descriptor back (it may fail while fds are still exhausted; then it is
    /// retried at the next resume).
    pub(crate) fn reclaim_spare(&mut self) {
        if self.spare.is_none() {
            self.spare = File::open("/dev/null").ok();
        }
    }
}

/// What an `accept` error means for the accept loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AcceptError {
    /// Nothing more to accept now.
    Drained,
    /// A transient failure of one connection (EINTR, ECONNABORTED, EPROTO): keep accepting.
    Retry,
    /// The process's descriptors are exhausted (EMFILE).
    ProcessFds,
    /// The system's descriptors or memory are exhausted (ENFILE, ENOBUFS, ENOMEM).
    SystemFds,
    /// Anything else: stop this round; the listener is retried later.
    Other,
}

/// Classifies an `accept` error.
pub(crate) fn classify_accept_error(err: &io::Error) -> AcceptError {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    const ENOBUFS: i32 = 105;
    const ENOMEM: i32 = 12;
    const EPROTO: i32 = 71;
    const EPERM: i32 = 1;
    match err.kind() {
        io::ErrorKind::WouldBlock => return AcceptError::Drained,
        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted => return AcceptError::Retry,
        _ => {}
    }
    match err.raw_os_error() {
        Some(EMFILE) => AcceptError::ProcessFds,
        Some(ENFILE | ENOBUFS | ENOMEM) => AcceptError::SystemFds,
        // EPROTO: a protocol error on the new connection; EPERM: a firewall refused it.
        Some(EPROTO | EPERM) => AcceptError::Retry,
        _ => AcceptError::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_orders_by_last_touch() {
        let mut l = Lru::new();
        assert_eq!(l.oldest(), None);
        for k in [3, 1, 7] {
            l.push(k);
        }
        assert_eq!(l.oldest(), Some(3));
        l.touch(3);
        assert_eq!(l.oldest(), Some(1));
        l.remove(1);
        assert_eq!(l.oldest(), Some(7));
        l.remove(3);
        l.remove(7);
        assert_eq!(l.oldest(), None);
        l.push(2);
        l.touch(2);
        assert_eq!(l.oldest(), Some(2));
    }

    #[test]
    fn per_ip_caps_each_address() {
        let mut p = PerIp::default();
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        assert!(p.try_add(a, 2) && p.try_add(a, 2));
        assert!(!p.try_add(a, 2));
        assert!(p.try_add(b, 2));
        p.remove(a);
        assert!(p.try_add(a, 2));
        p.remove(a);
        p.remove(a);
        p.remove(b);
        assert!(p.counts.is_empty());
    }

    #[test]
    fn cap_is_clamped_to_fd_limit() {
        assert_eq!(effective_max_connections(None, Some(20_000), 0), 19_968);
        assert_eq!(effective_max_connections(None, Some(20_000), 18), 19_950);
        assert_eq!(effective_max_connections(Some(50), Some(20_000), 1), 50);
        assert_eq!(effective_max_connections(Some(50_000), Some(1_000), 0), 968);
        assert_eq!(
            effective_max_connections(None, None, 1),
            FALLBACK_MAX_CONNECTIONS
        );
        assert_eq!(effective_max_connections(None, Some(10), 0), 1);
    }

    #[test]
    fn accept_errors_classify() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(classify_accept_error(&os(24)), AcceptError::ProcessFds);
        assert_eq!(classify_accept_error(&os(23)), AcceptError::SystemFds);
        assert_eq!(classify_accept_error(&os(103)), AcceptError::Retry); // ECONNABORTED
        assert_eq!(classify_accept_error(&os(4)), AcceptError::Retry); // EINTR
        assert_eq!(classify_accept_error(&os(11)), AcceptError::Drained); // EAGAIN
        assert_eq!(classify_accept_error(&os(22)), AcceptError::Other); // EINVAL
    }
}
