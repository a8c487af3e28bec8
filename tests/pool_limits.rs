//! Pool caps and waiters: `max_connections_per_peer` (idle + in use + dialling) under 50
//! concurrent tasks, FIFO waiters, `PoolTimedout`, hand-off of released connections and freed
//! slots, waiters and dials that are dropped, and the idle caps `max_idle_per_peer` (oldest
//! goes) and `max_idle_total` (least recently used across peers goes).
//!
//! Counts are checked on the server side (connections accepted and open) as well as through
//! `connection_count_for`.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use upstream_pool::{Connection, Connector, ConnectorOptions, ErrorKind, Peer};

use support::certs::TestPki;
use support::client::http_get;
use support::server::{Behaviour, TestServer};

fn connector(configure: impl FnOnce(&mut ConnectorOptions)) -> Connector {
    let mut options = ConnectorOptions::default();
    configure(&mut options);
    Connector::new(options).unwrap()
}

fn capped(cap: usize, wait: Duration) -> Connector {
    connector(|o| {
        o.max_connections_per_peer = Some(cap);
        o.wait_timeout = wait;
    })
}

fn tls_peer(server: &TestServer) -> Peer {
    Peer::tls(server.addr(), "localhost").with_ca(TestPki::shared().ca_a())
}

/// One HTTP exchange on `conn`; returns the id of the server connection that answered.
async fn exchange(conn: &mut Connection) -> usize {
    let response = http_get(conn, "localhost").await.unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    response
        .conn_id()
        .expect("test server names its connection")
}

/// Lets spawned tasks run until they block (here: until they queue at the cap).
async fn settle() {
    tokio::time::sleep(Duration::from_millis(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_tasks_never_exceed_max_connections_per_peer() {
    const CAP: usize = 4;
    const TASKS: usize = 50;
    const ROUNDS: usize = 4;
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server);
    let c = capped(CAP, Duration::from_secs(30));

    // Sample the pool's own count from another task while the server's open count is
    // sampled from this one.
    let stop = Arc::new(AtomicBool::new(false));
    let sampled_count = Arc::new(AtomicUsize::new(0));
    let monitor = {
        let (c, peer) = (c.clone(), peer.clone());
        let (stop, sampled_count) = (stop.clone(), sampled_count.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                sampled_count.fetch_max(c.connection_count_for(&peer), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        })
    };

    let in_use = Arc::new(AtomicUsize::new(0));
    let most_in_use = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<JoinHandle<()>> = (0..TASKS)
        .map(|_| {
            let (c, peer) = (c.clone(), peer.clone());
            let (in_use, most_in_use) = (in_use.clone(), most_in_use.clone());
            tokio::spawn(async move {
                for _ in 0..ROUNDS {
                    let mut conn = c.get(&peer).await.unwrap();
                    let n = in_use.fetch_add(1, Ordering::SeqCst) + 1;
                    most_in_use.fetch_max(n, Ordering::SeqCst);
                    exchange(&mut conn).await;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    in_use.fetch_sub(1, Ordering::SeqCst);
                    c.release(conn);
                }
            })
        })
        .collect();
    let mut most_open = 0;
    let all = futures_join(tasks);
    tokio::pin!(all);
    loop {
        tokio::select! {
            () = &mut all => break,
            () = tokio::time::sleep(Duration::from_micros(500)) => {
                most_open = most_open.max(server.stats().open);
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    monitor.await.unwrap();

    let stats = server.stats();
    assert_eq!(stats.requests, TASKS * ROUNDS);
    // Exactly CAP: the first CAP gets dialled, the other tasks waited and got those.
    assert_eq!(
        stats.accepted, CAP,
        "server accepted {} connections",
        stats.accepted
    );
    assert!(most_open <= CAP, "server saw {most_open} open at once");
    assert!(most_in_use.load(Ordering::SeqCst) <= CAP);
    assert!(sampled_count.load(Ordering::SeqCst) <= CAP);
    assert_eq!(c.connection_count_for(&peer), stats.accepted);
    assert_eq!(c.idle_count_for(&peer), stats.accepted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cap_holds_when_tasks_drop_connections_instead_of_releasing() {
    const CAP: usize = 3;
    const TASKS: usize = 50;
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server);
    let c = capped(CAP, Duration::from_secs(30));
    let in_use = Arc::new(AtomicUsize::new(0));
    let most_in_use = Arc::new(AtomicUsize::new(0));
    let most_counted = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<JoinHandle<()>> = (0..TASKS)
        .map(|i| {
            let (c, peer) = (c.clone(), peer.clone());
            let (in_use, most_in_use, most_counted) =
                (in_use.clone(), most_in_use.clone(), most_counted.clone());
            tokio::spawn(async move {
                for round in 0..3 {
                    let mut conn = c.get(&peer).await.unwrap();
                    let n = in_use.fetch_add(1, Ordering::SeqCst) + 1;
                    most_in_use.fetch_max(n, Ordering::SeqCst);
                    most_counted.fetch_max(c.connection_count_for(&peer), Ordering::SeqCst);
                    exchange(&mut conn).await;
                    in_use.fetch_sub(1, Ordering::SeqCst);
                    if (i + round) % 2 == 0 {
                        drop(conn);
                    } else {
                        c.release(conn);
                    }
                }
            })
        })
        .collect();
    futures_join(tasks).await;
    assert!(most_in_use.load(Ordering::SeqCst) <= CAP);
    assert!(most_counted.load(Ordering::SeqCst) <= CAP);
    assert!(c.connection_count_for(&peer) <= CAP);
    assert_eq!(server.stats().requests, TASKS * 3);
}

/// Awaits every task, propagating panics.
async fn futures_join(tasks: Vec<JoinHandle<()>>) {
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn waiters_are_served_in_fifo_order() {
    const WAITERS: usize = 10;
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server);
    let c = capped(1, Duration::from_secs(10));
    let mut held = c.get(&peer).await.unwrap();
    let id = exchange(&mut held).await;

    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for i in 0..WAITERS {
        let (c, peer, order) = (c.clone(), peer.clone(), order.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = c.get(&peer).await.unwrap();
            order.lock().unwrap().push(i);
            assert!(
                conn.reused(),
                "waiter {i} did not get the released connection"
            );
            let got = exchange(&mut conn).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            c.release(conn);
            got
        }));
        // Waiter i is queued before waiter i + 1 starts.
        settle().await;
    }
    assert!(order.lock().unwrap().is_empty());
    assert_eq!(c.connection_count_for(&peer), 1);
    c.release(held);
    for task in tasks {
        assert_eq!(task.await.unwrap(), id);
    }
    assert_eq!(*order.lock().unwrap(), (0..WAITERS).collect::<Vec<_>>());
    assert_eq!(server.stats().accepted, 1);
}

#[tokio::test]
async fn a_released_connection_goes_straight_to_the_oldest_waiter() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server);
    let c = capped(1, Duration::from_secs(10));
    let mut held = c.get(&peer).await.unwrap();
    let id = exchange(&mut held).await;

    let waiter = {
        let (c, peer) = (c.clone(), peer.clone());
        tokio::spawn(async move {
            let mut conn = c.get(&peer).await.unwrap();
            assert!(conn.reused());
            let got = exchange(&mut conn).await;
            (got, conn)
        })
    };
    settle().await;
    c.release(held);
    // Handed over, not parked in the idle list where a newcomer could take it.
    assert_eq!(c.idle_count_for(&peer), 0);
    let newcomer = tokio::time::timeout(Duration::from_millis(100), c.get(&peer)).await;
    assert!(newcomer.is_err(), "a newcomer jumped the queue");
    let (got, conn) = waiter.await.unwrap();
    assert_eq!(got, id);
    c.release(conn);
    assert_eq!(c.idle_count_for(&peer), 1);
    assert_eq!(server.stats().accepted, 1);
}

#[tokio::test]
async fn a_waiter_that_times_out_gets_pool_timedout() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server);
    let wait = Duration::from_millis(200);
    let c = capped(1, wait);
    let mut held = c.get(&peer).await.unwrap();
    let id = exchange(&mut held).await;

    let start = Instant::now();
    let err = c.get(&peer).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PoolTimedout, "{err}");
    assert!(
        start.elapsed() >= wait,
        "gave up after {:?}",
        start.elapsed()
    );
    assert_eq!(
        server.stats().accepted,
        1,
        "the waiter dialled past the cap"
    );

    // The timed-out waiter must not swallow the next released connection.
    c.release(held);
    assert_eq!(c.idle_count_for(&peer), 1);
    let mut conn = c.get(&peer).await.unwrap();
    assert!(conn.reused());
    assert_eq!(exchange(&mut conn).await, id);
    assert_eq!(c.connection_count_for(&peer), 1);
}

#[tokio::test]
async fn the_cap_counts_idle_in_use_and_dialling_connections() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server);
    let c = capped(2, Duration::from_millis(100));
    let a = c.get(&peer).await.unwrap();
    let b = c.get(&peer).await.unwrap();
    c.release(a);
    // One idle + one in use = 2: the idle one is handed out, nothing new is dialled.
    let a = c.get(&peer).await.unwrap();
    assert!(a.reused());
    let err = c.get(&peer).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PoolTimedout);
    assert_eq!(server.stats().accepted, 2);
    drop((a, b));
    assert_eq!(c.connection_count_for(&peer), 0);

    // A dial in progress holds its slot.
    let slow = TestServer::start(Behaviour::NeverAnswer);
    let slow_peer = tls_peer(&slow).with_total_connection_timeout(Duration::from_secs(1));
    let c = capped(1, Duration::from_millis(100));
    let dial = {
        let (c, slow_peer) = (c.clone(), slow_peer.clone());
        tokio::spawn(async move { c.get(&slow_peer).await.map(drop) })
    };
    slow.wait_for(|s| s.accepted == 1).await;
    assert_eq!(c.connection_count_for(&slow_peer), 1);
    let err = c.get(&slow_peer).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PoolTimedout, "{err}");
    assert_eq!(slow.stats().accepted, 1);
    let err = dial.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TlsHandshakeTimedout);
    assert_eq!(c.connection_count_for(&slow_peer), 0);
}

#[tokio::test]
async fn dropped_waiters_leak_no_slot_and_do_not_swallow_connections() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server);
    let c = capped(1, Duration::from_secs(10));
    let mut held = c.get(&peer).await.unwrap();
    let id = exchange(&mut held).await;

    // Waiters cancelled two ways: aborted tasks and timed-out futures.
    let aborted: Vec<JoinHandle<()>> = (0..5)
        .map(|_| {
            let (c, peer) = (c.clone(), peer.clone());
            tokio::spawn(async move {
                let _ = c.get(&peer).await;
            })
        })
        .collect();
    settle().await;
    for task in &aborted {
        task.abort();
    }
    for _ in 0..5 {
        assert!(
            tokio::time::timeout(Duration::from_millis(10), c.get(&peer))
                .await
                .is_err()
        );
    }
    for task in aborted {
        assert!(task.await.unwrap_err().is_cancelled());
    }
    assert_eq!(c.connection_count_for(&peer), 1);

    // Released past the dead waiters into the idle list.
    c.release(held);
    assert_eq!(c.idle_count_for(&peer), 1);
    let mut conn = c.get(&peer).await.unwrap();
    assert!(conn.reused());
    assert_eq!(exchange(&mut conn).await, id);

    // Same with the connection dropped: its slot is free, not given to a dead waiter.
    let waiter = {
        let (c, peer) = (c.clone(), peer.clone());
        tokio::spawn(async move {
            let _ = c.get(&peer).await;
        })
    };
    settle().await;
    waiter.abort();
    let _ = waiter.await;
    drop(conn);
    assert_eq!(c.connection_count_for(&peer), 0);
    let conn = tokio::time::timeout(Duration::from_secs(5), c.get(&peer))
        .await
        .expect("the freed slot was lost")
        .unwrap();
    assert!(!conn.reused());
    assert_eq!(server.stats().accepted, 2);
}

#[tokio::test]
async fn a_dropped_connection_hands_its_slot_to_the_oldest_waiter() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server);
    let c = capped(1, Duration::from_secs(10));
    let held = c.get(&peer).await.unwrap();
    let waiter = {
        let (c, peer) = (c.clone(), peer.clone());
        tokio::spawn(async move {
            let mut conn = c.get(&peer).await.unwrap();
            (conn.reused(), exchange(&mut conn).await)
        })
    };
    settle().await;
    drop(held);
    let (reused, id) = waiter.await.unwrap();
    assert!(
        !reused,
        "the waiter should have dialled with the freed slot"
    );
    assert_eq!(id, 1);
    assert_eq!(server.stats().accepted, 2);
}

#[tokio::test]
async fn an_unusable_released_connection_frees_its_slot_for_a_waiter() {
    let server = TestServer::start(Behaviour::HttpThenStray);
    let peer = tls_peer(&server);
    let c = capped(1, Duration::from_secs(10));
    let mut held = c.get(&peer).await.unwrap();
    exchange(&mut held).await;
    let waiter = {
        let (c, peer) = (c.clone(), peer.clone());
        tokio::spawn(async move {
            let mut conn = c.get(&peer).await.unwrap();
            (conn.reused(), exchange(&mut conn).await)
        })
    };
    settle().await; // also lets the stray bytes arrive
    c.release(held);
    let (reused, id) = waiter.await.unwrap();
    assert!(!reused, "the waiter got the connection with stray bytes");
    assert_eq!(id, 1);
    assert_eq!(server.stats().accepted, 2);
}

#[tokio::test]
async fn a_failed_dial_hands_its_slot_to_the_next_waiter() {
    let server = TestServer::start(Behaviour::NeverAnswer);
    let peer = tls_peer(&server).with_total_connection_timeout(Duration::from_millis(300));
    let c = capped(1, Duration::from_secs(10));
    let first = {
        let (c, peer) = (c.clone(), peer.clone());
        tokio::spawn(async move { c.get(&peer).await.map(drop) })
    };
    server.wait_for(|s| s.accepted == 1).await;
    let second = c.get(&peer).await.unwrap_err();
    assert_eq!(second.kind(), ErrorKind::TlsHandshakeTimedout, "{second}");
    let first = first.await.unwrap().unwrap_err();
    assert_eq!(first.kind(), ErrorKind::TlsHandshakeTimedout, "{first}");
    assert_eq!(server.stats().accepted, 2);
    assert_eq!(c.connection_count_for(&peer), 0);
}

/// A TCP relay that holds each accepted connection for `delay` before connecting it to
/// `upstream`, so a handshake through it is slow.
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

#[tokio::test]
async fn a_cancelled_dial_that_completes_goes_to_the_waiter() {
    let server = TestServer::start(Behaviour::Http);
    let (proxy, proxy_task) = delay_proxy(server.addr(), Duration::from_millis(300)).await;
    let peer = Peer::tls(proxy, "localhost").with_ca(TestPki::shared().ca_a());
    let c = capped(1, Duration::from_secs(10));
    assert!(
        tokio::time::timeout(Duration::from_millis(50), c.get(&peer))
            .await
            .is_err()
    );
    let mut conn = c.get(&peer).await.unwrap();
    assert!(
        conn.reused(),
        "the waiter dialled instead of taking the finished dial"
    );
    assert_eq!(exchange(&mut conn).await, 0);
    assert_eq!(server.stats().accepted, 1);
    proxy_task.abort();
}

#[tokio::test]
async fn max_idle_per_peer_closes_the_oldest() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server);
    let c = connector(|o| o.max_idle_per_peer = 2);
    let mut conns = Vec::new();
    for _ in 0..3 {
        let mut conn = c.get(&peer).await.unwrap();
        conns.push((exchange(&mut conn).await, conn));
    }
    let ids: Vec<usize> = conns.iter().map(|(id, _)| *id).collect();
    for (_, conn) in conns {
        c.release(conn);
    }
    assert_eq!(c.idle_count_for(&peer), 2);
    assert_eq!(c.connection_count_for(&peer), 2);
    server.wait_for(|s| s.conns[ids[0]].closed).await;
    let stats = server.stats();
    assert!(!stats.conns[ids[1]].closed && !stats.conns[ids[2]].closed);

    let mut newest = c.get(&peer).await.unwrap();
    assert_eq!(exchange(&mut newest).await, ids[2]);
    let mut older = c.get(&peer).await.unwrap();
    assert_eq!(exchange(&mut older).await, ids[1]);
    assert_eq!(server.stats().accepted, 3);
}

#[tokio::test]
async fn max_idle_total_closes_the_least_recently_used_across_peers() {
    let servers: Vec<TestServer> = (0..3).map(|_| TestServer::start(Behaviour::Http)).collect();
    let peers: Vec<Peer> = servers.iter().map(tls_peer).collect();
    let c = connector(|o| o.max_idle_total = 2);
    let mut conns = Vec::new();
    for peer in &peers {
        let mut conn = c.get(peer).await.unwrap();
        exchange(&mut conn).await;
        conns.push(conn);
    }
    let conn_c = conns.pop().unwrap();
    let conn_b = conns.pop().unwrap();
    let conn_a = conns.pop().unwrap();
    // A was dialled first, but B is the least recently used once A is used again.
    c.release(conn_a);
    tokio::time::sleep(Duration::from_millis(5)).await;
    c.release(conn_b);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut conn_a = c.get(&peers[0]).await.unwrap();
    assert!(conn_a.reused());
    exchange(&mut conn_a).await;
    c.release(conn_a);
    tokio::time::sleep(Duration::from_millis(5)).await;
    c.release(conn_c);

    assert_eq!(c.idle_count(), 2);
    assert_eq!(c.idle_count_for(&peers[0]), 1);
    assert_eq!(
        c.idle_count_for(&peers[1]),
        0,
        "not the least recently used one"
    );
    assert_eq!(c.idle_count_for(&peers[2]), 1);
    servers[1].wait_for(|s| s.conns[0].closed).await;
    assert!(!servers[0].stats().conns[0].closed);
    assert!(!servers[2].stats().conns[0].closed);
}

/// Beyond 16 keys holding idle connections the global eviction samples keys instead of
/// looking at all of them; concurrent releases must still evict exactly the excess: never
/// below the cap (the server sees exactly the excess closed) and within it at rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_idle_total_at_many_keys_evicts_exactly_the_excess_under_concurrent_releases() {
    const KEYS: usize = 60;
    const CAP: usize = 10;
    let server = TestServer::start(Behaviour::Http);
    let peers: Vec<Peer> = (0..KEYS)
        .map(|i| tls_peer(&server).with_group(format!("tenant-{i}")))
        .collect();
    let c = connector(|o| o.max_idle_total = CAP);
    let mut conns = Vec::new();
    for peer in &peers {
        let mut conn = c.get(peer).await.unwrap();
        exchange(&mut conn).await;
        conns.push(conn);
    }
    // All released at once from four worker threads.
    let start = Arc::new(tokio::sync::Barrier::new(KEYS));
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|conn| {
            let (c, start) = (c.clone(), Arc::clone(&start));
            tokio::spawn(async move {
                start.wait().await;
                c.release(conn);
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(c.idle_count(), CAP);
    let per_key: usize = peers.iter().map(|p| c.idle_count_for(p)).sum();
    assert_eq!(per_key, CAP, "the idle total matches the idle lists");
    let stats = server
        .wait_for(|s| s.conns.iter().filter(|c| c.closed).count() >= KEYS - CAP)
        .await;
    assert_eq!(stats.accepted, KEYS);
    // Give a late, wrong eviction time to show.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let closed = server.stats().conns.iter().filter(|c| c.closed).count();
    assert_eq!(closed, KEYS - CAP, "exactly the excess was closed");
    // The survivors are usable, and reused (no new dial).
    for peer in &peers {
        if c.idle_count_for(peer) == 1 {
            let mut conn = c.get(peer).await.unwrap();
            assert!(conn.reused());
            exchange(&mut conn).await;
            c.release(conn);
        }
    }
    assert_eq!(server.stats().accepted, KEYS);
    assert_eq!(c.idle_count(), CAP);
}

#[tokio::test]
async fn max_idle_total_applies_within_one_peer_too() {
    let server = TestServer::start(Behaviour::Http);
    let peer = tls_peer(&server);
    let c = connector(|o| o.max_idle_total = 1);
    let mut a = c.get(&peer).await.unwrap();
    let mut b = c.get(&peer).await.unwrap();
    let (ida, idb) = (exchange(&mut a).await, exchange(&mut b).await);
    c.release(a);
    c.release(b);
    assert_eq!(c.idle_count(), 1);
    server.wait_for(|s| s.conns[ida].closed).await;
    let mut conn = c.get(&peer).await.unwrap();
    assert_eq!(exchange(&mut conn).await, idb);
}

#[test]
fn invalid_caps_are_rejected() {
    let mut o = ConnectorOptions::default();
    o.max_connections_per_peer = Some(0);
    assert_eq!(
        Connector::new(o).unwrap_err().kind(),
        ErrorKind::InvalidConfig
    );
    let mut o = ConnectorOptions::default();
    o.max_uses = Some(0);
    assert_eq!(
        Connector::new(o).unwrap_err().kind(),
        ErrorKind::InvalidConfig
    );
}
