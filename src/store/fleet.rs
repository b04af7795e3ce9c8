//! What a store shared by a fleet of replicas offers beyond compare-and-swap: a lease so
//! that one replica fetches for all, fenced writes so that only the lease holder's result
//! lands, fleet-wide invalidation, shared pending human logins, and a message stream so
//! that replicas learn of each other's writes at once instead of polling.
//!
//! Only a store that several processes reach over the network implements this (Redis);
//! [`super::TokenStore::fleet`] returns `None` for the others, and the driver then runs
//! alone as before.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{StoreError, StoredToken, Version};

/// A held lease: the right to fetch (and write) the token under `key` for the fleet.
/// `fence` is the random value the lease was taken with; only its holder can renew,
/// release or write through it.
#[derive(Clone, PartialEq, Eq)]
pub struct Lease {
    pub key: String,
    pub fence: String,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The fence is not a secret (it guards against mistakes, not attackers), but it
        // has no use in logs either.
        f.debug_struct("Lease").field("key", &self.key).finish_non_exhaustive()
    }
}

/// What replicas tell each other. Every replica receives every message, its own included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetMessage {
    /// The entry under `key` now holds `version` (a CAS save or a fenced write).
    Written { key: String, version: Version },
    /// Generation `version` of `key` was rejected upstream: drop it if you hold it.
    /// Sent whether or not the shared entry still held it (it may have been replaced
    /// already; a replica still serving the old generation must drop it all the same).
    Invalidated { key: String, version: Version },
    /// A human login for `key` was started and awaits its code (see `load_pending`).
    Pending { key: String },
    /// The message stream was lost and is back (Redis restarted, failed over, or was
    /// unreachable, possibly since start-up). Messages may have been missed, and Redis
    /// may have come back empty: reload entries, and write back what only this replica
    /// holds (a human's token).
    Reconnected,
}

#[async_trait::async_trait]
pub trait Fleet: Send + Sync {
    /// Take the lease on `key` for `ttl` if nobody holds it. `Ok(None)`: another replica
    /// holds it (wait for its `Written`).
    async fn try_lease(&self, key: &str, ttl: Duration) -> Result<Option<Lease>, StoreError>;
    /// Extend a held lease to `ttl` from now. `Ok(false)`: it was lost (expired, and
    /// perhaps taken by another replica); stop and do not write.
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError>;
    /// Give the lease up if still held (a lost lease is left to its new holder).
    async fn release(&self, lease: &Lease) -> Result<(), StoreError>;
    /// Write only while `lease` is held (checked in the same script as the write);
    /// `Ok(None)` = lease lost, nothing written. Publishes `Written`.
    async fn save_fenced(&self, key: &str, token: &StoredToken, lease: &Lease) -> Result<Option<Version>, StoreError>;
    /// Delete the entry only if it still holds `version`, and publish `Invalidated`
    /// either way. `Ok(true)` if deleted.
    async fn invalidate(&self, key: &str, version: Version) -> Result<bool, StoreError>;
    /// A pending human login (what the steps before the code extracted, e.g. Etna's
    /// interim token; may be empty), sealed like entries, kept for `ttl`. Publishes `Pending`.
    async fn save_pending(&self, key: &str, vars: &BTreeMap<String, String>, ttl: Duration) -> Result<(), StoreError>;
    async fn load_pending(&self, key: &str) -> Result<Option<BTreeMap<String, String>>, StoreError>;
    async fn clear_pending(&self, key: &str) -> Result<(), StoreError>;
    /// Messages from every replica, including our own; `Reconnected` after the stream
    /// came back. A receiver that lags behind gets `RecvError::Lagged`: treat it as
    /// `Reconnected` (messages were missed).
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<FleetMessage>;
    /// Whether the last operation (or the message stream's last check) reached Redis.
    fn healthy(&self) -> bool;
    /// How long a lease lives unless renewed (`store.lease_ttl`): a holder that dies
    /// mid-fetch blocks the fleet for at most this long.
    fn lease_ttl(&self) -> Duration;
}
