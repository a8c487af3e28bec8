//! The HTTP/1.1 side of [`super::h2_server::HttpServer`]: a hand-written keep-alive server,
//! so tests control the framing byte by byte (EOF-delimited bodies, `Connection: close`,
//! dropping a request unanswered), which a general-purpose server would not let them do.
//!
//! Requests: any method, `Content-Length` or `chunked` request bodies. Responses carry the
//! headers described in [`super::h2_server`]. Paths (and `HEAD`) choose the framing:
//!
//! | path | response |
//! |---|---|
//! | anything else | `200`, `Content-Length` |
//! | `/chunked` | `200`, `Transfer-Encoding: chunked`, in pieces of at most 1000 bytes |
//! | `/close` | `200`, `Content-Length`, `Connection: close`; then close_notify + FIN |
//! | `/close-late` | like `/close`, but the close comes 300 ms after the response (the client must not wait for it to know the connection is done) |
//! | `/eof` | `200`, neither length nor chunked: the body ends at close_notify + FIN |
//! | `/204` | `204 No Content`, no body |
//! | `/304` | `304 Not Modified`, no body |
//! | `/stall` | `200` with `Content-Length` 1 MiB, the first 16 KiB, then nothing until the client closes |
//! | `/drop-if-reused` | on a connection's first request: `200`; on a later one: read the request, then close without a byte of response (no close_notify), as an upstream whose keep-alive timer fired just as the request arrived |
//!
//! `HEAD` gets the head a `GET` would get (with its `Content-Length`) and no body.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::h2_server::{
    header_num, is_disconnect, pattern, sha256_hex, BoxError, ConnHandle, Proto, RequestLog,
    ServerConf, CHUNK, STALL_BODY_LEN,
};

/// Largest request head accepted.
const MAX_HEAD: usize = 64 * 1024;

/// A parsed request head.
#[derive(Debug)]
struct Head {
    method: String,
    target: String,
    /// Names lowercased.
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn header_map(&self) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (k, v) in &self.headers {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                http::HeaderValue::from_str(v),
            ) {
                map.append(k, v);
            }
        }
        map
    }
}

/// Serves HTTP/1.1 requests on `stream` until the client closes, a response closes the
/// connection, or the idle timer fires.
pub(crate) async fn serve<S>(
    conn: &ConnHandle,
    conf: &ServerConf,
    mut stream: S,
) -> Result<(), BoxError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        let head = match conf.h1_idle_close {
            None => read_head(&mut stream, &mut buf).await?,
            Some(limit) => {
                match tokio::time::timeout(limit, read_head(&mut stream, &mut buf)).await {
                    Ok(r) => r?,
                    Err(_) => {
                        // Idle too long: close politely, like nginx's keepalive_timeout.
                        stream.shutdown().await?;
                        return Ok(());
                    }
                }
            }
        };
        let Some(head) = head else {
            // Client closed between requests: answer its close_notify with ours.
            let _ = stream.shutdown().await;
            return Ok(());
        };
        let (n, in_flight) = conn.request(Proto::H1);
        let body = read_body(&mut stream, &mut buf, &head).await?;
        let path = head.target.clone();
        let mut entry = RequestLog {
            conn: conn.id,
            n,
            proto: Proto::H1,
            method: head.method.clone(),
            path: path.clone(),
            authority: head.header("host").map(str::to_owned),
            body_len: body.len(),
            body_sha256: sha256_hex(&body),
            answered: false,
        };
        let route = path.split('?').next().unwrap_or("");
        if route == "/drop-if-reused" && n > 1 {
            conn.log(entry);
            drop(in_flight);
            // Returning drops the stream: FIN without close_notify, no response byte.
            return Ok(());
        }

        let headers = head.header_map();
        let delay = header_num(&headers, "x-delay-ms")
            .map_or(conf.delay, |ms| Duration::from_millis(ms as u64));
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let body_out = if route == "/stall" {
            pattern(CHUNK)
        } else {
            match header_num(&headers, "x-body-size").or(conf.body_size) {
                Some(size) => pattern(size),
                None => format!("conn={} req={n}\n", conn.id).into_bytes(),
            }
        };
        let mut common = format!(
            "X-Conn-Id: {}\r\nX-Req-N: {n}\r\nX-Proto: http/1.1\r\nX-Authority: {}\r\n",
            conn.id,
            entry.authority.as_deref().unwrap_or("")
        );
        if !body.is_empty() {
            common.push_str(&format!(
                "X-Req-Body-Len: {}\r\nX-Req-Body-Sha256: {}\r\n",
                entry.body_len, entry.body_sha256
            ));
        }
        let head_only = head.method.eq_ignore_ascii_case("HEAD");
        let mut close = false;
        let result: std::io::Result<()> = async {
            match route {
                "/204" => {
                    stream
                        .write_all(format!("HTTP/1.1 204 No Content\r\n{common}\r\n").as_bytes())
                        .await?;
                }
                "/304" => {
                    stream
                        .write_all(
                            format!("HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n{common}\r\n")
                                .as_bytes(),
                        )
                        .await?;
                }
                "/chunked" => {
                    stream
                        .write_all(
                            format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n{common}\r\n")
                                .as_bytes(),
                        )
                        .await?;
                    if !head_only {
                        for piece in body_out.chunks(1000) {
                            stream
                                .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                                .await?;
                            stream.write_all(piece).await?;
                            stream.write_all(b"\r\n").await?;
                            stream.flush().await?;
                        }
                        stream.write_all(b"0\r\n\r\n").await?;
                    }
                }
                "/eof" => {
                    stream
                        .write_all(format!("HTTP/1.1 200 OK\r\n{common}\r\n").as_bytes())
                        .await?;
                    if !head_only {
                        write_pieces(&mut stream, &body_out).await?;
                    }
                    close = true;
                }
                "/stall" => {
                    stream
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {STALL_BODY_LEN}\r\n{common}\r\n"
                            )
                            .as_bytes(),
                        )
                        .await?;
                    stream.write_all(&body_out).await?;
                    stream.flush().await?;
                    // Never finish; wait for the client to close.
                    let mut sink = [0u8; 4096];
                    while stream.read(&mut sink).await? > 0 {}
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                _ => {
                    close = route == "/close" || route == "/close-late";
                    let extra = if close { "Connection: close\r\n" } else { "" };
                    stream
                        .write_all(
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{extra}{common}\r\n",
                                body_out.len()
                            )
                            .as_bytes(),
                        )
                        .await?;
                    if !head_only {
                        write_pieces(&mut stream, &body_out).await?;
                    }
                }
            }
            stream.flush().await
        }
        .await;
        match result {
            Ok(()) => {
                entry.answered = true;
                conn.answered();
                conn.log(entry);
            }
            Err(e) => {
                conn.log(entry);
                if is_disconnect(&e) {
                    return Ok(());
                }
                return Err(e.into());
            }
        }
        drop(in_flight);
        if close {
            if route == "/close-late" {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            stream.shutdown().await?;
            return Ok(());
        }
    }
}

async fn write_pieces<S: AsyncWrite + Unpin>(stream: &mut S, body: &[u8]) -> std::io::Result<()> {
    for piece in body.chunks(CHUNK) {
        stream.write_all(piece).await?;
    }
    Ok(())
}

/// Reads one request head, consuming it from `buf` (which carries bytes across requests).
/// `Ok(None)` on a clean EOF before a request starts.
async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Result<Option<Head>, BoxError> {
    let end = loop {
        if let Some(pos) = find(buf, b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err("request head too large".into());
        }
        if read_more(stream, buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err("EOF inside a request head".into())
            };
        }
    };
    let text = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("bad request line {line:?}").into());
    };
    if version != "HTTP/1.1" {
        return Err(format!("not HTTP/1.1: {line:?}").into());
    }
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Some(Head {
        method: method.to_owned(),
        target: target.to_owned(),
        headers,
    }))
}

/// Reads the request body announced by `head` (`Content-Length` or `chunked`).
async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    head: &Head,
) -> Result<Vec<u8>, BoxError> {
    let chunked = head
        .header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    if !chunked {
        let len: usize = match head.header("content-length") {
            Some(v) => v.parse().map_err(|_| format!("bad Content-Length {v:?}"))?,
            None => 0,
        };
        while buf.len() < len {
            if read_more(stream, buf).await? == 0 {
                return Err("EOF inside a request body".into());
            }
        }
        return Ok(buf.drain(..len).collect());
    }
    let mut body = Vec::new();
    loop {
        let line_end = loop {
            if let Some(pos) = find(buf, b"\r\n") {
                break pos;
            }
            if read_more(stream, buf).await? == 0 {
                return Err("EOF inside a chunk size".into());
            }
        };
        let line = String::from_utf8_lossy(&buf[..line_end]).into_owned();
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size =
            usize::from_str_radix(size_text, 16).map_err(|_| format!("bad chunk size {line:?}"))?;
        buf.drain(..line_end + 2);
        if size == 0 {
            // Trailers (ignored) up to the empty line.
            loop {
                let end = loop {
                    if let Some(pos) = find(buf, b"\r\n") {
                        break pos;
                    }
                    if read_more(stream, buf).await? == 0 {
                        return Err("EOF inside trailers".into());
                    }
                };
                buf.drain(..end + 2);
                if end == 0 {
                    return Ok(body);
                }
            }
        }
        while buf.len() < size + 2 {
            if read_more(stream, buf).await? == 0 {
                return Err("EOF inside a chunk".into());
            }
        }
        body.extend_from_slice(&buf[..size]);
        if &buf[size..size + 2] != b"\r\n" {
            return Err("chunk not followed by CRLF".into());
        }
        buf.drain(..size + 2);
    }
}

async fn read_more<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let mut chunk = [0u8; 8192];
    let n = stream.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
