//! The life of one provider as an IO-free state machine.
//!
//! Every decision about a provider (when to fetch, what to publish, when a human session
//! is over, how long to back off) is made here, from events and a clock reading passed
//! in, and comes out as a list of [`Action`]s for the async driver
//! ([`super::driver`]) to execute. Nothing here awaits, sleeps or reads a clock, so the
//! whole life of a provider can be replayed on a virtual clock in microseconds, and
//! random event sequences can check the invariants that matter:
//!
//! - at most one fetch is in flight;
//! - a token is never published past its usable time;
//! - a retired provider asks for nothing (no fetch, publish, save or remove);
//! - a session that only a human can renew ends only on an explicit rejection (the
//!   upstream's 401 for that token, or the IdP's verdict on the grant), never on an
//!   outage.
//!
//! ```text
//!            Start
//!              │ stored token usable ──────────────┐
//!              ▼                                   ▼
//!          Starting ──fetch──▶ Refreshing ──ok──▶ Valid ──refresh due / 401──▶ Refreshing
//!              │                   │  ▲            ▲  │
//!              │ needs a human     │  └──retry─────┤  └─ expired, human-only ─▶ AwaitingCode
//!              ▼                   ▼ error         │ok
//!         AwaitingCode ◀── grant rejected ── Backoff (still serving a usable token)
//!              │ code ok ─────────────────────────▶ Valid
//!
//!          any phase ──Shutdown──▶ Retired (final: every later event is ignored)
//! ```

use std::time::{Duration, Instant};

use super::schedule;

/// Where a provider is in its life (what the admin API shows as `phase`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// No token yet and nothing decided (before `Start`).
    #[default]
    Starting,
    /// Holding a token; the next renewal is scheduled.
    Valid,
    /// A token request is in flight (any token held keeps being served).
    Refreshing,
    /// The last attempt failed; waiting before the next (any usable token keeps being served).
    Backoff,
    /// Only a human login can produce a token now.
    AwaitingCode,
    /// Replaced or removed by a reload, or shutting down. Final.
    Retired,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Valid => "valid",
            Phase::Refreshing => "refreshing",
            Phase::Backoff => "backoff",
            Phase::AwaitingCode => "awaiting_code",
            Phase::Retired => "retired",
        }
    }
}

/// Which request to the IdP the driver should make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchKind {
    /// The configured grant, from scratch.
    Acquire,
    /// The refresh flow, with the refresh token held.
    Refresh,
    /// The login steps before the code (e.g. have the IdP send an OTP).
    LoginStart,
    /// The login steps with the human's code.
    LoginCode,
}

impl FetchKind {
    /// Whether a success yields a token (login start only yields a pending login).
    fn yields_token(self) -> bool {
        !matches!(self, FetchKind::LoginStart)
    }
}

/// What the machine needs to know about a token: timing only, never the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenMeta {
    pub generation: u64,
    /// Total lifetime as issued (`None`: never expires).
    pub lifetime: Option<Duration>,
    /// When it expires (`None`: never).
    pub expires_at: Option<Instant>,
    /// After this it is not injected (expiry minus the margin). `None`: never.
    pub usable_until: Option<Instant>,
    /// The response held what a refresh flow needs (a refresh token).
    pub refreshable: bool,
}

impl TokenMeta {
    pub fn usable_at(&self, now: Instant) -> bool {
        self.usable_until.is_none_or(|u| now < u)
    }
}

/// How a failed request to the IdP is to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// A configuration or credential problem (`invalid_client`, `invalid_grant`, 401/403).
    pub credential: bool,
    /// The IdP itself said no to the grant (an RFC 6749 error such as `invalid_grant`),
    /// as opposed to a gateway, a WAF or an outage.
    pub grant_rejected: bool,
    /// The IdP asked us to wait (429 `Retry-After`).
    pub retry_after: Option<Duration>,
}

/// What the provider can do without help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// The configured grant works without a human.
    pub can_acquire: bool,
    /// There is a human login flow.
    pub has_login: bool,
}

/// The timing settings the machine applies; changed in place by a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub refresh_before: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event {
    /// The driver has read the store: the token it restored, if any (usable or not).
    Start { stored: Option<TokenMeta> },
    /// The in-flight request produced a token (already built and checked by the driver).
    Fetched(TokenMeta),
    /// Another replica published a newer token (fleet mode); the driver has built it.
    Shared(TokenMeta),
    /// The in-flight login start succeeded: a code is now awaited.
    LoginStarted,
    /// The in-flight request failed.
    Failed(Failure),
    /// The upstream rejected the token of this generation (the cell already dropped it).
    Rejected { generation: u64 },
    /// Requests are waiting and no usable token is held.
    Demand,
    /// The token of this generation is spent by the wall clock though not by the
    /// monotonic one (the host slept): treat it as expired now.
    Expired { generation: u64 },
    /// The admin API asked for a new token now.
    Force,
    /// A human asked to start a login.
    LoginStart,
    /// A human delivered a code.
    Code,
    /// A reload changed settings of this provider but not its identity.
    Reconfigure { schedule: Schedule, caps: Caps, credentials_changed: bool },
    /// The time asked for by the last `SleepUntil` has come.
    Tick,
    /// Retire: stop for good.
    Shutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Make this request to the IdP and feed back its outcome.
    Fetch(FetchKind),
    /// Make the token just fetched (or restored) the one injected.
    Publish,
    /// Persist the token just published.
    Save,
    /// Delete the stored entry: the session is over.
    Remove,
    /// Drop the refresh token held: the IdP rejected it.
    ForgetRefresh,
    /// Tell waiters and the admin API that a human login is needed.
    AwaitCode,
    /// Tell waiters the outcome of an attempt (success, failure, nothing to do).
    Report,
    /// Wake the machine with `Tick` at this time (`None`: only events wake it).
    SleepUntil(Option<Instant>),
}

pub struct Machine {
    schedule: Schedule,
    caps: Caps,
    started: bool,
    retired: bool,
    awaiting_code: bool,
    /// The token published (usable or not); `None` after a rejection.
    token: Option<TokenMeta>,
    /// A refresh token is held (from the latest response that carried one).
    refresh_held: bool,
    in_flight: Option<FetchKind>,
    failures: u32,
    wake_at: Option<Instant>,
    /// A login was started and its code is awaited.
    pending_login: bool,
    /// Credentials changed while a request was in flight: fetch again with the new ones.
    refetch: bool,
    /// When the last token request (acquire or refresh) started.
    last_request_at: Option<Instant>,
    /// The IdP asked not to be called before this (429 `Retry-After`).
    not_before: Option<Instant>,
    /// The wake-up set aside while a login step runs.
    parked_wake: Option<Instant>,
    /// The clock reading of the event being handled.
    now: Instant,
    rng: fastrand::Rng,
}

impl Machine {
    pub fn new(schedule: Schedule, caps: Caps, seed: u64) -> Self {
        Machine {
            schedule,
            caps,
            started: false,
            retired: false,
            awaiting_code: false,
            token: None,
            refresh_held: false,
            in_flight: None,
            failures: 0,
            wake_at: None,
            pending_login: false,
            refetch: false,
            last_request_at: None,
            not_before: None,
            parked_wake: None,
            now: Instant::now(),
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    pub fn phase(&self) -> Phase {
        if self.retired {
            Phase::Retired
        } else if matches!(self.in_flight, Some(FetchKind::Acquire | FetchKind::Refresh)) {
            Phase::Refreshing
        } else if self.awaiting_code {
            Phase::AwaitingCode
        } else if self.failures > 0 {
            Phase::Backoff
        } else if self.token.is_some() {
            Phase::Valid
        } else {
            Phase::Starting
        }
    }

    pub fn in_flight(&self) -> Option<FetchKind> {
        self.in_flight
    }

    pub fn wake_at(&self) -> Option<Instant> {
        self.wake_at
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn pending_login(&self) -> bool {
        self.pending_login
    }

    pub fn awaiting_code(&self) -> bool {
        self.awaiting_code
    }

    /// Whether a refresh token is held.
    pub fn refresh_held(&self) -> bool {
        self.refresh_held
    }

    /// Whether the token the machine holds is usable by the monotonic clock.
    pub fn holds_usable(&self, now: Instant) -> bool {
        self.token_usable(now)
    }

    /// Feed one event; returns what the driver must do, in order.
    pub fn handle(&mut self, now: Instant, event: Event) -> Vec<Action> {
        let mut out = Vec::new();
        if self.retired {
            return out;
        }
        self.now = now;
        let wake_before = self.wake_at;
        match event {
            Event::Shutdown => {
                self.retired = true;
                self.in_flight = None;
                self.wake_at = None;
                return out;
            }
            Event::Start { stored } => self.start(now, stored, &mut out),
            Event::Fetched(meta) => self.fetched(now, meta, &mut out),
            Event::Shared(meta) => {
                // Only between requests: a request in flight comes back with the fleet's
                // newest token itself.
                if self.started && self.in_flight.is_none() && meta.usable_at(now) {
                    self.failures = 0;
                    self.awaiting_code = false;
                    self.pending_login = false;
                    self.token = Some(meta);
                    self.refresh_held = meta.refreshable;
                    out.push(Action::Publish);
                    out.push(Action::Report);
                    self.wake_at = self.refresh_at(now, &meta);
                }
            }
            Event::LoginStarted => {
                if self.in_flight == Some(FetchKind::LoginStart) {
                    self.in_flight = None;
                    self.pending_login = true;
                    // Requests are turned away with `login_required` only when no token can
                    // be had otherwise; a pending login alone does not stop a usable or
                    // renewable token.
                    if !self.token_usable(now) && !self.refresh_held {
                        self.await_code(&mut out);
                    }
                    self.after_request(now, &mut out);
                }
            }
            Event::Failed(f) => self.failed(now, f, &mut out),
            Event::Rejected { generation } => {
                if self.token.is_some_and(|t| t.generation == generation) {
                    self.token = None;
                    // A backoff protects the IdP: the rejection is served when it ends.
                    // (A token only a human can renew has no IdP to protect.)
                    let renewable = self.refresh_held || self.caps.can_acquire;
                    if self.in_flight.is_none() && (self.failures == 0 || !renewable) {
                        self.renew_or_end(now, true, &mut out);
                    } else if self.in_flight.is_none() {
                        self.pull_forward(now, &mut out);
                    }
                }
            }
            Event::Expired { generation } => {
                if let Some(t) = self.token.as_mut().filter(|t| t.generation == generation) {
                    t.usable_until = Some(now);
                    t.expires_at = Some(t.expires_at.map_or(now, |e| e.min(now)));
                }
                if self.started && self.in_flight.is_none() && !self.token_usable(now) {
                    if self.failures == 0 {
                        self.renew_or_end(now, false, &mut out);
                    } else {
                        self.pull_forward(now, &mut out);
                    }
                }
            }
            Event::Demand => {
                if self.started && self.in_flight.is_none() && !self.token_usable(now) {
                    if self.failures == 0 {
                        self.renew_or_end(now, false, &mut out);
                    } else {
                        self.pull_forward(now, &mut out);
                    }
                }
            }
            Event::Force => {
                if self.started && self.in_flight.is_none() {
                    if self.refresh_held {
                        self.fetch(FetchKind::Refresh, &mut out);
                    } else if self.caps.can_acquire {
                        self.fetch(FetchKind::Acquire, &mut out);
                    } else {
                        // Nothing can renew this token without a human; say so at once.
                        out.push(Action::Report);
                    }
                }
            }
            Event::LoginStart => {
                if self.started && self.in_flight.is_none() && self.caps.has_login {
                    self.fetch(FetchKind::LoginStart, &mut out);
                }
            }
            Event::Code => {
                if self.started && self.in_flight.is_none() && self.caps.has_login {
                    self.fetch(FetchKind::LoginCode, &mut out);
                }
            }
            Event::Reconfigure { schedule, caps, credentials_changed } => {
                self.schedule = schedule;
                self.caps = caps;
                if let (Some(t), None, 0) = (self.token, self.in_flight, self.failures) {
                    self.wake_at = self.refresh_at(now, &t);
                }
                if self.failures > 0 {
                    // A shorter backoff_max applies now, not after the longer wait.
                    self.wake_at = self.wake_at.map(|w| w.min(now + self.schedule.backoff_max));
                }
                if credentials_changed && (self.caps.can_acquire || self.refresh_held) && self.started {
                    // Keep serving the current token; fetch one with the new credentials.
                    match self.in_flight {
                        None => self.renew(&mut out),
                        Some(_) => self.refetch = true,
                    }
                }
            }
            Event::Tick => {
                if self.started && self.in_flight.is_none() && self.wake_at.is_some_and(|w| now >= w) {
                    self.wake_at = None;
                    self.tick(now, &mut out);
                }
            }
        }
        if self.wake_at != wake_before {
            out.push(Action::SleepUntil(self.wake_at));
        }
        out
    }

    fn start(&mut self, now: Instant, stored: Option<TokenMeta>, out: &mut Vec<Action>) {
        if self.started {
            return;
        }
        self.started = true;
        match stored {
            Some(t) if t.usable_at(now) => {
                self.token = Some(t);
                self.refresh_held = t.refreshable;
                out.push(Action::Publish);
                out.push(Action::Report);
                self.wake_at = self.refresh_at(now, &t);
            }
            // The access token is spent, but its refresh token may not be: refresh now
            // instead of asking a human again (seed 002's user tokens).
            Some(t) if t.refreshable => {
                self.refresh_held = true;
                self.fetch(FetchKind::Refresh, out);
            }
            _ if self.caps.can_acquire => self.fetch(FetchKind::Acquire, out),
            _ => self.await_code(out),
        }
    }

    fn fetched(&mut self, now: Instant, meta: TokenMeta, out: &mut Vec<Action>) {
        let Some(kind) = self.in_flight.filter(|k| k.yields_token()) else { return };
        if !meta.usable_at(now) {
            // Never publish a token that cannot be injected; count it as a bad response.
            self.failed(now, Failure { credential: false, grant_rejected: false, retry_after: None }, out);
            return;
        }
        self.in_flight = None;
        self.failures = 0;
        self.awaiting_code = false;
        if kind == FetchKind::LoginCode {
            self.pending_login = false;
        }
        self.token = Some(meta);
        self.refresh_held = meta.refreshable;
        out.push(Action::Publish);
        out.push(Action::Save);
        out.push(Action::Report);
        self.wake_at = self.refresh_at(now, &meta);
        self.after_request(now, out);
    }

    fn failed(&mut self, now: Instant, f: Failure, out: &mut Vec<Action>) {
        let Some(kind) = self.in_flight.take() else { return };
        match kind {
            // A failed login step changes nothing: the human may try again.
            FetchKind::LoginStart | FetchKind::LoginCode => {
                out.push(Action::Report);
                self.after_request(now, out);
                return;
            }
            FetchKind::Refresh if self.caps.can_acquire && (f.credential || !self.token_usable(now)) => {
                // The refresh token is dead (or the refresh flow fails and nothing usable is
                // left): re-authenticate with the configured grant at once.
                self.refresh_held = false;
                out.push(Action::ForgetRefresh);
                self.fetch(FetchKind::Acquire, out);
                return;
            }
            FetchKind::Refresh | FetchKind::Acquire => {}
        }
        self.failures = self.failures.saturating_add(1);
        if !self.caps.can_acquire && f.grant_rejected && !self.token_usable(now) {
            // The IdP's explicit verdict on a session only a human can renew.
            self.failures = 0;
            self.token = None;
            self.refresh_held = false;
            self.wake_at = None;
            out.push(Action::ForgetRefresh);
            out.push(Action::Remove);
            self.await_code(out);
            return;
        }
        let mut wait =
            schedule::backoff(self.failures, self.schedule.backoff_min, self.schedule.backoff_max, self.rng.f64());
        self.not_before = f.retry_after.map(|ra| now + ra);
        if let Some(ra) = f.retry_after {
            wait = wait.max(ra);
        }
        self.wake_at = Some(now + wait);
        out.push(Action::Report);
        self.refetch = false;
    }

    /// After a request finished: resume a schedule a login step set aside, and fetch
    /// again if credentials changed meanwhile.
    fn after_request(&mut self, _now: Instant, out: &mut Vec<Action>) {
        if let Some(w) = self.parked_wake.take() {
            if self.wake_at.is_none() && !self.awaiting_code {
                self.wake_at = Some(w);
            }
        }
        if std::mem::take(&mut self.refetch) && self.in_flight.is_none() {
            self.renew(out);
        }
    }

    fn tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.awaiting_code && !self.refresh_held {
            return;
        }
        self.renew_or_end(now, false, out);
    }

    /// Renew the token if anything can; otherwise, once no usable token is left, end
    /// the session (`rejected`: the upstream said the token is dead).
    fn renew_or_end(&mut self, now: Instant, rejected: bool, out: &mut Vec<Action>) {
        if self.refresh_held || self.caps.can_acquire {
            self.renew(out);
            return;
        }
        if self.token_usable(now) && !rejected {
            // Only a human can renew this token, and it is still good: look again when
            // it stops being usable.
            self.wake_at = self.token.and_then(|t| t.usable_until);
            out.push(Action::Report);
            return;
        }
        if !self.awaiting_code {
            // The token is dead or gone and only a human can renew it: it must not come
            // back from the store after a restart.
            self.token = None;
            out.push(Action::Remove);
            self.await_code(out);
        }
    }

    /// Requests are waiting for a provider that holds no usable token and is backing off:
    /// try again as soon as `backoff_min` has passed since the last request to the IdP,
    /// not at the end of a backoff grown long during an outage. A request flood still
    /// makes at most one IdP request per `backoff_min`; a quiet provider keeps the plain
    /// backoff.
    fn pull_forward(&mut self, now: Instant, out: &mut Vec<Action>) {
        if !(self.refresh_held || self.caps.can_acquire) {
            return;
        }
        let mut earliest = self.last_request_at.map_or(now, |t| t + self.schedule.backoff_min);
        // The IdP's own `Retry-After` is never cut short.
        if let Some(nb) = self.not_before {
            earliest = earliest.max(nb);
        }
        if now >= earliest {
            self.renew(out);
        } else if self.wake_at.is_none_or(|w| w > earliest) {
            self.wake_at = Some(earliest);
            // Waiting requests learn that the next attempt is sooner and may wait for it.
            out.push(Action::Report);
        }
    }

    fn renew(&mut self, out: &mut Vec<Action>) {
        if self.refresh_held {
            self.fetch(FetchKind::Refresh, out);
        } else if self.caps.can_acquire {
            self.fetch(FetchKind::Acquire, out);
        }
    }

    fn fetch(&mut self, kind: FetchKind, out: &mut Vec<Action>) {
        debug_assert!(self.in_flight.is_none());
        if self.in_flight.is_some() {
            return;
        }
        self.in_flight = Some(kind);
        if matches!(kind, FetchKind::Acquire | FetchKind::Refresh) {
            self.last_request_at = Some(self.now);
            self.wake_at = None;
        } else {
            // A login step does not replace the renewal schedule: it resumes afterwards.
            self.parked_wake = self.wake_at.take();
        }
        out.push(Action::Fetch(kind));
    }

    fn await_code(&mut self, out: &mut Vec<Action>) {
        self.awaiting_code = true;
        self.wake_at = None;
        out.push(Action::AwaitCode);
    }

    fn token_usable(&self, now: Instant) -> bool {
        self.token.is_some_and(|t| t.usable_at(now))
    }

    /// When to renew `t`: the pure schedule, never sooner than `backoff_min` from now
    /// (whatever tiny lifetime the IdP claims). `None` for a token that never expires.
    fn refresh_at(&mut self, now: Instant, t: &TokenMeta) -> Option<Instant> {
        let (Some(total), Some(exp)) = (t.lifetime, t.expires_at) else { return None };
        let remaining = exp.saturating_duration_since(now);
        let wait = schedule::refresh_in(total, remaining, self.schedule.refresh_before, self.rng.f64());
        Some(now + wait.max(self.schedule.backoff_min))
    }
}

#[cfg(test)]
mod tests;
