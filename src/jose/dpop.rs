//! RFC 9449 DPoP proofs, ES256 with a P-256 key.
//!
//! [`DpopKey::proof`] runs on the request path for every proxied request of a DPoP
//! provider, so everything that does not change per proof is done once when the key is
//! made: the signing key is parsed and prepared, and the protected header (`typ`, `alg`,
//! `jwk`) is serialized and base64url-encoded. A proof is then one buffer: the header, the
//! claims written by hand and encoded in place, one ECDSA signature.
//!
//! The signature is ring's (`examples/dpop_cost.rs`: ~17 µs against ~140 µs for the p256
//! crate on the bench machine, and it is nearly all of a proof's cost). p256 parses the
//! key files and stays as the fallback signer should ring's RNG ever fail, so `proof()`
//! never fails.

use std::fmt::{self, Write as _};
use std::path::Path;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::Signer;
use sha2::{Digest, Sha256};

use super::keys::{read_private_key, FileKey};
use super::{jti, now_secs, KeyError};

/// A DPoP key with its signer and header prepared. `Debug` prints the thumbprint only.
#[derive(Clone)]
pub struct DpopKey {
    /// The request-path signer (fixed-length r‖s, as JWS wants).
    ring: Arc<ring::signature::EcdsaKeyPair>,
    rng: ring::rand::SystemRandom,
    /// The same key; signs if ring cannot (its RNG failed), RFC 6979 deterministic.
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
            .expect("ring accepts a P-256 key that p256 generated")
    }

    /// PEM (PKCS#8 or SEC1) or a private JWK (or a JWK Set with one private key). P-256
    /// only; anything else is an error that names what the file holds.
    pub fn load(path: &Path) -> Result<DpopKey, KeyError> {
        match read_private_key(path, None)?.key {
            FileKey::P256(secret) => DpopKey::from_signer(p256::ecdsa::SigningKey::from(secret))
                .map_err(|reason| KeyError::Invalid { path: path.to_path_buf(), reason }),
            other => Err(KeyError::Invalid {
                path: path.to_path_buf(),
                reason: format!("holds {}; DPoP needs an EC P-256 key (ES256)", other.describe()),
            }),
        }
    }

    fn from_signer(signer: p256::ecdsa::SigningKey) -> Result<DpopKey, String> {
        let point = signer.verifying_key().to_encoded_point(false);
        let rng = ring::rand::SystemRandom::new();
        let ring = ring::signature::EcdsaKeyPair::from_private_key_and_public_key(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &zeroize::Zeroizing::new(signer.to_bytes()),
            point.as_bytes(),
            &rng,
        )
        .map_err(|_| "an EC P-256 key that ring refuses".to_owned())?;
        // An uncompressed point of a valid key always has both coordinates.
        let coord = |c: Option<&p256::FieldBytes>| c.map(|c| URL_SAFE_NO_PAD.encode(c)).unwrap_or_default();
        let (x, y) = (coord(point.x()), coord(point.y()));
        let thumbprint = jwk_thumbprint(&[("crv", "P-256"), ("kty", "EC"), ("x", &x), ("y", &y)]);
        let header =
            format!(r#"{{"typ":"dpop+jwt","alg":"ES256","jwk":{{"kty":"EC","crv":"P-256","x":"{x}","y":"{y}"}}}}"#);
        let mut header_b64 = URL_SAFE_NO_PAD.encode(header.as_bytes());
        header_b64.push('.');
        Ok(DpopKey { ring: Arc::new(ring), rng, signer, header_b64, x, y, thumbprint })
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
        match self.ring.sign(&self.rng, jws.as_bytes()) {
            Ok(signature) => {
                jws.push('.');
                URL_SAFE_NO_PAD.encode_string(signature.as_ref(), &mut jws);
            }
            Err(_) => self.sign_with_p256(&mut jws),
        }
        let mut value = http::HeaderValue::from_maybe_shared(bytes::Bytes::from(jws))
            .expect("base64url segments joined by '.' are always a valid header value");
        value.set_sensitive(true);
        value
    }
}

impl DpopKey {
    /// Appends `.` and the signature of `jws` (the signing input) made with p256, RFC 6979
    /// deterministic: needs no randomness, so it works when ring's RNG does not.
    fn sign_with_p256(&self, jws: &mut String) {
        let signature: p256::ecdsa::Signature = self.signer.sign(jws.as_bytes());
        jws.push('.');
        URL_SAFE_NO_PAD.encode_string(signature.to_bytes(), jws);
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use jsonwebtoken::jwk::ThumbprintHash;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    use serde_json::Value;

    use super::*;
    use crate::jose::test_support::*;

    const HTU: &str = "https://api.example.com/v1/orders";

    /// Verifies a proof the way a resource server does: the key from the proof's own
    /// header, ES256, the `dpop+jwt` type. Returns the header and claims as JSON.
    fn verify(proof: &http::HeaderValue) -> (Value, Value) {
        let text = proof.to_str().expect("ASCII");
        let header = jsonwebtoken::decode_header(text).expect("header");
        assert_eq!(header.typ.as_deref(), Some("dpop+jwt"));
        assert_eq!(header.alg, Algorithm::ES256);
        let jwk = header.jwk.expect("jwk in header");
        let mut validation = Validation::new(Algorithm::ES256);
        validation.validate_exp = false;
        validation.validate_aud = false;
        validation.set_required_spec_claims::<&str>(&[]);
        let data = jsonwebtoken::decode::<Value>(text, &DecodingKey::from_jwk(&jwk).expect("jwk"), &validation)
            .expect("proof verifies");
        let raw_header = text.split('.').next().expect("header segment");
        let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(raw_header).expect("b64")).expect("json");
        (header, data.claims)
    }

    fn names(v: &Value) -> Vec<&str> {
        let mut names: Vec<&str> = v.as_object().expect("object").keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn a_proof_verifies_with_its_own_jwk_and_carries_exactly_the_claims_asked_for() {
        let key = DpopKey::generate();
        let token_ath = ath("the-access-token");
        let proof = key.proof("POST", HTU, Some(&token_ath), Some("server-nonce-1"));
        assert!(proof.is_sensitive());
        let (header, claims) = verify(&proof);
        assert_eq!(names(&header), ["alg", "jwk", "typ"]);
        assert_eq!(header["jwk"], key.public_jwk(), "the header carries the public key, nothing more");
        assert_eq!(names(&header["jwk"]), ["crv", "kty", "x", "y"]);
        assert_eq!(names(&claims), ["ath", "htm", "htu", "iat", "jti", "nonce"]);
        assert_eq!(claims["htm"], "POST");
        assert_eq!(claims["htu"], HTU);
        assert_eq!(claims["ath"], token_ath.as_str());
        assert_eq!(claims["nonce"], "server-nonce-1");
        let iat = claims["iat"].as_u64().expect("iat");
        assert!(iat.abs_diff(crate::jose::now_secs()) <= 1, "iat {iat}");

        let (_, bare) = verify(&key.proof("GET", HTU, None, None));
        assert_eq!(names(&bare), ["htm", "htu", "iat", "jti"]);

        // The check is real: a proof does not verify under another key.
        let other = DpopKey::generate();
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(other.public_jwk()).expect("jwk");
        let mut validation = Validation::new(Algorithm::ES256);
        validation.validate_exp = false;
        validation.set_required_spec_claims::<&str>(&[]);
        let text = proof.to_str().expect("ASCII");
        assert!(jsonwebtoken::decode::<Value>(text, &DecodingKey::from_jwk(&jwk).expect("jwk"), &validation).is_err());
    }

    #[test]
    fn htu_loses_query_and_fragment() {
        let key = DpopKey::generate();
        let (_, claims) = verify(&key.proof("GET", "https://api.example.com/a?x=1#frag", None, None));
        assert_eq!(claims["htu"], "https://api.example.com/a");
        let (_, claims) = verify(&key.proof("GET", "https://api.example.com/b#frag", None, None));
        assert_eq!(claims["htu"], "https://api.example.com/b");
    }

    #[test]
    fn server_chosen_text_cannot_break_the_json() {
        let key = DpopKey::generate();
        let nonce = "n\",\"htm\":\"DELETE\\\u{1}\n\t\u{7f}é";
        let htu = "https://api.example.com/\"quoted\"";
        let (_, claims) = verify(&key.proof("GET", htu, None, Some(nonce)));
        assert_eq!(names(&claims), ["htm", "htu", "iat", "jti", "nonce"]);
        assert_eq!(claims["nonce"], nonce, "the nonce comes back exactly");
        assert_eq!(claims["htm"], "GET");
        assert_eq!(claims["htu"], htu);
    }

    #[test]
    fn a_thousand_proofs_have_a_thousand_jtis() {
        let key = DpopKey::generate();
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            let text = key.proof("GET", HTU, None, None).to_str().expect("ASCII").to_owned();
            let claims = text.split('.').nth(1).expect("claims segment");
            let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).expect("b64")).expect("json");
            let jti = claims["jti"].as_str().expect("jti").to_owned();
            assert_eq!(URL_SAFE_NO_PAD.decode(&jti).expect("base64url").len(), 16);
            seen.insert(jti);
        }
        assert_eq!(seen.len(), 1000);
        // And a sample still verifies (the loop above reads claims without the signature).
        verify(&key.proof("GET", HTU, None, None));
    }

    #[test]
    fn thumbprints_follow_rfc_7638() {
        // RFC 7638 §3.1, the RSA example.
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
        assert_eq!(
            jwk_thumbprint(&[("e", "AQAB"), ("kty", "RSA"), ("n", n)]),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );

        // EC: computed here from the canonical JSON, and by jsonwebtoken.
        let key = DpopKey::generate();
        let jwk = key.public_jwk();
        let canonical = format!(
            "{{\"crv\":\"P-256\",\"kty\":\"EC\",\"x\":\"{}\",\"y\":\"{}\"}}",
            jwk["x"].as_str().expect("x"),
            jwk["y"].as_str().expect("y")
        );
        assert_eq!(key.thumbprint(), b64u(&Sha256::digest(canonical.as_bytes())));
        let parsed: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk).expect("jwk");
        assert_eq!(key.thumbprint(), parsed.thumbprint(ThumbprintHash::SHA256));
        assert_ne!(key.thumbprint(), DpopKey::generate().thumbprint(), "a generated key is new each time");
    }

    #[test]
    fn ath_matches_rfc_9449() {
        // RFC 9449 §7.1: the access token and the ath of the example proof.
        assert_eq!(ath("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"), "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo");
    }

    #[test]
    fn a_key_file_gives_the_same_thumbprint_every_time_in_every_format() {
        let dir = Dir::new();
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256");
        let raw = pair.public_key_raw(); // 0x04 || x || y
        let expected =
            jwk_thumbprint(&[("crv", "P-256"), ("kty", "EC"), ("x", &b64u(&raw[1..33])), ("y", &b64u(&raw[33..]))]);
        let pkcs8 = dir.write("dpop.pem", pair.serialize_pem());
        let first = DpopKey::load(&pkcs8).expect("PKCS#8");
        let second = DpopKey::load(&pkcs8).expect("PKCS#8 again");
        assert_eq!(first.thumbprint(), expected);
        assert_eq!(second.thumbprint(), expected);

        let secret: p256::SecretKey =
            p256::pkcs8::DecodePrivateKey::from_pkcs8_der(&pair.serialize_der()).expect("PKCS#8");
        let sec1 = dir.write("dpop-sec1.pem", pem("EC PRIVATE KEY", &secret_sec1(&secret)));
        assert_eq!(DpopKey::load(&sec1).expect("SEC1").thumbprint(), expected);
        let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "x": b64u(&raw[1..33]), "y": b64u(&raw[33..]),
            "d": b64u(&secret.to_bytes())});
        assert_eq!(DpopKey::load(&dir.write("dpop.jwk", jwk.to_string())).expect("JWK").thumbprint(), expected);
        verify(&first.proof("GET", HTU, None, None));
    }

    #[test]
    fn other_keys_are_refused_with_what_the_file_holds() {
        let dir = Dir::new();
        let cases = [
            (
                rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519").serialize_pem(),
                "holds an Ed25519 key",
            ),
            (
                rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("P-384").serialize_pem(),
                "holds an EC P-384 key",
            ),
            (
                rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert").cert.pem(),
                "holds an X.509 certificate",
            ),
        ];
        for (i, (contents, expected)) in cases.into_iter().enumerate() {
            let path = dir.write(&format!("k{i}.pem"), &contents);
            let text = DpopKey::load(&path).expect_err("not P-256").to_string();
            assert!(text.contains(expected) && text.contains(&*path.to_string_lossy()), "{text}");
            assert_no_material(&text, &pem_body(&contents));
        }
        let rsa = pem(
            "RSA PRIVATE KEY",
            rsa::pkcs1::EncodeRsaPrivateKey::to_pkcs1_der(rsa_2048()).expect("PKCS#1").as_bytes(),
        );
        let text = DpopKey::load(&dir.write("rsa.pem", rsa)).expect_err("RSA").to_string();
        assert!(text.contains("holds an RSA key (2048 bits); DPoP needs an EC P-256 key"), "{text}");
        let missing = dir.path("missing.pem");
        let text = DpopKey::load(&missing).expect_err("missing").to_string();
        assert!(text.contains(&*missing.to_string_lossy()), "{text}");
    }

    #[test]
    fn debug_prints_the_thumbprint_only() {
        let dir = Dir::new();
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256");
        let pem_text = pair.serialize_pem();
        let key = DpopKey::load(&dir.write("k.pem", &pem_text)).expect("load");
        let debug = format!("{key:?}");
        assert_eq!(debug, format!("DpopKey {{ thumbprint: {:?}, .. }}", key.thumbprint()));
        assert_no_material(&debug, &pem_body(&pem_text));
    }

    #[test]
    fn the_p256_fallback_signs_verifiable_proofs() {
        let key = DpopKey::generate();
        let proof = key.proof("GET", HTU, None, Some("n"));
        let text = proof.to_str().expect("ASCII");
        let mut input = text[..text.rfind('.').expect("signature")].to_owned();
        key.sign_with_p256(&mut input);
        assert_ne!(input, text, "a different signature");
        let (_, claims) = verify(&http::HeaderValue::from_str(&input).expect("header value"));
        assert_eq!(claims["nonce"], "n");
    }

    fn secret_sec1(secret: &p256::SecretKey) -> Vec<u8> {
        secret.to_sec1_der().expect("SEC1").to_vec()
    }
}
