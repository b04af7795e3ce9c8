//! An upstream API that trusts the OpenID Provider and verifies every token on its own:
//! the JWT's signature against the provider's JWKS (found through discovery), `iss`,
//! `aud`, `exp`, and for DPoP (RFC 9449 sections 4.3 and 7) the proof, its replay, its
//! nonce and the token's `cnf.jkt` binding. It records what it saw and why it refused.
//!
//! With [`VerifierConfig::tls`] it serves HTTPS and asks for (without demanding) a client
//! certificate, and then enforces RFC 8705 section 3: a token with `cnf.x5t#S256` passes
//! only over a connection that presented that very certificate. Over plain HTTP no
//! certificate can be seen, so the binding is recorded but not enforced (as by a resource
//! server that does not implement RFC 8705).
//!
//! It shares no code with tollgate; the JOSE checks are jsonwebtoken's plus the RFC's
//! rules written out here.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use axum::Json;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::keys::{jwk_thumbprint, now_secs, random_id, sha256_b64url, TestCa};

/// Why the verifier did not start.
#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    #[error("binding a loopback port: {0}")]
    Bind(std::io::Error),
    #[error("reading the provider's metadata or keys at {url}: {reason}")]
    Discovery { url: String, reason: String },
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// HTTPS for the verifier (RFC 8705 mode). `Debug` leaves the key out.
#[derive(Clone)]
pub struct VerifierTls {
    /// Server certificate, PEM (chain allowed; the leaf first).
    pub cert_pem: String,
    /// Its private key, PEM (PKCS#8, SEC1 or PKCS#1).
    pub key_pem: String,
    /// CA certificates, PEM, that a client certificate must chain to. `None`: any client
    /// certificate is taken, self-signed ones included. Either way the handshake proves
    /// the client holds the certificate's key, and a client without one is still served
    /// (its certificate-bound tokens are then refused).
    pub client_ca_pem: Option<String>,
}

impl std::fmt::Debug for VerifierTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifierTls").field("client_ca", &self.client_ca_pem.is_some()).finish_non_exhaustive()
    }
}

impl VerifierTls {
    /// A server certificate for `127.0.0.1` and `localhost` issued by `ca`, and `ca` as
    /// the client CA: trust `ca.cert_pem` towards the verifier, present `ca.client_cert(..)`.
    pub fn issued_by(ca: &TestCa) -> VerifierTls {
        let server = ca.server_cert(&["127.0.0.1", "localhost"]);
        VerifierTls { cert_pem: server.cert_pem, key_pem: server.key_pem, client_ca_pem: Some(ca.cert_pem.clone()) }
    }
}

/// What the API demands.
#[derive(Clone, Debug)]
pub struct VerifierConfig {
    /// The provider's issuer URL: discovery is read from
    /// `<issuer>/.well-known/openid-configuration`, and tokens must carry this `iss`.
    pub issuer: String,
    /// The audience this API is: a token's `aud` must be or contain it.
    pub audience: String,
    /// Refuse Bearer tokens: only `Authorization: DPoP` with a valid proof passes.
    pub require_dpop: bool,
    /// Demand the current server nonce in every DPoP proof (401 `use_dpop_nonce` and a
    /// `DPoP-Nonce` header otherwise).
    pub require_nonce: bool,
    /// Serve HTTPS, ask for a client certificate and enforce `cnf.x5t#S256`. `None`:
    /// plain HTTP, the binding not enforced.
    pub tls: Option<VerifierTls>,
}

impl VerifierConfig {
    /// Bearer or DPoP accepted, no nonce.
    pub fn new(issuer: &str, audience: &str) -> Self {
        VerifierConfig {
            issuer: issuer.into(),
            audience: audience.into(),
            require_dpop: false,
            require_nonce: false,
            tls: None,
        }
    }
}

/// One request as the verifier judged it.
#[derive(Clone, Debug)]
pub struct VerifierRecord {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// The `Authorization` scheme as sent (`Bearer`, `DPoP`, …); `None` without the header.
    pub scheme: Option<String>,
    /// Claims of the access token, when it could be decoded (even if it was refused).
    pub sub: Option<String>,
    pub client_id: Option<String>,
    pub aud: Vec<String>,
    pub jti: Option<String>,
    /// The token's `cnf.jkt`.
    pub token_jkt: Option<String>,
    /// The token's `cnf.x5t#S256` (RFC 8705 certificate binding).
    pub token_x5t: Option<String>,
    /// base64url(SHA-256(DER)) of the client certificate the connection presented (TLS
    /// mode only).
    pub client_x5t: Option<String>,
    /// The DPoP proof's `jti`, `nonce`, `htu` and key thumbprint, when a proof came.
    pub proof_jti: Option<String>,
    pub proof_nonce: Option<String>,
    pub proof_htu: Option<String>,
    pub proof_jkt: Option<String>,
    /// How many `DPoP` headers came.
    pub dpop_headers: usize,
    /// Passed every check.
    pub accepted: bool,
    /// Why not (human-readable; stable prefixes: see the `reason` strings in the source).
    pub reason: Option<String>,
    /// The RFC 6750 / RFC 9449 `error` code answered (`invalid_token`,
    /// `invalid_dpop_proof`, `use_dpop_nonce`, `invalid_request`).
    pub error: Option<String>,
    pub status: u16,
    pub at: Instant,
}

struct Refusal {
    scheme: &'static str,
    error: &'static str,
    reason: String,
}

fn refuse(scheme: &'static str, error: &'static str, reason: impl Into<String>) -> Refusal {
    Refusal { scheme, error, reason: reason.into() }
}

struct Inner {
    cfg: VerifierConfig,
    jwks_uri: String,
    keys: Mutex<HashMap<String, Jwk>>,
    http: reqwest::Client,
    seen: Mutex<Vec<VerifierRecord>>,
    proof_jtis: Mutex<HashSet<String>>,
    nonce: Mutex<String>,
    forced: Mutex<Option<(u32, u16, String)>>,
    accepted: AtomicU32,
}

/// A running verifying upstream.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
    pub addr: SocketAddr,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("addr", &self.addr).field("cfg", &self.inner.cfg).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn get_json(http: &reqwest::Client, url: &str) -> Result<Value, VerifierError> {
    let err = |reason: String| VerifierError::Discovery { url: url.to_string(), reason };
    let r = http.get(url).send().await.map_err(|e| err(e.to_string()))?;
    if !r.status().is_success() {
        return Err(err(format!("status {}", r.status())));
    }
    r.json::<Value>().await.map_err(|e| err(e.to_string()))
}

impl Verifier {
    /// Starts on an ephemeral loopback port after reading the provider's discovery
    /// document and keys; panics if it cannot (a test cannot go on without it).
    pub async fn start(cfg: VerifierConfig) -> Verifier {
        match Verifier::try_start(cfg).await {
            Ok(v) => v,
            Err(e) => panic!("verifying upstream: {e}"),
        }
    }

    pub async fn try_start(cfg: VerifierConfig) -> Result<Verifier, VerifierError> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| VerifierError::Discovery { url: cfg.issuer.clone(), reason: e.to_string() })?;
        let disco_url = format!("{}/.well-known/openid-configuration", cfg.issuer.trim_end_matches('/'));
        let disco = get_json(&http, &disco_url).await?;
        if disco["issuer"].as_str() != Some(cfg.issuer.as_str()) {
            return Err(VerifierError::Discovery { url: disco_url, reason: "issuer mismatch".into() });
        }
        let Some(jwks_uri) = disco["jwks_uri"].as_str().map(str::to_string) else {
            return Err(VerifierError::Discovery { url: disco_url, reason: "no jwks_uri".into() });
        };
        let acceptor = cfg.tls.as_ref().map(tls_acceptor).transpose()?;
        let (listener, addr) = crate::bind_loopback().await.map_err(VerifierError::Bind)?;
        let inner = Arc::new(Inner {
            cfg,
            jwks_uri,
            keys: Mutex::new(HashMap::new()),
            http,
            seen: Mutex::new(Vec::new()),
            proof_jtis: Mutex::new(HashSet::new()),
            nonce: Mutex::new(random_id()),
            forced: Mutex::new(None),
            accepted: AtomicU32::new(0),
        });
        inner.refresh_keys().await?;
        let app = axum::Router::new().fallback(handle).with_state(Arc::clone(&inner));
        match acceptor {
            None => {
                tokio::spawn(async move {
                    let _ = axum::serve(listener, app).await;
                });
            }
            Some(acceptor) => {
                let tls = TlsListener::start(listener, acceptor);
                tokio::spawn(async move {
                    let _ = axum::serve(tls, app.into_make_service_with_connect_info::<Peer>()).await;
                });
            }
        }
        Ok(Verifier { inner, addr })
    }

    /// `http://127.0.0.1:<port>`, or `https://…` in TLS mode.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme(), self.addr)
    }

    fn scheme(&self) -> &'static str {
        if self.inner.cfg.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Every request so far, in order.
    pub fn seen(&self) -> Vec<VerifierRecord> {
        lock(&self.inner.seen).clone()
    }

    /// How many requests passed every check.
    pub fn accepted(&self) -> usize {
        self.inner.accepted.load(Ordering::SeqCst) as usize
    }

    /// The refused requests.
    pub fn refused(&self) -> Vec<VerifierRecord> {
        self.seen().into_iter().filter(|r| !r.accepted).collect()
    }

    /// The nonce proofs must carry now (when `require_nonce`).
    pub fn nonce(&self) -> String {
        lock(&self.inner.nonce).clone()
    }

    /// Replaces the nonce; proofs with the old one get `use_dpop_nonce`. Returns the new one.
    pub fn rotate_nonce(&self) -> String {
        let n = random_id();
        *lock(&self.inner.nonce) = n.clone();
        n
    }

    /// Answers the next `n` requests that pass every check with `status` and this
    /// `WWW-Authenticate` value instead (e.g. 401 `Bearer error="invalid_token"`, or 403
    /// `Bearer error="insufficient_scope"`). They are recorded as refused, reason `forced`.
    pub fn force_next(&self, n: u32, status: u16, www_authenticate: &str) {
        *lock(&self.inner.forced) = Some((n, status, www_authenticate.to_string()));
    }
}

impl Inner {
    async fn refresh_keys(&self) -> Result<(), VerifierError> {
        let jwks = get_json(&self.http, &self.jwks_uri).await?;
        let mut map = HashMap::new();
        for k in jwks["keys"].as_array().into_iter().flatten() {
            let (Some(kid), Ok(jwk)) = (k["kid"].as_str(), serde_json::from_value::<Jwk>(k.clone())) else {
                continue;
            };
            map.insert(kid.to_string(), jwk);
        }
        *lock(&self.keys) = map;
        Ok(())
    }

    async fn key(&self, kid: &str) -> Option<Jwk> {
        if let Some(k) = lock(&self.keys).get(kid).cloned() {
            return Some(k);
        }
        // An unknown kid: the provider may have rotated; read the set again, once.
        self.refresh_keys().await.ok()?;
        lock(&self.keys).get(kid).cloned()
    }
}

const ASYMMETRIC: &[Algorithm] = &[
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::EdDSA,
];

fn b64_json(segment: &str) -> Option<Value> {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(segment).ok()?).ok()
}

fn str_of(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(Value::as_str).map(str::to_string)
}

fn auds(v: &Value) -> Vec<String> {
    match v.get("aud") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
        _ => Vec::new(),
    }
}

async fn handle(State(s): State<Arc<Inner>>, req: Request) -> Response {
    let (parts, _body) = req.into_parts();
    let client_x5t =
        parts.extensions.get::<ConnectInfo<Peer>>().and_then(|ConnectInfo(p)| p.cert_der.as_deref().map(sha256_b64url));
    let mut rec = VerifierRecord {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        scheme: None,
        sub: None,
        client_id: None,
        aud: Vec::new(),
        jti: None,
        token_jkt: None,
        token_x5t: None,
        client_x5t,
        proof_jti: None,
        proof_nonce: None,
        proof_htu: None,
        proof_jkt: None,
        dpop_headers: parts.headers.get_all("dpop").iter().count(),
        accepted: false,
        reason: None,
        error: None,
        status: 200,
        at: Instant::now(),
    };
    let verdict = check(&s, &parts.method, &parts.uri, &parts.headers, &mut rec).await;
    let nonce = lock(&s.nonce).clone();
    let mut resp = match verdict {
        Ok(()) => {
            let forced = {
                let mut f = lock(&s.forced);
                match f.as_mut() {
                    Some((n, status, www)) if *n > 0 => {
                        *n -= 1;
                        Some((*status, www.clone()))
                    }
                    _ => None,
                }
            };
            if let Some((status, www)) = forced {
                rec.reason = Some("forced".into());
                rec.status = status;
                let mut r = (
                    StatusCode::from_u16(status).unwrap_or(StatusCode::UNAUTHORIZED),
                    Json(json!({"error": "forced"})),
                )
                    .into_response();
                if let Ok(v) = HeaderValue::from_str(&www) {
                    r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
                r
            } else {
                rec.accepted = true;
                s.accepted.fetch_add(1, Ordering::SeqCst);
                Json(json!({
                    "ok": true,
                    "method": rec.method, "path": rec.path, "scheme": rec.scheme,
                    "sub": rec.sub, "client_id": rec.client_id, "aud": rec.aud,
                }))
                .into_response()
            }
        }
        Err(refusal) => {
            rec.reason = Some(refusal.reason.clone());
            rec.error = Some(refusal.error.to_string());
            rec.status = 401;
            let challenge = if refusal.scheme == "DPoP" {
                format!(
                    "DPoP algs=\"ES256 EdDSA\", error=\"{}\", error_description=\"{}\"",
                    refusal.error,
                    refusal.reason.replace('"', "'")
                )
            } else {
                format!(
                    "Bearer error=\"{}\", error_description=\"{}\"",
                    refusal.error,
                    refusal.reason.replace('"', "'")
                )
            };
            let mut r = (StatusCode::UNAUTHORIZED, Json(json!({"error": refusal.error, "reason": refusal.reason})))
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&challenge) {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            r
        }
    };
    if s.cfg.require_nonce {
        // RFC 9449 section 9: a resource server may hand out its nonce on any response.
        if let Ok(v) = HeaderValue::from_str(&nonce) {
            resp.headers_mut().insert("dpop-nonce", v);
        }
    }
    lock(&s.seen).push(rec);
    resp
}

async fn check(
    s: &Inner,
    method: &axum::http::Method,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    rec: &mut VerifierRecord,
) -> Result<(), Refusal> {
    let default_scheme = if s.cfg.require_dpop { "DPoP" } else { "Bearer" };
    let auth = match headers.get_all(header::AUTHORIZATION).iter().collect::<Vec<_>>().as_slice() {
        [] => return Err(refuse(default_scheme, "invalid_request", "no Authorization header")),
        [one] => one.to_str().map_err(|_| refuse(default_scheme, "invalid_request", "Authorization not text"))?,
        _ => return Err(refuse(default_scheme, "invalid_request", "several Authorization headers")),
    };
    let (scheme, token) = auth.split_once(' ').unwrap_or((auth, ""));
    rec.scheme = Some(scheme.to_string());
    let token = token.trim();
    let is_dpop = scheme.eq_ignore_ascii_case("dpop");
    let challenge = if is_dpop { "DPoP" } else { "Bearer" };
    if !is_dpop && !scheme.eq_ignore_ascii_case("bearer") {
        return Err(refuse(default_scheme, "invalid_request", format!("unknown scheme {scheme}")));
    }
    if token.is_empty() {
        return Err(refuse(challenge, "invalid_request", "empty token"));
    }

    // The access token: decode for the record first, then verify.
    let mut segs = token.split('.');
    let (Some(h), Some(p), Some(_), None) = (segs.next(), segs.next(), segs.next(), segs.next()) else {
        return Err(refuse(challenge, "invalid_token", "token is not a JWS"));
    };
    let (Some(th), Some(tc)) = (b64_json(h), b64_json(p)) else {
        return Err(refuse(challenge, "invalid_token", "token header or claims unreadable"));
    };
    rec.sub = str_of(&tc, "sub");
    rec.client_id = str_of(&tc, "client_id");
    rec.aud = auds(&tc);
    rec.jti = str_of(&tc, "jti");
    rec.token_jkt = tc.get("cnf").and_then(|c| c.get("jkt")).and_then(Value::as_str).map(str::to_string);
    rec.token_x5t = tc.get("cnf").and_then(|c| c.get("x5t#S256")).and_then(Value::as_str).map(str::to_string);

    let alg = serde_json::from_value::<Algorithm>(th["alg"].clone())
        .map_err(|_| refuse(challenge, "invalid_token", "token alg unknown"))?;
    if !ASYMMETRIC.contains(&alg) {
        return Err(refuse(challenge, "invalid_token", format!("token alg {alg:?} not accepted")));
    }
    let kid = th["kid"].as_str().ok_or_else(|| refuse(challenge, "invalid_token", "token has no kid"))?;
    let jwk = s.key(kid).await.ok_or_else(|| refuse(challenge, "invalid_token", "token kid not in the JWKS"))?;
    let key = DecodingKey::from_jwk(&jwk).map_err(|_| refuse(challenge, "invalid_token", "JWKS key unusable"))?;
    let mut v = Validation::new(alg);
    v.set_issuer(&[s.cfg.issuer.as_str()]);
    v.set_audience(&[s.cfg.audience.as_str()]);
    v.set_required_spec_claims(&["exp", "iss", "aud"]);
    v.leeway = 0;
    jsonwebtoken::decode::<Value>(token, &key, &v).map_err(|e| {
        use jsonwebtoken::errors::ErrorKind;
        let why = match e.kind() {
            ErrorKind::InvalidSignature => "bad signature".to_string(),
            ErrorKind::ExpiredSignature => "expired token".to_string(),
            ErrorKind::InvalidAudience => "wrong audience".to_string(),
            ErrorKind::InvalidIssuer => "wrong issuer".to_string(),
            ErrorKind::MissingRequiredClaim(c) => format!("missing claim {c}"),
            other => format!("invalid token: {other:?}"),
        };
        refuse(challenge, "invalid_token", why)
    })?;

    // RFC 8705 section 3: only the holder of the bound certificate may use the token.
    if s.cfg.tls.is_some() {
        match (&rec.token_x5t, &rec.client_x5t) {
            (None, _) => {}
            (Some(_), None) => {
                return Err(refuse(challenge, "invalid_token", "certificate-bound token without the bound certificate"))
            }
            (Some(t), Some(c)) if t == c => {}
            (Some(_), Some(_)) => {
                return Err(refuse(challenge, "invalid_token", "certificate-bound token with another certificate"))
            }
        }
    }

    if !is_dpop {
        if s.cfg.require_dpop {
            return Err(refuse("DPoP", "invalid_token", "DPoP required, Bearer sent"));
        }
        if rec.token_jkt.is_some() {
            return Err(refuse("Bearer", "invalid_token", "DPoP-bound token used as Bearer"));
        }
        return Ok(());
    }

    // RFC 9449 section 4.3.
    let proofs: Vec<_> = headers.get_all("dpop").iter().collect();
    let proof = match proofs.as_slice() {
        [] => return Err(refuse("DPoP", "invalid_dpop_proof", "no DPoP proof")),
        [one] => one.to_str().map_err(|_| refuse("DPoP", "invalid_dpop_proof", "proof not text"))?,
        _ => return Err(refuse("DPoP", "invalid_dpop_proof", "several DPoP proofs")),
    };
    let mut segs = proof.split('.');
    let (Some(ph), Some(pc), Some(_), None) = (segs.next(), segs.next(), segs.next(), segs.next()) else {
        return Err(refuse("DPoP", "invalid_dpop_proof", "proof is not a JWS"));
    };
    let (Some(ph), Some(pc)) = (b64_json(ph), b64_json(pc)) else {
        return Err(refuse("DPoP", "invalid_dpop_proof", "proof header or claims unreadable"));
    };
    rec.proof_jti = str_of(&pc, "jti");
    rec.proof_nonce = str_of(&pc, "nonce");
    rec.proof_htu = str_of(&pc, "htu");
    rec.proof_jkt = ph.get("jwk").and_then(jwk_thumbprint);
    let bad = |why: &str| refuse("DPoP", "invalid_dpop_proof", why.to_string());

    if ph["typ"].as_str() != Some("dpop+jwt") {
        return Err(bad("proof typ is not dpop+jwt"));
    }
    let palg = serde_json::from_value::<Algorithm>(ph["alg"].clone()).map_err(|_| bad("proof alg unknown"))?;
    if !ASYMMETRIC.contains(&palg) {
        return Err(bad("proof alg not asymmetric"));
    }
    let pjwk = ph.get("jwk").filter(|j| j.is_object()).ok_or_else(|| bad("proof has no jwk"))?;
    if ["d", "p", "q", "dp", "dq", "qi", "k", "oth"].iter().any(|m| pjwk.get(m).is_some()) {
        return Err(bad("proof jwk has private key members"));
    }
    let pkey = serde_json::from_value::<Jwk>(pjwk.clone())
        .ok()
        .and_then(|j| DecodingKey::from_jwk(&j).ok())
        .ok_or_else(|| bad("proof jwk unusable"))?;
    let mut pv = Validation::new(palg);
    pv.validate_exp = false;
    pv.validate_aud = false;
    pv.required_spec_claims.clear();
    jsonwebtoken::decode::<Value>(proof, &pkey, &pv).map_err(|_| bad("proof signature invalid"))?;

    let jti = rec.proof_jti.clone().filter(|j| !j.is_empty()).ok_or_else(|| bad("proof has no jti"))?;
    // Any proof with a valid signature is remembered: the same proof twice is a replay,
    // whatever happened to it the first time.
    if !lock(&s.proof_jtis).insert(jti) {
        return Err(bad("replayed proof (jti seen before)"));
    }
    if pc["htm"].as_str() != Some(method.as_str()) {
        return Err(bad("proof htm does not match the method"));
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
    let web = if s.cfg.tls.is_some() { "https" } else { "http" };
    let expected_htu = format!("{web}://{host}{}", uri.path());
    let htu = rec.proof_htu.clone().unwrap_or_default();
    let htu_base = htu.split(['?', '#']).next().unwrap_or_default();
    if htu_base != expected_htu {
        return Err(bad(&format!("proof htu {htu_base} is not {expected_htu}")));
    }
    let iat = pc["iat"].as_u64().ok_or_else(|| bad("proof has no iat"))?;
    if iat.abs_diff(now_secs()) > 60 {
        return Err(bad("proof iat not within 60 s"));
    }
    if s.cfg.require_nonce {
        let current = lock(&s.nonce).clone();
        match rec.proof_nonce.as_deref() {
            None => return Err(refuse("DPoP", "use_dpop_nonce", "proof has no nonce")),
            Some(n) if n != current => return Err(refuse("DPoP", "use_dpop_nonce", "proof nonce is stale")),
            Some(_) => {}
        }
    }
    if pc["ath"].as_str() != Some(sha256_b64url(token.as_bytes()).as_str()) {
        return Err(bad("proof ath does not match the token"));
    }
    match (&rec.token_jkt, &rec.proof_jkt) {
        (None, _) => Err(refuse("DPoP", "invalid_token", "token is not DPoP-bound (no cnf.jkt)")),
        (Some(t), Some(p)) if t == p => Ok(()),
        _ => Err(refuse("DPoP", "invalid_token", "token cnf.jkt is not the proof key's thumbprint")),
    }
}

/// The connection a request came on: its peer and the client certificate it presented.
#[derive(Clone, Debug)]
struct Peer {
    /// The leaf certificate, DER.
    cert_der: Option<Vec<u8>>,
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// Handshakes run in their own tasks (a stalled client cannot hold up the others); the
/// finished ones queue here for axum.
struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, Peer)>,
}

/// How long a client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl TlsListener {
    fn start(listener: TcpListener, acceptor: TlsAcceptor) -> TlsListener {
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, _) = match listener.accept().await {
                    Ok(c) => c,
                    Err(_) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await else {
                        return;
                    };
                    let cert_der =
                        tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.as_ref().to_vec());
                    let _ = tx.send((tls, Peer { cert_der })).await;
                });
            }
        });
        TlsListener { ready }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task is gone: nothing more will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(Peer { cert_der: None })
    }
}

fn tls_acceptor(t: &VerifierTls) -> Result<TlsAcceptor, VerifierError> {
    let bad = |what: &str| VerifierError::Tls(what.to_string());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_slice_iter(t.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad("cert_pem is not PEM"))?;
    if chain.is_empty() {
        return Err(bad("cert_pem holds no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(t.key_pem.as_bytes()).map_err(|_| bad("key_pem holds no private key"))?;
    let client_verifier: Arc<dyn ClientCertVerifier> = match &t.client_ca_pem {
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(c.map_err(|_| bad("client_ca_pem is not PEM"))?).map_err(|e| bad(&e.to_string()))?;
            }
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                .allow_unauthenticated()
                .build()
                .map_err(|e| bad(&e.to_string()))?
        }
        None => Arc::new(AnyClientCert(Arc::clone(&provider))),
    };
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e.to_string()))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain, key)
        .map_err(|e| bad(&e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Takes any client certificate (self-signed ones too) but still checks the handshake
/// signature, so the client proves it holds the key: that is all RFC 8705's binding needs.
#[derive(Debug)]
struct AnyClientCert(Arc<rustls::crypto::CryptoProvider>);

impl ClientCertVerifier for AnyClientCert {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
