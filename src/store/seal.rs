//! Sealing of what tollgate writes to a shared store (Redis), so that a dump of the
//! store, a replica's memory or a backup reveals no usable token.
//!
//! A record is sealed with XChaCha20-Poly1305 (an AEAD: confidentiality and integrity)
//! under the first configured key, with a random 192-bit nonce (large enough that random
//! nonces never repeat in practice, unlike the 96-bit nonce of plain ChaCha20-Poly1305).
//! The associated data binds the record to where it is stored (the key prefix and the
//! provider identity): a record copied under another provider's key fails to open, so
//! whoever can write to Redis cannot make one provider inject another one's token.
//!
//! Rotation: every configured key opens, the first seals. A record names the key that
//! sealed it by a key id (a hash of the key, not the key), so opening does not try every
//! key, and a record sealed under a key that is no longer configured is reported as such.
//!
//! Record format (text, so `redis-cli` shows it without mangling a terminal):
//! `tg1.<key id: 16 hex>.<base64 of nonce ‖ ciphertext ‖ tag>`.

use base64::Engine as _;
use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::secret::Secret;

/// Bytes of an encryption key.
pub const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const FORMAT: &str = "tg1";
/// Domain separation for the associated data (a future format changes this).
const AAD_DOMAIN: &[u8] = b"tollgate/redis/v1\0";

/// Why a record did not open. None of these carry the record's contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Not a record this version of tollgate writes (another program's value, or a
    /// truncated one).
    #[error("not a sealed tollgate record")]
    Malformed,
    /// Sealed under a key that is not configured (rotated out too early, or another
    /// deployment sharing the key prefix with other keys).
    #[error("sealed under key id {0}, which is not among the configured encryption keys")]
    UnknownKey(String),
    /// The key is known but the record does not authenticate: it was sealed for another
    /// identity (moved between keys) or altered.
    #[error("does not authenticate under key id {0}: sealed for another provider identity, or altered")]
    Forged(String),
}

struct SealKey {
    id: [u8; 8],
    cipher: XChaCha20Poly1305,
}

/// The configured encryption keys: the first seals, all open.
pub struct Sealer {
    keys: Vec<SealKey>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer").field("key_ids", &self.key_ids()).finish()
    }
}

/// Decode one configured key. The error names what is wrong, never the value.
fn decode_key(key: &Secret) -> Result<Zeroizing<Vec<u8>>, String> {
    let text = key.expose().trim();
    let engines = [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::STANDARD_NO_PAD,
        &base64::engine::general_purpose::URL_SAFE,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    let bytes = engines
        .iter()
        .find_map(|e| e.decode(text).ok())
        .map(Zeroizing::new)
        .ok_or_else(|| "is not base64 (generate one with `openssl rand -base64 32`)".to_string())?;
    if bytes.len() != KEY_LEN {
        return Err(format!(
            "decodes to {} bytes; an encryption key is {KEY_LEN} random bytes, base64 (`openssl rand -base64 32`)",
            bytes.len()
        ));
    }
    if bytes.iter().all(|b| *b == bytes[0]) {
        return Err("is one byte repeated, not a random key (`openssl rand -base64 32`)".to_string());
    }
    Ok(bytes)
}

/// Check one encryption key: base64 of 32 bytes. The message says what is wrong without
/// echoing the key.
pub fn validate_key(key: &Secret) -> Result<(), String> {
    decode_key(key).map(|_| ())
}

/// Check the list of keys: at least one, each valid, no key twice (a duplicate is
/// usually a rotation step done wrong). Messages name keys by position (1-based).
pub fn validate_keys(keys: &[Secret]) -> Result<(), String> {
    Sealer::new(keys).map(|_| ())
}

fn key_id(key: &[u8]) -> [u8; 8] {
    let digest = Sha256::new().chain_update(b"tollgate/redis/key-id\0").chain_update(key).finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&digest[..8]);
    id
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the associated data binds a record to: its kind (`token`, `pending`), the key
/// prefix and the provider identity.
pub fn associated_data(kind: &str, prefix: &str, identity: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_DOMAIN.len() + kind.len() + prefix.len() + identity.len() + 2);
    aad.extend_from_slice(AAD_DOMAIN);
    aad.extend_from_slice(kind.as_bytes());
    aad.push(0);
    aad.extend_from_slice(prefix.as_bytes());
    aad.push(0);
    aad.extend_from_slice(identity.as_bytes());
    aad
}

/// Random bytes from the operating system, hex-encoded (lease fencing values).
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    OsRng.fill_bytes(&mut buf);
    hex(&buf)
}

impl Sealer {
    /// Build from the configured keys (first seals). Errors name the key by position.
    pub fn new(keys: &[Secret]) -> Result<Self, String> {
        if keys.is_empty() {
            return Err("no encryption key: at least one is needed (`openssl rand -base64 32`)".to_string());
        }
        let mut out: Vec<SealKey> = Vec::with_capacity(keys.len());
        for (i, key) in keys.iter().enumerate() {
            let bytes = decode_key(key).map_err(|e| format!("encryption key {} {e}", i + 1))?;
            let id = key_id(&bytes);
            if let Some(j) = out.iter().position(|k| k.id == id) {
                return Err(format!("encryption keys {} and {} are the same key", j + 1, i + 1));
            }
            let cipher = XChaCha20Poly1305::new_from_slice(&bytes)
                .map_err(|_| format!("encryption key {} has the wrong length", i + 1))?;
            out.push(SealKey { id, cipher });
        }
        Ok(Sealer { keys: out })
    }

    /// The ids of the configured keys, in order (safe to log: a hash of the key).
    pub fn key_ids(&self) -> Vec<String> {
        self.keys.iter().map(|k| hex(&k.id)).collect()
    }

    /// Seal `plaintext` under the first key, bound to `aad`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> String {
        let key = &self.keys[0];
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        // Encryption fails only for messages longer than the cipher's limit (256 GiB).
        let sealed = key.cipher.encrypt(&nonce, Payload { msg: plaintext, aad }).unwrap_or_default();
        let mut body = Vec::with_capacity(NONCE_LEN + sealed.len());
        body.extend_from_slice(&nonce);
        body.extend_from_slice(&sealed);
        format!("{FORMAT}.{}.{}", hex(&key.id), base64::engine::general_purpose::STANDARD_NO_PAD.encode(&body))
    }

    /// Open a record sealed by [`Sealer::seal`] under any configured key, checking `aad`.
    pub fn open(&self, aad: &[u8], record: &[u8]) -> Result<Zeroizing<Vec<u8>>, OpenError> {
        let text = std::str::from_utf8(record).map_err(|_| OpenError::Malformed)?;
        let mut parts = text.splitn(3, '.');
        let (Some(FORMAT), Some(kid), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(OpenError::Malformed);
        };
        if kid.len() != 16 || !kid.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(OpenError::Malformed);
        }
        let key = self.keys.iter().find(|k| hex(&k.id) == kid).ok_or_else(|| OpenError::UnknownKey(kid.into()))?;
        let body = base64::engine::general_purpose::STANDARD_NO_PAD.decode(body).map_err(|_| OpenError::Malformed)?;
        if body.len() < NONCE_LEN + TAG_LEN {
            return Err(OpenError::Malformed);
        }
        let (nonce, sealed) = body.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| OpenError::Malformed)?;
        key.cipher
            .decrypt(&XNonce::from(nonce), Payload { msg: sealed, aad })
            .map(Zeroizing::new)
            .map_err(|_| OpenError::Forged(kid.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> Secret {
        let mut bytes = [byte; KEY_LEN];
        bytes[0] = byte.wrapping_add(1);
        Secret::new(base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    #[test]
    fn seals_and_opens_bound_to_the_identity() {
        let s = Sealer::new(&[key(1)]).unwrap();
        let aad = associated_data("token", "tg:", "abc");
        let rec = s.seal(&aad, b"the token");
        assert!(!rec.contains("the token"));
        assert_eq!(&s.open(&aad, rec.as_bytes()).unwrap()[..], b"the token");
        // Two seals of the same plaintext differ (random nonce).
        assert_ne!(rec, s.seal(&aad, b"the token"));
        let other = associated_data("token", "tg:", "abd");
        assert!(matches!(s.open(&other, rec.as_bytes()), Err(OpenError::Forged(_))));
        let pending = associated_data("pending", "tg:", "abc");
        assert!(matches!(s.open(&pending, rec.as_bytes()), Err(OpenError::Forged(_))));
        // Any altered byte of the body fails.
        let mut bad = rec.clone().into_bytes();
        let last = bad.len() - 2;
        bad[last] = if bad[last] == b'A' { b'B' } else { b'A' };
        assert!(s.open(&aad, &bad).is_err());
        assert_eq!(s.open(&aad, b"plain"), Err(OpenError::Malformed));
    }

    #[test]
    fn rotation_all_keys_open_the_first_seals() {
        let old = Sealer::new(&[key(1)]).unwrap();
        let aad = associated_data("token", "tg:", "abc");
        let rec = old.seal(&aad, b"x");
        let rotated = Sealer::new(&[key(2), key(1)]).unwrap();
        assert_eq!(&rotated.open(&aad, rec.as_bytes()).unwrap()[..], b"x");
        let new_rec = rotated.seal(&aad, b"y");
        assert!(new_rec.contains(&rotated.key_ids()[0]));
        assert!(matches!(old.open(&aad, new_rec.as_bytes()), Err(OpenError::UnknownKey(_))));
        let unrelated = Sealer::new(&[key(3)]).unwrap();
        assert!(matches!(unrelated.open(&aad, rec.as_bytes()), Err(OpenError::UnknownKey(_))));
    }

    #[test]
    fn validation_names_the_problem_not_the_key() {
        for (bad, want) in [
            ("not base64 at all!", "not base64"),
            ("c2hvcnQ=", "decodes to 5 bytes"),
            ("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "one byte repeated"),
        ] {
            let e = validate_key(&Secret::new(bad)).unwrap_err();
            assert!(e.contains(want), "{e}");
            assert!(!e.contains(bad), "echoed the key: {e}");
        }
        assert!(validate_key(&key(7)).is_ok());
        assert!(validate_keys(&[]).unwrap_err().contains("no encryption key"));
        let e = validate_keys(&[key(1), key(2), key(1)]).unwrap_err();
        assert!(e.contains("keys 1 and 3"), "{e}");
        let e = validate_keys(&[key(1), Secret::new("zz")]).unwrap_err();
        assert!(e.starts_with("encryption key 2 "), "{e}");
    }
}
