//! Admission control: the connection cap and its eviction order, the per-IP cap, and accept
//! pausing after fd exhaustion. Pure bookkeeping: this module owns no socket and no poll; the
//! server asks it and acts.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use log::warn;

use crate::reason::AcceptError;
use crate::time::Tick;

/// File descriptors kept back from the connection cap for the process as a whole, besides what
/// each loop opens itself (its epoll fd, waker, timerfd, spare, listeners and admin side): stdio,
/// logging, a signal thread's pipe, the leak check's listing, and a margin for an embedder's
/// own files. One loop on Linux with one listener keeps back 33 in all.
pub const FD_RESERVE: u64 = 28;

/// Admin connections open at once: the admin endpoint's own cap.
#[cfg_attr(not(feature = "admin"), allow(dead_code))]
pub(crate) const ADMIN_CONNS: usize = 16;

/// Descriptors the admin side may hold at most (its listener and connections), kept back from
/// the connection cap when it is on; none without the `admin` feature (it cannot be on).
pub(crate) const ADMIN_FDS: u64 = if cfg!(feature = "admin") {
    1 + ADMIN_CONNS as u64
} else {
    0
};

/// The descriptors one loop holds besides its connections, in one place: what the cap keeps
/// back for each loop ([`LoopFds::planned`], for [`Server`](crate::Server) and each of a group's
/// [`Workers`](crate::Workers)), and what the leak self-check counts as the loop's own (the
/// actual ones).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoopFds {
    /// The deadline timerfd (Linux).
    pub(crate) alarm: bool,
    /// The accept gate's spare descriptor.
    pub(crate) spare: bool,
    /// One per data listener.
    pub(crate) listeners: usize,
    /// The admin listener and its connections (at most [`ADMIN_FDS`]).
    pub(crate) admin: u64,
}

impl LoopFds {
    /// The epoll fd and the waker's eventfd: every loop has both.
    const POLL: u64 = 2;

    /// The most a loop with `listeners` listeners (and the admin endpoint if `admin`) holds.
    pub(crate) fn planned(listeners: usize, admin: bool) -> LoopFds {
        LoopFds {
            alarm: cfg!(target_os = "linux"),
            spare: true,
            listeners,
            admin: if admin { ADMIN_FDS } else { 0 },
        }
    }

    /// How many descriptors that is.
    pub(crate) fn total(&self) -> u64 {
        Self::POLL
            + u64::from(self.alarm)
            + u64::from(self.spare)
            + self.listeners as u64
            + self.admin
    }
}

/// The connection cap of a group of workers, shared: one count of the group's open
/// connections (slab entries: open, connecting, lingering, awaiting a header) that every
/// worker's admission, accept and dial alike, takes a place in before it inserts a connection
/// and gives back when it removes one. So the group holds at most `max` whatever worker the
/// kernel's `SO_REUSEPORT` hash picks, and readiness judges the group. One loop alone has none:
/// its slab's length is its count (no atomic on its hot path).
#[derive(Debug)]
pub(crate) struct SharedCap {
    open: AtomicUsize,
    max: usize,
}

impl SharedCap {
    pub(crate) fn new(max: usize) -> SharedCap {
        SharedCap {
            open: AtomicUsize::new(0),
            max,
        }
    }

    /// Takes a place if one is free; returns whether it did.
    pub(crate) fn try_take(&self) -> bool {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives a place back (a connection was removed, or an admission failed after taking it).
    pub(crate) fn give_back(&self) {
        let was = self.open.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(was > 0, "a place given back that was never taken");
    }

    /// The group's open connections now.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// The group's cap.
    pub(crate) fn max(&self) -> usize {
        self.max
    }
}

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
/// [`FD_RESERVE`] and `own_fds` (every loop's own: [`LoopFds`]) are kept back.
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
///
/// Since Linux 6.2 the `stat` size of `/proc/PID/fd` is the number of open descriptors: one
/// syscall whose cost does not grow with them. Older kernels report 0 there, and the directory
/// is listed instead: O(fds), about 1.5 µs per descriptor here (see BENCHMARKS.md), so the loop
/// calls this every few seconds, never per turn.
pub(crate) fn count_open_fds() -> Option<u64> {
    match std::fs::metadata("/proc/self/fd") {
        Ok(meta) if meta.len() > 0 => Some(meta.len()),
        Ok(_) => count_open_fds_by_listing(),
        Err(_) => None,
    }
}

/// [`count_open_fds`] for kernels before 6.2: lists `/proc/self/fd`.
pub(crate) fn count_open_fds_by_listing() -> Option<u64> {
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

    /// Whether `key` is in the list (a dialed connection joins only once it has connected).
    fn is_linked(&self, key: usize) -> bool {
        key < self.links.len() && (self.links[key] != [NIL, NIL] || self.head == key as u32)
    }

    /// Unlinks `key`, if it is linked.
    pub(crate) fn remove(&mut self, key: usize) {
        if !self.is_linked(key) {
            return;
        }
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

    /// Marks `key` as the most recently active (if it is linked).
    pub(crate) fn touch(&mut self, key: usize) {
        if self.tail != key as u32 && self.is_linked(key) {
            self.remove(key);
            self.push(key);
        }
    }
}

/// Whether the listeners are accepted from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GateState {
    /// Accepting.
    Open,
    /// Not accepting until this tick (or a close, for fd exhaustion).
    Paused { until: Tick },
    /// A descriptor came free while paused: accept again at this turn's end.
    Resume,
}

/// Accept pausing after EMFILE/ENFILE (with libuv's spare-fd trick), ENOBUFS/ENOMEM, or a turn
/// whose accepts all failed. The gate owns its state transitions; the server asks it
/// ([`is_paused`](Self::is_paused), [`take_resume`](Self::take_resume),
/// [`poll_at`](Self::poll_at)) and reports to it ([`exhausted`](Self::exhausted),
/// [`pause`](Self::pause), [`on_close`](Self::on_close), [`on_admit`](Self::on_admit)).
#[derive(Debug)]
pub(crate) struct AcceptGate {
    state: GateState,
    /// An open `/dev/null` held in reserve: closing it frees one descriptor, enough to accept
    /// (and at once close) what is queued instead of leaving those clients hanging.
    spare: Option<File>,
    /// Connections shed since accepting first paused, for the resume message.
    shed: u64,
    /// Accepting failed for lack of descriptors or memory and no connection was admitted
    /// since: the paused/resumed warnings are logged on this flag's transitions only.
    exhausted: bool,
    /// Pauses since the last admitted connection, for the resume message.
    pauses: u64,
}

impl AcceptGate {
    pub(crate) fn new() -> AcceptGate {
        AcceptGate {
            state: GateState::Open,
            spare: File::open("/dev/null").ok(),
            shed: 0,
            exhausted: false,
            pauses: 0,
        }
    }

    /// Descriptors the gate holds (the spare).
    pub(crate) fn fds(&self) -> usize {
        usize::from(self.spare.is_some())
    }

    /// Listener events are ignored while paused (a resume accepts by itself: edge-triggered
    /// listeners give no new event for connections already queued).
    pub(crate) fn is_paused(&self) -> bool {
        matches!(self.state, GateState::Paused { .. })
    }

    /// When the loop must wake for the gate: the end of a pause, or now for a resume.
    pub(crate) fn poll_at(&self) -> Option<Tick> {
        match self.state {
            GateState::Open => None,
            GateState::Paused { until } => Some(until),
            GateState::Resume => Some(0),
        }
    }

    /// Out of descriptors (EMFILE/ENFILE): releases the spare so that the caller can shed the
    /// backlog (returns whether it may), and pauses until a close or `now + retry`.
    /// Returns `(may_shed, first)`: `first` is the transition to log.
    pub(crate) fn exhausted(&mut self, now: Tick, retry: Tick) -> (bool, bool) {
        let shed = self.spare.take().is_some();
        (shed, self.pause(now, retry))
    }

    /// Counts connections shed with the spare descriptor, and takes it back (it may fail while
    /// descriptors are still exhausted; then it is retried at the next resume).
    pub(crate) fn shed(&mut self, n: u64) {
        self.shed += n;
        self.reclaim_spare();
    }

    /// Pauses accepting until `now + retry` (ENOBUFS/ENOMEM, or nothing but errors in a turn:
    /// no shedding, a fd would not help). Returns whether this is the transition to log.
    pub(crate) fn pause(&mut self, now: Tick, retry: Tick) -> bool {
        self.state = GateState::Paused {
            until: crate::time::deadline(now, retry),
        };
        self.pauses += 1;
        !std::mem::replace(&mut self.exhausted, true)
    }

    /// A connection closed: a paused accept resumes at this turn's end (for every kind of pause:
    /// a freed descriptor or buffer is what each of them waits for).
    pub(crate) fn on_close(&mut self) {
        if self.is_paused() {
            self.state = GateState::Resume;
        }
    }

    /// Whether a pause is over now (its time came, or a close resumed it); if so the gate is
    /// open again and the spare is taken back.
    pub(crate) fn take_resume(&mut self, now: Tick) -> bool {
        let due = match self.state {
            GateState::Open => false,
            GateState::Paused { until } => until <= now,
            GateState::Resume => true,
        };
        if due {
            self.state = GateState::Open;
            self.reclaim_spare();
        }
        due
    }

    /// Opens the gate whatever its state (the listeners are closing: a pause is moot).
    pub(crate) fn reset(&mut self) {
        self.state = GateState::Open;
        self.reclaim_spare();
    }

    /// A connection was admitted: if accepting had been failing, returns `(shed, pauses)` since
    /// then, for the one "resumed" message of the transition.
    pub(crate) fn on_admit(&mut self) -> Option<(u64, u64)> {
        if !self.exhausted {
            return None;
        }
        self.exhausted = false;
        Some((
            std::mem::take(&mut self.shed),
            std::mem::take(&mut self.pauses),
        ))
    }

    fn reclaim_spare(&mut self) {
        if self.spare.is_none() {
            self.spare = File::open("/dev/null").ok();
        }
    }
}

/// Classifies an `accept` error: `None` for WouldBlock (nothing more to accept now, not an
/// error).
pub(crate) fn classify_accept_error(err: &io::Error) -> Option<AcceptError> {
    if err.kind() == io::ErrorKind::WouldBlock {
        return None;
    }
    Some(match err.raw_os_error() {
        Some(libc::EMFILE) => AcceptError::ProcessFds,
        Some(libc::ENFILE) => AcceptError::SystemFds,
        Some(libc::ENOBUFS | libc::ENOMEM) => AcceptError::Memory,
        Some(
            libc::EINTR
            | libc::ECONNABORTED
            | libc::EPERM
            | libc::EPROTO
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH
            | libc::ETIMEDOUT,
        ) => AcceptError::Connection,
        _ => AcceptError::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_count_from_stat_matches_the_listing() {
        // Both see the same table (this test's own process; other tests' threads may open and
        // close sockets meanwhile, hence the retry until two readings agree).
        for _ in 0..100 {
            let a = count_open_fds_by_listing().unwrap();
            let b = count_open_fds().unwrap();
            let c = count_open_fds_by_listing().unwrap();
            if a == b && b == c {
                return;
            }
        }
        panic!("the stat size of /proc/self/fd never matched its listing");
    }

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
        // Keys that were never linked (a dial that closed before connecting) change nothing.
        l.remove(9);
        l.remove(0);
        l.touch(5);
        assert_eq!(l.oldest(), Some(2));
        l.push(4);
        l.remove(7);
        assert_eq!(l.oldest(), Some(2));
        l.remove(2);
        assert_eq!(l.oldest(), Some(4));
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
    fn a_shared_cap_admits_exactly_max_across_threads() {
        let cap = std::sync::Arc::new(SharedCap::new(100));
        let taken: usize = (0..4)
            .map(|_| {
                let cap = std::sync::Arc::clone(&cap);
                std::thread::spawn(move || (0..60).filter(|_| cap.try_take()).count())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!((taken, cap.open()), (100, 100));
        assert!(!cap.try_take());
        cap.give_back();
        assert!(cap.try_take());
        assert_eq!(cap.max(), 100);
    }

    #[test]
    fn a_loop_keeps_back_every_descriptor_it_opens() {
        let linux = u64::from(cfg!(target_os = "linux"));
        // epoll, waker, spare, the listener (and the timerfd on Linux)...
        assert_eq!(LoopFds::planned(1, false).total(), 4 + linux);
        // ...and the admin listener with its connections.
        assert_eq!(LoopFds::planned(2, true).total(), 5 + linux + ADMIN_FDS);
        // Without the timer and the spare (as the leak check may find them).
        let actual = LoopFds {
            alarm: false,
            spare: false,
            listeners: 1,
            admin: 0,
        };
        assert_eq!(actual.total(), 3);
    }

    #[test]
    fn cap_is_clamped_to_fd_limit() {
        assert_eq!(effective_max_connections(None, Some(20_000), 0), 19_972);
        assert_eq!(effective_max_connections(None, Some(20_000), 18), 19_954);
        assert_eq!(effective_max_connections(Some(50), Some(20_000), 1), 50);
        assert_eq!(effective_max_connections(Some(50_000), Some(1_000), 0), 972);
        assert_eq!(
            effective_max_connections(None, None, 1),
            FALLBACK_MAX_CONNECTIONS
        );
        assert_eq!(effective_max_connections(None, Some(10), 0), 1);
    }

    #[test]
    fn accept_errors_classify() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(
            classify_accept_error(&os(libc::EMFILE)),
            Some(AcceptError::ProcessFds)
        );
        assert_eq!(
            classify_accept_error(&os(libc::ENFILE)),
            Some(AcceptError::SystemFds)
        );
        // Memory shortage pauses without shedding: a spare descriptor would not help.
        assert_eq!(
            classify_accept_error(&os(libc::ENOBUFS)),
            Some(AcceptError::Memory)
        );
        assert_eq!(
            classify_accept_error(&os(libc::ENOMEM)),
            Some(AcceptError::Memory)
        );
        // The new connection's pending network errors (accept(2)) are retried like EAGAIN,
        // never a reason to shed the backlog.
        for errno in [
            libc::ENETDOWN,
            libc::EPROTO,
            libc::ENOPROTOOPT,
            libc::EHOSTDOWN,
            libc::ENONET,
            libc::EHOSTUNREACH,
            libc::EOPNOTSUPP,
            libc::ENETUNREACH,
            libc::ECONNABORTED,
            libc::EINTR,
            libc::EPERM,
        ] {
            assert_eq!(
                classify_accept_error(&os(errno)),
                Some(AcceptError::Connection),
                "errno {errno}"
            );
        }
        assert_eq!(classify_accept_error(&os(libc::EAGAIN)), None);
        assert_eq!(
            classify_accept_error(&os(libc::EINVAL)),
            Some(AcceptError::Other)
        );
    }

    #[test]
    fn gate_pauses_resumes_and_logs_transitions_once() {
        let mut g = AcceptGate::new();
        assert!(!g.is_paused() && g.poll_at().is_none());
        let (may_shed, first) = g.exhausted(10, 5);
        assert!(may_shed && first);
        g.shed(3);
        assert!(g.is_paused());
        // Never early: the stamp is rounded down, so a full tick more.
        assert_eq!(g.poll_at(), Some(16));
        assert!(!g.take_resume(15));
        assert!(g.take_resume(16));
        assert!(!g.is_paused());
        // Failing again before anything was admitted is not a new transition.
        let (_, first) = g.exhausted(20, 5);
        assert!(!first);
        // A close resumes at once.
        g.on_close();
        assert_eq!(g.poll_at(), Some(0));
        assert!(g.take_resume(21));
        assert_eq!(g.on_admit(), Some((3, 2)));
        assert_eq!(g.on_admit(), None);
        // A memory pause sheds nothing.
        assert!(g.pause(30, 5));
        assert_eq!(g.poll_at(), Some(36));
    }
}
