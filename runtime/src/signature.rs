//! Ed25519 signatures over an artifact's SHA-256 (verify side; signing is the host's job).
//!
//! A signature record in the trailer names its key by id: the first 8 bytes of the SHA-256 of
//! the 32-byte Ed25519 public key. The signed message is the 32-byte SHA-256 of the body (every
//! byte before the trailer, so the header's model version, security counter and target board are
//! covered). Verification is always compiled in: there is no feature that turns it off.

use crate::format::{Container, SignatureRecord};
use core::fmt;
use ed25519_dalek::{Signature, VerifyingKey};
use sha2::{Digest, Sha256};

/// Identifies a public key: the first 8 bytes of its SHA-256.
pub type KeyId = [u8; 8];

/// The key id of an Ed25519 public key.
pub fn key_id(public: &[u8; 32]) -> KeyId {
    let d = Sha256::digest(public);
    let mut id = [0u8; 8];
    id.copy_from_slice(&d[..8]);
    id
}

/// Why signatures did not verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignatureError {
    /// The artifact carries no signature at all.
    Unsigned,
    /// None of the signatures is by a key this device trusts.
    UntrustedKey {
        /// Key id of the first signature found.
        key_id: KeyId,
    },
    /// A signature by a trusted key does not verify: the bytes were changed after signing.
    BadSignature {
        /// The trusted key whose signature failed.
        key_id: KeyId,
    },
}

impl fmt::Display for SignatureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignatureError::Unsigned => write!(
                f,
                "the artifact is not signed: sign it with `kiln sign --key KEY.key` before installing it"
            ),
            SignatureError::UntrustedKey { key_id } => write!(
                f,
                "the artifact is signed by key {} which is not trusted: sign it with a trusted key or admit that key first",
                KeyIdHex(key_id)
            ),
            SignatureError::BadSignature { key_id } => write!(
                f,
                "the signature by key {} does not verify: the artifact was changed after it was signed; rebuild and re-sign it",
                KeyIdHex(key_id)
            ),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for SignatureError {}

/// Formats a key id as 16 lower-case hex digits.
pub struct KeyIdHex<'a>(pub &'a KeyId);

impl fmt::Display for KeyIdHex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Verifies one Ed25519 signature (RFC 8032, strict: non-canonical encodings and small-order
/// keys are refused). `false` for a public key that is not a valid curve point.
pub fn verify_ed25519(public: &[u8; 32], message: &[u8], signature: &[u8; 64]) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(public) else {
        return false;
    };
    let sig = Signature::from_bytes(signature);
    key.verify_strict(message, &sig).is_ok()
}

/// Verifies signature records over `digest` against the trusted public keys.
///
/// Every signature whose key id is trusted must verify, and at least one must be there; signatures
/// by keys the device does not know are ignored (an artifact may be co-signed for other fleets).
/// Returns the id of the first trusted key that verified.
///
/// # Errors
/// [`SignatureError`].
pub fn verify_records<'a>(
    digest: &[u8; 32],
    records: impl IntoIterator<Item = SignatureRecord<'a>>,
    trusted: &[[u8; 32]],
) -> Result<KeyId, SignatureError> {
    let mut first_untrusted = None;
    let mut verified = None;
    for rec in records {
        let Some(public) = trusted.iter().find(|k| key_id(k) == *rec.key_id) else {
            first_untrusted.get_or_insert(*rec.key_id);
            continue;
        };
        if !verify_ed25519(public, digest, rec.signature) {
            return Err(SignatureError::BadSignature {
                key_id: *rec.key_id,
            });
        }
        verified.get_or_insert(*rec.key_id);
    }
    match (verified, first_untrusted) {
        (Some(id), _) => Ok(id),
        (None, Some(key_id)) => Err(SignatureError::UntrustedKey { key_id }),
        (None, None) => Err(SignatureError::Unsigned),
    }
}

impl<'a> Container<'a> {
    /// The trailer's signature records.
    pub fn signatures(&self) -> impl Iterator<Item = SignatureRecord<'a>> + '_ {
        (0..self.signature_count()).filter_map(move |i| self.signature(i))
    }

    /// Verifies the trailer's signatures over the (already checked) body digest.
    ///
    /// # Errors
    /// [`SignatureError`].
    pub fn verify_signatures(&self, trusted: &[[u8; 32]]) -> Result<KeyId, SignatureError> {
        verify_records(self.digest, self.signatures(), trusted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 8032 section 7.1, test 2 (one-byte message 0x72).
    const PK: [u8; 32] = [
        0x3d, 0x40, 0x17, 0xc3, 0xe8, 0x43, 0x89, 0x5a, 0x92, 0xb7, 0x0a, 0xa7, 0x4d, 0x1b, 0x7e,
        0xbc, 0x9c, 0x98, 0x2c, 0xcf, 0x2e, 0xc4, 0x96, 0x8c, 0xc0, 0xcd, 0x55, 0xf1, 0x2a, 0xf4,
        0x66, 0x0c,
    ];
    const SIG: [u8; 64] = [
        0x92, 0xa0, 0x09, 0xa9, 0xf0, 0xd4, 0xca, 0xb8, 0x72, 0x0e, 0x82, 0x0b, 0x5f, 0x64, 0x25,
        0x40, 0xa2, 0xb2, 0x7b, 0x54, 0x16, 0x50, 0x3f, 0x8f, 0xb3, 0x76, 0x22, 0x23, 0xeb, 0xdb,
        0x69, 0xda, 0x08, 0x5a, 0xc1, 0xe4, 0x3e, 0x15, 0x99, 0x6e, 0x45, 0x8f, 0x36, 0x13, 0xd0,
        0xf1, 0x1d, 0x8c, 0x38, 0x7b, 0x2e, 0xae, 0xb4, 0x30, 0x2a, 0xee, 0xb0, 0x0d, 0x29, 0x16,
        0x12, 0xbb, 0x0c, 0x00,
    ];

    #[test]
    fn rfc8032_vector_verifies_and_any_flip_fails() {
        assert!(verify_ed25519(&PK, &[0x72], &SIG));
        assert!(!verify_ed25519(&PK, &[0x73], &SIG));
        for i in 0..64 {
            let mut s = SIG;
            s[i] ^= 1;
            assert!(!verify_ed25519(&PK, &[0x72], &s), "flip in byte {i}");
        }
        let mut pk = PK;
        pk[0] ^= 1;
        assert!(!verify_ed25519(&pk, &[0x72], &SIG));
    }

    #[test]
    fn records_need_one_trusted_valid_signature() {
        let digest = [7u8; 32];
        let id = key_id(&PK);
        let sig = [0u8; 64];
        let rec = SignatureRecord {
            key_id: &id,
            signature: &sig,
        };
        assert_eq!(
            verify_records(&digest, [], &[PK]),
            Err(SignatureError::Unsigned)
        );
        assert_eq!(
            verify_records(&digest, [rec], &[]),
            Err(SignatureError::UntrustedKey { key_id: id })
        );
        assert_eq!(
            verify_records(&digest, [rec], &[PK]),
            Err(SignatureError::BadSignature { key_id: id })
        );
    }
}
