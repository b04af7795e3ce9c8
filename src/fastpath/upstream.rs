//! Upstream connections for the fast path: made by pingora's `TransportConnector` from
//! the route's own `HttpPeer` (the template `gateway::peer_for` builds for pingora's path:
//! connect timeout, TLS with SNI, `ca_file`, `tls_verify`, the provider's client
//! certificate with `upstream_client_cert`, ALPN `http/1.1`), so a connection is made and
//! verified exactly as on pingora's path; kept between requests in this thread's
//! [`pool`](super::pool).
//!
//! Only `new_stream` of the connector is used: its `get_stream`/`release_stream` pool
//! spawns a watcher task per release.

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pingora::connectors::TransportConnector;
use pingora::protocols::Stream;
use pingora::upstreams::peer::{HttpPeer, Peer};

pub use super::pool::{Limits, PoolKey};
use crate::proxy::router::RouteEntry;

/// A connection that could not be made; `kind` is pingora's error type name
/// (`ConnectRefused`, `ConnectTimedout`, `TLSHandshakeFailure`, `InvalidCert`, …), the
/// `message` of a 502 on pingora's path.
#[derive(Debug, thiserror::Error)]
#[error("upstream connection failed: {kind}")]
pub struct ConnectError {
    pub kind: &'static str,
}

/// What makes a connection of this peer template reusable for another request: pingora's
/// `reuse_hash` (scheme, SNI, client certificate serial, verification flags, …; the
/// template's address is only a placeholder with the port) plus what it leaves out but a
/// connection is bound to all the same: the trusted CAs and the client certificate itself
/// (two certificates may share a serial). Computed once per route entry, at config load.
pub fn peer_key(peer: &HttpPeer) -> u64 {
    // SipHash with fixed keys: the same value on every thread.
    let mut h = std::hash::DefaultHasher::new();
    peer.reuse_hash().hash(&mut h);
    if let Some(ca) = &peer.options.ca {
        for c in ca.iter() {
            c.to_der().ok().hash(&mut h);
        }
    }
    if let Some(ck) = &peer.client_cert_key {
        ck.leaf().to_der().ok().hash(&mut h);
        for c in ck.intermediates() {
            c.to_der().ok().hash(&mut h);
        }
    }
    h.finish()
}

/// The pool key of `route`'s connections to `addr` (no hashing of the peer per request).
pub fn key(route: &RouteEntry, addr: SocketAddr) -> PoolKey {
    PoolKey::new(route.pool_key, addr)
}

/// An idle connection for `key` on this thread, tested alive (`now`: the request's start).
pub fn checkout(key: &PoolKey, now: Instant) -> Option<Stream> {
    super::pool::checkout(key, now)
}

/// Return a connection after a complete exchange both sides left open (`now`: its end).
pub fn checkin(key: PoolKey, stream: Stream, limits: Limits, now: Instant) {
    super::pool::checkin(key, stream, limits, now);
}

/// The pool's limits from the proxy settings: the idle timeout, and this thread's share of
/// `upstream_keepalive_pool_size`.
pub fn limits(idle_timeout: Duration, pool_size: usize, threads: usize) -> Limits {
    Limits { idle_timeout, cap: pool_size.div_ceil(threads.max(1)) }
}

/// A new connection to `addr` for `route` (TCP, and TLS when the route's upstream is
/// https), with the route's connect timeout.
pub async fn connect(
    connector: &TransportConnector,
    route: &RouteEntry,
    addr: SocketAddr,
) -> Result<Stream, ConnectError> {
    let mut peer: HttpPeer = route.peer.clone();
    peer._address = pingora::protocols::l4::socket::SocketAddr::Inet(addr);
    connector.new_stream(&peer).await.map_err(|e| ConnectError { kind: e.etype().as_str() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::tls::pkey::{PKey, Private};
    use pingora::tls::x509::X509;
    use pingora::utils::tls::CertKey;
    use std::sync::Arc;

    fn template(tls: bool, sni: &str) -> HttpPeer {
        HttpPeer::new(SocketAddr::from(([0, 0, 0, 0], 443)), tls, sni.to_string())
    }

    #[test]
    fn the_key_changes_with_every_connection_setting_and_only_with_those() {
        let base = peer_key(&template(true, "api.example"));
        assert_eq!(base, peer_key(&template(true, "api.example")), "stable");
        assert_ne!(base, peer_key(&template(false, "api.example")), "scheme");
        assert_ne!(base, peer_key(&template(true, "other.example")), "SNI");
        let mut p = template(true, "api.example");
        p.options.verify_cert = false;
        assert_ne!(base, peer_key(&p), "verification");
        let mut p = template(true, "api.example");
        p.options.verify_hostname = false;
        assert_ne!(base, peer_key(&p), "hostname verification");
        let mut p = template(true, "api.example");
        p.options.read_timeout = Some(Duration::from_secs(3));
        p.options.connection_timeout = Some(Duration::from_secs(3));
        assert_eq!(base, peer_key(&p), "timeouts do not bind a connection");
    }

    fn cert(cn: &str) -> (X509, PKey<Private>) {
        let kp = rcgen::KeyPair::generate().expect("key");
        let c = rcgen::CertificateParams::new(vec![cn.to_string()]).expect("params").self_signed(&kp).expect("cert");
        let x = X509::from_pem(c.pem().as_bytes()).expect("x509");
        (x, PKey::private_key_from_pem(kp.serialize_pem().as_bytes()).expect("key"))
    }

    #[test]
    fn the_key_changes_with_the_trusted_cas_and_the_client_certificate() {
        let base = peer_key(&template(true, "api.example"));
        let (ca1, _) = cert("ca-1");
        let (ca2, _) = cert("ca-2");
        let with_ca = |ca: &X509| {
            let mut p = template(true, "api.example");
            p.options.ca = Some(Arc::new(vec![ca.clone()].into_boxed_slice()));
            peer_key(&p)
        };
        assert_ne!(base, with_ca(&ca1));
        assert_ne!(with_ca(&ca1), with_ca(&ca2), "another CA never reuses a connection verified with the first");
        assert_eq!(with_ca(&ca1), with_ca(&ca1.clone()), "the same CA, loaded again (a reload), does");
        let with_cert = |c: &(X509, PKey<Private>)| {
            let mut p = template(true, "api.example");
            p.client_cert_key = Some(Arc::new(CertKey::new(vec![c.0.clone()], c.1.clone())));
            peer_key(&p)
        };
        let (one, two) = (cert("client-1"), cert("client-2"));
        assert_ne!(base, with_cert(&one));
        assert_ne!(with_cert(&one), with_cert(&two));
        assert_eq!(with_cert(&one), with_cert(&one));
    }
}
