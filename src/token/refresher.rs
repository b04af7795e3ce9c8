//! One background task per provider: fetch at start, refresh ahead of expiry, back off
//! with jitter on failure, and keep serving the still-valid token meanwhile.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::cell::{Attempt, TokenCell};
use super::expiry::{self, Lifetime};
use super::schedule;
use super::ActiveToken;
use crate::config::Timing;
use crate::metrics;
use crate::provider::{ErrorClass, FetchError, TokenSet, TokenSource};

/// How far ahead "never" is scheduled: effectively until woken.
const FAR: Duration = Duration::from_secs(365 * 24 * 3600);

pub struct Refresher {
    pub cell: Arc<TokenCell>,
    pub source: Arc<dyn TokenSource>,
    pub timing: Timing,
    pub header_prefix: String,
}

impl Refresher {
    /// Run until `shutdown` flips to true (or its sender is dropped).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let name = self.cell.name().to_string();
        let m = metrics::get();
        m.init_provider(&name);
        let mut previous: Option<TokenSet> = None;
        let mut failures: u32 = 0;
        let mut next_at = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next_at.into()) => {}
                _ = self.cell.woken() => {
                    let forced = self.cell.take_force();
                    let needed = self.cell.usable().is_none();
                    // A request that finds no token may cut a scheduled wait short, but not
                    // a backoff: that is what protects the IdP during an outage.
                    if !(forced || (needed && failures == 0)) {
                        continue;
                    }
                }
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        debug!(provider = %name, "refresher stopping");
                        return;
                    }
                    continue;
                }
            }

            let started_at = SystemTime::now();
            {
                let mut st = self.cell.lock_status();
                st.last_attempt = Some(started_at);
            }
            let timer = Instant::now();
            let result = self.fetch(&name, &mut previous).await;
            m.token_fetch_duration.with_label_values(&[&name]).observe(timer.elapsed().as_secs_f64());

            let outcome = result.and_then(|set| self.activate(&set).map(|t| (set, t)));
            match outcome {
                Ok((set, token)) => {
                    failures = 0;
                    m.token_fetch_total.with_label_values(&[&name, "success"]).inc();
                    m.token_fetch_consecutive_failures.with_label_values(&[&name]).set(0);
                    match token.expires_at {
                        Some(at) => m.token_expiry_timestamp.with_label_values(&[&name]).set(unix(at)),
                        None => {
                            let _ = m.token_expiry_timestamp.remove_label_values(&[&name]);
                        }
                    }
                    m.token_valid.with_label_values(&[&name]).set(1);
                    next_at = match token.lifetime {
                        Lifetime::Never => Instant::now() + FAR,
                        Lifetime::Finite(l) => {
                            let wait = schedule::refresh_in(l, l, self.timing.refresh_before, fastrand::f64());
                            Instant::now() + wait.max(Duration::from_millis(100))
                        }
                    };
                    info!(
                        provider = %name,
                        generation = token.generation,
                        expires_in_s = token.lifetime_secs(),
                        next_refresh_in_ms = next_at.saturating_duration_since(Instant::now()).as_millis() as u64,
                        "token obtained"
                    );
                    previous = Some(set);
                    self.cell.publish(Some(token));
                    let mut st = self.cell.lock_status();
                    st.last_success = Some(SystemTime::now());
                    st.consecutive_failures = 0;
                    st.next_attempt = Some(to_system(next_at));
                    drop(st);
                    self.report(None, next_at);
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    m.token_fetch_total.with_label_values(&[&name, e.class.as_str()]).inc();
                    m.token_fetch_consecutive_failures.with_label_values(&[&name]).set(failures as i64);
                    let mut wait =
                        schedule::backoff(failures, self.timing.backoff_min, self.timing.backoff_max, fastrand::f64());
                    if let Some(ra) = e.retry_after {
                        wait = wait.max(ra);
                    }
                    next_at = Instant::now() + wait;
                    let holding = self.cell.usable().is_some();
                    warn!(
                        provider = %name,
                        class = %e.class,
                        status = e.status,
                        error = e.oauth_error.as_deref().unwrap_or(""),
                        detail = %e.detail,
                        consecutive_failures = failures,
                        retry_in_ms = wait.as_millis() as u64,
                        serving_valid_token = holding,
                        "token request failed"
                    );
                    let mut st = self.cell.lock_status();
                    st.last_error = Some(e.class);
                    st.last_error_detail = Some(e.detail.clone());
                    st.last_error_at = Some(SystemTime::now());
                    st.consecutive_failures = failures;
                    st.next_attempt = Some(to_system(next_at));
                    drop(st);
                    self.report(Some(e.class), next_at);
                }
            }
        }
    }

    fn report(&self, failed: Option<ErrorClass>, next_at: Instant) {
        let seq = self.cell.last_attempt().seq + 1;
        self.cell.report(Attempt { seq, failed, next_at: Some(next_at) });
    }

    /// One attempt: the refresh flow when we hold what it needs, falling back to a full
    /// acquisition when the IdP rejects the refresh (e.g. `invalid_grant` for a revoked or
    /// already-rotated refresh token).
    async fn fetch(&self, name: &str, previous: &mut Option<TokenSet>) -> Result<TokenSet, FetchError> {
        if let Some(prev) = previous.as_ref().filter(|p| self.source.can_refresh(p)) {
            match self.source.refresh(prev).await {
                Ok(set) => return Ok(set),
                Err(e) if e.class.is_credential() => {
                    metrics::get().token_fetch_total.with_label_values(&[name, e.class.as_str()]).inc();
                    warn!(provider = %name, class = %e.class, status = e.status, "refresh rejected; re-authenticating with the configured grant");
                    *previous = None;
                }
                Err(e) => return Err(e),
            }
        }
        self.source.acquire().await
    }

    /// Turn a token response into an injectable token, or a `malformed` error.
    fn activate(&self, set: &TokenSet) -> Result<Arc<ActiveToken>, FetchError> {
        let lifetime = expiry::lifetime(
            set.expires_in.as_ref(),
            set.access_token.expose(),
            self.timing.default_lifetime,
            self.timing.max_lifetime,
            SystemTime::now(),
        )
        .map_err(|e| FetchError::new(ErrorClass::Malformed, e.to_string()))?;
        let generation = self.cell.next_generation();
        ActiveToken::new(
            set.access_token.expose(),
            &self.header_prefix,
            generation,
            lifetime,
            self.timing.expiry_margin,
            set.scope.clone(),
            set.extras.clone(),
        )
        .map(Arc::new)
        .ok_or_else(|| FetchError::new(ErrorClass::Malformed, "token contains characters not allowed in a header"))
    }
}

impl ActiveToken {
    /// Seconds of lifetime, for logs (`None`: never expires).
    pub fn lifetime_secs(&self) -> Option<u64> {
        match self.lifetime {
            Lifetime::Never => None,
            Lifetime::Finite(d) => Some(d.as_secs()),
        }
    }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn to_system(at: Instant) -> SystemTime {
    SystemTime::now() + at.saturating_duration_since(Instant::now())
}
