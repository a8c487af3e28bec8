//! One bench run: `concurrency` worker tasks, each sending `GET /` through the library's
//! [`HttpConnector`] and reading the response body to its end, in a loop until the time or
//! request budget runs out.
//!
//! The library does the protocol work: over HTTP/1.1 each request has a pooled connection to
//! itself, which goes back to the pool when the body ends; over HTTP/2 the workers' requests
//! are streams multiplexed over as few connections as the server's stream limit allows.
//!
//! The run ends at its deadline exactly: workers abandon the request in flight (dropping it
//! closes its HTTP/1.1 connection or resets its HTTP/2 stream; nothing half-read is pooled)
//! rather than finishing it, so a slow upstream cannot stretch the run. Abandoned requests are
//! not counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::{HeaderValue, HOST, USER_AGENT};
use hyper::{Request, Version};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use upstream_pool::http::{HttpConnector, UpstreamInfo};
use upstream_pool::{ErrorKind, Peer};

use super::observe;
use super::progress::{Goal, Progress};
use super::stats::RunStats;

/// Pause after a failed connection attempt, so that an upstream that is down costs a few hundred attempts
/// per second instead of a busy loop on every core.
const CHECKOUT_BACKOFF: Duration = Duration::from_millis(10);

/// What one run does.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// The HTTP client, on a connector fresh for this run so that its pool and session cache
    /// start empty.
    pub(crate) http: HttpConnector,
    /// Where the requests go.
    pub(crate) peer: Peer,
    /// `Host` header value.
    pub(crate) host: String,
    /// Worker tasks.
    pub(crate) concurrency: u32,
    /// Stop after this long.
    pub(crate) duration: Option<Duration>,
    /// Stop after this many requests (attempts, failed ones included).
    pub(crate) requests: Option<u64>,
}

/// How a run went.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// The merged counters of every worker.
    pub(crate) stats: RunStats,
    /// From the first request to the last worker stopping.
    pub(crate) elapsed: Duration,
    /// Ctrl-C ended it early.
    pub(crate) interrupted: bool,
}

/// State the workers share: read-only except the counters.
#[derive(Debug)]
struct Shared {
    http: HttpConnector,
    peer: Peer,
    /// `Host` header of every request.
    host: HeaderValue,
    /// Requests sent and not yet finished, over all workers (for streams per connection).
    in_flight: AtomicU64,
    /// Requests that may still be started; `None` for no limit.
    budget: Option<AtomicU64>,
    /// Requests finished (either way), for the progress bar.
    completed: Arc<AtomicU64>,
}

impl Shared {
    /// The request every worker sends: `GET /`, no body.
    fn request(&self) -> Request<Empty<Bytes>> {
        let mut request = Request::new(Empty::new());
        let headers = request.headers_mut();
        headers.insert(HOST, self.host.clone());
        headers.insert(USER_AGENT, HeaderValue::from_static("upstream-pool-bench"));
        request
    }

    /// Takes one request from the budget; `false` when it is spent.
    fn claim(&self) -> bool {
        self.budget.as_ref().is_none_or(|budget| {
            budget
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
        })
    }
}

/// Runs `plan` to completion, showing progress labelled `label` unless `quiet`.
/// `interrupt` turning `true` (Ctrl-C) ends the run early.
pub(crate) async fn run(
    plan: Plan,
    label: String,
    mut interrupt: watch::Receiver<bool>,
    quiet: bool,
) -> Outcome {
    let completed = Arc::new(AtomicU64::new(0));
    let shared = Arc::new(Shared {
        // The host was checked when the peer was built; an unusable one sends no `Host`,
        // and the library then uses the peer's SNI.
        host: HeaderValue::from_str(&plan.host)
            .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
        http: plan.http,
        peer: plan.peer,
        in_flight: AtomicU64::new(0),
        budget: plan.requests.map(AtomicU64::new),
        completed: Arc::clone(&completed),
    });
    let goal = match (plan.duration, plan.requests) {
        (None, Some(n)) => Goal::Requests(n),
        (Some(d), _) => Goal::Time(d),
        (None, None) => Goal::Time(Duration::ZERO),
    };
    let progress = Progress::start(label, goal, completed, quiet);

    let (stop_tx, stop_rx) = watch::channel(false);
    let start = Instant::now();
    let mut workers = JoinSet::new();
    for _ in 0..plan.concurrency {
        workers.spawn(worker(Arc::clone(&shared), stop_rx.clone()));
    }

    let deadline = plan.duration.map(|d| start + d);
    let mut stats = RunStats::new();
    let mut stopping = false;
    let mut interrupted = false;
    let mut interruptible = true;
    loop {
        tokio::select! {
            joined = workers.join_next() => match joined {
                Some(Ok(worker_stats)) => stats.merge(&worker_stats),
                // A worker that panicked lost its counts; say so rather than hide it.
                Some(Err(_)) => stats.error("internal"),
                None => break,
            },
            _ = sleep_until_opt(deadline), if !stopping => {
                stopping = true;
                let _ = stop_tx.send(true);
            }
            changed = interrupt.wait_for(|on| *on), if !stopping && interruptible => {
                if changed.is_ok() {
                    interrupted = true;
                    stopping = true;
                    let _ = stop_tx.send(true);
                } else {
                    // Nobody can interrupt any more; stop polling a closed channel.
                    interruptible = false;
                }
            }
        }
    }
    let elapsed = start.elapsed();
    if let Some(progress) = progress {
        progress.finish();
    }
    Outcome {
        stats,
        elapsed,
        interrupted,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn worker(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) -> RunStats {
    let mut stats = RunStats::new();
    while !*stop.borrow() && shared.claim() {
        let outcome = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            outcome = exchange(&shared, &mut stats) => outcome,
        };
        shared.completed.fetch_add(1, Ordering::Relaxed);
        if outcome == Exchange::CheckoutFailed {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(CHECKOUT_BACKOFF) => {}
            }
        }
    }
    stats
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exchange {
    Done,
    CheckoutFailed,
    RequestFailed,
}

/// Counts a request in flight until dropped (also when the worker abandons it).
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn start(counter: &'a AtomicU64) -> InFlight<'a> {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One request and its whole response body, recorded in `stats`.
async fn exchange(shared: &Shared, stats: &mut RunStats) -> Exchange {
    let start = Instant::now();
    let _in_flight = InFlight::start(&shared.in_flight);
    let response = match shared.http.send(&shared.peer, shared.request()).await {
        Ok(response) => response,
        Err(e) => {
            stats.error(e.kind().as_str());
            return if is_connect_failure(e.kind()) {
                Exchange::CheckoutFailed
            } else {
                Exchange::RequestFailed
            };
        }
    };
    let reused = response
        .extensions()
        .get::<UpstreamInfo>()
        .is_some_and(|info| info.reused);
    stats.checkout(reused);
    let protocol = if response.version() == Version::HTTP_2 {
        // Every request in flight has its stream now or soon; every HTTP/2 connection is
        // checked out of the pool for its whole life.
        stats.streams_per_connection(
            shared.in_flight.load(Ordering::Relaxed),
            observe::taps().active_connections(),
        );
        "HTTP/2"
    } else {
        // One exchange at a time on an HTTP/1.1 connection, by construction.
        stats.streams_per_connection(1, 1);
        "HTTP/1.1"
    };
    let status = response.status().as_u16();
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        if let Err(e) = frame {
            stats.error(e.kind().as_str());
            return Exchange::RequestFailed;
        }
    }
    stats.response(protocol, status, start.elapsed());
    Exchange::Done
}

/// Failures to get a connection at all, after which a worker pauses before trying again.
fn is_connect_failure(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::ConnectRefused
            | ErrorKind::ConnectTimedout
            | ErrorKind::ConnectError
            | ErrorKind::TlsHandshakeFailure
            | ErrorKind::TlsHandshakeTimedout
            | ErrorKind::InvalidCert
            | ErrorKind::PoolTimedout
    )
}
