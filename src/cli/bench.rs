//! `bench`: set up the upstream (embedded or `--target`), check it once, then run the load
//! (once, or three times for `--compare`) and print the summary.

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::sync::watch;
use upstream_pool::http::HttpConnector;
use upstream_pool::{Connector, ConnectorOptions, Peer};

use super::args::{AlpnArg, BenchArgs, Switch};
use super::embedded_server::{self, EmbeddedServer};
use super::load::{self, Plan};
use super::observe;
use super::report::{self, Comparison, RunInfo, Warmed};
use super::stats::RunStats;
use super::target::{connect_first, Target, TlsSettings};
use super::{write_stdout, CliError};

/// The run length when neither `--duration` nor `--requests` is given: long enough for
/// stable percentiles, short enough to wait for.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// The upstream every run of one `bench` invocation loads.
#[derive(Debug)]
struct Upstream {
    peer: Peer,
    /// `Host` header value.
    host: String,
    /// For the report: address and SNI.
    description: String,
    /// Keeps the embedded server running; `None` with `--target`.
    embedded: Option<EmbeddedServer>,
}

/// One configuration of a run.
#[derive(Debug, Clone, Copy)]
struct Mode {
    reuse: bool,
    resume: bool,
}

/// The runs of `--compare`, in order: what pooling buys over a resumed connection per
/// request, then what resumption buys when nothing is pooled.
const COMPARE: [Mode; 3] = [
    Mode {
        reuse: true,
        resume: true,
    },
    Mode {
        reuse: false,
        resume: true,
    },
    Mode {
        reuse: false,
        resume: false,
    },
];

/// Runs `bench`.
///
/// # Errors
/// `Usage` for flags that do not fit together, unreadable files, an unusable
/// `--metrics-addr`; `Failed` when the upstream cannot be reached or no request succeeded.
pub(crate) async fn run(args: BenchArgs) -> Result<(), CliError> {
    if args.target.is_some() && args.embedded_max_streams.is_some() {
        return Err(CliError::Usage(
            "--embedded-max-streams applies to the embedded upstream only (not with --target)"
                .into(),
        ));
    }
    if args.target.is_none() {
        let flags = args.tls.target_only_flags();
        if !flags.is_empty() {
            return Err(CliError::Usage(format!(
                "{} can only be used with --target (the embedded upstream brings its own \
                 certificate)",
                flags.join(", ")
            )));
        }
    }
    if matches!(args.tls.alpn, Some(AlpnArg::H2)) && (args.reuse == Switch::Off || args.compare) {
        return Err(CliError::Usage(
            "--reuse off and --compare need HTTP/1.1 (--alpn h1 or no --alpn): an HTTP/2 \
             connection is shared by many requests by design"
                .into(),
        ));
    }
    // Read files before starting anything, so a typo fails fast with exit code 2.
    let settings = TlsSettings::load(&args.tls)?;

    // Before any connector exists: metric handles are resolved when a peer's pool is first
    // used, and handles resolved without a recorder stay no-ops.
    let prometheus = match args.metrics_addr {
        Some(addr) => {
            let (recorder, exporter) = PrometheusBuilder::new()
                .with_http_listener(addr)
                .build()
                .map_err(|e| CliError::Usage(format!("cannot serve metrics on {addr}: {e}")))?;
            tokio::spawn(async move {
                // It serves until the runtime shuts down; an error ends only the exporter.
                let _ = exporter.await;
            });
            Some(recorder)
        }
        None => None,
    };
    observe::install(prometheus).map_err(CliError::Failed)?;
    if args.metrics_addr.is_some() {
        upstream_pool::metrics::describe_metrics();
    }

    let upstream = match &args.target {
        Some(text) => external(text, &args, &settings).await?,
        None => embedded(&args).await?,
    };
    let interrupt = ctrl_c_watch();

    let duration = match (args.duration, args.requests) {
        (Some(d), _) => Some(d),
        (None, Some(_)) => None,
        (None, None) => Some(DEFAULT_DURATION),
    };
    let modes = if args.compare {
        COMPARE.to_vec()
    } else {
        vec![Mode {
            reuse: args.reuse.is_on(),
            resume: args.resume.is_on(),
        }]
    };

    let mut results: Vec<(RunInfo, RunStats)> = Vec::with_capacity(modes.len());
    for mode in modes {
        let connector = connector(mode, args.concurrency, args.preconnect)?;
        let http = HttpConnector::new(connector.clone());
        let warm = preconnect(&http, &upstream.peer, args.preconnect).await?;
        let plan = Plan {
            http: http.clone(),
            peer: upstream.peer.clone(),
            host: upstream.host.clone(),
            concurrency: args.concurrency,
            duration,
            requests: args.requests,
        };
        let info_mode = RunInfo {
            target: upstream.description.clone(),
            embedded: upstream.embedded.is_some(),
            concurrency: args.concurrency,
            reuse: mode.reuse,
            resume: mode.resume,
            elapsed: Duration::ZERO,
            interrupted: false,
            warm,
            peer_stats: Vec::new(),
            server: None,
        };
        let seen_before = upstream.embedded.as_ref().map(EmbeddedServer::seen);
        let handshakes_before = observe::taps().handshakes();
        let outcome = load::run(plan, info_mode.mode(), interrupt.clone(), args.json).await;
        let info = RunInfo {
            elapsed: outcome.elapsed,
            interrupted: outcome.interrupted,
            peer_stats: connector.stats(),
            server: upstream
                .embedded
                .as_ref()
                .zip(seen_before)
                .map(|(server, before)| server.seen().since(before)),
            ..info_mode
        };
        let mut stats = outcome.stats;
        stats.handshakes = observe::taps().handshakes().since(handshakes_before);
        stats.negotiated = observe::taps().negotiated().cloned();
        results.push((info, stats));
        if outcome.interrupted {
            break;
        }
    }

    print_results(&args, &results)?;
    if results.iter().all(|(_, stats)| stats.requests == 0) {
        return Err(CliError::Failed("no request completed".into()));
    }
    Ok(())
}

fn print_results(args: &BenchArgs, results: &[(RunInfo, RunStats)]) -> Result<(), CliError> {
    let comparison = match results {
        [pooled, resumed, full] if args.compare => Some(Comparison {
            pooled: (&pooled.0, &pooled.1),
            resumed: (&resumed.0, &resumed.1),
            full: (&full.0, &full.1),
        }),
        _ => None,
    };
    let out = match (args.json, &comparison) {
        (true, Some(c)) => format!("{}\n", c.json()),
        (false, Some(c)) => c.text(),
        // A single run, or an interrupted comparison: report what ran.
        (true, None) if args.compare => {
            let runs: Vec<_> = results.iter().map(|(i, s)| report::json(i, s)).collect();
            format!("{}\n", serde_json::json!({ "runs": runs, "ratios": null }))
        }
        (false, None) if args.compare => results
            .iter()
            .map(|(i, s)| format!("{}\n", report::line(i, s)))
            .collect(),
        (true, None) => results
            .iter()
            .map(|(i, s)| format!("{}\n", report::json(i, s)))
            .collect(),
        (false, None) => results.iter().map(|(i, s)| report::text(i, s)).collect(),
    };
    write_stdout(&out)
}

/// Dials `n` idle connections before the clock starts; their handshakes are counted here,
/// apart from the run's (the run hands them out as pooled connections).
async fn preconnect(http: &HttpConnector, peer: &Peer, n: u32) -> Result<Warmed, CliError> {
    if n == 0 {
        return Ok(Warmed::default());
    }
    let idle = http
        .preconnect(peer, n as usize)
        .await
        .map_err(|e| CliError::Failed(format!("preconnect failed: {e}")))?;
    let stats = http.connector().stats_for(peer);
    Ok(Warmed {
        idle,
        full_handshakes: stats.handshakes_full,
        resumed_handshakes: stats.handshakes_resumed,
    })
}

/// A connector for one run: its own pool and session cache, so runs do not warm each other.
fn connector(mode: Mode, concurrency: u32, preconnect: u32) -> Result<Connector, CliError> {
    let mut options = ConnectorOptions::default();
    // Room for every worker's connection (and every preconnected one); the default could
    // close some on release.
    options.max_idle_per_peer = options
        .max_idle_per_peer
        .max(concurrency as usize)
        .max(preconnect as usize);
    if !mode.resume {
        options.session_cache_size = 0;
    }
    if !mode.reuse {
        // One request per HTTP/1.1 connection: the pool closes it when the response body
        // ends instead of keeping it.
        options.max_uses = Some(1);
    }
    Connector::new(options).map_err(|e| CliError::Failed(format!("cannot create connector: {e}")))
}

/// Starts the embedded upstream and checks that a connection to it works.
async fn embedded(args: &BenchArgs) -> Result<Upstream, CliError> {
    let max_streams = args
        .embedded_max_streams
        .unwrap_or(embedded_server::DEFAULT_MAX_STREAMS);
    let server = EmbeddedServer::start(max_streams).map_err(CliError::Failed)?;
    let settings = TlsSettings::trusting(server.ca().clone(), args.tls.alpn);
    let target = Target {
        host: server.addr().ip().to_string(),
        addrs: vec![server.addr()],
    };
    let sni = server.server_name();
    let peer = preflight(&settings, &target, sni).await?;
    Ok(Upstream {
        peer,
        host: sni.to_string(),
        description: format!("{} (SNI {sni:?})", server.addr()),
        embedded: Some(server),
    })
}

/// Resolves `--target` and checks that a connection to it works.
async fn external(
    text: &str,
    args: &BenchArgs,
    settings: &TlsSettings,
) -> Result<Upstream, CliError> {
    let target = Target::resolve(text).await?;
    let sni = target.sni(args.tls.sni.as_deref());
    let peer = preflight(settings, &target, &sni).await?;
    let host = if sni.is_empty() {
        text.to_string()
    } else {
        sni.clone()
    };
    let description = if sni.is_empty() {
        format!("{} (no SNI)", peer.address())
    } else {
        format!("{} (SNI {sni:?})", peer.address())
    };
    Ok(Upstream {
        peer,
        host,
        description,
        embedded: None,
    })
}

/// One connection before the run, on a connector of its own (so the runs start cold): finds
/// the address that answers, and turns a certificate problem into one clear error instead of
/// ten seconds of failed requests.
async fn preflight(settings: &TlsSettings, target: &Target, sni: &str) -> Result<Peer, CliError> {
    let connector = Connector::new(ConnectorOptions::default())
        .map_err(|e| CliError::Failed(format!("cannot create connector: {e}")))?;
    let (peer, _conn) = connect_first(&connector, settings, target, sni).await?;
    Ok(peer)
}

/// A channel that turns `true` on Ctrl-C. The listening task holds the sender until the
/// runtime shuts down, so receivers never see it closed mid-run.
fn ctrl_c_watch() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = tx.send(true);
            // A second Ctrl-C means "now", without waiting for the summary.
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
        // Keep the sender alive: a closed channel would read as "no interrupt source".
        std::future::pending::<()>().await;
    });
    rx
}
