//! A request checked and normalised once, before either protocol sends it: authority,
//! target, end-to-end headers and body framing.

use ::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ::http::request::Parts;
use ::http::uri::{Authority, PathAndQuery};
use ::http::Method;

use crate::error::{ErrorKind, Result};
use crate::peer::{Peer, PeerAddress};

/// How the request body is delimited on an HTTP/1.1 connection (HTTP/2 frames it itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body: the body's `is_end_stream()` said so, or its exact size is 0.
    Empty,
    /// `content-length`: the body's exact size hint, or the caller's header.
    Length(u64),
    /// `transfer-encoding: chunked`: size unknown.
    Chunked,
}

/// A request ready for either protocol. Cheap to clone (the header map is the only
/// allocation), which an empty-bodied request does to be sent again.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub(crate) method: Method,
    pub(crate) authority: Authority,
    pub(crate) path: PathAndQuery,
    /// End-to-end headers only: `host`, the connection-specific headers and the framing
    /// headers are removed (each protocol writes its own).
    pub(crate) headers: HeaderMap,
    pub(crate) framing: Framing,
    /// The caller sent `connection: close`: the HTTP/1.1 connection is not reused.
    pub(crate) close: bool,
}

/// Headers that belong to one HTTP/1.1 connection (RFC 9110 §7.6.1), forbidden in HTTP/2
/// (RFC 9113 §8.2.2). `te` is handled apart (only `trailers` may pass).
const CONNECTION_SPECIFIC: [&str; 5] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "upgrade",
    "transfer-encoding",
];

impl Prepared {
    pub(crate) fn new<B: http_body::Body>(parts: Parts, body: &B, peer: &Peer) -> Result<Prepared> {
        let invalid = |what: String| super::error(ErrorKind::InvalidConfig, peer, what);
        let Parts {
            method,
            uri,
            mut headers,
            ..
        } = parts;
        if method == Method::CONNECT {
            return Err(invalid(
                "CONNECT is not supported (it would turn the connection into a tunnel)".into(),
            ));
        }
        let authority = match uri.authority() {
            Some(a) => a.clone(),
            None => match headers.get(header::HOST) {
                Some(host) => Authority::try_from(host.as_bytes()).map_err(|e| {
                    invalid(format!("the host header {host:?} is not a valid authority: {e}"))
                })?,
                None => fallback_authority(peer)
                    .map_err(|e| invalid(format!("no authority in the request, and the peer's name is not usable as one: {e}")))?,
            },
        };
        if authority.as_str().is_empty() || authority.as_str().contains('@') {
            return Err(invalid(format!(
                "the authority {:?} is empty or carries user information",
                authority.as_str()
            )));
        }
        let path = match uri.path_and_query() {
            Some(pq) if !pq.as_str().is_empty() => pq.clone(),
            _ => PathAndQuery::from_static("/"),
        };

        let close = connection_has(&headers, "close");
        // Headers the caller listed in `connection` are hop-by-hop too.
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }

        let user_length = match headers.get(header::CONTENT_LENGTH) {
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| invalid(format!("content-length {v:?} is not a number")))?,
            ),
            None => None,
        };
        if headers.get_all(header::CONTENT_LENGTH).iter().count() > 1 {
            return Err(invalid("more than one content-length header".into()));
        }
        let user_chunked = match headers.get(header::TRANSFER_ENCODING) {
            None => false,
            Some(v) if v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") => true,
            Some(v) => {
                return Err(invalid(format!(
                    "transfer-encoding {v:?} is not supported (only chunked, which is chosen \
                     automatically)"
                )))
            }
        };
        if user_chunked && user_length.is_some() {
            return Err(invalid(
                "both content-length and transfer-encoding given (RFC 9112 §6.3)".into(),
            ));
        }
        let exact = if body.is_end_stream() {
            Some(0)
        } else {
            body.size_hint().exact()
        };
        let framing = match (exact, user_length) {
            (Some(n), Some(cl)) if n != cl => {
                return Err(invalid(format!(
                    "content-length {cl} contradicts the body's exact size {n}"
                )))
            }
            (Some(0), _) => Framing::Empty,
            (Some(n), _) => Framing::Length(n),
            (None, Some(cl)) => Framing::Length(cl),
            (None, None) => Framing::Chunked,
        };

        for name in CONNECTION_SPECIFIC {
            headers.remove(name);
        }
        headers.remove(header::HOST);
        headers.remove(header::CONTENT_LENGTH);
        if let Some(te) = headers.get(header::TE) {
            if !te.as_bytes().trim_ascii().eq_ignore_ascii_case(b"trailers") {
                headers.remove(header::TE);
            }
        }
        Ok(Prepared {
            method,
            authority,
            path,
            headers,
            framing,
            close,
        })
    }

    /// Whether the request can be sent again as is: it has no body to replay.
    pub(crate) fn replayable(&self) -> bool {
        self.framing == Framing::Empty
    }

    /// Whether an empty body is still announced with `content-length: 0`: for methods that
    /// define a meaning for content (RFC 9110 §8.6), so servers do not wait for a body.
    pub(crate) fn announces_empty_body(&self) -> bool {
        matches!(self.method, Method::POST | Method::PUT | Method::PATCH)
            || !matches!(
                self.method,
                Method::GET
                    | Method::HEAD
                    | Method::DELETE
                    | Method::OPTIONS
                    | Method::TRACE
                    | Method::CONNECT
            )
    }
}

fn fallback_authority(peer: &Peer) -> std::result::Result<Authority, ::http::uri::InvalidUri> {
    match peer.sni() {
        Some(sni) if !sni.is_empty() => Authority::try_from(sni),
        _ => match peer.address() {
            PeerAddress::Tcp(addr) => Authority::try_from(addr.to_string()),
            PeerAddress::Unix(_) => Ok(Authority::from_static("localhost")),
        },
    }
}

/// Whether a `connection` header lists `token`.
pub(crate) fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v: &HeaderValue| {
            v.as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use bytes::Bytes;
    use http_body_util::{Empty, Full};

    fn peer() -> Peer {
        Peer::tls("127.0.0.1:8443".parse().unwrap(), "backend.example")
    }

    fn prepare<B: http_body::Body>(req: ::http::Request<B>, peer: &Peer) -> Result<Prepared> {
        let (parts, body) = req.into_parts();
        Prepared::new(parts, &body, peer)
    }

    fn get(uri: &str) -> ::http::request::Builder {
        ::http::Request::get(uri)
    }

    #[test]
    fn authority_from_uri_then_host_then_sni_then_address() {
        let p = peer();
        let r = prepare(
            get("https://a.example:444/x?y")
                .header("host", "b.example")
                .body(Empty::<Bytes>::new())
                .unwrap(),
            &p,
        )
        .unwrap();
        assert_eq!(
            (r.authority.as_str(), r.path.as_str()),
            ("a.example:444", "/x?y")
        );
        let r = prepare(
            get("/x")
                .header("host", "b.example")
                .body(Empty::<Bytes>::new())
                .unwrap(),
            &p,
        )
        .unwrap();
        assert_eq!(r.authority.as_str(), "b.example");
        assert!(
            r.headers.get("host").is_none(),
            "host is written by each protocol"
        );
        let r = prepare(get("/x").body(Empty::<Bytes>::new()).unwrap(), &p).unwrap();
        assert_eq!(r.authority.as_str(), "backend.example");
        let plain = Peer::tcp("127.0.0.1:8080".parse().unwrap());
        let r = prepare(get("/x").body(Empty::<Bytes>::new()).unwrap(), &plain).unwrap();
        assert_eq!(r.authority.as_str(), "127.0.0.1:8080");
    }

    #[test]
    fn bad_requests_are_invalid_config() {
        let p = peer();
        for host in ["bad host", "[::1", "u@h"] {
            let err = prepare(
                get("/")
                    .header("host", host)
                    .body(Empty::<Bytes>::new())
                    .unwrap(),
                &p,
            )
            .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{host}: {err}");
            assert!(err.to_string().contains("backend.example"), "{err}");
        }
        let connect = ::http::Request::connect("a.example:443")
            .body(Empty::<Bytes>::new())
            .unwrap();
        assert_eq!(
            prepare(connect, &p).unwrap_err().kind(),
            ErrorKind::InvalidConfig
        );
        // A content-length that contradicts the body's exact size.
        let r = ::http::Request::post("/")
            .header("content-length", "3")
            .body(Full::new(Bytes::from_static(b"four")))
            .unwrap();
        assert_eq!(prepare(r, &p).unwrap_err().kind(), ErrorKind::InvalidConfig);
        let r = ::http::Request::post("/")
            .header("transfer-encoding", "gzip")
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        assert_eq!(prepare(r, &p).unwrap_err().kind(), ErrorKind::InvalidConfig);
        let r = ::http::Request::post("/")
            .header("content-length", "x")
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        assert_eq!(prepare(r, &p).unwrap_err().kind(), ErrorKind::InvalidConfig);
    }

    #[test]
    fn framing_follows_the_body() {
        let p = peer();
        let r = prepare(get("/").body(Empty::<Bytes>::new()).unwrap(), &p).unwrap();
        assert_eq!(r.framing, Framing::Empty);
        assert!(r.replayable());
        let r = prepare(
            ::http::Request::post("/")
                .body(Full::new(Bytes::from_static(b"four")))
                .unwrap(),
            &p,
        )
        .unwrap();
        assert_eq!(r.framing, Framing::Length(4));
        assert!(!r.replayable());
        let streaming = unknown_size::Body::default;
        let r = prepare(::http::Request::post("/").body(streaming()).unwrap(), &p).unwrap();
        assert_eq!(r.framing, Framing::Chunked);
        let r = prepare(
            ::http::Request::post("/")
                .header("content-length", "9")
                .body(streaming())
                .unwrap(),
            &p,
        )
        .unwrap();
        assert_eq!(r.framing, Framing::Length(9));
        assert!(r.headers.get("content-length").is_none());
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let p = peer();
        let r = prepare(
            get("/")
                .header("connection", "close, x-hop")
                .header("x-hop", "1")
                .header("keep-alive", "timeout=5")
                .header("upgrade", "websocket")
                .header("te", "gzip")
                .header("x-end", "2")
                .body(Empty::<Bytes>::new())
                .unwrap(),
            &p,
        )
        .unwrap();
        assert!(r.close);
        let names: Vec<&str> = r.headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-end"]);
        let r = prepare(
            get("/")
                .header("te", "trailers")
                .body(Empty::<Bytes>::new())
                .unwrap(),
            &p,
        )
        .unwrap();
        assert!(r.headers.contains_key("te"));
    }

    /// A body of unknown size (no exact size hint, not at its end before polled).
    mod unknown_size {
        use bytes::Bytes;
        use std::pin::Pin;
        use std::task::{Context, Poll};

        #[derive(Default)]
        pub(super) struct Body;

        impl http_body::Body for Body {
            type Data = Bytes;
            type Error = std::convert::Infallible;
            fn poll_frame(
                self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
                Poll::Ready(None)
            }
        }
    }
}
