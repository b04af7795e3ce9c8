//! An OAuth2 token endpoint double. It follows RFC 6749 (form bodies) and seed 002's
//! `/oauth/v2/token` (JSON bodies) and rejects what a real server would reject: a wrong
//! content type, a missing field, wrong client credentials, an unknown refresh token.
//!
//! Refresh tokens rotate: each refresh_token grant answers with a new refresh token and
//! the old one is spent. With [`IdpConfig::reuse_detection`] it also does what real IdPs
//! do against stolen refresh tokens (RFC 9700 section 4.14.2): a spent refresh token that
//! comes back is taken as a theft, answered `invalid_grant`, and every refresh and access
//! token of its family (all descending from one original grant) is revoked.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::Ledger;

/// How the endpoint behaves right now; tests flip it mid-run.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    Normal,
    /// Answer every request with this status and an RFC 6749-style error body.
    Status(u16, &'static str),
    /// Accept the connection and never answer.
    Hang,
    /// 200 with a body that is not a token response.
    Garbage,
    /// 429 with `Retry-After`.
    RateLimited(u64),
    /// 302 to another address.
    Redirect,
    /// 200 with a body larger than any token response should be.
    Huge,
    /// A normal token, but with this `expires_in` value.
    ExpiresIn(Value),
}

#[derive(Debug, Clone)]
pub struct IdpConfig {
    pub path: String,
    pub client_id: String,
    pub client_secret: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Lifetime of issued tokens.
    pub lifetime: Duration,
    /// Send `expires_in` (else the client must find the expiry elsewhere).
    pub send_expires_in: bool,
    /// Issue refresh tokens with the password grant.
    pub refresh_tokens: bool,
    /// A prefix for issued tokens, to recognise them in leak checks.
    pub token_prefix: String,
    /// Remember spent refresh tokens; one presented again revokes its whole family.
    pub reuse_detection: bool,
}

impl Default for IdpConfig {
    fn default() -> Self {
        IdpConfig {
            path: "/oauth/v2/token".into(),
            client_id: "abc123".into(),
            client_secret: "456789".into(),
            username: None,
            password: None,
            lifetime: Duration::from_secs(3600),
            send_expires_in: true,
            refresh_tokens: true,
            token_prefix: "tok".into(),
            reuse_detection: false,
        }
    }
}

/// One request as the endpoint saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub content_type: String,
    pub authorization: Option<String>,
    pub params: HashMap<String, String>,
    pub at: Instant,
}

impl SeenRequest {
    pub fn grant(&self) -> &str {
        self.params.get("grant_type").map(String::as_str).unwrap_or("")
    }
}

struct Inner {
    cfg: IdpConfig,
    /// The accepted client secret; starts as `cfg.client_secret`, changed by
    /// [`Idp::set_client_secret`] to play a credential rotation.
    client_secret: Mutex<String>,
    ledger: Ledger,
    mode: Mutex<Mode>,
    reject_refresh: std::sync::atomic::AtomicBool,
    seen: Mutex<Vec<SeenRequest>>,
    refresh_tokens: Mutex<Families>,
    counter: AtomicU64,
    invalid_grants: AtomicU64,
    delay: Mutex<Duration>,
    /// One-time passwords "mailed" by `/otp/send`, by email or phone.
    otps: Mutex<HashMap<String, String>>,
    otp_sends: AtomicU64,
}

/// A running token endpoint double.
#[derive(Clone)]
pub struct Idp {
    inner: Arc<Inner>,
    pub addr: SocketAddr,
    stop: Arc<Mutex<Option<oneshot::Sender<()>>>>,
}

impl Idp {
    /// Start on an ephemeral loopback port.
    pub async fn start(cfg: IdpConfig, ledger: Ledger) -> std::io::Result<Self> {
        let (listener, addr) = crate::bind_loopback().await?;
        let inner = Arc::new(Inner {
            client_secret: Mutex::new(cfg.client_secret.clone()),
            cfg,
            ledger,
            mode: Mutex::new(Mode::Normal),
            reject_refresh: Default::default(),
            seen: Mutex::new(Vec::new()),
            refresh_tokens: Mutex::new(Families::default()),
            counter: AtomicU64::new(0),
            invalid_grants: AtomicU64::new(0),
            delay: Mutex::new(Duration::ZERO),
            otps: Mutex::new(HashMap::new()),
            otp_sends: AtomicU64::new(0),
        });
        let idp = Idp { inner, addr, stop: Arc::new(Mutex::new(None)) };
        idp.serve(listener);
        Ok(idp)
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let app = Router::new()
            .route(&self.inner.cfg.path, post(token))
            .route("/otp/send", post(otp_send))
            .with_state(Arc::clone(&self.inner));
        let (tx, rx) = oneshot::channel::<()>();
        *lock(&self.stop) = Some(tx);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
    }

    /// Close the listening socket: clients now get "connection refused".
    pub fn stop(&self) {
        if let Some(tx) = lock(&self.stop).take() {
            let _ = tx.send(());
        }
    }

    /// Listen again on the same port after [`Idp::stop`].
    pub async fn restart(&self) -> std::io::Result<()> {
        let mut last = None;
        for _ in 0..50 {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => {
                    self.serve(l);
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("cannot rebind")))
    }

    pub fn url(&self) -> String {
        format!("http://{}{}", self.addr, self.inner.cfg.path)
    }

    pub fn set_mode(&self, mode: Mode) {
        *lock(&self.inner.mode) = mode;
    }

    /// Make every answer wait this long first.
    pub fn set_delay(&self, d: Duration) {
        *lock(&self.inner.delay) = d;
    }

    /// Accept only this client secret from now on (a rotated credential).
    pub fn set_client_secret(&self, secret: &str) {
        *lock(&self.inner.client_secret) = secret.to_string();
    }

    /// Answer refresh_token grants with `invalid_grant` (a revoked refresh token).
    pub fn reject_refresh(&self, yes: bool) {
        self.inner.reject_refresh.store(yes, Ordering::SeqCst);
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<SeenRequest> {
        lock(&self.inner.seen).clone()
    }

    pub fn count(&self) -> usize {
        lock(&self.inner.seen).len()
    }

    pub fn count_grant(&self, grant: &str) -> usize {
        lock(&self.inner.seen).iter().filter(|r| r.grant() == grant).count()
    }

    /// Tokens issued so far, in order.
    pub fn issued(&self) -> u64 {
        self.inner.counter.load(Ordering::SeqCst)
    }

    /// The one-time password last mailed to `email_or_phone` by `/otp/send`.
    pub fn otp_for(&self, email_or_phone: &str) -> Option<String> {
        lock(&self.inner.otps).get(email_or_phone).cloned()
    }

    /// Refresh tokens issued and not yet used (one at a time with rotation).
    pub fn live_refresh_tokens(&self) -> Vec<String> {
        lock(&self.inner.refresh_tokens).live()
    }

    /// Requests answered with `invalid_grant`, for whatever reason (a wrong password, a
    /// spent or unknown refresh token, [`Idp::reject_refresh`], a [`Mode::Status`]).
    pub fn invalid_grant_count(&self) -> u64 {
        self.inner.invalid_grants.load(Ordering::SeqCst)
    }

    /// Token families revoked because a spent refresh token was presented again.
    pub fn families_revoked(&self) -> u64 {
        lock(&self.inner.refresh_tokens).revoked.len() as u64
    }

    pub fn otp_sends(&self) -> u64 {
        self.inner.otp_sends.load(Ordering::SeqCst)
    }
}

/// Seed 002's `POST /otp/send` with `{"email": …}` or `{"phone": …}`. It answers success
/// even for unknown users (no user enumeration), and mails an OTP only to a known one.
async fn otp_send(State(s): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    s.otp_sends.fetch_add(1, Ordering::SeqCst);
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !ct.starts_with("application/json") {
        return oauth_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_request");
    }
    let Ok(Value::Object(o)) = serde_json::from_slice::<Value>(&body) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    };
    let who = match (o.get("email").and_then(Value::as_str), o.get("phone").and_then(Value::as_str)) {
        (Some(e), None) => ("email", e.to_string()),
        (None, Some(p)) => ("phone", p.to_string()),
        _ => return oauth_error(StatusCode::BAD_REQUEST, "invalid_request"),
    };
    if s.cfg.username.as_deref() == Some(who.1.as_str()) {
        lock(&s.otps).insert(who.1.clone(), format!("{:06}", fastrand::u32(0..1_000_000)));
    }
    (StatusCode::OK, Json(json!({"data": {who.0: who.1}, "meta": []}))).into_response()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Refresh tokens by family. A family starts with a grant that issues a refresh token
/// (password) and grows with every refresh_token grant made with one of its tokens.
#[derive(Default)]
struct Families {
    /// Refresh token → (family, spent). Spent tokens are kept only with reuse detection.
    refresh: HashMap<String, (u64, bool)>,
    /// Family → the access tokens issued in it.
    access: HashMap<u64, Vec<String>>,
    next_family: u64,
    /// Families revoked for a reused refresh token: nothing more is issued in them.
    revoked: HashSet<u64>,
}

/// What a presented refresh token turned out to be.
enum Presented {
    /// Live: now spent; the new tokens join this family.
    Live(u64),
    /// Never issued, or revoked with its family.
    Unknown,
    /// Spent before: its family is now revoked.
    Reused,
}

impl Families {
    fn live(&self) -> Vec<String> {
        self.refresh.iter().filter(|(_, (_, spent))| !spent).map(|(rt, _)| rt.clone()).collect()
    }

    fn new_family(&mut self) -> u64 {
        self.next_family += 1;
        self.next_family
    }

    fn present(&mut self, rt: &str, reuse_detection: bool, ledger: &Ledger) -> Presented {
        match self.refresh.get(rt).copied() {
            None => Presented::Unknown,
            Some((family, false)) => {
                if reuse_detection {
                    self.refresh.insert(rt.to_string(), (family, true));
                } else {
                    self.refresh.remove(rt);
                }
                Presented::Live(family)
            }
            Some((family, true)) => {
                self.refresh.retain(|_, (f, _)| *f != family);
                for access in self.access.remove(&family).unwrap_or_default() {
                    ledger.revoke(&access);
                }
                self.revoked.insert(family);
                Presented::Reused
            }
        }
    }
}

fn oauth_error(status: StatusCode, code: &str) -> Response {
    (status, Json(json!({"error": code, "error_description": format!("double says {code}")}))).into_response()
}

/// A 400 `invalid_grant`, counted.
fn invalid_grant(s: &Inner) -> Response {
    s.invalid_grants.fetch_add(1, Ordering::SeqCst);
    oauth_error(StatusCode::BAD_REQUEST, "invalid_grant")
}

/// Parse the body as the content type says; a body in the wrong encoding is a 400 as a
/// real server would give.
/// A parsed body: its content type and fields; or the status and RFC 6749 error code.
type Parsed = Result<(String, HashMap<String, String>), (StatusCode, &'static str)>;

fn params(headers: &HeaderMap, body: &Bytes) -> Parsed {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let map = if ct.starts_with("application/x-www-form-urlencoded") {
        url::form_urlencoded::parse(body).into_owned().collect()
    } else if ct.starts_with("application/json") {
        let v: Value = serde_json::from_slice(body).map_err(|_| (StatusCode::BAD_REQUEST, "invalid_request"))?;
        let Value::Object(o) = v else { return Err((StatusCode::BAD_REQUEST, "invalid_request")) };
        o.into_iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k, s)),
                _ => Err((StatusCode::BAD_REQUEST, "invalid_request")),
            })
            .collect::<Result<_, _>>()?
    } else {
        return Err((StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_request"));
    };
    Ok((ct, map))
}

/// Client authentication per RFC 6749 section 2.3.1: Basic with form-encoded parts, or
/// id and secret in the body; not both.
fn client_ok(cfg: &IdpConfig, secret: &str, auth: Option<&str>, p: &HashMap<String, String>) -> bool {
    if let Some(b64) = auth.and_then(|a| a.strip_prefix("Basic ")) {
        if p.contains_key("client_secret") {
            return false;
        }
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64) else { return false };
        let Ok(raw) = String::from_utf8(raw) else { return false };
        let Some((id, pass)) = raw.split_once(':') else { return false };
        let dec =
            |s: &str| url::form_urlencoded::parse(format!("x={s}").as_bytes()).next().map(|(_, v)| v.into_owned());
        return dec(id).as_deref() == Some(&cfg.client_id) && dec(pass).as_deref() == Some(secret);
    }
    p.get("client_id") == Some(&cfg.client_id) && p.get("client_secret").map(String::as_str) == Some(secret)
}

async fn token(State(s): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    let delay = *lock(&s.delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    let parsed = params(&headers, &body);
    if let Ok((ct, p)) = &parsed {
        lock(&s.seen).push(SeenRequest {
            content_type: ct.clone(),
            authorization: auth.clone(),
            params: p.clone(),
            at: Instant::now(),
        });
    }
    let mode = lock(&s.mode).clone();
    match mode {
        Mode::Normal => {}
        Mode::Status(code, err) => {
            if err == "invalid_grant" {
                s.invalid_grants.fetch_add(1, Ordering::SeqCst);
            }
            return oauth_error(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), err);
        }
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Mode::Garbage => return (StatusCode::OK, "<html>surprise</html>").into_response(),
        Mode::RateLimited(secs) => {
            let mut r = oauth_error(StatusCode::TOO_MANY_REQUESTS, "slow_down");
            r.headers_mut().insert(header::RETRY_AFTER, secs.into());
            return r;
        }
        Mode::Redirect => {
            return (StatusCode::FOUND, [(header::LOCATION, "http://127.0.0.1:1/elsewhere")]).into_response();
        }
        Mode::Huge => {
            let padding = "x".repeat(300 * 1024);
            return Json(json!({"access_token": "huge", "expires_in": 3600, "padding": padding})).into_response();
        }
        Mode::ExpiresIn(_) => {}
    }
    let (_, p) = match parsed {
        Ok(x) => x,
        Err((status, code)) => return oauth_error(status, code),
    };
    let secret = lock(&s.client_secret).clone();
    if !client_ok(&s.cfg, &secret, auth.as_deref(), &p) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    // The family the new tokens join; `None`: no refresh token is issued.
    let family = match p.get("grant_type").map(String::as_str) {
        Some("client_credentials") => None,
        Some("password") => {
            let (Some(u), Some(pw)) = (p.get("username"), p.get("password")) else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
            };
            // The password, or a one-time password from /otp/send (single use).
            let otp_ok = lock(&s.otps).get(u) == Some(pw);
            if s.cfg.username.as_ref() != Some(u) || (s.cfg.password.as_ref() != Some(pw) && !otp_ok) {
                return invalid_grant(&s);
            }
            if otp_ok {
                lock(&s.otps).remove(u);
            }
            s.cfg.refresh_tokens.then(|| lock(&s.refresh_tokens).new_family())
        }
        Some("refresh_token") => {
            let Some(rt) = p.get("refresh_token") else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
            };
            if s.reject_refresh.load(Ordering::SeqCst) {
                return invalid_grant(&s);
            }
            match lock(&s.refresh_tokens).present(rt, s.cfg.reuse_detection, &s.ledger) {
                Presented::Live(family) => Some(family),
                Presented::Unknown | Presented::Reused => return invalid_grant(&s),
            }
        }
        Some(_) => return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type"),
        None => return oauth_error(StatusCode::BAD_REQUEST, "invalid_request"),
    };
    // Held while issuing, so that a concurrent revocation of the family either sees the
    // new tokens (and revokes them) or comes first (and nothing is issued).
    let mut families = lock(&s.refresh_tokens);
    if family.is_some_and(|f| families.revoked.contains(&f)) {
        drop(families);
        return invalid_grant(&s);
    }
    let n = s.counter.fetch_add(1, Ordering::SeqCst) + 1;
    let access = format!("{}-{n}-{:016x}", s.cfg.token_prefix, fastrand::u64(..));
    s.ledger.issue(&access, Some(Instant::now() + s.cfg.lifetime));
    let mut body = json!({"access_token": access, "token_type": "bearer", "scope": null});
    if let Mode::ExpiresIn(v) = mode {
        body["expires_in"] = v;
    } else if s.cfg.send_expires_in {
        body["expires_in"] = json!(s.cfg.lifetime.as_secs());
    }
    if let Some(family) = family {
        let rt = format!("rt-{n}-{:016x}", fastrand::u64(..));
        families.refresh.insert(rt.clone(), (family, false));
        families.access.entry(family).or_default().push(access.clone());
        body["refresh_token"] = json!(rt);
    }
    drop(families);
    (StatusCode::OK, Json(body)).into_response()
}
