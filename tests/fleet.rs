//! Fleet mode against a real `redis-server`: replicas share tokens and human logins and
//! make one token request between them. Every assertion counts what the token-endpoint
//! double actually received and what the upstream double accepted.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::redis::{RedisServer, SentinelServer};
use support::*;
use tollgate_testkit::seeds::Tnid;

/// Each test runs up to 8 tollgate processes and asserts on timing: one at a time, so
/// that they do not compete for this machine's two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A 32-byte store key, base64 (test value only).
const STORE_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

/// The `[store]` table: a Redis at `url`, or found through the sentinel at `sentinel`.
fn store_table(url: Option<&str>, sentinel: Option<&str>) -> String {
    let mut s = String::from("\n[store]\nkind = \"redis\"\n");
    if let Some(u) = url {
        s.push_str(&format!("url = \"{u}\"\n"));
    }
    // Generous bounds: 8 processes start at once on a 2-core machine, and a Redis call
    // that times out makes a replica fall back to fetching alone (a second request).
    s.push_str(&format!("encryption_keys = [\"{STORE_KEY}\"]\nlease_ttl = \"3s\"\ntimeout = \"2s\"\n"));
    if let Some(n) = sentinel {
        s.push_str(&format!("[store.sentinel]\nmaster = \"mymaster\"\nnodes = [\"{n}\"]\n"));
    }
    s
}

fn fleet_config(idp: &Idp, upstream: &Upstream, redis_url: &str, extra_provider: &str) -> String {
    let mut cfg = oauth2_config(idp, upstream, extra_provider, "token_wait = \"5s\"");
    cfg.push_str(&store_table(Some(redis_url), None));
    cfg
}

async fn start_fleet(n: usize, cfg: &str) -> Vec<Tollgate> {
    let fleet: Vec<Tollgate> = (0..n).map(|_| Tollgate::start(cfg)).collect();
    for t in &fleet {
        t.wait_healthy().await;
    }
    fleet
}

async fn all_ready(fleet: &[Tollgate]) {
    for t in fleet {
        t.wait_ready().await;
    }
}

/// Start traffic on every replica.
fn traffic(fleet: &[Tollgate], secs: u64) -> Vec<Traffic> {
    fleet.iter().map(|t| Traffic::start_bounded(t, Duration::from_secs(secs), 20_000)).collect()
}

async fn finish(traffic: Vec<Traffic>) -> (u32, u32, Vec<String>) {
    let (mut ok, mut bad, mut firsts) = (0, 0, Vec::new());
    for t in traffic {
        let (o, b, f) = t.finish().await;
        ok += o;
        bad += b;
        firsts.extend(f);
    }
    (ok, bad, firsts)
}

/// Every key and value in Redis, as text (strings and hashes, which is all the store writes).
fn redis_dump(redis: &RedisServer) -> Vec<(String, String)> {
    let mut conn = redis.conn();
    let keys: Vec<String> = ::redis::cmd("KEYS").arg("*").query(&mut conn).expect("KEYS");
    let mut out = Vec::new();
    for k in keys {
        let kind: String = ::redis::cmd("TYPE").arg(&k).query(&mut conn).expect("TYPE");
        let value = match kind.as_str() {
            "string" => {
                let v: Vec<u8> = ::redis::cmd("GET").arg(&k).query(&mut conn).unwrap_or_default();
                String::from_utf8_lossy(&v).into_owned()
            }
            "hash" => {
                let v: Vec<Vec<u8>> = ::redis::cmd("HGETALL").arg(&k).query(&mut conn).unwrap_or_default();
                v.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect::<Vec<_>>().join(" ")
            }
            other => panic!("unexpected Redis type {other} for key {k}"),
        };
        out.push((k, value));
    }
    out
}

/// Nothing secret in any key or value: no issued token, refresh token or client secret.
fn assert_nothing_plain(redis: &RedisServer, secrets: &[String]) {
    let dump = redis_dump(redis);
    assert!(!dump.is_empty(), "the store wrote nothing");
    for (k, v) in &dump {
        for s in secrets.iter().filter(|s| s.len() >= 6) {
            assert!(!k.contains(s.as_str()), "a secret in a Redis key");
            assert!(!v.contains(s.as_str()), "a secret in plaintext in Redis under {k}");
        }
    }
}

/// Token requests made alone because Redis could not be reached in time, fleet-wide.
async fn fallbacks(fleet: &[Tollgate]) -> f64 {
    let mut n = 0.0;
    for t in fleet {
        n += t.metric("tollgate_fleet_fallback_total{provider=\"backend\"}").await;
    }
    n
}

/// Times of the token requests the double saw, sorted.
fn request_times(idp: &Idp) -> Vec<Instant> {
    let mut t: Vec<Instant> = idp.seen().iter().map(|s| s.at).collect();
    t.sort();
    t
}

#[tokio::test(flavor = "multi_thread")]
async fn eight_replicas_make_one_token_request_from_cold_and_one_per_lifetime() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let (idp, upstream, ledger) =
        oauth2_doubles(IdpConfig { lifetime: Duration::from_secs(4), ..IdpConfig::default() }).await;
    let cfg = fleet_config(&idp, &upstream, &redis.url(), "refresh_before = \"1s\"\nexpiry_margin = \"200ms\"");
    let fleet = start_fleet(8, &cfg).await;
    // Traffic on all eight from the cold start: the first requests wait for the token.
    let load = traffic(&fleet, 40);
    all_ready(&fleet).await;
    // One request from cold; on a loaded machine readiness can take longer than the first
    // token's refresh point (3 s), so a second, scheduled request may already be there.
    let cold = request_times(&idp);
    let burst = cold.iter().filter(|t| **t - cold[0] < Duration::from_millis(1500)).count();
    assert_eq!(burst, 1, "a cold fleet of 8 made one token request (fallbacks: {})", fallbacks(&fleet).await);
    tokio::time::sleep(Duration::from_secs(20)).await;
    let (ok, bad, firsts) = finish(load).await;
    assert_eq!(bad, 0, "failed client requests: {firsts:?}");
    assert!(ok > 500, "traffic ran ({ok})");
    assert!(upstream.seen().iter().all(|s| s.accepted), "the upstream saw an expired or unknown token");
    // 4 s tokens refreshed about every 3 s for 5 lifetimes: one request per cycle for the
    // fleet. Two replicas refreshing the same cycle would show as requests close together.
    let times = request_times(&idp);
    assert!((6..=10).contains(&times.len()), "token requests over 5 lifetimes: {}", times.len());
    for w in times.windows(2) {
        assert!(w[1] - w[0] > Duration::from_millis(1500), "two token requests {:?} apart", w[1] - w[0]);
    }
    let mut secrets = ledger.all();
    secrets.push("456789".into());
    assert_nothing_plain(&redis, &secrets);
    // Where tokens came from is visible: one replica fetched each, the others shared.
    let mut shared = 0.0;
    for t in &fleet {
        shared += t.metric("tollgate_token_source_total{provider=\"backend\",source=\"shared\"}").await;
    }
    assert!(shared >= 7.0, "tokens shared between replicas: {shared}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rotating_refresh_tokens_across_eight_replicas_are_never_reused() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let (idp, upstream, ledger) = oauth2_doubles(IdpConfig {
        lifetime: Duration::from_secs(3),
        username: Some("someone@example.com".into()),
        password: Some("def56789".into()),
        reuse_detection: true,
        ..IdpConfig::default()
    })
    .await;
    let provider = "grant = \"password\"\nusername = \"someone@example.com\"\npassword = \"def56789\"\nrefresh_before = \"1s\"\nexpiry_margin = \"200ms\"";
    let cfg = fleet_config(&idp, &upstream, &redis.url(), provider);
    let fleet = start_fleet(8, &cfg).await;
    all_ready(&fleet).await;
    let load = traffic(&fleet, 30);
    tokio::time::sleep(Duration::from_secs(15)).await;
    let (ok, bad, firsts) = finish(load).await;
    assert_eq!(bad, 0, "failed client requests: {firsts:?}");
    assert!(ok > 500);
    assert_eq!(idp.invalid_grant_count(), 0, "a spent refresh token was presented");
    assert_eq!(idp.families_revoked(), 0);
    assert!(idp.count_grant("refresh_token") >= 3, "refreshes used the refresh token");
    assert_eq!(idp.count_grant("password"), 1, "one password grant for the fleet");
    assert!(upstream.seen().iter().all(|s| s.accepted));
    let mut secrets = ledger.all();
    secrets.extend(idp.live_refresh_tokens());
    secrets.push("def56789".into());
    secrets.push("456789".into());
    assert_nothing_plain(&redis, &secrets);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_401_storm_on_eight_replicas_costs_one_token_request() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let (idp, upstream, ledger) = oauth2_doubles(IdpConfig::default()).await;
    let cfg = fleet_config(&idp, &upstream, &redis.url(), "reauth_min_interval = \"100ms\"");
    let fleet = start_fleet(8, &cfg).await;
    all_ready(&fleet).await;
    assert_eq!(idp.count(), 1);
    // The token dies at the IdP: every replica's next request is rejected at once.
    ledger.revoke_all();
    let mut requests = Vec::new();
    for t in &fleet {
        for _ in 0..3 {
            let url = t.url("/storm");
            requests.push(tokio::spawn(async move { client().get(url).send().await.map(|r| r.status().as_u16()) }));
        }
    }
    for r in requests {
        assert_eq!(r.await.expect("task").expect("request"), 200, "replayed with the fleet's new token");
    }
    assert_eq!(idp.count(), 2, "one new token request for the whole fleet");
    // Everyone serves the new token now.
    for t in &fleet {
        assert_eq!(client().get(t.url("/after")).send().await.unwrap().status(), 200);
    }
    assert_eq!(idp.count(), 2);
}

fn tnid_fleet_config(tnid: &Tnid, upstream: &Upstream, redis_url: &str) -> String {
    let mut cfg = format!(
        r#"
[proxy]
listen = "{{PROXY}}"
token_wait = "2s"
[admin]
listen = "{{ADMIN}}"
[providers.p]
kind = "tnid"
base_url = "{base}"
telephone_number = "3024343434333"
[[routes]]
name = "user"
path_prefix = "/user"
upstream = "{up}"
provider = "p"
"#,
        base = tnid.url(),
        up = upstream.url(),
    );
    cfg.push_str(&store_table(Some(redis_url), None));
    cfg
}

async fn admin_post(t: &Tollgate, path: &str, body: &str) -> (u16, Value) {
    let r = client().post(t.admin_url(path)).body(body.to_string()).send().await.expect("admin request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn one_human_login_serves_the_fleet_across_replicas_and_rollouts() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let ledger = Ledger::default();
    let tnid = Tnid::start(ledger.clone()).await.unwrap();
    let upstream = Upstream::start(Some(ledger.clone())).await.unwrap();
    let cfg = tnid_fleet_config(&tnid, &upstream, &redis.url());
    let mut fleet = start_fleet(8, &cfg).await;
    for t in &fleet {
        let state = t.admin_get("/admin/providers/p").await.json::<Value>().await.unwrap()["state"].clone();
        assert_eq!(state, "awaiting_code");
    }
    // The login starts on replica 1; the human types the code into replica 5.
    let (status, body) = admin_post(&fleet[0], "/admin/providers/p/login", "").await;
    assert_eq!(status, 200, "{body}");
    let otp = tnid.otp_for("3024343434333").expect("OTP sent");
    let (status, body) =
        admin_post(&fleet[4], "/admin/providers/p/login/code", &format!(r#"{{"code":"{otp}"}}"#)).await;
    assert_eq!(status, 200, "{body}");
    let done = Instant::now();
    for t in &fleet {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let s = client().get(t.url("/user")).send().await.unwrap().status();
            if s == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "a replica did not serve the shared login: {s}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(done.elapsed() < Duration::from_secs(2), "all eight served within {:?}", done.elapsed());
    assert_eq!(tnid.calls("/auth/token"), 1);
    // A ninth replica started later serves the token without a login.
    let ninth = Tollgate::start(&cfg);
    ninth.wait_ready().await;
    assert_eq!(client().get(ninth.url("/user")).send().await.unwrap().status(), 200);
    fleet.push(ninth);
    // A rollout: every process replaced, one by one. No human needed.
    for t in fleet.iter_mut() {
        t.restart_hard();
        t.wait_ready().await;
        assert_eq!(client().get(t.url("/user")).send().await.unwrap().status(), 200);
    }
    assert_eq!(tnid.calls("/auth/token"), 1, "no new login after the rollout");
    assert_eq!(tnid.calls("/auth/create_user_otp"), 1);
    assert!(upstream.seen().iter().all(|s| s.accepted));
    let mut secrets = ledger.all();
    secrets.push(otp);
    assert_nothing_plain(&redis, &secrets);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fleet_converges_within_the_lease_time_after_the_lease_holder_is_killed() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let (idp, upstream, _ledger) = oauth2_doubles(IdpConfig::default()).await;
    let cfg = fleet_config(&idp, &upstream, &redis.url(), "");
    // The first replica takes the lease and hangs in a slow token request; kill -9 it.
    idp.set_delay(Duration::from_secs(5));
    let mut holder = Tollgate::start(&cfg);
    holder.wait_healthy().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let leases: Vec<String> = ::redis::cmd("KEYS").arg("*lease*").query(&mut redis.conn()).expect("KEYS");
        if !leases.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the first replica never took the lease");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    holder.kill_hard();
    idp.set_delay(Duration::ZERO);
    let started = Instant::now();
    let others = start_fleet(3, &cfg).await;
    all_ready(&others).await;
    // Lease 3 s (renewed until the kill), plus start-up and the token request.
    assert!(started.elapsed() < Duration::from_secs(7), "converged after {:?}", started.elapsed());
    // The dead holder's request may or may not have reached the double before the kill.
    assert!(idp.count() <= 2, "one request for the rest of the fleet: {}", idp.count());
    let leases: Vec<String> = ::redis::cmd("KEYS").arg("*lease*").query(&mut redis.conn()).expect("KEYS");
    assert!(leases.is_empty(), "the lease was released after the fleet's request");
    for t in &others {
        assert_eq!(client().get(t.url("/x")).send().await.unwrap().status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_down_then_back_empty_fails_no_request_and_bounds_token_requests() {
    let _serial = SERIAL.lock().await;
    let mut redis = RedisServer::start();
    let (idp, upstream, _ledger) =
        oauth2_doubles(IdpConfig { lifetime: Duration::from_secs(3), ..IdpConfig::default() }).await;
    let cfg = fleet_config(&idp, &upstream, &redis.url(), "refresh_before = \"1s\"\nexpiry_margin = \"200ms\"");
    let fleet = start_fleet(4, &cfg).await;
    all_ready(&fleet).await;
    let load = traffic(&fleet, 40);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = idp.count();
    redis.stop();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let apart = idp.count() - before;
    redis.restart();
    let back = Instant::now();
    tokio::time::sleep(Duration::from_secs(9)).await;
    let after = idp.count() - before - apart;
    let (ok, bad, firsts) = finish(load).await;
    assert_eq!(bad, 0, "failed client requests: {firsts:?}");
    assert!(ok > 500);
    assert!(upstream.seen().iter().all(|s| s.accepted));
    // Apart, each replica refreshes on its own: 3 s tokens, about one per 2.4 s each.
    assert!((4..=4 * 6).contains(&apart), "token requests while Redis was down: {apart}");
    // Back together: no burst, about one per cycle for the fleet (9 s: 3 to 4 cycles).
    let rejoin: Vec<Instant> = request_times(&idp).into_iter().filter(|t| *t > back).collect();
    let first_two_s = rejoin.iter().filter(|t| **t < back + Duration::from_secs(2)).count();
    assert!(first_two_s <= 4, "a burst after Redis came back: {first_two_s}");
    assert!(after <= 4 + 4, "token requests after Redis came back: {after}");
    assert!(fallbacks(&fleet).await >= 1.0, "the fallback is counted");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sentinel_failover_under_traffic_fails_no_request() {
    let _serial = SERIAL.lock().await;
    let primary = RedisServer::start();
    let replica = RedisServer::replica_of(&primary);
    let sentinel = SentinelServer::start("mymaster", &primary);
    let (idp, upstream, _ledger) =
        oauth2_doubles(IdpConfig { lifetime: Duration::from_secs(3), ..IdpConfig::default() }).await;
    let mut cfg =
        oauth2_config(&idp, &upstream, "refresh_before = \"1s\"\nexpiry_margin = \"200ms\"", "token_wait = \"5s\"");
    cfg.push_str(&store_table(None, Some(&sentinel.url())));
    let fleet = start_fleet(3, &cfg).await;
    all_ready(&fleet).await;
    let load = traffic(&fleet, 30);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut s = sentinel.conn();
    let _: String = ::redis::cmd("SENTINEL").arg("FAILOVER").arg("mymaster").query(&mut s).expect("failover");
    // Wait until the old replica is the primary.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let role: Vec<::redis::Value> = ::redis::cmd("ROLE").query(&mut replica.conn()).expect("ROLE");
        if matches!(role.first(), Some(::redis::Value::BulkString(b)) if b == b"master") {
            break;
        }
        assert!(Instant::now() < deadline, "the failover did not happen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (ok, bad, firsts) = finish(load).await;
    assert_eq!(bad, 0, "failed client requests: {firsts:?}");
    assert!(ok > 300);
    assert!(upstream.seen().iter().all(|s| s.accepted));
    // The fleet writes to the new primary.
    assert!(!redis_dump(&replica).is_empty(), "nothing written after the failover");
}
