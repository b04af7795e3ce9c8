//! `kind = "oauth2"`: RFC 6749 token requests with the client_credentials, password and
//! refresh_token grants, the body form-encoded (the RFC) or JSON (seed 002's
//! `/oauth/v2/token`), client authentication in the body or in HTTP Basic, and seed 002's
//! one-time password standing in for the password.
//!
//! The kind's keys, validation and identity are here with its token source.

use async_trait::async_trait;
use base64::Engine;
use http::HeaderName;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION};
use serde_json::{Map, Value};

use super::{http_url, Cx, KindSpec, SpecError};
use crate::provider::error::{ErrorClass, FetchError};
use crate::provider::response::{self, string_at};
use crate::provider::spec::{HttpClientSpec, SourceSpec};
use crate::provider::{TokenSet, TokenSource};
use crate::schema::{ClientAuthConfig, EncodingConfig, GrantConfig, ProviderConfig};
use crate::secret::Secret;
use crate::template::Vars;

/// The keys `kind = "oauth2"` accepts beyond the common ones.
pub const KEYS: &[&str] = &[
    "encoding",
    "client_auth",
    "use_refresh_token",
    "token_url",
    "grant",
    "client_id",
    "client_secret",
    "username",
    "password",
    "scope",
    "audience",
    "extra_params",
    "extra_headers",
    "otp_url",
    "otp_email",
    "otp_phone",
];

/// The grant used to obtain a token from scratch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    ClientCredentials,
    Password,
}

/// How the token request's parameters are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Form,
    Json,
}

/// How the client authenticates to the token endpoint (RFC 6749 section 2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    ClientSecretPost,
    ClientSecretBasic,
    None,
}

impl From<GrantConfig> for Grant {
    fn from(g: GrantConfig) -> Self {
        match g {
            GrantConfig::ClientCredentials => Grant::ClientCredentials,
            GrantConfig::Password => Grant::Password,
        }
    }
}

impl From<EncodingConfig> for Encoding {
    fn from(e: EncodingConfig) -> Self {
        match e {
            EncodingConfig::Form => Encoding::Form,
            EncodingConfig::Json => Encoding::Json,
        }
    }
}

impl From<ClientAuthConfig> for ClientAuth {
    fn from(c: ClientAuthConfig) -> Self {
        match c {
            ClientAuthConfig::ClientSecretPost => ClientAuth::ClientSecretPost,
            ClientAuthConfig::ClientSecretBasic => ClientAuth::ClientSecretBasic,
            ClientAuthConfig::None => ClientAuth::None,
        }
    }
}

/// Seed 002's one-time password sender.
#[derive(Debug, Clone, PartialEq)]
pub struct OtpSpec {
    pub url: url::Url,
    /// `email` or `phone`.
    pub field: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OAuth2Spec {
    pub token_url: url::Url,
    pub grant: Grant,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub encoding: Encoding,
    pub client_auth: ClientAuth,
    pub scope: Option<String>,
    pub audience: Option<String>,
    pub extra_params: Vec<(String, String)>,
    pub extra_headers: Vec<(HeaderName, HeaderValue)>,
    pub use_refresh_token: bool,
    pub otp: Option<OtpSpec>,
}

/// A human is needed when the password is a one-time password.
pub(super) fn needs_human(p: &ProviderConfig) -> bool {
    p.otp_url.is_some()
}

pub(super) fn validate(p: &ProviderConfig, cx: &mut Cx) -> Result<KindSpec, SpecError> {
    let o = spec(p, cx)?;
    Ok(KindSpec { identity: identity(&o), source: SourceSpec::OAuth2(o), implied_headers: vec![] })
}

/// What decides which token this provider gets: the token endpoint, the grant, the
/// client, the user (or the OTP recipient), the scope, and, when set, the audience and
/// the extra parameters. Never a secret. Audience and extra parameters are appended only
/// when present, so that fingerprints of configs without them are those tollgate stored
/// before they were part of the identity.
pub fn identity(o: &OAuth2Spec) -> String {
    let grant = match o.grant {
        Grant::ClientCredentials => "ClientCredentials",
        Grant::Password => "Password",
    };
    let mut id = format!(
        "oauth2|{}|{grant}|{}|{}|{}",
        o.token_url,
        o.client_id.as_deref().unwrap_or(""),
        o.username.as_deref().or(o.otp.as_ref().map(|x| x.value.as_str())).unwrap_or(""),
        o.scope.as_deref().unwrap_or("")
    );
    if let Some(aud) = &o.audience {
        id.push_str(&format!("|audience={aud}"));
    }
    if !o.extra_params.is_empty() {
        let params: Vec<String> = o.extra_params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        id.push_str(&format!("|extra_params={}", params.join("&")));
    }
    id
}

fn spec(p: &ProviderConfig, cx: &mut Cx) -> Result<OAuth2Spec, SpecError> {
    let token_url = match &p.token_url {
        Some(u) => http_url("token_url", u)?,
        None => return Err(SpecError::new("token_url", "is required for kind `oauth2`")),
    };
    let grant = p.grant.map(Grant::from).unwrap_or(Grant::ClientCredentials);
    let client_secret = cx.optional_secret("client_secret", &p.client_secret)?;
    let password = cx.optional_secret("password", &p.password)?;
    let otp = match (&p.otp_url, &p.otp_email, &p.otp_phone) {
        (None, None, None) => None,
        (Some(u), email, phone) => {
            let url = http_url("otp_url", u)?;
            let (field, value) = match (email, phone) {
                (Some(e), None) => ("email", e.clone()),
                (None, Some(ph)) => ("phone", ph.clone()),
                _ => return Err(SpecError::new("otp_url", "needs exactly one of `otp_email` or `otp_phone`")),
            };
            if grant != Grant::Password || password.is_some() {
                return Err(SpecError::new(
                    "otp_url",
                    "the one-time password replaces `password`: use `grant = \"password\"` and leave `password` unset",
                ));
            }
            Some(OtpSpec { url, field: field.into(), value })
        }
        _ => return Err(SpecError::new("otp_email", "is only used with `otp_url`")),
    };
    match grant {
        Grant::Password => {
            if p.username.is_none() {
                return Err(SpecError::new("username", "is required with `grant = \"password\"`"));
            }
            if password.is_none() && otp.is_none() {
                return Err(SpecError::new(
                    "password",
                    "is required with `grant = \"password\"` (or `otp_url` for one-time passwords)",
                ));
            }
        }
        Grant::ClientCredentials => {
            if p.username.is_some() || password.is_some() {
                return Err(SpecError::new(
                    "username",
                    "`username`/`password` are only used with `grant = \"password\"`",
                ));
            }
            if p.client_id.is_none() {
                return Err(SpecError::new("client_id", "is required with `grant = \"client_credentials\"`"));
            }
        }
    }
    let client_auth: ClientAuth = p.client_auth.unwrap_or_default().into();
    match client_auth {
        ClientAuth::ClientSecretBasic | ClientAuth::ClientSecretPost => {
            if p.client_id.is_some() && client_secret.is_none() {
                return Err(SpecError::new(
                    "client_secret",
                    "is required with a `client_id` unless `client_auth = \"none\"`",
                ));
            }
        }
        ClientAuth::None => {
            if client_secret.is_some() {
                return Err(SpecError::new("client_secret", "is set but `client_auth = \"none\"` would not send it"));
            }
        }
    }
    let mut extra_headers = Vec::new();
    for (k, v) in &p.extra_headers {
        extra_headers
            .push(crate::checks::header(k, v).map_err(|reason| SpecError::new(format!("extra_headers.{k}"), reason))?);
    }
    Ok(OAuth2Spec {
        token_url,
        grant,
        client_id: p.client_id.clone(),
        client_secret,
        username: p.username.clone(),
        password,
        encoding: p.encoding.unwrap_or_default().into(),
        client_auth,
        scope: p.scope.clone(),
        audience: p.audience.clone(),
        extra_params: p.extra_params.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        extra_headers,
        use_refresh_token: p.use_refresh_token.unwrap_or(true),
        otp,
    })
}

pub struct OAuth2Source {
    spec: OAuth2Spec,
    client: reqwest::Client,
    /// Precomputed `Basic …` header for client_secret_basic.
    basic: Option<HeaderValue>,
}

impl OAuth2Source {
    pub fn new(spec: OAuth2Spec, http: &HttpClientSpec) -> Result<Self, FetchError> {
        let basic = match (spec.client_auth, &spec.client_id, &spec.client_secret) {
            (ClientAuth::ClientSecretBasic, Some(id), Some(secret)) => Some(basic_auth(id, secret)?),
            _ => None,
        };
        Ok(OAuth2Source { client: response::client(http)?, spec, basic })
    }

    /// The grant's parameters, in order, as (name, value). Secrets are exposed here and
    /// only here, straight into the request body.
    fn params<'a>(&'a self, refresh_token: Option<&'a Secret>, otp: Option<&'a Secret>) -> Vec<(&'a str, &'a str)> {
        let s = &self.spec;
        let mut p: Vec<(&str, &str)> = Vec::with_capacity(8);
        match refresh_token {
            Some(rt) => {
                p.push(("grant_type", "refresh_token"));
                p.push(("refresh_token", rt.expose()));
            }
            None => match s.grant {
                Grant::ClientCredentials => p.push(("grant_type", "client_credentials")),
                Grant::Password => {
                    p.push(("grant_type", "password"));
                    if let Some(u) = &s.username {
                        p.push(("username", u));
                    }
                    // Seed 002: a one-time password mailed by `/otp/send` stands in for the password.
                    if let Some(pw) = otp.or(s.password.as_ref()) {
                        p.push(("password", pw.expose()));
                    }
                }
            },
        }
        match s.client_auth {
            ClientAuth::ClientSecretPost => {
                if let Some(id) = &s.client_id {
                    p.push(("client_id", id));
                }
                if let Some(secret) = &s.client_secret {
                    p.push(("client_secret", secret.expose()));
                }
            }
            ClientAuth::None => {
                if let Some(id) = &s.client_id {
                    p.push(("client_id", id));
                }
            }
            ClientAuth::ClientSecretBasic => {}
        }
        if refresh_token.is_none() {
            if let Some(scope) = &s.scope {
                p.push(("scope", scope));
            }
            if let Some(aud) = &s.audience {
                p.push(("audience", aud));
            }
        }
        for (k, v) in &s.extra_params {
            p.push((k, v));
        }
        p
    }

    async fn request(&self, refresh_token: Option<&Secret>, otp: Option<&Secret>) -> Result<TokenSet, FetchError> {
        let params = self.params(refresh_token, otp);
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        for (k, v) in &self.spec.extra_headers {
            headers.insert(k.clone(), v.clone());
        }
        if let Some(b) = &self.basic {
            headers.insert(AUTHORIZATION, b.clone());
        }
        let req = self.client.post(self.spec.token_url.clone()).headers(headers);
        let req = match self.spec.encoding {
            Encoding::Form => req.form(&params),
            Encoding::Json => {
                let obj: Map<String, Value> =
                    params.iter().map(|(k, v)| (k.to_string(), Value::String(v.to_string()))).collect();
                req.json(&obj)
            }
        };
        let resp = req.send().await.map_err(response::transport_error)?;
        if !resp.status().is_success() {
            return Err(response::error_response(resp).await);
        }
        let body = response::read_body(resp).await?;
        parse_token_response(&body)
    }
}

/// Parse a successful RFC 6749 section 5.1 response.
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
    Ok(TokenSet {
        access_token: Secret::new(token),
        expires_in: v.get("expires_in").cloned(),
        refresh_token,
        scope: string_at(&v, "/scope").map(str::to_string),
        extras: Default::default(),
        vars,
    })
}

/// RFC 6749 section 2.3.1: client id and secret are each form-urlencoded before being
/// joined with `:` and base64-encoded (envoy #38386 and many clients skip the encoding,
/// which breaks secrets containing `:` `+` `%` or spaces).
pub fn basic_auth(client_id: &str, secret: &Secret) -> Result<HeaderValue, FetchError> {
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let raw = zeroize::Zeroizing::new(format!("{}:{}", enc(client_id), enc(secret.expose())));
    let b64 = zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(raw.as_bytes()));
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
    fn basic_auth_form_encodes_before_base64() {
        let h = basic_auth("my client", &Secret::new("s:e+c%r t")).unwrap();
        let b64 = h.to_str().unwrap().strip_prefix("Basic ").unwrap();
        let raw = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        assert_eq!(String::from_utf8(raw).unwrap(), "my+client:s%3Ae%2Bc%25r+t");
        assert!(h.is_sensitive());
    }

    #[test]
    fn parses_seed_002_response() {
        let body =
            br#"{"access_token":"MTI1","expires_in":3600,"token_type":"bearer","scope":null,"refresh_token":"NmI5"}"#;
        let t = parse_token_response(body).unwrap();
        assert_eq!(t.access_token.expose(), "MTI1");
        assert_eq!(t.refresh_token.unwrap().expose(), "NmI5");
        assert_eq!(t.expires_in, Some(serde_json::json!(3600)));
    }

    #[test]
    fn malformed_bodies_are_classified() {
        for body in [&b"<html>"[..], b"[]", b"{}", br#"{"access_token":""}"#, br#"{"access_token":5}"#] {
            assert_eq!(parse_token_response(body).unwrap_err().class, ErrorClass::Malformed);
        }
    }

    use crate::provider::kinds::test_support::{fingerprint_of, with};
    use serde_json::json;

    fn client_credentials() -> Value {
        json!({
            "kind": "oauth2",
            "token_url": "http://127.0.0.1:1/token",
            "client_id": "abc123",
            "client_secret": "456789",
            "scope": "read write",
        })
    }

    fn password_grant() -> Value {
        json!({
            "kind": "oauth2",
            "token_url": "http://127.0.0.1:1/token",
            "grant": "password",
            "username": "alice",
            "password": "pw",
            "client_id": "abc123",
            "client_secret": "456789",
        })
    }

    /// Fingerprints computed by the code before identity moved into the kinds: tokens
    /// stored by that version must still load.
    #[test]
    fn fingerprints_unchanged_without_audience_or_extra_params() {
        assert_eq!(fingerprint_of(client_credentials()), "4c2d9acc40bdccd2");
        assert_eq!(fingerprint_of(with(&client_credentials(), "scope", Value::Null)), "52611bff19cd07f5");
        assert_eq!(fingerprint_of(password_grant()), "ef45f1cc299aa951");
        let otp = json!({
            "kind": "oauth2",
            "token_url": "http://127.0.0.1:1/token",
            "grant": "password",
            "username": "bob",
            "otp_url": "http://127.0.0.1:1/otp/send",
            "otp_email": "bob@example.com",
            "client_auth": "none",
            "client_id": "web",
        });
        assert_eq!(fingerprint_of(otp), "ac863d2566924330");
    }

    #[test]
    fn secret_change_keeps_the_fingerprint() {
        let base = fingerprint_of(client_credentials());
        assert_eq!(fingerprint_of(with(&client_credentials(), "client_secret", json!("rotated"))), base);
        let pw = fingerprint_of(password_grant());
        assert_eq!(fingerprint_of(with(&password_grant(), "password", json!("rotated"))), pw);
        assert_eq!(fingerprint_of(with(&password_grant(), "client_secret", json!("rotated"))), pw);
        // Settings that change how, not for whom, the token is requested.
        assert_eq!(fingerprint_of(with(&client_credentials(), "client_auth", json!("client_secret_basic"))), base);
        assert_eq!(fingerprint_of(with(&client_credentials(), "encoding", json!("json"))), base);
    }

    #[test]
    fn identity_change_alters_the_fingerprint() {
        let base = fingerprint_of(client_credentials());
        let changed = [
            with(&client_credentials(), "scope", json!("read")),
            with(&client_credentials(), "scope", Value::Null),
            with(&client_credentials(), "audience", json!("https://api.example")),
            with(&client_credentials(), "extra_params", json!({ "resource": "orders" })),
            with(&client_credentials(), "client_id", json!("other")),
            with(&client_credentials(), "token_url", json!("http://127.0.0.1:9/token")),
        ];
        for c in changed {
            assert_ne!(fingerprint_of(c.clone()), base, "{c}");
        }
        let pw = fingerprint_of(password_grant());
        assert_ne!(fingerprint_of(with(&password_grant(), "username", json!("mallory"))), pw);
        let audience = with(&client_credentials(), "audience", json!("a"));
        assert_ne!(fingerprint_of(with(&audience, "audience", json!("b"))), fingerprint_of(audience));
        let params = with(&client_credentials(), "extra_params", json!({ "resource": "orders" }));
        assert_ne!(
            fingerprint_of(with(&params, "extra_params", json!({ "resource": "invoices" }))),
            fingerprint_of(params)
        );
    }

    #[test]
    fn identity_holds_no_secret() {
        let spec =
            match crate::provider::kinds::validate(&crate::provider::kinds::test_support::table(password_grant())) {
                Ok(v) => match v.source {
                    SourceSpec::OAuth2(o) => o,
                    SourceSpec::Http(_) => panic!("oauth2 built a step flow"),
                },
                Err(e) => panic!("{e}"),
            };
        let id = identity(&spec);
        assert!(id.contains("alice") && !id.contains("456789") && !id.contains("|pw"), "{id}");
    }
}
