//! One bench run: `concurrency` worker tasks, each doing `get` → `GET /` → read → `release`
//! (or close) in a loop until the time or request budget runs out.
//!
//! The run ends at its deadline exactly: workers abandon the request in flight (its
//! connection is dropped, never pooled half-read) rather than finishing it, so a slow
//! upstream cannot stretch the run. Abandoned requests are not counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use upstream_pool::{Connection, Connector, Error, Peer};

use super::http::{self, HttpError, Response};
use super::progress::{Goal, Progress};
use super::stats::RunStats;

/// Pause after a failed `get`, so that an upstream that is down costs a few hundred attempts
/// per second instead of a busy loop on every core.
const CHECKOUT_BACKOFF: Duration = Duration::from_millis(10);

/// What one run does.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// The connector, fresh for this run so its pool and session cache start empty.
    pub(crate) connector: Connector,
    /// Where the requests go.
    pub(crate) peer: Peer,
    /// `Host` header value.
    pub(crate) host: String,
    /// Release connections after each response (else close them).
    pub(crate) reuse: bool,
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

/// State the workers share: read-only except the two counters.
#[derive(Debug)]
struct Shared {
    connector: Connector,
    peer: Peer,
    request: Vec<u8>,
    reuse: bool,
    /// Requests that may still be started; `None` for no limit.
    budget: Option<AtomicU64>,
    /// Requests finished (either way), for the progress bar.
    completed: Arc<AtomicU64>,
}

impl Shared {
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
        request: http::get_request(&plan.host),
        connector: plan.connector,
        peer: plan.peer,
        reuse: plan.reuse,
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
    // Grown by the first read and then reused for every response of this worker.
    let mut buf = Vec::new();
    while !*stop.borrow() && shared.claim() {
        let outcome = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            outcome = exchange(&shared, &mut stats, &mut buf) => outcome,
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

/// One request on a checked-out connection, recorded in `stats`.
async fn exchange(shared: &Shared, stats: &mut RunStats, buf: &mut Vec<u8>) -> Exchange {
    let start = Instant::now();
    let mut conn = match shared.connector.get(&shared.peer).await {
        Ok(conn) => conn,
        Err(e) => {
            stats.error(e.kind().as_str());
            return Exchange::CheckoutFailed;
        }
    };
    stats.checkout(conn.reused());
    match request(&mut conn, &shared.request, buf).await {
        Ok(response) => {
            stats.response("HTTP/1.1", response.status, start.elapsed());
            // One exchange at a time on an HTTP/1.1 connection.
            stats.streams_per_connection(1, 1);
            if shared.reuse && response.keep_alive {
                shared.connector.release(conn);
            } else {
                // close_notify before the FIN, as a polite client does; a failure here
                // changes nothing for the measurement.
                let _ = conn.shutdown().await;
            }
            Exchange::Done
        }
        Err(e) => {
            stats.error(error_label(&e));
            Exchange::RequestFailed
        }
    }
}

async fn request(
    conn: &mut Connection,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> Result<Response, HttpError> {
    conn.write_all(request).await?;
    conn.flush().await?;
    http::read_response(conn, buf).await
}

/// The `errors_by_kind` label of a failed exchange: the connector's `ErrorKind` when the I/O
/// error carries one (a reused connection found broken), else an HTTP-level label.
fn error_label(e: &HttpError) -> &'static str {
    match e {
        HttpError::Io(io) => Error::from_io(io).map_or("io_error", |e| e.kind().as_str()),
        HttpError::Closed => "upstream_closed",
        HttpError::Malformed(_) => "http_error",
    }
}
