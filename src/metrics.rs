//! Metric names and the per-peer handles that record them.
//!
//! Dashboards depend on these names; they are part of the API. Handles are registered once
//! per pool key (when its first connection is requested), so the checkout hot path records
//! without building labels or allocating. Install the recorder before creating the
//! `Connector`: handles resolved before a recorder exists stay no-ops.

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram, Label};

use crate::error::ErrorKind;
use crate::stream::SslDigest;

/// Counter, label `outcome` = `reused` | `new`: one per successful `get`.
pub const CHECKOUTS_TOTAL: &str = "upstream_pool_checkouts_total";
/// Histogram (seconds): TCP (or Unix socket) connect duration of each new connection.
pub const TCP_CONNECT_DURATION: &str = "upstream_tcp_connect_duration_seconds";
/// Histogram (seconds), label `resumed`: duration of each successful TLS handshake.
pub const TLS_HANDSHAKE_DURATION: &str = "upstream_tls_handshake_duration_seconds";
/// Counter, labels `version`, `cipher`, `alpn`, `resumed`: one per successful TLS handshake.
pub const TLS_HANDSHAKES_TOTAL: &str = "upstream_tls_handshakes_total";
/// Counter, label `kind` (an [`ErrorKind`] in snake_case): one per failed `get`.
pub const CONNECT_ERRORS_TOTAL: &str = "upstream_connect_errors_total";
/// Counter, label `reason` = `idle_timeout` | `closed` | `unexpected_data` | `capacity` |
/// `max_lifetime` | `max_uses` | `evicted`: one per connection closed by the pool.
pub const EVICTIONS_TOTAL: &str = "upstream_pool_evictions_total";
/// Gauge: connections sitting idle in the pool.
pub const IDLE_CONNECTIONS: &str = "upstream_pool_idle_connections";
/// Gauge: connections handed out and not yet released or dropped.
pub const ACTIVE_CONNECTIONS: &str = "upstream_pool_active_connections";
/// Histogram (seconds): time `get` spent waiting at the per-peer connection cap.
pub const WAIT_DURATION: &str = "upstream_pool_wait_duration_seconds";

/// Gauge: HTTP/2 streams (requests) in flight through `upstream_pool::http`.
pub const H2_STREAMS_ACTIVE: &str = "upstream_h2_streams_active";
/// Gauge: open HTTP/2 connections shared by `upstream_pool::http` (each also counts as one
/// active pool connection).
pub const H2_CONNECTIONS: &str = "upstream_h2_connections";
/// Counter: HTTP/2 connections the upstream sent a GOAWAY on (counted once per connection).
pub const H2_GOAWAY_TOTAL: &str = "upstream_h2_goaway_total";
/// Histogram: requests served by each HTTP/2 connection, recorded when it closes.
pub const HTTP_REQUESTS_PER_CONNECTION: &str = "upstream_http_requests_per_connection";

/// Every metric name this crate records.
pub const ALL_METRICS: [&str; 13] = [
    CHECKOUTS_TOTAL,
    TCP_CONNECT_DURATION,
    TLS_HANDSHAKE_DURATION,
    TLS_HANDSHAKES_TOTAL,
    CONNECT_ERRORS_TOTAL,
    EVICTIONS_TOTAL,
    IDLE_CONNECTIONS,
    ACTIVE_CONNECTIONS,
    WAIT_DURATION,
    H2_STREAMS_ACTIVE,
    H2_CONNECTIONS,
    H2_GOAWAY_TOTAL,
    HTTP_REQUESTS_PER_CONNECTION,
];

/// Registers a description and unit for every metric with the installed recorder.
/// Optional; exporters such as Prometheus show them as `# HELP` lines.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        CHECKOUTS_TOTAL,
        "Successful checkouts, by outcome (reused, new)"
    );
    describe_histogram!(TCP_CONNECT_DURATION, Unit::Seconds, "TCP connect duration");
    describe_histogram!(
        TLS_HANDSHAKE_DURATION,
        Unit::Seconds,
        "TLS handshake duration, by resumed"
    );
    describe_counter!(
        TLS_HANDSHAKES_TOTAL,
        "TLS handshakes, by version, cipher, ALPN and resumed"
    );
    describe_counter!(CONNECT_ERRORS_TOTAL, "Failed checkouts, by error kind");
    describe_counter!(EVICTIONS_TOTAL, "Connections closed by the pool, by reason");
    describe_gauge!(IDLE_CONNECTIONS, "Idle pooled connections");
    describe_gauge!(
        ACTIVE_CONNECTIONS,
        "Connections handed out and not returned"
    );
    describe_histogram!(
        WAIT_DURATION,
        Unit::Seconds,
        "Time spent waiting at the per-peer connection cap"
    );
    describe_gauge!(H2_STREAMS_ACTIVE, "HTTP/2 streams in flight");
    describe_gauge!(H2_CONNECTIONS, "Open shared HTTP/2 connections");
    describe_counter!(
        H2_GOAWAY_TOTAL,
        "HTTP/2 connections the upstream sent GOAWAY on"
    );
    describe_histogram!(
        HTTP_REQUESTS_PER_CONNECTION,
        "Requests served by each HTTP/2 connection, recorded when it closes"
    );
}

/// The HTTP layer's handles for one pool key (the optional `peer` label applied).
#[derive(Debug)]
pub(crate) struct HttpMetrics {
    pub(crate) streams_active: Gauge,
    pub(crate) connections: Gauge,
    pub(crate) goaway: Counter,
    pub(crate) requests_per_connection: Histogram,
    /// `upstream_pool_wait_duration_seconds`, the same series as the pool's: HTTP/2 requests
    /// waiting at `max_connections_per_peer` for a stream or a connection slot.
    pub(crate) wait: Histogram,
}

impl HttpMetrics {
    pub(crate) fn new(peer: Option<String>) -> HttpMetrics {
        let base: Vec<Label> = peer.into_iter().map(|p| Label::new("peer", p)).collect();
        HttpMetrics {
            streams_active: gauge!(H2_STREAMS_ACTIVE, base.clone()),
            connections: gauge!(H2_CONNECTIONS, base.clone()),
            goaway: counter!(H2_GOAWAY_TOTAL, base.clone()),
            requests_per_connection: histogram!(HTTP_REQUESTS_PER_CONNECTION, base.clone()),
            wait: histogram!(WAIT_DURATION, base),
        }
    }
}

/// Why the pool closed a connection instead of handing it out or keeping it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EvictionReason {
    /// Idle longer than its idle timeout.
    IdleTimeout,
    /// The upstream closed it (FIN, RST, close_notify) or it failed.
    Closed,
    /// Bytes arrived while idle or were left unread at release.
    UnexpectedData,
    /// Over `max_idle_per_peer` or `max_idle_total`.
    Capacity,
    /// Older than `max_lifetime`.
    MaxLifetime,
    /// Used `max_uses` times.
    MaxUses,
    /// Closed by `Connector::evict` or `evict_all` (idle at the call, in use at release).
    Evicted,
}

impl EvictionReason {
    const ALL: [EvictionReason; 7] = [
        EvictionReason::IdleTimeout,
        EvictionReason::Closed,
        EvictionReason::UnexpectedData,
        EvictionReason::Capacity,
        EvictionReason::MaxLifetime,
        EvictionReason::MaxUses,
        EvictionReason::Evicted,
    ];

    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            EvictionReason::IdleTimeout => "idle_timeout",
            EvictionReason::Closed => "closed",
            EvictionReason::UnexpectedData => "unexpected_data",
            EvictionReason::Capacity => "capacity",
            EvictionReason::MaxLifetime => "max_lifetime",
            EvictionReason::MaxUses => "max_uses",
            EvictionReason::Evicted => "evicted",
        }
    }
}

/// The metric handles of one pool key, with the optional `peer` label already applied.
#[derive(Debug)]
pub(crate) struct PeerMetrics {
    peer: Option<String>,
    pub(crate) checkout_reused: Counter,
    pub(crate) checkout_new: Counter,
    pub(crate) tcp_connect: Histogram,
    pub(crate) handshake_full: Histogram,
    pub(crate) handshake_resumed: Histogram,
    pub(crate) idle: Gauge,
    pub(crate) active: Gauge,
    pub(crate) wait: Histogram,
    evictions: [Counter; 7],
}

impl PeerMetrics {
    pub(crate) fn new(peer: Option<String>) -> PeerMetrics {
        let base: Vec<Label> = peer.iter().map(|p| Label::new("peer", p.clone())).collect();
        let with = |k: &'static str, v: &'static str| {
            let mut labels = base.clone();
            labels.push(Label::new(k, v));
            labels
        };
        PeerMetrics {
            checkout_reused: counter!(CHECKOUTS_TOTAL, with("outcome", "reused")),
            checkout_new: counter!(CHECKOUTS_TOTAL, with("outcome", "new")),
            tcp_connect: histogram!(TCP_CONNECT_DURATION, base.clone()),
            handshake_full: histogram!(TLS_HANDSHAKE_DURATION, with("resumed", "false")),
            handshake_resumed: histogram!(TLS_HANDSHAKE_DURATION, with("resumed", "true")),
            idle: gauge!(IDLE_CONNECTIONS, base.clone()),
            active: gauge!(ACTIVE_CONNECTIONS, base.clone()),
            wait: histogram!(WAIT_DURATION, base.clone()),
            evictions: EvictionReason::ALL
                .map(|r| counter!(EVICTIONS_TOTAL, with("reason", r.as_str()))),
            peer,
        }
    }

    pub(crate) fn evicted(&self, reason: EvictionReason) {
        self.evictions[reason as usize].increment(1);
    }

    /// One count per handshake, labelled from what was negotiated (new connections only, so
    /// building the labels here is off the hot path).
    pub(crate) fn handshake(&self, digest: &SslDigest) {
        let mut labels = vec![
            Label::new("version", digest.version.clone()),
            Label::new("cipher", digest.cipher.clone()),
            Label::new(
                "alpn",
                digest.alpn.as_deref().map_or_else(
                    || "none".to_string(),
                    |a| String::from_utf8_lossy(a).into_owned(),
                ),
            ),
            Label::new(
                "resumed",
                if digest.session_reused {
                    "true"
                } else {
                    "false"
                },
            ),
        ];
        if let Some(peer) = &self.peer {
            labels.push(Label::new("peer", peer.clone()));
        }
        counter!(TLS_HANDSHAKES_TOTAL, labels).increment(1);
    }
}

/// Counts a failed `get`, also where no pool key exists yet (invalid configuration).
pub(crate) fn connect_error(kind: ErrorKind, peer: Option<&str>) {
    match peer {
        Some(peer) => {
            counter!(CONNECT_ERRORS_TOTAL, "kind" => kind.as_str(), "peer" => peer.to_string())
                .increment(1)
        }
        None => counter!(CONNECT_ERRORS_TOTAL, "kind" => kind.as_str()).increment(1),
    }
}
