//! Secrets: values that must never reach a log line, an error, a metric or an admin body.
//!
//! A [`Secret`] is the resolved value; a [`SecretSource`] is what the config file says
//! (a literal, `{ env = "VAR" }` or `{ file = "/path" }`). Sources are resolved at load
//! time so that a missing variable or file is a config error naming the key, not a
//! failure at the first token request.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Printed wherever a secret would otherwise appear.
pub const REDACTED: &str = "<redacted>";

/// A secret value. Its `Debug` and `Display` print a redaction marker, and its memory is
/// wiped on drop so that it does not linger in freed heap pages (core dumps, swap).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Zeroizing::new(value.into()))
    }

    /// The value itself. Call sites are deliberately greppable: each one is a place where
    /// the secret leaves tollgate (a token request body, a header to the IdP).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Where a secret comes from, as written in the config.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum SecretSource {
    Literal(String),
    Env { env: String },
    File { file: PathBuf },
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Literal(_) => f.write_str("literal(<redacted>)"),
            SecretSource::Env { env } => write!(f, "env({env})"),
            SecretSource::File { file } => write!(f, "file({})", file.display()),
        }
    }
}

/// Why a secret could not be resolved. Never carries the value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("environment variable `{0}` is not set")]
    EnvMissing(String),
    #[error("cannot read secret file `{path}`: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("secret is empty")]
    Empty,
    #[error("secret contains a line break or control character, which cannot go into a header")]
    ControlChar,
}

impl SecretSource {
    /// Resolve the source to a value. A file's trailing newline is trimmed: editors and
    /// `kubectl create secret --from-file` add one, and a newline in a header value is
    /// invalid (envoy #46260).
    pub fn resolve(&self) -> Result<Secret, SecretError> {
        let value = match self {
            SecretSource::Literal(v) => v.clone(),
            SecretSource::Env { env } => std::env::var(env).map_err(|_| SecretError::EnvMissing(env.clone()))?,
            SecretSource::File { file } => read_secret_file(file)?,
        };
        let value = Zeroizing::new(value);
        let trimmed = value.trim_end_matches(['\n', '\r']);
        if trimmed.is_empty() {
            return Err(SecretError::Empty);
        }
        if trimmed.chars().any(|c| c.is_control()) {
            return Err(SecretError::ControlChar);
        }
        Ok(Secret::new(trimmed))
    }

    /// The file this secret is read from, if any (watched for rotation).
    pub fn file(&self) -> Option<&Path> {
        match self {
            SecretSource::File { file } => Some(file),
            _ => None,
        }
    }
}

fn read_secret_file(path: &Path) -> Result<String, SecretError> {
    std::fs::read_to_string(path)
        .map_err(|e| SecretError::File { path: path.to_path_buf(), reason: e.kind().to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_redact() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
        let src = SecretSource::Literal("hunter2".into());
        assert!(!format!("{src:?}").contains("hunter2"));
    }

    #[test]
    fn file_secret_trims_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, "abc\n").unwrap();
        let s = SecretSource::File { file: p }.resolve().unwrap();
        assert_eq!(s.expose(), "abc");
    }

    #[test]
    fn missing_env_and_file_are_errors_without_values() {
        let e = SecretSource::Env { env: "TOLLGATE_TEST_SURELY_UNSET".into() }.resolve().unwrap_err();
        assert!(e.to_string().contains("TOLLGATE_TEST_SURELY_UNSET"));
        let e = SecretSource::File { file: "/nonexistent/x".into() }.resolve().unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x"));
    }

    #[test]
    fn embedded_newline_is_rejected() {
        assert!(matches!(SecretSource::Literal("a\nb".into()).resolve(), Err(SecretError::ControlChar)));
    }
}
