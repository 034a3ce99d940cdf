//! `sockman serve`: the library's [`Echo`] or [`Discard`] handler behind the shared server
//! flags ([`ServerArgs`]); with `--access-log`, wrapped in [`Logged`], which writes a line at
//! each close and adds nothing else.

use std::fmt::Write as _;

use clap::ValueEnum;
use sockman::{CloseReason, Context, Discard, Echo, Eof, Handler, Idle};

use crate::access_log::{self, AccessLog, Sink};
use crate::server::{self, ServerArgs};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum HandlerKind {
    /// Write back every byte.
    Echo,
    /// Read and drop every byte.
    Discard,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Protocol: echo or discard.
    #[arg(long, value_enum, default_value = "echo", env = "SOCKMAN_HANDLER")]
    handler: HandlerKind,
    #[command(flatten)]
    access_log: access_log::Args,
}

/// Runs `sockman serve` with `args` until a signal stops it.
pub(crate) fn run(args: &ServeArgs) -> Result<(), String> {
    let mut config = args.server.config();
    let Some(target) = &args.access_log.target else {
        // Off: the bare handler, nothing per connection.
        return match args.handler {
            HandlerKind::Echo => server::run(config, |_| Echo, &args.server, String::new),
            HandlerKind::Discard => server::run(config, |_| Discard, &args.server, String::new),
        }
        .map(|_| ());
    };
    let log = AccessLog::start(target)?;
    if config.periodic.is_zero() {
        config.periodic = access_log::FLUSH_EVERY;
    }
    let dropped = || format!(" access_log_dropped={}", log.dropped());
    let result = match args.handler {
        HandlerKind::Echo => {
            let make = |_| Logged::new(Echo, log.sink());
            server::run(config, make, &args.server, dropped)
        }
        HandlerKind::Discard => {
            let make = |_| Logged::new(Discard, log.sink());
            server::run(config, make, &args.server, dropped)
        }
    };
    log.finish();
    result.map(|_| ())
}

/// A handler `H` that logs one line per closed connection: every callback is `H`'s, and
/// `on_close` also writes the line (what `Context` says of the connection then: its peer,
/// age and bytes).
#[derive(Debug)]
pub(crate) struct Logged<H> {
    inner: H,
    log: Sink,
}

impl<H> Logged<H> {
    pub(crate) fn new(inner: H, log: Sink) -> Logged<H> {
        Logged { inner, log }
    }
}

impl<H: Handler> Handler for Logged<H> {
    type Conn = H::Conn;
    const PAUSE_READING_WHILE_PENDING: bool = H::PAUSE_READING_WHILE_PENDING;

    fn on_open(&mut self, ctx: &mut Context<'_, H::Conn>) -> H::Conn {
        self.inner.on_open(ctx)
    }

    #[inline]
    fn on_data(&mut self, conn: &mut H::Conn, ctx: &mut Context<'_, H::Conn>, data: &[u8]) {
        self.inner.on_data(conn, ctx, data);
    }

    fn on_connected(&mut self, conn: &mut H::Conn, ctx: &mut Context<'_, H::Conn>) {
        self.inner.on_connected(conn, ctx);
    }

    fn on_eof(&mut self, conn: &mut H::Conn, ctx: &mut Context<'_, H::Conn>) -> Eof {
        self.inner.on_eof(conn, ctx)
    }

    fn on_drained(&mut self, conn: &mut H::Conn, ctx: &mut Context<'_, H::Conn>) {
        self.inner.on_drained(conn, ctx);
    }

    fn on_timer(&mut self, conn: &mut H::Conn, ctx: &mut Context<'_, H::Conn>) {
        self.inner.on_timer(conn, ctx);
    }

    fn on_idle(&mut self, conn: &mut H::Conn, ctx: &mut Context<'_, H::Conn>) -> Idle {
        self.inner.on_idle(conn, ctx)
    }

    fn on_close(&mut self, conn: H::Conn, ctx: &mut Context<'_, H::Conn>, reason: CloseReason) {
        self.log.line(|line| {
            let _ = write!(
                line,
                " client={} duration_ms={} bytes_in={} bytes_out={} reason={}",
                ctx.peer(),
                ctx.age().as_millis(),
                ctx.bytes_in(),
                ctx.bytes_out(),
                reason.name()
            );
        });
        self.inner.on_close(conn, ctx, reason);
    }

    fn on_periodic(&mut self, ctx: &mut Context<'_, H::Conn>) {
        self.log.flush();
        self.inner.on_periodic(ctx);
    }

    fn describe(&self, conn: &H::Conn, out: &mut String) {
        self.inner.describe(conn, out);
    }

    fn write_metrics(&self, out: &mut String) {
        self.inner.write_metrics(out);
        self.log.write_metrics(out);
    }
}
