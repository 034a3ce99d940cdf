//! The loop's wake-up for deadlines: a `timerfd` in the poll, armed only when the next
//! deadline moves earlier, so that the poll itself waits without a timeout.
//!
//! Why: an `epoll_wait` with a timeout arms and cancels a kernel high-resolution timer on every
//! call. The loop waits once per turn, and its next deadline (a 60 s idle timeout, re-armed
//! lazily) almost never changes from one turn to the next, so that timer work is done again and
//! again for nothing. Measured with `sockman serve` at one connection in ping-pong (9 runs,
//! interleaved): 5 % of the server's CPU per echo, the gap to a C server that waits with no
//! timeout. A `timerfd` armed once keeps its kernel timer across any number of waits.
//!
//! Invariant: when armed for a tick, the timer fires no later than that tick begins. A later
//! next deadline keeps the earlier alarm (it fires early, the loop turns, finds nothing due, and
//! re-arms): cheaper than re-arming every time the deadline moves later.
//!
//! Only [`Server::turn`](crate::Server::turn) (real time) uses it; with time as an input
//! ([`Server::turn_at`](crate::Server::turn_at)) the poll timeout is computed from the given
//! `now` as before.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use rustix::time::{
    timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags,
};

/// A timerfd registered in the loop's poll.
#[derive(Debug)]
pub(crate) struct Alarm {
    fd: OwnedFd,
    /// The instant it is armed for, if armed.
    armed: Option<Instant>,
}

impl Alarm {
    pub(crate) fn new(registry: &Registry, token: Token) -> io::Result<Alarm> {
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        registry.register(&mut SourceFd(&fd.as_raw_fd()), token, Interest::READABLE)?;
        Ok(Alarm { fd, armed: None })
    }

    /// Makes sure the alarm fires by `at`: arms it if it is not armed or armed for later (one
    /// `timerfd_settime`), else leaves it (no syscall).
    pub(crate) fn ensure(&mut self, at: Instant) -> io::Result<()> {
        if self.armed.is_some_and(|a| a <= at) {
            return Ok(());
        }
        // Relative to now; a zero value would disarm, so at least a nanosecond.
        let wait = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_nanos(1));
        let value = Itimerspec {
            it_interval: rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: rustix::time::Timespec {
                tv_sec: wait.as_secs().min(i64::MAX as u64) as i64,
                tv_nsec: wait.subsec_nanos() as _,
            },
        };
        timerfd_settime(&self.fd, TimerfdTimerFlags::empty(), &value)?;
        self.armed = Some(at);
        Ok(())
    }

    /// The alarm fired (its event): clears it. Reads the expiration count, so that the fd is not
    /// readable again until the next expiry.
    pub(crate) fn fired(&mut self) {
        let mut count = [0u8; 8];
        let _ = rustix::io::read(&self.fd, &mut count);
        self.armed = None;
    }
}
