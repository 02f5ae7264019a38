//! Trusted keys: the text form of public keys, key records that admit or revoke a key, and the
//! device's key ring.
//!
//! A device trusts the keys compiled into its image plus those admitted later by a **key record**:
//! a 120-byte statement "admit (or revoke) public key K", signed by a key the device already
//! trusts. That is how keys rotate without reflashing firmware.
//!
//! ```text
//! offset size field
//! 0      4    magic "KKEY"
//! 4      2    record format version (1)
//! 6      2    action: 1 = admit, 2 = revoke
//! 8      8    reserved (0)
//! 16     32   subject: the Ed25519 public key admitted or revoked
//! 48     8    signer key id (first 8 bytes of SHA-256 of the signer's public key)
//! 56     64   Ed25519 signature by the signer over bytes [0, 56)
//! ```
//! The signed message is 56 bytes starting with `KKEY`, so it can never be mistaken for an
//! artifact signature (those sign a 32-byte digest).

use core::fmt;
use kiln_runtime::signature::{key_id, verify_ed25519, KeyId, KeyIdHex};

/// Prefix of a public key file (`NAME.pub`): the prefix, 64 hex digits, an optional comment.
pub const PUBLIC_KEY_PREFIX: &str = "kiln-ed25519-public";
/// Prefix of a secret key file (`NAME.key`): the prefix and the 32-byte seed in 64 hex digits.
pub const SECRET_KEY_PREFIX: &str = "kiln-ed25519-secret";
/// Length of a key record.
pub const KEY_RECORD_LEN: usize = 120;
/// Magic of a key record.
pub const KEY_RECORD_MAGIC: [u8; 4] = *b"KKEY";
/// Bytes a key record's signature covers.
pub const KEY_RECORD_SIGNED_LEN: usize = 56;

/// Why a key, key file or key record was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyError {
    /// A key file does not have the expected `PREFIX HEX` form.
    BadKeyText {
        /// The prefix the file should start with.
        expected: &'static str,
    },
    /// A key record is not 120 bytes, has a bad magic, version, action or reserved field.
    BadRecord {
        /// Which rule failed.
        reason: &'static str,
    },
    /// The key record is signed by a key the device does not trust.
    UntrustedSigner {
        /// The signer named in the record.
        key_id: KeyId,
    },
    /// The key record's signature does not verify.
    BadSignature,
    /// The ring is full: revoke a key before admitting another.
    RingFull,
    /// Revoking this key would leave the device with no trusted key.
    LastKey,
    /// Compiled-in keys cannot be revoked by a record (they are part of the firmware).
    BuiltInKey,
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::BadKeyText { expected } => write!(
                f,
                "not a Kiln key file: expected a line `{expected} <64 hex digits>`; create keys with `kiln keygen`"
            ),
            KeyError::BadRecord { reason } => write!(
                f,
                "malformed key record: {reason}; create it with `kiln admit-key`"
            ),
            KeyError::UntrustedSigner { key_id } => write!(
                f,
                "the key record is signed by key {} which the device does not trust; sign it with a trusted key",
                KeyIdHex(key_id)
            ),
            KeyError::BadSignature => write!(
                f,
                "the key record's signature does not verify: it was changed after signing"
            ),
            KeyError::RingFull => write!(
                f,
                "the device trusts as many keys as it can hold; revoke one before admitting another"
            ),
            KeyError::LastKey => write!(
                f,
                "revoking this key would leave the device with no trusted key; admit its successor first"
            ),
            KeyError::BuiltInKey => write!(
                f,
                "keys compiled into the firmware cannot be revoked by a record; ship new firmware"
            ),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for KeyError {}

fn hex_nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Decodes exactly 64 hex digits into 32 bytes.
pub fn decode_hex32(hex: &str) -> Option<[u8; 32]> {
    let b = hex.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (hex_nibble(b[2 * i])? << 4) | hex_nibble(b[2 * i + 1])?;
    }
    Some(out)
}

fn parse_key_text(text: &str, prefix: &'static str) -> Result<[u8; 32], KeyError> {
    let bad = KeyError::BadKeyText { expected: prefix };
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or(bad)?;
    let mut words = line.split_ascii_whitespace();
    if words.next() != Some(prefix) {
        return Err(bad);
    }
    decode_hex32(words.next().ok_or(bad)?).ok_or(bad)
}

/// Parses the text of a `NAME.pub` file.
///
/// # Errors
/// [`KeyError::BadKeyText`].
pub fn parse_public_key(text: &str) -> Result<[u8; 32], KeyError> {
    parse_key_text(text, PUBLIC_KEY_PREFIX)
}

/// Parses the text of a `NAME.key` file: the 32-byte Ed25519 seed.
///
/// # Errors
/// [`KeyError::BadKeyText`].
pub fn parse_secret_key(text: &str) -> Result<[u8; 32], KeyError> {
    parse_key_text(text, SECRET_KEY_PREFIX)
}

/// What a key record asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAction {
    /// Trust the subject key from now on.
    Admit = 1,
    /// Stop trusting the subject key.
    Revoke = 2,
}

/// A parsed (not yet verified) key record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    /// Admit or revoke.
    pub action: KeyAction,
    /// The key admitted or revoked.
    pub subject: [u8; 32],
    /// The key that signed the record.
    pub signer: KeyId,
    /// Signature over the first 56 bytes.
    pub signature: [u8; 64],
}

impl KeyRecord {
    /// The 56 bytes the signer signs, for `action` on `subject` by the key with id `signer`.
    pub fn signed_bytes(
        action: KeyAction,
        subject: &[u8; 32],
        signer: &KeyId,
    ) -> [u8; KEY_RECORD_SIGNED_LEN] {
        let mut b = [0u8; KEY_RECORD_SIGNED_LEN];
        b[0..4].copy_from_slice(&KEY_RECORD_MAGIC);
        b[4..6].copy_from_slice(&1u16.to_le_bytes());
        b[6..8].copy_from_slice(&(action as u16).to_le_bytes());
        b[16..48].copy_from_slice(subject);
        b[48..56].copy_from_slice(signer);
        b
    }

    /// The record's 120 bytes.
    pub fn to_bytes(&self) -> [u8; KEY_RECORD_LEN] {
        let mut b = [0u8; KEY_RECORD_LEN];
        b[..KEY_RECORD_SIGNED_LEN].copy_from_slice(&Self::signed_bytes(
            self.action,
            &self.subject,
            &self.signer,
        ));
        b[KEY_RECORD_SIGNED_LEN..].copy_from_slice(&self.signature);
        b
    }

    /// Parses a record's bytes (structure only; [`KeyRing::apply`] verifies the signature).
    ///
    /// # Errors
    /// [`KeyError::BadRecord`].
    pub fn parse(b: &[u8]) -> Result<Self, KeyError> {
        let bad = |reason| KeyError::BadRecord { reason };
        if b.len() != KEY_RECORD_LEN {
            return Err(bad("a key record is exactly 120 bytes"));
        }
        if b[0..4] != KEY_RECORD_MAGIC {
            return Err(bad("bad magic"));
        }
        if b[4..6] != 1u16.to_le_bytes() {
            return Err(bad("unsupported record version"));
        }
        let action = match u16::from_le_bytes([b[6], b[7]]) {
            1 => KeyAction::Admit,
            2 => KeyAction::Revoke,
            _ => return Err(bad("unknown action")),
        };
        if b[8..16].iter().any(|&x| x != 0) {
            return Err(bad("reserved bytes are not zero"));
        }
        let mut subject = [0u8; 32];
        subject.copy_from_slice(&b[16..48]);
        let mut signer = [0u8; 8];
        signer.copy_from_slice(&b[48..56]);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&b[56..120]);
        Ok(KeyRecord {
            action,
            subject,
            signer,
            signature,
        })
    }
}

/// Most keys admitted at run time (on top of the compiled-in ones).
pub const MAX_ADMITTED_KEYS: usize = 4;

/// The keys a device trusts: compiled-in ones (fixed) and admitted ones (persisted by the
/// update state machine).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRing<'a> {
    built_in: &'a [[u8; 32]],
    /// Keys admitted by records, in order.
    pub admitted: heapless::Vec<[u8; 32], MAX_ADMITTED_KEYS>,
}

impl<'a> KeyRing<'a> {
    /// A ring with the compiled-in keys and the admitted ones read back from flash.
    pub fn new(built_in: &'a [[u8; 32]], admitted: &[[u8; 32]]) -> Self {
        let mut ring = KeyRing {
            built_in,
            admitted: heapless::Vec::new(),
        };
        for k in admitted.iter().take(MAX_ADMITTED_KEYS) {
            if !ring.contains(k) {
                // Capacity checked by `take`.
                let _ = ring.admitted.push(*k);
            }
        }
        ring
    }

    /// Whether `key` is trusted.
    pub fn contains(&self, key: &[u8; 32]) -> bool {
        self.built_in.contains(key) || self.admitted.contains(key)
    }

    /// All trusted keys, compiled-in first; `out` must hold at least
    /// `built_in.len() + MAX_ADMITTED_KEYS` keys. Returns how many were written.
    pub fn all(&self, out: &mut [[u8; 32]]) -> usize {
        let mut n = 0;
        for k in self.built_in.iter().chain(self.admitted.iter()) {
            if let Some(slot) = out.get_mut(n) {
                *slot = *k;
                n += 1;
            }
        }
        n
    }

    /// Number of trusted keys.
    pub fn len(&self) -> usize {
        self.built_in.len() + self.admitted.len()
    }

    /// Whether the ring trusts no key at all (a device that can take no update).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn find_by_id(&self, id: &KeyId) -> Option<[u8; 32]> {
        self.built_in
            .iter()
            .chain(self.admitted.iter())
            .find(|k| key_id(k) == *id)
            .copied()
    }

    /// Verifies a record against this ring and applies it.
    ///
    /// # Errors
    /// [`KeyError`]: untrusted signer, bad signature, full ring, last key, compiled-in key.
    pub fn apply(&mut self, rec: &KeyRecord) -> Result<(), KeyError> {
        let signer = self
            .find_by_id(&rec.signer)
            .ok_or(KeyError::UntrustedSigner { key_id: rec.signer })?;
        let msg = KeyRecord::signed_bytes(rec.action, &rec.subject, &rec.signer);
        if !verify_ed25519(&signer, &msg, &rec.signature) {
            return Err(KeyError::BadSignature);
        }
        match rec.action {
            KeyAction::Admit => {
                if !self.contains(&rec.subject) {
                    self.admitted
                        .push(rec.subject)
                        .map_err(|_| KeyError::RingFull)?;
                }
            }
            KeyAction::Revoke => {
                if self.built_in.contains(&rec.subject) {
                    return Err(KeyError::BuiltInKey);
                }
                if let Some(i) = self.admitted.iter().position(|k| *k == rec.subject) {
                    if self.len() == 1 {
                        return Err(KeyError::LastKey);
                    }
                    self.admitted.remove(i);
                }
            }
        }
        Ok(())
    }
}
