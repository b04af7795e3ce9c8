//! `kind = "http"`: the step engine ([`crate::provider::steps`]) as written in the config,
//! for vendors without a preset. Its keys, the validation of its steps (and the flow
//! check every step-engine kind shares), and its identity.

use ::http::HeaderName;

use super::{base_url, Cx, KindSpec, SpecError};
use crate::provider::spec::SourceSpec;
use crate::provider::steps::{HttpFlowSpec, StepEncoding, StepSpec};
use crate::schema::{ProviderConfig, StepConfig, StepEncodingConfig};
use crate::secret::Secret;
use crate::template::{Template, Vars};

/// The keys `kind = "http"` accepts beyond the common ones.
pub const KEYS: &[&str] = &["base_url", "params", "secrets", "acquire", "refresh", "login", "show"];

/// A human is needed when there are login steps (they take the `{code}`).
pub(super) fn needs_human(p: &ProviderConfig) -> bool {
    !p.login.is_empty()
}

pub(super) fn validate(p: &ProviderConfig, cx: &mut Cx) -> Result<KindSpec, SpecError> {
    let base = base_url(p)?;
    let mut vars = Vars::new();
    for (k, v) in &p.params {
        vars.insert(k.clone(), Secret::new(v.as_str()));
    }
    for (k, src) in &p.secrets {
        let key = format!("secrets.{k}");
        if vars.contains_key(k) {
            return Err(SpecError::new(key, "is also defined in `params`"));
        }
        vars.insert(k.clone(), cx.secret(&key, src)?);
    }
    let acquire = steps("acquire", &p.acquire)?;
    let refresh = steps("refresh", &p.refresh)?;
    let login = steps("login", &p.login)?;
    if acquire.is_empty() && login.is_empty() {
        return Err(SpecError::new("acquire", "a `kind = \"http\"` provider needs `acquire` or `login` steps"));
    }
    if !login.is_empty() && !login.iter().any(StepSpec::needs_code) {
        return Err(SpecError::new("login", "login steps must use the human-supplied `{code}` somewhere"));
    }
    let identity = identity(&base, p);
    let flow = HttpFlowSpec { base_url: base, vars, acquire, refresh, login, public: p.show.clone() };
    check_flow(&flow)?;
    Ok(KindSpec { source: SourceSpec::Http(flow), identity, implied_headers: vec![] })
}

/// The base URL and the non-secret `params` (`secrets` never).
pub fn identity(base_url: &url::Url, p: &ProviderConfig) -> String {
    let params: Vec<String> = p.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    super::flow_identity("Http", base_url, &params.join("&"))
}

fn steps(flow: &str, steps: &[StepConfig]) -> Result<Vec<StepSpec>, SpecError> {
    let mut out = Vec::new();
    for (i, st) in steps.iter().enumerate() {
        let key = |k: &str| format!("{flow}.{i}.{k}");
        let method = match &st.method {
            Some(m) => ::http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| SpecError::new(key("method"), format!("`{m}` is not an HTTP method")))?,
            None => ::http::Method::POST,
        };
        let encoding = match st.encoding {
            StepEncodingConfig::Json => StepEncoding::Json,
            StepEncodingConfig::Form => StepEncoding::Form,
            StepEncodingConfig::None => StepEncoding::None,
        };
        if encoding == StepEncoding::None && !st.fields.is_empty() {
            return Err(SpecError::new(key("fields"), "`encoding = \"none\"` sends no body; put values in `headers`"));
        }
        let mut headers = Vec::new();
        for (k, v) in &st.headers {
            let n = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| SpecError::new(key("headers"), format!("`{k}` is not a valid header name")))?;
            let t = Template::parse(v).map_err(|e| SpecError::new(key(&format!("headers.{k}")), e.to_string()))?;
            headers.push((n, t));
        }
        let mut fields = Vec::new();
        for (k, v) in &st.fields {
            let t = Template::parse(v).map_err(|e| SpecError::new(key(&format!("fields.{k}")), e.to_string()))?;
            fields.push((k.clone(), t));
        }
        for (var, ptr) in &st.extract {
            if !(ptr.is_empty() || ptr.starts_with('/')) {
                return Err(SpecError::new(
                    key(&format!("extract.{var}")),
                    format!("`{ptr}` is not a JSON pointer (e.g. `/access_token`)"),
                ));
            }
        }
        out.push(StepSpec {
            name: st.name.clone().unwrap_or_else(|| format!("{flow}[{i}]")),
            method,
            path: Template::parse(&st.path).map_err(|e| SpecError::new(key("path"), e.to_string()))?,
            encoding,
            headers,
            fields,
            extract: st.extract.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        });
    }
    Ok(out)
}

/// Checks every step-engine flow passes (presets included): every `{placeholder}` names
/// a config value, `code`, or something a step extracts, so that a typo fails at load
/// time rather than at the first refresh; something extracts `token`; `show` names no
/// token or config value.
pub(super) fn check_flow(flow: &HttpFlowSpec) -> Result<(), SpecError> {
    let mut known: Vec<String> = flow.vars.keys().cloned().collect();
    known.push("code".into());
    known.push("token".into());
    known.push("refresh_token".into());
    for st in flow.acquire.iter().chain(&flow.refresh).chain(&flow.login) {
        known.extend(st.extract.iter().map(|(k, _)| k.clone()));
    }
    for shown in &flow.public {
        if shown == "token" || shown == "refresh_token" || shown == "code" || flow.vars.contains_key(shown) {
            return Err(SpecError::new("show", format!("`{shown}` is a token or a config value and is never shown")));
        }
    }
    if !flow.refresh.is_empty() && !flow.refresh.iter().any(|s| s.extract.iter().any(|(k, _)| k == "token")) {
        return Err(SpecError::new("refresh", "refresh steps must extract `token`"));
    }
    let has_token = flow.acquire.iter().chain(&flow.login).any(|s| s.extract.iter().any(|(k, _)| k == "token"));
    if !has_token {
        return Err(SpecError::new("", "no step extracts `token`"));
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
                    return Err(SpecError::new(
                        format!("{flow_name}.{i}"),
                        format!("`{{{v}}}` is neither a param, a secret, `code`, nor extracted by any step"),
                    ));
                }
                if v == "code" && flow_name != "login" {
                    return Err(SpecError::new(
                        format!("{flow_name}.{i}"),
                        "`{code}` may only be used in `login` steps",
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use crate::provider::kinds::test_support::{fingerprint_of, with};

    fn flow() -> Value {
        json!({
            "kind": "http",
            "base_url": "http://127.0.0.1:3/api",
            "params": { "tenant": "acme", "user": "u1" },
            "secrets": { "pw": "x" },
            "acquire": [{ "path": "/login", "fields": { "user": "{user}", "pw": "{pw}" }, "extract": { "token": "/t" } }],
        })
    }

    /// Computed by the code before identity moved into the kinds.
    #[test]
    fn fingerprint_unchanged() {
        assert_eq!(fingerprint_of(flow()), "d50ab49254a079b1");
    }

    #[test]
    fn secret_change_keeps_the_fingerprint() {
        assert_eq!(fingerprint_of(with(&flow(), "secrets", json!({ "pw": "rotated" }))), fingerprint_of(flow()));
    }

    #[test]
    fn user_or_endpoint_change_alters_the_fingerprint() {
        let base = fingerprint_of(flow());
        assert_ne!(fingerprint_of(with(&flow(), "params", json!({ "tenant": "acme", "user": "u2" }))), base);
        assert_ne!(fingerprint_of(with(&flow(), "base_url", json!("http://127.0.0.1:9/api"))), base);
    }
}
