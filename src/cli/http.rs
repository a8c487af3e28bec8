//! Just enough HTTP/1.1 framing for `bench`: write a `GET /`, read one response to its exact
//! end (so the connection can go back to the pool in sync).
//!
//! Bodies are counted and discarded, never stored: a large static file must not grow the
//! buffer. The parser is strict about framing (a byte left over after a response means the
//! stream is out of sync and the connection must not be reused) and lenient about
//! everything else.

use std::fmt;
use std::io;
use std::ops::Range;

use tokio::io::{AsyncRead, AsyncReadExt};

/// Upper bound on a response or request head; a server sending more is broken for our purpose.
const MAX_HEAD: usize = 64 * 1024;

/// Upper bound on one chunk-size or trailer line.
const MAX_LINE: usize = 8 * 1024;

/// How much spare room to make before each read.
const READ_CHUNK: usize = 16 * 1024;

/// The request `bench` sends, once per exchange.
pub(crate) fn get_request(host: &str) -> Vec<u8> {
    format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: upstream-pool-bench\r\nAccept: */*\r\n\r\n"
    )
    .into_bytes()
}

/// What `bench` needs to know about a response once it has been read completely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Response {
    /// The final status code (interim 1xx responses are skipped).
    pub(crate) status: u16,
    /// Whether the connection may carry another request: HTTP/1.1 without `Connection:
    /// close`, or HTTP/1.0 with `Connection: keep-alive`, and a body not delimited by EOF.
    pub(crate) keep_alive: bool,
}

/// Why an exchange failed.
#[derive(Debug)]
pub(crate) enum HttpError {
    /// The transport failed (including TLS errors surfaced as I/O errors).
    Io(io::Error),
    /// The peer closed the connection before a complete message arrived.
    Closed,
    /// The bytes do not frame as HTTP/1.x.
    Malformed(String),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Io(e) => write!(f, "i/o error: {e}"),
            HttpError::Closed => f.write_str("connection closed before a complete message"),
            HttpError::Malformed(why) => write!(f, "malformed HTTP: {why}"),
        }
    }
}

impl From<io::Error> for HttpError {
    fn from(e: io::Error) -> Self {
        HttpError::Io(e)
    }
}

/// Reads one complete response (skipping interim 1xx ones) from `reader`.
///
/// `buf` is scratch space kept by the caller between calls so that its allocation is reused.
///
/// # Errors
/// [`HttpError::Malformed`] also when bytes follow the response: the stream is then out of
/// sync and must not be reused.
///
/// # Cancel safety
/// Not cancel safe: a cancelled read leaves the stream mid-response; drop the connection.
pub(crate) async fn read_response<R>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Response, HttpError>
where
    R: AsyncRead + Unpin,
{
    buf.clear();
    let mut wire = Wire {
        reader,
        buf,
        pos: 0,
    };
    loop {
        let head = wire.until(b"\r\n\r\n", MAX_HEAD).await?;
        let head = parse_head(&wire.buf[head])?;
        let status = head.status;
        // 101 would switch protocols; we never ask for it, so treat it as final.
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let keep_alive = head.keep_alive;
        let delimited_by_eof = match head.body(status) {
            Body::None => false,
            Body::Length(n) => {
                wire.skip(n).await?;
                false
            }
            Body::Chunked => {
                wire.skip_chunked().await?;
                false
            }
            Body::UntilEof => {
                wire.skip_to_eof().await?;
                true
            }
        };
        if wire.pos < wire.buf.len() {
            return Err(HttpError::Malformed(format!(
                "{} unexpected bytes after the response",
                wire.buf.len() - wire.pos
            )));
        }
        return Ok(Response {
            status,
            keep_alive: keep_alive && !delimited_by_eof,
        });
    }
}

/// A read position over a growing buffer: `buf[pos..]` are bytes received and not consumed.
struct Wire<'a, R> {
    reader: &'a mut R,
    buf: &'a mut Vec<u8>,
    pos: usize,
}

impl<R: AsyncRead + Unpin> Wire<'_, R> {
    /// Reads more bytes; returns how many (0 at EOF). Drops consumed bytes first so that the
    /// buffer stays the size of one message head.
    async fn fill(&mut self) -> Result<usize, HttpError> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.reserve(READ_CHUNK);
        Ok(self.reader.read_buf(self.buf).await?)
    }

    /// Consumes up to and including `delim`; returns the range of the bytes before it.
    async fn until(&mut self, delim: &[u8], max: usize) -> Result<Range<usize>, HttpError> {
        let mut searched = 0;
        loop {
            let window = &self.buf[self.pos + searched..];
            if let Some(at) = find(window, delim) {
                let start = self.pos;
                let end = start + searched + at;
                self.pos = end + delim.len();
                return Ok(start..end);
            }
            let pending = self.buf.len() - self.pos;
            if pending > max {
                return Err(HttpError::Malformed(format!(
                    "no {delim:?} within {max} bytes"
                )));
            }
            // Resume the search where a delimiter could still start.
            searched = pending.saturating_sub(delim.len() - 1);
            if self.fill().await? == 0 {
                return Err(HttpError::Closed);
            }
        }
    }

    /// Consumes exactly `n` bytes.
    async fn skip(&mut self, mut n: u64) -> Result<(), HttpError> {
        loop {
            let pending = (self.buf.len() - self.pos) as u64;
            if pending >= n {
                self.pos += n as usize;
                return Ok(());
            }
            n -= pending;
            self.pos = self.buf.len();
            if self.fill().await? == 0 {
                return Err(HttpError::Closed);
            }
        }
    }

    /// Consumes a chunked body including its trailers.
    async fn skip_chunked(&mut self) -> Result<(), HttpError> {
        loop {
            let line = self.until(b"\r\n", MAX_LINE).await?;
            let size = parse_chunk_size(&self.buf[line])?;
            if size == 0 {
                // Trailer fields, then an empty line.
                while !self.until(b"\r\n", MAX_LINE).await?.is_empty() {}
                return Ok(());
            }
            self.skip(size).await?;
            let crlf = self.until(b"\r\n", 0).await?;
            if !crlf.is_empty() {
                return Err(HttpError::Malformed(
                    "chunk data longer than its size".into(),
                ));
            }
        }
    }

    /// Consumes everything until the peer closes.
    async fn skip_to_eof(&mut self) -> Result<(), HttpError> {
        self.pos = self.buf.len();
        while self.fill().await? > 0 {
            self.pos = self.buf.len();
        }
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_chunk_size(line: &[u8]) -> Result<u64, HttpError> {
    let bad = || {
        HttpError::Malformed(format!(
            "bad chunk size line {:?}",
            String::from_utf8_lossy(line)
        ))
    };
    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
    let digits = std::str::from_utf8(digits).map_err(|_| bad())?.trim();
    u64::from_str_radix(digits, 16).map_err(|_| bad())
}

/// How a message body is delimited (RFC 9112 section 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    None,
    Length(u64),
    Chunked,
    UntilEof,
}

#[derive(Debug)]
struct Head {
    /// Status code.
    status: u16,
    keep_alive: bool,
    content_length: Option<u64>,
    chunked: bool,
}

impl Head {
    fn body(&self, status: u16) -> Body {
        if (100..200).contains(&status) || status == 204 || status == 304 {
            return Body::None;
        }
        if self.chunked {
            return Body::Chunked;
        }
        match self.content_length {
            Some(n) => Body::Length(n),
            // A response without framing headers reads to EOF.
            None => Body::UntilEof,
        }
    }
}

fn parse_head(head: &[u8]) -> Result<Head, HttpError> {
    let text = std::str::from_utf8(head)
        .map_err(|_| HttpError::Malformed("message head is not UTF-8".into()))?;
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let mut parts = first.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..1000).contains(s))
        .ok_or_else(|| HttpError::Malformed(format!("bad status line {first:?}")))?;
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(HttpError::Malformed(format!("not HTTP/1.x: {first:?}"))),
    };
    let mut head = Head {
        status,
        keep_alive: http11,
        content_length: None,
        chunked: false,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpError::Malformed(format!("bad header line {line:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse()
                .map_err(|_| HttpError::Malformed(format!("bad Content-Length {value:?}")))?;
            if head.content_length.is_some_and(|m| m != n) {
                return Err(HttpError::Malformed("conflicting Content-Length".into()));
            }
            head.content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    head.keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") && http11 {
                    // Already the default for 1.1.
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    head.keep_alive = true;
                }
            }
        }
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn response(bytes: &[u8]) -> Result<Response, HttpError> {
        let mut reader = bytes;
        read_response(&mut reader, &mut Vec::new()).await
    }

    #[tokio::test]
    async fn content_length_keep_alive() {
        let r = response(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n").await;
        assert_eq!(
            r.unwrap(),
            Response {
                status: 200,
                keep_alive: true
            }
        );
    }

    #[tokio::test]
    async fn connection_close_and_http10() {
        let r = response(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
        assert!(!r.await.unwrap().keep_alive);
        let r = response(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert!(!r.await.unwrap().keep_alive);
        let r = response(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n");
        assert!(r.await.unwrap().keep_alive);
    }

    #[tokio::test]
    async fn chunked_with_trailers_and_interim() {
        let r = response(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n\
              5;x=y\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: 1\r\n\r\n",
        );
        assert_eq!(
            r.await.unwrap(),
            Response {
                status: 404,
                keep_alive: true
            }
        );
    }

    #[tokio::test]
    async fn body_until_eof_is_not_reusable() {
        let r = response(b"HTTP/1.1 200 OK\r\n\r\nall of it").await.unwrap();
        assert_eq!(
            r,
            Response {
                status: 200,
                keep_alive: false
            }
        );
    }

    #[tokio::test]
    async fn no_body_for_204_and_304() {
        let r = response(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n").await;
        assert_eq!(r.unwrap().status, 204);
    }

    #[tokio::test]
    async fn framing_errors() {
        assert!(matches!(
            response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA").await,
            Err(HttpError::Malformed(_))
        ));
        assert!(matches!(
            response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").await,
            Err(HttpError::Closed)
        ));
        assert!(matches!(response(b"").await, Err(HttpError::Closed)));
        assert!(matches!(
            response(b"SSH-2.0-OpenSSH\r\n\r\n").await,
            Err(HttpError::Malformed(_))
        ));
        assert!(matches!(
            response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").await,
            Err(HttpError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn head_split_across_reads() {
        // A reader that yields one byte per read exercises the resumed delimiter search.
        let (mut client, mut server) = tokio::io::duplex(1);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            server
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
        });
        let r = read_response(&mut client, &mut Vec::new()).await.unwrap();
        assert_eq!(r.status, 200);
        writer.await.unwrap().unwrap();
    }
}
