//! Downstream hygiene, end to end through the real binary with hand-written HTTP/1.1
//! bytes: hop-by-hop fields are not forwarded, request-smuggling inputs are refused
//! without reaching the upstream, oversized headers get 431, and the admin API wants its
//! token on every path but the probes.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn setup(admin_token: Option<&str>) -> (Idp, Upstream, Ledger, Tollgate) {
    let (idp, upstream, ledger) = oauth2_doubles(IdpConfig::default()).await;
    let mut cfg = oauth2_config(&idp, &upstream, "", "");
    if let Some(t) = admin_token {
        cfg = cfg.replace("listen = \"{ADMIN}\"", &format!("listen = \"{{ADMIN}}\"\ntoken = \"{t}\""));
    }
    let tg = Tollgate::start(&cfg);
    tg.wait_ready().await;
    (idp, upstream, ledger, tg)
}

/// What came back on one connection.
struct Reply {
    text: String,
    /// The server closed the connection (EOF or reset) rather than leaving it idle.
    closed: bool,
}

impl Reply {
    fn status(&self) -> u16 {
        self.text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status line: {:?}", self.text))
    }

    /// How many responses the connection carried.
    fn responses(&self) -> usize {
        self.text.matches("HTTP/1.1 ").count()
    }

    fn json(&self) -> serde_json::Value {
        let body = self.text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
    }
}

/// Write `bytes` on a fresh connection and read until the server closes it, it stays idle
/// for 1 s, or 5 s pass.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Reply {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(5);
    let closed = loop {
        if Instant::now() > deadline {
            break false;
        }
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    Reply { text: String::from_utf8_lossy(&out).into_owned(), closed }
}

/// The upstream may record an aborted request only after the client saw its answer.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_and_connection_named_fields_are_not_forwarded() {
    let (_idp, upstream, ledger, tg) = setup(None).await;
    let hop: &[&str] = &[
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "http2-settings",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "x-secret-hop",
        "x-other-hop",
        "transfer-encoding",
    ];

    let r = exchange(
        tg.proxy,
        b"GET /hop HTTP/1.1\r\nHost: x\r\nConnection: close, X-Secret-Hop\r\nConnection: X-Other-Hop\r\n\
          X-Secret-Hop: s\r\nX-Other-Hop: o\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-T\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nProxy-Connection: keep-alive\r\n\
          Proxy-Authorization: Basic c2VjcmV0\r\nProxy-Authenticate: Basic\r\nX-Kept: k\r\n\r\n",
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text);
    let seen = upstream.seen();
    let s = seen.last().unwrap();
    assert_eq!(s.path, "/hop");
    assert_eq!(s.header("x-kept"), Some("k"), "end-to-end fields pass");
    for name in hop {
        assert_eq!(s.header(name), None, "`{name}` was forwarded: {:?}", s.headers);
    }
    assert!(ledger.check(s.bearer().unwrap()).is_ok(), "the injected token is there");

    // A chunked body arrives whole; pingora frames the upstream leg itself.
    let r = exchange(
        tg.proxy,
        b"POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\nConnection: close\r\n\r\n\
          5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text);
    let s = upstream.seen().pop().unwrap();
    assert_eq!((s.path.as_str(), s.body.as_slice()), ("/chunked", b"hello world".as_slice()));
    assert_eq!(s.header("te"), None);

    // Naming the credential in `Connection` strips the client's one, never the injected one.
    let r = exchange(
        tg.proxy,
        b"GET /named-auth HTTP/1.1\r\nHost: x\r\nConnection: close, Authorization\r\nAuthorization: Bearer mine\r\n\r\n",
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text);
    let s = upstream.seen().pop().unwrap();
    assert!(s.accepted && s.bearer() != Some("mine"), "{:?}", s.headers);

    // `Upgrade` that `Connection` does not name is not an upgrade: pingora alone would
    // forward a WebSocket handshake (`Connection: Upgrade`) for it.
    let r = exchange(
        tg.proxy,
        b"GET /stray-upgrade HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text);
    let s = upstream.seen().pop().unwrap();
    assert_eq!((s.header("upgrade"), s.header("connection")), (None, None), "{:?}", s.headers);

    // A real WebSocket handshake is still forwarded as one.
    let r = exchange(
        tg.proxy,
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    assert_eq!(r.status(), 200, "the double does not speak WebSocket: {}", r.text);
    let s = upstream.seen().pop().unwrap();
    assert_eq!(s.header("upgrade"), Some("websocket"));
    assert!(s.header("connection").is_some_and(|c| c.eq_ignore_ascii_case("upgrade")));
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_naming_protected_fields_or_too_many_is_refused() {
    let (_idp, upstream, _l, tg) = setup(None).await;
    for (what, conn) in
        [("Host", "close, Host"), ("ten options", "close, a, b, c, d, e, f, g, h, i"), ("quoted", "\"x-a\"")]
    {
        let before = upstream.count();
        let r =
            exchange(tg.proxy, format!("GET /c HTTP/1.1\r\nHost: x\r\nConnection: {conn}\r\n\r\n").as_bytes()).await;
        assert_eq!(r.status(), 400, "{what}: {}", r.text);
        assert_eq!(r.json()["error"], "bad_request", "{what}");
        assert!(r.closed, "{what}");
        settle().await;
        assert_eq!(upstream.count(), before, "{what} reached the upstream");
    }
}

/// The hostile requests, each followed by a pipelined request that must never reach the
/// upstream as a request of its own. `ours` marks the refusals tollgate adds (JSON body);
/// the others are pingora's own bare `400`.
const SMUGGLING: &[(&str, &[u8], u16, bool)] = &[
    (
        "Content-Length + Transfer-Encoding",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        true,
    ),
    (
        "Transfer-Encoding + Content-Length",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\ncontent-length: 60\r\n\r\n0\r\n\r\n",
        400,
        true,
    ),
    (
        "two different Content-Lengths",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 70\r\n\r\nhello",
        400,
        false,
    ),
    ("Content-Length list", b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 70\r\n\r\nhello", 400, false),
    ("signed Content-Length", b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello", 400, false),
    // RFC 9110 §8.6: pingora reconciles equal values for its own framing but would forward
    // the list; an upstream reading it differently would take the body for a request.
    (
        "Content-Length list of equal values",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello",
        400,
        true,
    ),
    (
        "Content-Length repeated",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        400,
        true,
    ),
    // RFC 9112 §3.2: pingora would percent-encode the stray space and forward `%20/a`.
    ("two spaces after the method", b"POST  /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 400, true),
    ("HTTP/1.1 without Host", b"GET /a HTTP/1.1\r\nX-A: b\r\n\r\n", 400, true),
    ("HTTP/1.1 POST without Host", b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 400, true),
    ("xchunked", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400, false),
    (
        "chunked, identity",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        400,
        false,
    ),
    ("gzip, chunked", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501, true),
    (
        "chunked twice",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        true,
    ),
    ("space before colon", b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400, false),
    ("HTTP/1.0 chunked", b"POST /a HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, false),
    ("bare LF", b"GET /a HTTP/1.1\nHost: x\nX-A: b\n\n", 400, true),
    ("one bare LF", b"GET /a HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n", 400, true),
    ("bare CR", b"GET /a HTTP/1.1\r\nHost: x\rX-A: b\r\n\r\n", 400, false),
    ("space in a name", b"GET /a HTTP/1.1\r\nHost: x\r\nX Bad: b\r\n\r\n", 400, false),
    ("control byte in a name", b"GET /a HTTP/1.1\r\nHost: x\r\nX-\x01Bad: b\r\n\r\n", 400, false),
    ("control byte in a value", b"GET /a HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n", 400, false),
    ("NUL in a value", b"GET /a HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n", 400, false),
    ("DEL in a value", b"GET /a HTTP/1.1\r\nHost: x\r\nX-Bad: a\x7fb\r\n\r\n", 400, false),
    ("obs-fold", b"GET /a HTTP/1.1\r\nHost: x\r\nX-Fold: a\r\n b\r\n\r\n", 400, false),
    (
        "obs-fold with a tab",
        b"GET /a HTTP/1.1\r\nHost: x\r\nX-Fold: a\r\n\tTransfer-Encoding: chunked\r\n\r\n",
        400,
        false,
    ),
];

#[tokio::test(flavor = "multi_thread")]
async fn smuggling_inputs_are_refused_and_nothing_is_forwarded() {
    let (_idp, upstream, _l, tg) = setup(None).await;
    for (i, &(what, bytes, status, ours)) in SMUGGLING.iter().enumerate() {
        let before = upstream.count();
        let mut wire = bytes.to_vec();
        wire.extend_from_slice(format!("GET /smuggled-{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        let r = exchange(tg.proxy, &wire).await;
        assert_eq!(r.status(), status, "{what}: {}", r.text);
        assert_eq!(r.responses(), 1, "{what}: one answer, nothing for the pipelined request: {}", r.text);
        assert!(r.closed, "{what}: the connection must be closed after the refusal");
        let body = r.json();
        if ours {
            assert!(body["error"].is_string(), "{what}: tollgate's JSON refusal expected: {}", r.text);
        } else {
            assert!(body.is_null(), "{what}: pingora answers before any filter runs; if this changes, update README");
        }
        settle().await;
        assert_eq!(upstream.count(), before, "{what} reached the upstream: {:?}", upstream.seen().last());
    }
    assert!(upstream.seen().iter().all(|s| !s.path.contains("smuggled")));
    // Only tollgate's own refusals are counted: pingora's parser answers before any hook.
    let ours = |code| SMUGGLING.iter().filter(|c| c.3 && c.2 == code).count() as f64;
    assert_eq!(tg.metric("tollgate_requests_total{route=\"\",status=\"400\"}").await, ours(400));
    assert_eq!(tg.metric("tollgate_requests_total{route=\"\",status=\"501\"}").await, ours(501));
    // The same connection handling passes a clean request.
    let r = exchange(tg.proxy, b"GET /clean HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert_eq!(r.status(), 200, "{}", r.text);
    assert_eq!(upstream.seen().pop().map(|s| s.path), Some("/clean".to_string()));
}

/// What the framing checks must not refuse: one `Content-Length`, HTTP/1.0 without
/// `Host`, an absolute-form target, a percent-encoded space inside the path.
#[tokio::test(flavor = "multi_thread")]
async fn strict_framing_still_passes_what_the_rfcs_allow() {
    let (_idp, upstream, _l, tg) = setup(None).await;
    let cases: &[(&str, &[u8], &str, &[u8])] = &[
        (
            "one Content-Length",
            b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
            "/one",
            b"hello",
        ),
        ("HTTP/1.0 without Host", b"GET /old HTTP/1.0\r\n\r\n", "/old", b""),
        ("absolute-form target", b"GET http://x/abs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "/abs", b""),
        ("encoded space", b"GET /a%20b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "/a%20b", b""),
    ];
    for &(what, bytes, path, body) in cases {
        let r = exchange(tg.proxy, bytes).await;
        assert_eq!(r.status(), 200, "{what}: {}", r.text);
        let s = upstream.seen().pop().unwrap();
        assert_eq!((s.path.as_str(), s.body.as_slice()), (path, body), "{what}");
        let lengths: Vec<_> = s.headers.iter().filter(|(k, _)| k == "content-length").map(|(_, v)| v).collect();
        assert!(lengths.len() <= 1 && lengths.iter().all(|v| v.parse::<usize>().is_ok()), "{what}: {lengths:?}");
    }
}

/// pingora reads a chunked body while already streaming it upstream, so a malformed chunk
/// cannot be refused before the upstream sees the request line and header: it gets an
/// aborted body, never a complete request nor the one hidden behind it.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_chunks_abort_the_request_and_smuggle_nothing() {
    let (_idp, upstream, _l, tg) = setup(None).await;
    let before = upstream.count();
    let r = exchange(
        tg.proxy,
        b"POST /chunks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n\
          GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert_eq!(r.status(), 400, "{}", r.text);
    assert_eq!((r.responses(), r.closed), (1, true), "{}", r.text);
    settle().await;
    let seen = upstream.seen();
    assert!(seen.len() <= before + 1);
    for s in &seen[before..] {
        assert_eq!((s.path.as_str(), s.body.len()), ("/chunks", 0), "only the aborted request, without a body");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_headers_get_431_and_are_not_forwarded() {
    let (_idp, upstream, _l, tg) = setup(None).await;
    let one_big = format!("GET /big HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(70 * 1024));
    let many: String = (0..40).map(|i| format!("X-H{i}: {}\r\n", "b".repeat(2000))).collect();
    let many = format!("GET /many HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    for (what, req) in [("one 70 KiB field", one_big), ("40 fields of 2 KB", many)] {
        let before = upstream.count();
        let r = exchange(tg.proxy, req.as_bytes()).await;
        assert_eq!(r.status(), 431, "{what}: {}", &r.text[..r.text.len().min(300)]);
        assert_eq!(r.json()["error"], "request_header_too_large", "{what}");
        assert!(r.closed, "{what}");
        settle().await;
        assert_eq!(upstream.count(), before, "{what} reached the upstream");
    }

    assert_eq!(tg.metric("tollgate_requests_total{route=\"\",status=\"431\"}").await, 2.0, "refusals are counted");

    // Past pingora's own limits (1 MiB, 256 fields) its parser answers a bare 400 first.
    let huge = format!("GET /huge HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(1100 * 1024));
    let fields: String = (0..300).map(|i| format!("X-F{i}: v\r\n")).collect();
    let fields = format!("GET /fields HTTP/1.1\r\nHost: x\r\n{fields}\r\n");
    for (what, req) in [("1.1 MiB", huge), ("300 fields", fields)] {
        let before = upstream.count();
        let r = exchange(tg.proxy, req.as_bytes()).await;
        assert_eq!((r.status(), r.closed), (400, true), "{what}: {}", &r.text[..r.text.len().min(300)]);
        settle().await;
        assert_eq!(upstream.count(), before, "{what} reached the upstream");
    }

    // Just under the limit is forwarded whole.
    let value = "c".repeat(60 * 1024);
    let r = client().get(tg.url("/under")).header("X-Big", &value).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(upstream.seen().pop().and_then(|s| s.header("x-big").map(str::len)), Some(value.len()));
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_api_requires_its_token_except_for_the_probes() {
    const TOKEN: &str = "adm1n-t0ken-for-tests";
    let (idp, _upstream, _l, tg) = setup(Some(TOKEN)).await;
    let c = client();
    for probe in ["/healthz", "/readyz"] {
        assert_eq!(c.get(tg.admin_url(probe)).send().await.unwrap().status(), 200, "{probe} stays open");
    }
    let wrong = [
        None,
        Some("Bearer wrong".to_string()),
        Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("Basic {TOKEN}")),
        Some(TOKEN.to_string()),
        Some("Bearer ".to_string()),
    ];
    let idp_before = idp.count();
    for path in ["/metrics", "/admin/providers", "/admin/providers/backend", "/admin/no-such-path"] {
        for auth in &wrong {
            let mut req = c.get(tg.admin_url(path));
            if let Some(a) = auth {
                req = req.header("Authorization", a);
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 401, "{path} with {auth:?}");
            assert_eq!(r.headers().get("www-authenticate").map(|v| v.to_str().unwrap()), Some("Bearer"));
            let body = r.text().await.unwrap();
            assert!(!body.contains(TOKEN) && !body.contains("tollgate_"), "{path}: {body}");
        }
    }
    for auth in &wrong {
        let mut req = c.post(tg.admin_url("/admin/providers/backend/refresh"));
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        assert_eq!(req.send().await.unwrap().status(), 401, "refresh with {auth:?}");
    }
    assert_eq!(idp.count(), idp_before, "a refused refresh must not reach the IdP");

    let bearer = format!("Bearer {TOKEN}");
    for path in ["/metrics", "/admin/providers", "/admin/providers/backend"] {
        let r = c.get(tg.admin_url(path)).header("Authorization", &bearer).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path} with the token");
    }
    let lower = format!("bearer {TOKEN}");
    let r = c.get(tg.admin_url("/metrics")).header("Authorization", &lower).send().await.unwrap();
    assert_eq!(r.status(), 200, "the auth scheme is case-insensitive");
    let r = c.post(tg.admin_url("/admin/providers/backend/refresh")).header("Authorization", &bearer).send().await;
    assert_eq!(r.unwrap().status(), 200);
    assert_eq!(idp.count(), idp_before + 1, "the authorised refresh fetched a token");

    // The proxy port does not care about the admin token.
    assert_eq!(c.get(tg.url("/x")).send().await.unwrap().status(), 200);
}
