//! A Redis-protocol (RESP2) server on sockman's public API: single-threaded, in memory, keys and
//! values binary-safe, every reply byte for byte what redis-server 7.0 sends. Run it with
//! `cargo run --release --example resp -- 127.0.0.1:7200` (the address is optional; that is
//! its default) and talk to it with `redis-cli -p 7200`, `redis-benchmark -p 7200` or `nc`.
//!
//! Commands: `PING [msg]`, `ECHO`, `SET key value [NX|XX] [GET] [KEEPTTL]`, `GET`, `DEL key...`,
//! `EXISTS key...`, `INCR`, `MGET`, `MSET`, `DBSIZE`, `SUBSCRIBE ch...`, `UNSUBSCRIBE [ch...]`,
//! `PUBLISH ch msg`, `QUIT`, `RESET`, and `CONFIG GET` for the two settings clients ask about
//! (`save`, `appendonly`); as RESP arrays or inline (`PING\r\n`, what `nc` sends). Any other
//! command gets Redis's `-ERR unknown command ...`; a malformed request gets its
//! `-ERR Protocol error: ...` and a close (see `parse`).
//!
//! How it uses the core:
//! - **Parsing in place.** A read's bytes are parsed where they lie; only a request split across
//!   reads is buffered (in [`Pending`], per connection, freed once it completes), and its parse
//!   resumes where it stopped.
//! - **Output per turn.** Replies are staged in one buffer and handed to the core once per read
//!   (or every 64 KiB); the core sends each connection's output once per turn, so a pipeline of
//!   16 requests costs one `write`, and a `PUBLISH` fanned out to 50 subscribers 16 times in a
//!   turn costs 50.
//! - **Shared values.** A value of 4 KiB or more is stored as a [`Bytes`] and a `GET` queues it
//!   as it is: 20 readers of a 64 MiB value cost one copy, not 20.
//! - **Backpressure.** When a connection's output passes the high watermark (the socket does
//!   not keep up), the requests it already sent wait in its buffer, reading pauses, and
//!   [`Handler::on_drained`] runs them once the output has drained: a pipeline of any length
//!   runs in bounded memory.
//! - **Bounded input.** A partial request may hold at most [`Limits::max_request`] bytes, all
//!   partial requests together [`Limits::max_buffered`]; a bulk announced as huge is not
//!   allocated ahead of its bytes (the buffer grows as they come, never past the announced end).
//! - **Small idle clients.** A connection's state is one pointer ([`Client`]); subscriptions are
//!   kept in a side table by connection slot.

#[path = "resp/commands.rs"]
pub mod commands;
#[path = "resp/db.rs"]
pub mod db;
#[path = "resp/parse.rs"]
pub mod parse;
#[path = "resp/pubsub.rs"]
pub mod pubsub;
#[path = "resp/reply.rs"]
pub mod reply;

use std::net::SocketAddr;
use std::time::Duration;

use sockman::{Bytes, CloseReason, Config, Context, Handler, Server};

use commands::{Flow, Store};
use db::Args;
use parse::{parse, Progress, Span, Step};

/// The default address.
pub const DEFAULT_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 7200);

/// A buffered request this large, or larger, is stored from its buffer without a copy (its
/// buffer becomes a shared [`Bytes`] and a large value is a slice of it).
const ZERO_COPY_MIN: usize = 1 << 20;

/// Bounds on what clients may make the server buffer.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes one partial request may hold (Redis's `client-query-buffer-limit` is 1 GiB; a bulk
    /// may be 512 MiB). A request that grows past it closes its connection, as in Redis.
    pub max_request: usize,
    /// Bytes all partial requests together may hold; the connection whose request would pass
    /// it is closed.
    pub max_buffered: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request: (512 << 20) + (1 << 20),
            max_buffered: 2 << 30,
        }
    }
}

/// A connection's state: nothing but a pointer, set only while it has bytes buffered.
#[derive(Debug, Default)]
pub struct Client {
    pending: Option<Box<Pending>>,
}

/// What a connection has buffered: a partial request (reading goes on), or whole requests
/// waiting for its output to drain (reading is paused).
#[derive(Debug)]
struct Pending {
    buf: Vec<u8>,
    /// The partial request's parse so far, and its arguments so far.
    progress: Progress,
    args: Vec<Span>,
    /// Whole requests wait for `on_drained`.
    blocked: bool,
}

/// How running the requests in a buffer ended.
enum Ran {
    /// All of them ran.
    All,
    /// The request at `at` is partial.
    Partial { at: usize, progress: Progress },
    /// The connection is not writable: the requests from `at` on wait.
    Blocked { at: usize },
    /// The connection is closing (`QUIT`, a protocol error, a refused write).
    Closing,
}

/// What a connection does after a request.
enum After {
    /// Run the next one.
    Go,
    /// Its output is full: the rest waits for it to drain.
    Wait,
    /// It is closing.
    Closing,
}

/// Counters a test (or a log line) can read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Malformed requests (answered with a protocol error, then closed).
    pub protocol_errors: u64,
    /// Connections closed because a request passed [`Limits`].
    pub oversized: u64,
    /// Times a connection's requests waited for its output to drain.
    pub blocked: u64,
}

/// The server: a [`Handler`] holding the keyspace and the channels.
#[derive(Debug, Default)]
pub struct Resp {
    store: Store,
    limits: Limits,
    /// Bytes allocated for buffered requests, all connections together.
    buffered: usize,
    stats: Stats,
    /// A request's arguments (reused: no allocation per request).
    args: Vec<Span>,
    /// An inline request's unquoted arguments.
    inline: Vec<u8>,
}

impl Resp {
    /// A server with these limits.
    pub fn with_limits(limits: Limits) -> Resp {
        Resp {
            limits,
            ..Resp::default()
        }
    }

    /// Keys stored.
    pub fn keys(&self) -> usize {
        self.store.db.len()
    }

    /// Channels with subscribers.
    pub fn channels(&self) -> usize {
        self.store.pubsub.channels()
    }

    /// Bytes allocated for buffered requests (their buffers' capacity), all connections
    /// together.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Commands run so far.
    pub fn commands(&self) -> u64 {
        self.store.commands
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Runs the requests in `buf` from `at` until its end, a partial request, a full output or
    /// a close. `owner`, when `buf` is a shared buffer, lets large arguments be kept without a
    /// copy.
    fn run(
        &mut self,
        ctx: &mut Context<'_, Client>,
        buf: &[u8],
        mut at: usize,
        owner: Option<&Bytes>,
    ) -> Ran {
        while at < buf.len() {
            let mut progress = Progress::default();
            self.args.clear();
            let step = parse(&buf[at..], &mut progress, &mut self.args, &mut self.inline);
            match step {
                Step::Request { len, inline } => {
                    let args = if inline {
                        Args {
                            buf: &self.inline,
                            spans: &self.args,
                            owner: None,
                        }
                    } else {
                        Args {
                            buf: &buf[at..at + len],
                            spans: &self.args,
                            owner: owner.map(|o| (o, at)),
                        }
                    };
                    let flow = self.store.exec(ctx, &args);
                    at += len;
                    match self.after_request(ctx, flow, at < buf.len()) {
                        After::Go => {}
                        After::Wait => return Ran::Blocked { at },
                        After::Closing => return Ran::Closing,
                    }
                }
                Step::Empty { len } => at += len,
                Step::Incomplete => return Ran::Partial { at, progress },
                Step::Error(e) => return self.protocol_error(ctx, e),
            }
        }
        Ran::All
    }

    /// After a request: closes on `QUIT`; hands large staged output over; says whether the
    /// connection can take more (if `more` requests are left).
    fn after_request(&mut self, ctx: &mut Context<'_, Client>, flow: Flow, more: bool) -> After {
        if flow == Flow::Close {
            self.store.out.flush(ctx);
            ctx.close();
            return After::Closing;
        }
        if self.store.out.len() >= reply::STAGE && !self.store.out.flush(ctx) {
            return After::Closing;
        }
        if more && !ctx.is_writable() {
            let id = ctx.id();
            if ctx.conn(id).is_none() {
                return After::Closing;
            }
            self.stats.blocked += 1;
            return After::Wait;
        }
        After::Go
    }

    fn protocol_error(&mut self, ctx: &mut Context<'_, Client>, e: parse::ProtoError) -> Ran {
        self.stats.protocol_errors += 1;
        self.store.out.raw(&e.reply());
        self.store.out.flush(ctx);
        ctx.close();
        Ran::Closing
    }

    /// Closes a connection whose buffered request passed the limits (as Redis does, without a
    /// reply).
    fn oversized(&mut self, ctx: &mut Context<'_, Client>) -> Ran {
        self.stats.oversized += 1;
        self.store.out.flush(ctx);
        ctx.close();
        Ran::Closing
    }

    /// What is left after running `data` from `at`: kept in a new [`Pending`].
    fn keep(&mut self, client: &mut Client, ctx: &mut Context<'_, Client>, data: &[u8], ran: Ran) {
        let (at, progress, blocked) = match ran {
            Ran::All | Ran::Closing => return,
            Ran::Partial { at, progress } => (at, progress, false),
            Ran::Blocked { at } => (at, Progress::default(), true),
        };
        let rest = &data[at..];
        if self.buffered + rest.len() > self.limits.max_buffered
            || (!blocked && rest.len() > self.limits.max_request)
        {
            self.oversized(ctx);
            return;
        }
        let args = if blocked {
            Vec::new()
        } else {
            std::mem::take(&mut self.args)
        };
        self.park(
            client,
            ctx,
            Box::new(Pending {
                buf: rest.to_vec(),
                progress,
                args,
                blocked,
            }),
        );
    }

    /// Stores `p` on the connection (counting its bytes); pauses reading if it is blocked.
    fn park(&mut self, client: &mut Client, ctx: &mut Context<'_, Client>, p: Box<Pending>) {
        self.buffered += p.buf.capacity();
        if p.blocked {
            let id = ctx.id();
            if let Some(mut c) = ctx.conn(id) {
                c.pause_reading();
            }
        }
        client.pending = Some(p);
    }

    /// Takes the connection's buffered bytes (uncounting them).
    fn unpark(&mut self, client: &mut Client) -> Option<Box<Pending>> {
        let p = client.pending.take()?;
        self.buffered -= p.buf.capacity();
        Some(p)
    }

    /// More bytes for a partial request.
    fn resume(
        &mut self,
        client: &mut Client,
        ctx: &mut Context<'_, Client>,
        mut p: Box<Pending>,
        data: &[u8],
    ) {
        let old = p.buf.len();
        if p.blocked {
            // Not read while blocked; should bytes come anyway, they wait their turn.
            p.buf.extend_from_slice(data);
            return self.park(client, ctx, p);
        }
        let total = old + data.len();
        // Grow by doubling, but never past the end of the bulk being read: a huge announced
        // length is not allocated ahead of its bytes, and a large value's buffer ends where the
        // value does.
        let room = if total > p.buf.capacity() {
            (2 * p.buf.capacity())
                .max(total)
                .min(total.max(p.progress.needs()))
        } else {
            p.buf.capacity()
        };
        if total > self.limits.max_request || self.buffered + room > self.limits.max_buffered {
            self.oversized(ctx);
            return;
        }
        p.buf.reserve_exact(room - old);
        p.buf.extend_from_slice(data);
        if p.buf.len() < p.progress.needs() {
            return self.park(client, ctx, p);
        }
        let step = parse(&p.buf, &mut p.progress, &mut p.args, &mut self.inline);
        let len = match step {
            Step::Incomplete => return self.park(client, ctx, p),
            Step::Error(e) => {
                self.protocol_error(ctx, e);
                return;
            }
            Step::Empty { len } => len,
            Step::Request { len, inline } => {
                let flow = if inline {
                    let args = Args {
                        buf: &self.inline,
                        spans: &p.args,
                        owner: None,
                    };
                    self.store.exec(ctx, &args)
                } else if len >= ZERO_COPY_MIN {
                    // The buffer becomes the values' storage: cut it at the request's end
                    // (the rest is still in `data`) and to its length (a remap, not a copy).
                    let mut buf = std::mem::take(&mut p.buf);
                    buf.truncate(len);
                    buf.shrink_to_fit();
                    let owner = Bytes::from(buf);
                    let args = Args {
                        buf: &owner,
                        spans: &p.args,
                        owner: Some((&owner, 0)),
                    };
                    self.store.exec(ctx, &args)
                } else {
                    let args = Args {
                        buf: &p.buf[..len],
                        spans: &p.args,
                        owner: None,
                    };
                    self.store.exec(ctx, &args)
                };
                let more = len - old < data.len();
                match self.after_request(ctx, flow, more) {
                    After::Go => len,
                    After::Wait => {
                        let ran = Ran::Blocked { at: len - old };
                        return self.keep(client, ctx, data, ran);
                    }
                    After::Closing => return,
                }
            }
        };
        // The partial request was all of `old`: what follows it is in `data`, unbuffered.
        debug_assert!(len > old);
        let at = len - old;
        let ran = self.run(ctx, data, at, None);
        self.keep(client, ctx, data, ran);
    }
}

impl Handler for Resp {
    type Conn = Client;

    fn on_open(&mut self, _ctx: &mut Context<'_, Client>) -> Client {
        Client::default()
    }

    fn on_data(&mut self, client: &mut Client, ctx: &mut Context<'_, Client>, data: &[u8]) {
        match self.unpark(client) {
            None => {
                let ran = self.run(ctx, data, 0, None);
                self.keep(client, ctx, data, ran);
            }
            Some(p) => self.resume(client, ctx, p, data),
        }
        self.store.out.flush(ctx);
    }

    /// The output drained: the requests that waited run, and reading resumes unless they
    /// fill the output again.
    fn on_drained(&mut self, client: &mut Client, ctx: &mut Context<'_, Client>) {
        let Some(p) = client.pending.as_ref() else {
            return;
        };
        if !p.blocked {
            return;
        }
        let p = self.unpark(client).expect("checked above");
        let ran = self.run(ctx, &p.buf, 0, None);
        let id = ctx.id();
        match ran {
            Ran::Blocked { .. } => {}
            Ran::Closing => {}
            Ran::All | Ran::Partial { .. } => {
                if let Some(mut c) = ctx.conn(id) {
                    c.resume_reading();
                }
            }
        }
        self.keep(client, ctx, &p.buf, ran);
        self.store.out.flush(ctx);
    }

    fn on_close(&mut self, client: Client, ctx: &mut Context<'_, Client>, _: CloseReason) {
        let mut client = client;
        self.unpark(&mut client);
        self.store.pubsub.unsubscribe_all(ctx.id());
    }
}

/// The server's configuration for `addr`: Redis's habits where the core's defaults differ.
/// Connections never time out for idleness (Redis's `timeout 0`: subscribers sit idle for
/// hours) but have TCP keepalive (Redis's `tcp-keepalive 300`); a client may have 32 MiB of
/// copied output queued (Redis's limit for subscribers) before it is closed, and is not
/// writable past 256 KiB (its pipelined requests then wait).
pub fn config(addr: SocketAddr) -> Config {
    Config {
        listen: vec![addr],
        idle_timeout: Duration::ZERO,
        tcp_keepalive: Duration::from_secs(300),
        max_pending: 32 << 20,
        write_high_watermark: Some(256 << 10),
        write_low_watermark: Some(64 << 10),
        ..Config::default()
    }
}

#[allow(dead_code)] // the tests include this file for `Resp` and `config`
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = match std::env::args().nth(1) {
        Some(a) => a
            .parse()
            .map_err(|e| format!("bad address {a:?}: {e} (expected e.g. 127.0.0.1:7200)"))?,
        None => SocketAddr::from(DEFAULT_ADDR),
    };
    let server = Server::bind(config(addr), Resp::default())?;
    let local = server.local_addrs()[0];
    println!(
        "resp on {local} (redis-cli -h {} -p {})",
        local.ip(),
        local.port()
    );
    let metrics = server.run()?;
    println!("{metrics}");
    Ok(())
}
