//! Helpers shared by the benchmarks: `benches/*.rs`, the peer comparison crate in
//! `benches/peers/` and `examples/idle_memory.rs` all include this directory with `#[path]`.
//!
//! - [`child`]: upstreams that run in a child process (a re-exec of the benchmark binary), for
//!   runs that need more sockets than one process may open.
//! - [`hit`]: the pool hit path under test (`Connector::get` + `Connector::release`) with every
//!   feature that costs something switched on, and a two-thread driver.
//! - [`http_upstream`]: an HTTP/2 and HTTP/1.1 upstream (TLS, ALPN) for the child process.
//! - [`tls`]: an in-process OpenSSL upstream on its own thread, answering one fixed HTTP
//!   response per request.
//! - [`certs`]: the test suite's throw-away PKI (`tests/support/certs.rs`, included as is).
//! - Here: the metrics recorder, the file-descriptor limit, machine and memory facts.

// Every benchmark binary compiles this whole directory but uses only part of it; without this
// each binary would warn about the helpers it does not call (the same reason as in
// `tests/support/mod.rs`).
#![allow(dead_code)]

#[path = "../../tests/support/certs.rs"]
pub(crate) mod certs;
pub(crate) mod child;
pub(crate) mod hit;
pub(crate) mod http_upstream;
pub(crate) mod tls;

use std::sync::OnceLock;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

/// The recorder's snapshotter, once [`install_recorder`] ran.
static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();

/// Installs `metrics-util`'s `DebuggingRecorder` as the global `metrics` recorder (once per
/// process).
///
/// Must run before any `Connector` is created: the connector resolves its metric handles
/// when a key is first seen, and handles resolved without a recorder stay no-ops forever.
/// The debugging recorder stores counters and gauges in a `metrics-util` `Registry` with
/// atomic storage, the same storage `metrics-exporter-prometheus` uses, so every counter
/// increment and gauge move on the hit path is a real atomic read-modify-write on shared
/// memory, as in production.
pub(crate) fn install_recorder() {
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("install the metrics recorder before anything else does");
        upstream_pool::metrics::describe_metrics();
        snapshotter
    });
}

/// The value of `upstream_pool_checkouts_total{outcome=...}` summed over all other labels (0
/// without [`install_recorder`]); shows that the benchmark really recorded metrics.
pub(crate) fn checkouts(outcome: &str) -> u64 {
    let Some(snapshotter) = SNAPSHOTTER.get() else {
        return 0;
    };
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, _, _, _)| {
            key.key().name() == upstream_pool::metrics::CHECKOUTS_TOTAL
                && key
                    .key()
                    .labels()
                    .any(|l| l.key() == "outcome" && l.value() == outcome)
        })
        .map(|(_, _, _, value)| match value {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum()
}

/// Raises the soft open-file limit to the hard limit and returns the new soft limit.
///
/// Ten thousand pooled connections need ten thousand descriptors on the client side alone;
/// the usual soft limit is 1,024. The hard limit cannot be raised without privileges, so a
/// benchmark that needs more than it has must put the upstream in another process.
#[allow(
    unsafe_code,
    reason = "getrlimit and setrlimit have no safe wrapper in our dependencies"
)]
pub(crate) fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable `rlimit`; getrlimit only writes into it.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if rc != 0 {
        return 0;
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: `lim` is a valid `rlimit`; setrlimit only reads it.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    if rc != 0 {
        return 0;
    }
    lim.rlim_cur
}

/// "N cores, <model name>" from `/proc/cpuinfo`, for the benchmark log.
pub(crate) fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".to_string());
    format!("{cores} cores, {model}")
}

/// This process's resident set size in KiB (`VmRSS` in `/proc/self/status`).
pub(crate) fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The one-line header every benchmark binary prints first.
pub(crate) fn print_header(what: &str) {
    eprintln!(
        "[{what}] machine: {}; load average: {}",
        machine(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}

/// Whether the benchmark `id` (`group/function`, or a group: then a filter naming one of its
/// functions selects it too) passes the name filter given on the command line, so fixtures that take seconds to build (10,000 pre-warmed connections) are
/// only built for benchmarks that will run. Mirrors criterion's filter for plain names (a
/// substring match); with no filter everything runs.
pub(crate) fn selected(id: &str) -> bool {
    const TAKES_VALUE: &[&str] = &[
        "--measurement-time",
        "--warm-up-time",
        "--sample-size",
        "--profile-time",
        "--save-baseline",
        "--baseline",
        "--baseline-lenient",
        "--load-baseline",
        "--noise-threshold",
        "--significance-level",
        "--confidence-level",
        "--nresamples",
        "--output-format",
        "--color",
        "--plotting-backend",
        "--format",
        "--logfile",
    ];
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut filter = None;
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        if TAKES_VALUE.contains(&a.as_str()) {
            i += 2;
            continue;
        }
        if !a.starts_with('-') {
            filter = Some(a.clone());
            break;
        }
        i += 1;
    }
    filter.is_none_or(|f| id.contains(&f) || f.starts_with(&format!("{id}/")))
}

/// A fresh temporary directory (removed on drop) for certificate files handed to child
/// processes.
pub(crate) fn certs_dir() -> TempDir {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "upstream-pool-bench-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&path).expect("create a temporary directory");
    TempDir(path)
}

/// A directory removed (recursively) when dropped.
#[derive(Debug)]
pub(crate) struct TempDir(std::path::PathBuf);

impl TempDir {
    /// The directory's path.
    pub(crate) fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Rounds of a paired comparison ([`paired`]): `UPSTREAM_POOL_BENCH_ROUNDS`, else `default`.
pub(crate) fn paired_rounds(default: usize) -> usize {
    std::env::var("UPSTREAM_POOL_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .filter(|&r| r > 0)
        .unwrap_or(default)
}

/// Runs the `variants` (each `f(n)` does `n` operations and returns the time they took) in
/// `rounds` rounds of `batch` operations each, the order rotating from round to round so all
/// see the same machine load, and prints, for each variant after the first, the median and
/// quartiles of its per-round time divided by the first variant's, and every variant's median
/// time per operation. Steadier than separate criterion estimates on this shared machine, whose
/// load moves a variant's figure by tens of percent from one minute to the next.
pub(crate) fn paired(
    label: &str,
    rounds: usize,
    batch: u64,
    names: &[&str],
    variants: &mut [&mut dyn FnMut(u64) -> std::time::Duration],
) {
    assert_eq!(names.len(), variants.len());
    let k = variants.len();
    let mut times = vec![Vec::with_capacity(rounds); k];
    for round in 0..rounds {
        for i in 0..k {
            let v = (round + i) % k;
            let took = variants[v](batch);
            times[v].push(took.as_secs_f64());
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[v.len() / 4], v[v.len() * 3 / 4])
    };
    let per_op: Vec<String> = (0..k)
        .map(|v| {
            let (m, _, _) = median(times[v].clone());
            format!("{} {:.2} us", names[v], m * 1e6 / batch as f64)
        })
        .collect();
    for v in 1..k {
        let ratios: Vec<f64> = (0..rounds).map(|r| times[v][r] / times[0][r]).collect();
        let (m, q1, q3) = median(ratios);
        eprintln!(
            "[{label}] paired: {}/{} median {m:.3} (quartiles {q1:.3}..{q3:.3}) over {rounds} \
             rounds of {batch}",
            names[v], names[0]
        );
    }
    eprintln!(
        "[{label}] paired: median per operation: {}",
        per_op.join(", ")
    );
}
