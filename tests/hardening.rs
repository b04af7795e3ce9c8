//! Requests that could have succeeded must succeed: recovery right after a long IdP
//! outage, clocks that jump, readiness that does not take a whole Service down.

mod support;

use std::time::{Duration, Instant};

use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn after_a_long_outage_waiting_requests_are_served_within_backoff_min_of_the_heal() {
    let (idp, upstream, _ledger) = oauth2_doubles(IdpConfig::default()).await;
    idp.set_mode(Mode::Status(503, "temporarily_unavailable"));
    // backoff_max is far beyond what the test waits for after the heal.
    let cfg = oauth2_config(&idp, &upstream, "", "token_wait = \"1s\"")
        .replace("backoff_min = \"100ms\"", "backoff_min = \"500ms\"")
        .replace("backoff_max = \"1s\"", "backoff_max = \"30s\"");
    let tg = Tollgate::start(&cfg);
    tg.wait_healthy().await;
    // 20 s of outage with requests arriving all along: the backoff grows past 8 s.
    let outage = Instant::now();
    let c = client();
    while outage.elapsed() < Duration::from_secs(20) {
        let r = c.get(tg.url("/during")).send().await.expect("request");
        assert_eq!(r.status(), 503, "no token can be had during the outage");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let calls_during = idp.count();
    // At most one token request per backoff_min however many requests waited (about 200).
    assert!(calls_during <= 20 * 2 + 2, "the IdP was flooded: {calls_during} requests in 20 s");
    assert!(tg.logs().contains("token request failed"));
    idp.set_mode(Mode::Normal);
    let healed = Instant::now();
    loop {
        let r = c.get(tg.url("/after")).send().await.expect("request");
        if r.status() == 200 {
            break;
        }
        assert!(
            healed.elapsed() < Duration::from_millis(500) + Duration::from_secs(1),
            "no success {:?} after the heal ({})",
            healed.elapsed(),
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(upstream.seen().iter().all(|s| s.accepted));
}

async fn readyz(tg: &Tollgate) -> u16 {
    client().get(tg.admin_url("/readyz")).send().await.expect("readyz").status().as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_is_a_start_up_gate_by_default_and_a_steady_state_check_on_request() {
    for (extra_admin, ready_after_expiry) in [("", 200), ("ready_requires = \"always\"", 503)] {
        let (idp, upstream, _ledger) =
            oauth2_doubles(IdpConfig { lifetime: Duration::from_secs(2), ..IdpConfig::default() }).await;
        idp.set_mode(Mode::Status(503, "temporarily_unavailable"));
        let cfg = oauth2_config(&idp, &upstream, "expiry_margin = \"100ms\"", "token_wait = \"200ms\"")
            .replace("[admin]\n", &format!("[admin]\n{extra_admin}\n"));
        let tg = Tollgate::start(&cfg);
        tg.wait_healthy().await;
        // No traffic before the first token, in both modes.
        assert_eq!(readyz(&tg).await, 503);
        idp.set_mode(Mode::Normal);
        tg.wait_ready().await;
        // The IdP goes down and the token expires.
        idp.set_mode(Mode::Status(503, "temporarily_unavailable"));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(client().get(tg.url("/x")).send().await.unwrap().status(), 503, "no usable token");
        assert_eq!(readyz(&tg).await, ready_after_expiry, "ready_requires {extra_admin:?}");
    }
}

fn tnid_config(tnid: &tollgate_testkit::seeds::Tnid, upstream: &Upstream, route_extra: &str) -> String {
    let provider = format!(
        "[providers.p]\nkind = \"tnid\"\nbase_url = \"{}\"\ntelephone_number = \"3024343434333\"\nreauth_min_interval = \"100ms\"",
        tnid.url()
    );
    file_store_config(&provider, upstream, route_extra)
}

async fn tnid_login(tg: &Tollgate, tnid: &tollgate_testkit::seeds::Tnid) {
    let r = client().post(tg.admin_url("/admin/providers/p/login")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let otp = tnid.otp_for("3024343434333").expect("OTP sent");
    let r = client()
        .post(tg.admin_url("/admin/providers/p/login/code"))
        .body(format!(r#"{{"code":"{otp}"}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

async fn status(tg: &Tollgate, path: &str) -> u16 {
    client().get(tg.url(path)).send().await.unwrap().status().as_u16()
}

async fn state(tg: &Tollgate) -> String {
    let v: serde_json::Value = tg.admin_get("/admin/providers/p").await.json().await.unwrap();
    v["state"].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_path_rejecting_a_human_token_never_ends_the_session_but_evidence_does() {
    let ledger = Ledger::default();
    let tnid = tollgate_testkit::seeds::Tnid::start(ledger.clone()).await.unwrap();
    let upstream = Upstream::start(Some(ledger.clone())).await.unwrap();
    let tg = Tollgate::start(&tnid_config(&tnid, &upstream, ""));
    tg.wait_healthy().await;
    tnid_login(&tg, &tnid).await;
    assert_eq!(status(&tg, "/ok").await, 200);
    // One path keeps answering a bare 401, another insufficient_scope, while the rest of
    // the API accepts the token: the rejections pass through, the session stays.
    for _ in 0..5 {
        assert_eq!(status(&tg, "/deny/bare/admin").await, 401);
        assert_eq!(status(&tg, "/deny/scope/admin").await, 401);
        assert_eq!(status(&tg, "/ok").await, 200);
    }
    // The same path again and again, with nothing in between, is still one path.
    for _ in 0..3 {
        assert_eq!(status(&tg, "/deny/bare/admin").await, 401);
    }
    assert_eq!(status(&tg, "/ok").await, 200);
    assert_eq!(state(&tg).await, "valid");
    assert_eq!(tnid.calls("/auth/token"), 1, "no new login was needed");
    let stored = std::fs::read_to_string(tg.dir.path().join("tokens.json")).unwrap();
    let token = upstream.seen().last().unwrap().bearer().unwrap().to_string();
    assert!(stored.contains(&token), "the token is still in the store");
    assert!(tg.metric("tollgate_upstream_insufficient_scope_total{route=\"api\"}").await >= 5.0);
    // Evidence that the token is dead everywhere: two paths reject it with no success
    // in between. Then a login is asked for.
    assert_eq!(status(&tg, "/deny/bare/a").await, 401);
    assert_eq!(status(&tg, "/deny/bare/b").await, 401);
    assert_eq!(status(&tg, "/ok").await, 503, "login_required");
    assert_eq!(state(&tg).await, "awaiting_code");
    // RFC 6750 invalid_token ends it at once.
    tokio::time::sleep(Duration::from_millis(200)).await;
    tnid_login(&tg, &tnid).await;
    assert_eq!(status(&tg, "/ok").await, 200);
    ledger.revoke(upstream.seen().last().unwrap().bearer().unwrap());
    assert_eq!(status(&tg, "/ok").await, 401);
    assert_eq!(status(&tg, "/ok").await, 503);
    assert_eq!(state(&tg).await, "awaiting_code");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_probe_tells_a_dead_token_from_a_forbidden_path() {
    for (probe, ends) in [("/ok/probe", false), ("/deny/bare/probe", true)] {
        let ledger = Ledger::default();
        let tnid = tollgate_testkit::seeds::Tnid::start(ledger.clone()).await.unwrap();
        let upstream = Upstream::start(Some(ledger.clone())).await.unwrap();
        let tg = Tollgate::start(&tnid_config(&tnid, &upstream, &format!("session_probe = \"{probe}\"")));
        tg.wait_healthy().await;
        tnid_login(&tg, &tnid).await;
        assert_eq!(status(&tg, "/deny/bare/admin").await, 401);
        // The probe runs in the background; give it a moment.
        let deadline = Instant::now() + Duration::from_secs(3);
        while !upstream.seen().iter().any(|s| s.path == probe) {
            assert!(Instant::now() < deadline, "the probe was never sent");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let probe_seen = upstream.seen().into_iter().find(|s| s.path == probe).unwrap();
        assert!(probe_seen.bearer().is_some(), "the probe carries the token");
        assert!(probe_seen.header("x-tollgate-probe").is_none(), "the marker never reaches the upstream");
        let expected = if ends { "awaiting_code" } else { "valid" };
        assert_eq!(state(&tg).await, expected, "probe {probe}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn graphql_unauthenticated_on_two_paths_ends_a_human_session_but_on_one_does_not() {
    let ledger = Ledger::default();
    let tnid = tollgate_testkit::seeds::Tnid::start(ledger.clone()).await.unwrap();
    let upstream = Upstream::start(Some(ledger.clone())).await.unwrap();
    let tg = Tollgate::start(&tnid_config(&tnid, &upstream, "graphql_unauthenticated = true"));
    tg.wait_healthy().await;
    tnid_login(&tg, &tnid).await;
    // One GraphQL endpoint keeps saying UNAUTHENTICATED while the rest works.
    for _ in 0..3 {
        assert_eq!(status(&tg, "/graphql-unauthenticated/a").await, 200);
        assert_eq!(status(&tg, "/ok").await, 200);
    }
    assert_eq!(state(&tg).await, "valid");
    // Two of them, with no success in between: the session is over.
    assert_eq!(status(&tg, "/graphql-unauthenticated/a").await, 200);
    assert_eq!(status(&tg, "/graphql-unauthenticated/b").await, 200);
    assert_eq!(status(&tg, "/ok").await, 503);
    assert_eq!(state(&tg).await, "awaiting_code");
}
