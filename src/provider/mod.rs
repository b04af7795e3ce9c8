//! Token sources: the things that know how to obtain and renew a token from an IdP.
//! The refresher drives them; they never touch the proxy or the token cell directly.

pub mod error;
pub mod oauth2;
pub(crate) mod response;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::config::{ProviderSpec, Secret, SourceSpec};
pub use error::{ErrorClass, FetchError};

/// What an IdP returned, before tollgate decides the expiry.
#[derive(Debug, Clone)]
pub struct TokenSet {
    pub access_token: Secret,
    /// The raw `expires_in` value, if the response carried one.
    pub expires_in: Option<serde_json::Value>,
    pub refresh_token: Option<Secret>,
    pub scope: Option<String>,
    /// Non-secret fields surfaced in the admin API (e.g. Thrill-ID's `access_to`).
    pub extras: BTreeMap<String, String>,
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
}

/// Build the source a provider spec describes.
pub fn build(spec: &ProviderSpec) -> Result<Arc<dyn TokenSource>, FetchError> {
    match &spec.source {
        SourceSpec::OAuth2(o) => Ok(Arc::new(oauth2::OAuth2Source::new(o.clone(), &spec.http)?)),
    }
}
