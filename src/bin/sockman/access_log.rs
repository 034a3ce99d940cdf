//! The session log, `--access-log -|PATH` (off by default): one line per ended connection
//! (`serve`) or session (`proxy`), like nginx's stream `access_log` and HAProxy's `option
//! tcplog`:
//!
//! ```text
//! 2026-12-03T06:22:34.123Z client=192.0.2.7:51000 duration_ms=12 bytes_in=64 bytes_out=64 reason=peer_closed
//! 2026-12-03T06:22:34.123Z client=192.0.2.7:51000 upstream=10.0.0.5:5432 duration_ms=12 bytes_in=64 bytes_out=64 state=-- reason=handler
//! ```
//!
//! The time is the close's, in UTC with milliseconds; `client` the peer (the PROXY protocol
//! header's client when the listener requires one); `bytes_in` what the client sent, `bytes_out`
//! what it was sent; `reason` the close reason of the client's connection; for the proxy,
//! `upstream` the upstream last dialed (`-`: none) and `state` the session's termination state.
//!
//! **Cost.** Off, there is none: `serve` runs the bare handler and the proxy asks nothing.
//! On, nothing happens before a connection closes; at its close the loop formats the line into
//! a batch it owns ([`Sink`]), and a batch goes to the writer thread through a bounded channel
//! when it is full (16 KiB) or at the loop's periodic callback (every 100 ms). The loop never
//! waits for the writer: when the channel is full the batch is dropped and its lines counted
//! (`access_log_dropped` in the stats line, `sockman_access_log_dropped_total` in `/metrics`).
//!
//! **Rotation.** A file is opened for appending (created if need be) at start, and opened again
//! on `SIGHUP` (within a second, or at the next batch), after a rotator renamed it. A write that
//! fails drops its lines, counted, with one warning until writes work again.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::{info, warn};

/// A batch is sent to the writer once it holds this much.
const BATCH: usize = 16 * 1024;
/// Batches the channel holds (4 MiB of lines at most) before lines are dropped.
const QUEUE: usize = 256;
/// How often a loop with the access log on sends what it has (its periodic callback).
pub(crate) const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// How often the writer looks at the reopen flag while no batch comes.
const REOPEN_CHECK: Duration = Duration::from_secs(1);

/// `--access-log`: where the lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// `-`: standard error, with the log.
    Stderr,
    /// A file, appended to and reopened on SIGHUP.
    File(PathBuf),
}

/// The `--access-log` flag, flattened into `serve`'s and `proxy`'s.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// One line per ended connection (serve) or session (proxy): its time, client, upstream,
    /// duration, bytes each way and why it ended. `-` for stderr, or a file (appended to;
    /// reopened on SIGHUP, for log rotation). Off unless given.
    #[arg(long = "access-log", value_name = "-|PATH", env = "SOCKMAN_ACCESS_LOG", value_parser = parse_target)]
    pub(crate) target: Option<Target>,
}

fn parse_target(text: &str) -> Result<Target, String> {
    match text {
        "" => Err("an empty path (use - for stderr)".into()),
        "-" => Ok(Target::Stderr),
        path => Ok(Target::File(PathBuf::from(path))),
    }
}

/// Lines from a loop, for the writer.
struct Batch {
    text: String,
    lines: u64,
}

/// What the writer, the loops and the signal handler share.
#[derive(Debug, Default)]
struct Shared {
    /// Lines dropped: the channel was full, or a write failed.
    dropped: AtomicU64,
    /// Set by SIGHUP: open the file again.
    reopen: Arc<AtomicBool>,
    /// Set when every loop is done: the writer writes what is queued and ends.
    stop: AtomicBool,
}

/// The access log's writer thread, and the handle each loop logs through ([`AccessLog::sink`]).
#[derive(Debug)]
pub(crate) struct AccessLog {
    tx: Option<SyncSender<Batch>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Where the writer writes.
enum Out {
    Stderr,
    File { path: PathBuf, file: File },
}

fn open(path: &PathBuf) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

impl AccessLog {
    /// Opens `target` (a file is created if need be: an error names it), starts the writer
    /// thread, and for a file reopens it on SIGHUP.
    pub(crate) fn start(target: &Target) -> Result<AccessLog, String> {
        let shared = Arc::new(Shared::default());
        let out = match target {
            Target::Stderr => Out::Stderr,
            Target::File(path) => {
                let file = open(path)
                    .map_err(|e| format!("cannot open the access log {}: {e}", path.display()))?;
                signal_hook::flag::register(
                    signal_hook::consts::SIGHUP,
                    Arc::clone(&shared.reopen),
                )
                .map_err(|e| format!("cannot install the SIGHUP handler: {e}"))?;
                Out::File {
                    path: path.clone(),
                    file,
                }
            }
        };
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let writer = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_batches(rx, out, &writer))
            .map_err(|e| format!("cannot start the access log's thread: {e}"))?;
        Ok(AccessLog {
            tx: Some(tx),
            shared,
            thread: Some(thread),
        })
    }

    /// A loop's handle: its own batch, the writer's channel.
    pub(crate) fn sink(&self) -> Sink {
        Sink {
            tx: self.tx.clone(),
            shared: Arc::clone(&self.shared),
            batch: String::new(),
            lines: 0,
        }
    }

    /// Lines dropped so far.
    pub(crate) fn dropped(&self) -> u64 {
        self.shared.dropped.load(Relaxed)
    }

    /// After every loop is done (their sinks dropped, so flushed): the writer writes what is
    /// queued and ends; waits for it.
    pub(crate) fn finish(mut self) {
        self.shared.stop.store(true, Relaxed);
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The writer thread: writes each batch, reopens the file when asked, ends once every sender
/// is gone or it is told to stop and nothing is queued.
fn write_batches(rx: Receiver<Batch>, mut out: Out, shared: &Shared) {
    let mut failing = false;
    loop {
        let batch = match rx.recv_timeout(REOPEN_CHECK) {
            Ok(batch) => Some(batch),
            Err(RecvTimeoutError::Timeout) if shared.stop.load(Relaxed) => break,
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if shared.reopen.swap(false, Relaxed) {
            if let Out::File { path, file } = &mut out {
                match open(path) {
                    Ok(new) => {
                        *file = new;
                        info!("SIGHUP: access log {} reopened", path.display());
                    }
                    Err(e) => warn!(
                        "SIGHUP: cannot reopen the access log {}: {e}; still writing to the file open before",
                        path.display()
                    ),
                }
            }
        }
        let Some(batch) = batch else { continue };
        let written = match &mut out {
            Out::Stderr => std::io::stderr().lock().write_all(batch.text.as_bytes()),
            Out::File { file, .. } => file.write_all(batch.text.as_bytes()),
        };
        match written {
            Ok(()) => failing = false,
            Err(e) => {
                shared.dropped.fetch_add(batch.lines, Relaxed);
                if !std::mem::replace(&mut failing, true) {
                    warn!("cannot write the access log: {e}; dropping lines until writes work");
                }
            }
        }
    }
}

/// One loop's side of the access log: the lines of connections closed since the last batch
/// went out. Owned by the loop's handler; dropping it sends what it holds.
#[derive(Debug)]
pub(crate) struct Sink {
    tx: Option<SyncSender<Batch>>,
    shared: Arc<Shared>,
    batch: String,
    lines: u64,
}

impl Sink {
    /// Appends one line: the time now, then what `fields` writes (` key=value` pairs, each
    /// starting with a space; no newline). Sends the batch once it is full.
    pub(crate) fn line(&mut self, fields: impl FnOnce(&mut String)) {
        if self.batch.capacity() == 0 {
            self.batch.reserve(BATCH + 512);
        }
        write_time(&mut self.batch, SystemTime::now());
        fields(&mut self.batch);
        self.batch.push('\n');
        self.lines += 1;
        if self.batch.len() >= BATCH {
            self.flush();
        }
    }

    /// Sends what is batched, if anything, without waiting: a full channel drops it (counted).
    pub(crate) fn flush(&mut self) {
        if self.lines == 0 {
            return;
        }
        let batch = Batch {
            text: std::mem::take(&mut self.batch),
            lines: std::mem::take(&mut self.lines),
        };
        let Some(tx) = &self.tx else { return };
        match tx.try_send(batch) {
            Ok(()) => {}
            Err(TrySendError::Full(b) | TrySendError::Disconnected(b)) => {
                self.shared.dropped.fetch_add(b.lines, Relaxed);
                // Reuse the buffer.
                self.batch = b.text;
                self.batch.clear();
            }
        }
    }

    /// The `/metrics` family of dropped lines.
    pub(crate) fn write_metrics(&self, out: &mut String) {
        let name = "sockman_access_log_dropped_total";
        let _ = writeln!(
            out,
            "# HELP {name} Access log lines dropped: the writer fell behind (its queue was full) or a write failed.\n# TYPE {name} counter\n{name} {}",
            self.shared.dropped.load(Relaxed)
        );
    }
}

impl Drop for Sink {
    /// The loop is done: what is left waits for room in the channel (the writer is still
    /// running: [`AccessLog::finish`] comes after every loop).
    fn drop(&mut self) {
        if self.lines > 0 {
            if let Some(tx) = self.tx.take() {
                let batch = Batch {
                    text: std::mem::take(&mut self.batch),
                    lines: self.lines,
                };
                if tx.send(batch).is_err() {
                    self.shared.dropped.fetch_add(self.lines, Relaxed);
                }
            }
        }
    }
}

/// Appends `t` as RFC 3339 in UTC with milliseconds: `2026-12-03T06:22:34.123Z`.
pub(crate) fn write_time(out: &mut String, t: SystemTime) {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm: eras of 400 years from 0000-03-01).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60,
        since.subsec_millis()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc_3339_utc_with_milliseconds() {
        let at = |ms: u64| {
            let mut s = String::new();
            write_time(&mut s, UNIX_EPOCH + Duration::from_millis(ms));
            s
        };
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(1_796_278_954_123), "2026-12-03T06:22:34.123Z");
        assert_eq!(at(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
        assert_eq!(at(951_868_800_000), "2000-03-01T00:00:00.000Z");
        assert_eq!(at(946_641_600_000), "1999-12-31T12:00:00.000Z");
    }

    #[test]
    fn a_full_queue_drops_lines_and_counts_them_never_waits() {
        // A writer that never takes anything: a queue of one batch.
        let (tx, _rx) = mpsc::sync_channel(1);
        let shared = Arc::new(Shared::default());
        let mut sink = Sink {
            tx: Some(tx),
            shared: Arc::clone(&shared),
            batch: String::new(),
            lines: 0,
        };
        sink.line(|s| s.push_str(" one"));
        sink.flush(); // queued
        sink.line(|s| s.push_str(" two"));
        sink.line(|s| s.push_str(" three"));
        sink.flush(); // the queue is full: dropped, counted
        assert_eq!(shared.dropped.load(Relaxed), 2);
        let mut metrics = String::new();
        sink.write_metrics(&mut metrics);
        assert!(
            metrics.contains("\nsockman_access_log_dropped_total 2\n"),
            "{metrics}"
        );
        // Dropping the sink with nothing batched does not wait for the full queue.
        drop(sink);
    }
}
