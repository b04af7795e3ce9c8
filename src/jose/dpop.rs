//! RFC 9449 DPoP proofs, ES256 with a P-256 key.
//!
//! [`DpopKey::proof`] runs on the request path for every proxied request of a DPoP
//! provider, so everything that does not change per proof is done once when the key is
//! made: the p256 signing key is parsed, and the protected header (`typ`, `alg`, `jwk`) is
//! serialized and base64url-encoded. A proof is then one buffer: the header, the claims
//! written by hand and encoded in place, one ECDSA signature.

use std::fmt::{self, Write as _};
use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::Signer;
use sha2::{Digest, Sha256};

use super::keys::{read_private_key, FileKey};
use super::{jti, now_secs, KeyError};

/// A DPoP key with its signer and header prepared. `Debug` prints the thumbprint only.
#[derive(Clone)]
pub struct DpopKey {
    signer: p256::ecdsa::SigningKey,
    /// `base64url(header) + "."`, the start of every proof.
    header_b64: String,
    x: String,
    y: String,
    /// RFC 7638 JWK thumbprint (SHA-256, base64url): what `cnf.jkt` of a bound token holds.
    thumbprint: String,
}

impl fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DpopKey").field("thumbprint", &self.thumbprint).finish_non_exhaustive()
    }
}

impl DpopKey {
    /// A new key from OS randomness. Its thumbprint changes with every start, so tokens
    /// bound to it do not survive a restart; [`DpopKey::load`] gives a stable one.
    pub fn generate() -> DpopKey {
        DpopKey::from_signer(p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng))
    }

    /// PEM (PKCS#8 or SEC1) or a private JWK (or a JWK Set with one private key). P-256
    /// only; anything else is an error that names what the file holds.
    pub fn load(path: &Path) -> Result<DpopKey, KeyError> {
        match read_private_key(path, None)?.key {
            FileKey::P256(secret) => Ok(DpopKey::from_signer(p256::ecdsa::SigningKey::from(secret))),
            other => Err(KeyError::Invalid {
                path: path.to_path_buf(),
                reason: format!("holds {}; DPoP needs an EC P-256 key (ES256)", other.describe()),
            }),
        }
    }

    fn from_signer(signer: p256::ecdsa::SigningKey) -> DpopKey {
        let point = signer.verifying_key().to_encoded_point(false);
        // An uncompressed point of a valid key always has both coordinates.
        let coord = |c: Option<&p256::FieldBytes>| c.map(|c| URL_SAFE_NO_PAD.encode(c)).unwrap_or_default();
        let (x, y) = (coord(point.x()), coord(point.y()));
        let thumbprint = jwk_thumbprint(&[("crv", "P-256"), ("kty", "EC"), ("x", &x), ("y", &y)]);
        let header =
            format!(r#"{{"typ":"dpop+jwt","alg":"ES256","jwk":{{"kty":"EC","crv":"P-256","x":"{x}","y":"{y}"}}}}"#);
        let mut header_b64 = URL_SAFE_NO_PAD.encode(header.as_bytes());
        header_b64.push('.');
        DpopKey { signer, header_b64, x, y, thumbprint }
    }

    /// Base64url SHA-256 of the canonical public JWK (RFC 7638); the `jkt` a provider binds
    /// tokens to, and the `dpop_jkt` of an authorization request.
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    pub fn public_jwk(&self) -> serde_json::Value {
        serde_json::json!({ "kty": "EC", "crv": "P-256", "x": self.x, "y": self.y })
    }

    /// One proof with claims `{jti, htm, htu, iat[, ath][, nonce]}`, as a sensitive header
    /// value for the `DPoP` field.
    ///
    /// `htu` is the target URI without query and fragment (RFC 9449 §4.2); anything from
    /// the first `?` or `#` on is dropped here as well, so a caller's slip cannot leak a
    /// query into a proof. `ath` is [`ath`] of the access token sent with it; `nonce` is the
    /// latest `DPoP-Nonce` of the server the proof is for. Text is JSON-escaped, so a
    /// server-chosen nonce cannot add claims.
    pub fn proof(&self, htm: &str, htu: &str, ath: Option<&str>, nonce: Option<&str>) -> http::HeaderValue {
        let htu = htu.split(['?', '#']).next().unwrap_or_default();
        let mut claims = String::with_capacity(96 + htm.len() + htu.len() + nonce.map_or(0, str::len));
        claims.push_str(r#"{"jti":""#);
        jti(&mut claims);
        claims.push_str(r#"","htm":"#);
        push_json_string(&mut claims, htm);
        claims.push_str(r#","htu":"#);
        push_json_string(&mut claims, htu);
        // Writing to a String cannot fail.
        let _ = write!(claims, r#","iat":{}"#, now_secs());
        if let Some(ath) = ath {
            claims.push_str(r#","ath":"#);
            push_json_string(&mut claims, ath);
        }
        if let Some(nonce) = nonce {
            claims.push_str(r#","nonce":"#);
            push_json_string(&mut claims, nonce);
        }
        claims.push('}');

        let mut jws = String::with_capacity(self.header_b64.len() + claims.len() * 4 / 3 + 4 + 87);
        jws.push_str(&self.header_b64);
        URL_SAFE_NO_PAD.encode_string(claims.as_bytes(), &mut jws);
        // RFC 6979 deterministic ECDSA: no randomness needed, and the message differs in
        // every proof anyway (jti).
        let signature: p256::ecdsa::Signature = self.signer.sign(jws.as_bytes());
        jws.push('.');
        URL_SAFE_NO_PAD.encode_string(signature.to_bytes(), &mut jws);
        let mut value = http::HeaderValue::from_maybe_shared(bytes::Bytes::from(jws))
            .expect("base64url segments joined by '.' are always a valid header value");
        value.set_sensitive(true);
        value
    }
}

/// base64url(SHA-256(access_token)): the `ath` claim binding a proof to the token it is
/// sent with (RFC 9449 §4.2). Computed once per token, not per request.
pub fn ath(access_token: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(access_token.as_bytes()))
}

/// RFC 7638 §3 thumbprint (SHA-256, base64url) of a public JWK given as its required
/// members, already in lexicographic order: the canonical JSON is those members and
/// nothing else, no whitespace.
fn jwk_thumbprint(members: &[(&str, &str)]) -> String {
    let mut canonical = String::from("{");
    for (i, (name, value)) in members.iter().enumerate() {
        if i > 0 {
            canonical.push(',');
        }
        push_json_string(&mut canonical, name);
        canonical.push(':');
        push_json_string(&mut canonical, value);
    }
    canonical.push('}');
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// Appends `s` as a JSON string literal (RFC 8259 §7): quotes, backslashes and control
/// characters escaped, everything else (including non-ASCII UTF-8) as is.
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    let mut plain = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[plain..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escape);
        }
        plain = i + 1;
    }
    out.push_str(&s[plain..]);
    out.push('"');
}
