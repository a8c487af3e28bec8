//! `upstream-pool`: the upstream connection layer of an HTTP proxy.
//!
//! Ask a [`Connector`] for a connection to a [`Peer`]; get back an established one, either
//! an idle connection from the pool whose [`PeerKey`] is *exactly* equal (every setting that
//! shaped the connection: address, SNI, trust, client certificate, ALPN, ...) or a freshly
//! dialled TCP connection with an OpenSSL handshake on top, resuming a cached TLS session
//! when an identical peer left one. Timings and negotiated parameters go to the `metrics`
//! facade (see [`metrics`] for the names).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use upstream_pool::{Alpn, Connector, ConnectorOptions, Peer};
//!
//! let connector = Connector::new(ConnectorOptions::default())?;
//! let peer = Peer::tls("127.0.0.1:8443".parse()?, "backend.example")
//!     .with_alpn(Alpn::H1)
//!     .with_total_connection_timeout(Duration::from_secs(3));
//!
//! let mut conn = connector.get(&peer).await?;
//! conn.write_all(b"GET / HTTP/1.1\r\nHost: backend.example\r\n\r\n").await?;
//! let mut buf = [0u8; 1024];
//! let _n = conn.read(&mut buf).await?;
//! // ... once the response has been read completely:
//! connector.release(conn);
//! # Ok(()) }
//! ```

mod connect;
mod connector;
mod error;
pub mod http;
mod key;
pub mod metrics;
mod peer;
mod pool;
mod session_cache;
mod stats;
mod stream;

pub use connector::{Connector, ConnectorOptions};
pub use error::{Error, ErrorKind, Result};
pub use key::PeerKey;
pub use peer::{Alpn, CertKey, Peer, PeerAddress, TcpKeepalive};
pub use stats::PeerStats;
pub use stream::{Connection, SslDigest, TimingDigest};

/// Compiles the README's Rust examples as doctests, so they cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
