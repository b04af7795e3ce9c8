//! Fleet token-request count (bench/fleet.sh, part 1): how many token requests a fleet
//! of N tollgate replicas makes per refresh cycle, with the Redis store and, for
//! contrast, the memory store.
//!
//! For every store and every N it starts, on loopback and on free ports: a
//! `redis-server` (no persistence; Redis runs only), the token-endpoint double of
//! `tollgate-testkit` issuing tokens that live `--lifetime` seconds, the upstream double
//! (which accepts only unexpired tokens of that endpoint), and N `tollgate run`
//! processes with identical configs except the ports. Every replica gets light client
//! traffic from the cold start on, for `--lifetimes` token lifetimes and then until the
//! next refresh cycle is over (the token endpoint got a request and then none for half a
//! `--cycle-gap`; at most one more lifetime), so the run ends between two cycles. Then it reads every replica's metrics,
//! stops everything and records what the token endpoint saw.
//!
//! A refresh cycle is one token generation as a replica sees it: the tokens it put in
//! use (`tollgate_token_source_total`, every source), median over the replicas. The
//! token requests are also grouped by time (a gap longer than `--cycle-gap` starts a new
//! group), which gives the most requests any one cycle cost.
//!
//! Usage (bench/fleet.sh runs it):
//!   cargo run --example fleet_count -- --tollgate target/release/tollgate --out fleet.json
//!
//! Bounded: every run lasts at most `(--lifetimes + 1) × --lifetime` seconds after
//! start-up (at most 30 s) and every wait has a deadline; processes are killed on drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{json, Value};
use tollgate_testkit::idp::{Idp, IdpConfig};
use tollgate_testkit::upstream::Upstream;
use tollgate_testkit::Ledger;

/// A 32-byte store key, base64 (benchmark value only, never a real secret).
const STORE_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
/// How long a process may take to answer after it was started.
const START_LIMIT: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(about = "Token requests per refresh cycle for a fleet of tollgate replicas")]
struct Args {
    /// The tollgate binary.
    #[arg(long, default_value = "target/release/tollgate")]
    tollgate: PathBuf,
    /// Fleet sizes, comma-separated.
    #[arg(long, default_value = "1,2,4,8,16", value_delimiter = ',')]
    replicas: Vec<usize>,
    /// Stores, comma-separated: redis, memory.
    #[arg(long, default_value = "redis,memory", value_delimiter = ',')]
    stores: Vec<String>,
    /// Lifetime of the issued tokens, seconds.
    #[arg(long, default_value_t = 4.0)]
    lifetime: f64,
    /// How many token lifetimes each run lasts (from the cold start).
    #[arg(long, default_value_t = 5)]
    lifetimes: u32,
    /// The provider's `refresh_before`, seconds.
    #[arg(long, default_value_t = 1.0)]
    refresh_before: f64,
    /// The provider's `expiry_margin`, seconds.
    #[arg(long, default_value_t = 0.2)]
    expiry_margin: f64,
    /// Client requests per second on each replica.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Token requests further apart than this (seconds) belong to different cycles.
    /// Default: a quarter of the lifetime.
    #[arg(long)]
    cycle_gap: Option<f64>,
    /// `redis-server` binary.
    #[arg(long, default_value = "redis-server")]
    redis_server: String,
    /// Write the JSON here (else stdout).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Before each run, wait at most this long (s) for other processes to go quiet.
    #[arg(long, default_value_t = 60.0)]
    quiet_wait: f64,
    /// Keep the work directory (configs and replica logs) and print its path.
    #[arg(long)]
    keep_work: bool,
}

fn log(msg: &str) {
    eprintln!("[fleet_count {:>8.1}s] {msg}", started().elapsed().as_secs_f64());
}

fn started() -> Instant {
    static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *T0.get_or_init(Instant::now)
}

/// A loopback port that was free a moment ago.
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `n` distinct loopback ports that were free a moment ago (all held until all are picked).
fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let held = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<std::io::Result<Vec<_>>>()?;
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// A child process killed (SIGKILL) and reaped on drop, so nothing outlives a run.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn exited(&mut self) -> Option<String> {
        match self.0.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            _ => None,
        }
    }
}

fn log_file(dir: &Path, name: &str) -> Result<(Stdio, Stdio), String> {
    let f = std::fs::File::create(dir.join(format!("{name}.log"))).map_err(|e| format!("log file: {e}"))?;
    let g = f.try_clone().map_err(|e| format!("log file: {e}"))?;
    Ok((Stdio::from(f), Stdio::from(g)))
}

/// A `redis-server` on a free loopback port, without persistence, answering PING.
fn start_redis(bin: &str, dir: &Path) -> Result<(Proc, u16), String> {
    let port = free_port().map_err(|e| e.to_string())?;
    let (out, err) = log_file(dir, "redis")?;
    let child = Command::new(bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {bin}: {e}"))?;
    let mut p = Proc(child);
    let deadline = Instant::now() + START_LIMIT;
    while Instant::now() < deadline {
        if ping(port).is_some_and(|r| r.starts_with("+PONG")) {
            return Ok((p, port));
        }
        if let Some(st) = p.exited() {
            return Err(format!("redis-server exited ({st})"));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Err("redis-server did not answer PING".into())
}

fn ping(port: u16) -> Option<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
    s.write_all(b"*1\r\n$4\r\nPING\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// The config every replica of a run gets; only the ports differ between replicas.
fn config(a: &Args, idp: &Idp, upstream: &Upstream, redis: Option<u16>, proxy: u16, admin: u16) -> String {
    let store = match redis {
        Some(port) => {
            format!("kind = \"redis\"\nurl = \"redis://127.0.0.1:{port}/0\"\nencryption_keys = [\"{STORE_KEY}\"]\n")
        }
        None => "kind = \"memory\"\n".into(),
    };
    format!(
        r#"[proxy]
listen = "127.0.0.1:{proxy}"
threads = 1
access_log = false
token_wait = "5s"

[admin]
listen = "127.0.0.1:{admin}"

[providers.bench]
kind = "oauth2"
token_url = "{token_url}"
client_id = "abc123"
client_secret = "456789"
refresh_before = "{rb}ms"
expiry_margin = "{em}ms"
timeout = "1s"
backoff_min = "100ms"
backoff_max = "1s"

[[routes]]
name = "all"
path_prefix = "/"
upstream = "{upstream}"
provider = "bench"

[store]
{store}"#,
        token_url = idp.url(),
        upstream = upstream.url(),
        rb = (a.refresh_before * 1000.0).round() as u64,
        em = (a.expiry_margin * 1000.0).round() as u64,
    )
}

struct Replica {
    proc: Proc,
    proxy: u16,
    admin: u16,
    log: PathBuf,
}

impl Replica {
    /// The end of what the replica printed, for an error message.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

fn http() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| format!("http client: {e}"))
}

/// Wait until the replica's admin listener answers `/healthz` and its proxy port accepts.
/// The error says whether the process exited because a port was already in use.
async fn wait_healthy(r: &mut Replica, c: &reqwest::Client, deadline: Instant) -> Result<(), (bool, String)> {
    loop {
        let healthy = matches!(c.get(format!("http://127.0.0.1:{}/healthz", r.admin)).send().await,
            Ok(resp) if resp.status() == 200);
        if healthy && tokio::net::TcpStream::connect(("127.0.0.1", r.proxy)).await.is_ok() {
            return Ok(());
        }
        if let Some(st) = r.proc.exited() {
            let tail = r.log_tail();
            return Err((
                tail.contains("Address already in use"),
                format!("tollgate on :{} exited ({st}):\n{tail}", r.proxy),
            ));
        }
        if Instant::now() >= deadline {
            return Err((false, format!("tollgate on :{} did not start in time:\n{}", r.proxy, r.log_tail())));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Write replica `i`'s config and start it.
fn spawn_replica(a: &Args, dir: &Path, i: usize, cfg: &str, proxy: u16, admin: u16) -> Result<Replica, String> {
    let path = dir.join(format!("tollgate-{i}.toml"));
    std::fs::write(&path, cfg).map_err(|e| format!("write config: {e}"))?;
    let (out, err) = log_file(dir, &format!("tollgate-{i}"))?;
    let child = Command::new(&a.tollgate)
        .arg("run")
        .arg("--config")
        .arg(&path)
        .env("TOLLGATE_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", a.tollgate.display()))?;
    Ok(Replica { proc: Proc(child), proxy, admin, log: dir.join(format!("tollgate-{i}.log")) })
}

/// Machine-wide CPU ticks from /proc/stat: (busy without niced work, total).
fn machine_ticks() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = text
        .lines()
        .next()
        .map(|l| l.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default();
    if v.len() < 5 {
        return (0, 0);
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v[4];
    (total - idle - v[1], total)
}

/// utime + stime of one process, in the same ticks as /proc/stat.
fn process_ticks(pid: u32) -> u64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    let Some(rest) = text.rfind(')').map(|i| &text[i + 2..]) else { return 0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// Wait (at most `limit`) until other processes' un-niced work uses less than 0.3 of a
/// core for 3 s in a row: this machine is shared, and a busy box delays Redis round trips.
async fn wait_quiet(limit: Duration) -> f64 {
    let start = Instant::now();
    let mut quiet = 0;
    let mut prev = machine_ticks();
    while start.elapsed() < limit {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let cur = machine_ticks();
        let busy_cores = (cur.0 - prev.0) as f64 / ((cur.1 - prev.1).max(1) as f64 / num_cores());
        prev = cur;
        quiet = if busy_cores < 0.3 { quiet + 1 } else { 0 };
        if quiet >= 3 {
            break;
        }
    }
    start.elapsed().as_secs_f64()
}

fn num_cores() -> f64 {
    std::thread::available_parallelism().map(|n| n.get() as f64).unwrap_or(1.0)
}

/// Sum of every series of `name` whose labels contain `label` (or all, when empty).
fn metric_sum(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            let labels_ok = (rest.is_empty() || rest.starts_with('{')) && (label.is_empty() || rest.contains(label));
            labels_ok.then(|| value.trim().parse::<f64>().ok()).flatten()
        })
        .sum()
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Group sorted times: a gap longer than `gap` starts a new group; the group sizes.
fn groups(times: &[f64], gap: f64) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    let mut last: Option<f64> = None;
    for &t in times {
        match (last, out.last_mut()) {
            (Some(l), Some(n)) if t - l <= gap => *n += 1,
            _ => out.push(1),
        }
        last = Some(t);
    }
    out
}

async fn one_run(a: &Args, store: &str, n: usize, work: &Path) -> Result<Value, String> {
    let dir = work.join(format!("{store}-{n}"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("work dir: {e}"))?;
    let redis = match store {
        // A port picked free may be taken before redis-server binds it: a few attempts.
        "redis" => Some(match start_redis(&a.redis_server, &dir) {
            Ok(r) => r,
            Err(_) => match start_redis(&a.redis_server, &dir) {
                Ok(r) => r,
                Err(_) => start_redis(&a.redis_server, &dir)?,
            },
        }),
        "memory" => None,
        other => return Err(format!("unknown store {other:?} (redis or memory)")),
    };
    let ledger = Ledger::default();
    let lifetime = Duration::from_secs_f64(a.lifetime);
    let idp = Idp::start(IdpConfig { lifetime, refresh_tokens: false, ..IdpConfig::default() }, ledger.clone())
        .await
        .map_err(|e| format!("token-endpoint double: {e}"))?;
    let upstream = Upstream::start(Some(ledger)).await.map_err(|e| format!("upstream double: {e}"))?;

    let waited_s = wait_quiet(Duration::from_secs_f64(a.quiet_wait)).await;
    let machine0 = machine_ticks();
    let self0 = process_ticks(std::process::id());
    // Cold start: every replica at once, then traffic on all of them at once.
    let t0 = Instant::now();
    let redis_port = redis.as_ref().map(|r| r.1);
    let ports = free_ports(2 * n).map_err(|e| format!("free ports: {e}"))?;
    let mut fleet = Vec::with_capacity(n);
    for (i, pair) in ports.chunks(2).enumerate() {
        let cfg = config(a, &idp, &upstream, redis_port, pair[0], pair[1]);
        fleet.push(spawn_replica(a, &dir, i, &cfg, pair[0], pair[1])?);
    }
    let c = http()?;
    let deadline = Instant::now() + START_LIMIT;
    // A port picked free can be taken by someone else's connection before the replica
    // binds it: such a replica is started again on other ports (a few times at most).
    let mut restarted = 0;
    for (i, r) in fleet.iter_mut().enumerate() {
        let mut attempts = 0;
        loop {
            match wait_healthy(r, &c, deadline).await {
                Ok(()) => break,
                Err((true, _)) if attempts < 3 => {
                    attempts += 1;
                    restarted += 1;
                    let p = free_ports(2).map_err(|e| format!("free ports: {e}"))?;
                    log(&format!("  replica {i}: a port was taken meanwhile; starting it again on other ports"));
                    let cfg = config(a, &idp, &upstream, redis_port, p[0], p[1]);
                    *r = spawn_replica(a, &dir, i, &cfg, p[0], p[1])?;
                }
                Err((_, e)) => return Err(e),
            }
        }
    }
    let healthy_s = t0.elapsed().as_secs_f64();
    let gap = a.cycle_gap.unwrap_or(a.lifetime / 4.0);
    let stop = Arc::new(AtomicBool::new(false));
    // Traffic runs until the run ends, and never longer than one more lifetime.
    let hard_end = t0 + lifetime * (a.lifetimes + 1);
    let ok = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let pause = Duration::from_secs_f64(1.0 / a.rate.max(0.1));
    let mut load = Vec::new();
    for r in &fleet {
        let (url, c, ok, bad) = (format!("http://127.0.0.1:{}/load", r.proxy), c.clone(), ok.clone(), bad.clone());
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(pause);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) && Instant::now() < hard_end {
                tick.tick().await;
                match c.get(&url).send().await {
                    Ok(resp) if resp.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => bad.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    // End right after a refresh cycle, so that every replica has seen the same cycles
    // when it is asked and the next cycle is far off: after the nominal length, wait for
    // the next token request, then until the token endpoint has been quiet for half a
    // cycle gap (never past one more lifetime).
    tokio::time::sleep_until((t0 + lifetime * a.lifetimes).into()).await;
    let nominal = idp.count();
    let quiet = Duration::from_secs_f64(gap / 2.0);
    while Instant::now() < hard_end {
        let last = idp.seen().iter().map(|s| s.at).max();
        if idp.count() > nominal && last.is_some_and(|l| l.elapsed() >= quiet) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let ran_s = t0.elapsed().as_secs_f64();
    let seen_at_end = idp.count();
    for task in load {
        let _ = task.await;
    }

    // What each replica says about itself, before anything is stopped.
    let mut per_replica = Vec::new();
    let mut totals = serde_json::Map::new();
    let series: [(&str, &str, &str); 9] = [
        ("fetched", "tollgate_token_source_total", "source=\"fetched\""),
        ("shared", "tollgate_token_source_total", "source=\"shared\""),
        ("restored", "tollgate_token_source_total", "source=\"restored\""),
        ("lease_acquired", "tollgate_fleet_lease_total", "outcome=\"acquired\""),
        ("lease_busy", "tollgate_fleet_lease_total", "outcome=\"busy\""),
        ("lease_lost", "tollgate_fleet_lease_total", "outcome=\"lost\""),
        ("fallbacks", "tollgate_fleet_fallback_total", ""),
        ("redis_errors", "tollgate_redis_errors_total", ""),
        ("redis_round_trips", "tollgate_redis_duration_seconds_count", ""),
    ];
    let mut cycles = Vec::new();
    for r in &fleet {
        let text = c
            .get(format!("http://127.0.0.1:{}/metrics", r.admin))
            .send()
            .await
            .map_err(|e| format!("metrics of :{}: {e}", r.admin))?
            .text()
            .await
            .map_err(|e| format!("metrics of :{}: {e}", r.admin))?;
        let mut one = serde_json::Map::new();
        for (key, name, label) in series {
            let v = metric_sum(&text, name, label);
            one.insert(key.into(), json!(v));
            let t = totals.get(key).and_then(Value::as_f64).unwrap_or(0.0);
            totals.insert(key.into(), json!(t + v));
        }
        cycles.push(metric_sum(&text, "tollgate_token_source_total", ""));
        per_replica.push(Value::Object(one));
    }
    // A token request that landed while the replicas were being asked (should be none).
    let during_scrape = idp.count().saturating_sub(seen_at_end);
    // CPU of everything on the machine vs this run's processes (replicas, Redis, and this
    // driver with its doubles and traffic): the rest is other people's work.
    let machine1 = machine_ticks();
    let ours: u64 = fleet.iter().map(|r| process_ticks(r.proc.0.id())).sum::<u64>()
        + redis.as_ref().map(|r| process_ticks(r.0 .0.id())).unwrap_or(0)
        + process_ticks(std::process::id()).saturating_sub(self0);
    let machine_busy = machine1.0.saturating_sub(machine0.0) as f64;
    let machine_total = machine1.1.saturating_sub(machine0.1).max(1) as f64;
    let others_cores = (machine_busy - ours as f64).max(0.0) / machine_total * num_cores();
    let ours_cores = ours as f64 / machine_total * num_cores();
    let load_avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    drop(fleet);
    drop(redis);

    let mut times: Vec<f64> = idp.seen().iter().map(|s| s.at.saturating_duration_since(t0).as_secs_f64()).collect();
    times.sort_by(f64::total_cmp);
    times.truncate(seen_at_end);
    let seen = upstream.seen();
    let rejected = seen.iter().filter(|s| !s.accepted).count();
    let grouped = groups(&times, gap);
    let cycles_median = median(&mut cycles.clone());
    let requests = times.len();
    Ok(json!({
        "store": store,
        "replicas": n,
        "lifetime_s": a.lifetime,
        "refresh_before_s": a.refresh_before,
        "expiry_margin_s": a.expiry_margin,
        "healthy_after_s": healthy_s,
        "ran_s": ran_s,
        "token_requests_while_scraping": during_scrape,
        "replicas_restarted_for_a_port": restarted,
        "waited_for_quiet_s": waited_s,
        "cpu_cores_this_run": ours_cores,
        "cpu_cores_other_processes": others_cores,
        "load_average_at_end": load_avg.split_whitespace().next().unwrap_or(""),
        "token_requests": requests,
        "token_request_times_s": times,
        "cycles_per_replica": cycles,
        "cycles": cycles_median,
        "per_cycle": if cycles_median > 0.0 { requests as f64 / cycles_median } else { 0.0 },
        "cycle_gap_s": gap,
        "groups": grouped,
        "max_per_cycle": grouped.iter().copied().max().unwrap_or(0),
        "client_ok": ok.load(Ordering::Relaxed),
        "client_failed": bad.load(Ordering::Relaxed),
        "upstream_requests": seen.len(),
        "upstream_rejected": rejected,
        "totals": totals,
        "per_replica": per_replica,
    }))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = Args::parse();
    started();
    if let Err(e) = run(&a).await {
        log(&format!("error: {e}"));
        std::process::exit(1);
    }
}

async fn run(a: &Args) -> Result<(), String> {
    if a.lifetime <= a.refresh_before + a.expiry_margin || a.lifetimes == 0 || a.replicas.is_empty() {
        return Err("need lifetime > refresh_before + expiry_margin, lifetimes > 0 and some replicas".into());
    }
    let work = tempfile::Builder::new().prefix("tollgate-fleet.").tempdir().map_err(|e| format!("tempdir: {e}"))?;
    let mut runs = Vec::new();
    for store in &a.stores {
        for &n in &a.replicas {
            log(&format!("{store} store, {n} replica(s): {} s", a.lifetime * f64::from(a.lifetimes)));
            let r = one_run(a, store, n, work.path()).await?;
            log(&format!(
                "  {} token requests, {} cycles, {:.2} per cycle, max {} in one cycle, {} client requests failed",
                r["token_requests"],
                r["cycles"],
                r["per_cycle"].as_f64().unwrap_or(0.0),
                r["max_per_cycle"],
                r["client_failed"]
            ));
            runs.push(r);
        }
    }
    let out = json!({
        "tollgate": a.tollgate.display().to_string(),
        "lifetime_s": a.lifetime,
        "lifetimes": a.lifetimes,
        "refresh_before_s": a.refresh_before,
        "expiry_margin_s": a.expiry_margin,
        "rate_per_replica": a.rate,
        "quiet_wait_s": a.quiet_wait,
        "runs": runs,
    });
    let text = serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?;
    match &a.out {
        Some(p) => std::fs::write(p, text).map_err(|e| format!("write {}: {e}", p.display()))?,
        None => println!("{text}"),
    }
    if a.keep_work {
        let kept = work.keep();
        log(&format!("work directory kept: {}", kept.display()));
    }
    Ok(())
}
