//! What a store shared by a fleet of replicas adds (Redis): a lease that makes one
//! replica fetch for all, writes fenced by that lease, fleet-wide invalidation, shared
//! pending logins and change notifications.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{StoreError, StoredToken, Version};

/// A held refresh lease: the fencing value proves who holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub key: String,
    pub fence: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetMessage {
    Written { key: String, version: Version },
    Invalidated { key: String, version: Version },
    Pending { key: String },
    Reconnected,
}

#[async_trait::async_trait]
pub trait Fleet: Send + Sync {
    async fn try_lease(&self, key: &str, ttl: Duration) -> Result<Option<Lease>, StoreError>;
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError>;
    async fn release(&self, lease: &Lease) -> Result<(), StoreError>;
    async fn save_fenced(&self, key: &str, token: &StoredToken, lease: &Lease) -> Result<Option<Version>, StoreError>;
    async fn invalidate(&self, key: &str, version: Version) -> Result<bool, StoreError>;
    async fn save_pending(&self, key: &str, vars: &BTreeMap<String, String>, ttl: Duration) -> Result<(), StoreError>;
    async fn load_pending(&self, key: &str) -> Result<Option<BTreeMap<String, String>>, StoreError>;
    async fn clear_pending(&self, key: &str) -> Result<(), StoreError>;
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<FleetMessage>;
    fn healthy(&self) -> bool;
    /// How long a lease lives unless renewed: a holder that dies mid-fetch blocks the
    /// fleet for at most this long.
    fn lease_ttl(&self) -> Duration {
        Duration::from_secs(10)
    }
}
