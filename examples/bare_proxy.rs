//! Bare pingora reverse proxy: the floor for tollgate's per-request overhead.
//!
//! It does the minimum a token sidecar must do on the hot path: forward every
//! request to one fixed upstream (HTTP/1.1, pooled keep-alive connections) and
//! insert a constant `Authorization` header. No routing, no token cache, no
//! metrics, no logging.
//!
//! Usage:
//!   bare_proxy <listen-addr> <upstream-addr>
//!   e.g. bare_proxy 127.0.0.1:18003 127.0.0.1:18001
//!
//! Environment (all optional; defaults mirror tollgate's `proxy.threads = 1`):
//!   BARE_PROXY_AUTH           full Authorization header value
//!                             (default: "Bearer " + a fixed 807-byte token)
//!   BARE_PROXY_THREADS        pingora worker threads (default 1)
//!   BARE_PROXY_WORK_STEALING  1/0: tokio multi-thread vs per-thread current-thread
//!                             runtime (default 1, pingora's default)
//!   BARE_PROXY_POOL_SIZE      upstream keep-alive pool size (default 128, pingora's default)
//!   BARE_PROXY_READ_TIMEOUT_MS    set the peer's read_timeout (default: unset, like pingora)
//!   BARE_PROXY_CONNECT_TIMEOUT_MS set the peer's connection_timeout (default: unset)
//!   BARE_PROXY_RETRY_BUFFER   1: call `enable_retry_buffering()` on every request
//!   BARE_PROXY_TLS_SNI        connect to the upstream with TLS, sending this SNI (certificate not verified)
//!
//! The last three mirror what tollgate does, to attribute differences between the two.
//!
//! Used by `bench/run.sh` (target C).

use async_trait::async_trait;
use http::HeaderValue;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use pingora::upstreams::peer::HttpPeer;

struct BareProxy {
    upstream: HttpPeer,
    auth: HeaderValue,
    retry_buffer: bool,
}

#[async_trait]
impl ProxyHttp for BareProxy {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        if self.retry_buffer {
            session.enable_retry_buffering();
        }
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.upstream.clone()))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut (),
    ) -> Result<()> {
        upstream_request.insert_header(http::header::AUTHORIZATION, self.auth.clone())
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn default_auth() -> String {
    // Deterministic JWT-shaped 807-byte token (same length as tollgate's bench token).
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut token = String::with_capacity(807);
    for i in 0..807usize {
        if i == 36 || i == 720 {
            token.push('.');
        } else {
            token.push(ALPHABET[(i * 7 + 3) % 64] as char);
        }
    }
    format!("Bearer {token}")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: {} <listen-addr> <upstream-addr>", args[0]);
        std::process::exit(2);
    }
    let (listen, upstream) = (&args[1], &args[2]);

    let auth = std::env::var("BARE_PROXY_AUTH").unwrap_or_else(|_| default_auth());
    let auth = HeaderValue::from_str(&auth).expect("BARE_PROXY_AUTH is not a valid header value");

    let conf = ServerConf {
        threads: env_or("BARE_PROXY_THREADS", 1usize),
        work_stealing: env_or("BARE_PROXY_WORK_STEALING", 1u8) != 0,
        upstream_keepalive_pool_size: env_or("BARE_PROXY_POOL_SIZE", 128usize),
        pid_file: format!("/tmp/bare_proxy.{}.pid", std::process::id()),
        upgrade_sock: format!("/tmp/bare_proxy.{}.sock", std::process::id()),
        // SIGTERM: stop within ~1 s instead of pingora's 5 min default grace period.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    // TLS upstream (bench/fastpath.sh): the SNI to send; the bench's throwaway CA is not
    // verified here, as HAProxy's `ssl verify none` in the same run.
    let mut peer = match std::env::var("BARE_PROXY_TLS_SNI") {
        Ok(sni) => {
            let mut p = HttpPeer::new(upstream.as_str(), true, sni);
            p.options.verify_cert = false;
            p.options.verify_hostname = false;
            p
        }
        Err(_) => HttpPeer::new(upstream.as_str(), false, String::new()),
    };
    if let Ok(ms) = std::env::var("BARE_PROXY_READ_TIMEOUT_MS") {
        peer.options.read_timeout = Some(std::time::Duration::from_millis(ms.parse().expect("ms")));
    }
    if let Ok(ms) = std::env::var("BARE_PROXY_CONNECT_TIMEOUT_MS") {
        peer.options.connection_timeout = Some(std::time::Duration::from_millis(ms.parse().expect("ms")));
    }
    let retry_buffer = env_or("BARE_PROXY_RETRY_BUFFER", 0u8) != 0;
    let mut proxy = http_proxy_service(&server.configuration, BareProxy { upstream: peer, auth, retry_buffer });
    proxy.add_tcp(listen);
    server.add_service(proxy);
    eprintln!("bare_proxy listening on {listen}, upstream {upstream}");
    server.run_forever();
}
