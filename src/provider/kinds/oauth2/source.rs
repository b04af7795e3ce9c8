//! The OAuth2 token source: one token request per acquire or refresh, built from the
//! grant, the client authentication, the files read again each time (assertions and
//! subject tokens rotate), `resource`, and a DPoP proof when asked for.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use base64::Engine;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION};
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use super::client_auth::Authenticator;
use super::discovery::{Discovery, Metadata};
use super::{validate, Endpoint, Grant, OAuth2Spec, OtpSpec};
use crate::jose::dpop::DpopKey;
use crate::provider::error::{ErrorClass, FetchError};
use crate::provider::response::{self, string_at};
use crate::provider::spec::HttpClientSpec;
use crate::provider::{TokenSet, TokenSource};
use crate::secret::Secret;
use crate::template::Vars;

pub struct OAuth2Source {
    spec: OAuth2Spec,
    /// Presents the client certificate when one is configured (RFC 8705).
    client: reqwest::Client,
    auth: Authenticator,
    discovery: Option<Discovery>,
    /// The token endpoint's latest `DPoP-Nonce` (RFC 9449 section 8). Token requests
    /// are rare and serialised; a plain mutex is enough.
    dpop_nonce: Mutex<Option<String>>,
}

/// The rotating files' contents, read for one token request.
#[derive(Default)]
struct GrantFiles {
    client_assertion: Option<Zeroizing<String>>,
    assertion: Option<Zeroizing<String>>,
    subject: Option<Zeroizing<String>>,
    actor: Option<Zeroizing<String>>,
}

impl OAuth2Source {
    pub fn new(spec: OAuth2Spec, http: &HttpClientSpec) -> Result<Self, FetchError> {
        let mut builder = response::builder(http)?;
        if let Some(c) = &spec.client_cert {
            let read = |key: &str, p: &Path| {
                std::fs::read(p).map(Zeroizing::new).map_err(|e| {
                    FetchError::new(
                        ErrorClass::CredentialFile,
                        format!("cannot read {key} {}: {}", p.display(), e.kind()),
                    )
                })
            };
            let cert = read("client_cert_file", &c.cert.path)?;
            let key = read("client_key_file", &c.key.path)?;
            let identity = validate::identity_pem(&cert, &key)
                .map_err(|reason| FetchError::new(ErrorClass::CredentialFile, format!("client_cert_file: {reason}")))?;
            builder = builder.identity(identity);
        }
        let client = response::build(builder)?;
        let discovery = match &spec.endpoint {
            Endpoint::Issuer(u) => Some(Discovery::new(u.clone())),
            Endpoint::Token(_) => None,
        };
        Ok(OAuth2Source { auth: Authenticator::new(&spec)?, client, discovery, dpop_nonce: Mutex::new(None), spec })
    }

    /// Where this request goes: `token_url`, or the discovered token endpoint (its mTLS
    /// alias when a client certificate is presented), after checking that the IdP
    /// supports what this provider is configured to do. Second: the token endpoint as
    /// the IdP names it, the `aud` of client assertions (never the mTLS alias, which
    /// IdPs do not accept as an audience).
    async fn token_endpoint(&self) -> Result<(url::Url, url::Url), FetchError> {
        let (Some(d), Endpoint::Issuer(_)) = (&self.discovery, &self.spec.endpoint) else {
            return match &self.spec.endpoint {
                Endpoint::Token(u) => Ok((u.clone(), u.clone())),
                Endpoint::Issuer(_) => Err(FetchError::new(ErrorClass::Discovery, "no discovery for the issuer")),
            };
        };
        let m = d.metadata(&self.client).await?;
        if let Err(reason) = self.supported(&m) {
            // Metadata may be fixed on the IdP's side; read it again next time.
            d.forget().await;
            return Err(FetchError::new(ErrorClass::Discovery, reason));
        }
        let post_to = match (&self.spec.client_cert, &m.mtls_token_endpoint) {
            (Some(_), Some(alias)) => alias.clone(),
            _ => m.token_endpoint.clone(),
        };
        Ok((post_to, m.token_endpoint.clone()))
    }

    /// The config checked against what the IdP advertises. A list the IdP leaves out
    /// checks nothing.
    fn supported(&self, m: &Metadata) -> Result<(), String> {
        let s = &self.spec;
        if let Some(methods) = &m.auth_methods {
            let method = s.client_auth.as_str();
            // `none` with no client id sends no client authentication at all.
            if (s.client_id.is_some() || method != "none") && !methods.iter().any(|x| x == method) {
                return Err(format!(
                    "the IdP does not support `client_auth = \"{method}\"` (it advertises: {})",
                    methods.join(", ")
                ));
            }
        }
        if let Some(grants) = &m.grant_types {
            let g = s.grant.grant_type();
            if !grants.iter().any(|x| x == g) {
                return Err(format!("the IdP does not support the grant `{g}` (it advertises: {})", grants.join(", ")));
            }
        }
        if let (Some(_), Some(algs)) = (&s.dpop, &m.dpop_algs) {
            if !algs.iter().any(|a| a == "ES256") {
                return Err(format!("the IdP does not accept ES256 DPoP proofs (it advertises: {})", algs.join(", ")));
            }
        }
        Ok(())
    }

    /// Read the grant's files now: a rotated projected token is used by the very next
    /// request. A missing or empty file fails the request before anything is sent.
    async fn grant_files(&self, refreshing: bool) -> Result<GrantFiles, FetchError> {
        let mut f = GrantFiles::default();
        if let Some(p) = &self.spec.client_assertion_file {
            f.client_assertion = Some(read_token_file("client_assertion_file", p).await?);
        }
        if refreshing {
            return Ok(f);
        }
        if let Some(p) = &self.spec.assertion_file {
            f.assertion = Some(read_token_file("assertion_file", p).await?);
        }
        if let Some(x) = &self.spec.exchange {
            f.subject = Some(read_token_file("subject_token_file", &x.subject_token_file).await?);
            if let Some(a) = &x.actor_token_file {
                f.actor = Some(read_token_file("actor_token_file", a).await?);
            }
        }
        Ok(f)
    }

    /// The grant's parameters, in order, as (name, value). Secrets are exposed here and
    /// only here, straight into the request body.
    fn params<'a>(
        &'a self,
        refresh_token: Option<&'a Secret>,
        otp: Option<&'a Secret>,
        files: &'a GrantFiles,
        client: &'a [(&'static str, Zeroizing<String>)],
    ) -> Vec<(&'a str, &'a str)> {
        let s = &self.spec;
        let mut p: Vec<(&str, &str)> = Vec::with_capacity(12);
        match refresh_token {
            Some(rt) => {
                p.push(("grant_type", "refresh_token"));
                p.push(("refresh_token", rt.expose()));
            }
            None => {
                p.push(("grant_type", s.grant.grant_type()));
                match s.grant {
                    Grant::ClientCredentials => {}
                    Grant::Password => {
                        if let Some(u) = &s.username {
                            p.push(("username", u));
                        }
                        // Seed 002: a one-time password mailed by `/otp/send` stands in for the password.
                        if let Some(pw) = otp.or(s.password.as_ref()) {
                            p.push(("password", pw.expose()));
                        }
                    }
                    Grant::JwtBearer => {
                        if let Some(a) = &files.assertion {
                            p.push(("assertion", a));
                        }
                    }
                    Grant::TokenExchange => {
                        if let (Some(x), Some(subject)) = (&s.exchange, &files.subject) {
                            p.push(("subject_token", subject));
                            p.push(("subject_token_type", &x.subject_token_type));
                            if let Some(actor) = &files.actor {
                                p.push(("actor_token", actor));
                                p.push(("actor_token_type", &x.actor_token_type));
                            }
                            if let Some(r) = &x.requested_token_type {
                                p.push(("requested_token_type", r));
                            }
                        }
                    }
                }
            }
        }
        for (k, v) in client {
            p.push((k, v));
        }
        if refresh_token.is_none() {
            if let Some(scope) = &s.scope {
                p.push(("scope", scope));
            }
            if let Some(aud) = &s.audience {
                p.push(("audience", aud));
            }
        }
        // RFC 8707 section 2.2: also on refresh, so the new token has the same audience.
        for r in &s.resource {
            p.push(("resource", r));
        }
        for (k, v) in &s.extra_params {
            p.push((k, v));
        }
        p
    }

    async fn request(&self, refresh_token: Option<&Secret>, otp: Option<&Secret>) -> Result<TokenSet, FetchError> {
        let (url, audience) = self.token_endpoint().await?;
        let files = self.grant_files(refresh_token.is_some()).await?;
        // One replay at most: the IdP's answer to a proof without its nonce (RFC 9449
        // section 8) carries the nonce to use.
        for attempt in 0..2 {
            // A fresh assertion for every request: IdPs refuse a `jti` they saw before.
            let client = self.auth.params(&self.spec, audience.as_str(), files.client_assertion.as_ref())?;
            let params = self.params(refresh_token, otp, &files, &client);
            let resp = self.send(&url, &params).await;
            let resp = match resp {
                Ok(r) => r,
                Err(e) => {
                    self.endpoint_failed().await;
                    return Err(e);
                }
            };
            let nonce_sent = self.remember_nonce(resp.headers());
            if !resp.status().is_success() {
                let status = resp.status();
                let e = response::error_response(resp).await;
                if attempt == 0 && nonce_sent && e.oauth_error.as_deref() == Some("use_dpop_nonce") {
                    tracing::debug!("token endpoint asked for a DPoP nonce; sending the proof again with it");
                    continue;
                }
                if status == reqwest::StatusCode::NOT_FOUND || status.is_server_error() {
                    self.endpoint_failed().await;
                }
                return Err(e);
            }
            let body = response::read_body(resp).await?;
            let mut set = parse_token_response(&body)?;
            match (&self.spec.dpop, set.extras.contains_key("token_type")) {
                // Without a key of ours, a `DPoP` type cannot be honoured: never mark it.
                (None, _) => drop(set.extras.remove("token_type")),
                // RFC 9449 section 5: the IdP may still issue a bearer token; it is used as one.
                (Some(_), false) => {
                    tracing::warn!("DPoP is configured but the IdP issued a bearer token; injecting it as `Bearer`")
                }
                (Some(_), true) => {}
            }
            return Ok(set);
        }
        Err(FetchError::new(ErrorClass::Rejected, "the token endpoint refused the DPoP nonce it asked for"))
    }

    async fn send(&self, url: &url::Url, params: &[(&str, &str)]) -> Result<reqwest::Response, FetchError> {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        for (k, v) in &self.spec.extra_headers {
            headers.insert(k.clone(), v.clone());
        }
        if let Some(b) = self.auth.header() {
            headers.insert(AUTHORIZATION, b.clone());
        }
        if let Some(d) = &self.spec.dpop {
            headers.insert("dpop", self.token_proof(&d.key, url));
        }
        let req = self.client.post(url.clone()).headers(headers);
        let req = match self.spec.encoding {
            super::Encoding::Form => req.form(params),
            super::Encoding::Json => req.json(&json_body(params)),
        };
        req.send().await.map_err(response::transport_error)
    }

    /// A proof for the token request: `htu` is the endpoint without query or fragment.
    fn token_proof(&self, key: &DpopKey, url: &url::Url) -> HeaderValue {
        let mut htu = url.clone();
        htu.set_query(None);
        htu.set_fragment(None);
        let nonce = self.dpop_nonce.lock().ok().and_then(|n| n.clone());
        key.proof("POST", htu.as_str(), None, nonce.as_deref())
    }

    /// Keep a `DPoP-Nonce` the endpoint sent; true when it is a new one.
    fn remember_nonce(&self, headers: &HeaderMap) -> bool {
        let Some(n) = headers.get("dpop-nonce").and_then(|v| v.to_str().ok()) else { return false };
        if self.spec.dpop.is_none() || n.is_empty() || n.len() > 512 {
            return false;
        }
        match self.dpop_nonce.lock() {
            Ok(mut cur) if cur.as_deref() != Some(n) => {
                *cur = Some(n.to_string());
                true
            }
            _ => false,
        }
    }

    /// The token endpoint did not answer as one: with discovery, it may have moved.
    async fn endpoint_failed(&self) {
        if let Some(d) = &self.discovery {
            d.forget().await;
        }
    }
}

/// A repeated parameter (`resource`) becomes an array in a JSON body.
fn json_body(params: &[(&str, &str)]) -> Map<String, Value> {
    let mut obj = Map::new();
    for (k, v) in params {
        let v = Value::String(v.to_string());
        match obj.get_mut(*k) {
            Some(Value::Array(a)) => a.push(v),
            Some(prev) => {
                let first = prev.take();
                *prev = Value::Array(vec![first, v]);
            }
            None => {
                obj.insert(k.to_string(), v);
            }
        }
    }
    obj
}

async fn read_token_file(key: &str, path: &Path) -> Result<Zeroizing<String>, FetchError> {
    let text = tokio::fs::read_to_string(path).await.map(Zeroizing::new).map_err(|e| {
        FetchError::new(ErrorClass::CredentialFile, format!("cannot read {key} {}: {}", path.display(), e.kind()))
    })?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(FetchError::new(ErrorClass::CredentialFile, format!("{key} {} is empty", path.display())));
    }
    Ok(Zeroizing::new(trimmed.to_string()))
}

/// Parse a successful RFC 6749 section 5.1 response. A `token_type` of `DPoP` is kept
/// (in `extras`); any other type is the bearer default.
pub fn parse_token_response(body: &[u8]) -> Result<TokenSet, FetchError> {
    let v = response::json_object(body)?;
    let token = string_at(&v, "/access_token")
        .ok_or_else(|| FetchError::new(ErrorClass::Malformed, "response has no access_token string"))?;
    let refresh_token = string_at(&v, "/refresh_token").map(Secret::new);
    let mut vars = Vars::new();
    vars.insert("token".into(), Secret::new(token));
    if let Some(rt) = &refresh_token {
        vars.insert("refresh_token".into(), rt.clone());
    }
    let mut extras = std::collections::BTreeMap::new();
    if string_at(&v, "/token_type").is_some_and(|t| t.eq_ignore_ascii_case("dpop")) {
        extras.insert("token_type".to_string(), "DPoP".to_string());
    }
    Ok(TokenSet {
        access_token: Secret::new(token),
        expires_in: v.get("expires_in").cloned(),
        refresh_token,
        scope: string_at(&v, "/scope").map(str::to_string),
        extras,
        vars,
    })
}

/// RFC 6749 section 2.3.1: client id and secret are each form-urlencoded before being
/// joined with `:` and base64-encoded (envoy #38386 and many clients skip the encoding,
/// which breaks secrets containing `:` `+` `%` or spaces).
pub fn basic_auth(client_id: &str, secret: &Secret) -> Result<HeaderValue, FetchError> {
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let raw = Zeroizing::new(format!("{}:{}", enc(client_id), enc(secret.expose())));
    let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(raw.as_bytes()));
    let mut v = HeaderValue::from_str(&format!("Basic {}", b64.as_str()))
        .map_err(|_| FetchError::new(ErrorClass::Rejected, "client credentials cannot form a Basic header"))?;
    v.set_sensitive(true);
    Ok(v)
}

#[async_trait]
impl TokenSource for OAuth2Source {
    async fn acquire(&self) -> Result<TokenSet, FetchError> {
        if self.spec.otp.is_some() {
            return Err(FetchError::new(
                ErrorClass::InvalidGrant,
                "this provider needs a one-time password (`tollgate login`)",
            ));
        }
        self.request(None, None).await
    }

    async fn refresh(&self, previous: &TokenSet) -> Result<TokenSet, FetchError> {
        match &previous.refresh_token {
            Some(rt) => {
                let mut next = self.request(Some(rt), None).await?;
                // RFC 6749 section 6: the IdP may keep the old refresh token valid and omit it.
                if next.refresh_token.is_none() {
                    next.refresh_token = Some(rt.clone());
                    next.vars.insert("refresh_token".into(), rt.clone());
                }
                Ok(next)
            }
            None => self.acquire().await,
        }
    }

    fn can_refresh(&self, previous: &TokenSet) -> bool {
        self.spec.use_refresh_token && previous.refresh_token.is_some()
    }

    fn can_acquire(&self) -> bool {
        self.spec.otp.is_none()
    }

    fn has_login(&self) -> bool {
        self.spec.otp.is_some()
    }

    /// Seed 002's `POST /otp/send` with `email` or `phone`. The endpoint answers success
    /// even for unknown users, so success here only means "sent, if the user exists".
    async fn login_start(&self) -> Result<Vars, FetchError> {
        let Some(otp) = &self.spec.otp else {
            return Err(FetchError::new(ErrorClass::Rejected, "this provider has no login flow"));
        };
        send_otp(&self.client, otp).await?;
        Ok(Vars::new())
    }

    async fn login_complete(&self, _pending: &Vars, code: &Secret) -> Result<TokenSet, FetchError> {
        self.request(None, Some(code)).await
    }

    fn dpop_key(&self) -> Option<Arc<DpopKey>> {
        self.spec.dpop.as_ref().map(|d| Arc::clone(&d.key))
    }
}

async fn send_otp(client: &reqwest::Client, otp: &OtpSpec) -> Result<(), FetchError> {
    let mut body = Map::new();
    body.insert(otp.field.clone(), Value::String(otp.value.clone()));
    let resp = client
        .post(otp.url.clone())
        .header(ACCEPT, "application/json")
        .json(&body)
        .send()
        .await
        .map_err(response::transport_error)?;
    if !resp.status().is_success() {
        let mut e = response::error_response(resp).await;
        e.detail = format!("otp send: {}", e.detail);
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_parameters_become_a_json_array() {
        let body =
            json_body(&[("grant_type", "client_credentials"), ("resource", "https://a"), ("resource", "https://b")]);
        assert_eq!(
            Value::Object(body),
            serde_json::json!({"grant_type": "client_credentials", "resource": ["https://a", "https://b"]})
        );
    }

    #[test]
    fn only_a_dpop_token_type_is_kept() {
        let dpop = parse_token_response(br#"{"access_token":"t","token_type":"dpop"}"#).unwrap();
        assert_eq!(dpop.extras.get("token_type").map(String::as_str), Some("DPoP"));
        let bearer = parse_token_response(br#"{"access_token":"t","token_type":"Bearer"}"#).unwrap();
        assert!(bearer.extras.is_empty());
    }
}
