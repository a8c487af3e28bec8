//! Rendering bench results: the text summary, the one-line form `--compare` prints, and the
//! `--json` objects. The field names of the JSON are documented in the README; change them
//! only together.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Value};
use upstream_pool::PeerStats;

use super::embedded_server::SeenSnapshot;
use super::stats::RunStats;

/// What was run, for the report header.
#[derive(Debug, Clone)]
pub(crate) struct RunInfo {
    /// `host:port` (and SNI) of the upstream.
    pub(crate) target: String,
    /// The upstream was the embedded one.
    pub(crate) embedded: bool,
    /// Worker tasks.
    pub(crate) concurrency: u32,
    /// Connections went back to the pool.
    pub(crate) reuse: bool,
    /// The session cache was on.
    pub(crate) resume: bool,
    /// Wall time from start to the last worker stopping.
    pub(crate) elapsed: Duration,
    /// Stopped early by Ctrl-C.
    pub(crate) interrupted: bool,
    /// What the embedded upstream observed during the run; `None` with `--target`.
    pub(crate) server: Option<SeenSnapshot>,
    /// `--preconnect`: what was warmed before the clock started.
    pub(crate) warm: Warmed,
    /// The connector's per-key stats at the end of the run.
    pub(crate) peer_stats: Vec<(String, PeerStats)>,
}

/// What `--preconnect` did before the clock started.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Warmed {
    /// Idle connections when the clock started.
    pub(crate) idle: usize,
    /// Handshakes of the preconnect dials.
    pub(crate) full_handshakes: u64,
    pub(crate) resumed_handshakes: u64,
}

impl RunInfo {
    /// `reuse on, resume on`.
    pub(crate) fn mode(&self) -> String {
        format!(
            "reuse {}, resume {}",
            on_off(self.reuse),
            on_off(self.resume)
        )
    }

    /// Completed requests per second of wall time.
    pub(crate) fn rate(&self, stats: &RunStats) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            stats.requests as f64 / secs
        } else {
            0.0
        }
    }
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

/// Reused checkouts over all checkouts; 0 when nothing was checked out.
pub(crate) fn reuse_ratio(stats: &RunStats) -> f64 {
    if stats.checkouts == 0 {
        0.0
    } else {
        stats.reused as f64 / stats.checkouts as f64
    }
}

/// Latency percentiles in microseconds: p50, p90, p99, max (zeros without samples).
fn percentiles(stats: &RunStats) -> [u64; 4] {
    let h = &stats.latency_us;
    if h.is_empty() {
        return [0; 4];
    }
    [
        h.value_at_quantile(0.50),
        h.value_at_quantile(0.90),
        h.value_at_quantile(0.99),
        h.max(),
    ]
}

/// Requests in flight per connection: the mean and the largest sample (zeros without
/// samples).
fn streams(stats: &RunStats) -> (f64, f64) {
    if stats.streams_samples == 0 {
        return (0.0, 0.0);
    }
    (
        stats.streams_sum / stats.streams_samples as f64,
        stats.streams_max,
    )
}

fn mean_or_dash(us: Option<f64>) -> String {
    us.map_or_else(|| "-".to_string(), |us| format!("{us:.0} us"))
}

/// The multi-line summary of one run.
pub(crate) fn text(info: &RunInfo, stats: &RunStats) -> String {
    let mut out = String::new();
    let tls = stats.negotiated.as_ref().map_or_else(String::new, |n| {
        let alpn = n
            .alpn
            .as_deref()
            .map_or_else(String::new, |a| format!(", ALPN {a}"));
        format!(" ({} {}{alpn})", n.version, n.cipher)
    });
    let upstream = if info.embedded {
        "embedded upstream "
    } else {
        ""
    };
    let _ = writeln!(out, "upstream-pool bench: {upstream}{}{tls}", info.target);
    let _ = writeln!(
        out,
        "  mode         {}, concurrency {}, {:.2} s{}",
        info.mode(),
        info.concurrency,
        info.elapsed.as_secs_f64(),
        if info.interrupted {
            " (interrupted)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "  requests     {} ok, {} failed: {:.1} req/s",
        stats.requests,
        stats.error_count(),
        info.rate(stats)
    );
    let [p50, p90, p99, max] = percentiles(stats);
    let _ = writeln!(
        out,
        "  latency      p50 {p50} us, p90 {p90} us, p99 {p99} us, max {max} us"
    );
    let (streams_mean, streams_max) = streams(stats);
    let _ = writeln!(
        out,
        "  connections  {} opened, reuse ratio {:.3} ({} of {} checkouts reused)",
        stats.connections_opened(),
        reuse_ratio(stats),
        stats.reused,
        stats.checkouts
    );
    let _ = writeln!(
        out,
        "  protocol     {}, streams per connection mean {streams_mean:.1}, max {streams_max:.1}",
        stats.protocol()
    );
    let _ = writeln!(
        out,
        "  handshakes   {} full (mean {}), {} resumed (mean {})",
        stats.handshakes.full,
        mean_or_dash(stats.handshakes.full_mean_us()),
        stats.handshakes.resumed,
        mean_or_dash(stats.handshakes.resumed_mean_us()),
    );
    let non_ok: Vec<String> = stats
        .statuses
        .iter()
        .filter(|(status, _)| !(200..300).contains(*status))
        .map(|(status, n)| format!("{status}: {n}"))
        .collect();
    if !non_ok.is_empty() {
        let _ = writeln!(out, "  non-2xx      {}", non_ok.join(", "));
    }
    if let Some(seen) = &info.server {
        let _ = writeln!(
            out,
            "  server saw   {} connections ({} HTTP/2), {} requests, at most {} in flight on one \
             connection",
            seen.connections, seen.h2_connections, seen.requests, seen.max_streams
        );
    }
    let errors = if stats.errors.is_empty() {
        "none".to_string()
    } else {
        stats
            .errors
            .iter()
            .map(|(label, n)| format!("{label}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(out, "  errors       {errors}");
    if info.warm.idle > 0 {
        let _ = writeln!(
            out,
            "  preconnect   {} idle before the clock: {} full, {} resumed handshakes before \
             the run, {} full, {} resumed during it",
            info.warm.idle,
            info.warm.full_handshakes,
            info.warm.resumed_handshakes,
            stats.handshakes.full,
            stats.handshakes.resumed,
        );
    }
    out
}

/// One line per run, for `--compare`.
pub(crate) fn line(info: &RunInfo, stats: &RunStats) -> String {
    let [p50, _, p99, _] = percentiles(stats);
    format!(
        "{:<24} {:>9.1} req/s  p50 {:>6} us  p99 {:>6} us  {:>6} conns  reuse {:.3}  \
         handshakes {} full ({}) / {} resumed ({})  errors {}  {}",
        info.mode(),
        info.rate(stats),
        p50,
        p99,
        stats.connections_opened(),
        reuse_ratio(stats),
        stats.handshakes.full,
        mean_or_dash(stats.handshakes.full_mean_us()),
        stats.handshakes.resumed,
        mean_or_dash(stats.handshakes.resumed_mean_us()),
        stats.error_count(),
        stats.protocol(),
    )
}

/// The JSON object of one run.
pub(crate) fn json(info: &RunInfo, stats: &RunStats) -> Value {
    let [p50, p90, p99, max] = percentiles(stats);
    let mean = if stats.latency_us.is_empty() {
        0.0
    } else {
        stats.latency_us.mean()
    };
    let negotiated = stats
        .negotiated
        .as_ref()
        .map(|n| json!({ "version": n.version, "cipher": n.cipher, "alpn": n.alpn }));
    let statuses: serde_json::Map<String, Value> = stats
        .statuses
        .iter()
        .map(|(status, n)| (status.to_string(), json!(n)))
        .collect();
    let (streams_mean, streams_max) = streams(stats);
    json!({
        "target": info.target,
        "embedded": info.embedded,
        "concurrency": info.concurrency,
        "reuse": info.reuse,
        "resume": info.resume,
        "elapsed_s": info.elapsed.as_secs_f64(),
        "interrupted": info.interrupted,
        "requests": stats.requests,
        "requests_per_sec": info.rate(stats),
        "errors": stats.error_count(),
        "errors_by_kind": stats.errors,
        "statuses": statuses,
        "latency_us": { "p50": p50, "p90": p90, "p99": p99, "max": max, "mean": mean },
        "checkouts": stats.checkouts,
        "reused_checkouts": stats.reused,
        "reuse_ratio": reuse_ratio(stats),
        "connections_opened": stats.connections_opened(),
        "protocol": stats.protocol(),
        "responses_by_protocol": stats.protocols,
        "streams_per_connection": { "mean": streams_mean, "max": streams_max },
        "handshakes": {
            "full": stats.handshakes.full,
            "full_mean_us": stats.handshakes.full_mean_us(),
            "resumed": stats.handshakes.resumed,
            "resumed_mean_us": stats.handshakes.resumed_mean_us(),
        },
        "tls": negotiated,
        "embedded_server": info.server.map(|seen| json!({
            "connections": seen.connections,
            "h2_connections": seen.h2_connections,
            "requests": seen.requests,
            "max_streams_per_connection": seen.max_streams,
        })),
        "preconnect": {
            "idle": info.warm.idle,
            "handshakes_full": info.warm.full_handshakes,
            "handshakes_resumed": info.warm.resumed_handshakes,
        },
        "peer_stats": info.peer_stats.iter().map(|(peer, s)| peer_stats_json(peer, s)).collect::<Vec<_>>(),
    })
}

/// One key's `PeerStats`, as `Connector::stats` reports it.
fn peer_stats_json(peer: &str, s: &PeerStats) -> Value {
    json!({
        "peer": peer,
        "idle": s.idle,
        "in_use": s.in_use,
        "connecting": s.connecting,
        "waiting": s.waiting,
        "checkouts_reused": s.checkouts_reused,
        "checkouts_new": s.checkouts_new,
        "handshakes_full": s.handshakes_full,
        "handshakes_resumed": s.handshakes_resumed,
        "connect_errors": s.connect_errors,
        "evicted": s.evicted,
    })
}

/// The three runs of `--compare`.
#[derive(Debug)]
pub(crate) struct Comparison<'a> {
    /// Reuse on, resume on.
    pub(crate) pooled: (&'a RunInfo, &'a RunStats),
    /// Reuse off, resume on.
    pub(crate) resumed: (&'a RunInfo, &'a RunStats),
    /// Reuse off, resume off.
    pub(crate) full: (&'a RunInfo, &'a RunStats),
}

impl Comparison<'_> {
    /// Throughput of pooled connections over a fresh (resumed) connection per request.
    fn reuse_speedup(&self) -> Option<f64> {
        ratio(
            self.pooled.0.rate(self.pooled.1),
            self.resumed.0.rate(self.resumed.1),
        )
    }

    /// Throughput with resumption over full handshakes, both without reuse.
    fn resume_speedup(&self) -> Option<f64> {
        ratio(
            self.resumed.0.rate(self.resumed.1),
            self.full.0.rate(self.full.1),
        )
    }

    /// Mean full handshake time over mean resumed handshake time.
    fn handshake_speedup(&self) -> Option<f64> {
        ratio(
            self.full.1.handshakes.full_mean_us()?,
            self.resumed.1.handshakes.resumed_mean_us()?,
        )
    }

    /// Median latency without reuse over median latency with it.
    fn latency_ratio(&self) -> Option<f64> {
        let p50 =
            |s: &RunStats| (!s.latency_us.is_empty()).then(|| s.latency_us.value_at_quantile(0.5));
        ratio(p50(self.resumed.1)? as f64, p50(self.pooled.1)? as f64)
    }

    /// The lines and ratios, as text.
    pub(crate) fn text(&self) -> String {
        let show = |r: Option<f64>| r.map_or_else(|| "n/a".to_string(), |r| format!("{r:.2}x"));
        let mut out = String::new();
        for (info, stats) in [self.pooled, self.resumed, self.full] {
            let _ = writeln!(out, "{}", line(info, stats));
        }
        let _ = writeln!(
            out,
            "ratios: reuse on/off {} req/s ({} lower p50); resume on/off {} req/s; \
             full/resumed handshake time {}",
            show(self.reuse_speedup()),
            show(self.latency_ratio()),
            show(self.resume_speedup()),
            show(self.handshake_speedup()),
        );
        out
    }

    /// The `--compare --json` object.
    pub(crate) fn json(&self) -> Value {
        json!({
            "runs": [
                json(self.pooled.0, self.pooled.1),
                json(self.resumed.0, self.resumed.1),
                json(self.full.0, self.full.1),
            ],
            "ratios": {
                "reuse_requests_per_sec": self.reuse_speedup(),
                "reuse_p50_latency": self.latency_ratio(),
                "resume_requests_per_sec": self.resume_speedup(),
                "full_over_resumed_handshake_time": self.handshake_speedup(),
            },
        })
    }
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite()).then(|| a / b)
}
