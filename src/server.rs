//! Process wiring: a small control runtime (refreshers, admin API, reload) beside
//! pingora's own server, which must not run inside a tokio runtime.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::server::configuration::ServerConf;
use pingora::server::{ExecutionPhase, Server};
use tracing::{error, info, warn};

use crate::config::Settings;
use crate::gateway::Gateway;
use crate::proxy::TollgateProxy;
use crate::{admin, metrics};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start the control runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot listen on {addr} (`{key}`): {reason}")]
    Bind { key: &'static str, addr: SocketAddr, reason: String },
    #[error(transparent)]
    Build(#[from] crate::gateway::BuildError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// The control runtime: two threads are plenty for refreshers and the admin API.
pub fn control_runtime() -> Result<tokio::runtime::Runtime, RunError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tollgate-ctl")
        .enable_all()
        .build()
        .map_err(RunError::Runtime)
}

/// Run the proxy until SIGTERM (drain) or SIGINT (immediate). Does not return on
/// success: pingora exits the process.
pub fn run(settings: Settings, config_path: Option<PathBuf>, rt: tokio::runtime::Runtime) -> Result<(), RunError> {
    let proxy_listen = settings.proxy.listen;
    let admin_listen = settings.admin.listen;
    let threads = settings.proxy.threads;
    let shutdown_timeout = settings.proxy.shutdown_timeout;
    let pool_size = settings.proxy.upstream_keepalive_pool_size;

    // Bind the admin port ourselves, and probe the proxy port, so that a port clash is a
    // clear error naming the key instead of a panic inside pingora.
    let admin_listener = std::net::TcpListener::bind(admin_listen).map_err(|e| RunError::Bind {
        key: "admin.listen",
        addr: admin_listen,
        reason: e.to_string(),
    })?;
    drop(std::net::TcpListener::bind(proxy_listen).map_err(|e| RunError::Bind {
        key: "proxy.listen",
        addr: proxy_listen,
        reason: e.to_string(),
    })?);

    let _ = metrics::get();
    let store = crate::store::open(&settings.store)?;
    info!(store = %store.describe(), "token store");
    let gateway = Gateway::start(settings, rt.handle().clone(), store)?;
    {
        let gw = Arc::clone(&gateway);
        rt.spawn(async move {
            if let Err(e) = admin::serve(admin_listener, gw).await {
                error!(error = %e, "admin listener failed");
            }
        });
    }
    if let Some(path) = &config_path {
        rt.spawn(crate::reload::watch(Arc::clone(&gateway), path.clone()));
    }
    rt.spawn(reload_on_sighup(Arc::clone(&gateway), config_path));

    let conf = ServerConf {
        threads,
        // pingora sleeps the whole grace period after SIGTERM; the drain watcher below
        // exits as soon as nothing is in flight, so this is only the upper bound.
        grace_period_seconds: Some(shutdown_timeout.as_secs().max(1)),
        graceful_shutdown_timeout_seconds: Some(1),
        work_stealing: false,
        upstream_keepalive_pool_size: pool_size,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    // tollgate's own ServerApp owns every accepted connection: with `proxy.fast_path` on
    // (read per connection, so a reload flips it either way) it serves plain requests
    // itself, and hands everything else, whole, to pingora's HttpProxy app.
    let conf = Arc::clone(&server.configuration);
    let pingora = Arc::new(pingora::proxy::http_proxy(&conf, TollgateProxy { gateway: Arc::clone(&gateway) }));
    let app = crate::fastpath::FastPathApp::new(Arc::clone(&gateway), pingora, &conf);
    let mut service = pingora::services::listening::Service::new("tollgate proxy".to_string(), app);
    // No L4 read buffer: both paths read the request into their own buffer, so pingora's
    // default 64 KiB one per connection was a second copy (and, over hundreds of
    // keep-alive connections, megabytes of cache-cold memory).
    let listener = pingora::listeners::ListenerConfig::tcp(proxy_listen.to_string())
        .l4_buffer(pingora::listeners::L4BufferSettings::default().read(0));
    service.add_listener(listener);
    server.add_service(service);

    spawn_drain_watcher(server.watch_execution_phase(), Arc::clone(&gateway), shutdown_timeout);
    info!(proxy = %proxy_listen, admin = %admin_listen, threads, "tollgate running");
    // Keep the control runtime alive for the life of the process.
    std::mem::forget(rt);
    server.run_forever()
}

/// After SIGTERM pingora stops accepting and sleeps out its grace period; we exit as
/// soon as the last in-flight request has finished, well before that bound.
fn spawn_drain_watcher(
    mut phases: tokio::sync::broadcast::Receiver<ExecutionPhase>,
    gateway: Arc<Gateway>,
    bound: Duration,
) {
    std::thread::spawn(move || loop {
        match phases.blocking_recv() {
            Ok(ExecutionPhase::ShutdownGracePeriod) => {
                let started = Instant::now();
                // Give requests accepted just before the signal a moment to register.
                std::thread::sleep(Duration::from_millis(50));
                while gateway.inflight() > 0 && started.elapsed() < bound {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let left = gateway.inflight();
                if left > 0 {
                    warn!(in_flight = left, "shutdown timeout reached with requests still in flight");
                } else {
                    info!(drain_ms = started.elapsed().as_millis() as u64, "drained; exiting");
                }
                std::process::exit(0);
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(_) => return,
        }
    });
}

/// SIGHUP reloads the config file; a bad file is rejected and the old config keeps serving.
async fn reload_on_sighup(gateway: Arc<Gateway>, path: Option<PathBuf>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot install SIGHUP handler; reload by signal disabled");
            return;
        }
    };
    while hup.recv().await.is_some() {
        match &path {
            // Loading reads files and resolves DNS: keep it off the runtime's two workers.
            Some(p) => {
                let (gw, p) = (Arc::clone(&gateway), p.clone());
                let _ = tokio::task::spawn_blocking(move || crate::reload::reload_file(&gw, &p)).await;
            }
            None => info!("SIGHUP ignored: the configuration is embedded"),
        }
    }
}
