//! Doubles of the seed token systems (`shared/seeds/`), faithful to their documents:
//! paths, encodings, header and field names. Anything else is rejected the way a real
//! server would (400/401/415), so a provider that drifts from the contract fails tests.
//! One-time codes are "delivered out of band" into the double, where tests read them.
// Handlers return ready-made rejection responses as errors: the axum idiom, and the
// size of an error on a test double's path does not matter.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::Ledger;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn bad(status: StatusCode, msg: &str) -> Response {
    (status, Json(json!({"error": msg}))).into_response()
}

fn content_type(h: &HeaderMap) -> &str {
    h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("")
}

fn otp() -> String {
    format!("{:06}", fastrand::u32(0..1_000_000))
}

async fn serve(app: Router) -> std::io::Result<SocketAddr> {
    let (listener, addr) = crate::bind_loopback().await?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(addr)
}

/// Counts requests per path.
#[derive(Default)]
struct Calls(Mutex<HashMap<String, usize>>);

impl Calls {
    fn hit(&self, path: &str) {
        *lock(&self.0).entry(path.to_string()).or_default() += 1;
    }
    fn get(&self, path: &str) -> usize {
        lock(&self.0).get(path).copied().unwrap_or(0)
    }
}

// --- TNID (seed 000) -------------------------------------------------------------------

struct TnidInner {
    ledger: Ledger,
    /// Phone number → the OTP "texted" to it.
    otps: Mutex<HashMap<String, String>>,
    calls: Calls,
}

/// TNID: `POST /auth/create_user_otp` and `POST /auth/token`, form-encoded.
#[derive(Clone)]
pub struct Tnid {
    inner: Arc<TnidInner>,
    pub addr: SocketAddr,
}

impl Tnid {
    pub async fn start(ledger: Ledger) -> std::io::Result<Self> {
        let inner = Arc::new(TnidInner { ledger, otps: Default::default(), calls: Default::default() });
        let app = Router::new()
            .route("/auth/create_user_otp", post(tnid_otp))
            .route("/auth/token", post(tnid_token))
            .with_state(Arc::clone(&inner));
        Ok(Tnid { addr: serve(app).await?, inner })
    }
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// The OTP last sent to `phone`, as the user would read it from their phone.
    pub fn otp_for(&self, phone: &str) -> Option<String> {
        lock(&self.inner.otps).get(phone).cloned()
    }
    pub fn calls(&self, path: &str) -> usize {
        self.inner.calls.get(path)
    }
}

fn form(h: &HeaderMap, body: &Bytes, allowed: &[&str]) -> Result<HashMap<String, String>, Response> {
    if !content_type(h).starts_with("application/x-www-form-urlencoded") {
        return Err(bad(StatusCode::UNSUPPORTED_MEDIA_TYPE, "expected application/x-www-form-urlencoded"));
    }
    let map: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(bad(StatusCode::BAD_REQUEST, &format!("unexpected field {k}")));
    }
    Ok(map)
}

async fn tnid_otp(State(s): State<Arc<TnidInner>>, h: HeaderMap, body: Bytes) -> Response {
    s.calls.hit("/auth/create_user_otp");
    let f = match form(&h, &body, &["telephone_number", "first_name", "last_name", "email"]) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let Some(phone) = f.get("telephone_number").filter(|p| !p.is_empty()) else {
        return bad(StatusCode::BAD_REQUEST, "telephone_number is required");
    };
    lock(&s.otps).insert(phone.clone(), otp());
    (StatusCode::OK, Json(json!({"message": "OTP sent"}))).into_response()
}

async fn tnid_token(State(s): State<Arc<TnidInner>>, h: HeaderMap, body: Bytes) -> Response {
    s.calls.hit("/auth/token");
    let f = match form(&h, &body, &["telephone_number", "otp_code"]) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let (Some(phone), Some(code)) = (f.get("telephone_number"), f.get("otp_code")) else {
        return bad(StatusCode::BAD_REQUEST, "telephone_number and otp_code are required");
    };
    let mut otps = lock(&s.otps);
    if otps.get(phone) != Some(code) {
        return bad(StatusCode::UNAUTHORIZED, "invalid_grant");
    }
    otps.remove(phone);
    let token = format!("tnid-{:016x}", fastrand::u64(..));
    // TNID tokens never expire.
    s.ledger.issue(&token, None);
    (StatusCode::OK, Json(json!({"access_token": token}))).into_response()
}

// --- Etna (seed 001) -------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct EtnaConfig {
    /// Mount point of the API, e.g. `/api/` (the token endpoint is `{base}token`).
    pub base: String,
    pub app_key: String,
    pub username: String,
    pub password: String,
    pub two_factor: bool,
}

impl Default for EtnaConfig {
    fn default() -> Self {
        EtnaConfig {
            base: "/api/".into(),
            app_key: "etna-app-key".into(),
            username: "trader".into(),
            password: "etna-pass".into(),
            two_factor: true,
        }
    }
}

struct EtnaInner {
    cfg: EtnaConfig,
    ledger: Ledger,
    /// Interim token → the verification code "mailed" for it.
    pending: Mutex<HashMap<String, String>>,
    last_code: Mutex<Option<String>>,
    calls: AtomicU64,
}

/// Etna: `POST {base}token` with `Et-App-Key`, `Username`, `Password` headers, and with
/// two-factor a second call adding `Authorization: Bearer <interim>` and `VerificationCode`.
#[derive(Clone)]
pub struct Etna {
    inner: Arc<EtnaInner>,
    pub addr: SocketAddr,
}

impl Etna {
    pub async fn start(cfg: EtnaConfig, ledger: Ledger) -> std::io::Result<Self> {
        let path = format!("{}token", cfg.base);
        let inner = Arc::new(EtnaInner {
            cfg,
            ledger,
            pending: Default::default(),
            last_code: Default::default(),
            calls: AtomicU64::new(0),
        });
        let app = Router::new().route(&path, post(etna_token)).with_state(Arc::clone(&inner));
        Ok(Etna { addr: serve(app).await?, inner })
    }
    /// The base URL as users configure it (`…/api/`).
    pub fn url(&self) -> String {
        format!("http://{}{}", self.addr, self.inner.cfg.base)
    }
    /// The verification code last sent by email/SMS.
    pub fn last_code(&self) -> Option<String> {
        lock(&self.inner.last_code).clone()
    }
    pub fn calls(&self) -> u64 {
        self.inner.calls.load(Ordering::SeqCst)
    }
}

async fn etna_token(State(s): State<Arc<EtnaInner>>, h: HeaderMap, body: Bytes) -> Response {
    s.calls.fetch_add(1, Ordering::SeqCst);
    let get = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
    if !body.is_empty() {
        return bad(StatusCode::BAD_REQUEST, "the token request carries no body");
    }
    if get("et-app-key") != Some(s.cfg.app_key.as_str()) {
        return bad(StatusCode::UNAUTHORIZED, "invalid Et-App-Key");
    }
    if get("username") != Some(s.cfg.username.as_str()) || get("password") != Some(s.cfg.password.as_str()) {
        return bad(StatusCode::UNAUTHORIZED, "invalid Username or Password");
    }
    let issue = |final_token: bool| {
        let t = format!("etna-{}-{:016x}", if final_token { "final" } else { "interim" }, fastrand::u64(..));
        if final_token {
            s.ledger.issue(&t, None);
        }
        t
    };
    if !s.cfg.two_factor {
        return Json(json!({"Token": issue(true)})).into_response();
    }
    match (get("authorization").and_then(|a| a.strip_prefix("Bearer ")), get("verificationcode")) {
        (None, None) => {
            let interim = issue(false);
            let code = otp();
            lock(&s.pending).insert(interim.clone(), code.clone());
            *lock(&s.last_code) = Some(code);
            Json(json!({"Token": interim})).into_response()
        }
        (Some(interim), Some(code)) => {
            let mut pending = lock(&s.pending);
            match pending.get(interim) {
                Some(expected) if expected == code => {
                    pending.remove(interim);
                    Json(json!({"Token": issue(true)})).into_response()
                }
                Some(_) => bad(StatusCode::UNAUTHORIZED, "invalid VerificationCode"),
                None => bad(StatusCode::UNAUTHORIZED, "unknown interim token"),
            }
        }
        _ => bad(StatusCode::BAD_REQUEST, "two-factor needs both Authorization and VerificationCode"),
    }
}

// --- Thrill-ID (seed 003) --------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct ThrillConfig {
    pub username: String,
    pub password: String,
    pub lifetime: Duration,
    pub org_id: String,
    pub unit_ids: Vec<String>,
}

impl Default for ThrillConfig {
    fn default() -> Self {
        ThrillConfig {
            username: "example-account@yourorg.com".into(),
            password: "some_really_random_password".into(),
            lifetime: Duration::from_secs(1800),
            org_id: "thrilltech".into(),
            unit_ids: vec!["brand1".into(), "brand2".into()],
        }
    }
}

struct ThrillInner {
    cfg: ThrillConfig,
    ledger: Ledger,
    /// Live token -> (refresh_token, session); a refresh consumes its pair and the new
    /// pair stays in the same session.
    pairs: Mutex<HashMap<String, (String, u64)>>,
    /// Sessions below this number were logged out: their refresh tokens, including any
    /// issued by a refresh that raced the logout, are refused.
    first_live_session: AtomicU64,
    next_session: AtomicU64,
    calls: Calls,
}

/// Thrill-ID: `POST /accounts/auth` and `POST /accounts/refresh`, JSON bodies, JWTs.
#[derive(Clone)]
pub struct ThrillId {
    inner: Arc<ThrillInner>,
    pub addr: SocketAddr,
}

impl ThrillId {
    pub async fn start(cfg: ThrillConfig, ledger: Ledger) -> std::io::Result<Self> {
        let inner = Arc::new(ThrillInner {
            cfg,
            ledger,
            pairs: Default::default(),
            first_live_session: AtomicU64::new(0),
            next_session: AtomicU64::new(0),
            calls: Default::default(),
        });
        let app = Router::new()
            .route("/accounts/auth", post(thrill_auth))
            .route("/accounts/refresh", post(thrill_refresh))
            .with_state(Arc::clone(&inner));
        Ok(ThrillId { addr: serve(app).await?, inner })
    }
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// Calls to `/accounts/auth` or `/accounts/refresh`.
    pub fn calls(&self, path: &str) -> usize {
        self.inner.calls.get(path)
    }
    /// Log out every session so far (as a server-side logout would): each refresh token
    /// of theirs is refused from now on, even one a refresh in flight is issuing now,
    /// and only `/accounts/auth` starts a usable session again.
    pub fn revoke_refresh_tokens(&self) {
        let next = self.inner.next_session.load(Ordering::SeqCst);
        self.inner.first_live_session.store(next, Ordering::SeqCst);
        lock(&self.inner.pairs).clear();
    }
}

fn json_fields(h: &HeaderMap, body: &Bytes, fields: &[&str]) -> Result<Vec<String>, Response> {
    if !content_type(h).starts_with("application/json") {
        return Err(bad(StatusCode::UNSUPPORTED_MEDIA_TYPE, "Content-Type must be application/json"));
    }
    let v: Value = serde_json::from_slice(body).map_err(|_| bad(StatusCode::BAD_REQUEST, "invalid JSON"))?;
    fields
        .iter()
        .map(|f| {
            v.get(*f)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(StatusCode::BAD_REQUEST, &format!("{f} is required")))
        })
        .collect()
}

fn thrill_issue(s: &ThrillInner, session: u64) -> Response {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) + s.cfg.lifetime.as_secs();
    let claims = json!({"sub": s.cfg.username, "exp": exp, "jti": format!("{:016x}", fastrand::u64(..))});
    let key = jsonwebtoken::EncodingKey::from_secret(b"thrill-double-signing-key");
    let Ok(token) = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key) else {
        return bad(StatusCode::INTERNAL_SERVER_ERROR, "cannot sign");
    };
    let refresh = format!("thrill-rt-{:016x}", fastrand::u64(..));
    s.ledger.issue(&token, Some(Instant::now() + s.cfg.lifetime));
    lock(&s.pairs).insert(token.clone(), (refresh.clone(), session));
    Json(json!({
        "token": token,
        "refresh_token": refresh,
        "access_to": {"org_id": s.cfg.org_id, "unit_ids": s.cfg.unit_ids},
    }))
    .into_response()
}

async fn thrill_auth(State(s): State<Arc<ThrillInner>>, h: HeaderMap, body: Bytes) -> Response {
    s.calls.hit("/accounts/auth");
    let f = match json_fields(&h, &body, &["username", "password"]) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if f[0] != s.cfg.username || f[1] != s.cfg.password {
        return bad(StatusCode::UNAUTHORIZED, "invalid credentials");
    }
    let session = s.next_session.fetch_add(1, Ordering::SeqCst);
    thrill_issue(&s, session)
}

async fn thrill_refresh(State(s): State<Arc<ThrillInner>>, h: HeaderMap, body: Bytes) -> Response {
    s.calls.hit("/accounts/refresh");
    let f = match json_fields(&h, &body, &["token", "refresh_token"]) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let session = match lock(&s.pairs).remove(&f[0]) {
        Some((refresh, session)) if refresh == f[1] && session >= s.first_live_session.load(Ordering::SeqCst) => {
            session
        }
        _ => return bad(StatusCode::UNAUTHORIZED, "invalid token or refresh_token"),
    };
    thrill_issue(&s, session)
}
