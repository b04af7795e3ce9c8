//! Where tokens outlive the process. A token obtained with a human's one-time code must
//! survive a restart (or a `kill -9`), or the human is asked again; other tokens are
//! stored too, so a restart costs no token request while the old one is still valid.

mod file;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::StoreSettings;
pub use file::FileStore;

/// One provider's token as stored. Values are secrets: the file is mode 0600.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredToken {
    /// The provider's identity when the token was obtained (see `ProviderSpec::fingerprint`).
    pub fingerprint: String,
    pub token: String,
    /// Unix seconds.
    pub issued_at: u64,
    /// Unix seconds; `None`: never expires.
    pub expires_at: Option<u64>,
    #[serde(default)]
    pub scope: Option<String>,
    /// What the flow extracted (refresh token, Thrill-ID's org_id, …).
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    #[serde(default)]
    pub extras: BTreeMap<String, String>,
}

impl std::fmt::Debug for StoredToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredToken")
            .field("fingerprint", &self.fingerprint)
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl Drop for StoredToken {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.token.zeroize();
        for v in self.vars.values_mut() {
            v.zeroize();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("token store `{path}`: {reason}")]
    Io { path: PathBuf, reason: String },
    /// Refusing to overwrite what we cannot read: it may be another program's file, or
    /// a store a human needs to inspect.
    #[error("token store `{path}` is not a tollgate token store ({reason}); move it away or set `store.path`")]
    Foreign { path: PathBuf, reason: String },
}

/// Per-entry version for compare-and-swap. 0 means "no entry".
pub type Version = u64;

pub struct Loaded {
    pub token: StoredToken,
    pub version: Version,
}

pub enum Saved {
    Written(Version),
    Conflict(Option<Loaded>),
}

#[async_trait::async_trait]
pub trait TokenStore: Send + Sync {
    async fn load(&self, key: &str) -> Result<Option<Loaded>, StoreError>;
    async fn save(&self, key: &str, token: &StoredToken, expected: Version) -> Result<Saved, StoreError>;
    async fn remove(&self, key: &str, expected: Version) -> Result<bool, StoreError>;
    fn set_live(&self, keys: std::collections::BTreeSet<String>);
    fn describe(&self) -> String;
}

/// TEMPORARY (replaced by the store branch).
pub struct MemoryStore;

#[async_trait::async_trait]
impl TokenStore for MemoryStore {
    async fn load(&self, _: &str) -> Result<Option<Loaded>, StoreError> {
        Ok(None)
    }
    async fn save(&self, _: &str, _: &StoredToken, e: Version) -> Result<Saved, StoreError> {
        Ok(Saved::Written(e + 1))
    }
    async fn remove(&self, _: &str, _: Version) -> Result<bool, StoreError> {
        Ok(true)
    }
    fn set_live(&self, _: std::collections::BTreeSet<String>) {}
    fn describe(&self) -> String {
        "memory".into()
    }
}

/// Open the configured store. A corrupt or foreign file is an error naming the path.
pub fn open(settings: &StoreSettings) -> Result<Arc<dyn TokenStore>, StoreError> {
    Ok(match settings {
        StoreSettings::Memory => Arc::new(MemoryStore),
        StoreSettings::File(path) => Arc::new(FileStore::open(path.clone())?),
    })
}
