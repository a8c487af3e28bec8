//! The pool hit path side by side with Pingora 0.9.1, one criterion group per scenario:
//!
//! - `ours`: `Connector::get` + `Connector::release` (metrics, idle timestamps and caps on;
//!   exactly the code of `benches/pool.rs`, shared through `benches/common/hit.rs`).
//! - `pingora_pool`: `pingora_pool::ConnectionPool::get` + the one-byte non-blocking read
//!   Pingora's connector does before handing a pooled stream out + `put`.
//! - `pingora_connector`: `pingora_core::connectors::TransportConnector::reused_stream` +
//!   `release_stream` (which spawns its idle-watch task), with `new_stream` when
//!   `reused_stream` misses, as `get_stream` would.
//!
//! Plaintext TCP to a child process that accepts and holds the sockets; 1 and 10,000 keys;
//! one task on a current-thread runtime and two threads contending.
//!
//! ```text
//! cd benches/peers && cargo bench
//! ```

#[path = "../../common/mod.rs"]
mod common;

use std::future::Future;
use std::os::fd::AsRawFd;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Waker};
use std::time::Duration;

use common::child::{ChildUpstream, Upstream};
use common::hit::{self, key_index, one_task, per_key, two_threads, Threads, SCENARIOS};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion};
use pingora_core::connectors::{ConnectorOptions, TransportConnector};
use pingora_core::upstreams::peer::{HttpPeer, Peer as _};
use pingora_pool::{ConnectionMeta, ConnectionPool};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::task::JoinSet;

/// Idle timeout handed to Pingora's idle watcher: the same 60 s as ours.
const IDLE: Duration = Duration::from_secs(60);

fn main() {
    common::child::run_if_child();
    common::raise_nofile_limit();
    common::install_recorder();
    common::print_header("peers");
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .configure_from_args();
    for (threads, keys) in SCENARIOS {
        let mut group = c.benchmark_group(hit::group_name(threads, keys));
        hit::bench_ours(&mut group, threads, keys);
        bench_pingora_pool(&mut group, threads, keys);
        bench_pingora_connector(&mut group, threads, keys);
        group.finish();
    }
    bench_h2(&mut c);
    c.final_summary();
}

fn runtime(threads: Threads) -> Runtime {
    match threads {
        Threads::One => hit::current_thread(),
        Threads::Two => hit::two_workers(),
    }
}

/// Pingora's connection pool alone, holding plain tokio `TcpStream`s.
struct PingoraPool {
    pool: ConnectionPool<TcpStream>,
    /// One group key per peer key. Pingora keys are `u64` hashes the caller computes;
    /// they are precomputed here, which favours Pingora slightly.
    keys: Vec<u64>,
    misses: AtomicU64,
    _upstream: ChildUpstream,
}

impl PingoraPool {
    fn new(rt: &Runtime, keys: usize, per_key: usize) -> PingoraPool {
        let upstream = ChildUpstream::spawn(&Upstream::PlainHold).expect("child upstream");
        let pool = ConnectionPool::new(keys * per_key + 1024);
        let keys: Vec<u64> = (0..keys as u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        let addr = upstream.addr();
        rt.block_on(async {
            for chunk in keys.chunks(256) {
                let mut set = JoinSet::new();
                for &key in chunk {
                    for _ in 0..per_key {
                        set.spawn(async move {
                            let s = TcpStream::connect(addr).await.expect("connect");
                            s.set_nodelay(true).expect("nodelay");
                            (key, s)
                        });
                    }
                }
                while let Some(res) = set.join_next().await {
                    let (key, s) = res.expect("join");
                    let meta = ConnectionMeta::new(key, s.as_raw_fd());
                    drop(pool.put(&meta, s));
                }
            }
        });
        PingoraPool {
            pool,
            keys,
            misses: AtomicU64::new(0),
            _upstream: upstream,
        }
    }

    /// get + the connector's reusability check + put.
    fn hit(&self, key: u64) {
        let Some(mut stream) = self.pool.get(&key) else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if !reusable(&mut stream) {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let meta = ConnectionMeta::new(key, stream.as_raw_fd());
        drop(self.pool.put(&meta, stream));
    }
}

/// What Pingora's connector does before handing out (and before pooling) a stream: poll a
/// one-byte read once, outside tokio's cooperative budget; `Pending` means idle and healthy.
/// (Pingora writes it with `FutureExt::now_or_never`, which also polls once with a no-op
/// waker.)
fn reusable(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1];
    let mut read = pin!(tokio::task::unconstrained(stream.read(&mut buf)));
    let mut cx = Context::from_waker(Waker::noop());
    read.as_mut().poll(&mut cx).is_pending()
}

fn bench_pingora_pool(group: &mut BenchmarkGroup<'_, WallTime>, threads: Threads, keys: usize) {
    if !common::selected(&format!("{}/pingora_pool", hit::group_name(threads, keys))) {
        return;
    }
    let rt = runtime(threads);
    let fx = PingoraPool::new(&rt, keys, per_key(threads, keys));
    group.bench_function("pingora_pool", |b| match threads {
        Threads::One => b.iter_custom(|iters| {
            let fx = &fx;
            one_task(&rt, iters, |j| {
                let key = fx.keys[key_index(threads, keys, 0, j)];
                async move { fx.hit(key) }
            })
        }),
        Threads::Two => b.iter_custom(|iters| {
            two_threads(&rt, iters, |t, iters| {
                let fx = &fx;
                async move {
                    for j in 0..iters {
                        fx.hit(fx.keys[key_index(threads, keys, t, j)]);
                    }
                }
            })
        }),
    });
    eprintln!(
        "[{}] pingora_pool: {} misses (found nothing, or the check failed)",
        hit::group_name(threads, keys),
        fx.misses.load(Ordering::Relaxed)
    );
}

/// Pingora's `TransportConnector` with its own pool and idle-watch tasks.
struct PingoraConnector {
    connector: Arc<TransportConnector>,
    peers: Vec<HttpPeer>,
    reuses: AtomicU64,
    misses: AtomicU64,
    _upstream: ChildUpstream,
}

impl PingoraConnector {
    fn new(rt: &Runtime, keys: usize, per_key: usize) -> PingoraConnector {
        let upstream = ChildUpstream::spawn(&Upstream::PlainHold).expect("child upstream");
        let connector = Arc::new(TransportConnector::new(Some(ConnectorOptions::new(
            keys * per_key + 1024,
        ))));
        let peers: Vec<HttpPeer> = (0..keys as u64)
            .map(|i| {
                let mut p = HttpPeer::new(upstream.addr(), false, String::new());
                p.group_key = i;
                p
            })
            .collect();
        rt.block_on(async {
            let mut held = Vec::new();
            for chunk in peers.chunks(256) {
                let mut set = JoinSet::new();
                for peer in chunk {
                    for _ in 0..per_key {
                        let (c, p) = (connector.clone(), peer.clone());
                        set.spawn(async move {
                            let s = c.new_stream(&p).await.expect("pingora new_stream");
                            (p.reuse_hash(), s)
                        });
                    }
                }
                while let Some(res) = set.join_next().await {
                    held.push(res.expect("join"));
                }
            }
            for (hash, s) in held {
                connector.release_stream(s, hash, Some(IDLE));
            }
            // Let the idle-watch tasks start before measuring.
            tokio::time::sleep(Duration::from_millis(100)).await;
        });
        PingoraConnector {
            connector,
            peers,
            reuses: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            _upstream: upstream,
        }
    }

    /// reused_stream + release_stream; a miss dials a new stream (what `get_stream` does).
    async fn hit(&self, peer: &HttpPeer) {
        let stream = match self.connector.reused_stream(peer).await {
            Some(s) => {
                self.reuses.fetch_add(1, Ordering::Relaxed);
                s
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                self.connector
                    .new_stream(peer)
                    .await
                    .expect("pingora new_stream")
            }
        };
        self.connector
            .release_stream(stream, peer.reuse_hash(), Some(IDLE));
    }
}

fn bench_pingora_connector(
    group: &mut BenchmarkGroup<'_, WallTime>,
    threads: Threads,
    keys: usize,
) {
    if !common::selected(&format!(
        "{}/pingora_connector",
        hit::group_name(threads, keys)
    )) {
        return;
    }
    let rt = runtime(threads);
    let fx = PingoraConnector::new(&rt, keys, per_key(threads, keys));
    group.bench_function("pingora_connector", |b| match threads {
        Threads::One => b.iter_custom(|iters| {
            let fx = &fx;
            one_task(&rt, iters, |j| {
                fx.hit(&fx.peers[key_index(threads, keys, 0, j)])
            })
        }),
        Threads::Two => b.iter_custom(|iters| {
            two_threads(&rt, iters, |t, iters| {
                let fx = &fx;
                async move {
                    for j in 0..iters {
                        fx.hit(&fx.peers[key_index(threads, keys, t, j)]).await;
                    }
                }
            })
        }),
    });
    eprintln!(
        "[{}] pingora_connector: {} reuses, {} misses (healthy idle stream not handed out: \
         dialled anew)",
        hit::group_name(threads, keys),
        fx.reuses.load(Ordering::Relaxed),
        fx.misses.load(Ordering::Relaxed)
    );
}

// ------------------------------------------------------------------------------- HTTP/2
//
// One whole request on an HTTP/2 connection that is already open, ours against Pingora's
// `connectors::http::v2::Connector`, to the child-process HTTP upstream of
// `../common/http_upstream.rs` (TLS 1.3, ALPN h2, `GET /` answered with a 2-byte body):
//
// - `ours`: `HttpConnector::send` + the body collected (our public API has no checkout on
//   its own: `send` picks a stream, sends, and the body's end gives the stream back).
// - `pingora`: `reused_http_session` + `write_request_header` + `read_response_header` +
//   `read_response_body` to the end + `release_http_session` (10 min idle timeout, as ours), with
//   `new_http_session` when `reused_http_session` finds nothing, as `get_http_session` would.
// - `pingora_checkout`: `reused_http_session` + `release_http_session` alone, for reference:
//   the part of `pingora`'s request that is its connector's.
//
// After each group, a paired run (`<group>/paired`: the three alternating in rounds, see
// `common::paired`) prints the median per-round ratios pingora / ours and
// pingora_checkout / ours.
//
// Timing: CPU time of the benchmark thread (current-thread runtime: the h2 connection tasks
// of both, Pingora's idle-watch tasks, all run on it). `1_task`: one request after the
// other; `16_tasks`: sixteen tasks at once on the same connection (Pingora peer and ours
// both allow 100 streams per connection).

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use pingora_core::connectors::http::v2::Connector as PingoraH2;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::protocols::http::v2::client::Http2Session;
use pingora_core::protocols::ALPN;
use pingora_http::RequestHeader;
use upstream_pool::http::HttpConnector;

/// Requests in flight together in the `16_tasks` cases.
const H2_TASKS: u64 = 16;
/// Idle timeout of the HTTP/2 connections, ours and Pingora's.
const H2_IDLE: Duration = Duration::from_secs(600);

struct H2Fixture {
    ours: HttpConnector,
    our_peer: upstream_pool::Peer,
    pingora: PingoraH2,
    pingora_peer: HttpPeer,
    pingora_reuses: AtomicU64,
    pingora_misses: AtomicU64,
}

impl H2Fixture {
    async fn ours(&self) {
        let req = http::Request::get("/")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = self.ours.send(&self.our_peer, req).await.expect("send");
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.expect("body");
        assert_eq!(body.to_bytes().len(), 2);
    }

    async fn pingora_session(&self) -> Http2Session {
        match self
            .pingora
            .reused_http_session(&self.pingora_peer)
            .await
            .expect("reused_http_session")
        {
            Some(s) => {
                self.pingora_reuses.fetch_add(1, Ordering::Relaxed);
                s
            }
            None => {
                self.pingora_misses.fetch_add(1, Ordering::Relaxed);
                match self
                    .pingora
                    .new_http_session::<_, ()>(&self.pingora_peer)
                    .await
                    .expect("new_http_session")
                {
                    HttpSession::H2(s) => s,
                    _ => panic!("Pingora did not get an HTTP/2 session"),
                }
            }
        }
    }

    async fn pingora(&self) {
        let mut session = self.pingora_session().await;
        let mut req = RequestHeader::build("GET", b"/", None).expect("request header");
        req.insert_header("host", "localhost").expect("host");
        session
            .write_request_header(Box::new(req), true)
            .expect("write_request_header");
        session
            .read_response_header()
            .await
            .expect("read_response_header");
        assert_eq!(
            session.response_header().map(|h| h.status.as_u16()),
            Some(200)
        );
        let mut len = 0;
        while let Some(data) = session
            .read_response_body()
            .await
            .expect("read_response_body")
        {
            len += data.len();
        }
        assert_eq!(len, 2);
        self.pingora
            .release_http_session(session, &self.pingora_peer, Some(H2_IDLE));
    }

    async fn pingora_checkout(&self) {
        let session = self.pingora_session().await;
        self.pingora
            .release_http_session(session, &self.pingora_peer, Some(H2_IDLE));
    }
}

/// `iters` calls of `op` split over `tasks` tasks; CPU time of this thread.
fn h2_split<F, Fut>(rt: &Runtime, fx: &Arc<H2Fixture>, iters: u64, tasks: u64, op: F) -> Duration
where
    F: Fn(Arc<H2Fixture>) -> Fut + Copy + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    rt.block_on(async {
        let start = hit::thread_cpu_time();
        let mut set = JoinSet::new();
        for t in 0..tasks {
            let n = iters / tasks + u64::from(t < iters % tasks);
            let fx = Arc::clone(fx);
            set.spawn(async move {
                for _ in 0..n {
                    op(Arc::clone(&fx)).await;
                }
            });
        }
        while let Some(r) = set.join_next().await {
            r.expect("task");
        }
        hit::thread_cpu_time() - start
    })
}

fn bench_h2(c: &mut Criterion) {
    if ![
        "h2/1_task",
        "h2/16_tasks",
        "h2/1_task/paired",
        "h2/16_tasks/paired",
    ]
    .iter()
    .any(|n| common::selected(n))
    {
        return;
    }
    let pki = common::certs::TestPki::new();
    let dir = common::certs_dir();
    let files = pki
        .server
        .write_pem(dir.path(), "server")
        .expect("write the server certificate");
    let upstream = ChildUpstream::spawn(&Upstream::Http {
        chain: files.chain,
        key: files.key,
    })
    .expect("child upstream");
    let rt = hit::current_thread();
    // Default options but a 10-minute idle timeout on both sides: one side's connection sits
    // idle while the other is measured, and must not be closed for it.
    let mut options = upstream_pool::ConnectorOptions::default();
    options.idle_timeout = H2_IDLE;
    let ours = HttpConnector::new(upstream_pool::Connector::new(options).expect("connector"));
    let our_peer = upstream_pool::Peer::tls(upstream.addr(), "localhost")
        .with_ca(pki.ca_a())
        .with_alpn(upstream_pool::Alpn::H2);
    let mut pingora_peer = HttpPeer::new(upstream.addr(), true, "localhost".to_string());
    pingora_peer.options.alpn = ALPN::H2;
    pingora_peer.options.ca = Some(Arc::new(pki.ca_a().into_boxed_slice()));
    // Pingora's default is 1 stream per connection; ours is 100.
    pingora_peer.options.max_h2_streams = 100;
    let fx = Arc::new(H2Fixture {
        ours,
        our_peer,
        pingora: PingoraH2::new(None),
        pingora_peer,
        pingora_reuses: AtomicU64::new(0),
        pingora_misses: AtomicU64::new(0),
    });
    // One connection each, opened before timing.
    rt.block_on(async {
        fx.ours().await;
        fx.pingora().await;
    });
    let stats =
        |rt: &Runtime| rt.block_on(common::http_upstream::stats(upstream.addr(), &pki.ca_a()));
    for tasks in [1, H2_TASKS] {
        let name = if tasks == 1 {
            "h2/1_task"
        } else {
            "h2/16_tasks"
        };
        if !common::selected(name) && !common::selected(&format!("{name}/paired")) {
            continue;
        }
        let before = stats(&rt);
        let (reuses, misses) = (
            fx.pingora_reuses.load(Ordering::Relaxed),
            fx.pingora_misses.load(Ordering::Relaxed),
        );
        let mut group = c.benchmark_group(name);
        group.bench_function("ours", |b| {
            b.iter_custom(|iters| {
                h2_split(&rt, &fx, iters, tasks, |fx| async move { fx.ours().await })
            })
        });
        group.bench_function("pingora", |b| {
            b.iter_custom(|iters| {
                h2_split(
                    &rt,
                    &fx,
                    iters,
                    tasks,
                    |fx| async move { fx.pingora().await },
                )
            })
        });
        group.bench_function("pingora_checkout", |b| {
            b.iter_custom(|iters| {
                h2_split(&rt, &fx, iters, tasks, |fx| async move {
                    fx.pingora_checkout().await
                })
            })
        });
        group.finish();
        if common::selected(&format!("{name}/paired")) {
            let batch = 500 * tasks.min(4);
            common::paired(
                name,
                common::paired_rounds(21),
                batch,
                &["ours", "pingora", "pingora_checkout"],
                &mut [
                    &mut |n| h2_split(&rt, &fx, n, tasks, |fx| async move { fx.ours().await }),
                    &mut |n| h2_split(&rt, &fx, n, tasks, |fx| async move { fx.pingora().await }),
                    &mut |n| {
                        h2_split(&rt, &fx, n, tasks, |fx| async move {
                            fx.pingora_checkout().await
                        })
                    },
                ],
            );
        }
        let after = stats(&rt);
        eprintln!(
            "[{name}] server saw {} requests and {} new connections (1 of them for /stats); \
             Pingora: {} sessions reused, {} not found (new_http_session)",
            after.requests - before.requests,
            after.connections - before.connections,
            fx.pingora_reuses.load(Ordering::Relaxed) - reuses,
            fx.pingora_misses.load(Ordering::Relaxed) - misses,
        );
    }
    drop(fx);
    drop(rt);
}
