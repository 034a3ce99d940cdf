//! The result of a run: figures, parameters, a readable form and one JSON object.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::Mode;

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
    /// Total errors of every kind.
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
        let mut j = JsonObject::new();
        j.str("mode", self.mode.as_str());
        j.str("connect", &self.connect.to_string());
        j.uint("connections", self.connections as u64);
        j.uint("size", self.size as u64);
        j.uint("depth", self.depth as u64);
        j.num("rate", self.rate);
        j.num("duration_s", Some(self.duration.as_secs_f64()));
        j.num("warmup_s", Some(self.warmup.as_secs_f64()));
        let addrs: Vec<String> = self
            .source_addrs
            .iter()
            .map(|a| json_string(&a.to_string()))
            .collect();
        j.raw("source_addrs", &format!("[{}]", addrs.join(",")));
        j.opt_uint("server_pid", self.server_pid.map(u64::from));
        j.num("elapsed_s", Some(self.elapsed.as_secs_f64()));
        j.uint("ops", self.ops);
        j.num("ops_per_sec", Some(self.ops_per_sec));
        j.uint("bytes", self.bytes);
        j.num("mb_per_sec", Some(self.mb_per_sec));
        match &self.latency {
            Some(l) => {
                let mut o = JsonObject::new();
                o.uint("samples", l.samples);
                o.num("mean", Some(l.mean_us));
                o.num("p50", Some(l.p50_us));
                o.num("p90", Some(l.p90_us));
                o.num("p99", Some(l.p99_us));
                o.num("p99_9", Some(l.p999_us));
                o.num("max", Some(l.max_us));
                j.raw("latency_us", &o.finish());
            }
            None => j.raw("latency_us", "null"),
        }
        let mut e = JsonObject::new();
        for (kind, n) in &self.errors {
            e.uint(kind, *n);
        }
        j.raw("errors", &e.finish());
        j.uint("closed_by_server", self.closed_by_server);
        j.uint("connected", self.connected);
        j.opt_uint("connections_held", self.connections_held);
        j.num("connects_per_sec", self.connects_per_sec);
        j.num("server_cpu_us", self.server_cpu_us);
        j.num("server_cpu_us_per_op", self.server_cpu_us_per_op);
        j.opt_uint("server_rss_start_bytes", self.server_rss_start_bytes);
        j.opt_uint("server_rss_bytes", self.server_rss_bytes);
        j.num(
            "server_rss_per_held_connection_bytes",
            self.server_rss_per_held_connection(),
        );
        j.finish()
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

/// A JSON object written field by field.
struct JsonObject {
    out: String,
}

impl JsonObject {
    fn new() -> JsonObject {
        JsonObject {
            out: String::from("{"),
        }
    }

    fn raw(&mut self, key: &str, value: &str) {
        if self.out.len() > 1 {
            self.out.push(',');
        }
        self.out.push_str(&json_string(key));
        self.out.push(':');
        self.out.push_str(value);
    }

    fn str(&mut self, key: &str, value: &str) {
        self.raw(key, &json_string(value));
    }

    fn uint(&mut self, key: &str, value: u64) {
        self.raw(key, &value.to_string());
    }

    fn opt_uint(&mut self, key: &str, value: Option<u64>) {
        self.raw(key, &value.map_or_else(|| "null".into(), |v| v.to_string()));
    }

    /// A number with 3 decimals; `None` and non-finite values (JSON has no NaN) become null.
    fn num(&mut self, key: &str, value: Option<f64>) {
        let text = match value {
            Some(v) if v.is_finite() => format!("{v:.3}"),
            _ => "null".into(),
        };
        self.raw(key, &text);
    }

    fn finish(mut self) -> String {
        self.out.push('}');
        self.out
    }
}

/// `s` as a quoted JSON string.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal JSON checker (objects, arrays, strings, numbers, null, booleans) that returns
    /// the top-level object's keys, so the tests can fail on malformed output.
    struct Checker<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl Checker<'_> {
        fn ws(&mut self) {
            while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
                self.i += 1;
            }
        }
        fn eat(&mut self, b: u8) -> Result<(), String> {
            self.ws();
            if self.s.get(self.i) == Some(&b) {
                self.i += 1;
                Ok(())
            } else {
                Err(format!("expected {:?} at {}", b as char, self.i))
            }
        }
        fn string(&mut self) -> Result<String, String> {
            self.eat(b'"')?;
            let start = self.i;
            while let Some(&c) = self.s.get(self.i) {
                match c {
                    b'"' => {
                        self.i += 1;
                        return Ok(String::from_utf8_lossy(&self.s[start..self.i - 1]).into());
                    }
                    b'\\' => self.i += 2,
                    c if c < 0x20 => return Err(format!("control byte at {}", self.i)),
                    _ => self.i += 1,
                }
            }
            Err("unterminated string".into())
        }
        fn value(&mut self) -> Result<(), String> {
            self.ws();
            match self.s.get(self.i) {
                Some(b'{') => self.object().map(|_| ()),
                Some(b'[') => {
                    self.i += 1;
                    self.ws();
                    if self.s.get(self.i) == Some(&b']') {
                        self.i += 1;
                        return Ok(());
                    }
                    loop {
                        self.value()?;
                        self.ws();
                        match self.s.get(self.i) {
                            Some(b',') => self.i += 1,
                            Some(b']') => {
                                self.i += 1;
                                return Ok(());
                            }
                            _ => return Err(format!("bad array at {}", self.i)),
                        }
                    }
                }
                Some(b'"') => self.string().map(|_| ()),
                _ => {
                    let start = self.i;
                    while self
                        .s
                        .get(self.i)
                        .is_some_and(|c| c.is_ascii_alphanumeric() || b"+-.".contains(c))
                    {
                        self.i += 1;
                    }
                    let word = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
                    if matches!(word, "null" | "true" | "false") || word.parse::<f64>().is_ok() {
                        if word.contains("inf") || word.contains("NaN") {
                            return Err(format!("non-JSON number {word}"));
                        }
                        Ok(())
                    } else {
                        Err(format!("bad value {word:?} at {start}"))
                    }
                }
            }
        }
        fn object(&mut self) -> Result<Vec<String>, String> {
            self.eat(b'{')?;
            let mut keys = Vec::new();
            self.ws();
            if self.s.get(self.i) == Some(&b'}') {
                self.i += 1;
                return Ok(keys);
            }
            loop {
                keys.push(self.string()?);
                self.eat(b':')?;
                self.value()?;
                self.ws();
                match self.s.get(self.i) {
                    Some(b',') => self.i += 1,
                    Some(b'}') => {
                        self.i += 1;
                        return Ok(keys);
                    }
                    _ => return Err(format!("bad object at {}", self.i)),
                }
            }
        }
    }

    fn top_keys(json: &str) -> Vec<String> {
        let mut c = Checker {
            s: json.as_bytes(),
            i: 0,
        };
        let keys = c.object().unwrap_or_else(|e| panic!("{e} in {json}"));
        c.ws();
        assert_eq!(c.i, json.len(), "trailing text in {json}");
        keys
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
        let keys = top_keys(&json);
        for key in [
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
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} missing from {json}");
        }
        assert_eq!(keys.len(), 26, "{keys:?}");
        assert!(json.contains(r#""mode":"pipeline""#));
        assert!(
            json.contains(r#""errors":{"mismatch":2,"timed_out":1}"#),
            "{json}"
        );
        assert!(json.contains(r#""p99":80.200"#), "{json}");
        assert!(
            json.contains(r#""server_cpu_us":null"#),
            "NaN must be null: {json}"
        );
        assert!(json.contains(r#""source_addrs":["127.0.0.2","127.0.0.3"]"#));
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
        top_keys(&json);
        assert!(json.contains(r#""latency_us":null"#));
        assert!(json.contains(r#""errors":{}"#));
        assert!(json.contains(r#""source_addrs":[]"#));
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\n\u{1}"), r#""a\"b\\c\n\u0001""#);
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
