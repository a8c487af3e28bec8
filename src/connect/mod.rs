//! Establishing new connections: the transport dial and the TLS handshake.

pub(crate) mod openssl_ext;
pub(crate) mod runtime;
pub(crate) mod tcp;
pub(crate) mod tls;
