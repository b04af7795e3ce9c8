//! Provider kinds. Each kind's module owns, for that kind:
//! - its schema keys (`KEYS`: what it accepts of the flat [`ProviderConfig`] table, the
//!   `[providers.<name>]` of the file schema, beyond [`COMMON_KEYS`]);
//! - its validation (`validate`: the raw table → a [`SourceSpec`], every secret resolved);
//! - its identity (`identity`: the non-secret text the stored-token fingerprint hashes);
//! - its construction (the OAuth2 source, or the step-engine flow of a preset).
//!
//! This module dispatches on the kind and holds what every kind shares: the key check,
//! `upstream_headers`, and the [`SpecError`] that config turns into an error naming
//! `providers.<name>.<key>` and where the value came from. It never imports config.

pub mod etna;
pub mod http;
pub mod oauth2;
pub mod thrill_id;
pub mod tnid;

use std::path::PathBuf;
use std::time::Duration;

use ::http::{HeaderName, Method};

use super::spec::{fingerprint, ProviderKind, SourceSpec};
use super::steps::{StepEncoding, StepSpec};
use crate::schema::{ProviderConfig, ProviderKindConfig};
use crate::secret::{Secret, SecretSource};
use crate::template::{Template, TemplateError};

/// Keys every provider kind accepts (timing, the token endpoint's HTTP client, and the
/// headers added to proxied requests).
pub const COMMON_KEYS: &[&str] = &[
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
    "proxy",
    "upstream_headers",
    "reauth_min_interval",
];

/// A problem with one provider's table. `key` is relative to the provider (`client_secret`,
/// `acquire.0.path`); empty when the table as a whole is at fault. Never carries a value
/// that could be a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{key}`: {reason}")]
pub struct SpecError {
    pub key: String,
    pub reason: String,
}

impl SpecError {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        SpecError { key: key.into(), reason: reason.into() }
    }
}

/// A validated provider, less what config validates itself (timing, the HTTP client).
#[derive(Debug)]
pub struct Validated {
    pub kind: ProviderKind,
    pub source: SourceSpec,
    /// `upstream_headers` as configured, plus what the kind implies (Etna's app key).
    pub upstream_headers: Vec<(HeaderName, Template)>,
    /// The hashed identity (see [`super::ProviderSpec::fingerprint`]).
    pub fingerprint: String,
    /// Secret files read, in order, for the reload watcher.
    pub secret_files: Vec<PathBuf>,
}

/// What one kind's `validate` produces.
pub(crate) struct KindSpec {
    pub source: SourceSpec,
    /// The identity text the fingerprint hashes; never a secret.
    pub identity: String,
    /// Headers added to proxied requests unless the user configured the same one.
    pub implied_headers: Vec<(HeaderName, Template)>,
}

impl From<ProviderKindConfig> for ProviderKind {
    fn from(k: ProviderKindConfig) -> Self {
        match k {
            ProviderKindConfig::Oauth2 => ProviderKind::Oauth2,
            ProviderKindConfig::Http => ProviderKind::Http,
            ProviderKindConfig::Tnid => ProviderKind::Tnid,
            ProviderKindConfig::Etna => ProviderKind::Etna,
            ProviderKindConfig::ThrillId => ProviderKind::ThrillId,
        }
    }
}

impl ProviderKind {
    /// The keys this kind accepts beyond [`COMMON_KEYS`].
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            ProviderKind::Oauth2 => oauth2::KEYS,
            ProviderKind::Http => http::KEYS,
            ProviderKind::Tnid => tnid::KEYS,
            ProviderKind::Etna => etna::KEYS,
            ProviderKind::ThrillId => thrill_id::KEYS,
        }
    }

    /// The lifetime assumed when a token carries none and `lifetime` is not set.
    pub fn default_lifetime(self) -> Option<Duration> {
        match self {
            ProviderKind::ThrillId => Some(thrill_id::DEFAULT_LIFETIME),
            _ => None,
        }
    }
}

/// Whether the provider needs a human to log in (an OTP or 2FA code), which decides the
/// default store.
pub fn needs_human(p: &ProviderConfig) -> bool {
    match ProviderKind::from(p.kind) {
        ProviderKind::Oauth2 => oauth2::needs_human(p),
        ProviderKind::Http => http::needs_human(p),
        ProviderKind::Tnid => tnid::needs_human(p),
        ProviderKind::Etna => etna::needs_human(p),
        ProviderKind::ThrillId => thrill_id::needs_human(p),
    }
}

/// Validate one provider table: its keys, its kind's settings, its `upstream_headers`.
/// Timing and the HTTP client (the [`COMMON_KEYS`] other than `upstream_headers`) are
/// config's to check.
pub fn validate(p: &ProviderConfig) -> Result<Validated, SpecError> {
    let kind = ProviderKind::from(p.kind);
    check_keys(kind, p)?;
    let mut cx = Cx::default();
    let spec = match kind {
        ProviderKind::Oauth2 => oauth2::validate(p, &mut cx)?,
        ProviderKind::Http => http::validate(p, &mut cx)?,
        ProviderKind::Tnid => tnid::validate(p, &mut cx)?,
        ProviderKind::Etna => etna::validate(p, &mut cx)?,
        ProviderKind::ThrillId => thrill_id::validate(p, &mut cx)?,
    };
    let upstream_headers = upstream_headers(p, &spec)?;
    Ok(Validated {
        kind,
        source: spec.source,
        upstream_headers,
        fingerprint: fingerprint(&spec.identity),
        secret_files: cx.secret_files,
    })
}

/// Anything set on a provider that its kind does not use is an error, so that a key meant
/// for another kind is never silently ignored.
fn check_keys(kind: ProviderKind, p: &ProviderConfig) -> Result<(), SpecError> {
    let Ok(serde_json::Value::Object(set)) = serde_json::to_value(p) else {
        return Ok(());
    };
    let allowed = kind.keys();
    for (k, v) in set {
        let empty = match &v {
            serde_json::Value::Null => true,
            serde_json::Value::Object(o) => o.is_empty(),
            serde_json::Value::Array(a) => a.is_empty(),
            _ => false,
        };
        if !empty && !COMMON_KEYS.contains(&k.as_str()) && !allowed.contains(&k.as_str()) {
            return Err(SpecError::new(k, format!("is not used by kind `{}`", kind.as_str())));
        }
    }
    Ok(())
}

/// `upstream_headers` may use `{token}`, `{refresh_token}`, the provider's config values
/// and whatever its steps extract; a typo fails here, not at every refresh.
fn upstream_headers(p: &ProviderConfig, spec: &KindSpec) -> Result<Vec<(HeaderName, Template)>, SpecError> {
    let mut headers: Vec<(HeaderName, Template)> = Vec::new();
    for (k, v) in &p.upstream_headers {
        let hk = format!("upstream_headers.{k}");
        let n = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| SpecError::new(&hk, format!("`{k}` is not a valid header name")))?;
        let t = Template::parse(v).map_err(|e| SpecError::new(&hk, e.to_string()))?;
        headers.push((n, t));
    }
    for (n, t) in &spec.implied_headers {
        if !headers.iter().any(|(h, _)| h == n) {
            headers.push((n.clone(), t.clone()));
        }
    }
    let mut known: Vec<&str> = vec!["token", "refresh_token"];
    if let SourceSpec::Http(h) = &spec.source {
        known.extend(h.vars.keys().map(String::as_str));
        for st in h.acquire.iter().chain(&h.refresh).chain(&h.login) {
            known.extend(st.extract.iter().map(|(k, _)| k.as_str()));
        }
    }
    for (hn, t) in &headers {
        if let Some(v) = t.vars().find(|v| !known.contains(v)) {
            return Err(SpecError::new(
                format!("upstream_headers.{hn}"),
                format!("`{{{v}}}` is not available here (known: {})", known.join(", ")),
            ));
        }
    }
    Ok(headers)
}

/// Validation state shared by a kind's checks: which secret files were read.
#[derive(Default)]
pub(crate) struct Cx {
    secret_files: Vec<PathBuf>,
}

impl Cx {
    /// Resolve a secret now, so that a missing variable or file is an error naming the key.
    pub fn secret(&mut self, key: &str, src: &SecretSource) -> Result<Secret, SpecError> {
        if let Some(f) = src.file() {
            self.secret_files.push(f.to_path_buf());
        }
        src.resolve().map_err(|e| SpecError::new(key, e.to_string()))
    }

    /// A key or certificate file the reload watcher should watch.
    pub fn watch(&mut self, path: &std::path::Path) {
        self.secret_files.push(path.to_path_buf());
    }

    pub fn optional_secret(&mut self, key: &str, src: &Option<SecretSource>) -> Result<Option<Secret>, SpecError> {
        src.as_ref().map(|s| self.secret(key, s)).transpose()
    }

    pub fn required_secret(&mut self, key: &str, src: &Option<SecretSource>, kind: &str) -> Result<Secret, SpecError> {
        match src {
            Some(s) => self.secret(key, s),
            None => Err(SpecError::new(key, format!("is required for kind `{kind}`"))),
        }
    }
}

pub(crate) fn required<'a>(key: &str, v: &'a Option<String>, kind: &str) -> Result<&'a str, SpecError> {
    v.as_deref().ok_or_else(|| SpecError::new(key, format!("is required for kind `{kind}`")))
}

pub(crate) fn http_url(key: &str, s: &str) -> Result<url::Url, SpecError> {
    crate::checks::http_url(s).map_err(|reason| SpecError::new(key, reason))
}

/// `base_url`, which every step-engine kind needs.
pub(crate) fn base_url(p: &ProviderConfig) -> Result<url::Url, SpecError> {
    match &p.base_url {
        Some(u) => http_url("base_url", u),
        None => Err(SpecError::new("base_url", "is required")),
    }
}

/// A preset's flow failed to build: a bug in the preset's data, reported on the provider.
pub(crate) fn preset_error(e: TemplateError) -> SpecError {
    SpecError::new("", e.to_string())
}

/// The identity of a step-engine kind: the kind's tag, the IdP's base URL and who logs in.
pub(crate) fn flow_identity(tag: &str, base_url: &url::Url, who: &str) -> String {
    format!("{tag}|{base_url}|{who}")
}

/// A preset's step from static parts.
pub(crate) fn preset_step(
    name: &str,
    path: &str,
    encoding: StepEncoding,
    headers: &[(&'static str, &str)],
    fields: &[(&str, &str)],
    extract: &[(&str, &str)],
) -> Result<StepSpec, TemplateError> {
    Ok(StepSpec {
        name: name.into(),
        method: Method::POST,
        path: Template::parse(path)?,
        encoding,
        headers: headers
            .iter()
            .map(|(k, v)| Ok((HeaderName::from_static(k), Template::parse(v)?)))
            .collect::<Result<_, TemplateError>>()?,
        fields: fields
            .iter()
            .map(|(k, v)| Ok((k.to_string(), Template::parse(v)?)))
            .collect::<Result<_, TemplateError>>()?,
        extract: extract.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    })
}

/// Helpers for the kinds' tests: a provider table from JSON (the same data a TOML table
/// deserialises to) and its fingerprint.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub fn table(v: serde_json::Value) -> ProviderConfig {
        serde_json::from_value(v).expect("test provider table")
    }

    pub fn fingerprint_of(v: serde_json::Value) -> String {
        validate(&table(v)).expect("valid provider").fingerprint
    }

    /// `base` with `key` set to `value` (or removed, for `Null`).
    pub fn with(base: &serde_json::Value, key: &str, value: serde_json::Value) -> serde_json::Value {
        let mut v = base.clone();
        if let Some(o) = v.as_object_mut() {
            if value.is_null() {
                o.remove(key);
            } else {
                o.insert(key.into(), value);
            }
        }
        v
    }
}
