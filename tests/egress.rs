//! Egress as operators run it (issue 11, item 7): token requests through an HTTP proxy
//! (a provider's `proxy`, or `HTTPS_PROXY` from the environment) to an HTTPS token
//! endpoint trusted through `ca_file` or the system store; `tollgate login` never going
//! through a proxy; `proxy.allow_from`; the `tls_verify = false` warning.
//!
//! The doubles: a CONNECT proxy that records every request head it is sent and tunnels
//! only to loopback; a TLS front (a self-signed certificate made here) that terminates
//! TLS and relays to the plain token-endpoint double; an admin-API double for `login`.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound on reading a request head from a client of a double.
const HEAD_LIMIT: usize = 16 * 1024;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Read until the end of an HTTP head (or `HEAD_LIMIT`, or 5 s); the head and what came
/// after it.
async fn read_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while buf.len() < HEAD_LIMIT {
        let n = match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => break,
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return (String::from_utf8_lossy(&buf).into_owned(), rest);
        }
    }
    (String::from_utf8_lossy(&buf).into_owned(), Vec::new())
}

/// An HTTP proxy double: records the head of every request it is sent; tunnels a
/// `CONNECT` to a loopback target, answers anything else 502.
struct ConnectProxy {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
}

impl ConnectProxy {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy double");
        let addr = listener.local_addr().expect("proxy double address");
        let heads = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (h, c) = (Arc::clone(&heads), Arc::clone(&connections));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                let h = Arc::clone(&h);
                tokio::spawn(async move {
                    let (head, rest) = read_head(&mut s).await;
                    lock(&h).push(head.clone());
                    let first = head.lines().next().unwrap_or("").to_string();
                    let target = first
                        .strip_prefix("CONNECT ")
                        .and_then(|r| r.split(' ').next())
                        .and_then(|t| t.parse::<SocketAddr>().ok())
                        .filter(|a| a.ip().is_loopback());
                    let Some(target) = target else {
                        let _ = s
                            .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                            .await;
                        return;
                    };
                    let Ok(mut up) = TcpStream::connect(target).await else {
                        let _ = s.write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n").await;
                        return;
                    };
                    if s.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n").await.is_err() {
                        return;
                    }
                    if !rest.is_empty() && up.write_all(&rest).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
                });
            }
        });
        ConnectProxy { addr, heads, connections }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn heads(&self) -> Vec<String> {
        lock(&self.heads).clone()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// A TLS front for a plain double: a self-signed certificate for 127.0.0.1, terminating
/// TLS and relaying the bytes to `backend`.
struct TlsFront {
    addr: SocketAddr,
    /// The certificate, PEM: the trust anchor the client must be given.
    cert_pem: String,
}

impl TlsFront {
    async fn start(backend: SocketAddr) -> Self {
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("self-signed certificate");
        let cert_pem = ck.cert.pem();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![ck.cert.der().clone()], key)
            .expect("TLS server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind TLS front");
        let addr = listener.local_addr().expect("TLS front address");
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(Ok(mut tls)) = tokio::time::timeout(Duration::from_secs(5), acceptor.accept(s)).await else {
                        return;
                    };
                    let Ok(mut plain) = TcpStream::connect(backend).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        TlsFront { addr, cert_pem }
    }

    fn token_url(&self) -> String {
        format!("https://{}/oauth/v2/token", self.addr)
    }
}

/// A provider and a route per (name, token URL, extra provider keys).
fn config(providers: &[(&str, String, String)], extra_proxy: &str) -> String {
    let mut c = format!("[proxy]\nlisten = \"{{PROXY}}\"\n{extra_proxy}\n[admin]\nlisten = \"{{ADMIN}}\"\n");
    for (name, url, extra) in providers {
        c.push_str(&format!(
            "\n[providers.{name}]\nkind = \"oauth2\"\ntoken_url = \"{url}\"\nclient_id = \"abc123\"\nclient_secret = \"456789\"\nbackoff_min = \"100ms\"\nbackoff_max = \"1s\"\ntimeout = \"2s\"\n{extra}\n"
        ));
    }
    c
}

fn route(name: &str, upstream: &Upstream) -> String {
    format!(
        "\n[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"{}\"\nprovider = \"{name}\"\n",
        upstream.url()
    )
}

/// The `CONNECT` targets a proxy double was asked for.
fn connect_targets(p: &ConnectProxy) -> Vec<String> {
    p.heads()
        .iter()
        .filter_map(|h| {
            h.lines()
                .next()
                .and_then(|l| l.strip_prefix("CONNECT "))
                .map(|l| l.split(' ').next().unwrap_or("").to_string())
        })
        .collect()
}

/// A provider's `proxy` key: its HTTPS token requests go through that proxy by CONNECT
/// (the environment's proxy is not used), the endpoint is trusted through `ca_file`, and
/// the proxy never sees the client secret.
#[tokio::test]
async fn token_requests_go_through_the_providers_proxy_to_an_https_endpoint() {
    let (idp, upstream, _ledger) = oauth2_doubles(IdpConfig::default()).await;
    let front = TlsFront::start(idp.addr).await;
    let proxy = ConnectProxy::start().await;
    let env_proxy = ConnectProxy::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("idp-ca.pem");
    std::fs::write(&ca, &front.cert_pem).expect("write ca_file");

    let extra = format!("ca_file = \"{}\"\nproxy = \"{}\"", ca.display(), proxy.url());
    let cfg = config(&[("backend", front.token_url(), extra)], "") + &route("backend", &upstream);
    let env = [("HTTPS_PROXY", env_proxy.url()), ("https_proxy", env_proxy.url()), ("ALL_PROXY", env_proxy.url())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let tg = Tollgate::start_with_env(&cfg, &env);
    tg.wait_ready().await;

    let r = client().get(tg.url("/backend/x")).send().await.expect("request");
    assert_eq!(r.status(), 200, "logs:\n{}", tg.logs());
    let seen = upstream.seen();
    assert!(seen.len() == 1 && seen[0].accepted, "the upstream got a token the IdP issued: {seen:?}");
    assert!(idp.count() >= 1, "the token endpoint was reached");
    let targets = connect_targets(&proxy);
    assert!(
        !targets.is_empty() && targets.iter().all(|t| *t == front.addr.to_string()),
        "CONNECT targets: {targets:?}"
    );
    assert!(proxy.heads().iter().all(|h| !h.contains("456789")), "the proxy saw the client secret");
    assert_eq!(env_proxy.connections(), 0, "the environment's proxy is not used when the provider names one");
}

/// Without a `proxy` key the environment decides: `HTTPS_PROXY`, except for the hosts in
/// `NO_PROXY`; `proxy = "none"` goes direct whatever it says. Without `ca_file`, the
/// endpoint's certificate is trusted through the system store (`SSL_CERT_FILE` points
/// the store at the test's CAs here).
#[tokio::test]
async fn https_proxy_and_no_proxy_from_the_environment_and_the_system_ca_store() {
    let (idp, upstream, _ledger) = oauth2_doubles(IdpConfig::default()).await;
    let via_env = TlsFront::start(idp.addr).await;
    let exempt = TlsFront::start(idp.addr).await;
    let direct = TlsFront::start(idp.addr).await;
    let proxy = ConnectProxy::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("system-store.pem");
    std::fs::write(&store, format!("{}{}{}", via_env.cert_pem, exempt.cert_pem, direct.cert_pem))
        .expect("write the store");

    // `exempt` is named `localhost` (its certificate covers it), which NO_PROXY lists.
    let exempt_url = format!("https://localhost:{}/oauth/v2/token", exempt.addr.port());
    let cfg = config(
        &[
            ("envproxy", via_env.token_url(), String::new()),
            ("noproxy", exempt_url, String::new()),
            ("direct", direct.token_url(), "proxy = \"none\"".into()),
        ],
        "",
    ) + &route("envproxy", &upstream)
        + &route("noproxy", &upstream)
        + &route("direct", &upstream);
    let store = store.display().to_string();
    let tg = Tollgate::start_with_env(
        &cfg,
        &[("HTTPS_PROXY", &proxy.url()), ("NO_PROXY", "localhost"), ("SSL_CERT_FILE", &store)],
    );
    tg.wait_ready().await;

    for path in ["/envproxy/a", "/noproxy/b", "/direct/c"] {
        let r = client().get(tg.url(path)).send().await.expect("request");
        assert_eq!(r.status(), 200, "{path}; logs:\n{}", tg.logs());
    }
    assert!(upstream.seen().iter().all(|s| s.accepted) && upstream.count() == 3);
    let targets = connect_targets(&proxy);
    assert!(!targets.is_empty(), "HTTPS_PROXY was not used");
    assert!(
        targets.iter().all(|t| *t == via_env.addr.to_string()),
        "only `envproxy` goes through the proxy: {targets:?}"
    );
}

/// The token endpoint's certificate is verified: with neither `ca_file` nor the CA in the
/// system store, no token is obtained.
#[tokio::test]
async fn an_untrusted_token_endpoint_certificate_is_refused() {
    let (idp, upstream, _ledger) = oauth2_doubles(IdpConfig::default()).await;
    let front = TlsFront::start(idp.addr).await;
    let cfg = config(&[("backend", front.token_url(), "proxy = \"none\"".into())], "token_wait = \"1s\"")
        + &route("backend", &upstream);
    let tg = Tollgate::start(&cfg);
    tg.wait_healthy().await;
    let r = client().get(tg.url("/backend/x")).send().await.expect("request");
    assert_eq!(r.status(), 503, "no token without trust");
    assert_eq!(idp.count(), 0, "no token request got through TLS");
    assert_eq!(upstream.count(), 0);
}

/// An admin-API double for `tollgate login`: records (path, Authorization, body).
async fn admin_double() -> (SocketAddr, Arc<Mutex<Vec<(String, String, String)>>>) {
    use axum::extract::{Request, State};
    type Seen = Arc<Mutex<Vec<(String, String, String)>>>;
    async fn handle(State(seen): State<Seen>, req: Request) -> axum::Json<Value> {
        let (parts, body) = req.into_parts();
        let body = axum::body::to_bytes(body, 64 * 1024).await.unwrap_or_default();
        let auth = parts.headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        lock(&seen).push((parts.uri.path().to_string(), auth, String::from_utf8_lossy(&body).into_owned()));
        axum::Json(
            serde_json::json!({"message": "code sent", "state": "ready", "token": {"expires_at": "2099-01-01T00:00:00Z"}}),
        )
    }
    let seen: Seen = Arc::default();
    let app = axum::Router::new().fallback(handle).with_state(Arc::clone(&seen));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind admin double");
    let addr = listener.local_addr().expect("admin double address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, seen)
}

/// `tollgate login` talks to the admin API directly, whatever the proxy variables say:
/// the admin token and the one-time code never reach a proxy.
#[tokio::test]
async fn login_never_goes_through_a_proxy() {
    let proxy = ConnectProxy::start().await;
    let (admin, seen) = admin_double().await;
    let admin_url = format!("http://{admin}");
    let proxy_url = proxy.url();
    for args in [vec!["--start-only"], vec!["--code", "314159"]] {
        let (admin_url, proxy_url) = (admin_url.clone(), proxy_url.clone());
        let out = tokio::task::spawn_blocking(move || {
            let mut cmd = std::process::Command::new(BIN);
            cmd.args(["login", "backend", "--admin-url", &admin_url]).args(&args).env("NO_COLOR", "1");
            cmd.env("TOLLGATE_ADMIN_TOKEN", "admin-token-Qx81");
            for var in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"] {
                cmd.env(var, &proxy_url);
            }
            cmd.env_remove("NO_PROXY").env_remove("no_proxy");
            cmd.stdin(std::process::Stdio::null()).output().expect("run tollgate login")
        })
        .await
        .expect("login task");
        assert!(out.status.success(), "login failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert_eq!(proxy.connections(), 0, "the proxy was contacted: {:?}", proxy.heads());
    let seen = lock(&seen).clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].0, "/admin/providers/backend/login");
    assert_eq!(seen[1].0, "/admin/providers/backend/login/code");
    assert!(seen.iter().all(|(_, auth, _)| auth == "Bearer admin-token-Qx81"), "{seen:?}");
    assert!(seen[1].2.contains("314159"), "{seen:?}");
}

/// `proxy.allow_from`: a client outside the list gets 403 JSON and nothing reaches the
/// upstream; the list is reloadable, and a list holding the client lets it through.
/// (Only the config names 10.0.0.0/8; all traffic stays on 127.0.0.1.)
#[tokio::test]
async fn allow_from_refuses_other_clients_before_any_token_is_used() {
    let (idp, upstream, _ledger) = oauth2_doubles(IdpConfig::default()).await;
    let cfg = oauth2_config(&idp, &upstream, "", "allow_from = [\"10.0.0.0/8\"]");
    let tg = Tollgate::start_sighup_only(&cfg);
    tg.wait_ready().await;

    let r = client().get(tg.url("/x?q=1")).send().await.expect("request");
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.expect("JSON body");
    assert_eq!(body["error"], "client_not_allowed", "{body}");
    assert_eq!(upstream.count(), 0, "a refused request reached the upstream");

    tg.write_config(&tg.config_text().replace("[\"10.0.0.0/8\"]", "[\"10.0.0.0/8\", \"127.0.0.0/8\"]"));
    tg.sighup_reload().await;
    let r = client().get(tg.url("/y")).send().await.expect("request");
    assert_eq!(r.status(), 200, "logs:\n{}", tg.logs());
    let seen = upstream.seen();
    assert!(seen.len() == 1 && seen[0].accepted && seen[0].path == "/y", "{seen:?}");

    tg.write_config(&tg.config_text().replace("[\"10.0.0.0/8\", \"127.0.0.0/8\"]", "[\"127.0.0.1\"]"));
    tg.sighup_reload().await;
    let r = client().get(tg.url("/z")).send().await.expect("request");
    assert_eq!(r.status(), 200, "a single address is a /32");
}

/// `tls_verify = false` on a route is logged as a warning at start and again on every
/// reload, naming the route.
#[tokio::test]
async fn tls_verify_false_is_warned_about_at_start_and_on_reload() {
    let (idp, upstream, _ledger) = oauth2_doubles(IdpConfig::default()).await;
    let cfg = oauth2_config(&idp, &upstream, "", "")
        + "\n[[routes]]\nname = \"rig\"\npath_prefix = \"/rig\"\nupstream = \"https://127.0.0.1:9\"\ntls_verify = false\n";
    let tg = Tollgate::start_sighup_only(&cfg);
    tg.wait_ready().await;
    let count = |logs: &str| {
        logs.lines().filter(|l| l.contains("WARN") && l.contains("route `rig`: tls_verify = false")).count()
    };
    assert_eq!(count(&tg.logs()), 1, "logs:\n{}", tg.logs());
    assert!(!tg.logs().contains("route `api`: tls_verify"), "only the route that turned verification off");
    tg.sighup_reload().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while count(&tg.logs()) < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(count(&tg.logs()), 2, "logs:\n{}", tg.logs());
}
