//! How the client proves itself on each token request: the secret in the body or in
//! HTTP Basic, a fresh RFC 7523 assertion (HS256 with the secret, or signed with the
//! private key), or nothing in the request at all (RFC 8705: the TLS client certificate,
//! which the HTTP client presents).

use std::time::Duration;

use reqwest::header::HeaderValue;
use zeroize::Zeroizing;

use super::{ClientAuth, OAuth2Spec};
use crate::jose::assertion;
use crate::jose::keys::SigningKey;
use crate::provider::error::{ErrorClass, FetchError};

/// Assertions are for one request; a minute covers any clock skew an IdP tolerates
/// without leaving a replayable credential around for long.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(60);

/// The client's credential, prepared when the source is built.
pub(super) enum Authenticator {
    /// The secret goes into the body (`client_secret_post`), or only the id (`none`, mTLS).
    Body,
    /// `Basic …`, precomputed.
    Basic(HeaderValue),
    SecretJwt,
    /// The key, parsed once per source (a rotated key file builds a new source).
    PrivateKeyJwt(SigningKey),
    /// A ready-made assertion, read from `client_assertion_file` for every request.
    AssertionFile,
}

impl Authenticator {
    pub fn new(spec: &OAuth2Spec) -> Result<Self, FetchError> {
        Ok(match spec.client_auth {
            ClientAuth::ClientSecretBasic => match (&spec.client_id, &spec.client_secret) {
                (Some(id), Some(secret)) => Authenticator::Basic(super::basic_auth(id, secret)?),
                _ => Authenticator::Body,
            },
            ClientAuth::ClientSecretJwt => Authenticator::SecretJwt,
            ClientAuth::PrivateKeyJwt if spec.client_assertion_file.is_some() => Authenticator::AssertionFile,
            ClientAuth::PrivateKeyJwt => {
                let Some(k) = &spec.signing_key else {
                    return Err(FetchError::new(ErrorClass::CredentialFile, "private_key_jwt without a key"));
                };
                let key = SigningKey::load(&k.file.path, k.alg, k.kid.as_deref())
                    .map_err(|e| FetchError::new(ErrorClass::CredentialFile, format!("private_key_file: {e}")))?;
                Authenticator::PrivateKeyJwt(key)
            }
            ClientAuth::ClientSecretPost
            | ClientAuth::TlsClientAuth
            | ClientAuth::SelfSignedTlsClientAuth
            | ClientAuth::None => Authenticator::Body,
        })
    }

    /// The `Authorization` header, for `client_secret_basic`.
    pub fn header(&self) -> Option<&HeaderValue> {
        match self {
            Authenticator::Basic(h) => Some(h),
            _ => None,
        }
    }

    /// The body parameters that authenticate the client. `audience` is the assertion's
    /// `aud`: the token endpoint, unless `assertion_audience` says otherwise.
    /// `file_assertion` is `client_assertion_file`'s content, read for this request.
    pub fn params(
        &self,
        spec: &OAuth2Spec,
        audience: &str,
        file_assertion: Option<&Zeroizing<String>>,
    ) -> Result<Vec<(&'static str, Zeroizing<String>)>, FetchError> {
        let mut p = Vec::with_capacity(3);
        let id = spec.client_id.as_deref();
        let aud = spec.assertion_audience.as_deref().unwrap_or(audience);
        match (self, spec.client_auth) {
            (Authenticator::Basic(_), _) => {}
            (Authenticator::SecretJwt, _) => {
                let (Some(id), Some(secret)) = (id, &spec.client_secret) else {
                    return Err(FetchError::new(
                        ErrorClass::InvalidClient,
                        "client_secret_jwt needs client_id and secret",
                    ));
                };
                let jwt = assertion::client_secret_jwt(secret.expose().as_bytes(), id, aud, ASSERTION_LIFETIME)
                    .map_err(|e| FetchError::new(ErrorClass::CredentialFile, format!("client assertion: {e}")))?;
                p.push(("client_id", Zeroizing::new(id.to_string())));
                p.push(("client_assertion_type", Zeroizing::new(assertion::ASSERTION_TYPE.to_string())));
                p.push(("client_assertion", Zeroizing::new(jwt)));
            }
            (Authenticator::PrivateKeyJwt(key), _) => {
                let Some(id) = id else {
                    return Err(FetchError::new(ErrorClass::InvalidClient, "private_key_jwt needs client_id"));
                };
                let jwt = assertion::private_key_jwt(key, id, aud, ASSERTION_LIFETIME)
                    .map_err(|e| FetchError::new(ErrorClass::CredentialFile, format!("client assertion: {e}")))?;
                p.push(("client_id", Zeroizing::new(id.to_string())));
                p.push(("client_assertion_type", Zeroizing::new(assertion::ASSERTION_TYPE.to_string())));
                p.push(("client_assertion", Zeroizing::new(jwt)));
            }
            (Authenticator::AssertionFile, _) => {
                let Some(jwt) = file_assertion else {
                    return Err(FetchError::new(ErrorClass::CredentialFile, "client_assertion_file was not read"));
                };
                if let Some(id) = id {
                    p.push(("client_id", Zeroizing::new(id.to_string())));
                }
                p.push(("client_assertion_type", Zeroizing::new(assertion::ASSERTION_TYPE.to_string())));
                p.push(("client_assertion", jwt.clone()));
            }
            (Authenticator::Body, ClientAuth::ClientSecretPost) => {
                if let Some(id) = id {
                    p.push(("client_id", Zeroizing::new(id.to_string())));
                }
                if let Some(secret) = &spec.client_secret {
                    p.push(("client_secret", Zeroizing::new(secret.expose().to_string())));
                }
            }
            // `none` and the certificate methods: the id in the body (RFC 8705 section 2
            // requires it), the proof is elsewhere or absent.
            (Authenticator::Body, _) => {
                if let Some(id) = id {
                    p.push(("client_id", Zeroizing::new(id.to_string())));
                }
            }
        }
        Ok(p)
    }
}
