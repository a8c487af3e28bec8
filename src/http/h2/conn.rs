//! One HTTP/2 connection: the dial (pool connection, ALPN check, h2 handshake, the server's
//! SETTINGS learnt) and the driver that polls it for its whole life.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use h2::client::{Connection as H2Connection, SendRequest};
use h2::{Ping, PingPong};
use tokio::time::Instant;

use crate::connector::Connector;
use crate::error::{Error, ErrorKind, Result};
use crate::http::Offer;
use crate::metrics::PeerMetrics;
use crate::peer::Peer;
use crate::stream::{Connection, SslDigest};

/// Per-stream receive window. hyper's client uses 2 MiB (h2's default, 64 KiB, caps one
/// stream at 64 KiB per round trip); memory stays bounded because capacity is released only
/// as the caller reads.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
/// Connection receive window, shared by all its streams (hyper: 5 MiB).
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

/// What a dial produced.
pub(super) enum Dialled {
    H2(Box<Ready>),
    /// The server selected HTTP/1.1 (the offer allowed it): a fresh connection for the pool.
    H1(Connection),
    /// The key reached `max_connections_per_peer` since the dial was decided.
    AtCap,
}

/// A connection ready for streams, its limit known.
pub(super) struct Ready {
    pub(super) send: SendRequest<Bytes>,
    connection: H2Connection<Connection, Bytes>,
    ping: PingPong,
    /// The server's SETTINGS_MAX_CONCURRENT_STREAMS (`usize::MAX` when it set none).
    pub(super) server_limit: usize,
    pub(super) digest: Option<Arc<SslDigest>>,
    pub(super) pool_metrics: Arc<PeerMetrics>,
    /// The peer's idle timeout, else the connector's.
    pub(super) idle_timeout: Duration,
}

/// The connection-level timers, armed in [`run`].
pub(super) struct Timers {
    /// Close after this long without streams, as the pool closes idle connections: the
    /// server would close it soon anyway (nginx after `keepalive_timeout`).
    pub(super) idle: Duration,
    /// Keepalive PING period (`ConnectorOptions::h2_ping_interval`).
    pub(super) ping_interval: Option<Duration>,
    /// How long a keepalive PING may go unanswered before the connection is closed.
    pub(super) ping_timeout: Duration,
}

/// Dials a fresh pool connection and makes it an HTTP/2 connection whose stream limit is
/// known.
///
/// The server's SETTINGS is its first frame, but `h2`'s handshake returns before reading
/// anything (pingora#401 trusted the limit too early). So a PING goes out right after the
/// preface and the connection is driven until its answer arrives; by then the SETTINGS has
/// been read and applied (`h2` applies a SETTINGS before reading the next frame). One round
/// trip per new connection.
pub(super) async fn connect(connector: &Connector, peer: &Peer, offer: Offer) -> Result<Dialled> {
    let Some(conn) = connector.get_fresh(peer, false).await? else {
        return Ok(Dialled::AtCap);
    };
    let alpn = conn.digest().and_then(|d| d.alpn.clone());
    if alpn.as_deref() != Some(b"h2") {
        if offer == Offer::Either {
            return Ok(Dialled::H1(conn));
        }
        return Err(protocol_error(
            peer,
            format!(
                "the server did not select h2 with ALPN (selected {})",
                alpn.as_deref().map_or_else(
                    || "nothing".to_string(),
                    |a| String::from_utf8_lossy(a).into_owned()
                )
            ),
        ));
    }
    let digest = conn.digest_arc();
    let pool_metrics = Arc::clone(&conn.inner.lease.key_pool.metrics);
    let idle_timeout = conn.inner.lease.idle_timeout;
    let settings = peer.settings();
    let budget = settings
        .total_connection_timeout
        .unwrap_or(connector.options().total_connection_timeout);

    let (send, mut connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        // We never accept pushed streams.
        .enable_push(false)
        .handshake::<_, Bytes>(conn)
        .await
        .map_err(|e| protocol_error(peer, format!("HTTP/2 handshake failed: {e}")))?;
    let mut ping = connection
        .ping_pong()
        .ok_or_else(|| Error::internal("h2 gave no PingPong on a new connection"))?;
    ping.send_ping(Ping::opaque())
        .map_err(|e| protocol_error(peer, format!("cannot send the first PING: {e}")))?;
    let settled = tokio::time::timeout(
        budget,
        poll_fn(|cx| {
            if let Poll::Ready(result) = Pin::new(&mut connection).poll(cx) {
                return Poll::Ready(Err(match result {
                    Ok(()) => "the server closed the connection before its SETTINGS".to_string(),
                    Err(e) => format!("before its SETTINGS: {e}"),
                }));
            }
            ping.poll_pong(cx).map_err(|e| e.to_string()).map_ok(|_| ())
        }),
    )
    .await;
    match settled {
        Ok(Ok(())) => {}
        Ok(Err(why)) => return Err(protocol_error(peer, why)),
        Err(_) => {
            return Err(Error::new(
                ErrorKind::UpstreamIo,
                format!("no answer to the first HTTP/2 PING within {budget:?}"),
            )
            .with_peer(peer.describe())
            .with_transient())
        }
    }
    let server_limit = connection.max_concurrent_send_streams();
    if server_limit == 0 {
        // A connection that may carry no stream would only make the waiters dial again.
        return Err(Error::new(
            ErrorKind::UpstreamIo,
            "the server allows no streams (SETTINGS_MAX_CONCURRENT_STREAMS = 0)",
        )
        .with_peer(peer.describe())
        .with_transient());
    }
    Ok(Dialled::H2(Box::new(Ready {
        send,
        connection,
        ping,
        server_limit,
        digest,
        pool_metrics,
        idle_timeout,
    })))
}

/// `at + d`, saturating: a huge timeout (`Duration::MAX` from configuration) means a time
/// that never comes, not an overflow panic. 30 years is "never" for a timer.
pub(super) fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .unwrap_or_else(|| at + Duration::from_secs(30 * 365 * 24 * 3600))
}

fn protocol_error(peer: &Peer, why: String) -> Error {
    Error::new(ErrorKind::ProtocolError, why).with_peer(peer.describe())
}

/// Polls the connection until it ends: the server closed it (after GOAWAY once its streams
/// are done), it failed, a keepalive PING went unanswered, or `check_idle` closed it.
///
/// `check_idle(now, idle)` returns when to look again, or `None` to close now (the
/// connection has been idle for `idle` and was taken out of service). Returns whether the
/// server ended it with GOAWAY: a clean end while the registry still holds the handle that
/// opens streams can only be the server's GOAWAY (with the handle gone, `h2` ends it
/// itself, but then the key is gone too and nobody asks).
pub(super) async fn run(
    ready: Box<Ready>,
    timers: Timers,
    mut check_idle: impl FnMut(Instant, Duration) -> Option<Instant>,
) -> bool {
    let Ready {
        send,
        mut connection,
        mut ping,
        ..
    } = *ready;
    // The registry holds the handle new streams are opened with; this one would keep the
    // connection from ever finishing on its own.
    drop(send);
    let mut idle_at = later(Instant::now(), timers.idle);
    let mut next_ping = timers.ping_interval.map(|p| later(Instant::now(), p));
    let mut pong_due: Option<Instant> = None;
    loop {
        let wake = [Some(idle_at), next_ping, pong_due]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(idle_at);
        tokio::select! {
            result = &mut connection => {
                return match result {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::debug!(error = %e, "HTTP/2 connection ended with an error");
                        e.is_go_away() && e.is_remote()
                    }
                };
            }
            pong = poll_fn(|cx| ping.poll_pong(cx)), if pong_due.is_some() => {
                if pong.is_err() {
                    return false;
                }
                pong_due = None;
                next_ping = timers.ping_interval.map(|p| later(Instant::now(), p));
            }
            () = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                if pong_due.is_some_and(|due| now >= due) {
                    tracing::debug!("HTTP/2 keepalive PING unanswered; closing the connection");
                    return false;
                }
                if now >= idle_at {
                    match check_idle(now, timers.idle) {
                        Some(next) => idle_at = next,
                        None => return false,
                    }
                }
                if pong_due.is_none() && next_ping.is_some_and(|at| now >= at) {
                    if ping.send_ping(Ping::opaque()).is_err() {
                        return false;
                    }
                    next_ping = None;
                    pong_due = Some(later(now, timers.ping_timeout));
                }
            }
        }
    }
}
