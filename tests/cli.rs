//! The command line: `check` on good and bad configs, `run` refusing a bad one, `demo`.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const GOOD: &str = r#"
[providers.backend]
kind = "oauth2"
token_url = "http://127.0.0.1:9/oauth/v2/token"
client_id = "abc123"
client_secret = { file = "{DIR}/secret" }
[[routes]]
upstream = "http://127.0.0.1:9"
provider = "backend"
"#;

fn check(config: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "super-secret-value\n").unwrap();
    let path = dir.path().join("t.toml");
    std::fs::write(&path, config.replace("{DIR}", &dir.path().display().to_string())).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["check", "--config"]).arg(&path).env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn check_prints_resolved_config_with_secrets_redacted() {
    let (code, out, err) = check(GOOD, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("provider backend: oauth2") && out.contains("client_secret <redacted>"), "{out}");
    assert!(out.contains("route route0"), "{out}");
    assert!(!out.contains("super-secret-value") && !err.contains("super-secret-value"));
}

#[test]
fn bad_configs_exit_nonzero_naming_key_and_source() {
    // (config, environment, what the error must name)
    type Case<'a> = (String, Vec<(&'a str, &'a str)>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (format!("{GOOD}\n[proxy]\nlisten_port = 1\n"), vec![], vec!["listen_port", "t.toml"]),
        (GOOD.replace("{DIR}/secret", "{DIR}/missing"), vec![], vec!["providers.backend.client_secret", "missing"]),
        (GOOD.replace("provider = \"backend\"", "provider = \"other\""), vec![], vec!["routes.0.provider", "other"]),
        (
            GOOD.replace("http://127.0.0.1:9/oauth/v2/token", "ftp://x/y"),
            vec![],
            vec!["providers.backend.token_url", "ftp"],
        ),
        (GOOD.replace("upstream = \"http://127.0.0.1:9\"", "upstream = \"::bad\""), vec![], vec!["routes.0.upstream"]),
        (GOOD.to_string(), vec![("TOLLGATE_PROXY__THREADS", "0")], vec!["proxy.threads", "TOLLGATE_PROXY__THREADS"]),
        (
            GOOD.to_string(),
            vec![("TOLLGATE_PROVIDERS__BACKEND__TOKEN_URL", "nope")],
            vec!["providers.backend.token_url", "TOLLGATE_PROVIDERS__BACKEND__TOKEN_URL"],
        ),
        (
            GOOD.replace("client_secret = { file = \"{DIR}/secret\" }", "client_secret = { env = \"TG_UNSET_VAR\" }"),
            vec![],
            vec!["TG_UNSET_VAR"],
        ),
        (
            GOOD.replace("http://127.0.0.1:9/oauth/v2/token", "http://id:super-secret-value@127.0.0.1:9/token"),
            vec![],
            vec!["providers.backend.token_url", "credentials in the URL"],
        ),
    ];
    for (config, env, needles) in cases {
        let (code, _out, err) = check(&config, &env);
        assert_eq!(code, 2, "must fail: {err}");
        for n in needles {
            assert!(err.contains(n), "error should name `{n}`: {err}");
        }
        assert!(!err.contains("super-secret-value"));
    }
}

#[test]
fn env_override_applies() {
    let (code, out, err) = check(GOOD, &[("TOLLGATE_PROXY__LISTEN", "127.0.0.1:18181")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("listen 127.0.0.1:18181"), "{out}");
    // Digits stay a string for string keys and become a number for numeric keys.
    let (code, out, err) =
        check(GOOD, &[("TOLLGATE_PROVIDERS__BACKEND__CLIENT_ID", "0123456"), ("TOLLGATE_PROXY__THREADS", "3")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("client_id 0123456") && out.contains("threads 3"), "{out}");
}

#[test]
fn run_refuses_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.toml");
    std::fs::write(&path, "[routes]\nnope = 1\n").unwrap();
    let out = run_cli(&["run", "--config", path.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("routes"));
}

#[test]
fn version_is_printed() {
    let out = run_cli(&["--version"], std::path::Path::new("."));
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("tollgate {}", env!("CARGO_PKG_VERSION")));
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_injects_and_refreshes() {
    let (proxy, admin) = (free_port(), free_port());
    let mut child = Command::new(BIN)
        .args(["demo", "--listen", &proxy.to_string(), "--admin-listen", &admin.to_string(), "--token-lifetime", "2s"])
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let banner = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .take_while(|l| !l.starts_with("Stop with"))
            .collect::<Vec<_>>()
            .join("\n")
    });
    let c = client();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut tokens = std::collections::BTreeSet::new();
    while tokens.len() < 2 && Instant::now() < deadline {
        if let Ok(r) = c.get(format!("http://{proxy}/hello")).send().await {
            if r.status() == 200 {
                let v: serde_json::Value = r.json().await.unwrap();
                tokens.insert(v["headers"]["authorization"].as_str().unwrap_or_default().to_string());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = c.get(format!("http://{admin}/readyz")).send().await.map(|r| r.status().as_u16());
    let _ = child.kill();
    let _ = child.wait();
    let banner = banner.join().unwrap();
    assert!(banner.contains(&format!("curl -s http://{proxy}/hello")), "{banner}");
    assert!(tokens.len() >= 2 && tokens.iter().all(|t| t.starts_with("Bearer demo-")), "{tokens:?}");
    assert_eq!(ready.ok(), Some(200));
}

#[test]
fn show_may_not_expose_a_token() {
    let cfg = r#"
[providers.p]
kind = "http"
base_url = "http://127.0.0.1:9"
show = ["token"]
[[providers.p.acquire]]
path = "/auth"
extract = { token = "/token" }
[[routes]]
upstream = "http://127.0.0.1:9"
provider = "p"
"#;
    let (code, _out, err) = check(cfg, &[]);
    assert_eq!(code, 2);
    assert!(err.contains("providers.p.show") && err.contains("never shown"), "{err}");
}

#[test]
fn check_validates_a_redis_store_without_printing_its_password_or_keys() {
    let key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    let store = format!(
        "\n[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379/2\"\nusername = \"tg\"\npassword = \"REDIS-PASSWORD-VALUE\"\nencryption_keys = [\"{key}\"]\n"
    );
    let (code, out, err) = check(&format!("{GOOD}{store}"), &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("store: redis redis://127.0.0.1:6379/2 user tg password <redacted>"), "{out}");
    assert!(out.contains("encryption_keys 1"), "{out}");
    for secret in ["REDIS-PASSWORD-VALUE", key] {
        assert!(!out.contains(secret) && !err.contains(secret), "printed a store secret");
    }
    // A key of the wrong size is named, and not echoed.
    let bad = store.replace(key, "dG9vLXNob3J0");
    let (code, out, err) = check(&format!("{GOOD}{bad}"), &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("store.encryption_keys.0") && !err.contains("dG9vLXNob3J0") && !out.contains("dG9vLXNob3J0"),
        "{err}"
    );
}
