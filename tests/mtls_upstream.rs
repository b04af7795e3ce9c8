//! RFC 8705 certificate-bound tokens end to end: tollgate authenticates to the real
//! OpenID Provider (node `oidc-provider`, testkit/op) with `tls_client_auth`, the provider
//! binds each access token to that client certificate (`cnf.x5t#S256`), and with
//! `upstream_client_cert = true` tollgate presents the same certificate to an HTTPS
//! upstream that verifies the token and its binding itself
//! ([`tollgate_testkit::verifier`] in TLS mode).
//!
//! A second provider with the same client but `upstream_client_cert = false` gets the same
//! kind of bound token and is refused by the upstream: the binding check is real.

mod support;

use std::path::Path;

use serde_json::json;
use support::{client, Tollgate};
use tollgate_testkit::keys::{TestCa, TestCert};
use tollgate_testkit::op::{client as op_client, Op, OpConfig, OpTls, DEFAULT_RESOURCE};
use tollgate_testkit::verifier::{Verifier, VerifierConfig, VerifierTls};

/// The name the upstream is verified as. Not `127.0.0.1`: pingora's OpenSSL connector
/// checks the name with `X509_VERIFY_PARAM_add1_host`, which matches DNS names only, so an
/// IP-literal upstream never matches the certificate's IP SAN (a 502 `InvalidCert`).
const SNI: &str = "localhost";

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write test file");
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_certificate_goes_upstream_only_where_asked_and_bound_tokens_need_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new("test-ca");
    let workload = ca.client_cert("workload-1");
    let bound_x5t = workload.x5t_s256();
    let mut tls = op_client("tls", "tls_client_auth");
    tls["tls_client_auth_subject_dn"] = json!(workload.subject_dn);
    tls["tls_client_certificate_bound_access_tokens"] = json!(true);
    let op = Op::start(OpConfig { tls: Some(OpTls::issued_by(&ca)), ..OpConfig::default() }.with_client(tls)).await;
    let v = Verifier::start(VerifierConfig {
        tls: Some(VerifierTls::issued_by(&ca)),
        ..VerifierConfig::new(op.issuer(), DEFAULT_RESOURCE)
    })
    .await;
    assert!(v.url().starts_with("https://127.0.0.1:"), "{}", v.url());

    let ca_file = write(dir.path(), "ca.pem", &ca.cert_pem);
    let cert_file = write(dir.path(), "client.crt", &workload.cert_pem);
    let key_file = write(dir.path(), "client.key", &workload.key_pem);
    let provider = |name: &str, upstream_cert: bool| {
        format!(
            "[providers.{name}]\nkind = \"oauth2\"\nissuer = \"{iss}\"\nclient_id = \"tls\"\nclient_auth = \"tls_client_auth\"\nclient_cert_file = \"{cert_file}\"\nclient_key_file = \"{key_file}\"\nca_file = \"{ca_file}\"\nupstream_client_cert = {upstream_cert}\nbackoff_min = \"100ms\"\nbackoff_max = \"1s\"\ntimeout = \"5s\"\n",
            iss = op.issuer()
        )
    };
    let route = |name: &str| {
        format!(
            "[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"{up}\"\nprovider = \"{name}\"\nca_file = \"{ca_file}\"\nsni = \"{SNI}\"\n",
            up = v.url()
        )
    };
    let config = format!(
        "[proxy]\nlisten = \"{{PROXY}}\"\n\n[admin]\nlisten = \"{{ADMIN}}\"\n\n{}\n{}\n{}\n{}",
        provider("bound", true),
        provider("unbound", false),
        route("bound"),
        route("unbound"),
    );
    let tg = Tollgate::start(&config);
    tg.wait_ready().await;

    let c = client();
    for i in 0..5 {
        let r = c.get(tg.url(&format!("/bound/x?i={i}"))).send().await.expect("request through tollgate");
        let status = r.status();
        let body = r.text().await.unwrap_or_default();
        assert_eq!(status, 200, "{body}\nverifier saw: {:?}\nlogs:\n{}", v.seen(), tg.logs());
    }
    let r = c.get(tg.url("/unbound/x")).send().await.expect("request through tollgate");
    assert_eq!(r.status(), 401, "a bound token without its certificate must be refused upstream");

    // Both providers got tokens bound to the workload certificate, over the mTLS alias.
    let log = op.token_requests().await;
    let good: Vec<_> = log.iter().filter(|r| r.ok()).collect();
    assert!(good.len() >= 2, "one token per provider at least: {:?}", log.iter().map(|r| &r.0).collect::<Vec<_>>());
    for r in &good {
        assert_eq!(r.client_auth(), Some("tls_client_auth"), "{}", r.0);
        assert_eq!(r.0["listener"], "mtls", "{}", r.0);
        assert_eq!(r.0["issued"]["cnf"]["x5t#S256"].as_str(), Some(bound_x5t.as_str()), "{}", r.0);
    }

    // What the upstream saw: the bound route presented the very certificate its token is
    // bound to; the other presented none and was refused for it.
    let seen = v.seen();
    let bound: Vec<_> = seen.iter().filter(|r| r.path.starts_with("/bound/")).collect();
    assert_eq!(bound.len(), 5, "{bound:?}");
    for r in &bound {
        assert!(r.accepted, "{r:?}");
        assert_eq!(r.token_x5t.as_deref(), Some(bound_x5t.as_str()), "{r:?}");
        assert_eq!(r.client_x5t.as_deref(), Some(bound_x5t.as_str()), "{r:?}");
    }
    let unbound: Vec<_> = seen.iter().filter(|r| r.path.starts_with("/unbound/")).collect();
    assert!(!unbound.is_empty(), "the unbound route's request reached the upstream");
    for r in &unbound {
        assert!(!r.accepted, "{r:?}");
        assert_eq!(r.token_x5t.as_deref(), Some(bound_x5t.as_str()), "{r:?}");
        assert_eq!(r.client_x5t, None, "no certificate was asked to go upstream: {r:?}");
        assert_eq!(r.reason.as_deref(), Some("certificate-bound token without the bound certificate"), "{r:?}");
        assert_eq!(r.error.as_deref(), Some("invalid_token"));
    }
    assert!(tg.metric("tollgate_upstream_challenges_total{error=\"invalid_token\",route=\"unbound\"}").await >= 1.0);
}

/// A client of the verifier (and of the OP's mTLS alias) trusting `ca`, presenting `id`.
fn mtls_client(ca: &TestCa, id: Option<&TestCert>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem.as_bytes()).expect("CA"));
    if let Some(id) = id {
        b = b.identity(reqwest::Identity::from_pem(id.identity_pem().as_bytes()).expect("identity"));
    }
    b.build().expect("client")
}

/// The verifier's own RFC 8705 check, without tollgate: the bound certificate passes;
/// no certificate, another one from the same CA, or (with a CA-less verifier) a
/// self-signed one do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_verifier_accepts_a_bound_token_only_with_its_certificate() {
    let ca = TestCa::new("test-ca");
    let (good, other) = (ca.client_cert("workload-1"), ca.client_cert("workload-2"));
    let selfsigned = TestCert::self_signed_client("self-1");
    let mut tls = op_client("tls", "tls_client_auth");
    tls["tls_client_auth_subject_dn"] = json!(good.subject_dn);
    tls["tls_client_certificate_bound_access_tokens"] = json!(true);
    let op = Op::start(OpConfig { tls: Some(OpTls::issued_by(&ca)), ..OpConfig::default() }.with_client(tls)).await;
    let te = op.mtls_token_endpoint().expect("mtls alias");
    let r = mtls_client(&ca, Some(&good))
        .post(&te)
        .form(&[("grant_type", "client_credentials"), ("client_id", "tls")])
        .send()
        .await
        .expect("token request");
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.expect("token response");
    let token = body["access_token"].as_str().expect("access_token").to_string();

    let strict = Verifier::start(VerifierConfig {
        tls: Some(VerifierTls::issued_by(&ca)),
        ..VerifierConfig::new(op.issuer(), DEFAULT_RESOURCE)
    })
    .await;
    // CA-less: any certificate is taken, so the self-signed one reaches the binding check.
    let any = Verifier::start(VerifierConfig {
        tls: Some(VerifierTls { client_ca_pem: None, ..VerifierTls::issued_by(&ca) }),
        ..VerifierConfig::new(op.issuer(), DEFAULT_RESOURCE)
    })
    .await;
    for (v, id, status) in [
        (&strict, Some(&good), 200),
        (&strict, None, 401),
        (&strict, Some(&other), 401),
        (&any, Some(&good), 200),
        (&any, Some(&selfsigned), 401),
    ] {
        let r = mtls_client(&ca, id)
            .get(format!("{}/api", v.url()))
            .bearer_auth(&token)
            .send()
            .await
            .expect("verifier reachable");
        assert_eq!(r.status(), status, "{id:?}");
        if status == 401 {
            let www = r.headers().get("www-authenticate").and_then(|h| h.to_str().ok()).unwrap_or_default();
            assert!(www.starts_with("Bearer error=\"invalid_token\""), "{www}");
        }
    }
    let x5t = |c: &TestCert| Some(c.x5t_s256());
    let s: Vec<_> = strict.seen().into_iter().map(|r| (r.accepted, r.client_x5t, r.reason)).collect();
    assert_eq!(
        s,
        vec![
            (true, x5t(&good), None),
            (false, None, Some("certificate-bound token without the bound certificate".to_string())),
            (false, x5t(&other), Some("certificate-bound token with another certificate".to_string())),
        ]
    );
    let a: Vec<_> = any.seen().into_iter().map(|r| (r.accepted, r.client_x5t, r.token_x5t)).collect();
    assert_eq!(a, vec![(true, x5t(&good), x5t(&good)), (false, x5t(&selfsigned), x5t(&good))]);
}
