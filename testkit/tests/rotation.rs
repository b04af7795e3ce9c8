//! The token-endpoint double's rotating refresh tokens and reuse detection, as a client
//! sees them over HTTP.

use std::time::Duration;

use serde_json::Value;
use tollgate_testkit::idp::{Idp, IdpConfig};
use tollgate_testkit::Ledger;

async fn grant(idp: &Idp, form: &[(&str, &str)]) -> (u16, Value) {
    let mut fields = vec![("client_id", "abc123"), ("client_secret", "456789")];
    fields.extend_from_slice(form);
    let r = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
        .post(idp.url())
        .form(&fields)
        .send()
        .await
        .expect("token request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn password(idp: &Idp) -> (String, String) {
    let (status, body) = grant(idp, &[("grant_type", "password"), ("username", "u"), ("password", "p")]).await;
    assert_eq!(status, 200, "{body}");
    (body["access_token"].as_str().unwrap().into(), body["refresh_token"].as_str().unwrap().into())
}

async fn refresh(idp: &Idp, rt: &str) -> (u16, Value) {
    grant(idp, &[("grant_type", "refresh_token"), ("refresh_token", rt)]).await
}

fn config(reuse_detection: bool) -> IdpConfig {
    IdpConfig { username: Some("u".into()), password: Some("p".into()), reuse_detection, ..IdpConfig::default() }
}

#[tokio::test]
async fn a_reused_refresh_token_revokes_its_whole_family_and_no_other() {
    let ledger = Ledger::default();
    let idp = Idp::start(config(true), ledger.clone()).await.unwrap();
    let (a0, rt0) = password(&idp).await;
    let (other_access, other_rt) = password(&idp).await;

    let (status, body) = refresh(&idp, &rt0).await;
    assert_eq!(status, 200, "{body}");
    let a1 = body["access_token"].as_str().unwrap().to_string();
    let rt1 = body["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(rt1, rt0, "every refresh issues a new refresh token");
    assert!(ledger.check(&a0).is_ok() && ledger.check(&a1).is_ok());
    assert_eq!(idp.invalid_grant_count(), 0);

    // The spent one comes back: invalid_grant, and the family is gone.
    let (status, body) = refresh(&idp, &rt0).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_grant")));
    assert_eq!(idp.invalid_grant_count(), 1);
    assert_eq!(idp.families_revoked(), 1);
    assert!(ledger.check(&a0).is_err() && ledger.check(&a1).is_err(), "the family's access tokens are revoked");
    assert_eq!(refresh(&idp, &rt1).await.0, 400, "the family's newest refresh token is revoked too");
    assert_eq!(idp.invalid_grant_count(), 2);

    // Another grant's family is untouched.
    assert!(ledger.check(&other_access).is_ok());
    assert_eq!(idp.live_refresh_tokens(), vec![other_rt.clone()]);
    assert_eq!(refresh(&idp, &other_rt).await.0, 200);
    assert_eq!(idp.count_grant("refresh_token"), 4);
}

#[tokio::test]
async fn without_reuse_detection_a_spent_refresh_token_is_only_refused() {
    let ledger = Ledger::default();
    let idp = Idp::start(config(false), ledger.clone()).await.unwrap();
    let (a0, rt0) = password(&idp).await;
    let (status, body) = refresh(&idp, &rt0).await;
    assert_eq!(status, 200);
    let rt1 = body["refresh_token"].as_str().unwrap().to_string();
    assert_eq!(refresh(&idp, &rt0).await.0, 400);
    assert_eq!(idp.invalid_grant_count(), 1);
    assert_eq!(idp.families_revoked(), 0);
    assert!(ledger.check(&a0).is_ok(), "nothing is revoked");
    assert_eq!(refresh(&idp, &rt1).await.0, 200);
}
