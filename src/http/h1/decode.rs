//! Reading an HTTP/1.1 response (RFC 9112): the head with `httparse`, then the body by its
//! framing (none, content-length, chunked, or until the connection ends).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use ::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ::http::{StatusCode, Version};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

use crate::stream::Connection;

/// A response head larger than this is refused: no legitimate server needs more, and the
/// buffer must not grow without bound on a misbehaving one.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// Header fields accepted in a response head (or a trailer section).
pub(crate) const MAX_HEADERS: usize = 128;
/// A chunk-size line (with extensions) longer than this is refused.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Bytes asked of the connection per read: one TLS record's worth.
const READ_CHUNK: usize = 16 * 1024;

/// Reads more bytes from `conn` onto the end of `buf`; `Ok(0)` at the end of the stream.
pub(crate) fn poll_read_more(
    conn: &mut Connection,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    let len = buf.len();
    // Zero-filled rather than uninitialised: reading into spare capacity would need `unsafe`
    // (`set_len`), which this crate keeps to one file.
    buf.resize(len + READ_CHUNK, 0);
    let mut read = ReadBuf::new(&mut buf[len..]);
    let result = Pin::new(conn).poll_read(cx, &mut read);
    let n = read.filled().len();
    buf.truncate(len + n);
    match result {
        Poll::Ready(Ok(())) => Poll::Ready(Ok(n)),
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

/// A parsed response head.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: StatusCode,
    pub(crate) version: Version,
    pub(crate) headers: HeaderMap,
}

/// Parses a complete head off the front of `buf`; `Ok(None)` when more bytes are needed.
///
/// # Errors
/// A message for a malformed head, too many header fields, or a head over [`MAX_HEAD`].
pub(crate) fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, String> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    let parsed = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                return Err(format!("response head larger than {MAX_HEAD} bytes"));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(format!(
                "response head has more than {MAX_HEADERS} header fields"
            ))
        }
        Err(e) => return Err(format!("malformed response head: {e}")),
    };
    let status = response
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| "malformed response status".to_string())?;
    let version = match response.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let headers = header_map(response.headers)?;
    buf.advance(parsed);
    Ok(Some(Head {
        status,
        version,
        headers,
    }))
}

/// What the bytes at the front of `buf` are, without consuming a final response: drops
/// complete interim (1xx, not 101) heads and says whether a final response (or something
/// unparseable, left for [`parse_head`] to report) has begun arriving.
pub(crate) fn skip_interim(buf: &mut BytesMut) -> bool {
    loop {
        if buf.is_empty() {
            return false;
        }
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut fields);
        match response.parse(buf) {
            Ok(httparse::Status::Complete(n)) => match response.code {
                Some(code) if (100..200).contains(&code) && code != 101 => buf.advance(n),
                _ => return true,
            },
            // Too early to tell an interim head from a final one, unless it is too long.
            Ok(httparse::Status::Partial) => return buf.len() > MAX_HEAD,
            Err(_) => return true,
        }
    }
}

fn header_map(fields: &[httparse::Header<'_>]) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::with_capacity(fields.len());
    for field in fields {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| format!("invalid header name {:?}", field.name))?;
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|_| format!("invalid value for header {:?}", field.name))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyLength {
    None,
    Length(u64),
    Chunked,
    /// Until the server closes the connection (which is then not reusable).
    Eof,
}

/// The body framing of a response to a request with `method`, and whether the connection
/// stays usable afterwards as far as the framing is concerned (RFC 9112 §6.3).
pub(crate) fn body_length(head_request: bool, head: &Head) -> Result<(BodyLength, bool), String> {
    let status = head.status.as_u16();
    if head_request || status == 204 || status == 304 || (100..200).contains(&status) {
        return Ok((BodyLength::None, true));
    }
    if let Some(te) = head.headers.get(header::TRANSFER_ENCODING) {
        let chunked_last = te
            .as_bytes()
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        // With both framings, transfer-encoding wins and the connection must close
        // afterwards (§6.3 item 3): the message may be a smuggling attempt.
        let reusable = !head.headers.contains_key(header::CONTENT_LENGTH);
        return Ok(if chunked_last {
            (BodyLength::Chunked, reusable)
        } else {
            (BodyLength::Eof, false)
        });
    }
    let mut length = None;
    for value in head.headers.get_all(header::CONTENT_LENGTH) {
        // A list of identical values is allowed (§6.3 item 5); anything else is not.
        for part in value.as_bytes().split(|&b| b == b',') {
            let n = std::str::from_utf8(part.trim_ascii())
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| format!("invalid content-length {value:?}"))?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting content-length values".to_string());
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => (BodyLength::None, true),
        Some(n) => (BodyLength::Length(n), true),
        None => (BodyLength::Eof, false),
    })
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// The body decoder's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decoder {
    Length(u64),
    Chunked(Chunk),
    Eof,
    Done,
}

/// One step of decoding.
#[derive(Debug)]
pub(crate) enum Step {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body ended cleanly.
    End,
    /// More bytes are needed from the connection.
    NeedMore,
}

impl Decoder {
    pub(crate) fn new(length: BodyLength) -> Decoder {
        match length {
            BodyLength::None => Decoder::Done,
            BodyLength::Length(n) => Decoder::Length(n),
            BodyLength::Chunked => Decoder::Chunked(Chunk::Size),
            BodyLength::Eof => Decoder::Eof,
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        *self == Decoder::Done
    }

    /// Decodes what `buf` holds; `eof` says the connection has ended.
    ///
    /// # Errors
    /// A message for malformed chunk framing or a body cut short by the end of the stream.
    pub(crate) fn step(&mut self, buf: &mut BytesMut, eof: bool) -> Result<Step, String> {
        loop {
            match *self {
                Decoder::Done => return Ok(Step::End),
                Decoder::Eof => {
                    if !buf.is_empty() {
                        return Ok(Step::Data(buf.split().freeze()));
                    }
                    if eof {
                        *self = Decoder::Done;
                        return Ok(Step::End);
                    }
                    return Ok(Step::NeedMore);
                }
                Decoder::Length(remaining) => {
                    if buf.is_empty() {
                        if eof {
                            return Err(format!(
                                "the connection closed with {remaining} body bytes missing"
                            ));
                        }
                        return Ok(Step::NeedMore);
                    }
                    let n = (buf.len() as u64).min(remaining) as usize;
                    let left = remaining - n as u64;
                    *self = if left == 0 {
                        Decoder::Done
                    } else {
                        Decoder::Length(left)
                    };
                    return Ok(Step::Data(buf.split_to(n).freeze()));
                }
                Decoder::Chunked(Chunk::Size) => {
                    let Some(line_end) = find_crlf(buf) else {
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err("chunk size line too long".into());
                        }
                        return self.need_more(eof);
                    };
                    let line = &buf[..line_end];
                    let digits = line
                        .split(|&b| b == b';')
                        .next()
                        .unwrap_or_default()
                        .trim_ascii();
                    let size = std::str::from_utf8(digits)
                        .ok()
                        .filter(|s| !s.is_empty() && s.len() <= 16)
                        .and_then(|s| u64::from_str_radix(s, 16).ok())
                        .ok_or_else(|| "invalid chunk size".to_string())?;
                    buf.advance(line_end + 2);
                    *self = Decoder::Chunked(if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    });
                }
                Decoder::Chunked(Chunk::Data(remaining)) => {
                    if buf.is_empty() {
                        return self.need_more(eof);
                    }
                    let n = (buf.len() as u64).min(remaining) as usize;
                    let left = remaining - n as u64;
                    *self = Decoder::Chunked(if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    });
                    return Ok(Step::Data(buf.split_to(n).freeze()));
                }
                Decoder::Chunked(Chunk::DataEnd) => {
                    if buf.len() < 2 {
                        return self.need_more(eof);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err("chunk data not followed by CRLF".into());
                    }
                    buf.advance(2);
                    *self = Decoder::Chunked(Chunk::Size);
                }
                Decoder::Chunked(Chunk::Trailers) => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        *self = Decoder::Done;
                        return Ok(Step::End);
                    }
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((n, fields))) => {
                            let trailers = header_map(fields)?;
                            buf.advance(n);
                            *self = Decoder::Done;
                            return Ok(Step::Trailers(trailers));
                        }
                        Ok(httparse::Status::Partial) => {
                            if buf.len() > MAX_HEAD {
                                return Err("trailer section too large".into());
                            }
                            return self.need_more(eof);
                        }
                        Err(e) => return Err(format!("malformed trailer section: {e}")),
                    }
                }
            }
        }
    }

    fn need_more(&self, eof: bool) -> Result<Step, String> {
        if eof {
            Err("the connection closed in the middle of a chunked body".into())
        } else {
            Ok(Step::NeedMore)
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(
        length: BodyLength,
        wire: &[u8],
        split: usize,
    ) -> Result<(Vec<u8>, bool), String> {
        let mut decoder = Decoder::new(length);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut trailers = false;
        let mut fed = 0;
        loop {
            match decoder.step(&mut buf, fed >= wire.len())? {
                Step::Data(d) => out.extend_from_slice(&d),
                Step::Trailers(_) => trailers = true,
                Step::End => return Ok((out, trailers)),
                Step::NeedMore => {
                    let end = (fed + split).min(wire.len());
                    buf.extend_from_slice(&wire[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn chunked_any_split() {
        let wire = b"5;ext=1\r\nhello\r\nB\r\n, new world\r\n0\r\nx-t: 1\r\n\r\n";
        for split in 1..wire.len() {
            let (body, trailers) = decode_all(BodyLength::Chunked, wire, split).unwrap();
            assert_eq!(body, b"hello, new world");
            assert!(trailers);
        }
    }

    #[test]
    fn chunked_errors() {
        assert!(decode_all(BodyLength::Chunked, b"zz\r\n", 10).is_err());
        assert!(decode_all(BodyLength::Chunked, b"2\r\nabX\r\n", 10).is_err());
        assert!(decode_all(BodyLength::Chunked, b"5\r\nab", 10).is_err());
    }

    #[test]
    fn length_short_is_an_error() {
        assert!(decode_all(BodyLength::Length(5), b"abc", 10).is_err());
        assert_eq!(
            decode_all(BodyLength::Length(3), b"abc", 1).unwrap().0,
            b"abc"
        );
    }

    #[test]
    fn framing_rules() {
        let head = |h: &[(&str, &str)]| Head {
            status: StatusCode::OK,
            version: Version::HTTP_11,
            headers: h
                .iter()
                .map(|(k, v)| {
                    (
                        HeaderName::from_bytes(k.as_bytes()).unwrap(),
                        HeaderValue::from_str(v).unwrap(),
                    )
                })
                .collect(),
        };
        assert_eq!(
            body_length(false, &head(&[("content-length", "7")])).unwrap(),
            (BodyLength::Length(7), true)
        );
        assert_eq!(
            body_length(false, &head(&[("content-length", "7, 7")])).unwrap(),
            (BodyLength::Length(7), true)
        );
        assert!(body_length(false, &head(&[("content-length", "7, 8")])).is_err());
        assert!(body_length(false, &head(&[("content-length", "-1")])).is_err());
        assert_eq!(
            body_length(false, &head(&[("transfer-encoding", "gzip, chunked")])).unwrap(),
            (BodyLength::Chunked, true)
        );
        assert_eq!(
            body_length(
                false,
                &head(&[("transfer-encoding", "chunked"), ("content-length", "3")])
            )
            .unwrap(),
            (BodyLength::Chunked, false)
        );
        assert_eq!(
            body_length(false, &head(&[])).unwrap(),
            (BodyLength::Eof, false)
        );
        assert_eq!(
            body_length(true, &head(&[("content-length", "7")])).unwrap(),
            (BodyLength::None, true)
        );
    }

    #[test]
    fn interim_heads_are_skipped_final_ones_kept() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\n"[..]);
        assert!(!skip_interim(&mut buf));
        assert!(buf.is_empty());
        let mut buf = BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 413 Too"[..]);
        assert!(
            !skip_interim(&mut buf),
            "a partial head is not yet a final response"
        );
        buf.extend_from_slice(b" Large\r\ncontent-length: 0\r\n\r\n");
        assert!(skip_interim(&mut buf));
        assert_eq!(parse_head(&mut buf).unwrap().unwrap().status, 413);
        let mut buf = BytesMut::from(&b"HTTP/1.1 101 Switching\r\n\r\n"[..]);
        assert!(
            skip_interim(&mut buf),
            "101 is final for this layer (and refused)"
        );
        assert!(skip_interim(&mut BytesMut::from(&b"garbage\r\n"[..])));
    }

    #[test]
    fn head_limits() {
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(parse_head(&mut BytesMut::from(&many[..]))
            .unwrap_err()
            .contains("header fields"));
        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nx: "[..]);
        assert!(parse_head(&mut partial).unwrap().is_none());
        let mut huge = BytesMut::from(&b"HTTP/1.1 200 OK\r\nx: "[..]);
        huge.extend_from_slice(&vec![b'a'; MAX_HEAD + 1]);
        assert!(parse_head(&mut huge).is_err());
        assert!(parse_head(&mut BytesMut::from(&b"garbage\r\n\r\n"[..])).is_err());
    }
}
