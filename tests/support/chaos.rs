//! A TLS HTTP/1.1 upstream that misbehaves at random, for load, soak and interleaving tests.
//!
//! Unlike [`super::server::TestServer`] it keeps no per-connection history (a long soak
//! accepts hundreds of thousands of connections) and it tracks, per SNI, how many requests
//! are being processed at once: a request counts from the moment it has been read until just
//! before its response is written, a window nested inside the client's hold on the
//! connection, so "never more than the per-peer cap in flight" is exact as long as clients
//! only give a connection up after its response (or its failure).
//!
//! Every response body is `sni=<SNI of this connection's handshake> conn=<id> req=<n>\n`,
//! so a client can tell which peer key a connection was made for.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use openssl::ssl::{NameType, Ssl, SslAcceptor, SslContext, SslMethod};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_openssl::SslStream;

use super::certs::TestPki;

/// xorshift64*: deterministic per seed, good enough to pick faults and operations.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `permille / 1000`.
    pub(crate) fn chance(&mut self, permille: u64) -> bool {
        self.below(1000) < permille
    }
}

/// What goes wrong, and how often (per mille).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Chaos {
    /// Connections reset (`SO_LINGER` 0, close) right after accept.
    pub(crate) reset_on_accept: u64,
    /// Connections with `SO_LINGER` 0, so every close of theirs is an RST.
    pub(crate) linger_zero: u64,
    /// Each connection closes itself after a random idle time in this range.
    pub(crate) idle_close: Option<(Duration, Duration)>,
    /// Of the idle closes, how many send close_notify first (the others just close).
    pub(crate) polite_idle_close: u64,
    /// Requests answered by dropping the connection instead.
    pub(crate) drop_request: u64,
    /// Responses carrying `Connection: close`, after which the connection is closed.
    pub(crate) close_after_response: u64,
    /// Each response is delayed by a random time up to this.
    pub(crate) max_delay: Duration,
}

impl Chaos {
    /// The soak mix: 1% reset at accept, 20% of connections reset on every close, idle
    /// closes after 100 ms–2 s (half polite), 1% of requests dropped, 3% `Connection:
    /// close`, 0–10 ms response delay.
    pub(crate) fn soak() -> Chaos {
        Chaos {
            reset_on_accept: 10,
            linger_zero: 200,
            idle_close: Some((Duration::from_millis(100), Duration::from_secs(2))),
            polite_idle_close: 500,
            drop_request: 10,
            close_after_response: 30,
            max_delay: Duration::from_millis(10),
        }
    }
}

/// What one upstream observed; shared with its tasks.
#[derive(Debug, Default)]
pub(crate) struct ChaosStats {
    pub(crate) accepted: AtomicUsize,
    pub(crate) handshakes: AtomicUsize,
    pub(crate) requests: AtomicUsize,
    /// Connection tasks running now.
    pub(crate) open: AtomicUsize,
    /// Per SNI: requests being processed now, and the most ever at once.
    in_flight: Mutex<HashMap<String, (usize, usize)>>,
    tasks: Mutex<Vec<AbortHandle>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The upstream; see the module docs. Runs on the current tokio runtime; dropping it aborts
/// the accept loop and every connection task.
#[derive(Debug)]
pub(crate) struct ChaosServer {
    addr: SocketAddr,
    stats: Arc<ChaosStats>,
    accept: JoinHandle<()>,
}

impl ChaosServer {
    /// Starts on `127.0.0.1:0` with the shared test PKI's server certificate (any SNI is
    /// accepted and acknowledged, as nginx does).
    pub(crate) fn start(chaos: Chaos, seed: u64) -> ChaosServer {
        Self::start_with(context(), chaos, seed)
    }

    /// Same, reusing a context from [`context`] (cheaper for many servers).
    pub(crate) fn start_with(ctx: SslContext, chaos: Chaos, seed: u64) -> ChaosServer {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind((Ipv4Addr::LOCALHOST, 0).into()).unwrap();
        // Bursts of thousands of connects: a backlog of 128 would overflow into SYN retries.
        let listener = socket.listen(4096).unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(ChaosStats::default());
        let accept = tokio::spawn(accept_loop(listener, ctx, Arc::clone(&stats), chaos, seed));
        ChaosServer {
            addr,
            stats,
            accept,
        }
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) fn stats(&self) -> &ChaosStats {
        &self.stats
    }

    /// The most requests ever in flight at once for one SNI, and that SNI.
    pub(crate) fn max_in_flight(&self) -> (usize, String) {
        lock(&self.stats.in_flight)
            .iter()
            .map(|(sni, (_, max))| (*max, sni.clone()))
            .max()
            .unwrap_or_default()
    }
}

impl Drop for ChaosServer {
    fn drop(&mut self) {
        self.accept.abort();
        for task in lock(&self.stats.tasks).drain(..) {
            task.abort();
        }
    }
}

/// The server TLS context every chaos server can share.
pub(crate) fn context() -> SslContext {
    let identity = &TestPki::shared().server;
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).unwrap();
    b.set_certificate(&identity.cert).unwrap();
    for c in &identity.intermediates {
        b.add_extra_chain_cert(c.clone()).unwrap();
    }
    b.set_private_key(&identity.key).unwrap();
    b.check_private_key().unwrap();
    b.set_servername_callback(|_, _| Ok(()));
    b.build().into_context()
}

async fn accept_loop(
    listener: TcpListener,
    ctx: SslContext,
    stats: Arc<ChaosStats>,
    chaos: Chaos,
    seed: u64,
) {
    let mut rng = Rng::new(seed);
    let mut id = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                // EMFILE and friends: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        id += 1;
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        if rng.chance(chaos.reset_on_accept) {
            let _ = stream.set_zero_linger();
            drop(stream);
            continue;
        }
        if rng.chance(chaos.linger_zero) {
            let _ = stream.set_zero_linger();
        }
        let _ = stream.set_nodelay(true);
        let conn_rng = Rng::new(rng.next());
        let (ctx, task_stats) = (ctx.clone(), Arc::clone(&stats));
        // Counted before the task runs, so `open` never misses a connection just accepted.
        stats.open.fetch_add(1, Ordering::Relaxed);
        let task = tokio::spawn(async move {
            struct Open(Arc<ChaosStats>);
            impl Drop for Open {
                fn drop(&mut self) {
                    self.0.open.fetch_sub(1, Ordering::Relaxed);
                }
            }
            let _open = Open(Arc::clone(&task_stats));
            let _ = serve(stream, &ctx, &task_stats, chaos, id, conn_rng).await;
        });
        let mut tasks = lock(&stats.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(task.abort_handle());
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn serve(
    stream: TcpStream,
    ctx: &SslContext,
    stats: &ChaosStats,
    chaos: Chaos,
    id: u64,
    mut rng: Rng,
) -> Result<(), BoxError> {
    let mut tls = SslStream::new(Ssl::new(ctx)?, stream)?;
    tokio::time::timeout(Duration::from_secs(10), Pin::new(&mut tls).accept()).await??;
    stats.handshakes.fetch_add(1, Ordering::Relaxed);
    let sni = tls
        .ssl()
        .servername(NameType::HOST_NAME)
        .unwrap_or("")
        .to_owned();
    let idle_limit = match chaos.idle_close {
        Some((lo, hi)) => {
            let span = hi.saturating_sub(lo).as_micros().max(1) as u64;
            lo + Duration::from_micros(rng.below(span))
        }
        None => Duration::from_secs(3600),
    };
    let polite = rng.chance(chaos.polite_idle_close);
    let mut buf = Vec::with_capacity(1024);
    let mut served = 0u64;
    loop {
        match tokio::time::timeout(idle_limit, read_head(&mut tls, &mut buf)).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                let _ = tls.shutdown().await;
                return Ok(());
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                if polite {
                    tls.shutdown().await?;
                }
                return Ok(());
            }
        }
        served += 1;
        stats.requests.fetch_add(1, Ordering::Relaxed);
        if rng.chance(chaos.drop_request) {
            return Ok(()); // no answer: dropped (FIN or RST)
        }
        {
            let mut in_flight = lock(&stats.in_flight);
            let entry = in_flight.entry(sni.clone()).or_default();
            entry.0 += 1;
            entry.1 = entry.1.max(entry.0);
        }
        let max_delay = chaos.max_delay.as_micros() as u64;
        if max_delay > 0 {
            tokio::time::sleep(Duration::from_micros(rng.below(max_delay + 1))).await;
        } else {
            tokio::task::yield_now().await;
        }
        if let Some(entry) = lock(&stats.in_flight).get_mut(&sni) {
            entry.0 -= 1;
        }
        let close = rng.chance(chaos.close_after_response);
        let body = format!("sni={sni} conn={id} req={served}\n");
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        tls.write_all(response.as_bytes()).await?;
        tls.flush().await?;
        if close {
            tls.shutdown().await?;
            return Ok(());
        }
    }
}

/// Reads one request head (no bodies here) and consumes it from `buf`. `Ok(false)` on a clean
/// EOF between requests.
async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> std::io::Result<bool> {
    loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..pos + 4);
            return Ok(true);
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(false)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The `sni=` field of a chaos server's response body.
pub(crate) fn sni_of(body: &str) -> Option<&str> {
    body.split_whitespace().find_map(|w| w.strip_prefix("sni="))
}
