//! HTTP/1.1 over a pooled [`Connection`]: one exchange at a time, the connection released by
//! the response body when the exchange allows keep-alive.

mod body;
pub(crate) mod decode;
mod encode;

use std::future::poll_fn;
use std::pin::Pin;

use ::http::{Response, StatusCode};
use bytes::Bytes;
use http_body::Body;

pub(crate) use self::body::H1Body;
use self::decode::{BodyLength, Decoder};
use self::encode::{WriteError, Written};
use super::request::{Framing, Prepared};
use super::{ResponseBody, UpstreamInfo};
use crate::connector::Connector;
use crate::error::{Error, ErrorKind, Result};
use crate::peer::Peer;
use crate::stream::Connection;

/// An exchange that failed, with what a retry needs to know.
struct Failed {
    error: Error,
    /// Failed on a pooled connection before any response byte: the upstream most likely
    /// closed it while idle and did not process the request.
    stale: bool,
}

/// Sends `req` on a pooled (or new) connection; retries once on a fresh connection when a
/// reused one turns out dead before answering and the request has no body.
pub(crate) async fn send<B>(
    connector: &Connector,
    peer: &Peer,
    req: Prepared,
    body: B,
) -> Result<Response<ResponseBody>>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = connector.get(peer).await?;
    if conn
        .digest()
        .is_some_and(|d| d.alpn.as_deref() == Some(b"h2"))
    {
        // An `Alpn::H2H1` key learnt HTTP/1.1, but its server selects `h2` now (its
        // configuration changed): speaking HTTP/1.1 here would be garbage to it.
        if let Ok(key) = peer.key() {
            connector.http_shared().forget_protocol(key);
        }
        return Err(super::error(
            ErrorKind::ProtocolError,
            peer,
            "the server selected h2 on a connection meant for HTTP/1.1; the protocol will be \
             learnt again",
        )
        .with_transient());
    }
    let replay = req.replayable().then(|| req.clone());
    let body = (!req.replayable()).then(|| Box::pin(body));
    let failed = match exchange(connector, conn, req, body, false).await {
        Ok(response) => return Ok(response),
        Err(failed) => failed,
    };
    match replay {
        Some(req) if failed.stale => {
            tracing::debug!(error = %failed.error, "retrying on a fresh connection");
            let conn = connector
                .get_fresh(peer, true)
                .await?
                .ok_or_else(|| Error::internal("a queued fresh dial returned no connection"))?;
            exchange::<B>(connector, conn, req, None, true)
                .await
                .map_err(|f| f.error)
        }
        _ => Err(failed.error),
    }
}

/// One request and response head on `conn`.
///
/// Cancel safe: dropping it drops (closes) the connection.
async fn exchange<B>(
    connector: &Connector,
    mut conn: Connection,
    req: Prepared,
    body: Option<Pin<Box<B>>>,
    retried: bool,
) -> std::result::Result<Response<ResponseBody>, Failed>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let reused = conn.reused();
    let mut head = Vec::with_capacity(256);
    encode::head(&req, &mut head);
    let framing = req.framing;
    // `buf`: response bytes read so far. Empty (unallocated) unless the server answered
    // while the body was coming; the first read allocates one TLS record's worth.
    let (mut buf, complete) = match encode::write(&mut conn, head, framing, body).await {
        Ok(Written::Complete(early)) => (early, true),
        Ok(Written::Early(early)) => (early, false),
        Err(e) => {
            return Err(match e {
                WriteError::Io(e) => io_failure(&conn, "sending the request", e, false),
                WriteError::Body(why) => Failed {
                    error: conn_error(&conn, ErrorKind::RequestBody, why),
                    stale: false,
                },
            })
        }
    };
    debug_assert!(framing == Framing::Empty || !req.replayable());

    let head = loop {
        match decode::parse_head(&mut buf) {
            Ok(Some(head)) if head.status == StatusCode::SWITCHING_PROTOCOLS => {
                return Err(Failed {
                    error: conn_error(
                        &conn,
                        ErrorKind::ProtocolError,
                        "the upstream switched protocols (101), which this layer does not support",
                    ),
                    stale: false,
                });
            }
            // Interim responses (100 Continue, 103 Early Hints) precede the final one.
            Ok(Some(head)) if head.status.is_informational() => continue,
            Ok(Some(head)) => break head,
            Ok(None) => {}
            Err(why) => {
                return Err(Failed {
                    error: conn_error(&conn, ErrorKind::ProtocolError, why),
                    stale: false,
                })
            }
        }
        let got_bytes = !buf.is_empty();
        match poll_fn(|cx| decode::poll_read_more(&mut conn, &mut buf, cx)).await {
            Ok(0) => {
                return Err(Failed {
                    error: conn_error(
                        &conn,
                        ErrorKind::UpstreamIo,
                        "the upstream closed the connection before a complete response head",
                    )
                    .with_reused(reused && !got_bytes),
                    stale: reused && !got_bytes,
                })
            }
            Ok(_) => {}
            Err(e) => return Err(io_failure(&conn, "reading the response", e, got_bytes)),
        }
    };

    let head_request = req.method == ::http::Method::HEAD;
    let (length, framing_reusable) = match decode::body_length(head_request, &head) {
        Ok(v) => v,
        Err(why) => {
            return Err(Failed {
                error: conn_error(&conn, ErrorKind::ProtocolError, why),
                stale: false,
            })
        }
    };
    // An abandoned request body leaves the connection mid-message: never reuse it.
    let keep_alive = complete
        && framing_reusable
        && head.version == ::http::Version::HTTP_11
        && !req.close
        && !super::request::connection_has(&head.headers, "close");

    let info = UpstreamInfo {
        reused,
        version: head.version,
        digest: conn.digest_arc(),
        retried,
    };
    let mut response = Response::new(ResponseBody::empty());
    *response.status_mut() = head.status;
    *response.version_mut() = head.version;
    *response.headers_mut() = head.headers;
    response.extensions_mut().insert(info);
    if length == BodyLength::None {
        // Nothing more belongs to this exchange; bytes already read would be a response
        // nobody asked for, so such a connection is closed instead.
        if keep_alive && buf.is_empty() {
            connector.release(conn);
        }
        return Ok(response);
    }
    *response.body_mut() = ResponseBody::h1(H1Body::new(
        conn,
        buf,
        Decoder::new(length),
        keep_alive,
        connector.clone(),
    ));
    Ok(response)
}

fn conn_error(conn: &Connection, kind: ErrorKind, context: impl Into<String>) -> Error {
    Error::new(kind, context).with_peer(conn.inner.lease.peer_description())
}

/// An I/O failure while sending or before the response head completed.
fn io_failure(conn: &Connection, stage: &str, e: std::io::Error, got_bytes: bool) -> Failed {
    // The connection marks errors on a pooled connection before any byte was read.
    let stale = !got_bytes && Error::from_io(&e).is_some_and(Error::reused);
    Failed {
        error: conn_error(conn, ErrorKind::UpstreamIo, format!("{stage}: {e}")).with_reused(stale),
        stale,
    }
}
