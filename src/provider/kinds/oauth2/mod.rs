//! `kind = "oauth2"`: RFC 6749 token requests and what modern IdPs add to them.
//!
//! - Grants: client_credentials, password (seed 002's one-time password standing in for
//!   it), refresh_token, RFC 7523 `jwt_bearer` and RFC 8693 `token_exchange` (workload
//!   identity: a projected service-account token is the credential, no client secret).
//! - Client authentication: the secret in the body or in HTTP Basic, RFC 7523 assertions
//!   (`client_secret_jwt`, `private_key_jwt`), RFC 8705 client certificates.
//! - The token endpoint from `token_url`, or from the `issuer`'s discovery metadata.
//! - RFC 8707 `resource`, RFC 9449 DPoP proofs on token requests.
//!
//! The kind's keys, validation and identity are here; requests are built in [`source`].

mod client_auth;
pub mod discovery;
mod source;
mod validate;

use std::path::PathBuf;
use std::sync::Arc;

use http::HeaderName;
use reqwest::header::HeaderValue;

use super::{Cx, KindSpec, SpecError};
use crate::jose::dpop::DpopKey;
use crate::jose::keys::SigningAlg;
use crate::provider::spec::SourceSpec;
use crate::schema::{ClientAuthConfig, EncodingConfig, GrantConfig, ProviderConfig};
use crate::secret::Secret;

pub use source::{basic_auth, parse_token_response, OAuth2Source};

/// The keys `kind = "oauth2"` accepts beyond the common ones.
pub const KEYS: &[&str] = &[
    "encoding",
    "client_auth",
    "use_refresh_token",
    "token_url",
    "issuer",
    "grant",
    "client_id",
    "client_secret",
    "username",
    "password",
    "scope",
    "audience",
    "resource",
    "extra_params",
    "extra_headers",
    "otp_url",
    "otp_email",
    "otp_phone",
    "private_key_file",
    "client_assertion_file",
    "key_id",
    "signing_alg",
    "assertion_audience",
    "assertion_file",
    "subject_token_file",
    "subject_token_type",
    "actor_token_file",
    "actor_token_type",
    "requested_token_type",
    "client_cert_file",
    "client_key_file",
    "upstream_client_cert",
    "dpop",
    "dpop_key_file",
];

/// The grant used to obtain a token from scratch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    ClientCredentials,
    Password,
    JwtBearer,
    TokenExchange,
}

impl Grant {
    /// The `grant_type` parameter (and the name discovery's `grant_types_supported` uses).
    pub fn grant_type(self) -> &'static str {
        match self {
            Grant::ClientCredentials => "client_credentials",
            Grant::Password => "password",
            Grant::JwtBearer => "urn:ietf:params:oauth:grant-type:jwt-bearer",
            Grant::TokenExchange => "urn:ietf:params:oauth:grant-type:token-exchange",
        }
    }
}

/// How the token request's parameters are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Form,
    Json,
}

/// How the client authenticates to the token endpoint (RFC 6749 section 2.3.1, RFC 7523
/// section 2.2, RFC 8705 section 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    ClientSecretPost,
    ClientSecretBasic,
    ClientSecretJwt,
    PrivateKeyJwt,
    TlsClientAuth,
    SelfSignedTlsClientAuth,
    None,
}

impl ClientAuth {
    /// The name IdPs use (`token_endpoint_auth_method`), as in discovery metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuth::ClientSecretPost => "client_secret_post",
            ClientAuth::ClientSecretBasic => "client_secret_basic",
            ClientAuth::ClientSecretJwt => "client_secret_jwt",
            ClientAuth::PrivateKeyJwt => "private_key_jwt",
            ClientAuth::TlsClientAuth => "tls_client_auth",
            ClientAuth::SelfSignedTlsClientAuth => "self_signed_tls_client_auth",
            ClientAuth::None => "none",
        }
    }

    /// Whether the client proves itself with a TLS client certificate.
    pub fn is_mtls(self) -> bool {
        matches!(self, ClientAuth::TlsClientAuth | ClientAuth::SelfSignedTlsClientAuth)
    }
}

impl From<GrantConfig> for Grant {
    fn from(g: GrantConfig) -> Self {
        match g {
            GrantConfig::ClientCredentials => Grant::ClientCredentials,
            GrantConfig::Password => Grant::Password,
            GrantConfig::JwtBearer => Grant::JwtBearer,
            GrantConfig::TokenExchange => Grant::TokenExchange,
        }
    }
}

impl From<EncodingConfig> for Encoding {
    fn from(e: EncodingConfig) -> Self {
        match e {
            EncodingConfig::Form => Encoding::Form,
            EncodingConfig::Json => Encoding::Json,
        }
    }
}

impl From<ClientAuthConfig> for ClientAuth {
    fn from(c: ClientAuthConfig) -> Self {
        match c {
            ClientAuthConfig::ClientSecretPost => ClientAuth::ClientSecretPost,
            ClientAuthConfig::ClientSecretBasic => ClientAuth::ClientSecretBasic,
            ClientAuthConfig::ClientSecretJwt => ClientAuth::ClientSecretJwt,
            ClientAuthConfig::PrivateKeyJwt => ClientAuth::PrivateKeyJwt,
            ClientAuthConfig::TlsClientAuth => ClientAuth::TlsClientAuth,
            ClientAuthConfig::SelfSignedTlsClientAuth => ClientAuth::SelfSignedTlsClientAuth,
            ClientAuthConfig::None => ClientAuth::None,
        }
    }
}

/// Where token requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `token_url`, as configured.
    Token(url::Url),
    /// `issuer`: the token endpoint comes from its discovery metadata.
    Issuer(url::Url),
}

/// Seed 002's one-time password sender.
#[derive(Debug, Clone, PartialEq)]
pub struct OtpSpec {
    pub url: url::Url,
    /// `email` or `phone`.
    pub field: String,
    pub value: String,
}

/// A key or certificate file, with a digest of what it held when the config was read, so
/// that a rotated file makes the spec differ and a reload builds a new source with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFile {
    pub path: PathBuf,
    pub digest: String,
}

/// `private_key_jwt`'s signing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningKeySpec {
    pub file: KeyFile,
    pub alg: Option<SigningAlg>,
    pub kid: Option<String>,
}

/// An RFC 8705 client certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertSpec {
    pub cert: KeyFile,
    pub key: KeyFile,
    /// base64url(SHA-256(the leaf certificate's DER)): what certificate-bound tokens
    /// carry as `cnf.x5t#S256` (RFC 8705 section 3.1).
    pub x5t: String,
    /// Also presented to the upstream of this provider's routes.
    pub upstream: bool,
}

/// RFC 8693 inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeSpec {
    pub subject_token_file: PathBuf,
    pub subject_token_type: String,
    pub actor_token_file: Option<PathBuf>,
    pub actor_token_type: String,
    pub requested_token_type: Option<String>,
}

/// The DPoP key. Compared by its thumbprint: that is what the IdP binds tokens to.
#[derive(Clone)]
pub struct DpopSpec {
    pub key: Arc<DpopKey>,
    /// Absent: the key was generated at start (one per process).
    pub key_file: Option<PathBuf>,
}

impl PartialEq for DpopSpec {
    fn eq(&self, other: &Self) -> bool {
        self.key.thumbprint() == other.key.thumbprint() && self.key_file == other.key_file
    }
}

impl std::fmt::Debug for DpopSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpopSpec").field("jkt", &self.key.thumbprint()).field("key_file", &self.key_file).finish()
    }
}

/// The JWT token type (RFC 8693 section 3), the default for subject and actor tokens.
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";

#[derive(Debug, Clone, PartialEq)]
pub struct OAuth2Spec {
    pub endpoint: Endpoint,
    pub grant: Grant,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub encoding: Encoding,
    pub client_auth: ClientAuth,
    pub scope: Option<String>,
    pub audience: Option<String>,
    pub resource: Vec<String>,
    pub extra_params: Vec<(String, String)>,
    pub extra_headers: Vec<(HeaderName, HeaderValue)>,
    pub use_refresh_token: bool,
    pub otp: Option<OtpSpec>,
    pub signing_key: Option<SigningKeySpec>,
    /// `private_key_jwt` with a ready-made assertion from this file.
    pub client_assertion_file: Option<PathBuf>,
    pub assertion_audience: Option<String>,
    /// `grant = "jwt_bearer"`.
    pub assertion_file: Option<PathBuf>,
    /// `grant = "token_exchange"`.
    pub exchange: Option<ExchangeSpec>,
    pub client_cert: Option<ClientCertSpec>,
    pub dpop: Option<DpopSpec>,
}

/// A human is needed when the password is a one-time password.
pub(super) fn needs_human(p: &ProviderConfig) -> bool {
    p.otp_url.is_some()
}

pub(super) fn validate(p: &ProviderConfig, cx: &mut Cx) -> Result<KindSpec, SpecError> {
    let o = validate::spec(p, cx)?;
    Ok(KindSpec { identity: identity(&o), source: SourceSpec::OAuth2(o), implied_headers: vec![] })
}

/// What decides which token this provider gets: the token endpoint (or the issuer), the
/// grant, the client, the user (or the OTP recipient), the scope, and, when set, the
/// audience, the resources, the extra parameters, the assertion or subject-token files,
/// the DPoP key's thumbprint and the client certificate's (a bound token is useless with
/// another key or certificate). Never a secret. The optional parts are appended
/// only when present, so that fingerprints of configs without them are those tollgate
/// stored before they were part of the identity.
pub fn identity(o: &OAuth2Spec) -> String {
    let grant = match o.grant {
        Grant::ClientCredentials => "ClientCredentials",
        Grant::Password => "Password",
        Grant::JwtBearer => "JwtBearer",
        Grant::TokenExchange => "TokenExchange",
    };
    let endpoint = match &o.endpoint {
        Endpoint::Token(u) => u.to_string(),
        Endpoint::Issuer(u) => format!("issuer={u}"),
    };
    let mut id = format!(
        "oauth2|{endpoint}|{grant}|{}|{}|{}",
        o.client_id.as_deref().unwrap_or(""),
        o.username.as_deref().or(o.otp.as_ref().map(|x| x.value.as_str())).unwrap_or(""),
        o.scope.as_deref().unwrap_or("")
    );
    if let Some(aud) = &o.audience {
        id.push_str(&format!("|audience={aud}"));
    }
    if !o.extra_params.is_empty() {
        let params: Vec<String> = o.extra_params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        id.push_str(&format!("|extra_params={}", params.join("&")));
    }
    if !o.resource.is_empty() {
        id.push_str(&format!("|resource={}", o.resource.join(" ")));
    }
    if let Some(f) = &o.assertion_file {
        id.push_str(&format!("|assertion_file={}", f.display()));
    }
    if let Some(x) = &o.exchange {
        id.push_str(&format!("|subject_token_file={}|{}", x.subject_token_file.display(), x.subject_token_type));
        if let Some(a) = &x.actor_token_file {
            id.push_str(&format!("|actor_token_file={}", a.display()));
        }
        if let Some(r) = &x.requested_token_type {
            id.push_str(&format!("|requested_token_type={r}"));
        }
    }
    if let Some(d) = &o.dpop {
        id.push_str(&format!("|dpop={}", d.key.thumbprint()));
    }
    // Tokens may be bound to the certificate (RFC 8705 section 3): a replica with another
    // certificate, or a rotated one, must not be served them.
    if let Some(c) = &o.client_cert {
        id.push_str(&format!("|x5t={}", c.x5t));
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ErrorClass;
    use base64::Engine;
    use serde_json::Value;

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

    use crate::provider::kinds::test_support::{fingerprint_of, with};
    use serde_json::json;

    fn client_credentials() -> Value {
        json!({
            "kind": "oauth2",
            "token_url": "http://127.0.0.1:1/token",
            "client_id": "abc123",
            "client_secret": "456789",
            "scope": "read write",
        })
    }

    fn password_grant() -> Value {
        json!({
            "kind": "oauth2",
            "token_url": "http://127.0.0.1:1/token",
            "grant": "password",
            "username": "alice",
            "password": "pw",
            "client_id": "abc123",
            "client_secret": "456789",
        })
    }

    /// Fingerprints computed by the code before identity moved into the kinds: tokens
    /// stored by that version must still load.
    #[test]
    fn fingerprints_unchanged_without_audience_or_extra_params() {
        assert_eq!(fingerprint_of(client_credentials()), "4c2d9acc40bdccd2");
        assert_eq!(fingerprint_of(with(&client_credentials(), "scope", Value::Null)), "52611bff19cd07f5");
        assert_eq!(fingerprint_of(password_grant()), "ef45f1cc299aa951");
        let otp = json!({
            "kind": "oauth2",
            "token_url": "http://127.0.0.1:1/token",
            "grant": "password",
            "username": "bob",
            "otp_url": "http://127.0.0.1:1/otp/send",
            "otp_email": "bob@example.com",
            "client_auth": "none",
            "client_id": "web",
        });
        assert_eq!(fingerprint_of(otp), "ac863d2566924330");
    }

    #[test]
    fn secret_change_keeps_the_fingerprint() {
        let base = fingerprint_of(client_credentials());
        assert_eq!(fingerprint_of(with(&client_credentials(), "client_secret", json!("rotated"))), base);
        let pw = fingerprint_of(password_grant());
        assert_eq!(fingerprint_of(with(&password_grant(), "password", json!("rotated"))), pw);
        assert_eq!(fingerprint_of(with(&password_grant(), "client_secret", json!("rotated"))), pw);
        // Settings that change how, not for whom, the token is requested.
        assert_eq!(fingerprint_of(with(&client_credentials(), "client_auth", json!("client_secret_basic"))), base);
        assert_eq!(fingerprint_of(with(&client_credentials(), "encoding", json!("json"))), base);
    }

    #[test]
    fn identity_change_alters_the_fingerprint() {
        let base = fingerprint_of(client_credentials());
        let changed = [
            with(&client_credentials(), "scope", json!("read")),
            with(&client_credentials(), "scope", Value::Null),
            with(&client_credentials(), "audience", json!("https://api.example")),
            with(&client_credentials(), "extra_params", json!({ "resource": "orders" })),
            with(&client_credentials(), "client_id", json!("other")),
            with(&client_credentials(), "token_url", json!("http://127.0.0.1:9/token")),
        ];
        for c in changed {
            assert_ne!(fingerprint_of(c.clone()), base, "{c}");
        }
        let pw = fingerprint_of(password_grant());
        assert_ne!(fingerprint_of(with(&password_grant(), "username", json!("mallory"))), pw);
        let audience = with(&client_credentials(), "audience", json!("a"));
        assert_ne!(fingerprint_of(with(&audience, "audience", json!("b"))), fingerprint_of(audience));
        let params = with(&client_credentials(), "extra_params", json!({ "resource": "orders" }));
        assert_ne!(
            fingerprint_of(with(&params, "extra_params", json!({ "resource": "invoices" }))),
            fingerprint_of(params)
        );
    }

    #[test]
    fn identity_holds_no_secret() {
        let spec =
            match crate::provider::kinds::validate(&crate::provider::kinds::test_support::table(password_grant())) {
                Ok(v) => match v.source {
                    SourceSpec::OAuth2(o) => o,
                    SourceSpec::Http(_) => panic!("oauth2 built a step flow"),
                },
                Err(e) => panic!("{e}"),
            };
        let id = identity(&spec);
        assert!(id.contains("alice") && !id.contains("456789") && !id.contains("|pw"), "{id}");
    }
}

#[cfg(test)]
mod modern_tests {
    use crate::provider::kinds::test_support::{fingerprint_of, table, with};
    use crate::provider::kinds::validate;
    use serde_json::{json, Value};

    fn base() -> Value {
        json!({"kind": "oauth2", "issuer": "https://idp.example.com", "client_id": "c1", "client_secret": "s"})
    }

    fn error(v: Value) -> (String, String) {
        match validate(&table(v)) {
            Ok(_) => panic!("accepted"),
            Err(e) => (e.key, e.reason),
        }
    }

    fn p256_pem() -> String {
        rcgen::KeyPair::generate().unwrap().serialize_pem()
    }

    #[test]
    fn a_bad_combination_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "eyJ.x.y").unwrap();
        let cases = [
            (with(&base(), "token_url", json!("https://idp.example.com/token")), "issuer"),
            (with(&base(), "issuer", json!("https://idp.example.com/?x=1")), "issuer"),
            (
                with(&with(&base(), "client_secret", Value::Null), "client_auth", json!("private_key_jwt")),
                "private_key_file",
            ),
            (
                with(&with(&base(), "client_secret", Value::Null), "client_auth", json!("tls_client_auth")),
                "client_cert_file",
            ),
            (with(&base(), "client_auth", json!("private_key_jwt")), "client_secret"),
            (with(&base(), "grant", json!("jwt_bearer")), "assertion_file"),
            (with(&base(), "subject_token_file", json!(token)), "subject_token_file"),
            (
                with(&with(&base(), "grant", json!("token_exchange")), "subject_token_file", json!("/nonexistent/t")),
                "subject_token_file",
            ),
            (with(&base(), "dpop_key_file", json!(token)), "dpop_key_file"),
            (with(&base(), "upstream_client_cert", json!(true)), "upstream_client_cert"),
            (with(&base(), "resource", json!(["https://api#frag"])), "resource.0"),
            (with(&base(), "signing_alg", json!("ES256")), "signing_alg"),
            (with(&base(), "client_auth", json!("client_secret_jwt")), "client_secret"),
        ];
        for (v, key) in cases {
            let (k, reason) = error(v.clone());
            assert_eq!(k, key, "{v}: {reason}");
        }
    }

    #[test]
    fn key_files_are_checked_with_their_path_and_type() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("key.pem");
        std::fs::write(&pem, p256_pem()).unwrap();
        let pkj = with(&with(&base(), "client_secret", Value::Null), "client_auth", json!("private_key_jwt"));
        // A P-256 key works (ES256), and with an RSA algorithm it does not.
        assert!(validate(&table(with(&pkj, "private_key_file", json!(pem)))).is_ok());
        let (k, reason) = error(with(&with(&pkj, "private_key_file", json!(pem)), "signing_alg", json!("RS256")));
        assert_eq!(k, "private_key_file");
        assert!(reason.contains("RS256"), "{reason}");
        // A missing file: the key and the path.
        let missing = dir.path().join("missing.pem");
        let (k, reason) = error(with(&pkj, "private_key_file", json!(missing)));
        assert_eq!(k, "private_key_file");
        assert!(reason.contains(&missing.display().to_string()), "{reason}");
        // Not a key at all.
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a key").unwrap();
        assert_eq!(error(with(&pkj, "private_key_file", json!(junk))).0, "private_key_file");
        // DPoP takes P-256 keys only; an Ed25519 key is refused.
        let ed = dir.path().join("ed.pem");
        std::fs::write(&ed, rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap().serialize_pem()).unwrap();
        let dpop = with(&base(), "dpop", json!(true));
        assert_eq!(error(with(&dpop, "dpop_key_file", json!(ed))).0, "dpop_key_file");
        assert!(validate(&table(with(&dpop, "dpop_key_file", json!(pem)))).is_ok());
    }

    #[test]
    fn what_the_token_is_for_and_bound_to_is_part_of_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.pem"), dir.path().join("b.pem"));
        std::fs::write(&a, p256_pem()).unwrap();
        std::fs::write(&b, p256_pem()).unwrap();
        let id = fingerprint_of(base());
        assert_ne!(fingerprint_of(with(&base(), "resource", json!("https://api.example.com"))), id);
        let token_url = with(&with(&base(), "issuer", Value::Null), "token_url", json!("https://idp.example.com"));
        assert_ne!(fingerprint_of(token_url), id);
        let dpop = with(&base(), "dpop", json!(true));
        let with_a = fingerprint_of(with(&dpop, "dpop_key_file", json!(a)));
        assert_ne!(with_a, id);
        assert_eq!(fingerprint_of(with(&dpop, "dpop_key_file", json!(a))), with_a, "stable across loads");
        assert_ne!(fingerprint_of(with(&dpop, "dpop_key_file", json!(b))), with_a, "another key: another identity");
        // A certificate-bound token belongs to its certificate.
        let cert = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec![name.into()]).unwrap().self_signed(&key).unwrap();
            let (c, k) = (dir.path().join(format!("{name}.crt")), dir.path().join(format!("{name}.key")));
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            (c, k, cert.der().to_vec())
        };
        let (c1, k1, der1) = cert("one");
        let (c2, k2, _) = cert("two");
        let with_cert = |c: &std::path::Path, k: &std::path::Path| {
            fingerprint_of(with(&with(&base(), "client_cert_file", json!(c)), "client_key_file", json!(k)))
        };
        assert_ne!(with_cert(&c1, &k1), id);
        assert_ne!(with_cert(&c1, &k1), with_cert(&c2, &k2));
        let spec =
            match validate(&table(with(&with(&base(), "client_cert_file", json!(c1)), "client_key_file", json!(k1))))
                .unwrap()
                .source
            {
                crate::provider::SourceSpec::OAuth2(o) => o,
                crate::provider::SourceSpec::Http(_) => unreachable!(),
            };
        {
            use base64::Engine;
            use sha2::Digest;
            let x5t = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(&der1));
            assert_eq!(spec.client_cert.map(|c| c.x5t), Some(x5t), "RFC 8705 x5t#S256 of the leaf's DER");
        }
        // How the client authenticates is not who it is.
        let long = with(&base(), "client_secret", json!("0123456789abcdef0123456789abcdef"));
        assert_eq!(fingerprint_of(with(&long, "client_auth", json!("client_secret_jwt"))), fingerprint_of(long));
    }
}
