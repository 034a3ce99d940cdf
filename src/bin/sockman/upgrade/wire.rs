//! The upgrade's messages, one text line per packet of the [channel](super::channel):
//!
//! ```text
//! old → new   hello 1 pid=OLD listeners=N
//! old → new   listener data|admin ADDR bound|activated      (N times, each with its descriptor)
//! new → old   ready pid=NEW            or   failed REASON
//! old → new   go                       or   abort REASON
//! ```
//!
//! `1` is the protocol's version: a successor that does not speak the old process's version
//! says so (`failed`) instead of guessing. `activated` marks a socket that came from systemd
//! socket activation (the successor then ignores `--listen`, as the old process did).

use std::net::SocketAddr;

/// The protocol version this binary speaks.
pub(super) const VERSION: u32 = 1;

/// One message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Msg {
    Hello {
        version: u32,
        pid: u32,
        listeners: usize,
    },
    Listener {
        admin: bool,
        addr: SocketAddr,
        activated: bool,
    },
    Ready {
        pid: u32,
    },
    Failed(String),
    Go,
    Abort(String),
}

impl std::fmt::Display for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Hello {
                version,
                pid,
                listeners,
            } => write!(f, "hello {version} pid={pid} listeners={listeners}"),
            Msg::Listener {
                admin,
                addr,
                activated,
            } => write!(
                f,
                "listener {} {addr} {}",
                if *admin { "admin" } else { "data" },
                if *activated { "activated" } else { "bound" }
            ),
            Msg::Ready { pid } => write!(f, "ready pid={pid}"),
            Msg::Failed(why) => write!(f, "failed {why}"),
            Msg::Go => f.write_str("go"),
            Msg::Abort(why) => write!(f, "abort {why}"),
        }
    }
}

/// The value of `key=...` in `field`.
fn field<T: std::str::FromStr>(field: Option<&str>, key: &str) -> Result<T, String> {
    field
        .and_then(|f| f.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no {key}="))
}

impl std::str::FromStr for Msg {
    type Err = String;

    fn from_str(text: &str) -> Result<Msg, String> {
        let (word, rest) = text.split_once(' ').unwrap_or((text, ""));
        let mut f = rest.split(' ');
        let bad = |why: String| format!("unexpected message {text:?}: {why}");
        Ok(match word {
            "hello" => Msg::Hello {
                version: f
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| bad("no version".into()))?,
                pid: field(f.next(), "pid").map_err(bad)?,
                listeners: field(f.next(), "listeners").map_err(bad)?,
            },
            "listener" => {
                let admin = match f.next() {
                    Some("admin") => true,
                    Some("data") => false,
                    _ => return Err(bad("not data or admin".into())),
                };
                let addr = f
                    .next()
                    .and_then(|a| a.parse().ok())
                    .ok_or_else(|| bad("no address".into()))?;
                let activated = match f.next() {
                    Some("activated") => true,
                    Some("bound") => false,
                    _ => return Err(bad("not bound or activated".into())),
                };
                Msg::Listener {
                    admin,
                    addr,
                    activated,
                }
            }
            "ready" => Msg::Ready {
                pid: field(f.next(), "pid").map_err(bad)?,
            },
            "failed" => Msg::Failed(rest.to_string()),
            "go" if rest.is_empty() => Msg::Go,
            "abort" => Msg::Abort(rest.to_string()),
            _ => return Err(bad("unknown".into())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_reads_back_as_written() {
        let all = [
            Msg::Hello {
                version: VERSION,
                pid: 42,
                listeners: 3,
            },
            Msg::Listener {
                admin: false,
                addr: "127.0.0.1:7000".parse().unwrap(),
                activated: true,
            },
            Msg::Listener {
                admin: true,
                addr: "[::1]:9090".parse().unwrap(),
                activated: false,
            },
            Msg::Ready { pid: 7 },
            Msg::Failed("the flags changed: no listener on 127.0.0.1:7001".into()),
            Msg::Go,
            Msg::Abort("this process is stopping".into()),
        ];
        for m in all {
            assert_eq!(m.to_string().parse::<Msg>(), Ok(m.clone()), "{m}");
        }
    }

    #[test]
    fn a_bad_message_is_an_error_that_quotes_it() {
        for text in [
            "",
            "hello",
            "hello x pid=1 listeners=1",
            "listener tcp 1.2.3.4:5 bound",
            "gone",
        ] {
            let e = text.parse::<Msg>().unwrap_err();
            assert!(e.contains(&format!("{text:?}")), "{e}");
        }
    }
}
