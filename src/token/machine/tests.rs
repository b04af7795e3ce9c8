//! The machine on a virtual clock: scenarios first, then random event sequences checked
//! against the invariants in the module docs.

use super::*;

const S: fn(u64) -> Duration = Duration::from_secs;

fn schedule() -> Schedule {
    Schedule { refresh_before: S(60), backoff_min: Duration::from_millis(500), backoff_max: S(60) }
}

const MACHINE: Caps = Caps { can_acquire: true, has_login: false };
const HUMAN: Caps = Caps { can_acquire: false, has_login: true };

fn token(now: Instant, generation: u64, life: Option<u64>, refreshable: bool) -> TokenMeta {
    TokenMeta {
        generation,
        lifetime: life.map(S),
        expires_at: life.map(|l| now + S(l)),
        usable_until: life.map(|l| now + S(l) - S(5).min(S(l) / 4)),
        refreshable,
    }
}

fn outage() -> Failure {
    Failure { credential: false, grant_rejected: false, retry_after: None }
}

fn invalid_grant() -> Failure {
    Failure { credential: true, grant_rejected: true, retry_after: None }
}

fn fetches(actions: &[Action]) -> Vec<FetchKind> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Fetch(k) => Some(*k),
            _ => None,
        })
        .collect()
}

#[test]
fn cold_start_fetches_then_schedules_refresh_ahead_of_expiry() {
    let t0 = Instant::now();
    let mut m = Machine::new(schedule(), MACHINE, 1);
    assert_eq!(fetches(&m.handle(t0, Event::Start { stored: None })), vec![FetchKind::Acquire]);
    assert_eq!(m.phase(), Phase::Refreshing);
    let a = m.handle(t0 + S(1), Event::Fetched(token(t0 + S(1), 1, Some(3600), false)));
    assert_eq!(&a[..3], &[Action::Publish, Action::Save, Action::Report]);
    assert_eq!(m.phase(), Phase::Valid);
    let wake = m.wake_at().expect("refresh scheduled");
    // 80 % of 3600 s, moved earlier by at most 10 % jitter.
    assert!(wake >= t0 + S(1) + S(2520) && wake <= t0 + S(1) + S(2880), "{:?}", wake - t0);
    assert!(m.handle(wake - S(1), Event::Tick).is_empty(), "not yet due");
    assert_eq!(fetches(&m.handle(wake, Event::Tick)), vec![FetchKind::Acquire]);
}

#[test]
fn usable_stored_token_is_published_without_a_request() {
    let t0 = Instant::now();
    let mut m = Machine::new(schedule(), MACHINE, 1);
    let a = m.handle(t0, Event::Start { stored: Some(token(t0, 1, Some(600), false)) });
    assert_eq!(a[0], Action::Publish);
    assert!(fetches(&a).is_empty());
    assert!(!a.contains(&Action::Save), "restoring writes nothing back");
}

#[test]
fn expired_stored_token_with_refresh_token_is_refreshed_not_asked_of_a_human() {
    let t0 = Instant::now();
    let mut m = Machine::new(schedule(), HUMAN, 1);
    let mut stored = token(t0 - S(7200), 1, Some(3600), true);
    stored.usable_until = Some(t0 - S(3600));
    assert_eq!(fetches(&m.handle(t0, Event::Start { stored: Some(stored) })), vec![FetchKind::Refresh]);
    assert!(!m.awaiting_code());
}

#[test]
fn failures_back_off_exponentially_and_keep_serving() {
    let t0 = Instant::now();
    let mut m = Machine::new(schedule(), MACHINE, 7);
    m.handle(t0, Event::Start { stored: None });
    m.handle(t0, Event::Fetched(token(t0, 1, Some(100), false)));
    let mut now = m.wake_at().expect("scheduled");
    m.handle(now, Event::Tick);
    let mut last_wait = Duration::ZERO;
    for i in 1..=12u32 {
        let a = m.handle(now, Event::Failed(outage()));
        assert!(!a.contains(&Action::Publish) && !a.contains(&Action::Remove));
        assert_eq!(m.phase(), Phase::Backoff);
        let wake = m.wake_at().expect("retry scheduled");
        let wait = wake - now;
        assert!(wait >= Duration::from_millis(500) && wait <= S(60), "attempt {i}: {wait:?}");
        last_wait = last_wait.max(wait);
        // Demand does not cut a backoff short while the token is still usable.
        assert!(fetches(&m.handle(now, Event::Demand)).is_empty());
        now = wake;
        assert_eq!(fetches(&m.handle(now, Event::Tick)).len(), 1);
    }
    assert!(last_wait > S(8), "backoff grew: {last_wait:?}");
    m.handle(now, Event::Fetched(token(now, 2, Some(100), false)));
    assert_eq!(m.phase(), Phase::Valid);
    assert_eq!(m.failures(), 0);
}

#[test]
fn waiting_requests_pull_the_next_attempt_forward_at_most_once_per_backoff_min() {
    let t0 = Instant::now();
    let sched = Schedule { refresh_before: S(1), backoff_min: S(1), backoff_max: S(60) };
    let mut m = Machine::new(sched, MACHINE, 5);
    m.handle(t0, Event::Start { stored: None });
    // A long outage: the backoff grows to a minute.
    let mut now = t0;
    for _ in 0..12 {
        m.handle(now, Event::Failed(outage()));
        now = m.wake_at().expect("retry");
        m.handle(now, Event::Tick);
    }
    m.handle(now, Event::Failed(outage()));
    let scheduled = m.wake_at().expect("retry");
    assert!(scheduled > now + S(10), "the backoff has grown: {:?}", scheduled - now);
    // Requests arrive: the next attempt moves to one backoff_min after the last request.
    let a = m.handle(now + Duration::from_millis(200), Event::Demand);
    assert!(fetches(&a).is_empty(), "not sooner than backoff_min");
    assert_eq!(m.wake_at(), Some(now + S(1)));
    // A flood of demand changes nothing more.
    for i in 0..100 {
        assert!(fetches(&m.handle(now + Duration::from_millis(300 + i), Event::Demand)).is_empty());
    }
    assert_eq!(fetches(&m.handle(now + S(1), Event::Tick)), vec![FetchKind::Acquire]);
    // Without demand, the plain backoff holds.
    let later = now + S(1);
    m.handle(later, Event::Failed(outage()));
    assert!(m.wake_at().expect("retry") > later + S(10));
}

#[test]
fn retry_after_is_honoured() {
    let t0 = Instant::now();
    let mut m = Machine::new(schedule(), MACHINE, 1);
    m.handle(t0, Event::Start { stored: None });
    m.handle(t0, Event::Failed(Failure { retry_after: Some(S(30)), ..outage() }));
    assert!(m.wake_at().expect("scheduled") >= t0 + S(30));
    // Waiting requests do not cut it short either.
    assert!(fetches(&m.handle(t0 + S(5), Event::Demand)).is_empty());
    assert!(m.wake_at().expect("scheduled") >= t0 + S(30));
}

#[test]
fn rejected_refresh_token_falls_back_to_the_grant_at_once() {
    let t0 = Instant::now();
    let mut m = Machine::new(schedule(), MACHINE, 1);
    m.handle(t0, Event::Start { stored: None });
    m.handle(t0, Event::Fetched(token(t0, 1, Some(100), true)));
    let due = m.wake_at().expect("scheduled");
    assert_eq!(fetches(&m.handle(due, Event::Tick)), vec![FetchKind::Refresh]);
    let a = m.handle(due, Event::Failed(invalid_grant()));
    assert_eq!(a[0], Action::ForgetRefresh);
    assert_eq!(fetches(&a), vec![FetchKind::Acquire]);
    assert_eq!(m.failures(), 0, "a fallback is not a failed attempt");
}

#[test]
fn upstream_rejection_renews_once_by_generation() {
    let t0 = Instant::now();
    let mut m = Machine::new(schedule(), MACHINE, 1);
    m.handle(t0, Event::Start { stored: None });
    m.handle(t0, Event::Fetched(token(t0, 5, Some(3600), false)));
    assert!(fetches(&m.handle(t0, Event::Rejected { generation: 4 })).is_empty(), "older generation");
    assert_eq!(fetches(&m.handle(t0, Event::Rejected { generation: 5 })), vec![FetchKind::Acquire]);
    assert!(fetches(&m.handle(t0, Event::Rejected { generation: 5 })).is_empty(), "one fetch in flight");
}

#[test]
fn human_session_survives_outages_and_ends_only_on_explicit_rejection() {
    let t0 = Instant::now();
    // A seed-002 user token: a human logged in once; a refresh token renews it.
    let mut m = Machine::new(schedule(), HUMAN, 3);
    m.handle(t0, Event::Start { stored: None });
    assert!(m.awaiting_code());
    assert_eq!(fetches(&m.handle(t0, Event::Code)), vec![FetchKind::LoginCode]);
    m.handle(t0, Event::Fetched(token(t0, 1, Some(60), true)));
    assert!(!m.awaiting_code());
    let mut now = m.wake_at().expect("refresh scheduled");
    // The IdP is down for a long time, well past the token's expiry: the session stays.
    for _ in 0..20 {
        let a = m.handle(now, Event::Tick);
        assert_eq!(fetches(&a), vec![FetchKind::Refresh]);
        let a = m.handle(now, Event::Failed(outage()));
        assert!(!a.contains(&Action::Remove) && !a.contains(&Action::AwaitCode), "outage ended the session");
        now = m.wake_at().expect("retry");
    }
    assert!(now > t0 + S(120));
    // A 403 from a WAF (credential-looking, but no RFC 6749 error) does not end it either.
    m.handle(now, Event::Tick);
    let waf = Failure { credential: true, grant_rejected: false, retry_after: None };
    assert!(!m.handle(now, Event::Failed(waf)).contains(&Action::Remove));
    // The IdP's explicit verdict does.
    now = m.wake_at().expect("retry");
    m.handle(now, Event::Tick);
    let a = m.handle(now, Event::Failed(invalid_grant()));
    assert!(a.contains(&Action::Remove) && a.contains(&Action::AwaitCode));
    assert_eq!(m.phase(), Phase::AwaitingCode);
}

#[test]
fn never_expiring_human_token_is_kept_until_the_upstream_rejects_it() {
    let t0 = Instant::now();
    let mut m = Machine::new(schedule(), HUMAN, 1);
    m.handle(t0, Event::Start { stored: Some(token(t0, 1, None, false)) });
    assert_eq!(m.wake_at(), None, "nothing to schedule");
    assert!(m.handle(t0 + S(86400), Event::Force).iter().all(|a| *a == Action::Report));
    let a = m.handle(t0 + S(86400), Event::Rejected { generation: 1 });
    assert!(a.contains(&Action::Remove) && a.contains(&Action::AwaitCode));
}

#[test]
fn pending_login_does_not_turn_away_a_usable_token() {
    let t0 = Instant::now();
    let mut m = Machine::new(schedule(), HUMAN, 1);
    m.handle(t0, Event::Start { stored: Some(token(t0, 1, None, false)) });
    assert_eq!(fetches(&m.handle(t0, Event::LoginStart)), vec![FetchKind::LoginStart]);
    m.handle(t0, Event::LoginStarted);
    assert!(m.pending_login());
    assert!(!m.awaiting_code(), "the stored token is still good");
    // A wrong code changes nothing.
    m.handle(t0, Event::Code);
    let a = m.handle(t0, Event::Failed(invalid_grant()));
    assert!(!a.contains(&Action::Remove));
    assert!(m.pending_login());
}

#[test]
fn credentials_change_fetches_anew_while_the_old_token_serves() {
    let t0 = Instant::now();
    let mut m = Machine::new(schedule(), MACHINE, 1);
    m.handle(t0, Event::Start { stored: None });
    m.handle(t0, Event::Fetched(token(t0, 1, Some(3600), false)));
    let a = m.handle(t0 + S(10), Event::Reconfigure { schedule: schedule(), caps: MACHINE, credentials_changed: true });
    assert_eq!(fetches(&a), vec![FetchKind::Acquire]);
    assert!(!a.contains(&Action::Publish), "the old token is not dropped");
    // The IdP is down: the old token keeps serving, backoff as usual.
    let a = m.handle(t0 + S(10), Event::Failed(outage()));
    assert!(!a.iter().any(|x| matches!(x, Action::Remove | Action::Publish)));
    // A timing-only change fetches nothing.
    let mut m = Machine::new(schedule(), MACHINE, 1);
    m.handle(t0, Event::Start { stored: None });
    m.handle(t0, Event::Fetched(token(t0, 1, Some(3600), false)));
    let quick = Schedule { backoff_max: S(5), ..schedule() };
    let a = m.handle(t0, Event::Reconfigure { schedule: quick, caps: MACHINE, credentials_changed: false });
    assert!(fetches(&a).is_empty());
}

#[test]
fn credentials_change_during_a_request_fetches_again_after_it() {
    let t0 = Instant::now();
    let mut m = Machine::new(schedule(), MACHINE, 1);
    m.handle(t0, Event::Start { stored: None });
    let a = m.handle(t0, Event::Reconfigure { schedule: schedule(), caps: MACHINE, credentials_changed: true });
    assert!(fetches(&a).is_empty(), "never two requests at once");
    let a = m.handle(t0, Event::Fetched(token(t0, 1, Some(3600), false)));
    assert_eq!(fetches(&a), vec![FetchKind::Acquire]);
}

#[test]
fn shorter_backoff_max_applies_at_once() {
    let t0 = Instant::now();
    let mut m = Machine::new(schedule(), MACHINE, 1);
    m.handle(t0, Event::Start { stored: None });
    let mut now = t0;
    // Fail until the (jittered) wait exceeds 5 s.
    for _ in 0..100 {
        m.handle(now, Event::Failed(outage()));
        if m.wake_at().expect("retry") > now + S(5) {
            break;
        }
        now = m.wake_at().expect("retry");
        m.handle(now, Event::Tick);
    }
    assert!(m.wake_at().expect("retry") > now + S(5));
    let quick = Schedule { backoff_max: S(5), ..schedule() };
    m.handle(now, Event::Reconfigure { schedule: quick, caps: MACHINE, credentials_changed: false });
    assert!(m.wake_at().expect("retry") <= now + S(5));
}

#[test]
fn expired_fetch_result_is_never_published() {
    let t0 = Instant::now();
    let mut m = Machine::new(schedule(), MACHINE, 1);
    m.handle(t0, Event::Start { stored: None });
    let mut dead = token(t0 - S(100), 1, Some(10), false);
    dead.usable_until = Some(t0 - S(1));
    let a = m.handle(t0, Event::Fetched(dead));
    assert!(!a.contains(&Action::Publish));
    assert_eq!(m.phase(), Phase::Backoff);
}

#[test]
fn a_token_shared_by_the_fleet_is_published_without_a_request_or_a_save() {
    let t0 = Instant::now();
    let mut m = Machine::new(schedule(), HUMAN, 1);
    m.handle(t0, Event::Start { stored: None });
    assert!(m.awaiting_code());
    // Another replica completed the login.
    let a = m.handle(t0, Event::Shared(token(t0, 1, Some(3600), true)));
    assert_eq!(&a[..2], &[Action::Publish, Action::Report]);
    assert!(!a.contains(&Action::Save) && fetches(&a).is_empty());
    assert_eq!(m.phase(), Phase::Valid);
    // While a request is in flight, its own outcome decides.
    let due = m.wake_at().expect("scheduled");
    m.handle(due, Event::Tick);
    assert!(m.handle(due, Event::Shared(token(due, 2, Some(3600), true))).is_empty());
}

#[test]
fn a_login_step_does_not_cancel_the_renewal_schedule() {
    let t0 = Instant::now();
    let both = Caps { can_acquire: true, has_login: true };
    let mut m = Machine::new(schedule(), both, 1);
    m.handle(t0, Event::Start { stored: None });
    m.handle(t0, Event::Fetched(token(t0, 1, Some(3600), true)));
    let due = m.wake_at().expect("renewal scheduled");
    m.handle(t0 + S(1), Event::LoginStart);
    m.handle(t0 + S(2), Event::LoginStarted);
    assert_eq!(m.wake_at(), Some(due), "the renewal survives a login start");
    m.handle(t0 + S(3), Event::Code);
    m.handle(t0 + S(4), Event::Failed(invalid_grant()));
    assert_eq!(m.wake_at(), Some(due), "and a wrong code");
}

#[test]
fn a_token_spent_by_the_wall_clock_is_renewed_but_never_past_a_backoff() {
    let t0 = Instant::now();
    let mut m = Machine::new(schedule(), MACHINE, 1);
    m.handle(t0, Event::Start { stored: None });
    m.handle(t0, Event::Fetched(token(t0, 1, Some(3600), false)));
    // The host slept: by the monotonic clock the token has an hour left.
    assert_eq!(fetches(&m.handle(t0 + S(1), Event::Expired { generation: 1 })), vec![FetchKind::Acquire]);
    // The IdP is down: a second jump signal waits for backoff_min like any demand.
    m.handle(t0 + S(1), Event::Failed(outage()));
    assert!(fetches(&m.handle(t0 + S(1), Event::Expired { generation: 1 })).is_empty());
    // Only a human can renew: the session is over (the token is dead).
    let mut h = Machine::new(schedule(), HUMAN, 1);
    h.handle(t0, Event::Start { stored: Some(token(t0, 1, Some(3600), false)) });
    let a = h.handle(t0 + S(1), Event::Expired { generation: 1 });
    assert!(a.contains(&Action::AwaitCode));
}

#[test]
fn retired_machine_does_nothing() {
    let t0 = Instant::now();
    let mut m = Machine::new(schedule(), MACHINE, 1);
    m.handle(t0, Event::Start { stored: None });
    m.handle(t0, Event::Shutdown);
    assert_eq!(m.phase(), Phase::Retired);
    // The request that was in flight completes after retirement: nothing is published.
    assert!(m.handle(t0, Event::Fetched(token(t0, 1, Some(60), false))).is_empty());
    for e in [Event::Tick, Event::Demand, Event::Force, Event::Code, Event::Rejected { generation: 1 }] {
        assert!(m.handle(t0 + S(100), e).is_empty());
    }
}

// --- random event sequences -------------------------------------------------------

/// A model of the world around the machine: it answers the machine's requests (after a
/// random delay), delivers random events, and checks every action against the
/// invariants.
struct World {
    rng: fastrand::Rng,
    now: Instant,
    machine: Machine,
    caps: Caps,
    in_flight: Option<FetchKind>,
    generation: u64,
    /// The token the "cell" holds, as published.
    published: Option<TokenMeta>,
    /// The latest token the machine was handed (published or not).
    offered: Option<TokenMeta>,
    retired: bool,
    refresh_held: bool,
    had_session: bool,
    fetches: u32,
}

impl World {
    fn new(seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let caps = match rng.u8(0..3) {
            0 => MACHINE,
            1 => HUMAN,
            _ => Caps { can_acquire: true, has_login: true },
        };
        let schedule = Schedule {
            refresh_before: Duration::from_millis(rng.u64(0..5000)),
            backoff_min: Duration::from_millis(rng.u64(100..1000)),
            backoff_max: Duration::from_millis(rng.u64(1000..30_000)),
        };
        World {
            machine: Machine::new(schedule, caps, seed),
            rng,
            now: Instant::now(),
            caps,
            in_flight: None,
            generation: 0,
            published: None,
            offered: None,
            retired: false,
            refresh_held: false,
            had_session: false,
            fetches: 0,
        }
    }

    fn new_token(&mut self) -> TokenMeta {
        self.generation += 1;
        let life = match self.rng.u8(0..4) {
            0 => None,
            1 => Some(Duration::from_millis(self.rng.u64(1..2000))),
            _ => Some(Duration::from_millis(self.rng.u64(1000..600_000))),
        };
        let margin = Duration::from_millis(self.rng.u64(0..3000));
        // Sometimes the IdP hands out a token that is already dead (an `exp` in the past,
        // a response delayed past the token's life).
        let issued = match self.rng.u8(0..10) {
            0 => self.now - Duration::from_millis(self.rng.u64(0..700_000)),
            _ => self.now,
        };
        TokenMeta {
            generation: self.generation,
            lifetime: life,
            expires_at: life.map(|l| issued + l),
            usable_until: life.map(|l| issued + l.saturating_sub(margin.min(l / 4))),
            refreshable: self.rng.bool(),
        }
    }

    fn step(&mut self, seed: u64) {
        let r = self.rng.u8(0..100);
        let event = if let (Some(kind), true) = (self.in_flight, r < 35) {
            self.now += Duration::from_millis(self.rng.u64(0..3000));
            match (kind, self.rng.u8(0..10)) {
                (FetchKind::LoginStart, n) if n < 7 => Event::LoginStarted,
                (FetchKind::LoginStart, _) => Event::Failed(outage()),
                (_, 0..=5) => {
                    let t = self.new_token();
                    self.offered = Some(t);
                    Event::Fetched(t)
                }
                (_, 6..=7) => Event::Failed(outage()),
                (_, 8) => Event::Failed(invalid_grant()),
                _ => Event::Failed(Failure {
                    credential: self.rng.bool(),
                    grant_rejected: false,
                    retry_after: Some(Duration::from_millis(self.rng.u64(0..5000))),
                }),
            }
        } else {
            match r {
                0..=29 => {
                    // Time passes, up to (or past) the next wake-up.
                    match self.machine.wake_at() {
                        Some(w) if self.rng.bool() => self.now = self.now.max(w),
                        _ => self.now += Duration::from_millis(self.rng.u64(0..20_000)),
                    }
                    Event::Tick
                }
                30..=44 => Event::Demand,
                45..=54 => {
                    let g = match (self.published, self.rng.bool()) {
                        (Some(t), true) => t.generation,
                        _ => self.rng.u64(0..=self.generation),
                    };
                    if self.published.is_some_and(|t| t.generation == g) {
                        // The cell drops it before the machine hears of it.
                        self.published = None;
                    }
                    Event::Rejected { generation: g }
                }
                55..=62 => Event::Force,
                63..=70 => Event::LoginStart,
                71..=78 => Event::Code,
                79..=86 => {
                    let schedule = Schedule {
                        refresh_before: Duration::from_millis(self.rng.u64(0..5000)),
                        backoff_min: Duration::from_millis(self.rng.u64(100..1000)),
                        backoff_max: Duration::from_millis(self.rng.u64(1000..30_000)),
                    };
                    Event::Reconfigure { schedule, caps: self.caps, credentials_changed: self.rng.bool() }
                }
                87 => Event::Shutdown,
                88..=91 => {
                    let t = self.new_token();
                    self.offered = Some(t);
                    Event::Shared(t)
                }
                92..=93 => {
                    let g = self.published.map(|t| t.generation).unwrap_or(0);
                    // The wall clock says it is spent (the host slept).
                    self.published = None;
                    Event::Expired { generation: g }
                }
                _ => {
                    self.now += Duration::from_millis(self.rng.u64(0..500));
                    Event::Tick
                }
            }
        };
        let actions = self.machine.handle(self.now, event);
        self.check(seed, event, &actions);
    }

    fn check(&mut self, seed: u64, event: Event, actions: &[Action]) {
        let ctx = || format!("seed {seed}, event {event:?}, actions {actions:?}");
        if self.retired {
            assert!(actions.is_empty(), "retired machine acted: {}", ctx());
        }
        if let Event::Fetched(_) | Event::Failed(_) | Event::LoginStarted = event {
            if self.in_flight.is_some() {
                self.in_flight = None;
            }
        }
        for a in actions {
            match a {
                Action::Fetch(k) => {
                    assert!(self.in_flight.is_none(), "two requests in flight: {}", ctx());
                    if !self.caps.can_acquire {
                        assert_ne!(*k, FetchKind::Acquire, "acquire without a grant: {}", ctx());
                    }
                    self.in_flight = Some(*k);
                    self.fetches += 1;
                }
                Action::Publish => {
                    let t = self.offered.expect("publish with nothing offered");
                    assert!(t.usable_at(self.now), "published an unusable token: {}", ctx());
                    self.published = Some(t);
                    self.refresh_held = t.refreshable;
                    self.had_session = true;
                }
                Action::ForgetRefresh => {
                    assert!(
                        matches!(event, Event::Failed(f) if f.credential)
                            || !self.published.is_some_and(|t| t.usable_at(self.now)),
                        "refresh token dropped while it could still serve: {}",
                        ctx()
                    );
                    self.refresh_held = false;
                }
                Action::Remove => {
                    // A session ends only on an explicit rejection, or once its token is
                    // dead and nothing but a human can renew it (no refresh token, no
                    // grant). An outage never ends it.
                    let explicit = matches!(event, Event::Rejected { .. })
                        || matches!(event, Event::Failed(f) if f.grant_rejected);
                    let dead = !self.published.is_some_and(|t| t.usable_at(self.now));
                    let unrenewable = !self.caps.can_acquire && !self.refresh_held;
                    assert!(explicit || (dead && unrenewable), "session ended without cause: {}", ctx());
                    assert!(
                        !matches!(event, Event::Failed(f) if !f.grant_rejected),
                        "an outage ended a session: {}",
                        ctx()
                    );
                    assert!(!self.caps.can_acquire || explicit, "a machine grant never ends a session: {}", ctx());
                }
                _ => {}
            }
        }
        if let Event::Shutdown = event {
            self.retired = true;
            self.in_flight = None;
        }
        assert_eq!(self.machine.in_flight().is_some(), self.in_flight.is_some(), "in-flight bookkeeping: {}", ctx());
        if let Some(w) = self.machine.wake_at() {
            assert!(self.in_flight.is_none(), "a wake-up scheduled while a request is in flight: {}", ctx());
            let _ = w;
        }
    }
}

#[test]
fn random_event_sequences_keep_the_invariants() {
    let started = std::time::Instant::now();
    let mut total_fetches = 0;
    for seed in 0..2000u64 {
        let mut w = World::new(seed);
        w.machine.handle(w.now, Event::Start { stored: None });
        // Start may already have asked for a fetch.
        w.in_flight = w.machine.in_flight();
        for _ in 0..300 {
            w.step(seed);
        }
        total_fetches += w.fetches;
    }
    assert!(total_fetches > 10_000, "the sequences exercised requests ({total_fetches})");
    assert!(started.elapsed() < Duration::from_secs(10), "virtual time keeps this fast");
}
