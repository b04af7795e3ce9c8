//! One token request for a whole fleet. Before asking the IdP, a replica looks for a
//! newer token another replica already shared, then takes the fleet's lease for this
//! provider; only the lease holder asks the IdP, and only its result is written (the
//! write is fenced by the lease). The others wait for the holder's result and adopt it.
//! With rotating refresh tokens this is what keeps a session alive: only one replica
//! ever uses a given refresh token.
//!
//! When the shared store cannot be reached, a replica fetches on its own (still one
//! request at a time in the process) and counts the fallback: a Redis outage must never
//! fail a request that a local token request could serve.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast::error::RecvError;
use tracing::{debug, warn};

use crate::metrics;
use crate::provider::{ErrorClass, FetchError, TokenSet, TokenSource};
use crate::store::fleet::{FleetMessage, Lease};
use crate::store::{Loaded, TokenStore, Version};

/// What a coordinated request produced.
pub(super) enum Got {
    /// This replica asked the IdP; `lease` is still held when it did so under the lease
    /// (the driver writes the result fenced by it, then releases it).
    Here { set: TokenSet, lease: Option<Lease> },
    /// Another replica's newer token, from the shared store.
    Shared(Loaded),
}

/// Everything a coordinated request needs, owned, so the request is a `'static` future.
pub(super) struct Ask {
    pub store: Arc<dyn TokenStore>,
    pub source: Arc<dyn TokenSource>,
    pub name: String,
    pub key: String,
    /// Refresh with this token set (its refresh token), else acquire.
    pub previous: Option<TokenSet>,
    /// The store version of the token this replica holds (0: none).
    pub held: Version,
    /// This replica still holds a usable token.
    pub held_usable: bool,
    /// Never adopt a shared token with less life left than this (the expiry margin).
    pub margin: Duration,
}

impl Ask {
    /// Whether `entry` is a token this replica should take instead of asking the IdP.
    fn is_news(&self, entry: &Loaded) -> bool {
        let t = &entry.token;
        // Versions of a shared store never go back (not even after it restarts empty), so
        // a greater version is a later write: with rotating refresh tokens it holds the
        // only refresh token still good, whatever its access token's expiry.
        if t.fingerprint != self.key || entry.version <= self.held {
            return false;
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        t.expires_at.is_none_or(|e| e > now + self.margin.as_secs())
    }

    /// Ask the IdP directly.
    async fn direct(&self) -> Result<TokenSet, FetchError> {
        match self.previous.as_ref().filter(|p| self.source.can_refresh(p)) {
            Some(prev) => self.source.refresh(prev).await,
            None => self.source.acquire().await,
        }
    }
}

/// Ask the IdP as this replica (no fleet, or the fleet unreachable).
pub(super) async fn alone(ask: Ask) -> Result<Got, FetchError> {
    ask.direct().await.map(|set| Got::Here { set, lease: None })
}

/// The coordinated request (see the module docs).
pub(super) async fn coordinated(mut ask: Ask) -> Result<Got, FetchError> {
    let Some(fleet) = ask.store.fleet() else { return alone(ask).await };
    let m = metrics::get();
    let ttl = fleet.lease_ttl();
    let mut news = fleet.subscribe();
    // A holder that keeps its lease but never writes (an IdP that hangs) must not keep
    // us waiting forever: give up after a few lease lifetimes and back off.
    let deadline = Instant::now() + ttl * 4;
    loop {
        match ask.store.load(&ask.key).await {
            Ok(Some(entry)) if ask.is_news(&entry) => return Ok(Got::Shared(entry)),
            Ok(_) => {}
            Err(e) => return fallback(&ask, &e.to_string()).await,
        }
        match fleet.try_lease(&ask.key, ttl).await {
            Ok(Some(lease)) => {
                m.fleet_lease_total.with_label_values(&[&ask.name, "acquired"]).inc();
                // Writes are fenced by the lease, so what the entry holds now is final
                // until we write: someone may have written just before we took it.
                match ask.store.load(&ask.key).await {
                    Ok(Some(entry)) if ask.is_news(&entry) => {
                        let _ = fleet.release(&lease).await;
                        return Ok(Got::Shared(entry));
                    }
                    // A later write whose access token is spent: its refresh token is the
                    // one still good (ours may have been rotated away). Refresh with it.
                    Ok(Some(entry)) if entry.version > ask.held && entry.token.fingerprint == ask.key => {
                        if ask.previous.is_some() || entry.token.vars.contains_key("refresh_token") {
                            ask.previous = Some(super::driver::token_set_of(&entry.token).0);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = fleet.release(&lease).await;
                        return fallback(&ask, &e.to_string()).await;
                    }
                }
                return under_lease(&ask, fleet, lease, ttl).await;
            }
            Ok(None) => {
                m.fleet_lease_total.with_label_values(&[&ask.name, "busy"]).inc();
                if Instant::now() >= deadline {
                    return Err(FetchError::new(
                        ErrorClass::Timeout,
                        "another replica holds the refresh lease but wrote no token",
                    ));
                }
                debug!(provider = %ask.name, "another replica is fetching; waiting for its token");
                wait_for_news(&mut news, &ask.key, ttl).await;
            }
            Err(e) => return fallback(&ask, &e.to_string()).await,
        }
    }
}

/// Ask the IdP while holding the lease, renewing it meanwhile (a slow IdP must not let
/// it lapse and a second replica start the same refresh).
async fn under_lease(
    ask: &Ask,
    fleet: &dyn crate::store::fleet::Fleet,
    lease: Lease,
    ttl: Duration,
) -> Result<Got, FetchError> {
    let request = ask.direct();
    tokio::pin!(request);
    let mut renew = tokio::time::interval((ttl / 3).max(Duration::from_millis(10)));
    renew.tick().await;
    loop {
        tokio::select! {
            r = &mut request => {
                return match r {
                    Ok(set) => Ok(Got::Here { set, lease: Some(lease) }),
                    Err(e) => {
                        let _ = fleet.release(&lease).await;
                        Err(e)
                    }
                };
            }
            _ = renew.tick() => {
                if !matches!(fleet.renew(&lease, ttl).await, Ok(true)) {
                    metrics::get().fleet_lease_total.with_label_values(&[&ask.name, "lost"]).inc();
                    warn!(provider = %ask.name, "the refresh lease could not be renewed; the result may not be shared");
                }
            }
        }
    }
}

async fn fallback(ask: &Ask, why: &str) -> Result<Got, FetchError> {
    // A refresh token is shared by the fleet: refreshing with it outside the lease could
    // race the lease holder, and an IdP that rotates refresh tokens would revoke the whole
    // family. While the current token still serves, wait for the store instead.
    if ask.held_usable && ask.previous.as_ref().is_some_and(|p| ask.source.can_refresh(p)) {
        warn!(provider = %ask.name, error = %why, "shared store unreachable; keeping the current token rather than using the shared refresh token alone");
        return Err(FetchError::new(ErrorClass::ServerError, "the shared store is unreachable"));
    }
    metrics::get().fleet_fallback_total.with_label_values(&[&ask.name]).inc();
    warn!(provider = %ask.name, error = %why, "shared store unreachable; fetching the token on this replica alone");
    ask.direct().await.map(|set| Got::Here { set, lease: None })
}

/// Wait until the fleet says something about `key`, polling as a fallback (a lost
/// pub/sub message must not cost more than a quarter of the lease time).
async fn wait_for_news(news: &mut tokio::sync::broadcast::Receiver<FleetMessage>, key: &str, ttl: Duration) {
    let poll = tokio::time::sleep((ttl / 4).max(Duration::from_millis(50)));
    tokio::pin!(poll);
    loop {
        tokio::select! {
            _ = &mut poll => return,
            msg = news.recv() => match msg {
                Ok(FleetMessage::Written { key: k, .. } | FleetMessage::Invalidated { key: k, .. }) if k == key => return,
                Ok(FleetMessage::Reconnected) | Err(RecvError::Lagged(_)) => return,
                Ok(_) => {}
                Err(RecvError::Closed) => return poll.await,
            },
        }
    }
}
