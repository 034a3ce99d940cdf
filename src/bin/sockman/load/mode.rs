//! The kinds of load `sockman load` generates ([`Mode`]), and their names on the command line
//! and in the report; what each one measures is in the [module docs](super).
//!
//! A module of its own so that the report, the protocol and the engine name the mode without
//! importing the load module's front (which imports the report).

use std::fmt;

/// The kind of load to generate; see the [module docs](super) for what each one measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Send `size` bytes, wait for all of them back, verify, repeat.
    Pingpong,
    /// Keep `depth` messages of `size` bytes in flight per connection.
    Pipeline,
    /// Write as fast as the socket takes and read the echo concurrently (MB/s).
    Stream,
    /// Open the connections, check each echoes once, hold them for `duration`.
    Idle,
    /// Connect, one echo, close, as fast as possible (connections/s).
    Churn,
}

impl Mode {
    /// The lower-case name used on the command line and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Pingpong => "pingpong",
            Mode::Pipeline => "pipeline",
            Mode::Stream => "stream",
            Mode::Idle => "idle",
            Mode::Churn => "churn",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
