//! Integration-test harness: runs the real `tollgate` binary as a child process on
//! ephemeral loopback ports, captures everything it prints (for leak checks), and
//! offers an HTTP client pointed at it.
#![allow(dead_code, unused_imports)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use tollgate_testkit::idp::{Idp, IdpConfig, Mode};
pub use tollgate_testkit::upstream::Upstream;
pub use tollgate_testkit::Ledger;

pub mod redis;

pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

/// One provider `p` (its `[providers.p]` table in `provider`), one catch-all route `api`
/// to `upstream` (plus `route_extra` keys), and a file store in the test's directory.
pub fn file_store_config(provider: &str, upstream: &Upstream, route_extra: &str) -> String {
    store_file_config("{DIR}/tokens.json", "p", provider, upstream, route_extra)
}

/// Like [`file_store_config`], with the store file at `store` (several processes may share
/// it) and the route's provider named `name`.
pub fn store_file_config(store: &str, name: &str, provider: &str, upstream: &Upstream, route_extra: &str) -> String {
    format!(
        r#"
[proxy]
listen = "{{PROXY}}"
token_wait = "1s"
[admin]
listen = "{{ADMIN}}"
[store]
kind = "file"
path = "{store}"
{provider}
[[routes]]
name = "api"
path_prefix = "/"
upstream = "{up}"
provider = "{name}"
{route_extra}
"#,
        up = upstream.url()
    )
}

/// A loopback port that was free a moment ago, and never handed out before in this test
/// binary: the kernel may give a just-released port out again, and two processes started
/// together (a fleet of replicas) would then race for it.
pub fn free_port() -> SocketAddr {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    for _ in 0..100 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind ephemeral port");
        let addr = l.local_addr().expect("local addr");
        let mut seen = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
        if !seen.contains(&addr.port()) {
            seen.push(addr.port());
            return addr;
        }
    }
    panic!("no fresh loopback port after 100 tries");
}

pub struct Tollgate {
    child: Option<Child>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    logs: Arc<Mutex<String>>,
    pub dir: tempfile::TempDir,
    /// Sent as `Authorization: Bearer …` by [`Tollgate::metrics`] and [`Tollgate::admin_get`].
    pub admin_token: Option<String>,
}

impl Tollgate {
    /// Start with `config`, in which `{PROXY}` and `{ADMIN}` are replaced by free loopback
    /// addresses (`{ADMIN_PORT}` by the admin address's port alone, to bind it elsewhere)
    /// and `{DIR}` by a temporary directory.
    pub fn start(config: &str) -> Self {
        Self::start_with_env(config, &[])
    }

    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Self {
        Self::launch(config, env, false)
    }

    /// Like [`Tollgate::start`], but the config file is reached through a symlink into a
    /// directory the file watcher does not watch: an edit made with
    /// [`Tollgate::write_config`] is applied only by SIGHUP ([`Tollgate::sighup_reload`]),
    /// so every reload is one the test asked for.
    pub fn start_sighup_only(config: &str) -> Self {
        Self::launch(config, &[], true)
    }

    fn launch(config: &str, env: &[(&str, &str)], sighup_only: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let proxy = free_port();
        let admin = free_port();
        let text = config
            .replace("{PROXY}", &proxy.to_string())
            .replace("{ADMIN}", &admin.to_string())
            .replace("{ADMIN_PORT}", &admin.port().to_string())
            .replace("{DIR}", &dir.path().display().to_string());
        let config_path = dir.path().join("tollgate.toml");
        if sighup_only {
            let real = dir.path().join("sighup-only");
            std::fs::create_dir(&real).expect("create config dir");
            std::fs::write(real.join("tollgate.toml"), text).expect("write config");
            std::os::unix::fs::symlink(real.join("tollgate.toml"), &config_path).expect("link config");
        } else {
            std::fs::write(&config_path, text).expect("write config");
        }
        let mut t = Tollgate {
            child: None,
            proxy,
            admin,
            config_path,
            logs: Arc::new(Mutex::new(String::new())),
            dir,
            admin_token: None,
        };
        t.spawn(env);
        t
    }

    /// The config file's current text.
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config_path).expect("read config")
    }

    /// Rewrite the config file in place (through the symlink of
    /// [`Tollgate::start_sighup_only`], if any).
    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config_path, text).expect("write config");
    }

    /// Send SIGHUP and wait (up to 10 s) until `tollgate_config_reload_total` moves, whatever
    /// the outcome. Returns the metrics text seen after the reload.
    pub async fn sighup_reload(&self) -> String {
        let before = reload_total(&self.metrics().await);
        self.signal("HUP");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = self.metrics().await;
            if reload_total(&m) > before {
                return m;
            }
            assert!(Instant::now() < deadline, "SIGHUP caused no reload within 10 s; logs:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn spawn(&mut self, env: &[(&str, &str)]) {
        let mut cmd = Command::new(BIN);
        cmd.arg("run").arg("--config").arg(&self.config_path);
        cmd.env("TOLLGATE_LOG", "debug").env("NO_COLOR", "1");
        // scripts/test runs the suite twice, with TOLLGATE_PROXY__FAST_PATH true and false;
        // a test whose config sets the switch itself means that value.
        if self.config_text().contains("fast_path") {
            cmd.env_remove(FAST_PATH_ENV);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
        let mut child = cmd.spawn().expect("spawn tollgate");
        for stream in [
            child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|s| Box::new(s) as _),
        ]
        .into_iter()
        .flatten()
        {
            let logs = Arc::clone(&self.logs);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut l = logs.lock().unwrap_or_else(|p| p.into_inner());
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        self.child = Some(child);
    }

    /// Kill (as `kill -9` would) and start again on the same ports and config.
    pub fn restart_hard(&mut self) {
        self.kill_hard();
        self.spawn(&[]);
    }

    /// Kill as `kill -9` would.
    pub fn kill_hard(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again after [`Tollgate::kill_hard`], on the same ports and config.
    pub fn start_again(&mut self) {
        self.spawn(&[]);
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().expect("kill");
        assert!(status.success());
    }

    /// Wait for the process to exit; its exit status, or `None` on timeout.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Some(st);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Wait until `/healthz` answers (the admin listener is up and the proxy is starting).
    pub async fn wait_healthy(&self) {
        self.wait_for(|s| s == 200, "/healthz").await;
        // The proxy port is bound by pingora right after; wait for it too.
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(self.proxy).await.is_err() {
            assert!(Instant::now() < deadline, "proxy port never opened; logs:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Wait until `/readyz` says every provider holds a token.
    pub async fn wait_ready(&self) {
        self.wait_healthy().await;
        self.wait_for(|s| s == 200, "/readyz").await;
    }

    async fn wait_for(&self, ok: impl Fn(u16) -> bool, path: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = client().get(self.admin_url(path)).send().await {
                if ok(r.status().as_u16()) {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "{path} never became ready; logs:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        let r = self.admin_get("/metrics").await;
        assert_eq!(r.status(), 200, "GET /metrics");
        r.text().await.expect("metrics body")
    }

    /// GET an admin path, with the admin token when [`Tollgate::admin_token`] is set.
    pub async fn admin_get(&self, path: &str) -> reqwest::Response {
        let mut req = client().get(self.admin_url(path));
        if let Some(t) = &self.admin_token {
            req = req.bearer_auth(t);
        }
        req.send().await.expect("admin request")
    }

    /// Assert that the requests served so far took the path this run of the suite means
    /// (scripts/test runs it with the fast path on and off): `/admin/proxy` reports the
    /// switch the environment asked for, and with it on the fast path served requests,
    /// with it off none. A fast path that silently handed everything to pingora, or an
    /// environment that never reached the process, fails here.
    pub async fn assert_path(&self) {
        let status: serde_json::Value = self.admin_get("/admin/proxy").await.json().await.expect("admin/proxy json");
        let on = status["fast_path"].as_bool().expect("fast_path flag");
        if let Some(wanted) = fast_path_env() {
            assert_eq!(on, wanted, "{FAST_PATH_ENV} did not reach tollgate: {status}");
        }
        let served = status["fast_path_requests"].as_u64().expect("fast_path_requests");
        if on {
            assert!(served > 0, "fast path on but no request served on it: {status}");
        } else {
            assert_eq!(served, 0, "fast path off but requests served on it: {status}");
        }
    }

    /// The value of one metric series (exact label text), or 0.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }
}

/// The environment variable scripts/test sets to run the suite with the fast path on and off.
pub const FAST_PATH_ENV: &str = "TOLLGATE_PROXY__FAST_PATH";

/// `Some(on)` when this run of the suite sets the fast-path switch.
pub fn fast_path_env() -> Option<bool> {
    std::env::var(FAST_PATH_ENV).ok().map(|v| v.trim() == "true")
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        if std::env::var_os("TOLLGATE_TEST_FASTPATH_REPORT").is_some() {
            // Which path served the requests, for debugging a run: printed, not asserted
            // (`assert_path` asserts).
            eprintln!("fastpath report {}: {}", std::thread::current().name().unwrap_or("?"), self.fastpath_counts());
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Tollgate {
    /// `tollgate_fastpath_total` series from /metrics, read synchronously (for `Drop`).
    fn fastpath_counts(&self) -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&self.admin, Duration::from_secs(1)) else {
            return "admin unreachable".into();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let auth = self.admin_token.as_ref().map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let _ = write!(s, "GET /metrics HTTP/1.1\r\nHost: a\r\n{auth}Connection: close\r\n\r\n");
        let mut text = String::new();
        let _ = s.take(4 << 20).read_to_string(&mut text);
        let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("tollgate_fastpath_total")).collect();
        lines.join(" ")
    }
}

pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// The sum of `tollgate_config_reload_total` over every outcome.
pub fn reload_total(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("tollgate_config_reload_total{"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.trim().parse::<f64>().ok()))
        .sum()
}

/// A client that does not follow redirects and uses no proxy from the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build().expect("client")
}

/// Run `tollgate <args>` to completion.
pub fn run_cli(args: &[&str], cwd: &Path) -> std::process::Output {
    Command::new(BIN).args(args).current_dir(cwd).env("NO_COLOR", "1").output().expect("run tollgate")
}

/// An OAuth2 token-endpoint double and an upstream double that accepts only the tokens
/// that endpoint issued (through their shared ledger).
pub async fn oauth2_doubles(cfg: IdpConfig) -> (Idp, Upstream, Ledger) {
    let ledger = Ledger::default();
    let idp = Idp::start(cfg, ledger.clone()).await.expect("start the token-endpoint double");
    let upstream = Upstream::start(Some(ledger.clone())).await.expect("start the upstream double");
    (idp, upstream, ledger)
}

/// The usual provider + route config for an OAuth2 double.
pub fn oauth2_config(idp: &Idp, upstream: &Upstream, extra_provider: &str, extra_proxy: &str) -> String {
    oauth2_config_at(&idp.url(), &upstream.url(), extra_provider, extra_proxy)
}

/// [`oauth2_config`] for any token endpoint and upstream URL (raw or scripted doubles).
pub fn oauth2_config_at(token_url: &str, upstream: &str, extra_provider: &str, extra_proxy: &str) -> String {
    format!(
        r#"
[proxy]
listen = "{{PROXY}}"
{extra_proxy}

[admin]
listen = "{{ADMIN}}"

[providers.backend]
kind = "oauth2"
token_url = "{token_url}"
client_id = "abc123"
client_secret = "456789"
backoff_min = "100ms"
backoff_max = "1s"
timeout = "1s"
{extra_provider}

[[routes]]
name = "api"
path_prefix = "/"
upstream = "{upstream}"
provider = "backend"
"#
    )
}

/// Client traffic until stopped, for at most 20 s and 4000 requests (or the limits given
/// to [`Traffic::start_bounded`]); counts answers other than 200 and keeps the first few.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU32>,
    bad: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Traffic {
    pub fn start(tg: &Tollgate) -> Self {
        Self::start_bounded(tg, Duration::from_secs(20), 4000)
    }

    pub fn start_bounded(tg: &Tollgate, max_time: Duration, max_requests: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU32::new(0));
        let bad = Arc::new(AtomicU32::new(0));
        let (s, o, b) = (stop.clone(), ok.clone(), bad.clone());
        let url = tg.url("/load");
        let task = tokio::spawn(async move {
            let c = client();
            let mut firsts = Vec::new();
            let started = Instant::now();
            let mut sent = 0;
            while !s.load(Ordering::SeqCst) && started.elapsed() < max_time && sent < max_requests {
                sent += 1;
                let failure = match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => None,
                    Ok(r) => Some(format!("{} {}", r.status(), r.text().await.unwrap_or_default())),
                    Err(e) => Some(e.to_string()),
                };
                match failure {
                    None => o.fetch_add(1, Ordering::SeqCst),
                    Some(f) => {
                        if firsts.len() < 3 {
                            firsts.push(f);
                        }
                        b.fetch_add(1, Ordering::SeqCst)
                    }
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            firsts
        });
        Traffic { stop, ok, bad, task }
    }

    /// Stop; (successes, failures, the first failures).
    pub async fn finish(self) -> (u32, u32, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let firsts = self.task.await.expect("traffic task");
        (self.ok.load(Ordering::SeqCst), self.bad.load(Ordering::SeqCst), firsts)
    }
}
