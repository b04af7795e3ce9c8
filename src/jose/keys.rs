//! Private keys from files: the client-assertion signing key (RFC 7523 `private_key_jwt`)
//! and, through [`read_private_key`], the DPoP key.
//!
//! Accepted: PEM (PKCS#8 "PRIVATE KEY", SEC1 "EC PRIVATE KEY", PKCS#1 "RSA PRIVATE KEY";
//! an "EC PARAMETERS" block next to the key, as `openssl ecparam -genkey` writes, is
//! skipped) and JWK JSON (one private JWK, or a JWK Set holding one private key). Keys are
//! parsed with the typed RustCrypto crates rather than handed to jsonwebtoken as bytes, so
//! that a wrong file says what it holds ("an EC P-384 key", "an X.509 certificate") instead
//! of jsonwebtoken's "invalid key format" at the first token request.

use std::fmt;
use std::path::Path;

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::{alphabet, Engine};
use jsonwebtoken::{Algorithm, EncodingKey};
use p256::pkcs8::der::oid::ObjectIdentifier;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, PrivateKeyInfo};
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
use rsa::traits::PublicKeyParts;
use rsa::BigUint;
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use super::KeyError;

/// A client-assertion signature algorithm (RFC 7518 names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SigningAlg {
    Rs256,
    Ps256,
    Es256,
    EdDsa,
}

impl SigningAlg {
    /// The JOSE name, case-sensitive as RFC 7518 registers it (`RS256`, `PS256`, `ES256`,
    /// `EdDSA`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "RS256" => Some(SigningAlg::Rs256),
            "PS256" => Some(SigningAlg::Ps256),
            "ES256" => Some(SigningAlg::Es256),
            "EdDSA" => Some(SigningAlg::EdDsa),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SigningAlg::Rs256 => "RS256",
            SigningAlg::Ps256 => "PS256",
            SigningAlg::Es256 => "ES256",
            SigningAlg::EdDsa => "EdDSA",
        }
    }

    pub fn jwt_algorithm(self) -> Algorithm {
        match self {
            SigningAlg::Rs256 => Algorithm::RS256,
            SigningAlg::Ps256 => Algorithm::PS256,
            SigningAlg::Es256 => Algorithm::ES256,
            SigningAlg::EdDsa => Algorithm::EdDSA,
        }
    }
}

impl fmt::Display for SigningAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A loaded, checked client-assertion key. Cheap to clone (the key bytes are copied, no
/// parsing). `Debug` prints the algorithm and `kid` only.
#[derive(Clone)]
pub struct SigningKey {
    alg: SigningAlg,
    kid: Option<String>,
    key: EncodingKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey").field("alg", &self.alg).field("kid", &self.kid).finish_non_exhaustive()
    }
}

/// RFC 7518 §3.3: RS256/PS256 keys of fewer bits must not be used, and identity providers
/// refuse them; saying so at load beats an `invalid_client` at the first token request.
const MIN_RSA_BITS: usize = 2048;

impl SigningKey {
    /// PEM (PKCS#8, SEC1 "EC PRIVATE KEY", PKCS#1 "RSA PRIVATE KEY") or a JWK JSON file (a
    /// private JWK, or a JWK Set holding exactly one private key, or one whose `kid` is
    /// `kid`). The alg is `alg` if given, else the JWK's `alg`, else inferred from the key
    /// (RSA→RS256, EC P-256→ES256, Ed25519→EdDSA); it must fit the key (RSA may be PS256).
    /// The kid is `kid` if given, else the JWK's `kid`.
    ///
    /// The key is test-signed once here, so that a key jsonwebtoken would refuse fails at
    /// load (config check, reload) rather than on a token request.
    pub fn load(path: &Path, alg: Option<SigningAlg>, kid: Option<&str>) -> Result<SigningKey, KeyError> {
        let loaded = read_private_key(path, kid)?;
        let invalid = |reason: String| KeyError::Invalid { path: path.to_path_buf(), reason };
        let (inferred, fits) = match &loaded.key {
            FileKey::Rsa(_) => (SigningAlg::Rs256, "RS256 or PS256"),
            FileKey::P256(_) => (SigningAlg::Es256, "ES256"),
            FileKey::Ed25519(_) => (SigningAlg::EdDsa, "EdDSA"),
            FileKey::Unsupported(what) => {
                return Err(invalid(format!(
                    "holds {what}; private_key_jwt signs with an RSA, EC P-256 or Ed25519 key"
                )))
            }
        };
        let jwk_alg = match &loaded.jwk_alg {
            None => None,
            Some(s) => Some(SigningAlg::parse(s).ok_or_else(|| {
                invalid(format!("the JWK's alg {} is not one of RS256, PS256, ES256, EdDSA", printable(s)))
            })?),
        };
        if let (Some(configured), Some(in_jwk)) = (alg, jwk_alg) {
            if configured != in_jwk {
                return Err(invalid(format!("alg {configured} is configured but the JWK says {in_jwk}")));
            }
        }
        let alg = alg.or(jwk_alg).unwrap_or(inferred);
        let fitting = matches!(
            (&loaded.key, alg),
            (FileKey::Rsa(_), SigningAlg::Rs256 | SigningAlg::Ps256)
                | (FileKey::P256(_), SigningAlg::Es256)
                | (FileKey::Ed25519(_), SigningAlg::EdDsa)
        );
        if !fitting {
            return Err(KeyError::AlgMismatch {
                path: path.to_path_buf(),
                alg: alg.as_str(),
                found: loaded.key.describe(),
                fits,
            });
        }
        let key = match &loaded.key {
            FileKey::Rsa(k) => {
                if k.size() * 8 < MIN_RSA_BITS {
                    return Err(invalid(format!(
                        "holds {}; RS256 and PS256 need at least {MIN_RSA_BITS} bits (RFC 7518 §3.3)",
                        loaded.key.describe()
                    )));
                }
                let der = k.to_pkcs1_der().map_err(|_| invalid("cannot re-encode the RSA key".into()))?;
                EncodingKey::from_rsa_der(der.as_bytes())
            }
            FileKey::P256(k) => {
                let der = k.to_pkcs8_der().map_err(|_| invalid("cannot re-encode the EC key".into()))?;
                EncodingKey::from_ec_der(der.as_bytes())
            }
            FileKey::Ed25519(k) => {
                let der = k.to_pkcs8_der().map_err(|_| invalid("cannot re-encode the Ed25519 key".into()))?;
                EncodingKey::from_ed_der(der.as_bytes())
            }
            FileKey::Unsupported(what) => return Err(invalid(format!("holds {what}"))),
        };
        jsonwebtoken::crypto::sign(b"tollgate key probe", &key, alg.jwt_algorithm())
            .map_err(|e| invalid(format!("jsonwebtoken cannot sign {alg} with it ({e})")))?;
        Ok(SigningKey { alg, kid: kid.map(str::to_owned).or(loaded.kid), key })
    }

    pub fn alg(&self) -> SigningAlg {
        self.alg
    }

    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    pub(crate) fn encoding_key(&self) -> &EncodingKey {
        &self.key
    }
}

/// A private key as a file holds it.
pub(crate) enum FileKey {
    Rsa(Box<rsa::RsaPrivateKey>),
    P256(p256::SecretKey),
    Ed25519(Box<ed25519_dalek::SigningKey>),
    /// A well-formed private key of a kind nothing here signs with, described
    /// ("an EC P-384 key") so the caller can say what it needs instead.
    Unsupported(String),
}

impl FileKey {
    pub(crate) fn describe(&self) -> String {
        match self {
            FileKey::Rsa(k) => format!("an RSA key ({} bits)", k.size() * 8),
            FileKey::P256(_) => "an EC P-256 key".to_owned(),
            FileKey::Ed25519(_) => "an Ed25519 key".to_owned(),
            FileKey::Unsupported(what) => what.clone(),
        }
    }
}

pub(crate) struct LoadedKey {
    pub(crate) key: FileKey,
    /// The JWK's `kid` (PEM has none).
    pub(crate) kid: Option<String>,
    /// The JWK's `alg`, unchecked.
    pub(crate) jwk_alg: Option<String>,
}

/// Reads and parses a private key file (PEM or JWK). `want_kid` picks a key out of a JWK
/// Set holding several private keys.
pub(crate) fn read_private_key(path: &Path, want_kid: Option<&str>) -> Result<LoadedKey, KeyError> {
    let bytes = Zeroizing::new(
        std::fs::read(path).map_err(|e| KeyError::Read { path: path.to_path_buf(), reason: e.to_string() })?,
    );
    let invalid = |reason: String| KeyError::Invalid { path: path.to_path_buf(), reason };
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace());
    match start.map(|i| bytes[i]) {
        None => Err(invalid("the file is empty".into())),
        Some(b'{') => parse_jwk_file(&bytes, want_kid).map_err(invalid),
        Some(_) if contains(&bytes, b"-----BEGIN ") => {
            let text = std::str::from_utf8(&bytes).map_err(|_| invalid("a PEM file that is not text".into()))?;
            parse_pem_file(text).map(|key| LoadedKey { key, kid: None, jwk_alg: None }).map_err(invalid)
        }
        Some(0x30) => Err(invalid(
            "looks like binary DER; give the key as PEM (`openssl pkey -inform DER -in KEY -out KEY.pem`) or JWK"
                .into(),
        )),
        Some(_) => Err(invalid("holds neither a PEM private key nor a JWK (JSON)".into())),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Text from a file shown in an error (a PEM label, a JWK's `crv`): short and printable, or
/// not at all, so that an error line cannot be stuffed with file content.
fn printable(s: &str) -> String {
    if !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        format!("\"{s}\"")
    } else {
        "(unprintable)".to_owned()
    }
}

// ---- PEM ----

struct PemBlock {
    label: String,
    /// RFC 1421 headers (`Proc-Type: 4,ENCRYPTED`): a passphrase-protected legacy key.
    encrypted: bool,
    /// None when the body is not base64.
    der: Option<Zeroizing<Vec<u8>>>,
}

fn pem_blocks(text: &str) -> Result<Vec<PemBlock>, String> {
    let lenient = GeneralPurpose::new(
        &alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let mut blocks = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(label) = line.strip_prefix("-----BEGIN ").and_then(|l| l.strip_suffix("-----")) else {
            continue;
        };
        let end = format!("-----END {label}-----");
        let mut body = Zeroizing::new(String::new());
        let mut encrypted = false;
        let mut ended = false;
        for line in lines.by_ref() {
            if line == end {
                ended = true;
                break;
            }
            if line.contains(':') {
                encrypted |= line.contains("ENCRYPTED");
                continue;
            }
            body.push_str(line);
        }
        if !ended {
            return Err(format!("a PEM block labelled {} has no END line", printable(label)));
        }
        let der = lenient.decode(body.as_bytes()).ok().map(Zeroizing::new);
        blocks.push(PemBlock { label: label.to_owned(), encrypted, der });
    }
    Ok(blocks)
}

const PRIVATE_LABELS: &[&str] =
    &["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY", "ENCRYPTED PRIVATE KEY", "OPENSSH PRIVATE KEY"];

fn describe_label(label: &str) -> String {
    match label {
        "CERTIFICATE" | "TRUSTED CERTIFICATE" | "X509 CERTIFICATE" => "an X.509 certificate".to_owned(),
        "PUBLIC KEY" | "RSA PUBLIC KEY" | "EC PUBLIC KEY" => "a public key".to_owned(),
        "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST" => "a certificate signing request".to_owned(),
        "X509 CRL" => "a certificate revocation list".to_owned(),
        "DSA PRIVATE KEY" => "a DSA private key".to_owned(),
        "EC PARAMETERS" => "EC parameters only".to_owned(),
        other => format!("a PEM block labelled {}", printable(other)),
    }
}

fn parse_pem_file(text: &str) -> Result<FileKey, String> {
    let blocks = pem_blocks(text)?;
    let private: Vec<&PemBlock> = blocks.iter().filter(|b| PRIVATE_LABELS.contains(&b.label.as_str())).collect();
    let block = match private.as_slice() {
        [one] => *one,
        [] => {
            let mut found: Vec<String> = blocks.iter().map(|b| describe_label(&b.label)).collect();
            found.dedup();
            return Err(if found.is_empty() {
                "holds no complete PEM block".to_owned()
            } else {
                format!("holds {}, not a private key", found.join(" and "))
            });
        }
        many => return Err(format!("holds {} private keys; keep exactly one in the file", many.len())),
    };
    if block.label == "ENCRYPTED PRIVATE KEY" || block.encrypted {
        return Err("holds a passphrase-protected private key, which is not supported; decrypt it \
                    (`openssl pkey -in KEY -out KEY.pem`) and protect the file instead"
            .to_owned());
    }
    if block.label == "OPENSSH PRIVATE KEY" {
        return Err("holds an OpenSSH private key; convert it to PKCS#8 (`ssh-keygen -p -m PKCS8 -f KEY`)".to_owned());
    }
    let Some(der) = &block.der else {
        return Err(format!("a {} PEM block whose body is not base64", printable(&block.label)));
    };
    match block.label.as_str() {
        "PRIVATE KEY" => parse_pkcs8(der),
        "RSA PRIVATE KEY" => rsa::RsaPrivateKey::from_pkcs1_der(der)
            .map(|k| FileKey::Rsa(Box::new(k)))
            .map_err(|_| "an RSA PRIVATE KEY block that is not a valid PKCS#1 RSA key".to_owned()),
        "EC PRIVATE KEY" => parse_sec1(der),
        other => Err(format!("holds {}", describe_label(other))),
    }
}

const OID_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const OID_RSA_PSS: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.10");
const OID_EC: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
const OID_DSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10040.4.1");

fn curve_name(oid: ObjectIdentifier) -> String {
    match oid.to_string().as_str() {
        "1.2.840.10045.3.1.7" => "P-256".to_owned(),
        "1.3.132.0.34" => "P-384".to_owned(),
        "1.3.132.0.35" => "P-521".to_owned(),
        "1.3.132.0.10" => "secp256k1".to_owned(),
        "1.3.36.3.3.2.8.1.1.7" => "brainpoolP256r1".to_owned(),
        other => format!("curve {other}"),
    }
}

fn parse_pkcs8(der: &[u8]) -> Result<FileKey, String> {
    let info = PrivateKeyInfo::try_from(der).map_err(|_| "a PRIVATE KEY block that is not valid PKCS#8".to_owned())?;
    let oid = info.algorithm.oid;
    if oid == OID_RSA {
        rsa::RsaPrivateKey::from_pkcs8_der(der)
            .map(|k| FileKey::Rsa(Box::new(k)))
            .map_err(|_| "a PKCS#8 RSA key that does not parse".to_owned())
    } else if oid == OID_EC {
        match info.algorithm.parameters_oid() {
            Ok(curve) if curve == OID_P256 => p256::SecretKey::from_pkcs8_der(der)
                .map(FileKey::P256)
                .map_err(|_| "a PKCS#8 EC P-256 key that does not parse".to_owned()),
            Ok(curve) => Ok(FileKey::Unsupported(format!("an EC {} key", curve_name(curve)))),
            Err(_) => Err("a PKCS#8 EC key without a named curve".to_owned()),
        }
    } else if oid == OID_ED25519 {
        ed25519_dalek::SigningKey::from_pkcs8_der(der)
            .map(|k| FileKey::Ed25519(Box::new(k)))
            .map_err(|_| "a PKCS#8 Ed25519 key that does not parse".to_owned())
    } else {
        let what = match oid.to_string().as_str() {
            "1.3.101.113" => "an Ed448 key".to_owned(),
            "1.3.101.110" => "an X25519 key (key agreement only)".to_owned(),
            "1.3.101.111" => "an X448 key (key agreement only)".to_owned(),
            _ if oid == OID_RSA_PSS => "an RSA-PSS-restricted key (export it as a plain RSA key)".to_owned(),
            _ if oid == OID_DSA => "a DSA key".to_owned(),
            other => format!("a private key of algorithm {other}"),
        };
        Ok(FileKey::Unsupported(what))
    }
}

fn parse_sec1(der: &[u8]) -> Result<FileKey, String> {
    let parsed = sec1::EcPrivateKey::try_from(der)
        .map_err(|_| "an EC PRIVATE KEY block that is not a valid SEC1 key".to_owned())?;
    match parsed.parameters.and_then(|p| p.named_curve()) {
        Some(curve) if curve != OID_P256 => Ok(FileKey::Unsupported(format!("an EC {} key", curve_name(curve)))),
        // Without parameters the curve is implied by the key's length; P-256 checks that.
        _ => p256::SecretKey::from_sec1_der(der)
            .map(FileKey::P256)
            .map_err(|_| "an EC PRIVATE KEY block that is not a valid P-256 key".to_owned()),
    }
}

// ---- JWK ----

fn parse_jwk_file(bytes: &[u8], want_kid: Option<&str>) -> Result<LoadedKey, String> {
    let mut value: Value = serde_json::from_slice(bytes).map_err(|e| {
        // serde_json's message can quote the input; line and column cannot.
        format!("looks like JSON but does not parse (line {}, column {})", e.line(), e.column())
    })?;
    let Some(obj) = value.as_object_mut() else {
        return Err("holds JSON that is not a JWK object".to_owned());
    };
    let jwk = if let Some(keys) = obj.get_mut("keys") {
        let Some(keys) = keys.as_array_mut() else {
            return Err("holds a JWK Set whose \"keys\" is not an array".to_owned());
        };
        let total = keys.len();
        let mut private: Vec<&mut Map<String, Value>> =
            keys.iter_mut().filter_map(Value::as_object_mut).filter(|k| k.contains_key("d")).collect();
        let all_private = private.len();
        if all_private > 1 {
            if let Some(kid) = want_kid {
                private.retain(|k| k.get("kid").and_then(Value::as_str) == Some(kid));
            }
        }
        let matching = private.len();
        match (private.pop(), matching) {
            (Some(one), 1) => one,
            (_, 0) if all_private > 0 => {
                return Err(format!(
                    "holds a JWK Set with {all_private} private keys, none with kid {}",
                    printable(want_kid.unwrap_or_default())
                ))
            }
            (_, 0) if total == 0 => return Err("holds an empty JWK Set".to_owned()),
            (_, 0) => {
                return Err(format!(
                    "holds a JWK Set with {total} public key(s) and no private key (no \"d\"); signing needs the private key"
                ))
            }
            (_, n) => {
                return Err(format!(
                    "holds a JWK Set with {n} private keys; keep exactly one, or set kid to choose"
                ))
            }
        }
    } else {
        obj
    };
    parse_jwk(jwk)
}

fn b64url() -> GeneralPurpose {
    GeneralPurpose::new(
        &alphabet::URL_SAFE,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    )
}

/// Removes a base64url member and decodes it; the JSON string is wiped with it.
fn take_b64(jwk: &mut Map<String, Value>, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
    match jwk.remove(name) {
        None => Ok(None),
        Some(Value::String(s)) => {
            let s = Zeroizing::new(s);
            b64url()
                .decode(s.as_bytes())
                .map(|v| Some(Zeroizing::new(v)))
                .map_err(|_| format!("JWK member \"{name}\" is not base64url"))
        }
        Some(_) => Err(format!("JWK member \"{name}\" is not a string")),
    }
}

fn need_b64(jwk: &mut Map<String, Value>, name: &str, what: &str) -> Result<Zeroizing<Vec<u8>>, String> {
    take_b64(jwk, name)?.ok_or_else(|| format!("holds {what} without \"{name}\""))
}

fn parse_jwk(jwk: &mut Map<String, Value>) -> Result<LoadedKey, String> {
    let text = |jwk: &Map<String, Value>, name: &str| jwk.get(name).and_then(Value::as_str).map(str::to_owned);
    let kid = text(jwk, "kid");
    let jwk_alg = text(jwk, "alg");
    if text(jwk, "use").as_deref() == Some("enc") {
        return Err("holds a JWK marked \"use\": \"enc\" (encryption), not a signing key".to_owned());
    }
    let kty = text(jwk, "kty").ok_or_else(|| "holds JSON without \"kty\"; not a JWK".to_owned())?;
    let crv = text(jwk, "crv").unwrap_or_default();
    if kty == "oct" {
        return Err(
            "holds a symmetric (kty \"oct\") JWK; a shared secret is client_secret_jwt, not a key file".to_owned()
        );
    }
    if !jwk.contains_key("d") {
        return Err(format!("holds a public {} JWK (no \"d\"); signing needs the private key", printable(&kty)));
    }
    let key = match (kty.as_str(), crv.as_str()) {
        ("RSA", _) => {
            let n = need_b64(jwk, "n", "an RSA JWK")?;
            let e = need_b64(jwk, "e", "an RSA JWK")?;
            let d = need_b64(jwk, "d", "an RSA JWK")?;
            let primes = match (take_b64(jwk, "p")?, take_b64(jwk, "q")?) {
                (Some(p), Some(q)) => vec![BigUint::from_bytes_be(&p), BigUint::from_bytes_be(&q)],
                _ => Vec::new(),
            };
            let key = rsa::RsaPrivateKey::from_components(
                BigUint::from_bytes_be(&n),
                BigUint::from_bytes_be(&e),
                BigUint::from_bytes_be(&d),
                primes,
            )
            .map_err(|_| "holds an RSA JWK whose members do not form a valid key".to_owned())?;
            FileKey::Rsa(Box::new(key))
        }
        ("EC", "P-256") => {
            let d = need_b64(jwk, "d", "an EC JWK")?;
            if d.len() != 32 {
                return Err("holds an EC P-256 JWK whose \"d\" is not 32 bytes".to_owned());
            }
            let key = p256::SecretKey::from_slice(&d)
                .map_err(|_| "holds an EC P-256 JWK whose \"d\" is not a valid scalar".to_owned())?;
            let point = p256::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&key.public_key(), false);
            let (x, y) = (take_b64(jwk, "x")?, take_b64(jwk, "y")?);
            let differs = |given: Option<Zeroizing<Vec<u8>>>, actual: Option<&p256::FieldBytes>| {
                given.is_some_and(|g| actual.is_none_or(|a| g.as_slice() != &a[..]))
            };
            if differs(x, point.x()) || differs(y, point.y()) {
                return Err("holds an EC P-256 JWK whose \"x\"/\"y\" do not match its \"d\"".to_owned());
            }
            FileKey::P256(key)
        }
        ("EC", other) => FileKey::Unsupported(format!("an EC {} key (JWK)", printable(other))),
        ("OKP", "Ed25519") => {
            let d = need_b64(jwk, "d", "an Ed25519 JWK")?;
            let bytes: &[u8; 32] =
                d.as_slice().try_into().map_err(|_| "holds an Ed25519 JWK whose \"d\" is not 32 bytes".to_owned())?;
            let key = ed25519_dalek::SigningKey::from_bytes(bytes);
            if take_b64(jwk, "x")?.is_some_and(|x| x.as_slice() != key.verifying_key().as_bytes()) {
                return Err("holds an Ed25519 JWK whose \"x\" does not match its \"d\"".to_owned());
            }
            FileKey::Ed25519(Box::new(key))
        }
        ("OKP", other) => FileKey::Unsupported(format!("an OKP {} key (JWK)", printable(other))),
        (other, _) => FileKey::Unsupported(format!("a JWK of kty {}", printable(other))),
    };
    Ok(LoadedKey { key, kid, jwk_alg })
}

#[cfg(test)]
mod tests {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    use rsa::pkcs8::EncodePrivateKey as _;
    use rsa::traits::PrivateKeyParts;

    use super::*;
    use crate::jose::test_support::*;

    fn p256_pem() -> String {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key").serialize_pem()
    }

    fn ed25519_pem() -> String {
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("Ed25519 key").serialize_pem()
    }

    fn rsa_pkcs1_pem(key: &rsa::RsaPrivateKey) -> String {
        pem("RSA PRIVATE KEY", key.to_pkcs1_der().expect("PKCS#1").as_bytes())
    }

    fn rsa_jwk(key: &rsa::RsaPrivateKey) -> serde_json::Value {
        let primes = key.primes();
        serde_json::json!({
            "kty": "RSA",
            "n": b64u(&key.n().to_bytes_be()),
            "e": b64u(&key.e().to_bytes_be()),
            "d": b64u(&key.d().to_bytes_be()),
            "p": b64u(&primes[0].to_bytes_be()),
            "q": b64u(&primes[1].to_bytes_be()),
        })
    }

    fn p256_jwk(key: &p256::SecretKey) -> serde_json::Value {
        let point = key.public_key().to_encoded_point(false);
        serde_json::json!({
            "kty": "EC", "crv": "P-256",
            "x": b64u(point.x().expect("x")), "y": b64u(point.y().expect("y")),
            "d": b64u(&key.to_bytes()),
        })
    }

    fn load(path: &Path) -> Result<SigningKey, KeyError> {
        SigningKey::load(path, None, None)
    }

    fn err_text(result: Result<SigningKey, KeyError>) -> String {
        match result {
            Ok(k) => panic!("loaded {k:?}, expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn alg_names_round_trip() {
        for alg in [SigningAlg::Rs256, SigningAlg::Ps256, SigningAlg::Es256, SigningAlg::EdDsa] {
            assert_eq!(SigningAlg::parse(alg.as_str()), Some(alg));
        }
        assert_eq!(SigningAlg::parse("HS256"), None);
        assert_eq!(SigningAlg::parse("es256"), None, "JOSE alg names are case-sensitive");
    }

    #[test]
    fn pem_keys_of_each_type_load_with_the_inferred_alg() {
        let dir = Dir::new();
        let ec = load(&dir.write("ec.pem", p256_pem())).expect("PKCS#8 P-256");
        assert_eq!((ec.alg(), ec.kid()), (SigningAlg::Es256, None));
        let ed = load(&dir.write("ed.pem", ed25519_pem())).expect("PKCS#8 Ed25519");
        assert_eq!(ed.alg(), SigningAlg::EdDsa);

        let rsa_key = rsa_2048();
        let pkcs1 = dir.write("rsa1.pem", rsa_pkcs1_pem(rsa_key));
        assert_eq!(load(&pkcs1).expect("PKCS#1 RSA").alg(), SigningAlg::Rs256);
        let ps = SigningKey::load(&pkcs1, Some(SigningAlg::Ps256), Some("rsa-kid")).expect("RSA as PS256");
        assert_eq!((ps.alg(), ps.kid()), (SigningAlg::Ps256, Some("rsa-kid")));
        let pkcs8 = pem("PRIVATE KEY", rsa_key.to_pkcs8_der().expect("PKCS#8").as_bytes());
        assert_eq!(load(&dir.write("rsa8.pem", pkcs8)).expect("PKCS#8 RSA").alg(), SigningAlg::Rs256);

        // SEC1, alone and after the "EC PARAMETERS" block `openssl ecparam -genkey` writes.
        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let sec1 = pem("EC PRIVATE KEY", secret.to_sec1_der().expect("SEC1").as_slice());
        assert_eq!(load(&dir.write("sec1.pem", &sec1)).expect("SEC1 P-256").alg(), SigningAlg::Es256);
        let params = pem("EC PARAMETERS", &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]);
        let both = format!("{params}{}", sec1.replace('\n', "\r\n"));
        assert_eq!(load(&dir.write("ecparam.pem", both)).expect("params + SEC1, CRLF").alg(), SigningAlg::Es256);
    }

    #[test]
    fn jwk_files_load_with_their_kid_and_alg() {
        let dir = Dir::new();
        let mut rsa = rsa_jwk(rsa_2048());
        rsa["kid"] = "rsa-1".into();
        rsa["alg"] = "PS256".into();
        let key = load(&dir.write("rsa.jwk", rsa.to_string())).expect("RSA JWK");
        assert_eq!((key.alg(), key.kid()), (SigningAlg::Ps256, Some("rsa-1")));

        // Without p and q the primes are recovered from n, e, d.
        let mut bare = rsa_jwk(rsa_2048());
        bare.as_object_mut().map(|o| (o.remove("p"), o.remove("q")));
        assert_eq!(
            load(&dir.write("bare.jwk", bare.to_string())).expect("RSA JWK without primes").alg(),
            SigningAlg::Rs256
        );

        let ec = p256_jwk(&p256::SecretKey::random(&mut rand::rngs::OsRng));
        let key = SigningKey::load(&dir.write("ec.jwk", ec.to_string()), None, Some("from-config")).expect("EC JWK");
        assert_eq!((key.alg(), key.kid()), (SigningAlg::Es256, Some("from-config")));

        let ed = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let okp = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed",
            "x": b64u(ed.verifying_key().as_bytes()), "d": b64u(&ed.to_bytes())});
        let key = load(&dir.write("ed.jwk", okp.to_string())).expect("OKP JWK");
        assert_eq!((key.alg(), key.kid()), (SigningAlg::EdDsa, Some("ed")));

        // A JWK Set: public keys are skipped, the one private key is used.
        let mut public = ec.clone();
        public.as_object_mut().map(|o| o.remove("d"));
        let mut private = ec.clone();
        private["kid"] = "the-one".into();
        let set = serde_json::json!({ "keys": [public, private] });
        let key = load(&dir.write("set.jwks", set.to_string())).expect("JWK Set with one private key");
        assert_eq!(key.kid(), Some("the-one"));
    }

    #[test]
    fn a_jwk_set_with_two_private_keys_needs_a_kid() {
        let dir = Dir::new();
        let mut a = p256_jwk(&p256::SecretKey::random(&mut rand::rngs::OsRng));
        a["kid"] = "a".into();
        let mut b = p256_jwk(&p256::SecretKey::random(&mut rand::rngs::OsRng));
        b["kid"] = "b".into();
        let path = dir.write("two.jwks", serde_json::json!({ "keys": [a, b] }).to_string());
        let text = err_text(load(&path));
        assert!(text.contains("2 private keys") && text.contains("kid"), "{text}");
        assert_eq!(SigningKey::load(&path, None, Some("b")).expect("chosen by kid").kid(), Some("b"));
        let text = err_text(SigningKey::load(&path, None, Some("c")));
        assert!(text.contains("2 private keys, none with kid \"c\""), "{text}");
    }

    #[test]
    fn the_alg_must_fit_the_key() {
        let dir = Dir::new();
        let ec = dir.write("ec.pem", p256_pem());
        let err = SigningKey::load(&ec, Some(SigningAlg::Rs256), None).expect_err("P-256 cannot sign RS256");
        assert!(matches!(err, KeyError::AlgMismatch { alg: "RS256", fits: "ES256", .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("RS256") && text.contains("EC P-256 key") && text.contains(&*ec.to_string_lossy()),
            "{text}"
        );

        let ed = dir.write("ed.pem", ed25519_pem());
        assert!(matches!(SigningKey::load(&ed, Some(SigningAlg::Es256), None), Err(KeyError::AlgMismatch { .. })));
        let rsa = dir.write("rsa.pem", rsa_pkcs1_pem(rsa_2048()));
        assert!(matches!(SigningKey::load(&rsa, Some(SigningAlg::EdDsa), None), Err(KeyError::AlgMismatch { .. })));

        let mut jwk = rsa_jwk(rsa_2048());
        jwk["alg"] = "RS256".into();
        let path = dir.write("rsa.jwk", jwk.to_string());
        let text = err_text(SigningKey::load(&path, Some(SigningAlg::Ps256), None));
        assert!(text.contains("PS256 is configured but the JWK says RS256"), "{text}");
        jwk["alg"] = "RS512".into();
        let text = err_text(load(&dir.write("rs512.jwk", jwk.to_string())));
        assert!(text.contains("\"RS512\" is not one of"), "{text}");
    }

    #[test]
    fn a_missing_file_names_the_path() {
        let dir = Dir::new();
        let path = dir.path("nowhere/key.pem");
        let err = load(&path).expect_err("missing file");
        assert!(matches!(err, KeyError::Read { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(&*path.to_string_lossy()) && text.contains("cannot read key file"), "{text}");
    }

    #[test]
    fn wrong_files_say_what_they_hold() {
        let dir = Dir::new();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
        let cases: Vec<(&str, String, &str)> = vec![
            ("cert.pem", cert.cert.pem(), "holds an X.509 certificate, not a private key"),
            ("pub.pem", cert.signing_key.public_key_pem(), "holds a public key, not a private key"),
            ("garbage", "hello, this is not a key\n".to_owned(), "neither a PEM private key nor a JWK"),
            ("empty", "\n".to_owned(), "the file is empty"),
            ("der", "\u{30}\u{82}\u{01}".to_owned(), "binary DER"),
            ("bad-b64.pem", "-----BEGIN PRIVATE KEY-----\n%%%%\n-----END PRIVATE KEY-----\n".to_owned(), "not base64"),
            ("bad-der.pem", pem("PRIVATE KEY", b"not der at all"), "not valid PKCS#8"),
            ("cut.pem", "-----BEGIN PRIVATE KEY-----\nMIGH\n".to_owned(), "has no END line"),
            ("enc.pem", pem("ENCRYPTED PRIVATE KEY", b"x"), "passphrase-protected"),
            (
                "legacy-enc.pem",
                "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----\n"
                    .to_owned(),
                "passphrase-protected",
            ),
            ("ssh", pem("OPENSSH PRIVATE KEY", b"openssh-key-v1"), "OpenSSH private key"),
            ("two.pem", format!("{}{}", p256_pem(), p256_pem()), "holds 2 private keys"),
            (
                "p384.pem",
                rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("P-384").serialize_pem(),
                "holds an EC P-384 key; private_key_jwt signs with an RSA, EC P-256 or Ed25519 key",
            ),
            ("json", "{\"hello\": 1}".to_owned(), "without \"kty\""),
            ("broken.json", "{\"kty\": ".to_owned(), "does not parse (line 1"),
            ("oct.jwk", r#"{"kty":"oct","k":"c2VjcmV0"}"#.to_owned(), "symmetric"),
            ("public.jwk", r#"{"kty":"EC","crv":"P-256","x":"AA","y":"AA"}"#.to_owned(), "public \"EC\" JWK"),
            ("p384.jwk", r#"{"kty":"EC","crv":"P-384","d":"AA"}"#.to_owned(), "EC \"P-384\" key (JWK)"),
            ("enc.jwk", r#"{"kty":"EC","crv":"P-256","use":"enc","d":"AA"}"#.to_owned(), "not a signing key"),
            ("publics.jwks", r#"{"keys":[{"kty":"EC","crv":"P-256","x":"AA","y":"AA"}]}"#.to_owned(), "no private key"),
        ];
        for (name, contents, expected) in cases {
            let path = dir.write(name, contents);
            let text = err_text(load(&path));
            assert!(text.contains(expected), "{name}: {text:?} lacks {expected:?}");
            assert!(text.contains(&*path.to_string_lossy()), "{name}: {text:?} lacks the path");
        }
    }

    #[test]
    fn small_rsa_keys_are_refused() {
        let dir = Dir::new();
        let small = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 1024).expect("1024-bit key");
        let text = err_text(load(&dir.write("small.pem", rsa_pkcs1_pem(&small))));
        assert!(text.contains("RSA key (1024 bits)") && text.contains("at least 2048"), "{text}");
    }

    #[test]
    fn errors_and_debug_carry_no_key_material() {
        let dir = Dir::new();
        let ec_pem = p256_pem();
        let ec = dir.write("ec.pem", &ec_pem);
        let ok = load(&ec).expect("P-256");
        let mismatch = SigningKey::load(&ec, Some(SigningAlg::Ps256), None).expect_err("mismatch");
        for text in [format!("{ok:?}"), format!("{mismatch:?}"), mismatch.to_string()] {
            assert_no_material(&text, &pem_body(&ec_pem));
        }

        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let mut jwk = p256_jwk(&secret);
        let d = jwk["d"].as_str().expect("d").to_owned();
        let hex: String = secret.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
        jwk["x"] = jwk["y"].clone(); // x no longer matches d
        let bad_x = load(&dir.write("bad-x.jwk", jwk.to_string())).expect_err("x/y do not match");
        jwk["d"] = serde_json::Value::from(format!("{d}!!")); // not base64url
        let bad_d = load(&dir.write("bad-d.jwk", jwk.to_string())).expect_err("bad d");
        jwk["d"] = serde_json::json!({ "nested": d }); // not a string: serde_json would quote it
        let nested = load(&dir.write("nested.jwk", jwk.to_string())).expect_err("d not a string");
        let mut broken = p256_jwk(&secret).to_string();
        broken.truncate(broken.len() - 2);
        let syntax = load(&dir.write("broken.jwk", &broken)).expect_err("truncated JSON");
        for err in [bad_x, bad_d, nested, syntax] {
            for text in [format!("{err:?}"), err.to_string()] {
                assert_no_material(&text, &d);
                assert_no_material(&text, &hex);
            }
        }

        let rsa_pem = rsa_pkcs1_pem(rsa_2048());
        let rsa = load(&dir.write("rsa.pem", &rsa_pem)).expect("RSA");
        assert_eq!(format!("{rsa:?}"), "SigningKey { alg: Rs256, kid: None, .. }");
        let text = err_text(SigningKey::load(&dir.write("rsa2.pem", &rsa_pem), Some(SigningAlg::Es256), None));
        assert_no_material(&text, &pem_body(&rsa_pem));
    }
}
