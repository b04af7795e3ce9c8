//! The first request head of a connection, and whether it is "plain" (issue 13 item 1):
//! the only requests the fast path serves. Pure, no I/O.
//!
//! Plain is deliberately narrower than what pingora plus `proxy::hygiene` accept, so that
//! everything plain is read the same way by both, and everything else (including every
//! request they refuse) goes to pingora and gets its answer byte for byte: CRLF line ends
//! only, no leading empty lines, `METHOD SP /origin-form SP HTTP/1.x`, a known method
//! (never CONNECT), exactly one `Host`, at most one all-digit `Content-Length`, no
//! `Transfer-Encoding`, `Upgrade`, `Expect`, `TE`, `Trailer`, `HTTP2-Settings` or
//! `Proxy-Connection`, `Connection` naming only `keep-alive`/`close`, at most
//! [`MAX_HEADERS`] fields and [`MAX_REQUEST_HEADER_BYTES`] bytes.

use std::ops::Range;

use crate::proxy::hygiene::MAX_REQUEST_HEADER_BYTES;

/// Fields a plain request may carry (httparse's array lives on the stack).
pub const MAX_HEADERS: usize = 64;

/// What the bytes read so far say.
#[derive(Debug)]
pub enum Parsed {
    /// The head is not complete yet (and still within the limits).
    Partial,
    Plain(Head),
    /// Not for the fast path; the reason is a metric label.
    NotPlain(&'static str),
}

/// A plain request head, as byte ranges into the buffer it was parsed from.
#[derive(Debug, Clone)]
pub struct Head {
    pub method: Range<usize>,
    /// The origin-form target, query included.
    pub target: Range<usize>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    /// Every field in order, as (name, value) ranges, `Host` included.
    pub fields: Vec<(Range<usize>, Range<usize>)>,
    /// Index of the `Host` field in `fields`.
    pub host: usize,
    pub content_length: Option<u64>,
    /// The client asked for the connection to close (or is HTTP/1.0 without keep-alive).
    pub close: bool,
    /// Length of the head, blank line included: the body starts here.
    pub len: usize,
}

impl Head {
    pub fn method<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.method.clone()]
    }
    pub fn target<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.target.clone()]
    }
    pub fn host<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.fields[self.host].1.clone()]
    }
    /// The path, without the query.
    pub fn path<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        let t = self.target(buf);
        &t[..t.iter().position(|&b| b == b'?').unwrap_or(t.len())]
    }
    pub fn is_head(&self, buf: &[u8]) -> bool {
        self.method(buf) == b"HEAD"
    }
    /// RFC 9110 §9.2.2.
    pub fn idempotent(&self, buf: &[u8]) -> bool {
        matches!(self.method(buf), b"GET" | b"HEAD" | b"OPTIONS" | b"PUT" | b"DELETE")
    }
}

/// Methods the fast path serves; anything else (CONNECT, TRACE, WebDAV, …) is delegated.
const METHODS: [&[u8]; 7] = [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"];

/// Fields whose presence sends the request to pingora.
const DELEGATING_FIELDS: [&[u8]; 7] =
    [b"transfer-encoding", b"upgrade", b"expect", b"te", b"trailer", b"http2-settings", b"proxy-connection"];

pub fn parse(buf: &[u8]) -> Parsed {
    // No leading empty lines (httparse skips them; RFC 9112 §2.2 only says "SHOULD ignore").
    if buf.first().is_some_and(|&b| b == b'\r' || b == b'\n') {
        return Parsed::NotPlain("leading_newline");
    }
    // Uninit: httparse writes each slot as it parses it, nothing is zeroed first.
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > MAX_REQUEST_HEADER_BYTES { Parsed::NotPlain("too_large") } else { Parsed::Partial };
        }
        Err(httparse::Error::TooManyHeaders) => return Parsed::NotPlain("too_many_headers"),
        Err(_) => return Parsed::NotPlain("invalid"),
    };
    if len > MAX_REQUEST_HEADER_BYTES {
        return Parsed::NotPlain("too_large");
    }
    if has_bare_lf(&buf[..len]) {
        return Parsed::NotPlain("bare_lf");
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Parsed::NotPlain("invalid");
    };
    if !METHODS.contains(&method.as_bytes()) {
        return Parsed::NotPlain("method");
    }
    if !target.starts_with('/') {
        return Parsed::NotPlain("target_form");
    }
    // Visible ASCII that `http::Uri` takes as is: pingora percent-encodes anything else
    // and routes on the result, so such targets go to it.
    // A `#fragment` is never sent upstream (pingora drops it): such targets go to pingora too.
    if !target.bytes().all(|b| b.is_ascii_graphic() && !b"\"<>\\^`{|}#".contains(&b)) {
        return Parsed::NotPlain("target_chars");
    }
    let span = |s: &[u8]| {
        let start = s.as_ptr() as usize - buf.as_ptr() as usize;
        start..start + s.len()
    };
    let mut fields = Vec::with_capacity(req.headers.len());
    let (mut host, mut content_length) = (None, None);
    let mut saw_length = false;
    let (mut close, mut keep_alive) = (false, false);
    for (i, h) in req.headers.iter().enumerate() {
        let name = h.name.as_bytes();
        let value = h.value;
        if DELEGATING_FIELDS.iter().any(|d| name.eq_ignore_ascii_case(d)) {
            return Parsed::NotPlain("field");
        }
        if name.eq_ignore_ascii_case(b"host") {
            // An authority (RFC 3986 §3.2) without userinfo, which pingora refuses with a 400.
            let authority = |b: &u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:[]%".contains(b);
            if host.is_some() || value.is_empty() || !value.iter().all(authority) {
                return Parsed::NotPlain("host");
            }
            host = Some(i);
        } else if name.eq_ignore_ascii_case(b"content-length") {
            if saw_length || value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
                return Parsed::NotPlain("content_length");
            }
            saw_length = true;
            content_length = value.iter().try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty()) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                } else {
                    return Parsed::NotPlain("connection");
                }
            }
        }
        fields.push((span(name), span(value)));
    }
    let Some(host) = host else { return Parsed::NotPlain("host") };
    if minor == 0 && !keep_alive {
        close = true;
    }
    Parsed::Plain(Head {
        method: span(method.as_bytes()),
        target: span(target.as_bytes()),
        minor,
        fields,
        host,
        content_length,
        close,
        len,
    })
}

/// Same rule as `proxy::hygiene`: every LF must follow a CR.
fn has_bare_lf(raw: &[u8]) -> bool {
    let mut prev = 0u8;
    raw.iter().any(|&b| {
        let bare = b == b'\n' && prev != b'\r';
        prev = b;
        bare
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(raw: &[u8]) -> Head {
        match parse(raw) {
            Parsed::Plain(h) => h,
            other => panic!("{:?} should be plain, got {other:?}", String::from_utf8_lossy(raw)),
        }
    }

    fn not_plain(raw: &[u8]) -> &'static str {
        match parse(raw) {
            Parsed::NotPlain(why) => why,
            other => panic!("{:?} should not be plain, got {other:?}", String::from_utf8_lossy(raw)),
        }
    }

    #[test]
    fn a_plain_get_and_post_are_read_whole() {
        let raw = b"GET /a/b?c=d HTTP/1.1\r\nHost: api.example:8080\r\nX-A: 1\r\n\r\nNEXT";
        let h = plain(raw);
        assert_eq!((h.method(raw), h.target(raw), h.path(raw)), (&b"GET"[..], &b"/a/b?c=d"[..], &b"/a/b"[..]));
        assert_eq!((h.host(raw), h.minor, h.content_length, h.close), (&b"api.example:8080"[..], 1, None, false));
        assert_eq!(&raw[h.len..], b"NEXT");
        assert_eq!(h.fields.len(), 2);
        let raw = b"POST /x HTTP/1.1\r\nhost: h\r\nContent-Length: 11\r\nConnection: close\r\n\r\nhello world";
        let h = plain(raw);
        assert_eq!((h.content_length, h.close, &raw[h.len..]), (Some(11), true, &b"hello world"[..]));
        let raw = b"GET /old HTTP/1.0\r\nHost: h\r\n\r\n";
        assert!(plain(raw).close, "HTTP/1.0 closes unless it asks for keep-alive");
        let raw = b"GET /old HTTP/1.0\r\nHost: h\r\nConnection: Keep-Alive\r\n\r\n";
        assert!(!plain(raw).close);
    }

    #[test]
    fn an_incomplete_head_waits_until_the_limit() {
        assert!(matches!(parse(b"GET /a HTTP/1.1\r\nHost: x\r\n"), Parsed::Partial));
        assert!(matches!(parse(b"GE"), Parsed::Partial));
        let long = format!("GET /a HTTP/1.1\r\nHost: x\r\nX-Big: {}", "a".repeat(MAX_REQUEST_HEADER_BYTES));
        assert_eq!(not_plain(long.as_bytes()), "too_large");
        let complete = format!("GET /a HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(MAX_REQUEST_HEADER_BYTES));
        assert_eq!(not_plain(complete.as_bytes()), "too_large");
    }

    /// Every request of tests/hygiene.rs that pingora or hygiene refuses or rewrites, and
    /// every hop-by-hop or upgrade case there, is delegated.
    #[test]
    fn every_smuggling_case_of_the_hygiene_suite_is_not_plain() {
        let cases: &[&[u8]] = &[
            b"GET /hop HTTP/1.1\r\nHost: x\r\nConnection: close, X-Secret-Hop\r\nConnection: X-Other-Hop\r\nX-Secret-Hop: s\r\n\r\n",
            b"GET /hop HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n",
            b"GET /hop HTTP/1.1\r\nHost: x\r\nTrailer: X-T\r\n\r\n",
            b"GET /hop HTTP/1.1\r\nHost: x\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
            b"GET /hop HTTP/1.1\r\nHost: x\r\nProxy-Connection: keep-alive\r\n\r\n",
            b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            b"GET /named-auth HTTP/1.1\r\nHost: x\r\nConnection: close, Authorization\r\nAuthorization: Bearer mine\r\n\r\n",
            b"GET /stray-upgrade HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: close\r\n\r\n",
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\ncontent-length: 60\r\n\r\n0\r\n\r\n",
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 70\r\n\r\nhello",
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 70\r\n\r\nhello",
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello",
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: \r\n\r\n",
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
            b"POST  /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            b"GET /a HTTP/1.1\r\nX-A: b\r\n\r\n",
            b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            b"GET /old HTTP/1.0\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
            b"POST /a HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET /a HTTP/1.1\nHost: x\nX-A: b\n\n",
            b"GET /a HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\rX-A: b\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nX Bad: b\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nX-\x01Bad: b\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nX-Bad: a\x7fb\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nX-Fold: a\r\n b\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nX-Fold: a\r\n\tTransfer-Encoding: chunked\r\n\r\n",
            b"GET http://x/abs HTTP/1.1\r\nHost: x\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
            b"TRACE /a HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a HTTP/2.0\r\nHost: x\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: \r\n\r\n",
            b"GET /a{b} HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n",
        ];
        for raw in cases {
            not_plain(raw);
        }
        let fields: String = (0..300).map(|i| format!("X-F{i}: v\r\n")).collect();
        assert_eq!(not_plain(format!("GET /f HTTP/1.1\r\nHost: x\r\n{fields}\r\n").as_bytes()), "too_many_headers");
    }

    #[test]
    fn hygiene_suite_requests_that_pass_unchanged_are_plain() {
        // The chunked smuggling attempt's second request, once the first is delegated,
        // never reaches this parser; a clean request does.
        plain(b"GET /clean HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        plain(b"GET /a%20b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        plain(b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello");
        plain(b"GET /v6 HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n");
    }

    /// Found by the differential fuzz target: pingora answers 400 to userinfo in Host and
    /// drops a fragment from the target; both go to pingora rather than be copied here.
    #[test]
    fn userinfo_in_host_and_a_fragment_in_the_target_are_not_plain() {
        assert_eq!(not_plain(b"GET /ui HTTP/1.1\r\nHost: user@x\r\n\r\n"), "host");
        assert_eq!(not_plain(b"GET /h HTTP/1.1\r\nHost: x y\r\n\r\n"), "host");
        assert_eq!(not_plain(b"GET /fr?q=1#frag HTTP/1.1\r\nHost: x\r\n\r\n"), "target_chars");
    }
}
