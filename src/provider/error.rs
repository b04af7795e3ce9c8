//! Token-fetch failures, classified so that operators see *why* (a metric label and a log
//! field each) and the refresher knows whether retrying can help.

use std::fmt;
use std::time::Duration;

/// The class of a failed token request. Its `as_str` is the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// RFC 6749 `invalid_client`: wrong client id/secret or auth method.
    InvalidClient,
    /// RFC 6749 `invalid_grant`: wrong password, expired or revoked refresh token, bad code.
    InvalidGrant,
    /// Any other 4xx or RFC 6749 error code: the IdP refuses the request as configured.
    Rejected,
    /// 429: the IdP asks us to slow down.
    RateLimited,
    /// 5xx from the IdP.
    ServerError,
    /// No complete answer within the configured timeout.
    Timeout,
    /// Could not connect (refused, DNS, TLS).
    Connect,
    /// A 2xx whose body is not a usable token response.
    Malformed,
    /// The IdP's discovery metadata could not be read, or it does not support what the
    /// provider is configured for (a client authentication method, say).
    Discovery,
    /// A local credential file (a signing key, a client certificate, an assertion or a
    /// subject token) could not be read or used. Nothing was sent.
    CredentialFile,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 10] = [
        ErrorClass::InvalidClient,
        ErrorClass::InvalidGrant,
        ErrorClass::Rejected,
        ErrorClass::RateLimited,
        ErrorClass::ServerError,
        ErrorClass::Timeout,
        ErrorClass::Connect,
        ErrorClass::Malformed,
        ErrorClass::Discovery,
        ErrorClass::CredentialFile,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::InvalidClient => "invalid_client",
            ErrorClass::InvalidGrant => "invalid_grant",
            ErrorClass::Rejected => "rejected",
            ErrorClass::RateLimited => "rate_limited",
            ErrorClass::ServerError => "server_error",
            ErrorClass::Timeout => "timeout",
            ErrorClass::Connect => "connect",
            ErrorClass::Malformed => "malformed",
            ErrorClass::Discovery => "discovery",
            ErrorClass::CredentialFile => "credential_file",
        }
    }

    /// Credential or configuration problems: retrying the same request will not help,
    /// though the refresher still retries (slowly) in case an operator fixes it.
    pub fn is_credential(self) -> bool {
        matches!(
            self,
            ErrorClass::InvalidClient | ErrorClass::InvalidGrant | ErrorClass::Rejected | ErrorClass::CredentialFile
        )
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed token request. Carries the HTTP status and the RFC 6749 `error` code when
/// there is one, never the response body (IdPs echo credentials in error bodies).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{class}: {detail}")]
pub struct FetchError {
    pub class: ErrorClass,
    pub status: Option<u16>,
    /// The RFC 6749 `error` code, sanitised to `[a-z0-9_]`.
    pub oauth_error: Option<String>,
    /// From a 429's or 503's `Retry-After`.
    pub retry_after: Option<Duration>,
    /// A human-readable summary free of secrets and body content.
    pub detail: String,
}

impl FetchError {
    pub fn new(class: ErrorClass, detail: impl Into<String>) -> Self {
        FetchError { class, status: None, oauth_error: None, retry_after: None, detail: detail.into() }
    }
}

/// Keep only what an RFC 6749 error code may contain, bounded, so that an IdP cannot
/// smuggle arbitrary text (or our own secrets, echoed back) into our logs.
pub fn sanitize_code(code: &str) -> String {
    code.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '.').take(64).collect()
}
