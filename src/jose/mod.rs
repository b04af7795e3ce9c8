//! JOSE for outgoing requests: client assertions (RFC 7523 `private_key_jwt` and
//! `client_secret_jwt`) and DPoP proofs (RFC 9449).
//!
//! This module knows nothing of config or providers: it turns key files into prepared
//! signers and signs. Keys are parsed and checked once, at load, so that a wrong key type
//! or an unreadable file is a config error naming the file, and so that nothing on the
//! request path parses a key.
//!
//! Nothing here prints key material: [`KeyError`] carries the path and a description of
//! what the file holds ("an EC P-384 key", "an X.509 certificate"), never its bytes, and
//! the key types' `Debug` print the algorithm, `kid` or thumbprint only.

pub mod assertion;
pub mod dpop;
pub mod keys;
#[cfg(test)]
mod test_support;

use std::path::PathBuf;

pub use assertion::{client_secret_jwt, private_key_jwt, ASSERTION_TYPE};
pub use dpop::{ath, DpopKey};
pub use keys::{SigningAlg, SigningKey};

/// Why a key could not be loaded or used. Never carries key material: `path` is the file
/// named in config, `reason` and `found` are written by this module (parser messages that
/// could echo input are not passed through).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read (missing, permissions, a directory).
    #[error("cannot read key file {}: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    /// The file was read but does not hold a usable private key.
    #[error("key file {}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    /// The key is fine but cannot sign with the configured algorithm.
    #[error("key file {}: alg {alg} does not fit the key it holds ({found}; that key signs {fits})", path.display())]
    AlgMismatch { path: PathBuf, alg: &'static str, found: String, fits: &'static str },
    /// Signing failed (jsonwebtoken refused the prepared key; should not happen for a key
    /// that loaded, since loading signs a probe).
    #[error("signing a {alg} assertion failed: {reason}")]
    Sign { alg: &'static str, reason: String },
}

/// Seconds since the epoch (0 if the clock is before it, which no verifier will accept
/// anyway and which must not panic).
pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Appends a `jti`: 128 random bits, base64url (22 characters).
///
/// From `rand::thread_rng()`: ChaCha12 seeded from the OS and reseeded periodically, one
/// per thread, so it costs a few nanoseconds and no lock on the request path while staying
/// unpredictable (a verifier's replay cache cannot be pre-filled by guessing) and unique in
/// practice (a repeat among 2^40 proofs has probability below 2^-48).
pub(crate) fn jti(out: &mut String) {
    use base64::Engine;
    use rand::Rng;
    let bits: u128 = rand::thread_rng().gen();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(bits.to_le_bytes(), out);
}
