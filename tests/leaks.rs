//! Secrets and tokens must never appear in logs, metrics or admin responses, even at
//! debug level and through failures.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_or_token_in_logs_metrics_or_admin() {
    let cfg = IdpConfig {
        client_secret: "cs-LEAKCHECK-91a7".into(),
        username: Some("user@example.com".into()),
        password: Some("pw-LEAKCHECK-33f0".into()),
        lifetime: Duration::from_secs(2),
        token_prefix: "tokLEAK".into(),
        ..IdpConfig::default()
    };
    let (idp, upstream, ledger) = oauth2_doubles(cfg).await;
    let extra = "grant = \"password\"\nusername = \"user@example.com\"\npassword = { env = \"TG_PW\" }";
    let text = oauth2_config(&idp, &upstream, extra, "access_log = true")
        .replace("client_secret = \"456789\"", "client_secret = \"cs-LEAKCHECK-91a7\"")
        .replace("[admin]\nlisten = \"{ADMIN}\"", "[admin]\nlisten = \"{ADMIN}\"\ntoken = \"adm-LEAKCHECK-5521\"");
    let tg = Tollgate::start_with_env(&text, &[("TG_PW", "pw-LEAKCHECK-33f0"), ("TOLLGATE_LOG", "trace")]);
    tg.wait_ready().await;
    let c = client();
    let admin = |path: &str| c.get(tg.admin_url(path)).bearer_auth("adm-LEAKCHECK-5521");

    // Traffic, refreshes (with refresh tokens), a rejected refresh, IdP faults, a 401.
    for i in 0..30 {
        let _ = c.get(tg.url(&format!("/a/{i}?k=v"))).header("Authorization", "Bearer client-LEAKCHECK").send().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    idp.reject_refresh(true);
    idp.set_mode(Mode::Status(400, "invalid_grant"));
    let _ = c.post(tg.admin_url("/admin/providers/backend/refresh")).bearer_auth("adm-LEAKCHECK-5521").send().await;
    idp.set_mode(Mode::Garbage);
    let _ = c.post(tg.admin_url("/admin/providers/backend/refresh")).bearer_auth("adm-LEAKCHECK-5521").send().await;
    idp.set_mode(Mode::Normal);
    upstream.reject_next(1);
    let _ = c.get(tg.url("/rejected")).send().await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let metrics = admin("/metrics").send().await.unwrap().text().await.unwrap();
    let providers = admin("/admin/providers").send().await.unwrap().text().await.unwrap();
    assert!(providers.contains("backend"), "admin answered: {providers}");
    let readyz = c.get(tg.admin_url("/readyz")).send().await.unwrap().text().await.unwrap();
    let unauthorized = c.get(tg.admin_url("/metrics")).send().await.unwrap();
    assert_eq!(unauthorized.status(), 401, "admin token required on /metrics");
    let logs = tg.logs();
    assert!(logs.contains("token obtained"), "logs were captured");
    // access_log = true: one JSON line per proxied request, with the token's generation
    // and the path without its query string.
    let access: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("route").is_some())
        .collect();
    assert!(access.len() >= 30, "an access log line per request: {}", access.len());
    let line = access.iter().find(|v| v["path"] == "/a/3").expect("access line for /a/3");
    assert_eq!(
        (line["route"].as_str(), line["provider"].as_str(), line["status"].as_u64()),
        (Some("api"), Some("backend"), Some(200))
    );
    assert!(line["token_generation"].as_u64().is_some() && line["duration_ms"].as_f64().is_some());
    assert!(!logs.contains("k=v"), "the query string is not logged");

    let mut secrets: Vec<String> = vec![
        "cs-LEAKCHECK-91a7".into(),
        "pw-LEAKCHECK-33f0".into(),
        "adm-LEAKCHECK-5521".into(),
        "client-LEAKCHECK".into(),
    ];
    secrets.extend(ledger.all());
    secrets.extend(idp.seen().iter().filter_map(|s| s.params.get("refresh_token").cloned()));
    assert!(ledger.all().len() >= 3, "several tokens were issued");
    for (what, text) in [("logs", &logs), ("metrics", &metrics), ("admin providers", &providers), ("readyz", &readyz)] {
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "{what} contain a secret or token ({s})");
        }
    }
}
