//! `upstream_pool::http` against the bare clients it is built on, one request at a time and
//! with requests in flight together. The upstream runs in a child process
//! (`benches/common/http_upstream.rs`: TLS, ALPN, a fixed 2-byte `ok` body), so its CPU is not
//! on the benchmark's thread.
//!
//! - `h2/<tasks>`: one `GET /` on an HTTP/2 connection that is already open, the response body
//!   read to its end. `send`: [`HttpConnector::send`] + collecting the body. `bare`: an
//!   `h2::client::SendRequest` (`poll_ready` + `send_request` + the response + its data,
//!   capacity released) on an `h2` connection over a directly held `tokio-openssl` stream:
//!   what `send` does minus everything it adds (stream accounting, request preparation, the
//!   pooled `Connection` under the `h2` connection, the `ResponseBody` wrapper, metrics).
//!   `1_task` one request after the other; `16_tasks` sixteen tasks sending at once on the
//!   same connection (their own clone of the `SendRequest` each, for `bare`).
//! - `h1/1_task`: one `GET /` with its body over HTTP/1.1 keep-alive. `send`:
//!   [`HttpConnector::send`] (pooled connection, our codec). `hyper_per_request`: what
//!   `examples/reverse_proxy.rs` did before issue 12 (`git show 920a8b3:examples/reverse_proxy.rs`):
//!   `Connector::get`, a fresh `hyper::client::conn::http1::handshake` on the pooled
//!   `Connection`, the request with its body collected while `without_shutdown` drives the
//!   connection, then `Connector::release` of the I/O it gives back. `hyper_kept`: a bare
//!   hyper HTTP/1.1 `SendRequest` kept open on a directly held `tokio-openssl` stream (the
//!   floor: no pool, no per-request session setup).
//!
//! After each group a paired run (`<group>/paired`) alternates its variants in rounds of a few
//! hundred requests, rotating their order, and prints the median of the per-round ratios: on
//! this shared machine a variant's criterion estimate moves by tens of percent from one
//! minute to the next, the ratio within a round much less.
//!
//! Timing: CPU time of the benchmark thread per request (`CLOCK_THREAD_CPUTIME_ID`, as in
//! `benches/pool.rs`). The runtime is current-thread, so the `h2` connection tasks (ours and
//! the bare one) and hyper's connection future run on that thread and are counted; the
//! server's work is in the child and is not. After each variant the bench asks the server
//! (`GET /stats`) how many connections and requests it saw, and fails if a variant opened a
//! connection while measuring or if the server did not see every request.
//!
//! ```text
//! cargo bench --bench http
//! cargo bench --bench http -- h2/16_tasks     # one group (and its paired run)
//! cargo bench --bench http -- paired          # the paired runs only
//! ```

mod common;

use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use criterion::Criterion;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::task::JoinSet;
use tokio_openssl::SslStream;
use upstream_pool::http::{HttpConnector, UpstreamInfo};
use upstream_pool::{Alpn, Connector, ConnectorOptions, Peer};

use common::certs::TestPki;
use common::child::{ChildUpstream, Upstream};
use common::hit::{current_thread, thread_cpu_time};
use common::http_upstream::ServerStats;

/// Requests in flight together in the `16_tasks` cases.
const TASKS: u64 = 16;
/// Rounds of the paired runs (`UPSTREAM_POOL_BENCH_ROUNDS` overrides it) and requests per
/// variant per round (times 4 with 16 tasks).
const PAIRED_ROUNDS: usize = 21;
const PAIRED_BATCH: u64 = 500;

fn main() {
    common::child::run_if_child();
    common::install_recorder();
    common::print_header("http");
    let pki = TestPki::new();
    let dir = common::certs_dir();
    let files = pki
        .server
        .write_pem(dir.path(), "server")
        .expect("write the server certificate");
    let upstream = ChildUpstream::spawn(&Upstream::Http {
        chain: files.chain,
        key: files.key,
    })
    .expect("start the child upstream");
    let rt = current_thread();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .configure_from_args();
    let fx = Fixture {
        rt: &rt,
        pki: &pki,
        addr: upstream.addr(),
    };
    for tasks in [1, TASKS] {
        let group = if tasks == 1 {
            "h2/1_task"
        } else {
            "h2/16_tasks"
        };
        if common::selected(group) || common::selected(&format!("{group}/paired")) {
            bench_h2(&mut c, &fx, group, tasks);
        }
    }
    if common::selected("h1/1_task") || common::selected("h1/1_task/paired") {
        bench_h1(&mut c, &fx);
    }
    eprintln!(
        "[http] server saw in total: {}",
        rt.block_on(server_stats(&fx))
    );
    c.final_summary();
}

struct Fixture<'a> {
    rt: &'a Runtime,
    pki: &'a TestPki,
    addr: std::net::SocketAddr,
}

async fn server_stats(fx: &Fixture<'_>) -> ServerStats {
    common::http_upstream::stats(fx.addr, &fx.pki.ca_a()).await
}

/// Runs one criterion variant and checks with the server that every request it timed
/// reached the server and that it opened no connection while timed (the `/stats` request's
/// own connection excepted).
fn checked_variant(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    fx: &Fixture<'_>,
    group_name: &str,
    name: &str,
    done: &AtomicU64,
    mut run: impl FnMut(u64) -> Duration,
) {
    if !common::selected(&format!("{group_name}/{name}")) {
        return;
    }
    let before = fx.rt.block_on(server_stats(fx));
    let start_count = done.load(Ordering::Relaxed);
    group.bench_function(name, |b| b.iter_custom(&mut run));
    let after = fx.rt.block_on(server_stats(fx));
    let sent = done.load(Ordering::Relaxed) - start_count;
    eprintln!(
        "[http] {group_name}/{name}: {sent} requests timed; the server saw {} requests and {} new \
         connections (1 of them for /stats)",
        after.requests - before.requests,
        after.connections - before.connections,
    );
    assert_eq!(
        after.requests - before.requests,
        sent,
        "{group_name}/{name}: the server did not see every request exactly once"
    );
    assert_eq!(
        after.connections - before.connections,
        1,
        "{group_name}/{name}: a connection was opened while measuring"
    );
}

/// Checks that the server saw every request of a paired run and no new connection but the
/// `/stats` one.
fn check_paired(fx: &Fixture<'_>, label: &str, before: ServerStats, sent: u64) {
    let after = fx.rt.block_on(server_stats(fx));
    eprintln!(
        "[http] {label}/paired: {sent} requests sent; the server saw {} requests and {} new \
         connections (1 of them for /stats)",
        after.requests - before.requests,
        after.connections - before.connections,
    );
    assert_eq!(
        after.requests - before.requests,
        sent,
        "{label}/paired: requests lost"
    );
    assert_eq!(
        after.connections - before.connections,
        1,
        "{label}/paired: a connection was opened while measuring"
    );
}

async fn bare_tls(fx: &Fixture<'_>, alpn: &[u8]) -> SslStream<TcpStream> {
    common::http_upstream::client_tls(fx.addr, &fx.pki.ca_a(), alpn).await
}

/// Default options but a 10-minute idle timeout: a variant's connection sits idle while the
/// others are measured (longer than the default 30 s with criterion's analysis in between),
/// and a connection closed for idleness would make the next run dial.
fn connector() -> Connector {
    let mut options = ConnectorOptions::default();
    options.idle_timeout = Duration::from_secs(600);
    Connector::new(options).expect("connector")
}

// ---------------------------------------------------------------------------------- HTTP/2

async fn ours_request(http: &HttpConnector, peer: &Peer) {
    let req = http::Request::get("/")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = http.send(peer, req).await.expect("send");
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.expect("body");
    assert_eq!(body.to_bytes().len(), 2);
}

async fn bare_h2_request(send: &mut h2::client::SendRequest<Bytes>) {
    poll_fn(|cx| send.poll_ready(cx)).await.expect("ready");
    let req = http::Request::get("https://localhost/")
        .body(())
        .expect("request");
    let (response, _) = send.send_request(req, true).expect("send_request");
    let response = response.await.expect("response");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut len = 0;
    while let Some(data) = body.data().await {
        let data = data.expect("data");
        len += data.len();
        let _ = body.flow_control().release_capacity(data.len());
    }
    assert_eq!(len, 2);
}

/// Runs `iters` requests split over `tasks` tasks (`op` makes one task's loop) and returns
/// this thread's CPU time.
fn split<F, Fut>(rt: &Runtime, iters: u64, tasks: u64, mut op: F) -> Duration
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    rt.block_on(async {
        let start = thread_cpu_time();
        let mut set = JoinSet::new();
        for t in 0..tasks {
            let n = iters / tasks + u64::from(t < iters % tasks);
            set.spawn(op(n));
        }
        while let Some(r) = set.join_next().await {
            r.expect("task");
        }
        thread_cpu_time() - start
    })
}

fn bench_h2(c: &mut Criterion, fx: &Fixture<'_>, group_name: &str, tasks: u64) {
    let http = HttpConnector::new(connector());
    let peer = Peer::tls(fx.addr, "localhost")
        .with_ca(fx.pki.ca_a())
        .with_alpn(Alpn::H2);
    // Open the connection (and learn the server's SETTINGS) before timing.
    fx.rt.block_on(async {
        let req = http::Request::get("/")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = http.send(&peer, req).await.expect("first send");
        assert_eq!(response.version(), http::Version::HTTP_2);
        response.into_body().collect().await.expect("body");
    });

    let (send, driver) = fx.rt.block_on(async {
        let tls = bare_tls(fx, b"\x02h2").await;
        assert_eq!(tls.ssl().selected_alpn_protocol(), Some(&b"h2"[..]));
        let (send, conn) = h2::client::Builder::new()
            // The same windows as ours (src/http/h2/conn.rs).
            .initial_window_size(2 * 1024 * 1024)
            .initial_connection_window_size(5 * 1024 * 1024)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .expect("h2 handshake");
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut send = send;
        bare_h2_request(&mut send).await;
        (send, driver)
    });

    let done = AtomicU64::new(0);
    let mut group = c.benchmark_group(group_name);
    checked_variant(&mut group, fx, group_name, "send", &done, |iters| {
        done.fetch_add(iters, Ordering::Relaxed);
        if tasks == 1 {
            common::hit::one_task(fx.rt, iters, |_| ours_request(&http, &peer))
        } else {
            split(fx.rt, iters, tasks, |n| {
                let (http, peer) = (http.clone(), peer.clone());
                async move {
                    for _ in 0..n {
                        ours_request(&http, &peer).await;
                    }
                }
            })
        }
    });
    checked_variant(&mut group, fx, group_name, "bare", &done, |iters| {
        done.fetch_add(iters, Ordering::Relaxed);
        split(fx.rt, iters, tasks, |n| {
            let mut send = send.clone();
            async move {
                for _ in 0..n {
                    bare_h2_request(&mut send).await;
                }
            }
        })
    });
    group.finish();
    let paired_name = format!("{group_name}/paired");
    if common::selected(&paired_name) {
        let before = fx.rt.block_on(server_stats(fx));
        let rounds = common::paired_rounds(PAIRED_ROUNDS);
        let batch = PAIRED_BATCH * tasks.min(4);
        common::paired(
            group_name,
            rounds,
            batch,
            &["bare", "send"],
            &mut [
                &mut |n| {
                    split(fx.rt, n, tasks, |n| {
                        let mut send = send.clone();
                        async move {
                            for _ in 0..n {
                                bare_h2_request(&mut send).await;
                            }
                        }
                    })
                },
                &mut |n| {
                    split(fx.rt, n, tasks, |n| {
                        let (http, peer) = (http.clone(), peer.clone());
                        async move {
                            for _ in 0..n {
                                ours_request(&http, &peer).await;
                            }
                        }
                    })
                },
            ],
        );
        check_paired(fx, group_name, before, 2 * rounds as u64 * batch);
    }
    // Still one connection for ours: no request dialled a second one.
    fx.rt.block_on(async {
        let req = http::Request::get("/")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = http.send(&peer, req).await.expect("last send");
        let info = response
            .extensions()
            .get::<UpstreamInfo>()
            .expect("UpstreamInfo");
        assert!(info.reused && !info.retried);
    });
    drop(send);
    driver.abort();
}

// -------------------------------------------------------------------------------- HTTP/1.1

/// One exchange as `examples/reverse_proxy.rs` did it before issue 12 (920a8b3): a hyper
/// client session per request over the pooled connection, given back by `without_shutdown`.
async fn hyper_per_request(connector: &Connector, peer: &Peer) {
    let conn = connector.get(peer).await.expect("get");
    assert!(conn.reused(), "the pooled connection was not reused");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
        .await
        .expect("handshake");
    let req = http::Request::get("/")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let request = async move {
        let response = sender.send_request(req).await.expect("response");
        let (head, body) = response.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        (head, body)
    };
    let ((head, body), parts) = tokio::join!(request, connection.without_shutdown());
    assert_eq!(head.status, 200);
    assert_eq!(body.len(), 2);
    let parts = parts.expect("connection");
    assert!(parts.read_buf.is_empty());
    connector.release(parts.io.into_inner());
}

async fn hyper_kept(send: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>) {
    send.ready().await.expect("ready");
    let req = http::Request::get("/")
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .expect("request");
    let response = send.send_request(req).await.expect("response");
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.expect("body");
    assert_eq!(body.to_bytes().len(), 2);
}

fn bench_h1(c: &mut Criterion, fx: &Fixture<'_>) {
    let peer = Peer::tls(fx.addr, "localhost")
        .with_ca(fx.pki.ca_a())
        .with_alpn(Alpn::H1);
    let http = HttpConnector::new(connector());
    let pool = connector();
    let (mut kept, driver) = fx.rt.block_on(async {
        // One pooled connection each, opened before timing.
        ours_request(&http, &peer).await;
        let conn = pool.get(&peer).await.expect("dial");
        pool.release(conn);
        hyper_per_request(&pool, &peer).await;

        let tls = bare_tls(fx, b"\x08http/1.1").await;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("handshake");
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        (send, driver)
    });

    let done = AtomicU64::new(0);
    let mut group = c.benchmark_group("h1/1_task");
    checked_variant(&mut group, fx, "h1/1_task", "send", &done, |iters| {
        done.fetch_add(iters, Ordering::Relaxed);
        common::hit::one_task(fx.rt, iters, |_| ours_request(&http, &peer))
    });
    checked_variant(
        &mut group,
        fx,
        "h1/1_task",
        "hyper_per_request",
        &done,
        |iters| {
            done.fetch_add(iters, Ordering::Relaxed);
            common::hit::one_task(fx.rt, iters, |_| hyper_per_request(&pool, &peer))
        },
    );
    checked_variant(&mut group, fx, "h1/1_task", "hyper_kept", &done, |iters| {
        done.fetch_add(iters, Ordering::Relaxed);
        let kept = &mut kept;
        fx.rt.block_on(async {
            let start = thread_cpu_time();
            for _ in 0..iters {
                hyper_kept(kept).await;
            }
            thread_cpu_time() - start
        })
    });
    group.finish();
    if common::selected("h1/1_task/paired") {
        let before = fx.rt.block_on(server_stats(fx));
        let rounds = common::paired_rounds(PAIRED_ROUNDS);
        let batch = PAIRED_BATCH;
        common::paired(
            "h1/1_task",
            rounds,
            batch,
            &["send", "hyper_per_request", "hyper_kept"],
            &mut [
                &mut |n| common::hit::one_task(fx.rt, n, |_| ours_request(&http, &peer)),
                &mut |n| common::hit::one_task(fx.rt, n, |_| hyper_per_request(&pool, &peer)),
                &mut |n| {
                    let kept = &mut kept;
                    fx.rt.block_on(async {
                        let start = thread_cpu_time();
                        for _ in 0..n {
                            hyper_kept(kept).await;
                        }
                        thread_cpu_time() - start
                    })
                },
            ],
        );
        check_paired(fx, "h1/1_task", before, 3 * rounds as u64 * batch);
    }
    // (No idle-count check at the end: a connection idle for longer than the pool's 30 s idle
    // timeout while the other variants ran is rightly closed; the server's counts above show
    // that no variant dialled while it was measured.)
    drop(kept);
    driver.abort();
}
