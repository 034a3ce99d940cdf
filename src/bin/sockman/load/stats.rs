//! The run's counters ([`Stats`]): what the engine counts about connections (errors, closes,
//! connects) and what [`Conn`](super::protocol::Conn) counts about messages (operations,
//! verified bytes, latency), in one place that both can import.
//!
//! Owns the error labels of the report: an I/O error counts under its kind in snake case
//! ([`kind_label`]).

use std::collections::BTreeMap;
use std::io::ErrorKind;

use hdrhistogram::Histogram;

/// Counters of the run; [`Conn`](super::protocol::Conn) counts its completed messages and
/// verified bytes itself.
#[derive(Debug)]
pub(super) struct Stats {
    /// Errors by label (see `Report::errors`).
    pub(super) errors: BTreeMap<String, u64>,
    pub(super) closed_by_server: u64,
    pub(super) connected: u64,
    /// Operations over the whole run, for the progress line.
    pub(super) ops_total: u64,
    /// Operations in the window.
    pub(super) ops: u64,
    /// Verified echoed bytes in the window.
    pub(super) bytes: u64,
    /// Idle: connections whose one echo was verified.
    pub(super) idle_checked: u64,
    /// Latency in ns, window only.
    pub(super) hist: Histogram<u64>,
}

impl Stats {
    /// All counters at zero, latency going into `hist`.
    pub(super) fn new(hist: Histogram<u64>) -> Stats {
        Stats {
            errors: BTreeMap::new(),
            closed_by_server: 0,
            connected: 0,
            ops_total: 0,
            ops: 0,
            bytes: 0,
            idle_checked: 0,
            hist,
        }
    }

    /// Counts one error under `label`.
    pub(super) fn error(&mut self, label: &str) {
        *self.errors.entry(label.to_string()).or_insert(0) += 1;
    }
}

/// The label of an error kind in the report: `ConnectionRefused` → `connection_refused`.
pub(super) fn kind_label(kind: ErrorKind) -> String {
    let name = format!("{kind:?}");
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else if c.is_ascii_alphanumeric() {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_become_snake_case_labels() {
        assert_eq!(
            kind_label(ErrorKind::ConnectionRefused),
            "connection_refused"
        );
        assert_eq!(kind_label(ErrorKind::TimedOut), "timed_out");
        assert_eq!(
            kind_label(ErrorKind::AddrNotAvailable),
            "addr_not_available"
        );
        assert_eq!(kind_label(ErrorKind::Other), "other");
    }
}
