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
