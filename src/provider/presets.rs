//! The seed systems as step-engine data. Paths, encodings, header and field names follow
//! the vendors' documents (`shared/seeds/`) exactly; users configure only the values.

use http::{HeaderName, Method};

use super::steps::{HttpFlowSpec, StepEncoding, StepSpec};
use super::template::{Template, TemplateError, Vars};

/// Build a step from static parts.
fn step(
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

/// TNID (seed 000): `POST /auth/create_user_otp` (form: `telephone_number`, optional
/// `first_name`, `last_name`, `email`) sends an OTP; `POST /auth/token` (form:
/// `telephone_number`, `otp_code`) returns `access_token`, which never expires.
pub fn tnid(base_url: url::Url, vars: Vars) -> Result<HttpFlowSpec, TemplateError> {
    let mut otp_fields: Vec<(&str, &str)> = vec![("telephone_number", "{telephone_number}")];
    for (field, tpl) in [("first_name", "{first_name}"), ("last_name", "{last_name}"), ("email", "{email}")] {
        if vars.contains_key(field) {
            otp_fields.push((field, tpl));
        }
    }
    Ok(HttpFlowSpec {
        base_url,
        login: vec![
            step("create_user_otp", "/auth/create_user_otp", StepEncoding::Form, &[], &otp_fields, &[])?,
            step(
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

/// Etna (seed 001): `POST {base}/token` with headers `Et-App-Key`, `Username`,
/// `Password` returns `{"Token": …}`. With two-factor on, that token is interim: a
/// second `POST {base}/token` adds `Authorization: Bearer <interim>` and
/// `VerificationCode: <code>` and returns the final `Token`.
pub fn etna(base_url: url::Url, vars: Vars, two_factor: bool) -> Result<HttpFlowSpec, TemplateError> {
    let creds: [(&'static str, &str); 3] =
        [("et-app-key", "{app_key}"), ("username", "{username}"), ("password", "{password}")];
    let first = |extract: &[(&str, &str)]| step("token", "token", StepEncoding::None, &creds, &[], extract);
    let (acquire, login) = if two_factor {
        let mut verify_headers = creds.to_vec();
        verify_headers.push(("authorization", "Bearer {interim}"));
        verify_headers.push(("verificationcode", "{code}"));
        let verify = step("verify", "token", StepEncoding::None, &verify_headers, &[], &[("token", "/Token")])?;
        (vec![], vec![first(&[("interim", "/Token")])?, verify])
    } else {
        (vec![first(&[("token", "/Token")])?], vec![])
    };
    Ok(HttpFlowSpec { base_url, vars, acquire, refresh: vec![], login, public: vec![] })
}

/// Thrill-ID (seed 003): `POST /accounts/auth {username, password}` returns `token` (a
/// JWT living 1800 s), `refresh_token` and `access_to {org_id, unit_ids}`;
/// `POST /accounts/refresh {token, refresh_token}` returns a new set.
pub fn thrill_id(base_url: url::Url, vars: Vars) -> Result<HttpFlowSpec, TemplateError> {
    let extract = [
        ("token", "/token"),
        ("refresh_token", "/refresh_token"),
        ("org_id", "/access_to/org_id"),
        ("unit_ids", "/access_to/unit_ids"),
    ];
    Ok(HttpFlowSpec {
        base_url,
        vars,
        acquire: vec![step(
            "auth",
            "/accounts/auth",
            StepEncoding::Json,
            &[],
            &[("username", "{username}"), ("password", "{password}")],
            &extract,
        )?],
        refresh: vec![step(
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
