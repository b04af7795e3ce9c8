//! Providers: the things that know how to obtain and renew a token from an IdP.
//!
//! [`kinds`] validates a `[providers.<name>]` table of the file schema
//! ([`crate::schema::ProviderConfig`]) per kind into a [`ProviderSpec`] (each kind in its
//! own module: keys, validation, identity, construction); [`build`] turns a spec into a
//! [`TokenSource`], which the refresher drives. Sources never touch the proxy or the token cell directly. Nothing here
//! imports `config`: config validation calls into this module, not the other way round.

pub mod error;
pub mod kinds;
pub(crate) mod response;
pub mod spec;
pub mod steps;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

pub use error::{ErrorClass, FetchError};
pub use spec::{EgressProxy, HttpClientSpec, ProviderKind, ProviderSpec, SourceSpec, Timing};

use crate::secret::Secret;
use crate::template::Vars;

/// What an IdP returned, before tollgate decides the expiry.
#[derive(Debug, Clone)]
pub struct TokenSet {
    pub access_token: Secret,
    /// The raw `expires_in` value, if the response carried one.
    pub expires_in: Option<serde_json::Value>,
    pub refresh_token: Option<Secret>,
    pub scope: Option<String>,
    /// Non-secret fields surfaced in the admin API (e.g. Thrill-ID's `access_to.org_id`).
    pub extras: BTreeMap<String, String>,
    /// Everything the flow extracted (secret): what a refresh flow, upstream headers and
    /// the token store need.
    pub vars: Vars,
}

#[async_trait]
pub trait TokenSource: Send + Sync {
    /// Obtain a token from scratch (the configured grant).
    async fn acquire(&self) -> Result<TokenSet, FetchError>;

    /// Renew using what the previous response gave us (a refresh token). Sources without
    /// a refresh flow re-acquire.
    async fn refresh(&self, previous: &TokenSet) -> Result<TokenSet, FetchError> {
        let _ = previous;
        self.acquire().await
    }

    /// Whether `refresh` can use `previous` at all.
    fn can_refresh(&self, previous: &TokenSet) -> bool {
        let _ = previous;
        false
    }

    /// Whether `acquire` works without a human (false: only a login produces a token).
    fn can_acquire(&self) -> bool {
        true
    }

    /// Whether the provider has a human login flow (an OTP or 2FA code).
    fn has_login(&self) -> bool {
        false
    }

    /// Run the login steps before the code (e.g. have the IdP send an OTP). Returns what
    /// those steps extracted, to be handed back to [`TokenSource::login_complete`].
    async fn login_start(&self) -> Result<Vars, FetchError> {
        Err(FetchError::new(ErrorClass::Rejected, "this provider has no login flow"))
    }

    /// Finish the login with the human-supplied code.
    async fn login_complete(&self, pending: &Vars, code: &Secret) -> Result<TokenSet, FetchError> {
        let _ = (pending, code);
        Err(FetchError::new(ErrorClass::Rejected, "this provider has no login flow"))
    }

    /// Config values (params and secrets) templates may refer to, for upstream headers.
    fn config_vars(&self) -> Option<&Vars> {
        None
    }

    /// The key DPoP-bound tokens of this source are bound to (RFC 9449), which proves
    /// possession on every proxied request.
    fn dpop_key(&self) -> Option<Arc<crate::jose::dpop::DpopKey>> {
        None
    }
}

/// Build the source a provider spec describes.
pub fn build(spec: &ProviderSpec) -> Result<Arc<dyn TokenSource>, FetchError> {
    match &spec.source {
        SourceSpec::OAuth2(o) => Ok(Arc::new(kinds::oauth2::OAuth2Source::new(o.clone(), &spec.http)?)),
        SourceSpec::Http(h) => Ok(Arc::new(steps::HttpFlowSource::new(h.clone(), &spec.http)?)),
    }
}
