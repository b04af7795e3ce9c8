//! Two real processes share one file store. Each saves its own entry 1,000 times and
//! increments a shared counter entry 1,000 times with compare-and-swap, while this
//! process reads the file as fast as it can: the file must always parse, no entry may
//! ever disappear or go back, and the shared entry's version must equal the number of
//! successful compare-and-swap writes (none lost, none doubled).
//!
//! The children are this test binary itself, re-executed to run `store_share_child`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use tollgate::store::{FileStore, Loaded, Saved, StoredToken, TokenStore};

/// `<writer id>:<store path>`; set only for the children.
const CHILD_ENV: &str = "TOLLGATE_STORE_SHARE_CHILD";
const CHILD_TEST: &str = "store_share_child";
const WRITERS: usize = 2;
const WRITES: u64 = 1_000;
const SHARED: &str = "shared-counter";
/// Attempts per shared increment; a writer that loses this many races in a row is broken.
const MAX_TRIES: u32 = 10_000;
const DEADLINE: Duration = Duration::from_secs(300);

fn own_key(id: usize) -> String {
    format!("writer-{id}")
}

fn token(value: String) -> StoredToken {
    StoredToken {
        fingerprint: "store-share".into(),
        token: value,
        issued_at: 1,
        expires_at: None,
        scope: None,
        vars: Default::default(),
        extras: Default::default(),
    }
}

fn counter(l: &Option<Loaded>) -> (u64, u64) {
    match l {
        Some(l) => (l.token.token.parse().expect("the counter is a number"), l.version),
        None => (0, 0),
    }
}

/// One writer process. Does nothing unless started by `two_processes_share_one_file`.
#[test]
#[ignore = "a child process of two_processes_share_one_file"]
fn store_share_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else { return };
    let (id, path) = spec.split_once(':').expect("CHILD_ENV is <id>:<path>");
    let id: usize = id.parse().expect("writer id");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let store = FileStore::open(PathBuf::from(path)).expect("open the store");
        let own = own_key(id);
        let (mut shared_writes, mut conflicts) = (0u64, 0u64);
        // Bounded on its own too, should the parent die without killing it.
        let deadline = Instant::now() + DEADLINE;
        for i in 0..WRITES {
            assert!(Instant::now() < deadline, "writer {id}: not done within {DEADLINE:?}");
            // Nobody else writes this key: every save must land at the next version.
            let saved = store.save(&own, &token(i.to_string()), i).await.expect("save own key");
            assert_eq!(saved, Saved::Written(i + 1), "writer {id}: own key, write {i}");
            let mut current = store.load(SHARED).await.expect("load shared key");
            let mut done = false;
            for _ in 0..MAX_TRIES {
                let (n, version) = counter(&current);
                match store.save(SHARED, &token((n + 1).to_string()), version).await.expect("save shared key") {
                    Saved::Written(v) => {
                        assert_eq!(v, version + 1, "writer {id}: a write moves the version by one");
                        shared_writes += 1;
                        done = true;
                        break;
                    }
                    // Lost the race: decide again on what is there now.
                    Saved::Conflict(now) => {
                        conflicts += 1;
                        current = now;
                    }
                }
            }
            assert!(done, "writer {id}: {MAX_TRIES} conflicts in a row on the shared key");
        }
        println!("RESULT shared_writes={shared_writes} conflicts={conflicts}");
    });
}

/// Kills the children if the parent fails early, so none outlives the test.
struct Children(Vec<(Child, Option<ExitStatus>)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (c, status) in &mut self.0 {
            if status.is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn spawn_child(id: usize, store: &Path, out: &Path) -> Child {
    let exe = std::env::current_exe().expect("test binary path");
    let log = File::create(out).expect("child log");
    Command::new(exe)
        .args(["--exact", CHILD_TEST, "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{id}:{}", store.display()))
        .stdout(log.try_clone().expect("log fd"))
        .stderr(log)
        .spawn()
        .expect("spawn a writer process")
}

#[test]
fn two_processes_share_one_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tokens.json");
    let logs: Vec<PathBuf> = (0..WRITERS).map(|id| dir.path().join(format!("writer-{id}.log"))).collect();
    let mut children = Children((0..WRITERS).map(|id| (spawn_child(id, &path, &logs[id]), None)).collect());

    let deadline = Instant::now() + DEADLINE;
    // Highest version seen per key: an entry may never vanish or go back.
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    let (mut reads, mut overlapping) = (0u64, 0u64);
    loop {
        for (c, status) in &mut children.0 {
            if status.is_none() {
                *status = c.try_wait().expect("child status");
            }
        }
        let finished = children.0.iter().all(|(_, s)| s.is_some());
        match fs::read(&path) {
            Ok(bytes) => {
                let v: serde_json::Value = serde_json::from_slice(&bytes)
                    .unwrap_or_else(|e| panic!("read {reads}: the file does not parse ({e})"));
                assert_eq!(v["format"], "tollgate-token-store", "read {reads}");
                let tokens = v["tokens"].as_object().unwrap_or_else(|| panic!("read {reads}: no tokens"));
                for (key, before) in &seen {
                    let now = tokens.get(key).unwrap_or_else(|| panic!("read {reads}: entry {key} was lost"));
                    let rev = now["rev"].as_u64().expect("rev");
                    assert!(rev >= *before, "read {reads}: {key} went back from {before} to {rev}");
                }
                for (key, e) in tokens {
                    seen.insert(key.clone(), e["rev"].as_u64().expect("rev"));
                }
                // Both writers caught mid-way: the processes really ran at the same time.
                let mid = |id| seen.get(&own_key(id)).is_some_and(|v| *v > 0 && *v < WRITES);
                if (0..WRITERS).all(mid) {
                    overlapping += 1;
                }
                reads += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                assert!(seen.is_empty(), "read {reads}: the file disappeared");
            }
            Err(e) => panic!("read {reads}: {e}"),
        }
        if finished {
            break;
        }
        assert!(Instant::now() < deadline, "the writers did not finish within {DEADLINE:?} ({reads} reads)");
        std::thread::sleep(Duration::from_millis(1));
    }

    let mut shared_writes = 0;
    for (id, (_, status)) in children.0.iter().enumerate() {
        let log = fs::read_to_string(&logs[id]).unwrap_or_default();
        assert!(status.is_some_and(|s| s.success()), "writer {id} failed:\n{log}");
        let result = log
            .lines()
            .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r))
            .unwrap_or_else(|| panic!("writer {id} reported nothing:\n{log}"));
        println!("writer {id}: {result}");
        let n: u64 = result
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("shared_writes="))
            .and_then(|n| n.parse().ok())
            .expect("shared_writes");
        assert_eq!(n, WRITES, "writer {id} incremented the counter once per round");
        shared_writes += n;
    }
    println!("{reads} reads, {overlapping} with both writers mid-way");
    assert!(overlapping > 0, "the two writers never ran at the same time; the test proved nothing");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let store = FileStore::open(path.clone()).expect("a later process opens the store");
        for id in 0..WRITERS {
            let own = store.load(&own_key(id)).await.expect("load").expect("own entry survives");
            assert_eq!((own.token.token.as_str(), own.version), ((WRITES - 1).to_string().as_str(), WRITES));
        }
        let shared = store.load(SHARED).await.expect("load").expect("shared entry");
        assert_eq!(shared.version, shared_writes, "one version per successful compare-and-swap");
        assert_eq!(counter(&Some(shared)).0, shared_writes, "no increment lost");
    });
}
