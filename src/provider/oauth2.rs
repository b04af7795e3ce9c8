//! RFC 6749 token requests: client_credentials, password and refresh_token grants, with
//! the body form-encoded (the RFC) or JSON (seed 002's `/oauth/v2/token`), and client
//! authentication in the body or in HTTP Basic.

use async_trait::async_trait;
use base64::Engine;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION};
use serde_json::{Map, Value};

use super::error::{ErrorClass, FetchError};
use super::response::{self, string_at};
use super::template::Vars;
use super::{TokenSet, TokenSource};
use crate::config::model::{ClientAuth, Encoding, Grant};
use crate::config::{HttpClientSpec, OAuth2Spec, OtpSpec, Secret};

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
}
