//! A strict HTTP/1 fast path beside pingora (issue 13).
//!
//! `FastPathApp` is the listening service's `ServerApp`: it owns every accepted
//! connection, reads each request head itself and classifies it ([`parse`]). Plain
//! requests are served here ([`forward`]); the first request that is not is handed to
//! pingora's `HttpProxy` app with the bytes already read put back (`rewind`), for the
//! rest of the connection; pingora runs its own keep-alive loop from there. Why: stock
//! pingora-proxy spends ~85k instructions per request on structure (headers kept twice,
//! a watcher task per pooled connection, channels); this path does the same job in a
//! fraction of that, and everything unusual still gets pingora's full machinery.
//!
//! `proxy.fast_path` is read per connection, so a reload turns it on or off for the
//! connections that follow.
//!
//! Pipelined requests are served in order (pingora answers the first and closes).
//!
//! Handed to pingora before any byte is sent (reason in
//! `tollgate_fastpath_total{path="pingora"}`): anything [`parse`] does not call plain,
//! `allow_from` refusals, 404s, routes without a provider, an expired token, a failed
//! first connect. Served here: token injection (DPoP proofs included), `set_headers`,
//! Host rewrite and prefix stripping, the authorization policy, token waits and 503s,
//! 401/DPoP-nonce replay for bodies within the 64 KiB retry buffer, HTTP/1.0 clients,
//! 1xx answers, `graphql_unauthenticated`, `session_probe`, plain and TLS upstreams
//! ([`upstream`], [`pool`]). Answers the fast path writes itself are counted as
//! `path="fast"` with reason `bad_gateway`, `token_unavailable` or
//! `client_credentials`; upstream answers relayed as `served`. [`forward`] lists where
//! it deliberately differs from pingora.

mod forward;
pub mod framing;
pub mod parse;
mod pool;
pub(crate) mod upstream;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::connectors::{ConnectorOptions, TransportConnector};
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::configuration::ServerConf;
use pingora::server::ShutdownWatch;
use tokio::io::AsyncReadExt;

use crate::gateway::Gateway;
use crate::proxy::TollgateProxy;
use parse::Parsed;

/// pingora's own wait for the first request head and between keep-alive requests.
const HEAD_TIMEOUT: Duration = Duration::from_secs(60);

pub struct FastPathApp {
    gateway: Arc<Gateway>,
    pingora: Arc<HttpProxy<TollgateProxy>>,
    /// pingora's connector, used for `new_stream` only (connect, timeouts, TLS); its own
    /// pool is not used (see [`pool`]).
    connector: TransportConnector,
}

/// How reading a request head ended.
enum Head {
    /// `buf[..n]` holds a complete plain head (and perhaps body bytes after it).
    Plain(parse::Head),
    /// Not plain (reason): the bytes read go back to the stream and pingora takes over.
    Delegate(&'static str),
    /// Closed, timed out, or shutdown while idle: drop the connection silently.
    Gone,
}

impl FastPathApp {
    pub fn new(gateway: Arc<Gateway>, pingora: Arc<HttpProxy<TollgateProxy>>, conf: &ServerConf) -> Self {
        let connector = TransportConnector::new(Some(ConnectorOptions::from_server_conf(conf)));
        FastPathApp { gateway, pingora, connector }
    }

    /// The whole connection goes to pingora, keep-alive loop included.
    async fn delegate(&self, stream: Stream, shutdown: &ShutdownWatch, reason: &'static str) -> Option<Stream> {
        crate::metrics::get().fastpath_total.with_label_values(&["pingora", reason]).inc();
        ServerApp::process_new(&self.pingora, stream, shutdown).await
    }
}

/// Read until `buf` holds a complete request head, the head is known not to be plain,
/// the peer closes, the wait times out, or shutdown begins while nothing was read.
async fn read_head(conn: &mut L4Stream, buf: &mut Vec<u8>, shutdown: &ShutdownWatch) -> Head {
    let mut shutdown = shutdown.clone();
    let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
    loop {
        if !buf.is_empty() {
            match parse::parse(buf) {
                Parsed::Partial => {}
                Parsed::Plain(h) => return Head::Plain(h),
                Parsed::NotPlain(why) => return Head::Delegate(why),
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        let idle = buf.is_empty();
        let read = tokio::select! {
            r = tokio::time::timeout_at(deadline, conn.read_buf(buf)) => r,
            _ = shutdown.wait_for(|down| *down), if idle => return Head::Gone,
        };
        match read {
            Ok(Ok(0)) if idle => return Head::Gone,
            // Closed or timed out mid-head: pingora decides what that gets.
            Ok(Ok(0)) | Err(_) if !idle => return Head::Delegate("incomplete"),
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return Head::Gone,
        }
    }
}

#[async_trait]
impl ServerApp for FastPathApp {
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        // Read per connection, so a reload switches it for new connections.
        if !self.gateway.active().settings.proxy.fast_path {
            return self.delegate(stream, shutdown, "off").await;
        }
        // `rewind` is on the concrete plain-TCP stream only (TLS listeners hand another type).
        if !stream.as_any().is::<L4Stream>() {
            return self.delegate(stream, shutdown, "not_tcp").await;
        }
        let Ok(mut conn) = stream.into_any().downcast::<L4Stream>() else {
            return None; // checked just above
        };
        let mut buf = Vec::with_capacity(8192);
        // Requests are served in order, pipelined ones included (pingora would answer the
        // first and drop the rest); the first one not served here hands the connection over.
        let reason = loop {
            let head = match read_head(&mut conn, &mut buf, shutdown).await {
                Head::Gone => return None,
                Head::Delegate(why) => break why,
                Head::Plain(h) => h,
            };
            let down = *shutdown.borrow();
            match forward::serve(self, &mut conn, &mut buf, &head, down).await {
                forward::Outcome::KeepAlive => {}
                forward::Outcome::Close => return None,
                forward::Outcome::Delegate(why) => break why,
            }
        };
        conn.rewind(&buf);
        self.delegate(conn, shutdown, reason).await
    }

    /// pingora calls `cleanup` on the service's app only; `HttpProxy` needs its own to end
    /// idle keep-alive reads at shutdown.
    async fn cleanup(&self) {
        ServerApp::cleanup(&*self.pingora).await;
    }
}
