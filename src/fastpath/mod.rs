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
//! `allow_from` refusals, 404s, routes without a provider, a failed first connect.
//! Served here: token injection (DPoP proofs included), `set_headers`, Host rewrite and
//! prefix stripping, the authorization policy, token waits and 503s,
//! 401/DPoP-nonce replay for bodies within the 64 KiB retry buffer, HTTP/1.0 clients,
//! 1xx answers, `graphql_unauthenticated`, `session_probe`, plain and TLS upstreams
//! ([`upstream`], [`pool`]). Answers the fast path writes itself are counted as
//! `path="fast"` with reason `bad_gateway`, `token_unavailable` or
//! `client_credentials`; upstream answers relayed as `served`. [`forward`] lists where
//! it deliberately differs from pingora.

mod date;
mod deadline;
mod forward;
pub mod framing;
pub mod parse;
mod pool;
pub(crate) mod upstream;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
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
use tokio::time::Instant;

use crate::gateway::Gateway;
use crate::proxy::TollgateProxy;
use deadline::LazyDeadline;
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

/// One client connection's timers (see [`deadline`]): made once, moved lazily.
#[derive(Default)]
struct Timers {
    /// The wait for the next request head.
    head: LazyDeadline,
    /// The waits for the upstream's answer.
    upstream: LazyDeadline,
}

/// Read until `buf` holds a complete request head, the head is known not to be plain,
/// the peer closes, `since + HEAD_TIMEOUT` passes (`since`: when the connection was
/// accepted or the previous answer was done), or shutdown begins while nothing was read.
///
/// Shutdown: the connection's task is registered once with the shutdown watch (see
/// `process_new`), so the wait here only looks at the value when the task wakes.
async fn read_head(
    conn: &mut L4Stream,
    buf: &mut Vec<u8>,
    shutdown: &ShutdownWatch,
    timer: &mut LazyDeadline,
    since: Instant,
) -> Head {
    let deadline = since + HEAD_TIMEOUT;
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
        let waited = {
            let mut read = std::pin::pin!(conn.read_buf(buf));
            std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = read.as_mut().poll(cx) {
                    return Poll::Ready(Wait::Read(r));
                }
                if idle && *shutdown.borrow() {
                    return Poll::Ready(Wait::Shutdown);
                }
                timer.poll_until(cx, deadline).map(|()| Wait::Timeout)
            })
            .await
        };
        match waited {
            // Closed or timed out mid-head: pingora decides what that gets.
            Wait::Read(Ok(0)) | Wait::Timeout if !idle => return Head::Delegate("incomplete"),
            Wait::Read(Ok(0)) | Wait::Read(Err(_)) | Wait::Timeout | Wait::Shutdown => return Head::Gone,
            Wait::Read(Ok(_)) => {}
        }
    }
}

/// How one wait for request bytes ended.
enum Wait {
    Read(std::io::Result<usize>),
    Timeout,
    /// Shutdown began while the connection was idle.
    Shutdown,
}

/// Register this task with the shutdown watch once for the connection's life: a
/// graceful shutdown then wakes it wherever it waits, and the waits only read the
/// value (no waiter added and removed per request). `ShutdownWatch` changes once, to
/// `true`, so one registration is enough.
async fn register_for_shutdown(mut wait: Pin<&mut impl Future>) {
    std::future::poll_fn(|cx| {
        let _ = wait.as_mut().poll(cx);
        Poll::Ready(())
    })
    .await;
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
        let mut timers = Timers::default();
        let mut since = Instant::now();
        let reason = {
            let mut watch = shutdown.clone();
            // Unconstrained: a task out of coop budget would get `Pending` without the
            // waiter being registered, and this future is polled only once.
            let shutting_down = std::pin::pin!(tokio::task::unconstrained(watch.wait_for(|down| *down)));
            register_for_shutdown(shutting_down).await;
            // Requests are served in order, pipelined ones included (pingora would answer
            // the first and drop the rest); the first one not served here hands the
            // connection over.
            loop {
                let head = match read_head(&mut conn, &mut buf, shutdown, &mut timers.head, since).await {
                    Head::Gone => return None,
                    Head::Delegate(why) => break why,
                    Head::Plain(h) => h,
                };
                let down = *shutdown.borrow();
                match forward::serve(self, &mut conn, &mut buf, &head, down, &mut timers.upstream).await {
                    forward::Outcome::KeepAlive(done) => since = done,
                    forward::Outcome::Close => return None,
                    forward::Outcome::Delegate(why) => break why,
                }
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
