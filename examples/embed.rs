//! The smallest custom protocol on sockman: a line-counting server that answers every chunk with
//! the number of newlines seen so far and closes on `quit`. Run it, then `nc 127.0.0.1 7070`.
//!
//! It drives the loop itself with `turn()` to print the metrics between turns, and stops on its
//! own after 60 s through a `Handle` used from another thread.
use std::time::Duration;

use sockman::{CloseReason, Config, Context, Handler, Server};

/// Per-connection state: newlines seen.
struct LineCounter;

impl Handler for LineCounter {
    type Conn = u64;

    fn on_open(&mut self, ctx: &mut Context<'_, u64>) -> u64 {
        ctx.write(b"send lines; 'quit' to leave\n");
        0
    }

    fn on_data(&mut self, lines: &mut u64, ctx: &mut Context<'_, u64>, data: &[u8]) {
        *lines += data.iter().filter(|&&b| b == b'\n').count() as u64;
        ctx.write(format!("{lines} lines\n").as_bytes());
        if data.starts_with(b"quit") {
            ctx.close(); // the reply above is flushed first
        }
    }

    fn on_close(&mut self, lines: u64, ctx: &mut Context<'_, u64>, reason: CloseReason) {
        println!("{} closed: {reason} after {lines} lines", ctx.id());
    }
}

fn main() -> Result<(), sockman::Error> {
    let config = Config {
        listen: vec!["127.0.0.1:7070".parse().unwrap()],
        idle_timeout: Duration::from_secs(30),
        ..Config::default()
    };
    let mut server = Server::bind(config, LineCounter)?;
    let handle = server.handle();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(60));
        handle.shutdown();
    });
    while !server.is_stopped() {
        server.turn(Some(Duration::from_secs(5)))?;
        println!("{}", server.metrics());
    }
    Ok(())
}
