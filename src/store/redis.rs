//! The Redis store: one token entry per provider identity, shared by every replica of a
//! fleet, plus what a fleet needs to make one token request between them (see
//! [`Fleet`]): leases, fenced writes, invalidation, pending human logins and a message
//! stream (pub/sub).
//!
//! Layout, under the configured key prefix (default `tollgate:`); `{key}` is the provider
//! identity hash the caller passes, never a secret:
//! - `{prefix}token:{key}`: a hash `{v: version, s: sealed StoredToken}`.
//! - `{prefix}ver:{key}`: the key's version counter. It outlives the entry, so an entry
//!   deleted and written again never reuses a version; when the counter itself is
//!   missing (first write, or Redis lost its data) it starts from Redis' clock in
//!   microseconds, so versions do not go back even across a Redis that restarted empty (a
//!   replica still holding version 5 from before cannot invalidate a fresh entry that
//!   happens to reach 5 again).
//! - `{prefix}lease:{key}`: the random fencing value of the replica fetching for the fleet.
//! - `{prefix}pending:{key}`: a sealed pending human login.
//! - channel `{prefix}events`: JSON messages (`written`, `invalidated`, `pending`).
//!
//! Every write that must be atomic with a check (CAS, fenced write, compare-and-delete)
//! is one Lua script, and publishes its message from the same script, so a message is
//! never sent for a write that did not happen.
//!
//! Failure model: every operation is bounded by `timeout` and fails with a
//! [`StoreError`] the caller falls back on (fetching alone); the store never retries
//! writes itself (a retried script may have run already). Connections are made lazily, so
//! [`RedisStore::connect`] succeeds while Redis is down, and replaced after a timeout or a
//! dropped connection; with Sentinel the master is looked up again after a failover
//! (`READONLY`, refused or dropped connections).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{Client, ConnectionAddr, ConnectionInfo, ErrorKind, IntoConnectionInfo, RedisError, ServerErrorKind};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use super::fleet::{Fleet, FleetMessage, Lease};
use super::seal::{self, Sealer};
use super::{Loaded, Saved, StoreError, StoredToken, TokenStore, Version};
use crate::config::RedisSettings;
use crate::secret::Secret;

pub use super::seal::{validate_key, validate_keys};

/// Default for `RedisSettings::key_prefix`.
pub const DEFAULT_KEY_PREFIX: &str = "tollgate:";
/// Default for `RedisSettings::lease_ttl`.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Default for `RedisSettings::timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// A sensible TTL for [`Fleet::save_pending`]: how long a human has to type the code.
pub const DEFAULT_PENDING_TTL: Duration = Duration::from_secs(30 * 60);
/// How often the message stream checks that Redis still answers: a hung Redis or a
/// silently dropped connection is noticed within this plus `timeout`.
const EVENTS_PING_EVERY: Duration = Duration::from_secs(1);
/// The longest wait between two attempts to restore the message stream.
const EVENTS_RETRY_MAX: Duration = Duration::from_secs(2);
/// Buffered messages per subscriber before it sees `Lagged`.
const EVENTS_CAPACITY: usize = 1024;

/// Settings with the defaults for everything but the URL and the keys (tests, tools).
pub fn settings(url: impl Into<String>, encryption_keys: Vec<Secret>) -> RedisSettings {
    RedisSettings {
        url: url.into(),
        username: None,
        password: None,
        key_prefix: DEFAULT_KEY_PREFIX.to_string(),
        sentinel: None,
        encryption_keys,
        lease_ttl: DEFAULT_LEASE_TTL,
        timeout: DEFAULT_TIMEOUT,
    }
}

/// Everything [`RedisStore::connect`] refuses, as one message naming the setting (never
/// a password or a key). The config's own validation checks the same and more (it also
/// refuses credentials in URLs: they belong in `username`/`password`).
///
/// How the fields are used: `url` is `redis://host:port/db` or `rediss://…` (TLS
/// through rustls and the system's roots; `#insecure` at the end skips verification).
/// With `sentinel`, the URL's host and port are not used (the sentinels name the
/// master); its scheme (TLS) and database, and `username`/`password`, apply to the
/// master. `encryption_keys`: base64 of 32 random bytes each; the first seals, all open
/// (rotation: add the new key at the end, roll out; move it first, roll out; drop the
/// old one). `timeout` bounds every operation, connecting included.
pub fn validate(s: &RedisSettings) -> Result<(), String> {
    validate_url(&s.url).map_err(|e| format!("url {e}"))?;
    if s.key_prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("key_prefix contains whitespace or control characters".into());
    }
    if let Some(sn) = &s.sentinel {
        if sn.master_name.trim().is_empty() {
            return Err("sentinel master name is empty".into());
        }
        if sn.nodes.is_empty() {
            return Err("sentinel nodes is empty: name at least one sentinel".into());
        }
        for (i, n) in sn.nodes.iter().enumerate() {
            validate_url(n).map_err(|e| format!("sentinel node {} {e}", i + 1))?;
        }
    }
    validate_keys(&s.encryption_keys)?;
    if s.timeout.is_zero() {
        return Err("timeout is zero".into());
    }
    Ok(())
}

/// Check a Redis URL (`redis://` or `rediss://`). The message never echoes the URL (it
/// may hold a password).
pub fn validate_url(url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("is not a URL ({e})"))?;
    match parsed.scheme() {
        "redis" | "rediss" | "valkey" | "valkeys" => {}
        other => return Err(format!("has scheme `{other}`; use redis:// or rediss:// (TLS)")),
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("names no host".into());
    }
    url.into_connection_info()
        .map(|_| ())
        .map_err(|_| "is not a Redis URL (redis://[user:password@]host:port/db)".into())
}

/// A URL with its password replaced, for logs and `describe`.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some(crate::secret::REDACTED));
            }
            u.to_string()
        }
        Err(_) => "<unparsable url>".into(),
    }
}

/// The tollgate Redis store. Cheap to clone (all clones share connections and the
/// message stream).
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    link: Arc<Link>,
    sealer: Sealer,
    prefix: String,
    channel: String,
    lease_ttl: Duration,
    timeout: Duration,
    target: String,
    events: broadcast::Sender<FleetMessage>,
    healthy: Arc<AtomicBool>,
    /// The message-stream task, started in the first tokio context we see (connect may
    /// run outside one); aborted when the last clone is dropped.
    subscriber: Mutex<Option<AbortOnDrop>>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The connection to the node that takes writes: a direct address, or the master that
/// the sentinels name now. A [`ConnectionManager`] reconnects by itself after a dropped
/// connection; we replace it after a timeout (a silently dead connection it would not
/// notice) and, with Sentinel, after anything that may mean a failover.
struct Link {
    target: Target,
    config: ConnectionManagerConfig,
    current: Mutex<Option<(u64, ConnectionManager)>>,
    generation: AtomicU64,
    /// One lookup at a time; the others wait and use its result.
    connecting: tokio::sync::Mutex<()>,
}

enum Target {
    Direct(Box<Client>),
    Sentinel(Box<SentinelTarget>),
}

struct SentinelTarget {
    sentinel: tokio::sync::Mutex<Sentinel>,
    master: String,
    node: SentinelNodeConnectionInfo,
    /// The sentinels again, for the message task's check of where the master is.
    watch: Vec<Client>,
    watch_conn: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
}

impl Link {
    fn current(&self) -> Option<(u64, ConnectionManager)> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A client for the node that takes writes now.
    async fn client(&self) -> Result<Client, RedisError> {
        match &self.target {
            Target::Direct(client) => Ok((**client).clone()),
            Target::Sentinel(t) => {
                let SentinelTarget { sentinel, master, node, .. } = &**t;
                let client = sentinel.lock().await.async_master_for(master, Some(node)).await?;
                debug!(master = %addr_text(client.get_connection_info().addr()), "redis store: sentinels name the master");
                Ok(client)
            }
        }
    }

    /// With Sentinel: the master's address as the first sentinel that answers names it
    /// now. After a failover the old master takes writes until the sentinels demote it
    /// (seconds later), so a connection to it must be dropped as soon as they switch.
    async fn named_master(&self) -> Option<(String, u16)> {
        let Target::Sentinel(t) = &self.target else {
            return None;
        };
        let SentinelTarget { master, watch, watch_conn, .. } = &**t;
        let mut cached = watch_conn.lock().await;
        for attempt in 0..=watch.len() {
            let conn = match cached.as_mut() {
                Some(c) => c,
                None => {
                    let client = watch.get(attempt.min(watch.len().saturating_sub(1)))?;
                    match client.get_multiplexed_async_connection().await {
                        Ok(c) => cached.insert(c),
                        Err(_) => continue,
                    }
                }
            };
            let named: Result<Option<(String, u16)>, _> =
                redis::cmd("SENTINEL").arg("GET-MASTER-ADDR-BY-NAME").arg(master).query_async(conn).await;
            match named {
                Ok(addr) => return addr,
                Err(_) => *cached = None,
            }
        }
        None
    }

    async fn conn(&self) -> Result<(u64, ConnectionManager), RedisError> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let client = self.client().await?;
        let manager = ConnectionManager::new_lazy_with_config(client, self.config.clone())?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some((generation, manager.clone()));
        Ok((generation, manager))
    }

    /// Drop connection `generation` (if still current): the next operation connects anew
    /// (and, with Sentinel, asks for the master again).
    fn reset(&self, generation: Option<u64>) {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if generation.is_none() || cur.as_ref().map(|c| c.0) == generation {
            *cur = None;
        }
    }

    /// Whether `e` may mean the connection is dead or points at a node that no longer
    /// takes writes.
    fn must_reset(&self, e: &RedisError) -> bool {
        e.is_io_error()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_timeout()
            || e.is_unrecoverable_error()
            || matches!(
                e.kind(),
                ErrorKind::Server(ServerErrorKind::ReadOnly)
                    | ErrorKind::Server(ServerErrorKind::MasterDown)
                    | ErrorKind::Server(ServerErrorKind::BusyLoading)
                    | ErrorKind::MasterNameNotFoundBySentinel
                    | ErrorKind::AuthenticationFailed
            )
    }
}

fn addr_text(addr: &ConnectionAddr) -> String {
    match addr {
        ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
        ConnectionAddr::TcpTls { host, port, .. } => format!("{host}:{port} (TLS)"),
        ConnectionAddr::Unix(path) => path.display().to_string(),
        #[allow(unreachable_patterns)]
        _ => "?".into(),
    }
}

fn host_port(addr: &ConnectionAddr) -> Option<(String, u16)> {
    match addr {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => Some((host.clone(), *port)),
        _ => None,
    }
}

/// An error's class and code: never its detail, which could quote a value.
fn error_reason(e: &RedisError) -> String {
    match e.kind() {
        ErrorKind::Io => {
            if e.is_connection_refusal() {
                "connection refused".into()
            } else if e.is_timeout() {
                "timed out".into()
            } else if e.is_connection_dropped() {
                "connection lost".into()
            } else {
                "I/O error".into()
            }
        }
        ErrorKind::AuthenticationFailed => "authentication failed (check the username and password)".into(),
        ErrorKind::Server(ServerErrorKind::ReadOnly) => "READONLY: the node is a replica (failover?)".into(),
        ErrorKind::Server(ServerErrorKind::NoPerm) => "NOPERM: the user lacks a permission the store needs".into(),
        ErrorKind::Server(k) => format!("server error {}", e.code().unwrap_or(&format!("{k:?}"))),
        ErrorKind::MasterNameNotFoundBySentinel => "no sentinel names a reachable master".into(),
        k => format!("{k:?}"),
    }
}

/// A message as published on the channel (built by the scripts, parsed here).
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Wire {
    Written { key: String, version: Version },
    Invalidated { key: String, version: Version },
    Pending { key: String },
}

impl From<Wire> for FleetMessage {
    fn from(w: Wire) -> Self {
        match w {
            Wire::Written { key, version } => FleetMessage::Written { key, version },
            Wire::Invalidated { key, version } => FleetMessage::Invalidated { key, version },
            Wire::Pending { key } => FleetMessage::Pending { key },
        }
    }
}

/// Shared by the writing scripts: bump the version counter (seeding it from Redis'
/// clock when missing), replace the entry, set its TTL, publish `written`.
/// Versions stay strings: Lua numbers are doubles and print in exponent form.
const WRITE_LUA: &str = r#"
local function write(entry, ver, sealed, ttl, channel, keyjson)
  if redis.call('EXISTS', ver) == 1 then
    redis.call('INCR', ver)
  else
    local t = redis.call('TIME')
    redis.call('SET', ver, t[1] .. string.sub('000000' .. t[2], -6))
  end
  local v = redis.call('GET', ver)
  redis.call('DEL', entry)
  redis.call('HSET', entry, 'v', v, 's', sealed)
  if ttl ~= '0' then redis.call('PEXPIRE', entry, ttl) end
  redis.call('PUBLISH', channel, '{"kind":"written","key":' .. keyjson .. ',"version":' .. v .. '}')
  return v
end
"#;

/// CAS save. KEYS: entry, ver. ARGV: expected, sealed, ttl ms (0: none), channel, key as JSON.
/// Returns {'1', version} or {'0', current version ('0': absent), current sealed record}.
const SAVE_LUA: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'v') or '0'
if cur ~= ARGV[1] then
  return {'0', cur, redis.call('HGET', KEYS[1], 's')}
end
return {'1', write(KEYS[1], KEYS[2], ARGV[2], ARGV[3], ARGV[4], ARGV[5])}
"#;

/// Fenced write. KEYS: lease, entry, ver. ARGV: fence, sealed, ttl ms, channel, key JSON.
/// Returns the new version, or false when the lease is not held with this fence.
const SAVE_FENCED_LUA: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return false end
return write(KEYS[2], KEYS[3], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
"#;

/// Compare-and-delete of an entry. KEYS: entry. ARGV: version, channel, key JSON,
/// 'always' or 'deleted' (when to publish `invalidated`). Returns 1 if deleted.
const REMOVE_LUA: &str = r#"
local deleted = 0
if ARGV[1] ~= '0' and redis.call('HGET', KEYS[1], 'v') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  deleted = 1
end
if deleted == 1 or ARGV[4] == 'always' then
  redis.call('PUBLISH', ARGV[2], '{"kind":"invalidated","key":' .. ARGV[3] .. ',"version":' .. ARGV[1] .. '}')
end
return deleted
"#;

/// KEYS: lease. ARGV: fence, ttl ms. Returns 1 if renewed.
const RENEW_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// KEYS: lease. ARGV: fence. Returns 1 if released.
const RELEASE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// KEYS: pending. ARGV: sealed, ttl ms, channel, key JSON.
const PENDING_LUA: &str = r#"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[3], '{"kind":"pending","key":' .. ARGV[4] .. '}')
return 1
"#;

struct Scripts {
    save: redis::Script,
    save_fenced: redis::Script,
    remove: redis::Script,
    renew: redis::Script,
    release: redis::Script,
    pending: redis::Script,
}

static SCRIPTS: std::sync::LazyLock<Scripts> = std::sync::LazyLock::new(|| Scripts {
    save: redis::Script::new(&format!("{WRITE_LUA}{SAVE_LUA}")),
    save_fenced: redis::Script::new(&format!("{WRITE_LUA}{SAVE_FENCED_LUA}")),
    remove: redis::Script::new(REMOVE_LUA),
    renew: redis::Script::new(RENEW_LUA),
    release: redis::Script::new(RELEASE_LUA),
    pending: redis::Script::new(PENDING_LUA),
});

/// The `operation` label values of the Redis metrics.
pub const OPERATIONS: [&str; 12] = [
    "load",
    "save",
    "remove",
    "try_lease",
    "renew",
    "release",
    "save_fenced",
    "invalidate",
    "save_pending",
    "load_pending",
    "clear_pending",
    "ping",
];

/// How long Redis keeps an entry, in ms (0: no TTL).
///
/// A token without a refresh token is useless once expired: it lives as long as it is
/// usable. No TTL when it never expires, or when it holds a refresh token: the refresh
/// token outlives the access token, and it is what lets any replica (or a fleet started
/// tomorrow) renew without asking a human again; with rotating refresh tokens the entry
/// holds the only unspent one, so Redis dropping it would end the session.
fn entry_ttl_ms(token: &StoredToken, now: u64) -> u64 {
    if token.vars.contains_key("refresh_token") {
        return 0;
    }
    match token.expires_at {
        None => 0,
        // An already expired token still gets a moment, never "no TTL".
        Some(exp) => exp.saturating_sub(now).max(1).saturating_mul(1000),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisStore {
    /// Set up the store. Does not contact Redis: connections are made on first use, so
    /// tollgate starts (and fetches tokens on its own) while Redis is down. Fails only on
    /// settings that cannot work (see [`validate`]).
    ///
    /// Operations must run on one tokio runtime (the connections' tasks live there); the
    /// message stream starts on the runtime `connect` is called in, or else on the first
    /// operation's or `subscribe`'s.
    pub fn connect(settings: RedisSettings) -> Result<RedisStore, StoreError> {
        validate(&settings).map_err(StoreError::RedisConfig)?;
        if settings.lease_ttl <= settings.timeout {
            warn!(
                lease_ttl_ms = settings.lease_ttl.as_millis() as u64,
                timeout_ms = settings.timeout.as_millis() as u64,
                "redis store: lease_ttl is not longer than timeout; a slow renewal may let a lease expire mid-fetch"
            );
        }
        let sealer = Sealer::new(&settings.encryption_keys).map_err(StoreError::RedisConfig)?;
        let bad_url = |what: &str| StoreError::RedisConfig(format!("{what} is not a usable Redis URL"));
        let info: ConnectionInfo = settings.url.as_str().into_connection_info().map_err(|_| bad_url("url"))?;
        let mut redis_info = info.redis_settings().clone();
        if let Some(user) = &settings.username {
            redis_info = redis_info.set_username(user);
        }
        if let Some(password) = &settings.password {
            redis_info = redis_info.set_password(password.expose());
        }
        let db = redis_info.db();
        let (target, describe) = match &settings.sentinel {
            None => {
                let describe = format!("redis {} db {db}", addr_text(info.addr()));
                let client = Client::open(info.set_redis_settings(redis_info)).map_err(|_| bad_url("url"))?;
                (Target::Direct(Box::new(client)), describe)
            }
            Some(s) => {
                let mut nodes = Vec::with_capacity(s.nodes.len());
                for (i, n) in s.nodes.iter().enumerate() {
                    let node =
                        n.as_str().into_connection_info().map_err(|_| bad_url(&format!("sentinel node {}", i + 1)))?;
                    nodes.push(node);
                }
                let shown: Vec<String> = nodes.iter().map(|n| addr_text(n.addr())).collect();
                let describe = format!("redis sentinel master `{}` via {} db {db}", s.master_name, shown.join(", "));
                let watch = nodes.iter().map(|n| Client::open(n.clone())).collect::<Result<Vec<_>, _>>();
                let watch = watch.map_err(|_| bad_url("sentinel.nodes"))?;
                let sentinel = Sentinel::build(nodes).map_err(|_| bad_url("sentinel.nodes"))?;
                let mut node = SentinelNodeConnectionInfo::default().set_redis_connection_info(redis_info);
                if let ConnectionAddr::TcpTls { insecure, .. } = info.addr() {
                    node = node.set_tls_mode(if *insecure { redis::TlsMode::Insecure } else { redis::TlsMode::Secure });
                }
                let target = Target::Sentinel(Box::new(SentinelTarget {
                    sentinel: tokio::sync::Mutex::new(sentinel),
                    master: s.master_name.clone(),
                    node,
                    watch,
                    watch_conn: tokio::sync::Mutex::new(None),
                }));
                (target, describe)
            }
        };
        let describe = format!("{describe}, prefix `{}`, key ids {}", settings.key_prefix, sealer.key_ids().join(","));
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(settings.timeout);
        let link = Arc::new(Link {
            target,
            config,
            current: Mutex::new(None),
            generation: AtomicU64::new(0),
            connecting: tokio::sync::Mutex::new(()),
        });
        let m = crate::metrics::get();
        for op in OPERATIONS {
            m.redis_errors_total.with_label_values(&[op]);
        }
        let (events, _) = broadcast::channel(EVENTS_CAPACITY);
        let store = RedisStore {
            inner: Arc::new(Inner {
                link,
                sealer,
                channel: format!("{}events", settings.key_prefix),
                prefix: settings.key_prefix,
                lease_ttl: settings.lease_ttl,
                timeout: settings.timeout,
                target: describe,
                events,
                healthy: Arc::new(AtomicBool::new(false)),
                subscriber: Mutex::new(None),
            }),
        };
        store.ensure_subscriber();
        Ok(store)
    }

    /// The configured lease TTL (what the driver passes to `try_lease` and renews within).
    /// Delete the entry if it still holds `version`; announce `Invalidated` when it did
    /// (`announce = "deleted"`) or in any case (`"always"`).
    async fn remove_at(
        &self,
        operation: &'static str,
        key: &str,
        version: Version,
        announce: &'static str,
    ) -> Result<bool, StoreError> {
        let (entry, channel, key_json) = (self.key("token", key), self.inner.channel.clone(), Self::key_json(key));
        let deleted: i64 = self
            .run(operation, |mut c| async move {
                SCRIPTS
                    .remove
                    .key(entry)
                    .arg(version.to_string())
                    .arg(channel)
                    .arg(key_json)
                    .arg(announce)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(deleted == 1)
    }

    pub fn lease_ttl(&self) -> Duration {
        self.inner.lease_ttl
    }

    /// The configured per-operation timeout.
    pub fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// One round trip (PING), for `tollgate check` and the admin API.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.run("ping", |mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await
            .map(|_| ())
    }

    fn key(&self, kind: &str, key: &str) -> String {
        format!("{}{kind}:{key}", self.inner.prefix)
    }

    fn aad(&self, kind: &str, key: &str) -> Vec<u8> {
        seal::associated_data(kind, &self.inner.prefix, key)
    }

    fn key_json(key: &str) -> String {
        serde_json::to_string(key).unwrap_or_else(|_| "\"\"".into())
    }

    fn seal_json<T: Serialize>(&self, kind: &str, key: &str, value: &T) -> Result<String, StoreError> {
        // Serializing maps of strings does not fail; the error carries no value anyway.
        let plain = Zeroizing::new(serde_json::to_vec(value).map_err(|_| StoreError::Redis {
            target: self.inner.target.clone(),
            operation: "seal",
            reason: "cannot serialize the record".into(),
        })?);
        Ok(self.inner.sealer.seal(&self.aad(kind, key), &plain))
    }

    /// Open a record; an unreadable one is logged (what is wrong, never its contents) and
    /// reported as absent.
    fn open_json<T: serde::de::DeserializeOwned>(&self, kind: &str, key: &str, record: &[u8]) -> Option<T> {
        match self.inner.sealer.open(&self.aad(kind, key), record) {
            Ok(plain) => match serde_json::from_slice(&plain) {
                Ok(v) => Some(v),
                Err(_) => {
                    warn!(
                        key,
                        kind, "redis store: a sealed record opened but is not what tollgate writes; treated as absent"
                    );
                    None
                }
            },
            Err(e) => {
                warn!(key, kind, reason = %e, "redis store: a record does not open; treated as absent");
                None
            }
        }
    }

    /// Start the message-stream task if it is not running and we are in a tokio context.
    fn ensure_subscriber(&self) {
        let mut slot = self.inner.subscriber.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let task = events_task(
            Arc::clone(&self.inner.link),
            self.inner.channel.clone(),
            self.inner.events.clone(),
            Arc::clone(&self.inner.healthy),
            self.inner.timeout,
        );
        *slot = Some(AbortOnDrop(handle.spawn(task)));
    }

    fn set_healthy(&self, ok: bool, operation: &str) {
        let was = self.inner.healthy.swap(ok, Ordering::Relaxed);
        if was && !ok {
            warn!(store = %self.inner.target, operation, "redis store unreachable or failing; replicas fall back to fetching on their own");
        } else if !was && ok {
            info!(store = %self.inner.target, "redis store reachable");
        }
    }

    /// Run one operation against the write node, bounded by `timeout` (connecting
    /// included), timed and counted.
    async fn run<T, F, Fut>(&self, operation: &'static str, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut + Send,
        Fut: Future<Output = Result<T, RedisError>> + Send,
        T: Send,
    {
        self.ensure_subscriber();
        let link = &self.inner.link;
        let started = Instant::now();
        let outcome = tokio::time::timeout(self.inner.timeout, async {
            let (generation, conn) = link.conn().await.map_err(|e| (None, e))?;
            f(conn).await.map_err(|e| (Some(generation), e))
        })
        .await;
        let m = crate::metrics::get();
        m.redis_duration.with_label_values(&[operation]).observe(started.elapsed().as_secs_f64());
        match outcome {
            Ok(Ok(v)) => {
                self.set_healthy(true, operation);
                Ok(v)
            }
            Ok(Err((generation, e))) => {
                m.redis_errors_total.with_label_values(&[operation]).inc();
                let reason = error_reason(&e);
                debug!(store = %self.inner.target, operation, %reason, "redis store operation failed");
                if generation.is_none() || link.must_reset(&e) {
                    link.reset(generation);
                }
                self.set_healthy(false, operation);
                Err(StoreError::Redis { target: self.inner.target.clone(), operation, reason })
            }
            Err(_) => {
                m.redis_errors_total.with_label_values(&[operation]).inc();
                debug!(store = %self.inner.target, operation, "redis store operation timed out");
                // A connection that stopped answering may never error by itself.
                link.reset(None);
                self.set_healthy(false, operation);
                Err(StoreError::RedisTimeout {
                    target: self.inner.target.clone(),
                    operation,
                    ms: u64::try_from(self.inner.timeout.as_millis()).unwrap_or(u64::MAX),
                })
            }
        }
    }

    fn bad_reply(&self, operation: &'static str) -> StoreError {
        StoreError::Redis {
            target: self.inner.target.clone(),
            operation,
            reason: "unexpected reply (another program writes under this key prefix?)".into(),
        }
    }

    fn parse_version(&self, operation: &'static str, raw: &[u8]) -> Result<Version, StoreError> {
        std::str::from_utf8(raw).ok().and_then(|s| s.parse().ok()).ok_or_else(|| self.bad_reply(operation))
    }

    async fn save_once(
        &self,
        key: &str,
        sealed: &str,
        ttl: u64,
        expected: Version,
    ) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let (entry, ver, channel, key_json) =
            (self.key("token", key), self.key("ver", key), self.inner.channel.clone(), Self::key_json(key));
        self.run("save", |mut c| async move {
            SCRIPTS
                .save
                .key(entry)
                .key(ver)
                .arg(expected.to_string())
                .arg(sealed)
                .arg(ttl.to_string())
                .arg(channel)
                .arg(key_json)
                .invoke_async(&mut c)
                .await
        })
        .await
    }
}

#[async_trait::async_trait]
impl TokenStore for RedisStore {
    async fn load(&self, key: &str) -> Result<Option<Loaded>, StoreError> {
        let entry = self.key("token", key);
        let (version, record): (Option<Vec<u8>>, Option<Vec<u8>>) =
            self.run("load", |mut c| async move {
                redis::cmd("HMGET").arg(entry).arg("v").arg("s").query_async(&mut c).await
            })
            .await?;
        let (Some(version), Some(record)) = (version, record) else {
            return Ok(None);
        };
        let version = self.parse_version("load", &version)?;
        Ok(self.open_json::<StoredToken>("token", key, &record).map(|token| Loaded { token, version }))
    }

    /// Compare-and-swap as for the other stores; a write is announced as `Written`. An
    /// entry that does not open (unknown key, other identity) counts as absent: a save
    /// with `expected == 0` replaces it.
    async fn save(&self, key: &str, token: &StoredToken, expected: Version) -> Result<Saved, StoreError> {
        let sealed = self.seal_json("token", key, token)?;
        let ttl = entry_ttl_ms(token, super::unix_now());
        let mut expected = expected;
        // At most twice: once more only to replace an entry that does not open (which
        // `load` reported as absent, so the caller passed 0).
        for attempt in 0..2 {
            let reply = self.save_once(key, &sealed, ttl, expected).await?;
            let flag = reply.first().cloned().flatten();
            let version = reply.get(1).cloned().flatten().ok_or_else(|| self.bad_reply("save"))?;
            let version = self.parse_version("save", &version)?;
            if flag.as_deref() == Some(b"1") {
                return Ok(Saved::Written(version));
            }
            if version == 0 {
                return Ok(Saved::Conflict(None));
            }
            let record = reply.get(2).cloned().flatten();
            match record.and_then(|r| self.open_json::<StoredToken>("token", key, &r)) {
                Some(token) => return Ok(Saved::Conflict(Some(Loaded { token, version }))),
                None if expected == 0 && attempt == 0 => {
                    warn!(key, "redis store: replacing an entry that does not open");
                    expected = version;
                }
                None => return Ok(Saved::Conflict(None)),
            }
        }
        Ok(Saved::Conflict(None))
    }

    /// Like the other stores, plus: a removal is announced to the fleet as
    /// `Invalidated { key, expected }` (only when it deleted something).
    async fn remove(&self, key: &str, expected: Version) -> Result<bool, StoreError> {
        self.remove_at("remove", key, expected, "deleted").await
    }

    /// Nothing to do: entries expire by their TTL, and the keys in use elsewhere in the
    /// fleet are not known here.
    fn set_live(&self, _keys: BTreeSet<String>) {}

    fn describe(&self) -> String {
        self.inner.target.clone()
    }

    fn fleet(&self) -> Option<&dyn Fleet> {
        Some(self)
    }
}

#[async_trait::async_trait]
impl Fleet for RedisStore {
    async fn try_lease(&self, key: &str, ttl: Duration) -> Result<Option<Lease>, StoreError> {
        let fence = seal::random_hex(16);
        let (lease_key, value) = (self.key("lease", key), fence.clone());
        let set: Option<String> = self
            .run("try_lease", |mut c| async move {
                redis::cmd("SET")
                    .arg(lease_key)
                    .arg(value)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis(ttl))
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(set.map(|_| Lease { key: key.to_string(), fence }))
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<bool, StoreError> {
        let (lease_key, fence) = (self.key("lease", &lease.key), lease.fence.clone());
        let renewed: i64 = self
            .run("renew", |mut c| async move {
                SCRIPTS.renew.key(lease_key).arg(fence).arg(millis(ttl)).invoke_async(&mut c).await
            })
            .await?;
        Ok(renewed == 1)
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let (lease_key, fence) = (self.key("lease", &lease.key), lease.fence.clone());
        let _: i64 = self
            .run("release", |mut c| async move { SCRIPTS.release.key(lease_key).arg(fence).invoke_async(&mut c).await })
            .await?;
        Ok(())
    }

    async fn save_fenced(&self, key: &str, token: &StoredToken, lease: &Lease) -> Result<Option<Version>, StoreError> {
        if lease.key != key {
            // A lease guards one key; writing another through it would bypass the fence.
            return Ok(None);
        }
        let sealed = self.seal_json("token", key, token)?;
        let ttl = entry_ttl_ms(token, super::unix_now());
        let (lease_key, entry, ver, channel, key_json, fence) = (
            self.key("lease", key),
            self.key("token", key),
            self.key("ver", key),
            self.inner.channel.clone(),
            Self::key_json(key),
            lease.fence.clone(),
        );
        let written: Option<Vec<u8>> = self
            .run("save_fenced", |mut c| async move {
                SCRIPTS
                    .save_fenced
                    .key(lease_key)
                    .key(entry)
                    .key(ver)
                    .arg(fence)
                    .arg(sealed)
                    .arg(ttl.to_string())
                    .arg(channel)
                    .arg(key_json)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        written.map(|v| self.parse_version("save_fenced", &v)).transpose()
    }

    async fn invalidate(&self, key: &str, version: Version) -> Result<bool, StoreError> {
        self.remove_at("invalidate", key, version, "always").await
    }

    async fn save_pending(&self, key: &str, vars: &BTreeMap<String, String>, ttl: Duration) -> Result<(), StoreError> {
        let sealed = self.seal_json("pending", key, vars)?;
        let (pending, channel, key_json) = (self.key("pending", key), self.inner.channel.clone(), Self::key_json(key));
        let _: i64 = self
            .run("save_pending", |mut c| async move {
                SCRIPTS
                    .pending
                    .key(pending)
                    .arg(sealed)
                    .arg(millis(ttl))
                    .arg(channel)
                    .arg(key_json)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(())
    }

    async fn load_pending(&self, key: &str) -> Result<Option<BTreeMap<String, String>>, StoreError> {
        let pending = self.key("pending", key);
        let record: Option<Vec<u8>> = self
            .run("load_pending", |mut c| async move { redis::cmd("GET").arg(pending).query_async(&mut c).await })
            .await?;
        Ok(record.and_then(|r| self.open_json("pending", key, &r)))
    }

    async fn clear_pending(&self, key: &str) -> Result<(), StoreError> {
        let pending = self.key("pending", key);
        let _: i64 = self
            .run("clear_pending", |mut c| async move { redis::cmd("DEL").arg(pending).query_async(&mut c).await })
            .await?;
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<FleetMessage> {
        self.ensure_subscriber();
        self.inner.events.subscribe()
    }

    fn healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::Relaxed)
    }

    fn lease_ttl(&self) -> Duration {
        self.inner.lease_ttl
    }
}

/// The message stream: subscribe to the channel on the write node, forward messages,
/// check with a PING that the connection still answers, and after any loss subscribe
/// again (asking the sentinels for the master again) and emit `Reconnected`.
///
/// `Reconnected` is also emitted when the first subscription succeeds only after failed
/// attempts (Redis was down at start-up): the replica was on its own until then.
async fn events_task(
    link: Arc<Link>,
    channel: String,
    events: broadcast::Sender<FleetMessage>,
    healthy: Arc<AtomicBool>,
    timeout: Duration,
) {
    let mut apart = false;
    let mut retry = Duration::from_millis(100);
    loop {
        let subscribed = tokio::time::timeout(timeout, async {
            let client = link.client().await?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, RedisError>((pubsub, host_port(client.get_connection_info().addr())))
        })
        .await;
        let (pubsub, subscribed_to) = match subscribed {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                debug!(reason = %error_reason(&e), "redis store: message stream not (re)established");
                apart = true;
                healthy.store(false, Ordering::Relaxed);
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(EVENTS_RETRY_MAX);
                continue;
            }
            Err(_) => {
                debug!("redis store: message stream not (re)established in time");
                apart = true;
                healthy.store(false, Ordering::Relaxed);
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(EVENTS_RETRY_MAX);
                continue;
            }
        };
        retry = Duration::from_millis(100);
        if apart {
            // The command connection most likely died with this one (or points at a
            // demoted master): start the next operation on a fresh one.
            link.reset(None);
            healthy.store(true, Ordering::Relaxed);
            info!("redis store: message stream restored");
            let _ = events.send(FleetMessage::Reconnected);
        }
        let (mut sink, mut stream) = pubsub.split();
        let mut ping = tokio::time::interval(EVENTS_PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        loop {
            tokio::select! {
                msg = stream.next() => match msg {
                    Some(msg) => match serde_json::from_slice::<Wire>(msg.get_payload_bytes()) {
                        Ok(w) => {
                            let _ = events.send(w.into());
                        }
                        Err(_) => debug!("redis store: ignoring a message tollgate does not write"),
                    },
                    None => break,
                },
                _ = ping.tick() => {
                    let answered = tokio::time::timeout(timeout, sink.ping::<redis::Value>()).await;
                    if !matches!(answered, Ok(Ok(_))) {
                        break;
                    }
                    if let Ok(Some(named)) = tokio::time::timeout(timeout, link.named_master()).await {
                        if Some(&named) != subscribed_to.as_ref() {
                            info!(master = %format!("{}:{}", named.0, named.1), "redis store: the sentinels name a new master");
                            link.reset(None);
                            break;
                        }
                    }
                }
            }
        }
        warn!("redis store: message stream lost; resubscribing");
        healthy.store(false, Ordering::Relaxed);
        apart = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SentinelSettings;

    fn tok(expires_at: Option<u64>, refresh: bool) -> StoredToken {
        let mut vars = BTreeMap::new();
        if refresh {
            vars.insert("refresh_token".to_string(), "r".to_string());
        }
        StoredToken {
            fingerprint: "fp".into(),
            token: "t".into(),
            issued_at: 0,
            expires_at,
            scope: None,
            vars,
            extras: BTreeMap::new(),
        }
    }

    #[test]
    fn ttl_rule() {
        assert_eq!(entry_ttl_ms(&tok(Some(1_100), false), 1_000), 100_000);
        assert_eq!(entry_ttl_ms(&tok(Some(900), false), 1_000), 1_000, "expired: a moment, never none");
        assert_eq!(entry_ttl_ms(&tok(Some(1_100), true), 1_000), 0, "refresh token: no TTL");
        assert_eq!(entry_ttl_ms(&tok(None, false), 1_000), 0, "never expires: no TTL");
    }

    fn key() -> Secret {
        Secret::new("q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=")
    }

    #[test]
    fn settings_validation_and_redaction() {
        let ok = settings("redis://127.0.0.1:6379/2", vec![key()]);
        assert_eq!(validate(&ok), Ok(()));
        assert!(!redact_url("rediss://u:hunter2@h:1/0").contains("hunter2"));
        let mut bad = ok.clone();
        bad.url = "http://u:hunter2@host".into();
        let e = validate(&bad).unwrap_err();
        assert!(e.contains("scheme") && !e.contains("hunter2"), "{e}");
        let mut bad = ok.clone();
        bad.key_prefix = "a b".into();
        assert!(validate(&bad).unwrap_err().contains("key_prefix"));
        let mut bad = ok.clone();
        bad.encryption_keys = vec![Secret::new("short")];
        let e = validate(&bad).unwrap_err();
        assert!(e.contains("encryption key 1") && !e.contains("short"), "{e}");
        let mut bad = ok.clone();
        bad.timeout = Duration::ZERO;
        assert!(validate(&bad).unwrap_err().contains("timeout"));
        let mut bad = ok;
        bad.sentinel = Some(SentinelSettings { master_name: "m".into(), nodes: vec![] });
        assert!(validate(&bad).unwrap_err().contains("sentinel nodes"));
    }

    #[test]
    fn connect_does_not_need_redis_or_a_runtime() {
        // Port 1 on loopback: nothing listens; connect must not care.
        let store = RedisStore::connect(settings("redis://127.0.0.1:1/0", vec![key()])).unwrap();
        assert!(store.describe().contains("127.0.0.1:1"));
        assert!(!store.healthy());
    }
}
