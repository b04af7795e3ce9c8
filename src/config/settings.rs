//! Validated settings: what the runtime consumes. Built only by [`super::validate`], so
//! every value here has been checked, every secret resolved and every address parsed.
//! `PartialEq` lets a reload tell which providers really changed (secrets included).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use super::model::{AuthorizationPolicy, ClientAuth, Encoding, Grant};
use super::secret::Secret;
pub use crate::provider::steps::{HttpFlowSpec, StepEncoding, StepSpec};
use crate::provider::template::Template;

#[derive(Debug, Clone)]
pub struct Settings {
    pub proxy: ProxySettings,
    pub admin: AdminSettings,
    pub providers: Vec<ProviderSpec>,
    pub routes: Vec<RouteSpec>,
    /// The config file itself and every secret file, for the reload watcher.
    pub watched_files: Vec<PathBuf>,
    pub store: StoreSettings,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StoreSettings {
    Memory,
    File(PathBuf),
}

impl Settings {
    pub fn provider(&self, name: &str) -> Option<&ProviderSpec> {
        self.providers.iter().find(|p| p.name == name)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProxySettings {
    pub listen: SocketAddr,
    pub threads: usize,
    pub token_wait: Duration,
    pub shutdown_timeout: Duration,
    pub access_log: bool,
    pub upstream_connect_timeout: Duration,
    pub upstream_read_timeout: Duration,
    pub upstream_keepalive_pool_size: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    pub token: Option<Secret>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProviderSpec {
    pub name: String,
    /// What the config said (`oauth2`, `tnid`, …), for `check` and the admin API.
    pub kind: super::model::ProviderKind,
    pub source: SourceSpec,
    pub timing: Timing,
    pub http: HttpClientSpec,
    /// Added to proxied requests; rendered once per token.
    pub upstream_headers: Vec<(HeaderName, Template)>,
    /// Identifies the account a stored token belongs to (kind, endpoint, non-secret
    /// identity such as client id, username or phone number), so that a token stored for
    /// another account or IdP is never loaded. Derived from no secret.
    pub fingerprint: String,
}

/// FNV-1a: a stable, dependency-free hash for fingerprints (not for security).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

// Built once per config load and never moved on a hot path; boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum SourceSpec {
    OAuth2(OAuth2Spec),
    /// The step engine (`kind = "http"` and the presets).
    Http(HttpFlowSpec),
}

/// Seed 002's one-time password sender.
#[derive(Debug, Clone, PartialEq)]
pub struct OtpSpec {
    pub url: url::Url,
    /// `email` or `phone`.
    pub field: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OAuth2Spec {
    pub token_url: url::Url,
    pub grant: Grant,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub encoding: Encoding,
    pub client_auth: ClientAuth,
    pub scope: Option<String>,
    pub audience: Option<String>,
    pub extra_params: Vec<(String, String)>,
    pub extra_headers: Vec<(HeaderName, HeaderValue)>,
    pub use_refresh_token: bool,
    pub otp: Option<OtpSpec>,
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

#[derive(Debug, Clone, PartialEq)]
pub struct HttpClientSpec {
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec {
    pub name: String,
    pub host: Option<String>,
    pub path_prefix: String,
    pub strip_prefix: bool,
    pub upstream: UpstreamSpec,
    pub provider: Option<String>,
    pub header_name: HeaderName,
    pub header_prefix: String,
    pub authorization: AuthorizationPolicy,
    pub preserve_host: bool,
    pub set_headers: Vec<(HeaderName, HeaderValue)>,
    pub retry_on_status: Vec<u16>,
    pub graphql_unauthenticated: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamSpec {
    /// As written, for `tollgate check` and logs.
    pub url: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// `host[:port]` for the Host header when the client's is not preserved.
    pub authority: HeaderValue,
    pub sni: String,
    /// Path prepended to every forwarded path ("" when the URL has none).
    pub base_path: String,
    pub ca_file: Option<PathBuf>,
    pub tls_verify: bool,
}
