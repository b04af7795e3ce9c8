//! Modern identity providers, against a real OpenID Provider (node `oidc-provider`,
//! pinned in testkit/op) and an upstream that verifies every token itself (signature by
//! the OP's JWKS, `aud`, `exp`; for DPoP the proof, its `jti` never seen before, the
//! nonce, and the `cnf.jkt` binding). tollgate is configured with the issuer alone: the
//! token endpoint always comes from discovery.
//!
//! What the OP's token endpoint and the verifier saw is what is asserted on.

mod support;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{client, Tollgate};
use tollgate_testkit::keys::{TestCa, TestCert, TestKey};
use tollgate_testkit::op::{client as op_client, Op, OpConfig, OpTls, TokenRequest, TrustedIssuer, DEFAULT_RESOURCE};
use tollgate_testkit::verifier::{Verifier, VerifierConfig};

const OTHER_RESOURCE: &str = "https://other.test/";
const WORKLOAD_ISS: &str = "https://kubernetes.default.svc";
const WORKLOAD_AUD: &str = "sts.test";
/// client_secret_jwt keys HS256 with the secret: long enough for it.
const SECRET: &str = "s3cret-0123456789-abcdefghijklmnopqrstuvwxyz-ABCDEF";

fn secret_client(id: &str, method: &str) -> Value {
    let mut c = op_client(id, method);
    c["client_secret"] = json!(SECRET);
    c
}

/// `[proxy]`/`[admin]` and the given providers and routes.
fn config(body: &str) -> String {
    format!("[proxy]\nlisten = \"{{PROXY}}\"\n\n[admin]\nlisten = \"{{ADMIN}}\"\n\n{body}")
}

/// A provider table for the OP with timing shrunk for tests.
fn provider(name: &str, issuer: &str, extra: &str) -> String {
    format!(
        "[providers.{name}]\nkind = \"oauth2\"\nissuer = \"{issuer}\"\nbackoff_min = \"100ms\"\nbackoff_max = \"1s\"\ntimeout = \"5s\"\nexpiry_margin = \"500ms\"\n{extra}\n"
    )
}

/// Tollgate with one provider table (`body`) and its route `/{name}` to `upstream`, ready.
async fn start_one(name: &str, body: &str, upstream: &str) -> Tollgate {
    let tg = Tollgate::start(&config(&format!("{body}\n{}", route(name, upstream, name))));
    tg.wait_ready().await;
    tg
}

fn route(name: &str, upstream: &str, provider: &str) -> String {
    format!("[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"{upstream}\"\nprovider = \"{provider}\"\n")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write test file");
    p.display().to_string()
}

/// GET each path in turn for `duration` (at most 3000 requests); (successes, failures,
/// the first failures).
async fn traffic(tg: &Tollgate, paths: &[&str], duration: Duration) -> (u32, u32, Vec<String>) {
    let c = client();
    let (mut ok, mut bad, mut firsts) = (0, 0, Vec::new());
    let start = Instant::now();
    let mut i = 0usize;
    while start.elapsed() < duration && i < 3000 {
        let path = paths[i % paths.len()];
        i += 1;
        match c.get(tg.url(&format!("{path}/x?q=1"))).send().await {
            Ok(r) if r.status() == 200 => ok += 1,
            Ok(r) => {
                bad += 1;
                if firsts.len() < 3 {
                    firsts.push(format!("{path}: {} {}", r.status(), r.text().await.unwrap_or_default()));
                }
            }
            Err(e) => {
                bad += 1;
                if firsts.len() < 3 {
                    firsts.push(format!("{path}: {e}"));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (ok, bad, firsts)
}

fn of_client<'a>(log: &'a [TokenRequest], id: &str) -> Vec<&'a TokenRequest> {
    log.iter().filter(|r| r.client_id() == Some(id)).collect()
}

/// Wait (bounded) until the OP's log satisfies `pred`.
async fn wait_log(op: &Op, what: &str, pred: impl Fn(&[TokenRequest]) -> bool) -> Vec<TokenRequest> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = op.token_requests().await;
        if pred(&log) {
            return log;
        }
        assert!(Instant::now() < deadline, "{what}; the OP saw: {:#?}", log.iter().map(|r| &r.0).collect::<Vec<_>>());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_authentication_obtains_and_renews_tokens_from_the_issuer_alone_under_traffic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("test-ca");
    let workload = ca.client_cert("workload-1");
    let key = TestKey::es256("k1");
    let mut pkjwt = op_client("pkjwt", "private_key_jwt");
    pkjwt["jwks"] = key.jwks();
    let mut tls = op_client("tls", "tls_client_auth");
    tls["tls_client_auth_subject_dn"] = json!(workload.subject_dn);
    let selfsigned = TestCert::self_signed_client("self-1");
    let mut ss = op_client("selfsigned", "self_signed_tls_client_auth");
    ss["jwks"] = json!({"keys": [selfsigned.jwk()]});
    let cfg = OpConfig { access_token_ttl: 3, tls: Some(OpTls::issued_by(&ca)), ..OpConfig::default() }
        .with_client(secret_client("basic", "client_secret_basic"))
        .with_client(secret_client("post", "client_secret_post"))
        .with_client(secret_client("sjwt", "client_secret_jwt"))
        .with_client(pkjwt)
        .with_client(tls)
        .with_client(ss);
    let op = Op::start(cfg).await;
    let v = Verifier::start(VerifierConfig::new(op.issuer(), DEFAULT_RESOURCE)).await;
    let iss = op.issuer();
    let ca_file = write(dir.path(), "ca.pem", &ca.cert_pem);
    let key_file = write(dir.path(), "client-key.pem", key.private_pem());
    let cert_file = write(dir.path(), "client.crt", &workload.cert_pem);
    let cert_key = write(dir.path(), "client.key", &workload.key_pem);
    let ss_cert = write(dir.path(), "self.crt", &selfsigned.cert_pem);
    let ss_key = write(dir.path(), "self.key", &selfsigned.key_pem);
    let secret = format!("client_secret = \"{SECRET}\"");
    let body = [
        provider("basic", iss, &format!("client_id = \"basic\"\n{secret}\nclient_auth = \"client_secret_basic\"")),
        provider("post", iss, &format!("client_id = \"post\"\n{secret}\nclient_auth = \"client_secret_post\"")),
        provider("sjwt", iss, &format!("client_id = \"sjwt\"\n{secret}\nclient_auth = \"client_secret_jwt\"")),
        provider(
            "pkjwt",
            iss,
            &format!("client_id = \"pkjwt\"\nclient_auth = \"private_key_jwt\"\nprivate_key_file = \"{key_file}\"\nkey_id = \"k1\""),
        ),
        provider(
            "tls",
            iss,
            &format!(
                "client_id = \"tls\"\nclient_auth = \"tls_client_auth\"\nclient_cert_file = \"{cert_file}\"\nclient_key_file = \"{cert_key}\"\nca_file = \"{ca_file}\""
            ),
        ),
        provider(
            "selfsigned",
            iss,
            &format!(
                "client_id = \"selfsigned\"\nclient_auth = \"self_signed_tls_client_auth\"\nclient_cert_file = \"{ss_cert}\"\nclient_key_file = \"{ss_key}\"\nca_file = \"{ca_file}\""
            ),
        ),
    ]
    .join("\n");
    let routes: String =
        ["basic", "post", "sjwt", "pkjwt", "tls", "selfsigned"].iter().map(|n| route(n, &v.url(), n)).collect();
    let tg = Tollgate::start(&config(&format!("{body}\n{routes}")));
    tg.wait_ready().await;

    // 7 s of traffic with 3 s tokens: every provider renews at least once.
    let (ok, bad, firsts) =
        traffic(&tg, &["/basic", "/post", "/sjwt", "/pkjwt", "/tls", "/selfsigned"], Duration::from_secs(7)).await;
    assert_eq!(bad, 0, "failed requests: {firsts:?}\nlogs:\n{}", tg.logs());
    assert!(ok > 100, "only {ok} requests went through");
    assert!(v.refused().is_empty(), "the verifier refused: {:?}", v.refused());

    let log = op.token_requests().await;
    let te = op.token_endpoint();
    for (id, method) in [
        ("basic", "client_secret_basic"),
        ("post", "client_secret_post"),
        ("sjwt", "client_secret_jwt"),
        ("pkjwt", "private_key_jwt"),
        ("tls", "tls_client_auth"),
        ("selfsigned", "self_signed_tls_client_auth"),
    ] {
        let mine = of_client(&log, id);
        let good: Vec<_> = mine.iter().filter(|r| r.ok()).collect();
        assert!(good.len() >= 3, "{id}: {} successful token requests, expected a renewal or more", good.len());
        for r in &mine {
            assert_eq!(r.client_auth(), Some(method), "{id}: {}", r.0);
            assert_eq!(r.grant_type(), Some("client_credentials"));
        }
        // The upstream saw this client's tokens, and accepted them.
        let seen = v.seen().into_iter().filter(|s| s.path.starts_with(&format!("/{id}/"))).count();
        assert!(seen > 10, "{id}: the upstream saw {seen} requests");
        if method.ends_with("_jwt") {
            let jtis: HashSet<_> = mine.iter().filter_map(|r| r.assertion_jti()).collect();
            assert_eq!(jtis.len(), mine.len(), "{id}: every assertion has a fresh jti");
            for r in &mine {
                let a = &r.0["client_assertion"];
                assert_eq!(a["aud"], json!(te), "{id}: the assertion's aud is the discovered token endpoint");
                assert_eq!((a["iss"].as_str(), a["sub"].as_str()), (Some(id), Some(id)));
                let (iat, exp) = (a["iat"].as_u64().unwrap_or(0), a["exp"].as_u64().unwrap_or(0));
                assert!(exp > iat && exp - iat <= 60, "{id}: a short-lived assertion: {a}");
            }
        }
    }
    for r in of_client(&log, "pkjwt") {
        assert_eq!(r.0["client_assertion"]["header"]["kid"], "k1");
        assert_eq!(r.0["client_assertion"]["header"]["alg"], "ES256");
    }
    for r in of_client(&log, "selfsigned") {
        assert_eq!(r.0["listener"], "mtls");
    }
    for r in of_client(&log, "tls") {
        assert_eq!(r.0["listener"], "mtls", "discovery's mtls_endpoint_aliases is used with a client certificate");
        assert_eq!(r.0["client_cert"]["subject"].as_str().map(|s| s.contains("workload-1")), Some(true), "{}", r.0);
    }
    for id in ["basic", "post", "sjwt", "pkjwt"] {
        assert!(of_client(&log, id).iter().all(|r| r.0["listener"] == "http"), "{id} posts to the token_endpoint");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_private_key_file_is_used_for_the_next_token_without_a_failed_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, new) = (TestKey::es256("old"), TestKey::es256("new"));
    let mut c = op_client("app", "private_key_jwt");
    // The IdP trusts both keys during the rotation, as an operator would set it up.
    c["jwks"] = json!({"keys": [old.public_jwk(), new.public_jwk()]});
    let op = Op::start(OpConfig { access_token_ttl: 30, ..OpConfig::default() }.with_client(c)).await;
    let v = Verifier::start(VerifierConfig::new(op.issuer(), DEFAULT_RESOURCE)).await;
    // JWK files: the kid travels with the key.
    let key_file = write(dir.path(), "key.jwk", &old.private_jwk().to_string());
    let body = provider(
        "app",
        op.issuer(),
        &format!("client_id = \"app\"\nclient_auth = \"private_key_jwt\"\nprivate_key_file = \"{key_file}\""),
    );
    let tg = start_one("app", &body, &v.url()).await;
    let before = wait_log(&op, "a token with the old key", |l| l.iter().any(|r| r.ok())).await;
    assert!(before.iter().all(|r| r.0["client_assertion"]["header"]["kid"] == "old"));

    let traffic_task = {
        let url = tg.url("/app/x");
        tokio::spawn(async move {
            let c = client();
            let mut bad = Vec::new();
            for _ in 0..300 {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => bad.push(r.status().as_u16()),
                    Err(_) => bad.push(0),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            bad
        })
    };
    // Replace the file as a secret manager does: write a new file, rename it over.
    let tmp = write(dir.path(), "key.jwk.new", &new.private_jwk().to_string());
    std::fs::rename(&tmp, &key_file).expect("rotate the key file");
    // The token outlives the test: only the rotation explains a new token request.
    let log = wait_log(&op, "a token request signed with the new key", |l| {
        l.iter().any(|r| r.ok() && r.0["client_assertion"]["header"]["kid"] == "new")
    })
    .await;
    let bad = traffic_task.await.expect("traffic");
    assert!(bad.is_empty(), "failed requests during the rotation: {bad:?}");
    assert!(log.iter().all(|r| r.ok()), "no token request failed: {:?}", log.iter().map(|r| &r.0).collect::<Vec<_>>());
    assert!(v.refused().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_bearer_and_token_exchange_send_the_subject_token_file_as_it_is_now() {
    let dir = tempfile::tempdir().expect("tempdir");
    let k8s = TestKey::es256("k8s");
    let trusted = TrustedIssuer { issuer: WORKLOAD_ISS.into(), audience: Some(WORKLOAD_AUD.into()), jwks: k8s.jwks() };
    let cfg = OpConfig { access_token_ttl: 3, trusted_issuers: vec![trusted], ..OpConfig::default() }
        .with_client(secret_client("bearer", "client_secret_basic"))
        .with_client(secret_client("exchange", "client_secret_basic"));
    let op = Op::start(cfg).await;
    let v = Verifier::start(VerifierConfig::new(op.issuer(), DEFAULT_RESOURCE)).await;
    let token = |sub: &str| k8s.subject_token(WORKLOAD_ISS, sub, WORKLOAD_AUD, 600);
    let assertion = write(dir.path(), "assertion", &token("system:serviceaccount:prod:a"));
    let subject = write(dir.path(), "subject", &token("system:serviceaccount:prod:a"));
    let secret = format!("client_secret = \"{SECRET}\"\nclient_auth = \"client_secret_basic\"");
    let body = [
        provider(
            "bearer",
            op.issuer(),
            &format!("client_id = \"bearer\"\n{secret}\ngrant = \"jwt_bearer\"\nassertion_file = \"{assertion}\""),
        ),
        provider(
            "exchange",
            op.issuer(),
            &format!(
                "client_id = \"exchange\"\n{secret}\ngrant = \"token_exchange\"\nsubject_token_file = \"{subject}\"\nrequested_token_type = \"urn:ietf:params:oauth:token-type:access_token\"\nresource = \"{DEFAULT_RESOURCE}\""
            ),
        ),
    ]
    .join("\n");
    let routes = format!("{}{}", route("bearer", &v.url(), "bearer"), route("exchange", &v.url(), "exchange"));
    let tg = Tollgate::start(&config(&format!("{body}\n{routes}")));
    tg.wait_ready().await;

    let traffic_task = {
        let tg_urls = (tg.url("/bearer/x"), tg.url("/exchange/x"));
        tokio::spawn(async move {
            let c = client();
            let mut bad = Vec::new();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(9) {
                for url in [&tg_urls.0, &tg_urls.1] {
                    match c.get(url).send().await {
                        Ok(r) if r.status() == 200 => {}
                        Ok(r) => bad.push(format!("{} {}", r.status(), r.text().await.unwrap_or_default())),
                        Err(e) => bad.push(e.to_string()),
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            bad
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The kubelet rotates the projected token: a new file is renamed over the old one.
    for (name, path) in [("assertion", &assertion), ("subject", &subject)] {
        let tmp = write(dir.path(), &format!("{name}.new"), &token("system:serviceaccount:prod:b"));
        std::fs::rename(&tmp, path).expect("rotate");
    }
    let rotated_at = op.token_requests().await.len();
    let bad = traffic_task.await.expect("traffic");
    assert!(bad.is_empty(), "failed requests: {:?}", &bad[..bad.len().min(3)]);

    let log = op.token_requests().await;
    for (id, grant) in [
        ("bearer", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
        ("exchange", "urn:ietf:params:oauth:grant-type:token-exchange"),
    ] {
        let mine = of_client(&log, id);
        assert!(mine.iter().all(|r| r.grant_type() == Some(grant) && r.ok()), "{id}: {:?}", mine);
        let subjects: Vec<_> = mine.iter().map(|r| r.subject().unwrap_or("-")).collect();
        assert!(subjects.first() == Some(&"system:serviceaccount:prod:a"), "{id}: {subjects:?}");
        // The rotated token was used, and once used, the old one never again (a request
        // that read the file just before the rename may be logged after it: the order
        // of subjects is what is checked, not a moment).
        let first_b = subjects.iter().position(|s| *s == "system:serviceaccount:prod:b");
        let first_b = first_b.unwrap_or_else(|| panic!("{id}: the rotated token was never sent: {subjects:?}"));
        assert!(subjects[first_b..].iter().all(|s| *s == "system:serviceaccount:prod:b"), "{id}: {subjects:?}");
        assert!(log.len() > rotated_at, "token requests went on after the rotation");
    }
    let exchanged = of_client(&log, "exchange");
    assert!(exchanged.iter().all(|r| r.0["subject_token_type"] == "urn:ietf:params:oauth:token-type:jwt"));
    assert!(exchanged.iter().all(|r| r.0["requested_token_type"] == "urn:ietf:params:oauth:token-type:access_token"));
    assert!(exchanged.iter().all(|r| r.resources() == [DEFAULT_RESOURCE]));
    // The upstream saw tokens issued for the workload, never the workload's own token.
    let subs: HashSet<_> = v.seen().into_iter().filter_map(|r| r.sub).collect();
    assert!(subs.contains("system:serviceaccount:prod:b"), "{subs:?}");
    assert!(v.refused().is_empty(), "{:?}", v.refused());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_decides_the_audience_and_the_upstream_refuses_another() {
    let cfg = OpConfig { resources: vec![DEFAULT_RESOURCE.into(), OTHER_RESOURCE.into()], ..OpConfig::default() }
        .with_client(secret_client("app", "client_secret_basic"));
    let op = Op::start(cfg).await;
    let v = Verifier::start(VerifierConfig::new(op.issuer(), DEFAULT_RESOURCE)).await;
    let common = format!("client_id = \"app\"\nclient_secret = \"{SECRET}\"\nclient_auth = \"client_secret_basic\"");
    let body = [
        provider("good", op.issuer(), &format!("{common}\nresource = \"{DEFAULT_RESOURCE}\"")),
        provider("other", op.issuer(), &format!("{common}\nresource = [\"{OTHER_RESOURCE}\"]")),
    ]
    .join("\n");
    let routes = format!("{}{}", route("good", &v.url(), "good"), route("other", &v.url(), "other"));
    let tg = Tollgate::start(&config(&format!("{body}\n{routes}")));
    tg.wait_ready().await;

    let c = client();
    let good = c.get(tg.url("/good/x")).send().await.expect("good");
    assert_eq!(good.status(), 200);
    let other = c.get(tg.url("/other/x")).send().await.expect("other");
    assert_eq!(other.status(), 401, "a token for another resource must be refused by the upstream");

    let log = op.token_requests().await;
    let resources: HashSet<Vec<String>> = log.iter().map(|r| r.resources()).collect();
    assert!(
        resources.contains(&vec![DEFAULT_RESOURCE.to_string()])
            && resources.contains(&vec![OTHER_RESOURCE.to_string()])
    );
    let seen = v.seen();
    let good_seen: Vec<_> = seen.iter().filter(|r| r.path.starts_with("/good/")).collect();
    assert!(good_seen.iter().all(|r| r.accepted && r.aud.contains(&DEFAULT_RESOURCE.to_string())));
    let other_seen: Vec<_> = seen.iter().filter(|r| r.path.starts_with("/other/")).collect();
    assert!(!other_seen.is_empty());
    assert!(other_seen.iter().all(|r| !r.accepted && r.reason.as_deref() == Some("wrong audience")), "{other_seen:?}");
    assert!(tg.metric("tollgate_upstream_challenges_total{error=\"invalid_token\",route=\"other\"}").await >= 1.0);
}

/// An OP issuing DPoP-bound tokens (`ttl` seconds; demanding a nonce at its token
/// endpoint when `op_nonce`), an upstream demanding proofs with nonces, and tollgate with
/// a DPoP provider whose key is in `key_name` (`.pem` or `.jwk`).
struct DpopRig {
    _dir: tempfile::TempDir,
    key: TestKey,
    op: Op,
    v: Verifier,
    tg: Tollgate,
}

async fn dpop_rig(ttl: u64, op_nonce: bool, key_name: &str) -> DpopRig {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = TestKey::es256("dpop");
    let mut c = secret_client("app", "client_secret_basic");
    c["dpop_bound_access_tokens"] = json!(true);
    let cfg = OpConfig { access_token_ttl: ttl, dpop_require_nonce: op_nonce, ..OpConfig::default() };
    let op = Op::start(cfg.with_client(c)).await;
    let v = Verifier::start(VerifierConfig {
        require_dpop: true,
        require_nonce: true,
        ..VerifierConfig::new(op.issuer(), DEFAULT_RESOURCE)
    })
    .await;
    let key_text =
        if key_name.ends_with(".jwk") { key.private_jwk().to_string() } else { key.private_pem().to_string() };
    let key_file = write(dir.path(), key_name, &key_text);
    let body = provider(
        "bank",
        op.issuer(),
        &format!("client_id = \"app\"\nclient_secret = \"{SECRET}\"\nclient_auth = \"client_secret_basic\"\ndpop = true\ndpop_key_file = \"{key_file}\""),
    );
    let tg = start_one("bank", &body, &v.url()).await;
    DpopRig { _dir: dir, key, op, v, tg }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_proofs_are_fresh_bound_to_the_token_and_follow_both_nonces() {
    let DpopRig { _dir, key, op, v, tg } = dpop_rig(4, true, "dpop.pem").await;

    // Sequential and concurrent requests, across at least one renewal (4 s tokens).
    let (ok, bad, firsts) = traffic(&tg, &["/bank"], Duration::from_secs(3)).await;
    assert_eq!(bad, 0, "{firsts:?}\nlogs:\n{}", tg.logs());
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = tg.url("/bank/concurrent?x=1");
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut codes = Vec::new();
            for _ in 0..25 {
                codes.push(c.get(&url).send().await.map(|r| r.status().as_u16()).unwrap_or(0));
            }
            codes
        }));
    }
    for t in tasks {
        assert!(t.await.expect("task").iter().all(|s| *s == 200));
    }
    // The upstream changes its nonce: the next request is answered `use_dpop_nonce` and
    // replayed once with the new one; the client sees 200.
    v.rotate_nonce();
    let r = client().get(tg.url("/bank/after-rotation")).send().await.expect("request");
    assert_eq!(r.status(), 200);
    let (ok2, bad2, firsts2) = traffic(&tg, &["/bank"], Duration::from_secs(3)).await;
    assert_eq!(bad2, 0, "{firsts2:?}");
    assert!(ok + ok2 > 50);

    let seen = v.seen();
    // Every proof tollgate produced is unique, bound to the key the token is bound to.
    let jtis: Vec<_> = seen.iter().filter_map(|r| r.proof_jti.clone()).collect();
    assert_eq!(jtis.iter().collect::<HashSet<_>>().len(), jtis.len(), "a proof jti was reused");
    assert_eq!(jtis.len(), seen.len(), "every request carried a proof");
    assert!(seen.iter().all(|r| r.scheme.as_deref() == Some("DPoP")), "every request used the DPoP scheme");
    let thumbprint = key.thumbprint();
    for r in seen.iter().filter(|r| r.accepted) {
        assert_eq!(r.token_jkt.as_deref(), Some(thumbprint.as_str()), "token bound to the configured key");
        assert_eq!(r.proof_jkt.as_deref(), Some(thumbprint.as_str()));
        assert!(r.proof_htu.as_deref().is_some_and(|h| !h.contains('?')), "htu without query: {:?}", r.proof_htu);
    }
    // Refusals: only nonce challenges (the first request, the rotation), never a replay
    // or a bad proof.
    let refused = v.refused();
    assert!(!refused.is_empty(), "the upstream demanded a nonce at least once");
    assert!(
        refused
            .iter()
            .all(|r| matches!(r.reason.as_deref(), Some("proof has no nonce") | Some("proof nonce is stale"))),
        "{refused:?}"
    );
    let rotation: Vec<_> = seen.iter().filter(|r| r.path == "/bank/after-rotation").collect();
    assert_eq!(rotation.len(), 2, "refused once, replayed once: {rotation:?}");
    assert!(!rotation[0].accepted && rotation[1].accepted);
    assert!(tg.metric("tollgate_upstream_challenges_total{error=\"use_dpop_nonce\",route=\"bank\"}").await >= 2.0);

    // The token endpoint: the first proof had no nonce and was answered with one; every
    // later proof carried it and got a token bound to the key.
    let log = op.token_requests().await;
    assert_eq!(log[0].0["error"], "use_dpop_nonce", "{}", log[0].0);
    assert!(log[0].dpop_nonce().is_none());
    let good: Vec<_> = log.iter().filter(|r| r.ok()).collect();
    assert!(good.len() >= 2, "a renewal happened: {}", good.len());
    for r in &good {
        assert!(r.dpop_nonce().is_some(), "{}", r.0);
        assert_eq!(r.dpop_jkt(), Some(thumbprint.as_str()));
        assert_eq!(r.issued_jkt(), Some(thumbprint.as_str()));
        assert_eq!(r.0["token_type"], "DPoP");
        assert_eq!(r.0["dpop"]["htu"], json!(op.token_endpoint()));
    }
    let token_jtis: HashSet<_> = log.iter().filter_map(|r| r.dpop_jti()).collect();
    assert_eq!(token_jtis.len(), log.len(), "token-request proofs are fresh too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_exchange_or_an_unusable_assertion_is_a_503_and_nothing_reaches_the_upstream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (k8s, stranger) = (TestKey::es256("k8s"), TestKey::es256("stranger"));
    let trusted = TrustedIssuer { issuer: WORKLOAD_ISS.into(), audience: Some(WORKLOAD_AUD.into()), jwks: k8s.jwks() };
    let cfg = OpConfig { trusted_issuers: vec![trusted], ..OpConfig::default() }
        .with_client(secret_client("exchange", "client_secret_basic"))
        .with_client(secret_client("bearer", "client_secret_basic"));
    let op = Op::start(cfg).await;
    let v = Verifier::start(VerifierConfig::new(op.issuer(), DEFAULT_RESOURCE)).await;
    // Signed by a key the IdP does not trust.
    let forged = write(dir.path(), "subject", &stranger.subject_token(WORKLOAD_ISS, "intruder", WORKLOAD_AUD, 600));
    // Present at start, empty when read (a mount not populated yet).
    let empty = write(dir.path(), "assertion", "\n");
    let secret = format!("client_secret = \"{SECRET}\"\nclient_auth = \"client_secret_basic\"");
    let body = [
        provider(
            "exchange",
            op.issuer(),
            &format!(
                "client_id = \"exchange\"\n{secret}\ngrant = \"token_exchange\"\nsubject_token_file = \"{forged}\""
            ),
        ),
        provider(
            "bearer",
            op.issuer(),
            &format!("client_id = \"bearer\"\n{secret}\ngrant = \"jwt_bearer\"\nassertion_file = \"{empty}\""),
        ),
    ]
    .join("\n");
    let routes = format!("{}{}", route("exchange", &v.url(), "exchange"), route("bearer", &v.url(), "bearer"));
    let text = config(&format!("{body}\n{routes}")).replacen("[proxy]\n", "[proxy]\ntoken_wait = \"2s\"\n", 1);
    let tg = Tollgate::start(&text);
    tg.wait_healthy().await;

    for (path, reason) in [("/exchange/x", "invalid_grant"), ("/bearer/x", "credential_file")] {
        let r = client().get(tg.url(path)).send().await.expect("request");
        assert_eq!(r.status(), 503, "{path}");
        let body: Value = r.json().await.expect("a JSON body");
        assert_eq!(body["error"], "token_unavailable", "{path}: {body}");
        assert_eq!(body["reason"], reason, "{path}: {body}");
    }
    assert!(v.seen().is_empty(), "nothing may reach the upstream: {:?}", v.seen());
    let log = op.token_requests().await;
    let exchanges = of_client(&log, "exchange");
    assert!(!exchanges.is_empty() && exchanges.iter().all(|r| !r.ok() && r.0["error"] == "invalid_grant"));
    assert!(exchanges.iter().all(|r| r.subject() == Some("intruder")), "the file's token was what was sent");
    assert!(of_client(&log, "bearer").is_empty(), "an empty assertion file sends nothing");
    let logs = tg.logs();
    assert!(
        !logs.contains(&std::fs::read_to_string(&forged).expect("read").trim().to_string()),
        "the subject token was logged"
    );
}

async fn discovery_op() -> (Op, Verifier) {
    let cfg = OpConfig {
        client_auth_methods: Some(vec!["client_secret_basic".into(), "client_secret_post".into()]),
        ..OpConfig::default()
    }
    .with_client(secret_client("app", "client_secret_basic"));
    let op = Op::start(cfg).await;
    let v = Verifier::start(VerifierConfig::new(op.issuer(), DEFAULT_RESOURCE)).await;
    (op, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_auth_method_the_issuer_does_not_advertise_is_refused_before_anything_is_sent() {
    let (op, v) = discovery_op().await;
    let body = provider(
        "app",
        op.issuer(),
        &format!("client_id = \"app\"\nclient_secret = \"{SECRET}\"\nclient_auth = \"client_secret_jwt\""),
    );
    let text = config(&format!("{body}\n{}", route("app", &v.url(), "app"))).replacen(
        "[proxy]\n",
        "[proxy]\ntoken_wait = \"2s\"\n",
        1,
    );
    let tg = Tollgate::start(&text);
    tg.wait_healthy().await;
    let r = client().get(tg.url("/app/x")).send().await.expect("request");
    assert_eq!(r.status(), 503);
    let b: Value = r.json().await.expect("JSON");
    assert_eq!(b["reason"], "discovery", "{b}");
    assert!(op.token_requests().await.is_empty(), "nothing was sent to the token endpoint");
    assert!(v.seen().is_empty());
    assert!(
        tg.logs().contains("the IdP does not support `client_auth = \"client_secret_jwt\"` (it advertises: client_secret_basic, client_secret_post)"),
        "the reason is logged: {}",
        tg.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_is_read_again_after_the_token_endpoint_fails() {
    let (op, v) = discovery_op().await;
    let body = provider(
        "app",
        op.issuer(),
        &format!("client_id = \"app\"\nclient_secret = \"{SECRET}\"\nclient_auth = \"client_secret_basic\""),
    );
    let tg = start_one("app", &body, &v.url()).await;
    let reads = || tg.logs().matches("discovery metadata read").count();
    assert_eq!(reads(), 1, "read once at start");
    let refresh = || {
        let url = tg.admin_url("/admin/providers/app/refresh");
        async move { client().post(url).send().await.expect("refresh").status().as_u16() }
    };
    // A successful request keeps the metadata.
    assert_eq!(refresh().await, 200);
    assert_eq!(reads(), 1);
    // The token endpoint fails: the metadata is read again before the next request.
    op.fail(503, 1).await;
    assert_ne!(refresh().await, 200, "the injected 503 fails the forced refresh");
    assert_eq!(refresh().await, 200);
    assert_eq!(reads(), 2, "{}", tg.logs());
    let log = op.token_requests().await;
    let n = log.len();
    assert!(n >= 4 && log[n - 2].injected() && log[n - 1].ok(), "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_challenges_replay_at_most_once_and_a_refused_proof_keeps_the_token() {
    let DpopRig { _dir, op, v, tg, .. } = dpop_rig(300, false, "dpop.jwk").await;
    let c = client();
    assert_eq!(c.get(tg.url("/bank/warm")).send().await.expect("warm").status(), 200);
    let tokens_before = op.token_requests().await.len();
    let count = |path: &str| v.seen().iter().filter(|r| r.path == path).count();

    // A POST with a body, after the upstream changed its nonce: replayed once, body whole.
    v.rotate_nonce();
    let r = c.post(tg.url("/bank/pay")).body("amount=10").send().await.expect("post");
    assert_eq!(r.status(), 200);
    assert_eq!(count("/bank/pay"), 2, "refused for the nonce, then accepted");

    // An upstream that demands a new nonce every time: one replay, then its 401 passes.
    v.force_next(2, 401, "DPoP error=\"use_dpop_nonce\"");
    let r = c.get(tg.url("/bank/again")).send().await.expect("get");
    assert_eq!(r.status(), 401);
    assert_eq!(count("/bank/again"), 2, "exactly one replay");

    // A refused proof is not a refused token: passed through, no new token.
    v.force_next(1, 401, "DPoP error=\"invalid_dpop_proof\"");
    let r = c.get(tg.url("/bank/proof")).send().await.expect("get");
    assert_eq!(r.status(), 401);
    assert_eq!(count("/bank/proof"), 1, "not replayed");
    assert_eq!(c.get(tg.url("/bank/after")).send().await.expect("after").status(), 200);
    assert_eq!(op.token_requests().await.len(), tokens_before, "the token was kept throughout");
    let jtis: Vec<_> = v.seen().iter().filter_map(|r| r.proof_jti.clone()).collect();
    assert_eq!(jtis.iter().collect::<HashSet<_>>().len(), jtis.len(), "every replay carries a fresh proof");
    assert!(tg.metric("tollgate_upstream_challenges_total{error=\"invalid_dpop_proof\",route=\"bank\"}").await >= 1.0);
}
