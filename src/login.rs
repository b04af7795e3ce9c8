//! `tollgate login <provider>`: complete a human step (an OTP, a 2FA code) against a
//! running tollgate through its admin API, from a terminal or a script.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// The provider to log in.
    pub provider: String,
    /// The running instance's admin API.
    #[arg(long, env = "TOLLGATE_ADMIN_URL", default_value = "http://127.0.0.1:9090")]
    pub admin_url: String,
    /// The admin bearer token, if the instance has one.
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Read the admin token from this file instead.
    #[arg(long, conflicts_with = "admin_token")]
    pub admin_token_file: Option<PathBuf>,
    /// Deliver this code without starting a new login (`-` reads it from stdin).
    #[arg(long)]
    pub code: Option<String>,
    /// Only start the login (e.g. have the OTP sent); deliver the code later with --code.
    #[arg(long, conflicts_with = "code")]
    pub start_only: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach the admin API at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("{step} failed ({status}): {message}")]
    Refused { step: &'static str, status: u16, message: String },
}

pub fn run(args: LoginArgs) -> Result<(), LoginError> {
    let token = match (&args.admin_token, &args.admin_token_file) {
        (Some(t), _) => Some(t.trim().to_string()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| {
                    LoginError::Usage(format!("cannot read --admin-token-file {}: {}", f.display(), e.kind()))
                })?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| LoginError::Usage(format!("cannot start a runtime: {e}")))?;
    rt.block_on(async move {
        let client = admin_client()?;
        let base = args.admin_url.trim_end_matches('/');
        let provider = &args.provider;
        let post = |path: String, body: Option<String>| {
            let mut req = client.post(format!("{base}{path}"));
            if let Some(t) = &token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = body {
                req = req.header("content-type", "application/json").body(b);
            }
            req
        };
        let code = match &args.code {
            Some(c) if c == "-" => Some(read_code(false)?),
            Some(c) => Some(c.clone()),
            None => {
                let resp = call(post(format!("/admin/providers/{provider}/login"), None), base, "login start").await?;
                eprintln!("{}", resp.get("message").and_then(Value::as_str).unwrap_or("login started"));
                if args.start_only {
                    return Ok(());
                }
                Some(read_code(true)?)
            }
        };
        let Some(code) = code else { return Ok(()) };
        let body = serde_json::json!({ "code": code }).to_string();
        let resp = call(post(format!("/admin/providers/{provider}/login/code"), Some(body)), base, "code").await?;
        let state = resp.get("state").and_then(Value::as_str).unwrap_or("?");
        let expires = resp.pointer("/token/expires_at").and_then(Value::as_str).unwrap_or("never");
        println!("provider {provider}: {state}; token expires {expires}");
        Ok(())
    })
}

/// The client for the admin API. It carries the admin token and a human's one-time code,
/// so it never goes through a proxy, whatever `HTTPS_PROXY`, `HTTP_PROXY` or `ALL_PROXY`
/// say: the admin API is the operator's own instance, reached directly. Redirects are not
/// followed either (a 307 would resend the code elsewhere).
fn admin_client() -> Result<reqwest::Client, LoginError> {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(90))
        .build()
        .map_err(|e| LoginError::Usage(format!("cannot build the HTTP client: {e}")))
}

async fn call(req: reqwest::RequestBuilder, url: &str, step: &'static str) -> Result<Value, LoginError> {
    let resp = req
        .send()
        .await
        .map_err(|e| LoginError::Unreachable { url: url.into(), reason: e.without_url().to_string() })?;
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if !(200..300).contains(&status) {
        let message = body.get("message").and_then(Value::as_str).unwrap_or("no details").to_string();
        return Err(LoginError::Refused { step, status, message });
    }
    Ok(body)
}

/// Read the code from the terminal (with a prompt) or from stdin (one line).
fn read_code(prompt: bool) -> Result<String, LoginError> {
    let stdin = std::io::stdin();
    if prompt && stdin.is_terminal() {
        eprint!("Enter the code: ");
        let _ = std::io::stderr().flush();
    }
    let mut line = String::new();
    stdin.lock().read_line(&mut line).map_err(|e| LoginError::Usage(format!("cannot read the code: {e}")))?;
    let code = line.trim().to_string();
    if code.is_empty() {
        return Err(LoginError::Usage("no code given".into()));
    }
    Ok(code)
}
