//! Value checks shared by config validation (routes) and provider validation (token
//! endpoints, extra headers). Each returns the reason only; the caller names the key.
//! A leaf: it imports neither config nor provider.

use http::{HeaderName, HeaderValue};

/// An `http` or `https` URL with a host and no credentials. The value is never echoed
/// in the reason: a URL may carry a key in its query or userinfo.
pub fn http_url(s: &str) -> Result<url::Url, String> {
    let u = url::Url::parse(s).map_err(|e| format!("not a valid URL: {e}"))?;
    if !u.username().is_empty() || u.password().is_some() {
        return Err("credentials in the URL are not supported (use client_id/client_secret or secrets)".into());
    }
    if u.scheme() != "http" && u.scheme() != "https" {
        return Err(format!("scheme `{}` is not supported; use http or https", u.scheme()));
    }
    if u.host_str().is_none() {
        return Err("the URL has no host".into());
    }
    Ok(u)
}

/// A static header (name and value as written).
pub fn header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("`{name}` is not a valid header name"))?;
    let v = HeaderValue::from_str(value).map_err(|_| "is not a valid header value".to_string())?;
    Ok((n, v))
}
