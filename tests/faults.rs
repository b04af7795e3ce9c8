//! Identity-provider faults: a client keeps sending requests while the token endpoint
//! refuses connections, fails, hangs and answers garbage.

mod support;

use std::time::{Duration, Instant};

use support::*;

async fn force_refresh(tg: &Tollgate) -> u16 {
    client().post(tg.admin_url("/admin/providers/backend/refresh")).send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn idp_faults_with_a_valid_token_fail_no_request_then_503_then_recover() {
    let (idp, upstream, _ledger) =
        oauth2_doubles(IdpConfig { lifetime: Duration::from_secs(8), ..IdpConfig::default() }).await;
    let tg = Tollgate::start(&oauth2_config(&idp, &upstream, "expiry_margin = \"1s\"", "token_wait = \"300ms\""));
    tg.wait_ready().await;
    let traffic = Traffic::start(&tg);

    // Each fault, forced through the admin API while the 8 s token is still valid.
    idp.stop();
    assert_eq!(force_refresh(&tg).await, 502, "connection refused is a failed refresh");
    idp.restart().await.unwrap();
    idp.set_mode(Mode::Status(500, "server_error"));
    assert_eq!(force_refresh(&tg).await, 502);
    idp.set_mode(Mode::Hang);
    assert_eq!(force_refresh(&tg).await, 502, "a hanging IdP times out (provider timeout 1 s)");
    idp.set_mode(Mode::Garbage);
    assert_eq!(force_refresh(&tg).await, 502, "a 200 with garbage is a failed refresh");

    let (ok, bad, firsts) = traffic.finish().await;
    assert_eq!(bad, 0, "no client request may fail while a valid token exists: {firsts:?}");
    assert!(ok > 50);
    let m = tg.metrics().await;
    for class in ["connect", "server_error", "timeout", "malformed"] {
        let v = metric_value(&m, &format!("tollgate_token_fetch_total{{outcome=\"{class}\",provider=\"backend\"}}"));
        assert!(v >= 1.0, "{class} must be counted:\n{m}");
    }
    let providers: serde_json::Value =
        client().get(tg.admin_url("/admin/providers")).send().await.unwrap().json().await.unwrap();
    assert_eq!(providers["providers"][0]["state"], "degraded");
    assert_eq!(providers["providers"][0]["last_error"]["class"], "malformed");

    // Let the token run out while the IdP keeps failing: 503 with a JSON body.
    idp.set_mode(Mode::Status(503, "temporarily_unavailable"));
    let deadline = Instant::now() + Duration::from_secs(15);
    let resp = loop {
        let r = client().get(tg.url("/after-expiry")).send().await.unwrap();
        if r.status() != 200 {
            break r;
        }
        assert!(Instant::now() < deadline, "token never stopped being injected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("retry-after").is_some());
    assert_eq!(resp.headers().get("content-type").unwrap(), "application/json");
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "token_unavailable");
    assert_eq!(body["provider"], "backend");
    assert!(upstream.seen().iter().all(|s| s.accepted), "no expired token may reach the upstream");
    // Readiness is a start-up gate by default (`admin.ready_requires = "startup"`): the
    // replica stays in its Service, and the body says the provider holds no valid token.
    let ready = client().get(tg.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.json::<serde_json::Value>().await.unwrap()["all_providers_valid"], false);

    // Heal: requests succeed again within the backoff bound (backoff_max 1 s).
    idp.set_mode(Mode::Normal);
    let healed = Instant::now();
    loop {
        let r = client().get(tg.url("/healed")).send().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(healed.elapsed() < Duration::from_secs(5), "no recovery within the backoff bound");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(upstream.seen().iter().all(|s| s.accepted));
}

#[tokio::test(flavor = "multi_thread")]
async fn refresh_token_grant_is_used_and_invalid_grant_falls_back_to_password() {
    let cfg = IdpConfig {
        lifetime: Duration::from_secs(2),
        username: Some("someone@example.com".into()),
        password: Some("def56789".into()),
        ..IdpConfig::default()
    };
    let (idp, upstream, _ledger) = oauth2_doubles(cfg).await;
    let extra =
        "grant = \"password\"\nusername = \"someone@example.com\"\npassword = \"def56789\"\nencoding = \"json\"";
    let tg = Tollgate::start(&oauth2_config(&idp, &upstream, extra, ""));
    tg.wait_ready().await;
    let c = client();
    let wait_for = |grant: &'static str, n: usize| {
        let idp = idp.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while idp.count_grant(grant) < n {
                assert!(
                    Instant::now() < deadline,
                    "never saw {n} {grant} requests: {:?}",
                    idp.seen().iter().map(|s| s.grant().to_string()).collect::<Vec<_>>()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_for("refresh_token", 1).await;
    let seen = idp.seen();
    assert_eq!(seen[0].grant(), "password");
    assert!(seen[0].content_type.starts_with("application/json"), "seed 002 wants JSON bodies");
    let refresh = seen.iter().find(|s| s.grant() == "refresh_token").unwrap();
    assert_eq!(refresh.params.get("client_id").map(String::as_str), Some("abc123"));
    assert!(refresh.params.get("refresh_token").is_some_and(|r| r.starts_with("rt-")));

    idp.reject_refresh(true);
    wait_for("password", 2).await;
    for _ in 0..5 {
        assert_eq!(c.get(tg.url("/x")).send().await.unwrap().status(), 200);
    }
    assert!(upstream.seen().iter().all(|s| s.accepted));
    let m = tg.metrics().await;
    assert!(metric_value(&m, "tollgate_token_fetch_total{outcome=\"invalid_grant\",provider=\"backend\"}") >= 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn client_secret_basic_is_sent_form_encoded() {
    let cfg = IdpConfig { client_id: "my client".into(), client_secret: "s:e+c%r t".into(), ..IdpConfig::default() };
    let (idp, upstream, _ledger) = oauth2_doubles(cfg).await;
    let text = oauth2_config(&idp, &upstream, "client_auth = \"client_secret_basic\"\nscope = \"read write\"", "")
        .replace("client_id = \"abc123\"", "client_id = \"my client\"")
        .replace("client_secret = \"456789\"", "client_secret = { env = \"TG_TEST_SECRET\" }");
    let tg = Tollgate::start_with_env(&text, &[("TG_TEST_SECRET", "s:e+c%r t")]);
    tg.wait_ready().await;
    let seen = idp.seen();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].authorization.as_deref().is_some_and(|a| a.starts_with("Basic ")));
    assert!(!seen[0].params.contains_key("client_secret"), "basic auth must not also send the secret in the body");
    assert_eq!(seen[0].params.get("scope").map(String::as_str), Some("read write"));
    assert_eq!(client().get(tg.url("/")).send().await.unwrap().status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_client_secret_is_classified_and_answered_503() {
    let (idp, upstream, _ledger) = oauth2_doubles(IdpConfig::default()).await;
    let text = oauth2_config(&idp, &upstream, "", "token_wait = \"2s\"")
        .replace("client_secret = \"456789\"", "client_secret = \"wrong\"");
    let tg = Tollgate::start(&text);
    tg.wait_healthy().await;
    let r = client().get(tg.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["reason"], "invalid_client");
    assert_eq!(upstream.count(), 0, "the upstream is not contacted without a token");
    assert!(tg.metric("tollgate_token_fetch_total{outcome=\"invalid_client\",provider=\"backend\"}").await >= 1.0);
    assert!(tg.logs().contains("invalid_client"));
}

/// The rest of the fault matrix, with traffic running throughout: every fault is a
/// classified, counted failure; no client request fails while the token is valid; a
/// 429's Retry-After is honoured; secrets and tokens stay out of the logs.
#[tokio::test(flavor = "multi_thread")]
async fn fault_matrix_rate_limit_redirect_oversize_and_bad_expiry() {
    let cfg =
        IdpConfig { lifetime: Duration::from_secs(30), client_secret: "cs-MATRIX-77".into(), ..IdpConfig::default() };
    let (idp, upstream, ledger) = oauth2_doubles(cfg).await;
    let text = oauth2_config(&idp, &upstream, "", "")
        .replace("client_secret = \"456789\"", "client_secret = \"cs-MATRIX-77\"");
    let tg = Tollgate::start(&text);
    tg.wait_ready().await;
    let traffic = Traffic::start(&tg);

    let faults: Vec<(Mode, &str)> = vec![
        (Mode::Redirect, "rejected"),
        (Mode::Huge, "malformed"),
        (Mode::ExpiresIn(serde_json::json!(0)), "malformed"),
        (Mode::ExpiresIn(serde_json::json!(-5)), "malformed"),
        (Mode::ExpiresIn(serde_json::json!("soon")), "malformed"),
        (Mode::Status(400, "invalid_grant"), "invalid_grant"),
        (Mode::Status(401, "invalid_client"), "invalid_client"),
        (Mode::Status(403, "unauthorized_client"), "rejected"),
        (Mode::Status(502, "bad_gateway"), "server_error"),
    ];
    for (mode, class) in faults {
        let series = format!("tollgate_token_fetch_total{{outcome=\"{class}\",provider=\"backend\"}}");
        let before = tg.metric(&series).await;
        idp.set_mode(mode.clone());
        assert_eq!(force_refresh(&tg).await, 502, "{mode:?} must fail the refresh");
        assert!(tg.metric(&series).await > before, "{mode:?} must be counted as {class}");
    }

    // 429 with Retry-After: 2 — the next attempt waits at least that long.
    idp.set_mode(Mode::RateLimited(2));
    assert_eq!(force_refresh(&tg).await, 502);
    let limited_at = Instant::now();
    let n = idp.count();
    idp.set_mode(Mode::Normal);
    let deadline = Instant::now() + Duration::from_secs(10);
    while idp.count() == n {
        assert!(Instant::now() < deadline, "never retried after the 429");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        limited_at.elapsed() >= Duration::from_millis(1900),
        "Retry-After ignored: retried after {:?}",
        limited_at.elapsed()
    );
    assert!(tg.metric("tollgate_token_fetch_total{outcome=\"rate_limited\",provider=\"backend\"}").await >= 1.0);

    // An absurd expires_in is capped, not trusted and not an error.
    idp.set_mode(Mode::ExpiresIn(serde_json::json!(1e12)));
    assert_eq!(force_refresh(&tg).await, 200);
    let p: serde_json::Value =
        client().get(tg.admin_url("/admin/providers/backend")).send().await.unwrap().json().await.unwrap();
    assert!(p["token"]["expires_in_s"].as_u64().unwrap() <= 24 * 3600, "capped at max_lifetime: {p}");
    idp.set_mode(Mode::Normal);

    let (ok, bad, firsts) = traffic.finish().await;
    assert_eq!(bad, 0, "no client request may fail while a valid token exists: {firsts:?}");
    assert!(ok > 50);
    assert!(upstream.seen().iter().all(|s| s.accepted));
    let logs = tg.logs();
    for secret in ledger.all().iter().map(String::as_str).chain(["cs-MATRIX-77"]) {
        assert!(!logs.contains(secret), "logs leak {secret}");
    }
    for line in logs.lines().filter(|l| l.contains("token request failed")) {
        assert!(line.contains("class="), "failure lines carry the class: {line}");
    }
}
