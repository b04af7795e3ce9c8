//! The running configuration: routes, providers and their drivers, swapped as a whole
//! through `ArcSwap` so that a reload never exposes a half-applied config.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::tls::x509::X509;
use pingora::upstreams::peer::HttpPeer;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};

use tracing::warn;

use crate::config::{RouteSpec, Settings, StoreSettings};
use crate::provider::ProviderSpec;
use crate::provider::TokenSource;
use crate::proxy::router::{DpopNonces, RouteEntry, Router};
use crate::store::TokenStore;
use crate::token::driver::{Channels, Command, Driver, Reconfig};
use crate::token::TokenCell;

/// A provider with its running driver. Handles are shared between configurations: a
/// reload that keeps a provider's identity hands the same cell and driver to the new
/// configuration (with new settings applied in place).
pub struct ProviderHandle {
    pub spec: ProviderSpec,
    /// The header prefix its tokens are built with (from its routes).
    pub prefix: String,
    pub cell: Arc<TokenCell>,
    /// Login steps are run by the driver, which owns all talk with the IdP.
    pub commands: mpsc::Sender<Command>,
    runner: Arc<Runner>,
}

/// The running driver's controls. Dropping the last reference retires it.
struct Runner {
    stop: watch::Sender<bool>,
    stopped: watch::Receiver<bool>,
    reconfig: mpsc::UnboundedSender<Reconfig>,
}

impl Runner {
    fn retire(&self) -> watch::Receiver<bool> {
        let _ = self.stop.send(true);
        self.stopped.clone()
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// One consistent view of the configuration.
pub struct Active {
    pub settings: Arc<Settings>,
    pub router: Router,
    pub providers: BTreeMap<String, Arc<ProviderHandle>>,
}

/// Errors building the runtime view (beyond what config validation catches).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("provider `{0}`: {1}")]
    Provider(String, String),
    #[error("route `{0}`: {1}")]
    Route(String, String),
}

pub struct Gateway {
    active: ArcSwap<Active>,
    handle: Handle,
    store: Arc<dyn TokenStore>,
    /// The settings fixed at start (listen addresses, threads, store, …): a reload keeps
    /// these running values whatever the file now says.
    boot: Boot,
    inflight: AtomicUsize,
    /// Every provider has held a usable token once (`/readyz` with `ready_requires = "startup"`).
    ready_once: std::sync::atomic::AtomicBool,
    /// SIGHUP and the file watcher may reload at once; one at a time, so that no build
    /// starts drivers that a concurrent build then discards.
    reloading: std::sync::Mutex<()>,
}

/// Settings a running process cannot change: they take a restart.
#[derive(Debug, Clone, PartialEq)]
struct Boot {
    proxy_listen: std::net::SocketAddr,
    threads: usize,
    shutdown_timeout: std::time::Duration,
    keepalive_pool: usize,
    admin_listen: std::net::SocketAddr,
    store: StoreSettings,
}

impl Boot {
    fn of(s: &Settings) -> Self {
        Boot {
            proxy_listen: s.proxy.listen,
            threads: s.proxy.threads,
            shutdown_timeout: s.proxy.shutdown_timeout,
            keepalive_pool: s.proxy.upstream_keepalive_pool_size,
            admin_listen: s.admin.listen,
            store: s.store.clone(),
        }
    }

    /// The keys of `next` that differ from the running values.
    fn changed(&self, next: &Boot) -> Vec<&'static str> {
        let mut keys = Vec::new();
        let mut check = |differs: bool, key: &'static str| {
            if differs {
                keys.push(key);
            }
        };
        check(self.proxy_listen != next.proxy_listen, "proxy.listen");
        check(self.threads != next.threads, "proxy.threads");
        check(self.shutdown_timeout != next.shutdown_timeout, "proxy.shutdown_timeout");
        check(self.keepalive_pool != next.keepalive_pool, "proxy.upstream_keepalive_pool_size");
        check(self.admin_listen != next.admin_listen, "admin.listen");
        check(self.store != next.store, "store");
        keys
    }

    /// Put the running values back into `s`.
    fn restore_into(&self, s: &mut Settings) {
        s.proxy.listen = self.proxy_listen;
        s.proxy.threads = self.threads;
        s.proxy.shutdown_timeout = self.shutdown_timeout;
        s.proxy.upstream_keepalive_pool_size = self.keepalive_pool;
        s.admin.listen = self.admin_listen;
        s.store = self.store.clone();
    }
}

impl Gateway {
    /// Build and start drivers on `handle` (the control runtime).
    pub fn start(settings: Settings, handle: Handle, store: Arc<dyn TokenStore>) -> Result<Arc<Self>, BuildError> {
        let boot = Boot::of(&settings);
        let plan = plan(Arc::new(settings), &BTreeMap::new())?;
        let active = plan.commit(&handle, &store);
        Ok(Arc::new(Gateway {
            active: ArcSwap::from_pointee(active),
            handle,
            store,
            boot,
            inflight: AtomicUsize::new(0),
            ready_once: std::sync::atomic::AtomicBool::new(false),
            reloading: std::sync::Mutex::new(()),
        }))
    }

    #[inline]
    pub fn active(&self) -> arc_swap::Guard<Arc<Active>> {
        self.active.load()
    }

    pub fn snapshot(&self) -> Arc<Active> {
        self.active.load_full()
    }

    /// Swap in a new configuration. A provider keeps its cell, token and driver as long
    /// as its identity (what decides which token it gets) is the same; other changes
    /// (timing, HTTP settings, secrets, header rendering) are applied to it in place. A
    /// provider with a new identity gets a new cell, and its driver starts only after
    /// every driver retired by this reload has stopped.
    pub fn reload(&self, mut settings: Settings) -> Result<ReloadSummary, BuildError> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.active.load_full();
        let restart_required = self.boot.changed(&Boot::of(&settings));
        for key in &restart_required {
            warn!(key, "this setting changed but takes effect only after a restart; keeping the running value");
        }
        self.boot.restore_into(&mut settings);
        // Whether the admin API demands a token follows the address it is bound to: a
        // reload may rotate the token of a non-loopback listener but never remove it.
        if !self.boot.admin_listen.ip().is_loopback() && settings.admin.token.is_none() {
            warn!(listen = %self.boot.admin_listen, "the new config has no `admin.token`, but the admin API is bound to a non-loopback address; keeping the current token");
            settings.admin.token = old.settings.admin.token.clone();
        }
        let plan = plan(Arc::new(settings), &old.providers)?;
        let summary = ReloadSummary {
            providers: plan.settings.providers.len(),
            kept: plan.kept.len(),
            updated: plan.updated.len(),
            routes: plan.settings.routes.len(),
            restart_required,
        };
        let removed: Vec<String> =
            old.providers.keys().filter(|n| !plan.settings.providers.iter().any(|p| &p.name == *n)).cloned().collect();
        let next =
            plan.commit_replacing(&old.providers, DpopNonces::carried_over(&old.router), &self.handle, &self.store);
        self.active.store(Arc::new(next));
        for name in removed {
            crate::metrics::get().forget_provider(&name);
        }
        Ok(summary)
    }

    /// The token store (for the admin API: what it is and whether a shared one is reachable).
    pub fn store(&self) -> &Arc<dyn TokenStore> {
        &self.store
    }

    /// Latch start-up readiness: once every provider has held a token, stay ready.
    pub fn latch_ready(&self, all_valid_now: bool) -> bool {
        if all_valid_now {
            self.ready_once.store(true, Ordering::Release);
        }
        self.ready_once.load(Ordering::Acquire)
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    pub(crate) fn enter(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        InflightGuard(Arc::clone(self))
    }
}

#[derive(Debug, Clone)]
pub struct ReloadSummary {
    pub providers: usize,
    /// Providers kept exactly as they were.
    pub kept: usize,
    /// Providers kept with new settings applied in place (token kept).
    pub updated: usize,
    pub routes: usize,
    /// Boot settings the new config changed; they keep their running values.
    pub restart_required: Vec<&'static str>,
}

/// Counts a request as in flight until dropped (graceful drain waits for zero).
pub struct InflightGuard(Arc<Gateway>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A validated configuration, with everything that can fail already done (peers, token
/// sources), and nothing started yet.
struct Plan {
    settings: Arc<Settings>,
    peers: Vec<HttpPeer>,
    kept: Vec<(String, Arc<ProviderHandle>)>,
    updated: Vec<Update>,
    fresh: Vec<(ProviderSpec, String, Arc<dyn TokenSource>)>,
}

/// A running provider whose identity is unchanged, with its new settings.
struct Update {
    spec: ProviderSpec,
    prefix: String,
    source: Arc<dyn TokenSource>,
    old: Arc<ProviderHandle>,
}

fn plan(settings: Arc<Settings>, previous: &BTreeMap<String, Arc<ProviderHandle>>) -> Result<Plan, BuildError> {
    let peers = settings.routes.iter().map(|r| peer_for(r, &settings)).collect::<Result<Vec<_>, _>>()?;
    let (mut kept, mut updated, mut fresh) = (Vec::new(), Vec::new(), Vec::new());
    for spec in &settings.providers {
        let prefix = header_prefix(&settings, spec);
        match previous.get(&spec.name).filter(|h| h.spec.fingerprint == spec.fingerprint) {
            Some(h) if h.spec == *spec && h.prefix == prefix => kept.push((spec.name.clone(), Arc::clone(h))),
            Some(h) => {
                updated.push(Update { spec: spec.clone(), prefix, source: source_for(spec)?, old: Arc::clone(h) })
            }
            None => fresh.push((spec.clone(), prefix, source_for(spec)?)),
        }
    }
    Ok(Plan { settings, peers, kept, updated, fresh })
}

fn source_for(spec: &ProviderSpec) -> Result<Arc<dyn TokenSource>, BuildError> {
    crate::provider::build(spec).map_err(|e| BuildError::Provider(spec.name.clone(), e.detail))
}

impl Plan {
    fn commit(self, handle: &Handle, store: &Arc<dyn TokenStore>) -> Active {
        self.commit_replacing(&BTreeMap::new(), DpopNonces::default(), handle, store)
    }

    /// Start what is new, update what is kept, retire what is gone; then the new view.
    /// `nonces`: the running router's DPoP nonces, so that a reload costs no extra
    /// nonce challenge per upstream origin.
    fn commit_replacing(
        self,
        previous: &BTreeMap<String, Arc<ProviderHandle>>,
        mut nonces: DpopNonces,
        handle: &Handle,
        store: &Arc<dyn TokenStore>,
    ) -> Active {
        let mut providers: BTreeMap<String, Arc<ProviderHandle>> = self.kept.into_iter().collect();
        for Update { spec, prefix, source, old } in self.updated {
            let credentials_changed = old.spec.source != spec.source;
            let _ = old.runner.reconfig.send(Reconfig {
                spec: spec.clone(),
                prefix: prefix.clone(),
                source,
                credentials_changed,
            });
            let h = ProviderHandle {
                spec,
                prefix,
                cell: Arc::clone(&old.cell),
                commands: old.commands.clone(),
                runner: Arc::clone(&old.runner),
            };
            providers.insert(h.spec.name.clone(), Arc::new(h));
        }
        // Retire every driver the new view does not carry on, before any new one starts.
        let retired: Vec<watch::Receiver<bool>> = previous
            .values()
            .filter(|h| !providers.values().any(|n| Arc::ptr_eq(&n.runner, &h.runner)))
            .map(|h| h.runner.retire())
            .collect();
        for (spec, prefix, source) in self.fresh {
            let h = start_provider(&spec, prefix, source, handle, store, retired.clone());
            providers.insert(spec.name.clone(), Arc::new(h));
        }
        store.set_live(providers.values().map(|h| h.spec.fingerprint.clone()).collect());
        let settings = self.settings;
        // Logged at start and on every reload: an open relay, unverified upstream TLS.
        crate::proxy::router::warn_exposure(&settings.proxy, &settings.routes);
        warn_unshared_dpop(&settings);
        // Each route's upstream addresses, followed in the background (never failing).
        let upstreams = crate::proxy::resolve::upstreams_for(&settings, handle);
        let mut entries = Vec::new();
        for ((r, peer), upstream) in settings.routes.iter().zip(self.peers).zip(upstreams) {
            let cell = r.provider.as_ref().and_then(|p| providers.get(p)).map(|h| Arc::clone(&h.cell));
            let reauth_min_interval = r
                .provider
                .as_ref()
                .and_then(|p| settings.provider(p))
                .map(|p| p.timing.reauth_min_interval)
                .unwrap_or_default();
            entries.push(RouteEntry {
                dpop_nonce: nonces.for_origin(&r.upstream),
                pool_key: crate::fastpath::upstream::peer_key(&peer),
                peer,
                upstream,
                metrics: crate::metrics::RouteMetrics::new(&r.name),
                spec: r.clone(),
                cell,
                reauth_min_interval,
            });
        }
        Active { router: Router::new(entries), providers, settings }
    }
}

/// A DPoP key generated at start is this process's alone, and so are the tokens bound to
/// it: with a store meant for sharing or restarts, say that a key file is needed.
fn warn_unshared_dpop(settings: &Settings) {
    if matches!(settings.store, StoreSettings::Memory) {
        return;
    }
    for p in &settings.providers {
        if let crate::provider::SourceSpec::OAuth2(o) = &p.source {
            if o.dpop.as_ref().is_some_and(|d| d.key_file.is_none()) {
                warn!(provider = %p.name, "dpop = true without dpop_key_file: the key is generated at start, so its tokens are never shared with other replicas nor usable after a restart; set dpop_key_file to share them");
            }
        }
    }
}

/// The header prefix a provider's tokens are rendered with. Routes name the header; the
/// prefix is the provider's (`Bearer ` unless a route using it says otherwise).
fn header_prefix(settings: &Settings, spec: &ProviderSpec) -> String {
    settings
        .routes
        .iter()
        .find(|r| r.provider.as_deref() == Some(spec.name.as_str()))
        .map(|r| r.header_prefix.clone())
        .unwrap_or_else(|| "Bearer ".to_string())
}

fn start_provider(
    spec: &ProviderSpec,
    prefix: String,
    source: Arc<dyn TokenSource>,
    handle: &Handle,
    store: &Arc<dyn TokenStore>,
    predecessors: Vec<watch::Receiver<bool>>,
) -> ProviderHandle {
    let cell = TokenCell::new(spec.name.clone());
    let (stop, shutdown) = watch::channel(false);
    let (stopped_tx, stopped) = watch::channel(false);
    let (commands, commands_rx) = mpsc::channel(8);
    let (reconfig, reconfig_rx) = mpsc::unbounded_channel();
    let driver = Driver::new(spec, prefix.clone(), Arc::clone(&cell), source, Arc::clone(store));
    let channels =
        Channels { shutdown, commands: commands_rx, reconfig: reconfig_rx, predecessors, stopped: stopped_tx };
    handle.spawn(driver.run(channels));
    ProviderHandle { spec: spec.clone(), prefix, cell, commands, runner: Arc::new(Runner { stop, stopped, reconfig }) }
}

/// The route's peer template: TLS, timeouts and CA, without an address (each connection
/// attempt takes one from the route's [`Upstream`](crate::proxy::resolve::Upstream)).
/// Nothing here touches DNS, so a DNS outage cannot fail a start or a reload.
fn peer_for(r: &RouteSpec, settings: &Settings) -> Result<HttpPeer, BuildError> {
    let u = &r.upstream;
    let unresolved = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), u.port);
    let mut peer = HttpPeer::new(unresolved, u.tls, u.sni.clone());
    peer.options.connection_timeout = Some(settings.proxy.upstream_connect_timeout);
    peer.options.read_timeout = Some(settings.proxy.upstream_read_timeout);
    peer.options.idle_timeout = Some(settings.proxy.upstream_idle_timeout);
    peer.options.verify_cert = u.tls_verify;
    peer.options.verify_hostname = u.tls_verify;
    if let Some(ca) = &u.ca_file {
        let pem = std::fs::read(ca).map_err(|e| {
            BuildError::Route(r.name.clone(), format!("cannot read ca_file {}: {}", ca.display(), e.kind()))
        })?;
        let certs = X509::stack_from_pem(&pem).map_err(|_| {
            BuildError::Route(r.name.clone(), format!("ca_file {} holds no valid PEM certificate", ca.display()))
        })?;
        peer.options.ca = Some(Arc::new(certs.into_boxed_slice()));
    }
    let cert = r.provider.as_ref().and_then(|p| settings.provider(p)).and_then(ProviderSpec::upstream_client_cert);
    match (cert, u.tls) {
        (Some(c), true) => peer.client_cert_key = Some(Arc::new(upstream_client_cert(&r.name, c)?)),
        (Some(_), false) => warn!(
            route = %r.name,
            "upstream_client_cert is set but the upstream is plain http: no certificate can be presented, and certificate-bound tokens will be refused there"
        ),
        (None, _) => {}
    }
    Ok(peer)
}

/// The provider's client certificate as the upstream TLS connector takes it. Read on
/// every config load: the watcher reloads when the files change.
fn upstream_client_cert(
    route: &str,
    c: &crate::provider::kinds::oauth2::ClientCertSpec,
) -> Result<pingora::utils::tls::CertKey, BuildError> {
    let fail = |what: &str| BuildError::Route(route.to_string(), format!("upstream_client_cert: {what}"));
    let cert = std::fs::read(&c.cert.path)
        .map_err(|e| fail(&format!("cannot read {}: {}", c.cert.path.display(), e.kind())))?;
    let key = zeroize::Zeroizing::new(
        std::fs::read(&c.key.path).map_err(|e| fail(&format!("cannot read {}: {}", c.key.path.display(), e.kind())))?,
    );
    let chain = X509::stack_from_pem(&cert).map_err(|_| fail("client_cert_file holds no PEM certificate"))?;
    let key = pingora::tls::pkey::PKey::private_key_from_pem(&key)
        .map_err(|_| fail("client_key_file holds no usable PEM private key"))?;
    Ok(pingora::utils::tls::CertKey::new(chain, key))
}
