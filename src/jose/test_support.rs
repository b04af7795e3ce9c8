//! Keys, files and checks shared by the jose tests.

use std::path::PathBuf;
use std::sync::OnceLock;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;

/// PEM as openssl writes it: 64-character lines.
pub(crate) fn pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in body.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

pub(crate) fn b64u(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// One 2048-bit RSA key per test process (generation is the slow part of these tests).
pub(crate) fn rsa_2048() -> &'static rsa::RsaPrivateKey {
    static KEY: OnceLock<rsa::RsaPrivateKey> = OnceLock::new();
    KEY.get_or_init(|| rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("RSA key generation"))
}

/// A temporary directory for key files, removed on drop.
pub(crate) struct Dir(tempfile::TempDir);

impl Dir {
    pub(crate) fn new() -> Dir {
        Dir(tempfile::tempdir().expect("temp dir"))
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    pub(crate) fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, contents).expect("write key file");
        path
    }
}

/// Fails if `text` contains any 12-character run of `secret` (a PEM body, a JWK `d`, a
/// hex scalar): enough to catch a key printed whole or in part.
#[track_caller]
pub(crate) fn assert_no_material(text: &str, secret: &str) {
    let compact: Vec<char> = secret.chars().filter(|c| !c.is_whitespace()).collect();
    for window in compact.windows(12) {
        let needle: String = window.iter().collect();
        assert!(!text.contains(&needle), "key material {needle:?} in {text:?}");
    }
}

/// The base64 body of a PEM text (the key material in it).
pub(crate) fn pem_body(pem: &str) -> String {
    pem.lines().filter(|l| !l.starts_with("-----")).collect()
}
