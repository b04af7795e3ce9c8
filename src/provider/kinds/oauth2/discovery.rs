//! RFC 8414 / OpenID Connect Discovery 1.0: the token endpoint, and what the IdP supports,
//! from the issuer alone.
//!
//! Read before a source's first token request (at start, and after every reload, which
//! builds a new source), and read again after the token endpoint fails in a way a
//! moved endpoint would explain (no connection, a 404, a 5xx), so an IdP that moved its
//! token endpoint is followed without a restart.

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::Mutex;

use crate::provider::error::{ErrorClass, FetchError};
use crate::provider::response;

/// What tollgate uses of the metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub token_endpoint: url::Url,
    /// RFC 8705 section 5: where clients presenting a certificate send token requests.
    pub mtls_token_endpoint: Option<url::Url>,
    /// Absent when the IdP does not say (then nothing is checked).
    pub auth_methods: Option<Vec<String>>,
    pub grant_types: Option<Vec<String>>,
    pub dpop_algs: Option<Vec<String>>,
}

/// The metadata of one issuer, fetched at most once at a time and kept until forgotten.
pub struct Discovery {
    issuer: url::Url,
    cached: Mutex<Option<Arc<Metadata>>>,
}

impl Discovery {
    pub fn new(issuer: url::Url) -> Self {
        Discovery { issuer, cached: Mutex::new(None) }
    }

    /// The metadata, fetched now if not known. Token requests are serialised by the
    /// provider's single flight; the lock only guards against two fetches racing.
    pub async fn metadata(&self, client: &reqwest::Client) -> Result<Arc<Metadata>, FetchError> {
        let mut cached = self.cached.lock().await;
        if let Some(m) = cached.as_ref() {
            return Ok(Arc::clone(m));
        }
        let m = Arc::new(fetch(client, &self.issuer).await?);
        tracing::info!(issuer = %self.issuer, token_endpoint = %m.token_endpoint, "discovery metadata read");
        *cached = Some(Arc::clone(&m));
        Ok(m)
    }

    /// Read the metadata again before the next token request.
    pub async fn forget(&self) {
        *self.cached.lock().await = None;
    }
}

/// The two well-known locations, in the order tried: OpenID Connect's (the path appended
/// to the issuer) and RFC 8414's (the well-known segment inserted before the path).
pub fn metadata_urls(issuer: &url::Url) -> Vec<url::Url> {
    let path = issuer.path().trim_end_matches('/');
    let mut oidc = issuer.clone();
    oidc.set_path(&format!("{path}/.well-known/openid-configuration"));
    let mut oauth = issuer.clone();
    oauth.set_path(&format!("/.well-known/oauth-authorization-server{path}"));
    vec![oidc, oauth]
}

async fn fetch(client: &reqwest::Client, issuer: &url::Url) -> Result<Metadata, FetchError> {
    let mut last = None;
    for url in metadata_urls(issuer) {
        let resp = client
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(response::transport_error)
            .map_err(|mut e| {
                e.detail = format!("discovery: {}", e.detail);
                e
            })?;
        let status = resp.status();
        if !status.is_success() {
            last = Some(FetchError {
                status: Some(status.as_u16()),
                ..FetchError::new(ErrorClass::Discovery, format!("GET {}: HTTP {}", url.path(), status.as_u16()))
            });
            continue;
        }
        let body = response::read_body(resp).await?;
        let v = response::json_object(&body).map_err(|e| discovery_error(&url, &e.detail))?;
        return parse(&v, issuer).map_err(|reason| discovery_error(&url, &reason));
    }
    Err(last.unwrap_or_else(|| FetchError::new(ErrorClass::Discovery, "no metadata location")))
}

fn discovery_error(url: &url::Url, reason: &str) -> FetchError {
    FetchError::new(ErrorClass::Discovery, format!("GET {}: {reason}", url.path()))
}

/// Parse and check metadata. The `issuer` in it must be the configured one (RFC 8414
/// section 3.3, OIDC Discovery section 4.3): metadata served for another issuer is an
/// impersonation attempt or a misconfiguration, never something to follow.
pub fn parse(v: &Value, issuer: &url::Url) -> Result<Metadata, String> {
    let claimed = v.get("issuer").and_then(Value::as_str).ok_or("metadata has no `issuer`")?;
    if claimed.trim_end_matches('/') != issuer.as_str().trim_end_matches('/') {
        return Err(format!("metadata is for issuer `{claimed}`, not `{issuer}`"));
    }
    let url = |pointer: &str| -> Result<Option<url::Url>, String> {
        match v.pointer(pointer).and_then(Value::as_str) {
            None => Ok(None),
            Some(s) => crate::checks::http_url(s).map(Some).map_err(|e| format!("`{}`: {e}", &pointer[1..])),
        }
    };
    let token_endpoint = url("/token_endpoint")?.ok_or("metadata has no `token_endpoint`")?;
    let list = |key: &str| -> Option<Vec<String>> {
        v.get(key).and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
    };
    Ok(Metadata {
        token_endpoint,
        mtls_token_endpoint: url("/mtls_endpoint_aliases/token_endpoint")?,
        auth_methods: list("token_endpoint_auth_methods_supported"),
        grant_types: list("grant_types_supported"),
        dpop_algs: list("dpop_signing_alg_values_supported"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_well_known_locations_are_derived_from_the_issuer() {
        let root = url::Url::parse("https://idp.example.com").unwrap();
        let urls: Vec<String> = metadata_urls(&root).iter().map(|u| u.to_string()).collect();
        assert_eq!(
            urls,
            [
                "https://idp.example.com/.well-known/openid-configuration",
                "https://idp.example.com/.well-known/oauth-authorization-server"
            ]
        );
        let tenant = url::Url::parse("https://idp.example.com/realms/prod/").unwrap();
        let urls: Vec<String> = metadata_urls(&tenant).iter().map(|u| u.to_string()).collect();
        assert_eq!(
            urls,
            [
                "https://idp.example.com/realms/prod/.well-known/openid-configuration",
                "https://idp.example.com/.well-known/oauth-authorization-server/realms/prod"
            ]
        );
    }

    #[test]
    fn metadata_for_another_issuer_is_refused() {
        let issuer = url::Url::parse("https://idp.example.com/realms/a").unwrap();
        let v = json!({"issuer": "https://evil.example.com/realms/a", "token_endpoint": "https://evil.example.com/t"});
        assert!(parse(&v, &issuer).unwrap_err().contains("not `https://idp.example.com/realms/a`"));
        let ok = json!({
            "issuer": "https://idp.example.com/realms/a",
            "token_endpoint": "https://idp.example.com/realms/a/token",
            "mtls_endpoint_aliases": {"token_endpoint": "https://mtls.idp.example.com/token"},
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        });
        let m = parse(&ok, &issuer).unwrap();
        assert_eq!(m.token_endpoint.as_str(), "https://idp.example.com/realms/a/token");
        assert_eq!(m.mtls_token_endpoint.unwrap().as_str(), "https://mtls.idp.example.com/token");
        assert_eq!(m.auth_methods.unwrap(), ["private_key_jwt"]);
        assert!(m.grant_types.is_none());
    }

    #[test]
    fn metadata_without_a_usable_token_endpoint_is_refused() {
        let issuer = url::Url::parse("https://idp.example.com").unwrap();
        assert!(parse(&json!({"issuer": "https://idp.example.com"}), &issuer).is_err());
        let v = json!({"issuer": "https://idp.example.com", "token_endpoint": "ftp://idp.example.com/t"});
        assert!(parse(&v, &issuer).unwrap_err().contains("token_endpoint"));
    }
}
