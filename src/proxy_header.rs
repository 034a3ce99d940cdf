//! Reading a PROXY protocol header (v1 text, v2 binary) at the start of a connection, with the
//! `ppp` crate doing the parsing. This module only decides, from the bytes read so far, whether
//! the header is complete, still coming, missing or invalid; the loop owns the socket.
//!
//! Never guess: a listener configured for the PROXY protocol requires a header of an accepted
//! version; bytes that cannot start a header of either version are "missing", whatever they
//! are; the whole signature of the other version is a "wrong version" (its header is not
//! parsed). A header longer than [`MAX_HEADER`] is invalid.

use std::net::SocketAddr;

use crate::config::ProxyProtocol;

/// The longest header accepted: a v1 header is at most 107 bytes; v2 headers carry TLVs
/// (HAProxy sends a few dozen bytes of them); anything near this is not a balancer's.
pub(crate) const MAX_HEADER: usize = 4096;

/// The v2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The start of a v1 header.
const V1_PREFIX: &[u8; 6] = b"PROXY ";

/// What the bytes read so far are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "proxy-protocol"), allow(dead_code))]
pub(crate) enum Parsed {
    /// A header may still complete: read more.
    Incomplete,
    /// A whole header of `len` bytes; `source` is the client it names (`None` for v2 `LOCAL`,
    /// v1 `UNKNOWN` or a family without an address: keep the socket's peer).
    Done {
        len: usize,
        source: Option<SocketAddr>,
    },
    /// Not the start of a PROXY protocol header.
    Missing,
    /// The whole signature of a header of the version the listener does not accept.
    WrongVersion,
    /// A malformed or oversized header.
    Invalid,
}

/// Whether `input` could be the start of `prefix`.
fn starts(input: &[u8], prefix: &[u8]) -> bool {
    let n = input.len().min(prefix.len());
    input[..n] == prefix[..n]
}

/// Parses the header at the start of `input` for a listener that accepts `accept`.
pub(crate) fn parse(input: &[u8], accept: ProxyProtocol) -> Parsed {
    let (could_v1, could_v2) = (starts(input, V1_PREFIX), starts(input, V2_SIGNATURE));
    let v1 = matches!(accept, ProxyProtocol::V1 | ProxyProtocol::Any) && could_v1;
    let v2 = matches!(accept, ProxyProtocol::V2 | ProxyProtocol::Any) && could_v2;
    let parsed = if v2 {
        parse_v2(input)
    } else if v1 {
        parse_v1(input)
    } else if could_v1 || could_v2 {
        // The other version's header, or its start: only its whole signature tells.
        let signature = if could_v2 {
            V2_SIGNATURE.len()
        } else {
            V1_PREFIX.len()
        };
        return if input.len() >= signature {
            Parsed::WrongVersion
        } else {
            Parsed::Incomplete
        };
    } else {
        return Parsed::Missing;
    };
    match parsed {
        Parsed::Incomplete if input.len() >= MAX_HEADER => Parsed::Invalid,
        Parsed::Done { len, .. } if len > MAX_HEADER => Parsed::Invalid,
        other => other,
    }
}

/// The longest v1 header, CRLF included (the spec's 107 bytes).
#[cfg(feature = "proxy-protocol")]
const V1_MAX: usize = 107;

#[cfg(feature = "proxy-protocol")]
fn parse_v2(input: &[u8]) -> Parsed {
    use ppp::v2::{Addresses, Command, Header};
    // Completeness from the length field, not from the parser's error: 16 fixed bytes, then
    // as many as the big-endian length at 14..16 says.
    let Some(len) = input.get(14..16) else {
        return Parsed::Incomplete;
    };
    let total = 16 + u16::from_be_bytes([len[0], len[1]]) as usize;
    if total > MAX_HEADER {
        return Parsed::Invalid;
    }
    if input.len() < total {
        return Parsed::Incomplete;
    }
    match Header::try_from(&input[..total]) {
        Ok(h) => {
            let source = match (h.command, h.addresses) {
                (Command::Proxy, Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (Command::Proxy, Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                // LOCAL (a balancer's own health check), or no address we can use.
                _ => None,
            };
            Parsed::Done {
                len: h.len(),
                source,
            }
        }
        Err(_) => Parsed::Invalid,
    }
}

#[cfg(feature = "proxy-protocol")]
fn parse_v1(input: &[u8]) -> Parsed {
    use ppp::v1::{Addresses, Header};
    // Complete at its CRLF, which must come within the longest legal header.
    let window = &input[..input.len().min(V1_MAX)];
    let Some(cr) = window.windows(2).position(|w| w == b"\r\n") else {
        return if input.len() >= V1_MAX {
            Parsed::Invalid
        } else {
            Parsed::Incomplete
        };
    };
    match Header::try_from(&input[..cr + 2]) {
        Ok(h) => {
            let source = match h.addresses {
                Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                Addresses::Unknown => None,
            };
            Parsed::Done {
                len: h.header.len(),
                source,
            }
        }
        Err(_) => Parsed::Invalid,
    }
}

// Without the feature `Config::validate` refuses a PROXY protocol listener, so these never run.
#[cfg(not(feature = "proxy-protocol"))]
fn parse_v2(_: &[u8]) -> Parsed {
    Parsed::Invalid
}

#[cfg(not(feature = "proxy-protocol"))]
fn parse_v1(_: &[u8]) -> Parsed {
    Parsed::Invalid
}

#[cfg(all(test, feature = "proxy-protocol"))]
mod tests {
    use super::*;

    fn v2(src: SocketAddr, dst: SocketAddr, local: bool) -> Vec<u8> {
        use ppp::v2::{Builder, Command, Protocol, Version};
        let command = if local {
            Command::Local
        } else {
            Command::Proxy
        };
        Builder::with_addresses(Version::Two | command, Protocol::Stream, (src, dst))
            .build()
            .unwrap()
    }

    #[test]
    fn v1_headers_complete_with_their_client() {
        let h = b"PROXY TCP4 192.0.2.7 127.0.0.1 51000 7000\r\nhello";
        let len = h.len() - 5;
        assert_eq!(
            parse(h, ProxyProtocol::V1),
            Parsed::Done {
                len,
                source: Some("192.0.2.7:51000".parse().unwrap())
            }
        );
        assert_eq!(parse(h, ProxyProtocol::Any), parse(h, ProxyProtocol::V1));
        // Every prefix is incomplete, never missing or invalid.
        for n in 0..len {
            assert_eq!(parse(&h[..n], ProxyProtocol::V1), Parsed::Incomplete, "{n}");
        }
        let unknown = b"PROXY UNKNOWN\r\n";
        assert_eq!(
            parse(unknown, ProxyProtocol::V1),
            Parsed::Done {
                len: unknown.len(),
                source: None
            }
        );
        let v6 = b"PROXY TCP6 2001:db8::1 ::1 4000 7000\r\n";
        assert_eq!(
            parse(v6, ProxyProtocol::Any),
            Parsed::Done {
                len: v6.len(),
                source: Some("[2001:db8::1]:4000".parse().unwrap())
            }
        );
    }

    #[test]
    fn v2_headers_complete_and_local_keeps_the_peer() {
        let src: SocketAddr = "198.51.100.9:40000".parse().unwrap();
        let dst: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let mut h = v2(src, dst, false);
        let len = h.len();
        h.extend_from_slice(b"data");
        assert_eq!(
            parse(&h, ProxyProtocol::V2),
            Parsed::Done {
                len,
                source: Some(src)
            }
        );
        for n in 0..len {
            assert_eq!(
                parse(&h[..n], ProxyProtocol::Any),
                Parsed::Incomplete,
                "{n}"
            );
        }
        let local = v2(src, dst, true);
        assert_eq!(
            parse(&local, ProxyProtocol::V2),
            Parsed::Done {
                len: local.len(),
                source: None
            }
        );
    }

    #[test]
    fn wrong_versions_plain_data_and_garbage_are_refused() {
        // The other version is present, not missing: told once its signature is whole.
        let v1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 51000 7000\r\n";
        assert_eq!(parse(v1, ProxyProtocol::V2), Parsed::WrongVersion);
        assert_eq!(parse(&v1[..6], ProxyProtocol::V2), Parsed::WrongVersion);
        assert_eq!(parse(&v1[..5], ProxyProtocol::V2), Parsed::Incomplete);
        let src: SocketAddr = "198.51.100.9:40000".parse().unwrap();
        let h2 = v2(src, "127.0.0.1:1".parse().unwrap(), false);
        assert_eq!(parse(&h2, ProxyProtocol::V1), Parsed::WrongVersion);
        assert_eq!(parse(&h2[..11], ProxyProtocol::V1), Parsed::Incomplete);
        assert_eq!(
            parse(b"PUT / HTTP/1.1\r\n", ProxyProtocol::V2),
            Parsed::Missing
        );
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n", ProxyProtocol::Any),
            Parsed::Missing
        );
        assert_eq!(
            parse(b"PROXY TCP9 x\r\n", ProxyProtocol::V1),
            Parsed::Invalid
        );
        assert_eq!(
            parse(b"PROXY TCP4 999.0.0.1 127.0.0.1 1 2\r\n", ProxyProtocol::V1),
            Parsed::Invalid
        );
        // A v1 header without its CRLF after the longest legal length is invalid, not pending.
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert_eq!(parse(&long, ProxyProtocol::V1), Parsed::Invalid);
        // A v2 header announcing 65 000 bytes of TLVs is oversized, as soon as its length is in.
        let mut big = V2_SIGNATURE.to_vec();
        big.extend_from_slice(&[0x21, 0x11, 0xfd, 0xe8]);
        assert_eq!(parse(&big, ProxyProtocol::V2), Parsed::Invalid);
        // A complete v2 block whose addresses do not fit its family is malformed.
        let mut short = V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]);
        assert_eq!(parse(&short, ProxyProtocol::V2), Parsed::Invalid);
    }
}
