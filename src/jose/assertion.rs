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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use jsonwebtoken::{DecodingKey, Validation};
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::traits::{PrivateKeyParts, PublicKeyParts};
    use serde_json::Value;

    use super::*;
    use crate::jose::keys::SigningAlg;
    use crate::jose::now_secs;
    use crate::jose::test_support::*;

    const CLIENT: &str = "client-1";
    const AUD: &str = "https://idp.example/oauth2/token";

    /// Verifies `jwt` as a provider would (signature, aud, iss, sub, exp) and checks every
    /// claim and the header; returns the `jti`.
    fn verify(jwt: &str, key: &DecodingKey, alg: Algorithm, kid: Option<&str>, lifetime: u64) -> String {
        let mut validation = Validation::new(alg);
        validation.set_audience(&[AUD]);
        validation.set_issuer(&[CLIENT]);
        validation.sub = Some(CLIENT.to_owned());
        validation.set_required_spec_claims(&["exp", "nbf", "aud", "iss", "sub"]);
        let data = jsonwebtoken::decode::<Value>(jwt, key, &validation).expect("assertion verifies");
        assert_eq!(data.header.alg, alg);
        assert_eq!(data.header.kid.as_deref(), kid);
        let claims = data.claims.as_object().expect("claims object");
        let mut names: Vec<&str> = claims.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["aud", "exp", "iat", "iss", "jti", "nbf", "sub"]);
        assert_eq!(
            (claims["iss"].as_str(), claims["sub"].as_str(), claims["aud"].as_str()),
            (Some(CLIENT), Some(CLIENT), Some(AUD))
        );
        let iat = claims["iat"].as_u64().expect("iat");
        assert!(iat.abs_diff(now_secs()) <= 1, "iat {iat} is not now");
        assert_eq!(claims["nbf"].as_u64(), Some(iat));
        assert_eq!(claims["exp"].as_u64(), Some(iat + lifetime));
        let jti = claims["jti"].as_str().expect("jti").to_owned();
        assert_eq!(URL_SAFE_NO_PAD.decode(&jti).expect("jti is base64url").len(), 16, "jti is 128 bits");
        jti
    }

    #[test]
    fn private_key_jwt_verifies_with_the_public_key_for_every_alg() {
        let dir = Dir::new();
        let lifetime = Duration::from_secs(90);

        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256");
        let key = SigningKey::load(&dir.write("ec.pem", ec.serialize_pem()), None, Some("ec-1")).expect("load");
        let jwt = private_key_jwt(&key, CLIENT, AUD, lifetime).expect("sign");
        verify(&jwt, &DecodingKey::from_ec_der(ec.public_key_raw()), Algorithm::ES256, Some("ec-1"), 90);

        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519");
        let key = SigningKey::load(&dir.write("ed.pem", ed.serialize_pem()), None, None).expect("load");
        let jwt = private_key_jwt(&key, CLIENT, AUD, lifetime).expect("sign");
        verify(&jwt, &DecodingKey::from_ed_der(ed.public_key_raw()), Algorithm::EdDSA, None, 90);

        let rsa = rsa_2048();
        let public = DecodingKey::from_rsa_components(&b64u(&rsa.n().to_bytes_be()), &b64u(&rsa.e().to_bytes_be()))
            .expect("RSA public key");
        let path = dir.write("rsa.pem", pem("RSA PRIVATE KEY", rsa.to_pkcs1_der().expect("PKCS#1").as_bytes()));
        for (alg, expected) in [(None, Algorithm::RS256), (Some(SigningAlg::Ps256), Algorithm::PS256)] {
            let key = SigningKey::load(&path, alg, Some("rsa-1")).expect("load");
            let jwt = private_key_jwt(&key, CLIENT, AUD, lifetime).expect("sign");
            verify(&jwt, &public, expected, Some("rsa-1"), 90);
        }

        // The check is real: a different key's public half does not verify it.
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256");
        let key = SigningKey::load(&dir.write("ec2.pem", ec.serialize_pem()), None, None).expect("load");
        let jwt = private_key_jwt(&key, CLIENT, AUD, lifetime).expect("sign");
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_audience(&[AUD]);
        assert!(jsonwebtoken::decode::<Value>(&jwt, &DecodingKey::from_ec_der(other.public_key_raw()), &validation)
            .is_err());
    }

    #[test]
    fn jwk_keys_sign_verifiable_assertions() {
        let dir = Dir::new();
        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let point = secret.public_key().to_encoded_point(false);
        let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "kid": "jwk-ec",
            "x": b64u(point.x().expect("x")), "y": b64u(point.y().expect("y")), "d": b64u(&secret.to_bytes())});
        let key = SigningKey::load(&dir.write("ec.jwk", jwk.to_string()), None, None).expect("load");
        let jwt = private_key_jwt(&key, CLIENT, AUD, Duration::from_secs(60)).expect("sign");
        verify(&jwt, &DecodingKey::from_ec_der(point.as_bytes()), Algorithm::ES256, Some("jwk-ec"), 60);

        let rsa = rsa_2048();
        let (n, e) = (b64u(&rsa.n().to_bytes_be()), b64u(&rsa.e().to_bytes_be()));
        let jwk = serde_json::json!({"kty": "RSA", "alg": "PS256", "n": n, "e": e, "d": b64u(&rsa.d().to_bytes_be())});
        let key = SigningKey::load(&dir.write("rsa.jwk", jwk.to_string()), None, None).expect("load");
        let jwt = private_key_jwt(&key, CLIENT, AUD, Duration::from_secs(60)).expect("sign");
        verify(&jwt, &DecodingKey::from_rsa_components(&n, &e).expect("public"), Algorithm::PS256, None, 60);
    }

    #[test]
    fn every_assertion_has_a_fresh_jti() {
        let dir = Dir::new();
        let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256");
        let key = SigningKey::load(&dir.write("ec.pem", ec.serialize_pem()), None, None).expect("load");
        let public = DecodingKey::from_ec_der(ec.public_key_raw());
        let jtis: HashSet<String> = (0..50)
            .map(|_| {
                let jwt = private_key_jwt(&key, CLIENT, AUD, Duration::from_secs(60)).expect("sign");
                verify(&jwt, &public, Algorithm::ES256, None, 60)
            })
            .collect();
        assert_eq!(jtis.len(), 50);
    }

    #[test]
    fn client_secret_jwt_is_hs256_over_the_secret() {
        let secret = b"a client secret of at least thirty-two bytes";
        let first = client_secret_jwt(secret, CLIENT, AUD, Duration::from_secs(30)).expect("sign");
        let second = client_secret_jwt(secret, CLIENT, AUD, Duration::from_secs(30)).expect("sign");
        let a = verify(&first, &DecodingKey::from_secret(secret), Algorithm::HS256, None, 30);
        let b = verify(&second, &DecodingKey::from_secret(secret), Algorithm::HS256, None, 30);
        assert_ne!(a, b);
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[AUD]);
        let wrong = jsonwebtoken::decode::<Value>(&first, &DecodingKey::from_secret(b"another secret"), &validation);
        assert!(wrong.is_err(), "a different secret must not verify");
        assert!(!first.contains("client secret"));
    }

    #[test]
    fn a_zero_lifetime_still_expires_after_now() {
        let jwt = client_secret_jwt(b"secret", CLIENT, AUD, Duration::ZERO).expect("sign");
        verify(&jwt, &DecodingKey::from_secret(b"secret"), Algorithm::HS256, None, 1);
    }
}
