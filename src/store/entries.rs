//! The rules every store applies, on a plain map so that they hold the same for memory,
//! file and (later) Redis and are tested once without IO: compare-and-swap per entry,
//! tombstones for removed entries, and the purge of entries nobody uses any more.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{Loaded, Saved, StoredToken, Version};

/// How long after its expiry an entry of a provider this process does not run is kept
/// even though it still holds a refresh token (and how long a tombstone is kept).
pub const PURGE_AFTER: u64 = 30 * 24 * 3600;

/// One entry as stored. In the file it is the token's own fields plus `rev` (and
/// `removed_at` for a tombstone), so a file written before versions existed still reads:
/// its entries are at version 1.
#[derive(Clone, Serialize, Deserialize)]
pub(super) struct Entry {
    #[serde(flatten)]
    pub token: StoredToken,
    #[serde(rename = "rev", default = "first_version")]
    pub version: Version,
    /// Set on a tombstone: the entry was removed at this unix second. A tombstone keeps
    /// the removed entry's version, so an entry created again continues from it instead
    /// of restarting at 1: a process still holding the old entry's version (say 1, with
    /// a refresh token the IdP has since rejected) cannot then remove or overwrite the
    /// new entry (a human's fresh login) by matching a recycled version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed_at: Option<u64>,
}

fn first_version() -> Version {
    1
}

pub(super) type Entries = BTreeMap<String, Entry>;

impl Entry {
    /// The version a caller must name to change this entry: 0 for a tombstone (absent).
    fn live_version(&self) -> Version {
        if self.removed_at.is_some() {
            0
        } else {
            self.version
        }
    }

    fn tombstone(version: Version, now: u64) -> Entry {
        Entry {
            // Blank but well-formed, so that any reader of the file can parse it.
            token: StoredToken {
                fingerprint: String::new(),
                token: String::new(),
                issued_at: now,
                expires_at: Some(now),
                scope: None,
                vars: BTreeMap::new(),
                extras: BTreeMap::new(),
            },
            version,
            removed_at: Some(now),
        }
    }
}

/// The live entry under `key`, if any.
pub(super) fn load(entries: &Entries, key: &str) -> Option<Loaded> {
    entries.get(key).filter(|e| e.removed_at.is_none()).map(|e| Loaded { token: e.token.clone(), version: e.version })
}

/// Write `token` under `key` if the entry is at `expected` (0: absent or a tombstone).
/// Versions only grow: the new version is one more than the last one the key had.
pub(super) fn save(entries: &mut Entries, key: &str, token: &StoredToken, expected: Version) -> Saved {
    let (current, last) = entries.get(key).map(|e| (e.live_version(), e.version)).unwrap_or((0, 0));
    if current != expected {
        return Saved::Conflict(load(entries, key));
    }
    let version = last.saturating_add(1);
    entries.insert(key.to_string(), Entry { token: token.clone(), version, removed_at: None });
    Saved::Written(version)
}

/// Replace the live entry under `key` by a tombstone if it is at `expected`.
pub(super) fn remove(entries: &mut Entries, key: &str, expected: Version, now: u64) -> bool {
    match entries.get(key) {
        Some(e) if expected != 0 && e.live_version() == expected => {
            entries.insert(key.to_string(), Entry::tombstone(expected, now));
            true
        }
        _ => false,
    }
}

/// Drop the entries that `purgeable` allows, except `keep` (the key being written) and
/// the keys in `live`. Returns how many were dropped.
pub(super) fn purge(entries: &mut Entries, live: &BTreeSet<String>, keep: &str, now: u64) -> usize {
    let before = entries.len();
    entries.retain(|k, e| k == keep || live.contains(k) || !purgeable(e, now));
    before - entries.len()
}

/// Whether an entry that none of *this* process's providers uses may be dropped.
///
/// The rule is conservative because a store may be shared: another process on the same
/// file runs other providers, whose keys this process does not know, so "not live here"
/// does not mean "dead". An entry is therefore only dropped when it is useless to anyone:
/// - expired and holding no refresh token (nobody can use or renew it), or
/// - expired more than [`PURGE_AFTER`] ago even with a refresh token (a process that has
///   not run for that long will have to log in again anyway, most IdPs' refresh tokens
///   having expired by then);
/// - a tombstone removed more than [`PURGE_AFTER`] ago.
///
/// An entry that never expires (`expires_at` None) is never dropped: it may be a token
/// a human obtained once for a provider that is only configured in another process.
pub(super) fn purgeable(e: &Entry, now: u64) -> bool {
    if let Some(removed) = e.removed_at {
        return removed.saturating_add(PURGE_AFTER) < now;
    }
    match e.token.expires_at {
        None => false,
        Some(exp) => {
            let expired = exp <= now;
            let renewable = e.token.vars.contains_key("refresh_token");
            (expired && !renewable) || exp.saturating_add(PURGE_AFTER) < now
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn tok(t: &str) -> StoredToken {
        StoredToken {
            fingerprint: "fp".into(),
            token: t.into(),
            issued_at: 1,
            expires_at: None,
            scope: None,
            vars: Default::default(),
            extras: Default::default(),
        }
    }

    fn expiring(at: u64, refresh: bool) -> Entry {
        let mut token = tok("t");
        token.expires_at = Some(at);
        if refresh {
            token.vars.insert("refresh_token".into(), "r".into());
        }
        Entry { token, version: 1, removed_at: None }
    }

    #[test]
    fn cas_on_the_map() {
        let mut m = Entries::new();
        assert_eq!(save(&mut m, "k", &tok("a"), 1), Saved::Conflict(None), "absent: only 0 matches");
        assert_eq!(save(&mut m, "k", &tok("a"), 0), Saved::Written(1));
        let conflict = save(&mut m, "k", &tok("b"), 0);
        assert_eq!(conflict, Saved::Conflict(Some(Loaded { token: tok("a"), version: 1 })));
        assert_eq!(save(&mut m, "k", &tok("b"), 1), Saved::Written(2));
        assert!(!remove(&mut m, "k", 1, 10), "stale version");
        assert!(!remove(&mut m, "k", 0, 10), "0 names no entry");
        assert_eq!(load(&m, "k").map(|l| l.version), Some(2));
        assert!(remove(&mut m, "k", 2, 10));
        assert_eq!(load(&m, "k"), None);
        assert!(!remove(&mut m, "k", 2, 10), "already removed");
        // The tombstone: the old version no longer matches anything, and the key
        // continues from where it was.
        assert_eq!(save(&mut m, "k", &tok("c"), 2), Saved::Conflict(None));
        assert_eq!(save(&mut m, "k", &tok("c"), 0), Saved::Written(3));
        assert!(!remove(&mut m, "k", 1, 10));
    }

    #[test]
    fn purge_rule() {
        let now = 1_000_000_000;
        let day = 24 * 3600;
        // Not yet expired: kept, with or without refresh token.
        assert!(!purgeable(&expiring(now + 1, false), now));
        assert!(!purgeable(&expiring(now + 1, true), now));
        // Expired, nothing to renew it with: dropped.
        assert!(purgeable(&expiring(now, false), now));
        assert!(purgeable(&expiring(now - 1, false), now));
        // Expired but renewable: kept for 30 days.
        assert!(!purgeable(&expiring(now - 1, true), now));
        assert!(!purgeable(&expiring(now - 30 * day, true), now));
        assert!(purgeable(&expiring(now - 30 * day - 1, true), now));
        // Never expires: never dropped.
        let mut forever = expiring(0, false);
        forever.token.expires_at = None;
        assert!(!purgeable(&forever, u64::MAX));
        // Tombstones: kept for 30 days.
        assert!(!purgeable(&Entry::tombstone(3, now - 30 * day), now));
        assert!(purgeable(&Entry::tombstone(3, now - 30 * day - 1), now));
    }

    #[test]
    fn purge_spares_live_keys_and_the_key_written() {
        let now = 1_000_000_000;
        let mut m = Entries::new();
        for k in ["live", "written", "dead", "renewable"] {
            m.insert(k.into(), expiring(now - 10, k == "renewable"));
        }
        let live: BTreeSet<String> = ["live".to_string()].into();
        assert_eq!(purge(&mut m, &live, "written", now), 1);
        assert_eq!(m.keys().map(String::as_str).collect::<Vec<_>>(), ["live", "renewable", "written"]);
    }
}
