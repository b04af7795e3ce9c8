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

pub trait TokenStore: Send + Sync {
    fn load(&self, provider: &str) -> Option<StoredToken>;
    fn save(&self, provider: &str, token: StoredToken) -> Result<(), StoreError>;
    fn remove(&self, provider: &str) -> Result<(), StoreError>;
    fn describe(&self) -> String;
}

/// Tokens live only as long as the process.
pub struct MemoryStore;

impl TokenStore for MemoryStore {
    fn load(&self, _: &str) -> Option<StoredToken> {
        None
    }
    fn save(&self, _: &str, _: StoredToken) -> Result<(), StoreError> {
        Ok(())
    }
    fn remove(&self, _: &str) -> Result<(), StoreError> {
        Ok(())
    }
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
