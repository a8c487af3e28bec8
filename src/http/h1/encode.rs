//! Writing an HTTP/1.1 request (RFC 9112): the head, then the body framed by
//! `content-length` or chunked, streamed frame by frame.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use http_body::Body;
use tokio::io::AsyncWriteExt;

use super::decode;
use crate::http::request::{Framing, Prepared};
use crate::stream::Connection;

/// Data frames up to this size are copied behind what is pending (the head, a chunk size
/// line) so that both go out in one TLS record; larger ones are written as they are.
const COALESCE_MAX: usize = 8 * 1024;

/// How writing a request ended.
pub(super) enum Written {
    /// All of it went out; any response bytes that arrived meanwhile (the start of the
    /// response, after interim ones were dropped).
    Complete(BytesMut),
    /// The server answered while the body was still coming (e.g. a 401 or 413 to an upload):
    /// the bytes of its response so far. The rest of the body is abandoned, so the
    /// connection cannot be reused.
    Early(BytesMut),
}

/// Why writing a request stopped.
pub(super) enum WriteError {
    /// The connection failed.
    Io(std::io::Error),
    /// The caller's body failed, or produced more or fewer bytes than its content-length.
    Body(String),
}

/// The request head, into `out`.
pub(super) fn head(req: &Prepared, out: &mut Vec<u8>) {
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.path.as_str().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(req.authority.as_str().as_bytes());
    out.extend_from_slice(b"\r\n");
    // Header values cannot hold CR or LF (`HeaderValue` refuses them), so nothing the caller
    // supplies can split the head.
    for (name, value) in &req.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match req.framing {
        Framing::Empty if req.announces_empty_body() => {
            out.extend_from_slice(b"content-length: 0\r\n")
        }
        Framing::Empty => {}
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    if req.close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes `pending` (the head) and then the body, as its frames arrive.
///
/// A frame that is ready at once goes out with what is pending; when the body makes us wait,
/// what is pending is written first, so the server is never kept from the head by a slow
/// body, and the connection is watched meanwhile: a server that answers before the body is
/// complete ends the upload ([`Written::Early`]). (A server that stops reading while we are
/// blocked writing is not detected until it closes the connection.)
pub(super) async fn write<B>(
    conn: &mut Connection,
    mut pending: Vec<u8>,
    framing: Framing,
    mut body: Option<Pin<Box<B>>>,
) -> Result<Written, WriteError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut sent: u64 = 0;
    // Response bytes read while waiting for the body (interim responses dropped).
    let mut early = BytesMut::new();
    if let (Some(body), true) = (body.as_mut(), framing != Framing::Empty) {
        loop {
            // The caller's error type need not be `Send`; convert it before any await.
            let mut next = |cx: &mut std::task::Context<'_>| {
                body.as_mut()
                    .poll_frame(cx)
                    .map(|f| f.map(|r| r.map_err(|e| e.into().to_string())))
            };
            let frame = match poll_fn(|cx| Poll::Ready(next(cx))).await {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    flush_pending(conn, &mut pending).await?;
                    let waited = poll_fn(|cx| loop {
                        if let Poll::Ready(frame) = next(cx) {
                            return Poll::Ready(Ok(Some(frame)));
                        }
                        match decode::poll_read_more(conn, &mut early, cx) {
                            Poll::Ready(Ok(0)) => {
                                return Poll::Ready(Err(WriteError::Io(std::io::Error::new(
                                    std::io::ErrorKind::UnexpectedEof,
                                    "the upstream closed the connection during the request body",
                                ))))
                            }
                            // A 100 Continue is no reason to stop sending the body.
                            Poll::Ready(Ok(_)) if !decode::skip_interim(&mut early) => continue,
                            Poll::Ready(Ok(_)) => return Poll::Ready(Ok(None)),
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(WriteError::Io(e))),
                            Poll::Pending => return Poll::Pending,
                        }
                    })
                    .await?;
                    match waited {
                        Some(frame) => frame,
                        None => return Ok(Written::Early(std::mem::take(&mut early))),
                    }
                }
            };
            let frame = match frame {
                None => break,
                Some(Ok(frame)) => frame,
                Some(Err(e)) => return Err(WriteError::Body(e)),
            };
            let frame = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    if let (Ok(trailers), Framing::Chunked) = (frame.into_trailers(), framing) {
                        // The last chunk carries the trailer section (RFC 9112 §7.1.2).
                        pending.extend_from_slice(b"0\r\n");
                        for (name, value) in &trailers {
                            pending.extend_from_slice(name.as_str().as_bytes());
                            pending.extend_from_slice(b": ");
                            pending.extend_from_slice(value.as_bytes());
                            pending.extend_from_slice(b"\r\n");
                        }
                        pending.extend_from_slice(b"\r\n");
                        conn.write_all(&pending).await.map_err(WriteError::Io)?;
                        conn.flush().await.map_err(WriteError::Io)?;
                        return Ok(Written::Complete(early));
                    }
                    // Trailers cannot follow a content-length body; HTTP/1.1 drops them.
                    continue;
                }
            };
            if frame.is_empty() {
                continue;
            }
            sent += frame.len() as u64;
            if let Framing::Length(n) = framing {
                if sent > n {
                    return Err(WriteError::Body(format!(
                        "the body is longer than its content-length {n}"
                    )));
                }
            }
            if framing == Framing::Chunked {
                pending.extend_from_slice(format!("{:X}\r\n", frame.len()).as_bytes());
            }
            if frame.len() <= COALESCE_MAX {
                pending.extend_from_slice(&frame);
            } else {
                flush_pending(conn, &mut pending).await?;
                conn.write_all(&frame).await.map_err(WriteError::Io)?;
            }
            if framing == Framing::Chunked {
                pending.extend_from_slice(b"\r\n");
            }
        }
    }
    match framing {
        Framing::Length(n) if sent != n => {
            return Err(WriteError::Body(format!(
                "the body ended after {sent} of its content-length {n} bytes"
            )))
        }
        Framing::Chunked => pending.extend_from_slice(b"0\r\n\r\n"),
        _ => {}
    }
    flush_pending(conn, &mut pending).await?;
    conn.flush().await.map_err(WriteError::Io)?;
    Ok(Written::Complete(early))
}

async fn flush_pending(conn: &mut Connection, pending: &mut Vec<u8>) -> Result<(), WriteError> {
    if !pending.is_empty() {
        conn.write_all(pending).await.map_err(WriteError::Io)?;
        pending.clear();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{Empty, Full};

    fn encoded<B: Body>(req: ::http::Request<B>) -> String {
        let peer = crate::peer::Peer::tls("127.0.0.1:1".parse().unwrap(), "backend.example");
        let (parts, body) = req.into_parts();
        let prepared = Prepared::new(parts, &body, &peer).unwrap();
        let mut out = Vec::new();
        head(&prepared, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn an_empty_get_has_no_body_headers() {
        let head = encoded(
            ::http::Request::get("/a?b")
                .header("x-one", "1")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        );
        assert_eq!(
            head,
            "GET /a?b HTTP/1.1\r\nhost: backend.example\r\nx-one: 1\r\n\r\n"
        );
    }

    #[test]
    fn bodies_are_framed_by_length_or_announced_empty() {
        let head = encoded(
            ::http::Request::post("/")
                .body(Full::new(Bytes::from_static(b"four")))
                .unwrap(),
        );
        assert!(head.ends_with("content-length: 4\r\n\r\n"), "{head}");
        let head = encoded(
            ::http::Request::put("/")
                .header("connection", "close")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        );
        assert!(
            head.ends_with("content-length: 0\r\nconnection: close\r\n\r\n"),
            "{head}"
        );
    }
}
