//! Shared by the fuzz targets: an aligned copy of the input, and a re-sealed variant whose
//! trailer digest matches its body, so that mutations reach the graph validation and the
//! interpreter instead of stopping at the SHA-256 check.

#![allow(dead_code)]

use sha2::{Digest, Sha256};

/// Bytes in a 16-byte aligned heap buffer (the runtime refuses unaligned artifacts and arenas).
pub struct Aligned {
    words: Vec<u128>,
    len: usize,
}

impl Aligned {
    pub fn new(data: &[u8]) -> Self {
        let mut a = Self::zeroed(data.len());
        a.as_mut_slice().copy_from_slice(data);
        a
    }

    pub fn zeroed(len: usize) -> Self {
        Aligned {
            words: vec![0u128; len.div_ceil(16)],
            len,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &bytemuck::cast_slice::<u128, u8>(&self.words)[..self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut::<u128, u8>(&mut self.words)[..self.len]
    }
}

/// The input with its trailer digest recomputed (body length from header offset 28, digest at
/// trailer offset 16..48), when the header leaves room for a trailer and the digest is not
/// already right.
pub fn resealed(data: &[u8]) -> Option<Vec<u8>> {
    let body_len = u32::from_le_bytes(data.get(28..32)?.try_into().ok()?) as usize;
    if body_len.checked_add(48)? > data.len() {
        return None;
    }
    let digest = Sha256::digest(&data[..body_len]);
    if data[body_len + 16..body_len + 48] == digest[..] {
        return None;
    }
    let mut v = data.to_vec();
    v[body_len + 16..body_len + 48].copy_from_slice(&digest);
    Some(v)
}
