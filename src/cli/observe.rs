//! What `bench` learns from the connector's own metrics: the `metrics` recorder it installs.
//!
//! `bench` drives the library's HTTP layer, which dials, shares and pools connections out of
//! sight (an HTTP/2 connection serves many requests; concurrent first requests share one
//! dial). The connector records every completed handshake (`upstream_tls_handshakes_total`,
//! `upstream_tls_handshake_duration_seconds`) and every connection it hands out
//! (`upstream_pool_active_connections`), so counting those is exact however the requests
//! map onto connections: connections opened = handshakes completed.
//!
//! With `--metrics-addr` the same recorder also feeds the Prometheus exporter, so both see
//! every update.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};
use metrics_exporter_prometheus::PrometheusRecorder;
use upstream_pool::metrics::{ACTIVE_CONNECTIONS, TLS_HANDSHAKES_TOTAL, TLS_HANDSHAKE_DURATION};

/// The counters the recorder feeds; process-wide because a `metrics` recorder is.
#[derive(Debug)]
pub(crate) struct Taps {
    full: AtomicU64,
    resumed: AtomicU64,
    /// Summed handshake durations, in nanoseconds.
    full_ns: AtomicU64,
    resumed_ns: AtomicU64,
    /// Connections handed out and not yet released or closed, over every connector.
    active: AtomicI64,
    /// Version, cipher and ALPN of the first handshake.
    negotiated: OnceLock<Negotiated>,
}

/// TLS parameters of a connection, for the summary header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Negotiated {
    /// e.g. `TLSv1.3`.
    pub(crate) version: String,
    /// OpenSSL cipher name.
    pub(crate) cipher: String,
    /// Selected ALPN protocol, `None` when none was.
    pub(crate) alpn: Option<String>,
}

/// Handshake counts and total durations at one moment; subtract two for one run's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Handshakes {
    /// Full handshakes completed.
    pub(crate) full: u64,
    /// Resumed handshakes completed.
    pub(crate) resumed: u64,
    /// Their summed durations.
    pub(crate) full_time: Duration,
    /// Their summed durations.
    pub(crate) resumed_time: Duration,
}

impl Handshakes {
    /// What happened between `earlier` and `self`.
    pub(crate) fn since(self, earlier: Handshakes) -> Handshakes {
        Handshakes {
            full: self.full - earlier.full,
            resumed: self.resumed - earlier.resumed,
            full_time: self.full_time.saturating_sub(earlier.full_time),
            resumed_time: self.resumed_time.saturating_sub(earlier.resumed_time),
        }
    }

    /// Connections opened: every completed handshake is one.
    pub(crate) fn connections(&self) -> u64 {
        self.full + self.resumed
    }

    /// Mean full handshake in microseconds, `None` without one.
    pub(crate) fn full_mean_us(&self) -> Option<f64> {
        mean_us(self.full_time, self.full)
    }

    /// Mean resumed handshake in microseconds, `None` without one.
    pub(crate) fn resumed_mean_us(&self) -> Option<f64> {
        mean_us(self.resumed_time, self.resumed)
    }
}

fn mean_us(total: Duration, count: u64) -> Option<f64> {
    (count > 0).then(|| total.as_secs_f64() * 1e6 / count as f64)
}

static TAPS: Taps = Taps {
    full: AtomicU64::new(0),
    resumed: AtomicU64::new(0),
    full_ns: AtomicU64::new(0),
    resumed_ns: AtomicU64::new(0),
    active: AtomicI64::new(0),
    negotiated: OnceLock::new(),
};

/// The process's taps; all zero until [`install`] ran.
pub(crate) fn taps() -> &'static Taps {
    &TAPS
}

impl Taps {
    /// Handshakes so far.
    pub(crate) fn handshakes(&self) -> Handshakes {
        Handshakes {
            full: self.full.load(Ordering::Relaxed),
            resumed: self.resumed.load(Ordering::Relaxed),
            full_time: Duration::from_nanos(self.full_ns.load(Ordering::Relaxed)),
            resumed_time: Duration::from_nanos(self.resumed_ns.load(Ordering::Relaxed)),
        }
    }

    /// Connections checked out of a pool right now (an HTTP/2 connection counts for its
    /// whole life; an HTTP/1.1 one while it carries a request).
    pub(crate) fn active_connections(&self) -> u64 {
        u64::try_from(self.active.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// What the first handshake negotiated.
    pub(crate) fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.get()
    }
}

/// Installs the recorder, forwarding to `prometheus` too when given. Call before any
/// connector exists: a connector resolves its metric handles when a peer is first used, and
/// handles resolved without a recorder stay no-ops.
///
/// # Errors
/// A message when a recorder is already installed (a second call).
pub(crate) fn install(prometheus: Option<PrometheusRecorder>) -> Result<(), String> {
    metrics::set_global_recorder(BenchRecorder { inner: prometheus })
        .map_err(|_| "a metrics recorder is already installed".to_string())
}

/// Taps the connector's connection metrics; everything goes on to `inner` when present.
#[derive(Debug)]
struct BenchRecorder {
    inner: Option<PrometheusRecorder>,
}

/// Which tap a histogram or counter key feeds.
fn resumed_label(key: &Key) -> Option<bool> {
    key.labels()
        .find(|l| l.key() == "resumed")
        .map(|l| l.value() == "true")
}

fn label(key: &Key, name: &str) -> Option<String> {
    key.labels()
        .find(|l| l.key() == name)
        .map(|l| l.value().to_string())
}

impl Recorder for BenchRecorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        if let Some(inner) = &self.inner {
            inner.describe_counter(key, unit, description);
        }
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        if let Some(inner) = &self.inner {
            inner.describe_gauge(key, unit, description);
        }
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        if let Some(inner) = &self.inner {
            inner.describe_histogram(key, unit, description);
        }
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        let inner = self
            .inner
            .as_ref()
            .map(|r| r.register_counter(key, metadata));
        if key.name() != TLS_HANDSHAKES_TOTAL {
            return inner.unwrap_or_else(Counter::noop);
        }
        // Registered once per handshake (the labels carry what was negotiated), so this is
        // off the request path.
        if TAPS.negotiated.get().is_none() {
            let _ = TAPS.negotiated.set(Negotiated {
                version: label(key, "version").unwrap_or_default(),
                cipher: label(key, "cipher").unwrap_or_default(),
                alpn: label(key, "alpn").filter(|a| a != "none"),
            });
        }
        let tap = if resumed_label(key) == Some(true) {
            &TAPS.resumed
        } else {
            &TAPS.full
        };
        Counter::from_arc(Arc::new(TapCounter { tap, inner }))
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        let inner = self.inner.as_ref().map(|r| r.register_gauge(key, metadata));
        if key.name() != ACTIVE_CONNECTIONS {
            return inner.unwrap_or_else(Gauge::noop);
        }
        Gauge::from_arc(Arc::new(TapGauge {
            tap: &TAPS.active,
            inner,
        }))
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        let inner = self
            .inner
            .as_ref()
            .map(|r| r.register_histogram(key, metadata));
        if key.name() != TLS_HANDSHAKE_DURATION {
            return inner.unwrap_or_else(Histogram::noop);
        }
        let tap = if resumed_label(key) == Some(true) {
            &TAPS.resumed_ns
        } else {
            &TAPS.full_ns
        };
        Histogram::from_arc(Arc::new(TapHistogram { tap, inner }))
    }
}

struct TapCounter {
    tap: &'static AtomicU64,
    inner: Option<Counter>,
}

impl CounterFn for TapCounter {
    fn increment(&self, value: u64) {
        self.tap.fetch_add(value, Ordering::Relaxed);
        if let Some(inner) = &self.inner {
            inner.increment(value);
        }
    }

    fn absolute(&self, value: u64) {
        // The connector only increments; pass anything else on untouched.
        if let Some(inner) = &self.inner {
            inner.absolute(value);
        }
    }
}

struct TapGauge {
    tap: &'static AtomicI64,
    inner: Option<Gauge>,
}

impl GaugeFn for TapGauge {
    fn increment(&self, value: f64) {
        self.tap.fetch_add(value as i64, Ordering::Relaxed);
        if let Some(inner) = &self.inner {
            inner.increment(value);
        }
    }

    fn decrement(&self, value: f64) {
        self.tap.fetch_sub(value as i64, Ordering::Relaxed);
        if let Some(inner) = &self.inner {
            inner.decrement(value);
        }
    }

    fn set(&self, value: f64) {
        // Each connector keeps its own handle on this series, so an absolute value from one
        // cannot be the total; the connector only increments and decrements it.
        if let Some(inner) = &self.inner {
            inner.set(value);
        }
    }
}

/// Durations in seconds, summed in nanoseconds.
struct TapHistogram {
    tap: &'static AtomicU64,
    inner: Option<Histogram>,
}

impl HistogramFn for TapHistogram {
    fn record(&self, value: f64) {
        // Saturating float-to-int conversion: a negative or NaN value adds nothing.
        self.tap.fetch_add((value * 1e9) as u64, Ordering::Relaxed);
        if let Some(inner) = &self.inner {
            inner.record(value);
        }
    }
}
