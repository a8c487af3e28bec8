//! What one bench worker observed, and the sum over all workers.
//!
//! Each worker owns its [`RunStats`] (no shared counters on the request path) and the totals
//! are merged once at the end.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use upstream_pool::Connection;

/// Significant decimal digits the latency histogram keeps: 0.1 % precision.
const LATENCY_SIGFIG: u8 = 3;

/// Largest latency tracked exactly, in microseconds (one minute); longer ones are recorded as
/// this value. Fixed bounds rather than auto-resizing keep recording allocation-free.
const LATENCY_MAX_US: u64 = 60_000_000;

/// Counters of one run (or one worker of it).
#[derive(Debug, Clone)]
pub(crate) struct RunStats {
    /// Latency of completed requests in microseconds, from `get` to the last response byte.
    pub(crate) latency_us: Histogram<u64>,
    /// Responses read completely.
    pub(crate) requests: u64,
    /// Successful `Connector::get` calls.
    pub(crate) checkouts: u64,
    /// Checkouts served from the pool (`Connection::reused`).
    pub(crate) reused: u64,
    /// New connections whose handshake did not resume a session.
    pub(crate) full_handshakes: HandshakeTimes,
    /// New connections whose handshake resumed a session.
    pub(crate) resumed_handshakes: HandshakeTimes,
    /// Failed requests by error label (an `ErrorKind` name or an HTTP-level label).
    pub(crate) errors: BTreeMap<&'static str, u64>,
    /// Completed responses by status code.
    pub(crate) statuses: BTreeMap<u16, u64>,
    /// What the first new connection negotiated.
    pub(crate) negotiated: Option<Negotiated>,
}

/// A count of handshakes and their summed duration.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HandshakeTimes {
    /// How many.
    pub(crate) count: u64,
    /// Their total duration.
    pub(crate) total: Duration,
}

impl HandshakeTimes {
    /// Mean duration in microseconds, `None` when there were none.
    pub(crate) fn mean_us(&self) -> Option<f64> {
        (self.count > 0).then(|| self.total.as_secs_f64() * 1e6 / self.count as f64)
    }
}

/// TLS parameters of a connection, for the summary header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Negotiated {
    /// e.g. `TLSv1.3`.
    pub(crate) version: String,
    /// OpenSSL cipher name.
    pub(crate) cipher: String,
    /// Selected ALPN protocol, if any.
    pub(crate) alpn: Option<String>,
}

impl RunStats {
    /// Empty counters.
    pub(crate) fn new() -> RunStats {
        RunStats {
            latency_us: Histogram::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGFIG)
                .unwrap_or_else(|_| unreachable!("constant bounds are valid")),
            requests: 0,
            checkouts: 0,
            reused: 0,
            full_handshakes: HandshakeTimes::default(),
            resumed_handshakes: HandshakeTimes::default(),
            errors: BTreeMap::new(),
            statuses: BTreeMap::new(),
            negotiated: None,
        }
    }

    /// Records a successful checkout: reused, or new with its handshake.
    pub(crate) fn checkout(&mut self, conn: &Connection) {
        self.checkouts += 1;
        if conn.reused() {
            self.reused += 1;
            return;
        }
        let Some(digest) = conn.digest() else { return };
        let took = conn.timing().tls_handshake.unwrap_or_default();
        let times = if digest.session_reused {
            &mut self.resumed_handshakes
        } else {
            &mut self.full_handshakes
        };
        times.count += 1;
        times.total += took;
        if self.negotiated.is_none() {
            self.negotiated = Some(Negotiated {
                version: digest.version.clone(),
                cipher: digest.cipher.clone(),
                alpn: digest
                    .alpn
                    .as_deref()
                    .map(|a| String::from_utf8_lossy(a).into_owned()),
            });
        }
    }

    /// Records a complete response.
    pub(crate) fn response(&mut self, status: u16, latency: Duration) {
        self.requests += 1;
        *self.statuses.entry(status).or_default() += 1;
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us.saturating_record(us.max(1));
    }

    /// Records a failed request.
    pub(crate) fn error(&mut self, label: &'static str) {
        *self.errors.entry(label).or_default() += 1;
    }

    /// New connections (every checkout that was not reused).
    pub(crate) fn connections_opened(&self) -> u64 {
        self.checkouts - self.reused
    }

    /// Failed requests of every kind.
    pub(crate) fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Adds `other`'s counts to these.
    pub(crate) fn merge(&mut self, other: &RunStats) {
        // Cannot fail: both histograms have the same bounds.
        let _ = self.latency_us.add(&other.latency_us);
        self.requests += other.requests;
        self.checkouts += other.checkouts;
        self.reused += other.reused;
        for (mine, theirs) in [
            (&mut self.full_handshakes, &other.full_handshakes),
            (&mut self.resumed_handshakes, &other.resumed_handshakes),
        ] {
            mine.count += theirs.count;
            mine.total += theirs.total;
        }
        for (label, n) in &other.errors {
            *self.errors.entry(label).or_default() += n;
        }
        for (status, n) in &other.statuses {
            *self.statuses.entry(*status).or_default() += n;
        }
        if self.negotiated.is_none() {
            self.negotiated.clone_from(&other.negotiated);
        }
    }
}
