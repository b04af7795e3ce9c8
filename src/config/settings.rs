//! Validated settings: what the runtime consumes. Built only by [`super::validate`], so
//! every value here has been checked, every secret resolved and every address parsed.
//! `PartialEq` lets a reload tell which providers really changed (secrets included).
//! A provider's validated form is the provider module's [`ProviderSpec`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use crate::provider::ProviderSpec;
use crate::secret::Secret;

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
    Redis(RedisSettings),
}

/// A Redis store shared by a fleet of replicas.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisSettings {
    /// `redis://` or `rediss://` with host, port and database (no credentials).
    pub url: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub key_prefix: String,
    pub sentinel: Option<SentinelSettings>,
    /// 32-byte AEAD keys; the first seals, all open.
    pub encryption_keys: Vec<Secret>,
    pub lease_ttl: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SentinelSettings {
    pub master_name: String,
    pub nodes: Vec<String>,
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
    /// Client networks allowed to use the proxy; empty: every client.
    pub allow_from: Vec<ipnet::IpNet>,
    /// Floor and ceiling on the interval between resolutions of an upstream host.
    pub upstream_dns_refresh_min: Duration,
    pub upstream_dns_refresh_max: Duration,
    pub upstream_idle_timeout: Duration,
    /// Plain HTTP/1 requests take `fastpath` instead of pingora-proxy (read per connection).
    pub fast_path: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    pub token: Option<Secret>,
    pub ready_requires: ReadyRequires,
}

/// What `/readyz` demands before it answers 200.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyRequires {
    /// Every provider has held a usable token once since start; after that the process
    /// stays ready (an IdP outage or an awaited login does not take every replica out of
    /// the Service at once, including the routes that need no token).
    Startup,
    /// Every provider holds a usable token now.
    Always,
}

/// What a route does when the client sends the header tollgate would inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthorizationPolicy {
    /// Replace whatever the client sent (default; the client never holds credentials).
    #[default]
    Overwrite,
    /// Keep the client's own header when it sent one; inject otherwise.
    Keep,
    /// Answer 400 when the client sends the header itself.
    Reject,
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
    /// Path asked (GET, through the proxy) after a bare 401 on a human-renewable token.
    pub session_probe: Option<String>,
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
