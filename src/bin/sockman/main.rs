//! The `sockman` binary: `sockman serve` (an echo server with limits, idle timeouts and metrics),
//! `sockman proxy` (an L4 proxy) and `sockman load` (the load generator). It uses only the library's public API.

mod access_log;
mod load;
mod proxy;
mod resolve;
mod serve;
mod server;
mod units;
mod upgrade;
mod wrapped;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "sockman",
    version,
    about = "A TCP server core that never leaks a socket"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the echo server (defaults: 127.0.0.1:7000, 60s idle timeout).
    Serve(Box<serve::ServeArgs>),
    /// Run an L4 TCP proxy in front of one or more upstreams (round robin).
    Proxy(Box<proxy::ProxyArgs>),
    /// Generate load against an echo server and report throughput and latency.
    Load(load::LoadArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logger();
    let result = match cli.command {
        Command::Serve(args) => serve::run(&args),
        Command::Proxy(args) => proxy::run(&args),
        Command::Load(args) => run_load(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("sockman: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// `env_logger` (`RUST_LOG`, default `info`), with this process's pid in every line's header:
/// during an upgrade in place ([`upgrade`]) the old process and its successor write to the same
/// stderr, and each line must say whose it is.
fn init_logger() {
    use std::io::Write as _;
    let pid = std::process::id();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(move |buf, record| {
            let level = record.level();
            let style = buf.default_level_style(level);
            writeln!(
                buf,
                "[{} {style}{level:<5}{style:#} {} pid={pid}] {}",
                // Milliseconds, in UTC (`2026-12-03T06:22:34.123Z`): what operators correlate
                // logs at.
                buf.timestamp_millis(),
                record.target(),
                record.args()
            )
        })
        .init();
}

/// `sockman load`: runs the generator and prints the readable report or, with `--json`, one
/// JSON object.
fn run_load(args: &load::LoadArgs) -> Result<(), String> {
    use std::io::IsTerminal;
    let mut config = args.to_config()?;
    config.progress = std::io::stderr().is_terminal();
    let report = load::run(&config).map_err(|e| e.to_string())?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        println!("{report}");
    }
    Ok(())
}
