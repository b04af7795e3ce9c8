//! Starts the real OpenID Provider of `testkit/op` (node `oidc-provider`, pinned) on
//! loopback for one test, and reads back what it saw.
//!
//! The provider runs as a child process that exits when its stdin closes, so a test that
//! panics or is killed does not leave it behind; [`Op`]'s `Drop` also kills it.
//! Install its packages with `scripts/setup` (or `npm ci --prefix testkit/op`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::keys::{TestCa, TestCert};

/// Why the provider did not start.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("testkit/op/node_modules is missing: run scripts/setup (npm ci --prefix testkit/op)")]
    NotInstalled,
    #[error("cannot start node: {0}")]
    Spawn(std::io::Error),
    #[error("writing the provider's files: {0}")]
    Files(std::io::Error),
    #[error("the provider did not get ready within 20 s ({0}); its stderr: {1}")]
    NotReady(String, String),
}

/// The provider's configuration. `Default` gives one accepted resource
/// (`https://api.test/`, also the default), scope `read write`, 300 s tokens, ES256,
/// no clients, no TLS and no trusted issuers.
#[derive(Clone)]
pub struct OpConfig {
    /// Client registrations, passed to oidc-provider as they are. At least `client_id`,
    /// `token_endpoint_auth_method` and `grant_types`; plus `client_secret`, `jwks`
    /// (inline, for `private_key_jwt` and `self_signed_tls_client_auth`),
    /// `tls_client_auth_subject_dn`, `dpop_bound_access_tokens`,
    /// `tls_client_certificate_bound_access_tokens`, `scope`. [`client`] builds the
    /// common shape.
    pub clients: Vec<Value>,
    /// Accepted RFC 8707 resource indicators; a request for another one is answered
    /// `invalid_target`. The issued JWT's `aud` is the resource.
    pub resources: Vec<String>,
    /// The resource (and so `aud`) when a request names none. Without it, a request
    /// without `resource` gets an opaque token that the [`crate::verifier`] cannot check.
    pub default_resource: Option<String>,
    /// Space-separated scopes every resource server allows; a token's `scope` is the
    /// requested scopes that are in here.
    pub resource_scope: String,
    /// Lifetime of access tokens (`expires_in` and the JWT's `exp`), seconds (>= 1).
    pub access_token_ttl: u64,
    /// JWS algorithm of access tokens: `ES256`, `RS256`, `PS256` or `EdDSA`.
    pub access_token_alg: String,
    /// Demand a DPoP nonce in every proof at the token endpoint (answered 400
    /// `use_dpop_nonce` with a `DPoP-Nonce` header otherwise). DPoP itself is always on.
    pub dpop_require_nonce: bool,
    /// An HTTPS listener for mTLS (advertised as `mtls_endpoint_aliases.token_endpoint`);
    /// enables `tls_client_auth`, `self_signed_tls_client_auth` and certificate-bound
    /// tokens. `None`: HTTP only.
    pub tls: Option<OpTls>,
    /// Issuers whose JWTs are accepted as jwt-bearer assertions and token-exchange
    /// subject/actor tokens.
    pub trusted_issuers: Vec<TrustedIssuer>,
    /// `token_endpoint_auth_methods_supported` to advertise and allow; `None`: all of
    /// client_secret_basic, client_secret_post, client_secret_jwt, private_key_jwt, none
    /// (and the two TLS methods when `tls` is set).
    pub client_auth_methods: Option<Vec<String>>,
}

impl Default for OpConfig {
    fn default() -> Self {
        OpConfig {
            clients: Vec::new(),
            resources: vec![DEFAULT_RESOURCE.into()],
            default_resource: Some(DEFAULT_RESOURCE.into()),
            resource_scope: "read write".into(),
            access_token_ttl: 300,
            access_token_alg: "ES256".into(),
            dpop_require_nonce: false,
            tls: None,
            trusted_issuers: Vec::new(),
            client_auth_methods: None,
        }
    }
}

/// The resource (and token `aud`) of [`OpConfig::default`].
pub const DEFAULT_RESOURCE: &str = "https://api.test/";

impl std::fmt::Debug for OpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Client registrations hold secrets: only their ids.
        let ids: Vec<&str> = self.clients.iter().filter_map(|c| c["client_id"].as_str()).collect();
        f.debug_struct("OpConfig")
            .field("clients", &ids)
            .field("resources", &self.resources)
            .field("default_resource", &self.default_resource)
            .field("access_token_ttl", &self.access_token_ttl)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl OpConfig {
    /// Adds a client registration (see [`client`]).
    pub fn with_client(mut self, client: Value) -> Self {
        self.clients.push(client);
        self
    }
}

/// A client registration for the client credentials grant and the two extra grants:
/// `{client_id, token_endpoint_auth_method, grant_types: [client_credentials, jwt-bearer,
/// token-exchange], redirect_uris: [], response_types: []}`; add `client_secret`, `jwks`,
/// `tls_client_auth_subject_dn`, `dpop_bound_access_tokens`… to the returned object.
pub fn client(client_id: &str, auth_method: &str) -> Value {
    json!({
        "client_id": client_id,
        "token_endpoint_auth_method": auth_method,
        "grant_types": [
            "client_credentials",
            "urn:ietf:params:oauth:grant-type:jwt-bearer",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ],
        "redirect_uris": [],
        "response_types": [],
    })
}

/// The HTTPS listener's certificate, and the CA its client certificates must chain to
/// for `tls_client_auth` (`self_signed_tls_client_auth` needs none).
#[derive(Clone)]
pub struct OpTls {
    /// Server certificate for 127.0.0.1, PEM (chain allowed).
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// CA certificates trusted for client certificates, PEM.
    pub client_ca_pem: Option<String>,
}

impl OpTls {
    /// A server certificate for 127.0.0.1 issued by `ca`, and `ca` as the client CA: trust
    /// `ca.cert_pem` towards the provider and use `ca.client_cert(..)` as client identity.
    pub fn issued_by(ca: &TestCa) -> OpTls {
        let server: TestCert = ca.server_cert(&["127.0.0.1"]);
        OpTls { cert_pem: server.cert_pem, key_pem: server.key_pem, client_ca_pem: Some(ca.cert_pem.clone()) }
    }
}

/// An issuer of JWTs (think a Kubernetes service-account token issuer) the provider
/// trusts for jwt-bearer assertions and token-exchange subject and actor tokens.
#[derive(Clone, Debug, Serialize)]
pub struct TrustedIssuer {
    /// The `iss` its tokens carry.
    pub issuer: String,
    /// The `aud` its tokens must carry. `None`: the provider's issuer or token endpoint
    /// (what RFC 7523 section 3 asks of an assertion).
    pub audience: Option<String>,
    /// Its public keys, a JWK set (`TestKey::jwks()`).
    pub jwks: Value,
}

#[derive(Serialize)]
struct NodeTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
}

#[derive(Serialize)]
struct NodeConfig<'a> {
    clients: &'a [Value],
    resources: &'a [String],
    default_resource: &'a Option<String>,
    resource_scope: &'a str,
    access_token_ttl: u64,
    access_token_alg: &'a str,
    dpop_require_nonce: bool,
    tls: Option<NodeTls>,
    trusted_issuers: &'a [TrustedIssuer],
    client_auth_methods: &'a Option<Vec<String>>,
}

/// A running OpenID Provider. Killed on drop.
pub struct Op {
    child: Child,
    issuer: String,
    mtls: Option<String>,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Op").field("issuer", &self.issuer).field("mtls", &self.mtls).finish()
    }
}

/// The directory of the node package (`testkit/op`).
pub fn package_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("op")
}

impl Op {
    /// Starts the provider; panics with the reason (and the provider's stderr) if it
    /// cannot, since a test cannot go on without it.
    pub async fn start(cfg: OpConfig) -> Op {
        match Op::try_start(cfg).await {
            Ok(op) => op,
            Err(e) => panic!("OpenID Provider double: {e}"),
        }
    }

    pub async fn try_start(cfg: OpConfig) -> Result<Op, OpError> {
        let pkg = package_dir();
        if !pkg.join("node_modules").join("oidc-provider").is_dir() {
            return Err(OpError::NotInstalled);
        }
        let dir = tempfile::Builder::new().prefix("tollgate-op").tempdir().map_err(OpError::Files)?;
        let tls = match &cfg.tls {
            None => None,
            Some(t) => {
                let write = |name: &str, s: &str| -> Result<PathBuf, OpError> {
                    let p = dir.path().join(name);
                    std::fs::write(&p, s).map_err(OpError::Files)?;
                    Ok(p)
                };
                Some(NodeTls {
                    cert_file: write("server.crt", &t.cert_pem)?,
                    key_file: write("server.key", &t.key_pem)?,
                    client_ca_file: t.client_ca_pem.as_deref().map(|c| write("client-ca.crt", c)).transpose()?,
                })
            }
        };
        let node_cfg = NodeConfig {
            clients: &cfg.clients,
            resources: &cfg.resources,
            default_resource: &cfg.default_resource,
            resource_scope: &cfg.resource_scope,
            access_token_ttl: cfg.access_token_ttl.max(1),
            access_token_alg: &cfg.access_token_alg,
            dpop_require_nonce: cfg.dpop_require_nonce,
            tls,
            trusted_issuers: &cfg.trusted_issuers,
            client_auth_methods: &cfg.client_auth_methods,
        };
        let cfg_path = dir.path().join("config.json");
        let body = serde_json::to_vec(&node_cfg).map_err(|e| OpError::Files(e.into()))?;
        std::fs::write(&cfg_path, body).map_err(OpError::Files)?;
        let stderr_path = dir.path().join("stderr.log");
        let stderr = std::fs::File::create(&stderr_path).map_err(OpError::Files)?;

        let mut child = Command::new("node")
            .arg(pkg.join("server.mjs"))
            .arg(&cfg_path)
            .current_dir(&pkg)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true)
            .spawn()
            .map_err(OpError::Spawn)?;

        let stderr_text = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
        let Some(stdout) = child.stdout.take() else {
            return Err(OpError::NotReady("no stdout".into(), stderr_text()));
        };
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await;
        let line = match ready {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => return Err(OpError::NotReady("it exited".into(), stderr_text())),
            Ok(Err(e)) => return Err(OpError::NotReady(e.to_string(), stderr_text())),
            Err(_) => return Err(OpError::NotReady("timed out".into(), stderr_text())),
        };
        let v: Value = serde_json::from_str(&line)
            .map_err(|_| OpError::NotReady("an unreadable ready line".into(), stderr_text()))?;
        let Some(issuer) = v["issuer"].as_str().map(str::to_string) else {
            return Err(OpError::NotReady("no issuer in the ready line".into(), stderr_text()));
        };
        let mtls = v["mtls"].as_str().map(str::to_string);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| OpError::NotReady(e.to_string(), String::new()))?;
        Ok(Op { child, issuer, mtls, dir, http })
    }

    /// `http://127.0.0.1:<port>`: the issuer, and the base of discovery.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// `<issuer>/token`.
    pub fn token_endpoint(&self) -> String {
        format!("{}/token", self.issuer)
    }

    /// `<issuer>/jwks`.
    pub fn jwks_uri(&self) -> String {
        format!("{}/jwks", self.issuer)
    }

    /// `https://127.0.0.1:<port>` of the mTLS listener, when TLS is configured.
    pub fn mtls_url(&self) -> Option<&str> {
        self.mtls.as_deref()
    }

    /// `<mtls_url>/token`: the advertised `mtls_endpoint_aliases.token_endpoint`.
    pub fn mtls_token_endpoint(&self) -> Option<String> {
        self.mtls.as_ref().map(|m| format!("{m}/token"))
    }

    /// The provider's stderr so far (oidc-provider's warnings, server errors).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Every token request the provider received, in order (see the crate docs of
    /// `testkit/op/server.mjs`, or [`TokenRequest`] for the fields).
    pub async fn log(&self) -> Vec<Value> {
        let url = format!("{}/__test/log", self.issuer);
        match self.http.get(&url).send().await {
            Ok(r) => r.json::<Vec<Value>>().await.unwrap_or_else(|e| panic!("OP log unreadable: {e}")),
            Err(e) => panic!("OP log unreachable: {e}"),
        }
    }

    /// [`Op::log`], typed.
    pub async fn token_requests(&self) -> Vec<TokenRequest> {
        self.log().await.into_iter().map(TokenRequest).collect()
    }

    /// Forgets the log.
    pub async fn clear_log(&self) {
        let url = format!("{}/__test/log", self.issuer);
        if let Err(e) = self.http.delete(&url).send().await {
            panic!("OP log unreachable: {e}");
        }
    }

    /// The next `count` token requests are answered `status` with an RFC 6749 error
    /// body (`temporarily_unavailable` for 5xx, `invalid_request` for 4xx); they are
    /// logged with `injected: true`. `count` 0 ends it.
    pub async fn fail(&self, status: u16, count: u32) {
        self.fail_with(status, count, None).await;
    }

    /// [`Op::fail`] with this `error` code in the body (e.g. `invalid_grant`).
    pub async fn fail_with(&self, status: u16, count: u32, error: Option<&str>) {
        let mut url = format!("{}/__test/fail?status={status}&count={count}", self.issuer);
        if let Some(e) = error {
            url.push_str(&format!("&error={e}"));
        }
        match self.http.post(&url).send().await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => panic!("OP refused the failure injection: {}", r.status()),
            Err(e) => panic!("OP unreachable: {e}"),
        }
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        // kill_on_drop would do it too; this makes it immediate and reaps when it can.
        let _ = self.child.start_kill();
        let _ = self.child.try_wait();
    }
}

/// One record of [`Op::log`], with accessors for the common questions. The raw JSON is
/// `.0`; every field is always present (`null` or `[]` when not applicable).
#[derive(Clone, Debug)]
pub struct TokenRequest(pub Value);

impl TokenRequest {
    fn s(&self, k: &str) -> Option<&str> {
        self.0.get(k).and_then(Value::as_str)
    }

    pub fn grant_type(&self) -> Option<&str> {
        self.s("grant_type")
    }

    pub fn client_id(&self) -> Option<&str> {
        self.s("client_id")
    }

    /// How the client authenticated in this request: `client_secret_basic`,
    /// `client_secret_post`, `client_secret_jwt`, `private_key_jwt`, `tls_client_auth`,
    /// `self_signed_tls_client_auth` or `none`.
    pub fn client_auth(&self) -> Option<&str> {
        self.s("client_auth")
    }

    pub fn status(&self) -> u16 {
        self.0["status"].as_u64().unwrap_or(0) as u16
    }

    pub fn ok(&self) -> bool {
        self.status() == 200
    }

    pub fn injected(&self) -> bool {
        self.0["injected"].as_bool().unwrap_or(false)
    }

    /// The `resource` parameters sent (not the defaulted one).
    pub fn resources(&self) -> Vec<String> {
        strings(&self.0["resource"])
    }

    pub fn audiences(&self) -> Vec<String> {
        strings(&self.0["audience"])
    }

    /// The client assertion's `jti`.
    pub fn assertion_jti(&self) -> Option<&str> {
        self.0["client_assertion"]["jti"].as_str()
    }

    /// The jwt-bearer `assertion`'s `sub`, or the token exchange `subject_token`'s.
    pub fn subject(&self) -> Option<&str> {
        self.0["assertion"]["sub"].as_str().or_else(|| self.0["subject_token"]["sub"].as_str())
    }

    /// The DPoP proof's `jti`, if a proof came.
    pub fn dpop_jti(&self) -> Option<&str> {
        self.0["dpop"]["jti"].as_str()
    }

    pub fn dpop_nonce(&self) -> Option<&str> {
        self.0["dpop"]["nonce"].as_str()
    }

    /// The DPoP proof key's RFC 7638 thumbprint.
    pub fn dpop_jkt(&self) -> Option<&str> {
        self.0["dpop"]["jkt"].as_str()
    }

    /// The issued access token's `aud`.
    pub fn issued_aud(&self) -> Option<&Value> {
        self.0["issued"].get("aud")
    }

    /// The issued access token's `cnf.jkt`.
    pub fn issued_jkt(&self) -> Option<&str> {
        self.0["issued"]["cnf"]["jkt"].as_str()
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()).unwrap_or_default()
}
