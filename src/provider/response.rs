//! HTTP plumbing shared by token sources: one client per provider, bounded body reads,
//! and the classification of non-2xx answers.

use std::time::Duration;

use reqwest::{Response, StatusCode};
use serde_json::Value;

use super::error::{sanitize_code, ErrorClass, FetchError};
use super::spec::{EgressProxy, HttpClientSpec};

/// Token responses are small; anything larger is cut off rather than buffered whole.
pub const MAX_BODY: usize = 256 * 1024;

/// A client that refuses redirects (a token request must not be replayed, credentials
/// included, to wherever a 302 points) and enforces the configured timeouts.
///
/// Egress as operators run it: the server certificate is checked against the system
/// store (`/etc/ssl/certs`, or `SSL_CERT_FILE`/`SSL_CERT_DIR`), which is where a company
/// CA or a TLS-inspecting proxy's CA is installed, plus the bundled Mozilla roots (for
/// images without a store) and the provider's `ca_file`. The proxy is the provider's
/// `proxy`, else the environment's (`HTTPS_PROXY`, `NO_PROXY`, …). An HTTPS token
/// endpoint is reached through a proxy by CONNECT: the proxy sees the host and port,
/// never the credentials.
pub fn client(spec: &HttpClientSpec) -> Result<reqwest::Client, FetchError> {
    build(builder(spec)?)
}

/// [`client`]'s settings, for a source that adds to them (a TLS client certificate).
pub fn builder(spec: &HttpClientSpec) -> Result<reqwest::ClientBuilder, FetchError> {
    let mut b = reqwest::Client::builder()
        .timeout(spec.timeout)
        .connect_timeout(spec.connect_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")));
    b = match &spec.proxy {
        // reqwest's default: the environment, read now.
        EgressProxy::Environment => b,
        EgressProxy::Direct => b.no_proxy(),
        EgressProxy::Url(u) => b.proxy(
            // The URL was checked by config validation; its text is not repeated here.
            reqwest::Proxy::all(u.as_str()).map_err(|_| {
                FetchError::new(ErrorClass::Connect, "the provider's `proxy` is not a usable proxy URL")
            })?,
        ),
    };
    if let Some(ca) = &spec.ca_file {
        let pem = std::fs::read(ca).map_err(|e| {
            FetchError::new(ErrorClass::Connect, format!("cannot read ca_file {}: {}", ca.display(), e.kind()))
        })?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem).map_err(|_| {
            FetchError::new(ErrorClass::Connect, format!("ca_file {} holds no valid PEM certificate", ca.display()))
        })? {
            b = b.add_root_certificate(cert);
        }
    }
    Ok(b)
}

pub fn build(b: reqwest::ClientBuilder) -> Result<reqwest::Client, FetchError> {
    b.build().map_err(|e| FetchError::new(ErrorClass::Connect, format!("cannot build HTTP client: {e}")))
}

/// Map a transport error. reqwest's Display can include the URL, which is config, not a
/// secret; the query string is stripped anyway in case someone put a key there.
pub fn transport_error(e: reqwest::Error) -> FetchError {
    let class = if e.is_timeout() { ErrorClass::Timeout } else { ErrorClass::Connect };
    let e = e.without_url();
    FetchError::new(class, e.to_string())
}

/// Read the body, at most [`MAX_BODY`] bytes.
pub async fn read_body(mut resp: Response) -> Result<Vec<u8>, FetchError> {
    let mut buf = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > MAX_BODY {
                    return Err(FetchError::new(
                        ErrorClass::Malformed,
                        format!("response body exceeds {MAX_BODY} bytes"),
                    ));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(buf),
            Err(e) => return Err(transport_error(e)),
        }
    }
}

/// Classify a non-2xx answer. Reads the RFC 6749 `error` field if the body is JSON and
/// keeps only that code.
pub async fn error_response(resp: Response) -> FetchError {
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.min(3600)));
    let code = match read_body(resp).await {
        Ok(body) => serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(sanitize_code)),
        Err(_) => None,
    };
    let class = match (status, code.as_deref()) {
        (_, Some("invalid_client")) | (StatusCode::UNAUTHORIZED, None) => ErrorClass::InvalidClient,
        (_, Some("invalid_grant")) => ErrorClass::InvalidGrant,
        (StatusCode::TOO_MANY_REQUESTS, _) => ErrorClass::RateLimited,
        (s, _) if s.is_server_error() => ErrorClass::ServerError,
        (s, _) if s.is_redirection() => ErrorClass::Rejected,
        _ => ErrorClass::Rejected,
    };
    let detail = match (&code, status.is_redirection()) {
        (_, true) => format!("HTTP {} (redirects are not followed)", status.as_u16()),
        (Some(c), _) => format!("HTTP {} error={c}", status.as_u16()),
        (None, _) => format!("HTTP {}", status.as_u16()),
    };
    FetchError { class, status: Some(status.as_u16()), oauth_error: code, retry_after, detail }
}

/// Parse a 2xx body as a JSON object.
pub fn json_object(body: &[u8]) -> Result<Value, FetchError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(FetchError::new(ErrorClass::Malformed, "response is JSON but not an object")),
        Err(_) => Err(FetchError::new(ErrorClass::Malformed, "response is not JSON")),
    }
}

/// A non-empty string at a JSON pointer.
pub fn string_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str).filter(|s| !s.is_empty())
}
