//! A line-based chat server on sockman's public API: every line a client sends goes to every
//! *other* client. Run it with `cargo run --release --example chat -- 127.0.0.1:7100` (the
//! address is optional; that is its default) and talk to it with `nc 127.0.0.1 7100`.
//!
//! The protocol:
//! - on connect the server sends `* you are <id>\n` (the connection's [`ConnId`], e.g. `3#0`);
//! - each line a client sends (up to `\n`) reaches every other client as `<id>: <line>\n`;
//!   a line over 4 KiB closes its sender;
//! - `/quit` closes the sender; whenever a client leaves, the others get `* <id> left\n`;
//! - a client that stops reading is dropped by the core (its pending output overflows, or makes
//!   no progress for the write timeout) without slowing anyone else, and its departure is
//!   announced like any other.
//!
//! Memory: an idle client costs its connection entry plus an empty `Vec` (no buffer: a partial
//! line is the only thing a client ever has buffered, and it is freed when the line completes)
//! and a 12-byte slot in the member table.

use std::net::SocketAddr;
use std::time::Duration;

use sockman::{CloseReason, Config, ConnId, Context, Handler, Server};

/// Longest line accepted; a longer one closes its sender.
pub const MAX_LINE: usize = 4096;

/// The chat: who is connected, by slab key (keys are dense, so this is a plain vector).
#[derive(Debug, Default)]
pub struct Chat {
    members: Vec<Option<ConnId>>,
    /// Members in `members` (for the log line).
    count: usize,
}

impl Chat {
    /// Sends `msg` to every member but `from` (pass [`ConnId::NONE`] for all). A member that
    /// cannot take it (its output is full) is closed by the core and announced as it leaves.
    fn broadcast(&self, ctx: &mut Context<'_, Vec<u8>>, from: ConnId, msg: &[u8]) {
        for &id in self.members.iter().flatten() {
            if id != from {
                let _ = ctx.send(id, msg);
            }
        }
    }

    /// Connected clients.
    pub fn members(&self) -> usize {
        self.count
    }
}

impl Handler for Chat {
    /// A partial line (no allocation until a client sends one without its `\n`).
    type Conn = Vec<u8>;

    fn on_open(&mut self, ctx: &mut Context<'_, Vec<u8>>) -> Vec<u8> {
        let id = ctx.id();
        if self.members.len() <= id.key() {
            self.members.resize(id.key() + 1, None);
        }
        self.members[id.key()] = Some(id);
        self.count += 1;
        ctx.write(format!("* you are {id}\n").as_bytes());
        Vec::new()
    }

    fn on_data(&mut self, partial: &mut Vec<u8>, ctx: &mut Context<'_, Vec<u8>>, data: &[u8]) {
        let id = ctx.id();
        let mut rest = data;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            let (head, tail) = rest.split_at(end);
            rest = &tail[1..];
            // The whole line: what was buffered plus this head (no copy when nothing was).
            let joined;
            let line: &[u8] = if partial.is_empty() {
                head
            } else {
                partial.extend_from_slice(head);
                joined = std::mem::take(partial);
                &joined
            };
            if line.len() > MAX_LINE {
                return ctx.close();
            }
            if line == b"/quit" {
                return ctx.close();
            }
            let mut msg = Vec::with_capacity(line.len() + 16);
            msg.extend_from_slice(format!("{id}: ").as_bytes());
            msg.extend_from_slice(line);
            msg.push(b'\n');
            self.broadcast(ctx, id, &msg);
        }
        if partial.len() + rest.len() > MAX_LINE {
            return ctx.close();
        }
        partial.extend_from_slice(rest);
    }

    fn on_close(&mut self, _: Vec<u8>, ctx: &mut Context<'_, Vec<u8>>, _: CloseReason) {
        let id = ctx.id();
        if let Some(slot) = self.members.get_mut(id.key()) {
            if *slot == Some(id) {
                *slot = None;
                self.count -= 1;
            }
        }
        self.broadcast(ctx, id, format!("* {id} left\n").as_bytes());
    }
}

/// The server's configuration for `addr`: the core's defaults, with a shorter write timeout
/// so that a client that stops reading is dropped within seconds.
pub fn config(addr: SocketAddr) -> Config {
    Config {
        listen: vec![addr],
        idle_timeout: Duration::from_secs(600),
        write_timeout: Duration::from_secs(5),
        ..Config::default()
    }
}

#[allow(dead_code)] // the tests and the bench include this file for `Chat` and `config`
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = match std::env::args().nth(1) {
        Some(a) => a
            .parse()
            .map_err(|e| format!("bad address {a:?}: {e} (expected e.g. 127.0.0.1:7100)"))?,
        None => SocketAddr::from(([127, 0, 0, 1], 7100)),
    };
    let server = Server::bind(config(addr), Chat::default())?;
    println!(
        "chat on {} (nc {} {} to join)",
        server.local_addrs()[0],
        addr.ip(),
        server.local_addrs()[0].port()
    );
    let metrics = server.run()?;
    println!("{metrics}");
    Ok(())
}
