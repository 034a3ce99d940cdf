//! Host names on the command line (`--listen localhost:7000`, `--upstream db.internal:5432`,
//! `--admin localhost:9090`), as HAProxy and nginx take them.
//!
//! A value is resolved once, as the flags are parsed, by the system's resolver
//! (`std::net::ToSocketAddrs`: `/etc/hosts`, DNS); every address a name resolves to is kept, in
//! the order resolved, duplicates dropped. A literal address is taken as it is, without a
//! lookup. A name that does not resolve is one clear error naming it, and sockman does not
//! start.

use std::net::{SocketAddr, ToSocketAddrs};

/// The addresses one command-line value names: one for a literal address, every address of a
/// host name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Addrs(pub(crate) Vec<SocketAddr>);

/// Every address of every value, in order (what `--listen a,b` or `--upstream a --upstream b`
/// names).
pub(crate) fn flatten(values: &[Addrs]) -> Vec<SocketAddr> {
    values.iter().flat_map(|a| a.0.iter().copied()).collect()
}

/// Parses `HOST:PORT`: an IP address and port (`127.0.0.1:7000`, `[::1]:7000`), or a host name
/// and port, resolved now.
///
/// # Errors
/// Not `HOST:PORT`, a bad port, or a name that does not resolve (or resolves to nothing),
/// each named.
pub(crate) fn parse_addrs(text: &str) -> Result<Addrs, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(Addrs(vec![addr]));
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!(
            "{text:?} is not HOST:PORT (e.g. 127.0.0.1:7000 or localhost:7000)"
        ));
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{text:?}: {port:?} is not a port (0 to 65535)"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{text:?} has no host (e.g. 127.0.0.1:{port})"));
    }
    let resolved = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve host name {host:?}: {e}"))?;
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for addr in resolved {
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }
    if addrs.is_empty() {
        return Err(format!("host name {host:?} resolves to no address"));
    }
    Ok(Addrs(addrs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_taken_as_they_are_and_names_are_resolved() {
        let one = |s: &str| parse_addrs(s).unwrap().0;
        assert_eq!(one("127.0.0.1:7000"), ["127.0.0.1:7000".parse().unwrap()]);
        assert_eq!(one("[::1]:7000"), ["[::1]:7000".parse().unwrap()]);
        // `localhost` is in every /etc/hosts: its addresses are loopback ones, with the port.
        let local = one("localhost:7000");
        assert!(!local.is_empty());
        assert!(
            local
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 7000),
            "{local:?}"
        );
    }

    #[test]
    fn bad_values_and_unknown_names_are_clear_errors() {
        let err = |s: &str| parse_addrs(s).unwrap_err();
        assert!(
            err("localhost").contains("HOST:PORT"),
            "{}",
            err("localhost")
        );
        assert!(err("localhost:http").contains("not a port"));
        assert!(err("localhost:70000").contains("not a port"));
        assert!(err(":7000").contains("no host"));
        // `.invalid` never resolves (RFC 6761); the error names the host.
        let e = err("no-such-host.invalid:7000");
        assert!(
            e.contains("cannot resolve host name \"no-such-host.invalid\""),
            "{e}"
        );
    }
}
