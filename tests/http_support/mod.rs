//! Helpers shared by the `upstream_pool::http` suites (`http_h1`, `http_h2`, `http_cancel`,
//! `http_operate`, `http_smoke`). Kept apart from `tests/support`, which deliberately does
//! not depend on the library; these build the library's own types.
#![allow(dead_code)]

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use upstream_pool::http::HttpConnector;
use upstream_pool::{Alpn, Connector, ConnectorOptions, Peer};

use crate::support::certs::TestPki;
use crate::support::h2_server::HttpServer;

/// Bound on every request or step, so a hang fails the test instead of stalling the suite.
pub(crate) const STEP: Duration = Duration::from_secs(5);

/// An `HttpConnector` over a new connector with default options changed by `configure`.
pub(crate) fn http_with(configure: impl FnOnce(&mut ConnectorOptions)) -> HttpConnector {
    let mut options = ConnectorOptions::default();
    configure(&mut options);
    HttpConnector::new(Connector::new(options).unwrap())
}

/// The test server as a TLS peer ("localhost", trusting the shared test CA) offering `alpn`.
pub(crate) fn peer(server: &HttpServer, alpn: Alpn) -> Peer {
    Peer::tls(server.addr(), "localhost")
        .with_ca(TestPki::shared().ca_a())
        .with_alpn(alpn)
}

/// `GET path` without a body.
pub(crate) fn get(path: &str) -> http::Request<Empty<Bytes>> {
    http::Request::get(path).body(Empty::new()).unwrap()
}
