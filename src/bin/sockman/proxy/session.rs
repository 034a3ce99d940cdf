//! How a proxy session ended: HAProxy's two-letter termination state ("Session state at
//! disconnection" in its configuration manual), as far as it applies to an L4 proxy. The first
//! letter says who or what ended the session ([`Cause`]), the second in which phase
//! ([`Phase`]): `--` a normal end, `CD` the client aborted during the data phase, `sC` the
//! upstream's connect timed out, ...
//!
//! A session is one accepted client, from its accept to its close, whether a dial succeeded or
//! not; its state is decided by whichever side ended first (the proxy's own decisions included)
//! and counted once, when the client side closes. Each of its two connections carries a
//! [`Side`]: the client's says where the session is (dialing, relaying and the FINs passed on,
//! ended), which is what its phase is judged from.
//!
//! | state | meaning |
//! |---|---|
//! | `--` | normal end: both sides sent their FIN, everything was relayed |
//! | `CC`, `CD`, `CL` | the client aborted (reset, error, or a FIN before the upstream was connected) |
//! | `cR` | the client sent nothing within `--first-byte-timeout` |
//! | `cC`, `cD`, `cL` | a client-side timeout: the session idle (both sides) for `--idle-timeout`, or the client not reading for `--write-timeout` |
//! | `SC` | every dial failed: refused, unreachable or reset (after `--connect-tries`) |
//! | `sC` | every dial failed, the last one timed out (`--connect-timeout`) |
//! | `SD`, `SL` | the upstream aborted (reset, error) |
//! | `sD`, `sL` | an upstream-side timeout: the upstream not reading for `--write-timeout` |
//! | `PC` | the proxy refused the dial: at its connection cap |
//! | `PD`, `PL` | the proxy ended it by its own policy: `--max-lifetime`, an eviction at the cap |
//! | `RC` | a resource of the proxy ran out for the dial: descriptors, memory, local ports |
//! | `RD`, `RL` | a side's pending output would have passed `--max-pending` |
//! | `DC`, `DD`, `DL` | the proxy was stopping: the drain's deadline, a second signal |
//! | `I?` | an internal error of the proxy (never expected) |
//!
//! (The README has the same table, for operators.)
//!
//! The phases: `R` waiting for the client's first bytes (only `cR`), `C` waiting for the
//! upstream's connection (dialing, or between dials), `D` data flowing both ways, `L` one
//! direction already finished (its FIN passed on) while the other was still transferring, `-`
//! both finished. (HAProxy's `D` first letter is "server detected down"; nothing here kills
//! sessions on that, so it is the stop. HAProxy's `K`, `U`, `L` causes and `Q`, `H`, `T`
//! phases have no counterpart in an L4 proxy without queues, checks or HTTP.)

use std::fmt;

use sockman::{CloseReason, ConnId};

/// The first letter: who or what ended the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// `-`: nobody; both sides finished.
    Normal,
    /// `C`: the client aborted.
    Client,
    /// `S`: the upstream aborted or refused.
    Server,
    /// `P`: the proxy, by its policy (the cap, the lifetime).
    Proxy,
    /// `R`: a resource of the proxy ran out.
    Resource,
    /// `I`: an internal error.
    Internal,
    /// `D`: the proxy was stopping.
    Down,
    /// `c`: a client-side timeout.
    ClientTimeout,
    /// `s`: an upstream-side timeout.
    ServerTimeout,
}

/// Every cause, in [`End`]'s packing order, and its letter.
const CAUSES: [(Cause, char); 9] = [
    (Cause::Normal, '-'),
    (Cause::Client, 'C'),
    (Cause::Server, 'S'),
    (Cause::Proxy, 'P'),
    (Cause::Resource, 'R'),
    (Cause::Internal, 'I'),
    (Cause::Down, 'D'),
    (Cause::ClientTimeout, 'c'),
    (Cause::ServerTimeout, 's'),
];

/// The second letter: where the session was when it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// `R`: waiting for the client's first bytes.
    Request,
    /// `C`: waiting for the upstream's connection.
    Connect,
    /// `D`: data flowing both ways.
    Data,
    /// `L`: one direction finished, the other still transferring.
    Last,
    /// `-`: both directions finished.
    Done,
}

/// Every phase, in [`End`]'s packing order, and its letter.
const PHASES: [(Phase, char); 5] = [
    (Phase::Request, 'R'),
    (Phase::Connect, 'C'),
    (Phase::Data, 'D'),
    (Phase::Last, 'L'),
    (Phase::Done, '-'),
];

/// A termination state, packed into one byte (cause × phase) so that it fits a session's
/// client-side state without growing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct End(u8);

impl End {
    /// Distinct states, the counter slots of [`End::index`].
    pub(crate) const COUNT: usize = CAUSES.len() * PHASES.len();

    /// `--`.
    pub(crate) const NORMAL: End = End::new(Cause::Normal, Phase::Done);

    pub(crate) const fn new(cause: Cause, phase: Phase) -> End {
        End(cause as u8 * PHASES.len() as u8 + phase as u8)
    }

    /// Its counter slot.
    pub(crate) fn index(self) -> usize {
        self.0 as usize
    }

    /// The state of counter slot `i` (below [`End::COUNT`]).
    pub(crate) fn from_index(i: usize) -> End {
        End(i as u8)
    }

    /// The end of a session whose client side closed first, on its own, for `reason` (the
    /// core's) in `phase`.
    pub(crate) fn by_client(reason: CloseReason, phase: Phase) -> End {
        let cause = match reason {
            CloseReason::PeerClosed | CloseReason::Reset | CloseReason::Io(_) => Cause::Client,
            CloseReason::IdleTimeout | CloseReason::WriteStall => Cause::ClientTimeout,
            CloseReason::FirstByteTimeout => return End::new(Cause::ClientTimeout, Phase::Request),
            CloseReason::Overflow => Cause::Resource,
            CloseReason::Evicted | CloseReason::MaxLifetime => Cause::Proxy,
            CloseReason::Shutdown => Cause::Down,
            // The proxy closes a client only after deciding how its session ended: a close of
            // its own without that is a bug, as is a dial's reason on an accepted connection.
            _ => Cause::Internal,
        };
        End::new(cause, phase)
    }

    /// The end of a session whose upstream side closed first, for `reason`, in `phase` (its
    /// dial's failure, when every try failed: phase `C`).
    pub(crate) fn by_upstream(reason: CloseReason, phase: Phase) -> End {
        let cause = match reason {
            CloseReason::PeerClosed
            | CloseReason::Reset
            | CloseReason::Io(_)
            | CloseReason::ConnectRefused
            | CloseReason::Unreachable => Cause::Server,
            CloseReason::ConnectTimeout | CloseReason::WriteStall | CloseReason::IdleTimeout => {
                Cause::ServerTimeout
            }
            CloseReason::Overflow => Cause::Resource,
            CloseReason::Evicted => Cause::Proxy,
            CloseReason::Shutdown => Cause::Down,
            _ => Cause::Internal,
        };
        End::new(cause, phase)
    }
}

/// The two letters, e.g. `CD`.
impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (cause, phase) = (
            self.0 as usize / PHASES.len(),
            self.0 as usize % PHASES.len(),
        );
        write!(f, "{}{}", CAUSES[cause].1, PHASES[phase].1)
    }
}

/// A session's `index` while it has dialed no upstream.
pub(super) const NO_INDEX: u16 = u16::MAX;
/// [`Side::Relaying`]'s `fins`: the client's FIN was passed on to the upstream...
pub(super) const CLIENT_FIN: u8 = 1;
/// ...the upstream's to the client.
pub(super) const UPSTREAM_FIN: u8 = 2;

/// One side of a session: the handler state of each connection. The client side goes from
/// `Client` (dialing) to `Relaying` (connected) to `Ended` (the proxy decided how the session
/// ended, and closes it); its phase is the session's.
#[derive(Debug)]
pub(crate) enum Side {
    /// The accepted connection while its upstream is dialed. `upstream` is [`ConnId::NONE`]
    /// only between a failed dial and the next (not an `Option`: a session's two sides fit 16
    /// bytes each this way).
    Client {
        upstream: ConnId,
        index: u16,
        tries: u8,
    },
    /// The accepted connection once its upstream is connected; `fins`: [`CLIENT_FIN`] and
    /// [`UPSTREAM_FIN`], the FINs passed on so far.
    Relaying {
        upstream: ConnId,
        index: u16,
        fins: u8,
    },
    /// The accepted connection once the proxy decided how its session ended (it is closing):
    /// `end`, counted when it closes. `index` is [`NO_INDEX`] if no dial was tried.
    Ended {
        upstream: ConnId,
        index: u16,
        end: End,
    },
    /// The dialed connection.
    Upstream {
        client: ConnId,
        index: u16,
        connected: bool,
    },
}

impl Side {
    pub(super) fn peer(&self) -> Option<ConnId> {
        match *self {
            Side::Client { upstream, .. }
            | Side::Relaying { upstream, .. }
            | Side::Ended { upstream, .. } => (upstream != ConnId::NONE).then_some(upstream),
            Side::Upstream { client, .. } => Some(client),
        }
    }

    pub(super) fn index(&self) -> usize {
        match *self {
            Side::Client { index, .. }
            | Side::Relaying { index, .. }
            | Side::Ended { index, .. }
            | Side::Upstream { index, .. } => index as usize,
        }
    }

    pub(super) fn is_client(&self) -> bool {
        !matches!(self, Side::Upstream { .. })
    }

    /// The phase of this client side's session.
    pub(super) fn phase(&self) -> Phase {
        match *self {
            Side::Relaying { fins: 0, .. } => Phase::Data,
            Side::Relaying { .. } => Phase::Last,
            _ => Phase::Connect,
        }
    }

    /// Decides that this client side's session ended with `end`, unless that was decided
    /// before (the first decision stands).
    pub(super) fn end(&mut self, end: End) {
        if let Side::Client {
            upstream, index, ..
        }
        | Side::Relaying {
            upstream, index, ..
        } = *self
        {
            *self = Side::Ended {
                upstream,
                index,
                end,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_pack_into_a_byte_and_print_as_haproxy_does() {
        assert_eq!(End::NORMAL.to_string(), "--");
        assert_eq!(End::new(Cause::Client, Phase::Data).to_string(), "CD");
        assert_eq!(
            End::new(Cause::ServerTimeout, Phase::Connect).to_string(),
            "sC"
        );
        for i in 0..End::COUNT {
            let end = End::from_index(i);
            assert_eq!(end.index(), i);
            assert_eq!(end.to_string().chars().count(), 2);
        }
        assert_eq!(std::mem::size_of::<End>(), 1);
    }

    #[test]
    fn close_reasons_map_to_who_ended_the_session() {
        let d = Phase::Data;
        let client = |r| End::by_client(r, d).to_string();
        let upstream = |r| End::by_upstream(r, d).to_string();
        assert_eq!(client(CloseReason::Reset), "CD");
        assert_eq!(client(CloseReason::WriteStall), "cD");
        assert_eq!(client(CloseReason::IdleTimeout), "cD");
        assert_eq!(client(CloseReason::FirstByteTimeout), "cR");
        assert_eq!(client(CloseReason::Shutdown), "DD");
        assert_eq!(client(CloseReason::MaxLifetime), "PD");
        assert_eq!(client(CloseReason::Overflow), "RD");
        assert_eq!(client(CloseReason::Handler), "ID");
        assert_eq!(upstream(CloseReason::Reset), "SD");
        assert_eq!(upstream(CloseReason::WriteStall), "sD");
        let c = Phase::Connect;
        assert_eq!(
            End::by_upstream(CloseReason::ConnectRefused, c).to_string(),
            "SC"
        );
        assert_eq!(
            End::by_upstream(CloseReason::ConnectTimeout, c).to_string(),
            "sC"
        );
    }
}
