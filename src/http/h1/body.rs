//! The HTTP/1.1 response body: decoded from the connection as it is polled, and the
//! connection released to the pool at a clean end.

use std::fmt;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};

use super::decode::{self, Decoder, Step};
use crate::connector::Connector;
use crate::error::{Error, ErrorKind};
use crate::stream::Connection;

/// Owns the connection until the body ends.
pub(crate) struct H1Body {
    /// `None` once released or closed.
    conn: Option<Connection>,
    /// Bytes read but not yet decoded.
    buf: BytesMut,
    decoder: Decoder,
    /// The exchange allows the connection to be reused once the body ends cleanly.
    keep_alive: bool,
    connector: Connector,
}

impl H1Body {
    pub(super) fn new(
        conn: Connection,
        buf: BytesMut,
        decoder: Decoder,
        keep_alive: bool,
        connector: Connector,
    ) -> H1Body {
        H1Body {
            conn: Some(conn),
            buf,
            decoder,
            keep_alive,
            connector,
        }
    }

    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let mut eof = false;
        loop {
            let step = match self.decoder.step(&mut self.buf, eof) {
                Ok(step) => step,
                Err(why) => {
                    return Poll::Ready(Some(Err(self.fail(ErrorKind::ProtocolError, why))))
                }
            };
            match step {
                Step::Data(data) => {
                    if self.decoder.is_done() {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Step::Trailers(trailers) => {
                    self.finish();
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Step::End => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Step::NeedMore => {}
            }
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match decode::poll_read_more(conn, &mut self.buf, cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => eof = true,
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    let why = format!("reading the response body: {e}");
                    return Poll::Ready(Some(Err(self.fail(ErrorKind::UpstreamIo, why))));
                }
            }
        }
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    pub(crate) fn size_hint(&self) -> SizeHint {
        match self.decoder {
            Decoder::Done => SizeHint::with_exact(0),
            Decoder::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }

    /// The body ended cleanly: pool the connection when the exchange allows it.
    fn finish(&mut self) {
        self.decoder = Decoder::Done;
        if let Some(conn) = self.conn.take() {
            // Bytes beyond the response belong to no request: never hand them on.
            if self.keep_alive && self.buf.is_empty() {
                self.connector.release(conn);
            }
        }
    }

    /// The body failed: close the connection, report the error.
    fn fail(&mut self, kind: ErrorKind, why: String) -> Error {
        self.decoder = Decoder::Done;
        let mut err = Error::new(kind, why);
        if let Some(conn) = self.conn.take() {
            err = err.with_peer(conn.inner.lease.peer_description());
        }
        err
    }
}

impl fmt::Debug for H1Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H1Body")
            .field("conn", &self.conn)
            .field("decoder", &self.decoder)
            .field("keep_alive", &self.keep_alive)
            .finish_non_exhaustive()
    }
}
