//! The file store under `kill -9`: whatever moment the process dies, the file holds
//! either the old or the new content, and a restart uses it.

mod support;

use std::time::Duration;

use support::*;
use tollgate::store::{FileStore, TokenStore};

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_at_random_moments_never_leaves_a_torn_store() {
    // 1 s tokens: the refresher rewrites the store about twice a second.
    let (idp, upstream, _ledger) =
        oauth2_doubles(IdpConfig { lifetime: Duration::from_secs(1), ..IdpConfig::default() }).await;
    let mut cfg = oauth2_config(&idp, &upstream, "expiry_margin = \"100ms\"", "");
    cfg.push_str("\n[store]\nkind = \"file\"\npath = \"{DIR}/tokens.json\"\n");
    let mut tg = Tollgate::start(&cfg);
    let store = tg.dir.path().join("tokens.json");
    tg.wait_ready().await;
    for round in 0..8 {
        tokio::time::sleep(Duration::from_millis(150 + fastrand::u64(0..700))).await;
        tg.restart_hard();
        let s = FileStore::open(store.clone()).unwrap_or_else(|e| panic!("round {round}: torn store: {e}"));
        // Entries are keyed by the provider's identity hash; this config has one provider.
        let file: serde_json::Value = serde_json::from_slice(&std::fs::read(&store).unwrap()).unwrap();
        let keys: Vec<String> = file["tokens"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys.len(), 1, "round {round}: one provider, one entry");
        assert!(s.load(&keys[0]).await.unwrap().is_some(), "round {round}: the token is in the store");
        tg.wait_ready().await;
        assert_eq!(client().get(tg.url("/after-restart")).send().await.unwrap().status(), 200);
    }
    assert!(upstream.seen().iter().all(|s| s.accepted));
}
