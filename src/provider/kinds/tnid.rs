//! `kind = "tnid"` (seed 000): a phone number logs in with a one-time password the IdP
//! sends by SMS. `POST /auth/create_user_otp` (form: `telephone_number`, optional
//! `first_name`, `last_name`, `email`) sends the OTP; `POST /auth/token` (form:
//! `telephone_number`, `otp_code`) returns `access_token`, which never expires. Paths,
//! encodings and field names follow the vendor's document (`shared/seeds/`) exactly;
//! users configure only the values.

use super::{base_url, preset_error, preset_step, required, Cx, KindSpec, SpecError};
use crate::provider::spec::SourceSpec;
use crate::provider::steps::{HttpFlowSpec, StepEncoding};
use crate::schema::ProviderConfig;
use crate::secret::Secret;
use crate::template::{TemplateError, Vars};

/// The keys `kind = "tnid"` accepts beyond the common ones.
pub const KEYS: &[&str] = &["base_url", "telephone_number", "first_name", "last_name", "email"];

/// Every TNID token comes from a human's OTP.
pub(super) fn needs_human(_: &ProviderConfig) -> bool {
    true
}

pub(super) fn validate(p: &ProviderConfig, _cx: &mut Cx) -> Result<KindSpec, SpecError> {
    let base = base_url(p)?;
    let phone = required("telephone_number", &p.telephone_number, "tnid")?;
    let mut vars = Vars::new();
    vars.insert("telephone_number".into(), Secret::new(phone));
    for (k, v) in [("first_name", &p.first_name), ("last_name", &p.last_name), ("email", &p.email)] {
        if let Some(v) = v {
            vars.insert(k.into(), Secret::new(v.as_str()));
        }
    }
    let identity = identity(&base, phone);
    let flow = flow(base, vars).map_err(preset_error)?;
    super::http::check_flow(&flow)?;
    Ok(KindSpec { source: SourceSpec::Http(flow), identity, implied_headers: vec![] })
}

/// The base URL and the phone number (the name and email are profile data, not identity).
pub fn identity(base_url: &url::Url, telephone_number: &str) -> String {
    super::flow_identity("Tnid", base_url, telephone_number)
}

/// The flow: login only (create_user_otp, then token with the `{code}`).
pub fn flow(base_url: url::Url, vars: Vars) -> Result<HttpFlowSpec, TemplateError> {
    let mut otp_fields: Vec<(&str, &str)> = vec![("telephone_number", "{telephone_number}")];
    for (field, tpl) in [("first_name", "{first_name}"), ("last_name", "{last_name}"), ("email", "{email}")] {
        if vars.contains_key(field) {
            otp_fields.push((field, tpl));
        }
    }
    Ok(HttpFlowSpec {
        base_url,
        login: vec![
            preset_step("create_user_otp", "/auth/create_user_otp", StepEncoding::Form, &[], &otp_fields, &[])?,
            preset_step(
                "token",
                "/auth/token",
                StepEncoding::Form,
                &[],
                &[("telephone_number", "{telephone_number}"), ("otp_code", "{code}")],
                &[("token", "/access_token")],
            )?,
        ],
        acquire: vec![],
        refresh: vec![],
        public: vec![],
        vars,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::provider::kinds::test_support::{fingerprint_of, with};

    fn tnid() -> Value {
        json!({
            "kind": "tnid",
            "base_url": "http://127.0.0.1:4",
            "telephone_number": "15555550100",
            "first_name": "Ann",
        })
    }

    /// Computed by the code before identity moved into the kinds.
    #[test]
    fn fingerprint_unchanged() {
        assert_eq!(fingerprint_of(tnid()), "10ee876f9a681650");
    }

    /// TNID has no configured secret (the OTP is the human's); profile data is not identity.
    #[test]
    fn profile_change_keeps_the_fingerprint() {
        let base = fingerprint_of(tnid());
        assert_eq!(fingerprint_of(with(&tnid(), "first_name", json!("Anne"))), base);
        assert_eq!(fingerprint_of(with(&tnid(), "email", json!("ann@example.com"))), base);
    }

    #[test]
    fn user_or_endpoint_change_alters_the_fingerprint() {
        let base = fingerprint_of(tnid());
        assert_ne!(fingerprint_of(with(&tnid(), "telephone_number", json!("15555550199"))), base);
        assert_ne!(fingerprint_of(with(&tnid(), "base_url", json!("http://127.0.0.1:9"))), base);
    }
}
