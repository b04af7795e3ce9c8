//! The async half of a provider: executes what the [`Machine`] decides. It owns all IO
//! for one provider (token requests, the store, the cell, metrics and logs) and feeds
//! every outcome back to the machine as an event.
//!
//! A token request runs as a future polled beside shutdown, reload and wake-ups, so a
//! provider retired by a reload stops at once: its in-flight request is dropped and its
//! outcome is never published or saved. A successor with another identity waits for it
//! to stop before it starts (see [`Channels::predecessors`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderName, HeaderValue};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::cell::{Attempt, TokenCell};
use super::coordinate::{self, Ask, Got};
use super::expiry::{self, Lifetime};
use super::machine::{Action, Caps, Event, Failure, FetchKind, Machine, Schedule, TokenMeta};
use super::ActiveToken;
use crate::metrics;
use crate::provider::{ErrorClass, FetchError, TokenSet, TokenSource};
use crate::provider::{ProviderSpec, Timing};
use crate::secret::Secret;
use crate::store::fleet::{FleetMessage, Lease};
use crate::store::{Loaded, Saved, StoredToken, TokenStore, Version};
use crate::template::{Template, Vars};

/// Requests from the admin API. Each is answered once its request to the IdP is done.
pub enum Command {
    /// Run the login steps before the code (e.g. send the OTP).
    LoginStart(oneshot::Sender<Result<(), FetchError>>),
    /// Finish the login with the human's code.
    LoginCode(Secret, oneshot::Sender<Result<(), FetchError>>),
}

/// A new definition for a running provider whose identity did not change: timing, HTTP
/// settings, secrets, header rendering. Applied in place; the token stays.
pub struct Reconfig {
    pub spec: ProviderSpec,
    pub prefix: String,
    pub source: Arc<dyn TokenSource>,
    /// Something that goes into token requests changed (a rotated secret, say): fetch a
    /// token with it, serving the current one until then.
    pub credentials_changed: bool,
}

/// How the gateway talks to a running driver.
pub struct Channels {
    /// `true`: retire now.
    pub shutdown: watch::Receiver<bool>,
    pub commands: mpsc::Receiver<Command>,
    pub reconfig: mpsc::UnboundedReceiver<Reconfig>,
    /// Drivers retired by the same reload: each flips its `stopped` flag when it has
    /// stopped; this driver makes no request before all have.
    pub predecessors: Vec<watch::Receiver<bool>>,
    /// Flipped to `true` when this driver has stopped.
    pub stopped: watch::Sender<bool>,
}

/// What a request produced.
enum Fetched {
    /// A token response (for a fleet: obtained by this replica under `lease`).
    Token(TokenSet, Option<Lease>),
    /// The fleet's newer token, shared by another replica.
    Shared(Loaded),
    /// The login steps before the code ran; this is what they extracted.
    Pending(Vars),
}

type FetchFuture = Pin<Box<dyn Future<Output = Result<Fetched, FetchError>> + Send>>;

/// Where the published token came from (shown by the admin API).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Fetched from the IdP by this process.
    Fetched,
    /// Fetched by another replica and shared through the store (fleet mode).
    Shared,
    /// Restored from the store at start.
    Restored,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Fetched => "fetched",
            Origin::Shared => "shared",
            Origin::Restored => "restored",
        }
    }
}

pub struct Driver {
    name: String,
    /// The provider's identity: the store key.
    key: String,
    cell: Arc<TokenCell>,
    source: Arc<dyn TokenSource>,
    timing: Timing,
    header_prefix: String,
    upstream_headers: Vec<(HeaderName, Template)>,
    store: Arc<dyn TokenStore>,
    machine: Machine,
    /// The latest token response (holds the refresh token and extracted values).
    previous: Option<TokenSet>,
    /// Fetched or restored, waiting for the machine's `Publish`.
    candidate: Option<(TokenSet, Arc<ActiveToken>, Origin)>,
    /// What the login steps before the code extracted (e.g. Etna's interim token).
    pending: Option<Vars>,
    /// The store entry's version, for compare-and-swap.
    version: Version,
    /// The human's code for the login request in flight.
    code: Option<Secret>,
    /// The admin request waiting for the login request in flight.
    reply: Option<oneshot::Sender<Result<(), FetchError>>>,
    /// The class of the latest failure, for `Report`.
    last_failure: Option<ErrorClass>,
    fetch_started: Option<Instant>,
    wake: Option<Instant>,
    /// Version of an entry stored under the provider's name by an older tollgate.
    legacy: Option<Version>,
    /// The fleet's refresh lease, held from a coordinated request until its result is written.
    lease: Option<Lease>,
    /// Where the published token came from.
    origin: Option<Origin>,
    /// Store versions of the latest tokens by generation: a rejection names a generation,
    /// and only the entry holding that token may be dropped fleet-wide.
    versions: Vec<(u64, Version)>,
    /// A generation dropped because another replica announced its rejection (not ours to
    /// announce again).
    dropped_by_fleet: Option<u64>,
}

fn schedule_of(t: &Timing) -> Schedule {
    Schedule { refresh_before: t.refresh_before, backoff_min: t.backoff_min, backoff_max: t.backoff_max }
}

fn caps_of(source: &dyn TokenSource) -> Caps {
    Caps { can_acquire: source.can_acquire(), has_login: source.has_login() }
}

impl Driver {
    pub fn new(
        spec: &ProviderSpec,
        prefix: String,
        cell: Arc<TokenCell>,
        source: Arc<dyn TokenSource>,
        store: Arc<dyn TokenStore>,
    ) -> Self {
        let machine = Machine::new(schedule_of(&spec.timing), caps_of(source.as_ref()), fastrand::u64(..));
        Driver {
            name: spec.name.clone(),
            key: spec.fingerprint.clone(),
            cell,
            source,
            timing: spec.timing.clone(),
            header_prefix: prefix,
            upstream_headers: spec.upstream_headers.clone(),
            store,
            machine,
            previous: None,
            candidate: None,
            pending: None,
            version: 0,
            code: None,
            reply: None,
            last_failure: None,
            fetch_started: None,
            wake: None,
            legacy: None,
            lease: None,
            origin: None,
            versions: Vec::new(),
            dropped_by_fleet: None,
        }
    }

    /// Run until retired.
    pub async fn run(mut self, mut ch: Channels) {
        let stopped = ch.stopped;
        metrics::get().init_provider(&self.name);
        // A predecessor (same name, another identity; or the same identity under another
        // name) may still be finishing: never overlap its requests with ours.
        for mut p in std::mem::take(&mut ch.predecessors) {
            tokio::select! {
                biased;
                r = ch.shutdown.wait_for(|s| *s) => { let _ = r; let _ = stopped.send(true); return; }
                _ = p.wait_for(|s| *s) => {}
            }
        }
        let mut fleet = self.store.fleet().map(|f| f.subscribe());
        let stored = self.restore().await;
        let mut fetch: Option<FetchFuture> = None;
        let mut clocks = Clocks::new();
        let mut jump_check = tokio::time::interval(JUMP_CHECK);
        jump_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.apply(Event::Start { stored }, &mut fetch).await;
        loop {
            let wake = self.wake;
            tokio::select! {
                // Shutdown first: a retired provider must not make one more request, nor
                // publish or save the outcome of one in flight (it is dropped here).
                biased;
                r = ch.shutdown.changed() => {
                    if r.is_err() || *ch.shutdown.borrow() {
                        self.machine.handle(Instant::now(), Event::Shutdown);
                        drop(fetch.take());
                        self.cell.lock_status().phase = self.machine.phase();
                        debug!(provider = %self.name, "provider retired");
                        let _ = stopped.send(true);
                        return;
                    }
                }
                outcome = async { match fetch.as_mut() { Some(f) => f.await, None => std::future::pending().await } } => {
                    fetch = None;
                    self.finished(outcome, &mut fetch).await;
                }
                Some(rc) = ch.reconfig.recv() => self.reconfigure(rc, &mut fetch).await,
                _ = sleep_until(wake) => self.apply(Event::Tick, &mut fetch).await,
                _ = jump_check.tick() => {
                    if clocks.jumped() {
                        match self.cell.latest() {
                            Some(t) if !t.usable() && self.machine.holds_usable(Instant::now()) => {
                                self.clock_jumped(t.generation, &mut fetch).await
                            }
                            _ => debug!(provider = %self.name, "clock jump detected; the token is still good"),
                        }
                    }
                }
                _ = self.cell.woken() => {
                    if let Some(generation) = self.cell.take_rejected() {
                        if self.dropped_by_fleet.take() != Some(generation) {
                            self.invalidate_shared(generation).await;
                        }
                        self.apply(Event::Rejected { generation }, &mut fetch).await;
                    }
                    if self.cell.take_force() {
                        self.apply(Event::Force, &mut fetch).await;
                    }
                    if self.cell.usable().is_none() {
                        match self.cell.latest() {
                            // Spent by the wall clock though not by the monotonic one: the
                            // host slept. Renew now rather than at the (late) schedule.
                            Some(t) if self.machine.holds_usable(Instant::now()) => {
                                self.clock_jumped(t.generation, &mut fetch).await
                            }
                            _ => self.apply(Event::Demand, &mut fetch).await,
                        }
                    }
                }
                Some(cmd) = ch.commands.recv(), if fetch.is_none() => self.command(cmd, &mut fetch).await,
                msg = async { match fleet.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } }, if fetch.is_none() => {
                    match msg {
                        Ok(m) => self.fleet_message(m, &mut fetch).await,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            self.fleet_message(FleetMessage::Reconnected, &mut fetch).await
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => fleet = None,
                    }
                }
            }
        }
    }

    /// The wall clock moved differently from the monotonic one (a suspended host woke
    /// up, or the clock was set): the schedule, kept on the monotonic clock, is wrong.
    async fn clock_jumped(&mut self, generation: u64, fetch: &mut Option<FetchFuture>) {
        warn!(provider = %self.name, "clock jump detected (host suspend or clock change): the token is spent by the wall clock; renewing it");
        self.apply(Event::Expired { generation }, fetch).await;
    }

    /// Feed an event and execute the actions the machine asks for.
    async fn apply(&mut self, event: Event, fetch: &mut Option<FetchFuture>) {
        let actions = self.machine.handle(Instant::now(), event);
        for action in actions {
            match action {
                Action::Fetch(kind) => *fetch = Some(self.start_fetch(kind)),
                Action::Publish => self.publish(),
                Action::Save => self.save().await,
                Action::Remove => self.remove().await,
                Action::ForgetRefresh => self.previous = None,
                Action::AwaitCode => self.await_code(),
                Action::Report => self.report(),
                Action::SleepUntil(at) => self.wake = at,
            }
        }
        metrics::get()
            .token_fetch_consecutive_failures
            .with_label_values(&[&self.name])
            .set(self.machine.failures() as i64);
        self.cell.set_human_only(!self.source.can_acquire() && !self.machine.refresh_held());
        let mut st = self.cell.lock_status();
        st.phase = self.machine.phase();
        st.awaiting_code = self.machine.awaiting_code();
        st.consecutive_failures = self.machine.failures();
        st.pending_login = self.machine.pending_login();
        st.next_attempt = self.wake.map(to_system);
    }

    fn start_fetch(&mut self, kind: FetchKind) -> FetchFuture {
        self.cell.lock_status().last_attempt = Some(SystemTime::now());
        self.fetch_started = Some(Instant::now());
        let src = Arc::clone(&self.source);
        match kind {
            FetchKind::Acquire | FetchKind::Refresh => {
                let current = self.cell.latest();
                let ask = Ask {
                    store: Arc::clone(&self.store),
                    source: src,
                    name: self.name.clone(),
                    key: self.key.clone(),
                    previous: if kind == FetchKind::Refresh { self.previous.clone() } else { None },
                    held: self.version,
                    held_usable: current.is_some_and(|t| t.usable()),
                    margin: self.timing.expiry_margin,
                };
                Box::pin(async move {
                    coordinate::coordinated(ask).await.map(|got| match got {
                        Got::Here { set, lease } => Fetched::Token(set, lease),
                        Got::Shared(entry) => Fetched::Shared(entry),
                    })
                })
            }
            FetchKind::LoginStart => Box::pin(async move { src.login_start().await.map(Fetched::Pending) }),
            FetchKind::LoginCode => {
                let local = self.pending.clone();
                let store = Arc::clone(&self.store);
                let key = self.key.clone();
                let code = self.code.take().unwrap_or_else(|| Secret::new(""));
                Box::pin(async move {
                    // The login may have been started on another replica: its pending
                    // state (e.g. Etna's interim token) is shared.
                    let pending = match (local, store.fleet()) {
                        (Some(p), _) => p,
                        (None, Some(f)) => match f.load_pending(&key).await {
                            Ok(Some(p)) => p.into_iter().map(|(k, v)| (k, Secret::new(v))).collect(),
                            _ => Vars::new(),
                        },
                        (None, None) => Vars::new(),
                    };
                    src.login_complete(&pending, &code).await.map(|set| Fetched::Token(set, None))
                })
            }
        }
    }

    /// The request in flight is done: turn its outcome into an event.
    async fn finished(&mut self, outcome: Result<Fetched, FetchError>, fetch: &mut Option<FetchFuture>) {
        let kind = self.machine.in_flight();
        if let (Some(t), Some(FetchKind::Acquire | FetchKind::Refresh | FetchKind::LoginCode)) =
            (self.fetch_started.take(), kind)
        {
            metrics::get().token_fetch_duration.with_label_values(&[&self.name]).observe(t.elapsed().as_secs_f64());
        }
        let result = match outcome {
            Ok(Fetched::Pending(vars)) => {
                if let Some(f) = self.store.fleet() {
                    let shared = vars.iter().map(|(k, v)| (k.clone(), v.expose().to_string())).collect();
                    if let Err(e) = f.save_pending(&self.key, &shared, PENDING_TTL).await {
                        self.store_failed("save", &format!("pending login: {e}"));
                    }
                }
                self.pending = Some(vars);
                info!(provider = %self.name, "login started; waiting for the code");
                self.answer(Ok(()));
                return self.apply(Event::LoginStarted, fetch).await;
            }
            Ok(Fetched::Token(set, lease)) => {
                self.lease = lease;
                // Keep the newest response even if it cannot be activated: with rotating
                // refresh tokens the old refresh token is already spent (oauth2-proxy #1006).
                let activated = self.activate(&set);
                self.previous = Some(set.clone());
                activated.map(|t| (set, t, Origin::Fetched))
            }
            Ok(Fetched::Shared(entry)) => {
                let (set, lifetime, elapsed) = token_set_of(&entry.token);
                let generation = self.cell.next_generation();
                self.version = entry.version;
                self.record_version(generation, entry.version);
                self.pending = None;
                self.previous = Some(set.clone());
                self.build(&set, lifetime, elapsed, generation).map(|t| (set, t, Origin::Shared))
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.release_lease().await;
        }
        match result {
            Ok((set, token, origin)) => {
                let meta = self.meta(&set, &token);
                if kind == Some(FetchKind::LoginCode) {
                    self.pending = None;
                    info!(provider = %self.name, "login completed");
                    if let Some(f) = self.store.fleet() {
                        let _ = f.clear_pending(&self.key).await;
                    }
                }
                self.candidate = Some((set, token, origin));
                self.last_failure = None;
                self.apply(Event::Fetched(meta), fetch).await;
                // Normally released by the fenced save; not if the machine refused the token.
                self.release_lease().await;
                self.answer(Ok(()));
            }
            Err(e) => {
                self.failed(kind, &e);
                let failure = Failure {
                    // An unreadable local file says nothing about the refresh token: it
                    // is kept for when the file is back.
                    credential: e.class.is_credential() && e.class != ErrorClass::CredentialFile,
                    grant_rejected: grant_rejected(&e),
                    retry_after: e.retry_after,
                };
                self.apply(Event::Failed(failure), fetch).await;
                self.answer(Err(e));
            }
        }
    }

    fn answer(&mut self, r: Result<(), FetchError>) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(r);
        }
    }

    async fn command(&mut self, cmd: Command, fetch: &mut Option<FetchFuture>) {
        let (event, reply) = match cmd {
            Command::LoginStart(reply) => (Event::LoginStart, reply),
            Command::LoginCode(code, reply) => {
                self.code = Some(code);
                (Event::Code, reply)
            }
        };
        if !self.source.has_login() {
            let _ = reply.send(Err(FetchError::new(ErrorClass::Rejected, "this provider has no login flow")));
            return;
        }
        self.reply = Some(reply);
        self.apply(event, fetch).await;
        if fetch.is_none() {
            self.code = None;
            self.answer(Err(FetchError::new(ErrorClass::ServerError, "the provider is not ready; try again")));
        }
    }

    async fn reconfigure(&mut self, rc: Reconfig, fetch: &mut Option<FetchFuture>) {
        let rerender = rc.prefix != self.header_prefix || rc.spec.upstream_headers != self.upstream_headers;
        self.timing = rc.spec.timing.clone();
        self.header_prefix = rc.prefix;
        self.upstream_headers = rc.spec.upstream_headers.clone();
        self.source = rc.source;
        if rerender {
            self.rerender();
        }
        info!(provider = %self.name, credentials_changed = rc.credentials_changed, "provider settings updated in place; the token is kept");
        let event = Event::Reconfigure {
            schedule: schedule_of(&self.timing),
            caps: caps_of(self.source.as_ref()),
            credentials_changed: rc.credentials_changed,
        };
        self.apply(event, fetch).await;
    }

    /// Rebuild the current token's header with new rendering settings (header prefix,
    /// upstream headers). Same token, same generation: a rejection still finds it.
    fn rerender(&mut self) {
        let (Some(set), Some(current)) = (self.previous.clone(), self.cell.latest()) else { return };
        let elapsed = SystemTime::now().duration_since(current.issued_at).unwrap_or(Duration::ZERO);
        match self.build(&set, current.lifetime, elapsed, current.generation) {
            Ok(t) => self.cell.publish(Some(t)),
            Err(e) => {
                warn!(provider = %self.name, detail = %e.detail, "cannot re-render the token with the new settings")
            }
        }
    }

    // --- actions ----------------------------------------------------------------------

    fn publish(&mut self) {
        let Some((set, token, origin)) = self.candidate.take() else { return };
        let m = metrics::get();
        let name = self.name.as_str();
        m.token_valid.with_label_values(&[name]).set(1);
        m.provider_awaiting_code.with_label_values(&[name]).set(0);
        m.token_fetch_consecutive_failures.with_label_values(&[name]).set(0);
        match token.expires_at {
            Some(at) => m.token_expiry_timestamp.with_label_values(&[name]).set(unix_f(at)),
            None => {
                let _ = m.token_expiry_timestamp.remove_label_values(&[name]);
            }
        }
        match origin {
            Origin::Fetched => {
                m.token_fetch_total.with_label_values(&[name, "success"]).inc();
                info!(provider = %name, generation = token.generation, expires_in_s = token.lifetime_secs(), "token obtained");
            }
            Origin::Shared => {
                info!(provider = %name, generation = token.generation, "using the token another replica obtained; no token request needed")
            }
            Origin::Restored => {
                info!(provider = %name, generation = token.generation, "using the stored token; no token request needed")
            }
        }
        m.token_source_total.with_label_values(&[name, origin.as_str()]).inc();
        self.origin = Some(origin);
        self.previous = Some(set);
        self.cell.publish(Some(token));
        let mut st = self.cell.lock_status();
        st.last_success = Some(SystemTime::now());
        st.origin = Some(origin);
    }

    /// Persist the published token.
    ///
    /// - Shared by another replica: it is already in the store.
    /// - Obtained under the fleet's lease: written fenced by the lease, then the lease is
    ///   released; a holder whose lease lapsed writes nothing (a newer token may be there).
    /// - Otherwise a compare-and-swap on the version read. On a conflict in a fleet the
    ///   other replica's entry stays (it was written under the lease); with a file shared
    ///   by two processes ours, just obtained, is the newest and is written over theirs.
    async fn save(&mut self) {
        if self.origin == Some(Origin::Shared) {
            return;
        }
        let Some(current) = self.cell.latest() else { return };
        let Some(set) = self.previous.as_ref() else { return };
        let stored = self.stored(set, &current);
        let store = Arc::clone(&self.store);
        if let (Some(lease), Some(f)) = (self.lease.take(), store.fleet()) {
            match f.save_fenced(&self.key, &stored, &lease).await {
                Ok(Some(v)) => {
                    self.version = v;
                    self.record_version(current.generation, v);
                }
                Ok(None) => {
                    metrics::get().fleet_lease_total.with_label_values(&[&self.name, "lost"]).inc();
                    warn!(provider = %self.name, "the refresh lease lapsed before the token was written; not sharing it");
                }
                Err(e) => self.store_failed("save", &e.to_string()),
            }
            if let Err(e) = f.release(&lease).await {
                debug!(provider = %self.name, error = %e, "could not release the refresh lease; it expires on its own");
            }
            return;
        }
        let fleet = self.store.fleet().is_some();
        let mut expected = self.version;
        for _ in 0..3 {
            match self.store.save(&self.key, &stored, expected).await {
                Ok(Saved::Written(v)) => {
                    self.version = v;
                    self.record_version(current.generation, v);
                    if let Some(old) = self.legacy.take() {
                        let _ = self.store.remove(&self.name, old).await;
                    }
                    return;
                }
                Ok(Saved::Conflict(Some(_))) if fleet => {
                    debug!(provider = %self.name, "another replica wrote a token meanwhile; keeping theirs in the store");
                    return;
                }
                Ok(Saved::Conflict(now)) => {
                    debug!(provider = %self.name, "store entry changed by another writer; writing the newer token over it");
                    expected = now.map(|l| l.version).unwrap_or(0);
                }
                Err(e) => return self.store_failed("save", &e.to_string()),
            }
        }
        self.store_failed("save", "the entry kept changing under concurrent writers");
    }

    async fn release_lease(&mut self) {
        if let (Some(lease), Some(f)) = (self.lease.take(), self.store.fleet()) {
            let _ = f.release(&lease).await;
        }
    }

    /// The upstream rejected our token: drop it from the fleet too (only if the shared
    /// entry still holds it), so that every replica stops using it at once.
    async fn invalidate_shared(&mut self, generation: u64) {
        let Some(f) = self.store.fleet() else { return };
        // Only the entry that holds the rejected token: a newer one written meanwhile
        // (a refresh that finished just before this rejection was handled) stays.
        let Some(version) = self.version_of(generation) else { return };
        match f.invalidate(&self.key, version).await {
            Ok(true) => info!(provider = %self.name, version, "rejected token dropped fleet-wide"),
            Ok(false) => {}
            Err(e) => self.store_failed("remove", &e.to_string()),
        }
    }

    fn record_version(&mut self, generation: u64, version: Version) {
        self.versions.retain(|(g, _)| *g != generation);
        self.versions.push((generation, version));
        if self.versions.len() > 4 {
            self.versions.remove(0);
        }
    }

    fn version_of(&self, generation: u64) -> Option<Version> {
        self.versions.iter().find(|(g, _)| *g == generation).map(|(_, v)| *v)
    }

    /// What another replica did.
    async fn fleet_message(&mut self, msg: FleetMessage, fetch: &mut Option<FetchFuture>) {
        match msg {
            FleetMessage::Written { key, version } if key == self.key && version != self.version => {
                self.adopt_shared(fetch).await;
            }
            FleetMessage::Invalidated { key, version } if key == self.key => {
                if let Some(t) = self.cell.latest().filter(|t| self.version_of(t.generation) == Some(version)) {
                    // Another replica's upstream rejected this token: drop it here too.
                    if self.cell.invalidate(t.generation, Duration::ZERO) {
                        self.dropped_by_fleet = Some(t.generation);
                        info!(provider = %self.name, "token rejected on another replica; dropping it here");
                    }
                }
            }
            FleetMessage::Pending { key } if key == self.key => {
                // A login was started on another replica: its pending state is the one
                // a code given here must complete.
                self.pending = None;
            }
            FleetMessage::Reconnected if !self.adopt_shared(fetch).await => self.write_back().await,
            _ => {}
        }
    }

    /// Take the shared entry if it is newer than what we hold. Returns whether it did.
    async fn adopt_shared(&mut self, fetch: &mut Option<FetchFuture>) -> bool {
        let entry = match self.store.load(&self.key).await {
            Ok(Some(e)) => e,
            Ok(None) => return false,
            Err(e) => {
                self.store_failed("load", &e.to_string());
                return false;
            }
        };
        // A shared store's versions never go back: a greater one is a later write.
        if entry.version <= self.version || entry.token.fingerprint != self.key {
            return false;
        }
        let (set, lifetime, elapsed) = token_set_of(&entry.token);
        let generation = self.cell.next_generation();
        let Ok(token) = self.build(&set, lifetime, elapsed, generation) else { return false };
        let meta = self.meta(&set, &token);
        if !meta.usable_at(Instant::now()) {
            return false;
        }
        self.version = entry.version;
        self.record_version(generation, entry.version);
        self.pending = None;
        self.candidate = Some((set, token, Origin::Shared));
        self.apply(Event::Shared(meta), fetch).await;
        self.candidate = None;
        self.cell.latest().is_some_and(|t| t.generation == generation)
    }

    /// Redis came back empty while we hold a usable token (a human's, say): put it back,
    /// unless another replica already did.
    async fn write_back(&mut self) {
        // Only a token no replica could fetch again: the store cannot tell an entry lost
        // with a Redis restart from one deleted because its token was rejected, and a
        // machine token is simply fetched anew by the next replica that needs it.
        if !self.cell.human_only() {
            return;
        }
        let (Some(current), Some(set)) = (self.cell.usable(), self.previous.as_ref()) else { return };
        let stored = self.stored(set, &current);
        match self.store.save(&self.key, &stored, 0).await {
            Ok(Saved::Written(v)) => {
                self.version = v;
                self.record_version(current.generation, v);
                info!(provider = %self.name, "shared store was empty; wrote the token held here back");
            }
            Ok(Saved::Conflict(_)) => {}
            Err(e) => self.store_failed("save", &e.to_string()),
        }
    }

    async fn remove(&mut self) {
        match self.store.remove(&self.key, self.version).await {
            Ok(true) => self.version = 0,
            Ok(false) => {
                // Someone else wrote a newer entry (or none is left): theirs stays.
                debug!(provider = %self.name, "store entry changed meanwhile; not removing it");
            }
            Err(e) => self.store_failed("remove", &e.to_string()),
        }
    }

    fn store_failed(&self, op: &str, why: &str) {
        metrics::get().store_errors_total.with_label_values(&[&self.name, op]).inc();
        warn!(provider = %self.name, operation = op, error = %why, "token store operation failed; the token keeps being served from memory");
        let mut st = self.cell.lock_status();
        st.store_errors += 1;
        st.last_store_error = Some(format!("{op}: {why}"));
    }

    fn await_code(&self) {
        let name = self.name.as_str();
        let was = self.cell.lock_status().awaiting_code;
        if !was {
            warn!(provider = %name, hint = %format!("tollgate login {name}"), "provider needs a human login");
        }
        metrics::get().provider_awaiting_code.with_label_values(&[name]).set(1);
        self.cell.lock_status().awaiting_code = true;
        let seq = self.cell.last_attempt().seq + 1;
        self.cell.report(Attempt { seq, failed: Some(ErrorClass::InvalidGrant), next_at: None });
    }

    fn report(&self) {
        let seq = self.cell.last_attempt().seq + 1;
        self.cell.report(Attempt { seq, failed: self.last_failure, next_at: self.machine.wake_at() });
    }

    /// Count and log a failed request (what the machine does about it comes next).
    fn failed(&mut self, kind: Option<FetchKind>, e: &FetchError) {
        let name = self.name.as_str();
        let m = metrics::get();
        m.token_fetch_total.with_label_values(&[name, e.class.as_str()]).inc();
        let mut st = self.cell.lock_status();
        st.last_error = Some(e.class);
        st.last_error_detail = Some(e.detail.clone());
        st.last_error_at = Some(SystemTime::now());
        drop(st);
        match kind {
            Some(FetchKind::LoginStart) => {
                warn!(provider = %name, class = %e.class, status = e.status, detail = %e.detail, "login start failed")
            }
            Some(FetchKind::LoginCode) => {
                warn!(provider = %name, class = %e.class, status = e.status, detail = %e.detail, "login code rejected")
            }
            _ => {
                self.last_failure = Some(e.class);
                warn!(
                    provider = %name,
                    class = %e.class,
                    status = e.status,
                    error = e.oauth_error.as_deref().unwrap_or(""),
                    detail = %e.detail,
                    consecutive_failures = self.machine.failures() + 1,
                    serving_valid_token = self.cell.usable().is_some(),
                    "token request failed"
                );
            }
        }
    }

    // --- tokens -----------------------------------------------------------------------

    /// Use a stored token without contacting the IdP. Tokens are stored under the
    /// provider's identity; an entry stored under the provider's name (by an older
    /// tollgate) is taken over when its fingerprint matches.
    async fn restore(&mut self) -> Option<TokenMeta> {
        let loaded = match self.store.load(&self.key).await {
            Ok(Some(l)) => Some(l),
            // Only a file store written by an older tollgate has entries under names.
            Ok(None) if self.store.fleet().is_some() => None,
            Ok(None) => match self.store.load(&self.name).await {
                Ok(Some(legacy)) if legacy.token.fingerprint == self.key => {
                    // Migrate: the first save writes it under the identity, then this goes.
                    self.legacy = Some(legacy.version);
                    Some(crate::store::Loaded { token: legacy.token, version: 0 })
                }
                _ => None,
            },
            Err(e) => {
                self.store_failed("load", &e.to_string());
                None
            }
        }?;
        self.version = loaded.version;
        let stored = &loaded.token;
        if stored.fingerprint != self.key {
            info!(provider = %self.name, "stored token belongs to another account or IdP; ignoring it");
            return None;
        }
        let (set, lifetime, elapsed) = token_set_of(stored);
        let refreshable = self.source.can_refresh(&set);
        self.previous = Some(set.clone());
        let generation = self.cell.next_generation();
        if self.version != 0 {
            self.record_version(generation, self.version);
        }
        match self.build(&set, lifetime, elapsed, generation) {
            Ok(token) => {
                let meta = self.meta(&set, &token);
                if !meta.usable_at(Instant::now()) {
                    info!(provider = %self.name, refreshable, "stored token has expired");
                }
                self.candidate = Some((set, token, Origin::Restored));
                Some(meta)
            }
            Err(_) => {
                info!(provider = %self.name, "stored token cannot be used");
                let now = Instant::now();
                Some(TokenMeta {
                    generation,
                    lifetime: None,
                    expires_at: Some(now),
                    usable_until: Some(now),
                    refreshable,
                })
            }
        }
    }

    fn meta(&self, set: &TokenSet, token: &ActiveToken) -> TokenMeta {
        let now = Instant::now();
        let (lifetime, expires_at) = match (token.lifetime, token.expires_at) {
            (Lifetime::Finite(l), Some(exp)) => {
                let left = exp.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
                (Some(l), Some(now + left))
            }
            _ => (None, None),
        };
        TokenMeta {
            generation: token.generation,
            lifetime,
            expires_at,
            usable_until: token.usable_until,
            refreshable: self.source.can_refresh(set),
        }
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
        self.build(set, lifetime, Duration::ZERO, self.cell.next_generation())
    }

    fn build(
        &self,
        set: &TokenSet,
        lifetime: Lifetime,
        elapsed: Duration,
        generation: u64,
    ) -> Result<Arc<ActiveToken>, FetchError> {
        let headers = self.render_upstream_headers(set)?;
        // A DPoP-bound token is presented with its own scheme and a proof of the key.
        let dpop = match (self.source.dpop_key(), set.extras.get("token_type").map(String::as_str)) {
            (Some(key), Some("DPoP")) => {
                Some(crate::token::DpopBinding { key, ath: crate::jose::dpop::ath(set.access_token.expose()) })
            }
            _ => None,
        };
        let prefix = if dpop.is_some() { "DPoP " } else { self.header_prefix.as_str() };
        ActiveToken::new(
            set.access_token.expose(),
            prefix,
            generation,
            lifetime,
            elapsed,
            self.timing.expiry_margin,
            set.scope.clone(),
            set.extras.clone(),
            headers,
        )
        .map(|mut t| {
            t.dpop = dpop;
            Arc::new(t)
        })
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
            fingerprint: self.key.clone(),
            token: set.access_token.expose().to_string(),
            issued_at: token.issued_at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            expires_at: token.expires_at.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs()),
            scope: set.scope.clone(),
            vars: set.vars.iter().map(|(k, v)| (k.clone(), v.expose().to_string())).collect(),
            extras: set.extras.clone(),
        }
    }
}

/// How often the wall and monotonic clocks are compared for a jump.
const JUMP_CHECK: Duration = Duration::from_secs(5);

/// A jump smaller than this is scheduling noise or NTP slewing.
const JUMP_TOLERANCE: Duration = Duration::from_secs(2);

/// Both clocks as last read; a difference between how far each moved is a jump.
struct Clocks {
    mono: Instant,
    wall: SystemTime,
}

impl Clocks {
    fn new() -> Self {
        Clocks { mono: Instant::now(), wall: SystemTime::now() }
    }

    fn jumped(&mut self) -> bool {
        let (mono, wall) = (Instant::now(), SystemTime::now());
        let mono_moved = mono.duration_since(self.mono);
        let jumped = match wall.duration_since(self.wall) {
            Ok(wall_moved) => wall_moved.abs_diff(mono_moved) > JUMP_TOLERANCE,
            // The wall clock went backwards.
            Err(_) => true,
        };
        self.mono = mono;
        self.wall = wall;
        jumped
    }
}

/// How long a pending human login is kept in a shared store.
const PENDING_TTL: Duration = Duration::from_secs(30 * 60);

/// A stored token as a token set, with its lifetime and how long ago it was issued.
pub(super) fn token_set_of(stored: &StoredToken) -> (TokenSet, Lifetime, Duration) {
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
    let elapsed = Duration::from_secs(unix_now().saturating_sub(stored.issued_at));
    (set, lifetime, elapsed)
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use async_trait::async_trait;
    use tokio::sync::Notify;

    use super::*;
    use crate::store::{Loaded, StoreError};

    /// A token source whose requests block until the test lets them through.
    struct Gate {
        calls: AtomicUsize,
        release: Notify,
    }

    #[async_trait]
    impl TokenSource for Gate {
        async fn acquire(&self) -> Result<TokenSet, FetchError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.release.notified().await;
            Ok(TokenSet {
                access_token: Secret::new("tok"),
                expires_in: Some(serde_json::json!(3600)),
                refresh_token: None,
                scope: None,
                extras: BTreeMap::new(),
                vars: Vars::new(),
            })
        }
    }

    /// Counts writes; holds nothing.
    #[derive(Default)]
    struct Recorder {
        saves: AtomicUsize,
        entries: Mutex<BTreeMap<String, StoredToken>>,
    }

    #[async_trait]
    impl TokenStore for Recorder {
        async fn load(&self, key: &str) -> Result<Option<Loaded>, StoreError> {
            let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            Ok(e.get(key).cloned().map(|token| Loaded { token, version: 1 }))
        }
        async fn save(&self, key: &str, token: &StoredToken, _: Version) -> Result<Saved, StoreError> {
            self.saves.fetch_add(1, Ordering::SeqCst);
            self.entries.lock().unwrap_or_else(|p| p.into_inner()).insert(key.into(), token.clone());
            Ok(Saved::Written(1))
        }
        async fn remove(&self, key: &str, _: Version) -> Result<bool, StoreError> {
            Ok(self.entries.lock().unwrap_or_else(|p| p.into_inner()).remove(key).is_some())
        }
        fn set_live(&self, _: BTreeSet<String>) {}
        fn describe(&self) -> String {
            "recorder".into()
        }
    }

    fn spec() -> ProviderSpec {
        let toml = r#"
            [providers.p]
            kind = "oauth2"
            token_url = "http://127.0.0.1:1/token"
            client_id = "c"
            client_secret = "s"
            [[routes]]
            upstream = "http://127.0.0.1:2"
            provider = "p"
        "#;
        let settings = crate::config::load_str(toml, std::path::Path::new("t.toml")).expect("valid config");
        settings.providers[0].clone()
    }

    struct Running {
        cell: Arc<TokenCell>,
        stop: watch::Sender<bool>,
        stopped: watch::Receiver<bool>,
        _commands: mpsc::Sender<Command>,
        _reconfig: mpsc::UnboundedSender<Reconfig>,
    }

    fn spawn(
        source: Arc<dyn TokenSource>,
        store: Arc<dyn TokenStore>,
        predecessors: Vec<watch::Receiver<bool>>,
    ) -> Running {
        let cell = TokenCell::new("p");
        let (stop, shutdown) = watch::channel(false);
        let (stopped_tx, stopped) = watch::channel(false);
        let (commands, commands_rx) = mpsc::channel(1);
        let (reconfig, reconfig_rx) = mpsc::unbounded_channel();
        let driver = Driver::new(&spec(), "Bearer ".into(), Arc::clone(&cell), source, store);
        let ch = Channels { shutdown, commands: commands_rx, reconfig: reconfig_rx, predecessors, stopped: stopped_tx };
        tokio::spawn(driver.run(ch));
        Running { cell, stop, stopped, _commands: commands, _reconfig: reconfig }
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn a_retired_provider_never_publishes_or_saves_its_in_flight_result() {
        let gate = Arc::new(Gate { calls: AtomicUsize::new(0), release: Notify::new() });
        let store = Arc::new(Recorder::default());
        let old = spawn(gate.clone(), store.clone(), vec![]);
        until("the first request", || gate.calls.load(Ordering::SeqCst) == 1).await;
        // Retire while the request is in flight, then let the IdP answer.
        let _ = old.stop.send(true);
        let mut stopped = old.stopped.clone();
        tokio::time::timeout(Duration::from_secs(2), stopped.wait_for(|s| *s)).await.expect("stops").ok();
        gate.release.notify_waiters();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(old.cell.latest().is_none(), "a retired provider published");
        assert_eq!(store.saves.load(Ordering::SeqCst), 0, "a retired provider saved");
    }

    #[tokio::test]
    async fn a_successor_makes_no_request_before_its_predecessor_has_stopped() {
        let gate_old = Arc::new(Gate { calls: AtomicUsize::new(0), release: Notify::new() });
        let gate_new = Arc::new(Gate { calls: AtomicUsize::new(0), release: Notify::new() });
        let store = Arc::new(Recorder::default());
        let old = spawn(gate_old.clone(), store.clone(), vec![]);
        until("the old request", || gate_old.calls.load(Ordering::SeqCst) == 1).await;
        let new = spawn(gate_new.clone(), store.clone(), vec![old.stopped.clone()]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(gate_new.calls.load(Ordering::SeqCst), 0, "overlapped with the predecessor");
        let _ = old.stop.send(true);
        until("the new request", || gate_new.calls.load(Ordering::SeqCst) == 1).await;
        gate_new.release.notify_waiters();
        until("the new token", || new.cell.usable().is_some()).await;
        assert_eq!(store.saves.load(Ordering::SeqCst), 1);
    }
}
