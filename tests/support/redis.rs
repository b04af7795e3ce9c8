//! A real `redis-server` (and sentinels) for the Redis store's tests: started on a free
//! loopback port in a temporary directory, without persistence, waited for until it
//! answers PING, and killed on drop. `bash scripts/setup` installs `redis-server`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to answer its first PING.
const START_LIMIT: Duration = Duration::from_secs(10);

/// Whether `redis-server` is installed (the tests say how to install it when not).
pub fn available() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn require() {
    assert!(available(), "redis-server is not installed: run `bash scripts/setup` (apt-get install redis-server)");
}

fn free_port() -> u16 {
    super::free_port().port()
}

/// One RESP command over a fresh loopback connection; the raw reply, or None if the
/// server did not answer in time.
pub fn raw_command(port: u16, args: &[&str], limit: Duration) -> Option<String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, limit).ok()?;
    s.set_read_timeout(Some(limit)).ok()?;
    s.set_write_timeout(Some(limit)).ok()?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).ok()?;
    (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn wait_pong(port: u16, child: &mut Child, log: &Path) {
    let start = Instant::now();
    while start.elapsed() < START_LIMIT {
        if let Some(reply) = raw_command(port, &["PING"], Duration::from_millis(200)) {
            if reply.starts_with("+PONG") {
                return;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            panic!("redis-server on port {port} exited ({status}):\n{text}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("redis-server on port {port} did not answer PING within {START_LIMIT:?}");
}

/// A `redis-server` child process.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    args: Vec<String>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// A standalone server on a free port.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A server replicating `master`.
    pub fn replica_of(master: &RedisServer) -> Self {
        Self::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()])
    }

    fn start_with(extra: &[&str]) -> Self {
        require();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s =
            RedisServer { child: None, port: free_port(), args: extra.iter().map(|a| a.to_string()).collect(), dir };
        s.spawn();
        s
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let log = self.log_path();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(&log)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn redis-server");
        wait_pong(self.port, &mut child, &log);
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Kill it (as a crash would: SIGKILL). Its data is gone (no persistence).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start again, empty, on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Freeze (SIGSTOP) or thaw (SIGCONT) the process: a Redis that hangs.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().expect("kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// A synchronous client connection for inspecting what the store wrote.
    pub fn conn(&self) -> redis::Connection {
        let client = redis::Client::open(self.url()).expect("client");
        client.get_connection_with_timeout(Duration::from_secs(2)).expect("connect to test redis")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A frozen server ignores SIGKILL only until thawed; thaw it to be sure.
            let _ = Command::new("kill").arg("-CONT").arg(self.pid().to_string()).status();
        }
        self.stop();
    }
}

/// A `redis-server --sentinel` watching one master.
pub struct SentinelServer {
    child: Option<Child>,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl SentinelServer {
    /// Monitor `master` under `name` with a quorum of 1 and short timers.
    pub fn start(name: &str, master: &RedisServer) -> Self {
        require();
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        let log = dir.path().join("sentinel.log");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {log}\n\
                 sentinel monitor {name} 127.0.0.1 {mport} 1\n\
                 sentinel down-after-milliseconds {name} 1000\n\
                 sentinel failover-timeout {name} 5000\n\
                 sentinel parallel-syncs {name} 1\n",
                dir = dir.path().display(),
                log = log.display(),
                mport = master.port,
            ),
        )
        .expect("write sentinel.conf");
        let mut child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server --sentinel");
        wait_pong(port, &mut child, &log);
        SentinelServer { child: Some(child), port, _dir: dir }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn conn(&self) -> redis::Connection {
        let client = redis::Client::open(self.url()).expect("client");
        client.get_connection_with_timeout(Duration::from_secs(2)).expect("connect to sentinel")
    }
}

impl Drop for SentinelServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
