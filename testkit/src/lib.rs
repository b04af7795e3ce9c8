//! Test doubles that speak real HTTP on loopback, for tollgate's integration tests: an
//! OAuth2 token endpoint (RFC 6749 form bodies and seed 002's JSON bodies, with failure
//! modes and rotating refresh tokens), doubles of the seed systems, and an upstream that
//! records what it received and accepts only tokens the token endpoint issued.
//!
//! A dev-only crate of the workspace (`publish = false`): it is never compiled into the
//! tollgate library or binary, and it does not depend on tollgate, so a double cannot
//! share a mistake with the client it tests. (`tollgate demo` has its own, much smaller
//! double in `src/demo/`.)

pub mod idp;
pub mod keys;
pub mod op;
pub mod seeds;
pub mod upstream;
pub mod verifier;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Tokens issued by a token-endpoint double, shared with the upstream double so that
/// the upstream can tell a current token from an expired or invented one.
#[derive(Clone, Default)]
pub struct Ledger(Arc<Mutex<HashMap<String, Option<Instant>>>>);

impl Ledger {
    pub fn issue(&self, token: &str, expires: Option<Instant>) {
        self.lock().insert(token.to_string(), expires);
    }

    /// `Ok` for a current token; `Err` says why not.
    pub fn check(&self, token: &str) -> Result<(), &'static str> {
        match self.lock().get(token) {
            None => Err("unknown token"),
            Some(Some(exp)) if Instant::now() >= *exp => Err("expired token"),
            Some(_) => Ok(()),
        }
    }

    pub fn revoke(&self, token: &str) {
        self.lock().remove(token);
    }

    pub fn revoke_all(&self) {
        self.lock().clear();
    }

    /// Every token ever issued (for leak checks).
    pub fn all(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Option<Instant>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Bind an ephemeral loopback port.
pub async fn bind_loopback() -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let a = l.local_addr()?;
    Ok((l, a))
}
