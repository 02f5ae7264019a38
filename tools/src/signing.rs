//! Host-side signing: Ed25519 key files (`kiln keygen`), stamping and signing artifacts
//! (`kiln sign`), checking them as a device does (`kiln verify`), and key records that admit or
//! revoke keys on devices (`kiln admit-key`, `kiln revoke-key`).
//!
//! What is signed is the 32-byte SHA-256 of the artifact body `[0, body_len)`. The header is part
//! of the body, so the model version, the security counter and the target board that
//! [`sign_artifact`] stamps there are covered: changing any of them breaks every signature.
//!
//! ```no_run
//! use kiln::signing::{generate_key, sign_artifact, verify_artifact};
//! # fn main() -> Result<(), kiln::signing::SigningError> {
//! let unsigned = std::fs::read("model.kiln").unwrap();
//! let key = generate_key()?;
//! let signed = sign_artifact(&unsigned, &key, 7, 2, Some("stm32f746-disco"))?;
//! let info = verify_artifact(&signed, &[key.verifying_key().to_bytes()])?;
//! assert_eq!((info.model_version, info.security_counter), (7, 2));
//! # Ok(())
//! # }
//! ```
//!
//! Key file formats, co-signing and key rotation are described in `docs/FORMAT.md`, "Signing".

use crate::artifact::{append_signed_trailer, body_digest, AlignedBytes};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use kiln_device::keys::{
    self, KeyAction, KeyRecord, KEY_RECORD_LEN, PUBLIC_KEY_PREFIX, SECRET_KEY_PREFIX,
};
use kiln_runtime::format::{
    valid_target_name, Container, MAX_SIGNATURES, SIGNATURE_LEN, TARGET_LEN, TRAILER_FIXED_LEN,
};
use kiln_runtime::signature::{key_id, KeyId, KeyIdHex, SignatureError};
use kiln_runtime::{Model, ModelError};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Header offset of the model version.
const VERSION_AT: usize = 16;
/// Header offset of the security counter.
const COUNTER_AT: usize = 20;
/// Header offset of the target board name.
const TARGET_AT: usize = 32;

/// Why signing, verifying or a key file failed. Every message is one line that names what went
/// wrong and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SigningError {
    /// The artifact is malformed, truncated or damaged (its SHA-256 does not match), or the
    /// runtime refuses its graph.
    #[error("{0}")]
    Artifact(ModelError),
    /// The signatures do not verify against the trusted keys.
    #[error("{0}")]
    Signature(SignatureError),
    /// `--target` is not a valid board name.
    #[error("target board `{0}` is not a valid name: use 1 to 16 characters of a-z, 0-9, `.`, `_` and `-` (for example `stm32f746-disco`), or leave --target out for any board")]
    BadTarget(String),
    /// The trailer already holds the most signatures the format allows.
    #[error("the artifact already carries {MAX_SIGNATURES} signatures, the most the format allows; co-sign a copy with fewer signers")]
    TooManySignatures,
    /// The operating system's random number generator failed.
    #[error("cannot get random bytes from the operating system: {0}; try again")]
    Random(String),
    /// A key file exists and `--force` was not given.
    #[error("{} already exists: pass --force to replace it (the old key is lost for good) or choose another name", .path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// Reading or writing a file failed.
    #[error("cannot {action} {}: {error}", .path.display())]
    Io {
        /// `read` or `write`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// A key file does not hold what it should.
    #[error("{}: {reason}", .path.display())]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },
}

impl SigningError {
    /// A stable, machine-readable name of the reason (`kiln verify --json`): `unsigned`,
    /// `untrusted_key`, `bad_signature`, `digest_mismatch`, `truncated`, `malformed`,
    /// `bad_target`, `too_many_signatures`, `random`, `exists`, `io` or `key_file`.
    pub fn code(&self) -> &'static str {
        match self {
            SigningError::Signature(SignatureError::Unsigned) => "unsigned",
            SigningError::Signature(SignatureError::UntrustedKey { .. }) => "untrusted_key",
            SigningError::Signature(SignatureError::BadSignature { .. }) => "bad_signature",
            SigningError::Artifact(ModelError::DigestMismatch) => "digest_mismatch",
            SigningError::Artifact(ModelError::Truncated { .. }) => "truncated",
            SigningError::Artifact(_) => "malformed",
            SigningError::BadTarget(_) => "bad_target",
            SigningError::TooManySignatures => "too_many_signatures",
            SigningError::Random(_) => "random",
            SigningError::Exists { .. } => "exists",
            SigningError::Io { .. } => "io",
            SigningError::KeyFile { .. } => "key_file",
        }
    }
}

type Result<T, E = SigningError> = std::result::Result<T, E>;

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A key id as 16 lower-case hex digits.
pub fn key_id_hex(id: &KeyId) -> String {
    KeyIdHex(id).to_string()
}

/// The key id of a signing key's public half.
pub fn signing_key_id(key: &SigningKey) -> KeyId {
    key_id(&key.verifying_key().to_bytes())
}

// ---------------------------------------------------------------------------------------------
// Key files.

/// A new Ed25519 key from the operating system's random number generator.
///
/// # Errors
/// [`SigningError::Random`] if the generator fails.
pub fn generate_key() -> Result<SigningKey> {
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::fill(seed.as_mut()).map_err(|e| SigningError::Random(e.to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The text of a public key file: `kiln-ed25519-public <64 hex digits> key-id:<16 hex digits>`
/// (everything after the hex is a comment).
pub fn public_key_text(public: &[u8; 32]) -> String {
    format!(
        "{PUBLIC_KEY_PREFIX} {} key-id:{}\n",
        hex(public),
        KeyIdHex(&key_id(public))
    )
}

/// The text of a secret key file: a `#` comment line, then `kiln-ed25519-secret <64 hex digits
/// of the seed>`. The buffer is wiped when dropped.
pub fn secret_key_text(key: &SigningKey) -> Zeroizing<String> {
    // Reserved up front so the string never reallocates and leaves a copy of the seed behind.
    let mut s = Zeroizing::new(String::with_capacity(256));
    let seed = Zeroizing::new(key.to_bytes());
    let _ = writeln!(
        s,
        "# Kiln Ed25519 secret key {}: whoever holds this file can sign models for your devices; keep it private.",
        KeyIdHex(&signing_key_id(key))
    );
    let _ = write!(s, "{SECRET_KEY_PREFIX} ");
    for b in seed.iter() {
        let _ = write!(s, "{b:02x}");
    }
    s.push('\n');
    s
}

/// Where `kiln keygen -o NAME` writes: `NAME.key` and `NAME.pub`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyPaths {
    /// The secret key file (mode 0600).
    pub secret: PathBuf,
    /// The public key file.
    pub public: PathBuf,
}

/// `NAME.key` and `NAME.pub` for `NAME` (a `.key` or `.pub` already on `NAME` is not doubled).
pub fn key_paths(name: &Path) -> KeyPaths {
    let stem = match name.extension().and_then(|e| e.to_str()) {
        Some("key" | "pub") => name.with_extension(""),
        _ => name.to_path_buf(),
    };
    let with = |ext: &str| {
        let mut s = stem.clone().into_os_string();
        s.push(ext);
        PathBuf::from(s)
    };
    KeyPaths {
        secret: with(".key"),
        public: with(".pub"),
    }
}

/// Creates `path` with `mode` (Unix) and writes `data`. Never opens an existing file: with
/// `force` an existing one is removed first, so the new file always gets the mode at creation.
fn write_new_file(path: &Path, data: &[u8], mode: u32, force: bool) -> Result<()> {
    let io = |action, error| SigningError::Io {
        action,
        path: path.to_path_buf(),
        error,
    };
    if force {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("replace", e)),
        }
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            SigningError::Exists {
                path: path.to_path_buf(),
            }
        } else {
            io("create", e)
        }
    })?;
    file.write_all(data).map_err(|e| io("write", e))?;
    file.sync_all().map_err(|e| io("write", e))
}

/// Writes `NAME.key` (created with mode 0600) and `NAME.pub` for `key`, creating missing parent
/// folders (mode 0700).
///
/// # Errors
/// [`SigningError::Exists`] if either file exists and `force` is false (then neither is written);
/// [`SigningError::Io`].
pub fn write_key_pair(name: &Path, key: &SigningKey, force: bool) -> Result<KeyPaths> {
    let paths = key_paths(name);
    if !force {
        for p in [&paths.secret, &paths.public] {
            if std::fs::symlink_metadata(p).is_ok() {
                return Err(SigningError::Exists { path: p.clone() });
            }
        }
    }
    if let Some(dir) = paths.secret.parent().filter(|d| !d.as_os_str().is_empty()) {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            builder.mode(0o700);
        }
        builder.create(dir).map_err(|error| SigningError::Io {
            action: "create",
            path: dir.to_path_buf(),
            error,
        })?;
    }
    let secret = secret_key_text(key);
    write_new_file(&paths.secret, secret.as_bytes(), 0o600, force)?;
    let public = public_key_text(&key.verifying_key().to_bytes());
    write_new_file(&paths.public, public.as_bytes(), 0o644, force)?;
    Ok(paths)
}

fn read_key_file(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|error| SigningError::Io {
            action: "read",
            path: path.to_path_buf(),
            error,
        })
}

/// Loads a secret key file (`NAME.key`, as `kiln keygen` writes it).
///
/// # Errors
/// [`SigningError::Io`], or [`SigningError::KeyFile`] when the file is not a secret key (for
/// example a `.pub` file passed by mistake).
pub fn load_signing_key(path: &Path) -> Result<SigningKey> {
    let bytes = read_key_file(path)?;
    let bad = |reason: String| SigningError::KeyFile {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::str::from_utf8(&bytes).unwrap_or("");
    match keys::parse_secret_key(text) {
        Ok(seed) => {
            let seed = Zeroizing::new(seed);
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(_) if keys::parse_public_key(text).is_ok() => Err(bad(
            "this is a public key; --key needs the secret key file NAME.key that `kiln keygen -o NAME` wrote next to it".into(),
        )),
        Err(e) => Err(bad(e.to_string())),
    }
}

/// Loads a public key file (`NAME.pub`).
///
/// # Errors
/// [`SigningError::Io`], or [`SigningError::KeyFile`] when the file is not a public key or the
/// key is not a valid Ed25519 point.
pub fn load_public_key(path: &Path) -> Result<[u8; 32]> {
    let bytes = read_key_file(path)?;
    let bad = |reason: String| SigningError::KeyFile {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::str::from_utf8(&bytes).unwrap_or("");
    match keys::parse_public_key(text) {
        Ok(public) if VerifyingKey::from_bytes(&public).is_ok() => Ok(public),
        Ok(_) => Err(bad(
            "the 64 hex digits are not a valid Ed25519 public key; copy the .pub file written by `kiln keygen` again".into(),
        )),
        Err(_) if keys::parse_secret_key(text).is_ok() => Err(bad(
            "this is a secret key; pass the public key file NAME.pub instead (and keep the .key private)".into(),
        )),
        Err(e) => Err(bad(e.to_string())),
    }
}

// ---------------------------------------------------------------------------------------------
// Signing and verifying artifacts.

/// The header's target field for `target` (`None` = any board: all zero).
///
/// # Errors
/// [`SigningError::BadTarget`] unless the name passes [`valid_target_name`].
pub fn target_field(target: Option<&str>) -> Result<[u8; TARGET_LEN]> {
    let mut field = [0u8; TARGET_LEN];
    if let Some(name) = target {
        if !valid_target_name(name) {
            return Err(SigningError::BadTarget(name.to_string()));
        }
        field[..name.len()].copy_from_slice(name.as_bytes());
    }
    Ok(field)
}

/// What [`sign`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signed {
    /// The signed artifact.
    pub artifact: Vec<u8>,
    /// The id of the key that signed now.
    pub key_id: KeyId,
    /// Key ids of every signature in the new trailer, in order.
    pub signatures: Vec<KeyId>,
    /// Key ids of earlier signatures by other keys, dropped because stamping changed the body
    /// (those keys must sign again).
    pub dropped: Vec<KeyId>,
    /// Whether the artifact already carried a signature by this key (it is replaced).
    pub replaced: bool,
}

/// Checks an artifact (structure, SHA-256, and everything `Model::load` checks), stamps the
/// model version, security counter and target board into its header, and signs the new body.
///
/// If stamping leaves the body as it was, earlier signatures are kept and this one is added
/// (co-signing; an earlier signature by the same key is replaced). If stamping changed the body,
/// earlier signatures could no longer verify and are dropped ([`Signed::dropped`]).
///
/// # Errors
/// [`SigningError::BadTarget`], [`SigningError::Artifact`] (malformed, damaged or refused by the
/// runtime), [`SigningError::TooManySignatures`].
pub fn sign(
    bytes: &[u8],
    key: &SigningKey,
    version: u32,
    security_counter: u32,
    target: Option<&str>,
) -> Result<Signed> {
    let target = target_field(target)?;
    // Refuse what a device would refuse; signing it would only move the failure to the device.
    let aligned = AlignedBytes::new(bytes);
    Model::load(aligned.as_slice()).map_err(SigningError::Artifact)?;
    let c = Container::parse(bytes).map_err(SigningError::Artifact)?;
    let old_body = c.body();

    let mut out =
        Vec::with_capacity(old_body.len() + TRAILER_FIXED_LEN + MAX_SIGNATURES * SIGNATURE_LEN);
    out.extend_from_slice(old_body);
    out[VERSION_AT..VERSION_AT + 4].copy_from_slice(&version.to_le_bytes());
    out[COUNTER_AT..COUNTER_AT + 4].copy_from_slice(&security_counter.to_le_bytes());
    out[TARGET_AT..TARGET_AT + TARGET_LEN].copy_from_slice(&target);
    let unchanged = out.as_slice() == old_body;

    let id = signing_key_id(key);
    let replaced = c.signatures().any(|r| *r.key_id == id);
    let (mut records, dropped): (Vec<(KeyId, [u8; 64])>, Vec<KeyId>) = if unchanged {
        let kept = c.signatures().map(|r| (*r.key_id, *r.signature)).collect();
        (kept, Vec::new())
    } else {
        let others = c.signatures().map(|r| *r.key_id).filter(|k| *k != id);
        (Vec::new(), others.collect())
    };

    let digest = body_digest(&out);
    let signature = key.sign(&digest).to_bytes();
    let full = records.len() >= MAX_SIGNATURES;
    match records.iter_mut().find(|(k, _)| *k == id) {
        Some(slot) => slot.1 = signature,
        None if full => return Err(SigningError::TooManySignatures),
        None => records.push((id, signature)),
    }
    append_signed_trailer(&mut out, &records);
    Ok(Signed {
        artifact: out,
        key_id: id,
        signatures: records.iter().map(|(k, _)| *k).collect(),
        dropped,
        replaced,
    })
}

/// [`sign`], returning just the signed artifact.
///
/// # Errors
/// As [`sign`].
pub fn sign_artifact(
    bytes: &[u8],
    key: &SigningKey,
    version: u32,
    security_counter: u32,
    target: Option<&str>,
) -> Result<Vec<u8>> {
    sign(bytes, key, version, security_counter, target).map(|s| s.artifact)
}

/// What a verified artifact says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedInfo {
    /// Model version from the header.
    pub model_version: u32,
    /// Security counter from the header.
    pub security_counter: u32,
    /// Target board (`""` = any board).
    pub target: String,
    /// The first trusted key whose signature verified.
    pub key_id: KeyId,
    /// Key ids of every signature in the trailer, trusted or not.
    pub signatures: Vec<KeyId>,
    /// SHA-256 of the body (what the signatures sign).
    pub sha256: [u8; 32],
}

/// Checks an artifact as a device does before installing it: container structure, the SHA-256
/// of the body, then the signatures against `trusted` public keys (every signature by a trusted
/// key must verify, at least one must be there; signatures by other keys are ignored).
///
/// # Errors
/// [`SigningError::Artifact`] (malformed, truncated, digest mismatch) or
/// [`SigningError::Signature`] (unsigned, untrusted key, bad signature).
pub fn verify_artifact(bytes: &[u8], trusted: &[[u8; 32]]) -> Result<VerifiedInfo> {
    let c = Container::parse(bytes).map_err(SigningError::Artifact)?;
    let key_id = c
        .verify_signatures(trusted)
        .map_err(SigningError::Signature)?;
    Ok(VerifiedInfo {
        model_version: c.header.model_version,
        security_counter: c.header.security_counter,
        target: c.header.target_name().to_string(),
        key_id,
        signatures: c.signatures().map(|r| *r.key_id).collect(),
        sha256: *c.digest,
    })
}

// ---------------------------------------------------------------------------------------------
// Key records.

/// A 120-byte key record: `action` (admit or revoke) on `subject`, signed by `signer`. A device
/// applies it (`kiln_device::keys::KeyRing::apply`) only if it already trusts `signer`.
pub fn make_key_record(
    action: KeyAction,
    subject: &[u8; 32],
    signer: &SigningKey,
) -> [u8; KEY_RECORD_LEN] {
    let signer_id = signing_key_id(signer);
    let message = KeyRecord::signed_bytes(action, subject, &signer_id);
    KeyRecord {
        action,
        subject: *subject,
        signer: signer_id,
        signature: signer.sign(&message).to_bytes(),
    }
    .to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn key_texts_round_trip_through_the_device_parsers() {
        let k = key(3);
        let public = k.verifying_key().to_bytes();
        assert_eq!(
            keys::parse_secret_key(&secret_key_text(&k)),
            Ok(k.to_bytes())
        );
        let text = public_key_text(&public);
        assert_eq!(keys::parse_public_key(&text), Ok(public));
        assert!(text.contains(&key_id_hex(&key_id(&public))));
    }

    #[test]
    fn key_paths_append_and_do_not_double_extensions() {
        for name in ["keys/release", "keys/release.key", "keys/release.pub"] {
            let p = key_paths(Path::new(name));
            assert_eq!(p.secret, Path::new("keys/release.key"));
            assert_eq!(p.public, Path::new("keys/release.pub"));
        }
        let p = key_paths(Path::new("v1.2"));
        assert_eq!(p.secret, Path::new("v1.2.key"));
    }

    #[test]
    fn target_field_validates_and_pads() {
        assert_eq!(target_field(None).unwrap(), [0; TARGET_LEN]);
        let f = target_field(Some("mps2-an386")).unwrap();
        assert_eq!(&f[..10], b"mps2-an386");
        assert!(f[10..].iter().all(|&b| b == 0));
        for bad in ["", "Board", "a b", "ü", "seventeen-chars-x"] {
            assert!(
                matches!(target_field(Some(bad)), Err(SigningError::BadTarget(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        let k = key(1);
        for len in [0usize, 1, 63, 64, 200] {
            let junk = vec![0xA5u8; len];
            assert!(sign(&junk, &k, 1, 0, None).is_err());
            assert!(verify_artifact(&junk, &[k.verifying_key().to_bytes()]).is_err());
        }
    }
}
