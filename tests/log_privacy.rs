//! No query string in any log line: pingora's own "Fail to proxy" lines name the request,
//! and tollgate's request summary gives them the path alone, as the access log does.

mod support;

use std::time::Duration;

use support::*;
use tollgate_testkit::upstream::{RawBehaviour, RawUpstream};

const QUERY: &str = "?ssn=123-45-6789&api_key=QUERYSECRET";

#[tokio::test(flavor = "multi_thread")]
async fn no_query_string_in_any_log_line_during_upstream_failures() {
    let refused = free_port(); // nothing listens there
    let midway = RawUpstream::start(RawBehaviour::CloseMidResponse).await.unwrap();
    let stale = RawUpstream::start(RawBehaviour::ForgetIdleAfter(Duration::from_millis(200))).await.unwrap();
    let tg = Tollgate::start(&format!(
        r#"
[proxy]
listen = "{{PROXY}}"
access_log = true

[admin]
listen = "{{ADMIN}}"

[[routes]]
name = "refused"
path_prefix = "/refused"
upstream = "http://{refused}"

[[routes]]
name = "midway"
path_prefix = "/midway"
upstream = "{midway}"

[[routes]]
name = "stale"
path_prefix = "/stale"
upstream = "{stale}"
"#,
        midway = midway.url(),
        stale = stale.url(),
    ));
    tg.wait_ready().await; // TOLLGATE_LOG=debug
    let c = client();

    let r = c.get(tg.url(&format!("/refused/x{QUERY}"))).send().await.unwrap();
    assert_eq!(r.status(), 502);
    let r = c.post(tg.url(&format!("/refused/y{QUERY}"))).body("b").send().await.unwrap();
    assert_eq!(r.status(), 502);

    // The upstream closes after 10 of 100 promised bytes: the client sees a cut body.
    let r = c.get(tg.url(&format!("/midway/z{QUERY}"))).send().await.unwrap();
    assert!(r.bytes().await.is_err(), "the body is cut short");

    // A forgotten pooled connection: pingora logs the retry it makes.
    assert_eq!(c.get(tg.url(&format!("/stale/warm{QUERY}"))).send().await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(c.get(tg.url(&format!("/stale/again{QUERY}"))).send().await.unwrap().status(), 200);
    assert_eq!(stale.resets(), 1, "the retry happened");
    assert!(stale.seen().iter().all(|s| s.target.ends_with(QUERY)), "the query still reaches the upstream");

    tokio::time::sleep(Duration::from_millis(300)).await;
    let logs = tg.logs();
    let failures: Vec<&str> = logs.lines().filter(|l| l.contains("Fail to proxy")).collect();
    for path in ["GET /refused/x,", "POST /refused/y,", "GET /midway/z,", "GET /stale/again,"] {
        assert!(failures.iter().any(|l| l.contains(path)), "a failure line names `{path}` without its query:\n{logs}");
    }
    for line in logs.lines() {
        for secret in ["QUERYSECRET", "123-45-6789", "ssn="] {
            assert!(!line.contains(secret), "a log line carries the query string: {line}");
        }
    }
}
