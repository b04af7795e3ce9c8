//! The fast path's upstream connections (issue 13 item 3): HTTPS upstreams through
//! pingora's connector with the route's TLS settings (SNI, CA, verification, the
//! provider's client certificate), one pool per worker thread keyed by everything a
//! connection is bound to and capped at the thread's share of
//! `proxy.upstream_keepalive_pool_size`, liveness tested at checkout, idle connections
//! closed by a per-thread timer after `proxy.upstream_idle_timeout`.
//!
//! The upstream here is a double on a raw socket (TLS by rustls, or plain) that records
//! each connection it accepted: the SNI and client certificate it was opened with, the
//! requests that came on it, and when the other side closed it.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;
use tollgate_testkit::keys::{TestCa, TestCert};

/// The name the upstream's certificate is issued for and tollgate verifies (pingora's
/// OpenSSL connector matches DNS names only, so not `127.0.0.1`).
const SNI: &str = "localhost";
const MAX_CONNECTIONS: usize = 200;
const MAX_REQUESTS_PER_CONNECTION: usize = 1000;
const MAX_HEAD: usize = 64 * 1024;
/// How long the double waits for a request on an open connection before giving up.
const IDLE_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
struct Req {
    method: String,
    target: String,
    authorization: Option<String>,
    body: Vec<u8>,
}

impl Req {
    fn bearer(&self) -> Option<&str> {
        self.authorization.as_deref().and_then(|a| a.strip_prefix("Bearer "))
    }
}

/// One accepted connection, as the double saw it.
#[derive(Clone, Default)]
struct Conn {
    sni: Option<String>,
    /// The client certificate presented (DER), if any.
    client_cert: Option<Vec<u8>>,
    requests: Vec<Req>,
    last_answer: Option<Instant>,
    /// When tollgate closed it (end of stream, or a TLS error, while the double waited
    /// for the next request).
    closed_by_tollgate: Option<Instant>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let targets: Vec<&str> = self.requests.iter().map(|r| r.target.as_str()).collect();
        f.debug_struct("Conn")
            .field("sni", &self.sni)
            .field("client_cert_bytes", &self.client_cert.as_ref().map(Vec::len))
            .field("targets", &targets)
            .field("closed_by_tollgate", &self.closed_by_tollgate.is_some())
            .finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Behaviour {
    /// Answer every request and keep the connection open (a target with `/slow` after
    /// 300 ms).
    KeepAlive,
    /// Answer, keep-alive as far as the answer says, then close the connection this long
    /// after (TLS: close_notify, then FIN): a server whose keep-alive timeout is short.
    CloseAfterAnswer(Duration),
    /// Read a connection's second request and close the connection unanswered: a server
    /// that closed it at the moment the request went out.
    DropSecondRequest,
}

#[derive(Clone)]
struct Double {
    addr: SocketAddr,
    tls: bool,
    conns: Arc<Mutex<Vec<Conn>>>,
}

impl Double {
    async fn start(tls: Option<TlsAcceptor>, behaviour: Behaviour) -> Double {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the upstream double");
        let addr = listener.local_addr().expect("local addr");
        let d = Double { addr, tls: tls.is_some(), conns: Arc::default() };
        let shared = d.clone();
        tokio::spawn(async move {
            for _ in 0..MAX_CONNECTIONS {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let id = {
                    let mut conns = lock(&shared.conns);
                    conns.push(Conn::default());
                    conns.len() - 1
                };
                let (shared, tls) = (shared.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => shared.serve(tcp, id, behaviour).await,
                        Some(acceptor) => {
                            let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await
                            else {
                                return;
                            };
                            {
                                let mut conns = lock(&shared.conns);
                                let session = s.get_ref().1;
                                conns[id].sni = session.server_name().map(str::to_string);
                                conns[id].client_cert =
                                    session.peer_certificates().and_then(|c| c.first()).map(|c| c.as_ref().to_vec());
                            }
                            shared.serve(s, id, behaviour).await
                        }
                    }
                });
            }
        });
        d
    }

    fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", if self.tls { "https" } else { "http" }, self.addr.port())
    }

    fn conns(&self) -> Vec<Conn> {
        lock(&self.conns).clone()
    }

    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(self, mut s: S, id: usize, behaviour: Behaviour) {
        let mut buf = Vec::new();
        for n in 0..MAX_REQUESTS_PER_CONNECTION {
            let Some(req) = read_request(&mut s, &mut buf).await else {
                lock(&self.conns)[id].closed_by_tollgate = Some(Instant::now());
                return;
            };
            let slow = req.target.contains("/slow");
            lock(&self.conns)[id].requests.push(req);
            if slow {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            if behaviour == Behaviour::DropSecondRequest && n == 1 {
                let _ = s.shutdown().await;
                return;
            }
            let body = format!("conn {id} request {n}");
            let answer =
                format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            if s.write_all(answer.as_bytes()).await.is_err() || s.flush().await.is_err() {
                return;
            }
            lock(&self.conns)[id].last_answer = Some(Instant::now());
            if let Behaviour::CloseAfterAnswer(after) = behaviour {
                tokio::time::sleep(after).await;
                let _ = s.shutdown().await;
                return;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One request (head and Content-Length body); `None` at the end of the stream, on an
/// error, a malformed head, or after [`IDLE_LIMIT`] without one.
async fn read_request<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> Option<Req> {
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        match tokio::time::timeout(IDLE_LIMIT, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut line = lines.next()?.split(' ');
    let (method, target) = (line.next()?.to_string(), line.next()?.to_string());
    let fields: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let length: usize = field("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    while buf.len() < head_end + length {
        match tokio::time::timeout(IDLE_LIMIT, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buf[head_end..head_end + length].to_vec();
    buf.drain(..head_end + length);
    Some(Req { method, target, authorization: field("authorization"), body })
}

/// A TLS server with `server`'s certificate that asks for (without demanding) a client
/// certificate issued by `ca`.
fn acceptor(server: &TestCert, ca: &TestCa) -> TlsAcceptor {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(server.cert_pem.as_bytes()).collect::<Result<_, _>>().expect("server cert");
    let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).expect("server key");
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.cert_pem.as_bytes()) {
        roots.add(c.expect("CA PEM")).expect("CA");
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
        .allow_unauthenticated()
        .build()
        .expect("client verifier");
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("server config");
    TlsAcceptor::from(Arc::new(cfg))
}

/// The CA, the upstream's TLS, a workload client certificate, and their files.
struct Pki {
    ca: TestCa,
    workload: TestCert,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let ca = TestCa::new("test-ca");
        let workload = ca.client_cert("workload-1");
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in
            [("ca.pem", &ca.cert_pem), ("client.crt", &workload.cert_pem), ("client.key", &workload.key_pem)]
        {
            std::fs::write(dir.path().join(name), text).expect("write test file");
        }
        Pki { ca, workload, dir }
    }

    fn acceptor(&self) -> TlsAcceptor {
        acceptor(&self.ca.server_cert(&[SNI]), &self.ca)
    }

    fn file(&self, name: &str) -> String {
        path(&self.dir.path().join(name))
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// tollgate with the fast path on (in the file and in the environment, which would
/// override the file in the suite's fast-path-off run); providers `backend` (a client
/// secret) and `bound` (the same, plus the workload certificate presented upstream), and
/// `routes`.
fn start(idp: &Idp, pki: &Pki, proxy_extra: &str, routes: &str) -> Tollgate {
    let config = format!(
        r#"
[proxy]
listen = "{{PROXY}}"
fast_path = true
{proxy_extra}

[admin]
listen = "{{ADMIN}}"

[providers.backend]
kind = "oauth2"
token_url = "{token_url}"
client_id = "abc123"
client_secret = "456789"
backoff_min = "100ms"
backoff_max = "1s"
timeout = "2s"

[providers.bound]
kind = "oauth2"
token_url = "{token_url}"
client_id = "abc123"
client_secret = "456789"
client_cert_file = "{cert}"
client_key_file = "{key}"
upstream_client_cert = true
backoff_min = "100ms"
backoff_max = "1s"
timeout = "2s"

{routes}
"#,
        token_url = idp.url(),
        cert = pki.file("client.crt"),
        key = pki.file("client.key"),
    );
    Tollgate::start_with_env(&config, &[("TOLLGATE_PROXY__FAST_PATH", "true")])
}

/// A route to `up`; `tls` holds the route's TLS keys (`ca_file`, `sni`, `tls_verify`).
fn route(name: &str, up: &Double, provider: &str, tls: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\npath_prefix = \"/{name}\"\nupstream = \"{}\"\nprovider = \"{provider}\"\n{tls}\n",
        up.url()
    )
}

fn verified(pki: &Pki) -> String {
    format!("ca_file = \"{}\"\nsni = \"{SNI}\"", pki.file("ca.pem"))
}

async fn served_fast(tg: &Tollgate) -> f64 {
    tg.metric("tollgate_fastpath_total{path=\"fast\",reason=\"served\"}").await
}

async fn idp() -> (Idp, Ledger) {
    let ledger = Ledger::default();
    let idp = Idp::start(IdpConfig::default(), ledger.clone()).await.expect("start the token-endpoint double");
    (idp, ledger)
}

async fn get_ok(c: &reqwest::Client, tg: &Tollgate, path: &str) -> String {
    let r = c.get(tg.url(path)).send().await.expect("request through tollgate");
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    assert_eq!(status, 200, "{path}: {body}\nlogs:\n{}", tg.logs());
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_is_served_on_the_fast_path_and_sees_the_token_and_the_client_certificate() {
    let pki = Pki::new();
    let (idp, ledger) = idp().await;
    let up = Double::start(Some(pki.acceptor()), Behaviour::KeepAlive).await;
    let tg = start(&idp, &pki, "", &route("bound", &up, "bound", &verified(&pki)));
    tg.wait_ready().await;
    let c = client();
    let before = served_fast(&tg).await;
    for i in 0..5 {
        get_ok(&c, &tg, &format!("/bound/items/{i}?page={i}")).await;
    }
    // Larger than the 64 KiB retry buffer: streamed to the upstream over TLS.
    let body: Vec<u8> = (0..150_000u32).map(|i| (i % 251) as u8).collect();
    let r = c.post(tg.url("/bound/upload")).body(body.clone()).send().await.expect("POST through tollgate");
    assert_eq!(r.status(), 200);

    assert_eq!(served_fast(&tg).await - before, 6.0, "{}", tg.metrics().await);
    assert_eq!(tg.metric("tollgate_fastpath_total{path=\"pingora\",reason=\"tls_upstream\"}").await, 0.0);
    let conns = up.conns();
    assert_eq!(conns.len(), 1, "six sequential requests, one connection: {conns:?}");
    let conn = &conns[0];
    assert_eq!(conn.sni.as_deref(), Some(SNI));
    assert_eq!(conn.client_cert.as_deref(), Some(pki.workload.der.as_slice()), "the provider's certificate");
    let targets: Vec<&str> = conn.requests.iter().map(|r| r.target.as_str()).collect();
    let mut want: Vec<String> = (0..5).map(|i| format!("/bound/items/{i}?page={i}")).collect();
    want.push("/bound/upload".into());
    assert_eq!(targets, want);
    for r in &conn.requests {
        let token = r.bearer().expect("a bearer token");
        assert!(ledger.check(token).is_ok(), "a token the IdP issued: {r:?}");
    }
    assert_eq!(conn.requests[5].method, "POST");
    assert_eq!(conn.requests[5].body, body, "body intact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_reuse_one_connection_plain_and_tls() {
    let pki = Pki::new();
    let (idp, _ledger) = idp().await;
    let plain = Double::start(None, Behaviour::KeepAlive).await;
    let tls = Double::start(Some(pki.acceptor()), Behaviour::KeepAlive).await;
    let routes = route("plain", &plain, "backend", "") + &route("tls", &tls, "backend", &verified(&pki));
    let tg = start(&idp, &pki, "", &routes);
    tg.wait_ready().await;
    let c = client();
    for i in 0..10 {
        get_ok(&c, &tg, &format!("/plain/{i}")).await;
        get_ok(&c, &tg, &format!("/tls/{i}")).await;
    }
    for (up, prefix) in [(&plain, "/plain/"), (&tls, "/tls/")] {
        let conns = up.conns();
        assert_eq!(conns.len(), 1, "{prefix}: {conns:?}");
        assert_eq!(conns[0].requests.len(), 10);
        assert!(conns[0].requests.iter().all(|r| r.target.starts_with(prefix)));
        assert_eq!(conns[0].closed_by_tollgate, None);
    }
    assert_eq!(served_fast(&tg).await, 20.0);
}

/// The upstream closes each connection 100 ms after answering (its keep-alive timeout):
/// the next request finds the pooled connection closed at checkout and takes a new one.
/// POSTs, which are never replayed: one sent into the closed connection would be a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_upstream_closed_is_replaced_without_an_error() {
    let pki = Pki::new();
    let (idp, _ledger) = idp().await;
    let after = Behaviour::CloseAfterAnswer(Duration::from_millis(100));
    let plain = Double::start(None, after).await;
    let tls = Double::start(Some(pki.acceptor()), after).await;
    let routes = route("plain", &plain, "backend", "") + &route("tls", &tls, "backend", &verified(&pki));
    let tg = start(&idp, &pki, "", &routes);
    tg.wait_ready().await;
    let c = client();
    for i in 0..3 {
        for prefix in ["plain", "tls"] {
            let r = c.post(tg.url(&format!("/{prefix}/{i}"))).body(format!("order {i}")).send().await.expect("POST");
            assert_eq!(r.status(), 200, "{prefix} {i}: logs:\n{}", tg.logs());
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    for up in [&plain, &tls] {
        let conns = up.conns();
        assert_eq!(conns.len(), 3, "{conns:?}");
        for (i, conn) in conns.iter().enumerate() {
            let got: Vec<(&str, &[u8])> =
                conn.requests.iter().map(|r| (r.method.as_str(), r.body.as_slice())).collect();
            assert_eq!(got, vec![("POST", format!("order {i}").as_bytes())], "{conns:?}");
        }
    }
    assert_eq!(served_fast(&tg).await, 6.0);
}

/// The upstream closes a pooled connection just as the next request arrives on it: a GET
/// goes again on a new connection and the client never sees the failure; a POST (sent,
/// perhaps acted on) is not replayed and gets a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_that_meets_a_connection_closed_under_it_is_retried_on_a_new_one() {
    let pki = Pki::new();
    let (idp, _ledger) = idp().await;
    let up = Double::start(Some(pki.acceptor()), Behaviour::DropSecondRequest).await;
    let tg = start(&idp, &pki, "", &route("tls", &up, "backend", &verified(&pki)));
    tg.wait_ready().await;
    let c = client();
    let first = get_ok(&c, &tg, "/tls/1").await;
    assert_eq!(first, "conn 0 request 0");
    let second = get_ok(&c, &tg, "/tls/2").await;
    assert_eq!(second, "conn 1 request 0", "answered on a new connection");
    let r = c.post(tg.url("/tls/pay")).body("once").send().await.expect("POST through tollgate");
    assert_eq!(r.status(), 502, "a sent POST is never replayed");
    let v: serde_json::Value = r.json().await.expect("JSON");
    assert_eq!(v["error"], "bad_gateway");

    let conns = up.conns();
    let targets: Vec<Vec<&str>> =
        conns.iter().map(|c| c.requests.iter().map(|r| r.target.as_str()).collect()).collect();
    assert_eq!(targets, vec![vec!["/tls/1", "/tls/2"], vec!["/tls/2", "/tls/pay"]]);
    assert_eq!(served_fast(&tg).await, 2.0);
}

/// An idle pooled connection is closed by tollgate's per-thread timer once
/// `upstream_idle_timeout` (1 s) passed, with no request to trigger it: a timer tick (1 s)
/// late at most, plus slack for a loaded machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_connections_are_closed_by_tollgate_after_the_idle_timeout() {
    let pki = Pki::new();
    let (idp, _ledger) = idp().await;
    let plain = Double::start(None, Behaviour::KeepAlive).await;
    let tls = Double::start(Some(pki.acceptor()), Behaviour::KeepAlive).await;
    let routes = route("plain", &plain, "backend", "") + &route("tls", &tls, "backend", &verified(&pki));
    let tg = start(&idp, &pki, "upstream_idle_timeout = \"1s\"", &routes);
    tg.wait_ready().await;
    let c = client();
    get_ok(&c, &tg, "/plain/once").await;
    get_ok(&c, &tg, "/tls/once").await;

    let deadline = Instant::now() + Duration::from_secs(6);
    while Instant::now() < deadline
        && [&plain, &tls].iter().any(|u| u.conns().iter().any(|c| c.closed_by_tollgate.is_none()))
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for up in [&plain, &tls] {
        let conns = up.conns();
        assert_eq!(conns.len(), 1, "{conns:?}");
        let (Some(answered), Some(closed)) = (conns[0].last_answer, conns[0].closed_by_tollgate) else {
            panic!("tollgate never closed the idle connection: {conns:?}");
        };
        let idle = closed - answered;
        assert!(idle >= Duration::from_millis(950), "closed before the idle timeout: {idle:?}");
        assert!(idle <= Duration::from_millis(3500), "closed long after the idle timeout: {idle:?}");
    }
    // The client's own connection to tollgate is unaffected and the next request works.
    get_ok(&c, &tg, "/tls/again").await;
    assert_eq!(tls.conns().len(), 2);
}

/// Four routes to one address, differing only in TLS settings: the client certificate,
/// certificate verification, the SNI. Each gets connections of its own, reused by it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_to_one_address_with_different_tls_settings_never_share_a_connection() {
    let pki = Pki::new();
    let (idp, ledger) = idp().await;
    let up = Double::start(Some(pki.acceptor()), Behaviour::KeepAlive).await;
    let routes = [
        route("cert", &up, "bound", &verified(&pki)),
        route("nocert", &up, "backend", &verified(&pki)),
        route("noverify", &up, "backend", &format!("sni = \"{SNI}\"\ntls_verify = false")),
        route("othersni", &up, "backend", "sni = \"other.localhost\"\ntls_verify = false"),
    ]
    .concat();
    let tg = start(&idp, &pki, "", &routes);
    tg.wait_ready().await;
    let c = client();
    let names = ["cert", "nocert", "noverify", "othersni"];
    for round in 0..3 {
        for name in names {
            get_ok(&c, &tg, &format!("/{name}/{round}")).await;
        }
    }
    assert_eq!(served_fast(&tg).await, 12.0);
    let conns = up.conns();
    assert_eq!(conns.len(), 4, "one connection per TLS setting: {conns:?}");
    for (conn, name) in conns.iter().zip(names) {
        let prefix = format!("/{name}/");
        let targets: Vec<&str> = conn.requests.iter().map(|r| r.target.as_str()).collect();
        assert_eq!(targets, (0..3).map(|i| format!("{prefix}{i}")).collect::<Vec<_>>(), "{name}");
        let cert = (name == "cert").then_some(pki.workload.der.as_slice());
        assert_eq!(conn.client_cert.as_deref(), cert, "{name}");
        let sni = if name == "othersni" { "other.localhost" } else { SNI };
        assert_eq!(conn.sni.as_deref(), Some(sni), "{name}");
        assert!(conn.requests.iter().all(|r| r.bearer().is_some_and(|t| ledger.check(t).is_ok())), "{name}");
    }
}

/// `upstream_keepalive_pool_size = 1` with one worker thread: three requests in flight at
/// once open three connections; once answered, one is kept and the other two are closed
/// at once, not after the idle timeout (50 s by default); the next request reuses the one kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_thread_keeps_no_more_idle_connections_than_its_share_of_the_pool() {
    let pki = Pki::new();
    let (idp, _ledger) = idp().await;
    let up = Double::start(Some(pki.acceptor()), Behaviour::KeepAlive).await;
    let tg = start(
        &idp,
        &pki,
        "threads = 1\nupstream_keepalive_pool_size = 1",
        &route("tls", &up, "backend", &verified(&pki)),
    );
    tg.wait_ready().await;
    // Three clients: three connections to tollgate, three requests in flight together.
    let clients: Vec<reqwest::Client> = (0..3).map(|_| client()).collect();
    let answers = futures_util::future::join_all(clients.iter().enumerate().map(|(i, c)| {
        let url = tg.url(&format!("/tls/slow/{i}"));
        async move { c.get(url).send().await.map(|r| r.status()) }
    }))
    .await;
    for a in &answers {
        assert_eq!(a.as_ref().map(|s| s.as_u16()).ok(), Some(200), "{answers:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && up.conns().iter().filter(|c| c.closed_by_tollgate.is_some()).count() < 2 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let conns = up.conns();
    assert_eq!(conns.len(), 3, "{conns:?}");
    let open: Vec<usize> = (0..3).filter(|&i| conns[i].closed_by_tollgate.is_none()).collect();
    assert_eq!(open.len(), 1, "one idle connection kept, two closed: {conns:?}");
    get_ok(&clients[0], &tg, "/tls/after").await;
    let conns = up.conns();
    assert_eq!(conns.len(), 3, "the kept connection was reused: {conns:?}");
    assert_eq!(conns[open[0]].requests.last().map(|r| r.target.as_str()), Some("/tls/after"));
}
