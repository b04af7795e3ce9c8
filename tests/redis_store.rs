//! The Redis store against a real `redis-server` (and `redis-server --sentinel`),
//! started on free loopback ports by `support::redis`. What Redis holds is inspected
//! directly, not through the store under test.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::sync::broadcast;
use tollgate::config::{RedisSettings, SentinelSettings};
use tollgate::secret::Secret;
use tollgate::store::{Fleet, FleetMessage, Lease, Loaded, RedisStore, Saved, StoreError, StoredToken, TokenStore};

use support::redis::{RedisServer, SentinelServer};

const PREFIX: &str = "tgtest:";
/// Identity hashes as the driver passes them (16 hex digits).
const K1: &str = "0f1e2d3c4b5a6978";
const K2: &str = "8796a5b4c3d2e1f0";

/// A 32-byte key, different per seed (not one byte repeated).
fn enc_key(seed: u8) -> Secret {
    let bytes: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(31).wrapping_add(seed.wrapping_mul(97)) ^ 0x5a).collect();
    Secret::new(base64::engine::general_purpose::STANDARD.encode(bytes))
}

fn settings(url: &str, keys: Vec<Secret>) -> RedisSettings {
    let mut s = tollgate::store::redis::settings(url, keys);
    s.key_prefix = PREFIX.into();
    s.timeout = Duration::from_millis(500);
    s.lease_ttl = Duration::from_secs(2);
    s
}

fn store(server: &RedisServer) -> RedisStore {
    RedisStore::connect(settings(&server.url(), vec![enc_key(1)])).expect("connect")
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn token(access: &str, refresh: Option<&str>, expires_in: Option<u64>) -> StoredToken {
    let mut vars = BTreeMap::new();
    if let Some(r) = refresh {
        vars.insert("refresh_token".to_string(), r.to_string());
    }
    StoredToken {
        fingerprint: "oauth2 https://idp.example.test/token client=svc-abc".into(),
        token: access.into(),
        issued_at: now(),
        expires_at: expires_in.map(|s| now() + s),
        scope: Some("read".into()),
        vars,
        extras: BTreeMap::new(),
    }
}

fn fleet(s: &RedisStore) -> &dyn Fleet {
    s.fleet().expect("the Redis store is a fleet store")
}

fn written(saved: Saved) -> u64 {
    match saved {
        Saved::Written(v) => v,
        other => panic!("expected a write, got {other:?}"),
    }
}

/// PTTL of a key, read directly from Redis (-1: no TTL, -2: absent).
fn pttl(server: &RedisServer, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query(&mut server.conn()).expect("PTTL")
}

/// Wait until `n` connections are subscribed to the store's channel (bounded).
async fn wait_subscribers(server: &RedisServer, n: i64) {
    let channel = format!("{PREFIX}events");
    let start = Instant::now();
    loop {
        let counts: Vec<(String, i64)> =
            redis::cmd("PUBSUB").arg("NUMSUB").arg(&channel).query(&mut server.conn()).expect("PUBSUB NUMSUB");
        if counts.first().is_some_and(|(_, c)| *c >= n) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{n} subscribers not seen on {channel}: {counts:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next message matching `want`, skipping others; panics after `limit`.
async fn expect_message(
    rx: &mut broadcast::Receiver<FleetMessage>,
    limit: Duration,
    want: impl Fn(&FleetMessage) -> bool,
) -> FleetMessage {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(m)) if want(&m) => return m,
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(e)) => panic!("message stream closed: {e}"),
            Err(_) => panic!("no matching message within {limit:?}"),
        }
    }
}

/// No message matching `unwanted` arrives within `window`.
async fn expect_no_message(
    rx: &mut broadcast::Receiver<FleetMessage>,
    window: Duration,
    unwanted: impl Fn(&FleetMessage) -> bool,
) {
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Ok(m)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        assert!(!unwanted(&m), "unexpected message {m:?}");
    }
}

#[tokio::test]
async fn compare_and_swap_and_versions_never_go_back() {
    let server = RedisServer::start();
    let s = store(&server);
    assert_eq!(s.load(K1).await.unwrap(), None);
    let v1 = written(s.save(K1, &token("a", None, Some(600)), 0).await.unwrap());
    assert!(v1 > 0);
    // A writer that believed the entry absent loses, and is told what is there.
    match s.save(K1, &token("dup", None, Some(600)), 0).await.unwrap() {
        Saved::Conflict(Some(Loaded { token, version })) => {
            assert_eq!((token.token.as_str(), version), ("a", v1));
        }
        other => panic!("expected a conflict with the entry, got {other:?}"),
    }
    match s.save(K1, &token("x", None, Some(600)), v1 + 1).await.unwrap() {
        Saved::Conflict(Some(Loaded { token, version })) => {
            assert_eq!((token.token.as_str(), version), ("a", v1), "a version ahead of the entry's matched");
        }
        other => panic!("expected a conflict with the entry, got {other:?}"),
    }
    let v2 = written(s.save(K1, &token("b", None, Some(600)), v1).await.unwrap());
    assert!(v2 > v1);
    assert!(!s.remove(K1, v1).await.unwrap(), "a stale version removes nothing");
    assert!(!s.remove(K1, 0).await.unwrap(), "0 names no entry");
    assert_eq!(s.load(K1).await.unwrap().map(|l| (l.token.token.clone(), l.version)), Some(("b".into(), v2)));
    assert!(s.remove(K1, v2).await.unwrap());
    assert_eq!(s.load(K1).await.unwrap(), None);
    assert!(!s.remove(K1, v2).await.unwrap(), "already removed");
    assert_eq!(s.save(K1, &token("c", None, Some(600)), v2).await.unwrap(), Saved::Conflict(None));
    let v3 = written(s.save(K1, &token("c", None, Some(600)), 0).await.unwrap());
    assert!(v3 > v2, "a deleted-and-rewritten entry reuses no version ({v3} after {v2})");
    assert!(!s.remove(K1, v2).await.unwrap(), "the old version does not match the new entry");
    // Another key has its own entry.
    assert_eq!(s.load(K2).await.unwrap(), None);
    // What Redis holds: the version and a sealed record, nothing else.
    let fields: BTreeMap<String, Vec<u8>> =
        redis::cmd("HGETALL").arg(format!("{PREFIX}token:{K1}")).query(&mut server.conn()).unwrap();
    assert_eq!(fields.keys().map(String::as_str).collect::<Vec<_>>(), ["s", "v"]);
    assert_eq!(fields["v"], v3.to_string().into_bytes());
}

#[tokio::test]
async fn ttl_follows_the_usable_life_only() {
    let server = RedisServer::start();
    let s = store(&server);
    let entry = format!("{PREFIX}token:{K1}");
    // Expires in 100 s, no refresh token: the entry lives as long as the token.
    let v = written(s.save(K1, &token("a", None, Some(100)), 0).await.unwrap());
    let ttl = pttl(&server, &entry);
    assert!((90_000..=100_000).contains(&ttl), "TTL {ttl} ms for a token usable 100 s");
    // Holds a refresh token: no TTL (the refresh token outlives the access token).
    let v = written(s.save(K1, &token("b", Some("r"), Some(100)), v).await.unwrap());
    assert_eq!(pttl(&server, &entry), -1, "an entry with a refresh token must not expire");
    // Back to an expiring token: the TTL is set again.
    let v = written(s.save(K1, &token("c", None, Some(50)), v).await.unwrap());
    let ttl = pttl(&server, &entry);
    assert!((40_000..=50_000).contains(&ttl), "TTL {ttl} ms for a token usable 50 s");
    // Never expires: the previous TTL is gone.
    written(s.save(K1, &token("d", None, None), v).await.unwrap());
    assert_eq!(pttl(&server, &entry), -1, "a token that never expires must not expire in Redis");
    // The version counter outlives entries.
    assert_eq!(pttl(&server, &format!("{PREFIX}ver:{K1}")), -1);
    // A fenced write follows the same rule.
    let lease = fleet(&s).try_lease(K2, Duration::from_secs(5)).await.unwrap().expect("lease");
    fleet(&s).save_fenced(K2, &token("e", None, Some(30)), &lease).await.unwrap().expect("written");
    let ttl = pttl(&server, &format!("{PREFIX}token:{K2}"));
    assert!((20_000..=30_000).contains(&ttl), "TTL {ttl} ms after a fenced write");
    let lease_ttl = pttl(&server, &format!("{PREFIX}lease:{K2}"));
    assert!((1..=5_000).contains(&lease_ttl), "lease TTL {lease_ttl}");
    // An entry whose token expired while it was stored is gone from Redis.
    let v = s.load(K1).await.unwrap().expect("entry").version;
    written(s.save(K1, &token("f", None, Some(1)), v).await.unwrap());
    let start = Instant::now();
    while s.load(K1).await.unwrap().is_some() {
        assert!(start.elapsed() < Duration::from_secs(5), "an expired entry stayed in Redis");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every key and every value in Redis, as (key, bytes of its value or fields).
fn dump(server: &RedisServer) -> Vec<(String, Vec<u8>)> {
    let mut conn = server.conn();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
    let mut out = Vec::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE").arg(&key).query(&mut conn).unwrap();
        let value: Vec<u8> = match kind.as_str() {
            "string" => redis::cmd("GET").arg(&key).query(&mut conn).unwrap(),
            "hash" => {
                let fields: Vec<Vec<u8>> = redis::cmd("HGETALL").arg(&key).query(&mut conn).unwrap();
                fields.concat()
            }
            other => panic!("unexpected key type {other} for {key}"),
        };
        out.push((key, value));
    }
    out
}

#[tokio::test]
async fn nothing_readable_in_redis() {
    let server = RedisServer::start();
    let s = store(&server);
    let mut rx = fleet(&s).subscribe();
    wait_subscribers(&server, 1).await;
    let access = "AT-0123-very-secret-access-token";
    let refresh = "RT-4567-very-secret-refresh-token";
    let interim = "ETNA-INTERIM-89ab-secret";
    let client_secret = "CS-cdef-client-secret";
    let mut t = token(access, Some(refresh), Some(600));
    t.vars.insert("client_secret".into(), client_secret.into());
    t.extras.insert("org_id".into(), "org-visible-only-sealed".into());
    let v = written(s.save(K1, &t, 0).await.unwrap());
    let lease = fleet(&s).try_lease(K2, Duration::from_secs(5)).await.unwrap().expect("lease");
    fleet(&s).save_fenced(K2, &t, &lease).await.unwrap().expect("fenced write");
    let pending: BTreeMap<String, String> = [("interim_token".to_string(), interim.to_string())].into();
    fleet(&s).save_pending(K1, &pending, Duration::from_secs(60)).await.unwrap();
    assert!(!fleet(&s).invalidate(K1, v + 1000).await.unwrap());

    let secrets = [access, refresh, interim, client_secret, "org-visible-only-sealed", "idp.example.test", "svc-abc"];
    let entries = dump(&server);
    let kinds: Vec<&str> = entries.iter().map(|(k, _)| k.split(':').nth(1).unwrap_or("")).collect();
    for want in ["token", "ver", "lease", "pending"] {
        assert!(kinds.contains(&want), "no {want} key in {:?}", entries.iter().map(|e| &e.0).collect::<Vec<_>>());
    }
    for (key, value) in &entries {
        let rest = key.strip_prefix(PREFIX).unwrap_or_else(|| panic!("key {key} outside the prefix"));
        let (_kind, id) = rest.split_once(':').unwrap_or_else(|| panic!("key {key} has no identity part"));
        assert!(id == K1 || id == K2, "key {key} names something other than an identity hash");
        let text = String::from_utf8_lossy(value);
        for secret in secrets {
            assert!(!text.contains(secret), "{key} holds `{secret}` in plaintext");
            assert!(!key.contains(secret));
        }
    }
    // The messages carry keys and versions only.
    let mut seen = 0;
    while let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
        let text = format!("{m:?}");
        for secret in secrets {
            assert!(!text.contains(secret), "message {text} holds a secret");
        }
        seen += 1;
    }
    assert!(seen >= 4, "only {seen} messages seen");
    // And the store reads it all back.
    let loaded = s.load(K1).await.unwrap().expect("entry");
    assert_eq!((loaded.token.token.as_str(), loaded.token.vars["refresh_token"].as_str()), (access, refresh));
    assert_eq!(fleet(&s).load_pending(K1).await.unwrap(), Some(pending));
}

#[tokio::test]
async fn key_rotation_and_identity_binding() {
    let server = RedisServer::start();
    let old = RedisStore::connect(settings(&server.url(), vec![enc_key(1)])).unwrap();
    let v = written(old.save(K1, &token("sealed-under-old", None, Some(600)), 0).await.unwrap());

    // A new first key: the old key still opens what it sealed, the new one seals.
    let rotated = RedisStore::connect(settings(&server.url(), vec![enc_key(2), enc_key(1)])).unwrap();
    let loaded = rotated.load(K1).await.unwrap().expect("readable after rotation");
    assert_eq!((loaded.token.token.as_str(), loaded.version), ("sealed-under-old", v));
    let v2 = written(rotated.save(K1, &token("sealed-under-new", None, Some(600)), v).await.unwrap());
    let raw: Vec<u8> =
        redis::cmd("HGET").arg(format!("{PREFIX}token:{K1}")).arg("s").query(&mut server.conn()).unwrap();
    let raw = String::from_utf8(raw).unwrap();
    assert_eq!(rotated.load(K1).await.unwrap().map(|l| l.version), Some(v2));
    // A process that only has the old key cannot read it: absent, not an error.
    assert_eq!(old.load(K1).await.unwrap(), None);

    // Only an unrelated key: unreadable, reported as absent.
    let stranger = RedisStore::connect(settings(&server.url(), vec![enc_key(3)])).unwrap();
    assert_eq!(stranger.load(K1).await.unwrap(), None);
    // … and a write that believed it absent replaces it rather than failing forever.
    let v3 = written(stranger.save(K1, &token("stranger", None, Some(600)), 0).await.unwrap());
    assert!(v3 > v2);
    assert_eq!(rotated.load(K1).await.unwrap(), None, "the stranger's key is not configured here");

    // A record copied under another identity does not open there (associated data).
    let mut conn = server.conn();
    redis::cmd("HSET")
        .arg(format!("{PREFIX}token:{K2}"))
        .arg("v")
        .arg("7")
        .arg("s")
        .arg(&raw)
        .query::<i64>(&mut conn)
        .unwrap();
    assert_eq!(rotated.load(K2).await.unwrap(), None, "a record moved to another identity opened");
    // A record changed by one byte does not open either.
    let mut forged = raw.clone().into_bytes();
    let i = forged.len() - 3;
    forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
    redis::cmd("HSET").arg(format!("{PREFIX}token:{K1}")).arg("s").arg(forged).query::<i64>(&mut conn).unwrap();
    assert_eq!(rotated.load(K1).await.unwrap(), None);
    redis::cmd("HSET").arg(format!("{PREFIX}token:{K1}")).arg("s").arg(&raw).query::<i64>(&mut conn).unwrap();
    assert_eq!(rotated.load(K1).await.unwrap().map(|l| l.token.token.clone()), Some("sealed-under-new".into()));
}

#[tokio::test]
async fn leases_are_exclusive_and_fence_writes() {
    let server = RedisServer::start();
    let a = store(&server);
    let b = store(&server);
    let ttl = Duration::from_millis(400);

    let la = fleet(&a).try_lease(K1, ttl).await.unwrap().expect("a takes the lease");
    assert_eq!(la.key, K1);
    assert_eq!(fleet(&b).try_lease(K1, ttl).await.unwrap(), None, "b must not get a held lease");
    // Another key's lease is independent.
    let lb2 = fleet(&b).try_lease(K2, ttl).await.unwrap().expect("another key");
    fleet(&b).release(&lb2).await.unwrap();

    // Renewing keeps it past its first TTL.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(fleet(&a).renew(&la, ttl).await.unwrap());
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(fleet(&b).try_lease(K1, ttl).await.unwrap(), None, "renewed lease expired");

    // Only the holder's fence releases it.
    let forged = Lease { key: K1.into(), fence: "0".repeat(32) };
    fleet(&b).release(&forged).await.unwrap();
    assert!(!fleet(&b).renew(&forged, ttl).await.unwrap());
    assert_eq!(fleet(&b).try_lease(K1, ttl).await.unwrap(), None, "a wrong fence released the lease");
    assert_eq!(fleet(&b).save_fenced(K1, &token("forged", None, Some(60)), &forged).await.unwrap(), None);
    assert_eq!(b.load(K1).await.unwrap(), None, "a write through a wrong fence landed");
    let v1 = fleet(&a).save_fenced(K1, &token("from-a", None, Some(60)), &la).await.unwrap().expect("holder writes");
    fleet(&a).release(&la).await.unwrap();
    let lb = fleet(&b).try_lease(K1, ttl).await.unwrap().expect("free after release");
    fleet(&b).release(&lb).await.unwrap();

    // A stale holder: a's lease expires, b takes it; a can neither renew, release nor write.
    let la = fleet(&a).try_lease(K1, Duration::from_millis(150)).await.unwrap().expect("a again");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lb = fleet(&b).try_lease(K1, Duration::from_secs(5)).await.unwrap().expect("b after expiry");
    assert!(!fleet(&a).renew(&la, ttl).await.unwrap(), "a renewed a lease it lost");
    fleet(&a).release(&la).await.unwrap();
    assert_eq!(fleet(&a).try_lease(K1, ttl).await.unwrap(), None, "a stale holder released b's lease");
    assert_eq!(fleet(&a).save_fenced(K1, &token("stale", None, Some(60)), &la).await.unwrap(), None);
    assert_eq!(a.load(K1).await.unwrap().map(|l| (l.token.token.clone(), l.version)), Some(("from-a".into(), v1)));
    // A lease guards its own key only.
    assert_eq!(fleet(&b).save_fenced(K2, &token("x", None, Some(60)), &lb).await.unwrap(), None);
    let v2 = fleet(&b).save_fenced(K1, &token("from-b", None, Some(60)), &lb).await.unwrap().expect("b writes");
    assert!(v2 > v1);
    assert_eq!(a.load(K1).await.unwrap().map(|l| (l.token.token.clone(), l.version)), Some(("from-b".into(), v2)));
    fleet(&b).release(&lb).await.unwrap();
}

#[tokio::test]
async fn invalidation_and_messages_reach_the_other_replica() {
    let server = RedisServer::start();
    let a = store(&server);
    let b = store(&server);
    let mut rx_b = fleet(&b).subscribe();
    let mut rx_a = fleet(&a).subscribe();
    wait_subscribers(&server, 2).await;
    let limit = Duration::from_secs(5);

    let v1 = written(a.save(K1, &token("g1", None, Some(600)), 0).await.unwrap());
    let m = expect_message(&mut rx_b, limit, |m| matches!(m, FleetMessage::Written { .. })).await;
    assert_eq!(m, FleetMessage::Written { key: K1.into(), version: v1 });
    // Our own messages come back too.
    expect_message(&mut rx_a, limit, |m| *m == FleetMessage::Written { key: K1.into(), version: v1 }).await;

    // A 401 on an older generation deletes nothing, but is still announced.
    assert!(!fleet(&a).invalidate(K1, v1 - 1).await.unwrap());
    assert_eq!(b.load(K1).await.unwrap().map(|l| l.version), Some(v1));
    let m = expect_message(&mut rx_b, limit, |m| matches!(m, FleetMessage::Invalidated { .. })).await;
    assert_eq!(m, FleetMessage::Invalidated { key: K1.into(), version: v1 - 1 });
    // On the generation the entry holds: deleted, and every replica hears of it.
    assert!(fleet(&a).invalidate(K1, v1).await.unwrap());
    assert_eq!(b.load(K1).await.unwrap(), None);
    let m = expect_message(&mut rx_b, limit, |m| matches!(m, FleetMessage::Invalidated { .. })).await;
    assert_eq!(m, FleetMessage::Invalidated { key: K1.into(), version: v1 });
    assert!(!fleet(&b).invalidate(K1, v1).await.unwrap(), "a second replica's 401 deletes nothing more");
    let m = expect_message(&mut rx_b, limit, |m| matches!(m, FleetMessage::Invalidated { .. })).await;
    assert_eq!(m, FleetMessage::Invalidated { key: K1.into(), version: v1 }, "announced again all the same");

    // A fenced write is announced.
    let lease = fleet(&b).try_lease(K1, Duration::from_secs(5)).await.unwrap().expect("lease");
    let v2 = fleet(&b).save_fenced(K1, &token("g2", None, Some(600)), &lease).await.unwrap().expect("write");
    let m = expect_message(&mut rx_a, limit, |m| matches!(m, FleetMessage::Written { .. })).await;
    assert_eq!(m, FleetMessage::Written { key: K1.into(), version: v2 });
    // A removal through the CAS trait is announced as an invalidation; a failed one is not.
    assert!(!a.remove(K1, v1).await.unwrap());
    assert!(a.remove(K1, v2).await.unwrap());
    let m = expect_message(&mut rx_b, limit, |m| matches!(m, FleetMessage::Invalidated { .. })).await;
    assert_eq!(m, FleetMessage::Invalidated { key: K1.into(), version: v2 });
    // A failed CAS write announces nothing.
    assert_eq!(a.save(K1, &token("no", None, Some(60)), 12345).await.unwrap(), Saved::Conflict(None));
    expect_no_message(&mut rx_b, Duration::from_millis(300), |m| matches!(m, FleetMessage::Written { .. })).await;
}

#[tokio::test]
async fn pending_login_round_trip() {
    let server = RedisServer::start();
    let a = store(&server);
    let b = store(&server);
    let mut rx = fleet(&b).subscribe();
    wait_subscribers(&server, 2).await;
    assert_eq!(fleet(&b).load_pending(K1).await.unwrap(), None);
    let vars: BTreeMap<String, String> =
        [("interim_token".to_string(), "it-1".to_string()), ("otp_ref".to_string(), "42".to_string())].into();
    fleet(&a).save_pending(K1, &vars, Duration::from_secs(1800)).await.unwrap();
    expect_message(&mut rx, Duration::from_secs(5), |m| *m == FleetMessage::Pending { key: K1.into() }).await;
    // The code can be given to another replica: it sees what the first one extracted.
    assert_eq!(fleet(&b).load_pending(K1).await.unwrap(), Some(vars));
    let ttl = pttl(&server, &format!("{PREFIX}pending:{K1}"));
    assert!((1_790_000..=1_800_000).contains(&ttl), "pending TTL {ttl}");
    fleet(&b).clear_pending(K1).await.unwrap();
    assert_eq!(fleet(&a).load_pending(K1).await.unwrap(), None);
    // An empty pending login (the steps before the code extracted nothing) is still one.
    fleet(&a).save_pending(K2, &BTreeMap::new(), Duration::from_millis(300)).await.unwrap();
    assert_eq!(fleet(&b).load_pending(K2).await.unwrap(), Some(BTreeMap::new()));
    // It expires.
    let start = Instant::now();
    while fleet(&b).load_pending(K2).await.unwrap().is_some() {
        assert!(start.elapsed() < Duration::from_secs(5), "a pending login outlived its TTL");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Cleared means gone from Redis, not only unreadable.
    let raw: Vec<u8> = redis::cmd("GET").arg(format!("{PREFIX}pending:{K1}")).query(&mut server.conn()).unwrap();
    assert!(raw.is_empty(), "cleared");
}

fn assert_fast_failure<T: std::fmt::Debug>(what: &str, started: Instant, r: Result<T, StoreError>, limit: Duration) {
    let took = started.elapsed();
    assert!(r.is_err(), "{what} succeeded against a Redis that is down: {r:?}");
    assert!(took < limit, "{what} took {took:?}, more than {limit:?}");
    let text = r.unwrap_err().to_string();
    assert!(text.contains(what), "error does not name the operation: {text}");
}

#[tokio::test]
async fn redis_down_or_hung_fails_fast_and_recovers_when_back() {
    let mut server = RedisServer::start();
    let s = store(&server); // timeout 500 ms
    wait_subscribers(&server, 1).await;
    let v1 = written(s.save(K1, &token("before", None, Some(600)), 0).await.unwrap());
    assert!(fleet(&s).healthy());
    let limit = Duration::from_millis(900);

    // Hung (SIGSTOP): every operation gives up at the timeout.
    server.signal("STOP");
    let t = Instant::now();
    assert_fast_failure("load", t, s.load(K1).await, limit);
    let t = Instant::now();
    let r = s.save(K1, &token("x", None, Some(60)), v1).await;
    assert!(matches!(r, Err(StoreError::RedisTimeout { .. })), "{r:?}");
    assert_fast_failure("save", t, r, limit);
    let t = Instant::now();
    assert_fast_failure("try_lease", t, fleet(&s).try_lease(K1, Duration::from_secs(2)).await, limit);
    assert!(!fleet(&s).healthy());
    server.signal("CONT");
    let start = Instant::now();
    while s.load(K1).await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(5), "not usable again after the hang ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(s.load(K1).await.unwrap().map(|l| l.version), Some(v1), "nothing was written while hung");
    // The message stream may have noticed the hang and come back (with a `Reconnected`);
    // once it is subscribed again, listen afresh.
    wait_subscribers(&server, 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut rx = fleet(&s).subscribe();

    // Down (killed): refused at once.
    server.stop();
    for _ in 0..3 {
        let t = Instant::now();
        assert_fast_failure("load", t, s.load(K1).await, limit);
        let t = Instant::now();
        assert_fast_failure("save", t, s.save(K1, &token("x", None, Some(60)), v1).await, limit);
        let t = Instant::now();
        assert_fast_failure("invalidate", t, fleet(&s).invalidate(K1, v1).await, limit);
    }
    assert!(!fleet(&s).healthy());
    let errors = String::from_utf8(tollgate::metrics::get().encode()).unwrap();
    assert!(
        errors.lines().any(|l| l.starts_with("tollgate_redis_errors_total{operation=\"load\"}") && !l.ends_with(" 0")),
        "errors not counted"
    );
    assert!(errors.contains("tollgate_redis_duration_seconds_count{operation=\"save\"}"));

    // Back, empty: the stream says so, and operations work again on the first try.
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart();
    expect_message(&mut rx, Duration::from_secs(10), |m| *m == FleetMessage::Reconnected).await;
    assert_eq!(s.load(K1).await.unwrap(), None, "Redis came back empty");
    assert!(fleet(&s).healthy());
    let v2 = written(s.save(K1, &token("after", None, Some(600)), 0).await.unwrap());
    assert!(v2 > v1, "versions went back after Redis lost its data ({v2} after {v1})");
    assert!(!fleet(&s).invalidate(K1, v1).await.unwrap(), "a pre-restart generation matched the new entry");
    // Messages flow again.
    let v3 = written(s.save(K1, &token("again", None, Some(600)), v2).await.unwrap());
    expect_message(&mut rx, Duration::from_secs(5), |m| *m == FleetMessage::Written { key: K1.into(), version: v3 })
        .await;
}

#[tokio::test]
async fn down_at_start_then_up_emits_reconnected() {
    let mut server = RedisServer::start();
    server.stop();
    let s = store(&server);
    let mut rx = fleet(&s).subscribe();
    let t = Instant::now();
    assert_fast_failure("load", t, s.load(K1).await, Duration::from_millis(900));
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart();
    expect_message(&mut rx, Duration::from_secs(10), |m| *m == FleetMessage::Reconnected).await;
    written(s.save(K1, &token("a", None, Some(60)), 0).await.unwrap());
}

/// INFO replication of a server as a map.
fn replication(server: &RedisServer) -> BTreeMap<String, String> {
    let info: String = redis::cmd("INFO").arg("replication").query(&mut server.conn()).unwrap();
    info.lines().filter_map(|l| l.split_once(':')).map(|(k, v)| (k.to_string(), v.trim().to_string())).collect()
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "{what} not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_finds_the_new_master() {
    const MASTER: &str = "tgmaster";
    let primary = RedisServer::start();
    let replica = RedisServer::replica_of(&primary);
    wait_until("replication link up", Duration::from_secs(15), || {
        replication(&replica).get("master_link_status").map(String::as_str) == Some("up")
    });
    let sentinel = SentinelServer::start(MASTER, &primary);
    wait_until("the sentinel knows the replica", Duration::from_secs(20), || {
        let replicas: Vec<BTreeMap<String, String>> =
            redis::cmd("SENTINEL").arg("REPLICAS").arg(MASTER).query(&mut sentinel.conn()).unwrap_or_default();
        replicas.iter().any(|r| r.get("port") == Some(&replica.port.to_string()))
    });

    let mut st = settings("redis://127.0.0.1/0", vec![enc_key(1)]);
    st.timeout = Duration::from_secs(1);
    st.lease_ttl = Duration::from_secs(5);
    st.sentinel = Some(SentinelSettings { master_name: MASTER.into(), nodes: vec![sentinel.url()] });
    let s = RedisStore::connect(st).unwrap();
    assert!(s.describe().contains(MASTER));
    let mut rx = fleet(&s).subscribe();
    let v1 = written(s.save(K1, &token("before-failover", None, Some(600)), 0).await.unwrap());
    wait_until("the write reached the replica", Duration::from_secs(10), || {
        redis::cmd("EXISTS").arg(format!("{PREFIX}token:{K1}")).query::<i64>(&mut replica.conn()).unwrap_or(0) == 1
    });

    wait_until("SENTINEL FAILOVER accepted", Duration::from_secs(20), || {
        redis::cmd("SENTINEL").arg("FAILOVER").arg(MASTER).query::<String>(&mut sentinel.conn()).is_ok()
    });
    wait_until("the sentinel names the replica as master", Duration::from_secs(30), || {
        let addr: Vec<String> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(MASTER)
            .query(&mut sentinel.conn())
            .unwrap_or_default();
        addr.get(1) == Some(&replica.port.to_string())
    });
    let failover_started = Instant::now();

    // Within a bounded time of the switch, writes land on the new master. (One that
    // raced the switch may still have gone to the old master, which the sentinels then
    // demote, discarding it: Redis replication is asynchronous.)
    let mut attempts = 0;
    let version = loop {
        attempts += 1;
        let outcome = match s.load(K1).await {
            Ok(Some(l)) => s.save(K1, &token("after-failover", None, Some(600)), l.version).await,
            Ok(None) => panic!("the entry was lost in the failover"),
            Err(e) => Err(e),
        };
        let on_new_master: Option<String> =
            redis::cmd("HGET").arg(format!("{PREFIX}token:{K1}")).arg("v").query(&mut replica.conn()).unwrap();
        match outcome {
            Ok(Saved::Written(v)) if on_new_master == Some(v.to_string()) => break v,
            other => {
                assert!(
                    failover_started.elapsed() < Duration::from_secs(10),
                    "no write on the new master within 10 s of the switch ({attempts} attempts), last: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert!(version > v1);
    assert!(attempts <= 10, "{attempts} attempts");
    assert_eq!(replication(&replica).get("role").map(String::as_str), Some("master"));
    // The message stream moved too (it may reconnect more than once while the sentinels
    // settle): within a bounded time, a write on the new master is heard.
    expect_message(&mut rx, Duration::from_secs(15), |m| *m == FleetMessage::Reconnected).await;
    let mut version = version;
    let heard_by = Instant::now() + Duration::from_secs(20);
    loop {
        let v = written(s.save(K1, &token("later", None, Some(600)), version).await.unwrap());
        version = v;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let mut heard = false;
        while let Ok(Ok(m)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            if m == (FleetMessage::Written { key: K1.into(), version: v }) {
                heard = true;
                break;
            }
        }
        if heard {
            break;
        }
        assert!(Instant::now() < heard_by, "no write heard on the new master's message stream within 20 s");
    }
}

#[tokio::test]
async fn the_configured_store_opens_as_a_fleet_store() {
    let server = RedisServer::start();
    let st = settings(&server.url(), vec![enc_key(1)]);
    let opened = tollgate::store::open(&tollgate::config::StoreSettings::Redis(st)).expect("open");
    assert!(opened.describe().contains(PREFIX), "{}", opened.describe());
    assert!(opened.fleet().is_some());
    let v = written(opened.save(K1, &token("via-open", None, Some(60)), 0).await.unwrap());
    assert_eq!(opened.load(K1).await.unwrap().map(|l| l.version), Some(v));
    assert_eq!(opened.fleet().map(|f| f.lease_ttl()), Some(Duration::from_secs(2)));
}
