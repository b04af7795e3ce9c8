//! Pooled upstream connections: dropped after `proxy.upstream_idle_timeout`, before the
//! far end (a load balancer, a NAT) forgets them, and a request that meets a forgotten
//! one is retried when that is safe.

mod support;

use std::time::Duration;

use support::*;
use tollgate_testkit::upstream::{RawBehaviour, RawUpstream};

fn start(up: &RawUpstream, idle_timeout: &str) -> Tollgate {
    Tollgate::start(&format!(
        r#"
[proxy]
listen = "{{PROXY}}"
upstream_idle_timeout = "{idle_timeout}"

[admin]
listen = "{{ADMIN}}"

[[routes]]
name = "raw"
upstream = "{upstream}"
"#,
        upstream = up.url(),
    ))
}

/// The far end forgets a connection idle for 1 s, without a word; tollgate drops its idle
/// connections after 300 ms, so a POST after a quiet spell goes out on a new one.
#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_are_dropped_before_the_far_end_forgets_them() {
    let up = RawUpstream::start(RawBehaviour::ForgetIdleAfter(Duration::from_millis(1000))).await.unwrap();
    let tg = start(&up, "300ms");
    tg.wait_ready().await;
    let c = client();

    // Back to back, the pooled connection is reused.
    for i in 0..2 {
        let r = c.post(tg.url(&format!("/warm/{i}"))).body("w").send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(up.connections(), 1, "back-to-back requests share one pooled connection");

    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let r = c.post(tg.url(&format!("/orders/{round}"))).body(format!("order {round}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "round {round}; logs:\n{}", tg.logs());
    }
    assert_eq!(up.resets(), 0, "no request was sent into a forgotten connection");
    assert_eq!(up.connections(), 4, "each quiet spell ended with a new connection");
    let seen = up.seen();
    for round in 0..3 {
        let target = format!("/orders/{round}");
        let hits: Vec<_> = seen.iter().filter(|s| s.target == target).collect();
        assert_eq!(hits.len(), 1, "{target} reached the upstream once");
        assert_eq!((hits[0].method.as_str(), hits[0].body.as_slice()), ("POST", format!("order {round}").as_bytes()));
    }
}

/// With an idle timeout above the far end's, a request does meet a forgotten connection:
/// a GET is retried on a new connection and succeeds; a POST that was already sent is
/// not (the upstream may have acted on it) and gets a 502.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_meets_a_forgotten_connection_is_retried_when_safe() {
    let up = RawUpstream::start(RawBehaviour::ForgetIdleAfter(Duration::from_millis(300))).await.unwrap();
    let tg = start(&up, "10s");
    tg.wait_ready().await;
    let c = client();
    assert_eq!(c.get(tg.url("/warm")).send().await.unwrap().status(), 200);

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
}
