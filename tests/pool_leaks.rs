//! Cancelled gets and dials leak nothing: no slot (`connection_count_for` returns to 0 and the
//! slot is usable again) and no file descriptor (the process's count returns to its
//! baseline).
//!
//! Descriptor counts are process-wide, so this binary holds exactly one test, which runs its
//! phases one after another on a runtime it builds itself (so the runtime's own descriptors
//! are part of the baseline).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use upstream_pool::{Connection, Connector, ConnectorOptions, ErrorKind, Peer};

use support::certs::TestPki;
use support::client::http_get;
use support::server::{Behaviour, TestServer};
use support::{open_fds, wait_for_open_fds, wait_until};

const SETTLE: Duration = Duration::from_secs(5);

fn connector(configure: impl FnOnce(&mut ConnectorOptions)) -> Connector {
    let mut options = ConnectorOptions::default();
    configure(&mut options);
    Connector::new(options).unwrap()
}

fn tls_peer(addr: SocketAddr) -> Peer {
    Peer::tls(addr, "localhost").with_ca(TestPki::shared().ca_a())
}

async fn exchange(conn: &mut Connection) -> usize {
    let response = http_get(conn, "localhost").await.unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    response.conn_id().unwrap()
}

/// A TCP relay that holds each accepted connection for `delay` before connecting it to
/// `upstream`: a server with a slow handshake.
async fn delay_proxy(upstream: SocketAddr, delay: Duration) -> (SocketAddr, JoinHandle<()>) {
    // tokio's bind listens with a backlog of 1024.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (addr, task)
}

async fn assert_back_to(baseline: usize, phase: &str) {
    let now = wait_for_open_fds(baseline, SETTLE).await;
    assert!(
        now <= baseline,
        "{phase}: {now} descriptors open, baseline {baseline}"
    );
}

#[test]
fn cancelled_gets_and_dials_leak_no_slots_and_no_descriptors() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let http = TestServer::start(Behaviour::Http);
    let never = TestServer::start(Behaviour::NeverAnswer);
    let (slow, slow_task) = delay_proxy(http.addr(), Duration::from_millis(300)).await;
    // A port nothing listens on.
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };

    // Warm up: whatever OpenSSL, the runtime and the servers open once and keep.
    {
        let c = connector(|_| {});
        let mut conn = c.get(&tls_peer(http.addr())).await.unwrap();
        exchange(&mut conn).await;
        c.release(conn);
        let mut conn = c.get(&tls_peer(slow)).await.unwrap();
        exchange(&mut conn).await;
        drop(conn);
        drop(c);
        http.wait_for(|s| s.open == 0).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let baseline = open_fds();

    // 1. Waiters at the cap that are dropped (timed out futures and aborted tasks).
    {
        let peer = tls_peer(http.addr());
        let c = connector(|o| {
            o.max_connections_per_peer = Some(1);
            o.wait_timeout = Duration::from_secs(10);
        });
        let mut held = c.get(&peer).await.unwrap();
        exchange(&mut held).await;
        for _ in 0..20 {
            let cancelled = tokio::time::timeout(Duration::from_millis(5), c.get(&peer)).await;
            assert!(cancelled.is_err());
        }
        let aborted: Vec<JoinHandle<()>> = (0..20)
            .map(|_| {
                let (c, peer) = (c.clone(), peer.clone());
                tokio::spawn(async move {
                    let _ = c.get(&peer).await;
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        for task in &aborted {
            task.abort();
        }
        for task in aborted {
            let _ = task.await;
        }
        assert_eq!(c.connection_count_for(&peer), 1);
        drop(held);
        assert_eq!(c.connection_count_for(&peer), 0, "waiters: slot leaked");
        // The slot is usable again.
        let mut conn = tokio::time::timeout(SETTLE, c.get(&peer))
            .await
            .expect("waiters: the freed slot was lost")
            .unwrap();
        assert!(!conn.reused());
        exchange(&mut conn).await;
        drop(conn);
        drop(c);
        http.wait_for(|s| s.open == 0).await;
        assert_back_to(baseline, "dropped waiters").await;
    }

    // 2. Gets dropped mid-dial against a server that never answers the handshake, with and
    //    without a cap (so some are dials and some waiters).
    for cap in [None, Some(3)] {
        let peer = tls_peer(never.addr()).with_total_connection_timeout(Duration::from_millis(400));
        let c = connector(|o| {
            o.max_connections_per_peer = cap;
            o.wait_timeout = Duration::from_secs(10);
        });
        let before = never.stats().accepted;
        for _ in 0..20 {
            let cancelled = tokio::time::timeout(Duration::from_millis(20), c.get(&peer)).await;
            assert!(cancelled.is_err());
        }
        let dials = if cap.is_some() { 3 } else { 20 };
        never.wait_for(|s| s.accepted >= before + dials).await;
        assert!(
            wait_until(SETTLE, || c.connection_count_for(&peer) == 0).await,
            "never-answer (cap {cap:?}): {} slots still held",
            c.connection_count_for(&peer)
        );
        assert_eq!(c.idle_count(), 0);
        // The slots are usable again: this dials (and fails the same way) instead of waiting.
        let err = c.get(&peer).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TlsHandshakeTimedout, "{err}");
        assert_eq!(c.connection_count_for(&peer), 0);
        drop(c);
        // The server's half of each connection lives in this process too.
        never.close_connections();
        never.wait_for(|s| s.open == 0).await;
        assert_back_to(baseline, "gets dropped mid-dial (never answers)").await;
    }

    // 3. Gets dropped mid-handshake against a slow server: the dials finish in the
    //    background and are pooled; closing the connector closes them all.
    {
        let peer = tls_peer(slow);
        let c = connector(|_| {});
        let before = http.stats().accepted;
        // Concurrently, so that none of them finds another's finished dial in the pool.
        let gets: Vec<JoinHandle<bool>> = (0..10)
            .map(|_| {
                let (c, peer) = (c.clone(), peer.clone());
                tokio::spawn(async move {
                    tokio::time::timeout(Duration::from_millis(50), c.get(&peer))
                        .await
                        .is_err()
                })
            })
            .collect();
        for get in gets {
            assert!(get.await.unwrap(), "a get finished despite the slow server");
        }
        assert!(
            wait_until(SETTLE, || c.idle_count_for(&peer) == 10).await,
            "slow server: {} of 10 background dials pooled",
            c.idle_count_for(&peer)
        );
        assert_eq!(c.connection_count_for(&peer), 10);
        http.wait_for(|s| s.accepted == before + 10 && s.open == 10)
            .await;
        let mut conn = c.get(&peer).await.unwrap();
        assert!(conn.reused());
        exchange(&mut conn).await;
        c.release(conn);
        drop(c);
        http.wait_for(|s| s.open == 0).await;
        assert_back_to(baseline, "gets dropped mid-handshake (slow server)").await;
    }

    // 4. Failed dials: refused, and a TLS failure.
    {
        let c = connector(|o| o.max_connections_per_peer = Some(1));
        for _ in 0..10 {
            let err = c.get(&Peer::tcp(refused)).await.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ConnectRefused, "{err}");
            let err = c
                .get(&Peer::tls(http.addr(), "localhost").with_ca(TestPki::shared().ca_b()))
                .await
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidCert, "{err}");
        }
        assert_eq!(c.connection_count_for(&Peer::tcp(refused)), 0);
        drop(c);
        http.wait_for(|s| s.open == 0).await;
        assert_back_to(baseline, "failed dials").await;
    }

    slow_task.abort();
}
