//! Artifact container, format v1: fixed header, section table, sections, trailer.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "KILN"
//! 4       2     format version (1)
//! 6       2     header length (64)
//! 8       4     flags (0; reserved)
//! 12      4     section count (1..=16)
//! 16      4     model version          (stamped by `kiln sign`)
//! 20      4     security counter       (stamped by `kiln sign`)
//! 24      4     arena bytes            (exact arena the interpreter needs)
//! 28      4     body length            (offset of the trailer; everything before is hashed)
//! 32      16    target board (ASCII, zero padded; all zero = any board; stamped by `kiln sign`)
//! 48      16    reserved (0)
//! 64      16*n  section table: kind u32, offset u32, length u32, reserved u32 (0)
//! ...           sections, each at a 16-byte aligned offset
//! body    16    trailer head: magic "KTRL", trailer length u32, signature count u32, reserved u32
//! +16     32    SHA-256 of bytes [0, body length)
//! +48     72*k  signatures: key id [u8; 8], Ed25519 signature [u8; 64]
//! ```
//! All integers are little-endian. See `docs/FORMAT.md`.

use crate::error::ModelError;
use sha2::{Digest, Sha256};

/// First four bytes of every artifact.
pub const MAGIC: [u8; 4] = *b"KILN";
/// The format version this runtime reads and the host tool writes.
pub const FORMAT_VERSION: u16 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 64;
/// Length of one section table entry.
pub const SECTION_ENTRY_LEN: usize = 16;
/// Most sections an artifact may have.
pub const MAX_SECTIONS: usize = 16;
/// Alignment of every section (and of the weights inside WEIGHTS).
pub const ALIGN: usize = 16;
/// Magic of the trailer.
pub const TRAILER_MAGIC: [u8; 4] = *b"KTRL";
/// Fixed part of the trailer: head (16) + SHA-256 (32).
pub const TRAILER_FIXED_LEN: usize = 48;
/// Length of one signature record: key id (8) + Ed25519 signature (64).
pub const SIGNATURE_LEN: usize = 72;
/// Most signatures a trailer may carry.
pub const MAX_SIGNATURES: usize = 8;

/// Section kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum SectionKind {
    /// The graph: header, tensor table, ops (postcard).
    Graph = 1,
    /// Constant tensors and prepared per-channel parameters, read in place.
    Weights = 2,
    /// Name and lineage (postcard head + JSON).
    Manifest = 3,
    /// Golden input/output pairs for the on-device self-test.
    SelfTest = 4,
    /// Histograms of inputs and outputs on the calibration data, for drift detection.
    Baseline = 5,
}

impl SectionKind {
    /// Parses a section kind.
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(SectionKind::Graph),
            2 => Some(SectionKind::Weights),
            3 => Some(SectionKind::Manifest),
            4 => Some(SectionKind::SelfTest),
            5 => Some(SectionKind::Baseline),
            _ => None,
        }
    }

    /// Upper-case name.
    pub const fn name(self) -> &'static str {
        match self {
            SectionKind::Graph => "GRAPH",
            SectionKind::Weights => "WEIGHTS",
            SectionKind::Manifest => "MANIFEST",
            SectionKind::SelfTest => "SELFTEST",
            SectionKind::Baseline => "BASELINE",
        }
    }
}

/// The decoded fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Number of sections.
    pub section_count: u32,
    /// Model version (0 until signed).
    pub model_version: u32,
    /// Security counter (0 until signed).
    pub security_counter: u32,
    /// Exact arena size the interpreter needs.
    pub arena_bytes: u32,
    /// Offset of the trailer.
    pub body_len: u32,
    /// Board the artifact is signed for: ASCII name, zero padded; all zero = any board.
    pub target: [u8; TARGET_LEN],
}

impl Header {
    /// The target board name (`""` = any board).
    pub fn target_name(&self) -> &str {
        let n = self
            .target
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(TARGET_LEN);
        // parse_header admits only ASCII here.
        core::str::from_utf8(&self.target[..n]).unwrap_or("")
    }
}

/// Length of the header's target board field.
pub const TARGET_LEN: usize = 16;

/// Whether `name` may be a target board name: 1..=16 bytes of `[a-z0-9._-]`.
pub fn valid_target_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= TARGET_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// One signature record of the trailer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SignatureRecord<'a> {
    /// First 8 bytes of the SHA-256 of the signing public key.
    pub key_id: &'a [u8; 8],
    /// Ed25519 signature over the body's SHA-256.
    pub signature: &'a [u8; 64],
}

/// A structurally valid artifact container whose digest matched. Sections are borrowed in place.
#[derive(Clone, Copy, Debug)]
pub struct Container<'a> {
    /// The whole artifact.
    pub bytes: &'a [u8],
    /// The header.
    pub header: Header,
    sections: [Option<&'a [u8]>; 5],
    /// SHA-256 of the body, from the trailer (verified).
    pub digest: &'a [u8; 32],
    signatures: &'a [u8],
}

fn read_u16(b: &[u8], at: usize, what: &'static str) -> Result<u16, ModelError> {
    let s = b.get(at..at + 2).ok_or(ModelError::Truncated { what })?;
    Ok(u16::from_le_bytes([s[0], s[1]]))
}

fn read_u32(b: &[u8], at: usize, what: &'static str) -> Result<u32, ModelError> {
    let s = b.get(at..at + 4).ok_or(ModelError::Truncated { what })?;
    Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Decodes and checks the fixed header (no digest check).
pub fn parse_header(bytes: &[u8]) -> Result<Header, ModelError> {
    let head = bytes
        .get(..HEADER_LEN)
        .ok_or(ModelError::Truncated { what: "header" })?;
    if head[0..4] != MAGIC {
        return Err(ModelError::BadMagic);
    }
    let version = read_u16(head, 4, "header")?;
    if version != FORMAT_VERSION {
        return Err(ModelError::UnsupportedFormatVersion { found: version });
    }
    if read_u16(head, 6, "header")? as usize != HEADER_LEN {
        return Err(ModelError::BadField {
            field: "header_len",
        });
    }
    if read_u32(head, 8, "header")? != 0 {
        return Err(ModelError::BadField { field: "flags" });
    }
    let section_count = read_u32(head, 12, "header")?;
    if section_count == 0 || section_count as usize > MAX_SECTIONS {
        return Err(ModelError::BadField {
            field: "section_count",
        });
    }
    let mut target = [0u8; TARGET_LEN];
    target.copy_from_slice(&head[32..32 + TARGET_LEN]);
    let name_len = target.iter().position(|&b| b == 0).unwrap_or(TARGET_LEN);
    let name_ok = target[..name_len]
        .iter()
        .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if !name_ok || target[name_len..].iter().any(|&b| b != 0) {
        return Err(ModelError::BadField { field: "target" });
    }
    if head[48..64].iter().any(|&b| b != 0) {
        return Err(ModelError::BadField { field: "reserved" });
    }
    let body_len = read_u32(head, 28, "header")?;
    if !(body_len as usize).is_multiple_of(ALIGN)
        || (body_len as usize) < HEADER_LEN + SECTION_ENTRY_LEN
    {
        return Err(ModelError::BadField { field: "body_len" });
    }
    Ok(Header {
        section_count,
        model_version: read_u32(head, 16, "header")?,
        security_counter: read_u32(head, 20, "header")?,
        arena_bytes: read_u32(head, 24, "header")?,
        body_len,
        target,
    })
}

impl<'a> Container<'a> {
    /// Parses the container and verifies the SHA-256 in the trailer. Signatures are not checked
    /// here (that is the device's update logic, which knows the trusted keys).
    ///
    /// # Errors
    /// Any structural problem or a digest mismatch.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ModelError> {
        let c = Self::parse_structure(bytes)?;
        let computed = Sha256::digest(&bytes[..c.header.body_len as usize]);
        if computed.as_slice() != c.digest.as_slice() {
            return Err(ModelError::DigestMismatch);
        }
        Ok(c)
    }

    /// Parses the container without hashing the body. Only for callers that verified the digest
    /// already (for example while the bytes were streamed into flash).
    ///
    /// # Errors
    /// Any structural problem.
    pub fn parse_structure(bytes: &'a [u8]) -> Result<Self, ModelError> {
        let header = parse_header(bytes)?;
        let body_len = header.body_len as usize;
        let table_end = HEADER_LEN + header.section_count as usize * SECTION_ENTRY_LEN;
        if table_end > body_len {
            return Err(ModelError::BadSection {
                reason: "section table runs past the body",
            });
        }
        // (Not `body_len + TRAILER_FIXED_LEN`: that overflows a 32-bit usize.)
        if bytes.len().saturating_sub(TRAILER_FIXED_LEN) < body_len {
            return Err(ModelError::Truncated { what: "trailer" });
        }
        // Trailer.
        let trailer = &bytes[body_len..];
        if trailer[0..4] != TRAILER_MAGIC {
            return Err(ModelError::BadField {
                field: "trailer magic",
            });
        }
        let trailer_len = read_u32(trailer, 4, "trailer")? as usize;
        let sig_count = read_u32(trailer, 8, "trailer")? as usize;
        if read_u32(trailer, 12, "trailer")? != 0 {
            return Err(ModelError::BadField {
                field: "trailer reserved",
            });
        }
        if sig_count > MAX_SIGNATURES
            || trailer_len != TRAILER_FIXED_LEN + sig_count * SIGNATURE_LEN
        {
            return Err(ModelError::BadField {
                field: "trailer length",
            });
        }
        if trailer.len() != trailer_len {
            return if trailer.len() < trailer_len {
                Err(ModelError::Truncated { what: "trailer" })
            } else {
                Err(ModelError::BadField {
                    field: "file length",
                })
            };
        }
        let digest: &[u8; 32] = trailer[16..48]
            .try_into()
            .map_err(|_| ModelError::Truncated { what: "trailer" })?;
        let signatures = &trailer[TRAILER_FIXED_LEN..];

        // Section table: each kind once, 16-aligned, inside [table_end, body_len), no overlap.
        let mut sections: [Option<&'a [u8]>; 5] = [None; 5];
        let mut ranges = [(0usize, 0usize); MAX_SECTIONS];
        for i in 0..header.section_count as usize {
            let at = HEADER_LEN + i * SECTION_ENTRY_LEN;
            let kind = read_u32(bytes, at, "section table")?;
            let offset = read_u32(bytes, at + 4, "section table")? as usize;
            let len = read_u32(bytes, at + 8, "section table")? as usize;
            if read_u32(bytes, at + 12, "section table")? != 0 {
                return Err(ModelError::BadSection {
                    reason: "reserved field is not zero",
                });
            }
            let kind = SectionKind::from_u32(kind).ok_or(ModelError::BadSection {
                reason: "unknown section kind",
            })?;
            if !offset.is_multiple_of(ALIGN) {
                return Err(ModelError::BadSection {
                    reason: "section is not 16-byte aligned",
                });
            }
            let end = offset.checked_add(len).ok_or(ModelError::BadSection {
                reason: "section range overflows",
            })?;
            if offset < table_end || end > body_len {
                return Err(ModelError::BadSection {
                    reason: "section lies outside the body",
                });
            }
            for &(s, e) in &ranges[..i] {
                if offset < e && s < end {
                    return Err(ModelError::BadSection {
                        reason: "sections overlap",
                    });
                }
            }
            ranges[i] = (offset, end);
            let slot = &mut sections[kind as usize - 1];
            if slot.is_some() {
                return Err(ModelError::BadSection {
                    reason: "a section kind appears twice",
                });
            }
            *slot = Some(&bytes[offset..end]);
        }
        if sections[SectionKind::Graph as usize - 1].is_none() {
            return Err(ModelError::BadSection {
                reason: "GRAPH section is missing",
            });
        }
        if sections[SectionKind::Weights as usize - 1].is_none() {
            return Err(ModelError::BadSection {
                reason: "WEIGHTS section is missing",
            });
        }
        Ok(Container {
            bytes,
            header,
            sections,
            digest,
            signatures,
        })
    }

    /// The bytes of a section, if present.
    pub fn section(&self, kind: SectionKind) -> Option<&'a [u8]> {
        self.sections[kind as usize - 1]
    }

    /// The body: everything the digest (and so every signature) covers.
    pub fn body(&self) -> &'a [u8] {
        &self.bytes[..self.header.body_len as usize]
    }

    /// Number of signatures in the trailer.
    pub fn signature_count(&self) -> usize {
        self.signatures.len() / SIGNATURE_LEN
    }

    /// Signature record `i`.
    pub fn signature(&self, i: usize) -> Option<SignatureRecord<'a>> {
        let rec = self
            .signatures
            .get(i * SIGNATURE_LEN..(i + 1) * SIGNATURE_LEN)?;
        Some(SignatureRecord {
            key_id: rec[..8].try_into().ok()?,
            signature: rec[8..].try_into().ok()?,
        })
    }
}
