//! A provider's life across reloads and processes (issue 9), through the real binary:
//! admin authentication follows the address actually bound; reloads that keep a
//! provider's identity keep its token, its refresh token and its refresher (no second
//! refresher racing with rotating refresh tokens); a rotated secret keeps the current
//! token serving while the IdP is down; processes sharing one file store keep each
//! other's entries.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;
use tollgate_testkit::seeds::Tnid;

const SUCCESS: &str = "tollgate_config_reload_total{outcome=\"success\"}";
const RESTART_REQUIRED: &str = "tollgate_config_reload_total{outcome=\"restart_required\"}";
const REJECTED: &str = "tollgate_config_reload_total{outcome=\"rejected\"}";

/// Replace the one line of `text` that starts with `key = ` by `key = value`.
fn set_key(text: &str, key: &str, value: &str) -> String {
    let prefix = format!("{key} = ");
    assert_eq!(text.lines().filter(|l| l.starts_with(&prefix)).count(), 1, "`{key}` must appear once:\n{text}");
    text.lines()
        .map(|l| if l.starts_with(&prefix) { format!("{key} = {value}") } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

// --- a. admin authentication follows the bound address ---------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_to_loopback_without_a_token_keeps_the_admin_token_and_needs_a_restart() {
    let (idp, upstream, _ledger) = oauth2_doubles(IdpConfig::default()).await;
    let admin_token = "adm-lifecycle-7f3e";
    let text = oauth2_config(&idp, &upstream, "", "").replace(
        "[admin]\nlisten = \"{ADMIN}\"",
        &format!("[admin]\nlisten = \"0.0.0.0:{{ADMIN_PORT}}\"\ntoken = \"{admin_token}\""),
    );
    let mut tg = Tollgate::start_sighup_only(&text);
    tg.admin_token = Some(admin_token.into());
    tg.wait_ready().await;
    let c = client();
    let providers = tg.admin_url("/admin/providers");
    assert_eq!(c.get(&providers).send().await.unwrap().status(), 401, "bound to 0.0.0.0: the token is required");
    assert_eq!(tg.admin_get("/admin/providers").await.status(), 200);

    // The same port on loopback, without a token: the socket stays on 0.0.0.0 until a
    // restart, so the token must stay required.
    let port = tg.admin.port();
    let loopback = tg.config_text().replace(
        &format!("listen = \"0.0.0.0:{port}\"\ntoken = \"{admin_token}\""),
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    assert!(!loopback.contains(admin_token), "the rewrite removed the admin token");
    tg.write_config(&loopback);
    let m = tg.sighup_reload().await;

    let open = c.get(&providers).send().await.unwrap().status();
    assert_eq!(open, 401, "after the reload the admin API on 0.0.0.0 answered without the token");
    assert_eq!(tg.admin_get("/admin/providers").await.status(), 200, "the old token still opens it");
    assert_eq!(
        (metric_value(&m, RESTART_REQUIRED), metric_value(&m, SUCCESS), metric_value(&m, REJECTED)),
        (1.0, 0.0, 0.0),
        "a reload changing admin.listen is counted as restart_required:\n{m}"
    );
    assert!(tg.logs().contains("admin.listen"), "the log names the key that needs a restart");
    assert_eq!(c.get(tg.url("/still")).send().await.unwrap().status(), 200, "the rest of the reload applies");
    assert!(!tg.logs().contains(admin_token), "the admin token is never logged");
}

// --- b. rotating refresh tokens under 50 reloads ----------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn fifty_timing_reloads_during_rotating_refreshes_cause_no_invalid_grant_and_no_failed_request() {
    let cfg = IdpConfig {
        username: Some("svc@example.com".into()),
        password: Some("svc-password".into()),
        lifetime: Duration::from_secs(3),
        reuse_detection: true,
        ..IdpConfig::default()
    };
    let (idp, upstream, _ledger) = oauth2_doubles(cfg).await;
    // Each refresh takes a while, so that many reloads land while one is in flight.
    idp.set_delay(Duration::from_millis(150));
    let extra = "grant = \"password\"\nusername = \"svc@example.com\"\npassword = \"svc-password\"\nreauth_min_interval = \"1s\"";
    // A file store: a provider started afresh by a reload finds the stored refresh token,
    // which is what makes two refreshers present the same one.
    let mut text =
        oauth2_config(&idp, &upstream, extra, "token_wait = \"2s\"").replace("timeout = \"1s\"", "timeout = \"2s\"");
    text.push_str("\n[store]\nkind = \"file\"\npath = \"{DIR}/store/tokens.json\"\n");
    let tg = Tollgate::start_sighup_only(&text);
    tg.wait_ready().await;

    let traffic = Traffic::start_bounded(&tg, Duration::from_secs(50), 20_000);
    let started = Instant::now();
    let mut config = tg.config_text();
    for i in 0..50u32 {
        config = match i % 3 {
            0 => set_key(&config, "timeout", &format!("\"{}ms\"", 2000 + 10 * i)),
            1 => set_key(&config, "backoff_max", &format!("\"{}ms\"", 1000 + 10 * i)),
            _ => set_key(&config, "reauth_min_interval", &format!("\"{}ms\"", 1000 + 10 * i)),
        };
        tg.write_config(&config);
        tg.sighup_reload().await;
        // At least 7.5 s in all: the reloads span several 3 s token lifetimes.
        tokio::time::sleep(Duration::from_millis(150 + fastrand::u64(0..100))).await;
        assert!(started.elapsed() < Duration::from_secs(40), "50 reloads took over 40 s; logs:\n{}", tg.logs());
    }
    // Past the next refresh after the last reload.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, bad, firsts) = traffic.finish().await;

    assert_eq!(tg.metric(SUCCESS).await, 50.0, "every reload applied");
    assert_eq!(
        idp.invalid_grant_count(),
        0,
        "a refresh token was presented twice (families revoked: {})",
        idp.families_revoked()
    );
    assert_eq!(bad, 0, "client requests failed: {firsts:?}");
    assert!(ok > 100, "too little traffic to mean anything: {ok}");
    assert!(upstream.seen().iter().all(|s| s.accepted), "the upstream got a revoked or expired token");
    // Tokens are refreshed about every 1.5 s: over 9.5 s a correct refresher makes several.
    let refreshes = idp.count_grant("refresh_token");
    assert!(refreshes >= 3, "the reloads spanned only {refreshes} refresh_token grants");
}

// --- c. IdP down: timing change and secret rotation keep the token ----------------------

#[tokio::test(flavor = "multi_thread")]
async fn with_the_idp_down_a_backoff_change_and_a_secret_rotation_keep_serving_the_held_token() {
    let (idp, upstream, _ledger) =
        oauth2_doubles(IdpConfig { lifetime: Duration::from_secs(60), ..IdpConfig::default() }).await;
    let tg = Tollgate::start_sighup_only(&oauth2_config(&idp, &upstream, "", "token_wait = \"1s\""));
    tg.wait_ready().await;
    assert_eq!(idp.issued(), 1);

    idp.set_mode(Mode::Status(503, "temporarily_unavailable"));
    let traffic = Traffic::start_bounded(&tg, Duration::from_secs(30), 10_000);
    tokio::time::sleep(Duration::from_millis(300)).await;

    tg.write_config(&set_key(&tg.config_text(), "backoff_max", "\"2s\""));
    tg.sighup_reload().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    tg.write_config(&set_key(&tg.config_text(), "client_secret", "\"rotated-2\""));
    tg.sighup_reload().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (ok, bad, firsts) = traffic.finish().await;
    assert_eq!(bad, 0, "requests failed while the IdP was down and the held token valid: {firsts:?}");
    assert!(ok > 50, "too little traffic to mean anything: {ok}");
    assert_eq!(tg.metric(SUCCESS).await, 2.0);

    // The IdP heals and accepts only the new secret: tollgate gets a token with it.
    idp.set_client_secret("rotated-2");
    let healed = Instant::now();
    idp.set_mode(Mode::Normal);
    let with_new_secret = |idp: &Idp| {
        idp.seen()
            .iter()
            .any(|s| s.at >= healed && s.params.get("client_secret").map(String::as_str) == Some("rotated-2"))
    };
    while !with_new_secret(&idp) || idp.issued() < 2 {
        assert!(
            healed.elapsed() < Duration::from_secs(10),
            "no token obtained with the new secret within 10 s of the IdP healing; logs:\n{}",
            tg.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(client().get(tg.url("/healed")).send().await.unwrap().status(), 200);
    assert!(upstream.seen().iter().all(|s| s.accepted));
    assert!(!tg.logs().contains("rotated-2"), "the secret is never logged");
}

// --- d. two processes share one file store ----------------------------------------------

/// The number of entries in a token store file, whatever they are keyed by.
fn store_entries(path: &Path) -> usize {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read the store {}: {e}", path.display()));
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("the store file does not parse: {e}"));
    match ["tokens", "entries"].iter().find_map(|k| v.get(*k)) {
        Some(Value::Object(o)) => o.len(),
        Some(Value::Array(a)) => a.len(),
        _ => {
            let keys: Vec<&String> = v.as_object().map(|o| o.keys().collect()).unwrap_or_default();
            panic!("no `tokens` or `entries` in the store file; its top-level keys: {keys:?}")
        }
    }
}

/// Whether `needle` is one of the string values anywhere in `v` (without printing either).
fn holds_string(v: &Value, needle: &str) -> bool {
    match v {
        Value::String(s) => s == needle,
        Value::Array(a) => a.iter().any(|x| holds_string(x, needle)),
        Value::Object(o) => o.values().any(|x| holds_string(x, needle)),
        _ => false,
    }
}

fn shared_store_config(store: &Path, provider: &str, upstream: &Upstream, name: &str) -> String {
    support::store_file_config(&store.display().to_string(), name, provider, upstream, "")
}

#[tokio::test(flavor = "multi_thread")]
async fn two_processes_on_one_file_store_keep_each_others_entries_and_a_third_serves_the_human_token() {
    let shared = tempfile::tempdir().unwrap();
    let store = shared.path().join("tokens.json");

    let tnid_ledger = Ledger::default();
    let tnid = Tnid::start(tnid_ledger.clone()).await.unwrap();
    let human_upstream = Upstream::start(Some(tnid_ledger)).await.unwrap();
    let human = format!(
        "[providers.human]\nkind = \"tnid\"\nbase_url = \"{}\"\ntelephone_number = \"3024343434333\"\nfirst_name = \"John\"\n",
        tnid.url()
    );
    let a_config = shared_store_config(&store, &human, &human_upstream, "human");

    let (idp, machine_upstream, _ledger) = oauth2_doubles(IdpConfig::default()).await;
    let machine = format!(
        "[providers.machine]\nkind = \"oauth2\"\ntoken_url = \"{}\"\nclient_id = \"abc123\"\nclient_secret = \"456789\"\n",
        idp.url()
    );
    let b_config = shared_store_config(&store, &machine, &machine_upstream, "machine");

    // Both start before either writes: each opens the store as it is now.
    let mut a = Tollgate::start(&a_config);
    let b = Tollgate::start(&b_config);
    a.wait_healthy().await;
    b.wait_ready().await;

    // A: a human logs in through the admin API with the OTP TNID sent.
    let c = client();
    let r = c.post(a.admin_url("/admin/providers/human/login")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let otp = tnid.otp_for("3024343434333").expect("TNID sent an OTP");
    let r = c
        .post(a.admin_url("/admin/providers/human/login/code"))
        .header("content-type", "application/json")
        .body(format!(r#"{{"code":"{otp}"}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    assert_eq!(c.get(a.url("/me")).send().await.unwrap().status(), 200);
    let human_token = human_upstream.seen()[0].bearer().expect("A sent the TNID token").to_string();

    // B: 200 forced refreshes, each waited for.
    let started = Instant::now();
    for i in 0..200 {
        let r = c.post(b.admin_url("/admin/providers/machine/refresh")).send().await.unwrap();
        assert_eq!(r.status(), 200, "refresh {i}: {}", r.text().await.unwrap_or_default());
        assert!(started.elapsed() < Duration::from_secs(40), "200 refreshes took over 40 s");
    }
    assert_eq!(idp.issued(), 201);
    assert_eq!(c.get(b.url("/machine")).send().await.unwrap().status(), 200);

    // A's entry survived B's 200 saves.
    let text = std::fs::read_to_string(&store).unwrap();
    let parsed: Value = serde_json::from_str(&text).expect("the store file parses");
    assert!(holds_string(&parsed, &human_token), "A's TNID token is no longer in the store file");
    assert_eq!(store_entries(&store), 2, "one entry per provider, A's and B's");

    // C, a new process with A's config on the same file, serves the human token without
    // a login: no OTP sent, no token request at TNID.
    a.kill_hard();
    let calls = (tnid.calls("/auth/create_user_otp"), tnid.calls("/auth/token"));
    let cc = Tollgate::start(&a_config);
    cc.wait_ready().await;
    let r = c.get(cc.url("/from-c")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    assert_eq!((tnid.calls("/auth/create_user_otp"), tnid.calls("/auth/token")), calls, "C asked TNID again");
    let last = human_upstream.seen().pop().unwrap();
    assert!(last.accepted && last.bearer() == Some(human_token.as_str()), "C sent another token than A's");
    assert_eq!(store_entries(&store), 2);
    for tg in [&b, &cc] {
        assert!(!tg.logs().contains(&human_token) && !tg.logs().contains(&otp), "a token or the OTP was logged");
    }
}

// --- e. reloads that keep the identity keep the token -----------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_timing_only_reload_keeps_the_token() {
    let (idp, upstream, _ledger) = oauth2_doubles(IdpConfig::default()).await;
    let tg = Tollgate::start_sighup_only(&oauth2_config(&idp, &upstream, "", ""));
    tg.wait_ready().await;
    let c = client();
    assert_eq!(c.get(tg.url("/before")).send().await.unwrap().status(), 200);
    let before = upstream.seen().pop().unwrap().bearer().map(str::to_string);
    let requests = idp.count();

    let traffic = Traffic::start(&tg);
    let text = set_key(&tg.config_text(), "timeout", "\"3s\"");
    tg.write_config(&set_key(&text, "backoff_max", "\"2s\""));
    tg.sighup_reload().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, bad, firsts) = traffic.finish().await;

    assert_eq!(tg.metric(SUCCESS).await, 1.0, "the reload applied");
    assert_eq!(idp.count(), requests, "a timing change made a token request");
    assert_eq!(bad, 0, "requests failed: {firsts:?}");
    assert!(ok > 10, "too little traffic: {ok}");
    assert_eq!(c.get(tg.url("/after")).send().await.unwrap().status(), 200);
    assert_eq!(upstream.seen().pop().unwrap().bearer().map(str::to_string), before, "the token changed");
    assert!(upstream.seen().iter().all(|s| s.accepted));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_header_prefix_only_reload_keeps_the_token() {
    let ledger = Ledger::default();
    let idp = Idp::start(IdpConfig::default(), ledger.clone()).await.unwrap();
    // This upstream takes any Authorization scheme; the test checks the token itself.
    let upstream = Upstream::start(None).await.unwrap();
    let tg = Tollgate::start_sighup_only(&oauth2_config(&idp, &upstream, "", ""));
    tg.wait_ready().await;
    let c = client();
    assert_eq!(c.get(tg.url("/before")).send().await.unwrap().status(), 200);
    let before = upstream.seen().pop().unwrap().header("authorization").unwrap().to_string();
    let token = before.strip_prefix("Bearer ").expect("a Bearer header").to_string();
    let requests = idp.count();

    let traffic = Traffic::start(&tg);
    let text =
        tg.config_text().replace("provider = \"backend\"\n", "provider = \"backend\"\nheader_prefix = \"Token \"\n");
    tg.write_config(&text);
    tg.sighup_reload().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, bad, firsts) = traffic.finish().await;

    assert_eq!(tg.metric(SUCCESS).await, 1.0, "the reload applied");
    assert_eq!(idp.count(), requests, "a header-prefix change made a token request");
    assert_eq!(bad, 0, "requests failed: {firsts:?}");
    assert!(ok > 10, "too little traffic: {ok}");
    assert_eq!(c.get(tg.url("/after")).send().await.unwrap().status(), 200);
    let after = upstream.seen().pop().unwrap().header("authorization").unwrap().to_string();
    assert!(after == format!("Token {token}"), "the new prefix with the same token");
    assert!(ledger.check(&token).is_ok());
}
