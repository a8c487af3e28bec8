//! What one bench worker observed, and the sum over all workers.
//!
//! Each worker owns its [`RunStats`] (no shared counters on the request path) and the totals
//! are merged once at the end.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

use super::observe::{Handshakes, Negotiated};

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
    /// Requests that got a connection (a response head arrived, or a pooled connection was
    /// checked out).
    pub(crate) checkouts: u64,
    /// Of those, the ones on a connection that already existed (pooled HTTP/1.1, or an open
    /// HTTP/2 connection).
    pub(crate) reused: u64,
    /// Handshakes completed during the run, from the connector's metrics (see
    /// [`super::observe`]); set once the run is over.
    pub(crate) handshakes: Handshakes,
    /// Responses by protocol (`HTTP/1.1`, `HTTP/2`).
    pub(crate) protocols: BTreeMap<&'static str, u64>,
    /// Requests in flight per connection in use, sampled at each response head: the sum
    /// (for the mean), the number of samples and the largest.
    pub(crate) streams_sum: f64,
    pub(crate) streams_samples: u64,
    pub(crate) streams_max: f64,
    /// Failed requests by error label (an `ErrorKind` name or an HTTP-level label).
    pub(crate) errors: BTreeMap<&'static str, u64>,
    /// Completed responses by status code.
    pub(crate) statuses: BTreeMap<u16, u64>,
    /// What the first new connection negotiated.
    pub(crate) negotiated: Option<Negotiated>,
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
            handshakes: Handshakes::default(),
            protocols: BTreeMap::new(),
            streams_sum: 0.0,
            streams_samples: 0,
            streams_max: 0.0,
            errors: BTreeMap::new(),
            statuses: BTreeMap::new(),
            negotiated: None,
        }
    }

    /// Records a request that got its connection: `reused` when it already existed.
    pub(crate) fn checkout(&mut self, reused: bool) {
        self.checkouts += 1;
        self.reused += u64::from(reused);
    }

    /// Records one sample of requests in flight per connection in use.
    pub(crate) fn streams_per_connection(&mut self, in_flight: u64, connections: u64) {
        let ratio = in_flight as f64 / connections.max(1) as f64;
        self.streams_sum += ratio;
        self.streams_samples += 1;
        self.streams_max = self.streams_max.max(ratio);
    }

    /// The protocol of the responses: `HTTP/2`, `HTTP/1.1`, or both joined by `+`.
    pub(crate) fn protocol(&self) -> String {
        if self.protocols.is_empty() {
            return "-".into();
        }
        self.protocols.keys().copied().collect::<Vec<_>>().join("+")
    }

    /// Records a complete response.
    pub(crate) fn response(&mut self, protocol: &'static str, status: u16, latency: Duration) {
        self.requests += 1;
        *self.protocols.entry(protocol).or_default() += 1;
        *self.statuses.entry(status).or_default() += 1;
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us.saturating_record(us.max(1));
    }

    /// Records a failed request.
    pub(crate) fn error(&mut self, label: &'static str) {
        *self.errors.entry(label).or_default() += 1;
    }

    /// Connections opened during the run: every completed handshake is one.
    pub(crate) fn connections_opened(&self) -> u64 {
        self.handshakes.connections()
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
        for (protocol, n) in &other.protocols {
            *self.protocols.entry(protocol).or_default() += n;
        }
        self.streams_sum += other.streams_sum;
        self.streams_samples += other.streams_samples;
        self.streams_max = self.streams_max.max(other.streams_max);
        for (label, n) in &other.errors {
            *self.errors.entry(label).or_default() += n;
        }
        for (status, n) in &other.statuses {
            *self.statuses.entry(*status).or_default() += n;
        }
    }
}
