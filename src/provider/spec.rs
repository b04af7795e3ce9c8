//! A validated provider: what the runtime (gateway, refresher, admin API) consumes. Built
//! only by config validation through [`super::kinds`], so every value here has been
//! checked and every secret resolved. `PartialEq` lets a reload tell which providers
//! really changed (secrets included).

use std::path::PathBuf;
use std::time::Duration;

use http::HeaderName;

use super::kinds::oauth2::OAuth2Spec;
use super::steps::HttpFlowSpec;
use crate::template::Template;

/// A provider's kind, as the runtime sees it (`tollgate check`, the admin API, identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProviderKind {
    Oauth2,
    /// The declarative step engine, for vendors without a preset.
    Http,
    Tnid,
    Etna,
    ThrillId,
}

impl ProviderKind {
    /// The name as written in the config's `kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Oauth2 => "oauth2",
            ProviderKind::Http => "http",
            ProviderKind::Tnid => "tnid",
            ProviderKind::Etna => "etna",
            ProviderKind::ThrillId => "thrill_id",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProviderSpec {
    pub name: String,
    /// What the config said (`oauth2`, `tnid`, …), for `check` and the admin API.
    pub kind: ProviderKind,
    pub source: SourceSpec,
    pub timing: Timing,
    pub http: HttpClientSpec,
    /// Added to proxied requests; rendered once per token.
    pub upstream_headers: Vec<(HeaderName, Template)>,
    /// The provider's identity, hashed: what decides which token it gets (kind, IdP URL,
    /// client id, user, grant, scope, audience, extra parameters; each kind's
    /// `identity` says which of these it has). A token stored for another identity is
    /// never loaded. Derived from no secret, so a rotated secret keeps the identity.
    pub fingerprint: String,
}

impl ProviderSpec {
    /// The client certificate this provider's routes present to their upstream, if it
    /// asks for that (`upstream_client_cert`), so that RFC 8705 certificate-bound tokens
    /// are accepted there.
    pub fn upstream_client_cert(&self) -> Option<&super::kinds::oauth2::ClientCertSpec> {
        match &self.source {
            SourceSpec::OAuth2(o) => o.client_cert.as_ref().filter(|c| c.upstream),
            SourceSpec::Http(_) => None,
        }
    }
}

/// FNV-1a: a stable, dependency-free hash for fingerprints (not for security). Stored
/// tokens are keyed by it, so it must never change.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// The 16-hex-digit fingerprint of an identity text.
pub fn fingerprint(identity: &str) -> String {
    format!("{:016x}", fnv1a(identity.as_bytes()))
}

// Built once per config load and never moved on a hot path; boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum SourceSpec {
    OAuth2(OAuth2Spec),
    /// The step engine (`kind = "http"` and the presets).
    Http(HttpFlowSpec),
}

/// When to refresh and how to back off. Defaults are chosen for IdPs issuing tokens of
/// minutes to hours; tests shrink them to seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    pub refresh_before: Duration,
    pub default_lifetime: Option<Duration>,
    pub max_lifetime: Duration,
    pub expiry_margin: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub reauth_min_interval: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            refresh_before: Duration::from_secs(60),
            default_lifetime: None,
            max_lifetime: Duration::from_secs(24 * 3600),
            expiry_margin: Duration::from_secs(5),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            reauth_min_interval: Duration::from_secs(5),
        }
    }
}

/// The token endpoint's HTTP client.
#[derive(Debug, Clone, PartialEq)]
pub struct HttpClientSpec {
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub ca_file: Option<PathBuf>,
    pub proxy: EgressProxy,
}

/// Which HTTP proxy token requests go through.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum EgressProxy {
    /// `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` (or their lower-case
    /// forms), read when the client is built: at start and on reload.
    #[default]
    Environment,
    /// Direct connections, whatever the environment says (`proxy = "none"`).
    Direct,
    /// Every token request of the provider through this proxy (`http://host:port`;
    /// `NO_PROXY` does not apply). Never carries credentials (config refuses them).
    Url(String),
}
