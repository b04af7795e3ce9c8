//! The OpenID Provider double and the verifying upstream are real: tokens obtained with
//! every client authentication method and grant pass the verifier, and what should be
//! refused is refused, by both. Everything here is the tests' own client code
//! (reqwest, jsonwebtoken), independent of tollgate.

use std::time::Duration;

use reqwest::header::{HeaderMap, WWW_AUTHENTICATE};
use serde_json::{json, Value};
use tollgate_testkit::keys::{client_secret_jwt, TestCa, TestCert, TestKey};
use tollgate_testkit::op::{client, Op, OpConfig, OpTls, TrustedIssuer, DEFAULT_RESOURCE};
use tollgate_testkit::verifier::{Verifier, VerifierConfig};

const OTHER_RESOURCE: &str = "https://other.test/";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const TT_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
const WORKLOAD_ISS: &str = "https://kubernetes.default.svc";
const WORKLOAD_AUD: &str = "sts.test";

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client")
}

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

async fn post_form(c: &reqwest::Client, url: &str, form: &[(&str, &str)], extra: &[(&str, &str)]) -> Answer {
    let mut rb = c.post(url).form(form);
    for (k, v) in extra {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.expect("token endpoint reachable");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.json::<Value>().await.unwrap_or(Value::Null);
    Answer { status, headers, body }
}

async fn basic_token(op: &Op, id: &str, secret: &str, form: &[(&str, &str)]) -> Answer {
    let r = http().post(op.token_endpoint()).basic_auth(id, Some(secret)).form(form).send().await.expect("reachable");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    Answer { status, headers, body: r.json().await.unwrap_or(Value::Null) }
}

async fn call(v: &Verifier, path: &str, auth: &str, dpop: Option<&str>) -> (u16, HeaderMap) {
    let mut rb = http().get(format!("{}{path}", v.url())).header("authorization", auth);
    if let Some(p) = dpop {
        rb = rb.header("dpop", p);
    }
    let r = rb.send().await.expect("verifier reachable");
    (r.status().as_u16(), r.headers().clone())
}

fn www(h: &HeaderMap) -> String {
    h.get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

fn secret_client(id: &str, secret: &str, method: &str) -> Value {
    let mut c = client(id, method);
    c["client_secret"] = json!(secret);
    c
}

fn claims(token: &str) -> Value {
    use base64::Engine;
    let p = token.split('.').nth(1).expect("a JWS");
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p).expect("b64")).expect("json")
}

#[tokio::test]
async fn client_secret_basic_token_passes_the_verifier_and_wrong_audience_or_signature_do_not() {
    let cfg = OpConfig { resources: vec![DEFAULT_RESOURCE.into(), OTHER_RESOURCE.into()], ..OpConfig::default() }
        .with_client(secret_client("app", "s3cret", "client_secret_basic"));
    let op = Op::start(cfg).await;
    let v = Verifier::start(VerifierConfig::new(op.issuer(), DEFAULT_RESOURCE)).await;

    let a = basic_token(&op, "app", "s3cret", &[("grant_type", "client_credentials"), ("scope", "read")]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["token_type"], "Bearer");
    let token = a.body["access_token"].as_str().expect("token").to_string();
    assert_eq!(claims(&token)["aud"], DEFAULT_RESOURCE);
    let (status, _) = call(&v, "/api/x?y=1", &format!("Bearer {token}"), None).await;
    assert_eq!(status, 200);

    // A token for another (accepted) resource is refused by the verifier: the aud check is real.
    let other =
        basic_token(&op, "app", "s3cret", &[("grant_type", "client_credentials"), ("resource", OTHER_RESOURCE)]).await;
    assert_eq!(other.status, 200, "{}", other.body);
    let other_token = other.body["access_token"].as_str().expect("token");
    assert_eq!(claims(other_token)["aud"], OTHER_RESOURCE);
    let (status, h) = call(&v, "/api/x", &format!("Bearer {other_token}"), None).await;
    assert_eq!(status, 401);
    assert!(www(&h).starts_with("Bearer error=\"invalid_token\""), "{}", www(&h));

    // A resource the provider does not know: invalid_target.
    let unknown =
        basic_token(&op, "app", "s3cret", &[("grant_type", "client_credentials"), ("resource", "https://nope.test/")])
            .await;
    assert_eq!((unknown.status, unknown.body["error"].as_str()), (400, Some("invalid_target")));

    // A tampered signature, and a tampered payload, are refused.
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    let sig = parts[2].clone();
    parts[2] = format!("{}{}", if sig.starts_with('A') { "B" } else { "A" }, &sig[1..]);
    let (status, _) = call(&v, "/api/x", &format!("Bearer {}", parts.join(".")), None).await;
    assert_eq!(status, 401);
    let forged = {
        use base64::Engine;
        let mut c = claims(&token);
        c["sub"] = json!("admin");
        let p = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(c.to_string());
        format!("{}.{p}.{sig}", token.split('.').next().expect("header"))
    };
    let (status, _) = call(&v, "/api/x", &format!("Bearer {forged}"), None).await;
    assert_eq!(status, 401);
    // A token signed by someone else, with the provider's kid, is refused.
    let rogue = TestKey::es256("op-es256").sign(&claims(&token));
    let (status, _) = call(&v, "/api/x", &format!("Bearer {rogue}"), None).await;
    assert_eq!(status, 401);

    let reasons: Vec<String> = v.refused().into_iter().filter_map(|r| r.reason).collect();
    assert_eq!(reasons, ["wrong audience", "bad signature", "bad signature", "bad signature"]);
    assert_eq!(v.accepted(), 1);
    let first = &v.seen()[0];
    assert_eq!((first.path.as_str(), first.query.as_deref()), ("/api/x", Some("y=1")));
    assert_eq!((first.sub.as_deref(), first.client_id.as_deref()), (Some("app"), Some("app")));

    // The log shows every token request, in order, as sent.
    let log = op.token_requests().await;
    assert_eq!(log.len(), 3);
    assert!(log.iter().all(|r| r.client_auth() == Some("client_secret_basic") && r.client_id() == Some("app")));
    assert_eq!(log.iter().map(|r| r.status()).collect::<Vec<_>>(), [200, 200, 400]);
    assert_eq!(log[0].0["scope"], "read");
    assert_eq!(log[0].resources(), Vec::<String>::new());
    assert_eq!(log[0].issued_aud(), Some(&json!(DEFAULT_RESOURCE)));
    assert_eq!(log[1].resources(), [OTHER_RESOURCE]);
    assert_eq!(log[2].0["error"], "invalid_target");
}

#[tokio::test]
async fn expired_tokens_are_refused() {
    let cfg = OpConfig { access_token_ttl: 1, ..OpConfig::default() }.with_client(secret_client(
        "app",
        "s3cret",
        "client_secret_basic",
    ));
    let op = Op::start(cfg).await;
    let v = Verifier::start(VerifierConfig::new(op.issuer(), DEFAULT_RESOURCE)).await;
    let a = basic_token(&op, "app", "s3cret", &[("grant_type", "client_credentials")]).await;
    assert_eq!(a.body["expires_in"], 1);
    let token = a.body["access_token"].as_str().expect("token").to_string();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (status, _) = call(&v, "/", &format!("Bearer {token}"), None).await;
    assert_eq!(status, 401);
    assert_eq!(v.refused()[0].reason.as_deref(), Some("expired token"));
}

#[tokio::test]
async fn every_secret_and_key_based_client_authentication_obtains_tokens() {
    let key = TestKey::es256("client-key-1");
    let ed = TestKey::ed25519("client-key-2");
    let mut pkj = client("pkj", "private_key_jwt");
    pkj["jwks"] = key.jwks();
    let mut pkj_ed = client("pkj-ed", "private_key_jwt");
    pkj_ed["jwks"] = ed.jwks();
    let cfg = OpConfig::default()
        .with_client(secret_client("post", "p0st", "client_secret_post"))
        .with_client(secret_client("csj", "a-long-enough-shared-secret-for-hs256-000", "client_secret_jwt"))
        .with_client(pkj)
        .with_client(pkj_ed);
    let op = Op::start(cfg).await;
    let v = Verifier::start(VerifierConfig::new(op.issuer(), DEFAULT_RESOURCE)).await;
    let c = http();
    let te = op.token_endpoint();
    const CAT: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

    let post = post_form(
        &c,
        &te,
        &[("grant_type", "client_credentials"), ("client_id", "post"), ("client_secret", "p0st")],
        &[],
    )
    .await;
    let csj_assertion = client_secret_jwt("a-long-enough-shared-secret-for-hs256-000", "csj", &te);
    let csj = post_form(
        &c,
        &te,
        &[("grant_type", "client_credentials"), ("client_assertion_type", CAT), ("client_assertion", &csj_assertion)],
        &[],
    )
    .await;
    let pkj_assertion = key.client_assertion("pkj", &te);
    let pkj = post_form(
        &c,
        &te,
        &[("grant_type", "client_credentials"), ("client_assertion_type", CAT), ("client_assertion", &pkj_assertion)],
        &[],
    )
    .await;
    let ed_assertion = ed.client_assertion("pkj-ed", op.issuer());
    let pkj_ed = post_form(
        &c,
        &te,
        &[("grant_type", "client_credentials"), ("client_assertion_type", CAT), ("client_assertion", &ed_assertion)],
        &[],
    )
    .await;
    for a in [&post, &csj, &pkj, &pkj_ed] {
        assert_eq!(a.status, 200, "{}", a.body);
        let t = a.body["access_token"].as_str().expect("token");
        assert_eq!(call(&v, "/", &format!("Bearer {t}"), None).await.0, 200);
    }

    // The same assertion twice (same jti) is refused; so is one signed by another key.
    let replay = post_form(
        &c,
        &te,
        &[("grant_type", "client_credentials"), ("client_assertion_type", CAT), ("client_assertion", &pkj_assertion)],
        &[],
    )
    .await;
    assert_eq!((replay.status, replay.body["error"].as_str()), (401, Some("invalid_client")));
    let wrong_key = TestKey::es256("client-key-1").client_assertion("pkj", &te);
    let wrong = post_form(
        &c,
        &te,
        &[("grant_type", "client_credentials"), ("client_assertion_type", CAT), ("client_assertion", &wrong_key)],
        &[],
    )
    .await;
    assert_eq!((wrong.status, wrong.body["error"].as_str()), (401, Some("invalid_client")));

    let log = op.token_requests().await;
    let auths: Vec<_> = log.iter().map(|r| (r.client_id().map(str::to_string), r.client_auth(), r.status())).collect();
    assert_eq!(
        auths,
        [
            (Some("post".into()), Some("client_secret_post"), 200),
            (Some("csj".into()), Some("client_secret_jwt"), 200),
            (Some("pkj".into()), Some("private_key_jwt"), 200),
            (Some("pkj-ed".into()), Some("private_key_jwt"), 200),
            (Some("pkj".into()), Some("private_key_jwt"), 401),
            (Some("pkj".into()), Some("private_key_jwt"), 401),
        ]
    );
    let a = &log[2].0["client_assertion"];
    assert_eq!((a["header"]["alg"].as_str(), a["header"]["kid"].as_str()), (Some("ES256"), Some("client-key-1")));
    assert_eq!(
        (a["iss"].as_str(), a["sub"].as_str(), a["aud"].as_str()),
        (Some("pkj"), Some("pkj"), Some(te.as_str()))
    );
    assert!(a["jti"].is_string() && a["iat"].is_u64() && a["exp"].is_u64(), "{a}");
    assert_eq!(log[1].0["client_assertion"]["header"]["alg"], "HS256");
    assert_eq!(log[3].0["client_assertion"]["header"]["alg"], "EdDSA");
    assert_eq!(log[4].assertion_jti(), log[2].assertion_jti());
}

#[tokio::test]
async fn dpop_bound_tokens_proofs_replays_and_nonces() {
    let mut c = secret_client("dpop", "s3cret", "client_secret_basic");
    c["dpop_bound_access_tokens"] = json!(true);
    let op = Op::start(OpConfig { dpop_require_nonce: true, ..OpConfig::default() }.with_client(c)).await;
    let v = Verifier::start(VerifierConfig {
        require_dpop: true,
        require_nonce: true,
        ..VerifierConfig::new(op.issuer(), DEFAULT_RESOURCE)
    })
    .await;
    let key = TestKey::es256("dpop-key");
    let te = op.token_endpoint();
    let form = [("grant_type", "client_credentials")];
    let basic = |c: reqwest::RequestBuilder| c.basic_auth("dpop", Some("s3cret"));

    // Without a proof: refused (the client is registered for DPoP-bound tokens).
    let r = basic(http().post(&te)).form(&form).send().await.expect("reachable");
    assert_eq!(r.status(), 400);

    // The token endpoint demands a nonce: 400 use_dpop_nonce with DPoP-Nonce.
    let proof = key.dpop_proof("POST", &te, None, None);
    let r = basic(http().post(&te)).header("dpop", &proof).form(&form).send().await.expect("reachable");
    assert_eq!(r.status(), 400);
    let op_nonce = r.headers().get("dpop-nonce").and_then(|n| n.to_str().ok()).expect("a nonce").to_string();
    assert_eq!(r.json::<Value>().await.expect("json")["error"], "use_dpop_nonce");

    let proof = key.dpop_proof("POST", &te, None, Some(&op_nonce));
    let r = basic(http().post(&te)).header("dpop", &proof).form(&form).send().await.expect("reachable");
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["token_type"], "DPoP");
    let token = body["access_token"].as_str().expect("token").to_string();
    assert_eq!(claims(&token)["cnf"]["jkt"].as_str(), Some(key.thumbprint().as_str()));

    let url = format!("{}/api/items", v.url());
    let auth = format!("DPoP {token}");
    // No nonce in the proof: use_dpop_nonce and the verifier's nonce.
    let p1 = key.dpop_proof("GET", &url, Some(&token), None);
    let (status, h) = call(&v, "/api/items", &auth, Some(&p1)).await;
    assert_eq!(status, 401);
    assert!(www(&h).contains("error=\"use_dpop_nonce\""), "{}", www(&h));
    let nonce = h.get("dpop-nonce").and_then(|n| n.to_str().ok()).expect("DPoP-Nonce").to_string();
    assert_eq!(nonce, v.nonce());

    // With it (and a query string, which htu leaves out): accepted.
    let p2 = key.dpop_proof("GET", &url, Some(&token), Some(&nonce));
    let (status, _) = call(&v, "/api/items?page=2", &auth, Some(&p2)).await;
    assert_eq!(status, 200);
    // The same proof again: a replay.
    let (status, h) = call(&v, "/api/items?page=2", &auth, Some(&p2)).await;
    assert_eq!(status, 401);
    assert!(www(&h).contains("error=\"invalid_dpop_proof\""), "{}", www(&h));
    // A rotated nonce makes the old one stale.
    v.rotate_nonce();
    let p3 = key.dpop_proof("GET", &url, Some(&token), Some(&nonce));
    let (status, h) = call(&v, "/api/items", &auth, Some(&p3)).await;
    assert_eq!(status, 401);
    assert!(www(&h).contains("use_dpop_nonce"));
    // A proof for another token (ath), another method, another URL, another key: refused.
    let n = v.nonce();
    for (proof, why) in [
        (key.dpop_proof("GET", &url, Some("other-token"), Some(&n)), "ath"),
        (key.dpop_proof("POST", &url, Some(&token), Some(&n)), "htm"),
        (key.dpop_proof("GET", &format!("{}/elsewhere", v.url()), Some(&token), Some(&n)), "htu"),
        (TestKey::es256("k").dpop_proof("GET", &url, Some(&token), Some(&n)), "cnf.jkt"),
    ] {
        let (status, _) = call(&v, "/api/items", &auth, Some(&proof)).await;
        assert_eq!(status, 401, "{why}");
        assert!(v.refused().last().and_then(|r| r.reason.clone()).unwrap_or_default().contains(why), "{why}");
    }
    // The DPoP-bound token as a Bearer token: refused.
    let (status, _) = call(&v, "/api/items", &format!("Bearer {token}"), None).await;
    assert_eq!(status, 401);
    let p4 = key.dpop_proof("GET", &url, Some(&token), Some(&n));
    assert_eq!(call(&v, "/api/items", &auth, Some(&p4)).await.0, 200);

    let seen = v.seen();
    assert_eq!(v.accepted(), 2);
    assert_eq!(seen[1].proof_nonce.as_deref(), Some(nonce.as_str()));
    assert_eq!(seen[1].proof_htu.as_deref(), Some(url.as_str()));
    assert_eq!(seen[1].proof_jkt.as_deref(), Some(key.thumbprint().as_str()));
    assert_eq!(seen[2].reason.as_deref(), Some("replayed proof (jti seen before)"));
    assert_eq!(seen[2].proof_jti, seen[1].proof_jti);

    let log = op.token_requests().await;
    assert_eq!(log.iter().map(|r| r.status()).collect::<Vec<_>>(), [400, 400, 200]);
    assert_eq!(log[0].dpop_jti(), None);
    assert_eq!((log[1].0["error"].as_str(), log[1].dpop_nonce()), (Some("use_dpop_nonce"), None));
    assert_eq!(log[2].dpop_nonce(), Some(op_nonce.as_str()));
    assert_eq!(log[2].0["dpop"]["htu"].as_str(), Some(te.as_str()));
    assert_eq!(log[2].dpop_jkt(), Some(key.thumbprint().as_str()));
    assert_eq!(log[2].issued_jkt(), Some(key.thumbprint().as_str()));
}

fn mtls_client(ca: &TestCa, identity: Option<&TestCert>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem.as_bytes()).expect("CA"));
    if let Some(id) = identity {
        b = b.identity(reqwest::Identity::from_pem(id.identity_pem().as_bytes()).expect("identity"));
    }
    b.build().expect("client")
}

#[tokio::test]
async fn tls_client_auth_and_self_signed_obtain_certificate_bound_tokens() {
    let ca = TestCa::new("test-ca");
    let good = ca.client_cert("workload-1");
    let other = ca.client_cert("workload-2");
    let selfsigned = TestCert::self_signed_client("self-1");
    let mut tls = client("tls", "tls_client_auth");
    tls["tls_client_auth_subject_dn"] = json!(good.subject_dn);
    tls["tls_client_certificate_bound_access_tokens"] = json!(true);
    let mut ss = client("ss", "self_signed_tls_client_auth");
    ss["jwks"] = json!({"keys": [selfsigned.jwk()]});
    let op = Op::start(
        OpConfig { tls: Some(OpTls::issued_by(&ca)), ..OpConfig::default() }.with_client(tls).with_client(ss),
    )
    .await;
    let mtls_te = op.mtls_token_endpoint().expect("mtls endpoint");
    let disco: Value = http()
        .get(format!("{}/.well-known/openid-configuration", op.issuer()))
        .send()
        .await
        .expect("discovery")
        .json()
        .await
        .expect("json");
    assert_eq!(disco["mtls_endpoint_aliases"]["token_endpoint"].as_str(), Some(mtls_te.as_str()));
    assert!(disco["token_endpoint_auth_methods_supported"]
        .as_array()
        .expect("methods")
        .contains(&json!("tls_client_auth")));
    let v = Verifier::start(VerifierConfig::new(op.issuer(), DEFAULT_RESOURCE)).await;

    let cc = |id: &'static str| [("grant_type", "client_credentials"), ("client_id", id)];
    let a = post_form(&mtls_client(&ca, Some(&good)), &mtls_te, &cc("tls"), &[]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let t = a.body["access_token"].as_str().expect("token");
    assert_eq!(claims(t)["cnf"]["x5t#S256"].as_str(), Some(good.x5t_s256().as_str()));
    assert_eq!(call(&v, "/", &format!("Bearer {t}"), None).await.0, 200);

    let b = post_form(&mtls_client(&ca, Some(&selfsigned)), &mtls_te, &cc("ss"), &[]).await;
    assert_eq!(b.status, 200, "{}", b.body);

    // Another subject, no certificate, or a self-signed one for the CA client: refused.
    for (id, who) in [(Some(&other), "tls"), (None, "tls"), (Some(&selfsigned), "tls"), (Some(&good), "ss")] {
        let r = post_form(&mtls_client(&ca, id), &mtls_te, &cc(who), &[]).await;
        assert_eq!((r.status, r.body["error"].as_str()), (401, Some("invalid_client")), "{who}");
    }

    let log = op.token_requests().await;
    assert_eq!(log.len(), 6);
    assert_eq!(log[0].client_auth(), Some("tls_client_auth"));
    assert_eq!(log[0].0["listener"], "mtls");
    assert_eq!(log[0].0["client_cert"]["subject"], "CN=workload-1");
    assert_eq!(log[0].0["client_cert"]["authorized"], true);
    assert_eq!(log[1].client_auth(), Some("self_signed_tls_client_auth"));
    assert_eq!(log[1].0["client_cert"]["authorized"], false);
    assert_eq!(log[3].0["client_cert"], Value::Null);
    assert_eq!(log[3].client_auth(), Some("none"));
}

#[tokio::test]
async fn jwt_bearer_and_token_exchange_accept_trusted_subject_tokens_only() {
    let workload = TestKey::es256("sa-key");
    let cfg = OpConfig {
        resources: vec![DEFAULT_RESOURCE.into(), OTHER_RESOURCE.into()],
        trusted_issuers: vec![TrustedIssuer {
            issuer: WORKLOAD_ISS.into(),
            audience: Some(WORKLOAD_AUD.into()),
            jwks: workload.jwks(),
        }],
        ..OpConfig::default()
    }
    .with_client(secret_client("sts", "s3cret", "client_secret_basic"));
    let op = Op::start(cfg).await;
    let v = Verifier::start(VerifierConfig::new(op.issuer(), DEFAULT_RESOURCE)).await;
    let sa = workload.subject_token(WORKLOAD_ISS, "system:serviceaccount:ns:app", WORKLOAD_AUD, 600);
    let actor = workload.subject_token(WORKLOAD_ISS, "system:serviceaccount:ns:gateway", WORKLOAD_AUD, 600);

    let jb = basic_token(&op, "sts", "s3cret", &[("grant_type", JWT_BEARER), ("assertion", &sa)]).await;
    assert_eq!(jb.status, 200, "{}", jb.body);
    let t = jb.body["access_token"].as_str().expect("token");
    assert_eq!(claims(t)["sub"], "system:serviceaccount:ns:app");
    assert_eq!(claims(t)["client_id"], "sts");
    assert_eq!(call(&v, "/", &format!("Bearer {t}"), None).await.0, 200);

    let te = basic_token(
        &op,
        "sts",
        "s3cret",
        &[
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", &sa),
            ("subject_token_type", TT_JWT),
            ("actor_token", &actor),
            ("actor_token_type", TT_JWT),
            ("audience", OTHER_RESOURCE),
        ],
    )
    .await;
    assert_eq!(te.status, 200, "{}", te.body);
    assert_eq!(te.body["issued_token_type"], "urn:ietf:params:oauth:token-type:access_token");
    let t = te.body["access_token"].as_str().expect("token");
    assert_eq!(claims(t)["aud"], OTHER_RESOURCE);
    assert_eq!(claims(t)["act"]["sub"], "system:serviceaccount:ns:gateway");
    // Its aud is the other resource: this verifier refuses it.
    assert_eq!(call(&v, "/", &format!("Bearer {t}"), None).await.0, 401);

    // Untrusted key, wrong audience, expired, garbage: invalid_grant. Missing type: invalid_request.
    let rogue = TestKey::es256("sa-key").subject_token(WORKLOAD_ISS, "x", WORKLOAD_AUD, 600);
    let wrong_aud = workload.subject_token(WORKLOAD_ISS, "x", "elsewhere", 600);
    let expired = {
        let now = tollgate_testkit::keys::now_secs();
        workload.sign(&json!({"iss": WORKLOAD_ISS, "sub": "x", "aud": WORKLOAD_AUD, "iat": now - 120, "exp": now - 60}))
    };
    for bad in [rogue.as_str(), wrong_aud.as_str(), expired.as_str(), "not-a-jwt"] {
        let r = basic_token(&op, "sts", "s3cret", &[("grant_type", JWT_BEARER), ("assertion", bad)]).await;
        assert_eq!((r.status, r.body["error"].as_str()), (400, Some("invalid_grant")), "{}", r.body);
        let r = basic_token(
            &op,
            "sts",
            "s3cret",
            &[("grant_type", TOKEN_EXCHANGE), ("subject_token", bad), ("subject_token_type", TT_JWT)],
        )
        .await;
        assert_eq!((r.status, r.body["error"].as_str()), (400, Some("invalid_grant")), "{}", r.body);
    }
    let r = basic_token(&op, "sts", "s3cret", &[("grant_type", TOKEN_EXCHANGE), ("subject_token", &sa)]).await;
    assert_eq!((r.status, r.body["error"].as_str()), (400, Some("invalid_request")));

    // With a DPoP proof, the exchanged token is bound to the proof's key.
    let key = TestKey::es256("dpop");
    let proof = key.dpop_proof("POST", &op.token_endpoint(), None, None);
    let r = http()
        .post(op.token_endpoint())
        .basic_auth("sts", Some("s3cret"))
        .header("dpop", &proof)
        .form(&[("grant_type", TOKEN_EXCHANGE), ("subject_token", &sa), ("subject_token_type", TT_JWT)])
        .send()
        .await
        .expect("reachable");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["token_type"], "DPoP", "{body}");
    let t = body["access_token"].as_str().expect("token");
    assert_eq!(claims(t)["cnf"]["jkt"].as_str(), Some(key.thumbprint().as_str()));
    assert_eq!(claims(t)["sub"], "system:serviceaccount:ns:app");

    let log = op.token_requests().await;
    assert_eq!(log[0].grant_type(), Some(JWT_BEARER));
    assert_eq!(log[0].subject(), Some("system:serviceaccount:ns:app"));
    assert_eq!(log[0].0["assertion"]["jti"], claims(&sa)["jti"]);
    assert_eq!(log[1].grant_type(), Some(TOKEN_EXCHANGE));
    assert_eq!(log[1].0["actor_token"]["sub"], "system:serviceaccount:ns:gateway");
    assert_eq!(log[1].0["subject_token_type"], TT_JWT);
    assert_eq!(log[1].audiences(), [OTHER_RESOURCE]);
    assert_eq!(log[1].0["issued_token_type"], "urn:ietf:params:oauth:token-type:access_token");
    assert_eq!(log.iter().filter(|r| r.0["error"] == "invalid_grant").count(), 8);
    assert_eq!(log.len(), 12);
    assert_eq!(log[11].issued_jkt(), Some(key.thumbprint().as_str()));
}

#[tokio::test]
async fn injected_failures_answer_then_stop() {
    let op = Op::start(OpConfig::default().with_client(secret_client("app", "s3cret", "client_secret_basic"))).await;
    op.fail(503, 2).await;
    let form = [("grant_type", "client_credentials")];
    let a = basic_token(&op, "app", "s3cret", &form).await;
    let b = basic_token(&op, "app", "s3cret", &form).await;
    let c = basic_token(&op, "app", "s3cret", &form).await;
    assert_eq!((a.status, b.status, c.status), (503, 503, 200));
    assert_eq!(a.body["error"], "temporarily_unavailable");
    op.fail_with(400, 1, Some("invalid_grant")).await;
    let d = basic_token(&op, "app", "s3cret", &form).await;
    assert_eq!((d.status, d.body["error"].as_str()), (400, Some("invalid_grant")));
    assert!(d.headers.get("cache-control").is_some());
    let log = op.token_requests().await;
    assert_eq!(
        log.iter().map(|r| (r.status(), r.injected())).collect::<Vec<_>>(),
        [(503, true), (503, true), (200, false), (400, true)]
    );
    assert!(log.iter().all(|r| r.client_id() == Some("app") && r.grant_type() == Some("client_credentials")));
    op.clear_log().await;
    assert!(op.log().await.is_empty());
}
