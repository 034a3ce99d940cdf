//! `sockman serve`: the library's [`Echo`] or [`Discard`] handler behind the shared server
//! flags ([`ServerArgs`]); with `--access-log`, its [`Sink`] around the handler
//! ([`Wrapped`]), which writes a line at each close and adds nothing else.

use std::fmt::Write as _;

use clap::ValueEnum;
use sockman::{CloseReason, Context, Discard, Echo};

use crate::access_log::{self, AccessLog, Sink};
use crate::server::{self, ServerArgs};
use crate::wrapped::{Around, Wrapped};

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
            let make = |_| Wrapped::new(Echo, log.sink());
            server::run(config, make, &args.server, dropped)
        }
        HandlerKind::Discard => {
            let make = |_| Wrapped::new(Discard, log.sink());
            server::run(config, make, &args.server, dropped)
        }
    };
    log.finish();
    result.map(|_| ())
}

/// The access log around a handler: one line per closed connection, of what `Context` says of
/// it then (its peer, age and bytes); every callback is the handler's ([`Wrapped`]).
impl Around for Sink {
    fn on_close<C>(&mut self, ctx: &mut Context<'_, C>, reason: CloseReason) {
        self.line(|line| {
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
    }

    fn on_periodic(&mut self) {
        self.flush();
    }

    fn write_metrics(&self, out: &mut String) {
        Sink::write_metrics(self, out);
    }
}
