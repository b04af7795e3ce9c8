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
        if private.len() > 1 {
            if let Some(kid) = want_kid {
                private.retain(|k| k.get("kid").and_then(Value::as_str) == Some(kid));
            }
        }
        match private.len() {
            1 => private.pop().ok_or_else(|| "unreachable".to_owned())?,
            0 if total == 0 => return Err("holds an empty JWK Set".to_owned()),
            0 => {
                return Err(format!(
                    "holds a JWK Set with {total} public key(s) and no private key (no \"d\"); signing needs the private key"
                ))
            }
            n => {
                return Err(format!(
                    "holds a JWK Set with {n} private keys{}; keep exactly one, or set kid to choose",
                    if want_kid.is_some() { " matching the kid" } else { "" }
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
