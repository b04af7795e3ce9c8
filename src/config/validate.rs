//! Turns the raw file schema into [`Settings`], or into an error that names the key,
//! where the value came from (file path or environment variable) and what was expected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use http::{HeaderName, HeaderValue};

use super::settings::*;
use super::ConfigError;
use crate::provider::kinds::{self, SpecError};
use crate::provider::{EgressProxy, HttpClientSpec, ProviderKind, ProviderSpec, Timing};
use crate::schema::{AuthorizationConfig, FileConfig, ProviderConfig, RouteConfig, StoreConfig, StoreKind};
use crate::secret::{Secret, SecretSource};

/// The statuses a route's `retry_on_status` may list: those that reject a credential.
const AUTH_STATUSES: [u16; 3] = [401, 403, 407];

/// Where the file store lives unless `store.path` says otherwise.
pub const DEFAULT_STORE_PATH: &str = "/var/lib/tollgate/tokens.json";

/// Extract and validate.
pub(super) fn validate(figment: &Figment, path: &Path) -> Result<Settings, ConfigError> {
    // Lossy: environment values arrive as strings (see `EnvStrings`) and may fill numeric
    // or boolean keys.
    let raw: FileConfig = figment.extract_lossy().map_err(|e| ConfigError::Parse(describe_figment(e)))?;
    let v = Validator { figment, path };
    v.settings(raw)
}

/// figment's own messages already name the key and the source; join all of them (it may
/// report several problems at once) into one readable paragraph.
fn describe_figment(e: figment::Error) -> String {
    e.into_iter()
        .map(|e| {
            let mut s = e.kind.to_string();
            if !e.path.is_empty() {
                s = format!("`{}`: {s}", e.path.join("."));
            }
            match &e.metadata {
                Some(md) => {
                    let origin = match &md.source {
                        Some(src) => format!("{src}"),
                        None => md.name.to_string(),
                    };
                    let origin = if md.name.contains("environment") {
                        format!("environment variable {}", super::env_var_for(&e.path.join(".")))
                    } else {
                        origin
                    };
                    format!("{s} (from {origin})")
                }
                None => s,
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A store encryption key: 32 bytes, base64 (standard alphabet, padding optional). The
/// reason never quotes the key.
fn check_aead_key(k: &Secret) -> Result<(), String> {
    use base64::Engine;
    let text = k.expose().trim();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
        .map_err(|_| "is not base64 (generate one with `openssl rand -base64 32`)".to_string())?;
    let n = bytes.len();
    let mut bytes = bytes;
    zeroize::Zeroize::zeroize(&mut bytes);
    if n != 32 {
        return Err(format!("decodes to {n} bytes; a key must be 32 bytes (`openssl rand -base64 32`)"));
    }
    Ok(())
}

struct Validator<'a> {
    figment: &'a Figment,
    path: &'a Path,
}

impl Validator<'_> {
    /// Where `key` was set: the env var that overrode it, else the file.
    fn origin(&self, key: &str) -> String {
        match self.figment.find_metadata(key) {
            Some(md) if md.name.contains("environment") => format!("environment variable {}", super::env_var_for(key)),
            Some(md) => match &md.source {
                Some(src) => format!("{src}"),
                None => self.path.display().to_string(),
            },
            None => self.path.display().to_string(),
        }
    }

    fn err(&self, key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        let key = key.into();
        ConfigError::Invalid { origin: self.origin(&key), key, reason: reason.into() }
    }

    fn settings(&self, raw: FileConfig) -> Result<Settings, ConfigError> {
        let mut watched = vec![self.path.to_path_buf()];

        let proxy = ProxySettings {
            listen: self.socket_addr("proxy.listen", &raw.proxy.listen)?,
            threads: match raw.proxy.threads {
                0 => return Err(self.err("proxy.threads", "must be at least 1")),
                n => n,
            },
            token_wait: raw.proxy.token_wait,
            shutdown_timeout: raw.proxy.shutdown_timeout,
            access_log: raw.proxy.access_log,
            upstream_connect_timeout: self
                .nonzero("proxy.upstream_connect_timeout", raw.proxy.upstream_connect_timeout)?,
            upstream_read_timeout: self.nonzero("proxy.upstream_read_timeout", raw.proxy.upstream_read_timeout)?,
            upstream_keepalive_pool_size: raw.proxy.upstream_keepalive_pool_size,
            allow_from: self.allow_from(&raw.proxy.allow_from)?,
            upstream_dns_refresh_min: self
                .nonzero("proxy.upstream_dns_refresh_min", raw.proxy.upstream_dns_refresh_min)?,
            upstream_dns_refresh_max: raw.proxy.upstream_dns_refresh_max,
            upstream_idle_timeout: self.nonzero("proxy.upstream_idle_timeout", raw.proxy.upstream_idle_timeout)?,
            fast_path: raw.proxy.fast_path,
        };
        if proxy.upstream_dns_refresh_max < proxy.upstream_dns_refresh_min {
            return Err(
                self.err("proxy.upstream_dns_refresh_max", "must not be smaller than `upstream_dns_refresh_min`")
            );
        }

        let admin_listen = self.socket_addr("admin.listen", &raw.admin.listen)?;
        let admin_token = match &raw.admin.token {
            Some(src) => Some(self.secret("admin.token", src, &mut watched)?),
            None => None,
        };
        if !admin_listen.ip().is_loopback() && admin_token.is_none() {
            return Err(self.err(
                "admin.listen",
                format!("{admin_listen} is not a loopback address; set `admin.token` to expose the admin API beyond this host"),
            ));
        }
        if admin_listen == proxy.listen {
            return Err(self.err("admin.listen", "must differ from `proxy.listen`"));
        }

        let mut providers = Vec::new();
        for (name, p) in &raw.providers {
            providers.push(self.provider(name, p, &mut watched)?);
        }

        let mut routes: Vec<RouteSpec> = Vec::new();
        for (i, r) in raw.routes.iter().enumerate() {
            let route = self.route(i, r, &raw)?;
            if routes.iter().any(|o| o.name == route.name) {
                return Err(self.err(format!("routes.{i}.name"), format!("duplicate route name `{}`", route.name)));
            }
            routes.push(route);
        }
        // A provider's header value is built once per token, so all its routes must agree
        // on the prefix.
        for (i, r) in routes.iter().enumerate() {
            if let Some(first) = routes.iter().find(|o| o.provider.is_some() && o.provider == r.provider) {
                if first.header_prefix != r.header_prefix {
                    return Err(self.err(
                        format!("routes.{i}.header_prefix"),
                        format!(
                            "routes using provider `{}` must share one header_prefix",
                            r.provider.as_deref().unwrap_or("")
                        ),
                    ));
                }
            }
        }
        if routes.is_empty() {
            return Err(self.err("routes", "at least one `[[routes]]` entry is required"));
        }

        let needs_human = raw.providers.values().any(kinds::needs_human);
        let store = self.store(&raw.store, needs_human, &mut watched)?;

        Ok(Settings {
            proxy,
            admin: AdminSettings {
                listen: admin_listen,
                token: admin_token,
                ready_requires: match raw.admin.ready_requires {
                    crate::schema::ReadyRequiresConfig::Startup => ReadyRequires::Startup,
                    crate::schema::ReadyRequiresConfig::Always => ReadyRequires::Always,
                },
            },
            providers,
            routes,
            watched_files: watched,
            store,
        })
    }

    fn store(
        &self,
        raw: &StoreConfig,
        needs_human: bool,
        watched: &mut Vec<PathBuf>,
    ) -> Result<StoreSettings, ConfigError> {
        let kind = raw.kind.unwrap_or(if needs_human { StoreKind::File } else { StoreKind::Memory });
        let redis_keys: [(&str, bool); 8] = [
            ("url", raw.url.is_some()),
            ("username", raw.username.is_some()),
            ("password", raw.password.is_some()),
            ("key_prefix", raw.key_prefix.is_some()),
            ("encryption_keys", !raw.encryption_keys.is_empty()),
            ("lease_ttl", raw.lease_ttl.is_some()),
            ("timeout", raw.timeout.is_some()),
            ("sentinel", raw.sentinel.is_some()),
        ];
        if kind != StoreKind::Redis {
            if let Some((k, _)) = redis_keys.iter().find(|(_, set)| *set) {
                return Err(self.err(format!("store.{k}"), "is only used with `store.kind = \"redis\"`"));
            }
        }
        if kind != StoreKind::File && raw.path.is_some() {
            return Err(self.err("store.path", "is only used with `store.kind = \"file\"`"));
        }
        Ok(match kind {
            StoreKind::Memory => StoreSettings::Memory,
            StoreKind::File => {
                StoreSettings::File(raw.path.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_STORE_PATH)))
            }
            StoreKind::Redis => StoreSettings::Redis(self.redis(raw, watched)?),
        })
    }

    fn redis(&self, raw: &StoreConfig, watched: &mut Vec<PathBuf>) -> Result<RedisSettings, ConfigError> {
        let redis_url = |key: &str, s: &str| -> Result<String, ConfigError> {
            // The value is not echoed: a URL may carry a password.
            let u = url::Url::parse(s).map_err(|e| self.err(key, format!("not a valid URL: {e}")))?;
            if u.scheme() != "redis" && u.scheme() != "rediss" {
                return Err(self.err(key, format!("scheme `{}` is not supported; use redis or rediss", u.scheme())));
            }
            if !u.username().is_empty() || u.password().is_some() {
                return Err(
                    self.err(key, "credentials in the URL are not supported (use store.username / store.password)")
                );
            }
            if u.host_str().is_none() {
                return Err(self.err(key, "the URL has no host"));
            }
            Ok(s.to_string())
        };
        let sentinel = match &raw.sentinel {
            None => None,
            Some(sc) => {
                if sc.master.is_empty() {
                    return Err(self.err("store.sentinel.master", "must name the monitored master"));
                }
                if sc.nodes.is_empty() {
                    return Err(self.err("store.sentinel.nodes", "needs at least one sentinel"));
                }
                let mut nodes = Vec::new();
                for (i, n) in sc.nodes.iter().enumerate() {
                    nodes.push(redis_url(&format!("store.sentinel.nodes.{i}"), n)?);
                }
                Some(SentinelSettings { master_name: sc.master.clone(), nodes })
            }
        };
        let url = match (&raw.url, &sentinel) {
            (Some(u), _) => redis_url("store.url", u)?,
            // With sentinels, the URL only says TLS and database; the host comes from them.
            (None, Some(_)) => "redis://sentinel-discovered/0".to_string(),
            (None, None) => {
                return Err(self.err("store.url", "is required with `store.kind = \"redis\"` (or `store.sentinel`)"))
            }
        };
        let password = match &raw.password {
            Some(src) => Some(self.secret("store.password", src, watched)?),
            None => None,
        };
        if raw.encryption_keys.is_empty() {
            return Err(self.err(
                "store.encryption_keys",
                "is required with `store.kind = \"redis\"`: at least one 32-byte key, base64 (e.g. `openssl rand -base64 32`)",
            ));
        }
        let mut encryption_keys = Vec::new();
        for (i, src) in raw.encryption_keys.iter().enumerate() {
            let key = format!("store.encryption_keys.{i}");
            let k = self.secret(&key, src, watched)?;
            check_aead_key(&k).map_err(|reason| self.err(&key, reason))?;
            encryption_keys.push(k);
        }
        let key_prefix = raw.key_prefix.clone().unwrap_or_else(|| "tollgate:".to_string());
        if key_prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(self.err("store.key_prefix", "must not contain spaces or control characters"));
        }
        Ok(RedisSettings {
            url,
            username: raw.username.clone(),
            password,
            key_prefix,
            sentinel,
            encryption_keys,
            lease_ttl: self.nonzero("store.lease_ttl", raw.lease_ttl.unwrap_or(Duration::from_secs(10)))?,
            timeout: self.nonzero("store.timeout", raw.timeout.unwrap_or(Duration::from_secs(1)))?,
        })
    }

    /// `proxy.allow_from`: CIDRs (`10.0.0.0/8`, `fd00::/8`) or single addresses.
    fn allow_from(&self, raw: &[String]) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        raw.iter()
            .enumerate()
            .map(|(i, s)| {
                let t = s.trim();
                t.parse::<ipnet::IpNet>()
                    .map(|n| n.trunc())
                    .or_else(|_| t.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        self.err(
                            format!("proxy.allow_from.{i}"),
                            format!("`{s}` is not a CIDR (`10.0.0.0/8`) or an IP address"),
                        )
                    })
            })
            .collect()
    }

    /// A provider's `proxy`: `none`, or an `http(s)://host:port` URL without credentials
    /// (the value is not echoed in errors, in case it carries some anyway).
    fn egress_proxy(&self, key: &str, s: &str) -> Result<EgressProxy, ConfigError> {
        if s.trim().eq_ignore_ascii_case("none") {
            return Ok(EgressProxy::Direct);
        }
        let u = url::Url::parse(s.trim()).map_err(|e| {
            self.err(key, format!("is neither `none` nor a URL ({e}); write `http://proxy.example:3128`"))
        })?;
        if u.scheme() != "http" && u.scheme() != "https" {
            return Err(self.err(key, format!("scheme `{}` is not supported; use http or https", u.scheme())));
        }
        if !u.username().is_empty() || u.password().is_some() {
            return Err(self.err(
                key,
                "credentials in the proxy URL are not supported here; put the URL with them in HTTPS_PROXY instead",
            ));
        }
        if u.host_str().is_none() {
            return Err(self.err(key, "the URL has no host"));
        }
        if u.path() != "/" || u.query().is_some() || u.fragment().is_some() {
            return Err(self.err(key, "must be `scheme://host:port` with no path or query"));
        }
        Ok(EgressProxy::Url(u.to_string()))
    }

    fn socket_addr(&self, key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
        s.parse().map_err(|_| self.err(key, format!("`{s}` is not an IP:port socket address")))
    }

    fn nonzero(&self, key: &str, d: Duration) -> Result<Duration, ConfigError> {
        if d.is_zero() {
            Err(self.err(key, "must be greater than zero"))
        } else {
            Ok(d)
        }
    }

    fn secret(&self, key: &str, src: &SecretSource, watched: &mut Vec<PathBuf>) -> Result<Secret, ConfigError> {
        if let Some(f) = src.file() {
            watched.push(f.to_path_buf());
        }
        src.resolve().map_err(|e| self.err(key, e.to_string()))
    }

    /// A provider: its name, timing and HTTP client here; everything its kind owns (keys,
    /// settings, identity, `upstream_headers`) by [`kinds::validate`], whose error is
    /// named `providers.<name>.<key>` with where the value came from.
    fn provider(
        &self,
        name: &str,
        p: &ProviderConfig,
        watched: &mut Vec<PathBuf>,
    ) -> Result<ProviderSpec, ConfigError> {
        let key = |k: &str| format!("providers.{name}.{k}");
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(
                self.err(format!("providers.{name}"), "provider names may use only ASCII letters, digits, `_` and `-`")
            );
        }
        let kind = ProviderKind::from(p.kind);
        let defaults = Timing::default();
        let timing = Timing {
            refresh_before: p.refresh_before.unwrap_or(defaults.refresh_before),
            default_lifetime: p.lifetime.or(kind.default_lifetime()),
            max_lifetime: p.max_lifetime.unwrap_or(defaults.max_lifetime),
            expiry_margin: p.expiry_margin.unwrap_or(defaults.expiry_margin),
            backoff_min: p.backoff_min.unwrap_or(defaults.backoff_min),
            backoff_max: p.backoff_max.unwrap_or(defaults.backoff_max),
            reauth_min_interval: p.reauth_min_interval.unwrap_or(defaults.reauth_min_interval),
        };
        if timing.backoff_min.is_zero() {
            return Err(self.err(key("backoff_min"), "must be greater than zero"));
        }
        if timing.backoff_min > timing.backoff_max {
            return Err(self.err(key("backoff_max"), "must not be smaller than `backoff_min`"));
        }
        if timing.max_lifetime.is_zero() {
            return Err(self.err(key("max_lifetime"), "must be greater than zero"));
        }
        if let Some(l) = timing.default_lifetime {
            if l.is_zero() {
                return Err(self.err(key("lifetime"), "must be greater than zero"));
            }
        }
        let http = HttpClientSpec {
            timeout: self.nonzero(&key("timeout"), p.timeout.unwrap_or(Duration::from_secs(10)))?,
            connect_timeout: self
                .nonzero(&key("connect_timeout"), p.connect_timeout.unwrap_or(Duration::from_secs(5)))?,
            ca_file: p.ca_file.clone(),
            proxy: match &p.proxy {
                None => EgressProxy::Environment,
                Some(s) => self.egress_proxy(&key("proxy"), s)?,
            },
        };
        if let Some(ca) = &http.ca_file {
            if let Err(e) = std::fs::metadata(ca) {
                return Err(self.err(key("ca_file"), format!("cannot read `{}`: {}", ca.display(), e.kind())));
            }
        }

        let v = kinds::validate(p).map_err(|e| self.provider_err(name, e))?;
        watched.extend(v.secret_files);
        Ok(ProviderSpec {
            name: name.to_string(),
            kind: v.kind,
            source: v.source,
            timing,
            http,
            upstream_headers: v.upstream_headers,
            fingerprint: v.fingerprint,
        })
    }

    /// A kind's error, its key placed under `providers.<name>`.
    fn provider_err(&self, name: &str, e: SpecError) -> ConfigError {
        let key = if e.key.is_empty() { format!("providers.{name}") } else { format!("providers.{name}.{}", e.key) };
        self.err(key, e.reason)
    }

    fn http_url(&self, key: &str, s: &str) -> Result<url::Url, ConfigError> {
        crate::checks::http_url(s).map_err(|reason| self.err(key, reason))
    }

    fn header(&self, key: &str, name: &str, value: &str) -> Result<(HeaderName, HeaderValue), ConfigError> {
        crate::checks::header(name, value).map_err(|reason| self.err(key, reason))
    }

    fn route(&self, i: usize, r: &RouteConfig, raw: &FileConfig) -> Result<RouteSpec, ConfigError> {
        let key = |k: &str| format!("routes.{i}.{k}");
        let name = r.name.clone().unwrap_or_else(|| format!("route{i}"));
        if !r.path_prefix.starts_with('/') {
            return Err(self.err(key("path_prefix"), format!("`{}` must start with `/`", r.path_prefix)));
        }
        if let Some(p) = &r.provider {
            if !raw.providers.contains_key(p) {
                let known: Vec<&str> = raw.providers.keys().map(String::as_str).collect();
                return Err(self.err(
                    key("provider"),
                    format!(
                        "unknown provider `{p}` (defined: {})",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    ),
                ));
            }
        }
        let header_name = HeaderName::from_bytes(r.header_name.as_bytes())
            .map_err(|_| self.err(key("header_name"), format!("`{}` is not a valid header name", r.header_name)))?;
        if HeaderValue::from_str(&r.header_prefix).is_err() {
            return Err(self.err(key("header_prefix"), "is not a valid header value"));
        }
        let mut set_headers = Vec::new();
        for (k, v) in &r.set_headers {
            set_headers.push(self.header(&key(&format!("set_headers.{k}")), k, v)?);
        }
        if let Some(ca) = &r.ca_file {
            if let Err(e) = std::fs::metadata(ca) {
                return Err(self.err(key("ca_file"), format!("cannot read `{}`: {}", ca.display(), e.kind())));
            }
        }
        Ok(RouteSpec {
            name,
            host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
            path_prefix: r.path_prefix.clone(),
            strip_prefix: r.strip_prefix,
            upstream: self.upstream(&key("upstream"), r)?,
            provider: r.provider.clone(),
            header_name,
            header_prefix: r.header_prefix.clone(),
            authorization: match r.authorization {
                AuthorizationConfig::Overwrite => AuthorizationPolicy::Overwrite,
                AuthorizationConfig::Keep => AuthorizationPolicy::Keep,
                AuthorizationConfig::Reject => AuthorizationPolicy::Reject,
            },
            preserve_host: r.preserve_host,
            set_headers,
            retry_on_status: {
                // Only statuses that say "this credential was refused" invalidate the token
                // and replay the request: after any other status (a 503, say) the upstream
                // may already have acted on the request, and the token is not at fault.
                if let Some(bad) = r.retry_on_status.iter().find(|s| !AUTH_STATUSES.contains(*s)) {
                    return Err(self.err(
                        key("retry_on_status"),
                        format!(
                            "{bad} is not an authentication status; only 401, 403 and 407 may be listed (a replay after another status could repeat a request the upstream already executed)"
                        ),
                    ));
                }
                r.retry_on_status.clone()
            },
            graphql_unauthenticated: r.graphql_unauthenticated,
            session_probe: match &r.session_probe {
                Some(p) if !p.starts_with('/') || p.chars().any(|c| c.is_whitespace() || c.is_control()) => {
                    return Err(self.err(key("session_probe"), "must be a path starting with `/`, without spaces"));
                }
                p => p.clone(),
            },
        })
    }

    fn upstream(&self, key: &str, r: &RouteConfig) -> Result<UpstreamSpec, ConfigError> {
        let u = self.http_url(key, &r.upstream)?;
        let tls = u.scheme() == "https";
        let host = u.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
        let port = u.port_or_known_default().unwrap_or(if tls { 443 } else { 80 });
        let authority = match u.port() {
            Some(p) => format!("{}:{p}", u.host_str().unwrap_or_default()),
            None => u.host_str().unwrap_or_default().to_string(),
        };
        let authority =
            HeaderValue::from_str(&authority).map_err(|_| self.err(key, "host is not a valid Host header"))?;
        if u.query().is_some() || u.fragment().is_some() {
            return Err(self.err(key, "must not have a query or fragment"));
        }
        Ok(UpstreamSpec {
            url: r.upstream.clone(),
            tls,
            authority,
            sni: r.sni.clone().unwrap_or_else(|| host.clone()),
            host,
            port,
            base_path: u.path().trim_end_matches('/').to_string(),
            ca_file: r.ca_file.clone(),
            tls_verify: r.tls_verify,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::load_str;
    use std::path::Path;

    const BASE: &str = r#"
        [providers.backend]
        kind = "oauth2"
        token_url = "http://127.0.0.1:1/token"
        client_id = "abc123"
        client_secret = "456789"
        [[routes]]
        upstream = "http://127.0.0.1:2"
        provider = "backend"
    "#;

    fn err(toml: &str) -> String {
        load_str(toml, Path::new("t.toml")).unwrap_err().to_string()
    }

    #[test]
    fn base_config_is_valid() {
        let s = load_str(BASE, Path::new("t.toml")).unwrap();
        assert_eq!(s.routes[0].name, "route0");
        assert_eq!(s.routes[0].upstream.port, 2);
        assert_eq!(s.providers[0].name, "backend");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&format!("{BASE}\n[proxy]\nlisten_typo = 1\n"));
        assert!(e.contains("listen_typo"), "{e}");
    }

    #[test]
    fn unknown_provider_in_route_is_named() {
        let e = err(&BASE.replace("provider = \"backend\"", "provider = \"nope\""));
        assert!(e.contains("routes.0.provider") && e.contains("nope"), "{e}");
    }

    #[test]
    fn bad_url_is_named() {
        let e = err(&BASE.replace("http://127.0.0.1:1/token", "not a url"));
        assert!(e.contains("providers.backend.token_url"), "{e}");
    }

    #[test]
    fn admin_on_public_address_needs_token() {
        let e = err(&format!("{BASE}\n[admin]\nlisten = \"0.0.0.0:9090\"\n"));
        assert!(e.contains("admin.listen") && e.contains("admin.token"), "{e}");
    }

    #[test]
    fn redis_store_needs_a_valid_key_and_never_echoes_it() {
        let redis = "\n[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379/0\"\n";
        let e = err(&format!("{BASE}{redis}"));
        assert!(e.contains("store.encryption_keys") && e.contains("required"), "{e}");
        let e = err(&format!("{BASE}{redis}encryption_keys = [\"c2hvcnQta2V5\"]\n"));
        assert!(e.contains("store.encryption_keys.0") && e.contains("32 bytes") && !e.contains("c2hvcnQta2V5"), "{e}");
        let key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
        let s = load_str(&format!("{BASE}{redis}encryption_keys = [\"{key}\"]\n"), Path::new("t.toml")).unwrap();
        assert!(
            matches!(s.store, super::StoreSettings::Redis(ref r) if r.lease_ttl == std::time::Duration::from_secs(10))
        );
        let e = err(&format!(
            "{BASE}\n[store]\nkind = \"redis\"\nurl = \"redis://u:pw@127.0.0.1:6379\"\nencryption_keys = [\"{key}\"]\n"
        ));
        assert!(e.contains("store.url") && !e.contains("pw@"), "{e}");
        let e = err(&format!("{BASE}\n[store]\nkind = \"memory\"\nurl = \"redis://127.0.0.1\"\n"));
        assert!(e.contains("store.url") && e.contains("only used with"), "{e}");
    }

    #[test]
    fn error_does_not_echo_secret() {
        let e = err(&BASE.replace("client_id = \"abc123\"", "client_id = \"abc123\"\ngrant = \"password\""));
        assert!(!e.contains("456789"), "{e}");
    }

    /// The kind's identity reaches `ProviderSpec::fingerprint` unchanged: the value the
    /// code before the kinds refactor computed for this provider.
    #[test]
    fn fingerprint_comes_from_the_kind() {
        let s = load_str(BASE, Path::new("t.toml")).unwrap();
        assert_eq!(s.providers[0].fingerprint, "52611bff19cd07f5");
        assert_eq!(s.providers[0].kind.as_str(), "oauth2");
    }

    #[test]
    fn kind_errors_are_named_under_the_provider() {
        let e = err(&BASE.replace("client_secret = \"456789\"", "client_secret = \"456789\"\nbase_url = \"http://x\""));
        assert_eq!(e, "`providers.backend.base_url` (from t.toml): is not used by kind `oauth2`");
        let http = r#"
            [providers.p]
            kind = "http"
            base_url = "http://127.0.0.1:1"
            [[providers.p.acquire]]
            path = "/t"
            [[routes]]
            upstream = "http://127.0.0.1:2"
            provider = "p"
        "#;
        assert_eq!(err(http), "`providers.p` (from t.toml): no step extracts `token`");
    }

    #[test]
    fn egress_proxy_key() {
        use crate::provider::EgressProxy;
        let with = |v: &str| {
            BASE.replace("client_secret = \"456789\"", &format!("client_secret = \"456789\"\nproxy = \"{v}\""))
        };
        let p = |v: &str| load_str(&with(v), Path::new("t.toml")).map(|s| s.providers[0].http.proxy.clone());
        assert_eq!(load_str(BASE, Path::new("t.toml")).unwrap().providers[0].http.proxy, EgressProxy::Environment);
        assert_eq!(p("none").unwrap(), EgressProxy::Direct);
        assert_eq!(p("http://127.0.0.1:3128").unwrap(), EgressProxy::Url("http://127.0.0.1:3128/".into()));
        let e = p("http://user:hunter2@127.0.0.1:3128").unwrap_err().to_string();
        assert!(e.contains("providers.backend.proxy") && e.contains("HTTPS_PROXY") && !e.contains("hunter2"), "{e}");
        let e = p("socks5://127.0.0.1:1080").unwrap_err().to_string();
        assert!(e.contains("providers.backend.proxy") && e.contains("socks5"), "{e}");
        let e = p("direct").unwrap_err().to_string();
        assert!(e.contains("providers.backend.proxy") && e.contains("none"), "{e}");
    }

    #[test]
    fn allow_from_and_dns_bounds_are_checked() {
        let e = err(&format!("[proxy]\nallow_from = [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n{BASE}"));
        assert!(e.contains("proxy.allow_from.1") && e.contains("10.0.0.0/33"), "{e}");
        let s =
            load_str(&format!("[proxy]\nallow_from = [\"10.1.2.3/8\", \"::1\"]\n{BASE}"), Path::new("t.toml")).unwrap();
        let nets: Vec<String> = s.proxy.allow_from.iter().map(|n| n.to_string()).collect();
        assert_eq!(nets, vec!["10.0.0.0/8", "::1/128"]);
        let e = err(&format!("[proxy]\nupstream_dns_refresh_min = \"10s\"\nupstream_dns_refresh_max = \"5s\"\n{BASE}"));
        assert!(e.contains("proxy.upstream_dns_refresh_max"), "{e}");
        let e = err(&format!("[proxy]\nupstream_dns_refresh_min = \"0s\"\n{BASE}"));
        assert!(e.contains("proxy.upstream_dns_refresh_min"), "{e}");
    }

    #[test]
    fn retry_on_status_takes_only_authentication_statuses() {
        for ok in ["[]", "[401]", "[401, 403]", "[407]"] {
            let s = load_str(&format!("{BASE}retry_on_status = {ok}\n"), Path::new("t.toml")).unwrap();
            assert_eq!(s.routes[0].retry_on_status.len(), ok.matches(',').count() + usize::from(ok != "[]"));
        }
        for bad in ["[503]", "[401, 503]", "[400]", "[200]", "[0]", "[999]"] {
            let e = err(&format!("{BASE}retry_on_status = {bad}\n"));
            assert!(e.contains("routes.0.retry_on_status") && e.contains("not an authentication status"), "{bad}: {e}");
        }
    }

    #[test]
    fn authorization_policy_is_converted() {
        use super::super::AuthorizationPolicy;
        let s = load_str(BASE, Path::new("t.toml")).unwrap();
        assert_eq!(s.routes[0].authorization, AuthorizationPolicy::Overwrite);
        let s = load_str(&format!("{BASE}authorization = \"reject\"\n"), Path::new("t.toml")).unwrap();
        assert_eq!(s.routes[0].authorization, AuthorizationPolicy::Reject);
        let s = load_str(&format!("{BASE}authorization = \"keep\"\n"), Path::new("t.toml")).unwrap();
        assert_eq!(s.routes[0].authorization, AuthorizationPolicy::Keep);
    }
}
