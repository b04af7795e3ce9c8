//! `kind = "etna"` (seed 001): `POST {base}/token` with headers `Et-App-Key`,
//! `Username`, `Password` returns `{"Token": …}`. With two-factor on (the default), that
//! token is interim: a second `POST {base}/token` adds `Authorization: Bearer <interim>`
//! and `VerificationCode: <code>` and returns the final `Token`. Etna's API wants the app
//! key on every request too, so it is added to proxied requests unless configured.

use http::HeaderName;

use super::{base_url, preset_error, preset_step, required, Cx, KindSpec, SpecError};
use crate::provider::spec::SourceSpec;
use crate::provider::steps::{HttpFlowSpec, StepEncoding};
use crate::schema::ProviderConfig;
use crate::secret::Secret;
use crate::template::{Template, TemplateError, Vars};

/// The keys `kind = "etna"` accepts beyond the common ones.
pub const KEYS: &[&str] = &["base_url", "username", "password", "app_key", "two_factor"];

/// With two-factor on (the default), every token needs a human's code.
pub(super) fn needs_human(p: &ProviderConfig) -> bool {
    p.two_factor != Some(false)
}

pub(super) fn validate(p: &ProviderConfig, cx: &mut Cx) -> Result<KindSpec, SpecError> {
    let base = base_url(p)?;
    let user = required("username", &p.username, "etna")?;
    let mut vars = Vars::new();
    vars.insert("username".into(), Secret::new(user));
    vars.insert("password".into(), cx.required_secret("password", &p.password, "etna")?);
    vars.insert("app_key".into(), cx.required_secret("app_key", &p.app_key, "etna")?);
    let identity = identity(&base, user);
    let flow = flow(base, vars, p.two_factor.unwrap_or(true)).map_err(preset_error)?;
    super::http::check_flow(&flow)?;
    let implied_headers = match Template::parse("{app_key}") {
        Ok(t) => vec![(HeaderName::from_static("et-app-key"), t)],
        Err(_) => vec![],
    };
    Ok(KindSpec { source: SourceSpec::Http(flow), identity, implied_headers })
}

/// The base URL and the username (the password and app key are secrets).
pub fn identity(base_url: &url::Url, username: &str) -> String {
    super::flow_identity("Etna", base_url, username)
}

/// The flow: one `token` step, or with two-factor an interim token and a `verify` step
/// that takes the `{code}`.
pub fn flow(base_url: url::Url, vars: Vars, two_factor: bool) -> Result<HttpFlowSpec, TemplateError> {
    let creds: [(&'static str, &str); 3] =
        [("et-app-key", "{app_key}"), ("username", "{username}"), ("password", "{password}")];
    let first = |extract: &[(&str, &str)]| preset_step("token", "token", StepEncoding::None, &creds, &[], extract);
    let (acquire, login) = if two_factor {
        let mut verify_headers = creds.to_vec();
        verify_headers.push(("authorization", "Bearer {interim}"));
        verify_headers.push(("verificationcode", "{code}"));
        let verify = preset_step("verify", "token", StepEncoding::None, &verify_headers, &[], &[("token", "/Token")])?;
        (vec![], vec![first(&[("interim", "/Token")])?, verify])
    } else {
        (vec![first(&[("token", "/Token")])?], vec![])
    };
    Ok(HttpFlowSpec { base_url, vars, acquire, refresh: vec![], login, public: vec![] })
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::provider::kinds::test_support::{fingerprint_of, with};

    fn etna() -> Value {
        json!({
            "kind": "etna",
            "base_url": "http://127.0.0.1:5/api/v1",
            "username": "etuser",
            "password": "p",
            "app_key": "k",
        })
    }

    /// Computed by the code before identity moved into the kinds.
    #[test]
    fn fingerprint_unchanged() {
        assert_eq!(fingerprint_of(etna()), "e66e240c01f9c8ba");
    }

    #[test]
    fn secret_change_keeps_the_fingerprint() {
        let base = fingerprint_of(etna());
        assert_eq!(fingerprint_of(with(&etna(), "password", json!("rotated"))), base);
        assert_eq!(fingerprint_of(with(&etna(), "app_key", json!("rotated"))), base);
    }

    #[test]
    fn user_or_endpoint_change_alters_the_fingerprint() {
        let base = fingerprint_of(etna());
        assert_ne!(fingerprint_of(with(&etna(), "username", json!("other"))), base);
        assert_ne!(fingerprint_of(with(&etna(), "base_url", json!("http://127.0.0.1:9/api/v1"))), base);
    }

    #[test]
    fn app_key_header_is_implied_unless_configured() {
        let table = crate::provider::kinds::test_support::table;
        let v = crate::provider::kinds::validate(&table(etna())).expect("valid");
        let sent: Vec<String> = v.upstream_headers.iter().map(|(n, t)| format!("{n}: {t}")).collect();
        assert_eq!(sent, ["et-app-key: {app_key}"]);
        let own = with(&etna(), "upstream_headers", json!({ "Et-App-Key": "{app_key}", "X-User": "{username}" }));
        let v = crate::provider::kinds::validate(&table(own)).expect("valid");
        let sent: Vec<String> = v.upstream_headers.iter().map(|(n, t)| format!("{n}: {t}")).collect();
        assert_eq!(sent, ["et-app-key: {app_key}", "x-user: {username}"]);
    }
}
