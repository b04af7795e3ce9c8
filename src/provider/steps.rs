//! The declarative step engine: a token flow is a list of HTTP requests whose URLs,
//! headers and fields are templates over config values, a human-supplied `{code}` and
//! what earlier steps extracted (by JSON pointer). `kind = "http"` exposes it directly;
//! the TNID, Etna and Thrill-ID presets are data on top of it (see [`super::kinds`]).

use std::collections::BTreeMap;

use async_trait::async_trait;
use http::{HeaderName, HeaderValue, Method};
use serde_json::{Map, Value};

use super::error::{ErrorClass, FetchError};
use super::response;
use super::spec::HttpClientSpec;
use super::{TokenSet, TokenSource};
use crate::secret::Secret;
use crate::template::{Template, Vars};

/// How a step's fields are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepEncoding {
    Json,
    Form,
    /// No body (fields are an error); values travel in headers, as Etna's do.
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepSpec {
    pub name: String,
    pub method: Method,
    /// Appended to the provider's `base_url`.
    pub path: Template,
    pub encoding: StepEncoding,
    pub headers: Vec<(HeaderName, Template)>,
    pub fields: Vec<(String, Template)>,
    /// (variable, JSON pointer) pairs read from the response.
    pub extract: Vec<(String, String)>,
}

impl StepSpec {
    /// Whether the step needs the human-supplied `{code}`.
    pub fn needs_code(&self) -> bool {
        self.path.uses("code")
            || self.headers.iter().any(|(_, t)| t.uses("code"))
            || self.fields.iter().any(|(_, t)| t.uses("code"))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpFlowSpec {
    pub base_url: url::Url,
    /// Config params and secrets, available to every template.
    pub vars: Vars,
    pub acquire: Vec<StepSpec>,
    pub refresh: Vec<StepSpec>,
    pub login: Vec<StepSpec>,
    /// Extracted variables whose values the admin API may show (e.g. `org_id`).
    pub public: Vec<String>,
}

/// Variable names with a meaning to tollgate.
pub const TOKEN: &str = "token";
pub const EXPIRES_IN: &str = "expires_in";
pub const REFRESH_TOKEN: &str = "refresh_token";
pub const CODE: &str = "code";

/// Read `extract` pointers from a response body. Strings are taken as they are, other
/// JSON values in their compact JSON form (`unit_ids` → `["brand1","brand2"]`).
/// `expires_in` keeps its raw JSON value, since the expiry rules accept numbers and
/// numeric strings. A missing pointer is a malformed response.
pub fn extract(body: &[u8], step: &str, pointers: &[(String, String)]) -> Result<(Vars, Option<Value>), FetchError> {
    let mut vars = Vars::new();
    let mut expires_in = None;
    if pointers.is_empty() {
        return Ok((vars, None));
    }
    let v =
        response::json_object(body).map_err(|e| FetchError::new(e.class, format!("step `{step}`: {}", e.detail)))?;
    for (name, pointer) in pointers {
        if name == EXPIRES_IN {
            expires_in = v.pointer(pointer).cloned();
            continue;
        }
        let value = match v.pointer(pointer) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Null) | None => {
                return Err(FetchError::new(
                    ErrorClass::Malformed,
                    format!("step `{step}`: response has no `{pointer}`"),
                ))
            }
            Some(Value::String(_)) => {
                return Err(FetchError::new(ErrorClass::Malformed, format!("step `{step}`: `{pointer}` is empty")))
            }
            Some(other) => other.to_string(),
        };
        vars.insert(name.clone(), Secret::new(value));
    }
    Ok((vars, expires_in))
}

pub struct HttpFlowSource {
    spec: HttpFlowSpec,
    client: reqwest::Client,
}

impl HttpFlowSource {
    pub fn new(spec: HttpFlowSpec, http: &HttpClientSpec) -> Result<Self, FetchError> {
        Ok(HttpFlowSource { client: response::client(http)?, spec })
    }

    fn url(&self, step: &StepSpec, vars: &Vars) -> Result<url::Url, FetchError> {
        let path = render(&step.path, vars, &step.name)?;
        let base = self.spec.base_url.as_str().trim_end_matches('/');
        let joined = format!("{base}/{}", path.trim_start_matches('/'));
        url::Url::parse(&joined)
            .map_err(|_| FetchError::new(ErrorClass::Rejected, format!("step `{}`: invalid URL", step.name)))
    }

    /// Run one step; return what it extracted.
    async fn run_step(&self, step: &StepSpec, vars: &Vars, expires_in: &mut Option<Value>) -> Result<Vars, FetchError> {
        let mut req = self.client.request(step.method.clone(), self.url(step, vars)?);
        req = req.header(http::header::ACCEPT, "application/json");
        for (name, tpl) in &step.headers {
            let value = render(tpl, vars, &step.name)?;
            let mut hv = HeaderValue::from_str(&value).map_err(|_| {
                FetchError::new(
                    ErrorClass::Rejected,
                    format!("step `{}`: header `{name}` is not a valid value", step.name),
                )
            })?;
            hv.set_sensitive(true);
            req = req.header(name.clone(), hv);
        }
        let mut fields: Vec<(&str, zeroize::Zeroizing<String>)> = Vec::with_capacity(step.fields.len());
        for (k, tpl) in &step.fields {
            fields.push((k.as_str(), render(tpl, vars, &step.name)?));
        }
        req = match step.encoding {
            StepEncoding::Json => {
                let obj: Map<String, Value> =
                    fields.iter().map(|(k, v)| (k.to_string(), Value::String(v.to_string()))).collect();
                req.json(&obj)
            }
            StepEncoding::Form => {
                let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
                req.form(&pairs)
            }
            // An explicit empty body, so that a POST carries `Content-Length: 0` as the
            // vendor documents show.
            StepEncoding::None => req.body(Vec::new()),
        };
        let resp = req.send().await.map_err(response::transport_error)?;
        if !resp.status().is_success() {
            let mut e = response::error_response(resp).await;
            e.detail = format!("step `{}`: {}", step.name, e.detail);
            return Err(e);
        }
        let body = response::read_body(resp).await?;
        let (found, exp) = extract(&body, &step.name, &step.extract)?;
        if exp.is_some() {
            *expires_in = exp;
        }
        Ok(found)
    }

    /// Run `steps` with `vars` available to templates; return only what the steps
    /// extracted, so config values and the code never enter the token set (or the store).
    async fn run(&self, steps: &[StepSpec], mut vars: Vars) -> Result<(Vars, Option<Value>), FetchError> {
        let mut produced = Vars::new();
        let mut expires_in = None;
        for step in steps {
            let found = self.run_step(step, &vars, &mut expires_in).await?;
            vars.extend(found.iter().map(|(k, v)| (k.clone(), v.clone())));
            produced.extend(found);
        }
        Ok((produced, expires_in))
    }

    fn token_set(&self, vars: Vars, expires_in: Option<Value>) -> Result<TokenSet, FetchError> {
        let token = vars
            .get(TOKEN)
            .cloned()
            .ok_or_else(|| FetchError::new(ErrorClass::Malformed, "the flow extracted no `token`"))?;
        let public: BTreeMap<String, String> =
            self.spec.public.iter().filter_map(|k| vars.get(k).map(|v| (k.clone(), v.expose().to_string()))).collect();
        Ok(TokenSet {
            access_token: token,
            expires_in,
            refresh_token: vars.get(REFRESH_TOKEN).cloned(),
            scope: None,
            extras: public,
            vars,
        })
    }

    fn base_vars(&self) -> Vars {
        self.spec.vars.clone()
    }

    /// Login steps up to (not including) the first one that needs the code.
    fn login_split(&self) -> usize {
        self.spec.login.iter().position(StepSpec::needs_code).unwrap_or(self.spec.login.len())
    }
}

fn render(t: &Template, vars: &Vars, step: &str) -> Result<zeroize::Zeroizing<String>, FetchError> {
    t.render(vars).map_err(|e| FetchError::new(ErrorClass::Rejected, format!("step `{step}`: {e}")))
}

#[async_trait]
impl TokenSource for HttpFlowSource {
    async fn acquire(&self) -> Result<TokenSet, FetchError> {
        if self.spec.acquire.is_empty() {
            return Err(FetchError::new(
                ErrorClass::InvalidGrant,
                "this provider needs a human login (`tollgate login`)",
            ));
        }
        let (vars, exp) = self.run(&self.spec.acquire, self.base_vars()).await?;
        self.token_set(vars, exp)
    }

    async fn refresh(&self, previous: &TokenSet) -> Result<TokenSet, FetchError> {
        let mut vars = self.base_vars();
        vars.extend(previous.vars.iter().map(|(k, v)| (k.clone(), v.clone())));
        let (got, exp) = self.run(&self.spec.refresh, vars).await?;
        // What the refresh does not return again (a non-rotated refresh token, Thrill-ID's
        // org_id) carries over from the previous set.
        let mut merged = previous.vars.clone();
        merged.extend(got);
        self.token_set(merged, exp)
    }

    fn can_refresh(&self, previous: &TokenSet) -> bool {
        !self.spec.refresh.is_empty()
            && self
                .spec
                .refresh
                .iter()
                .all(|s| step_vars(s).all(|v| self.spec.vars.contains_key(v) || previous.vars.contains_key(v)))
    }

    fn can_acquire(&self) -> bool {
        !self.spec.acquire.is_empty()
    }

    fn has_login(&self) -> bool {
        !self.spec.login.is_empty()
    }

    async fn login_start(&self) -> Result<Vars, FetchError> {
        let split = self.login_split();
        let (pending, _) = self.run(&self.spec.login[..split], self.base_vars()).await?;
        Ok(pending)
    }

    async fn login_complete(&self, pending: &Vars, code: &Secret) -> Result<TokenSet, FetchError> {
        let split = self.login_split();
        let mut vars = self.base_vars();
        vars.extend(pending.iter().map(|(k, v)| (k.clone(), v.clone())));
        vars.insert(CODE.into(), code.clone());
        let (got, exp) = self.run(&self.spec.login[split..], vars).await?;
        self.token_set(got, exp)
    }

    fn config_vars(&self) -> Option<&Vars> {
        Some(&self.spec.vars)
    }
}

fn step_vars(s: &StepSpec) -> impl Iterator<Item = &str> {
    s.path.vars().chain(s.headers.iter().flat_map(|(_, t)| t.vars())).chain(s.fields.iter().flat_map(|(_, t)| t.vars()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ptrs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn extracts_thrill_id_response() {
        let body = br#"{"token":"eyJ.a.b","refresh_token":"r1","access_to":{"org_id":"thrilltech","unit_ids":["brand1","brand2"]}}"#;
        let (v, exp) = extract(
            body,
            "auth",
            &ptrs(&[
                ("token", "/token"),
                ("refresh_token", "/refresh_token"),
                ("org_id", "/access_to/org_id"),
                ("unit_ids", "/access_to/unit_ids"),
            ]),
        )
        .unwrap();
        assert_eq!(v["token"].expose(), "eyJ.a.b");
        assert_eq!(v["org_id"].expose(), "thrilltech");
        assert_eq!(v["unit_ids"].expose(), r#"["brand1","brand2"]"#);
        assert_eq!(exp, None);
    }

    #[test]
    fn missing_pointer_is_malformed() {
        let e = extract(br#"{"Token":"x"}"#, "first", &ptrs(&[("token", "/token")])).unwrap_err();
        assert_eq!(e.class, ErrorClass::Malformed);
        assert!(e.detail.contains("/token") && !e.detail.contains('x'));
        assert_eq!(extract(b"nope", "s", &ptrs(&[("token", "/t")])).unwrap_err().class, ErrorClass::Malformed);
    }

    #[test]
    fn expires_in_kept_raw() {
        let (_, exp) = extract(
            br#"{"access_token":"a","expires_in":"3600"}"#,
            "s",
            &ptrs(&[("token", "/access_token"), ("expires_in", "/expires_in")]),
        )
        .unwrap();
        assert_eq!(exp, Some(Value::String("3600".into())));
    }
}
