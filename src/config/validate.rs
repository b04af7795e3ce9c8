//! Turns the raw file schema into [`Settings`], or into an error that names the key,
//! where the value came from (file path or environment variable) and what was expected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use http::{HeaderName, HeaderValue};

use super::model::{
    ClientAuth, FileConfig, Grant, ProviderConfig, ProviderKind, RouteConfig, StepConfig, StepEncodingConfig, StoreKind,
};
use super::secret::{Secret, SecretSource};
use super::settings::*;
use super::ConfigError;
use crate::provider::presets;
use crate::provider::template::{Template, Vars};

/// Where the file store lives unless `store.path` says otherwise.
pub const DEFAULT_STORE_PATH: &str = "/var/lib/tollgate/tokens.json";

/// Keys every provider kind accepts.
const COMMON_KEYS: &[&str] = &[
    "kind",
    "refresh_before",
    "lifetime",
    "max_lifetime",
    "expiry_margin",
    "timeout",
    "connect_timeout",
    "backoff_min",
    "backoff_max",
    "ca_file",
    "upstream_headers",
    "reauth_min_interval",
];

/// Keys specific to each kind; anything else set on a provider is an error, so a key
/// meant for another kind is never silently ignored.
fn kind_keys(kind: ProviderKind) -> &'static [&'static str] {
    match kind {
        ProviderKind::Oauth2 => &[
            "encoding",
            "client_auth",
            "use_refresh_token",
            "token_url",
            "grant",
            "client_id",
            "client_secret",
            "username",
            "password",
            "scope",
            "audience",
            "extra_params",
            "extra_headers",
            "otp_url",
            "otp_email",
            "otp_phone",
        ],
        ProviderKind::Http => &["base_url", "params", "secrets", "acquire", "refresh", "login", "show"],
        ProviderKind::Tnid => &["base_url", "telephone_number", "first_name", "last_name", "email"],
        ProviderKind::Etna => &["base_url", "username", "password", "app_key", "two_factor"],
        ProviderKind::ThrillId => &["base_url", "username", "password"],
    }
}

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
        };

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

        let needs_human = raw.providers.values().any(|p| {
            matches!(p.kind, ProviderKind::Tnid)
                || (p.kind == ProviderKind::Etna && p.two_factor != Some(false))
                || p.otp_url.is_some()
                || (p.kind == ProviderKind::Http && !p.login.is_empty())
        });
        let store = match (raw.store.kind, needs_human) {
            (Some(StoreKind::Memory), _) | (None, false) => {
                if raw.store.path.is_some() {
                    return Err(self.err("store.path", "is only used with `store.kind = \"file\"`"));
                }
                StoreSettings::Memory
            }
            (Some(StoreKind::File), _) | (None, true) => {
                StoreSettings::File(raw.store.path.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_STORE_PATH)))
            }
        };

        Ok(Settings {
            proxy,
            admin: AdminSettings { listen: admin_listen, token: admin_token },
            providers,
            routes,
            watched_files: watched,
            store,
        })
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
        let defaults = Timing::default();
        let timing = Timing {
            refresh_before: p.refresh_before.unwrap_or(defaults.refresh_before),
            // Thrill-ID documents 1800 s; used only if a token ever lacks a JWT `exp`.
            default_lifetime: p.lifetime.or((p.kind == ProviderKind::ThrillId).then_some(Duration::from_secs(1800))),
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
        };
        if let Some(ca) = &http.ca_file {
            if let Err(e) = std::fs::metadata(ca) {
                return Err(self.err(key("ca_file"), format!("cannot read `{}`: {}", ca.display(), e.kind())));
            }
        }

        self.check_keys(name, p)?;
        let (source, fingerprint) = match p.kind {
            ProviderKind::Oauth2 => {
                let o = self.oauth2(name, p, watched)?;
                let fp = format!(
                    "oauth2|{}|{:?}|{}|{}|{}",
                    o.token_url,
                    o.grant,
                    o.client_id.as_deref().unwrap_or(""),
                    o.username.as_deref().or(o.otp.as_ref().map(|x| x.value.as_str())).unwrap_or(""),
                    o.scope.as_deref().unwrap_or("")
                );
                (SourceSpec::OAuth2(o), fp)
            }
            _ => {
                let (h, identity) = self.http_flow(name, p, watched)?;
                let fp = format!("{:?}|{}|{}", p.kind, h.base_url, identity);
                (SourceSpec::Http(h), fp)
            }
        };
        let mut upstream_headers: Vec<(HeaderName, Template)> = Vec::new();
        for (k, v) in &p.upstream_headers {
            let hk = key(&format!("upstream_headers.{k}"));
            let n = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| self.err(&hk, format!("`{k}` is not a valid header name")))?;
            let t = Template::parse(v).map_err(|e| self.err(&hk, e.to_string()))?;
            upstream_headers.push((n, t));
        }
        // Etna's API wants the app key on every request (seed 001); send it unless the
        // user configured the header themselves.
        if p.kind == ProviderKind::Etna && !upstream_headers.iter().any(|(n, _)| n.as_str() == "et-app-key") {
            if let Ok(t) = Template::parse("{app_key}") {
                upstream_headers.push((HeaderName::from_static("et-app-key"), t));
            }
        }
        self.check_upstream_header_vars(name, &source, &upstream_headers)?;
        Ok(ProviderSpec {
            name: name.to_string(),
            kind: p.kind,
            source,
            timing,
            http,
            upstream_headers,
            fingerprint: format!("{:016x}", fnv1a(fingerprint.as_bytes())),
        })
    }

    /// `upstream_headers` may use `{token}`, `{refresh_token}`, the provider's config
    /// values and whatever its steps extract; a typo fails here, not at every refresh.
    fn check_upstream_header_vars(
        &self,
        name: &str,
        source: &SourceSpec,
        headers: &[(HeaderName, Template)],
    ) -> Result<(), ConfigError> {
        let mut known: Vec<&str> = vec!["token", "refresh_token"];
        if let SourceSpec::Http(h) = source {
            known.extend(h.vars.keys().map(String::as_str));
            for st in h.acquire.iter().chain(&h.refresh).chain(&h.login) {
                known.extend(st.extract.iter().map(|(k, _)| k.as_str()));
            }
        }
        for (hn, t) in headers {
            if let Some(v) = t.vars().find(|v| !known.contains(v)) {
                return Err(self.err(
                    format!("providers.{name}.upstream_headers.{hn}"),
                    format!("`{{{v}}}` is not available here (known: {})", known.join(", ")),
                ));
            }
        }
        Ok(())
    }

    fn check_keys(&self, name: &str, p: &ProviderConfig) -> Result<(), ConfigError> {
        let Ok(serde_json::Value::Object(set)) = serde_json::to_value(p) else {
            return Ok(());
        };
        let allowed = kind_keys(p.kind);
        for (k, v) in set {
            let empty = match &v {
                serde_json::Value::Null => true,
                serde_json::Value::Object(o) => o.is_empty(),
                serde_json::Value::Array(a) => a.is_empty(),
                _ => false,
            };
            if !empty && !COMMON_KEYS.contains(&k.as_str()) && !allowed.contains(&k.as_str()) {
                let kind =
                    serde_json::to_value(p.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
                return Err(self.err(format!("providers.{name}.{k}"), format!("is not used by kind `{kind}`")));
            }
        }
        Ok(())
    }

    fn required<'a>(&self, name: &str, k: &str, v: &'a Option<String>, kind: &str) -> Result<&'a str, ConfigError> {
        v.as_deref().ok_or_else(|| self.err(format!("providers.{name}.{k}"), format!("is required for kind `{kind}`")))
    }

    fn required_secret(
        &self,
        name: &str,
        k: &str,
        v: &Option<SecretSource>,
        kind: &str,
        watched: &mut Vec<PathBuf>,
    ) -> Result<Secret, ConfigError> {
        match v {
            Some(src) => self.secret(&format!("providers.{name}.{k}"), src, watched),
            None => Err(self.err(format!("providers.{name}.{k}"), format!("is required for kind `{kind}`"))),
        }
    }

    /// The step-engine kinds: `http` as written, or a preset. Returns the flow and the
    /// non-secret identity for the store fingerprint.
    fn http_flow(
        &self,
        name: &str,
        p: &ProviderConfig,
        watched: &mut Vec<PathBuf>,
    ) -> Result<(HttpFlowSpec, String), ConfigError> {
        let key = |k: &str| format!("providers.{name}.{k}");
        let base = match &p.base_url {
            Some(u) => self.http_url(&key("base_url"), u)?,
            None => return Err(self.err(key("base_url"), "is required")),
        };
        let mut vars = Vars::new();
        let preset_err =
            |e: crate::provider::template::TemplateError| self.err(format!("providers.{name}"), e.to_string());
        let (flow, identity) = match p.kind {
            ProviderKind::Tnid => {
                let phone = self.required(name, "telephone_number", &p.telephone_number, "tnid")?;
                vars.insert("telephone_number".into(), Secret::new(phone));
                for (k, v) in [("first_name", &p.first_name), ("last_name", &p.last_name), ("email", &p.email)] {
                    if let Some(v) = v {
                        vars.insert(k.into(), Secret::new(v.as_str()));
                    }
                }
                (presets::tnid(base, vars).map_err(preset_err)?, phone.to_string())
            }
            ProviderKind::Etna => {
                let user = self.required(name, "username", &p.username, "etna")?;
                vars.insert("username".into(), Secret::new(user));
                vars.insert("password".into(), self.required_secret(name, "password", &p.password, "etna", watched)?);
                vars.insert("app_key".into(), self.required_secret(name, "app_key", &p.app_key, "etna", watched)?);
                (presets::etna(base, vars, p.two_factor.unwrap_or(true)).map_err(preset_err)?, user.to_string())
            }
            ProviderKind::ThrillId => {
                let user = self.required(name, "username", &p.username, "thrill_id")?;
                vars.insert("username".into(), Secret::new(user));
                vars.insert(
                    "password".into(),
                    self.required_secret(name, "password", &p.password, "thrill_id", watched)?,
                );
                (presets::thrill_id(base, vars).map_err(preset_err)?, user.to_string())
            }
            _ => {
                for (k, v) in &p.params {
                    vars.insert(k.clone(), Secret::new(v.as_str()));
                }
                for (k, src) in &p.secrets {
                    if vars.contains_key(k) {
                        return Err(self.err(key(&format!("secrets.{k}")), "is also defined in `params`"));
                    }
                    vars.insert(k.clone(), self.secret(&key(&format!("secrets.{k}")), src, watched)?);
                }
                let acquire = self.steps(name, "acquire", &p.acquire)?;
                let refresh = self.steps(name, "refresh", &p.refresh)?;
                let login = self.steps(name, "login", &p.login)?;
                if acquire.is_empty() && login.is_empty() {
                    return Err(
                        self.err(key("acquire"), "a `kind = \"http\"` provider needs `acquire` or `login` steps")
                    );
                }
                if !login.is_empty() && !login.iter().any(StepSpec::needs_code) {
                    return Err(self.err(key("login"), "login steps must use the human-supplied `{code}` somewhere"));
                }
                let flow = HttpFlowSpec { base_url: base, vars, acquire, refresh, login, public: p.show.clone() };
                let identity: Vec<String> = p.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
                (flow, identity.join("&"))
            }
        };
        self.check_flow_vars(name, &flow)?;
        Ok((flow, identity))
    }

    fn steps(&self, name: &str, flow: &str, steps: &[StepConfig]) -> Result<Vec<StepSpec>, ConfigError> {
        let mut out = Vec::new();
        for (i, st) in steps.iter().enumerate() {
            let key = |k: &str| format!("providers.{name}.{flow}.{i}.{k}");
            let method = match &st.method {
                Some(m) => http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| self.err(key("method"), format!("`{m}` is not an HTTP method")))?,
                None => http::Method::POST,
            };
            let encoding = match st.encoding {
                StepEncodingConfig::Json => StepEncoding::Json,
                StepEncodingConfig::Form => StepEncoding::Form,
                StepEncodingConfig::None => StepEncoding::None,
            };
            if encoding == StepEncoding::None && !st.fields.is_empty() {
                return Err(self.err(key("fields"), "`encoding = \"none\"` sends no body; put values in `headers`"));
            }
            let mut headers = Vec::new();
            for (k, v) in &st.headers {
                let n = HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| self.err(key("headers"), format!("`{k}` is not a valid header name")))?;
                headers
                    .push((n, Template::parse(v).map_err(|e| self.err(key(&format!("headers.{k}")), e.to_string()))?));
            }
            let mut fields = Vec::new();
            for (k, v) in &st.fields {
                fields.push((
                    k.clone(),
                    Template::parse(v).map_err(|e| self.err(key(&format!("fields.{k}")), e.to_string()))?,
                ));
            }
            for (var, ptr) in &st.extract {
                if !(ptr.is_empty() || ptr.starts_with('/')) {
                    return Err(self.err(
                        key(&format!("extract.{var}")),
                        format!("`{ptr}` is not a JSON pointer (e.g. `/access_token`)"),
                    ));
                }
            }
            out.push(StepSpec {
                name: st.name.clone().unwrap_or_else(|| format!("{flow}[{i}]")),
                method,
                path: Template::parse(&st.path).map_err(|e| self.err(key("path"), e.to_string()))?,
                encoding,
                headers,
                fields,
                extract: st.extract.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            });
        }
        Ok(out)
    }

    /// Every `{placeholder}` must name a config value, `code`, or something a step
    /// extracts, so that a typo fails at load time rather than at the first refresh.
    fn check_flow_vars(&self, name: &str, flow: &HttpFlowSpec) -> Result<(), ConfigError> {
        let mut known: Vec<String> = flow.vars.keys().cloned().collect();
        known.push("code".into());
        known.push("token".into());
        known.push("refresh_token".into());
        for st in flow.acquire.iter().chain(&flow.refresh).chain(&flow.login) {
            known.extend(st.extract.iter().map(|(k, _)| k.clone()));
        }
        for shown in &flow.public {
            if shown == "token" || shown == "refresh_token" || shown == "code" || flow.vars.contains_key(shown) {
                return Err(self.err(
                    format!("providers.{name}.show"),
                    format!("`{shown}` is a token or a config value and is never shown"),
                ));
            }
        }
        if !flow.refresh.is_empty() && !flow.refresh.iter().any(|s| s.extract.iter().any(|(k, _)| k == "token")) {
            return Err(self.err(format!("providers.{name}.refresh"), "refresh steps must extract `token`"));
        }
        let has_token = flow.acquire.iter().chain(&flow.login).any(|s| s.extract.iter().any(|(k, _)| k == "token"));
        if !has_token {
            return Err(self.err(format!("providers.{name}"), "no step extracts `token`"));
        }
        for (flow_name, steps) in [("acquire", &flow.acquire), ("refresh", &flow.refresh), ("login", &flow.login)] {
            for (i, st) in steps.iter().enumerate() {
                let used = st
                    .path
                    .vars()
                    .chain(st.headers.iter().flat_map(|(_, t)| t.vars()))
                    .chain(st.fields.iter().flat_map(|(_, t)| t.vars()));
                for v in used {
                    if !known.iter().any(|k| k == v) {
                        return Err(self.err(
                            format!("providers.{name}.{flow_name}.{i}"),
                            format!("`{{{v}}}` is neither a param, a secret, `code`, nor extracted by any step"),
                        ));
                    }
                    if v == "code" && flow_name != "login" {
                        return Err(self.err(
                            format!("providers.{name}.{flow_name}.{i}"),
                            "`{code}` may only be used in `login` steps",
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn oauth2(&self, name: &str, p: &ProviderConfig, watched: &mut Vec<PathBuf>) -> Result<OAuth2Spec, ConfigError> {
        let key = |k: &str| format!("providers.{name}.{k}");
        let token_url = match &p.token_url {
            Some(u) => self.http_url(&key("token_url"), u)?,
            None => return Err(self.err(key("token_url"), "is required for kind `oauth2`")),
        };
        let grant = p.grant.unwrap_or(Grant::ClientCredentials);
        let client_secret = match &p.client_secret {
            Some(s) => Some(self.secret(&key("client_secret"), s, watched)?),
            None => None,
        };
        let password = match &p.password {
            Some(s) => Some(self.secret(&key("password"), s, watched)?),
            None => None,
        };
        let otp = match (&p.otp_url, &p.otp_email, &p.otp_phone) {
            (None, None, None) => None,
            (Some(u), email, phone) => {
                let url = self.http_url(&key("otp_url"), u)?;
                let (field, value) = match (email, phone) {
                    (Some(e), None) => ("email", e.clone()),
                    (None, Some(ph)) => ("phone", ph.clone()),
                    _ => return Err(self.err(key("otp_url"), "needs exactly one of `otp_email` or `otp_phone`")),
                };
                if grant != Grant::Password || password.is_some() {
                    return Err(self.err(
                        key("otp_url"),
                        "the one-time password replaces `password`: use `grant = \"password\"` and leave `password` unset",
                    ));
                }
                Some(OtpSpec { url, field: field.into(), value })
            }
            _ => return Err(self.err(key("otp_email"), "is only used with `otp_url`")),
        };
        match grant {
            Grant::Password => {
                if p.username.is_none() {
                    return Err(self.err(key("username"), "is required with `grant = \"password\"`"));
                }
                if password.is_none() && otp.is_none() {
                    return Err(self.err(
                        key("password"),
                        "is required with `grant = \"password\"` (or `otp_url` for one-time passwords)",
                    ));
                }
            }
            Grant::ClientCredentials => {
                if p.username.is_some() || password.is_some() {
                    return Err(
                        self.err(key("username"), "`username`/`password` are only used with `grant = \"password\"`")
                    );
                }
                if p.client_id.is_none() {
                    return Err(self.err(key("client_id"), "is required with `grant = \"client_credentials\"`"));
                }
            }
        }
        let client_auth = p.client_auth.unwrap_or_default();
        match client_auth {
            ClientAuth::ClientSecretBasic | ClientAuth::ClientSecretPost => {
                if p.client_id.is_some() && client_secret.is_none() {
                    return Err(self
                        .err(key("client_secret"), "is required with a `client_id` unless `client_auth = \"none\"`"));
                }
            }
            ClientAuth::None => {
                if client_secret.is_some() {
                    return Err(self.err(key("client_secret"), "is set but `client_auth = \"none\"` would not send it"));
                }
            }
        }
        let mut extra_headers = Vec::new();
        for (k, v) in &p.extra_headers {
            extra_headers.push(self.header(&key(&format!("extra_headers.{k}")), k, v)?);
        }
        Ok(OAuth2Spec {
            token_url,
            grant,
            client_id: p.client_id.clone(),
            client_secret,
            username: p.username.clone(),
            password,
            encoding: p.encoding.unwrap_or_default(),
            client_auth,
            scope: p.scope.clone(),
            audience: p.audience.clone(),
            extra_params: p.extra_params.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            extra_headers,
            use_refresh_token: p.use_refresh_token.unwrap_or(true),
            otp,
        })
    }

    fn http_url(&self, key: &str, s: &str) -> Result<url::Url, ConfigError> {
        // The value is not echoed: a URL may carry a key in its query or userinfo.
        let u = url::Url::parse(s).map_err(|e| self.err(key, format!("not a valid URL: {e}")))?;
        if !u.username().is_empty() || u.password().is_some() {
            return Err(
                self.err(key, "credentials in the URL are not supported (use client_id/client_secret or secrets)")
            );
        }
        if u.scheme() != "http" && u.scheme() != "https" {
            return Err(self.err(key, format!("scheme `{}` is not supported; use http or https", u.scheme())));
        }
        if u.host_str().is_none() {
            return Err(self.err(key, "the URL has no host"));
        }
        Ok(u)
    }

    fn header(&self, key: &str, name: &str, value: &str) -> Result<(HeaderName, HeaderValue), ConfigError> {
        let n = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| self.err(key, format!("`{name}` is not a valid header name")))?;
        let v = HeaderValue::from_str(value).map_err(|_| self.err(key, "is not a valid header value"))?;
        Ok((n, v))
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
            authorization: r.authorization,
            preserve_host: r.preserve_host,
            set_headers,
            retry_on_status: {
                if let Some(bad) = r.retry_on_status.iter().find(|s| !(100..=599).contains(*s)) {
                    return Err(self.err(key("retry_on_status"), format!("{bad} is not an HTTP status")));
                }
                r.retry_on_status.clone()
            },
            graphql_unauthenticated: r.graphql_unauthenticated,
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
    fn error_does_not_echo_secret() {
        let e = err(&BASE.replace("client_id = \"abc123\"", "client_id = \"abc123\"\ngrant = \"password\""));
        assert!(!e.contains("456789"), "{e}");
    }
}
