//! Where tokens outlive the process. A token obtained with a human's one-time code must
//! survive a restart (or a `kill -9`), or the human is asked again; other tokens are
//! stored too, so a restart costs no token request while the old one is still valid.
//!
//! Several processes may share one store (a rolling update, two containers on one
//! volume), so every entry carries a version and every write is a compare-and-swap on
//! it: a writer that lost a race is told what the entry holds now and decides again,
//! instead of silently overwriting a newer token (with rotating refresh tokens, that
//! would put a spent refresh token back and end a human's session).

mod entries;
mod file;
pub mod fleet;
mod memory;
pub mod redis;
pub mod seal;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use self::redis::RedisStore;
use crate::config::StoreSettings;
pub use entries::PURGE_AFTER;
pub use file::FileStore;
pub use fleet::{Fleet, FleetMessage, Lease};
pub use memory::MemoryStore;

/// Per-entry version for compare-and-swap. 0 means "no entry".
pub type Version = u64;

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

/// An entry as loaded: the token and the version to pass back to `save` or `remove`.
#[derive(Clone, Debug, PartialEq)]
pub struct Loaded {
    pub token: StoredToken,
    pub version: Version,
}

/// The outcome of a compare-and-swap write.
#[derive(Clone, Debug, PartialEq)]
pub enum Saved {
    /// Written; the entry's new version.
    Written(Version),
    /// The entry was not at `expected`: here is what it holds now (None: absent).
    Conflict(Option<Loaded>),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("token store `{path}`: {reason}")]
    Io { path: PathBuf, reason: String },
    /// Refusing to overwrite what we cannot read: it may be another program's file, or
    /// a store a human needs to inspect.
    #[error("token store `{path}` is not a tollgate token store ({reason}); move it away or set `store.path`")]
    Foreign { path: PathBuf, reason: String },
    /// Another process has held the store's lock for longer than any write takes (it
    /// may be stopped or stuck on a dead disk). Nothing was read or written.
    #[error("token store `{path}`: its lock `{lock}` was not obtained within {secs} s; another process holds it")]
    LockTimeout { path: PathBuf, lock: PathBuf, secs: u64 },
    /// Redis answered with an error or could not be reached. `reason` is the error's
    /// class and code (never a value: no token, no password).
    #[error("redis store {target}: {operation} failed: {reason}")]
    Redis { target: String, operation: &'static str, reason: String },
    /// Redis did not answer within `store.timeout`: a hung or unreachable Redis must not
    /// hold a provider up.
    #[error("redis store {target}: {operation} got no answer within {ms} ms")]
    RedisTimeout { target: String, operation: &'static str, ms: u64 },
    /// The Redis settings cannot work (an unparsable URL, a bad encryption key).
    #[error("redis store: {0}")]
    RedisConfig(String),
}

#[async_trait::async_trait]
pub trait TokenStore: Send + Sync {
    /// The entry stored under `key` (a provider identity hash) and its version.
    async fn load(&self, key: &str) -> Result<Option<Loaded>, StoreError>;
    /// Write `token` under `key` only if the entry is still at `expected` (0 = must be absent).
    async fn save(&self, key: &str, token: &StoredToken, expected: Version) -> Result<Saved, StoreError>;
    /// Remove the entry only if it is still at `expected`; Ok(false) when it was not (conflict or absent).
    async fn remove(&self, key: &str, expected: Version) -> Result<bool, StoreError>;
    /// The keys this process's providers use; entries under other keys may be purged
    /// (see [`PURGE_AFTER`] and `entries::purgeable` for the rule).
    fn set_live(&self, keys: BTreeSet<String>);
    fn describe(&self) -> String;
    /// The fleet operations (lease, fenced write, invalidation, pending logins, messages)
    /// of a store that several replicas share over the network; `None` for the local
    /// stores, whose users each fetch their own tokens.
    fn fleet(&self) -> Option<&dyn Fleet> {
        None
    }
}

/// Open the configured store. A corrupt or foreign file is an error naming the path; the
/// Redis store does not contact Redis here (tollgate starts while Redis is down).
pub fn open(settings: &StoreSettings) -> Result<Arc<dyn TokenStore>, StoreError> {
    Ok(match settings {
        StoreSettings::Memory => Arc::new(MemoryStore::new()),
        StoreSettings::File(path) => Arc::new(FileStore::open(path.clone())?),
        StoreSettings::Redis(redis) => Arc::new(RedisStore::connect(redis.clone())?),
    })
}

/// Unix seconds now, for the purge rule (a clock before 1970 reads as 0 and purges nothing).
fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
