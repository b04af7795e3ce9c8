//! Upstream rejections (401): invalidate by generation, refetch once, replay the request
//! when it can be replayed; pass the 401 through when it cannot.

mod support;

use std::time::{Duration, Instant};

use support::*;

async fn setup(extra_provider: &str, route_extra: &str) -> (Idp, Upstream, Ledger, Tollgate) {
    let (idp, upstream, ledger) = oauth2_doubles(IdpConfig::default()).await;
    let mut cfg = oauth2_config(&idp, &upstream, extra_provider, "");
    cfg.push_str(route_extra);
    let tg = Tollgate::start(&cfg);
    tg.wait_ready().await;
    (idp, upstream, ledger, tg)
}

/// The token the upstream saw last.
fn last_token(u: &Upstream) -> String {
    u.seen().last().and_then(|s| s.bearer().map(str::to_string)).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn rejected_token_is_replaced_and_get_and_small_post_are_replayed() {
    let (idp, upstream, ledger, tg) = setup("reauth_min_interval = \"1s\"", "").await;
    let c = client();
    assert_eq!(c.get(tg.url("/warm")).send().await.unwrap().status(), 200);
    let old = last_token(&upstream);

    // The IdP revokes the token: the upstream now rejects it.
    ledger.revoke(&old);
    let r = c.get(tg.url("/items?x=1")).send().await.unwrap();
    assert_eq!(r.status(), 200, "GET replayed with a new token");
    let seen = upstream.seen();
    let (rejected, replayed) = (&seen[seen.len() - 2], &seen[seen.len() - 1]);
    assert_eq!((rejected.bearer(), rejected.accepted), (Some(old.as_str()), false));
    assert!(replayed.accepted && replayed.bearer() != Some(old.as_str()));
    assert_eq!(replayed.query.as_deref(), Some("x=1"));
    assert_eq!(idp.count(), 2);

    let current = last_token(&upstream);
    ledger.revoke(&current);
    tokio::time::sleep(Duration::from_millis(1100)).await; // past reauth_min_interval
    let body = br#"{"order": 42}"#.to_vec();
    let r =
        c.post(tg.url("/orders")).header("content-type", "application/json").body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200, "small POST replayed");
    let seen = upstream.seen();
    let (rejected, replayed) = (&seen[seen.len() - 2], &seen[seen.len() - 1]);
    assert!(!rejected.accepted && replayed.accepted);
    assert_eq!(replayed.method, "POST");
    assert_eq!(replayed.body, body, "the replay carries the same body");
    assert_eq!(idp.count(), 3);
    assert!(tg.metric("tollgate_upstream_auth_rejected_total{route=\"api\"}").await >= 2.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn post_over_the_retry_buffer_gets_the_401_untouched_and_the_next_request_a_new_token() {
    let (idp, upstream, ledger, tg) = setup("", "").await;
    let c = client();
    assert_eq!(c.get(tg.url("/warm")).send().await.unwrap().status(), 200);
    ledger.revoke(&last_token(&upstream));
    let big = vec![b'x'; 200 * 1024];
    let r = c.post(tg.url("/upload")).body(big).send().await.unwrap();
    assert_eq!(r.status(), 401, "cannot be replayed: the 401 passes through");
    assert!(r.headers().get("www-authenticate").is_some(), "the upstream's headers pass through");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "invalid_token", "the upstream's body passes through");
    let before = upstream.count();
    assert_eq!(c.get(tg.url("/next")).send().await.unwrap().status(), 200);
    assert_eq!(upstream.count(), before + 1, "the next request needed no replay");
    assert_eq!(idp.count(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn many_concurrent_rejections_cause_one_refetch() {
    let (idp, upstream, ledger, tg) = setup("", "").await;
    let c = reqwest::Client::builder().no_proxy().build().unwrap();
    assert_eq!(c.get(tg.url("/warm")).send().await.unwrap().status(), 200);
    ledger.revoke(&last_token(&upstream));
    let mut tasks = Vec::new();
    for i in 0..300 {
        let c = c.clone();
        let url = tg.url(&format!("/burst/{i}"));
        tasks.push(tokio::spawn(async move { c.get(url).send().await.map(|r| r.status().as_u16()) }));
    }
    let mut ok = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), Ok(200)) {
            ok += 1;
        }
    }
    assert_eq!(ok, 300, "every rejected request was replayed");
    assert_eq!(idp.count(), 2, "one refetch for all rejections of one generation");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_always_rejects_cannot_hammer_the_idp() {
    let (idp, upstream, _ledger, tg) = setup("reauth_min_interval = \"2s\"", "").await;
    upstream.reject_next(10_000);
    let c = client();
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(3) && n < 500 {
        let r = c.get(tg.url("/always")).send().await.unwrap();
        assert_eq!(r.status(), 401, "after one replay the 401 passes through");
        n += 1;
    }
    assert!(n > 20);
    assert!(idp.count() <= 3, "at most one refetch per 2 s, saw {} token requests for {n} requests", idp.count());
}

#[tokio::test(flavor = "multi_thread")]
async fn graphql_unauthenticated_invalidates_the_token_when_enabled() {
    let (idp, upstream, _ledger, tg) =
        setup("reauth_min_interval = \"100ms\"", "graphql_unauthenticated = true\n").await;
    let c = client();
    let r = c.post(tg.url("/graphql-unauthenticated")).body(r#"{"query":"{me{id}}"}"#).send().await.unwrap();
    assert_eq!(r.status(), 200, "the response itself passes through");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["extensions"]["code"], "UNAUTHENTICATED");
    let first = last_token(&upstream);
    assert_eq!(c.get(tg.url("/after")).send().await.unwrap().status(), 200);
    assert_ne!(last_token(&upstream), first, "the next request carries a new token");
    assert_eq!(idp.count(), 2);
}

/// How many times the upstream saw `method path`.
fn times_seen(u: &Upstream, method: &str, path: &str) -> usize {
    u.seen().iter().filter(|s| s.method == method && s.path == path).count()
}

/// Only an authentication status replays a request, and a non-idempotent one only after
/// a 401: a POST answered 503 (not a token problem) or 403 (the upstream may have done
/// part of the work) reaches the upstream once; a GET answered 403 is replayed.
#[tokio::test(flavor = "multi_thread")]
async fn only_a_401_replays_a_post_and_a_503_replays_nothing() {
    let (idp, upstream, _ledger, tg) = setup("reauth_min_interval = \"100ms\"", "retry_on_status = [401, 403]\n").await;
    let c = client();
    assert_eq!(c.get(tg.url("/warm")).send().await.unwrap().status(), 200);
    let fetched = idp.count();

    let r = c.post(tg.url("/status/503")).body(r#"{"pay": 10}"#).send().await.unwrap();
    assert_eq!(r.status(), 503, "the upstream's 503 passes through");
    assert_eq!(times_seen(&upstream, "POST", "/status/503"), 1, "a POST answered 503 is never replayed");
    assert_eq!(idp.count(), fetched, "a 503 says nothing about the token");

    let r = c.post(tg.url("/status/403")).body(r#"{"pay": 10}"#).send().await.unwrap();
    assert_eq!(r.status(), 403, "the upstream's 403 passes through");
    assert_eq!(times_seen(&upstream, "POST", "/status/403"), 1, "a POST answered 403 is not replayed");
    // The rejection still invalidates the token; the driver renews it in the background.
    let deadline = Instant::now() + Duration::from_secs(3);
    while idp.count() == fetched && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(idp.count(), fetched + 1, "the token was still invalidated and renewed");

    tokio::time::sleep(Duration::from_millis(200)).await; // past reauth_min_interval
    let r = c.get(tg.url("/status/403")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(times_seen(&upstream, "GET", "/status/403"), 2, "a GET answered 403 is replayed once");
    let seen = upstream.seen();
    let gets: Vec<_> = seen.iter().filter(|s| s.path == "/status/403" && s.method == "GET").collect();
    assert_ne!(gets[0].bearer(), gets[1].bearer(), "the replay carries the new token");
}

/// `retry_on_status` accepts authentication statuses only; anything else stops both
/// `check` and `run`, naming the key.
#[test]
fn retry_on_status_outside_401_403_407_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    for list in ["[503]", "[401, 503]", "[500]"] {
        let path = dir.path().join("t.toml");
        let text = format!(
            "[providers.p]\nkind = \"oauth2\"\ntoken_url = \"http://127.0.0.1:9/t\"\nclient_id = \"a\"\n\
             client_secret = \"b\"\n[[routes]]\nupstream = \"http://127.0.0.1:9\"\nprovider = \"p\"\n\
             retry_on_status = {list}\n"
        );
        std::fs::write(&path, text).unwrap();
        for cmd in ["check", "run"] {
            let out = run_cli(&[cmd, "--config", path.to_str().unwrap()], dir.path());
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{cmd} {list}: {err}");
            assert!(err.contains("routes.0.retry_on_status") && err.contains("authentication status"), "{cmd}: {err}");
        }
    }
    let path = dir.path().join("ok.toml");
    std::fs::write(
        &path,
        "[providers.p]\nkind = \"oauth2\"\ntoken_url = \"http://127.0.0.1:9/t\"\nclient_id = \"a\"\n\
         client_secret = \"b\"\n[[routes]]\nupstream = \"http://127.0.0.1:9\"\nprovider = \"p\"\n\
         retry_on_status = [401, 403, 407]\n",
    )
    .unwrap();
    let out = run_cli(&["check", "--config", path.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}
