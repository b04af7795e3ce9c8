//! One background task per provider: restore a stored token or fetch one at start,
//! refresh ahead of expiry, back off with jitter on failure while the still-valid token
//! keeps being served, and run human login steps when asked. It is the only writer of
//! its provider's cell and the only caller of its token source, so everything about one
//! provider happens in one place, one step at a time.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderName, HeaderValue};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::cell::{Attempt, TokenCell};
use super::expiry::{self, Lifetime};
use super::schedule;
use super::ActiveToken;
use crate::config::{Secret, Timing};
use crate::metrics;
use crate::provider::template::{Template, Vars};
use crate::provider::{ErrorClass, FetchError, TokenSet, TokenSource};
use crate::store::{Saved, StoredToken, TokenStore, Version};

/// How far ahead "never" is scheduled: effectively until woken.
const FAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// Requests from the admin API, executed by the refresher in order.
pub enum Command {
    /// Run the login steps before the code (e.g. send the OTP).
    LoginStart(oneshot::Sender<Result<(), FetchError>>),
    /// Finish the login with the human's code.
    LoginCode(Secret, oneshot::Sender<Result<(), FetchError>>),
}

pub struct Refresher {
    pub cell: Arc<TokenCell>,
    pub source: Arc<dyn TokenSource>,
    pub timing: Timing,
    pub header_prefix: String,
    pub upstream_headers: Vec<(HeaderName, Template)>,
    pub store: Arc<dyn TokenStore>,
    pub fingerprint: String,
}

/// What the refresher remembers between attempts.
#[derive(Default)]
struct Memory {
    previous: Option<TokenSet>,
    failures: u32,
    /// What the login steps before the code extracted (e.g. Etna's interim token).
    pending: Option<Vars>,
    /// The store entry's version as last loaded or written.
    version: Version,
}

impl Refresher {
    /// Run until `shutdown` flips to true (or its sender is dropped).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>, mut commands: mpsc::Receiver<Command>) {
        let name = self.cell.name().to_string();
        metrics::get().init_provider(&name);
        let mut mem = Memory::default();
        let mut next_at = match self.restore(&mut mem).await {
            Some(at) => at,
            None if self.source.can_acquire() => Instant::now(),
            None => {
                self.await_code("no stored token; a human login is needed");
                Instant::now() + FAR
            }
        };
        loop {
            tokio::select! {
                // Shutdown first: a retired refresher (replaced by a reload) must not make
                // one more IdP call or overwrite the live provider's stored token.
                biased;
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        debug!(provider = %name, "refresher stopping");
                        return;
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(next_at.into()) => {}
                _ = self.cell.woken() => {
                    let forced = self.cell.take_force();
                    let needed = self.cell.usable().is_none();
                    // A request that finds no token may cut a scheduled wait short, but not
                    // a backoff: that is what protects the IdP during an outage.
                    if !(forced || (needed && mem.failures == 0)) {
                        continue;
                    }
                }
                cmd = commands.recv() => {
                    match cmd {
                        Some(Command::LoginStart(reply)) => {
                            let r = self.login_start(&mut mem).await;
                            let _ = reply.send(r);
                        }
                        Some(Command::LoginCode(code, reply)) => {
                            let r = self.login_code(&mut mem, code).await;
                            if let Ok(at) = &r {
                                next_at = *at;
                            }
                            let _ = reply.send(r.map(|_| ()));
                        }
                        None => {}
                    }
                    continue;
                }
            }
            next_at = self.attempt(&mut mem).await;
        }
    }

    /// One scheduled (or forced) attempt; returns when to try next.
    async fn attempt(&self, mem: &mut Memory) -> Instant {
        let can_refresh = mem.previous.as_ref().is_some_and(|p| self.source.can_refresh(p));
        if !can_refresh && !self.source.can_acquire() {
            // Only a human can renew this token; nothing to fetch while it is usable.
            if self.cell.usable().is_some() {
                let next = Instant::now() + FAR;
                self.report(None, next);
                return next;
            }
            let _ = self.store.remove(&self.fingerprint, mem.version).await;
            self.await_code("the token is gone and only a human login can renew it");
            return Instant::now() + FAR;
        }
        self.cell.lock_status().last_attempt = Some(SystemTime::now());
        let timer = Instant::now();
        let result = self.fetch(mem).await;
        let m = metrics::get();
        m.token_fetch_duration.with_label_values(&[self.cell.name()]).observe(timer.elapsed().as_secs_f64());
        let result = result.and_then(|set| {
            // Keep the newest response even if it cannot be activated: with rotating
            // refresh tokens the old refresh token is already spent (oauth2-proxy #1006).
            let activated = self.activate(&set, Duration::ZERO);
            mem.previous = Some(set.clone());
            activated.map(|t| (set, t))
        });
        match result {
            Ok((set, token)) => self.succeeded(mem, set, token).await,
            // Only an IdP's explicit verdict on the grant ends a human-obtained session; a 403
            // from a WAF or a redirect to a maintenance page is backed off like an outage.
            Err(e) if !self.source.can_acquire() && grant_rejected(&e) && self.cell.usable().is_none() => {
                self.failed(mem, &e);
                mem.previous = None;
                // A dead token must not come back from the store after a restart.
                let _ = self.store.remove(&self.fingerprint, mem.version).await;
                self.await_code("the IdP rejected the refresh and only a human login can renew the token");
                Instant::now() + FAR
            }
            Err(e) => self.failed(mem, &e),
        }
    }

    /// The refresh flow when we hold what it needs, falling back to the configured
    /// grant when the IdP rejects the refresh (e.g. `invalid_grant` for a revoked or
    /// already-rotated refresh token).
    async fn fetch(&self, mem: &mut Memory) -> Result<TokenSet, FetchError> {
        let name = self.cell.name();
        if let Some(prev) = mem.previous.as_ref().filter(|p| self.source.can_refresh(p)) {
            match self.source.refresh(prev).await {
                Ok(set) => return Ok(set),
                // Re-authenticate when the IdP rejects the refresh, or when the refresh
                // flow fails in any way and there is no usable token left to serve.
                Err(e) if self.source.can_acquire() && (e.class.is_credential() || self.cell.usable().is_none()) => {
                    metrics::get().token_fetch_total.with_label_values(&[name, e.class.as_str()]).inc();
                    warn!(provider = %name, class = %e.class, status = e.status, "refresh failed; re-authenticating with the configured grant");
                    mem.previous = None;
                }
                Err(e) => return Err(e),
            }
        }
        self.source.acquire().await
    }

    async fn login_start(&self, mem: &mut Memory) -> Result<(), FetchError> {
        if !self.source.has_login() {
            return Err(FetchError::new(ErrorClass::Rejected, "this provider has no login flow"));
        }
        let pending = self.source.login_start().await.inspect_err(|e| {
            warn!(provider = %self.cell.name(), class = %e.class, status = e.status, detail = %e.detail, "login start failed");
        })?;
        mem.pending = Some(pending);
        info!(provider = %self.cell.name(), "login started; waiting for the code");
        // Requests are turned away with `login_required` only when no token can be had
        // otherwise; a pending login alone does not stop a usable or renewable token.
        let renewable = mem.previous.as_ref().is_some_and(|p| self.source.can_refresh(p));
        if self.cell.usable().is_none() && !renewable {
            self.await_code("login started; waiting for the code");
        }
        Ok(())
    }

    async fn login_code(&self, mem: &mut Memory, code: Secret) -> Result<Instant, FetchError> {
        if !self.source.has_login() {
            return Err(FetchError::new(ErrorClass::Rejected, "this provider has no login flow"));
        }
        let pending = mem.pending.clone().unwrap_or_default();
        let set = self.source.login_complete(&pending, &code).await;
        let result = set.and_then(|s| self.activate(&s, Duration::ZERO).map(|t| (s, t)));
        match result {
            Ok((set, token)) => {
                mem.pending = None;
                info!(provider = %self.cell.name(), "login completed");
                Ok(self.succeeded(mem, set, token).await)
            }
            Err(e) => {
                // A wrong code leaves the provider awaiting, the pending login intact.
                metrics::get().token_fetch_total.with_label_values(&[self.cell.name(), e.class.as_str()]).inc();
                warn!(provider = %self.cell.name(), class = %e.class, status = e.status, detail = %e.detail, "login code rejected");
                let mut st = self.cell.lock_status();
                st.last_error = Some(e.class);
                st.last_error_detail = Some(e.detail.clone());
                st.last_error_at = Some(SystemTime::now());
                Err(e)
            }
        }
    }

    fn await_code(&self, why: &str) {
        let name = self.cell.name();
        let mut st = self.cell.lock_status();
        if !st.awaiting_code {
            warn!(provider = %name, reason = why, hint = %format!("tollgate login {name}"), "provider needs a human login");
        }
        st.awaiting_code = true;
        st.next_attempt = None;
        drop(st);
        metrics::get().provider_awaiting_code.with_label_values(&[name]).set(1);
        let seq = self.cell.last_attempt().seq + 1;
        self.cell.report(Attempt { seq, failed: Some(ErrorClass::InvalidGrant), next_at: None });
    }

    async fn succeeded(&self, mem: &mut Memory, set: TokenSet, token: Arc<ActiveToken>) -> Instant {
        let name = self.cell.name();
        let m = metrics::get();
        mem.failures = 0;
        m.token_fetch_total.with_label_values(&[name, "success"]).inc();
        m.token_fetch_consecutive_failures.with_label_values(&[name]).set(0);
        m.provider_awaiting_code.with_label_values(&[name]).set(0);
        match token.expires_at {
            Some(at) => m.token_expiry_timestamp.with_label_values(&[name]).set(unix_f(at)),
            None => {
                let _ = m.token_expiry_timestamp.remove_label_values(&[name]);
            }
        }
        m.token_valid.with_label_values(&[name]).set(1);
        let next_at = self.next_refresh(&token);
        info!(
            provider = %name,
            generation = token.generation,
            expires_in_s = token.lifetime_secs(),
            next_refresh_in_ms = next_at.saturating_duration_since(Instant::now()).as_millis() as u64,
            "token obtained"
        );
        // Publish first: waiting requests should not wait for the fsync.
        let stored = self.stored(&set, &token);
        mem.previous = Some(set);
        self.cell.publish(Some(token));
        self.save(mem, &stored).await;
        let mut st = self.cell.lock_status();
        st.last_success = Some(SystemTime::now());
        st.consecutive_failures = 0;
        st.awaiting_code = false;
        st.next_attempt = Some(to_system(next_at));
        drop(st);
        self.report(None, next_at);
        next_at
    }

    /// Last writer wins, as before the store had versions.
    async fn save(&self, mem: &mut Memory, stored: &StoredToken) {
        let name = self.cell.name();
        for _ in 0..3 {
            match self.store.save(&self.fingerprint, stored, mem.version).await {
                Ok(Saved::Written(v)) => {
                    mem.version = v;
                    return;
                }
                Ok(Saved::Conflict(now)) => mem.version = now.map(|l| l.version).unwrap_or(0),
                Err(e) => {
                    warn!(provider = %name, error = %e, "could not save the token to the store");
                    return;
                }
            }
        }
    }

    fn failed(&self, mem: &mut Memory, e: &FetchError) -> Instant {
        let name = self.cell.name();
        let m = metrics::get();
        mem.failures = mem.failures.saturating_add(1);
        m.token_fetch_total.with_label_values(&[name, e.class.as_str()]).inc();
        m.token_fetch_consecutive_failures.with_label_values(&[name]).set(mem.failures as i64);
        let mut wait =
            schedule::backoff(mem.failures, self.timing.backoff_min, self.timing.backoff_max, fastrand::f64());
        if let Some(ra) = e.retry_after {
            wait = wait.max(ra);
        }
        let next_at = Instant::now() + wait;
        warn!(
            provider = %name,
            class = %e.class,
            status = e.status,
            error = e.oauth_error.as_deref().unwrap_or(""),
            detail = %e.detail,
            consecutive_failures = mem.failures,
            retry_in_ms = wait.as_millis() as u64,
            serving_valid_token = self.cell.usable().is_some(),
            "token request failed"
        );
        let mut st = self.cell.lock_status();
        st.last_error = Some(e.class);
        st.last_error_detail = Some(e.detail.clone());
        st.last_error_at = Some(SystemTime::now());
        st.consecutive_failures = mem.failures;
        st.next_attempt = Some(to_system(next_at));
        drop(st);
        self.report(Some(e.class), next_at);
        next_at
    }

    fn next_refresh(&self, token: &ActiveToken) -> Instant {
        match (token.lifetime, token.expires_at) {
            (Lifetime::Finite(total), Some(exp)) => {
                let remaining = exp.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
                let wait = schedule::refresh_in(total, remaining, self.timing.refresh_before, fastrand::f64());
                // Never faster than backoff_min, whatever tiny lifetime the IdP claims.
                Instant::now() + wait.max(self.timing.backoff_min)
            }
            _ => Instant::now() + FAR,
        }
    }

    fn report(&self, failed: Option<ErrorClass>, next_at: Instant) {
        let seq = self.cell.last_attempt().seq + 1;
        self.cell.report(Attempt { seq, failed, next_at: Some(next_at) });
    }

    /// Use a stored token that is still usable, without contacting the IdP.
    async fn restore(&self, mem: &mut Memory) -> Option<Instant> {
        let name = self.cell.name();
        let loaded = match self.store.load(&self.fingerprint).await {
            Ok(l) => l?,
            Err(e) => {
                warn!(provider = %name, error = %e, "could not read the token store");
                return None;
            }
        };
        mem.version = loaded.version;
        let stored = &loaded.token;
        if stored.fingerprint != self.fingerprint {
            info!(provider = %name, "stored token belongs to another account or IdP; ignoring it");
            return None;
        }
        let now = unix_now();
        let lifetime = match stored.expires_at {
            None => Lifetime::Never,
            Some(exp) => Lifetime::Finite(Duration::from_secs(exp.saturating_sub(stored.issued_at).max(1))),
        };
        let mut vars = Vars::new();
        for (k, v) in &stored.vars {
            vars.insert(k.clone(), Secret::new(v.as_str()));
        }
        let set = TokenSet {
            access_token: Secret::new(stored.token.as_str()),
            expires_in: None,
            refresh_token: vars.get("refresh_token").cloned(),
            scope: stored.scope.clone(),
            extras: stored.extras.clone(),
            vars,
        };
        let elapsed = Duration::from_secs(now.saturating_sub(stored.issued_at));
        let token = match self.build(&set, lifetime, elapsed) {
            Ok(t) if t.usable_at(Instant::now()) => t,
            _ => {
                // The access token is spent, but its refresh token may not be: refresh now
                // instead of asking a human again (seed 002's user tokens).
                if self.source.can_refresh(&set) {
                    info!(provider = %name, "stored token has expired; refreshing it with the stored refresh token");
                    mem.previous = Some(set);
                    return Some(Instant::now());
                }
                info!(provider = %name, "stored token has expired or cannot be used");
                return None;
            }
        };
        info!(provider = %name, generation = token.generation, "using the stored token; no token request needed");
        let next_at = self.next_refresh(&token);
        metrics::get().token_valid.with_label_values(&[name]).set(1);
        if let Some(at) = token.expires_at {
            metrics::get().token_expiry_timestamp.with_label_values(&[name]).set(unix_f(at));
        }
        mem.previous = Some(set);
        self.cell.publish(Some(token));
        let mut st = self.cell.lock_status();
        st.last_success = Some(SystemTime::now());
        st.next_attempt = Some(to_system(next_at));
        drop(st);
        self.report(None, next_at);
        Some(next_at)
    }

    /// Turn a token response into an injectable token, or a `malformed` error.
    fn activate(&self, set: &TokenSet, elapsed: Duration) -> Result<Arc<ActiveToken>, FetchError> {
        let lifetime = expiry::lifetime(
            set.expires_in.as_ref(),
            set.access_token.expose(),
            self.timing.default_lifetime,
            self.timing.max_lifetime,
            SystemTime::now(),
        )
        .map_err(|e| FetchError::new(ErrorClass::Malformed, e.to_string()))?;
        self.build(set, lifetime, elapsed)
    }

    fn build(&self, set: &TokenSet, lifetime: Lifetime, elapsed: Duration) -> Result<Arc<ActiveToken>, FetchError> {
        let headers = self.render_upstream_headers(set)?;
        let generation = self.cell.next_generation();
        ActiveToken::new(
            set.access_token.expose(),
            &self.header_prefix,
            generation,
            lifetime,
            elapsed,
            self.timing.expiry_margin,
            set.scope.clone(),
            set.extras.clone(),
            headers,
        )
        .map(Arc::new)
        .ok_or_else(|| FetchError::new(ErrorClass::Malformed, "token contains characters not allowed in a header"))
    }

    /// Headers from token-response values (`{org_id}`) and config (`{app_key}`),
    /// rendered once per token so the request path only clones them.
    fn render_upstream_headers(&self, set: &TokenSet) -> Result<Vec<(HeaderName, HeaderValue)>, FetchError> {
        if self.upstream_headers.is_empty() {
            return Ok(Vec::new());
        }
        let mut vars = self.source.config_vars().cloned().unwrap_or_default();
        vars.extend(set.vars.iter().map(|(k, v)| (k.clone(), v.clone())));
        vars.insert("token".into(), set.access_token.clone());
        let mut out = Vec::with_capacity(self.upstream_headers.len());
        for (name, tpl) in &self.upstream_headers {
            let v = tpl
                .render(&vars)
                .map_err(|e| FetchError::new(ErrorClass::Malformed, format!("upstream header `{name}`: {e}")))?;
            let mut hv = HeaderValue::from_str(&v).map_err(|_| {
                FetchError::new(ErrorClass::Malformed, format!("upstream header `{name}` is not a valid value"))
            })?;
            hv.set_sensitive(true);
            out.push((name.clone(), hv));
        }
        Ok(out)
    }

    fn stored(&self, set: &TokenSet, token: &ActiveToken) -> StoredToken {
        StoredToken {
            fingerprint: self.fingerprint.clone(),
            token: set.access_token.expose().to_string(),
            issued_at: token.issued_at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            expires_at: token.expires_at.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs()),
            scope: set.scope.clone(),
            vars: set.vars.iter().map(|(k, v)| (k.clone(), v.expose().to_string())).collect(),
            extras: set.extras.clone(),
        }
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

/// The IdP said no to the grant itself (as opposed to a gateway, WAF or outage).
fn grant_rejected(e: &FetchError) -> bool {
    e.class == ErrorClass::InvalidGrant || (e.class.is_credential() && e.oauth_error.is_some())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn unix_f(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn to_system(at: Instant) -> SystemTime {
    SystemTime::now() + at.saturating_duration_since(Instant::now())
}
