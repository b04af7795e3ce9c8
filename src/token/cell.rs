//! The token cell: one per provider, read lock-free on every request.
//!
//! The refresher is the only writer and the only fetcher, which makes "single flight"
//! structural: requests that find no usable token wake it and wait for the outcome of
//! its next attempt instead of calling the IdP themselves.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use tokio::sync::{watch, Notify};

use super::driver::Origin;
use super::machine::Phase;
use super::ActiveToken;
use crate::provider::ErrorClass;

/// What the admin API shows for a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderState {
    /// No attempt finished yet.
    Starting,
    /// Holding a usable token.
    Valid,
    /// Holding a usable token, but the last refresh failed (serving it until it expires).
    Degraded,
    /// No usable token; attempts are failing.
    Unavailable,
    /// Waiting for a human to supply a one-time code.
    AwaitingCode,
}

impl ProviderState {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderState::Starting => "starting",
            ProviderState::Valid => "valid",
            ProviderState::Degraded => "degraded",
            ProviderState::Unavailable => "unavailable",
            ProviderState::AwaitingCode => "awaiting_code",
        }
    }
}

/// The outcome of the refresher's latest attempt, broadcast to waiting requests.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    pub seq: u64,
    pub failed: Option<ErrorClass>,
    /// When the refresher will try again (`None`: not scheduled, e.g. never-expiring token).
    pub next_at: Option<Instant>,
}

/// Bookkeeping for the admin API and metrics; never read on the request path.
#[derive(Debug, Clone, Default)]
pub struct Status {
    /// The provider's phase as its state machine sees it.
    pub phase: Phase,
    /// A login was started and its code is awaited.
    pub pending_login: bool,
    /// Where the published token came from.
    pub origin: Option<Origin>,
    /// Failed store operations since start (the token is still served from memory).
    pub store_errors: u64,
    pub last_store_error: Option<String>,
    pub last_success: Option<SystemTime>,
    pub last_attempt: Option<SystemTime>,
    pub last_error: Option<ErrorClass>,
    pub last_error_detail: Option<String>,
    pub last_error_at: Option<SystemTime>,
    pub consecutive_failures: u32,
    pub next_attempt: Option<SystemTime>,
    pub awaiting_code: bool,
}

/// The least time between two session probes of one provider.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// What a bare rejection of a human-renewable token amounts to so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suspicion {
    /// One path rejected it; it stays in use.
    Suspected,
    /// A second path rejected it with no success in between: the session is over.
    Dead,
}

/// Why a request could not get a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// The wait ran out.
    Timeout,
    /// The latest attempt failed and the next one is too far away to wait for.
    Failed { class: ErrorClass, retry_in: Duration },
    /// A human must supply a code first.
    AwaitingCode,
}

pub struct TokenCell {
    name: String,
    current: ArcSwapOption<ActiveToken>,
    wake: Notify,
    force: AtomicBool,
    /// Generation of the token the upstream rejected last (0: none pending), for the driver.
    rejected: AtomicU64,
    /// The current token can be renewed only by a human (no grant, no refresh token):
    /// a bare 401 is then only a suspicion, see [`TokenCell::suspect`].
    human_only: AtomicBool,
    /// Generation under suspicion (0: none) and the path that raised it (hashed).
    suspect_generation: AtomicU64,
    suspect_path: AtomicU64,
    /// Monotonic nanoseconds (since `epoch`) of the last session probe.
    last_probe: AtomicU64,
    attempts: watch::Sender<Attempt>,
    generation: AtomicU64,
    status: Mutex<Status>,
    /// Monotonic nanoseconds (since `epoch`) of the last accepted invalidation.
    last_invalidation: AtomicU64,
    epoch: Instant,
}

impl TokenCell {
    pub fn new(name: impl Into<String>) -> Arc<Self> {
        let (attempts, _) = watch::channel(Attempt { seq: 0, failed: None, next_at: None });
        Arc::new(TokenCell {
            name: name.into(),
            current: ArcSwapOption::empty(),
            wake: Notify::new(),
            force: AtomicBool::new(false),
            rejected: AtomicU64::new(0),
            human_only: AtomicBool::new(false),
            suspect_generation: AtomicU64::new(0),
            suspect_path: AtomicU64::new(0),
            last_probe: AtomicU64::new(0),
            attempts,
            generation: AtomicU64::new(0),
            status: Mutex::new(Status::default()),
            last_invalidation: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The token to inject now, if there is one. Lock-free: one atomic load, one
    /// reference-count bump, and for a token that expires a read of each clock (the
    /// monotonic one and the wall clock, which keeps running while the host sleeps).
    #[inline]
    pub fn usable(&self) -> Option<Arc<ActiveToken>> {
        let guard = self.current.load();
        match &*guard {
            Some(t) if t.usable() => Some(Arc::clone(t)),
            _ => None,
        }
    }

    /// [`TokenCell::usable`] at given clock readings (tests drive a host suspend with it).
    pub fn usable_at(&self, mono: Instant, wall: SystemTime) -> Option<Arc<ActiveToken>> {
        let guard = self.current.load();
        match &*guard {
            Some(t) if t.usable_at(mono, wall) => Some(Arc::clone(t)),
            _ => None,
        }
    }

    /// The current token even if it is no longer usable (admin API, scheduling).
    pub fn latest(&self) -> Option<Arc<ActiveToken>> {
        self.current.load_full()
    }

    /// Wait up to `wait` for a usable token, waking the refresher if there is none.
    pub async fn obtain(&self, wait: Duration) -> Result<Arc<ActiveToken>, Unavailable> {
        if let Some(t) = self.usable() {
            return Ok(t);
        }
        let deadline = Instant::now() + wait;
        let mut rx = self.attempts.subscribe();
        self.wake.notify_one();
        loop {
            if let Some(t) = self.usable() {
                return Ok(t);
            }
            if self.lock_status().awaiting_code {
                return Err(Unavailable::AwaitingCode);
            }
            let last = *rx.borrow_and_update();
            if let Some(class) = last.failed {
                // Waiting only helps if the refresher will try again before our deadline.
                match last.next_at {
                    Some(next) if next <= deadline => {}
                    next => {
                        let retry_in =
                            next.map(|n| n.saturating_duration_since(Instant::now())).unwrap_or(Duration::from_secs(1));
                        return Err(Unavailable::Failed { class, retry_in });
                    }
                }
            }
            match tokio::time::timeout_at(deadline.into(), rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => {
                    if let Some(t) = self.usable() {
                        return Ok(t);
                    }
                    // Out of time while attempts kept failing: say why they failed.
                    let last = *rx.borrow();
                    return Err(match last.failed {
                        Some(class) => Unavailable::Failed {
                            class,
                            retry_in: last
                                .next_at
                                .map(|n| n.saturating_duration_since(Instant::now()))
                                .unwrap_or(Duration::from_secs(1)),
                        },
                        None => Unavailable::Timeout,
                    });
                }
            }
        }
    }

    /// Drop the token of generation `generation` because the upstream rejected it, unless
    /// a newer one is already in place or another invalidation happened within
    /// `min_interval` (an upstream that rejects every token must not turn tollgate into a
    /// load generator against the IdP). Returns whether this call invalidated.
    pub fn invalidate(&self, generation: u64, min_interval: Duration) -> bool {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let last = self.last_invalidation.load(Ordering::Acquire);
        if last != 0 && now.saturating_sub(last) < min_interval.as_nanos() as u64 {
            return false;
        }
        let current = self.current.load();
        match &*current {
            Some(t) if t.generation == generation => {}
            _ => return false,
        }
        if self.last_invalidation.compare_exchange(last, now.max(1), Ordering::AcqRel, Ordering::Acquire).is_err() {
            return false;
        }
        let prev = self.current.compare_and_swap(&*current, None);
        let swapped = matches!(&*prev, Some(t) if t.generation == generation);
        if swapped {
            self.rejected.store(generation, Ordering::Release);
            self.wake.notify_one();
        } else {
            // Lost to a refresh that replaced the token meanwhile: give the slot back.
            self.last_invalidation.store(last, Ordering::Release);
        }
        swapped
    }

    /// Whether only a human can renew the current token (set by the driver).
    #[inline]
    pub fn human_only(&self) -> bool {
        self.human_only.load(Ordering::Relaxed)
    }

    /// A bare 401 (no RFC 6750 `invalid_token`) for a token only a human can renew. APIs
    /// answer 401 for other reasons than a dead token (a path the account may not use, a
    /// blip in the API's auth service), so one is only a suspicion: the token is dead
    /// when another path rejects it too with no success in between. Returns whether that
    /// evidence is now complete.
    pub fn suspect(&self, generation: u64, path: &str) -> Suspicion {
        let path = crate::provider::spec::fnv1a(path.as_bytes()).max(1);
        let held = self.suspect_generation.load(Ordering::Acquire);
        if held == generation && self.suspect_path.load(Ordering::Acquire) != path {
            self.suspect_generation.store(0, Ordering::Release);
            return Suspicion::Dead;
        }
        self.suspect_path.store(path, Ordering::Release);
        self.suspect_generation.store(generation, Ordering::Release);
        Suspicion::Suspected
    }

    /// Whether a session probe may be sent now: at most one per second per provider, so a
    /// path that always answers 401 cannot double the upstream's traffic.
    pub fn probe_due(&self) -> bool {
        let now = (self.epoch.elapsed().as_nanos() as u64).max(1);
        let last = self.last_probe.load(Ordering::Acquire);
        if last != 0 && now.saturating_sub(last) < PROBE_INTERVAL.as_nanos() as u64 {
            return false;
        }
        self.last_probe.compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    /// The upstream accepted the token of `generation`: clear any suspicion on it. One
    /// atomic load on the request path when nothing is suspected.
    #[inline]
    pub fn accepted(&self, generation: u64) {
        if self.suspect_generation.load(Ordering::Relaxed) == generation {
            let _ = self.suspect_generation.compare_exchange(generation, 0, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    /// Ask the refresher for a new token now, even if the current one is fine.
    pub fn force_refresh(&self) {
        self.force.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Watch attempt outcomes (admin "refresh and wait").
    pub fn subscribe(&self) -> watch::Receiver<Attempt> {
        self.attempts.subscribe()
    }

    pub fn status(&self) -> Status {
        self.lock_status().clone()
    }

    /// The state as the admin API and `/readyz` report it.
    pub fn state(&self) -> ProviderState {
        let st = self.lock_status();
        if st.awaiting_code && self.usable().is_none() {
            return ProviderState::AwaitingCode;
        }
        match (self.usable().is_some(), st.last_attempt.is_some(), st.consecutive_failures) {
            (true, _, 0) => ProviderState::Valid,
            (true, _, _) => ProviderState::Degraded,
            (false, false, _) => ProviderState::Starting,
            (false, true, _) => ProviderState::Unavailable,
        }
    }

    // --- the refresher's side -------------------------------------------------------

    pub(crate) fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }

    pub(crate) fn publish(&self, token: Option<Arc<ActiveToken>>) {
        self.current.store(token);
    }

    pub(crate) async fn woken(&self) {
        self.wake.notified().await
    }

    pub(crate) fn set_human_only(&self, yes: bool) {
        self.human_only.store(yes, Ordering::Relaxed);
    }

    pub(crate) fn take_rejected(&self) -> Option<u64> {
        match self.rejected.swap(0, Ordering::AcqRel) {
            0 => None,
            g => Some(g),
        }
    }

    pub(crate) fn take_force(&self) -> bool {
        self.force.swap(false, Ordering::AcqRel)
    }

    pub(crate) fn report(&self, attempt: Attempt) {
        self.attempts.send_replace(attempt);
    }

    pub(crate) fn last_attempt(&self) -> Attempt {
        *self.attempts.borrow()
    }

    pub(crate) fn lock_status(&self) -> MutexGuard<'_, Status> {
        // A panic while holding this lock cannot leave the status inconsistent in a way
        // that matters (it is display data), so recover from poisoning.
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::Lifetime;

    fn token(cell: &TokenCell, life: Duration) -> Arc<ActiveToken> {
        let g = cell.next_generation();
        Arc::new(
            ActiveToken::new(
                "t",
                "Bearer ",
                g,
                Lifetime::Finite(life),
                Duration::ZERO,
                Duration::ZERO,
                None,
                Default::default(),
                vec![],
            )
            .unwrap(),
        )
    }

    #[test]
    fn expired_token_is_not_usable() {
        let cell = TokenCell::new("p");
        cell.publish(Some(token(&cell, Duration::from_millis(1))));
        std::thread::sleep(Duration::from_millis(5));
        assert!(cell.usable().is_none());
        assert!(cell.latest().is_some());
    }

    #[test]
    fn after_a_host_suspend_longer_than_its_life_the_token_is_not_injected() {
        let cell = TokenCell::new("p");
        cell.publish(Some(token(&cell, Duration::from_secs(60))));
        let (mono, wall) = (Instant::now(), SystemTime::now());
        assert!(cell.usable_at(mono, wall).is_some());
        // Suspended for an hour: the monotonic reading stands still, the wall clock moves on.
        assert!(cell.usable_at(mono, wall + Duration::from_secs(3600)).is_none());
    }

    #[test]
    fn invalidate_is_by_generation_and_rate_limited() {
        let cell = TokenCell::new("p");
        let t1 = token(&cell, Duration::from_secs(60));
        cell.publish(Some(t1.clone()));
        assert!(!cell.invalidate(t1.generation + 1, Duration::ZERO), "newer generation must not be dropped");
        assert!(cell.invalidate(t1.generation, Duration::from_secs(10)));
        assert!(cell.usable().is_none());
        let t2 = token(&cell, Duration::from_secs(60));
        cell.publish(Some(t2.clone()));
        assert!(!cell.invalidate(t2.generation, Duration::from_secs(10)), "second invalidation within the interval");
        assert!(cell.usable().is_some());
    }

    #[tokio::test]
    async fn concurrent_invalidations_drop_once() {
        let cell = TokenCell::new("p");
        let t = token(&cell, Duration::from_secs(60));
        cell.publish(Some(t.clone()));
        let mut handles = Vec::new();
        for _ in 0..100 {
            let c = cell.clone();
            let g = t.generation;
            handles.push(tokio::spawn(async move { c.invalidate(g, Duration::from_secs(5)) }));
        }
        let mut n = 0;
        for h in handles {
            n += h.await.unwrap() as u32;
        }
        assert_eq!(n, 1);
    }

    #[tokio::test]
    async fn obtain_fails_fast_when_next_attempt_is_beyond_the_wait() {
        let cell = TokenCell::new("p");
        cell.report(Attempt {
            seq: 1,
            failed: Some(ErrorClass::ServerError),
            next_at: Some(Instant::now() + Duration::from_secs(30)),
        });
        let started = Instant::now();
        let r = cell.obtain(Duration::from_secs(5)).await;
        assert!(matches!(r, Err(Unavailable::Failed { class: ErrorClass::ServerError, .. })));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn obtain_wakes_when_token_published() {
        let cell = TokenCell::new("p");
        let c2 = cell.clone();
        let waiter = tokio::spawn(async move { c2.obtain(Duration::from_secs(5)).await.map(|t| t.generation) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t = token(&cell, Duration::from_secs(60));
        cell.publish(Some(t.clone()));
        cell.report(Attempt { seq: 1, failed: None, next_at: None });
        assert_eq!(waiter.await.unwrap(), Ok(t.generation));
    }
}
