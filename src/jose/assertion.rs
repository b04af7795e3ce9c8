//! RFC 7523 §3 client assertions: a JWT the client signs to authenticate at the token
//! endpoint (`client_assertion` with [`ASSERTION_TYPE`]), instead of sending a secret.
//!
//! A fresh assertion for every token request: the `jti` is new each time and `exp` is
//! short, because providers remember `jti`s until `exp` and refuse a replay (RFC 7523 §3
//! item 7), and a captured assertion is worth little for long.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::keys::SigningKey;
use super::{jti, now_secs, KeyError};

/// `client_assertion_type` for both `private_key_jwt` and `client_secret_jwt`.
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    jti: String,
    iat: u64,
    /// Optional in RFC 7523 but listed as required by Entra ID; equal to `iat`.
    nbf: u64,
    exp: u64,
}

/// `iss` = `sub` = `client_id`, `aud` = `audience` (the token endpoint, or the issuer
/// where the provider wants that), `jti` = 128 random bits, `iat` = `nbf` = now, `exp` =
/// now + `lifetime` (at least one second). The header carries `alg` and the key's `kid`.
pub fn private_key_jwt(
    key: &SigningKey,
    client_id: &str,
    audience: &str,
    lifetime: Duration,
) -> Result<String, KeyError> {
    let mut header = Header::new(key.alg().jwt_algorithm());
    header.kid = key.kid().map(str::to_owned);
    sign(&header, key.encoding_key(), key.alg().as_str(), client_id, audience, lifetime)
}

/// The same claims, HS256-signed with the client secret's bytes (OIDC Core §9
/// `client_secret_jwt`): the secret authenticates without travelling.
pub fn client_secret_jwt(
    secret: &[u8],
    client_id: &str,
    audience: &str,
    lifetime: Duration,
) -> Result<String, KeyError> {
    let key = EncodingKey::from_secret(secret);
    sign(&Header::new(Algorithm::HS256), &key, "HS256", client_id, audience, lifetime)
}

fn sign(
    header: &Header,
    key: &EncodingKey,
    alg: &'static str,
    client_id: &str,
    audience: &str,
    lifetime: Duration,
) -> Result<String, KeyError> {
    let iat = now_secs();
    let mut id = String::with_capacity(22);
    jti(&mut id);
    let claims = Claims {
        iss: client_id,
        sub: client_id,
        aud: audience,
        jti: id,
        iat,
        nbf: iat,
        exp: iat + lifetime.as_secs().max(1),
    };
    jsonwebtoken::encode(header, &claims, key).map_err(|e| KeyError::Sign { alg, reason: e.to_string() })
}
