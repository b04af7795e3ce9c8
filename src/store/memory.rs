//! The memory store: tokens live only as long as the process. It keeps the same
//! compare-and-swap rules as the shared stores, so the refresher behaves the same
//! whatever store is configured (a retired provider racing its replacement loses here too).

use std::collections::BTreeSet;
use std::sync::Mutex;

use super::entries::{self, Entries};
use super::{Loaded, Saved, StoreError, StoredToken, TokenStore, Version};

#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    entries: Entries,
    /// `None` until the first `set_live`: purge nothing before we know what is in use.
    live: Option<BTreeSet<String>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The map is consistent after every statement that changes it; a panic elsewhere
        // while holding the lock leaves nothing half-done.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl TokenStore for MemoryStore {
    async fn load(&self, key: &str) -> Result<Option<Loaded>, StoreError> {
        Ok(entries::load(&self.state().entries, key))
    }

    async fn save(&self, key: &str, token: &StoredToken, expected: Version) -> Result<Saved, StoreError> {
        let mut st = self.state();
        let saved = entries::save(&mut st.entries, key, token, expected);
        if matches!(saved, Saved::Written(_)) {
            let State { entries, live } = &mut *st;
            if let Some(live) = live {
                entries::purge(entries, live, key, super::unix_now());
            }
        }
        Ok(saved)
    }

    async fn remove(&self, key: &str, expected: Version) -> Result<bool, StoreError> {
        Ok(entries::remove(&mut self.state().entries, key, expected, super::unix_now()))
    }

    fn set_live(&self, keys: BTreeSet<String>) {
        self.state().live = Some(keys);
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

#[cfg(test)]
mod tests {
    use super::super::entries::tests::tok;
    use super::*;

    #[tokio::test]
    async fn compare_and_swap() {
        let s = MemoryStore::new();
        assert_eq!(s.load("k").await.unwrap(), None);
        assert_eq!(s.save("k", &tok("a"), 0).await.unwrap(), Saved::Written(1));
        assert_eq!(s.save("k", &tok("b"), 1).await.unwrap(), Saved::Written(2));
        // A writer that loaded version 1 lost the race: it is told what is there now.
        assert_eq!(
            s.save("k", &tok("stale"), 1).await.unwrap(),
            Saved::Conflict(Some(Loaded { token: tok("b"), version: 2 }))
        );
        assert_eq!(
            s.save("k", &tok("dup"), 0).await.unwrap(),
            Saved::Conflict(Some(Loaded { token: tok("b"), version: 2 }))
        );
        assert!(!s.remove("k", 1).await.unwrap());
        assert_eq!(s.load("k").await.unwrap(), Some(Loaded { token: tok("b"), version: 2 }));
        assert!(s.remove("k", 2).await.unwrap());
        assert_eq!(s.load("k").await.unwrap(), None);
        assert!(!s.remove("k", 2).await.unwrap(), "absent");
        assert_eq!(s.save("k", &tok("c"), 2).await.unwrap(), Saved::Conflict(None));
        assert_eq!(s.save("k", &tok("c"), 0).await.unwrap(), Saved::Written(3), "versions never go back");
    }

    #[tokio::test]
    async fn purges_dead_entries_of_other_providers_on_save() {
        let s = MemoryStore::new();
        let mut dead = tok("dead");
        dead.expires_at = Some(1);
        assert_eq!(s.save("gone", &dead, 0).await.unwrap(), Saved::Written(1));
        // Before the live set is known nothing is purged.
        assert_eq!(s.save("a", &tok("a"), 0).await.unwrap(), Saved::Written(1));
        assert!(s.load("gone").await.unwrap().is_some());
        s.set_live(["a".to_string()].into());
        assert_eq!(s.save("a", &tok("a2"), 1).await.unwrap(), Saved::Written(2));
        assert_eq!(s.load("gone").await.unwrap(), None);
    }
}
