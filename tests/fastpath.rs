//! The fast path: plain requests are served
//! by it (the `tollgate_fastpath_total{path="fast"}` counter proves it), with the same
//! upstream contract as pingora's path; what it does not serve goes to pingora on the
//! same connection.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `retry_on_status = []`: a route that never holds a body back for a replay, so bodies
/// stream straight through (replay is covered by tests/proxy.rs, run with the switch on).
async fn setup() -> (Idp, Upstream, Ledger, Tollgate) {
    let (idp, upstream, ledger) = oauth2_doubles(IdpConfig::default()).await;
    let config = oauth2_config(&idp, &upstream, "", "fast_path = true") + "retry_on_status = []\n";
    let tg = Tollgate::start(&config);
    (idp, upstream, ledger, tg)
}

async fn served_fast(tg: &Tollgate) -> f64 {
    tg.metric("tollgate_fastpath_total{path=\"fast\",reason=\"served\"}").await
}

/// Read from `s` until `n` complete answers with a Content-Length or chunked body came,
/// or 5 s passed.
async fn read_answers(s: &mut tokio::net::TcpStream, n: usize) -> String {
    let mut all = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut chunk = [0u8; 8192];
    while Instant::now() < deadline {
        let text = String::from_utf8_lossy(&all).to_string();
        if text.matches("HTTP/1.1 ").count() >= n && (text.ends_with("\r\n\r\n") || text.ends_with("}")) {
            break;
        }
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut chunk)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(k)) => all.extend_from_slice(&chunk[..k]),
            Ok(Err(_)) => break,
            Err(_) => {}
        }
    }
    String::from_utf8_lossy(&all).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_requests_take_the_fast_path_with_the_same_upstream_contract() {
    let (_idp, upstream, ledger, tg) = setup().await;
    tg.wait_ready().await;
    let c = client();
    let r = c
        .get(tg.url("/v1/items?page=2&q=a%20b"))
        .header("Authorization", "Bearer client-supplied")
        .header("Proxy-Authorization", "Basic c2VjcmV0")
        .header("X-Custom", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("date").is_some());
    let body = vec![7u8; 200_000];
    let r = c.post(tg.url("/v1/orders")).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let mut r = c.get(tg.url("/stream/4")).send().await.unwrap();
    let mut all = Vec::new();
    while let Some(ch) = r.chunk().await.unwrap() {
        all.extend_from_slice(&ch);
    }
    assert_eq!(String::from_utf8(all).unwrap(), (0..4).map(|i| format!("chunk {i}\n")).collect::<String>());
    let r = c.head(tg.url("/h")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(c.get(tg.url("/status/204")).send().await.unwrap().status(), 204);
    for _ in 0..20 {
        assert_eq!(c.get(tg.url("/k")).send().await.unwrap().status(), 200);
    }

    let seen = upstream.seen();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(seen.len(), 25, "{paths:?}");
    let get = &seen[0];
    assert_eq!(
        (get.method.as_str(), get.path.as_str(), get.query.as_deref()),
        ("GET", "/v1/items", Some("page=2&q=a%20b"))
    );
    assert_eq!(get.header("x-custom"), Some("kept"));
    assert_eq!(get.header("proxy-authorization"), None, "Proxy-Authorization must not be forwarded");
    assert_eq!(get.header("host"), Some(upstream.addr.to_string().as_str()));
    let token = get.bearer().expect("bearer token");
    assert_ne!(token, "client-supplied");
    assert!(ledger.check(token).is_ok());
    assert_eq!((seen[1].method.as_str(), seen[1].body.len()), ("POST", body.len()));
    assert_eq!(seen[1].body, body, "body intact");
    assert!(seen.iter().all(|s| s.accepted));
    assert_eq!(served_fast(&tg).await, 25.0, "every one of these is plain: {}", tg.metrics().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_requests_are_answered_in_order_and_a_chunked_one_goes_to_pingora() {
    let (_idp, upstream, _l, tg) = setup().await;
    tg.wait_ready().await;
    let addr = tg.url("/").trim_start_matches("http://").trim_end_matches('/').to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    s.write_all(b"GET /p/1 HTTP/1.1\r\nHost: x\r\n\r\nGET /p/2 HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let text = read_answers(&mut s, 2).await;
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
    // Same connection: a chunked request is not plain; pingora serves it.
    s.write_all(b"POST /p/3 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        .await
        .unwrap();
    let text = read_answers(&mut s, 1).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let seen = upstream.seen();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, ["/p/1", "/p/2", "/p/3"]);
    assert_eq!(seen[2].body, b"hello");
    assert!(seen.iter().all(|s| s.accepted));
    assert_eq!(served_fast(&tg).await, 2.0);
    assert_eq!(tg.metric("tollgate_fastpath_total{path=\"pingora\",reason=\"field\"}").await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_token_is_the_same_503_json_as_on_pingoras_path() {
    let (idp, upstream, _ledger) = oauth2_doubles(IdpConfig::default()).await;
    idp.set_mode(Mode::Status(500, "server_error"));
    let config = oauth2_config(&idp, &upstream, "", "fast_path = true\ntoken_wait = \"1s\"") + "retry_on_status = []\n";
    let tg = Tollgate::start(&config);
    tg.wait_healthy().await;
    let r = client().get(tg.url("/x")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers().get("connection").and_then(|v| v.to_str().ok()), Some("close"));
    assert!(r.headers().get("retry-after").is_some());
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "token_unavailable", "{v}");
    assert_eq!(v["provider"], "backend");
    assert_eq!(upstream.count(), 0);
    assert_eq!(served_fast(&tg).await, 0.0, "a 503 is not a served request");
}

/// tests/upstream_pool.rs's forgotten-connection case on the fast path: a GET that meets
/// a connection the far end forgot is sent again on a new one; a sent POST is not (502).
#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_meets_a_forgotten_pooled_connection_is_retried_when_safe() {
    use tollgate_testkit::upstream::{RawBehaviour, RawUpstream};
    let (idp, _upstream, _ledger) = oauth2_doubles(IdpConfig::default()).await;
    let up = RawUpstream::start(RawBehaviour::ForgetIdleAfter(Duration::from_millis(300))).await.unwrap();
    let proxy = "upstream_idle_timeout = \"10s\"\nfast_path = true";
    let tg = Tollgate::start(&(oauth2_config_at(&idp.url(), &up.url(), "", proxy) + "retry_on_status = []\n"));
    tg.wait_ready().await;
    let c = client();
    assert_eq!(c.get(tg.url("/warm")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(tg.url("/warm2")).send().await.unwrap().status(), 200);
    assert_eq!(up.connections(), 1, "back-to-back requests share one pooled connection");

    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = c.get(tg.url("/after-quiet")).send().await.unwrap();
    assert_eq!(r.status(), 200, "logs:\n{}", tg.logs());
    assert_eq!(up.resets(), 1, "the GET met the forgotten connection first");
    assert_eq!(up.seen().iter().filter(|s| s.target == "/after-quiet").count(), 1);

    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = c.post(tg.url("/pay")).body("once").send().await.unwrap();
    assert_eq!(r.status(), 502, "a sent POST is never replayed");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "bad_gateway");
    assert_eq!(up.resets(), 2);
    assert_eq!(served_fast(&tg).await, 3.0, "the 502 is not counted as served");
}
