//! The running configuration: routes, providers and their refresher tasks, swapped as a
//! whole through `ArcSwap` so that a reload never exposes a half-applied config.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::tls::x509::X509;
use pingora::upstreams::peer::HttpPeer;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};

use crate::config::{ProviderSpec, RouteSpec, Settings};
use crate::proxy::router::{RouteEntry, Router};
use crate::store::TokenStore;
use crate::token::refresher::{Command, Refresher};
use crate::token::TokenCell;

/// A provider with its running refresher. Dropping the last handle stops the refresher
/// (its shutdown sender goes away), which is how a reload retires a changed provider.
pub struct ProviderHandle {
    pub spec: ProviderSpec,
    /// The header prefix its tokens are built with (from its routes): part of what a
    /// reload compares, since it is baked into every token's header.
    pub prefix: String,
    pub cell: Arc<TokenCell>,
    /// Login steps are run by the refresher, which owns all talk with the IdP.
    pub commands: mpsc::Sender<Command>,
    _stop: watch::Sender<bool>,
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
    inflight: AtomicUsize,
    /// SIGHUP and the file watcher may reload at once; one at a time, so that no build
    /// starts refreshers that a concurrent build then discards.
    reloading: std::sync::Mutex<()>,
}

impl Gateway {
    /// Build and start refreshers on `handle` (the control runtime).
    pub fn start(settings: Settings, handle: Handle, store: Arc<dyn TokenStore>) -> Result<Arc<Self>, BuildError> {
        let active = build(Arc::new(settings), &BTreeMap::new(), &handle, &store)?;
        Ok(Arc::new(Gateway {
            active: ArcSwap::from_pointee(active),
            handle,
            store,
            inflight: AtomicUsize::new(0),
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

    /// Swap in a new configuration. Providers whose spec (secrets included) is unchanged
    /// keep their cell, token and refresher; the others start afresh.
    pub fn reload(&self, settings: Settings) -> Result<ReloadSummary, BuildError> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.active.load_full();
        let next = build(Arc::new(settings), &old.providers, &self.handle, &self.store)?;
        let kept =
            next.providers.iter().filter(|(n, h)| old.providers.get(*n).is_some_and(|o| Arc::ptr_eq(o, h))).count();
        let summary = ReloadSummary { providers: next.providers.len(), kept, routes: next.router.entries().len() };
        let removed: Vec<String> = old.providers.keys().filter(|n| !next.providers.contains_key(*n)).cloned().collect();
        self.active.store(Arc::new(next));
        for name in removed {
            crate::metrics::get().forget_provider(&name);
        }
        Ok(summary)
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    pub(crate) fn enter(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        InflightGuard(Arc::clone(self))
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ReloadSummary {
    pub providers: usize,
    pub kept: usize,
    pub routes: usize,
}

/// Counts a request as in flight until dropped (graceful drain waits for zero).
pub struct InflightGuard(Arc<Gateway>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

fn build(
    settings: Arc<Settings>,
    previous: &BTreeMap<String, Arc<ProviderHandle>>,
    handle: &Handle,
    store: &Arc<dyn TokenStore>,
) -> Result<Active, BuildError> {
    // Everything that can fail comes first (peers, DNS, token sources); refreshers start
    // only once the whole configuration is known to be good.
    let peers = settings.routes.iter().map(|r| peer_for(r, &settings)).collect::<Result<Vec<_>, _>>()?;
    let mut prepared = Vec::new();
    let mut providers = BTreeMap::new();
    for spec in &settings.providers {
        let prefix = header_prefix(&settings, spec);
        match previous.get(&spec.name).filter(|h| h.spec == *spec && h.prefix == prefix) {
            Some(h) => {
                providers.insert(spec.name.clone(), Arc::clone(h));
            }
            None => {
                let source =
                    crate::provider::build(spec).map_err(|e| BuildError::Provider(spec.name.clone(), e.detail))?;
                prepared.push((spec, prefix, source));
            }
        }
    }
    for (spec, prefix, source) in prepared {
        providers.insert(spec.name.clone(), Arc::new(start_provider(spec, prefix, source, handle, store)));
    }
    let mut entries = Vec::new();
    for (r, peer) in settings.routes.iter().zip(peers) {
        let cell = r.provider.as_ref().and_then(|p| providers.get(p)).map(|h| Arc::clone(&h.cell));
        let reauth_min_interval = r
            .provider
            .as_ref()
            .and_then(|p| settings.provider(p))
            .map(|p| p.timing.reauth_min_interval)
            .unwrap_or_default();
        entries.push(RouteEntry {
            peer,
            metrics: crate::metrics::RouteMetrics::new(&r.name),
            spec: r.clone(),
            cell,
            reauth_min_interval,
        });
    }
    Ok(Active { router: Router::new(entries), providers, settings })
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
    source: Arc<dyn crate::provider::TokenSource>,
    handle: &Handle,
    store: &Arc<dyn TokenStore>,
) -> ProviderHandle {
    let cell = TokenCell::new(spec.name.clone());
    let (stop, stop_rx) = watch::channel(false);
    let (commands, commands_rx) = mpsc::channel(8);
    let refresher = Refresher {
        cell: Arc::clone(&cell),
        source,
        timing: spec.timing.clone(),
        header_prefix: prefix.clone(),
        upstream_headers: spec.upstream_headers.clone(),
        store: Arc::clone(store),
        fingerprint: spec.fingerprint.clone(),
    };
    handle.spawn(refresher.run(stop_rx, commands_rx));
    ProviderHandle { spec: spec.clone(), prefix, cell, commands, _stop: stop }
}

/// Resolve the upstream's host now, at start or reload, so that the request path never
/// blocks on DNS. (The address is re-resolved on every reload.)
fn resolve(r: &RouteSpec) -> Result<SocketAddr, BuildError> {
    let u = &r.upstream;
    (u.host.as_str(), u.port)
        .to_socket_addrs()
        .map_err(|e| BuildError::Route(r.name.clone(), format!("cannot resolve `{}`: {e}", u.host)))?
        .next()
        .ok_or_else(|| BuildError::Route(r.name.clone(), format!("`{}` resolved to no address", u.host)))
}

fn peer_for(r: &RouteSpec, settings: &Settings) -> Result<HttpPeer, BuildError> {
    let u = &r.upstream;
    let mut peer = HttpPeer::new(resolve(r)?, u.tls, u.sni.clone());
    peer.options.connection_timeout = Some(settings.proxy.upstream_connect_timeout);
    peer.options.read_timeout = Some(settings.proxy.upstream_read_timeout);
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
    Ok(peer)
}
