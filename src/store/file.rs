//! The file store: one JSON file, mode 0600, that several processes may share.
//!
//! Every operation re-reads the file under an advisory lock (`flock` on a lock file
//! next to it, never on the store itself, whose inode each write replaces), and a write
//! changes only its own entry in what it just read: another process's entries survive.
//! The new content goes to a uniquely named temporary file in the same directory, is
//! fsynced and renamed over the old file, then the directory is fsynced, so that a crash
//! at any moment leaves either the old or the new content, never half of one.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::debug;
use zeroize::Zeroizing;

use super::entries::{self, Entries};
use super::{Loaded, Saved, StoreError, StoredToken, TokenStore, Version};

/// Marks the file as ours, so that a foreign file is never overwritten.
const FORMAT: &str = "tollgate-token-store";
/// Still 1: entry versions (`rev`) are an addition that earlier readers ignore.
const VERSION: u32 = 1;
/// How long an operation waits for another process to release the lock. A write holds
/// it for a few fsyncs; far longer means that process is stopped or its disk is stuck.
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Contents {
    // Checked through `Header`; named so that `deny_unknown_fields` accepts them.
    #[serde(rename = "format")]
    _format: serde::de::IgnoredAny,
    #[serde(rename = "version")]
    _version: serde::de::IgnoredAny,
    tokens: Entries,
}

#[derive(Serialize)]
struct ContentsRef<'a> {
    format: &'a str,
    version: u32,
    tokens: &'a Entries,
}

/// The marker fields only, to say why a file is not ours without parsing its secrets
/// into anything that outlives the check.
#[derive(Deserialize)]
struct Header {
    #[serde(default)]
    format: Option<serde_json::Value>,
    #[serde(default)]
    version: Option<serde_json::Value>,
}

pub struct FileStore {
    paths: Arc<Paths>,
    lock_timeout: Duration,
    /// `None` until the first `set_live`: purge nothing before we know what is in use.
    live: Mutex<Option<BTreeSet<String>>>,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore").field("path", &self.paths.path).finish_non_exhaustive()
    }
}

/// Everything the blocking side needs, shared with `spawn_blocking` closures.
struct Paths {
    path: PathBuf,
    dir: PathBuf,
    lock: PathBuf,
    /// Temporary files are `<tmp_prefix><pid>-<16 hex digits>`.
    tmp_prefix: String,
}

#[derive(Clone, Copy)]
enum Mode {
    /// Loads: any number at once, none during a write.
    Shared,
    /// Read-merge-write.
    Exclusive,
}

impl FileStore {
    /// Open (or prepare to create) the store at `path`. A file that is not a tollgate
    /// store is refused, naming the path; it is never overwritten.
    pub fn open(path: PathBuf) -> Result<Self, StoreError> {
        let paths = Paths::new(path);
        let io = |e: std::io::Error| paths.io(e);
        // No lock needed to check: writers only ever rename whole files into place.
        match fs::read(&paths.path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                parse(&bytes).map_err(|reason| StoreError::Foreign { path: paths.path.clone(), reason })?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Fail now, not at the first token, if the directory cannot hold the file.
                fs::create_dir_all(&paths.dir).map_err(io)?;
                let md = fs::metadata(&paths.dir).map_err(io)?;
                if md.permissions().readonly() {
                    return Err(StoreError::Io { path: paths.path.clone(), reason: "directory is read-only".into() });
                }
            }
            Err(e) => return Err(io(e)),
        }
        Ok(FileStore { paths: Arc::new(paths), lock_timeout: LOCK_TIMEOUT, live: Mutex::new(None) })
    }

    /// How long an operation waits for the lock before failing with `LockTimeout`.
    pub fn with_lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// Run `op` on a blocking thread (file IO must not stall the runtime's workers)
    /// while holding the lock. If the lock is not obtained within the timeout, or this
    /// future is dropped first (a retired provider's save raced against shutdown), the
    /// operation is abandoned: the blocking thread, once it gets the lock, does nothing.
    /// Once it has started under the lock, it runs to the end.
    async fn run<T, F>(&self, mode: Mode, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Paths) -> Result<T, StoreError> + Send + 'static,
    {
        let ticket = Ticket::default();
        let _abandon_if_dropped = AbandonOnDrop(ticket.clone());
        let paths = Arc::clone(&self.paths);
        let t = ticket.clone();
        let mut task = tokio::task::spawn_blocking(move || {
            let _lock = paths.lock(mode)?;
            if !t.claim() {
                return Ok(None);
            }
            op(&paths).map(Some)
        });
        let joined = match tokio::time::timeout(self.lock_timeout, &mut task).await {
            Ok(joined) => joined,
            Err(_) if ticket.abandon() => return Err(self.lock_timeout_error()),
            // It got the lock just in time and is running: let it finish.
            Err(_) => task.await,
        };
        match joined {
            Ok(Ok(Some(v))) => Ok(v),
            Ok(Ok(None)) => Err(self.lock_timeout_error()),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(StoreError::Io { path: self.paths.path.clone(), reason: format!("store task failed: {e}") }),
        }
    }

    fn lock_timeout_error(&self) -> StoreError {
        StoreError::LockTimeout {
            path: self.paths.path.clone(),
            lock: self.paths.lock.clone(),
            secs: self.lock_timeout.as_secs().max(1),
        }
    }

    fn live(&self) -> Option<BTreeSet<String>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[async_trait::async_trait]
impl TokenStore for FileStore {
    async fn load(&self, key: &str) -> Result<Option<Loaded>, StoreError> {
        let key = key.to_string();
        self.run(Mode::Shared, move |p| Ok(entries::load(&p.read()?, &key))).await
    }

    async fn save(&self, key: &str, token: &StoredToken, expected: Version) -> Result<Saved, StoreError> {
        let key = key.to_string();
        let token = token.clone();
        let live = self.live();
        self.run(Mode::Exclusive, move |p| {
            let mut all = p.read()?;
            let saved = entries::save(&mut all, &key, &token, expected);
            if matches!(saved, Saved::Written(_)) {
                if let Some(live) = &live {
                    let purged = entries::purge(&mut all, live, &key, super::unix_now());
                    if purged > 0 {
                        debug!(store = %p.path.display(), purged, "purged expired entries of providers not running here");
                    }
                }
                p.write(&all)?;
            }
            Ok(saved)
        })
        .await
    }

    async fn remove(&self, key: &str, expected: Version) -> Result<bool, StoreError> {
        let key = key.to_string();
        self.run(Mode::Exclusive, move |p| {
            let mut all = p.read()?;
            let removed = entries::remove(&mut all, &key, expected, super::unix_now());
            if removed {
                p.write(&all)?;
            }
            Ok(removed)
        })
        .await
    }

    fn set_live(&self, keys: BTreeSet<String>) {
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(keys);
    }

    fn describe(&self) -> String {
        format!("file {}", self.paths.path.display())
    }
}

impl Paths {
    fn new(path: PathBuf) -> Self {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "tokens.json".into());
        let mut lock = OsString::from(".");
        lock.push(&name);
        lock.push(".lock");
        let tmp_prefix = format!(".{}.tmp-", name.to_string_lossy());
        Paths { lock: dir.join(lock), dir, path, tmp_prefix }
    }

    fn io(&self, e: std::io::Error) -> StoreError {
        StoreError::Io { path: self.path.clone(), reason: e.to_string() }
    }

    /// Take the lock; it is released when the returned file is closed (also when the
    /// process dies, so a `kill -9` never leaves the store locked).
    ///
    /// A load that cannot open the lock file (the directory is gone, or read-only)
    /// reads without it: a whole file is always there to read, since writers only
    /// rename complete files into place. A write creates the directory if it is gone.
    fn lock(&self, mode: Mode) -> Result<Option<File>, StoreError> {
        let open =
            || OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(&self.lock);
        let file = match (open(), mode) {
            (Ok(f), _) => f,
            (Err(e), Mode::Shared) => {
                debug!(lock = %self.lock.display(), error = %e, "reading the token store without its lock");
                return Ok(None);
            }
            (Err(e), Mode::Exclusive) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(&self.dir).map_err(|e| self.io(e))?;
                open().map_err(|e| self.io(e))?
            }
            (Err(e), Mode::Exclusive) => return Err(self.io(e)),
        };
        let op = match mode {
            Mode::Shared => rustix::fs::FlockOperation::LockShared,
            Mode::Exclusive => rustix::fs::FlockOperation::LockExclusive,
        };
        // A signal may interrupt the wait; anything else is a real error.
        for _ in 0..100 {
            match rustix::fs::flock(&file, op) {
                Ok(()) => return Ok(Some(file)),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(self.io(e.into())),
            }
        }
        Err(self.io(std::io::Error::other("flock interrupted 100 times")))
    }

    /// The entries now in the file; none if there is no file. A file that became
    /// foreign or corrupt since `open` is an error, and the caller must not write.
    fn read(&self) -> Result<Entries, StoreError> {
        match fs::read(&self.path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                parse(&bytes).map_err(|reason| StoreError::Foreign { path: self.path.clone(), reason })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Entries::new()),
            Err(e) => Err(self.io(e)),
        }
    }

    /// Replace the file with `all`. Only called under the exclusive lock.
    fn write(&self, all: &Entries) -> Result<(), StoreError> {
        let contents = ContentsRef { format: FORMAT, version: VERSION, tokens: all };
        let json = Zeroizing::new(
            serde_json::to_vec_pretty(&contents)
                .map_err(|e| StoreError::Io { path: self.path.clone(), reason: e.to_string() })?,
        );
        self.remove_stale_temps();
        let (tmp, mut f) = self.create_temp()?;
        let written = (|| {
            // The mode is set at creation, minus the umask; make it exactly 0600.
            f.set_permissions(fs::Permissions::from_mode(0o600))?;
            f.write_all(&json)?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(self.io(e));
        }
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// A new temporary file whose name no other writer uses (pid and a random suffix;
    /// `create_new` makes sure of it).
    fn create_temp(&self) -> Result<(PathBuf, File), StoreError> {
        let mut last = None;
        for _ in 0..8 {
            let tmp = self.dir.join(format!("{}{}-{:016x}", self.tmp_prefix, std::process::id(), fastrand::u64(..)));
            match OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp) {
                Ok(f) => return Ok((tmp, f)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(self.io(e)),
            }
        }
        Err(self.io(last.unwrap_or_else(|| std::io::Error::other("no unique temporary file name"))))
    }

    /// Delete temporary files left by writers that died mid-write (`kill -9`). Safe
    /// because temporary files are only created under the exclusive lock, which we hold:
    /// no live writer has one in flight. Best effort.
    fn remove_stale_temps(&self) {
        let Ok(dir) = fs::read_dir(&self.dir) else { return };
        for entry in dir.flatten().take(10_000) {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&self.tmp_prefix)) else { continue };
            if is_temp_suffix(rest) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// `<pid>-<16 hex digits>`: ours, not an earlier tollgate's `<pid>` temp name (an
/// earlier version writes without the lock, so its temp file may be in flight).
fn is_temp_suffix(rest: &str) -> bool {
    match rest.split_once('-') {
        Some((pid, rnd)) => {
            !pid.is_empty()
                && pid.bytes().all(|b| b.is_ascii_digit())
                && rnd.len() == 16
                && rnd.bytes().all(|b| b.is_ascii_hexdigit())
        }
        None => false,
    }
}

/// Whether the blocking side may still run the operation, decided once under a mutex
/// so that the async side never reports a timeout for a write that then happens.
#[derive(Clone, Default)]
struct Ticket(Arc<Mutex<Claim>>);

#[derive(Clone, Copy, Default, PartialEq)]
enum Claim {
    #[default]
    Waiting,
    Running,
    Abandoned,
}

impl Ticket {
    fn state(&self) -> std::sync::MutexGuard<'_, Claim> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The blocking side holds the lock: may it run?
    fn claim(&self) -> bool {
        let mut c = self.state();
        if *c == Claim::Waiting {
            *c = Claim::Running;
        }
        *c == Claim::Running
    }

    /// The async side gives up: true if the operation will now never run.
    fn abandon(&self) -> bool {
        let mut c = self.state();
        if *c == Claim::Waiting {
            *c = Claim::Abandoned;
        }
        *c == Claim::Abandoned
    }
}

struct AbandonOnDrop(Ticket);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

/// Parse the file, saying precisely why it is not ours (never quoting its content).
fn parse(bytes: &[u8]) -> Result<Entries, String> {
    let at = |e: &serde_json::Error| format!("line {}, column {}", e.line(), e.column());
    let header: Header = serde_json::from_slice(bytes).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            format!("not JSON ({})", at(&e))
        } else {
            "not a JSON object".to_string()
        }
    })?;
    match header.format.as_ref().and_then(|f| f.as_str()) {
        Some(FORMAT) => {}
        _ => return Err(format!("no `\"format\": \"{FORMAT}\"` marker")),
    }
    match header.version.as_ref().map(|v| v.as_u64()) {
        Some(Some(n)) if n == VERSION as u64 => {}
        Some(Some(n)) => return Err(format!("version {n} is not supported (this tollgate reads version {VERSION})")),
        Some(None) | None => return Err("no version".into()),
    }
    let c: Contents = serde_json::from_slice(bytes).map_err(|e| {
        // serde's "invalid type: string \"…\"" would quote a value, maybe a secret:
        // keep only messages that name fields.
        let msg = e.to_string();
        let msg = msg.split(" at line ").next().unwrap_or("");
        if ["missing field", "unknown field", "duplicate field"].iter().any(|p| msg.starts_with(p)) {
            format!("unexpected structure: {msg} ({})", at(&e))
        } else {
            format!("unexpected structure: a value of the wrong type ({})", at(&e))
        }
    })?;
    Ok(c.tokens)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::entries::tests::tok;
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn round_trip_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/tokens.json");
        let s = FileStore::open(path.clone()).unwrap();
        assert_eq!(s.save("a", &tok("secret-a"), 0).await.unwrap(), Saved::Written(1));
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("sub/.tokens.json.lock")), 0o600);
        let s2 = FileStore::open(path.clone()).unwrap();
        assert_eq!(s2.load("a").await.unwrap(), Some(Loaded { token: tok("secret-a"), version: 1 }));
        assert!(s2.remove("a", 1).await.unwrap());
        assert_eq!(FileStore::open(path).unwrap().load("a").await.unwrap(), None);
    }

    #[tokio::test]
    async fn compare_and_swap() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(dir.path().join("t.json")).unwrap();
        assert_eq!(s.load("k").await.unwrap(), None, "no file yet");
        assert!(!s.remove("k", 1).await.unwrap(), "absent");
        assert_eq!(s.save("k", &tok("a"), 0).await.unwrap(), Saved::Written(1));
        assert_eq!(s.save("k", &tok("b"), 1).await.unwrap(), Saved::Written(2));
        let now = Some(Loaded { token: tok("b"), version: 2 });
        assert_eq!(s.save("k", &tok("stale"), 1).await.unwrap(), Saved::Conflict(now.clone()));
        assert_eq!(s.save("k", &tok("dup"), 0).await.unwrap(), Saved::Conflict(now.clone()));
        assert!(!s.remove("k", 1).await.unwrap());
        assert_eq!(s.load("k").await.unwrap(), now);
        assert!(s.remove("k", 2).await.unwrap());
        assert_eq!(s.load("k").await.unwrap(), None);
        assert_eq!(s.save("k", &tok("c"), 2).await.unwrap(), Saved::Conflict(None));
        assert_eq!(s.save("k", &tok("c"), 0).await.unwrap(), Saved::Written(3), "versions never go back");
    }

    #[tokio::test]
    async fn two_stores_on_one_file_keep_each_others_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let a = FileStore::open(path.clone()).unwrap();
        let b = FileStore::open(path.clone()).unwrap();
        assert_eq!(a.save("a", &tok("from-a"), 0).await.unwrap(), Saved::Written(1));
        assert_eq!(b.save("b", &tok("from-b"), 0).await.unwrap(), Saved::Written(1));
        assert_eq!(a.save("a", &tok("from-a-2"), 1).await.unwrap(), Saved::Written(2));
        // Each sees the other's latest write without reopening.
        assert_eq!(b.load("a").await.unwrap().map(|l| l.version), Some(2));
        assert_eq!(a.load("b").await.unwrap().map(|l| l.version), Some(1));
        let later = FileStore::open(path).unwrap();
        assert_eq!(later.load("a").await.unwrap(), Some(Loaded { token: tok("from-a-2"), version: 2 }));
        assert_eq!(later.load("b").await.unwrap(), Some(Loaded { token: tok("from-b"), version: 1 }));
    }

    #[tokio::test]
    async fn a_file_written_before_versions_loads_at_version_1() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        fs::write(
            &path,
            r#"{"format":"tollgate-token-store","version":1,"tokens":{"backend":
               {"fingerprint":"fp","token":"old","issued_at":1,"expires_at":null,"scope":null,"vars":{},"extras":{}}}}"#,
        )
        .unwrap();
        let s = FileStore::open(path.clone()).unwrap();
        assert_eq!(s.load("backend").await.unwrap(), Some(Loaded { token: tok("old"), version: 1 }));
        assert_eq!(s.save("backend", &tok("new"), 1).await.unwrap(), Saved::Written(2));
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["version"], 1, "the file format is unchanged");
        assert_eq!(v["tokens"]["backend"]["rev"], 2);
        assert_eq!(v["tokens"]["backend"]["token"], "new");
    }

    #[test]
    fn corrupt_or_foreign_file_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        for content in [
            &b"{not json"[..],
            br#"{"some":"other app"}"#,
            br#"{"format":"tollgate-token-store","version":99,"tokens":{}}"#,
            br#"{"format":"tollgate-token-store","version":1,"tokens":{"k":{"token":"secret-value"}}}"#,
            br#"{"format":"tollgate-token-store","version":1,"tokens":{"k":{"fingerprint":"f","token":"t","issued_at":"secret-value"}}}"#,
        ] {
            let path = dir.path().join("t.json");
            fs::write(&path, content).unwrap();
            let e = FileStore::open(path.clone()).expect_err("must refuse");
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(!msg.contains("secret-value"), "{msg}");
            assert_eq!(fs::read(&path).unwrap(), content, "file must not be overwritten");
        }
    }

    #[tokio::test]
    async fn a_file_corrupted_later_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let s = FileStore::open(path.clone()).unwrap();
        assert_eq!(s.save("a", &tok("a"), 0).await.unwrap(), Saved::Written(1));
        fs::write(&path, b"another program was here").unwrap();
        for e in [
            s.save("a", &tok("b"), 1).await.expect_err("save must fail"),
            s.remove("a", 1).await.expect_err("remove must fail"),
            s.load("a").await.expect_err("load must fail"),
        ] {
            assert!(matches!(e, StoreError::Foreign { .. }), "{e}");
            assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        }
        assert_eq!(fs::read(&path).unwrap(), b"another program was here");
    }

    #[tokio::test]
    async fn a_missing_file_or_directory_reads_as_empty_and_is_recreated() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        let path = sub.join("tokens.json");
        let s = FileStore::open(path.clone()).unwrap();
        fs::remove_dir_all(&sub).unwrap();
        assert_eq!(s.load("a").await.unwrap(), None);
        assert_eq!(s.save("a", &tok("a"), 0).await.unwrap(), Saved::Written(1));
        assert_eq!(s.load("a").await.unwrap().map(|l| l.version), Some(1));
    }

    #[tokio::test]
    async fn purges_dead_entries_of_providers_not_running_here() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let now = super::super::unix_now();
        let other = FileStore::open(path.clone()).unwrap();
        let mut dead = tok("dead");
        dead.expires_at = Some(now - 10);
        let mut renewable = dead.clone();
        renewable.vars.insert("refresh_token".into(), "r".into());
        let mut long_dead = renewable.clone();
        long_dead.expires_at = Some(now - super::super::PURGE_AFTER - 10);
        let forever = tok("forever");
        for (k, t) in [("dead", &dead), ("renewable", &renewable), ("long_dead", &long_dead), ("forever", &forever)] {
            assert_eq!(other.save(k, t, 0).await.unwrap(), Saved::Written(1), "{k}");
        }
        let s = FileStore::open(path.clone()).unwrap();
        s.set_live(["mine".to_string(), "dead".to_string()].into());
        assert_eq!(s.save("mine", &tok("mine"), 0).await.unwrap(), Saved::Written(1));
        // "dead" is live here (kept), "long_dead" is past 30 days (dropped).
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        let keys: Vec<&str> = v["tokens"].as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["dead", "forever", "mine", "renewable"]);
        s.set_live(["mine".to_string()].into());
        assert_eq!(s.save("mine", &tok("mine"), 1).await.unwrap(), Saved::Written(2));
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        let keys: Vec<&str> = v["tokens"].as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, ["forever", "mine", "renewable"]);
    }

    #[tokio::test]
    async fn a_held_lock_times_out_and_the_abandoned_write_never_happens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let s = FileStore::open(path.clone()).unwrap();
        assert_eq!(s.save("k", &tok("a"), 0).await.unwrap(), Saved::Written(1));
        let impatient = FileStore::open(path.clone()).unwrap().with_lock_timeout(Duration::from_millis(200));
        // Another process holds the lock.
        let held = File::open(dir.path().join(".tokens.json.lock")).unwrap();
        rustix::fs::flock(&held, rustix::fs::FlockOperation::LockExclusive).unwrap();
        let e = impatient.save("k", &tok("late"), 1).await.expect_err("must time out");
        assert!(matches!(e, StoreError::LockTimeout { .. }), "{e}");
        assert!(e.to_string().contains(".tokens.json.lock"), "{e}");
        drop(held);
        // The blocking thread gets the lock now and must not write "late" at version 2.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(s.save("k", &tok("b"), 1).await.unwrap(), Saved::Written(2));
        assert_eq!(s.load("k").await.unwrap(), Some(Loaded { token: tok("b"), version: 2 }));
    }

    #[tokio::test]
    async fn temp_files_are_unique_and_leftovers_of_dead_writers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let leftover = dir.path().join(".tokens.json.tmp-4242-0123456789abcdef");
        let old_style = dir.path().join(".tokens.json.tmp-4242");
        let unrelated = dir.path().join("notes.txt");
        for f in [&leftover, &old_style, &unrelated] {
            fs::write(f, b"x").unwrap();
        }
        let s = FileStore::open(path).unwrap();
        assert_eq!(s.save("k", &tok("a"), 0).await.unwrap(), Saved::Written(1));
        assert!(!leftover.exists());
        assert!(old_style.exists(), "an earlier version's temp file may be in flight");
        assert!(unrelated.exists());
        let mut names: Vec<String> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, [".tokens.json.lock", ".tokens.json.tmp-4242", "notes.txt", "tokens.json"]);
    }

    #[test]
    fn temp_suffixes() {
        assert!(is_temp_suffix("12-0123456789abcdef"));
        assert!(!is_temp_suffix("12"));
        assert!(!is_temp_suffix("-0123456789abcdef"));
        assert!(!is_temp_suffix("12-0123"));
        assert!(!is_temp_suffix("x2-0123456789abcdef"));
    }
}
