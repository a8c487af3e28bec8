//! The OpenSSL calls the `openssl` crate does not expose safely. The only `unsafe` in the
//! crate lives here, one small function per call, each with its `// SAFETY:` argument.
#![allow(
    unsafe_code,
    reason = "thin wrappers over OpenSSL calls the openssl crate lacks"
)]

use std::ffi::{c_char, c_int, c_ulong, c_void, CString};

use foreign_types_shared::{ForeignType, ForeignTypeRef};
use openssl::error::ErrorStack;
use openssl::ssl::{SslRef, SslSession, SslSessionRef};
use openssl::x509::store::X509StoreRef;
use openssl::x509::verify::X509VerifyParamRef;

extern "C" {
    // In libcrypto since 1.0.2; openssl-sys does not declare it. openssl-sys already links
    // libcrypto, so declaring the symbol is enough.
    fn X509_VERIFY_PARAM_add1_host(
        param: *mut openssl_sys::X509_VERIFY_PARAM,
        name: *const c_char,
        namelen: usize,
    ) -> c_int;
    // In libssl since 1.1.0; openssl-sys does not declare it either.
    fn SSL_has_pending(s: *const openssl_sys::SSL) -> c_int;
    // In libssl since 1.1.1; openssl-sys does not declare it either.
    fn SSL_SESSION_dup(src: *const openssl_sys::SSL_SESSION) -> *mut openssl_sys::SSL_SESSION;
    // In libssl since 1.1.0; openssl-sys does not declare it either.
    fn SSL_free_buffers(s: *mut openssl_sys::SSL) -> c_int;
    // In libssl since 1.1.1; openssl-sys does not declare it either.
    fn SSL_SESSION_get_ticket_lifetime_hint(s: *const openssl_sys::SSL_SESSION) -> c_ulong;
}

/// Uses `store` to verify this connection's peer, taking a reference on it
/// (`SSL_set1_verify_cert_store`), so one cached store serves every handshake of a CA set.
pub(crate) fn set_verify_cert_store(
    ssl: &mut SslRef,
    store: &X509StoreRef,
) -> Result<(), ErrorStack> {
    // SAFETY: both pointers come from live owned wrappers. SSL_ctrl with
    // SSL_CTRL_SET_VERIFY_CERT_STORE and larg = 1 is the "set1" variant: OpenSSL takes its own
    // reference on the store, so the store outliving this call is not required.
    let rc = unsafe {
        openssl_sys::SSL_ctrl(
            ssl.as_ptr(),
            openssl_sys::SSL_CTRL_SET_VERIFY_CERT_STORE,
            1,
            store.as_ptr() as *mut c_void,
        )
    };
    if rc > 0 {
        Ok(())
    } else {
        Err(ErrorStack::get())
    }
}

/// Adds one more acceptable hostname to the verify parameters (`X509_VERIFY_PARAM_add1_host`);
/// the `openssl` crate only has `set_host`, which replaces the list.
pub(crate) fn add_host(param: &mut X509VerifyParamRef, host: &str) -> Result<(), ErrorStack> {
    // An empty name would clear the list of accepted names instead of adding one.
    if host.is_empty() {
        return Ok(());
    }
    // SAFETY: the pointer is a live X509_VERIFY_PARAM owned by the SSL; name/namelen describe
    // a valid, non-empty byte slice that OpenSSL copies ("add1").
    let rc = unsafe {
        X509_VERIFY_PARAM_add1_host(param.as_ptr(), host.as_ptr() as *const c_char, host.len())
    };
    if rc == 1 {
        Ok(())
    } else {
        Err(ErrorStack::get())
    }
}

/// Restricts the key-exchange groups of one connection (`SSL_set1_groups_list`).
pub(crate) fn set_groups_list(ssl: &mut SslRef, groups: &str) -> Result<(), ErrorStack> {
    let groups = CString::new(groups).map_err(|_| ErrorStack::get())?;
    // SAFETY: a live SSL and a NUL-terminated string; OpenSSL parses and copies the list.
    let rc = unsafe { openssl_sys::SSL_set1_groups_list(ssl.as_ptr(), groups.as_ptr()) };
    if rc > 0 {
        Ok(())
    } else {
        Err(ErrorStack::get())
    }
}

/// Offers a cached session for resumption.
///
/// The session must come from the same `SSL_CTX` as `ssl`. It does: each
/// [`crate::Connector`] has exactly one `SslConnector` (one `SSL_CTX`) and its own session
/// cache, and the cache is only filled by that context's new-session callback.
pub(crate) fn set_session(ssl: &mut SslRef, session: &SslSessionRef) -> Result<(), ErrorStack> {
    // SAFETY: `SslRef::set_session` requires that the session was created by the same context
    // as `ssl`; the per-connector cache guarantees that (see above).
    unsafe { ssl.set_session(session) }
}

/// A new session with the same contents as `session` (`SSL_SESSION_dup`), owned by the
/// caller and attached to no connection.
///
/// OpenSSL changes flags on a session attached to a connection (it marks it not resumable
/// after resuming it with TLS 1.3, or on a fatal alert), so the cache keeps and offers copies.
pub(crate) fn dup_session(session: &SslSessionRef) -> Result<SslSession, ErrorStack> {
    // SAFETY: `session` is a live SSL_SESSION; SSL_SESSION_dup only reads it and returns a new
    // session holding one reference (or NULL on allocation failure), which `from_ptr` takes
    // over, so it is freed exactly once when the `SslSession` drops.
    unsafe {
        let copy = SSL_SESSION_dup(session.as_ptr());
        if copy.is_null() {
            Err(ErrorStack::get())
        } else {
            Ok(SslSession::from_ptr(copy))
        }
    }
}

/// The lifetime the server gave the session's ticket, in seconds; 0 when it sent no ticket
/// or left the lifetime unspecified. OpenSSL does not fold it into the session's timeout.
pub(crate) fn ticket_lifetime_hint(session: &SslSessionRef) -> c_ulong {
    // SAFETY: `session` is a live SSL_SESSION; the call only reads one field.
    unsafe { SSL_SESSION_get_ticket_lifetime_hint(session.as_ptr()) }
}

/// Whether OpenSSL holds bytes of this connection it has not handed out yet: decrypted
/// application data, or (with read-ahead) raw records already read from the socket.
/// `SslRef::pending` only sees the former.
pub(crate) fn has_pending(ssl: &SslRef) -> bool {
    // SAFETY: a live SSL; the call only reads its buffers' state.
    unsafe { SSL_has_pending(ssl.as_ptr()) == 1 }
}

/// Frees the connection's record buffers (`SSL_free_buffers`) unless they hold data: bytes
/// read ahead and not yet processed, or a record not completely written. Returns whether
/// nothing is left allocated.
///
/// Why: `SSL_MODE_RELEASE_BUFFERS` (on in every `SslConnector`) does not cover the reads an
/// idle connection sees. A read that finds nothing to return (the pool's liveness probe
/// reading TLS 1.3 session tickets, or any `SSL_read` that ends in `WANT_READ`) allocates the
/// 16.5 KiB read buffer and keeps it, and so does reading a response with read-ahead on
/// (measured with heaptrack on OpenSSL 3.0; BENCHMARKS.md section 4). OpenSSL allocates a
/// fresh buffer on the next read or write, so calling this between exchanges is always safe.
pub(crate) fn free_buffers(ssl: &SslRef) -> bool {
    // SAFETY: a live SSL owned by the caller's stream and not used concurrently (the caller
    // holds the stream, and `SslRef` is an opaque, interior-mutable handle, so mutating it
    // through a shared reference is sound). SSL_free_buffers checks itself that neither
    // buffer holds pending data and leaves them alone if one does; nothing outside OpenSSL
    // (tokio-openssl's BIO included) points into these buffers.
    unsafe { SSL_free_buffers(ssl.as_ptr()) == 1 }
}

/// Whether a close_notify was received or sent on this connection (`SSL_get_shutdown`); the
/// `openssl` crate's `get_shutdown` wants `&mut`, which a stream only lends as `&`.
pub(crate) fn is_shut_down(ssl: &SslRef) -> bool {
    // SAFETY: a live SSL; SSL_get_shutdown only reads one field.
    unsafe { openssl_sys::SSL_get_shutdown(ssl.as_ptr()) != 0 }
}

/// Marks the connection as shut down in both directions without sending anything.
///
/// `SSL_free` on a connection that was not shut down removes its session from the cache and
/// flags it not resumable; a proxy that just drops a healthy connection must not lose the
/// session other connections will resume from.
pub(crate) fn mark_shut_down(ssl: &SslRef) {
    // SAFETY: a live SSL owned by the caller's stream, which is being dropped and is not used
    // concurrently; SSL_set_shutdown only stores the flags (SslRef is an opaque, interior
    // mutable handle, so writing through a shared reference is sound).
    unsafe {
        openssl_sys::SSL_set_shutdown(
            ssl.as_ptr(),
            openssl_sys::SSL_SENT_SHUTDOWN | openssl_sys::SSL_RECEIVED_SHUTDOWN,
        )
    }
}
