//! The result of a run: figures, parameters, a readable form and one JSON object.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Serialize, Serializer};

use super::mode::Mode;

/// Latency percentiles of the messages completed in the measured window, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// Messages measured.
    pub samples: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Slowest message.
    pub max_us: f64,
}

/// What one [`run`](super::run) measured, with the parameters it ran with.
///
/// Rates are over [`Report::elapsed`], the measured window (after warmup; idle: the hold).
/// MB are 10⁶ bytes. Fields that do not apply to the mode, or that could not be read, are
/// `None` ("n/a" in the readable form, `null` in JSON).
#[derive(Debug, Clone)]
pub struct Report {
    /// The mode that ran.
    pub mode: Mode,
    /// The server address.
    pub connect: SocketAddr,
    /// Connections requested (churn: workers).
    pub connections: usize,
    /// Message size in bytes (stream: the unit of an operation).
    pub size: usize,
    /// Messages in flight per connection.
    pub depth: usize,
    /// Requested total messages/s, if fixed.
    pub rate: Option<f64>,
    /// Requested measured time (idle: hold time).
    pub duration: Duration,
    /// Requested warmup.
    pub warmup: Duration,
    /// Source addresses used round-robin (empty: kernel's choice).
    pub source_addrs: Vec<IpAddr>,
    /// The server process sampled, if any.
    pub server_pid: Option<u32>,
    /// Length of the measured window actually run (shorter than `duration` if every
    /// connection was lost early).
    pub elapsed: Duration,
    /// Operations completed in the window: verified echoes of `size` bytes (stream: echoed
    /// bytes / `size`; churn: connect-echo-close cycles; idle: connections that echoed once).
    pub ops: u64,
    /// `ops` per second of `elapsed` (idle: 0, nothing is timed).
    pub ops_per_sec: f64,
    /// Verified echoed bytes in the window: `ops × size` in pingpong, pipeline and churn, every
    /// echoed byte in stream mode, 0 in idle mode.
    pub bytes: u64,
    /// `bytes` per second of `elapsed`, in 10⁶ bytes.
    pub mb_per_sec: f64,
    /// Latency of the window's messages; `None` in stream and idle mode or with no samples.
    pub latency: Option<Latency>,
    /// Errors over the whole run by kind: snake_case `io::ErrorKind` names (`connection_refused`,
    /// `timed_out`, ...), `mismatch` (echo differs from what was sent) and `server_closed`
    /// (end of stream while echoed data was still owed).
    pub errors: BTreeMap<String, u64>,
    /// Connections the server closed or reset, over the whole run.
    pub closed_by_server: u64,
    /// Connections that succeeded over the whole run.
    pub connected: u64,
    /// Idle mode: connections still open at the end of the hold.
    pub connections_held: Option<u64>,
    /// Churn mode: completed connect-echo-close cycles per second.
    pub connects_per_sec: Option<f64>,
    /// Server CPU (user + system) over the window, in µs.
    pub server_cpu_us: Option<f64>,
    /// `server_cpu_us / ops` (not in idle mode).
    pub server_cpu_us_per_op: Option<f64>,
    /// Server RSS before the first connect, in bytes.
    pub server_rss_start_bytes: Option<u64>,
    /// Server RSS at the end of the window, connections still open, in bytes.
    pub server_rss_bytes: Option<u64>,
}

impl Report {
    /// Total errors of every kind (the tests' shorthand; the binary prints them by kind).
    #[cfg(test)]
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Idle mode: server RSS growth per held connection, (end − start) / held, in bytes.
    pub fn server_rss_per_held_connection(&self) -> Option<f64> {
        let held = self.connections_held.filter(|&h| h > 0)?;
        let (start, end) = (self.server_rss_start_bytes?, self.server_rss_bytes?);
        Some((end as f64 - start as f64) / held as f64)
    }

    /// The report as one JSON object on one line (keys are stable; absent values are `null`).
    pub fn to_json(&self) -> String {
        serde_json::to_string(&JsonReport::from(self))
            .expect("a report serializes: string keys, no failing Serialize impl")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sockman load: {} → {}, {} connections, {} B",
            self.mode, self.connect, self.connections, self.size
        )?;
        if self.mode == Mode::Pipeline {
            write!(f, ", depth {}", self.depth)?;
        }
        if let Some(rate) = self.rate {
            write!(f, ", rate {rate}/s")?;
        }
        if !self.source_addrs.is_empty() {
            write!(f, ", {} source addresses", self.source_addrs.len())?;
        }
        if self.mode == Mode::Idle {
            writeln!(
                f,
                "\n  hold        {:.2} s (of {:.2} s)",
                self.elapsed.as_secs_f64(),
                self.duration.as_secs_f64()
            )?;
        } else {
            writeln!(
                f,
                "\n  window      {:.2} s (of {:.2} s, after {:.2} s warmup)",
                self.elapsed.as_secs_f64(),
                self.duration.as_secs_f64(),
                self.warmup.as_secs_f64()
            )?;
        }
        match self.mode {
            Mode::Idle => {
                writeln!(
                    f,
                    "  held        {} of {} (echo checked on {})",
                    opt(self.connections_held),
                    self.connections,
                    self.ops
                )?;
            }
            Mode::Churn => {
                writeln!(
                    f,
                    "  connects/s  {}  ({} cycles)",
                    opt_f(self.connects_per_sec, 1),
                    self.ops
                )?;
            }
            _ => {
                writeln!(
                    f,
                    "  ops         {} ({:.1}/s)   {:.2} MB/s",
                    self.ops, self.ops_per_sec, self.mb_per_sec
                )?;
            }
        }
        match &self.latency {
            Some(l) => writeln!(
                f,
                "  latency µs  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  (mean {:.1}, {} samples)",
                l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, l.mean_us, l.samples
            )?,
            None => writeln!(f, "  latency µs  n/a")?,
        }
        if self.errors.is_empty() {
            writeln!(f, "  errors      none")?;
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, n)| format!("{k}={n}"))
                .collect();
            writeln!(f, "  errors      {}", list.join(" "))?;
        }
        writeln!(
            f,
            "  closed by server {}   connected {}",
            self.closed_by_server, self.connected
        )?;
        if let Some(pid) = self.server_pid {
            write!(
                f,
                "  server {pid}  cpu {} µs/op ({} µs), rss {}",
                opt_f(self.server_cpu_us_per_op, 2),
                opt_f(self.server_cpu_us, 0),
                opt(self.server_rss_bytes.map(|b| format!("{} KiB", b / 1024)))
            )?;
            if let Some(per) = self.server_rss_per_held_connection() {
                write!(f, " ({per:.0} B per held connection)")?;
            }
        } else {
            write!(f, "  server      n/a (no --server-pid)")?;
        }
        Ok(())
    }
}

/// `Some(v)` as text, `None` as "n/a".
fn opt<T: fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| v.to_string())
}

/// `Some(v)` with `decimals`, `None` as "n/a".
fn opt_f(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.decimals$}"))
}

/// The JSON form of a [`Report`], key for key: times in seconds, latency in µs under short
/// keys, and the derived `server_rss_per_held_connection_bytes`. Fractions are rounded to 3
/// decimals; `None` and non-finite numbers (JSON has no NaN) are `null`.
#[derive(Serialize)]
struct JsonReport<'a> {
    mode: &'static str,
    connect: SocketAddr,
    connections: usize,
    size: usize,
    depth: usize,
    #[serde(serialize_with = "milli")]
    rate: Option<f64>,
    #[serde(serialize_with = "milli")]
    duration_s: Option<f64>,
    #[serde(serialize_with = "milli")]
    warmup_s: Option<f64>,
    source_addrs: &'a [IpAddr],
    server_pid: Option<u32>,
    #[serde(serialize_with = "milli")]
    elapsed_s: Option<f64>,
    ops: u64,
    #[serde(serialize_with = "milli")]
    ops_per_sec: Option<f64>,
    bytes: u64,
    #[serde(serialize_with = "milli")]
    mb_per_sec: Option<f64>,
    latency_us: Option<JsonLatency>,
    errors: &'a BTreeMap<String, u64>,
    closed_by_server: u64,
    connected: u64,
    connections_held: Option<u64>,
    #[serde(serialize_with = "milli")]
    connects_per_sec: Option<f64>,
    #[serde(serialize_with = "milli")]
    server_cpu_us: Option<f64>,
    #[serde(serialize_with = "milli")]
    server_cpu_us_per_op: Option<f64>,
    server_rss_start_bytes: Option<u64>,
    server_rss_bytes: Option<u64>,
    #[serde(serialize_with = "milli")]
    server_rss_per_held_connection_bytes: Option<f64>,
}

/// The JSON form of a [`Latency`].
#[derive(Serialize)]
struct JsonLatency {
    samples: u64,
    #[serde(serialize_with = "milli")]
    mean: Option<f64>,
    #[serde(serialize_with = "milli")]
    p50: Option<f64>,
    #[serde(serialize_with = "milli")]
    p90: Option<f64>,
    #[serde(serialize_with = "milli")]
    p99: Option<f64>,
    #[serde(serialize_with = "milli")]
    p99_9: Option<f64>,
    #[serde(serialize_with = "milli")]
    max: Option<f64>,
}

impl<'a> From<&'a Report> for JsonReport<'a> {
    fn from(r: &'a Report) -> Self {
        JsonReport {
            mode: r.mode.as_str(),
            connect: r.connect,
            connections: r.connections,
            size: r.size,
            depth: r.depth,
            rate: r.rate,
            duration_s: Some(r.duration.as_secs_f64()),
            warmup_s: Some(r.warmup.as_secs_f64()),
            source_addrs: &r.source_addrs,
            server_pid: r.server_pid,
            elapsed_s: Some(r.elapsed.as_secs_f64()),
            ops: r.ops,
            ops_per_sec: Some(r.ops_per_sec),
            bytes: r.bytes,
            mb_per_sec: Some(r.mb_per_sec),
            latency_us: r.latency.map(|l| JsonLatency {
                samples: l.samples,
                mean: Some(l.mean_us),
                p50: Some(l.p50_us),
                p90: Some(l.p90_us),
                p99: Some(l.p99_us),
                p99_9: Some(l.p999_us),
                max: Some(l.max_us),
            }),
            errors: &r.errors,
            closed_by_server: r.closed_by_server,
            connected: r.connected,
            connections_held: r.connections_held,
            connects_per_sec: r.connects_per_sec,
            server_cpu_us: r.server_cpu_us,
            server_cpu_us_per_op: r.server_cpu_us_per_op,
            server_rss_start_bytes: r.server_rss_start_bytes,
            server_rss_bytes: r.server_rss_bytes,
            server_rss_per_held_connection_bytes: r.server_rss_per_held_connection(),
        }
    }
}

/// A number rounded to 3 decimals (as the report has always printed them); `None` and
/// non-finite values become `null`. Values too large for a thousandth to matter are kept whole.
fn milli<S: Serializer>(value: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match *value {
        Some(v) if v.is_finite() => {
            let rounded = if v.abs() < 1e15 {
                (v * 1000.0).round() / 1000.0
            } else {
                v
            };
            s.serialize_f64(rounded)
        }
        _ => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::{Map, Value};

    /// The keys of a report's JSON object, in the order they are written.
    const KEYS: [&str; 26] = [
        "mode",
        "connect",
        "connections",
        "size",
        "depth",
        "rate",
        "duration_s",
        "warmup_s",
        "source_addrs",
        "server_pid",
        "elapsed_s",
        "ops",
        "ops_per_sec",
        "bytes",
        "mb_per_sec",
        "latency_us",
        "errors",
        "closed_by_server",
        "connected",
        "connections_held",
        "connects_per_sec",
        "server_cpu_us",
        "server_cpu_us_per_op",
        "server_rss_start_bytes",
        "server_rss_bytes",
        "server_rss_per_held_connection_bytes",
    ];

    /// Parses `json` as one object and checks it has exactly [`KEYS`], written in that order.
    fn parse(json: &str) -> Map<String, Value> {
        let value: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e} in {json}"));
        let Value::Object(top) = value else {
            panic!("not an object: {json}")
        };
        assert_eq!(top.len(), KEYS.len(), "{json}");
        let mut last = 0;
        for key in KEYS {
            assert!(top.contains_key(key), "{key} missing from {json}");
            let at = json
                .find(&format!("\"{key}\":"))
                .unwrap_or_else(|| panic!("{key} not found in {json}"));
            assert!(at >= last, "{key} out of order in {json}");
            last = at;
        }
        top
    }

    fn sample() -> Report {
        Report {
            mode: Mode::Pipeline,
            connect: "127.0.0.1:7000".parse().unwrap(),
            connections: 50,
            size: 64,
            depth: 16,
            rate: Some(1000.0),
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            source_addrs: vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()],
            server_pid: Some(42),
            elapsed: Duration::from_millis(10_000),
            ops: 12_345,
            ops_per_sec: 1234.5,
            bytes: 12_345 * 64,
            mb_per_sec: 0.079,
            latency: Some(Latency {
                samples: 12_345,
                mean_us: 31.5,
                p50_us: 30.1,
                p90_us: 40.0,
                p99_us: 80.2,
                p999_us: 150.0,
                max_us: 900.0,
            }),
            errors: [("mismatch".to_string(), 2), ("timed_out".to_string(), 1)]
                .into_iter()
                .collect(),
            closed_by_server: 3,
            connected: 50,
            connections_held: None,
            connects_per_sec: None,
            server_cpu_us: Some(f64::NAN),
            server_cpu_us_per_op: Some(5.25),
            server_rss_start_bytes: None,
            server_rss_bytes: Some(4 << 20),
        }
    }

    #[test]
    fn json_is_one_object_with_every_key() {
        let json = sample().to_json();
        assert!(!json.contains('\n'));
        let top = parse(&json);
        assert_eq!(top["mode"], "pipeline");
        assert_eq!(top["connect"], "127.0.0.1:7000");
        assert_eq!(top["connections"], 50);
        assert_eq!(top["size"], 64);
        assert_eq!(top["depth"], 16);
        assert_eq!(top["rate"], 1000.0);
        assert_eq!(top["duration_s"], 10.0);
        assert_eq!(top["warmup_s"], 1.0);
        assert_eq!(
            top["source_addrs"],
            serde_json::json!(["127.0.0.2", "127.0.0.3"])
        );
        assert_eq!(top["server_pid"], 42);
        assert_eq!(top["elapsed_s"], 10.0);
        assert_eq!(top["ops"], 12_345);
        assert_eq!(top["ops_per_sec"], 1234.5);
        assert_eq!(top["bytes"], 12_345 * 64);
        assert_eq!(top["mb_per_sec"], 0.079);
        // Compared as one JSON value: exactly these keys, and each number of the same kind
        // (`samples` an integer, the times floats as `milli` writes them: 40.0, not 40).
        assert_eq!(
            top["latency_us"],
            serde_json::json!({
                "samples": 12_345,
                "mean": 31.5,
                "p50": 30.1,
                "p90": 40.0,
                "p99": 80.2,
                "p99_9": 150.0,
                "max": 900.0,
            }),
            "{json}"
        );
        assert!(
            json.contains(r#""errors":{"mismatch":2,"timed_out":1}"#),
            "{json}"
        );
        assert_eq!(top["closed_by_server"], 3);
        assert_eq!(top["connected"], 50);
        assert_eq!(top["connections_held"], Value::Null);
        assert_eq!(top["connects_per_sec"], Value::Null);
        assert_eq!(
            top["server_cpu_us"],
            Value::Null,
            "NaN must be null: {json}"
        );
        assert_eq!(top["server_cpu_us_per_op"], 5.25);
        assert_eq!(top["server_rss_start_bytes"], Value::Null);
        assert_eq!(top["server_rss_bytes"], 4 << 20);
        assert_eq!(top["server_rss_per_held_connection_bytes"], Value::Null);
    }

    #[test]
    fn json_without_optional_parts_is_still_valid() {
        let mut r = sample();
        r.latency = None;
        r.errors.clear();
        r.source_addrs.clear();
        r.server_pid = None;
        r.rate = None;
        let json = r.to_json();
        let top = parse(&json);
        assert_eq!(top["latency_us"], Value::Null);
        assert_eq!(top["errors"], serde_json::json!({}));
        assert_eq!(top["source_addrs"], serde_json::json!([]));
        assert_eq!(top["server_pid"], Value::Null);
        assert_eq!(top["rate"], Value::Null);
    }

    #[test]
    fn json_idle_figures_and_rounding() {
        let mut r = sample();
        r.mode = Mode::Idle;
        r.connections_held = Some(1000);
        r.server_rss_start_bytes = Some(1 << 20);
        r.server_rss_bytes = Some((1 << 20) + 128_000);
        r.connects_per_sec = Some(f64::INFINITY);
        r.mb_per_sec = 1.234_567_8;
        let top = parse(&r.to_json());
        assert_eq!(top["mode"], "idle");
        assert_eq!(top["connections_held"], 1000);
        assert_eq!(top["server_rss_start_bytes"], 1 << 20);
        assert_eq!(top["server_rss_per_held_connection_bytes"], 128.0);
        assert_eq!(
            top["connects_per_sec"],
            Value::Null,
            "infinity must be null"
        );
        assert_eq!(top["mb_per_sec"], 1.235, "3 decimals");
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut r = sample();
        let label = "a\"b\\c\n\u{1}";
        r.errors = [(label.to_string(), 1)].into_iter().collect();
        let top = parse(&r.to_json());
        assert_eq!(top["errors"][label], 1);
    }

    #[test]
    fn display_mentions_the_figures_and_na() {
        let mut r = sample();
        r.server_cpu_us_per_op = None;
        let text = r.to_string();
        assert!(text.contains("p99 80.2"), "{text}");
        assert!(text.contains("mismatch=2"), "{text}");
        assert!(text.contains("n/a µs/op"), "{text}");
        assert!(text.contains("depth 16"), "{text}");
    }

    #[test]
    fn rss_per_held_connection_needs_both_samples() {
        let mut r = sample();
        r.mode = Mode::Idle;
        r.connections_held = Some(1000);
        assert_eq!(r.server_rss_per_held_connection(), None);
        r.server_rss_start_bytes = Some(1 << 20);
        r.server_rss_bytes = Some((1 << 20) + 128_000);
        assert_eq!(r.server_rss_per_held_connection(), Some(128.0));
    }
}
