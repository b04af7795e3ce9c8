//! Hot reload through the real binary: a Kubernetes-style secret rotation picked up by
//! the file watcher under traffic, a bad config rejected while the old one keeps
//! serving, and SIGHUP.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::*;

const SUCCESS: &str = "tollgate_config_reload_total{outcome=\"success\"}";
const REJECTED: &str = "tollgate_config_reload_total{outcome=\"rejected\"}";

/// The watcher logs this once its watches are in place; changes made before could be missed.
async fn wait_watching(tg: &Tollgate) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tg.logs().contains("watching the configuration and secret files") {
        assert!(Instant::now() < deadline, "file watcher never started; logs:\n{}", tg.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_metric(tg: &Tollgate, series: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = tg.metric(series).await;
        if v >= at_least {
            return;
        }
        assert!(Instant::now() < deadline, "{series} stayed at {v}; logs:\n{}", tg.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Replace `path` atomically, as an editor saving by rename or a config-management tool does.
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write temp");
    std::fs::rename(&tmp, path).expect("rename over");
}

#[tokio::test(flavor = "multi_thread")]
async fn secret_rotated_by_a_kubernetes_style_symlink_swap_is_picked_up_under_traffic() {
    // A Secret volume as the kubelet lays it out: the visible name links through `..data`,
    // which links to a timestamped directory; an update swaps `..data` in one rename.
    let secrets = tempfile::tempdir().unwrap();
    let d = secrets.path();
    std::fs::create_dir(d.join("..2026_a")).unwrap();
    std::fs::write(d.join("..2026_a/client-secret"), "456789\n").unwrap();
    std::os::unix::fs::symlink("..2026_a", d.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/client-secret", d.join("client-secret")).unwrap();

    let (idp, upstream, _ledger) = oauth2_doubles(IdpConfig::default()).await;
    let text = oauth2_config(&idp, &upstream, "", "").replace(
        "client_secret = \"456789\"",
        &format!("client_secret = {{ file = \"{}\" }}", d.join("client-secret").display()),
    );
    let tg = Tollgate::start(&text);
    tg.wait_ready().await;
    wait_watching(&tg).await;
    assert_eq!(idp.seen()[0].params.get("client_secret").map(String::as_str), Some("456789"));

    let traffic = Traffic::start(&tg);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Rotate: the IdP switches to the new secret, then the volume is updated.
    idp.set_client_secret("rotated-2");
    std::fs::create_dir(d.join("..2026_b")).unwrap();
    std::fs::write(d.join("..2026_b/client-secret"), "rotated-2\n").unwrap();
    std::os::unix::fs::symlink("..2026_b", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    std::fs::remove_dir_all(d.join("..2026_a")).unwrap();
    let rotated = Instant::now();

    while !idp.seen().iter().any(|s| s.params.get("client_secret").map(String::as_str) == Some("rotated-2")) {
        assert!(
            rotated.elapsed() < Duration::from_secs(5),
            "no token request with the new secret within 5 s; logs:\n{}",
            tg.logs()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Keep traffic going on the new provider for a moment.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, bad, firsts) = traffic.finish().await;

    assert_eq!(bad, 0, "no client request may fail during a rotation: {firsts:?}");
    assert!(ok > 20, "too little traffic to mean anything: {ok}");
    assert!(upstream.seen().iter().all(|s| s.accepted), "the upstream got only current tokens");
    assert!(tg.metric(SUCCESS).await >= 1.0);
    assert_eq!(tg.metric(REJECTED).await, 0.0);
    let logs = tg.logs();
    assert!(logs.contains("configuration reloaded"), "{logs}");
    assert!(!logs.contains("rotated-2"), "the secret must not be logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_config_is_rejected_and_the_old_one_keeps_serving_until_fixed() {
    let (idp, upstream, ledger) = oauth2_doubles(IdpConfig::default()).await;
    let second = Upstream::start(Some(ledger)).await.unwrap();
    let tg = Tollgate::start(&oauth2_config(&idp, &upstream, "", ""));
    tg.wait_ready().await;
    wait_watching(&tg).await;
    let m = tg.metrics().await;
    assert!(m.contains(&format!("{SUCCESS} 0")) && m.contains(&format!("{REJECTED} 0")), "series from start-up:\n{m}");

    let good = std::fs::read_to_string(&tg.config_path).unwrap();
    // Written in place (truncate, write), as `echo >` or a careless editor would.
    std::fs::write(&tg.config_path, good.replacen("[proxy]\n", "[proxy]\nbogus_key = 1\n", 1)).unwrap();
    wait_metric(&tg, REJECTED, 1.0).await;
    let logs = tg.logs();
    assert!(logs.contains("configuration reload rejected"), "{logs}");
    assert!(logs.contains("bogus_key"), "the error names the key: {logs}");
    let c = client();
    for _ in 0..5 {
        assert_eq!(c.get(tg.url("/still")).send().await.unwrap().status(), 200);
    }
    // The same bad content is not retried over and over.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(tg.metric(REJECTED).await, 1.0);
    assert_eq!(tg.metric(SUCCESS).await, 0.0);

    let fixed = format!(
        "{good}\n[[routes]]\nname = \"second\"\npath_prefix = \"/second\"\nupstream = \"{}\"\nprovider = \"backend\"\n",
        second.url()
    );
    write_atomic(&tg.config_path, &fixed);
    wait_metric(&tg, SUCCESS, 1.0).await;
    let r = c.get(tg.url("/second/x")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(second.count(), 1, "the new route goes to the new upstream");
    assert!(second.seen()[0].accepted && upstream.seen().iter().all(|s| s.accepted));
    assert_eq!(second.seen()[0].bearer(), upstream.seen()[0].bearer(), "the provider kept its token");
    assert_eq!(idp.count(), 1, "neither reload made a token request");
    assert_eq!(tg.metric(REJECTED).await, 1.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_routes_and_keeps_the_token() {
    let (idp, upstream, _ledger) = oauth2_doubles(IdpConfig::default()).await;
    let text = oauth2_config(&idp, &upstream, "", "")
        .replace("provider = \"backend\"\n", "provider = \"backend\"\nset_headers = { \"X-Tenant\" = \"one\" }\n");
    let tg = Tollgate::start(&text);
    tg.wait_ready().await;
    wait_watching(&tg).await;

    // Make the config path a link into a directory the watcher does not watch, so that an
    // edit there is seen only by SIGHUP. The swap itself changes no content: no reload.
    let real_dir = tg.dir.path().join("real");
    std::fs::create_dir(&real_dir).unwrap();
    let real = real_dir.join("tollgate.toml");
    std::fs::copy(&tg.config_path, &real).unwrap();
    let link = tg.dir.path().join("link.tmp");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    std::fs::rename(&link, &tg.config_path).unwrap();
    // Let the watcher look at the swap (and find nothing changed) before editing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    std::fs::write(&real, std::fs::read_to_string(&real).unwrap().replace("\"one\"", "\"two\"")).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let c = client();
    assert_eq!(c.get(tg.url("/before")).send().await.unwrap().status(), 200);
    let before = upstream.seen().pop().unwrap();
    assert_eq!(before.header("x-tenant"), Some("one"));
    assert_eq!(tg.metric(SUCCESS).await, 0.0, "the watcher must not have reloaded");

    tg.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    let after = loop {
        assert_eq!(c.get(tg.url("/after")).send().await.unwrap().status(), 200);
        let s = upstream.seen().pop().unwrap();
        if s.header("x-tenant") == Some("two") {
            break s;
        }
        assert!(Instant::now() < deadline, "SIGHUP did not apply the new header; logs:\n{}", tg.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(tg.metric(SUCCESS).await, 1.0);
    assert_eq!(after.bearer(), before.bearer(), "the provider kept its token");
    assert_eq!(idp.count(), 1, "a routes-only change makes no token request");
    assert!(upstream.seen().iter().all(|s| s.accepted));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_removed_by_a_reload_leaves_no_metric_series_behind() {
    let (idp, upstream, _ledger) = oauth2_doubles(IdpConfig::default()).await;
    let base = oauth2_config(&idp, &upstream, "", "");
    let extra = format!(
        "{base}\n[providers.extra]\nkind = \"oauth2\"\ntoken_url = \"{}\"\nclient_id = \"abc123\"\nclient_secret = \"456789\"\n\n[[routes]]\nname = \"extra\"\npath_prefix = \"/extra\"\nupstream = \"{}\"\nprovider = \"extra\"\n",
        idp.url(),
        upstream.url()
    );
    let tg = Tollgate::start(&extra);
    tg.wait_ready().await;
    wait_watching(&tg).await;
    assert!(tg.metrics().await.contains("tollgate_token_valid{provider=\"extra\"} 1"));
    let text = std::fs::read_to_string(&tg.config_path).unwrap();
    let without = text[..text.find("\n[providers.extra]").unwrap()].to_string();
    write_atomic(&tg.config_path, &without);
    wait_metric(&tg, SUCCESS, 1.0).await;
    let m = tg.metrics().await;
    assert!(!m.contains("provider=\"extra\""), "series of the removed provider remain:\n{m}");
    assert!(m.contains("tollgate_token_valid{provider=\"backend\"} 1"));
    assert_eq!(client().get(tg.url("/still")).send().await.unwrap().status(), 200);
}

/// `proxy.fast_path` is read per connection: a reload turns it on and off for the
/// connections that come after, with the same token, and `/admin/proxy` says so.
#[tokio::test(flavor = "multi_thread")]
async fn a_reload_turns_the_fast_path_on_and_off_for_new_connections() {
    let (idp, upstream, _ledger) = oauth2_doubles(IdpConfig::default()).await;
    let text = oauth2_config(&idp, &upstream, "", "fast_path = false");
    let tg = Tollgate::start_sighup_only(&text);
    tg.wait_ready().await;
    let served = |s: serde_json::Value| (s["fast_path"].as_bool(), s["fast_path_requests"].as_u64());
    let status = || async { tg.admin_get("/admin/proxy").await.json::<serde_json::Value>().await.unwrap() };

    // A fresh client per phase: a kept-alive connection stays with the path it started on.
    assert_eq!(client().get(tg.url("/off")).send().await.unwrap().status(), 200);
    assert_eq!(served(status().await), (Some(false), Some(0)));

    let live = tg.config_text();
    tg.write_config(&live.replace("fast_path = false", "fast_path = true"));
    tg.sighup_reload().await;
    for i in 0..3 {
        assert_eq!(client().get(tg.url(&format!("/on/{i}"))).send().await.unwrap().status(), 200);
    }
    assert_eq!(
        served(status().await),
        (Some(true), Some(3)),
        "each new connection took the fast path; logs:\n{}",
        tg.logs()
    );

    tg.write_config(&live);
    tg.sighup_reload().await;
    assert_eq!(client().get(tg.url("/off-again")).send().await.unwrap().status(), 200);
    assert_eq!(served(status().await), (Some(false), Some(3)), "off again: pingora serves new connections");

    let seen = upstream.seen();
    assert_eq!(
        seen.iter().map(|s| s.path.as_str()).collect::<Vec<_>>(),
        ["/off", "/on/0", "/on/1", "/on/2", "/off-again"]
    );
    let token = seen[0].bearer();
    assert!(token.is_some() && seen.iter().all(|s| s.bearer() == token), "one token on both paths");
    assert_eq!(idp.count(), 1, "switching paths makes no token request");
}
