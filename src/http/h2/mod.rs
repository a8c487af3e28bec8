//! HTTP/2: requests as streams on shared connections (see `registry` for sharing, `conn`
//! for a connection's life).

mod conn;
pub(crate) mod registry;

use std::fmt;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::{Context, Poll};

use ::http::header::{HeaderValue, CONTENT_LENGTH};
use ::http::{Request, Response, Uri, Version};
use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

use self::registry::{Acquired, StreamLease};
use super::request::{Framing, Prepared};
use super::{ResponseBody, UpstreamInfo};
use crate::connector::Connector;
use crate::error::{Error, ErrorKind, Result};
use crate::key::PeerKey;
use crate::peer::Peer;

/// Attempts per request when the server refuses streams (GOAWAY, REFUSED_STREAM) or a
/// connection turns out closed before the stream went out. Each attempt avoids the
/// connection that refused, so more than a few means the upstream refuses everything.
const MAX_ATTEMPTS: usize = 4;

/// What [`send`] did.
pub(crate) enum Sent<B> {
    Response(Response<ResponseBody>),
    /// The server chose HTTP/1.1 for this key; nothing was sent.
    UseH1(Prepared, B),
}

/// Sends `req` as a stream on one of the key's connections.
pub(crate) async fn send<B>(
    connector: &Connector,
    peer: &Peer,
    key: &PeerKey,
    req: Prepared,
    body: B,
) -> Result<Sent<B>>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let offer = super::protocol_of(peer);
    let empty = req.replayable();
    let mut body = Some(body);
    let mut retried = false;
    let mut last_error = None;
    for _ in 0..MAX_ATTEMPTS {
        let mut lease = match registry::acquire(connector, peer, key, offer).await? {
            Acquired::Stream(lease) => lease,
            Acquired::UseH1 => match body.take() {
                Some(body) => return Ok(Sent::UseH1(req, body)),
                None => return Err(Error::internal("request body already sent")),
            },
        };
        let request = build_request(&req, peer)?;
        let (response, stream) = match lease.send.send_request(request, empty) {
            Ok(sent) => {
                lease.sent();
                sent
            }
            Err(e) if is_user_error(&e) => {
                lease.unsent();
                return Err(super::error(
                    ErrorKind::InvalidConfig,
                    peer,
                    format!("HTTP/2 refused the request: {e}"),
                ));
            }
            Err(e) => {
                // Not sent at all (GOAWAY arrived, or the connection is closing): safe to
                // send elsewhere whatever the body.
                lease.unsent();
                lease.mark_draining(e.is_go_away());
                tracing::debug!(error = %e, "HTTP/2 connection not usable; trying another");
                last_error = Some(e);
                retried = true;
                continue;
            }
        };
        let lease = Arc::new(lease);
        // Dropped with this future or the response body: tells the body pump to reset the
        // stream instead of streaming into a request nobody waits for.
        let mut alive: Option<oneshot::Sender<()>> = None;
        let mut body_failed: Option<BodyFailure> = None;
        if !empty {
            let Some(body) = body.take() else {
                return Err(Error::internal("request body already sent"));
            };
            let (tx, rx) = oneshot::channel();
            alive = Some(tx);
            let failure = BodyFailure::default();
            body_failed = Some(Arc::clone(&failure));
            tokio::spawn(pump(body, stream, Arc::clone(&lease), rx, failure));
        } else {
            drop(stream);
        }
        match response.await {
            Ok(response) => {
                let info = UpstreamInfo {
                    reused: lease.reused,
                    version: Version::HTTP_2,
                    digest: lease.digest.clone(),
                    retried,
                };
                let (mut parts, recv) = response.into_parts();
                parts.extensions.insert(info);
                parts.version = Version::HTTP_2;
                let body = if recv.is_end_stream() && alive.is_none() {
                    ResponseBody::empty()
                } else {
                    ResponseBody::h2(H2Body {
                        recv,
                        peer: lease.peer_description(),
                        lease: Some(lease),
                        data_done: false,
                        _alive: alive,
                        body_failed,
                    })
                };
                return Ok(Sent::Response(Response::from_parts(parts, body)));
            }
            Err(e) if refused(&e) => {
                if e.is_go_away() {
                    lease.mark_draining(true);
                }
                if !empty {
                    return Err(stream_error(peer, &e).with_transient());
                }
                tracing::debug!(error = %e, "HTTP/2 stream refused; retrying");
                last_error = Some(e);
                retried = true;
            }
            Err(e) => {
                return Err(match body_failed.as_ref().and_then(|f| f.get()) {
                    Some(why) => super::error(ErrorKind::RequestBody, peer, why.clone()),
                    None => stream_error(peer, &e),
                })
            }
        }
    }
    Err(super::error(
        ErrorKind::UpstreamIo,
        peer,
        format!(
            "the request was refused {MAX_ATTEMPTS} times (last: {})",
            last_error.map_or_else(String::new, |e| e.to_string())
        ),
    )
    .with_transient())
}

fn build_request(req: &Prepared, peer: &Peer) -> Result<Request<()>> {
    let uri = Uri::builder()
        .scheme(if peer.is_tls() { "https" } else { "http" })
        .authority(req.authority.clone())
        .path_and_query(req.path.clone())
        .build()
        .map_err(|e| super::error(ErrorKind::InvalidConfig, peer, format!("request URI: {e}")))?;
    let mut request = Request::new(());
    *request.method_mut() = req.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_2;
    *request.headers_mut() = req.headers.clone();
    match req.framing {
        Framing::Length(n) => {
            request
                .headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(n));
        }
        Framing::Empty if req.announces_empty_body() => {
            request
                .headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(0u64));
        }
        _ => {}
    }
    Ok(request)
}

/// The server did not process the stream: REFUSED_STREAM, or above GOAWAY's last stream id
/// (RFC 9113 §8.7), so it may be sent again.
fn refused(e: &h2::Error) -> bool {
    e.reason() == Some(Reason::REFUSED_STREAM) || (e.is_go_away() && e.is_remote())
}

/// `h2` rejected the request itself (a header HTTP/2 forbids): no I/O, no frame involved.
fn is_user_error(e: &h2::Error) -> bool {
    !e.is_io() && !e.is_go_away() && !e.is_reset() && !e.is_remote() && e.reason().is_none()
}

fn stream_error(peer: &Peer, e: &h2::Error) -> Error {
    let kind = match e.reason() {
        Some(
            Reason::PROTOCOL_ERROR
            | Reason::COMPRESSION_ERROR
            | Reason::FRAME_SIZE_ERROR
            | Reason::FLOW_CONTROL_ERROR,
        ) if !e.is_remote() => ErrorKind::ProtocolError,
        _ => ErrorKind::UpstreamIo,
    };
    super::error(kind, peer, format!("HTTP/2 stream failed: {e}"))
}

/// Why the request body failed, set by its pump before it resets the stream, so the error
/// the caller sees is `RequestBody` rather than the reset it caused.
type BodyFailure = Arc<std::sync::OnceLock<String>>;

/// Streams the request body into the h2 stream, respecting flow control: capacity is
/// reserved for each frame and data sent only as the server's window allows, so a slow
/// server slows the body's producer instead of filling memory.
async fn pump<B>(
    body: B,
    mut stream: SendStream<Bytes>,
    lease: Arc<StreamLease>,
    mut alive: oneshot::Receiver<()>,
    failure: BodyFailure,
) where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Holds the stream slot until the request side is done too.
    let _lease = lease;
    let mut body = std::pin::pin!(body);
    loop {
        // Stop waiting for the body when the server reset the stream or the caller left.
        let frame = tokio::select! {
            // The caller's error type need not be `Send`; convert it before any await.
            frame = poll_fn(|cx| body.as_mut().poll_frame(cx).map(|f| f.map(|r| r.map_err(Into::into)))) => frame,
            _ = poll_fn(|cx| stream.poll_reset(cx)) => return,
            _ = &mut alive => {
                stream.send_reset(Reason::CANCEL);
                return;
            }
        };
        let frame = match frame {
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(e)) => {
                let e: Box<dyn std::error::Error + Send + Sync> = e;
                tracing::debug!(error = %e, "request body failed; resetting the stream");
                let _ = failure.set(format!("the request body failed: {e}"));
                stream.send_reset(Reason::CANCEL);
                return;
            }
            Some(Ok(frame)) => frame,
        };
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = stream.send_trailers(trailers);
                    return;
                }
                continue;
            }
        };
        while !data.is_empty() {
            stream.reserve_capacity(data.len());
            let capacity = tokio::select! {
                c = poll_fn(|cx| stream.poll_capacity(cx)) => c,
                _ = &mut alive => {
                    stream.send_reset(Reason::CANCEL);
                    return;
                }
            };
            let n = match capacity {
                Some(Ok(n)) => n.min(data.len()),
                // The stream or connection is gone.
                _ => return,
            };
            if n == 0 {
                continue;
            }
            let chunk = data.split_to(n);
            let end = data.is_empty() && body.is_end_stream();
            if stream.send_data(chunk, end).is_err() || end {
                return;
            }
        }
    }
}

/// An HTTP/2 response body: data as it arrives, flow-control capacity released as it is
/// consumed, the stream slot freed at the end (or on drop, which resets the stream).
pub(crate) struct H2Body {
    recv: RecvStream,
    /// `None` once the body ended.
    lease: Option<Arc<StreamLease>>,
    data_done: bool,
    /// See `send`: dropping it cancels a request body still streaming.
    _alive: Option<oneshot::Sender<()>>,
    /// Set when the request body failed (and its pump reset the stream).
    body_failed: Option<BodyFailure>,
    /// For error messages.
    peer: Arc<str>,
}

impl H2Body {
    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Error>>> {
        if self.lease.is_none() {
            return Poll::Ready(None);
        }
        if !self.data_done {
            match self.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    // Consumed: let the server send that much more.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(self.fail(&e)))),
                Poll::Ready(None) => self.data_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        match self.recv.poll_trailers(cx) {
            Poll::Ready(Ok(trailers)) => {
                self.lease = None;
                Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(self.fail(&e)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn fail(&mut self, e: &h2::Error) -> Error {
        self.lease = None;
        if let Some(why) = self.body_failed.as_ref().and_then(|f| f.get()) {
            return Error::new(ErrorKind::RequestBody, why.clone()).with_peer(&*self.peer);
        }
        let kind = if e.is_io() || e.is_reset() || e.is_go_away() || e.is_remote() {
            ErrorKind::UpstreamIo
        } else {
            ErrorKind::ProtocolError
        };
        Error::new(kind, format!("HTTP/2 response body failed: {e}")).with_peer(&*self.peer)
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.lease.is_none()
    }

    pub(crate) fn size_hint(&self) -> SizeHint {
        if self.lease.is_none() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}

impl fmt::Debug for H2Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H2Body")
            .field("stream", &self.recv.stream_id())
            .field("ended", &self.lease.is_none())
            .finish()
    }
}
