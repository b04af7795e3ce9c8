//! The config file's schema, exactly as users write it: the module `crate::schema`.
//! Everything here is plain data with serde derives and `deny_unknown_fields`; meaning
//! is given to it by `config::validate` (proxy, admin, store, routes, a provider's timing)
//! and by [`crate::provider::kinds`] (each provider kind's keys), which turn it into the
//! settings the runtime uses.
//!
//! A leaf, importing neither config nor provider, so that both can read it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::secret::SecretSource;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub store: StoreConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    Memory,
    File,
    /// Shared by a fleet of replicas.
    Redis,
}

/// Where tokens outlive the process.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Default: `file` when any provider needs a human login, else `memory`.
    pub kind: Option<StoreKind>,
    /// Default: `/var/lib/tollgate/tokens.json`.
    pub path: Option<PathBuf>,

    // --- kind = "redis" ---
    /// `redis://host:port/db` or `rediss://…` (TLS). Without sentinels, the server.
    pub url: Option<String>,
    pub username: Option<String>,
    pub password: Option<SecretSource>,
    /// Default `tollgate:`; every key tollgate writes starts with it.
    pub key_prefix: Option<String>,
    /// AEAD keys (32 bytes, base64): the first seals entries, all of them open entries.
    #[serde(default)]
    pub encryption_keys: Vec<SecretSource>,
    /// How long a refresh lease lives unless renewed (default 10 s).
    #[serde(default, with = "humantime_serde")]
    pub lease_ttl: Option<Duration>,
    /// Bound on every Redis operation (default 1 s).
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Find the primary through Redis Sentinel.
    pub sentinel: Option<SentinelConfig>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SentinelConfig {
    /// The monitored master's name (`sentinel monitor <name> …`).
    pub master: String,
    /// `redis://host:port` of each sentinel.
    pub nodes: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    #[serde(default = "default_proxy_listen")]
    pub listen: String,
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// How long a request may wait for a token before it is answered 503.
    #[serde(default = "default_token_wait", with = "humantime_serde")]
    pub token_wait: Duration,
    /// Upper bound on draining in-flight requests after SIGTERM.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    #[serde(default)]
    pub access_log: bool,
    /// Upstream connect timeout.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub upstream_connect_timeout: Duration,
    /// Upstream read timeout (per read, not the whole response).
    #[serde(default = "default_read_timeout", with = "humantime_serde")]
    pub upstream_read_timeout: Duration,
    /// Idle upstream connections kept for reuse. pingora's default (128) makes a proxy
    /// with more client connections than that close and reopen upstream connections
    /// continuously (measured in bench/results).
    #[serde(default = "default_keepalive_pool")]
    pub upstream_keepalive_pool_size: usize,
    /// Client addresses (CIDRs, or single addresses) allowed to use the proxy. Empty:
    /// anyone who can reach `listen`.
    #[serde(default)]
    pub allow_from: Vec<String>,
    /// Upstream host names are re-resolved when their DNS answer's TTL runs out, but no
    /// sooner than this after the previous resolution (also the retry interval after a
    /// failed one).
    #[serde(default = "default_dns_refresh_min", with = "humantime_serde")]
    pub upstream_dns_refresh_min: Duration,
    /// … and no later than this, whatever the TTL.
    #[serde(default = "default_dns_refresh_max", with = "humantime_serde")]
    pub upstream_dns_refresh_max: Duration,
    /// How long an idle upstream connection is kept for reuse. Below the idle timeouts of
    /// common load balancers and servers (60 s and more), so tollgate drops a connection
    /// before the far end forgets it and a request is never sent into a dead one.
    #[serde(default = "default_upstream_idle_timeout", with = "humantime_serde")]
    pub upstream_idle_timeout: Duration,
    /// Serve plain HTTP/1 requests on tollgate's own strict fast path, handing everything
    /// else to pingora: the same features at a fraction of stock pingora-proxy's cost per
    /// request. `false` sends every connection to pingora (a way out, should the fast
    /// path ever misbehave with some client).
    #[serde(default = "default_fast_path")]
    pub fast_path: bool,
}

fn default_dns_refresh_min() -> Duration {
    Duration::from_secs(5)
}

fn default_dns_refresh_max() -> Duration {
    Duration::from_secs(300)
}

fn default_fast_path() -> bool {
    true
}

fn default_upstream_idle_timeout() -> Duration {
    Duration::from_secs(50)
}

fn default_keepalive_pool() -> usize {
    1024
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: default_proxy_listen(),
            threads: default_threads(),
            token_wait: default_token_wait(),
            shutdown_timeout: default_shutdown_timeout(),
            access_log: false,
            upstream_connect_timeout: default_connect_timeout(),
            upstream_read_timeout: default_read_timeout(),
            upstream_keepalive_pool_size: default_keepalive_pool(),
            allow_from: Vec::new(),
            upstream_dns_refresh_min: default_dns_refresh_min(),
            upstream_dns_refresh_max: default_dns_refresh_max(),
            upstream_idle_timeout: default_upstream_idle_timeout(),
            fast_path: default_fast_path(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// Bearer token required on every admin path except `/healthz` and `/readyz`.
    #[serde(default)]
    pub token: Option<SecretSource>,
    /// What `/readyz` demands: `startup` (default: every provider held a token once since
    /// start) or `always` (every provider holds a usable token now).
    #[serde(default)]
    pub ready_requires: ReadyRequiresConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadyRequiresConfig {
    #[default]
    Startup,
    Always,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: default_admin_listen(), token: None, ready_requires: ReadyRequiresConfig::default() }
    }
}

/// `kind` as written. The runtime uses [`crate::provider::ProviderKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKindConfig {
    Oauth2,
    /// The declarative step engine, for vendors without a preset.
    Http,
    Tnid,
    Etna,
    ThrillId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepEncodingConfig {
    #[default]
    Json,
    Form,
    None,
}

/// One HTTP request of a `kind = "http"` flow.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    pub name: Option<String>,
    /// Default POST.
    pub method: Option<String>,
    /// Appended to `base_url`; may use `{placeholders}`.
    pub path: String,
    #[serde(default)]
    pub encoding: StepEncodingConfig,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// Variable name → JSON pointer into the response (`token`, `expires_in` and
    /// `refresh_token` have meaning to tollgate; other names feed later steps).
    #[serde(default)]
    pub extract: BTreeMap<String, String>,
}

/// `grant` as written (`kind = "oauth2"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantConfig {
    ClientCredentials,
    Password,
    /// RFC 7523 section 2.1: a JWT from `assertion_file` (a projected service-account
    /// token, say) is the grant.
    JwtBearer,
    /// RFC 8693: a token from `subject_token_file` is exchanged for one for this API.
    TokenExchange,
}

/// `encoding` as written (`kind = "oauth2"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EncodingConfig {
    #[default]
    Form,
    Json,
}

/// `client_auth` as written (`kind = "oauth2"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthConfig {
    #[default]
    ClientSecretPost,
    ClientSecretBasic,
    /// RFC 7523 / OIDC Core 9: an HS256 assertion keyed with the client secret.
    ClientSecretJwt,
    /// RFC 7523 / OIDC Core 9: an assertion signed with `private_key_file`.
    PrivateKeyJwt,
    /// RFC 8705 section 2.1: a CA-issued client certificate (`client_cert_file`).
    TlsClientAuth,
    /// RFC 8705 section 2.2: a self-signed client certificate registered with the IdP.
    SelfSignedTlsClientAuth,
    None,
}

/// One value or a list (`resource = "https://api"` or `resource = ["https://a", "https://b"]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// One identity provider. A flat table with a `kind`, validated per kind (by
/// [`crate::provider::kinds`], whose modules also say which keys each kind accepts),
/// rather than a serde-tagged enum: tagged enums and `flatten` defeat
/// `deny_unknown_fields`, and flat keys map one-to-one onto
/// `TOLLGATE_PROVIDERS__<NAME>__<KEY>` env overrides.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub kind: ProviderKindConfig,
    pub token_url: Option<String>,
    /// The IdP's issuer URL, instead of `token_url`: the token endpoint (and what the IdP
    /// supports) is read from its RFC 8414 / OpenID Connect discovery metadata.
    pub issuer: Option<String>,
    pub grant: Option<GrantConfig>,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretSource>,
    pub username: Option<String>,
    pub password: Option<SecretSource>,
    /// Default `form`.
    pub encoding: Option<EncodingConfig>,
    /// Default `client_secret_post`.
    pub client_auth: Option<ClientAuthConfig>,
    pub scope: Option<String>,
    pub audience: Option<String>,
    #[serde(default)]
    pub extra_params: BTreeMap<String, String>,
    #[serde(default)]
    pub extra_headers: BTreeMap<String, String>,
    /// Use the refresh_token grant when the IdP issued a refresh token (default true).
    pub use_refresh_token: Option<bool>,
    /// RFC 8707 resource indicators, sent on every token request of any grant.
    pub resource: Option<OneOrMany>,
    /// `private_key_jwt`: the signing key, PEM (PKCS#8, SEC1, PKCS#1) or JWK. Re-read when
    /// the file changes.
    pub private_key_file: Option<PathBuf>,
    /// `private_key_jwt` with an assertion someone else signed, read again before every
    /// token request (Entra ID workload identity: the projected service-account token is
    /// the client assertion). Instead of `private_key_file`.
    pub client_assertion_file: Option<PathBuf>,
    /// The `kid` of client assertions (default: the JWK's own `kid`, if any).
    pub key_id: Option<String>,
    /// RS256, PS256, ES256 or EdDSA (default: from the key: RSA → RS256, P-256 → ES256,
    /// Ed25519 → EdDSA).
    pub signing_alg: Option<String>,
    /// The `aud` of client assertions (default: the token endpoint's URL).
    pub assertion_audience: Option<String>,
    /// `grant = "jwt_bearer"`: the assertion, read again before every token request.
    pub assertion_file: Option<PathBuf>,
    /// `grant = "token_exchange"`: the subject token, read again before every token request.
    pub subject_token_file: Option<PathBuf>,
    /// Default `urn:ietf:params:oauth:token-type:jwt`.
    pub subject_token_type: Option<String>,
    /// `grant = "token_exchange"`: an optional actor token (delegation).
    pub actor_token_file: Option<PathBuf>,
    /// Default `urn:ietf:params:oauth:token-type:jwt` (when `actor_token_file` is set).
    pub actor_token_type: Option<String>,
    /// `grant = "token_exchange"`: the token type asked for (e.g.
    /// `urn:ietf:params:oauth:token-type:access_token`).
    pub requested_token_type: Option<String>,
    /// RFC 8705: a client certificate (PEM) presented to the token endpoint; re-read when
    /// the file changes.
    pub client_cert_file: Option<PathBuf>,
    /// The certificate's private key (PEM).
    pub client_key_file: Option<PathBuf>,
    /// Present the client certificate to the upstream of this provider's routes as well,
    /// so that certificate-bound tokens (RFC 8705 section 3) are accepted.
    pub upstream_client_cert: Option<bool>,
    /// RFC 9449: sender-constrained tokens. Token requests carry a DPoP proof, and a
    /// `token_type` of `DPoP` makes every proxied request carry a fresh one.
    pub dpop: Option<bool>,
    /// The DPoP key (EC P-256; PEM or JWK). Absent: a key generated at start.
    pub dpop_key_file: Option<PathBuf>,

    /// Refresh at the latest this long before expiry (the schedule also refreshes at
    /// 80 % of the lifetime, whichever comes first).
    #[serde(default, with = "humantime_serde")]
    pub refresh_before: Option<Duration>,
    /// Lifetime assumed when the IdP gives neither `expires_in` nor a JWT `exp`.
    #[serde(default, with = "humantime_serde")]
    pub lifetime: Option<Duration>,
    /// Cap on any lifetime the IdP claims (an absurd `expires_in` is not trusted).
    #[serde(default, with = "humantime_serde")]
    pub max_lifetime: Option<Duration>,
    /// A token is not injected during its last `expiry_margin` (it could expire in flight).
    #[serde(default, with = "humantime_serde")]
    pub expiry_margin: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub backoff_min: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub backoff_max: Option<Duration>,
    /// At most one invalidation (after an upstream 401) per this interval, so an upstream
    /// that rejects every token cannot drive tollgate to hammer the IdP.
    #[serde(default, with = "humantime_serde")]
    pub reauth_min_interval: Option<Duration>,
    /// PEM file with extra CA certificates trusted for the token endpoint (in addition to
    /// the system store and the bundled Mozilla roots).
    pub ca_file: Option<PathBuf>,
    /// The HTTP proxy for token requests: `http://host:port` (or `https://`), or `"none"`
    /// for direct connections. Absent: `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY` and
    /// `NO_PROXY` from the environment.
    pub proxy: Option<String>,

    /// Headers added to proxied requests, rendered from config values and what the
    /// token response held (e.g. `{ "X-Org-Id" = "{org_id}" }`, `{ "Et-App-Key" = "{app_key}" }`).
    #[serde(default)]
    pub upstream_headers: BTreeMap<String, String>,

    // --- seed 002 OTP (kind = "oauth2", grant = "password") ---
    /// `POST` here with `otp_email` or `otp_phone` sends a one-time password, used as the
    /// password grant's `password`.
    pub otp_url: Option<String>,
    pub otp_email: Option<String>,
    pub otp_phone: Option<String>,

    // --- kind = "http", "tnid", "etna", "thrill_id" ---
    pub base_url: Option<String>,
    /// Non-secret values for `{placeholders}`.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Secret values for `{placeholders}`.
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretSource>,
    #[serde(default)]
    pub acquire: Vec<StepConfig>,
    #[serde(default)]
    pub refresh: Vec<StepConfig>,
    #[serde(default)]
    pub login: Vec<StepConfig>,
    /// Extracted values the admin API may show.
    #[serde(default)]
    pub show: Vec<String>,
    // TNID
    pub telephone_number: Option<String>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub email: Option<String>,
    // Etna
    pub app_key: Option<SecretSource>,
    pub two_factor: Option<bool>,
}

/// A route's `authorization` as written. The runtime uses
/// [`crate::config::AuthorizationPolicy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthorizationConfig {
    /// Replace whatever the client sent (default; the client never holds credentials).
    #[default]
    Overwrite,
    /// Keep the client's own header when it sent one; inject otherwise.
    Keep,
    /// Answer 400 when the client sends the header itself.
    Reject,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: Option<String>,
    /// Match on the request's Host (port ignored, case-insensitive). Absent: any host.
    pub host: Option<String>,
    #[serde(default = "default_path_prefix")]
    pub path_prefix: String,
    /// Remove `path_prefix` from the path before forwarding.
    #[serde(default)]
    pub strip_prefix: bool,
    pub upstream: String,
    pub provider: Option<String>,
    #[serde(default = "default_header_name")]
    pub header_name: String,
    #[serde(default = "default_header_prefix")]
    pub header_prefix: String,
    #[serde(default)]
    pub authorization: AuthorizationConfig,
    /// Forward the client's Host header instead of the upstream's authority.
    #[serde(default)]
    pub preserve_host: bool,
    /// Static headers added to every request on this route.
    #[serde(default)]
    pub set_headers: BTreeMap<String, String>,
    /// PEM file with extra CA certificates trusted for this upstream.
    pub ca_file: Option<PathBuf>,
    /// TLS server name, when it differs from the upstream URL's host.
    pub sni: Option<String>,
    /// Turn off certificate verification (for test rigs only; logged loudly).
    #[serde(default = "yes")]
    pub tls_verify: bool,
    /// Upstream statuses that mean "token rejected": the token is invalidated and the
    /// request replayed once with a new one. Empty: never.
    #[serde(default = "default_retry_on_status")]
    pub retry_on_status: Vec<u16>,
    /// Treat a GraphQL response whose `errors[].extensions.code` is `UNAUTHENTICATED` as
    /// a token rejection (the token is invalidated; the response itself is passed on).
    #[serde(default)]
    pub graphql_unauthenticated: bool,
    /// For a token only a human can renew: a path (GET through this route) tollgate asks
    /// after a bare 401, to tell a dead token from a path the account may not use.
    pub session_probe: Option<String>,
}

fn default_retry_on_status() -> Vec<u16> {
    vec![401]
}

fn yes() -> bool {
    true
}
fn default_proxy_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_admin_listen() -> String {
    "127.0.0.1:9090".into()
}
fn default_threads() -> usize {
    1
}
fn default_token_wait() -> Duration {
    Duration::from_secs(5)
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_read_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_path_prefix() -> String {
    "/".into()
}
fn default_header_name() -> String {
    "Authorization".into()
}
fn default_header_prefix() -> String {
    "Bearer ".into()
}
