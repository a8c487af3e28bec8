//! Reads the server name (SNI) out of the raw bytes of a TLS ClientHello.
//!
//! Test servers record what the client really sent: OpenSSL's own `SSL_get_servername`
//! reports the *session's* name on a resumed TLS 1.2 handshake, even inside the servername
//! callback, so it cannot show that a client offered a session under a different name.

/// The `server_name` (host_name) the ClientHello at the start of `raw` carries. `raw` is
/// what the client wrote first on the connection (TLS records, possibly several). `None`
/// when there is no SNI, or when the bytes are not a (complete) ClientHello; never panics.
pub(crate) fn sni(raw: &[u8]) -> Option<String> {
    let hello = handshake_message(raw)?;
    let mut r = Reader(&hello);
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let len = r.u24()?;
    let mut ch = Reader(r.take(len)?);
    ch.take(2 + 32)?; // legacy_version, random
    let n = usize::from(ch.u8()?);
    ch.take(n)?; // legacy_session_id
    let n = ch.u16()?;
    ch.take(n)?; // cipher_suites
    let n = usize::from(ch.u8()?);
    ch.take(n)?; // legacy_compression_methods
    let n = ch.u16()?;
    let mut exts = Reader(ch.take(n)?);
    while !exts.is_empty() {
        let ty = exts.u16()?;
        let n = exts.u16()?;
        let data = exts.take(n)?;
        if ty != 0 {
            continue;
        }
        let mut d = Reader(data);
        let n = d.u16()?;
        let mut names = Reader(d.take(n)?);
        while !names.is_empty() {
            let name_type = names.u8()?;
            let n = names.u16()?;
            let name = names.take(n)?;
            if name_type == 0 {
                return String::from_utf8(name.to_vec()).ok();
            }
        }
        return None;
    }
    None
}

/// Reassembles the first handshake message from consecutive handshake records (type 22).
fn handshake_message(raw: &[u8]) -> Option<Vec<u8>> {
    let mut msg = Vec::new();
    let mut r = Reader(raw);
    loop {
        if msg.len() >= 4 {
            let need =
                4 + (usize::from(msg[1]) << 16 | usize::from(msg[2]) << 8 | usize::from(msg[3]));
            if msg.len() >= need {
                msg.truncate(need);
                return Some(msg);
            }
        }
        if r.u8()? != 22 {
            return None;
        }
        r.take(2)?; // record version
        let n = r.u16()?;
        msg.extend_from_slice(r.take(n)?);
    }
}

/// A bounds-checked big-endian cursor.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
}
