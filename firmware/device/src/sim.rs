//! A NOR flash simulator with fault injection (host only, feature `std`).
//!
//! NOR semantics: erase sets a whole sector to `0xFF`; programming can only write into erased
//! words (the simulator refuses to program a word that is not erased, and counts it as a
//! **violation**: real parts would AND the bits or refuse). Programs are split into pages of
//! [`PAGE`] bytes, the way SPI NOR and most internal flash controllers program them, and every
//! page program and every sector erase is one *operation*.
//!
//! Fault injection: arm a cut at operation `n` and the simulator loses power there — either
//! before the operation ([`CutKind::Before`]) or in the middle of it ([`CutKind::Torn`]: only the
//! first quarters of the page's words were programmed and the next word got a random subset of
//! its bits, or the sector erase stopped part way and left the rest as it was). After a cut every
//! operation fails until [`SimFlash::power_on`].

use crate::flash::MappedFlash;
use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};
use std::vec;
use std::vec::Vec;

/// Bytes programmed by one page-program operation.
pub const PAGE: usize = 256;

/// Where power is cut within an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutKind {
    /// The operation never starts.
    Before,
    /// The operation is torn: `quarters` of 4 of its words (or of the sector) were done.
    Torn {
        /// 0..=3 quarters completed.
        quarters: u8,
    },
}

/// Errors of the simulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimError {
    /// Power was cut (now or earlier).
    PowerLost,
    /// Offset or length not aligned to the write or erase size.
    NotAligned,
    /// Outside the flash.
    OutOfBounds,
    /// Programming a word that is not erased (a bug in the caller).
    NotErased,
}

impl NorFlashError for SimError {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            SimError::NotAligned => NorFlashErrorKind::NotAligned,
            SimError::OutOfBounds => NorFlashErrorKind::OutOfBounds,
            SimError::PowerLost | SimError::NotErased => NorFlashErrorKind::Other,
        }
    }
}

/// The simulated flash: `WRITE`-byte program granularity, `ERASE`-byte sectors.
#[derive(Clone, Debug)]
pub struct SimFlash<const WRITE: usize, const ERASE: usize> {
    words: Vec<u128>,
    len: usize,
    ops: u64,
    cut: Option<(u64, CutKind)>,
    dead: bool,
    rng: u64,
    /// Torn operations that happened (programs and erases).
    pub torn: u64,
    /// Attempts to program words that were not erased.
    pub violations: u64,
    /// Page programs done.
    pub programs: u64,
    /// Sector erases done.
    pub erases: u64,
}

impl<const WRITE: usize, const ERASE: usize> SimFlash<WRITE, ERASE> {
    /// An erased flash of `capacity` bytes (a multiple of `ERASE`).
    pub fn new(capacity: usize) -> Self {
        SimFlash {
            words: vec![u128::MAX; capacity.div_ceil(16)],
            len: capacity,
            ops: 0,
            cut: None,
            dead: false,
            rng: 0x9E37_79B9_7F4A_7C15,
            torn: 0,
            violations: 0,
            programs: 0,
            erases: 0,
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut::<u128, u8>(&mut self.words)[..self.len]
    }

    /// Operations performed so far (page programs + sector erases, including a cut one).
    pub fn ops(&self) -> u64 {
        self.ops
    }

    /// Cuts power at operation number `at` (counted by [`SimFlash::ops`]); `seed` drives the
    /// random bits of a torn word.
    pub fn arm_cut(&mut self, at: u64, kind: CutKind, seed: u64) {
        self.cut = Some((at, kind));
        self.rng = seed | 1;
    }

    /// Whether power is off (a cut happened).
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// Flips bits in place, as bit rot or a stray write would (for tests).
    pub fn corrupt(&mut self, offset: usize, xor: u8) {
        if let Some(b) = self.bytes_mut().get_mut(offset) {
            *b ^= xor;
        }
    }

    /// Power returns: operations work again; no cut is armed.
    pub fn power_on(&mut self) {
        self.dead = false;
        self.cut = None;
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Counts one operation; returns the cut to apply to it, if power dies here.
    fn step(&mut self) -> Result<Option<CutKind>, SimError> {
        if self.dead {
            return Err(SimError::PowerLost);
        }
        let n = self.ops;
        self.ops += 1;
        match self.cut {
            Some((at, kind)) if at == n => {
                self.dead = true;
                Ok(Some(kind))
            }
            _ => Ok(None),
        }
    }

    fn program(&mut self, at: usize, data: &[u8]) {
        let mem = self.bytes_mut();
        for (d, s) in mem[at..at + data.len()].iter_mut().zip(data) {
            *d &= *s;
        }
    }
}

impl<const WRITE: usize, const ERASE: usize> ErrorType for SimFlash<WRITE, ERASE> {
    type Error = SimError;
}

impl<const WRITE: usize, const ERASE: usize> ReadNorFlash for SimFlash<WRITE, ERASE> {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), SimError> {
        let at = offset as usize;
        let src = self
            .mapped()
            .get(at..at + bytes.len())
            .ok_or(SimError::OutOfBounds)?;
        bytes.copy_from_slice(src);
        Ok(())
    }

    fn capacity(&self) -> usize {
        self.len
    }
}

impl<const WRITE: usize, const ERASE: usize> NorFlash for SimFlash<WRITE, ERASE> {
    const WRITE_SIZE: usize = WRITE;
    const ERASE_SIZE: usize = ERASE;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), SimError> {
        let (from, to) = (from as usize, to as usize);
        if from % ERASE != 0 || to % ERASE != 0 || from > to {
            return Err(SimError::NotAligned);
        }
        if to > self.len {
            return Err(SimError::OutOfBounds);
        }
        for sector in (from..to).step_by(ERASE) {
            match self.step()? {
                None => {
                    self.bytes_mut()[sector..sector + ERASE].fill(0xFF);
                    self.erases += 1;
                }
                Some(CutKind::Before) => return Err(SimError::PowerLost),
                Some(CutKind::Torn { quarters }) => {
                    // Erase proceeds word by word: a prefix is erased, one word is half-way
                    // (random bits set), the rest keeps its old contents.
                    let done = ERASE * quarters as usize / 4;
                    self.bytes_mut()[sector..sector + done].fill(0xFF);
                    let r = self.next_random();
                    let w = (sector + done).min(sector + ERASE - WRITE);
                    for (i, b) in self.bytes_mut()[w..w + WRITE].iter_mut().enumerate() {
                        *b |= (r >> (8 * (i % 8))) as u8;
                    }
                    self.torn += 1;
                    return Err(SimError::PowerLost);
                }
            }
        }
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), SimError> {
        let at = offset as usize;
        if !at.is_multiple_of(WRITE) || !bytes.len().is_multiple_of(WRITE) {
            return Err(SimError::NotAligned);
        }
        if at + bytes.len() > self.len {
            return Err(SimError::OutOfBounds);
        }
        if self.dead {
            return Err(SimError::PowerLost);
        }
        // Every target word must be erased (checked before anything is programmed).
        for w in (at..at + bytes.len()).step_by(WRITE) {
            if self.mapped()[w..w + WRITE].iter().any(|&b| b != 0xFF) {
                self.violations += 1;
                return Err(SimError::NotErased);
            }
        }
        let mut pos = at;
        let end = at + bytes.len();
        while pos < end {
            let page_end = ((pos / PAGE) + 1) * PAGE;
            let piece = page_end.min(end) - pos;
            let data = &bytes[pos - at..pos - at + piece];
            match self.step()? {
                None => {
                    self.program(pos, data);
                    self.programs += 1;
                }
                Some(CutKind::Before) => return Err(SimError::PowerLost),
                Some(CutKind::Torn { quarters }) => {
                    let words = piece / WRITE;
                    let done = words * quarters as usize / 4 * WRITE;
                    self.program(pos, &data[..done]);
                    if done < piece {
                        // The word being programmed got only some of its zero bits.
                        let r = self.next_random();
                        let mut partial = [0xFFu8; 64];
                        for (i, p) in partial[..WRITE].iter_mut().enumerate() {
                            *p = data[done + i] | (r >> (8 * (i % 8))) as u8;
                        }
                        self.program(pos + done, &partial[..WRITE]);
                    }
                    self.torn += 1;
                    return Err(SimError::PowerLost);
                }
            }
            pos += piece;
        }
        Ok(())
    }
}

impl<const WRITE: usize, const ERASE: usize> MappedFlash for SimFlash<WRITE, ERASE> {
    fn mapped(&self) -> &[u8] {
        &bytemuck::cast_slice::<u128, u8>(&self.words)[..self.len]
    }
}
