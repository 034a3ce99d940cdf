//! `sockman serve`: the library's [`Echo`] or [`Discard`] handler behind the shared server
//! flags ([`ServerArgs`]).

use clap::ValueEnum;
use sockman::{Discard, Echo};

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
}

/// Runs `sockman serve` with `args` until a signal stops it.
pub(crate) fn run(args: &ServeArgs) -> Result<(), String> {
    let config = args.server.config();
    match args.handler {
        HandlerKind::Echo => server::run(config, |_| Echo, &args.server, String::new),
        HandlerKind::Discard => server::run(config, |_| Discard, &args.server, String::new),
    }
    .map(|_| ())
}
