//! `--source-addrs`: each new socket is bound to the next source address, round-robin, and to
//! a port the generator chooses instead of the kernel.
//!
//! Invariant: a port bound here lies outside the kernel's ephemeral range
//! (`ip_local_port_range`) unless that leaves fewer than [`MIN_SOURCE_PORTS`], so the sockets
//! a run leaves in TIME_WAIT never starve the kernel's own port choice (later runs, other
//! programs).

use std::io::{self, ErrorKind};
use std::net::{IpAddr, SocketAddr};

use socket2::Socket;

/// Lowest port bound explicitly with `--source-addrs` (below are the well-known ports).
const FIRST_SOURCE_PORT: u16 = 1024;

/// Fewest ports worth keeping outside the ephemeral range; below it `--source-addrs` uses
/// every port from [`FIRST_SOURCE_PORT`] up.
const MIN_SOURCE_PORTS: u32 = 4096;

/// Ports tried per socket when binding a source address finds them in use.
const BIND_ATTEMPTS: usize = 64;

/// The source addresses of a run and, per address, where the next port search starts.
#[derive(Debug)]
pub(super) struct Sources<'a> {
    /// `--source-addrs`; empty: the kernel chooses address and port at connect.
    addrs: &'a [IpAddr],
    /// Round-robin position in `addrs`.
    next: usize,
    /// Ports bound explicitly (see [`bind_source`]).
    ports: PortSpace,
    /// Next index into `ports`, per address.
    cursors: Vec<u32>,
}

impl<'a> Sources<'a> {
    /// The sources for `addrs`, with the port space of this host.
    pub(super) fn new(addrs: &'a [IpAddr]) -> Sources<'a> {
        Sources {
            addrs,
            next: 0,
            ports: PortSpace::for_host(),
            cursors: vec![first_source_cursor(); addrs.len()],
        }
    }

    /// Binds `socket`, with SO_REUSEADDR, to the next source address and a port of it; without
    /// source addresses does nothing.
    pub(super) fn bind_next(&mut self, socket: &Socket) -> io::Result<()> {
        if self.addrs.is_empty() {
            return Ok(());
        }
        let i = self.next % self.addrs.len();
        self.next = self.next.wrapping_add(1);
        socket.set_reuse_address(true)?;
        bind_source(socket, self.addrs[i], &self.ports, &mut self.cursors[i])
    }
}

/// Binds `socket` to `ip` and the next port of `ports` from `cursor`.
///
/// Why not port 0: the kernel then searches for a port with no owner at all, and with
/// thousands of TIME_WAIT sockets on the address each bind scans most of the range: idle runs
/// spent most of their time in the kernel and lost connections, churn slowed to a crawl. A
/// chosen port with SO_REUSEADDR is one hash lookup (figures: "Load generator design figures"
/// in BENCHMARKS.md), and connect() accepts a TIME_WAIT 4-tuple on loopback
/// (tcp_tw_reuse = 2, the default). A port held by a listener or by a socket without
/// SO_REUSEADDR fails with AddrInUse and the next one is tried, [`BIND_ATTEMPTS`] times.
fn bind_source(socket: &Socket, ip: IpAddr, ports: &PortSpace, cursor: &mut u32) -> io::Result<()> {
    let mut last = io::Error::from(ErrorKind::AddrInUse);
    for _ in 0..BIND_ATTEMPTS {
        let port = ports.port(*cursor);
        *cursor = cursor.wrapping_add(1);
        match socket.bind(&SocketAddr::new(ip, port).into()) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::AddrInUse => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// The ports `--source-addrs` binds explicitly: 1024–65535 *outside* the kernel's ephemeral
/// range (`ip_local_port_range`, default 32768–60999), i.e. 36 280 per address by default.
///
/// Why outside: a port bound explicitly gets a bind bucket that the kernel's own connect-time
/// port choice skips for as long as any socket on it lives, TIME_WAIT included, on *every*
/// address. Binding inside the range left later runs without `--source-addrs` (and anything
/// else on the machine) out of ephemeral ports for a minute: most of their connects failed
/// with addr_not_available (see BENCHMARKS.md).
#[derive(Debug, Clone, PartialEq, Eq)]
struct PortSpace {
    /// Disjoint inclusive ranges, ascending.
    ranges: Vec<(u16, u16)>,
    /// Ports in all ranges (at least 1).
    total: u32,
}

impl PortSpace {
    /// The ports from [`FIRST_SOURCE_PORT`] to 65535 minus the ephemeral range
    /// `lo..=hi`; the whole of them if that leaves fewer than [`MIN_SOURCE_PORTS`].
    fn outside(lo: u16, hi: u16) -> PortSpace {
        let mut ranges = Vec::new();
        if lo > FIRST_SOURCE_PORT {
            ranges.push((FIRST_SOURCE_PORT, lo - 1));
        }
        if hi < u16::MAX {
            ranges.push((hi.saturating_add(1).max(FIRST_SOURCE_PORT), u16::MAX));
        }
        let space = PortSpace::from_ranges(ranges);
        if space.total < MIN_SOURCE_PORTS {
            PortSpace::from_ranges(vec![(FIRST_SOURCE_PORT, u16::MAX)])
        } else {
            space
        }
    }

    fn from_ranges(ranges: Vec<(u16, u16)>) -> PortSpace {
        let total = ranges
            .iter()
            .map(|&(a, b)| u32::from(b) - u32::from(a) + 1)
            .sum();
        PortSpace { ranges, total }
    }

    /// The space for this host, from `/proc/sys/net/ipv4/ip_local_port_range`.
    fn for_host() -> PortSpace {
        let (lo, hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|text| {
                let mut it = text.split_whitespace().map(|w| w.parse::<u16>().ok());
                Some((it.next()??, it.next()??))
            })
            .unwrap_or((32_768, 60_999));
        PortSpace::outside(lo, hi)
    }

    /// The `i`-th port, cycling.
    fn port(&self, i: u32) -> u16 {
        let mut i = i % self.total;
        for &(a, b) in &self.ranges {
            let len = u32::from(b) - u32::from(a) + 1;
            if i < len {
                return a + i as u16;
            }
            i -= len;
        }
        debug_assert!(false, "index {i} beyond {self:?}");
        FIRST_SOURCE_PORT
    }
}

/// A cursor into a [`PortSpace`] that differs from run to run, so a run does not start on the
/// TIME_WAIT 4-tuples the previous one left.
fn first_source_cursor() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ports_avoid_the_ephemeral_range() {
        let s = PortSpace::outside(32_768, 60_999);
        assert_eq!(s.total, (32_767 - 1024 + 1) + (65_535 - 61_000 + 1));
        assert_eq!(s.port(0), 1024);
        assert_eq!(s.port(31_743), 32_767);
        assert_eq!(s.port(31_744), 61_000);
        assert_eq!(s.port(s.total - 1), 65_535);
        assert_eq!(s.port(s.total), 1024, "wraps");
        for i in (0..200_000u32).step_by(97) {
            let p = s.port(i);
            assert!((1024..32_768).contains(&p) || p >= 61_000, "{p}");
        }
        // An ephemeral range that leaves too little outside: use everything.
        let all = PortSpace::outside(1024, 65_000);
        assert_eq!(all.total, 65_535 - 1024 + 1);
        assert_eq!(PortSpace::outside(1024, 65_535).port(7), 1031);
        // Range reaching the top: only the low part.
        let low = PortSpace::outside(40_000, 65_535);
        assert_eq!(low.port(low.total - 1), 39_999);
    }
}
