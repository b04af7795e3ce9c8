//! Route matching: host (optional) and longest path prefix. Built once per config, so a
//! request does a short linear scan over precomputed, pre-sorted entries.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorType};
use tracing::warn;

use super::resolve::{Attempt, Upstream};
use crate::config::{ProxySettings, RouteSpec, UpstreamSpec};
use crate::token::TokenCell;

pub struct RouteEntry {
    pub spec: RouteSpec,
    pub cell: Option<Arc<TokenCell>>,
    /// A template peer (TLS, timeouts, CA), cloned per request because pingora takes
    /// ownership of a boxed one; its address is taken from `upstream` for each attempt.
    pub peer: HttpPeer,
    /// What makes an upstream connection made from `peer` reusable (the fast path's pool
    /// key with the address): `fastpath::upstream::peer_key(&peer)`, computed once here.
    pub pool_key: u64,
    /// The upstream host's current addresses.
    pub upstream: Arc<Upstream>,
    /// The provider's bound on invalidations after upstream rejections.
    pub reauth_min_interval: std::time::Duration,
    pub metrics: crate::metrics::RouteMetrics,
    /// The upstream origin's latest `DPoP-Nonce` (RFC 9449 section 9), shared by the
    /// routes to that origin. Read lock-free on the request path.
    pub dpop_nonce: Arc<ArcSwapOption<String>>,
}

/// One nonce cell per upstream origin (scheme, host, port): nonces are the server's.
#[derive(Default)]
pub struct DpopNonces {
    by_origin: std::collections::HashMap<(bool, String, u16), Arc<ArcSwapOption<String>>>,
}

impl DpopNonces {
    /// The cells of a running router: a reload keeps every origin's nonce.
    pub fn carried_over(router: &Router) -> Self {
        let mut n = DpopNonces::default();
        for e in router.entries() {
            n.by_origin.insert(origin(&e.spec.upstream), Arc::clone(&e.dpop_nonce));
        }
        n
    }

    pub fn for_origin(&mut self, u: &UpstreamSpec) -> Arc<ArcSwapOption<String>> {
        Arc::clone(self.by_origin.entry(origin(u)).or_default())
    }
}

fn origin(u: &UpstreamSpec) -> (bool, String, u16) {
    (u.tls, u.host.to_ascii_lowercase(), u.port)
}

impl RouteEntry {
    /// The peer for this request's next connection attempt (see [`Upstream::pick`]). An
    /// upstream that has never resolved, or whose every address this request has tried,
    /// is an upstream error: the client gets 502 JSON.
    pub fn next_peer(&self, attempt: &mut Attempt) -> pingora::Result<HttpPeer> {
        let Some(ip) = self.upstream.pick(attempt) else {
            return Err(Error::explain(
                ErrorType::ConnectNoRoute,
                "the upstream host has no address (not resolved yet)",
            )
            .into_up());
        };
        let mut peer = self.peer.clone();
        peer._address = PeerAddr::Inet(SocketAddr::new(ip, self.spec.upstream.port));
        Ok(peer)
    }

    /// A connection to `peer` failed; whether another address is left to try.
    pub fn connect_failed(&self, peer: &HttpPeer, attempt: &mut Attempt) -> bool {
        match peer._address.as_inet() {
            Some(a) => self.upstream.connect_failed(a.ip(), attempt),
            None => false,
        }
    }
}

/// Whether a client may use the proxy: `proxy.allow_from` is empty, or holds its address
/// (an IPv4-mapped IPv6 address counts as the IPv4 one).
pub fn client_allowed(allow_from: &[ipnet::IpNet], client: Option<&PeerAddr>) -> bool {
    if allow_from.is_empty() {
        return true;
    }
    let Some(ip) = client.and_then(PeerAddr::as_inet).map(|a| a.ip().to_canonical()) else {
        return false;
    };
    allow_from.iter().any(|n| n.contains(&ip))
}

/// What an operator should know about who can use the proxy and how upstreams are
/// reached; logged at start and on every reload.
pub fn exposure_warnings(proxy: &ProxySettings, routes: &[RouteSpec]) -> Vec<String> {
    let mut out = Vec::new();
    let open = proxy.allow_from.is_empty() || proxy.allow_from.iter().any(|n| n.prefix_len() == 0);
    if !proxy.listen.ip().is_loopback() && open {
        out.push(format!(
            "proxy.listen is {}, not a loopback address, and `proxy.allow_from` does not restrict clients: tollgate is an authenticated relay for anyone who can reach it (every request gets tollgate's credentials); set `proxy.allow_from` to the networks of your clients",
            proxy.listen
        ));
    }
    for r in routes.iter().filter(|r| r.upstream.tls && !r.upstream.tls_verify) {
        out.push(format!(
            "route `{}`: tls_verify = false: the certificate of {} is not checked, so anyone on the path can read the injected tokens; for test rigs only",
            r.name, r.upstream.url
        ));
    }
    out
}

/// Log [`exposure_warnings`].
pub fn warn_exposure(proxy: &ProxySettings, routes: &[RouteSpec]) {
    for w in exposure_warnings(proxy, routes) {
        warn!("{w}");
    }
}

pub struct Router {
    /// Host-specific routes first, then longer prefixes first.
    entries: Vec<Arc<RouteEntry>>,
}

impl Router {
    pub fn new(mut entries: Vec<RouteEntry>) -> Self {
        entries.sort_by(|a, b| {
            (b.spec.host.is_some(), b.spec.path_prefix.len()).cmp(&(a.spec.host.is_some(), a.spec.path_prefix.len()))
        });
        Router { entries: entries.into_iter().map(Arc::new).collect() }
    }

    /// The route for a request. `host` is the Host header (port and case ignored).
    pub fn route(&self, host: Option<&[u8]>, path: &str) -> Option<&Arc<RouteEntry>> {
        let host = host.map(strip_port);
        self.entries.iter().find(|e| {
            let host_ok = match (&e.spec.host, host) {
                (None, _) => true,
                (Some(want), Some(got)) => want.as_bytes().eq_ignore_ascii_case(got),
                (Some(_), None) => false,
            };
            host_ok && prefix_matches(&e.spec.path_prefix, path)
        })
    }

    pub fn entries(&self) -> &[Arc<RouteEntry>] {
        &self.entries
    }
}

/// `/api` matches `/api`, `/api/x` and `/api?q`, but not `/apix`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

fn strip_port(host: &[u8]) -> &[u8] {
    if host.first() == Some(&b'[') {
        // [v6]:port
        return match host.iter().position(|&b| b == b']') {
            Some(i) => &host[..=i],
            None => host,
        };
    }
    match host.iter().rposition(|&b| b == b':') {
        Some(i) => &host[..i],
        None => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_rules() {
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/v1"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(prefix_matches("/api/", "/api/v1"));
        assert!(!prefix_matches("/api", "/"));
    }

    fn settings(extra_proxy: &str, route_extra: &str) -> crate::config::Settings {
        let toml = format!(
            "[proxy]\n{extra_proxy}\n[[routes]]\nname = \"r\"\nupstream = \"https://127.0.0.1:9\"\n{route_extra}\n"
        );
        crate::config::load_str(&toml, std::path::Path::new("t.toml")).expect("valid test config")
    }

    fn inet(s: &str) -> PeerAddr {
        PeerAddr::Inet(s.parse().expect("test address"))
    }

    #[test]
    fn allow_from_matches_client_networks() {
        let s = settings("allow_from = [\"10.0.0.0/8\", \"192.168.1.7\", \"fd00::/8\"]", "");
        let allow = &s.proxy.allow_from;
        assert!(client_allowed(allow, Some(&inet("10.1.2.3:5000"))));
        assert!(client_allowed(allow, Some(&inet("192.168.1.7:5000"))));
        assert!(!client_allowed(allow, Some(&inet("192.168.1.8:5000"))));
        assert!(client_allowed(allow, Some(&inet("[::ffff:10.9.9.9]:5000"))), "IPv4-mapped counts as IPv4");
        assert!(client_allowed(allow, Some(&inet("[fd12::1]:5000"))));
        assert!(!client_allowed(allow, Some(&inet("127.0.0.1:5000"))));
        assert!(!client_allowed(allow, None), "an unknown address is not on the list");
        assert!(client_allowed(&[], Some(&inet("203.0.113.9:1"))), "no list: everyone");
    }

    #[test]
    fn open_relay_and_unverified_tls_are_warned_about() {
        assert!(exposure_warnings(&settings("", "").proxy, &[]).is_empty(), "loopback listen: nothing to say");
        let s = settings("listen = \"0.0.0.0:8080\"", "");
        let w = exposure_warnings(&s.proxy, &s.routes);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("authenticated relay for anyone who can reach it") && w[0].contains("0.0.0.0:8080"));
        let s = settings("listen = \"0.0.0.0:8080\"\nallow_from = [\"10.0.0.0/8\"]", "");
        assert!(exposure_warnings(&s.proxy, &s.routes).is_empty());
        let s = settings("listen = \"[::]:8080\"\nallow_from = [\"0.0.0.0/0\"]", "");
        assert_eq!(exposure_warnings(&s.proxy, &s.routes).len(), 1, "a /0 restricts nothing");
        let s = settings("", "tls_verify = false");
        let w = exposure_warnings(&s.proxy, &s.routes);
        assert!(w.len() == 1 && w[0].contains("route `r`: tls_verify = false"), "{w:?}");
    }

    #[test]
    fn host_port_is_ignored() {
        assert_eq!(strip_port(b"example.com:8080"), b"example.com");
        assert_eq!(strip_port(b"example.com"), b"example.com");
        assert_eq!(strip_port(b"[::1]:80"), b"[::1]");
    }
}
