//! Loading configuration: one TOML or YAML file plus `TOLLGATE_` environment overrides
//! (`__` nests), merged by figment, then validated into [`Settings`]. Validation of what
//! every config has (proxy, admin, store, routes, a provider's timing and HTTP client) is
//! here; each provider kind's own keys are validated by [`crate::provider::kinds`].

pub mod settings;
mod validate;

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml, Yaml};
use figment::Figment;

pub use settings::*;

/// A config problem, phrased for the operator: which key, from where, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file `{path}`: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{0}")]
    Parse(String),
    #[error("`{key}` (from {origin}): {reason}")]
    Invalid { key: String, origin: String, reason: String },
}

/// The environment prefix for overrides.
pub const ENV_PREFIX: &str = "TOLLGATE_";

/// Load and validate the config at `path`, with environment overrides.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    if let Err(e) = std::fs::metadata(path) {
        return Err(ConfigError::Read { path: path.to_path_buf(), reason: e.kind().to_string() });
    }
    let figment = figment_for(path);
    validate::validate(&figment, path)
}

/// Load from a string (the demo's embedded config; tests).
pub fn load_str(toml: &str, origin: &Path) -> Result<Settings, ConfigError> {
    let figment = Figment::from(Toml::string(toml)).merge(EnvStrings(env_provider()));
    validate::validate(&figment, origin)
}

fn figment_for(path: &Path) -> Figment {
    let is_yaml = matches!(path.extension().and_then(|e| e.to_str()), Some("yaml") | Some("yml"));
    let base = if is_yaml { Figment::from(Yaml::file_exact(path)) } else { Figment::from(Toml::file_exact(path)) };
    base.merge(EnvStrings(env_provider()))
}

/// Environment overrides, every value taken as a string. figment's `Env` parses values,
/// so `TOLLGATE_PROVIDERS__TNID__TELEPHONE_NUMBER=15555550100` would become a number and
/// fail a string key; with strings here and lossy extraction, numeric keys still parse
/// ("8" for `proxy.threads`) and string keys keep their digits.
struct EnvStrings(Env);

impl figment::Provider for EnvStrings {
    fn metadata(&self) -> figment::Metadata {
        self.0.metadata()
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        let mut dict = figment::value::Dict::new();
        for (key, value) in self.0.iter() {
            let mut path: Vec<String> = key.as_str().split('.').map(str::to_string).collect();
            let Some(last) = path.pop() else { continue };
            let mut node = &mut dict;
            for part in path {
                let entry =
                    node.entry(part).or_insert_with(|| figment::value::Value::from(figment::value::Dict::new()));
                if entry.as_dict().is_none() {
                    *entry = figment::value::Value::from(figment::value::Dict::new());
                }
                node = match entry {
                    figment::value::Value::Dict(_, d) => d,
                    _ => return Err(figment::Error::from(format!("environment key `{key}` conflicts with another"))),
                };
            }
            node.insert(last, figment::value::Value::from(value));
        }
        Ok(figment::Profile::Default.collect(dict))
    }
}

/// Only the config's own sections are taken from the environment, so that variables like
/// `TOLLGATE_LOG` or `TOLLGATE_CONFIG` (read by the CLI) are not mistaken for keys.
fn env_provider() -> Env {
    Env::prefixed(ENV_PREFIX)
        .filter(|k| {
            let k = k.as_str();
            ["proxy__", "admin__", "providers__", "store__"]
                .iter()
                .any(|s| k.len() > s.len() && k[..s.len()].eq_ignore_ascii_case(s))
        })
        .split("__")
}

/// The variable that sets `key` (`providers.backend.token_url` →
/// `TOLLGATE_PROVIDERS__BACKEND__TOKEN_URL`).
pub fn env_var_for(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.replace('.', "__").to_ascii_uppercase())
}
