//! [`ResponseBody`]: a response body streamed from the upstream, HTTP/1.1 or HTTP/2.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use super::h1::H1Body;
use super::h2::H2Body;
use crate::error::Error;

/// The body of a response from [`HttpConnector::send`](super::HttpConnector::send), read from
/// the upstream frame by frame as it is polled (never buffered whole).
///
/// It owns what the response travels on: an HTTP/1.1 connection, which it releases to the
/// pool when the body ends cleanly and the exchange allows keep-alive, or an HTTP/2 stream,
/// whose slot it frees at the end. Dropping it earlier closes the HTTP/1.1 connection or
/// resets the HTTP/2 stream; nothing leaks. Reading HTTP/2 data releases flow-control
/// capacity, so the server sends more only as fast as the body is consumed.
///
/// Errors are `UpstreamIo` (the connection or stream failed, or ended early) and
/// `ProtocolError` (malformed framing).
pub struct ResponseBody {
    kind: Kind,
}

enum Kind {
    Empty,
    H1(Box<H1Body>),
    H2(Box<H2Body>),
}

impl ResponseBody {
    pub(crate) fn empty() -> ResponseBody {
        ResponseBody { kind: Kind::Empty }
    }

    pub(crate) fn h1(body: H1Body) -> ResponseBody {
        ResponseBody {
            kind: Kind::H1(Box::new(body)),
        }
    }

    pub(crate) fn h2(body: H2Body) -> ResponseBody {
        ResponseBody {
            kind: Kind::H2(Box::new(body)),
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        match &mut self.get_mut().kind {
            Kind::Empty => Poll::Ready(None),
            Kind::H1(body) => body.poll_frame(cx),
            Kind::H2(body) => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::H1(body) => body.is_end_stream(),
            Kind::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::H1(body) => body.size_hint(),
            Kind::H2(body) => body.size_hint(),
        }
    }
}

impl fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Empty => f.write_str("ResponseBody::Empty"),
            Kind::H1(body) => fmt::Debug::fmt(body, f),
            Kind::H2(body) => fmt::Debug::fmt(body, f),
        }
    }
}
