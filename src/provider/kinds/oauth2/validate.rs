//! The `[providers.<name>]` table of `kind = "oauth2"` → an [`OAuth2Spec`]: every
//! combination the kind cannot use is refused here, naming the key, and every key or
//! certificate file is read once, so that `tollgate check` finds a missing file or a key
//! of the wrong type before tollgate starts.

use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use sha2::{Digest, Sha256};

use super::{
    ClientAuth, ClientCertSpec, DpopSpec, Endpoint, ExchangeSpec, Grant, KeyFile, OAuth2Spec, OtpSpec, SigningKeySpec,
    TOKEN_TYPE_JWT,
};
use crate::jose::dpop::DpopKey;
use crate::jose::keys::{SigningAlg, SigningKey};
use crate::provider::kinds::{http_url, Cx, SpecError};
use crate::schema::ProviderConfig;

/// The DPoP key of providers without `dpop_key_file`: one per process, generated at
/// first use, so that reloads keep it (and the tokens bound to it).
static EPHEMERAL_DPOP_KEY: LazyLock<Arc<DpopKey>> = LazyLock::new(|| Arc::new(DpopKey::generate()));

pub(super) fn spec(p: &ProviderConfig, cx: &mut Cx) -> Result<OAuth2Spec, SpecError> {
    let endpoint = match (&p.token_url, &p.issuer) {
        (Some(u), None) => Endpoint::Token(http_url("token_url", u)?),
        (None, Some(i)) => {
            let u = http_url("issuer", i)?;
            if u.query().is_some() || u.fragment().is_some() {
                return Err(SpecError::new("issuer", "must have no query or fragment (RFC 8414 section 2)"));
            }
            Endpoint::Issuer(u)
        }
        (Some(_), Some(_)) => {
            return Err(SpecError::new("issuer", "set either `issuer` (discovery) or `token_url`, not both"))
        }
        (None, None) => return Err(SpecError::new("token_url", "is required for kind `oauth2` (or set `issuer`)")),
    };
    let grant = p.grant.map(Grant::from).unwrap_or(Grant::ClientCredentials);
    let client_secret = cx.optional_secret("client_secret", &p.client_secret)?;
    let password = cx.optional_secret("password", &p.password)?;
    let otp = otp(p, grant, password.is_some())?;
    grant_inputs(p, grant, password.is_some(), otp.is_some())?;
    let client_auth: ClientAuth = p.client_auth.unwrap_or_default().into();
    // The secret-less methods name the client in the assertion or certificate binding.
    let needs_client = grant == Grant::ClientCredentials
        || matches!(
            client_auth,
            ClientAuth::ClientSecretJwt
                | ClientAuth::PrivateKeyJwt
                | ClientAuth::TlsClientAuth
                | ClientAuth::SelfSignedTlsClientAuth
        );
    if needs_client && p.client_id.is_none() {
        return Err(SpecError::new(
            "client_id",
            format!(
                "is required with `grant = \"{}\"` and `client_auth = \"{}\"`",
                grant_name(grant),
                client_auth.as_str()
            ),
        ));
    }
    match client_auth {
        ClientAuth::ClientSecretBasic | ClientAuth::ClientSecretPost => {
            if p.client_id.is_some() && client_secret.is_none() {
                return Err(SpecError::new(
                    "client_secret",
                    "is required with a `client_id` unless `client_auth = \"none\"`",
                ));
            }
        }
        ClientAuth::ClientSecretJwt => match &client_secret {
            None => {
                return Err(SpecError::new(
                    "client_secret",
                    format!("is required with `client_auth = \"{}\"`", client_auth.as_str()),
                ));
            }
            // RFC 7518 section 3.2: an HS256 key is at least as long as the hash (32 bytes);
            // IdPs (Okta, Keycloak) refuse shorter secrets for this method.
            Some(s) if s.expose().len() < 32 => {
                return Err(SpecError::new(
                    "client_secret",
                    format!(
                        "is {} bytes; `client_auth = \"client_secret_jwt\"` signs with HS256, which needs at least 32",
                        s.expose().len()
                    ),
                ));
            }
            Some(_) => {}
        },
        ClientAuth::PrivateKeyJwt
        | ClientAuth::TlsClientAuth
        | ClientAuth::SelfSignedTlsClientAuth
        | ClientAuth::None => {
            if client_secret.is_some() {
                return Err(SpecError::new(
                    "client_secret",
                    format!("is set but `client_auth = \"{}\"` would not send it", client_auth.as_str()),
                ));
            }
        }
    }
    let signing_key = signing_key(p, client_auth, cx)?;
    if p.assertion_audience.is_some() && !matches!(client_auth, ClientAuth::PrivateKeyJwt | ClientAuth::ClientSecretJwt)
    {
        return Err(SpecError::new(
            "assertion_audience",
            "is only used with `client_auth = \"private_key_jwt\"` or `\"client_secret_jwt\"`",
        ));
    }
    let client_cert = client_cert(p, client_auth, cx)?;
    let dpop = dpop(p, cx)?;
    let mut extra_headers = Vec::new();
    for (k, v) in &p.extra_headers {
        extra_headers
            .push(crate::checks::header(k, v).map_err(|reason| SpecError::new(format!("extra_headers.{k}"), reason))?);
    }
    let resource = p.resource.as_ref().map(|r| r.to_vec()).unwrap_or_default();
    for (i, r) in resource.iter().enumerate() {
        // RFC 8707 section 2: an absolute URI without a fragment.
        match url::Url::parse(r) {
            Ok(u) if u.fragment().is_none() => {}
            _ => return Err(SpecError::new(format!("resource.{i}"), "must be an absolute URI without a fragment")),
        }
    }
    Ok(OAuth2Spec {
        endpoint,
        grant,
        client_id: p.client_id.clone(),
        client_secret,
        username: p.username.clone(),
        password,
        encoding: p.encoding.unwrap_or_default().into(),
        client_auth,
        scope: p.scope.clone(),
        audience: p.audience.clone(),
        resource,
        extra_params: p.extra_params.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        extra_headers,
        use_refresh_token: p.use_refresh_token.unwrap_or(true),
        otp,
        signing_key,
        client_assertion_file: p.client_assertion_file.clone(),
        assertion_audience: p.assertion_audience.clone(),
        assertion_file: p.assertion_file.clone(),
        exchange: exchange(p, grant),
        client_cert,
        dpop,
    })
}

fn grant_name(g: Grant) -> &'static str {
    match g {
        Grant::ClientCredentials => "client_credentials",
        Grant::Password => "password",
        Grant::JwtBearer => "jwt_bearer",
        Grant::TokenExchange => "token_exchange",
    }
}

fn otp(p: &ProviderConfig, grant: Grant, has_password: bool) -> Result<Option<OtpSpec>, SpecError> {
    match (&p.otp_url, &p.otp_email, &p.otp_phone) {
        (None, None, None) => Ok(None),
        (Some(u), email, phone) => {
            let url = http_url("otp_url", u)?;
            let (field, value) = match (email, phone) {
                (Some(e), None) => ("email", e.clone()),
                (None, Some(ph)) => ("phone", ph.clone()),
                _ => return Err(SpecError::new("otp_url", "needs exactly one of `otp_email` or `otp_phone`")),
            };
            if grant != Grant::Password || has_password {
                return Err(SpecError::new(
                    "otp_url",
                    "the one-time password replaces `password`: use `grant = \"password\"` and leave `password` unset",
                ));
            }
            Ok(Some(OtpSpec { url, field: field.into(), value }))
        }
        _ => Err(SpecError::new("otp_email", "is only used with `otp_url`")),
    }
}

/// Each grant's own inputs are required with it and refused with any other.
fn grant_inputs(p: &ProviderConfig, grant: Grant, has_password: bool, has_otp: bool) -> Result<(), SpecError> {
    let only = |key: &str, set: bool, g: Grant| -> Result<(), SpecError> {
        if set && grant != g {
            return Err(SpecError::new(key, format!("is only used with `grant = \"{}\"`", grant_name(g))));
        }
        Ok(())
    };
    only("username", p.username.is_some(), Grant::Password)?;
    only("password", has_password, Grant::Password)?;
    only("assertion_file", p.assertion_file.is_some(), Grant::JwtBearer)?;
    for (key, set) in [
        ("subject_token_file", p.subject_token_file.is_some()),
        ("subject_token_type", p.subject_token_type.is_some()),
        ("actor_token_file", p.actor_token_file.is_some()),
        ("actor_token_type", p.actor_token_type.is_some()),
        ("requested_token_type", p.requested_token_type.is_some()),
    ] {
        only(key, set, Grant::TokenExchange)?;
    }
    match grant {
        Grant::Password => {
            if p.username.is_none() {
                return Err(SpecError::new("username", "is required with `grant = \"password\"`"));
            }
            if !has_password && !has_otp {
                return Err(SpecError::new(
                    "password",
                    "is required with `grant = \"password\"` (or `otp_url` for one-time passwords)",
                ));
            }
        }
        Grant::JwtBearer => match &p.assertion_file {
            Some(f) => readable("assertion_file", f)?,
            None => return Err(SpecError::new("assertion_file", "is required with `grant = \"jwt_bearer\"`")),
        },
        Grant::TokenExchange => {
            match &p.subject_token_file {
                Some(f) => readable("subject_token_file", f)?,
                None => {
                    return Err(SpecError::new("subject_token_file", "is required with `grant = \"token_exchange\"`"))
                }
            }
            if let Some(f) = &p.actor_token_file {
                readable("actor_token_file", f)?;
            } else if p.actor_token_type.is_some() {
                return Err(SpecError::new("actor_token_type", "is only used with `actor_token_file`"));
            }
        }
        Grant::ClientCredentials => {}
    }
    Ok(())
}

fn exchange(p: &ProviderConfig, grant: Grant) -> Option<ExchangeSpec> {
    if grant != Grant::TokenExchange {
        return None;
    }
    Some(ExchangeSpec {
        subject_token_file: p.subject_token_file.clone()?,
        subject_token_type: p.subject_token_type.clone().unwrap_or_else(|| TOKEN_TYPE_JWT.into()),
        actor_token_file: p.actor_token_file.clone(),
        actor_token_type: p.actor_token_type.clone().unwrap_or_else(|| TOKEN_TYPE_JWT.into()),
        requested_token_type: p.requested_token_type.clone(),
    })
}

/// Files read again before every token request (they rotate: a projected service-account
/// token is replaced about hourly) must at least exist and be readable now.
fn readable(key: &str, path: &Path) -> Result<(), SpecError> {
    std::fs::read(path)
        .map(drop)
        .map_err(|e| SpecError::new(key, format!("cannot read {}: {}", path.display(), e.kind())))
}

/// Read a key or certificate file now (so `check` reports it) and remember what it held.
/// The reload watcher watches it: a rotated file is picked up without a restart.
fn key_file(key: &str, path: &Path, cx: &mut Cx) -> Result<(KeyFile, Vec<u8>), SpecError> {
    let bytes = std::fs::read(path)
        .map_err(|e| SpecError::new(key, format!("cannot read {}: {}", path.display(), e.kind())))?;
    cx.watch(path);
    let digest = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    Ok((KeyFile { path: path.to_path_buf(), digest }, bytes))
}

fn signing_key(p: &ProviderConfig, auth: ClientAuth, cx: &mut Cx) -> Result<Option<SigningKeySpec>, SpecError> {
    if let Some(f) = &p.client_assertion_file {
        if auth != ClientAuth::PrivateKeyJwt {
            return Err(SpecError::new(
                "client_assertion_file",
                "is only used with `client_auth = \"private_key_jwt\"`",
            ));
        }
        if p.private_key_file.is_some() {
            return Err(SpecError::new(
                "client_assertion_file",
                "set either `private_key_file` (tollgate signs) or `client_assertion_file` (a signed assertion), not both",
            ));
        }
        readable("client_assertion_file", f)?;
    }
    let Some(path) = &p.private_key_file else {
        if auth == ClientAuth::PrivateKeyJwt && p.client_assertion_file.is_none() {
            return Err(SpecError::new(
                "private_key_file",
                "is required with `client_auth = \"private_key_jwt\"` (or `client_assertion_file`)",
            ));
        }
        for (k, set) in [("key_id", p.key_id.is_some()), ("signing_alg", p.signing_alg.is_some())] {
            if set {
                return Err(SpecError::new(k, "is only used with `private_key_file`"));
            }
        }
        return Ok(None);
    };
    if auth != ClientAuth::PrivateKeyJwt {
        return Err(SpecError::new("private_key_file", "is only used with `client_auth = \"private_key_jwt\"`"));
    }
    let alg =
        match &p.signing_alg {
            Some(a) => Some(SigningAlg::parse(a).ok_or_else(|| {
                SpecError::new("signing_alg", format!("`{a}` is not one of RS256, PS256, ES256, EdDSA"))
            })?),
            None => None,
        };
    let (file, _) = key_file("private_key_file", path, cx)?;
    // Parse it now: a wrong key type or an alg that does not fit the key is a config error.
    let key = SigningKey::load(path, alg, p.key_id.as_deref())
        .map_err(|e| SpecError::new("private_key_file", e.to_string()))?;
    Ok(Some(SigningKeySpec { file, alg: Some(key.alg()), kid: key.kid().map(str::to_string) }))
}

fn client_cert(p: &ProviderConfig, auth: ClientAuth, cx: &mut Cx) -> Result<Option<ClientCertSpec>, SpecError> {
    let (cert, key) = match (&p.client_cert_file, &p.client_key_file) {
        (Some(c), Some(k)) => (c, k),
        (None, None) => {
            if auth.is_mtls() {
                return Err(SpecError::new(
                    "client_cert_file",
                    format!("is required with `client_auth = \"{}\"` (with `client_key_file`)", auth.as_str()),
                ));
            }
            if p.upstream_client_cert == Some(true) {
                return Err(SpecError::new("upstream_client_cert", "needs `client_cert_file` and `client_key_file`"));
            }
            return Ok(None);
        }
        (Some(_), None) => return Err(SpecError::new("client_key_file", "is required with `client_cert_file`")),
        (None, Some(_)) => return Err(SpecError::new("client_cert_file", "is required with `client_key_file`")),
    };
    let (cert_file, cert_pem) = key_file("client_cert_file", cert, cx)?;
    let (key_file_, key_pem) = key_file("client_key_file", key, cx)?;
    identity_pem(&cert_pem, &key_pem).map_err(|reason| SpecError::new("client_cert_file", reason))?;
    let x5t =
        leaf_thumbprint(&cert_pem).ok_or_else(|| SpecError::new("client_cert_file", "holds no PEM certificate"))?;
    Ok(Some(ClientCertSpec { cert: cert_file, key: key_file_, x5t, upstream: p.upstream_client_cert.unwrap_or(false) }))
}

/// RFC 8705 section 3.1's `x5t#S256` of the first certificate in a PEM chain.
fn leaf_thumbprint(pem: &[u8]) -> Option<String> {
    use base64::Engine;
    let text = std::str::from_utf8(pem).ok()?;
    let body = text.split("-----BEGIN CERTIFICATE-----").nth(1)?.split("-----END CERTIFICATE-----").next()?;
    let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(der)))
}

/// The client certificate as reqwest takes it: the chain, then the key, in one PEM.
pub(super) fn identity_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<reqwest::Identity, String> {
    let text = String::from_utf8_lossy(cert_pem);
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err("holds no PEM certificate".into());
    }
    let key_text = String::from_utf8_lossy(key_pem);
    if !key_text.contains("PRIVATE KEY-----") {
        return Err("`client_key_file` holds no PEM private key".into());
    }
    let mut pem = zeroize::Zeroizing::new(Vec::with_capacity(cert_pem.len() + key_pem.len() + 1));
    pem.extend_from_slice(cert_pem);
    pem.push(b'\n');
    pem.extend_from_slice(key_pem);
    // reqwest's error text may quote what it failed on; say only what it was.
    reqwest::Identity::from_pem(&pem).map_err(|_| "the certificate and key do not form a usable client identity".into())
}

fn dpop(p: &ProviderConfig, cx: &mut Cx) -> Result<Option<DpopSpec>, SpecError> {
    if p.dpop != Some(true) {
        if p.dpop_key_file.is_some() {
            return Err(SpecError::new("dpop_key_file", "is only used with `dpop = true`"));
        }
        return Ok(None);
    }
    let Some(path) = &p.dpop_key_file else {
        return Ok(Some(DpopSpec { key: Arc::clone(&EPHEMERAL_DPOP_KEY), key_file: None }));
    };
    key_file("dpop_key_file", path, cx)?;
    let key = DpopKey::load(path).map_err(|e| SpecError::new("dpop_key_file", e.to_string()))?;
    Ok(Some(DpopSpec { key: Arc::new(key), key_file: Some(PathBuf::from(path)) }))
}
