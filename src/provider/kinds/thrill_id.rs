//! `kind = "thrill_id"` (seed 003): `POST /accounts/auth {username, password}` returns
//! `token` (a JWT living 1800 s), `refresh_token` and `access_to {org_id, unit_ids}`;
//! `POST /accounts/refresh {token, refresh_token}` returns a new set.

use std::time::Duration;

use super::{base_url, preset_error, preset_step, required, Cx, KindSpec, SpecError};
use crate::provider::spec::SourceSpec;
use crate::provider::steps::{HttpFlowSpec, StepEncoding};
use crate::schema::ProviderConfig;
use crate::secret::Secret;
use crate::template::{TemplateError, Vars};

/// The keys `kind = "thrill_id"` accepts beyond the common ones.
pub const KEYS: &[&str] = &["base_url", "username", "password"];

/// Thrill-ID documents 1800 s; used only if a token ever lacks a JWT `exp`.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(1800);

/// Username and password: no human needed.
pub(super) fn needs_human(_: &ProviderConfig) -> bool {
    false
}

pub(super) fn validate(p: &ProviderConfig, cx: &mut Cx) -> Result<KindSpec, SpecError> {
    let base = base_url(p)?;
    let user = required("username", &p.username, "thrill_id")?;
    let mut vars = Vars::new();
    vars.insert("username".into(), Secret::new(user));
    vars.insert("password".into(), cx.required_secret("password", &p.password, "thrill_id")?);
    let identity = identity(&base, user);
    let flow = flow(base, vars).map_err(preset_error)?;
    super::http::check_flow(&flow)?;
    Ok(KindSpec { source: SourceSpec::Http(flow), identity, implied_headers: vec![] })
}

/// The base URL and the username (the password is a secret).
pub fn identity(base_url: &url::Url, username: &str) -> String {
    super::flow_identity("ThrillId", base_url, username)
}

/// The flow: `auth` to acquire, `refresh` with the previous token and refresh token;
/// `org_id` and `unit_ids` are shown in the admin API.
pub fn flow(base_url: url::Url, vars: Vars) -> Result<HttpFlowSpec, TemplateError> {
    let extract = [
        ("token", "/token"),
        ("refresh_token", "/refresh_token"),
        ("org_id", "/access_to/org_id"),
        ("unit_ids", "/access_to/unit_ids"),
    ];
    Ok(HttpFlowSpec {
        base_url,
        vars,
        acquire: vec![preset_step(
            "auth",
            "/accounts/auth",
            StepEncoding::Json,
            &[],
            &[("username", "{username}"), ("password", "{password}")],
            &extract,
        )?],
        refresh: vec![preset_step(
            "refresh",
            "/accounts/refresh",
            StepEncoding::Json,
            &[],
            &[("token", "{token}"), ("refresh_token", "{refresh_token}")],
            &extract,
        )?],
        login: vec![],
        public: vec!["org_id".into(), "unit_ids".into()],
    })
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::provider::kinds::test_support::{fingerprint_of, with};

    fn thrill() -> Value {
        json!({ "kind": "thrill_id", "base_url": "http://127.0.0.1:6", "username": "tu", "password": "p" })
    }

    /// Computed by the code before identity moved into the kinds.
    #[test]
    fn fingerprint_unchanged() {
        assert_eq!(fingerprint_of(thrill()), "96bd5f00af2c5026");
    }

    #[test]
    fn secret_change_keeps_the_fingerprint() {
        assert_eq!(fingerprint_of(with(&thrill(), "password", json!("rotated"))), fingerprint_of(thrill()));
    }

    #[test]
    fn user_or_endpoint_change_alters_the_fingerprint() {
        let base = fingerprint_of(thrill());
        assert_ne!(fingerprint_of(with(&thrill(), "username", json!("other"))), base);
        assert_ne!(fingerprint_of(with(&thrill(), "base_url", json!("http://127.0.0.1:9"))), base);
    }
}
