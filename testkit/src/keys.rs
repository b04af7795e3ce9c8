//! Keys, JWTs and certificates for tests against the OpenID Provider double: client keys
//! for `private_key_jwt`, a trusted issuer of subject tokens (a Kubernetes service-account
//! token stand-in), DPoP proofs, and a test CA for mTLS.
//!
//! This is the tests' own implementation of the JOSE pieces, deliberately independent of
//! tollgate's, so that a shared misunderstanding cannot make both sides agree.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use p256::pkcs8::DecodePrivateKey;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A random URL-safe identifier (for `jti`).
pub fn random_id() -> String {
    let bytes: Vec<u8> = (0..16).map(|_| fastrand::u8(..)).collect();
    URL_SAFE_NO_PAD.encode(bytes)
}

/// base64url(SHA-256(s)): a DPoP `ath` and the form of other hashes here.
pub fn sha256_b64url(s: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(s))
}

/// The RFC 7638 thumbprint of a public JWK (EC, OKP or RSA); `None` for other key types
/// or missing members.
pub fn jwk_thumbprint(jwk: &Value) -> Option<String> {
    let s = |k: &str| jwk.get(k).and_then(Value::as_str);
    // Members in lexicographic order, no whitespace: the canonical form RFC 7638 hashes.
    let canonical = match s("kty")? {
        "EC" => format!(r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#, s("crv")?, s("x")?, s("y")?),
        "OKP" => format!(r#"{{"crv":"{}","kty":"OKP","x":"{}"}}"#, s("crv")?, s("x")?),
        "RSA" => format!(r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#, s("e")?, s("n")?),
        _ => return None,
    };
    Some(sha256_b64url(canonical.as_bytes()))
}

/// Which key type a [`TestKey`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// EC P-256, signs ES256.
    Es256,
    /// Ed25519, signs EdDSA.
    Ed25519,
}

/// An asymmetric signing key with its public JWK. `Debug` shows only the kid and kind.
#[derive(Clone)]
pub struct TestKey {
    kid: String,
    kind: KeyKind,
    pem: String,
    der: Vec<u8>,
    public_jwk: Value,
    private_jwk: Value,
}

impl std::fmt::Debug for TestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestKey").field("kid", &self.kid).field("kind", &self.kind).finish()
    }
}

impl TestKey {
    /// A fresh EC P-256 key (ES256).
    pub fn es256(kid: &str) -> TestKey {
        let kp = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate a P-256 key");
        Self::from_rcgen(kid, KeyKind::Es256, &kp)
    }

    /// A fresh Ed25519 key (EdDSA).
    pub fn ed25519(kid: &str) -> TestKey {
        let kp = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("generate an Ed25519 key");
        Self::from_rcgen(kid, KeyKind::Ed25519, &kp)
    }

    fn from_rcgen(kid: &str, kind: KeyKind, kp: &KeyPair) -> TestKey {
        let der = kp.serialize_der();
        let (public_jwk, d) = match kind {
            KeyKind::Es256 => {
                let sk = p256::SecretKey::from_pkcs8_der(&der).expect("our own P-256 PKCS#8");
                let point = kp.public_key_raw(); // 0x04 || x || y
                let jwk = json!({
                    "kty": "EC", "crv": "P-256",
                    "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                    "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
                });
                (jwk, URL_SAFE_NO_PAD.encode(sk.to_bytes()))
            }
            KeyKind::Ed25519 => {
                // ring's PKCS#8 v2 document: a 16-byte prefix, then the 32-byte seed.
                let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode(kp.public_key_raw())});
                (jwk, URL_SAFE_NO_PAD.encode(&der[16..48]))
            }
        };
        let alg = kind.alg_name();
        let mut public_jwk = public_jwk;
        public_jwk["kid"] = json!(kid);
        public_jwk["alg"] = json!(alg);
        public_jwk["use"] = json!("sig");
        let mut private_jwk = public_jwk.clone();
        private_jwk["d"] = json!(d);
        TestKey { kid: kid.to_string(), kind, pem: kp.serialize_pem(), der, public_jwk, private_jwk }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The JWS algorithm: `ES256` or `EdDSA`.
    pub fn alg(&self) -> Algorithm {
        match self.kind {
            KeyKind::Es256 => Algorithm::ES256,
            KeyKind::Ed25519 => Algorithm::EdDSA,
        }
    }

    /// The private key as PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn private_pem(&self) -> &str {
        &self.pem
    }

    /// The public JWK with `kid`, `alg` and `use`.
    pub fn public_jwk(&self) -> Value {
        self.public_jwk.clone()
    }

    /// The private JWK (the public one plus `d`), for a key file in JWK form.
    pub fn private_jwk(&self) -> Value {
        self.private_jwk.clone()
    }

    /// `{"keys": [public_jwk]}`: what a client registers as `jwks` or an issuer publishes.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.public_jwk] })
    }

    /// The RFC 7638 thumbprint of the public key (what a DPoP-bound token's `cnf.jkt` is).
    pub fn thumbprint(&self) -> String {
        jwk_thumbprint(&self.public_jwk).unwrap_or_default()
    }

    fn encoding_key(&self) -> EncodingKey {
        match self.kind {
            KeyKind::Es256 => EncodingKey::from_ec_der(&self.der),
            KeyKind::Ed25519 => EncodingKey::from_ed_der(&self.der),
        }
    }

    /// Signs `claims` with header `{alg, kid, typ: "JWT"}`.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg());
        header.kid = Some(self.kid.clone());
        self.sign_with_header(header, claims)
    }

    /// Signs `claims` with the given header (its `alg` should be [`TestKey::alg`]).
    pub fn sign_with_header(&self, header: Header, claims: &Value) -> String {
        jsonwebtoken::encode(&header, claims, &self.encoding_key()).expect("sign a JWT")
    }

    /// A `private_key_jwt` client assertion (RFC 7523 section 3): `iss` = `sub` =
    /// client_id, the given `aud`, a fresh `jti`, `iat` now, `exp` in 60 s.
    pub fn client_assertion(&self, client_id: &str, aud: &str) -> String {
        let now = now_secs();
        self.sign(&json!({
            "iss": client_id, "sub": client_id, "aud": aud,
            "jti": random_id(), "iat": now, "exp": now + 60,
        }))
    }

    /// A subject token / jwt-bearer assertion as a workload identity issuer makes it:
    /// `iss`, `sub`, `aud`, a fresh `jti`, `iat` now, `exp` after `ttl_secs`.
    pub fn subject_token(&self, iss: &str, sub: &str, aud: &str, ttl_secs: u64) -> String {
        let now = now_secs();
        self.sign(&json!({
            "iss": iss, "sub": sub, "aud": aud,
            "jti": random_id(), "iat": now, "exp": now + ttl_secs,
        }))
    }

    /// A DPoP proof (RFC 9449 section 4.2) for `htm` `htu`, with `ath` of the access
    /// token when given and the server's `nonce` when given; fresh `jti`, `iat` now.
    pub fn dpop_proof(&self, htm: &str, htu: &str, access_token: Option<&str>, nonce: Option<&str>) -> String {
        let mut claims = json!({ "jti": random_id(), "htm": htm, "htu": htu, "iat": now_secs() });
        if let Some(t) = access_token {
            claims["ath"] = json!(sha256_b64url(t.as_bytes()));
        }
        if let Some(n) = nonce {
            claims["nonce"] = json!(n);
        }
        self.dpop_proof_with_claims(&claims)
    }

    /// A DPoP proof with exactly these claims (for malformed or replayed-proof tests).
    pub fn dpop_proof_with_claims(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg());
        header.typ = Some("dpop+jwt".into());
        let mut jwk = self.public_jwk.clone();
        if let Some(o) = jwk.as_object_mut() {
            o.remove("kid");
            o.remove("use");
            o.remove("alg");
        }
        header.jwk = Some(serde_json::from_value::<Jwk>(jwk).expect("our own public JWK"));
        self.sign_with_header(header, claims)
    }
}

impl KeyKind {
    fn alg_name(self) -> &'static str {
        match self {
            KeyKind::Es256 => "ES256",
            KeyKind::Ed25519 => "EdDSA",
        }
    }
}

/// A `client_secret_jwt` client assertion (HS256 with the client secret).
pub fn client_secret_jwt(secret: &str, client_id: &str, aud: &str) -> String {
    let now = now_secs();
    let claims = json!({
        "iss": client_id, "sub": client_id, "aud": aud,
        "jti": random_id(), "iat": now, "exp": now + 60,
    });
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes()))
        .expect("sign an HS256 JWT")
}

/// A certificate with its private key, PEM encoded. `Debug` shows only the subject.
#[derive(Clone)]
pub struct TestCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// The subject DN as RFC 4514 text, e.g. `CN=client-1` (what `tls_client_auth_subject_dn` holds).
    pub subject_dn: String,
    public_jwk: Value,
}

impl std::fmt::Debug for TestCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCert").field("subject_dn", &self.subject_dn).finish()
    }
}

impl TestCert {
    /// A self-signed client certificate (for `self_signed_tls_client_auth`).
    pub fn self_signed_client(cn: &str) -> TestCert {
        let kp = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate a P-256 key");
        let params = leaf_params(cn, &[], ExtendedKeyUsagePurpose::ClientAuth);
        let cert = params.self_signed(&kp).expect("self-sign a certificate");
        TestCert::new(cert.pem(), cert.der().to_vec(), &kp, cn)
    }

    fn new(cert_pem: String, der: Vec<u8>, kp: &KeyPair, cn: &str) -> TestCert {
        let point = kp.public_key_raw();
        let public_jwk = json!({
            "kty": "EC", "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        });
        TestCert { cert_pem, key_pem: kp.serialize_pem(), der, subject_dn: format!("CN={cn}"), public_jwk }
    }

    /// base64 (standard) of the DER: one `x5c` entry.
    pub fn x5c(&self) -> String {
        STANDARD.encode(&self.der)
    }

    /// base64url(SHA-256(DER)): the `x5t#S256` of a certificate-bound token's `cnf`.
    pub fn x5t_s256(&self) -> String {
        sha256_b64url(&self.der)
    }

    /// The certificate's public key as a JWK with `x5c`: register `{"keys": [this]}` as
    /// the `jwks` of a `self_signed_tls_client_auth` client.
    pub fn jwk(&self) -> Value {
        let mut jwk = self.public_jwk.clone();
        jwk["x5c"] = json!([self.x5c()]);
        jwk
    }

    /// Certificate then key, PEM: one file for clients that want both together.
    pub fn identity_pem(&self) -> String {
        format!("{}{}", self.cert_pem, self.key_pem)
    }
}

fn leaf_params(cn: &str, sans: &[&str], eku: ExtendedKeyUsagePurpose) -> CertificateParams {
    let mut params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("certificate names");
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.extended_key_usages = vec![eku];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params
}

/// A test certificate authority: issues the OP's server certificate and clients'
/// certificates for `tls_client_auth`.
pub struct TestCa {
    params: CertificateParams,
    key: KeyPair,
    /// The CA certificate, PEM (the trust anchor for both sides).
    pub cert_pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl TestCa {
    pub fn new(cn: &str) -> TestCa {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate a P-256 key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).expect("self-sign the CA");
        TestCa { cert_pem: cert.pem(), params, key }
    }

    fn issue(&self, cn: &str, sans: &[&str], eku: ExtendedKeyUsagePurpose) -> TestCert {
        let kp = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("generate a P-256 key");
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = leaf_params(cn, sans, eku).signed_by(&kp, &issuer).expect("issue a certificate");
        TestCert::new(cert.pem(), cert.der().to_vec(), &kp, cn)
    }

    /// A server certificate for these names (IP addresses become IP SANs).
    pub fn server_cert(&self, names: &[&str]) -> TestCert {
        self.issue(names.first().copied().unwrap_or("localhost"), names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with subject `CN=<cn>`.
    pub fn client_cert(&self, cn: &str) -> TestCert {
        self.issue(cn, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }
}
