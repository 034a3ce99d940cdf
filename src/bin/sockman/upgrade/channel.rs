//! The upgrade's channel between the old process and its successor: a `SOCK_SEQPACKET` unix
//! socket at an abstract address (Linux; no file to clean up, gone with its process), one text
//! message per packet with at most one descriptor attached (`SCM_RIGHTS`). Sequenced packets
//! keep message boundaries, so a descriptor always arrives with the message that describes it.
//! Everything is safe code over `rustix`: received descriptors come as `OwnedFd`s, close-on-exec
//! (`MSG_CMSG_CLOEXEC`), so a later upgrade's child never inherits them by accident.
//!
//! Abstract addresses have no permissions: anyone in the network namespace may connect. Both
//! ends therefore check who is at the other end (`SO_PEERCRED`): the old process accepts only
//! the successor it spawned, the successor talks only to its parent.

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::net::{
    accept_with, bind, connect, listen, recvmsg, sendmsg, socket_with, sockopt, AddressFamily,
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

/// Longest message: a listener's description is well under it.
const MAX_MESSAGE: usize = 1024;

/// How often a wait asks whether to go on waiting (is the other process still alive, is this
/// one stopping?).
const LIVENESS: Duration = Duration::from_millis(50);

/// Asked every [`LIVENESS`] while a wait lasts: an error ends the wait with it.
pub(super) type Check<'a> = &'a mut dyn FnMut() -> io::Result<()>;

/// The old process's listening end, at an abstract address.
#[derive(Debug)]
pub(super) struct Listening {
    fd: OwnedFd,
}

/// One end of an established channel.
#[derive(Debug)]
pub(super) struct Channel {
    fd: OwnedFd,
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

fn abstract_addr(name: &str) -> io::Result<SocketAddrUnix> {
    Ok(SocketAddrUnix::new_abstract_name(name.as_bytes())?)
}

impl Listening {
    /// Listens at the abstract address `name`.
    pub(super) fn bind(name: &str) -> io::Result<Listening> {
        let fd = seqpacket()?;
        bind(&fd, &abstract_addr(name)?)?;
        listen(&fd, 4)?;
        Ok(Listening { fd })
    }

    /// Waits until `deadline` for the process `pid` to connect; connections from any other
    /// process are closed (and named in `strangers`). `check` may end the wait early.
    pub(super) fn accept_from(
        &self,
        pid: u32,
        deadline: Instant,
        check: Check<'_>,
        strangers: &mut Vec<u32>,
    ) -> io::Result<Channel> {
        loop {
            wait_readable(self.fd.as_fd(), deadline, check)?;
            let channel = Channel {
                fd: accept_with(&self.fd, SocketFlags::CLOEXEC)?,
            };
            let peer = channel.peer_pid()?;
            if peer == pid {
                return Ok(channel);
            }
            strangers.push(peer);
        }
    }
}

impl Channel {
    /// Connects to the abstract address `name`.
    pub(super) fn connect(name: &str) -> io::Result<Channel> {
        let fd = seqpacket()?;
        connect(&fd, &abstract_addr(name)?)?;
        Ok(Channel { fd })
    }

    /// The process at the other end (as it was when the connection was made).
    pub(super) fn peer_pid(&self) -> io::Result<u32> {
        let cred = sockopt::socket_peercred(&self.fd)?;
        Ok(cred.pid.as_raw_nonzero().get() as u32)
    }

    /// A send blocks at most `timeout` (a peer that stops reading cannot hold this end).
    pub(super) fn set_send_timeout(&self, timeout: Duration) -> io::Result<()> {
        let timeout = timeout.max(Duration::from_millis(1));
        Ok(sockopt::set_socket_timeout(
            &self.fd,
            sockopt::Timeout::Send,
            Some(timeout),
        )?)
    }

    /// Sends `text` as one message, with `fd` attached if given.
    pub(super) fn send(&self, text: &str, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let fds = fd.as_slice();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(io::Error::other("no room for a descriptor in the message"));
        }
        let sent = loop {
            match sendmsg(
                &self.fd,
                &[io::IoSlice::new(text.as_bytes())],
                &mut control,
                SendFlags::NOSIGNAL,
            ) {
                Ok(n) => break n,
                // A signal (SIGUSR2 again, say) on this thread: the send timeout makes it fail
                // with EINTR even under SA_RESTART.
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::AGAIN) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the other end does not read",
                    ))
                }
                Err(e) => return Err(e.into()),
            }
        };
        if sent != text.len() {
            return Err(io::Error::other("a message was cut short"));
        }
        Ok(())
    }

    /// Waits until `deadline` for the next message and the descriptor attached to it, if any;
    /// `None` when the other end has closed. `check` may end the wait early.
    pub(super) fn recv(
        &self,
        deadline: Instant,
        check: Check<'_>,
    ) -> io::Result<Option<(String, Option<OwnedFd>)>> {
        wait_readable(self.fd.as_fd(), deadline, check)?;
        let mut buf = [0u8; MAX_MESSAGE];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = recvmsg(
            &self.fd,
            &mut [io::IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        let mut fds: Vec<OwnedFd> = Vec::new();
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = m {
                fds.extend(rights);
            }
        }
        if msg.flags.contains(ReturnFlags::TRUNC) || msg.flags.contains(ReturnFlags::CTRUNC) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a message or its descriptors did not fit (more than one descriptor?)",
            ));
        }
        if msg.bytes == 0 && fds.is_empty() {
            return Ok(None);
        }
        if fds.len() > 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} descriptors in one message (one at most)", fds.len()),
            ));
        }
        let text = String::from_utf8(buf[..msg.bytes].to_vec())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a message is not UTF-8"))?;
        Ok(Some((text, fds.pop())))
    }
}

/// Waits until `fd` is readable (or hung up), until `deadline` (then fails with `TimedOut`),
/// asking `check` every [`LIVENESS`] whether to go on.
fn wait_readable(fd: BorrowedFd<'_>, deadline: Instant, check: Check<'_>) -> io::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
        }
        if poll_for(fd, left.min(LIVENESS))? {
            return Ok(());
        }
        check()?;
    }
}

/// A [`Check`] that never ends a wait.
pub(super) fn wait_on() -> io::Result<()> {
    Ok(())
}

/// One `poll` for readability, at most `wait`; whether `fd` is ready.
fn poll_for(fd: BorrowedFd<'_>, wait: Duration) -> io::Result<bool> {
    let timeout = Timespec::try_from(wait).unwrap_or(Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    });
    let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
    match poll(&mut fds, Some(&timeout)) {
        Ok(n) => Ok(n > 0),
        Err(rustix::io::Errno::INTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_carries_its_descriptor_and_the_close_is_seen() {
        let name = format!("sockman-test-channel-{}", std::process::id());
        let listening = Listening::bind(&name).unwrap();
        let client = Channel::connect(&name).unwrap();
        let server = Channel {
            fd: accept_with(&listening.fd, SocketFlags::CLOEXEC).unwrap(),
        };
        assert_eq!(server.peer_pid().unwrap(), std::process::id());
        let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        client.send("first", None).unwrap();
        client.send("second", Some(socket.as_fd())).unwrap();
        drop(client);
        let deadline = Instant::now() + Duration::from_secs(5);
        let (text, fd) = server.recv(deadline, &mut wait_on).unwrap().unwrap();
        assert_eq!((text.as_str(), fd.is_none()), ("first", true));
        let (text, fd) = server.recv(deadline, &mut wait_on).unwrap().unwrap();
        assert_eq!(text, "second");
        let got = std::net::TcpListener::from(fd.unwrap());
        assert_eq!(got.local_addr().unwrap(), addr, "the same socket");
        assert!(
            server.recv(deadline, &mut wait_on).unwrap().is_none(),
            "EOF"
        );
    }
}
