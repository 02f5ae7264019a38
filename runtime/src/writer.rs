//! The artifact writer (host side, `std` only): the counterpart of [`crate::format`]'s reader.
//! The host tool's emitter and signer and the device simulator's test artifacts use it.

use crate::format::{
    SectionKind, ALIGN, FORMAT_VERSION, HEADER_LEN, MAGIC, MAX_SIGNATURES, SECTION_ENTRY_LEN,
    SIGNATURE_LEN, TRAILER_FIXED_LEN, TRAILER_MAGIC,
};
use sha2::{Digest, Sha256};
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

/// Header fields the writer stamps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeaderFields {
    /// Model version (0 until signed).
    pub model_version: u32,
    /// Security counter (0 until signed).
    pub security_counter: u32,
    /// Exact arena bytes.
    pub arena_bytes: u32,
}

fn pad_to(buf: &mut Vec<u8>, align: usize) {
    while !buf.len().is_multiple_of(align) {
        buf.push(0);
    }
}

/// Writes an artifact: header, section table, 16-byte aligned sections, trailer with the
/// SHA-256 of the body and no signatures.
///
/// # Errors
/// A section is larger than the format can address (4 GiB).
pub fn write_artifact(
    fields: HeaderFields,
    sections: &[(SectionKind, &[u8])],
) -> Result<Vec<u8>, String> {
    let count = sections.len();
    let mut out = vec![0u8; HEADER_LEN + count * SECTION_ENTRY_LEN];
    pad_to(&mut out, ALIGN);
    let mut table = Vec::with_capacity(count);
    for (kind, data) in sections {
        let offset = out.len();
        out.extend_from_slice(data);
        pad_to(&mut out, ALIGN);
        let off = u32::try_from(offset).map_err(|_| "artifact is larger than 4 GiB".to_string())?;
        let len =
            u32::try_from(data.len()).map_err(|_| "section is larger than 4 GiB".to_string())?;
        table.push((*kind as u32, off, len));
    }
    let body_len =
        u32::try_from(out.len()).map_err(|_| "artifact is larger than 4 GiB".to_string())?;
    out[0..4].copy_from_slice(&MAGIC);
    out[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[6..8].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
    out[12..16].copy_from_slice(&(count as u32).to_le_bytes());
    out[16..20].copy_from_slice(&fields.model_version.to_le_bytes());
    out[20..24].copy_from_slice(&fields.security_counter.to_le_bytes());
    out[24..28].copy_from_slice(&fields.arena_bytes.to_le_bytes());
    out[28..32].copy_from_slice(&body_len.to_le_bytes());
    for (i, (kind, off, len)) in table.iter().enumerate() {
        let at = HEADER_LEN + i * SECTION_ENTRY_LEN;
        out[at..at + 4].copy_from_slice(&kind.to_le_bytes());
        out[at + 4..at + 8].copy_from_slice(&off.to_le_bytes());
        out[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
    }
    append_trailer(&mut out);
    Ok(out)
}

/// Appends a trailer (no signatures) covering everything in `body`.
pub fn append_trailer(body: &mut Vec<u8>) {
    append_signed_trailer(body, &[]);
}

/// Appends a trailer covering everything in `body`, with the given signature records
/// (key id, Ed25519 signature over the returned digest — compute it with [`body_digest`]).
/// At most [`MAX_SIGNATURES`] records are written.
pub fn append_signed_trailer(body: &mut Vec<u8>, signatures: &[([u8; 8], [u8; 64])]) {
    let digest = body_digest(body);
    let sigs = &signatures[..signatures.len().min(MAX_SIGNATURES)];
    body.extend_from_slice(&TRAILER_MAGIC);
    body.extend_from_slice(
        &((TRAILER_FIXED_LEN + sigs.len() * SIGNATURE_LEN) as u32).to_le_bytes(),
    );
    body.extend_from_slice(&(sigs.len() as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(&digest);
    for (id, sig) in sigs {
        body.extend_from_slice(id);
        body.extend_from_slice(sig);
    }
}

/// The SHA-256 the trailer carries and signatures cover: of every byte of `body`.
pub fn body_digest(body: &[u8]) -> [u8; 32] {
    Sha256::digest(body).into()
}
