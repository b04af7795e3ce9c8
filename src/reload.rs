//! Reloading: [`reload_file`] loads, validates and swaps in a config file (SIGHUP calls
//! it), and [`watch`] calls it when the content of the config file or a secret file
//! changes.
//!
//! The *directories* holding those files are watched, not the files: Kubernetes updates a
//! mounted ConfigMap or Secret by writing a new hidden directory and renaming a `..data`
//! symlink over the old one, so the file's own inode never changes and a watch on it
//! would never fire. Editors that save by rename have the same effect.
//!
//! One update is a burst of events (create, write, rename, delete), so events are
//! debounced into one reload. Before reloading, the content of every watched file is
//! hashed and compared with the last reload's: events that did not change any content
//! (a `touch`, an unrelated file in the same directory, a swap to identical data) cause
//! no reload and no log line above debug.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use zeroize::Zeroizing;

use crate::config::Settings;
use crate::gateway::Gateway;

/// Quiet time that ends a burst of events. A Kubernetes swap or an editor's save takes
/// microseconds to milliseconds; a quarter second is well past that and still prompt.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// A directory that never falls quiet (a log file next to the config, say) must not
/// postpone a reload forever.
const DEBOUNCE_MAX: Duration = Duration::from_secs(2);

/// How often to check whether a SIGHUP reload changed the set of watched files (the
/// watcher does not see SIGHUP; it notices the new settings on this tick).
const RESYNC_EVERY: Duration = Duration::from_secs(5);

/// Per-file content hashes. Only hashes are kept, so no copy of a secret outlives the read.
type Fingerprint = BTreeMap<PathBuf, u64>;

/// Watch the configuration's files and reload on change, until the process exits.
/// Spawned on the control runtime; when no watcher can be created (inotify limits, say),
/// it logs why and returns, and SIGHUP remains the way to reload.
pub async fn watch(gateway: Arc<Gateway>, config_path: PathBuf) {
    // notify calls back on its own thread; a one-slot channel is enough, since a pending
    // wake-up already means "something changed" and more of them add nothing.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watcher = match notify::recommended_watcher(move |res: notify::Result<Event>| match res {
        Ok(ev) if relevant(&ev.kind) => {
            let _ = tx.try_send(());
        }
        Ok(_) => {}
        Err(e) => {
            // Possibly lost events (a queue overflow): re-check the files to be safe.
            warn!(error = %e, "file watcher error; re-checking the configuration files");
            let _ = tx.try_send(());
        }
    }) {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "cannot start the file watcher; reload on change is disabled, SIGHUP still reloads");
            return;
        }
    };

    let mut settings = gateway.snapshot().settings.clone();
    let mut files = watched_files(&settings, &config_path);
    let mut dirs = BTreeSet::new();
    sync_watches(&mut watcher, &mut dirs, &files);
    info!(dirs = ?dirs, "watching the configuration and secret files for changes");
    let mut last = fingerprint_blocking(files.clone()).await;

    let mut tick = tokio::time::interval(RESYNC_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            ev = rx.recv() => {
                if ev.is_none() {
                    return;
                }
                debounce(&mut rx).await;
                let now = fingerprint_blocking(files.clone()).await;
                let changed = changed_files(&last, &now);
                if changed.is_empty() {
                    debug!("watched directories changed but no watched file did; not reloading");
                    continue;
                }
                info!(changed = ?changed, "watched files changed; reloading the configuration");
                // Remember what was read before reloading: a change racing with the reload
                // then differs from this and triggers another one, never none.
                last = now;
                let (gw, path) = (Arc::clone(&gateway), config_path.clone());
                // Loading reads files and resolves upstream hosts: keep it off the runtime's
                // worker threads, which also serve the refreshers and the admin API.
                if let Err(e) = tokio::task::spawn_blocking(move || reload_file(&gw, &path)).await {
                    warn!(error = %e, "configuration reload task failed");
                }
            }
            _ = tick.tick() => {}
        }
        // After a reload (ours or SIGHUP's) the new settings may name other secret files.
        let current = gateway.snapshot().settings.clone();
        if !Arc::ptr_eq(&current, &settings) {
            settings = current;
            let next = watched_files(&settings, &config_path);
            if next != files {
                files = next;
                sync_watches(&mut watcher, &mut dirs, &files);
                info!(dirs = ?dirs, "watched files updated after reload");
                last = fingerprint_blocking(files.clone()).await;
            }
        }
    }
}

/// Load, validate and swap; count and log the outcome. A bad config is rejected and the
/// old one keeps serving; a config that changes settings fixed at start applies the rest
/// and says which keys need a restart.
pub fn reload_file(gateway: &Gateway, path: &Path) {
    let m = crate::metrics::get();
    let result =
        crate::config::load(path).map_err(|e| e.to_string()).and_then(|s| gateway.reload(s).map_err(|e| e.to_string()));
    match result {
        Ok(s) if !s.restart_required.is_empty() => {
            m.config_reload_total.with_label_values(&["restart_required"]).inc();
            warn!(
                providers = s.providers,
                kept = s.kept,
                updated = s.updated,
                routes = s.routes,
                restart_required = ?s.restart_required,
                "configuration reloaded, except settings that need a restart"
            );
        }
        Ok(s) => {
            m.config_reload_total.with_label_values(&["success"]).inc();
            info!(
                providers = s.providers,
                kept = s.kept,
                updated = s.updated,
                routes = s.routes,
                "configuration reloaded"
            );
        }
        Err(e) => {
            m.config_reload_total.with_label_values(&["rejected"]).inc();
            tracing::error!(error = %e, "configuration reload rejected; the previous configuration keeps serving");
        }
    }
}

/// Events that may mean new content. Opening and reading are excluded: tollgate's own
/// reads of these files (hashing, loading) would otherwise wake the watcher again.
fn relevant(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Wait until no event has arrived for [`DEBOUNCE`], or [`DEBOUNCE_MAX`] has passed.
async fn debounce(rx: &mut mpsc::Receiver<()>) {
    let started = Instant::now();
    while started.elapsed() < DEBOUNCE_MAX {
        match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
            Ok(Some(())) => continue,
            Ok(None) | Err(_) => return,
        }
    }
}

/// The config file plus every secret file the settings read.
fn watched_files(settings: &Settings, config_path: &Path) -> BTreeSet<PathBuf> {
    let mut files: BTreeSet<PathBuf> = settings.watched_files.iter().cloned().collect();
    files.insert(config_path.to_path_buf());
    files
}

/// The directory to watch for `file`; a bare relative name lives in the working directory.
fn dir_of(file: &Path) -> PathBuf {
    match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Watch the directories of `files` and stop watching the ones no longer needed. A
/// directory that cannot be watched (missing, no permission) is logged and retried at
/// the next reload; its files are still read, so SIGHUP picks up their changes.
fn sync_watches(watcher: &mut RecommendedWatcher, dirs: &mut BTreeSet<PathBuf>, files: &BTreeSet<PathBuf>) {
    let wanted: BTreeSet<PathBuf> = files.iter().map(|f| dir_of(f)).collect();
    for gone in dirs.difference(&wanted) {
        // Fails if the directory was deleted, which already ended the watch.
        let _ = watcher.unwatch(gone);
    }
    dirs.retain(|d| wanted.contains(d));
    for dir in wanted {
        if dirs.contains(&dir) {
            continue;
        }
        match watcher.watch(&dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                dirs.insert(dir);
            }
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot watch directory; its files reload only on SIGHUP")
            }
        }
    }
}

async fn fingerprint_blocking(files: BTreeSet<PathBuf>) -> Fingerprint {
    // Only a panic fails the task; an empty fingerprint then makes the next event reload.
    tokio::task::spawn_blocking(move || fingerprint(&files)).await.unwrap_or_default()
}

/// Hash each file's content (following symlinks, as loading does). A file that cannot be
/// read hashes its error kind, so its disappearance or return counts as a change and the
/// reload reports the problem.
fn fingerprint(files: &BTreeSet<PathBuf>) -> Fingerprint {
    files
        .iter()
        .map(|f| {
            let mut h = DefaultHasher::new();
            match std::fs::read(f).map(Zeroizing::new) {
                Ok(bytes) => {
                    0u8.hash(&mut h);
                    bytes.hash(&mut h);
                }
                Err(e) => {
                    1u8.hash(&mut h);
                    e.kind().to_string().hash(&mut h);
                }
            }
            (f.clone(), h.finish())
        })
        .collect()
}

/// Files whose hash differs, including files only one side has.
fn changed_files(before: &Fingerprint, after: &Fingerprint) -> Vec<PathBuf> {
    let keys: BTreeSet<&PathBuf> = before.keys().chain(after.keys()).collect();
    keys.into_iter().filter(|k| before.get(*k) != after.get(*k)).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_reads_are_not_events() {
        assert!(!relevant(&EventKind::Access(AccessKind::Open(AccessMode::Any))));
        assert!(!relevant(&EventKind::Access(AccessKind::Close(AccessMode::Read))));
        assert!(relevant(&EventKind::Access(AccessKind::Close(AccessMode::Write))));
        assert!(relevant(&EventKind::Modify(notify::event::ModifyKind::Any)));
        assert!(relevant(&EventKind::Create(notify::event::CreateKind::Any)));
        assert!(relevant(&EventKind::Remove(notify::event::RemoveKind::Any)));
    }

    #[test]
    fn bare_file_name_is_watched_in_the_working_directory() {
        assert_eq!(dir_of(Path::new("tollgate.toml")), PathBuf::from("."));
        assert_eq!(dir_of(Path::new("/etc/tollgate/tollgate.toml")), PathBuf::from("/etc/tollgate"));
    }

    #[test]
    fn fingerprint_sees_content_not_touches() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "one").unwrap();
        let files: BTreeSet<PathBuf> = [a.clone(), b.clone()].into_iter().collect();
        let first = fingerprint(&files);
        std::fs::write(&a, "one").unwrap();
        assert!(changed_files(&first, &fingerprint(&files)).is_empty(), "same content is no change");
        std::fs::write(&a, "two").unwrap();
        std::fs::write(&b, "appears").unwrap();
        assert_eq!(changed_files(&first, &fingerprint(&files)), vec![a, b]);
    }
}
