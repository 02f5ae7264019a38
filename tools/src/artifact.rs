//! The artifact writer (format v1; the reader is `kiln_runtime::format`), and an aligned byte
//! buffer for loading artifacts on the host.

pub use kiln_runtime::writer::{
    append_signed_trailer, append_trailer, body_digest, write_artifact, HeaderFields,
};

/// Bytes in a 16-byte aligned heap buffer, as the runtime requires for artifacts.
#[derive(Clone, Debug, Default)]
pub struct AlignedBytes {
    words: Vec<u128>,
    len: usize,
}

impl AlignedBytes {
    /// Copies `data` into an aligned buffer.
    pub fn new(data: &[u8]) -> Self {
        let mut words = vec![0u128; data.len().div_ceil(16)];
        bytemuck::cast_slice_mut::<u128, u8>(&mut words)[..data.len()].copy_from_slice(data);
        AlignedBytes {
            words,
            len: data.len(),
        }
    }

    /// A zeroed aligned buffer (an arena).
    pub fn zeroed(len: usize) -> Self {
        AlignedBytes {
            words: vec![0u128; len.div_ceil(16)],
            len,
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &bytemuck::cast_slice::<u128, u8>(&self.words)[..self.len]
    }

    /// The bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut::<u128, u8>(&mut self.words)[..self.len]
    }
}
