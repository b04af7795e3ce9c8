//! A strict HTTP/1 fast path beside pingora (issue 13), PROTOTYPE.
//!
//! `FastPathApp` is the listening service's `ServerApp`: it owns every accepted
//! connection and, for now, hands each one whole to pingora's `HttpProxy` app, which runs
//! its own keep-alive loop. Later steps serve plain requests here and delegate the rest
//! (after `rewind`ing the bytes already read), so pingora stays the path for everything
//! the fast path does not implement.

use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;

use crate::gateway::Gateway;
use crate::proxy::TollgateProxy;

pub struct FastPathApp {
    gateway: Arc<Gateway>,
    pingora: Arc<HttpProxy<TollgateProxy>>,
}

impl FastPathApp {
    pub fn new(gateway: Arc<Gateway>, pingora: Arc<HttpProxy<TollgateProxy>>) -> Self {
        FastPathApp { gateway, pingora }
    }

    /// The whole connection goes to pingora, keep-alive loop included.
    async fn delegate(&self, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        ServerApp::process_new(&self.pingora, stream, shutdown).await
    }
}

#[async_trait]
impl ServerApp for FastPathApp {
    async fn process_new(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        // Read per connection, so a reload switches it for new connections.
        let _on = self.gateway.active().settings.proxy.fast_path;
        crate::metrics::get().fastpath_total.with_label_values(&["pingora", "all"]).inc();
        self.delegate(stream, shutdown).await
    }

    /// pingora calls `cleanup` on the service's app only; `HttpProxy` needs its own to end
    /// idle keep-alive reads at shutdown.
    async fn cleanup(&self) {
        ServerApp::cleanup(&*self.pingora).await;
    }
}
