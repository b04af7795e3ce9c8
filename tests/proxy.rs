//! The core contract, end to end through the real binary: what the upstream receives.

mod support;

use std::time::{Duration, Instant};

use support::*;

async fn setup(extra_provider: &str, extra_proxy: &str, cfg: IdpConfig) -> (Idp, Upstream, Ledger, Tollgate) {
    let (idp, upstream, ledger) = oauth2_doubles(cfg).await;
    let tg = Tollgate::start(&oauth2_config(&idp, &upstream, extra_provider, extra_proxy));
    (idp, upstream, ledger, tg)
}

#[tokio::test(flavor = "multi_thread")]
async fn injects_bearer_on_get_and_post_and_forwards_faithfully() {
    let (idp, upstream, ledger, tg) = setup("", "", IdpConfig::default()).await;
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
    let body = vec![7u8; 100_000];
    let r = c
        .post(tg.url("/v1/orders"))
        .header("Content-Type", "application/octet-stream")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    let (get, post) = (&seen[0], &seen[1]);
    assert_eq!(
        (get.method.as_str(), get.path.as_str(), get.query.as_deref()),
        ("GET", "/v1/items", Some("page=2&q=a%20b"))
    );
    assert_eq!(get.header("x-custom"), Some("kept"));
    assert_eq!(get.header("proxy-authorization"), None, "Proxy-Authorization must not be forwarded");
    assert_eq!(get.header("host"), Some(upstream.addr.to_string().as_str()));
    let token = get.bearer().expect("bearer token");
    assert_ne!(token, "client-supplied", "client's Authorization must be overwritten");
    assert!(ledger.check(token).is_ok(), "upstream must get a token the IdP issued");
    assert_eq!(post.method, "POST");
    assert_eq!(post.body, body, "body intact");
    assert_eq!(post.bearer(), Some(token));
    assert!(seen.iter().all(|s| s.accepted));

    // What the token endpoint saw: one form-encoded client_credentials request.
    let reqs = idp.seen();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].grant(), "client_credentials");
    assert!(reqs[0].content_type.starts_with("application/x-www-form-urlencoded"));
    assert_eq!(reqs[0].params.get("client_id").map(String::as_str), Some("abc123"));
    tg.assert_path().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_responses_and_reuses_connections() {
    let (_idp, upstream, _l, tg) = setup("", "", IdpConfig::default()).await;
    tg.wait_ready().await;
    let c = client();
    let started = Instant::now();
    let mut r = c.get(tg.url("/stream/6")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let first = r.chunk().await.unwrap().expect("first chunk");
    let first_at = started.elapsed();
    let mut all = first.to_vec();
    while let Some(ch) = r.chunk().await.unwrap() {
        all.extend_from_slice(&ch);
    }
    let total = started.elapsed();
    assert_eq!(String::from_utf8(all).unwrap(), (0..6).map(|i| format!("chunk {i}\n")).collect::<String>());
    assert!(
        first_at + Duration::from_millis(150) < total,
        "first chunk must arrive before the end (streamed, not buffered)"
    );
    for _ in 0..20 {
        assert_eq!(c.get(tg.url("/k")).send().await.unwrap().status(), 200);
    }
    assert_eq!(upstream.count(), 21);
    tg.assert_path().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn short_lived_tokens_are_replaced_before_expiry_under_traffic() {
    let cfg = IdpConfig { lifetime: Duration::from_secs(3), ..IdpConfig::default() };
    let (idp, upstream, _l, tg) = setup("", "", cfg).await;
    tg.wait_ready().await;
    let c = client();
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(8) && n < 2000 {
        let r = c.get(tg.url("/tick")).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {n} failed: {}", r.text().await.unwrap_or_default());
        n += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = upstream.seen();
    assert!(seen.iter().all(|s| s.accepted), "the upstream received an expired or unknown token");
    let distinct: std::collections::BTreeSet<&str> = seen.iter().filter_map(|s| s.bearer()).collect();
    assert!(distinct.len() >= 3, "8 s of 3 s tokens must use at least 3 tokens, saw {}", distinct.len());
    assert!(idp.count() <= 10, "refreshes must be scheduled, not per request: {}", idp.count());
}

#[tokio::test(flavor = "multi_thread")]
async fn cold_start_with_500_concurrent_requests_makes_one_token_request() {
    let (idp, upstream, _ledger) = oauth2_doubles(IdpConfig::default()).await;
    idp.set_delay(Duration::from_millis(700)); // under the provider timeout of 1 s
    let tg = Tollgate::start(&oauth2_config(&idp, &upstream, "", "token_wait = \"10s\""));
    tg.wait_healthy().await;
    let ready = client().get(tg.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503, "not ready before the first token");

    let c = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(0).build().unwrap();
    let mut tasks = Vec::new();
    for i in 0..500 {
        let c = c.clone();
        let url = tg.url(&format!("/cold/{i}"));
        tasks.push(tokio::spawn(async move { c.get(url).send().await.map(|r| r.status().as_u16()) }));
    }
    let mut ok = 0;
    let mut failures = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(200) => ok += 1,
            other => failures.push(format!("{other:?}")),
        }
    }
    assert_eq!(ok, 500, "first failures: {:?}", &failures[..failures.len().min(3)]);
    assert_eq!(idp.count(), 1, "exactly one token request for the whole burst");
    assert_eq!(upstream.count(), 500);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests_then_exits_quickly() {
    let (_idp, _upstream, _l, mut tg) = setup("", "shutdown_timeout = \"5s\"", IdpConfig::default()).await;
    tg.wait_ready().await;
    let url = tg.url("/stream/20"); // about 1 s of streaming
    let inflight = tokio::spawn(async move {
        let r = client().get(url).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = Instant::now();
    tg.signal("TERM");
    let (status, body) = inflight.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body.lines().count(), 20, "in-flight response completed");
    let exit = tg.wait_exit(Duration::from_secs(8)).expect("exited");
    assert!(exit.success());
    assert!(signalled.elapsed() < Duration::from_secs(4), "drained exit must not wait out the whole grace period");
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_path_gets_json_404_and_pass_through_route_adds_nothing() {
    let ledger = Ledger::default();
    let idp = Idp::start(IdpConfig::default(), ledger.clone()).await.unwrap();
    let secured = Upstream::start(Some(ledger.clone())).await.unwrap();
    let open = Upstream::start(None).await.unwrap();
    let cfg = format!(
        r#"
[proxy]
listen = "{{PROXY}}"
[admin]
listen = "{{ADMIN}}"
[providers.backend]
kind = "oauth2"
token_url = "{}"
client_id = "abc123"
client_secret = "456789"
[[routes]]
name = "secured"
host = "api.test"
path_prefix = "/api"
strip_prefix = true
upstream = "{}/base"
provider = "backend"
[[routes]]
name = "open"
path_prefix = "/public"
upstream = "{}"
"#,
        idp.url(),
        secured.url(),
        open.url()
    );
    let tg = Tollgate::start(&cfg);
    tg.wait_ready().await;
    let c = client();
    let r = c.get(tg.url("/nowhere")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "no_route");

    let r = c.get(tg.url("/public/x")).header("Authorization", "Bearer mine").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(open.seen()[0].bearer(), Some("mine"), "a route without a provider passes through untouched");

    let r = c.get(tg.url("/api/v1?x=1")).header("Host", "API.test:8080").send().await.unwrap();
    assert_eq!(r.status(), 200);
    let s = &secured.seen()[0];
    assert_eq!((s.path.as_str(), s.query.as_deref()), ("/base/v1", Some("x=1")));
    assert!(s.accepted);
    // Same path without the host: falls to no route.
    assert_eq!(c.get(tg.url("/api/v1")).send().await.unwrap().status(), 404);
}
