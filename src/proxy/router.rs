//! Route matching: host (optional) and longest path prefix. Built once per config, so a
//! request does a short linear scan over precomputed, pre-sorted entries.

use std::sync::Arc;

use pingora::upstreams::peer::HttpPeer;

use crate::config::RouteSpec;
use crate::token::TokenCell;

pub struct RouteEntry {
    pub spec: RouteSpec,
    pub cell: Option<Arc<TokenCell>>,
    /// A template peer; cloned per request because pingora takes ownership of a boxed one.
    pub peer: HttpPeer,
    /// The provider's bound on invalidations after upstream rejections.
    pub reauth_min_interval: std::time::Duration,
    pub metrics: crate::metrics::RouteMetrics,
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

    #[test]
    fn host_port_is_ignored() {
        assert_eq!(strip_port(b"example.com:8080"), b"example.com");
        assert_eq!(strip_port(b"example.com"), b"example.com");
        assert_eq!(strip_port(b"[::1]:80"), b"[::1]");
    }
}
