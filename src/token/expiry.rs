//! How long a freshly issued token lives: `expires_in`, else the JWT `exp` claim, else
//! the configured lifetime, else forever (TNID-style tokens; a 401 still renews them).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// A token's lifetime as decided at issue time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    Finite(Duration),
    Never,
}

/// Why the expiry information in a token response cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpiryError {
    #[error("expires_in is not a positive number of seconds")]
    BadExpiresIn,
    #[error("the token's JWT exp claim is already in the past")]
    JwtExpired,
}

/// Decide the lifetime. `expires_in` is the raw JSON value, if the response had one;
/// numeric strings ("3600") are accepted because several IdPs send them. Anything above
/// `max` is capped: an absurd `expires_in` must not make tollgate trust a token for years.
pub fn lifetime(
    expires_in: Option<&Value>,
    token: &str,
    default: Option<Duration>,
    max: Duration,
    now: SystemTime,
) -> Result<Lifetime, ExpiryError> {
    let cap = |d: Duration| Lifetime::Finite(d.min(max));
    if let Some(v) = expires_in.filter(|v| !v.is_null()) {
        let secs = match v {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        return match secs {
            Some(s) if s.is_finite() && s >= 1.0 => Ok(cap(Duration::from_secs_f64(s.min(1e12)))),
            _ => Err(ExpiryError::BadExpiresIn),
        };
    }
    if let Some((exp, iat)) = jwt_times(token) {
        // With both claims, the lifetime is the IdP's own `exp - iat`: a host clock that
        // runs ahead of (or behind) the IdP's then neither kills every token at once nor
        // keeps one past its real life.
        if let Some(iat) = iat.filter(|iat| *iat < exp) {
            return Ok(cap(Duration::from_secs(exp - iat)));
        }
        let now_s = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        return if exp > now_s { Ok(cap(Duration::from_secs(exp - now_s))) } else { Err(ExpiryError::JwtExpired) };
    }
    Ok(match default {
        Some(d) => cap(d),
        None => Lifetime::Never,
    })
}

/// The `exp` claim of a JWT, read without verifying the signature: the IdP is the party
/// that signs and the upstream the one that verifies; tollgate only needs to know when
/// to refresh. Not a JWT, or no numeric `exp`: `None`.
pub fn jwt_exp(token: &str) -> Option<u64> {
    jwt_times(token).map(|(exp, _)| exp)
}

/// The `exp` and (when numeric) `iat` claims, read as [`jwt_exp`] reads `exp`.
pub fn jwt_times(token: &str) -> Option<(u64, Option<u64>)> {
    if token.split('.').count() != 3 {
        return None;
    }
    #[derive(serde::Deserialize)]
    struct Claims {
        exp: Option<Value>,
        iat: Option<Value>,
    }
    let claims = jsonwebtoken::dangerous::insecure_decode::<Claims>(token).ok()?.claims;
    let secs = |v: Value| match v {
        Value::Number(n) => n.as_u64().or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        _ => None,
    };
    Some((secs(claims.exp?)?, claims.iat.and_then(secs)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const MAX: Duration = Duration::from_secs(86_400);

    fn jwt(claims: Value) -> String {
        use base64::Engine;
        let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!("{}.{}.sig", e.encode(br#"{"alg":"HS256","typ":"JWT"}"#), e.encode(claims.to_string()))
    }

    #[test]
    fn expires_in_number_and_string() {
        let now = SystemTime::now();
        assert_eq!(lifetime(Some(&json!(3600)), "t", None, MAX, now), Ok(Lifetime::Finite(Duration::from_secs(3600))));
        assert_eq!(
            lifetime(Some(&json!("1800")), "t", None, MAX, now),
            Ok(Lifetime::Finite(Duration::from_secs(1800)))
        );
    }

    #[test]
    fn bad_expires_in_is_an_error() {
        let now = SystemTime::now();
        for v in [json!(0), json!(-5), json!("soon"), json!(true), json!({})] {
            assert_eq!(lifetime(Some(&v), "t", None, MAX, now), Err(ExpiryError::BadExpiresIn), "{v}");
        }
    }

    #[test]
    fn absurd_expires_in_is_capped() {
        let l = lifetime(Some(&json!(1e30)), "t", None, MAX, SystemTime::now());
        assert_eq!(l, Ok(Lifetime::Finite(MAX)));
    }

    #[test]
    fn jwt_exp_is_used_without_expires_in() {
        let now = SystemTime::now();
        let now_s = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
        let t = jwt(json!({"sub": "x", "exp": now_s + 1800}));
        assert_eq!(lifetime(None, &t, None, MAX, now), Ok(Lifetime::Finite(Duration::from_secs(1800))));
        let old = jwt(json!({"exp": now_s - 1}));
        assert_eq!(lifetime(None, &old, None, MAX, now), Err(ExpiryError::JwtExpired));
    }

    #[test]
    fn a_jwt_from_an_idp_whose_clock_differs_lives_exp_minus_iat() {
        let now = SystemTime::now();
        let now_s = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
        // The IdP's clock is an hour ahead of the host's: exp - now would be 1 h 30 min.
        let ahead = jwt(json!({"iat": now_s + 3600, "exp": now_s + 3600 + 1800}));
        assert_eq!(lifetime(None, &ahead, None, MAX, now), Ok(Lifetime::Finite(Duration::from_secs(1800))));
        // An hour behind: exp is "in the past" for the host, yet the token lives 30 min.
        let behind = jwt(json!({"iat": now_s - 3600, "exp": now_s - 3600 + 1800}));
        assert_eq!(lifetime(None, &behind, None, MAX, now), Ok(Lifetime::Finite(Duration::from_secs(1800))));
        // Without iat the host clock is all there is.
        let no_iat = jwt(json!({"exp": now_s - 10}));
        assert_eq!(lifetime(None, &no_iat, None, MAX, now), Err(ExpiryError::JwtExpired));
    }

    #[test]
    fn jwt_without_exp_falls_back() {
        let t = jwt(json!({"sub": "x"}));
        let now = SystemTime::now();
        assert_eq!(
            lifetime(None, &t, Some(Duration::from_secs(60)), MAX, now),
            Ok(Lifetime::Finite(Duration::from_secs(60)))
        );
        assert_eq!(lifetime(None, &t, None, MAX, now), Ok(Lifetime::Never));
        assert_eq!(jwt_exp("not.a.jwt"), None);
        assert_eq!(jwt_exp("opaque"), None);
    }
}
